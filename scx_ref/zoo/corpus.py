"""The evaluation corpus: CPython's ``pydoc_data.topics`` (the text of the ``help()`` topics).

Fixed order: the topics joined by a blank line in sorted key order, so every run sees the same text.
Models with a tokenizer use it (no special tokens); the random models (no tokenizer) use a
deterministic byte-level mapping: UTF-8 byte b → token id b mod V.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..errors import ConfigError
from ..protocol.decoys import unigram_counts

__all__ = [
    "byte_tokenize",
    "corpus_text",
    "corpus_tokens",
    "first_tokens",
    "prompts",
    "public_unigram",
    "tokenize",
    "topic_texts",
]

IdArray = npt.NDArray[np.int64]


def _count(value: Any, name: str, lo: int) -> int:
    """``value`` as an int: an integer (Python or numpy, not bool) >= ``lo``, else ConfigError."""
    return check_int(value, name, lo)


def topic_texts() -> list[str]:
    """The corpus's documents: the ``pydoc_data.topics.topics`` values (stripped) in sorted key order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def corpus_text() -> str:
    """The corpus: :func:`topic_texts` joined by blank lines."""
    return "\n\n".join(topic_texts())


def byte_tokenize(text: str, vocab_size: int) -> IdArray:
    """Token ids of ``text`` under the byte mapping b → b mod vocab_size (identity when V ≥ 256).
    ConfigError for a text that is not a str, a text UTF-8 cannot encode (a lone surrogate, as Python
    makes of undecodable bytes in argv), or a vocab_size that is not an integer >= 2."""
    vocab_size = _count(vocab_size, "vocab_size", 2)
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str, got {type(text).__name__}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"text is not valid Unicode (cannot be encoded as UTF-8): {exc}") from exc
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) % vocab_size


def tokenize(text: str, tokenizer: Any | None, vocab_size: int) -> IdArray:
    """Token ids of ``text`` with the model's tokenizer (no special tokens), else the byte mapping.
    ConfigError when the tokenizer's ids are not one row of integers in [0, vocab_size)."""
    if tokenizer is None:
        return byte_tokenize(text, vocab_size)
    vocab_size = _count(vocab_size, "vocab_size", 2)
    try:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(f"the tokenizer's output has no row of input_ids: {exc}") from exc
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError(
            f"the tokenizer must give one row of integer ids, got {ids.dtype} of shape {ids.shape}"
        )
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ConfigError(f"tokenizer produced ids outside the vocabulary of {vocab_size}")
    return ids


def first_tokens(text: str, n_tokens: int, chars: int, tokenizer: Any | None, vocab_size: int) -> IdArray:
    """The first ``n_tokens`` tokens of ``text`` (all of them if it has fewer), tokenizing only a prefix
    where one is enough: its first ``chars`` characters and on to the next blank line, less the whitespace
    before it — a prefix cut inside a word or a run of newlines (or whatever else a tokenizer makes one
    token of) tokenizes its end differently from the whole text — and all of ``text`` when that prefix
    gives fewer than ``n_tokens``."""
    cut = text.find("\n\n", min(chars, len(text)))
    ids = tokenize(text if cut < 0 else text[:cut].rstrip(), tokenizer, vocab_size)
    if len(ids) < n_tokens and cut >= 0:
        ids = tokenize(text, tokenizer, vocab_size)
    return ids[:n_tokens]


def corpus_tokens(n_tokens: int, tokenizer: Any | None, vocab_size: int) -> IdArray:
    """The first ``n_tokens`` tokens of the corpus — those of :func:`tokenize` on the whole text, for a
    tokenizer whose tokens do not span a blank line (ConfigError if the corpus is shorter, or for an
    ``n_tokens`` that is not an integer >= 2)."""
    n_tokens = _count(n_tokens, "the number of tokens", 2)
    # tokenize only a prefix long enough (≥ 1 byte per token; a generous factor for safety)
    ids = first_tokens(corpus_text(), n_tokens, 8 * n_tokens + 1024, tokenizer, vocab_size)
    if len(ids) < n_tokens:
        raise ConfigError(f"the corpus has only {len(ids)} tokens, {n_tokens} asked")
    return ids


def prompts(count: int, length: int, tokenizer: Any | None, vocab_size: int) -> list[IdArray]:
    """``count`` prompts of ``length`` tokens: the first tokens of topics spread evenly over the sorted keys
    (ConfigError for a count outside 1..#topics, a length that is not an integer >= 1 or a topic of fewer
    tokens)."""
    length = _count(length, "length", 1)
    texts = topic_texts()
    count = _count(count, "count", 1)
    if count > len(texts):
        raise ConfigError(f"count must be in 1..{len(texts)}, got {count}")
    out = []
    for i in range(count):
        index = (i * len(texts)) // count
        ids = first_tokens(texts[index], length, 16 * length + 64, tokenizer, vocab_size)
        if len(ids) < length:
            raise ConfigError(f"topic {index} (sorted keys) is shorter than {length} tokens")
        out.append(ids)
    return out


#: The share of probability :func:`public_unigram` leaves to tokens the corpus lacks.
UNIGRAM_SMOOTHING = 0.01


def public_unigram(tokenizer: Any | None, vocab_size: int) -> IdArray:
    """The public unigram distribution the client's secret calibration text is drawn from (DESIGN §5.1:
    "block 1: embeddings of tokens drawn from a public unigram distribution"): the counts of the whole
    corpus's tokens (:func:`tokenize`), scaled so that the +1 every token keeps holds at most
    :data:`UNIGRAM_SMOOTHING` of the probability (:func:`~scx_ref.protocol.decoys.unigram_counts`).
    Pass it as ``unigram=`` to :class:`~scx_ref.protocol.Client` or :class:`~scx_ref.hf.SCXModel`: drawn
    uniformly instead, SmolLM2's block-1 decoys are mostly rare tokens a frequency prior finds (README,
    "Privacy, measured"). ConfigError as :func:`tokenize`."""
    return unigram_counts(tokenize(corpus_text(), tokenizer, vocab_size), vocab_size, UNIGRAM_SMOOTHING)

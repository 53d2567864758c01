"""LLM-assisted recovery of a permuted bag of tokens (paper §7.3 "LLM-assisted recovery"; DESIGN §8).

The server holds a bag of n + r token ids (recovered from permuted rows; decoys included) and knows n
(the session's ``open`` message states it). The model itself stands in for GPT-4o: a beam search over
sequences drawn from the bag without replacement, scored by the model's log-likelihood, picks the real
tokens and their order. Scored by the exact-order rate and Kendall τ against the true order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy.stats import kendalltau

from .._checks import token_ids
from ..errors import ConfigError, DTypeError, NonFiniteError, ShapeError, VocabularyError
from ..weights import ModelWeights
from ._model import forward_trace, int_arg

__all__ = ["LanguageModel", "NumpyLM", "TorchLM", "beam_reorder", "order_scores"]

Array = npt.NDArray[Any]


class LanguageModel(Protocol):
    """Next-token log-probabilities after each of B equal-length sequences (B × T ids → B × V)."""

    def next_logprobs(self, seqs: Array) -> Array:
        """log p(next token | seq) for each of the B sequences (B × V)."""
        ...

    def token_logprobs(self, seqs: Array) -> Array:
        """log p(seq[t] | seq[<t]) for every t (B × T); position 0 is conditioned on the BOS only."""
        ...


def _batch(seqs: Array) -> Array:
    """``seqs`` as a B × T int64 array (ShapeError unless 2-D; VocabularyError unless integer ids)."""
    arr = np.asarray(seqs)
    if arr.ndim != 2:
        raise ShapeError(f"sequences must be a 2-D array (B × T), got shape {arr.shape}")
    token_ids(arr.ravel(), allow_empty=True)
    return np.asarray(arr, dtype=np.int64)


def _log_softmax(z: Array) -> Array:
    z = z - z.max(axis=-1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=-1, keepdims=True)))


@dataclass
class NumpyLM:
    """The numpy reference model as a language model (``bos`` prepended when given; else an empty
    context scores the first token uniformly)."""

    weights: ModelWeights
    bos: int | None = None

    def _logits(self, seq: Array) -> Array:
        ids = np.asarray(seq, dtype=np.int64)
        if self.bos is not None:
            ids = np.concatenate([[self.bos], ids])
        if not len(ids):
            return np.zeros((1, self.weights.config.vocab_size))
        tr = forward_trace(self.weights, ids)
        assert tr.logits is not None
        return np.asarray(tr.logits, dtype=np.float64)

    def next_logprobs(self, seqs: Array) -> Array:
        """Log-probabilities of the token after each sequence (B × T ids → B × V)."""
        batch = _batch(seqs)
        if not len(batch):
            return np.zeros((0, self.weights.config.vocab_size))
        return np.stack([_log_softmax(self._logits(s)[-1]) for s in batch])

    def token_logprobs(self, seqs: Array) -> Array:
        """Per-token log-likelihood of each sequence (B × T ids → B × T)."""
        batch = _batch(seqs)
        out = []
        V = self.weights.config.vocab_size
        if not batch.size:
            return np.zeros(batch.shape)
        for s in batch:
            lp = _log_softmax(self._logits(s))
            prev = lp[:-1] if self.bos is None else lp[: len(s)]
            first = np.array([-np.log(V)]) if self.bos is None else np.zeros(0)
            out.append(np.concatenate([first, prev[np.arange(len(prev)), s[len(s) - len(prev) :]]]))
        return np.stack(out)


@dataclass
class TorchLM:
    """A Hugging Face causal LM (torch, CPU or GPU) as a language model, batched (an empty batch gives
    empty results, as :class:`NumpyLM`'s)."""

    model: Any
    bos: int
    batch: int = 64

    def _lp(self, seqs: Array) -> Array:
        import torch

        ids = _batch(seqs)
        if not len(ids):  # no sequences: no rows (np.concatenate of none raised), as NumpyLM gives
            return np.zeros((0, ids.shape[1] + 1, int(self.model.config.vocab_size)))
        outs = []
        dev = next(self.model.parameters()).device
        for start in range(0, len(ids), self.batch):
            chunk = ids[start : start + self.batch]
            x = torch.from_numpy(np.concatenate([np.full((len(chunk), 1), self.bos), chunk], axis=1)).to(dev)
            with torch.no_grad():
                logits = self.model(input_ids=x).logits.float()
            outs.append(torch.log_softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(outs)

    def next_logprobs(self, seqs: Array) -> Array:
        """Log-probabilities of the token after each sequence."""
        return np.asarray(self._lp(seqs)[:, -1])

    def token_logprobs(self, seqs: Array) -> Array:
        """Per-token log-likelihood of each sequence."""
        ids = _batch(seqs)
        lp = self._lp(ids)[:, :-1]
        return np.asarray(np.take_along_axis(lp, ids[:, :, None], axis=2)[..., 0])


def _scores(lp: Any, shape: tuple[int, ...], what: str) -> Array:
    """A language model's ``what`` as float64 of ``shape`` (-1: any size on that axis): DTypeError when
    not numeric, ShapeError for another shape, NonFiniteError for a NaN (which would sort, or win an
    argmax, at random; −∞, probability 0, is a score)."""
    try:
        arr = np.asarray(lp, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"the language model's {what} are no numeric array: {exc}") from None
    if arr.ndim != len(shape) or any(
        want not in (-1, got) for want, got in zip(shape, arr.shape, strict=True)
    ):
        raise ShapeError(f"the language model's {what} have shape {arr.shape}, not {shape}")
    if np.isnan(arr).any():
        raise NonFiniteError(f"the language model's {what} hold NaN")
    return arr


def beam_reorder(bag: npt.ArrayLike, n: int, lm: LanguageModel, beam: int = 8) -> list[int]:
    """The most likely sequence of ``n`` tokens drawn without replacement from ``bag`` (beam search).

    Guarantee: returns a sub-multiset of ``bag`` of size n; with ``beam`` ≥ the number of partial
    sequences it is the exact maximum-likelihood choice. ConfigError unless 0 < n ≤ the bag's size,
    ``beam`` ≥ 1 and ``lm`` has ``next_logprobs``; VocabularyError unless the bag holds ids of the model's
    vocabulary; ShapeError or NonFiniteError when ``lm`` answers with other than one NaN-free row of
    log-probabilities per sequence."""
    items = [int(t) for t in token_ids(np.asarray(bag).ravel(), allow_empty=True)]
    n = int_arg(n, "n")
    if not 0 < n <= len(items):
        raise ConfigError(f"need 0 < n <= bag size ({len(items)}), got n={n}")
    beam = int_arg(beam, "beam", 1)
    if not callable(getattr(lm, "next_logprobs", None)):
        raise ConfigError(f"lm must be a language model (with next_logprobs), got {type(lm).__name__}")
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    for _ in range(n):
        seqs = np.array([b[1] for b in beams], dtype=np.int64).reshape(len(beams), -1)
        lp = _scores(lm.next_logprobs(seqs), (len(beams), -1), "next-token log-probabilities")
        if min(items) < 0 or max(items) >= lp.shape[-1]:
            raise VocabularyError(
                f"bag ids must lie in [0, {lp.shape[-1]}), got range [{min(items)}, {max(items)}]"
            )
        cand: list[tuple[float, list[int]]] = []
        for (score, seq), row in zip(beams, lp, strict=True):
            left = Counter(items) - Counter(seq)
            cand.extend((score + float(row[t]), [*seq, t]) for t in left)
        cand.sort(key=lambda c: -c[0])
        beams = cand[:beam]
    return beams[0][1]


def order_scores(recovered: npt.ArrayLike, truth: npt.ArrayLike) -> dict[str, float]:
    """exact (1.0 when the sequences are equal), token recall (multiset overlap / n) and Kendall τ
    between the positions of the true tokens that were recovered (each occurrence matched once, in order);
    τ is 0.0 when fewer than two true tokens were recovered or it is undefined (no order to judge).
    ConfigError for an empty ``truth``; VocabularyError unless both hold integer ids."""
    rec = [int(t) for t in token_ids(np.asarray(recovered).ravel(), allow_empty=True)]
    tru = [int(t) for t in token_ids(np.asarray(truth).ravel(), allow_empty=True)]
    if not tru:
        raise ConfigError("the true sequence is empty: nothing to score")
    recall = sum((Counter(rec) & Counter(tru)).values()) / len(tru)
    used: set[int] = set()
    pairs = []
    for i, t in enumerate(rec):
        for j, u in enumerate(tru):
            if u == t and j not in used:
                used.add(j)
                pairs.append((i, j))
                break
    if len(pairs) >= 2:
        tau = float(kendalltau([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
        tau = 0.0 if np.isnan(tau) else tau
    else:
        tau = 0.0
    return {"exact": float(rec == tru), "recall": recall, "kendall_tau": tau}

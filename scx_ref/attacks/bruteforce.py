"""Brute force (DESIGN §7, §8): the size of every permuted stage's search space, and an empirical
order-recovery run for tiny n where enumerating every order is possible.

Search space of a token-permuted stage with n real and r decoy rows: (n + r)! orders, log₂((n + r)!)
bits of key — but a guess of the prompt's order need only say which rows are real and in what order, so it
must get log₂((n + r)!/r!) bits right, log₂(r!) fewer (:func:`~scx_ref.dp.permutation.prompt_order_bits`,
as ``scx dp`` reports it); of a head-structured feature permutation: H_kv! · (d_h!)^{H_kv}. The size says
nothing about what the rows' *content* reveals (see :mod:`.vocab_match`): these numbers bound only order
guessing.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt

from .._checks import token_ids
from ..config import ModelConfig
from ..dp.permutation import log2_factorial, prompt_order_bits
from ..errors import ConfigError, ProtocolError
from ..protocol.transport import ServerView
from ..stages import Stage
from ._model import int_arg
from ._view import prompt_length
from .llm_reorder import LanguageModel, _scores

__all__ = ["enumerate_orders", "head_perm_bits", "search_space_bits", "stage_search_spaces"]

#: Prefill stages whose rows arrive under a token permutation (with decoys).
_ROW_PERMUTED = (
    Stage.QKV,
    Stage.O,
    Stage.ROUTER,
    Stage.FFN,
    Stage.FFN_DOWN,
    Stage.HEAD,
    Stage.LOCK,
)


def search_space_bits(rows: int) -> float:
    """log₂(rows!) — the bits a guess of the order of ``rows`` rows must get right, all of them real (with
    decoys among them the prompt's order is log₂(r!) bits less: :func:`stage_search_spaces`' ``order_bits``);
    +inf past the float64 range. ConfigError unless rows is an integer ≥ 0."""
    return log2_factorial(int_arg(rows, "rows"))


def head_perm_bits(config: ModelConfig) -> float:
    """log₂(H_kv! · (d_h!)^{H_kv}): the head-structured permutations of one attention stage."""
    return search_space_bits(config.n_kv_heads) + config.n_kv_heads * search_space_bits(config.head_dim)


def stage_search_spaces(view: ServerView, config: ModelConfig) -> list[dict[str, Any]]:
    """One row per permuted message of the view: stage, layer, rows, the prompt's n, ``bits`` — log₂ of the
    key's search space (a row-permuted stage: log₂(rows!); the attention stage: its head-structured feature
    permutation) — and ``order_bits``: what the message hides of the prompt's order, log₂(rows!/(rows − n)!)
    (the decoys' order among themselves is no part of the prompt; 0 for the attention stage, whose rows
    arrive in true order). ProtocolError for a view without the prompt's n (an integer >= 1:
    :func:`~._view.prompt_length`) or a row-permuted message with no rows (no array of one or more
    dimensions)."""
    n = prompt_length(view)
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()
    for m in view.messages:
        if (m.stage, m.layer) in seen or m.step >= 0:
            continue
        seen.add((m.stage, m.layer))
        if m.stage in _ROW_PERMUTED:
            shapes = [np.shape(a) for a in m.arrays.values()]
            if not shapes or not shapes[0]:
                raise ProtocolError(f"the {m.stage.value!r} message of block {m.layer} carries no rows")
            rows = int(shapes[0][0])
            out.append(
                {
                    "stage": m.stage,
                    "layer": m.layer,
                    "rows": rows,
                    "n": n,
                    "bits": search_space_bits(rows),
                    "order_bits": _order_bits(rows, n),
                }
            )
        elif m.stage == Stage.ATTN:
            out.append(
                {
                    "stage": m.stage,
                    "layer": m.layer,
                    "rows": n,
                    "n": n,
                    "bits": head_perm_bits(config),
                    "order_bits": 0.0,
                }
            )
    return out


def _order_bits(rows: int, n: int) -> float:
    """log₂(rows!/(rows − n)!): the bits a guess of the n real rows' order among ``rows`` must get right."""
    real = min(n, rows)
    return prompt_order_bits(real, rows - real) if real else 0.0


def enumerate_orders(bag: npt.ArrayLike, n: int, lm: LanguageModel, max_rows: int = 7) -> list[int]:
    """The maximum-likelihood sequence of n distinct bag elements, by enumerating all (n+r)!/r! choices
    and orders (exact; refuses bags larger than ``max_rows``). ConfigError unless 0 < n ≤ the bag's
    size, ``max_rows`` is an integer ≥ 1 and ``lm`` has ``token_logprobs``; VocabularyError unless the
    bag holds integer ids; ShapeError or NonFiniteError when ``lm`` answers with other than one NaN-free
    score per token of each sequence (a NaN would win the argmax)."""
    items = [int(t) for t in token_ids(np.asarray(bag).ravel(), allow_empty=True)]
    n = int_arg(n, "n")
    max_rows = int_arg(max_rows, "max_rows", 1)
    if not callable(getattr(lm, "token_logprobs", None)):
        raise ConfigError(f"lm must be a language model (token_logprobs), got {type(lm).__name__}")
    if not 0 < n <= len(items):
        raise ConfigError(f"need 0 < n <= bag size ({len(items)}), got n={n}")
    if len(items) > max_rows:
        raise ConfigError(f"enumeration over {len(items)} rows refused (max_rows={max_rows})")
    seqs = np.array(
        sorted({tuple(items[i] for i in p) for p in itertools.permutations(range(len(items)), n)}),
        dtype=np.int64,
    )
    scores = _scores(lm.token_logprobs(seqs), seqs.shape, "token log-probabilities").sum(axis=1)
    return [int(t) for t in seqs[int(np.argmax(scores))]]

"""Permutation-invariant vocabulary matching (Thomas et al., "Hidden No More", ICML 2025; DESIGN §8).

The server holds the plaintext weights, so it can compute, for every vocabulary token, what a row of a
given stage would be, and look the observed row up:

* **block-1 QKV rows** (:func:`match_block1_qkv`): a row is a (normalized) embedding row, maybe plus
  Laplace noise; the nearest vocabulary row in L1 (the maximum-likelihood match under Laplace noise) is
  the token. Token permutation and decoys do not change a row's content, only the bag's order.
* **block-1 attention rows** (:func:`match_block1_attn`): Q, K, V arrive in true row order under a
  head-structured feature permutation P. The *sorted values* of a row are invariant to every such P, and
  in block 1 a row depends only on its token (V) and its token and position (K), so sorted-value
  fingerprints of all V candidates identify the token at each position.
* **sequential matching** (:func:`match_sequential`): the middle blocks' prompt caches after key sharing,
  and the generated tokens' rows entering the middle blocks, depend on the prefix; with the prefix already
  recovered, the server runs every candidate next token through the public weights and keeps the one
  whose row matches (exactly, up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import token_ids
from ..errors import ConfigError, DTypeError, NonFiniteError, ProtocolError, ShapeError
from ..reference import KVCache
from ..weights import ModelWeights
from ._model import candidate_states, float_arg, forward_trace, int_arg, rows_arg

__all__ = [
    "Block1Tables",
    "l1_distances",
    "map_tokens",
    "match_block1_attn",
    "match_block1_map",
    "match_block1_qkv",
    "match_block1_residual",
    "match_sequential",
    "nearest_rows",
    "normalized_table",
]

Array = npt.NDArray[Any]
Ranker = Callable[[Array], Array]


def normalized_table(weights: ModelWeights) -> Array:
    """RMSNorm(E) with block 1's attention-norm gain: every possible normalized block-1 input row."""
    c = weights.config
    return np.asarray(
        ops.rms_norm(np.asarray(weights.embed, dtype=np.float64), weights.layers[0].attn_norm, c.rms_eps)
    )


def _rows_and_table(rows: Array, table: Array, chunk: int) -> tuple[Array, Array, int]:
    """(rows, table, chunk) checked: finite 2-D arrays of equal widths, a non-empty table, chunk ≥ 1."""
    rows, table = rows_arg(rows, "rows"), rows_arg(table, "table")
    if rows.shape[1] != table.shape[1] or not len(table):
        raise ShapeError(
            f"rows {rows.shape} and table {table.shape} must be 2-D with equal widths (table non-empty)"
        )
    return rows, table, int_arg(chunk, "chunk", 1)


def nearest_rows(rows: Array, table: Array, metric: str = "l1", chunk: int = 4096) -> tuple[Array, Array]:
    """For each row, the index of the nearest table row and the distance (``l1`` or ``l2``; the distance of
    the chosen row computed directly, so an exact match is at distance 0). ShapeError
    unless rows and table are 2-D of one width (the table non-empty), NonFiniteError for NaN or ±Inf,
    ConfigError for another metric or a chunk < 1."""
    if metric not in ("l1", "l2"):
        raise ConfigError(f"metric must be 'l1' or 'l2', got {metric!r}")
    rows, table, chunk = _rows_and_table(rows, table, chunk)
    if not len(rows):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    best = np.full(len(rows), np.inf)
    arg = np.zeros(len(rows), dtype=np.int64)
    t_sq = np.einsum("ij,ij->i", table, table)
    for start in range(0, len(table), chunk):
        t = table[start : start + chunk]
        if metric == "l1":
            d = np.stack([np.abs(r[None, :] - t).sum(axis=1) for r in rows])
        else:
            d = np.sqrt(
                np.maximum(
                    t_sq[start : start + chunk][None, :]
                    - 2 * rows @ t.T
                    + np.einsum("ij,ij->i", rows, rows)[:, None],
                    0.0,
                )
            )
        j = np.argmin(d, axis=1)
        dj = d[np.arange(len(rows)), j]
        better = dj < best
        best[better], arg[better] = dj[better], j[better] + start
    if metric == "l2":  # the expanded form's rounding (~1e-8·|row|) is no distance: an exact match is 0
        best = np.sqrt(((rows - table[arg]) ** 2).sum(axis=1))
    return arg, best


def match_block1_qkv(
    rows: Array,
    weights: ModelWeights,
    normalized: bool | None = None,
    metric: str = "l1",
    tables: Block1Tables | None = None,
) -> tuple[Array, Array]:
    """Token id and distance for each block-1 QKV-stage row (permuted bag, decoys included).

    ``normalized``: the message's flag (rows are RMSNorm(E[t]) + noise) — None tries raw and normalized
    tables and keeps the closer match per row. With no noise a real row matches at distance 0.
    DTypeError, ShapeError, NonFiniteError for rows that are not finite numeric rows × hidden size;
    ConfigError for ``tables`` that are not a :class:`Block1Tables` of this model."""
    rows = rows_arg(rows, "rows")
    tables = _checked_tables(tables, weights)
    if normalized is None:
        a, da = match_block1_qkv(rows, weights, False, metric, tables)
        b, db = match_block1_qkv(rows, weights, True, metric, tables)
        return np.where(db < da, b, a), np.minimum(da, db)
    if normalized:
        table = normalized_table(weights) if tables is None else tables.normalized
    else:
        table = np.asarray(weights.embed, dtype=np.float64)
    return nearest_rows(rows, table, metric)


def l1_distances(rows: Array, table: Array, chunk: int = 4096) -> Array:
    """‖row − table[t]‖₁ for every row and every table row (rows × len(table), float64); the checks of
    :func:`nearest_rows`."""
    rows, table, chunk = _rows_and_table(rows, table, chunk)
    out = np.empty((len(rows), len(table)))
    for start in range(0, len(table), chunk):
        t = table[start : start + chunk]
        for j, r in enumerate(rows):
            out[j, start : start + chunk] = np.abs(t - r[None, :]).sum(axis=1)
    return out


def map_tokens(dist: Array, beta: float, log_prior: Array) -> Array:
    """The maximum a-posteriori token of each row from its L1 distances to every vocabulary row, under
    Laplace(β) noise and the token prior: argmax_t log p(t) − d_t / β (β = 0: the nearest row; β = ∞: the
    prior's mode). ConfigError for β < 0 or NaN; ShapeError unless ``dist`` is 2-D with one prior entry
    per column; NonFiniteError for a NaN distance or prior entry (a −∞ prior, probability 0, is allowed)."""
    try:
        d = np.asarray(dist, dtype=np.float64)
        prior = np.asarray(log_prior, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"distances and log_prior must be numeric arrays: {exc}") from None
    if d.ndim != 2:
        raise ShapeError(f"distances must be rows × tokens, got shape {d.shape}")
    if prior.shape != (d.shape[1],):
        raise ShapeError(f"log_prior must have one entry per token ({d.shape[1]}), got {prior.shape}")
    if np.isnan(d).any() or np.isnan(prior).any() or (prior == np.inf).any():
        raise NonFiniteError("distances or log_prior hold NaN (or the prior +Inf)")
    beta = float_arg(beta, "beta", 0.0, allow_inf=True)
    if beta <= 0:
        return np.asarray(np.argmin(d, axis=1))
    if np.isinf(beta):  # the prior alone (d / ∞ would be NaN for an infinite distance)
        return np.full(len(d), int(np.argmax(prior)), dtype=np.int64)
    return np.asarray(np.argmax(prior[None, :] - d / beta, axis=1))


def match_block1_map(
    rows: Array,
    weights: ModelWeights,
    beta: float,
    log_prior: Array,
    normalized: bool = True,
    tables: Block1Tables | None = None,
) -> tuple[Array, Array]:
    """Maximum a-posteriori token of each block-1 QKV-stage row under Laplace(β) noise and a token prior:
    argmax_t log p(t) − ‖x − N(E[t])‖₁ / β (β = 0: the exact nearest row, the prior breaking no tie).

    This is the Bayes-optimal single-row guess for an attacker who knows the noise scale and the prior:
    at small β it is the L1 nearest row, at large β it tends to the prior's mode. Returns (ids, L1
    distance of the chosen row). ConfigError for ``tables`` that are not a :class:`Block1Tables` of this
    model; the checks of :func:`l1_distances` and :func:`map_tokens` otherwise."""
    tables = _checked_tables(tables, weights)
    if normalized:
        table = normalized_table(weights) if tables is None else tables.normalized
    else:
        table = np.asarray(weights.embed, dtype=np.float64)
    d = l1_distances(rows, table)
    ids = map_tokens(d, beta, log_prior)
    return ids, d[np.arange(len(ids)), ids]


class Block1Tables:
    """The attacker's precomputed block-1 tables for one model (computed lazily, once): the normalized
    vocabulary N(E), every token's sorted V fingerprint and every token's un-rotated key N(E[t])W_k."""

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        self._norm: Array | None = None
        self._sorted_v: Array | None = None
        self._sq_v: Array | None = None
        self._k: Array | None = None

    @property
    def normalized(self) -> Array:
        """N(E) (see :func:`normalized_table`)."""
        if self._norm is None:
            self._norm = normalized_table(self.weights)
        return self._norm

    def _proj(self, w: Array, b: Array | None) -> Array:
        z = self.normalized @ np.asarray(w, dtype=np.float64)
        return np.asarray(z if b is None else z + b)

    @property
    def sorted_v(self) -> Array:
        """sort(N(E[t])W_v (+ b_v)) for every token t (V × kv_dim)."""
        if self._sorted_v is None:
            lw = self.weights.layers[0]
            self._sorted_v = np.sort(self._proj(lw.wv, lw.bv), axis=1)
            self._sq_v = np.einsum("ij,ij->i", self._sorted_v, self._sorted_v)
        return self._sorted_v

    @property
    def keys(self) -> Array:
        """N(E[t])W_k (+ b_k) before RoPE, for every token t (V × kv_dim)."""
        if self._k is None:
            lw = self.weights.layers[0]
            self._k = self._proj(lw.wk, lw.bk)
        return self._k

    def v_distances(self, sv: Array) -> Array:
        """Squared L2 distance of each sorted row in ``sv`` to every token's sorted V (rows × V)."""
        tab = self.sorted_v
        assert self._sq_v is not None
        d = self._sq_v[None, :] - 2.0 * (sv @ tab.T) + np.einsum("ij,ij->i", sv, sv)[:, None]
        return np.asarray(np.maximum(d, 0.0))

    def sorted_k(self, tokens: Array, position: int) -> Array:
        """sort(RoPE_position(N(E[t])W_k)) for the given tokens (tokens × kv_dim)."""
        c = self.weights.config
        z = self.keys[np.asarray(token_ids(tokens, c.vocab_size, allow_empty=True), dtype=np.int64)]
        z = ops.apply_rope(
            z.reshape(len(z), c.n_kv_heads, c.head_dim), np.full(len(z), position), c.rope_theta
        ).reshape(len(z), c.kv_dim)
        return np.sort(np.asarray(z), axis=1)


def _same_block1(a: ModelWeights, b: ModelWeights) -> bool:
    """Whether ``a`` and ``b`` have one config and equal weights wherever :class:`Block1Tables` reads them
    (the embedding, block 1's attention norm, W_k, W_v and their biases)."""
    la, lb = a.layers[0], b.layers[0]
    pairs: list[tuple[Array | None, Array | None]] = [(a.embed, b.embed), (la.attn_norm, lb.attn_norm)]
    pairs += [(la.wk, lb.wk), (la.wv, lb.wv), (la.bk, lb.bk), (la.bv, lb.bv)]
    return a.config == b.config and all(
        x is y or (x is not None and y is not None and np.array_equal(x, y)) for x, y in pairs
    )


def _checked_tables(tables: Any, weights: ModelWeights) -> Block1Tables | None:
    """``tables`` (None, or precomputed :class:`Block1Tables` of ``weights``: built from them, or from
    weights equal wherever the tables read them — a model of the same config with other weights would
    match every row against the wrong tables and recover nothing)."""
    if tables is None:
        return None
    if not isinstance(tables, Block1Tables):
        raise ConfigError(f"tables must be Block1Tables or None, got {type(tables).__name__}")
    if tables.weights is not weights and not _same_block1(tables.weights, weights):
        raise ConfigError("tables were built for another model (its config or block-1 weights differ)")
    return tables


def _flat_rows(x: Array, name: str, width: int) -> Array:
    """Rows × ``width`` float64 from rows × heads × d_h (or rows × width), checked as :func:`rows_arg`."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.asarray(x, dtype=object)  # rows_arg names the dtype error
    if arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:])))
    return rows_arg(arr, name, width)


def match_block1_attn(
    k: Array,
    v: Array,
    weights: ModelWeights,
    use_k: bool = True,
    tables: Block1Tables | None = None,
    shortlist: int = 256,
    positions: npt.ArrayLike | None = None,
) -> tuple[Array, Array]:
    """Token id and fingerprint distance at each position from block-1 attention-stage K, V (rows ×
    H_kv × d_h, true order, any head-structured permutation); ``positions`` are the rows' absolute
    positions (default 0, 1, …; a generation step's new row sits at n + t).

    Identity used: sort(P(z)) = sort(z) for every coordinate permutation P, and block-1 v_p = N(E[t_p])W_v,
    k_p = RoPE_p(N(E[t_p])W_k) depend only on (t_p, p). The ``shortlist`` tokens with the closest V
    fingerprints are re-ranked by V + K distance (``use_k``); ``tables`` reuses precomputed tables.
    ShapeError unless K and V have the same rows of kv_dim values each; NonFiniteError for NaN or ±Inf;
    ConfigError for a shortlist < 1 or ``tables`` that are not a :class:`Block1Tables` of this model."""
    checked = _checked_tables(tables, weights)
    tab = Block1Tables(weights) if checked is None else checked
    kv_dim = weights.config.kv_dim
    k, v = _flat_rows(k, "k", kv_dim), _flat_rows(v, "v", kv_dim)
    if len(k) != len(v):
        raise ShapeError(f"K has {len(k)} rows, V {len(v)}")
    shortlist = int_arg(shortlist, "shortlist", 1)
    sv = np.sort(v, axis=1)
    dv = tab.v_distances(sv)  # expanded form: fast, but rounding ~1e-16·|v|² (only to shortlist)
    ids = np.zeros(len(v), dtype=np.int64)
    dist = np.zeros(len(v))
    pos = np.arange(len(v)) if positions is None else np.asarray(positions)
    if pos.shape != (len(v),):
        raise ShapeError(f"positions must have one entry per row ({len(v)}), got shape {pos.shape}")
    if len(pos) and (not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0):
        raise ConfigError(f"positions must be integers >= 0, got {pos!r}")
    for p in range(len(v)):
        if use_k:
            m = min(shortlist, dv.shape[1])
            cand = np.argpartition(dv[p], m - 1)[:m]
            # the shortlist re-ranked by direct differences: an exact match is at distance ~0, whatever |v|
            dp = ((tab.sorted_v[cand] - sv[p]) ** 2).sum(-1)
            dp = dp + ((tab.sorted_k(cand, int(pos[p])) - np.sort(k[p])) ** 2).sum(-1)
            j = int(np.argmin(dp))
            ids[p], dist[p] = int(cand[j]), float(np.sqrt(dp[j]))
        else:
            ids[p] = int(np.argmin(dv[p]))
            dist[p] = float(np.sqrt(((tab.sorted_v[ids[p]] - sv[p]) ** 2).sum()))
    return ids, dist


def _ranked(order: Any, vocab_size: int) -> Array:
    """A ranker's candidate order, checked: a non-empty 1-D integer array of vocabulary ids (a float id
    would be truncated to another token; no candidate would leave token 0 at distance ∞)."""
    try:
        arr = np.asarray(token_ids(order, vocab_size), dtype=np.int64)
    except ProtocolError:  # token_ids' empty-ids error
        raise ConfigError("the ranker returned no candidate") from None
    return arr


def match_sequential(
    targets: Array,
    weights: ModelWeights,
    layer: int,
    kind: str,
    prefix: npt.ArrayLike = (),
    ranker: Ranker | None = None,
    first: int = 256,
    tol: float = 1e-4,
    chunk: int = 2048,
    max_candidates: int | None = None,
) -> tuple[Array, Array]:
    """Token-by-token recovery of a sequence from per-position rows of block ``layer``.

    ``kind`` = ``kv``: targets are [K_rope | V] cache rows (rows × 2·kv_dim, true order: the middle
    caches after key sharing); ``x``: targets are the block-``layer`` input rows (the generated tokens'
    rows entering the middle blocks). ``prefix``: tokens known (recovered) before the first target.
    For each position the candidates are tried in the order given by ``ranker(target)`` (default: the
    vocabulary order), ``first`` of them, then chunk by chunk until one matches to relative distance
    ``tol`` (or ``max_candidates`` are spent; then the closest is kept). Returns (ids, relative distance).

    Checked first: ConfigError for another ``kind``, a block the model lacks, ``first``, ``chunk`` or
    ``max_candidates`` < 1 (no candidate tried would return token 0 at distance ∞), ``tol`` not a number
    ≥ 0, a ``ranker`` that is not callable or returns no candidate; ShapeError unless the targets are
    rows × (2·kv_dim for ``kv``, hidden size for ``x``), finite (NonFiniteError); VocabularyError for a
    prefix or ranked candidate outside the vocabulary (or not a 1-D integer array).
    """
    c = weights.config
    if kind not in ("kv", "x"):
        raise ConfigError(f"kind must be 'kv' or 'x', got {kind!r}")
    layer = int_arg(layer, "layer", 0, c.n_layers)
    targets = rows_arg(targets, "targets", 2 * c.kv_dim if kind == "kv" else c.hidden_size)
    first, chunk = int_arg(first, "first", 1), int_arg(chunk, "chunk", 1)
    if max_candidates is not None:
        max_candidates = int_arg(max_candidates, "max_candidates", 1)
    tol = float_arg(tol, "tol", 0.0)
    if ranker is not None and not callable(ranker):
        raise ConfigError(f"ranker must be callable or None, got {type(ranker).__name__}")
    cache = KVCache()
    pre = np.asarray(token_ids(prefix, c.vocab_size, allow_empty=True), dtype=np.int64)
    if len(pre):  # at block 1 too: the cache's length is the first target's position
        forward_trace(weights, pre, cache=cache, upto=max(layer - 1, 0))
    limit = c.vocab_size if max_candidates is None else min(max_candidates, c.vocab_size)
    ids = np.zeros(len(targets), dtype=np.int64)
    dist = np.zeros(len(targets))
    for p, target in enumerate(targets):
        order = np.arange(c.vocab_size) if ranker is None else _ranked(ranker(target), c.vocab_size)
        best_d, best_t, tried = np.inf, 0, 0
        scale = float(np.linalg.norm(target)) + 1e-12
        while tried < limit:
            size = first if tried == 0 else chunk
            cand = order[tried : min(tried + size, limit)]
            if not len(cand):
                break
            tried += len(cand)
            x, kk, vv = candidate_states(weights, cache, cand, layer)
            feats = np.concatenate([kk, vv], axis=1) if kind == "kv" else x
            d = np.linalg.norm(feats - target[None, :], axis=1) / scale
            j = int(np.argmin(d))
            if d[j] < best_d:
                best_d, best_t = float(d[j]), int(cand[j])
            if best_d < tol:
                break
        ids[p], dist[p] = best_t, best_d
        if layer > 0:
            forward_trace(weights, [best_t], cache=cache, upto=layer - 1)
        else:
            cache.keys, cache.values = [], []  # block 1 has no prefix dependence beyond position
            forward_trace(weights, np.concatenate([pre, ids[: p + 1]]), cache=cache, upto=0)
    return ids, dist


def match_block1_residual(
    x_o: Array, x_ffn: Array, weights: ModelWeights, chunk: int = 4096
) -> tuple[Array, Array]:
    """Block-1 tokens from the *un-noised* O and FFN stages, whatever noise the QKV stage had.

    Identity: a real block-1 FFN-stage row is H = E[t] + O·W_o with O one of the O-stage rows, so for the
    right O row, H − O·W_o is exactly a vocabulary row. For each FFN row this tries every O row and keeps
    the (token, distance) of the closest vocabulary row (relative L2). Decoys find no exact match unless an
    O-stage decoy and an FFN-stage decoy are one calibration token's rows (each stage draws its decoys from
    the pool on its own): that pair is as consistent as a real row and matches its token (5 harness seeds
    of 800 on the tiny test model, stop 72).
    ShapeError unless the O rows are rows × q_dim (at least one) and the FFN rows rows × hidden size;
    NonFiniteError for NaN or ±Inf."""
    c = weights.config
    y = rows_arg(x_o, "O-stage rows", c.q_dim) @ weights.layers[0].wo
    f = rows_arg(x_ffn, "FFN-stage rows", c.hidden_size)
    if not len(y):
        raise ShapeError("no O-stage rows: no FFN row can be linked")
    diffs = (f[:, None, :] - y[None, :, :]).reshape(-1, f.shape[1])
    ids, d = nearest_rows(diffs, np.asarray(weights.embed, dtype=np.float64), "l2", chunk)
    rel = (d / (np.linalg.norm(diffs, axis=1) + 1e-12)).reshape(len(f), len(y))
    best = np.argmin(rel, axis=1)
    return ids.reshape(len(f), len(y))[np.arange(len(f)), best], rel[np.arange(len(f)), best]

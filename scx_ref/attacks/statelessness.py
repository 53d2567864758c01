"""Statelessness (paper §5.4 and Table 5; DESIGN §8): can the server continue the generation alone?

The server holds valid caches of the middle blocks (after key sharing), raw encoded QKV caches of every
block (permuted, with decoys, noised in block 1), and the locked key caches of the last guard blocks. It
tries to decode the true continuation with the guard blocks' caches replaced by zeros (``zeros``), by the
encoded caches it holds (``encoded``), or by the nearest middle block's valid cache (``neighbour``); the
``normal`` row (every cache valid) is the reference, ``no-prompt`` ignores the prompt, and ``recovered``
rebuilds every cache from a prompt recovered by another attack (vocabulary matching): if that prompt is
right, the server is no longer stateless. Metric: token perplexity of the true continuation (teacher
forced), greedy top-1 agreement, and cosine similarity of the final hidden rows to the normal decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import token_ids
from ..errors import ConfigError, ShapeError
from ..protocol.transport import ServerView
from ..stages import Stage
from ..weights import ModelWeights
from ._model import float_arg, forward_trace, int_arg, rows_arg
from ._view import prompt_length, raw_qkv, shared_caches, stage_array
from .inversion import exact_matches, match_permuted_rows

__all__ = ["SERVER_POLICIES", "decode_with_caches", "server_caches", "statelessness_table", "unlock_locked"]

Array = npt.NDArray[Any]
Cache = list[tuple[Array, Array]]
#: The rows of the table that are the server's own attempts (``normal`` is the client's reference and
#: ``no-prompt`` the server that ignores the prompt: the baseline they are judged against).
SERVER_POLICIES: tuple[str, ...] = ("zeros", "encoded", "neighbour", "recovered")


def decode_with_caches(
    weights: ModelWeights, caches: Cache, tokens: npt.ArrayLike, start: int
) -> tuple[Array, Array]:
    """Logits (T × V) and final hidden rows after feeding ``tokens`` at positions start, start+1, …, each
    attending to every row of its block's given cache (any length) and to the tokens before it.
    ConfigError unless ``start`` ≥ 0; ShapeError unless ``caches`` (a list) holds one (K, V) pair of
    rows × H_kv × d_h arrays per block, DTypeError unless they are numeric, NonFiniteError for NaN or
    ±Inf in them; VocabularyError for ids outside the vocabulary."""
    c = weights.config
    ids = np.asarray(token_ids(tokens, c.vocab_size, allow_empty=True), dtype=np.int64)
    start = int_arg(start, "start")
    want = (c.n_kv_heads, c.head_dim)
    if (
        not isinstance(caches, (list, tuple))
        or len(caches) != c.n_layers
        or any(
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or np.ndim(pair[0]) != 3
            or np.shape(pair[0])[1:] != want
            or np.shape(pair[1]) != np.shape(pair[0])
            for pair in caches
        )
    ):
        raise ShapeError(f"caches must be {c.n_layers} (K, V) pairs of shape (rows, {want[0]}, {want[1]})")
    caches = [
        (rows_arg(ck, f"block {i}'s cached keys", ndim=3), rows_arg(cv, f"block {i}'s cached values", ndim=3))
        for i, (ck, cv) in enumerate(caches)
    ]
    t = len(ids)
    pos = np.arange(start, start + t)
    x = ops.embed(ids, weights.embed).astype(np.float64)
    for i, lw in enumerate(weights.layers):
        xh = ops.rms_norm(x, lw.attn_norm, c.rms_eps)
        q, k, v = ops.qkv(xh, lw, c.n_heads, c.n_kv_heads, c.head_dim)
        q, k = ops.apply_rope(q, pos, c.rope_theta), ops.apply_rope(k, pos, c.rope_theta)
        ck, cv = caches[i]
        m = len(ck)
        keys, values = np.concatenate([ck, k]), np.concatenate([cv, v])
        mask = np.concatenate([np.ones((t, m), dtype=bool), ops.causal_mask(t, t)], axis=1)
        o = ops.attention(q, keys, values, mask=mask).reshape(t, c.q_dim)
        x = x + o @ lw.wo
        x = x + ops.mlp(ops.rms_norm(x, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
    h = ops.rms_norm(x, weights.final_norm, c.rms_eps)
    return np.asarray(h @ weights.lm_head), np.asarray(h)


def _rows(x: Array, rows: int | None, width: int, what: str) -> Array:
    """``x`` as float64 rows × ``width`` (``rows`` of them when given); ShapeError when its values are not
    that shape (a message of another model or prompt length)."""
    if x.size % width or (rows is not None and x.size != rows * width):
        raise ShapeError(f"{what} has shape {x.shape}, not {rows or 'rows'} × {width} values")
    return x.reshape(-1 if rows is None else rows, width)


def unlock_locked(view: ServerView, weights: ModelWeights, rtol: float = 1e-4) -> dict[int, dict[str, Any]]:
    """The server's own unlocking of each locked key cache it holds (the last guard blocks: DESIGN §5.1
    step 6 sends K^c = ρ(K_rope ⊕ R), a row permutation of the block's RoPE'd keys and decoy rows), with no
    key, by two routes:

    * ``raw`` — the block's keys and values the server itself computed at its QKV stage (Z_k, Z_v: the
      same rows under π, before RoPE): a locked row equals RoPE(Z_k row, p) for its true position p, so
      each real locked row is placed, its position read, and K and V rebuilt in true order. Works where
      that stage's rows are not noised (levels ``permute`` and ``paper`` past block 1).
    * ``attention`` — the block's attention stage, where the server computes on K·P in true row order
      (P a head-structured coordinate permutation): a row and its locked copy hold the same multiset of
      values, so sorted rows match, giving K in true order; P (read off K and K·P column by column) then
      gives V from the stage's V·P. Works wherever the server runs that block's attention.

    Returns, per locked block, ``raw`` and ``attention``: the prompt rows each route placed (of ``n``);
    ``ambiguous``: the positions the raw route left unplaced because two of the server's rows match there
    (a QKV-stage decoy and a locked decoy drawn from the same calibration token's rows; it places only a
    position exactly one row claims); ``k``, ``v``: the cache (n × H_kv × d_h, true order) of a route that
    placed every row (the raw route first), else None. Rows match within ``rtol`` entry by entry (float32
    runs round apart by ~1e-7).

    Checked first: ConfigError for an ``rtol`` that is not a finite number >= 0 (a NaN would place no row,
    reading as "locked"); ProtocolError for a view without the prompt's n or a message without the arrays
    read; ShapeError for locked rows or attention-stage K, V that are not n rows of the block's kv width."""
    c = weights.config
    rtol = float_arg(rtol, "rtol", 0.0)
    n = prompt_length(view)
    kv = (c.n_kv_heads, c.head_dim)
    out: dict[int, dict[str, Any]] = {}
    for m in view.select(stage=Stage.LOCK):
        i = int(m.layer)
        locked = _rows(stage_array(view, Stage.LOCK, i, "k"), None, c.kv_dim, f"block {i}'s locked keys")
        res: dict[str, Any] = {"raw": 0, "ambiguous": 0, "attention": 0, "k": None, "v": None}
        # raw route: RoPE each of the server's own key rows at every prompt position and look it up
        _, zk, zv = raw_qkv(view, weights, i)
        rows = len(zk)
        zk3 = zk.reshape(rows, *kv)
        pos_of = np.full(rows, -1, dtype=np.int64)
        for p in range(n):
            rot = ops.apply_rope(zk3, np.full(rows, p), c.rope_theta).reshape(rows, c.kv_dim)
            hit = exact_matches(rot, locked, rtol) >= 0
            pos_of[hit & (pos_of < 0)] = p
        # a position two rows claim is ambiguous: a decoy row of the QKV stage and one of the locked cache
        # can be the same calibration token's row (the pool's draws per stage are independent), so both
        # the real row and that decoy match there; the raw route cannot tell which is real and places none
        claims = np.bincount(pos_of[pos_of >= 0], minlength=n)
        placed = np.full(n, -1, dtype=np.int64)
        for j in np.flatnonzero(pos_of >= 0):
            if claims[pos_of[j]] == 1:
                placed[pos_of[j]] = j
        res["raw"] = int(np.sum(placed >= 0))
        res["ambiguous"] = int(np.sum(claims > 1))
        if res["raw"] == n:
            res["k"] = ops.apply_rope(zk3[placed], np.arange(n), c.rope_theta)
            res["v"] = zv[placed].reshape(n, *kv)
        # attention route: match sorted rows of the stage's K·P to sorted locked rows
        attn = view.select(stage=Stage.ATTN, layer=i)
        if attn:
            kp = _rows(stage_array(view, Stage.ATTN, i, "k"), n, c.kv_dim, f"block {i}'s attention K")
            match, idx = match_permuted_rows(kp, locked, rtol)  # K·P[:, idx] = K (P read off the rows)
            res["attention"] = int(np.sum(match >= 0))
            if res["attention"] == n and res["k"] is None and idx is not None:
                vp = _rows(stage_array(view, Stage.ATTN, i, "v"), n, c.kv_dim, f"block {i}'s attention V")
                res["k"], res["v"] = locked[match].reshape(n, *kv), vp[:, idx].reshape(n, *kv)
        out[i] = res
    return out


def server_caches(view: ServerView, weights: ModelWeights, policy: str) -> Cache:
    """Per-block caches the server can assemble from its view under ``policy``
    (``zeros`` | ``encoded`` | ``neighbour``; ConfigError for another): middle blocks always get their
    shared valid caches."""
    if policy not in ("zeros", "encoded", "neighbour"):
        raise ConfigError(f"unknown policy {policy!r}: zeros, encoded or neighbour")
    c = weights.config
    n = prompt_length(view)
    shared = shared_caches(view, weights)
    shape = (n, c.n_kv_heads, c.head_dim)
    out: Cache = []
    for i in range(c.n_layers):
        if i in shared:
            out.append(shared[i])
            continue
        if policy == "zeros":
            out.append((np.zeros(shape), np.zeros(shape)))
        elif policy == "neighbour" and shared:
            near = min(shared, key=lambda j: (abs(j - i), j))
            out.append(shared[near])
        else:  # encoded, or neighbour with no shared block
            _, zk, zv = raw_qkv(view, weights, i)
            rows = len(zk)
            k = ops.apply_rope(zk.reshape(rows, c.n_kv_heads, c.head_dim), np.arange(rows), c.rope_theta)
            locked = view.select(stage=Stage.LOCK, layer=i)
            if locked:
                k = _rows(stage_array(view, Stage.LOCK, i, "k"), None, c.kv_dim, f"block {i}'s locked keys")
                k = k.reshape(-1, c.n_kv_heads, c.head_dim)
            m = min(len(k), rows)
            out.append((k[:m], zv.reshape(rows, c.n_kv_heads, c.head_dim)[:m]))
    return out


def _metrics(logits: Array, hidden: Array, tokens: Array, ref_hidden: Array) -> dict[str, float]:
    """ppl = exp(mean NLL of tokens[1:]) — +inf, not an error, when the mean NLL passes float64's exp range
    (~709 nats) — top-1 agreement with tokens[1:], and mean cosine of the hidden rows to ``ref_hidden``."""
    lp = logits - logits.max(axis=1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
    nll = -lp[np.arange(len(tokens) - 1), tokens[1:]]
    agree = float(np.mean(np.argmax(logits[:-1], axis=1) == tokens[1:]))
    cos = np.sum(hidden * ref_hidden, axis=1) / (
        np.linalg.norm(hidden, axis=1) * np.linalg.norm(ref_hidden, axis=1)
    )
    with np.errstate(over="ignore"):  # an overflow is the honest value: the server is that far off
        ppl = float(np.exp(nll.mean()))
    return {"ppl": ppl, "top1": agree, "emb_sim": float(cos.mean())}


def statelessness_table(
    view: ServerView,
    weights: ModelWeights,
    prompt: npt.ArrayLike,
    continuation: npt.ArrayLike,
    recovered: npt.ArrayLike | None = None,
) -> dict[str, dict[str, float]]:
    """Table 5 for one request: policy → {ppl, top1, emb_sim} of the true ``continuation`` (≥ 2 tokens,
    the first of which the server is given). ``prompt`` builds only the ``normal`` reference row. A ppl
    may be +inf (a mean NLL past float64's exp range): JSON writers must carry it as ``"inf"``, which the
    tables read (:func:`~.tables.check_result`).

    Checked first: ConfigError unless the continuation has ≥ 2 tokens (one token scores nothing: the
    perplexity and agreement would be NaN) and ``prompt`` (and ``recovered``) have the view's n tokens;
    VocabularyError for ids outside the vocabulary."""
    c = weights.config
    cont = np.asarray(token_ids(continuation, c.vocab_size, allow_empty=True), dtype=np.int64)
    n = prompt_length(view)
    if len(cont) < 2:
        raise ConfigError(f"the continuation needs >= 2 tokens, got {len(cont)}")
    for name, ids in (("prompt", prompt), ("recovered", recovered)):
        if ids is not None and len(token_ids(ids, c.vocab_size)) != n:
            raise ConfigError(f"{name} must have the view's {n} tokens, got {len(token_ids(ids))}")

    def plain(ids: npt.ArrayLike) -> Cache:
        tr = forward_trace(weights, ids, logits=False)
        return list(zip(tr.k, tr.v, strict=True))

    empty = (np.zeros((0, c.n_kv_heads, c.head_dim)), np.zeros((0, c.n_kv_heads, c.head_dim)))
    normal_logits, normal_h = decode_with_caches(weights, plain(prompt), cont, n)
    rows = {"normal": _metrics(normal_logits, normal_h, cont, normal_h)}
    for policy in ("zeros", "encoded", "neighbour"):
        lg, h = decode_with_caches(weights, server_caches(view, weights, policy), cont, n)
        rows[policy] = _metrics(lg, h, cont, normal_h)
    lg, h = decode_with_caches(weights, [empty] * c.n_layers, cont, 0)
    rows["no-prompt"] = _metrics(lg, h, cont, normal_h)
    if recovered is not None:
        lg, h = decode_with_caches(weights, plain(recovered), cont, n)
        rows["recovered"] = _metrics(lg, h, cont, normal_h)
    return rows

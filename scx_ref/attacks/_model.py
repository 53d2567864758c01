"""Plaintext forward passes an attacker can run with the public weights (numpy, HF semantics).

:func:`forward_trace` records every stage's rows (what the server would see unencoded);
:func:`candidate_states` runs a batch of *candidate* next tokens at one position against a shared prefix
cache — the inner loop of sequential vocabulary matching (Thomas et al., "Hidden No More").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import ops
from ..reference import KVCache, ReferenceModel
from ..weights import ModelWeights

__all__ = ["Trace", "candidate_states", "forward_trace"]

Array = npt.NDArray[Any]


@dataclass
class Trace:
    """Per-block rows of one plaintext forward: block inputs ``x``, normalized inputs ``xhat``,
    post-RoPE ``q``/``k`` and ``v`` (rows × heads × d_h), attention outputs ``o`` (rows × H·d_h), the
    residual before the MLP ``h``, the final residual and the logits."""

    x: list[Array] = field(default_factory=list)
    xhat: list[Array] = field(default_factory=list)
    q: list[Array] = field(default_factory=list)
    k: list[Array] = field(default_factory=list)
    v: list[Array] = field(default_factory=list)
    o: list[Array] = field(default_factory=list)
    h: list[Array] = field(default_factory=list)
    final: Array | None = None
    logits: Array | None = None


def forward_trace(
    weights: ModelWeights,
    ids: npt.ArrayLike,
    cache: KVCache | None = None,
    upto: int | None = None,
    logits: bool = True,
) -> Trace:
    """The reference forward (identical arithmetic to :class:`~scx_ref.reference.ReferenceModel`) with
    every stage recorded; continues ``cache`` (extended in place) and stops after block ``upto`` if given."""
    tr = Trace()

    def record(stage: str, layer: int, rows: Array) -> None:
        if stage == "final":
            tr.final = rows
        else:
            getattr(tr, stage).append(rows)

    out, _ = ReferenceModel(weights, trace=record).forward(np.asarray(ids, dtype=np.int64), cache, upto)
    if upto is None and logits:
        tr.logits = out
    return tr


def candidate_states(
    weights: ModelWeights, prefix: KVCache, candidates: npt.ArrayLike, layer: int
) -> tuple[Array, Array, Array]:
    """For each candidate token at position ``prefix.length`` (after the prefix whose cache is given),
    the block-``layer`` input row x, and that block's post-RoPE key and value rows (kv_dim each).

    Identity: equals ``forward_trace(weights, prefix_ids + [c])`` at the last row, for every candidate c,
    computed in one batch (each candidate attends to the prefix and to itself only).
    """
    c = weights.config
    cand = np.asarray(candidates, dtype=np.int64)
    b = len(cand)
    p = prefix.length
    pos = np.full(b, p)
    g = c.group_size
    x = ops.embed(cand, weights.embed)
    k = v = np.zeros((b, c.n_kv_heads, c.head_dim), dtype=x.dtype)
    for i in range(layer + 1):
        lw = weights.layers[i]
        xh = ops.rms_norm(x, lw.attn_norm, c.rms_eps)
        q, k, v = ops.qkv(xh, lw, c.n_heads, c.n_kv_heads, c.head_dim)
        q = ops.apply_rope(q, pos, c.rope_theta)
        k = ops.apply_rope(k, pos, c.rope_theta)
        if i == layer:
            break
        scale = 1.0 / np.sqrt(c.head_dim)
        qg = q.reshape(b, c.n_kv_heads, g, c.head_dim)
        if p:
            s_pre = np.einsum("bhgd,khd->bhgk", qg, prefix.keys[i]) * scale
        else:
            s_pre = np.zeros((b, c.n_kv_heads, g, 0), dtype=x.dtype)
        s_self = np.einsum("bhgd,bhd->bhg", qg, k)[..., None] * scale
        probs = ops.softmax(np.concatenate([s_pre, s_self], axis=-1), axis=-1)
        out = np.einsum("bhgk,khd->bhgd", probs[..., :p], prefix.values[i]) if p else 0.0
        out = out + probs[..., p:] * v[:, :, None, :]
        x = x + np.asarray(out).reshape(b, c.q_dim) @ lw.wo
        x = x + ops.mlp(ops.rms_norm(x, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
    return x, k.reshape(b, c.kv_dim), v.reshape(b, c.kv_dim)

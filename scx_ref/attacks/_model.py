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
from .._checks import check_int, check_real, token_ids
from ..errors import DTypeError, NonFiniteError, ProtocolError, ShapeError
from ..reference import KVCache, ReferenceModel
from ..weights import ModelWeights

__all__ = ["Trace", "candidate_states", "forward_trace"]

Array = npt.NDArray[Any]


def int_arg(value: Any, name: str, lo: int | None = 0, below: int | None = None) -> int:
    """``value`` as an int in [lo, below) (no bound where None; ConfigError otherwise): the attack modules'
    counts, sizes and indices (:func:`~scx_ref._checks.check_int`)."""
    return check_int(value, name, lo, None if below is None else below - 1)


def float_arg(value: Any, name: str, lo: float | None = None, allow_inf: bool = False) -> float:
    """``value`` as a float after checking it is a real number (not a bool), not NaN (nor ±Inf unless
    ``allow_inf``), and, given ``lo``, at least ``lo`` (ConfigError otherwise): the attack modules'
    scales and tolerances (:func:`~scx_ref._checks.check_real`)."""
    return check_real(value, name, lo, allow_inf=allow_inf)


def rows_arg(x: Any, name: str, width: int | None = None, *, ndim: int = 2) -> Array:
    """``x`` as a float64 array of ``ndim`` dimensions (rows × ``width`` when ``width`` is given): an
    observed or public row block. DTypeError when it is not numeric, ShapeError for the wrong shape,
    NonFiniteError when it holds NaN or ±Inf (a distance to NaN matches nothing, silently)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"{name} must be a numeric array: {exc}") from None
    if arr.ndim != ndim or (width is not None and arr.shape[-1] != width):
        want = f"{ndim}-D" + ("" if width is None else f" with {width} columns")
        raise ShapeError(f"{name} must be {want}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return arr


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
    every stage recorded; continues ``cache`` (extended in place) and stops after block ``upto`` if given.
    VocabularyError unless ``ids`` is a 1-D integer array of the vocabulary (as the reference's forward)."""
    tr = Trace()

    def record(stage: str, layer: int, rows: Array) -> None:
        if stage == "final":
            tr.final = rows
        else:
            getattr(tr, stage).append(rows)

    # checked, not cast: a float id would be truncated to another token
    arr = np.asarray(token_ids(ids, weights.config.vocab_size), dtype=np.int64)
    out, _ = ReferenceModel(weights, trace=record).forward(arr, cache, upto)
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

    ConfigError unless 0 ≤ ``layer`` < n_layers; ProtocolError unless ``prefix`` is a KVCache that holds
    blocks 0..layer−1 (when it has rows); VocabularyError for candidates outside the vocabulary.
    """
    c = weights.config
    layer = int_arg(layer, "layer", 0, c.n_layers)
    if not isinstance(prefix, KVCache):
        raise ProtocolError(f"prefix must be a KVCache, got {type(prefix).__name__}")
    if prefix.length and len(prefix.keys) < layer:
        raise ProtocolError(f"the prefix cache holds blocks 0..{len(prefix.keys) - 1}, not 0..{layer - 1}")
    cand = np.asarray(token_ids(candidates, c.vocab_size, allow_empty=True), dtype=np.int64)
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

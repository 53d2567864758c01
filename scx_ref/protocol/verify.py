"""The client's verification of the server's replies (DESIGN §5.5): nothing derived from a reply is used or
sent before the reply passed.

**Structure.** :func:`check_reply` — the reply belongs to the request (session, stage, layer, step, seq)
and carries exactly the arrays expected, each floating-point, of the expected shape and finite.

**Linear stages (Freivalds).** The server claims Y = X̂·W + b for rows X̂ the client knows (what it sent,
or its RMSNorm when the server normalizes). For a secret Gaussian vector r (out) the client accepts Y
iff, for every row i, |Y_i·r − (X̂_i·(W r) + b·r)| ≤ τ_i. W r is precomputed, so the check costs
O(rows·(in + out)) against the server's O(rows·in·out). A wrong row Y_i + δ passes only if |δ·r| ≤ τ_i;
δ·r ~ N(0, ‖δ‖²) for an r the server does not know, so a change much larger than τ_i is caught with
probability ≈ 1 − τ_i/‖δ‖ per vector; :data:`VECTORS` independent vectors are checked.

*Where r comes from.* Each client draws, once, a secret Gaussian basis B (out × :data:`BASIS`) per weight
matrix from its key schedule and precomputes W·B in float64 (:class:`SketchCache`; one pass over the
weights, like the offline mask pool). Every session draws its own secret combinations c (BASIS ×
VECTORS) from the session's keys, so its vectors are r = B·c and W·r = (W·B)·c — O(in·BASIS) per matrix
and session instead of another pass over the weights. A detected tampering rotates the basis (the next
session uses a fresh one), so the server never learns more than one failed probe about a basis.

*Tolerance τ (derivation).* Let u be the unit roundoff of the client's compute dtype (2⁻⁵³ float64, 2⁻²⁴
float32, 2⁻¹¹ float16, 2⁻⁸ bfloat16; a reply in a coarser dtype is refused, so the server cannot widen τ),
λ = :data:`LAMBDA`. Under the
standard probabilistic model of rounding (each rounding a relative error |δ| ≤ u, independent, mean zero;
Higham & Mary 2019), a length-d dot product computed in any order has error ≤ λ·u·√d·max_k|S_k| with
probability ≥ 1 − 2·exp(−λ²/2), and every partial sum satisfies |S_k| ≤ ‖x‖₂‖w‖₂ (Cauchy–Schwarz). So

* the server's product (and its bias add): |Ŷ_ij − X̃_i·W_j| ≤ λu(√in + 2)·‖X̂_i‖‖W_j‖ per entry; weighed
  by r_j and summed over independent columns: λu(√in + 2)·‖X̂_i‖·ρ, ρ = (Σ_j ‖W_j‖² r_j²)^½ (the column
  norms are precomputed);
* the server's input X̃_i differs from the client's X̂_i by s roundings: s = 1 for what was sent (the
  server's cast), 4 for a SwiGLU the client redoes from the server's gate/up, √in + 4 when the server
  applies the RMSNorm itself (a common factor (1 + ε) of the row): |(X̃_i − X̂_i)·W r| ≤ λ·s·u‖X̂_i‖‖W r‖.
  The SwiGLU's holds without the probabilistic model too: on CPU the client's silu is its kernel's
  (within 4.06u of the exact one over every float32 in [−87, 87]) and torch's, the server's, within 2.93u
  (``python -m models.silu_error``, which runs both on every such float32);
  with each side's product by up, |m_client − m_server| ≤ 9u|m| per entry (beyond |gate| = 87 both are
  the gate times up, or within |gate·up|·1.7e-38 of 0), so by Cauchy–Schwarz the
  distance's part of the residual is at most 9u‖m‖‖W r‖, under λ·s = 32 (float32; in float64 the kernel's
  silu is within 8u of the exact one: properties/test_verifier_kernels.py). Where the backend fuses the
  norm into the check (``project64_norm``) the client's X̂ is the float64 one, nearer the exact norm than
  either side's dtype: the distance is then the server's roundings alone — except where a row's sum of
  squares comes within a factor 2 of the dtype's range: there X̂ is the backend's own norm (a row of zeros
  where that sum overflows in the dtype, as the server's and Hugging Face's norm give; the float64 X̂, a
  unit row, judged an honest reply a forgery: tests/test_verify_degenerate_rows.py);
* rounding the output: λu‖Y_i ⊙ r‖ ≤ λu‖Y_i‖·max|r|;
* the client's own float64 arithmetic (Y·r, X̂·(W r), W·B): λu₆₄(√out‖Y_i‖‖r‖ + (√in + 6)‖X̂_i‖‖W r‖ +
  √out‖X̂_i‖‖W‖_F‖r‖) (the 6: a fused norm's scale s_i and γ·r, a few roundings each).

*The rows' norms.* τ is evaluated with ‖X̂_i‖ and ‖Y_i‖ from float64 sums of squares, which underflow
for a row whose entries are all below ~1e-154 (‖·‖ = 0, so τ = 0: an honest row of size 1e-217 — an MoE
expert's m scaled by a routing weight e⁻⁵⁰⁰ at level permute, an O-stage row of tiny values — leaves a
residual of u times its size, ~1e-233, and was refused 1e76 times over) and overflow above ~1.3e154
(τ = ∞: a verdict that is not finite, refused). A linear check whose verdict fails is therefore judged
again with the norms taken at a power-of-two scale (:func:`row_norms`: ‖x‖ = 2ᵉ‖2⁻ᵉx‖, both scalings
exact): the same τ, evaluated without the underflow or overflow. A sum that underflows is smaller than
the exact one (τ smaller: the first verdict only stricter) and one that overflows is infinite (a verdict
that is not finite), so neither makes the first verdict accept a reply; rows of ordinary size get the same
norms, a row holding NaN or ±inf a norm that is not finite (still refused), and only a failing verdict
pays for the second pass.

τ_i is their sum: λ·u·[(√in + 2)·‖X̂_i‖·ρ + s·‖X̂_i‖·‖W r‖ + ‖Y_i‖·max|r|] + the float64 terms. With λ = 8
the model's failure probability is ~1e-15 per entry, and the √in and Cauchy–Schwarz factors over-estimate
typical errors many times over: honest runs use a small fraction of τ (:attr:`SessionVerifier.worst`
records the largest |residual|/τ seen; < 0.01 on SmolLM2). τ is ~3e-4 of a row's size in float32 on
SmolLM2 (d = 576), so a relative change of 1e-3 of one row passes one vector with probability ≈ 0.25,
all :data:`VECTORS` of a generation step's reply with ≈ 1e-5, and the :data:`VECTORS_MANY` = 2 of a
prompt's reply (more than :data:`FEW_ROWS` rows) with ≈ 0.06 per row; in float64 τ is ~1e-12 relative.
What passes is bounded in ‖δ‖ against the row's ℓ2 size, not per entry: a change held in one entry may be
that large, for the LM head's V-wide rows ~√V times one logit's relative size (the tiny model, V = 40: one
logit raised by 1e-4 of the largest passed in float32, 40× the honest error, and 1e-12 in float64;
tests/test_verify_forgery_audit.py) — a forgery of that size is within the rounding bound by design.
Blinded stages are checked on what was sent (x + η) before unblinding, so τ grows with β exactly as the
honest rounding error does (DESIGN §6).

**MLP stages** (the server's norm + MLP in one message) come with the intermediates the client asks for
(:func:`scx_ref.protocol.mlp.traced_mlp`): gate/up products and the router logits are Freivalds-checked,
the client redoes the SwiGLU and the routing (O(rows·f)), and the down projection is checked against
them (for an MoE, Σ_slots w·(m·W_down,e r)).

**Attention** (where the client holds Q, K, V: the prefill attention stages and the first guard blocks
during generation). Every output row must lie in the per-coordinate range of the values it may attend to
(a convex combination, O(n·d)), and :data:`ATTENTION_ROWS` secret random rows and the last row (the
last token's, which the server can tell: the stage is in true row order) are recomputed in float64 (a
generation step has one row: it is recomputed; where every row is recomputed, the range check, a far
weaker test of the same entries, is not run). The range check bounds a row only to its values' range:
a forgery confined to one row other than the last, inside that range, passes with probability
1 − :data:`ATTENTION_ROWS`/n (a spot check; recomputing every row would cost the server's O(n²·d)).
τ for a recomputed row: the score errors (λu(√d_h + 2)‖q‖‖k_j‖/√d_h) move the softmax by at most 2.1×
their maximum in total variation, softmax and P·V rounding add λu(√m + 4)·max‖v_j‖, the output rounding
λu‖o‖.

**Last guard blocks during generation.** The server returns the row's projection z = [q k v] (before
RoPE) with the scores. z is Freivalds-checked against the row the client sent, as every linear stage
(O(d) with W_qkv r precomputed, where recomputing z would be a GEMV over W_qkv per token); the client RoPEs
z's q and k itself and checks the scores against the locked cache with a Freivalds sketch of the cache: at
prefill it keeps κ = Σ_j c_j K_j (secret Gaussian c_j, O(kv_dim) memory per block), extended by each
appended key, and accepts the scores s iff Σ_j c_j s_hj ≈ q_h·κ_g/√d_h per head. τ there adds the two
sides' RoPE of the same z (≤ 2λ·5u‖row‖ per head) to the scores' own rounding.

**Not verifiable**: ``gen_mid``, the middle blocks the server runs alone on caches the client does not
hold (only its shape, dtype and finiteness are checked); see the README.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..backends.base import (
    UNIT_ROUNDOFF,
    A,
    Backend,
    NormName,
    Products,
    WeightName,
    float_dtype_name,
    is_backend,
    out_width,
    sum_norm_slack,
)
from ..backends.cpu_kernels import kernels
from ..errors import IntegrityError, NonFiniteError, ProtocolError, SCXError, ShapeError
from ..keys import KeySchedule
from ..ops import softmax
from ..stages import Stage
from .keyring import RequestKeys, basis_label, gaussian
from .messages import Reply, Request
from .mlp import route

__all__ = [
    "ATTENTION_ROWS",
    "BASIS",
    "FEW_ROWS",
    "LAMBDA",
    "VECTORS",
    "VECTORS_MANY",
    "LockSketch",
    "RecomputedRows",
    "SessionVerifier",
    "SketchCache",
    "attention_excess",
    "attention_rows64",
    "attention_tau",
    "check_reply",
    "lock_scores_excess",
    "prefix_extreme",
    "range_excess",
    "range_shapes",
    "row_norms",
    "unit_roundoff",
]

F64 = npt.NDArray[np.float64]
#: τ's arguments for one check (SketchCache.note_terms): (weight, layer, expert), vectors, u, extra_out,
#: input_slack
_TermsUse = tuple[tuple[WeightName, int, int | None], int, float, float, float]

#: Safety factor of every tolerance (a Gaussian tail of λ = 8 is ~1e-15).
LAMBDA = 8.0
#: Columns of a client's Freivalds basis per weight matrix.
BASIS = 16
#: Secret check vectors per matrix and session (independent chances to catch a change) for a reply of at
#: most :data:`FEW_ROWS` rows (a generation step); a reply of more rows checks :data:`VECTORS_MANY` per row.
VECTORS = 8
FEW_ROWS = 4
VECTORS_MANY = 2
#: Secret attention rows the client recomputes per prefill attention stage, besides the last (all of a
#: shorter prompt).
ATTENTION_ROWS = 16
#: Multiply-adds from which the recomputed attention rows split across threads (a generation step's row
#: on SmolLM2, 9 heads × 64 × 512 keys, stays on one: splitting it cost ~0.1 ms a token, two threads).
SPLIT_ROWS64 = 1 << 19
_U64 = 2.0**-53
_TINY = float(np.finfo(np.float64).tiny)
_SWIGLU = 4.0  # roundings by which the client's SwiGLU of the server's gate/up may differ from the server's


_UNIT_OF: dict[Any, float] = {}  # dtype object → its unit roundoff, filled as dtypes are met


def unit_roundoff(dtype: Any) -> float:
    """The unit roundoff of a numpy or torch floating dtype (IntegrityError for any other)."""
    try:
        return _UNIT_OF[dtype]
    except (KeyError, TypeError):  # not met yet, or not hashable
        pass
    u = _unit_roundoff(dtype)
    with contextlib.suppress(TypeError):
        _UNIT_OF[dtype] = u
    return u


def _unit_roundoff(dtype: Any) -> float:
    name = float_dtype_name(dtype)
    if name is None:
        raise IntegrityError(f"unsupported floating dtype {dtype}")
    return UNIT_ROUNDOFF[name]


def prefix_extreme(x: npt.NDArray[Any], largest: bool) -> npt.NDArray[Any]:
    """The running maximum (``largest``) or minimum of ``x`` along axis 0: exactly
    ``np.maximum.accumulate(x, axis=0)`` (``np.minimum``), by doubling — ⌈log₂ n⌉ whole-array steps, row i
    taking the extreme of itself and row i − 2ᵏ — which numpy runs vectorised, 3× faster than its row-by-row
    ``accumulate`` at n = 128–512 (equal values: max and min round nothing; a zero's sign may differ)."""
    op = np.maximum if largest else np.minimum
    y = np.array(x, copy=True)
    if y.ndim == 0:
        raise ShapeError("prefix_extreme needs an array with a row axis")
    buf = np.empty_like(y)
    step, n = 1, y.shape[0]
    while step < n:
        op(y[:-step], y[step:], out=buf[step:])
        buf[:step] = y[:step]
        y, buf = buf, y
        step *= 2
    return y


def range_shapes(v: tuple[int, ...], o: tuple[int, ...], first: int) -> None:
    """ShapeError unless outputs of shape ``o`` (queries × H_kv × g × d_h, query i at position first + i) and
    values of shape ``v`` (keys × H_kv × d_h) fit the range check: the same heads and width (≥ 1), and no
    query past the keys, none before position 0."""
    if len(v) != 3 or len(o) != 4 or o[1] != v[1] or o[3] != v[2] or v[2] == 0:  # width 0: divides by 0
        raise ShapeError(f"outputs {o} for values {v}: (queries × H_kv × g × d_h, keys × H_kv × d_h)")
    if first < 0:  # the kernel would compare no query with any key: every output "in range"
        raise ShapeError(f"queries from position {first}: positions start at 0")
    if o[0] > 0 and first + o[0] > v[0]:
        raise ShapeError(f"{o[0]} queries from position {first} attend past the {v[0]} keys")


def range_excess(v: npt.NDArray[Any], o: npt.NDArray[Any], first: int) -> tuple[float, float]:
    """How far attention outputs leave their values' range, and max |v|: ``o`` (queries × H_kv × g × d_h,
    query i at position first + i, causal) must be convex combinations of the rows of ``v`` (keys × H_kv
    × d_h) up to its position, so each o[i, h, e, t] lies in [min, max] of v[:first + i + 1, h, t]. Returns
    the largest amount by which any entry is above that max or below that min (differences rounded in
    the dtype; ≤ 0 when every entry is in range, −inf with no queries), and max |v| (0 with no keys); an
    input that is not finite makes one of the two not finite. One pass over the rows where the CPU
    kernels are installed (:mod:`scx_ref.backends.cpu_kernels`), else running extremes by
    :func:`prefix_extreme`; both give the same values (max and min round nothing)."""
    range_shapes(v.shape, o.shape, first)
    n_q, n_k = o.shape[0], v.shape[0]
    k = kernels()
    if k is not None and v.dtype == o.dtype and v.dtype in (np.float32, np.float64) and v.ndim == 3:
        h_kv, d_h = v.shape[1], v.shape[2]
        acc = np.empty((5, h_kv * d_h), dtype=v.dtype)
        v2 = np.ascontiguousarray(v).reshape(n_k, h_kv * d_h)
        o2 = np.ascontiguousarray(o).reshape(n_q, o.shape[1] * o.shape[2] * o.shape[3])
        over, vmax = k.range_excess(v2, o2, first, o.shape[2], d_h, acc)
        return float(over), float(vmax)
    vmax = float(np.abs(v).max()) if v.size else 0.0
    if n_q == 0:
        return -math.inf, vmax
    # the running max/min from row `first` on, after one reduction of the rows before it
    hi, lo = v[first : first + n_q], v[first : first + n_q]
    if first > 0:
        hi = np.concatenate([np.maximum(v[:first].max(axis=0), hi[:1]), hi[1:]])
        lo = np.concatenate([np.minimum(v[:first].min(axis=0), lo[:1]), lo[1:]])
    hi, lo = prefix_extreme(hi, largest=True), prefix_extreme(lo, largest=False)
    over = np.max([(o - hi[:, :, None, :]).max(), (lo[:, :, None, :] - o).max()])  # NaN propagates
    return float(over), vmax


class RecomputedRows(NamedTuple):
    """Attention rows recomputed in float64 (:func:`attention_rows64`) beside the server's rows ``o``:
    ``want`` (rows × H × d_h); per row and head ``dist`` = ‖o − want‖₂, ``onorm`` = ‖o‖₂, ``qnorm`` = ‖q‖₂
    (rows × H); per row and KV head the largest ‖k_j‖ and ‖v_j‖ over j ≤ pos (rows × H_kv), which bound
    the rounding of the server's scores and outputs."""

    want: F64
    dist: F64
    onorm: F64
    qnorm: F64
    kmax: F64
    vmax: F64


def attention_rows64(
    q: npt.NDArray[Any],
    k: npt.NDArray[Any],
    v: npt.NDArray[Any],
    o: npt.NDArray[Any],
    pos: npt.NDArray[np.int64],
    group: int,
    scale: float,
    matmul64: Any = np.matmul,
    threads: int = 1,
) -> RecomputedRows:
    """Causal attention of a few query rows recomputed in float64 and compared with the server's: ``q``
    (rows × H × d_h) at positions ``pos`` over keys/values ``k``, ``v`` (keys × H_kv × d_h; head h reads
    KV head h // ``group``): want = softmax(scale·q·k_jᵀ over j ≤ pos) · v, with the norms of
    :class:`RecomputedRows` for the server's rows ``o`` (rows × H × d_h). One float64 pass per row and
    KV head (its query heads four at a time) where the CPU kernels are installed
    (:mod:`scx_ref.backends.cpu_kernels`; the pairs split across ``threads`` when there are at least
    :data:`SPLIT_ROWS64` multiply-adds), else batched products by ``matmul64``; the two agree to float64
    rounding (the kernel's exponential, ``exp64``, is within 2.5 u₆₄ of numpy's: inside the client's
    float64 term of :func:`attention_tau`). ShapeError for arrays that do not fit one another."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or pos.ndim != 1:
        raise ShapeError(
            f"rows {q.shape} at {pos.shape} positions for keys {k.shape}, values {v.shape}: (rows × H × d_h, "
            "rows, keys × H_kv × d_h)"
        )
    n_r, n_h, d_h = q.shape
    h_kv = k.shape[1]
    if o.shape != q.shape:
        raise ShapeError(f"{o.shape} server rows for {q.shape} recomputed ones")
    if (
        k.ndim != 3
        or k.shape[1:] != v.shape[1:]
        or k.shape[2] != d_h
        or n_h != h_kv * group
        or pos.shape != (n_r,)
    ):
        raise ShapeError(
            f"rows {q.shape} at {pos.shape} positions with group {group} for keys {k.shape}, values {v.shape}"
        )
    if n_r == 0:
        empty = np.zeros((0, n_h))
        return RecomputedRows(
            np.zeros((0, n_h, d_h)), empty, empty, empty, np.zeros((0, h_kv)), np.zeros((0, h_kv))
        )
    seen = int(pos.max()) + 1
    if int(pos.min()) < 0 or seen > min(k.shape[0], v.shape[0]):
        raise ShapeError(f"recomputed rows at positions up to {seen - 1} for {k.shape[0]} keys")
    kern = kernels()
    if kern is not None and {q.dtype, k.dtype, v.dtype, o.dtype} <= {
        np.dtype(np.float32),
        np.dtype(np.float64),
    }:
        out = np.empty((n_r, n_h, d_h))
        norms = np.empty((3, n_r, n_h))
        kmax, vmax = np.empty((n_r, h_kv)), np.empty((n_r, h_kv))
        work = n_h * d_h * int((pos + 1).sum())
        with kern.parts(work if work >= SPLIT_ROWS64 else 0, threads) as parts:
            kern.attention_rows64(
                np.ascontiguousarray(q),
                np.ascontiguousarray(k[:seen]),
                np.ascontiguousarray(v[:seen]),
                np.ascontiguousarray(o),
                np.ascontiguousarray(pos, dtype=np.int64),
                group,
                scale,
                out,
                norms,
                kmax,
                vmax,
                parts,
            )
        return RecomputedRows(out, norms[0], norms[1], norms[2], kmax, vmax)
    q64 = np.asarray(q, dtype=np.float64)
    k64 = np.asarray(k[:seen], dtype=np.float64)
    v64 = np.asarray(v[:seen], dtype=np.float64)
    o64 = np.asarray(o, dtype=np.float64)
    kcum = np.maximum.accumulate(np.linalg.norm(k64, axis=-1), axis=0)  # max ‖k_j‖, j ≤ p (× H_kv)
    vcum = np.maximum.accumulate(np.linalg.norm(v64, axis=-1), axis=0)
    # per KV head: (rows·g × d_h) @ (d_h × keys), as batched products on the backend's threads
    qh = q64.reshape(n_r, h_kv, group, d_h).transpose(1, 0, 2, 3).reshape(h_kv, n_r * group, d_h)
    s = matmul64(qh, k64.transpose(1, 2, 0)).reshape(h_kv, n_r, group, seen) * scale
    visible = np.arange(seen)[None, :] <= pos[:, None]  # rows × keys (causal)
    s = np.where(visible[None, :, None, :], s, -np.inf)
    p = softmax(s, axis=-1)
    want = matmul64(p.reshape(h_kv, n_r * group, seen), v64.transpose(1, 0, 2))
    want = np.ascontiguousarray(
        want.reshape(h_kv, n_r, group, d_h).transpose(1, 0, 2, 3).reshape(n_r, n_h, d_h)
    )
    return RecomputedRows(
        want,
        np.linalg.norm(o64 - want, axis=-1),
        np.linalg.norm(o64, axis=-1),
        np.linalg.norm(q64, axis=-1),
        kcum[pos],
        vcum[pos],
    )


def attention_tau(rec: RecomputedRows, pos: npt.NDArray[np.int64], group: int, scale: float, u: float) -> F64:
    """τ of each recomputed attention row and head (rows × H), the module docstring's bound: the score
    errors λu(√d_h + 2)‖q‖‖k_j‖·scale move the softmax by at most 2.1× their maximum in total variation,
    softmax and P·V rounding add λu(√m + 4)·max‖v_j‖ (m = pos + 1 keys), the output rounding λu‖o‖; the
    client's float64 recomputation λu₆₄(√m + √d_h)(max|score| + 1)·max‖v_j‖."""
    d_h = rec.want.shape[-1]
    smax = rec.qnorm * np.repeat(rec.kmax * scale, group, axis=1)  # the largest |score| bound
    vmx = np.repeat(rec.vmax, group, axis=1)
    m = np.sqrt(pos + 1.0)[:, None]
    tau: F64 = LAMBDA * (
        u * ((2.1 * (math.sqrt(d_h) + 2.0) * smax + 2.0 * (m + 4.0)) * vmx + rec.onorm)
        + _U64 * (m + math.sqrt(d_h)) * (smax + 1.0) * vmx
    )
    return tau


def attention_excess(
    rec: RecomputedRows, pos: npt.NDArray[np.int64], group: int, scale: float, u: float
) -> float:
    """The recomputed attention rows' verdict: :func:`excess_ratio` of their distances to the server's rows
    against :func:`attention_tau`. One pass where the CPU kernels are installed
    (:mod:`scx_ref.backends.cpu_kernels`: the same float64 operations in the same order, so the same
    value), else the numpy expressions. ShapeError unless the rows' arrays fit one another and ``pos``
    (the kernel indexes without bounds checks)."""
    n_r = rec.dist.shape[0] if rec.dist.ndim == 2 else -1
    n_h = rec.dist.shape[1] if rec.dist.ndim == 2 else -1
    h_kv = n_h // group if group > 0 and n_h % group == 0 else -1
    if (
        n_r < 0
        or h_kv < 0
        or rec.onorm.shape != rec.dist.shape
        or rec.qnorm.shape != rec.dist.shape
        or rec.kmax.shape != (n_r, h_kv)
        or rec.vmax.shape != (n_r, h_kv)
        or np.shape(pos) != (n_r,)
        or rec.want.ndim != 3
    ):
        raise ShapeError(
            f"recomputed rows {rec.dist.shape} (rows × H), norms {rec.onorm.shape}, {rec.qnorm.shape}, "
            f"{rec.kmax.shape}, {rec.vmax.shape} (rows × H_kv, group {group}) at {np.shape(pos)} positions "
            "do not fit one another"
        )
    k = kernels()
    arrays = (rec.dist, rec.onorm, rec.qnorm, rec.kmax, rec.vmax)
    if k is not None and rec.dist.size and all(x.dtype == np.float64 for x in arrays):
        d_h = rec.want.shape[-1]
        pos64 = np.ascontiguousarray(pos, dtype=np.int64)
        return float(k.attention_excess(*arrays, pos64, group, scale, d_h, u, LAMBDA, _U64, _TINY))
    return excess_ratio(rec.dist, attention_tau(rec, pos, group, scale, u))


def excess_ratio(residual: F64 | float, tau: F64 | float) -> float:
    """A check's verdict: max |residual| / max(τ, tiny) over its entries (0.0 with none), or NaN when any
    ratio or any τ is not finite (a NaN or ±inf residual, an infinite τ that would accept anything).
    ``residual`` and ``tau`` are arrays of one shape, or two floats (one entry)."""
    if isinstance(residual, float) and isinstance(tau, float):
        ratio = abs(residual) / max(tau, _TINY) if math.isfinite(tau) else math.nan  # max(NaN, tiny) is NaN
        return ratio if math.isfinite(ratio) else math.nan
    residual, tau = np.asarray(residual), np.asarray(tau)
    if residual.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # inf / inf is NaN: refused
        ratio = float(np.max(np.abs(residual) / np.maximum(tau, _TINY)))
    if not (math.isfinite(ratio) and math.isfinite(float(tau.max())) and math.isfinite(float(tau.min()))):
        return math.nan
    return ratio


def row_norms(x: npt.NDArray[Any]) -> F64:
    """An upper bound of ‖x_i‖₂ for every row of ``x`` (rows × width), as ``project64`` gives its norms (the
    float64 sum of squares' root times :func:`~scx_ref.backends.base.sum_norm_slack`) but without that
    sum's underflow or overflow: ‖x_i‖ = 2ᵉ·‖2⁻ᵉ·x_i‖ with 2ᵉ the power of two just above the row's
    largest |entry| (``np.frexp``; both scalings exact — an entry below 2⁻¹⁰²² of the largest may round,
    by at most 2⁻¹⁰⁷⁴ of the largest, far inside the slack). A zero row's norm is 0; a row holding NaN or
    ±inf has a norm that is not finite."""
    x64 = np.asarray(x, dtype=np.float64)
    if x64.ndim != 2:
        raise ShapeError(f"row norms of an array of shape {x64.shape}: rows × width")
    with np.errstate(invalid="ignore", over="ignore"):
        big = np.abs(x64).max(axis=1, initial=0.0)  # NaN stays NaN: frexp gives it exponent 0
        _, e = np.frexp(big)
        norms = np.linalg.norm(np.ldexp(x64, -e[:, None]), axis=1) * sum_norm_slack(x64.shape[1], 2.0**-52)
        out: F64 = np.ldexp(norms, e)
    return out


def linear_excess(yr: F64, xr: F64, bias_r: F64, xnorm: F64, ynorm: F64, a: F64, b: F64) -> float:
    """A Freivalds check's verdict (rows × k): :func:`excess_ratio` of the residual (yr − xr) − bias_r
    against τ = ‖x̂_i‖·a + ‖y_i‖·b. One pass where the CPU kernels are installed
    (:mod:`scx_ref.backends.cpu_kernels`), else numpy expressions; both round the same operations in the
    same order (float64, no fused multiply-add), so they return the same value. ShapeError unless the
    shapes fit one another: rows × k products, k-wide terms, one norm per row (the kernel indexes without
    bounds checks)."""
    if yr.ndim != 2 or (
        xr.shape != yr.shape
        or bias_r.shape != yr.shape[1:]
        or a.shape != yr.shape[1:]
        or b.shape != yr.shape[1:]
        or xnorm.shape != yr.shape[:1]
        or ynorm.shape != yr.shape[:1]
    ):
        raise ShapeError(
            f"a Freivalds check's products {yr.shape}, {xr.shape}, norms {xnorm.shape}, {ynorm.shape} and "
            f"terms {bias_r.shape}, {a.shape}, {b.shape} do not fit one another (rows × k, rows, k)"
        )
    k = kernels()
    arrays = (yr, xr, bias_r, xnorm, ynorm, a, b)
    if k is not None and yr.size and all(x.dtype == np.float64 for x in arrays):
        return float(k.linear_excess(yr, xr, bias_r, xnorm, ynorm, a, b, _TINY))
    tau: F64 = np.multiply.outer(xnorm, a)
    tau += np.multiply.outer(ynorm, b)
    return excess_ratio(yr - xr - bias_r[None, :], tau)


def check_reply(
    b: Backend[A],
    req: Request,
    reply: Any,
    expect: Mapping[str, tuple[int, ...]],
    value_checked: Collection[str] = (),
) -> tuple[dict[str, A], float]:
    """The reply's arrays as the client's backend arrays, after checking that ``reply`` answers ``req``
    (session, stage, layer, step, seq) and carries exactly the arrays ``expect`` names, each floating,
    of its shape and finite, in the client's dtype or a finer one; and the unit roundoff the value checks
    must assume (the client's dtype's: the server cannot choose it). IntegrityError otherwise.

    Arrays named in ``value_checked`` are not scanned for finiteness here: the caller's value check of
    them follows before anything uses them and reads every entry — a Freivalds check
    (:meth:`SessionVerifier.linear`, :meth:`SessionVerifier.mlp`) sums each entry's square into the row
    norms of its tolerance τ, the attention range check (:meth:`SessionVerifier.attention`) compares
    each entry with its values' range — and an entry that is NaN or ±inf makes that check's result not
    finite, which it refuses (IntegrityError); the scan would read the reply a second time for nothing."""
    if not isinstance(reply, Reply):
        raise IntegrityError(f"{req.stage.value}: the reply is a {type(reply).__name__}, not a Reply")
    got = (reply.session, reply.stage, reply.layer, reply.step, reply.seq)
    if not _answers(reply, req):
        raise IntegrityError(f"{req.stage.value}: the reply does not answer the request (got {got!r:.120})")
    if not isinstance(reply.arrays, Mapping) or set(reply.arrays) != set(expect):
        names = sorted(map(str, reply.arrays)) if isinstance(reply.arrays, Mapping) else reply.arrays
        raise IntegrityError(
            f"{req.stage.value}: the reply carries arrays {names!r:.120}, expected {sorted(expect)}"
        )
    mine = getattr(b, "dtype", None) or b.numpy_dtype()
    u = unit_roundoff(mine)
    out: dict[str, A] = {}
    for name, shape in expect.items():
        raw = reply.arrays[name]
        try:
            dt = getattr(raw, "dtype", None)
            if unit_roundoff(dt if dt is not None else type(raw).__name__) > u:
                # the tolerance is the client's: a coarser reply would let the server widen it (a float16
                # reply to a float32 session: 2¹³ times; a 1 % change of every entry then passed)
                raise IntegrityError(f"reply {name} is {dt}, coarser than the session's {mine}")
            out[name] = b.check(
                raw, f"reply {req.stage.value}.{name}", shape, finite=name not in value_checked
            )
        except SCXError as exc:
            raise IntegrityError(f"{req.stage.value}: {exc}") from exc
    return out, u


def _where(stage: Stage, layer: int) -> str:
    """What a refusal names: the stage and its block, or the stage alone for the LM head (layer −1, after
    the last block)."""
    return stage.value if layer < 0 else f"{stage.value} of block {layer}"


def _answers(reply: Reply, req: Request) -> bool:
    """Whether the reply's header is the request's: the same session and stage (strs: a Stage is one) and
    layer, step and sequence number (integers, not bools), each compared only once its type is known — a
    field of another type (an array, whose ``==`` is elementwise) is a mismatch, not an exception."""
    if not (isinstance(reply.session, str) and isinstance(reply.stage, str)):
        return False
    numbers = (reply.layer, reply.step, reply.seq)
    if any(isinstance(n, bool) or not isinstance(n, int | np.integer) for n in numbers):
        return False
    return (reply.session, reply.stage, *map(int, numbers)) == (
        req.session,
        req.stage,
        req.layer,
        req.step,
        req.seq,
    )


# -- the client's precomputation -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Sketch:
    """One weight matrix: the basis B (out × m), W·B (in × m), the squared column norms and the bias."""

    basis: F64
    wb: F64
    col_sq: F64
    bias: F64 | None


class SketchCache:
    """A client's secret Freivalds bases and W·B for every weight matrix of a model (thread-safe; shareable
    by every client of one backend and master secret). ``rotate`` switches to a fresh basis.

    ``basis``: the basis width, an integer >= 1 (Python or numpy, not a bool) — a check with no basis
    vector would accept any reply. ProtocolError for it, for ``keys`` that are not a KeySchedule or a
    ``backend`` that is not one (:func:`~scx_ref.backends.base.is_backend`)."""

    def __init__(self, backend: Backend[Any], keys: KeySchedule, basis: int = BASIS) -> None:
        if not is_backend(backend):
            raise ProtocolError(f"backend must be a Backend, got {type(backend).__name__}")
        if not isinstance(keys, KeySchedule):
            raise ProtocolError(f"keys must be a KeySchedule, got {type(keys).__name__}")
        basis = check_int(basis, "basis", 1, error=ProtocolError)
        self.b = backend
        self.keys = keys
        self.m = basis
        self.epoch = 0
        self._sketches: dict[tuple[str, int, int | None], _Sketch] = {}
        self._terms: set[_TermsUse] = set()
        self._lock = threading.Lock()
        self.index = {key: i for i, key in enumerate(self.matrices())}  # a matrix's row of a session's mix

    def matrices(self) -> list[tuple[WeightName, int, int | None]]:
        """Every (weight, layer, expert) the protocol's linear stages use."""
        c = self.b.config
        out: list[tuple[WeightName, int, int | None]] = [("lm_head", -1, None)]
        for i in range(c.n_layers):
            out += [("wqkv", i, None), ("wo", i, None)]
            if c.is_moe:
                out.append(("router", i, None))
                for e in range(c.n_experts):
                    out += [("w_gate_up", i, e), ("w_down", i, e)]
            else:
                out += [("w_gate_up", i, None), ("w_down", i, None)]
        return out

    def build(self) -> None:
        """Precompute every matrix's sketch now (offline, before any request)."""
        for which, layer, expert in self.matrices():
            self.get(which, layer, expert)

    def note_terms(self, use: _TermsUse) -> None:
        """Note that a session's check computed τ's terms with these arguments (:meth:`_Check.tau_terms`):
        the next sessions' :meth:`SessionVerifier.prepare` derives them ahead. Arguments only — the
        matrix, the vector count, the unit roundoff and the slacks — never a value."""
        with self._lock:
            self._terms.add(use)

    def noted_terms(self) -> list[_TermsUse]:
        """Every argument set :meth:`note_terms` was given (a snapshot)."""
        with self._lock:
            return sorted(self._terms, key=repr)

    def rotate(self) -> None:
        """Discard every sketch; the next ones come from a fresh basis (after a detected tampering)."""
        with self._lock:
            self.epoch += 1
            self._sketches.clear()

    def get(self, which: WeightName, layer: int, expert: int | None) -> _Sketch:
        """The sketch of one matrix (computed on first use)."""
        key = (which, layer, expert)
        with self._lock:
            sk = self._sketches.get(key)
            epoch = self.epoch
        if sk is not None:
            return sk
        out_dim = out_width(self.b.config, which)
        # the basis is shared by an MoE layer's experts (the down check sums over experts with one r)
        basis = gaussian(self.keys.stream(basis_label(epoch, which, layer, None)), (out_dim, self.m))
        wb, col_sq = self.b.weight_sketch(which, layer, expert, basis)
        bias = None
        if which == "wqkv" and self.b.config.qkv_bias:
            zero = self.b.from_numpy(np.zeros((1, self.b.config.hidden_size)))
            bias = np.asarray(self.b.to_numpy(self.b.project(zero, "wqkv", layer)), dtype=np.float64)[0]
        sk = _Sketch(basis, np.asarray(wb, np.float64), np.asarray(col_sq, np.float64), bias)
        with self._lock:
            if self.epoch == epoch:
                self._sketches.setdefault(key, sk)
        return sk


@dataclass(frozen=True)
class _Check:
    """One matrix's check vectors in one session: r (out × k), W r (in × k) and the norms τ needs."""

    r: F64
    wr: F64
    rho: F64  # (Σ_j ‖W_j‖² r_j²)^½ per vector
    wr_norm: F64
    r_inf: F64
    r_norm: F64
    w_fro: float
    bias_r: F64

    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False, repr=False)
    # the (weight, layer, expert) it checks and the cache that notes its τ arguments (SketchCache.note_terms)
    origin: tuple[WeightName, int, int | None] | None = field(default=None, compare=False, repr=False)
    notes: SketchCache | None = field(default=None, compare=False, repr=False)

    def first(self, k: int) -> _Check:
        """The same check with its first ``k`` vectors only (made once per k)."""
        if k >= self.r.shape[1]:
            return self
        got: _Check | None = self.memo.get(("first", k))
        if got is None:
            got = _Check(
                self.r[:, :k],
                self.wr[:, :k],
                self.rho[:k],
                self.wr_norm[:k],
                self.r_inf[:k],
                self.r_norm[:k],
                self.w_fro,
                self.bias_r[:k],
                origin=self.origin,
                notes=self.notes,
            )
            self.memo[("first", k)] = got
        return got

    def tau_terms(self, u: float, extra_out: float, input_slack: float) -> tuple[F64, F64]:
        """τ's terms per vector, grouped by the row norm they scale: τ_i = ‖x̂_i‖·a + ‖y_i‖·b (the module
        docstring's derivation; in = rows of W r, out = rows of r); ``extra_out``: more output roundings
        per entry (an MoE's weighted sum over slots); ``input_slack``: see :meth:`SessionVerifier.linear`.
        Computed once per check and arguments; the arguments are noted in the sketch cache, so that the
        next sessions derive the terms ahead (:meth:`SessionVerifier.prepare`)."""
        key = ("tau", u, extra_out, input_slack)
        got: tuple[F64, F64] | None = self.memo.get(key)
        if got is None:
            # per vector in Python floats: k is 1–8, and a dozen array calls on k-element arrays cost more
            # than the arithmetic
            n_in, n_out = self.wr.shape[0], self.r.shape[0]
            s_in, s_out, wf = math.sqrt(n_in), math.sqrt(n_out), self.w_fro
            a_c, b_c = [], []
            norms = (self.rho.tolist(), self.wr_norm.tolist(), self.r_inf.tolist(), self.r_norm.tolist())
            for rho, wrn, rinf, rn in zip(*norms, strict=True):
                # the server's product and input, then the client's float64 arithmetic
                server = u * ((s_in + 2.0) * rho + input_slack * wrn)
                a_c.append(LAMBDA * (server + _U64 * ((s_in + 6.0) * wrn + s_out * wf * rn)))
                b_c.append(LAMBDA * (u * (1.0 + extra_out) * rinf + _U64 * s_out * rn))
            a, b = np.array(a_c), np.array(b_c)
            got = (a, b)
            self.memo[key] = got
            if self.notes is not None and self.origin is not None:
                self.notes.note_terms((self.origin, int(self.r.shape[1]), u, extra_out, input_slack))
        return got


@dataclass
class LockSketch:
    """A last guard block's locked cache as the client knows it: the coefficients c (columns × k), κ =
    Σ_j c_j K_j (k × H_kv × d_h) and Σ_j c_j²‖K_j‖² (k × H_kv), with max_j |c_j| and Σ_j c_j² (k each)."""

    coef: F64
    kappa: F64
    sq: F64
    slack: F64  # Σ over appended columns of |c_j|·(bound on ‖server's key − client's key‖), k × H_kv
    cmax: F64
    csq: F64

    @staticmethod
    def start(coef: F64, keys: F64) -> LockSketch:
        """The sketch of the locked keys ``keys`` (columns × H_kv × d_h) with coefficients ``coef``."""
        return LockSketch(
            coef=coef,
            kappa=np.einsum("jv,jhd->vhd", coef, keys),
            sq=np.einsum("jv,jh->vh", coef**2, np.einsum("jhd,jhd->jh", keys, keys)),
            slack=np.zeros((coef.shape[1], keys.shape[1])),
            cmax=np.abs(coef).max(axis=0) if coef.shape[0] else np.zeros(coef.shape[1]),
            csq=np.einsum("jv,jv->v", coef, coef),
        )

    def extend(self, new: F64, key: F64, key_slack: F64) -> LockSketch:
        """The sketch with one more column: the appended key ``key`` (H_kv × d_h) with coefficients ``new``
        (k), the server's copy of it within ``key_slack`` (H_kv) of the client's."""
        return LockSketch(
            coef=np.concatenate([self.coef, new[None, :]]),
            kappa=self.kappa + new[:, None, None] * key[None],
            sq=self.sq + (new**2)[:, None] * np.einsum("hd,hd->h", key, key)[None, :],
            slack=self.slack + np.abs(new)[:, None] * key_slack[None, :],
            cmax=np.maximum(self.cmax, np.abs(new)),
            csq=self.csq + new * new,
        )


def lock_scores_excess(
    lk: LockSketch, qk: F64, new: F64, s: F64, group: int, scale: float, u: float
) -> tuple[float, LockSketch]:
    """A generation step's scores ``s`` (H × m) against a last guard block's locked-cache sketch ``lk``
    extended by the step's key with coefficients ``new`` (k): the extended sketch and the verdict
    (:func:`excess_ratio` of Σ_j s_hj c_j − q_h·κ_g·scale against τ). ``qk``: the client's RoPE'd
    [q; k] heads ((H + H_kv) × d_h), from the checked projection. The server RoPE'd the same z: per head
    each side's rotation (two products and an add per entry) is within 3√2·u‖row‖ of the exact one, so
    the two differ by at most 2λ·5u‖row‖. One float64 pass where the CPU kernels are installed
    (:mod:`scx_ref.backends.cpu_kernels`; the same expressions in loops, so within float64 rounding of
    them), else the numpy expressions below. Both paths read float64 values of any float input; ShapeError
    unless the shapes fit one another (s 2-D with H = H_kv·``group`` rows and one column per sketched key
    plus this step's, qk (H + H_kv) × d_h, ``new`` of the sketch's k)."""
    qk, new, s = (np.asarray(a, dtype=np.float64) for a in (qk, new, s))
    k, h_kv, d_h = lk.kappa.shape
    if not (
        s.ndim == qk.ndim == 2
        and s.shape[0] == h_kv * group
        and qk.shape == (s.shape[0] + h_kv, d_h)
        and new.shape == (k,)
        and lk.coef.shape == (s.shape[1] - 1, k)
    ):
        raise ShapeError(f"scores {s.shape} and a step's [q; k] {qk.shape} do not fit the locked sketch")
    n_h = s.shape[0]
    rope = 2.0 * LAMBDA * u * 5.0
    kern = kernels()
    if kern is not None:
        arrays = (qk, new, lk.coef, lk.kappa, lk.sq, lk.slack, lk.cmax, lk.csq, s)
        ratio, *parts = kern.lock_check(
            *(np.ascontiguousarray(a, dtype=np.float64) for a in arrays),
            group,
            scale,
            u,
            rope,
            LAMBDA,
            _U64,
            _TINY,
        )
        if ratio == -1.0:
            raise ShapeError(f"scores {s.shape} and a step's [q; k] {qk.shape} do not fit the locked sketch")
        return float(ratio), LockSketch(*parts)
    # a NaN or an infinity among the scores is refused (NaN) by excess_ratio: no warnings on the way
    with np.errstate(invalid="ignore", over="ignore"):
        q_own, k_own = qk[:n_h], qk[n_h:]  # H × d_h, H_kv × d_h
        qn = np.linalg.norm(q_own, axis=-1)  # H
        # the scores: Σ_j c_j s_hj = q_h·κ_g/√d_h, κ extended by this step's key with a fresh c (the server
        # keeps its own copy of the key: within rope·‖k‖ of the client's)
        lk = lk.extend(new, k_own, rope * np.linalg.norm(k_own, axis=-1))
        snorm = np.linalg.norm(s, axis=-1)[:, None]  # H × 1
        got = s @ lk.coef  # H × k
        # head h reads KV head h // g: q as H_kv × g × d_h against κ (k × H_kv × d_h)
        want = np.einsum("hed,vhd->hev", q_own.reshape(h_kv, group, d_h), lk.kappa).reshape(n_h, -1) * scale
        # the per-KV-head terms (k × H_kv) as H × k: head h reads KV head h // g
        sq, kap, slack = (
            np.repeat(t.T, group, axis=0) for t in (lk.sq, np.linalg.norm(lk.kappa, axis=-1), lk.slack)
        )
        qs = qn[:, None] * scale
        m = lk.coef.shape[0]
        tau = (
            LAMBDA * u * (math.sqrt(d_h) + 3.0) * qs * np.sqrt(sq)  # the server's scores
            + LAMBDA * u * snorm * lk.cmax[None, :]  # their output rounding
            + rope * qs * kap  # the server's q is not exactly the client's
            + qs * slack  # nor its appended keys
            + LAMBDA * _U64 * math.sqrt(m) * snorm * np.sqrt(lk.csq)[None, :]  # the client's float64 sums
        )
    return excess_ratio(got - want, tau), lk


@dataclass
class SessionVerifier(Generic[A]):
    """The checks of one session's replies (raises IntegrityError). ``worst`` is the largest
    |residual|/τ over every check so far; ``checks`` how many row checks ran."""

    b: Backend[A]
    keys: RequestKeys
    cache: SketchCache
    vectors: int = VECTORS
    worst: float = 0.0
    checks: int = 0
    flops: int = 0
    _checks: dict[tuple[str, int, int | None], _Check] = field(default_factory=dict)
    _locks: dict[int, LockSketch] = field(default_factory=dict)
    _mix: F64 | None = None
    _rows: dict[tuple[int, int], npt.NDArray[np.int64]] = field(default_factory=dict)
    _lock_steps: dict[tuple[int, int], F64] = field(default_factory=dict)
    epoch: int = field(init=False)  # the sketch cache's basis epoch these checks were drawn under

    def __post_init__(self) -> None:
        self.epoch = self.cache.epoch

    def prepare(self, n: int | None = None) -> SessionVerifier[A]:
        """Derive this session's check vectors (r, W r and the norms τ needs) for every matrix now — and,
        for a prompt of ``n`` tokens, the attention rows each block recomputes — so that verifying a reply
        costs only its own products: all of it depends on the session's keys, the client's sketches and
        the length only, never on the prompt. τ's terms are derived too, for every argument set an earlier
        session of the cache computed them with (:meth:`SketchCache.noted_terms`: the same stages recur
        from request to request; at n = 128 on SmolLM2 they were 121 of a verified prefill's computations,
        ~2–3 ms on its critical path). Returns self."""
        for which, layer, expert in self.cache.matrices():
            self._check(which, layer, expert)
        for (which, layer, expert), k, u, extra_out, input_slack in self.cache.noted_terms():
            self._check(which, layer, expert).first(k).tau_terms(u, extra_out, input_slack)
        if n is not None:
            for block in range(self.b.config.n_layers):
                self.attention_rows(block, n)
        return self

    def attention_rows(self, block: int, n: int) -> npt.NDArray[np.int64]:
        """The rows (of ``n``, sorted) block ``block``'s prefill attention check recomputes: the
        :data:`ATTENTION_ROWS` secret rows (:meth:`~scx_ref.protocol.keyring.RequestKeys.verify_rows`) and
        the last row, n − 1, always. The attention stage is sent in true row order, so the server knows
        which row is the last token's — the one row whose output alone decides the next token's logits;
        left to the draw, a forged last row inside its values' range (the range check's blind spot)
        passed with probability 1 − 16/n and changed the greedy token (tests/test_verify_forgery_audit.py)."""
        rows = self._rows.get((block, n))
        if rows is None:
            rows = self.keys.verify_rows(block, n, ATTENTION_ROWS)
            if n > 0 and (rows.size == 0 or int(rows[-1]) != n - 1):  # sorted: the last is the largest
                rows = np.append(rows, np.int64(n - 1))
            self._rows[(block, n)] = rows
        return rows

    def lock_step(self, block: int, step: int) -> F64:
        """The secret coefficients (1 × :attr:`vectors`) with which generation step ``step`` extends block
        ``block``'s locked-score sketch by the key it appends (kept once derived: they depend on the
        session's keys only, so they may be derived ahead)."""
        got = self._lock_steps.get((block, step))
        if got is None:
            got = self._lock_steps[(block, step)] = self.keys.verify_lock(block, 1, self.vectors, step)
        return got

    def current(self, cache: SketchCache) -> bool:
        """Whether these checks were drawn from ``cache``'s current basis (not one rotated away since)."""
        return self.cache is cache and self.epoch == cache.epoch

    def vectors_for(self, rows: int) -> int:
        """Check vectors for a reply of ``rows`` rows."""
        return self.vectors if rows <= FEW_ROWS else min(self.vectors, VECTORS_MANY)

    # -- helpers -------------------------------------------------------------------------------------
    def _check(self, which: WeightName, layer: int, expert: int | None) -> _Check:
        key = (which, layer, expert)
        ch = self._checks.get(key)
        if ch is None:
            sk = self.cache.get(which, layer, expert)
            if self._mix is None:  # one draw for every matrix of the session
                self._mix = self.keys.verify_mix((len(self.cache.index), self.cache.m, self.vectors))
            shared = which == "w_down" and expert is not None  # one r for all of a layer's down maps
            mix = self._mix[self.cache.index[(which, layer, 0 if shared else expert)]]
            # the products run on the backend's threads (matmul64): numpy's BLAS pool kept a thread spinning
            # beside torch's into the request that follows (n = 128, 2 threads: the main thread's CPU time
            # per verified prefill fell 18 % without it)
            mm = self.b.matmul64
            r = mm(sk.basis, mix)
            wr = mm(sk.wb, mix)
            ch = _Check(
                # column-major: a check's first k vectors, transposed (k × width), are contiguous memory,
                # the layout the fused products read without a copy
                r=np.asfortranarray(r),
                wr=np.asfortranarray(wr),
                rho=np.sqrt(mm(sk.col_sq[None, :], r * r)[0]),
                wr_norm=np.linalg.norm(wr, axis=0),
                r_inf=np.abs(r).max(axis=0),
                r_norm=np.linalg.norm(r, axis=0),
                w_fro=float(np.sqrt(sk.col_sq.sum())),
                bias_r=np.zeros(self.vectors) if sk.bias is None else mm(sk.bias[None, :], r)[0],
                origin=key,
                notes=self.cache,
            )
            self._checks[key] = ch
        return ch

    def _host(self, x: A) -> F64:
        """``x`` as a float64 host array (no copy for a float64 numpy array)."""
        if isinstance(x, np.ndarray) and x.dtype == np.float64:
            return x
        return np.asarray(self.b.to_numpy(x), dtype=np.float64)

    def _count(self, x: A, right: F64) -> None:
        """Meter the products of rows ``x`` with ``right`` and their norms."""
        rows, width = self.b.shape(x)
        self.flops += 2 * rows * width * (right.shape[1] + 1)

    def _project_rows(
        self, x: A, right: F64, norm: NormName | None = None, norm_layer: int = -1
    ) -> tuple[F64, F64]:
        """(x̂·right, ‖x̂_i‖) in float64 for x̂ = a backend array x (rows × width) or its RMSNorm ``norm``
        (the backend's project64, project64_norm)."""
        self._count(x, right)
        if norm is not None:
            prod, norms = self.b.project64_norm(x, norm, norm_layer, right)
        else:
            prod, norms = self.b.project64(x, right)
        return np.asarray(prod, dtype=np.float64), np.asarray(norms, dtype=np.float64)

    def _accept(
        self,
        stage: Stage,
        layer: int,
        ratio: float,
        checks: int,
        what: str,
        own: tuple[A, NormName, int] | None = None,
    ) -> None:
        """Accept a check whose largest |residual|/τ is ``ratio`` (:func:`excess_ratio`; NaN when not finite)
        over ``checks`` entries iff ratio ≤ 1; record it. ``own``: the rows x the client sent and the norm
        (name, layer) the server applies to them — a verdict that is not finite is then first traced to
        the client's own side (:meth:`_own_norm_finite`)."""
        self.checks += checks
        if not math.isfinite(ratio):
            if own is not None:
                self._own_norm_finite(stage, layer, *own)
            raise IntegrityError(f"{_where(stage, layer)}: {what} is not finite")
        if ratio > 1.0:
            raise IntegrityError(
                f"{_where(stage, layer)}: {what} failed verification "
                f"(|residual| = {ratio:.3g} × the rounding bound): the server did not compute this stage"
            )
        self.worst = max(self.worst, ratio)

    def _own_norm_finite(self, stage: Stage, layer: int, x: A, norm: NormName, norm_layer: int) -> None:
        """NonFiniteError when the model's own RMSNorm ``norm`` of the rows ``x`` the client sent is not
        finite (a zero row at ``rms_eps`` = 0, a row past the dtype's range): an honest server's reply is
        then not finite either, so the model's arithmetic fails here, not the server. Run only after a
        verdict that is not finite; it depends on the client's own rows alone, so a server cannot steer it."""
        with np.errstate(all="ignore"):
            xh = self.b.norm(x, norm, norm_layer)
        if not self.b.rows_finite(xh, np.arange(self.b.nrows(xh), dtype=np.int64)):
            raise NonFiniteError(
                f"{_where(stage, layer)}: the model's own {norm} RMSNorm of a row sent is not finite "
                f"(a zero row at rms_eps = {self.b.config.rms_eps:g}, or one past the dtype's range)"
            )

    # -- linear stages --------------------------------------------------------------------------------
    def linear(
        self,
        stage: Stage,
        layer: int,
        x: A,
        y: A,
        which: WeightName,
        u: float,
        expert: int | None = None,
        norm: NormName | None = None,
        norm_layer: int = -1,
        input_slack: float | None = None,
    ) -> None:
        """Check y = x̂·W (+ b), x̂ = ``x`` or the client's RMSNorm ``norm`` of it (Freivalds).
        ``input_slack``: how many roundings (relative u) the server's input may differ from x̂ by — 1 for
        what was sent (its cast), √in + 4 for a norm the server recomputes (the default then)."""
        ch = self._check(which, layer, expert).first(self.vectors_for(self.b.nrows(y)))
        n_in = ch.wr.shape[0]
        slack = input_slack if input_slack is not None else (1.0 if norm is None else math.sqrt(n_in) + 4.0)
        self._linear_judge(stage, layer, which, u, ch, y, x, slack, norm, norm_layer)

    def _linear_judge(
        self,
        stage: Stage,
        layer: int,
        which: WeightName,
        u: float,
        ch: _Check,
        y: A | Products,
        x: A | Products,
        input_slack: float,
        norm: NormName | None = None,
        norm_layer: int = -1,
        x_rows: Callable[[], A] | None = None,
    ) -> None:
        """Accept y = x̂·W (+ b) for the check ``ch``: each side the backend's rows (x̂ = ``x``, or its
        RMSNorm ``norm``) or their :data:`Products` (y·r, ‖y_i‖ / x̂·W r, ‖x̂_i‖). The verdict is
        :func:`linear_excess` of the two sides' products — in one call where the backend fuses it
        (``Backend.freivalds_excess``), composed here otherwise. A failing verdict on rows the client
        holds (``x`` itself, or ``x_rows()`` behind its Products; not a norm the server applies) is judged
        again with norms that neither underflow nor overflow (:meth:`_renormed`)."""
        a, b = ch.tau_terms(u, 0.0, input_slack)
        ratio = self.b.freivalds_excess(y, ch.r, x, ch.wr, (ch.bias_r, a, b, _TINY), norm, norm_layer)
        if ratio is None:
            yr, ynorm = y if isinstance(y, tuple) else self._project_rows(y, ch.r)
            xr, xnorm = x if isinstance(x, tuple) else self._project_rows(x, ch.wr, norm, norm_layer)
            ratio = linear_excess(yr, xr, ch.bias_r, xnorm, ynorm, a, b)
        else:
            for side, right in ((y, ch.r), (x, ch.wr)):
                if not isinstance(side, tuple):
                    self._count(side, right)
        if not ratio <= 1.0 and norm is None and not isinstance(y, tuple):
            rows_x = x if not isinstance(x, tuple) else None if x_rows is None else x_rows()
            if rows_x is not None:
                ratio = self._renormed(ch, a, b, y, rows_x)
        rows = x[0].shape[0] if isinstance(x, tuple) else self.b.nrows(x)
        own = None if norm is None or isinstance(x, tuple) else (x, norm, norm_layer)
        self._accept(stage, layer, ratio, rows * ch.r.shape[1], f"the {which} product", own)

    def _renormed(self, ch: _Check, a: F64, b: F64, y: A, x: A) -> float:
        """:func:`linear_excess` of y = x·W (+ b) for rows ``y``, ``x`` the client holds, with τ's terms
        (``a``, ``b``) scaled by the rows' norms from :func:`row_norms` — the same τ as the fused or
        composed verdict, evaluated without the underflow or overflow of a plain float64 sum of squares
        (module docstring, *the rows' norms*). Run only after that verdict failed: it reads the rows again."""
        yr, _ = self._project_rows(y, ch.r)
        xr, _ = self._project_rows(x, ch.wr)
        return linear_excess(yr, xr, ch.bias_r, row_norms(self._host(x)), row_norms(self._host(y)), a, b)

    @staticmethod
    def _linear_tau(
        xnorm: F64, ynorm: F64, ch: _Check, u: float, extra_out: float, input_slack: float
    ) -> F64:
        """τ per row and vector, ‖x̂_i‖·a + ‖y_i‖·b with (a, b) of :meth:`_Check.tau_terms`."""
        a, b = ch.tau_terms(u, extra_out, input_slack)
        out: F64 = np.multiply.outer(xnorm, a)
        out += np.multiply.outer(ynorm, b)
        return out

    # -- MLP stages -------------------------------------------------------------------------------------
    def mlp_expect(self, rows: int) -> dict[str, tuple[int, ...]]:
        """The arrays of a traced MLP reply for ``rows`` rows."""
        c = self.b.config
        if not c.is_moe:
            return {"y": (rows, c.hidden_size), "gu": (rows, 2 * c.intermediate_size)}
        return {
            "y": (rows, c.hidden_size),
            "router": (rows, c.n_experts),
            "gu": (rows, c.top_k, 2 * c.intermediate_size),
        }

    def mlp(self, stage: Stage, layer: int, x: A, reply: Mapping[str, A], u: float) -> None:
        """Check a traced MLP reply for the un-normalized rows ``x`` the server was sent: its norm, gate/up
        (and router) products Freivalds-checked, the SwiGLU redone, the down projection checked."""
        b, c = self.b, self.b.config
        y, gu = reply["y"], reply["gu"]
        normed = math.sqrt(c.hidden_size) + 4.0  # the server normalized x itself
        if not c.is_moe:
            kv = self.vectors_for(b.nrows(y))
            up, down = (
                self._check("w_gate_up", layer, None).first(kv),
                self._check("w_down", layer, None).first(kv),
            )
            rows, f = b.nrows(gu), c.intermediate_size
            self.flops += 2 * rows * 2 * f * (kv + 1) + 2 * rows * f * (kv + 1)
            # the reply's gate/up read once: its own products, and its SwiGLU's against the down map's W r;
            # both verdicts in one call where the backend fuses it
            terms_up = (up.bias_r, *up.tau_terms(u, 0.0, normed), _TINY)
            terms_down = (down.bias_r, *down.tau_terms(u, 0.0, _SWIGLU), _TINY)
            got = b.gate_up_excess(gu, y, x, layer, (up.r, up.wr, terms_up), (down.r, down.wr, terms_down))
            if got is not None:
                self._count(x, up.wr)
                self._count(y, down.r)
                self._accept(stage, layer, got[0], rows * kv, "the w_gate_up product", (x, "mlp", layer))
                ratio = got[1]
                if not ratio <= 1.0:  # judged again with norms that neither underflow nor overflow
                    ratio = self._renormed(down, terms_down[1], terms_down[2], y, b.swiglu_act(gu))
                self._accept(stage, layer, ratio, rows * kv, "the w_down product")
                return
            gr, gnorm, mr, mnorm = (np.asarray(a, np.float64) for a in b.project64_gate_up(gu, up.r, down.wr))
            self._linear_judge(
                stage,
                layer,
                "w_gate_up",
                u,
                up,
                (gr, gnorm),
                x,
                normed,
                "mlp",
                layer,
            )
            self._linear_judge(
                stage, layer, "w_down", u, down, y, (mr, mnorm), _SWIGLU, x_rows=lambda: b.swiglu_act(gu)
            )
            return
        with np.errstate(all="ignore"):
            xh = b.norm(x, "mlp", layer)
        rows, k, f = b.nrows(xh), c.top_k, c.intermediate_size
        try:
            self.linear(stage, layer, xh, reply["router"], "router", u, input_slack=normed)
        except IntegrityError:  # first traced to the client's own norm (a NaN xh gives a NaN verdict)
            self._own_norm_finite(stage, layer, x, "mlp", layer)
            raise
        top, weights = route(b.to_numpy(reply["router"]), k)
        gu_flat = b.reshape(gu, (rows * k, 2 * f))
        m_flat = b.swiglu_act(gu_flat)
        kv = self.vectors_for(rows)
        down = self._check("w_down", layer, 0).first(kv)  # r of W_down is shared by the layer's experts
        pred = np.zeros((rows, kv))
        slots_of: list[tuple[npt.NDArray[np.intp], F64, F64, F64, A]] = []  # per expert: τ's inputs, its m
        for e in np.unique(top).tolist():
            hit_rows, slots = np.nonzero(top == e)
            flat = (hit_rows * k + slots).astype(np.int64)
            self.linear(
                stage,
                layer,
                b.take_rows(xh, hit_rows.astype(np.int64)),
                b.take_rows(gu_flat, flat),
                "w_gate_up",
                u,
                e,
                input_slack=normed,
            )
            ch = self._check("w_down", layer, e).first(kv)
            m_e = b.take_rows(m_flat, flat)
            mr, mnorm = self._project_rows(m_e, ch.wr)
            w = weights[hit_rows, slots]
            np.add.at(pred, hit_rows, w[:, None] * mr)
            term = (math.sqrt(f) + 2.0) * ch.rho + (_SWIGLU + 1.0) * ch.wr_norm  # + the weight's rounding
            slots_of.append((hit_rows, np.abs(w), term, mnorm, m_e))
        yr, ynorm = self._project_rows(y, down.r)
        residual = yr - pred

        def tau_of(mnorms: list[F64], ynorm: F64) -> F64:
            mnorm_w = np.zeros(rows)
            rho_w = np.zeros((rows, kv))
            for (hit_rows, w_abs, term, _, _), mnorm in zip(slots_of, mnorms, strict=True):
                np.add.at(mnorm_w, hit_rows, w_abs * mnorm)
                np.add.at(rho_w, hit_rows, w_abs[:, None] * mnorm[:, None] * term[None, :])
            tau = self._linear_tau(np.zeros(rows), ynorm, down, u, float(k), 0.0)
            tau = tau + LAMBDA * u * rho_w  # Σ_slots |w|·‖m‖·((√f + 2)ρ_e + 5‖W_e r‖)
            out: F64 = tau + LAMBDA * _U64 * math.sqrt(f) * mnorm_w[:, None] * down.wr_norm[None, :]
            return out

        ratio = excess_ratio(residual, tau_of([sl[3] for sl in slots_of], ynorm))
        if not ratio <= 1.0:  # judged again with norms that neither underflow nor overflow (the same τ)
            mnorms = [row_norms(self._host(sl[4])) for sl in slots_of]
            ratio = excess_ratio(residual, tau_of(mnorms, row_norms(self._host(y))))
        self._accept(stage, layer, ratio, int(residual.size), "the experts' down products")

    # -- attention ------------------------------------------------------------------------------------
    def attention(
        self,
        stage: Stage,
        layer: int,
        q: A,
        k: A,
        v: A,
        o: A,
        u: float,
        rows: npt.NDArray[np.int64],
        first: int,
    ) -> None:
        """Check attention output ``o`` of queries ``q`` (at positions first, first + 1, …) over keys/values
        ``k``, ``v`` (positions 0, 1, …; causal): every row in its values' range, ``rows`` recomputed.
        When ``rows`` are all the queries (a generation step's one row, a prompt of at most
        :data:`ATTENTION_ROWS` tokens) every entry is recomputed, a far stronger test than the range check
        (within rounding of the exact row, not merely of its values' range) that reads every entry of ``o``
        (a NaN or an infinity fails it): the range check is then not run."""
        c = self.b.config
        n_q, g, dh = self.b.shape(q)[0], c.group_size, c.head_dim
        every = rows.size == n_q and bool(np.array_equal(np.sort(rows), np.arange(n_q)))  # each row once
        if self._attention_fused(stage, layer, (q, k, v, o), u, rows, first, every):
            return
        # the range check needs no float64: max and min are exact in any dtype; on the device the arrays
        # live on (two numbers come back), else read-only views of them where the backend can give them
        b, n_k = self.b, self.b.nrows(v)
        if not every:
            og = b.reshape(o, (n_q, c.n_kv_heads, g, dh))
            range_shapes(b.shape(v), b.shape(og), first)
            got = b.device_range_excess(v, og, first)
            if got is None:
                got = range_excess(
                    np.asarray(b.head_to_numpy(v, n_k)), np.asarray(b.head_to_numpy(og, n_q)), first
                )
            over, vmax = got
            slack = LAMBDA * u * (math.sqrt(n_k) + 4.0) * vmax
            # over ≤ 0 when every entry is in range; NaN stays NaN (refused as not finite)
            residual = over if over > 0.0 or math.isnan(over) else 0.0
            ratio = excess_ratio(residual, slack)
            self._accept(stage, layer, ratio, 1, "an attention row outside its values' range")
            self.flops += 4 * n_q * c.n_heads * dh
        if rows.size == 0:
            return
        pos = first + rows  # the recomputed rows' positions
        seen = int(pos.max()) + 1  # keys 0 .. seen − 1 are all any recomputed row may attend to
        q_rows = np.asarray(self.b.rows_to_numpy(q, rows))
        o_rows = np.asarray(self.b.rows_to_numpy(o, rows)).reshape(q_rows.shape)
        k_w, v_w = np.asarray(self.b.head_to_numpy(k, seen)), np.asarray(self.b.head_to_numpy(v, seen))
        scale = 1.0 / math.sqrt(dh)
        rec = attention_rows64(q_rows, k_w, v_w, o_rows, pos, g, scale, self.b.matmul64, self.b.threads())
        self.flops += 4 * c.n_heads * dh * int((pos + 1).sum())
        ratio = attention_excess(rec, pos, g, scale, u)
        self._accept(stage, layer, ratio, int(rec.dist.size), "a recomputed attention row")

    def _attention_fused(
        self,
        stage: Stage,
        layer: int,
        qkvo: tuple[A, A, A, A],
        u: float,
        rows: npt.NDArray[np.int64],
        first: int,
        every: bool,
    ) -> bool:
        """:meth:`attention`'s checks in one compiled call where the CPU kernels are installed and the four
        arrays are in host memory, float32 or float64 of one dtype (``attention_check`` of
        :mod:`.cpu_kernels`: the range check and the recomputed rows by the same kernels in the same order
        as :meth:`attention` calls them one by one, so the same verdicts); False (nothing checked)
        otherwise."""
        kern = kernels()
        b, c = self.b, self.b.config
        if kern is None or not all(b.on_host(t) for t in qkvo):  # device arrays: checked where they are
            return False
        arrays = [np.asarray(b.head_to_numpy(t, b.nrows(t))) for t in qkvo]
        dtype = arrays[0].dtype
        if dtype not in (np.float32, np.float64) or any(a.dtype != dtype or a.ndim != 3 for a in arrays):
            return False
        # q as it is (a strided view of the decoded [Q K] heads, of which the kernel reads the recomputed
        # rows only: no copy of the rest); k, v and o C-contiguous (the float64 sums read them in order)
        q = arrays[0]
        k, v, o = (np.ascontiguousarray(a) for a in arrays[1:])
        idx = np.ascontiguousarray(rows, dtype=np.int64)
        work = c.n_heads * c.head_dim * (int(idx.sum()) + (first + 1) * idx.size)  # Σ (pos + 1) multiply-adds
        scale = 1.0 / math.sqrt(c.head_dim)
        with kern.parts(work if work >= SPLIT_ROWS64 else 0, b.threads()) as parts:
            by_range, by_rows = kern.attention_check(
                q, k, v, o, idx, first, c.group_size, scale, u, LAMBDA, _U64, _TINY, not every, parts
            )
        if by_range == -1.0 and by_rows == -1.0:
            raise ShapeError(
                f"queries {q.shape}, outputs {o.shape} from position {first}, keys {k.shape}, values "
                f"{v.shape} and recomputed rows {rows.tolist()!r:.80} do not fit one another"
            )
        if not every:
            self._accept(stage, layer, by_range, 1, "an attention row outside its values' range")
            self.flops += 4 * o.size
        if idx.size:
            self.flops += 4 * work
            self._accept(stage, layer, by_rows, idx.size * c.n_heads, "a recomputed attention row")
        return True

    # -- last guard blocks -------------------------------------------------------------------------------
    def lock(self, layer: int, locked: A) -> None:
        """Start the locked-score sketch of block ``layer`` from the locked cache the client stores."""
        c = self.b.config
        kc = self._host(locked).reshape(-1, c.n_kv_heads, c.head_dim)
        self._locks[layer] = LockSketch.start(self.keys.verify_lock(layer, kc.shape[0], self.vectors), kc)
        self.flops += 4 * kc.size * self.vectors

    def gen_last(self, layer: int, step: int, h: A, pos: int, scores: A, z: A, u: float) -> None:
        """Check a last guard block's reply for the row ``h`` it was sent (at position ``pos``): its
        projection ``z`` = x̂·W_qkv (+ b), x̂ = RMSNorm(h) computed by the server (Freivalds, as every linear
        stage), then ``scores`` (H × 1 × m) against the locked-cache sketch extended by the new key — the
        query and key RoPE'd from the checked z (Freivalds over the m columns, per head)."""
        b, c = self.b, self.b.config
        lk = self._locks.get(layer)
        if lk is None:
            raise IntegrityError(f"gen_last of block {layer} before its locked cache was stored")
        H, H_kv, dh, g = c.n_heads, c.n_kv_heads, c.head_dim, c.group_size
        ch = self._check("wqkv", layer, None).first(self.vectors_for(1))
        self._linear_judge(
            Stage.GEN_LAST,
            layer,
            "wqkv",
            u,
            ch,
            z,
            h,
            math.sqrt(c.hidden_size) + 4.0,  # the server normalized h itself
            "attn",
            layer,
        )
        # q's and k's heads RoPE'd in one call (the rotation is per head, at the row's position)
        qk = b.reshape(b.narrow(z, 1, 0, c.q_dim + c.kv_dim), (1, H + H_kv, dh))
        qk_own = self._host(b.rope(qk, np.array([pos])))[0]  # [q; k]: (H + H_kv) × d_h
        new = self.lock_step(layer, step)[0]  # k, derived ahead or now
        del self._lock_steps[(layer, step)]  # used once
        s64 = self._host(scores).reshape(H, -1)  # H × m
        if s64.shape[1] != lk.coef.shape[0] + 1:
            raise IntegrityError(
                f"gen_last of block {layer}: {s64.shape[1]} scores for {lk.coef.shape[0] + 1} keys"
            )
        ratio, lk = lock_scores_excess(lk, qk_own, new, s64, g, 1.0 / math.sqrt(dh), u)
        self.flops += 2 * H * lk.coef.shape[0] * self.vectors
        checks = H * lk.coef.shape[1]
        self._accept(Stage.GEN_LAST, layer, ratio, checks, "the scores against the locked cache")
        self._locks[layer] = lk

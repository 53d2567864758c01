"""The numba-compiled bodies of :mod:`.cpu_kernels` (what each computes, how it rounds and how it splits
across threads: that module's docstring). Imported only when numba is installed.

They are module-level functions so that numba's on-disk cache finds them again in a new process: a kernel
defined inside a function closes over the dispatchers it calls, and a parallel kernel keyed that way missed
the cache in every process (about 6 s of compiling on a process's first request, and a new cache entry
each time).

Call them through :func:`.cpu_kernels.kernels`, which starts numba's threading layer before the first call:
a kernel loaded from the disk cache that runs a parallel one (``attention_check`` → ``attention_rows64``),
called from here in a fresh process before the layer had started, crashed it (a segmentation fault, numba
0.68.1; with ``numba.get_num_threads()`` called first, none).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from .base import NEAR_RANGE, sum_norm_slack

jit = numba.njit(boundscheck=False, nogil=True, cache=True)
pjit = numba.njit(boundscheck=False, nogil=True, cache=True, parallel=True)
#: jit with numpy's error model: a division is not tested for a zero divisor first (that test, a branch
#: that raises, kept LLVM from vectorizing a loop that divides)
numpy_errors = numba.njit(boundscheck=False, nogil=True, cache=True, error_model="numpy")
prange = numba.prange


@jit
def all_zero(bad: Any) -> bool:
    """Whether a finiteness accumulator (entries v − v summed: 0, or NaN) is all zero"""
    total = 0.0
    for f in range(bad.shape[0]):
        total += bad[f]
    return total == 0.0


@jit
def all_zero_parts(bad: Any) -> bool:
    """``all_zero`` of every chunk's row of a parts × width accumulator"""
    total = 0.0
    for p in range(bad.shape[0]):
        row = bad[p]
        for f in range(row.shape[0]):
            total += row[f]
    return total == 0.0


@jit
def chunk_start(n: int, p: int, parts: int, unit: int) -> int:
    """Where chunk p of ``parts`` starts over n rows (chunk ``parts`` starts at n): a multiple of ``unit``
    rows, the last chunk taking the rest"""
    return n if p == parts else ((n // unit) * p // parts) * unit


@jit
def all_in(index: Any, n: int) -> bool:
    """Whether every entry of an index array lies in 0 … n − 1 (the kernels index without bounds checks:
    an index from outside is refused before anything is read)"""
    inside = True
    for f in range(index.shape[0]):
        if index[f] < 0 or index[f] >= n:
            inside = False
            break
    return inside


# The encoding passes split a pass's rows into ``bad.shape[0]`` contiguous chunks, one per thread
# (prange; Kernels.parts picks how many); each chunk sums its own finiteness row of ``bad``. One chunk
# runs inline, with no parallel region.
@jit
def rope_rows(
    x: Any,
    rows: Any,
    pos: Any,
    cos: Any,
    sin: Any,
    rope_index: Any,
    plain_index: Any,
    d_h: int,
    out_rope: Any,
    out_plain: Any,
    lo: int,
    hi: int,
    bad: Any,
) -> None:
    """Row j: RoPE the first len(rope_index) columns of x[rows[j]] head by head (HF rotate_half) at
    position pos[j] (row pos[j] of the cos and sin tables), then gather them by rope_index; gather the
    columns after them by plain_index. The rotation runs on slices indexed from 0 (no negative-index
    wraparound), so LLVM vectorizes it; the column indices are unsigned for the same reason. bad: a
    row of x's width, bad[f] += v − v over the rows read (0, or NaN for NaN and ±inf)."""
    width = rope_index.shape[0]
    half = d_h // 2
    buf = np.empty(width, dtype=x.dtype)
    for f in range(bad.shape[0]):
        bad[f] = 0.0
    for j in range(lo, hi):
        src = x[rows[j]]
        for f in range(bad.shape[0]):
            bad[f] += src[f] - src[f]
        p = pos[j]
        c1, c2 = cos[p, :half], cos[p, half:d_h]
        s1, s2 = sin[p, :half], sin[p, half:d_h]
        for h in range(width // d_h):
            b = h * d_h
            x1, x2 = src[b : b + half], src[b + half : b + d_h]
            o1, o2 = buf[b : b + half], buf[b + half : b + d_h]
            for t in range(half):
                o1[t] = x1[t] * c1[t] - x2[t] * s1[t]
            for t in range(half):
                o2[t] = x2[t] * c2[t] + x1[t] * s2[t]
        dst = out_rope[j]
        for f in range(width):
            dst[f] = buf[rope_index[f]]
        dst = out_plain[j]
        rest = src[width:]
        for f in range(plain_index.shape[0]):
            dst[f] = rest[plain_index[f]]


@pjit
def rope_take(
    x: Any,
    rows: Any,
    pos: Any,
    cos: Any,
    sin: Any,
    rope_index: Any,
    plain_index: Any,
    d_h: int,
    out_rope: Any,
    out_plain: Any,
    bad: Any,
) -> int:
    """``rope_rows`` over every row, in bad.shape[0] chunks: 1 when every entry read is finite, 0 when one is
    not; nothing written and −1 when a position is outside the tables, −2 when a row or column index
    is outside x (the RoPE'd columns first, the plain ones after them)"""
    n, parts, w = rows.shape[0], bad.shape[0], rope_index.shape[0]
    inside = all_in(rows, x.shape[0]) and all_in(rope_index, w)
    if not (inside and all_in(plain_index, x.shape[1] - w)):
        return -2
    for j in range(n):
        if pos[j] < 0 or pos[j] >= cos.shape[0]:
            return -1
    if parts == 1:
        rope_rows(x, rows, pos, cos, sin, rope_index, plain_index, d_h, out_rope, out_plain, 0, n, bad[0])
    else:
        for p in prange(parts):
            lo, hi = chunk_start(n, p, parts, 1), chunk_start(n, p + 1, parts, 1)
            rope_rows(
                x, rows, pos, cos, sin, rope_index, plain_index, d_h, out_rope, out_plain, lo, hi, bad[p]
            )
    return 1 if all_zero_parts(bad) else 0


@jit
def take_rows_cols_concat_rows(
    x: Any, cols: Any, extra: Any, index: Any, out: Any, lo: int, hi: int, bad: Any
) -> None:
    """Row j: x[index[j], cols] when index[j] < rows(x), else extra[index[j] − rows(x)]; bad: a row of
    scratch, bad[f] += v − v over the entries written"""
    n = x.shape[0]
    for f in range(bad.shape[0]):
        bad[f] = 0.0
    for j in range(lo, hi):
        p = index[j]
        dst = out[j]
        if p < n:
            src = x[p]
            for f in range(cols.shape[0]):
                dst[f] = src[cols[f]]
        else:
            src = extra[p - n]
            for f in range(dst.shape[0]):
                dst[f] = src[f]
        for f in range(dst.shape[0]):
            bad[f] += dst[f] - dst[f]


@pjit
def take_rows_cols_concat(x: Any, cols: Any, extra: Any, index: Any, out: Any, bad: Any) -> int:
    """``take_rows_cols_concat_rows`` over every row, in bad.shape[0] chunks: 1 when every entry written is
    finite, 0 when one is not, −1 (nothing written) when a row or column index is outside x and extra"""
    n, parts = index.shape[0], bad.shape[0]
    if not (all_in(cols, x.shape[1]) and all_in(index, x.shape[0] + extra.shape[0])):
        return -1
    if parts == 1:
        take_rows_cols_concat_rows(x, cols, extra, index, out, 0, n, bad[0])
    else:
        for p in prange(parts):
            lo, hi = chunk_start(n, p, parts, 1), chunk_start(n, p + 1, parts, 1)
            take_rows_cols_concat_rows(x, cols, extra, index, out, lo, hi, bad[p])
    return 1 if all_zero_parts(bad) else 0


@jit
def gather_sum_rows(
    s: Any, from_s: Any, y: Any, from_y: Any, extra: Any, out: Any, lo: int, hi: int, bad: Any
) -> None:
    """Row j: s[from_s[j]] + y[from_y[j]] when from_y[j] ≥ 0, else extra[from_s[j]] (bad as in
    take_rows_cols_concat_rows)"""
    for f in range(bad.shape[0]):
        bad[f] = 0.0
    for j in range(lo, hi):
        dst = out[j]
        if from_y[j] >= 0:
            a = s[from_s[j]]
            b = y[from_y[j]]
            for f in range(dst.shape[0]):
                dst[f] = a[f] + b[f]
        else:
            a = extra[from_s[j]]
            for f in range(dst.shape[0]):
                dst[f] = a[f]
        for f in range(dst.shape[0]):
            bad[f] += dst[f] - dst[f]


@pjit
def gather_sum(s: Any, from_s: Any, y: Any, from_y: Any, extra: Any, out: Any, bad: Any) -> int:
    """``gather_sum_rows`` over every row, in bad.shape[0] chunks: 1 when every entry written is finite, 0
    when one is not, −1 (nothing written) when a row index is outside s, y or extra"""
    n, parts = from_s.shape[0], bad.shape[0]
    for j in range(n):
        a, b = from_s[j], from_y[j]
        if (a < 0 or b >= y.shape[0]) or (b >= 0 and a >= s.shape[0]) or (b < 0 and a >= extra.shape[0]):
            return -1
    if parts == 1:
        gather_sum_rows(s, from_s, y, from_y, extra, out, 0, n, bad[0])
    else:
        for p in prange(parts):
            lo, hi = chunk_start(n, p, parts, 1), chunk_start(n, p + 1, parts, 1)
            gather_sum_rows(s, from_s, y, from_y, extra, out, lo, hi, bad[p])
    return 1 if all_zero_parts(bad) else 0


@jit
def add_rows_part(a: Any, b: Any, out: Any, lo: int, hi: int, bad: Any) -> None:
    """out ← a + b for rows lo … hi − 1 (bad as in take_rows_cols_concat_rows)"""
    for f in range(bad.shape[0]):
        bad[f] = 0.0
    for j in range(lo, hi):
        x, y, dst = a[j], b[j], out[j]
        for f in range(dst.shape[0]):
            dst[f] = x[f] + y[f]
            bad[f] += dst[f] - dst[f]


@pjit
def add_rows(a: Any, b: Any, out: Any, bad: Any) -> bool:
    """out ← a + b row by row (2-D, one shape), in bad.shape[0] chunks; whether every entry of out is
    finite"""
    n, parts = a.shape[0], bad.shape[0]
    if parts == 1:
        add_rows_part(a, b, out, 0, n, bad[0])
    else:
        for p in prange(parts):
            add_rows_part(a, b, out, chunk_start(n, p, parts, 1), chunk_start(n, p + 1, parts, 1), bad[p])
    return all_zero_parts(bad)


@jit
def rows_finite(x: Any, rows: Any) -> int:
    """1 when every entry of x's rows ``rows`` is finite, 0 when one is not (each entry's v − v summed per
    column, as the encoding passes test theirs), −1 when a row index is out of range; read in place"""
    n, w = x.shape
    bad = np.zeros(w, dtype=x.dtype)
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0 or r >= n:
            return -1
        row = x[r]
        for f in range(w):
            bad[f] += row[f] - row[f]
    return 1 if all_zero(bad) else 0


@jit
def is_permutation(index: Any, n: int) -> bool:
    """Whether index holds each of 0 … n − 1 exactly once"""
    if index.shape[0] != n:
        return False
    seen = np.zeros(n, dtype=np.uint8)
    for j in range(n):
        k = index[j]
        if k < 0 or k >= n or seen[k]:
            return False
        seen[k] = 1
    return True


@jit
def permute_cols(x: Any, index: Any, c0: int, c1: int, bad: Any) -> None:
    """Columns c0 … c1 − 1 of x ← x[index] in x's own memory, cycle by cycle (one saved row slice per
    cycle), every entry read and written once; index is a permutation (is_permutation). bad: a row
    of x's width whose entries c0 … c1 − 1 sum v − v over the entries moved"""
    n = x.shape[0]
    done = np.zeros(n, dtype=np.uint8)
    saved = np.empty(c1 - c0, dtype=x.dtype)
    acc = bad[c0:c1]
    for f in range(acc.shape[0]):
        acc[f] = 0.0
    for start in range(n):
        if done[start]:
            continue
        done[start] = 1
        src = x[start, c0:c1]
        for f in range(acc.shape[0]):
            saved[f] = src[f]
            acc[f] += src[f] - src[f]
        j = start
        while True:
            k = index[j]
            dst = x[j, c0:c1]
            if k == start:
                for f in range(acc.shape[0]):
                    dst[f] = saved[f]
                break
            src = x[k, c0:c1]
            for f in range(acc.shape[0]):
                dst[f] = src[f]
                acc[f] += src[f] - src[f]
            done[k] = 1
            j = k


@pjit
def permute_rows(x: Any, index: Any, parts: int, bad: Any) -> int:
    """In place: x ← x[index] in x's own memory, its columns in ``parts`` chunks (each follows the same cycles
    over its columns; bad: a row of x's width, each chunk summing its own columns); returns 1 when every entry
    is finite, 0 when one is not, −1 (x untouched) when ``index`` is not a permutation of the rows"""
    if not is_permutation(index, x.shape[0]):
        return -1
    w = x.shape[1]
    if parts == 1:
        permute_cols(x, index, 0, w, bad)
    else:
        for p in prange(parts):
            permute_cols(x, index, chunk_start(w, p, parts, 1), chunk_start(w, p + 1, parts, 1), bad)
    return 1 if all_zero(bad) else 0


# The verifier's float64 sums: reassociated and contracted (see the module docstring), nothing else.
fast = numba.njit(boundscheck=False, nogil=True, cache=True, fastmath={"reassoc", "contract"})
pfast = numba.njit(boundscheck=False, nogil=True, cache=True, fastmath={"reassoc", "contract"}, parallel=True)


@fast
def widen_sums(vals: Any, rt: Any, buf: Any, out_row: Any) -> float:
    """With v = vals widened to float64: out_row[c] = Σ_t v_t·rt[c, t] for each check vector, and Σ_t v_t²
    returned; one loop with three sums for the usual k = 2 (a prompt's rows), else v kept in buf"""
    k, w = rt.shape
    if k == 2:
        r0, r1 = rt[0], rt[1]
        s, a0, a1 = 0.0, 0.0, 0.0
        for t in range(w):
            v = np.float64(vals[t])
            s += v * v
            a0 += v * r0[t]
            a1 += v * r1[t]
        out_row[0], out_row[1] = a0, a1
        return s
    for t in range(w):  # the sums below store nothing (see attention_pairs)
        buf[t] = vals[t]
    s = 0.0
    for t in range(w):
        s += buf[t] * buf[t]
    for c in range(k):
        r = rt[c]
        a = 0.0
        for t in range(w):
            a += buf[t] * r[t]
        out_row[c] = a
    return s


@fast
def widen_sums4(x: Any, i: int, rt: Any, gain: Any, out: Any, sq: Any, g2: Any) -> None:
    """``widen_sums`` of x's rows i … i + 3 for k = 2 in one loop: each check-vector entry is loaded once for
    the four rows (the products were bound by those loads, two float64 per float32 read); with
    ``gain`` (a row-length array, or an empty one) also g2[j] = Σ_t (x_jt·γ_t)², in float64"""
    r0, r1 = rt[0], rt[1]
    xa, xb, xc, xd = x[i], x[i + 1], x[i + 2], x[i + 3]
    sa, sb, sc, sd = 0.0, 0.0, 0.0, 0.0
    a0, a1, b0, b1, c0, c1, d0, d1 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for t in range(rt.shape[1]):
        p, q = r0[t], r1[t]
        va, vb, vc, vd = np.float64(xa[t]), np.float64(xb[t]), np.float64(xc[t]), np.float64(xd[t])
        sa += va * va
        sb += vb * vb
        sc += vc * vc
        sd += vd * vd
        a0 += va * p
        a1 += va * q
        b0 += vb * p
        b1 += vb * q
        c0 += vc * p
        c1 += vc * q
        d0 += vd * p
        d1 += vd * q
    out[i, 0], out[i, 1], out[i + 1, 0], out[i + 1, 1] = a0, a1, b0, b1
    out[i + 2, 0], out[i + 2, 1], out[i + 3, 0], out[i + 3, 1] = c0, c1, d0, d1
    sq[i], sq[i + 1], sq[i + 2], sq[i + 3] = sa, sb, sc, sd
    if gain.shape[0] == 0:
        return
    ga, gb, gc, gd = 0.0, 0.0, 0.0, 0.0
    for t in range(rt.shape[1]):
        gt = np.float64(gain[t])
        ua, ub = np.float64(xa[t]) * gt, np.float64(xb[t]) * gt
        uc, ud = np.float64(xc[t]) * gt, np.float64(xd[t]) * gt
        ga += ua * ua
        gb += ub * ub
        gc += uc * uc
        gd += ud * ud
    g2[i], g2[i + 1], g2[i + 2], g2[i + 3] = ga, gb, gc, gd


@fast
def project_rows(x: Any, rt: Any, gain: Any, out: Any, sq: Any, g2: Any) -> None:
    """Rows of x: out[i, c] = Σ_t x_it·rt[c, t] and sq[i] = Σ_t x_it², in float64; four rows a loop
    for k = 2 (widen_sums4), one row a loop otherwise; with ``gain`` also g2 as in widen_sums4"""
    n, w = x.shape
    blocked = n - n % 4 if rt.shape[0] == 2 else 0
    for i in range(0, blocked, 4):
        widen_sums4(x, i, rt, gain, out, sq, g2)
    if blocked == n:  # no row left (no scratch to allocate: the gate/up check calls this per four rows)
        return
    buf = np.empty(w, dtype=np.float64)
    for i in range(blocked, n):
        row = x[i]
        sq[i] = widen_sums(row, rt, buf, out[i])
        if gain.shape[0] != 0:
            g = 0.0
            for t in range(w):
                gv = np.float64(row[t]) * np.float64(gain[t])
                g += gv * gv
            g2[i] = g


@pfast
def project64(x: Any, rt: Any, out: Any, sq: Any, parts: int) -> None:
    """Row i: out[i, c] = Σ_t x[i, t]·rt[c, t] and sq[i] = Σ_t x[i, t]², in float64; rows in ``parts``
    chunks"""
    none = np.empty(0, dtype=np.float64)
    if parts == 1:
        project_rows(x, rt, none, out, sq, none)
        return
    n = x.shape[0]
    for p in prange(parts):
        lo, hi = chunk_start(n, p, parts, 4), chunk_start(n, p + 1, parts, 4)
        project_rows(x[lo:hi], rt, none, out[lo:hi], sq[lo:hi], none)


#: Half the largest finite float32 and float64: a row whose float64 sum of squares reaches it is one where
#: the eager RMSNorm's sum, in the dtype, may overflow (then a row of zeros; see project64_rms)
HALF_MAX32 = float(np.finfo(np.float32).max) / 2
HALF_MAX64 = float(np.finfo(np.float64).max) / 2


@pfast
def project64_rms(x: Any, gain: Any, eps: float, rt: Any, out: Any, sq: Any, parts: int) -> bool:
    """Row i of x̂ = RMSNorm(x) = γ ⊙ x · s_i, s_i = (Σ_t x_t² / w + ε)^-½, without forming it:
    out[i, c] = s_i·Σ_t x_t·(γ_t rt[c, t]) and sq[i] = s_i²·Σ_t (γ_t x_t)², in float64; rows in
    ``parts`` chunks. Returns whether some row's float64 Σ_t x_t² reaches half the dtype's largest value
    (+inf included; NaN not): there the eager norm's sum in the dtype may overflow and give a row of
    zeros (Hugging Face's, the backend's own: TorchBackend._rms), which this float64 x̂ does not model,
    so the caller then takes the backend's norm of the rows instead"""
    k, w = rt.shape
    rg = np.empty((k, w), dtype=np.float64)
    for c in range(k):
        for t in range(w):
            rg[c, t] = rt[c, t] * np.float64(gain[t])
    n = x.shape[0]
    s = np.empty(n, dtype=np.float64)
    # out[i] = Σ_t x_t·(γ_t rt[c, t]), s = Σ x², sq = Σ (γx)²
    if parts == 1:
        project_rows(x, rg, gain, out, s, sq)
    else:
        for p in prange(parts):
            lo, hi = chunk_start(n, p, parts, 4), chunk_start(n, p + 1, parts, 4)
            project_rows(x[lo:hi], rg, gain, out[lo:hi], s[lo:hi], sq[lo:hi])
    big = HALF_MAX32 if x.itemsize == 4 else HALF_MAX64
    near = False
    for i in range(n):
        near = near or s[i] >= big
        # a zero root (an all-zero row at ε = 0): +inf, as torch's rsqrt — this compiled ``/`` raised
        # ZeroDivisionError out of the verifier
        root = np.sqrt(s[i] / w + eps)
        scale = 1.0 / root if root != 0.0 else np.inf
        for c in range(k):
            out[i, c] = scale * out[i, c]
        sq[i] = scale * scale * sq[i]
    return near


@numpy_errors
def swiglu_rows(gu: Any, lo: int, hi: int, m: Any) -> None:
    """m[r] ← silu(gate) ⊙ up of row lo + r of gu = [gate up], each operation rounded in gu's dtype
    (m's): silu by silu_value, the product as ``*``. Compiled without fast-math flags and with numpy's error
    model (no zero-division test in the loop), so LLVM vectorizes it"""
    f = m.shape[1]
    for r in range(hi - lo):
        gate, up, mr = gu[lo + r, :f], gu[lo + r, f : 2 * f], m[r]
        for t in range(f):
            mr[t] = silu_value(gate[t]) * up[t]


@fast
def gate_up_rows(
    gu: Any, rg: Any, rd: Any, out_g: Any, sq_g: Any, out_d: Any, sq_d: Any, lo: int, hi: int
) -> None:
    """Rows lo … hi − 1 (lo a multiple of four) of project64_gate_up"""
    f = rd.shape[1]
    none = np.empty(0, dtype=np.float64)
    m = np.empty((4, f), dtype=gu.dtype)
    for i in range(lo, hi, 4):
        j = min(i + 4, hi)
        project_rows(gu[i:j], rg, none, out_g[i:j], sq_g[i:j], none)
        swiglu_rows(gu, i, j, m)
        project_rows(m[: j - i], rd, none, out_d[i:j], sq_d[i:j], none)


@fast
def sum_squares64(row: Any) -> float:
    """Σ_t row_t² in float64 (reassociated and contracted: a loop that stores nothing, see attention_pairs)"""
    s = 0.0
    for t in range(row.shape[0]):
        v = np.float64(row[t])
        s += v * v
    return s


@fast
def dot64(a: Any, b: Any) -> float:
    """Σ_t a_t·b_t in float64 over a's length (reassociated and contracted: a loop that stores nothing)"""
    s = 0.0
    for t in range(a.shape[0]):
        s += np.float64(a[t]) * np.float64(b[t])
    return s


@jit
def rms_norm_rows(x: Any, gain: Any, eps: float, out: Any, scale: Any, lo: int, hi: int, bad: Any) -> None:
    """Rows lo … hi − 1: out_i = γ ⊙ (x_i·s_i), s_i = (Σ_t x_it² / w + ε)^−½ from a float64 sum, rounded to
    the dtype (stored in scale[i]), then each product rounded in the dtype in the eager order, γ·(x·s);
    bad as in take_rows_cols_concat_rows, over the rows of x read"""
    w = x.shape[1]
    for f in range(bad.shape[0]):
        bad[f] = 0.0
    for i in range(lo, hi):
        # a zero root (an all-zero row at ε = 0): +inf, as the eager rsqrt — this compiled ``/`` raised
        # ZeroDivisionError inside the kernel (a SystemError out of the torch backend's norm)
        root = np.sqrt(sum_squares64(x[i]) / w + eps)
        scale[i] = 1.0 / root if root != 0.0 else np.inf
        s, row, dst = scale[i], x[i], out[i]
        for t in range(w):
            dst[t] = gain[t] * (row[t] * s)
            bad[t] += row[t] - row[t]


@pjit
def rms_norm(x: Any, gain: Any, eps: float, out: Any, scale: Any, bad: Any) -> bool:
    """RMSNorm of x's rows (rows × w, C-contiguous) into out (rms_norm_rows), rows in bad.shape[0] chunks
    (bad: chunks × w scratch in the dtype; scale: one entry per row in the dtype, written); whether every
    entry of x is finite"""
    n, parts = x.shape[0], bad.shape[0]
    if parts == 1:
        rms_norm_rows(x, gain, eps, out, scale, 0, n, bad[0])
    else:
        for p in prange(parts):
            lo, hi = chunk_start(n, p, parts, 1), chunk_start(n, p + 1, parts, 1)
            rms_norm_rows(x, gain, eps, out, scale, lo, hi, bad[p])
    return all_zero_parts(bad)


@jit
def any_at_most(a: Any, bound: float) -> bool:
    """Whether some entry of the 1-D a is ≤ bound (NaN is not): rms_norm's scales of rows whose sum of squares
    comes near the dtype's range, which the torch backend normalizes again by its eager ops"""
    found = False
    for i in range(a.shape[0]):
        if a[i] <= bound:
            found = True
            break
    return found


@pfast
def project64_gate_up(
    gu: Any, rg: Any, rd: Any, out_g: Any, sq_g: Any, out_d: Any, sq_d: Any, parts: int
) -> None:
    """Row i of gu = [gate up] (2f wide): out_g[i] and sq_g[i] are project64 of the row; m = silu(gate) ⊙ up
    in gu's dtype (swiglu_rows, kept in a 4 × f scratch), and out_d[i], sq_d[i] are project64 of m — four
    rows at a time, each read from memory once; rows in ``parts`` chunks"""
    n = gu.shape[0]
    if parts == 1:
        gate_up_rows(gu, rg, rd, out_g, sq_g, out_d, sq_d, 0, n)
        return
    for p in prange(parts):
        lo, hi = chunk_start(n, p, parts, 4), chunk_start(n, p + 1, parts, 4)
        gate_up_rows(gu, rg, rd, out_g, sq_g, out_d, sq_d, lo, hi)


@jit
def range_excess(v: Any, o: Any, first: int, group: int, d_h: int, acc: Any) -> tuple[float, float]:
    """With v: keys × (H_kv·d_h), o: queries × (H_kv·g·d_h), query i at position first + i (both
    C-contiguous). Returns the largest excess of any o[i, (h, e, t)] over the running max of v[:first + i + 1,
    (h, t)] or below its running min (differences rounded in the dtype), and max |v|; NaN when any input is
    not finite. Every update is elementwise on row-length arrays (LLVM vectorizes them); the only reductions
    are over those arrays at the end. acc: 5 × (H_kv·d_h) scratch in v's dtype. A running extreme that keeps
    its value stores it as ``m + zero``: every update then stores a new value and LLVM vectorizes it as a
    compare and a blend. Storing the loaded value back let LLVM turn the update into a masked store, which
    AMD's Zen cores run microcoded (models/results/PERFORMANCE.md, stop 52). + 0 changes no value but a −0.0
    into +0.0, a zero's sign, which neither result reads (max and min of the same values; the excess is
    compared with 0). ``zero`` is in the dtype, so float32 stays float32."""
    n_k, width = v.shape
    zero = acc.dtype.type(0.0)
    hi, lo, big, over, bad = acc[0], acc[1], acc[2], acc[3], acc[4]
    for t in range(width):
        hi[t] = -np.inf
        lo[t] = np.inf
        big[t] = 0.0
        over[t] = -np.inf
        bad[t] = 0.0
    blocks = o.shape[1] // d_h
    for j in range(n_k):
        row = v[j]
        for t in range(width):
            x, h, m, b = row[t], hi[t], lo[t], big[t]
            hi[t] = x if x > h else h + zero
            lo[t] = x if x < m else m + zero
            a = abs(x)
            big[t] = a if a > b else b + zero
            bad[t] += x * zero  # 0, or NaN for ±inf and NaN
        i = j - first
        if 0 <= i < o.shape[0]:
            orow = o[i]
            for blk in range(blocks):
                ob, vb = blk * d_h, (blk // group) * d_h
                ys, hs, ls = orow[ob : ob + d_h], hi[vb : vb + d_h], lo[vb : vb + d_h]
                ov, bd = over[vb : vb + d_h], bad[vb : vb + d_h]
                for t in range(d_h):
                    y = ys[t]
                    d1 = y - hs[t]
                    d2 = ls[t] - y
                    e = d1 if d1 > d2 else d2
                    w = ov[t]
                    ov[t] = e if e > w else w + zero
                    bd[t] += y * zero
    worst, vmax, nan = -np.inf, 0.0, 0.0
    for t in range(width):
        worst = max(worst, np.float64(over[t]))
        vmax = max(vmax, np.float64(big[t]))
        nan += bad[t]
    if nan != 0.0:
        return np.nan, np.nan
    return worst, vmax


@jit
def linear_excess(
    yr: Any, xr: Any, bias_r: Any, xnorm: Any, ynorm: Any, a: Any, b: Any, tiny: float
) -> float:
    """A Freivalds check's verdict in one pass: residual e_ic = (yr_ic − xr_ic) − bias_r_c against
    τ_ic = xnorm_i·a_c + ynorm_i·b_c, each rounded as the eager numpy expressions (no contraction).
    Returns max |e_ic| / max(τ_ic, tiny) (0 with no rows), or NaN when a ratio or a τ is not finite"""
    worst, bad = 0.0, False
    for i in range(yr.shape[0]):
        for c in range(yr.shape[1]):
            e = (yr[i, c] - xr[i, c]) - bias_r[c]
            tau = xnorm[i] * a[c] + ynorm[i] * b[c]
            ratio = abs(e) / max(tau, tiny)
            if not (np.isfinite(ratio) and np.isfinite(tau)):
                bad = True
            worst = ratio if ratio > worst else worst
    return np.nan if bad else worst


# base.sum_norm_slack compiled; numba's on-disk cache keys on this file, so after editing that function
# touch this file (or clear the cache) for the kernels that inline it to compile it again (base.NEAR_RANGE
# likewise: freivalds_excess holds its value as a constant, which the torch backend compares with its own)
norm_slack = jit(sum_norm_slack)


@jit
def norm_bound(sq: Any, up: float) -> Any:
    """√sq times ``up`` (a factor that makes it an upper bound of the norm; +inf and NaN stay)"""
    out = np.empty_like(sq)
    for i in range(sq.shape[0]):
        out[i] = np.sqrt(sq[i]) * up
    return out


@jit
def sum_norms(sq: Any, width: int) -> Any:
    """The row norms project64 returns: √ of its float64 sums of ``width`` squares, rounded up by
    base.sum_norm_slack"""
    return norm_bound(sq, norm_slack(width, 2.0**-52))


@jit
def rms_norms(sq: Any, width: int) -> Any:
    """The row norms project64_rms returns: its sums with the RMSNorm's scale folded in (six roundings more
    than a plain sum of squares: the scale and its square), rounded up by base.sum_norm_slack(width + 6)"""
    return norm_bound(sq, norm_slack(width + 6, 2.0**-52))


@jit
def freivalds_fits(
    y: Any,
    rt_y: Any,
    yr: Any,
    ynorm: Any,
    x: Any,
    gain: Any,
    rt_x: Any,
    xr: Any,
    xnorm: Any,
    bias_r: Any,
    a: Any,
    b: Any,
) -> bool:
    """Whether freivalds_excess's arrays fit one another (its kernels index without bounds checks): k = the
    τ terms' vectors, as many as bias·r's and b's; each side its rows with k check vectors as wide, or its
    products (rows × k, rows); one row count; a gain as wide as x (or none)"""
    k = a.shape[0]
    if bias_r.shape[0] != k or b.shape[0] != k:
        return False
    n = y.shape[0] if y.shape[1] != 0 else yr.shape[0]
    if y.shape[1] != 0:
        if rt_y.shape[0] != k or rt_y.shape[1] != y.shape[1]:
            return False
    elif yr.shape[1] != k or ynorm.shape[0] != n:
        return False
    if x.shape[1] != 0:
        bad_gain = gain.shape[0] != 0 and gain.shape[0] != x.shape[1]
        return not (x.shape[0] != n or rt_x.shape[0] != k or rt_x.shape[1] != x.shape[1] or bad_gain)
    fits: bool = xr.shape[0] == n and xr.shape[1] == k and xnorm.shape[0] == n
    return fits


@jit
def freivalds_excess(
    y: Any,
    rt_y: Any,
    yr: Any,
    ynorm: Any,
    x: Any,
    gain: Any,
    eps: float,
    rt_x: Any,
    xr: Any,
    xnorm: Any,
    bias_r: Any,
    a: Any,
    b: Any,
    tiny: float,
    parts: int,
) -> float:
    """A Freivalds check's verdict from the rows: linear_excess of (y·r, ‖y_i‖) and (x̂·W r, ‖x̂_i‖), each
    side by project64 (x̂ = x), or project64_rms (x̂ = RMSNorm(x): ``gain`` not empty), with their norm
    bounds (sum_norms, rms_norms); a side whose rows are empty (0 × 0)
    is given as its products and norms (yr, ynorm / xr, xnorm) instead. The same kernels in the same
    order as the backend's project64, project64_norm and the verifier's linear_excess, so the same value.
    −1 (nothing read) when the arrays do not fit one another (freivalds_fits); NEAR_RANGE when a
    normalized row comes near the dtype's range (project64_rms: the caller composes the check then)"""
    if not freivalds_fits(y, rt_y, yr, ynorm, x, gain, rt_x, xr, xnorm, bias_r, a, b):
        return -1.0
    k = a.shape[0]
    if y.shape[1] != 0:
        yr = np.empty((y.shape[0], k))
        ysq = np.empty(y.shape[0])
        project64(y, rt_y, yr, ysq, parts)
        ynorm = sum_norms(ysq, y.shape[1])
    if x.shape[1] != 0:
        xr = np.empty((x.shape[0], k))
        xsq = np.empty(x.shape[0])
        if gain.shape[0] == 0:
            project64(x, rt_x, xr, xsq, parts)
            xnorm = sum_norms(xsq, x.shape[1])
        else:
            if project64_rms(x, gain, eps, rt_x, xr, xsq, parts):
                return NEAR_RANGE
            xnorm = rms_norms(xsq, x.shape[1])
    return linear_excess(yr, xr, bias_r, xnorm, ynorm, a, b, tiny)


@jit
def gate_up_excess(
    gu: Any,
    rg: Any,
    rd: Any,
    x: Any,
    gain: Any,
    eps: float,
    rt_x: Any,
    y: Any,
    rt_y: Any,
    bias_up: Any,
    a_up: Any,
    b_up: Any,
    bias_down: Any,
    a_down: Any,
    b_down: Any,
    tiny: float,
    parts: int,
) -> tuple[float, float]:
    """A dense MLP reply's two checks: project64_gate_up's products of [gate up] (gu) and of its SwiGLU m,
    with their norm bounds (sum_norms of 2f and f squares), then freivalds_excess of the
    gate/up products against x̂ = RMSNorm(x) (γ = gain) and of the reply y against m's products;
    (−1, −1) (nothing read) when [gate up] and its check vectors do not fit, a −1 verdict when a check's
    arrays do not (freivalds_fits); a NEAR_RANGE first verdict as freivalds_excess's"""
    n, f = gu.shape[0], rd.shape[1]
    if gu.shape[1] != 2 * f or rg.shape[1] != 2 * f:
        return -1.0, -1.0
    out_g, sq_g = np.empty((n, rg.shape[0])), np.empty(n)
    out_d, sq_d = np.empty((n, rd.shape[0])), np.empty(n)
    project64_gate_up(gu, rg, rd, out_g, sq_g, out_d, sq_d, parts)
    none2, none1 = np.empty((0, 0)), np.empty(0)
    up = freivalds_excess(
        none2,
        none2,
        out_g,
        sum_norms(sq_g, 2 * f),
        x,
        gain,
        eps,
        rt_x,
        none2,
        none1,
        bias_up,
        a_up,
        b_up,
        tiny,
        parts,
    )
    down = freivalds_excess(
        y,
        rt_y,
        none2,
        none1,
        none2,
        none1,
        0.0,
        none2,
        out_d,
        sum_norms(sq_d, f),
        bias_down,
        a_down,
        b_down,
        tiny,
        parts,
    )
    return up, down


@jit
def attention_excess(
    dist: Any,
    onorm: Any,
    qnorm: Any,
    kmax: Any,
    vmax: Any,
    pos: Any,
    group: int,
    scale: float,
    d_h: int,
    u: float,
    lam: float,
    u64: float,
    tiny: float,
) -> float:
    """The recomputed attention rows' verdict in one pass: τ of row r, head h (the verifier's attention_tau,
    each operation rounded as its numpy expression, no contraction) and max dist/max(τ, tiny) over them,
    NaN when a ratio or a τ is not finite (as excess_ratio)"""
    worst, bad = 0.0, False
    root = np.sqrt(np.float64(d_h))
    c_score = 2.1 * (root + 2.0)
    for r in range(dist.shape[0]):
        m = np.sqrt(pos[r] + 1.0)
        for h in range(dist.shape[1]):
            smax = qnorm[r, h] * (kmax[r, h // group] * scale)
            vmx = vmax[r, h // group]
            tau = lam * (
                u * ((c_score * smax + 2.0 * (m + 4.0)) * vmx + onorm[r, h])
                + u64 * (m + root) * (smax + 1.0) * vmx
            )
            ratio = abs(dist[r, h]) / max(tau, tiny)
            if not (np.isfinite(ratio) and np.isfinite(tau)):
                bad = True
            worst = ratio if ratio > worst else worst
    return np.nan if bad else worst


def _bit_cast(source: Any, target: Any) -> Any:
    """A compiled function of one ``source`` value: the ``target`` value with the same bits (LLVM's bitcast,
    which vectorizes)"""

    def typer(typingctx: Any, x: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return intrinsic(typer)


_float_bits: Any = _bit_cast(types.float64, types.int64)  # the bits of a float64, as an int64
_bits_float: Any = _bit_cast(types.int64, types.float64)  # the float64 with the bits of an int64


_LOG2E = 1.4426950408889634  # 1 / ln 2
_ROUND = 6755399441055744.0  # 1.5·2⁵²: t + this − this rounds t to an integer (|t| < 2⁵¹), in its low bits
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in 32 bits (k·this exact for |k| < 2²⁰) …
_LN2_LO = 1.90821492927058770002e-10  # … and the rest
#: Taylor coefficients 1/13!, …, 1/1!, 1 of exp(r) for |r| ≤ ln 2 / 2 (remainder < 5e-18 relative)
_EXP_TAYLOR = (
    1.6059043836821613e-10,
    2.08767569878681e-09,
    2.505210838544172e-08,
    2.755731922398589e-07,
    2.7557319223985893e-06,
    2.48015873015873e-05,
    0.0001984126984126984,
    0.001388888888888889,
    0.008333333333333333,
    0.041666666666666664,
    0.16666666666666666,
    0.5,
    1.0,
    1.0,
)


@jit
def exp64(x: float) -> float:
    """Computes e^x in float64 by arithmetic alone, so that a loop of it vectorizes (np.exp in a loop is a
    call to libm's exp per value, which does not): x = k·ln 2 + r, |r| ≤ ln 2 / 2, e^r by its Taylor
    polynomial (Horner), times 2^k built from its bits. Relative error within a few float64 roundings (r's
    reduction, 13 Horner steps of |r| < 0.35; properties/test_verifier_kernels.py bounds it) for −708 ≤ x ≤
    709.78; 0 below −708 (e^x < 3.4e-308 there: an absolute error under float64's smallest normal), inf above;
    NaN for NaN (every comparison below is false for it). Compiled without fast-math flags: reassociating t +
    1.5·2⁵² − 1.5·2⁵² would undo the rounding to an integer"""
    z = -708.0 if x < -708.0 else x
    z = 709.782712893384 if z > 709.782712893384 else z
    t = z * _LOG2E + _ROUND
    kf = t - _ROUND
    k = _float_bits(t) - _float_bits(_ROUND)
    r = (z - kf * _LN2_HI) - kf * _LN2_LO
    c = _EXP_TAYLOR
    p = c[0]
    for i in range(1, len(c)):  # Horner (a constant trip count: LLVM unrolls it)
        p = p * r + c[i]
    e: float = (p * _bits_float((k + 1022) << 52)) * 2.0  # 2^(k − 1)·2: k = 1024 at the top of the range
    if x < -708.0:
        return 0.0
    if x > 709.782712893384:
        return np.inf
    return e


_float32_bits: Any = _bit_cast(types.float32, types.int32)  # the bits of a float32, as an int32
_bits_float32: Any = _bit_cast(types.int32, types.float32)  # the float32 with the bits of an int32
_ROUND32 = np.float32(12582912.0)  # 1.5·2²³: t + this − this rounds t to an integer (|t| < 2²²)
#: e^r for |r| ≤ ln 2 / 2 in float32 as 1 + r + r²·p(r), p of degree 5 (Cephes' expf coefficients: within
#: about one float32 ulp, with the reduction below)
_EXPF_POLY = tuple(
    np.float32(c)
    for c in (
        1.9875691500e-4,
        1.3981999507e-3,
        8.3334519073e-3,
        4.1665795894e-2,
        1.6666665459e-1,
        5.0000001201e-1,
    )
)


@numpy_errors
def expf_neg(z: Any) -> Any:
    """Computes e^z for float32 z ≤ 0 in float32 arithmetic (a loop of it vectorizes, 8 lanes): z = k·ln 2 + r
    with ln 2 in two parts, e^r as _EXPF_POLY reads, times 2^k built from its bits; 0 below −87 (e^z < 1.7e-38
    there, below float32's smallest normal), NaN for NaN"""
    one = np.float32(1.0)
    c = _EXPF_POLY
    lo = np.float32(-87.0)
    x = lo if z < lo else z
    t = x * np.float32(1.44269504) + _ROUND32
    kf = t - _ROUND32
    r = (x - kf * np.float32(0.693359375)) - kf * np.float32(-2.12194440e-4)
    p = c[0]
    for i in range(1, len(c)):
        p = p * r + c[i]
    p = p * r * r + r + one
    k = _float32_bits(t) - _float32_bits(_ROUND32)  # k from t's low bits (no float-to-int conversion)
    e = p * _bits_float32(np.int32((k + 127) << 23))
    return np.float32(0.0) if z < lo else e


def silu_value(x: Any) -> Any:
    """SiLU of one float32 or float64 value in its own precision (compiled: the numba overload below)."""
    raise NotImplementedError("silu_value runs compiled only")


@overload(silu_value, jit_options={"error_model": "numpy"})
def _silu_value(x: Any) -> Any:
    """Computes x·w / (1 + e), e = e^−|x|, w = 1 for x ≥ 0 and e below (ops.silu's form: no overflow for any
    x), each operation rounded in x's dtype: e by expf_neg in float32 (about one ulp), by exp64 in float64"""
    if x == types.float32:

        def silu32(x: Any) -> Any:
            e = expf_neg(-abs(x))
            w = np.float32(1.0) if x >= np.float32(0.0) else e
            return x * w / (np.float32(1.0) + e)

        return silu32
    if x == types.float64:

        def silu64(x: Any) -> Any:
            e = exp64(-abs(x))
            w = 1.0 if x >= 0.0 else e
            return x * w / (1.0 + e)

        return silu64
    return None


@fast
def attention_pairs(
    q: Any,
    k: Any,
    v: Any,
    o: Any,
    pos: Any,
    group: int,
    scale: float,
    out: Any,
    norms: Any,
    part: int,
    parts: int,
) -> None:
    """Fills out[r, h] of attention_rows64 and norms[:, r, h] = (‖o_rh − out_rh‖, ‖o_rh‖, ‖q_rh‖) for the
    (row, KV head) pairs part, part + parts, … (interleaved: a later row attends to more keys, so every chunk
    gets early and late rows alike). A KV head's query heads go four at a time: each key and value row is read
    and widened once for the four, whose sums run side by side (a group of fewer heads, or the last chunk of
    one, fills the rest with zero queries, whose results are not used)"""
    n_r, n_h, d_h = q.shape
    h_kv = n_h // group
    seen = 0
    for r in range(n_r):
        seen = max(seen, pos[r] + 1)
    qv = np.zeros((4, d_h))
    acc = np.empty((4, d_h))
    sc = np.empty((4, seen))
    z = np.empty(4)
    for item in range(part, n_r * h_kv, parts):
        r, g = item // h_kv, item % h_kv
        p = pos[r]
        for h0 in range(g * group, (g + 1) * group, 4):
            w = min(4, (g + 1) * group - h0)  # query heads h0 … h0 + w − 1 in this chunk
            for e in range(4):
                for t in range(d_h):
                    qv[e, t] = q[r, h0 + e, t] if e < w else 0.0
            q0, q1, q2, q3 = qv[0], qv[1], qv[2], qv[3]
            # each sum in a loop that stores nothing: a loop that also stores gets a runtime overlap test
            # from LLVM's vectorizer, and the reassociated sum then took the vector or the scalar order
            # depending on where the arrays happened to lie (the last bits of a run varied)
            for j in range(p + 1):
                kj = k[j, g]
                a0, a1, a2, a3 = 0.0, 0.0, 0.0, 0.0
                for t in range(d_h):
                    x = np.float64(kj[t])
                    a0 += q0[t] * x
                    a1 += q1[t] * x
                    a2 += q2[t] * x
                    a3 += q3[t] * x
                sc[0, j], sc[1, j], sc[2, j], sc[3, j] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            for e in range(4):
                s = sc[e]
                if e >= w:  # an unused lane: weights 0
                    for j in range(p + 1):
                        s[j] = 0.0
                    continue
                top = -np.inf
                for j in range(p + 1):
                    top = max(top, s[j])
                for j in range(p + 1):  # the weights e_j = exp(s_j − max s), vectorized (exp64)
                    s[j] = exp64(s[j] - top)
                zz = 0.0
                for j in range(p + 1):
                    zz += s[j]
                z[e] = zz
            for e in range(4):
                for t in range(d_h):
                    acc[e, t] = 0.0
            c0, c1, c2, c3 = acc[0], acc[1], acc[2], acc[3]
            s0, s1, s2, s3 = sc[0], sc[1], sc[2], sc[3]
            for j in range(p + 1):
                vj = v[j, g]
                e0, e1, e2, e3 = s0[j], s1[j], s2[j], s3[j]
                for t in range(d_h):
                    x = np.float64(vj[t])
                    c0[t] += e0 * x
                    c1[t] += e1 * x
                    c2[t] += e2 * x
                    c3[t] += e3 * x
            for e in range(w):
                h = h0 + e
                ce, qe = acc[e], qv[e]
                for t in range(d_h):
                    ce[t] = ce[t] / z[e]
                    out[r, h, t] = ce[t]
                dd, oo, qq = 0.0, 0.0, 0.0
                for t in range(d_h):
                    y = np.float64(o[r, h, t])
                    dd += (y - ce[t]) * (y - ce[t])
                    oo += y * y
                    qq += qe[t] * qe[t]
                norms[0, r, h] = np.sqrt(dd)
                norms[1, r, h] = np.sqrt(oo)
                norms[2, r, h] = np.sqrt(qq)


@pfast
def attention_rows64(
    q: Any,
    k: Any,
    v: Any,
    o: Any,
    pos: Any,
    group: int,
    scale: float,
    out: Any,
    norms: Any,
    kmax: Any,
    vmax: Any,
    parts: int,
) -> None:
    """Causal attention of a few query rows in float64: q rows × H × d_h at positions pos, k and v
    keys × H_kv × d_h (head h reads KV head h // group). out[r, h] = Σ_{j ≤ pos_r} e_j v_j / Σ e_j,
    e_j = exp(s_j − max s), s_j = scale·(q_rh·k_j); norms[:, r, h] = (‖o_rh − out_rh‖, ‖o_rh‖,
    ‖q_rh‖) for the server's rows o (rows × H × d_h); kmax[r, g] = max_{j ≤ pos_r} ‖k_jg‖ (vmax: of
    v). The (row, head) pairs in ``parts`` chunks."""
    n_r, d_h = q.shape[0], q.shape[2]
    h_kv = k.shape[1]
    seen = 0
    for r in range(n_r):
        seen = max(seen, pos[r] + 1)
    kc = np.empty((seen, h_kv))
    vc = np.empty((seen, h_kv))
    for j in range(seen):
        for g in range(h_kv):
            a, b = 0.0, 0.0
            for t in range(d_h):
                a += np.float64(k[j, g, t]) ** 2
                b += np.float64(v[j, g, t]) ** 2
            a, b = np.sqrt(a), np.sqrt(b)
            kc[j, g] = a if j == 0 or a > kc[j - 1, g] else kc[j - 1, g]
            vc[j, g] = b if j == 0 or b > vc[j - 1, g] else vc[j - 1, g]
    for r in range(n_r):
        for g in range(h_kv):
            kmax[r, g] = kc[pos[r], g]
            vmax[r, g] = vc[pos[r], g]
    if parts == 1:
        attention_pairs(q, k, v, o, pos, group, scale, out, norms, 0, 1)
    else:
        for part in prange(parts):
            attention_pairs(q, k, v, o, pos, group, scale, out, norms, part, parts)


@jit
def attention_check(
    q: Any,
    k: Any,
    v: Any,
    o: Any,
    rows: Any,
    first: int,
    group: int,
    scale: float,
    u: float,
    lam: float,
    u64: float,
    tiny: float,
    ranged: bool,
    parts: int,
) -> tuple[float, float]:
    """An attention reply's two verdicts: queries q and outputs o (queries × H × d_h, query i at position
    first + i), keys and values k, v (keys × H_kv × d_h), all in one dtype, k, v and o C-contiguous (q may
    be a strided view: only the recomputed rows' queries are read, into rows of their own). The range check
    (when ``ranged``, else 0.0): range_excess, its slack λu(√keys + 4)·max|v| and the float verdict of
    excess_ratio on the excess above 0; then the recomputed rows (0.0 with none): attention_rows64 of
    q[rows], o[rows] at positions first + rows, and attention_excess — the same kernels and operations in
    the same order as the verifier's calls one by one, so the same values. (−1, −1), nothing read, when
    the arrays, the rows or the positions do not fit one another
    the tests below form no sum or product that can wrap around in int64: ``first + n_q <= n_k`` let a
    ``first`` near 2⁶³ through, and the recomputed rows then read key norms far outside their array.
    Heads of width 0 are refused too (as verify.range_shapes does): range_excess divides by d_h, and
    such a call raised ZeroDivisionError out of the kernel"""
    n_q, n_h, d_h = q.shape
    n_k, h_kv = k.shape[0], k.shape[1]
    fits = (
        o.shape[0] == n_q
        and o.shape[1] == n_h
        and o.shape[2] == d_h
        and k.shape[2] == d_h
        and v.shape[0] == n_k
        and v.shape[1] == h_kv
        and v.shape[2] == d_h
        and d_h >= 1
        and group >= 1
        and n_h % group == 0
        and n_h // group == h_kv
        and first >= 0
        and (n_q == 0 or first <= n_k - n_q)
        and all_in(rows, n_q)
    )
    if not fits:
        return -1.0, -1.0
    by_range = 0.0
    if ranged:
        acc = np.empty((5, h_kv * d_h), dtype=v.dtype)
        v2, o2 = v.reshape(n_k, h_kv * d_h), o.reshape(n_q, n_h * d_h)
        over, vmax = range_excess(v2, o2, first, group, d_h, acc)
        slack = lam * u * (np.sqrt(np.float64(n_k)) + 4.0) * vmax
        residual = over if over > 0.0 or np.isnan(over) else 0.0
        by_range = abs(residual) / max(slack, tiny) if np.isfinite(slack) else np.nan
        if not np.isfinite(by_range):
            by_range = np.nan
    n_r = rows.shape[0]
    if n_r == 0:
        return by_range, 0.0
    q_rows, o_rows = np.empty((n_r, n_h, d_h), dtype=q.dtype), np.empty((n_r, n_h, d_h), dtype=o.dtype)
    pos = np.empty(n_r, dtype=np.int64)
    for i in range(n_r):
        q_rows[i] = q[rows[i]]
        o_rows[i] = o[rows[i]]
        pos[i] = first + rows[i]
    out, norms = np.empty((n_r, n_h, d_h)), np.empty((3, n_r, n_h))
    kmax, vmax_rows = np.empty((n_r, h_kv)), np.empty((n_r, h_kv))
    attention_rows64(q_rows, k, v, o_rows, pos, group, scale, out, norms, kmax, vmax_rows, parts)
    by_rows = attention_excess(
        norms[0], norms[1], norms[2], kmax, vmax_rows, pos, group, scale, d_h, u, lam, u64, tiny
    )
    return by_range, by_rows


@jit
def lock_check(
    qk: Any,
    new: Any,
    coef: Any,
    kappa: Any,
    sq: Any,
    slack: Any,
    cmax: Any,
    csq: Any,
    s: Any,
    group: int,
    scale: float,
    u: float,
    rope: float,
    lam: float,
    u64: float,
    tiny: float,
) -> tuple[float, Any, Any, Any, Any, Any, Any]:
    """A generation step's scores s (H × m, float64) against a last guard block's locked-cache sketch
    (coef m−1 × k, κ k × H_kv × d_h, Σc²‖K‖² and slack k × H_kv, max|c| and Σc² k) extended by the step's
    key with coefficients ``new`` (k): the sketch extended (new arrays; the given ones are not written)
    and the verdict — lock_scores_excess's numpy expressions (scx_ref.protocol.verify) in loops: max over
    heads h and vectors v of |Σ_j s_hj c'_jv − scale·q_h·κ'_vg| / max(τ_hv, tiny), NaN when a ratio or
    a τ is not finite. qk: the client's RoPE'd [q; k] heads ((H + H_kv) × d_h, float64). −1.0 (and
    empty arrays) when the shapes do not fit one another."""
    n_h, m = s.shape
    k, h_kv, d_h = kappa.shape
    fits = (
        n_h == h_kv * group
        and qk.shape == (n_h + h_kv, d_h)
        and new.shape == (k,)
        and coef.shape == (m - 1, k)
        and sq.shape == (k, h_kv)
        and slack.shape == (k, h_kv)
        and cmax.shape == (k,)
        and csq.shape == (k,)
    )
    if not fits:
        none1, none2 = np.empty(0), np.empty((0, 0))
        return -1.0, none2, np.empty((0, 0, 0)), none2, none2, none1, none1
    # the sketch extended by the appended key (the client's RoPE'd k) with coefficients new
    coef2 = np.empty((m, k))
    coef2[: m - 1] = coef
    coef2[m - 1] = new
    coef_t = coef2.T.copy()  # k × m: each vector's coefficients contiguous
    kappa2, sq2, slack2 = np.empty((k, h_kv, d_h)), np.empty((k, h_kv)), np.empty((k, h_kv))
    cmax2, csq2, kapn = np.empty(k), np.empty(k), np.empty((k, h_kv))
    for g in range(h_kv):
        key = qk[n_h + g]
        kk = sum_squares64(key)
        for v in range(k):
            c = new[v]
            for t in range(d_h):
                kappa2[v, g, t] = kappa[v, g, t] + c * key[t]
            kapn[v, g] = np.sqrt(sum_squares64(kappa2[v, g]))
            sq2[v, g] = sq[v, g] + (c * c) * kk
            slack2[v, g] = slack[v, g] + abs(c) * (rope * np.sqrt(kk))
    for v in range(k):
        cmax2[v] = max(cmax[v], abs(new[v]))
        csq2[v] = csq[v] + new[v] * new[v]
    worst, bad = 0.0, False
    root_m = np.sqrt(np.float64(m))
    c_score = lam * u * (np.sqrt(np.float64(d_h)) + 3.0)
    for h in range(n_h):
        g = h // group
        q, row = qk[h], s[h]
        qs = np.sqrt(sum_squares64(q)) * scale
        snorm = np.sqrt(sum_squares64(row))
        for v in range(k):
            got = dot64(row, coef_t[v])
            want = dot64(q, kappa2[v, g]) * scale
            tau = (
                c_score * qs * np.sqrt(sq2[v, g])
                + lam * u * snorm * cmax2[v]
                + rope * qs * kapn[v, g]
                + qs * slack2[v, g]
                + lam * u64 * root_m * snorm * np.sqrt(csq2[v])
            )
            ratio = abs(got - want) / max(tau, tiny)
            if not (np.isfinite(ratio) and np.isfinite(tau)):
                bad = True
            worst = ratio if ratio > worst else worst
    return (np.nan if bad else worst), coef2, kappa2, sq2, slack2, cmax2, csq2

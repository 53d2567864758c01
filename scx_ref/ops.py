"""numpy reference of the model operations, with Hugging Face ``transformers`` semantics.

Shapes: x is rows × d; q is rows × H × d_h; k, v are rows × H_kv × d_h. Weights follow
``y = x @ W`` (see :mod:`scx_ref.weights`). Every op is row-wise except attention.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ._checks import FloatArray, IntArray, check_int, check_real, float_dtype, token_ids
from .errors import DTypeError, NonFiniteError, ShapeError
from .weights import DenseMLP, LayerWeights, MoEMLP

__all__ = [
    "apply_rope",
    "attention",
    "causal_mask",
    "embed",
    "linear",
    "mlp",
    "moe",
    "qkv",
    "rms_norm",
    "rope_cos_sin",
    "route",
    "silu",
    "softmax",
    "swiglu",
]


def embed(ids: Any, table: npt.ArrayLike) -> FloatArray:
    """Embedding lookup: row i is ``table[ids[i]]``; ids that are not a 1-D integer array of the vocabulary
    raise VocabularyError (:func:`~scx_ref._checks.token_ids`; no ids, no rows), a ``table`` that is not
    vocabulary × d ShapeError."""
    tab = np.asarray(table)
    if tab.ndim != 2:
        raise ShapeError(f"an embedding table must be vocabulary × d, got shape {tab.shape}")
    arr = token_ids(ids, tab.shape[0], allow_empty=True)
    rows: FloatArray = tab[arr]
    return rows


def rms_norm(x: FloatArray, gamma: FloatArray, eps: float) -> FloatArray:
    """RMSNorm_ε(x) = γ ⊙ x / sqrt(mean(x²) + ε), row-wise (LlamaRMSNorm).

    In x's dtype, except float16 (whose x² overflows past |x| = 256, which made a row 0): there, as
    LlamaRMSNorm, x / sqrt(mean(x²) + ε) in float32, cast back to float16, then times γ.
    ShapeError unless ``gamma`` is one gain per entry of a row of ``x``; ConfigError unless ε is a finite
    number >= 0 (a negative or NaN ε gave NaN rows); DTypeError unless ``x`` and ``gamma`` hold real numbers.
    Integer rows are normalised in float64 (x² in their own dtype wrapped: an int32 entry of 50000 gave NaN).
    """
    eps = check_real(eps, "RMSNorm eps", 0)
    x = np.asarray(x)
    for what, arr in (("rows", x), ("gains", np.asarray(gamma))):
        if arr.dtype.kind not in "iuf":
            raise DTypeError(f"RMSNorm: the {what} must be a real array, got dtype {arr.dtype}")
    if np.ndim(x) == 0 or np.shape(gamma) != np.shape(x)[-1:]:
        raise ShapeError(f"RMSNorm of rows {np.shape(x)} with gains {np.shape(gamma)}: one gain per column")
    if x.dtype.kind in "iu":
        x = x.astype(np.float64)
    if getattr(x, "dtype", None) == np.float16:  # float32 and float64 keep their own (exact) arithmetic
        x32 = np.asarray(x, dtype=np.float32)
        mean32 = np.mean(np.square(x32), axis=-1, keepdims=True)
        normed: FloatArray = gamma * (x32 / np.sqrt(mean32 + eps)).astype(np.float16)
        return normed
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    out: FloatArray = gamma * (x / np.sqrt(var + eps))
    return out


def linear(x: FloatArray, w: FloatArray, b: FloatArray | None = None) -> FloatArray:
    """xW + b (row-wise): the one numpy product of rows by a weight matrix (in × out), the reference's and
    :meth:`scx_ref.arrays.NumpyOps.linear`'s. ShapeError when the widths do not match or ``b`` is not one
    entry per output column (or a scalar); DTypeError unless ``x``, ``w`` and ``b`` hold real numbers
    (integers or floats: a string array raised numpy's raw TypeError, a complex or boolean one was
    multiplied).
    """
    for what, arr in (("rows", x), ("weight matrix", w), ("bias", b)):
        if arr is not None and np.asarray(arr).dtype.kind not in "iuf":
            raise DTypeError(f"linear: the {what} must be a real array, got dtype {np.asarray(arr).dtype}")
    if np.ndim(w) != 2 or np.ndim(x) == 0 or np.shape(x)[-1] != np.shape(w)[0]:
        raise ShapeError(
            f"cannot multiply rows of shape {np.shape(x)} by a matrix of shape {np.shape(w)} (in × out)"
        )
    y: FloatArray = x @ w
    if b is not None and np.shape(b) not in ((), (np.shape(w)[1],)):
        raise ShapeError(f"a bias of shape {np.shape(b)} for a matrix of shape {np.shape(w)} (in × out)")
    return y if b is None else y + b


def silu(x: FloatArray) -> FloatArray:
    """SiLU(x) = x·sigmoid(x), without overflow and to a few ulps relative accuracy for every x.

    sigmoid is evaluated from e = exp(−|x|) ∈ (0, 1]: 1/(1+e) for x ≥ 0 and e/(1+e) for x < 0
    (the tanh form 0.5·(1 + tanh(x/2)) loses relative accuracy like eps·e^|x| for negative x).
    −∞ gives NaN (−∞·0) and +∞ gives +∞, as torch's silu does, without a RuntimeWarning: a non-finite entry
    (a hostile reply's) is the caller's to refuse. DTypeError unless ``x`` holds real numbers (integers or
    floats); integers are computed in float64 (−|x| of an unsigned integer wrapped, which made SiLU(5) 0, and
    int8 was computed in float16).
    """
    x = np.asarray(x)
    if x.dtype.kind not in "iuf":
        raise DTypeError(f"SiLU needs a real array, got dtype {x.dtype}")
    if x.dtype.kind in "iu":
        x = x.astype(np.float64)
    e = np.exp(-np.abs(x))
    with np.errstate(invalid="ignore"):
        return x * np.where(x >= 0, 1.0, e) / (1.0 + e)


def softmax(x: FloatArray, axis: int = -1) -> FloatArray:
    """softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m) along ``axis``, m = max_j x_j (numerically stable);
    rows that are all −∞ (fully masked) give zeros instead of NaN, and a row holding NaN or +∞ gives NaN
    throughout, as torch's softmax (a +∞ entry gave NaN there and 0 elsewhere). In x's dtype, except
    float16, computed in float32 and cast back (as Hugging Face's attention and routers: Σ_j overflowed
    float16 past 65504 entries, which gave a row of zeros).

    ShapeError when ``x`` has no such ``axis`` (an integer) or is empty along it (a softmax over nothing);
    DTypeError unless ``x`` holds real numbers (integers or floats)."""
    x = np.asarray(x)
    if x.dtype.kind not in "iuf":
        raise DTypeError(f"softmax needs a real array, got dtype {x.dtype}")
    axis = check_int(axis, "softmax axis", None, error=ShapeError)
    if not -x.ndim <= axis < x.ndim or x.shape[axis] == 0:
        raise ShapeError(f"softmax needs a non-empty axis {axis}, got shape {x.shape}")
    if x.dtype == np.float16:
        wide: FloatArray = softmax(x.astype(np.float32), axis).astype(np.float16)
        return wide
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)  # a row all −∞ (fully masked): zeros; one holding NaN or +∞: NaN
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(s == 0, 1.0, s)


def swiglu(x: FloatArray, w: DenseMLP) -> FloatArray:
    """SwiGLU MLP: (silu(x W_gate) ⊙ x W_up) W_down (ShapeError for rows of another width)."""
    return linear(silu(linear(x, w.w_gate)) * linear(x, w.w_up), w.w_down)


def moe(x: FloatArray, w: MoEMLP, top_k: int) -> FloatArray:
    """Mixtral sparse MoE, row-wise: p = softmax(x W_r); keep the top-k experts of each row,
    renormalise their weights to sum to 1, and return Σ_e p_e·SwiGLU_e(x) — the routing is :func:`route`'s
    (float64; the protocol's), the sum in x's dtype.

    ConfigError unless ``top_k`` is an integer in [1, n_experts] (0 gave zero rows, −1 dropped the last
    expert, more than n_experts used them all); ShapeError for rows of another width than the router's;
    NonFiniteError for router logits that are not finite (no routing). Integer rows are summed in float64
    (in their own dtype each expert's output was truncated to an integer; the dense MLP gave float64).
    """
    top_k = check_int(top_k, "top_k", 1, len(w.experts))
    x = np.asarray(x)
    if x.dtype.kind in "iu":
        x = x.astype(np.float64)
    top, weights = route(linear(x, w.router), top_k)
    out = np.zeros_like(x)
    for e, expert in enumerate(w.experts):
        rows, slot = np.nonzero(top == e)
        if rows.size:
            out[rows] += (weights[rows, slot][:, None] * swiglu(x[rows], expert)).astype(out.dtype)
    return out


def route(logits: Any, top_k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Mixtral routing of router ``logits`` (rows × E): (the top-k expert ids per row, in descending
    probability with ties to the lower id; their :func:`softmax` probabilities renormalised to sum to 1),
    float64.
    ShapeError unless ``logits`` is rows × E with E ≥ 1, ConfigError unless 1 ≤ ``top_k`` ≤ E (fewer or
    more columns would not be k experts), NonFiniteError for a logit that is not finite (no routing),
    DTypeError unless ``logits`` holds real numbers (strings were parsed as numbers, complex ones cut to
    their real part).
    """
    raw = np.asarray(logits)
    if raw.dtype.kind not in "iuf":
        raise DTypeError(f"router logits must be a real array, got dtype {raw.dtype}")
    z = raw.astype(np.float64, copy=False)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ShapeError(f"router logits must be rows × experts (at least one), got shape {z.shape}")
    top_k = check_int(top_k, "top_k", 1, z.shape[1])
    if not np.isfinite(z).all():
        raise NonFiniteError("router logits hold NaN or ±Inf")
    probs = cast("npt.NDArray[np.float64]", softmax(z, axis=-1))  # float64, as z is
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k].astype(np.int64)
    weights = np.take_along_axis(probs, top, axis=-1)
    weights /= weights.sum(axis=-1, keepdims=True)
    return top, weights


def mlp(x: FloatArray, w: DenseMLP | MoEMLP, top_k: int) -> FloatArray:
    """The block's MLP: dense SwiGLU or MoE."""
    return moe(x, w, top_k) if isinstance(w, MoEMLP) else swiglu(x, w)


def qkv(
    x: FloatArray, lw: LayerWeights, n_heads: int, n_kv_heads: int, head_dim: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Q, K, V projections (with the Qwen2 bias when present), split into heads.

    ShapeError when ``x`` is not rows × d, a head count or ``head_dim`` is not an integer >= 1, or the
    projections' widths are not ``n_heads``/``n_kv_heads`` × ``head_dim``."""
    n_heads = check_int(n_heads, "n_heads", 1, error=ShapeError)
    n_kv_heads = check_int(n_kv_heads, "n_kv_heads", 1, error=ShapeError)
    head_dim = check_int(head_dim, "head_dim", 1, error=ShapeError)
    if np.ndim(x) != 2:
        raise ShapeError(f"Q/K/V projections need rows × d, got shape {np.shape(x)}")
    if lw.wq.shape[-1] != n_heads * head_dim or lw.wk.shape[-1] != n_kv_heads * head_dim:
        raise ShapeError(
            f"Q/K projections of widths {lw.wq.shape[-1]}/{lw.wk.shape[-1]} do not split into "
            f"{n_heads}/{n_kv_heads} heads of {head_dim}"
        )
    if lw.wv.shape[-1] != n_kv_heads * head_dim:
        raise ShapeError(f"V projection of width {lw.wv.shape[-1]} does not split into {n_kv_heads} heads")
    n = x.shape[0]
    q = linear(x, lw.wq, lw.bq).reshape(n, n_heads, head_dim)
    k = linear(x, lw.wk, lw.bk).reshape(n, n_kv_heads, head_dim)
    v = linear(x, lw.wv, lw.bv).reshape(n, n_kv_heads, head_dim)
    return q, k, v


def rope_cos_sin(
    positions: IntArray, head_dim: int, theta: float, dtype: npt.DTypeLike = np.float64
) -> tuple[FloatArray, FloatArray]:
    """cos, sin tables (rows × d_h) of HF's default RoPE: inv_freq_i = θ^(−2i/d_h), duplicated halves.

    ``positions`` is 1-D and ``head_dim`` even (ShapeError otherwise); θ a finite number > 0 (ConfigError);
    ``dtype`` floating and positions numbers (DTypeError: an integer dtype truncated the tables to 0 and 1).
    """
    dtype = float_dtype(dtype, "RoPE dtype")
    if check_int(head_dim, "RoPE's head_dim", 0, error=ShapeError) % 2:
        raise ShapeError(f"RoPE needs an even head_dim, got {head_dim!r}")
    theta = check_real(theta, "RoPE theta", 0, lo_open=True)
    if np.ndim(positions) != 1:
        raise ShapeError(f"RoPE positions must be one-dimensional, got shape {np.shape(positions)}")
    if np.asarray(positions).dtype.kind not in "iuf":
        raise DTypeError(f"RoPE positions must be numbers, got dtype {np.asarray(positions).dtype}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: FloatArray, positions: IntArray, theta: float) -> FloatArray:
    """RoPE with HF's ``rotate_half`` convention: x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁].

    x is rows × heads × d_h (d_h even); ``positions`` gives each row's absolute position, one per row
    (ShapeError otherwise), x floating (DTypeError: an integer x got tables truncated to 0 and 1).
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise DTypeError(f"RoPE input must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 3:
        raise ShapeError(f"RoPE input must be rows × heads × head_dim, got {x.shape}")
    if np.shape(positions) != x.shape[:1]:
        raise ShapeError(
            f"RoPE needs one position per row: {x.shape[0]} rows, positions {np.shape(positions)}"
        )
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, x.dtype)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_mask(n_q: int, n_k: int, offset: int | None = None) -> npt.NDArray[np.bool_]:
    """Boolean n_q × n_k mask: query i sees key j iff j ≤ i + offset (default offset n_k − n_q).

    ShapeError unless n_q and n_k are integers >= 0 and ``offset`` None or an integer."""
    n_q = check_int(n_q, "causal_mask n_q", 0, error=ShapeError)
    n_k = check_int(n_k, "causal_mask n_k", 0, error=ShapeError)
    off = n_k - n_q if offset is None else check_int(offset, "causal_mask offset", None, error=ShapeError)
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + off


def attention(
    q: FloatArray,
    k: FloatArray,
    v: FloatArray,
    *,
    mask: npt.NDArray[np.bool_] | None = None,
    scale: float | None = None,
) -> FloatArray:
    """softmax(q kᵀ·s + M) v per head, with GQA (query head h uses KV head h // (H / H_kv)).

    ``mask`` is a boolean n_q × n_k array (True = may attend; None = attend to all). Returns
    n_q × H × d_h. Default scale s = 1/√d_h. A query row's head with a NaN or ±inf entry gives NaN in that
    row's head (its scores are NaN or ±∞: all −∞, they read as a row that sees no key and gave zeros).

    ShapeError unless q, k, v are 3-D with H a multiple of H_kv ≥ 1, k and v of the same rows (≥ 1) and
    heads, q and k of the same d_h, and ``mask`` of shape n_q × n_k; DTypeError unless q, k, v are real
    (integer or floating) arrays and ``mask`` boolean (an additive 0/−∞ float mask, read as truth values,
    attended exactly where it bars); ConfigError unless ``scale`` is None or a finite number. Integer q, k, v
    are computed in float64 (q·kᵀ in int8 wrapped, which moved the attention to other keys).
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    for what, arr in (("q", q), ("k", k), ("v", v)):
        if arr.dtype.kind not in "iuf":
            raise DTypeError(f"attention {what} must be a real array, got dtype {arr.dtype}")
    q, k, v = (a.astype(np.float64) if a.dtype.kind in "iu" else a for a in (q, k, v))
    if scale is not None:
        scale = check_real(scale, "attention scale")
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ShapeError(
            f"attention needs 3-D q, k, v (rows × heads × head_dim), got {q.shape}, {k.shape}, {v.shape}"
        )
    n_q, n_heads, d_h = q.shape
    n_kv = k.shape[1]
    if n_kv == 0 or n_heads % n_kv or v.shape[:2] != k.shape[:2] or k.shape[2] != d_h or k.shape[0] == 0:
        raise ShapeError(f"incompatible attention shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:  # an additive 0/−inf mask (HF's) read as booleans attended where barred
            raise DTypeError(f"attention mask must be boolean (True = may attend), got dtype {mask.dtype}")
        if mask.shape != (n_q, k.shape[0]):
            raise ShapeError(
                f"attention mask must be {n_q} × {k.shape[0]} (queries × keys), got {mask.shape}"
            )
    g = n_heads // n_kv
    s = float(1.0 / np.sqrt(d_h)) if scale is None else float(scale)  # a Python float keeps float32
    qg = q.reshape(n_q, n_kv, g, d_h)
    scores = np.einsum("qhgd,khd->hgqk", qg, k) * s
    if mask is not None:
        scores = np.where(mask[None, None], scores, -np.inf)
    probs = softmax(scores, axis=-1)
    out = np.einsum("hgqk,khd->qhgd", probs, v)
    result: FloatArray = out.reshape(n_q, n_heads, v.shape[-1])
    finite = np.isfinite(q).all(axis=-1, keepdims=True)
    if not finite.all():
        result = np.where(finite, result, np.nan).astype(result.dtype, copy=False)
    return result

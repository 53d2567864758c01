"""L1 sensitivities of the rows SCX blinds, computed from a model's own weights (DESIGN §7).

Notation: ``x̂ = RMSNorm(x) = γ ⊙ x / √(mean(x²) + eps)`` for a row x ∈ ℝ^d (x ≠ 0 when eps = 0).
Every bound here is *data-independent*: it holds for every input row, so it is a valid L1 sensitivity
Δ₁ = sup ‖f(x) − f(x')‖₁ for the Laplace mechanism of :mod:`.mechanisms`, whatever the neighbouring
relation. Each function's docstring states the inequality it implements.

Core inequalities (eps = 0; eps > 0 only divides by a larger number, so every bound still holds):

- ``‖x̂‖₂ = ‖γ ⊙ x‖₂ / rms(x) ≤ ‖γ‖∞ ‖x‖₂ / (‖x‖₂/√d) = √d ‖γ‖∞``;
- ``‖x̂‖₁ = Σ|γ_k||x_k| / rms(x) ≤ ‖γ‖₂ ‖x‖₂ / (‖x‖₂/√d) = √d ‖γ‖₂`` (Cauchy–Schwarz);
- hence ``‖x̂ − x̂'‖₁ ≤ ‖x̂‖₁ + ‖x̂'‖₁ ≤ 2√d ‖γ‖₂``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from .._checks import as_float_array, check_real
from ..errors import ConfigError, NonFiniteError, ShapeError
from ..weights import DenseMLP, LayerWeights, ModelWeights
from ._validate import check_count, check_nonnegative

__all__ = [
    "LayerSensitivities",
    "ModelSensitivities",
    "attention_output_l1_bound",
    "embedding_l1_diameter",
    "l1_diameter",
    "model_sensitivities",
    "normalize_rows",
    "rmsnorm_l1_bound",
    "rmsnorm_l2_bound",
    "rmsnorm_sensitivity",
    "swiglu_down_l1_bound",
]

FloatArray = npt.NDArray[np.float64]
Backend = Literal["auto", "numpy", "torch"]


def _gamma(gamma: Any) -> FloatArray:
    g = as_float_array(gamma, "gamma", ndim=1).astype(np.float64)
    if g.size == 0:
        raise ShapeError("gamma must not be empty")
    return g


def normalize_rows(x: Any, gamma: Any, eps: float = 0.0) -> FloatArray:
    """RMSNorm of each row, in float64: ``γ ⊙ x / √(mean(x²) + eps)`` (the model's row-wise norm).

    ``x`` has at least one dimension, the last of size ``len(γ)``. The norm is computed without overflow
    or underflow across the whole float64 range (each row is scaled by its largest |x_k| before squaring),
    so rows of 1e200 or 1e-200 normalize like rows of 1. Raises ShapeError for a 0-d ``x`` or a wrong last
    dimension, ConfigError for an all-zero row when eps = 0, NonFiniteError for non-finite inputs or an
    output beyond the float64 range (a huge γ).
    """
    g = _gamma(gamma)
    arr = as_float_array(x, "x").astype(np.float64)
    if arr.ndim == 0:
        raise ShapeError(f"x must have at least one dimension (rows of length {g.shape[0]}), got a scalar")
    if arr.shape[-1] != g.shape[0]:
        raise ShapeError(f"x must have last dimension {g.shape[0]}, got shape {arr.shape}")
    e = check_nonnegative(eps, "eps")
    scale = np.max(np.abs(arr), axis=-1, keepdims=True) if arr.size else np.zeros((*arr.shape[:-1], 1))
    zero = scale == 0.0
    if e == 0.0 and np.any(zero):
        raise ConfigError("RMSNorm of an all-zero row is undefined when eps = 0")
    safe = np.where(zero, 1.0, scale)
    with np.errstate(under="ignore"):
        y = arr / safe  # |y| <= 1 with max |y_k| = 1: y² neither overflows nor loses the row
        q = np.mean(y * y, axis=-1, keepdims=True)  # in [1/d, 1]
    with np.errstate(over="ignore", under="ignore"):
        if e == 0.0:  # x / rms(x) = y / √q exactly, whatever the row's scale
            ratio = y / np.sqrt(q)
        else:  # √(mean(x²) + eps) = hypot(s·√q, √eps), s = max|x_k|: no overflow; √eps ≥ 1e-162 dominates
            denom = np.hypot(scale * np.sqrt(q), math.sqrt(e))  # any subnormal s·√q
            ratio = np.where(zero, 0.0, arr / np.where(zero, 1.0, denom))
        out: FloatArray = g * ratio
    if not np.all(np.isfinite(out)):
        raise NonFiniteError("RMSNorm output exceeds the float64 range (gamma too large)")
    return out


def _l2(v: FloatArray) -> float:
    """‖v‖₂ without underflow or overflow (scaled by max |v_k|)."""
    m = float(np.max(np.abs(v))) if v.size else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float(np.linalg.norm(v / m))


def rmsnorm_l2_bound(gamma: Any) -> float:
    """``‖RMSNorm(x)‖₂ ≤ √d ‖γ‖∞`` for every row x (any eps ≥ 0)."""
    g = _gamma(gamma)
    return math.sqrt(g.size) * float(np.max(np.abs(g)))


def rmsnorm_l1_bound(gamma: Any) -> float:
    """``‖RMSNorm(x)‖₁ ≤ √d ‖γ‖₂`` for every row x (Cauchy–Schwarz; any eps ≥ 0)."""
    g = _gamma(gamma)
    return math.sqrt(g.size) * _l2(g)


def rmsnorm_sensitivity(gamma: Any) -> float:
    """L1 sensitivity of a normalized row: ``‖RMSNorm(x) − RMSNorm(x')‖₁ ≤ 2√d ‖γ‖₂`` for all x, x'."""
    return 2.0 * rmsnorm_l1_bound(gamma)


# --------------------------------------------------------------------------- exact L1 diameter


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _diameter_numpy(x: FloatArray, chunk: int) -> tuple[float, int, int]:
    v, d = x.shape
    # v >= 2 (l1_diameter answers one row itself): the pair (0, 1) stands until a larger distance, so
    # identical rows give two rows i < j, as on torch, never the diagonal pair (0, 0) a distance of 0 was
    best, bi, bj = 0.0, 0, 1
    for start in range(0, v, chunk):
        a = x[start : start + chunk]
        b = x[start:]
        dist = np.zeros((a.shape[0], b.shape[0]))
        with np.errstate(over="ignore"):  # a distance beyond the float64 range is +inf (its correct rounding)
            for k in range(d):  # one coordinate at a time keeps memory at chunk × V
                dist += np.abs(a[:, k, None] - b[None, :, k])
        idx = int(np.argmax(dist))
        i, j = divmod(idx, dist.shape[1])
        if dist[i, j] > best:
            best, bi, bj = float(dist[i, j]), start + i, start + j
    return best, bi, bj


def _torch_device(device: str | None) -> Any:
    import torch

    if device is not None and not isinstance(device, str):
        raise ConfigError(f"device must be a torch device name such as 'cpu' or 'cuda', got {device!r}")
    try:
        dev = torch.device(device or "cpu")
        torch.zeros(1, device=dev)  # fails here, not mid-computation, for a device that is not available
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(f"device {device!r} is not a usable torch device: {exc}") from None
    return dev


def _diameter_torch(x: FloatArray, chunk: int, device: str | None) -> tuple[float, int, int]:
    import torch

    dev = _torch_device(device)
    v, d = x.shape
    # The float32 screen runs on x·2^k, with k chosen so that max |x| lands in [2^40, 2^41): every scaled
    # distance stays far below the float32 maximum (no inf, hence no NaN), whatever the magnitude of x.
    # (Without the scaling, |x| > 3.4e38 cast to inf and the screen kept no candidate row at all.)
    # Scaling by a power of two changes no relative rounding of normal numbers; what it pushes below the
    # float32 normal range has absolute error < 2^-126 per coordinate, covered by the tolerance below.
    top = float(np.max(np.abs(x)))
    k = 0 if top == 0.0 else 41 - math.frexp(top)[1]
    xs = np.empty((v, d), dtype=np.float32)
    step = max(1, 2**22 // max(d, 1))
    with np.errstate(under="ignore"):
        for start in range(0, v, step):  # in slices: no float64 copy of the whole table
            xs[start : start + step] = np.ldexp(x[start : start + step], k)
    x32 = torch.from_numpy(xs).to(dev)
    # Pass 1 (float32 screen): the largest distance from row i to rows j ≥ i, in units of 2^-k.
    rowmax = np.empty(v)
    for start in range(0, v, chunk):
        dist = torch.cdist(x32[start : start + chunk], x32[start:], p=1.0)
        rowmax[start : start + dist.shape[0]] = dist.max(dim=1).values.double().cpu().numpy()
    # float32 error of one distance ≤ (d + 2)·2⁻²⁴·(‖a‖₁ + ‖b‖₁) + (2d)·2⁻¹²⁶ (underflow); keep every row that
    # could hold the max.
    l1max = float(np.max(np.sum(np.abs(xs), axis=1, dtype=np.float64)))
    tol = (d + 2) * 2.0**-24 * 2.0 * l1max + 2.0 * d * 2.0**-126
    if np.all(np.isfinite(rowmax)):
        candidates = np.flatnonzero(rowmax >= rowmax.max() - 2.0 * tol)
    else:  # cannot happen after the scaling; never let a NaN screen drop the maximising row
        candidates = np.arange(v)
    # Pass 2 (float64, exact, on the unscaled rows): the candidate rows against every row after them.
    x64 = torch.from_numpy(x).to(dev)
    best, bi, bj = 0.0, 0, 1
    for c in candidates:
        if c + 1 >= v:
            continue
        dist = torch.sum(torch.abs(x64[c + 1 :] - x64[c]), dim=1)  # overflows to +inf like numpy
        j = int(torch.argmax(dist))
        val = float(dist[j])
        if val > best:
            best, bi, bj = val, int(c), int(c) + 1 + j
    return best, bi, bj


@overload
def l1_diameter(
    rows: Any,
    *,
    backend: Backend = ...,
    chunk_size: int | None = ...,
    device: str | None = ...,
    return_pair: Literal[False] = ...,
) -> float: ...


@overload
def l1_diameter(
    rows: Any,
    *,
    backend: Backend = ...,
    chunk_size: int | None = ...,
    device: str | None = ...,
    return_pair: Literal[True],
) -> tuple[float, int, int]: ...


def l1_diameter(
    rows: Any,
    *,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    device: str | None = None,
    return_pair: bool = False,
) -> float | tuple[float, int, int]:
    """Exact L1 diameter ``max_{i<j} ‖rows_i − rows_j‖₁`` of a set of rows (0.0 for one row).

    Brute force over all V(V−1)/2 pairs, vectorised in chunks of rows. ``backend="torch"`` (the default
    when torch is installed) screens in float32 with ``torch.cdist(p=1)`` — on the rows scaled by a power of
    two so that no magnitude overflows or vanishes in float32 — and then recomputes, in float64, every row
    whose float32 maximum lies within the float32 error bound of the best one, so the result is the float64
    value of the true maximising pair; both backends agree for any finite rows. The result is never
    negative; it is +inf when the diameter exceeds the float64 range; ShapeError for no rows or rows of
    no columns. ``device`` may name a torch device ("cuda"); an unknown or unavailable one raises
    ConfigError. ``return_pair=True`` also returns the maximising indices (i, j).
    """
    x = as_float_array(rows, "rows", ndim=2).astype(np.float64)
    v, d = x.shape
    if v == 0:
        raise ShapeError("rows must hold at least one row")
    if d == 0:
        raise ShapeError(f"rows must have at least one column, got shape {x.shape}")
    chunk = check_count(chunk_size, "chunk_size") if chunk_size is not None else max(1, 2**25 // max(v, 1))
    if backend not in ("auto", "numpy", "torch"):
        raise ConfigError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if backend == "torch" and not _torch_available():
        raise ConfigError("backend='torch' needs torch, which is not installed (use backend='numpy')")
    if v == 1:
        result: tuple[float, int, int] = (0.0, 0, 0)
    elif backend == "torch" or (backend == "auto" and _torch_available()):
        result = _diameter_torch(x, chunk, device)
    else:
        result = _diameter_numpy(x, max(1, min(chunk, 2**22 // max(v, 1))))
    return result if return_pair else result[0]


def embedding_l1_diameter(
    weights: ModelWeights,
    *,
    normalized: bool = True,
    backend: Backend = "auto",
    device: str | None = None,
) -> float:
    """Exact L1 sensitivity of the block-1 input row over the vocabulary.

    ``normalized=True``: ``max_{a≠b} ‖RMSNorm₁(E_a) − RMSNorm₁(E_b)‖₁`` with block 1's attn_norm γ and the
    model's rms_eps — the row the block-1 QKV stage blinds (the paper's block-1 input); it is ≤
    ``2√d‖γ₁‖₂``. ``normalized=False``: the same over the raw embedding rows E_a. ConfigError unless
    ``weights`` is :class:`~scx_ref.weights.ModelWeights` and ``normalized`` a bool.
    """
    if not isinstance(weights, ModelWeights):
        raise ConfigError(f"weights must be ModelWeights, got {type(weights).__name__}")
    if not isinstance(normalized, bool | np.bool_):
        got = f"{type(normalized).__name__} {normalized!r:.40}"
        raise ConfigError(f"normalized must be True or False, got {got}")
    rows = weights.embed.astype(np.float64)
    if normalized:
        rows = normalize_rows(rows, weights.layers[0].attn_norm, weights.config.rms_eps)
    return l1_diameter(rows, backend=backend, device=device)


# --------------------------------------------------------------------------- operator-norm bounds


def _opnorm(w: Any) -> float:
    return float(np.linalg.norm(np.asarray(w, dtype=np.float64), 2))


def _product(*factors: float) -> float:
    """The product of non-negative factors of a bound, 0.0 when one of them is 0.

    A factor of +inf is a finite quantity beyond the float64 range (an overflowed ‖γ‖ or norm), so a zero
    factor (an all-zero weight block) makes the true product 0, not the NaN of ``0 · inf``.
    """
    if any(f == 0.0 for f in factors):
        return 0.0
    return math.prod(factors)


def attention_output_l1_bound(layer: LayerWeights, n_heads: int, n_kv_heads: int, head_dim: int) -> float:
    """L1 sensitivity of the attention output row fed to W_o (the O stage's input).

    Derivation: x̂ = RMSNorm(x; γ_attn) has ``‖x̂‖₂ ≤ √d ‖γ_attn‖∞``. For KV head g the value rows are
    ``v = x̂ W_v[:, g] (+ b_v[g])``, so ``‖v‖₂ ≤ B_g = ‖W_v[:, g]‖₂ · √d ‖γ_attn‖∞ + ‖b_v[g]‖₂``
    (‖·‖₂ of a matrix is its operator norm). A query head's output is a convex combination of its KV head's
    value rows (softmax weights), so it stays in that L2 ball: ``‖o_h‖₂ ≤ B_g``, hence
    ``‖o_h‖₁ ≤ √d_h B_g``. Summing over the H query heads: ``‖o‖₁ ≤ Σ_h √d_h B_{g(h)}``, and
    ``Δ₁ ≤ 2 Σ_h √d_h B_{g(h)}``.

    The head geometry must be the layer's: ``n_heads`` a multiple of ``n_kv_heads`` (≥ 1), ``W_q`` with
    ``n_heads·head_dim`` columns, ``W_v`` (and ``b_v``) with ``n_kv_heads·head_dim``; otherwise ConfigError
    / ShapeError (a bound for another geometry would not bound this layer's output).
    """
    if not isinstance(layer, LayerWeights):
        raise ConfigError(f"layer must be LayerWeights, got {type(layer).__name__}")
    h = check_count(n_heads, "n_heads")
    h_kv = check_count(n_kv_heads, "n_kv_heads")
    d_h = check_count(head_dim, "head_dim")
    if h % h_kv:
        raise ConfigError(f"n_heads ({h}) must be a multiple of n_kv_heads ({h_kv})")
    x_l2 = rmsnorm_l2_bound(layer.attn_norm)
    d = np.asarray(layer.attn_norm).shape[0]
    wv = as_float_array(layer.wv, "layer.wv", ndim=2)
    wq = as_float_array(layer.wq, "layer.wq", ndim=2)
    if wv.shape != (d, h_kv * d_h):
        raise ShapeError(
            f"layer.wv has shape {wv.shape}, expected ({d}, n_kv_heads·head_dim = {h_kv}·{d_h}); "
            "n_kv_heads / head_dim do not match the layer"
        )
    if wq.shape != (d, h * d_h):
        raise ShapeError(
            f"layer.wq has shape {wq.shape}, expected ({d}, n_heads·head_dim = {h}·{d_h}); "
            "n_heads / head_dim do not match the layer"
        )
    bv = None if layer.bv is None else as_float_array(layer.bv, "layer.bv", ndim=1).astype(np.float64)
    if bv is not None and bv.shape[0] != h_kv * d_h:
        raise ShapeError(f"layer.bv has length {bv.shape[0]}, expected n_kv_heads·head_dim = {h_kv * d_h}")
    group = h // h_kv
    total = 0.0
    for g in range(h_kv):
        cols = slice(g * d_h, (g + 1) * d_h)
        b = _product(_opnorm(wv[:, cols]), x_l2)
        if bv is not None:
            b += _l2(bv[cols])
        total += group * math.sqrt(d_h) * b
    return 2.0 * total


def swiglu_down_l1_bound(mlp: DenseMLP, mlp_norm: Any) -> float:
    """L1 sensitivity of the SwiGLU product ``u = silu(x̂ W_gate) ⊙ (x̂ W_up)`` fed to the down projection.

    Derivation: with a = x̂ W_gate, b = x̂ W_up: ``|silu(a_j)| = |a_j| σ(a_j) ≤ |a_j|``, so
    ``‖u‖₁ ≤ Σ_j |a_j||b_j| ≤ ‖a‖₂ ‖b‖₂`` (Cauchy–Schwarz) ``≤ ‖W_gate‖₂ ‖W_up‖₂ ‖x̂‖₂²
    ≤ ‖W_gate‖₂ ‖W_up‖₂ · d ‖γ_mlp‖∞²``, and ``Δ₁ ≤ 2 ‖W_gate‖₂ ‖W_up‖₂ d ‖γ_mlp‖∞²``.
    ``mlp`` must be a :class:`~scx_ref.weights.DenseMLP` whose W_gate and W_up are d × f with d = len(γ_mlp)
    (ConfigError / ShapeError otherwise).
    """
    if not isinstance(mlp, DenseMLP):
        raise ConfigError(f"mlp must be DenseMLP (one expert), got {type(mlp).__name__}")
    x_l2 = rmsnorm_l2_bound(mlp_norm)
    d = _gamma(mlp_norm).shape[0]
    w_gate = as_float_array(mlp.w_gate, "mlp.w_gate", ndim=2)
    w_up = as_float_array(mlp.w_up, "mlp.w_up", ndim=2)
    if w_gate.shape[0] != d or w_up.shape != w_gate.shape:
        raise ShapeError(
            f"mlp.w_gate {w_gate.shape} and mlp.w_up {w_up.shape} must both be (d, f) with "
            f"d = len(mlp_norm) = {d}"
        )
    return _product(2.0, _opnorm(w_gate), _opnorm(w_up), x_l2, x_l2)


# --------------------------------------------------------------------------- per-model summary


def _check_sensitivity(value: Any, name: str) -> float:
    """A Δ₁ field: a real number >= 0, +inf allowed (an overflowing bound); NaN refused (NonFiniteError)."""
    return check_real(value, name, 0, allow_inf=True, nonfinite_error=NonFiniteError)


@dataclass(frozen=True)
class LayerSensitivities:
    """L1 sensitivities (Δ₁) of the four blinded inputs of one block (0-based ``layer``).

    ``qkv``: 2√d‖γ_attn‖₂; ``o``: :func:`attention_output_l1_bound`; ``gate_up``: 2√d‖γ_mlp‖₂;
    ``down``: :func:`swiglu_down_l1_bound` (max over experts for a mixture of experts).
    """

    layer: int
    qkv: float
    o: float
    gate_up: float
    down: float

    def __post_init__(self) -> None:
        """ConfigError unless ``layer`` is an integer >= 0 and each Δ₁ a real number >= 0 (+inf allowed:
        an overflowing bound); NonFiniteError for NaN."""
        check_count(self.layer, "layer", minimum=0)
        for name in ("qkv", "o", "gate_up", "down"):
            _check_sensitivity(getattr(self, name), name)


@dataclass(frozen=True)
class ModelSensitivities:
    """Every Δ₁ the budget needs, so a budget can be computed without the weights.

    ``embed_normalized_diameter`` is the exact block-1 QKV Δ₁ (None when not computed, in which case the
    block-1 bound ``layers[0].qkv`` is used); ``embed_raw_diameter`` is reported for reference.
    """

    name: str
    hidden_size: int
    vocab_size: int
    n_layers: int
    layers: tuple[LayerSensitivities, ...]
    lm_head: float
    embed_normalized_diameter: float | None = None
    embed_raw_diameter: float | None = None
    notes: tuple[str, ...] = field(default=())
    n_experts: int = 0

    def __post_init__(self) -> None:
        """ConfigError unless the sizes are integers >= 1 (``n_experts`` >= 0), ``layers`` is a tuple or list
        of ``n_layers`` :class:`LayerSensitivities` in block order (``layers[i].layer == i``), ``name`` and
        ``notes`` strings and every Δ₁ a real number >= 0 (+inf allowed; None for the optional diameters);
        NonFiniteError for NaN. A budget indexes ``layers`` by block, so a short, mistyped or reordered one
        must not get that far."""
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {type(self.name).__name__} {self.name!r:.40}")
        n = check_count(self.n_layers, "n_layers")
        check_count(self.hidden_size, "hidden_size")
        check_count(self.vocab_size, "vocab_size")
        check_count(self.n_experts, "n_experts", minimum=0)
        if not isinstance(self.layers, tuple | list) or len(self.layers) != n:
            got = (
                f"{len(self.layers)} entries"
                if isinstance(self.layers, tuple | list)
                else type(self.layers).__name__
            )
            raise ConfigError(f"layers must be a tuple of n_layers = {n} LayerSensitivities, got {got}")
        for i, ls in enumerate(self.layers):
            if not isinstance(ls, LayerSensitivities):
                raise ConfigError(f"layers must hold LayerSensitivities, got {type(ls).__name__}")
            if ls.layer != i:  # the budget would read block i's Δ₁ from another block's entry
                raise ConfigError(f"layers must be in block order: layers[{i}] is for layer {ls.layer}")
        _check_sensitivity(self.lm_head, "lm_head")
        for name in ("embed_normalized_diameter", "embed_raw_diameter"):
            if getattr(self, name) is not None:
                _check_sensitivity(getattr(self, name), name)
        if not isinstance(self.notes, tuple | list) or not all(isinstance(x, str) for x in self.notes):
            raise ConfigError(f"notes must be a tuple of strings, got {self.notes!r:.60}")

    @property
    def is_moe(self) -> bool:
        """Whether the blocks' MLPs are mixtures of experts (their blinded pieces are per expert)."""
        return self.n_experts > 0

    @property
    def block1_qkv(self) -> float:
        """Δ₁ of the block-1 QKV input: the exact normalized-embedding diameter when known, else the bound."""
        if self.embed_normalized_diameter is not None:
            return self.embed_normalized_diameter
        return self.layers[0].qkv

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["layers"] = [asdict(ls) for ls in self.layers]
        out["notes"] = list(self.notes)
        return out


def model_sensitivities(
    weights: ModelWeights,
    *,
    embedding: Literal["exact", "bound"] = "exact",
    backend: Backend = "auto",
    device: str | None = None,
) -> ModelSensitivities:
    """All the Δ₁ of :class:`ModelSensitivities` from a model's weights.

    ``embedding="exact"`` computes the normalized and raw embedding diameters (O(V²d) each; measured for
    V = 49152, d = 576 with torch on CPU: about 9.4 CPU-minutes per diameter, so pass ``device="cuda"`` or
    cache the result), ``"bound"`` skips them and uses 2√d‖γ₁‖₂. ``backend`` is checked either way
    (ConfigError), so a misspelled one is not silently ignored by ``"bound"``.
    """
    if not isinstance(weights, ModelWeights):
        raise ConfigError(f"weights must be ModelWeights, got {type(weights).__name__}")
    if embedding not in ("exact", "bound"):
        raise ConfigError(f"embedding must be 'exact' or 'bound', got {embedding!r}")
    if backend not in ("auto", "numpy", "torch"):
        raise ConfigError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    c = weights.config
    layers = []
    for i, lw in enumerate(weights.layers):
        experts = lw.mlp.experts if not isinstance(lw.mlp, DenseMLP) else [lw.mlp]
        layers.append(
            LayerSensitivities(
                layer=i,
                qkv=rmsnorm_sensitivity(lw.attn_norm),
                o=attention_output_l1_bound(lw, c.n_heads, c.n_kv_heads, c.head_dim),
                gate_up=rmsnorm_sensitivity(lw.mlp_norm),
                down=max(swiglu_down_l1_bound(ex, lw.mlp_norm) for ex in experts),
            )
        )
    norm_d: float | None = None
    raw_d: float | None = None
    if embedding == "exact":
        norm_d = embedding_l1_diameter(weights, normalized=True, backend=backend, device=device)
        raw_d = embedding_l1_diameter(weights, normalized=False, backend=backend, device=device)
    notes = ["bounds are data-independent (valid for every input row)"]
    if c.is_moe:
        notes.append("MoE: down-stage Δ₁ is the max over experts; the routing choice itself is not covered")
    return ModelSensitivities(
        name=c.name,
        hidden_size=c.hidden_size,
        vocab_size=c.vocab_size,
        n_layers=c.n_layers,
        layers=tuple(layers),
        lm_head=rmsnorm_sensitivity(weights.final_norm),
        embed_normalized_diameter=norm_d,
        embed_raw_diameter=raw_d,
        notes=tuple(notes),
        n_experts=c.n_experts,
    )

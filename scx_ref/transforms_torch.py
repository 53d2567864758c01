"""torch implementations of the SCX transforms T1–T5 (DESIGN §4), one per numpy reference.

Every function here has the signature of its namesake in :mod:`scx_ref.transforms` and returns a
``torch.Tensor`` on the input's device and dtype (float64, float32, bfloat16 or float16; CPU or
CUDA). Row and feature permutations are *gathers* (``index_select``), never scatter copies: the
inverse of a permutation is computed once on the host (O(n) integers) and gathered with, so decoding
costs the same as encoding. Validation matches the numpy versions and raises the same
:class:`~scx_ref.errors.SCXError` subclasses (keys — permutations, head permutations — are checked on
the host, where they live; tensors are checked for dtype, shape and finiteness on their device).

Identity for every function f here: ``f(torch(x)) == torch(numpy_f(x))`` — exactly for the pure
gathers (T1–T4), to the dtype's rounding for the arithmetic ones (T5), and bit for bit for
:func:`laplace_noise` in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from . import transforms as _np_t
from ._checks import check_permutation
from .errors import DTypeError, NonFiniteError, PermutationError, SCXError, ShapeError
from .transforms import HeadPermutation, NoiseSource

__all__ = [
    "as_index",
    "as_tensor",
    "blind",
    "blinding_correction",
    "decode_rows",
    "encode_rows",
    "head_index",
    "head_permute",
    "head_unpermute",
    "inverse_permutation",
    "laplace_noise",
    "permute_rows",
    "reorder_cache",
    "strip_decoys",
    "unblind",
    "unpermute_rows",
    "with_decoys",
]

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_NP_FLOAT = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


# --- validation -------------------------------------------------------------------------------


def as_tensor(x: Any, name: str, *, allow_nonfinite: bool = False, device: Any = None) -> torch.Tensor:
    """``x`` as a floating tensor (numpy arrays are converted, keeping their dtype), checked for
    dtype and (unless ``allow_nonfinite``) finiteness: DTypeError / NonFiniteError otherwise."""
    if isinstance(x, torch.Tensor):
        t = x if device is None else x.to(device)
    else:
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.floating):
            raise DTypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
        t = torch.as_tensor(arr, device=device)
    if t.dtype not in _FLOATS:
        raise DTypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not allow_nonfinite and t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return t


def _host_perm(perm: Any, n: int | None, name: str) -> npt.NDArray[np.int64]:
    if isinstance(perm, torch.Tensor):
        if perm.is_floating_point() or perm.is_complex():
            raise PermutationError(f"{name} must hold integers, got dtype {perm.dtype}")
        perm = perm.detach().cpu().numpy()
    return check_permutation(perm, n, name).astype(np.int64, copy=False)


def as_index(index: npt.NDArray[np.int64], device: torch.device) -> torch.Tensor:
    """An int64 index tensor on ``device`` (no copy on CPU unless ``index`` is read-only)."""
    arr = np.ascontiguousarray(index, dtype=np.int64)
    if not arr.flags.writeable:  # memoised keys are read-only; torch cannot share them
        arr = arr.copy()
    return torch.from_numpy(arr).to(device)


def _inverse(p: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    inv = np.empty_like(p)
    inv[p] = np.arange(p.shape[0])
    return inv


# --- T1: token permutation -------------------------------------------------------------------


def inverse_permutation(perm: Any) -> torch.Tensor:
    """π⁻¹ with π⁻¹[π[i]] = i (int64 tensor on the input's device; CPU for numpy input)."""
    device = perm.device if isinstance(perm, torch.Tensor) else torch.device("cpu")
    return as_index(_inverse(_host_perm(perm, None, "permutation")), device)


def permute_rows(x: Any, perm: Any) -> torch.Tensor:
    """T1 encode: X ↦ X[π] (row i of the result is row π[i] of X), as one gather.

    Identity: f(X[π]) = f(X)[π] for every row-wise f.
    """
    t = as_tensor(x, "x")
    if t.ndim == 0:
        raise ShapeError("x must have at least one dimension")
    p = _host_perm(perm, t.shape[0], "perm")
    return t.index_select(0, as_index(p, t.device))


def unpermute_rows(y: Any, perm: Any) -> torch.Tensor:
    """T1 decode: Y[π] ↦ Y, a gather with π⁻¹: ``unpermute_rows(permute_rows(Y, π), π) == Y``."""
    t = as_tensor(y, "y", allow_nonfinite=True)
    if t.ndim == 0:
        raise ShapeError("y must have at least one dimension")
    p = _host_perm(perm, t.shape[0], "perm")
    return t.index_select(0, as_index(_inverse(p), t.device))


# --- T2: decoy rows --------------------------------------------------------------------------


def with_decoys(x: Any, decoys: Any) -> torch.Tensor:
    """[X; R]: append r decoy rows (r may be 0) below the n real rows (decoys cast to X's dtype)."""
    t = as_tensor(x, "x")
    d = as_tensor(decoys, "decoys", device=t.device)
    if t.ndim != 2 or d.ndim != 2 or d.shape[1] != t.shape[1]:
        raise ShapeError(
            f"x ({tuple(t.shape)}) and decoys ({tuple(d.shape)}) must be 2-D with the same width"
        )
    return torch.cat([t, d.to(t.dtype)], dim=0)


def strip_decoys(y: Any, n: int) -> torch.Tensor:
    """Keep the first n (real) rows of [f(X); f(R)] (a view, no copy)."""
    t = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if t.ndim == 0 or not 0 <= n <= t.shape[0]:
        rows = t.shape[0] if t.ndim else 0
        raise ShapeError(f"cannot keep {n} rows of an array with {rows}")
    return t[:n]


def encode_rows(x: Any, decoys: Any, perm: Any) -> torch.Tensor:
    """T1+T2 encode: X ↦ [X; R][π] over n + r rows."""
    return permute_rows(with_decoys(x, decoys), perm)


def decode_rows(y: Any, perm: Any, n: int) -> torch.Tensor:
    """T1+T2 decode: Y ↦ (Y[π⁻¹])[:n], gathering only the n real rows.

    Identity: ``decode_rows(f(encode_rows(X, R, π)), π, n) == f(X)`` for every row-wise f.
    """
    t = as_tensor(y, "y", allow_nonfinite=True)
    if t.ndim == 0:
        raise ShapeError("y must have at least one dimension")
    p = _host_perm(perm, t.shape[0], "perm")
    if not 0 <= n <= t.shape[0]:
        raise ShapeError(f"cannot keep {n} rows of an array with {t.shape[0]}")
    return t.index_select(0, as_index(_inverse(p)[:n], t.device))


# --- T3: head-structured feature permutation -----------------------------------------------------


def head_index(perm: HeadPermutation, group_size: int) -> npt.NDArray[np.int64]:
    """The flat feature index f (length H·d_h) with
    ``perm.apply(x, G).reshape(rows, -1) == x.reshape(rows, -1)[:, f]``."""
    return perm.flat_index(group_size)


def _check_heads(x: Any, perm: HeadPermutation, group_size: int, name: str) -> torch.Tensor:
    if not isinstance(perm, HeadPermutation):
        raise SCXError(f"perm must be a HeadPermutation, got {type(perm).__name__}")
    t = as_tensor(x, name, allow_nonfinite=True)
    if t.ndim != 3 or t.shape[1] != perm.n_kv_heads * group_size or t.shape[2] != perm.head_dim:
        raise ShapeError(
            f"{name} must have shape (rows, {perm.n_kv_heads * group_size}, "
            f"{perm.head_dim}), got {tuple(t.shape)}"
        )
    return t


def head_permute(x: Any, perm: HeadPermutation, group_size: int = 1) -> torch.Tensor:
    """T3 encode on rows × heads × d_h (one gather over the flattened features); equals
    ``perm.apply(x, group_size)``. Identity: Attn(QP, KP, VP) = Attn(Q, K, V)P."""
    t = _check_heads(x, perm, group_size, "x")
    rows, h, dh = t.shape
    idx = as_index(head_index(perm, group_size), t.device)
    return t.reshape(rows, h * dh).index_select(1, idx).reshape(rows, h, dh)


def head_unpermute(y: Any, perm: HeadPermutation, group_size: int = 1) -> torch.Tensor:
    """T3 decode (gather with the inverse flat index); equals ``perm.invert(y, group_size)``."""
    t = _check_heads(y, perm, group_size, "y")
    rows, h, dh = t.shape
    idx = as_index(perm.flat_index(group_size, inverse=True), t.device)
    return t.reshape(rows, h * dh).index_select(1, idx).reshape(rows, h, dh)


# --- T4: cache row order ---------------------------------------------------------------------


def reorder_cache(k: Any, v: Any, rho: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """T4: (K, V) ↦ (K[ρ], V[ρ]) with one ρ for both. Identity: Attn(q, K[ρ], V[ρ]) = Attn(q, K, V)
    for a query that attends to every cached row."""
    kt = as_tensor(k, "k")
    vt = as_tensor(v, "v", device=kt.device)
    if kt.ndim == 0 or vt.ndim == 0 or kt.shape[0] != vt.shape[0]:
        raise ShapeError(
            f"k and v must have the same number of rows, got {tuple(kt.shape)} and {tuple(vt.shape)}"
        )
    idx = as_index(_host_perm(rho, kt.shape[0], "rho"), kt.device)
    return kt.index_select(0, idx), vt.index_select(0, idx)


# --- T5: additive blinding -------------------------------------------------------------------


def blind(x: Any, eta: Any) -> torch.Tensor:
    """T5 encode: x ↦ x + η."""
    xt = as_tensor(x, "x")
    et = as_tensor(eta, "eta", device=xt.device)
    if xt.shape != et.shape:
        raise ShapeError(f"x {tuple(xt.shape)} and eta {tuple(et.shape)} must have the same shape")
    return xt + et.to(xt.dtype)


def blinding_correction(eta: Any, w: Any) -> torch.Tensor:
    """ηW, the client's correction term (W is in × out, as in :mod:`scx_ref.weights`)."""
    et = as_tensor(eta, "eta")
    wt = as_tensor(w, "w", device=et.device)
    if wt.ndim != 2:
        raise ShapeError(f"w must have 2 dimensions, got shape {tuple(wt.shape)}")
    if et.ndim == 0 or et.shape[-1] != wt.shape[0]:
        raise ShapeError(f"eta width {et.shape[-1] if et.ndim else None} does not match w rows {wt.shape[0]}")
    return et @ wt.to(et.dtype)


def unblind(y: Any, correction: Any) -> torch.Tensor:
    """T5 decode: y ↦ y − ηW. Identity: (x + η)W + b − ηW = xW + b."""
    yt = as_tensor(y, "y")
    ct = as_tensor(correction, "correction", device=yt.device)
    if yt.shape != ct.shape:
        raise ShapeError(f"y {tuple(yt.shape)} and correction {tuple(ct.shape)} must have the same shape")
    return yt - ct.to(yt.dtype)


# --- noise -----------------------------------------------------------------------------------


def laplace_noise(
    shape: tuple[int, ...],
    beta: float,
    gen: NoiseSource,
    dtype: torch.dtype = torch.float64,
    device: Any = "cpu",
) -> torch.Tensor:
    """η ~ Laplace(0, β)^shape from ``gen``'s uniforms (``gen.random(shape)``), as a tensor.

    The uniforms come from the key stream on the host, so the inverse CDF is evaluated there by the
    numpy reference and the float64 result is moved once: in float64 the noise is bit-for-bit the
    numpy noise (a device ``log1p`` may differ from libm's by an ulp), and in a narrower dtype it is
    that noise correctly rounded.
    """
    if dtype not in _FLOATS:
        raise DTypeError(f"noise dtype must be floating, got {dtype}")
    eta = _np_t.laplace_noise(shape, beta, gen, np.float64)
    return torch.from_numpy(eta).to(device=device, dtype=dtype)

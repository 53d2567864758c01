"""numpy reference of the SCX transforms T1–T5 (DESIGN §4).

Rows are tokens. ``perm`` is a permutation of rows (π), ``HeadPermutation`` a head-structured
permutation of attention features (P, built from per-KV-group coordinate permutations σ).
Every function is pure: it returns new arrays and never modifies its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._checks import FloatArray, IntArray, as_float_array, check_permutation
from .errors import SCXError, ShapeError

__all__ = [
    "HeadPermutation",
    "NoiseSource",
    "blind",
    "blinding_correction",
    "decode_rows",
    "encode_rows",
    "inverse_permutation",
    "laplace_noise",
    "permute_rows",
    "reorder_cache",
    "strip_decoys",
    "unblind",
    "unpermute_rows",
    "with_decoys",
]


# --- T1: token permutation -------------------------------------------------------------------


def inverse_permutation(perm: Any) -> IntArray:
    """π⁻¹ with π⁻¹[π[i]] = i."""
    p = check_permutation(perm)
    inv = np.empty_like(p)
    inv[p] = np.arange(p.shape[0])
    return inv


def permute_rows(x: Any, perm: Any) -> FloatArray:
    """T1 encode: X ↦ X[π] (row i of the result is row π[i] of X).

    Identity: f(X[π]) = f(X)[π] for every row-wise f (linear maps with bias, RMSNorm, SwiGLU,
    MoE routing and experts, LM head).
    """
    arr = as_float_array(x, "x")
    p = check_permutation(perm, arr.shape[0] if arr.ndim else None, "perm")
    return arr[p]


def unpermute_rows(y: Any, perm: Any) -> FloatArray:
    """T1 decode: Y[π] ↦ Y, i.e. ``unpermute_rows(permute_rows(Y, π), π) == Y``."""
    arr = as_float_array(y, "y", allow_nonfinite=True)
    p = check_permutation(perm, arr.shape[0] if arr.ndim else None, "perm")
    out = np.empty_like(arr)
    out[p] = arr
    return out


# --- T2: decoy rows --------------------------------------------------------------------------


def with_decoys(x: Any, decoys: Any) -> FloatArray:
    """[X; R]: append r decoy rows (r may be 0) below the n real rows."""
    arr = as_float_array(x, "x")
    dec = as_float_array(decoys, "decoys")
    if arr.ndim != 2 or dec.ndim != 2 or dec.shape[1] != arr.shape[1]:
        raise ShapeError(f"x ({arr.shape}) and decoys ({dec.shape}) must be 2-D with the same width")
    return np.concatenate([arr, dec.astype(arr.dtype, copy=False)], axis=0)


def strip_decoys(y: Any, n: int) -> FloatArray:
    """Keep the first n (real) rows of [f(X); f(R)]."""
    arr = np.asarray(y)
    if not 0 <= n <= arr.shape[0]:
        raise ShapeError(f"cannot keep {n} rows of an array with {arr.shape[0]}")
    return arr[:n]


def encode_rows(x: Any, decoys: Any, perm: Any) -> FloatArray:
    """T1+T2 encode: X ↦ [X; R][π] over n + r rows."""
    return permute_rows(with_decoys(x, decoys), perm)


def decode_rows(y: Any, perm: Any, n: int) -> FloatArray:
    """T1+T2 decode: Y ↦ (Y[π⁻¹])[:n].

    Identity: ``decode_rows(f(encode_rows(X, R, π)), π, n) == f(X)`` for every row-wise f — every
    decoy is dropped and the real rows return to their order.
    """
    return strip_decoys(unpermute_rows(y, perm), n)


# --- T3: head-structured feature permutation -----------------------------------------------------


@dataclass(frozen=True)
class HeadPermutation:
    """A head-structured permutation P of attention features (T3).

    ``group_order[j]`` is the original KV group placed in slot j (its G query heads move with it),
    and ``sigmas[g]`` the coordinate permutation σ_g used inside every head of original group g.
    Identity: Attn(Q·P, K·P, V·P) = Attn(Q, K, V)·P for any mask, scale and GQA ratio, because
    each score q·k is a sum over one head's coordinates, which σ_g only reorders.
    """

    group_order: IntArray  # (H_kv,)
    sigmas: IntArray  # (H_kv, d_h)

    def __post_init__(self) -> None:
        order = check_permutation(self.group_order, name="group_order")
        sig = np.asarray(self.sigmas)
        if sig.ndim != 2 or sig.shape[0] != order.shape[0]:
            raise ShapeError(f"sigmas must have shape (H_kv={order.shape[0]}, d_h), got {sig.shape}")
        for g in range(sig.shape[0]):
            check_permutation(sig[g], name=f"sigmas[{g}]")
        object.__setattr__(self, "group_order", order)
        object.__setattr__(self, "sigmas", sig.astype(np.int64))
        object.__setattr__(self, "_flat", {})

    @property
    def n_kv_heads(self) -> int:
        return int(self.group_order.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.sigmas.shape[1])

    @classmethod
    def identity(cls, n_kv_heads: int, head_dim: int) -> HeadPermutation:
        return cls(np.arange(n_kv_heads), np.tile(np.arange(head_dim), (n_kv_heads, 1)))

    def _heads(self, x: Any, group_size: int, name: str) -> FloatArray:
        arr = as_float_array(x, name, allow_nonfinite=True)
        if arr.ndim != 3 or arr.shape[1] != self.n_kv_heads * group_size or arr.shape[2] != self.head_dim:
            raise ShapeError(
                f"{name} must have shape (rows, {self.n_kv_heads * group_size}, "
                f"{self.head_dim}), got {arr.shape}"
            )
        return arr

    def _index(self, group_size: int) -> tuple[IntArray, IntArray]:
        """(head index, coordinate index) arrays such that encoded = x[:, heads, coords]."""
        heads = (self.group_order[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
        coords = np.repeat(self.sigmas[self.group_order], group_size, axis=0)
        return heads, coords

    def flat_index(self, group_size: int, inverse: bool = False) -> npt.NDArray[np.int64]:
        """The flat feature index f (length H·d_h) with
        ``apply(x, G).reshape(rows, -1) == x.reshape(rows, -1)[:, f]``, or its inverse permutation
        (``invert`` as one gather). Computed once per group size; the arrays are read-only."""
        memo: dict[tuple[int, bool], npt.NDArray[np.int64]] = self._flat  # type: ignore[attr-defined]
        key = (group_size, inverse)
        if key not in memo:
            heads, coords = self._index(group_size)
            f = (heads[:, None] * self.head_dim + coords).reshape(-1).astype(np.int64)
            if inverse:
                f = inverse_permutation(f).astype(np.int64)
            f.setflags(write=False)
            memo[key] = f
        return memo[key]

    def apply(self, x: Any, group_size: int = 1) -> FloatArray:
        """Encode rows × heads × d_h features: slot j·G+t holds head order[j]·G+t, coordinates σ_order[j].

        Use ``group_size = H / H_kv`` for queries (and attention outputs), 1 for keys and values.
        """
        arr = self._heads(x, group_size, "x")
        heads, coords = self._index(group_size)
        return arr[:, heads[:, None], coords]

    def invert(self, y: Any, group_size: int = 1) -> FloatArray:
        """Decode: ``invert(apply(X, G), G) == X``."""
        arr = self._heads(y, group_size, "y")
        heads, coords = self._index(group_size)
        out = np.empty_like(arr)
        out[:, heads[:, None], coords] = arr
        return out


# --- T4: cache row order ---------------------------------------------------------------------


def reorder_cache(k: Any, v: Any, rho: Any) -> tuple[FloatArray, FloatArray]:
    """T4: (K, V) ↦ (K[ρ], V[ρ]) with one ρ for both.

    Identity: a query that attends to every cached row gets Attn(q, K[ρ], V[ρ]) = Attn(q, K, V),
    because softmax-weighted sums over the cache rows do not depend on their order.
    """
    ka = as_float_array(k, "k")
    va = as_float_array(v, "v")
    if ka.shape[0] != va.shape[0]:
        raise ShapeError(f"k and v must have the same number of rows, got {ka.shape[0]} and {va.shape[0]}")
    p = check_permutation(rho, ka.shape[0], "rho")
    return ka[p], va[p]


# --- T5: additive blinding -------------------------------------------------------------------


def blind(x: Any, eta: Any) -> FloatArray:
    """T5 encode: x ↦ x + η."""
    xa = as_float_array(x, "x")
    ea = as_float_array(eta, "eta")
    if xa.shape != ea.shape:
        raise ShapeError(f"x {xa.shape} and eta {ea.shape} must have the same shape")
    return xa + ea


def blinding_correction(eta: Any, w: Any) -> FloatArray:
    """ηW, the client's correction term (precomputable offline, before the request)."""
    ea = as_float_array(eta, "eta")
    wa = as_float_array(w, "w", ndim=2)
    if ea.shape[-1] != wa.shape[0]:
        raise ShapeError(f"eta width {ea.shape[-1]} does not match w rows {wa.shape[0]}")
    return ea @ wa


def unblind(y: Any, correction: Any) -> FloatArray:
    """T5 decode: y ↦ y − ηW. Identity: (x + η)W + b − ηW = xW + b."""
    ya = as_float_array(y, "y")
    ca = as_float_array(correction, "correction")
    if ya.shape != ca.shape:
        raise ShapeError(f"y {ya.shape} and correction {ca.shape} must have the same shape")
    return ya - ca


# --- noise -----------------------------------------------------------------------------------


class NoiseSource(Protocol):
    """Anything with ``random(size)`` giving uniform floats in [0, 1): a ``KeyStream`` or
    ``numpy.random.Generator``. The library never uses global random state."""

    def random(self, size: Any = ...) -> Any: ...


def laplace_noise(
    shape: tuple[int, ...], beta: float, gen: NoiseSource, dtype: npt.DTypeLike = np.float64
) -> FloatArray:
    """η ~ Laplace(0, β)^shape by inverse CDF from ``gen``'s uniforms.

    With u uniform on [0, 1) and s = u − ½: η = −β·sign(s)·ln(1 − 2|s|), which has density
    exp(−|η|/β) / (2β). β = 0 gives zeros (no blinding).
    """
    if not np.isfinite(beta) or beta < 0:
        raise SCXError(f"Laplace scale beta must be finite and >= 0, got {beta}")
    shape = tuple(int(s) for s in shape)
    if beta == 0:
        return np.zeros(shape, dtype=dtype)
    u = np.asarray(gen.random(shape), dtype=np.float64).reshape(shape)
    s = u - 0.5
    eta = -beta * np.sign(s) * np.log1p(-np.minimum(2.0 * np.abs(s), 1.0 - 2.0**-53))  # u = 0 stays finite
    return eta.astype(dtype)

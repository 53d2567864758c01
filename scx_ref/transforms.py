"""The SCX transforms T1–T6 (DESIGN §4), written once over :class:`~scx_ref.arrays.ArrayOps`.

Rows are tokens. ``perm`` is a permutation of rows (π), :class:`HeadPermutation` a head-structured
permutation of attention features (P, built from per-KV-group coordinate permutations σ). Every function
takes the array operations it runs on as ``ops``; the default :data:`NUMPY` keeps numpy arrays in their
own dtype, so ``encode_rows(x, r, π)`` on numpy arrays reads like the math. The protocol's client and
server call these same functions with their backend (numpy or torch) as ``ops``: what the sympy proofs
(``proofs/``) and the Hypothesis properties check is the code that runs.

Keys (permutations) live on the host as numpy int64 arrays and are validated there; arrays are validated
by ``ops.floating`` (floating dtype, finite where the input must be). Every function is pure: it
returns new arrays (or views) and never modifies its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._checks import check_permutation
from .arrays import A, ArrayOps, NumpyOps
from .errors import SCXError, ShapeError

__all__ = [
    "NUMPY",
    "HeadPermutation",
    "NoiseSource",
    "blind",
    "blinding_correction",
    "decode_rows",
    "encode_rows",
    "head_permute",
    "head_unpermute",
    "inverse_permutation",
    "laplace_noise",
    "permute_rows",
    "reorder_cache",
    "strip_decoys",
    "unblind",
    "unlock_scores",
    "unpermute_rows",
    "with_decoys",
]

IntArray = npt.NDArray[np.int64]

#: numpy array operations that keep every input's own floating dtype: the transforms' default ``ops``.
NUMPY: ArrayOps[Any] = NumpyOps(None)


def _perm(perm: Any, n: int | None, name: str) -> IntArray:
    return check_permutation(perm, n, name).astype(np.int64, copy=False)


def _rows(ops: ArrayOps[A], x: A) -> int:
    if len(ops.shape(x)) == 0:
        raise ShapeError("the array must have at least one dimension (rows)")
    return ops.nrows(x)


# --- T1: token permutation -------------------------------------------------------------------


def inverse_permutation(perm: Any) -> IntArray:
    """π⁻¹ with π⁻¹[π[i]] = i (a host int64 array)."""
    p = _perm(perm, None, "permutation")
    inv = np.empty_like(p)
    inv[p] = np.arange(p.shape[0], dtype=np.int64)
    return inv


def permute_rows(x: Any, perm: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T1 encode: X ↦ X[π] (row i of the result is row π[i] of X), one gather.

    Identity: f(X[π]) = f(X)[π] for every row-wise f (linear maps with bias, RMSNorm, SwiGLU,
    MoE routing and experts, LM head).
    """
    t = ops.floating(x, "x")
    return ops.take_rows(t, _perm(perm, _rows(ops, t), "perm"))


def unpermute_rows(y: Any, perm: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T1 decode: Y[π] ↦ Y as the gather Y[π⁻¹], so ``unpermute_rows(permute_rows(Y, π), π) == Y``."""
    t = ops.floating(y, "y", finite=False)
    return ops.take_rows(t, inverse_permutation(_perm(perm, _rows(ops, t), "perm")))


# --- T2: decoy rows --------------------------------------------------------------------------


def with_decoys(x: Any, decoys: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """[X; R]: append r decoy rows (r may be 0) below the n real rows."""
    t = ops.floating(x, "x")
    d = ops.floating(decoys, "decoys")
    xs, ds = ops.shape(t), ops.shape(d)
    if len(xs) != 2 or len(ds) != 2 or ds[1] != xs[1]:
        raise ShapeError(f"x ({xs}) and decoys ({ds}) must be 2-D with the same width")
    return ops.concat_rows([t, d])


def strip_decoys(y: Any, n: int, ops: ArrayOps[A] = NUMPY) -> A:
    """Keep the first n (real) rows of [f(X); f(R)]."""
    t = ops.floating(y, "y", finite=False)
    rows = _rows(ops, t)
    if not 0 <= n <= rows:
        raise ShapeError(f"cannot keep {n} rows of an array with {rows}")
    return ops.narrow(t, 0, 0, n)


def encode_rows(x: Any, decoys: Any, perm: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T1+T2 encode: X ↦ [X; R][π] over n + r rows."""
    return permute_rows(with_decoys(x, decoys, ops), perm, ops)


def decode_rows(y: Any, perm: Any, n: int, ops: ArrayOps[A] = NUMPY) -> A:
    """T1+T2 decode: Y ↦ (Y[π⁻¹])[:n], one gather of the n real rows.

    Identity: ``decode_rows(f(encode_rows(X, R, π)), π, n) == f(X)`` for every row-wise f — every
    decoy is dropped and the real rows return to their order.
    """
    return ops.take_rows(*_decode_index(ops, y, perm, n))


def decode_rows_numpy(y: Any, perm: Any, n: int, ops: ArrayOps[A] = NUMPY) -> npt.NDArray[Any]:
    """:func:`decode_rows` straight to a numpy array (``ops.to_numpy(decode_rows(y, π, n))`` with one
    gather and no intermediate copy: the client's decode of the logits, the largest array of a prefill)."""
    return ops.rows_to_numpy(*_decode_index(ops, y, perm, n))


def _decode_index(ops: ArrayOps[A], y: Any, perm: Any, n: int) -> tuple[A, IntArray]:
    t = ops.floating(y, "y", finite=False)
    rows = _rows(ops, t)
    p = _perm(perm, rows, "perm")
    if not 0 <= n <= rows:
        raise ShapeError(f"cannot keep {n} rows of an array with {rows}")
    return t, inverse_permutation(p)[:n]


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
    _flat: dict[tuple[int, bool], IntArray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        order = _perm(self.group_order, None, "group_order")
        sig = np.asarray(self.sigmas)
        if sig.ndim != 2 or sig.shape[0] != order.shape[0]:
            raise ShapeError(f"sigmas must have shape (H_kv={order.shape[0]}, d_h), got {sig.shape}")
        for g in range(sig.shape[0]):
            check_permutation(sig[g], name=f"sigmas[{g}]")
        object.__setattr__(self, "group_order", order)
        object.__setattr__(self, "sigmas", sig.astype(np.int64))

    @property
    def n_kv_heads(self) -> int:
        return int(self.group_order.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.sigmas.shape[1])

    @classmethod
    def identity(cls, n_kv_heads: int, head_dim: int) -> HeadPermutation:
        """P = I (no feature permutation)."""
        return cls(np.arange(n_kv_heads), np.tile(np.arange(head_dim), (n_kv_heads, 1)))

    def flat_index(self, group_size: int, inverse: bool = False) -> IntArray:
        """The flat feature index f (length H·d_h, H = H_kv·G) with
        ``head_permute(x, P, G).reshape(rows, -1) == x.reshape(rows, -1)[:, f]``: slot j·G + t holds head
        ``order[j]·G + t`` with coordinates σ_order[j]. With ``inverse`` the inverse permutation of f
        (the decode gather). Computed once per (group size, direction); the arrays are read-only."""
        key = (group_size, inverse)
        if key not in self._flat:
            heads = (self.group_order[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
            coords = np.repeat(self.sigmas[self.group_order], group_size, axis=0)
            f = (heads[:, None] * self.head_dim + coords).reshape(-1).astype(np.int64)
            if inverse:
                f = inverse_permutation(f)
            f.setflags(write=False)
            self._flat[key] = f
        return self._flat[key]

    def apply(self, x: Any, group_size: int = 1) -> Any:
        """:func:`head_permute` of numpy ``x``."""
        return head_permute(x, self, group_size)

    def invert(self, y: Any, group_size: int = 1) -> Any:
        """:func:`head_unpermute` of numpy ``y``."""
        return head_unpermute(y, self, group_size)


def _head_gather(ops: ArrayOps[A], x: Any, perm: HeadPermutation, group_size: int, inverse: bool) -> A:
    if not isinstance(perm, HeadPermutation):
        raise SCXError(f"perm must be a HeadPermutation, got {type(perm).__name__}")
    name = "y" if inverse else "x"
    t = ops.floating(x, name, finite=False)
    shape = ops.shape(t)
    if len(shape) != 3 or shape[1] != perm.n_kv_heads * group_size or shape[2] != perm.head_dim:
        raise ShapeError(
            f"{name} must have shape (rows, {perm.n_kv_heads * group_size}, {perm.head_dim}), got {shape}"
        )
    rows, h, dh = shape
    flat = ops.reshape(t, (rows, h * dh))
    return ops.reshape(ops.take_last(flat, perm.flat_index(group_size, inverse)), (rows, h, dh))


def head_permute(x: Any, perm: HeadPermutation, group_size: int = 1, ops: ArrayOps[A] = NUMPY) -> A:
    """T3 encode on rows × heads × d_h, one gather over the flattened features.

    Use ``group_size = H / H_kv`` for queries (and attention outputs), 1 for keys and values.
    Identity: Attn(QP, KP, VP) = Attn(Q, K, V)P (any mask, scale, GQA ratio).
    """
    return _head_gather(ops, x, perm, group_size, inverse=False)


def head_unpermute(y: Any, perm: HeadPermutation, group_size: int = 1, ops: ArrayOps[A] = NUMPY) -> A:
    """T3 decode: ``head_unpermute(head_permute(X, P, G), P, G) == X``."""
    return _head_gather(ops, y, perm, group_size, inverse=True)


# --- T4: cache row order ---------------------------------------------------------------------


def reorder_cache(k: Any, v: Any, rho: Any, ops: ArrayOps[A] = NUMPY) -> tuple[A, A]:
    """T4: (K, V) ↦ (K[ρ], V[ρ]) with one ρ for both.

    Identity: a query that attends to every cached row gets Attn(q, K[ρ], V[ρ]) = Attn(q, K, V),
    because softmax-weighted sums over the cache rows do not depend on their order.
    """
    kt = ops.floating(k, "k")
    vt = ops.floating(v, "v")
    if _rows(ops, kt) != _rows(ops, vt):
        raise ShapeError(
            f"k and v must have the same number of rows, got {ops.shape(kt)} and {ops.shape(vt)}"
        )
    p = _perm(rho, ops.nrows(kt), "rho")
    return ops.take_rows(kt, p), ops.take_rows(vt, p)


def unlock_scores(scores: Any, rho: Any, n: int, ops: ArrayOps[A] = NUMPY) -> A:
    """T4 + T2 decode of attention scores against a locked cache.

    ``scores`` (…, m) are a query's scores against the rows of ρ(K ⊕ R) (n real + r decoy rows, in the
    order ρ) followed by m − (n + r) rows appended in true order. Returns the scores of the n real rows in
    true order followed by the appended ones, decoys dropped: column j of the locked part holds row ρ[j],
    so true row i sits at column ρ⁻¹[i].
    """
    t = ops.floating(scores, "scores", finite=False)
    m = ops.shape(t)[-1]
    p = _perm(rho, None, "rho")
    if not 0 <= n <= p.shape[0] <= m:
        raise ShapeError(f"{m} score columns cannot hold a locked cache of {p.shape[0]} rows with {n} real")
    cols = np.concatenate([inverse_permutation(p)[:n], np.arange(p.shape[0], m, dtype=np.int64)])
    return ops.take_last(t, cols)


# --- T5: additive blinding -------------------------------------------------------------------


def blind(x: Any, eta: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T5 encode: x ↦ x + η."""
    xt = ops.floating(x, "x")
    et = ops.floating(eta, "eta")
    if ops.shape(xt) != ops.shape(et):
        raise ShapeError(f"x {ops.shape(xt)} and eta {ops.shape(et)} must have the same shape")
    return ops.add(xt, et)


def blinding_correction(eta: Any, w: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """ηW, the client's correction term (precomputable before the request: η derives from the key
    schedule). ``w`` is in the layout of ``ops`` (numpy: in × out)."""
    et = ops.floating(eta, "eta")
    return ops.linear(et, ops.floating(w, "w"))


def unblind(y: Any, correction: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T5 decode: y ↦ y − ηW. Identity: (x + η)W + b − ηW = xW + b."""
    yt = ops.floating(y, "y")
    ct = ops.floating(correction, "correction")
    if ops.shape(yt) != ops.shape(ct):
        raise ShapeError(f"y {ops.shape(yt)} and correction {ops.shape(ct)} must have the same shape")
    return ops.sub(yt, ct)


# --- T6: Laplace noise -----------------------------------------------------------------------


class NoiseSource(Protocol):
    """Anything with ``random(size)`` giving uniform floats in [0, 1): a ``KeyStream`` or
    ``numpy.random.Generator``. The library never uses global random state."""

    def random(self, size: Any = ...) -> Any: ...


def laplace_noise(
    shape: tuple[int, ...], beta: float, gen: NoiseSource, dtype: npt.DTypeLike = np.float64
) -> npt.NDArray[Any]:
    """η ~ Laplace(0, β)^shape by inverse CDF from ``gen``'s uniforms (host numpy, float64 math).

    With u uniform on [0, 1) and s = u − ½: η = −β·sign(s)·ln(1 − 2|s|), which has density
    exp(−|η|/β) / (2β). β = 0 gives zeros (no blinding). Released through the Laplace mechanism this is
    ε = Δ₁/β differentially private (T6, DESIGN §7).
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

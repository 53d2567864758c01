"""The SCX transforms T1–T6 (DESIGN §4), written once over :class:`~scx_ref.arrays.ArrayOps`.

Rows are tokens. ``perm`` is a permutation of rows (π), :class:`HeadPermutation` a head-structured
permutation of attention features (P, built from per-KV-group coordinate permutations σ). Every function
takes the array operations it runs on as ``ops``; the default :data:`NUMPY` keeps numpy arrays in their
own dtype, so ``encode_rows(x, r, π)`` on numpy arrays reads like the math. The protocol's client and
server call these same functions with their backend (numpy or torch) as ``ops``: what the sympy proofs
(``proofs/``) and the Hypothesis properties check is the code that runs.

Keys (permutations) live on the host as numpy int64 arrays and are validated there; arrays are validated
by ``ops.floating`` (floating dtype, finite where the input must be). Every function is pure: it
returns new arrays (or views) and never modifies its inputs — except :func:`decode_rows_numpy` with
``in_place``, which reorders the rows inside ``y``'s own memory (``y`` is consumed).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import numpy as np
import numpy.typing as npt

from ._checks import check_int, check_permutation, check_real, float_dtype
from .arrays import A, ArrayOps, NumpyOps
from .errors import ConfigError, DTypeError, NonFiniteError, PermutationError, SCXError, ShapeError

if TYPE_CHECKING:  # the backends import this module; the type is all that is needed here
    from .backends.base import Backend

__all__ = [
    "NUMPY",
    "HeadPermutation",
    "NoiseSource",
    "Permutation",
    "blind",
    "blinding_correction",
    "decode_qkv_heads",
    "decode_rows",
    "encode_head_rows",
    "encode_rows",
    "head_permute",
    "head_permute_stacked",
    "head_unpermute",
    "inverse_permutation",
    "laplace_noise",
    "permute_rows",
    "reencode_sum",
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


class Permutation:
    """A row permutation π of 0..n−1, checked once, with its inverse π⁻¹ (π⁻¹[π[i]] = i): what the row
    transforms take in place of a raw index array when one π serves many calls (the client's keys of a
    request). Both arrays are read-only int64, in a copy or pickle too (rebuilt and checked again); every
    transform that accepts an index array accepts this, with the same result, and skips re-checking and
    re-inverting it."""

    __slots__ = ("forward", "inverse")

    def __init__(self, perm: Any, name: str = "permutation") -> None:
        forward = _index_array(perm, None, name).astype(np.int64, copy=True)
        inverse = _invert(forward)
        forward.setflags(write=False)
        inverse.setflags(write=False)
        self.forward: IntArray = forward
        self.inverse: IntArray = inverse

    def __len__(self) -> int:
        return int(self.forward.shape[0])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> IntArray:
        return np.array(self.forward, dtype=dtype, copy=True)

    def __repr__(self) -> str:
        return f"Permutation({self.forward.tolist()!r:.60})"

    def __reduce__(self) -> tuple[type[Permutation], tuple[IntArray]]:
        """A copy or pickle is rebuilt through the constructor: checked, both arrays read-only again."""
        return (Permutation, (self.forward,))


def _perm(perm: Any, n: int | None, name: str) -> IntArray:
    if isinstance(perm, Permutation):
        if n is not None and len(perm) != n:
            raise PermutationError(f"{name} must have length {n}, got {len(perm)}")
        return perm.forward
    return _index_array(perm, n, name).astype(np.int64, copy=False)


def _index_array(perm: Any, n: int | None, name: str) -> npt.NDArray[np.integer[Any]]:
    """``check_permutation`` of ``perm``, nested sequences that are not rectangular refused by name too."""
    if isinstance(perm, (list, tuple)):
        perm = _nested(perm, name, PermutationError)
    return check_permutation(perm, n, name)


def _nested(x: Any, name: str, error: type[SCXError] = ShapeError) -> npt.NDArray[Any]:
    """Nested sequences ``x`` as a numpy array; ``error`` (naming ``name``) when they are not rectangular,
    where numpy raises a bare ValueError."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise error(f"{name} must be a rectangular array, got nested sequences of different lengths") from exc


def _int(v: Any, name: str) -> int:
    """``v`` as an int: a Python or numpy integer, not a bool (ShapeError naming ``name`` otherwise — a
    float would be truncated or break a slice, a string repeat a shape)."""
    return check_int(v, name, None, error=ShapeError)


def _group(v: Any, name: str = "group_size") -> int:
    """A group size (query heads per KV head): an int >= 1 (ShapeError naming ``name`` otherwise)."""
    g = _int(v, name)
    if g < 1:
        raise ShapeError(f"{name} must be >= 1, got {g}")
    return g


_SCALAR = "the array must have at least one dimension (rows)"


def _array(ops: ArrayOps[A], x: Any, name: str, *, finite: bool) -> A:
    """``ops.floating(x, name, finite=finite)`` for an array of rows, refusing with ShapeError what no ops
    may take as one: nested sequences that are not rectangular, and a scalar (0-d) input, which an ops that
    converts it could otherwise make one row (a 0-d array already of the ops' kind comes back 0-d, for the
    caller's shape check). One identity test on the hot path (an array already of the ops' kind)."""
    if isinstance(x, (list, tuple)):
        x = _nested(x, name)
    t = ops.floating(x, name, finite=finite)
    if t is not x and np.ndim(x) == 0:
        raise ShapeError(_SCALAR)
    return t


def _refuse(ops: ArrayOps[A], what: str, parts: tuple[tuple[A, str], ...] = ()) -> NoReturn:
    """The result ``what`` is not finite: NonFiniteError naming the first of ``parts`` (its inputs) that
    holds NaN or ±inf, else its overflow. An error path: each part is scanned here, not before."""
    for t, name in parts:
        ops.floating(t, name)
    raise NonFiniteError(f"{what} overflows: its inputs are finite, the result is not (NaN or Inf)")


def _inverse(perm: Any, n: int | None, name: str) -> IntArray:
    """π⁻¹ of a checked π of length n (any length when n is None)."""
    if isinstance(perm, Permutation):
        _perm(perm, n, name)
        return perm.inverse
    return _invert(_perm(perm, n, name))


def _invert(p: IntArray) -> IntArray:
    """π⁻¹ of a checked int64 π (a fresh array)."""
    inv = np.empty_like(p)
    inv[p] = np.arange(p.shape[0], dtype=np.int64)
    return inv


def _rows(ops: ArrayOps[A], x: A) -> int:
    if len(ops.shape(x)) == 0:
        raise ShapeError(_SCALAR)
    return ops.nrows(x)


# --- T1: token permutation -------------------------------------------------------------------


def inverse_permutation(perm: Any) -> IntArray:
    """π⁻¹ with π⁻¹[π[i]] = i (a host int64 array; read-only for a :class:`Permutation`)."""
    return _inverse(perm, None, "permutation")


def permute_rows(x: Any, perm: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T1 encode: X ↦ X[π] (row i of the result is row π[i] of X), one gather.

    Identity: f(X[π]) = f(X)[π] for every row-wise f (linear maps with bias, RMSNorm, SwiGLU,
    MoE routing and experts, LM head). NonFiniteError when X holds NaN or ±inf (an encode sends only
    finite rows; the decode :func:`unpermute_rows` passes them through).
    """
    t = _array(ops, x, "x", finite=True)
    return ops.take_rows(t, _perm(perm, _rows(ops, t), "perm"))


def unpermute_rows(y: Any, perm: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T1 decode: Y[π] ↦ Y as the gather Y[π⁻¹], so ``unpermute_rows(permute_rows(Y, π), π) == Y``."""
    t = _array(ops, y, "y", finite=False)
    return ops.take_rows(t, _inverse(perm, _rows(ops, t), "perm"))


# --- T2: decoy rows --------------------------------------------------------------------------


def with_decoys(x: Any, decoys: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """[X; R]: append r decoy rows (r may be 0) below the n real rows, always finite (NonFiniteError
    naming ``x`` or ``decoys`` when one holds NaN or ±inf, or the result when a decoy overflows the
    dtype it is stored in)."""
    t = _array(ops, x, "x", finite=True)
    d = _array(ops, decoys, "decoys", finite=True)
    xs, ds = ops.shape(t), ops.shape(d)
    if len(xs) != 2 or len(ds) != 2 or ds[1] != xs[1]:
        raise ShapeError(f"x ({xs}) and decoys ({ds}) must be 2-D with the same width")
    # decoys of a wider dtype than x's are cast to it: one beyond its range is refused, not made inf
    return _finite_result(ops, lambda: ops.floating(ops.concat_rows([t, d]), "[x; decoys]"), "[x; decoys]")


def strip_decoys(y: Any, n: int, ops: ArrayOps[A] = NUMPY) -> A:
    """Keep the first n (real) rows of [f(X); f(R)] (n an int, 0 <= n <= rows)."""
    n = _int(n, "n")
    t = _array(ops, y, "y", finite=False)
    rows = _rows(ops, t)
    if not 0 <= n <= rows:
        raise ShapeError(f"cannot keep {n} rows of an array with {rows}")
    return ops.narrow(t, 0, 0, n)


def encode_rows(x: Any, decoys: Any, perm: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T1+T2 encode: X ↦ [X; R][π] over n + r rows, in one pass with no concatenated intermediate.

    Identity: ``encode_rows(X, R, π) == permute_rows(with_decoys(X, R), π)``. Row j of the result is row
    π[j] of [X; R]: one gather from the two arrays as if stacked (``ops.take_rows_concat``), every row
    written once. The result holds every row of X and R, so one finiteness check of it checks both
    (NonFiniteError otherwise).
    """
    t = _array(ops, x, "x", finite=False)
    d = _array(ops, decoys, "decoys", finite=False)
    xs, ds = ops.shape(t), ops.shape(d)
    if len(xs) != 2 or len(ds) != 2 or ds[1] != xs[1]:
        raise ShapeError(f"x ({xs}) and decoys ({ds}) must be 2-D with the same width")
    p = _perm(perm, xs[0] + ds[0], "perm")
    with np.errstate(over="ignore"):  # a decoy cast beyond x's dtype is inf: refused here by name
        return ops.floating(ops.take_rows_concat([t, d], p), "x and decoys")


def reencode_sum(
    s: Any, perm_s: Any, y: Any, perm_y: Any, decoys: Any, perm: Any, ops: ArrayOps[A] = NUMPY
) -> A:
    """T1+T2 across a residual add: two encoded arrays of the same n real rows, summed and re-encoded
    under a fresh π with fresh decoys, without decoding to true order in between.

    Identity: ``reencode_sum(S, π_s, Y, π_y, R, π) == encode_rows(decode_rows(S, π_s, n) +
    decode_rows(Y, π_y, n), R, π)`` with n = len(π) − rows(R): row j of the result is S's and Y's rows
    of token π[j] added (row π[j] − n of R when π[j] ≥ n). One pass (``ops.gather_sum``: two row gathers
    and one add per element) — the same additions, so the same bits, as the decode–add–encode it
    replaces. The decoy rows of S and Y are dropped. NonFiniteError if the result is not finite.
    """
    ts = _array(ops, s, "s", finite=False)
    ty = _array(ops, y, "y", finite=False)
    d = _array(ops, decoys, "decoys", finite=False)
    ss, ys, ds = ops.shape(ts), ops.shape(ty), ops.shape(d)
    if len(ss) != 2 or len(ys) != 2 or len(ds) != 2 or not ss[1] == ys[1] == ds[1]:
        raise ShapeError(f"s ({ss}), y ({ys}) and decoys ({ds}) must be 2-D with the same width")
    p = _perm(perm, None, "perm")
    n = p.shape[0] - ds[0]
    if n < 0:
        raise ShapeError(f"perm of {p.shape[0]} rows cannot hold {ds[0]} decoys")
    if n > min(ss[0], ys[0]):
        raise ShapeError(f"{p.shape[0]} rows with {ds[0]} decoys: s and y need at least {n} rows")
    inv_s = _inverse(perm_s, ss[0], "perm_s")
    inv_y = _inverse(perm_y, ys[0], "perm_y")
    real = p < n
    # row j: token π[j]'s rows of S and Y added, or (π[j] ≥ n) row π[j] − n of R
    from_s = p - n
    from_s[real] = inv_s[p[real]]
    from_y = np.full(p.shape[0], -1, dtype=np.int64)
    from_y[real] = inv_y[p[real]]
    with np.errstate(over="ignore"):  # a decoy cast beyond the rows' dtype is inf: refused here by name
        return ops.gather_sum(ts, from_s, ty, from_y, d, name="reencoded sum")


def encode_head_rows(
    o: Any, head: HeadPermutation, group_size: int, decoys: Any, perm: Any, ops: ArrayOps[A] = NUMPY
) -> A:
    """T3 decode then T1+T2 encode, in one pass: O·P (rows × H × d_h) ↦ [O; R][π] (rows flattened).

    Identity: ``encode_head_rows(Y, P, G, R, π) == encode_rows(head_unpermute(Y, P, G).reshape(n, H·d_h),
    R, π)``: row j of the result is row π[j] of Y with its features put back in true order by P's
    inverse (``ops.take_rows_cols_concat``), or row π[j] − n of R. The client's attention output on its
    way to the O stage. NonFiniteError if the result is not finite.
    """
    if not isinstance(head, HeadPermutation):
        raise SCXError(f"head must be a HeadPermutation, got {type(head).__name__}")
    group_size = _group(group_size)
    t = _array(ops, o, "o", finite=False)
    d = _array(ops, decoys, "decoys", finite=False)
    shape, ds = ops.shape(t), ops.shape(d)
    heads = head.n_kv_heads * group_size
    if len(shape) != 3 or shape[1] != heads or shape[2] != head.head_dim:
        raise ShapeError(f"o must have shape (rows, {heads}, {head.head_dim}), got {shape}")
    width = heads * head.head_dim
    if len(ds) != 2 or ds[1] != width:
        raise ShapeError(f"decoys ({ds}) must be 2-D with {width} columns")
    p = _perm(perm, shape[0] + ds[0], "perm")
    flat = ops.reshape(t, (shape[0], width))
    with np.errstate(over="ignore"):  # a decoy cast beyond o's dtype is inf: refused here by name
        return ops.take_rows_cols_concat(
            flat, head.flat_index(group_size, inverse=True), d, p, name="o and decoys"
        )


def decode_qkv_heads(
    z: Any,
    perm: Any,
    n: int,
    positions: Any,
    head: HeadPermutation,
    group_size: int,
    ops: Backend[A],
    *,
    name: str | None = None,
) -> tuple[A, A]:
    """T1+T2 decode, RoPE and T3 encode of a fused QKV reply in one pass: Z ↦ (RoPE([Q K])·P, V·P).

    Identity: with [Q K V] = ``decode_rows(Z, π, n)`` (H = H_kv·G query heads, H_kv key and value heads
    of d_h), ``decode_qkv_heads(Z, π, n, pos, P, G) == (head_permute_stacked(rope([Q K], pos), P, (G, 1)),
    head_permute(V, P, 1))``: the attention stage's inputs, what the client sends, from the QKV stage's
    reply (``ops.rope_take``: each real row read once, the decoys never). Both rows × heads × d_h.
    With ``name``: NonFiniteError when an entry of a real row is not finite (tested as it is read).
    """
    if not isinstance(head, HeadPermutation):
        raise SCXError(f"head must be a HeadPermutation, got {type(head).__name__}")
    group_size, n = _group(group_size), _int(n, "n")
    kv, dh = head.n_kv_heads, head.head_dim
    c = getattr(ops, "config", None)
    if c is None:  # an ArrayOps alone (e.g. NUMPY) has no model: RoPE needs the backend's
        raise ConfigError(f"ops must be a backend with a model config, got {type(ops).__name__}")
    if kv != c.n_kv_heads or dh != c.head_dim:
        raise ShapeError(
            f"head permutes {kv} KV heads of {dh} features; the backend's model has {c.n_kv_heads} of "
            f"{c.head_dim}"
        )
    t = _array(ops, z, "z", finite=False)
    shape = ops.shape(t)
    width = (kv * group_size + 2 * kv) * dh
    if len(shape) != 2 or shape[1] != width:
        raise ShapeError(f"z must be 2-D with {width} columns ([Q K V] heads), got {shape}")
    inv = _inverse(perm, shape[0], "perm")
    if not 0 <= n <= shape[0]:
        raise ShapeError(f"cannot keep {n} rows of an array with {shape[0]}")
    pos = _positions(positions, n)
    if n == 0:  # nothing to read or RoPE: empty heads of the result's shapes
        qk = kv * (group_size + 1)
        none = ops.narrow(t, 0, 0, 0)
        return (
            ops.compact(ops.reshape(ops.narrow(none, 1, 0, qk * dh), (0, qk, dh))),
            ops.compact(ops.reshape(ops.narrow(none, 1, qk * dh, width), (0, kv, dh))),
        )
    return ops.rope_take(t, inv[:n], pos, head.stacked_index((group_size, 1)), head.flat_index(1), name=name)


def _positions(positions: Any, n: int) -> IntArray:
    """RoPE positions of n rows: integers >= 0 (DTypeError for a float, which would be truncated; ShapeError
    for another count or a negative one, refused on every backend alike), as int64."""
    pos = _nested(positions, "positions") if isinstance(positions, (list, tuple)) else np.asarray(positions)
    if pos.size and pos.dtype.kind not in "iu":
        raise DTypeError(f"positions must be integers, got dtype {pos.dtype}")
    pos = pos.astype(np.int64, copy=False).reshape(-1)
    if pos.shape[0] != n:
        raise ShapeError(f"{pos.shape[0]} positions for {n} rows")
    if n and int(pos[0] if n == 1 else pos.min()) < 0:
        raise ShapeError(f"positions must be >= 0, got {int(pos.min())}")
    return pos


def decode_rows(y: Any, perm: Any, n: int, ops: ArrayOps[A] = NUMPY) -> A:
    """T1+T2 decode: Y ↦ (Y[π⁻¹])[:n], one gather of the n real rows.

    Identity: ``decode_rows(f(encode_rows(X, R, π)), π, n) == f(X)`` for every row-wise f — every
    decoy is dropped and the real rows return to their order.
    """
    return ops.take_rows(*_decode_index(ops, y, perm, n))


def decode_rows_numpy(
    y: Any, perm: Any, n: int, ops: ArrayOps[A] = NUMPY, *, in_place: bool = False, name: str | None = None
) -> npt.NDArray[Any]:
    """:func:`decode_rows` straight to a numpy array (``ops.to_numpy(decode_rows(y, π, n))`` with one
    gather and no intermediate copy: the client's decode of the logits, the largest array of a prefill).

    With ``in_place`` the rows are put in true order inside ``y``'s own memory (y ↦ y[π⁻¹], cycle by
    cycle) and its first n rows are returned as a view where the implementation can share memory with
    numpy: the same values, without a second array of y's size. ``y`` is consumed (it must not be used
    afterwards). A read-only numpy ``y`` is not written: it is decoded as without ``in_place`` (a new
    array), on every ``ops`` alike. With ``name``: NonFiniteError when an entry of ``y`` (decoy rows too) is
    not finite — in place, tested as the rows move.
    """
    t, inv = _decode_index(ops, y, perm, n)
    if not in_place or (isinstance(y, np.ndarray) and not y.flags.writeable):
        return ops.rows_to_numpy(t if name is None else ops.floating(t, name), inv)
    full = inverse_permutation(perm)
    return ops.head_to_numpy(ops.take_rows_in_place(t, full, name=name), n)


def _decode_index(ops: ArrayOps[A], y: Any, perm: Any, n: int) -> tuple[A, IntArray]:
    n = _int(n, "n")
    t = _array(ops, y, "y", finite=False)
    rows = _rows(ops, t)
    inv = _inverse(perm, rows, "perm")
    if not 0 <= n <= rows:
        raise ShapeError(f"cannot keep {n} rows of an array with {rows}")
    return t, inv[:n]


# --- T3: head-structured feature permutation -----------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadPermutation:
    """A head-structured permutation P of attention features (T3).

    ``group_order[j]`` is the original KV group placed in slot j (its G query heads move with it),
    and ``sigmas[g]`` the coordinate permutation σ_g used inside every head of original group g.
    Identity: Attn(Q·P, K·P, V·P) = Attn(Q, K, V)·P for any mask, scale and GQA ratio, because
    each score q·k is a sum over one head's coordinates, which σ_g only reorders.

    A value, checked once: both arrays are private read-only int64 copies (changing the arrays it was
    built from changes nothing), two HeadPermutations with the same arrays are equal (``==``) and hash
    alike, and a copy or pickle is checked again.
    """

    group_order: IntArray  # (H_kv,)
    sigmas: IntArray  # (H_kv, d_h)
    _flat: dict[tuple[int, bool], IntArray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _stacked: dict[tuple[tuple[int, ...], bool], IntArray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        order = np.array(_perm(self.group_order, None, "group_order"), dtype=np.int64, copy=True)
        sig = _nested(self.sigmas, "sigmas") if isinstance(self.sigmas, (list, tuple)) else self.sigmas
        sig = np.array(sig, copy=True)  # private: the caller's array may change after this check
        if sig.ndim != 2 or sig.shape[0] != order.shape[0]:
            raise ShapeError(f"sigmas must have shape (H_kv={order.shape[0]}, d_h), got {sig.shape}")
        for g in range(sig.shape[0]):
            check_permutation(sig[g], name=f"sigmas[{g}]")
        sig = sig.astype(np.int64, copy=False)
        order.setflags(write=False)
        sig.setflags(write=False)
        object.__setattr__(self, "group_order", order)
        object.__setattr__(self, "sigmas", sig)

    def __eq__(self, other: object) -> bool:
        """Value equality: the same group order and the same σ's."""
        if not isinstance(other, HeadPermutation):
            return NotImplemented
        return self is other or (
            np.array_equal(self.group_order, other.group_order) and np.array_equal(self.sigmas, other.sigmas)
        )

    def __hash__(self) -> int:
        """A hash of the two arrays' values, consistent with ``==``."""
        return hash((self.sigmas.shape, self.group_order.tobytes(), self.sigmas.tobytes()))

    def __reduce__(self) -> tuple[type[HeadPermutation], tuple[IntArray, IntArray]]:
        """Rebuilt through the constructor (checked, read-only again), without the memoised indices."""
        return (HeadPermutation, (self.group_order, self.sigmas))

    @property
    def n_kv_heads(self) -> int:
        """H_kv, the number of KV head groups P permutes."""
        return int(self.group_order.shape[0])

    @property
    def head_dim(self) -> int:
        """d_h, the width each σ_h permutes within a head."""
        return int(self.sigmas.shape[1])

    @classmethod
    def identity(cls, n_kv_heads: int, head_dim: int) -> HeadPermutation:
        """P = I (no feature permutation) of ``n_kv_heads`` heads of ``head_dim`` (ints >= 0)."""
        kv, dh = _int(n_kv_heads, "n_kv_heads"), _int(head_dim, "head_dim")
        if kv < 0 or dh < 0:
            raise ShapeError(f"n_kv_heads and head_dim must be >= 0, got {kv} and {dh}")
        return cls(np.arange(kv), np.tile(np.arange(dh), (kv, 1)))

    def flat_index(self, group_size: int, inverse: bool = False) -> IntArray:
        """The flat feature index f (length H·d_h, H = H_kv·G) with
        ``head_permute(x, P, G).reshape(rows, -1) == x.reshape(rows, -1)[:, f]``: slot j·G + t holds head
        ``order[j]·G + t`` with coordinates σ_order[j]. With ``inverse`` the inverse permutation of f
        (the decode gather). Computed once per (group size, direction); the arrays are read-only.
        ``group_size``: an int >= 0 (ShapeError otherwise)."""
        g = _int(group_size, "group_size")
        if g < 0:
            raise ShapeError(f"group_size must be >= 0, got {g}")
        key = (g, bool(inverse))
        if key not in self._flat:
            heads = (self.group_order[:, None] * g + np.arange(g)[None, :]).reshape(-1)
            coords = np.repeat(self.sigmas[self.group_order], g, axis=0)
            f = (heads[:, None] * self.head_dim + coords).reshape(-1).astype(np.int64)
            if inverse:
                f = inverse_permutation(f)
            f.setflags(write=False)
            self._flat[key] = f
        return self._flat[key]

    def stacked_index(self, group_sizes: tuple[int, ...], inverse: bool = False) -> IntArray:
        """The flat feature index of head blocks stacked along the head axis — block b holds
        H_kv·``group_sizes[b]`` heads (e.g. (G, 1, 1) for the fused [Q K V] heads) — each block gathered
        by its own :meth:`flat_index` at its offset. Computed once per (group sizes, direction);
        read-only. ``group_sizes``: a sequence of ints >= 0 (ShapeError otherwise)."""
        key = (_sizes(group_sizes), bool(inverse))
        stacked = self._stacked.get(key)
        if stacked is None:
            parts, offset = [], 0
            for g in key[0]:
                parts.append(self.flat_index(g, inverse) + offset)
                offset += self.n_kv_heads * g * self.head_dim
            stacked = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            stacked.setflags(write=False)
            self._stacked[key] = stacked
        return stacked

    def apply(self, x: Any, group_size: int = 1) -> Any:
        """:func:`head_permute` of numpy ``x``."""
        return head_permute(x, self, group_size)

    def invert(self, y: Any, group_size: int = 1) -> Any:
        """:func:`head_unpermute` of numpy ``y``."""
        return head_unpermute(y, self, group_size)


def _sizes(group_sizes: Any) -> tuple[int, ...]:
    """Group sizes of stacked head blocks as a tuple of ints (ShapeError for another kind or a negative
    one; a size of 0 is left to the caller's shape check)."""
    if not isinstance(group_sizes, (tuple, list, np.ndarray)):
        raise ShapeError(f"group_sizes must be a tuple of integers, got {type(group_sizes).__name__}")
    sizes = tuple(_int(g, "group_sizes") for g in group_sizes)
    if min(sizes, default=0) < 0:
        raise ShapeError(f"group_sizes must be >= 0, got {sizes}")
    return sizes


def _head_gather(ops: ArrayOps[A], x: Any, perm: HeadPermutation, group_size: int, inverse: bool) -> A:
    if not isinstance(perm, HeadPermutation):
        raise SCXError(f"perm must be a HeadPermutation, got {type(perm).__name__}")
    group_size = _group(group_size)
    name = "y" if inverse else "x"
    t = _array(ops, x, name, finite=False)
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


def head_permute_stacked(
    x: Any, perm: HeadPermutation, group_sizes: tuple[int, ...], ops: ArrayOps[A] = NUMPY
) -> A:
    """T3 encode of several head blocks stacked along the head axis, in one gather.

    ``x`` is rows × Σ_b H_kv·g_b × d_h: block b (H_kv·g_b heads, g_b = ``group_sizes[b]``) follows
    block b − 1, e.g. the Q and K heads of a fused projection with ``group_sizes = (G, 1)``.
    Identity: the result's block b equals ``head_permute(x_b, P, g_b)`` — each block is permuted exactly
    as :func:`head_permute` would, so Attn(QP, KP, VP) = Attn(Q, K, V)P holds for the blocks sent.
    """
    if not isinstance(perm, HeadPermutation):
        raise SCXError(f"perm must be a HeadPermutation, got {type(perm).__name__}")
    sizes = _sizes(group_sizes)
    t = _array(ops, x, "x", finite=False)
    shape = ops.shape(t)
    heads = perm.n_kv_heads * sum(sizes)
    if len(shape) != 3 or shape[1] != heads or shape[2] != perm.head_dim or min(sizes, default=1) < 1:
        raise ShapeError(
            f"x must have shape (rows, {heads}, {perm.head_dim}) for group sizes {sizes}, got {shape}"
        )
    rows = shape[0]
    flat = ops.reshape(t, (rows, heads * perm.head_dim))
    out = ops.take_last(flat, perm.stacked_index(sizes))
    return ops.reshape(out, (rows, heads, perm.head_dim))


# --- T4: cache row order ---------------------------------------------------------------------


def reorder_cache(k: Any, v: Any, rho: Any, ops: ArrayOps[A] = NUMPY) -> tuple[A, A]:
    """T4: (K, V) ↦ (K[ρ], V[ρ]) with one ρ for both.

    Identity: a query that attends to every cached row gets Attn(q, K[ρ], V[ρ]) = Attn(q, K, V),
    because softmax-weighted sums over the cache rows do not depend on their order. NonFiniteError when
    K or V holds NaN or ±inf.
    """
    kt = _array(ops, k, "k", finite=True)
    vt = _array(ops, v, "v", finite=True)
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
    n = _int(n, "n")
    t = _array(ops, scores, "scores", finite=False)
    shape = ops.shape(t)
    if not shape:
        raise ShapeError(_SCALAR)
    m = shape[-1]
    p = _perm(rho, None, "rho")
    if not 0 <= n <= p.shape[0] <= m:
        raise ShapeError(f"{m} score columns cannot hold a locked cache of {p.shape[0]} rows with {n} real")
    cols = np.concatenate([inverse_permutation(p)[:n], np.arange(p.shape[0], m, dtype=np.int64)])
    return ops.take_last(t, cols)


# --- T5: additive blinding -------------------------------------------------------------------


def _same_rows(ops: ArrayOps[A], a: Any, b: Any, names: tuple[str, str]) -> tuple[A, A]:
    """``a`` and ``b`` as arrays of rows of one shape (ShapeError naming them otherwise); not yet tested
    finite — the caller tests its result (:func:`_finite_result`)."""
    at = _array(ops, a, names[0], finite=False)
    bt = _array(ops, b, names[1], finite=False)
    shape = ops.shape(at)
    if shape != ops.shape(bt):
        raise ShapeError(f"{names[0]} {shape} and {names[1]} {ops.shape(bt)} must have the same shape")
    if not shape:
        raise ShapeError(_SCALAR)
    return at, bt


def _finite_result(
    ops: ArrayOps[A], compute: Callable[[], A], what: str, parts: tuple[tuple[A, str], ...] = ()
) -> A:
    """``compute()``, an operation that tests its own result finite by name (NonFiniteError), with numpy's
    overflow warnings off (a result not finite is refused by name instead): on NonFiniteError, the first
    of ``parts`` (its inputs) that is not finite is named, else the overflow (:func:`_refuse`)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return compute()
    except NonFiniteError:
        _refuse(ops, what, parts)


def blind(x: Any, eta: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T5 encode: x ↦ x + η, always finite: NonFiniteError naming ``x`` or ``eta`` when one holds NaN or
    ±inf, or the sum when it overflows. One finiteness test, of the sum (``ops.add`` with a name: in the
    add's own pass where the backend fuses it) — a sum is finite only if both terms are."""
    xt, et = _same_rows(ops, x, eta, ("x", "eta"))
    return _finite_result(ops, lambda: ops.add(xt, et, name="x + eta"), "x + eta", ((xt, "x"), (et, "eta")))


def blinding_correction(eta: Any, w: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """ηW, the client's correction term (precomputable before the request: η derives from the key
    schedule), always finite (NonFiniteError naming ``eta``, ``w`` or the product's overflow). ``w`` is in
    the layout of ``ops`` (numpy: in × out)."""
    et = _array(ops, eta, "eta", finite=True)
    wt = ops.floating(_nested(w, "w") if isinstance(w, (list, tuple)) else w, "w")
    return _finite_result(
        ops, lambda: ops.floating(ops.linear(et, wt), "eta·w"), "the blinding correction eta·w"
    )


def unblind(y: Any, correction: Any, ops: ArrayOps[A] = NUMPY) -> A:
    """T5 decode: y ↦ y − ηW, always finite (NonFiniteError naming ``y`` or ``correction`` when one holds
    NaN or ±inf, or the difference when it overflows: one finiteness test, of the difference).
    Identity: (x + η)W + b − ηW = xW + b."""
    yt, ct = _same_rows(ops, y, correction, ("y", "correction"))
    return _finite_result(
        ops,
        lambda: ops.floating(ops.sub(yt, ct), "y - correction"),
        "y - correction",
        ((yt, "y"), (ct, "correction")),
    )


# --- T6: Laplace noise -----------------------------------------------------------------------


class NoiseSource(Protocol):
    """Anything with ``random(size)`` giving uniform floats in [0, 1): a ``KeyStream`` or
    ``numpy.random.Generator``. The library never uses global random state."""

    def random(self, size: Any = ...) -> Any:
        """Uniform floats in [0, 1) of shape ``size`` (a float when None)."""
        ...


#: The largest |η| / β a draw of :func:`laplace_noise` can give: −ln(1 − (1 − 2⁻⁵³)) = 53·ln 2, at u = 0.
_LAPLACE_TAIL = float(-np.log1p(-(1.0 - 2.0**-53)))


def laplace_noise(
    shape: tuple[int, ...], beta: float, gen: NoiseSource, dtype: npt.DTypeLike = np.float64
) -> npt.NDArray[Any]:
    """η ~ Laplace(0, β)^shape by inverse CDF from ``gen``'s uniforms (host numpy, float64 math).

    With u uniform on [0, 1) and s = u − ½: η = −β·sign(s)·ln(1 − 2|s|), which has density
    exp(−|η|/β) / (2β). β = 0 gives zeros (no blinding). Released through the Laplace mechanism this is
    ε = Δ₁/β differentially private (T6, DESIGN §7).

    Always finite. Refused (nothing drawn): a β that is not a finite real number >= 0 (a bool is not one),
    or so large that a draw (|η| ≤ 53·ln 2·β) could overflow ``dtype``, or a ``gen`` without ``random`` or
    that is a module such as ``numpy.random`` (global random state) (ConfigError); a ``shape`` that is not
    a sequence of integer sizes >= 0 (ShapeError); a ``dtype`` that is not floating (DTypeError). Refused
    when drawing: a ``gen.random`` that takes no size, as ``random.Random``'s (ConfigError); after
    drawing: uniforms from ``gen`` of another count (ShapeError), or that are not floats in [0, 1)
    (ConfigError).
    """
    beta = check_real(beta, "Laplace scale beta", 0)
    if not isinstance(shape, (tuple, list)):
        raise ShapeError(f"shape must be a tuple of sizes, got {type(shape).__name__} {shape!r:.40}")
    shape = tuple(check_int(s, "a size of shape", 0, error=ShapeError) for s in shape)
    out_dtype = float_dtype(dtype)
    if not callable(getattr(gen, "random", None)) or isinstance(gen, types.ModuleType):
        # a module (numpy.random, random) has random() too: global random state, never the library's
        raise ConfigError(
            f"gen must have random(size) (a KeyStream or a Generator), got {type(gen).__name__}"
            + (f" {gen.__name__} (global random state)" if isinstance(gen, types.ModuleType) else "")
        )
    if beta == 0:
        return np.zeros(shape, dtype=out_dtype)
    with np.errstate(over="ignore"):  # the largest |η| a draw can give (u = 0), as computed below
        if not np.isfinite(np.float64(beta * _LAPLACE_TAIL).astype(out_dtype)):
            raise ConfigError(
                f"Laplace scale beta = {beta:g} is too large for {out_dtype}: its noise (up to "
                f"{_LAPLACE_TAIL:.2f}·beta) would overflow to inf"
            )
    try:
        drawn = gen.random(shape)
    except TypeError as exc:  # e.g. random.Random, whose random() takes no size
        raise ConfigError(f"gen.random({shape}) failed: {exc} (gen must take a size)") from exc
    try:
        u = np.asarray(drawn, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"gen.random({shape}) gave {type(drawn).__name__}, not uniform floats") from None
    if u.size != math.prod(shape):
        raise ShapeError(f"gen.random({shape}) gave {u.size} uniforms, not {math.prod(shape)}")
    if not ((u >= 0.0) & (u < 1.0)).all():  # NaN fails both: it would make NaN noise
        raise ConfigError(f"gen.random({shape}) gave values outside [0, 1) (NaN, negative or >= 1)")
    u = u.reshape(shape)
    s = u - 0.5
    eta = -beta * np.sign(s) * np.log1p(-np.minimum(2.0 * np.abs(s), 1.0 - 2.0**-53))  # u = 0 stays finite
    return np.asarray(eta).astype(out_dtype)  # shape (): a 0-d array, as for β = 0, not a numpy scalar

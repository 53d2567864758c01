"""Array operations: the :class:`ArrayOps` interface the transforms (T1–T6) are written against, and
:class:`NumpyOps`, its numpy implementation.

An ``ArrayOps`` holds no model weights: gathers of rows and of the last axis, concatenation, slicing,
reshapes, elementwise add/sub, a product with a matrix in the implementation's own layout, validation of
incoming arrays and conversion to and from numpy. :class:`~scx_ref.backends.base.Backend` extends it with
one model's weights; the torch implementation lives in :mod:`scx_ref.backends.torch_backend`.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ._checks import FloatArray, as_float_array, check_int, float_dtype
from .errors import DTypeError, NonFiniteError, ShapeError
from .ops import linear as _linear

__all__ = [
    "A",
    "ArrayOps",
    "IndexArray",
    "NumpyOps",
    "broadcast_shape",
    "check_concat",
    "check_narrow",
    "check_rows",
    "gather_sum_index",
    "permutation_of_rows",
    "permute_rows_in_place",
    "row_index",
]

A = TypeVar("A")
IndexArray = npt.NDArray[np.int64]


# not mutated (pragma): a protocol of stubs; mutmut would mutate their defaults and add its mutants' names
# to the protocol, which backends.base.BACKEND_METHODS reads as methods every backend must have
class ArrayOps(Protocol[A]):  # pragma: no mutate block
    """Array operations in one dtype on one device (no model weights)."""

    # -- conversion and validation -----------------------------------------------------------
    def from_numpy(self, x: npt.NDArray[Any]) -> A:
        """The array holding ``x`` (cast to the implementation's dtype, if it has one)."""
        ...

    def to_numpy(self, x: A) -> npt.NDArray[Any]:
        """A numpy copy of ``x``."""
        ...

    def rows_to_numpy(self, x: A, index: IndexArray) -> npt.NDArray[Any]:
        """A numpy copy of ``x[index]`` (rows), equal to ``to_numpy(take_rows(x, index))`` with one gather."""
        ...

    def rows_finite(self, x: A, index: IndexArray) -> bool:
        """Whether every entry of the rows ``x[index]`` is finite, equal to
        ``bool(np.isfinite(rows_to_numpy(x, index)).all())`` (read in place where the implementation can)."""
        ...

    def head_to_numpy(self, x: A, n: int) -> npt.NDArray[Any]:
        """``x[:n]`` (rows) as a numpy array in the wire dtype: a view of x's memory where the
        implementation shares memory with numpy, a copy otherwise."""
        ...

    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype arrays leave in (float32 for a bf16/fp16 compute dtype)."""
        ...

    def floating(self, x: Any, name: str, *, finite: bool = True) -> A:
        """``x`` as a floating array of this implementation (DTypeError otherwise), finite unless
        ``finite`` is False (NonFiniteError otherwise). The transforms' input check."""
        ...

    def check(self, x: Any, name: str, shape: tuple[int, ...], *, finite: bool = True) -> A:
        """Validate an incoming array — floating dtype (else DTypeError), exactly ``shape`` (else
        ShapeError), finite (else NonFiniteError; ``finite=False``: not checked here, for a caller whose
        next check reads every entry and refuses what is not finite) — and return it in the
        implementation's dtype."""
        ...

    # -- gathers, slices, shapes ---------------------------------------------------------------
    def take_rows(self, x: A, index: IndexArray) -> A:
        """``x[index]``: a gather along the first (row) axis."""
        ...

    def take_last(self, x: A, index: IndexArray) -> A:
        """``x[..., index]``: a gather along the last axis."""
        ...

    def concat_rows(self, xs: list[A]) -> A:
        """The arrays stacked along the row axis."""
        ...

    def append_rows(self, x: A, new: A) -> A:
        """``concat_rows([x, new])``: a KV cache extended by a generation step's rows. The result may
        share memory with ``x``, never writing ``x``'s own rows, so ``x`` and every array made from it
        before keep their values (a step refused after this leaves its cache as it was)."""
        ...

    def take_rows_concat(self, xs: list[A], index: IndexArray) -> A:
        """``concat_rows(xs)[index]`` (rows; ``xs`` of one width and dtype, the first non-empty) without
        the concatenation: every output row is written once, into a new array that shares memory with
        none of ``xs``. The caller checks ``index``'s range (:func:`scx_ref.transforms.encode_rows`)."""
        ...

    def take_rows_cols_concat(
        self, x: A, cols: IndexArray, extra: A, index: IndexArray, *, name: str | None = None
    ) -> A:
        """``concat_rows([x[:, cols], extra])[index]`` in one pass: row j is x's row ``index[j]`` gathered
        along its columns by ``cols``, or row ``index[j] − rows(x)`` of ``extra`` as it is (x 2-D, ``cols``
        a permutation of its columns, ``extra`` of the same width). A new array; the caller checks the
        indices (:func:`scx_ref.transforms.encode_head_rows`; the torch backend's fused pass, which reads
        without bounds checks, also refuses one outside the arrays and an ``extra`` of another width:
        ShapeError). With ``name``: NonFiniteError (naming it) when an entry of the result is not finite,
        tested in the same pass where the implementation can."""
        ...

    def gather_sum(
        self, s: A, from_s: IndexArray, y: A, from_y: IndexArray, extra: A, *, name: str | None = None
    ) -> A:
        """Row j is ``s[from_s[j]] + y[from_y[j]]`` where ``from_y[j] ≥ 0``, else row ``from_s[j]`` of
        ``extra`` as it is: two row gathers and one add per element, in one pass into a new array. The
        caller checks the indices (:func:`scx_ref.transforms.reencode_sum`; the torch backend's fused pass
        also refuses one outside the arrays, and arrays of different widths: ShapeError). ``name``: as
        for :meth:`take_rows_cols_concat` (a sum of finite entries may overflow)."""
        ...

    def take_rows_in_place(self, x: A, index: IndexArray, *, name: str | None = None) -> A:
        """``x[index]`` for a permutation ``index`` of x's rows, written over x's own memory where the
        implementation can (no second buffer of x's size); returns the result and leaves ``x`` holding it
        or undefined, so ``x`` must not be read afterwards. With ``name``: NonFiniteError (naming it) when
        an entry is not finite, tested in the same pass where the implementation can."""
        ...

    def compact(self, x: A) -> A:
        """``x``'s values in fresh contiguous memory: a copy of a view that keeps only its own elements
        alive (a narrow view keeps its whole base)."""
        ...

    def narrow(self, x: A, axis: int, start: int, stop: int) -> A:
        """``x[start:stop]`` along ``axis`` (0 = rows, 1 = columns)."""
        ...

    def reshape(self, x: A, shape: tuple[int, ...]) -> A:
        """``x`` with ``shape`` (the same entries in row-major order; a view where the layout allows)."""
        ...

    def nrows(self, x: A) -> int:
        """The length of ``x``'s first axis."""
        ...

    def shape(self, x: A) -> tuple[int, ...]:
        """``x``'s shape as a tuple of Python ints."""
        ...

    # -- arithmetic ------------------------------------------------------------------------------
    def add(self, x: A, y: A, *, name: str | None = None) -> A:
        """x + y; with ``name``: NonFiniteError (naming it) when an entry of the sum is not finite, tested
        in the same pass where the implementation can."""
        ...

    def add_into(self, x: A, y: A) -> A:
        """``add(x, y)`` written over ``x``'s memory where the result keeps x's dtype and shape (else a new
        array): the same values, without allocating. ``x`` must be the caller's own array, used nowhere
        else (e.g. fresh from a gather)."""
        ...

    def sub(self, x: A, y: A) -> A:
        """x − y, elementwise (the shapes equal)."""
        ...

    def linear(self, x: A, w: A, bias: A | None = None) -> A:
        """``x·W (+ b)`` for a matrix ``w`` stored in this implementation's layout (numpy: in × out;
        torch: out × in, as ``torch.nn.functional.linear``)."""
        ...

    def scale_rows(self, x: A, weights: npt.NDArray[Any]) -> A:
        """``x ⊙ w[:, None]``: row i scaled by ``weights[i]`` (MoE routing weights)."""
        ...

    def argmax_last(self, logits: A) -> int:
        """Argmax of the last row of ``logits`` (the first index among ties)."""
        ...

    def project64(self, x: A, right: npt.NDArray[np.float64]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(x·right, ‖x_i‖₂)`` computed in float64 for rows ``x`` (rows × width) and a host float64
        ``right`` (width × k), returned as host float64 arrays (rows × k, rows): the reply verifier's
        products (:mod:`scx_ref.protocol.verify`), whose own rounding must stay at float64's."""
        ...

    def matmul64(self, a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``a @ b`` (numpy's matmul semantics, batched over leading axes) for host float64 arrays, run
        on this backend's own threads (the torch backend's intra-op pool, not a second BLAS pool that
        would compete with it): the reply verifier's recomputed attention rows."""
        ...

    def on_host(self, x: A) -> bool:
        """Whether ``x`` lives in host memory, where compiled CPU passes read it (False: on a device,
        where a pass over all of it belongs on that device rather than after a copy to the host)."""
        ...

    def device_range_excess(self, v: A, o: A, first: int) -> tuple[float, float] | None:
        """:func:`scx_ref.protocol.verify.range_excess` of values ``v`` (keys × H_kv × d_h) and outputs ``o``
        (queries × H_kv × g × d_h; shapes checked by the caller) computed on the device they live on, in
        the wire dtype: the same two values, from two numbers moved to the host instead of every entry.
        None when they live in host memory (the caller runs that function on :meth:`head_to_numpy`
        views, copying nothing)."""
        ...

    def threads(self) -> int:
        """How many threads this backend's own operations run on (the torch backend's intra-op threads;
        1 for numpy): the client's fused CPU passes split their rows across as many."""
        ...


class NumpyOps:
    """``ArrayOps[numpy.ndarray]`` in ``dtype`` (None: every array keeps its own floating dtype, and a
    concatenation takes the first array's)."""

    name = "numpy"

    def __init__(self, dtype: npt.DTypeLike | None = None) -> None:
        self.dtype: np.dtype[Any] | None = None if dtype is None else float_dtype(dtype, "array dtype")

    # -- conversion and validation -----------------------------------------------------------
    def from_numpy(self, x: npt.NDArray[Any]) -> FloatArray:
        """``x`` in this implementation's dtype (no copy when it already is)."""
        return np.asarray(x, dtype=self.dtype)

    def to_numpy(self, x: FloatArray) -> npt.NDArray[Any]:
        """A copy of ``x`` the caller owns."""
        return np.array(x)

    def rows_finite(self, x: FloatArray, index: IndexArray) -> bool:
        """Whether the rows ``x[index]`` are all finite; ShapeError for a row index outside x (a negative
        one too, as the torch backend's pass refuses it, rather than a row read from the end)."""
        return bool(np.isfinite(x[row_index(index, _length(x, 0))]).all())

    def rows_to_numpy(self, x: FloatArray, index: IndexArray) -> npt.NDArray[Any]:
        """``x[index]``: fancy indexing already copies (ShapeError for an index outside x's rows)."""
        return np.asarray(x[row_index(index, _length(x, 0))])

    def head_to_numpy(self, x: FloatArray, n: int) -> npt.NDArray[Any]:
        """A view of ``x[:n]``."""
        return np.asarray(x[:n])

    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of this implementation's arrays (float64 when none was set)."""
        return self.dtype if self.dtype is not None else np.dtype(np.float64)

    def floating(self, x: Any, name: str, *, finite: bool = True) -> FloatArray:
        """``x`` cast to this implementation's dtype, then (``finite``) tested finite there: an entry past
        the dtype's range (1e300 in a float32 backend) is refused, as on torch, not let through as ±inf
        (the test ran before the cast)."""
        if self.dtype is None:
            return as_float_array(x, name, allow_nonfinite=not finite)
        wide = as_float_array(x, name, allow_nonfinite=True)
        with np.errstate(over="ignore"):  # an entry past the range: inf, refused below or by the caller
            arr = wide.astype(self.dtype, copy=False)
        if finite and not np.all(np.isfinite(arr)):
            past = " (an entry past its range)" if np.all(np.isfinite(wide)) else ""
            raise NonFiniteError(f"{name} holds NaN or Inf in {np.dtype(self.dtype).name}{past}")
        return arr

    def check(self, x: Any, name: str, shape: tuple[int, ...], *, finite: bool = True) -> FloatArray:
        """:meth:`ArrayOps.check` for numpy arrays: DTypeError for anything but a numpy array (a torch
        tensor named as such), ShapeError for another shape, then :meth:`floating`."""
        if not isinstance(x, np.ndarray):
            hint = (
                " (a torch backend's array reached a numpy backend in-process: a LocalTransport joins a "
                "client and a server of the same backend kind)"
                if hasattr(x, "detach")
                else ""
            )
            raise DTypeError(f"{name} must be a numpy array, got {type(x).__name__}{hint}")
        if tuple(x.shape) != tuple(shape):
            raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        return self.floating(x, name, finite=finite)

    # -- gathers, slices, shapes ---------------------------------------------------------------
    def take_rows(self, x: FloatArray, index: IndexArray) -> FloatArray:
        """``x[index]`` (ShapeError for an index that is not 1-D integers within x's rows: a negative
        one is refused, as on torch, not read from the end)."""
        return x[row_index(index, _length(x, 0))]

    def take_last(self, x: FloatArray, index: IndexArray) -> FloatArray:
        """``x[..., index]`` (ShapeError as :meth:`take_rows`, along the last axis)."""
        out: FloatArray = x[..., row_index(index, _length(x, -1), "column")]
        return out

    def concat_rows(self, xs: list[FloatArray]) -> FloatArray:
        """The arrays stacked along the rows (ShapeError for none, or rows of different shapes)."""
        check_concat([np.shape(x) for x in xs])
        return np.concatenate(xs, axis=0, dtype=self.dtype if self.dtype is not None else xs[0].dtype)

    def append_rows(self, x: FloatArray, new: FloatArray) -> FloatArray:
        """``concatenate([x, new])``: a new array (the reference copies the cache every step); ShapeError
        when the rows are not of x's shape, as the torch backend's."""
        if x.shape[1:] != new.shape[1:]:
            raise ShapeError(f"cannot append rows {new.shape} ({new.dtype}) to {x.shape} ({x.dtype})")
        return self.concat_rows([x, new])

    def take_rows_concat(self, xs: list[FloatArray], index: IndexArray) -> FloatArray:
        """``concatenate(xs)[index]`` (dtype: this ops' or the first array's)."""
        stacked = self.concat_rows(xs)
        out: FloatArray = stacked[row_index(index, stacked.shape[0])]
        return out

    def take_rows_cols_concat(
        self,
        x: FloatArray,
        cols: IndexArray,
        extra: FloatArray,
        index: IndexArray,
        *,
        name: str | None = None,
    ) -> FloatArray:
        """``concatenate([x[:, cols], extra])[index]``, written as the definition reads (then scanned
        when ``name`` is given)."""
        if np.ndim(x) != 2 or np.ndim(extra) != 2:
            raise ShapeError(f"rows {np.shape(x)} and extra rows {np.shape(extra)}: both 2-D")
        c = row_index(cols, x.shape[1], "column")  # ShapeError for cols that are not 1-D integers
        if np.shape(extra)[1] != len(c):
            raise ShapeError(f"rows {np.shape(x)} and extra rows {np.shape(extra)} for {len(c)} columns")
        out = self.take_rows_concat([x[:, c], extra], index)
        return out if name is None else self.floating(out, name)

    def gather_sum(
        self,
        s: FloatArray,
        from_s: IndexArray,
        y: FloatArray,
        from_y: IndexArray,
        extra: FloatArray,
        *,
        name: str | None = None,
    ) -> FloatArray:
        """Rows ``s[from_s] + y[from_y]``, decoy rows (``from_y < 0``) copied from ``extra[from_s]`` (then
        scanned when ``name`` is given)."""
        if np.ndim(s) != 2 or np.shape(y)[1:] != s.shape[1:] or np.shape(extra)[1:] != s.shape[1:]:
            raise ShapeError(f"s {np.shape(s)}, y {np.shape(y)} and extra {np.shape(extra)}: 2-D, one width")
        fs, fy = gather_sum_index(from_s, from_y, s.shape[0], y.shape[0], extra.shape[0])
        real = fy >= 0
        dtype = self.dtype if self.dtype is not None else np.result_type(s, y)
        out: FloatArray = np.empty((fs.shape[0], s.shape[1]), dtype=dtype)
        with np.errstate(over="ignore"):  # an overflow is inf: refused below with a name, else the caller's
            out[real] = s[fs[real]] + y[fy[real]]
        out[~real] = extra[fs[~real]]
        return out if name is None else self.floating(out, name)

    def take_rows_in_place(self, x: FloatArray, index: IndexArray, *, name: str | None = None) -> FloatArray:
        """``x[index]`` by following the permutation's cycles row by row (one row of scratch memory), then
        scanned when ``name`` is given. A read-only ``x`` (a wire buffer) cannot be written: it is gathered
        into a new array instead, after the same permutation check (ShapeError), and left as it was."""
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            out = x[permutation_of_rows(index, _length(x, 0))]
        else:
            out = permute_rows_in_place(x, index)
        return out if name is None else self.floating(out, name)

    def compact(self, x: FloatArray) -> FloatArray:
        """A C-contiguous copy of ``x`` that holds no reference to a larger array."""
        return np.array(x, copy=True, order="C")

    def narrow(self, x: FloatArray, axis: int, start: int, stop: int) -> FloatArray:
        """``x[start:stop]`` along ``axis`` (ShapeError unless 0 ≤ start ≤ stop ≤ its length: a slice
        past the end is refused, as torch refuses it, not cut short)."""
        check_narrow(np.shape(x), axis, start, stop)
        return x[start:stop] if axis == 0 else x[:, start:stop]

    def reshape(self, x: FloatArray, shape: tuple[int, ...]) -> FloatArray:
        """``x.reshape(shape)``."""
        return x.reshape(shape)

    def nrows(self, x: FloatArray) -> int:
        """The length of ``x``'s first axis."""
        return int(x.shape[0])

    def shape(self, x: FloatArray) -> tuple[int, ...]:
        """``x``'s shape as a tuple of Python ints."""
        return tuple(int(s) for s in x.shape)

    # -- arithmetic ------------------------------------------------------------------------------
    def add(self, x: FloatArray, y: FloatArray, *, name: str | None = None) -> FloatArray:
        """x + y, then scanned when ``name`` is given (ShapeError when the shapes do not broadcast)."""
        broadcast_shape(x, y)
        if name is None:
            return x + y
        with np.errstate(over="ignore"):  # an overflow is inf: refused by the scan
            return self.floating(x + y, name)

    def add_into(self, x: FloatArray, y: FloatArray) -> FloatArray:
        """x + y in x's memory when x is writeable, numpy's result type of the two is x's dtype and y
        broadcasts to x (a new array otherwise)."""
        if not x.flags.writeable or np.result_type(x, y) != x.dtype or broadcast_shape(x, y) != x.shape:
            return x + y
        np.add(x, y, out=x)
        return x

    def sub(self, x: FloatArray, y: FloatArray) -> FloatArray:
        """x − y (ShapeError when the shapes do not broadcast)."""
        broadcast_shape(x, y)
        return x - y

    def linear(self, x: FloatArray, w: FloatArray, bias: FloatArray | None = None) -> FloatArray:
        """``x @ w (+ b)`` (``w`` is in × out): :func:`scx_ref.ops.linear`, ShapeError when the widths do not
        match."""
        return _linear(x, w, bias)

    def scale_rows(self, x: FloatArray, weights: npt.NDArray[Any]) -> FloatArray:
        """x ⊙ w[:, None] (ShapeError unless x is 2-D rows, :func:`check_rows`, and ``weights`` holds one
        weight per row)."""
        check_rows(np.shape(x), "rows to scale")
        if np.shape(weights) != np.shape(x)[:1]:
            raise ShapeError(f"{np.shape(weights)} weights for rows {np.shape(x)}: one per row")
        out: FloatArray = x * np.asarray(weights, dtype=x.dtype)[:, None]
        return out

    def argmax_last(self, logits: FloatArray) -> int:
        """Argmax of the last row (ShapeError unless logits are 2-D rows, :func:`check_rows`, or for no rows,
        or an empty row)."""
        check_rows(np.shape(logits), "logits")
        if np.shape(logits)[0] == 0 or np.size(logits) == 0:
            raise ShapeError(f"argmax of the last row of logits {np.shape(logits)}: no row, or an empty one")
        return int(np.argmax(logits[-1]))

    def project64(
        self, x: FloatArray, right: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(x·right, ‖x_i‖₂)`` in float64 (no copy of a float64 ``x``); ShapeError unless x is 2-D and
        ``right`` has one row per column of x."""
        x64 = np.asarray(x, dtype=np.float64)
        right = np.asarray(right)
        if x64.ndim != 2 or right.ndim != 2 or right.shape[0] != x64.shape[1]:
            raise ShapeError(f"rows {x64.shape} against check vectors {right.shape}")
        return x64 @ right, np.sqrt(np.einsum("ij,ij->i", x64, x64))

    def matmul64(self, a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``a @ b`` in float64."""
        out: npt.NDArray[np.float64] = np.matmul(a, b)
        return out

    def on_host(self, x: FloatArray) -> bool:
        """True: numpy arrays live in host memory."""
        return True

    def device_range_excess(self, v: FloatArray, o: FloatArray, first: int) -> tuple[float, float] | None:
        """None: numpy arrays live in host memory."""
        return None

    def threads(self) -> int:
        """1: the reference runs its passes on one thread."""
        return 1


def _length(x: Any, axis: int) -> int:
    """The length of ``x`` along ``axis`` (ShapeError for an array without that axis, e.g. a scalar)."""
    shape = np.shape(x)
    if not -len(shape) <= axis < len(shape):
        raise ShapeError(f"an array of shape {shape} has no axis {axis}")
    return int(shape[axis])


def _shape(x: Any) -> tuple[int, ...]:
    """``np.shape(x)`` as a tuple, read from the ``shape`` attribute where ``x`` has one (a torch tensor's
    in a fifth of numpy's time: the torch backend's ``add_into`` tests its shapes on every call)."""
    s = getattr(x, "shape", None)
    return tuple(s) if s is not None else tuple(np.shape(x))


def broadcast_shape(x: Any, y: Any) -> tuple[int, ...]:
    """The shape an elementwise op of arrays ``x`` and ``y`` (numpy arrays, torch tensors or scalars)
    gives: numpy's broadcasting rule, which torch's is. ShapeError, naming both shapes, when they do not
    broadcast: the one test and message of both backends' add and sub (the torch backend runs it only
    after torch has refused the op, to tell a shape error from another cause)."""
    a, b = _shape(x), _shape(y)
    if a == b:
        return a
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise ShapeError(f"arrays of shapes {a} and {b} do not broadcast") from None


def permute_rows_in_place(x: npt.NDArray[Any], index: IndexArray) -> npt.NDArray[Any]:
    """Overwrite ``x`` with ``x[index]`` (``index`` a permutation of x's rows) and return ``x``.

    Follows each cycle of the permutation: row j takes row index[j] until the cycle closes, with one
    saved row per cycle, so the extra memory is one row rather than a copy of ``x``. Every row is read
    and written once, as in a gather. ShapeError, with ``x`` untouched, unless ``index`` is a permutation
    of x's rows (:func:`permutation_of_rows`), DTypeError, with ``x`` untouched, when ``x`` is read-only
    or not a numpy array.
    """
    idx = permutation_of_rows(index, _length(x, 0)).tolist()
    if not isinstance(x, np.ndarray):  # a list or a tensor has no flags: a raw AttributeError before
        raise DTypeError(f"only a numpy array is permuted in place, got {type(x).__name__}")
    if not x.flags.writeable:
        raise DTypeError("a read-only array cannot be permuted in place (gather it into a new one)")
    done = bytearray(len(idx))
    for start, src in enumerate(idx):
        if done[start]:
            continue
        done[start] = 1
        if src == start:
            continue
        saved = x[start].copy()
        j = start
        while True:
            k = idx[j]
            if k == start:
                x[j] = saved
                break
            x[j] = x[k]
            done[k] = 1
            j = k
    return x


def check_concat(shapes: list[tuple[int, ...]]) -> None:
    """ShapeError unless ``shapes`` (of arrays :meth:`ArrayOps.concat_rows` stacks) is not empty and all
    agree past the row axis."""
    if not shapes or any(len(s) == 0 or s[1:] != shapes[0][1:] for s in shapes):
        raise ShapeError(f"cannot stack rows of shapes {shapes}: one shape past the rows, at least one array")


def check_rows(shape: tuple[int, ...], what: str) -> None:
    """The rows ``ArrayOps.scale_rows`` scales and ``ArrayOps.argmax_last`` reads, on every backend:
    ShapeError unless ``shape`` is 2-D (rows × width). A 1-D array is refused, not read as rows of one
    entry: its "rows" were scalars, so ``scale_rows`` broadcast to the n × n outer product and
    ``argmax_last`` answered index 0 of a scalar, on numpy and torch alike."""
    if len(shape) != 2:
        raise ShapeError(f"{what} must be 2-D (rows × width), got shape {shape}")


def check_narrow(shape: tuple[int, ...], axis: int, start: int, stop: int) -> None:
    """ShapeError unless ``axis`` (0 or 1) is an axis of ``shape`` and ``start``, ``stop`` integers
    (:func:`scx_ref._checks.check_int`: never a bool or a float, which raised TypeError at the slice) with
    0 ≤ start ≤ stop ≤ its length."""
    if not (type(axis) is int and type(start) is int and type(stop) is int):
        axis, start, stop = (
            check_int(v, f"narrow's {what}", None, error=ShapeError)
            for v, what in ((axis, "axis"), (start, "start"), (stop, "stop"))
        )
    if axis not in (0, 1) or axis >= len(shape) or not 0 <= start <= stop <= shape[axis]:
        raise ShapeError(f"cannot take {start}:{stop} along axis {axis} of an array of shape {shape}")


def gather_sum_index(
    from_s: Any, from_y: Any, n_s: int, n_y: int, n_extra: int
) -> tuple[IndexArray, IndexArray]:
    """:meth:`ArrayOps.gather_sum`'s two row indices as int64, checked as its fused pass checks them:
    ShapeError unless both are 1-D integer arrays of one length, every real row (``from_y ≥ 0``) names a
    row of s (``from_s``) and of y, and every decoy row (``from_y < 0``) a row of extra (an unsigned entry
    past int64, which the cast wrapped to a negative one, is refused, not taken for a decoy). An index past
    s read a row of extra (or past y a row of zeros) on the torch backend's eager path before."""
    a, b = _index_array(from_s, "from_s"), _index_array(from_y, "from_y")
    for name, arr in (("from_s", a), ("from_y", b)):
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ShapeError(f"{name} must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
        if arr.size and arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:  # wrapped to negative: a decoy
            raise ShapeError(f"{name} holds an index past int64")
    if a.shape != b.shape:
        raise ShapeError(f"{a.shape[0]} rows from s but {b.shape[0]} from y")
    fs, fy = a.astype(np.int64, copy=False), b.astype(np.int64, copy=False)
    real = fy >= 0
    if fs.size and (
        int(fs.min()) < 0
        or (real.any() and (int(fs[real].max()) >= n_s or int(fy.max()) >= n_y))
        or (not real.all() and int(fs[~real].max()) >= n_extra)
    ):
        raise ShapeError("a row index outside s, y or extra")
    return fs, fy


_INT64_MAX = int(np.iinfo(np.int64).max)


def row_index(index: Any, n: int, what: str = "row") -> IndexArray:
    """``index`` as an int64 array of indices into n rows (or columns: ``what``): ShapeError unless it is a
    1-D integer array (or empty) with every entry in 0 … n − 1 (a negative one is refused, not read from
    the end)."""
    arr = _index_array(index, f"a {what} index")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ShapeError(f"a {what} index must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    idx = arr.astype(np.int64, copy=False)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ShapeError(f"{what} index out of range for {n} {what}s")
    return idx


def permutation_of_rows(index: Any, n: int) -> IndexArray:
    """``index`` as int64 after checking that it is a permutation of 0 … n − 1: a 1-D integer array of n
    entries, each row once (ShapeError otherwise: a negative entry is refused, not read from the end, and
    a float array is refused, not truncated). What :func:`permute_rows_in_place` checks before it moves
    any row."""
    arr = _index_array(index, "a row permutation")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ShapeError(
            f"a row permutation must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}"
        )
    if arr.shape[0] != n:
        raise ShapeError(f"a permutation of {arr.shape[0]} rows cannot reorder an array of {n}")
    idx = arr.astype(np.int64, copy=False)
    seen = np.zeros(n, dtype=bool)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ShapeError("the index is not a permutation of the rows")
    seen[idx] = True
    if not seen.all():
        raise ShapeError("the index is not a permutation of the rows")
    return idx


def _index_array(index: Any, what: str) -> npt.NDArray[Any]:
    """``np.asarray(index)``, ShapeError for what numpy cannot read as an array (a ragged list, which raised
    numpy's own ValueError; a grad-tracking tensor, which raised torch's RuntimeError)."""
    try:
        return np.asarray(index)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ShapeError(f"{what} must be a 1-D integer array: {exc}") from None

"""Tests added for mutants of :mod:`scx_ref.arrays` that survived ``python -m mutation.run arrays``
(mutation/REPORT_arrays.md): each checks a documented property of the array operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.arrays import NumpyOps, broadcast_shape, gather_sum_index, permute_rows_in_place
from scx_ref.errors import DTypeError, NonFiniteError, ShapeError
from tests.test_transform_args import no_warnings

TORCH_HINT = (
    " (a torch backend's array reached a numpy backend in-process: a LocalTransport joins a client and a "
    "server of the same backend kind)"
)


def _numpy_error(value: Any) -> str:
    """numpy's own message for what it cannot read as an array (a ragged list)."""
    try:
        np.asarray(value)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"numpy read {value!r}")


RAGGED = [[0], [1, 2]]


# -- conversion and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int32", np.int64, "bool"], ids=["int32", "int64", "bool"])
def test_numpy_ops_refuses_a_dtype_that_is_not_floating_as_the_array_dtype(dtype: Any) -> None:
    """``NumpyOps(dtype)`` refuses a dtype that is not floating with DTypeError naming it the array dtype."""
    with pytest.raises(DTypeError) as info:
        NumpyOps(dtype)
    assert str(info.value) == f"array dtype must be a floating numpy dtype, got {np.dtype(dtype)}"


@pytest.mark.parametrize(
    ("dtype", "given", "want"),
    [
        (np.float32, np.float64, np.float32),
        (np.float16, np.float64, np.float16),
        (np.float64, np.float32, np.float64),
        (None, np.float32, np.float32),
    ],
    ids=["f32-from-f64", "f16-from-f64", "f64-from-f32", "none-keeps-f32"],
)
def test_from_numpy_casts_to_the_ops_dtype(dtype: Any, given: Any, want: Any) -> None:
    """``from_numpy`` returns ``x`` in the implementation's dtype (an ops without one keeps x's)."""
    x = np.array([[0.5, -1.25], [3.0, 4.0]], dtype=given)
    out = NumpyOps(dtype).from_numpy(x)
    assert out.dtype == np.dtype(want)
    np.testing.assert_array_equal(out, x.astype(want))


@pytest.mark.parametrize(
    ("dtype", "want"),
    [(np.float32, np.float32), (np.float16, np.float16), (np.float64, np.float64), (None, np.float64)],
    ids=["f32", "f16", "f64", "none-is-f64"],
)
def test_numpy_dtype_is_the_set_dtype_or_float64(dtype: Any, want: Any) -> None:
    """``numpy_dtype`` is the dtype the ops was made with, float64 when none was set."""
    got = NumpyOps(dtype).numpy_dtype()
    assert isinstance(got, np.dtype)
    assert got == np.dtype(want)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0, 2.0], "q must be a numpy array, got list"),
        (None, "q must be a numpy array, got NoneType"),
        (torch.zeros(2), "q must be a numpy array, got Tensor" + TORCH_HINT),
    ],
    ids=["list", "none", "torch-tensor"],
)
def test_check_names_what_is_not_a_numpy_array_and_hints_at_a_torch_tensor(value: Any, message: str) -> None:
    """``check`` refuses anything but a numpy array with DTypeError naming the array and the type it got;
    a torch tensor's message adds how it reached a numpy backend, another object's adds nothing."""
    with pytest.raises(DTypeError) as info:
        NumpyOps().check(value, "q", (2,))
    assert str(info.value) == message


def test_check_names_the_shape_it_wanted_and_the_one_it_got() -> None:
    """``check`` refuses another shape with ShapeError naming the array, the shape wanted and the one
    given."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().check(np.zeros((2, 3)), "q", (3, 2))
    assert str(info.value) == "q must have shape (3, 2), got (2, 3)"


# -- gathers, slices, shapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (np.array([0, 3]), "column index out of range for 3 columns"),
        (np.array([-1]), "column index out of range for 3 columns"),
        (np.array([[0]]), "a column index must be a 1-D integer array, got int64 of shape (1, 1)"),
        (np.array([0.5]), "a column index must be a 1-D integer array, got float64 of shape (1,)"),
    ],
    ids=["past-the-end", "negative", "2-d", "float"],
)
def test_take_last_refusals_name_a_column_index(index: Any, message: str) -> None:
    """``take_last`` refuses an index as ``take_rows`` does, along the last axis: its ShapeError names a
    column index and the columns, not rows."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().take_last(np.zeros((2, 3)), index)
    assert str(info.value) == message


def test_append_rows_refusal_names_both_shapes_and_dtypes() -> None:
    """``append_rows`` refuses rows of another shape than x's with ShapeError naming both arrays' shapes
    and dtypes."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().append_rows(np.zeros((2, 3)), np.zeros((1, 4), dtype=np.float32))
    assert str(info.value) == "cannot append rows (1, 4) (float32) to (2, 3) (float64)"


@pytest.mark.parametrize("writeable", [True, False], ids=["writeable", "read-only"])
def test_take_rows_in_place_scans_for_non_finite_entries_only_when_named(writeable: bool) -> None:
    """``take_rows_in_place`` without ``name`` returns the permuted rows as they are (NaN included); with
    ``name`` it refuses a non-finite entry with NonFiniteError naming it."""
    ops = NumpyOps()

    def rows() -> np.ndarray[Any, Any]:
        x = np.array([[1.0, np.nan], [2.0, 3.0], [4.0, 5.0]])
        x.flags.writeable = writeable
        return x

    out = ops.take_rows_in_place(rows(), np.array([2, 0, 1]))
    np.testing.assert_array_equal(out, [[4.0, 5.0], [1.0, np.nan], [2.0, 3.0]])
    with pytest.raises(NonFiniteError) as info:
        ops.take_rows_in_place(rows(), np.array([2, 0, 1]), name="hidden rows")
    assert str(info.value) == "hidden rows holds NaN or Inf"
    finite = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(
        ops.take_rows_in_place(finite, np.array([1, 0]), name="hidden rows"), [[3.0, 4.0], [1.0, 2.0]]
    )


def test_take_rows_in_place_names_the_rows_in_the_ops_dtype() -> None:
    """With ``name``, a float32 ops refuses a non-finite entry naming the rows and its dtype."""
    x = np.array([[np.inf, 1.0], [2.0, 3.0]], dtype=np.float32)
    with pytest.raises(NonFiniteError) as info:
        NumpyOps(np.float32).take_rows_in_place(x, np.array([1, 0]), name="h")
    assert str(info.value) == "h holds NaN or Inf in float32"


@pytest.mark.parametrize(
    "view",
    [
        lambda big: big[:2],
        lambda big: big[1:3, :],
        lambda big: big.T,
        lambda big: big[:, 1:3],
        lambda big: big[::2],
    ],
    ids=["leading-rows", "middle-rows", "transpose", "columns", "strided-rows"],
)
def test_compact_is_a_c_contiguous_copy_that_keeps_no_larger_array(
    view: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]],
) -> None:
    """``compact`` returns x's values in fresh C-contiguous memory: not the view itself, sharing no memory
    with the array it was cut from, holding no reference to it (``base`` is None)."""
    big = np.arange(24.0).reshape(4, 6)
    x = view(big)
    out = NumpyOps().compact(x)
    np.testing.assert_array_equal(out, x)
    assert out is not x
    assert out.base is None
    assert not np.shares_memory(out, big)
    assert out.flags.c_contiguous


@pytest.mark.parametrize(
    ("axis", "start", "stop", "shape", "message"),
    [
        (2, 0, 1, (2, 3, 4), "cannot take 0:1 along axis 2 of an array of shape (2, 3, 4)"),
        (-1, 0, 1, (2, 3), "cannot take 0:1 along axis -1 of an array of shape (2, 3)"),
        (1, 0, 0, (3,), "cannot take 0:0 along axis 1 of an array of shape (3,)"),
        (0, 1, 4, (3, 2), "cannot take 1:4 along axis 0 of an array of shape (3, 2)"),
        (True, 0, 1, (2, 3), "narrow's axis must be an integer, got bool True"),
        (1.0, 0, 1, (2, 3), "narrow's axis must be an integer, got float 1.0"),
        (0, 0.0, 1, (2, 3), "narrow's start must be an integer, got float 0.0"),
        (np.int64(0), np.int64(-1), 1, (2, 3), "cannot take -1:1 along axis 0 of an array of shape (2, 3)"),
        (np.int64(-1), 0, 1, (2, 3), "cannot take 0:1 along axis -1 of an array of shape (2, 3)"),
    ],
    ids=[
        "axis-2-of-3-d",
        "axis-minus-1",
        "axis-1-of-1-d",
        "past-the-end",
        "bool-axis",
        "float-axis",
        "float-start",
        "numpy-negative-start",
        "numpy-negative-axis",
    ],
)
def test_narrow_refuses_what_is_not_a_slice_of_axis_0_or_1(
    axis: Any, start: Any, stop: Any, shape: tuple[int, ...], message: str
) -> None:
    """``narrow`` refuses, with ShapeError, an axis that is not 0 or 1 or not an axis of x, an axis, start or
    stop that is not an integer (a bool or a float, named), and a slice outside 0 ≤ start ≤ stop ≤ length,
    naming the slice, the axis and the shape (a negative numpy integer too: it is checked against the
    array, not refused as a negative count)."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().narrow(np.zeros(shape), axis, start, stop)
    assert str(info.value) == message


def test_narrow_takes_numpy_integers_as_python_ones() -> None:
    """``narrow`` reads numpy integers as the axis, start and stop they hold."""
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(NumpyOps().narrow(x, np.int64(1), np.int64(1), np.int64(3)), x[:, 1:3])
    np.testing.assert_array_equal(NumpyOps().narrow(x, 0, np.int32(0), np.int32(2)), x[0:2])


# -- arithmetic ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_dtype", "y"),
    [
        (np.float64, np.array([[1.0, 2.0]], dtype=np.float32)),
        (np.float32, 2.0),
        (np.float64, np.array([1.0, 2.0], dtype=np.float16)),
    ],
    ids=["f64-plus-f32", "f32-plus-python-float", "f64-plus-f16-row"],
)
def test_add_into_writes_x_when_the_result_type_of_both_is_xs_dtype(x_dtype: Any, y: Any) -> None:
    """``add_into`` writes x + y over x (and returns x) when numpy's result type of x and y together is x's
    dtype — a narrower y, or a Python float, does not widen it — and y broadcasts to x."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=x_dtype)
    want = x + y
    out = NumpyOps().add_into(x, y)
    assert out is x
    assert out.dtype == np.dtype(x_dtype)
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize(
    ("x", "weights", "message"),
    [
        (np.zeros(3), np.ones(3), "rows to scale must be 2-D (rows × width), got shape (3,)"),
        (np.zeros((2, 3)), np.ones(3), "(3,) weights for rows (2, 3): one per row"),
        (np.zeros((2, 3)), np.ones((2, 1)), "(2, 1) weights for rows (2, 3): one per row"),
    ],
    ids=["1-d-rows", "a-weight-too-many", "2-d-weights"],
)
def test_scale_rows_refusals_name_the_rows_and_the_weights(x: Any, weights: Any, message: str) -> None:
    """``scale_rows`` refuses rows that are not 2-D, and weights that are not one per row, with ShapeError
    naming the rows to scale (and the weights' shape)."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().scale_rows(x, weights)
    assert str(info.value) == message


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_scale_rows_casts_the_weights_to_the_rows_dtype(dtype: Any) -> None:
    """``scale_rows`` casts the weights to x's dtype (as the torch backend does): float64 weights, or a
    list of floats, leave the result in x's dtype, each row times its weight rounded to that dtype."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    weights = np.array([0.1, 1.0 / 3.0])
    for w in (weights, weights.tolist()):
        out = NumpyOps().scale_rows(x, w)
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, x * weights.astype(dtype)[:, None])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3,), "logits must be 2-D (rows × width), got shape (3,)"),
        ((1, 2, 3), "logits must be 2-D (rows × width), got shape (1, 2, 3)"),
        ((0, 4), "argmax of the last row of logits (0, 4): no row, or an empty one"),
        ((2, 0), "argmax of the last row of logits (2, 0): no row, or an empty one"),
    ],
    ids=["1-d", "3-d", "no-row", "empty-rows"],
)
def test_argmax_last_refusals_name_the_logits_shape(shape: tuple[int, ...], message: str) -> None:
    """``argmax_last`` refuses logits that are not 2-D rows, or have no row or empty rows, with ShapeError
    naming the logits and their shape."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().argmax_last(np.zeros(shape))
    assert str(info.value) == message


def test_numpy_ops_live_on_the_host_and_run_on_one_thread() -> None:
    """``on_host`` is True (numpy arrays live in host memory) and ``threads`` is 1."""
    ops = NumpyOps(np.float32)
    assert ops.on_host(np.zeros((2, 2), dtype=np.float32)) is True
    assert ops.threads() == 1
    assert type(ops.threads()) is int


# -- in-place permutation ------------------------------------------------------------------------


def test_permute_rows_in_place_refuses_a_read_only_array_by_name() -> None:
    """``permute_rows_in_place`` refuses a read-only array with DTypeError saying to gather it into a new
    one, leaving it as it was."""
    x = np.arange(6.0).reshape(3, 2)
    x.flags.writeable = False
    with pytest.raises(DTypeError) as info:
        permute_rows_in_place(x, np.array([2, 0, 1]))
    assert str(info.value) == "a read-only array cannot be permuted in place (gather it into a new one)"
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(3, 2))


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (RAGGED, "a row permutation must be a 1-D integer array: " + _numpy_error(RAGGED)),
        (
            np.array([0.0, 1.0, 2.0]),
            "a row permutation must be a 1-D integer array, got float64 of shape (3,)",
        ),
        (np.array([[0, 1, 2]]), "a row permutation must be a 1-D integer array, got int64 of shape (1, 3)"),
        (np.array([0, 1]), "a permutation of 2 rows cannot reorder an array of 3"),
        (np.array([0, 1, 3]), "the index is not a permutation of the rows"),
        (np.array([0, -1, 2]), "the index is not a permutation of the rows"),
        (np.array([0, 0, 2]), "the index is not a permutation of the rows"),
    ],
    ids=["ragged", "float", "2-d", "too-short", "past-the-end", "negative", "repeated"],
)
@pytest.mark.parametrize("writeable", [True, False], ids=["in-place", "read-only"])
def test_take_rows_in_place_refuses_what_is_not_a_permutation_of_the_rows(
    index: Any, message: str, writeable: bool
) -> None:
    """``take_rows_in_place`` (in place, or gathering a read-only x) refuses an index that is not a
    permutation of x's rows with ShapeError saying why — not readable as an array, not 1-D integers,
    another length, an entry outside the rows or repeated — and leaves x as it was."""
    x = np.arange(6.0).reshape(3, 2)
    x.flags.writeable = writeable
    with pytest.raises(ShapeError) as info:
        NumpyOps().take_rows_in_place(x, index)
    assert str(info.value) == message
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(3, 2))


# -- floating and its scans ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "value", "message"),
    [
        (np.float32, 1e300, "q holds NaN or Inf in float32 (an entry past its range)"),
        (np.float16, 1e5, "q holds NaN or Inf in float16 (an entry past its range)"),
        (np.float32, np.nan, "q holds NaN or Inf in float32"),
        (np.float32, -np.inf, "q holds NaN or Inf in float32"),
        (np.float16, np.inf, "q holds NaN or Inf in float16"),
        (None, np.nan, "q holds NaN or Inf"),
    ],
    ids=["f32-past-range", "f16-past-range", "f32-nan", "f32-minus-inf", "f16-inf", "none-nan"],
)
def test_floating_names_the_array_its_dtype_and_an_entry_past_the_range(
    dtype: Any, value: float, message: str
) -> None:
    """``floating`` refuses an entry that is not finite in the ops' dtype with NonFiniteError naming the
    array and that dtype, adding "(an entry past its range)" only when the entry was finite before the
    cast — and without a numpy overflow warning on the way."""
    x = np.array([[1.0, value]])
    with no_warnings(), pytest.raises(NonFiniteError) as info:
        NumpyOps(dtype).floating(x, "q")
    assert str(info.value) == message


@pytest.mark.parametrize("dtype", [None, np.float32, np.float64], ids=["none", "f32", "f64"])
def test_floating_and_check_let_non_finite_entries_through_when_not_asked_to_test_them(dtype: Any) -> None:
    """With ``finite=False`` neither ``floating`` nor ``check`` refuses NaN or ±Inf (nor warns about an
    entry past the dtype's range: it is inf)."""
    x = np.array([[np.nan, np.inf], [-np.inf, 1e300]])
    want = np.array([[np.nan, np.inf], [-np.inf, 1e300 if dtype in (None, np.float64) else np.inf]])
    ops = NumpyOps(dtype)
    with no_warnings():
        for out in (ops.floating(x, "q", finite=False), ops.check(x, "q", (2, 2), finite=False)):
            assert out.dtype == np.dtype(dtype or np.float64)
            np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, None], ids=["f32", "f64", "none"])
def test_floating_names_an_array_that_is_not_floating(dtype: Any) -> None:
    """``floating`` refuses an integer array with DTypeError naming the array and its dtype."""
    with pytest.raises(DTypeError) as info:
        NumpyOps(dtype).floating(np.array([1, 2], dtype=np.int64), "q")
    assert str(info.value) == "q must be a floating-point array, got dtype int64"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, None], ids=["f32", "f64", "none"])
def test_take_rows_in_place_with_a_name_is_still_written_over_x(dtype: Any) -> None:
    """``take_rows_in_place`` with ``name`` writes the permuted rows over x's own memory and returns x —
    the scan makes no second buffer of x's size (x already in the ops' dtype)."""
    x = np.arange(6.0, dtype=dtype or np.float64).reshape(3, 2)
    want = x[[2, 0, 1]].copy()
    out = NumpyOps(dtype).take_rows_in_place(x, np.array([2, 0, 1]), name="h")
    assert out is x
    np.testing.assert_array_equal(x, want)


# -- concatenations and fused gathers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "first", "want"),
    [
        (np.float32, np.float64, np.float32),
        (np.float64, np.float32, np.float64),
        (None, np.float32, np.float32),
    ],
    ids=["f32-ops", "f64-ops", "none-takes-the-first"],
)
def test_concat_rows_is_in_the_ops_dtype_or_the_first_arrays(dtype: Any, first: Any, want: Any) -> None:
    """``concat_rows`` and ``take_rows_concat`` return the ops' dtype (an ops without one: the first
    array's)."""
    xs = [np.array([[1.0, 2.0]], dtype=first), np.array([[3.0, 4.0], [5.0, 6.0]])]
    ops = NumpyOps(dtype)
    out = ops.concat_rows(xs)
    assert out.dtype == np.dtype(want)
    np.testing.assert_array_equal(out, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert ops.take_rows_concat(xs, np.array([2, 0])).dtype == np.dtype(want)


def test_concat_rows_stacks_one_dimensional_arrays() -> None:
    """``concat_rows`` stacks 1-D arrays (rows of scalars: one shape past the rows, the empty one)."""
    out = NumpyOps().concat_rows([np.array([1.0, 2.0]), np.array([3.0])])
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("xs", "message"),
    [
        ([], "cannot stack rows of shapes []: one shape past the rows, at least one array"),
        ([np.float64(1.0)], "cannot stack rows of shapes [()]: one shape past the rows, at least one array"),
        (
            [np.zeros((1, 2)), np.zeros((1, 3))],
            "cannot stack rows of shapes [(1, 2), (1, 3)]: one shape past the rows, at least one array",
        ),
    ],
    ids=["none", "a-scalar", "two-widths"],
)
def test_concat_rows_refusals_name_the_shapes(xs: list[Any], message: str) -> None:
    """``concat_rows`` refuses no arrays, a 0-D one, or rows of different shapes with ShapeError naming
    the shapes."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().concat_rows(xs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("x", "extra", "message"),
    [
        (np.zeros((2, 3)), np.zeros(3), "rows (2, 3) and extra rows (3,): both 2-D"),
        (np.zeros(3), np.zeros((2, 3)), "rows (3,) and extra rows (2, 3): both 2-D"),
        (np.zeros((2, 3)), np.zeros((1, 2)), "rows (2, 3) and extra rows (1, 2) for 3 columns"),
    ],
    ids=["1-d-extra", "1-d-x", "extra-of-another-width"],
)
def test_take_rows_cols_concat_refusals_name_both_shapes(x: Any, extra: Any, message: str) -> None:
    """``take_rows_cols_concat`` refuses x or extra that is not 2-D, and extra of another width than the
    columns, with ShapeError naming both shapes."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().take_rows_cols_concat(x, np.array([0, 1, 2]), extra, np.array([0]))
    assert str(info.value) == message


def _fused_calls(extra_value: float) -> list[Callable[[NumpyOps, str | None], Any]]:
    """take_rows_cols_concat and gather_sum, each reading a row of extra holding ``extra_value``."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    extra = np.array([[5.0, extra_value]])
    return [
        lambda ops, name: ops.take_rows_cols_concat(x, np.array([1, 0]), extra, np.array([2, 0]), name=name),
        lambda ops, name: ops.gather_sum(x, np.array([0, 1]), x, np.array([-1, 1]), extra, name=name),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["take_rows_cols_concat", "gather_sum"])
@pytest.mark.parametrize("dtype", [None, np.float32], ids=["none", "f32"])
def test_fused_gathers_scan_for_non_finite_entries_only_when_named(which: int, dtype: Any) -> None:
    """``take_rows_cols_concat`` and ``gather_sum`` return a NaN read from extra as it is without ``name``;
    with ``name`` they refuse it with NonFiniteError naming it (and the ops' dtype where it has one)."""
    ops = NumpyOps(dtype)
    out = _fused_calls(np.nan)[which](ops, None)
    assert np.isnan(out).sum() == 1
    with pytest.raises(NonFiniteError) as info:
        _fused_calls(np.nan)[which](ops, "fused rows")
    assert str(info.value) == "fused rows holds NaN or Inf" + ("" if dtype is None else " in float32")
    finite = _fused_calls(6.0)[which](ops, "fused rows")
    assert np.isfinite(finite).all()


def test_fused_gathers_give_the_rows_the_definition_reads() -> None:
    """``take_rows_cols_concat`` is ``concatenate([x[:, cols], extra])[index]``; ``gather_sum`` row j is
    ``s[from_s[j]] + y[from_y[j]]``, or extra's row ``from_s[j]`` for a decoy (``from_y[j] < 0``)."""
    ops = NumpyOps()
    take, gather = _fused_calls(6.0)
    np.testing.assert_array_equal(take(ops, None), [[5.0, 6.0], [2.0, 1.0]])
    np.testing.assert_array_equal(gather(ops, None), [[5.0, 6.0], [6.0, 8.0]])


@pytest.mark.parametrize(
    ("s", "y", "extra"),
    [
        (np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 3))),
        (np.zeros(3), np.zeros(3), np.zeros(3)),
        (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2))),
        (np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 2))),
    ],
    ids=["y-of-another-width", "1-d", "extra-of-another-width", "y-and-extra-of-another-width"],
)
def test_gather_sum_refusal_names_the_three_shapes(s: Any, y: Any, extra: Any) -> None:
    """``gather_sum`` refuses s that is not 2-D, or y or extra of another width than s, with ShapeError
    naming the three shapes."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().gather_sum(s, np.array([0]), y, np.array([0]), extra)
    assert str(info.value) == (
        f"s {np.shape(s)}, y {np.shape(y)} and extra {np.shape(extra)}: 2-D, one width"
    )


@pytest.mark.parametrize(
    ("dtype", "s_dtype", "y_dtype", "want"),
    [
        (None, np.float64, np.float32, np.float64),
        (None, np.float32, np.float64, np.float64),
        (None, np.float32, np.float32, np.float32),
        (np.float32, np.float64, np.float64, np.float32),
    ],
    ids=["none-f64-plus-f32", "none-f32-plus-f64", "none-f32", "f32-ops"],
)
def test_gather_sum_is_in_the_ops_dtype_or_the_sums_own(
    dtype: Any, s_dtype: Any, y_dtype: Any, want: Any
) -> None:
    """``gather_sum``'s rows are s + y in the ops' dtype, or (an ops without one) in numpy's result type of
    s and y: a float64 sum is not rounded to float32 because one operand is."""
    s = np.array([[1.0 + 2.0**-40, 3.0], [5.0, 7.0]], dtype=s_dtype)
    y = np.array([[0.1, 0.2]], dtype=y_dtype)
    extra = np.zeros((1, 2), dtype=s_dtype)
    out = NumpyOps(dtype).gather_sum(s, np.array([0, 1, 0]), y, np.array([0, 0, -1]), extra)
    assert out.dtype == np.dtype(want)
    np.testing.assert_array_equal(out[:2], (s + y).astype(want))
    np.testing.assert_array_equal(out[2], [0.0, 0.0])


def test_sums_that_overflow_are_inf_without_a_warning() -> None:
    """``add`` and ``gather_sum`` give inf for a sum past float64's range without a numpy overflow warning:
    unnamed, as it is; named, refused with NonFiniteError naming it."""
    big = np.array([[1e308, 1.0]])
    ops = NumpyOps()
    with no_warnings():
        assert np.isinf(ops.gather_sum(big, np.array([0]), big, np.array([0]), big)[0, 0])
        with pytest.raises(NonFiniteError) as info:
            ops.gather_sum(big, np.array([0]), big, np.array([0]), big, name="summed rows")
        assert str(info.value) == "summed rows holds NaN or Inf"
        with pytest.raises(NonFiniteError) as info:
            ops.add(big, big, name="residual")
        assert str(info.value) == "residual holds NaN or Inf"


# -- indices -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda ops: ops.take_rows(np.zeros((3, 2)), RAGGED),
            "a row index must be a 1-D integer array: " + _numpy_error(RAGGED),
        ),
        (lambda ops: ops.take_rows(np.zeros((3, 2)), np.array([3])), "row index out of range for 3 rows"),
        (lambda ops: ops.rows_finite(np.zeros((3, 2)), np.array([-1])), "row index out of range for 3 rows"),
        (lambda ops: ops.rows_to_numpy(np.zeros((2, 2)), np.array([5])), "row index out of range for 2 rows"),
        (
            lambda ops: ops.take_rows(np.zeros((3, 2)), np.array([0.0])),
            "a row index must be a 1-D integer array, got float64 of shape (1,)",
        ),
        (
            lambda ops: ops.take_last(np.zeros((3, 2)), RAGGED),
            "a column index must be a 1-D integer array: " + _numpy_error(RAGGED),
        ),
        (lambda ops: ops.take_rows(np.array(1.0), np.array([0])), "an array of shape () has no axis 0"),
        (lambda ops: ops.take_last(np.array(1.0), np.array([0])), "an array of shape () has no axis -1"),
    ],
    ids=["ragged", "past-the-end", "negative", "rows-to-numpy", "float", "ragged-columns", "0-d", "0-d-last"],
)
def test_row_gathers_refusals_name_a_row_index_and_the_rows(
    call: Callable[[NumpyOps], Any], message: str
) -> None:
    """The row gathers refuse an index that is not 1-D integers within x's rows with ShapeError naming a row
    index and the number of rows (``take_last``: a column index), and an array without the axis."""
    with pytest.raises(ShapeError) as info:
        call(NumpyOps())
    assert str(info.value) == message


def test_take_last_gathers_the_entries_of_a_1_d_array() -> None:
    """``take_last`` of a 1-D array gathers its entries (its last axis is its only one)."""
    np.testing.assert_array_equal(
        NumpyOps().take_last(np.array([1.0, 2.0, 3.0]), np.array([2, 0])), [3.0, 1.0]
    )


@pytest.mark.parametrize(
    ("from_s", "from_y", "n", "message"),
    [
        (RAGGED, np.array([0]), 1, "from_s must be a 1-D integer array: " + _numpy_error(RAGGED)),
        (np.array([0]), RAGGED, 1, "from_y must be a 1-D integer array: " + _numpy_error(RAGGED)),
        (np.array([0.0]), np.array([0]), 1, "from_s must be a 1-D integer array, got float64 of shape (1,)"),
        (np.array([0]), np.array([[0]]), 1, "from_y must be a 1-D integer array, got int64 of shape (1, 1)"),
        (np.array([0, 1]), np.array([0]), 2, "2 rows from s but 1 from y"),
        (np.array([0]), np.array([0, 1]), 2, "1 rows from s but 2 from y"),
        (np.array([2**63], dtype=np.uint64), np.array([0]), 1, "from_s holds an index past int64"),
        (np.array([2**63 - 1], dtype=np.uint64), np.array([0]), 1, "a row index outside s, y or extra"),
        (np.array([2]), np.array([-1]), 2, "a row index outside s, y or extra"),
        (np.array([2]), np.array([0]), 2, "a row index outside s, y or extra"),
        (np.array([0]), np.array([2]), 2, "a row index outside s, y or extra"),
        (np.array([-1]), np.array([0]), 2, "a row index outside s, y or extra"),
    ],
    ids=[
        "ragged-from-s",
        "ragged-from-y",
        "float-from-s",
        "2-d-from-y",
        "more-from-s",
        "more-from-y",
        "past-int64",
        "int64-max",
        "decoy-past-extra",
        "past-s",
        "past-y",
        "negative-from-s",
    ],
)
def test_gather_sum_index_refusals_name_the_index_at_fault(
    from_s: Any, from_y: Any, n: int, message: str
) -> None:
    """``gather_sum_index`` refuses with ShapeError naming ``from_s`` or ``from_y`` when it is not 1-D
    integers or holds an unsigned entry past int64, both lengths when they differ, and an entry outside s,
    y or extra (a decoy's row index too, and an unsigned entry that fits int64 but no array)."""
    with pytest.raises(ShapeError) as info:
        gather_sum_index(from_s, from_y, n, n, n)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("x", "y", "want"),
    [
        (np.zeros((2, 3)), 2.0, (2, 3)),
        (3, np.zeros(4), (4,)),
        (2.0, 1, ()),
        (np.zeros(3), [[1.0], [2.0]], (2, 3)),
        (torch.zeros(2, 1), np.zeros(3), (2, 3)),
    ],
    ids=["array-and-float", "int-and-array", "two-scalars", "array-and-nested-list", "tensor-and-array"],
)
def test_broadcast_shape_reads_a_value_without_a_shape_with_np_shape(x: Any, y: Any, want: Any) -> None:
    """``broadcast_shape`` reads the shape of a scalar (or anything else without a ``shape`` attribute)
    as ``np.shape`` does, and broadcasts it by numpy's rule."""
    assert broadcast_shape(x, y) == want


def test_add_refuses_operands_that_do_not_broadcast_naming_both_shapes() -> None:
    """``add`` and ``sub`` refuse operands whose shapes do not broadcast with ShapeError naming both."""
    for op in (NumpyOps().add, NumpyOps().sub):
        with pytest.raises(ShapeError) as info:
            op(np.zeros(3), [1.0, 2.0])
        assert str(info.value) == "arrays of shapes (3,) and (2,) do not broadcast"


# -- project64 --------------------------------------------------------------------------------------


def test_project64_computes_both_results_in_float64() -> None:
    """``project64`` computes ``x·right`` and the row norms in float64 whatever x's dtype: both results are
    float64 and the norms are float64's, not float32's rounded up."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    right = rng.standard_normal((7, 3))
    prod, norms = NumpyOps(np.float32).project64(x, right)
    x64 = x.astype(np.float64)
    assert prod.dtype == np.dtype(np.float64)
    assert norms.dtype == np.dtype(np.float64)
    np.testing.assert_allclose(prod, x64 @ right, rtol=1e-14)
    np.testing.assert_allclose(norms, np.sqrt((x64 * x64).sum(axis=1)), rtol=1e-14)


def test_project64_refusal_names_both_shapes() -> None:
    """``project64`` refuses ``right`` without one row per column of x with ShapeError naming both shapes."""
    with pytest.raises(ShapeError) as info:
        NumpyOps().project64(np.zeros((2, 3)), np.zeros((2, 1)))
    assert str(info.value) == "rows (2, 3) against check vectors (2, 1)"

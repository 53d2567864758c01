"""Regression tests of the backends: one broadcasting check and message for the
numpy and torch backends' add and sub (:func:`scx_ref.arrays.broadcast_shape`), and one RMSNorm for a row
whose sum of squares comes near the dtype's range, whether the torch backend runs it fused or eagerly."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch

from properties.kernel_paths import same
from scx_ref.arrays import NumpyOps, broadcast_shape
from scx_ref.backends import cpu_kernels, torch_backend
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import FUSED_NORM_MIN, TorchBackend, TorchOps
from scx_ref.errors import ShapeError
from tests.tiny import tiny_weights

needs_numba = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed")

# -- one broadcasting check ------------------------------------------------------------------------------

#: Pairs of shapes that do not broadcast (trailing axes of different lengths, neither 1; an empty axis
#: against two rows; more leading axes that disagree).
BAD = [((3, 8), (3, 2)), ((2, 3), (2,)), ((4, 1, 5), (3, 4, 5)), ((0, 4), (2, 4)), ((5,), (4,))]
#: Pairs that do broadcast: a row against rows, a vector, a column against a row, an empty axis against
#: one row, a scalar.
GOOD = [((3, 8), (1, 8)), ((3, 8), (8,)), ((3, 1), (1, 4)), ((0, 4), (1, 4)), ((2, 3), ())]

_OPS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "add": lambda o, x, y: o.add(x, y),
    "add-named": lambda o, x, y: o.add(x, y, name="the sum"),
    "sub": lambda o, x, y: o.sub(x, y),
    "add_into": lambda o, x, y: o.add_into(x, y),
}


def _paths() -> list[bool]:
    """The torch paths to run on: the fused kernels (where numba is installed) and the eager ops."""
    return [True, False] if cpu_kernels.kernels() is not None else [False]


def _refusal(call: Callable[[], Any]) -> str:
    """The message of the ShapeError ``call`` raises (the test fails on no error or another one)."""
    with pytest.raises(ShapeError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("op", sorted(_OPS))
@pytest.mark.parametrize(("a", "b"), BAD)
def test_shapes_that_do_not_broadcast_are_refused_alike_by_both_backends(
    op: str, a: tuple[int, ...], b: tuple[int, ...]
) -> None:
    """x ± y of shapes that do not broadcast: ShapeError from the numpy ops, the numpy backend and the torch
    ops (fused and eager, float32 and float64), all with broadcast_shape's one message naming both shapes."""
    want = _refusal(lambda: broadcast_shape(np.ones(a), np.ones(b)))
    assert want == f"arrays of shapes {a} and {b} do not broadcast"
    x, y = np.ones(a), np.ones(b)
    got = {
        "numpy ops": _refusal(lambda: _OPS[op](NumpyOps(), x.copy(), y.copy())),
        "numpy backend": _refusal(lambda: _OPS[op](NumpyBackend(tiny_weights(0, n_layers=1)), x.copy(), y)),
    }
    for dtype in ("float32", "float64"):
        ops = TorchOps(dtype)
        tx, ty = torch.from_numpy(x).to(ops.dtype), torch.from_numpy(y).to(ops.dtype)
        for fused in _paths():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "ENABLED", fused)
                got[f"torch {dtype} fused={fused}"] = _refusal(partial(_OPS[op], ops, tx.clone(), ty))
    assert got == dict.fromkeys(got, want)


@pytest.mark.parametrize(("a", "b"), GOOD)
def test_shapes_that_broadcast_still_add_and_subtract(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    """Shapes that broadcast: broadcast_shape is numpy's broadcast shape, and every backend's x + y (named
    too, and in place) and x − y is numpy's, bit for bit."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(a), rng.standard_normal(b)
    assert broadcast_shape(x, y) == np.broadcast_shapes(a, b)
    assert broadcast_shape(torch.from_numpy(x), torch.from_numpy(y)) == np.broadcast_shapes(a, b)
    for op, want in (("add", x + y), ("add-named", x + y), ("add_into", x + y), ("sub", x - y)):
        assert np.array_equal(_OPS[op](NumpyOps(), x.copy(), y), want)
        for fused in _paths():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "ENABLED", fused)
                got = _OPS[op](TorchOps("float64"), torch.from_numpy(x.copy()), torch.from_numpy(y))
            assert np.array_equal(got.numpy(), want)


def test_a_torch_error_that_is_not_about_shapes_is_not_called_one() -> None:
    """Tensors of one shape that torch refuses for another cause (two bool tensors subtracted) still raise
    torch's own error: the shared check runs only after torch refuses, and only names a shape error."""
    t = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="bool") as info:
        TorchOps("float32").sub(t, t)
    assert not isinstance(info.value, ShapeError)


# -- one RMSNorm near the dtype's range ------------------------------------------------------------------

#: Row scales (the largest |x| of a row) past which float32's sum of squares overflows (sqrt(max) ≈ 1.84e19)
#: or float64's (≈ 1.34e154), with rows below for contrast.
SCALES = {
    torch.float32: [1.0, 1e18, 1.8e19, 2e19, 1e30, 3e38],
    torch.float64: [1.0, 1e153, 1.3e154, 1e155, 1e300],
}


def _huge_rows(dtype: torch.dtype, rows: int, width: int) -> torch.Tensor:
    """``rows`` rows of ``width``: every scale of :data:`SCALES` in turn times a random row whose largest
    entry is ±1 (so the row's largest |x| is the scale)."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-1.0, 1.0, size=(rows, width))
    x /= np.abs(x).max(axis=1, keepdims=True)
    scales = np.resize(np.array(SCALES[dtype]), rows)
    return torch.from_numpy(x * scales[:, None]).to(dtype)


def _near(x: torch.Tensor) -> torch.Tensor:
    """Which rows of ``x`` have a sum of squares of at least half the dtype's range (in float64; inf past
    float64's): the rows the two paths must normalize alike, bit for bit. Other rows' norms differ by
    rounding (fused: within 4u of the exact norm; eager: (w + 8)u, properties/test_fused.py)."""
    with np.errstate(over="ignore"):
        sums = np.square(x.double().numpy()).sum(axis=1)
    return torch.from_numpy(sums >= float(torch.finfo(x.dtype).max) / 2)


def _norms(tb: TorchBackend, x: torch.Tensor, *, fused: bool, name: str | None = None) -> torch.Tensor:
    """``tb.norm(x, "final")`` by the fused kernel (on however few entries) or by the eager ops."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "FUSED_NORM_MIN", 0 if fused else 1 << 62)
        return tb.norm(x, "final", name=name)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_near_the_range_gets_one_norm_fused_or_eager(dtype: torch.dtype) -> None:
    """Rows whose sum of squares overflows the dtype (float32: |x| past ~1.8e19): the fused norm gave the
    finite norm of its float64 sum where the eager ops give zeros; now both give the eager ops' bits, with
    a name too (the rows are finite: not refused), in one chunk and split across threads."""
    tb = TorchBackend(tiny_weights(0, n_layers=1), dtype)
    x = _huge_rows(dtype, 24, tb.config.hidden_size)
    eager, near = _norms(tb, x, fused=False), _near(x)
    overflowed = (eager == 0).all(dim=1)
    assert overflowed.any() and not overflowed.all() and torch.equal(overflowed & near, overflowed)
    for threads in (1, 2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "MIN_PARALLEL", 0 if threads > 1 else 1 << 62)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for fused in (_norms(tb, x, fused=True), _norms(tb, x, fused=True, name="x")):
                    assert same(fused[near], eager[near])
                    assert torch.isfinite(fused[~near]).all() and (fused[~near] != 0).any(dim=1).all()
            finally:
                torch.set_num_threads(before)


@needs_numba
def test_a_row_within_a_factor_two_of_the_range_is_normalized_as_the_eager_ops_do() -> None:
    """Random float32 rows scaled so that their sum of squares is 0.75 of float32's range (the eager sum
    does not overflow, yet the fused pass hands them to the eager ops): the eager bits, finite and not
    zero, where the fused pass's own norm differs from them in the last bits for some of the rows."""
    tb = TorchBackend(tiny_weights(0, n_layers=1), "float32")
    rows = np.random.default_rng(3).uniform(-1.0, 1.0, size=(32, tb.config.hidden_size))
    rows *= np.sqrt(0.75 * float(np.finfo(np.float32).max) / np.square(rows).sum(axis=1, keepdims=True))
    x = torch.from_numpy(rows).to(torch.float32)
    eager = _norms(tb, x, fused=False)
    assert torch.isfinite(eager).all() and (eager != 0).any(dim=1).all() and _near(x).all()
    assert same(_norms(tb, x, fused=True), eager)


@needs_numba
def test_a_row_that_is_not_finite_does_not_hide_a_huge_row_beside_it() -> None:
    """A call holding a NaN row and an overflowing row (no name: not refused): the huge row's norm is still
    the eager ops' zeros, and the NaN row NaN, fused as eager."""
    tb = TorchBackend(tiny_weights(0, n_layers=1), "float32")
    x = _huge_rows(torch.float32, 6, tb.config.hidden_size)
    x[0, 3] = float("nan")
    eager, near = _norms(tb, x, fused=False), _near(x)
    assert eager[0].isnan().any() and (eager[3] == 0).all() and near[3]
    fused = _norms(tb, x, fused=True)
    assert same(fused[near], eager[near]) and fused[0].isnan().any()


@needs_numba
def test_a_row_gets_the_same_norm_alone_or_in_a_prompt_of_many_rows() -> None:
    """The symptom: one overflowing float32 row normalized alone (a generation step: eager ops) and among
    enough rows to reach FUSED_NORM_MIN (a prompt: the fused pass) — the same bits (it was finite in the
    prompt and zeros alone)."""
    tb = TorchBackend(tiny_weights(0, n_layers=1), "float32")
    w = tb.config.hidden_size
    many = _huge_rows(torch.float32, -(-FUSED_NORM_MIN // w), w)
    assert many.numel() >= FUSED_NORM_MIN
    together, near = tb.norm(many, "final"), _near(many)
    assert near[: len(SCALES[torch.float32])].sum() == 4  # from 1.8e19 on
    for i in range(len(SCALES[torch.float32])):
        if near[i]:
            assert same(tb.norm(many[i : i + 1], "final")[0], together[i])


@pytest.mark.parametrize("scale", [1.0, 2e19, 1e30])
def test_the_float32_norm_near_the_range_is_hugging_faces(scale: float) -> None:
    """Hugging Face's LlamaRMSNorm (float32: zeros where its mean of squares overflows) and the torch
    backend's float32 norm on every path: the same bits for a row past the range (and for an ordinary row
    by the eager ops, which are Hugging Face's)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    weights = tiny_weights(0, n_layers=1)
    tb = TorchBackend(weights, "float32")
    x = (_huge_rows(torch.float64, 1, tb.config.hidden_size) * scale).to(torch.float32)
    hf = llama.LlamaRMSNorm(tb.config.hidden_size, eps=weights.config.rms_eps)
    hf.weight.data = torch.from_numpy(np.asarray(weights.final_norm)).to(torch.float32)
    with torch.no_grad():
        want = hf(x)
    assert same(_norms(tb, x, fused=False), want)
    if cpu_kernels.kernels() is not None and bool(_near(x)[0]):
        assert same(_norms(tb, x, fused=True), want)


@needs_numba
def test_the_scale_test_kernel() -> None:
    """any_at_most: whether an entry is ≤ the bound; NaN is not, and no entry is none."""
    k = cpu_kernels.kernels()
    assert k is not None
    for dtype in (np.float32, np.float64):
        assert k.any_at_most(np.array([3.0, 1.0, 2.0], dtype=dtype), 1.0)
        assert not k.any_at_most(np.array([3.0, np.nan, 2.0], dtype=dtype), 1.0)
        assert not k.any_at_most(np.empty(0, dtype=dtype), 1.0)


def test_a_read_only_array_is_never_written_through_a_tensor() -> None:
    """torch.from_numpy aliases a read-only array (with a UserWarning) and a tensor is always writable: the
    backend's in-place ops wrote into memory its owner had marked read-only. Such an array is copied."""
    import warnings

    from scx_ref.backends.torch_backend import TorchBackend
    from tests.tiny import tiny_weights

    b = TorchBackend(tiny_weights(0).astype(np.float32), torch.float32)
    for convert in (lambda a: b.floating(a, "x"), b.from_numpy):
        arr = np.zeros((2, 3), np.float32)
        arr.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's non-writable-array warning would be an error here
            t = convert(arr)
        b.add_into(t, torch.ones(2, 3))
        t.add_(1.0)
        assert not arr.any()
    writable = np.zeros((2, 3), np.float32)  # a writable array is still taken as it is (no copy)
    assert b.floating(writable, "x").data_ptr() == writable.ctypes.data

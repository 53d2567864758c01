"""The fused CPU kernels' guards: the kernels index without bounds checks, so every shape,
index and count they are given is checked before they read — by the kernel where it tests the fit
itself, by the torch backend's wrapper otherwise — and a misshapen argument is a ShapeError, not an
error from numba's compiler."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from properties.kernel_paths import one_chunk_or_split
from scx_ref.backends import cpu_kernels
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ShapeError
from tests.tiny import tiny_weights

needs_numba = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed")

#: attention_check's constants after its arrays and ``first``: scale, u, λ, u₆₄, tiny
_CONSTANTS = (0.5, 2.0**-24, 1.0, 2.0**-53, 1e-300)


def _attention_check(q: Any, k: Any, first: int, group: int, ranged: bool) -> tuple[float, float]:
    kern = cpu_kernels.kernels()
    assert kern is not None
    o = np.ones(q.shape, q.dtype)
    got = kern.attention_check(q, k, k.copy(), o, np.arange(q.shape[0]), first, group, *_CONSTANTS, ranged, 1)
    return float(got[0]), float(got[1])


@needs_numba
@pytest.mark.parametrize("ranged", [False, True])
def test_attention_check_refuses_counts_whose_sums_wrap_around(ranged: bool) -> None:
    """``attention_check`` tests that its queries fit its keys and its heads its group before it reads; a
    first position near 2⁶³ made ``first + queries`` wrap around below the key count, and a group near
    2⁶² made ``H_kv·group`` wrap around to the query heads: the first read the key norms far outside
    their array (a verdict from whatever lay there), the second left the recomputed rows' norms unwritten.
    Both are refused now (−1, −1) — and the fitting call is still answered."""
    q, k = np.ones((1, 4, 4), np.float32), np.ones((2, 2, 4), np.float32)
    assert _attention_check(q, k, 2**63 - 1, 2, ranged) == (-1.0, -1.0)
    assert _attention_check(q, np.ones((2, 4, 4), np.float32), 0, 2**62 + 1, ranged) == (-1.0, -1.0)
    assert _attention_check(q, k, 0, 0, ranged) == (-1.0, -1.0)  # no group of heads: refused, not ÷ 0
    assert _attention_check(q, k, 1, 2, ranged) == (0.0, 0.0)  # the last query at the last key


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend(tiny_weights(0), "float32")


_TERMS = (np.zeros(2), np.ones(2), np.ones(2), 1e-300)


@needs_numba
def test_freivalds_excess_refuses_sides_that_are_not_rows_by_vectors(backend: TorchBackend) -> None:
    """The compiled Freivalds check reads products (rows × k), norms (rows), check vectors (width × k) and
    terms (k): a vector for a matrix or a matrix for a vector is a ShapeError (a TypingError from numba's
    compiler before). Products given in float32 are read as float64, the same verdict as float64 ones
    (they failed to compile before)."""
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    r = np.random.default_rng(0).standard_normal((16, 2))
    bad: dict[str, Any] = {
        "products a vector": lambda: backend.freivalds_excess(h, r, (np.zeros(5), np.zeros(5)), r, _TERMS),
        "norms a matrix": lambda: backend.freivalds_excess(
            h, r, (np.zeros((5, 2)), np.zeros((5, 1))), r, _TERMS
        ),
        "not a pair": lambda: backend.freivalds_excess(h, r, np.zeros((5, 2)), r, _TERMS),  # type: ignore[arg-type]
        "check vectors a vector": lambda: backend.freivalds_excess(h, np.ones(16), h, r, _TERMS),
        "terms a matrix": lambda: backend.freivalds_excess(h, r, h, r, (np.zeros((2, 1)), *_TERMS[1:])),
    }
    for case, call in bad.items():
        with pytest.raises(ShapeError):
            call()
            pytest.fail(case)
    yr, yn = backend.project64(h, r)
    want = backend.freivalds_excess((yr, yn), r, h, r, _TERMS)
    assert want is not None and want == 0.0
    got = backend.freivalds_excess((yr.astype(np.float32), yn.astype(np.float32)), r, h, r, _TERMS)
    assert got is not None and 0.0 < got < 1.0  # the float32 rounding of the products, well inside τ


@needs_numba
def test_gate_up_excess_refuses_check_vectors_that_are_not_matrices(backend: TorchBackend) -> None:
    """A dense MLP reply's compiled checks: a check vector given as a vector, or a term as a matrix, is a
    ShapeError (a TypingError from numba's compiler before)."""
    c = backend.config
    f, d = c.intermediate_size, c.hidden_size
    gu, h = torch.randn(5, 2 * f), torch.randn(5, d)
    up = (np.ones((2 * f, 2)), np.ones((d, 2)), _TERMS)
    down = (np.ones((d, 2)), np.ones((f, 2)), _TERMS)
    assert backend.gate_up_excess(gu, h, h, 0, up, down) is not None  # the fitting call is answered
    for bad_up, bad_down in (
        ((np.ones(2 * f), *up[1:]), down),
        (up, (down[0], np.ones(f), down[2])),
        (up, (*down[:2], (np.zeros((2, 1)), *_TERMS[1:]))),
    ):
        with pytest.raises(ShapeError):
            backend.gate_up_excess(gu, h, h, 0, bad_up, bad_down)


@pytest.mark.parametrize("fused", [True, False])
def test_column_gathers_refuse_an_index_that_is_not_1d(backend: TorchBackend, fused: bool) -> None:
    """``rope_take`` and ``take_rows_cols_concat`` take their column indices as 1-D integer arrays: a 0-d
    one is a ShapeError on the fused pass and the eager ops alike (``len()`` raised TypeError before)."""
    c = backend.config
    x = torch.randn(3, c.q_dim + 2 * c.kv_dim)
    roped, plain = np.arange(c.q_dim + c.kv_dim), np.arange(c.kv_dim)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        with pytest.raises(ShapeError):
            backend.rope_take(x, np.arange(3), np.arange(3), np.array(5), plain)
        with pytest.raises(ShapeError):
            backend.rope_take(x, np.arange(3), np.arange(3), roped, np.array(5))
        with pytest.raises(ShapeError):
            backend.take_rows_cols_concat(torch.randn(4, 6), np.array(3), torch.randn(1, 1), np.arange(2))
        backend.rope_take(x, np.arange(3), np.arange(3), roped, plain)  # the 1-D indices still taken
        backend.take_rows_cols_concat(torch.randn(4, 6), np.array([3]), torch.randn(1, 1), np.arange(5))


@needs_numba
def test_a_failed_split_pass_gives_the_parallel_pool_back(backend: TorchBackend) -> None:
    """A pass split across threads holds the parallel pool for its block alone: an error inside the block
    (a RoPE position below the tables, found after the pass started) or from the kernel's result (a row
    outside the arrays) leaves the pool free, so the next pass splits again."""
    c = backend.config
    x = torch.randn(3, c.q_dim + 2 * c.kv_dim)
    roped, plain = np.arange(c.q_dim + c.kv_dim), np.arange(c.kv_dim)
    with one_chunk_or_split(True):
        for rows, pos in ((np.arange(3), np.array([0, -1, 2])), (np.array([0, 1, 3]), np.arange(3))):
            with pytest.raises(ShapeError):
                backend.rope_take(x, rows, pos, roped, plain)
            assert not cpu_kernels._pool.locked()
        kern = cpu_kernels.kernels()
        assert kern is not None
        with kern.parts(1 << 20, 2) as parts:
            assert parts == min(2, kern.max_threads)


def test_numpy_rope_take_and_the_range_check_refuse_degenerate_shapes() -> None:
    """NumpyBackend.rope_take with a 0-d column index raised a raw TypeError (len() of an unsized object);
    the verifier's range check of heads of width 0 divided by zero (compiled) or raised numpy's ValueError."""
    from scx_ref.backends.numpy_backend import NumpyBackend
    from scx_ref.errors import SCXError
    from scx_ref.protocol.verify import range_shapes

    w = tiny_weights(1)
    nb = NumpyBackend(w)
    x = np.ones((2, w.config.q_dim + w.config.kv_dim))
    with pytest.raises(ShapeError, match="1-D"):
        nb.rope_take(x, np.arange(2), np.arange(2), np.int64(0), np.arange(3))
    with pytest.raises(SCXError, match="keys × H_kv × d_h"):
        range_shapes((4, 2, 0), (4, 2, 2, 0), 0)
    range_shapes((4, 2, 8), (4, 2, 2, 8), 0)  # a head of width 8 fits

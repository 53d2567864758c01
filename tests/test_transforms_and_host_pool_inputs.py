"""The transforms' reference (:mod:`scx_ref.transforms`) and the pooled host memory
(:mod:`scx_ref.backends.host_memory`): bad input gives a project error, never a raw exception or a silently
non-finite result; a copied :class:`Permutation` stays checked and read-only; a buffer the pool cannot
hold leaves the pool's idle memory in place."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref import transforms as T
from scx_ref.backends import host_memory
from scx_ref.errors import ConfigError, NonFiniteError, ShapeError

KIB = 1 << 10


class _Fixed:
    """A noise source whose uniforms are one given value (a buggy ``random``), counting its calls."""

    def __init__(self, value: Any) -> None:
        self.value, self.calls = value, 0

    def random(self, size: Any = None) -> Any:
        self.calls += 1
        if isinstance(self.value, float):
            return np.full(size, self.value)
        return self.value


def test_blinding_correction_refuses_a_ragged_weight_list() -> None:
    eta = np.ones((3, 2))
    with pytest.raises(ShapeError, match="w must be a rectangular array"):
        T.blinding_correction(eta, [[1.0, 2.0], [3.0]])
    np.testing.assert_array_equal(T.blinding_correction(eta, [[1.0], [2.0]]), np.full((3, 1), 3.0))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_laplace_noise_refuses_a_scale_whose_draws_overflow(dtype: type[np.floating[Any]]) -> None:
    """The largest draw (u = 0: |η| = 53·ln 2·β) is finite up to the bound; past it β is refused before
    anything is drawn, where the noise was inf."""
    top = float(np.finfo(dtype).max) / (53 * np.log(2))
    gen = _Fixed(0.0)
    eta = T.laplace_noise((2,), top * 0.999, gen, dtype=dtype)
    assert eta.dtype == dtype and np.isfinite(eta).all()
    assert abs(float(eta[0])) > 0.99 * float(np.finfo(dtype).max)
    gen = _Fixed(0.0)
    with pytest.raises(ConfigError, match="too large for"):
        T.laplace_noise((2,), top * 1.01, gen, dtype=dtype)
    assert gen.calls == 0


@pytest.mark.parametrize("value", [float("nan"), -0.25, 1.0, 1.5, "ab"])
def test_laplace_noise_refuses_uniforms_outside_0_1(value: Any) -> None:
    """NaN uniforms gave NaN noise and strings a bare ValueError; values outside [0, 1) are no uniforms."""
    with pytest.raises(ConfigError, match=r"gen.random\(\(3,\)\) gave"):
        T.laplace_noise((3,), 1.0, _Fixed(value))


def test_decode_qkv_heads_needs_a_backend_not_bare_array_ops() -> None:
    head = T.HeadPermutation.identity(1, 2)
    z = np.zeros((2, 6))
    with pytest.raises(ConfigError, match="ops must be a backend with a model config, got NumpyOps"):
        T.decode_qkv_heads(z, [0, 1], 2, [0, 1], head, 1, T.NUMPY)  # type: ignore[arg-type]


def test_a_decoy_beyond_the_rows_dtype_is_refused_not_made_inf() -> None:
    """Decoys take the rows' dtype (float32 here): one past its range was cast to inf by with_decoys (and
    a RuntimeWarning from encode_rows, an exception where warnings are errors)."""
    x = np.ones((2, 3), dtype=np.float32)
    big = np.full((1, 3), 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError, match=r"\[x; decoys\] overflows"):
            T.with_decoys(x, big)
        with pytest.raises(NonFiniteError, match="x and decoys"):
            T.encode_rows(x, big, np.arange(3))
        out: np.ndarray[Any, Any] = T.with_decoys(x, np.full((1, 3), 2.0))  # a decoy in range: as before
    assert out.dtype == np.float32 and out.shape == (3, 3)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_copied_permutation_stays_read_only(how: str) -> None:
    """A pickled or deep-copied Permutation had writable arrays: a write to one made the other stale and
    the transforms, which do not check a Permutation again, silently wrong."""
    p = T.Permutation([2, 0, 1])
    if how == "pickle":
        q = pickle.loads(pickle.dumps(p))
    else:
        q = copy.deepcopy(p) if how == "deepcopy" else copy.copy(p)
    assert isinstance(q, T.Permutation)
    assert not q.forward.flags.writeable and not q.inverse.flags.writeable
    np.testing.assert_array_equal(q.forward, [2, 0, 1])
    np.testing.assert_array_equal(q.inverse, [1, 2, 0])
    with pytest.raises(ValueError):
        q.forward[0] = 0


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty pool lending from 64 KiB on, of at most 1 MiB (the module's own state restored after)."""
    monkeypatch.setattr(host_memory, "_maps", [])
    monkeypatch.setattr(host_memory, "_marked", set())
    monkeypatch.setattr(host_memory, "_reused", [0])
    monkeypatch.setattr(host_memory, "LARGE_BYTES", 64 * KIB)
    monkeypatch.setattr(host_memory, "POOL_BYTES", 1024 * KIB)
    yield


def test_a_buffer_the_pool_cannot_hold_leaves_its_idle_mappings(pool: None) -> None:
    """A buffer larger than the pool, or one that would not fit even with every idle mapping released,
    is a plain tensor and releases nothing (it emptied the pool, so the next buffer that fits faulted
    its pages in again)."""
    c = host_memory.empty((32, 1024), torch.float32)  # 128 KiB
    idle = c.data_ptr()
    del c
    big = host_memory.empty((512, 1024), torch.float32)  # 2 MiB: beyond POOL_BYTES
    assert big.shape == (512, 1024) and host_memory.held_bytes() == 128 * KIB
    a = host_memory.empty((128, 1024), torch.float32)  # 512 KiB, lent
    b = host_memory.empty((64, 1024), torch.float32)  # 256 KiB, lent: 896 KiB held, 128 idle
    assert host_memory.held_bytes() == 896 * KIB
    d = host_memory.empty((80, 1024), torch.float32)  # 320 KiB: 768 lent + 320 > 1 MiB even if all idle go
    assert d.shape == (80, 1024) and host_memory.held_bytes() == 896 * KIB
    c = host_memory.empty((32, 1024), torch.float32)
    assert c.data_ptr() == idle  # the idle mapping is still there to be lent again
    del a, b, c, d, big


def test_a_negative_size_maps_nothing(pool: None) -> None:
    """Two negative sizes multiply to a large positive count: a mapping was made before the view failed."""
    with pytest.raises(RuntimeError):
        host_memory.empty((-2, -64 * KIB), torch.float32)
    assert host_memory.held_bytes() == 0

"""What the fused-kernel property suites share: run a computation with the CPU kernels — in one chunk
and split across threads — and again with them switched off (``cpu_kernels.ENABLED`` false, as
``SCX_NUMBA=0`` sets it: the same code on eager
torch / numpy ops), and skip where numba is not installed (then only the eager path exists, and the
other suites test it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import cpu_kernels
from scx_ref.backends.cpu_kernels import kernels
from scx_ref.protocol import verify

__all__ = ["FUSED_OR_EAGER", "fused_and_eager", "needs_numba", "one_chunk_or_split", "same"]

needs_numba = pytest.mark.skipif(
    kernels() is None, reason="numba is not installed (the eager path is tested)"
)

#: ``pytest.mark.parametrize`` values of a test taking ``fused``: True (the compiled kernels; skipped without
#: numba) and False (the eager ops) — for a test that switches ``cpu_kernels.ENABLED`` itself
FUSED_OR_EAGER = [pytest.param(True, marks=needs_numba, id="kernels"), pytest.param(False, id="eager")]

#: The thread count the split run asks for (the kernels use at most numba's, the machine's cores).
SPLIT_THREADS = 3


def same(a: Any, b: Any) -> bool:
    """Whether two results are the same values bit for bit (tensors, arrays, tuples of them, scalars);
    NaN is the same as NaN (any payload), and 0.0 is not the same as -0.0."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        return bool((((a == b) & (a.signbit() == b.signbit())) | (a.isnan() & b.isnan())).all())
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.kind == "f":
            return bool((((a == b) & (np.signbit(a) == np.signbit(b))) | (np.isnan(a) & np.isnan(b))).all())
        return np.array_equal(a, b, equal_nan=a.dtype.kind == "c")
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        both_nan = math.isnan(a) and math.isnan(b)
        return both_nan or (a == b and math.copysign(1.0, a) == math.copysign(1.0, b))
    return bool(type(a) is type(b) and a == b)


def fused_and_eager(mp: pytest.MonkeyPatch, fn: Any) -> tuple[Any, Any]:
    """``fn()`` with the fused kernels, then with them switched off (``cpu_kernels.ENABLED`` false). The
    fused run is done twice — each pass in one chunk, then every pass split across threads however small
    (``MIN_PARALLEL`` and the verifier's ``SPLIT_ROWS64`` 0, torch's threads :data:`SPLIT_THREADS`) —
    and the two must agree bit for bit; the split run's result is returned."""
    one = fn()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as split_mp:
        split_mp.setattr(cpu_kernels, "MIN_PARALLEL", 0)
        split_mp.setattr(verify, "SPLIT_ROWS64", 0)
        torch.set_num_threads(SPLIT_THREADS)
        try:
            split = fn()
        finally:
            torch.set_num_threads(threads)
    assert same(split, one), "the fused passes split across threads differ from one chunk"
    mp.setattr(cpu_kernels, "ENABLED", False)
    eager = fn()
    mp.setattr(cpu_kernels, "ENABLED", True)
    return split, eager


@contextmanager
def one_chunk_or_split(split: bool) -> Iterator[None]:
    """Run the block's fused passes in one chunk (torch on one thread) or split across two threads however
    small (``MIN_PARALLEL`` 0); torch's thread count is put back after."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        if split:
            mp.setattr(cpu_kernels, "MIN_PARALLEL", 0)
        torch.set_num_threads(2 if split else 1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

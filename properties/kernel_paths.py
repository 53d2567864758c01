"""What the fused-kernel property suites share: run a computation with the CPU kernels and again with
them switched off (``SCX_NUMBA=0``: the same code on eager torch / numpy ops), and skip where numba is
not installed (then only the eager path exists, and the other suites test it)."""

from __future__ import annotations

from typing import Any

import pytest

from scx_ref.backends.cpu_kernels import kernels

__all__ = ["fused_and_eager", "needs_numba"]

needs_numba = pytest.mark.skipif(
    kernels() is None, reason="numba is not installed (the eager path is tested)"
)


def fused_and_eager(mp: pytest.MonkeyPatch, fn: Any) -> tuple[Any, Any]:
    """``fn()`` with the fused kernels, then with them switched off (SCX_NUMBA=0)."""
    fused = fn()
    mp.setenv("SCX_NUMBA", "0")
    eager = fn()
    mp.delenv("SCX_NUMBA")
    return fused, eager

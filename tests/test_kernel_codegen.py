"""The compiled range check stores every update of its running extremes: no masked stores.

While an update stored back the value it had just loaded (``hi[t] = x if x > hi[t] else hi[t]``), LLVM
compiled the loop with AVX masked stores (``vmaskmovps`` / ``vmaskmovpd``), which AMD's Zen cores run as
microcode: the range check of an attention reply ran several times slower there than it does now
(models/results/PERFORMANCE.md, stop 52). These tests compile the kernel's own source afresh — numba's
disk cache keeps no assembly to read — and read the assembly LLVM made for this CPU. The instructions
exist on x86 CPUs with AVX only; elsewhere the tests are skipped (a skip, not a pass).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

numba = pytest.importorskip("numba")
llvm = pytest.importorskip("llvmlite.binding")

from scx_ref.backends import numba_kernels as nk  # noqa: E402  (after the skips: needs numba)

#: AVX's masked stores (vmaskmovps, vmaskmovpd, vpmaskmovd/q to memory; AT&T syntax, the memory operand
#: last: ``vmaskmovps %ymm1, %ymm0, (%rax)``), and AVX-512's: a move to memory under a mask register
#: (``vmovups %ymm0, (%rax) {%k1}``). Masked loads are not counted: Zen runs those at full speed
_MASKED_STORE = re.compile(
    r"\bvp?maskmov\w*\s+%[xyz]mm\d+,\s*%[xyz]mm\d+,\s*[^\n]*\)"
    r"|\bvmov\w*\s+%[xyz]mm\d+,\s*[^\n]*\)\s*\{%k\d\}"
)
#: a vectorized select: AVX's blend, AVX-512's blend under a mask, or a packed max / min
_VECTOR_SELECT = re.compile(r"\bvblendv|\bvblendm|\bvmaxp|\bvminp")


def _has_avx() -> bool:
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx", False))


pytestmark = pytest.mark.skipif(not _has_avx(), reason="no AVX on this CPU: no vmaskmov to find")


def _assembly(kernel: Any, *args: Any) -> str:
    """The x86 assembly of a fresh compile of ``kernel``'s source for ``args``' types (run once on them)."""
    fresh = numba.njit(boundscheck=False, nogil=True)(kernel.py_func)
    fresh(*args)
    (sig,) = fresh.signatures
    text: str = fresh.inspect_asm(sig)
    return text


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_range_check_updates_without_masked_stores(dtype: Any) -> None:
    """``range_excess``'s running max, min, max |v| and excess are stored on every update (a compare and a
    blend), never as a masked store of the lanes that changed."""
    rng = np.random.default_rng(0)
    h_kv, group, d_h, n = 3, 3, 64, 40
    v = rng.standard_normal((n, h_kv * d_h)).astype(dtype)
    o = rng.standard_normal((n, h_kv * group * d_h)).astype(dtype)
    acc = np.empty((5, h_kv * d_h), dtype=dtype)
    asm = _assembly(nk.range_excess, v, o, 0, group, d_h, acc)
    assert _VECTOR_SELECT.search(asm), "the updates were not vectorized"
    found = _MASKED_STORE.findall(asm)
    assert not found, f"{len(found)} masked stores in the range check's loops"

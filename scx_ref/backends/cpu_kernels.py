"""Fused CPU kernels for the client's O(n·d) passes, compiled by numba when it is installed.

Each kernel does in one pass over the rows what the torch backend otherwise does in several eager ops
(a row gather, a column gather, RoPE, an add), so each row is read once and written once. They compute
*the same operations per element* as the eager form — gathers copy, RoPE is x₁c − x₂s and x₂c + x₁s with
each product rounded before the add (numba contracts no multiply-add unless asked), a sum is one add — so
the results are the same bits, which ``properties/test_fused.py`` checks against the eager form and the
numpy reference.

The kernels take numpy arrays (C-contiguous views of CPU tensors) and write into ``out`` arrays the caller
allocates. They are serial: the client's passes are memory-bound, and a second thread pool would compete
with torch's. :func:`kernels` returns ``None`` when numba is missing or ``SCX_NUMBA=0`` is set; callers
then use the eager form.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Kernels", "column_index", "kernels"]


def column_index(index: Any) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """A column index as the kernels take it: C-contiguous uint64 (numba then skips the negative-index
    wraparound in the inner loops). The values are checked non-negative by the transforms beforehand."""
    return np.ascontiguousarray(index, dtype=np.uint64)


@dataclass(frozen=True)
class Kernels:
    """The compiled kernels (numba dispatchers; each compiles per dtype on first call, cached on disk).
    Column indices are uint64 arrays (:func:`column_index`), row indices int64."""

    rope_take: Any
    take_rows_cols_concat: Any
    gather_sum: Any


_lock = threading.Lock()
_loaded: list[Kernels | None] = []


def kernels() -> Kernels | None:
    """The fused kernels, or ``None`` when numba is not installed or ``SCX_NUMBA=0`` (compiled once per
    process, thread-safe)."""
    if os.environ.get("SCX_NUMBA", "1") == "0":
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_build())
    return _loaded[0]


def _build() -> Kernels | None:
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(boundscheck=False, nogil=True, cache=True)

    @jit
    def rope_take(
        x: Any,
        rows: Any,
        cos: Any,
        sin: Any,
        rope_index: Any,
        plain_index: Any,
        d_h: int,
        out_rope: Any,
        out_plain: Any,
    ) -> None:
        # row j: RoPE the first len(rope_index) columns of x[rows[j]] head by head (HF rotate_half), then
        # gather them by rope_index; gather the columns after them by plain_index. The rotation runs on
        # slices indexed from 0 (no negative-index wraparound), so LLVM vectorizes it; the column indices
        # are unsigned for the same reason.
        width = rope_index.shape[0]
        half = d_h // 2
        buf = np.empty(width, dtype=x.dtype)
        for j in range(rows.shape[0]):
            src = x[rows[j]]
            c1, c2 = cos[j, :half], cos[j, half:d_h]
            s1, s2 = sin[j, :half], sin[j, half:d_h]
            for h in range(width // d_h):
                b = h * d_h
                x1, x2 = src[b : b + half], src[b + half : b + d_h]
                o1, o2 = buf[b : b + half], buf[b + half : b + d_h]
                for t in range(half):
                    o1[t] = x1[t] * c1[t] - x2[t] * s1[t]
                for t in range(half):
                    o2[t] = x2[t] * c2[t] + x1[t] * s2[t]
            dst = out_rope[j]
            for f in range(width):
                dst[f] = buf[rope_index[f]]
            dst = out_plain[j]
            rest = src[width:]
            for f in range(plain_index.shape[0]):
                dst[f] = rest[plain_index[f]]

    @jit
    def take_rows_cols_concat(x: Any, cols: Any, extra: Any, index: Any, out: Any) -> None:
        # row j: x[index[j], cols] when index[j] < rows(x), else extra[index[j] − rows(x)]
        n = x.shape[0]
        for j in range(index.shape[0]):
            p = index[j]
            dst = out[j]
            if p < n:
                src = x[p]
                for f in range(cols.shape[0]):
                    dst[f] = src[cols[f]]
            else:
                src = extra[p - n]
                for f in range(dst.shape[0]):
                    dst[f] = src[f]

    @jit
    def gather_sum(s: Any, from_s: Any, y: Any, from_y: Any, extra: Any, out: Any) -> None:
        # row j: s[from_s[j]] + y[from_y[j]] when from_y[j] ≥ 0, else extra[from_s[j]]
        for j in range(from_s.shape[0]):
            dst = out[j]
            if from_y[j] >= 0:
                a = s[from_s[j]]
                b = y[from_y[j]]
                for f in range(dst.shape[0]):
                    dst[f] = a[f] + b[f]
            else:
                a = extra[from_s[j]]
                for f in range(dst.shape[0]):
                    dst[f] = a[f]

    return Kernels(rope_take, take_rows_cols_concat, gather_sum)

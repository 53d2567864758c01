"""Fused CPU kernels for the client's O(n·d) passes and the torch backend's RMSNorm, compiled by numba when
it is installed.

Each kernel does in one pass over the rows what the torch backend otherwise does in several eager ops,
so each row is read once.

* The encoding passes (``rope_take``, ``take_rows_cols_concat``, ``gather_sum``: a row gather, a column
  gather, RoPE, an add) compute *the same operations per element* as the eager form — gathers copy, RoPE
  is x₁c − x₂s and x₂c + x₁s with each product rounded before the add (numba contracts no multiply-add
  unless asked), a sum is one add — so the results are the same bits, which ``properties/test_fused.py``
  checks against the eager form and the numpy reference. The three that build an encoded message
  (``take_rows_cols_concat``, ``gather_sum``, ``add_rows``) and the two that read a reply the protocol
  consumes (``rope_take``, ``permute_rows``) also tell whether every entry they wrote or read is finite,
  so the caller need not scan the array in a pass of its own.
* The reply verifier's passes (``project64``, ``project64_rms``, ``project64_gate_up``, ``range_excess``,
  ``attention_rows64``; :mod:`scx_ref.protocol.verify`) sum in float64. The verifier's tolerance holds for a
  float64 sum in any order, with or without fused multiply-adds, so these may be reassociated and contracted
  (LLVM then vectorizes the reductions); no other fast-math flag, so a NaN or an infinity propagates. Each
  such sum sits in a loop that stores nothing: a loop that also stores gets a runtime overlap test from LLVM's
  vectorizer, and the sum then took the vector or the scalar order depending on where the arrays happened to
  lie, so its last bits varied between runs
  (``properties/test_verifier_kernels.py::test_the_float64_sums_do_not_depend_on_where_the_arrays_lie``). The
  SwiGLU a dense MLP check redoes from the reply's gate/up, silu(gate)·up, is formed inside the pass in the
  dtype by the kernels' own silu (``silu_value``: ``ops.silu``'s form, e^−|x| by a polynomial and 2^k built
  from its bits in float32, by ``exp64`` in float64), which vectorizes: within 4.06 float32 roundings of the
  exact silu over every float32 in [−87, 87] (torch's: 2.93), so not torch's bits, and the verifier's
  tolerance allows the client's SwiGLU four roundings from the server's
  (``test_kernel_silu_is_silu_within_the_dtype``). torch's silu(gate) in a pass of its own before the call
  cost more in a request (the reply's gate half read cold and written to a fresh array). The products read
  four rows per loop where there are two check vectors (a prompt's rows), so each check-vector entry is loaded
  once for four rows. The recomputed attention rows take a KV head's query heads four at a time (each key and
  value row read and widened once for the four) and their softmax weights from ``exp64``: e^x by arithmetic
  alone (x = k·ln 2 + r, a Taylor polynomial of r, 2^k built from its bits), which LLVM vectorizes where
  ``np.exp`` in a loop is a call to libm per weight. It is within 2.5 u₆₄ of numpy's exp
  (``test_exp64_is_exp_within_two_roundings``), inside the client's float64 term of the rows' τ. On one thread
  with SmolLM2's heads and 16 rows (hot caches, Intel Xeon) the rows took 1.03 → 0.87 ms at 514 keys and 8.2 →
  4.1 ms at 2050. ``linear_excess`` (a check's verdict) rounds the same float64 operations as its numpy form,
  with no flag; ``freivalds_excess`` is a whole linear check in one call — the two products (``project64``,
  ``project64_rms``), their norm bounds and ``linear_excess``, the same kernels in the same order as the
  backend's wrappers and the verifier call them one by one (``gate_up_excess``: a dense MLP reply's two
  checks, ``project64_gate_up`` then two of them); ``project64_rms`` also tells whether a row's float64 sum of
  squares reaches half the dtype's largest value, where the backend's own norm may overflow to a row of zeros,
  and ``freivalds_excess`` then returns ``NEAR_RANGE`` so that the wrapper composes the check from the
  backend's own norm, the x̂ an honest server used; ``attention_excess`` (the recomputed attention rows'
  verdict) rounds the same operations as the numpy τ and verdict it replaces; ``attention_check`` is an
  attention reply's two checks in one call (``range_excess`` and its verdict, then ``attention_rows64`` and
  ``attention_excess``, in the verifier's order: the same verdicts); ``lock_check`` is a generation step's
  check against a last guard block's locked cache (``lock_scores_excess``: the sketch extended and the
  verdict, the numpy expressions in loops, so within float64 rounding of them).
* ``rms_norm`` (the backend's RMSNorm: on the server, the first read of the rows it normalizes) sums each
  row's squares in float64 (reassociated, in a loop that stores nothing), rounds the scale to the dtype
  and then rounds γ·(x·s) as the eager form does; it also tests every entry of x for finiteness, the
  server's check of those rows. ``properties/test_fused.py`` bounds it within 4u of the exact norm (the
  eager form's bound is (w + 8)u). ``any_at_most`` then finds a scale small enough that the row's sum of
  squares comes within a factor 2 of the dtype's range, where the eager sum in the dtype may overflow: the
  torch backend normalizes such rows again by the eager ops, so that such a row's norm (zeros where the
  eager sum overflows) does not depend on the number of rows in the call.
  ``properties/test_verifier_kernels.py`` checks them against the eager forms: equal for max, min and the
  verdict, to float64 rounding for sums; the fused check against the three calls, equal; the locked-cache
  check against its numpy expressions, to float64 rounding.

The kernels take numpy arrays (C-contiguous views of CPU tensors) and write into ``out`` arrays the caller
allocates. They index without bounds checks (numba's ``boundscheck`` off), so nothing they are given is
trusted: the encoding passes check every row and column index against the arrays before they read (an
error code, which the torch wrappers raise as ShapeError), and the wrappers check every shape a kernel
assumes (whole heads, one width, check vectors as wide as the rows) —
``tests/test_torch_backend.py::test_the_fused_passes_refuse_what_lies_outside_their_arrays``, each case
of which read or wrote outside the arrays before.

The passes over a prompt's rows split them across threads (numba's ``prange``; the encoding passes, the
products and the recomputed attention rows): as many chunks as the backend's own threads
(:meth:`Kernels.parts`; torch's intra-op count, so a one-thread run stays on one), one chunk below
:data:`MIN_PARALLEL` entries (a generation step's row). Each row is computed as in one chunk — the
products' chunks start at multiples of four rows — so the results are the same bits however the rows are
split, which ``properties/kernel_paths.py`` checks on every fused-kernel property. Measured on two threads
(SmolLM2, a 512-token prefill, paired against the serial kernels): the client's time 230 → 175 ms
verified, the value checks 139 → 107 ms. :func:`kernels` returns ``None`` when numba is missing or
:data:`ENABLED` is false (``SCX_NUMBA=0`` in the environment when this module is imported); callers then
use the eager form. The kernels' code is :mod:`.numba_kernels`
(module-level functions, so numba's disk cache serves them to every new process); this module holds what
the callers use: :class:`Kernels`, :class:`Parts` and :func:`kernels` (and :func:`replaced`, through which a
benchmark times them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ENABLED", "MIN_PARALLEL", "Kernels", "Parts", "column_index", "kernels", "replaced"]


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
    add_rows: Any
    permute_rows: Any
    rows_finite: Any
    rms_norm: Any
    any_at_most: Any
    project64: Any
    project64_rms: Any
    project64_gate_up: Any
    range_excess: Any
    attention_rows64: Any
    linear_excess: Any
    freivalds_excess: Any
    gate_up_excess: Any
    attention_excess: Any
    attention_check: Any
    lock_check: Any
    sum_norms: Any
    rms_norms: Any
    set_num_threads: Any
    max_threads: int

    def parts(self, entries: int, threads: int) -> Parts | _OnePart:
        """How many chunks an encoding pass over ``entries`` entries runs in, as a context to run it in:
        ``threads`` (the caller's thread count: the torch backend's) for a pass of at least
        :data:`MIN_PARALLEL` entries, else 1. One pass at a time runs parallel: another thread's pass
        runs meanwhile in one chunk (numba's default threading layer does not take concurrent parallel
        regions)."""
        if threads > 1 and entries >= MIN_PARALLEL:
            return Parts(self, entries, threads)
        return ONE_PART


#: The fewest entries an encoding pass splits across threads (a parallel region costs microseconds).
MIN_PARALLEL = 1 << 16
_pool = threading.Lock()
#: The thread count each thread last gave numba (its count is per thread): a 128-token verified request
#: on two threads made 237 calls of ``numba.set_num_threads``, 11 µs each under cProfile
_told = threading.local()


class _OnePart:
    """The context of a pass that runs in one chunk, on the calling thread: nothing to hold or release
    (one shared instance, :data:`ONE_PART`)."""

    __slots__ = ()
    parts = 1

    def __enter__(self) -> int:
        return 1

    def __exit__(self, *exc: object) -> None:
        return None


ONE_PART = _OnePart()


class Parts:
    """``with kernels.parts(entries, threads) as parts:`` the chunk count of one encoding pass (see
    :meth:`Kernels.parts`); the parallel pool is held until the block ends."""

    __slots__ = ("_held", "parts")

    def __init__(self, k: Kernels, entries: int, threads: int) -> None:
        self.parts, self._held = 1, False
        if threads > 1 and entries >= MIN_PARALLEL and _pool.acquire(blocking=False):
            self._held = True
            self.parts = min(threads, k.max_threads)
            if getattr(_told, "count", None) != self.parts:
                k.set_num_threads(self.parts)
                _told.count = self.parts

    def __enter__(self) -> int:
        return self.parts

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            _pool.release()


_lock = threading.Lock()
_loaded: list[Kernels | None] = []
#: Whether :func:`kernels` offers the kernels: false when ``SCX_NUMBA=0`` is in the environment as this
#: module is imported (read once: an environment lookup on every pass cost ~6 µs with the caches cold,
#: and a request makes hundreds). Tests switch the eager path on by setting it false.
ENABLED = os.environ.get("SCX_NUMBA", "1") != "0"


def kernels() -> Kernels | None:
    """The fused kernels, or ``None`` when numba is not installed or :data:`ENABLED` is false (compiled
    once per process, thread-safe)."""
    if not ENABLED:
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_build())
    return _loaded[0]


@contextlib.contextmanager
def replaced(k: Kernels) -> Iterator[None]:
    """Within the block, :func:`kernels` returns ``k`` — a benchmark's wrapped copy of the loaded kernels
    (:func:`scx_ref.timing.timed_kernels`) — and the loaded ones again after it, however the block ends
    (while :data:`ENABLED` is false it returns ``None`` throughout, as it always does then). For one thread
    at a time: a request running meanwhile in another thread would see the copy too.

    After the block :func:`kernels` holds what it held before it (the loaded kernels, or none loaded yet):
    putting back what it returned — ``None`` while ENABLED was false — kept the kernels off for the rest of
    the process."""
    kernels()  # loaded first (while enabled), so that the block's calls find ``k``
    with _lock:
        before = _loaded[:]
        _loaded[:] = [k]
    try:
        yield
    finally:
        with _lock:
            _loaded[:] = before


def _build() -> Kernels | None:
    """The kernels of :mod:`.numba_kernels` (compiled on first call, or loaded from numba's disk cache), or
    ``None`` when numba cannot be imported (not installed, or not for this numpy)."""
    try:
        import numba
    except ImportError:
        return None
    from . import numba_kernels as nk

    return Kernels(
        nk.rope_take,
        nk.take_rows_cols_concat,
        nk.gather_sum,
        nk.add_rows,
        nk.permute_rows,
        nk.rows_finite,
        nk.rms_norm,
        nk.any_at_most,
        nk.project64,
        nk.project64_rms,
        nk.project64_gate_up,
        nk.range_excess,
        nk.attention_rows64,
        nk.linear_excess,
        nk.freivalds_excess,
        nk.gate_up_excess,
        nk.attention_excess,
        nk.attention_check,
        nk.lock_check,
        nk.sum_norms,
        nk.rms_norms,
        numba.set_num_threads,
        _start_threads(numba),
    )


def _start_threads(numba: Any) -> int:
    """Start numba's threading layer and return its thread count (NUMBA_NUM_THREADS: the cores, or fewer
    if set). Its OpenMP layer shares torch's libgomp where torch is loaded, and starting it sets that
    pool's thread count to numba's: torch's own count is put back, so a one-thread run stays one."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    count = int(numba.get_num_threads())
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return count

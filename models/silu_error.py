"""How far the MLP check's SiLU and the server's are from the exact SiLU over every float32 — the numbers
behind the SwiGLU term of the reply check's τ (``scx_ref/protocol/verify.py``).

Two float32 SiLUs are run on every float32 x with |x| ≤ ``--limit`` (87 by default: below −87 the kernel's
e^−|x| is cut to 0, where it is below float32's smallest normal), in chunks of consecutive bit patterns:

- the client's: ``numba_kernels.swiglu_rows`` — the very pass the MLP check runs, with every ``up`` = 1 so
  that its product is exact and m = silu(gate) as the kernel rounds it;
- the server's: ``torch.nn.functional.silu`` in float32.

Each is compared with ``scx_ref.ops.silu`` of the same x in float64 (a few float64 roundings, each 2⁻²⁹ of a
float32 one); the largest relative error is printed in float32 roundings (u₃₂ = 2⁻²⁴) with the x where it
occurs. The property ``properties/test_verifier_kernels.py::test_kernel_silu_is_silu_within_the_dtype``
checks a bound (4.1 u₃₂) on drawn values; this sweep is how that bound was set. ``--stride k`` takes every
k-th bit pattern only (a quick look; the default, 1, is every float32: about 2.2·10⁹ values).

Run: ``python -m models.silu_error [--limit 87] [--stride 1]``. It asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from scx_ref.ops import silu
from scx_ref.protocol.verify import unit_roundoff

U32 = unit_roundoff(np.float32)  # 2⁻²⁴, the verifier's own
ROW = 4096  # the width of one row of the kernel's [gate up] input
CHUNK = 1 << 22  # float32 values per chunk (a multiple of ROW)
SMALLEST_NORMAL32 = float(np.finfo(np.float32).tiny)


@dataclass
class Worst:
    """The largest relative error seen (in u₃₂) and the x where it occurred."""

    ulps: float = 0.0
    at: float = float("nan")

    def update(self, x: Any, got: Any) -> None:
        """Fold in one chunk: ``got`` against ``scx_ref.ops.silu`` of ``x`` in float64, where the exact value
        is a normal float32 (below it a relative error says nothing about the precision)."""
        x64 = x.astype(np.float64)
        want = silu(x64)
        keep = np.abs(want) >= SMALLEST_NORMAL32
        rel = np.abs(got[keep].astype(np.float64) - want[keep]) / np.abs(want[keep])
        if rel.size:
            i = int(np.argmax(rel))
            if rel[i] / U32 > self.ulps:
                self.ulps, self.at = float(rel[i] / U32), float(x64[keep][i])


def top_bits(limit: float) -> int:
    """The bit pattern of the float32 nearest ``limit`` (≥ 0), as an integer: the positive float32s up to it
    are the patterns 0 … top_bits(limit)."""
    return int(np.array([limit], dtype=np.float32).view(np.int32)[0])


def chunks(limit: float, stride: int) -> Iterator[Any]:
    """Every ``stride``-th float32 in [0, limit] by bit pattern, and its negation, in chunks of at most
    ``CHUNK`` values (each padded to whole rows of ``ROW`` by repeating its last value)."""
    top = top_bits(limit)
    for sign in (1.0, -1.0):
        for lo in range(0, top + 1, CHUNK * stride):
            bits = np.arange(lo, min(lo + CHUNK * stride, top + 1), stride, dtype=np.int32)
            x = bits.view(np.float32) * np.float32(sign)
            pad = (-x.size) % ROW
            yield np.concatenate([x, np.full(pad, x[-1], dtype=np.float32)]) if pad else x


def kernel_silu() -> Callable[[Any], Any]:
    """silu(x) as the MLP check computes it: ``swiglu_rows`` over rows [x | 1]."""
    from scx_ref.backends import numba_kernels as nk

    def run(x: Any) -> Any:
        gate = x.reshape(-1, ROW)
        gu = np.concatenate([gate, np.ones_like(gate)], axis=1)
        m = np.empty_like(gate)
        nk.swiglu_rows(gu, 0, gate.shape[0], m)
        return m.reshape(-1)

    return run


def torch_silu() -> Callable[[Any], Any]:
    """silu(x) as the server computes it: torch's float32 SiLU."""
    import torch

    def run(x: Any) -> Any:
        with torch.inference_mode():
            return torch.nn.functional.silu(torch.from_numpy(x)).numpy()

    return run


def sweep(limit: float, stride: int, progress: bool = True) -> dict[str, Worst]:
    """The largest relative error of each SiLU over the values ``chunks`` yields."""
    forms = {"client (numba_kernels.swiglu_rows)": kernel_silu(), "server (torch F.silu)": torch_silu()}
    worst = {name: Worst() for name in forms}
    total = 2 * (-(-(top_bits(limit) // stride + 1) // CHUNK))
    it: Any = chunks(limit, stride)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=total, desc="float32 chunks", unit="chunk", file=sys.stderr)
    for x in it:
        for name, f in forms.items():
            worst[name].update(x, f(x))
    return worst


def main(argv: list[str] | None = None) -> None:
    """Run the module's command line (its docstring) on ``argv`` and print the table."""
    p = argparse.ArgumentParser(prog="python -m models.silu_error", description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=float, default=87.0, help="sweep every float32 x with |x| <= LIMIT (87)")
    p.add_argument("--stride", type=int, default=1, help="take every STRIDE-th float32 only (1: all of them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not 0.0 < a.limit <= 87.0:
        p.error("--limit must be in (0, 87]: below -87 the kernel's e^-|x| is cut to 0 by design")
    if a.stride < 1:
        p.error("--stride must be at least 1")
    worst = sweep(a.limit, a.stride, not a.no_progress)
    if any(
        math.isnan(w.at) for w in worst.values()
    ):  # NaN: no x compared, and "0.000 u32" would read as exact
        p.error(
            f"no x with |x| <= {a.limit:g} at stride {a.stride} has a normal float32 SiLU to compare: "
            "raise --limit or lower --stride"
        )
    for name, w in worst.items():
        where = f"(|x| <= {a.limit:g}, stride {a.stride})"
        print(f"{name}: max relative error {w.ulps:.3f} u32 at x = {w.at!r} {where}")


if __name__ == "__main__":
    main()

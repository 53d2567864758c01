"""What the pool of large host buffers (``scx_ref.backends.host_memory``) saves, in one process.

1. The LM-head product of a model (n + 2 rows; SmolLM2: 49 152 outputs) written three ways, alternating: into
   a fresh ``torch.empty`` (what ``F.linear`` does: under glibc a fresh mapping, first touched page by page),
   into pooled memory already touched (what the pool lends from the second request on), and into a fresh
   mapping advised for transparent huge pages (the alternative not adopted); each with its page faults and
   the time its release takes.
2. Whole SCX prefills with the pool, without it (``host_memory.LARGE_BYTES`` raised past any buffer) and
   with a fresh huge-page mapping for each large buffer instead, in turn: the median seconds inside the
   server's ``handle`` calls and the rest (the client's).

3. With ``--peak``: the process's peak resident memory over four verified prefills, with the pool and without
   it, each in a fresh process — what an idle pooled buffer adds to the peak of the request that follows.

Run: ``python -m models.host_memory [--model smollm2] [--n 512] [--threads 1] [--rounds 7]``, or with
``--peak [--pool-mib M]``. A benchmark: it asserts nothing; ``models/results/host_memory.txt`` holds the runs.
"""

from __future__ import annotations

import argparse
import math
import mmap
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from scx_ref.commands._args import int_at_least

from .timing_args import timing_parser

#: the sessions' ``max_length`` (or the model's positions, if fewer): the longest prompt measured
MAX_LENGTH = 4096


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def huge_empty(shape: tuple[int, ...], dtype: Any) -> Any:
    """A fresh private mapping advised for transparent huge pages, as a tensor (the alternative to the pool
    measured here, not adopted)."""
    import torch

    m = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=dtype).view(shape)


def product_forms(backend: Any, rows: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Median (product seconds, release seconds, page faults) of the LM-head product of ``rows`` random rows
    into each form of output memory."""
    import torch

    w = backend._matrix("lm_head", -1, None)
    x = torch.randn(rows, w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    shape = (rows, int(w.shape[0]))
    warm = torch.empty(shape, dtype=w.dtype)

    forms: dict[str, Callable[[], torch.Tensor]] = {
        "fresh torch.empty (F.linear)": lambda: torch.nn.functional.linear(x, w),
        "memory already touched (the pool)": lambda: torch.matmul(x, w.t(), out=warm),
        "fresh, transparent huge pages": lambda: torch.matmul(x, w.t(), out=huge_empty(shape, w.dtype)),
    }
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in forms}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, f in forms.items() if r % 2 else reversed(forms.items()):
                f0, t0 = _faults(), time.perf_counter()
                y = f()
                t1, f1 = time.perf_counter(), _faults()
                del y
                t2 = time.perf_counter()
                if r:
                    got[name].append((t1 - t0, t2 - t1, float(f1 - f0)))
    med = statistics.median
    return {
        k: (med(a for a, _, _ in v), med(b for _, b, _ in v), med(c for _, _, c in v)) for k, v in got.items()
    }


def prefill_pool(backend: Any, n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (server seconds, client seconds) of an SCX prefill (level ``permute``, verification off, keys
    derived ahead) with the pool, without it, and with fresh huge-page mappings in its place, in turn."""
    import torch

    from scx_ref.backends import host_memory
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig, Server
    from scx_ref.timing import timed_prefill, timed_server

    limit, pooled = host_memory.LARGE_BYTES, host_memory.empty
    cfg = SCXConfig(level="permute", max_length=min(backend.config.max_positions, MAX_LENGTH), verify=False)
    client = Client(backend, KeySchedule.generate(), cfg)
    ids = np.random.default_rng(0).integers(0, backend.config.vocab_size, size=n)
    timed, in_server = timed_server(Server)
    modes = ("pool", "no pool", "huge pages")
    got: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        with torch.inference_mode():
            for r in range(rounds + 1):
                for mode in modes if r % 2 else modes[::-1]:
                    host_memory.LARGE_BYTES = 1 << 62 if mode == "no pool" else limit
                    host_memory.empty = huge_empty if mode == "huge pages" else pooled
                    got_s = timed_prefill(client, timed, backend, ids, in_server)
                    if r:
                        got[mode].append(got_s)
    finally:
        host_memory.LARGE_BYTES, host_memory.empty = limit, pooled
    med = statistics.median
    return {k: (med(s for s, _ in v), med(c for _, c in v)) for k, v in got.items()}


def _status_mib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        rows = (ln.split(":", 1) for ln in f if ln.startswith(("VmRSS:", "VmHWM:")))
        return {k: int(v.split()[0]) >> 10 for k, v in rows}


def process_peak(
    model: str, n: int, threads: int, pool: bool, pool_mib: int | None = None, requests: int = 4
) -> tuple[int, int]:
    """(MiB resident once the model is loaded, the process's peak resident MiB after ``requests`` verified SCX
    prefills of n tokens), with the pool or without it. Run in a process of its own (``--peak`` starts one
    per case): the peak is the process's since it started."""
    import torch

    from scx_ref.backends import host_memory
    from scx_ref.commands.bench import build_models
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server

    torch.set_num_threads(threads)
    if not pool:
        host_memory.LARGE_BYTES = 1 << 62
    if pool_mib is not None:
        host_memory.POOL_BYTES = pool_mib << 20
    backend, _hf, _used = build_models(model, "float32", "cpu")
    client = Client(backend, KeySchedule.generate(), SCXConfig(level="permute", max_length=MAX_LENGTH))
    ids = np.random.default_rng(0).integers(0, backend.config.vocab_size, size=n)
    loaded = _status_mib()["VmRSS"]
    with torch.inference_mode():
        for _ in range(requests):
            client.prefill(ids, LocalTransport(Server(backend)))
    return loaded, _status_mib()["VmHWM"]


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = timing_parser(
        "models.host_memory",
        __doc__,
        rounds=7,
        model_help="a registered model or random:<preset>[:seed]",
        max_n=MAX_LENGTH,
    )
    p.add_argument(
        "--peak",
        action="store_true",
        help="instead: the process's peak resident memory over 4 verified prefills, with the pool and "
        "without (each in a fresh process)",
    )
    p.add_argument(
        "--pool-mib",
        type=int_at_least(0),
        help="with --peak: the pool's bound in MiB, >= 0 (POOL_BYTES by default)",
    )
    p.add_argument("--peak-child", choices=["pool", "no-pool"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.pool_mib is not None and not (a.peak or a.peak_child):  # it bounds only --peak's pool
        p.error("argument --pool-mib: only with --peak (the other measurements use the default pool)")
    if a.peak_child:
        loaded, peak = process_peak(a.model, a.n, a.threads, a.peak_child == "pool", a.pool_mib)
        print(f"  {a.peak_child:8s} loaded {loaded} MiB, peak {peak} MiB: {peak - loaded} MiB over the model")
        return 0
    if a.peak:
        bound = "" if a.pool_mib is None else f", the pool bounded at {a.pool_mib} MiB"
        print(f"{a.model}, threads {a.threads}: the peak over 4 verified SCX prefills of n = {a.n}{bound}")
        for case in ("pool", "no-pool"):
            args = ["--model", a.model, "--n", str(a.n), "--threads", str(a.threads), "--peak-child", case]
            args += [] if a.pool_mib is None else ["--pool-mib", str(a.pool_mib)]
            # this module under the name it was run by (models.host_memory or scx_models.host_memory): the
            # installed package is importable from any directory, ``models`` only from the repository's
            module = __spec__.name if __spec__ is not None else "models.host_memory"
            subprocess.run([sys.executable, "-m", module, *args], check=True)
        return 0
    import torch

    from scx_ref.commands.bench import build_models

    torch.set_num_threads(a.threads)
    backend, _hf, _used = build_models(a.model, "float32", "cpu")
    rows = a.n + 2
    print(f"{a.model}, threads {a.threads}: the LM-head product of {rows} rows, median of {a.rounds} rounds")
    for name, (prod, rel, faults) in product_forms(backend, rows, a.rounds).items():
        print(f"  {name:36s} product {prod * 1e3:8.2f} ms  release {rel * 1e3:6.2f} ms  faults {faults:8.0f}")
    print(f"{a.model}, threads {a.threads}: SCX prefill of n = {a.n}, median of {a.rounds} rounds")
    for mode, (srv, own) in prefill_pool(backend, a.n, a.rounds).items():
        total = (srv + own) * 1e3
        print(f"  {mode:10s} server {srv * 1e3:8.1f} ms  client {own * 1e3:7.1f} ms  total {total:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

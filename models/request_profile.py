"""Where one SCX prefill's time goes, by operation, on the CPU or a GPU: the medians of SCX and of Hugging
Face's forward on the same tensors, then torch's profiler (CPU and, on a GPU, CUDA activity: kernels and
copies between host and device) and cProfile, each over one more request.

Run: ``python -m models.request_profile --model llama1b-random --n 2048 --device cuda [--no-verify]
[--rounds 5] [--top 25]`` (``--threads``: torch's CPU threads, for a CPU run; default 1). The keys of each
request are derived ahead (``Client.precompute``), neither timed nor profiled, as in ``scx bench``. It
prints tables and asserts nothing.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from scx_ref.commands._args import device, int_at_least

from .timing_args import timing_parser


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_prefill(
    model: str, n: int, device: str, verify: bool, rounds: int, top: int, threads: int | None = None
) -> str:
    """The report: SCX's and Hugging Face's median seconds over ``rounds`` alternating rounds (after one
    warm-up), then the ``top`` entries of torch's profiler (by self CPU time, and on a GPU by self device
    time) and of cProfile (by own time) over one more SCX prefill each."""
    import torch

    from scx_ref.commands._args import require_device
    from scx_ref.commands.bench import build_models
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server

    require_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    b, hf, used = build_models(model, "float32", device)
    if hf is None:
        raise SystemExit(f"{model}: no Hugging Face model to compare with (choose a registered model)")
    ids = np.random.default_rng(1234).integers(0, b.config.vocab_size, size=n, dtype=np.int64)
    client: Client[Any] = Client(
        b,
        KeySchedule.generate(),
        SCXConfig(level="permute", max_length=b.config.max_positions, verify=verify),
    )

    def scx() -> Callable[[], None]:
        """One SCX prefill, its keys derived now (outside what the caller times or profiles)."""
        nonce = KeySchedule.new_nonce()
        client.precompute(n, nonce=nonce)
        link = LocalTransport(Server(b))

        def run() -> None:
            client.prefill(ids, link, nonce=nonce)
            _sync(device)

        return run

    def plain() -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                hf(torch.from_numpy(ids)[None].to(device), use_cache=True).logits[0].float().cpu().numpy()
            _sync(device)

        return run

    def seconds(make: Callable[[], Callable[[], None]]) -> float:
        fn = make()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"scx": [], "hf": []}
    for r in range(rounds + 1):
        order = [("scx", scx), ("hf", plain)] if r % 2 == 0 else [("hf", plain), ("scx", scx)]
        for name, fn in order:
            t = seconds(fn)
            if r > 0:
                times[name].append(t)
    s, h = statistics.median(times["scx"]), statistics.median(times["hf"])
    out = [
        f"{used} n={n} {device} float32 verify={verify}: SCX {1e3 * s:.1f} ms, Hugging Face {1e3 * h:.1f} "
        f"ms, ratio {s / h:.3f} (medians of {rounds} alternating rounds; SCX keys derived ahead, not timed)"
    ]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    request = scx()
    with torch.profiler.profile(activities=activities) as prof:
        request()
    table = prof.key_averages()
    head = "torch profiler, one SCX prefill, by self"
    out.append(f"{head} CPU time:\n{_table(table, 'self_cpu_time_total', top)}")
    if device.startswith("cuda"):
        counts = ", ".join(f"{v} {k}" for k, v in cuda_counts(table).items())
        out[0] += f"\none SCX prefill's CUDA runtime calls: {counts}"
        out.append(f"{head} device time:\n{_table(table, 'self_device_time_total', top)}")
    request = scx()
    pr = cProfile.Profile()
    pr.enable()
    request()
    pr.disable()
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(top)
    out.append(f"cProfile, one SCX prefill, by own time:\n{text.getvalue().strip()}")
    return "\n\n".join(out)


#: CUDA runtime calls counted per request: what a short prompt's latency is made of on a GPU
CUDA_CALLS = {
    "kernel launches": ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"),
    "host-device copies": ("cudaMemcpyAsync", "cudaMemcpy"),
    "synchronisations": ("cudaStreamSynchronize", "cudaDeviceSynchronize"),
}


def cuda_counts(averages: Any) -> dict[str, int]:
    """How many of each kind in :data:`CUDA_CALLS` a profile's averages (``prof.key_averages()``: entries
    with ``key`` and ``count``) hold."""
    calls = {str(e.key): int(e.count) for e in averages}
    return {kind: sum(calls.get(name, 0) for name in names) for kind, names in CUDA_CALLS.items()}


def _table(averages: Any, key: str, top: int) -> str:
    return str(averages.table(sort_by=key, row_limit=top, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = timing_parser("models.request_profile", __doc__, rounds=5, model_help="a registered model", hf=True)
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--no-verify", action="store_true", help="reply verification off")
    p.add_argument("--top", type=int_at_least(1), default=25, help="entries of each table, >= 1 (25)")
    a = p.parse_args(argv)
    from scx_ref.commands._args import require_device
    from scx_ref.errors import ConfigError
    from scx_ref.zoo import max_positions

    if a.n > max_positions(a.model):  # the session's max_length: refused before the model is loaded
        p.error(f"argument --n: must be <= {max_positions(a.model)} (the positions of {a.model}), got {a.n}")
    try:  # a CUDA device this machine lacks: refused before the model is loaded, not by a traceback
        require_device(a.device)
    except ConfigError as exc:
        p.error(f"argument --device: {exc}")
    threads = a.threads if a.device == "cpu" else None  # on a GPU, torch's own CPU threads
    print(profile_prefill(a.model, a.n, a.device, not a.no_verify, a.rounds, a.top, threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

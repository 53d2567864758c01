"""``scx bench``: SCX latency against plaintext on the same model, in the same process.

For each phase — prefill at n ∈ {128, 512, 2048}, and per-token generation (64 tokens after a
512-token prompt) — the runs are **interleaved**: plaintext, SCX at each level, plaintext, … for
``--repeats`` rounds, and the reported ratio is median(SCX) / median(plaintext) of wall-clock time
(process CPU time ratios are reported beside it: on a loaded machine they are the steadier reading).

Baseline: :class:`~scx_ref.backends.torch_backend.TorchPlainModel`, a plain torch forward with a KV
cache over the *same* :class:`TorchBackend` (same weights, dtype, device and kernels), returning numpy
logits as the SCX client does. Each SCX request derives its keys inside the timed run: a new nonce
(``KeySchedule`` under the client's master secret) per request, every permutation, head permutation,
noise and decoy draw computed from it; the calibration decoy pool is built once, offline, before
timing (it is public data, as in DESIGN §5.1). A fresh :class:`~scx_ref.protocol.Server` serves each
request. Generation time includes key sharing, amortised over the generated tokens.

Also reported per level: the peak-memory ratio (CUDA: ``max_memory_allocated``; CPU: peak resident
set growth during the run, sampled every 2 ms — none when it is below 1 MiB, where allocator reuse makes
it noise), the KV-state ratio (bytes of the distinct storages the server and client hold after the run,
over the plaintext KV cache's) and the client's share of the flops (from the protocol's cost meters).

Models: any name of the registry :mod:`scx_ref.zoo` — a registered model (``smollm2``, real
SmolLM2-135M, falls back to ``random:smollm2-shape`` with a notice when its weights are unavailable;
``tiny-llama`` and the other seeded random HF models) or ``random:<preset>[:seed]`` (seeded numpy random
weights of a preset shape, e.g. ``random:smollm2-shape``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, SCXError
from ..zoo import MODEL_NAMES, load_hf, load_weights, parse_random, weights_names_help

__all__ = ["BenchResult", "build_backend", "register", "run_bench"]

SMOLLM2_FALLBACK = "random:smollm2-shape"
_MIN_MEM = float(1 << 20)  # below 1 MiB of growth the RSS reading is allocator noise: no ratio


def register(subparsers: Any) -> None:
    """Add ``scx bench`` to the CLI."""
    p = subparsers.add_parser(
        "bench",
        help="SCX vs plaintext latency ratios (prefill and per-token generation), interleaved",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--model", default="smollm2", help=f"model (default smollm2): {weights_names_help()}")
    p.add_argument("--json", metavar="PATH", help="write the result rows as JSON")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (default), float64, bfloat16, float16")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per measurement (default 5)")
    p.add_argument("--quick", action="store_true", help="short prompts and few tokens (smoke test)")
    p.add_argument(
        "--levels", default="permute,blind", help="comma-separated SCX levels (default permute,blind)"
    )
    p.add_argument("--n", default=None, help="comma-separated prefill lengths (default 128,512,2048)")
    p.add_argument("--gen-prompt", type=int, default=None, help="prompt length before generation (512)")
    p.add_argument("--gen-tokens", type=int, default=None, help="generated tokens timed (64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


@dataclass
class _Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    mem: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float, mem: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.mem.append(mem)


@dataclass
class BenchResult:
    """One row: a phase, a length, a level, and the SCX/plaintext ratios."""

    phase: str
    n: int
    level: str
    ratio_median: float
    cpu_ratio_median: float
    plain_median_s: float
    scx_median_s: float
    mem_ratio: float | None
    state_ratio: float
    client_flop_share: float
    repeats: int
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class _PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.peak = 0.0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: no RSS sampling
            return 0

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = float(torch.cuda.memory_allocated(self.device))
        else:
            self._base = float(self._rss())
            self._stop = threading.Event()
            self._max = self._base

            def sample() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, float(self._rss()))
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = float(torch.cuda.max_memory_allocated(self.device)) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, float(self._rss()))
            self.peak = self._max - self._base


def _state_bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a narrow view keeps its whole base alive)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = int(st.nbytes())
    return sum(seen.values())


def _scx_state(server: Any, client: Any) -> int:
    s = server.sessions[client.session]
    tensors = [t for pair in (*s.raw.values(), *s.valid.values()) for t in pair] + list(s.locked.values())
    st = client.state
    tensors += list(st.guard_k.values()) + list(st.guard_v.values())
    return _state_bytes(tensors)


def _timed(fn: Callable[[], Any], device: Any) -> tuple[float, float, float, Any]:
    import torch

    with _PeakMemory(device) as mem:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, mem.peak, out


def build_backend(model: str, dtype: str, device: str) -> tuple[Any, str]:
    """(TorchBackend, the model actually used) for a ``--model`` name of the registry.

    A registered model runs on its HF model's weights (:func:`scx_ref.hf.backend_from_hf`); ``smollm2``
    falls back to ``random:smollm2-shape`` with a notice on stderr when its weights are unavailable. A
    ``random:<preset>[:seed]`` name runs on :func:`scx_ref.zoo.load_weights`. ConfigError for any other
    name.
    """
    from ..backends.torch_backend import TorchBackend, parse_dtype
    from ..hf import backend_from_hf

    if parse_random(model) is None:
        if model not in MODEL_NAMES:
            raise ConfigError(f"unknown bench model {model!r}; choose {weights_names_help()}")
        try:
            hf_model, _tokenizer = load_hf(model)
            return backend_from_hf(hf_model, dtype=dtype, device=device), model
        except (SCXError, OSError) as exc:
            if model != "smollm2":
                raise
            print(
                f"scx bench: SmolLM2 weights unavailable ({exc}); using {SMOLLM2_FALLBACK}", file=sys.stderr
            )
            model = SMOLLM2_FALLBACK
    np_dtype = np.float64 if parse_dtype(dtype).itemsize == 8 else np.float32
    return TorchBackend(load_weights(model, np_dtype), dtype=dtype, device=device), model


def run_bench(
    backend: Any,
    levels: list[str],
    lengths: list[int],
    gen_prompt: int,
    gen_tokens: int,
    repeats: int,
    progress: bool = True,
) -> list[BenchResult]:
    """Interleaved plaintext/SCX timings on ``backend``; one row per (phase, n, level).

    Rounds alternate the order (plaintext first, then SCX first), so a drift of the machine's speed
    within a round does not favour either side.
    """
    import torch

    from ..forward import PlainRunner
    from ..keys import KeySchedule
    from ..protocol import Client, LocalTransport, SCXConfig, Server

    c = backend.config
    longest = max([*lengths, gen_prompt + gen_tokens])
    if longest > c.max_positions:
        raise ConfigError(f"bench length {longest} exceeds the model's max_positions {c.max_positions}")
    rng = np.random.default_rng(1234)  # public benchmark prompts
    plain = PlainRunner(backend)
    master = KeySchedule.generate()
    clients = {
        lv: Client(backend, master, SCXConfig(level=lv, max_length=min(c.max_positions, 4096)))  # type: ignore[arg-type]
        for lv in levels
    }
    jobs = [("prefill", n) for n in lengths] + ([("decode", gen_prompt)] if gen_tokens > 0 else [])
    total = len(jobs) * repeats * (1 + len(levels))
    bar = _progress(total, progress)
    rows: list[BenchResult] = []
    for phase, n in jobs:
        ids = rng.integers(0, c.vocab_size, size=n, dtype=np.int64)
        plain_t = _Timing()
        scx_t = {lv: _Timing() for lv in levels}
        share: dict[str, float] = {}
        state: dict[str, int] = {}
        plain_state = 0

        sides: list[str | None] = [None, *levels]  # None: plaintext
        for rnd in range(repeats):
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                with torch.inference_mode():
                    if side is None:
                        if phase == "prefill":
                            w, cpu, mem, _ = _timed(
                                lambda ids=ids: backend.to_numpy(plain.prefill(ids)),  # type: ignore[misc]
                                backend.device,
                            )
                        else:
                            w, cpu, mem = _plain_decode(plain, ids, gen_tokens, backend.device)
                        plain_t.add(w, cpu, mem)
                        plain_state = _state_bytes([t for kv in plain.cache for t in kv])
                        bar(f"{phase} n={n} plaintext")
                        continue
                    client = clients[side]
                    server = Server(backend)
                    link = LocalTransport(server)
                    if phase == "prefill":
                        w, cpu, mem, _ = _timed(
                            lambda cl=client, ids=ids, link=link: cl.prefill(  # type: ignore[misc]
                                ids, link, nonce=KeySchedule.new_nonce()
                            ),
                            backend.device,
                        )
                    else:
                        w, cpu, mem = _scx_decode(client, link, ids, gen_tokens, backend.device)
                    scx_t[side].add(w, cpu, mem)
                    share[side] = client.cost_report(link, server.cost(client.session)).client_flop_share
                    state[side] = _scx_state(server, client)
                    bar(f"{phase} n={n} {side}")
        div = gen_tokens if phase == "decode" else 1
        for lv in levels:
            pm, sm = statistics.median(plain_t.wall), statistics.median(scx_t[lv].wall)
            pmem, smem = statistics.median(plain_t.mem), statistics.median(scx_t[lv].mem)
            rows.append(
                BenchResult(
                    phase=phase,
                    n=n,
                    level=lv,
                    ratio_median=sm / pm,
                    cpu_ratio_median=statistics.median(scx_t[lv].cpu) / statistics.median(plain_t.cpu),
                    plain_median_s=pm / div,
                    scx_median_s=sm / div,
                    mem_ratio=smem / pmem if min(pmem, smem) >= _MIN_MEM else None,
                    state_ratio=state[lv] / plain_state,
                    client_flop_share=share[lv],
                    repeats=repeats,
                    tokens=gen_tokens if phase == "decode" else 0,
                )
            )
    bar(None)
    return rows


def _plain_decode(plain: Any, ids: np.ndarray, n_new: int, device: Any) -> tuple[float, float, float]:
    import torch

    tok = int(torch.argmax(plain.prefill(ids, last_only=True)[-1]).item())

    def steps() -> None:
        t = tok
        for _ in range(n_new):
            t = int(np.argmax(plain.b.to_numpy(plain.decode(t))))

    w, cpu, mem, _ = _timed(steps, device)
    return w, cpu, mem


def _scx_decode(
    client: Any, link: Any, ids: np.ndarray, n_new: int, device: Any
) -> tuple[float, float, float]:
    from ..keys import KeySchedule

    tok = int(np.argmax(client.prefill(ids, link, nonce=KeySchedule.new_nonce())[-1]))

    def steps() -> None:
        t = tok
        client.share_keys(link)  # part of generation's cost, amortised over the tokens
        for _ in range(n_new):
            t = int(np.argmax(client.decode(t, link)))

    w, cpu, mem, _ = _timed(steps, device)
    return w, cpu, mem


def _progress(total: int, enabled: bool) -> Callable[[str | None], None]:
    bar: Any = None
    if enabled:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="scx bench", unit="run", file=sys.stderr)
        except ImportError:
            bar = None

    def step(label: str | None) -> None:
        if bar is None:
            return
        if label is None:
            bar.close()
            return
        bar.set_postfix_str(label)
        bar.update(1)

    return step


def format_table(rows: list[BenchResult], model: str, device: str, dtype: str) -> str:
    """The human-readable report."""
    lines = [
        f"scx bench — model {model}, {device}, {dtype}; ratio = median(SCX) / median(plaintext)",
        f"{'phase':8} {'n':>5} {'level':8} {'ratio':>7} {'cpu':>7} {'plain':>10} {'scx':>10} "
        f"{'mem':>6} {'state':>6} {'client':>7}",
    ]
    for r in rows:
        unit = "s/tok" if r.phase == "decode" else "s"
        mem = f"{r.mem_ratio:6.2f}" if r.mem_ratio is not None else "     -"
        lines.append(
            f"{r.phase:8} {r.n:5d} {r.level:8} {r.ratio_median:7.3f} {r.cpu_ratio_median:7.3f} "
            f"{r.plain_median_s:8.4f}{unit[0]:>2} {r.scx_median_s:8.4f}{unit[0]:>2} {mem} "
            f"{r.state_ratio:6.2f} "
            f"{100 * r.client_flop_share:6.2f}%"
        )
    lines.append(
        "plain/scx: median seconds (decode: per token); mem: peak-memory ratio (- when the run's growth is "
        "below 1 MiB); state: KV-state bytes held after the run (server + client) / plaintext KV cache; "
        "client: flop share"
    )
    return "\n".join(lines)


def _machine() -> str:
    """The CPU model and logical CPU count (Linux /proc/cpuinfo when readable)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print (and optionally save) the ratios."""
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(f"scx bench needs torch (pip install 'scx-ref[torch]'): {exc}") from exc
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    if args.quick:
        lengths, gen_prompt, gen_tokens = [32, 128], 64, 8
    else:
        lengths, gen_prompt, gen_tokens = [128, 512, 2048], 512, 64
    if args.n:
        lengths = [int(v) for v in args.n.split(",") if v.strip()]
    gen_prompt = args.gen_prompt if args.gen_prompt is not None else gen_prompt
    gen_tokens = args.gen_tokens if args.gen_tokens is not None else gen_tokens
    backend, used = build_backend(args.model, args.dtype, args.device)
    rows = run_bench(backend, levels, lengths, gen_prompt, gen_tokens, args.repeats, not args.no_progress)
    print(format_table(rows, used, args.device, args.dtype))
    if args.json:
        meta = {
            "command": " ".join(["scx", *sys.argv[1:]]),
            "machine": _machine(),
            "model": used,
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "baseline": "PlainRunner: plain torch forward with a KV cache on the same TorchBackend",
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [r.to_dict() for r in rows]}, f, indent=2)
    return 0

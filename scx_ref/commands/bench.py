"""``scx bench``: SCX latency against Hugging Face's own plaintext inference, same weights, same process.

For each phase — prefill at n ∈ {128, 512, 2048}, and per-token generation (64 tokens after a
512-token prompt) — the runs are **interleaved**: baseline, the project's plaintext runner, SCX at each
level, then the next round in the reverse order, for ``--repeats`` rounds (default 9), after ``--warmup``
untimed rounds (default 1: one-time costs — compiling the kernels on a fresh install, the first
allocations — stay out of the rounds); the reported ratio is median(SCX) / median(baseline) of wall-clock
time (process CPU time ratios beside it: on a loaded machine they are the steadier reading). Each round's
SCX / baseline (the two timed in the same round) is reported too — their median and quartiles — and the JSON
keeps every round's seconds: when the machine's speed drifts during a run the two medians can come from
different rounds, and the paired median is then the steadier reading of the two. Each SCX request is also
split in two — the seconds inside the server's ``handle`` calls and the rest (in process: the client's own
work) — each over the baseline's median (``srv``, ``own``), so that a run shows which side its overhead is on.
Both readings carry a 95 % interval (:mod:`.bench_stats`: a paired bootstrap of the ratio of medians, the
distribution-free interval of the paired median), so a run says which goals it shows met, shows missed or
leaves undecided.

Baseline: the model's own Hugging Face ``transformers`` forward (prefill: ``model(ids)``, all n rows of
logits, KV cache built) and ``generate`` (greedy, KV cache; the time from the first generated token to
the last, per token) with the model's attention implementation (``sdpa``), on the very tensors the SCX
backend computes with (:func:`scx_ref.hf.backend_from_hf` shares them). The project's own plaintext path
(:class:`~scx_ref.forward.PlainRunner` on the same :class:`TorchBackend`) is timed as a second column. A
``random:<preset>`` model has no Hugging Face model; its baseline is PlainRunner, and the JSON says so.

Keys: every SCX request has a fresh nonce, and its keys — permutations, head permutations, decoy rows,
noise and its corrections — are derived by :meth:`~scx_ref.protocol.Client.precompute` *before* the
request, as the paper's prototype does (they depend only on the key schedule and the lengths). The
ratio counts the **critical path** (the request with its keys ready); ``total`` adds the key derivation
time (the client's whole work) and is reported beside it. The calibration decoy pool is built once,
offline, before timing (public data, DESIGN §5.1). A fresh :class:`~scx_ref.protocol.Server` serves each
request. Generation time includes key sharing, amortised over the generated tokens.

Also reported per level: the peak-memory ratio (CUDA: ``max_memory_allocated``; CPU: peak resident set
growth during the run — SCX: its key derivation and the request — from the kernel's high-water mark on
Linux, else sampled every 2 ms; decode: the steps' on every side, the prompt's prefill left out; none
when below 1 MiB, where allocator reuse makes it noise; the JSON keeps both sides' reading of every
round), the KV-state ratio (bytes of the distinct storages the server and client hold after the run, over the
baseline's KV cache) and the client's share of the flops.

Models: any name of the registry :mod:`scx_ref.zoo` — a registered model (``smollm2``, real
SmolLM2-135M, falls back to ``random:smollm2-shape`` with a notice when its weights are unavailable;
``tiny-llama`` and the other seeded random HF models) or ``random:<preset>[:seed]`` (seeded numpy random
weights of a preset shape, e.g. ``random:smollm2-shape``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._files import result_json, write_text_whole
from ..backends.base import TORCH_DTYPES
from ..errors import ConfigError, SCXError
from ..machine import cpuinfo
from ..protocol.config import LEVELS
from ..protocol.presets import preset
from ..zoo import (
    MODEL_NAMES,
    RANDOM_PRESETS,
    load_hf,
    load_weights,
    max_positions,
    parse_random,
    weights_names_help,
)
from ._args import MAX_THREADS, device, int_at_least, int_list, output_file, plain_description, require_device
from .bench_stats import SEED, median_interval, quartiles, ratio_interval

__all__ = ["BenchResult", "build_backend", "build_models", "register", "run_bench"]

SMOLLM2_FALLBACK = "random:smollm2-shape"
_MIN_MEM = float(1 << 20)  # below 1 MiB of growth the RSS reading is allocator noise: no ratio
HF_BASELINE = (
    "Hugging Face transformers: model(ids) for prefill (all rows of logits, KV cache built) and "
    "generate(do_sample=False, KV cache) for decode, attention {attn}, on the same tensors"
)
PLAIN_BASELINE = "PlainRunner: the project's plain torch forward with a KV cache on the same TorchBackend"


#: The most rounds a measurement takes: its bootstrap (bench_stats.ratio_interval: 4000 draws of every round,
#: their int64 indices and both sides' float64 seconds) holds ~96 kB a round, ~190 MB at this many — and a
#: 128-token run of so many rounds already takes an hour.
MAX_REPEATS = 2000


def register(subparsers: Any) -> None:
    """Add ``scx bench`` to the CLI."""
    p = subparsers.add_parser(
        "bench",
        help="SCX vs Hugging Face plaintext latency ratios (prefill and per-token generation), interleaved",
        description=plain_description(__doc__),
    )
    p.add_argument("--model", default="smollm2", help=f"model (default smollm2): {weights_names_help()}")
    p.add_argument("--json", metavar="PATH", type=output_file, help="write the result rows as JSON")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=TORCH_DTYPES,
        help="float32 (default), float64, bfloat16, float16",
    )
    p.add_argument(
        "--repeats",
        type=int_at_least(1, MAX_REPEATS),
        default=9,
        help=f"interleaved rounds per measurement, 1 to {MAX_REPEATS} (default 9; verdicts need 6 or more)",
    )
    p.add_argument(
        "--warmup",
        type=int_at_least(0),
        default=1,
        help="untimed rounds before the timed ones, per measurement (default 1)",
    )
    p.add_argument("--quick", action="store_true", help="short prompts and few tokens (smoke test)")
    p.add_argument(
        "--levels",
        default="permute",
        help="comma-separated SCX levels (default permute; 'permute,blind' is a long run: blind computes "
        "every correction η·W)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated named configurations (scx_ref.protocol.presets), timed beside --levels",
    )
    p.add_argument(
        "--pool",
        action="store_true",
        help="derive each request's one-time masks in an offline mask pool (scx_ref.protocol.pool) instead "
        "of Client.precompute: the prompt's length is then unknown ahead and its permutations are online",
    )
    p.add_argument(
        "--n", type=int_list(1), default=None, help="comma-separated prefill lengths (default 128,512,2048)"
    )
    p.add_argument(
        "--gen-prompt", type=int_at_least(1), default=None, help="prompt length before generation (512)"
    )
    p.add_argument(
        "--gen-tokens",
        type=int_at_least(0),
        default=None,
        help="generated tokens timed (64; 0: no decode phase)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        default=None,
        help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's)",
    )
    p.add_argument(
        "--no-plain-runner", action="store_true", help="skip the PlainRunner column (a shorter run)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--verify-cost",
        action="store_true",
        help="also time each level with reply verification off and report the ratio (verify column)",
    )
    p.set_defaults(func=main)


@dataclass
class _Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    mem: list[float] = field(default_factory=list)
    keys: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # SCX: the seconds inside the server's handle calls

    def add(self, wall: float, cpu: float, mem: float, keys: float = 0.0, server: float = 0.0) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.mem.append(mem)
        self.keys.append(keys)
        self.server.append(server)

    def median(self) -> float:
        return statistics.median(self.wall)

    def total_median(self) -> float:
        """Median of request + key derivation (the client's whole work)."""
        return statistics.median(w + k for w, k in zip(self.wall, self.keys, strict=True))


@dataclass
class BenchResult:
    """One row: a phase, a length, a level, and the SCX / baseline ratios.

    ``ratio_median`` counts the critical path (keys derived before the request: the online cost);
    ``total_ratio_median`` adds the key derivation (``keys_median_s``: the offline cost). ``*_median_s``
    are median seconds (decode: per token): ``baseline`` (Hugging Face, or PlainRunner when the model has
    none — see the JSON's meta), ``plain_runner`` (the project's own plaintext path, or None when
    skipped), ``scx`` (critical path), ``keys`` (key derivation). ``client_flop_share`` is the client's
    online share of the request's flops, ``offline_flop_share`` its corrections η·W derived ahead.
    ``server_*`` / ``client_*``: the request's seconds inside the server's ``handle`` calls and the rest
    of it (in process: the client's own work), so that ratio_median ≈ server_ratio_median +
    client_ratio_median up to the medians being taken separately.
    """

    phase: str
    n: int
    level: str
    ratio_median: float
    total_ratio_median: float
    cpu_ratio_median: float
    plain_runner_ratio: float | None
    baseline_median_s: float
    plain_runner_median_s: float | None
    scx_median_s: float
    keys_median_s: float
    mem_ratio: float | None
    state_ratio: float
    client_flop_share: float
    offline_flop_share: float
    repeats: int
    tokens: int = 0
    verify_ratio: float | None = None  # median(SCX) / median(SCX without reply verification)
    #: SCX / baseline of each round (the two timed in the same round): their median and quartiles show the
    #: run's noise, which the ratio of medians hides
    round_ratios: list[float] = field(default_factory=list)
    round_ratio_q1: float = 0.0
    round_ratio_q3: float = 0.0
    round_ratio_median: float = 0.0
    #: each timed round's seconds (decode: per token), in round order
    scx_round_s: list[float] = field(default_factory=list)
    baseline_round_s: list[float] = field(default_factory=list)
    #: each timed round's key derivation ahead (decode: per token), in round order: the offline part of
    #: ``total_ratio_median``
    keys_round_s: list[float] = field(default_factory=list)
    #: each timed round's peak-memory growth in bytes (decode: the steps'), SCX's and the baseline's, in round
    #: order: ``mem_ratio`` is the ratio of their medians (None when either median is below 1 MiB)
    scx_mem_round_bytes: list[float] = field(default_factory=list)
    baseline_mem_round_bytes: list[float] = field(default_factory=list)
    warmup: int = 0  # untimed rounds before them
    pool: dict[str, float] | None = None  # --pool: the entry's memory per token / step, fill throughput
    #: the SCX request split in two (decode: per token): the seconds inside the server's ``handle`` calls
    #: and the rest (the client's own work and the transport's), each round's and their medians, and those
    #: medians over the baseline's
    server_round_s: list[float] = field(default_factory=list)
    server_median_s: float = 0.0
    client_median_s: float = 0.0
    server_ratio_median: float = 0.0
    client_ratio_median: float = 0.0
    #: how precise the two readings are (:mod:`.bench_stats`): a paired-bootstrap 95 % interval of
    #: ``ratio_median``, and the distribution-free ≥ 95 % interval of ``round_ratio_median`` with its exact
    #: coverage (None below 6 rounds)
    ratio_interval: list[float] = field(default_factory=list)
    round_ratio_interval: list[float] | None = None
    round_ratio_coverage: float | None = None
    #: the level's secret calibration pool (the client's default decoys; None for others): the requests one
    #: of its epochs serves, one build of the next epoch in seconds (measured once after the rounds, in none
    #: of them), and that build spread over the epoch's requests over the baseline's median request — the
    #: client's work that ``total_ratio_median`` leaves out when no round builds an epoch
    refill_every: int | None = None
    refill_s: float | None = None
    refill_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field of the result, as the bench's JSON writes it."""
        return dict(vars(self))


class _PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak; on Linux the kernel's own peak resident set
    (``VmHWM``, reset at the start by writing 5 to ``/proc/self/clear_refs``: exact, and nothing runs beside
    the block); elsewhere resident-set growth sampled every 2 ms by a thread. The sampling thread took the
    GIL and a core every 2 ms: on two threads it slowed a 128-token prefill by 4–7 % (both sides).
    On the host, the torch backend's pooled buffers that the block used again (already resident when it
    began, so not in the growth: :func:`~scx_ref.backends.host_memory.reused_bytes`) are added to it."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.peak = 0.0
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: no RSS sampling
            return 0

    @staticmethod
    def _status() -> dict[str, int] | None:
        """VmRSS and VmHWM in bytes (None where /proc/self/status lacks them)."""
        try:
            with open("/proc/self/status") as f:
                got = {
                    k: int(v.split()[0]) * 1024
                    for k, v in (ln.split(":", 1) for ln in f if ":" in ln)
                    if k in ("VmRSS", "VmHWM")
                }
        except (OSError, ValueError):
            return None
        return got if len(got) == 2 else None

    @classmethod
    def _reset_peak(cls, tries: int = 5) -> int | None:
        """Reset the kernel's peak resident set to the current one; that size, or None where it cannot.

        Memory another thread frees between the reset and the read (a pool winding down) leaves the peak
        above the resident set: the reset is tried again, ``tries`` times in all, before it is judged
        unavailable (and a sampling thread, which slows what it measures, is started instead)."""
        for _ in range(tries):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                return None
            st = cls._status()
            if st is None:
                return None
            if st["VmHWM"] <= st["VmRSS"]:
                return st["VmRSS"]
        return None

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = float(torch.cuda.memory_allocated(self.device))
            return self
        from ..backends import host_memory

        host_memory.mark()
        base = self._reset_peak()
        if base is not None:
            self._base = float(base)
            return self
        self._base = float(self._rss())
        self._stop = threading.Event()
        self._max = self._base

        self._lock = threading.Lock()

        def sample() -> None:
            while not self._stop.is_set():
                with self._lock:  # not across a restart(): its new base would be lost
                    self._max = max(self._max, float(self._rss()))
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def restart(self) -> None:
        """Measure from now on: the growth over the memory in use at this call (what a Hugging Face
        ``generate`` reaches after its prompt's prefill, so that its decode's peak is the steps' alone, as
        SCX's and PlainRunner's are)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = float(torch.cuda.memory_allocated(self.device))
            return
        from ..backends import host_memory

        host_memory.mark()
        if self._thread is None:
            base = self._reset_peak()
            # a reset refused now (it was granted on entry): the entry's peak stays in, an upper bound
            self._base = float(base if base is not None else self._rss())
            return
        with self._lock:
            self._base = self._max = float(self._rss())

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = float(torch.cuda.max_memory_allocated(self.device)) - self._base
        elif self._thread is None:
            st = self._status()
            self.peak = max(0.0, float(st["VmHWM"]) - self._base) if st is not None else 0.0
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, float(self._rss()))
            self.peak = self._max - self._base
        if self.device.type != "cuda":
            from ..backends import host_memory

            self.peak += float(host_memory.reused_bytes())


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


def _hf_cache_tensors(cache: Any) -> list[Any]:
    """The key/value tensors of a Hugging Face cache (transformers 5: ``cache.layers[i].keys/values``)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    return [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]


def _hf_cache(out: Any) -> Any:
    """The cache of a Hugging Face output (``cache`` in transformers 5, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: Any) -> tuple[float, float, float, Any]:
    with _PeakMemory(device) as mem:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, mem.peak, out


def build_models(model: str, dtype: str, device: str) -> tuple[Any, Any | None, str]:
    """(TorchBackend, the Hugging Face model it shares its tensors with or None, the model actually used)
    for a ``--model`` name of the registry.

    A registered model runs on its HF model's weights (cast to ``dtype`` on ``device`` first, so the
    baseline and SCX compute with the same tensors; :func:`scx_ref.hf.backend_from_hf`); ``smollm2`` falls
    back to ``random:smollm2-shape`` with a notice on stderr when its weights are unavailable. A
    ``random:<preset>[:seed]`` name runs on :func:`scx_ref.zoo.load_weights` and has no HF model.
    ConfigError for any other name.
    """
    from ..backends.torch_backend import TorchBackend, parse_dtype
    from ..hf import backend_from_hf

    if parse_random(model) is None:
        if model not in MODEL_NAMES:
            raise ConfigError(f"unknown bench model {model!r}; choose {weights_names_help()}")
        try:
            hf_model, _tokenizer = load_hf(model)
            hf_model = hf_model.to(device=device, dtype=parse_dtype(dtype)).eval()
            return backend_from_hf(hf_model, dtype=dtype, device=device), hf_model, model
        except (SCXError, OSError) as exc:
            if model != "smollm2":
                raise
            print(
                f"scx bench: SmolLM2 weights unavailable ({exc}); using {SMOLLM2_FALLBACK}", file=sys.stderr
            )
            model = SMOLLM2_FALLBACK
    np_dtype = np.float64 if parse_dtype(dtype).itemsize == 8 else np.float32
    return TorchBackend(load_weights(model, np_dtype), dtype=dtype, device=device), None, model


def build_backend(model: str, dtype: str, device: str) -> tuple[Any, str]:
    """(TorchBackend, the model actually used) for a ``--model`` name (:func:`build_models`)."""
    backend, _hf, used = build_models(model, dtype, device)
    return backend, used


class _FirstToken:
    """A ``generate`` streamer that notes when the first generated token arrives (after the prefill),
    calling ``on_first()`` then, before it reads the clocks (its own time stays out of the steps')."""

    def __init__(self, on_first: Callable[[], None] = lambda: None) -> None:
        self.calls = 0
        self.t_first = 0.0
        self.c_first = 0.0
        self.on_first = on_first

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt, call 2 the token the prefill produced
            self.on_first()
            self.t_first, self.c_first = time.perf_counter(), time.process_time()

    def end(self) -> None:
        pass


#: One timed run: (wall, cpu, mem, keys, server) — seconds, seconds, bytes, seconds deriving the keys ahead
#: (SCX), seconds inside the server's ``handle`` calls (SCX; 0 for the baselines).
_Run = tuple[float, float, float, float, float]


class _Sides:
    """The three kinds of runs of one measurement, each returning a :data:`_Run` and leaving its state for
    the state ratio. Each SCX request is served by a fresh server whose ``handle`` calls are timed
    (:func:`~scx_ref.timing.timed_server`)."""

    def __init__(
        self, backend: Any, hf_model: Any | None, clients: dict[str, Any], device: Any, pool: bool = False
    ) -> None:
        from ..forward import PlainRunner
        from ..protocol import Server
        from ..timing import timed_server

        self.b = backend
        self.server_cls, self.in_server = timed_server(Server)
        self.hf = hf_model
        self.clients = clients
        self.pool = pool
        self.pool_stats: dict[str, dict[str, float]] = {}
        self.device = device
        self.plain = PlainRunner(backend)
        self.state: dict[str, int] = {}
        self.share: dict[str, float] = {}
        self.offline: dict[str, float] = {}

    # -- Hugging Face ---------------------------------------------------------------------------------
    def hf_prefill(self, ids: np.ndarray) -> _Run:
        import torch

        tid = torch.from_numpy(ids)[None].to(self.device)
        w, cpu, mem, out = _timed(lambda: self._hf_logits(tid), self.device)
        self.state["baseline"] = _state_bytes(_hf_cache_tensors(_hf_cache(out)))
        return w, cpu, mem, 0.0, 0.0

    def _hf_logits(self, tid: Any) -> Any:
        assert self.hf is not None
        out = self.hf(tid, use_cache=True)
        out.logits[0].float().cpu().numpy()  # the caller gets numpy logits, as from SCX
        return out

    def hf_decode(self, ids: np.ndarray, n_new: int) -> _Run:
        import torch

        assert self.hf is not None
        tid = torch.from_numpy(ids)[None].to(self.device)
        with _PeakMemory(self.device) as mem:
            # the steps' peak, as SCX's and PlainRunner's are: not the prompt's prefill
            streamer = _FirstToken(mem.restart)
            out = self.hf.generate(
                tid,
                attention_mask=torch.ones_like(tid),
                max_new_tokens=n_new + 1,
                min_new_tokens=n_new + 1,
                do_sample=False,
                use_cache=True,
                streamer=streamer,
                pad_token_id=0,
                return_dict_in_generate=True,
            )
            _sync(self.device)
            wall, cpu = time.perf_counter() - streamer.t_first, time.process_time() - streamer.c_first
        self.state["baseline"] = _state_bytes(_hf_cache_tensors(_hf_cache(out)))
        return wall, cpu, mem.peak, 0.0, 0.0

    # -- PlainRunner ----------------------------------------------------------------------------------
    def plain_prefill(self, ids: np.ndarray) -> _Run:
        w, cpu, mem, _ = _timed(lambda: self.b.to_numpy(self.plain.prefill(ids)), self.device)
        self.state["plain"] = _state_bytes([t for kv in self.plain.cache for t in kv])
        return w, cpu, mem, 0.0, 0.0

    def plain_decode(self, ids: np.ndarray, n_new: int) -> _Run:
        plain = self.plain
        tok = plain.b.argmax_last(plain.prefill(ids, last_only=True))

        def steps() -> None:
            t = tok
            for _ in range(n_new):
                t = int(np.argmax(plain.b.to_numpy(plain.decode(t))))

        w, cpu, mem, _ = _timed(steps, self.device)
        self.state["plain"] = _state_bytes([t for kv in plain.cache for t in kv])
        return w, cpu, mem, 0.0, 0.0

    # -- SCX ------------------------------------------------------------------------------------------
    def _prepare(self, client: Any, n: int, steps: int, nonce: bytes | None) -> bytes | None:
        """Derive the request's keys ahead: ``Client.precompute`` under ``nonce``, or (``--pool``) one
        mask-pool entry of capacity n, which the prefill takes (its nonce: None here)."""
        if not self.pool:
            client.precompute(n, steps=steps, nonce=nonce)
            return nonce
        from ..protocol.pool import MaskPool

        pool = MaskPool(client, capacity=n, steps=steps)
        pool.fill(1)
        self.pool_stats[self._label(client)] = {
            "bytes_per_prompt_token": pool.bytes_per_prompt_token,
            "bytes_per_step": pool.bytes_per_step,
            "prompt_tokens_per_s": pool.tokens_per_second,
            # bytes a mask value takes: 8 where the blinded stages run in float64 (a float32 run above
            # float32's β limit, SCXConfig.blind_dtype "auto": twice the bytes above), else the run's
            "mask_bytes_per_value": float(client.bb.numpy_dtype().itemsize),
        }
        return None

    def _label(self, client: Any) -> str:
        return next(name for name, c in self.clients.items() if c is client)

    def scx_prefill(self, level: str, ids: np.ndarray) -> _Run:
        from ..keys import KeySchedule
        from ..protocol import LocalTransport

        client = self.clients[level]
        server = self.server_cls(self.b)
        link = LocalTransport(server)
        nonce: bytes | None = KeySchedule.new_nonce()
        with _PeakMemory(self.device) as mem:  # memory: the keys and the request together
            k0 = time.perf_counter()
            nonce = self._prepare(client, len(ids), 0, nonce)
            _sync(self.device)  # the keys' device work stays out of the request's time
            keys = time.perf_counter() - k0
            self.in_server[0] = 0.0
            w0, c0 = time.perf_counter(), time.process_time()
            client.prefill(ids, link, nonce=nonce)
            _sync(self.device)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        in_server = self.in_server[0]
        report = client.cost_report(link, server.cost(client.session))
        self.share[level], self.offline[level] = report.client_flop_share, report.offline_flop_share
        self.state[level] = _scx_state(server, client)
        self._close(client)
        return wall, cpu, mem.peak, keys, in_server

    @staticmethod
    def _close(client: Any) -> None:
        """End the session after its measurement, as the baselines' caches are dropped after theirs: left
        open, its server's caches (the client's link holds the server) stayed resident into the next
        request, whose prefill closed it — its close then timed in that request, and the memory it freed
        there reused by it, unseen in its peak."""
        client.close()

    def scx_decode(self, level: str, ids: np.ndarray, n_new: int) -> _Run:
        from ..keys import KeySchedule
        from ..protocol import LocalTransport

        client = self.clients[level]
        server = self.server_cls(self.b)
        link = LocalTransport(server)
        nonce: bytes | None = KeySchedule.new_nonce()
        nonce = self._prepare(client, len(ids), n_new, nonce)
        tok = int(np.argmax(client.prefill(ids, link, nonce=nonce)[-1]))
        self.in_server[0] = 0.0  # the steps' server time only (key sharing included), not the prefill's
        prep = client.state.prep

        def steps() -> None:
            t = tok
            client.share_keys(link)  # part of generation's cost, amortised over the tokens
            for _ in range(n_new):
                t = int(np.argmax(client.decode(t, link)))

        w, cpu, mem, _ = _timed(steps, self.device)
        in_server = self.in_server[0]
        report = client.cost_report(link, server.cost(client.session))
        self.share[level], self.offline[level] = report.client_flop_share, report.offline_flop_share
        self.state[level] = _scx_state(server, client)
        self._close(client)
        return w, cpu, mem, prep.seconds_generation, in_server


#: The longest session the bench's clients open (their ``SCXConfig.max_length``), below a model's own limit.
MAX_LENGTH = 4096


def check_lengths(lengths: list[int], gen_prompt: int, gen_tokens: int, max_positions: int) -> None:
    """ConfigError, naming the option, unless every prefill length and the generation phase (a prompt of
    ``gen_prompt`` tokens, then ``gen_tokens`` tokens each fed back) fit a session of the bench: at most
    the model's ``max_positions`` and :data:`MAX_LENGTH` positions."""
    limit = min(max_positions, MAX_LENGTH)
    where = f"the bench's sessions of at most {limit} positions (the model's max_positions {max_positions})"
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ConfigError(f"--n {too_long[0]} exceeds {where}")
    if gen_tokens and gen_prompt + gen_tokens > limit:
        raise ConfigError(
            f"--gen-prompt {gen_prompt} + --gen-tokens {gen_tokens} = {gen_prompt + gen_tokens} positions "
            f"exceed {where}"
        )


def _positions(model: str) -> int | None:
    """The most positions ``--model`` takes, known before it loads (None for a name the loader refuses)."""
    random = parse_random(model)
    if random is not None:
        return RANDOM_PRESETS[random[0]].max_positions
    return max_positions(model) if model in MODEL_NAMES else None


def _check_row_names(levels: list[str], configs: list[str]) -> None:
    """ConfigError unless every row name is given once: a configuration named like a level (the preset
    ``permute`` is not the level's default configuration) replaced that level's row under its name."""
    twice = sorted({c for c in configs if configs.count(c) > 1})
    if twice:
        raise ConfigError(f"--configs: {twice} named twice")
    both = [c for c in configs if c in levels]
    if both:
        raise ConfigError(
            f"--configs {both} also named in --levels: one row per name (the preset is not the level's "
            "default configuration); drop it from one of them"
        )


def run_bench(
    backend: Any,
    levels: list[str],
    lengths: list[int],
    gen_prompt: int,
    gen_tokens: int,
    repeats: int,
    progress: bool = True,
    hf_model: Any | None = None,
    plain_runner: bool = True,
    verify_cost: bool = False,
    configs: dict[str, Any] | None = None,
    pool: bool = False,
    warmup: int = 1,
) -> list[BenchResult]:
    """Interleaved baseline / PlainRunner / SCX timings on ``backend``; one row per (phase, n, level).

    The baseline is ``hf_model`` (Hugging Face forward and generate on the backend's tensors) when given,
    else PlainRunner. Each measurement first runs ``warmup`` untimed rounds, then ``repeats`` timed ones.
    Rounds alternate the order (baseline first, then SCX first), so a drift of the machine's speed within
    a round does not favour either side. SCX keys are derived before each request (timed separately:
    ``keys``); see the module doc. ``verify_cost``: each level also runs with reply verification off (rows
    ``<level>:noverify``), and the verified rows carry the ratio.
    """
    import torch

    from ..keys import KeySchedule
    from ..protocol import Client, SCXConfig

    c = backend.config
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"run_bench needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    _check_row_names(levels, list(configs or {}))
    check_lengths(lengths, gen_prompt, gen_tokens, c.max_positions)
    rng = np.random.default_rng(1234)  # public benchmark prompts
    master = KeySchedule.generate()
    max_length = min(c.max_positions, MAX_LENGTH)
    named = {lv: SCXConfig(level=lv, max_length=max_length) for lv in levels}  # type: ignore[arg-type]
    for name, cfg in (configs or {}).items():
        named[name] = replace(cfg, max_length=max_length)
    if verify_cost:
        named.update({f"{lv}:noverify": replace(cfg, verify=False) for lv, cfg in list(named.items())})
    levels = list(named)
    clients = {name: Client(backend, master, cfg) for name, cfg in named.items()}
    sides_obj = _Sides(backend, hf_model, clients, backend.device, pool)
    has_hf = hf_model is not None
    plain_col = plain_runner and has_hf  # without HF, PlainRunner *is* the baseline
    jobs = [("prefill", n) for n in lengths] + ([("decode", gen_prompt)] if gen_tokens > 0 else [])
    base_sides = ["baseline", *(["plain"] if plain_col else [])]
    total = len(jobs) * (warmup + repeats) * (len(base_sides) + len(levels))
    bar = _progress(total, progress)
    rows: list[BenchResult] = []
    for phase, n in jobs:
        ids = rng.integers(0, c.vocab_size, size=n, dtype=np.int64)
        timings = {side: _Timing() for side in (*base_sides, *levels)}
        order = [*base_sides, *levels]
        for rnd in range(-warmup, repeats):  # rounds below 0: untimed
            for side in order if rnd % 2 == 0 else order[::-1]:
                with torch.inference_mode():
                    got = _run_side(sides_obj, side, phase, ids, gen_tokens, has_hf)
                if rnd >= 0:
                    timings[side].add(*got)
                bar(f"{phase} n={n} {side}" + (" (warm-up)" if rnd < 0 else ""))
        div = gen_tokens if phase == "decode" else 1
        base = timings["baseline"]
        plain_t = timings.get("plain")
        for lv in levels:
            t = timings[lv]
            pmem, smem = statistics.median(base.mem), statistics.median(t.mem)
            paired = [x / y for x, y in zip(t.wall, base.wall, strict=True)]  # round by round
            q1, q3 = quartiles(paired)
            around = median_interval(paired)
            draws = np.random.default_rng(SEED)
            server_s = statistics.median(t.server) / div
            client_s = statistics.median(w - s for w, s in zip(t.wall, t.server, strict=True)) / div
            rows.append(
                BenchResult(
                    phase=phase,
                    n=n,
                    level=lv,
                    ratio_median=t.median() / base.median(),
                    total_ratio_median=t.total_median() / base.median(),
                    cpu_ratio_median=statistics.median(t.cpu) / statistics.median(base.cpu),
                    plain_runner_ratio=None if plain_t is None else t.median() / plain_t.median(),
                    baseline_median_s=base.median() / div,
                    plain_runner_median_s=None if plain_t is None else plain_t.median() / div,
                    scx_median_s=t.median() / div,
                    keys_median_s=statistics.median(t.keys) / div,
                    mem_ratio=smem / pmem if min(pmem, smem) >= _MIN_MEM else None,
                    state_ratio=sides_obj.state[lv] / sides_obj.state["baseline"],
                    client_flop_share=sides_obj.share[lv],
                    offline_flop_share=sides_obj.offline[lv],
                    repeats=repeats,
                    tokens=gen_tokens if phase == "decode" else 0,
                    verify_ratio=(
                        t.median() / timings[f"{lv}:noverify"].median()
                        if f"{lv}:noverify" in timings
                        else None
                    ),
                    pool=sides_obj.pool_stats.get(lv),
                    round_ratios=paired,
                    round_ratio_q1=q1,
                    round_ratio_q3=q3,
                    round_ratio_median=statistics.median(paired),
                    scx_round_s=[w / div for w in t.wall],
                    baseline_round_s=[w / div for w in base.wall],
                    keys_round_s=[k / div for k in t.keys],
                    scx_mem_round_bytes=list(t.mem),
                    baseline_mem_round_bytes=list(base.mem),
                    warmup=warmup,
                    server_round_s=[s / div for s in t.server],
                    server_median_s=server_s,
                    client_median_s=client_s,
                    server_ratio_median=server_s / (base.median() / div),
                    client_ratio_median=client_s / (base.median() / div),
                    ratio_interval=list(ratio_interval(t.wall, base.wall, draws)),
                    round_ratio_interval=None if around is None else [around[0], around[1]],
                    round_ratio_coverage=None if around is None else around[2],
                )
            )
    bar(None)
    refills = {lv: _refill(client) for lv, client in clients.items()}
    for row in rows:
        refill = refills[row.level]
        if refill is not None:
            request_s = row.baseline_median_s * (row.tokens if row.phase == "decode" else 1)
            row.refill_s, row.refill_every = refill
            row.refill_ratio = refill[0] / refill[1] / request_s
    return rows


def _refill(client: Any) -> tuple[float, int] | None:
    """(one build of the next epoch in seconds, the requests an epoch serves) of the client's secret
    calibration pool, or None for other decoys (:meth:`~scx_ref.protocol.decoys.CalibrationPool.
    time_refill`, :meth:`~scx_ref.protocol.decoys.CalibrationPool.refill_every`)."""
    import torch

    from ..protocol.decoys import CalibrationPool

    pool = client.decoys
    every = pool.refill_every() if isinstance(pool, CalibrationPool) else None
    if every is None:
        return None
    with torch.inference_mode():
        seconds = pool.time_refill()
    return None if seconds is None else (seconds, every)


def _run_side(sides: _Sides, side: str, phase: str, ids: np.ndarray, n_new: int, has_hf: bool) -> _Run:
    if side == "baseline" and has_hf:
        return sides.hf_prefill(ids) if phase == "prefill" else sides.hf_decode(ids, n_new)
    if side in ("baseline", "plain"):
        out = sides.plain_prefill(ids) if phase == "prefill" else sides.plain_decode(ids, n_new)
        if side == "baseline":
            sides.state["baseline"] = sides.state["plain"]
        return out
    return sides.scx_prefill(side, ids) if phase == "prefill" else sides.scx_decode(side, ids, n_new)


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


def format_table(rows: list[BenchResult], model: str, device: str, dtype: str, baseline: str) -> str:
    """The human-readable report."""
    lines = [
        f"scx bench — model {model}, {device}, {dtype}; baseline: {baseline}",
        "ratio (online) = median(SCX, keys and masks derived ahead) / median(baseline); total (online + "
        "offline) = with that derivation",
        f"{'phase':8} {'n':>5} {'level':14} {'ratio':>7} {'95% interval':>16} {'srv':>6} {'own':>6} "
        f"{'total':>7} {'cpu':>7} "
        f"{'vsPR':>6} {'base':>9} "
        f"{'plainR':>9} {'scx':>9} {'keys':>8} {'mem':>6} {'state':>6} {'client':>7} {'verify':>7} "
        f"{'rounds q1 / median / q3':>23} {'median interval':>16}",
    ]
    for r in rows:
        unit = "s/tok" if r.phase == "decode" else "s"
        mem = f"{r.mem_ratio:6.2f}" if r.mem_ratio is not None else "     -"
        vs_pr = f"{r.plain_runner_ratio:6.3f}" if r.plain_runner_ratio is not None else "     -"
        pr = f"{r.plain_runner_median_s:7.4f}{unit[0]:>2}" if r.plain_runner_median_s is not None else " " * 9
        ci = "[{:6.3f}, {:6.3f}]".format(*r.ratio_interval) if r.ratio_interval else f"{'-':>16}"
        around = r.round_ratio_interval
        rci = f"[{around[0]:6.3f}, {around[1]:6.3f}]" if around is not None else f"{'-':>16}"
        lines.append(
            f"{r.phase:8} {r.n:5d} {r.level:14} {r.ratio_median:7.3f} {ci} {r.server_ratio_median:6.3f} "
            f"{r.client_ratio_median:6.3f} {r.total_ratio_median:7.3f} "
            f"{r.cpu_ratio_median:7.3f} {vs_pr} {r.baseline_median_s:7.4f}{unit[0]:>2} {pr} "
            f"{r.scx_median_s:7.4f}{unit[0]:>2} {r.keys_median_s:6.4f}{unit[0]:>2} {mem} "
            f"{r.state_ratio:6.2f} {100 * r.client_flop_share:6.2f}% "
            + (f"{r.verify_ratio:7.3f}" if r.verify_ratio is not None else "      -")
            + f" {r.round_ratio_q1:6.3f} / {r.round_ratio_median:5.3f} / {r.round_ratio_q3:5.3f} {rci}"
        )
    refilled: dict[str, list[BenchResult]] = {}
    for r in rows:
        if r.refill_ratio is not None:
            refilled.setdefault(r.level, []).append(r)
    for level, rs in refilled.items():
        share = " / ".join(f"{r.refill_ratio:.4f}" for r in rs)
        where = " / ".join(f"{r.phase} n={r.n}" for r in rs)
        lines.append(
            f"calibration pool {level}: an epoch serves {rs[0].refill_every} requests; building the next "
            f"took {rs[0].refill_s:.3f} s (once, after the rounds): spread over the epoch, "
            f"{1000 * (rs[0].refill_s or 0.0) / (rs[0].refill_every or 1):.2f} ms a request = {share} of the "
            f"baseline's median request at {where} (not in total unless a round built an epoch)"
        )
    for r in rows:
        if r.pool:
            per_token, per_step = r.pool["bytes_per_prompt_token"] / 1024, r.pool["bytes_per_step"] / 1024
            value = r.pool.get("mask_bytes_per_value", 0.0)
            lines.append(
                f"pool {r.phase} {r.level}: an entry holds {per_token:.1f} KiB per prompt token and "
                f"{per_step:.1f} KiB per decode step ({value:.0f} bytes a mask value); filled at "
                f"{r.pool['prompt_tokens_per_s']:.0f} prompt tokens/s; offline flop share "
                f"{100 * r.offline_flop_share:.1f}%"
            )
    lines.append(
        "srv / own: the SCX request's seconds inside the server's handle calls / the rest of it (the "
        "client's own work), medians over the baseline's median; "
        "base/plainR/scx/keys: median seconds (decode: per token); vsPR: SCX / PlainRunner; cpu: process CPU "
        "time ratio; mem: peak-memory ratio (- when the run's growth is below 1 MiB); state: KV-state bytes "
        "held after the run (server + client) / baseline KV cache; client: flop share; verify: median(SCX) / "
        "median(SCX without reply verification) (--verify-cost); rounds: quartiles and median of SCX / "
        "baseline per round (each pair timed in the same round): the spread is this run's noise, and where "
        "the median differs from ratio the machine's speed drifted during the run; 95% interval: of ratio, a "
        "paired bootstrap over the rounds (approximate); median interval: of the rounds' median, "
        "distribution-free (two order statistics, coverage ≥ 95 %, the exact value in the JSON; - below 6 "
        "rounds). A goal above an interval: shown met by this run; below it: shown missed; inside: undecided "
        "(with 6 rounds or more: the interval of fewer is too short to judge, of 1 it is the ratio itself)"
    )
    return "\n".join(lines)


def _machine() -> str:
    """The CPU model and logical CPU count (Linux /proc/cpuinfo when readable)."""
    import platform

    name = cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical CPUs"


def _accelerator(device: str) -> str | None:
    """The GPU a ``cuda`` device names (torch's name for it), None for the CPU."""
    import torch

    dev = torch.device(device)
    return str(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print (and optionally save) the ratios."""
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(f"scx bench needs torch (pip install 'scx-ref[torch]'): {exc}") from exc
    from ..backends import torch_backend

    require_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    levels = [lv.strip() for lv in args.levels.split(",")]
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ConfigError(f"--levels: unknown level(s) {bad}; choose from {list(LEVELS)}")
    if len(set(levels)) < len(levels):
        raise ConfigError(f"--levels: a level named twice in {args.levels!r}")
    names = [] if args.configs is None else [c.strip() for c in args.configs.split(",")]
    if "" in names:  # an empty item was dropped: `--configs ""` timed no configuration, silently
        raise ConfigError(f"--configs: an empty name in {args.configs!r}")
    for name in names:
        preset(name)  # ConfigError for an unknown name, before any work
    _check_row_names(levels, names)
    if args.quick:
        lengths, gen_prompt, gen_tokens = [32, 128], 64, 8
    else:
        lengths, gen_prompt, gen_tokens = [128, 512, 2048], 512, 64
    if args.n is not None:
        lengths = args.n
    if args.gen_prompt is not None and args.gen_tokens == 0:
        raise ConfigError("--gen-prompt: --gen-tokens 0 times no decode phase: the prompt would be ignored")
    gen_prompt = args.gen_prompt if args.gen_prompt is not None else gen_prompt
    gen_tokens = args.gen_tokens if args.gen_tokens is not None else gen_tokens
    limit = _positions(args.model)
    if limit is not None:  # before the model loads
        check_lengths(lengths, gen_prompt, gen_tokens, limit)
    backend, hf_model, used = build_models(args.model, args.dtype, args.device)
    configs = {name: preset(name).config(backend.config.n_layers) for name in names}
    if hf_model is not None:
        baseline = HF_BASELINE.format(attn=getattr(hf_model.config, "_attn_implementation", "?"))
    else:
        baseline = PLAIN_BASELINE
    load_before = _load()
    t0 = time.perf_counter()
    rows = run_bench(
        backend,
        levels,
        lengths,
        gen_prompt,
        gen_tokens,
        args.repeats,
        not args.no_progress,
        hf_model=hf_model,
        plain_runner=not args.no_plain_runner,
        verify_cost=args.verify_cost,
        configs=configs,
        pool=bool(args.pool),
        warmup=args.warmup,
    )
    print(format_table(rows, used, args.device, args.dtype, "Hugging Face" if hf_model else "PlainRunner"))
    if args.json:
        meta = {
            "command": " ".join(["scx", *sys.argv[1:]]),
            "machine": _machine(),
            "accelerator": _accelerator(args.device),  # the GPU of a cuda run
            "load_average_before": load_before,
            "load_average_after": _load(),
            "seconds": round(time.perf_counter() - t0, 1),
            "model": used,
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "baseline": baseline,
            "second_column": None if hf_model is None or args.no_plain_runner else PLAIN_BASELINE,
            "ratio": "median SCX critical path (keys derived before the request) / median baseline",
            "warmup_rounds": args.warmup,
            "keys": "offline mask pool (one entry per request)" if args.pool else "Client.precompute",
            "configs": {name: cfg.to_dict() for name, cfg in configs.items()},
            "total_ratio": "median SCX request + its key derivation (the client's whole work) / baseline",
            "refill": "a secret calibration pool's next epoch: built once after the rounds and timed "
            "(refill_s); refill_ratio = refill_s / refill_every / the baseline's median request",
            "torch": torch.__version__,
            # the narrowest input from which wide CPU products ran in column blocks on this machine
            # (torch_backend.dense: 0 on AMD CPUs with MKL, 1024 elsewhere)
            "gemm_block_min_in": torch_backend.GEMM_BLOCK_MIN_IN,
            # the rows [first, last] that dense padded to GEMM_BLOCK_ROWS for weights of at least
            # gemm_pad_min_weights entries (a faster CPU GEMM kernel)
            "gemm_pad_rows": [torch_backend.GEMM_PAD_MIN_ROWS, torch_backend.GEMM_BLOCK_ROWS - 1],
            "gemm_pad_min_weights": torch_backend.GEMM_PAD_MIN_WEIGHTS,
        }
        write_text_whole(
            args.json, result_json({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2)
        )
    return 0

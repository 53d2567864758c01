"""``scx bench-serve``: SCX over the network (an ``scx serve`` on loopback) against the in-process
transport, on the same model and settings — a benchmark, it asserts nothing about time.

Two measurements:

* **latency** — one client, interleaved rounds (in-process, remote, in-process, …) after ``--warmup``
  untimed rounds of each side (default 1: one-time costs stay out of the medians): prefill of an
  ``--n``-token prompt, and per-token generation after it; the ratio remote / in-process of the medians,
  and the per-message overhead (extra time / messages). The in-process server uses the remote server's
  ``batch_rows``, so both compute the same tiles.
* **load** — for each C in ``--clients``: C concurrent clients (threads of this process, one session each,
  a ``--prompt-len`` prompt + ``--tokens`` greedy tokens): every output checked against plaintext greedy
  decoding, request latency (p50, p99), per-token latency (p50, p99) and aggregate tokens/s; the same run
  over the in-process transport (one in-process server shared by the C threads) beside it.

* **tiles** — the cost of batch invariance: the middle blocks of one generation step (cache of ``--n``
  rows) for 1 and for 8 sessions' rows, on tiles of each ``--tiles`` height (in-process, interleaved).

Without ``--server`` the command starts ``scx serve`` itself on a free port (``--serve-args`` passed on)
and reports the server's peak memory. The machine's load average is recorded with the results: on a
shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .._files import result_json, write_text_whole
from ..backends.base import TORCH_DTYPES
from ..errors import ConfigError
from ..zoo import MODEL_NAMES
from ._args import (
    MAX_THREADS,
    MAX_TIMEOUT_S,
    add_level,
    float_at_least,
    int_at_least,
    int_list,
    output_file,
    plain_description,
)
from .serve import DEFAULT_MAX_BATCH_ROWS, check_batch_rows

__all__ = ["register", "run"]


_DEFAULT_SERVE_ARGS = "--workers 2 --threads 1"
_DEFAULT_TILES = [1, 2, 4, 8]
#: phase-specific options (None on the command line: not given) and their defaults
_DEFAULTS: dict[str, Any] = {"n": 512, "gen_tokens": 16, "repeats": 3, "clients": [1, 4, 16, 64]}
_DEFAULTS.update(prompt_len=32, tokens=16)


def register(subparsers: Any) -> None:
    """Add ``scx bench-serve`` to the CLI."""
    p = subparsers.add_parser(
        "bench-serve",
        help="SCX over scx serve (loopback) vs in-process: latency ratios and a concurrent-client load table",
        description=plain_description(__doc__),
    )
    p.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default="smollm2",
        help="registered model, on both sides (default smollm2; tiny-llama needs no download)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=TORCH_DTYPES,
        help="float32 (default), float64, bfloat16, float16 — on both sides",
    )
    add_level(p, help="SCX level of the clients: permute, paper (default), blind")
    p.add_argument(
        "--server",
        default=None,
        help="URL of a running scx serve, scx://HOST:PORT (default: start one on a free port)",
    )
    p.add_argument(
        "--serve-args",
        default=None,
        help=f"extra options of the scx serve this command starts (default {_DEFAULT_SERVE_ARGS!r}; "
        "not with --server; --model and --dtype come from this command's own)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        default=1,
        help=f"torch threads of this (client) process (default 1, at most {MAX_THREADS})",
    )
    p.add_argument(
        "--n",
        type=int_at_least(2),
        default=None,
        help=f"prefill length of the latency run, cache length of the tile run (default {_DEFAULTS['n']})",
    )
    p.add_argument(
        "--gen-tokens",
        type=int_at_least(1),
        default=None,
        help=f"tokens timed in the latency run (default {_DEFAULTS['gen_tokens']})",
    )
    p.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=None,
        help=f"timed interleaved rounds of the latency and tile runs (default {_DEFAULTS['repeats']}; "
        "the tile run takes at least 3)",
    )
    p.add_argument(
        "--warmup",
        type=int_at_least(0),
        default=1,
        help="untimed rounds before the timed ones, of each side and run (default 1)",
    )
    p.add_argument(
        "--clients",
        type=int_list(1, MAX_THREADS),
        default=None,
        help="comma-separated concurrent clients of the load runs, each a thread (default "
        + ",".join(map(str, _DEFAULTS["clients"]))
        + f"; at most {MAX_THREADS} each)",
    )
    p.add_argument(
        "--prompt-len",
        type=int_at_least(2),
        default=None,
        help=f"prompt tokens of each load session (default {_DEFAULTS['prompt_len']})",
    )
    p.add_argument(
        "--tokens",
        type=int_at_least(1),
        default=None,
        help=f"generated tokens of each load session (default {_DEFAULTS['tokens']})",
    )
    p.add_argument(
        "--timeout",
        type=float_at_least(0, strict=True, maximum=MAX_TIMEOUT_S),
        default=600.0,
        help=f"seconds a client waits for a reply (default 600, at most {MAX_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--tiles",
        type=int_list(1, DEFAULT_MAX_BATCH_ROWS, allow_empty=True),
        default=None,
        help="comma-separated tile heights of the tile run (default "
        + ",".join(map(str, _DEFAULT_TILES))
        + f", none on a model without middle blocks; '' skips it), each at most {DEFAULT_MAX_BATCH_ROWS}: "
        "the tallest --batch-rows of an scx serve with its default --max-batch and --max-sessions",
    )
    p.add_argument("--skip-latency", action="store_true", help="skip the latency run")
    p.add_argument("--skip-load", action="store_true", help="skip the load runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", type=output_file, metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=run)


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``xs``."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(np.ceil(q * len(s))) - 1))]


class _Stopped(Exception):
    """A load session ended early: the run it belongs to is being abandoned (an error or Ctrl-C)."""


def _session(
    make: Callable[[], Any],
    link: Any,
    ids: np.ndarray,
    n_new: int,
    token_times: list[float] | None = None,
    stop: threading.Event | None = None,
) -> list[int]:
    """Greedy tokens of one session: ``n_new`` after the prompt ``ids``; _Stopped before the prefill or any
    step once ``stop`` is set."""
    client = make()
    if stop is not None and stop.is_set():
        raise _Stopped
    logits = client.prefill(ids, link)
    out = [int(np.argmax(logits[-1]))]
    for _ in range(n_new - 1):
        if stop is not None and stop.is_set():
            raise _Stopped
        t = time.perf_counter()
        out.append(int(np.argmax(client.decode(out[-1], link))))
        if token_times is not None:
            token_times.append(time.perf_counter() - t)
    return out


class _Progress:
    """A tqdm bar on stderr (nothing when disabled or tqdm is missing); a context manager that closes it."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and total > 0:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr)
            except ImportError:
                self.bar = None

    def step(self, label: str) -> None:
        """One unit done; ``label`` says which."""
        if self.bar is not None:
            self.bar.set_postfix_str(label)
            self.bar.update(1)

    def write(self, line: str) -> None:
        """Print ``line`` on stdout without breaking the bar."""
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


#: the runs each phase-specific option applies to
_USERS = {
    "n": ("latency", "tiles"),
    "gen_tokens": ("latency",),
    "repeats": ("latency", "tiles"),
    "clients": ("load",),
    "prompt_len": ("load",),
    "tokens": ("load",),
}


def _refuse_ignored(args: argparse.Namespace, tiles_off: bool) -> None:
    """ConfigError for a phase option given while every run it applies to is skipped."""
    skipped = {"latency": args.skip_latency, "load": args.skip_load, "tiles": tiles_off}
    for name, phases in _USERS.items():
        if getattr(args, name) is not None and all(skipped[ph] for ph in phases):
            flag = "--" + name.replace("_", "-")
            runs = " and ".join(phases) + (" runs" if len(phases) > 1 else " run")
            raise ConfigError(f"{flag} applies only to the {runs}, skipped here")


def _options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The phase options (defaults filled in) and the ``scx serve`` options of the server to start;
    ConfigError for an option that would be ignored or a run with nothing to measure — before anything
    is loaded."""
    tiles_off = args.tiles == []
    _refuse_ignored(args, tiles_off)
    if args.skip_latency and args.skip_load and tiles_off:
        raise ConfigError("nothing to measure: --skip-latency, --skip-load and --tiles '' skip every run")
    opts = {name: _DEFAULTS[name] if getattr(args, name) is None else getattr(args, name) for name in _USERS}
    if args.server is not None:
        if args.serve_args is not None:
            raise ConfigError("--serve-args sets up the scx serve this command starts: not with --server")
        from ..service.remote import parse_url

        parse_url(args.server)  # ConfigError for a malformed URL, before any model is loaded
        return opts, []
    text = _DEFAULT_SERVE_ARGS if args.serve_args is None else args.serve_args
    try:
        extra = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--serve-args {text!r}: {exc}") from None
    if "-h" in extra or "--help" in extra:
        raise ConfigError("--serve-args: see `scx serve --help` for its options")
    serve_args = ["--dtype", args.dtype, *extra]
    ns = _serve_parser().parse_args(["serve", "--model", args.model, "--port", "0", *serve_args])
    try:
        check_batch_rows(ns)  # the server would refuse it: said here, before any model is loaded
    except ConfigError as exc:
        raise ConfigError(f"--serve-args: {exc}") from None
    if ns.model != args.model or ns.dtype != args.dtype:
        raise ConfigError(
            "--serve-args cannot set --model or --dtype: this command's own apply to both sides"
        )
    return opts, serve_args


def _serve_parser() -> argparse.ArgumentParser:
    """A parser of ``scx serve`` options that raises ConfigError (about ``--serve-args``), never exits."""
    from . import serve

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise ConfigError(f"--serve-args: {message}")

    top = Parser(prog="scx", add_help=False)
    serve.register(top.add_subparsers())
    return top


def run(args: argparse.Namespace) -> int:
    """Run the latency, tile and load measurements; print the tables; write JSON when asked. Every option
    is checked, and the model and prompts loaded, before a server is started; a server this command
    started is stopped on every way out (errors and Ctrl-C included)."""
    import torch

    from ..commands.serve import build_backend
    from ..service.spawn import ServerProcess
    from ..zoo import load_hf
    from ..zoo.corpus import corpus_tokens, prompts

    opts, serve_args = _options(args)
    torch.set_num_threads(args.threads)
    backend = build_backend(args.model, args.dtype, "cpu")
    c = backend.config
    if args.tiles is None:
        tiles: list[int] = _DEFAULT_TILES if c.n_layers > 2 else []
        if not tiles:
            print(f"{args.model} has no middle blocks: no tile run", file=sys.stderr)
    elif args.tiles and c.n_layers <= 2:
        raise ConfigError(f"--tiles: {args.model} has {c.n_layers} blocks, no middle blocks to time")
    else:
        tiles = args.tiles
    if args.skip_latency and args.skip_load and not tiles:
        raise ConfigError("nothing to measure: --skip-latency, --skip-load and no tile run")
    _refuse_ignored(args, not tiles)
    if not args.skip_latency and opts["n"] + opts["gen_tokens"] > c.max_positions:
        raise ConfigError(
            f"--n {opts['n']} + --gen-tokens {opts['gen_tokens']} exceeds {args.model}'s "
            f"{c.max_positions} positions"
        )
    if not args.skip_load and opts["prompt_len"] + opts["tokens"] - 1 > c.max_positions:
        raise ConfigError(
            f"--prompt-len {opts['prompt_len']} + --tokens {opts['tokens']} - 1 exceeds {args.model}'s "
            f"{c.max_positions} positions"
        )
    tokenizer = load_hf(args.model)[1]
    ids = None if args.skip_latency else corpus_tokens(opts["n"], tokenizer, c.vocab_size)
    texts = None if args.skip_load else prompts(4, opts["prompt_len"], tokenizer, c.vocab_size)
    spawned: Any = None
    try:
        if args.server is None:
            spawned = ServerProcess(args.model, serve_args)
        result, bad = _measure(args, opts, backend, tiles, ids, texts, spawned)
    finally:
        if spawned is not None:
            try:
                spawned.stop()
            except BaseException:  # a second Ctrl-C while it shuts down
                spawned.kill()
                raise
    result["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        write_text_whole(args.json, result_json(result, indent=1) + "\n")
    return 1 if bad else 0


def _measure(
    args: argparse.Namespace,
    opts: dict[str, Any],
    backend: Any,
    tiles: list[int],
    ids: Any,
    texts: list[Any] | None,
    spawned: Any,
) -> tuple[dict[str, Any], bool]:
    """The measurements against the server (``spawned`` or ``--server``): the results, and whether any load
    session failed or gave a wrong output."""
    from ..forward import PlainRunner
    from ..keys import KeySchedule
    from ..protocol import Client, SCXConfig, Server
    from ..service.remote import RemoteTransport

    url = args.server if spawned is None else spawned.url
    progress = not args.no_progress
    probe = RemoteTransport(url, backend, timeout=args.timeout)
    try:
        probe._connect()
        assert probe.info is not None
        batch_rows = _batch_rows(probe.info, url)
    finally:
        probe.close()
    cfg = SCXConfig(level=args.level)
    pool = Client(backend, KeySchedule.generate(), cfg).decoys  # one secret-text calibration pool, built once

    def make() -> Any:
        return Client(backend, KeySchedule.generate(), cfg, decoys=pool)

    result: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "level": args.level,
        "batch_rows": batch_rows,
        "client_threads": args.threads,
        "serve_args": None
        if spawned is None
        else (_DEFAULT_SERVE_ARGS if args.serve_args is None else args.serve_args),
        "warmup_rounds": args.warmup,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
        "command": " ".join(sys.argv),
    }
    n, repeats, warmup = opts["n"], opts["repeats"], args.warmup

    if ids is not None:
        gen_tokens = opts["gen_tokens"]
        remote = RemoteTransport(url, backend, timeout=args.timeout)
        try:
            with _Progress(2 * (warmup + repeats), "scx bench-serve latency", progress) as bar:
                times, msgs = _latency_rounds(
                    make,
                    Server(backend, batch_rows=batch_rows),
                    remote,
                    ids,
                    gen_tokens,
                    warmup,
                    repeats,
                    bar,
                )
        finally:
            remote.close()
        lat: dict[str, dict[str, Any]] = {}
        for phase in ("prefill", "token"):
            lo, re_ = statistics.median(times["local"][phase]), statistics.median(times["remote"][phase])
            lat[phase] = {
                "in_process_s": lo,
                "remote_s": re_,
                "ratio": re_ / lo,
                "messages": msgs[phase],
                "overhead_per_message_ms": 1e3 * (re_ - lo) / msgs[phase],
                "in_process_rounds_s": times["local"][phase],
                "remote_rounds_s": times["remote"][phase],
            }
        result["latency"] = {"n": n, "gen_tokens": gen_tokens, "repeats": repeats, "warmup": warmup, **lat}
        print(
            f"loopback latency, {args.model} {args.dtype} level {args.level} (batch_rows {batch_rows}; "
            f"medians of {repeats} timed rounds after {warmup} untimed warm-up round(s)):"
        )
        for phase, lr in lat.items():
            what = f"prefill n={n}" if phase == "prefill" else "decode, per token"
            print(
                f"  {what:<20} in-process {lr['in_process_s'] * 1e3:9.1f} ms  "
                f"remote {lr['remote_s'] * 1e3:9.1f} ms  ratio {lr['ratio']:.3f}  "
                f"({lr['messages']:g} messages, {lr['overhead_per_message_ms']:+.3f} ms each)",
                flush=True,
            )

    if tiles:
        rounds = max(3, repeats)
        with _Progress((warmup + rounds) * len(tiles) * 2, "scx bench-serve tiles", progress) as bar:
            result["tiles"] = _tile_costs(backend, tiles, n, repeats, warmup=warmup, step=bar.step)
        print(f"middle blocks of one generation step (cache {n}; {warmup} untimed warm-up round(s)), ms:")
        for t in result["tiles"]:
            print(f"  tile {t['tile']:>2}: 1 row {t['rows_1_ms']:8.1f}   8 rows {t['rows_8_ms']:8.1f}")

    if texts is not None:
        clients: list[int] = opts["clients"]
        tokens = opts["tokens"]
        runner = PlainRunner(backend)
        want = [runner.generate(p, tokens) for p in texts]
        rows = []
        sides = ("remote", "in-process")
        total = 2 * (warmup + len(clients))
        print(f"concurrent clients, {opts['prompt_len']}-token prompts + {tokens} tokens each:", flush=True)
        with _Progress(total, "scx bench-serve load", progress) as bar:
            for r in range(warmup):  # untimed: one session of each side, results dropped
                for side in sides:
                    shared = Server(backend) if side == "in-process" else None
                    new_link = functools.partial(_link, url, backend, args.timeout, shared)
                    _load_run(1, new_link, make, texts, want, tokens)
                    bar.step(f"{side} (warm-up {r + 1})")
            for cl in clients:
                for side in sides:
                    shared = Server(backend) if side == "in-process" else None
                    new_link = functools.partial(_link, url, backend, args.timeout, shared)
                    row: dict[str, Any] = _load_run(cl, new_link, make, texts, want, tokens)
                    row["transport"] = side
                    rows.append(row)
                    bar.step(f"C={cl} {side}")
                    bar.write(_row_line(cl, side, row))
        result["load"] = {"prompt_len": opts["prompt_len"], "tokens": tokens, "warmup": warmup, "rows": rows}
    if spawned is not None:
        if spawned.ops:
            metrics = spawned.metrics()
            result["server_batch_rows_sum"] = _metric(metrics, "scx_batch_rows_sum")
            result["server_batch_count"] = _metric(metrics, "scx_batch_rows_count")
        result["server_peak_rss_mib"] = _peak_rss_mib(spawned.proc.pid)
    bad = any(r["errors"] or r["wrong_outputs"] for r in result.get("load", {}).get("rows", []))
    return result, bad


def _batch_rows(info: dict[str, Any], url: str) -> int:
    """The server's ``batch_rows`` from its greeting: ServiceError unless an integer >= 1 (a server's word
    is checked before the in-process side is built on it)."""
    from ..errors import ServiceError

    v = info.get("batch_rows")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ServiceError(f"the server at {url} gives no valid batch_rows in its greeting ({v!r})")
    return v


def _row_line(c: int, side: str, row: dict[str, Any]) -> str:
    """One row of the load table; a latency with no sample (every session failed; ``--tokens 1``: no
    decode step) is shown as ``—``, never as 0."""

    def num(x: float | None, width: int, digits: int) -> str:
        return f"{'—':>{width}}" if x is None else f"{x:{width}.{digits}f}"

    return (
        f"  C={c:<3} {side:<10} errors {row['errors']} wrong {row['wrong_outputs']}  request p50 "
        f"{num(row['request_p50_s'], 7, 2)} s p99 {num(row['request_p99_s'], 7, 2)} s  token p50 "
        f"{num(row['token_p50_ms'], 8, 1)} ms p99 {num(row['token_p99_ms'], 8, 1)} ms  "
        f"{row['tokens_per_s']:7.2f} tok/s  (load {row['loadavg']:.1f})"
    )


def _latency_rounds(
    make: Callable[[], Any],
    local_server: Any,
    remote: Any,
    ids: Any,
    gen_tokens: int,
    warmup: int,
    repeats: int,
    bar: _Progress,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """``warmup`` untimed, then ``repeats`` timed interleaved rounds of prefill + ``gen_tokens`` decode
    steps, in process and remote: each side's seconds per round (prefill; per token) and messages."""
    from ..protocol import LocalTransport

    times: dict[str, dict[str, list[float]]] = {s: {"prefill": [], "token": []} for s in ("local", "remote")}
    msgs: dict[str, float] = {}
    for r in range(-warmup, repeats):  # rounds below 0: untimed
        order = ["local", "remote"] if r % 2 == 0 else ["remote", "local"]
        for side in order:
            link = LocalTransport(local_server) if side == "local" else remote
            client = make()
            before = sum(s.round_trips for s in link.meter.stages.values())
            t = time.perf_counter()
            logits = client.prefill(ids, link)
            prefill_s = time.perf_counter() - t
            mid = sum(s.round_trips for s in link.meter.stages.values())
            tok = int(np.argmax(logits[-1]))
            t = time.perf_counter()
            for _ in range(gen_tokens):
                tok = int(np.argmax(client.decode(tok, link)))
            token_s = (time.perf_counter() - t) / gen_tokens
            after = sum(s.round_trips for s in link.meter.stages.values())
            client.close(link)  # the server frees its caches (after the count: not a message timed)
            if r >= 0:
                times[side]["prefill"].append(prefill_s)
                times[side]["token"].append(token_s)
                msgs["prefill"], msgs["token"] = mid - before, (after - mid) / gen_tokens
            bar.step(f"{side} " + (f"warm-up {r + warmup + 1}" if r < 0 else f"round {r + 1}"))
    return times, msgs


def _tile_costs(
    backend: Any,
    tiles: list[int],
    cache_len: int,
    repeats: int,
    *,
    warmup: int = 1,
    step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Median ms of the middle blocks (all but the first and last block) on 1 and 8 rows per tile height,
    over ``max(3, repeats)`` timed rounds after ``warmup`` untimed ones; ``step`` is called after each tile
    of each round."""
    from ..forward import block_rows

    c = backend.config
    g = np.random.default_rng(0)
    kv = tuple(backend.from_numpy(g.normal(size=(cache_len, c.n_kv_heads, c.head_dim))) for _ in range(2))
    times: dict[tuple[int, int], list[float]] = {}
    for r in range(-warmup, max(3, repeats)):  # rounds below 0: untimed
        for tile in tiles if r % 2 == 0 else tiles[::-1]:
            for rows in (1, 8):
                x = backend.from_numpy(g.normal(size=(rows, c.hidden_size)))
                t = time.perf_counter()
                for layer in range(1, c.n_layers - 1):
                    block_rows(backend, x, layer, np.full(rows, cache_len), [kv] * rows, tile)
                if r >= 0:
                    times.setdefault((tile, rows), []).append(time.perf_counter() - t)
                if step is not None:
                    step(f"tile {tile} rows {rows}" + (" (warm-up)" if r < 0 else ""))
    return [
        {
            "tile": t,
            "rows_1_ms": 1e3 * statistics.median(times[(t, 1)]),
            "rows_8_ms": 1e3 * statistics.median(times[(t, 8)]),
        }
        for t in tiles
    ]


def _link(url: str, backend: Any, timeout: float, shared: Any) -> Any:
    """A transport to ``shared`` (an in-process Server), or to the server at ``url`` when it is None."""
    from ..protocol import LocalTransport
    from ..service.remote import RemoteTransport

    return LocalTransport(shared) if shared is not None else RemoteTransport(url, backend, timeout=timeout)


def _load_run(
    c: int,
    new_link: Callable[[], Any],
    make: Callable[[], Any],
    texts: list[Any],
    want: list[list[int]],
    tokens: int,
) -> dict[str, Any]:
    """C concurrent sessions (threads), each on its own link: latencies, tokens/s, errors, wrong outputs.
    On any way out of the wait (a thread that cannot start, Ctrl-C) the sessions are told to stop and
    have ended before it raises: none is left running on."""
    req_t: list[float] = []
    tok_t: list[float] = []
    errors: list[str] = []
    wrong = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def one(i: int) -> None:
        link: Any = None
        mine: list[float] = []
        try:
            link = new_link()
            t = time.perf_counter()
            got = _session(make, link, texts[i % len(texts)], tokens, mine, stop)
            dt = time.perf_counter() - t
            with lock:
                req_t.append(dt)
                tok_t.extend(mine)
                wrong[0] += got != want[i % len(texts)]
        except Exception as exc:  # counted and reported
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if hasattr(link, "close"):
                link.close()

    threads: list[threading.Thread] = []
    t0 = time.perf_counter()
    try:
        for i in range(c):
            th = threading.Thread(target=one, args=(i,), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
    except BaseException:
        stop.set()
        for th in threads:  # each ends at its next step
            th.join()
        raise
    wall = time.perf_counter() - t0
    return {
        "clients": c,
        "errors": len(errors),
        "wrong_outputs": wrong[0],
        "request_p50_s": _pct(req_t, 0.5) if req_t else None,
        "request_p99_s": _pct(req_t, 0.99) if req_t else None,
        "token_p50_ms": 1e3 * _pct(tok_t, 0.5) if tok_t else None,
        "token_p99_ms": 1e3 * _pct(tok_t, 0.99) if tok_t else None,
        "tokens_per_s": len(req_t) * tokens / wall,  # sessions that completed: a failed one made none
        "wall_s": wall,
        "loadavg": os.getloadavg()[0],
        "first_error": errors[0] if errors else None,
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

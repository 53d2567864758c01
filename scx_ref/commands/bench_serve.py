"""``scx bench-serve``: SCX over the network (an ``scx serve`` on loopback) against the in-process
transport, on the same model and settings — a benchmark, it asserts nothing about time.

Two measurements:

* **latency** — one client, interleaved rounds (in-process, remote, in-process, …): prefill of an
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
import json
import os
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..zoo import MODEL_NAMES
from ._args import float_at_least, int_at_least, int_list, output_file

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add ``scx bench-serve`` to the CLI."""
    p = subparsers.add_parser(
        "bench-serve",
        help="SCX over scx serve (loopback) vs in-process: latency ratios and a concurrent-client load table",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--model", choices=MODEL_NAMES, default="smollm2")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--level", choices=("permute", "paper", "blind"), default="paper")
    p.add_argument("--server", default=None, help="an running scx serve (default: start one)")
    p.add_argument("--serve-args", default="--workers 2 --threads 1", help="extra scx serve options")
    p.add_argument(
        "--threads", type=int_at_least(1), default=1, help="torch threads of this (client) process"
    )
    p.add_argument(
        "--n", type=int_at_least(2), default=512, help="prefill length of the latency run (default 512)"
    )
    p.add_argument("--gen-tokens", type=int_at_least(1), default=16, help="tokens timed in the latency run")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="interleaved rounds of the latency run")
    p.add_argument(
        "--clients", type=int_list(1), default=[1, 4, 16, 64], help="concurrent clients of the load runs"
    )
    p.add_argument(
        "--prompt-len", type=int_at_least(2), default=32, help="prompt tokens of each load session"
    )
    p.add_argument("--tokens", type=int_at_least(1), default=16, help="generated tokens of each load session")
    p.add_argument(
        "--timeout",
        type=float_at_least(0, strict=True),
        default=600.0,
        help="seconds a client waits for a reply",
    )
    p.add_argument(
        "--tiles",
        type=int_list(1, allow_empty=True),
        default=[1, 2, 4, 8],
        help="tile heights of the tile measurement ('' skips it)",
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--json", type=output_file, metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=run)


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``xs``."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(np.ceil(q * len(s))) - 1))]


def _session(
    make: Callable[[], Any], link: Any, ids: np.ndarray, n_new: int, token_times: list[float] | None = None
) -> list[int]:
    client = make()
    logits = client.prefill(ids, link)
    out = [int(np.argmax(logits[-1]))]
    for _ in range(n_new - 1):
        t = time.perf_counter()
        out.append(int(np.argmax(client.decode(out[-1], link))))
        if token_times is not None:
            token_times.append(time.perf_counter() - t)
    return out


def run(args: argparse.Namespace) -> int:
    """Run the latency and load measurements; print the tables; write JSON when asked."""
    import torch

    from ..commands.serve import build_backend
    from ..forward import PlainRunner
    from ..keys import KeySchedule
    from ..protocol import Client, LocalTransport, SCXConfig, Server
    from ..service.remote import RemoteTransport
    from ..service.spawn import ServerProcess
    from ..zoo import load_hf
    from ..zoo.corpus import corpus_tokens, prompts

    torch.set_num_threads(args.threads)
    clients: list[int] = args.clients
    backend = build_backend(args.model, args.dtype, "cpu")
    spawned = None
    url = args.server
    if url is None:
        serve_args = ["--dtype", args.dtype, *shlex.split(args.serve_args)]
        spawned = ServerProcess(args.model, serve_args)
        url = spawned.url
    probe = RemoteTransport(url, backend, timeout=args.timeout)
    probe._connect()
    assert probe.info is not None
    batch_rows = int(probe.info["batch_rows"])
    probe.close()
    cfg = SCXConfig(level=args.level)
    pool = Client(backend, KeySchedule.generate(), cfg).decoys  # public calibration pool, built once

    def make() -> Any:
        return Client(backend, KeySchedule.generate(), cfg, decoys=pool)

    load1 = os.getloadavg()[0]
    result: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "level": args.level,
        "batch_rows": batch_rows,
        "client_threads": args.threads,
        "serve_args": args.serve_args,
        "cpus": os.cpu_count(),
        "loadavg_start": load1,
        "command": " ".join(sys.argv),
    }
    tokenizer = load_hf(args.model)[1]
    vocab = backend.config.vocab_size

    if not args.skip_latency:
        ids = corpus_tokens(args.n, tokenizer, vocab)
        local_server = Server(backend, batch_rows=batch_rows)
        times: dict[str, dict[str, list[float]]] = {
            s: {"prefill": [], "token": []} for s in ("local", "remote")
        }
        msgs: dict[str, float] = {}
        remote = RemoteTransport(url, backend, timeout=args.timeout)
        for r in range(args.repeats):
            order = ["local", "remote"] if r % 2 == 0 else ["remote", "local"]
            for side in order:
                link = LocalTransport(local_server) if side == "local" else remote
                client = make()
                before = sum(s.round_trips for s in link.meter.stages.values())
                t = time.perf_counter()
                logits = client.prefill(ids, link)
                times[side]["prefill"].append(time.perf_counter() - t)
                mid = sum(s.round_trips for s in link.meter.stages.values())
                tok = int(np.argmax(logits[-1]))
                t = time.perf_counter()
                for _ in range(args.gen_tokens):
                    tok = int(np.argmax(client.decode(tok, link)))
                times[side]["token"].append((time.perf_counter() - t) / args.gen_tokens)
                after = sum(s.round_trips for s in link.meter.stages.values())
                msgs["prefill"], msgs["token"] = mid - before, (after - mid) / args.gen_tokens
                local_server.sessions.clear()
        remote.close()
        lat = {}
        for phase in ("prefill", "token"):
            lo, re_ = statistics.median(times["local"][phase]), statistics.median(times["remote"][phase])
            lat[phase] = {
                "in_process_s": lo,
                "remote_s": re_,
                "ratio": re_ / lo,
                "messages": msgs[phase],
                "overhead_per_message_ms": 1e3 * (re_ - lo) / msgs[phase],
            }
        result["latency"] = {"n": args.n, "gen_tokens": args.gen_tokens, "repeats": args.repeats, **lat}
        print(f"loopback latency, {args.model} {args.dtype} level {args.level} (batch_rows {batch_rows}):")
        for phase, lr in lat.items():
            what = f"prefill n={args.n}" if phase == "prefill" else "decode, per token"
            print(
                f"  {what:<20} in-process {lr['in_process_s'] * 1e3:9.1f} ms  "
                f"remote {lr['remote_s'] * 1e3:9.1f} ms  ratio {lr['ratio']:.3f}  "
                f"({lr['messages']:g} messages, {lr['overhead_per_message_ms']:+.3f} ms each)"
            )

    tiles: list[int] = args.tiles
    if tiles:
        result["tiles"] = _tile_costs(backend, tiles, args.n, args.repeats)
        print(f"middle blocks of one generation step (cache {args.n}), ms:")
        for t in result["tiles"]:
            print(f"  tile {t['tile']:>2}: 1 row {t['rows_1_ms']:8.1f}   8 rows {t['rows_8_ms']:8.1f}")

    if not args.skip_load:
        texts = prompts(4, args.prompt_len, tokenizer, vocab)
        runner = PlainRunner(backend)
        want = [runner.generate(p, args.tokens) for p in texts]
        rows = []
        for c in clients:
            for side in ("remote", "in-process"):
                shared = Server(backend) if side == "in-process" else None
                new_link = functools.partial(_link, url, backend, args.timeout, shared)
                row: dict[str, Any] = _load_run(c, new_link, make, texts, want, args.tokens)
                row["transport"] = side
                rows.append(row)
                print(
                    f"  C={c:<3} {side:<10} errors {row['errors']} wrong {row['wrong_outputs']}  request p50 "
                    f"{row['request_p50_s'] or 0:7.2f} s p99 {row['request_p99_s'] or 0:7.2f} s  token p50 "
                    f"{row['token_p50_ms'] or 0:8.1f} ms p99 {row['token_p99_ms'] or 0:8.1f} ms  "
                    f"{row['tokens_per_s']:7.2f} tok/s  (load {row['loadavg']:.1f})",
                    flush=True,
                )
        result["load"] = {"prompt_len": args.prompt_len, "tokens": args.tokens, "rows": rows}
    if spawned is not None:
        if spawned.ops:
            metrics = spawned.metrics()
            result["server_batch_rows_sum"] = _metric(metrics, "scx_batch_rows_sum")
            result["server_batch_count"] = _metric(metrics, "scx_batch_rows_count")
        result["server_peak_rss_mib"] = _peak_rss_mib(spawned.proc.pid)
        spawned.stop()
    result["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    bad = any(r["errors"] or r["wrong_outputs"] for r in result.get("load", {}).get("rows", []))
    return 1 if bad else 0


def _tile_costs(backend: Any, tiles: list[int], cache_len: int, repeats: int) -> list[dict[str, Any]]:
    """Median ms of the middle blocks (all but the first and last block) on 1 and 8 rows per tile height."""
    from ..forward import block_rows

    c = backend.config
    g = np.random.default_rng(0)
    kv = tuple(backend.from_numpy(g.normal(size=(cache_len, c.n_kv_heads, c.head_dim))) for _ in range(2))
    times: dict[tuple[int, int], list[float]] = {}
    for r in range(max(3, repeats)):
        for tile in tiles if r % 2 == 0 else tiles[::-1]:
            for rows in (1, 8):
                x = backend.from_numpy(g.normal(size=(rows, c.hidden_size)))
                t = time.perf_counter()
                for layer in range(1, c.n_layers - 1):
                    block_rows(backend, x, layer, np.full(rows, cache_len), [kv] * rows, tile)
                times.setdefault((tile, rows), []).append(time.perf_counter() - t)
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
    """C concurrent sessions (threads), each on its own link: latencies, tokens/s, errors, wrong outputs."""
    req_t: list[float] = []
    tok_t: list[float] = []
    errors: list[str] = []
    wrong = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        link = new_link()
        mine: list[float] = []
        try:
            t = time.perf_counter()
            got = _session(make, link, texts[i % len(texts)], tokens, mine)
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

    threads = [threading.Thread(target=one, args=(i,)) for i in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": c,
        "errors": len(errors),
        "wrong_outputs": wrong[0],
        "request_p50_s": _pct(req_t, 0.5) if req_t else None,
        "request_p99_s": _pct(req_t, 0.99) if req_t else None,
        "token_p50_ms": 1e3 * _pct(tok_t, 0.5) if tok_t else None,
        "token_p99_ms": 1e3 * _pct(tok_t, 0.99) if tok_t else None,
        "tokens_per_s": c * tokens / wall,
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

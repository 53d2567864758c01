"""How ``scx serve``'s transport was chosen: the round-trip time of one message over loopback, echoed by a
server in another process, for three well-kept libraries — ``websockets`` (asyncio server, sync client),
``uvicorn`` + ``starlette`` (ASGI WebSocket, same client) and ``grpcio`` (bidirectional stream of raw
bytes, the shape ``scx serve`` uses) — at the sizes SCX sends: a generation-step row (2.3 KB), a
first-guard-block cache at n = 512 (0.8 MB) and a prefill stage's rows at n = 512 (2 MB).

Run: ``pip install websockets uvicorn starlette grpcio`` then ``python -m models.transport_choice
[--json PATH]``. It prints the median round trip per library and size (best of ``--reps`` runs) and the
machine's load average; a benchmark, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import os
import queue
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from scx_ref._files import result_json, write_text_whole
from scx_ref.commands._args import int_at_least, output_file
from scx_ref.errors import ConfigError

SIZES = (2304, 786_432, 2_000_000)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _serve_websockets(port: int) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for m in ws:
            await ws.send(m)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, max_size=None, compression=None):
            await asyncio.Future()

    asyncio.run(main())


def _serve_uvicorn(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    async def echo(ws: Any) -> None:
        await ws.accept()
        try:
            while True:
                await ws.send_bytes(await ws.receive_bytes())
        except WebSocketDisconnect:  # the client closed: the end of a measurement
            return

    app = Starlette(routes=[WebSocketRoute("/", echo)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", ws_max_size=1 << 30)


def _serve_grpc(port: int) -> None:
    from concurrent import futures

    import grpc

    def echo(it: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        yield from it

    opts = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
    handler = grpc.method_handlers_generic_handler("echo", {"S": grpc.stream_stream_rpc_method_handler(echo)})
    s = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
    s.add_generic_rpc_handlers((handler,))
    s.add_insecure_port(f"127.0.0.1:{port}")
    s.start()
    s.wait_for_termination()


def _client_websocket(port: int, payload: bytes, n: int) -> list[float]:
    from websockets.sync.client import connect

    out = []
    with connect(f"ws://127.0.0.1:{port}/", max_size=None, compression=None) as ws:
        for _ in range(n):
            t = time.perf_counter()
            ws.send(payload)
            ws.recv()
            out.append(time.perf_counter() - t)
    return out


def _client_grpc(port: int, payload: bytes, n: int) -> list[float]:
    import grpc

    opts = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
    q: queue.Queue[bytes | None] = queue.Queue()
    replies = iter(ch.stream_stream("/echo/S")(iter(q.get, None)))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        q.put(payload)
        next(replies)
        out.append(time.perf_counter() - t)
    q.put(None)
    ch.close()
    return out


LIBRARIES: dict[str, tuple[Callable[[int], None], Callable[[int, bytes, int], list[float]]]] = {
    "websockets": (_serve_websockets, _client_websocket),
    "uvicorn+starlette": (_serve_uvicorn, _client_websocket),
    "grpcio": (_serve_grpc, _client_grpc),
}


#: the module each library's server or client imports, and the package ``pip`` installs it from
MODULES = {"websockets": "websockets", "uvicorn": "uvicorn", "starlette": "starlette", "grpc": "grpcio"}


def missing_packages() -> list[str]:
    """The packages of :data:`MODULES` not installed (each library's server runs in a child process, so a
    missing one would otherwise show only as a traceback once its server had been waited for)."""
    return [pkg for module, pkg in MODULES.items() if importlib.util.find_spec(module) is None]


def measure(reps: int = 3) -> list[dict[str, Any]]:
    """Median round trip (ms) per library and size, best of ``reps`` (>= 1) runs; ConfigError, before any
    server starts, when a library is not installed (:func:`missing_packages`)."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    missing = missing_packages()
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: pip install {' '.join(MODULES.values())}")
    rows = []
    for name, (serve, client) in LIBRARIES.items():
        port = _free_port()
        proc = mp.Process(target=serve, args=(port,), daemon=True)
        proc.start()
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.3)
        for size in SIZES:
            payload = os.urandom(size)
            n = 200 if size < 10_000 else 30
            medians = [statistics.median(client(port, payload, n)[3:]) for _ in range(reps)]
            rows.append({"library": name, "bytes": size, "rtt_ms": 1e3 * min(medians)})
            print(f"{name:<18} {size:>9} B  median round trip {1e3 * min(medians):8.3f} ms", flush=True)
        proc.terminate()
        proc.join()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure and print (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(
        prog="python -m models.transport_choice", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    ap.add_argument(
        "--reps", type=int_at_least(1), default=3, help="runs per library and size, the best kept; >= 1 (3)"
    )
    ap.add_argument(
        "--json", type=output_file, default=None, metavar="PATH", help="also write the rows as JSON to PATH"
    )
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    try:
        rows = measure(args.reps)
    except ConfigError as exc:  # a library not installed
        ap.error(str(exc))
    print(f"load average {load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        write_text_whole(
            args.json, result_json({"rows": rows, "loadavg": load, "cpus": os.cpu_count()}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

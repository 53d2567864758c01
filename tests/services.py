"""An ``scx serve`` service in the test's own process, a raw session stream to it, and a bounded wait on a
condition, for the tests of the service against hostile peers."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.protocol import Server
from scx_ref.protocol.messages import Request
from scx_ref.service.codec import FrameKind, decode, encode_hello, encode_request
from scx_ref.service.service import METHOD, SCXService, ServeOptions

from .tiny import tiny_weights


class InProcess:
    """An SCXService over a ``server_cls`` protocol server (``backend``, by default tests/tiny.py's model,
    seed 3, numpy float64) on an event loop in a background thread, on a free port (no ops listener unless
    ``ops_port`` is given): ``url`` for a RemoteTransport (``scxs://`` with ``tls_cert``), ``address`` for a
    raw gRPC channel."""

    def __init__(
        self, server_cls: type[Server[Any]] = Server, backend: NumpyBackend | None = None, **options: Any
    ) -> None:
        self.backend = self.default_backend() if backend is None else backend
        opts = ServeOptions(**{"port": 0, "ops_port": None, **options})
        self.server = server_cls(self.backend, limits=opts.server_limits(), batch_rows=opts.batch_rows)
        self.service = SCXService(self.server, opts)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(60)
        self.address = f"127.0.0.1:{self.service.port}"
        self.url = f"{'scxs' if opts.tls_cert is not None else 'scx'}://{self.address}"

    @staticmethod
    def default_backend() -> NumpyBackend:
        """tests/tiny.py's model, seed 3, numpy float64."""
        return NumpyBackend(tiny_weights(3))

    def stop(self, bound: float = 120.0) -> None:
        """Stop the service (nothing more if it has stopped already), waiting at most ``bound`` seconds
        (TimeoutError then), then its loop. A short bound keeps a shutdown that hangs (a mutant's) from
        holding the test run up."""
        try:
            asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(bound)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def wait_for(cond: Callable[[], bool], what: str, bound: float = 30.0) -> None:
    """Poll ``cond`` until true; fail naming ``what`` when ``bound`` seconds pass (a bound, not a timing)."""
    end = time.monotonic() + bound
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"{what} did not happen within {bound:g} s")
        time.sleep(0.02)


def grpc_stub(
    handler: Callable[[Any, Any], Any],
    workers: int = 2,
    *,
    host: str = "127.0.0.1",
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[Any, str]:
    """A started gRPC server that speaks the SCX method with ``handler(frames, context)`` as its stream
    handler (a generator of reply frames: a scripted or hostile peer), on a free port of ``host`` (an IPv6
    address is bracketed); and its URL: ``scx://``, or ``scxs://`` with ``tls`` (the PEM key and certificate
    chain it serves). The caller stops it (``server.stop(0)``)."""
    from concurrent import futures

    import grpc

    method = grpc.stream_stream_rpc_method_handler(handler)
    server = grpc.server(
        futures.ThreadPoolExecutor(workers),
        handlers=[grpc.method_handlers_generic_handler("scx.v1.SCX", {"Session": method})],
    )
    where = f"[{host}]" if ":" in host else host
    if tls is None:
        url = f"scx://{where}:{server.add_insecure_port(f'{where}:0')}"
    else:
        credentials = grpc.ssl_server_credentials([tls])
        url = f"scxs://{where}:{server.add_secure_port(f'{where}:0', credentials)}"
    server.start()
    return server, url


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


class RawStream:
    """A raw gRPC session stream: frames put on ``send`` go out, replies are collected in ``replies``;
    while nothing is queued it sends a hello every 0.2 s, so the stream is never idle (its session can be)."""

    def __init__(self, address: str) -> None:
        import grpc

        self.channel = grpc.insecure_channel(address)
        self.send: queue.Queue[bytes | None] = queue.Queue()
        self.replies: list[bytes] = []
        self.call = self.channel.stream_stream(METHOD)(self._frames())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _frames(self) -> Iterator[bytes]:
        while True:
            try:
                item = self.send.get(timeout=0.2)
            except queue.Empty:
                item = encode_hello({"client": "keepalive"})
            if item is None:
                return
            yield item

    def _read(self) -> None:
        import grpc

        try:
            for data in self.call:
                self.replies.append(data)
        except grpc.RpcError:  # the stream ended (the server shut down, or we cancelled it)
            pass

    def request(self, req: Request) -> Any:
        """Send ``req`` and return its answer frame (the first non-hello frame after it)."""
        before = len(self.replies)
        self.send.put(encode_request(req))

        def answered() -> bool:
            return any(decode(r).kind is not FrameKind.HELLO for r in self.replies[before:])

        wait_for(answered, f"the answer to {req.stage.value}")
        return next(f for f in map(decode, self.replies[before:]) if f.kind is not FrameKind.HELLO)

    def close(self) -> None:
        self.send.put(None)
        self.call.cancel()
        self.channel.close()
        self.reader.join(30)


def tls_files(tmp_path: Path, pairs: int = 1) -> list[tuple[Path, Path, Path]]:
    """For each of ``pairs`` private CAs (trustme; the test is skipped without it): the PEM files of a
    certificate for 127.0.0.1, of its key and of the CA."""
    trustme = pytest.importorskip("trustme")
    files = []
    for i in range(pairs):
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        cert, key, ca_file = tmp_path / f"cert{i}.pem", tmp_path / f"key{i}.pem", tmp_path / f"ca{i}.pem"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        files.append((cert, key, ca_file))
    return files

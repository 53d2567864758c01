"""``scx serve``: the untrusted :class:`~scx_ref.protocol.Server` as a network service (DESIGN §5.6).

Transport: gRPC (``grpcio``) bidirectional streaming, one stream per connection, carrying the binary
frames of :mod:`scx_ref.service.codec` (arrays as raw little-endian buffers; no protobuf, no float as
text). Chosen by measurement over loopback (``models/transport_choice.py``, README "Serve it"): against
WebSocket libraries (``websockets``, ``uvicorn`` + ``starlette``) it moves the 2 MB messages of a prefill in
about two thirds of the time and the 2 KB messages of a generation step ~0.1 ms slower; it also brings HTTP/2
keepalive, flow control, size limits enforced before allocation and TLS.

Concurrency. The event loop does only I/O and frame parsing; every stage runs in a bounded pool of
``workers`` threads. A stream handles its messages one at a time, in order, so a session's order is kept;
streams run concurrently. The ``gen_mid`` messages of different sessions that arrive while a batch is
computing wait for the next batch, which runs them together (:meth:`Server.handle_batch`, tiles of
``batch_rows`` rows: bit-for-bit the result each session would get alone).

Sessions belong to the stream that opened them: a message for a session opened elsewhere is refused, a
new ``open`` on a stream ends that stream's previous session, and a stream that ends — the client
closed it, vanished (keepalive pings time out), stayed idle past ``idle_timeout`` or left a reply unread
that long — takes its sessions with it, so their caches are freed.

Operations: ``/health`` (200 serving, 503 draining) and ``/metrics`` (Prometheus text) on the ops port;
one JSON log line per event, never an array's contents; graceful shutdown — new sessions refused at
once, open sessions given ``grace`` seconds, in-flight messages finished, then the port closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .._checks import check_int, check_real
from ..errors import ConfigError, SCXError, ServiceError, SessionError
from ..protocol.limits import ServerLimits
from ..protocol.messages import Reply, Request
from ..protocol.server import Server
from ..stages import Stage
from .codec import (
    MAX_MESSAGE_BYTES,
    FrameKind,
    WireLimits,
    decode,
    encode_error,
    encode_hello,
    encode_reply,
    grpc_options,
    request_from,
)

__all__ = ["METHOD", "SCXService", "ServeOptions", "model_fingerprint", "peer_host", "unbracketed"]

#: The gRPC method of a session stream (bytes in, bytes out).
METHOD = "/scx.v1.SCX/Session"
log = logging.getLogger("scx.serve")

#: The largest integer the service's greeting (``codec.encode_hello``) carries.
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class ServeOptions:
    """Where and how ``scx serve`` listens, and its limits.

    host, port         the gRPC listener (port 0: any free port)
    ops_port           HTTP ``/health`` and ``/metrics`` (0: any free port; None: no ops listener)
    workers            compute threads (each stage runs on one)
    batch_rows         tile height of the middle blocks' cross-session batches (1: no batching; at most
                       2⁶³ − 1, as max_sessions: the greeting carries both as int64)
    max_batch          most ``gen_mid`` rows computed together
    max_sessions       most sessions (streams) at once; more are refused
    max_sessions_per_peer
                       most sessions (streams) at once from one peer address — its host, whatever its
                       port (:func:`peer_host`); more from it are refused. A stream ended for a reply
                       not read counts until its client goes (its reply is held until then). None: no
                       cap but ``max_sessions`` (clients behind one NAT or proxy share an address)
    max_message_bytes  largest frame accepted or sent (and the server's limit on a request's arrays)
    max_rows           rows one session may reach (its max_length plus its most decoys)
    max_decoys         decoy rows at any one stage
    max_cache_bytes    bytes of every session's caches together
    idle_timeout       seconds a stream may wait between messages, a reply may wait for its client to
                       read it, and a session may stay idle, before its session is evicted
    grace              seconds open sessions may go on after a shutdown signal
    tls_cert, tls_key  PEM files; both or neither (then plaintext: loopback or a trusted network only)
    """

    host: str = "127.0.0.1"
    port: int = 8470
    ops_port: int | None = 8471
    workers: int = 2
    batch_rows: int = 2
    max_batch: int = 64
    max_sessions: int = 256
    max_sessions_per_peer: int | None = None
    max_message_bytes: int = 512 << 20
    max_rows: int = 1 << 15
    max_decoys: int = 256
    max_cache_bytes: int = 8 << 30
    idle_timeout: float = 300.0
    grace: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("workers", "max_batch", "max_rows"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 1))
        for name in ("batch_rows", "max_sessions"):  # in the greeting, which holds int64 integers only:
            # past 2⁶³ − 1 the service started and then refused every client's hello
            object.__setattr__(self, name, check_int(getattr(self, name), name, 1, _INT64_MAX))
        if self.max_sessions_per_peer is not None:
            per_peer = check_int(self.max_sessions_per_peer, "max_sessions_per_peer", 1)
            object.__setattr__(self, "max_sessions_per_peer", per_peer)
        # gRPC's size options are C ints (codec.MAX_MESSAGE_BYTES): past it the server failed to start
        mmb = check_int(self.max_message_bytes, "max_message_bytes", 1, MAX_MESSAGE_BYTES)
        object.__setattr__(self, "max_message_bytes", mmb)
        for name in ("idle_timeout", "grace"):  # seconds: stored as float (a numpy number included)
            object.__setattr__(self, name, check_real(getattr(self, name), name, 0, lo_open=True))
        for name in ("port", "ops_port"):  # a port number (ops_port may be None: no ops listener)
            if getattr(self, name) is not None or name == "port":
                object.__setattr__(self, name, check_int(getattr(self, name), name, 0, 65535))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
        self.server_limits()  # the server's own checks of the limits it shares

    def server_limits(self) -> ServerLimits:
        """The :class:`~scx_ref.protocol.limits.ServerLimits` these options give the protocol server."""
        return ServerLimits(
            max_sessions=self.max_sessions,
            max_rows=self.max_rows,
            max_decoys=self.max_decoys,
            max_message_bytes=self.max_message_bytes,
            max_cache_bytes=self.max_cache_bytes,
            idle_ttl=float(self.idle_timeout),
        )


def model_fingerprint(backend: Any) -> str:
    """A short hash of a backend's model — shape, hyper-parameters (not the name) and a sample of its
    weights (16 embedding rows and block 1's QKV map of 4 unit vectors, rounded to float32, so the same
    weights in float32 and float64 agree): client and server must agree on it before a session starts."""
    import numpy as np

    c = backend.config
    h = hashlib.sha256(
        json.dumps({k: v for k, v in c.to_dict().items() if k != "name"}, sort_keys=True).encode()
    )
    rows = backend.embed(np.arange(min(16, c.vocab_size), dtype=np.int64))
    unit = backend.from_numpy(np.eye(min(4, c.hidden_size), c.hidden_size))
    for a in (rows, backend.project(unit, "wqkv", 0)):
        h.update(np.ascontiguousarray(backend.to_numpy(a), dtype="<f4").tobytes())
    return h.hexdigest()[:16]


class _Metrics:
    """The service's Prometheus metrics, in their own registry. ``scx_sessions_evicted_total`` is the
    protocol server's own count (:attr:`Server.evictions`), read when scraped: every session ended other
    than by its client's ``close`` — its stream ended, the idle sweep, an idle one found on access or
    evicted to make room for an ``open`` — counted once, whichever side ended it."""

    def __init__(self, server: Server[Any]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        from prometheus_client.core import CounterMetricFamily
        from prometheus_client.registry import Collector

        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        self.sessions = Gauge("scx_sessions_open", "SCX sessions open", registry=r)
        self.streams = Gauge("scx_streams_open", "client streams open", registry=r)
        self.messages = Counter("scx_messages", "messages handled", ["stage"], registry=r)
        self.bytes_in = Counter("scx_bytes_received", "frame bytes received", registry=r)
        self.bytes_out = Counter("scx_bytes_sent", "frame bytes sent", registry=r)
        self.errors = Counter("scx_errors", "messages refused or failed, by error class", ["cls"], registry=r)
        self.latency = Histogram(
            "scx_stage_seconds",
            "time from a message's arrival to its reply, by stage",
            ["stage"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch = Histogram(
            "scx_batch_rows", "gen_mid rows per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )

        class Evicted(Collector):
            def collect(self) -> list[CounterMetricFamily]:
                help_text = "sessions ended other than by their client's close (stream end, idle TTL)"
                return [CounterMetricFamily("scx_sessions_evicted", help_text, value=server.evictions)]

        r.register(Evicted())
        self.draining = Gauge("scx_draining", "1 while shutting down", registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        out: bytes = generate_latest(self.registry)
        return out


def _event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured log line (JSON): an event name and scalar fields, never array contents."""
    if log.isEnabledFor(level):
        log.log(level, json.dumps({"event": event, **fields}, default=str))


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer name, its port dropped: ``ipv4:10.0.0.7:51234`` → ``ipv4:10.0.0.7``,
    ``ipv6:[::1]:51234`` → ``ipv6:[::1]``, ``ipv6:%5B::1%5D:51234`` → ``ipv6:[::1]`` (gRPC percent-encodes
    the brackets in some versions); any other name (``unix:/run/scx.sock``, a name without a port, an IPv6
    address without brackets, whose port cannot be told from its last group, an IPv4 name with a second
    colon) as it is. Two connections from one host have the same address part, each its own port; two
    hosts never share one."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    rest = rest.replace("%5B", "[").replace("%5D", "]").replace("%5b", "[").replace("%5d", "]")
    if kind == "ipv6":
        # ``ipv6:fe80::1`` is not ``ipv6:fe80:`` with port 1: without brackets there is no port to drop
        end = rest.find("]")
        return f"{kind}:{rest[: end + 1]}" if rest.startswith("[") and end > 0 else peer
    host, colon, port = rest.partition(":")  # an IPv4 address holds no colon: a second one is malformed
    return f"{kind}:{host}" if colon and host and port.isdigit() else peer


def unbracketed(host: str) -> str:
    """``host`` without the brackets gRPC's ``[v6]:port`` form puts around an IPv6 address (``[::1]`` →
    ``::1``), which socket calls take bare; any other host as it is."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _ops_server_class(host: str) -> type[ThreadingHTTPServer]:
    """The HTTP server class of the ops listener on ``host`` (an address or a name, without brackets): of
    the address family the host's first listening address has (``getaddrinfo``, as gRPC resolves it), so
    an IPv6 address or a name that resolves to one is served too (``http.server`` alone is IPv4 only).
    OSError (``socket.gaierror``) when the host does not resolve."""
    family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    if family != socket.AF_INET6:
        return ThreadingHTTPServer

    class _V6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    return _V6


def _quiet(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished task's outcome, so asyncio does not report an exception no one waits for."""
    if not task.cancelled():
        task.exception()


class _Stream:
    """One client stream: the sessions it opened. ``lock`` guards ``sessions``, ``ended`` (the stream is
    over) and ``busy`` (its messages queued or computing on a worker): the event loop and the compute
    threads both change them."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.host = peer_host(peer)
        self.sessions: set[str] = set()
        self.lock = threading.Lock()
        self.ended = False
        self.busy = 0


class SCXService:
    """Serves one :class:`~scx_ref.protocol.Server` over gRPC (see the module doc).

    ConfigError, before anything starts, for a ``server`` that is not a Server, ``options`` that are not
    ServeOptions or a ``model_name`` that is not a str (each raised an AttributeError or TypeError before)."""

    def __init__(self, server: Server[Any], options: ServeOptions, model_name: str = "") -> None:
        if not isinstance(server, Server):
            raise ConfigError(f"server must be a Server, got {type(server).__name__}")
        if not isinstance(options, ServeOptions):
            raise ConfigError(f"options must be ServeOptions, got {type(options).__name__}")
        if not isinstance(model_name, str):
            raise ConfigError(f"model_name must be a str, got {type(model_name).__name__}")
        self.server = server
        self.opts = options
        self.limits = WireLimits(max_frame=options.max_message_bytes)
        self.metrics = _Metrics(server)
        b = server.b
        self.info = {
            "service": "scx",
            "version": 1,
            "model": model_name or server.c.name,
            "fingerprint": model_fingerprint(server.b),
            "wire_dtype": b.numpy_dtype().str,
            "batch_rows": server.batch_rows,
            "max_sessions": options.max_sessions,
            "max_message_bytes": options.max_message_bytes,
        }
        self.pool = ThreadPoolExecutor(options.workers, thread_name_prefix="scx-compute")
        self.draining = False
        self.inflight = 0
        self.streams: set[_Stream] = set()
        # live stream handlers by peer host (peer_host): a stream released early (its reply not read) is
        # still open, its unsent reply held, until its client goes — it counts under the per-peer cap
        self._peer_handlers: dict[str, int] = {}
        self._grpc: Any = None
        self._http: ThreadingHTTPServer | None = None
        self._mid: list[tuple[Request, _Stream, asyncio.Future[bytes]]] = []
        self._mid_wake: asyncio.Event | None = None
        self._mid_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None  # set as the grace ends: wakes streams awaiting frames
        self.port = 0
        self.ops_port: int | None = None

    @property
    def closing(self) -> bool:
        """Whether a shutdown's grace is over: each stream ends itself (UNAVAILABLE) after the reply of a
        message in flight, and no frame is read any more."""
        return self._closing is not None and self._closing.is_set()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the gRPC (and ops) listeners and start serving; ``port``/``ops_port`` hold the ports.

        ServiceError naming the address when a listener cannot bind (address in use, not an address of
        this host); nothing is left listening or running then."""
        import grpc

        opts = self.opts
        options = [
            *grpc_options(opts.max_message_bytes),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0),
        ]
        handler = grpc.method_handlers_generic_handler(
            "scx.v1.SCX", {"Session": grpc.stream_stream_rpc_method_handler(self._session)}
        )
        self._grpc = grpc.aio.server(handlers=[handler], options=options)
        address = f"{opts.host}:{opts.port}"
        try:
            if opts.ops_port is not None:  # bound before the gRPC port: a failure leaves nothing listening
                ops_address = f"{opts.host}:{opts.ops_port}"
                try:
                    self._start_http(opts.ops_port)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    raise ServiceError(f"cannot listen on {ops_address} (ops port): {reason}") from None
            # the batching loop's state exists before the first message can arrive
            self._mid_wake = asyncio.Event()
            self._stopped = asyncio.Event()
            self._closing = asyncio.Event()
            self._mid_task = asyncio.get_running_loop().create_task(self._mid_loop())
            self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop())
            # the gRPC port is bound last, just before serving starts: gRPC closes a bound port only once
            # its server has started (a server stopped before starting kept listening, stop 84)
            try:
                if opts.tls_cert is not None and opts.tls_key is not None:
                    with open(opts.tls_key, "rb") as fk, open(opts.tls_cert, "rb") as fc:
                        creds = grpc.ssl_server_credentials([(fk.read(), fc.read())])
                    self.port = self._grpc.add_secure_port(address, creds)
                else:
                    self.port = self._grpc.add_insecure_port(address)
            except RuntimeError:  # grpc: "Failed to bind to address …"
                self.port = 0
            if not self.port:
                tls = opts.tls_cert is not None and opts.tls_key is not None
                raise ServiceError(
                    f"cannot listen on {address}: address in use or not an address of this host"
                    + (", or the TLS certificate and key are not a matching PEM pair" if tls else "")
                )
            await self._grpc.start()
        except BaseException:
            await self._abort_start()
            raise
        _event("listening", port=self.port, ops_port=self.ops_port, **self.info)

    async def _abort_start(self) -> None:
        """Undo a failed :meth:`start`: its loops, whatever listener it opened and the compute pool."""
        for task in (self._mid_task, self._idle_task):
            if task is not None:
                task.cancel()
        self._mid_task = self._idle_task = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.ops_port = None
        if self._grpc is not None:
            await self._grpc.stop(None)
        self.pool.shutdown(wait=False)

    async def stop(self) -> None:
        """Graceful shutdown: refuse new sessions, give open ones ``grace`` seconds, let in-flight
        messages finish and their replies go out, end every stream with UNAVAILABLE ("server is shutting
        down"), then close the listeners. A stream whose reply its client does not read is cancelled after
        at most max(5, grace) more seconds. A second call while one runs waits for it: one shutdown."""
        if self._stopped is None or self._stopped.is_set():
            return
        if self.draining:  # a shutdown is already running (a second signal, a second caller): wait for it
            await self._stopped.wait()
            return
        self.draining = True
        self.metrics.draining.set(1)
        _event("draining", sessions=len(self.server.sessions), grace=self.opts.grace)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.opts.grace
        while self.streams and loop.time() < end:
            self._forget()  # a session the server evicted (idle, on access) is not waited for
            if not any(s.sessions for s in self.streams):
                break
            await asyncio.sleep(0.05)
        assert self._closing is not None
        self._closing.set()  # each stream ends itself, after the reply of a message in flight
        end = loop.time() + max(5.0, self.opts.grace)
        while (self.inflight or self.streams) and loop.time() < end:
            await asyncio.sleep(0.01)
        # every stream ended itself: a grace lets their statuses go out (it ends as soon as they have); one
        # still open (its reply not read) is cancelled at once
        await self._grpc.stop(1.0 if not self.streams else 0)
        if self._mid_task is not None:
            self._mid_task.cancel()
        if self._idle_task is not None:
            self._idle_task.cancel()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.pool.shutdown(wait=True)
        _event("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        assert self._stopped is not None
        await self._stopped.wait()

    # -- the session stream ---------------------------------------------------------------------
    async def _session(self, requests: AsyncIterator[bytes], context: Any) -> None:
        """One client stream: each frame in, its answer out, one at a time. The stream ends (and takes
        its sessions with it) when the client closes it, when no frame comes for ``idle_timeout``
        seconds, when an answer is not taken for ``idle_timeout`` seconds — a client that sends but
        never reads would otherwise hold its stream, and its session's caches, for ever (the write waits
        on HTTP/2 flow control, and keepalive pings keep answering) — or when a shutdown's grace ends
        (UNAVAILABLE, after the answer to a message in flight)."""
        import grpc

        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if len(self.streams) >= self.opts.max_sessions:
            self.metrics.errors.labels("ServerFull").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"server full: {self.opts.max_sessions} sessions open"
            )
        stream = _Stream(str(context.peer()))
        cap = self.opts.max_sessions_per_peer
        if cap is not None and self._peer_handlers.get(stream.host, 0) >= cap:
            self.metrics.errors.labels("PeerFull").inc()
            _event("peer_full", peer=stream.peer, limit=cap)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server full for this address: {cap} sessions open from it (--max-sessions-per-peer)",
            )
        self.streams.add(stream)
        self.metrics.streams.inc()
        self._peer_handlers[stream.host] = self._peer_handlers.get(stream.host, 0) + 1
        it = requests.__aiter__()
        try:
            assert self._closing is not None
            while not self.closing:
                # the next frame, or the shutdown's end of the grace, whichever comes first
                frame = asyncio.ensure_future(it.__anext__())
                frame.add_done_callback(_quiet)  # its end is read below, or not at all (cancelled, closing)
                closing = asyncio.ensure_future(self._closing.wait())
                done, _ = await asyncio.wait(
                    {frame, closing}, timeout=self.opts.idle_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                closing.cancel()
                if frame not in done or self.closing:
                    frame.cancel()
                    if self.closing:
                        break
                    _event("idle_timeout", peer=stream.peer, seconds=self.opts.idle_timeout)
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no message for {self.opts.idle_timeout:g} s: session closed",
                    )
                try:
                    data = frame.result()
                except StopAsyncIteration:
                    break
                self.inflight += 1  # until its reply is written: a shutdown waits for that too
                try:
                    if not await self._reply(context, stream, data):
                        return
                finally:
                    self.inflight -= 1
            if self.closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        finally:
            left = self._peer_handlers.pop(stream.host) - 1
            if left:
                self._peer_handlers[stream.host] = left
            self._release(stream)

    async def _reply(self, context: Any, stream: _Stream, data: bytes) -> bool:
        """Answer one frame of ``stream``: compute its answer and write it. When the client does not take
        the answer within ``idle_timeout`` seconds the stream ends (released now, its status sent if the
        client is still there): False, nothing more is read from it."""
        import grpc

        out = await self._message(stream, data)
        # not wait_for: a write held by flow control does not end when cancelled, so wait_for's wait for the
        # cancelled write would never end either. Left pending (below, or when this stream is cancelled) it
        # fails once the client goes: _quiet takes that error.
        write = asyncio.ensure_future(context.write(out))
        write.add_done_callback(_quiet)
        done, _ = await asyncio.wait({write}, timeout=self.opts.idle_timeout)
        if not done:
            _event("reply_not_read", peer=stream.peer, seconds=self.opts.idle_timeout)
            self._release(stream)  # now: the status below waits behind the unread reply
            try:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"reply not read for {self.opts.idle_timeout:g} s: session closed",
                )
            except grpc.aio.AbortError:
                raise
            except Exception:  # the client went away before the status could reach it
                return False
        write.result()  # the client gone meanwhile: gRPC's error, as a yield would have raised it
        return True

    def _release(self, stream: _Stream) -> None:
        """The stream is over for the service: its sessions go (:meth:`_end_stream`) and its place under
        ``max_sessions`` is free. Once per stream, however often it is called."""
        if stream not in self.streams:
            return
        self._end_stream(stream)
        self.streams.discard(stream)
        self.metrics.streams.dec()

    def _end_stream(self, stream: _Stream) -> None:
        """The stream is over: drop its sessions now or, while one of its messages is still queued or
        computing (the client went away mid-message), let that message's worker drop them when it is done
        — so the event loop never waits for a session's lock, and a session that message opens is not
        left behind."""
        with stream.lock:
            stream.ended = True
            if stream.busy:
                return
        self._evict(stream, "stream ended")

    def _evict(self, stream: _Stream, why: str) -> None:
        with stream.lock:
            sids = list(stream.sessions)
            stream.sessions.clear()
        for sid in sids:
            if self.server.drop(sid):  # counted by the server (Server.evictions)
                _event("session_closed", session=sid[:12], why=why)
        self.metrics.sessions.set(len(self.server.sessions))

    def _settle(self, stream: _Stream, req: Request, reply: Reply | SCXError | None) -> None:
        """On the worker, once ``req`` of ``stream`` is computed (``reply``: None when it failed): record
        the session it opened or closed; if the stream has ended meanwhile, drop its sessions."""
        with stream.lock:
            stream.busy -= 1
            if isinstance(reply, Reply) and req.stage is Stage.OPEN:
                stream.sessions.add(req.session)
            elif isinstance(reply, Reply) and req.stage is Stage.CLOSE:
                stream.sessions.discard(req.session)
            orphaned = stream.ended and not stream.busy
        if orphaned:
            self._evict(stream, "stream ended")

    async def _message(self, stream: _Stream, data: bytes) -> bytes:
        t0 = time.perf_counter()
        self.metrics.bytes_in.inc(len(data))
        stage = "invalid"
        seq = -1
        try:
            frame = decode(data, self.limits)
            if frame.kind is FrameKind.HELLO:
                out = encode_hello(self.info)
                stage = "hello"
            else:
                req = request_from(frame)
                stage, seq = req.stage.value, req.seq
                if req.stage is Stage.OPEN:
                    if self.draining:
                        raise ServiceError("server is shutting down: new sessions are refused")
                    self._evict(stream, "a new session opened on its stream")
                elif req.session not in stream.sessions:
                    raise SessionError(f"session {req.session[:12]}… is not open on this connection")
                with stream.lock:  # the worker that computes it settles it (_settle), even if we go
                    stream.busy += 1
                try:
                    if req.stage is Stage.GEN_MID and self.server.batch_rows > 1:
                        pending: Awaitable[bytes] = self._submit_mid(req, stream)
                    else:
                        loop = asyncio.get_running_loop()
                        pending = loop.run_in_executor(self.pool, self._compute, req, stream)
                except BaseException:
                    self._settle(stream, req, None)
                    raise
                out = await pending
                if req.stage is Stage.OPEN and out[4] == FrameKind.REPLY:
                    _event("session_open", session=req.session[:12], peer=stream.peer)
                elif req.stage is Stage.CLOSE and out[4] == FrameKind.REPLY:
                    _event("session_closed", session=req.session[:12], why="closed by its client")
                self.metrics.sessions.set(len(self.server.sessions))
        except SCXError as exc:
            out = self._error(exc, stage, seq)
        except Exception as exc:  # a bug: log it (no arrays), answer a generic error
            log.exception("internal error in stage %s", stage)
            out = self._error(ServiceError(f"internal server error ({type(exc).__name__})"), stage, seq)
        seconds = time.perf_counter() - t0
        self.metrics.messages.labels(stage).inc()
        self.metrics.latency.labels(stage).observe(seconds)
        self.metrics.bytes_out.inc(len(out))
        _event(
            "message",
            logging.DEBUG,
            stage=stage,
            seq=seq,
            ms=round(1e3 * seconds, 3),
            up=len(data),
            down=len(out),
        )
        return out

    def _error(self, exc: SCXError, stage: str, seq: int) -> bytes:
        name = type(exc).__name__
        self.metrics.errors.labels(name).inc()
        _event("refused", stage=stage, seq=seq, error=name, message=str(exc)[:300])
        return encode_error(name, str(exc), seq)

    def _encode(self, reply: Reply | SCXError, req: Request) -> bytes:
        """The frame of ``req``'s answer. A reply larger than ``max_message_bytes`` is refused with a
        ServiceError, and — the server having taken the message already (its session moved past it) — its
        session is ended too, so the refusal leaves no session its client can no longer follow."""
        if isinstance(reply, SCXError):
            return self._error(reply, req.stage.value, req.seq)
        data = encode_reply(reply)
        if len(data) > self.opts.max_message_bytes:
            self.server.drop(req.session)
            _event("session_closed", session=req.session[:12], why="reply too large to send")
            too_big = ServiceError(
                f"reply of {len(data)} bytes exceeds max_message_bytes ({self.opts.max_message_bytes}): "
                "session closed"
            )
            return self._error(too_big, req.stage.value, req.seq)
        return data

    def _compute(self, req: Request, stream: _Stream) -> bytes:
        """Runs on a worker thread: the stage, then its reply frame (or error frame); settles ``req``."""
        reply: Reply | SCXError | None = None
        try:
            try:
                reply = self.server.handle(req)
            except SCXError as exc:
                reply = exc
            return self._encode(reply, req)
        finally:
            self._settle(stream, req, reply)

    async def _idle_loop(self) -> None:
        """Evicts the server's sessions idle past the TTL, a few times per TTL."""
        period = min(30.0, max(0.5, self.opts.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            gone = self.server.evict_idle_sessions()
            if gone:
                self._forget()
                self.metrics.sessions.set(len(self.server.sessions))
                _event("idle_evicted", sessions=len(gone))

    def _forget(self) -> None:
        """Drop from every stream's sessions the ids of sessions the server no longer holds — evicted by the
        idle sweep, on access or to make room for an ``open`` — so a shutdown does not wait for them and a
        message for one is refused as not open on its stream; the streams stay open. An id the server holds
        again (its nonce long forgotten, opened anew) is kept."""
        held = self.server.sessions
        for stream in list(self.streams):
            with stream.lock:
                stream.sessions.difference_update([sid for sid in stream.sessions if sid not in held])

    # -- cross-session batching of the middle blocks ---------------------------------------------
    async def _submit_mid(self, req: Request, stream: _Stream) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._mid.append((req, stream, fut))
        assert self._mid_wake is not None
        self._mid_wake.set()
        return await fut

    async def _mid_loop(self) -> None:
        """Runs the queued ``gen_mid`` messages, as many as wait (up to ``max_batch``), one batch at a
        time: the rows that arrive while a batch computes form the next one."""
        assert self._mid_wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._mid_wake.wait()
            self._mid_wake.clear()
            while self._mid:
                batch = self._mid[: self.opts.max_batch]
                del self._mid[: len(batch)]
                self.metrics.batch.observe(len(batch))
                try:
                    results = await loop.run_in_executor(
                        self.pool, self._compute_mid, [(r, s) for r, s, _ in batch]
                    )
                except Exception as exc:  # a bug: every waiting message gets the error
                    log.exception("internal error in a gen_mid batch")
                    results = [encode_error("ServiceError", f"internal server error ({type(exc).__name__})")]
                    results *= len(batch)
                for (_, _, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)

    def _compute_mid(self, batch: list[tuple[Request, _Stream]]) -> list[bytes]:
        """Runs on a worker thread: one batch of ``gen_mid`` messages, their frames; settles each."""
        reqs = [req for req, _ in batch]
        try:
            replies = self.server.handle_batch(reqs)
            return [self._encode(rep, req) for rep, req in zip(replies, reqs, strict=True)]
        finally:
            for req, stream in batch:
                self._settle(stream, req, None)  # a gen_mid message opens or closes no session

    # -- ops endpoint -----------------------------------------------------------------------------
    def _start_http(self, port: int) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    body = json.dumps(
                        {
                            "status": "draining" if service.draining else "serving",
                            "sessions": len(service.server.sessions),
                            "streams": len(service.streams),
                            **service.info,
                        }
                    ).encode()
                    self._send(503 if service.draining else 200, "application/json", body)
                elif self.path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4", service.metrics.text())
                else:
                    self._send(404, "text/plain", b"not found: /health, /metrics\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client went away: nothing to answer
                    # (http.server printed a traceback to stderr, beside the service's JSON log lines)
                    _event("ops_client_gone", logging.DEBUG, path=self.path)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        bare = unbracketed(self.opts.host)  # gRPC's form: an IPv6 address in brackets
        self._http = _ops_server_class(bare)((bare, port), Handler)
        self._http.daemon_threads = True
        self.ops_port = int(self._http.server_address[1])
        threading.Thread(target=self._http.serve_forever, name="scx-ops", daemon=True).start()

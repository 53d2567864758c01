"""The client's side of ``scx serve``: :class:`RemoteTransport`, the same
:class:`~scx_ref.protocol.transport.Transport` interface as the in-process one, over the network.

``RemoteTransport("scx://host:port", backend)`` (``scxs://`` for TLS) opens one gRPC stream, greets the
server — whose model fingerprint and wire dtype must match the client's, else ConfigError — and then
carries each :class:`~scx_ref.protocol.messages.Request` as one frame and returns the
:class:`~scx_ref.protocol.messages.Reply`, its arrays converted to the client backend's arrays. An error
the server reports comes back as the same SCXError class, with the server's message.

Timeouts: ``connect_timeout`` to reach the server, ``timeout`` for each reply. A server that does not
answer in time, goes away or cannot be reached raises :class:`~scx_ref.errors.ServiceError` — never a
hang; the stream is then dropped (the server evicts its session) and the next message opens a new one,
on which only a new session (``open``) can start.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .._checks import check_int, check_real
from ..errors import ConfigError, IntegrityError, ProtocolError, SCXError, ServiceError, WireError
from ..protocol.cost import CostMeter
from ..protocol.messages import Reply, Request
from .codec import (
    MAX_MESSAGE_BYTES,
    FrameKind,
    WireLimits,
    decode,
    encode_hello,
    encode_request,
    grpc_options,
    reply_from,
)
from .service import METHOD, model_fingerprint

__all__ = ["RemoteTransport", "parse_url"]

_SCHEMES = {"scx": False, "scxs": True}


def parse_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of ``scx://host:port`` or ``scxs://host:port``, the port in [1, 65535]: a client
    cannot connect to port 0. ConfigError otherwise, and for a user name or password, which no server
    receives, a path, a query or a fragment."""
    if not isinstance(url, str):  # urlsplit raised a raw AttributeError for a number
        raise ConfigError(f"server URL must be a string scx://HOST:PORT, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid server URL {url!r}: {exc}") from None
    if parts.scheme not in _SCHEMES or not parts.hostname or port is None:
        raise ConfigError(f"server URL must be scx://HOST:PORT or scxs://HOST:PORT (TLS), got {url!r}")
    if port == 0:  # "any free port" is a listener's choice, no address to connect to
        raise ConfigError(f"server URL names port 0, which no server listens on: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"server URL takes no user, path, query or fragment: {url!r}")
    return parts.hostname, port, _SCHEMES[parts.scheme]


def _error_class(name: str) -> type[SCXError]:
    """The SCXError subclass called ``name`` (ServiceError when there is none)."""
    todo: list[type[SCXError]] = [SCXError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return ServiceError


def _shown(value: object, limit: int) -> str:
    """``value``, text from the untrusted server, as it may appear in an error message: at most ``limit``
    characters (the bounds an honest server's frames keep), each character that is not printable — a
    newline, a terminal escape sequence's ESC, a lone surrogate — written as its escape."""
    text = str(value)
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text[:limit])
    return shown + ("…" if len(text) > limit else "")


def _server_error(name: str, message: str) -> SCXError:
    """The error a server's error frame names, carrying its message (ServiceError for a class that is not
    an SCXError or cannot be built from a message alone). Name and message are the server's text: cut to
    200 and 2000 characters (as :func:`~scx_ref.service.codec.encode_error` writes them) and escaped."""
    name, message = _shown(name, 200), _shown(message, 2000)
    try:
        return _error_class(name)(f"server: {message}")
    except Exception:
        return ServiceError(f"server ({name[:60]}): {message}")


class _Watchdog:
    """Cancels the current gRPC call when a reply is overdue (one thread per stream).

    Whether a reply came in time is decided once, under the watchdog's lock: the watchdog fires (cancels
    the call) only if the round trip is still armed at its deadline; :meth:`disarm`, which the round trip
    calls once it holds the reply, says whether it fired first. So a reply taken before the deadline is
    never a timeout, and a round trip the watchdog cancelled is one (its stream is dropped)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._deadline: float | None = None
        self._call: Any = None
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="scx-remote-watchdog", daemon=True)
        self._closed = False
        self._thread.start()

    def arm(self, call: Any, seconds: float) -> None:
        with self._cv:
            self._call, self._deadline, self.fired = call, time.monotonic() + seconds, False
            self._cv.notify()

    def disarm(self) -> bool:
        """Stop the round trip's deadline; whether the watchdog had fired (cancelled the call) first."""
        with self._cv:
            self._deadline = None
            return self.fired

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                self.fired = True
                self._deadline = None
                self._call.cancel()


class RemoteTransport:
    """A :class:`~scx_ref.protocol.transport.Transport` to an ``scx serve`` server (see the module doc).

    ``ops``: the client backend (its ``from_numpy`` converts reply arrays, and its config and dtype are
    checked against the server's); None keeps numpy arrays and checks nothing. The meter counts frame
    bytes (headers included) each way.
    ``tls_ca``: a PEM file of the CA that signed the server's certificate (``scxs://``; None: the system's
    roots; ConfigError beside an ``scx://`` URL, where it would be ignored). ``timeout`` and
    ``connect_timeout``: seconds, > 0 and at most ``threading.TIMEOUT_MAX`` (ConfigError otherwise). An IPv6
    server is ``scx://[::1]:PORT``. The transport is not thread-safe: one client thread at a time, as a
    session is sequential. ``info``: the server's greeting, once its model and dtype checks passed.
    Threads (the reply watchdog, gRPC's) and the channel live while a stream is open: a stream dropped
    (an error, :meth:`close`, the transport garbage-collected) releases them.
    """

    def __init__(
        self,
        url: str,
        ops: Any = None,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        tls_ca: str | os.PathLike[str] | None = None,
        max_message_bytes: int = 512 << 20,
    ) -> None:
        self.url = url
        self.host, self.port, self.tls = parse_url(url)
        # a wait past threading.TIMEOUT_MAX raises OverflowError in the watchdog's (or gRPC's) thread
        self.timeout = check_real(timeout, "timeout (seconds)", 0, threading.TIMEOUT_MAX, lo_open=True)
        self.connect_timeout = check_real(
            connect_timeout, "connect_timeout (seconds)", 0, threading.TIMEOUT_MAX, lo_open=True
        )
        # an int passed as a path: open(3) read (and then closed) the process's file descriptor 3
        if tls_ca is not None and not isinstance(tls_ca, (str, os.PathLike)):
            raise ConfigError(f"tls_ca must be the path of a PEM file, got {type(tls_ca).__name__}")
        if tls_ca is not None and not self.tls:
            raise ConfigError(f"tls_ca is for a TLS server (scxs://HOST:PORT); {url!r} is not one")
        self.ops = ops
        self.tls_ca = tls_ca
        self.max_message_bytes = check_int(max_message_bytes, "max_message_bytes", 1, MAX_MESSAGE_BYTES)
        self.limits = WireLimits(max_frame=self.max_message_bytes + 1024)
        self.meter = CostMeter()
        self.info: dict[str, Any] | None = None
        self._channel: Any = None
        self._call: Any = None
        self._replies: Iterator[bytes] | None = None
        self._queue: queue.Queue[bytes | None] | None = None
        self._watchdog: _Watchdog | None = None

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Open a stream and greet the server: ServiceError when it cannot be reached in time or is not an
        SCX server, ConfigError for an unreadable CA file or a server of another model or dtype. However
        this fails (^C included), nothing is left open: the next message connects and greets again."""
        import grpc

        options = [*grpc_options(self.max_message_bytes), ("grpc.enable_retries", 0)]
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address (the URL's [::1])
        target = f"{host}:{self.port}"
        root = None
        if self.tls and self.tls_ca is not None:
            try:
                with open(self.tls_ca, "rb") as f:
                    root = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS CA file {self.tls_ca}: {exc}") from None
            if b"-----BEGIN CERTIFICATE-----" not in root:  # else: "cannot reach" once connect_timeout passed
                raise ConfigError(f"the TLS CA file {self.tls_ca} holds no PEM certificate")
        try:
            if self.tls:
                self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options)
            else:
                self._channel = grpc.insecure_channel(target, options)
            try:
                grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
            except grpc.FutureTimeoutError:
                raise ServiceError(
                    f"cannot reach the SCX server at {self.url} within {self.connect_timeout:g} s"
                ) from None
            self._watchdog = _Watchdog()  # the stream's own: _drop stops it
            q: queue.Queue[bytes | None] = queue.Queue()
            self._queue = q
            self._call = self._channel.stream_stream(METHOD)(iter(q.get, None))
            self._replies = iter(self._call)
            try:  # an unreadable greeting drops the stream too: the next message greets (and checks) again
                frame = decode(self._roundtrip(encode_hello({"client": "scx_ref"})), self.limits)
            except WireError as exc:
                raise ServiceError(f"{self.url} is not an SCX server: malformed greeting ({exc})") from None
            if frame.kind is not FrameKind.HELLO or frame.header.get("service") != "scx":
                raise ServiceError(f"{self.url} is not an SCX server")
            self._check_model(frame.header)
        except BaseException:
            self._drop()
            raise
        self.info = frame.header  # only once checked: a refused server's greeting is not kept

    def _check_model(self, info: dict[str, Any]) -> None:
        if self.ops is None or not hasattr(self.ops, "embed"):
            return
        mine, theirs = model_fingerprint(self.ops), info.get("fingerprint")
        if mine != theirs:
            raise ConfigError(
                f"the server at {self.url} serves model {_shown(repr(info.get('model')), 200)} (fingerprint "
                f"{_shown(theirs, 64)}); this client holds {self.ops.config.name!r} (fingerprint {mine}): "
                "not the same model"
            )
        dt = self.ops.numpy_dtype().str
        if dt != info.get("wire_dtype"):
            raise ConfigError(
                f"the server computes in {_shown(info.get('wire_dtype'), 64)} and this client in {dt}: SCX "
                "is exact only when both use the same dtype (start the server with the client's --dtype)"
            )

    def _drop(self) -> None:
        """Forget the stream (the server evicts its sessions), its watchdog thread and the channel."""
        if self._queue is not None:
            self._queue.put(None)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            self._channel.close()
        if self._watchdog is not None:
            self._watchdog.close()
        self._channel = self._call = self._replies = self._queue = self._watchdog = None

    def close(self) -> None:
        """Close the stream and channel (the server frees this stream's sessions); the transport's threads
        end. A later :meth:`send` opens a new stream."""
        self._drop()

    def __del__(self) -> None:
        # a transport dropped without close(): its stream (and the session the server holds for it),
        # channel and threads go with it. Not at interpreter exit (gRPC's own shutdown ends the process's
        # channels; closing one then can hang), and nothing is raised from a finalizer.
        if sys.is_finalizing():
            return
        with contextlib.suppress(Exception):
            self._drop()

    def __enter__(self) -> RemoteTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages ---------------------------------------------------------------------------------
    def _roundtrip(self, data: bytes) -> bytes:
        """Send one frame on the stream and return the frame that answers it; ServiceError when the server
        does not answer within ``timeout``, ends the stream or closes it.

        Every way out but a returned frame drops the stream — a timeout, a lost connection, an exception
        raised while the reply is awaited (^C) — so no later call can take this one's reply. A timeout is
        what the watchdog decides (:class:`_Watchdog`): a reply taken before it fired is returned, with the
        stream intact; once it has fired the call is cancelled (the server drops its sessions) and the
        round trip raises the timeout, even if gRPC hands over the reply after the cancel. A status the
        server sent before the watchdog's cancel is reported as the server's, not as a timeout."""
        import grpc

        watchdog = self._watchdog  # _drop (below) forgets it
        assert self._queue is not None and self._replies is not None and watchdog is not None
        if len(data) > self.max_message_bytes:
            raise ServiceError(f"message of {len(data)} bytes exceeds max_message_bytes")
        watchdog.arm(self._call, self.timeout)
        try:
            self._queue.put(data)
            out: bytes = next(self._replies)
        except grpc.RpcError as exc:
            fired = watchdog.disarm()
            self._drop()
            code = exc.code() if hasattr(exc, "code") else None
            if fired and code in (grpc.StatusCode.CANCELLED, None):  # the watchdog's cancel ended it
                raise self._timed_out() from None
            detail = _shown(exc.details() if hasattr(exc, "details") else exc, 2000)  # the server's text
            raise ServiceError(
                f"the SCX server at {self.url} ended the connection ({getattr(code, 'name', code)}: {detail})"
            ) from None
        except StopIteration:
            watchdog.disarm()
            self._drop()
            raise ServiceError(f"the SCX server at {self.url} closed the connection") from None
        except BaseException:  # ^C while the reply is awaited: that reply is still to come on this stream
            watchdog.disarm()
            self._drop()
            raise
        if watchdog.disarm():  # it fired as the reply came: the call is cancelled, its sessions are gone
            self._drop()
            raise self._timed_out()
        return out

    def _timed_out(self) -> ServiceError:
        return ServiceError(f"no reply from the SCX server at {self.url} within {self.timeout:g} s")

    def _reply_ops(self, request: Request) -> Any:
        """The backend a reply's arrays are converted by: the client backend's float64 twin for a wide
        request (``meta["wide"]``: a blinded message sent in float64, ``SCXConfig.blind_dtype``), whose
        reply the server computes in float64 and the client checks and unblinds in float64 — converting it
        to a float32 backend's dtype rounded it and the client refused it as coarser than the session's
        (every float32 session at the presets' β = 5 since stop 70) — else the client backend."""
        if self.ops is not None and request.meta.get("wide", False) is True:
            widened = getattr(self.ops, "widened", None)
            if callable(widened):
                return widened()
        return self.ops

    def _check_dtypes(self, reply: Reply, ops: Any) -> None:
        """IntegrityError unless every array of ``reply`` travelled as a float at least as fine as the
        dtype ``ops`` converts it to (:meth:`_reply_ops`): ``from_numpy`` casts to that dtype, so after it
        the client's own check (:func:`~scx_ref.protocol.verify.check_reply`: a reply coarser than the
        session's is refused) could no longer see that an int64 or a float32 array answered a float64
        session or a wide request — rounded values the stages no check covers (the middle blocks') would
        pass as exact."""
        dtype_of = getattr(ops, "numpy_dtype", None)
        if dtype_of is None:  # arrays stay numpy: the client's check sees their wire dtype itself
            return
        mine = np.dtype(dtype_of())
        for name, arr in reply.arrays.items():
            if arr.dtype.kind != "f" or arr.dtype.itemsize < mine.itemsize:
                raise IntegrityError(
                    f"{reply.stage.value}: reply {name} travelled as {arr.dtype.str}, not a float at least "
                    f"as fine as the session's {mine.str}"
                )

    def send(self, request: Request) -> Reply:
        """Send ``request``, return the server's reply (arrays as the backend's); the server's SCXError
        re-raised as the same class; ServiceError on a timeout or a lost connection.

        A reply that is malformed (WireError) or answers another message — its session, stage, layer,
        step or seq not the request's; an error frame's seq neither the request's nor -1 — raises and
        drops the stream, so no later message can receive a reply meant for an earlier one. A ``request``
        that is not a Request is refused (ProtocolError, as the in-process server refuses it) before any
        connection is made."""
        if not isinstance(request, Request):  # encode_request raised a raw AttributeError, once connected
            raise ProtocolError(f"a message must be a Request, got {type(request).__name__}")
        if self._call is None:
            self._connect()
        data = encode_request(request)
        back = self._roundtrip(data)
        try:
            frame = decode(back, self.limits)
            if frame.kind is FrameKind.ERROR:
                seq = frame.header.get("seq", -1)
                if seq not in (-1, request.seq) or isinstance(seq, bool):
                    raise IntegrityError(
                        f"the server's error frame answers seq {_shown(repr(seq), 40)}, not {request.seq}"
                    )
                name = str(frame.header.get("error", "ServiceError"))
                message = str(frame.header.get("message", ""))
                server_error = _server_error(name, message)
            else:
                reply = reply_from(frame)
                got = (reply.session, reply.stage, reply.layer, reply.step, reply.seq)
                want = (request.session, request.stage, request.layer, request.step, request.seq)
                if got != want:
                    raise IntegrityError(f"the reply answers {got}, not the request {want}")
                ops = self._reply_ops(request)
                self._check_dtypes(reply, ops)
        except (WireError, IntegrityError):
            self._drop()
            raise
        if frame.kind is FrameKind.ERROR:
            raise server_error
        self.meter.message(request.stage, len(data), len(back))  # frame bytes, headers included
        if ops is not None:
            arrays = {k: ops.from_numpy(v) for k, v in reply.arrays.items()}
            reply = Reply(reply.session, reply.stage, reply.layer, reply.step, reply.seq, arrays, reply.meta)
        return reply

"""``RemoteTransport``'s round trip and lifecycle, the zoo engines' stream, ``ServerProcess``'s arguments.

- The reply watchdog could fire while a reply was arriving: the caller got the reply, but the watchdog had
  cancelled the call (the server dropped the session), and the next message failed with "the server
  ended the connection (CANCELLED …)"; a status the server sent before the watchdog fired was reported as
  a timeout. Now the watchdog's lock decides once: a reply taken before it fired is returned, a round trip
  it cancelled raises the timeout and drops the stream.
- An exception while a reply was awaited (^C) left the stream open, that reply still to come: the next
  call read it as its own (an IntegrityError blaming the server). A ^C while greeting (the model check)
  left the stream open unchecked: the next message went to a server of another model.
- ``scx_logits``/``scx_generate`` with a server held a stream that only garbage collection closed.
- Arguments: ``tls_ca=3`` read the process's file descriptor 3; a CA file without a certificate gave
  "cannot reach the server" after ``connect_timeout``; a URL that is not a string raised AttributeError;
  ``ServerProcess`` started its process before a bad ``start_timeout`` raised (leaving it running).

The races are injected (the reply iterator wrapped, the watchdog's deadline moved into the past), never
timed: every wait is a bounded loop on a condition and every client has a long timeout.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

import scx_ref.service.remote as remote  # noqa: E402
from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.errors import ConfigError, ProtocolError, ServiceError  # noqa: E402
from scx_ref.protocol.messages import Reply, Request  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import FrameKind, decode, encode_hello, encode_reply, request_from  # noqa: E402
from scx_ref.service.service import model_fingerprint  # noqa: E402
from scx_ref.service.spawn import ServerProcess  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .services import InProcess, grpc_stub, wait_for  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

TIMEOUT = 60.0  # seconds a client waits for a reply: a bound against hangs, never an assertion


def watchdogs() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "scx-remote-watchdog")


def request(seq: int) -> Request:
    return Request("ab" * 16, Stage.OPEN, -1, -1, seq)


class Stub:
    """A gRPC server speaking the SCX method: a greeting (``hello``) for a hello, and for a request what
    ``answer(request, context)`` returns (default: a reply that answers it); ``where``: where it listens
    (tests/services.py's ``grpc_stub``: ``host``, ``tls``)."""

    def __init__(
        self,
        hello: bytes | None = None,
        answer: Callable[[Request, Any], bytes] | None = None,
        **where: Any,
    ) -> None:
        hello = hello if hello is not None else encode_hello({"service": "scx"})

        def echo(req: Request, context: Any) -> bytes:
            return encode_reply(Reply(req.session, req.stage, req.layer, req.step, req.seq, {}, {}))

        reply = answer or echo

        def handler(frames: Iterator[bytes], context: Any) -> Iterator[bytes]:
            for data in frames:
                frame = decode(data)
                yield hello if frame.kind is FrameKind.HELLO else reply(request_from(frame), context)

        self.server, self.url = grpc_stub(handler, 4, **where)  # where: grpc_stub's host and tls


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    made: list[Stub] = []

    def make(*args: Any, **kw: Any) -> Stub:
        made.append(Stub(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.server.stop(0)


class Injected:
    """Stands in for a transport's reply iterator: each ``next`` runs ``step(inner)``."""

    def __init__(self, inner: Iterator[bytes], step: Callable[[Iterator[bytes]], bytes]) -> None:
        self.inner, self.step = inner, step

    def __iter__(self) -> Injected:
        return self

    def __next__(self) -> bytes:
        return self.step(self.inner)


def fire(link: RemoteTransport) -> None:
    """The reply deadline passes now: the watchdog fires (cancels the call) before this returns."""
    wd = link._watchdog
    assert wd is not None
    with wd._cv:
        wd._deadline = time.monotonic() - 1.0
        wd._cv.notify()
    wait_for(lambda: wd.fired, "the watchdog to fire")


# -- the round trip against its watchdog ------------------------------------------------------------
def test_a_watchdog_that_fires_as_the_reply_arrives_times_out_and_fails_the_stream(stub: Any) -> None:
    """Before: the reply was returned though the call was cancelled, and the next message failed with
    "the SCX server … ended the connection (CANCELLED: Locally cancelled…)" on the dead stream."""
    s = stub()
    before = watchdogs()
    with RemoteTransport(s.url, None, timeout=TIMEOUT) as link:
        assert link.send(request(0)).seq == 0  # connected, the stream works
        first = link._call

        def late(inner: Iterator[bytes]) -> bytes:
            out = next(inner)  # gRPC hands the reply over …
            fire(link)  # … and the deadline passes before the round trip takes it
            return out

        link._replies = Injected(link._replies, late)  # type: ignore[arg-type]
        with pytest.raises(ServiceError, match=r"no reply from the SCX server at .* within 60 s"):
            link.send(request(1))
        assert link._call is None  # failed: no later call reads on the cancelled stream
        wait_for(lambda: watchdogs() <= before, "the failed stream's watchdog thread to end")
        again = link.send(request(2))  # a new stream, its own reply
        assert again.seq == 2 and link._call is not None and link._call is not first


def test_a_status_the_server_sent_before_the_watchdog_fired_is_the_servers(stub: Any) -> None:
    """Before: any error once the watchdog had fired was "no reply … within", hiding the server's reason."""

    def refuse(req: Request, context: Any) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server full: 1 sessions open")
        raise AssertionError("unreachable")

    s = stub(answer=refuse)
    with RemoteTransport(s.url, None, timeout=TIMEOUT) as link:
        link._connect()

        def status_then_deadline(inner: Iterator[bytes]) -> bytes:
            try:
                return next(inner)
            except grpc.RpcError:  # the server's status has come …
                fire(link)  # … and the deadline passes before the round trip reports it
                raise

        link._replies = Injected(link._replies, status_then_deadline)  # type: ignore[arg-type]
        with pytest.raises(ServiceError, match=r"ended the connection \(RESOURCE_EXHAUSTED: server full"):
            link.send(request(0))
        assert link._call is None


def test_a_reply_taken_before_the_deadline_is_returned_and_the_stream_kept(stub: Any) -> None:
    """Guard (held before too): the watchdog that did not fire in time never cancels the stream later."""
    s = stub()
    with RemoteTransport(s.url, None, timeout=TIMEOUT) as link:
        link._connect()
        call, wd = link._call, link._watchdog
        assert wd is not None
        for seq in range(3):
            assert link.send(request(seq)).seq == seq
            assert not wd.fired and wd._deadline is None  # disarmed: nothing left to fire
        assert link._call is call  # one stream throughout


def test_a_timeout_leaves_no_reply_for_the_next_call(stub: Any) -> None:
    """Guard (held before too): the reply of a round trip that timed out, sent later, is never read."""
    release = threading.Event()

    def slow(req: Request, context: Any) -> bytes:
        if req.seq == 1:
            release.wait(TIMEOUT)  # answers only after the client gave up on it
        return encode_reply(Reply(req.session, req.stage, req.layer, req.step, req.seq, {}, {}))

    s = stub(answer=slow)
    with RemoteTransport(s.url, None, timeout=TIMEOUT) as link:
        link._connect()

        def overdue(inner: Iterator[bytes]) -> bytes:
            fire(link)  # the deadline passes while the reply is awaited
            return next(inner)

        link._replies = Injected(link._replies, overdue)  # type: ignore[arg-type]
        with pytest.raises(ServiceError, match="no reply"):
            link.send(request(1))
        release.set()
        assert link._call is None
        assert link.send(request(2)).seq == 2


def test_an_exception_while_awaiting_a_reply_drops_the_stream(stub: Any) -> None:
    """Before: a ^C while awaiting a reply left the stream open, that reply in flight: the next message
    read it as its own and raised IntegrityError ("the reply answers …") as if the server were hostile."""
    s = stub()
    before = watchdogs()
    with RemoteTransport(s.url, None, timeout=TIMEOUT) as link:
        link._connect()

        def interrupted(inner: Iterator[bytes]) -> bytes:
            raise KeyboardInterrupt  # the request is sent; its reply is still to come

        link._replies = Injected(link._replies, interrupted)  # type: ignore[arg-type]
        with pytest.raises(KeyboardInterrupt):
            link.send(request(1))
        assert link._call is None
        wait_for(lambda: watchdogs() <= before, "the interrupted stream's watchdog thread to end")
        assert link.send(request(2)).seq == 2  # its own reply, on a new stream


def test_an_interrupted_greeting_leaves_no_unchecked_stream(stub: Any, monkeypatch: Any) -> None:
    """Before: a ^C during the model check (the fingerprint) left the stream open and unchecked, so the
    next message went, unrefused, to a server of another model."""
    backend = NumpyBackend(tiny_weights(3))
    other = {"service": "scx", "fingerprint": "0" * 16, "wire_dtype": backend.numpy_dtype().str}
    s = stub(hello=encode_hello(other))
    calls = []

    def interrupted_once(ops: Any) -> str:
        calls.append(ops)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return model_fingerprint(ops)

    monkeypatch.setattr(remote, "model_fingerprint", interrupted_once)
    before = watchdogs()
    with RemoteTransport(s.url, backend, timeout=TIMEOUT) as link:
        with pytest.raises(KeyboardInterrupt):
            link.send(request(0))
        assert link._call is None and link.info is None
        wait_for(lambda: watchdogs() <= before, "the interrupted stream's watchdog thread to end")
        with pytest.raises(ConfigError, match="not the same model"):
            link.send(request(1))  # greeted and checked again


# -- arguments -------------------------------------------------------------------------------------
def test_a_ca_given_as_a_number_is_refused_not_read_as_a_file_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(b"not read")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ConfigError, match="tls_ca must be the path of a PEM file, got int"):
            RemoteTransport("scxs://127.0.0.1:1", None, tls_ca=fd)  # type: ignore[arg-type]
        os.fstat(fd)  # still open: not read and closed by the transport
    finally:
        os.close(fd)
    link = RemoteTransport("scxs://127.0.0.1:1", None, tls_ca=path)
    assert link.tls_ca == path  # a path object is a path


def test_a_ca_file_without_a_certificate_is_a_config_error_at_once(tmp_path: Path) -> None:
    """Before: "cannot reach the SCX server … within …" once ``connect_timeout`` had passed."""
    path = tmp_path / "key.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with socket_closed() as port:
        link = RemoteTransport(f"scxs://127.0.0.1:{port}", None, tls_ca=str(path), connect_timeout=5.0)
        with pytest.raises(ConfigError, match="holds no PEM certificate"):
            link.send(request(0))
        assert link._channel is None


class socket_closed:
    """A local port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_message_that_is_not_a_request_is_refused_before_connecting(stub: Any) -> None:
    """Before: the transport connected and greeted, then raised a raw AttributeError."""
    s = stub()
    with RemoteTransport(s.url, None, timeout=TIMEOUT) as link:
        with pytest.raises(ProtocolError, match="a message must be a Request, got str"):
            link.send("open")  # type: ignore[arg-type]
        assert link._call is None and link.info is None


@pytest.mark.parametrize("url", [5, 2.5, ["scx://127.0.0.1:1"]])
def test_a_url_that_is_not_a_string_is_a_config_error(url: Any) -> None:
    with pytest.raises(ConfigError, match="server URL must be a string"):
        RemoteTransport(url)


# -- ServerProcess: arguments checked before a process starts ------------------------------------
class _Started(Exception):
    pass


@pytest.fixture
def popen(monkeypatch: Any) -> list[list[str]]:
    """Records each command ServerProcess would start, and starts none."""
    import subprocess

    started: list[list[str]] = []

    def fake(cmd: list[str], **kw: Any) -> Any:
        started.append(cmd)
        raise _Started

    monkeypatch.setattr(subprocess, "Popen", fake)
    return started


@pytest.mark.parametrize(
    "kw",
    [
        {"start_timeout": "soon"},  # raised TypeError once the process ran, leaving it running
        {"start_timeout": float("nan")},  # waited for ever on a server that never says it listens
        {"args": ["--workers", 2]},
        {"env": {"SCX": 1}},
        {"port": -1},
    ],
    ids=["timeout-str", "timeout-nan", "int-arg", "int-env", "negative-port"],
)
def test_server_process_refuses_bad_arguments_before_starting(popen: Any, kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ServerProcess("tiny-llama", **kw)
    assert popen == []


def test_server_process_takes_its_arguments_once(popen: Any) -> None:
    """An iterator's ``--ops-port`` was consumed by the check for it: the command lost it."""
    with pytest.raises(_Started):
        ServerProcess("tiny-llama", iter(["--ops-port", "-1"]))  # type: ignore[arg-type]
    assert popen[0][-4:] == ["--port", "0", "--ops-port", "-1"]


# -- zoo.engines: the stream to a server -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["logits", "generate"])
def test_an_scx_engine_releases_its_stream_when_closed(kind: str) -> None:
    """Before: the engine was a plain function; its RemoteTransport (the stream, the server's state for
    it, a watchdog thread) went only when garbage collection reached it."""
    from scx_ref.zoo.engines import scx_config, scx_generate, scx_logits

    srv = InProcess(workers=1)  # idle_timeout 300 s: only the client's going ends the stream here
    try:
        w = tiny_weights(3)
        cfg = scx_config("paper", 1.0, max_length=16)
        ids = np.array([1, 2, 3])
        before = watchdogs()
        gc.disable()  # nothing here may be released by a collection
        try:
            if kind == "logits":
                engine: Any = scx_logits(w, "float64", cfg, server=srv.url)
                call: Callable[[Any], Any] = lambda e: e(ids).shape  # noqa: E731
                want: Any = (3, w.config.vocab_size)
            else:
                engine = scx_generate(w, "float64", cfg, server=srv.url)
                call, want = (lambda e: len(e(ids, 2))), 2
            with engine as run:
                assert call(run) == want
                assert not srv.server.sessions  # each call's session is closed after it
                assert len(srv.service.streams) == 1  # the stream stays open between calls
                assert call(run) == want
            wait_for(lambda: not srv.service.streams, "the closed engine's stream to end")
            wait_for(lambda: watchdogs() <= before, "its watchdog thread to end")
            engine.close()  # idempotent
            assert engine is not None  # held throughout: nothing was collected
        finally:
            gc.enable()
    finally:
        srv.stop()


@pytest.mark.parametrize("timeout", ["x", float("nan"), 0, -1.0])
def test_server_process_stop_and_health_refuse_a_bad_timeout_before_acting(timeout: Any) -> None:
    """``stop(timeout="x")`` sent SIGTERM, then failed in ``wait`` with a raw TypeError (the process left
    half-stopped, its files open); ``health`` passed it to urllib."""

    signals: list[int] = []

    class Proc:
        def poll(self) -> None:
            return None

        def send_signal(self, sig: int) -> None:
            signals.append(sig)

    sp = object.__new__(ServerProcess)
    sp.proc = Proc()  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="timeout"):
        sp.stop(timeout)
    with pytest.raises(ConfigError, match="timeout"):
        sp.health(timeout)
    assert signals == []

"""``RemoteTransport`` and ``SCXService`` against hostile peers (DESIGN §5.5–5.6):

- a transport whose connect is refused (wrong model, a server full for this address) kept its reply
  watchdog thread for ever unless the caller remembered ``close()``, and kept the refused server's
  greeting in ``info``; a transport dropped without ``close()`` kept its stream — and the session the
  server holds for it — open until the server's idle timeout;
- text from a hostile server (an error frame's message, a gRPC status's details, a greeting's model name)
  reached the client's exception messages uncut and unescaped: 60 KB, newlines and terminal escape
  sequences in a CLI's ``error:`` line;
- a client that never reads its replies: its stream is released for others after ``idle_timeout``, but the
  stream stays open, its unsent reply held by the server, until the client goes — so a cap per peer
  address that did not count such streams let one address pile them up without bound.

No assertion is about time: waits are bounded loops on a condition, every client has a timeout.
"""

from __future__ import annotations

import gc
import json
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.errors import ConfigError, ProtocolError, ServiceError  # noqa: E402
from scx_ref.protocol.messages import Request  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import FrameKind, encode_hello, encode_request  # noqa: E402
from scx_ref.service.service import METHOD, model_fingerprint  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .services import InProcess, grpc_stub, wait_for  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

TIMEOUT = 20.0  # seconds a client waits for a reply: a bound against hangs, never an assertion
OPEN = Request("ab" * 16, Stage.OPEN, -1, -1, 0)
OPEN_META = {"n": 4, "r1": 1, "r2": 1, "r_lock": 1, "l_s": 1, "l_e": 1, "max_length": 16, "level": "paper"}
HOSTILE_TEXT = "\x1b[2J\x1b]0;owned\x07\nscx generate: ok\n" + "y" * 60_000


def watchdogs() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "scx-remote-watchdog")


def raw_frame(kind: FrameKind, header: dict[str, Any]) -> bytes:
    """A frame without arrays, its header as given (what a hostile peer writes, not the encoder)."""
    head = json.dumps(header).encode()
    return struct.pack("<4sB3xI", b"SCX\x01", int(kind), len(head)) + head


class Hostile:
    """A gRPC server speaking the SCX method: each frame answered by ``answer(data, context)``."""

    def __init__(self, answer: Callable[[bytes, Any], bytes]) -> None:
        def handler(frames: Iterator[bytes], context: Any) -> Iterator[bytes]:
            for data in frames:
                yield answer(data, context)

        self.server, self.url = grpc_stub(handler, 2)


@pytest.fixture
def backend() -> NumpyBackend:
    return NumpyBackend(tiny_weights(3))


@pytest.fixture
def hostile() -> Iterator[Callable[[Callable[[bytes, Any], bytes]], Hostile]]:
    made: list[Hostile] = []

    def make(answer: Callable[[bytes, Any], bytes]) -> Hostile:
        made.append(Hostile(answer))
        return made[-1]

    yield make
    for h in made:
        h.server.stop(0)


def greeting(backend: NumpyBackend, **fields: Any) -> bytes:
    info = {
        "service": "scx",
        "fingerprint": model_fingerprint(backend),
        "wire_dtype": backend.numpy_dtype().str,
    }
    return encode_hello({**info, **fields})


# -- resources of a transport ---------------------------------------------------------------------
def test_a_refused_connect_leaves_no_thread_and_no_greeting(backend: NumpyBackend, hostile: Any) -> None:
    wrong = greeting(backend, fingerprint="0" * 16, model="another")
    h = hostile(lambda data, ctx: wrong)
    before = watchdogs()
    link = RemoteTransport(h.url, backend, timeout=TIMEOUT)
    try:
        for _ in range(3):  # each attempt greets, is refused, and leaves nothing running
            with pytest.raises(ConfigError, match="not the same model"):
                link.send(OPEN)
            wait_for(lambda: watchdogs() <= before, "the refused stream's watchdog thread to end")
            assert link.info is None  # the refused server's greeting is not kept
    finally:
        link.close()


def test_a_transport_dropped_without_close_frees_its_stream_and_session() -> None:
    srv = InProcess(workers=1)  # idle_timeout 300 s: only the client's going can end the stream here
    try:
        before = watchdogs()
        link = RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT)
        link.send(Request("cd" * 16, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
        assert len(srv.server.sessions) == 1 and len(srv.service.streams) == 1
        del link  # no close(): the caller forgot it, or an exception unwound past it
        gc.collect()
        wait_for(lambda: not srv.service.streams, "the forgotten transport's stream to end", bound=15.0)
        wait_for(lambda: not srv.server.sessions, "its session to be dropped", bound=15.0)
        wait_for(lambda: watchdogs() <= before, "its watchdog thread to end", bound=15.0)
    finally:
        srv.stop()


# -- the server's text in the client's errors -----------------------------------------------------
def _plain(text: str, limit: int) -> None:
    assert len(text) <= limit, len(text)
    assert "\x1b" not in text and "\n" not in text and "\x07" not in text, text[:200]


def test_a_servers_error_text_is_cut_and_escaped(backend: NumpyBackend, hostile: Any) -> None:
    hello = greeting(backend)
    bad = raw_frame(FrameKind.ERROR, {"error": "ProtocolError", "message": HOSTILE_TEXT, "seq": 0})
    h = hostile(lambda data, ctx: hello if data[4] == FrameKind.HELLO else bad)
    with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link:
        with pytest.raises(ProtocolError) as exc:
            link.send(OPEN)
        _plain(str(exc.value), 2100)
        assert "\\x1b[2J" in str(exc.value)  # escaped, still readable


def test_a_servers_status_details_are_cut_and_escaped(backend: NumpyBackend, hostile: Any) -> None:
    hello = greeting(backend)

    def answer(data: bytes, ctx: Any) -> bytes:
        if data[4] == FrameKind.HELLO:
            return hello
        ctx.abort(grpc.StatusCode.INTERNAL, HOSTILE_TEXT[:6000])
        raise AssertionError("unreachable")

    h = hostile(answer)
    with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link:
        with pytest.raises(ServiceError, match="ended the connection") as exc:
            link.send(OPEN)
        _plain(str(exc.value), 2200)


def test_a_greetings_model_name_is_cut_and_escaped(backend: NumpyBackend, hostile: Any) -> None:
    wrong = greeting(backend, fingerprint=HOSTILE_TEXT[:30_000], model=HOSTILE_TEXT[:30_000])
    h = hostile(lambda data, ctx: wrong)
    with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link:
        with pytest.raises(ConfigError, match="not the same model") as exc:
            link.send(OPEN)
        _plain(str(exc.value), 600)


# -- the server facing a client that never reads --------------------------------------------------
def test_streams_left_unread_count_under_the_per_peer_cap_until_their_client_goes() -> None:
    srv = InProcess(idle_timeout=1.0, grace=0.5, max_sessions=8, max_sessions_per_peer=1)
    # no BDP probing: the client's receive window stays small, so the server's writes soon wait on it
    channel = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    stop = threading.Event()
    hello = encode_hello({"client": "never reads", "pad": "x" * 30_000})

    def frames() -> Iterator[bytes]:
        yield encode_request(Request("ab" * 16, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
        for _ in range(2_000):  # far more reply bytes than the flow-control windows hold
            if stop.is_set():
                return
            yield hello
        stop.wait(120)  # then silence, the stream still open: the client neither reads nor closes

    unread = channel.stream_stream(METHOD)(frames())  # its replies are never read
    try:
        wait_for(lambda: len(srv.service.streams) == 1, "the unread stream")
        wait_for(lambda: not srv.service.streams and not srv.server.sessions, "its release", bound=60.0)
        # released for the server's accounting, but still open, its reply held: its address stays at its cap
        with (
            RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT) as link,
            pytest.raises(ServiceError, match="server full for this address"),
        ):
            link.send(OPEN)
        stop.set()
        unread.cancel()  # the client goes: its address may open a stream again
        wait_for(lambda: not srv.service._peer_handlers, "the unread stream's end")
        with RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT) as link:
            # one message (a whole prefill could outlast the 1 s idle timeout on a loaded machine)
            opened = link.send(Request("ef" * 16, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
            assert opened.stage is Stage.OPEN and isinstance(opened.meta.get("token"), str)
    finally:
        stop.set()
        unread.cancel()
        channel.close()
        srv.stop()

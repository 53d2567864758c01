"""``RemoteTransport`` (``scx_ref/service/remote.py``), the client's side of ``scx serve``, read whole
where the mutation target ``remote`` (``mutation/targets.py``) found its other tests reading only part:

- the server's text in the client's errors: the cut (2 000 characters of a message, 60 of a class name
  that cannot be built), the ellipsis only past the cut, printable non-ASCII kept as it is;
- a greeting refused for its model or its dtype: the whole message, the server's words cut and quoted;
- an error frame: its seq -1 (no request's) or absent is the request's; an absent class name or message;
- a client backend without ``embed`` (no model to check) or ``widened`` (no float64 twin): the greeting
  is taken and the reply's arrays still go through its ``from_numpy``;
- the reply watchdog: one daemon thread named ``scx-remote-watchdog`` per open stream;
- a finalizer raises nothing, even when dropping the stream fails.

No assertion is about time: every client has a reply timeout as a bound against hangs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.errors import ConfigError, IntegrityError, ProtocolError, SCXError, ServiceError  # noqa: E402
from scx_ref.protocol.messages import Reply, Request  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import FrameKind, encode_hello, encode_reply  # noqa: E402
from scx_ref.service.remote import _server_error, _shown  # noqa: E402
from scx_ref.service.service import model_fingerprint  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .services import wait_for  # noqa: E402
from .test_remote_transport_hostile_server import raw_frame  # noqa: E402
from .test_remote_transport_lifecycle import Stub  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

TIMEOUT = 20.0  # seconds a client waits for a reply: a bound against hangs, never an assertion
SID = "ab" * 16


@pytest.fixture
def peer() -> Iterator[Callable[..., Stub]]:
    """Scripted SCX servers (tests/test_remote_transport_lifecycle.py's ``Stub``), stopped after the test."""
    made: list[Stub] = []

    def make(answer: Callable[[Request, Any], bytes], hello: bytes | None = None) -> Stub:
        made.append(Stub(hello, answer))
        return made[-1]

    yield make
    for p in made:
        p.server.stop(0)


# -- the server's text as the client's errors show it -----------------------------------------------
def test_shown_cuts_at_the_limit_and_marks_the_cut_only_past_it() -> None:
    assert _shown("abcdef", 3) == "abc…"
    assert _shown("abc", 3) == "abc"  # at the limit: nothing cut, no mark
    assert _shown("ab", 3) == "ab"


def test_shown_escapes_what_is_not_printable_and_keeps_printable_non_ascii() -> None:
    assert _shown("é ü — 字", 20) == "é ü — 字"
    assert _shown("a\nb\x1b[2J\ud800", 20) == "a\\nb\\x1b[2J\\ud800"


def test_a_server_errors_message_is_cut_at_2000_characters() -> None:
    err = _server_error("ProtocolError", "m" * 3000)
    assert type(err) is ProtocolError
    assert str(err) == "server: " + "m" * 2000 + "…"
    assert str(_server_error("ProtocolError", "m" * 2000)) == "server: " + "m" * 2000


class AnErrorClassWhoseNameRunsPastSixtyCharactersAndTakesTwoArguments(SCXError):
    """An SCXError that cannot be built from a message alone, its name longer than 60 characters."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message, detail)


def test_a_class_that_cannot_be_built_from_a_message_is_a_service_error_naming_60_characters() -> None:
    name = AnErrorClassWhoseNameRunsPastSixtyCharactersAndTakesTwoArguments.__name__
    assert len(name) > 61
    err = _server_error(name, "why")
    assert type(err) is ServiceError
    assert str(err) == f"server ({name[:60]}): why"


# -- the greeting's checks ----------------------------------------------------------------------------
@pytest.fixture
def backend() -> NumpyBackend:
    return NumpyBackend(tiny_weights(3))


def test_a_server_of_another_model_is_refused_with_the_whole_story(backend: NumpyBackend, peer: Any) -> None:
    theirs = "f" * 100
    hello = encode_hello(
        {"service": "scx", "model": "m" * 300, "fingerprint": theirs, "wire_dtype": backend.numpy_dtype().str}
    )
    p = peer(lambda req, ctx: b"", hello)
    with RemoteTransport(p.url, backend, timeout=TIMEOUT) as link, pytest.raises(ConfigError) as refused:
        link.send(Request(SID, Stage.OPEN, -1, -1, 0))
    shown_model = repr("m" * 300)[:200] + "…"
    assert str(refused.value) == (
        f"the server at {p.url} serves model {shown_model} (fingerprint {theirs[:64]}…); this client holds "
        f"{backend.config.name!r} (fingerprint {model_fingerprint(backend)}): not the same model"
    )
    assert link.info is None


def test_a_server_of_another_dtype_is_refused_with_the_whole_story(backend: NumpyBackend, peer: Any) -> None:
    wire = "<f4" + "x" * 100
    hello = encode_hello({"service": "scx", "fingerprint": model_fingerprint(backend), "wire_dtype": wire})
    p = peer(lambda req, ctx: b"", hello)
    with RemoteTransport(p.url, backend, timeout=TIMEOUT) as link, pytest.raises(ConfigError) as refused:
        link.send(Request(SID, Stage.OPEN, -1, -1, 0))
    assert str(refused.value) == (
        f"the server computes in {wire[:64]}… and this client in <f8: SCX is exact only when both use the "
        "same dtype (start the server with the client's --dtype)"
    )


class _Converting:
    """A client backend with no model (no ``embed``) and no float64 twin (no ``widened``): only
    ``from_numpy``, which marks what it converted."""

    def from_numpy(self, arr: np.ndarray) -> tuple[str, np.ndarray]:
        return ("converted", arr)


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
def test_a_backend_without_a_model_or_a_twin_takes_the_greeting_and_converts_the_reply(
    peer: Any, wide: bool
) -> None:
    """No ``embed``: there is no model to check the greeting against (it names none here). No
    ``widened``: a wide request's reply is converted by the backend itself."""
    x = np.arange(6.0).reshape(2, 3)

    def answer(req: Request, ctx: Any) -> bytes:
        return encode_reply(Reply(req.session, req.stage, req.layer, req.step, req.seq, {"x": x}, {}))

    p = peer(answer)
    with RemoteTransport(p.url, _Converting(), timeout=TIMEOUT) as link:
        reply = link.send(Request(SID, Stage.OPEN, -1, -1, 0, {}, {"wide": True} if wide else {}))
        assert link.info == {"service": "scx"}
    ((tag, arr),) = reply.arrays.values()
    assert tag == "converted" and np.array_equal(arr, x)


# -- an error frame ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "seq"),
    [
        ({"error": "ProtocolError", "message": "no", "seq": -1}, 5),
        ({"error": "ProtocolError", "message": "no"}, 0),
        ({"error": "ProtocolError", "message": "no"}, 5),
    ],
    ids=["seq-minus-one", "no-seq-request-0", "no-seq-request-5"],
)
def test_an_error_frame_of_seq_minus_one_or_none_answers_the_request(
    peer: Any, header: dict[str, Any], seq: int
) -> None:
    p = peer(lambda req, ctx: raw_frame(FrameKind.ERROR, header))
    with RemoteTransport(p.url, None, timeout=TIMEOUT) as link:
        with pytest.raises(ProtocolError) as refused:
            link.send(Request(SID, Stage.OPEN, -1, -1, seq))
        assert str(refused.value) == "server: no"
        assert link._call is not None  # the stream is kept: the error answered this request


def test_an_error_frame_of_another_seq_is_refused_naming_it_cut(peer: Any) -> None:
    p = peer(
        lambda req, ctx: raw_frame(
            FrameKind.ERROR, {"error": "ProtocolError", "message": "no", "seq": "x" * 100}
        )
    )
    with RemoteTransport(p.url, None, timeout=TIMEOUT) as link:
        with pytest.raises(IntegrityError) as refused:
            link.send(Request(SID, Stage.OPEN, -1, -1, 3))
        assert str(refused.value) == f"the server's error frame answers seq {repr('x' * 100)[:40]}…, not 3"
        assert link._call is None  # dropped: no later message can take a reply meant for another


def test_an_error_frame_without_a_class_or_a_message_is_a_service_error_with_no_text(peer: Any) -> None:
    p = peer(lambda req, ctx: raw_frame(FrameKind.ERROR, {"seq": 0}))
    with RemoteTransport(p.url, None, timeout=TIMEOUT) as link, pytest.raises(ServiceError) as refused:
        link.send(Request(SID, Stage.OPEN, -1, -1, 0))
    assert type(refused.value) is ServiceError and str(refused.value) == "server: "


# -- threads and finalizers ---------------------------------------------------------------------------
def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "scx-remote-watchdog"]


def test_an_open_stream_has_one_daemon_watchdog_thread_and_a_closed_one_none(peer: Any) -> None:
    def answer(req: Request, ctx: Any) -> bytes:
        return encode_reply(Reply(req.session, req.stage, req.layer, req.step, req.seq, {}, {}))

    p = peer(answer)
    before = set(_watchdogs())
    link = RemoteTransport(p.url, None, timeout=TIMEOUT)
    try:
        link.send(Request(SID, Stage.OPEN, -1, -1, 0))
        (mine,) = [t for t in _watchdogs() if t not in before]
        assert mine.daemon  # a client that forgets close() can still exit
        assert link._watchdog is not None and link._watchdog._thread is mine
    finally:
        link.close()
    wait_for(lambda: not mine.is_alive(), "the closed stream's watchdog thread to end")


def test_a_finalizer_raises_nothing_when_dropping_the_stream_fails() -> None:
    class Failing:
        def close(self) -> None:
            raise RuntimeError("the channel cannot close")

    link = RemoteTransport("scx://127.0.0.1:1", None)
    link._channel = Failing()
    link.__del__()  # as the garbage collector calls it: nothing raised


def test_the_watchdog_fires_at_its_deadline_and_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock that stands still a second before the deadline the watchdog waits; once the clock reads
    the deadline it cancels the call, once, and :meth:`disarm` says it fired."""
    import time

    from scx_ref.service import remote

    now = [100.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    class Call:
        def __init__(self) -> None:
            self.cancelled = 0

        def cancel(self) -> None:
            self.cancelled += 1

    monkeypatch.setattr(remote, "time", Clock)
    watchdog = remote._Watchdog()
    call = Call()
    try:
        watchdog.arm(call, 1.0)  # the deadline: 101.0
        time.sleep(0.3)  # (real time) the thread has read the clock and waits
        assert not watchdog.fired and call.cancelled == 0
        now[0] = 101.0
        with watchdog._cv:
            watchdog._cv.notify()
        wait_for(lambda: watchdog.fired, "the watchdog to fire at its deadline")
        assert call.cancelled == 1
        assert watchdog.disarm() is True
    finally:
        watchdog.close()
    watchdog._thread.join(10)
    assert not watchdog._thread.is_alive()

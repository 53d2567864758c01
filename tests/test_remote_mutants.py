"""``RemoteTransport`` (``scx_ref/service/remote.py``), the client's side of ``scx serve``, read whole
where the mutation target ``remote`` (``mutation/targets.py``) found its other tests reading only part:

- the server's text in the client's errors: the cut (2 000 characters of a message, 60 of a class name
  that cannot be built), the ellipsis only past the cut, printable non-ASCII kept as it is;
- a greeting refused for its model or its dtype: the whole message, the server's words cut and quoted;
- an error frame: its seq -1 (no request's) or absent is the request's; an absent class name or message;
- a client backend without ``embed`` (no model to check) or ``widened`` (no float64 twin): the greeting
  is taken and the reply's arrays still go through its ``from_numpy``;
- the reply watchdog: one daemon thread named ``scx-remote-watchdog`` per open stream;
- a finalizer raises nothing, even when dropping the stream fails;
- reaching the server: a TLS channel made with the CA file's certificate and the transport's options, the
  system's roots without one, an unreadable CA file named, an IPv6 address bracketed, a greeting of another
  service (or not a greeting) refused, a server that cannot be reached named with the wait;
- the arguments: each refusal of a URL, a wait or a bound read whole, the edges each one admits, the
  defaults;
- the reply's arrays bounded by ``max_message_bytes`` + 1 024 bytes, even an empty one whose other sizes
  claim more (the bound is the transport's, not decode's default);
- the round trip: a message of exactly ``max_message_bytes`` sent and one byte more refused, the server's
  status details cut at 2 000 characters, an RpcError without a code or details (or with a code that is no
  StatusCode) reported as it is, a stream the server ends without a reply.

No assertion is about time: every client has a reply timeout as a bound against hangs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.errors import (  # noqa: E402
    ConfigError,
    IntegrityError,
    ProtocolError,
    SCXError,
    ServiceError,
    WireError,
)
from scx_ref.protocol.messages import Reply, Request  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import FrameKind, decode, encode_hello, encode_reply, encode_request  # noqa: E402
from scx_ref.service.remote import _server_error, _shown  # noqa: E402
from scx_ref.service.service import model_fingerprint  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .services import grpc_stub, needs_ipv6, tls_files, wait_for  # noqa: E402
from .test_remote_transport_hostile_server import raw_frame  # noqa: E402
from .test_remote_transport_lifecycle import Injected, Stub  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

TIMEOUT = 20.0  # seconds a client waits for a reply: a bound against hangs, never an assertion
SID = "ab" * 16


@pytest.fixture
def peer() -> Iterator[Callable[..., Stub]]:
    """Scripted SCX servers (tests/test_remote_transport_lifecycle.py's ``Stub``), stopped after the test."""
    made: list[Stub] = []

    def make(
        answer: Callable[[Request, Any], bytes] | None = None, hello: bytes | None = None, **where: Any
    ) -> Stub:
        made.append(Stub(hello, answer, **where))
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
    p = peer()  # each request answered by a reply to it
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
        # the thread serves on after firing (a deadline left unusable killed it): armed again, it fires again
        watchdog.arm(call, 1.0)  # the deadline: 102.0
        now[0] = 102.0
        with watchdog._cv:
            watchdog._cv.notify()
        wait_for(lambda: watchdog.fired, "the watchdog to fire a second time")
        assert call.cancelled == 2
    finally:
        watchdog.close()
    watchdog._thread.join(10)
    assert not watchdog._thread.is_alive()


# -- reaching the server ------------------------------------------------------------------------------
def _within(bound: float, fn: Callable[[], object]) -> BaseException | None:
    """Run ``fn`` in a daemon thread and return what it raised (None: nothing); fail if it still runs after
    ``bound`` seconds — a hang, not a timing."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test to read
            raised.append(exc)
        else:
            raised.append(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        pytest.fail(f"still running after {bound:g} s")
    return raised[0]


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[tuple[bytes, bytes], Path]:
    """A server's PEM key and certificate chain for 127.0.0.1, and the file of its (private) CA."""
    ((cert, key, ca_file),) = tls_files(tmp_path)
    return (key.read_bytes(), cert.read_bytes()), ca_file


def test_a_tls_link_with_its_ca_file_carries_a_reply_past_grpcs_default_bound(
    peer: Any, tls_pair: Any
) -> None:
    """The channel is a secure one to the URL's host and port, trusting the CA file's certificate, with the
    transport's options: a reply past gRPC's default 4 MiB bound (max_message_bytes is 512 MiB) comes in."""
    key_chain, ca_file = tls_pair
    x = np.zeros(600_000)  # 4.8 MB

    def answer(req: Request, ctx: Any) -> bytes:
        return encode_reply(Reply(req.session, req.stage, req.layer, req.step, req.seq, {"x": x}, {}))

    p = peer(answer, tls=key_chain)
    assert p.url.startswith("scxs://127.0.0.1:")
    with RemoteTransport(p.url, None, timeout=TIMEOUT, connect_timeout=TIMEOUT, tls_ca=ca_file) as link:
        reply = link.send(Request(SID, Stage.OPEN, -1, -1, 0))
    assert reply.arrays["x"].nbytes > 4 << 20 and not reply.arrays["x"].any()


def test_a_tls_link_without_a_ca_file_trusts_only_the_systems_roots(peer: Any, tls_pair: Any) -> None:
    """No CA file: gRPC's own roots, which do not hold the private CA, so the server is never reached and
    the client says so once ``connect_timeout`` has passed."""
    key_chain, _ = tls_pair
    p = peer(None, tls=key_chain)
    link = RemoteTransport(p.url, None, timeout=TIMEOUT, connect_timeout=0.5)
    try:
        refused = _within(TIMEOUT, lambda: link.send(Request(SID, Stage.OPEN, -1, -1, 0)))
    finally:
        link.close()
    assert type(refused) is ServiceError
    assert str(refused) == f"cannot reach the SCX server at {p.url} within 0.5 s"
    assert link._channel is None and link._watchdog is None  # nothing left open


def test_an_unreadable_ca_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    link = RemoteTransport("scxs://127.0.0.1:1", None, tls_ca=missing)
    with pytest.raises(ConfigError) as refused:
        link.send(Request(SID, Stage.OPEN, -1, -1, 0))
    assert str(refused.value) == (
        f"cannot read the TLS CA file {missing}: [Errno 2] No such file or directory: '{missing}'"
    )


@needs_ipv6
def test_an_ipv6_server_is_reached_by_its_bracketed_url(peer: Any) -> None:
    p = peer(None, host="::1")
    assert p.url.startswith("scx://[::1]:")
    with RemoteTransport(p.url, None, timeout=TIMEOUT, connect_timeout=TIMEOUT) as link:
        assert link.host == "::1"
        assert link.send(Request(SID, Stage.OPEN, -1, -1, 4)).seq == 4
        assert link.info == {"service": "scx"}  # the greeting, kept once checked


@pytest.mark.parametrize(
    "hello",
    [encode_hello({"service": "other"}), raw_frame(FrameKind.REPLY, {"service": "scx"})],
    ids=["another-service", "not-a-greeting"],
)
def test_a_greeting_of_another_service_or_of_another_kind_is_refused(peer: Any, hello: bytes) -> None:
    p = peer(None, hello=hello)
    link = RemoteTransport(p.url, None, timeout=TIMEOUT)
    try:
        with pytest.raises(ServiceError) as refused:
            link.send(Request(SID, Stage.OPEN, -1, -1, 0))
        assert str(refused.value) == f"{p.url} is not an SCX server"
        assert link.info is None and link._call is None
    finally:
        link.close()


# -- the round trip -----------------------------------------------------------------------------------
def test_a_message_of_exactly_max_message_bytes_goes_and_one_byte_more_is_refused(peer: Any) -> None:
    req = Request(SID, Stage.OPEN, -1, -1, 0)
    size = len(encode_request(req))
    assert size > len(encode_hello({"client": "scx_ref"}))  # the greeting goes either way
    p = peer()
    with RemoteTransport(p.url, None, timeout=TIMEOUT, max_message_bytes=size) as link:
        assert link.send(req).seq == 0
    with (
        RemoteTransport(p.url, None, timeout=TIMEOUT, max_message_bytes=size - 1) as link,
        pytest.raises(ServiceError) as refused,
    ):
        link.send(req)
    assert str(refused.value) == f"message of {size} bytes exceeds max_message_bytes"


@pytest.mark.parametrize(
    ("length", "shown"), [(2000, "d" * 2000), (2001, "d" * 2000 + "…")], ids=["2000", "2001"]
)
def test_a_servers_status_details_are_cut_at_2000_characters(peer: Any, length: int, shown: str) -> None:
    def answer(req: Request, ctx: Any) -> bytes:
        ctx.abort(grpc.StatusCode.INTERNAL, "d" * length)
        raise AssertionError("unreachable")

    p = peer(answer)
    with RemoteTransport(p.url, None, timeout=TIMEOUT) as link:
        with pytest.raises(ServiceError) as refused:
            link.send(Request(SID, Stage.OPEN, -1, -1, 0))
        assert link._call is None
    assert str(refused.value) == f"the SCX server at {p.url} ended the connection (INTERNAL: {shown})"


class _CodeNotAStatus(grpc.RpcError):  # type: ignore[misc]
    def code(self) -> int:
        return 14

    def details(self) -> str:
        return "gone"


@pytest.mark.parametrize(
    ("error", "shown"),
    [(grpc.RpcError("lost\nit"), "None: lost\\nit"), (_CodeNotAStatus("x"), "14: gone")],
    ids=["no-code-or-details", "code-not-a-status"],
)
def test_an_rpc_error_is_reported_with_what_it_has(peer: Any, error: Exception, shown: str) -> None:
    """An RpcError without ``code``/``details`` (gRPC's base class) is reported with its own text; a code
    that is no StatusCode, as it is: the client's error, not an AttributeError."""
    p = peer()
    with RemoteTransport(p.url, None, timeout=TIMEOUT) as link:
        link._connect()

        def broken(inner: Iterator[bytes]) -> bytes:
            raise error

        link._replies = Injected(link._replies, broken)  # type: ignore[arg-type]
        with pytest.raises(ServiceError) as refused:
            link.send(Request(SID, Stage.OPEN, -1, -1, 0))
        assert link._call is None
    assert str(refused.value) == f"the SCX server at {p.url} ended the connection ({shown})"


def test_a_stream_the_server_ends_without_a_reply_is_a_service_error() -> None:
    def handler(frames: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for data in frames:
            if decode(data).kind is not FrameKind.HELLO:
                return  # the status OK, no reply
            yield encode_hello({"service": "scx"})

    server, url = grpc_stub(handler)
    try:
        with RemoteTransport(url, None, timeout=TIMEOUT) as link:
            with pytest.raises(ServiceError) as refused:
                link.send(Request(SID, Stage.OPEN, -1, -1, 0))
            assert link._call is None
        assert str(refused.value) == f"the SCX server at {url} closed the connection"
    finally:
        server.stop(0)


# -- the arguments ------------------------------------------------------------------------------------
URL = "scx://127.0.0.1:8470"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (3, "server URL must be a string scx://HOST:PORT, got int"),
        ("scx://127.0.0.1:99999", "invalid server URL 'scx://127.0.0.1:99999': Port out of range 0-65535"),
        (
            "scx://:8470",
            "server URL must be scx://HOST:PORT or scxs://HOST:PORT (TLS), got 'scx://:8470'",
        ),
        (
            "http://127.0.0.1:8470",
            "server URL must be scx://HOST:PORT or scxs://HOST:PORT (TLS), got 'http://127.0.0.1:8470'",
        ),
        ("scx://127.0.0.1:0", "server URL names port 0, which no server listens on: 'scx://127.0.0.1:0'"),
        *(
            (url, f"server URL takes no user, path, query or fragment: {url!r}")
            for url in (
                "scx://user@127.0.0.1:8470",
                "scx://127.0.0.1:8470/p",
                "scx://127.0.0.1:8470?x=1",
                "scx://127.0.0.1:8470#f",
            )
        ),
    ],
    ids=[
        "not-a-string",
        "port-out-of-range",
        "no-host",
        "another-scheme",
        "port-0",
        "user",
        "path",
        "query",
        "fragment",
    ],
)
def test_each_malformed_url_is_refused_whole(url: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        RemoteTransport(url)
    assert str(refused.value) == message


def test_a_url_with_a_bare_slash_is_taken_and_its_parts_kept() -> None:
    link = RemoteTransport("scxs://127.0.0.1:8470/")
    assert (link.url, link.host, link.port, link.tls) == ("scxs://127.0.0.1:8470/", "127.0.0.1", 8470, True)


def test_the_waits_default_to_120_and_10_seconds() -> None:
    link = RemoteTransport(URL)
    assert (link.timeout, link.connect_timeout, link.max_message_bytes) == (120.0, 10.0, 512 << 20)


@pytest.mark.parametrize("name", ["timeout", "connect_timeout"])
@pytest.mark.parametrize("value", [0, -1.0, 1e300], ids=["zero", "negative", "past-timeout-max"])
def test_a_wait_of_zero_or_past_timeout_max_is_refused_whole(name: str, value: float) -> None:
    with pytest.raises(ConfigError) as refused:
        RemoteTransport(URL, **{name: value})
    assert (
        str(refused.value) == f"{name} (seconds) must lie in (0, {int(threading.TIMEOUT_MAX)}], got {value!r}"
    )


@pytest.mark.parametrize("name", ["timeout", "connect_timeout"])
def test_a_wait_under_a_second_and_one_of_timeout_max_are_taken(name: str) -> None:
    assert getattr(RemoteTransport(URL, **{name: 0.25}), name) == 0.25
    assert getattr(RemoteTransport(URL, **{name: threading.TIMEOUT_MAX}), name) == threading.TIMEOUT_MAX


def test_max_message_bytes_of_one_is_taken_and_zero_refused_whole() -> None:
    assert RemoteTransport(URL, max_message_bytes=1).max_message_bytes == 1
    with pytest.raises(ConfigError) as refused:
        RemoteTransport(URL, max_message_bytes=0)
    assert str(refused.value) == "max_message_bytes must lie in [1, 2147482623], got 0"


def test_a_ca_file_beside_a_plaintext_url_is_refused_whole() -> None:
    with pytest.raises(ConfigError) as refused:
        RemoteTransport(URL, tls_ca="ca.pem")
    assert str(refused.value) == f"tls_ca is for a TLS server (scxs://HOST:PORT); {URL!r} is not one"


# -- a reply's arrays against the transport's own bound ---------------------------------------------------
@pytest.mark.parametrize(("max_message_bytes", "taken"), [(6976, True), (6975, False)], ids=["at", "past"])
def test_an_empty_reply_array_claiming_more_than_the_bound_is_refused(
    peer: Any, max_message_bytes: int, taken: bool
) -> None:
    """An array of shape (0, 1000) float64 holds no bytes, but its other sizes claim 8 000: past the
    transport's bound, max_message_bytes + 1 024, it is refused (a WireError, the stream dropped), though
    it is far inside decode's default bound (1 GiB) and the frame itself is small."""
    empty = np.zeros((0, 1000))

    def answer(req: Request, ctx: Any) -> bytes:
        return encode_reply(Reply(req.session, req.stage, req.layer, req.step, req.seq, {"x": empty}, {}))

    p = peer(answer)
    with RemoteTransport(p.url, None, timeout=TIMEOUT, max_message_bytes=max_message_bytes) as link:
        if taken:
            assert link.send(Request(SID, Stage.OPEN, -1, -1, 0)).arrays["x"].shape == (0, 1000)
            assert link._call is not None
        else:
            with pytest.raises(WireError) as refused:
                link.send(Request(SID, Stage.OPEN, -1, -1, 0))
            assert str(refused.value) == "array 'x': shape [0, 1000] spans more than 7999 bytes"
            assert link._call is None

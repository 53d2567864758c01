"""``scx serve`` and its client facing a hostile peer (DESIGN §5.5–5.6): every message from the other side
is validated before it is used or changes state, and every refusal is a project error.

- the codec's decoder, fed crafted headers and a seeded stream of structural mutations of valid frames:
  a valid frame or WireError, never another exception;
- an in-process ``SCXService`` whose clients send crafted frames, stall, or vanish in the middle of a
  message (the event loop never waits for that message's compute, and a session it opens is dropped);
- ``RemoteTransport`` talking to a hostile gRPC server: a malformed greeting, a reply for another message,
  a reply whose shape is absurd, an oversize reply, an error frame naming a class it cannot build.

No assertion is about time: waits are bounded loops on a condition, every client has a timeout.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.errors import IntegrityError, SCXError, ServiceError, WireError  # noqa: E402
from scx_ref.keys import KeySchedule  # noqa: E402
from scx_ref.protocol import Client, SCXConfig, Server  # noqa: E402
from scx_ref.protocol.messages import Reply, Request  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import (  # noqa: E402
    FrameKind,
    decode,
    encode_error,
    encode_hello,
    encode_reply,
    encode_request,
    reply_from,
    request_from,
)
from scx_ref.service.service import model_fingerprint  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .services import InProcess, grpc_stub, wait_for  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

PROMPT = np.array([1, 2, 3, 4, 5, 6])
TIMEOUT = 20.0  # seconds a client waits for a reply: a bound against hangs, never an assertion
PREFIX = struct.Struct("<4sB3xI")
BASE = {"session": "ab" * 16, "stage": "qkv", "layer": 0, "step": -1, "seq": 1, "token": "t", "meta": {}}


def frame(header: dict[str, Any] | bytes, kind: int = 1, body: bytes | None = None) -> bytes:
    """A frame with this header; ``body`` None: the zero bytes the header's arrays declare (capped)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    out = PREFIX.pack(b"SCX\x01", kind, len(head)) + head
    if body is None:
        body = b"\0" * min(_declared(head, len(out)) - len(out), 1 << 20)
    return out + body


def _declared(head: bytes, pos: int) -> int:
    """Where a frame with this header ends by its declared arrays (``pos`` when they cannot be read)."""
    try:
        specs = json.loads(head).get("arrays", [])
        for _, dt, shape in specs:
            pos += -pos % 64 + {"<f4": 4, "<f8": 8, "<i8": 8}.get(dt, 1) * int(np.prod(shape, dtype=object))
    except Exception:
        pass
    return max(pos, 0)


def decodes_or_wire_error(data: Any) -> Any:
    """The Request/Reply/Frame ``data`` decodes to, or the WireError; anything else fails the test."""
    try:
        f = decode(data)
        if f.kind is FrameKind.REQUEST:
            return request_from(f)
        if f.kind is FrameKind.REPLY:
            return reply_from(f)
        return f
    except WireError as exc:
        return exc


# -- the codec --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape", [[0, 2**31 - 1, 2**31 - 1], [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], [2**31 - 1, 2**31 - 1, 0]]
)
def test_an_empty_array_with_absurd_dimensions_is_a_wire_error(shape: list[int]) -> None:
    data = frame({**BASE, "arrays": [["x", "<f4", shape]]})
    with pytest.raises(WireError, match="spans more than"):
        decode(data)
    ok = decode(frame({**BASE, "arrays": [["x", "<f4", [0, 16]]]}))  # an honest empty array still decodes
    assert ok.arrays["x"].shape == (0, 16)


def test_a_repeated_header_key_is_refused() -> None:
    head = b'{"session":"ab","session":"cd","stage":"qkv","layer":0,"step":-1,"seq":1,"meta":{}}'
    with pytest.raises(WireError, match="repeats a key"):
        decode(frame(head))
    nested = b'{"session":"ab","stage":"qkv","layer":0,"step":-1,"seq":1,"meta":{"n":1,"n":2}}'
    with pytest.raises(WireError, match="repeats a key"):
        decode(frame(nested))


def test_a_header_nested_deeper_than_the_encoder_writes_is_refused() -> None:
    deepest = {"a": {"b": [[7]]}}  # the deepest meta the encoder writes: 7 is 4 levels below meta
    req = Request("ab" * 16, Stage.OPEN, -1, -1, 0, {}, deepest)
    assert request_from(decode(encode_request(req))).meta == deepest
    for depth in (1, 40, 900):  # one level deeper, and deeper still (a JSON bomb within the header limit)
        too_deep: Any = [[7]]
        for _ in range(depth):
            too_deep = [too_deep]
        with pytest.raises(WireError, match="nested more than"):
            decode(frame({**BASE, "meta": {"a": {"b": too_deep}}}))


@pytest.mark.parametrize("field", ["token", "meta", "extra"])
def test_an_unpaired_surrogate_in_a_header_string_is_refused(field: str) -> None:
    header: dict[str, Any] = {**BASE, field: "\ud800x"}  # json.dumps writes the escape \ud800
    if field == "meta":
        header["meta"] = {"\udfff": 1}
    with pytest.raises(WireError, match="surrogate"):
        decode(frame(header))


@pytest.mark.parametrize("data", ["SCX\x01", None, 12, [1, 2]])
def test_decoding_what_is_not_bytes_is_a_wire_error(data: Any) -> None:
    with pytest.raises(WireError, match="must be bytes"):
        decode(data)


_HOSTILE: list[Any] = [
    -1,
    0,
    2**31,
    2**63,
    -(2**63),
    10**300,
    True,
    None,
    "",
    "\ud800",
    "x" * 600,
    [],
    {},
    [0, 2**31 - 1, 2**31 - 1],
    [2**31 - 1] * 4,
    [-1],
    [[[[[[[[1]]]]]]]],
    {"a": {"b": {"c": {"d": {"e": 1}}}}},
    ["x", "<f4", [0, 2**31 - 1]],
    ["x", ">f4", [1]],
    ["x", "|O", [1]],
    ["x", "<f2", [1]],
    ["x", "<f4", [3]],
    ["X", "<f4", [1]],
]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = dict(value) if isinstance(value, dict) else list(value)
    out[path[0]] = _replace(value[path[0]], path[1:], new)
    return out


def test_structural_mutations_of_valid_frames_decode_or_raise_wire_error() -> None:
    """A seeded stream of header-level mutations of valid frames — a field replaced by a hostile value, a
    key repeated, the body re-sized to what the new header declares — each decodes to a message or raises
    WireError: never another exception class, never a hang."""
    rng = np.random.default_rng(20240605)
    seeds = [
        encode_request(Request("ab" * 16, Stage.QKV, 0, -1, 3, {"x": np.ones((2, 16))}, {"n": 4}, "tok")),
        encode_reply(Reply("cd" * 16, Stage.ATTN, 1, -1, 4, {"q": np.ones((1, 4)), "k": np.zeros((0, 4))})),
        encode_request(Request("ef" * 16, Stage.SHARE, 1, -1, 5, {"perm": np.arange(4)}, {"wide": True})),
        encode_error("ProtocolError", "no", 3),
        encode_hello({"service": "scx", "fingerprint": "00"}),
    ]
    outcomes: dict[str, int] = {}
    for _ in range(1500):
        base = seeds[int(rng.integers(len(seeds)))]
        hlen = int.from_bytes(base[8:12], "little")
        header = json.loads(base[12 : 12 + hlen])
        header.setdefault("arrays", [])
        for _ in range(int(rng.integers(1, 4))):
            paths = list(_paths(header))
            path = paths[int(rng.integers(len(paths)))]
            if not path:
                continue
            header = _replace(header, path, _HOSTILE[int(rng.integers(len(_HOSTILE)))])
        head = json.dumps(header).encode()
        if rng.random() < 0.1:  # repeat the first key
            key = head[1 : head.index(b":")]
            head = b"{" + key + b":0," + head[1:]
        kind = base[4] if rng.random() < 0.9 else int(rng.integers(0, 6))
        pad = int(rng.choice([0, 0, 0, 1, -1, 64]))
        data = frame(head, kind)
        data = data + b"\0" * pad if pad >= 0 else data[:pad]
        got = decodes_or_wire_error(data)
        name = type(got).__name__
        outcomes[name] = outcomes.get(name, 0) + 1
    assert outcomes.get("WireError", 0) > 100 and len(outcomes) > 2, outcomes  # both outcomes exercised


# -- the server -------------------------------------------------------------------------------------
class Gate:
    """Holds one stage of a server's session until the test opens it (a message 'in flight')."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()

    def hold(self, stage: str) -> None:
        if stage == self.stage:
            self.entered.set()
            self.release.wait(60)

    def leave(self, stage: str) -> None:
        if stage == self.stage:
            self.left.set()


def gated_server(gate: Gate) -> type[Server[Any]]:
    class GatedServer(Server[Any]):
        def _open(self, req: Request) -> Reply:
            gate.hold("open")
            try:
                return super()._open(req)
            finally:
                gate.leave("open")

        def _qkv(self, s: Any, req: Request) -> Any:  # runs under the session's lock
            gate.hold("qkv")
            return super()._qkv(s, req)

    return GatedServer


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()  # whatever happened, nothing stays held


@pytest.fixture
def served(gate: Gate) -> Iterator[InProcess]:
    srv = InProcess(gated_server(gate), workers=2, max_message_bytes=1 << 20)
    yield srv
    gate.release.set()
    srv.stop()


def honest_session(backend: NumpyBackend, link: Any) -> list[int]:
    client = Client(backend, KeySchedule.generate(), SCXConfig(level="paper"))
    logits = client.prefill(PROMPT, link)
    toks = [int(np.argmax(logits[-1]))]
    for _ in range(2):
        toks.append(int(np.argmax(client.decode(toks[-1], link))))
    client.close(link)
    return toks


def error_of(data: bytes) -> tuple[str, str]:
    f = decode(data)
    assert f.kind is FrameKind.ERROR, f.header
    return str(f.header["error"]), str(f.header["message"])


def test_a_client_gone_mid_open_leaves_no_session_behind(served: InProcess, gate: Gate) -> None:
    gate.stage = "open"
    link = RemoteTransport(served.url, served.backend, timeout=2.0)
    client = Client(served.backend, KeySchedule.generate(), SCXConfig(level="paper"))
    with pytest.raises(ServiceError, match="no reply"):  # the client gives up while open computes
        client.prefill(PROMPT, link)
    link.close()
    wait_for(gate.entered.is_set, "the open stage")
    wait_for(lambda: not served.service.streams, "the stream's end")
    gate.release.set()  # the open now completes, on a stream that is gone
    wait_for(gate.left.is_set, "the open's end")
    wait_for(lambda: not served.server.sessions, "the orphaned session dropped", bound=15.0)


def test_a_client_gone_mid_stage_stalls_no_other_stream(served: InProcess, gate: Gate) -> None:
    gate.stage = "qkv"
    victim = RemoteTransport(served.url, served.backend, timeout=2.0)
    with pytest.raises(ServiceError, match="no reply"):
        Client(served.backend, KeySchedule.generate(), SCXConfig(level="paper")).prefill(PROMPT, victim)
    victim.close()
    wait_for(gate.entered.is_set, "the victim's qkv stage")  # it holds the session's lock on a worker
    gate.stage = None
    with RemoteTransport(served.url, served.backend, timeout=10.0) as other:  # served meanwhile
        want = honest_session(served.backend, other)
    assert len(served.server.sessions) == 1  # the victim's, still computing
    gate.release.set()
    wait_for(lambda: not served.server.sessions, "the victim's session dropped once its stage ended")
    with RemoteTransport(served.url, served.backend, timeout=TIMEOUT) as again:
        assert honest_session(served.backend, again) == want


def test_crafted_frames_get_wire_errors_not_internal_errors(served: InProcess) -> None:
    with RemoteTransport(served.url, served.backend, timeout=TIMEOUT) as link:
        client = Client(served.backend, KeySchedule.generate(), SCXConfig(level="paper"))
        client.prefill(PROMPT, link)  # a session open on this stream, for the crafted frames to name
        assert client.state is not None
        sid, seq = client.state.keys.session_id, client.state.seq
        head = {**BASE, "session": sid, "seq": seq}
        cases = {
            "absurd empty array": frame({**head, "arrays": [["x", "<f4", [0, 2**31 - 1, 2**31 - 1]]]}),
            "surrogate token": frame({**head, "token": "\ud800"}),
            "repeated key": frame(json.dumps(head).replace('{"session"', '{"seq":0,"session"', 1).encode()),
            "garbage then a frame": b"\0garbage" + frame(head),
        }
        for name, data in cases.items():
            assert error_of(link._roundtrip(data))[0] == "WireError", name
        with pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED"):  # over max_message_bytes
            link._roundtrip(b"\0" * ((1 << 20) + 4096))
    with RemoteTransport(served.url, served.backend, timeout=TIMEOUT) as honest:
        honest_session(served.backend, honest)
    wait_for(lambda: not served.server.sessions, "the crafted stream's session dropped")


def test_stalled_raw_connections_block_no_one(served: InProcess) -> None:
    stalled = []
    for junk in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01"):
        s = socket.create_connection(("127.0.0.1", served.service.port), timeout=5)
        s.sendall(junk)  # ... and then nothing more
        stalled.append(s)
    try:
        with RemoteTransport(served.url, served.backend, timeout=TIMEOUT) as link:
            honest_session(served.backend, link)
    finally:
        for s in stalled:
            s.close()


# -- the client facing a hostile server -------------------------------------------------------------
class Hostile:
    """A gRPC server speaking the SCX method, answering each frame as ``script(i, data)`` says (a list
    of frames for the i-th frame of its stream); ``received`` keeps the kinds of the frames it got."""

    def __init__(self, script: Callable[[int, bytes], list[bytes]]) -> None:
        self.received: list[int] = []
        self.streams = 0

        def handler(frames: Iterator[bytes], context: Any) -> Iterator[bytes]:
            self.streams += 1
            for i, data in enumerate(frames):
                self.received.append(data[4])
                yield from script(i, data)

        self.server, self.url = grpc_stub(handler, 4)


@pytest.fixture
def backend() -> NumpyBackend:
    return NumpyBackend(tiny_weights(3))


@pytest.fixture
def hostile(backend: NumpyBackend) -> Iterator[Callable[[Callable[[int, bytes], list[bytes]]], Hostile]]:
    made: list[Hostile] = []
    hello = encode_hello(
        {"service": "scx", "fingerprint": model_fingerprint(backend), "wire_dtype": backend.numpy_dtype().str}
    )

    def make(script: Callable[[int, bytes], list[bytes]]) -> Hostile:
        def greeted(i: int, data: bytes) -> list[bytes]:
            return [hello] if data[4] == FrameKind.HELLO else script(i, data)

        h = Hostile(greeted)
        made.append(h)
        return h

    yield make
    for h in made:
        h.server.stop(0)


OPEN = Request("ab" * 16, Stage.OPEN, -1, -1, 0)


def test_a_malformed_greeting_drops_the_stream_so_the_model_check_is_never_skipped(
    backend: NumpyBackend,
) -> None:
    answer = encode_reply(Reply(OPEN.session, Stage.OPEN, -1, -1, 0, {}, {"token": "t" * 20}))
    h = Hostile(lambda i, data: [b"not a frame"] if i == 0 else [answer])
    try:
        with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link:
            for _ in range(3):  # every attempt greets again, and is refused again
                with pytest.raises(ServiceError, match="not an SCX server"):
                    link.send(OPEN)
        assert h.received == [FrameKind.HELLO] * 3  # no request ever left the client
        assert h.streams == 3
    finally:
        h.server.stop(0)


def test_an_absurd_reply_shape_is_a_wire_error(backend: NumpyBackend, hostile: Any) -> None:
    head = {"session": OPEN.session, "stage": "open", "layer": -1, "step": -1, "seq": 0, "meta": {}}
    h = hostile(lambda i, data: [frame({**head, "arrays": [["x", "<f4", [0, 2**31 - 1, 2**31 - 1]]]}, 2)])
    with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link:
        with pytest.raises(WireError, match="spans more than"):
            link.send(OPEN)
        assert link._call is None  # the stream is dropped: the next message greets again


def test_a_reply_for_another_message_is_refused_and_drops_the_stream(
    backend: NumpyBackend, hostile: Any
) -> None:
    def stale(i: int, data: bytes) -> list[bytes]:  # answers each request with the previous one's reply
        req = request_from(decode(data))
        return [encode_reply(Reply(req.session, req.stage, req.layer, req.step, max(req.seq - 1, 0)))]

    h = hostile(stale)
    with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link:
        link.send(OPEN)  # seq 0: its "previous" reply happens to match
        for seq in (1, 2):
            with pytest.raises(IntegrityError, match="the reply answers"):
                link.send(Request(OPEN.session, Stage.QKV, 0, -1, seq, {"x": np.ones((1, 16))}))
            assert link._call is None
    assert h.streams == 2  # the refusal ended the first stream; the next message greeted on a fresh one
    hello, request = FrameKind.HELLO, FrameKind.REQUEST
    assert h.received == [hello, request, request, hello, request]
    bad_error = encode_error("ProtocolError", "for someone else", 41)
    h2 = hostile(lambda i, data: [bad_error])
    with (
        RemoteTransport(h2.url, backend, timeout=TIMEOUT) as link,
        pytest.raises(IntegrityError, match="answers seq 41"),
    ):
        link.send(OPEN)


def test_an_oversize_reply_is_a_service_error(backend: NumpyBackend, hostile: Any) -> None:
    h = hostile(lambda i, data: [b"\0" * (3 << 20)])
    link = RemoteTransport(h.url, backend, timeout=TIMEOUT, max_message_bytes=1 << 20)
    with link, pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED"):
        link.send(OPEN)


class _OddlyBuiltError(SCXError):
    """An SCXError subclass (as a user's code may define) that a message alone cannot build."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def test_an_error_frame_naming_a_class_it_cannot_build_is_a_service_error(
    backend: NumpyBackend, hostile: Any
) -> None:
    h = hostile(lambda i, data: [encode_error("_OddlyBuiltError", "boom", 0)])
    with RemoteTransport(h.url, backend, timeout=TIMEOUT) as link, pytest.raises(ServiceError, match="boom"):
        link.send(OPEN)


# -- the in-process transport facing a malformed server answer -------------------------------------------
class _Answers:
    """An in-process 'server' that answers every request with ``make(request)``."""

    def __init__(self, make: Callable[[Request], Any]) -> None:
        self.make = make

    def handle(self, request: Request) -> Any:
        return self.make(request)


def _echo(q: Request, arrays: Any) -> Reply:
    return Reply(q.session, q.stage, q.layer, q.step, q.seq, arrays, {"token": "t" * 32})


@pytest.mark.parametrize("record_view", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda q: None,
        lambda q: "a reply",
        lambda q: _echo(q, None),
        lambda q: _echo(q, [np.ones(3)]),
        lambda q: _echo(q, {"x": [[1.0], [1.0, 2.0]]}),  # ragged: not an array
    ],
    ids=["none", "string", "arrays None", "arrays a list", "ragged array"],
)
def test_local_transport_leaves_a_malformed_answer_to_the_clients_checks(
    backend: NumpyBackend, make: Callable[[Request], Any], record_view: bool
) -> None:
    from scx_ref.protocol import LocalTransport

    link = LocalTransport(_Answers(make), record_view=record_view)
    client = Client(backend, KeySchedule.generate(), SCXConfig(level="paper"))
    with pytest.raises(IntegrityError):
        client.prefill(PROMPT, link)
    assert link.view.replies == []  # nothing malformed was recorded as the server's answer


@pytest.mark.parametrize("token", ["\ud800", "é" * 16])
def test_an_in_process_token_that_is_not_ascii_is_a_protocol_error(token: str) -> None:
    """A session token is ASCII (``secrets.token_urlsafe``); one that is not — a lone surrogate could not
    even be encoded for the constant-time comparison — is refused as malformed (no UnicodeEncodeError)."""
    from scx_ref.errors import ProtocolError

    server: Server[Any] = Server(NumpyBackend(tiny_weights(0)))
    with pytest.raises(ProtocolError, match="ASCII"):
        server.handle(Request("ab" * 16, "qkv", 0, -1, 1, {}, {}, token))

"""The server checks and uses one snapshot of each request (DESIGN §5.5: untrusted input is validated before
it changes state; every refusal is a project error with nothing half-updated), ``handle_batch`` is
all-or-nothing against an internal fault, and every eviction reaches the service's metrics once.

- ``Server._parse`` read a request's fields and its ``arrays``/``meta`` mappings again and again (``in``,
  ``[]``, ``get``, iteration), so an in-process object that answers differently on a later read passed the
  checks with one value and was computed with another: a key commitment seen before passed the replay check,
  an array passed the message-size limit small and was computed large, a Request crashed the server with a
  TypeError, and two "distinct" session ids of one session deadlocked a ``handle_batch``.
- ``handle_batch`` handled its non-``gen_mid`` requests one at a time before the rest: an internal fault in
  the third of five requests propagated with the first one committed (its reply lost) and the others not
  handled, so the caller could not tell what had taken effect.
- the service counted the evictions it asked for (a stream's end, the idle sweep) but not those the protocol
  server made itself (an idle session found on access, idle ones evicted to make room for an ``open``).
- a reply too large to send was refused after the server had taken its message: the session had moved past
  a message whose reply its client never got.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import LimitError, ProtocolError, SCXError, SessionError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.limits import ServerLimits
from scx_ref.stages import Stage
from tests.refusals import refused
from tests.server_state import same, session_state
from tests.tiny import tiny_weights

W = tiny_weights(5)
C = W.config
IDS = np.array([3, 1, 4, 1, 5], dtype=np.int64)
N, R1 = 4, 1
OPEN_META: dict[str, Any] = dict(n=N, r1=R1, r2=1, r_lock=1, l_s=1, l_e=1, max_length=8, level="paper")
SEEN = "ab" * 32  # a key commitment the server has seen
FRESH = "cd" * 32


def _sid(i: int) -> str:
    return f"{i:032x}"


def _open(server: Server[Any], sid: str) -> str:
    """Open session ``sid`` (OPEN_META) with plain messages; its token."""
    token = server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META))).meta["token"]
    assert isinstance(token, str)
    return token


def _x(rows: int = N + R1) -> np.ndarray:
    return np.random.default_rng(rows).normal(size=(rows, C.hidden_size))


class _Flip(Mapping[str, Any]):
    """A mapping whose every key answers ``first[key]`` on its first read and ``later[key]`` on every later
    one; it counts the reads of each key and the passes over its keys."""

    def __init__(self, first: dict[str, Any], later: dict[str, Any]) -> None:
        self.first, self.later = first, later
        self.reads: collections.Counter[str] = collections.Counter()
        self.passes = 0

    def __getitem__(self, key: str) -> Any:
        self.reads[key] += 1
        return (self.first if self.reads[key] == 1 else self.later)[key]

    def __iter__(self) -> Iterator[str]:
        self.passes += 1
        return iter(self.first)

    def __len__(self) -> int:
        return len(self.first)


# --- 1. one snapshot of each request ------------------------------------------------------------------------


def test_a_commitment_seen_before_is_refused_whatever_the_meta_answers_later() -> None:
    """A QKV message whose ``meta`` answers a seen key commitment first and a fresh one afterwards: the
    replay check used to read the fresh one (the first read was the presence test), so the replayed
    commitment was accepted. Now the snapshot holds the seen one and the message is refused, the session as
    it was, no commitment left pending."""
    server: Server[Any] = Server(NumpyBackend(W))
    first = _open(server, _sid(1))
    server.handle(Request(_sid(1), Stage.QKV, 0, -1, 1, {"x": _x()}, {"commit": SEEN}, first))
    token = _open(server, _sid(2))
    before = session_state(server, _sid(2))
    meta = _Flip({"commit": SEEN}, {"commit": FRESH})
    with pytest.raises(SessionError, match="key commitment seen before"):
        server.handle(Request(_sid(2), Stage.QKV, 0, -1, 1, {"x": _x()}, meta, token))  # type: ignore[arg-type]
    assert same(session_state(server, _sid(2)), before)
    assert server._pending == set()
    reply = server.handle(Request(_sid(2), Stage.QKV, 0, -1, 1, {"x": _x()}, {"commit": FRESH}, token))
    assert reply.seq == 1 and server.sessions_snapshot(_sid(2))["commits"] == {0: FRESH}


def test_the_array_the_size_limit_saw_is_the_array_computed() -> None:
    """An ``arrays`` mapping answering a small array first and the real rows afterwards: the size limit
    used to see the small one and the stage compute the large one (a message over the limit accepted). Now
    the small one, the only one read, is checked and refused; the same rows sent plainly hit the limit."""
    x = _x()
    server: Server[Any] = Server(NumpyBackend(W), ServerLimits(max_message_bytes=x.nbytes - 1))
    token = _open(server, _sid(1))
    before = session_state(server, _sid(1))
    arrays = _Flip({"x": np.zeros((1, C.hidden_size))}, {"x": x})
    with pytest.raises(SCXError, match=r"qkv\.x"):
        server.handle(Request(_sid(1), Stage.QKV, 0, -1, 1, arrays, {"commit": FRESH}, token))  # type: ignore[arg-type]
    assert arrays.reads["x"] == 1
    assert same(session_state(server, _sid(1)), before) and server.cache_bytes == 0
    with pytest.raises(LimitError, match="exceeds the server's limit"):
        server.handle(Request(_sid(1), Stage.QKV, 0, -1, 1, {"x": x}, {"commit": FRESH}, token))


def test_each_mapping_is_read_once() -> None:
    """An honest QKV message in counting mappings: one pass over each mapping's keys and one read of each
    value (the server read ``commit`` four times, ``x`` three times, and iterated each mapping thrice)."""
    server: Server[Any] = Server(NumpyBackend(W))
    token = _open(server, _sid(1))
    x = _x()
    arrays, meta = _Flip({"x": x}, {"x": x}), _Flip({"commit": FRESH}, {"commit": FRESH})
    reply = server.handle(Request(_sid(1), Stage.QKV, 0, -1, 1, arrays, meta, token))  # type: ignore[arg-type]
    assert isinstance(reply, Reply) and reply.arrays["z"].shape == (N + R1, C.q_dim + 2 * C.kv_dim)
    assert (arrays.passes, dict(arrays.reads)) == (1, {"x": 1})
    assert (meta.passes, dict(meta.reads)) == (1, {"commit": 1})


_FIELDS = frozenset(f.name for f in dataclasses.fields(Request))


@dataclasses.dataclass(frozen=True)
class _OnceRequest(Request):
    """A Request whose fields answer their value on their first read and None on every later one."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in _FIELDS:
            seen: set[str] = object.__getattribute__(self, "__dict__").setdefault("_seen", set())
            if name in seen:
                return None
            seen.add(name)
        return value


def test_a_request_is_read_field_by_field_once() -> None:
    """A Request whose fields answer None after their first read: the server used to read the session id
    again to measure it and failed with a TypeError (no project error); now it opens the session and takes
    its QKV message as their first answers say."""
    server: Server[Any] = Server(NumpyBackend(W))
    opened = server.handle(_OnceRequest(_sid(1), Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META)))
    token = opened.meta["token"]
    assert opened.session == _sid(1) and set(server.sessions) == {_sid(1)}
    reply = server.handle(_OnceRequest(_sid(1), Stage.QKV, 0, -1, 1, {"x": _x()}, {"commit": FRESH}, token))
    assert (reply.session, reply.stage, reply.seq) == (_sid(1), Stage.QKV, 1)
    assert server.sessions_snapshot(_sid(1))["commits"] == {0: FRESH}


class _Alias(str):
    """A session id equal to the plain string it spells, never to another _Alias: a set keeps two of them."""

    def __eq__(self, other: object) -> bool:
        return not isinstance(other, _Alias) and str.__eq__(self, other)

    def __hash__(self) -> int:
        return str.__hash__(self)


def _shared(n: int, batch_rows: int = 1) -> tuple[Server[Any], list[Client[Any]]]:
    """A server with ``n`` sessions after their prefill and key sharing (l_s = l_e = 1: middle 1, 2)."""
    server: Server[Any] = Server(NumpyBackend(W), batch_rows=batch_rows)
    clients = []
    for i in range(n):
        scx = SCXConfig(level="paper", r1=R1, r2=1, r_lock=1, l_s=1, l_e=1, max_length=8)
        client: Client[Any] = Client(NumpyBackend(W), KeySchedule(bytes(range(32)), bytes([i + 1]) * 16), scx)
        link = LocalTransport(server)
        client.prefill(IDS[: 3 + i % 2], link)
        client.share_keys(link)
        clients.append(client)
    return server, clients


def _msg(client: Client[Any], stage: Stage, **arrays: Any) -> Request:
    """``client``'s next message: gen_qkv of block 0 or gen_mid of step 0 (row ``x``), or close."""
    st = client.state
    assert st is not None
    if stage is Stage.CLOSE:
        return Request(st.keys.session_id, stage, -1, -1, st.seq, {}, {}, st.token)
    layer = 0 if stage is Stage.GEN_QKV else 1
    return Request(st.keys.session_id, stage, layer, 0, st.seq, arrays, {}, st.token)


def test_two_ids_of_one_session_in_a_batch_are_refused_not_deadlocked() -> None:
    """Two gen_mid messages of one session whose ids are str subclasses a set tells apart: the duplicate
    check used to pass and the batch then waited for ever on the session lock it already held. Now the
    check runs on the parsed (plain string) ids: ProtocolError, nothing changed."""
    server, (client,) = _shared(1)
    row = _x(1)
    one = _msg(client, Stage.GEN_MID, x=row)
    reqs = [dataclasses.replace(one, session=_Alias(one.session)) for _ in range(2)]
    before = session_state(server, one.session)
    out: list[Any] = []

    def run() -> None:
        try:
            server.handle_batch(reqs)
        except SCXError as exc:
            out.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "handle_batch deadlocked on a session lock it held"
    assert len(out) == 1 and isinstance(out[0], ProtocolError)
    assert str(out[0]) == "handle_batch takes at most one message per session"
    assert same(session_state(server, one.session), before)
    assert isinstance(server.handle_batch([one])[0], Reply)


class _Short(list[Any]):
    """A list that says it is one item long, whatever it holds."""

    def __len__(self) -> int:
        return 1


def test_a_batch_is_read_once() -> None:
    """A batch whose length disagrees with its items: the server sized its answers by ``len`` and then
    walked the items, so the second request was computed and committed and its answer failed with an
    IndexError. Now the batch is read once and each request answered."""
    server, clients = _shared(2)
    reqs = [_msg(c, Stage.GEN_QKV, x=_x(1)) for c in clients]
    out = server.handle_batch(_Short(reqs))
    assert [type(r) for r in out] == [Reply, Reply]
    assert [server.sessions[r.session].seq for r in reqs] == [r.seq + 1 for r in reqs]


# --- 2. handle_batch: all-or-nothing against an internal fault ---------------------------------------------


def _batch(server: Server[Any], clients: list[Client[Any]]) -> list[Request]:
    """Five requests of five distinct sessions: gen_qkv, gen_mid, gen_qkv, open (a new session), close."""
    a, b, c, e = clients
    return [
        _msg(a, Stage.GEN_QKV, x=_x(1)),
        _msg(b, Stage.GEN_MID, x=_x(1)),
        _msg(c, Stage.GEN_QKV, x=_x(1)),
        Request(_sid(99), Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META)),
        _msg(e, Stage.CLOSE),
    ]


@pytest.mark.parametrize(
    "where", ["third request's stage", "gen_mid group"], ids=["third-stage", "gen-mid-group"]
)
def test_an_internal_fault_in_a_batch_leaves_every_request_untaken(where: str) -> None:
    """The third of five requests failing inside its stage (after it charged the flop meter), or the
    gen_mid group failing: the fault propagates and no request took effect — every session as it was (seq,
    caches, flop meter), the byte total the sessions' own, the session to close still open, the session to
    open not opened (its nonce not spent). The first request used to have committed with its reply lost,
    and the later ones not to have been handled. The same batch then goes through."""
    server, clients = _shared(4)
    reqs = _batch(server, clients)
    victim = reqs[2].session
    before = {r.session: session_state(server, r.session) for r in reqs if r.stage is not Stage.OPEN}
    total = server.cache_bytes
    real_qkv, real_mid = server._gen_qkv, server._mid_compute
    faults = [0]

    def gen_qkv(s: Any, req: Request) -> Any:
        out = real_qkv(s, req)
        if req.session == victim:
            faults[0] += 1
            raise RuntimeError("internal fault")
        return out

    def mid_compute(items: Any) -> Any:
        real_mid(items)
        faults[0] += 1
        raise RuntimeError("internal fault")

    if where == "gen_mid group":
        server._mid_compute = mid_compute  # type: ignore[method-assign]
    else:
        server._gen_qkv = gen_qkv  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"^internal fault$"):
        server.handle_batch(reqs)
    assert faults[0] == 1
    for sid, b in before.items():
        assert same(session_state(server, sid), b), f"session {sid} changed"
    assert server.cache_bytes == total == sum(s.cache_bytes for s in server.sessions.values())
    assert _sid(99) not in server.sessions and server.evictions == 0
    server._gen_qkv, server._mid_compute = real_qkv, real_mid  # type: ignore[method-assign]
    out = server.handle_batch(reqs)
    assert all(isinstance(r, Reply) for r in out), out
    assert [r.stage for r in out if isinstance(r, Reply)] == [r.stage for r in reqs]
    for r in reqs[:3]:
        assert server.sessions[r.session].seq == r.seq + 1
    assert reqs[4].session not in server.sessions and _sid(99) in server.sessions


def test_refusals_in_a_batch_are_per_request() -> None:
    """A refused request (a wrong seq) among good ones: it gets its error and changes nothing, the others
    their replies, as before."""
    server, clients = _shared(4)
    reqs = _batch(server, clients)
    reqs[2] = dataclasses.replace(reqs[2], seq=reqs[2].seq + 3)
    before = session_state(server, reqs[2].session)
    out = server.handle_batch(reqs)
    assert isinstance(out[2], ProtocolError) and "out of order" in str(out[2])
    assert all(isinstance(r, Reply) for i, r in enumerate(out) if i != 2)
    assert same(session_state(server, reqs[2].session), before)


# --- 3. every eviction is counted, once --------------------------------------------------------------------


def test_every_eviction_reaches_the_metrics_once() -> None:
    """An idle session evicted on access, two evicted to make room for an ``open``, one dropped when its
    stream ends, one by the idle sweep: five in ``scx_sessions_evicted_total`` (the service used to count only
    the last two); a session its client closed is not an eviction."""
    pytest.importorskip("prometheus_client")
    from scx_ref.service.service import SCXService, ServeOptions, _Stream

    now = [0.0]
    server: Server[Any] = Server(
        NumpyBackend(W), ServerLimits(max_sessions=2, idle_ttl=10.0), clock=lambda: now[0]
    )
    service = SCXService(server, ServeOptions(port=0, ops_port=None, idle_timeout=1.0))
    try:
        closed = _open(server, _sid(9))
        server.handle(Request(_sid(9), Stage.CLOSE, -1, -1, 1, {}, {}, closed))
        token = _open(server, _sid(1))
        _open(server, _sid(2))
        now[0] = 100.0
        with pytest.raises(SessionError):  # idle past the TTL: evicted on access
            server.handle(Request(_sid(1), Stage.CLOSE, -1, -1, 1, {}, {}, token))
        _open(server, _sid(3))
        now[0] = 200.0
        _open(server, _sid(4))  # the table is full of idle sessions: both evicted to make room
        assert set(server.sessions) == {_sid(4)}
        stream = _Stream("ipv4:127.0.0.1:5000")
        stream.sessions.add(_sid(4))
        service._evict(stream, "stream ended")  # dropped by the service
        _open(server, _sid(5))
        now[0] = 300.0

        async def one_sweep() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(service._idle_loop(), 1.5)  # sweeps every 0.5 s

        asyncio.run(one_sweep())
        assert server.sessions == {}
        text = service.metrics.text().decode()
        assert "scx_sessions_evicted_total 5.0" in text.splitlines(), text
        assert server.evictions == 5
    finally:
        service.pool.shutdown()


# --- 4. a reply too large to send ends its session ---------------------------------------------------------


def test_a_reply_too_large_to_send_ends_its_session() -> None:
    """A QKV message whose reply exceeds the service's frame limit: the server had taken it (seq, raw cache,
    commitment) and the client got an error — a session moved past a message its client never saw the
    reply of. Now the session ends with the refusal: its caches freed, the error saying so."""
    pytest.importorskip("prometheus_client")
    from scx_ref.service.codec import FrameKind, decode
    from scx_ref.service.service import SCXService, ServeOptions, _Stream

    server: Server[Any] = Server(NumpyBackend(W))
    service = SCXService(server, ServeOptions(port=0, ops_port=None, max_message_bytes=400))
    try:
        token = _open(server, _sid(1))
        stream = _Stream("ipv4:127.0.0.1:5000")
        stream.sessions.add(_sid(1))
        stream.busy = 1
        req = Request(_sid(1), Stage.QKV, 0, -1, 1, {"x": _x()}, {"commit": FRESH}, token)
        frame = decode(service._compute(req, stream))
        assert server.sessions == {} and server.cache_bytes == 0 and stream.busy == 0
        assert frame.kind is FrameKind.ERROR and frame.header["error"] == "ServiceError"
        assert "exceeds max_message_bytes" in frame.header["message"]
        assert "session closed" in frame.header["message"]
    finally:
        service.pool.shutdown()


class _Sly(str):
    """A str whose ``str()`` answers another commitment than its characters (and which counts its calls)."""

    calls = 0

    def __str__(self) -> str:
        _Sly.calls += 1
        return SEEN


def test_a_meta_string_of_a_str_subclass_is_read_as_its_characters() -> None:
    """A ``meta`` value of a str subclass is copied into a plain ``str`` of its characters when the message
    is read: the session records the commitment the characters spell, and the subclass's own methods are
    never called (a value left as it came would answer ``str()`` with another commitment later)."""
    server: Server[Any] = Server(NumpyBackend(W))
    token = _open(server, _sid(1))
    _Sly.calls = 0
    reply = server.handle(Request(_sid(1), Stage.QKV, 0, -1, 1, {"x": _x()}, {"commit": _Sly(FRESH)}, token))
    assert reply.seq == 1
    commits = server.sessions_snapshot(_sid(1))["commits"]
    assert commits == {0: FRESH} and type(commits[0]) is str
    assert _Sly.calls == 0


class _Unreadable(Mapping[str, Any]):
    """A mapping whose every read raises."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("no")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("no")

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("field", ["arrays", "meta"])
def test_a_mapping_that_cannot_be_read_is_refused_by_name(field: str) -> None:
    server: Server[Any] = Server(NumpyBackend(W))
    token = _open(server, _sid(1))
    arrays: Any = {"x": _x()}
    meta: Any = {"commit": FRESH}
    if field == "arrays":
        arrays = _Unreadable()
    else:
        meta = _Unreadable()
    before = session_state(server, _sid(1))
    with refused(ProtocolError, f"{field} could not be read as a mapping (RuntimeError)"):
        server.handle(Request(_sid(1), Stage.QKV, 0, -1, 1, arrays, meta, token))
    assert same(session_state(server, _sid(1)), before)

"""``Server.handle_batch`` with ``open`` and ``close`` messages beside the stages, and every way a request can
be refused in a batch (DESIGN §5.5–5.7).

A batch answers each request in its own slot — a reply, or the SCXError :meth:`Server.handle` raises for it —
whatever else the batch holds: a ``close`` that sorts before the other sessions ends only its own session, and
a request refused while it is parsed, located, admitted, computed or registered takes only its own slot and
changes nothing. The batch reads the clock once, before its first change, and stamps every session it changed
(the ``open``'s new one included) with that one reading; an ``open`` that finds the server full judges the
idle sessions at its own reading too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import LimitError, ProtocolError, SCXError, SessionError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.limits import ServerLimits
from scx_ref.stages import Stage
from tests.server_state import frozen, session_state
from tests.tiny import tiny_weights

W = tiny_weights(5)
IDS = np.array([7, 3, 21, 9, 14, 2], dtype=np.int64)
CFG = SCXConfig(level="paper", r1=2, r2=1, l_s=1, l_e=1, max_length=12)


class Ticks:
    """A clock that moves on by one second at every reading, so two readings never agree."""

    def __init__(self, start: float = 100.0) -> None:
        self.t = start
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        self.t += 1.0
        return self.t


class Capture(LocalTransport):
    """A link that keeps every request it carried."""

    def __init__(self, server: Server[Any]) -> None:
        super().__init__(server)
        self.sent: list[Request] = []

    def send(self, request: Request) -> Reply:
        self.sent.append(request)
        return super().send(request)


def _keys(nonce: int) -> KeySchedule:
    """Keys whose session id is ``nonce`` in hex: the batch's sorting order is chosen by the test."""
    return KeySchedule(bytes([nonce % 250 + 1]) * 32, nonce.to_bytes(16, "big"))


def _client(server: Server[Any], nonce: int, share: bool = True) -> tuple[Client[Any], Capture]:
    """A client with a prefilled session on ``server`` (its middle block's key shared unless ``share`` is
    false) and the link that carried its messages."""
    client: Client[Any] = Client(NumpyBackend(W), _keys(nonce), CFG)
    link = Capture(server)
    client.prefill(IDS, link)
    if share:
        client.share_keys(link)
    return client, link


def _next(
    client: Client[Any], stage: Stage, layer: int, step: int, arrays: dict[str, Any], **meta: Any
) -> Request:
    """The request ``client``'s session would send next, with these fields."""
    st = client.state
    assert st is not None
    return Request(st.keys.session_id, stage, layer, step, st.seq, arrays, meta, st.token)


def _open_request(nonce: int) -> Request:
    """The ``open`` message of a client with keys ``_keys(nonce)`` (carried to a scratch server)."""
    _, link = _client(Server(NumpyBackend(W)), nonce, share=False)
    assert link.sent[0].stage is Stage.OPEN
    return link.sent[0]


def _refusal(server: Server[Any], req: Any) -> tuple[type[SCXError], str]:
    """What :meth:`Server.handle` raises for ``req`` (it must refuse it)."""
    with pytest.raises(SCXError) as info:
        server.handle(req)
    return type(info.value), str(info.value)


def test_every_slot_of_a_batch_gets_its_own_answer() -> None:
    clock = Ticks()
    server: Server[Any] = Server(NumpyBackend(W), clock=clock, batch_rows=2)
    x = np.random.default_rng(0).normal(size=(1, W.config.hidden_size))
    # nonce 1 sorts first: the close is checked before every other session's request
    closing, _ = _client(server, 1)
    mid_a, _ = _client(server, 2)
    mid_b, _ = _client(server, 3)
    late, _ = _client(server, 4)
    unshared, _ = _client(server, 5, share=False)
    replayed = _open_request(6)
    assert server.handle(replayed).stage is Stage.OPEN  # its nonce is now seen
    fresh = _open_request(7)
    stranger = Request("9" * 32, Stage.CLOSE, -1, -1, 0, {}, {}, "t" * 43)
    wrong_seq = replace(
        _next(late, Stage.GEN_MID, CFG.l_s, 0, {"x": x}), seq=_next(late, Stage.CLOSE, -1, -1, {}).seq + 1
    )
    rows = len(IDS) + CFG.r1
    bad_share = _next(unshared, Stage.SHARE, CFG.l_s, -1, {"perm": np.arange(rows)}, salt="ab" * 32)
    batch: list[Any] = [
        _next(mid_a, Stage.GEN_MID, CFG.l_s, 0, {"x": x}),
        "not a request",
        _next(closing, Stage.CLOSE, -1, -1, {}),
        _next(mid_b, Stage.GEN_MID, CFG.l_s, 0, {"x": x}),
        stranger,
        wrong_seq,
        bad_share,
        fresh,
        replayed,
    ]
    ids = {"close": batch[2].session, "late": wrong_seq.session, "unshared": bad_share.session}
    close_seq = batch[2].seq
    before = {sid: frozen(session_state(server, sid)) for sid in (ids["late"], ids["unshared"])}
    charged = server.cost(ids["unshared"]).snapshot()

    out = server.handle_batch(batch)

    assert len(out) == len(batch)
    # the stages: answered, each session one further on
    for j in (0, 3):
        got = out[j]
        assert isinstance(got, Reply) and got.stage is Stage.GEN_MID and got.seq == batch[j].seq
        assert server.sessions[batch[j].session].seq == batch[j].seq + 1
    # the close: its reply is handle's, field for field, and its session is gone
    assert out[2] == Reply(ids["close"], Stage.CLOSE, -1, -1, close_seq, {}, {})
    assert isinstance(out[2], Reply) and out[2].arrays == {} and type(out[2].layer) is int
    assert ids["close"] not in server.sessions
    # the open: a new session, with its token
    opened = out[7]
    assert isinstance(opened, Reply) and opened.stage is Stage.OPEN and opened.session == fresh.session
    assert isinstance(opened.meta.get("token"), str) and fresh.session in server.sessions
    # every refusal in its slot, the error handle() raises for the same request, and nothing changed
    for j, kind in [
        (1, ProtocolError),
        (4, SessionError),
        (5, ProtocolError),
        (6, SessionError),
        (8, SessionError),
    ]:
        got = out[j]
        assert isinstance(got, kind), (j, got)
        assert (type(got), str(got)) == _refusal(server, batch[j]), j
    assert "commitment" in str(out[6]) and "out of order" in str(out[5]) and "nonce" in str(out[8])
    assert {sid: frozen(session_state(server, sid)) for sid in before} == before
    assert server.cost(ids["unshared"]).snapshot() == charged  # the refused share's charge taken back
    assert server.cache_bytes == sum(s.cache_bytes for s in server.sessions.values())
    # one clock reading stamps every session the batch changed, the opened one included
    stamps = {server.sessions[sid].last_used for sid in (batch[0].session, batch[3].session, fresh.session)}
    assert len(stamps) == 1 and isinstance(stamps.pop(), float)


def test_a_batch_refuses_what_is_not_a_sequence_naming_its_type() -> None:
    server: Server[Any] = Server(NumpyBackend(W))
    with pytest.raises(ProtocolError) as info:
        server.handle_batch(5)  # type: ignore[arg-type]
    assert str(info.value) == "handle_batch takes a sequence of requests, got int"


@pytest.mark.parametrize("batched", [False, True], ids=["handle", "handle_batch"])
def test_an_open_on_a_full_server_judges_idle_sessions_at_its_own_reading(batched: bool) -> None:
    """An idle session exactly at its TTL at the open's reading is not evicted, though the clock has moved
    on past it by the time the open is registered: the decision is made at the one reading the open took."""
    clock = Ticks()
    server: Server[Any] = Server(NumpyBackend(W), ServerLimits(max_sessions=1, idle_ttl=1.0), clock=clock)
    first = _open_request(11)
    assert server.handle(first).stage is Stage.OPEN  # stamped at the clock's reading 101
    assert server.sessions[first.session].last_used == 101.0
    late = _open_request(12)  # its reading is 102: the first session idle for exactly its TTL
    if batched:
        (got,) = server.handle_batch([late])
        assert isinstance(got, LimitError)
    else:
        with pytest.raises(LimitError):
            server.handle(late)
    assert list(server.sessions) == [first.session] and clock.t == 102.0


def test_drop_is_false_for_what_is_not_an_open_session() -> None:
    """:meth:`Server.drop` (the service's call when a connection ends) says False, and counts no eviction,
    for a session id that is not a string, one never opened, and one already dropped."""
    server: Server[Any] = Server(NumpyBackend(W))
    assert server.drop(5) is False  # type: ignore[arg-type]
    assert server.drop("9" * 32) is False
    opened = _open_request(21)
    server.handle(opened)
    assert server.drop(opened.session) is True
    assert server.drop(opened.session) is False
    assert server.sessions == {} and server.evictions == 1

"""The server's limits and field checks (DESIGN §5.5, issue 12): every limit is configurable with a safe
default; an over-limit or malformed request gets a clear project error and changes nothing — no session,
cache, counter or memory. Controls: the same request passes under a larger limit (the limit is what stops
it), and an accepted message does change the state (so "unchanged" can fail).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ConfigError, DTypeError, LimitError, ProtocolError, SCXError, SessionError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Request, SCXConfig, Server
from scx_ref.protocol.limits import ServerLimits
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_weights

IDS = np.array([3, 1, 4, 1, 5, 9], dtype=np.int64)
N = len(IDS)
OPEN_META: dict[str, Any] = dict(n=N, r1=2, r2=1, r_lock=2, l_s=1, l_e=1, max_length=12, level="paper")


def weights(moe: bool = False) -> ModelWeights:
    return tiny_weights(2, moe=moe)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(server: Server[Any]) -> tuple[Any, ...]:
    """Everything a refused request must leave alone."""
    snaps = {sid: server.sessions_snapshot(sid) for sid in server.sessions}
    return (
        sorted(server.sessions),
        repr(snaps),
        server.cache_bytes,
        list(server._nonces),
        list(server._commits),
    )


def refused(
    server: Server[Any], req: Any, error: type[SCXError] = ProtocolError, match: str | None = None
) -> None:
    before = state(server)
    with pytest.raises(error, match=match):
        server.handle(req)
    assert state(server) == before, "a refused request changed the server"


def open_req(**meta: Any) -> Request:
    return Request(KeySchedule.new_nonce().hex(), Stage.OPEN, -1, -1, 0, {}, {**OPEN_META, **meta})


def test_limits_are_validated_and_have_defaults() -> None:
    lim = ServerLimits()
    assert lim.max_sessions >= 1 and lim.max_cache_bytes >= 1 << 20 and lim.idle_ttl > 0
    for bad in (dict(max_sessions=0), dict(max_rows=True), dict(idle_ttl=math.inf), dict(max_decoys=2.5)):
        with pytest.raises(ConfigError):
            ServerLimits(**bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        Server(NumpyBackend(weights()), limits="none")  # type: ignore[arg-type]


def test_sessions_per_server() -> None:
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b, ServerLimits(max_sessions=2))
    clients = [Client(b, KeySchedule.generate(), SCXConfig()) for _ in range(3)]
    for c in clients[:2]:
        c.prefill(IDS, LocalTransport(server))
    refused(server, open_req(), LimitError, "limit of 2 sessions")
    with pytest.raises(LimitError):
        clients[2].prefill(IDS, LocalTransport(server))
    clients[0].close()
    clients[2] = Client(b, KeySchedule.generate(), SCXConfig())
    clients[2].prefill(IDS, LocalTransport(server))  # a closed session makes room
    assert len(server.sessions) == 2


def test_idle_sessions_are_evicted() -> None:
    b = NumpyBackend(weights())
    clock = Clock()
    server: Server[Any] = Server(b, ServerLimits(max_sessions=1, idle_ttl=60.0), clock=clock)
    link = LocalTransport(server)
    idle: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig())
    idle.prefill(IDS, link)
    assert server.cache_bytes > 0
    refused(server, open_req(), LimitError)  # not idle long enough
    clock.now += 61.0
    fresh: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig())
    fresh.prefill(IDS, link)  # the idle session is evicted to make room
    assert set(server.sessions) == {fresh.session}
    with pytest.raises(SessionError, match="unknown session or invalid session token"):
        idle.decode(1, link)  # the evicted session is gone, like a closed one
    clock.now += 61.0
    assert server.evict_idle() == 1 and server.sessions == {} and server.cache_bytes == 0


def test_rows_decoys_and_bytes_per_message() -> None:
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b, ServerLimits(max_rows=20, max_decoys=4, max_message_bytes=1024))
    refused(server, open_req(r1=5), LimitError, "decoy rows")
    refused(server, open_req(r_lock=10**9), LimitError, "decoy rows")
    refused(server, open_req(max_length=18, r1=3), LimitError, "rows exceeds")
    server.handle(open_req(max_length=16, r1=4))  # control: within the limits
    big = Server(b, ServerLimits(max_message_bytes=1024))
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(r1=2))
    with pytest.raises(LimitError, match="1536 bytes"):
        client.prefill(IDS, LocalTransport(big))
    # the open and block 1's QKV message (8 rows × 16 × 8 = 1024 bytes) passed; the attention message
    # (q, k, v: 1536 bytes) was refused and changed nothing
    assert [(s.seq, list(s.raw)) for s in big.sessions.values()] == [(2, [0])]


def test_total_cache_bytes() -> None:
    b = NumpyBackend(weights())
    one: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(r1=2))
    probe: Server[Any] = Server(b)
    one.prefill(IDS, LocalTransport(probe))
    need = probe.cache_bytes  # one prefilled session's caches
    assert need > 0
    server: Server[Any] = Server(b, ServerLimits(max_cache_bytes=need + need // 2))
    link = LocalTransport(server)
    a: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(r1=2))
    a.prefill(IDS, link)
    second: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(r1=2))
    with pytest.raises(LimitError, match="caches would exceed"):
        second.prefill(IDS, link)
    assert server.cache_bytes <= need + need // 2
    a.close()
    assert server.cache_bytes == sum(s.cache_bytes for s in server.sessions.values())
    third: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(r1=2))
    assert third.generate(IDS, 3, link)  # room again
    for sid in list(server.sessions):
        server._close(sid, server.sessions[sid])
    assert server.cache_bytes == 0


def test_nonce_memory_is_bounded() -> None:
    """Control of the nonce memory: a nonce is refused while remembered, and the memory is bounded."""
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b, ServerLimits(nonce_memory=2))
    first = open_req()
    server.handle(first)
    refused(server, first, SessionError, "nonce")
    for _ in range(2):
        server.handle(open_req())
    server._close(first.session, server.sessions[first.session])
    server.handle(first)  # forgotten after 2 newer nonces: the documented bound


# -- field checks ------------------------------------------------------------------------------------
BAD_OPEN: list[tuple[str, dict[str, Any]]] = [
    ("r1 a bool", dict(r1=True)),
    ("n a float", dict(n=2.9)),
    ("n a string", dict(n="5")),
    ("n infinite", dict(n=math.inf)),
    ("n zero", dict(n=0)),
    ("an unknown level", dict(level="bogus")),
    ("level not a string", dict(level=1)),
    ("max_length below n", dict(max_length=3)),
    ("max_length past the model", dict(max_length=10**6)),
    ("l_s zero", dict(l_s=0)),
    ("an unknown field", dict(color="red")),
]


@pytest.mark.parametrize(("what", "meta"), BAD_OPEN, ids=[b[0] for b in BAD_OPEN])
def test_open_fields_are_typed_and_ranged(what: str, meta: dict[str, Any]) -> None:
    server: Server[Any] = Server(NumpyBackend(weights()))
    refused(server, open_req(**meta))
    server.handle(open_req())  # control: the defaults open


def test_open_lacking_a_field() -> None:
    server: Server[Any] = Server(NumpyBackend(weights()))
    req = open_req()
    refused(server, replace(req, meta={k: v for k, v in req.meta.items() if k != "level"}), match="lacks")


@pytest.fixture
def live() -> tuple[Server[Any], Client[Any], LocalTransport]:
    w = weights(moe=True)
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="blind", r1=2, r2=1))
    logits = client.prefill(IDS, link)
    client.decode(int(np.argmax(logits[-1])), link)
    return server, client, link


def test_request_fields_are_typed(live: tuple[Server[Any], Client[Any], LocalTransport]) -> None:
    server, client, _ = live
    st = client.state
    assert st is not None
    good = Request(client.session, Stage.GEN_QKV, 0, 1, st.seq, {"x": np.zeros((1, 16))}, {}, st.token)
    bad: dict[str, Any] = {
        "session ''": replace(good, session=""),
        "session 'x'": replace(good, session="x"),
        "session upper-case hex": replace(good, session=client.session.upper()),
        "session not a string": replace(good, session=12),
        "arrays None": replace(good, arrays=None),
        "meta None": replace(good, meta=None),
        "array keys not strings": replace(good, arrays={1: np.zeros((1, 16))}),
        "layer 999": replace(good, layer=999),
        "layer -2": replace(good, layer=-2),
        "layer 0.0": replace(good, layer=0.0),
        "layer True": replace(good, layer=True),
        "step 1.5": replace(good, step=1.5),
        "seq -1": replace(good, seq=-1),
        "token None": replace(good, token=None),
        "stage bogus": replace(good, stage="bogus"),
        "stage gen_head (client-only)": replace(good, stage=Stage.GEN_HEAD),
        "not a Request": {"session": client.session},
    }
    for what, req in bad.items():
        before = state(server)
        with pytest.raises(ProtocolError):
            server.handle(req)
        assert state(server) == before, what


def test_layers_outside_their_role(live: tuple[Server[Any], Client[Any], LocalTransport]) -> None:
    """gen_ffn* on a middle block or past the model, negative layers: refused (no index wrap-around)."""
    server, client, _ = live
    st = client.state
    assert st is not None
    x = {"x": np.zeros((1, 16))}
    for stage, layer in (
        (Stage.GEN_ROUTER, 1),
        (Stage.GEN_ROUTER, 4),
        (Stage.GEN_ROUTER, -1),
        (Stage.GEN_MID, 2),
    ):
        refused(server, Request(client.session, stage, layer, 1, st.seq, x, {}, st.token))


BAD_EXPERTS: list[tuple[str, Any]] = [
    ("4000 repeats (the memory amplification)", [0] * 4000),
    ("a repeat", [1, 1]),
    ("unsorted", [1, 0]),
    ("more than top_k", [0, 1, 2]),
    ("out of range", [4]),
    ("negative", [-1]),
    ("empty", []),
    ("a bool", [True]),
    ("a float", [0.0]),
    ("a string", "0"),
]


@pytest.mark.parametrize(("what", "experts"), BAD_EXPERTS, ids=[b[0] for b in BAD_EXPERTS])
def test_experts_are_a_sorted_distinct_subset(
    live: tuple[Server[Any], Client[Any], LocalTransport], what: str, experts: Any
) -> None:
    server, client, _ = live
    st = client.state
    assert st is not None
    req = Request(
        client.session,
        Stage.GEN_FFN_UP,
        0,
        1,
        st.seq,
        {"x": np.zeros((1, 16))},
        {"experts": experts},
        st.token,
    )
    refused(server, req)
    before = st.seq
    server.handle(replace(req, meta={"experts": [2]}))  # control: one expert is accepted
    assert server.sessions[client.session].seq == before + 1


def test_meta_fields_are_typed(live: tuple[Server[Any], Client[Any], LocalTransport]) -> None:
    server, client, _ = live
    st = client.state
    assert st is not None
    x = {"x": np.zeros((1, 16))}
    for meta in (
        {"normalized": 1},
        {"normalized": "yes"},
        {"normalized": False, "experts": [0]},
        {"spy": 1},
        {"experts": [0], "trace": True},
    ):
        refused(server, Request(client.session, Stage.GEN_FFN_UP, 0, 1, st.seq, x, meta, st.token))
    refused(
        server,
        Request(
            client.session,
            Stage.GEN_FFN_UP,
            0,
            1,
            st.seq,
            {"x": np.zeros((1, 16)), "m": x["x"]},
            {"experts": [0]},
            st.token,
        ),
    )


def test_a_meta_device_tensor_is_a_project_error() -> None:
    b = TorchBackend(weights(), torch.float64)
    server: Server[Any] = Server(b)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="permute"))
    link = LocalTransport(server)
    logits = client.prefill(IDS, link)
    client.decode(int(np.argmax(logits[-1])), link)
    st = client.state
    assert st is not None
    x = torch.empty((1, 16), device="meta", dtype=torch.float64)
    refused(server, Request(client.session, Stage.GEN_QKV, 0, 1, st.seq, {"x": x}, {}, st.token), DTypeError)


def test_client_side_bad_inputs_send_nothing() -> None:
    """generate with a bad n_new, a prompt that cannot fit, or bad ids: an error before any message."""
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(max_length=10))
    for n_new in (-5, 2.5, True, "3"):
        with pytest.raises(ProtocolError, match="n_new"):
            client.generate(IDS, n_new, link)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="max_length"):
        client.generate(IDS, 10**6, link)
    assert client.generate(IDS, 0, link) == []
    for ids in ([[1, 2], [3]], [], [1.5, 2.0], [[1, 2]]):
        with pytest.raises(SCXError):
            client.generate(ids, 2, link)
    assert link.meter.stages == {} and server.sessions == {}
    for bad in ("x", None):
        with pytest.raises(ProtocolError):
            Client(b, bad, SCXConfig())  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SCXConfig(r1=True)  # type: ignore[arg-type]

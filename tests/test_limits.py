"""The server's limits and field checks (DESIGN §5.5, issue 12): every limit is configurable with a safe
default; an over-limit or malformed request gets a clear project error and changes nothing — no session,
cache, counter or memory. Controls: the same request passes under a larger limit (the limit is what stops
it), and an accepted message does change the state (so "unchanged" can fail).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ConfigError, DTypeError, LimitError, ProtocolError, SCXError, SessionError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.limits import ServerLimits
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.server_state import server_state
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


def refused(
    server: Server[Any], req: Any, error: type[SCXError] = ProtocolError, match: str | None = None
) -> None:
    before = server_state(server)
    with pytest.raises(error, match=match):
        server.handle(req)
    assert server_state(server) == before, "a refused request changed the server"


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
        before = server_state(server)
        with pytest.raises(ProtocolError):
            server.handle(req)
        assert server_state(server) == before, what


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


# -- the server's arguments, sessions driven by hand, the message-size count ------------------------------
NO_SESSION = "^unknown session or invalid session token$"
#: The rows of block 0's QKV stage of a session opened with OPEN_META (n + r1 = 8 rows of width 16).
QKV_ROWS = np.random.default_rng(7).normal(size=(N + 2, 16))


def commit_hex(i: int) -> str:
    """A key commitment (64 lowercase hex digits), distinct for each ``i``."""
    return format(i, "064x")


def opened(server: Server[Any]) -> tuple[str, str]:
    """Open a session by hand (OPEN_META); its id and token."""
    reply = server.handle(open_req())
    return reply.session, str(reply.meta["token"])


def qkv(session: str, token: str, commit: str, layer: int = 0, seq: int = 1) -> Request:
    """A QKV message of block ``layer`` of a session opened with OPEN_META."""
    return Request(session, Stage.QKV, layer, -1, seq, {"x": QKV_ROWS}, {"commit": commit}, token)


class Edited(LocalTransport):
    """An in-process link that passes each request through ``edit`` on its way to the server."""

    def __init__(self, server: Server[Any], edit: Callable[[Request], Request]) -> None:
        super().__init__(server)
        self.edit = edit

    def send(self, request: Request) -> Reply:
        return super().send(self.edit(request))


@pytest.mark.parametrize("bad", [True, 0, -3, 2.5, "2", None], ids=repr)
def test_server_arguments_are_checked(bad: Any) -> None:
    b = NumpyBackend(weights())
    # the shared integer check's messages: the type, else the bound
    want = (
        f"be an integer, got {type(bad).__name__} "
        if not isinstance(bad, int) or bad is True
        else "be >= 1, got "
    )
    with pytest.raises(ProtocolError, match=f"^batch_rows must {re.escape(want + repr(bad))}$"):
        Server(b, batch_rows=bad)
    with pytest.raises(ProtocolError, match=r"^limits must be a ServerLimits, got str$"):
        Server(b, limits="none")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"^clock must be a callable giving seconds, got float$"):
        Server(b, clock=12.5)  # type: ignore[arg-type]
    assert Server(b).batch_rows == 1  # the documented default: each row runs as forward.block runs it
    assert Server(b, batch_rows=3).batch_rows == 3


def test_handle_batch_answers_every_gen_mid_after_a_refused_one() -> None:
    """A gen_mid refused at admission (a wrong seq) gets its error; the batch's other gen_mid messages —
    admitted after it, in session order — are still served."""
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    clients: list[Client[Any]] = []
    for _ in range(2):
        client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="permute"))
        client.prefill(IDS, link)
        client.share_keys(link)
        clients.append(client)
    clients.sort(key=lambda c: c.session)  # the refused one comes first in the server's lock order
    reqs = []
    for j, client in enumerate(clients):
        st = client.state
        assert st is not None
        x = {"x": np.full((1, 16), 0.5)}
        reqs.append(Request(client.session, Stage.GEN_MID, 1, 0, st.seq + 5 * (j == 0), x, {}, st.token))
    out = server.handle_batch(reqs[::-1])
    assert len(out) == 2 and isinstance(out[1], ProtocolError) and "out of order" in str(out[1])
    assert isinstance(out[0], Reply) and out[0].session == clients[1].session
    assert out[0].arrays["x"].shape == (1, 16)


def test_an_idle_session_lives_exactly_its_ttl() -> None:
    clock = Clock()
    server: Server[Any] = Server(NumpyBackend(weights()), ServerLimits(idle_ttl=60.0), clock=clock)
    sid, token = opened(server)  # last used at 100.0
    clock.now += 60.0  # idle for exactly the TTL: not past it
    assert server.evict_idle() == 0
    server.handle(qkv(sid, token, commit_hex(1)))  # accepted; last used at 160.0
    assert server.cache_bytes > 0
    clock.now += 60.5
    with pytest.raises(SessionError, match=NO_SESSION):  # its own next message finds it expired
        server.handle(Request(sid, Stage.ATTN, 0, -1, 2, {}, {}, token))
    assert sid not in server.sessions and server.cache_bytes == 0
    with pytest.raises(SessionError, match=NO_SESSION):
        server.cost(sid)


def test_a_lookup_neither_waits_for_nor_evicts_a_busy_expired_session() -> None:
    clock = Clock()
    server: Server[Any] = Server(NumpyBackend(weights()), ServerLimits(idle_ttl=60.0), clock=clock)
    sid, token = opened(server)
    clock.now += 61.0
    outcome: list[BaseException] = []

    def lookup() -> None:
        try:
            server.handle(qkv(sid, "a wrong token", commit_hex(1)))
        except BaseException as exc:
            outcome.append(exc)

    with server.sessions[sid].lock:  # a message of the session is being handled
        worker = threading.Thread(target=lookup)
        worker.start()
        worker.join(timeout=5.0)
        waited = worker.is_alive()
        kept = sid in server.sessions
    worker.join()
    assert not waited, "the lookup waited for a busy session's lock"
    assert kept and len(outcome) == 1 and isinstance(outcome[0], SessionError)
    with pytest.raises(SessionError, match=NO_SESSION):  # no longer busy: the next lookup evicts it
        server.handle(qkv(sid, token, commit_hex(1)))
    assert sid not in server.sessions


def test_the_cache_limit_is_inclusive_and_bounds_growth_only() -> None:
    b = NumpyBackend(weights())
    probe: Server[Any] = Server(b)
    probe.handle(qkv(*opened(probe), commit_hex(1)))
    need = probe.cache_bytes  # one QKV stage's raw cache
    assert need > 0
    server: Server[Any] = Server(b, ServerLimits(max_cache_bytes=need))
    sid, token = opened(server)
    server.handle(qkv(sid, token, commit_hex(1)))  # exactly at the limit: accepted
    assert server.cache_bytes == need
    other = opened(server)
    limit = f"^qkv: the server's caches would exceed their limit of {need} bytes; retry later$"
    refused(server, qkv(*other, commit_hex(2)), LimitError, limit)
    # a limit lowered below what the caches hold still stops growth, never a message that does not grow them
    server.limits = replace(server.limits, max_cache_bytes=1)
    refused(server, qkv(*other, commit_hex(2)), LimitError, "limit of 1 bytes")
    c = b.config
    arrays = {
        "q": np.zeros((N, c.n_heads, c.head_dim)),
        "k": np.zeros((N, c.n_kv_heads, c.head_dim)),
        "v": np.zeros((N, c.n_kv_heads, c.head_dim)),
    }
    reply = server.handle(Request(sid, Stage.ATTN, 0, -1, 2, arrays, {}, token))
    assert reply.arrays["o"].shape == (N, c.n_heads, c.head_dim) and server.cache_bytes == need


def test_a_replayed_key_commitment_is_refused_while_in_flight() -> None:
    class Paused(NumpyBackend):
        """Runs ``during`` (once) inside its next QKV product: the message is still being handled."""

        during: Callable[[], None] | None = None

        def project(self, x: Any, which: Any, layer: int = -1, experts: Any = None) -> Any:
            if which == "wqkv" and self.during is not None:
                during, self.during = self.during, None
                during()
            return super().project(x, which, layer, experts)

    b = Paused(weights())
    server: Server[Any] = Server(b)
    first, second = opened(server), opened(server)
    replay = qkv(*second, commit_hex(1))
    seen = "^key commitment seen before: a replayed message is refused$"
    outcome: list[object] = []

    def during() -> None:
        before = server_state(server)
        try:
            outcome.append(server.handle(replay))
        except SCXError as exc:
            outcome.append(exc)
        outcome.append(server_state(server) == before)

    b.during = during
    server.handle(qkv(*first, commit_hex(1)))
    assert len(outcome) == 2 and isinstance(outcome[0], SessionError) and outcome[1] is True
    assert re.search(seen, str(outcome[0]))
    assert server.sessions[first[0]].seq == 2 and server.sessions[second[0]].seq == 1
    refused(server, replay, SessionError, seen)  # and once it was accepted


def test_the_commitment_memory_is_bounded_exactly() -> None:
    server: Server[Any] = Server(NumpyBackend(weights()), ServerLimits(commit_memory=2))
    a, b, c = commit_hex(1), commit_hex(2), commit_hex(3)
    server.handle(qkv(*opened(server), a))
    server.handle(qkv(*opened(server), b))
    third = opened(server)
    refused(server, qkv(*third, a), SessionError, "seen before")  # remembered: one of the 2 newest
    server.handle(qkv(*third, c))
    server.handle(qkv(*opened(server), a))  # forgotten after 2 newer commitments: the documented bound


@pytest.mark.parametrize("layer", [0, 1], ids=["block-0-again", "block-1-before-block-0-ffn"])
def test_qkv_stages_run_in_block_order(layer: int) -> None:
    server: Server[Any] = Server(NumpyBackend(weights()))
    sid, token = opened(server)
    server.handle(qkv(sid, token, commit_hex(1)))
    refused(
        server,
        qkv(sid, token, commit_hex(2), layer, seq=2),
        match=f"^qkv stage of block {layer} out of order$",
    )


def test_generation_stages_outside_their_block_say_why() -> None:
    """A session whose prefill lost its LOCK message: gen_qkv of a last guard block (server attention)
    and gen_last before the block's locked cache are refused, naming the block."""
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b)

    def lose_lock(req: Request) -> Request:
        if req.stage is Stage.LOCK:
            raise ConnectionError("lost")
        return req

    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig())
    with pytest.raises(ConnectionError):
        client.prefill(IDS, Edited(server, lose_lock))
    st = client.state
    assert st is not None
    last = b.config.n_layers - 1
    x = {"x": np.zeros((1, 16))}
    for stage, why in (
        (Stage.GEN_QKV, f"gen_qkv for block {last}: not a first guard block"),
        (Stage.GEN_LAST, f"^gen_last for block {last} before its locked cache was stored$"),
    ):
        refused(server, Request(client.session, stage, last, 0, st.seq, x, {}, st.token), match=why)
    server.handle(Request(client.session, Stage.GEN_QKV, 0, 0, st.seq, x, {}, st.token))  # control


def test_a_step_past_max_length_names_its_position() -> None:
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(max_length=N + 1))
    logits = client.prefill(IDS, link)
    client.decode(int(np.argmax(logits[-1])), link)  # step 0 at position N, the last one
    st = client.state
    assert st is not None
    req = Request(client.session, Stage.GEN_QKV, 0, 1, st.seq, {"x": np.zeros((1, 16))}, {}, st.token)
    refused(server, req, match=f"^position {N + 1} is past the session's max length {N + 1}$")


def test_qkv_and_head_messages_without_normalized_are_normed_by_the_server() -> None:
    """``normalized`` absent means false: the server applies the block's (or the final) RMSNorm."""
    b = NumpyBackend(weights())
    server: Server[Any] = Server(b)
    edited: list[Stage] = []

    def drop_normalized(req: Request) -> Request:
        if req.stage in (Stage.QKV, Stage.HEAD) and req.meta.get("normalized") is False:
            edited.append(req.stage)
            return replace(req, meta={k: v for k, v in req.meta.items() if k != "normalized"})
        return req

    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="permute"))
    logits = client.prefill(IDS, Edited(server, drop_normalized))
    assert edited == [Stage.QKV] * b.config.n_layers + [Stage.HEAD]
    np.testing.assert_allclose(logits, b.to_numpy(PlainRunner(b).prefill(IDS)), rtol=1e-9, atol=1e-9)


class Sized:
    """An array type that gives its size only as element_size() × nelement() (as torch tensors did)."""

    def __init__(self, itemsize: int, count: int) -> None:
        self.itemsize, self.count = itemsize, count

    def element_size(self) -> int:
        return self.itemsize

    def nelement(self) -> int:
        return self.count


class OddNbytes(Sized):
    nbytes = "many"  # not an int: not trusted, the size comes from element_size() × nelement()


class NoCount:
    """element_size() but no nelement(): no size to read (counted as 0 bytes)."""

    def element_size(self) -> int:
        return 8


MESSAGE_BYTES: list[tuple[str, dict[str, Any], int]] = [
    ("element_size-and-nelement", {"q": np.zeros(64), "k": Sized(8, 100), "v": np.zeros(64)}, 1824),
    ("non-int-nbytes", {"q": np.zeros(64), "k": OddNbytes(8, 100), "v": np.zeros(64)}, 1824),
    ("no-nelement", {"q": np.zeros(64), "k": NoCount(), "v": np.zeros(200)}, 2112),
]


@pytest.mark.parametrize(("what", "arrays", "size"), MESSAGE_BYTES, ids=[m[0] for m in MESSAGE_BYTES])
def test_message_bytes_are_read_from_array_metadata(what: str, arrays: dict[str, Any], size: int) -> None:
    server: Server[Any] = Server(NumpyBackend(weights()), ServerLimits(max_message_bytes=1024))
    req = Request(KeySchedule.new_nonce().hex(), Stage.GEN_ATTN, 0, 0, 1, arrays, {}, "token")
    refused(server, req, LimitError, f"^message of {size} bytes exceeds the server's limit of 1024$")

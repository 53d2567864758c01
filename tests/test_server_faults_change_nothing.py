"""The server (DESIGN §5.5: every client is untrusted; a refused or failed message leaves
nothing changed): the flop meter after a fault inside a stage, the locked cache's own memory, and
``handle_batch``/``cost``/``drop``/``sessions_snapshot`` given objects that are not what they expect."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import NonFiniteError, ProtocolError, SessionError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.stages import Stage
from tests.server_state import same, session_state
from tests.tiny import tiny_weights

W = tiny_weights(7)
IDS = np.array([3, 1, 4, 1, 5], dtype=np.int64)
KV = W.config.n_kv_heads * W.config.head_dim


def _state(server: Server[Any], sid: str) -> tuple[Any, ...]:
    """Everything a failed message must leave as it was: the session, the byte total, the flop meter."""
    return (*session_state(server, sid), server.cache_bytes)


class _Clock:
    """A clock that, when armed, raises on its second read of a message (the first is the idle check of
    ``_session_for``; the second is ``_finish``'s, after the stage was computed)."""

    def __init__(self) -> None:
        self.armed, self.reads, self.t = False, 0, 0.0

    def __call__(self) -> float:
        if self.armed:
            self.reads += 1
            if self.reads == 2:
                raise RuntimeError("clock failed")
        return self.t


class _FailFirst:
    """Sends every message (open and close aside) once with the server's clock failing after the stage was
    computed — the server must change nothing — and then for real."""

    def __init__(self, server: Server[Any], clock: _Clock) -> None:
        self.server, self.clock = server, clock
        self.stages: set[Stage] = set()
        self.charged: set[Stage] = set()

    def send(self, req: Request) -> Reply:
        if req.stage not in (Stage.OPEN, Stage.CLOSE):
            before = _state(self.server, req.session)
            self.clock.armed, self.clock.reads = True, 0
            try:
                with pytest.raises(RuntimeError, match=r"^clock failed$"):
                    self.server.handle(req)
            finally:
                self.clock.armed = False
            assert self.clock.reads == 2
            assert same(_state(self.server, req.session), before), f"a failed {req.stage.value} changed it"
            self.stages.add(req.stage)
        reply = self.server.handle(req)
        if req.stage in self.server.cost(req.session).stages:
            self.charged.add(req.stage)
        return reply


@pytest.mark.parametrize("level", ["paper", "blind"])
def test_a_fault_after_a_stage_was_computed_leaves_the_flop_meter_as_it_was(level: Any) -> None:
    """Every stage of a prefill, key sharing and decode step, its message failing after the handler charged
    the flop meter (the clock read in ``_finish`` raising): the session, the byte total and the meter are as
    before — the meter used to keep the charge of a message that never happened — and the honest message
    then goes through."""
    clock = _Clock()
    server: Server[Any] = Server(NumpyBackend(W), clock=clock)
    link = _FailFirst(server, clock)
    scx = SCXConfig(level=level, r1=2, r2=1, r_lock=2, l_s=1, l_e=1, max_length=8)
    client: Client[Any] = Client(NumpyBackend(W), KeySchedule(bytes(range(32)), bytes(range(16))), scx)
    logits = client.prefill(IDS, link)  # type: ignore[arg-type]
    client.share_keys(link)  # type: ignore[arg-type]
    client.decode(int(np.argmax(logits[-1])), link)  # type: ignore[arg-type]
    assert {Stage.QKV, Stage.HEAD, Stage.GEN_MID, Stage.GEN_LAST} <= link.charged  # metered stages were hit
    assert {Stage.LOCK, Stage.SHARE} <= link.stages


def test_a_backend_fault_inside_a_stage_is_refused_with_the_meter_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The LM head's product raising a project error after the head stage charged its flops: the message is
    refused and the session, the byte total and the flop meter are as before."""
    backend = NumpyBackend(W)
    server: Server[Any] = Server(backend)
    before: dict[Stage, Any] = {}

    class Snap:
        def send(self, req: Request) -> Reply:
            if req.stage is not Stage.OPEN:
                before[req.stage] = _state(server, req.session)
            return server.handle(req)

    client: Client[Any] = Client(
        NumpyBackend(W), KeySchedule(bytes(range(32)), bytes(range(16))), SCXConfig(level="paper", r1=2)
    )
    real = backend.project
    failed = [False]

    def project(x: Any, which: Any, *args: Any, **kw: Any) -> Any:
        if which == "lm_head":
            assert Stage.HEAD in server.cost(str(client.session)).stages  # charged before the product
            failed[0] = True
            raise NonFiniteError("lm_head product overflowed")
        return real(x, which, *args, **kw)

    monkeypatch.setattr(backend, "project", project)
    with pytest.raises(NonFiniteError, match="lm_head product overflowed"):
        client.prefill(IDS, Snap())  # type: ignore[arg-type]
    assert failed[0]
    assert same(_state(server, str(client.session)), before[Stage.HEAD])
    assert Stage.HEAD not in server.cost(str(client.session)).stages


def _mid_batch(n: int) -> tuple[Server[Any], list[Request]]:
    """A server with ``n`` sessions of different middle ranges after key sharing, and a gen_mid of step 0
    for each."""
    server: Server[Any] = Server(NumpyBackend(W), batch_rows=2)
    reqs = []
    for i in range(n):
        scx = SCXConfig(level="paper", r1=2, r2=1, l_s=1 + i % 2, l_e=1, max_length=10)
        client: Client[Any] = Client(NumpyBackend(W), KeySchedule(bytes(range(32)), bytes([i + 1]) * 16), scx)
        link = LocalTransport(server)
        client.prefill(IDS, link)
        client.share_keys(link)
        st = client.state
        assert st is not None
        x = np.random.default_rng(i).normal(size=(1, W.config.hidden_size))
        reqs.append(Request(st.keys.session_id, Stage.GEN_MID, 1 + i % 2, 0, st.seq, {"x": x}, {}, st.token))
    return server, reqs


def test_a_failed_gen_mid_batch_leaves_every_flop_meter_as_it_was() -> None:
    """The second group of a batch failing (an internal fault) after the first group's middle blocks were
    computed and charged: no session's flop meter keeps a charge (the first group's did); then a commit
    failing: the requests not committed keep no charge either."""
    server, reqs = _mid_batch(3)
    before = [_state(server, r.session) for r in reqs]
    real = server._mid_compute
    calls = [0]

    def second_fails(items: Any) -> Any:
        out = real(items)
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("internal fault in the second group")
        return out

    server._mid_compute = second_fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="second group"):
        server.handle_batch(reqs)
    assert calls[0] == 2
    for r, b in zip(reqs, before, strict=True):
        assert same(_state(server, r.session), b)

    def boom() -> None:
        raise RuntimeError("a commit failed")

    def first_commit_fails(items: Any) -> Any:
        out = real(items)
        out[0] = (out[0][0], boom)
        return out

    server._mid_compute = first_commit_fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a commit failed"):
        server.handle_batch(reqs)
    for r, b in zip(reqs, before, strict=True):
        assert same(_state(server, r.session), b)
    server._mid_compute = real  # type: ignore[method-assign]
    out = server.handle_batch(reqs)
    assert all(isinstance(o, Reply) for o in out)
    for r in reqs:
        assert server.cost(r.session).stages[Stage.GEN_MID].server_flops > 0


def lock_free(server: Server[Any], sid: str) -> bool:
    return bool(server.sessions_snapshot(sid)["locked"] == {})


def _prefilled_without_lock() -> tuple[Server[Any], Request]:
    """A server whose session finished its prefill, and the session's (not yet sent) lock message."""
    server: Server[Any] = Server(NumpyBackend(W))
    held: list[Request] = []

    class Hold:
        def send(self, req: Request) -> Reply:
            if req.stage is Stage.LOCK and not held:
                held.append(req)
                return Reply(req.session, req.stage, req.layer, req.step, req.seq, {})
            return server.handle(req)

    scx = SCXConfig(level="paper", r1=2, r2=1, r_lock=3, l_s=1, l_e=1, max_length=8)
    client: Client[Any] = Client(NumpyBackend(W), KeySchedule(bytes(range(32)), bytes(range(16))), scx)
    client.prefill(IDS, Hold())  # type: ignore[arg-type]  # the lock is the prefill's last message
    assert len(held) == 1 and lock_free(server, held[0].session)
    return server, held[0]


def test_the_locked_cache_is_the_servers_own_copy() -> None:
    """The lock message's ``k`` was stored as sent: a view of a larger array kept that whole array alive
    (memory the cache-byte count does not see) and the sender's later writes changed the server's locked
    cache. Now the server keeps a compact copy of exactly the counted bytes."""
    server, lock = _prefilled_without_lock()
    k = np.asarray(lock.arrays["k"])
    base = np.zeros((1000, k.shape[1]), dtype=k.dtype)
    base[: k.shape[0]] = k
    view = base[: k.shape[0]]
    bytes_before = server.cache_bytes
    server.handle(dataclasses.replace(lock, arrays={"k": view}))
    locked = server.sessions[lock.session].locked[lock.layer]
    assert not np.shares_memory(locked, base)
    assert locked.flags.c_contiguous and locked.nbytes == k.nbytes
    assert server.cache_bytes - bytes_before == locked.nbytes
    base[:] = 7.0
    np.testing.assert_array_equal(locked, k)


def test_handle_batch_refuses_what_is_not_a_request_one_by_one() -> None:
    """A batch holding objects that are not requests, or a request whose session id is unhashable: each is
    refused on its own with a ProtocolError (a list session raised TypeError for the whole batch; two
    non-requests were refused as 'two messages of one session'); a batch that is not a sequence is a
    ProtocolError."""
    server, reqs = _mid_batch(1)
    bad_sid = dataclasses.replace(reqs[0], session=["ab"] * 16)  # type: ignore[arg-type]
    out = server.handle_batch([None, "qkv", bad_sid, reqs[0]])  # type: ignore[list-item]
    assert [type(o) for o in out[:3]] == [ProtocolError] * 3
    assert "a request must be a Request, got NoneType" in str(out[0])
    assert "a session id is 32 lowercase hex digits" in str(out[2])
    assert isinstance(out[3], Reply)
    for bad in (5, None, "abc", b"abc"):
        with pytest.raises(ProtocolError, match="handle_batch takes a sequence of requests"):
            server.handle_batch(bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="at most one message per session"):
        server.handle_batch([reqs[0], reqs[0]])


@pytest.mark.parametrize("sid", [["ab"] * 16, {"a": 1}, None, 5])
def test_session_lookups_of_a_non_string_are_project_errors(sid: Any) -> None:
    """``cost`` and ``sessions_snapshot`` of an unhashable or non-string session raised TypeError; now the
    one SessionError of an unknown session. ``drop`` of one says there was no such session."""
    server, reqs = _mid_batch(1)
    with pytest.raises(SessionError, match=r"^unknown session or invalid session token$"):
        server.cost(sid)
    with pytest.raises(SessionError, match=r"^unknown session or invalid session token$"):
        server.sessions_snapshot(sid)
    assert server.drop(sid) is False
    assert set(server.sessions) == {reqs[0].session}

"""What the server holds, step by step, against values derived here — not only "unchanged after a refusal".

``tests/test_protocol_errors.py`` and ``tests/test_limits.py`` compare ``Server.sessions_snapshot`` before and
after a refused message, which cannot see a snapshot that leaves something out. Here the snapshot of a live
session is checked against the session's lifecycle: which caches exist after the prefill, after the key
sharing and after a decode step, their shapes and byte counts from closed forms, and — for the middle
blocks, whose keys the client shared — the server's valid cache against the plaintext reference model's.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import NonFiniteError, ProtocolError, SCXError, SessionError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Request, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import random_weights
from tests.server_state import same
from tests.tiny import tiny_config

IDS = np.array([3, 1, 4, 1, 5, 9], dtype=np.int64)
N, R1, R_LOCK = len(IDS), 2, 3
SNAPSHOT_KEYS = {
    "seq",
    "layer",
    "ffn_done",
    "head_done",
    "step",
    "gen_done",
    "raw",
    "valid",
    "locked",
    "commits",
    "cache_bytes",
}
CFG = tiny_config(qkv_bias=True)


def _close(got: Any, want: Any) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, float(np.abs(want).max())))


def test_snapshot_follows_the_session_lifecycle() -> None:
    w = random_weights(CFG, np.random.default_rng(11))
    server: Server[Any] = Server(NumpyBackend(w))
    link = LocalTransport(server)
    scx = SCXConfig(level="paper", r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=9)
    client: Client[Any] = Client(NumpyBackend(w), KeySchedule(bytes(range(32)), bytes(range(40, 56))), scx)
    ref = ReferenceModel(w)
    logits, cache = ref.prefill(IDS)
    client.prefill(IDS, link)
    sid = client.session
    c, it = CFG, 8
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    s = server.sessions[sid]

    snap = server.sessions_snapshot(sid)
    assert set(snap) == SNAPSHOT_KEYS
    assert snap["seq"] == s.seq > 1
    assert (snap["layer"], snap["ffn_done"], snap["head_done"], snap["step"]) == (3, 3, True, -1)
    assert snap["gen_done"] == []
    assert sorted(snap["raw"]) == [0, 1, 2, 3] and snap["valid"] == {}
    for k_raw, v_raw in snap["raw"].values():  # the encoded (n + r1) rows of Z_k and Z_v
        assert isinstance(k_raw, np.ndarray) and k_raw.shape == v_raw.shape == (N + R1, kv)
        assert not np.array_equal(k_raw, v_raw)
    for layer, (k_raw, v_raw) in snap["raw"].items():
        np.testing.assert_array_equal(k_raw, s.raw[layer][0])
        np.testing.assert_array_equal(v_raw, s.raw[layer][1])
    assert sorted(snap["locked"]) == [3] and snap["locked"][3].shape == (N + R_LOCK, kv)
    assert sorted(snap["commits"]) == [0, 1, 2, 3]
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in snap["commits"].values())
    prefill_bytes = 4 * (N + R1) * (q + 2 * kv) * it + (N + R_LOCK) * kv * it
    assert snap["cache_bytes"] == s.cache_bytes == server.cache_bytes == prefill_bytes

    client.share_keys(link)
    snap = server.sessions_snapshot(sid)
    assert sorted(snap["raw"]) == [0, 3] and sorted(snap["valid"]) == [1, 2]
    for layer in (1, 2):  # the shared keys decode the middle caches to the plaintext ones exactly
        k_valid, v_valid = snap["valid"][layer]
        assert k_valid.shape == v_valid.shape == (N, c.n_kv_heads, c.head_dim)
        _close(k_valid, cache.keys[layer])
        _close(v_valid, cache.values[layer])
    shared_bytes = prefill_bytes + 2 * (N * 2 * kv - (N + R1) * (q + 2 * kv)) * it
    assert snap["cache_bytes"] == server.cache_bytes == shared_bytes

    token = int(np.argmax(logits[-1]))
    client.decode(token, link)
    ref.decode(token, cache)
    snap = server.sessions_snapshot(sid)
    assert snap["step"] == 0 and snap["seq"] == s.seq
    assert snap["gen_done"] == sorted({(Stage.GEN_MID, -1), (Stage.GEN_LAST, 3)})
    for layer in (1, 2):  # gen_mid extended the valid caches by the new row, as the reference did
        k_valid, v_valid = snap["valid"][layer]
        assert k_valid.shape[0] == v_valid.shape[0] == N + 1
        _close(k_valid, cache.keys[layer])
        _close(v_valid, cache.values[layer])
    assert snap["locked"][3].shape == (N + R_LOCK + 1, kv)
    assert snap["cache_bytes"] == server.cache_bytes == shared_bytes + 2 * 2 * kv * it + kv * it

    with pytest.raises(SessionError, match=r"^unknown session or invalid session token$"):
        server.sessions_snapshot("0" * 32)


def _sessions(batch_rows: int, guards: list[int]) -> tuple[Server[Any], list[Client[Any]]]:
    """A server with one shared-key session per entry of ``guards`` (its l_s; l_e = 1), fixed keys."""
    w = random_weights(CFG, np.random.default_rng(11))
    server: Server[Any] = Server(NumpyBackend(w), batch_rows=batch_rows)
    clients = []
    for i, l_s in enumerate(guards):
        scx = SCXConfig(level="paper", r1=R1, r2=1, r_lock=R_LOCK, l_s=l_s, l_e=1, max_length=9)
        client: Client[Any] = Client(NumpyBackend(w), KeySchedule(bytes(range(32)), bytes([i + 1]) * 16), scx)
        link = LocalTransport(server)
        client.prefill(IDS[: 4 + i], link)
        client.share_keys(link)
        clients.append(client)
    return server, clients


def _gen_mid(client: Client[Any], l_s: int, x: np.ndarray) -> Any:
    """The gen_mid message of step 0 (the first middle block is block l_s)."""
    st = client.state
    assert st is not None
    return Request(st.keys.session_id, Stage.GEN_MID, l_s, 0, st.seq, {"x": x}, {}, st.token)


def _gen_qkv(client: Client[Any]) -> Any:
    """The gen_qkv message of step 0 for block 0 (a first guard block)."""
    st = client.state
    assert st is not None
    x = np.linspace(-1.0, 1.0, CFG.hidden_size)[None, :]
    return Request(st.keys.session_id, Stage.GEN_QKV, 0, 0, st.seq, {"x": x}, {}, st.token)


def test_handle_batch_equals_handle_for_several_sessions() -> None:
    """Three sessions' gen_mid rows in one handle_batch call — two share their middle blocks (one tile of
    two rows), the third has other middle blocks (its own group) — get bit for bit the replies, caches and
    byte counts that handle() gives each alone; a non-gen_mid request and a non-request in the same batch
    are answered in their own slots."""
    guards = [1, 1, 2]
    xs = [np.random.default_rng(i).normal(size=(1, CFG.hidden_size)) for i in range(3)]
    batched, bclients = _sessions(2, [*guards, 1])
    alone, aclients = _sessions(2, [*guards, 1])
    bclients, (bfourth,) = bclients[:3], bclients[3:]
    aclients, (afourth,) = aclients[:3], aclients[3:]
    seqs = [batched.sessions[c.session].seq for c in bclients]
    want = [alone.handle(_gen_mid(c, g, x)) for c, g, x in zip(aclients, guards, xs, strict=True)]
    want_qkv = alone.handle(_gen_qkv(afourth))
    reqs = [_gen_mid(c, g, x) for c, g, x in zip(bclients, guards, xs, strict=True)]
    out = batched.handle_batch([_gen_qkv(bfourth), *reqs, "junk"])  # type: ignore[list-item]
    assert len(out) == 5
    assert isinstance(out[4], SCXError) and "must be a Request" in str(out[4])
    qkv = out[0]  # not a gen_mid message: handled on its own, in its own slot
    assert not isinstance(qkv, SCXError) and qkv.stage is Stage.GEN_QKV and qkv.session == bfourth.session
    np.testing.assert_array_equal(qkv.arrays["z"], want_qkv.arrays["z"])
    out = out[1:]
    for got, exp, client, seq in zip(out[:3], want, bclients, seqs, strict=True):
        assert not isinstance(got, SCXError), got
        assert (got.session, got.stage, got.layer, got.step, got.seq) == (
            exp.session,
            exp.stage,
            exp.layer,
            exp.step,
            exp.seq,
        )
        assert got.session == client.session and got.seq == seq and got.step == 0
        assert set(got.arrays) == {"x"} and got.arrays["x"].shape == (1, CFG.hidden_size)
        np.testing.assert_array_equal(got.arrays["x"], exp.arrays["x"])
        b, a = batched.sessions_snapshot(client.session), alone.sessions_snapshot(client.session)
        assert b["seq"] == a["seq"] == seq + 1 and b["gen_done"] == a["gen_done"] == [(Stage.GEN_MID, -1)]
        assert sorted(b["valid"]) == sorted(a["valid"])
        for layer in b["valid"]:
            np.testing.assert_array_equal(b["valid"][layer][0], a["valid"][layer][0])
            np.testing.assert_array_equal(b["valid"][layer][1], a["valid"][layer][1])
        assert b["cache_bytes"] == a["cache_bytes"]
        assert batched.cost(client.session).stages[Stage.GEN_MID].server_flops > 0
        assert (
            batched.cost(client.session).stages[Stage.GEN_MID].server_flops
            == alone.cost(client.session).stages[Stage.GEN_MID].server_flops
        )
    assert batched.cache_bytes == alone.cache_bytes
    with pytest.raises(ProtocolError) as info:
        batched.handle_batch([reqs[0], reqs[0]])
    assert str(info.value) == "handle_batch takes at most one message per session"
    # the rows really differ (the batch did not answer every session with one row)
    assert not np.array_equal(out[0].arrays["x"], out[1].arrays["x"])  # type: ignore[union-attr]


# --- every refusal says exactly what was wrong ----------------------------------------------------------

LIVE_SCX = SCXConfig(level="paper", r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=9)
OPEN_META: dict[str, Any] = dict(n=N, r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=9, level="paper")
COMMIT = "ab" * 32


class Live:
    """A server with one session after a real prefill (keys not shared) and helpers to craft requests."""

    def __init__(self, limits: Any = None) -> None:
        w = random_weights(CFG, np.random.default_rng(11))
        self.server: Server[Any] = Server(NumpyBackend(w), limits)
        self.link = LocalTransport(self.server)
        self.client: Client[Any] = Client(
            NumpyBackend(w), KeySchedule(bytes(range(32)), bytes(range(40, 56))), LIVE_SCX
        )
        self.client.prefill(IDS, self.link)

    def req(self, stage: Any, layer: int = -1, step: int = -1, arrays: Any = None, **kw: Any) -> Request:
        st = self.client.state
        assert st is not None
        sid = kw.pop("session", st.keys.session_id)
        seq = kw.pop("seq", self.server.sessions[sid].seq if sid in self.server.sessions else 1)
        token = kw.pop("token", st.token)
        return Request(sid, stage, layer, step, seq, arrays or {}, kw, token)

    def fresh(self, **meta: Any) -> tuple[str, str]:
        """A newly opened session (no message after open): its id and token."""
        sid = KeySchedule.new_nonce().hex()
        reply = self.server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, {**OPEN_META, **meta}))
        return sid, str(reply.meta["token"])

    def on(
        self,
        sid_token: tuple[str, str],
        stage: Any,
        layer: int = -1,
        step: int = -1,
        arrays: Any = None,
        **meta: Any,
    ) -> Request:
        sid, token = sid_token
        return Request(sid, stage, layer, step, self.server.sessions[sid].seq, arrays or {}, meta, token)


def x(rows: int, width: int = CFG.hidden_size) -> np.ndarray:
    return np.ones((rows, width))


Q, KV = CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
# (id, builds the request from a Live, error type, the whole message)
REFUSALS: list[tuple[str, Any, type[Exception], str]] = [
    ("not-a-request", lambda lv: "qkv", ProtocolError, "a request must be a Request, got str"),
    (
        "short-session-id",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, session="ab"),
        ProtocolError,
        "a session id is 32 lowercase hex digits (the nonce)",
    ),
    (
        "upper-session-id",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, session="AB" * 16),
        ProtocolError,
        "session id must be 32 lowercase hex digits, got 'ABABABABABABABABABABABABABABABAB'",
    ),
    ("unknown-stage", lambda lv: lv.req("bogus"), ProtocolError, "unknown stage 'bogus'"),
    (
        "long-token",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, token="t" * 257),
        ProtocolError,
        "token must be an ASCII string of at most 256 characters",
    ),
    (
        "token-not-str",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, token=b"t"),
        ProtocolError,
        "token must be an ASCII string of at most 256 characters",
    ),
    (
        "unknown-array",
        lambda lv: lv.req(Stage.QKV, 0, arrays={"y": x(1)}),
        ProtocolError,
        "qkv message carries unknown array(s) ['y']; allowed: ['x']",
    ),
    (
        "unknown-meta",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, foo=1),
        ProtocolError,
        "gen_mid message carries unknown field(s) ['foo']; allowed: []",
    ),
    (
        "wrong-token",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, token="t"),
        SessionError,
        "unknown session or invalid session token",
    ),
    (
        "unknown-session",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, session="cd" * 16),
        SessionError,
        "unknown session or invalid session token",
    ),
    (
        "out-of-order",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, seq=lv.server.sessions[lv.client.session].seq + 1),
        ProtocolError,
        "message out of order: expected seq {seq}, got {seq1}",
    ),
    (
        "not-wide",
        lambda lv: lv.req(Stage.GEN_QKV, 0, 0, {"x": x(1)}, wide=True),
        ProtocolError,
        "gen_qkv: a float64 blinded message in a session not opened wide",
    ),
    (
        "qkv-no-commit",
        lambda lv: lv.on(lv.fresh(), Stage.QKV, 0, arrays={"x": x(N + R1)}),
        ProtocolError,
        "qkv message lacks the key commitment",
    ),
    (
        "qkv-bad-commit",
        lambda lv: lv.on(lv.fresh(), Stage.QKV, 0, arrays={"x": x(N + R1)}, commit="AB" * 32),
        ProtocolError,
        "commit must be 64 lowercase hex digits, got '" + "AB" * 32 + "'",
    ),
    (
        "share-no-salt",
        lambda lv: lv.req(Stage.SHARE, 1, arrays={"perm": np.arange(N + R1)}),
        ProtocolError,
        "share message for block 1 lacks its salt",
    ),
    (
        "ffn-up-not-normalized",
        lambda lv: lv.req(Stage.GEN_FFN_UP, 0, 0, {"x": x(1)}, normalized=False),
        ProtocolError,
        "gen_ffn_up takes normalized rows (normalized must be true)",
    ),
    (
        "experts-on-dense",
        lambda lv: lv.req(Stage.GEN_FFN_DOWN, 0, 0, {"m": x(1, 24)}, experts=[0]),
        ProtocolError,
        "gen_ffn_down message carries experts it cannot use",
    ),
    (
        "bool-not-bool",
        lambda lv: lv.req(Stage.GEN_FFN_UP, 0, 0, {"x": x(1)}, normalized=1),
        ProtocolError,
        "normalized must be true or false, got int 1",
    ),
    (
        "open-seq",
        lambda lv: Request("ee" * 16, Stage.OPEN, -1, -1, 1, {}, OPEN_META),
        ProtocolError,
        "open must be message 0 with layer −1 and step −1",
    ),
    (
        "open-layer",
        lambda lv: Request("ee" * 16, Stage.OPEN, 0, -1, 0, {}, OPEN_META),
        ProtocolError,
        "open must be message 0 with layer −1 and step −1",
    ),
    (
        "open-step",
        lambda lv: Request("ee" * 16, Stage.OPEN, -1, 0, 0, {}, OPEN_META),
        ProtocolError,
        "open must be message 0 with layer −1 and step −1",
    ),
    (
        "open-lacks",
        lambda lv: Request(
            "ee" * 16, Stage.OPEN, -1, -1, 0, {}, {"n": 3, "r1": 0, "r2": 0, "level": "paper"}
        ),
        ProtocolError,
        "open message lacks field(s) ['l_e', 'l_s', 'max_length', 'r_lock']",
    ),
    (
        "open-again",
        lambda lv: Request(lv.client.session, Stage.OPEN, -1, -1, 0, {}, OPEN_META),
        SessionError,
        "this nonce already opened a session: a nonce must never be reused",
    ),
    ("close-layer", lambda lv: lv.req(Stage.CLOSE, 0), ProtocolError, "close takes layer −1"),
    (
        "prefill-step",
        lambda lv: lv.req(Stage.QKV, 0, 0, {"x": x(N + R1)}, commit=COMMIT),
        ProtocolError,
        "qkv is not a generation stage: its step must be −1",
    ),
    (
        "prefill-after",
        lambda lv: lv.req(Stage.QKV, 0, -1, {"x": x(N + R1)}, commit=COMMIT),
        ProtocolError,
        "prefill stage 'qkv' after the prefill finished",
    ),
    (
        "head-layer",
        lambda lv: lv.on(lv.fresh(), Stage.HEAD, 3, arrays={"x": x(N + R1)}),
        ProtocolError,
        "the head stage has layer 4, got 3",
    ),
    (
        "head-early",
        lambda lv: lv.on(lv.fresh(), Stage.HEAD, 4, arrays={"x": x(N + R1)}),
        ProtocolError,
        "head stage before every block's FFN stage",
    ),
    (
        "layer-range",
        lambda lv: lv.on(lv.fresh(), Stage.QKV, 4, arrays={"x": x(N + R1)}, commit=COMMIT),
        ProtocolError,
        "layer 4 out of range 0..3",
    ),
    (
        "layer-negative",
        lambda lv: lv.on(lv.fresh(), Stage.O, -1, arrays={"x": x(N + 1, Q)}),
        ProtocolError,
        "layer -1 out of range 0..3",
    ),
    (
        "client-attention",
        lambda lv: lv.on(lv.fresh(attention="client"), Stage.ATTN, 0),
        ProtocolError,
        "attention of guard block 0 is the client's (attention='client')",
    ),
    (
        "qkv-skips",
        lambda lv: lv.on(lv.fresh(), Stage.QKV, 1, arrays={"x": x(N + R1)}, commit=COMMIT),
        ProtocolError,
        "qkv stage of block 1 out of order",
    ),
    (
        "o-before-qkv",
        lambda lv: lv.on(lv.fresh(), Stage.O, 0, arrays={"x": x(N + 1, Q)}),
        ProtocolError,
        "o stage for block 0 while block -1 is running",
    ),
    (
        "gen-before-prefill",
        lambda lv: lv.on(lv.fresh(), Stage.GEN_QKV, 0, 0, {"x": x(1)}),
        ProtocolError,
        "stage 'gen_qkv' before the prefill finished",
    ),
    (
        "lock-middle",
        lambda lv: lv.req(Stage.LOCK, 1, arrays={"k": x(N + R_LOCK, KV)}),
        ProtocolError,
        "block 1 has no locked cache (not a last guard block, or client attention)",
    ),
    (
        "share-guard",
        lambda lv: lv.req(Stage.SHARE, 0, arrays={"perm": np.arange(N + R1)}, salt=COMMIT),
        ProtocolError,
        "key for block 0 refused: only middle blocks [1, 2] are shared",
    ),
    (
        "step-skips",
        lambda lv: lv.req(Stage.GEN_QKV, 0, 1, {"x": x(1)}),
        ProtocolError,
        "generation step 1 out of order (at step -1)",
    ),
    (
        "step-negative",
        lambda lv: lv.req(Stage.GEN_QKV, 0, -1, {"x": x(1)}),
        ProtocolError,
        "generation step -1 out of order (at step -1)",
    ),
    (
        "gen-qkv-role",
        lambda lv: lv.req(Stage.GEN_QKV, 1, 0, {"x": x(1)}),
        ProtocolError,
        "gen_qkv for block 1: not a first guard block (nor a client-attention guard block)",
    ),
    (
        "gen-attn-role",
        lambda lv: lv.req(Stage.GEN_ATTN, 3, 0),
        ProtocolError,
        "gen_attn for block 3: not a first guard block, or the client's attention (attention 'client' or "
        "gen_attention 'client')",
    ),
    (
        "gen-attn-client",  # the session opened with SCXConfig's default gen_attention="client"
        lambda lv: lv.req(Stage.GEN_ATTN, 0, 0),
        ProtocolError,
        "gen_attn for block 0: not a first guard block, or the client's attention (attention 'client' or "
        "gen_attention 'client')",
    ),
    (
        "gen-last-role",
        lambda lv: lv.req(Stage.GEN_LAST, 0, 0, {"x": x(1)}),
        ProtocolError,
        "gen_last for block 0: not a last guard block, or client attention",
    ),
    (
        "gen-o-role",
        lambda lv: lv.req(Stage.GEN_O, 0, 0, {"x": x(1, Q)}),
        ProtocolError,
        "gen_o for block 0: not a guard block, or W_o is the client's",
    ),
    (
        "gen-head-role",
        lambda lv: lv.req(Stage.GEN_HEAD, 4, 0, {"x": x(1)}),
        ProtocolError,
        "gen_head: the LM head of a generation step is the client's here",
    ),
    (
        "gen-mid-layer",
        lambda lv: lv.req(Stage.GEN_MID, 2, 0, {"x": x(1)}),
        ProtocolError,
        "gen_mid names the first middle block; block 2 is not it",
    ),
    (
        "gen-ffn-role",
        lambda lv: lv.req(Stage.GEN_FFN, 1, 0, {"x": x(1)}),
        ProtocolError,
        "gen_ffn for block 1, which is not a guard block",
    ),
    (
        "gen-mid-unshared",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, {"x": x(1)}),
        ProtocolError,
        "gen_mid before every middle block's key was shared",
    ),
    ("lacks-array", lambda lv: lv.req(Stage.GEN_QKV, 0, 0), ProtocolError, "gen_qkv message lacks array 'x'"),
    (
        "array-shape",
        lambda lv: lv.req(Stage.GEN_QKV, 0, 0, {"x": x(2)}),
        ShapeError,
        "gen_qkv.x must have shape (1, 16), got (2, 16)",
    ),
    (
        "lock-twice",
        lambda lv: lv.req(Stage.LOCK, 3, arrays={"k": x(N + R_LOCK, KV)}),
        ProtocolError,
        "block 3 already has a locked cache",
    ),
    (
        "share-perm-length",
        lambda lv: lv.req(Stage.SHARE, 1, arrays={"perm": np.arange(3)}, salt=COMMIT),
        ProtocolError,
        "share message for block 1 is malformed: shared permutation must have length 8, got 3",
    ),
    (
        "share-salt",
        lambda lv: lv.req(Stage.SHARE, 1, arrays={"perm": np.arange(N + R1)}, salt="x"),
        ProtocolError,
        "share message for block 1 is malformed: salt must be 64 lowercase hex digits, got 'x'",
    ),
    (
        "share-wrong-key",
        lambda lv: lv.req(Stage.SHARE, 1, arrays={"perm": np.arange(N + R1)}, salt=COMMIT),
        SessionError,
        "the key offered for block 1 does not match that block's commitment "
        "(a key for the wrong layer, or from another session)",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_say_exactly_what_was_wrong(build: Any, error: type[Exception], message: str) -> None:
    lv = Live()
    seq = lv.server.sessions[lv.client.session].seq
    request = build(lv)
    with pytest.raises(error) as info:
        lv.server.handle(request)
    assert str(info.value) == message.format(seq=seq, seq1=seq + 1)


# --- rollback, eviction and lock order ------------------------------------------------------------------


def test_a_message_that_fails_after_its_reservation_releases_it() -> None:
    """A QKV message whose array is refused inside the stage (after its cache bytes and key commitment were
    reserved) gives both back: the byte total is as before, and the same commitment is then accepted."""
    lv = Live()
    sid_token = lv.fresh()
    before = lv.server.cache_bytes
    bad = lv.on(sid_token, Stage.QKV, 0, arrays={"x": x(N + R1 + 1)}, commit=COMMIT)
    with pytest.raises(ShapeError):
        lv.server.handle(bad)
    assert lv.server.cache_bytes == before
    assert COMMIT not in lv.server._pending and COMMIT not in lv.server._commits
    lv.server.handle(lv.on(sid_token, Stage.QKV, 0, arrays={"x": x(N + R1)}, commit=COMMIT))
    grown = (N + R1) * (Q + 2 * KV) * 8
    assert lv.server.cache_bytes == before + grown and COMMIT in lv.server._commits


def test_a_failed_batch_releases_every_reservation() -> None:
    """When computing a batch's middle blocks fails, every gen_mid message of it gives its cache bytes back
    and the error reaches the caller; the sessions take the same messages afterwards."""
    server, clients = _sessions(2, [1, 1])
    before = server.cache_bytes
    seqs = [server.sessions[c.session].seq for c in clients]
    reqs = [_gen_mid(c, 1, x(1)) for c in clients]
    real = server._mid_compute

    def broken(items: Any) -> Any:
        raise RuntimeError("device lost")

    server._mid_compute = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"^device lost$"):
        server.handle_batch(reqs)
    assert server.cache_bytes == before
    assert [server.sessions[c.session].seq for c in clients] == seqs
    server._mid_compute = real  # type: ignore[method-assign]
    out = server.handle_batch(reqs)
    assert all(not isinstance(r, SCXError) for r in out)
    assert server.cache_bytes == before + 2 * 2 * (2 * KV) * 8  # two sessions, two middle blocks each


def test_handle_batch_takes_the_session_locks_in_session_order() -> None:
    """Locks are taken in one global order (by session id), whatever the order of the batch: with the
    smaller id's lock held elsewhere, a batch listing the larger id first has not taken the larger one's
    lock yet (the order that keeps two batches from deadlocking)."""
    import threading
    import time

    server, clients = _sessions(2, [1, 1])
    first, second = sorted(clients, key=lambda c: c.session)
    reqs = [_gen_mid(second, 1, x(1)), _gen_mid(first, 1, x(1))]
    lock_first, lock_second = server.sessions[first.session].lock, server.sessions[second.session].lock
    out: list[Any] = []
    with lock_first:
        worker = threading.Thread(target=lambda: out.extend(server.handle_batch(reqs)))
        worker.start()
        time.sleep(0.5)  # the batch is now waiting for the first lock
        assert not lock_second.locked(), "the batch took the larger session id's lock first"
    worker.join(30)
    assert not worker.is_alive() and len(out) == 2 and all(not isinstance(r, SCXError) for r in out)


def test_drop_ends_a_session_without_its_token() -> None:
    lv = Live()
    sid = lv.client.session
    assert lv.server.cache_bytes > 0
    assert lv.server.drop("ee" * 16) is False  # no such session
    s = lv.server.sessions[sid]
    assert s.raw and s.locked and s.cache_bytes > 0
    assert lv.server.drop(sid) is True
    assert sid not in lv.server.sessions and lv.server.cache_bytes == 0
    # the session object a message may still hold is marked closed and emptied
    assert s.closed is True and s.cache_bytes == 0 and not s.raw and not s.valid and not s.locked
    with pytest.raises(SessionError, match=r"^unknown session or invalid session token$"):
        lv.server.cost(sid)
    assert lv.server.drop(sid) is False  # already gone
    with pytest.raises(SessionError, match=r"^unknown session or invalid session token$"):
        lv.server.handle(lv.req(Stage.GEN_QKV, 0, 0, {"x": x(1)}))


def test_evict_idle_counts_every_idle_session_and_skips_a_busy_one() -> None:
    import threading

    from scx_ref.protocol.limits import ServerLimits

    now = [100.0]
    w = random_weights(CFG, np.random.default_rng(11))
    server: Server[Any] = Server(NumpyBackend(w), ServerLimits(idle_ttl=10.0), clock=lambda: now[0])
    sids = []
    for _ in range(3):
        sid = KeySchedule.new_nonce().hex()
        server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
        sids.append(sid)
    now[0] += 11.0
    busy = server.sessions[sids[0]].lock
    counted: list[int] = []
    with busy:  # a session handling a message is not evicted (and eviction does not wait for it)
        worker = threading.Thread(target=lambda: counted.append(server.evict_idle()))
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "evict_idle waited for a busy session"
    assert counted == [2] and set(server.sessions) == {sids[0]}
    assert server.evict_idle() == 1 and server.sessions == {}


def test_a_session_closed_while_a_message_waits_for_it_takes_nothing() -> None:
    """A message (or a drop) that found its session and then waited for its lock while the session was
    closed gets the no-session answer: the closed flag is checked again under the lock."""
    import threading
    import time

    lv = Live()
    sid = lv.client.session
    s = lv.server.sessions[sid]
    results: list[Any] = []

    def send() -> None:
        try:
            results.append(lv.server.handle(lv.req(Stage.GEN_QKV, 0, 0, {"x": x(1)})))
        except SCXError as exc:
            results.append(exc)

    with s.lock:  # as while the session handles a close message
        waiters = [
            threading.Thread(target=send),
            threading.Thread(target=lambda: results.append(lv.server.drop(sid))),
        ]
        for t in waiters:
            t.start()
        time.sleep(0.5)  # both have looked the session up and wait for its lock
        lv.server._close(sid, s)
    for t in waiters:
        t.join(30)
    assert len(results) == 2 and False in results
    (refusal,) = [r for r in results if r is not False]
    assert isinstance(refusal, SessionError) and str(refusal) == "unknown session or invalid session token"


# --- MoE stages naming several experts in one message -------------------------------------------------

MOE = tiny_config(moe=True, n_layers=3, intermediate_size=12)


def test_moe_stages_size_their_arrays_and_flops_by_the_experts_named() -> None:
    """A blinded MoE message may name up to top_k experts: the server expects and returns arrays as wide as
    the experts named (their gate/up or down matrices stacked), counts the flops of that width, and only
    the message marked last (or not marked) finishes the block's FFN."""
    w = random_weights(MOE, np.random.default_rng(3))
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    d, f, rows = MOE.hidden_size, MOE.intermediate_size, N + R1
    sid = KeySchedule.new_nonce().hex()
    token = str(
        server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META, level="blind"))).meta["token"]
    )

    def send(stage: Stage, layer: int, arrays: dict[str, Any], step: int = -1, **meta: Any) -> Any:
        return server.handle(Request(sid, stage, layer, step, server.sessions[sid].seq, arrays, meta, token))

    gen = np.random.default_rng(0)
    send(Stage.QKV, 0, {"x": gen.normal(size=(rows, d))}, commit=COMMIT)
    two = np.array([0, 2])
    with pytest.raises(ProtocolError) as info:  # an MoE stage must name its experts
        send(Stage.FFN_DOWN, 0, {"m": np.zeros((rows, f))})
    assert str(info.value) == "ffn_down on an MoE layer needs meta['experts']"
    xs = gen.normal(size=(rows, d))
    up = send(Stage.FFN, 0, {"x": xs}, normalized=True, experts=[0, 2])
    assert up.arrays["y"].shape == (rows, 2 * 2 * f)
    np.testing.assert_array_equal(up.arrays["y"], b.project(xs, "w_gate_up", 0, two))
    assert server.cost(sid).stages[Stage.FFN].server_flops == 2 * rows * d * (2 * 2 * f)
    m = gen.normal(size=(rows, 2 * f))
    down = send(Stage.FFN_DOWN, 0, {"m": m}, experts=[0, 2], last=False)
    np.testing.assert_array_equal(down.arrays["y"], b.project(m, "w_down", 0, two))
    assert server.cost(sid).stages[Stage.FFN_DOWN].server_flops == 2 * rows * (2 * f) * d
    assert server.sessions_snapshot(sid)["ffn_done"] == -1  # not the block's last expert message
    send(Stage.FFN_DOWN, 0, {"m": m[:, :f]}, experts=[3])  # "last" absent: the last one
    assert server.sessions_snapshot(sid)["ffn_done"] == 0
    send(Stage.QKV, 1, {"x": gen.normal(size=(rows, d))}, commit="cd" * 32)
    send(Stage.FFN_DOWN, 1, {"m": m}, experts=[1, 3], last=True)
    assert server.sessions_snapshot(sid)["ffn_done"] == 1

    # generation: a guard block's blinded MoE stages, two experts in one message
    client: Client[Any] = Client(b, KeySchedule(bytes(range(32)), bytes(range(40, 56))), LIVE_SCX)
    link = LocalTransport(server)
    client.prefill(IDS, link)
    st = client.state
    assert st is not None

    def gen_send(stage: Stage, arrays: dict[str, Any], **meta: Any) -> Any:
        seq = server.sessions[client.session].seq
        return server.handle(Request(client.session, stage, 0, 0, seq, arrays, meta, st.token))

    meter = server.cost(client.session).stages
    before_up, before_down = meter[Stage.GEN_FFN_UP].server_flops, meter[Stage.GEN_FFN_DOWN].server_flops
    x1 = gen.normal(size=(1, d))
    up1 = gen_send(Stage.GEN_FFN_UP, {"x": x1}, normalized=True, experts=[1, 2])
    np.testing.assert_array_equal(up1.arrays["y"], b.project(x1, "w_gate_up", 0, np.array([1, 2])))
    m1 = gen.normal(size=(1, 2 * f))
    down1 = gen_send(Stage.GEN_FFN_DOWN, {"m": m1}, experts=[1, 2])
    np.testing.assert_array_equal(down1.arrays["y"], b.project(m1, "w_down", 0, np.array([1, 2])))
    assert meter[Stage.GEN_FFN_UP].server_flops - before_up == 2 * d * (2 * 2 * f)
    assert meter[Stage.GEN_FFN_DOWN].server_flops - before_down == 2 * (2 * f) * d


def test_the_middle_blocks_run_on_tiles_of_batch_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``batch_rows`` is the tile the server's middle blocks run on (what makes a session's rows the same
    alone or batched): every block_rows call of a gen_mid message gets it, with the sessions' positions."""
    import scx_ref.protocol.server as server_module
    from scx_ref.forward import block_rows

    tiles: list[tuple[int, list[int]]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        tile = args[5] if len(args) > 5 else kwargs.get("tile", 1)  # block_rows' default tile is 1
        tiles.append((tile, [int(p) for p in args[3]]))
        return block_rows(*args, **kwargs)

    monkeypatch.setattr(server_module, "block_rows", recording)
    server, clients = _sessions(3, [1, 1])
    server.handle_batch([_gen_mid(c, 1, x(1)) for c in clients])
    # two middle blocks, both sessions in one call each; prompts of 4 and 5 tokens, step 0
    assert tiles == [(3, [4, 5]), (3, [4, 5])]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("level", ["blind", "paper"])
def test_shared_keys_decode_the_middle_caches_exactly(level: str, backend: str) -> None:
    """At level blind the QKV stage is noised, so the server must also remove α·W from the raw keys and
    values when a key is shared: the valid caches then equal the plaintext model's, row for row."""
    w = random_weights(CFG, np.random.default_rng(5))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from scx_ref.backends.torch_backend import TorchBackend

        b: Any = TorchBackend(w, torch.float64)
    else:
        b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    scx = SCXConfig(level=level, r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=9)
    client: Client[Any] = Client(b, KeySchedule(bytes(range(1, 33)), bytes(range(16))), scx)
    _, cache = ReferenceModel(w).prefill(IDS)
    client.prefill(IDS, link)
    client.share_keys(link)
    snap = server.sessions_snapshot(client.session)
    assert sorted(snap["valid"]) == [1, 2]
    for layer in (1, 2):
        _close(snap["valid"][layer][0], cache.keys[layer])
        _close(snap["valid"][layer][1], cache.values[layer])
    flops = server.cost(client.session).stages[Stage.SHARE].server_flops
    d, rows = CFG.hidden_size, N + R1
    assert flops == (2 * 2 * rows * d * (Q + 2 * KV) if level == "blind" else 0)  # α·W_qkv per middle block


class _PoisonOnce:
    """A transport that sends the first message of ``stage`` with one entry of its ``x`` made ``value``
    first — the server must refuse it with nothing changed — and then as the client built it."""

    def __init__(self, server: Server[Any], stage: Stage, value: float) -> None:
        self.server, self.stage, self.value, self.done = server, stage, value, False

    def send(self, req: Request) -> Any:
        if req.stage is self.stage and not self.done:
            self.done = True
            bad = np.array(self.server.b.to_numpy(req.arrays["x"]), copy=True)
            bad[1, 2] = self.value
            sid = req.session
            before = (
                self.server.sessions_snapshot(sid),
                self.server.cache_bytes,
                copy.deepcopy(dict(self.server.cost(sid).stages)),
            )
            with pytest.raises(NonFiniteError, match=f"{self.stage.value}.x holds NaN or Inf"):
                self.server.handle(dataclasses.replace(req, arrays={**req.arrays, "x": bad}))
            after = (
                self.server.sessions_snapshot(sid),
                self.server.cache_bytes,
                dict(self.server.cost(sid).stages),
            )
            assert same(after, before), "a refused message changed the server"
        return self.server.handle(req)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("stage", [Stage.QKV, Stage.FFN, Stage.HEAD])
@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-fused"])
def test_rows_the_server_normalizes_are_refused_when_not_finite(
    backend: str, stage: Stage, value: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The QKV, FFN and head messages (rows the server normalizes) are tested finite in the norm's own pass
    where the torch backend fuses the norm (``torch-fused``: from FUSED_NORM_MIN entries, 0 here), by a
    scan otherwise: a NaN or ±inf is refused (NonFiniteError) with
    the session's caches, the byte total and the flop meter as before, and the same prompt, its messages
    then sent as built, gives the logits of a run that never met the poisoned one."""
    w = random_weights(CFG, np.random.default_rng(5))
    if backend.startswith("torch"):
        torch = pytest.importorskip("torch")
        from scx_ref.backends import torch_backend
        from scx_ref.backends.cpu_kernels import kernels

        if backend == "torch-fused":  # the fused norm's own test on these few rows (numba installed)
            if kernels() is None:
                pytest.skip("numba is not installed (the scan is tested)")
            monkeypatch.setattr(torch_backend, "FUSED_NORM_MIN", 0)
        b: Any = torch_backend.TorchBackend(w, torch.float32)
    else:
        b = NumpyBackend(w)
    scx = SCXConfig(level="permute", r1=R1, r2=1, max_length=9)
    keys = (bytes(range(1, 33)), bytes(range(16)))
    clean = Client(b, KeySchedule(*keys), scx).prefill(IDS, LocalTransport(Server(b)))
    server: Server[Any] = Server(b)
    link = _PoisonOnce(server, stage, value)
    got = Client(b, KeySchedule(*keys), scx).prefill(IDS, link)  # type: ignore[arg-type]
    assert link.done
    np.testing.assert_array_equal(got, clean)


def test_an_mlp_reply_carries_its_intermediates_only_when_asked() -> None:
    """The whole-MLP stage returns only y unless the message asks for the trace (the verifier's input):
    the intermediates are not sent to a client that did not ask for them."""
    lv = Live()
    plain = lv.server.handle(lv.req(Stage.GEN_FFN, 0, 0, {"x": x(1)}))
    assert set(plain.arrays) == {"y"}
    traced = lv.server.handle(lv.req(Stage.GEN_FFN, 0, 0, {"x": x(1)}, trace=True))
    assert "y" in traced.arrays and len(traced.arrays) > 1
    np.testing.assert_array_equal(traced.arrays["y"], plain.arrays["y"])
    untraced = lv.server.handle(lv.req(Stage.GEN_FFN, 0, 0, {"x": x(1)}, trace=False))
    assert set(untraced.arrays) == {"y"}


# --- the header fields, flags and meta checks of _parse and _check_fields ---------------------------------

SEQ_HI = 1 << 62  # the largest sequence number a message may carry


def _with_meta(req: Request, meta: Any) -> Request:
    """``req`` carrying ``meta`` as it is (a malformed one included)."""
    from dataclasses import replace

    return replace(req, meta=meta)


# (id, builds the request from a Live, error type, the whole message; {seq}: the session's next seq)
HEADER_REFUSALS: list[tuple[str, Any, type[Exception], str]] = [
    (
        "layer-above",
        lambda lv: lv.req(Stage.GEN_MID, 5, 0),
        ProtocolError,
        "layer must lie in [-1, 4], got 5",
    ),
    (
        "layer-below",
        lambda lv: lv.req(Stage.GEN_MID, -2, 0),
        ProtocolError,
        "layer must lie in [-1, 4], got -2",
    ),
    (
        "layer-str",
        lambda lv: lv.req(Stage.GEN_MID, "1", 0),
        ProtocolError,
        "layer must be an integer, got str '1'",
    ),
    (  # -1 is a valid layer for _parse: the refusal is the stage's own
        "layer-lowest",
        lambda lv: lv.req(Stage.GEN_MID, -1, 0, {"x": x(1)}),
        ProtocolError,
        "gen_mid names the first middle block; block -1 is not it",
    ),
    (
        "step-above",
        lambda lv: lv.req(Stage.GEN_MID, 1, 33),
        ProtocolError,
        "step must lie in [-1, 32], got 33",
    ),
    (
        "step-below",
        lambda lv: lv.req(Stage.GEN_MID, 1, -2),
        ProtocolError,
        "step must lie in [-1, 32], got -2",
    ),
    (
        "step-float",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0.0),
        ProtocolError,
        "step must be an integer, got float 0.0",
    ),
    (  # max_positions is a valid step for _parse: the refusal is the session's order
        "step-highest",
        lambda lv: lv.req(Stage.GEN_MID, 1, 32, {"x": x(1)}),
        ProtocolError,
        "generation step 32 out of order (at step -1)",
    ),
    (
        "seq-negative",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, seq=-1),
        ProtocolError,
        f"seq must lie in [0, {SEQ_HI}], got -1",
    ),
    (
        "seq-above",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, seq=SEQ_HI + 1),
        ProtocolError,
        f"seq must lie in [0, {SEQ_HI}], got {SEQ_HI + 1}",
    ),
    (  # 1 << 62 is a valid seq for _parse: the refusal is the session's order
        "seq-highest",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, seq=SEQ_HI),
        ProtocolError,
        "message out of order: expected seq {seq}, got " + str(SEQ_HI),
    ),
    (
        "seq-bool",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, seq=True),
        ProtocolError,
        "seq must be an integer, got bool True",
    ),
    (  # 256 characters is a well-formed token: the refusal is the session's (a wrong token)
        "token-256",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, token="t" * 256),
        SessionError,
        "unknown session or invalid session token",
    ),
    (
        "arrays-not-mapping",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, [("x", x(1))]),
        ProtocolError,
        "arrays must be a mapping with string keys",
    ),
    (
        "arrays-int-key",
        lambda lv: lv.req(Stage.GEN_MID, 1, 0, {0: x(1)}),
        ProtocolError,
        "arrays must be a mapping with string keys",
    ),
    (
        "meta-not-mapping",
        lambda lv: _with_meta(lv.req(Stage.GEN_MID, 1, 0, {"x": x(1)}), ["trace"]),
        ProtocolError,
        "meta must be a mapping with string keys",
    ),
    (
        "meta-int-key",
        lambda lv: _with_meta(lv.req(Stage.GEN_MID, 1, 0, {"x": x(1)}), {1: True}),
        ProtocolError,
        "meta must be a mapping with string keys",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "message"), [r[1:] for r in HEADER_REFUSALS], ids=[r[0] for r in HEADER_REFUSALS]
)
def test_header_fields_are_refused_by_name_at_their_bounds(
    build: Any, error: type[Exception], message: str
) -> None:
    """Each of layer, step, seq, token, arrays and meta is refused with a message that names the field and
    its allowed range; the value at each bound passes _parse (the refusal is then a later, other one). The
    session is left as it was."""
    lv = Live()
    sid = lv.client.session
    before = lv.server.sessions_snapshot(sid)
    with pytest.raises(error) as info:
        lv.server.handle(build(lv))
    assert type(info.value) is error and str(info.value) == message.format(seq=before["seq"])
    after = lv.server.sessions_snapshot(sid)
    assert (after["seq"], after["step"], after["gen_done"], after["cache_bytes"]) == (
        before["seq"],
        before["step"],
        before["gen_done"],
        before["cache_bytes"],
    )


# (id, stage, layer, arrays, the flag, a non-bool value, its refusal)
FLAG_CASES: list[tuple[str, Stage, int, dict[str, Any], str, Any, str]] = [
    ("trace", Stage.GEN_FFN, 0, {"x": x(1)}, "trace", "yes", "trace must be true or false, got str 'yes'"),
    ("last", Stage.GEN_FFN_DOWN, 0, {"m": x(1, 24)}, "last", 1, "last must be true or false, got int 1"),
    ("wide", Stage.GEN_QKV, 0, {"x": x(1)}, "wide", "true", "wide must be true or false, got str 'true'"),
]


@pytest.mark.parametrize(
    ("stage", "layer", "arrays", "flag", "value", "message"),
    [c[1:] for c in FLAG_CASES],
    ids=[c[0] for c in FLAG_CASES],
)
def test_meta_flags_must_be_booleans(
    stage: Stage, layer: int, arrays: dict[str, Any], flag: str, value: Any, message: str
) -> None:
    """trace, last and wide are refused unless true or false (a truthy 1 or "yes" is not silently read as
    a flag), naming the flag and the value; the session is unchanged and then takes the same message
    with a real boolean."""
    lv = Live()
    sid = lv.client.session
    seq = lv.server.sessions[sid].seq
    with pytest.raises(ProtocolError) as info:
        lv.server.handle(lv.req(stage, layer, 0, arrays, **{flag: value}))
    assert str(info.value) == message
    snap = lv.server.sessions_snapshot(sid)
    assert (snap["seq"], snap["step"]) == (seq, -1)
    reply = lv.server.handle(lv.req(stage, layer, 0, arrays, **{flag: False}))
    assert (reply.stage, reply.layer, reply.step, reply.seq) == (stage, layer, 0, seq)


@pytest.mark.parametrize("trace", [True, False])
def test_a_normalized_ffn_message_may_not_carry_trace(trace: bool) -> None:
    """trace belongs to the whole-MLP ffn stage: a normalized (blinded gate/up) ffn message carrying it at
    all is refused, and changes nothing; without it, or un-normalized with it, the message is accepted."""
    lv = Live()
    sid_token = lv.fresh()
    sid = sid_token[0]
    rows = N + R1
    lv.server.handle(lv.on(sid_token, Stage.QKV, 0, arrays={"x": x(rows)}, commit=COMMIT))
    before = lv.server.sessions_snapshot(sid)
    with pytest.raises(ProtocolError) as info:
        lv.server.handle(lv.on(sid_token, Stage.FFN, 0, arrays={"x": x(rows)}, normalized=True, trace=trace))
    assert str(info.value) == "ffn: trace is for the un-normalized (whole-MLP) stage only"
    after = lv.server.sessions_snapshot(sid)
    assert (after["seq"], after["layer"], after["ffn_done"]) == (before["seq"], 0, -1)
    up = lv.server.handle(lv.on(sid_token, Stage.FFN, 0, arrays={"x": x(rows)}, normalized=True))
    assert set(up.arrays) == {"y"} and up.arrays["y"].shape == (rows, 2 * CFG.intermediate_size)
    whole = lv.server.handle(lv.on(sid_token, Stage.FFN, 0, arrays={"x": x(rows)}, trace=True))
    assert "y" in whole.arrays and len(whole.arrays) > 1
    assert lv.server.sessions_snapshot(sid)["ffn_done"] == 0


@pytest.mark.parametrize("normalized", [None, False])
def test_an_unnormalized_moe_ffn_message_may_not_name_experts(normalized: bool | None) -> None:
    """On an MoE model the whole-MLP ffn stage (normalized absent or false) routes on the server, so a
    message naming experts is refused, naming the stage, and changes nothing; the normalized (blinded
    gate/up) ffn message naming the same experts is accepted."""
    w = random_weights(MOE, np.random.default_rng(3))
    server: Server[Any] = Server(NumpyBackend(w))
    sid = KeySchedule.new_nonce().hex()
    opened = server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META, level="blind")))
    token = str(opened.meta["token"])
    rows = N + R1

    def ffn(**meta: Any) -> Request:
        seq = server.sessions[sid].seq
        return Request(sid, Stage.FFN, 0, -1, seq, {"x": x(rows)}, meta, token)

    server.handle(Request(sid, Stage.QKV, 0, -1, 1, {"x": x(rows)}, {"commit": COMMIT}, token))
    before = server.sessions_snapshot(sid)
    meta: dict[str, Any] = {"experts": [0]} if normalized is None else {"experts": [0], "normalized": False}
    with pytest.raises(ProtocolError) as info:
        server.handle(ffn(**meta))
    assert str(info.value) == "ffn message carries experts it cannot use"
    after = server.sessions_snapshot(sid)
    assert (after["seq"], after["ffn_done"]) == (before["seq"], -1)
    assert server.cost(sid).stages[Stage.FFN].server_flops == 0
    up = server.handle(ffn(normalized=True, experts=[0]))
    assert up.arrays["y"].shape == (rows, 2 * MOE.intermediate_size)


def test_numpy_integer_header_fields_come_back_as_python_ints() -> None:
    """A message whose layer, step and seq are numpy integers is accepted, and the reply and the session
    hold them as plain Python ints (what a wire encoder such as json can write), not the request's type."""
    import json

    lv = Live()
    sid = lv.client.session
    seq = lv.server.sessions[sid].seq
    layer: Any = np.int64(0)
    step: Any = np.int64(0)
    reply = lv.server.handle(lv.req(Stage.GEN_QKV, layer, step, {"x": x(1)}, seq=np.int64(seq)))
    assert (reply.layer, reply.step, reply.seq) == (0, 0, seq)
    assert [type(v) for v in (reply.layer, reply.step, reply.seq)] == [int, int, int]
    assert json.dumps([reply.layer, reply.step, reply.seq]) == f"[0, 0, {seq}]"
    snap = lv.server.sessions_snapshot(sid)
    assert snap["seq"] == seq + 1 and snap["step"] == 0 and type(snap["step"]) is int


def test_every_stage_after_open_has_a_handler_method() -> None:
    """Each stage but OPEN and CLOSE (answered in ``handle`` itself) names a method of Server that computes
    it (``_HANDLERS``, looked up by name per message), and no name is left over."""
    from scx_ref.protocol.server import _HANDLERS
    from scx_ref.stages import Stage

    assert set(_HANDLERS) == set(Stage) - {Stage.OPEN, Stage.CLOSE}
    assert all(callable(getattr(Server, name, None)) for name in _HANDLERS.values())
    assert len(set(_HANDLERS.values())) == len(_HANDLERS)

"""Bad input to the protocol engine gets a clear SCXError and leaves the server exactly as it was.

Requests are crafted directly (:class:`~scx_ref.protocol.messages.Request`) against a server holding a
live session from a real prefill; ``Server.sessions_snapshot`` is compared array-for-array before and
after each rejected message, and afterwards the honest client carries on and still decodes exactly —
so a rejection can neither corrupt nor desynchronise the session.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import (
    DTypeError,
    LimitError,
    NonFiniteError,
    ProtocolError,
    SCXError,
    SessionError,
    ShapeError,
    VocabularyError,
)
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Request, SCXConfig, Server
from scx_ref.protocol.limits import ServerLimits
from scx_ref.protocol.server import commitment
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.refusals import refused
from tests.server_state import same
from tests.tiny import tiny_weights

Array = npt.NDArray[Any]
N, R1, R_LOCK, MAX_LEN = 6, 2, 3, 9
MASTER, NONCE = bytes(range(32)), bytes(range(40, 56))


def weights() -> ModelWeights:
    return tiny_weights(11, qkv_bias=True)


IDS = np.array([3, 1, 4, 1, 5, 9], dtype=np.int64)


@dataclass
class Live:
    """A server with a live session after a real prefill (keys not shared yet)."""

    w: ModelWeights
    server: Server[Any]
    link: LocalTransport
    client: Client[Any]
    ref: ReferenceModel
    cache: KVCache
    token: int

    @property
    def sid(self) -> str:
        return self.client.session

    @property
    def seq(self) -> int:
        return self.server.sessions[self.sid].seq

    def req(
        self,
        stage: str,
        layer: int = -1,
        step: int = -1,
        arrays: dict[str, Any] | None = None,
        seq: int | None = None,
        session: str | None = None,
        **meta: Any,
    ) -> Request:
        """A request on the live session, with its token (the capability ``open`` returned)."""
        token = self.client.state.token if self.client.state is not None else ""
        return Request(
            session or self.sid,
            Stage(stage) if stage in Stage._value2member_map_ else stage,  # type: ignore[arg-type]
            layer,
            step,
            self.seq if seq is None else seq,
            arrays or {},
            meta,
            token,
        )

    def keys(self) -> KeySchedule:
        return KeySchedule(MASTER, NONCE)

    def still_exact(self) -> None:
        """The honest client continues the session and matches plaintext (rtol 1e-10)."""
        got = self.client.decode(self.token, self.link)
        want = self.ref.decode(self.token, self.cache)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
        self.token = int(np.argmax(want))


@pytest.fixture
def live() -> Live:
    w = weights()
    backend = NumpyBackend(w)
    server: Server[Any] = Server(backend)
    link = LocalTransport(server)
    # the paper's generation flow (gen_attn sent), so that its arrays' checks are reached
    cfg = SCXConfig(
        level="paper", r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=MAX_LEN, gen_attention="server"
    )
    client: Client[Any] = Client(backend, KeySchedule(MASTER, NONCE), cfg)
    ref = ReferenceModel(w)
    logits, cache = ref.prefill(IDS)
    np.testing.assert_allclose(client.prefill(IDS, link), logits, rtol=1e-10, atol=1e-12)
    return Live(w, server, link, client, ref, cache, int(np.argmax(logits[-1])))


def rejected(live: Live, send: Callable[[], Any], error: type[SCXError], match: str | None = None) -> None:
    """``send()`` raises ``error`` and the server's session is bit-for-bit unchanged; the client goes on."""
    before = live.server.sessions_snapshot(live.sid)
    sessions = set(live.server.sessions)
    with pytest.raises(error, match=match):
        send()
    assert same(live.server.sessions_snapshot(live.sid), before), "a rejected message changed the session"
    assert set(live.server.sessions) == sessions


def test_snapshot_comparison_detects_a_change(live: Live) -> None:
    """Control: an accepted message does change the snapshot, so ``same`` can fail."""
    before = live.server.sessions_snapshot(live.sid)
    live.client.share_keys(live.link)
    assert not same(live.server.sessions_snapshot(live.sid), before)


# -- arrays: shape, dtype, finiteness --------------------------------------------------------------
BAD_ARRAYS: list[tuple[str, Any, type[SCXError]]] = [
    ("too many rows", np.zeros((2, 16)), ShapeError),
    ("too few columns", np.zeros((1, 15)), ShapeError),
    ("one-dimensional", np.zeros(16), ShapeError),
    ("integer dtype", np.zeros((1, 16), dtype=np.int64), DTypeError),
    ("complex dtype", np.zeros((1, 16), dtype=np.complex128), DTypeError),
    ("a list, not an array", [[0.0] * 16], DTypeError),
    ("NaN", np.where(np.arange(16) == 3, np.nan, 0.5).reshape(1, 16), NonFiniteError),
    ("+Inf", np.where(np.arange(16) == 0, np.inf, 0.5).reshape(1, 16), NonFiniteError),
    ("-Inf", np.full((1, 16), -np.inf), NonFiniteError),
]


@pytest.mark.parametrize(("what", "x", "error"), BAD_ARRAYS, ids=[b[0] for b in BAD_ARRAYS])
def test_bad_generation_array(live: Live, what: str, x: Any, error: type[SCXError]) -> None:
    live.client.share_keys(live.link)
    for stage, layer in (("gen_qkv", 0), ("gen_mid", 1), ("gen_last", 3), ("gen_ffn", 0)):
        rejected(live, lambda st=stage, ly=layer: live.server.handle(live.req(st, ly, 0, {"x": x})), error)
    live.still_exact()


def test_bad_attention_arrays(live: Live) -> None:
    live.client.share_keys(live.link)
    q, kv = np.zeros((1, 4, 4)), np.zeros((N + 1, 2, 4))
    cases = [
        ({"q": q, "k": kv}, ProtocolError),  # lacks v
        ({"q": q, "k": kv, "v": kv[:-1]}, ShapeError),  # cache one row short
        ({"q": q, "k": kv, "v": kv.astype(np.int32)}, DTypeError),
        ({"q": q * np.nan, "k": kv, "v": kv}, NonFiniteError),
    ]
    for arrays, error in cases:
        rejected(live, lambda a=arrays: live.server.handle(live.req("gen_attn", 0, 0, a)), error)
    live.still_exact()


def test_missing_array_and_unknown_stage(live: Live) -> None:
    rejected(live, lambda: live.server.handle(live.req("gen_qkv", 0, 0, {})), ProtocolError, "lacks array")
    rejected(
        live,
        lambda: live.server.handle(live.req("gen_qkv", 0, 0, {"x": np.zeros((1, 16)), "y": np.zeros(1)})),
        ProtocolError,
        "unknown array",
    )
    rejected(live, lambda: live.server.handle(live.req("teleport", 0, 0)), ProtocolError, "unknown stage")
    live.still_exact()


# -- token ids (client side: the server never sees them) -------------------------------------------
@pytest.mark.parametrize("ids", [[0, 32], [-1, 2], [3.0, 4.0], [[1, 2]], []])
def test_bad_prompt_ids(ids: Any) -> None:
    w = weights()
    backend = NumpyBackend(w)
    server: Server[Any] = Server(backend)
    link = LocalTransport(server)
    client: Client[Any] = Client(backend, KeySchedule.generate(), SCXConfig())
    with pytest.raises((VocabularyError, ProtocolError)):
        client.prefill(np.asarray(ids), link)
    assert server.sessions == {} and link.meter.stages == {}, "a bad prompt reached the server"


@pytest.mark.parametrize("token", [32, -1, 10**9])
def test_bad_decode_token(live: Live, token: int) -> None:
    # before key sharing: decode would share keys implicitly — a bad token must not get that far
    rejected(live, lambda: live.client.decode(token, live.link), VocabularyError)
    live.still_exact()


# -- nonces and sessions ---------------------------------------------------------------------------
def test_nonce_reused_for_another_prompt(live: Live) -> None:
    rejected(
        live,
        lambda: live.client.prefill(IDS[::-1].copy(), live.link, nonce=NONCE),
        SessionError,
        "nonce reused",
    )
    # the same prompt under the same nonce is not a *different* prompt, but the server still refuses
    # a second open of that session
    rejected(live, lambda: live.client.prefill(IDS, live.link, nonce=NONCE), SessionError)


def test_second_open_of_a_session(live: Live) -> None:
    meta = dict(n=N, r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=MAX_LEN, level="paper")
    rejected(live, lambda: live.server.handle(live.req("open", seq=0, **meta)), SessionError, "already")
    # another client (another master secret, no memory of this nonce) reusing the nonce: refused too
    other: Client[Any] = Client(live.client.b, KeySchedule(b"\x01" * 32, NONCE), live.client.cfg)
    rejected(live, lambda: other.prefill(IDS, live.link), SessionError)
    live.still_exact()


def test_unknown_session(live: Live) -> None:
    x = {"x": np.zeros((1, 16))}
    rejected(
        live,
        lambda: live.server.handle(live.req("gen_qkv", 0, 0, x, session="ab" * 16)),
        SessionError,
        "unknown session",
    )
    live.still_exact()


@pytest.mark.parametrize("delta", [-1, 1, 5])
def test_wrong_sequence_number(live: Live, delta: int) -> None:
    x = {"x": np.zeros((1, 16))}
    rejected(
        live,
        lambda: live.server.handle(live.req("gen_qkv", 0, 0, x, seq=live.seq + delta)),
        ProtocolError,
        "out of order",
    )
    live.still_exact()


# -- stage order -----------------------------------------------------------------------------------
def _open_fresh(live: Live) -> tuple[str, str]:
    """Open a second session on the same server by hand (prefill not run): (its id, its token)."""
    sid = "cd" * 16
    meta = dict(n=N, r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=MAX_LEN, level="paper")
    reply = live.server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, meta))
    return sid, str(reply.meta["token"])


def test_stages_out_of_order_in_a_fresh_session(live: Live) -> None:
    sid, token = _open_fresh(live)
    s = live.server.sessions[sid]
    qkv = np.zeros((N, 4, 4)), np.zeros((N, 2, 4))
    x_rows = np.zeros((N + R1, 16))
    commit = "0" * 64

    def req(
        stage: str, layer: int, step: int, arrays: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Request:
        return Request(sid, Stage(stage), layer, step, 1, arrays, meta or {}, token)

    bad = [
        req("attn", 0, -1, {"q": qkv[0], "k": qkv[1], "v": qkv[1]}),  # attn before qkv
        req("qkv", 1, -1, {"x": x_rows}, {"commit": commit}),  # block 1 before block 0
        req("head", 4, -1, {"x": x_rows}),  # head before every FFN stage
        req("ffn", 0, -1, {"x": x_rows}),  # ffn before qkv
        req("gen_qkv", 0, 0, {"x": np.zeros((1, 16))}),  # generation before the head stage
        req("share", 1, -1, {"perm": np.arange(N + R1)}, {"salt": "00" * 32}),  # share before head
        req("lock", 3, -1, {"k": np.zeros((N + R_LOCK, 8))}),  # lock before head
        req("qkv", 0, -1, {"x": x_rows}),  # qkv without its key commitment
        req("qkv", 7, -1, {"x": x_rows}, {"commit": commit}),  # no such layer
    ]
    for bad_req in bad:
        before = live.server.sessions_snapshot(sid)
        with pytest.raises(ProtocolError):
            live.server.handle(bad_req)
        assert same(live.server.sessions_snapshot(sid), before), f"{bad_req.stage} changed the fresh session"
    # the first message in order is accepted (so the rejections above were about order, not format)
    live.server.handle(req("qkv", 0, -1, {"x": x_rows}, {"commit": commit}))
    assert s.seq == 2 and 0 in s.raw


@pytest.mark.parametrize(
    "meta", [dict(n=0), dict(r1=-1), dict(max_length=4), dict(max_length=10**6), dict(l_s=0)]
)
def test_open_with_invalid_parameters(live: Live, meta: dict[str, Any]) -> None:
    full: dict[str, Any] = dict(
        n=N, r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=MAX_LEN, level="paper"
    )
    full.update(meta)
    with pytest.raises(ProtocolError):
        live.server.handle(Request("ef" * 16, "open", -1, -1, 0, {}, full))
    with pytest.raises(ProtocolError, match="lacks"):
        live.server.handle(Request("ef" * 16, "open", -1, -1, 0, {}, {"n": N}))
    assert "ef" * 16 not in live.server.sessions


def test_prefill_stage_after_the_prefill_finished(live: Live) -> None:
    x_rows = {"x": np.zeros((N + R1, 16))}
    rejected(live, lambda: live.server.handle(live.req("qkv", 0, -1, x_rows, commit="0" * 64)), ProtocolError)
    rejected(live, lambda: live.server.handle(live.req("head", 4, -1, x_rows)), ProtocolError)
    live.still_exact()


def test_generation_layer_roles_and_steps(live: Live) -> None:
    x = {"x": np.zeros((1, 16))}
    h = live.server.handle
    rejected(live, lambda: h(live.req("gen_mid", 1, 0, x)), ProtocolError, "shared")  # before sharing
    live.client.share_keys(live.link)
    rejected(live, lambda: h(live.req("gen_qkv", 1, 0, x)), ProtocolError, "not a first guard")
    rejected(live, lambda: h(live.req("gen_last", 2, 0, x)), ProtocolError, "not a last guard")
    rejected(live, lambda: h(live.req("gen_qkv", 0, 3, x)), ProtocolError, "out of order")  # skips a step
    rejected(live, lambda: h(live.req("gen_qkv", 0, -1, x)), ProtocolError)
    live.still_exact()  # step 0
    # replaying a cache-extending stage of the step just run would add a second row at its position
    rejected(live, lambda: h(live.req("gen_mid", 1, 0, x)), ProtocolError, "replay")
    rejected(live, lambda: h(live.req("gen_mid", 2, 0, x)), ProtocolError, "first middle block")
    rejected(live, lambda: h(live.req("gen_last", 3, 0, x)), ProtocolError, "replay")
    live.still_exact()  # step 1
    rejected(live, lambda: h(live.req("gen_qkv", 0, 0, x)), ProtocolError, "out of order")  # a past step
    live.still_exact()


# -- keys for the wrong layer ----------------------------------------------------------------------
def test_share_key_of_another_layer(live: Live) -> None:
    keys = live.keys()
    perm2, salt2 = keys.permutation(("tok", 2, "qkv"), N + R1), keys.key(("commit", 2)).hex()
    # layer 1 offered layer 2's key: the commitment of layer 1 does not match
    rejected(
        live,
        lambda: live.server.handle(live.req("share", 1, arrays={"perm": perm2}, salt=salt2)),
        SessionError,
        "commitment",
    )
    # layer 1's own permutation with layer 2's salt, and the right salt with another permutation
    perm1, salt1 = keys.permutation(("tok", 1, "qkv"), N + R1), keys.key(("commit", 1)).hex()
    assert commitment(bytes.fromhex(salt1), live.sid, 1, perm1) == live.server.sessions[live.sid].commits[1]
    rejected(
        live,
        lambda: live.server.handle(live.req("share", 1, arrays={"perm": perm1}, salt=salt2)),
        SessionError,
    )
    rejected(
        live,
        lambda: live.server.handle(live.req("share", 1, arrays={"perm": perm1[::-1].copy()}, salt=salt1)),
        SessionError,
    )
    # a key from another session (another master secret) for the right layer
    other = KeySchedule(b"\x01" * 32, NONCE)
    rejected(
        live,
        lambda: live.server.handle(
            live.req(
                "share",
                1,
                arrays={"perm": other.permutation(("tok", 1, "qkv"), N + R1)},
                salt=other.key(("commit", 1)).hex(),
            )
        ),
        SessionError,
    )
    live.still_exact()  # shares the real keys, then decodes exactly


def test_share_key_of_a_guard_layer(live: Live) -> None:
    keys = live.keys()
    for layer in (0, 3):  # first and last guard: their keys are never accepted (not by commitment)
        perm, salt = keys.permutation(("tok", layer, "qkv"), N + R1), keys.key(("commit", layer)).hex()
        before = live.server.sessions_snapshot(live.sid)
        with pytest.raises(ProtocolError, match="only middle") as info:
            live.server.handle(live.req("share", layer, arrays={"perm": perm}, salt=salt))
        assert not isinstance(info.value, SessionError)
        assert same(live.server.sessions_snapshot(live.sid), before)
    live.still_exact()


@pytest.mark.parametrize(
    "perm",
    [np.zeros(N + R1, dtype=np.int64), np.arange(N + R1 - 1), np.arange(N + R1, dtype=np.float64), None],
)
def test_malformed_share(live: Live, perm: Array | None) -> None:
    arrays = {} if perm is None else {"perm": perm}
    salt = live.keys().key(("commit", 1)).hex()
    rejected(live, lambda: live.server.handle(live.req("share", 1, arrays=arrays, salt=salt)), ProtocolError)
    rejected(
        live,
        lambda: live.server.handle(live.req("share", 1, arrays={"perm": np.arange(N + R1)}, salt="not hex")),
        ProtocolError,
    )
    live.still_exact()


def test_share_twice_and_lock_misuse(live: Live) -> None:
    live.client.share_keys(live.link)
    keys = live.keys()
    perm, salt = keys.permutation(("tok", 1, "qkv"), N + R1), keys.key(("commit", 1)).hex()
    rejected(
        live,
        lambda: live.server.handle(live.req("share", 1, arrays={"perm": perm}, salt=salt)),
        ProtocolError,
        "already",
    )
    k = {"k": np.zeros((N + R_LOCK, 8))}
    rejected(
        live, lambda: live.server.handle(live.req("lock", 1, arrays=k)), ProtocolError, "not a last guard"
    )
    rejected(live, lambda: live.server.handle(live.req("lock", 3, arrays=k)), ProtocolError, "already")
    live.still_exact()


# -- length limit ----------------------------------------------------------------------------------
def test_generation_past_max_length(live: Live) -> None:
    for _ in range(MAX_LEN - N):
        live.still_exact()
    assert live.server.sessions[live.sid].step == MAX_LEN - N - 1
    rejected(live, lambda: live.client.decode(live.token, live.link), ProtocolError, "maximum length")
    x = {"x": np.zeros((1, 16))}
    rejected(
        live, lambda: live.server.handle(live.req("gen_qkv", 0, MAX_LEN - N, x)), ProtocolError, "max length"
    )


def test_prompt_longer_than_max_length() -> None:
    w = weights()
    backend = NumpyBackend(w)
    server: Server[Any] = Server(backend)
    client: Client[Any] = Client(backend, KeySchedule.generate(), SCXConfig(max_length=4))
    with pytest.raises(ProtocolError, match="max_length"):
        client.prefill(IDS, LocalTransport(server))
    assert server.sessions == {}
    with pytest.raises(ProtocolError):
        Client(backend, KeySchedule.generate(), SCXConfig(max_length=w.config.max_positions + 1))


# -- open: each refusal names its field and bound; the limits hold at their exact boundaries --------
OPEN_META: dict[str, Any] = dict(
    n=N, r1=R1, r2=1, r_lock=R_LOCK, l_s=1, l_e=1, max_length=MAX_LEN, level="paper"
)
OTHER_SID = "ef" * 16
BIG = 1 << 62  # the largest decoy count a field may state (the server's limit then applies)
BAD_OPEN_FIELDS: list[tuple[dict[str, Any], str]] = [
    (dict(n=0), "n must lie in [1, 32], got 0"),
    (dict(n=33), "n must lie in [1, 32], got 33"),
    (dict(n=1.5), "n must be an integer, got float 1.5"),
    (dict(r1=-1), f"r1 must lie in [0, {BIG}], got -1"),
    (dict(r2=BIG + 1), f"r2 must lie in [0, {BIG}], got {BIG + 1}"),
    (dict(r_lock="3"), "r_lock must be an integer, got str '3'"),
    (dict(l_s=0), "l_s must lie in [1, 65536], got 0"),
    (dict(l_s=65537), "l_s must lie in [1, 65536], got 65537"),
    (dict(l_e=0), "l_e must lie in [1, 65536], got 0"),
    (dict(l_e=65537), "l_e must lie in [1, 65536], got 65537"),
    (dict(max_length=N - 1), f"max_length must lie in [{N}, 32], got {N - 1}"),
    (dict(level="secret"), "level must be one of ['permute', 'paper', 'blind'], got 'secret'"),
    (dict(attention="cloud"), "attention must be one of ['server', 'client'], got 'cloud'"),
    (dict(gen_linear="gpu"), "gen_linear must be one of ['client', 'server'], got 'gpu'"),
    (dict(gen_attention="tpu"), "gen_attention must be one of ['client', 'server'], got 'tpu'"),
    (
        dict(attention="client", gen_attention="server"),
        "open: gen_attention 'server' contradicts attention 'client'",
    ),
    (dict(wide=1), "wide must be true or false, got int 1"),
]


def _open_request(sid: str = OTHER_SID, **fields: Any) -> Request:
    """An ``open`` of session ``sid`` with :data:`OPEN_META` changed by ``fields``."""
    return Request(sid, Stage.OPEN, -1, -1, 0, {}, {**OPEN_META, **fields})


def _limited_server(**limits: Any) -> Server[Any]:
    return Server(NumpyBackend(weights()), ServerLimits(**limits))


@pytest.mark.parametrize(
    ("fields", "message"),
    BAD_OPEN_FIELDS,
    ids=[",".join(f"{k}={v}" for k, v in f.items()) for f, _ in BAD_OPEN_FIELDS],
)
def test_open_refusal_names_field_and_bounds(live: Live, fields: dict[str, Any], message: str) -> None:
    pattern = f"^{re.escape(message)}$"
    rejected(live, lambda: live.server.handle(_open_request(**fields)), ProtocolError, pattern)
    assert OTHER_SID not in live.server.sessions
    # the refusal left no memory of the nonce: the same session opens with valid fields
    assert live.server.handle(_open_request()).meta["token"]


def test_open_accepts_every_field_at_its_bound(live: Live) -> None:
    sizes = dict(n=32, max_length=32, l_s=1 << 16, l_e=1 << 16)
    sites = dict(attention="client", gen_attention="client", gen_linear="server", wide=True)
    reply = live.server.handle(_open_request(**sizes, **sites))
    s = live.server.sessions[OTHER_SID]
    assert reply.stage is Stage.OPEN and reply.seq == 0 and reply.arrays == {}
    assert (s.n, s.max_length, s.first, s.middle, s.last) == (32, 32, range(4), range(4, 4), range(4, 4))
    assert (s.attention, s.gen_attention, s.gen_linear, s.wide) == ("client", "client", "server", True)


@pytest.mark.parametrize("decoys", ["r1", "r2", "r_lock"])
def test_open_decoy_limit_counts_each_stage(decoys: str) -> None:
    server = _limited_server(max_decoys=8)
    small = dict(r1=1, r2=1, r_lock=1)
    with pytest.raises(LimitError, match=r"^9 decoy rows at one stage exceed the server's limit of 8$"):
        server.handle(_open_request(**{**small, decoys: 9}))
    assert server.sessions == {}
    server.handle(_open_request(**{**small, decoys: 8}))  # at the limit: accepted
    s = server.sessions[OTHER_SID]
    assert {"r1": s.r1, "r2": s.r2, "r_lock": s.r_lock} == {**small, decoys: 8}


@pytest.mark.parametrize("decoys", ["r1", "r2", "r_lock"])
def test_open_row_limit_counts_the_most_decoys_of_any_stage(decoys: str) -> None:
    server = _limited_server(max_rows=MAX_LEN + 5)
    small = dict(r1=1, r2=1, r_lock=1)
    message = f"a session of {MAX_LEN + 6} rows exceeds the server's limit of {MAX_LEN + 5} rows"
    with refused(LimitError, message):
        server.handle(_open_request(**{**small, decoys: 6}))
    assert server.sessions == {}
    server.handle(_open_request(**{**small, decoys: 5}))  # max_length + 5 rows: at the limit, accepted
    assert OTHER_SID in server.sessions


def test_open_without_wide_refuses_float64_messages(live: Live) -> None:
    sid, token = _open_fresh(live)  # its open does not mention wide: the session is not wide
    x_rows = {"x": np.zeros((N + R1, 16))}
    wide = Request(sid, Stage.QKV, 0, -1, 1, x_rows, {"commit": "1" * 64, "wide": True}, token)
    before = live.server.sessions_snapshot(sid)
    with pytest.raises(ProtocolError, match=r"^qkv: a float64 blinded message in a session not opened wide$"):
        live.server.handle(wide)
    assert same(live.server.sessions_snapshot(sid), before)
    live.server.handle(Request(sid, Stage.QKV, 0, -1, 1, x_rows, {"commit": "1" * 64}, token))
    assert live.server.sessions[sid].seq == 2


def test_open_token_is_256_random_bits(live: Live) -> None:
    _, token = _open_fresh(live)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), token  # URL-safe base64 of 32 bytes, unpadded
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert live.client.state is not None and token != live.client.state.token

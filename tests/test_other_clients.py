"""Other clients of the same server (DESIGN §5.5, issue 12): a session is a capability only its client
holds; a recorded transcript cannot be replayed; a finished session accepts nothing; a (master, nonce)
pair drives one session. Controls show each attack working where the defence does not apply.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import KeyScheduleError, ProtocolError, SessionError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights, random_weights

IDS = np.array([5, 9, 2, 17, 4, 11], dtype=np.int64)
NO_SESSION = "unknown session or invalid session token"


def weights() -> ModelWeights:
    cfg = ModelConfig(
        vocab_size=24, hidden_size=16, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=24
    )
    return random_weights(cfg, np.random.default_rng(7))


class Recorder:
    """A transport that keeps every request it forwards (a wire tap)."""

    def __init__(self, server: Server[Any]) -> None:
        self.inner = LocalTransport(server)
        self.meter = self.inner.meter
        self.requests: list[Request] = []

    def send(self, request: Request) -> Reply:
        self.requests.append(request)
        return self.inner.send(request)


def victim(cfg: SCXConfig | None = None) -> tuple[ModelWeights, Server[Any], Client[Any], LocalTransport]:
    """A server with a victim session after prefill and one decode step."""
    w = weights()
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), cfg or SCXConfig(level="paper", r1=2, r2=2))
    logits = client.prefill(IDS, link)
    client.decode(int(np.argmax(logits[-1])), link)
    return w, server, client, link


def test_a_message_without_the_token_is_refused_and_reveals_nothing() -> None:
    _, server, client, link = victim()
    sid, st = client.session, client.state
    assert st is not None and len(st.token) >= 43  # 256 bits, url-safe base64
    before = server.sessions_snapshot(sid)
    x = {"x": np.zeros((1, 16))}
    messages = {
        "no token": Request(sid, Stage.GEN_MID, 1, 1, st.seq, x),
        "a guessed token": Request(sid, Stage.GEN_MID, 1, 1, st.seq, x, {}, secrets.token_urlsafe(32)),
        "the token with one character changed": Request(
            sid, Stage.GEN_MID, 1, 1, st.seq, x, {}, ("A" if st.token[0] != "A" else "B") + st.token[1:]
        ),
        "a wrong seq and no token": Request(sid, Stage.GEN_MID, 1, 1, 0, x),
        "an unknown session": Request("ab" * 16, Stage.GEN_MID, 1, 1, st.seq, x, {}, st.token),
    }
    for what, req in messages.items():
        with pytest.raises(SessionError) as info:
            server.handle(req)
        assert str(info.value) == NO_SESSION, what  # no seq, no stage, nothing about the session
    assert set(server.sessions_snapshot(sid)) == set(before)
    assert server.sessions_snapshot(sid)["seq"] == before["seq"]
    # the victim carries on, exactly
    ref = ReferenceModel(weights())
    want, cache = ref.prefill(IDS)
    tok = int(np.argmax(want[-1]))
    want1 = ref.decode(tok, cache)
    got2 = client.decode(int(np.argmax(want1)), link)
    np.testing.assert_allclose(got2, ref.decode(int(np.argmax(want1)), cache), rtol=1e-10, atol=1e-10)


def test_the_token_of_one_session_does_not_open_another() -> None:
    w, server, client, _ = victim()
    other: Client[Any] = Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level="paper"))
    other.prefill(IDS, LocalTransport(server))
    assert other.state is not None and client.state is not None
    req = Request(
        other.session, Stage.GEN_MID, 1, 0, other.state.seq, {"x": np.zeros((1, 16))}, {}, client.state.token
    )
    with pytest.raises(SessionError, match=NO_SESSION):
        server.handle(req)


def test_a_replayed_transcript_fails() -> None:
    """A wire tap's transcript, replayed: refused at its first QKV message on the same server (the
    commitment was seen) and at key sharing on another server (commitments bind the session id).
    Control: the same transcript under the victim's own id, on a server that never saw it, is accepted
    message after message — it is well-formed; only those two defences stop the replay."""
    w = weights()
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    tap = Recorder(server)
    Client(b, KeySchedule.generate(), SCXConfig(level="paper", r1=2, r2=2)).generate(IDS, 3, tap)
    transcript = tap.requests
    assert transcript[0].stage is Stage.OPEN and transcript[-1].stage is Stage.CLOSE

    def replay(target: Server[Any], sid: str) -> tuple[int, Exception | None]:
        reply = target.handle(replace(transcript[0], session=sid))
        token = str(reply.meta["token"])
        for i, req in enumerate(transcript[1:], start=1):
            try:
                target.handle(replace(req, session=sid, token=token))
            except (ProtocolError, SessionError) as exc:
                return i, exc
        return len(transcript), None

    new_id = secrets.token_hex(16)
    done, exc = replay(server, new_id)
    assert done == 1 and isinstance(exc, SessionError) and "seen before" in str(exc)
    done, exc = replay(Server(b), new_id)
    share = next(i for i, r in enumerate(transcript) if r.stage is Stage.SHARE)
    assert done == share and isinstance(exc, SessionError) and "commitment" in str(exc)
    # control: the transcript itself is valid
    done, exc = replay(Server(b), transcript[0].session)
    assert exc is None and done == len(transcript)


def test_a_closed_session_accepts_nothing() -> None:
    w = weights()
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    tap = Recorder(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="paper"))
    tokens = client.generate(IDS, 4, tap)
    assert tokens == ReferenceModel(w).generate(IDS, 4)
    assert tap.requests[-1].stage is Stage.CLOSE
    assert server.sessions == {} and server.cache_bytes == 0  # the caches are freed
    st = client.state
    assert st is not None and st.closed
    gen_mid = next(r for r in tap.requests if r.stage is Stage.GEN_MID)
    with pytest.raises(SessionError, match=NO_SESSION):  # a third party extending the finished session
        server.handle(replace(gen_mid, seq=st.seq, step=gen_mid.step + 3))
    with pytest.raises(ProtocolError, match="closed"):  # the client itself sends nothing more
        client.decode(tokens[-1], tap)
    assert tap.requests[-1].stage is Stage.CLOSE


def test_a_new_prefill_closes_the_previous_session() -> None:
    w = weights()
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="permute"))
    link = LocalTransport(server)
    client.prefill(IDS, link)
    first = client.session
    client.prefill(IDS[:3], link)
    assert set(server.sessions) == {client.session} and client.session != first


# -- keys and nonces ----------------------------------------------------------------------------------
def test_one_key_schedule_drives_one_session() -> None:
    w = weights()
    b = NumpyBackend(w)
    link = LocalTransport(Server(b))
    keys = KeySchedule.generate()
    a: Client[Any] = Client(b, keys, SCXConfig())
    early: Client[Any] = Client(b, keys, SCXConfig())  # built before the pair was used
    a.prefill(IDS, link)
    with pytest.raises(SessionError, match="drove a session"):
        Client(b, keys, SCXConfig())  # a second client on the used pair
    with pytest.raises(SessionError, match="nonce reused"):
        early.prefill(IDS, LocalTransport(Server(b)))  # its first session would reuse the pair
    with pytest.raises(SessionError, match="nonce reused"):
        a.prefill(IDS, link, nonce=keys.nonce)  # a second open with the same pair
    fresh = KeySchedule.new_nonce()
    a.prefill(IDS, link, nonce=fresh)
    with pytest.raises(SessionError, match="drove a session"):  # for_nonce shares the claims
        Client(b, keys.for_nonce(fresh), SCXConfig())


def test_the_server_refuses_a_nonce_it_has_seen() -> None:
    """Even after the session closed, and from a client with another master secret."""
    w = weights()
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    nonce = KeySchedule.new_nonce()
    Client(b, KeySchedule(b"\x03" * 32, nonce), SCXConfig()).generate(IDS, 2, LocalTransport(server))
    assert server.sessions == {}
    with pytest.raises(SessionError, match="nonce"):
        Client(b, KeySchedule(b"\x04" * 32, nonce), SCXConfig()).prefill(IDS, LocalTransport(server))


def test_the_all_zero_master_secret_is_refused() -> None:
    with pytest.raises(KeyScheduleError, match="all-zero"):
        KeySchedule(bytes(32), KeySchedule.new_nonce())


def test_control_two_sessions_under_one_pair_cancel_the_noise() -> None:
    """Why one pair drives one session: two sessions under the same (master, nonce) — here two copies
    of the schedule on two servers, which no client-side or server-side memory can connect — send
    block 1's QKV rows with the *same* noise, permutation and decoys. Their difference is exactly the
    difference of the normalized embeddings of the one token that differs, in the clear."""
    w = weights()
    b = NumpyBackend(w)
    master, nonce = secrets.token_bytes(32), KeySchedule.new_nonce()
    other = IDS.copy()
    other[3] = 20
    views = []
    for prompt in (IDS, other):
        link = LocalTransport(Server(b), record_view=True)
        Client(b, KeySchedule(master, nonce), SCXConfig(level="paper", beta=5.0)).prefill(prompt, link)
        views.append(link.view.select(stage=Stage.QKV, layer=0)[0].arrays["x"])
    diff = views[0] - views[1]
    moved = np.flatnonzero(np.abs(diff).max(axis=1) > 0)
    assert len(moved) == 1  # every other row, decoys included, cancels exactly: noise and all
    emb = b.norm(b.embed(np.array([IDS[3], 20])), "attn", 0)
    np.testing.assert_allclose(diff[moved[0]], emb[0] - emb[1], atol=1e-12)

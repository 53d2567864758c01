"""The client's public calls after an error: a refused call changes nothing and names what was
wrong; a call cut short once a message may have gone leaves the session failed, never half-usable; and a
client cannot be driven by another master secret's verifier material."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import IntegrityError, ProtocolError, VocabularyError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.verify import SketchCache
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage

from .tiny import tiny_weights

W = tiny_weights(0)
PROMPT = np.array([3, 1, 4, 1, 5])


def _setup(**cfg: Any) -> tuple[Server[Any], LocalTransport, Client[Any]]:
    b = NumpyBackend(W)
    server: Server[Any] = Server(b)
    # l_s = l_e = 1 on 4 blocks: two middle blocks, so the first decode step shares keys
    return (
        server,
        LocalTransport(server),
        Client(b, KeySchedule.generate(), SCXConfig(**{"l_s": 1, "l_e": 1, **cfg})),
    )


class _Interrupted(LocalTransport):
    """Raises ``exc`` on its ``at``-th message (counting from 0), after handing it to the server when
    ``delivered`` (the ^C came while the reply was on its way)."""

    def __init__(self, server: Server[Any], exc: BaseException, at: int, delivered: bool) -> None:
        super().__init__(server)
        self.exc, self.at, self.delivered, self.count = exc, at, delivered, 0

    def send(self, request: Request) -> Reply:
        i, self.count = self.count, self.count + 1
        if i == self.at:
            if self.delivered:
                super().send(request)
            raise self.exc
        return super().send(request)


@pytest.mark.parametrize("delivered", [True, False])
@pytest.mark.parametrize("call", ["decode", "share_keys", "close"])
def test_an_interrupt_inside_the_transport_fails_the_session(call: str, delivered: bool) -> None:
    """A ^C (KeyboardInterrupt) raised by the transport while a message of ``decode``/``share_keys``/
    ``close`` is out: the session is failed, so the next call says so and sends nothing. Before, only an
    ``Exception`` failed it: the session stayed 'open' although the server had taken the message, and the
    next call died on the server's 'message out of order' / 'key already shared' (or, for close, a resent
    close under a dead session)."""
    server, link, client = _setup()
    logits = client.prefill(PROMPT, link)
    st = client.state
    assert st is not None
    at = 1 if call == "share_keys" else 0  # share_keys: the second block's key, after the first went
    bad = _Interrupted(server, KeyboardInterrupt(), at, delivered)
    with pytest.raises(KeyboardInterrupt):
        if call == "decode":
            client.decode(1, bad)
        elif call == "share_keys":
            client.share_keys(bad)
        else:
            client.close(bad)
    assert st.failed and not st.closed and st.step == 0 and not st.shared
    with pytest.raises(ProtocolError, match="this session failed on an earlier error"):
        client.decode(1, link)
    client.close()  # nothing is sent on a failed session
    # a new prefill works and decodes exactly as plaintext
    ref = ReferenceModel(W)
    assert client.generate(PROMPT, 3, link) == ref.generate(PROMPT, 3)
    assert int(np.argmax(logits[-1])) == ref.generate(PROMPT, 1)[0]


@pytest.mark.parametrize(
    ("token", "match"),
    [
        ([1], "token must be an integer, got list"),
        (np.array([1]), "token must be an integer, got ndarray"),
        (1.0, "token must be an integer, got float"),
        (True, "token must be an integer, got bool"),
        ("3", "token must be an integer, got str"),
        (None, "token must be an integer, got NoneType"),
        (-1, r"token must lie in \[0, 31\], got -1"),
        (32, r"token must lie in \[0, 31\], got 32"),
        (10**30, r"token must lie in \[0, 31\]"),
    ],
)
def test_decode_refuses_a_bad_token_by_name_and_the_session_goes_on(token: Any, match: str) -> None:
    """``decode`` takes one token id: anything else is a VocabularyError naming ``token`` and what it got,
    before anything is sent. Before, the token went through the prompt check as ``[token]``: ``[1]`` was
    'a 1-D integer array, got ... shape (1, 1)', 10**30 'must be integers, got dtype object'."""
    _, link, client = _setup()
    logits = client.prefill(PROMPT, link)
    st = client.state
    assert st is not None
    before = (st.seq, st.step, st.failed, st.closed, st.shared)
    with pytest.raises(VocabularyError, match=match):
        client.decode(token, link)
    assert (st.seq, st.step, st.failed, st.closed, st.shared) == before
    nxt = int(np.argmax(logits[-1]))
    got = int(np.argmax(client.decode(np.int64(nxt), link)))  # a numpy integer is an integer
    assert [nxt, got] == ReferenceModel(W).generate(PROMPT, 2)


def test_generate_of_no_new_tokens_refuses_a_prompt_longer_than_max_length() -> None:
    """``generate(ids, 0)`` checks the prompt as a prefill would ('a bad prompt is still an error'): one
    longer than ``max_length`` is refused before any nonce is claimed. Before, it returned [] although
    ``generate(ids, 1)`` and ``prefill(ids)`` refused that prompt."""
    _, link, client = _setup(max_length=7)
    long = np.arange(8) % 32
    reserved = client._next_nonce
    for n_new in (0, 1):
        with pytest.raises(ProtocolError, match="longer than max_length 7"):
            client.generate(long, n_new, link)
    with pytest.raises(ProtocolError, match="longer than max_length 7"):
        client.prefill(long, link)
    assert client.state is None and client._next_nonce == reserved
    assert reserved is not None and not client._master_keys.claims.claimed(reserved)
    assert client.generate(long[:7], 0, link) == []
    assert client.generate(long[:7], 1, link) == ReferenceModel(W).generate(long[:7], 1)


def test_a_new_prefill_goes_on_when_the_old_sessions_transport_raises_its_own_error() -> None:
    """The documented contract: a close of the previous session that fails does not stop the new one.
    Before, only SCXError and OSError were taken as such a failure: a custom transport's own error (here
    RuntimeError) at that close escaped from the new prefill after its nonce was claimed."""
    server, link, client = _setup()
    old_link = _Interrupted(server, RuntimeError("transport gone"), at=10**6, delivered=False)
    client.prefill(PROMPT, old_link)
    old = client.state
    assert old is not None
    old_link.at = old_link.count  # its next message (the close) raises
    logits = client.prefill(PROMPT, link)
    assert old.failed and not old.closed
    st = client.state
    assert st is not None and st is not old and not st.failed
    assert int(np.argmax(logits[-1])) == ReferenceModel(W).generate(PROMPT, 1)[0]
    assert client.generate(PROMPT, 3, link) == ReferenceModel(W).generate(PROMPT, 3)


def test_a_sketch_cache_of_another_master_secret_is_refused() -> None:
    """A SketchCache's bases come from its own master secret: a client of another master secret using it
    would verify every reply against check vectors its owner knows (who, with the server, could then pass
    any reply). Before, only another backend was refused."""
    b = NumpyBackend(W)
    owner = KeySchedule.generate()
    cache = SketchCache(b, owner)
    other = KeySchedule.generate()
    with pytest.raises(ProtocolError, match="another master secret"):
        Client(b, other, SCXConfig(), sketches=cache)
    assert not other.claims.claimed(other.nonce)
    # the owner's own sessions share it, and the refused schedule still drives a client of its own
    mine: Client[Any] = Client(b, owner.for_nonce(KeySchedule.new_nonce()), SCXConfig(), sketches=cache)
    theirs: Client[Any] = Client(b, other, SCXConfig())
    want = ReferenceModel(W).generate(PROMPT, 3)
    for client in (mine, theirs):
        assert client.generate(PROMPT, 3, LocalTransport(Server(b))) == want


@pytest.mark.parametrize("garbage", [None, "ok", Reply("x", Stage.OPEN, -1, -1, 0, {}, {})])
def test_a_garbage_reply_mid_decode_fails_the_session_with_an_integrity_error(garbage: Any) -> None:
    """A transport that answers a decode step with something that is not this message's reply: an
    IntegrityError, the session failed (nothing more sent), the step not committed."""
    server, link, client = _setup()
    client.prefill(PROMPT, link)
    st = client.state
    assert st is not None

    class Garbage(LocalTransport):
        def send(self, request: Request) -> Reply:
            super().send(request)
            return garbage  # type: ignore[no-any-return]

    with pytest.raises(IntegrityError):
        client.decode(1, Garbage(server))
    assert st.failed and st.step == 0
    with pytest.raises(ProtocolError, match="failed on an earlier error"):
        client.decode(1, link)

"""Keys derived ahead of the prompt (``Client.precompute``, :mod:`scx_ref.protocol.prepare`) are the keys
the client would derive itself: the server receives byte-identical messages and the client returns
identical logits, at every level, for the prefill and the generation steps, derived at once or in a
background thread; a precomputation for another length or nonce is not used; one-time material is
dropped once used."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ProtocolError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import CalibrationPool, Client, LocalTransport, SCXConfig, Server, ServerView
from scx_ref.protocol.decoys import default_public_tokens
from scx_ref.protocol.verify import SessionVerifier
from scx_ref.weights import random_weights
from tests.views import assert_same_view

MASTER = bytes(range(50, 82))
NONCE = bytes(range(16, 32))
N, STEPS = 9, 3


def _weights(moe: bool) -> Any:
    cfg = ModelConfig(
        vocab_size=48, hidden_size=16, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=24,
        n_experts=3 if moe else 0, top_k=2 if moe else 0, max_positions=32,
    )  # fmt: skip
    return random_weights(cfg, np.random.default_rng(11))


def _session(
    weights: Any, cfg: SCXConfig, pool: CalibrationPool, prepare: str | None, n: int = N
) -> tuple[list[np.ndarray], ServerView, Client[Any]]:
    """Prefill + key sharing + STEPS decode steps; ``prepare``: None (keys on demand), "now", "thread"."""
    backend = NumpyBackend(weights)
    link = LocalTransport(Server(backend), record_view=True)
    client: Client[Any] = Client(backend, KeySchedule(MASTER, NONCE), cfg, decoys=pool)
    if prepare is not None:
        client.precompute(n, steps=STEPS, nonce=NONCE, background=prepare == "thread")
    ids = np.random.default_rng(5).integers(0, weights.config.vocab_size, size=N)
    logits = [client.prefill(ids, link, nonce=NONCE)]
    client.share_keys(link)
    token = int(np.argmax(logits[-1][-1]))
    for _ in range(STEPS):
        logits.append(client.decode(token, link))
        token = int(np.argmax(logits[-1]))
    return logits, link.view, client


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("level", ["permute", "paper", "blind"])
def test_keys_derived_ahead_change_nothing_the_server_sees(level: str, moe: bool) -> None:
    weights = _weights(moe)
    pool = CalibrationPool.from_tokens(
        NumpyBackend(weights), default_public_tokens(weights.config.vocab_size)
    )
    cfg = SCXConfig(level=level, r1=3, r2=2, r_lock=2, l_s=1, l_e=1)  # type: ignore[arg-type]
    want, view, _ = _session(weights, cfg, pool, None)
    for prepare in ("now", "thread"):
        got, got_view, client = _session(weights, cfg, pool, prepare)
        assert_same_view(view, got_view)
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        assert client.state is not None
        prep = client.state.prep
        assert prep.seconds > 0 and not prep._blinding and not prep._heads and not prep._decoys  # all used
        assert prep.verifier is not None and not prep.verifier._lock_steps  # each step's sketch draw too


def test_locked_score_draws_of_the_steps_are_derived_ahead() -> None:
    """With verification, precompute(steps) derives each step's coefficient of the locked-score sketch for
    every last guard block — the draw the check would make itself (``RequestKeys.verify_lock``)."""
    weights = _weights(False)
    backend = NumpyBackend(weights)
    pool = CalibrationPool.from_tokens(backend, default_public_tokens(weights.config.vocab_size))
    cfg = SCXConfig(level="permute", l_s=1, l_e=2)
    client: Client[Any] = Client(backend, KeySchedule(MASTER, NONCE), cfg, decoys=pool)
    prep = client.precompute(N, steps=STEPS, nonce=NONCE)
    ver = prep.verifier
    assert ver is not None
    assert sorted(ver._lock_steps) == [(i, t) for i in (2, 3) for t in range(STEPS)]
    for (i, t), coef in ver._lock_steps.items():
        assert np.array_equal(coef, prep.keys.verify_lock(i, 1, ver.vectors, t))


def test_a_precomputation_for_a_shorter_length_is_not_used_a_longer_one_is() -> None:
    """Keys derived for fewer tokens than the prompt are not used (derived on demand instead); keys for
    more tokens serve it — the noise stream is read row by row, so their first rows are the prompt's own
    masks (the mask pool relies on this) and the server sees the same messages."""
    weights = _weights(False)
    pool = CalibrationPool.from_tokens(
        NumpyBackend(weights), default_public_tokens(weights.config.vocab_size)
    )
    cfg = SCXConfig(level="blind", r1=2, r2=2)
    want, view, _ = _session(weights, cfg, pool, None)
    got, got_view, client = _session(weights, cfg, pool, "now", n=N - 1)  # keys for 8 tokens, prompt of 9
    assert_same_view(view, got_view)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert client.state is not None and client.state.prep.seconds == 0  # derived on demand instead
    got, got_view, client = _session(weights, cfg, pool, "now", n=N + 3)  # keys for 12 tokens
    assert_same_view(view, got_view, rounding=True)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)  # η·W of a longer η: rounding may differ
    assert client.state is not None and client.state.prep.seconds > 0 and client.state.prep.remaining == 0


def test_precompute_reserves_the_next_nonce_and_rejects_an_empty_prompt() -> None:
    weights = _weights(False)
    backend = NumpyBackend(weights)
    pool = CalibrationPool.from_tokens(backend, default_public_tokens(weights.config.vocab_size))
    client: Client[Any] = Client(backend, KeySchedule(MASTER, NONCE), SCXConfig(level="permute"), decoys=pool)
    for bad in (0, client.max_length + 1):
        with pytest.raises(ProtocolError):
            client.precompute(bad)
    prep = client.precompute(4)
    ids = np.arange(4)
    client.prefill(ids, LocalTransport(Server(backend)))  # no nonce given: the reserved one
    assert client.state is not None and client.state.prep is prep and client.session == prep.nonce.hex()


def test_reply_checks_derived_ahead_are_the_sessions_own_and_dropped_after_a_rotation() -> None:
    """precompute derives the session's Freivalds check vectors (r, W r) with its keys: the prefill
    verifies with exactly those (the vectors an on-demand verifier draws for the same keys); when the
    client's basis was rotated in between (a detected tampering), they are not used: the session draws
    fresh ones from the new basis."""
    weights = _weights(False)
    backend = NumpyBackend(weights)
    pool = CalibrationPool.from_tokens(backend, default_public_tokens(weights.config.vocab_size))
    client: Client[Any] = Client(backend, KeySchedule.generate(), SCXConfig(level="permute"), decoys=pool)
    assert client.sketches is not None
    ids = np.arange(5)
    prep = client.precompute(5)
    ahead = prep.verifier
    assert ahead is not None and len(ahead._checks) == len(client.sketches.matrices())
    client.prefill(ids, LocalTransport(Server(backend)))
    assert client.state is not None and client.state.verifier is ahead and ahead.checks > 0
    fresh = SessionVerifier(backend, prep.keys, client.sketches)
    for which, layer, expert in client.sketches.matrices():
        a, b = ahead._check(which, layer, expert), fresh._check(which, layer, expert)
        assert np.array_equal(a.r, b.r) and np.array_equal(a.wr, b.wr), (which, layer)
    prep = client.precompute(5)
    stale = prep.verifier
    client.sketches.rotate()
    client.prefill(ids, LocalTransport(Server(backend)))
    assert client.state is not None and client.state.verifier is not None
    assert client.state.verifier is not stale and client.state.verifier.epoch == client.sketches.epoch
    assert stale is not None and not stale.current(client.sketches)


def test_tau_terms_an_earlier_session_used_are_derived_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The τ terms of a check depend on its vectors and a few constants only: the sketch cache notes the
    arguments a session computed them with, and the next precompute derives them, so the next prefill
    computes none of them (the first, with nothing noted yet, computes every one) — with the same
    verdicts (the verified logits equal the unverified ones)."""
    from scx_ref.protocol import verify

    weights = _weights(False)
    backend = NumpyBackend(weights)
    pool = CalibrationPool.from_tokens(backend, default_public_tokens(weights.config.vocab_size))
    client: Client[Any] = Client(backend, KeySchedule.generate(), SCXConfig(level="permute"), decoys=pool)
    plain: Client[Any] = Client(
        backend, KeySchedule(MASTER, NONCE), SCXConfig(level="permute", verify=False), decoys=pool
    )
    assert client.sketches is not None and client.sketches.noted_terms() == []
    computed: list[tuple[Any, ...]] = []
    tau_terms = verify._Check.tau_terms

    def counted(self: Any, u: float, extra_out: float, input_slack: float) -> Any:
        if ("tau", u, extra_out, input_slack) not in self.memo:
            computed.append((self.origin, u, extra_out, input_slack))
        return tau_terms(self, u, extra_out, input_slack)

    monkeypatch.setattr(verify._Check, "tau_terms", counted)
    ids = np.random.default_rng(3).integers(0, weights.config.vocab_size, size=N)
    want = plain.prefill(ids, LocalTransport(Server(backend)))
    per_request = []
    for _ in range(2):
        client.precompute(N)
        computed.clear()
        got = client.prefill(ids, LocalTransport(Server(backend)))
        per_request.append(len(computed))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    noted = client.sketches.noted_terms()
    assert per_request[0] == len(noted) > 0  # every check's terms computed in the request, each noted
    assert per_request[1] == 0  # all derived by the precompute
    assert {use[0] for use in noted} <= set(client.sketches.matrices())

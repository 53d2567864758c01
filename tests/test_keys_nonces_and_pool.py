"""The key schedule and the keys-ahead machinery (DESIGN §3, §5.7): ``NonceClaims``,
``Client.precompute`` / ``PreparedKeys`` and the mask pool. A nonce of the wrong type is a project error
(never a raw TypeError), one (master, nonce) pair's keys never serve two requests, a refused call leaves
the client and the pool usable, the pool's memory is bounded by the entries it holds, the keys are a pure
function of (master, nonce, lengths) whatever the global random state, and threads taking from a pool that
another thread fills each get a distinct entry."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.errors import KeyScheduleError, ProtocolError, SessionError
from scx_ref.keys import KeySchedule, NonceClaims
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.pool import MaskPool
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

W = tiny_weights(7)
MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))
PROMPT = np.array([3, 1, 4, 1, 5])


def _client(level: str = "blind", nonce: bytes = NONCE, **kw: Any) -> Client[Any]:
    return Client(NumpyBackend(W), KeySchedule(MASTER, nonce), SCXConfig(level=level, **kw))  # type: ignore[arg-type]


def _link(client: Client[Any]) -> LocalTransport:
    return LocalTransport(Server(client.b))


# -- nonce types -------------------------------------------------------------------------------------


def test_claims_read_a_bytearray_nonce_as_its_bytes_and_refuse_other_types() -> None:
    """``claimed(bytearray)`` raised a raw TypeError (unhashable), and ``claimed`` of a str said False."""
    claims = NonceClaims()
    claims.claim(bytearray(b"a" * 16))
    assert claims.claimed(b"a" * 16) and claims.claimed(bytearray(b"a" * 16))
    with pytest.raises(SessionError):
        claims.claim(b"a" * 16)  # the same nonce, whatever container it came in
    for bad in ([0] * 16, "a" * 16, None, 16):
        with pytest.raises(KeyScheduleError, match="a nonce must be bytes"):
            claims.claimed(bad)  # type: ignore[arg-type]


def test_precompute_takes_a_bytearray_nonce_and_refuses_it_once_claimed() -> None:
    """``precompute(nonce=bytearray(...))`` raised a raw TypeError before the claim check; now the keys are
    those of the nonce's bytes, and once that nonce drove a session a precompute under it is a SessionError
    that leaves the client as it was."""
    client = _client()
    nonce = bytearray(range(40, 56))
    prep = client.precompute(len(PROMPT), nonce=nonce)  # type: ignore[arg-type]
    assert prep.nonce == bytes(nonce)
    client.prefill(PROMPT, _link(client))  # no nonce given: the reserved one
    assert client.session == bytes(nonce).hex() and client._master_keys.claims.claimed(bytes(nonce))
    before = (client._next_nonce, client._prepared)
    with pytest.raises(SessionError):
        client.precompute(len(PROMPT), nonce=bytearray(nonce))  # type: ignore[arg-type]
    assert (client._next_nonce, client._prepared) == before


@pytest.mark.parametrize("bad", [[0] * 16, "n" * 16, 7, b"short"])
def test_a_refused_precompute_nonce_is_a_project_error_and_changes_nothing(bad: Any) -> None:
    client = _client()
    reserved, prepared = client._next_nonce, client._prepared
    with pytest.raises(KeyScheduleError):
        client.precompute(3, nonce=bad)
    assert client._next_nonce == reserved and client._prepared is prepared
    assert client.generate(PROMPT, 2, _link(client)) == ReferenceModel(W).generate(PROMPT, 2)


# -- PreparedKeys arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["a", 2.5, -1, True])
def test_prepared_keys_steps_must_be_an_integer_at_least_zero(steps: Any) -> None:
    """``prep.fill("a")`` / ``fill(2.5)`` raised a raw TypeError from ``range``; ``fill(-1)`` silently did
    nothing; ``start("a")`` failed only later, in its thread."""
    prep = _client().precompute(3)
    held = prep.remaining
    with pytest.raises(ProtocolError, match="steps"):
        prep.fill(steps)
    with pytest.raises(ProtocolError, match="steps"):
        prep.start(steps)
    prep.wait()  # nothing was started
    assert prep.remaining == held


def test_a_decoy_draw_that_needs_the_real_rows_is_a_project_error() -> None:
    prep = _client(level="permute", decoys="gaussian").precompute(3)
    with pytest.raises(ProtocolError, match="real rows"):
        prep.decoys(Stage.QKV, 0, 2, None)


# -- the mask pool ----------------------------------------------------------------------------------------


def test_pool_does_not_serve_an_entry_whose_nonce_already_drove_a_session() -> None:
    """A request given a pool entry's nonce explicitly claims it; the pool used to hand that entry to the
    next request anyway, whose prefill then failed with 'nonce reused'. Now the dead entry is dropped and the
    next one serves."""
    client = _client()
    pool = MaskPool(client, len(PROMPT), steps=1)
    pool.fill(2)
    used, spare = pool._entries[0].nonce, pool._entries[1].nonce
    link = _link(client)
    client.prefill(PROMPT, link, nonce=used)
    want = ReferenceModel(W).generate(PROMPT, 2)
    assert client.generate(PROMPT, 2, link) == want  # takes the spare entry
    assert client.session == spare.hex() and len(pool) == 0
    pool.fill(1)
    entry = pool._entries[0]
    client.prefill(PROMPT, link, nonce=entry.nonce)
    assert pool.take_fitting(len(PROMPT)) is None and len(pool) == 0  # dropped, never served
    with pytest.raises(ProtocolError, match="empty"):
        pool.take(1)


def test_pool_memory_is_bounded_by_the_entries_it_holds_and_a_used_nonce_is_never_refilled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool remembered every nonce it ever filled (a set that only grew); now only the held entries'
    nonces, and a nonce that already drove a session is refused by its master's claims instead."""
    client = _client(level="permute")
    pool = MaskPool(client, 2)
    for _ in range(20):
        pool.fill(1)
        pool.take(1)
    assert len(pool) == 0 and len(pool._nonces) == 0
    pool.fill(3)
    assert len(pool._nonces) == 3
    fixed = bytes(range(60, 76))  # a nonce generator that repeats (impossible with 128 bits, but checked)
    monkeypatch.setattr(KeySchedule, "new_nonce", staticmethod(lambda: fixed))
    pool2 = MaskPool(client, 2)
    pool2.fill(2)
    assert len(pool2) == 1  # the repeat of a held entry is not kept
    client.prefill(PROMPT[:2], _link(client))
    assert client.session == fixed.hex() and len(pool2) == 0
    pool2.fill(1)
    assert len(pool2) == 0  # the nonce drove a session: its masks are never kept again


def test_threads_taking_from_a_pool_filled_in_the_background_each_get_a_distinct_entry() -> None:
    client = _client(level="permute")
    pool = MaskPool(client, 3)
    pool.fill(24, background=True)
    got: list[Any] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(6):
            while True:
                entry = pool.take_fitting(2)
                if entry is not None:
                    break
            with lock:
                got.append(entry)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    pool.wait()
    assert len(got) == 24 and len({id(e) for e in got}) == 24 and len({e.nonce for e in got}) == 24
    assert len(pool) == 0 and pool.filled == 24 and all(e.n == 2 for e in got)


# -- determinism ---------------------------------------------------------------------------------------


def _key_material(nonce: bytes, seed: int) -> dict[str, list[np.ndarray]]:
    """The keys a precompute of 5 tokens and 2 steps derives under ``nonce`` (permutations, masks η and
    η·W, decoy rows), after seeding every global generator with ``seed``."""
    np.random.seed(seed)  # noqa: NPY002 (perturbed on purpose: the keys must not depend on it)
    random.seed(seed)
    torch.manual_seed(seed)
    client = _client(nonce=bytes(16))
    prep = client.precompute(5, steps=2, nonce=nonce)
    perms = [prep.token_perm(i).forward.copy() for i in range(W.config.n_layers + 1)]
    perms += [prep.block(i).head.sigmas.copy() for i in range(W.config.n_layers)]
    kept = [prep._blinding[k] for k in sorted(prep._blinding, key=repr)]
    return {
        "perms": perms,
        "eta": [np.asarray(eta).copy() for eta, _ in kept],
        "eta_w": [np.asarray(eta_w).copy() for _, eta_w in kept],
        "decoys": [np.asarray(prep._decoys[k]).copy() for k in sorted(prep._decoys, key=repr)],
    }


def test_keys_are_a_function_of_master_nonce_and_lengths_only() -> None:
    """A stateless client recomputes the same keys whatever the global random state (numpy's, ``random``'s,
    torch's), and leaves that state untouched; another nonce gives other keys."""
    nonce = bytes(range(100, 116))
    a, b = _key_material(nonce, 1), _key_material(nonce, 2)
    assert a["eta"] and a["decoys"] and a.keys() == b.keys()
    for kind in a:
        assert all(np.array_equal(x, y) for x, y in zip(a[kind], b[kind], strict=True)), kind
    other = _key_material(bytes(range(116, 132)), 1)
    assert not all(np.array_equal(x, y) for x, y in zip(a["perms"], other["perms"], strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(a["eta"], other["eta"], strict=True))
    np.random.seed(3)  # noqa: NPY002 (a known state, to see that nothing draws from it)
    random.seed(3)
    torch.manual_seed(3)
    states = (
        np.random.get_state()[1].copy(),  # type: ignore[index]  # noqa: NPY002 (read, to compare)
        random.getstate(),
        torch.get_rng_state().clone(),
    )
    client = _client()
    pool = MaskPool(client, 3, steps=1)
    pool.fill(1)
    client.precompute(3, steps=1)
    client.generate(PROMPT, 2, _link(client))
    assert np.array_equal(np.random.get_state()[1], states[0])  # type: ignore[index]  # noqa: NPY002 (read, to compare)
    assert random.getstate() == states[1]
    assert torch.equal(torch.get_rng_state(), states[2])


def test_a_pool_filled_by_another_client_is_refused_before_any_key_is_used() -> None:
    """Client B given client A's pool (``b.pool = a.pool``) ran its session on A's masks while claiming
    the nonce under B's master only, so A could later drive a second session with the same masks; now B's
    prefill is refused before anything is claimed, sent or taken from the pool."""
    from scx_ref.backends import NumpyBackend
    from scx_ref.errors import ProtocolError
    from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
    from scx_ref.protocol.pool import MaskPool
    from tests.tiny import tiny_weights

    w = tiny_weights(1)
    a = Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level="blind"))
    b = Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level="blind"))
    pool = MaskPool(a, 4, 1)
    pool.fill(1)
    b.pool = pool
    server = Server(b.b)
    with pytest.raises(ProtocolError, match="another client"):
        b.prefill(np.arange(4), LocalTransport(server))
    assert len(pool) == 1 and b.state is None and not server.sessions
    a.prefill(np.arange(4), LocalTransport(Server(a.b)))  # the owner takes its entry as before
    assert len(pool) == 0


def test_a_background_job_waits_for_every_thread_it_started() -> None:
    """Two fills of one pool started before a wait: the second start replaced the first one's handle, so
    ``wait`` returned while the first still ran (and would have lost its error); now it joins both and
    re-raises the first error."""
    from scx_ref.protocol.prepare import BackgroundJob

    job, release, done = BackgroundJob(), threading.Event(), []
    job.start(lambda: (release.wait(10), done.append("first")), "slow")
    job.start(lambda: done.append("second"), "quick")
    waiter = threading.Thread(target=job.wait)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "wait returned while the first job still ran"
    release.set()
    waiter.join(10)
    assert not waiter.is_alive() and sorted(done) == ["first", "second"]

    def fail() -> None:
        raise ProtocolError("the first job's error")

    job.start(fail, "fails")
    job.start(lambda: None, "fine")
    with pytest.raises(ProtocolError, match="first job's error"):
        job.wait()
    job.wait()  # raised once: nothing left

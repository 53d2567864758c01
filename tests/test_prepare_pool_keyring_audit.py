"""Audit of the client's key-derivation layer (:mod:`scx_ref.protocol.prepare`, :mod:`~scx_ref.protocol.pool`,
:mod:`~scx_ref.protocol.keyring`): a refused call leaves the keys derived ahead as they were, a key held ahead
is never handed out under another role than on demand, a discarded bundle refuses to fill with a project
error, and decoys drawn ahead from the client's default pool (each row handed out once) are the rows sent,
spent once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.decoys import CalibrationPool
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

CFG = SCXConfig(level="blind", r1=3, r2=2, r_lock=2, l_s=1, l_e=1)


@pytest.fixture(scope="module")
def client() -> Client[Any]:
    """A client with the default decoy policy: the secret calibration pool, each row handed out once."""
    c: Client[Any] = Client(NumpyBackend(tiny_weights(3)), KeySchedule.generate(), CFG)
    assert isinstance(c.decoys, CalibrationPool) and c.decoys._refill is not None
    return c


def _spent(pool: CalibrationPool) -> int:
    """Rows of ``pool`` handed out so far (its current epoch)."""
    return sum(int(used.sum()) for used in pool._used.values())


@pytest.mark.parametrize("count", [-1, 1.5, True])
def test_a_refused_decoy_count_keeps_the_rows_drawn_ahead(client: Client[Any], count: Any) -> None:
    """``decoys`` popped the rows drawn ahead before the policy refused the count: the next valid call
    drew other rows from the pool (spending more), not the ones derived ahead."""
    prep = client._new_prepared(KeySchedule.new_nonce(), 5).fill()
    held = prep._decoys[(Stage.QKV, 0)]
    assert isinstance(client.decoys, CalibrationPool)
    spent = _spent(client.decoys)
    with pytest.raises(ConfigError):
        prep.decoys(Stage.QKV, 0, count, None)
    assert prep._decoys.get((Stage.QKV, 0)) is held
    assert prep.decoys(Stage.QKV, 0, CFG.r1, None) is held
    assert _spent(client.decoys) == spent  # nothing drawn again


@pytest.mark.parametrize("ahead", [True, False])
def test_step_minus_one_is_no_generation_step(client: Client[Any], ahead: bool) -> None:
    """``gen_head`` keyed the one-time P of a step as (block, step) in the dict holding the prefill's P_i
    under (block, −1): a mask pool's entry answered step −1 with P_0, on demand a KeyScheduleError. Both
    routes refuse it alike, and the prefill's P_0 stays held."""
    nonce = KeySchedule.new_nonce()
    prep = client._new_prepared(nonce, 5)
    if ahead:
        prep.fill(perms=False)  # a pool entry: every P_i held, none of the permutations of n
        assert (0, -1) in prep._heads
    with pytest.raises(ProtocolError):
        prep.gen_head(0, -1)
    with pytest.raises(ProtocolError):
        prep.gen_head(0, np.float64(0.0))  # a float step would be truncated, not refused
    assert ((0, -1) in prep._heads) == ahead
    assert prep.block(0).head == client._new_prepared(nonce, 5).block(0).head
    assert prep.gen_head(0, 0) == client._new_prepared(nonce, 5).gen_head(0, 0)


@pytest.mark.parametrize("perms", [True, False])
def test_a_discarded_bundle_refuses_to_fill_with_a_project_error(client: Client[Any], perms: bool) -> None:
    """A fill of a discarded bundle raised the private ``_Discarded`` (no project error), after deriving
    every P_i first when ``perms=False``; now ProtocolError, nothing derived. A background start still
    stops silently."""
    prep = client._new_prepared(KeySchedule.new_nonce(), 5)
    prep.discard()
    with pytest.raises(ProtocolError, match="discarded"):
        prep.fill(2, perms=perms)
    assert not prep._heads and not prep._blocks and not prep._decoys and prep.remaining == 0
    prep.start(2)
    prep.wait()  # stopped, not failed
    assert prep.remaining == 0


def test_decoys_drawn_ahead_from_the_secret_pool_are_spent_once(client: Client[Any]) -> None:
    """Precomputed keys draw each (stage, layer)'s decoys once, as many rows as the on-demand prefill
    draws, and the prefill sends exactly those (nothing drawn again); a precomputation replaced before
    its prefill spends its rows (never sent) and the prefill that replaced it spends only its own."""
    pool = client.decoys
    assert isinstance(pool, CalibrationPool)
    link = LocalTransport(Server(client.b))
    ids = np.arange(6) % client.c.vocab_size
    epoch, before = pool.epoch, _spent(pool)
    client.prefill(ids, link)  # on demand
    on_demand = _spent(pool) - before
    assert on_demand > 0
    prep = client.precompute(6, steps=1)
    ahead = _spent(pool) - before - on_demand
    held = dict(prep._decoys)
    assert ahead == on_demand and len(held) > 0
    client.prefill(ids, link)
    assert _spent(pool) - before == 2 * on_demand and not prep._decoys
    assert client.state is not None and client.state.prep is prep
    client.precompute(6)  # replaced by a precomputation of another length under the same reserved nonce
    client.precompute(7)
    client.prefill(np.arange(7) % client.c.vocab_size, link)
    assert _spent(pool) - before == 4 * on_demand
    assert pool.epoch == epoch  # the tiny pool holds 256 rows a stage: no rebuild in this test

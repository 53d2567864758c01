"""A precompute whose derivation fails leaves the client as it was: the reserved nonce and the keys already
precomputed stay. Before: the reservation moved to the failed call's nonce first, so the next prefill
found the earlier precomputed keys under another nonce and threw them away."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.prepare import PreparedKeys
from tests.tiny import tiny_weights


def test_a_failed_precompute_moves_no_reservation(monkeypatch: pytest.MonkeyPatch) -> None:
    b = NumpyBackend(tiny_weights(2))
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(level="paper"))
    first = client.precompute(5)
    reserved = client._next_nonce
    assert reserved == first.nonce

    def broken(self: PreparedKeys[Any], steps: int = 0, perms: bool = True) -> PreparedKeys[Any]:
        raise ConfigError("derivation failed")

    with monkeypatch.context() as m:
        m.setattr(PreparedKeys, "fill", broken)
        with pytest.raises(ConfigError):
            client.precompute(5, nonce=KeySchedule.new_nonce())
    assert client._next_nonce == reserved
    assert client._prepared is first
    used: list[Any] = []
    real_take = client._take_prepared

    def spy(nonce: bytes, n: int) -> Any:
        got = real_take(nonce, n)
        used.append(got)
        return got

    monkeypatch.setattr(client, "_take_prepared", spy)
    client.prefill(np.array([1, 2, 3, 4, 5]), LocalTransport(Server(b)))
    assert used == [first]  # the keys precomputed before the failure served the prefill

"""A session that ends — closed, or failed on a refused reply — drops the one-time masks it still holds.

A request derived ahead (``Client.precompute(n, steps=K)``, or a mask pool's entry) holds (η, η·W) for every
generation step it may run. Before this, a request that stopped early kept the unused pairs in memory after
``close()`` or a failed reply check, until the client's next prefill replaced the bundle. They serve no later
message (each blinds one release of the ended session's nonce), so keeping them only kept secret key material
alive longer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import IntegrityError, ProtocolError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server, Stage
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.presets import preset
from scx_ref.reference import ReferenceModel
from tests.tiny import tiny_weights

MASTER = bytes(range(7, 39))
IDS = np.array([3, 11, 30, 6, 25])
STEPS = 4


def _client() -> Client[Any]:
    cfg = preset("hardened").config(4)  # every linear stage of every block blinded, generation included
    cfg = SCXConfig(**{**cfg.to_dict(), "max_length": 32})
    return Client(NumpyBackend(tiny_weights(5)), KeySchedule(MASTER, bytes(16)), cfg)


class _TamperGeneration(LocalTransport):
    """An honest server until the first generation step's first reply, whose first array it shifts."""

    def send(self, req: Request) -> Reply:
        reply = super().send(req)
        if req.step >= 0 and req.stage is not Stage.CLOSE and reply.arrays:
            name = next(iter(reply.arrays))
            arrays = {**reply.arrays, name: reply.arrays[name] + 1.0}
            return Reply(reply.session, reply.stage, reply.layer, reply.step, reply.seq, arrays, reply.meta)
        return reply


def test_close_drops_the_masks_of_generation_steps_never_run() -> None:
    client = _client()
    prep = client.precompute(len(IDS), steps=STEPS)
    held = prep.remaining
    link = LocalTransport(Server(client.b))
    logits = client.prefill(IDS, link)
    ref = ReferenceModel(tiny_weights(5))
    want, _ = ref.prefill(IDS)
    assert np.array_equal(np.argmax(logits[-1]), np.argmax(want[-1]))
    assert client.state is not None and client.state.prep is prep
    after_prefill = prep.remaining
    assert 0 < after_prefill < held  # the prefill's pairs are used; the STEPS steps' pairs still held
    client.decode(int(np.argmax(logits[-1])), link)
    assert 0 < prep.remaining < after_prefill  # one step's pairs used, three steps' left
    client.close()
    assert prep.remaining == 0 and prep.mask_bytes == 0
    # the session is over: nothing more is sent on it, and closing again sends nothing
    with pytest.raises(ProtocolError, match="closed"):
        client.decode(1, link)
    client.close()


def test_a_refused_reply_drops_the_masks_of_the_failed_session() -> None:
    client = _client()
    prep = client.precompute(len(IDS), steps=STEPS)
    link = _TamperGeneration(Server(client.b))
    logits = client.prefill(IDS, link)
    assert prep.remaining > 0
    with pytest.raises(IntegrityError):
        client.decode(int(np.argmax(logits[-1])), link)
    assert client.state is not None and client.state.failed
    assert prep.remaining == 0 and prep.mask_bytes == 0


def test_a_new_prefill_closes_the_old_session_and_drops_its_masks() -> None:
    client = _client()
    prep = client.precompute(len(IDS), steps=STEPS)
    link = LocalTransport(Server(client.b))
    client.prefill(IDS, link)
    assert prep.remaining > 0
    client.prefill(IDS[:3], link)  # the old session is closed on its link before the new one opens
    assert prep.remaining == 0

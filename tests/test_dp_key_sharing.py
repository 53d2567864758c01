"""The budget counts what key sharing reveals whenever the client shares keys, not only when it decodes.

Before: ``request_budget`` took key sharing to happen exactly when T ≥ 2 tokens are generated, so for a
client that calls ``Client.share_keys`` after a prefill alone (a public method: the server can then decode
the middle blocks' caches) the middle blocks' noised QKV rows at level ``blind`` — whose noise α_i the
upload carries — were still counted as Laplace releases. ``key_sharing=True`` now says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.dp.budget import request_budget
from scx_ref.errors import ConfigError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.stages import Stage
from tests.tiny import tiny_weights


def _weights() -> Any:
    return tiny_weights(5, n_layers=4)


def test_sharing_keys_without_decoding_reveals_the_middle_blocks_noised_rows() -> None:
    w = _weights()
    cfg = SCXConfig(level="blind")
    plan = ReleasePlan.of(cfg, w.config)
    assert plan.shared  # the middle blocks' QKV stages are noised at level blind
    # what the client does: a prefill, then share_keys, no decode — the uploads carry every α_i
    b = NumpyBackend(w)
    link = LocalTransport(Server(b), record_view=True)
    client: Client[Any] = Client(b, KeySchedule.generate(), cfg)
    client.prefill(np.array([3, 1, 4, 1, 5]), link)
    client.share_keys(link)
    sent = {m.layer for m in link.view.select(stage=Stage.SHARE) if "alpha" in m.arrays}
    assert sent == {r.block for r in plan.shared}
    # the budget: with key_sharing=True those releases leave the guarantee and are listed as uncovered
    base = request_budget(w, cfg, prompt_len=5, tokens=1)
    shared = request_budget(w, cfg, prompt_len=5, tokens=1, key_sharing=True)
    assert not any("key sharing" in u for u in base.uncovered)
    assert any("key sharing" in u for u in shared.uncovered)
    counted = {(r.stage, r.block) for r in base.stages}
    left = {(r.stage, r.block) for r in shared.stages}
    assert counted - left == {("qkv", r.block + 1) for r in plan.shared}
    assert shared.epsilon_basic < base.epsilon_basic
    # decoding shares keys anyway: the default and True agree there
    dec = request_budget(w, cfg, prompt_len=5, tokens=3)
    assert request_budget(w, cfg, prompt_len=5, tokens=3, key_sharing=True).uncovered == dec.uncovered


def test_key_sharing_false_with_decode_steps_or_not_a_bool_is_refused() -> None:
    w = _weights()
    cfg = SCXConfig(level="blind")
    with pytest.raises(ConfigError, match="needs key sharing"):
        request_budget(w, cfg, prompt_len=5, tokens=2, key_sharing=False)
    with pytest.raises(ConfigError, match="key_sharing"):
        request_budget(w, cfg, prompt_len=5, tokens=1, key_sharing=1)  # type: ignore[arg-type]
    assert request_budget(w, cfg, prompt_len=5, tokens=1, key_sharing=False).uncovered == (
        request_budget(w, cfg, prompt_len=5, tokens=1).uncovered
    )

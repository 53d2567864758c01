"""The locked key caches of the last guard blocks (DESIGN §5.1 step 6) unlocked by the server with no key
(:func:`scx_ref.attacks.statelessness.unlock_locked`): from its own QKV-stage rows where they are not
noised, and from the attention stage wherever it runs the block's attention; the presets that keep the
guard blocks' attention on the client send no locked cache at all."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from scx_ref.attacks.statelessness import unlock_locked
from scx_ref.backends import NumpyBackend
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.presets import preset
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

IDS = np.array([3, 1, 4, 1, 5, 9, 2, 6])  # a repeated token: its two rows differ only by position


def _run(cfg: SCXConfig) -> tuple[dict[int, dict[str, object]], object, object]:
    w = tiny_weights(5)
    b = NumpyBackend(w)
    link = LocalTransport(Server(b), record_view=True)
    Client(b, KeySchedule.generate(), replace(cfg, max_length=20)).prefill(IDS, link)
    _, cache = ReferenceModel(w).prefill(IDS)
    return unlock_locked(link.view, w), cache, link.view


@pytest.mark.parametrize(
    ("cfg", "raw"),
    [(SCXConfig(level="permute"), True), (SCXConfig(), True), (SCXConfig(level="blind"), False)],
    ids=["permute", "paper", "blind"],
)
def test_the_last_guard_blocks_locked_cache_is_rebuilt_exactly_by_the_server(
    cfg: SCXConfig, raw: bool
) -> None:
    res, cache, _ = _run(cfg)
    assert res, "the default configurations lock the last guard block's keys"
    n = len(IDS)
    for i, r in res.items():
        assert r["raw"] == (n if raw else 0)  # noised QKV rows (level blind) place nothing
        assert r["attention"] == n  # the server runs the block's attention at every level here
        np.testing.assert_allclose(r["k"], cache.keys[i], rtol=1e-9, atol=1e-12)  # type: ignore[attr-defined]
        np.testing.assert_allclose(r["v"], cache.values[i], rtol=1e-9, atol=1e-12)  # type: ignore[attr-defined]


def test_client_attention_presets_send_no_locked_cache() -> None:
    res, _, view = _run(preset("hardened").build(4))
    assert res == {} and not view.select(stage=Stage.LOCK)


def test_locked_rows_of_another_request_unlock_nothing() -> None:
    """Negative control: the same view with the locked rows replaced by another prompt's places no row."""
    _, _, view = _run(SCXConfig())
    (lock,) = view.select(stage=Stage.LOCK)
    _, _, other_view = _run(SCXConfig())
    (other_lock,) = other_view.select(stage=Stage.LOCK)
    lock.arrays["k"] = np.random.default_rng(0).permutation(np.asarray(other_lock.arrays["k"]) + 0.5)
    assert all(
        r["raw"] == 0 and r["attention"] == 0 and r["k"] is None
        for r in unlock_locked(view, tiny_weights(5)).values()
    )

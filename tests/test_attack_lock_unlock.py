"""The locked key caches of the last guard blocks (DESIGN §5.1 step 6) unlocked by the server with no key
(:func:`scx_ref.attacks.statelessness.unlock_locked`): from its own QKV-stage rows where they are not
noised, and from the attention stage wherever it runs the block's attention; the presets that keep the
guard blocks' attention on the client send no locked cache at all."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.attacks._view import raw_qkv
from scx_ref.attacks.inversion import exact_matches
from scx_ref.attacks.statelessness import unlock_locked
from scx_ref.backends import NumpyBackend
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.presets import preset
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

IDS = np.array([3, 1, 4, 1, 5, 9, 2, 6])  # a repeated token: its two rows differ only by position
# Fixed keys: with fresh ones, about 1 request in 300 draws a QKV-stage decoy and a locked decoy from the same
# calibration token's rows, so two rows claim one position (tested on purpose below, not by chance here).
MASTER = b"lock-unlock test master secret 1"


def _run(
    cfg: SCXConfig, nonce: bytes = b"lock-unlock n 01"
) -> tuple[dict[int, dict[str, object]], object, object]:
    w = tiny_weights(5)
    b = NumpyBackend(w)
    link = LocalTransport(Server(b), record_view=True)
    Client(b, KeySchedule(MASTER, nonce), replace(cfg, max_length=20)).prefill(IDS, link)
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
        assert r["ambiguous"] == 0
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
    _, _, other_view = _run(SCXConfig(), b"lock-unlock n 02")
    (other_lock,) = other_view.select(stage=Stage.LOCK)
    lock.arrays["k"] = np.random.default_rng(0).permutation(np.asarray(other_lock.arrays["k"]) + 0.5)
    assert all(
        r["raw"] == 0 and r["attention"] == 0 and r["k"] is None
        for r in unlock_locked(view, tiny_weights(5)).values()
    )


def _collide(view: object, layer: int) -> int:
    """Overwrite one locked decoy row of ``layer`` with a QKV-stage decoy row's key, RoPE'd at a position p
    whose real row comes earlier in the QKV stage's row order (what a shared calibration token does by
    chance): two rows then claim p. Returns p."""
    w = tiny_weights(5)
    c = w.config
    (lock,) = view.select(stage=Stage.LOCK, layer=layer)  # type: ignore[attr-defined]
    locked = np.array(lock.arrays["k"], dtype=np.float64).reshape(-1, c.kv_dim)
    _, zk, _ = raw_qkv(view, w, layer)  # type: ignore[arg-type]
    zk3 = zk.reshape(len(zk), c.n_kv_heads, c.head_dim)
    real = {}  # position -> the QKV row and the locked row that hold it
    for p in range(len(IDS)):
        rot = ops.apply_rope(zk3, np.full(len(zk), p), c.rope_theta).reshape(len(zk), c.kv_dim)
        hits = exact_matches(rot, locked, 1e-4)
        (j,) = np.flatnonzero(hits >= 0)
        real[p] = (int(j), int(hits[j]))
    decoy_rows = sorted(set(range(len(zk))) - {j for j, _ in real.values()})
    decoy_locked = sorted(set(range(len(locked))) - {k for _, k in real.values()})
    j = decoy_rows[-1]
    p = next(q for q in range(len(IDS)) if real[q][0] < j)
    locked[decoy_locked[0]] = ops.apply_rope(zk3[j : j + 1], np.array([p]), c.rope_theta).reshape(c.kv_dim)
    lock.arrays["k"] = locked.reshape(np.shape(lock.arrays["k"]))
    return p


@pytest.mark.parametrize("attention", [True, False], ids=["attention-on-server", "no-attention-stage"])
def test_a_position_two_rows_claim_is_left_unplaced_by_the_raw_route(attention: bool) -> None:
    """A QKV-stage decoy whose key also sits in the locked cache (both drawn from one calibration token's
    rows) claims a real row's position: the raw route places neither, and the cache comes from the
    attention route where the server runs that block's attention, else from no route — never the decoy's
    row in the real one's place (the old route kept whichever row came last)."""
    res, cache, view = _run(SCXConfig())
    ((layer, clean),) = res.items()
    assert clean["raw"] == len(IDS) and clean["ambiguous"] == 0
    _collide(view, layer)
    if not attention:
        view.messages = [m for m in view.messages if m.stage != Stage.ATTN]  # type: ignore[attr-defined]
    r = unlock_locked(view, tiny_weights(5))[layer]  # type: ignore[arg-type]
    assert (r["raw"], r["ambiguous"]) == (len(IDS) - 1, 1)
    if attention:
        assert r["attention"] == len(IDS)
        np.testing.assert_allclose(r["k"], cache.keys[layer], rtol=1e-9, atol=1e-12)  # type: ignore[attr-defined]
        np.testing.assert_allclose(r["v"], cache.values[layer], rtol=1e-9, atol=1e-12)  # type: ignore[attr-defined]
    else:
        assert r["attention"] == 0 and r["k"] is None and r["v"] is None

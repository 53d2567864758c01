"""The harness context's memory across configurations (stop 75): one unit-vocabulary table shared by every
inverter it fits, and :meth:`~scx_ref.attacks.harness.Context.forget_setting_fits` dropping the inverters
fitted for one configuration — so that a frontier run of many configurations holds one configuration's at
a time (the SmolLM2 frontier of five blinded-everywhere presets was killed for memory at 23 GB) — without
changing any later result: a refit inverter is the same inverter."""

from __future__ import annotations

import numpy as np

from scx_ref.attacks import harness, llm_reorder
from scx_ref.attacks.inversion import unit_vocabulary
from tests.tiny import tiny_weights

#: tests/tiny.py's model, wide enough for the attacks and with the positions of 64-token public windows
W = tiny_weights(0, vocab_size=128, hidden_size=32, head_dim=8, intermediate_size=48, max_positions=4096)
L = W.config.n_layers
PROMPTS = [np.array([5, 17, 3, 99, 42, 8, 77, 64, 1, 30])]


def _ctx() -> harness.Context:
    return harness.Context(W, np.random.default_rng(6).integers(0, 128, 512), llm_reorder.NumpyLM(W))


def _setting(name: str) -> harness.Setting:
    return next(s for s in harness.frontier_settings(L) if s.preset == name)


def test_every_fit_of_a_context_decodes_with_its_one_vocabulary_table() -> None:
    """fit_tools, the noise-aware and the joint inverters all hold the context's one V × d table (each fit
    used to compute its own copy: 216 MiB apiece on SmolLM2), equal to unit_vocabulary's."""
    ctx = _ctx()
    harness.fit_tools(ctx, [harness.probe_block(_setting("hardened").config, L)], mlp=False)
    harness.run_setting(ctx, _setting("hardened"), PROMPTS, n_new=2)
    np.testing.assert_array_equal(ctx.vocabulary, unit_vocabulary(ctx.weights))
    tables = [inv.table for k, inv in ctx.inverters.items() if hasattr(inv, "table")]
    joint = [inv for k, inv in ctx.inverters.items() if k.startswith("joint/")]
    tables += [view.table for inv in joint for view, _ in inv.views]
    assert any(k.startswith("ffn-noisy/") for k in ctx.inverters) and joint
    assert len(tables) > 3 and all(t is ctx.vocabulary for t in tables)


def test_forgetting_a_configurations_fits_changes_no_later_result() -> None:
    """forget_setting_fits drops exactly the joint and noise-aware inverters (the plaintext tools of
    fit_tools and the exact token tables stay) and returns how many; the setting run again refits them
    and scores every attack as it did."""
    ctx = _ctx()
    hardened = _setting("hardened")
    harness.fit_tools(ctx, [harness.probe_block(hardened.config, L)], mlp=False)
    first = harness.run_setting(ctx, hardened, PROMPTS, n_new=2)
    held = set(ctx.inverters)
    per_setting = {k for k in held if k.startswith(harness.Context.SETTING_FITS)}
    assert any(k.startswith("joint/") for k in per_setting)
    assert any(k.startswith("ffn-noisy/") for k in per_setting)
    assert ctx.forget_setting_fits() == len(per_setting)
    assert set(ctx.inverters) == held - per_setting
    again = harness.run_setting(ctx, hardened, PROMPTS, n_new=2)
    assert set(ctx.inverters) == held
    assert again["metrics"] == first["metrics"] and again["baselines"] == first["baselines"]
    assert ctx.forget_setting_fits() == len(per_setting) and ctx.forget_setting_fits() == 0

"""Unit tests of scx_ref.dp against hand-computed values, bad input, and the ``scx dp`` CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from scx_ref.cli import main
from scx_ref.config import ModelConfig
from scx_ref.dp import (
    LaplaceMechanism,
    LayerSensitivities,
    ModelSensitivities,
    advanced_composition,
    advanced_composition_heterogeneous,
    basic_composition,
    basic_composition_heterogeneous,
    bayes_guess_bound,
    compose,
    expected_bruteforce_trials,
    l1_diameter,
    laplace_epsilon,
    laplace_scale_for_epsilon,
    log2_expected_bruteforce_trials,
    metric_dp_epsilon_per_unit,
    model_sensitivities,
    normalize_rows,
    per_coordinate_reading,
    permutation_bits,
    permutation_guess_probability,
    pld_available,
    pld_epsilon,
    request_budget,
    rmsnorm_l1_bound,
    rmsnorm_l2_bound,
    rmsnorm_sensitivity,
    statelessness_bound_paper,
)
from scx_ref.errors import ConfigError, NonFiniteError, SCXError
from scx_ref.weights import random_weights
from scx_ref.zoo import RANDOM_PRESETS, load_weights

needs_pld = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")


def _sens() -> ModelSensitivities:
    return ModelSensitivities(
        name="hand",
        hidden_size=8,
        vocab_size=100,
        n_layers=3,
        layers=tuple(LayerSensitivities(i, 3.0, 5.0, 4.0, 9.0) for i in range(3)),
        lm_head=6.0,
        embed_normalized_diameter=2.0,
    )


# ----------------------------------------------------------------------------- mechanisms


def test_laplace_hand_values() -> None:
    assert laplace_epsilon(1.0, 2.0) == 0.5
    assert laplace_epsilon(0.0, 2.0) == 0.0
    assert laplace_scale_for_epsilon(1.0, 0.5) == 2.0
    assert metric_dp_epsilon_per_unit(4.0) == 0.25
    m = LaplaceMechanism(3.0, 6.0, count=4)
    assert m.epsilon == 0.5 and m.delta == 0.0 and m.count == 4


def test_per_coordinate_reading_llama2_7b() -> None:
    r = per_coordinate_reading(0.25, 5.0, 4096)
    assert r.epsilon_per_coordinate == pytest.approx(0.05, rel=1e-15)
    assert r.l1_sensitivity == 1024.0
    assert r.epsilon_l1 == pytest.approx(204.8, rel=1e-15)
    d = r.to_dict()
    assert d["per_coordinate"]["is_dp_guarantee"] is False
    assert "NOT a differential-privacy guarantee" in d["per_coordinate"]["label"]
    assert d["l1"]["is_dp_guarantee"] is True


# ----------------------------------------------------------------------------- accountants


def test_basic_and_advanced_hand_worked() -> None:
    assert basic_composition(0.5, 10) == 5.0
    # ε = 0.1, k = 100, δ' = 1e-5: √(2·100·ln 1e5)·0.1 + 100·0.1·(e^0.1 − 1)
    #   = √(2302.585093)·0.1 + 10·0.105170918 = 4.798526 + 1.051709 = 5.850235
    assert advanced_composition(0.1, 100, 1e-5) == pytest.approx(5.850235, abs=2e-6)
    # k = 1, ε = 1, δ' = e^-2: √(2·1·2)·1 + 1·(e − 1) = 2 + 1.718281828
    assert advanced_composition(1.0, 1, math.exp(-2.0)) == pytest.approx(3.718281828459045, rel=1e-14)


def test_heterogeneous_composition() -> None:
    mechs = [LaplaceMechanism(1.0, 2.0, 3), LaplaceMechanism(2.0, 1.0, 1)]
    assert basic_composition_heterogeneous(mechs) == 3.5
    # √(2 ln(1/δ')·(3·0.25 + 4)) + 3·0.5·(e^0.5 − 1) + 2·(e² − 1), δ' = e^-1 → √9.5 + …
    expected = math.sqrt(9.5) + 1.5 * (math.exp(0.5) - 1) + 2 * (math.exp(2.0) - 1)
    assert advanced_composition_heterogeneous(mechs, math.exp(-1.0)) == pytest.approx(expected, rel=1e-14)
    same = [LaplaceMechanism(1.0, 4.0, 7)]
    assert advanced_composition_heterogeneous(same, 1e-6) == pytest.approx(
        advanced_composition(0.25, 7, 1e-6)
    )


def test_compose_reports_best_and_pld_flag() -> None:
    res = compose([LaplaceMechanism(1.0, 2.0, 100)], 1e-6)
    assert res.epsilon_basic == 50.0
    assert res.epsilon_best_closed_form == min(res.epsilon_basic, res.epsilon_advanced)
    d = res.to_dict()
    if pld_available():
        assert res.epsilon_pld is not None and res.epsilon_pld < res.epsilon_best_closed_form
        assert "epsilon_pld" in d
    else:
        assert "epsilon_pld" not in d
    assert "epsilon_pld" not in compose([LaplaceMechanism(1.0, 2.0)], 1e-6, use_pld=False).to_dict()


@needs_pld
def test_pld_single_laplace_exact_value() -> None:
    # one Laplace release, ε = 1: δ(ε') = 1 − e^{(ε' − ε)/2}, so ε(δ) = ε + 2 ln(1 − δ)
    eps = pld_epsilon([LaplaceMechanism(1.0, 1.0)], 0.01)
    assert eps == pytest.approx(1.0 + 2.0 * math.log(0.99), abs=2e-4)


@needs_pld
def test_budget_pld_matches_independent_dp_accounting() -> None:
    """The budget's tight number equals a separate PLDAccountant computation within 1e-6 relative."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    sens = ModelSensitivities(
        name="hand",
        hidden_size=8,
        vocab_size=100,
        n_layers=2,
        layers=(LayerSensitivities(0, 3.0, 5.0, 3.0, 9.0), LayerSensitivities(1, 3.0, 5.0, 3.0, 9.0)),
        lm_head=3.0,
        embed_normalized_diameter=2.0,
    )
    tokens, beta, delta = 40, 5.0, 1e-6
    steps = tokens - 1  # the first token comes from the prefill's logits
    b = request_budget(
        sens, level="paper", beta=beta, guard=1, prompt_len=8, tokens=tokens, delta=delta, guard_ffn="clear"
    )
    assert b.composition is not None and b.epsilon_pld is not None
    interval = b.composition.pld_interval
    assert interval is not None
    # the plan: block-1 QKV at prefill (Δ 2), then per step block-1 QKV (Δ 2) and the last guard block's
    # blinded FFN (exact last_ffn: gate/up Δ 3, down Δ 9)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    acc.compose(
        dp_event.ComposedDpEvent(
            [
                dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(noise_multiplier=beta / 2.0), 1 + steps),
                dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(noise_multiplier=beta / 3.0), steps),
                dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(noise_multiplier=beta / 9.0), steps),
            ]
        )
    )
    direct = acc.get_epsilon(delta)
    assert b.epsilon_pld == pytest.approx(direct, rel=1e-6)
    assert b.epsilon_basic == pytest.approx(((1 + steps) * 2.0 + steps * (3.0 + 9.0)) / beta)


# ----------------------------------------------------------------------------- permutation


def test_permutation_bounds() -> None:
    assert permutation_bits(4) == pytest.approx(math.log2(24), rel=1e-14)
    assert permutation_bits(3, 1) == pytest.approx(math.log2(24), rel=1e-14)
    assert permutation_guess_probability(4) == pytest.approx(1 / 24, rel=1e-13)
    assert expected_bruteforce_trials(4) == 12.5
    assert log2_expected_bruteforce_trials(4) == pytest.approx(math.log2(12.5), rel=1e-13)
    assert math.isinf(expected_bruteforce_trials(200))
    assert math.isfinite(permutation_bits(100_000))


def test_guess_bounds() -> None:
    assert bayes_guess_bound(0.0, 10) == pytest.approx(0.1)
    assert bayes_guess_bound(math.log(9.0), 10) == pytest.approx(0.5)  # 9 / (9 + 9)
    assert statelessness_bound_paper(0.0, 3, 10) == pytest.approx(1 / 6)  # max(1/3!, 1/10)
    assert statelessness_bound_paper(math.log(5.0), 3, 10) == pytest.approx(0.5)  # max(1/6, 5/10)
    assert statelessness_bound_paper(100.0, 3, 10) == 1.0  # clipped
    assert statelessness_bound_paper(1e6, 3, 10) == 1.0  # no overflow for huge ε
    assert bayes_guess_bound(1e6, 10) == 1.0
    assert bayes_guess_bound(2.0, 50) <= min(1.0, math.exp(2.0) / 50)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: laplace_epsilon(1.0, 0.0),
        lambda: laplace_epsilon(1.0, -1.0),
        lambda: laplace_epsilon(-1.0, 1.0),
        lambda: laplace_scale_for_epsilon(1.0, 0.0),
        lambda: advanced_composition(1.0, 5, 0.0),
        lambda: advanced_composition(1.0, 5, 1.0),
        lambda: advanced_composition(1.0, 5, 1.5),
        lambda: advanced_composition(1.0, 0, 1e-6),
        lambda: basic_composition(1.0, 0),
        lambda: basic_composition(1.0, 2.5),  # type: ignore[arg-type]
        lambda: LaplaceMechanism(1.0, 1.0, count=0),
        lambda: compose([], 1e-6),
        lambda: compose([LaplaceMechanism(1.0, 1.0)], -1e-6),
        lambda: per_coordinate_reading(0.25, 5.0, 0),
        lambda: permutation_bits(0),
        lambda: laplace_epsilon(True, 1.0),
        lambda: laplace_epsilon("1", 1.0),  # type: ignore[arg-type]
    ],
)
def test_bad_input_raises_config_error(call: object) -> None:
    with pytest.raises(ConfigError):
        call()  # type: ignore[operator]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_raises(value: float) -> None:
    with pytest.raises(NonFiniteError):
        laplace_epsilon(1.0, value)
    with pytest.raises(NonFiniteError):
        laplace_epsilon(value, 1.0)
    with pytest.raises(NonFiniteError):
        advanced_composition(1.0, 3, value)
    with pytest.raises(SCXError):
        basic_composition(1.0, value)  # type: ignore[arg-type]


def test_budget_bad_input() -> None:
    sens = _sens()
    for kwargs in (
        {"level": "nope"},
        {"beta": 0.0},
        {"beta": {"qkv": 1.0}},
        {"beta": {"bogus": 1.0, "default": 1.0}},
        {
            "guard": 0
        },  # a guard past the model is clamped, as the protocol does (test_plan_presets_cost_config)
        {"prompt_len": 0},
        {"tokens": -1},
        {"delta": 1.0},
        {"rows": "some"},
    ):
        with pytest.raises(SCXError):
            request_budget(sens, **kwargs)


# ----------------------------------------------------------------------------- sensitivity


def test_rmsnorm_bounds_hand_values() -> None:
    g = np.ones(4)
    assert rmsnorm_l2_bound(g) == 2.0  # √4·1
    assert rmsnorm_l1_bound(g) == 4.0  # √4·‖1‖₂ = 2·2
    assert rmsnorm_sensitivity(g) == 8.0
    # tight: x = 1, x' = −1 → x̂ = 1, x̂' = −1, ‖x̂ − x̂'‖₁ = 8
    xs = normalize_rows(np.array([[3.0, 3.0, 3.0, 3.0], [-2.0, -2.0, -2.0, -2.0]]), g)
    assert np.abs(xs[0] - xs[1]).sum() == pytest.approx(8.0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_l1_diameter_exact(backend: Literal["numpy", "torch"]) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((97, 13))
    brute = np.abs(x[:, None, :] - x[None, :, :]).sum(-1)
    d, i, j = l1_diameter(x, backend=backend, chunk_size=10, return_pair=True)
    assert d == pytest.approx(brute.max(), rel=1e-13)
    assert brute[i, j] == pytest.approx(brute.max(), rel=1e-13)
    assert l1_diameter(x[:1]) == 0.0


def test_model_sensitivities_tiny() -> None:
    w = load_weights("random:tiny-dense")
    s = model_sensitivities(w)
    assert s.embed_normalized_diameter is not None and s.embed_raw_diameter is not None
    assert 0 < s.embed_normalized_diameter <= rmsnorm_sensitivity(w.layers[0].attn_norm)
    assert s.block1_qkv == s.embed_normalized_diameter
    assert len(s.layers) == 4 and all(ls.o > 0 and ls.down > 0 for ls in s.layers)
    bound_only = model_sensitivities(w, embedding="bound")
    assert bound_only.embed_normalized_diameter is None and bound_only.block1_qkv == s.layers[0].qkv


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-qwen"])
def test_model_sensitivities_moe_and_bias(preset: str) -> None:
    w = random_weights(RANDOM_PRESETS[preset], np.random.default_rng(2))
    s = model_sensitivities(w, embedding="bound")
    assert all(math.isfinite(ls.down) and ls.o > 0 for ls in s.layers)


# ----------------------------------------------------------------------------- budget


def test_budget_counts_paper_level() -> None:
    b = request_budget(
        _sens(), level="paper", beta=2.0, guard=2, prompt_len=10, tokens=5, use_pld=False, guard_ffn="clear"
    )
    counts = [(s.phase, s.stage, s.block, s.count, s.sensitivity) for s in b.stages]
    # 5 tokens = 4 decode steps; guard 2 of 3 blocks: first guards 1-2 (QKV blinded, FFN clear), last
    # guard 3 (its FFN blinded: last_ffn="exact")
    assert counts == [
        ("prefill", "qkv", 1, 1, 2.0),
        ("generate", "gen_qkv", 1, 4, 2.0),
        ("generate", "gen_qkv", 2, 4, 3.0),
        ("generate", "gen_ffn_up", 3, 4, 4.0),
        ("generate", "gen_ffn_down", 3, 4, 9.0),
    ]
    assert b.epsilon_basic == pytest.approx((1 * 2.0 + 4 * 2.0 + 4 * 3.0 + 4 * 4.0 + 4 * 9.0) / 2.0)
    assert b.permutation_bits_per_stage == pytest.approx(permutation_bits(10))


def test_budget_counts_blinded_guard_ffn() -> None:
    """The protocol's default ``guard_ffn="blinded"`` adds the first guard blocks' MLP releases per step
    (the last guard blocks' MLP is blinded either way: ``last_ffn="exact"``)."""
    sens = _sens()
    clear = request_budget(sens, level="paper", beta=2.0, guard=1, tokens=5, use_pld=False, guard_ffn="clear")
    blinded = request_budget(sens, level="paper", beta=2.0, guard=1, tokens=5, use_pld=False)
    last = sens.n_layers
    mlp = [(s.kind, s.block, s.count) for s in blinded.stages if s.kind in ("gate_up", "down")]
    assert mlp == [("gate_up", 1, 4), ("down", 1, 4), ("gate_up", last, 4), ("down", last, 4)]
    mlp_clear = [(s.kind, s.block, s.count) for s in clear.stages if s.kind in ("gate_up", "down")]
    assert mlp_clear == [("gate_up", last, 4), ("down", last, 4)]
    added = 4 * (sens.layers[0].gate_up + sens.layers[0].down)
    assert blinded.epsilon_basic == pytest.approx(clear.epsilon_basic + added / 2.0)
    assert not any("guard-block FFN" in u for u in blinded.uncovered)
    assert any("guard-block FFN" in u for u in clear.uncovered)


def test_budget_counts_blind_level_and_rows() -> None:
    own = request_budget(_sens(), level="blind", beta=1.0, prompt_len=4, tokens=0, use_pld=False)
    # prefill: 3 blocks × (qkv + o + gate_up + down) + lm_head, one release each
    assert sum(s.count for s in own.stages) == 13
    assert own.epsilon_basic == pytest.approx((2 + 5 + 4 + 9) + 2 * (3 + 5 + 4 + 9) + 6)
    alln = request_budget(_sens(), level="blind", beta=1.0, prompt_len=4, tokens=0, rows="all", use_pld=False)
    assert sum(s.count for s in alln.stages) == 1 + 12 * 4
    gen = request_budget(
        _sens(), level="blind", beta={"default": 1.0, "down": 3.0}, prompt_len=4, tokens=2, use_pld=False
    )
    # 2 tokens = 1 decode step: first guard QKV + MLP (3) and last guard MLP (2); the middle block runs
    # on the server un-noised and the client applies W_o itself, so no O-stage release. Key sharing
    # uploads the middle block's prefill QKV noise, so that release is revealed, not counted.
    assert sum(s.count for s in gen.stages) == 13 - 1 + 5
    assert not any(s.stage == "qkv" and s.block == 2 for s in gen.stages)
    assert any("uploaded at key sharing" in u for u in gen.uncovered)
    assert {s.scale for s in gen.stages if s.kind == "down"} == {3.0}


def test_budget_permute_is_infinite() -> None:
    b = request_budget(_sens(), level="permute", prompt_len=6, decoys=2)
    assert math.isinf(b.epsilon_basic) and b.stages == ()
    assert b.permutation_bits_per_stage == pytest.approx(math.log2(math.factorial(8)))
    assert b.to_dict()["epsilon_basic"] == "inf"


def test_budget_from_weights_equals_from_sensitivities() -> None:
    w = load_weights("random:tiny-dense")
    a = request_budget(w, level="paper", guard=2, tokens=3, use_pld=False)
    b = request_budget(model_sensitivities(w), level="paper", guard=2, tokens=3, use_pld=False)
    assert a.epsilon_basic == b.epsilon_basic


# ----------------------------------------------------------------------------- CLI


def test_cli_raw_mode_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "raw.json"
    rc = main(
        [
            "dp",
            "--sensitivity",
            "1",
            "--scale",
            "2",
            "--compositions",
            "10",
            "--delta",
            "1e-6",
            "--delta-prime",
            "1e-5",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("epsilon_single", "epsilon_basic", "epsilon_advanced", "epsilon_best_closed_form"):
        assert key in data
    assert data["epsilon_single"] == 0.5 and data["epsilon_basic"] == 5.0
    assert data["epsilon_advanced"] == pytest.approx(advanced_composition(0.5, 10, 1e-5))
    assert ("epsilon_pld" in data) == pld_available()
    assert "advanced" in capsys.readouterr().out


def test_cli_per_coordinate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pc.json"
    assert main(["dp", "--per-coordinate", "0.25", "--scale", "5", "--dim", "4096", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["per_coordinate"]["epsilon"] == pytest.approx(0.05)
    assert data["per_coordinate"]["is_dp_guarantee"] is False
    assert data["l1"]["epsilon"] == pytest.approx(204.8)
    assert data["epsilon_single"] == pytest.approx(204.8)
    assert "NO" in capsys.readouterr().out


def test_cli_model_mode_json(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    rc = main(
        [
            "dp",
            "--model",
            "tiny-llama",
            "--level",
            "paper",
            "--beta",
            "5",
            "--guard",
            "1",
            "--prompt-len",
            "8",
            "--tokens",
            "4",
            "--guard-ffn",
            "clear",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("epsilon_basic", "epsilon_advanced", "stages", "sensitivities", "permutation_bits_per_stage"):
        assert key in data
    # 1 prefill release + 3 decode steps × (block-1 QKV + the last guard block's gate/up and down)
    assert data["releases"] == 1 + 3 * 3 and ("epsilon_pld" in data) == pld_available()
    assert {"stage", "block", "count", "sensitivity", "scale", "epsilon_each"} <= set(data["stages"][0])


def test_cli_model_random_preset_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "dp",
                "--model",
                "random:tiny-moe:3",
                "--level",
                "blind",
                "--beta",
                "qkv=5,default=50",
                "--embedding",
                "bound",
                "--no-pld",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["beta"]["down"] == 50.0
    assert main(["dp", "--model", "random:nope"]) == 2
    with pytest.raises(SystemExit) as usage:  # refused by the argument's type (argparse: exit 2)
        main(["dp", "--sensitivity", "1", "--scale", "0"])
    assert usage.value.code == 2
    assert main(["dp", "--sensitivity", "1", "--delta", "2"]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["dp", "--sensitivity", "1", "-k", "0"])
    assert usage.value.code == 2
    assert main(["dp"]) == 2
    big = tmp_path / "big.json"
    assert main(["dp", "--sensitivity", "1000", "--scale", "1", "--no-pld", "--json", str(big)]) == 0
    assert json.loads(big.read_text())["epsilon_advanced"] == "inf"
    assert main(["dp", "--per-coordinate", "0.25"]) == 2


def test_model_mode_accepts_any_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(
        vocab_size=16,
        hidden_size=8,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        head_dim=4,
        intermediate_size=8,
        name="custom-test",
    )
    monkeypatch.setitem(RANDOM_PRESETS, "custom-test", cfg)
    assert main(["dp", "--model", "random:custom-test:5", "--tokens", "2", "--no-pld"]) == 0


def test_closed_forms_work_without_dp_accounting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import scx_ref.dp.accountants as acc
    import scx_ref.dp.cli as dpcli

    monkeypatch.setattr(acc, "pld_available", lambda: False)
    monkeypatch.setattr(dpcli, "pld_available", lambda: False)
    res = compose([LaplaceMechanism(1.0, 2.0, 10)], 1e-6)
    assert res.epsilon_pld is None and res.epsilon_best == res.epsilon_best_closed_form
    assert pld_epsilon([LaplaceMechanism(1.0, 2.0)], 1e-6) is None
    out = tmp_path / "nopld.json"
    assert main(["dp", "--sensitivity", "1", "--scale", "2", "-k", "10", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "epsilon_pld" not in data and data["epsilon_basic"] == 5.0 and data["pld_installed"] is False


def test_cli_named_configuration(tmp_path: Path) -> None:
    """``--config`` reads the preset (its level, β, guards and options): the hardened configuration's
    budget lists nothing as uncovered, and costs more ε than level paper's (every stage is released)."""
    out = tmp_path / "h.json"
    args = ["dp", "--model", "random:tiny-dense:3", "--embedding", "bound", "--no-pld", "--prompt-len", "4"]
    assert main([*args, "--tokens", "3", "--config", "hardened", "--json", str(out)]) == 0
    hard = json.loads(out.read_text())
    assert hard["uncovered"] == [] and hard["level"] == "blind"
    assert any(s["stage"] == "gen_head" for s in hard["stages"])
    assert main([*args, "--tokens", "3", "--config", "paper", "--json", str(out)]) == 0
    paper = json.loads(out.read_text())
    assert paper["uncovered"] and paper["epsilon_basic"] < hard["epsilon_basic"]
    with pytest.raises(SystemExit):
        main([*args, "--config", "nope"])


def test_permute_budget_without_the_accountant_has_no_pld_epsilon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Level permute noises nothing: ε is +inf, and ``epsilon_pld`` follows the documented rule of every
    budget — None without dp_accounting (it was +inf, as if the accountant had run)."""
    import scx_ref.dp.budget as budget_module

    sens = _sens()
    assert request_budget(sens, level="permute", use_pld=False).epsilon_pld is None
    monkeypatch.setattr(budget_module, "pld_available", lambda: False)
    b = request_budget(sens, level="permute")
    assert b.epsilon_basic == math.inf and b.epsilon_pld is None
    assert "epsilon_pld" not in b.to_dict()


@pytest.mark.parametrize(("n", "r"), [(1, 0), (1, 3), (2, 1), (3, 2), (2, 3), (4, 0)])
def test_prompt_order_bits_count_the_distinct_orders_by_enumeration(n: int, r: int) -> None:
    """The prompt's order behind one permuted stage is which rows are real and in what order: every
    permutation of n + r rows enumerated, decoys interchangeable, gives (n + r)! / r! hypotheses — fewer
    than the permutation's (n + r)! by r! (what permutation_bits counts, the key's entropy)."""
    import itertools

    from scx_ref.dp import prompt_order_bits

    hypotheses = {p[:n] for p in itertools.permutations(range(n + r))}
    assert 2 ** prompt_order_bits(n, r) == pytest.approx(len(hypotheses), rel=1e-12)
    assert prompt_order_bits(n, r) == pytest.approx(permutation_bits(n, r) - math.log2(math.factorial(r)))

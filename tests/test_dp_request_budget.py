"""The per-request DP budget and ``scx dp``'s command line.

- The budget composes exactly the plan's Laplace releases (independent enumeration and an independent
  dp_accounting composition), for every preset, dense and MoE, guards past the model, per-kind β of 0.
- ``scx dp --beta 1e-320`` crashed after composing ("epsilon must be finite": the block-1 single-release
  reading divided by β itself); at level permute that reading was a finite ε for a release that is not sent.
- A per-kind β of 0 (``--beta o=0,default=5``) was refused though SCXConfig.stage_beta takes it.
- ``--json`` and the table lacked l_e, the guard FFN and a preset's attention / gen_linear options.
- A bad ``--beta``/``--delta`` was refused only after the model loaded and its sensitivities were computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from scx_ref.cli import main
from scx_ref.dp.budget import request_budget
from scx_ref.dp.sensitivity import ModelSensitivities, model_sensitivities
from scx_ref.protocol.config import SCXConfig
from scx_ref.protocol.plan import Release, ReleasePlan
from scx_ref.protocol.presets import PRESETS
from scx_ref.stages import Stage
from scx_ref.zoo import load_weights

from .tiny import tiny_weights

MODEL = "random:tiny-dense"  # 4 blocks, width 64, vocabulary 256


def _sens(moe: bool, n_layers: int = 3) -> ModelSensitivities:
    return model_sensitivities(tiny_weights(0, moe=moe, n_layers=n_layers))


def _d1(sens: ModelSensitivities, r: Release) -> float:
    if r.kind == "lm_head":
        return sens.lm_head
    ls = sens.layers[r.block]
    by_kind = {"o": ls.o, "gate_up": ls.gate_up, "router": ls.gate_up, "down": ls.down}
    return (sens.block1_qkv if r.block == 0 else ls.qkv) if r.kind == "qkv" else by_kind[r.kind]


def _independent(sens: ModelSensitivities, cfg: SCXConfig, n: int, tokens: int, rows: str) -> list[Any]:
    """(Δ₁, β, count) of every counted release, enumerated from the plan without the budget's code."""
    plan = ReleasePlan.of(cfg, sens)
    steps = max(tokens - 1, 0)
    middle = cfg.blocks(sens.n_layers)[1]
    out = []
    for r in plan.prefill:
        if steps and r.stage is Stage.QKV and r.block in middle:  # key sharing reveals it
            continue
        own = rows == "own" or (r.block == 0 and r.stage is Stage.QKV)
        out.append((_d1(sens, r), r.beta, 1 if own else n))
    if steps:
        out += [(_d1(sens, r), r.beta, steps) for r in plan.generation if r.kind != "offset"]
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_budget_composes_exactly_the_plan_releases_for_every_preset(moe: bool) -> None:
    sens = _sens(moe)
    configs = [p.config(3) for p in PRESETS]
    configs += [
        SCXConfig(level="paper", l_s=7, l_e=5, beta=2.0),  # guards past the model
        SCXConfig(level="blind", beta=2.0, stage_beta={"down": 0.0}, last_ffn="paper", attention="client"),
        SCXConfig(level="blind", beta=2.0, stage_beta={"router" if moe else "gate_up": 0.0}, l_s=2),
        SCXConfig(level="paper", beta=3.0, stage_beta={"qkv": 0.0}, gen_linear="server"),
    ]
    for cfg in configs:
        for n, tokens, rows in ((1, 0, "own"), (3, 1, "all"), (3, 4, "own"), (3, 4, "all")):
            b = request_budget(sens, cfg, prompt_len=n, tokens=tokens, rows=rows, use_pld=False)  # type: ignore[arg-type]
            want = _independent(sens, cfg, n, tokens, rows)
            assert sum(s.count for s in b.stages) == sum(c for *_, c in want), cfg
            if not want:
                assert math.isinf(b.epsilon_basic) and b.composition is None, cfg
                continue
            basic = math.fsum(c * d / beta for d, beta, c in want)
            assert b.epsilon_basic == pytest.approx(basic, rel=1e-12), cfg


def test_budget_pld_agrees_with_dp_accounting_composition() -> None:
    dp_event = pytest.importorskip("dp_accounting.dp_event")
    from dp_accounting.pld import pld_privacy_accountant

    sens = _sens(True)
    for name in ("paper", "hardened-b20"):
        cfg = next(p for p in PRESETS if p.name == name).config(3)
        b = request_budget(sens, cfg, prompt_len=2, tokens=3, pld_interval=1e-3)
        events = [
            dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(beta / d), c)
            for d, beta, c in _independent(sens, cfg, 2, 3, "own")
        ]
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        acc.compose(dp_event.ComposedDpEvent(events))
        want = acc.get_epsilon(1e-6)
        assert b.epsilon_pld is not None
        assert b.epsilon_pld == pytest.approx(want, rel=1e-4), name
        assert b.epsilon_best <= b.epsilon_basic


def _run_json(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "b.json"
    assert main(["dp", "--model", MODEL, *argv, "--json", str(out)]) == 0
    got: dict[str, Any] = json.loads(out.read_text())
    return got


def test_a_beta_below_the_float_range_reports_inf_not_an_error(tmp_path: Path) -> None:
    """Before: 'scx dp: error: epsilon must be finite and >= 0, got inf' after the whole composition."""
    for level in ("paper", "blind"):
        d = _run_json(tmp_path, "--level", level, "--beta", "1e-320", "--no-pld")
        assert d["epsilon_basic"] == "inf"
        assert d["block1_single_release"] == {"epsilon": "inf", "token_guess_bayes": 1.0}


def test_no_block1_release_no_block1_reading(tmp_path: Path) -> None:
    """Level permute sends no noised message: the block-1 single-release ε was a finite number (with its
    token-guess bound) beside ε = inf everywhere else."""
    d = _run_json(tmp_path, "--config", "permute", "--tokens", "3")
    assert d["releases"] == 0 and d["epsilon_basic"] == "inf" and d["epsilon_best"] == "inf"
    assert d["block1_single_release"] is None
    assert d["token_guess_bayes"] == 1.0
    d = _run_json(tmp_path, "--beta", "qkv=0,default=5")  # level paper, its one prefill release clear
    assert d["releases"] == 0 and d["epsilon_basic"] == "inf" and d["block1_single_release"] is None
    d = _run_json(tmp_path, "--config", "paper")
    assert d["block1_single_release"]["epsilon"] == d["stages"][0]["epsilon_each"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_per_kind_beta_of_zero_is_budgeted_as_the_config(moe: bool) -> None:
    """``beta={"o": 0, "default": 2}`` was refused ('beta[o] must be > 0') though SCXConfig takes it."""
    sens = _sens(moe)
    for kind in ("qkv", "o", "down", "router" if moe else "gate_up", "lm_head"):
        got = request_budget(sens, level="blind", beta={kind: 0.0, "default": 2.0}, tokens=3, use_pld=False)
        cfg = SCXConfig(level="blind", beta=2.0, stage_beta={kind: 0.0}, r1=0, r2=0)
        want = request_budget(sens, cfg, tokens=3, use_pld=False)
        assert got.epsilon_basic == want.epsilon_basic and got.stages == want.stages
        assert got.uncovered == want.uncovered and got.beta[kind] == 0.0
        assert all(s.scale > 0 for s in got.stages)


def test_cli_takes_a_per_kind_beta_of_zero(tmp_path: Path) -> None:
    d = _run_json(tmp_path, "--level", "blind", "--beta", "o=0,default=5", "--no-pld")
    assert d["beta"]["o"] == 0.0 and d["config"]["stage_beta"] == {"o": 0.0}
    assert not [s for s in d["stages"] if s["stage"] == "o"]
    assert any(u.startswith("prefill o ") for u in d["uncovered"])
    assert main(["dp", "--model", MODEL, "--beta", "default=0"]) == 2  # the default stays > 0


def test_json_and_table_report_the_whole_configuration(tmp_path: Path, capsys: Any) -> None:
    """``--config hardened`` on 4 blocks is l_s = 3, l_e = 1, client attention, W_o and head on the server:
    the table said only 'guard=3' and the JSON had neither l_e nor those options."""
    d = _run_json(tmp_path, "--config", "hardened", "--tokens", "2", "--no-pld")
    cfg = d["config"]
    assert (cfg["l_s"], cfg["l_e"], d["guard"]) == (3, 1, 3)
    assert (cfg["attention"], cfg["gen_linear"], cfg["level"]) == ("client", "server", "blind")
    head = capsys.readouterr().out.splitlines()[0]
    assert "guards=3/1" in head and "gen_linear=server" in head and "attention=client" in head
    d = _run_json(tmp_path, "--guard-ffn", "clear", "--no-pld")
    assert d["config"]["guard_ffn"] == "clear"
    head = capsys.readouterr().out.splitlines()[0]
    assert "guard=1 " in head and "guard_ffn=clear" in head


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--beta", "qkv=5"], "beta gives no scale"),
        (["--beta", "qkv=nan,default=5"], "beta[qkv]"),
        (["--beta", "default=0"], "beta[default]"),
        (["--delta", "1"], "delta must lie"),
        (["--delta-prime", "1"], "delta_prime must lie"),
        (["--level", "blind", "--beta", "1e300"], "beta must lie"),
    ],
)
def test_bad_values_are_refused_before_the_model_loads(
    argv: list[str], message: str, monkeypatch: Any, capsys: Any
) -> None:
    loaded: list[str] = []
    real = load_weights

    def spy(name: str, dtype: Any) -> Any:
        loaded.append(name)
        return real(name, dtype)

    monkeypatch.setattr("scx_ref.dp.cli.load_weights", spy)
    assert main(["dp", "--model", MODEL, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scx dp: error: ") and message in err
    assert loaded == []

"""Audit of the privacy measurements the README publishes (harness and frontier): a verdict must follow
from the numbers it stands on, a setting with no measurement never reads "hides", parts of two samples
never merge into one frontier, and the harness's arguments are checked when made.

Each test names what used to happen. Tiny random models only (tests/tiny.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import catalog, frontier, harness
from scx_ref.attacks.stats import Rate
from scx_ref.errors import ConfigError
from tests.tiny import tiny_weights

W = tiny_weights(0)
PUBLIC = np.random.default_rng(5).integers(0, 32, 256)


def _rate(k: float, n: float) -> dict[str, Any]:
    return Rate(k, n).to_dict()


def _setting(
    name: str, preset: str | None, rates: dict[str, dict[str, Any]], verdicts: dict[str, bool]
) -> dict[str, Any]:
    return {
        "setting": name,
        "preset": preset,
        "metrics": {k: r["rate"] for k, r in rates.items()},
        "rates": rates,
        "baselines": {"prompt_bag": _rate(10, 48), "prompt_pos": _rate(3, 48)},
        "at_baseline": verdicts,
        "cost": {"client_flop_share": 0.1, "offline_flop_share": 0.0},
    }


CONTROL = _setting("plaintext", None, {"vm_qkv1_bag_recall": _rate(48, 48)}, {"vm_qkv1_bag_recall": False})


def test_a_verdict_its_own_numbers_contradict_is_not_at_baseline() -> None:
    """Was: the frontier took each stored ``at_baseline`` verdict on trust, so a setting recording 45 of 48
    prompt tokens recovered against a prior whose upper bound is 0.34 — judged "at baseline" (a
    hand-edited file, or a part written by a version with another rule) — was the cheapest configuration
    "with every attack at its baseline". A verdict the numbers agree with still counts."""
    leaks = _setting("paper", "paper", {"vm_qkv1_bag_recall": _rate(45, 48)}, {"vm_qkv1_bag_recall": True})
    hides = _setting("blind", "blind", {"vm_qkv1_bag_recall": _rate(9, 48)}, {"vm_qkv1_bag_recall": True})
    rows = frontier.frontier_rows({"settings": [CONTROL, leaks, hides]})
    assert not rows[1]["all_at_baseline"] and rows[1]["above_baseline"] == ["vm_qkv1_bag_recall"]
    assert rows[2]["all_at_baseline"] and rows[2]["above_baseline"] == []
    best = frontier.cheapest_at_baseline(rows)
    assert best is not None and best["name"] == "blind"
    # the same numbers through the report: the leaking setting is not named the cheapest that hides
    text = frontier._verdict_text(frontier.frontier_rows({"settings": [CONTROL, leaks]}))
    assert text.startswith("**No configuration reaches the baseline")


def test_a_verdict_without_a_measurement_does_not_read_as_hides() -> None:
    """Was: a setting whose ``at_baseline`` said true for an attack it never scored (no ``rates`` at all, or
    a rate over no token) read "every attack at baseline" — the safe reading of no measurement is the
    other one."""
    empty = _setting("hardened", "hardened", {}, {"vm_qkv1_bag_recall": True, "stateless_top1": True})
    # nor one whose only attack scored no token (its interval [0, 1] passes anything)
    none = _setting("no-share", "no-share", {"vm_qkv1_bag_recall": _rate(0, 0)}, {"vm_qkv1_bag_recall": True})
    rows = frontier.frontier_rows({"settings": [CONTROL, empty, none]})
    assert not rows[1]["all_at_baseline"] and not rows[2]["all_at_baseline"]
    assert frontier.cheapest_at_baseline(rows) is None


def test_the_harness_verdicts_follow_from_its_numbers() -> None:
    """Guard (held before the audit): every verdict ``run_setting`` writes is "rate ≤ the upper bound of the
    catalog's baseline for that attack" over the tokens it scores, and the frontier reads the same verdict
    back — on the plaintext control (attacks above their baseline) and on ``hardened`` (some at it)."""
    ctx = harness.Context(W, PUBLIC, None, window=32)
    settings = harness.frontier_settings(W.config.n_layers)
    chosen = [s for s in settings if s.preset in (None, "hardened")]
    harness.fit_tools(ctx, sorted({harness.probe_block(s.config, 4) for s in chosen}), mlp=False)
    ids = np.random.default_rng(9).integers(0, 32, 10)
    results = [harness.run_setting(ctx, s, [ids], 3) for s in chosen]
    for res in results:
        assert res["at_baseline"]
        for key, verdict in res["at_baseline"].items():
            r, b = res["rates"][key], res["baselines"][catalog.metric(key).baseline]
            assert verdict == (r["rate"] <= b["hi"])
        for key in res["rates"]:
            assert key in res["at_baseline"] or not catalog.metric(key).attack
    assert not all(results[0]["at_baseline"].values())  # the control's attacks work
    assert any(results[1]["at_baseline"].values())  # and hardened's verdicts are not all "above"
    rows = frontier.frontier_rows({"settings": results})
    for row, res in zip(rows, results, strict=True):
        assert row["all_at_baseline"] == all(res["at_baseline"].values())


def _part(settings: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    base = {
        "kind": "frontier",
        "model": "tiny",
        "n_prompts": 1,
        "prompt_len": 48,
        "n_new": 2,
        "public_tokens": 256,
        "victims": "odd topics",
        "settings": settings,
        "missing": [],
    }
    return {**base, **over}


def _full(s: dict[str, Any]) -> dict[str, Any]:
    return {
        **s,
        "mechanism": "m",
        "config": {"level": "paper", "r1": 4, "r2": 4, "beta": 5.0, "l_s": 1, "l_e": 1},
    }


def test_parts_of_two_samples_do_not_merge() -> None:
    """Was: ``merge_results`` compared only the sizes (model, prompts, length, new tokens, public tokens):
    two runs on different victim prompts of one size — another ``victims`` text, or other prompts whose
    prior baselines differ — merged into one frontier table as if one sample."""
    ctl, paper = (
        _full(CONTROL),
        _full(
            _setting("paper", "paper", {"vm_qkv1_bag_recall": _rate(45, 48)}, {"vm_qkv1_bag_recall": False})
        ),
    )
    ok = frontier.merge_results([_part([ctl]), _part([ctl, paper])])
    assert [s["setting"] for s in ok["settings"]] == ["plaintext", "paper"]
    with pytest.raises(ConfigError, match="victims"):
        frontier.merge_results([_part([ctl]), _part([ctl, paper], victims="even topics")])
    other = {**paper, "baselines": {**paper["baselines"], "prompt_bag": _rate(20, 48)}}
    other_ctl = {**ctl, "baselines": {**ctl["baselines"], "prompt_bag": _rate(20, 48)}}
    with pytest.raises(ConfigError, match="prompt_bag"):
        frontier.merge_results([_part([ctl]), _part([other_ctl, other])])


def test_probe_block_and_settings_check_their_arguments() -> None:
    """Was: ``probe_block`` of a config that is not an SCXConfig raised AttributeError (not a project
    error); a Setting took ``stateless="False"`` (a truthy text: the slow statelessness table ran), a
    number as ``reorder``, a non-text name and a non-text preset."""
    with pytest.raises(ConfigError):
        harness.probe_block("paper", 4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        harness.probe_block(None, 4)  # type: ignore[arg-type]
    cfg = harness.plaintext_control().config
    assert harness.probe_block(cfg, 4) == 1
    for bad in (
        dict(stateless="False"),
        dict(reorder=1),
        dict(name=3),
        dict(mechanism=None),
        dict(preset=7),
    ):
        args: dict[str, Any] = {"name": "s", "mechanism": "m", "config": cfg, **bad}
        with pytest.raises(ConfigError):
            harness.Setting(**args)
    good = harness.Setting("s", "m", cfg, stateless=True, reorder=False, preset="paper")
    assert replace(good, preset=None).preset is None


def test_frontier_report_and_read_bench_check_their_arguments(tmp_path: Any) -> None:
    """Was: ``frontier_report(..., findings=3)`` raised AttributeError (``.strip`` of an int) and
    ``read_bench`` of a path given as text raised AttributeError (``.read_text`` of a str) — neither a
    project error; a text path now reads as its Path does."""
    result = {"settings": [_full(CONTROL)], "model": "tiny", "n_prompts": 1, "prompt_len": 48, "n_new": 2}
    with pytest.raises(ConfigError):
        frontier.frontier_report(result, findings=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        frontier.frontier_report(result, plots=7)  # type: ignore[arg-type]
    assert "plaintext" in frontier.frontier_report(result, plots="p", findings="f")
    bench = tmp_path / "b.json"
    bench.write_text('{"rows": [{"config": "paper", "phase": "decode", "ratio_median": 1.2}]}')
    assert frontier.read_bench(str(bench)) == frontier.read_bench(bench)
    with pytest.raises(ConfigError):
        frontier.read_bench(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError):
        frontier.read_bench(3)  # type: ignore[arg-type]

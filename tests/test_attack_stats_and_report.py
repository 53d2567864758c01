"""The statistics and reports that turn attack counts into published verdicts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import binomtest

from scx_ref.attacks import catalog, harness, report, tables
from scx_ref.attacks.stats import Rate, at_baseline, wilson
from scx_ref.errors import ConfigError


def _wilson_scipy(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 10**9, 10**12])
def test_wilson_matches_scipy_at_edge_counts(n: int) -> None:
    for k in sorted({0, 1, n // 2, n - 1, n}):
        lo, hi = wilson(k, n)
        assert (lo, hi) == pytest.approx(_wilson_scipy(k, n), abs=1e-12)
        assert lo <= k / n <= hi
    assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0


def test_wilson_stays_in_range_for_huge_counts() -> None:
    for n in (1e15, 1e100, 1e300, 1.7e308):
        for k in (0.0, n / 3, n):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_at_baseline_is_the_rate_against_scipys_upper_bound() -> None:
    for kb, nb in ((0, 1), (1, 1), (0, 50), (7, 50), (50, 50), (3, 1000)):
        hi = _wilson_scipy(kb, nb)[1]
        for k, n in ((0, 1), (1, 1), (0, 40), (5, 40), (20, 40), (40, 40), (1, 3)):
            if abs(k / n - hi) < 1e-9:
                continue  # on the boundary: rounding decides
            assert at_baseline(Rate(k, n), Rate(kb, nb)) == (k / n <= hi), (k, n, kb, nb)


def test_pool_reads_an_iterator_once() -> None:
    # an iterator was consumed by the checks, then pooled as nothing: 0 of 0 recovered
    r = Rate.pool(iter([(1, 2), (2, 2)]))  # type: ignore[arg-type]
    assert (r.k, r.n, r.per_prompt) == (3.0, 4.0, (0.5, 1.0))


@pytest.mark.parametrize("parts", [None, 5])
def test_pool_refuses_what_is_no_collection(parts: Any) -> None:
    with pytest.raises(ConfigError, match="sequence of"):
        Rate.pool(parts)


@pytest.mark.parametrize("pp", [None, "ab", (0.5, 2.0), (float("nan"),), (True,)])
def test_rate_refuses_per_prompt_that_is_no_rates(pp: Any) -> None:
    with pytest.raises(ConfigError, match="per_prompt"):
        Rate(1, 2, pp)


@pytest.mark.parametrize("bad", [None, {"k": 1, "n": 2}, 0.5])
def test_at_baseline_refuses_what_is_no_rate(bad: Any) -> None:
    with pytest.raises(ConfigError, match="must be a Rate"):
        at_baseline(bad, Rate(1, 2))
    with pytest.raises(ConfigError, match="must be a Rate"):
        at_baseline(Rate(1, 2), bad)


def test_head_next_bag_recall_names_the_baseline_of_its_own_tokens() -> None:
    # it scores ids[1:] + the first generated token, not the prompt bag ids
    assert catalog.metric("head_next_bag_recall").tokens == "next"
    assert catalog.metric("head_next_bag_recall").baseline == "prompt_next_bag"
    # every other metric: the same baseline the harness judges it against today
    for m in catalog.METRICS:
        if m.key != "head_next_bag_recall":
            assert m.baseline == harness._baseline_of(m.key), m.key


def _result() -> dict[str, Any]:
    config = {"level": "paper", "r1": 0, "r2": 0, "beta": 0.0, "l_s": 0, "l_e": 0}
    rate = {"k": 1.0, "n": 4.0, "rate": 0.25, "lo": 0.05, "hi": 0.7, "per_prompt": [0.25]}
    setting = {
        "setting": "plaintext",
        "mechanism": "none",
        "config": config,
        "metrics": {"vm_qkv1_bag_recall": 0.25, "vm_attn1_pos_acc": None, "head_next_bag_recall": 0.5},
        "rates": {"vm_qkv1_bag_recall": rate},
        "baselines": {"prompt_bag": rate, "prompt_next_bag": {**rate, "rate": 0.0, "lo": 0.0}},
        "at_baseline": {"vm_qkv1_bag_recall": True},
    }
    return {"model": "tiny", "n_prompts": 1, "prompt_len": 4, "n_new": 2, "settings": [setting]}


def test_table_shows_the_next_token_baseline() -> None:
    text = tables.markdown_table(_result())
    assert "| *baseline: prior, bag of the next tokens* | 0.00 |" in text


def test_at_baseline_verdicts_must_be_true_or_false() -> None:
    r = _result()
    r["settings"][0]["at_baseline"] = {"vm_qkv1_bag_recall": "no"}  # was rendered as ✓
    with pytest.raises(ConfigError, match="at_baseline"):
        tables.markdown_table(r)


def _cells(line: str) -> int:
    """Cells of a markdown table row (an escaped \\| is text, not a border)."""
    return line.replace("\\|", "").count("|") - 1


def test_a_pipe_in_a_name_does_not_shift_the_columns() -> None:
    r = _result()
    r["settings"].append(copy.deepcopy(r["settings"][0]))
    r["settings"][0]["setting"] = "a | b"
    r["settings"][0]["mechanism"] = "x|y\nz"
    for text in (tables.markdown_table(r), report.markdown_report(r)):
        rows = [ln for ln in text.splitlines() if ln.startswith("|")]
        header = next(ln for ln in rows if ln.startswith("| attack |"))
        assert _cells(header) == 3
        for ln in rows:
            if ln.startswith(("| attack", "| VM QKV-1 bag", "| *baseline")):
                assert _cells(ln) == 3, ln
    settings = [ln for ln in report.markdown_report(r).splitlines() if ln.startswith("| a \\| b |")]
    assert len(settings) == 1 and _cells(settings[0]) == 3


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "1" * 5000])
def test_report_main_refuses_json_python_cannot_parse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        report.main([str(path)])
    assert exc.value.code == 2
    assert "not JSON" in capsys.readouterr().err


def test_report_plots_a_metric_that_was_not_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    r = _result()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r))
    out = tmp_path / "A.md"
    assert report.main([str(path), "--write-plots", str(tmp_path / "plots"), "--out", str(out)]) == 0
    assert (tmp_path / "plots" / "attacks_by_setting.png").stat().st_size > 0


def test_the_harness_judges_head_next_against_the_prior_on_its_own_tokens() -> None:
    """The harness scored the LM-head rows' next tokens (the prompt's after the first, then the first
    generated token) but judged them against the prior's bag of the prompt itself; a run now records the
    prior on the scored tokens (``prompt_next_bag``) and judges the metric against it."""
    import numpy as np

    from scx_ref.attacks import harness
    from scx_ref.config import ModelConfig
    from scx_ref.weights import random_weights

    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48
    )
    w = random_weights(cfg, np.random.default_rng(0))
    ctx = harness.Context(w, np.random.default_rng(6).integers(0, 64, 256), None)
    setting = harness.plaintext_control()
    ids = np.array([5, 5, 5, 5, 9, 9])  # the scored tokens differ from the prompt's bag by its first token
    res = harness.run_setting(ctx, setting, [ids], n_new=2, sequential=False, reorder=False)
    base = res["baselines"]
    assert base["prompt_next_bag"]["n"] == len(ids) and "prompt_bag" in base
    assert harness._baseline_of("head_next_bag_recall") == "prompt_next_bag"
    from scx_ref.reference import ReferenceModel

    first = ReferenceModel(w).generate(ids, 1)  # SCX is exact: the run generated this token first
    want = ctx.prior.bag_hits(np.concatenate([ids[1:], np.asarray(first, dtype=np.int64)]))
    assert base["prompt_next_bag"]["k"] == want

"""The frontier's measurement machinery (DESIGN §5.7, §8): confidence intervals, the frequency-prior
baseline, the named configurations, the release plan's exposures, and the frontier table built from a real
(tiny) harness run, whose plaintext control every attack must break."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import catalog, frontier, harness, llm_reorder, report
from scx_ref.attacks.inversion import unit_vocabulary
from scx_ref.attacks.stats import FrequencyPrior, Rate, at_baseline, bag_hits, wilson
from scx_ref.config import ModelConfig
from scx_ref.dp.sensitivity import model_sensitivities
from scx_ref.errors import ConfigError
from scx_ref.protocol import SCXConfig, Stage
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.protocol.presets import PRESETS, preset, preset_names
from scx_ref.stages import Phase
from scx_ref.transforms import laplace_noise
from scx_ref.weights import random_weights

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48
)


def test_wilson_interval() -> None:
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # k = 0 still gets a useful upper bound
    lo, hi = wilson(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.9
    for k, n in ((3, 10), (50, 240), (1, 3)):
        lo, hi = wilson(k, n)
        assert lo < k / n < hi
    # textbook value: 0.3 [0.108, 0.603] for 3 of 10
    assert wilson(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # at k = 0 and k = n the interval still holds k/n exactly (no rounding past it)
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_rate_pools_prompts() -> None:
    r = Rate.pool([(3, 10), (7, 10)])
    assert r.rate == 0.5 and r.per_prompt == (0.3, 0.7)
    assert r.to_dict()["lo"] < 0.5 < r.to_dict()["hi"]


def test_frequency_prior_guesses() -> None:
    public = np.array([1, 1, 1, 2, 2, 3])
    prior = FrequencyPrior(public, vocab=5)
    assert prior.mode == 1 and prior.probs.sum() == pytest.approx(1.0)
    assert prior.positional_hits([1, 2, 1, 4]) == 2
    bag = prior.bag_guess(4)
    assert len(bag) == 4 and list(bag).count(1) >= 1
    assert bag_hits([1, 1, 2], [1, 2, 2, 2]) == 2
    assert prior.bag_hits([1, 2, 3, 4]) == bag_hits(bag, [1, 2, 3, 4])


def test_at_baseline() -> None:
    base = Rate(5, 100)
    assert at_baseline(Rate(5, 100), base)
    assert not at_baseline(Rate(50, 100), base)
    assert at_baseline(Rate(0, 0), base)  # the message was never sent: the attacker has only the prior


def test_catalog_keys_are_unique_and_complete() -> None:
    keys = [m.key for m in catalog.METRICS]
    assert len(keys) == len(set(keys))
    assert {m.key for m in catalog.attack_metrics()} <= set(keys)
    assert [k for k, _ in report.METRICS] == keys
    with pytest.raises(KeyError):
        catalog.metric("nope")


@pytest.mark.parametrize("n_layers", [2, 4, 30])
def test_presets_build(n_layers: int) -> None:
    names = preset_names()
    assert len(names) == len(set(names)) and names[0] == "permute"
    for p in PRESETS:
        cfg = p.config(n_layers)
        assert isinstance(cfg, SCXConfig) and p.summary and p.protects
    first, middle, last = preset("hardened").config(n_layers).blocks(n_layers)
    assert not len(middle) and len(first) + len(last) == n_layers  # no key sharing
    with pytest.raises(ConfigError):
        preset("nope")
    with pytest.raises(ConfigError):
        PRESETS[0].config(0)


def test_exposures_of_the_paper_and_the_hardened_configuration() -> None:
    """Level paper exposes the attention stage, the shared caches and the generated tokens' middle-block
    rows; the hardened configuration (client attention, every block a guard, level blind, W_o and LM head
    blinded each step) exposes nothing: every message is a release."""
    paper = ReleasePlan.of(SCXConfig(), CFG)
    stages = {(e.phase, e.stage) for e in paper.exposures}
    for want in (Stage.ATTN, Stage.SHARE, Stage.O, Stage.FFN, Stage.HEAD, Stage.LOCK):
        assert (Phase.PREFILL, want) in stages
    for want in (Stage.GEN_MID, Stage.GEN_LAST):
        assert (Phase.GENERATE, want) in stages
    # a step's first-guard attention is the client's by default; the paper's gen_attn exposes it
    assert (Phase.GENERATE, Stage.GEN_ATTN) not in stages
    paper_gen = ReleasePlan.of(SCXConfig(gen_attention="server"), CFG).exposures
    assert {(e.stage, e.blocks) for e in paper_gen} - {(e.stage, e.blocks) for e in paper.exposures} == {
        (Stage.GEN_ATTN, (0,))
    }
    assert all(e.blocks for e in paper.exposures) and "blocks" in str(paper.exposures[0])
    hard = preset("hardened").config(CFG.n_layers)
    assert ReleasePlan.of(hard, CFG).exposures == ()
    moe = ModelConfig(**{**CFG.__dict__, "n_experts": 4, "top_k": 2})
    assert ReleasePlan.of(hard, moe).exposures == ()
    # the same options at level permute expose every linear stage again
    permute = ReleasePlan.of(SCXConfig(level="permute", attention="client", l_s=4), CFG)
    assert {e.stage for e in permute.exposures} >= {Stage.QKV, Stage.GEN_QKV, Stage.GEN_FFN_UP}
    assert Stage.ATTN not in {e.stage for e in permute.exposures}


def test_hardened_plan_blinds_every_generation_linear_stage() -> None:
    """gen_linear="server" adds W_o of every guard block and the LM head, one release per step;
    attention="client" adds the last guard blocks' QKV stage (the server no longer computes it)."""
    cfg = SCXConfig(level="paper", attention="client", gen_linear="server", l_s=1, l_e=1)
    plan = ReleasePlan.of(cfg, CFG)
    gen = {(r.stage, r.block) for r in plan.generation}
    L = CFG.n_layers
    assert {(Stage.GEN_QKV, 0), (Stage.GEN_QKV, L - 1), (Stage.GEN_O, 0), (Stage.GEN_O, L - 1)} <= gen
    assert (Stage.GEN_HEAD, L) in gen
    labels = {r.label(3) for r in plan.generation}
    assert len(labels) == len(plan.generation)  # every release has its own one-time key
    assert ("alpha", L, "head", "gen", 3) in labels
    base = ReleasePlan.of(SCXConfig(level="paper"), CFG)
    assert (Stage.GEN_QKV, L - 1) not in {(r.stage, r.block) for r in base.generation}


def test_wide_blinding_choice() -> None:
    assert not SCXConfig(beta=1.0).wide_blinding("float32")  # float32's limit (5 until stop 70)
    assert SCXConfig(beta=5.0).wide_blinding("float32")
    assert SCXConfig(beta=5.5).wide_blinding("float32")
    assert SCXConfig(beta=1.0, stage_beta={"o": 50.0}).wide_blinding("float32")
    assert not SCXConfig(beta=50.0).wide_blinding("float64")  # already float64
    assert not SCXConfig(beta=50.0, blind_dtype="backend").wide_blinding("float32")
    assert SCXConfig(beta=1.0, blind_dtype="float64").wide_blinding("float32")
    for bad in ({"attention": "gpu"}, {"gen_linear": "x"}, {"blind_dtype": "float16"}):
        with pytest.raises(ConfigError):
            SCXConfig(**bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_run() -> dict[str, Any]:
    """A frontier run on a tiny random model: the control and three presets, 2 prompts, 4 new tokens."""
    w = random_weights(CFG, np.random.default_rng(0))
    pub = np.random.default_rng(6).integers(0, 128, 512)
    ctx = harness.Context(w, pub, llm_reorder.NumpyLM(w))
    sets = [
        s for s in harness.frontier_settings(CFG.n_layers) if s.preset in (None, "permute", "paper", "blind")
    ]
    harness.fit_tools(ctx, sorted({harness.probe_block(s.config, CFG.n_layers) for s in sets}), mlp=False)
    prompts = [np.array([5, 17, 3, 99, 42, 8, 77, 64, 1, 30]), np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])]
    sens = model_sensitivities(w, embedding="bound")
    out = []
    for s in sets:
        res = harness.run_setting(ctx, s, prompts, n_new=4)
        res["dp"] = frontier.dp_summary(sens, s.config, 10, 4)
        out.append(res)
    return {"model": "tiny", "settings": out, "n_prompts": 2, "prompt_len": 10, "n_new": 4}


def test_plaintext_control_breaks_every_exact_attack(tiny_run: dict[str, Any]) -> None:
    ctl = tiny_run["settings"][0]
    assert ctl["setting"] == "plaintext"
    for key in (
        "vm_qkv1_bag_recall",
        "vm_qkv1_map_bag_recall",
        "vm_resid1_bag_recall",
        "vm_attn1_pos_acc",
        "vm_cache_seq_pos_acc",
        "recovered_pos_acc",
        "gen_qkv1_map_acc",
        "gen_attn1_fp_acc",
        "vm_gen_seq_acc",
        "gen_predict_acc",
        "inv_joint_bag_recall",
        "gen_joint_acc",
    ):
        assert ctl["metrics"][key] == 1.0, key
        assert not ctl["at_baseline"][key]
    assert ctl["exactness"]["greedy_identical"] == 1.0 and ctl["exactness"]["max_rel_logit_err"] < 1e-12
    assert ctl["baselines"]["prompt_pos"]["n"] == 20


def test_run_records_cost_exactness_and_dp(tiny_run: dict[str, Any]) -> None:
    by = {s["setting"]: s for s in tiny_run["settings"]}
    for s in by.values():
        c = s["cost"]
        assert c["bytes_per_prompt"] > 0 and c["round_trips_per_prompt"] > 0 and c["bytes_per_token"] > 0
        assert s["exactness"]["greedy_identical"] == 1.0
        assert s["exactness"]["max_rel_logit_err"] < 1e-12
    # level blind's corrections η·W are the client's work — ahead of the request, from the mask pool
    blind, permute = by["blind"]["cost"], by["permute"]["cost"]
    assert blind["offline_flop_share_prefill"] > 0.2 and permute["offline_flop_share_prefill"] == 0
    assert blind["client_flop_share_prefill"] < 0.1
    assert math.isinf(by["permute"]["dp"]["epsilon_request"])
    assert by["blind"]["dp"]["epsilon_prefill"] < by["blind"]["dp"]["epsilon_request"]
    assert by["blind"]["metrics"]["vm_resid1_bag_recall"] < by["paper"]["metrics"]["vm_resid1_bag_recall"]
    # the π₁ group is clear at level paper (joint inversion recovers it) and blinded at level blind
    assert by["paper"]["metrics"]["inv_joint_bag_recall"] == 1.0
    assert by["blind"]["metrics"]["inv_joint_bag_recall"] < 0.5


def test_frontier_table_plot_and_verdict(tiny_run: dict[str, Any], tmp_path: Any) -> None:
    rows = frontier.frontier_rows(tiny_run)
    assert rows[0]["control"] and [r["name"] for r in rows[1:]] == ["permute", "paper", "blind"]
    md = frontier.frontier_markdown(rows)
    assert md.count("\n") == len(rows) + 2 and "| blind |" in md
    # every configuration here leaks through its attention stage: none reaches the baseline
    assert all(not r["all_at_baseline"] for r in rows[1:])
    assert frontier.cheapest_at_baseline(rows) is None
    fake = [dict(r) for r in rows]
    fake[2]["all_at_baseline"] = fake[3]["all_at_baseline"] = True
    assert frontier.cheapest_at_baseline(fake) is fake[2]  # paper's flop share is below blind's
    # a latency for blind alone does not make it comparable with paper's flop share: still by flop share
    fake[3] = dict(
        fake[3], bench={"prefill_n512": {"n": 512, "ratio_median": 0.01, "total_ratio_median": 0.01}}
    )
    assert frontier.cheapest_at_baseline(fake) is fake[2]
    fake[2] = dict(
        fake[2], bench={"prefill_n512": {"n": 512, "ratio_median": 2.0, "total_ratio_median": 2.0}}
    )
    assert frontier.cheapest_at_baseline(fake) is fake[3]  # both benchmarked: by latency
    bench = {
        "rows": [{"config": "blind", "phase": "prefill", "n": 512, "ratio_median": 1.2, "level": "blind"}]
    }
    merged = frontier.frontier_rows(tiny_run, bench)
    assert merged[3]["bench"]["prefill_n512"]["ratio_median"] == 1.2 and not merged[2]["bench"]
    # a bench that names its presets: its level rows (here "paper", a level's default) are not the preset's
    rows2 = [*bench["rows"], {"phase": "prefill", "n": 512, "ratio_median": 1.1, "level": "paper"}]
    named = frontier.frontier_rows(tiny_run, {"meta": {"configs": {"blind": {}}}, "rows": rows2})
    assert named[3]["bench"] and not named[2]["bench"]
    assert frontier.frontier_rows(tiny_run, {"rows": rows2})[2]["bench"]  # without the list: by name
    path = frontier.plot_frontier(rows, tmp_path / "f.png", "tiny")
    assert path.exists() and path.stat().st_size > 0
    table = report.markdown_table(tiny_run, intervals=True)
    assert "*baseline: prior, per position*" in table and " ✓" in table and "[" in table


def test_joint_inversion_averages_independent_noise() -> None:
    """Many noisy views of one token beat one: at a β where a single blinded view of the block input
    recovers little, the joint inverter over several blocks' views recovers more (on public text held
    out from the fit); with no noise a single view is already exact-ish."""
    from scx_ref.attacks import multiview

    w = random_weights(CFG, np.random.default_rng(0))
    pub = np.random.default_rng(6).integers(0, 128, 1280)
    ctx = harness.Context(w, pub[:1024], None)
    table = unit_vocabulary(w)
    toks = ctx.public_tokens
    forms = [("xhat", b) for b in range(CFG.n_layers)] + [("hn", b) for b in range(CFG.n_layers)]
    public = [multiview.public_rows(w, ctx.traces, f, b) for f, b in forms]  # type: ignore[arg-type]
    test = harness.Context(w, pub[1024:], None)
    rng = np.random.default_rng(1)
    beta = 2.0

    def observed(idx: list[int]) -> list[Any]:
        out = []
        for j in idx:
            f, b = forms[j]
            rows = multiview.public_rows(w, test.traces, f, b)  # type: ignore[arg-type]
            out.append(rows + laplace_noise(rows.shape, beta, rng))
        return out

    truth = test.public_tokens
    one = multiview.JointInverter.fit(public[:1], [beta], toks, w, table)
    every = multiview.JointInverter.fit(public, [beta] * len(public), toks, w, table)
    acc_one = float(np.mean(one.predict(observed([0])) == truth))
    acc_all = float(np.mean(every.predict(observed(list(range(len(forms))))) == truth))
    assert acc_all > acc_one + 0.05 and every.heldout_weight > one.heldout_weight
    clean = multiview.JointInverter.fit(public[:1], [0.0], toks, w, table)
    assert float(np.mean(clean.predict([multiview.public_rows(w, test.traces, "xhat", 0)]) == truth)) > 0.9


def test_frontier_report_renders(tiny_run: dict[str, Any], tmp_path: Any) -> None:
    import json

    res = dict(tiny_run, kind="frontier", command="scx attack --frontier", public_tokens=512, seconds=1.0)
    text = frontier.frontier_report(res, findings="- a finding")
    assert "No configuration reaches the baseline" in text and "- a finding" in text
    assert "scx attack --frontier" in text and "| configuration |" in text
    src, out = tmp_path / "f.json", tmp_path / "F.md"
    src.write_text(json.dumps(res, default=float))
    assert (
        report.main([str(src), "--out", str(out), "--write-plots", str(tmp_path / "p"), "--plots", "p"]) == 0
    )
    assert "recovery vs cost" in out.read_text() and (tmp_path / "p" / "frontier.png").exists()


@pytest.mark.slow
def test_scx_attack_frontier_cli_writes_after_every_configuration(tmp_path: Any) -> None:
    """``scx attack --frontier`` end to end on tiny-llama: the configurations run in the order asked (the
    control first) and the JSON — rewritten after each one, so a run cut short keeps what it measured —
    lists them in preset order, complete, with the command; the report renders it with the plot."""
    import json

    from scx_ref.cli import main

    out, plots = tmp_path / "f.json", tmp_path / "plots"
    argv = ["attack", "--model", "tiny-llama", "--frontier", "--quick", "--prompts", "2", "--length", "8"]
    argv += ["--new", "3", "--configs", "blind,paper", "--json", str(out), "--plots", str(plots)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert [s["setting"] for s in res["settings"]] == ["plaintext", "paper", "blind"]
    assert res["complete"] and res["missing"] == [] and "--frontier" in res["command"]
    assert (plots / "frontier.png").exists() and not out.with_name("f.json.part").exists()
    partial = dict(res, settings=res["settings"][:2], missing=["blind"], complete=False)
    text = frontier.frontier_report(partial)
    assert "Incomplete run" in text and "blind" in text.split("Incomplete run")[1].split("\n")[0]


def test_frontier_parts_merge(tiny_run: dict[str, Any], tmp_path: Any) -> None:
    """A frontier run in parts: one result, the control once, every configuration in preset order, the
    commands of both parts, nothing missing; parts of different samples are refused."""
    import json

    ctl, permute, paper, blind = tiny_run["settings"]
    one = dict(
        tiny_run, settings=[ctl, blind], command="scx attack A", missing=["paper", "permute"], seconds=2
    )
    two = dict(tiny_run, settings=[ctl, paper, permute], command="scx attack B", missing=[], seconds=3)
    merged = frontier.merge_results([one, two])
    assert [s["setting"] for s in merged["settings"]] == ["plaintext", "permute", "paper", "blind"]
    assert merged["complete"] and merged["missing"] == [] and merged["seconds"] == 5.0
    assert "scx attack A" in merged["command"] and "scx attack B" in merged["command"]
    assert not frontier.merge_results([one])["complete"]
    with pytest.raises(ConfigError):
        frontier.merge_results([one, dict(two, prompt_len=11)])
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    a.write_text(json.dumps(dict(one, kind="frontier"), default=float))
    b.write_text(json.dumps(dict(two, kind="frontier"), default=float))
    md = tmp_path / "F.md"
    assert report.main([str(a), "--with", str(b), "--merged", str(out), "--out", str(md)]) == 0
    assert len(json.loads(out.read_text())["settings"]) == 4 and "Incomplete" not in md.read_text()

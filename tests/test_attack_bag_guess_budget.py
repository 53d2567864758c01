"""A bag attack's equal-budget prior is recorded beside it (its verdict stays against the n-guess prior),
and a table and the frontier read one verdict rule.

A bag attack guesses a token on each of the n + r rows it sees (decoys included) and scores
|guess ∩ truth| / n, while the frequency prior it is judged against gets n guesses — so guesses on decoy
rows can only add to an attack's score (README "Bag attacks count guesses on decoy rows"). Judging it
against a prior of n + r guesses instead would understate an attacker that finds the decoys (the residual
link does, in un-noised blocks) and needs only n guesses: the verdict stays conservative, and the prior of
the attack's own guess budget is recorded and shown so a reader sees how much decoy guesses could explain.
And the table's ✓ showed the stored ``at_baseline`` verdict while the frontier re-judged it against the
stored rates: one result could read "at baseline" in one and "above" in the other. Tiny random models only."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import catalog, frontier, harness, tables
from scx_ref.attacks._view import message
from scx_ref.attacks.stats import FrequencyPrior, Rate
from scx_ref.errors import ConfigError
from scx_ref.protocol import Stage
from scx_ref.reference import ReferenceModel
from tests.tiny import tiny_weights

W = tiny_weights(0)
PUBLIC = np.random.default_rng(5).integers(0, 32, 256)
PROMPTS = [np.random.default_rng(9 + i).integers(0, 32, 10) for i in range(3)]


def test_the_priors_bag_of_a_guess_budget_hand_computed() -> None:
    """Public [0, 0, 0, 1, 1, 2] over 4 tokens: add-one probabilities (0.4, 0.3, 0.2, 0.1). The best bag of
    m tokens takes ⌊m·p⌋ of each, then the largest remainders (ties to the lower id):
    m = 2 → {0, 1}; 4 → {0, 0, 1, 2}; 5 → {0, 0, 1, 1, 2}; 8 → {0, 0, 0, 1, 1, 2, 2, 3}.
    Against the truth {2, 3, 1, 1} they hit 1, 2, 3 and 4 tokens; no guess hits none."""
    prior = FrequencyPrior([0, 0, 0, 1, 1, 2], 4)
    assert prior.bag_guess(5).tolist() == [0, 0, 1, 1, 2]
    truth = [2, 3, 1, 1]
    got = {m: prior.bag_hits(truth, m) for m in (0, 2, 4, 5, 8)}
    assert got == {0: 0, 2: 1, 4: 2, 5: 3, 8: 4}
    assert prior.bag_hits(truth) == 2  # the default budget: as many guesses as the truth has tokens
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError):
            prior.bag_hits(truth, bad)  # type: ignore[arg-type]


def test_a_bag_metric_is_judged_against_n_guesses_and_shows_its_equal_budget_prior() -> None:
    """``catalog.judged_against``: the catalog's baseline of the tokens a metric scores (n guesses for a
    bag attack), whether or not the result holds the attack's equal-budget prior; ``catalog.equal_budget``:
    that record, for bag metrics only."""
    own, shared, nxt, pos = (Rate(k, 4).to_dict() for k in (3, 1, 2, 0))
    new = {"prompt_bag": shared, "prompt_next_bag": nxt, "prompt_pos": pos, "vm_qkv1_bag_recall": own}
    assert catalog.judged_against("vm_qkv1_bag_recall", new) is shared
    assert catalog.equal_budget("vm_qkv1_bag_recall", new) is own
    assert catalog.judged_against("head_next_bag_recall", new) is nxt
    assert catalog.equal_budget("head_next_bag_recall", new) is None  # none recorded
    old = {"prompt_bag": shared, "prompt_pos": pos}
    assert catalog.judged_against("vm_qkv1_bag_recall", old) is shared
    assert catalog.equal_budget("vm_qkv1_bag_recall", old) is None
    assert catalog.judged_against("vm_attn1_pos_acc", {**old, "vm_attn1_pos_acc": own}) is pos
    assert catalog.equal_budget("vm_attn1_pos_acc", {**old, "vm_attn1_pos_acc": own}) is None  # positional
    assert catalog.judged_against("gen_head_acc", old) is None


def _decoy_sweep() -> dict[int, tuple[dict[str, Any], list[int], list[int]]]:
    """Level ``permute`` with the head permutation off and r1 = r2 = r, for r = 0, 4, 16, on the same
    prompts and keys' seed: each result, and per prompt the rows of the LM-head and block-1 QKV messages."""
    ctx = harness.Context(W, PUBLIC, None, window=32)
    control = harness.plaintext_control().config
    out = {}
    for r in (0, 4, 16):
        cfg = replace(control, r1=r, r2=r, r_lock=None)
        setting = harness.Setting(f"r={r}", f"decoys r={r}", cfg, frozenset({"head"}))
        res = harness.run_setting(ctx, setting, PROMPTS, 2, sequential=False, reorder=False)
        head_rows, qkv_rows = [], []
        for pi, ids in enumerate(PROMPTS):  # the same view the harness attacked (keys from seed + pi)
            view, _ = harness.server_view(
                W, ids, cfg, setting.identity, n_new=2, seed=pi, public=PUBLIC, decoys=ctx.decoys()
            )
            head_rows.append(len(message(view, Stage.HEAD, W.config.n_layers).arrays["x"]))
            qkv_rows.append(len(message(view, Stage.QKV, 0).arrays["x"]))
        out[r] = (res, head_rows, qkv_rows)
    return out


def test_a_bag_attacks_equal_budget_prior_is_recorded_and_the_verdict_stays_against_n_guesses() -> None:
    """The LM-head rows' next-token bag over the same real rows: with r decoys it guesses n + r tokens.
    Against ``prompt_next_bag`` (n guesses, the same at every r) its margin grows with r (tiny model: 5, 6,
    10 of 30 against 9 of 30): decoy guesses add hits. The prior's best bag of n + r tokens against the
    same next tokens (9, 15, 22 of 30) is recorded under the attack's key, and against it the margin does
    not grow; the verdicts are judged against the n-guess prior (conservative)."""
    sweep = _decoy_sweep()
    key = "head_next_bag_recall"
    prior = FrequencyPrior(PUBLIC, W.config.vocab_size)
    ref = ReferenceModel(W)
    truths = [np.concatenate([ids[1:], np.asarray(ref.generate(ids, 1), dtype=np.int64)]) for ids in PROMPTS]
    old_margin, new_margin = {}, {}
    for r, (res, head_rows, qkv_rows) in sweep.items():
        n = [len(ids) for ids in PROMPTS]
        assert head_rows == qkv_rows == [m + r for m in n]  # the attack sees n + r rows, decoys included
        rate, base = res["rates"][key], res["baselines"]
        old_margin[r] = rate["rate"] - base["prompt_next_bag"]["rate"]
        own = base[key]
        want = sum(prior.bag_hits(t, rows) for t, rows in zip(truths, head_rows, strict=True))
        assert (own["k"], own["n"]) == (want, rate["n"])  # the same truth, the attack's guess budget
        new_margin[r] = rate["rate"] - own["rate"]
        qkv_want = sum(prior.bag_hits(ids, rows) for ids, rows in zip(PROMPTS, qkv_rows, strict=True))
        assert base["vm_qkv1_bag_recall"]["k"] == qkv_want
        for k, verdict in res["at_baseline"].items():
            judge = catalog.judged_against(k, base)
            assert judge is not None and judge is base[catalog.metric(k).baseline], k
            assert verdict == (res["rates"][k]["rate"] <= judge["hi"]), k
            assert tables.verdict(res, k) == verdict, k
        # the precision the harness records: the same hits over the guesses made (n + r per prompt)
        per_prompt = res["rates"]["vm_qkv1_bag_recall"]["per_prompt"]
        precision = np.mean([p * m / (m + r) for p, m in zip(per_prompt, n, strict=True)])
        assert res["metrics"]["vm_qkv1_bag_precision"] == pytest.approx(precision)
    assert old_margin[0] <= old_margin[4] <= old_margin[16] and old_margin[0] < old_margin[16]
    assert sweep[0][0]["baselines"][key]["k"] < sweep[16][0]["baselines"][key]["k"]
    assert all(new_margin[r] <= new_margin[0] for r in new_margin)


def _setting(
    name: str, rate: Rate | None, verdict: bool | None, own: Rate | None = None, preset: str | None = "p"
) -> dict[str, Any]:
    key = "vm_qkv1_bag_recall"
    baselines = {"prompt_bag": Rate(10, 48).to_dict()}  # upper bound 0.34
    if own is not None:
        baselines[key] = own.to_dict()
    return {
        "setting": name,
        "preset": preset,
        "metrics": {key: 0.5 if rate is None else rate.rate},
        "rates": {} if rate is None else {key: rate.to_dict()},
        "baselines": baselines,
        "at_baseline": {} if verdict is None else {key: verdict},
        "cost": {"client_flop_share": 0.1, "offline_flop_share": 0.0},
    }


def _cell(result: dict[str, Any], name: str) -> str:
    """The setting's "VM QKV-1 bag" cell of the markdown table."""
    text = tables.markdown_table(result)
    head = next(line for line in text.splitlines() if line.startswith("| attack |"))
    row = next(line for line in text.splitlines() if line.startswith("| VM QKV-1 bag |"))
    names = [c.strip() for c in head.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    return cells[names.index(name)]


def test_a_table_and_the_frontier_read_one_verdict() -> None:
    """A stored verdict its rate contradicts (45 of 48 recovered, "at baseline" against a prior bounded
    by 0.34) was ✓ in the table and "above" on the frontier. Now each cell's ✓ is the frontier's verdict,
    and a bag attack at its equal-budget prior (30 of 48 against 30 of 48) but above the n-guess prior is
    above in both, its equal-budget prior shown in the cell."""
    cases = {
        "contradicted": (_setting("contradicted", Rate(45, 48), True), False),
        "consistent": (_setting("consistent", Rate(9, 48), True), True),
        "stored-false": (_setting("stored-false", Rate(9, 48), False), False),
        "own-budget": (_setting("own-budget", Rate(30, 48), True, own=Rate(30, 48)), False),
        "own-budget-low": (_setting("own-budget-low", Rate(9, 48), True, own=Rate(30, 48)), True),
        "own-budget-above": (_setting("own-budget-above", Rate(47, 48), True, own=Rate(30, 48)), False),
        "no-rate": (_setting("no-rate", None, True), False),
        "no-verdict": (_setting("no-verdict", Rate(9, 48), None), False),
    }
    control = _setting("plaintext", Rate(48, 48), False, preset=None)
    result = {"settings": [control] + [s for s, _ in cases.values()]}
    rows = {row["name"]: row for row in frontier.frontier_rows(result)}
    for name, (_, at) in cases.items():
        assert _cell(result, name).endswith("✓") == at == rows[name]["all_at_baseline"], name
        assert tables.verdict(result["settings"][list(cases).index(name) + 1], "vm_qkv1_bag_recall") == (
            None if name == "no-rate" else at
        ), name
    # the baseline a bag attack is judged against is in its cell when it is its own (no row shows it)
    assert _cell(result, "own-budget") == "0.62 (prior 0.62)"
    assert _cell(result, "own-budget-low") == "0.19 (prior 0.62) ✓"
    assert _cell(result, "contradicted") == "0.94"
    best = frontier.cheapest_at_baseline(list(rows.values()))
    assert best is not None and best["name"] == "consistent"

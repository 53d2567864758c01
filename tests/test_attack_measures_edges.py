"""Edges of the attack measurements (DESIGN §8): what residual linking does with noised QKV rows, the norm
invariant's refusals, what a permuted stage hides of the prompt's order (decoys included), an infinite
statelessness perplexity through strict JSON into the tables, every statelessness policy in the table, and
the metrics the harness records but no table shows. Tiny random models (``tests/tiny.py``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import (
    bruteforce,
    catalog,
    decoy_detect,
    harness,
    llm_reorder,
    statelessness,
    tables,
    vocab_match,
)
from scx_ref.attacks._view import message, stage_array
from scx_ref.errors import ConfigError
from scx_ref.protocol import SCXConfig, Stage

from .tiny import tiny_weights

IDS = np.array([3, 17, 5, 9, 22, 1])
RESULTS = Path(__file__).resolve().parent.parent / "models" / "results"


# -- residual links with noised QKV rows (the docstring's promise) -------------------------------------------


def test_residual_links_with_noised_qkv_rows_link_nothing_at_block_1_the_vocabulary_link_does() -> None:
    """Level paper noises block 1's QKV stage: ``residual_links`` then links nothing (all-False masks), at
    block 1 as anywhere — the vocabulary link FFN − O·W_o ∈ E is ``match_block1_residual``'s, which finds
    every real FFN row. (Its docstring read as if ``residual_links`` did the latter at block 1.)"""
    w = tiny_weights(0)
    view, _ = harness.server_view(w, IDS, SCXConfig(level="paper", r1=2, r2=2), seed=1)
    m0 = message(view, Stage.QKV, 0)
    assert m0.meta.get("normalized") is True
    xq, xo, xf = (stage_array(view, s, 0) for s in (Stage.QKV, Stage.O, Stage.FFN))
    for mask in decoy_detect.residual_links(xq, xo, xf, w, 0, qkv_normalized=True):
        assert not mask.any()
    ids, d = vocab_match.match_block1_residual(xo, xf, w)
    assert sorted(ids[d < 1e-6].tolist()) == sorted(IDS.tolist())


# -- the norm invariant -------------------------------------------------------------------------------------


def test_norm_residual_refuses_a_zero_gain_entry() -> None:
    """A γ with a zero entry makes y/γ = 0/0: the residual was NaN, which passes no threshold, so a real
    normalized row read as a decoy. Now a ConfigError; a γ without zeros still gives 0 for a real row."""
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.25]])
    g = np.array([1.0, 0.0, 2.0, 1.5])
    y = g * x / np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    with pytest.raises(ConfigError):
        decoy_detect.norm_residual(y, g)
    g2 = np.array([1.0, -0.5, 2.0, 1.5])
    y2 = g2 * x / np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    assert decoy_detect.norm_residual(y2, g2).max() < 1e-12


# -- what a permuted stage hides of the prompt's order -----------------------------------------------


def test_search_space_rows_state_the_prompt_order_bits_less_the_decoys_own_order() -> None:
    """n = 3 real rows and r = 2 decoys: the key has log₂(5!) bits, but a guess of the prompt's order need
    only say which rows are real and in what order — log₂(5!/2!) = log₂ 60 bits (enumerated here); the
    attention stage's rows come in true order (0 bits). ``bits`` alone overstated the order search by
    log₂(r!)."""
    w = tiny_weights(0)
    view, _ = harness.server_view(w, np.array([3, 7, 1]), SCXConfig(level="paper", r1=2, r2=2), seed=1)
    rows = {(r["stage"], r["layer"]): r for r in bruteforce.stage_search_spaces(view, w.config)}
    guesses = set(itertools.permutations(range(5), 3))  # (row of token 1, of token 2, of token 3)
    for stage in (Stage.QKV, Stage.O, Stage.FFN):
        r = rows[(stage, 0)]
        assert r["rows"] == 5 and r["bits"] == pytest.approx(math.log2(120))
        assert r["order_bits"] == pytest.approx(math.log2(len(guesses)))
    assert rows[(Stage.ATTN, 0)]["order_bits"] == 0.0
    assert bruteforce.search_space_bits(10**400) == math.inf  # was a raw OverflowError


def test_search_space_text_shows_the_order_bits_when_the_result_has_them() -> None:
    """The table line gives both numbers for a result that has ``order_bits``, and only ``bits`` for one
    written before (the published tables render as they did); ``order_bits`` of text is refused."""
    base = {"settings": [{"setting": "s", "metrics": {}}]}
    new = {
        **base,
        "search_space": [{"stage": "qkv", "layer": 0, "rows": 20, "bits": 61.08, "order_bits": 56.49}],
    }
    old = {**base, "search_space": [{"stage": "qkv", "layer": 0, "rows": 20, "bits": 61.08}]}
    assert "qkv[0] 20 rows → 61 bits (prompt order 56)" in tables.markdown_table(new)
    assert "qkv[0] 20 rows → 61 bits" in tables.markdown_table(old)
    assert "prompt order" not in tables.markdown_table(old)
    bad = {
        **base,
        "search_space": [{"stage": "qkv", "layer": 0, "rows": 20, "bits": 61.0, "order_bits": "x"}],
    }
    with pytest.raises(ConfigError):
        tables.markdown_table(bad)


# -- an infinite statelessness perplexity -------------------------------------------------------------------


def _refuse(const: str) -> None:
    raise AssertionError(f"not strict JSON: {const}")


def test_an_infinite_statelessness_ppl_is_measured_without_a_warning() -> None:
    """LM-head logits ×10⁵: the server's guesses without the guard caches are off by thousands of nats, so
    their PPL is +inf — the value, not a RuntimeWarning (overflow in exp) on the way."""
    w = tiny_weights(0)
    w = dataclasses.replace(w, lm_head=w.lm_head * 1e5)
    view, gen = harness.server_view(w, IDS, SCXConfig(level="paper", r1=2, r2=2), n_new=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tab = statelessness.statelessness_table(view, w, IDS, gen)
    assert tab["normal"]["ppl"] == pytest.approx(1.0) and tab["normal"]["top1"] == 1.0
    assert math.isinf(tab["no-prompt"]["ppl"])


def _stateless_result(ppl: Any, top1: Any = 0.25) -> dict[str, Any]:
    return {
        "settings": [
            {
                "setting": "s",
                "metrics": {},
                "statelessness": {"normal": {"ppl": 3.0, "top1": 1.0}, "zeros": {"ppl": ppl, "top1": top1}},
            }
        ]
    }


def test_an_infinite_ppl_round_trips_through_strict_json_and_renders_as_infinity() -> None:
    """Strict JSON has no number for +inf: a writer carries it as ``"inf"`` (as ``scx dp --json`` writes an
    infinite ε). The tables accept that text — they refused it — and the float a lenient reader makes of
    ``Infinity``, and show ∞ either way (was ``inf``)."""
    text = json.dumps(_stateless_result("inf"), allow_nan=False)
    back = json.loads(text, parse_constant=_refuse)
    assert "| zeros | ∞ / 0.25 |" in tables.markdown_table(back)
    assert "| zeros | ∞ / 0.25 |" in tables.markdown_table(_stateless_result(math.inf))
    assert "| normal | 3.0 / 1.00 |" in tables.markdown_table(back)


@pytest.mark.parametrize(
    "ppl, top1",
    [
        (math.nan, 0.5),
        ("infinite", 0.5),
        (-1.0, 0.5),
        (3.0, math.nan),
        (3.0, 1.5),
        (3.0, math.inf),
        (3.0, "1"),
    ],
)
def test_a_broken_statelessness_cell_is_refused(ppl: Any, top1: Any) -> None:
    """A NaN or negative PPL, a text other than ``"inf"``, a top-1 that is no rate in [0, 1]: refused by
    name (a NaN top-1 was rendered as ``nan``)."""
    with pytest.raises(ConfigError, match="statelessness"):
        tables.check_result(_stateless_result(ppl, top1), full=False)


def test_a_policy_only_a_later_setting_ran_gets_its_row() -> None:
    """The policies were those of the first setting: a later setting's ``recovered`` row — the one where
    the server rebuilds every cache from a recovered prompt — vanished from the table."""
    a = {"setting": "a", "metrics": {}, "statelessness": {"zeros": {"ppl": 9.0, "top1": 0.1}}}
    b = {
        "setting": "b",
        "metrics": {},
        "statelessness": {"zeros": {"ppl": 8.0, "top1": 0.2}, "recovered": {"ppl": 3.0, "top1": 1.0}},
    }
    text = tables.markdown_table({"settings": [a, b]})
    assert "| zeros | 9.0 / 0.10 | 8.0 / 0.20 |" in text
    assert "| recovered | – | 3.0 / 1.00 |" in text


# -- recorded but not tabled ------------------------------------------------------------------------------


def test_the_metrics_no_table_shows_are_listed_and_the_harness_records_no_other() -> None:
    """Every metric key a harness run records is a catalog row or listed in ``catalog.UNTABLED`` (with what
    it is): ``llm_reorder_recall`` was recorded and silently never shown. The published results hold no
    other key either."""
    assert not set(catalog.UNTABLED) & {m.key for m in catalog.METRICS}
    assert all(isinstance(v, str) and v for v in catalog.UNTABLED.values())
    known = {m.key for m in catalog.METRICS} | set(catalog.UNTABLED)
    w = tiny_weights(0)
    ctx = harness.Context(w, np.random.default_rng(6).integers(0, 32, 256), llm_reorder.NumpyLM(w), window=32)
    harness.fit_tools(ctx, [1], mlp=False)
    sets = {s.name: s for s in harness.default_settings(quick=True)}
    recorded: set[str] = set()
    for name in ("+decoys", "paper b=5", "blind b=5"):
        recorded |= set(harness.run_setting(ctx, sets[name], [IDS], n_new=3)["metrics"])
    assert "llm_reorder_recall" in recorded and "stateless_top1" in recorded
    assert recorded <= known, recorded - known
    for path in sorted(RESULTS.glob("attacks_*.json")):
        for s in json.loads(path.read_text())["settings"]:
            assert set(s["metrics"]) <= known, (path.name, set(s["metrics"]) - known)


def test_torch_lm_of_an_empty_batch_gives_empty_results_as_numpy_lm() -> None:
    """TorchLM raised a raw ValueError (np.concatenate of no chunks) where NumpyLM gives empty arrays."""
    transformers = pytest.importorskip("transformers")
    from scx_ref.attacks.llm_reorder import TorchLM

    cfg = transformers.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    lm = TorchLM(transformers.LlamaForCausalLM(cfg), bos=0)
    empty = np.zeros((0, 3), dtype=np.int64)
    assert lm.next_logprobs(empty).shape == (0, 11)
    assert lm.token_logprobs(empty).shape == (0, 3)
    assert lm.next_logprobs(np.array([[1, 2, 3]])).shape == (1, 11)  # and a batch of one still works

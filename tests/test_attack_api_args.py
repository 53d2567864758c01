"""Bad arguments to the public attack API (:mod:`scx_ref.attacks`, the CLI aside): each is refused with a
project error (:class:`~scx_ref.errors.SCXError`) before any work, never a raw numpy/torch error, a token
id silently truncated, a NaN result or a result that claims more than was measured. Tiny random model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import (
    _view,
    bruteforce,
    decoy_detect,
    frontier,
    harness,
    inversion,
    llm_reorder,
    multiview,
    report,
    statelessness,
    tables,
    vocab_match,
)
from scx_ref.attacks._model import candidate_states, forward_trace
from scx_ref.attacks.active import TamperingTransport
from scx_ref.attacks.stats import FrequencyPrior, Rate, at_baseline, bag_hits, wilson
from scx_ref.errors import (
    ConfigError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
    VocabularyError,
)
from scx_ref.protocol import SCXConfig, Stage
from scx_ref.protocol.transport import ServerView
from scx_ref.reference import KVCache
from tests.tiny import tiny_weights

W = tiny_weights(0)
PUBLIC = np.random.default_rng(5).integers(0, 32, 256)
PAPER = SCXConfig(level="paper", r1=2, r2=2, beta=5.0, gen_attention="server")
IDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.Context(W, PUBLIC, None, window=32)


@pytest.fixture(scope="module")
def view(ctx: harness.Context) -> tuple[ServerView, list[int]]:
    """The server's view of IDS under level paper with 3 generated tokens (keys shared)."""
    return harness.server_view(W, IDS, PAPER, n_new=3, decoys=ctx.decoys())


# -- statistics -----------------------------------------------------------------------------------------


def test_wilson_refuses_what_would_claim_certainty_or_crash() -> None:
    for k, n, z in ((3, float("inf"), 1.96), (3, 10, 0.0), (3, 10, -1.96), (3, 10, float("nan"))):
        with pytest.raises(ConfigError):  # were (0, 0), (0.3, 0.3), (0.3, 0.3), (0, 1): certainty or noise
            wilson(k, n, z)
    bad: list[tuple[Any, Any]] = [(float("nan"), 10), (0, -5), (3, -5), ("3", 10)]
    for k, n in bad:
        with pytest.raises(ConfigError):
            wilson(k, n)
    lo, hi = wilson(0, 1e-300)  # a vanishing n: the uninformative interval, not ZeroDivisionError
    assert (lo, hi) == (0.0, 1.0)
    assert wilson(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-3)


def test_rate_is_checked_when_made() -> None:
    with pytest.raises(ConfigError):
        Rate(5, 0)  # 5 of 0 read as rate 0 with interval (0, 1)
    with pytest.raises(ConfigError):
        Rate.pool([(3, 0)])
    with pytest.raises(ConfigError):
        Rate.pool([(3,)])  # type: ignore[list-item]
    assert Rate.pool([]).interval == (0.0, 1.0)


def test_at_baseline_needs_a_measured_baseline() -> None:
    with pytest.raises(ConfigError):  # was True: a 100 % attack "at" a baseline that measured nothing
        at_baseline(Rate(10, 10), Rate(0, 0))
    assert at_baseline(Rate(0, 0), Rate(0, 0))  # nothing scored: the attacker has only the prior


def test_frequency_prior_refuses_ids_it_cannot_hold() -> None:
    with pytest.raises(VocabularyError):  # was a prior over 8 "tokens" of a 5-token vocabulary
        FrequencyPrior([7], 5)
    with pytest.raises(VocabularyError):  # was token 1
        FrequencyPrior([1.5], 5)
    with pytest.raises(ConfigError):
        FrequencyPrior([1, 2], 0)
    with pytest.raises(ConfigError):
        FrequencyPrior([1, 2], 5).bag_guess(-1)
    with pytest.raises(VocabularyError):  # was 1 hit: 1.7 truncated to 1
        bag_hits([1.7], [1])
    assert len(FrequencyPrior([1, 2], 5).probs) == 5


# -- plaintext model and the view ------------------------------------------------------------------------


def test_float_ids_are_refused_not_truncated() -> None:
    with pytest.raises(VocabularyError):
        forward_trace(W, [1.5, 2.0])
    cache = KVCache()
    forward_trace(W, [1, 2], cache=cache, upto=1)
    with pytest.raises(VocabularyError):
        candidate_states(W, cache, [1.7], 1)


def test_candidate_states_checks_the_block_and_the_prefix() -> None:
    cache = KVCache()
    forward_trace(W, [1, 2], cache=cache, upto=1)
    with pytest.raises(ConfigError):  # was the embedding and zero K, V rows: no block at all
        candidate_states(W, cache, [3], -1)
    with pytest.raises(ConfigError):
        candidate_states(W, cache, [3], 5)
    with pytest.raises(ProtocolError):  # the prefix holds blocks 0..1, block 3 needs 0..2
        candidate_states(W, cache, [3], 3)


def test_view_readers_name_what_is_missing(view: tuple[ServerView, list[int]]) -> None:
    v = view[0]
    with pytest.raises(ProtocolError):
        _view.open_meta(None)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        _view.message(v, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        _view.stage_array(v, Stage.QKV, 0, "zz")
    with pytest.raises(ConfigError):
        _view.raw_qkv(v, W, 9)
    other = tiny_weights(1, hidden_size=24, n_heads=6, n_kv_heads=3)
    with pytest.raises(ShapeError):
        _view.shared_caches(v, other)


# -- order recovery ----------------------------------------------------------------------------------------


def test_search_space_and_enumeration_arguments() -> None:
    for rows in (float("nan"), float("inf"), 2.5, "4", True):
        with pytest.raises(ConfigError):
            bruteforce.search_space_bits(rows)  # type: ignore[arg-type]
    lm = llm_reorder.NumpyLM(W)
    for n in (0, 5, -1):
        with pytest.raises(ConfigError):
            bruteforce.enumerate_orders([1, 2, 3], n, lm)
    with pytest.raises(VocabularyError):
        bruteforce.enumerate_orders([1.5, 2.2], 2, lm)
    assert bruteforce.enumerate_orders([1, 2, 3], 1, lm) in ([1], [2], [3])


def test_beam_reorder_arguments() -> None:
    lm = llm_reorder.NumpyLM(W)
    for beam in (0, -1):
        with pytest.raises(ConfigError):
            llm_reorder.beam_reorder([1, 2], 2, lm, beam=beam)
    with pytest.raises(VocabularyError):
        llm_reorder.beam_reorder([1, 99], 2, lm)
    with pytest.raises(VocabularyError):
        llm_reorder.beam_reorder([1.5, 2.5], 2, lm)
    with pytest.raises(ConfigError):
        llm_reorder.beam_reorder([1, 2, 3], 2.0, lm)  # type: ignore[arg-type]
    assert len(llm_reorder.beam_reorder([4, 4, 5], 1, lm)) == 1


def test_order_scores_needs_a_truth() -> None:
    with pytest.raises(ConfigError):  # was exact 1.0 with recall 0.0
        llm_reorder.order_scores([], [])
    with pytest.raises(VocabularyError):
        llm_reorder.order_scores([1.9], [1])
    assert llm_reorder.order_scores([3], [3]) == {"exact": 1.0, "recall": 1.0, "kendall_tau": 0.0}


def test_numpy_lm_batches_are_b_by_t() -> None:
    lm = llm_reorder.NumpyLM(W)
    assert lm.token_logprobs(np.zeros((1, 0), dtype=np.int64)).shape == (1, 0)  # was (1, 1)
    assert lm.next_logprobs(np.zeros((0, 2), dtype=np.int64)).shape == (0, 32)
    with pytest.raises(ShapeError):
        lm.token_logprobs(np.array([3, 4]))
    with pytest.raises(ShapeError):  # was two sequences of one token
        lm.next_logprobs(np.array([3, 4]))


# -- inversion ---------------------------------------------------------------------------------------------


def _feats() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 32, 200)
    return W.embed[toks] + 0.01 * rng.standard_normal((200, 16)), toks


def test_fit_inverter_checks_before_fitting() -> None:
    feats, toks = _feats()
    with pytest.raises(NonFiniteError):  # was an inverter that predicts token 0 for everything
        inversion.fit_inverter(np.full((5, 16), np.nan), toks[:5], W)
    with pytest.raises(VocabularyError):  # was fitted to the last token's embedding
        inversion.fit_inverter(feats[:5], [-1] * 5, W)
    with pytest.raises(VocabularyError):
        inversion.fit_inverter(feats[:5], [1.5] * 5, W)
    with pytest.raises(ShapeError):  # was LinAlgError
        inversion.fit_inverter(np.zeros((0, 16)), [], W)
    for kw in ({"lam": -1.0}, {"lam": float("nan")}):
        with pytest.raises(ConfigError):
            inversion.fit_inverter(feats, toks, W, **kw)  # type: ignore[arg-type]
    mlp = {"kind": "mlp", "hidden": 8}
    for bad in ({"seed": np.random.default_rng(0)}, {"seed": None}, {"epochs": -1}, {"hidden": 0}):
        with pytest.raises(ConfigError):
            inversion.fit_inverter(feats, toks, W, **{**mlp, "epochs": 2, **bad})  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        inversion.fit_inverter(feats, toks, W, table=[[1.0]])  # type: ignore[arg-type]


def test_inverter_predict_checks_its_rows() -> None:
    feats, toks = _feats()
    inv = inversion.fit_inverter(feats, toks, W)
    assert float(np.mean(inv.predict(feats)[:, 0] == toks)) == 1.0
    with pytest.raises(ShapeError):
        inv.predict(feats[:, :5])
    with pytest.raises(NonFiniteError):  # was token 0 for every row
        inv.predict(np.full((2, 16), np.nan))
    for top in (0, -1, 33):  # -1 gave 31 columns, 33 gave 32: not the rows × top promised
        with pytest.raises(ConfigError):
            inv.predict(feats[:2], top=top)
    assert inv.predict(feats[:2], top=32).shape == (2, 32)


def test_column_permutation_needs_equal_widths() -> None:
    feats, _ = _feats()
    with pytest.raises(ShapeError):  # was a 4-long "permutation" of 6 public columns
        inversion.recover_column_permutation(feats[:, :4], np.concatenate([feats[:, :4], feats[:, :2]], 1))
    with pytest.raises(ShapeError):
        inversion.column_stats(np.zeros((0, 4)))


def test_multiview_arguments() -> None:
    traces = [forward_trace(W, PUBLIC[:32], logits=False)]
    with pytest.raises(ConfigError):  # was the SwiGLU-product rows, whatever the form's name
        multiview.public_rows(W, traces, "zz", 0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        multiview.public_rows(W, traces, "x", 9)
    with pytest.raises(ConfigError):
        multiview.public_rows(W, [], "x", 0)
    pub = multiview.public_rows(W, traces, "x", 0)
    table = inversion.unit_vocabulary(W)
    toks = PUBLIC[:32]
    with pytest.raises(ConfigError):  # was a NaN view weight
        multiview.JointInverter.fit([pub], [0.0], toks, W, table, holdout=0.0)
    for betas in ([-1.0], [float("nan")], [0.0, 1.0]):
        with pytest.raises(ConfigError):
            multiview.JointInverter.fit([pub], betas, toks, W, table)
    with pytest.raises(ConfigError):
        multiview.JointInverter.fit([], [], toks, W, table)
    with pytest.raises(ShapeError):
        multiview.JointInverter.fit([pub], [0.0], toks[:20], W, table)
    joint = multiview.JointInverter.fit([pub, pub], [0.0, 1.0], toks, W, table)
    assert joint.heldout_weight > 0
    with pytest.raises(ShapeError):
        joint.predict([pub, pub[:3]])


# -- vocabulary matching and decoy detection ---------------------------------------------------------------


def test_nearest_rows_and_map_arguments() -> None:
    E = np.asarray(W.embed)
    with pytest.raises(ConfigError):  # was the L2 match under another name
        vocab_match.nearest_rows(E[:2], E, "cosine")
    with pytest.raises(NonFiniteError):  # was token 0 at distance ∞
        vocab_match.nearest_rows(np.full((2, 16), np.nan), E)
    with pytest.raises(ShapeError):  # was index 0 of an empty table
        vocab_match.nearest_rows(E[:2], E[:0])
    with pytest.raises(ConfigError):
        vocab_match.nearest_rows(E[:2], E, chunk=0)
    with pytest.raises(ConfigError):
        vocab_match.l1_distances(E[:2], E, chunk=-1)
    ids, d = vocab_match.nearest_rows(E[:0], E)
    assert ids.shape == d.shape == (0,)
    with pytest.raises(ConfigError):  # was the argmax of NaNs: token 0
        vocab_match.map_tokens(np.ones((2, 32)), float("nan"), np.zeros(32))
    with pytest.raises(NonFiniteError):
        vocab_match.map_tokens(np.ones((2, 32)), 1.0, np.full(32, np.nan))
    with pytest.raises(ShapeError):
        vocab_match.map_tokens(np.ones(32), 1.0, np.zeros(32))
    assert vocab_match.match_block1_qkv(E[[3, 5]], W)[0].tolist() == [3, 5]


def test_block1_attention_match_arguments() -> None:
    z = np.zeros((2, 8))
    with pytest.raises(ShapeError):  # was matched on V's 2 rows, K's third ignored
        vocab_match.match_block1_attn(np.zeros((3, 8)), z, W)
    with pytest.raises(ConfigError):
        vocab_match.match_block1_attn(z, z, W, shortlist=0)
    with pytest.raises(NonFiniteError):
        vocab_match.match_block1_attn(np.full((2, 8), np.nan), z, W)
    with pytest.raises(ShapeError):
        vocab_match.match_block1_attn(np.zeros((2, 6)), np.zeros((2, 6)), W)
    with pytest.raises(ConfigError):
        vocab_match.match_block1_attn(z, z, W, positions=[0.5, 1.5])
    ids, dist = vocab_match.match_block1_attn(np.zeros((0, 2, 4)), np.zeros((0, 2, 4)), W)
    assert ids.shape == dist.shape == (0,)


def test_sequential_match_arguments() -> None:
    t = np.ones((1, 16))
    with pytest.raises(ConfigError):  # was run as kind "x"
        vocab_match.match_sequential(t, W, 1, "zz")
    with pytest.raises(ConfigError):  # was run as block 0's embedding
        vocab_match.match_sequential(t, W, -1, "x")
    for kw in ({"first": 0}, {"chunk": 0}, {"max_candidates": 0}):  # were token 0 at distance ∞
        with pytest.raises(ConfigError):
            vocab_match.match_sequential(t, W, 1, "x", **kw)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        vocab_match.match_sequential(np.ones((1, 5)), W, 1, "x")
    with pytest.raises(NonFiniteError):
        vocab_match.match_sequential(np.full((1, 16), np.nan), W, 1, "x")


def test_residual_matching_and_links_arguments() -> None:
    z = np.zeros((2, 16))
    with pytest.raises(ShapeError):
        vocab_match.match_block1_residual(np.zeros((0, 16)), z, W)
    with pytest.raises(ShapeError):
        vocab_match.match_block1_residual(z, np.zeros((2, 5)), W)
    q, o, f = decoy_detect.residual_links(np.zeros((0, 16)), z, z, W, 0)  # was a raw argmin error
    assert q.shape == (0,) and not o.any() and not f.any()
    with pytest.raises(ConfigError):
        decoy_detect.residual_links(z, z, z, W, 9)
    with pytest.raises(ConfigError):  # a NaN tolerance links nothing, silently
        decoy_detect.residual_links(z, z, z, W, 0, tol=float("nan"))
    with pytest.raises(ShapeError):
        decoy_detect.norm_residual(np.ones((2, 16)), np.ones(5))


# -- statelessness and the harness -------------------------------------------------------------------------


def test_statelessness_arguments(view: tuple[ServerView, list[int]]) -> None:
    v, gen = view
    assert statelessness.statelessness_table(v, W, IDS, gen)["normal"]["emb_sim"] == pytest.approx(1.0)
    with pytest.raises(ConfigError):  # was a table of NaN perplexities and agreements
        statelessness.statelessness_table(v, W, IDS, gen[:1])
    with pytest.raises(ConfigError):  # was a "normal" row of another prompt length
        statelessness.statelessness_table(v, W, IDS[:2], gen)
    with pytest.raises(ConfigError):
        statelessness.statelessness_table(v, W, IDS, gen, recovered=[1])
    with pytest.raises(VocabularyError):
        statelessness.statelessness_table(v, W, IDS, [1.5, 2.5])
    with pytest.raises(ConfigError):
        statelessness.server_caches(v, W, "magic")
    caches = statelessness.server_caches(v, W, "zeros")
    with pytest.raises(ShapeError):
        statelessness.decode_with_caches(W, caches[:2], [1], 4)
    with pytest.raises(ConfigError):
        statelessness.decode_with_caches(W, caches, [1], -3)


def test_request_keys_need_an_integer_seed(ctx: harness.Context) -> None:
    pool = ctx.decoys()
    with pytest.raises(ConfigError):  # was keys derived from the Generator's text: unrepeatable
        harness.server_view(W, [1, 2], PAPER, seed=np.random.default_rng(0), decoys=pool)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        harness.server_view(W, [1, 2], PAPER, seed="a", decoys=pool)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        harness.server_view(W, [1, 2], PAPER, n_new=-1, decoys=pool)
    with pytest.raises(ConfigError):
        harness.probe_block(PAPER, 0)


def test_run_setting_without_a_decode_step_and_without_prompts(ctx: harness.Context) -> None:
    """With n_new ≤ 1 no decode step runs, so the client never shares keys: the shared-cache attacks have
    nothing to read and are not run (was a KeyError). No prompt at all is refused (was an empty result
    whose exactness read 1.0)."""
    harness.fit_tools(ctx, [1], mlp=False)
    setting = harness.default_settings(quick=True)[0]  # the plaintext control: middle blocks 1..2
    for n_new in (0, 1):
        res = harness.run_setting(ctx, setting, [np.array([7, 3, 4])], n_new)
        assert (
            "vm_cache_seq_pos_acc" not in res["metrics"] and "inv_cache_ridge_pos_acc" not in res["metrics"]
        )
        assert res["metrics"]["vm_attn1_pos_acc"] == 1.0  # the plaintext control: the attacks still work
    with pytest.raises(ConfigError):
        harness.run_setting(ctx, setting, [], 2)
    with pytest.raises(VocabularyError):
        harness.run_setting(ctx, setting, [np.array([7.5, 3.0])], 2)


def test_context_needs_a_window_of_public_text() -> None:
    with pytest.raises(ConfigError):
        _ = harness.Context(W, PUBLIC, None, window=0).traces
    with pytest.raises(ConfigError):  # was an empty calibration pool and no public tokens to fit on
        harness.Context(W, PUBLIC[:10], None, window=32).decoys()
    with pytest.raises(ConfigError):
        harness.noise_fitting(W, PUBLIC[:64], PUBLIC[:0], 1.0, mlp_epochs=1)


def test_tampering_transport_arguments() -> None:
    with pytest.raises(ConfigError):
        TamperingTransport(None, lambda req, rep: rep)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TamperingTransport(object(), 3)  # type: ignore[arg-type]


# -- tables and reports ------------------------------------------------------------------------------------


def _result(ctx: harness.Context) -> dict[str, Any]:
    setting = harness.plaintext_control()
    res = harness.run_setting(ctx, setting, [np.array([7, 3, 4, 9])], 2)
    out: dict[str, Any] = json.loads(
        json.dumps({"model": "tiny", "n_prompts": 1, "prompt_len": 4, "n_new": 2, "settings": [res]})
    )
    return out


def test_tables_refuse_malformed_results(ctx: harness.Context) -> None:
    res = _result(ctx)
    assert "| attack | plaintext |" in tables.markdown_table(res, intervals=True)
    with pytest.raises(ConfigError):
        tables.markdown_table({})
    with pytest.raises(ConfigError):
        tables.fmt("x")
    bad = json.loads(json.dumps(res))
    bad["settings"][0]["metrics"]["vm_qkv1_bag_recall"] = float("nan")
    with pytest.raises(ConfigError):  # was a "nan" cell
        tables.markdown_table(bad)
    bad["settings"][0]["metrics"]["vm_qkv1_bag_recall"] = "oops"
    with pytest.raises(ConfigError):
        report.markdown_report(bad)
    with pytest.raises(ConfigError):
        report.markdown_report({"settings": []})
    with pytest.raises(ConfigError):
        frontier.merge_results([{"settings": "x"}])


def test_report_cli_exits_2_on_a_bad_file(
    ctx: harness.Context, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_result(ctx)))
    assert report.main([str(good), "--out", str(tmp_path / "A.md")]) == 0
    files = {"list.json": "[1, 2]", "bad.json": "{bad", "nomodel.json": '{"settings": []}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for argv in (
        [str(tmp_path / "missing.json")],
        *([str(tmp_path / name)] for name in files),
        [str(good), "--findings", str(tmp_path / "nope.md")],
    ):
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err

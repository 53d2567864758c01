"""Privacy attacks (DESIGN §8): each works on the plaintext control, and each SCX mechanism changes
(or does not change) what it recovers as the report states. Every server view comes from the real
protocol engine (:func:`scx_ref.attacks.harness.server_view`). Tiny random models; the SmolLM2 run is
slow."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from scx_ref.attacks import bruteforce, decoy_detect, inversion, llm_reorder, statelessness, vocab_match
from scx_ref.attacks._model import candidate_states, forward_trace
from scx_ref.attacks._view import shared_caches, stage_array
from scx_ref.attacks.harness import KEY_ROLES, AblatedKeys, Context, plaintext_control, server_view
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, ShapeError
from scx_ref.protocol import SCXConfig, Stage
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.weights import random_weights

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48
)


@pytest.fixture(scope="module")
def weights():  # type: ignore[no-untyped-def]
    return random_weights(CFG, np.random.default_rng(0))


@pytest.fixture(scope="module")
def pool(weights):  # type: ignore[no-untyped-def]
    """The client's calibration pool, built once from public tokens (as the harness builds it)."""
    return Context(weights, np.random.default_rng(9).integers(0, 128, 1024), None).decoys()


IDS = np.array([5, 17, 3, 99, 42, 8, 77, 64, 1, 30])


def test_forward_trace_and_candidates_match_reference(weights) -> None:  # type: ignore[no-untyped-def]
    tr = forward_trace(weights, IDS)
    logits, _ = ReferenceModel(weights).prefill(IDS)
    np.testing.assert_allclose(tr.logits, logits, rtol=1e-12, atol=1e-12)
    cache = KVCache()
    forward_trace(weights, IDS[:6], cache=cache, upto=1)
    x, k, _ = candidate_states(weights, cache, np.array([IDS[6], 0]), 2)
    np.testing.assert_allclose(x[0], tr.x[2][6], atol=1e-12)
    np.testing.assert_allclose(k[0], tr.k[2][6].ravel(), atol=1e-12)
    assert not np.allclose(x[1], tr.x[2][6])


def _view(weights, pool, config, identity=frozenset(), n_new=3, seed=1):  # type: ignore[no-untyped-def]
    """The engine's server view of IDS under ``config`` (permutation roles in ``identity`` ablated)."""
    return server_view(weights, IDS, config, identity, n_new=n_new, seed=seed, decoys=pool)


def _plaintext_view(weights, pool, n_new=3):  # type: ignore[no-untyped-def]
    ctl = plaintext_control()
    return _view(weights, pool, ctl.config, ctl.identity, n_new=n_new)


def _rows_of(rows, truth):  # type: ignore[no-untyped-def]
    """Ground truth for scoring: which message rows equal (relative 1e-9) a true plaintext row."""
    d = np.linalg.norm(rows[:, None, :] - truth[None, :, :], axis=2).min(axis=1)
    return d <= 1e-9 * np.linalg.norm(rows, axis=1)


def test_plaintext_control_shows_the_server_plaintext(weights, pool) -> None:  # type: ignore[no-untyped-def]
    """Under the control every message the server receives is the plaintext forward's rows, in true
    order, with no decoys: an attack that fails on it is broken."""
    view, gen = _plaintext_view(weights, pool, n_new=3)
    tr = forward_trace(weights, IDS)
    same = {"rtol": 1e-10, "atol": 1e-12}
    for i in range(CFG.n_layers):
        np.testing.assert_allclose(stage_array(view, Stage.QKV, i), tr.x[i], **same)
        for name, rows in (("q", tr.q[i]), ("k", tr.k[i]), ("v", tr.v[i])):
            np.testing.assert_allclose(stage_array(view, Stage.ATTN, i, name), rows, **same)
        np.testing.assert_allclose(stage_array(view, Stage.O, i), tr.o[i], **same)
        np.testing.assert_allclose(stage_array(view, Stage.FFN, i), tr.h[i], **same)
    np.testing.assert_allclose(stage_array(view, Stage.HEAD, CFG.n_layers), tr.final, **same)
    last = CFG.n_layers - 1
    np.testing.assert_allclose(
        stage_array(view, Stage.LOCK, last, "k"), tr.k[last].reshape(len(IDS), -1), **same
    )
    assert gen == [int(t) for t in ReferenceModel(weights).generate(IDS, 3)]


def test_each_ablated_role_switches_its_own_mechanism_off(weights, pool) -> None:  # type: ignore[no-untyped-def]
    """AblatedKeys' roles are the engine's: ``head`` off leaves the attention rows in the clear while
    the QKV rows stay permuted; ``tok`` off (r = 0) leaves the QKV rows in true order while the
    attention rows stay head-permuted; ``lock`` off leaves the locked keys in true order."""
    tr = forward_trace(weights, IDS, logits=False)
    k0 = tr.k[0].reshape(len(IDS), -1)
    cfg = SCXConfig(level="permute", r1=0, r2=0, r_lock=0)
    view, _ = _view(weights, pool, cfg, frozenset({"head"}), n_new=0)
    np.testing.assert_allclose(stage_array(view, Stage.ATTN, 0, "k").reshape(len(IDS), -1), k0, atol=1e-12)
    qkv = stage_array(view, Stage.QKV, 0)
    assert not np.allclose(qkv, tr.x[0]) and _rows_of(qkv, tr.x[0]).all()  # same rows, another order
    view, _ = _view(weights, pool, cfg, frozenset({"tok", "lock"}), n_new=0)
    np.testing.assert_allclose(stage_array(view, Stage.QKV, 0), tr.x[0], atol=1e-12)
    k_seen = stage_array(view, Stage.ATTN, 0, "k").reshape(len(IDS), -1)
    assert not np.allclose(k_seen, k0)
    np.testing.assert_allclose(np.sort(k_seen, axis=1), np.sort(k0, axis=1), atol=1e-12)
    last = CFG.n_layers - 1
    k_last = tr.k[last].reshape(len(IDS), -1)
    np.testing.assert_allclose(stage_array(view, Stage.LOCK, last, "k"), k_last, atol=1e-12)
    view, _ = _view(weights, pool, cfg, frozenset({"tok"}), n_new=0)
    locked = stage_array(view, Stage.LOCK, last, "k")
    assert not np.allclose(locked, k_last) and _rows_of(locked, k_last).all()
    keys = AblatedKeys(b"\x01" * 32, bytes(16), frozenset({"tok"}))
    assert np.array_equal(
        keys.for_nonce(bytes(range(16))).permutation(("tok", 0, Stage.QKV), 5), np.arange(5)
    )
    assert not np.array_equal(keys.permutation(("head", 0, "groups"), 8), np.arange(8))
    assert plaintext_control().identity == KEY_ROLES
    with pytest.raises(ConfigError):
        AblatedKeys(
            b"\x01" * 32, bytes(16), frozenset({"tok", "alpha"})
        )  # alpha keys noise, not a permutation


def test_block1_qkv_match_plaintext_then_noise(weights, pool) -> None:  # type: ignore[no-untyped-def]
    view, _ = _plaintext_view(weights, pool)
    m = view.select(stage=Stage.QKV, layer=0)[0]
    ids, d = vocab_match.match_block1_qkv(m.arrays["x"], weights, bool(m.meta["normalized"]))
    assert np.array_equal(ids, IDS) and d.max() < 1e-9  # plaintext: every row, in order
    view, _ = _view(weights, pool, SCXConfig(level="permute", r1=3))
    m = view.select(stage=Stage.QKV, layer=0)[0]
    ids, d = vocab_match.match_block1_qkv(m.arrays["x"], weights, bool(m.meta["normalized"]))
    # permuted, with 3 calibration decoys (embeddings of public tokens): the bag holds every prompt token
    assert len(ids) == len(IDS) + 3 and d.max() < 1e-9
    assert not (Counter(IDS.tolist()) - Counter(ids.tolist()))
    view, _ = _view(weights, pool, SCXConfig(level="paper", beta=50.0, r1=0))
    m = view.select(stage=Stage.QKV, layer=0)[0]
    assert m.meta["normalized"]
    ids, _ = vocab_match.match_block1_qkv(m.arrays["x"], weights, True)
    assert np.mean(np.isin(IDS, ids)) < 0.5  # large β hides the QKV-stage rows themselves


def test_fingerprints_are_invariant_to_head_permutation(weights, pool) -> None:  # type: ignore[no-untyped-def]
    ctl = plaintext_control()
    for config, identity in ((ctl.config, ctl.identity), (SCXConfig(beta=20.0), frozenset())):
        view, _ = _view(weights, pool, config, identity)
        ids, _ = vocab_match.match_block1_attn(
            stage_array(view, Stage.ATTN, 0, "k"), stage_array(view, Stage.ATTN, 0, "v"), weights
        )
        assert np.array_equal(ids, IDS)


def test_residual_match_defeats_block1_noise(weights, pool) -> None:  # type: ignore[no-untyped-def]
    view, _ = _view(weights, pool, SCXConfig(beta=20.0, r1=3, r2=3))
    ids, d = vocab_match.match_block1_residual(
        stage_array(view, Stage.O, 0), stage_array(view, Stage.FFN, 0), weights
    )
    assert sorted(ids[d < 1e-6].tolist()) == sorted(IDS.tolist())
    # the 3 decoys match nothing at this seed; at 5 seeds of 800 an O-stage and an FFN-stage decoy are one
    # calibration token's rows, a consistent pair that matches its token (match_block1_residual's docstring)
    assert np.sum(d < 1e-6) == len(IDS)


def test_sequential_matching_on_shared_cache_and_generation(weights, pool) -> None:  # type: ignore[no-untyped-def]
    view, gen = _view(weights, pool, SCXConfig(beta=5.0), n_new=4)
    k, v = shared_caches(view, weights)[1]
    target = np.concatenate([k.reshape(len(k), -1), v.reshape(len(v), -1)], axis=1)
    rec, dist = vocab_match.match_sequential(target, weights, 1, "kv")
    assert np.array_equal(rec, IDS) and dist.max() < 1e-8
    steps = len(view.select(stage=Stage.GEN_MID))
    assert steps == 3  # the last generated token is never fed back
    gx = np.concatenate([stage_array(view, Stage.GEN_MID, 1, step=s) for s in range(steps)])
    g, _ = vocab_match.match_sequential(gx, weights, 1, "x", prefix=rec)
    assert g.tolist() == gen[:steps]


def test_residual_links_reject_calibration_decoys(weights, pool) -> None:  # type: ignore[no-untyped-def]
    view, _ = _view(weights, pool, SCXConfig(r1=4, r2=4))
    x_ffn = stage_array(view, Stage.FFN, 2)
    q, o, f = decoy_detect.residual_links(
        stage_array(view, Stage.QKV, 2), stage_array(view, Stage.O, 2), x_ffn, weights, 2
    )
    real = _rows_of(x_ffn, forward_trace(weights, IDS, upto=2, logits=False).h[2])
    assert real.sum() == len(IDS) and len(f) == len(IDS) + 4
    assert np.array_equal(f, real)  # exactly the real rows link; the 4 decoys do not
    assert q.sum() == len(IDS) and o.sum() == len(IDS)


def test_norm_residual_flags_gaussian_rows(weights) -> None:  # type: ignore[no-untyped-def]
    from scx_ref import ops

    g = weights.layers[0].attn_norm
    real = ops.rms_norm(weights.embed[:5], g, 0.0)
    fake = np.random.default_rng(0).standard_normal((5, CFG.hidden_size)) * real.std(0) + real.mean(0)
    assert decoy_detect.norm_residual(real, g).max() < 1e-12
    assert decoy_detect.norm_residual(fake, g).min() > 1e-3


def test_inversion_works_unpermuted_and_sigma_hides_naive(weights) -> None:  # type: ignore[no-untyped-def]
    pub = np.random.default_rng(2).integers(0, 128, 1024)
    tr = forward_trace(weights, pub[:512], logits=False)
    tr2 = forward_trace(weights, pub[512:], logits=False)
    v = np.concatenate([tr.v[1].reshape(512, -1), tr2.v[1].reshape(512, -1)])
    inv = inversion.fit_inverter(v[:900], pub[:900], weights, "ridge", lam=1.0)
    acc = np.mean(inv.predict(v[900:])[:, 0] == pub[900:])
    perm = np.random.default_rng(3).permutation(v.shape[1])
    acc_perm = np.mean(inv.predict(v[900:, perm])[:, 0] == pub[900:])
    assert acc > 0.5 and acc_perm < acc
    idx = inversion.recover_column_permutation(v[:900, perm], v[:900])
    assert np.mean(idx == np.argsort(perm)) > 0.5  # statistics of 900 rows recover most of σ
    table = inversion.unit_vocabulary(weights)  # a shared table gives the same inverter, without a copy
    shared = inversion.fit_inverter(v[:900], pub[:900], weights, "ridge", lam=1.0, table=table)
    assert shared.table is table and np.array_equal(shared.predict(v[900:]), inv.predict(v[900:]))
    with pytest.raises(ShapeError):
        inversion.fit_inverter(v[:900], pub[:900], weights, "ridge", table=table[:, :-1])


def test_mlp_inverter_fits(weights) -> None:  # type: ignore[no-untyped-def]
    pub = np.random.default_rng(2).integers(0, 128, 400)
    x = vocab_match.normalized_table(weights)[pub]
    inv = inversion.fit_inverter(x, pub, weights, "mlp", epochs=150, hidden=128)
    assert np.mean(inv.predict(x)[:, 0] == pub) > 0.8
    with pytest.raises(ConfigError):
        inversion.fit_inverter(x, pub, weights, "svm")


def test_beam_reorder_and_scores(weights) -> None:  # type: ignore[no-untyped-def]
    """The model's own greedy continuation of token 3, reversed and with a decoy added, is put back in
    order by the beam search, which (beam 64 ≥ the 60 partial sequences of 3 tokens from a bag of 5)
    returns the exact maximum-likelihood sequence (the enumeration's)."""
    lm = llm_reorder.NumpyLM(weights, bos=3)
    truth = [int(t) for t in ReferenceModel(weights).generate(np.array([3]), 4)]
    decoy = next(t for t in range(CFG.vocab_size) if t not in truth)
    bag = [*truth[::-1], decoy]
    out = llm_reorder.beam_reorder(bag, 4, lm, beam=64)
    assert out == truth
    assert out == bruteforce.enumerate_orders(bag, 4, lm)
    assert llm_reorder.order_scores(out, truth) == {"exact": 1.0, "recall": 1.0, "kendall_tau": 1.0}
    s = llm_reorder.order_scores([1, 2, 3], [1, 2, 3])
    assert s == {"exact": 1.0, "recall": 1.0, "kendall_tau": 1.0}
    assert llm_reorder.order_scores([3, 2, 1], [1, 2, 3])["kendall_tau"] == -1.0
    with pytest.raises(ConfigError):
        llm_reorder.beam_reorder([1, 2], 3, lm)


def test_bruteforce_bits_and_enumeration(weights) -> None:  # type: ignore[no-untyped-def]
    assert bruteforce.search_space_bits(4) == pytest.approx(np.log2(24))
    lm = llm_reorder.NumpyLM(weights)
    seq = [int(t) for t in np.argsort(-lm.token_logprobs(np.arange(128)[:, None])[:, 0])[:3]]
    best = bruteforce.enumerate_orders(seq, 3, lm)
    scores = {
        tuple(p): lm.token_logprobs(np.array([p])).sum()
        for p in [[a, b, c] for a in seq for b in seq for c in seq if len({a, b, c}) == 3]
    }
    assert tuple(best) == max(scores, key=lambda p: scores[p])
    with pytest.raises(ConfigError):
        bruteforce.enumerate_orders(list(range(8)), 2, lm)


def test_statelessness_normal_row_is_exact(weights, pool) -> None:  # type: ignore[no-untyped-def]
    """With the true prompt recovered the server rebuilds every cache (the ``recovered`` row equals the
    ``normal`` one); from its own view alone (guard caches zeroed, encoded or borrowed) it does not."""
    view, gen = _view(weights, pool, SCXConfig(beta=5.0), n_new=4)
    tab = statelessness.statelessness_table(view, weights, IDS, gen, recovered=IDS)
    assert tab["normal"]["top1"] == 1.0 and tab["recovered"] == tab["normal"]
    assert tab["zeros"]["emb_sim"] < 1.0 - 1e-6
    assert max(tab[pol]["top1"] for pol in ("zeros", "encoded", "neighbour", "no-prompt")) < 1.0


def test_server_view_from_public_tokens_is_seeded(weights) -> None:  # type: ignore[no-untyped-def]
    """Without a prebuilt pool the client draws its decoys from the public tokens; the keys depend on
    the seed only, so one seed gives one view and another seed another."""
    pub = np.random.default_rng(4).integers(0, 128, 128)
    scx = SCXConfig(level="paper", r1=2, r2=2)
    view, gen = server_view(weights, IDS, scx, n_new=2, public=pub)
    x = stage_array(view, Stage.QKV, 0)
    assert x.shape[0] == len(IDS) + 2 and gen == [int(t) for t in ReferenceModel(weights).generate(IDS, 2)]
    np.testing.assert_array_equal(stage_array(server_view(weights, IDS, scx, public=pub)[0], Stage.QKV, 0), x)
    assert not np.allclose(
        stage_array(server_view(weights, IDS, scx, seed=1, public=pub)[0], Stage.QKV, 0), x
    )


@pytest.mark.slow
def test_smollm2_attacks_recover_prompt() -> None:
    """On SmolLM2 (real weights), block-1 fingerprints and FFN − O·W_o residual matching recover the
    prompt under level paper (noise on block 1's QKV stage), decoys included."""
    from scx_ref.attacks.cli import public_and_victims
    from scx_ref.zoo import load_model

    _, tok, w = load_model("smollm2", np.float64)
    public, victims = public_and_victims(tok, w.config.vocab_size, 256, 1, 8)
    view, _ = server_view(w, victims[0], SCXConfig(level="paper", r1=4, r2=4), n_new=1, public=public)
    ids, _ = vocab_match.match_block1_attn(
        stage_array(view, Stage.ATTN, 0, "k"), stage_array(view, Stage.ATTN, 0, "v"), w
    )
    assert np.mean(ids == victims[0]) >= 0.75
    t_res, d_res = vocab_match.match_block1_residual(
        stage_array(view, Stage.O, 0), stage_array(view, Stage.FFN, 0), w
    )
    assert sorted(t_res[d_res < 1e-6].tolist()) == sorted(victims[0].tolist())  # the 4 decoys match nothing


def test_context_pool_equals_engine_calibration_pool(weights) -> None:  # type: ignore[no-untyped-def]
    from scx_ref.backends.numpy_backend import NumpyBackend
    from scx_ref.protocol.decoys import CalibrationPool

    pub = np.random.default_rng(5).integers(0, 128, 130)
    ctx = Context(weights, pub, None, window=64)
    ref = CalibrationPool.from_tokens(NumpyBackend(weights, np.float64), pub[:128], window=64)
    got = ctx.decoys()
    assert ctx.decoys() is got  # built once
    assert set(got.rows) == set(ref.rows)
    for key, rows in ref.rows.items():
        np.testing.assert_allclose(got.rows[key], rows, rtol=1e-10, atol=1e-12)


def test_block1_tables_shortlist_equals_full_search(weights, pool) -> None:  # type: ignore[no-untyped-def]
    view, _ = _view(weights, pool, SCXConfig(beta=5.0))
    k, v = stage_array(view, Stage.ATTN, 0, "k"), stage_array(view, Stage.ATTN, 0, "v")
    tabs = vocab_match.Block1Tables(weights)
    a, da = vocab_match.match_block1_attn(k, v, weights, tables=tabs, shortlist=4)
    b, db = vocab_match.match_block1_attn(k, v, weights, tables=tabs, shortlist=128)
    assert np.array_equal(a, IDS) and np.array_equal(b, IDS)
    np.testing.assert_allclose(da, db, atol=1e-9)
    assert da.max() < 1e-6


def test_harness_run_all_controls_and_report(weights, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Plaintext control: every attack recovers the prompt; level paper leaves the FFN − O·W_o attack
    at 100 %; level blind stops it; the report and the four plots are written."""
    from scx_ref.attacks import harness, report

    pub = np.random.default_rng(6).integers(0, 128, 512)
    ctx = harness.Context(weights, pub, llm_reorder.NumpyLM(weights))
    harness.fit_tools(ctx, [1], mlp=False, per_layer=[1, 2])
    sets = {s.name: s for s in harness.default_settings(quick=True)}
    chosen = [sets[n] for n in ("plaintext", "tok-perm", "+decoys", "paper b=5", "paper b=20", "blind b=5")]
    res = harness.run_all(
        ctx, [IDS[:6]], chosen, n_new=2, mlp_epochs=5, per_layer=[1, 2], fitting_betas=(1.0, 5.0)
    )
    m = {s["setting"]: s["metrics"] for s in res["settings"]}
    for key in ("vm_qkv1_bag_recall", "vm_attn1_pos_acc", "vm_resid1_bag_recall", "vm_cache_seq_pos_acc"):
        assert m["plaintext"][key] == 1.0, key
    assert m["plaintext"]["vm_gen_seq_acc"] == 1.0
    assert m["paper b=20"]["vm_resid1_bag_recall"] == 1.0 and m["paper b=20"]["vm_attn1_pos_acc"] == 1.0
    assert m["blind b=5"]["vm_resid1_bag_recall"] < 0.5
    assert m["+decoys"]["decoy_link_decoys_rejected"] == 1.0 and m["+decoys"]["decoy_link_real_found"] == 1.0
    assert m["+decoys"]["vm_qkv1_bag_precision"] < 1.0 == m["tok-perm"]["vm_qkv1_bag_precision"]
    # the blinded-rows link is scored where the last block's QKV and FFN stages are blinded, and only there
    assert 0.0 <= m["blind b=5"]["decoy_blind_link_decoys_rejected"] <= 1.0
    assert 0.0 <= m["blind b=5"]["decoy_blind_link_real_found"] <= 1.0
    assert not any(k.startswith("decoy_blind_link") for k in m["paper b=5"])
    assert "statelessness" in res["settings"][0] and "per_layer" in res["settings"][0]
    paths = report.plot(res, tmp_path)
    assert {p.name for p in paths} == {
        "attacks_by_setting.png",
        "recovery_vs_beta.png",
        "recovery_vs_decoys.png",
        "recovery_per_layer.png",
    }
    res["command"] = "scx attack --model x"
    md = report.markdown_report(res, "plots", "- a finding")
    assert "scx attack --model x" in md and "| VM FFN−O-1 bag |" in md and "- a finding" in md

"""The vocabulary-matching, decoy-detection, statelessness, active and brute-force
attacks: each attack cross-checked against a small independent re-implementation on crafted cases whose
answer is known (zero noise recovers every token), defects that made an attacker look weaker than it is
(a repeated token's rows counted as decoys, permuted stages left out of the search-space table, the
prior's mode lost at β = ∞), and bad arguments refused with project errors. Tiny random models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import bruteforce, decoy_detect, statelessness, vocab_match
from scx_ref.attacks._model import forward_trace
from scx_ref.attacks._view import stage_array
from scx_ref.attacks.harness import server_view
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError, VocabularyError
from scx_ref.protocol import SCXConfig, Stage
from tests.tiny import tiny_weights

W = tiny_weights(0)
C = W.config


def _rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """An independent RMSNorm (LlamaRMSNorm): γ ⊙ x / sqrt(mean x² + ε)."""
    return gain * x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)


# -- cross-checks against independent re-implementations ----------------------------------------------


def test_nearest_rows_equals_brute_force_across_chunks() -> None:
    """L1 and L2 nearest rows over a table split in chunks of 3 equal a brute-force search, and a row
    equidistant from two table rows goes to the first (the ordinary argmin)."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((11, 5))
    rows = table[rng.integers(0, 11, 7)] + rng.laplace(0, 0.3, (7, 5))
    for metric, norm in (("l1", 1), ("l2", 2)):
        want = np.linalg.norm(rows[:, None, :] - table[None, :, :], ord=norm, axis=2)
        got, dist = vocab_match.nearest_rows(rows, table, metric, chunk=3)
        assert np.array_equal(got, want.argmin(axis=1))
        np.testing.assert_allclose(dist, want.min(axis=1), rtol=1e-9)
    tied = np.array([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    ids, d = vocab_match.nearest_rows(np.zeros((1, 2)), tied, "l1", chunk=2)  # tie across two chunks
    assert ids.tolist() == [0] and d.tolist() == [0.0]
    ids, _ = vocab_match.nearest_rows(np.zeros((1, 2)), tied[1:], "l1", chunk=1)
    assert ids.tolist() == [1]  # rows 1 and 2 of this table tie: the first wins


def test_block1_qkv_zero_noise_recovers_every_row_with_the_models_gain_and_eps() -> None:
    """With a large ε and non-unit gains, RMSNorm(E[t]) rows (computed independently) match their
    tokens at distance 0, both with the message's flag and with the flag unknown (None); raw rows too."""
    w = tiny_weights(4, rms_eps=0.5)
    ids = np.array([3, 3, 30, 0, 17, 9])
    e = np.asarray(w.embed, dtype=np.float64)
    normed = _rms_norm(e[ids], np.asarray(w.layers[0].attn_norm), 0.5)
    np.testing.assert_allclose(vocab_match.normalized_table(w)[ids], normed, rtol=1e-12)
    for rows, flag in ((normed, True), (normed, None), (e[ids], False), (e[ids], None)):
        got, d = vocab_match.match_block1_qkv(rows, w, flag)
        assert got.tolist() == ids.tolist() and d.max() < 1e-12
    # the decoy check's distance of a real row is 0, not the expanded form's rounding (~1e-8)
    table = vocab_match.normalized_table(w)
    assert decoy_detect.vocab_distance(table[ids], w, True).tolist() == [0.0] * len(ids)
    assert decoy_detect.vocab_distance(e[ids], w, False).tolist() == [0.0] * len(ids)


def test_map_tokens_equals_the_laplace_posterior() -> None:
    """map_tokens is the argmax of log p(t) + Σ log Laplace(x − N(E[t]); β), computed here from the
    Laplace density itself, at several β; β = 0 is the L1 nearest row."""
    rng = np.random.default_rng(2)
    table = vocab_match.normalized_table(W)
    ids = rng.integers(0, C.vocab_size, 20)
    x = table[ids] + rng.laplace(0, 0.7, (20, C.hidden_size))
    prior = rng.dirichlet(np.ones(C.vocab_size))
    d = vocab_match.l1_distances(x, table)
    for beta in (0.05, 0.7, 3.0, 50.0):
        dens = np.exp(-np.abs(x[:, None, :] - table[None, :, :]) / beta) / (2 * beta)
        post = np.log(prior)[None, :] + np.log(dens).sum(axis=2)
        assert np.array_equal(vocab_match.map_tokens(d, beta, np.log(prior)), post.argmax(axis=1))
        got, dist = vocab_match.match_block1_map(x, W, beta, np.log(prior))
        assert np.array_equal(got, post.argmax(axis=1))
        np.testing.assert_allclose(dist, d[np.arange(20), got])
    assert np.array_equal(vocab_match.map_tokens(d, 0.0, np.log(prior)), d.argmin(axis=1))


def test_map_tokens_at_infinite_beta_is_the_priors_mode() -> None:
    """β = ∞ ignores the distances (documented: the prior's mode), an infinite distance included; it
    was NaN there (∞/∞) and the argmax of NaN returned token 0 whatever the prior."""
    prior = np.log(np.array([0.1, 0.6, 0.3]))
    d = np.array([[0.0, np.inf, 1.0], [2.0, 1.0, 0.0]])
    with np.errstate(all="raise"):  # no NaN arithmetic on the way
        assert vocab_match.map_tokens(d, np.inf, prior).tolist() == [1, 1]


def _head_permuted(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rows`` (n × H_kv × d_h) under a random head-structured permutation: the groups reordered and a
    coordinate permutation per original group inside each head."""
    order = rng.permutation(C.n_kv_heads)
    sigmas = [rng.permutation(C.head_dim) for _ in range(C.n_kv_heads)]
    return np.stack([rows[:, g, sigmas[g]] for g in order], axis=1)


def test_attention_fingerprints_recover_every_position_under_a_head_permutation() -> None:
    """Block-1 K, V of a plaintext forward (repeated tokens included) under a head permutation: every
    position's token, with the K re-ranking on a shortlist of 1 and of all tokens, and V alone; the last
    rows again at their true positions n.. as a generation step sends them."""
    rng = np.random.default_rng(3)
    ids = np.array([5, 5, 12, 31, 0, 5, 7, 19])
    tr = forward_trace(W, ids, logits=False)
    k, v = _head_permuted(tr.k[0], rng), _head_permuted(tr.v[0], rng)
    for use_k, shortlist in ((True, 1), (True, C.vocab_size), (False, 256)):
        got, d = vocab_match.match_block1_attn(k, v, W, use_k=use_k, shortlist=shortlist)
        assert got.tolist() == ids.tolist() and d.max() < 1e-9
    got, d = vocab_match.match_block1_attn(k[5:], v[5:], W, positions=np.arange(5, 8))
    assert got.tolist() == ids[5:].tolist() and d.max() < 1e-9


def test_sequential_matching_recovers_prompt_and_continuation_at_a_middle_block() -> None:
    """Block-3 [K | V] cache rows and block-3 input rows of a plaintext forward: token by token, each
    exact (relative distance ~0), in the vocabulary order and in a ranker's order that puts the truth
    last; a ranker's float ids are refused, not truncated."""
    ids = np.array([4, 4, 20, 1, 9, 30])
    tr = forward_trace(W, ids, logits=False)
    kv = np.concatenate([tr.k[3].reshape(6, -1), tr.v[3].reshape(6, -1)], axis=1)
    got, d = vocab_match.match_sequential(kv, W, 3, "kv")
    assert got.tolist() == ids.tolist() and d.max() < 1e-9
    worst_first = lambda t: np.argsort(-np.isin(np.arange(C.vocab_size), ids).astype(int))[::-1]  # noqa: E731
    got, _ = vocab_match.match_sequential(kv, W, 3, "kv", ranker=worst_first, first=2, chunk=3)
    assert got.tolist() == ids.tolist()
    got, d = vocab_match.match_sequential(tr.x[3][3:], W, 3, "x", prefix=ids[:3])
    assert got.tolist() == ids[3:].tolist() and d.max() < 1e-9
    with pytest.raises(VocabularyError):
        vocab_match.match_sequential(kv, W, 3, "kv", ranker=lambda t: np.arange(C.vocab_size) + 0.5)


def test_block1_residual_links_real_rows_and_rejects_decoys() -> None:
    """FFN rows E[t] + O·W_o of a plaintext forward, shuffled, with two decoy FFN rows and a decoy O row:
    every real FFN row is linked to its token at distance ~0 (decoys far)."""
    rng = np.random.default_rng(5)
    ids = np.array([2, 2, 15, 8, 27])
    tr = forward_trace(W, ids, logits=False)
    o = np.concatenate([tr.o[0], rng.standard_normal((1, C.q_dim))])[rng.permutation(6)]
    f = np.concatenate([tr.h[0], rng.standard_normal((2, C.hidden_size))])
    got, d = vocab_match.match_block1_residual(o, f, W)
    assert got[:5].tolist() == ids.tolist() and d[:5].max() < 1e-9 and d[5:].min() > 1e-3


# -- defects fixed -----------------------------------------------------------------------------------


def test_residual_links_mark_every_copy_of_a_repeated_tokens_row_real() -> None:
    """Block 1 at level permute: a repeated token's QKV rows are equal (E[t]); each is real, but only the
    first copy was marked (the argmin's), so real rows were counted as decoys. Ground truth: the rows
    equal to a plaintext row; the decoys still are not linked."""
    ids = np.array([3, 3, 5, 3, 11])
    view, _ = server_view(W, ids, SCXConfig(level="permute", r1=3, r2=2), n_new=0, seed=1)
    xq, xo, xf = (stage_array(view, s, 0) for s in (Stage.QKV, Stage.O, Stage.FFN))
    q, o, f = decoy_detect.residual_links(xq, xo, xf, W, 0)
    tr = forward_trace(W, ids, logits=False)

    def real(rows: np.ndarray, truth: np.ndarray) -> np.ndarray:
        gap = np.linalg.norm(rows[:, None, :] - truth[None, :, :], axis=2).min(axis=1)
        return np.asarray(gap <= 1e-9 * np.linalg.norm(rows, axis=1))

    want_q = real(xq, tr.x[0])
    assert want_q.sum() >= len(ids)  # the repeated rows (and any decoy equal to a prompt row)
    assert np.array_equal(q, want_q)
    assert np.array_equal(o, real(xo, tr.o[0])) and np.array_equal(f, real(xf, tr.h[0]))


@pytest.mark.parametrize("moe", [False, True])
def test_search_space_lists_every_row_permuted_stage_of_level_blind(moe: bool) -> None:
    """Level blind sends the SwiGLU product (ffn_down) and, MoE, the router input as permuted bags of
    n + r₁ rows; the table (one row per permuted message) left them out."""
    w = tiny_weights(0, moe=moe)
    view, _ = server_view(w, np.array([3, 7, 1]), SCXConfig(level="blind", r1=2, r2=1), n_new=0, seed=1)
    rows = {(r["stage"], r["layer"]): r for r in bruteforce.stage_search_spaces(view, w.config)}
    want = [Stage.FFN_DOWN] + ([Stage.ROUTER] if moe else [])
    for stage in want:
        for layer in range(w.config.n_layers):
            assert rows[(stage, layer)]["rows"] == 5
            assert rows[(stage, layer)]["bits"] == pytest.approx(np.log2(120.0))


# -- bad arguments: project errors, never raw numpy/Python errors -------------------------------------


def test_bad_rows_tables_and_rankers_are_project_errors() -> None:
    """Strings or ragged rows, tables that are not Block1Tables (or another model's), a ranker that is
    not callable or returns nothing, a ranker's None: each was a raw ValueError, AttributeError or
    TypeError (or token 0 at distance ∞)."""
    words: Any = [["a"] * C.hidden_size]
    with pytest.raises(DTypeError):
        vocab_match.match_block1_qkv(words, W, True)
    with pytest.raises(DTypeError):
        vocab_match.match_block1_qkv([[1.0], [1.0, 2.0]], W, None)
    with pytest.raises(DTypeError):
        decoy_detect.vocab_distance(words, W, True)
    with pytest.raises(DTypeError):
        vocab_match.map_tokens([["a"]], 1.0, [0.0])
    rows = np.asarray(W.embed[:2], dtype=np.float64)
    kv = np.zeros((1, C.kv_dim))
    for bad in ("tables", vocab_match.Block1Tables(tiny_weights(0, vocab_size=40))):
        with pytest.raises(ConfigError):
            vocab_match.match_block1_qkv(rows, W, True, tables=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            vocab_match.match_block1_map(rows, W, 1.0, np.zeros(C.vocab_size), tables=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            vocab_match.match_block1_attn(kv, kv, W, tables=bad)  # type: ignore[arg-type]
    same = vocab_match.Block1Tables(W)
    assert vocab_match.match_block1_qkv(rows, W, True, tables=same)[0].tolist() == [0, 1]
    target = np.zeros((1, 2 * C.kv_dim))
    with pytest.raises(ConfigError):
        vocab_match.match_sequential(target, W, 1, "kv", ranker=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        vocab_match.match_sequential(target, W, 1, "kv", ranker=lambda t: [])
    with pytest.raises(VocabularyError):
        vocab_match.match_sequential(target, W, 1, "kv", ranker=lambda t: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(VocabularyError):
        vocab_match.match_sequential(target, W, 1, "kv", ranker=lambda t: ["a"])  # type: ignore[arg-type,return-value]


def test_bad_caches_and_enumeration_arguments_are_project_errors() -> None:
    """decode_with_caches: no list of pairs (None, Nones) was a raw TypeError, NaN caches gave NaN logits;
    enumerate_orders: a max_rows string was a raw TypeError, a missing language model an AttributeError."""
    empty = (np.zeros((0, C.n_kv_heads, C.head_dim)),) * 2
    for caches in (None, [None] * C.n_layers, [empty] * (C.n_layers - 1)):
        with pytest.raises(ShapeError):
            statelessness.decode_with_caches(W, caches, [1, 2], 0)  # type: ignore[arg-type]
    nan = (np.full((1, C.n_kv_heads, C.head_dim), np.nan),) * 2
    with pytest.raises(NonFiniteError):
        statelessness.decode_with_caches(W, [empty] * (C.n_layers - 1) + [nan], [1, 2], 1)  # type: ignore[list-item]
    logits, _ = statelessness.decode_with_caches(W, [empty] * C.n_layers, [1, 2], 0)
    np.testing.assert_allclose(logits, forward_trace(W, [1, 2]).logits, rtol=1e-10, atol=1e-12)

    class Flat:
        def token_logprobs(self, seqs: np.ndarray) -> np.ndarray:
            return -np.asarray(seqs, dtype=np.float64)  # smaller ids are likelier

    with pytest.raises(ConfigError):
        bruteforce.enumerate_orders([1, 2, 3], 2, Flat(), max_rows="7")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        bruteforce.enumerate_orders([1, 2, 3], 2, None)  # type: ignore[arg-type]
    assert bruteforce.enumerate_orders([4], 1, Flat()) == [4]  # n = 1, r = 0
    assert bruteforce.enumerate_orders([9, 2, 5], 2, Flat()) == [2, 5]

"""The attack measurements themselves (DESIGN §8): an attack scored or run wrongly in the attacker's
disfavour would overstate privacy. Tiny random models (``tests/tiny.py``); each test runs in well under
a second."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from scx_ref.attacks import stats, vocab_match
from scx_ref.attacks._model import forward_trace
from scx_ref.weights import ModelWeights

from .tiny import tiny_weights

IDS = np.array([3, 17, 5, 9, 22, 1, 30, 5])


def _with_attn_gain(w: ModelWeights, scale: float) -> ModelWeights:
    """``w`` with block 1's attention-norm gain multiplied by ``scale`` (block-1 K and V rows grow by it)."""
    lw = dataclasses.replace(w.layers[0], attn_norm=w.layers[0].attn_norm * scale)
    return dataclasses.replace(w, layers=[lw, *w.layers[1:]])


# -- the confidence interval and the no-view baseline -------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 10, 37])
def test_wilson_matches_its_closed_form_at_every_k_including_the_edges(n: int) -> None:
    """Wilson's interval, written out independently (the normal quantile from scipy): at k = 0 it is
    [0, z²/(n + z²)], at k = n [n/(n + z²), 1], in between the textbook centre ± half-width."""
    z = float(norm.ppf(0.975))
    for k in range(n + 1):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = stats.wilson(k, n)
        assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
        assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert stats.wilson(0, n) == pytest.approx((0.0, z * z / (n + z * z)), abs=1e-12)
    assert stats.wilson(n, n) == pytest.approx((n / (n + z * z), 1.0), abs=1e-12)


def test_wilson_covers_about_95_percent_by_exact_binomial_sums() -> None:
    """Coverage, summed exactly over the binomial: within a few points of 95 % (Wilson's known
    oscillation), never the 50-70 % of a broken (e.g. z = 1 or 1/n-scaled) interval."""
    for n in (20, 100):
        for p in (0.05, 0.3, 0.5):
            bounds = [stats.wilson(k, n) for k in range(n + 1)]
            cover = sum(binom.pmf(k, n, p) for k, (lo, hi) in enumerate(bounds) if lo <= p <= hi)
            assert 0.92 <= cover <= 0.99, (n, p, cover)


def test_frequency_prior_guesses_the_mode_and_its_best_bag() -> None:
    """The positional baseline counts the positions holding the public mode; a one-token bag is the
    mode; a bag of a uniform prior's size covers each token once."""
    prior = stats.FrequencyPrior([2, 2, 2, 5, 5, 7], 8)
    assert prior.mode == 2
    assert prior.positional_hits([2, 5, 2, 0]) == 2
    assert prior.bag_guess(1).tolist() == [2]
    assert prior.bag_hits([2, 2, 5]) == 2  # its bag [2, 5, 7] holds one 2 and the 5
    uniform = stats.FrequencyPrior([], 4)
    assert sorted(uniform.bag_guess(4).tolist()) == [0, 1, 2, 3]


# -- sequential matching at block 1 after a known prefix ----------------------------------------------


@pytest.mark.parametrize("known", [1, 2, 5])
def test_block1_sequential_match_after_a_prefix_places_the_first_target_after_it(known: int) -> None:
    """Block-1 cache rows [RoPE(k) | v] depend on the position: the first target after a prefix of
    ``known`` tokens sits at position ``known``, not 0. Every row then matches its token exactly (it was
    tried at position 0, matched at distance ~0.5 and recovered only by luck)."""
    w = tiny_weights(0)
    n = len(IDS)
    tr = forward_trace(w, IDS, upto=0, logits=False)
    target = np.concatenate([tr.k[0].reshape(n, -1), tr.v[0].reshape(n, -1)], axis=1)
    rec, dist = vocab_match.match_sequential(target[known:], w, 0, "kv", prefix=IDS[:known])
    assert rec.tolist() == IDS[known:].tolist()
    assert dist.max() < 1e-9
    # negative control: the same rows told the wrong prefix length do not match exactly
    _, off = vocab_match.match_sequential(target[known:], w, 0, "kv", prefix=IDS[: known - 1])
    assert off[0] > 1e-3


# -- block-1 attention fingerprints: exact matches at exact distance -----------------------------------


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("use_k", [True, False])
def test_block1_attention_match_reports_exact_matches_at_distance_zero_at_any_scale(
    scale: float, use_k: bool
) -> None:
    """The harness takes a fingerprint match with distance < 1e-6 as exact. Computed from the expanded
    |a|² − 2a·b + |b|², the distance of a true match was ~1e-8·|v| (2.7e-6 at |v| ≈ 90): exact matches
    were called inexact and the attacker's best prompt fell back to the prior. Now it is the direct
    difference, ~0 for every exact row; a row scored at the wrong position stays far."""
    w = _with_attn_gain(tiny_weights(0), scale)
    ids = np.arange(w.config.vocab_size)
    tr = forward_trace(w, ids, upto=0, logits=False)
    got, dist = vocab_match.match_block1_attn(tr.k[0], tr.v[0], w, use_k=use_k)
    assert got.tolist() == ids.tolist()
    assert dist.max() < 1e-9 * scale
    if use_k:  # negative control: K at another position is no exact match
        _, far = vocab_match.match_block1_attn(tr.k[0][1:], tr.v[0][1:], w, positions=np.arange(len(ids) - 1))
        assert far.min() > 1e-3 * scale

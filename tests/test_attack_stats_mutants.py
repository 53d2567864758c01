"""Guarantees of the attack statistics (:mod:`scx_ref.attacks.stats`) that mutation testing
(``python -m mutation.run attack_stats``) found no test for: refusals that name the argument at fault, a
Wilson interval narrower than 95 % (z ≤ 1), the rate of a prompt with nothing scored, the keys of a rate's
record, a one-token vocabulary, the prior's best bag (largest remainders, ties to the lower token id) and an
attack exactly at the baseline's upper bound."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks.stats import FrequencyPrior, Rate, at_baseline, wilson
from scx_ref.errors import ConfigError

REFUSALS: dict[str, tuple[Callable[[], Any], str]] = {
    "wilson-k": (lambda: wilson("x", 1), "k must be a real number, got str 'x'"),  # type: ignore[arg-type]
    "wilson-n": (lambda: wilson(1, "y"), "n must be a real number, got str 'y'"),  # type: ignore[arg-type]
    "wilson-z": (lambda: wilson(1, 2, "z"), "z must be a real number, got str 'z'"),  # type: ignore[arg-type]
    "wilson-k-above-n": (lambda: wilson(3, 2), "need 0 <= k <= n, got k=3.0, n=2.0"),
    "wilson-z-0": (lambda: wilson(1, 2, 0.0), "z must be > 0, got 0.0"),
    "pool-no-collection": (lambda: Rate.pool(5), "parts must be a sequence of (k, n) pairs, not int"),  # type: ignore[arg-type]
    "pool-no-pair": (lambda: Rate.pool([(1,)]), "each part must be a (k, n) pair, got (1,)"),  # type: ignore[list-item]
    "prior-vocab": (lambda: FrequencyPrior([1], "v"), "vocab must be an integer, got str 'v'"),  # type: ignore[arg-type]
    "bag-guess-n": (lambda: FrequencyPrior([1], 3).bag_guess("a"), "n must be an integer, got str 'a'"),  # type: ignore[arg-type]
    "at-baseline-attack": (lambda: at_baseline(3, Rate(1, 2)), "attack must be a Rate, got int"),  # type: ignore[arg-type]
    "at-baseline-baseline": (lambda: at_baseline(Rate(1, 2), "s"), "baseline must be a Rate, got str"),  # type: ignore[arg-type]
    "at-baseline-empty": (
        lambda: at_baseline(Rate(1, 2), Rate(0, 0)),
        "the baseline scored nothing: no verdict against it",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_argument_at_fault(case: str) -> None:
    call, message = REFUSALS[case]
    with pytest.raises(ConfigError) as exc:
        call()
    assert str(exc.value) == message


@pytest.mark.parametrize("z", [0.5, 1.0])
def test_wilson_accepts_any_positive_z(z: float) -> None:
    """z = 1 (a ~68 % interval) and below are intervals too, only z ≤ 0 claims certainty: the closed form."""
    k, n = 3, 10
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(k, n, z) == pytest.approx((mid - half, mid + half), abs=1e-12)


def test_a_prompt_with_nothing_scored_has_rate_0() -> None:
    r = Rate.pool([(0, 0), (1, 2)])
    assert r.per_prompt == (0.0, 0.5) and (r.k, r.n) == (1.0, 2.0)


def test_rate_record_keys() -> None:
    r = Rate.pool([(1, 4), (3, 4)])
    lo, hi = wilson(4, 8)
    assert r.to_dict() == {"k": 4.0, "n": 8.0, "rate": 0.5, "lo": lo, "hi": hi, "per_prompt": [0.25, 0.75]}


def test_a_one_token_vocabulary() -> None:
    prior = FrequencyPrior([0, 0], 1)
    assert prior.probs.tolist() == [1.0] and prior.mode == 0
    assert prior.bag_guess(3).tolist() == [0, 0, 0]


def test_best_bag_adds_the_largest_remainders_not_the_largest_shares() -> None:
    """p = (0.7, 0.3) (6 and 2 public tokens, add-one smoothed), n = 3: ⌊2.1⌋ = 2 zeros, ⌊0.9⌋ = 0 ones, and
    the one left over goes to the larger remainder, 0.9: token 1."""
    prior = FrequencyPrior([0] * 6 + [1] * 2, 2)
    assert prior.probs.tolist() == pytest.approx([0.7, 0.3])
    assert prior.bag_guess(3).tolist() == [0, 0, 1]


def test_best_bag_breaks_ties_to_the_lower_token_id() -> None:
    """Ten tokens tie for the five places left over (every odd id seen once in a vocabulary of 20): the bag
    is the five lowest, on any machine (numpy's default sort is not stable and, vectorised, picks others)."""
    prior = FrequencyPrior(np.arange(1, 20, 2), 20)
    assert prior.bag_guess(5).tolist() == [1, 3, 5, 7, 9]


def test_an_attack_exactly_at_the_baselines_upper_bound_is_at_the_baseline() -> None:
    """Every token recovered against a baseline that also recovered every one: the upper bound is 1, the
    attack's rate 1, and 'no higher than the upper bound' holds."""
    assert wilson(5, 5)[1] == 1.0
    assert at_baseline(Rate(1, 1), Rate(5, 5))
    assert not at_baseline(Rate(1, 1), Rate(4, 5))  # the control: below every-token the bound is < 1


def test_the_prior_guesses_as_many_tokens_as_it_is_given() -> None:
    """``bag_hits(truth, guesses)`` judges the prior's best bag of ``guesses`` tokens, not of len(truth): with
    the public text 1 1 1 2 2 3, one guess is token 1 (one hit of 1 2 3), none hits nothing, and three (the
    default, len(truth)) hit all three."""
    prior = FrequencyPrior([1, 1, 1, 2, 2, 3], 5)
    assert prior.bag_hits([1, 2, 3]) == 3
    assert prior.bag_hits([1, 2, 3], guesses=1) == 1
    assert prior.bag_hits([1, 2, 3], guesses=0) == 0

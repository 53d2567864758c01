"""Guarantees of the permutation and guessing bounds (:mod:`scx_ref.dp.permutation`) that mutation testing
(``python -m mutation.run dp_permutation``) found no test for: refusals that name the argument at fault,
the smallest counts (0! = 1, one row, d = 1, a one-token vocabulary), the decoys' share of every bound, the
last factorial in the float64 range (170!), the clip of the paper's bound to 1, the accuracy of
``prompt_order_bits`` on each side of its branch limits (direct sum up to 4096 rows, Stirling's series from
2²⁰ decoys), and ``bayes_guess_bound`` on both sides of its switch to logarithms (V − 1 ≥ 2¹⁰⁰⁰).

Reference values are hand-computed (small factorials), exact integers and fractions, or ``mpmath`` at 50
digits: ``ln((r + n)! / r!) = lgamma(r + n + 1) − lgamma(r + 1)`` without cancellation at that precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import mpmath  # type: ignore[import-untyped]
import pytest

from scx_ref.dp.permutation import (
    bayes_guess_bound,
    expected_bruteforce_trials,
    log2_expected_bruteforce_trials,
    log2_factorial,
    permutation_bits,
    permutation_guess_probability,
    prompt_order_bits,
    statelessness_bound_paper,
)
from scx_ref.errors import ConfigError

REFUSALS: dict[str, tuple[Callable[[], Any], str]] = {
    "log2_factorial-m": (lambda: log2_factorial(-1), "m must be >= 0, got -1"),
    "permutation_bits-n": (lambda: permutation_bits(0), "n (rows) must be >= 1, got 0"),
    "permutation_bits-r": (lambda: permutation_bits(1, -1), "r (decoys) must be >= 0, got -1"),
    "prompt_order_bits-n": (lambda: prompt_order_bits(0, 3), "n (rows) must be >= 1, got 0"),
    "prompt_order_bits-r": (lambda: prompt_order_bits(2, -1), "r (decoys) must be >= 0, got -1"),
    "expected_bruteforce_trials-n": (lambda: expected_bruteforce_trials(0), "n (rows) must be >= 1, got 0"),
    "expected_bruteforce_trials-r": (
        lambda: expected_bruteforce_trials(3, -1),
        "r (decoys) must be >= 0, got -1",
    ),
    "statelessness-epsilon": (
        lambda: statelessness_bound_paper(-1.0, 3, 10),
        "epsilon must be >= 0, got -1.0",
    ),
    "statelessness-d": (lambda: statelessness_bound_paper(0.0, 0, 10), "d must be >= 1, got 0"),
    "statelessness-vocab": (
        lambda: statelessness_bound_paper(0.0, 3, 0),
        "vocab_size must be >= 1, got 0",
    ),
    "bayes-epsilon": (lambda: bayes_guess_bound(-1.0, 10), "epsilon must be >= 0, got -1.0"),
    "bayes-vocab": (lambda: bayes_guess_bound(1.0, 0), "vocab_size must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_argument_at_fault(case: str) -> None:
    call, message = REFUSALS[case]
    with pytest.raises(ConfigError) as exc:
        call()
    assert str(exc.value) == message


def test_smallest_counts_are_accepted() -> None:
    """0! = 1 (zero bits); one row has one order, (1! + 1) / 2 = 1 trial; d = 1 row or a one-token vocabulary
    is guessed for sure (the paper's bound and the Bayes bound are 1)."""
    assert log2_factorial(0) == 0.0
    assert expected_bruteforce_trials(1) == 1.0
    assert statelessness_bound_paper(0.0, 1, 10) == 1.0  # max(1/1!, 1/10)
    assert statelessness_bound_paper(0.0, 5, 1) == 1.0  # max(1/5!, 1/1)
    assert bayes_guess_bound(0.3, 1) == 1.0  # e^ε / (e^ε + 0)


def test_decoys_count_in_every_bound() -> None:
    """3 rows and 1 decoy are permuted together: 4! = 24 orders, (24 + 1) / 2 = 12.5 expected trials; the
    prompt's order alone without decoys is 4! / 0! = 24 too."""
    assert permutation_guess_probability(3, 1) == pytest.approx(1 / 24, rel=1e-13, abs=0.0)
    assert log2_expected_bruteforce_trials(3, 1) == pytest.approx(math.log2(12.5), rel=1e-13, abs=0.0)
    assert expected_bruteforce_trials(3, 1) == 12.5
    assert prompt_order_bits(4) == pytest.approx(math.log2(24), rel=1e-14, abs=0.0)


def test_expected_trials_up_to_the_last_factorial_in_float_range() -> None:
    """170! ≈ 7.26e306 is the last factorial below float64's 1.8e308 (171! ≈ 1.24e309), so n + r = 170 gives
    the number and 171 gives +inf (the docstring's limit), however rows and decoys share it."""
    f170 = math.prod(range(1, 171))
    assert f170 < 2**1024 < 171 * f170
    want = float(Fraction(f170 + 1, 2))
    assert expected_bruteforce_trials(170) == want
    assert expected_bruteforce_trials(100, 70) == want
    assert expected_bruteforce_trials(171) == math.inf
    assert expected_bruteforce_trials(1, 170) == math.inf


def test_paper_bound_is_clipped_to_one_below_an_exponent_of_one() -> None:
    """ε = 0.5 against one token: e^0.5 / 1 > 1, a probability of 1 (the paper's bound is clipped to 1)."""
    assert statelessness_bound_paper(0.5, 3, 1) == 1.0
    assert statelessness_bound_paper(0.99, 3, 1) == 1.0


def _exact_order_bits(n: int, r: int) -> float:
    with mpmath.workdps(50):
        return float((mpmath.loggamma(r + n + 1) - mpmath.loggamma(r + 1)) / mpmath.log(2))


@pytest.mark.parametrize(
    ("n", "r"),
    [
        (4096, 2**19),  # the last direct sum; the lgamma difference loses ~1e-14 there
        (4097, 2**20),  # the first of Stirling's series; the lgamma difference loses ~2e-14
        (5000, 2**20),  # x = n / (r + 1) small: Stirling's last term n / (12 a² (1 + x)) is ~5e-15 of it
        (10**7, 2**20),  # x ≈ 9.5
        (2**20 + 1, 2**20),  # x = 1 exactly
    ],
)
def test_prompt_order_bits_to_float_rounding_at_its_branch_limits(n: int, r: int) -> None:
    """A sum of n ≤ 4096 logarithms or Stirling's series (r ≥ 2²⁰, truncation O(n/a³) far below float
    rounding) are accurate to a few float64 roundings: 1e-15 leaves room for 4.5 to 9 ulps."""
    assert prompt_order_bits(n, r) == pytest.approx(_exact_order_bits(n, r), rel=1e-15, abs=0.0)


def _exact_bayes(epsilon: float, vocab_size: int) -> float:
    with mpmath.workdps(50):
        return float(1 / (1 + (mpmath.mpf(vocab_size) - 1) * mpmath.exp(-mpmath.mpf(epsilon))))


@pytest.mark.parametrize("vocab_size", [2001, 32000, 49152, 50257, 128256, 151936, 152064])
def test_bayes_bound_at_epsilon_0_is_the_prior(vocab_size: int) -> None:
    """ε = 0 releases nothing: the best guess is the prior 1/V. (V − 1)·e⁰ and 1 + (V − 1) are exact below
    2⁵³, so the one rounding is 1/V's own."""
    assert bayes_guess_bound(0.0, vocab_size) == 1.0 / vocab_size


@pytest.mark.parametrize(
    ("epsilon", "vocab_size"),
    [(0.0, 2**1000), (3.0, 2**1000), (600.0, 2**1000), (0.0, 2**900), (620.0, 2**900)],
    ids=["0-2^1000", "3-2^1000", "600-2^1000", "0-2^900", "620-2^900"],
)
def test_bayes_bound_to_float_rounding_while_v_fits_a_float(epsilon: float, vocab_size: int) -> None:
    """Up to V − 1 < 2¹⁰⁰⁰ the bound is ``1 / (1 + (V − 1) e^{−ε})`` in float64: a few roundings (the
    logarithms' route, t = ln(V − 1) − ε, would lose ~|t|·2⁻⁵³ ≈ 5e-14 of it)."""
    assert bayes_guess_bound(epsilon, vocab_size) == pytest.approx(
        _exact_bayes(epsilon, vocab_size), rel=1e-15, abs=0.0
    )


@pytest.mark.parametrize(
    ("epsilon", "vocab_size"),
    [(0.0, 2**1000 + 1), (3.0, 2**1001), (900.0, 10**400), (921.0, 10**400)],
    ids=["0-2^1000+1", "3-2^1001", "900-10^400", "921-10^400"],
)
def test_bayes_bound_through_logarithms_for_huge_vocabularies(epsilon: float, vocab_size: int) -> None:
    """Past V − 1 = 2¹⁰⁰⁰ through t = ln(V − 1) − ε: 1 / (1 + e^t), within the rounding of ln(V − 1) (an
    absolute ~ln(V)·2⁻⁵³ ≤ 1.1e-13 in t, as much relative in the bound)."""
    want = _exact_bayes(epsilon, vocab_size)
    assert 0.0 < want < 1.0
    assert bayes_guess_bound(epsilon, vocab_size) == pytest.approx(want, rel=1e-12, abs=0.0)

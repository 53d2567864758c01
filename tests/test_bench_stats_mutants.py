"""Guarantees of the bench's intervals (:mod:`scx_ref.commands.bench_stats`) that mutation testing
(``python -m mutation.run bench_stats``) found no test for: the quartiles of two rounds and of none, a median
interval whose coverage equals the level exactly, the bootstrap's pairing of rounds, its quantile levels, its
dtype-independence and the edges of what it accepts and refuses (exact messages)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from scx_ref.commands.bench_stats import median_interval, quartiles, ratio_interval
from scx_ref.errors import ConfigError
from tests.refusals import refused


def test_quartiles_of_two_rounds_and_of_none() -> None:
    """Two rounds are interpolated (inclusive method: 1/4 and 3/4 of the way), not read as one round's value;
    no round gives NaN, not an IndexError."""
    assert quartiles([1.0, 2.0]) == (1.25, 1.75)
    assert quartiles([3.0, 1.0]) == (1.5, 2.5)
    q1, q3 = quartiles([])
    assert math.isnan(q1) and math.isnan(q3)


def test_median_interval_whose_coverage_equals_the_level() -> None:
    """k qualifies when P(B ≤ k − 1) ≤ (1 − level)/2, equality included: 2 rounds at level 1/2
    (P(B ≤ 0) = 1/4) and 3 rounds at level 3/4 (P(B ≤ 0) = 1/8) give min and max, covering exactly the
    level."""
    assert median_interval([2.0, 1.0], level=0.5) == (1.0, 2.0, 0.5)
    assert median_interval([3.0, 1.0, 2.0], level=0.75) == (1.0, 3.0, 0.75)
    # the control: just above the level no pair qualifies
    assert median_interval([2.0, 1.0], level=0.5000001) is None


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError) as exc:
        median_interval([1.0] * 8 + [math.nan])
    assert str(exc.value) == "a median interval of values with a NaN among them"
    with pytest.raises(ConfigError) as exc:
        ratio_interval([1.0], [0.0], np.random.default_rng(0))
    assert str(exc.value) == "a ratio interval needs finite times, the baseline's positive"


def test_ratio_interval_edges_of_its_arguments() -> None:
    """Level 0 is refused like level 1; one resample is enough (its ratio is both ends); an SCX time of 0
    is a time (only the baseline's must be positive)."""
    with pytest.raises(ConfigError, match="level"):
        ratio_interval([1.0], [1.0], np.random.default_rng(0), level=0.0)
    lo, hi = ratio_interval([1.0, 3.0], [1.0, 1.0], np.random.default_rng(0), resamples=1)
    assert lo == hi and lo in (1.0, 2.0, 3.0)
    assert ratio_interval([0.0] * 3, [1.0] * 3, np.random.default_rng(0)) == (0.0, 0.0)


@pytest.mark.parametrize("n", [8, 9])
def test_ratio_interval_keeps_each_rounds_two_times_together(n: int) -> None:
    """Rounds whose SCX time is exactly twice their baseline time, however much the rounds vary: every
    resample's ratio of medians is 2, so the interval is [2, 2] (a median over all resamples instead of per
    resample, on either side, breaks the pairing and widens it)."""
    base: Any = np.random.default_rng(5).lognormal(0.0, 0.5, size=n)
    assert ratio_interval(2.0 * base, base, np.random.default_rng(0)) == (2.0, 2.0)


def test_ratio_interval_ends_are_the_asked_quantiles() -> None:
    """Rounds 1, 2, 3 against 1, 1, 1: a resample's median ratio is 1 or 3 with probability 7/27 each, 2
    otherwise. At level 0.35 the ends are the 32.5 % and 67.5 % quantiles, both inside the mass at 2 (a
    lower end at (1 − level)/3 = 21.7 % would fall in the mass at 1); at level 0.9, 5 % and 95 %: 1 and 3."""
    scx, base = [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]
    assert ratio_interval(scx, base, np.random.default_rng(0), level=0.35) == (2.0, 2.0)
    assert ratio_interval(scx, base, np.random.default_rng(0), level=0.9) == (1.0, 3.0)


def test_ratio_interval_does_not_depend_on_the_dtype_of_the_times() -> None:
    """float32 times give the interval of the same values as float64: the medians are taken in float64.
    Two rounds 1 and 1 + 2⁻²³ (neighbouring float32 values): half the resamples hold one of each, median
    1 + 2⁻²⁴, which float32 rounds to 1; at level 0.35 both ends lie in that half."""
    t32: Any = np.array([1.0, 1.0 + 2.0**-23], dtype=np.float32)
    t64: Any = t32.astype(np.float64)
    ones = [1.0, 1.0]
    mid = 1.0 + 2.0**-24
    got = ratio_interval(t32, ones, np.random.default_rng(0), level=0.35)
    assert got == ratio_interval(t64, ones, np.random.default_rng(0), level=0.35) == (mid, mid)
    got = ratio_interval(ones, t32, np.random.default_rng(0), level=0.35)
    assert got == ratio_interval(ones, t64, np.random.default_rng(0), level=0.35) == (1.0 / mid, 1.0 / mid)


@pytest.mark.parametrize(
    ("scx", "base"),
    [(["2.0"], ["1.0"]), ([True, 2.0], [1.0, 1.0]), ([2.0, 1.0], [1.0, np.bool_(True)])],
    ids=["text", "bool", "numpy-bool"],
)
def test_ratio_interval_refuses_times_that_are_not_real_numbers(
    scx: list[object], base: list[object]
) -> None:
    """A text was read as a time and a bool as 1.0 s: an interval of measurements that never were."""
    with pytest.raises(ConfigError, match="must be real numbers"):
        ratio_interval(scx, base, np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "values", [["1"] * 3 + [2.0] * 3, [1.0, 2.0, 3.0, True, 4.0, 5.0]], ids=["text", "bool"]
)
def test_median_interval_refuses_values_that_are_not_real_numbers(values: list[object]) -> None:
    with pytest.raises(ConfigError, match="must be real numbers"):
        median_interval(values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scx", "base", "message"),
    [
        (["1"] * 3 + [2.0] * 3, None, "a median interval's values must be real numbers, got '1'"),
        ([True, 2.0], [1.0, 1.0], "a ratio interval's SCX times must be real numbers, got True"),
        ([2.0], ["1.0"], "a ratio interval's baseline times must be real numbers, got '1.0'"),
    ],
    ids=["median", "ratio-scx", "ratio-baseline"],
)
def test_refusals_of_values_that_are_not_real_numbers_name_the_argument(
    scx: list[object], base: list[object] | None, message: str
) -> None:
    """The whole message at each of the three call sites (``median_interval``'s values, then
    ``ratio_interval``'s SCX and baseline times): which argument holds the bad entry, and that entry."""
    with refused(ConfigError, message):
        if base is None:
            median_interval(scx)  # type: ignore[arg-type]
        else:
            ratio_interval(scx, base, np.random.default_rng(0))  # type: ignore[arg-type]

"""The intervals ``scx bench`` reports beside its ratios (:mod:`scx_ref.commands.bench_stats`): the exact
order statistics and coverage of the median interval, its coverage measured on draws of a known
distribution, and the bootstrap interval's determinism, invariances and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scx_ref.commands.bench_stats import median_interval, quartiles, ratio_interval
from scx_ref.errors import ConfigError

_times = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


def test_round_quartiles() -> None:
    """The per-round spread: both quartiles of one round are its value; of 1..5 they are 2 and 4."""
    assert quartiles([1.25]) == (1.25, 1.25)
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 4.0)
    q1, q3 = quartiles([1.0, 2.0])
    assert 1.0 <= q1 <= q3 <= 2.0


def test_median_interval_order_statistics_and_exact_coverage() -> None:
    """9 rounds: the 2nd and 8th smallest, coverage 1 − 2·10/512; 6 rounds: min and max, 1 − 2/64; 20:
    the 6th and 15th (P(B ≤ 5) = 0.0207 ≤ 0.025 < P(B ≤ 6) = 0.0577); 5 rounds or fewer: none."""
    nine = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]
    assert median_interval(nine) == (2.0, 8.0, 1.0 - 20 / 512)
    assert median_interval([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == (1.0, 6.0, 1.0 - 2 / 64)
    twenty = [float(i) for i in range(1, 21)]
    lo, hi, cover = median_interval(twenty)  # type: ignore[misc]
    tail = sum(math.comb(20, j) for j in range(6)) / 2**20
    assert (lo, hi) == (6.0, 15.0) and cover == pytest.approx(1 - 2 * tail) and cover >= 0.95
    assert all(median_interval([1.0] * n) is None for n in range(6))
    assert median_interval(nine, level=0.5)[:2] == (3.0, 7.0)  # type: ignore[index]  # P(B ≤ 3) > 0.25


@given(st.lists(_times, min_size=6, max_size=40), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_median_interval_brackets_the_sample_median(values: list[float], level: float) -> None:
    got = median_interval(values, level)
    if got is None:  # too few values for this level
        assert math.comb(len(values), 0) / 2 ** len(values) > (1 - level) / 2
        return
    lo, hi, cover = got
    assert min(values) <= lo <= float(np.median(values)) <= hi <= max(values) and level <= cover < 1


def test_median_interval_covers_as_often_as_it_says() -> None:
    """Draws of 9 from a skewed distribution with a known median (lognormal: 1): the interval holds it in
    ~96.1 % of 4000 runs. The 3rd and 7th order statistics (an off-by-one) cover ~82 %."""
    rng = np.random.default_rng(7)
    runs = 4000
    hits = 0
    for _ in range(runs):
        got = median_interval(rng.lognormal(0.0, 0.3, size=9).tolist())
        assert got is not None
        hits += got[0] <= 1.0 <= got[1]
    assert abs(hits / runs - (1 - 20 / 512)) < 0.015


def test_median_interval_refuses_nan_and_a_bad_level() -> None:
    with pytest.raises(ConfigError, match="NaN"):
        median_interval([1.0] * 8 + [math.nan])
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="level"):
            median_interval([1.0] * 9, level)


def test_ratio_interval_brackets_the_ratio_and_repeats_with_the_same_draws() -> None:
    rng = np.random.default_rng(3)
    base = rng.lognormal(0.0, 0.1, size=9)
    scx = 1.08 * base * rng.lognormal(0.0, 0.05, size=9)
    lo, hi = ratio_interval(scx, base, np.random.default_rng(0))
    point = float(np.median(scx) / np.median(base))
    assert lo < point < hi and lo > 0.9 and hi < 1.3
    assert ratio_interval(scx, base, np.random.default_rng(0)) == (lo, hi)
    # scaling the SCX times by two scales every resample's ratio by two, exactly
    assert ratio_interval(2 * scx, base, np.random.default_rng(0)) == (2 * lo, 2 * hi)
    # a wider spread of rounds gives a wider interval
    noisy = scx * rng.lognormal(0.0, 0.3, size=9)
    wlo, whi = ratio_interval(noisy, base, np.random.default_rng(0))
    assert whi - wlo > hi - lo


def test_ratio_interval_of_constant_rounds_is_the_ratio() -> None:
    assert ratio_interval([3.0] * 9, [2.0] * 9, np.random.default_rng(1)) == (1.5, 1.5)
    assert ratio_interval([2.0], [1.0], np.random.default_rng(1)) == (2.0, 2.0)


def test_ratio_interval_refuses_what_is_not_two_series_of_times() -> None:
    draws = np.random.default_rng(0)
    for scx, base in (([1.0, 2.0], [1.0]), ([], []), ([[1.0]], [[1.0]])):
        with pytest.raises(ConfigError, match="series"):
            ratio_interval(scx, base, draws)
    for scx, base in (([1.0, math.nan], [1.0, 1.0]), ([1.0], [0.0]), ([-1.0], [1.0]), ([1.0], [math.inf])):
        with pytest.raises(ConfigError, match="finite"):
            ratio_interval(scx, base, draws)
    with pytest.raises(ConfigError, match="level"):
        ratio_interval([1.0], [1.0], draws, level=1.0)
    with pytest.raises(ConfigError, match="resamples"):
        ratio_interval([1.0], [1.0], draws, resamples=0)

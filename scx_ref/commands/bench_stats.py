"""How precise a ``scx bench`` ratio is: the statistics of its rounds.

A ratio is measured over a few rounds (default 9) on a machine whose speed varies from second to second
(on a shared two-core VM, a round's SCX / baseline ratio has varied by 4–18 % from round to round, its
standard deviation), so a median read from one run can miss its own value by a few percent. Each row of
the bench therefore carries, beside its two point readings, an interval for each:

* the **ratio of medians** (``ratio_median``, the headline): a paired percentile bootstrap — the rounds
  resampled with replacement, each round's SCX and baseline times together, the ratio of the resample's
  two medians, its 2.5th and 97.5th percentiles (:func:`ratio_interval`). Approximate: with 9 rounds a
  bootstrap median takes only 9 values, and percentile intervals of a median are known to cover somewhat
  less than they claim at such sizes;
* the **median of the paired round ratios** (``round_ratio_median``): the distribution-free interval of
  a median from two order statistics, exact under the one assumption that the rounds' ratios are
  independent draws of one distribution (:func:`median_interval`; its coverage, ≥ the level asked for,
  is reported with it). With 9 rounds it is the 2nd to the 8th smallest ratio, 96.1 %; below 6 rounds no
  pair of order statistics covers 95 %, and there is none.

A goal is then *shown met* by a run when the interval's upper end is at or below it, *shown missed* when
its lower end is above it, and undecided by that run otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from ..errors import ConfigError

__all__ = ["RESAMPLES", "SEED", "median_interval", "quartiles", "ratio_interval"]

#: Bootstrap resamples per interval (the percentiles' own Monte Carlo error is then ~0.1 % of a ratio).
RESAMPLES = 4000
#: The seed of every row's bootstrap draws (the bench's and ``models.bench_intervals``'): the same rounds give
#: the same interval wherever it is computed.
SEED = 0


def _check_times(values: object, what: str) -> None:
    """ConfigError unless every entry of ``values`` is a real number: not a bool (numpy read True as 1.0)
    nor text (``float("2.0")`` read it as a time)."""
    for v in np.ravel(np.asarray(values, dtype=object)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{what} must be real numbers, got {v!r:.40}")


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (inclusive method; both the value itself for a single round; NaN
    for none)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """A distribution-free confidence interval for the median of the distribution ``values`` are
    independent draws of: (x₍ₖ₎, x₍ₙ₋ₖ₊₁₎, coverage) for the largest k with P(B ≤ k − 1) ≤ (1 − level)/2,
    B ~ Binomial(n, ½) — the interval misses the median only if at most k − 1 draws fall on one side of it,
    so it covers with probability 1 − 2·P(B ≤ k − 1) ≥ ``level`` for any continuous distribution. None
    when no k ≥ 1 qualifies (too few values: n ≤ 5 at level 0.95). ConfigError for a value that is not a
    real number (a bool, a text) or is NaN."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"a confidence level must lie in (0, 1), got {level!r}")
    _check_times(values, "a median interval's values")
    x = sorted(float(v) for v in values)
    if any(math.isnan(v) for v in x):
        raise ConfigError("a median interval of values with a NaN among them")
    n = len(x)
    # exact rationals: 2.0**n overflows a float from n = 1024 rounds on
    alpha, total = (1 - Fraction(level)) / 2, 2**n
    tail, k = 0, 0  # tail / 2ⁿ = P(B ≤ k − 1) for the k found so far
    while k < n // 2:
        nxt = tail + math.comb(n, k)  # 2ⁿ · P(B ≤ k)
        if Fraction(nxt, total) > alpha:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return None
    return x[k - 1], x[n - k], float(1 - Fraction(2 * tail, total))


def ratio_interval(
    scx: Sequence[float],
    base: Sequence[float],
    rng: np.random.Generator,
    level: float = 0.95,
    resamples: int = RESAMPLES,
) -> tuple[float, float]:
    """A paired percentile-bootstrap interval for median(``scx``) / median(``base``): ``resamples`` draws
    of n rounds with replacement (a round's two times stay together), the ratio of each draw's two
    medians, and that ratio's (1 ∓ level)/2 quantiles. Approximate (see the module docstring); the same
    ``rng`` state gives the same interval, and scaling ``scx`` by c > 0 scales it by c. ConfigError for
    times that are not real numbers (a bool, a text), not finite, or a baseline time ≤ 0."""
    _check_times(scx, "a ratio interval's SCX times")
    _check_times(base, "a ratio interval's baseline times")
    s, b = np.asarray(scx, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if s.ndim != 1 or s.shape != b.shape or s.size == 0:
        raise ConfigError(f"a ratio interval needs two equal non-empty series of rounds: {s.shape} {b.shape}")
    if not (np.isfinite(s).all() and np.isfinite(b).all() and (b > 0).all() and (s >= 0).all()):
        raise ConfigError("a ratio interval needs finite times, the baseline's positive")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ConfigError(f"level {level!r} must lie in (0, 1) and resamples {resamples!r} be ≥ 1")
    idx = rng.integers(0, s.size, size=(resamples, s.size))
    ratios = np.median(s[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.quantile(ratios, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)

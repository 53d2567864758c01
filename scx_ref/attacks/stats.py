"""Sampling error and the no-view baseline of the attack measurements (DESIGN §8).

* :func:`wilson` — the 95 % Wilson score interval of a recovery rate k/n, pooled over every token the
  attacks scored. Tokens of one prompt are not independent (a sequential match that fails once fails
  after), so the interval is a floor on the uncertainty; the per-prompt rates are kept beside it.
* :class:`FrequencyPrior` — what an attacker recovers **without looking at the view**: the unigram
  distribution of public text. Its best positional guess is the most frequent public token at every
  position; its best bag guess (of n tokens) takes each token ⌊n·p⌋ times and the largest remainders for
  the rest. An attack is *at the baseline* (:func:`at_baseline`) when its recovery is no higher than the
  upper end of the baseline's interval: it has learned nothing measurable from the view.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Z95", "FrequencyPrior", "Rate", "at_baseline", "bag_hits", "wilson"]

Array = npt.NDArray[Any]
#: The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95 % by default); (0, 1) when n = 0.

    Guarantee: lo ≤ k/n ≤ hi, both in [0, 1], and the interval covers the true rate with probability
    ≈ 95 % for independent trials (it stays sensible at k = 0 and k = n, unlike the normal interval)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return min(max(0.0, mid - half), p), max(min(1.0, mid + half), p)  # rounding must not exclude p


@dataclass(frozen=True)
class Rate:
    """A recovery rate pooled over prompts: ``k`` tokens recovered of ``n`` scored, per-prompt rates."""

    k: float
    n: float
    per_prompt: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % Wilson interval of :attr:`rate`."""
        return wilson(self.k, self.n)

    @classmethod
    def pool(cls, parts: Sequence[tuple[float, float]]) -> Rate:
        """Pool per-prompt (k, n) pairs."""
        k = float(sum(p[0] for p in parts))
        n = float(sum(p[1] for p in parts))
        return cls(k, n, tuple(p[0] / p[1] if p[1] else 0.0 for p in parts))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {
            "k": self.k,
            "n": self.n,
            "rate": self.rate,
            "lo": lo,
            "hi": hi,
            "per_prompt": list(self.per_prompt),
        }


def bag_hits(pred: npt.ArrayLike, truth: npt.ArrayLike) -> int:
    """How many tokens of ``truth`` (a multiset) ``pred`` contains: |pred ∩ truth| as multisets."""
    a = Counter(int(t) for t in np.asarray(pred).ravel())
    b = Counter(int(t) for t in np.asarray(truth).ravel())
    return sum((a & b).values())


class FrequencyPrior:
    """The unigram distribution of public tokens (add-one smoothed over ``vocab``): the attacker's
    knowledge before it sees any message."""

    def __init__(self, public: npt.ArrayLike, vocab: int) -> None:
        counts = np.bincount(np.asarray(public, dtype=np.int64).ravel(), minlength=vocab).astype(np.float64)
        self.probs: Array = (counts + 1.0) / (counts.sum() + vocab)
        self.mode = int(np.argmax(counts))

    @property
    def log_probs(self) -> Array:
        """log p(t) for every token (the prior of a MAP match)."""
        return np.asarray(np.log(self.probs))

    def positional_hits(self, truth: npt.ArrayLike) -> int:
        """Positions of ``truth`` the prior's best guess (the mode everywhere) gets right."""
        return int(np.sum(np.asarray(truth) == self.mode))

    def bag_guess(self, n: int) -> Array:
        """The prior's best n-token bag: ⌊n·p_t⌋ copies of each token, then the largest remainders."""
        want = n * self.probs
        base = np.floor(want).astype(np.int64)
        rest = n - int(base.sum())
        if rest > 0:
            base[np.argsort(-(want - base), kind="stable")[:rest]] += 1
        return np.repeat(np.arange(len(base)), base)

    def bag_hits(self, truth: npt.ArrayLike) -> int:
        """Tokens of ``truth`` (as a bag) the prior's best bag of the same size contains."""
        t = np.asarray(truth).ravel()
        return bag_hits(self.bag_guess(len(t)), t)


def at_baseline(attack: Rate, baseline: Rate) -> bool:
    """Whether an attack recovered no more than the baseline's 95 % upper bound (nothing measurable
    learned from the view). An attack with nothing scored (no such message) is at the baseline."""
    if attack.n == 0:
        return True
    return attack.rate <= baseline.interval[1]

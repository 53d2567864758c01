"""Sampling error and the no-view baseline of the attack measurements (DESIGN §8).

* :func:`wilson` — the 95 % Wilson score interval of a recovery rate k/n, pooled over every token the
  attacks scored. Tokens of one prompt are not independent (a sequential match that fails once fails
  after), so the interval is a floor on the uncertainty; the per-prompt rates are kept beside it.
* :class:`FrequencyPrior` — what an attacker recovers **without looking at the view**: the unigram
  distribution of public text. Its best positional guess is the most frequent public token at every
  position; its best bag guess (of n tokens) takes each token ⌊n·p⌋ times and the largest remainders for
  the rest. A bag attack is judged against the prior's bag of n tokens, however many rows it guessed on
  (conservative: an attacker that finds the decoys needs only n guesses); the prior's bag of as many
  tokens as it guessed is recorded beside it. An attack is *at the baseline*
  (:func:`at_baseline`) when its recovery is no higher than the upper end of the baseline's interval: it
  has learned nothing measurable from the view.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._checks import token_ids
from ..errors import ConfigError
from ._model import float_arg, int_arg

__all__ = ["Z95", "FrequencyPrior", "Rate", "at_baseline", "bag_hits", "wilson"]

Array = npt.NDArray[Any]
#: The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054


def _counts(k: float, n: float) -> tuple[float, float]:
    """(k, n) after checking both are finite numbers with 0 ≤ k ≤ n (ConfigError otherwise)."""
    k, n = float_arg(k, "k"), float_arg(n, "n")
    if not 0 <= k <= n:
        raise ConfigError(f"need 0 <= k <= n, got k={k}, n={n}")
    return k, n


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95 % by default); (0, 1) when n = 0.

    Guarantee: lo ≤ k/n ≤ hi, both in [0, 1], and the interval covers the true rate with probability
    ≈ 95 % for independent trials (it stays sensible at k = 0 and k = n, unlike the normal interval).
    ConfigError unless k and n are finite with 0 ≤ k ≤ n and z is finite and > 0 (z = 0 would claim
    certainty: a zero-width interval)."""
    k, n = _counts(k, n)
    z = float_arg(z, "z")
    if z <= 0:
        raise ConfigError(f"z must be > 0, got {z}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    # the usual form, multiplied through by n (no 1/n², which overflows for a tiny n)
    den = n + z * z
    mid = (k + z * z / 2) / den
    half = z * math.sqrt(k * (1 - p) + z * z / 4) / den
    return min(max(0.0, mid - half), p), max(min(1.0, mid + half), p)  # rounding must not exclude p


def _rate(x: Any) -> bool:
    """Whether ``x`` is a real number (not a bool) in [0, 1]."""
    return (
        not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and bool(0 <= x <= 1)
    )


@dataclass(frozen=True)
class Rate:
    """A recovery rate pooled over prompts: ``k`` tokens recovered of ``n`` scored, per-prompt rates.
    ConfigError unless k and n are finite with 0 ≤ k ≤ n and ``per_prompt`` is a tuple or list of
    rates in [0, 1]."""

    k: float
    n: float
    per_prompt: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _counts(self.k, self.n)
        pp = self.per_prompt
        if not isinstance(pp, (tuple, list)) or not all(_rate(r) for r in pp):
            raise ConfigError(f"per_prompt must be a tuple of rates in [0, 1], got {pp!r}")

    @property
    def rate(self) -> float:
        """k / n, the fraction recovered (0 for n = 0)."""
        return self.k / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % Wilson interval of :attr:`rate`."""
        return wilson(self.k, self.n)

    @classmethod
    def pool(cls, parts: Sequence[tuple[float, float]]) -> Rate:
        """Pool per-prompt (k, n) pairs (ConfigError unless ``parts`` is a collection of pairs with
        0 ≤ k ≤ n; an iterator is read once, never pooled as empty)."""
        try:
            parts = list(parts)
        except TypeError:
            raise ConfigError(
                f"parts must be a sequence of (k, n) pairs, not {type(parts).__name__}"
            ) from None
        for p in parts:
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ConfigError(f"each part must be a (k, n) pair, got {p!r}")
            _counts(*p)
        k = float(sum(p[0] for p in parts))
        n = float(sum(p[1] for p in parts))
        return cls(k, n, tuple(p[0] / p[1] if p[1] else 0.0 for p in parts))

    def to_dict(self) -> dict[str, Any]:
        """k, n, the rate, its 95 % Wilson interval and the per-prompt rates, JSON-ready."""
        lo, hi = self.interval
        return {
            "k": self.k,
            "n": self.n,
            "rate": self.rate,
            "lo": lo,
            "hi": hi,
            "per_prompt": list(self.per_prompt),
        }


def _ids(x: npt.ArrayLike, vocab: int | None = None) -> Array:
    """Token ids, flattened (VocabularyError unless integers, of ``vocab`` when given): never a float
    truncated to another token."""
    return np.asarray(token_ids(np.asarray(x).ravel(), vocab, allow_empty=True), dtype=np.int64)


def bag_hits(pred: npt.ArrayLike, truth: npt.ArrayLike) -> int:
    """How many tokens of ``truth`` (a multiset) ``pred`` contains: |pred ∩ truth| as multisets."""
    a = Counter(int(t) for t in _ids(pred))
    b = Counter(int(t) for t in _ids(truth))
    return sum((a & b).values())


class FrequencyPrior:
    """The unigram distribution of public tokens (add-one smoothed over ``vocab``): the attacker's
    knowledge before it sees any message. ConfigError unless ``vocab`` ≥ 1; VocabularyError for a public
    token outside [0, vocab)."""

    def __init__(self, public: npt.ArrayLike, vocab: int) -> None:
        vocab = int_arg(vocab, "vocab", 1)
        counts = np.bincount(_ids(public, vocab), minlength=vocab).astype(np.float64)
        self.probs: Array = (counts + 1.0) / (counts.sum() + vocab)
        self.mode = int(np.argmax(counts))

    @property
    def log_probs(self) -> Array:
        """log p(t) for every token (the prior of a MAP match)."""
        return np.asarray(np.log(self.probs))

    def positional_hits(self, truth: npt.ArrayLike) -> int:
        """Positions of ``truth`` the prior's best guess (the mode everywhere) gets right."""
        return int(np.sum(_ids(truth) == self.mode))

    def bag_guess(self, n: int) -> Array:
        """The prior's best n-token bag: ⌊n·p_t⌋ copies of each token, then the largest remainders
        (ConfigError unless ``n`` is an integer ≥ 0)."""
        n = int_arg(n, "n")
        want = n * self.probs
        base = np.floor(want).astype(np.int64)
        rest = n - int(base.sum())
        if rest > 0:
            base[np.argsort(-(want - base), kind="stable")[:rest]] += 1
        return np.repeat(np.arange(len(base)), base)

    def bag_hits(self, truth: npt.ArrayLike, guesses: int | None = None) -> int:
        """Tokens of ``truth`` (as a bag) the prior's best bag of ``guesses`` tokens contains (default: as
        many as ``truth`` has): the baseline of a bag attack that made ``guesses`` guesses — the same guess
        budget, no view (an attack guessing a token on each of n + r rows, decoys included, is judged
        against a prior that also guesses n + r tokens). ConfigError unless ``guesses`` is an integer ≥ 0."""
        t = _ids(truth)
        return bag_hits(self.bag_guess(len(t) if guesses is None else guesses), t)


def at_baseline(attack: Rate, baseline: Rate) -> bool:
    """Whether an attack recovered no more than the baseline's 95 % upper bound (nothing measurable
    learned from the view). An attack with nothing scored (no such message) is at the baseline; a baseline
    with nothing scored judges nothing (ConfigError: its interval [0, 1] would pass every attack); so
    does either argument that is not a :class:`Rate`."""
    for name, r in (("attack", attack), ("baseline", baseline)):
        if not isinstance(r, Rate):
            raise ConfigError(f"{name} must be a Rate, got {type(r).__name__}")
    if attack.n == 0:
        return True
    if baseline.n == 0:
        raise ConfigError("the baseline scored nothing: no verdict against it")
    return attack.rate <= baseline.interval[1]

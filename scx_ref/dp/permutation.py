"""Guessing bounds for permutations and for the paper's statelessness argument (DESIGN §7).

All factorials go through ``math.lgamma`` so n in the thousands costs nothing and never overflows; counts
beyond the float64 range give the limiting value (+inf bits, probability 0) rather than an exception.
"""

from __future__ import annotations

import math

from ._validate import check_count, check_nonnegative

__all__ = [
    "bayes_guess_bound",
    "expected_bruteforce_trials",
    "log2_expected_bruteforce_trials",
    "log2_factorial",
    "permutation_bits",
    "permutation_guess_probability",
    "prompt_order_bits",
    "statelessness_bound_paper",
]

_LN2 = math.log(2.0)


def _lgamma_int(n: int) -> float:
    """``ln Γ(n)`` for an integer n ≥ 1; +inf when n or the result exceeds the float64 range."""
    try:
        return math.lgamma(n)
    except OverflowError:  # n too large for a float, or ln Γ(n) beyond the range
        return math.inf


def log2_factorial(m: int) -> float:
    """``log₂(m!)`` via ``lgamma(m + 1) / ln 2`` (exact to float rounding); +inf past the float64 range."""
    return _lgamma_int(check_count(m, "m", minimum=0) + 1) / _LN2


def permutation_bits(n: int, r: int = 0) -> float:
    """Key entropy of one permuted stage: ``log₂((n + r)!)`` bits for n real rows and r decoys.

    Guarantee: a uniformly random permutation of n + r rows is guessed with probability 2^(−bits)
    (it hides the order; it hides nothing about the rows' contents).
    """
    total = check_count(n, "n (rows)", minimum=1) + check_count(r, "r (decoys)", minimum=0)
    return log2_factorial(total)


def prompt_order_bits(n: int, r: int = 0) -> float:
    """What a permuted stage hides of the prompt's order: ``log₂((n + r)! / r!)`` bits for n real rows and r
    decoys — :func:`permutation_bits` less ``log₂(r!)``, since the r decoys' order among themselves is no
    part of the prompt; ``log₂(n!)`` once an attacker tells the decoys from the real rows.

    Guarantee: a guess of the prompt's order from the permuted rows alone (which of them are real, and in
    what order) is right with probability 2^(−bits) (it hides nothing about the rows' contents)."""
    n = check_count(n, "n (rows)", minimum=1)
    r = check_count(r, "r (decoys)", minimum=0)
    return _log_rising(r, n) / _LN2


#: up to this many real rows, :func:`_log_rising` sums the n logarithms one by one
_RISING_DIRECT = 4096
#: from this many decoys on (with more than :data:`_RISING_DIRECT` rows), it uses Stirling's series
_RISING_STIRLING = 1 << 20


def _log_rising(r: int, n: int) -> float:
    """``ln((r + n)! / r!) = Σ_{i=1..n} ln(r + i)`` for integers r ≥ 0, n ≥ 1, to float rounding; +inf past
    the float64 range.

    Not ``lgamma(r + n + 1) − lgamma(r + 1)`` alone: with r ≫ n that difference cancels (r = 10¹⁵, n = 1 gave
    40 bits for log₂(10¹⁵ + 1) = 49.83), and past the float64 range it is inf − inf = NaN. Small n sums the
    logarithms directly (``math.log`` takes integers of any size); large n with r < 2²⁰ takes the lgamma
    difference (r ≤ 256·n there, so it keeps ~13 digits); large n with r ≥ 2²⁰ takes the difference of
    Stirling's series for a = r + 1, x = n / a:
    ``n(ln a − 1) + n·log1p(x)/x + (n − ½)·log1p(x) − x²/(12n(1 + x))`` (next term O(n/a³)); the last term
    is evaluated as ``x/(12(1 + x)) · (x/n)`` (both factors at most 1), since ``x²`` and ``12n(1 + x)`` each
    overflow for n past ~10¹⁶⁰ (inf / inf = NaN).
    """
    if n <= _RISING_DIRECT:
        return math.fsum(math.log(r + i) for i in range(1, n + 1))
    if r < _RISING_STIRLING:
        return _lgamma_int(r + n + 1) - _lgamma_int(r + 1)
    a = r + 1
    try:
        nf = float(n)
        x = n / a  # int / int, correctly rounded however large the integers (0.0 when a ≫ n)
    except OverflowError:  # n or n / a beyond the float64 range: so is the result
        return math.inf
    lx = math.log1p(x)
    ratio = lx / x if x > 0.0 else 1.0  # log1p(x)/x → 1 as x → 0
    return nf * (math.log(a) - 1.0) + nf * ratio + (nf - 0.5) * lx - x / (12.0 * (1.0 + x)) * (x / nf)


def permutation_guess_probability(n: int, r: int = 0) -> float:
    """Probability that one guess of a uniform permutation of n + r rows is right: ``1 / (n + r)!``.

    Subnormal (fewer significant digits) from n + r = 171 on and 0.0 from 178 on; use
    :func:`permutation_bits` for the exact exponent.
    """
    return math.pow(2.0, -permutation_bits(n, r))


def log2_expected_bruteforce_trials(n: int, r: int = 0) -> float:
    """``log₂(((n + r)! + 1) / 2)``: expected trials of an exhaustive search without repetition."""
    bits = permutation_bits(n, r)
    # log2((2^b + 1) / 2) = b - 1 + log2(1 + 2^-b)
    return bits - 1.0 + math.log2(1.0 + math.pow(2.0, -bits))


def expected_bruteforce_trials(n: int, r: int = 0) -> float:
    """Expected trials to find a uniform permutation by exhaustive search: ``((n + r)! + 1) / 2``.

    Returns +inf when the number exceeds the float range; the exact log is
    :func:`log2_expected_bruteforce_trials`.
    """
    total = check_count(n, "n (rows)", minimum=1) + check_count(r, "r (decoys)", minimum=0)
    if total <= 170:
        return (math.factorial(total) + 1) / 2
    return math.inf


def statelessness_bound_paper(epsilon: float, d: int, vocab_size: int) -> float:
    """The paper's Lemma 2 bound on guessing a token: ``max(1/d!, e^ε / V)``, clipped to 1.

    It is the paper's formula, reported as the paper states it; :func:`bayes_guess_bound` is the tighter
    Bayes-optimal bound for a uniform prior over the vocabulary.
    """
    eps = check_nonnegative(epsilon, "epsilon")
    dd = check_count(d, "d", minimum=1)
    v = check_count(vocab_size, "vocab_size", minimum=1)
    log_perm = -_lgamma_int(dd + 1)
    log_dp = eps - math.log(v)
    exponent = max(log_perm, log_dp)
    return 1.0 if exponent >= 0.0 else math.exp(exponent)


def bayes_guess_bound(epsilon: float, vocab_size: int) -> float:
    """Best success probability of guessing a uniformly drawn token from an ε-DP release of it.

    ``e^ε / (e^ε + V − 1)``: the posterior of any token is at most e^ε times that of each of the other
    V − 1, so it is at most ``e^ε / (e^ε + V − 1)``; evaluated as ``1 / (1 + (V − 1) e^{−ε})`` (through
    logarithms from V − 1 = 2¹⁰⁰⁰ on, below the float64 range's end, so any integer V is accepted).
    """
    eps = check_nonnegative(epsilon, "epsilon")
    v = check_count(vocab_size, "vocab_size", minimum=1)
    if v - 1 < 2**1000:
        return 1.0 / (1.0 + (v - 1) * math.exp(-eps))
    t = math.log(v - 1) - eps  # ln((V − 1) e^{−ε}); math.log takes integers of any size
    return math.exp(-t) if t > 700.0 else 1.0 / (1.0 + math.exp(t))

"""Composition of Laplace releases (DESIGN §7): closed forms and a privacy-loss-distribution accountant.

Mechanisms (:mod:`.mechanisms`) say what one release costs; accountants say what k releases cost together,
the way Google's ``dp_accounting`` separates ``DpEvent`` from ``PrivacyAccountant``.

- **basic**: k releases that are ε_i-DP are (Σ ε_i)-DP (δ = 0).
- **advanced** (Dwork–Rothblum–Vadhan 2010; Dwork–Roth Theorem 3.20): k releases that are ε-DP are
  (ε', δ')-DP for every δ' ∈ (0, 1) with ``ε' = √(2k ln(1/δ'))·ε + k·ε(e^ε − 1)``. Heterogeneous form
  (same Azuma argument, privacy loss of release i bounded by ε_i with mean ≤ ε_i(e^{ε_i} − 1)):
  ``ε' = √(2 ln(1/δ') Σ ε_i²) + Σ ε_i(e^{ε_i} − 1)``.
- **pld**: ``dp_accounting.pld`` (optional dependency, imported lazily): the Laplace privacy-loss
  distribution with pessimistic discretization, composed, read at δ. It upper-bounds the optimal ε(δ) up to
  the discretization (values are rounded *up* to multiples of ``value_discretization_interval``).

A d-dimensional Laplace release with L1 sensitivity Δ₁ is accounted as the one-dimensional Laplace
mechanism with sensitivity Δ₁ and the same β: its privacy loss ``Σ_j (|z_j − v_j| − |z_j|)/β`` is a sum of
independent one-dimensional Laplace losses with sensitivities |v_j|, which is dominated by one loss with
sensitivity Σ|v_j| = Δ₁ (this is also how ``dp_accounting.dp_event.LaplaceDpEvent`` is defined).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from ._validate import check_count, check_delta, check_positive, count_as_float, sum_nonnegative, times
from .mechanisms import LaplaceMechanism

__all__ = [
    "PLD_TAIL_MASS",
    "CompositionResult",
    "advanced_composition",
    "advanced_composition_heterogeneous",
    "basic_composition",
    "basic_composition_heterogeneous",
    "compose",
    "pld_available",
    "pld_discretization_slack",
    "pld_epsilon",
    "pld_interval_for",
]

DEFAULT_PLD_INTERVAL = 1e-4
#: The most values one release's privacy-loss distribution may be discretized into (~130 MB of float64).
MAX_PLD_POINTS = 1 << 24
#: The most values the *composed* distribution may have, with the caller's interval or the default one (model
#: mode counts releases without a cap: 10⁹ releases of ε = 0.5 would need ~5.7·10⁷ values). Measured with
#: ``/usr/bin/time`` on ``scx dp --sensitivity 1 --scale 1 -k 10000``: peak memory ≈ 120 MB + ~70 bytes per
#: composed value (``self_convolve``'s FFT holds several complex copies of the padded array): 3.4 M values
#: 354 MB, 11 M values 909 MB, 34 M values 2.5 GB. 2²³ ≈ 8.4 M values keeps a run well under 1 GB.
MAX_PLD_COMPOSED_POINTS = 1 << 23
_PLD_BYTES_PER_COMPOSED_POINT = 70
_PLD_BASE_BYTES = 120e6
#: dp_accounting's default ``tail_mass_truncation`` of ``self_compose``/``compose`` (not passed below).
PLD_TAIL_MASS = 1e-15


def basic_composition(epsilon: float, k: int) -> float:
    """Basic composition: k ε-DP releases are (k·ε)-DP with δ = 0 (+inf when k·ε exceeds the float range)."""
    eps = check_positive(epsilon, "epsilon")
    return times(check_count(k, "k (compositions)"), eps)


def _drv_term(eps: float) -> float:
    """ε·(e^ε − 1), +inf when it overflows."""
    try:
        return eps * math.expm1(eps)
    except OverflowError:
        return math.inf


def advanced_composition(epsilon: float, k: int, delta_prime: float) -> float:
    """Advanced composition (Dwork–Rothblum–Vadhan): ``ε' = √(2k ln(1/δ'))·ε + k·ε(e^ε − 1)``.

    Guarantee: k adaptively chosen ε-DP releases are (ε', δ')-DP. Returns +inf when the value exceeds the
    float64 range (e^ε overflows, or k is too large), never a finite understatement.
    """
    eps = check_positive(epsilon, "epsilon")
    kk = check_count(k, "k (compositions)")
    dp = check_delta(delta_prime, "delta_prime")
    # ln(1/δ') as −ln δ' (1/δ' overflows for a subnormal δ'); times(): k past float64 with a drift term that
    # underflows to 0 gives 0, not inf·0 = NaN
    return math.sqrt(2.0 * count_as_float(kk) * -math.log(dp)) * eps + times(kk, _drv_term(eps))


def _check_mechanisms(mechanisms: Sequence[LaplaceMechanism]) -> list[LaplaceMechanism]:
    if isinstance(mechanisms, LaplaceMechanism):
        raise ConfigError(
            "expected a sequence of LaplaceMechanism, got one LaplaceMechanism (wrap it in a list)"
        )
    try:
        mechs = list(mechanisms)
    except TypeError:  # None, a number, ...: not a sequence at all
        raise ConfigError(
            f"expected a sequence of LaplaceMechanism, got {type(mechanisms).__name__}"
        ) from None
    if not mechs:
        raise ConfigError("need at least one mechanism to compose")
    for m in mechs:
        if not isinstance(m, LaplaceMechanism):
            raise ConfigError(f"expected LaplaceMechanism, got {type(m).__name__}")
    return mechs


def basic_composition_heterogeneous(mechanisms: Sequence[LaplaceMechanism]) -> float:
    """Basic composition of releases with different ε: ``Σ_i count_i·ε_i`` (pure DP, δ = 0).

    +inf when the sum exceeds the float64 range.
    """
    return sum_nonnegative(times(m.count, m.epsilon) for m in _check_mechanisms(mechanisms))


def advanced_composition_heterogeneous(mechanisms: Sequence[LaplaceMechanism], delta_prime: float) -> float:
    """Heterogeneous advanced composition: ``ε' = √(2 ln(1/δ') Σ ε_i²) + Σ ε_i(e^{ε_i} − 1)``.

    Guarantee: the releases together are (ε', δ')-DP (sums run over every release, ``count`` times each).
    With all ε_i = ε this is exactly :func:`advanced_composition`. Like it, returns +inf when the value
    exceeds the float64 range (never an exception, never a finite understatement: Σ ε_i² is summed relative
    to the largest ε_i, so tiny ε_i do not underflow to an ε' of 0).
    """
    mechs = _check_mechanisms(mechanisms)
    dp = check_delta(delta_prime, "delta_prime")
    top = max(m.epsilon for m in mechs)
    if top == 0.0 or math.isinf(top):  # nothing released / a release beyond the float64 range
        return top
    # Σ count·ε_i² = top²·Σ count·(ε_i/top)²: the relative squares lie in [0, 1], neither overflow nor vanish
    rel = sum_nonnegative(times(m.count, (m.epsilon / top) ** 2) for m in mechs)
    drift = sum_nonnegative(times(m.count, _drv_term(m.epsilon)) for m in mechs)
    return math.sqrt(2.0 * -math.log(dp) * rel) * top + drift


def pld_available() -> bool:
    """Whether the optional ``dp_accounting`` package (PLD accountant) is importable."""
    return importlib.util.find_spec("dp_accounting") is not None


def pld_interval_for(mechanisms: Sequence[LaplaceMechanism]) -> float:
    """The discretization interval :func:`pld_epsilon` uses by default.

    1e-4, coarsened for large ε so the distributions stay small: at least ``max ε_i / 10⁴`` and
    ``Σ ε_i / 10⁶``. A coarser interval is still a sound (pessimistic) upper bound, only looser. It is
    +inf when ``Σ ε_i`` exceeds the float64 range (the PLD ε is then +inf as well).
    """
    mechs = [m for m in _check_mechanisms(mechanisms) if m.epsilon > 0]
    if not mechs:
        return DEFAULT_PLD_INTERVAL
    largest = max(m.epsilon for m in mechs)
    total = sum_nonnegative(times(m.count, m.epsilon) for m in mechs)
    return max(DEFAULT_PLD_INTERVAL, largest / 10000.0, total / 1000000.0)


def pld_discretization_slack(mechanisms: Sequence[LaplaceMechanism], interval: float) -> float:
    """How much pessimistic discretization can raise the PLD's largest privacy loss: ``Σ count·(⌈ε/h⌉h − ε)``.

    Pessimistic rounding moves each release's privacy loss up to the next multiple of h, so the composed
    PLD may report up to this much more than the exact ε(δ) at very small δ; in particular the PLD number
    can exceed basic composition by up to this amount (e.g. ε = 0.34375, h = 1e-4, δ = 1e-12: PLD 0.3438).
    It is 0 when every ε is a multiple of h; an ε within 1e-9·h above a positive multiple counts as that
    multiple (float noise), a positive ε below h never does (it is rounded up to h: ε = 2.5e-10 at h = 0.25
    gives a PLD ε of 0.248 at δ = 1e-12, within its slack h − ε). Each release contributes less than h,
    so the slack is finite for every h > 0, however small (``ε mod h`` is computed exactly with
    ``math.fmod``); it is +inf only when some ε is +inf or ``Σ count`` times h exceeds the float64 range.
    Raises ConfigError for a non-mechanism, an empty list or h ≤ 0, NonFiniteError for a non-finite h.
    """
    mechs = _check_mechanisms(mechanisms)
    h = check_positive(interval, "interval")

    def one(eps: float) -> float:
        if math.isinf(eps):
            return math.inf
        rest = math.fmod(eps, h)  # exact: eps = q·h + rest with 0 <= rest < h
        # an eps within 1e-9·h above a positive multiple of h (float noise) counts as that multiple: no
        # slack; below h it is no noise (q = 0): a tiny eps > 0 is rounded up to h, a slack of h − eps
        return 0.0 if rest == 0.0 or (eps >= h and rest <= 1e-9 * h) else h - rest

    return sum_nonnegative(times(m.count, one(m.epsilon)) for m in mechs)


def pld_epsilon(
    mechanisms: Sequence[LaplaceMechanism],
    delta: float,
    *,
    value_discretization_interval: float | None = None,
) -> float | None:
    """ε at ``delta`` of the composed releases from ``dp_accounting``'s privacy-loss distribution.

    Each distinct (Δ₁, β) gets ``pld.from_laplace_mechanism(β, sensitivity=Δ₁, pessimistic_estimate=True)``,
    self-composed ``count`` times; the groups are composed and read with ``get_epsilon_for_delta(delta)``.
    Guarantee: the releases are (ε, delta)-DP for the returned ε (pessimistic rounding makes it an upper
    bound on the optimal ε(δ), up to the ``tail_mass_truncation`` of 1e-15 the library adds to δ).
    Returns ``None`` when ``dp_accounting`` is not installed. Releases with Δ₁ = 0 cost nothing. Returns
    +inf when ``Σ count·ε`` exceeds the float64 range or the accountant overflows.
    Raises ConfigError for an interval that discretizes one release into more than ``MAX_PLD_POINTS``
    values, or (explicit or default interval alike) whose composed distribution, predicted before composing
    the way dp_accounting sizes it, would exceed ``MAX_PLD_COMPOSED_POINTS`` values; the message names an
    interval that fits, or says that none does (the size then grows with the number of releases, e.g. the
    default interval at ε = 0.5 and 10⁹ releases: ~5.7·10⁷ values at every interval) and to skip the PLD.
    """
    mechs = _check_mechanisms(mechanisms)
    dl = check_delta(delta)
    interval = (
        pld_interval_for(mechs)
        if value_discretization_interval is None
        else check_positive(value_discretization_interval, "value_discretization_interval")
    )
    largest = max((m.epsilon for m in mechs if m.sensitivity > 0), default=0.0)
    # Σ count·ε beyond the float64 range (an infinite ε, or counts too large to self-compose): the composed
    # ε is beyond it as well; report +inf rather than hand the accountant numbers it cannot represent.
    unbounded = math.isinf(basic_composition_heterogeneous(mechs))
    if not unbounded and 2.0 * largest / interval > MAX_PLD_POINTS:
        raise ConfigError(
            f"a PLD interval of {interval:g} would discretize a release of ε = {largest:g} into "
            f"~{2.0 * largest / interval:.3g} values (limit {MAX_PLD_POINTS}); use an interval >= "
            f"{2.0 * largest / MAX_PLD_POINTS:.3g}"
        )
    if not pld_available():
        return None
    if unbounded:
        return math.inf
    groups: dict[tuple[float, float], int] = {}
    for m in mechs:
        if m.sensitivity > 0:
            key = (m.sensitivity, m.scale)
            groups[key] = groups.get(key, 0) + m.count
    if not groups:
        return 0.0
    total: Any = None
    try:
        singles = _single_plds(groups, interval)
        _check_composed_size(singles, groups, interval, explicit=value_discretization_interval is not None)
        for one, count in singles:
            part = _dense_if_composed(one, count).self_compose(count) if count > 1 else one
            total = part if total is None else total.compose(part)
        return float(total.get_epsilon_for_delta(dl))
    except OverflowError:  # the accountant's interval overflows exp(): ε is astronomically large
        return math.inf


def _single_plds(groups: dict[tuple[float, float], int], interval: float) -> list[tuple[Any, int]]:
    """One pessimistic Laplace PLD per (Δ₁, β) group, in sorted order, with its count."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    return [
        (
            pld.from_laplace_mechanism(
                beta, sensitivity=sens, pessimistic_estimate=True, value_discretization_interval=interval
            ),
            count,
        )
        for (sens, beta), count in sorted(groups.items())
    ]


def _composed_size(singles: list[tuple[Any, int]]) -> int | None:
    """How many values dp_accounting's composition of ``singles`` will hold, predicted the way it sizes them.

    ``self_compose(count)`` runs ``common.self_convolve``, whose FFT output has ``upper − lower + 1`` values
    for ``(lower, upper) = common.compute_self_convolve_bounds(probs, count, 1e-15)`` (at least the input's
    length); composing two groups convolves them into ``n₁ + n₂ − 1`` values. The largest of the remove/add
    PMFs counts. Reads dp_accounting internals (``_pmf_remove``/``_pmf_add`` with ``_probs`` (dense) or
    ``_loss_probs`` (sparse)); returns None when a version lacks them, and the caller then composes
    unguarded, as before this check existed.
    """
    try:
        from dp_accounting.pld import common

        bounds = common.compute_self_convolve_bounds
        to_list = common.dictionary_to_list
    except (ImportError, AttributeError):
        return None
    total = 0
    for one, count in singles:
        sizes = []
        for name in ("_pmf_remove", "_pmf_add"):
            pmf = getattr(one, name, None)
            if pmf is None:
                continue
            probs = getattr(pmf, "_probs", None)
            if probs is None:
                loss_probs = getattr(pmf, "_loss_probs", None)
                if loss_probs is None:
                    return None
                probs = to_list(loss_probs)[1]
            if count == 1:
                sizes.append(len(probs))
            else:
                lower, upper = bounds(probs, count, PLD_TAIL_MASS)
                sizes.append(max(upper - lower + 1, len(probs)))
        if not sizes:
            return None
        total += max(sizes) - (1 if total else 0)
    return total


def _dense_if_composed(one: Any, count: int) -> Any:
    """``one`` with its PMFs already dense when dp_accounting's ``self_compose(count)`` would make them so.

    A sparse PMF's ``self_compose`` first computes ``size ** count`` (a Python integer of ~1.6·count bits:
    2.3 s at count = 10⁷, ~2 min at 10⁸) only to compare it with ``_MAX_PMF_SPARSE_SIZE`` and convert the
    PMF to dense. This does that conversion itself, with a bounded power, whenever dp_accounting would, so
    the composed distribution is the same, bit for bit. Returns ``one`` unchanged otherwise, or when a
    dp_accounting version lacks the internals read here.
    """
    try:
        from dp_accounting.pld import pld_pmf
        from dp_accounting.pld import privacy_loss_distribution as pld

        limit = pld_pmf._MAX_PMF_SPARSE_SIZE
        sparse = pld_pmf.SparsePLDPmf
        remove, add, symmetric = one._pmf_remove, one._pmf_add, one._symmetric
    except (ImportError, AttributeError):
        return one

    def dense(pmf: Any) -> Any | None:
        if not isinstance(pmf, sparse):
            return pmf
        size = pmf.size
        # size ** count > limit, decided with an exponent of at most 64 (size >= 2: size ** 64 >= 2 ** 64)
        if size < 2 or size ** min(count, 64) <= limit:
            return None  # dp_accounting composes this one sparse
        return pmf.to_dense_pmf()

    dense_remove = dense(remove)
    if dense_remove is None:
        return one
    if symmetric:
        return pld.PrivacyLossDistribution(dense_remove)
    dense_add = dense(add)
    return one if dense_add is None else pld.PrivacyLossDistribution(dense_remove, dense_add)


def _fitting_interval(groups: dict[tuple[float, float], int], interval: float, size: int) -> float | None:
    """A coarser interval whose composed size fits :data:`MAX_PLD_COMPOSED_POINTS`, or None if none is found.

    Starts from ``h·size/limit`` (the support width in privacy-loss units hardly depends on h while h is
    below the releases' ε, so the size scales as 1/h), rounded up to 3 significant digits, and coarsens by
    5% until the prediction fits: the smallest such 3-digit interval whenever the size scales as 1/h. Once
    h exceeds the releases' ε, each release is discretized into 2 or 3 values and the composed size grows
    with the number of releases whatever h is (dp_accounting's Chernoff truncation bound): then no interval
    fits, and after 20 tries (or an interval too coarse for dp_accounting) this returns None.
    """
    fit = interval * size / MAX_PLD_COMPOSED_POINTS
    for _ in range(20):
        unit = 10.0 ** (math.floor(math.log10(fit)) - 2)
        fit = float(f"{math.ceil(fit / unit * (1 - 1e-12)) * unit:.3g}")  # rounded up to 3 significant digits
        try:
            got = _composed_size(_single_plds(groups, fit))
        except OverflowError:
            return None
        if got is None or got <= MAX_PLD_COMPOSED_POINTS:
            return fit
        fit *= 1.05
    return None


def _check_composed_size(
    singles: list[tuple[Any, int]],
    groups: dict[tuple[float, float], int],
    interval: float,
    *,
    explicit: bool = True,
) -> None:
    """ConfigError when composing ``singles`` would exceed :data:`MAX_PLD_COMPOSED_POINTS` values.

    Runs before any composition, for an explicit interval and the default one alike (``explicit`` only
    words the message). The message names the predicted size, its memory estimate and the interval that
    fits (:func:`_fitting_interval`), or, when none does, says so and to skip the PLD accountant (basic and
    advanced composition still hold). Returns None when the size fits or cannot be predicted.
    """
    size = _composed_size(singles)
    if size is None or size <= MAX_PLD_COMPOSED_POINTS:
        return
    fit = _fitting_interval(groups, interval, size)
    gb = (_PLD_BASE_BYTES + _PLD_BYTES_PER_COMPOSED_POINT * size) / 1e9
    what = f"a PLD interval of {interval:g}" if explicit else f"the default PLD interval ({interval:.3g})"
    head = (
        f"{what} would compose the releases into ~{size} values "
        f"(~{gb:.2g} GB of memory; limit {MAX_PLD_COMPOSED_POINTS} values)"
    )
    if fit is not None:
        raise ConfigError(f"{head}; use an interval >= {fit:.3g}")
    releases = sum(groups.values())
    raise ConfigError(
        f"{head}, and no interval fits: at {releases} releases the size grows with their number, not "
        "with the interval; skip the PLD accountant (scx dp --no-pld, use_pld=False): the basic and "
        "advanced composition bounds still hold"
    )


@dataclass(frozen=True)
class CompositionResult:
    """Composed privacy of a set of Laplace releases.

    - ``epsilon_basic`` (δ = 0), ``epsilon_advanced`` (at ``delta_prime``), ``epsilon_best_closed_form``
      = min of the two (at ``delta_prime``; the basic one holds at every δ);
    - ``epsilon_pld`` at ``delta`` (None without dp_accounting), with ``pld_interval`` and
      ``pld_discretization_slack`` (how far discretization alone may push it up, see
      :func:`pld_discretization_slack`);
    - ``epsilon_best``: the smallest of the sound numbers above that hold at ``delta`` (basic, PLD, and
      advanced when ``delta_prime <= delta``): the releases are (epsilon_best, delta)-DP. An advanced ε at a
      δ' larger than δ is not a guarantee at δ and is left out.
    """

    k: int
    delta: float
    delta_prime: float
    epsilon_max_single: float
    epsilon_basic: float
    epsilon_advanced: float
    epsilon_best_closed_form: float
    epsilon_pld: float | None
    pld_interval: float | None
    pld_discretization_slack: float | None
    epsilon_best: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the PLD fields are left out when the accountant is absent."""
        out = asdict(self)
        if self.epsilon_pld is None:
            out.pop("epsilon_pld")
            out.pop("pld_interval")
            out.pop("pld_discretization_slack")
        return out


def compose(
    mechanisms: Sequence[LaplaceMechanism],
    delta: float,
    delta_prime: float | None = None,
    *,
    use_pld: bool = True,
    value_discretization_interval: float | None = None,
) -> CompositionResult:
    """Compose releases with every accountant: basic, advanced (at ``delta_prime``, default ``delta``), PLD.

    Guarantee: the releases are (epsilon_basic, 0)-, (epsilon_advanced, δ')-, (epsilon_pld, δ)- and
    (epsilon_best, δ)-DP. A value beyond the float64 range is +inf (never an exception, never a finite
    understatement). With ``use_pld``, raises ConfigError where :func:`pld_epsilon` does: a discretization
    too fine for one release, or a composed distribution past :data:`MAX_PLD_COMPOSED_POINTS` values
    (e.g. 10⁹ releases of ε = 0.5 at any interval: ``use_pld=False`` still gives the closed forms).
    """
    mechs = _check_mechanisms(mechanisms)
    dl = check_delta(delta)
    dp = dl if delta_prime is None else check_delta(delta_prime, "delta_prime")
    basic = basic_composition_heterogeneous(mechs)
    adv = advanced_composition_heterogeneous(mechs, dp)
    best_cf = min(basic, adv)
    interval: float | None = None
    eps_pld: float | None = None
    if use_pld and pld_available():
        interval = (
            pld_interval_for(mechs)
            if value_discretization_interval is None
            else check_positive(value_discretization_interval, "value_discretization_interval")
        )
        eps_pld = pld_epsilon(mechs, dl, value_discretization_interval=value_discretization_interval)
    slack: float | None = None
    if interval is not None and eps_pld is not None:
        # an infinite default interval (Σ ε beyond the float64 range) leaves ε_pld = +inf, slack unbounded
        slack = pld_discretization_slack(mechs, interval) if math.isfinite(interval) else math.inf
    # every candidate must hold at δ: basic (δ = 0) always, advanced only when δ' <= δ, PLD (read at δ)
    at_delta = [basic] + ([adv] if dp <= dl else []) + ([] if eps_pld is None else [eps_pld])
    best = min(at_delta)
    return CompositionResult(
        k=sum(m.count for m in mechs),
        delta=dl,
        delta_prime=dp,
        epsilon_max_single=max(m.epsilon for m in mechs),
        epsilon_basic=basic,
        epsilon_advanced=adv,
        epsilon_best_closed_form=best_cf,
        epsilon_pld=eps_pld,
        pld_interval=interval,
        pld_discretization_slack=slack,
        epsilon_best=best,
    )

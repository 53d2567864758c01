"""Tests that kill mutants of :mod:`scx_ref.dp.accountants` that survived ``python -m mutation.run
dp_accountants``.

The selected tests compared the PLD ε with dp_accounting's own computation and checked that the composed-size
guard refuses huge runs, but read its refusals only in part (the memory estimate and the "no interval fits"
advice never whole, nor the "wrap it in a list" and "got int" refusals of a non-sequence), never compared the
predicted composed size with the size dp_accounting composes (count 2, two groups), never read the largest of
two *different* remove/add PMFs, never put a size exactly at a limit (the composed-size limit, dp_accounting's
sparse limit, the suggestion search's own check), never followed the suggestion search past its first guess
or to its last try, never fed the sparse → dense shortcut a 2-value or an asymmetric PLD, never read the
discretization slack of an ε that is a multiple of h (or within the documented 1e-9·h above one), and never
asked the PLD for releases whose Σ ε is past the float64 range with an explicit interval. Writing the slack's
tests found a bug: a positive ε up to 1e-9·h was read as float noise above the multiple 0 (slack 0), though
the PLD rounds it up to h."""

from __future__ import annotations

import itertools
import math
import types
from typing import Any

import pytest

from scx_ref.dp import accountants as acc
from scx_ref.dp.accountants import (
    MAX_PLD_COMPOSED_POINTS,
    PLD_TAIL_MASS,
    _check_composed_size,
    _composed_size,
    _dense_if_composed,
    _fitting_interval,
    _single_plds,
    compose,
    pld_available,
    pld_discretization_slack,
    pld_epsilon,
)
from scx_ref.dp.mechanisms import LaplaceMechanism
from scx_ref.errors import ConfigError
from tests.conftest import Composing

from .refusals import Refusal, refusal_test

needs_pld = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")

REFUSALS: list[Refusal] = [
    (
        "one-mechanism-not-a-list",
        lambda: compose(LaplaceMechanism(1.0, 1.0), 1e-6),  # type: ignore[arg-type]
        ConfigError,
        "expected a sequence of LaplaceMechanism, got one LaplaceMechanism (wrap it in a list)",
    ),
    (
        "int-not-a-sequence",
        lambda: compose(5, 1e-6),  # type: ignore[arg-type]
        ConfigError,
        "expected a sequence of LaplaceMechanism, got int",
    ),
    (
        "float-not-a-sequence",
        lambda: pld_discretization_slack(0.5, 0.1),  # type: ignore[arg-type]
        ConfigError,
        "expected a sequence of LaplaceMechanism, got float",
    ),
]

test_refusals = refusal_test(REFUSALS)


# --- helpers ------------------------------------------------------------------------------------------------


def _values(pmf: Any) -> int:
    """How many values a dp_accounting PMF holds (dense: its array; sparse: its dictionary)."""
    from dp_accounting.pld import pld_pmf

    return len(pmf._probs) if isinstance(pmf, pld_pmf.DensePLDPmf) else pmf.size


def _composed(singles: list[tuple[Any, int]]) -> Any:
    """dp_accounting's own composition of the groups (as pld_epsilon does it, without the shortcut)."""
    total: Any = None
    for one, count in singles:
        part = one.self_compose(count) if count > 1 else one
        total = part if total is None else total.compose(part)
    return total


def _laplace(eps: float, h: float, sampling_prob: float = 1.0) -> Any:
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_laplace_mechanism(
        1.0,
        sensitivity=eps,
        pessimistic_estimate=True,
        value_discretization_interval=h,
        sampling_prob=sampling_prob,
    )


def _same_pmf(a: Any, b: Any) -> None:
    from dp_accounting.pld import pld_pmf

    assert type(a) is type(b)
    assert a._infinity_mass == b._infinity_mass
    if isinstance(a, pld_pmf.DensePLDPmf):
        assert a._lower_loss == b._lower_loss and (a._probs == b._probs).all()
    else:
        assert dict(a._loss_probs) == dict(b._loss_probs)


def _same_composition(got: Any, one: Any, count: int) -> None:
    """``got.self_compose(count)`` is ``one.self_compose(count)``, PMF by PMF, bit for bit."""
    a, b = one.self_compose(count), got.self_compose(count)
    _same_pmf(a._pmf_remove, b._pmf_remove)
    _same_pmf(a._pmf_add, b._pmf_add)


# --- _composed_size: the prediction is the size dp_accounting composes --------------------------------------


@needs_pld
@pytest.mark.parametrize(
    "groups,h",
    [
        ({(1.0, 1.0): 1}, 0.01),  # one release: the sparse PMF itself (201 values)
        ({(1.0, 1.0): 2}, 0.01),  # self_compose(2): 401 values, not the single release's 201
        ({(1.0, 1.0): 20}, 0.01),
        ({(1.0, 1.0): 7}, 0.2),  # 11-value sparse PMF, 11**7 > 1000: dp_accounting goes dense
        ({(1.0, 1.0): 1, (0.5, 2.0): 1}, 0.01),  # two groups: n1 + n2 - 1
        ({(1.0, 1.0): 2, (0.5, 2.0): 2}, 0.01),
        ({(1.0, 1.0): 7, (0.5, 2.0): 3}, 0.01),
        ({(1.0, 1.0): 1, (0.5, 2.0): 1, (0.3, 1.0): 1}, 0.01),  # three groups
    ],
    ids=[
        "one-release",
        "count-2",
        "count-20",
        "sparse-to-dense",
        "two-groups",
        "two-groups-count-2",
        "two-groups-counts-7-3",
        "three-groups",
    ],
)
def test_predicted_size_is_the_composed_size(groups: dict[tuple[float, float], int], h: float) -> None:
    singles = _single_plds(groups, h)
    total = _composed(singles)
    assert _composed_size(singles) == max(_values(total._pmf_remove), _values(total._pmf_add))


@needs_pld
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("larger", ["remove", "add"])
def test_the_larger_of_remove_and_add_counts(count: int, larger: str) -> None:
    """An asymmetric PLD whose remove and add PMFs differ in size (201 and 101 values): whichever of the two
    is larger sets the prediction, which is the larger composed PMF's size."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    big, small = _laplace(1.0, 0.01)._pmf_remove, _laplace(0.5, 0.01)._pmf_remove
    one = (
        pld.PrivacyLossDistribution(big, small)
        if larger == "remove"
        else pld.PrivacyLossDistribution(small, big)
    )
    composed = one.self_compose(count) if count > 1 else one
    sizes = {"remove": _values(composed._pmf_remove), "add": _values(composed._pmf_add)}
    assert sizes[larger] > min(sizes.values())  # the two really differ
    assert _composed_size([(one, count)]) == sizes[larger]


def test_prediction_is_none_without_the_internals() -> None:
    """ "returns None when a version lacks them": a PLD without ``_pmf_remove``/``_pmf_add``, or whose PMFs
    have neither ``_probs`` nor ``_loss_probs``, gives None (the caller then composes unguarded), not an
    AttributeError."""
    ns = types.SimpleNamespace
    assert _composed_size([(ns(), 1)]) is None
    assert _composed_size([(ns(_pmf_remove=ns(), _pmf_add=ns()), 1)]) is None
    assert _composed_size([(ns(_pmf_remove=ns(), _pmf_add=ns()), 3)]) is None


# --- _check_composed_size: the limit itself is allowed; the whole refusal -----------------------------------


@needs_pld
def test_a_size_exactly_at_the_limit_is_composed(
    monkeypatch: pytest.MonkeyPatch, no_composition: None
) -> None:
    """The guard refuses sizes that *exceed* the limit: a predicted size equal to it goes on to compose."""
    mechs = [LaplaceMechanism(1.0, 1.0, 2)]
    size = _composed_size(_single_plds({(1.0, 1.0): 2}, 0.01))
    assert size == 401
    monkeypatch.setattr(acc, "MAX_PLD_COMPOSED_POINTS", size)
    with pytest.raises(Composing):
        pld_epsilon(mechs, 1e-6, value_discretization_interval=0.01)
    monkeypatch.setattr(acc, "MAX_PLD_COMPOSED_POINTS", size - 1)
    with pytest.raises(ConfigError, match="would compose the releases into ~401 values"):
        pld_epsilon(mechs, 1e-6, value_discretization_interval=0.01)


@needs_pld
def test_no_interval_fits_refusal_whole(no_composition: None) -> None:
    """10⁹ releases of ε = 0.5 at h = 1: the size is what dp_accounting's self_convolve bounds give, the
    memory 120 MB + 70 bytes per value in GB (10⁹ bytes), and the advice to skip the PLD is read whole."""
    from dp_accounting.pld import common

    k = 10**9
    ((one, _),) = _single_plds({(0.5, 1.0): k}, 1.0)
    probs = common.dictionary_to_list(one._pmf_remove._loss_probs)[1]
    lower, upper = common.compute_self_convolve_bounds(probs, k, PLD_TAIL_MASS)
    size = upper - lower + 1
    assert size > MAX_PLD_COMPOSED_POINTS
    gb = (120e6 + 70 * size) / 1e9
    with pytest.raises(ConfigError) as info:
        pld_epsilon([LaplaceMechanism(0.5, 1.0, k)], 1e-6, value_discretization_interval=1.0)
    assert str(info.value) == (
        f"a PLD interval of 1 would compose the releases into ~{size} values (~{gb:.2g} GB of memory; "
        f"limit {MAX_PLD_COMPOSED_POINTS} values), and no interval fits: at {k} releases the size grows "
        "with their number, not with the interval; skip the PLD accountant (scx dp --no-pld, "
        "use_pld=False): the basic and advanced composition bounds still hold"
    )


@needs_pld
def test_memory_estimate_in_the_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """39·10⁶ values: 120 MB + 70 B × 39·10⁶ = 2.85·10⁹ bytes, shown (2 digits, GB of 10⁹ bytes) as 2.9."""
    monkeypatch.setattr(acc, "_composed_size", lambda _singles: 39_000_000)
    monkeypatch.setattr(acc, "_fitting_interval", lambda _groups, _h, _size: 0.123)
    groups = {(1.0, 1.0): 10}
    with pytest.raises(ConfigError) as info:
        _check_composed_size(_single_plds(groups, 0.01), groups, 0.01, explicit=True)
    assert str(info.value) == (
        "a PLD interval of 0.01 would compose the releases into ~39000000 values (~2.9 GB of memory; "
        f"limit {MAX_PLD_COMPOSED_POINTS} values); use an interval >= 0.123"
    )


# --- _fitting_interval: 3 significant digits rounded up, 5% steps, 20 tries ---------------------------------


def _fake_sizes(monkeypatch: pytest.MonkeyPatch, size_at: Any, tried: list[float] | None = None) -> None:
    """Predicted size as a function of the interval (the 'PLDs' are the interval itself); limit 1000."""
    monkeypatch.setattr(acc, "MAX_PLD_COMPOSED_POINTS", 1000)
    monkeypatch.setattr(acc, "_single_plds", lambda _groups, h: h)

    def size(h: float) -> int:
        if tried is not None:
            tried.append(h)
        return size_at(h)

    monkeypatch.setattr(acc, "_composed_size", size)


def test_fitting_interval_exactly_three_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Size 1230/h: the first guess h·size/limit = 1.23 is already 3 digits; it fits with exactly the limit
    (1000 values), so it is returned as is, not rounded up to 1.24."""
    _fake_sizes(monkeypatch, lambda h: math.ceil(round(1230.0 / h, 6)))
    assert acc._composed_size(acc._single_plds({}, 1.22)) > 1000  # 1.22 does not fit: 1.23 is the smallest
    assert _fitting_interval({}, 1.0, 1230) == 1.23


def test_fitting_interval_rounds_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Size 1230.1/h: the first guess 1.2301 is rounded *up* to 3 digits, 1.24, the smallest that fits."""
    _fake_sizes(monkeypatch, lambda h: math.ceil(round(1230.1 / h, 6)))
    assert acc._composed_size(acc._single_plds({}, 1.23)) > 1000
    assert _fitting_interval({}, 1.0, 1230.1) == 1.24


def test_fitting_interval_coarsens_by_five_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Size 1/h + 100 (not ∝ 1/h): the first guess 1.1e-3 predicts 1010 values; 5% coarser, 1.155e-3, rounded
    up to 1.16e-3, predicts 963 and is returned."""
    tried: list[float] = []
    _fake_sizes(monkeypatch, lambda h: math.ceil(round(1.0 / h, 6)) + 100, tried)
    assert _fitting_interval({}, 1e-3, 1100) == 1.16e-3
    assert tried == [1.1e-3, 1.16e-3]


def test_fitting_interval_gives_up_after_20_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing fits: 20 intervals, each coarser than the last, are tried and None is returned."""
    tried: list[float] = []
    _fake_sizes(monkeypatch, lambda _h: 1001, tried)
    assert _fitting_interval({}, 1e-3, 2000) is None
    assert len(tried) == 20
    assert all(b > a for a, b in itertools.pairwise(tried))


# --- _dense_if_composed: dense exactly when dp_accounting's self_compose would go dense ---------------------


@needs_pld
@pytest.mark.parametrize("count,dense", [(9, False), (10, True), (1000, True)])
def test_two_value_pmf(count: int, dense: bool) -> None:
    """A 2-value sparse PLD (dp_accounting's (ε, δ)-DP PLD): 2**9 = 512 stays sparse, 2**10 = 1024 > 1000
    goes dense in dp_accounting, so here too."""
    from dp_accounting.pld import common, pld_pmf
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(1.0, 1e-6), 0.1)
    assert isinstance(one._pmf_remove, pld_pmf.SparsePLDPmf) and one._pmf_remove.size == 2
    assert isinstance(one.self_compose(count)._pmf_remove, pld_pmf.DensePLDPmf) is dense  # dp_accounting
    got = _dense_if_composed(one, count)
    if dense:
        assert isinstance(got._pmf_remove, pld_pmf.DensePLDPmf) and got._symmetric
    else:
        assert got is one
    _same_composition(got, one, count)


@needs_pld
@pytest.mark.parametrize("count,dense", [(2, False), (3, False), (4, True)])
def test_size_power_exactly_at_the_sparse_limit(count: int, dense: bool) -> None:
    """10-value sparse PMFs (a subsampled Laplace PLD): 10**3 = 1000 is not above dp_accounting's sparse limit
    (it composes them sparse; left to it), 10**4 is (converted here)."""
    from dp_accounting.pld import pld_pmf

    assert pld_pmf._MAX_PMF_SPARSE_SIZE == 1000
    one = _laplace(2.0, 0.25, sampling_prob=0.5)
    assert not one._symmetric and one._pmf_remove.size == 10 and one._pmf_add.size == 10
    assert isinstance(one.self_compose(count)._pmf_remove, pld_pmf.DensePLDPmf) is dense  # dp_accounting
    got = _dense_if_composed(one, count)
    if dense:
        assert not got._symmetric
        assert isinstance(got._pmf_remove, pld_pmf.DensePLDPmf)
        assert isinstance(got._pmf_add, pld_pmf.DensePLDPmf)
    else:
        assert got is one
    _same_composition(got, one, count)


@needs_pld
def test_asymmetric_pmfs_both_converted() -> None:
    """An asymmetric PLD whose remove and add PMFs both go dense: both converted, each from its own PMF."""
    from dp_accounting.pld import pld_pmf

    one = _laplace(1.0, 0.1, sampling_prob=0.5)  # 12-value remove and add PMFs, 12**3 > 1000
    assert not one._symmetric
    got = _dense_if_composed(one, 3)
    assert not got._symmetric
    _same_pmf(got._pmf_remove, one._pmf_remove.to_dense_pmf())
    _same_pmf(got._pmf_add, one._pmf_add.to_dense_pmf())
    assert isinstance(got._pmf_add, pld_pmf.DensePLDPmf)
    _same_composition(got, one, 3)


@needs_pld
def test_asymmetric_only_remove_would_go_dense() -> None:
    """Remove PMF of 11 values (11**3 > 1000), add PMF of 3 (27): dp_accounting converts only the remove one,
    so the PLD is left to it, unchanged (not made symmetric with the remove PMF)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.PrivacyLossDistribution(_laplace(1.0, 0.2)._pmf_remove, _laplace(1.0, 1.0)._pmf_remove)
    assert (one._pmf_remove.size, one._pmf_add.size) == (11, 3)
    assert _dense_if_composed(one, 3) is one
    _same_composition(_dense_if_composed(one, 3), one, 3)


# --- pld_discretization_slack: exact multiples and the 1e-9·h noise tolerance -------------------------------


def test_slack_is_zero_for_multiples_of_h() -> None:
    """ε = 0.5 is exactly 2·h at h = 0.25: "It is 0 when every ε is a multiple of h"."""
    assert pld_discretization_slack([LaplaceMechanism(0.5, 1.0, 3)], 0.25) == 0.0
    assert pld_discretization_slack([LaplaceMechanism(0.5, 1.0), LaplaceMechanism(1.0, 4.0)], 0.25) == 0.0


def test_slack_noise_tolerance_is_relative_to_h_and_only_above_a_positive_multiple() -> None:
    """An ε at most 1e-9·h above a positive multiple of h counts as that multiple; one 5% of h above it
    (ε = 1.05e-4, h = 1e-4) is raised by h − 5e-6 (a tolerance of 1e-9/h = 1e-5 would call that noise). A
    positive ε below h is never noise, however small: the pessimistic PLD rounds it up to h (ε = 2.5e-10 at
    h = 0.25 has a PLD ε of 0.248 at δ = 1e-12), so its slack is h − ε (it was 0 for ε <= 1e-9·h, below
    what the PLD reports)."""
    h = 0.25
    one_ulp_above = math.nextafter(h, math.inf)  # 2·h and 3·h likewise: within 1e-9·h of the multiple
    assert pld_discretization_slack([LaplaceMechanism(one_ulp_above, 1.0)], h) == 0.0
    assert pld_discretization_slack([LaplaceMechanism(math.nextafter(3 * h, math.inf), 1.0)], h) == 0.0
    assert pld_discretization_slack([LaplaceMechanism(1.05e-4, 1.0)], 1e-4) == pytest.approx(9.5e-5, rel=1e-9)
    for tiny in (1e-9 * h, 2.5e-10, 5e-324):
        assert pld_discretization_slack([LaplaceMechanism(tiny, 1.0)], h) == h - tiny
    assert pld_discretization_slack([LaplaceMechanism(0.0, 1.0)], h) == 0.0  # Δ₁ = 0: nothing released


@needs_pld
def test_the_slack_covers_the_pld_of_a_tiny_epsilon() -> None:
    """The documented bound: the PLD's ε exceeds the exact one (here at most basic composition's ε) by at most
    the slack, for an ε far below h too."""
    mechs = [LaplaceMechanism(2.5e-10, 1.0)]
    eps_pld = pld_epsilon(mechs, 1e-12, value_discretization_interval=0.25)
    assert eps_pld is not None and eps_pld > 0.2  # the tiny ε was rounded up towards h
    assert eps_pld - 2.5e-10 <= pld_discretization_slack(mechs, 0.25)


# --- pld_epsilon / compose with Σ ε past the float64 range -------------------------------------------------


@needs_pld
@pytest.mark.parametrize(
    "mech",
    [LaplaceMechanism(math.inf, 1.0), LaplaceMechanism(1.0, 1.0, 10**400)],
    ids=["infinite-epsilon", "count-past-float64"],
)
def test_unbounded_releases_are_infinite_with_an_explicit_interval(mech: LaplaceMechanism) -> None:
    """ "Returns +inf when Σ count·ε exceeds the float64 range", whatever the interval (no per-release
    discretization refusal for an infinite ε)."""
    assert pld_epsilon([mech], 1e-6, value_discretization_interval=0.1) == math.inf


@needs_pld
def test_compose_with_an_infinite_default_interval() -> None:
    """Σ ε past float64: the default interval is +inf, the PLD ε +inf and the slack +inf (not an error from
    computing the slack of an infinite interval)."""
    res = compose([LaplaceMechanism(1.0, 1.0, 10**400)], 1e-6)
    assert res.pld_interval == math.inf
    assert res.epsilon_pld == math.inf
    assert res.pld_discretization_slack == math.inf
    assert res.epsilon_best == math.inf

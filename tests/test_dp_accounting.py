"""The Laplace mechanism and the accountants pinned down: the PLD number against an independent
``dp_accounting.PLDAccountant`` computation and the exact single-release ε(δ), the options ``compose`` passes
on, the discretization helpers' hand values, and the error messages a user sees.

Several of these close gaps found by mutation testing (``nox -s mutation``): a PLD that composed two
releases as one, an optimistic (not upper-bound) PLD, an ignored ``value_discretization_interval``, a
discretization slack that went missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from scx_ref.dp import (
    LaplaceMechanism,
    advanced_composition,
    advanced_composition_heterogeneous,
    basic_composition,
    basic_composition_heterogeneous,
    compose,
    laplace_epsilon,
    laplace_scale_for_epsilon,
    metric_dp_epsilon_per_unit,
    per_coordinate_reading,
    pld_available,
    pld_discretization_slack,
    pld_epsilon,
    pld_interval_for,
)
from scx_ref.dp.mechanisms import L1_LABEL, PER_COORDINATE_LABEL
from scx_ref.errors import ConfigError, NonFiniteError

needs_pld = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")

Groups = list[tuple[float, float, int]]  # (sensitivity, beta, count)


def _accountant_epsilon(groups: Groups, delta: float, interval: float) -> float:
    """ε(δ) from dp_accounting's own PLDAccountant: each group a self-composed LaplaceDpEvent (noise
    multiplier β/Δ₁, i.e. the same mechanism at sensitivity 1), all composed in one accountant."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    for sens, beta, count in groups:
        acc.compose(
            dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(noise_multiplier=beta / sens), count)
        )
    return float(acc.get_epsilon(delta))


# ----------------------------------------------------------------------------- PLD


@needs_pld
@pytest.mark.parametrize(
    ("groups", "interval"),
    [
        ([(1.0, 2.0, 1)], 1e-3),
        ([(1.0, 2.0, 2)], 1e-3),  # two releases: must not be accounted as one
        ([(1.0, 2.0, 3)], 1e-3),
        ([(1.0, 2.0, 3), (2.0, 1.0, 2)], 1e-3),
        ([(3.0, 2.0, 2)], 0.01),
        ([(1.0, 2.0, 2)], 0.05),  # a coarse interval, passed explicitly
    ],
    ids=["one", "two", "three", "two-groups", "sensitivity-3", "coarse"],
)
def test_pld_epsilon_matches_the_pld_accountant(groups: Groups, interval: float) -> None:
    mechs = [LaplaceMechanism(s, b, c) for s, b, c in groups]
    for delta in (1e-6, 0.01):
        got = pld_epsilon(mechs, delta, value_discretization_interval=interval)
        assert got == pytest.approx(_accountant_epsilon(groups, delta, interval), rel=1e-12)


@needs_pld
def test_pld_epsilon_default_interval_is_pld_interval_for() -> None:
    """Without an interval, pld_epsilon uses pld_interval_for (here coarsened above 1e-4 by the large ε)."""
    mechs = [LaplaceMechanism(30.0, 1.0, 2), LaplaceMechanism(1.0, 2.0, 1)]
    h = pld_interval_for(mechs)
    assert h == pytest.approx(30.0 / 10000.0)
    want = _accountant_epsilon([(30.0, 1.0, 2), (1.0, 2.0, 1)], 1e-6, h)
    assert pld_epsilon(mechs, 1e-6) == pytest.approx(want, rel=1e-12)


@needs_pld
@pytest.mark.parametrize("interval", [1e-3, 0.05])
@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_pld_is_an_upper_bound_on_the_exact_epsilon(interval: float, delta: float) -> None:
    """One Laplace release with ε = Δ₁/β has the exact ε(δ) = ε + 2 ln(1 − δ). The pessimistic PLD may only
    round it up, by less than one interval; an optimistic estimate falls below it."""
    exact = 0.5 + 2.0 * math.log1p(-delta)
    got = pld_epsilon([LaplaceMechanism(1.0, 2.0)], delta, value_discretization_interval=interval)
    assert got is not None and exact <= got <= exact + interval


@needs_pld
def test_pld_ignores_zero_sensitivity_releases() -> None:
    """A release with Δ₁ = 0 costs nothing: alone it gives ε = 0, beside others it changes nothing."""
    zero = LaplaceMechanism(0.0, 1.0, 5)
    assert pld_epsilon([zero], 1e-6) == 0.0
    one = LaplaceMechanism(1.0, 2.0, 2)
    assert pld_epsilon([zero, one], 1e-6, value_discretization_interval=1e-3) == pld_epsilon(
        [one], 1e-6, value_discretization_interval=1e-3
    )


@needs_pld
def test_pld_groups_equal_releases() -> None:
    """count = 3 is the same as three separate releases of the same (Δ₁, β)."""
    three = pld_epsilon([LaplaceMechanism(1.0, 2.0, 3)], 1e-6, value_discretization_interval=1e-3)
    split = pld_epsilon(
        [LaplaceMechanism(1.0, 2.0), LaplaceMechanism(1.0, 2.0, 2)], 1e-6, value_discretization_interval=1e-3
    )
    assert three == split


# ----------------------------------------------------------------------------- compose


@needs_pld
def test_compose_passes_the_interval_and_reports_its_slack() -> None:
    mechs = [LaplaceMechanism(1.0, 3.0, 4)]  # ε = 1/3 is not a multiple of h, so the slack is > 0
    h = 0.01
    res = compose(mechs, 1e-6, value_discretization_interval=h)
    assert res.pld_interval == h
    assert res.epsilon_pld == pld_epsilon(mechs, 1e-6, value_discretization_interval=h)
    assert res.epsilon_pld == pytest.approx(_accountant_epsilon([(1.0, 3.0, 4)], 1e-6, h), rel=1e-12)
    assert res.epsilon_pld != compose(mechs, 1e-6).epsilon_pld  # the default interval gives another number
    assert res.pld_discretization_slack == pld_discretization_slack(mechs, h)
    assert res.pld_discretization_slack == pytest.approx(4 * (0.34 - 1 / 3), rel=1e-9)
    d = res.to_dict()
    assert d["pld_interval"] == h and d["pld_discretization_slack"] == res.pld_discretization_slack
    assert d["epsilon_pld"] == res.epsilon_pld


@needs_pld
def test_compose_fields() -> None:
    """Every field of the result, for two groups of releases, with δ' defaulting to δ and set apart."""
    mechs = [LaplaceMechanism(1.0, 2.0, 3), LaplaceMechanism(2.0, 1.0, 1)]
    res = compose(mechs, 1e-5)
    assert res.k == 4 and res.delta == 1e-5 and res.delta_prime == 1e-5
    assert res.epsilon_max_single == 2.0
    assert res.epsilon_basic == basic_composition_heterogeneous(mechs) == 3.5
    assert res.epsilon_advanced == advanced_composition_heterogeneous(mechs, 1e-5)
    assert res.epsilon_best_closed_form == min(res.epsilon_basic, res.epsilon_advanced)
    assert res.pld_interval == pld_interval_for(mechs)
    assert res.epsilon_pld == pld_epsilon(mechs, 1e-5)
    assert res.epsilon_pld is not None and res.epsilon_best == min(
        res.epsilon_best_closed_form, res.epsilon_pld
    )
    other = compose(mechs, 1e-5, delta_prime=0.1)
    assert other.delta == 1e-5 and other.delta_prime == 0.1
    assert other.epsilon_advanced == advanced_composition_heterogeneous(mechs, 0.1) != res.epsilon_advanced
    assert other.epsilon_pld == res.epsilon_pld  # PLD is read at δ, not δ'


def test_compose_best_is_the_smallest_bound() -> None:
    """Many small releases: advanced composition beats basic, and epsilon_best takes it."""
    res = compose([LaplaceMechanism(0.1, 1.0, 1000)], 1e-6, use_pld=False)
    assert res.epsilon_advanced < res.epsilon_basic == pytest.approx(100.0)
    assert res.epsilon_best == res.epsilon_best_closed_form == res.epsilon_advanced
    assert res.epsilon_pld is None and res.pld_interval is None and res.pld_discretization_slack is None
    assert set(res.to_dict()) == {
        "k",
        "delta",
        "delta_prime",
        "epsilon_max_single",
        "epsilon_basic",
        "epsilon_advanced",
        "epsilon_best_closed_form",
        "epsilon_best",
    }


# ----------------------------------------------------------------------------- discretization helpers


def test_pld_interval_for_hand_values() -> None:
    """1e-4, or max ε/10⁴, or Σ count·ε/10⁶, whichever is largest; releases with ε = 0 are left out."""
    assert pld_interval_for([LaplaceMechanism(1.0, 2.0, 10)]) == 1e-4
    assert pld_interval_for([LaplaceMechanism(5.0, 1.0), LaplaceMechanism(1.0, 1.0)]) == 5.0 / 10000
    assert pld_interval_for([LaplaceMechanism(0.5, 1.0, 1_000_000)]) == 500_000.0 / 1_000_000
    assert pld_interval_for([LaplaceMechanism(0.0, 1.0, 10**9)]) == 1e-4
    assert pld_interval_for([LaplaceMechanism(0.0, 1.0), LaplaceMechanism(3.0, 1.0)]) == 3.0 / 10000


def test_pld_discretization_slack_hand_values() -> None:
    """Σ count·(⌈ε/h⌉·h − ε): zero for multiples of h (with float noise in ε/h), else the rounding-up gap."""
    assert pld_discretization_slack([LaplaceMechanism(0.34375, 1.0)], 1e-4) == pytest.approx(5e-5, rel=1e-9)
    assert pld_discretization_slack([LaplaceMechanism(0.34375, 1.0, 3)], 1e-4) == pytest.approx(
        1.5e-4, rel=1e-9
    )
    assert pld_discretization_slack([LaplaceMechanism(0.3, 1.0, 7)], 0.1) == pytest.approx(0.0, abs=1e-15)
    assert pld_discretization_slack([LaplaceMechanism(1.0, 4.0), LaplaceMechanism(1.0, 3.0)], 0.1) == (
        pytest.approx((0.3 - 0.25) + (0.4 - 1 / 3), rel=1e-9)
    )


def test_advanced_composition_overflow_is_infinite() -> None:
    """e^ε overflows for ε ≳ 710: the bound is +inf rather than an OverflowError."""
    assert advanced_composition(1000.0, 2, 1e-6) == math.inf
    assert advanced_composition_heterogeneous([LaplaceMechanism(1000.0, 1.0)], 1e-6) == math.inf
    assert basic_composition(1000.0, 2) == 2000.0


# ----------------------------------------------------------------------------- mechanisms


def test_laplace_mechanism_normalises_its_fields() -> None:
    """Integer (and numpy) inputs are stored as float sensitivity/scale and int count; name defaults."""
    m = LaplaceMechanism(3, 6, count=np.int64(4))  # type: ignore[arg-type]
    assert (m.sensitivity, m.scale, m.count, m.name) == (3.0, 6.0, 4, "laplace")
    assert type(m.sensitivity) is float and type(m.scale) is float and type(m.count) is int
    assert m.epsilon == 0.5 and m.delta == 0.0


def test_per_coordinate_reading_fields_and_dict() -> None:
    r = per_coordinate_reading(0.25, 5, 1)  # dim = 1 is allowed: both readings coincide
    assert (r.delta_inf, r.scale, r.dim) == (0.25, 5.0, 1)
    assert r.epsilon_per_coordinate == r.epsilon_l1 == 0.05 and r.l1_sensitivity == 0.25
    assert per_coordinate_reading(0.25, 5.0, 4096).to_dict() == {
        "per_coordinate": {
            "delta_f": 0.25,
            "scale": 5.0,
            "epsilon": 0.05,
            "is_dp_guarantee": False,
            "label": PER_COORDINATE_LABEL,
        },
        "l1": {
            "dim": 4096,
            "l1_sensitivity": 1024.0,
            "scale": 5.0,
            "epsilon": 204.8,
            "is_dp_guarantee": True,
            "label": L1_LABEL,
        },
    }


Call = Callable[[], object]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: laplace_epsilon(-1.0, 1.0), ConfigError, r"^sensitivity must be >= 0, got -1\.0$"),
        (lambda: laplace_epsilon(1.0, 0.0), ConfigError, r"^scale \(beta\) must be > 0, got 0\.0$"),
        (
            lambda: laplace_epsilon(math.nan, 1.0),
            NonFiniteError,
            r"^sensitivity must be finite and >= 0, got nan$",
        ),
        (lambda: laplace_scale_for_epsilon(0.0, 1.0), ConfigError, r"^sensitivity must be > 0, got 0\.0$"),
        (lambda: laplace_scale_for_epsilon(1.0, -2.0), ConfigError, r"^epsilon must be > 0, got -2\.0$"),
        (lambda: metric_dp_epsilon_per_unit(0), ConfigError, r"^scale \(beta\) must be > 0, got 0$"),
        (lambda: LaplaceMechanism(-1.0, 1.0), ConfigError, r"^sensitivity must be >= 0, got -1\.0$"),
        (lambda: LaplaceMechanism(1.0, 0.0), ConfigError, r"^scale \(beta\) must be > 0, got 0\.0$"),
        (lambda: LaplaceMechanism(1.0, 1.0, 0), ConfigError, r"^count must be >= 1, got 0$"),
        (
            lambda: per_coordinate_reading(0.0, 5.0, 8),
            ConfigError,
            r"^per-coordinate sensitivity \(delta f\) must be > 0, got 0\.0$",
        ),
        (lambda: per_coordinate_reading(0.25, 0.0, 8), ConfigError, r"^scale \(s\) must be > 0, got 0\.0$"),
        (lambda: per_coordinate_reading(0.25, 5.0, 0), ConfigError, r"^dim must be >= 1, got 0$"),
        (lambda: basic_composition(1.0, 0), ConfigError, r"^k \(compositions\) must be >= 1, got 0$"),
        (lambda: basic_composition(0.0, 3), ConfigError, r"^epsilon must be > 0, got 0\.0$"),
        (lambda: advanced_composition(0.0, 3, 0.5), ConfigError, r"^epsilon must be > 0, got 0\.0$"),
        (lambda: advanced_composition(1.0, 0, 0.5), ConfigError, r"^k \(compositions\) must be >= 1, got 0$"),
        (
            lambda: advanced_composition(1.0, 3, 1.0),
            ConfigError,
            r"^delta_prime must lie in the open interval",
        ),
        (
            lambda: advanced_composition_heterogeneous([LaplaceMechanism(1.0, 1.0)], 0.0),
            ConfigError,
            r"^delta_prime must lie in the open interval \(0, 1\), got 0\.0$",
        ),
        (lambda: compose([], 1e-6), ConfigError, r"^need at least one mechanism to compose$"),
        (lambda: compose([0.5], 1e-6), ConfigError, r"^expected LaplaceMechanism, got float$"),  # type: ignore[list-item]
        (
            lambda: compose([LaplaceMechanism(1.0, 1.0)], 0.0),
            ConfigError,
            r"^delta must lie in the open interval",
        ),
        (
            lambda: compose([LaplaceMechanism(1.0, 1.0)], 1e-6, delta_prime=2.0),
            ConfigError,
            r"^delta_prime must lie in the open interval",
        ),
        (
            lambda: compose([LaplaceMechanism(1.0, 1.0)], 1e-6, value_discretization_interval=0.0),
            ConfigError,
            r"^value_discretization_interval must be > 0, got 0\.0$",
        ),
        (
            lambda: pld_epsilon([LaplaceMechanism(1.0, 1.0)], 1e-6, value_discretization_interval=-1.0),
            ConfigError,
            r"^value_discretization_interval must be > 0, got -1\.0$",
        ),
        (lambda: pld_epsilon([LaplaceMechanism(1.0, 1.0)], 1.0), ConfigError, r"^delta must lie in the open"),
        (
            lambda: pld_discretization_slack([LaplaceMechanism(1.0, 1.0)], 0.0),
            ConfigError,
            r"^interval must be > 0, got 0\.0$",
        ),
    ],
    ids=[
        "laplace-sensitivity",
        "laplace-scale",
        "laplace-nan",
        "scale-for-eps-sensitivity",
        "scale-for-eps-epsilon",
        "metric-dp-scale",
        "mechanism-sensitivity",
        "mechanism-scale",
        "mechanism-count",
        "per-coordinate-delta-f",
        "per-coordinate-scale",
        "per-coordinate-dim",
        "basic-k",
        "basic-epsilon",
        "advanced-epsilon",
        "advanced-k",
        "advanced-delta-prime",
        "heterogeneous-delta-prime",
        "compose-empty",
        "compose-not-a-mechanism",
        "compose-delta",
        "compose-delta-prime",
        "compose-interval",
        "pld-interval",
        "pld-delta",
        "slack-interval",
    ],
)
def test_dp_error_messages(call: Call, error: type[Exception], message: str) -> None:
    """Each bad input raises the documented error naming the parameter (what the `scx dp` user sees)."""
    with pytest.raises(error, match=message):
        call()


def test_pld_refuses_an_interval_with_too_many_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """pld_epsilon refuses an interval that would discretize the largest ε (of a release with Δ₁ > 0) into
    more than MAX_PLD_POINTS values, before any PLD is built, and says which interval would do; exactly
    MAX_PLD_POINTS values is allowed. Releases with Δ₁ = 0 are left out of the largest ε."""
    import scx_ref.dp.accountants as acc
    from scx_ref.dp import LaplaceMechanism

    monkeypatch.setattr(acc, "pld_available", lambda: False)  # stop after the check: no PLD is built
    one = LaplaceMechanism(sensitivity=1.0, scale=1.0)  # ε = 1
    edge = 2.0 / acc.MAX_PLD_POINTS  # 2ε / interval == MAX_PLD_POINTS exactly
    assert acc.pld_epsilon([one], 1e-6, value_discretization_interval=edge) is None
    with pytest.raises(ConfigError) as info:
        acc.pld_epsilon([one], 1e-6, value_discretization_interval=edge / 2)
    assert str(info.value) == (
        f"a PLD interval of {edge / 2:g} would discretize a release of ε = 1 into ~3.36e+07 values"
        f" (limit {acc.MAX_PLD_POINTS}); use an interval >= 1.19e-07"
    )
    half = LaplaceMechanism(sensitivity=0.5, scale=1.0)  # ε = 0.5: counted although Δ₁ < 1
    with pytest.raises(ConfigError) as info:
        acc.pld_epsilon([half], 1e-6, value_discretization_interval=edge / 4)
    assert str(info.value) == (
        f"a PLD interval of {edge / 4:g} would discretize a release of ε = 0.5 into ~3.36e+07 values"
        f" (limit {acc.MAX_PLD_POINTS}); use an interval >= 5.96e-08"
    )
    zero = LaplaceMechanism(sensitivity=0.0, scale=1.0)  # Δ₁ = 0: no ε, no discretization
    assert acc.pld_epsilon([zero], 1e-6, value_discretization_interval=1e-12) is None

"""scx_ref.dp: numbers that claimed more privacy than holds, and inputs that escaped as raw
Python exceptions.

- heterogeneous advanced composition squared each ε: below ~1e-154 the squares vanished and ε' became 0
  (10³⁰⁰ releases of ε = 1e-165 were reported as (0, δ')-DP);
- homogeneous advanced composition gave NaN for k past float64 with a tiny ε, and +inf for a subnormal δ';
- ``epsilon_best`` took the advanced ε at δ' even when δ' > δ, and was reported beside δ;
- ``laplace_scale_for_epsilon`` could return β = 0 (no noise), and a β one ulp too small;
- a positive Δ₁ over a huge β gave ε = 0.0 ("the output does not depend on the input");
- a non-sequence to ``compose``, a zero-column ``l1_diameter`` and an inconsistent hand-made
  ``ModelSensitivities`` raised TypeError / ValueError / IndexError;
- ``scx dp --beta qkv=5,qkv=50`` silently used 50; ``--per-coordinate 1e308 --dim 10`` blamed a
  ``sensitivity`` the user never gave.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from scx_ref.cli import main
from scx_ref.dp import (
    LaplaceMechanism,
    LayerSensitivities,
    advanced_composition,
    advanced_composition_heterogeneous,
    compose,
    l1_diameter,
    laplace_epsilon,
    laplace_scale_for_epsilon,
    per_coordinate_reading,
    request_budget,
)
from scx_ref.errors import ConfigError, NonFiniteError, ShapeError
from tests.test_dp import _sens, needs_pld  # the hand-made sensitivities and the dp-accounting mark

# --------------------------------------------------------------------------- advanced composition


def test_heterogeneous_advanced_does_not_underflow_to_zero() -> None:
    """ε = 1e-170: ε² underflows, but ε' = √(2 ln(1/δ'))·ε, as the homogeneous form says."""
    one = LaplaceMechanism(1e-170, 1.0)
    want = advanced_composition(1e-170, 1, 1e-6)
    assert want > 0
    assert advanced_composition_heterogeneous([one], 1e-6) == pytest.approx(want, rel=1e-12, abs=0.0)


def test_many_tiny_releases_are_not_reported_as_free() -> None:
    """10³⁰⁰ releases of ε = 1e-165: ε' = √(2·10³⁰⁰·ln 10⁶)·1e-165 ≈ 5.3e-15, not 0 (nor is epsilon_best)."""
    res = compose([LaplaceMechanism(1e-165, 1.0, 10**300)], 1e-6, use_pld=False)
    want = math.sqrt(2.0 * 1e300 * math.log(1e6)) * 1e-165
    assert res.epsilon_advanced == pytest.approx(want, rel=1e-9, abs=0.0)
    assert res.epsilon_best == res.epsilon_advanced > 0


def test_heterogeneous_advanced_mixed_sizes_still_exact() -> None:
    """Scaling by the largest ε keeps the hand value for ordinary ε and leaves +inf for an infinite ε."""
    mechs = [LaplaceMechanism(1.0, 2.0, 3), LaplaceMechanism(2.0, 1.0, 1)]
    expected = math.sqrt(9.5) + 1.5 * (math.exp(0.5) - 1) + 2 * (math.exp(2.0) - 1)
    assert advanced_composition_heterogeneous(mechs, math.exp(-1.0)) == pytest.approx(expected, rel=1e-14)
    huge = [LaplaceMechanism(1e308, 1e-10), LaplaceMechanism(1.0, 1.0)]
    assert advanced_composition_heterogeneous(huge, 1e-6) == math.inf
    assert advanced_composition_heterogeneous([LaplaceMechanism(0.0, 1.0)], 1e-6) == 0.0


def test_advanced_with_k_past_float64_is_inf_not_nan() -> None:
    assert advanced_composition(1e-200, 10**400, 1e-6) == math.inf


def test_subnormal_delta_prime_gives_the_finite_value() -> None:
    """ln(1/δ') for δ' = 5e-324 is 744.44, not ln(inf): ε' = √(2·744.44) + e − 1 ≈ 40.30."""
    want = math.sqrt(2.0 * -math.log(5e-324)) + math.e - 1.0
    assert advanced_composition(1.0, 1, 5e-324) == pytest.approx(want, rel=1e-14)
    assert advanced_composition_heterogeneous([LaplaceMechanism(1.0, 1.0)], 5e-324) == pytest.approx(
        want, rel=1e-14
    )


# --------------------------------------------------------------------------- epsilon_best holds at δ


def test_epsilon_best_ignores_advanced_at_a_larger_delta_prime() -> None:
    mechs = [LaplaceMechanism(0.01, 1.0, 10000)]
    loose = compose(mechs, 1e-10, delta_prime=0.5, use_pld=False)
    assert loose.epsilon_advanced < loose.epsilon_basic  # advanced wins, but at δ' = 0.5, not at δ
    assert loose.epsilon_best == loose.epsilon_basic
    tight = compose(mechs, 0.5, delta_prime=1e-10, use_pld=False)  # δ' <= δ: the advanced ε holds at δ
    assert tight.epsilon_best == tight.epsilon_advanced < tight.epsilon_basic


@needs_pld
def test_epsilon_best_is_at_least_the_true_epsilon_at_delta() -> None:
    """An optimistic PLD (a lower estimate of the exact ε(δ)) at δ = 1e-10 is ~6.5; the advanced ε at
    δ' = 0.5 is 2.18 and used to be reported as epsilon_best beside δ = 1e-10."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    mechs = [LaplaceMechanism(0.01, 1.0, 10000)]
    res = compose(mechs, 1e-10, delta_prime=0.5)
    low = pld.from_laplace_mechanism(
        1.0,
        sensitivity=0.01,
        pessimistic_estimate=False,
        value_discretization_interval=1e-4,
        use_connect_dots=False,
    ).self_compose(10000)
    exact_lower = float(low.get_epsilon_for_delta(1e-10))
    assert res.epsilon_advanced < exact_lower  # the case is the one that matters
    assert res.epsilon_best >= exact_lower


def test_request_budget_epsilon_best_holds_at_delta() -> None:
    """β = 1000, 2000 tokens: the advanced ε at δ' = 0.5 (1.14) is far below basic (56.0); the budget's
    epsilon_best, reported beside δ = 1e-10, must not be it."""
    kw = dict(level="blind", beta=1000.0, prompt_len=4, tokens=2000, use_pld=False)
    b = request_budget(_sens(), delta=1e-10, delta_prime=0.5, **kw)  # type: ignore[arg-type]
    assert b.epsilon_advanced < b.epsilon_basic
    assert b.epsilon_best == b.epsilon_basic and b.to_dict()["delta"] == 1e-10
    same = request_budget(_sens(), delta=0.5, delta_prime=1e-10, **kw)  # type: ignore[arg-type]
    assert same.epsilon_best == same.epsilon_advanced < same.epsilon_basic


# --------------------------------------------------------------------------- mechanisms


def test_scale_for_epsilon_keeps_its_promise() -> None:
    """With the β it returns, the Laplace ε never exceeds the target, not even by an ulp."""
    rng = np.random.default_rng(7)
    for d, e in rng.uniform(0.01, 100.0, size=(20000, 2)):
        beta = laplace_scale_for_epsilon(float(d), float(e))
        assert laplace_epsilon(float(d), beta) <= e
        assert beta <= math.nextafter(d / e, math.inf)  # at most one step up
    assert laplace_scale_for_epsilon(1.0, 0.5) == 2.0


def test_scale_for_epsilon_never_returns_zero() -> None:
    with pytest.raises(ConfigError, match=r"below the float64 range .*no noise"):
        laplace_scale_for_epsilon(1e-300, 1e300)


def test_positive_sensitivity_never_gives_zero_epsilon() -> None:
    assert laplace_epsilon(1e-300, 1e300) > 0.0
    assert LaplaceMechanism(1e-300, 1e300).epsilon > 0.0
    assert compose([LaplaceMechanism(1e-300, 1e300)], 1e-6, use_pld=False).epsilon_basic > 0.0
    reading = per_coordinate_reading(1e-300, 1e300, 1)
    assert reading.epsilon_per_coordinate > 0.0 and reading.epsilon_l1 > 0.0
    assert laplace_epsilon(0.0, 1e300) == 0.0 and LaplaceMechanism(0.0, 1.0).epsilon == 0.0
    assert laplace_epsilon(1.0, 2.0) == 0.5


# --------------------------------------------------------------------------- bad input: project errors


@pytest.mark.parametrize("bad", [None, 5, LaplaceMechanism(1.0, 1.0)])
def test_compose_refuses_a_non_sequence(bad: object) -> None:
    with pytest.raises(ConfigError, match="sequence of LaplaceMechanism"):
        compose(bad, 1e-6)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sequence of LaplaceMechanism"):
        advanced_composition_heterogeneous(bad, 1e-6)  # type: ignore[arg-type]


def test_l1_diameter_of_rows_without_columns() -> None:
    for backend in ("numpy", "auto"):
        with pytest.raises(ShapeError, match="at least one column"):
            l1_diameter(np.zeros((3, 0)), backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(layers=None), ConfigError, r"^layers must be a tuple of n_layers = 3 .*got NoneType$"),
        (dict(n_layers=4), ConfigError, r"^layers must be a tuple of n_layers = 4 .*got 3 entries$"),
        (dict(n_layers="3"), ConfigError, r"^n_layers must be an integer"),
        (dict(hidden_size=0), ConfigError, r"^hidden_size must be >= 1"),
        (dict(layers=(1, 2, 3)), ConfigError, r"^layers must hold LayerSensitivities, got int$"),
        (dict(lm_head=float("nan")), NonFiniteError, r"^lm_head"),
        (dict(lm_head="6"), ConfigError, r"^lm_head must be a real number"),
        (dict(embed_normalized_diameter=-1.0), ConfigError, r"^embed_normalized_diameter must be >= 0"),
        (dict(notes=(1,)), ConfigError, r"^notes must be a tuple of strings"),
    ],
)
def test_inconsistent_model_sensitivities_are_refused(
    change: dict[str, object], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        dataclasses.replace(_sens(), **change)  # type: ignore[arg-type]


def test_layer_sensitivities_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^qkv must be a real number"):
        LayerSensitivities(0, "3", 5.0, 4.0, 9.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^layer must be >= 0"):
        LayerSensitivities(-1, 3.0, 5.0, 4.0, 9.0)
    inf = LayerSensitivities(0, math.inf, 5.0, 4.0, 9.0)  # an overflowing bound is still a bound
    assert inf.qkv == math.inf


def test_hand_made_sensitivities_still_give_a_budget() -> None:
    b = request_budget(_sens(), level="blind", prompt_len=2, tokens=3, use_pld=False)
    assert math.isfinite(b.epsilon_basic) and b.epsilon_basic > 0


# --------------------------------------------------------------------------- scx dp


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scx dp: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_refuses_a_stage_given_twice_in_beta(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--no-pld"]
    err = _refused([*argv, "--beta", "qkv=5,qkv=50,default=1"], capsys)
    assert err == "scx dp: error: --beta gives stage 'qkv' twice, in 'qkv=5,qkv=50,default=1'"
    err = _refused([*argv, "--beta", "qkv=,default=1"], capsys)
    assert "--beta must be a number or stage=value pairs" in err


def test_cli_per_coordinate_overflow_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["dp", "--per-coordinate", "1e308", "--dim", "10", "--no-pld"], capsys)
    assert "--per-coordinate" in err and "--dim 10" in err and "exceeds the float64 range" in err

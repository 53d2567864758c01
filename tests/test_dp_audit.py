"""scx_ref.dp audit (mechanisms, accountants, sensitivity, budget): what escaped or was misreported.

- ``StageRelease.epsilon_total`` multiplied a count past the float64 range by a float: OverflowError, so
  ``RequestBudget.to_dict()`` and ``scx dp --tokens 10^400 --no-pld`` died with a raw traceback after the
  accountants had correctly reported ε = +inf;
- a Δ₁ of +inf (an overflowing bound, which :class:`LayerSensitivities` and :class:`ModelSensitivities`
  accept) made ``request_budget`` raise NonFiniteError ("sensitivity must be finite") instead of reporting
  ε = +inf: :class:`LaplaceMechanism` refused the very Δ₁ the sensitivity classes allow;
- a Δ₁ of -0.0 was kept as -0.0: ``laplace_epsilon(-0.0, β)`` and the advanced ε of such a release were
  -0.0, a privacy loss printed with a minus sign.
"""

from __future__ import annotations

import math

import pytest

from scx_ref.cli import main
from scx_ref.dp import (
    LaplaceMechanism,
    LayerSensitivities,
    ModelSensitivities,
    StageRelease,
    compose,
    laplace_epsilon,
    pld_available,
    pld_epsilon,
    request_budget,
)
from scx_ref.errors import ConfigError, NonFiniteError

needs_pld = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")

BIG = 10**400  # an integer count beyond the float64 range


def _sens(**change: object) -> ModelSensitivities:
    fields: dict[str, object] = dict(
        name="hand",
        hidden_size=8,
        vocab_size=100,
        n_layers=3,
        layers=tuple(LayerSensitivities(i, 3.0, 5.0, 4.0, 9.0) for i in range(3)),
        lm_head=6.0,
        embed_normalized_diameter=2.0,
    )
    fields.update(change)
    return ModelSensitivities(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- counts past float64


def test_stage_release_total_past_the_float_range_is_inf() -> None:
    s = StageRelease("generate", "gen_qkv", "qkv", 1, BIG, 2.0, 5.0, 0.4)
    assert s.epsilon_total == math.inf  # was OverflowError: int too large to convert to float
    zero = StageRelease("generate", "gen_qkv", "qkv", 1, BIG, 0.0, 5.0, 0.0)
    assert zero.epsilon_total == 0.0
    assert StageRelease("prefill", "qkv", "qkv", 1, 3, 2.0, 5.0, 0.4).epsilon_total == pytest.approx(1.2)


def test_budget_with_decode_steps_past_the_float_range_serializes() -> None:
    b = request_budget(_sens(), level="paper", tokens=BIG, use_pld=False)
    assert b.epsilon_basic == b.epsilon_advanced == b.epsilon_best == math.inf
    d = b.to_dict()  # was OverflowError
    gen = [s for s in d["stages"] if s["phase"] == "generate"]
    assert gen and all(s["count"] == BIG - 1 and s["epsilon_total"] == "inf" for s in gen)
    pre = [s for s in d["stages"] if s["phase"] == "prefill"]
    assert [s["epsilon_total"] for s in pre] == [pytest.approx(2.0 / 5.0)]


def test_cli_tokens_past_the_float_range(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--no-pld"]
    assert main([*argv, "--tokens", str(BIG)]) == 0  # was a traceback (OverflowError)
    out = capsys.readouterr().out
    assert "basic" in out and "inf" in out


# --------------------------------------------------------------------------- an overflowing Δ₁


def test_laplace_mechanism_takes_an_unbounded_sensitivity() -> None:
    m = LaplaceMechanism(math.inf, 2.0, 3)
    assert m.epsilon == math.inf and m.delta == 0.0
    r = compose([m, LaplaceMechanism(1.0, 2.0)], 1e-6)
    assert r.epsilon_basic == r.epsilon_advanced == r.epsilon_best == math.inf
    if pld_available():
        assert r.epsilon_pld == math.inf and pld_epsilon([m], 1e-6) == math.inf
    with pytest.raises(NonFiniteError, match="sensitivity"):
        LaplaceMechanism(math.nan, 2.0)
    with pytest.raises(ConfigError, match="sensitivity must be >= 0"):
        LaplaceMechanism(-math.inf, 2.0)
    with pytest.raises(NonFiniteError, match="sensitivity"):
        LaplaceMechanism(BIG, 2.0)  # a finite integer is not silently made infinite


@pytest.mark.parametrize("use_pld", [True, False])
def test_budget_with_an_overflowing_sensitivity_is_infinite(use_pld: bool) -> None:
    # the block-1 diameter (level paper) and a middle block's O bound (level blind, no key sharing)
    for sens, level in (
        (_sens(embed_normalized_diameter=math.inf), "paper"),
        (
            _sens(
                layers=tuple(
                    LayerSensitivities(i, 3.0, math.inf if i == 1 else 5.0, 4.0, 9.0) for i in range(3)
                )
            ),
            "blind",
        ),
    ):
        b = request_budget(sens, level=level, prompt_len=2, tokens=0, use_pld=use_pld)  # type: ignore[arg-type]
        assert b.epsilon_basic == b.epsilon_advanced == b.epsilon_best == math.inf
        assert b.epsilon_pld == (math.inf if use_pld and pld_available() else None)
        assert any(s.epsilon_each == math.inf for s in b.stages)
        assert b.token_guess_bayes == 1.0
        assert b.to_dict()["epsilon_basic"] == "inf"
    finite = request_budget(_sens(), level="paper", prompt_len=2, tokens=0, use_pld=use_pld)
    assert finite.epsilon_basic == pytest.approx(2.0 / 5.0)


# --------------------------------------------------------------------------- -0.0


def test_negative_zero_sensitivity_is_zero() -> None:
    assert math.copysign(1.0, laplace_epsilon(-0.0, 2.0)) == 1.0
    m = LaplaceMechanism(-0.0, 2.0)
    assert math.copysign(1.0, m.sensitivity) == 1.0 and math.copysign(1.0, m.epsilon) == 1.0
    r = compose([m], 1e-6, use_pld=False)
    for eps in (r.epsilon_basic, r.epsilon_advanced, r.epsilon_best, r.epsilon_max_single):
        assert eps == 0.0 and math.copysign(1.0, eps) == 1.0


# --------------------------------------------------------------------------- the accountants' reduction


@needs_pld
@pytest.mark.parametrize("parts", [2, 5])
@pytest.mark.parametrize("delta", [1e-3, 1e-6, 1e-10])
def test_a_row_release_is_dominated_by_one_laplace_with_its_l1_sensitivity(parts: int, delta: float) -> None:
    """The accountants' reduction (module docstring): a d-dimensional release whose rows differ by v is the
    composition of one-dimensional Laplace releases with sensitivities |v_j|; it costs no more than one
    release with Δ₁ = Σ|v_j|. Split Δ₁ = 1.5 evenly over ``parts`` coordinates (ε 0.75 / parts each, a
    multiple of the interval so no discretization slack enters)."""
    h = 1e-4
    split = pld_epsilon([LaplaceMechanism(1.5 / parts, 2.0, parts)], delta, value_discretization_interval=h)
    whole = pld_epsilon([LaplaceMechanism(1.5, 2.0)], delta, value_discretization_interval=h)
    assert split is not None and whole is not None
    assert split <= whole + 1e-12
    assert whole <= 0.75  # ε(δ) of one release is at most its pure ε

"""Bad and extreme inputs to :mod:`scx_ref.dp`: a project error or the documented limiting value, never a
bare Python exception and never an understated number.

- the L1 diameter agrees between the numpy and torch backends across the float64 range (the torch float32
  screen once overflowed for |x| > 3.4e38 and returned -1.0), and refuses a bad device;
- RMSNorm rows of 1e200 or 1e-200 normalize like rows of 1;
- composition that leaves the float64 range is +inf (as homogeneous advanced composition always was);
  integers beyond the float range give the limiting value or an error naming the argument;
- head geometries that are not the layer's are refused, and so are beta keys that are not stages.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pytest

import scx_ref.dp as D
from scx_ref.dp import LaplaceMechanism as LM
from scx_ref.errors import ConfigError, NonFiniteError, SCXError, ShapeError
from tests.tiny import tiny_weights


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    """An overflow RuntimeWarning is a defect here, not noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _torch() -> None:
    pytest.importorskip("torch")


# --------------------------------------------------------------------------- 1. L1 diameter


TABLES = {
    "beyond_float32": np.array([[1e39, 0.0], [0.0, 0.0], [0.5, 0.5]]),
    "huge": np.array([[1e300, -1e300], [-1e300, 1e300], [0.0, 0.0]]),
    "mixed": np.array([[1e39, 1.0], [1e39, 2.5], [1e39, -1.0], [1e39, 0.0]]),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_l1_diameter_torch_agrees_with_numpy_across_the_float_range(name: str) -> None:
    _torch()
    x = TABLES[name]
    exact = max(float(np.sum(np.abs(a - b))) for a in x for b in x)
    d_np, _, _ = D.l1_diameter(x, backend="numpy", return_pair=True)
    d_t, it, jt = D.l1_diameter(x, backend="torch", return_pair=True)
    assert d_np == d_t == exact > 0.0
    assert float(np.sum(np.abs(x[it] - x[jt]))) == exact
    assert D.l1_diameter(x) == exact  # auto picks torch when it is installed


def test_l1_diameter_random_rows_with_one_huge_row() -> None:
    _torch()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    x[17, 3] = -4e38  # beyond float32
    d_np = D.l1_diameter(x, backend="numpy", return_pair=True)
    d_t = D.l1_diameter(x, backend="torch", return_pair=True)
    assert d_np[0] == d_t[0] >= 4e38
    assert 17 in d_t[1:]
    # the same rows scaled down to tiny and subnormal magnitudes still agree
    for tiny in (
        np.array([[1e-300, 0.0], [0.0, 0.0], [0.0, 3e-300]]),
        np.array([[5e-324, 0.0], [0.0, 1e-320]]),
    ):
        assert D.l1_diameter(tiny, backend="torch") == D.l1_diameter(tiny, backend="numpy") > 0.0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_l1_diameter_beyond_float64_is_inf_without_warning(backend: Literal["numpy", "torch"]) -> None:
    if backend == "torch":
        _torch()
    x = np.array([[1e308, 1e308], [-1e308, -1e308], [0.0, 0.0]])
    assert D.l1_diameter(x, backend=backend) == math.inf


def test_l1_diameter_bad_device_is_a_config_error() -> None:
    _torch()
    with pytest.raises(ConfigError, match="device"):
        D.l1_diameter(np.eye(3), backend="torch", device="bogus")
    with pytest.raises(ConfigError, match="device"):
        D.l1_diameter(np.eye(3), backend="torch", device=3)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- 2. normalize_rows


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300, 2.0**-1000])
def test_normalize_rows_is_right_across_the_float_range(scale: float) -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 1.0, (3, 4)) * np.array([1, -1, 1, -1])
    gamma = np.array([1.0, 2.0, 0.5, -1.0])
    want = D.normalize_rows(base, gamma)
    got = D.normalize_rows(base * scale, gamma)
    np.testing.assert_allclose(got, want, rtol=1e-12)  # RMSNorm does not depend on the row's scale


def test_normalize_rows_with_eps_on_tiny_and_huge_rows() -> None:
    g = np.ones(2)
    np.testing.assert_allclose(D.normalize_rows([[1e200, 1e200]], g, 1e-6), [[1.0, 1.0]], rtol=1e-15)
    # |x| ≪ √eps: x / √(x² + eps) ≈ x / √eps = 1e-197, not 0
    np.testing.assert_allclose(D.normalize_rows([[1e-200, 1e-200]], g, 1e-6), [[1e-197, 1e-197]], rtol=1e-12)
    assert np.all(D.normalize_rows([[0.0, 0.0]], g, 1e-6) == 0.0)


def test_normalize_rows_refuses_a_scalar() -> None:
    with pytest.raises(ShapeError, match="dimension"):
        D.normalize_rows(np.float64(1.0), np.ones(1))


# --------------------------------------------------------------------------- 3. overflow


def test_request_budget_with_a_tiny_beta_is_inf_not_an_exception() -> None:
    s = D.model_sensitivities(tiny_weights(0), embedding="bound")
    for use_pld in (False, True):
        b = D.request_budget(s, beta=1e-160, use_pld=use_pld)
        assert b.epsilon_advanced == math.inf
        assert math.isfinite(b.epsilon_basic) and b.epsilon_basic > 1e160
        assert b.epsilon_best == b.epsilon_basic


def test_heterogeneous_advanced_composition_overflows_to_inf() -> None:
    assert D.advanced_composition(1e200, 1, 1e-6) == math.inf
    assert D.advanced_composition_heterogeneous([LM(1e200, 1.0)], 1e-6) == math.inf
    res = D.compose([LM(1e200, 1.0)], 1e-6, use_pld=False)
    assert res.epsilon_advanced == math.inf and res.epsilon_best == res.epsilon_basic == 1e200
    res = D.compose([LM(1e200, 1.0)], 1e-6)
    assert res.epsilon_best == 1e200


def test_counts_beyond_the_float_range_compose_to_inf() -> None:
    big = 10**400
    assert D.advanced_composition(1, big, 0.5) == math.inf
    assert D.basic_composition(1, big) == math.inf
    mechs = [LM(1.0, 1.0, big)]
    assert D.basic_composition_heterogeneous(mechs) == math.inf
    assert D.advanced_composition_heterogeneous(mechs, 1e-6) == math.inf
    res = D.compose(mechs, 1e-6)
    assert res.epsilon_basic == res.epsilon_advanced == res.epsilon_best == math.inf
    assert D.basic_composition_heterogeneous([LM(0.0, 1.0, big)]) == 0.0  # 0·count is 0, not NaN


def test_pld_discretization_slack_checks_and_tiny_interval() -> None:
    with pytest.raises(ConfigError, match="LaplaceMechanism"):
        D.pld_discretization_slack([1], 1e-4)  # type: ignore[list-item]
    h = 1e-320
    slack = D.pld_discretization_slack([LM(1.0, 1.0)], h)
    assert 0.0 <= slack < h  # the exact (finite) value: each release adds less than h
    assert D.pld_discretization_slack([LM(0.34375, 1.0)], 1e-4) == pytest.approx(5e-5, rel=1e-9)


def test_huge_integers_give_the_limit_or_name_the_argument() -> None:
    big = 10**400
    with pytest.raises(NonFiniteError, match="sensitivity"):
        D.laplace_epsilon(big, 1)
    with pytest.raises(NonFiniteError, match="scale"):
        D.laplace_epsilon(1, big)
    with pytest.raises(NonFiniteError, match="sensitivity"):
        LM(big, 1.0)
    assert D.log2_factorial(big) == math.inf
    assert D.permutation_bits(big) == math.inf
    assert D.log2_expected_bruteforce_trials(big) == math.inf
    assert D.permutation_guess_probability(big) == 0.0
    assert D.statelessness_bound_paper(1.0, big, 10) == pytest.approx(math.e / 10)
    assert D.bayes_guess_bound(0.0, big) == 0.0  # 1 / 10^400 underflows
    # 1 / (1 + 10^400·e^-1000) with e^-1000 ≈ 10^-434.3: essentially 1
    assert D.bayes_guess_bound(1000.0, big) == pytest.approx(1.0, abs=1e-30)
    assert D.bayes_guess_bound(1.0, 10) == 1.0 / (1.0 + 9 * math.exp(-1.0))
    assert D.per_coordinate_reading(1e300, 1.0, 10**10).epsilon_l1 == math.inf


# --------------------------------------------------------------------------- 4. geometry and keys


def test_attention_bound_refuses_a_geometry_that_is_not_the_layers() -> None:
    w = tiny_weights(0)
    c, layer = w.config, w.layers[0]
    ok = D.attention_output_l1_bound(layer, c.n_heads, c.n_kv_heads, c.head_dim)
    assert ok == D.model_sensitivities(w, embedding="bound").layers[0].o
    with pytest.raises(ConfigError, match="n_kv_heads"):
        D.attention_output_l1_bound(layer, c.n_heads, 0, c.head_dim)
    with pytest.raises(ConfigError, match="multiple"):
        D.attention_output_l1_bound(layer, 4, 3, c.head_dim)
    with pytest.raises(SCXError, match="head_dim"):
        D.attention_output_l1_bound(layer, c.n_heads, c.n_kv_heads, 100)
    with pytest.raises(SCXError, match="n_heads"):
        D.attention_output_l1_bound(layer, 2 * c.n_heads, c.n_kv_heads, c.head_dim)
    with pytest.raises(ConfigError, match="LayerWeights"):
        D.attention_output_l1_bound(None, 4, 2, 4)  # type: ignore[arg-type]


def test_swiglu_bound_refuses_a_non_mlp() -> None:
    layer = tiny_weights(0).layers[0]
    with pytest.raises(ConfigError, match="DenseMLP"):
        D.swiglu_down_l1_bound(None, layer.mlp_norm)  # type: ignore[arg-type]
    with pytest.raises(SCXError, match="mlp_norm"):
        D.swiglu_down_l1_bound(layer.mlp, np.ones(3))  # type: ignore[arg-type]


def test_request_budget_names_beta_keys_that_are_not_stages() -> None:
    s = D.model_sensitivities(tiny_weights(0), embedding="bound")
    with pytest.raises(ConfigError, match=r"1.*'x'|'x'.*1"):
        D.request_budget(s, beta={1: 5.0, "x": 3.0, "default": 5.0})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="None"):
        D.request_budget(s, beta={None: 5.0, "default": 5.0})  # type: ignore[dict-item]

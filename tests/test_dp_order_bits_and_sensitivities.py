"""scx_ref.dp (mechanisms, accountants, sensitivity, permutation).

- ``prompt_order_bits(n, r)`` was ``lgamma(n + r + 1) − lgamma(r + 1)``: it cancelled for r ≫ n (40 bits for
  log₂(10¹⁵ + 1) = 49.83) and was inf − inf = NaN once r passed the float64 range;
- ``embedding_l1_diameter`` raised AttributeError for anything but ModelWeights; ``model_sensitivities``
  ignored a misspelled ``backend`` with ``embedding="bound"``;
- a hand-made ``ModelSensitivities`` with its layers out of block order was accepted (the budget reads
  ``layers[i]`` as block i), and a non-string ``name`` / ``LaplaceMechanism.name`` slipped through;
- ``attention_output_l1_bound`` / ``swiglu_down_l1_bound`` returned NaN (0 · inf) for an all-zero weight
  block when the norm bound overflowed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scx_ref.dp import (
    LaplaceMechanism,
    LayerSensitivities,
    ModelSensitivities,
    attention_output_l1_bound,
    embedding_l1_diameter,
    model_sensitivities,
    permutation_bits,
    prompt_order_bits,
    swiglu_down_l1_bound,
)
from scx_ref.errors import ConfigError
from scx_ref.weights import DenseMLP, LayerWeights
from tests.tiny import tiny_weights

# --------------------------------------------------------------------------- prompt_order_bits


def _direct_bits(n: int, r: int) -> float:
    """log₂((n + r)! / r!) = Σ_{i=1..n} log₂(r + i), summed exactly (math.log2 takes any int)."""
    return math.fsum(math.log2(r + i) for i in range(1, n + 1))


@pytest.mark.parametrize(
    ("n", "r"),
    [
        (1, 10**15),  # lgamma difference: 40.0 instead of 49.83
        (3, 10**9),
        (4096, 10**12),
        (5000, 2**20),  # Stirling branch
        (5000, 10**18),
        (20000, 1000),  # lgamma branch (r < 2^20, many rows)
    ],
)
def test_prompt_order_bits_does_not_cancel_for_many_decoys(n: int, r: int) -> None:
    assert prompt_order_bits(n, r) == pytest.approx(_direct_bits(n, r), rel=1e-12)


def test_prompt_order_bits_past_the_float_range_is_a_number_not_nan() -> None:
    # (r + 1)! / r! = r + 1: finite bits, although r! and (r + 1)! are both beyond float64
    assert prompt_order_bits(1, 10**400) == pytest.approx(math.log2(10**400 + 1), rel=1e-14)
    assert prompt_order_bits(5000, 10**400) == pytest.approx(5000 * math.log2(10**400), rel=1e-12)
    assert prompt_order_bits(10**400, 10**400) == math.inf  # truly beyond the range
    assert prompt_order_bits(10**400, 3) == math.inf


@pytest.mark.parametrize(("n", "r"), [(1, 0), (5, 3), (170, 0), (30, 200)])
def test_prompt_order_bits_small_cases_unchanged(n: int, r: int) -> None:
    want = permutation_bits(n, r) - math.log2(math.factorial(r))
    assert prompt_order_bits(n, r) == pytest.approx(want, rel=1e-13, abs=1e-13)


# --------------------------------------------------------------------------- sensitivity inputs


def test_embedding_l1_diameter_refuses_what_is_not_model_weights() -> None:
    with pytest.raises(ConfigError, match=r"^weights must be ModelWeights, got NoneType$"):
        embedding_l1_diameter(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^normalized must be True or False, got str 'no'$"):
        embedding_l1_diameter(tiny_weights(0), normalized="no", backend="numpy")  # type: ignore[arg-type]


def test_model_sensitivities_checks_the_backend_with_the_bound_too() -> None:
    with pytest.raises(ConfigError, match=r"^backend must be 'auto', 'numpy' or 'torch', got 'bogus'$"):
        model_sensitivities(tiny_weights(0), embedding="bound", backend="bogus")  # type: ignore[arg-type]
    assert model_sensitivities(tiny_weights(0), embedding="bound", backend="numpy").n_layers >= 1


def _layers(*indices: int) -> tuple[LayerSensitivities, ...]:
    return tuple(LayerSensitivities(i, 1.0 + i, 2.0, 3.0, 4.0) for i in indices)


def test_model_sensitivities_layers_must_be_in_block_order() -> None:
    with pytest.raises(ConfigError, match=r"layers\[0\] is for layer 1"):
        ModelSensitivities("m", 4, 10, 2, _layers(1, 0), 1.0)
    with pytest.raises(ConfigError, match=r"layers\[1\] is for layer 0"):
        ModelSensitivities("m", 4, 10, 2, _layers(0, 0), 1.0)
    ok = ModelSensitivities("m", 4, 10, 2, _layers(0, 1), 1.0)
    assert ok.layers[1].qkv == 2.0


def test_model_sensitivities_and_mechanism_names_must_be_strings() -> None:
    with pytest.raises(ConfigError, match=r"^name must be a string, got NoneType None$"):
        ModelSensitivities(None, 4, 10, 1, _layers(0), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^name must be a string, got int 7$"):
        LaplaceMechanism(1.0, 1.0, 1, 7)  # type: ignore[arg-type]
    assert LaplaceMechanism(1.0, 2.0, 1, "qkv").epsilon == 0.5


# --------------------------------------------------------------------------- 0 · inf in the bounds


def test_zero_value_block_under_an_overflowing_norm_bound_is_not_nan() -> None:
    d, heads, d_h = 4, 2, 2
    ones = np.ones((d, heads * d_h))
    layer = LayerWeights(
        attn_norm=np.full(d, 1e308),  # √d‖γ‖∞ = 2e308: beyond float64
        wq=ones,
        wk=ones,
        wv=np.zeros((d, heads * d_h)),  # v = x̂ W_v + b_v = b_v whatever x̂ is
        wo=ones.T.copy(),
        mlp_norm=np.ones(d),
        mlp=DenseMLP(np.ones((d, 6)), np.ones((d, 6)), np.ones((6, d))),
        bv=np.array([3.0, 4.0, 0.0, 0.0]),
    )
    # Δ₁ ≤ 2·Σ_h √d_h·‖b_v[g(h)]‖₂ = 2·√2·(5 + 0)
    assert attention_output_l1_bound(layer, heads, heads, d_h) == pytest.approx(2 * math.sqrt(2) * 5.0)
    mlp = DenseMLP(np.zeros((d, 6)), np.ones((d, 6)), np.ones((6, d)))
    assert swiglu_down_l1_bound(mlp, np.full(d, 1e308)) == 0.0  # silu(0) = 0: the product is 0

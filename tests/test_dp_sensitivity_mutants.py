"""Tests that kill mutants of :mod:`scx_ref.dp.sensitivity` (the L1 sensitivities the DP budgets rest on)
that survived ``python -m mutation.run dp_sensitivity`` (mutation/REPORT_dp_sensitivity.md)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref.dp import sensitivity as sens
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from scx_ref.weights import DenseMLP, LayerWeights, MoEMLP
from tests.refusals import Refusal, refusal_test, refused
from tests.tiny import tiny_weights


def test_rmsnorm_bounds_of_a_hand_computed_gamma() -> None:
    """γ = (3, −4): ‖γ‖∞ = 4, ‖γ‖₂ = 5, d = 2."""
    g = np.array([3.0, -4.0])
    assert sens.rmsnorm_l2_bound(g) == math.sqrt(2) * 4.0
    assert sens.rmsnorm_l1_bound(g) == math.sqrt(2) * 5.0
    assert sens.rmsnorm_sensitivity(g) == 2.0 * math.sqrt(2) * 5.0


@pytest.fixture(autouse=True)
def _empty_is_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    """``np.empty`` gives zeros in these tests, so an entry the screen never writes reads 0 (a row screened
    near nothing, dropped from the candidates) instead of whatever memory held: a test that catches such a
    row catches it on every run."""
    zeros = np.zeros
    monkeypatch.setattr(
        np, "empty", lambda shape, dtype=float, order="C", **kw: zeros(shape, dtype, order, **kw)
    )


_W = tiny_weights(0)  # d = 16, 4 heads of 4, 2 KV heads
_LW = _W.layers[0]
_Z2 = np.zeros((2, 2))

REFUSALS: list[Refusal] = [
    ("gamma-empty", lambda: sens.rmsnorm_l2_bound(np.zeros(0)), ShapeError, "gamma must not be empty"),
    (
        "norm-scalar",
        lambda: sens.normalize_rows(np.float64(1.0), np.ones(1)),
        ShapeError,
        "x must have at least one dimension (rows of length 1), got a scalar",
    ),
    (
        "norm-width",
        lambda: sens.normalize_rows(np.ones((2, 3)), np.ones(2)),
        ShapeError,
        "x must have last dimension 2, got shape (2, 3)",
    ),
    (
        "norm-zero-row",
        lambda: sens.normalize_rows(np.array([[1.0, 2.0], [0.0, 0.0]]), np.ones(2)),
        ConfigError,
        "RMSNorm of an all-zero row is undefined when eps = 0",
    ),
    (
        "norm-overflow",
        lambda: sens.normalize_rows(np.array([[1.0, 0.0]]), np.full(2, 1.5e308)),
        NonFiniteError,
        "RMSNorm output exceeds the float64 range (gamma too large)",
    ),
    (
        "diam-no-rows",
        lambda: sens.l1_diameter(np.zeros((0, 2))),
        ShapeError,
        "rows must hold at least one row",
    ),
    (
        "diam-no-columns",
        lambda: sens.l1_diameter(np.zeros((2, 0))),
        ShapeError,
        "rows must have at least one column, got shape (2, 0)",
    ),
    (
        "diam-backend",
        lambda: sens.l1_diameter(_Z2, backend="jax"),  # type: ignore[call-overload]
        ConfigError,
        "backend must be 'auto', 'numpy' or 'torch', got 'jax'",
    ),
    (
        "diam-device-type",
        lambda: sens.l1_diameter(_Z2, backend="torch", device=3),  # type: ignore[call-overload]
        ConfigError,
        "device must be a torch device name such as 'cpu' or 'cuda', got 3",
    ),
    (
        "emb-weights",
        lambda: sens.embedding_l1_diameter(_LW),  # type: ignore[arg-type]
        ConfigError,
        "weights must be ModelWeights, got LayerWeights",
    ),
    (
        "emb-normalized",
        lambda: sens.embedding_l1_diameter(_W, normalized=1),  # type: ignore[arg-type]
        ConfigError,
        "normalized must be True or False, got int 1",
    ),
    (
        "att-layer",
        lambda: sens.attention_output_l1_bound(_W, 4, 2, 4),  # type: ignore[arg-type]
        ConfigError,
        "layer must be LayerWeights, got ModelWeights",
    ),
    (
        "att-not-a-multiple",
        lambda: sens.attention_output_l1_bound(_LW, 3, 2, 4),
        ConfigError,
        "n_heads (3) must be a multiple of n_kv_heads (2)",
    ),
    (
        "att-wv",
        lambda: sens.attention_output_l1_bound(_LW, 4, 2, 8),
        ShapeError,
        "layer.wv has shape (16, 8), expected (16, n_kv_heads·head_dim = 2·8); "
        "n_kv_heads / head_dim do not match the layer",
    ),
    (
        "att-wq",
        lambda: sens.attention_output_l1_bound(_LW, 8, 2, 4),
        ShapeError,
        "layer.wq has shape (16, 16), expected (16, n_heads·head_dim = 8·4); "
        "n_heads / head_dim do not match the layer",
    ),
    (
        "swiglu-mlp",
        lambda: sens.swiglu_down_l1_bound(_LW, _LW.mlp_norm),  # type: ignore[arg-type]
        ConfigError,
        "mlp must be DenseMLP (one expert), got LayerWeights",
    ),
    (
        "model-weights",
        lambda: sens.model_sensitivities(_W.config),  # type: ignore[arg-type]
        ConfigError,
        "weights must be ModelWeights, got ModelConfig",
    ),
    (
        "model-embedding",
        lambda: sens.model_sensitivities(_W, embedding="x"),  # type: ignore[arg-type]
        ConfigError,
        "embedding must be 'exact' or 'bound', got 'x'",
    ),
    (
        "model-backend",
        lambda: sens.model_sensitivities(_W, embedding="bound", backend="x"),  # type: ignore[arg-type]
        ConfigError,
        "backend must be 'auto', 'numpy' or 'torch', got 'x'",
    ),
    (
        "layer-nan",
        lambda: sens.LayerSensitivities(0, math.nan, 1.0, 1.0, 1.0),
        NonFiniteError,
        "qkv must be a number >= 0 (inf allowed), got nan",
    ),
]


def _layer(wv: Any, attn_norm: Any, *, n_heads: int, head_dim: int, bv: Any = None) -> LayerWeights:
    d = len(attn_norm)
    z = np.zeros((d, n_heads * head_dim))
    mlp = DenseMLP(np.ones((d, 1)), np.ones((d, 1)), np.ones((1, d)))
    return LayerWeights(
        attn_norm=np.asarray(attn_norm, dtype=np.float64),
        wq=z,
        wk=np.zeros_like(np.asarray(wv)),
        wv=np.asarray(wv, dtype=np.float64),
        wo=z.T,
        mlp_norm=np.ones(d),
        mlp=mlp,
        bv=None if bv is None else np.asarray(bv, dtype=np.float64),
    )


def test_attention_bound_of_a_hand_computed_layer() -> None:
    """d = 2, γ = (1, −2): ‖x̂‖₂ ≤ √2·2. One KV head of width 1 whose W_v column (3, 4) has norm 5, shared
    by 2 query heads: Δ₁ = 2 · 2 · √1 · 5 · 2√2 = 40√2; with b_v = (1): 2 · 2 · (10√2 + 1)."""
    g = [1.0, -2.0]
    assert sens.attention_output_l1_bound(_layer([[3.0], [4.0]], g, n_heads=2, head_dim=1), 2, 1, 1) == (
        pytest.approx(40 * math.sqrt(2), rel=1e-15, abs=0.0)
    )
    with_bias = _layer([[3.0], [4.0]], g, n_heads=2, head_dim=1, bv=[1.0])
    assert sens.attention_output_l1_bound(with_bias, 2, 1, 1) == pytest.approx(
        4 * (10 * math.sqrt(2) + 1), rel=1e-15
    )


def test_attention_bound_sums_each_kv_head_with_its_own_columns_and_width() -> None:
    """Two KV heads of width 2, one query head each: head 0's W_v columns are (3, 4) and 0, head 1's (1, 0)
    and 0, so ‖W_v[:, 0:2]‖₂ = 5 and ‖W_v[:, 2:4]‖₂ = 1; γ = (1, 1): ‖x̂‖₂ ≤ √2; b_v = (0, 0, 3, 4), so
    head 1 adds ‖(3, 4)‖₂ = 5. Δ₁ = 2 · √2 · (5√2 + (√2 + 5))."""
    wv = np.array([[3.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    layer = _layer(wv, [1.0, 1.0], n_heads=2, head_dim=2, bv=[0.0, 0.0, 3.0, 4.0])
    expected = 2 * math.sqrt(2) * (5 * math.sqrt(2) + math.sqrt(2) + 5)
    assert sens.attention_output_l1_bound(layer, 2, 2, 2) == pytest.approx(expected, rel=1e-15, abs=0.0)


def test_a_zero_block_bounds_by_zero_even_when_its_gain_overflows() -> None:
    """‖γ‖ beyond the float64 range is +inf; a zero W_v (or W_gate) makes the true bound 0, not the NaN of
    0 · inf."""
    huge = [1.5e308, 1.5e308]
    assert sens.rmsnorm_l2_bound(huge) == math.inf
    assert (
        sens.attention_output_l1_bound(_layer(np.zeros((2, 1)), huge, n_heads=1, head_dim=1), 1, 1, 1) == 0.0
    )
    zero_gate = DenseMLP(np.zeros((2, 1)), np.ones((2, 1)), np.ones((1, 2)))
    assert sens.swiglu_down_l1_bound(zero_gate, huge) == 0.0
    assert (
        sens.attention_output_l1_bound(_layer([[1.0], [0.0]], huge, n_heads=1, head_dim=1), 1, 1, 1)
        == math.inf
    )


def test_swiglu_bound_of_a_hand_computed_mlp() -> None:
    """‖W_gate‖₂ = 5, ‖W_up‖₂ = 1, γ = (1, −2): ‖x̂‖₂² ≤ 2 · 4, so Δ₁ = 2 · 5 · 1 · 8 = 80."""
    mlp = DenseMLP(np.array([[3.0], [4.0]]), np.array([[1.0], [0.0]]), np.ones((1, 2)))
    assert sens.swiglu_down_l1_bound(mlp, [1.0, -2.0]) == pytest.approx(80.0, rel=1e-15, abs=0.0)


def test_normalize_rows_of_a_hand_computed_row_with_and_without_eps() -> None:
    """(3, 4): mean of squares 12.5; γ = (1, 2)."""
    x = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(
        sens.normalize_rows(x, [1.0, 2.0]), [[3 / 12.5**0.5, 8 / 12.5**0.5]], rtol=1e-15
    )
    np.testing.assert_allclose(
        sens.normalize_rows(x, [1.0, 2.0], 0.5), [[3 / 13**0.5, 8 / 13**0.5]], rtol=1e-15
    )
    with_zero = sens.normalize_rows(np.array([[0.0, 0.0], [3.0, 4.0]]), [1.0, 2.0], 0.5)
    assert with_zero[0].tolist() == [0.0, 0.0]


_ROWS = np.array([[0.0, 0.0], [1.0, 2.0], [-3.0, 1.0], [2.0, -2.0]])  # largest: rows 2 and 3, 5 + 3 = 8


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 4, 9])
def test_diameter_of_hand_computed_rows_and_its_pair_in_every_chunking(
    backend: str, chunk: int | None
) -> None:
    value, i, j = sens.l1_diameter(_ROWS, backend=backend, chunk_size=chunk, return_pair=True)  # type: ignore[call-overload]
    assert value == 8.0 and {i, j} == {2, 3}
    assert sens.l1_diameter(_ROWS[:1], backend=backend, return_pair=True) == (0.0, 0, 0)  # type: ignore[call-overload]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_diameter_keeps_every_row_the_float32_screen_might_misrank(backend: str) -> None:
    """e = 2⁻²³ (float32's step at 1): rows 0 and 2 are 1 + 0.85e apart, rows 1 and 2 only 1 + 0.6e, but in
    float32 the first distance rounds to 1 and the second to 1 + e. The screen ranks row 1 first; the exact
    pass must still find rows 0 and 2, kept because they lie within the screen's error bound."""
    e = 2.0**-23
    x = np.array([[1 + 0.4 * e, 0.45 * e], [1 + 0.6 * e, 0.0], [0.0, 0.0]])
    assert sens.l1_diameter(x, backend=backend, return_pair=True) == ((1 + 0.4 * e) + 0.45 * e, 0, 2)  # type: ignore[call-overload]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1e30, 1e300])
def test_diameter_of_rows_far_outside_float32s_range(backend: str, scale: float) -> None:
    """The screen runs on the rows scaled by a power of two: neither 1e300 (inf in float32) nor 1e-300
    (0 in float32) loses the maximising pair."""
    value, i, j = sens.l1_diameter(_ROWS * scale, backend=backend, return_pair=True)  # type: ignore[call-overload]
    assert value == pytest.approx(8.0 * scale, rel=1e-15, abs=0.0) and {i, j} == {2, 3}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_diameter_beyond_the_float64_range_is_inf(backend: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sens.l1_diameter(np.array([[1e308], [-1e308], [0.0]]), backend=backend) == math.inf  # type: ignore[call-overload]


def test_normalize_rows_at_any_scale_and_rank() -> None:
    """Rows of 1e200 and 1e-200 normalize like rows of 1 (their squares would overflow or vanish), with and
    without eps (√eps against 1e200·√q: eps is negligible there); rows of any rank; no rows at all."""
    g = np.array([1.0, -2.0, 0.5])
    x = np.array([[3.0, 4.0, 12.0]])
    want = sens.normalize_rows(x, g)
    np.testing.assert_allclose(want, g * x / np.sqrt(np.mean(x * x)), rtol=1e-15)
    for scale in (1e200, 1e-200):
        np.testing.assert_allclose(sens.normalize_rows(x * scale, g), want, rtol=1e-15)
    np.testing.assert_allclose(sens.normalize_rows(x * 1e200, g, 1e-6), want, rtol=1e-15)
    assert np.all(np.abs(sens.normalize_rows(x * 1e-200, g, 1e-6)) < 1e-190)  # eps dominates a tiny row
    stacked = sens.normalize_rows(np.stack([x, 2 * x]), g)
    assert stacked.shape == (2, 1, 3)
    np.testing.assert_allclose(stacked, np.stack([want, want]), rtol=1e-15)
    np.testing.assert_array_equal(sens.normalize_rows(x[0], g), want[0])
    assert sens.normalize_rows(np.zeros((0, 3)), g).shape == (0, 3)


def test_norms_of_gains_beyond_the_square_root_of_the_float64_range() -> None:
    """‖(1e200, 1e200)‖₂ = √2·1e200 (its squares overflow); an infinite gain gives an infinite bound."""
    g = [1e200, -1e200]
    assert sens.rmsnorm_l1_bound(g) == pytest.approx(2e200, rel=1e-15, abs=0.0)
    assert sens.rmsnorm_l2_bound(g) == pytest.approx(math.sqrt(2) * 1e200, rel=1e-15, abs=0.0)
    assert sens.rmsnorm_l1_bound([0.0, 0.0]) == 0.0
    assert sens.rmsnorm_sensitivity([1.5e308, 1.5e308]) == math.inf


_L0 = sens.LayerSensitivities(0, 1.0, 1.0, 1.0, 1.0)


def _summary(**fields: Any) -> sens.ModelSensitivities:
    base: dict[str, Any] = dict(name="m", hidden_size=2, vocab_size=3, n_layers=1, layers=(_L0,), lm_head=1.0)
    return sens.ModelSensitivities(**{**base, **fields})


REFUSALS += [
    ("summary-name", lambda: _summary(name=3), ConfigError, "name must be a string, got int 3"),
    (
        "summary-layers-count",
        lambda: _summary(layers=(_L0, _L0)),
        ConfigError,
        "layers must be a tuple of n_layers = 1 LayerSensitivities, got 2 entries",
    ),
    (
        "summary-layers-type",
        lambda: _summary(layers="x"),
        ConfigError,
        "layers must be a tuple of n_layers = 1 LayerSensitivities, got str",
    ),
    (
        "summary-layer-type",
        lambda: _summary(layers=(1,)),
        ConfigError,
        "layers must hold LayerSensitivities, got int",
    ),
    (
        "summary-layer-order",
        lambda: _summary(layers=(sens.LayerSensitivities(1, 1.0, 1.0, 1.0, 1.0),)),
        ConfigError,
        "layers must be in block order: layers[0] is for layer 1",
    ),
    (
        "summary-notes",
        lambda: _summary(notes=("a", 3)),
        ConfigError,
        "notes must be a tuple of strings, got ('a', 3)",
    ),
    (
        "summary-notes-str",
        lambda: _summary(notes="ab"),
        ConfigError,
        "notes must be a tuple of strings, got 'ab'",
    ),
    (
        "summary-lm-head",
        lambda: _summary(lm_head=math.nan),
        NonFiniteError,
        "lm_head must be a number >= 0 (inf allowed), got nan",
    ),
    (
        "summary-normalized",
        lambda: _summary(embed_normalized_diameter=math.nan),
        NonFiniteError,
        "embed_normalized_diameter must be a number >= 0 (inf allowed), got nan",
    ),
    (
        "summary-raw",
        lambda: _summary(embed_raw_diameter=-1.0),
        ConfigError,
        "embed_raw_diameter must be >= 0, got -1.0",
    ),
    ("summary-experts", lambda: _summary(n_experts=-1), ConfigError, "n_experts must be >= 0, got -1"),
    ("summary-hidden", lambda: _summary(hidden_size=0), ConfigError, "hidden_size must be >= 1, got 0"),
    ("summary-vocab", lambda: _summary(vocab_size=0), ConfigError, "vocab_size must be >= 1, got 0"),
    ("summary-n-layers", lambda: _summary(n_layers=0), ConfigError, "n_layers must be >= 1, got 0"),
    (
        "layer-index",
        lambda: sens.LayerSensitivities(-1, 1.0, 1.0, 1.0, 1.0),
        ConfigError,
        "layer must be >= 0, got -1",
    ),
    (
        "layer-o",
        lambda: sens.LayerSensitivities(0, 1.0, -1.0, 1.0, 1.0),
        ConfigError,
        "o must be >= 0, got -1.0",
    ),
    (
        "layer-gate-up",
        lambda: sens.LayerSensitivities(0, 1.0, 1.0, math.nan, 1.0),
        NonFiniteError,
        "gate_up must be a number >= 0 (inf allowed), got nan",
    ),
    (
        "layer-down",
        lambda: sens.LayerSensitivities(0, 1.0, 1.0, 1.0, math.nan),
        NonFiniteError,
        "down must be a number >= 0 (inf allowed), got nan",
    ),
]


def test_a_summary_takes_infinite_bounds_and_lists_and_writes_itself_as_json_ready_lists_and_dicts() -> None:
    inf_layer = sens.LayerSensitivities(0, math.inf, math.inf, math.inf, math.inf)
    s = _summary(layers=(inf_layer,), lm_head=math.inf, embed_raw_diameter=math.inf, notes=("a",))
    assert s.to_dict() == {
        "name": "m",
        "hidden_size": 2,
        "vocab_size": 3,
        "n_layers": 1,
        "layers": [{"layer": 0, "qkv": math.inf, "o": math.inf, "gate_up": math.inf, "down": math.inf}],
        "lm_head": math.inf,
        "embed_normalized_diameter": None,
        "embed_raw_diameter": math.inf,
        "notes": ["a"],
        "n_experts": 0,
    }
    listed = _summary(layers=[_L0], notes=["a"]).to_dict()
    assert listed["layers"] == [dataclasses.asdict(_L0)] and listed["notes"] == ["a"]
    assert not s.is_moe and _summary(n_experts=1).is_moe
    assert s.block1_qkv == math.inf and _summary(embed_normalized_diameter=0.5).block1_qkv == 0.5


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_model_sensitivities_are_the_bounds_of_each_block(moe: bool) -> None:
    """Every field from the function that bounds it; an MoE block's down stage the largest over its experts;
    the exact diameters those of the normalized and raw embedding rows, by brute force."""
    w = tiny_weights(0, moe=moe)
    c = w.config
    s = sens.model_sensitivities(w, backend="numpy")
    assert (s.name, s.hidden_size, s.vocab_size, s.n_layers, s.n_experts) == (
        c.name,
        c.hidden_size,
        c.vocab_size,
        c.n_layers,
        c.n_experts,
    )
    for i, (ls, lw) in enumerate(zip(s.layers, w.layers, strict=True)):
        experts = lw.mlp.experts if isinstance(lw.mlp, MoEMLP) else [lw.mlp]
        assert len(experts) == (c.n_experts if moe else 1)
        downs = [sens.swiglu_down_l1_bound(ex, lw.mlp_norm) for ex in experts]
        assert ls == sens.LayerSensitivities(
            layer=i,
            qkv=sens.rmsnorm_sensitivity(lw.attn_norm),
            o=sens.attention_output_l1_bound(lw, c.n_heads, c.n_kv_heads, c.head_dim),
            gate_up=sens.rmsnorm_sensitivity(lw.mlp_norm),
            down=max(downs),
        )
        assert len(set(downs)) == len(downs)  # the experts differ: the max is a choice
    assert s.lm_head == sens.rmsnorm_sensitivity(w.final_norm)
    normed = sens.normalize_rows(w.embed, w.layers[0].attn_norm, c.rms_eps)
    for rows, got in ((normed, s.embed_normalized_diameter), (w.embed, s.embed_raw_diameter)):
        brute = np.abs(rows[:, None, :] - rows[None, :, :]).sum(-1).max()
        assert got == pytest.approx(brute, rel=1e-13, abs=0.0)
    assert s.embed_normalized_diameter != s.embed_raw_diameter
    moe_note = "MoE: down-stage Δ₁ is the max over experts; the routing choice itself is not covered"
    assert s.notes == ("bounds are data-independent (valid for every input row)",) + (
        (moe_note,) if moe else ()
    )
    bound = sens.model_sensitivities(w, embedding="bound")
    assert bound.embed_normalized_diameter is None and bound.embed_raw_diameter is None
    assert bound.layers == s.layers


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_ties_give_the_first_pair_in_row_order(backend: str) -> None:
    """Rows 0 and 1, and rows 1 and 2, are both 1 apart: the first pair found, (0, 1), is kept."""
    rows = np.array([[0.0], [1.0], [0.0]])
    assert sens.l1_diameter(rows, backend=backend, chunk_size=1, return_pair=True) == (1.0, 0, 1)  # type: ignore[call-overload]
    assert sens.l1_diameter(rows, backend=backend, return_pair=True) == (1.0, 0, 1)  # type: ignore[call-overload]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_identical_rows_have_diameter_zero_and_a_pair_of_two_rows(backend: str, chunk: int | None) -> None:
    """No two rows differ: the diameter is 0 and the pair two distinct rows i < j, on both backends (the
    numpy path returned the diagonal pair (0, 0) before)."""
    rows = np.ones((3, 2))
    assert sens.l1_diameter(rows, backend=backend, chunk_size=chunk, return_pair=True) == (0.0, 0, 1)  # type: ignore[call-overload]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_screen_ranks_rows_by_l1_not_l2(backend: str) -> None:
    """Rows 0 and 1 differ by (3, 3): L1 6, the largest, but L2 only 4.24; rows 2 and 3 by (5.8, 0): L1 5.8,
    the largest L2. A screen in L2 would keep only row 2 and return 5.8."""
    rows = np.array([[0.0, 0.0], [3.0, 3.0], [-1.4, 1.5], [4.4, 1.5]])
    value, i, j = sens.l1_diameter(rows, backend=backend, return_pair=True)  # type: ignore[call-overload]
    assert (value, i, j) == (6.0, 0, 1)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_row_far_from_all_others_but_one_is_kept(backend: str) -> None:
    """Row 0 (100) is farthest from row 3 (−50): 150. Rows 2 and 3 are 100 apart; row 0's distance to row 1 is
    100 too, so every row but 0's largest distance is at most 100 (a row 0 the screen never wrote reads 0)."""
    rows = np.array([[100.0], [0.0], [50.0], [-50.0]])
    assert sens.l1_diameter(rows, backend=backend, return_pair=True) == (150.0, 0, 3)  # type: ignore[call-overload]


def _screen_tolerance(x: Any) -> float:
    """The screen's documented error bound on rows x: (d + 2)·2⁻²⁴·2·max‖x_s‖₁ + 2d·2⁻¹²⁶, with x_s the rows
    scaled by 2^k so that max |x| lies in [2⁴⁰, 2⁴¹), in float32, and their L1 norms summed in float64."""
    k = 41 - math.frexp(float(np.max(np.abs(x))))[1]
    xs = np.ldexp(x, k).astype(np.float32)
    l1max = float(np.max(np.sum(np.abs(xs), axis=1, dtype=np.float64)))
    d = int(x.shape[1])
    return (d + 2) * 2.0**-24 * 2.0 * l1max + 2.0 * d * 2.0**-126


def _screened(monkeypatch: pytest.MonkeyPatch, rowmax: list[float]) -> None:
    """Replace the float32 screen's distances by a float64 table whose row maxima are ``rowmax``."""
    import torch

    real = torch.cdist

    def cdist(a: Any, b: Any, p: float = 2.0) -> Any:
        assert p == 1.0
        table = real(a.double(), b.double(), p=1.0) * 0.0
        for i, m in enumerate(rowmax[: a.shape[0]]):
            table[i, -1] = m
        return table

    monkeypatch.setattr(torch, "cdist", cdist)


def test_a_row_the_screen_puts_exactly_twice_its_bound_below_the_best_is_still_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each screened distance may be off by the bound T, so a row screened at max − 2T may hold the largest
    distance, and it must stay a candidate (≥, the whole 2T). Rows 0 and 2 are farthest apart (2.5 + 2⁻³⁰);
    the screen is made to rank row 1 first and row 0 exactly 2T below it. Row 0's L1 norm in float32 would
    round its 2⁻³⁰ away, so T here is the float64 sum's."""
    x = np.array([[1.5, 2.0**-30], [0.0, 0.0], [-1.0, 0.0]])
    t = _screen_tolerance(x)
    m = 3.0 * 2.0**40
    _screened(monkeypatch, [m - 2.0 * t, m, 0.0])
    assert sens.l1_diameter(x, backend="torch", return_pair=True) == (2.5 + 2.0**-30, 0, 2)


def test_a_screen_that_is_not_finite_checks_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.array([[1.5, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    _screened(monkeypatch, [0.0, math.nan, 0.0])
    assert sens.l1_diameter(x, backend="torch", return_pair=True) == (2.5, 0, 2)


def test_the_bounds_do_not_depend_on_numpy_s_error_state() -> None:
    """Underflow in the scaling and overflow to inf are expected (their correct roundings): with numpy set to
    raise on every floating-point error, the results are the same."""
    g = np.array([1.0, -2.0, 0.5])
    x = np.array([[3.0, 4.0, 12.0]])
    tiny_rows = np.array([[1e-300, 0.0], [0.0, 5e-324], [-1e-300, 1e-310]])
    with np.errstate(all="raise"):
        np.testing.assert_allclose(sens.normalize_rows(x * 1e-200, g), sens.normalize_rows(x, g), rtol=1e-15)
        np.testing.assert_allclose(
            sens.normalize_rows(x * 1e200, g, 1e-6), sens.normalize_rows(x, g), rtol=1e-15
        )
        for backend in ("numpy", "torch"):
            assert sens.l1_diameter(tiny_rows, backend=backend) == 2e-300 + 1e-310
            assert sens.l1_diameter(np.array([[1e308], [-1e308]]), backend=backend) == math.inf
            # scaled down by 2^-955 for the screen, 1e-300 underflows to 0 there: silently
            assert sens.l1_diameter(np.array([[1e300, 1e-300], [0.0, 0.0]]), backend=backend) == 1e300


def test_a_device_is_named_by_a_string_and_an_unusable_one_is_refused_before_any_work() -> None:
    import torch

    assert sens.l1_diameter(_ROWS, backend="torch", device="cpu") == 8.0
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        pytest.skip("an XPU is available here")
    with pytest.raises(ConfigError, match=r"^device 'xpu' is not a usable torch device: \S"):
        sens.l1_diameter(_ROWS, backend="torch", device="xpu")


def test_operator_norms_are_the_largest_singular_value_in_float64() -> None:
    """W_gate = diag(3, 4): ‖W_gate‖₂ = 4 (its Frobenius norm is 5); γ = (1, 1): ‖x̂‖₂² ≤ 2, so with
    W_up = I, Δ₁ = 2 · 4 · 1 · 2 = 16. In float32 weights the norms are still taken in float64."""
    mlp = DenseMLP(np.diag([3.0, 4.0]), np.eye(2), np.eye(2))
    assert sens.swiglu_down_l1_bound(mlp, [1.0, 1.0]) == pytest.approx(16.0, rel=1e-15, abs=0.0)
    rng = np.random.default_rng(0)
    w32 = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2)]
    want = 2.0 * math.prod(float(np.linalg.svd(w.astype(np.float64), compute_uv=False)[0]) for w in w32) * 4
    got = sens.swiglu_down_l1_bound(DenseMLP(w32[0], w32[1], np.ones((3, 4), np.float32)), np.ones(4))
    assert got == pytest.approx(want, rel=1e-14, abs=0.0)
    layer = _layer(np.diag([3.0, 4.0]), [1.0, 1.0], n_heads=1, head_dim=2)
    assert sens.attention_output_l1_bound(layer, 1, 1, 2) == pytest.approx(16.0, rel=1e-15, abs=0.0)


REFUSALS += [
    (
        "gamma-2d",
        lambda: sens.rmsnorm_l1_bound(np.ones((2, 2))),
        ShapeError,
        "gamma must have 1 dimensions, got shape (2, 2)",
    ),
]


def _lw(**fields: Any) -> LayerWeights:
    return dataclasses.replace(_LW, **fields)


def _dense(gate: Any, up: Any) -> DenseMLP:
    return DenseMLP(np.asarray(gate, dtype=np.float64), np.asarray(up, dtype=np.float64), np.ones((1, 2)))


REFUSALS += [
    (
        "att-heads",
        lambda: sens.attention_output_l1_bound(_LW, 0, 2, 4),
        ConfigError,
        "n_heads must be >= 1, got 0",
    ),
    (
        "att-kv-heads",
        lambda: sens.attention_output_l1_bound(_LW, 4, 0, 4),
        ConfigError,
        "n_kv_heads must be >= 1, got 0",
    ),
    (
        "att-head-dim",
        lambda: sens.attention_output_l1_bound(_LW, 4, 2, 0),
        ConfigError,
        "head_dim must be >= 1, got 0",
    ),
    (
        "att-wv-rank",
        lambda: sens.attention_output_l1_bound(_lw(wv=np.ones(16)), 4, 2, 4),
        ShapeError,
        "layer.wv must have 2 dimensions, got shape (16,)",
    ),
    (
        "att-wq-rank",
        lambda: sens.attention_output_l1_bound(_lw(wq=np.ones(16)), 4, 2, 4),
        ShapeError,
        "layer.wq must have 2 dimensions, got shape (16,)",
    ),
    (
        "att-bv-rank",
        lambda: sens.attention_output_l1_bound(_lw(bv=np.ones((8, 1))), 4, 2, 4),
        ShapeError,
        "layer.bv must have 1 dimensions, got shape (8, 1)",
    ),
    (
        "att-bv-length",
        lambda: sens.attention_output_l1_bound(_lw(bv=np.ones(6)), 4, 2, 4),
        ShapeError,
        "layer.bv has length 6, expected n_kv_heads·head_dim = 8",
    ),
    (
        "swiglu-gate-rank",
        lambda: sens.swiglu_down_l1_bound(_dense(np.ones(2), np.ones((2, 1))), np.ones(2)),
        ShapeError,
        "mlp.w_gate must have 2 dimensions, got shape (2,)",
    ),
    (
        "swiglu-up-rank",
        lambda: sens.swiglu_down_l1_bound(_dense(np.ones((2, 1)), np.ones(2)), np.ones(2)),
        ShapeError,
        "mlp.w_up must have 2 dimensions, got shape (2,)",
    ),
    (
        "swiglu-shapes",
        lambda: sens.swiglu_down_l1_bound(_dense(np.ones((2, 1)), np.ones((2, 3))), np.ones(2)),
        ShapeError,
        "mlp.w_gate (2, 1) and mlp.w_up (2, 3) must both be (d, f) with d = len(mlp_norm) = 2",
    ),
    (
        "swiglu-width",
        lambda: sens.swiglu_down_l1_bound(_dense(np.ones((3, 1)), np.ones((3, 1))), np.ones(2)),
        ShapeError,
        "mlp.w_gate (3, 1) and mlp.w_up (3, 1) must both be (d, f) with d = len(mlp_norm) = 2",
    ),
    (
        "norm-dtype",
        lambda: sens.normalize_rows(np.array([["a", "b"]]), np.ones(2)),
        DTypeError,
        "x must be a floating-point array, got dtype <U1",
    ),
    (
        "norm-nan",
        lambda: sens.normalize_rows(np.array([[math.nan, 1.0]]), np.ones(2)),
        NonFiniteError,
        "x holds NaN or Inf",
    ),
    (
        "norm-eps",
        lambda: sens.normalize_rows(np.ones((1, 2)), np.ones(2), -1.0),
        ConfigError,
        "eps must be >= 0, got -1.0",
    ),
    (
        "diam-rank",
        lambda: sens.l1_diameter(np.zeros(2)),
        ShapeError,
        "rows must have 2 dimensions, got shape (2,)",
    ),
    (
        "diam-dtype",
        lambda: sens.l1_diameter(np.array([["a"]])),
        DTypeError,
        "rows must be a floating-point array, got dtype <U1",
    ),
    (
        "diam-chunk",
        lambda: sens.l1_diameter(_Z2, chunk_size=0),
        ConfigError,
        "chunk_size must be >= 1, got 0",
    ),
]


def test_without_torch_the_numpy_backend_runs_and_torch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sens, "_torch_available", lambda: False)
    assert sens.l1_diameter(_ROWS, backend="numpy") == 8.0
    assert sens.l1_diameter(_ROWS) == 8.0  # auto: numpy
    with refused(ConfigError, "backend='torch' needs torch, which is not installed (use backend='numpy')"):
        sens.l1_diameter(_ROWS, backend="torch")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("this backend must not run")


def test_each_backend_runs_its_own_diameter(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "numpy" never runs the torch screen; "auto" runs it when torch is installed (here it is)."""
    with monkeypatch.context() as m:
        m.setattr(sens, "_diameter_torch", _refuse)
        assert sens.l1_diameter(_ROWS, backend="numpy") == 8.0
    with monkeypatch.context() as m:
        m.setattr(sens, "_diameter_numpy", _refuse)
        assert sens.l1_diameter(_ROWS) == 8.0
        assert sens.l1_diameter(_ROWS, backend="torch") == 8.0


def test_the_embedding_diameter_is_of_the_normalized_rows_by_default_on_the_backend_asked_for() -> None:
    c = _W.config
    normed = sens.normalize_rows(_W.embed, _W.layers[0].attn_norm, c.rms_eps)
    assert sens.embedding_l1_diameter(_W) == sens.l1_diameter(normed, backend="numpy")
    assert sens.embedding_l1_diameter(_W, backend="numpy", device="xpu") > 0  # numpy reads no device
    with pytest.raises(ConfigError, match=r"^device 'xpu' is not a usable torch device: "):
        sens.embedding_l1_diameter(_W, backend="torch", device="xpu")


def test_model_sensitivities_compute_both_diameters_on_the_backend_and_device_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bool, str, str | None]] = []

    def diameter(
        weights: Any, *, normalized: bool = True, backend: str = "auto", device: str | None = None
    ) -> float:
        calls.append((normalized, backend, device))
        return 1.0 if normalized else 2.0

    monkeypatch.setattr(sens, "embedding_l1_diameter", diameter)
    s = sens.model_sensitivities(_W, backend="torch", device="meta")
    assert calls == [(True, "torch", "meta"), (False, "torch", "meta")]
    assert (s.embed_normalized_diameter, s.embed_raw_diameter) == (1.0, 2.0)
    calls.clear()
    sens.model_sensitivities(_W, embedding="bound", backend="torch")
    assert calls == []


def test_normalize_rows_with_eps_one_and_rows_of_very_different_scales() -> None:
    """eps = 1: √(12.5 + 1); rows of 1e200 and 1e-200 in one array each normalize by their own scale; and a
    row whose entries differ by 200 orders of magnitude loses nothing to underflow, under numpy's raise."""
    x = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(
        sens.normalize_rows(x, [1.0, 2.0], 1.0), [[3 / 13.5**0.5, 8 / 13.5**0.5]], rtol=1e-15
    )
    want = sens.normalize_rows(x, [1.0, 2.0])
    both = sens.normalize_rows(np.concatenate([x * 1e200, x * 1e-200]), [1.0, 2.0])
    np.testing.assert_allclose(both, np.concatenate([want, want]), rtol=1e-15)
    assert sens.normalize_rows(np.zeros((0, 1, 2)), [1.0, 2.0]).shape == (0, 1, 2)
    np.testing.assert_array_equal(sens.normalize_rows(np.zeros((1, 2)), [1.0, 2.0], 1.0), [[0.0, 0.0]])
    with np.errstate(all="raise"):
        out = sens.normalize_rows(np.array([[1.0, 1e-200]]), [1.0, 1e-200])
        np.testing.assert_allclose(out, [[math.sqrt(2), 0.0]], rtol=1e-15, atol=1e-300)
        with refused(NonFiniteError, "RMSNorm output exceeds the float64 range (gamma too large)"):
            sens.normalize_rows(np.array([[1.0, 0.0]]), np.full(2, 1.5e308))


def test_rows_wider_than_a_slice_of_the_float32_copy_are_all_screened() -> None:
    """With 2²⁰ columns the float32 copy is filled 4 rows at a time (2²² entries): rows 7 and 8, the farthest
    apart (2²¹), are in the third slice, and a screen that missed them would see them near nothing."""
    d = 2**20
    x = np.zeros((9, d))
    x[0], x[1], x[7], x[8] = 0.5, -0.5, 1.0, -1.0
    assert sens.l1_diameter(x, backend="torch", return_pair=True) == (2.0 * d, 7, 8)


test_each_refusal_has_its_class_and_whole_message = refusal_test(REFUSALS)

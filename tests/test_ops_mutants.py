"""Tests that kill mutants of :mod:`scx_ref.ops` (the numpy reference's operations) that survived ``python -m
mutation.run ops`` (mutation/REPORT_ops.md): each refusal's class and whole message, RMSNorm of rows of any
rank, of float16 rows past 256 and of integer rows, softmax on either axis and in float16, the embedding's
vocabulary, and the routing of rows of very different scales."""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError, VocabularyError
from tests.refusals import Refusal, refusal_test
from tests.tiny import tiny_weights


def test_softmax_rows_sum_to_one_and_keep_order() -> None:
    x = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    p = ops.softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-15)
    assert np.all(np.diff(p[0]) > 0) and np.allclose(p[1], 1 / 3)


REFUSALS: list[Refusal] = [
    (
        "embed-1d",
        lambda: ops.embed([0], np.zeros(3)),
        ShapeError,
        "an embedding table must be vocabulary × d, got shape (3,)",
    ),
    (
        "rms-eps",
        lambda: ops.rms_norm(np.ones((1, 2)), np.ones(2), -1.0),
        ConfigError,
        "RMSNorm eps must be >= 0, got -1.0",
    ),
    (
        "rms-rows",
        lambda: ops.rms_norm(np.array([["a", "b"]]), np.ones(2), 1e-6),
        DTypeError,
        "RMSNorm: the rows must be a real array, got dtype <U1",
    ),
    (
        "rms-gains",
        lambda: ops.rms_norm(np.ones((1, 2)), np.array(["a", "b"]), 1e-6),
        DTypeError,
        "RMSNorm: the gains must be a real array, got dtype <U1",
    ),
    (
        "rms-shape",
        lambda: ops.rms_norm(np.ones((1, 2)), np.ones(3), 1e-6),
        ShapeError,
        "RMSNorm of rows (1, 2) with gains (3,): one gain per column",
    ),
    (
        "rms-0d",
        lambda: ops.rms_norm(np.float64(1.0), np.ones(1), 1e-6),
        ShapeError,
        "RMSNorm of rows () with gains (1,): one gain per column",
    ),
    (
        "linear-rows",
        lambda: ops.linear(np.array([["a"]]), np.ones((1, 1))),
        DTypeError,
        "linear: the rows must be a real array, got dtype <U1",
    ),
    (
        "linear-weights",
        lambda: ops.linear(np.ones((1, 1)), np.array([[True]])),
        DTypeError,
        "linear: the weight matrix must be a real array, got dtype bool",
    ),
    (
        "linear-bias-dtype",
        lambda: ops.linear(np.ones((1, 1)), np.ones((1, 1)), np.array(["a"])),
        DTypeError,
        "linear: the bias must be a real array, got dtype <U1",
    ),
    (
        "linear-widths",
        lambda: ops.linear(np.ones((1, 2)), np.ones((3, 1))),
        ShapeError,
        "cannot multiply rows of shape (1, 2) by a matrix of shape (3, 1) (in × out)",
    ),
    (
        "linear-1d-matrix",
        lambda: ops.linear(np.ones((1, 2)), np.ones(2)),
        ShapeError,
        "cannot multiply rows of shape (1, 2) by a matrix of shape (2,) (in × out)",
    ),
    (
        "linear-0d-rows",
        lambda: ops.linear(np.float64(1), np.ones((1, 1))),
        ShapeError,
        "cannot multiply rows of shape () by a matrix of shape (1, 1) (in × out)",
    ),
    (
        "linear-bias-shape",
        lambda: ops.linear(np.ones((1, 2)), np.ones((2, 3)), np.ones(2)),
        ShapeError,
        "a bias of shape (2,) for a matrix of shape (2, 3) (in × out)",
    ),
    (
        "route-dtype",
        lambda: ops.route(np.array([["a"]]), 1),
        DTypeError,
        "router logits must be a real array, got dtype <U1",
    ),
    (
        "route-1d",
        lambda: ops.route(np.ones(3), 1),
        ShapeError,
        "router logits must be rows × experts (at least one), got shape (3,)",
    ),
    (
        "route-no-expert",
        lambda: ops.route(np.ones((2, 0)), 1),
        ShapeError,
        "router logits must be rows × experts (at least one), got shape (2, 0)",
    ),
    ("route-k-above", lambda: ops.route(np.ones((2, 3)), 4), ConfigError, "top_k must lie in [1, 3], got 4"),
    ("route-k-zero", lambda: ops.route(np.ones((2, 3)), 0), ConfigError, "top_k must lie in [1, 3], got 0"),
    (
        "route-nan",
        lambda: ops.route(np.array([[np.nan, 1.0]]), 1),
        NonFiniteError,
        "router logits hold NaN or ±Inf",
    ),
    (
        "rope-dtype",
        lambda: ops.rope_cos_sin(np.arange(2), 4, 1e4, np.int32),
        DTypeError,
        "RoPE dtype must be a floating numpy dtype, got int32",
    ),
    (
        "rope-odd",
        lambda: ops.rope_cos_sin(np.arange(2), 3, 1e4),
        ShapeError,
        "RoPE needs an even head_dim, got 3",
    ),
    (
        "rope-negative",
        lambda: ops.rope_cos_sin(np.arange(2), -2, 1e4),
        ShapeError,
        "RoPE's head_dim must be >= 0, got -2",
    ),
    (
        "rope-theta",
        lambda: ops.rope_cos_sin(np.arange(2), 4, 0.0),
        ConfigError,
        "RoPE theta must be > 0, got 0.0",
    ),
    (
        "rope-positions-2d",
        lambda: ops.rope_cos_sin(np.zeros((2, 2), dtype=np.int64), 4, 1e4),
        ShapeError,
        "RoPE positions must be one-dimensional, got shape (2, 2)",
    ),
    (
        "rope-positions-str",
        lambda: ops.rope_cos_sin(np.array(["a"]), 4, 1e4),
        DTypeError,
        "RoPE positions must be numbers, got dtype <U1",
    ),
    (
        "apply-rope-int",
        lambda: ops.apply_rope(np.ones((1, 1, 2), dtype=np.int64), np.arange(1), 1e4),
        DTypeError,
        "RoPE input must be a floating-point array, got dtype int64",
    ),
    (
        "apply-rope-2d",
        lambda: ops.apply_rope(np.ones((1, 2)), np.arange(1), 1e4),
        ShapeError,
        "RoPE input must be rows × heads × head_dim, got (1, 2)",
    ),
    (
        "apply-rope-positions",
        lambda: ops.apply_rope(np.ones((2, 1, 2)), np.arange(1), 1e4),
        ShapeError,
        "RoPE needs one position per row: 2 rows, positions (1,)",
    ),
]


_W = tiny_weights(7)
_MOE = tiny_weights(7, moe=True)
_MOE_MLP: Any = _MOE.layers[0].mlp
_X = np.ones((2, _W.config.hidden_size))
_LW = _W.layers[0]

REFUSALS += [
    ("qkv-heads", lambda: ops.qkv(_X, _LW, 0, 2, 4), ShapeError, "n_heads must be >= 1, got 0"),
    (
        "qkv-heads-float",
        lambda: ops.qkv(_X, _LW, 2.0, 2, 4),  # type: ignore[arg-type]
        ShapeError,
        "n_heads must be an integer, got float 2.0",
    ),
    ("qkv-kv-heads", lambda: ops.qkv(_X, _LW, 4, 0, 4), ShapeError, "n_kv_heads must be >= 1, got 0"),
    (
        "qkv-kv-heads-float",
        lambda: ops.qkv(_X, _LW, 4, 2.0, 4),  # type: ignore[arg-type]
        ShapeError,
        "n_kv_heads must be an integer, got float 2.0",
    ),
    ("qkv-head-dim", lambda: ops.qkv(_X, _LW, 4, 2, 0), ShapeError, "head_dim must be >= 1, got 0"),
    (
        "qkv-1d",
        lambda: ops.qkv(_X[0], _LW, 4, 2, 4),
        ShapeError,
        "Q/K/V projections need rows × d, got shape (16,)",
    ),
    (
        "qkv-split",
        lambda: ops.qkv(_X, _LW, 8, 2, 2),
        ShapeError,
        "Q/K projections of widths 16/8 do not split into 8/2 heads of 2",
    ),
    (
        "softmax-axis",
        lambda: ops.softmax(np.ones((2, 3)), 2),
        ShapeError,
        "softmax needs a non-empty axis 2, got shape (2, 3)",
    ),
    (
        "softmax-axis-neg",
        lambda: ops.softmax(np.ones((2, 3)), -3),
        ShapeError,
        "softmax needs a non-empty axis -3, got shape (2, 3)",
    ),
    (
        "softmax-axis-float",
        lambda: ops.softmax(np.ones((2, 3)), 1.0),  # type: ignore[arg-type]
        ShapeError,
        "softmax axis must be an integer, got float 1.0",
    ),
    (
        "softmax-empty",
        lambda: ops.softmax(np.ones((2, 0))),
        ShapeError,
        "softmax needs a non-empty axis -1, got shape (2, 0)",
    ),
    (
        "softmax-dtype",
        lambda: ops.softmax(np.array(["a"])),
        DTypeError,
        "softmax needs a real array, got dtype <U1",
    ),
    (
        "moe-k-above",
        lambda: ops.moe(_X, _MOE_MLP, 5),
        ConfigError,
        "top_k must lie in [1, 4], got 5",
    ),
    (
        "moe-k-zero",
        lambda: ops.moe(_X, _MOE_MLP, 0),
        ConfigError,
        "top_k must lie in [1, 4], got 0",
    ),
    (
        "moe-k-float",
        lambda: ops.moe(_X, _MOE_MLP, 1.0),  # type: ignore[arg-type]
        ConfigError,
        "top_k must be an integer, got float 1.0",
    ),
    (
        "route-k-float",
        lambda: ops.route(np.ones((2, 3)), 1.0),  # type: ignore[arg-type]
        ConfigError,
        "top_k must be an integer, got float 1.0",
    ),
]


def test_softmax_takes_its_first_and_last_axes_and_float16_wide() -> None:
    x = np.array([[0.0, 1.0], [2.0, 4.0]])
    np.testing.assert_allclose(ops.softmax(x, -2).sum(axis=0), 1.0)
    np.testing.assert_allclose(ops.softmax(x, 1).sum(axis=1), 1.0)
    big = np.full((1, 70_000), 12.0, dtype=np.float16)  # Σ exp(0) = 70 000 overflows float16
    p = ops.softmax(big)
    assert p.dtype == np.float16 and np.all(p > 0)


def _rms64(x: Any, gamma: Any, eps: float) -> Any:
    x = np.asarray(x, dtype=np.float64)
    return np.asarray(gamma, dtype=np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)], ids=["row", "rows", "rows-heads"])
def test_rms_norm_normalises_each_row_of_any_rank(shape: tuple[int, ...]) -> None:
    """Each row over its last axis (rows of different scales, so a mean over another axis shows)."""
    rng = np.random.default_rng(0)
    gamma = rng.normal(size=4)
    x = rng.normal(size=shape)
    if x.ndim > 1:
        x = x * 10.0 ** np.arange(shape[-2])[:, None]
    out = ops.rms_norm(x, gamma, 1e-6)
    assert out.shape == shape
    np.testing.assert_allclose(out, _rms64(x, gamma, 1e-6), rtol=1e-12)


def test_rms_norm_of_float16_rows_past_256_is_computed_in_float32() -> None:
    """x² overflows float16 past |x| = 256: the row is normalised in float32 and cast back (rows of
    different scales, each normalised by its own mean)."""
    x = np.array([[300.0, -400.0, 500.0], [0.5, 1.0, -0.25]], dtype=np.float16)
    gamma = np.ones(3, dtype=np.float16)
    out = ops.rms_norm(x, gamma, 1e-6)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), _rms64(x, gamma, 1e-6), rtol=2e-3)


def test_rms_norm_of_integer_rows_is_float64() -> None:
    x = np.array([[50_000, -3, 7]], dtype=np.int32)
    out = ops.rms_norm(x, np.ones(3), 0.0)  # type: ignore[arg-type]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, _rms64(x, np.ones(3), 0.0), rtol=1e-15)


def test_embed_refuses_ids_past_the_table_and_takes_none() -> None:
    table = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(ops.embed([2, 0], table), [[4.0, 5.0], [0.0, 1.0]])
    assert ops.embed([], table).shape == (0, 2)
    with pytest.raises(VocabularyError, match=re.escape("token ids must lie in [0, 3), got range [3, 3]")):
        ops.embed([3], table)


def test_route_is_the_renormalised_top_k_of_each_row_without_overflow() -> None:
    """Rows of very different scales (one near 0, one near 1000, logits that overflow exp) route alike:
    the top-k of each row in descending probability, ties to the lower expert id, weights renormalised."""
    logits = np.array([[0.0, 1.0, 1.0, -1.0], [1000.0, 999.0, 1001.0, 1001.0], [800.0, 0.0, 0.0, 0.0]])
    top, weights = ops.route(logits, 2)
    assert top.tolist() == [[1, 2], [2, 3], [0, 1]] and top.dtype == np.int64
    np.testing.assert_allclose(weights[:2], 0.5, rtol=1e-15)
    np.testing.assert_allclose(weights[2], [1.0, 0.0], atol=1e-300)
    assert np.all(np.isfinite(weights))
    top1, w1 = ops.route(logits.astype(np.int64), 1)
    assert top1.tolist() == [[1], [2], [0]] and w1.tolist() == [[1.0], [1.0], [1.0]]


def test_moe_of_integer_rows_is_float64() -> None:
    mlp = _MOE_MLP
    x = np.arange(2 * 16).reshape(2, 16) % 3
    out = ops.moe(x, mlp, 2)  # type: ignore[arg-type]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ops.moe(x.astype(np.float64), mlp, 2), rtol=1e-15)


def test_route_weights_are_the_softmax_of_the_chosen_experts_renormalised() -> None:
    """Bit for bit: the chosen entries of :func:`ops.softmax` over each row, divided by their row's sum."""
    logits = np.random.default_rng(0).normal(size=(64, 8)) * 3
    top, weights = ops.route(logits, 2)
    chosen = np.take_along_axis(ops.softmax(logits), top, axis=-1)
    np.testing.assert_array_equal(weights, chosen / chosen.sum(axis=-1, keepdims=True))


def test_softmax_of_float16_is_computed_in_float32() -> None:
    """A row whose float16 softmax differs by one ulp when computed in float64 instead of float32."""
    x = np.array([[12675, 50663, 48337]], dtype=np.uint16).view(np.float16)
    wide = ops.softmax(x.astype(np.float32)).astype(np.float16)
    assert not np.array_equal(wide, ops.softmax(x.astype(np.float64)).astype(np.float16))
    np.testing.assert_array_equal(ops.softmax(x), wide)
    np.testing.assert_array_equal(ops.softmax(x.T, -2), wide.T)


def test_moe_in_float32_adds_each_experts_rounded_output_in_float32() -> None:
    """ "The sum in x's dtype": each chosen expert's weighted output is rounded to float32 and added to a
    float32 sum, in expert order (one row, so each expert sees the same rows as here)."""
    x = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    top, weights = ops.route(ops.linear(x, _MOE_MLP.router), 2)
    parts = [
        weights[0, slot] * ops.swiglu(x, _MOE_MLP.experts[e])
        for e, slot in sorted((int(e), slot) for slot, e in enumerate(top[0]))
    ]
    expected = np.zeros_like(x) + parts[0].astype(np.float32) + parts[1].astype(np.float32)
    assert not np.array_equal(
        expected, (np.zeros_like(x) + parts[0].astype(np.float32) + parts[1]).astype(np.float32)
    )
    out = ops.moe(x, _MOE_MLP, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_rms_norm_of_a_float16_row_with_a_large_eps() -> None:
    """One float16 row past 256 (its own last axis), with an ε large enough that its sign shows."""
    x = np.array([300.0, -400.0, 500.0], dtype=np.float16)
    out = ops.rms_norm(x, np.ones(3, dtype=np.float16), 5e4)
    np.testing.assert_allclose(out.astype(np.float64), _rms64(x, np.ones(3), 5e4), rtol=2e-3)


def test_linear_takes_rows_of_any_rank() -> None:
    x = np.arange(24.0).reshape(2, 3, 4)
    w = np.arange(20.0).reshape(4, 5)
    np.testing.assert_array_equal(ops.linear(x, w), np.einsum("abi,io->abo", x, w))


def test_silu_of_infinities_warns_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.silu(np.array([-np.inf, np.inf, 0.0]))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0.0


def test_qkv_takes_a_query_projection_narrower_than_the_model() -> None:
    """W_q of d × H·d_h with H·d_h ≠ d (3 heads of 4 in a model of width 16)."""
    lw = _layer(wq=np.ones((16, 12)))
    q, k, v = ops.qkv(_X, lw, 3, 2, 4)
    assert q.shape == (2, 3, 4) and k.shape == v.shape == (2, 2, 4)


_Q = np.ones((1, 1, 2))


def _layer(**projections: Any) -> Any:
    """The tiny model's first block with the given projections in place of its own."""
    return dataclasses.replace(_LW, **projections)


REFUSALS += [
    (
        "qkv-narrow-q",
        lambda: ops.qkv(_X, _layer(wq=np.ones((16, 12))), 4, 2, 4),
        ShapeError,
        "Q/K projections of widths 12/8 do not split into 4/2 heads of 4",
    ),
    (
        "qkv-v",
        lambda: ops.qkv(_X, _layer(wv=np.ones((16, 6))), 4, 2, 4),
        ShapeError,
        "V projection of width 6 does not split into 2 heads",
    ),
    ("silu-dtype", lambda: ops.silu(np.array(["a"])), DTypeError, "SiLU needs a real array, got dtype <U1"),
    # a projection of three axes whose last one fits: refused as a matrix by linear (its whole shape), and
    # one whose last one does not: named by that width
    *[
        (
            f"qkv-3d-{w}-fits",
            lambda w=w, width=width: ops.qkv(_X, _layer(**{w: np.ones((16, 3, width))}), 4, 2, 4),
            ShapeError,
            f"cannot multiply rows of shape (2, 16) by a matrix of shape (16, 3, {width}) (in × out)",
        )
        for w, width in (("wq", 16), ("wk", 8), ("wv", 8))
    ],
    (
        "qkv-3d-wq-narrow",
        lambda: ops.qkv(_X, _layer(wq=np.ones((16, 3, 12))), 4, 2, 4),
        ShapeError,
        "Q/K projections of widths 12/8 do not split into 4/2 heads of 4",
    ),
    (
        "qkv-3d-wk-narrow",
        lambda: ops.qkv(_X, _layer(wk=np.ones((16, 3, 6))), 4, 2, 4),
        ShapeError,
        "Q/K projections of widths 16/6 do not split into 4/2 heads of 4",
    ),
    (
        "qkv-3d-wv-narrow",
        lambda: ops.qkv(_X, _layer(wv=np.ones((16, 3, 6))), 4, 2, 4),
        ShapeError,
        "V projection of width 6 does not split into 2 heads",
    ),
    ("mask-n-q", lambda: ops.causal_mask(-1, 2), ShapeError, "causal_mask n_q must be >= 0, got -1"),
    ("mask-n-k", lambda: ops.causal_mask(2, -1), ShapeError, "causal_mask n_k must be >= 0, got -1"),
    (
        "mask-n-q-float",
        lambda: ops.causal_mask(2.0, 2),  # type: ignore[arg-type]
        ShapeError,
        "causal_mask n_q must be an integer, got float 2.0",
    ),
    (
        "mask-n-k-float",
        lambda: ops.causal_mask(2, 2.0),  # type: ignore[arg-type]
        ShapeError,
        "causal_mask n_k must be an integer, got float 2.0",
    ),
    (
        "mask-offset-float",
        lambda: ops.causal_mask(2, 2, 1.5),  # type: ignore[arg-type]
        ShapeError,
        "causal_mask offset must be an integer, got float 1.5",
    ),
    *[
        (
            f"attention-{what}-dtype",
            lambda what=what: ops.attention(
                **{"q": _Q, "k": _Q, "v": _Q, what: np.array([[["a", "b"]]])}  # type: ignore[arg-type]
            ),
            DTypeError,
            f"attention {what} must be a real array, got dtype <U1",
        )
        for what in ("q", "k", "v")
    ],
    (
        "attention-scale",
        lambda: ops.attention(_Q, _Q, _Q, scale=float("nan")),
        ConfigError,
        "attention scale must be finite, got nan",
    ),
    (
        "attention-2d-k",
        lambda: ops.attention(_Q, _Q[0], _Q),
        ShapeError,
        "attention needs 3-D q, k, v (rows × heads × head_dim), got (1, 1, 2), (1, 2), (1, 1, 2)",
    ),
    (
        "attention-v-rows",
        lambda: ops.attention(_Q, _Q, np.ones((2, 1, 2))),
        ShapeError,
        "incompatible attention shapes q (1, 1, 2), k (1, 1, 2), v (2, 1, 2)",
    ),
    (
        "attention-no-key",
        lambda: ops.attention(_Q, np.ones((0, 1, 2)), np.ones((0, 1, 2))),
        ShapeError,
        "incompatible attention shapes q (1, 1, 2), k (0, 1, 2), v (0, 1, 2)",
    ),
    (
        "attention-mask-dtype",
        lambda: ops.attention(_Q, _Q, _Q, mask=np.zeros((1, 1))),  # type: ignore[arg-type]
        DTypeError,
        "attention mask must be boolean (True = may attend), got dtype float64",
    ),
    (
        "attention-mask-shape",
        lambda: ops.attention(_Q, np.ones((2, 1, 2)), np.ones((2, 1, 2)), mask=np.ones((2, 2), dtype=bool)),
        ShapeError,
        "attention mask must be 1 × 2 (queries × keys), got (2, 2)",
    ),
]


test_each_refusal_has_its_class_and_whole_message = refusal_test(REFUSALS)


def test_causal_mask_of_no_rows_and_of_a_given_offset() -> None:
    assert ops.causal_mask(0, 3).shape == (0, 3) and ops.causal_mask(2, 0).shape == (2, 0)
    assert ops.causal_mask(2, 3, 0).tolist() == [[True, False, False], [True, True, False]]
    assert ops.causal_mask(2, 3).tolist() == [[True, True, False], [True, True, True]]
    assert ops.causal_mask(2, 3, -1).tolist() == [[False, False, False], [True, False, False]]


def test_attention_gives_nan_exactly_in_the_heads_of_rows_with_a_non_finite_query() -> None:
    """Row 0's head 0 reads −∞ in one entry: its scores are all −∞ (keys positive), which softmax makes a
    row of zeros; the head reads NaN instead, and every other row and head is what it is without it."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 2, 2)).astype(np.float32)
    k = rng.uniform(0.5, 1.5, size=(4, 1, 2)).astype(np.float32)
    v = rng.normal(size=(4, 1, 2)).astype(np.float32)
    clean = ops.attention(q, k, v)
    q[0, 0, 0] = -np.inf
    out = ops.attention(q, k, v)
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    assert np.isnan(out[0, 0]).all()
    np.testing.assert_array_equal(out[0, 1], clean[0, 1])
    np.testing.assert_array_equal(out[1:], clean[1:])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_softmax_of_a_row_holding_nan_or_plus_infinity_is_nan_as_torchs() -> None:
    rows = np.array(
        [[np.inf, 1.0, -np.inf], [np.nan, 1.0, 2.0], [-np.inf, -np.inf, -np.inf], [1.0, 2.0, 3.0]]
    )
    out = ops.softmax(rows)
    assert np.isnan(out[:2]).all() and out[2].tolist() == [0.0, 0.0, 0.0] and np.isfinite(out[3]).all()

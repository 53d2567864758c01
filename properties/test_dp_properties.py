"""Hypothesis properties of scx_ref.dp: monotonicity, soundness of closed forms against the PLD accountant,
and the data-independent sensitivity bounds checked on random, adversarial and real (model) rows.

Shared strategies come from ``properties/strategies.py``; the few DP-specific ones are defined here.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from properties.strategies import (
    float_matrices,
    gaussian_arrays,
    model_configs,
    model_weights,
    row_counts,
    seeds,
)
from scx_ref import ops
from scx_ref.backends import NumpyBackend
from scx_ref.backends.base import split_qkv
from scx_ref.dp import (
    LaplaceMechanism,
    advanced_composition,
    advanced_composition_heterogeneous,
    attention_output_l1_bound,
    basic_composition,
    basic_composition_heterogeneous,
    l1_diameter,
    laplace_epsilon,
    model_sensitivities,
    pld_available,
    pld_discretization_slack,
    pld_epsilon,
    rmsnorm_l1_bound,
    rmsnorm_l2_bound,
    rmsnorm_sensitivity,
    swiglu_down_l1_bound,
)
from scx_ref.weights import DenseMLP

needs_pld = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")

Array = npt.NDArray[np.float64]

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
deltas = st.sampled_from([1e-12, 1e-9, 1e-6, 1e-3, 0.1, 0.5])
dims = st.integers(min_value=1, max_value=24)


def gammas(d: int) -> st.SearchStrategy[Array]:
    """Norm gains: mostly near 1, with zeros, negatives and a large entry possible."""
    return float_matrices(d, None, bound=3.0).map(lambda g: np.asarray(g, dtype=np.float64))


@st.composite
def adversarial_rows(draw: st.DrawFn, d: int) -> Array:
    """A row that is one-hot, constant (either sign), ±γ-aligned, a spike on a constant, or arbitrary."""
    kind = draw(st.sampled_from(["one_hot", "constant", "spike", "alternating", "arbitrary"]))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e6])) * draw(st.sampled_from([1.0, -1.0]))
    row = np.zeros(d)
    if kind == "one_hot":
        row[draw(st.integers(0, d - 1))] = scale
    elif kind == "constant":
        row[:] = scale
    elif kind == "spike":
        row[:] = scale
        row[draw(st.integers(0, d - 1))] = -1e3 * scale
    elif kind == "alternating":
        row[:] = scale * (-1.0) ** np.arange(d)
    else:
        row = np.asarray(draw(float_matrices(d, None, bound=10.0)), dtype=np.float64)
    return row


def _l1(a: npt.NDArray[np.floating[Any]]) -> float:
    return float(np.abs(a).sum())


def _l2(a: npt.NDArray[np.floating[Any]]) -> float:
    """‖a‖₂ without underflow: np.linalg.norm squares the entries, so a normal ~1e-160 (a norm's output
    for gains that small) comes back off by 1e-5 relative, its square being subnormal."""
    return math.hypot(*(float(v) for v in np.ravel(a)))


# ----------------------------------------------------------------------------- mechanisms


@given(a=positive, b=positive, beta=positive)
def test_epsilon_increases_with_sensitivity(a: float, b: float, beta: float) -> None:
    lo, hi = sorted((a, b))
    assume(lo < hi)
    assert laplace_epsilon(lo, beta) < laplace_epsilon(hi, beta)


@given(sens=positive, b1=positive, b2=positive)
def test_epsilon_increases_with_inverse_scale(sens: float, b1: float, b2: float) -> None:
    small, large = sorted((b1, b2))
    assume(small < large)
    assert laplace_epsilon(sens, large) < laplace_epsilon(sens, small)  # 1/β larger → ε larger


# ----------------------------------------------------------------------------- composition


@given(eps=st.floats(1e-4, 20.0), k=st.integers(1, 10_000), delta=deltas)
def test_closed_forms_grow_with_k(eps: float, k: int, delta: float) -> None:
    assert basic_composition(eps, k + 1) > basic_composition(eps, k)
    assert advanced_composition(eps, k + 1, delta) > advanced_composition(eps, k, delta)


@needs_pld
@settings(max_examples=10)
@given(eps=st.floats(0.01, 2.0), k=st.integers(1, 30), delta=deltas)
def test_pld_grows_with_k(eps: float, k: int, delta: float) -> None:
    mech = [LaplaceMechanism(eps, 1.0, k)]
    more = [LaplaceMechanism(eps, 1.0, k + 1)]
    grown = pld_epsilon(more, delta, value_discretization_interval=1e-3)
    base = pld_epsilon(mech, delta, value_discretization_interval=1e-3)
    assert grown is not None and base is not None and grown >= base


GRID = list(itertools.product([0.01, 0.2, 1.0, 3.0], [1, 2, 10, 100], [1e-9, 1e-6, 1e-3, 0.1]))


@needs_pld
@pytest.mark.parametrize(("eps", "k", "delta"), GRID)
def test_every_closed_form_is_at_least_pld_on_grid(eps: float, k: int, delta: float) -> None:
    """A closed form below the (pessimistic) PLD value would be unsound; none is, on this grid.

    Finding: with pessimistic_estimate=True (connect-the-dots) the PLD value stays below basic composition
    even at k = 1 (it is kε + 2 ln(1 − δ)-ish there, the exact value), so no tolerance is needed.
    """
    tight = pld_epsilon([LaplaceMechanism(eps, 1.0, k)], delta, value_discretization_interval=1e-3)
    assert tight is not None
    basic = basic_composition(eps, k)
    adv = advanced_composition(eps, k, delta)
    assert basic >= tight
    assert adv >= tight
    assert min(basic, adv) >= tight


@needs_pld
@settings(max_examples=12)
@given(
    parts=st.lists(st.tuples(st.floats(0.01, 2.0), st.integers(1, 10)), min_size=1, max_size=3),
    delta=deltas,
)
def test_heterogeneous_closed_forms_at_least_pld(parts: list[tuple[float, int]], delta: float) -> None:
    """Closed forms ≥ PLD − (its discretization slack), for ε that are not multiples of the interval.

    Finding (Hypothesis, ε = 0.34375, k = 1, δ = 1e-12, h = 1e-4): the pessimistic PLD reports 0.3438 >
    basic 0.34375. That is the discretization (losses rounded up to multiples of h), not an unsound closed
    form: the overshoot is at most ``pld_discretization_slack`` = Σ count·(⌈ε/h⌉h − ε), which this checks.
    """
    mechs = [LaplaceMechanism(e, 1.0, c) for e, c in parts]
    tight = pld_epsilon(mechs, delta, value_discretization_interval=1e-3)
    assert tight is not None
    slack = pld_discretization_slack(mechs, 1e-3) + 1e-9
    assert basic_composition_heterogeneous(mechs) >= tight - slack
    assert advanced_composition_heterogeneous(mechs, delta) >= tight - slack


@needs_pld
def test_pld_overshoot_is_discretization() -> None:
    """The counterexample above, pinned: PLD exceeds basic only by the discretization slack."""
    mechs = [LaplaceMechanism(0.34375, 1.0)]
    tight = pld_epsilon(mechs, 1e-12, value_discretization_interval=1e-4)
    assert tight is not None and tight > 0.34375
    assert tight - 0.34375 <= pld_discretization_slack(mechs, 1e-4) + 1e-12
    fine = pld_epsilon(mechs, 1e-12, value_discretization_interval=3.4375e-6)  # ε a multiple of h
    assert fine is not None and fine <= 0.34375


# ----------------------------------------------------------------------------- RMSNorm bounds


@st.composite
def _norm_case(draw: st.DrawFn) -> tuple[Array, Array, Array, float]:
    d = draw(dims)
    gamma = draw(gammas(d))
    x = draw(adversarial_rows(d))
    y = draw(adversarial_rows(d))
    eps = draw(st.sampled_from([0.0, 0.0, 1e-6, 1e-5, 1.0]))
    return gamma, x, y, eps


@given(case=_norm_case())
def test_rmsnorm_sensitivity_bound_adversarial(case: tuple[Array, Array, Array, float]) -> None:
    gamma, x, y, eps = case
    # RMSNorm with eps = 0 is defined where mean(x²) > 0 in floating point (not 0/0 after underflow)
    assume(eps > 0 or (np.mean(x * x) > 0 and np.mean(y * y) > 0))
    check_rmsnorm_bounds(gamma, x, y, eps)


def check_rmsnorm_bounds(gamma: Array, x: Array, y: Array, eps: float) -> None:
    """The L1 and L2 bounds on RMSNorm(x) and the L1 sensitivity bound on RMSNorm(x) − RMSNorm(y)."""
    xh = ops.rms_norm(x, gamma, eps)
    yh = ops.rms_norm(y, gamma, eps)
    slack = 1 + 1e-12
    assert _l1(xh) <= rmsnorm_l1_bound(gamma) * slack + 1e-300
    assert _l2(xh) <= rmsnorm_l2_bound(gamma) * slack + 1e-300
    assert _l1(xh - yh) <= rmsnorm_sensitivity(gamma) * slack + 1e-300


@given(d=dims, gamma_seed=seeds(), sign=st.sampled_from([1.0, -1.0]))
def test_rmsnorm_bound_is_tight(d: int, gamma_seed: int, sign: float) -> None:
    """x ∝ γ attains ‖x̂‖₁ = √d‖γ‖₂, and x' = −x attains the sensitivity 2√d‖γ‖₂ (eps = 0)."""
    gamma = np.random.default_rng(gamma_seed).standard_normal(d) + 0.1
    xh = ops.rms_norm(sign * gamma, gamma, 0.0)
    assert _l1(xh) == pytest.approx(rmsnorm_l1_bound(gamma), rel=1e-12)
    assert _l1(xh - ops.rms_norm(-sign * gamma, gamma, 0.0)) == pytest.approx(
        rmsnorm_sensitivity(gamma), rel=1e-12
    )


@given(rows=row_counts(1, 6).flatmap(lambda n: gaussian_arrays((n, 16), scale=3.0)), gamma_seed=seeds())
def test_rmsnorm_bound_gaussian_rows(rows: Array, gamma_seed: int) -> None:
    """Gaussian rows (one row included: its L1 bound) stay within the L1 bound and every pair within the
    sensitivity, for eps 0, 1e-5 and 10."""
    gamma = 1.0 + 0.3 * np.random.default_rng(gamma_seed).standard_normal(16)
    for eps in (0.0, 1e-5, 10.0):
        xh = ops.rms_norm(rows, gamma, eps)
        pair = np.abs(xh[:, None, :] - xh[None, :, :]).sum(-1)
        assert pair.max() <= rmsnorm_sensitivity(gamma) * (1 + 1e-12)
        assert np.abs(xh).sum(-1).max() <= rmsnorm_l1_bound(gamma) * (1 + 1e-12)


@settings(max_examples=15)
@given(w=model_weights(model_configs(max_layers=2)))
def test_bounds_hold_on_model_embedding_rows(w: Any) -> None:
    """Real rows: every pair of normalized vocabulary rows is within the bound, as is the exact diameter."""
    gamma, eps = w.layers[0].attn_norm, w.config.rms_eps
    xh = ops.rms_norm(w.embed, gamma, eps)
    pair = np.abs(xh[:, None, :] - xh[None, :, :]).sum(-1)
    bound = rmsnorm_sensitivity(gamma)
    assert pair.max() <= bound * (1 + 1e-12)
    assert np.abs(xh).sum(-1).max() <= rmsnorm_l1_bound(gamma) * (1 + 1e-12)
    diameter = l1_diameter(xh, backend="numpy")
    assert diameter == pytest.approx(pair.max(), rel=1e-12)
    s = model_sensitivities(w, backend="numpy")
    assert s.embed_normalized_diameter == pytest.approx(pair.max(), rel=1e-12)
    assert s.block1_qkv <= bound * (1 + 1e-12)


# ----------------------------------------------------------------------------- operator-norm bounds


@settings(max_examples=15)
@given(
    w=model_weights(model_configs(max_layers=1)), seed=seeds(), temperature=st.sampled_from([1.0, 1e2, 1e6])
)
def test_attention_and_swiglu_bounds_hold(w: Any, seed: int, temperature: float) -> None:
    """The O-stage and down-stage inputs stay inside half their Δ₁ bounds, computed as the protocol computes
    them: a :class:`NumpyBackend` on the drawn weights (``norm``, ``project``, ``split_qkv``, ``rope``,
    ``attention`` / ``scores`` + ``softmax_values``, ``swiglu_act``; the client's calls).

    The O bound claims more than the model's own attention: every attention pattern, i.e. every convex
    combination of a KV head's value rows, per query head. ‖·‖₁ is convex, so its maximum over those
    combinations is at a single value row; the supremum over *all* patterns is Σ_h max_j ‖v_{j,g(h)}‖₁ on the
    library's value rows, checked exactly. The library's real outputs are checked too: causal attention
    at positions 0..n−1, and ``softmax_values`` of the scores scaled by ``temperature`` (1e6: nearly one-hot).
    """
    rng = np.random.default_rng(seed)
    c = w.config
    b = NumpyBackend(w)
    lw = w.layers[0]
    n = 6
    x = rng.standard_normal((n, c.hidden_size)) * rng.choice([1e-3, 1.0, 1e3], size=(n, 1))
    x[0] = lw.attn_norm  # the row that maximises ‖x̂‖₁ direction-wise
    half_o = attention_output_l1_bound(lw, c.n_heads, c.n_kv_heads, c.head_dim) / 2
    slack = 1 + 1e-12
    q, k, v = split_qkv(b, b.project(b.norm(x, "attn", 0), "wqkv", 0))
    # every attention pattern: per query head, the largest L1 norm of one of its KV head's value rows
    per_kv_head = np.abs(v).sum(-1).max(axis=0)  # (n_kv_heads,): max_j ‖v_{j,g}‖₁
    assert float(per_kv_head.repeat(c.group_size).sum()) <= half_o * slack
    # the library's attention outputs (RoPE'd queries and keys, causal mask), and near-one-hot patterns
    pos = np.arange(n)
    q_r, k_r = b.rope(q, pos), b.rope(k, pos)
    outputs = [
        b.attention(q_r, k_r, v, pos, pos),
        b.attention(q_r, k_r, v, pos, None),
        b.softmax_values(b.scores(q_r, k_r) * temperature, v),
    ]
    for o in outputs:
        assert o.shape == (n, c.n_heads, c.head_dim)
        assert np.abs(o.reshape(n, c.q_dim)).sum(-1).max() <= half_o * slack
    # the down-stage input: swiglu_act of the fused [gate up] projection, per expert for an MoE
    xm = b.norm(x, "mlp", 0)
    experts = [lw.mlp] if isinstance(lw.mlp, DenseMLP) else lw.mlp.experts
    for e, ex in enumerate(experts):
        one = None if isinstance(lw.mlp, DenseMLP) else np.array([e], dtype=np.int64)
        u = b.swiglu_act(b.project(xm, "w_gate_up", 0, one))
        assert u.shape == (n, c.intermediate_size)
        assert np.abs(u).sum(-1).max() <= swiglu_down_l1_bound(ex, lw.mlp_norm) / 2 * slack


@given(x=float_matrices(st.integers(1, 9), st.integers(1, 5), bound=50.0))
def test_l1_diameter_matches_brute_force(x: Any) -> None:
    arr = np.asarray(x, dtype=np.float64)
    brute = float(np.abs(arr[:, None, :] - arr[None, :, :]).sum(-1).max())
    assert l1_diameter(arr, backend="numpy") == pytest.approx(brute, rel=1e-12, abs=1e-12)
    if math.isfinite(brute):
        assert l1_diameter(arr, backend="numpy", chunk_size=2) == pytest.approx(brute, rel=1e-12, abs=1e-12)

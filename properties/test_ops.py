"""Hypothesis properties of the numpy model ops (scx_ref.ops) against independent, naive formulas:
per-head loops for GQA attention, per-row loops for MoE, RoPE's rotation structure."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import (
    attention_shapes,
    dtypes,
    float_matrices,
    gaussian_arrays,
    row_counts,
    seeds,
    token_ids,
)
from scx_ref import ops
from scx_ref.weights import DenseMLP, MoEMLP

RTOL = 1e-12
ATOL = 1e-12


def _naive_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float
) -> np.ndarray:
    """softmax(q kᵀ s) v by explicit loops over heads and queries (query head h uses KV head h // G)."""
    n_q, h, _ = q.shape
    g = h // k.shape[1]
    out = np.zeros((n_q, h, v.shape[2]))
    for head in range(h):
        for i in range(n_q):
            keys = np.arange(k.shape[0]) if mask is None else np.flatnonzero(mask[i])
            if keys.size == 0:
                continue
            s = np.array([q[i, head] @ k[j, head // g] for j in keys]) * scale
            w = np.exp(s - s.max())
            out[i, head] = (w / w.sum()) @ v[keys, head // g]
    return out


@given(
    data=st.data(),
    shape=attention_shapes(),
    n_q=row_counts(1, 5),
    extra=st.integers(0, 4),
    causal=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.05, 4.0)),
    dtype=dtypes(),
)
def test_attention_matches_naive_loops(
    data: st.DataObject,
    shape: tuple[int, int, int],
    n_q: int,
    extra: int,
    causal: bool,
    scale: float | None,
    dtype: np.dtype[Any],
) -> None:
    """ops.attention (GQA, causal with cache offset, any scale) equals the per-head per-query loop, in the
    inputs' dtype. float64: rtol 1e-10. float32 (against the float64 loop on the same values, u = 2⁻²⁴):
    a score s·q·k of d_h products is off by at most δ = (d_h + 2)·u·s·|q|·|k|, which moves a softmax weight
    by a relative 2δ, plus (2·n_k + d_h + 8)·u for the softmax's and the weighted sum's own roundings, so
    |Δo| ≤ max|v|·(2·max δ + (2·n_k + d_h + 8)·u)."""
    h_kv, g, d_h = shape
    n_k = n_q + extra
    q = data.draw(gaussian_arrays((n_q, h_kv * g, d_h), dtype))
    k = data.draw(gaussian_arrays((n_k, h_kv, d_h), dtype))
    v = data.draw(gaussian_arrays((n_k, h_kv, d_h), dtype))
    mask = ops.causal_mask(n_q, n_k) if causal else None
    s = 1.0 / np.sqrt(d_h) if scale is None else scale
    got = ops.attention(q, k, v, mask=mask, scale=scale)
    assert got.dtype == dtype
    want = _naive_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), mask, s)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        return
    u = 2.0**-24
    delta = (d_h + 2) * u * s * float(np.max(np.abs(q)) * np.max(np.abs(k)) * d_h)
    tol = float(np.max(np.abs(v))) * (2 * delta + (2 * n_k + d_h + 8) * u)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@given(n_q=row_counts(1, 6), extra=st.integers(0, 5))
def test_causal_mask_offsets(n_q: int, extra: int) -> None:
    """Query i of the last n_q rows of an n_k-row sequence sees keys 0..i+extra, never a later one."""
    m = ops.causal_mask(n_q, n_q + extra)
    for i in range(n_q):
        assert m[i].tolist() == [j <= i + extra for j in range(n_q + extra)]


@given(
    data=st.data(),
    n=row_counts(1, 6),
    h=st.integers(1, 3),
    d_h=st.sampled_from([2, 4, 8]),
    theta=st.sampled_from([100.0, 10000.0, 1e6]),
    shift=st.integers(0, 50),
)
def test_rope_is_a_relative_rotation(
    data: st.DataObject, n: int, h: int, d_h: int, theta: float, shift: int
) -> None:
    """RoPE is the rotation of HF's rotate_half convention — coordinates i and i + d_h/2 turned by the
    angle p·θ^(−2i/d_h) at position p — so it preserves each row's norm, is the identity at position 0,
    and q·k after RoPE depends only on the position difference (shifting both positions by the same amount
    leaves scores unchanged). The explicit rotation pins the frequencies and the direction, which the
    three invariants alone do not (a wrong frequency or a reversed rotation keeps all three)."""
    x = data.draw(gaussian_arrays((n, h, d_h)))
    y = data.draw(gaussian_arrays((n, h, d_h)))
    pos = np.arange(n)
    rx = ops.apply_rope(x, pos, theta)
    half = d_h // 2
    for p in (pos, pos + shift):
        angle = p[:, None, None] * theta ** (-2.0 * np.arange(half) / d_h)
        lo, hi = x[..., :half], x[..., half:]
        rotated = np.concatenate(
            [lo * np.cos(angle) - hi * np.sin(angle), lo * np.sin(angle) + hi * np.cos(angle)], axis=-1
        )
        np.testing.assert_allclose(ops.apply_rope(x, p, theta), rotated, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rx, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(ops.apply_rope(x[:1], np.array([0]), theta), x[:1], rtol=0, atol=0)
    scores = np.einsum("ihd,jhd->hij", rx, ops.apply_rope(y, pos, theta))
    shifted = np.einsum(
        "ihd,jhd->hij", ops.apply_rope(x, pos + shift, theta), ops.apply_rope(y, pos + shift, theta)
    )
    np.testing.assert_allclose(shifted, scores, rtol=1e-9, atol=1e-9)


@given(
    data=st.data(), n=row_counts(1, 6), d=st.sampled_from([1, 3, 8]), n_exp=st.integers(1, 4), seed=seeds()
)
def test_moe_matches_per_row_formula(data: st.DataObject, n: int, d: int, n_exp: int, seed: int) -> None:
    """ops.moe equals, row by row, Σ_{e ∈ top-k} p_e / Σ_top p · SwiGLU_e(x) with p = softmax(x W_r)."""
    rng = np.random.default_rng(seed)
    experts = [DenseMLP(*(rng.standard_normal(s) for s in ((d, 3), (d, 3), (3, d)))) for _ in range(n_exp)]
    router = rng.standard_normal((d, n_exp))
    top_k = data.draw(st.integers(1, n_exp))
    x = data.draw(gaussian_arrays((n, d)))
    got = ops.moe(x, MoEMLP(router, experts), top_k)
    for i in range(n):
        logits = x[i] @ router
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:top_k]
        want = sum(p[e] / p[top].sum() * ops.swiglu(x[i : i + 1], experts[e])[0] for e in top)
        np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-12)
    if top_k == n_exp == 1:
        np.testing.assert_allclose(got, ops.swiglu(x, experts[0]), rtol=1e-12, atol=1e-12)


@given(data=st.data(), n=row_counts(1, 6), d=st.integers(1, 8), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm_formula(data: st.DataObject, n: int, d: int, eps: float) -> None:
    """RMSNorm_ε(x) = γ ⊙ x / sqrt(mean(x²) + ε); with γ = 1 and ε = 0 the rows have rms 1."""
    x = data.draw(float_matrices(n, d))
    gamma = data.draw(float_matrices(d))
    want = np.stack([gamma * r / np.sqrt(np.mean(r * r) + eps) for r in x])
    np.testing.assert_allclose(ops.rms_norm(x, gamma, eps), want, rtol=1e-12, atol=1e-12)
    z = data.draw(gaussian_arrays((n, d)))
    np.testing.assert_allclose(
        np.sqrt(np.mean(ops.rms_norm(z, np.ones(d), 0.0) ** 2, axis=-1)), 1.0, rtol=1e-12
    )


@given(x=float_matrices(row_counts(1, 5), st.integers(1, 6), bound=800.0))
def test_softmax_and_silu_are_stable(x: np.ndarray) -> None:
    """softmax rows sum to 1 and are finite even for large inputs; SiLU(x) = x·sigmoid(x) stays finite."""
    p = ops.softmax(x)
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    s = ops.silu(x)
    assert np.all(np.isfinite(s))
    small = np.clip(x, -700, 700)  # the textbook formula itself overflows beyond
    np.testing.assert_allclose(ops.silu(small), small / (1.0 + np.exp(-small)), rtol=1e-14, atol=0)
    assert np.array_equal(ops.softmax(np.full((1, 3), -np.inf)), np.zeros((1, 3)))


@given(data=st.data(), vocab=st.integers(1, 20))
def test_embed_is_a_row_gather(data: st.DataObject, vocab: int) -> None:
    """embed(ids, E)[i] = E[ids[i]] exactly."""
    ids = data.draw(token_ids(vocab, 1, 10))
    table = data.draw(gaussian_arrays((vocab, 3)))
    assert np.array_equal(ops.embed(ids, table), table[ids])

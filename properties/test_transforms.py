"""Hypothesis properties of the numpy transforms T1–T5 (DESIGN §4), in float64 with tight tolerances.

T1/T2 commute row-wise maps with row gathers; a gather is exact, but the row-wise map may run through
BLAS, whose blocking can differ with the row count, so those identities are checked to rtol 1e-12.
Pure gathers (permute ∘ unpermute, decoy stripping of a gather) are checked for exact equality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from properties.strategies import (
    FloatArray,
    attention_shapes,
    decoy_counts,
    float_matrices,
    gaussian_arrays,
    head_permutations,
    perms,
    row_counts,
    seeds,
    sized_perms,
)
from scx_ref import ops
from scx_ref.arrays import permute_rows_in_place
from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import PermutationError, ShapeError
from scx_ref.protocol.mlp import traced_mlp
from scx_ref.transforms import (
    HeadPermutation,
    Permutation,
    blind,
    blinding_correction,
    decode_rows,
    decode_rows_numpy,
    encode_rows,
    head_permute,
    head_permute_stacked,
    inverse_permutation,
    laplace_noise,
    permute_rows,
    reencode_sum,
    reorder_cache,
    unblind,
    unlock_scores,
    unpermute_rows,
    with_decoys,
)
from scx_ref.weights import random_weights

RTOL = 1e-12
ATOL = 1e-12

RowFn = Callable[[np.ndarray], np.ndarray]


def _row_functions(d: int, seed: int) -> dict[str, RowFn]:
    """The row-wise maps of T1 on width d, each the library function the protocol calls: a
    :class:`NumpyBackend` on one-block random models of hidden size d (weights from ``default_rng(seed)``):
    the fused QKV projection with the Qwen2 bias, the attention norm, the block's MLP as the server runs it
    (:func:`traced_mlp`: ``project(·, "w_gate_up")`` → ``swiglu_act`` → ``project(·, "w_down")`` for a dense
    block; the router, :func:`route` and the experts for an MoE one, top-1 and top-2) and the LM head
    (``norm(·, "final")`` → ``project(·, "lm_head")``)."""
    rng = np.random.default_rng(seed)

    def model(**fields: Any) -> NumpyBackend:
        shape = ModelConfig(
            vocab_size=11, hidden_size=d, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, intermediate_size=5
        )
        return NumpyBackend(random_weights(replace(shape, **fields), rng))

    dense = model(rms_eps=1e-5, qkv_bias=True)
    moe = {k: model(rms_eps=1e-6, n_experts=4, top_k=k) for k in (1, 2)}
    return {
        "linear_bias": lambda x: dense.project(x, "wqkv", 0),
        "rms_norm": lambda x: dense.norm(x, "attn", 0),
        "swiglu": lambda x: traced_mlp(dense, x, 0)[0],
        "moe_top1": lambda x: traced_mlp(moe[1], x, 0)[0],
        "moe_top2": lambda x: traced_mlp(moe[2], x, 0)[0],
        "lm_head": lambda x: moe[1].project(moe[1].norm(x, "final"), "lm_head"),
    }


ROW_FNS = sorted(_row_functions(2, 0))


# --- T1 ----------------------------------------------------------------------------------------


@given(data=st.data(), n=row_counts(1, 10), d=st.sampled_from([1, 2, 4, 8]), seed=seeds())
@pytest.mark.parametrize("name", ROW_FNS)
def test_t1_rowwise_maps_commute_with_token_permutation(
    name: str, data: st.DataObject, n: int, d: int, seed: int
) -> None:
    """T1: f(X[π]) = f(X)[π] for linear+bias, RMSNorm, SwiGLU, MoE (top-1, top-2) and the LM head."""
    fn = _row_functions(d, seed)[name]
    x = data.draw(float_matrices(n, d))
    pi = data.draw(perms(n))
    np.testing.assert_allclose(fn(permute_rows(x, pi)), fn(x)[pi], rtol=RTOL, atol=ATOL)


@given(data=st.data(), n_perm=sized_perms(0, 16), d=st.integers(1, 5))
def test_t1_unpermute_inverts_permute_exactly(
    data: st.DataObject, n_perm: tuple[int, np.ndarray], d: int
) -> None:
    """unpermute ∘ permute = id and permute ∘ unpermute = id, bit for bit (pure gathers), n = 0 included."""
    n, pi = n_perm
    x = data.draw(float_matrices(n, d))
    assert np.array_equal(unpermute_rows(permute_rows(x, pi), pi), x)
    assert np.array_equal(permute_rows(unpermute_rows(x, pi), pi), x)
    inv = inverse_permutation(pi)
    assert np.array_equal(inv[pi], np.arange(n))
    assert np.array_equal(permute_rows(x, pi)[inv], x)


# --- T2 ----------------------------------------------------------------------------------------


@given(data=st.data(), n=row_counts(1, 8), r=decoy_counts(), d=st.sampled_from([1, 4, 8]), seed=seeds())
@pytest.mark.parametrize("name", ROW_FNS)
def test_t2_decode_of_encoded_rowwise_map_is_plain_map(
    name: str, data: st.DataObject, n: int, r: int, d: int, seed: int
) -> None:
    """T2: decode_rows(f(encode_rows(X, R, π)), π, n) == f(X); decoys never leak into the result."""
    fn = _row_functions(d, seed)[name]
    x = data.draw(float_matrices(n, d))
    decoys = data.draw(float_matrices(r, d, bound=50.0))
    pi = data.draw(perms(n + r))
    enc: FloatArray = encode_rows(x, decoys, pi)
    assert enc.shape == (n + r, d)
    np.testing.assert_allclose(decode_rows(fn(enc), pi, n), fn(x), rtol=RTOL, atol=ATOL)


@given(data=st.data(), n=row_counts(1, 8), r=decoy_counts(), d=st.integers(1, 4))
def test_t2_identity_map_round_trips_exactly(data: st.DataObject, n: int, r: int, d: int) -> None:
    """With f = id the encode/decode pair is a pure gather: exact equality."""
    x = data.draw(float_matrices(n, d))
    decoys = data.draw(float_matrices(r, d))
    pi = data.draw(perms(n + r))
    assert np.array_equal(decode_rows(encode_rows(x, decoys, pi), pi, n), x)


@given(data=st.data(), n=row_counts(0, 8), r=decoy_counts(), d=st.integers(1, 4))
def test_t2_fused_encode_is_the_composition_exactly(data: st.DataObject, n: int, r: int, d: int) -> None:
    """encode_rows (one scatter pass) == permute_rows(with_decoys(X, R), π), bit for bit, in the inputs'
    dtype (float64 and float32)."""
    assume(n + r > 0)
    pi = data.draw(perms(n + r))
    for dtype in (np.float64, np.float32):
        x = data.draw(float_matrices(n, d)).astype(dtype)
        decoys = data.draw(float_matrices(r, d, bound=50.0)).astype(dtype)
        fused: FloatArray = encode_rows(x, decoys, pi)
        assert fused.dtype == dtype
        assert np.array_equal(fused, permute_rows(with_decoys(x, decoys), pi))


@given(
    data=st.data(),
    n=row_counts(0, 8),
    r=decoy_counts(),
    rs=decoy_counts(),
    ry=decoy_counts(),
    d=st.integers(1, 4),
)
def test_t2_reencode_sum_is_decode_add_encode_exactly(
    data: st.DataObject, n: int, r: int, rs: int, ry: int, d: int
) -> None:
    """reencode_sum(S, π_s, Y, π_y, R, π) == encode_rows(decode(S) + decode(Y), R, π), bit for bit, for
    inputs with their own decoy counts (the client's QKV and O encodings), in float64 and float32; and
    with :class:`Permutation` keys in place of raw arrays."""
    assume(n + r > 0)
    pi, pi_s, pi_y = data.draw(perms(n + r)), data.draw(perms(n + rs)), data.draw(perms(n + ry))
    for dtype in (np.float64, np.float32):
        s = data.draw(float_matrices(n + rs, d)).astype(dtype)
        y = data.draw(float_matrices(n + ry, d)).astype(dtype)
        decoys = data.draw(float_matrices(r, d, bound=50.0)).astype(dtype)
        want: FloatArray = encode_rows(decode_rows(s, pi_s, n) + decode_rows(y, pi_y, n), decoys, pi)
        got: FloatArray = reencode_sum(s, pi_s, y, pi_y, decoys, pi)
        assert got.dtype == dtype and np.array_equal(got, want)
        keyed: FloatArray = reencode_sum(s, Permutation(pi_s), y, Permutation(pi_y), decoys, Permutation(pi))
        assert np.array_equal(keyed, want)


def test_reencode_sum_rejects_mismatched_shapes() -> None:
    x = np.ones((3, 2))
    with pytest.raises(ShapeError):  # 5 decoys in a π of 3 rows
        reencode_sum(x, np.arange(3), x, np.arange(3), np.ones((5, 2)), np.arange(3))
    with pytest.raises(ShapeError):  # y of another width
        reencode_sum(x, np.arange(3), np.ones((3, 3)), np.arange(3), np.ones((0, 2)), np.arange(3))
    with pytest.raises(ShapeError):  # 4 real rows, but s holds 3
        reencode_sum(x, np.arange(3), x, np.arange(3), np.ones((0, 2)), np.arange(4))


@given(n_perm=sized_perms(0, 16), d=st.integers(1, 3), r=decoy_counts(), data=st.data())
def test_permutation_key_is_the_raw_array(
    n_perm: tuple[int, np.ndarray], d: int, r: int, data: st.DataObject
) -> None:
    """A :class:`Permutation` gives every row transform exactly the raw array's result; it holds π and
    π⁻¹ read-only, and a non-permutation or a wrong length is refused like the raw array."""
    n, pi = n_perm
    key = Permutation(pi)
    assert np.array_equal(key.forward, pi) and np.array_equal(key.inverse, inverse_permutation(pi))
    assert np.array_equal(inverse_permutation(key), inverse_permutation(pi)) and len(key) == n
    assert not key.forward.flags.writeable and not key.inverse.flags.writeable
    assert np.array_equal(np.asarray(key), pi)
    x = data.draw(float_matrices(n, d))
    assert np.array_equal(permute_rows(x, key), permute_rows(x, pi))
    assert np.array_equal(unpermute_rows(x, key), unpermute_rows(x, pi))
    keep = data.draw(st.integers(0, n))
    assert np.array_equal(decode_rows(x, key, keep), decode_rows(x, pi, keep))
    if n >= r:
        m = n - r
        dec = data.draw(float_matrices(r, d))
        assert np.array_equal(encode_rows(x[:m], dec, key), encode_rows(x[:m], dec, pi))
    with pytest.raises(PermutationError):
        decode_rows(np.ones((n + 1, d)), key, 0)
    with pytest.raises(PermutationError):
        Permutation(np.zeros(2, dtype=np.int64))


@given(data=st.data(), n=row_counts(1, 8), r=decoy_counts(), d=st.integers(1, 4))
def test_t2_in_place_decode_equals_the_gather(data: st.DataObject, n: int, r: int, d: int) -> None:
    """decode_rows_numpy(…, in_place=True) returns exactly decode_rows(Y, π, n), inside Y's memory."""
    y = data.draw(float_matrices(n + r, d))
    pi = data.draw(perms(n + r))
    want: FloatArray = decode_rows(y, pi, n)
    buf = y.copy()
    got = decode_rows_numpy(buf, pi, n, in_place=True)
    assert np.array_equal(got, want)
    assert np.shares_memory(got, buf)
    assert np.array_equal(decode_rows_numpy(y, pi, n), want)


@given(data=st.data(), n_perm=sized_perms(0, 20), d=st.integers(1, 3))
def test_permute_rows_in_place_is_the_gather(
    data: st.DataObject, n_perm: tuple[int, np.ndarray], d: int
) -> None:
    """Following the cycles in place gives x[index] exactly; an index that is not a permutation is
    refused instead of looping."""
    n, idx = n_perm
    x = data.draw(float_matrices(n, d))
    buf = x.copy()
    assert np.array_equal(permute_rows_in_place(buf, idx), x[idx])
    if n >= 2:
        bad = idx.copy()
        bad[0] = bad[1]
        with pytest.raises(ShapeError):
            permute_rows_in_place(x.copy(), bad)


# --- T3 ----------------------------------------------------------------------------------------


def _qkv(data: st.DataObject, n_q: int, n_k: int, h_kv: int, g: int, d_h: int) -> tuple[np.ndarray, ...]:
    q = data.draw(gaussian_arrays((n_q, h_kv * g, d_h)))
    k = data.draw(gaussian_arrays((n_k, h_kv, d_h)))
    v = data.draw(gaussian_arrays((n_k, h_kv, d_h)))
    return q, k, v


@given(
    data=st.data(),
    shape=attention_shapes(),
    n=row_counts(1, 8),
    causal=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.01, 10.0)),
)
def test_t3_attention_commutes_with_head_permutation(
    data: st.DataObject, shape: tuple[int, int, int], n: int, causal: bool, scale: float | None
) -> None:
    """T3: Attn(Q·P, K·P, V·P) = Attn(Q, K, V)·P for head-structured P, GQA ratios 1 to 4, with and
    without the causal mask, any scale."""
    h_kv, g, d_h = shape
    p = data.draw(head_permutations(h_kv, d_h))
    q, k, v = _qkv(data, n, n, h_kv, g, d_h)
    mask = ops.causal_mask(n, n) if causal else None
    plain = ops.attention(q, k, v, mask=mask, scale=scale)
    enc = ops.attention(p.apply(q, g), p.apply(k), p.apply(v), mask=mask, scale=scale)
    np.testing.assert_allclose(enc, p.apply(plain, g), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(p.invert(enc, g), plain, rtol=RTOL, atol=ATOL)


@given(data=st.data(), shape=attention_shapes(), n=row_counts(1, 6))
def test_t3_head_permutation_invert_is_exact(
    data: st.DataObject, shape: tuple[int, int, int], n: int
) -> None:
    """P⁻¹(P(X)) = X bit for bit, for queries (group size G) and keys (group size 1)."""
    h_kv, g, d_h = shape
    p = data.draw(head_permutations(h_kv, d_h))
    x = data.draw(float_matrices(n, h_kv * g, extra_dims=(d_h,)))
    assert np.array_equal(p.invert(p.apply(x, g), g), x)
    assert np.array_equal(HeadPermutation.identity(h_kv, d_h).apply(x, g), x)


@given(
    data=st.data(),
    shape=attention_shapes(),
    n=row_counts(1, 6),
    sizes=st.lists(st.integers(1, 4), max_size=3),
)
def test_t3_stacked_head_permutation_is_blockwise(
    data: st.DataObject, shape: tuple[int, int, int], n: int, sizes: list[int]
) -> None:
    """head_permute_stacked(X, P, (g_1, …)) is head_permute of each block with its own group size, bit for
    bit (one gather for, e.g., the Q and K heads of a fused projection)."""
    h_kv, _, d_h = shape
    p = data.draw(head_permutations(h_kv, d_h))
    x = data.draw(float_matrices(n, h_kv * sum(sizes), extra_dims=(d_h,)))
    got: FloatArray = head_permute_stacked(x, p, tuple(sizes))
    blocks: list[FloatArray] = []
    start = 0
    for g in sizes:
        blocks.append(head_permute(x[:, start : start + h_kv * g], p, g))
        start += h_kv * g
    want = np.concatenate(blocks, axis=1) if blocks else x
    assert np.array_equal(got, want)
    with pytest.raises(ShapeError):
        head_permute_stacked(x, p, (*sizes, 1))


def _mixes_heads(perm: np.ndarray, d_h: int) -> bool:
    """True when some head's coordinates land in more than one head (not head-structured)."""
    heads = perm.reshape(-1, d_h) // d_h
    return bool(np.any(heads.min(axis=1) != heads.max(axis=1)))


@given(data=st.data(), d_h=st.sampled_from([2, 4]), n=row_counts(2, 6), causal=st.booleans())
def test_t3_negative_control_cross_head_permutation_is_not_exact(
    data: st.DataObject, d_h: int, n: int, causal: bool
) -> None:
    """Negative control: a d×d coordinate permutation that mixes coordinates across heads does NOT
    commute with attention (two heads, generic Gaussian data, n ≥ 2 keys)."""
    h = 2
    perm = data.draw(perms(h * d_h))
    assume(_mixes_heads(perm, d_h))
    q, k, v = _qkv(data, n, n, h, 1, d_h)

    def flat_perm(x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], h * d_h)[:, perm].reshape(x.shape)

    mask = ops.causal_mask(n, n) if causal else None
    plain = ops.attention(q, k, v, mask=mask)
    enc = ops.attention(flat_perm(q), flat_perm(k), flat_perm(v), mask=mask)
    # row 0 under the causal mask sees one key (output = v row, exact for any perm): compare the rest
    rows = slice(1, None) if causal else slice(None)
    assert np.max(np.abs(enc[rows] - flat_perm(plain)[rows])) > 1e-6


def test_t3_negative_control_fixed_example() -> None:
    """The same negative control on one fixed generic example (swap coordinate 0 of heads 0 and 1)."""
    rng = np.random.default_rng(1234)
    q, k, v = (rng.standard_normal((5, 2, 4)) for _ in range(3))
    perm = np.arange(8)
    perm[[0, 4]] = perm[[4, 0]]

    def flat_perm(x: np.ndarray) -> np.ndarray:
        return x.reshape(5, 8)[:, perm].reshape(5, 2, 4)

    plain = ops.attention(q, k, v)
    assert np.max(np.abs(ops.attention(flat_perm(q), flat_perm(k), flat_perm(v)) - flat_perm(plain))) > 1e-3
    # …while the head-structured P built from the same within-head coordinates is exact
    p = HeadPermutation(np.array([1, 0]), np.array([[1, 0, 3, 2], [3, 2, 1, 0]]))
    np.testing.assert_allclose(
        ops.attention(p.apply(q), p.apply(k), p.apply(v)), p.apply(plain), rtol=RTOL, atol=ATOL
    )


@given(
    data=st.data(),
    h_kv=st.integers(1, 2),
    d_h=st.sampled_from([2, 4, 8]),
    n=row_counts(1, 6),
    start=st.integers(1, 16),
)
def test_t3_rope_does_not_commute_with_sigma(
    data: st.DataObject, h_kv: int, d_h: int, n: int, start: int
) -> None:
    """RoPE after σ differs from RoPE before σ (σ ≠ id, positions ≥ 1): so the client applies RoPE
    before T3."""
    p = data.draw(head_permutations(h_kv, d_h))
    assume(not np.array_equal(p.sigmas, np.tile(np.arange(d_h), (h_kv, 1))))
    k = data.draw(gaussian_arrays((n, h_kv, d_h)))
    pos = np.arange(start, start + n)
    after = ops.apply_rope(p.apply(k), pos, 10000.0)
    before = p.apply(ops.apply_rope(k, pos, 10000.0))
    assert np.max(np.abs(after - before)) > 1e-6


# --- T4 ----------------------------------------------------------------------------------------


@given(
    data=st.data(),
    shape=attention_shapes(),
    n_q=row_counts(1, 4),
    n_k=row_counts(1, 10),
    scale=st.one_of(st.none(), st.floats(0.01, 10.0)),
)
def test_t4_full_attention_is_invariant_to_cache_order(
    data: st.DataObject, shape: tuple[int, int, int], n_q: int, n_k: int, scale: float | None
) -> None:
    """T4: Attn(q, K[ρ], V[ρ]) = Attn(q, K, V) when every query attends to every cached row."""
    h_kv, g, d_h = shape
    q, k, v = _qkv(data, n_q, n_k, h_kv, g, d_h)
    rho = data.draw(perms(n_k))
    k2: FloatArray
    v2: FloatArray
    k2, v2 = reorder_cache(k, v, rho)
    assert np.array_equal(k2, k[rho]) and np.array_equal(v2, v[rho])
    np.testing.assert_allclose(
        ops.attention(q, k2, v2, scale=scale), ops.attention(q, k, v, scale=scale), rtol=RTOL, atol=ATOL
    )


@given(
    data=st.data(),
    n=row_counts(0, 8),
    r=decoy_counts(),
    appended=st.integers(0, 4),
    heads=st.integers(1, 4),
    n_q=row_counts(1, 3),
)
def test_t4_unlock_scores_returns_the_true_order_scores(
    data: st.DataObject, n: int, r: int, appended: int, heads: int, n_q: int
) -> None:
    """T4 + T2 decode of scores: the server scores a query against the locked cache ``encode_rows(K, R, ρ)``
    (row j is row ρ[j] of [K; R], what the client sends at LOCK) followed by rows appended in true order;
    a score is a function of its key row alone, so column j of those scores is column ρ[j] of the scores
    against [K; R; appended]. ``unlock_scores(·, ρ, n)`` gives back exactly the scores against [K;
    appended] in true order: every real row back in place, every decoy dropped (n = 0, r = 0 and no
    appended rows included)."""
    assume(n + r > 0)
    rho = data.draw(perms(n + r))
    # true[h, i, c]: query i's score in head h against row c of [K; R; appended]
    true = data.draw(gaussian_arrays((heads, n_q, n + r + appended)))

    def columns_as_rows(cols: np.ndarray) -> np.ndarray:
        rows: np.ndarray = cols.reshape(heads * n_q, -1).T
        return rows

    locked: np.ndarray = encode_rows(
        columns_as_rows(true[..., :n]), columns_as_rows(true[..., n : n + r]), rho
    )
    sent = np.concatenate([locked.T.reshape(heads, n_q, n + r), true[..., n + r :]], axis=-1)
    got: np.ndarray = unlock_scores(sent, rho, n)
    assert np.array_equal(got, np.concatenate([true[..., :n], true[..., n + r :]], axis=-1))


# --- T5 ----------------------------------------------------------------------------------------


@given(
    data=st.data(),
    n=row_counts(1, 6),
    d=st.integers(1, 16),
    m=st.integers(1, 8),
    beta=st.one_of(st.just(0.0), st.floats(1e-3, 1e6)),
    seed=seeds(),
    with_bias=st.booleans(),
)
def test_t5_unblind_of_blinded_projection(
    data: st.DataObject, n: int, d: int, m: int, beta: float, seed: int, with_bias: bool
) -> None:
    """T5: unblind(project(blind(x, η)), ηW) == xW + b in float64, within the rounding bound
    (d + 3)·eps·((|x| + |η|)|W| + |b|) of the server's dot products and the client's subtraction."""
    x = data.draw(float_matrices(n, d))
    w = data.draw(float_matrices(d, m))
    b = data.draw(float_matrices(m)) if with_bias else np.zeros(m)
    eta = laplace_noise((n, d), beta, np.random.default_rng(seed))
    y: FloatArray = unblind(ops.linear(blind(x, eta), w, b), blinding_correction(eta, w))
    eps = np.finfo(np.float64).eps
    tol = 2.0 * (d + 3) * eps * ((np.abs(x) + np.abs(eta)) @ np.abs(w) + np.abs(b))
    assert np.all(np.abs(y - ops.linear(x, w, b)) <= tol)


def _noise_sources() -> dict[str, Any]:
    from scx_ref.keys import KeySchedule

    ks = KeySchedule(bytes(range(32)), bytes(range(16)))
    return {"keystream": ks.generator(("mask", 0, 0)), "numpy": np.random.default_rng(2025)}


@pytest.mark.parametrize("source", ["keystream", "numpy"])
@pytest.mark.parametrize("beta", [0.5, 5.0])
def test_laplace_noise_moments(source: str, beta: float) -> None:
    """laplace_noise: E|η| = β and Var η = 2β² (within 5 standard errors over N = 200 000 draws,
    fixed generators), mean ≈ 0, and a KS test against Laplace(0, β) does not reject at α = 0.001."""
    from scipy import stats

    n = 200_000
    eta = laplace_noise((n,), beta, _noise_sources()[source])
    assert eta.dtype == np.float64 and np.all(np.isfinite(eta))
    # |η| ~ Exp(β): sd β; η² has variance 20β⁴; η has sd √2·β
    assert abs(np.mean(np.abs(eta)) - beta) <= 5 * beta / np.sqrt(n)
    assert abs(np.mean(eta**2) - 2 * beta**2) <= 5 * np.sqrt(20) * beta**2 / np.sqrt(n)
    assert abs(np.mean(eta)) <= 5 * np.sqrt(2) * beta / np.sqrt(n)
    assert stats.kstest(eta, stats.laplace(scale=beta).cdf).pvalue > 1e-3


def test_laplace_noise_has_teeth_and_edge_cases() -> None:
    """The moment test rejects the wrong scale; β = 0 gives exact zeros; dtype and shape are honoured."""
    from scipy import stats

    eta = laplace_noise((50_000,), 1.0, np.random.default_rng(7))
    assert stats.kstest(eta, stats.laplace(scale=1.1).cdf).pvalue < 1e-3
    zeros = laplace_noise((3, 4), 0.0, np.random.default_rng(0))
    assert zeros.shape == (3, 4) and not np.any(zeros)
    assert laplace_noise((2, 3), 2.0, np.random.default_rng(0), dtype=np.float32).dtype == np.float32

"""torch = numpy: the transforms (T1–T6, one implementation over ArrayOps) run on TorchOps equal the same
functions run on numpy, and every TorchBackend method equals the numpy reference.

Tolerances
----------
* Gathers (T1–T4, take/put rows, head permutations, narrow, concat) are exact in every dtype: they
  move values, never round them. Checked with ``array_equal``.
* float64 arithmetic: rtol 1e-12 (plus atol 1e-12·scale, scale = the magnitude of the terms summed, so
  an entry that cancels to ~0 is judged against the size of what cancelled). Summation order differs
  between BLAS/einsum and torch kernels; with unit roundoff u = 2⁻⁵³ ≈ 1.1e-16 and the short reductions
  here (k ≤ 64) the worst-case bound k·u·scale ≈ 7e-15·scale is far inside 1e-12·scale, so a real
  mistake (a wrong index, a missing bias, a transposed weight) cannot hide in it.
* float32 / bfloat16 / float16 projections: the classical bound for a length-k dot product of inputs
  rounded to the dtype is |fl(x·w) − x·w| ≤ (k + 2)·u·(|x|·|w|) (k roundings in the sum, one per input
  rounding, one for the output); u = 2⁻²⁴ (float32), 2⁻⁸ (bfloat16), 2⁻¹¹ (float16). The check uses
  twice that bound, elementwise, against the float64 numpy result of the *unrounded* inputs. Where
  values underflow (Hypothesis finds β at float32's smallest normal), each operation may also add an
  absolute error of half the subnormal spacing, so (k + 2)·spacing is added to the bound.
* float32 norms / attention: RMSNorm is a length-d reduction then a scale: tolerance (d + 4)·u·|γ|·|x̂|;
  attention (scores of length d_h, softmax, values of length n_k): (d_h + n_k + 8)·u·max|v|, since the
  output is a convex combination of value rows and each weight carries (d_h + n_k + c)·u relative error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import (
    FloatArray,
    attention_shapes,
    decoy_counts,
    head_permutations,
    model_weights,
    perms,
    row_counts,
    row_indices,
    seeds,
    sized_perms,
    token_ids,
    torch_dtypes,
)
from scx_ref import transforms as T
from scx_ref.arrays import ArrayOps, NumpyOps
from scx_ref.backends import cpu_kernels, torch_backend
from scx_ref.backends.base import IndexArray, NormName, WeightName
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend, TorchOps, dense, spare_rows
from scx_ref.errors import SCXError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_weights

RTOL = 1e-12
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
# spacing of the subnormals (= smallest normal · 2u): the absolute term of the standard error model
# fl(a ∘ b) = (a ∘ b)(1 + δ) + ε, |δ| ≤ u, |ε| ≤ spacing/2, which matters once values underflow
SUBNORMAL_SPACING = {dt: float(torch.finfo(dt).smallest_normal) * 2 * UNIT_ROUNDOFF[dt] for dt in DTYPES}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _rounded(x: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """x in ``dtype`` as a tensor, and the same (rounded) values in float64 numpy."""
    t = torch.from_numpy(x).to(dtype)
    return t, _np(t)


def _close64(got: np.ndarray, want: np.ndarray, scale: np.ndarray | float | None = None) -> None:
    s = np.max(np.abs(want)) if scale is None else np.max(scale)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(float(s), 1e-300))


def _gauss(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape)


# --- transforms ---------------------------------------------------------------------------------


@given(sized_perms(min_n=1), st.integers(1, 6), seeds(), torch_dtypes())
def test_permute_unpermute_match_numpy_exactly(
    np_perm: tuple[int, np.ndarray], d: int, seed: int, dtype: torch.dtype
) -> None:
    n, perm = np_perm
    ops = TorchOps(dtype)
    x, x64 = _rounded(_gauss(seed, (n, d)), dtype)
    got = T.permute_rows(x, perm, ops)
    assert got.dtype == dtype
    assert np.array_equal(_np(got), T.permute_rows(x64, perm))
    assert np.array_equal(_np(T.unpermute_rows(x, perm, ops)), T.unpermute_rows(x64, perm))
    assert np.array_equal(_np(T.unpermute_rows(got, perm, ops)), x64)


@given(row_counts(), decoy_counts(), st.integers(1, 6), seeds(), torch_dtypes(), st.data())
def test_decoy_encode_decode_match_numpy_exactly(
    n: int, r: int, d: int, seed: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    perm = data.draw(perms(n + r))
    ops = TorchOps(dtype)
    x, x64 = _rounded(_gauss(seed, (n, d)), dtype)
    dec, dec64 = _rounded(_gauss(seed + 1, (r, d)), dtype)
    enc = T.encode_rows(x, dec, perm, ops)
    assert np.array_equal(_np(enc), T.encode_rows(x64, dec64, perm))
    assert np.array_equal(_np(T.with_decoys(x, dec, ops)), T.with_decoys(x64, dec64))
    assert np.array_equal(
        _np(T.strip_decoys(enc, n, ops)), T.strip_decoys(T.encode_rows(x64, dec64, perm), n)
    )
    assert np.array_equal(
        _np(T.decode_rows(enc, perm, n, ops)), T.decode_rows(T.encode_rows(x64, dec64, perm), perm, n)
    )
    assert np.array_equal(_np(T.decode_rows(enc, perm, n, ops)), x64)
    assert np.array_equal(T.decode_rows_numpy(enc, perm, n, ops), _np(T.decode_rows(enc, perm, n, ops)))
    assert np.array_equal(_np(enc), _np(T.permute_rows(T.with_decoys(x, dec, ops), perm, ops)))
    decoded = T.decode_rows_numpy(enc.clone(), perm, n, ops, in_place=True)  # consumes its input
    assert np.array_equal(decoded, x64) and decoded.dtype == ops.numpy_dtype()


@given(row_counts(), decoy_counts(), decoy_counts(), st.integers(1, 6), seeds(), torch_dtypes(), st.data())
def test_reencode_sum_matches_numpy_exactly(
    n: int, r: int, r_o: int, d: int, seed: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    """The client's residual re-encoding (torch, Permutation keys) equals numpy's decode–add–encode."""
    pi, pi_s, pi_y = data.draw(perms(n + r)), data.draw(perms(n + r)), data.draw(perms(n + r_o))
    ops = TorchOps(dtype)
    s, s64 = _rounded(_gauss(seed, (n + r, d)), dtype)
    y, y64 = _rounded(_gauss(seed + 1, (n + r_o, d)), dtype)
    dec, dec64 = _rounded(_gauss(seed + 2, (r, d)), dtype)
    got = T.reencode_sum(s, T.Permutation(pi_s), y, T.Permutation(pi_y), dec, T.Permutation(pi), ops)
    assert got.dtype == dtype
    want = ops.add(T.decode_rows(s, pi_s, n, ops), T.decode_rows(y, pi_y, n, ops))
    assert np.array_equal(_np(got), _np(T.encode_rows(want, dec, pi, ops)))
    if dtype == torch.float64:
        assert np.array_equal(_np(got), T.reencode_sum(s64, pi_s, y64, pi_y, dec64, pi))


@given(
    attention_shapes(),
    row_counts(),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seeds(),
    torch_dtypes(),
    st.data(),
)
def test_stacked_head_permutation_matches_numpy_exactly(
    shape: tuple[int, int, int], n: int, sizes: list[int], seed: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    h_kv, _, d_h = shape
    hp = data.draw(head_permutations(h_kv, d_h))
    x, x64 = _rounded(_gauss(seed, (n, h_kv * sum(sizes), d_h)), dtype)
    got = T.head_permute_stacked(x, hp, tuple(sizes), TorchOps(dtype))
    assert np.array_equal(_np(got), T.head_permute_stacked(x64, hp, tuple(sizes)))


@given(attention_shapes(), row_counts(), seeds(), torch_dtypes(), st.data())
def test_head_permutation_matches_numpy_exactly(
    shape: tuple[int, int, int], n: int, seed: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    h_kv, g, d_h = shape
    ops = TorchOps(dtype)
    hp = data.draw(head_permutations(h_kv, d_h))
    for group in (g, 1):
        x, x64 = _rounded(_gauss(seed, (n, h_kv * group, d_h)), dtype)
        enc = T.head_permute(x, hp, group, ops)
        assert np.array_equal(_np(enc), T.head_permute(x64, hp, group))
        assert np.array_equal(_np(T.head_unpermute(enc, hp, group, ops)), x64)
        assert np.array_equal(_np(T.head_unpermute(x, hp, group, ops)), T.head_unpermute(x64, hp, group))


@given(sized_perms(min_n=1), st.integers(1, 3), st.integers(1, 4), seeds(), torch_dtypes())
def test_reorder_cache_matches_numpy_exactly(
    np_perm: tuple[int, np.ndarray], h: int, d_h: int, seed: int, dtype: torch.dtype
) -> None:
    n, rho = np_perm
    k, k64 = _rounded(_gauss(seed, (n, h, d_h)), dtype)
    v, v64 = _rounded(_gauss(seed + 7, (n, h, d_h)), dtype)
    kt, vt = T.reorder_cache(k, v, rho, TorchOps(dtype))
    kn: FloatArray
    vn: FloatArray
    kn, vn = T.reorder_cache(k64, v64, rho)
    assert np.array_equal(_np(kt), kn) and np.array_equal(_np(vt), vn)
    scores, s64 = _rounded(_gauss(seed + 9, (h, 2, n + 3)), dtype)  # n locked rows, 3 appended
    got = T.unlock_scores(scores, rho, n - n // 2, TorchOps(dtype))
    assert np.array_equal(_np(got), T.unlock_scores(s64, rho, n - n // 2))


@given(row_counts(), st.integers(1, 16), st.integers(1, 16), seeds(), torch_dtypes(), st.floats(0.0, 50.0))
def test_blinding_matches_numpy(n: int, d: int, m: int, seed: int, dtype: torch.dtype, beta: float) -> None:
    ops = TorchOps(dtype)
    x, x64 = _rounded(_gauss(seed, (n, d)), dtype)
    eta, eta64 = _rounded(T.laplace_noise((n, d), beta, np.random.default_rng(seed + 1)), dtype)
    w, w64 = _rounded(_gauss(seed + 2, (d, m), 1 / np.sqrt(d)), dtype)
    wt = w.T.contiguous()  # TorchOps.linear takes the out × in layout
    u = UNIT_ROUNDOFF[dtype]
    # blind/unblind: one rounding of an exact sum → within u·(|x| + |η|) of the float64 sum
    sum_scale = np.abs(x64) + np.abs(eta64)
    blinded = T.blind(x, eta, ops)
    assert np.all(np.abs(_np(blinded) - T.blind(x64, eta64)) <= u * sum_scale)
    corr = T.blinding_correction(eta, wt, ops)
    corr_scale = np.abs(eta64) @ np.abs(w64)
    want: FloatArray = T.blinding_correction(eta64, w64)
    if dtype == torch.float64:
        _close64(_np(corr), want, corr_scale)
    else:  # length-d reduction in the dtype (see module doc)
        lam = SUBNORMAL_SPACING[dtype]
        assert np.all(np.abs(_np(corr) - want) <= 2 * (d + 2) * (u * corr_scale + lam))
    y = T.blinding_correction(blinded, wt, ops)
    un = T.unblind(y, corr, ops)
    un_scale = (np.abs(x64) + 2 * np.abs(eta64)) @ np.abs(w64)
    if dtype == torch.float64:
        _close64(_np(un), T.unblind(T.blinding_correction(T.blind(x64, eta64), w64), want), un_scale)
    else:
        assert np.all(np.abs(_np(un) - x64 @ w64) <= 4 * (d + 3) * (u * un_scale + lam))


@given(
    st.tuples(st.integers(0, 5), st.integers(0, 5)),
    st.floats(0.0, 1e3),
    seeds(),
    torch_dtypes(),
    st.booleans(),
)
def test_laplace_noise_bit_for_bit(
    shape: tuple[int, int], beta: float, seed: int, dtype: torch.dtype, keystream: bool
) -> None:
    """The noise is drawn once on the host (float64) and moved as the client moves it (``from_numpy``):
    bit for bit in float64, correctly rounded once in a narrower dtype, for either kind of generator."""

    def gen() -> Any:
        if keystream:
            return KeySchedule((seed + 1).to_bytes(32, "big"), b"\x01" * 16).generator(("alpha", 0, "qkv"))
        return np.random.default_rng(seed)

    got = TorchOps(dtype).from_numpy(T.laplace_noise(shape, beta, gen(), np.float64))
    want = T.laplace_noise(shape, beta, gen(), np.float64)
    assert got.dtype == dtype and tuple(got.shape) == shape
    if dtype == torch.float64:
        assert np.array_equal(got.numpy(), want)  # bit for bit
    else:
        assert torch.equal(got, torch.from_numpy(want).to(dtype))  # correctly rounded once


@given(sized_perms(min_n=2), seeds())
def test_torch_transforms_reject_bad_input_like_numpy(np_perm: tuple[int, np.ndarray], seed: int) -> None:
    n, perm = np_perm
    x = _gauss(seed, (n, 3))
    bad_perm = perm.copy()
    bad_perm[0] = bad_perm[1]
    cases: list[Callable[[ArrayOps[Any]], object]] = [
        (lambda o: T.permute_rows(x, bad_perm, o)),
        (lambda o: T.permute_rows(x, perm[:-1], o)),
        (lambda o: T.permute_rows(np.where(np.arange(n)[:, None] == 0, np.nan, x), perm, o)),
        (lambda o: T.permute_rows(x.astype(np.int64), perm, o)),
        (lambda o: T.with_decoys(x, np.zeros((1, 4)), o)),
        (lambda o: T.encode_rows(x, np.full((1, 3), np.inf), np.arange(n + 1), o)),
        (lambda o: T.encode_rows(np.where(np.arange(n)[:, None] == 0, np.nan, x), x[:0], perm, o)),
        (lambda o: T.strip_decoys(x, n + 1, o)),
        (lambda o: T.blind(x, x[:, :2], o)),
        (lambda o: T.blinding_correction(x, np.ones((4, 2)), o)),
        (lambda o: T.unblind(x, x[:1], o)),
        (lambda o: T.reorder_cache(x, x[:-1], perm, o)),
        (lambda o: T.unlock_scores(x[:, :1], perm, n, o)),  # n locked rows need ≥ n score columns
    ]
    for case in cases:
        with pytest.raises(SCXError) as np_err:
            case(T.NUMPY)
        with pytest.raises(SCXError) as torch_err:
            case(TorchOps(torch.float64))
        assert type(np_err.value) is type(torch_err.value)


# --- backend methods (float64) ----------------------------------------------------------------------


def _pair(w: ModelWeights) -> tuple[NumpyBackend, TorchBackend]:
    return NumpyBackend(w), TorchBackend(w, torch.float64)


@contextlib.contextmanager
def gemm_blocks(block: int, rows: int, pad_from: int | None = None) -> Iterator[None]:
    """:func:`dense` splitting every product of ≥ ``rows`` rows and ≥ 2·``block`` outputs into column
    blocks of ``block``, at any input width (the test models are far narrower than the default threshold);
    with ``pad_from``, padding every product of ``pad_from`` to ``rows`` − 1 rows with zero rows to ``rows``
    rows, at any weight count."""
    names: tuple[str, ...] = ("GEMM_BLOCK_MIN_IN", "GEMM_BLOCK", "GEMM_BLOCK_ROWS")
    names += ("GEMM_PAD_MIN_ROWS", "GEMM_PAD_MIN_WEIGHTS")
    saved = [getattr(torch_backend, k) for k in names]
    pad = (pad_from, 0) if pad_from is not None else (rows, torch_backend.GEMM_PAD_MIN_WEIGHTS)
    for k, v in zip(names, (0, block, rows, *pad), strict=True):
        setattr(torch_backend, k, v)
    try:
        yield
    finally:
        for k, v in zip(names, saved, strict=True):
            setattr(torch_backend, k, v)


@given(
    row_counts(max_n=40),
    st.integers(1, 40),
    st.integers(1, 70),
    st.integers(1, 9),
    st.integers(1, 17),
    st.booleans(),
    st.booleans(),
    seeds(),
    torch_dtypes(),
)
def test_dense_is_one_gemm_up_to_rounding(
    n: int,
    d_in: int,
    d_out: int,
    block: int,
    from_rows: int,
    pad: bool,
    with_bias: bool,
    seed: int,
    dtype: torch.dtype,
) -> None:
    """``dense`` in column blocks (forced small, from ``from_rows`` rows), on rows padded with zero rows to
    ``from_rows`` (``pad``, forced at any size) and one ``F.linear`` are each the length-``in`` dot
    products of x·Wᵀ + b up to the dot-product bound γ·(|x|·|W|ᵀ + |b|), γ = (in + 1)·u/(1 − (in + 1)·u),
    of their (common) rounded inputs: so within twice it of each other, and of the float64 product of
    those inputs within once it. Every output column is written (none left as ``empty``'s garbage), and
    only ``x``'s rows are returned."""
    rng = np.random.default_rng(seed)
    x, x64 = _rounded(rng.standard_normal((n, d_in)), dtype)
    w, w64 = _rounded(rng.standard_normal((d_out, d_in)), dtype)
    b, b64 = _rounded(rng.standard_normal(d_out), dtype) if with_bias else (None, np.zeros(d_out))
    with gemm_blocks(block, from_rows, 1 if pad else None):
        got = _np(dense(x, w, b))
    one = _np(torch.nn.functional.linear(x, w, b))
    u = UNIT_ROUNDOFF[dtype]
    k = (d_in + 1) * u
    # low precision: the product may be accumulated in float32 and rounded once more at the end
    gamma = k / (1 - k) + (u if dtype in (torch.bfloat16, torch.float16) else 0.0)
    magnitude = np.abs(x64) @ np.abs(w64).T + np.abs(b64)
    bound = gamma * magnitude + SUBNORMAL_SPACING[dtype] * (d_in + 2)
    # the reference product, itself rounded: in float64 its own error is of the order of a float64 run's
    # bound, so a float64 run is compared with a wider product (long double, where it is wider), within
    # that product's own dot-product bound; without one, within the two bounds together
    wide = np.longdouble if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps else np.float64
    ref = np.float64 if dtype != torch.float64 else wide
    k_ref = (d_in + 1) * float(np.finfo(ref).eps) / 2
    exact = x64.astype(ref) @ w64.T.astype(ref) + b64.astype(ref)
    ref_bound = k_ref / (1 - k_ref) * magnitude + float(np.finfo(ref).smallest_subnormal) * (d_in + 2)
    assert got.shape == (n, d_out) and np.all(np.isfinite(got))
    assert np.all(np.abs(got.astype(ref) - exact) <= bound + ref_bound)
    assert np.all(np.abs(got - one) <= 2 * bound)


def test_dense_pads_short_inputs_of_large_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default thresholds, ``dense`` multiplies 8–15 rows by a weight of ≥ 4 M entries as 16 rows
    (the first rows returned, contiguous, each within the dot-product bound of the float64 product), and
    leaves fewer rows, smaller weights and products that need gradients as given."""
    seen: list[int] = []
    inner = torch_backend._dense

    def spy(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *, pooled: bool) -> torch.Tensor:
        seen.append(x.shape[0])
        return inner(x, w, bias, pooled=pooled)

    monkeypatch.setattr(torch_backend, "_dense", spy)
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(2048, 2048, generator=gen)  # 4.19 M weights: a 1B-wide model's W_o
    small = big[:, :1024].contiguous()  # 2.1 M
    bias = torch.randn(2048, generator=gen)
    for rows, w, b, want in [
        (10, big, None, 16),
        (8, big, bias, 16),
        (15, big, None, 16),
        (7, big, None, 7),
        (16, big, None, 16),
        (10, small, None, 10),
    ]:
        x = torch.randn(rows, w.shape[1], generator=gen)
        with torch.inference_mode():
            got = dense(x, w, b)
        assert seen.pop() == want and got.shape == (rows, 2048) and got.is_contiguous()
        exact = x.double() @ w.double().T + (0 if b is None else b.double())
        gamma = (w.shape[1] + 1) * 2.0**-24 / (1 - (w.shape[1] + 1) * 2.0**-24)
        bound = gamma * (x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs()))
        assert bool(((got.double() - exact).abs() <= bound).all())
    x = torch.randn(10, 2048, generator=gen, requires_grad=True)
    torch.autograd.backward(dense(x, big).sum())  # autograd: F.linear on the rows as given
    assert seen.pop() == 10 and x.grad is not None and x.grad.shape == x.shape


@given(
    model_weights(),
    seeds(),
    row_counts(max_n=9),
    st.sampled_from([None, (1, 1, None), (3, 2, None), (3, 8, 1), (64, 8, 1)]),
)
def test_backend_weight_ops_match_numpy(
    w: ModelWeights, seed: int, n: int, blocks: tuple[int, int, int | None] | None
) -> None:
    """Every weight op of the torch backend agrees with numpy's in float64, with :func:`dense` as one
    GEMM (``None``), split into column blocks (forced on the small models: block, fewest rows) or on rows
    padded to 8 (forced at any size: then in blocks of 3, or as one GEMM where the outputs are < 128)."""
    with gemm_blocks(*blocks) if blocks else contextlib.nullcontext():
        _weight_ops_match_numpy(w, seed, n)


def _weight_ops_match_numpy(w: ModelWeights, seed: int, n: int) -> None:
    nb, tb = _pair(w)
    c = w.config
    x = _gauss(seed, (n, c.hidden_size))
    xt = tb.from_numpy(x)
    assert np.array_equal(tb.to_numpy(xt), x) and tb.numpy_dtype() == np.float64
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, size=n)
    assert np.array_equal(tb.to_numpy(tb.embed(ids)), nb.embed(ids))
    norms: tuple[NormName, ...] = ("attn", "mlp", "final")
    for norm in norms:
        for layer in range(c.n_layers):
            _close64(tb.to_numpy(tb.norm(xt, norm, layer)), nb.norm(x, norm, layer))
    for layer in range(c.n_layers):
        _close64(tb.to_numpy(tb.mlp(xt, layer)), nb.mlp(x, layer))
        names: list[tuple[WeightName, IndexArray | None, int]] = [
            ("wqkv", None, c.hidden_size),
            ("wo", None, c.q_dim),
        ]
        if c.is_moe:
            chosen = np.random.default_rng(seed).permutation(c.n_experts)[: c.top_k]
            names += [
                ("router", None, c.hidden_size),
                ("w_gate_up", chosen, c.hidden_size),
                ("w_down", chosen, c.intermediate_size * len(chosen)),
            ]
        else:
            names += [("w_gate_up", None, c.hidden_size), ("w_down", None, c.intermediate_size)]
        for which, experts, width in names:
            a = _gauss(seed + 3, (n, width))
            at = tb.from_numpy(a)
            want = nb.project(a, which, layer, experts)
            _close64(tb.to_numpy(tb.project(at, which, layer, experts)), want)
            _close64(
                tb.to_numpy(tb.correction(at, which, layer, experts)),
                nb.correction(a, which, layer, experts),
            )
    _close64(tb.to_numpy(tb.project(xt, "lm_head")), nb.project(x, "lm_head"))
    gu = _gauss(seed + 5, (n, 2 * c.intermediate_size), 3.0)
    _close64(tb.to_numpy(tb.swiglu_act(tb.from_numpy(gu))), nb.swiglu_act(gu))


@pytest.mark.parametrize("numba", ["1", "0"])
@given(model_weights(), seeds(), row_counts(max_n=9), st.data())
def test_rows_finite_is_the_scan_of_the_rows(
    numba: str, w: ModelWeights, seed: int, n: int, data: st.DataObject
) -> None:
    """rows_finite(x, index) = all entries of x[index] finite, on torch (the in-place kernel and, with
    SCX_NUMBA=0, the eager gather) and on numpy, for any rows (distinct, repeated, none) and a NaN or ±inf
    anywhere."""
    nb, tb = _pair(w)
    x = _gauss(seed, (n, w.config.hidden_size))
    bad = data.draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    if bad is not None:
        x[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, x.shape[1] - 1))] = bad
    index = data.draw(row_indices(n))
    want = bool(np.isfinite(x[index]).all())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", numba == "1")
        assert tb.rows_finite(tb.from_numpy(x), index) == want
    assert nb.rows_finite(x, index) == want


@given(model_weights(), seeds(), row_counts(max_n=9), st.data())
def test_backend_array_ops_match_numpy(w: ModelWeights, seed: int, n: int, data: st.DataObject) -> None:
    nb, tb = _pair(w)
    c = w.config
    x = _gauss(seed, (n, c.hidden_size))
    xt = tb.from_numpy(x)
    perm = data.draw(perms(n))
    index = data.draw(row_indices(n))
    assert np.array_equal(tb.to_numpy(tb.take_rows(xt, perm)), nb.take_rows(x, perm))
    assert np.array_equal(tb.to_numpy(tb.take_rows(xt, index)), nb.take_rows(x, index))
    assert np.array_equal(tb.rows_to_numpy(xt, index), nb.rows_to_numpy(x, index))
    assert np.array_equal(nb.rows_to_numpy(x, index), nb.to_numpy(nb.take_rows(x, index)))
    assert np.array_equal(tb.to_numpy(tb.concat_rows([xt, xt[:1]])), nb.concat_rows([x, x[:1]]))
    split = data.draw(st.integers(0, n))
    cut = data.draw(st.integers(split, n))
    parts_t, parts_n = [xt[:split], xt[split:cut], xt[cut:]], [x[:split], x[split:cut], x[cut:]]
    for idx in (perm, index):  # a permutation, and any index (distinct rows or repeats)
        got = tb.to_numpy(tb.take_rows_concat(parts_t, idx))
        assert np.array_equal(got, x[idx]) and np.array_equal(nb.take_rows_concat(parts_n, idx), x[idx])
        assert np.array_equal(tb.to_numpy(tb.take_rows_concat([xt[:split], xt[split:]], idx)), x[idx])
        # the gather is fresh memory: adding into it leaves the sources as they were
        y, x0 = _gauss(seed + 1, (len(idx), c.hidden_size)), x.copy()
        yt = tb.from_numpy(y)
        assert np.array_equal(tb.to_numpy(tb.add_into(tb.take_rows_concat(parts_t, idx), yt)), x[idx] + y)
        assert np.array_equal(nb.add_into(nb.take_rows_concat(parts_n, idx), y), x[idx] + y)
        assert np.array_equal(tb.to_numpy(xt), x0) and np.array_equal(x, x0)
    assert np.array_equal(tb.to_numpy(tb.take_rows_in_place(xt.clone(), perm)), x[perm])
    assert np.array_equal(nb.take_rows_in_place(x.copy(), perm), x[perm])
    view = tb.narrow(xt, 1, 0, 1)
    packed = tb.compact(view)
    assert np.array_equal(tb.to_numpy(packed), nb.compact(x[:, :1])) and packed.is_contiguous()
    assert packed.untyped_storage().nbytes() == packed.numel() * packed.element_size()
    assert np.array_equal(tb.head_to_numpy(xt, n - 1), nb.head_to_numpy(x, n - 1))
    lo = data.draw(st.integers(0, c.hidden_size))
    hi = data.draw(st.integers(lo, c.hidden_size))
    assert np.array_equal(tb.to_numpy(tb.narrow(xt, 1, lo, hi)), nb.narrow(x, 1, lo, hi))
    assert np.array_equal(tb.to_numpy(tb.narrow(xt, 0, 0, n - 1)), nb.narrow(x, 0, 0, n - 1))
    assert tb.nrows(xt) == nb.nrows(x) and tb.shape(xt) == nb.shape(x)
    assert np.array_equal(tb.to_numpy(tb.reshape(xt, (-1,))), nb.reshape(x, (-1,)))
    sw = _gauss(seed + 1, (n,))
    assert np.array_equal(tb.to_numpy(tb.scale_rows(xt, sw)), nb.scale_rows(x, sw))
    cols = data.draw(perms(c.hidden_size))
    assert np.array_equal(tb.to_numpy(tb.take_last(xt, cols)), nb.take_last(x, cols))
    y = _gauss(seed + 2, (n, c.hidden_size))
    assert np.array_equal(tb.to_numpy(tb.add(xt, tb.from_numpy(y))), nb.add(x, y))
    assert np.array_equal(tb.to_numpy(tb.sub(xt, tb.from_numpy(y))), nb.sub(x, y))
    assert tb.argmax_last(xt) == nb.argmax_last(x)
    ties = np.zeros((2, 5))
    assert tb.argmax_last(tb.from_numpy(ties)) == nb.argmax_last(ties) == 0
    wm = _gauss(seed + 4, (c.hidden_size, 3))
    _close64(tb.to_numpy(tb.linear(xt, tb.from_numpy(wm.T.copy()))), nb.linear(x, wm))


@given(
    seeds(),
    row_counts(min_n=0, max_n=6),
    st.lists(st.tuples(st.integers(0, 70), st.integers(-1, 8)), min_size=1, max_size=10),
)
def test_append_rows_is_concat_and_leaves_every_earlier_cache_as_it_was(
    seed: int, n0: int, steps: list[tuple[int, int]]
) -> None:
    """``append_rows`` = numpy's concatenation, whichever cache a step extends (``which`` ≥ 0: an earlier
    one, as a refused step's retry does; −1: the latest), with appends of 0 rows and of more rows than the
    spare ones (64); no cache made before changes; a buffer holds at most :func:`spare_rows` spare rows."""
    tb, nb = TorchOps(torch.float32), NumpyOps(np.float32)
    first = _gauss(seed, (n0, 2, 3)).astype(np.float32)
    made = [(tb.from_numpy(first), first)]
    for i, (m, which) in enumerate(steps):
        base_t, base_n = made[-1] if which < 0 else made[which % len(made)]
        rows = _gauss(seed + 1 + i, (m, 2, 3)).astype(np.float32)
        got_t, got_n = tb.append_rows(base_t, tb.from_numpy(rows)), nb.append_rows(base_n, rows)
        assert np.array_equal(got_n, np.concatenate([base_n, rows]))
        assert np.array_equal(tb.to_numpy(got_t), got_n)
        held = got_t.shape[0]
        assert got_t.untyped_storage().nbytes() <= (held + spare_rows(held)) * 6 * 4
        made.append((got_t, got_n))
    for t, a in made:
        assert np.array_equal(tb.to_numpy(t), a)
    with pytest.raises(SCXError):
        tb.append_rows(made[-1][0], tb.from_numpy(np.zeros((1, 3, 2), np.float32)))


@given(model_weights(), seeds(), row_counts(max_n=9), st.data())
def test_backend_attention_ops_match_numpy(w: ModelWeights, seed: int, n: int, data: st.DataObject) -> None:
    nb, tb = _pair(w)
    c = w.config
    m = data.draw(st.integers(1, 10))
    q = _gauss(seed, (n, c.n_heads, c.head_dim), 2.0)
    k = _gauss(seed + 1, (m, c.n_kv_heads, c.head_dim), 2.0)
    v = _gauss(seed + 2, (m, c.n_kv_heads, c.head_dim))
    qt, kt, vt = (tb.from_numpy(a) for a in (q, k, v))
    pos = np.array(data.draw(st.lists(st.integers(0, 40), min_size=n, max_size=n)), dtype=np.int64)
    _close64(tb.to_numpy(tb.rope(qt, pos)), nb.rope(q, pos), np.abs(q).max())
    kpos_choices = [
        None,
        np.array(data.draw(st.lists(st.integers(0, 40), min_size=m, max_size=m)), dtype=np.int64),
    ]
    if n == m:
        kpos_choices.append(np.arange(n))  # the causal fast path
        pos_sorted = np.arange(n)
        _close64(
            tb.to_numpy(tb.attention(qt, kt, vt, pos_sorted, pos_sorted)),
            nb.attention(q, k, v, pos_sorted, pos_sorted),
            np.abs(v).max(),
        )
    for kpos in kpos_choices:  # includes queries that see no key (reference: zeros)
        _close64(
            tb.to_numpy(tb.attention(qt, kt, vt, pos, kpos)),
            nb.attention(q, k, v, pos, kpos),
            np.abs(v).max(),
        )
    s = nb.scores(q, k)
    _close64(tb.to_numpy(tb.scores(qt, kt)), s, np.abs(q).max() * np.abs(k).max() * c.head_dim)
    s[:, 0, :] = -np.inf  # a row with no finite score
    _close64(tb.to_numpy(tb.softmax_values(tb.from_numpy(s), vt)), nb.softmax_values(s, v), np.abs(v).max())


@given(model_weights(), seeds())
def test_backend_check_matches_numpy(w: ModelWeights, seed: int) -> None:
    nb, tb = _pair(w)
    x = _gauss(seed, (3, 4))
    assert np.array_equal(tb.to_numpy(tb.check(x, "x", (3, 4))), nb.check(x, "x", (3, 4)))
    bad = [x.astype(np.int64), x[:2], np.where(x > 0, np.inf, x) if (x > 0).any() else x * np.nan]
    for arr in bad:
        with pytest.raises(SCXError) as e_np:
            nb.check(arr, "x", (3, 4))
        with pytest.raises(SCXError) as e_t:
            tb.check(arr, "x", (3, 4))
        assert type(e_np.value) is type(e_t.value)
    for ids in (np.array([w.config.vocab_size]), np.array([-1]), np.array([[0]]), np.array([0.5])):
        with pytest.raises(SCXError) as e_np:
            nb.embed(ids)
        with pytest.raises(SCXError) as e_t:
            tb.embed(ids)
        assert type(e_np.value) is type(e_t.value)


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q_h kᵀ/√d_h)·v per query head h (KV head h // g), every query seeing every key: the
    definition, in float64 loops over heads."""
    n_q, n_heads, d_h = q.shape
    g = n_heads // k.shape[1]
    out = np.empty((n_q, n_heads, v.shape[-1]))
    for h in range(n_heads):
        s = q[:, h] @ k[:, h // g].T / np.sqrt(d_h)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (e / e.sum(axis=1, keepdims=True)) @ v[:, h // g]
    return out


@given(attention_shapes(), st.integers(1, 5), st.integers(1, 40), seeds(), torch_dtypes())
def test_attention_without_a_mask_is_the_definition(
    shape: tuple[int, int, int], n_q: int, m: int, seed: int, dtype: torch.dtype
) -> None:
    """Queries that see every key (a generation step's row: ``k_positions`` None) — with GQA the grouped
    form (:meth:`TorchBackend._grouped_attention`) — on strided views as the protocol passes them (q
    columns of a wider projection, K and V the first rows of a cache buffer): float64 within 1e-12 of the
    definition; the others (computed in float32, the output rounded to the dtype) within float32's
    attention bound plus the output's rounding of it, and twice that of torch's own ``enable_gqa`` call."""
    h_kv, g, d_h = shape
    tb = TorchBackend(tiny_weights(0), dtype)
    wide = torch.from_numpy(_gauss(seed, (n_q, h_kv * g * d_h + 3), 2.0)).to(dtype)
    q = wide.narrow(1, 0, h_kv * g * d_h).reshape(n_q, h_kv * g, d_h)
    k, v = (
        torch.from_numpy(_gauss(seed + i, (m + 4, h_kv, d_h), 2.0 if i == 1 else 1.0))
        .to(dtype)
        .narrow(0, 0, m)
        for i in (1, 2)
    )
    got = tb.attention(q, k, v, np.full(n_q, m - 1), None)
    assert got.shape == (n_q, h_kv * g, d_h) and got.dtype == dtype and got.is_contiguous()
    want = _attention64(_np(q), _np(k), _np(v))  # of the inputs as rounded to the dtype
    v_max = np.abs(_np(v)).max()
    if dtype == torch.float64:
        _close64(_np(got), want, v_max)
        return
    u32 = UNIT_ROUNDOFF[torch.float32]
    scores = np.abs(_np(q)).max() * np.abs(_np(k)).max() * d_h
    tol = (d_h + m + 8) * u32 * v_max * (1 + scores) + UNIT_ROUNDOFF[dtype] * v_max
    assert np.max(np.abs(_np(got) - want)) <= tol
    q4, k4, v4 = (t.float().transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    other = F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=g > 1)[0].transpose(0, 1)
    assert np.max(np.abs(_np(got) - _np(other.to(dtype)))) <= 2 * tol


def test_attention_folds_query_groups_only_where_nothing_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped form runs for queries that see every key with several query heads per KV head, on
    CPU; a causal prefill, a masked one and one query head per KV head keep the one batched call."""
    tb = TorchBackend(tiny_weights(0), torch.float32)
    calls: list[int] = []
    inner = tb._grouped_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape[0])
        return inner(q, k, v)

    monkeypatch.setattr(tb, "_grouped_attention", spy)
    gen = torch.Generator().manual_seed(0)

    def run(n_q: int, h: int, h_kv: int, m: int, qp: np.ndarray, kp: np.ndarray | None) -> bool:
        q, k, v = (torch.randn(r, heads, 4, generator=gen) for r, heads in ((n_q, h), (m, h_kv), (m, h_kv)))
        before = len(calls)
        tb.attention(q, k, v, qp, kp)
        return len(calls) > before

    assert run(1, 4, 2, 9, np.array([8]), None)  # a generation step
    assert run(3, 4, 1, 5, np.array([7, 8, 9]), np.arange(5))  # every key at or before every query
    assert not run(1, 2, 2, 9, np.array([8]), None)  # one query head per KV head
    assert not run(5, 4, 2, 5, np.arange(5), np.arange(5))  # causal, true order
    assert not run(3, 4, 2, 3, np.array([2, 0, 1]), np.arange(3))  # masked


# --- backend methods in reduced precision ------------------------------------------------------------


@given(model_weights(), seeds(), row_counts(max_n=9), torch_dtypes(("float32", "bfloat16", "float16")))
def test_low_precision_backend_within_rounding_bounds(
    w: ModelWeights, seed: int, n: int, dtype: torch.dtype
) -> None:
    nb = NumpyBackend(w)
    tb = TorchBackend(w, dtype)
    c, u = w.config, UNIT_ROUNDOFF[dtype]
    assert tb.numpy_dtype() == np.float32
    x = _gauss(seed, (n, c.hidden_size))
    xt = tb.from_numpy(x)
    for layer in range(c.n_layers):
        a = _gauss(seed + 3, (n, c.hidden_size))
        lw = w.layers[layer]
        bias = np.zeros(c.q_dim + 2 * c.kv_dim) if lw.bqkv is None else np.abs(lw.bqkv)
        bound = 2 * (c.hidden_size + 2) * u * (np.abs(a) @ np.abs(lw.wqkv) + bias)
        got = tb.to_numpy(tb.project(tb.from_numpy(a), "wqkv", layer))
        assert np.all(np.abs(got - nb.project(a, "wqkv", layer)) <= bound)
        want = nb.norm(x, "attn", layer)
        # norms run in float32 internally, input and output rounded to the dtype
        bound_n = (c.hidden_size + 4) * max(u, 2.0**-24) * np.abs(want) + 2 * u * np.abs(want)
        assert np.all(np.abs(tb.to_numpy(tb.norm(xt, "attn", layer)) - want) <= 2 * bound_n + 1e-30)
    if dtype == torch.float32:
        q = _gauss(seed, (n, c.n_heads, c.head_dim))
        k = _gauss(seed + 1, (n, c.n_kv_heads, c.head_dim))
        v = _gauss(seed + 2, (n, c.n_kv_heads, c.head_dim))
        pos = np.arange(n)
        qt, kt, vt = (tb.from_numpy(t) for t in (q, k, v))
        got = tb.to_numpy(tb.attention(qt, kt, vt, pos, pos))
        tol = (
            (c.head_dim + n + 8) * u * np.abs(v).max() * (1 + np.abs(q).max() * np.abs(k).max() * c.head_dim)
        )
        assert np.max(np.abs(got - nb.attention(q, k, v, pos, pos))) <= tol


@given(model_weights(), token_ids(8))
def test_plain_torch_forward_matches_reference(w: ModelWeights, ids: np.ndarray) -> None:
    from scx_ref.reference import ReferenceModel

    ids = ids % w.config.vocab_size
    ref = ReferenceModel(w)
    want, cache = ref.prefill(ids)
    plain = PlainRunner(TorchBackend(w, torch.float64))
    got = plain.prefill(ids).numpy()
    _close64(got, want, np.abs(want).max() + 1)
    _close64(
        plain.decode(3 % w.config.vocab_size).numpy()[0],
        ref.decode(3 % w.config.vocab_size, cache),
        np.abs(want).max() + 1,
    )

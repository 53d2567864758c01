"""The fused client passes equal the compositions they replace.

``decode_qkv_heads``, ``encode_head_rows`` and ``reencode_sum`` each do in one pass what the protocol
states as several transforms. Gathers and adds move or add the same values, and the fused RoPE rounds
each product before its add as the eager form does, so on the torch backend the fused CPU kernels
(:mod:`scx_ref.backends.cpu_kernels`, numba) and the eager torch ops must agree *bit for bit*, and both
must equal the composition of the separate transforms run on the same backend. Against the numpy
reference (float64) RoPE's products agree to rtol 1e-12 (the cos/sin tables may round differently).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.kernel_paths import fused_and_eager, needs_numba, one_chunk_or_split, same
from properties.strategies import (
    FloatArray,
    attention_shapes,
    decoy_counts,
    head_permutations,
    model_configs,
    model_weights,
    perms,
    row_counts,
    seeds,
)
from scx_ref import transforms as T
from scx_ref.backends import cpu_kernels, torch_backend
from scx_ref.backends.base import NormName
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend, TorchOps
from scx_ref.errors import NonFiniteError, ShapeError

DTYPES = [torch.float32, torch.float64]


def _rows(rng: np.random.Generator, shape: tuple[int, ...], strided: bool) -> np.ndarray:
    """Random rows; with ``strided`` a column slice of a wider array (a non-contiguous input)."""
    if not strided:
        return rng.standard_normal(shape)
    return rng.standard_normal((*shape[:-1], shape[-1] + 3))[..., 1 : shape[-1] + 1]


@st.composite
def _qkv_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    # 1024 positions: room for positions past the torch backend's first RoPE tables (256 rows)
    weights = draw(model_weights(model_configs(max_layers=1, moe=False, max_kv_heads=3, max_positions=1024)))
    c = weights.config
    n, r = draw(row_counts(1, 10)), draw(decoy_counts(4))
    head = draw(head_permutations(c.n_kv_heads, c.head_dim))
    pi = draw(perms(n + r))
    start = draw(st.integers(0, 40))
    pos = np.arange(start, start + n)
    if draw(st.booleans()):  # any positions: repeated, out of order, past the first RoPE tables (256 rows)
        pos = np.array(draw(st.lists(st.integers(0, 600), min_size=n, max_size=n)), dtype=np.int64)
    return weights, n, r, head, pi, pos, draw(seeds()), draw(st.booleans())


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_qkv_cases())
def test_decode_qkv_heads_is_decode_rope_then_head_permute(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """RoPE([Q K])·P and V·P from the QKV reply: fused = eager = the separate transforms, bit for bit."""
    weights, n, r, head, pi, pos, seed, strided = case
    c, g = weights.config, weights.config.group_size
    b = TorchBackend(weights, dtype)
    z_np = _rows(np.random.default_rng(seed), (n + r, c.q_dim + 2 * c.kv_dim), strided)
    z = torch.from_numpy(z_np).to(dtype)  # a strided view stays strided in float64
    with pytest.MonkeyPatch.context() as mp:
        (qk_f, v_f), (qk_e, v_e) = fused_and_eager(mp, lambda: T.decode_qkv_heads(z, pi, n, pos, head, g, b))
    t = T.decode_rows(z, pi, n, b)
    qk = b.rope(t[:, : c.q_dim + c.kv_dim].reshape(n, c.n_heads + c.n_kv_heads, c.head_dim), pos)
    want_qk = T.head_permute_stacked(qk, head, (g, 1), b)
    want_v = T.head_permute(t[:, c.q_dim + c.kv_dim :].reshape(n, c.n_kv_heads, c.head_dim), head, 1, b)
    for got, want in ((qk_f, want_qk), (qk_e, want_qk), (v_f, want_v), (v_e, want_v)):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want)
    # and the numpy reference (float64) reads the same definition
    ref_qk, ref_v = T.decode_qkv_heads(z_np, pi, n, pos, head, g, NumpyBackend(weights))
    np.testing.assert_array_equal(v_f.numpy(), ref_v.astype(v_f.numpy().dtype))  # a gather: exact
    if dtype == torch.float64:
        np.testing.assert_allclose(qk_f.numpy(), ref_qk, rtol=1e-12, atol=1e-12 * (1 + np.abs(ref_qk).max()))


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    shape=attention_shapes(head_dims=(1, 2, 3, 8)),
    n=row_counts(1, 10),
    r=decoy_counts(4),
    seed=seeds(),
    strided=st.booleans(),
    data=st.data(),
)
def test_encode_head_rows_is_head_unpermute_then_encode(
    dtype: torch.dtype, shape: tuple[int, int, int], n: int, r: int, seed: int, strided: bool, data: Any
) -> None:
    """π′(O ⊕ R) from the attention reply O·P: fused = eager = the separate transforms, exactly."""
    n_kv, g, d_h = shape
    head = data.draw(head_permutations(n_kv, d_h))
    pi = data.draw(perms(n + r))
    rng = np.random.default_rng(seed)
    o_np, dec_np = _rows(rng, (n, n_kv * g, d_h), strided), rng.standard_normal((r, n_kv * g * d_h))
    o, dec = torch.from_numpy(o_np).to(dtype), torch.from_numpy(dec_np).to(dtype)
    T_ops = TorchOps(dtype)  # the gathers need no weights
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, lambda: T.encode_head_rows(o, head, g, dec, pi, T_ops))
    want = T.encode_rows(T.head_unpermute(o, head, g, T_ops).reshape(n, -1), dec, pi, T_ops)
    assert torch.equal(fused, want) and torch.equal(eager, want)
    ref: FloatArray = T.encode_rows(T.head_unpermute(o_np, head, g).reshape(n, -1), dec_np, pi)
    np.testing.assert_array_equal(T.encode_head_rows(o_np, head, g, dec_np, pi), ref)
    np.testing.assert_array_equal(fused.numpy(), ref.astype(fused.numpy().dtype))


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    n=row_counts(1, 10),
    r_s=decoy_counts(3),
    r_y=decoy_counts(3),
    r=decoy_counts(3),
    d=st.integers(1, 9),
    seed=seeds(),
    data=st.data(),
)
def test_reencode_sum_is_decode_add_encode(
    dtype: torch.dtype, n: int, r_s: int, r_y: int, r: int, d: int, seed: int, data: Any
) -> None:
    """The residual add across encodings: fused = eager = decode, add, encode, bit for bit."""
    p_s, p_y, p = data.draw(perms(n + r_s)), data.draw(perms(n + r_y)), data.draw(perms(n + r))
    rng = np.random.default_rng(seed)
    s_np, y_np, dec_np = (rng.standard_normal((k, d)) for k in (n + r_s, n + r_y, r))
    ops = TorchOps(dtype)
    s, y, dec = (torch.from_numpy(a).to(dtype) for a in (s_np, y_np, dec_np))
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, lambda: T.reencode_sum(s, p_s, y, p_y, dec, p, ops))
    want = T.encode_rows(ops.add(T.decode_rows(s, p_s, n, ops), T.decode_rows(y, p_y, n, ops)), dec, p, ops)
    assert torch.equal(fused, want) and torch.equal(eager, want)
    ref: FloatArray = T.reencode_sum(s_np, p_s, y_np, p_y, dec_np, p)
    plain: FloatArray = T.decode_rows(s_np, p_s, n) + T.decode_rows(y_np, p_y, n)
    np.testing.assert_array_equal(ref, T.encode_rows(plain, dec_np, p))
    if dtype == torch.float64:
        np.testing.assert_array_equal(fused.numpy(), ref)


@st.composite
def _poisoned(draw: st.DrawFn) -> tuple[Any, ...]:
    """Float32 s (one decoy row), y and decoys of a residual re-encoding, with one entry of one of them
    NaN or ±inf, or one sum of finite entries overflowing float32, or none."""
    n, r, d = draw(row_counts(1, 8)), draw(decoy_counts(3)), draw(st.integers(1, 9))
    p_s, p_y, p = draw(perms(n + 1)), draw(perms(n)), draw(perms(n + r))
    rng = np.random.default_rng(draw(seeds()))
    arrays = [rng.standard_normal((k, d)).astype(np.float32) for k in (n + 1, n, r)]
    bad = draw(st.sampled_from(["none", "nan", "inf", "-inf", "overflow"]))
    target = draw(st.sampled_from([0, 1, 2] if r else [0, 1]))
    row, col = draw(st.integers(0, arrays[target].shape[0] - 1)), draw(st.integers(0, d - 1))
    if bad == "overflow":  # token t's entries of s and y finite, their float32 sum not
        t = draw(st.integers(0, n - 1))
        arrays[0][int(np.argsort(p_s)[t]), col] = arrays[1][int(np.argsort(p_y)[t]), col] = 3e38
    elif bad != "none":
        arrays[target][row, col] = float(bad)
    return (*arrays, p_s, p_y, p, bad, target, row)


def _refused(fn: Any) -> bool:
    """Whether ``fn()`` raises NonFiniteError (it returns otherwise)."""
    try:
        fn()
    except NonFiniteError:
        return True
    return False


@needs_numba
@given(case=_poisoned())
def test_a_message_that_is_not_finite_is_refused_on_every_path(case: tuple[Any, ...]) -> None:
    """``reencode_sum`` and ``encode_head_rows`` raise NonFiniteError when the message they build holds
    NaN or ±inf — an input's entry, or a float32 overflow of a sum of finite entries — on the numpy
    reference, the fused kernels (which test it in the pass that writes the message) and the eager
    torch ops alike; and only then (an entry of s's decoy row, which the sum drops, is not refused)."""
    s, y, dec, p_s, p_y, p, bad, target, row = case
    n, d = y.shape
    ops = TorchOps(torch.float32)
    ts, ty, td = (torch.from_numpy(a) for a in (s, y, dec))
    dropped = target == 0 and int(p_s[row]) == n  # s's decoy row
    nonfinite = bad in ("nan", "inf", "-inf")
    head = T.HeadPermutation(np.arange(1), np.arange(d)[None, :])
    # (the fused or eager path, the numpy reference, whether the message must be refused)
    cases: list[tuple[Callable[[], object], Callable[[], object], bool]] = [
        (
            lambda: T.reencode_sum(ts, p_s, ty, p_y, td, p, ops),
            lambda: T.reencode_sum(s, p_s, y, p_y, dec, p),
            bad == "overflow" or (nonfinite and not dropped),
        ),
        (
            lambda: T.encode_head_rows(ty.reshape(n, 1, d), head, 1, td, p, ops),
            lambda: T.encode_head_rows(y.reshape(n, 1, d), head, 1, dec, p),
            nonfinite and target in (1, 2),
        ),
    ]
    for fn, ref, refused in cases:
        with pytest.MonkeyPatch.context() as mp:
            fused, eager = fused_and_eager(mp, lambda fn=fn: _refused(fn))
        assert (fused, eager, _refused(ref)) == (refused, refused, refused)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(rows=row_counts(1, 12), d=st.integers(1, 40), seed=seeds(), data=st.data())
def test_the_checked_add_and_row_permutation_are_the_plain_ones(
    dtype: torch.dtype, rows: int, d: int, seed: int, data: Any
) -> None:
    """With a name (the finiteness test in the same pass) the residual add and the logits' in-place
    row permutation give exactly ``x + y`` and ``x[index]``, fused and eager alike."""
    rng = np.random.default_rng(seed)
    x, y = (torch.from_numpy(rng.standard_normal((rows, d))).to(dtype) for _ in range(2))
    index = data.draw(perms(rows))
    ops = TorchOps(dtype)
    with pytest.MonkeyPatch.context() as mp:
        added = fused_and_eager(mp, lambda: ops.add(x, y, name="sum"))
        moved = fused_and_eager(mp, lambda: ops.take_rows_in_place(x.clone(), index, name="rows"))
    assert all(torch.equal(a, x + y) for a in added)
    assert all(torch.equal(m, x[torch.from_numpy(np.asarray(index))]) for m in moved)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    weights=model_weights(model_configs(max_layers=1)),
    rows=row_counts(0, 12),
    seed=seeds(),
    strided=st.booleans(),
    which=st.sampled_from(["attn", "mlp", "final"]),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
)
def test_the_fused_rms_norm_is_within_rounding_of_the_exact_one(
    dtype: torch.dtype,
    weights: Any,
    rows: int,
    seed: int,
    strided: bool,
    which: NormName,
    poison: float | None,
) -> None:
    """RMSNorm in one pass (the mean of squares summed in float64, the scale rounded to the dtype, then
    γ·(x·s) rounded as the eager form rounds it) is within 4u of the exact norm per entry (γ, s and the
    two products each rounded once), the eager torch ops within (w + 8)u (their mean summed in the
    dtype); split across threads the fused norm is the same bits as in one chunk. A row holding NaN or
    ±inf comes out with the eager form's NaN and infinities; with a name (the server's check of the rows
    it was sent) such rows are refused, fused and eager, and finite ones give the same norm."""
    rng = np.random.default_rng(seed)
    w, layer = weights.config.hidden_size, 0
    x = _rows(rng, (rows, w), strided) * rng.choice([1e-3, 1.0, 1e3], size=(rows, 1))
    if poison is not None and rows:
        x[rng.integers(rows), rng.integers(w)] = poison
    tb = TorchBackend(weights, dtype)
    xt = torch.from_numpy(x).to(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "FUSED_NORM_MIN", 0)  # the kernel on these few rows too
        fused, eager = fused_and_eager(mp, lambda: tb.norm(xt, which, layer))

        def named() -> torch.Tensor | None:  # None: refused
            try:
                return tb.norm(xt, which, layer, name="x")
            except NonFiniteError:
                return None

        checked = fused_and_eager(mp, named)
    if poison is not None and rows > 0:
        assert checked == (None, None)
    else:
        assert same(checked[0], fused) and same(checked[1], eager)
    assert fused.shape == eager.shape == (rows, w) and fused.dtype == eager.dtype == dtype
    f64, e64 = fused.double().numpy(), eager.double().numpy()
    assert np.array_equal(np.isnan(f64), np.isnan(e64)) and np.array_equal(np.isinf(f64), np.isinf(e64))
    finite = np.isfinite(x).all(axis=1)
    exact = NumpyBackend(weights).norm(xt.double().numpy()[finite], which, layer)
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    tiny = 8 * float(np.finfo(np.float64 if dtype == torch.float64 else np.float32).smallest_subnormal)
    err_f, err_e = np.abs(f64[finite] - exact), np.abs(e64[finite] - exact)
    assert np.all(err_f <= (4 * u + (w + 8) * 2.0**-53) * np.abs(exact) + tiny)
    assert np.all(err_e <= (w + 8) * u * np.abs(exact) + tiny)


@needs_numba
@pytest.mark.parametrize("split", [False, True])
def test_a_row_permutation_that_is_not_one_is_refused_before_anything_moves(split: bool) -> None:
    """An index that is not a permutation of the rows (a repeated row) is refused with nothing of the
    array moved, in one chunk and split across threads."""
    x = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    before = x.clone()
    with one_chunk_or_split(split), pytest.raises(ShapeError, match="not a permutation"):
        TorchOps(torch.float32).take_rows_in_place(x, np.array([1, 0, 3, 2, 5, 4, 7, 1]), name="rows")
    assert torch.equal(x, before)


@needs_numba
def test_one_pass_at_a_time_splits_across_threads() -> None:
    """While one pass holds the threads, a pass another thread starts runs in one chunk (numba's default
    threading layer takes no concurrent parallel regions); short passes never split; the threads are free
    again once the pass ends, also when it raised."""
    k = cpu_kernels.kernels()
    assert k is not None
    big = cpu_kernels.MIN_PARALLEL
    assert k.parts(big - 1, 8).parts == 1 and k.parts(big, 1).parts == 1
    with k.parts(big, 2) as outer:
        assert outer == min(2, k.max_threads)
        with k.parts(big, 2) as inner:
            assert inner == 1
    with pytest.raises(RuntimeError), k.parts(big, 2):
        raise RuntimeError("a pass that fails")
    with k.parts(big, 2) as again:
        assert again == min(2, k.max_threads)


@needs_numba
def test_starting_the_kernels_leaves_torchs_thread_count_alone() -> None:
    """Starting numba's threading layer (its OpenMP layer shares torch's libgomp) does not change the
    thread count torch was given: a one-thread run stays on one thread. In a fresh process, where the
    layer starts."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from scx_ref.backends.cpu_kernels import kernels\n"
        "assert kernels() is not None\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "1"

"""The reply verifier's fused passes equal what they replace.

The verifier's products (``project64``, ``project64_norm``, ``project64_gate_up``), its attention range
check (``range_excess``) and its recomputed attention rows (``attention_rows64``) run as numba kernels on
CPU (:mod:`scx_ref.backends.cpu_kernels`) and otherwise as eager torch / numpy code. Max and min round
nothing, so the range check must agree *exactly*; the float64 products may sum in another order, so they
must agree to float64 rounding (a bound of the form c·u₆₄·Σ|terms|, 10⁻¹³ relative here), far below the
float32 roundings a wrong kernel would show. ``project64_norm``'s fused form computes the norm in float64
and must equal the float64 formula; the eager form (the backend's norm in float32, then the product) must
be within float32 rounding of it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from properties.kernel_paths import fused_and_eager, needs_numba
from properties.strategies import attention_shapes, dtypes, model_configs, model_weights, row_counts, seeds
from scx_ref.backends.torch_backend import TorchBackend, TorchOps, range_excess_where
from scx_ref.errors import SCXError
from scx_ref.keys import KeySchedule
from scx_ref.ops import silu
from scx_ref.protocol.verify import (
    LockSketch,
    SessionVerifier,
    SketchCache,
    attention_excess,
    attention_rows64,
    attention_tau,
    excess_ratio,
    linear_excess,
    lock_scores_excess,
    range_excess,
)
from scx_ref.stages import Stage

DTYPES = [torch.float32, torch.float64]
U64 = 2.0**-53


def _close64(got: np.ndarray, want: np.ndarray, scale: np.ndarray, terms: int) -> None:
    """|got − want| ≤ 4·(terms + 8)·u₆₄·scale elementwise (float64 sums of ``terms`` terms, any order)."""
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 4.0 * (terms + 8) * U64 * scale + 1e-300)


@st.composite
def _rows_and_vectors(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, bool]:
    rng = np.random.default_rng(draw(seeds()))
    rows, width, k = draw(row_counts(1, 20)), draw(st.integers(1, 70)), draw(st.sampled_from([1, 2, 3, 8]))
    strided = draw(st.booleans())
    x = rng.standard_normal((rows, width + (3 if strided else 0))) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return (x[:, 1 : width + 1] if strided else x), rng.standard_normal((width, k)), strided


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_rows_and_vectors())
def test_project64_kernel_is_the_float64_product(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """(x·r, ‖x_i‖): the kernel and the eager torch path both equal the float64 product of the rows as
    stored (strided inputs, k = 1, 2, 3, 8 vectors); the norms are upper bounds within float64 rounding."""
    x_np, right, _ = case
    ops = TorchOps(dtype)
    x = torch.from_numpy(x_np).to(dtype)
    x64 = x.double().numpy()
    want, want_norm = x64 @ right, np.sqrt(np.einsum("ij,ij->i", x64, x64))
    scale = np.abs(x64) @ np.abs(right)
    with pytest.MonkeyPatch.context() as mp:
        (p_f, n_f), (p_e, n_e) = fused_and_eager(mp, lambda: ops.project64(x, right))
    _close64(p_f, want, scale, x64.shape[1])
    _close64(p_e, want, scale, x64.shape[1])
    for norms, slack in ((n_f, 2.0**-52), (n_e, 2.0**-23 if dtype == torch.float32 else 2.0**-52)):
        assert np.all(norms >= want_norm * (1 - 4 * U64))
        assert np.all(norms <= want_norm * (1 + (x64.shape[1] + 4) * slack))


@st.composite
def _norm_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    weights = draw(model_weights(model_configs(max_layers=1, moe=False)))
    rng = np.random.default_rng(draw(seeds()))
    rows, k = draw(row_counts(1, 12)), draw(st.sampled_from([1, 2, 5]))
    x = rng.standard_normal((rows, weights.config.hidden_size)) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    which = draw(st.sampled_from(["attn", "mlp", "final"]))
    return weights, x, rng.standard_normal((weights.config.hidden_size, k)), which


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_norm_cases())
def test_project64_norm_is_the_product_of_the_norm(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """project64_norm(x) = (x̂·r, ‖x̂_i‖) for x̂ = γ ⊙ x / √(mean x² + ε): the fused kernel to float64
    rounding of that formula (on the stored x and γ), the eager path (the backend's norm, then project64)
    to its dtype's rounding; the fused norms are upper bounds."""
    weights, x_np, right, which = case
    b = TorchBackend(weights, dtype)
    x = torch.from_numpy(x_np).to(dtype)
    x64 = x.double().numpy()
    gamma = b._gain(which, 0).double().numpy()
    s = 1.0 / np.sqrt(np.mean(x64 * x64, axis=1) + weights.config.rms_eps)
    xh = gamma * x64 * s[:, None]
    want, want_norm = xh @ right, np.linalg.norm(xh, axis=1)
    scale = np.abs(xh) @ np.abs(right)
    with pytest.MonkeyPatch.context() as mp:
        (p_f, n_f), (p_e, _) = fused_and_eager(mp, lambda: b.project64_norm(x, which, 0, right))
    d = x64.shape[1]
    _close64(p_f, want, scale, 2 * d)
    assert np.all(n_f >= want_norm * (1 - 8 * d * U64)) and np.all(n_f <= want_norm * (1 + 8 * d * U64))
    u = 2.0**-24 if dtype == torch.float32 else U64
    assert np.all(np.abs(p_e - want) <= 4 * (math.sqrt(d) + 8) * u * scale + 1e-300)


@st.composite
def _gate_up_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    rng = np.random.default_rng(draw(seeds()))
    rows, f = draw(row_counts(1, 12)), draw(st.integers(1, 40))
    kg, kd = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    gu = rng.standard_normal((rows, 2 * f)) * draw(st.sampled_from([0.1, 1.0, 8.0]))
    return gu, rng.standard_normal((2 * f, kg)), rng.standard_normal((f, kd)), draw(st.booleans())


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_gate_up_cases())
def test_project64_gate_up_is_both_products(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """project64_gate_up(gu) = project64(gu, r_gu) + project64(swiglu_act(gu), r_down): the gate/up
    products equal the float64 products of gu to float64 rounding on both paths; the SwiGLU's are those
    of m = silu(gate)·up formed in the dtype — torch's silu on the eager path, the kernel's own in the
    fused pass — so each is within five roundings of the dtype (u) of the exact SwiGLU's products (the
    kernel's silu and torch's differ in their last bits), and the eager path equals the float64 products of
    its own m to float64 rounding. A non-contiguous [gate up] is accepted; the norms are upper bounds."""
    gu_np, r_gu, r_down, strided = case
    ops = TorchBackend.__new__(TorchBackend)
    TorchOps.__init__(ops, dtype)
    gu = torch.from_numpy(gu_np).to(dtype)
    if strided:
        gu = torch.cat([gu, gu[:, :1]], dim=1)[:, : gu_np.shape[1]]
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, lambda: ops.project64_gate_up(gu, r_gu, r_down))
    gu64 = gu.double().numpy()
    f = gu64.shape[1] // 2
    u = 2.0**-24 if dtype == torch.float32 else U64
    exact = silu(gu64[:, :f]) * gu64[:, f:]
    for arr, right, slack in ((gu64, r_gu, 0.0), (ops.swiglu_act(gu).double().numpy(), r_down, 5 * u)):
        want, want_norm = arr @ right, np.linalg.norm(arr, axis=1)
        scale = np.abs(arr) @ np.abs(right)
        _close64(eager[0], want, scale, arr.shape[1])
        if slack:  # the fused products against the exact SwiGLU's
            want, want_norm = exact @ right, np.linalg.norm(exact, axis=1)
            scale = np.abs(exact) @ np.abs(right)
        assert np.all(np.abs(fused[0] - want) <= (4.0 * (arr.shape[1] + 8) * U64 + slack) * scale + 1e-300)
        assert np.all(fused[1] >= want_norm * (1 - 4 * U64 - slack)) and np.all(
            fused[1] <= want_norm * (1 + 2.0**-40 + slack)
        )
        fused, eager = fused[2:], eager[2:]


@functools.cache
def _silu_loop() -> tuple[Any, Any]:
    """A compiled loop of the kernels' ``silu_value`` over an array (vectorized, as in the MLP check), and
    a compiled call of it on one value."""
    import numba

    from scx_ref.backends import numba_kernels as nk

    @numba.njit(error_model="numpy")
    def loop(x: Any, out: Any) -> None:
        for i in range(x.shape[0]):
            out[i] = nk.silu_value(x[i])

    @numba.njit(error_model="numpy")
    def one(v: Any) -> Any:
        return nk.silu_value(v)

    return loop, one


@needs_numba
@given(
    values=st.lists(
        st.one_of(
            st.floats(-120.0, 120.0),
            st.floats(-1e38, 1e38),
            st.sampled_from(
                [0.0, -0.0, 1e-40, -1e-40, 86.9, -87.1, 87.5, -87.5, 88.8, -88.8, 708.1, -708.1, -709.0]
            ),
            st.sampled_from([math.inf, -math.inf, math.nan]),
        ),
        min_size=1,
        max_size=40,
    ),
    f32=st.booleans(),
)
# the float32 path's largest error (exhaustive search), next to its cut and past it; the float64 cut
@example(values=[-5.879053592681885, -86.9, -87.1, 86.9, -0.3], f32=True)
@example(values=[-707.9, -708.1, 708.1, -3.5], f32=False)
# subnormal x: silu(x) ≈ x/2 underflows (the thorough profile found 2⁻¹⁴⁹ ↦ 0, correctly rounded)
@example(values=[1.401298464324817e-45, -1.401298464324817e-45, 1e-40], f32=True)
@example(values=[5e-324, -5e-324, 1e-310], f32=False)
def test_kernel_silu_is_silu_within_the_dtype(values: list[float], f32: bool) -> None:
    """The MLP check's SiLU (``numba_kernels.silu_value``, arithmetic that vectorizes) in the value's own
    dtype, where e^−|x| is a normal number: within 4.1 float32 roundings of the exact silu in float32 (4.06
    u₃₂ the largest over every float32 in [−87, 87], checked exhaustively by ``python -m models.silu_error``;
    torch's float32 silu, the server's, 2.93) and 8 float64 roundings in float64 (4.3 u₆₄ the largest seen
    over 10⁶ draws), each rounding with its absolute underflow term (a subnormal result). Beyond, 0 (signed
    as x) below a cut where e^−|x| nears the dtype's smallest normal (−87, −708), so off by less than
    |x|·e^cut (torch's float32 silu is 0 from −88.7); x for +inf; NaN for NaN and −inf, as torch's; and a
    vectorized loop of it gives the bits of one call at a time. The float32 polynomial's r³ coefficient cut
    to five digits fails it (checked; the r⁴ one's cut moves no float32 result past the bound), and so does
    its range cut moved to −86 or −80."""
    dtype = np.float32 if f32 else np.float64
    x = np.array(values * 3, dtype=dtype)  # long enough for the vector body as well as the scalar tail
    got = np.empty_like(x)
    loop, one = _silu_loop()
    loop(x, got)
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        want = silu(x64)  # the numpy reference in float64 (a few float64 roundings)
    u, floor = (2.0**-24, 1.7e-38) if f32 else (U64, 3.4e-308)  # e^−87, e^−708: the cuts' e^−|x|
    cut = 87.0 if f32 else 708.0
    inner = np.isfinite(x64) & (np.abs(x64) <= cut)
    # each rounding in the standard model with gradual underflow: a relative u and an absolute half of the
    # smallest subnormal (a subnormal silu, x/2 for a subnormal x, has no relative bound: 2⁻¹⁵⁰ rounds to 0)
    eta = float(np.finfo(dtype).smallest_subnormal) / 2
    bound = (4.1 if f32 else 8.0) * (u * np.abs(want[inner]) + eta)
    assert np.all(np.abs(got[inner] - want[inner]) <= bound)
    outer = np.isfinite(x64) & (np.abs(x64) > cut)
    assert np.all(np.abs(got[outer] - want[outer]) <= np.abs(x64[outer]) * floor)
    assert np.all(got[x64 == np.inf] == np.inf)
    assert np.array_equal(np.isnan(got), np.isnan(x64) | (x64 == -np.inf))
    one_by_one = np.array([one(v) for v in x], dtype=dtype)
    assert np.array_equal(got, one_by_one, equal_nan=True)
    with torch.inference_mode():
        torch_silu = torch.nn.functional.silu(torch.from_numpy(x)).numpy()
    assert np.array_equal(np.isnan(torch_silu), np.isnan(got))


@st.composite
def _attention_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    h_kv, g, d_h = draw(attention_shapes())
    rng = np.random.default_rng(draw(seeds()))
    first, n_q = draw(st.integers(0, 6)), draw(st.integers(0, 12))
    extra = draw(st.integers(0, 3))  # keys after the last query (only max |v| reads them)
    dtype = draw(dtypes())
    v = (rng.standard_normal((first + n_q + extra, h_kv, d_h)) * 2).astype(dtype)
    o = np.empty((n_q, h_kv, g, d_h), dtype=dtype)
    for i in range(n_q):  # convex combinations of the visible values, then some pushed out of range
        p = rng.dirichlet(np.ones(first + i + 1), size=g)
        o[i] = np.einsum("ej,jhd->hed", p, v[: first + i + 1].astype(np.float64)).astype(dtype)
    if n_q and draw(st.booleans()):
        o[rng.integers(n_q), rng.integers(h_kv), rng.integers(g), rng.integers(d_h)] += draw(
            st.sampled_from([-3.0, 1e-3, 5.0])
        )
    return v, o, first


@functools.cache
def _exp64_loop() -> Any:
    """A compiled loop of ``numba_kernels.exp64`` over an array (vectorized, as in the attention kernel)."""
    import numba

    from scx_ref.backends import numba_kernels as nk

    @numba.njit(boundscheck=False)
    def loop(x: Any, out: Any) -> None:
        for i in range(x.shape[0]):
            out[i] = nk.exp64(x[i])

    return loop


@needs_numba
@given(
    xs=st.lists(
        st.one_of(
            st.floats(-750.0, 720.0),  # both ends of exp64's range and past them
            st.floats(-1.0, 1.0),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_exp64_is_exp_within_two_roundings(xs: list[float]) -> None:
    """The recomputed attention rows' exponential (``exp64``, arithmetic that vectorizes) is numpy's exp
    within 2.5 u₆₄ relative from −708 to the overflow threshold (the largest error seen over 10⁶ draws
    was 2.0 u₆₄); 0 below −708 (where e^x < 3.31e-308), inf above, NaN for NaN; and a vectorized loop of it
    gives the bits of one call at a time (no fast-math flag in it to round the two paths apart). A wrong
    coefficient shows far above that (1/3! cut to ten digits fails it), a range cut moved to −700 too."""
    from scx_ref.backends import numba_kernels as nk

    x = np.array(xs * 3, dtype=np.float64)  # long enough for the vector body as well as the scalar tail
    got = np.empty_like(x)
    _exp64_loop()(x, got)
    with np.errstate(over="ignore"):
        want = np.exp(x)
    normal = (x >= -708.0) & (x <= 709.782712893384)
    assert np.all(np.abs(got[normal] - want[normal]) <= 2.5 * U64 * want[normal])
    assert np.all(got[x < -708.0] == 0.0)
    assert np.all(got[x > 709.782712893384] == np.inf)
    assert np.array_equal(np.isnan(got), np.isnan(x))
    one_by_one = np.array([nk.exp64(float(v)) for v in x])
    assert np.array_equal(got, one_by_one, equal_nan=True)


@needs_numba
@given(case=_attention_cases())
def test_range_excess_kernel_equals_the_running_extremes(case: tuple[Any, ...]) -> None:
    """The range check's one-pass kernel returns exactly the numpy running max/min form's excess and
    max |v| (GQA 1 to 4, one head, no queries, keys past the last query, float32 and float64)."""
    v, o, first = case
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, lambda: range_excess(v, o, first))
    assert fused == eager


def _with_one_entry(bad: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Values (6 × 2 × 4) and outputs (6 × 2 × 2 × 4, float32) for the range check, one entry of ``where``
    ("v" or "o") set to ``bad``."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 2, 4)).astype(np.float32)
    o = np.zeros((6, 2, 2, 4), dtype=np.float32)
    if where == "v":
        v[3, 1, 2] = bad
    else:
        o[3, 1, 0, 0] = bad
    return v, o


@needs_numba
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["v", "o"])
def test_range_excess_refuses_what_is_not_finite(bad: float, where: str) -> None:
    """A NaN or an infinity in the values or the outputs leaves a result that is not finite on both
    paths (the verifier then refuses the reply)."""
    v, o = _with_one_entry(bad, where)
    with pytest.MonkeyPatch.context() as mp:
        for over, vmax in fused_and_eager(mp, lambda: range_excess(v, o, 0)):
            assert not (math.isfinite(over) and math.isfinite(vmax))


def _devices() -> list[str]:
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@given(case=_attention_cases())
def test_range_excess_on_the_device_equals_the_host_passes(case: tuple[Any, ...]) -> None:
    """The range check by torch operations where the tensors live (``range_excess_where``, what a GPU
    backend's verifier runs: ``TorchOps.device_range_excess``) returns exactly the host form's excess and
    max |v|, on the CPU and, where there is one, on a GPU (GQA 1 to 4, one head, no queries, keys past the
    last query, float32 and float64)."""
    v, o, first = case
    want = range_excess(v, o, first)
    for device in _devices():
        got = range_excess_where(torch.from_numpy(v).to(device), torch.from_numpy(o).to(device), first)
        assert got == want, device
    if torch.cuda.is_available():
        ops = TorchOps(torch.from_numpy(v).dtype, "cuda")
        assert ops.device_range_excess(torch.from_numpy(v).cuda(), torch.from_numpy(o).cuda(), first) == want
    assert (
        TorchOps(torch.from_numpy(v).dtype).device_range_excess(
            torch.from_numpy(v), torch.from_numpy(o), first
        )
        is None
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["v", "o"])
def test_range_excess_on_the_device_refuses_what_is_not_finite(bad: float, where: str) -> None:
    """A NaN or an infinity in the values or the outputs leaves the device form's result not finite too."""
    v, o = _with_one_entry(bad, where)
    for device in _devices():
        over, vmax = range_excess_where(torch.from_numpy(v).to(device), torch.from_numpy(o).to(device), 0)
        assert not (math.isfinite(over) and math.isfinite(vmax)), device


@st.composite
def _rows64_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    # the kernel takes a KV head's query heads four at a time: groups of 3 (SmolLM2), 5 and 8 too
    h_kv, g, d_h = draw(attention_shapes(gqa_ratios=(1, 2, 3, 4, 5, 8)))
    rng = np.random.default_rng(draw(seeds()))
    keys, rows = draw(st.integers(1, 30)), draw(st.integers(1, 6))
    dtype = draw(dtypes())
    # 6: peaked softmax rows; 40: weights below e^-708, which the kernel's exp64 flushes to 0
    spread = draw(st.sampled_from([0.1, 1.0, 6.0, 40.0]))
    q = (rng.standard_normal((rows, h_kv * g, d_h)) * spread).astype(dtype)
    k = (rng.standard_normal((keys, h_kv, d_h)) * spread).astype(dtype)
    v = rng.standard_normal((keys, h_kv, d_h)).astype(dtype)
    o = rng.standard_normal((rows, h_kv * g, d_h)).astype(draw(dtypes()))
    pos = rng.integers(0, keys, size=rows).astype(np.int64)
    return q, k, v, o, pos, g, 1.0 / math.sqrt(d_h)


@needs_numba
@given(case=_rows64_cases())
def test_attention_rows64_kernel_equals_the_batched_products(case: tuple[Any, ...]) -> None:
    """The recomputed attention rows: the kernel's float64 pass equals the batched numpy products, the
    running key/value norms and the norms the verdict reads (‖o − want‖, ‖o‖, ‖q‖) to float64 rounding,
    for any positions (repeated ones included)."""
    q, k, v, o, pos, g, scale = case
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(
            mp, lambda: attention_rows64(q, k, v, o, pos, g, scale, threads=torch.get_num_threads())
        )
    vmax = np.abs(v.astype(np.float64)).max()
    assert np.allclose(fused.want, eager.want, rtol=0, atol=1e-12 * (vmax + 1.0))
    assert np.allclose(fused.kmax, eager.kmax, rtol=1e-14) and np.allclose(fused.vmax, eager.vmax, rtol=1e-14)
    assert np.allclose(fused.onorm, eager.onorm, rtol=1e-14) and np.allclose(
        fused.qnorm, eager.qnorm, rtol=1e-14
    )
    onorm = np.linalg.norm(o.astype(np.float64), axis=-1)
    assert np.allclose(fused.dist, eager.dist, rtol=1e-13, atol=1e-12 * (vmax + onorm + 1.0))
    # dist is the distance to the recomputed rows themselves
    want_dist = np.linalg.norm(o.astype(np.float64) - fused.want, axis=-1)
    assert np.allclose(fused.dist, want_dist, rtol=1e-13, atol=1e-300)


@st.composite
def _verdict_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    rows, k = draw(row_counts(1, 20)), draw(st.sampled_from([1, 2, 3]))
    rng = np.random.default_rng(draw(seeds()))
    xnorm, ynorm = np.abs(rng.standard_normal(rows)) * 10, np.abs(rng.standard_normal(rows)) * 10
    a, b = np.abs(rng.standard_normal(k)) * 1e-6, np.abs(rng.standard_normal(k)) * 1e-6
    xr, bias_r = (
        rng.standard_normal((rows, k)) * 10,
        rng.standard_normal(k) * draw(st.sampled_from([0.0, 1.0])),
    )
    tau = np.multiply.outer(xnorm, a) + np.multiply.outer(ynorm, b)
    # y·r within τ of x·(W r) + b·r, or pushed out by a multiple of it
    yr = xr + bias_r + tau * rng.uniform(-1, 1, size=tau.shape) * draw(st.sampled_from([0.5, 0.999, 3.0]))
    bad = draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    if bad is not None:
        target = draw(st.sampled_from([yr, xr, xnorm, ynorm]))
        target.reshape(-1)[rng.integers(target.size)] = bad
    return yr, xr, bias_r, xnorm, ynorm, a, b


@needs_numba
@given(case=_verdict_cases())
def test_linear_excess_kernel_is_the_numpy_verdict(case: tuple[Any, ...]) -> None:
    """A Freivalds check's verdict: the one-pass kernel returns exactly the numpy expressions' max
    |residual|/τ, and NaN on both paths when a residual, a row norm or τ is NaN or ±inf (refused)."""
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, lambda: linear_excess(*case))
    if math.isfinite(eager):
        assert fused == eager
    else:
        assert math.isnan(fused) and math.isnan(eager)
    if all(np.all(np.isfinite(x)) for x in case):
        assert math.isfinite(fused)


@st.composite
def _check_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    weights = draw(model_weights(model_configs(max_layers=1, moe=False)))
    rng = np.random.default_rng(draw(seeds()))
    d = weights.config.hidden_size
    rows, out, k = draw(row_counts(1, 12)), draw(st.integers(1, 70)), draw(st.sampled_from([1, 2, 8]))
    x = rng.standard_normal((rows, d)) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    y = rng.standard_normal((rows, out))
    r, wr = rng.standard_normal((out, k)), rng.standard_normal((d, k))
    bias_r = rng.standard_normal(k) * draw(st.sampled_from([0.0, 1.0]))
    a, b = np.abs(rng.standard_normal(k)) * 1e-3, np.abs(rng.standard_normal(k)) * 1e-3
    bad = draw(st.sampled_from([None, np.nan, np.inf]))
    if bad is not None:
        target = draw(st.sampled_from([x, y]))
        target.reshape(-1)[rng.integers(target.size)] = bad
    norm = draw(st.sampled_from([None, "attn", "mlp", "final"]))
    given_side = draw(st.sampled_from([None, "y", "x"]))
    return weights, x, y, r, wr, (bias_r, a, b), norm, given_side


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_check_cases())
def test_freivalds_excess_is_the_three_calls(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """A whole linear check in one call (``TorchBackend.freivalds_excess``) returns exactly the verdict the
    verifier composes from ``project64`` / ``project64_norm`` and ``linear_excess`` — the same value,
    NaN when an entry is NaN or ±inf — on the rows or with either side given as its products; in one
    chunk and split across threads; ``None`` with the kernels off (the verifier then composes it)."""
    weights, x_np, y_np, r, wr, (bias_r, a, b), norm, given_side = case
    be = TorchBackend(weights, dtype)
    x, y = torch.from_numpy(x_np).to(dtype), torch.from_numpy(y_np).to(dtype)
    terms = (bias_r, a, b, float(np.finfo(np.float64).tiny))

    def both() -> tuple[Any, float]:
        with np.errstate(invalid="ignore", over="ignore"):  # the eager products of a NaN or ±inf
            yp = be.project64(y, r)
            xp = be.project64(x, wr) if norm is None else be.project64_norm(x, norm, 0, wr)
        composed = linear_excess(yp[0], xp[0], bias_r, xp[1], yp[1], a, b)
        ys = yp if given_side == "y" else y
        xs = xp if given_side == "x" else x
        return be.freivalds_excess(ys, r, xs, wr, terms, norm, 0), composed

    with pytest.MonkeyPatch.context() as mp:
        (fused, composed), (off, _) = fused_and_eager(mp, both)
    assert off is None
    assert fused is not None
    if math.isnan(composed):
        assert math.isnan(fused)
    else:
        assert fused == composed
    assert math.isfinite(fused) == bool(np.isfinite(x_np).all() and np.isfinite(y_np).all())


@needs_numba
@given(
    case=_rows64_cases(), u=st.sampled_from([2.0**-24, 2.0**-53]), bad=st.sampled_from([None, np.nan, np.inf])
)
def test_attention_excess_kernel_is_the_numpy_verdict(
    case: tuple[Any, ...], u: float, bad: float | None
) -> None:
    """The recomputed attention rows' verdict: the one-pass kernel returns exactly the numpy τ
    (``attention_tau``) and verdict (``excess_ratio``), NaN on both paths when a distance or a norm is NaN
    or ±inf (refused)."""
    q, k, v, o, pos, g, scale = case
    rec = attention_rows64(q, k, v, o, pos, g, scale)
    if bad is not None:
        target = [rec.dist, rec.onorm, rec.kmax][int(pos.sum()) % 3]
        target.reshape(-1)[int(pos[0]) % target.size] = bad
    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, lambda: attention_excess(rec, pos, g, scale, u))
    with np.errstate(invalid="ignore", over="ignore"):
        want = excess_ratio(rec.dist, attention_tau(rec, pos, g, scale, u))
    for got in (fused, eager):
        assert got == want or (math.isnan(got) and math.isnan(want))
    assert math.isnan(fused) == (bad is not None)


@st.composite
def _mlp_check_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    weights = draw(model_weights(model_configs(max_layers=1, moe=False)))
    rng = np.random.default_rng(draw(seeds()))
    d, f = weights.config.hidden_size, weights.config.intermediate_size
    rows, k = draw(row_counts(1, 12)), draw(st.sampled_from([1, 2, 8]))
    x = rng.standard_normal((rows, d)) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    gu = rng.standard_normal((rows, 2 * f)) * draw(st.sampled_from([0.1, 1.0, 8.0]))
    y = rng.standard_normal((rows, d))
    bad = draw(st.sampled_from([None, np.nan, np.inf]))
    if bad is not None:
        target = draw(st.sampled_from([x, gu, y]))
        target.reshape(-1)[rng.integers(target.size)] = bad

    def check(n_out: int, n_in: int) -> tuple[Any, ...]:
        a, b = np.abs(rng.standard_normal(k)) * 1e-3, np.abs(rng.standard_normal(k)) * 1e-3
        bias_r = rng.standard_normal(k) * draw(st.sampled_from([0.0, 1.0]))
        return rng.standard_normal((n_out, k)), rng.standard_normal((n_in, k)), (bias_r, a, b, 1e-300)

    return weights, x, gu, y, check(2 * f, d), check(d, f)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_mlp_check_cases())
def test_gate_up_excess_is_the_three_calls(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """A dense MLP reply's two checks in one compiled call (``TorchBackend.gate_up_excess``) return
    exactly the verdicts of ``project64_gate_up`` and the two ``freivalds_excess`` calls the verifier
    otherwise makes (the gate/up products against RMSNorm(x), the reply y against the SwiGLU's) — NaN
    where an entry is NaN or ±inf, in whichever row it lies; in one chunk and split across threads;
    ``None`` with the kernels off."""
    weights, x_np, gu_np, y_np, up, down = case
    be = TorchBackend(weights, dtype)
    x, gu, y = (torch.from_numpy(a).to(dtype) for a in (x_np, gu_np, y_np))

    def both() -> tuple[Any, Any]:
        with np.errstate(invalid="ignore", over="ignore"):  # the eager products of a NaN or ±inf
            gr, gn, mr, mn = be.project64_gate_up(gu, up[0], down[1])
        composed = (
            be.freivalds_excess((gr, gn), up[0], x, up[1], up[2], "mlp", 0),
            be.freivalds_excess(y, down[0], (mr, mn), down[1], down[2]),
        )
        return be.gate_up_excess(gu, y, x, 0, up, down), composed

    with pytest.MonkeyPatch.context() as mp:
        (fused, composed), (off, _) = fused_and_eager(mp, both)
    assert off is None
    assert fused is not None and composed[0] is not None and composed[1] is not None
    for got, want in zip(fused, composed, strict=True):
        assert got == want or (math.isnan(got) and math.isnan(want))
    finite = [bool(np.isfinite(a).all()) for a in (x_np, gu_np, y_np)]
    assert math.isfinite(fused[0]) == (finite[0] and finite[1])
    assert math.isfinite(fused[1]) == (finite[1] and finite[2])


@needs_numba
def test_the_float64_sums_do_not_depend_on_where_the_arrays_lie() -> None:
    """The reassociated float64 sums are the same bits on every call: split across threads or not, and
    whatever the addresses of the arrays. A sum in a loop that also stored got a runtime overlap test
    from LLVM's vectorizer and took the vector or the scalar order depending on where the arrays lay,
    so the last bits of ‖q‖, ‖o‖ and ‖o − want‖ varied between runs (about one call in a hundred with
    one row of two heads: each thread then computes one pair). Many calls, each on freshly allocated
    arrays, the recomputed attention rows against one chunk and the products with eight check vectors (a
    generation step's) against their first call."""
    from scx_ref.backends import cpu_kernels
    from scx_ref.protocol import verify

    rng = np.random.default_rng(0)
    k = cpu_kernels.kernels()
    assert k is not None
    threads = torch.get_num_threads()
    shapes = [(1, 2, 6), (1, 2, 4), (2, 2, 8), (1, 4, 2), (2, 3, 4), (1, 5, 2)]  # (H_kv, group, d_h)
    try:
        for case in range(300):
            h_kv, g, d_h = shapes[case % len(shapes)]
            keys, rows = int(rng.integers(4, 30)), int(rng.integers(1, 4))
            dt = (np.float32, np.float64)[case % 2]
            spread = (0.1, 1.0, 6.0)[case % 3]
            q = (rng.standard_normal((rows, h_kv * g, d_h)) * spread).astype(dt)
            kk = (rng.standard_normal((keys, h_kv, d_h)) * spread).astype(dt)
            v = rng.standard_normal((keys, h_kv, d_h)).astype(dt)
            o = rng.standard_normal((rows, h_kv * g, d_h))
            pos = rng.integers(0, keys, size=rows).astype(np.int64)
            torch.set_num_threads(1)
            one = attention_rows64(q, kk, v, o, pos, g, 1 / math.sqrt(d_h), threads=1)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "MIN_PARALLEL", 0)
                mp.setattr(verify, "SPLIT_ROWS64", 0)
                torch.set_num_threads(2)
                split = attention_rows64(q, kk, v, o, pos, g, 1 / math.sqrt(d_h), threads=2)
            assert all(np.array_equal(a, b) for a, b in zip(one, split, strict=True)), case
            x = rng.standard_normal((rows, 4 * d_h + 1)).astype(dt)
            right = np.asfortranarray(rng.standard_normal((x.shape[1], 8)))
            first = TorchOps(torch.float64 if dt == np.float64 else torch.float32).project64(
                torch.from_numpy(x), right
            )
            for _ in range(3):
                again = TorchOps(torch.float64 if dt == np.float64 else torch.float32).project64(
                    torch.from_numpy(x.copy()), np.asfortranarray(right.copy())
                )
                assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)), case
    finally:
        torch.set_num_threads(threads)


def test_the_recomputed_rows_and_the_range_check_refuse_shapes_that_do_not_match() -> None:
    """``attention_rows64`` and ``range_excess`` index their arrays by the shapes they are given (the
    kernels without bounds checks): outputs whose heads or head width do not match the keys and values,
    or a group that does not tile the heads, are refused (SCXError) on every path."""
    from scx_ref.backends import cpu_kernels
    from scx_ref.errors import SCXError

    rng = np.random.default_rng(0)
    q, o = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    k, v = rng.standard_normal((5, 2, 8)), rng.standard_normal((5, 2, 8))
    pos = np.array([1, 3])
    bad_rows = {
        "a group that does not tile the heads": (q, k, v, o, pos, 3),
        "keys of another head width": (q, k[:, :, :4], v[:, :, :4], o, pos, 2),
        "values of other heads than the keys": (q, k, v[:, :1], o, pos, 2),
        "positions for other rows": (q, k, v, o, np.array([1, 2, 3]), 2),
    }
    bad_range = {
        "outputs of other KV heads": (v, rng.standard_normal((2, 1, 2, 8))),
        "outputs of another head width": (v, rng.standard_normal((2, 2, 2, 4))),
    }
    for fused in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", fused)
            attention_rows64(q, k, v, o, pos, 2, 0.3)  # the matching shapes are accepted
            for qq, kk, vv, oo, pp, g in bad_rows.values():
                with pytest.raises(SCXError):
                    attention_rows64(qq, kk, vv, oo, pp, g, 0.3)
            for vv, oo in bad_range.values():
                with pytest.raises(SCXError):
                    range_excess(vv, oo, 0)


@st.composite
def _attention_check_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    weights = draw(model_weights(model_configs(max_layers=1, moe=False, max_kv_heads=3)))
    c = weights.config
    rng = np.random.default_rng(draw(seeds()))
    first, n_q = draw(st.integers(0, 5)), draw(st.integers(1, 10))
    n_k = first + n_q
    k = rng.standard_normal((n_k, c.n_kv_heads, c.head_dim)) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    v = rng.standard_normal((n_k, c.n_kv_heads, c.head_dim))
    q = rng.standard_normal((n_q, c.n_heads, c.head_dim))
    o = np.empty((n_q, c.n_heads, c.head_dim))
    for i in range(n_q):  # convex combinations of the visible values: inside their range
        for h in range(c.n_heads):
            o[i, h] = rng.dirichlet(np.ones(first + i + 1)) @ v[: first + i + 1, h // c.group_size]
    change = draw(st.sampled_from([None, 1e-6, 1e-2, 3.0, np.nan, np.inf]))
    if change is not None:
        o[rng.integers(n_q), rng.integers(c.n_heads), rng.integers(c.head_dim)] += change
    every = draw(st.booleans())
    some = np.sort(rng.choice(n_q, size=draw(st.integers(0, n_q)), replace=False))
    rows = np.arange(n_q) if every else some
    return weights, q, k, v, o, rows.astype(np.int64), first, draw(st.booleans())


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=_attention_check_cases())
def test_the_fused_attention_check_is_the_calls_one_by_one(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    """``SessionVerifier.attention`` in one compiled call (``attention_check``) reaches exactly the verdicts,
    check counts and flops of the same method making the range check and the recomputed rows one call
    at a time (``range_excess``, ``attention_rows64``, ``attention_excess``) — outputs in range or pushed
    out of it, NaN and ±inf among them, every row or some recomputed (the range check then run), queries
    contiguous or a strided view (read without a copy); in one chunk and split across threads."""
    weights, *arrays, rows, first, strided = case
    be = TorchBackend(weights, dtype)
    q, k, v, o = (torch.from_numpy(a).to(dtype) for a in arrays)
    if strided:  # the queries as the client sends them: the Q heads of decoded [Q K] rows, a strided view
        q = torch.cat([q, k[first:]], dim=1).narrow(1, 0, q.shape[1])

    def run(fused: bool) -> tuple[list[Any], int]:
        seen: list[Any] = []
        # no request keys: the rows to recompute are given, so the check never derives any from keys
        verifier = SessionVerifier(be, None, SketchCache(be, KeySchedule.generate()))  # type: ignore[arg-type]
        with pytest.MonkeyPatch.context() as mp:
            record = lambda stage, layer, ratio, checks, what: seen.append((ratio, checks, what))  # noqa: E731
            mp.setattr(verifier, "_accept", record)
            if not fused:
                mp.setattr(verifier, "_attention_fused", lambda *a: False)
            verifier.attention(Stage.ATTN, 0, q, k, v, o, 2.0**-24, rows, first)
        return seen, verifier.flops

    with pytest.MonkeyPatch.context() as mp:
        (one_call, calls), _ = fused_and_eager(mp, lambda: (run(True), run(False)))
    assert one_call[1] == calls[1] and len(one_call[0]) == len(calls[0]) > 0
    for (r1, c1, w1), (r2, c2, w2) in zip(one_call[0], calls[0], strict=True):
        assert (c1, w1) == (c2, w2) and (r1 == r2 or (math.isnan(r1) and math.isnan(r2)))


@st.composite
def _lock_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    h_kv, g, d_h = draw(attention_shapes())
    rng = np.random.default_rng(draw(seeds()))
    k, locked = draw(st.sampled_from([1, 2, 8])), draw(st.integers(0, 40))  # locked: m − 1 columns
    spread = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    keys = rng.standard_normal((locked, h_kv, d_h)) * spread
    coef = rng.standard_normal((locked, k))
    qk = rng.standard_normal((h_kv * g + h_kv, d_h)) * spread
    new = rng.standard_normal(k)
    scale = 1.0 / math.sqrt(d_h)
    # the honest scores q_h·k_j·scale over the locked keys and the new one, then pushed (or not) off them
    every = np.concatenate([keys, qk[None, h_kv * g :]])
    s = np.einsum("hd,jhd->hj", qk[: h_kv * g], np.repeat(every, g, axis=1)) * scale
    push = draw(st.sampled_from([0.0, 1e-4, 1.0]))
    s = s * (1.0 + push * rng.standard_normal(s.shape))
    if draw(st.booleans()):  # a NaN or an infinity among the scores
        s[rng.integers(0, s.shape[0]), rng.integers(0, s.shape[1])] = draw(st.sampled_from([np.nan, np.inf]))
    return LockSketch.start(coef, keys), qk, new, s, g, scale, push


@needs_numba
@given(case=_lock_cases())
def test_the_locked_score_check_kernel_is_the_numpy_expressions(case: tuple[Any, ...]) -> None:
    """A generation step's check against a last guard block's locked cache (``lock_scores_excess``): the
    compiled pass extends the sketch as the numpy expressions do, to float64 rounding, and reaches their
    verdict — the same ratio to 10⁻⁸ of itself or 10⁻⁶ of the threshold, for honest scores (accepted by
    both) and scores pushed off them by a relative 10⁻⁴ or 1; NaN and ±inf refused (NaN) by both — and
    leaves the sketch it was given as it was."""
    lk, qk, new, s, g, scale, push = case
    u = 2.0**-24
    given = [a.copy() for a in (lk.coef, lk.kappa, lk.sq, lk.slack, lk.cmax, lk.csq)]

    def run() -> tuple[float, tuple[np.ndarray, ...]]:
        ratio, ext = lock_scores_excess(lk, qk, new, s, g, scale, u)
        return ratio, (ext.coef, ext.kappa, ext.sq, ext.slack, ext.cmax, ext.csq)

    with pytest.MonkeyPatch.context() as mp:
        (r1, l1), (r2, l2) = fused_and_eager(mp, run)
    for a, b in zip(l1, l2, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-13, atol=1e-300)
    if not np.isfinite(s).all():
        assert math.isnan(r1) and math.isnan(r2)
        return
    # the float64 sums' rounding is ~10⁻⁸ of τ: the same verdict but within 10⁻⁶ of the threshold
    assert abs(r1 - r2) <= 1e-8 * max(r1, r2) + 1e-6
    if push == 0.0:
        assert r1 < 0.05 and r2 < 0.05  # rounding only: far inside τ on both paths
    # one column more, and the sketch it was given not written (a refused step leaves the block's as it was)
    assert l1[0].shape[0] == lk.coef.shape[0] + 1
    now = (lk.coef, lk.kappa, lk.sq, lk.slack, lk.cmax, lk.csq)
    assert all(np.array_equal(a, b) for a, b in zip(given, now, strict=True))


@needs_numba
def test_the_locked_score_kernel_refuses_shapes_that_do_not_fit() -> None:
    """The compiled locked-score check indexes by the shapes it is given, so arrays that do not fit one
    another are refused (SCXError) before anything is read."""
    rng = np.random.default_rng(0)
    lk = LockSketch.start(rng.standard_normal((5, 2)), rng.standard_normal((5, 2, 4)))
    qk, new, s = rng.standard_normal((6, 4)), rng.standard_normal(2), rng.standard_normal((4, 6))
    lock_scores_excess(lk, qk, new, s, 2, 0.5, 2.0**-24)  # the matching shapes are accepted
    for args in (
        (qk[:5], new, s, 2),  # a head missing from [q; k]
        (qk, new[:1], s, 2),  # coefficients for fewer vectors
        (qk, new, s[:, :5], 2),  # scores for fewer keys than the sketch has
        (qk, new, s, 1),  # a group size that does not match the heads
    ):
        with pytest.raises(SCXError):
            lock_scores_excess(lk, *args, 0.5, 2.0**-24)

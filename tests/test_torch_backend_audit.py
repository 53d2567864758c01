"""An audit of the torch backend against the Backend contract and the numpy reference.

Defects fixed (each test below failed on the code before the fix):

* weights of another byte order or wider than float64 built a NumpyBackend but not a TorchBackend
  (torch's ValueError / TypeError);
* rows of another floating dtype than the weights' (float32 rows on a float64 backend) raised torch's
  RuntimeError in ``project``, ``mlp`` and ``TorchOps.linear`` where numpy computes them;
* integer heads were RoPE'd (cast) where numpy refuses them, and integer rows raised torch's RuntimeError in
  ``project64_norm``;
* an MoE layer's router logits that are not finite gave NaN rows where numpy refuses them (NonFiniteError);
* attention with no keys answered in q's dtype, every other path in the backend's;
* in bfloat16/float16, one query that saw no key rounded every query's scores to the dtype before the
  softmax (the other paths keep them in float32).

Tolerances: float64 differentials use rtol 1e-12 against the magnitude of the terms (u = 2⁻⁵³ ≈ 1.1e-16; the
reductions here are at most a few dozen terms, k·u ≪ 1e-12, so a wrong index, head or weight cannot hide
in it). The low-precision attention bound is float32's (d_h + n_k + 8)·u₃₂ (a convex combination of values
whose weights carry that relative error) plus one rounding of the output to the dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends.base import NormName
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend, TorchOps
from scx_ref.errors import DTypeError, NonFiniteError, SCXError
from scx_ref.weights import ModelWeights

from .tiny import tiny_weights

RTOL = 1e-12
#: The configurations the differentials run on: the common tiny model, head_dim ≠ d/H (wider and narrower),
#: GQA ratio 1 and H (one KV head), a single head, MoE, the Qwen2 bias.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "head_dim_8": {"head_dim": 8},
    "gqa_1": {"n_kv_heads": 4},
    "gqa_H": {"n_kv_heads": 1},
    "one_head": {"n_heads": 1, "n_kv_heads": 1, "head_dim": 6},
    "moe": {"moe": True},
    "qkv_bias": {"qkv_bias": True},
}


def _close(got: Any, want: Any, what: str) -> None:
    """float64 torch result ``got`` equal to numpy's ``want`` in shape and dtype, values within RTOL of the
    largest entry (NaN where numpy has NaN)."""
    g = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    w = np.asarray(want)
    assert g.shape == w.shape and g.dtype == w.dtype == np.float64, (what, g.shape, w.shape, g.dtype, w.dtype)
    scale = float(np.nanmax(np.abs(w))) if w.size and not np.isnan(w).all() else 1.0
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * max(scale, 1e-300), err_msg=what)


def _both(nb: NumpyBackend, tb: TorchBackend, what: str, f: Callable[..., Any], *arrays: np.ndarray) -> None:
    """f on numpy arrays and on float64 tensors of them (strided views: every other column of a wider
    array, so the torch side reads non-contiguous inputs): equal results, or the same project error."""
    views = []
    for a in arrays:
        wide = torch.zeros((*a.shape[:-1], 2 * a.shape[-1]), dtype=torch.float64) if a.ndim else None
        if wide is None or a.shape[-1] == 0:
            views.append(torch.from_numpy(a.copy()))
            continue
        wide[..., ::2] = torch.from_numpy(a)
        views.append(wide[..., ::2])
    try:
        want = f(nb, *(a.copy() for a in arrays))
    except SCXError as e:
        with pytest.raises(type(e)):
            f(tb, *views)
        return
    got = f(tb, *views)
    if isinstance(want, tuple):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{what}[{i}]")
    else:
        _close(got, want, what)


@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_every_backend_op_matches_numpy_in_float64(cfg: str, n: int, kernels_on: bool) -> None:
    """Every Backend method on n rows (none, one, a few: the property tests draw n ≥ 1), fused and eager,
    on strided inputs, for head widths other than d/H, GQA ratios 1 and H, one head, MoE and the Qwen2
    bias; attention for keys in and out of true order, repeated positions, queries that see no key and
    no keys at all: the numpy reference's values in float64, or its refusal."""
    w = tiny_weights(5, **CONFIGS[cfg])
    c = w.config
    nb, tb = NumpyBackend(w), TorchBackend(w, torch.float64)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, c.hidden_size))
    for which in ("attn", "mlp", "final"):
        _both(nb, tb, f"norm {which}", lambda b, x, which=which: b.norm(x, which, 1), x)
        _both(nb, tb, f"named norm {which}", lambda b, x, which=which: b.norm(x, which, 1, name="x"), x)
    _both(nb, tb, "mlp", lambda b, x: b.mlp(x, 0), x)
    ids = rng.integers(0, c.vocab_size, n)
    _close(tb.embed(ids), nb.embed(ids), "embed")
    a = rng.standard_normal((n, c.q_dim))
    _both(nb, tb, "wqkv", lambda b, x: b.project(x, "wqkv", 1), x)
    _both(nb, tb, "wo", lambda b, a: b.project(a, "wo", 1), a)
    _both(nb, tb, "correction wo", lambda b, a: b.correction(a, "wo", 1), a)
    _both(nb, tb, "lm_head", lambda b, x: b.project(x, "lm_head"), x)
    gu = 3.0 * rng.standard_normal((n, 2 * c.intermediate_size))
    _both(nb, tb, "swiglu", lambda b, g: b.swiglu_act(g), gu)
    right = rng.standard_normal((c.hidden_size, 2))
    # project64's norms are rounded up by one slack factor on torch (documented): compare the products
    _both(nb, tb, "project64_norm", lambda b, x: b.project64_norm(x, "mlp", 0, right)[0], x)
    rg = rng.standard_normal((2 * c.intermediate_size, 2))
    rd = rng.standard_normal((c.intermediate_size, 2))
    _both(nb, tb, "project64_gate_up", lambda b, g: b.project64_gate_up(g, rg, rd)[::2], gu)
    qkv = 2.0 * rng.standard_normal((n, c.q_dim + 2 * c.kv_dim))
    pos = np.arange(3, 3 + n)
    qh = qkv[:, : c.q_dim].reshape(n, c.n_heads, c.head_dim)
    _both(nb, tb, "rope", lambda b, q: b.rope(q, pos), qh)
    width = c.q_dim + c.kv_dim
    rows, ri, pi = rng.permutation(n), rng.permutation(width), rng.permutation(c.kv_dim)
    _both(nb, tb, "rope_take", lambda b, z: b.rope_take(z, rows, pos, ri, pi), qkv)
    for m in (0, 1, 4):
        k = 2.0 * rng.standard_normal((m, c.n_kv_heads, c.head_dim))
        v = rng.standard_normal((m, c.n_kv_heads, c.head_dim))
        key_positions = [None, np.arange(m), np.arange(m) + 2, np.arange(m)[::-1].copy(), np.full(m, 2)]
        query_positions = [np.arange(n), pos, np.full(n, 1), rng.permutation(n)]
        for kp in key_positions:
            for qp in query_positions:
                _both(
                    nb,
                    tb,
                    f"attention m={m} kp={kp} qp={qp}",
                    lambda b, q, k, v, qp=qp, kp=kp: b.attention(q, k, v, qp, kp),
                    qh,
                    k,
                    v,
                )
        _both(nb, tb, f"scores m={m}", lambda b, q, k: b.scores(q, k), qh, k)
        s = rng.standard_normal((c.n_heads, n, m))
        _both(nb, tb, f"softmax_values m={m}", lambda b, s, v: b.softmax_values(s, v), s, v)
    basis = rng.standard_normal((c.hidden_size, 3))
    wt, wc = tb.weight_sketch("wo", 1, None, basis)
    nt, nc = nb.weight_sketch("wo", 1, None, basis)
    _close(wt, nt, "weight_sketch")
    _close(wc, nc, "weight_sketch col_sq")


@pytest.mark.parametrize("dtype", [np.dtype(">f8"), np.dtype(np.longdouble)])
def test_weights_of_another_byte_order_or_wider_build_the_same_backend(dtype: np.dtype[Any]) -> None:
    """ModelWeights of a big-endian dtype or longdouble: NumpyBackend takes them, and so does TorchBackend
    (torch's from_numpy raised ValueError / TypeError), with the float64 weights' values."""
    w = tiny_weights(2, qkv_bias=True)
    odd = ModelWeights.from_dict(w.config, {k: v.astype(dtype) for k, v in w.to_dict().items()})
    assert odd.embed.dtype == dtype
    x = np.random.default_rng(0).standard_normal((3, w.config.hidden_size))
    tb, want = TorchBackend(odd, torch.float64), NumpyBackend(w)
    for which in ("wqkv", "wo", "lm_head"):
        xs = x if which != "wo" else np.random.default_rng(1).standard_normal((3, w.config.q_dim))
        _close(tb.project(torch.from_numpy(xs), which, 0), want.project(xs, which, 0), which)
    assert np.array_equal(tb.embed(np.arange(4)).numpy(), want.embed(np.arange(4)))
    _close(tb.mlp(torch.from_numpy(x), 1), want.mlp(x, 1), "mlp")


@pytest.mark.parametrize("moe", [False, True])
def test_rows_of_another_float_dtype_are_computed_in_the_backends_dtype(moe: bool) -> None:
    """float32 rows on a float64 backend: ``project`` and ``mlp`` give numpy's float64 values (numpy widens
    them; torch raised RuntimeError); float64 rows on a float32 backend: the float32 backend's result on the
    rows rounded to float32, bit for bit (the backend computes in its dtype)."""
    w = tiny_weights(4, moe=moe)
    c = w.config
    x = np.random.default_rng(3).standard_normal((5, c.hidden_size))
    x32 = x.astype(np.float32)
    nb, tb, tb32 = NumpyBackend(w), TorchBackend(w, torch.float64), TorchBackend(w, torch.float32)
    _close(tb.project(torch.from_numpy(x32), "wqkv", 0), nb.project(x32, "wqkv", 0), "project f32 rows")
    _close(tb.mlp(torch.from_numpy(x32), 0), nb.mlp(x32.astype(np.float64), 0), "mlp f32 rows")
    for stage in ("lm_head", "mlp"):

        def run(t: torch.Tensor, stage: str = stage) -> torch.Tensor:
            return tb32.project(t, "lm_head") if stage == "lm_head" else tb32.mlp(t, 1)

        got = run(torch.from_numpy(x))
        assert got.dtype == torch.float32
        assert torch.equal(got, run(torch.from_numpy(x32)))


def test_linear_of_two_dtypes_is_computed_in_their_promoted_dtype() -> None:
    """TorchOps.linear of float32 rows by a float64 matrix (out × in) and bias: float64, numpy's product of
    the same operands (torch raised RuntimeError)."""
    rng = np.random.default_rng(5)
    x32 = rng.standard_normal((5, 16)).astype(np.float32)
    w, b = rng.standard_normal((4, 16)), rng.standard_normal(4).astype(np.float32)
    got = TorchOps(torch.float32).linear(torch.from_numpy(x32), torch.from_numpy(w), torch.from_numpy(b))
    _close(got, x32 @ w.T + b, "linear")


@pytest.mark.parametrize("op", ["rope", "project64_norm"])
def test_integer_rows_are_refused_where_numpy_refuses_them(op: str, kernels_on: bool) -> None:
    """RoPE of integer heads and project64_norm of integer rows: DTypeError on both backends (torch cast
    the heads and RoPE'd them, and raised its own RuntimeError in the norm); the same values as floats are
    taken, alike."""
    w = tiny_weights(0)
    c = w.config
    nb, tb = NumpyBackend(w), TorchBackend(w, torch.float64)
    right = np.ones((c.hidden_size, 2))

    def run(b: Any, a: Any) -> Any:
        return b.rope(a, np.arange(2)) if op == "rope" else b.project64_norm(a, "attn", 0, right)[0]

    shape = (2, c.n_heads, c.head_dim) if op == "rope" else (2, c.hidden_size)
    ints = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 5 - 2
    for b, arr in ((nb, np.asarray), (tb, torch.from_numpy)):
        with pytest.raises(DTypeError):
            run(b, arr(ints))
    _close(run(tb, torch.from_numpy(ints * 1.0)), run(nb, ints * 1.0), op)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_moe_router_logits_that_are_not_finite_are_refused_alike(dtype: torch.dtype, bad: float) -> None:
    """A row whose router logits are not finite: NonFiniteError on both backends (torch routed the NaN
    row by its sort order of NaN and returned NaN); the finite rows alone still match numpy."""
    w = tiny_weights(1, moe=True)
    nb, tb = NumpyBackend(w), TorchBackend(w, dtype)
    x = np.random.default_rng(0).standard_normal((4, w.config.hidden_size))
    _close(TorchBackend(w, torch.float64).mlp(torch.from_numpy(x), 0), nb.mlp(x, 0), "finite rows")
    x[2, 3] = bad
    with pytest.raises(NonFiniteError):
        nb.mlp(x, 0)
    with pytest.raises(NonFiniteError):
        tb.mlp(torch.from_numpy(x).to(dtype), 0)


@pytest.mark.parametrize("key_positions", [None, np.arange(0)])
def test_attention_with_no_keys_answers_in_the_backends_dtype(key_positions: np.ndarray | None) -> None:
    """Queries of another dtype than the backend's (float64 on float32): every attention output is in the
    backend's dtype, the zeros of no keys too (they were in q's)."""
    tb = TorchBackend(tiny_weights(0), torch.float32)
    q = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(0, 2, 4, dtype=torch.float64)
    got = tb.attention(q, none, none, np.arange(3), key_positions)
    assert got.dtype == torch.float32 and got.shape == (3, 4, 4) and not got.any()
    k = torch.randn(2, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert tb.attention(
        q, k, k, np.arange(3), key_positions if key_positions is None else np.arange(2)
    ).dtype == (torch.float32)


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, qp: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """The definition in float64: softmax over the keys at or before each query's position (zeros for a
    query that sees none), per query head h on KV head h // g."""
    n_q, n_heads, d_h = q.shape
    g = n_heads // k.shape[1]
    out = np.zeros((n_q, n_heads, v.shape[-1]))
    sees = kp[None, :] <= qp[:, None]
    for h in range(n_heads):
        s = np.where(sees, q[:, h] @ k[:, h // g].T / np.sqrt(d_h), -np.inf)
        top = s.max(axis=1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
        tot = e.sum(axis=1, keepdims=True)
        out[:, h] = e / np.where(tot == 0, 1.0, tot) @ v[:, h // g]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_query_that_sees_no_key_keeps_the_others_softmax_in_float32(dtype: torch.dtype) -> None:
    """With one query before every key (the reference's zeros for it), the other queries' outputs stay
    within float32's attention bound plus one rounding to the dtype of the definition on the rounded
    inputs, as when every query sees a key (their scores, up to ~40 here, were rounded to the dtype
    first: an error of up to half a unit of 0.25 in a bfloat16 score, ~12 % in its weight)."""
    tb = TorchBackend(tiny_weights(0), dtype)
    rng = np.random.default_rng(1)
    n, m, d_h = 6, 8, 4
    q = torch.from_numpy(4.0 * rng.standard_normal((n, 4, d_h))).to(dtype)
    k = torch.from_numpy(4.0 * rng.standard_normal((m, 2, d_h))).to(dtype)
    v = torch.from_numpy(rng.standard_normal((m, 2, d_h))).to(dtype)
    q64, k64, v64 = (t.double().numpy() for t in (q, k, v))
    kp = np.arange(2, 2 + m)
    v_max = float(np.abs(v64).max())
    u32, u = 2.0**-24, {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    scores = float(np.abs(q64).max() * np.abs(k64).max() * d_h)
    tol = (d_h + m + 8) * u32 * v_max * (1 + scores) + u * v_max
    for qp in (np.array([3, 4, 5, 6, 7, 9]), np.array([1, 4, 5, 6, 7, 9])):  # the second: row 0 sees no key
        got = tb.attention(q, k, v, qp, kp).double().numpy()
        want = _attention64(q64, k64, v64, qp, kp)
        assert np.max(np.abs(got - want)) <= tol, (qp, np.max(np.abs(got - want)), tol)
        assert not got[qp < kp.min()].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norm_is_llama_rmsnorm_bit_for_bit(dtype: torch.dtype) -> None:
    """The bfloat16/float16 RMSNorm is Hugging Face's LlamaRMSNorm (the module's stated identity): x̂ in
    float32, rounded to the dtype, then times γ in the dtype — the numpy reference's float16 form too. γ·x̂
    was taken in float32 and rounded once, which differed by an ulp in about a quarter of the entries."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    w = tiny_weights(0)
    tb = TorchBackend(w, dtype)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((64, 16)) * rng.choice([1e-3, 1.0, 400.0], (64, 1))).to(dtype)
    cases: tuple[tuple[NormName, int, np.ndarray], ...] = (
        ("attn", 1, w.layers[1].attn_norm),
        ("final", -1, w.final_norm),
    )
    for which, layer, gamma in cases:
        hf = llama.LlamaRMSNorm(16, eps=w.config.rms_eps).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(torch.from_numpy(gamma))
            want = hf(x)
        assert torch.equal(tb.norm(x, which, layer), want)
        assert torch.equal(tb.norm(x, which, layer, name="x"), want)

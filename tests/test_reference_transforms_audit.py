"""Audit of the numpy transforms (T1–T5) and the reference forward against DESIGN §4 and §5.1/§5.3.

* One block of a prefill run through the transforms in DESIGN §5.1's order — the client's RMSNorm,
  π(X̂ ⊕ R) + α, the server's fused QKV (Qwen2 bias included), unblinding, decode + RoPE + T3, the server's
  causal GQA attention on the permuted heads, T3 decode + π′(O ⊕ R′), W_o, the residual, then the FFN stage
  (RMSNorm + MLP or MoE on π″(H ⊕ R″)) — equals :meth:`ReferenceModel.block` (float64 to DESIGN §6's rtol
  1e-10, float32 to a rounding bound), for GQA ratios 1 and > 1, one head, n = 1, r = 0, MoE; float32
  stays float32 at every step.
* The last guard blocks' decode step (DESIGN §5.3): scores of a new query against a locked cache
  ρ(K ⊕ R) plus the new row, unlocked by the client (:func:`unlock_scores`) and finished with its own V,
  equal the plaintext attention of the new token.
* Refusals are project errors and change none of the inputs.
* The reference's public ``block`` validates its arguments (it raised AttributeError for a list of rows or
  a weights object of another kind, and silently took float or negative positions the backend's plaintext
  forward refuses); ``block_rows`` refuses ragged positions with its ProtocolError.
* The reference forward in float32 equals Hugging Face's float32 forward (the float64 comparisons live in
  tests/test_reference.py and tests/test_forward_hf_edges.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref import ops
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ProtocolError, SCXError, ShapeError
from scx_ref.forward import PlainRunner, block, block_rows
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.transforms import (
    HeadPermutation,
    Permutation,
    blind,
    blinding_correction,
    decode_qkv_heads,
    decode_rows,
    encode_head_rows,
    encode_rows,
    head_permute,
    head_unpermute,
    laplace_noise,
    permute_rows,
    reencode_sum,
    reorder_cache,
    unblind,
    unlock_scores,
    unpermute_rows,
    with_decoys,
)
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_weights

Array = npt.NDArray[Any]
U32 = 2.0**-24
BETA = 1.0  # Laplace scale of the blinded QKV stage (a noised block, DESIGN §5.1)

# name -> tiny_weights overrides (width 16, head_dim 4 unless changed)
MODELS: dict[str, dict[str, Any]] = {
    "llama_gqa2": {},
    "llama_mha": dict(n_kv_heads=4),
    "llama_one_head": dict(n_heads=1, n_kv_heads=1, head_dim=16),
    "qwen2_bias_gqa4": dict(n_kv_heads=1, qkv_bias=True),
    "mixtral_top2": dict(moe=True),
}
SHAPES = [(1, 0), (4, 2), (3, 0)]  # (n real rows, r decoys)


def _weights(model: str, dtype: Any) -> ModelWeights:
    return tiny_weights(sum(map(ord, model)), **MODELS[model]).astype(dtype)


def _head_perm(rng: np.random.Generator, kv: int, dh: int) -> HeadPermutation:
    return HeadPermutation(rng.permutation(kv), np.stack([rng.permutation(dh) for _ in range(kv)]))


def _scx_block(
    w: ModelWeights,
    x: Array,
    cache_kv: tuple[Array, Array] | None,
    start: int,
    r: int,
    seed: int,
    keep_p: bool = False,
) -> tuple[Array, list[np.dtype[Any]]]:
    """Block 0 on rows ``x`` (positions start..start+n−1, after ``cache_kv``) as DESIGN §5.1 runs it, the
    server's work done by :mod:`scx_ref.ops` on encoded arrays only. Returns the block output and the
    dtype of every array that crossed to the server or back. ``keep_p`` (a negative control): the
    attention output goes on to the O stage still permuted by P."""
    c, lw = w.config, w.layers[0]
    rng = np.random.default_rng(seed)
    n, d, dt = x.shape[0], c.hidden_size, x.dtype
    g = c.n_heads // c.n_kv_heads
    pos = np.arange(start, start + n)
    pi, pi_o, pi_f = (Permutation(rng.permutation(n + r)) for _ in range(3))
    head = _head_perm(rng, c.n_kv_heads, c.head_dim)
    seen: list[np.dtype[Any]] = []

    def wire(a: Array) -> Array:
        seen.append(a.dtype)
        return a

    # 1. QKV stage: E = π(X̂ ⊕ R) + α; Z = E·W (+ b); the client removes α·W, decodes, RoPE, T3
    w_qkv = np.concatenate([lw.wq, lw.wk, lw.wv], axis=1)
    b_qkv = None if lw.bq is None else np.concatenate([lw.bq, lw.bk, lw.bv])
    xhat = ops.rms_norm(x, lw.attn_norm, c.rms_eps)
    alpha = laplace_noise((n + r, d), BETA, rng, dt)
    e = wire(blind(encode_rows(xhat, rng.standard_normal((r, d)).astype(dt), pi), alpha))
    z = wire(ops.linear(e, w_qkv, b_qkv))
    z = unblind(z, blinding_correction(alpha, w_qkv))
    qk, vp = decode_qkv_heads(z, pi, n, pos, head, g, NumpyBackend(w, dt))
    qp, kp = qk[:, : c.n_heads], qk[:, c.n_heads :]
    # 2. attention stage: the server runs causal GQA attention on QP, KP, VP (after the cache, also P)
    if cache_kv is not None:
        kp = np.concatenate([head_permute(cache_kv[0], head, 1), kp])
        vp = np.concatenate([head_permute(cache_kv[1], head, 1), vp])
    op = wire(ops.attention(wire(qp), wire(kp), wire(vp), mask=ops.causal_mask(n, kp.shape[0])))
    # 3. O stage: π′(O ⊕ R′) with O = OP·P⁻¹; the server applies W_o; the client adds the residual
    r_o = rng.standard_normal((r, c.q_dim)).astype(dt)
    o_enc = wire(
        encode_rows(op.reshape(n, -1), r_o, pi_o) if keep_p else encode_head_rows(op, head, g, r_o, pi_o)
    )
    h = x + decode_rows(wire(ops.linear(o_enc, lw.wo)), pi_o, n)
    # 4. FFN stage: π″(H ⊕ R″); the server applies the post-attention RMSNorm and the MLP (or MoE)
    f_enc = wire(encode_rows(h, rng.standard_normal((r, d)).astype(dt), pi_f))
    f = wire(ops.mlp(ops.rms_norm(f_enc, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k))
    return h + decode_rows(f, pi_f, n), seen


def _bound(dt: Any, want: Array) -> float:
    """DESIGN §6: float64 to rtol 1e-10 of the largest entry; float32 to the rounding bound of
    tests/test_hf.py for one block at β (64·u·(1 + β)·(1 + max|y|)): orders of magnitude below a wrong
    permutation, head order or missed bias, which moves the output by O(max|y|)."""
    scale = float(np.abs(want).max())
    return 1e-10 * scale if dt == np.float64 else 64 * U32 * (1 + BETA) * (1 + scale)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("n", "r"), SHAPES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_block_through_the_transforms_equals_the_reference_block(
    model: str, n: int, r: int, dtype: Any
) -> None:
    """Prefill (no cache) and a continuation after a 3-row cache: the §5.1 pipeline gives the reference
    block's output; every array on the wire keeps the model's dtype."""
    w = _weights(model, dtype)
    ref = ReferenceModel(w)
    rng = np.random.default_rng(n * 10 + r)
    prompt = w.embed[rng.integers(0, w.config.vocab_size, 3)]
    cache = KVCache()
    ref.block(prompt, w.layers[0], np.arange(3), 0, cache)
    x = w.embed[rng.integers(0, w.config.vocab_size, n)]
    for kv, start in ((None, 0), ((cache.keys[0], cache.values[0]), 3)):
        want = ref.block(
            x, w.layers[0], np.arange(start, start + n), 0, KVCache() if kv is None else cache.copy()
        )
        got, seen = _scx_block(w, x, kv, start, r, seed=n + r + start)
        assert want.dtype == got.dtype == dtype and set(seen) == {np.dtype(dtype)}
        delta = float(np.abs(got - want).max())
        assert delta <= _bound(dtype, want), f"{model} n={n} r={r} start={start}: max |Δ| {delta:.3g}"


def test_the_block_comparison_has_teeth() -> None:
    """Control: the same pipeline with P's inverse skipped on the way to the O stage (the head order of a
    GQA model left permuted) misses the reference block by far more than the float32 bound."""
    w = _weights("llama_gqa2", np.float32)
    x = w.embed[[3, 1, 4, 1]]
    want = ReferenceModel(w).block(x, w.layers[0], np.arange(4), 0, KVCache())
    got, _ = _scx_block(w, x, None, 0, 2, seed=7)
    assert float(np.abs(got - want).max()) <= _bound(np.float32, want)
    wrong, _ = _scx_block(w, x, None, 0, 2, seed=7, keep_p=True)
    assert float(np.abs(wrong - want).max()) > 1000 * _bound(np.float32, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("heads", "kv", "n", "r"), [(4, 2, 3, 2), (2, 2, 1, 0), (1, 1, 4, 1), (4, 1, 2, 3)])
def test_guard_block_decode_step_unlocks_to_plaintext_attention(
    heads: int, kv: int, n: int, r: int, dtype: Any
) -> None:
    """DESIGN §5.3, last guard blocks: the server scores a new q against the locked K^c = ρ(K ⊕ R) plus the
    new row k; the client unlocks the scores (true order, decoys dropped) and finishes softmax·V with its
    own V and the new v: the plaintext attention of the token at position n over n + 1 rows."""
    rng = np.random.default_rng(heads * 100 + kv * 10 + n + r)
    dh, g = 4, heads // kv
    k = rng.standard_normal((n, kv, dh)).astype(dtype)
    v = rng.standard_normal((n, kv, dh)).astype(dtype)
    q_new = rng.standard_normal((1, heads, dh)).astype(dtype)
    k_new = rng.standard_normal((1, kv, dh)).astype(dtype)
    v_new = rng.standard_normal((1, kv, dh)).astype(dtype)
    rho = Permutation(rng.permutation(n + r))
    locked: Array = encode_rows(k.reshape(n, -1), rng.standard_normal((r, kv * dh)).astype(dtype), rho)
    keys = np.concatenate([locked, k_new.reshape(1, -1)]).reshape(n + r + 1, kv, dh)  # the server's rows
    scores = np.einsum("hgd,khd->hgk", q_new.reshape(kv, g, dh), keys) / dh**0.5  # its scores, sent
    unlocked: Array = unlock_scores(scores, rho, n)
    assert unlocked.dtype == dtype and unlocked.shape == (kv, g, n + 1)
    probs = ops.softmax(unlocked)
    out = np.einsum("hgk,khd->hgd", probs, np.concatenate([v, v_new])).reshape(1, heads, dh)
    want = ops.attention(q_new, np.concatenate([k, k_new]), np.concatenate([v, v_new]))
    tol = 1e-13 if dtype == np.float64 else 64 * U32
    np.testing.assert_allclose(out, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_t4_reorder_and_t3_unpermute_are_exact(dtype: Any) -> None:
    """T4: Attn(q, K[ρ], V[ρ]) = Attn(q, K, V) with no mask (rounding: a sum reordered); T1 and T3 decodes
    invert their encodes bit for bit; float32 stays float32."""
    rng = np.random.default_rng(11)
    k = rng.standard_normal((6, 2, 4)).astype(dtype)
    v = rng.standard_normal((6, 2, 4)).astype(dtype)
    q = rng.standard_normal((1, 4, 4)).astype(dtype)
    rho = rng.permutation(6)
    kr: Array
    vr: Array
    kr, vr = reorder_cache(k, v, rho)
    assert kr.dtype == vr.dtype == dtype
    tol = 1e-14 if dtype == np.float64 else 16 * U32
    np.testing.assert_allclose(ops.attention(q, kr, vr), ops.attention(q, k, v), rtol=0, atol=tol)
    head = _head_perm(rng, 2, 4)
    assert np.array_equal(head_unpermute(head_permute(q, head, 2), head, 2), q)
    x = k.reshape(6, -1)
    assert np.array_equal(unpermute_rows(permute_rows(x, rho), rho), x)


# --- refusals: project errors, inputs unchanged ------------------------------------------------------

_RNG = np.random.default_rng(5)
X = _RNG.standard_normal((3, 4)).astype(np.float32)
R = _RNG.standard_normal((2, 4)).astype(np.float32)
PI = np.array([4, 0, 3, 1, 2])
O3 = _RNG.standard_normal((3, 4, 2)).astype(np.float32)
HEAD = HeadPermutation(np.array([1, 0]), np.array([[1, 0], [0, 1]]))
NAN = X.copy()
NAN[1, 2] = np.nan

REFUSALS: dict[str, Callable[[], Any]] = {
    "permute: NaN rows": lambda: permute_rows(NAN, [2, 0, 1]),
    "permute: short perm": lambda: permute_rows(X, [1, 0]),
    "permute: repeated index": lambda: permute_rows(X, [0, 0, 1]),
    "permute: float perm": lambda: permute_rows(X, np.array([2.0, 0.0, 1.0])),
    "unpermute: perm of other rows": lambda: unpermute_rows(X, PI),
    "with_decoys: other width": lambda: with_decoys(X, R[:, :3]),
    "with_decoys: NaN decoys": lambda: with_decoys(X, NAN[:2]),
    "encode: perm without the decoys": lambda: encode_rows(X, R, [2, 0, 1]),
    "encode: integer rows": lambda: encode_rows(X.astype(np.int32), R, PI),
    "decode: n past the rows": lambda: decode_rows(X, [2, 0, 1], 4),
    "decode: n a float": lambda: decode_rows(X, [2, 0, 1], 2.0),  # type: ignore[arg-type]
    "reencode: perm shorter than the decoys": lambda: reencode_sum(X, [2, 0, 1], X, [1, 2, 0], R, [0]),
    "reencode: perm_s of other rows": lambda: reencode_sum(X, [1, 0], X, [1, 2, 0], R, PI),
    "reencode: NaN s": lambda: reencode_sum(NAN, [2, 0, 1], X, [1, 2, 0], R, PI),
    "head_permute: group size of other heads": lambda: head_permute(O3, HEAD, 1),
    "head_permute: not a HeadPermutation": lambda: head_permute(O3, np.arange(4), 2),  # type: ignore[arg-type]
    "encode_head_rows: decoys of other width": lambda: encode_head_rows(O3, HEAD, 2, R[:, :3], [3, 0, 1, 2]),
    "reorder: k and v of other rows": lambda: reorder_cache(X, X[:2], [2, 0, 1]),
    "unlock: more real rows than ρ": lambda: unlock_scores(X, [1, 0], 3),
    "blind: eta of another shape": lambda: blind(X, R),
    "blind: NaN eta": lambda: blind(X, NAN),
    "unblind: empty correction": lambda: unblind(X, X[:0]),
    "correction: weight of other width": lambda: blinding_correction(X, np.ones((3, 5), np.float32)),
    "laplace: NaN scale": lambda: laplace_noise((2, 2), float("nan"), np.random.default_rng(0)),
    "laplace: global random state": lambda: laplace_noise((2, 2), 1.0, np.random),
    "HeadPermutation: sigma not a permutation": lambda: HeadPermutation(np.array([0]), np.array([[0, 0]])),
    "Permutation: ragged": lambda: Permutation([[0], [1, 2]]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_project_errors_and_change_no_input(case: str) -> None:
    before = {name: a.copy() for name, a in (("X", X), ("R", R), ("PI", PI), ("O3", O3), ("NAN", NAN))}
    with pytest.raises(SCXError):
        REFUSALS[case]()
    for name, a in (("X", X), ("R", R), ("PI", PI), ("O3", O3), ("NAN", NAN)):
        assert np.array_equal(a, before[name], equal_nan=True), f"{case} changed {name}"


# --- the reference's block and block_rows: argument checks -------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (dict(lw="layer 0"), ConfigError, "LayerWeights"),
        (dict(x=np.ones((2, 16), dtype=np.int64)), DTypeError, "floating"),
        (dict(x=np.ones((2, 8))), ShapeError, None),  # held before: a ShapeError from RMSNorm
        (dict(x=np.ones(16)), ShapeError, None),  # held before: from the QKV projection
        (dict(positions=np.array([3.0, 4.0])), DTypeError, "positions must be integers"),
        (dict(positions=np.array([-1, 0])), ShapeError, "positions must be >= 0"),
        (dict(positions=np.array([3])), ShapeError, None),  # held before: from RoPE
        (dict(positions=[[3], [4, 5]]), ShapeError, "rectangular"),
    ],
)
def test_reference_block_refuses_bad_arguments_and_leaves_the_cache(
    bad: dict[str, Any], error: type[Exception], match: str | None
) -> None:
    """A weights object of another kind and ragged positions raised AttributeError / ValueError; an
    integer x was computed in float64, float positions rotated as given and a negative one taken, where
    the backend's plaintext forward refuses them; now each is refused before the cache is touched (rows of
    another width or rank and a position count other than the rows' were ShapeErrors already)."""
    w = tiny_weights(4)
    ref = ReferenceModel(w)
    _, cache = ref.prefill([1, 2, 3])
    before = cache.copy()
    args: dict[str, Any] = dict(x=w.embed[[5, 6]], lw=w.layers[0], positions=np.array([3, 4]))
    args.update(bad)
    with pytest.raises(error, match=match):
        ref.block(args["x"], args["lw"], args["positions"], 0, cache)
    assert [k.shape for k in cache.keys] == [k.shape for k in before.keys]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(cache.keys + cache.values, before.keys + before.values, strict=True)
    )


def test_reference_block_takes_rows_as_a_nested_list() -> None:
    """Rows given as a list (as the transforms take them) give the array's result; they raised
    AttributeError ('list' object has no attribute 'shape') after the QKV projection had run."""
    w = tiny_weights(4)
    ref = ReferenceModel(w)
    x = w.embed[[5, 6]]
    want = ref.block(x, w.layers[0], np.arange(2), 0, KVCache())
    got = ref.block(x.tolist(), w.layers[0], [0, 1], 0, KVCache())  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, want)


def test_block_rows_refuses_ragged_positions_as_a_protocol_error() -> None:
    """Ragged positions raised numpy's bare ValueError; block_rows documents ProtocolError."""
    w = tiny_weights(4)
    b = NumpyBackend(w)
    _, kv = block(b, w.embed[[1, 2]], 0, np.arange(2), None)
    with pytest.raises(ProtocolError, match="positions"):
        block_rows(b, w.embed[[3, 4]], 0, [[2], [2, 3]], [kv, kv])  # type: ignore[arg-type]


def test_reencode_sum_names_a_perm_too_short_for_its_decoys() -> None:
    """It said 's and y need at least -1 rows'; the fault is the perm's length against the decoys."""
    with pytest.raises(ShapeError, match=r"^perm of 1 rows cannot hold 2 decoys$"):
        reencode_sum(X, [2, 0, 1], X, [1, 2, 0], R, [0])


# --- the reference forward in float32 against Hugging Face ----------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2"])
def test_reference_float32_equals_hugging_face_float32(kind: str) -> None:
    """float32 weights give float32 logits and KV caches — the reference and the PlainRunner on a float32
    numpy backend — within test_hf's float32 bound (β = 0) of HF's own float32 forward, with the same
    greedy tokens: the prompt, and one token decoded after it."""
    pytest.importorskip("transformers")
    import torch

    from scx_ref.hf import weights_from_hf
    from tests.test_hf import N_LAYERS, PROMPT, tiny_model

    model = tiny_model(kind, "eager", seed=3)
    w32 = weights_from_hf(model, np.float32)
    ref = ReferenceModel(w32)
    ids = PROMPT[0]
    logits, cache = ref.prefill(ids[:-1])
    step = ref.decode(int(ids[-1]), cache)
    got = np.concatenate([logits, step[None]])
    assert got.dtype == np.float32 and {a.dtype for a in cache.keys + cache.values} == {np.dtype(np.float32)}
    runner = PlainRunner(NumpyBackend(w32, np.float32))
    ran = np.concatenate([runner.prefill(ids[:-1]), runner.decode(int(ids[-1]))])
    assert ran.dtype == np.float32
    with torch.no_grad():
        hf = model(torch.from_numpy(PROMPT)).logits[0].numpy()
    tol = 64 * N_LAYERS * U32 * (1 + np.abs(hf).max())
    for logits_of in (got, ran):
        assert float(np.abs(logits_of - hf).max()) <= tol
        assert np.array_equal(logits_of.argmax(-1), hf.argmax(-1))


def test_reference_float32_one_head_equals_hugging_face_float32() -> None:
    """One query and KV head (GQA ratio 1), a single-token prompt, float32: as above."""
    pytest.importorskip("transformers")
    import torch

    from tests.test_reference import HF_CASES, _copy_weights, _hf_model

    kind, cfg = HF_CASES["llama_one_head"]
    w = tiny_weights(9, **{k: v for k, v in cfg.to_dict().items() if k not in ("name", "max_positions")})
    model = _hf_model(kind, w.config)
    _copy_weights(model, w)
    model = model.float()
    w32 = w.astype(np.float32)
    ids = np.array([7])
    got = ReferenceModel(w32).prefill(ids)[0]
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits[0].numpy()
    assert got.dtype == np.float32
    assert float(np.abs(got - hf).max()) <= 64 * U32 * (1 + np.abs(hf).max())
    assert np.array_equal(got.argmax(-1), hf.argmax(-1))


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_laplace_noise_of_shape_empty_tuple_is_a_0d_array(beta: float) -> None:
    """η of shape () is a 0-d array of the dtype asked for, for every β: β > 0 gave a numpy scalar (not
    the NDArray it is typed and documented to return), β = 0 a 0-d array."""
    eta = laplace_noise((), beta, np.random.default_rng(1), np.float32)
    assert isinstance(eta, np.ndarray) and eta.shape == () and eta.dtype == np.float32


def test_a_decoy_past_the_rows_dtype_is_refused_without_a_warning_by_every_encode() -> None:
    """reencode_sum and encode_head_rows refuse a decoy float32 cannot hold with their NonFiniteError, as
    with_decoys and encode_rows do, without first emitting numpy's RuntimeWarning (overflow in cast) —
    an exception of another kind where warnings are errors."""
    x = np.ones((2, 3), dtype=np.float32)
    big = np.full((1, 3), 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError, match="reencoded sum"):
            reencode_sum(x, [0, 1], x, [1, 0], big, [2, 0, 1])
        with pytest.raises(NonFiniteError, match="o and decoys"):
            encode_head_rows(x.reshape(2, 1, 3), HeadPermutation.identity(1, 3), 1, big, [2, 0, 1])

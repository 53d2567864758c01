"""Regression tests of the shared core modules (forward, ops, arrays): bad input gives a
project error and changes nothing; the plaintext block loop matches Hugging Face where head_dim is not
hidden/heads and across decode offsets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.arrays import NumpyOps, check_narrow, gather_sum_index, permutation_of_rows, row_index
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, DTypeError, ProtocolError, ShapeError, VocabularyError
from scx_ref.forward import PlainRunner, block_rows
from scx_ref.weights import random_weights
from tests.tiny import tiny_weights

# --- forward.py ----------------------------------------------------------------------------------------


def test_refused_prefill_keeps_the_previous_cache() -> None:
    runner = PlainRunner(NumpyBackend(tiny_weights(0)))
    runner.prefill([1, 2, 3])
    before = [(k.copy(), v.copy()) for k, v in runner.cache]
    for bad in ([1.5], [], [99], list(range(40))):
        with pytest.raises((VocabularyError, ProtocolError)):
            runner.prefill(bad)
        assert runner.length == 3
        assert all(
            np.array_equal(k, k0) and np.array_equal(v, v0)
            for (k, v), (k0, v0) in zip(runner.cache, before, strict=True)
        )


def test_generate_error_carries_the_tokens_made() -> None:
    w = tiny_weights(0)
    runner = PlainRunner(NumpyBackend(w))
    prompt = list(range(30))  # max_positions 32: tokens 1–3 fit, the 4th decode step does not
    with pytest.raises(ProtocolError) as info:
        runner.generate(prompt, 5)
    want = PlainRunner(NumpyBackend(w)).generate(prompt, 3)
    assert info.value.tokens == want and len(want) == 3


def _kv(rows: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((rows, 2, 4)), np.zeros((rows, 2, 4))


@pytest.mark.parametrize(
    ("x", "positions", "caches", "tile"),
    [
        (np.zeros((0, 16)), np.zeros(0, np.int64), [], 1),  # no rows: IndexError before
        (np.zeros((2, 16)), 2, [_kv(2)] * 2, 1),  # a scalar position: TypeError before
        (np.zeros((2, 16)), np.array([2.0, 2.0]), [_kv(2)] * 2, 1),  # float positions
        (np.zeros((2, 16)), np.array([2, 2]), [_kv(2)] * 2, 1.5),  # a float tile: TypeError before
        (np.zeros((2, 16)), np.array([2, 2]), [_kv(2)] * 2, "2"),
    ],
)
def test_block_rows_refuses_bad_arguments(x: Any, positions: Any, caches: Any, tile: Any) -> None:
    with pytest.raises(ProtocolError):
        block_rows(NumpyBackend(tiny_weights(0)), x, 0, positions, caches, tile)


# --- ops.py: math against Hugging Face --------------------------------------------------------------------

HD_CASES = {
    # head_dim differs from hidden_size / n_heads in each
    "llama": ModelConfig(
        vocab_size=20, hidden_size=12, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6,
        intermediate_size=10, rms_eps=1e-5, rope_theta=100.0, max_positions=16,
    ),
    "qwen2": ModelConfig(
        vocab_size=20, hidden_size=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=10,
        intermediate_size=10, rms_eps=1e-6, rope_theta=50.0, qkv_bias=True, max_positions=16,
    ),
    "mixtral": ModelConfig(
        vocab_size=20, hidden_size=8, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=2,
        intermediate_size=10, n_experts=5, top_k=3, rope_theta=30.0, max_positions=16,
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(HD_CASES))
def test_plain_runner_decode_matches_hugging_face(kind: str) -> None:
    """Prefill of 5 tokens then 4 decode steps (RoPE and the causal mask at offsets) against HF's logits
    of the whole sequence, on models whose head_dim is not hidden/heads (HF_TOL as test_reference)."""
    torch = pytest.importorskip("torch")
    from tests.test_reference import HF_TOL, _copy_weights, _hf_model

    cfg = HD_CASES[kind]
    w = random_weights(cfg, np.random.default_rng(1))
    model = _hf_model(kind, cfg)
    _copy_weights(model, w)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 9)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits[0].numpy()
    runner = PlainRunner(NumpyBackend(w))
    got = np.concatenate([runner.prefill(ids[:5])] + [runner.decode(int(t)) for t in ids[5:]])
    assert np.abs(got - want).max() <= HF_TOL * max(1.0, float(np.abs(want).max()))


# --- ops.py: bad input ---------------------------------------------------------------------------------


def test_rope_refuses_integer_arrays_and_dtypes() -> None:
    """An integer x got cos/sin tables truncated to 0 and 1: a silently wrong rotation before."""
    with pytest.raises(DTypeError):
        ops.apply_rope(np.ones((2, 1, 4), dtype=np.int64), np.arange(2), 1e4)
    with pytest.raises(DTypeError):
        ops.apply_rope(np.ones((2, 1, 4), dtype=bool), np.arange(2), 1e4)
    with pytest.raises(DTypeError):
        ops.rope_cos_sin(np.arange(3), 4, 1e4, np.int64)
    with pytest.raises(DTypeError):
        ops.rope_cos_sin(np.arange(3), 4, 1e4, "bogus")
    with pytest.raises(DTypeError):
        ops.rope_cos_sin(np.array(["a"]), 4, 1e4)
    x = np.random.default_rng(0).standard_normal((2, 1, 4)).astype(np.float32)
    assert ops.apply_rope(x, np.arange(2), 1e4).dtype == np.float32


@pytest.mark.parametrize("top_k", [0, -1, 5, True, 1.5])
def test_moe_refuses_a_top_k_outside_one_to_n_experts(top_k: Any) -> None:
    """0 gave zero rows, −1 silently dropped the last expert, 5 > 4 experts used them all."""
    mlp = tiny_weights(0, moe=True).layers[0].mlp
    with pytest.raises(ConfigError):
        ops.moe(np.ones((3, 16)), mlp, top_k)  # type: ignore[arg-type]


def test_rms_norm_refuses_bad_gains_and_eps() -> None:
    gamma = np.ones(16)
    with pytest.raises(ShapeError):
        ops.rms_norm(np.ones((3, 16)), np.ones(4), 1e-6)
    for eps in (-1.0, float("nan"), "1e-6"):
        with pytest.raises(ConfigError):
            ops.rms_norm(np.ones((3, 16)), gamma, eps)  # type: ignore[arg-type]


def test_products_of_the_wrong_width_are_shape_errors() -> None:
    w = tiny_weights(0)
    lw, lwm = w.layers[0], tiny_weights(0, moe=True).layers[0]
    with pytest.raises(ShapeError):
        ops.linear(np.ones((3, 16)), np.ones((4, 4)))
    with pytest.raises(ShapeError):
        ops.swiglu(np.ones((2, 5)), lw.mlp)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        ops.moe(np.ones((2, 5)), lwm.mlp, 2)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        ops.qkv(np.ones((2, 5)), lw, 4, 2, 4)
    with pytest.raises(ShapeError):
        ops.qkv(np.ones(16), lw, 4, 2, 4)


def test_softmax_silu_causal_mask_attention_argument_checks() -> None:
    assert ops.softmax([0.0, 0.0]).tolist() == [0.5, 0.5]  # type: ignore[arg-type]  # a list: AttributeError before
    for axis in (0.5, True):
        with pytest.raises(ShapeError):
            ops.softmax(np.ones((2, 3)), axis=axis)  # type: ignore[arg-type]
    with pytest.raises(DTypeError):
        ops.silu(np.array([1, "a"], dtype=object))
    for n_q in (-1, 2.5, True):
        with pytest.raises(ShapeError):
            ops.causal_mask(n_q, 3)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        ops.causal_mask(2, 3, 0.5)  # type: ignore[arg-type]
    q, kv = np.ones((2, 2, 4)), np.ones((3, 1, 4))
    for scale in (float("nan"), "a"):
        with pytest.raises(ConfigError):
            ops.attention(q, kv, kv, scale=scale)  # type: ignore[arg-type]
    for dtype in (complex, object):
        with pytest.raises(DTypeError):
            ops.attention(q.astype(dtype), kv, kv)


# --- arrays.py ---------------------------------------------------------------------------------------------


def test_in_place_operations_on_read_only_arrays() -> None:
    """A read-only array (a wire buffer) raised numpy's ValueError; now gathered / added into a new array."""
    o = NumpyOps()
    x = np.arange(6.0).reshape(3, 2)
    x.flags.writeable = False
    got = o.take_rows_in_place(x, np.array([1, 0, 2]))
    np.testing.assert_array_equal(got, np.arange(6.0).reshape(3, 2)[[1, 0, 2]])
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(3, 2))
    with pytest.raises(ShapeError):
        o.take_rows_in_place(x, np.array([0, 0, 2]))
    np.testing.assert_array_equal(o.add_into(x, np.ones((3, 2))), np.arange(6.0).reshape(3, 2) + 1)
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(3, 2))


def test_ragged_indices_and_float_bounds_are_shape_errors() -> None:
    ragged = [[1], [1, 2]]
    with pytest.raises(ShapeError):
        row_index(ragged, 3)
    with pytest.raises(ShapeError):
        permutation_of_rows(ragged, 2)
    with pytest.raises(ShapeError):
        gather_sum_index(ragged, [0, 1], 2, 2, 1)
    with pytest.raises(ShapeError):
        NumpyOps().narrow(np.ones((3, 2)), 0, 0.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        check_narrow((3, 2), 0, 0, 2.0)  # type: ignore[arg-type]
    check_narrow((3, 2), 0, np.int64(1), 2)  # numpy integers stay accepted


# --- timing.py ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("names", ["rms_norm", 5, ["bogus"]])
def test_timed_kernels_refuses_bad_names_whether_kernels_run_or_not(
    names: Any, enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One string was read as its characters (``no fused kernel named ['_', 'm', …]``), 5 raised TypeError,
    and with the kernels off any name passed unchecked."""
    from scx_ref.backends import cpu_kernels
    from scx_ref.timing import timed_kernels

    monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
    match = "collection of kernel names" if names != ["bogus"] else "bogus"
    with pytest.raises(ConfigError, match=match), timed_kernels(names=names):
        pass
    with timed_kernels(names=["rms_norm"]) as spent:  # a real kernel's name stays accepted
        pass
    assert spent == [0.0]


def test_silu_of_infinities_is_torchs_without_a_warning() -> None:
    """A hostile reply's −∞ reached the numpy SiLU (the verifier's SwiGLU) and printed numpy's 'invalid value'
    RuntimeWarning before the reply was refused: the values are torch's (NaN, +∞, NaN), silently."""
    import warnings

    import torch

    x = np.array([-np.inf, np.inf, np.nan, -2.0, 0.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.silu(x)
    want = torch.nn.functional.silu(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-15)

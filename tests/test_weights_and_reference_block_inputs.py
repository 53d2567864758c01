"""The numpy reference forward, the plaintext forward, the weight containers and the model
config refuse bad input with project errors, and never misfile a cache block."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, DTypeError, ProtocolError, ShapeError
from scx_ref.forward import PlainRunner, block, block_rows
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.weights import LayerWeights, ModelWeights, random_weights
from tests.tiny import tiny_config, tiny_weights

# ---------------------------------------------------------------- weights.py


def test_from_dict_ragged_value_is_a_shape_error() -> None:
    w = tiny_weights(0)
    d: dict[str, Any] = {**w.to_dict(), "embed": [[1.0], [1.0, 2.0]]}
    with pytest.raises(ShapeError, match="weight embed is not an array numpy can read"):
        ModelWeights.from_dict(w.config, d)


def test_from_dict_unreadable_value_is_a_dtype_error() -> None:
    class Refuses:
        def __array__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no array here")

    w = tiny_weights(0)
    d: dict[str, Any] = {**w.to_dict(), "lm_head": Refuses()}
    with pytest.raises(DTypeError, match="weight lm_head is not an array numpy can read"):
        ModelWeights.from_dict(w.config, d)


def test_from_dict_bfloat16_tensor_is_a_dtype_error() -> None:
    torch = pytest.importorskip("torch")
    w = tiny_weights(0)
    d = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.to_dict().items()}
    with pytest.raises(DTypeError, match="not an array numpy can read"):
        ModelWeights.from_dict(w.config, d)


def test_from_dict_reads_biases_like_every_other_weight() -> None:
    """A list is read as an array for every weight: the Q/K/V biases were the one exception (DTypeError)."""
    config = tiny_config(qkv_bias=True)
    w = random_weights(config, np.random.default_rng(0))
    d: dict[str, Any] = {k: v.tolist() for k, v in w.to_dict().items()}
    got = ModelWeights.from_dict(config, d)
    assert got.layers[0].bq is not None and w.layers[0].bq is not None
    np.testing.assert_array_equal(got.layers[0].bq, w.layers[0].bq)
    ids = [1, 5, 7]
    np.testing.assert_array_equal(ReferenceModel(got).prefill(ids)[0], ReferenceModel(w).prefill(ids)[0])


@pytest.mark.parametrize("dtype", ["bogus", object()])
def test_astype_unreadable_dtype_is_a_dtype_error(dtype: Any) -> None:
    with pytest.raises(DTypeError, match="dtype must be a floating numpy dtype"):
        tiny_weights(0).astype(dtype)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_numpy_matrix_weight_is_refused_at_construction() -> None:
    """A np.matrix passed the checks, then the forward failed with numpy's ValueError."""
    w = tiny_weights(0)
    lw = w.layers[0]
    bad = LayerWeights(lw.attn_norm, np.asmatrix(lw.wq), lw.wk, lw.wv, lw.wo, lw.mlp_norm, lw.mlp)
    with pytest.raises(DTypeError, match=r"layers\.0\.wq must be a numpy array, not a numpy matrix"):
        ModelWeights(w.config, w.embed, [bad, *w.layers[1:]], w.final_norm, w.lm_head)


def test_random_weights_too_large_for_numpy_is_a_config_error_before_drawing() -> None:
    config = ModelConfig(
        vocab_size=10**30, hidden_size=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, intermediate_size=4
    )
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    with pytest.raises(ConfigError, match="beyond what numpy can allocate"):
        random_weights(config, rng)
    assert rng.bit_generator.state == before  # the caller's generator was not advanced


# ---------------------------------------------------------------- reference.py


@pytest.mark.parametrize("layer", [2, -1, True, 1.0])
def test_reference_block_never_files_keys_under_another_layer(layer: Any) -> None:
    """block(layer=2) on an empty cache appended block 2's keys as block 0's; layer=-1 extended the last."""
    w = tiny_weights(0)
    m = ReferenceModel(w)
    cache = KVCache([np.zeros((1, 2, 4))], [np.zeros((1, 2, 4))]) if layer == -1 else KVCache()
    keys_before = list(cache.keys)
    with pytest.raises(ProtocolError, match="layer must"):
        m.block(w.embed[[1, 2]], w.layers[0], np.arange(2), layer, cache)
    assert cache.keys == keys_before and len(cache.values) == len(keys_before)


def test_reference_block_needs_a_kvcache() -> None:
    w = tiny_weights(0)
    with pytest.raises(ProtocolError, match="block needs a KVCache"):
        ReferenceModel(w).block(w.embed[[1]], w.layers[0], np.arange(1), 0, None)  # type: ignore[arg-type]


def test_reference_block_in_order_still_builds_the_forwards_cache() -> None:
    w = tiny_weights(0)
    m = ReferenceModel(w)
    ids = np.array([3, 1, 4])
    cache = KVCache()
    x = w.embed[ids]
    for i, lw in enumerate(w.layers):
        x = m.block(x, lw, np.arange(3), i, cache)
    _, want = m.prefill(ids)
    for got_k, want_k in zip(cache.keys, want.keys, strict=True):
        np.testing.assert_array_equal(got_k, want_k)


# ---------------------------------------------------------------- forward.py


def test_plain_runner_refuses_a_non_backend() -> None:
    with pytest.raises(ConfigError, match="PlainRunner needs a Backend, got NoneType"):
        PlainRunner(None)  # type: ignore[arg-type]


def test_plain_runner_refuses_a_trace_that_is_not_callable() -> None:
    with pytest.raises(ConfigError, match="trace must be a callable or None"):
        PlainRunner(NumpyBackend(tiny_weights(0)), trace=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("last_only", ["no", 0, None])
def test_plain_runner_last_only_must_be_a_bool(last_only: Any) -> None:
    """last_only='no' was truthy and returned only the last row."""
    runner = PlainRunner(NumpyBackend(tiny_weights(0)))
    runner.prefill([1, 2])
    with pytest.raises(ConfigError, match="last_only must be True or False"):
        runner.forward([3], last_only=last_only)
    assert runner.length == 2
    assert runner.forward([3], last_only=np.bool_(True)).shape == (1, 32)  # type: ignore[arg-type]


@pytest.mark.parametrize("caches", [None, [1, 2], (c for c in range(2)), [(np.zeros((0, 2, 4)),)] * 2])
def test_block_rows_refuses_caches_that_are_not_pairs(caches: Any) -> None:
    b = NumpyBackend(tiny_weights(0))
    with pytest.raises(ProtocolError, match="caches must be a list of"):
        block_rows(b, b.embed(np.array([1, 2])), 0, np.array([0, 0]), caches)


def test_block_refuses_a_cache_that_is_not_a_pair() -> None:
    b = NumpyBackend(tiny_weights(0))
    with pytest.raises(ProtocolError, match="cache must be None or a"):
        block(b, b.embed(np.array([1, 2])), 0, np.array([0, 1]), 1)  # type: ignore[arg-type]

"""Bad arguments to the reference forward, its ops, the mask pool and the generation settings are refused
with project errors before anything changes; the mask pool falls back to derived keys when no entry fits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, ProtocolError, SCXError, ShapeError, VocabularyError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.pool import MaskPool
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.sampling import generation_settings
from tests.tiny import tiny_weights

W = tiny_weights(0)


def _snapshot(cache: KVCache) -> list[Any]:
    return [*cache.keys, *cache.values]


def _same(cache: KVCache, snap: list[Any]) -> bool:
    now = _snapshot(cache)
    return len(now) == len(snap) and all(a is b for a, b in zip(now, snap, strict=True))


# -- defect 1: upto ------------------------------------------------------------------------------------
@pytest.mark.parametrize("upto", [0, 2, 99, -1, 1.5, True, "1"])
def test_forward_refuses_upto_and_leaves_the_cache(upto: Any) -> None:
    model = ReferenceModel(W)
    _, cache = model.prefill(np.array([1, 2, 3]))
    snap = _snapshot(cache)
    with pytest.raises(ProtocolError, match="upto"):
        model.forward(np.array([4]), cache, upto=upto)
    assert _same(cache, snap) and [k.shape[0] for k in cache.keys] == [3] * W.config.n_layers
    want = ReferenceModel(W).decode(5, ReferenceModel(W).prefill(np.array([1, 2, 3]))[1])
    np.testing.assert_array_equal(model.decode(5, cache), want)


def test_partial_cache_continues_only_through_its_blocks() -> None:
    model = ReferenceModel(W)
    cache = KVCache()
    model.forward(np.array([1, 2]), cache, upto=1)
    assert len(cache.keys) == 2
    snap = _snapshot(cache)
    with pytest.raises(ProtocolError, match="upto"):
        model.decode(3, cache)  # a full forward over a cache of blocks 0..1 only
    assert _same(cache, snap)
    model.forward(np.array([3]), cache, upto=1)  # the same upto continues it
    assert [k.shape[0] for k in cache.keys] == [3, 3]


def test_a_forward_that_fails_midway_leaves_the_cache() -> None:
    _, cache = ReferenceModel(W).prefill(np.array([1, 2, 3]))
    snap = _snapshot(cache)

    def trace(stage: str, layer: int, x: Any) -> None:
        if layer == 2:
            raise ShapeError("stop here")

    with pytest.raises(ShapeError, match="stop here"):
        ReferenceModel(W, trace=trace).decode(4, cache)
    assert _same(cache, snap)


# -- defect 3: ids, model, cache, generate -------------------------------------------------------------
@pytest.mark.parametrize("ids", [np.array([], dtype=np.int64), None, "abc", 3, [[1], [1, 2]]])
def test_prefill_refuses_bad_ids(ids: Any) -> None:
    with pytest.raises((VocabularyError, ProtocolError)):
        ReferenceModel(W).prefill(ids)


def test_empty_prompt_message_and_generate() -> None:
    with pytest.raises(ProtocolError, match="at least one token"):
        ReferenceModel(W).prefill([])
    with pytest.raises(ProtocolError, match="at least one token"):
        ReferenceModel(W).generate(np.array([], dtype=np.int64), 2)


def test_model_and_cache_arguments() -> None:
    with pytest.raises(ConfigError, match="ModelWeights"):
        ReferenceModel(None)  # type: ignore[arg-type]
    model = ReferenceModel(W)
    with pytest.raises(ProtocolError, match="KVCache"):
        model.forward(np.array([1]), cache={})  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="KVCache"):
        model.decode(1, None)  # type: ignore[arg-type]
    for n_new in (-1, 1.5, None):
        with pytest.raises(ConfigError, match="n_new"):
            model.generate([1], n_new)  # type: ignore[arg-type]


def test_generate_past_max_positions_carries_its_tokens() -> None:
    model = ReferenceModel(W)
    with pytest.raises(ProtocolError, match="max_positions") as info:
        model.generate([1] * 30, 5)
    assert info.value.tokens == model.generate([1] * 30, 3)


# -- defect 2: ops -----------------------------------------------------------------------------------
def test_ops_shape_checks() -> None:
    with pytest.raises(ShapeError, match="position"):
        ops.apply_rope(np.ones((2, 1, 4)), [0], 1e4)
    with pytest.raises(ShapeError):
        ops.apply_rope(np.ones((2, 1, 3)), [0, 1], 1e4)
    q, k = np.ones((2, 4, 4)), np.ones((3, 2, 4))
    for args, kw in (
        ((q, np.ones((3, 0, 4)), np.ones((3, 0, 4))), {}),  # no KV heads
        ((q, np.ones((3, 2, 5)), k), {}),  # head_dim differs
        ((q, k, k), {"mask": np.ones((5, 5), bool)}),  # mask shape
        ((np.ones((2, 4)), k, k), {}),  # rank
    ):
        with pytest.raises(ShapeError):
            ops.attention(*args, **kw)
    assert ops.attention(q, k, k, mask=ops.causal_mask(2, 3)).shape == (2, 4, 4)
    with pytest.raises(ShapeError):
        ops.softmax(np.zeros((2, 0)))
    with pytest.raises(ShapeError):
        ops.qkv(np.ones((2, W.config.hidden_size)), W.layers[0], 3, 2, 4)


# -- defect 4: mask pool --------------------------------------------------------------------------------
def _client() -> Client[Any]:
    cfg = SCXConfig(level="blind", r1=2, r2=2)
    return Client(NumpyBackend(W), KeySchedule(bytes(range(1, 33)), bytes(16)), cfg)


@pytest.mark.parametrize(("capacity", "steps"), [(2.5, 0), (4, 1.5), (True, 0), (4, "1"), (None, 0)])
def test_pool_refuses_non_integer_sizes(capacity: Any, steps: Any) -> None:
    client = _client()
    with pytest.raises(ProtocolError, match="integer"):
        MaskPool(client, capacity, steps)
    assert client.pool is None


def test_pool_take_refuses_non_integers_before_removing() -> None:
    pool = MaskPool(_client(), np.int64(4), np.int64(1))
    pool.fill(1)
    for n in (2.5, True, "2", None):
        with pytest.raises(ProtocolError, match="integer"):
            pool.take(n)  # type: ignore[arg-type]
        assert len(pool) == 1
    with pytest.raises(ProtocolError, match="integer"):
        pool.fill(1.5)  # type: ignore[arg-type]
    assert pool.take(np.int64(2)).n == 2 and len(pool) == 0


def test_prefill_longer_than_the_pool_derives_its_own_keys() -> None:
    client = _client()
    pool = MaskPool(client, 4)
    pool.fill(2)
    entries = list(pool._entries)
    ids = np.array([1] * 5)
    got = client.prefill(ids, LocalTransport(Server(client.b)))
    np.testing.assert_allclose(got, ReferenceModel(W).prefill(ids)[0], rtol=1e-9, atol=1e-9)
    assert list(pool._entries) == entries  # untouched
    client.prefill(ids[:3], LocalTransport(Server(client.b)))
    assert len(pool) == 1  # a prompt that fits takes an entry


# -- defect 5: generation settings -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{"seed": 2**70}, {"stop_strings": 5}, {"temperature": 10**400}],
)
def test_generation_settings_refuse(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        generation_settings(None, {"max_new_tokens": 3, "do_sample": True, **options}).generator()


def test_generation_settings_accept_numpy_numbers_and_the_largest_seed() -> None:
    s = generation_settings(None, {"max_new_tokens": 3, "do_sample": True, "temperature": np.float32(0.5)})
    assert s.temperature == 0.5
    generation_settings(None, {"max_new_tokens": 3, "do_sample": True, "seed": 2**64 - 1}).generator()
    with pytest.raises(SCXError):
        generation_settings(None, None)  # type: ignore[arg-type]

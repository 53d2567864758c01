"""Tests that kill mutants of :mod:`scx_ref.reference` (the plaintext oracle every SCX run is checked
against) that survived ``python -m mutation.run reference`` (mutation/REPORT_reference_forward.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.errors import ConfigError, DTypeError, ProtocolError, ShapeError
from scx_ref.reference import KVCache, ReferenceModel
from tests.refusals import Refusal, refusal_test
from tests.tiny import tiny_weights


def test_a_copied_cache_is_independent_of_the_one_it_copies() -> None:
    model = ReferenceModel(tiny_weights(0))
    _, cache = model.prefill([1, 2, 3])
    copy = cache.copy()
    assert KVCache().length == 0 and cache.length == copy.length == 3
    first = model.decode(4, cache)
    assert cache.length == 4 and copy.length == 3
    np.testing.assert_array_equal(model.decode(4, copy), first)
    copy.keys[0][0, 0, 0] = 123.0
    assert cache.keys[0][0, 0, 0] != 123.0


_W = tiny_weights(0)  # 4 blocks, d = 16, 2 KV heads of 4, max_positions 32
_M = ReferenceModel(_W)
_X = np.zeros((1, 16))
_LW = _W.layers[0]
_P0 = np.array([0])
_HELD = "must hold keys and values of shape (rows, 2, 4) with the rows of block 0, got "
_HELD0, _HELD3 = "cache block 0 " + _HELD, "cache block 3 " + _HELD


def _kv(*shape: int, dtype: Any = np.float64) -> Any:
    return np.zeros(shape, dtype=dtype)


def _cache(keys: list[Any], values: list[Any]) -> KVCache:
    return KVCache(keys, values)


REFUSALS: list[Refusal] = [
    (
        "init-weights",
        lambda: ReferenceModel(3),  # type: ignore[arg-type]
        ConfigError,
        "ReferenceModel needs ModelWeights, got int",
    ),
    (
        "init-trace",
        lambda: ReferenceModel(_W, trace=3),  # type: ignore[arg-type]
        ConfigError,
        "trace must be a callable or None, got int",
    ),
    (
        "block-cache",
        lambda: _M.block(_X, _LW, _P0, 0, [[], []]),  # type: ignore[arg-type]
        ProtocolError,
        "block needs a KVCache holding lists of as many keys as values, got list",
    ),
    (
        "block-cache-counts",
        lambda: _M.block(_X, _LW, _P0, 0, _cache([_kv(1, 2, 4)], [])),
        ProtocolError,
        "block needs a KVCache holding lists of as many keys as values, got 1 keys and 0 values",
    ),
    (
        "block-cache-tuple-keys",
        lambda: _M.block(_X, _LW, _P0, 0, KVCache((), [])),  # type: ignore[arg-type]
        ProtocolError,
        "block needs a KVCache holding lists of as many keys as values, got tuple keys and 0 values",
    ),
    (
        "block-cache-tuple-values",
        lambda: _M.block(_X, _LW, _P0, 0, KVCache([], ())),  # type: ignore[arg-type]
        ProtocolError,
        "block needs a KVCache holding lists of as many keys as values, got 0 keys and tuple values",
    ),
    (
        "block-layer",
        lambda: _M.block(_X, _LW, _P0, 1, KVCache()),
        ProtocolError,
        "layer must lie in [0, 0], got 1",
    ),
    (
        "block-weights",
        lambda: _M.block(_X, _W, _P0, 0, KVCache()),  # type: ignore[arg-type]
        ConfigError,
        "block needs a block's LayerWeights, got ModelWeights",
    ),
    (
        "block-width",
        lambda: _M.block(np.zeros((1, 3)), _LW, _P0, 0, KVCache()),
        ShapeError,
        "x must be rows × 16, got shape (1, 3)",
    ),
    (
        "block-cached-heads",
        lambda: _M.block(_X, _LW, np.array([1]), 0, _cache([_kv(1, 3, 4)], [_kv(1, 3, 4)])),
        ProtocolError,
        "cache block 0 must hold keys and values of shape (rows, 2, 4), got (1, 3, 4), (1, 3, 4)",
    ),
    (
        "block-cached-head-dim",
        lambda: _M.block(_X, _LW, np.array([1]), 0, _cache([_kv(1, 2, 5)], [_kv(1, 2, 5)])),
        ProtocolError,
        "cache block 0 must hold keys and values of shape (rows, 2, 4), got (1, 2, 5), (1, 2, 5)",
    ),
    (
        "block-cached-rank",
        lambda: _M.block(_X, _LW, np.array([1]), 0, _cache([_kv(1, 8)], [_kv(1, 8)])),
        ProtocolError,
        "cache block 0 must hold keys and values of shape (rows, 2, 4), got (1, 8), (1, 8)",
    ),
    (
        "block-cached-values",
        lambda: _M.block(_X, _LW, np.array([1]), 0, _cache([_kv(1, 2, 4)], [_kv(2, 2, 4)])),
        ProtocolError,
        "cache block 0 must hold keys and values of shape (rows, 2, 4), got (1, 2, 4), (2, 2, 4)",
    ),
    (
        "block-cached-keys-type",
        lambda: _M.block(_X, _LW, np.array([1]), 0, _cache([[1]], [_kv(1, 2, 4)])),
        ProtocolError,
        "cache block 0 must hold keys and values of shape (rows, 2, 4), got list, (1, 2, 4)",
    ),
    (
        "block-cached-values-type",
        lambda: _M.block(_X, _LW, np.array([1]), 0, _cache([_kv(1, 2, 4)], [[1]])),
        ProtocolError,
        "cache block 0 must hold keys and values of shape (rows, 2, 4), got (1, 2, 4), list",
    ),
    (
        "forward-upto",
        lambda: _M.forward(np.array([1]), upto=4),
        ProtocolError,
        "upto must be None or a block index in [0, 4), got 4",
    ),
    (
        "forward-upto-negative",
        lambda: _M.forward(np.array([1]), upto=-1),
        ProtocolError,
        "upto must be None or a block index in [0, 4), got -1",
    ),
    (
        "forward-upto-bool",
        lambda: _M.forward(np.array([1]), upto=True),
        ProtocolError,
        "upto must be None or a block index in [0, 4), got True",
    ),
    (
        "forward-upto-float",
        lambda: _M.forward(np.array([1]), upto=1.0),  # type: ignore[arg-type]
        ProtocolError,
        "upto must be None or a block index in [0, 4), got 1.0",
    ),
    (
        "forward-cache",
        lambda: _M.forward(np.array([1]), cache=3),  # type: ignore[arg-type]
        ProtocolError,
        "cache must be a KVCache or None, got int",
    ),
    (
        "forward-cache-counts",
        lambda: _M.forward(np.array([1]), cache=_cache([_kv(1, 2, 4)], [])),
        ProtocolError,
        "cache.keys and cache.values must be lists of one array per block",
    ),
    (
        "forward-cache-tuple",
        lambda: _M.forward(np.array([1]), cache=KVCache([], ())),  # type: ignore[arg-type]
        ProtocolError,
        "cache.keys and cache.values must be lists of one array per block",
    ),
    (
        "forward-cache-of-two-blocks",
        lambda: _M.forward(np.array([1]), cache=_M.forward(np.array([1, 2]), upto=1)[1]),
        ProtocolError,
        "the cache holds blocks 0..1, so only a forward with upto=1 continues it, not one through block 3",
    ),
    (
        "forward-cache-of-every-block",
        lambda: _M.forward(np.array([1]), cache=_M.prefill([1, 2])[1], upto=1),
        ProtocolError,
        "the cache holds blocks 0..3, so only a forward with upto=None or 3 continues it, "
        "not one through block 1",
    ),
    (
        "forward-cache-values",
        lambda: _M.forward(
            np.array([1]), cache=_cache([_kv(1, 2, 4)] * 4, [_kv(1, 2, 4)] * 3 + [_kv(2, 2, 4)])
        ),
        ProtocolError,
        _HELD3 + "(1, 2, 4), (2, 2, 4)",
    ),
    (
        "forward-cache-rows",
        lambda: _M.forward(
            np.array([1]),
            cache=_cache([_kv(1, 2, 4)] * 3 + [_kv(2, 2, 4)], [_kv(1, 2, 4)] * 3 + [_kv(2, 2, 4)]),
        ),
        ProtocolError,
        _HELD3 + "(2, 2, 4), (2, 2, 4)",
    ),
    (
        "forward-cache-heads",
        lambda: _M.forward(np.array([1]), cache=_cache([_kv(1, 2, 5)] * 4, [_kv(1, 2, 5)] * 4)),
        ProtocolError,
        _HELD0 + "(1, 2, 5), (1, 2, 5)",
    ),
    (
        "forward-cache-rank",
        lambda: _M.forward(np.array([1]), cache=_cache([_kv(1, 8)] * 4, [_kv(1, 8)] * 4)),
        ProtocolError,
        _HELD0 + "(1, 8), (1, 8)",
    ),
    (
        "forward-cache-types",
        lambda: _M.forward(np.array([1]), cache=_cache([[1]] * 4, ["v"] * 4)),
        ProtocolError,
        _HELD0 + "list, str",
    ),
    (
        "forward-cache-int-keys",
        lambda: _M.forward(
            np.array([1]), cache=_cache([_kv(1, 2, 4, dtype=np.int64)] * 4, [_kv(1, 2, 4)] * 4)
        ),
        ProtocolError,
        "cache block 0 must hold floating-point keys and values, got int64, float64",
    ),
    (
        "forward-cache-int-values",
        lambda: _M.forward(
            np.array([1]), cache=_cache([_kv(1, 2, 4)] * 4, [_kv(1, 2, 4, dtype=np.int64)] * 4)
        ),
        ProtocolError,
        "cache block 0 must hold floating-point keys and values, got float64, int64",
    ),
    (
        "forward-too-long",
        lambda: _M.forward(np.arange(33) % 32),
        ProtocolError,
        "sequence length 33 exceeds max_positions 32",
    ),
    (
        "forward-too-long-after-a-cache",
        lambda: _M.forward(np.arange(3), cache=_M.prefill(np.arange(30))[1]),
        ProtocolError,
        "sequence length 33 exceeds max_positions 32",
    ),
    (
        "forward-cache-block-0-empty",
        lambda: _M.forward(
            np.array([1]),
            cache=_cache([_kv(0, 2, 4)] + [_kv(1, 2, 4)] * 3, [_kv(0, 2, 4)] + [_kv(1, 2, 4)] * 3),
        ),
        ProtocolError,
        "cache block 1 " + _HELD + "(1, 2, 4), (1, 2, 4)",
    ),
    (
        "forward-cache-values-type",
        lambda: _M.forward(np.array([1]), cache=_cache([_kv(1, 2, 4)] * 4, [[1]] * 4)),
        ProtocolError,
        _HELD0 + "(1, 2, 4), list",
    ),
    (
        "block-rows-1d",
        lambda: _M.block(np.zeros(16), _LW, _P0, 0, KVCache()),
        ShapeError,
        "x must have 2 dimensions, got shape (16,)",
    ),
    (
        "block-rows-dtype",
        lambda: _M.block(np.array([["a"] * 16]), _LW, _P0, 0, KVCache()),
        DTypeError,
        "x must be a floating-point array, got dtype <U1",
    ),
    (
        "decode-cache",
        lambda: _M.decode(1, (_kv(1, 2, 4), _kv(1, 2, 4))),  # type: ignore[arg-type]
        ProtocolError,
        "decode needs the KVCache of a prefill, got tuple",
    ),
    ("generate-count", lambda: _M.generate([1], -1), ConfigError, "n_new must be >= 0, got -1"),
]

test_each_refusal_has_its_class_and_whole_message = refusal_test(REFUSALS)


def test_the_trace_sees_each_stage_of_each_block_in_order_and_the_final_rows() -> None:
    seen: list[tuple[str, int, tuple[int, ...]]] = []
    model = ReferenceModel(_W, trace=lambda stage, layer, x: seen.append((stage, layer, x.shape)))
    model.prefill([1, 2, 3])
    per_block = [("x", (3, 16)), ("xhat", (3, 16)), ("q", (3, 4, 4)), ("k", (3, 2, 4)), ("v", (3, 2, 4))]
    per_block += [("o", (3, 16)), ("h", (3, 16))]
    want = [(s, i, shape) for i in range(4) for s, shape in per_block] + [("final", 4, (3, 16))]
    assert seen == want


def test_the_trace_records_the_rows_each_stage_computes() -> None:
    rows: dict[tuple[str, int], Any] = {}
    model = ReferenceModel(_W, trace=lambda stage, layer, x: rows.__setitem__((stage, layer), x.copy()))
    logits, _ = model.prefill([1, 2, 3])
    lw, c = _W.layers[1], _W.config
    x = rows["x", 1]
    np.testing.assert_array_equal(rows["xhat", 1], ops.rms_norm(x, lw.attn_norm, c.rms_eps))
    np.testing.assert_array_equal(rows["h", 1], x + rows["o", 1] @ lw.wo)
    h = rows["h", 1]
    np.testing.assert_array_equal(
        rows["x", 2], h + ops.mlp(ops.rms_norm(h, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
    )
    final = ops.rms_norm(rows["final", 4], _W.final_norm, c.rms_eps) @ _W.lm_head
    np.testing.assert_array_equal(logits, final)


def test_a_forward_through_a_block_returns_its_rows_and_continues_only_its_own_cache() -> None:
    seen: dict[tuple[str, int], Any] = {}
    model = ReferenceModel(_W, trace=lambda stage, layer, x: seen.__setitem__((stage, layer), x.copy()))
    model.prefill([1, 2, 3])
    rows, cache = ReferenceModel(_W).forward(np.array([1, 2, 3]), upto=1)
    np.testing.assert_array_equal(rows, seen["x", 2])
    assert len(cache.keys) == len(cache.values) == 2 and cache.length == 3
    more, cache = ReferenceModel(_W).forward(np.array([4]), cache, upto=1)
    assert more.shape == (1, 16) and cache.length == 4
    first, zero = ReferenceModel(_W).forward(np.array([1]), upto=0)
    np.testing.assert_allclose(first, seen["x", 1][:1], rtol=1e-13)  # one row against three: BLAS rounding
    assert len(zero.keys) == 1


def test_a_failing_trace_leaves_the_cache_as_it_was() -> None:
    _, cache = _M.prefill([1, 2])
    keys, values = list(cache.keys), list(cache.values)
    calls = []

    def trace(stage: str, layer: int, x: Any) -> None:
        calls.append(stage)
        if stage == "o" and layer == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        ReferenceModel(_W, trace=trace).forward(np.array([3]), cache)
    assert cache.length == 2 and all(
        a is b for a, b in zip(cache.keys + cache.values, keys + values, strict=True)
    )
    assert len(cache.keys) == len(cache.values) == 4
    _, fresh = _M.forward(np.array([1]))
    with pytest.raises(RuntimeError, match="stop"):
        ReferenceModel(_W, trace=trace).forward(np.array([3]), fresh)
    assert fresh.length == 1 and len(fresh.keys) == 4


def test_decode_on_an_empty_cache_is_the_token_at_position_zero_and_generation_of_none_is_empty() -> None:
    np.testing.assert_array_equal(_M.decode(5, KVCache()), _M.prefill([5])[0][0])
    assert _M.generate([1, 2], 0) == []
    logits, cache = _M.prefill([1, 2])
    tokens = _M.generate([1, 2], 3)
    step = int(np.argmax(logits[-1]))
    assert tokens[0] == step
    assert tokens[1] == int(np.argmax(_M.decode(step, cache)))


def test_a_block_files_a_new_block_at_the_end_and_replaces_a_held_one() -> None:
    """layer = len(cache.keys) appends; a held layer is replaced by new arrays (the old ones unchanged)."""
    cache = KVCache()
    x = np.ones((2, 16))
    out = _M.block(x, _LW, np.array([0, 1]), 0, cache)
    assert out.shape == (2, 16) and cache.length == 2 and len(cache.keys) == 1
    old_k, old_v = cache.keys[0], cache.values[0]
    _M.block(x[:1], _LW, np.array([2]), 0, cache)
    assert cache.keys[0].shape == cache.values[0].shape == (3, 2, 4) and len(cache.keys) == 1
    assert old_k.shape == (2, 2, 4) and old_v.shape == (2, 2, 4)
    np.testing.assert_array_equal(cache.keys[0][:2], old_k)
    np.testing.assert_array_equal(cache.values[0][:2], old_v)


def test_a_non_finite_row_passes_through_a_block() -> None:
    """As in :meth:`ReferenceModel.forward`: NaN and ±inf are computed on, not refused."""
    x = np.ones((1, 16))
    x[0, 3] = np.nan
    cache = KVCache()
    assert np.isnan(_M.block(x, _LW, _P0, 0, cache)).all() and cache.length == 1

"""Tests that kill mutants of :mod:`scx_ref.forward` (the plaintext block loop over a backend) that survived
``python -m mutation.run forward`` (mutation/REPORT_reference_forward.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.errors import ConfigError, ProtocolError, VocabularyError
from scx_ref.forward import PlainRunner, block, block_rows
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.refusals import Refusal, refusal_test, refused
from tests.tiny import tiny_weights


def test_the_runner_counts_its_positions_and_a_reset_starts_a_new_sequence() -> None:
    w = tiny_weights(0)
    runner = PlainRunner(NumpyBackend(w))
    assert runner.length == 0
    runner.prefill([1, 2, 3])
    runner.decode(4)
    assert runner.length == 4
    runner.reset()
    assert runner.length == 0
    np.testing.assert_allclose(runner.decode(5)[0], ReferenceModel(w).prefill([5])[0][0], rtol=1e-12)


_W = tiny_weights(0)  # 4 blocks, d = 16, 2 KV heads of 4, max_positions 32
_B = NumpyBackend(_W)
_BLOCK_ROWS: Any = block_rows  # one backend here: no array type to infer from the arguments
_X2 = np.zeros((2, 16))
_KV = (np.zeros((1, 2, 4)), np.zeros((1, 2, 4)))

REFUSALS: list[Refusal] = [
    (
        "block-cache",
        lambda: block(_B, _X2[:1], 0, np.array([0]), 3),  # type: ignore[arg-type]
        ProtocolError,
        "block: cache must be None or a (keys, values) pair, got int",
    ),
    (
        "block-cache-of-three",
        lambda: block(_B, _X2[:1], 0, np.array([0]), (_KV[0], _KV[1], _KV[1])),  # type: ignore[arg-type]
        ProtocolError,
        "block: cache must be None or a (keys, values) pair, got tuple",
    ),
    (
        "rows-caches",
        lambda: _BLOCK_ROWS(_B, _X2, 0, np.array([1, 1]), "ab"),
        ProtocolError,
        "block_rows: caches must be a list of (keys, values) pairs, got 'ab'",
    ),
    (
        "rows-cache-pair",
        lambda: _BLOCK_ROWS(_B, _X2, 0, np.array([1, 1]), [_KV, (1,)]),
        ProtocolError,
        f"block_rows: caches must be a list of (keys, values) pairs, got {[_KV, (1,)]!r:.60}",
    ),
    (
        "rows-cache-count",
        lambda: _BLOCK_ROWS(_B, _X2, 0, np.array([1, 1]), [_KV]),
        ProtocolError,
        "block_rows: 2 rows (at least one), positions int64 of shape (2,) (one integer per row), 1 caches",
    ),
    (
        "rows-none",
        lambda: _BLOCK_ROWS(_B, _X2[:0], 0, np.array([], dtype=np.int64), []),
        ProtocolError,
        "block_rows: 0 rows (at least one), positions int64 of shape (0,) (one integer per row), 0 caches",
    ),
    (
        "rows-float-positions",
        lambda: _BLOCK_ROWS(_B, _X2, 0, np.array([1.0, 1.0]), [_KV, _KV]),
        ProtocolError,
        "block_rows: 2 rows (at least one), positions float64 of shape (2,) (one integer per row), 2 caches",
    ),
    (
        "rows-position-count",
        lambda: _BLOCK_ROWS(_B, _X2, 0, np.array([1]), [_KV, _KV]),
        ProtocolError,
        "block_rows: 2 rows (at least one), positions int64 of shape (1,) (one integer per row), 2 caches",
    ),
    (
        "rows-tile",
        lambda: _BLOCK_ROWS(_B, _X2, 0, np.array([1, 1]), [_KV, _KV], 0),
        ProtocolError,
        "tile must be >= 1, got 0",
    ),
    ("runner-backend", lambda: PlainRunner(3), ConfigError, "PlainRunner needs a Backend, got int"),  # type: ignore[arg-type]
    (
        "runner-trace",
        lambda: PlainRunner(_B, trace=3),  # type: ignore[arg-type]
        ConfigError,
        "trace must be a callable or None, got int",
    ),
    (
        "runner-last-only",
        lambda: PlainRunner(_B).forward([1], last_only=1),  # type: ignore[arg-type]
        ConfigError,
        "last_only must be True or False, got int 1",
    ),
    (
        "runner-too-long",
        lambda: PlainRunner(_B).forward([*range(32), 0]),
        ProtocolError,
        "sequence length 33 exceeds max_positions 32",
    ),
    ("runner-generate", lambda: PlainRunner(_B).generate([1], -1), ConfigError, "n_new must be >= 0, got -1"),
]

test_each_refusal_has_its_class_and_whole_message = refusal_test(REFUSALS)


def test_the_trace_sees_each_stage_s_rows_of_each_block_and_the_head_s() -> None:
    seen: list[tuple[Stage, int, Any]] = []
    runner = PlainRunner(_B, trace=lambda stage, layer, x: seen.append((stage, layer, np.array(x))))
    logits = runner.prefill([1, 2, 3])
    want_stages = [(s, i) for i in range(4) for s in (Stage.QKV, Stage.LOCK, Stage.O, Stage.FFN)]
    assert [(s, i) for s, i, _ in seen] == [*want_stages, (Stage.HEAD, 4)]
    assert [x.shape for _, _, x in seen[:4]] == [(3, 16), (3, 8), (3, 16), (3, 16)]
    ref: dict[tuple[str, int], Any] = {}
    ReferenceModel(_W, trace=lambda stage, layer, x: ref.__setitem__((stage, layer), x)).prefill([1, 2, 3])
    by_stage = {(s, i): x for s, i, x in seen}
    for i in range(4):
        np.testing.assert_allclose(by_stage[Stage.QKV, i], ref["x", i], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(by_stage[Stage.LOCK, i], ref["k", i].reshape(3, 8), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(by_stage[Stage.O, i], ref["o", i], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(by_stage[Stage.FFN, i], ref["h", i], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(by_stage[Stage.HEAD, 4], ref["final", 4], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(logits, ReferenceModel(_W).prefill([1, 2, 3])[0], rtol=1e-12, atol=1e-13)


def test_a_decoded_row_sees_the_whole_cache_and_last_only_is_the_last_row() -> None:
    runner = PlainRunner(_B)
    full = runner.prefill([1, 2, 3])
    last = PlainRunner(_B).prefill([1, 2, 3], last_only=True)
    assert last.shape == (1, 32)
    np.testing.assert_allclose(last, full[-1:], rtol=1e-13, atol=1e-14)
    step = runner.decode(4)
    _, cache = ReferenceModel(_W).prefill([1, 2, 3])
    np.testing.assert_allclose(step[0], ReferenceModel(_W).decode(4, cache), rtol=1e-12, atol=1e-13)
    assert runner.length == 4 and all(k.shape == (4, 2, 4) for kv in runner.cache for k in kv)


def test_a_failing_prefill_keeps_the_previous_sequence_and_a_failing_forward_its_cache() -> None:
    calls = {"n": 0}

    def trace(stage: Stage, layer: int, x: Any) -> None:
        if calls["n"] and stage is Stage.O and layer == 2:
            raise RuntimeError("stop")

    runner = PlainRunner(_B, trace=trace)
    runner.prefill([1, 2])
    before = list(runner.cache)
    calls["n"] = 1
    calls_to_fail: list[Any] = [lambda: runner.prefill([3, 4, 5]), lambda: runner.decode(3)]
    for call in calls_to_fail:
        with pytest.raises(RuntimeError, match="stop"):
            call()
        assert runner.length == 2 and all(a is b for a, b in zip(runner.cache, before, strict=True))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_rows_of_separate_sequences_give_the_same_bits_in_any_tiling(moe: bool) -> None:
    """Three sequences of lengths 1, 2 and 3, each row its own next token: with tiles of 1, 2 (the last tile
    padded) and 4 (all padded) each row gives the same bits as on its own in a tile of that size, and with
    tiles of 1 the bits of ``block`` on that row."""
    w = tiny_weights(1, moe=moe)
    b = NumpyBackend(w)
    rng = np.random.default_rng(0)
    caches = []
    for n in (1, 2, 3):
        _, kv = block(b, rng.standard_normal((n, 16)), 0, np.arange(n), None)
        caches.append(kv)
    x = rng.standard_normal((3, 16))
    pos = np.array([1, 2, 3])
    alone = [block(b, x[j : j + 1], 0, pos[j : j + 1], caches[j]) for j in range(3)]
    for tile in (1, 2, 4):
        out, new = block_rows(b, x, 0, pos, caches, tile)
        assert out.shape == (3, 16) and len(new) == 3
        for j in range(3):
            own, own_cache = block_rows(b, x[j : j + 1], 0, pos[j : j + 1], [caches[j]], tile)
            np.testing.assert_array_equal(out[j], own[0])
            if tile == 1:
                np.testing.assert_array_equal(out[j], alone[j][0][0])
            for got, want, plain in zip(new[j], own_cache[0], alone[j][1], strict=True):
                np.testing.assert_array_equal(got, want)
                assert got.shape == plain.shape == (pos[j] + 1, 2, 4)


class _Recorded(NumpyBackend):
    """The numpy backend, recording the rows of each MLP, projection and attention call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []

    def mlp(self, x: Any, layer: int) -> Any:
        self.calls.append(("mlp", x.shape[0]))
        return super().mlp(x, layer)

    def project(self, x: Any, which: Any, layer: int = -1, experts: Any = None) -> Any:
        self.calls.append((which, x.shape[0]))
        return super().project(x, which, layer, experts)

    def attention(self, q: Any, k: Any, v: Any, q_positions: Any, k_positions: Any) -> Any:
        self.calls.append(("attention", q.shape[0]))
        return super().attention(q, k, v, q_positions, k_positions)


def _three_sequences(b: NumpyBackend) -> tuple[Any, Any, list[Any]]:
    rng = np.random.default_rng(0)
    caches = [block(b, rng.standard_normal((n, 16)), 0, np.arange(n), None)[1] for n in (1, 2, 3)]
    return rng.standard_normal((3, 16)), np.array([1, 2, 3]), caches


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_each_stage_runs_on_whole_tiles_and_attention_and_an_moe_mlp_on_one_row(moe: bool) -> None:
    """Three rows in tiles of 2: the projections (and a dense MLP) see two tiles of 2 rows (the second
    padded), attention one row at a time; an MoE MLP runs per row, on the real rows only."""
    b = _Recorded(tiny_weights(1, moe=moe))
    x, pos, caches = _three_sequences(b)
    b.calls.clear()
    block_rows(b, x, 0, pos, caches, 2)
    tile = [("wqkv", 2), ("attention", 1), ("attention", 1), ("wo", 2)]
    tile += [("mlp", 1), ("mlp", 1)] if moe else [("mlp", 2)]
    last = [("wqkv", 2), ("attention", 1), ("wo", 2), ("mlp", 1) if moe else ("mlp", 2)]
    assert b.calls == tile + last


def test_rows_default_to_tiles_of_one_row_each_the_bits_of_a_block() -> None:
    b = NumpyBackend(tiny_weights(1))
    x, pos, caches = _three_sequences(b)
    out, new = block_rows(b, x, 0, pos, caches)
    for j in range(3):
        row, (k, v) = block(b, x[j : j + 1], 0, pos[j : j + 1], caches[j])
        np.testing.assert_array_equal(out[j], row[0])
        np.testing.assert_array_equal(new[j][0], k)
        np.testing.assert_array_equal(new[j][1], v)


def test_ragged_positions_are_refused_by_name() -> None:
    with pytest.raises(ProtocolError, match=r"^block_rows: positions must be one integer per row: \S"):
        _BLOCK_ROWS(_B, _X2, 0, [[0], [1, 2]], [_KV, _KV])


def test_a_token_outside_the_vocabulary_is_refused_before_the_cache_changes_and_none_is_generated() -> None:
    runner = PlainRunner(_B)
    runner.prefill([1])
    with refused(VocabularyError, "token ids must lie in [0, 32), got range [32, 32]"):
        runner.forward([32])
    assert runner.length == 1
    assert runner.generate([1, 2], 0) == [] and runner.length == 2

"""Leftovers of the previous audit round in the client's key layer and the two backends; each test failed on
the code before its fix:

* ``PreparedKeys.blinding`` popped the (η, η·W) held ahead before its arguments were refused: a refused call
  dropped them (re-derived identically later, but the rule is nothing half-updated after an error);
* ``MaskPool`` added a fill's seconds before the entry was counted, outside its lock: a reader mid-fill saw
  seconds spent on an entry that ``filled`` did not count yet (and two fills could lose an update);
* ``unigram_counts`` named ``mass`` in its overflow message, unbound with ``smoothing=None``: the refusal
  was an UnboundLocalError, not a project error (its test is now in ``tests/test_decoys_mutants.py``, the
  decoys module's mutation target);
* the torch backend's RoPE tables grew to any position asked for (a position of 10⁹ asked for a billion
  rows) where the config holds the angles finite only below ``max_positions``; numpy RoPE'd any position;
* float64 rows on a float32 backend: the torch ``norm`` answered float64 while its ``project``/``mlp``
  compute in the backend's dtype, and numpy's ``norm``/``project``/``mlp`` all answered float64;
* ``scale_rows`` of 1-D rows gave the n × n outer product, ``argmax_last`` of 1-D logits the index 0, on
  both backends;
* ``ModelWeights.astype(None)`` made a float64 copy (numpy reads None as float64).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ConfigError, DTypeError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, SCXConfig
from scx_ref.protocol.pool import MaskPool
from scx_ref.protocol.prepare import _WEIGHT
from tests.tiny import tiny_weights

CFG = SCXConfig(level="blind", r1=3, r2=2, r_lock=2, l_s=1, l_e=1)


def _backends(dtype: str) -> tuple[NumpyBackend, TorchBackend]:
    w = tiny_weights(0)
    return NumpyBackend(w, np.dtype(dtype)), TorchBackend(w, getattr(torch, dtype))


# -- 1. PreparedKeys.blinding -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["negative_rows", "bad_layer_other_width"])
def test_a_refused_blinding_call_keeps_the_pair_held_ahead(case: str) -> None:
    """A refused ``blinding`` call leaves the (η, η·W) derived ahead held; the next valid call returns that
    very pair. Rows −1 were refused (ShapeError) by the narrowing of the held pair, a layer outside the
    model (ConfigError) by the correction of a pair derived for another width — both after the pop."""
    client: Client[Any] = Client(NumpyBackend(tiny_weights(3)), KeySchedule.generate(), CFG)
    prep = client._new_prepared(KeySchedule.new_nonce(), 5).fill()
    release = next(r for r in prep.plan.prefill if r.stage in _WEIGHT and r.kind != "offset")
    key = (release.stage, release.block, release.expert, None)
    held = prep._blinding[key]
    rows, width = held[0].shape
    which = _WEIGHT[release.stage]
    if case == "negative_rows":
        with pytest.raises(ShapeError):
            prep.blinding(release, None, -1, width, which, release.block, None)
    else:
        with pytest.raises(ConfigError):
            prep.blinding(release, None, rows, width + 1, which, 99, None)
    assert prep._blinding.get(key) is held
    assert prep.blinding(release, None, rows, width, which, release.block, None) is held
    assert key not in prep._blinding  # one-time: dropped once read


# -- 2. MaskPool metrics ----------------------------------------------------------------------------------
class _Entry:
    """A pool entry that holds its fill at the metrics (``mask_bytes_of``) until the test lets it go."""

    def __init__(self, nonce: bytes, reached: threading.Event, go: threading.Event) -> None:
        self.nonce = nonce
        self.keys = SimpleNamespace(schedule=SimpleNamespace())  # no claims: never used
        self.mask_bytes = 300
        self._reached, self._go = reached, go

    def fill(self, steps: int = 0, perms: bool = True) -> _Entry:
        time.sleep(0.002)  # a fill takes time: seconds > 0 once it is counted
        return self

    def mask_bytes_of(self, step: bool | None = None) -> int:
        self._reached.set()
        assert self._go.wait(10)
        return 200


class _Owner:
    """The PoolOwner protocol: a maximum length, the pool slot, one request's keys."""

    max_length = 8
    pool: Any = None

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def _new_prepared(self, nonce: bytes, n: int) -> _Entry:
        return _Entry(nonce, self.reached, self.go)


def test_pool_metrics_move_with_the_entries_they_count() -> None:
    """Read while a background fill is between an entry's derivation and its counting, the pool's
    metrics describe the entries counted: no seconds without the entry they were spent on (the seconds
    were added first, outside the lock, so ``tokens_per_second`` read 0 after time was spent, and
    ``filled`` × capacity / ``seconds`` mixed two fills' states)."""
    owner = _Owner()
    pool: MaskPool[Any] = MaskPool(owner, capacity=4, steps=2)  # type: ignore[arg-type]
    pool.fill(1, background=True)
    assert owner.reached.wait(10)
    snapshot = (pool.filled, pool.seconds, pool.tokens_per_second)
    owner.go.set()
    pool.wait()
    assert snapshot == (0, 0.0, 0.0)
    assert pool.filled == 1 and pool.seconds > 0
    assert pool.tokens_per_second == 4 / pool.seconds
    assert (pool.bytes_per_prompt_token, pool.bytes_per_step) == (200 / 4, (300 - 200) / 2)


# -- 4. RoPE positions ------------------------------------------------------------------------------------
def test_rope_positions_past_max_positions_are_refused_alike_and_the_tables_stay_bounded() -> None:
    """Position ``max_positions`` − 1 is RoPE'd alike on both backends, ``max_positions`` refused on both
    (ShapeError; numpy computed it, torch grew its tables to 256 rows of a 32-position model), in ``rope``
    and ``rope_take``; the torch tables never hold more than ``max_positions`` rows."""
    nb, tb = _backends("float64")
    c = nb.config
    last = c.max_positions - 1
    q = np.random.default_rng(1).standard_normal((2, c.n_heads, c.head_dim))
    pos = np.array([0, last])
    np.testing.assert_allclose(tb.rope(torch.from_numpy(q), pos).numpy(), nb.rope(q, pos), rtol=1e-13, atol=0)
    assert tb._rope[0].shape[0] <= c.max_positions
    x = np.random.default_rng(2).standard_normal((2, c.q_dim + 2 * c.kv_dim))
    roped, plain = np.arange(c.q_dim + c.kv_dim), np.arange(c.kv_dim)
    for past in (c.max_positions, 10**12):
        with pytest.raises(ShapeError, match="max_positions"):
            nb.rope(q, np.array([0, past]))
        with pytest.raises(ShapeError, match="max_positions"):
            tb.rope(torch.from_numpy(q), np.array([0, past]))
        with pytest.raises(ShapeError, match="max_positions"):
            nb.rope_take(x, np.arange(2), np.array([0, past]), roped, plain)
        with pytest.raises(ShapeError, match="max_positions"):
            tb.rope_take(torch.from_numpy(x), np.arange(2), np.array([0, past]), roped, plain)
    assert tb._rope[0].shape[0] <= c.max_positions


# -- 5. dtypes of norm, project, mlp ----------------------------------------------------------------------
@pytest.mark.parametrize("op", ["norm", "project", "mlp"])
def test_rows_of_another_dtype_are_computed_in_the_backends_dtype_on_both(op: str) -> None:
    """float64 rows on a float32 backend: on both backends the result is float32, the op of the rows
    rounded to float32, bit for bit (torch's norm answered float64, and numpy's norm, project and mlp)."""
    nb, tb = _backends("float32")
    x = np.random.default_rng(3).standard_normal((4, nb.config.hidden_size))
    x32 = x.astype(np.float32)

    def run(b: Any, rows: Any) -> Any:
        if op == "norm":
            return b.norm(rows, "attn", 0)
        return b.project(rows, "wqkv", 0) if op == "project" else b.mlp(rows, 0)

    got_np, got_t = run(nb, x), run(tb, torch.from_numpy(x))
    assert got_np.dtype == np.float32 and got_t.dtype == torch.float32
    assert np.array_equal(got_np, run(nb, x32))
    assert torch.equal(got_t, run(tb, torch.from_numpy(x32)))


# -- 6. scale_rows and argmax_last of 1-D arrays ----------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_scale_rows_and_argmax_last_take_2d_rows_only(backend: str) -> None:
    """1-D input is refused (ShapeError) on both backends: ``scale_rows`` gave the 6 × 6 outer product of
    the rows and the weights, ``argmax_last`` the index 0 of the last entry; 2-D rows are served."""
    nb, tb = _backends("float64")
    b: Any = nb if backend == "numpy" else tb
    conv: Any = np.asarray if backend == "numpy" else torch.from_numpy
    flat = np.array([0.5, 3.0, -1.0, 2.0, 1.0, 7.0])
    with pytest.raises(ShapeError, match="2-D"):
        b.scale_rows(conv(flat), np.ones(6))
    with pytest.raises(ShapeError, match="2-D"):
        b.argmax_last(conv(flat))
    with pytest.raises(ShapeError, match="2-D"):
        b.argmax_last(conv(flat.reshape(1, 2, 3)))
    rows = flat.reshape(3, 2)
    assert np.array_equal(
        np.asarray(b.scale_rows(conv(rows), np.array([1.0, 2.0, 3.0]))), rows * [[1], [2], [3]]
    )
    assert b.argmax_last(conv(rows)) == 1  # the last row [1, 7]


# -- 7. ModelWeights.astype(None) -------------------------------------------------------------------------
def test_astype_none_is_refused() -> None:
    """None is no dtype: DTypeError (it made a float64 copy); a float32 copy is still made as asked."""
    w = tiny_weights(0)
    with pytest.raises(DTypeError, match="got None"):
        w.astype(None)
    assert w.astype(np.float32).dtype == np.float32

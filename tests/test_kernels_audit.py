"""An audit of the fused CPU kernels (:mod:`scx_ref.backends.numba_kernels` through
:mod:`scx_ref.backends.cpu_kernels`) and the host buffer pool (:mod:`scx_ref.backends.host_memory`).

The kernels index without bounds checks, so each refuses every index outside its arrays before it writes
anything; each encoding pass gives the bits of the eager form it replaces, in the backend's own dtype,
whatever the inputs' layout (transposed, reversed), row count (one row), decoy count (none) and head
grouping (one head; GQA ratios 1, 3 and H); a check's verdict is NaN, never a pass, when any of its inputs
is not finite. ``cpu_kernels.replaced`` leaves the kernels loaded after a block run while they were off;
``attention_check`` refuses heads of width 0 as a misfit, not with an exception from inside the kernel;
the pool never lends a buffer that another thread's array still reads."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack  # type: ignore[attr-defined]

from properties.kernel_paths import fused_and_eager, same
from scx_ref.backends import cpu_kernels, host_memory
from scx_ref.backends.torch_backend import TorchBackend
from tests.tiny import tiny_weights

needs_numba = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed")


def _loaded() -> cpu_kernels.Kernels:
    k = cpu_kernels.kernels()
    assert k is not None
    return k


# -- cpu_kernels.replaced ------------------------------------------------------------------------------


@needs_numba
def test_a_block_replaced_while_the_kernels_are_off_leaves_them_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``replaced`` entered while ``ENABLED`` is false returns ``None`` throughout (as ``kernels()`` always
    does then), and once ENABLED is true again ``kernels()`` returns the loaded kernels. It put back what
    ``kernels()`` had returned, ``None``, as the loaded kernels: every later call in the process then ran
    the eager ops, a fused path's test among them."""
    loaded = _loaded()
    monkeypatch.setattr(cpu_kernels, "_loaded", [loaded])  # the module's own list restored after
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    with cpu_kernels.replaced(loaded):
        assert cpu_kernels.kernels() is None
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    assert cpu_kernels.kernels() is loaded


@needs_numba
def test_replaced_blocks_nest_and_put_back_what_was_loaded_on_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within nested blocks the innermost copy is served, each block's end puts back the one around it,
    an error inside a block too; with nothing loaded yet (and the kernels off) the block loads nothing and
    leaves nothing loaded, so the next enabled call loads them."""
    loaded = _loaded()
    monkeypatch.setattr(cpu_kernels, "_loaded", [loaded])
    outer, inner = dataclasses.replace(loaded), dataclasses.replace(loaded)
    with cpu_kernels.replaced(outer):
        assert cpu_kernels.kernels() is outer
        with pytest.raises(RuntimeError), cpu_kernels.replaced(inner):
            assert cpu_kernels.kernels() is inner
            raise RuntimeError("inside the block")
        assert cpu_kernels.kernels() is outer
    assert cpu_kernels.kernels() is loaded
    monkeypatch.setattr(cpu_kernels, "_loaded", [])
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    with cpu_kernels.replaced(outer):
        assert cpu_kernels.kernels() is None
    assert cpu_kernels._loaded == []
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    assert cpu_kernels.kernels() is not None


# -- attention_check: heads of width 0 -----------------------------------------------------------------

#: attention_check's constants after its arrays, rows, ``first`` and group: scale, u, λ, u₆₄, tiny
_CONSTANTS = (0.5, 2.0**-24, 1.0, 2.0**-53, 1e-300)


@needs_numba
@pytest.mark.parametrize("ranged", [True, False])
def test_attention_check_refuses_heads_of_width_zero(ranged: bool) -> None:
    """Queries, keys, values and outputs whose heads have no entries do not fit (the verifier's
    ``range_shapes`` refuses them too): (−1, −1), nothing read. With the range check on, the kernel
    divided the outputs' width by the head width and raised ZeroDivisionError out of the compiled call;
    without it, it answered (0, 0), a pass."""
    k = _loaded()
    q, kv = np.ones((2, 4, 0), np.float32), np.ones((3, 2, 0), np.float32)
    got = k.attention_check(q, kv, kv.copy(), q.copy(), np.arange(2), 1, 2, *_CONSTANTS, ranged, 1)
    assert (float(got[0]), float(got[1])) == (-1.0, -1.0)
    q, kv = np.ones((2, 4, 2), np.float32), np.ones((3, 2, 2), np.float32)  # heads of width 2: answered
    got = k.attention_check(q, kv, kv.copy(), q.copy(), np.arange(2), 1, 2, *_CONSTANTS, ranged, 1)
    assert (float(got[0]), float(got[1])) == (0.0, 0.0)


# -- the encoding passes: the eager form's bits --------------------------------------------------------


def _laid_out(a: np.ndarray[Any, Any], layout: str, dtype: torch.dtype) -> torch.Tensor:
    """``a`` as a tensor of ``dtype`` with the same values in a given memory layout: C-contiguous, the
    transpose of a contiguous tensor, or a column slice of a wider one (rows further apart than a row)."""
    t = torch.from_numpy(a).to(dtype)
    if layout == "transposed":
        return t.T.contiguous().T
    if layout == "sliced":
        wide = torch.zeros((t.shape[0], t.shape[1] + 3), dtype=dtype)
        wide[:, 1 : t.shape[1] + 1] = t
        return wide[:, 1 : t.shape[1] + 1]
    return t


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("heads", [(6, 6), (6, 2), (6, 1), (1, 1)])  # GQA 1, 3, H; one head
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_the_encoding_passes_are_the_eager_forms_bits(
    dtype: str, heads: tuple[int, int], n: int, layout: str
) -> None:
    """``rope_take``, ``take_rows_cols_concat`` and ``gather_sum`` (with no decoys and with two), the checked
    add, the checked row permutation and ``rows_finite``: the fused passes (in one chunk and split) give
    the eager ops' values bit for bit, in the backend's dtype (float32 stays float32), for one row or
    several, one head or several, and inputs that are not contiguous."""
    b = TorchBackend(tiny_weights(0, n_layers=1, n_heads=heads[0], n_kv_heads=heads[1]), dtype)
    c, t = b.config, b.dtype
    rng = np.random.default_rng(n * 100 + heads[1])
    width = c.q_dim + 2 * c.kv_dim
    x = _laid_out(rng.standard_normal((n + 2, width)), layout, t)
    rows, pos = rng.integers(0, n + 2, n), rng.integers(0, c.max_positions, n)
    roped, plain = rng.permutation(c.q_dim + c.kv_dim), rng.permutation(c.kv_dim)
    cols = rng.integers(0, width, 5)
    a1 = _laid_out(rng.standard_normal((n, 6)), layout, t)
    a2 = _laid_out(rng.standard_normal((n, 6)), "contiguous", t)
    perm = rng.permutation(n)

    def passes(decoys: int) -> list[Any]:
        extra = _laid_out(rng.standard_normal((decoys, 5)), layout, t)
        s = _laid_out(rng.standard_normal((n + 2, 5)), layout, t)
        y = torch.from_numpy(rng.standard_normal((3, 5))).to(t)
        from_y = (
            rng.integers(0, 3, n) if decoys == 0 else np.where(np.arange(n) % 2, -1, rng.integers(0, 3, n))
        )
        from_s = np.where(from_y < 0, rng.integers(0, max(decoys, 1), n), rng.integers(0, n + 2, n))
        idx = rng.integers(0, n + 2 + decoys, n)
        return [
            b.rope_take(x, rows, pos, roped, plain, name="x"),
            b.take_rows_cols_concat(x, cols, extra, idx, name="t"),
            b.gather_sum(s, from_s, y, from_y, extra, name="g"),
        ]

    def run() -> list[Any]:
        state = rng.bit_generator.state
        out = passes(0) + passes(2)
        rng.bit_generator.state = state  # every run draws the same decoys and indices
        return [
            *out,
            b.add(a1, a2, name="s"),
            b.take_rows_in_place(a2.clone(), perm, name="p"),
            b.rows_finite(x, rows),
        ]

    with pytest.MonkeyPatch.context() as mp:
        fused, eager = fused_and_eager(mp, run)
    assert same(fused, eager)
    tensors = [r for r in fused if isinstance(r, torch.Tensor)] + [r for p in fused[:6:3] for r in p]
    assert all(r.dtype == t for r in tensors)


# -- every index outside the arrays refused before anything is written ---------------------------------

_OUTSIDE = (-1, -(2**63), 2**63 - 1)


def _cols(values: list[int]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """Column indices as the kernels take them; a negative one as its unsigned cast gives it."""
    return np.array(values, dtype=np.int64).astype(np.uint64)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_encoding_kernels_refuse_indices_outside_their_arrays_before_writing(dtype: Any) -> None:
    """Called directly, each encoding kernel returns its refusal for a row, column or position index one
    past its array, below 0 or near ±2⁶³, and leaves its outputs (and, for the row permutation, the rows)
    as they were: the kernels index without bounds checks, so nothing may be read or written first."""
    k = _loaded()
    rng = np.random.default_rng(1)
    x, extra = rng.standard_normal((4, 8)).astype(dtype), rng.standard_normal((2, 3)).astype(dtype)
    one = np.empty((1, 8), dtype)  # a finiteness row of one chunk

    def out(*shape: int) -> np.ndarray[Any, Any]:
        return np.full(shape, 7.0, dtype)

    for bad in (*_OUTSIDE, 6):  # 4 rows of x and 2 of extra
        o, idx = out(2, 3), np.array([0, bad], dtype=np.int64)
        assert k.take_rows_cols_concat(x, _cols([0, 1, 2]), extra, idx, o, one[:, :3]) == -1
        assert (o == 7.0).all()
    for bad in (*_OUTSIDE, 8):
        o = out(2, 3)
        assert k.take_rows_cols_concat(x, _cols([0, bad, 2]), extra, np.arange(2), o, one[:, :3]) == -1
        assert (o == 7.0).all()
    s, y = x[:, :3].copy(), rng.standard_normal((2, 3)).astype(dtype)
    for fs, fy in ((-1, 0), (4, 0), (0, 2), (2, -1), (0, 2**63 - 1), (-(2**63), 0), (2**63 - 1, -1)):
        o, from_s, from_y = out(2, 3), np.array([0, fs], dtype=np.int64), np.array([0, fy], dtype=np.int64)
        assert k.gather_sum(s, from_s, y, from_y, extra, o, one[:, :3]) == -1
        assert (o == 7.0).all()
    # rope_take: rows of 16 columns, 8 RoPE'd (two heads of 4) and 8 plain; 5 positions in the tables
    xr = rng.standard_normal((3, 16)).astype(dtype)
    cos, sin = rng.standard_normal((5, 4)).astype(dtype), rng.standard_normal((5, 4)).astype(dtype)
    rows, pos, ri, pi = np.arange(2), np.arange(2), _cols(list(range(8))), _cols(list(range(8)))
    cases = [(np.array([0, b]), pos, ri, pi, -2) for b in (*_OUTSIDE, 3)]
    cases += [(rows, pos, _cols([*range(7), b]), pi, -2) for b in (-1, 8)]
    cases += [(rows, pos, ri, _cols([*range(7), b]), -2) for b in (-1, 8)]
    cases += [(rows, np.array([0, b]), ri, pi, -1) for b in (*_OUTSIDE, 5)]
    for r, p, rope_index, plain_index, want in cases:
        o_rope, o_plain = out(2, 8), out(2, 8)
        got = k.rope_take(
            xr,
            r.astype(np.int64),
            p.astype(np.int64),
            cos,
            sin,
            rope_index,
            plain_index,
            4,
            o_rope,
            o_plain,
            np.empty((1, 16), dtype),
        )
        assert got == want and (o_rope == 7.0).all() and (o_plain == 7.0).all()
    for bad in (*_OUTSIDE, 4):
        assert k.rows_finite(x, np.array([0, bad], dtype=np.int64)) == -1
    for perm in ([0, 0, 1, 2], [0, 1, 2, 4], [0, 1, 2], [-1, 0, 1, 2], [1, 2, 3, 2**63 - 1]):
        rows_before = x.copy()
        got = k.permute_rows(x, np.array(perm, dtype=np.int64), 1, np.empty(8, dtype))
        assert got == -1 and np.array_equal(x, rows_before)


# -- a verdict that is not finite: NaN, never a pass ---------------------------------------------------

_NOT_FINITE = (np.nan, np.inf, -np.inf)


@needs_numba
@pytest.mark.parametrize("bad", _NOT_FINITE)
def test_linear_and_attention_verdicts_are_nan_for_any_entry_not_finite(bad: float) -> None:
    """``linear_excess`` and ``attention_excess`` compare their ratios with ``>`` (false for NaN) to keep the
    largest, so they must find a NaN or an infinity on their own: one in any of their inputs — residuals,
    norms, terms, key and value norms — makes the verdict NaN (refused), where the honest inputs pass."""
    k = _loaded()
    n, kk = 3, 2
    linear = [
        np.ones((n, kk)),
        np.ones((n, kk)),
        np.zeros(kk),
        np.ones(n),
        np.ones(n),
        np.full(kk, 1e-3),
        np.full(kk, 1e-3),
    ]
    assert k.linear_excess(*linear, 1e-300) == 0.0
    for which in range(len(linear)):
        args = [a.copy() for a in linear]
        args[which].flat[-1] = bad
        assert np.isnan(k.linear_excess(*args, 1e-300)), which
    n_r, n_h, group, d_h = 2, 6, 3, 4
    rows = [
        np.zeros((n_r, n_h)),
        np.ones((n_r, n_h)),
        np.ones((n_r, n_h)),
        np.ones((n_r, 2)),
        np.ones((n_r, 2)),
    ]
    tail = (np.arange(n_r, dtype=np.int64), group, 0.5, d_h, 2.0**-24, 1.0, 2.0**-53, 1e-300)
    assert k.attention_excess(*rows, *tail) == 0.0
    for which in range(len(rows)):
        args = [a.copy() for a in rows]
        args[which][-1, -1] = bad
        assert np.isnan(k.attention_excess(*args, *tail)), which


@needs_numba
@pytest.mark.parametrize("bad", _NOT_FINITE)
@pytest.mark.parametrize("where", ["q", "k", "v", "o"])
def test_the_fused_attention_check_is_nan_for_an_entry_not_finite(bad: float, where: str) -> None:
    """``attention_check`` with a NaN or an infinity in a recomputed row's query, in a key or value it
    attends to, or in an output: a verdict that is NaN (the range check's for a value or an output, the
    recomputed rows' for all four), never a pass; the same arrays without it pass both checks."""
    k = _loaded()
    rng = np.random.default_rng(2)
    n_k, h_kv, group, d_h = 4, 2, 3, 4
    arrays = {
        "q": rng.standard_normal((n_k, h_kv * group, d_h)),
        "k": rng.standard_normal((n_k, h_kv, d_h)),
        "v": rng.standard_normal((n_k, h_kv, d_h)),
    }
    # the honest outputs: causal softmax(scale·q·kᵀ)·v of each query head over its KV head, in float64
    q4 = arrays["q"].reshape(n_k, h_kv, group, d_h)
    scores = np.einsum("ihed,jhd->heij", q4, arrays["k"]) * _CONSTANTS[0]
    scores[..., np.triu(np.ones((n_k, n_k), dtype=bool), 1)] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    arrays["o"] = np.einsum("heij,jhd->ihed", weights, arrays["v"]).reshape(n_k, h_kv * group, d_h)
    rows = np.arange(n_k, dtype=np.int64)

    def check(a: dict[str, np.ndarray[Any, Any]]) -> tuple[float, float]:
        got = k.attention_check(a["q"], a["k"], a["v"], a["o"], rows, 0, group, *_CONSTANTS, True, 1)
        return float(got[0]), float(got[1])

    honest = check(arrays)
    assert 0.0 <= honest[0] < 1.0 and 0.0 <= honest[1] < 1.0  # both checks pass the honest rows
    arrays[where][1, 1, 2] = bad
    by_range, by_rows = check(arrays)
    assert np.isnan(by_rows)
    if where in ("v", "o"):
        assert np.isnan(by_range)


@needs_numba
@pytest.mark.parametrize("bad", _NOT_FINITE)
@pytest.mark.parametrize("normed", [False, True])
def test_freivalds_excess_is_nan_for_a_row_entry_not_finite(bad: float, normed: bool) -> None:
    """A whole linear check in one call (the backend's ``freivalds_excess``, fused) with a NaN or an infinity
    in a row of either side: NaN. On the normalized side an infinity makes the row's sum of squares reach the
    dtype's range, where the kernel hands the check to the backend's own norm (``NEAR_RANGE``), and a NaN is
    taken for not near: both end in NaN."""
    b = TorchBackend(tiny_weights(0, n_layers=1), "float32")
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((5, b.config.hidden_size)).astype(np.float32))
    r = rng.standard_normal((b.config.hidden_size, 2))
    terms = (np.zeros(2), np.full(2, 1e-3), np.full(2, 1e-3), 1e-300)
    norm: Any = "attn" if normed else None
    honest = b.freivalds_excess(x, r, x, r, terms, norm, 0)
    assert honest is not None and np.isfinite(honest)
    for side in ("y", "x"):
        y, xs = x.clone(), x.clone()
        (y if side == "y" else xs)[2, 3] = bad
        got = b.freivalds_excess(y, r, xs, r, terms, norm, 0)
        assert got is not None and np.isnan(got), side


# -- attention_check on a strided query view ------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads", [(2, 1), (2, 3), (1, 6), (1, 1)])  # (H_kv, group): GQA 1, 3, H; one head
def test_attention_check_reads_a_reversed_query_view_as_its_copy(dtype: Any, heads: tuple[int, int]) -> None:
    """``attention_check`` reads only the recomputed rows of ``q``, which may be a strided view: a view with
    negative strides (rows and heads reversed) gives the verdicts of its C-contiguous copy bit for bit,
    for one query row or several, in float32 and float64."""
    k = _loaded()
    h_kv, group = heads
    rng = np.random.default_rng(h_kv * 10 + group)
    for n_q in (1, 3):
        n_k, d_h = n_q + 2, 4
        q = rng.standard_normal((n_q, h_kv * group, d_h)).astype(dtype)[::-1, ::-1]
        kv = [rng.standard_normal((n_k, h_kv, d_h)).astype(dtype) for _ in range(2)]
        o = rng.standard_normal((n_q, h_kv * group, d_h)).astype(dtype)
        rows = np.arange(n_q, dtype=np.int64)[::-1].copy()
        tail = (rows, 2, group, *_CONSTANTS, True, 1)
        strided = k.attention_check(q, kv[0], kv[1], o, *tail)
        copied = k.attention_check(np.ascontiguousarray(q), kv[0], kv[1], o, *tail)
        assert same(tuple(map(float, strided)), tuple(map(float, copied)))
        assert all(np.isfinite(strided))


# -- the host buffer pool -----------------------------------------------------------------------------

KIB = 1 << 10


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty pool lending from 64 KiB on, of at most 1 MiB (the module's own state restored after)."""
    monkeypatch.setattr(host_memory, "_maps", [])
    monkeypatch.setattr(host_memory, "_marked", set())
    monkeypatch.setattr(host_memory, "_reused", [0])
    monkeypatch.setattr(host_memory, "LARGE_BYTES", 64 * KIB)
    monkeypatch.setattr(host_memory, "POOL_BYTES", 1024 * KIB)


def test_threads_never_get_a_buffer_another_threads_array_still_holds(pool: None) -> None:
    """Three threads take and drop pooled buffers at random, each filling its own with its own number: every
    live buffer reads back its number at every step (none lent twice), and the pool stays in its bound."""
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        live: list[tuple[torch.Tensor, float]] = []
        for step in range(150):
            if live and rng.random() < 0.5:
                live.pop(int(rng.integers(len(live))))
            else:
                t = host_memory.empty((int(rng.integers(16, 70)), 1024), torch.float32)
                live.append((t, float(seed * 1000 + step)))
                t.fill_(live[-1][1])
            for t, value in live:
                if not float(t.min()) == float(t.max()) == value:
                    failures.append(f"thread {seed} step {step}")
            if host_memory.held_bytes() > host_memory.POOL_BYTES:
                failures.append(f"pool over its bound at thread {seed} step {step}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]


def test_a_buffer_whose_storage_or_dlpack_capsule_lives_is_not_lent_again(pool: None) -> None:
    """The tensor gone, its untyped storage or a DLPack capsule of it still reads the buffer: the next
    buffer of that size is other memory, and what they read is unchanged."""
    a = host_memory.empty((32, 1024), torch.float32)
    a.fill_(1.0)
    storage = a.untyped_storage()
    b = host_memory.empty((32, 1024), torch.float32)
    b.fill_(3.0)
    capsule = to_dlpack(b)
    del a, b
    c = host_memory.empty((32, 1024), torch.float32)
    c.fill_(2.0)
    assert float(torch.tensor([], dtype=torch.float32).set_(storage).max()) == 1.0
    assert float(from_dlpack(capsule).min()) == 3.0

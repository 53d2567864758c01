"""T3's head layout pinned (DESIGN §4, :class:`~scx_ref.transforms.HeadPermutation`): which input head and
coordinate every output slot of :func:`~scx_ref.transforms.head_permute` holds, not only that it is some
permutation.

The definition (``HeadPermutation.flat_index``): with G = ``group_size`` query heads per KV group, output
slot j·G + t holds input head ``order[j]``·G + t — the KV group ``order[j]`` moved to slot j with its G
query heads in their own order — and its coordinate c is that head's coordinate ``σ_order[j][c]`` (the
σ of the *original* group). :func:`~scx_ref.transforms.head_unpermute` is the inverse gather, itself the
head permutation with order⁻¹ and the inverse σ's; :func:`~scx_ref.transforms.head_permute_stacked` is
that map on each stacked block; every ``ops`` gives the same values. The identity the protocol relies on:
query slot s of Q·P meets KV slot s // G of K·P, which holds the KV head of the query head in slot s, so
every head's QKᵀ and attention output only move (to rounding of the reordered dot products).

The explicit maps below are written with loops, independently of the library's flat index. Each property
runs on float32 and float64 (the torch one on every torch dtype), n = 0 and 1 rows, a single head, d_h = 1
and GQA ratios 1–5 and 8. The mutation tests at the end break the layout in memory (``monkeypatch``) in
plausible ways — π for π⁻¹, σ of the slot instead of the group, σ⁻¹ for σ, query heads reversed inside
their group, groups interleaved, stacked blocks at the wrong offsets, a scatter for the torch gather —
and require the property that claims each to fail (and to pass on the library as it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import (
    FloatArray,
    attention_shapes,
    dtypes,
    gaussian_arrays,
    head_permutations,
    row_counts,
    torch_dtypes,
)
from properties.test_properties_have_teeth import _fails
from scx_ref import ops
from scx_ref.backends.torch_backend import TorchOps
from scx_ref.transforms import (
    HeadPermutation,
    head_permute,
    head_permute_stacked,
    head_unpermute,
    inverse_permutation,
)

#: GQA ratios 1–5 and 8 (3 is SmolLM2's; the layout must not assume a power of two), up to four KV groups,
#: head_dim 1 (no coordinate to permute) to 8.
SHAPES = attention_shapes(max_kv_heads=4, gqa_ratios=(1, 2, 3, 4, 5, 8), head_dims=(1, 2, 3, 4, 8))
ROWS = row_counts(0, 5)


def _permuted(x: np.ndarray, perm: HeadPermutation, g: int) -> np.ndarray:
    """The documented map, slot by slot: out[:, j·G + t, c] = x[:, order[j]·G + t, σ_order[j][c]]."""
    out = np.empty_like(x)
    for j, src in enumerate(perm.group_order.tolist()):
        for t in range(g):
            out[:, j * g + t, :] = x[:, src * g + t, :][:, perm.sigmas[src]]
    return out


def _unpermuted(y: np.ndarray, perm: HeadPermutation, g: int) -> np.ndarray:
    """The documented inverse: out[:, order[j]·G + t, σ_order[j][c]] = y[:, j·G + t, c]."""
    out = np.empty_like(y)
    for j, src in enumerate(perm.group_order.tolist()):
        for t in range(g):
            for c, coord in enumerate(perm.sigmas[src].tolist()):
                out[:, src * g + t, coord] = y[:, j * g + t, c]
    return out


def _inverse(perm: HeadPermutation) -> HeadPermutation:
    """P⁻¹ as a head permutation: its slot g takes slot j = order⁻¹[g] (where P moved group g) and undoes
    that group's σ, so its σ at index j (the group its order names for slot g) is σ_order[j]⁻¹."""
    order = inverse_permutation(perm.group_order)
    sigmas = [inverse_permutation(perm.sigmas[src]) for src in perm.group_order.tolist()]
    return HeadPermutation(order, np.array(sigmas, dtype=np.int64).reshape(perm.sigmas.shape))


def _case(data: st.DataObject, shape: tuple[int, int, int], n: int, dtype: Any) -> tuple[Any, ...]:
    h_kv, g, d_h = shape
    perm = data.draw(head_permutations(h_kv, d_h))
    x = data.draw(gaussian_arrays((n, h_kv * g, d_h), dtype))
    return perm, x, h_kv, g, d_h


@given(data=st.data(), shape=SHAPES, n=ROWS, dtype=dtypes())
def test_head_permute_moves_each_kv_group_with_its_query_heads_and_its_own_sigma(
    data: st.DataObject, shape: tuple[int, int, int], n: int, dtype: np.dtype[Any]
) -> None:
    """head_permute(X, P, G) is the documented map bit for bit, in X's dtype, for queries (G) and keys
    (1); ``P.apply`` is the same, and so is the flat gather ``X.reshape(n, −1)[:, flat_index(G)]``."""
    perm, x, h_kv, g, d_h = _case(data, shape, n, dtype)
    for group, arr in ((g, x), (1, x[:, :h_kv])):
        got: FloatArray = head_permute(arr, perm, group)
        assert got.dtype == dtype and got.shape == arr.shape
        assert np.array_equal(got, _permuted(arr, perm, group))
        assert np.array_equal(perm.apply(arr, group), got)
        flat = arr.reshape(n, arr.shape[1] * d_h)[:, perm.flat_index(group)]
        assert np.array_equal(flat.reshape(arr.shape), got)


@given(data=st.data(), shape=SHAPES, n=ROWS, dtype=dtypes())
def test_head_unpermute_is_the_inverse_map_and_a_head_permutation_itself(
    data: st.DataObject, shape: tuple[int, int, int], n: int, dtype: np.dtype[Any]
) -> None:
    """head_unpermute(Y, P, G) is the documented inverse map; it undoes head_permute both ways, bit for bit;
    it is head_permute under P⁻¹ = (order⁻¹, σ_order[j]⁻¹ in slot j) — the inverse is head-structured too;
    and ``flat_index(G, inverse=True)`` is the inverse permutation of ``flat_index(G)``."""
    perm, y, _, g, _ = _case(data, shape, n, dtype)
    back: FloatArray = head_unpermute(y, perm, g)
    assert back.dtype == dtype
    assert np.array_equal(back, _unpermuted(y, perm, g))
    assert np.array_equal(head_unpermute(head_permute(y, perm, g), perm, g), y)
    assert np.array_equal(head_permute(back, perm, g), y)
    assert np.array_equal(head_permute(y, _inverse(perm), g), back)
    assert np.array_equal(perm.flat_index(g, inverse=True), inverse_permutation(perm.flat_index(g)))
    assert np.array_equal(perm.invert(y, g), back)


@given(
    data=st.data(),
    shape=SHAPES,
    n=ROWS,
    dtype=dtypes(),
    sizes=st.lists(st.integers(1, 5), max_size=4),
)
def test_stacked_head_permute_is_the_documented_map_on_every_block(
    data: st.DataObject, shape: tuple[int, int, int], n: int, dtype: np.dtype[Any], sizes: list[int]
) -> None:
    """head_permute_stacked(X, P, (g_1, …)): block b (H_kv·g_b heads, after the blocks before it) is the
    documented map with group size g_b, bit for bit — equal to head_permute of that slice — for no block,
    one (the [Q] or [V] alone) or several ([Q K] is (G, 1)); ``stacked_index(…, inverse=True)`` undoes it."""
    h_kv, _, d_h = shape
    perm = data.draw(head_permutations(h_kv, d_h))
    x = data.draw(gaussian_arrays((n, h_kv * sum(sizes), d_h), dtype))
    got: FloatArray = head_permute_stacked(x, perm, tuple(sizes))
    assert got.dtype == dtype and got.shape == x.shape
    start = 0
    for g in sizes:
        block = slice(start, start + h_kv * g)
        assert np.array_equal(got[:, block], _permuted(x[:, block], perm, g))
        assert np.array_equal(got[:, block], head_permute(x[:, block], perm, g))
        start += h_kv * g
    undo = got.reshape(n, x.shape[1] * d_h)[:, perm.stacked_index(tuple(sizes), inverse=True)]
    assert np.array_equal(undo.reshape(x.shape), x)


@given(
    data=st.data(), shape=SHAPES, n=ROWS, dtype=torch_dtypes(), sizes=st.lists(st.integers(1, 4), max_size=3)
)
def test_torch_ops_give_the_documented_map(
    data: st.DataObject, shape: tuple[int, int, int], n: int, dtype: torch.dtype, sizes: list[int]
) -> None:
    """With ``ops=TorchOps(dtype)`` head_permute, head_unpermute and head_permute_stacked return tensors in
    that dtype holding exactly the numpy results on the same (rounded) values: the documented maps."""
    perm, x, h_kv, g, d_h = _case(data, shape, n, np.float64)
    t_ops = TorchOps(dtype)
    t = t_ops.from_numpy(x)
    x64 = t.to(torch.float64).numpy()  # the values as rounded to ``dtype``

    def back(a: torch.Tensor) -> np.ndarray:
        assert isinstance(a, torch.Tensor) and a.dtype == dtype
        out: np.ndarray = a.to(torch.float64).numpy()
        return out

    assert np.array_equal(back(head_permute(t, perm, g, t_ops)), _permuted(x64, perm, g))
    assert np.array_equal(back(head_unpermute(t, perm, g, t_ops)), _unpermuted(x64, perm, g))
    stacked = t_ops.from_numpy(data.draw(gaussian_arrays((n, h_kv * sum(sizes), d_h))))
    want: FloatArray = head_permute_stacked(stacked.to(torch.float64).numpy(), perm, tuple(sizes))
    assert np.array_equal(back(head_permute_stacked(stacked, perm, tuple(sizes), t_ops)), want)


def _source_heads(perm: HeadPermutation, h_kv: int, g: int, d_h: int) -> npt.NDArray[np.int64]:
    """The input head each output slot of head_permute(·, P, G) holds, read off a permuted array of head
    labels (whatever the layout is)."""
    labels = np.broadcast_to(np.arange(h_kv * g, dtype=np.float64)[None, :, None], (1, h_kv * g, d_h))
    moved: FloatArray = head_permute(labels, perm, g)
    return moved[0, :, 0].astype(np.int64)


@given(data=st.data(), shape=SHAPES, n_q=row_counts(1, 4), n_k=row_counts(1, 6), dtype=dtypes())
def test_scores_and_attention_per_head_only_move_under_a_shared_head_permutation(
    data: st.DataObject, shape: tuple[int, int, int], n_q: int, n_k: int, dtype: np.dtype[Any]
) -> None:
    """The protocol's identity for a shared P (queries with G, keys and values with 1): query slot s of Q·P
    meets KV slot s // G of K·P, which holds the KV head of the query head in slot s; so every head's scores
    Q·Kᵀ come back in the slot of their query head, and Attn(Q·P, K·P, V·P) = Attn(Q, K, V)·P (causal mask
    for n_q ≤ n_k), to the rounding of reordered length-d_h dot products (float32 and float64)."""
    h_kv, g, d_h = shape
    perm = data.draw(head_permutations(h_kv, d_h))
    q = data.draw(gaussian_arrays((n_q, h_kv * g, d_h), dtype))
    k = data.draw(gaussian_arrays((n_k, h_kv, d_h), dtype))
    v = data.draw(gaussian_arrays((n_k, h_kv, d_h), dtype))
    src_q, src_k = _source_heads(perm, h_kv, g, d_h), _source_heads(perm, h_kv, 1, d_h)
    assert np.array_equal(src_q // g, src_k[np.arange(h_kv * g) // g])  # GQA pairs kept
    qp: FloatArray = head_permute(q, perm, g)
    kp: FloatArray = head_permute(k, perm, 1)
    vp: FloatArray = head_permute(v, perm, 1)

    def scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.einsum("qhd,khd->hqk", a, np.repeat(b, g, axis=1))
        return out

    u = float(np.finfo(dtype).eps)
    mags = scores(np.abs(q).astype(np.float64), np.abs(k).astype(np.float64))
    got, want = scores(qp, kp).astype(np.float64), scores(q, k).astype(np.float64)[src_q]
    assert np.all(np.abs(got - want) <= 2 * (d_h + 1) * u * mags[src_q])
    mask = ops.causal_mask(n_q, n_k)
    enc: FloatArray = ops.attention(qp, kp, vp, mask=mask)
    plain: FloatArray = ops.attention(q, k, v, mask=mask)
    tol = 2 * (d_h + n_k + 8) * u * float(np.max(np.abs(v)))
    np.testing.assert_allclose(enc, head_permute(plain, perm, g), rtol=0, atol=tol)
    np.testing.assert_allclose(head_unpermute(enc, perm, g), plain, rtol=0, atol=tol)


# --- mutation tests: each property fails for a plausible wrong layout ---------------------------------

FlatIndex = Callable[[HeadPermutation, int, bool], npt.NDArray[np.int64]]
_FLAT_INDEX = HeadPermutation.flat_index


def _layout(
    heads: Callable[[HeadPermutation, int], npt.NDArray[np.int64]],
    coords: Callable[[HeadPermutation, int], npt.NDArray[np.int64]],
) -> FlatIndex:
    """A flat_index built from ``heads`` (the input head of each slot) and ``coords`` (each slot's
    coordinate gather, one row per slot), inverted for ``inverse`` as the library does."""

    def flat_index(self: HeadPermutation, group_size: int, inverse: bool = False) -> npt.NDArray[np.int64]:
        f = (heads(self, group_size)[:, None] * self.head_dim + coords(self, group_size)).reshape(-1)
        return inverse_permutation(f) if inverse else f.astype(np.int64)

    return flat_index


def _inverse_swapped(self: HeadPermutation, group_size: int, inverse: bool = False) -> npt.NDArray[np.int64]:
    return _FLAT_INDEX(self, group_size, not inverse)


def _documented_heads(p: HeadPermutation, g: int) -> npt.NDArray[np.int64]:
    return (p.group_order[:, None] * g + np.arange(g)[None, :]).reshape(-1)


def _documented_coords(p: HeadPermutation, g: int) -> npt.NDArray[np.int64]:
    return np.repeat(p.sigmas[p.group_order], g, axis=0)


MUTANTS: dict[str, FlatIndex] = {
    # π for π⁻¹: encode gathers with the decode index and decode with the encode one
    "inverse swapped": _inverse_swapped,
    # σ of the slot j rather than of the group order[j] that moved there
    "sigma of the slot": _layout(_documented_heads, lambda p, g: np.repeat(p.sigmas, g, axis=0)),
    # σ⁻¹ for σ inside every head (a scatter by σ instead of a gather)
    "sigma inverted": _layout(
        _documented_heads,
        lambda p, g: np.repeat(
            np.array([inverse_permutation(s) for s in p.sigmas[p.group_order]]), g, axis=0
        ).reshape(-1, p.head_dim),
    ),
    # the group moves, but its G query heads come in reverse order
    "query heads reversed in their group": _layout(
        lambda p, g: (p.group_order[:, None] * g + np.arange(g)[None, ::-1]).reshape(-1), _documented_coords
    ),
    # heads laid out group-minor (head t·H_kv + order[j]), which breaks the GQA pairing h → h // G
    "groups interleaved": _layout(
        lambda p, g: (p.group_order[:, None] + np.arange(g)[None, :] * p.n_kv_heads).reshape(-1),
        _documented_coords,
    ),
}


def _stacked_index_without_group_offsets(
    self: HeadPermutation, group_sizes: tuple[int, ...], inverse: bool = False
) -> npt.NDArray[np.int64]:
    """stacked_index advancing each block's offset by H_kv·d_h, forgetting the block's group size."""
    parts = [
        self.flat_index(g, inverse) + b * self.n_kv_heads * self.head_dim for b, g in enumerate(group_sizes)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _scatter_take_last(self: TorchOps, x: torch.Tensor, index: Any) -> torch.Tensor:
    """TorchOps.take_last writing x into the slots ``index`` (index_copy) instead of reading them."""
    return torch.empty_like(x).index_copy(x.ndim - 1, torch.as_tensor(np.array(index, dtype=np.int64)), x)


def _check(
    test: Callable[[], None], monkeypatch: pytest.MonkeyPatch, target: Any, name: str, mutant: Any
) -> None:
    assert not _fails(test)
    with monkeypatch.context() as m:
        m.setattr(target, name, mutant)
        assert _fails(test)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_documented_map_property_catches_a_wrong_layout(monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    """Every wrong layout is still a head-structured permutation, and all but "groups interleaved" keep
    Attn(QP, KP, VP) = Attn(Q, K, V)P. "inverse swapped", "sigma of the slot" and "sigma inverted" pass every
    T3 property of test_transforms and test_torch_parity (torch and numpy share the index); the documented
    map fails on all five."""
    test = test_head_permute_moves_each_kv_group_with_its_query_heads_and_its_own_sigma
    _check(test, monkeypatch, HeadPermutation, "flat_index", MUTANTS[mutant])


@pytest.mark.parametrize(
    "mutant", ["inverse swapped", "sigma inverted", "query heads reversed in their group"]
)
def test_inverse_map_property_catches_a_wrong_layout(monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    test = test_head_unpermute_is_the_inverse_map_and_a_head_permutation_itself
    _check(test, monkeypatch, HeadPermutation, "flat_index", MUTANTS[mutant])


def test_stacked_property_catches_wrong_layouts_and_block_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    test = test_stacked_head_permute_is_the_documented_map_on_every_block
    _check(test, monkeypatch, HeadPermutation, "stacked_index", _stacked_index_without_group_offsets)
    _check(test, monkeypatch, HeadPermutation, "flat_index", MUTANTS["sigma of the slot"])


def test_torch_property_catches_a_scatter_for_the_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    _check(test_torch_ops_give_the_documented_map, monkeypatch, TorchOps, "take_last", _scatter_take_last)


def test_attention_property_catches_interleaved_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved groups pair a moved query head with another group's key head: the scores move to other
    heads' values (the explicit GQA-pair check and the score comparison both see it)."""
    test = test_scores_and_attention_per_head_only_move_under_a_shared_head_permutation
    _check(test, monkeypatch, HeadPermutation, "flat_index", MUTANTS["groups interleaved"])

"""The transforms refuse bad arguments with the same project error on the numpy and the torch ops, and a
:class:`HeadPermutation` is a value that cannot change after its check.

Each case here went wrong before: a count that is not an int (float, None, bool, str) raised a bare
TypeError or ValueError or was used as it was; a ragged nested list raised numpy's ValueError; a 0-d input
was one row on the torch ops and refused (or not) on numpy; fractional or negative RoPE positions were
truncated or accepted on one backend only; a HeadPermutation aliased the caller's arrays, compared by
raising and could not be hashed; and a blinded sum that overflowed came back as ±inf.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from scx_ref.arrays import ArrayOps
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import DTypeError, NonFiniteError, PermutationError, ShapeError
from scx_ref.transforms import (
    NUMPY,
    HeadPermutation,
    Permutation,
    blind,
    blinding_correction,
    decode_qkv_heads,
    decode_rows,
    decode_rows_numpy,
    encode_head_rows,
    encode_rows,
    head_permute,
    head_permute_stacked,
    head_unpermute,
    permute_rows,
    reorder_cache,
    strip_decoys,
    unblind,
    unlock_scores,
)
from scx_ref.weights import random_weights

torch = pytest.importorskip("torch")
from scx_ref.backends.torch_backend import TorchBackend, TorchOps  # noqa: E402

OPS: list[tuple[str, ArrayOps[Any]]] = [("numpy", NUMPY), ("torch", TorchOps(torch.float64))]
HP = HeadPermutation(np.array([1, 0]), np.array([[1, 0, 3, 2], [2, 3, 0, 1]]))
Y = np.arange(20.0).reshape(5, 4)
PI = np.array([4, 0, 3, 1, 2])
CFG = ModelConfig(
    vocab_size=4, hidden_size=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=4
)


@contextmanager
def no_warnings() -> Iterator[None]:
    """A numpy RuntimeWarning (overflow) or a torch UserWarning is an error here, not the expected one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def backends() -> list[tuple[str, Any]]:
    w = random_weights(CFG, np.random.default_rng(0))
    return [("numpy", NumpyBackend(w)), ("torch", TorchBackend(w, "float64"))]


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


# --- 1, 2: HeadPermutation is a checked value ---------------------------------------------------


def test_head_permutation_keeps_private_read_only_arrays() -> None:
    order, sigmas = np.array([1, 0]), np.array([[0, 1], [1, 0]])
    hp = HeadPermutation(order, sigmas)
    x = np.arange(8.0).reshape(1, 4, 2)
    before = head_permute(x, hp, 2)
    order[:] = 0  # the caller reuses its arrays: the checked permutation must not follow
    sigmas[:] = 0
    np.testing.assert_array_equal(hp.group_order, [1, 0])
    np.testing.assert_array_equal(hp.sigmas, [[0, 1], [1, 0]])
    assert not hp.group_order.flags.writeable and not hp.sigmas.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        hp.sigmas[0, 0] = 1
    np.testing.assert_array_equal(head_permute(x, hp, 2), before)
    np.testing.assert_array_equal(head_unpermute(head_permute(x, hp, 2), hp, 2), x)


def test_head_permutation_is_a_value_with_equality_and_hash() -> None:
    a = HeadPermutation([1, 0], [[0, 1], [1, 0]])
    b = HeadPermutation(np.array([1, 0]), np.array([[0, 1], [1, 0]], dtype=np.int32))
    c = HeadPermutation([1, 0], [[1, 0], [1, 0]])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != c and a != HeadPermutation.identity(2, 2) and a != "P"
    assert HeadPermutation.identity(1, 2) != HeadPermutation.identity(2, 1)
    for other in (pickle.loads(pickle.dumps(a)), copy.copy(a), copy.deepcopy(a)):
        assert other == a and hash(other) == hash(a)
        assert not other.group_order.flags.writeable and not other.sigmas.flags.writeable


# --- 3: decode_qkv_heads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positions", "error", "match"),
    [
        ([0, 1, 1.5], DTypeError, "positions must be integers, got dtype float64"),
        (np.array([0.0, 1.0, 2.0]), DTypeError, "positions must be integers"),
        ([-1, 0, 1], ShapeError, "positions must be >= 0, got -1"),
        (["a", "b", "c"], DTypeError, "positions must be integers"),
        (None, DTypeError, "positions must be integers"),
    ],
)
def test_decode_qkv_heads_refuses_bad_positions_on_every_backend(
    positions: Any, error: type[Exception], match: str
) -> None:
    head = HeadPermutation.identity(2, 4)
    z = np.ones((5, 32))
    for _, b in backends():
        with no_warnings(), pytest.raises(error, match=match):
            decode_qkv_heads(z, PI, 3, positions, head, 2, b)


def test_decode_qkv_heads_refuses_a_head_permutation_of_other_heads() -> None:
    z = np.ones((5, 16))  # (2·2 + 2·2)·2 columns: the width fits a head of d_h = 2, the model has 4
    for _, b in backends():
        with pytest.raises(ShapeError, match="head permutes 2 KV heads of 2 features; the backend's model"):
            decode_qkv_heads(z, PI, 3, [0, 1, 2], HeadPermutation.identity(2, 2), 2, b)
        with pytest.raises(ShapeError, match="head permutes 4 KV heads of 4 features"):
            decode_qkv_heads(np.ones((5, 64)), PI, 3, [0, 1, 2], HeadPermutation.identity(4, 4), 2, b)


def test_decode_qkv_heads_keeps_zero_rows() -> None:
    head = HeadPermutation.identity(2, 4)
    for _, b in backends():
        qk, v = decode_qkv_heads(np.ones((5, 32)), PI, 0, np.zeros(0, dtype=np.int64), head, 2, b)
        assert _shape(qk) == (0, 6, 4) and _shape(v) == (0, 2, 4)
        qk, v = decode_qkv_heads(np.ones((5, 32)), PI, 0, [], head, 2, b)
        assert _shape(qk) == (0, 6, 4) and _shape(v) == (0, 2, 4)


# --- 4: counts and group sizes must be ints ----------------------------------------------------

X3 = np.arange(24.0).reshape(2, 4, 3)
HP3 = HeadPermutation([1, 0], [[1, 0, 2], [0, 1, 2]])
COUNT_CASES: list[tuple[str, Callable[[ArrayOps[Any]], Any], str]] = [
    ("decode-n-float", lambda o: decode_rows(Y, PI, 2.5, o), "n must be an integer, got float 2.5"),
    ("decode-n-none", lambda o: decode_rows(Y, PI, None, o), "n must be an integer, got NoneType"),
    ("decode-n-str", lambda o: decode_rows(Y, PI, "2", o), "n must be an integer, got str '2'"),
    ("decode-n-bool", lambda o: decode_rows(Y, PI, True, o), "n must be an integer, got bool True"),
    ("decode-numpy-n-float", lambda o: decode_rows_numpy(Y, PI, 2.5, o), "n must be an integer"),
    ("decode-numpy-n-none", lambda o: decode_rows_numpy(Y, PI, None, o), "n must be an integer"),
    (
        "decode-numpy-in-place-n-float",
        lambda o: decode_rows_numpy(Y.copy(), PI, 2.5, o, in_place=True),
        "n must be an integer",
    ),
    ("strip-n-float", lambda o: strip_decoys(Y, 2.5, o), "n must be an integer"),
    ("strip-n-none", lambda o: strip_decoys(Y, None, o), "n must be an integer"),
    ("unlock-n-float", lambda o: unlock_scores(Y, [2, 0, 3, 1], 1.5, o), "n must be an integer"),
    ("unlock-n-none", lambda o: unlock_scores(Y, [2, 0, 3, 1], None, o), "n must be an integer"),
    ("head-g-float", lambda o: head_permute(X3, HP3, 1.5, o), "group_size must be an integer"),
    ("head-g-none", lambda o: head_permute(X3, HP3, None, o), "group_size must be an integer"),
    ("head-g-str", lambda o: head_permute(X3, HP3, "2", o), "group_size must be an integer, got str '2'"),
    ("head-g-zero", lambda o: head_permute(np.zeros((2, 0, 3)), HP3, 0, o), "group_size must be >= 1"),
    ("unpermute-g-float", lambda o: head_unpermute(X3, HP3, 2.0, o), "group_size must be an integer"),
    ("stacked-int", lambda o: head_permute_stacked(X3, HP3, 2, o), "group_sizes must be a tuple of integers"),
    ("stacked-none", lambda o: head_permute_stacked(X3, HP3, None, o), "group_sizes must be a tuple"),
    (
        "stacked-floats",
        lambda o: head_permute_stacked(X3, HP3, (1.5, 0.5), o),
        "group_sizes must be an integer, got float 1.5",
    ),
    ("stacked-negative", lambda o: head_permute_stacked(X3, HP3, (3, -1), o), "group_sizes must be >= 0"),
    (
        "encode-head-g-none",
        lambda o: encode_head_rows(X3[:1].repeat(3, 0), HP3, None, np.zeros((2, 12)), PI, o),
        "group_size must be an integer",
    ),
    ("identity-negative", lambda o: HeadPermutation.identity(-1, 2), "must be >= 0, got -1 and 2"),
    ("identity-float", lambda o: HeadPermutation.identity(2.5, 2), "n_kv_heads must be an integer"),
    ("identity-str", lambda o: HeadPermutation.identity(2, "a"), "head_dim must be an integer"),
    ("flat-index-float", lambda o: HP3.flat_index(1.5), "group_size must be an integer"),
    ("flat-index-negative", lambda o: HP3.flat_index(-1), "group_size must be >= 0"),
]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in COUNT_CASES], ids=[c[0] for c in COUNT_CASES])
def test_counts_and_group_sizes_must_be_ints(call: Callable[[ArrayOps[Any]], Any], match: str) -> None:
    for _, ops in OPS:
        with pytest.raises(ShapeError, match=match):
            call(ops)


def test_decode_qkv_heads_counts_must_be_ints() -> None:
    head = HeadPermutation.identity(2, 4)
    for _, b in backends():
        with pytest.raises(ShapeError, match=r"n must be an integer, got float 2\.5"):
            decode_qkv_heads(np.ones((5, 32)), PI, 2.5, [0, 1], head, 2, b)
        with pytest.raises(ShapeError, match="group_size must be >= 1, got 0"):
            decode_qkv_heads(np.ones((5, 16)), PI, 3, [0, 1, 2], head, 0, b)


def test_numpy_integers_are_counts() -> None:
    for _, ops in OPS:
        assert _shape(decode_rows(Y, PI, np.int64(2), ops)) == (2, 4)
        assert _shape(head_permute(X3, HP3, np.int32(2), ops)) == (2, 4, 3)
        assert _shape(head_permute_stacked(np.ones((1, 6, 3)), HP3, np.array([2, 1]), ops)) == (1, 6, 3)
    assert HeadPermutation.identity(np.int64(2), np.int64(3)) == HeadPermutation.identity(2, 3)


# --- 5: ragged lists, read-only in-place decode, 0-d inputs -------------------------------------


def test_ragged_nested_lists_are_project_errors() -> None:
    for _, ops in OPS:
        with pytest.raises(ShapeError, match="x must be a rectangular array"):
            encode_rows([[1.0, 2.0], [1.0]], np.zeros((2, 2)), [2, 0, 1, 3], ops)
        with pytest.raises(PermutationError, match="perm must be a rectangular array"):
            permute_rows(Y, [[0, 1], [2]], ops)
    with pytest.raises(ShapeError, match="sigmas must be a rectangular array"):
        HeadPermutation([1, 0], [[1, 0, 2], [0, 1]])
    with pytest.raises(PermutationError, match="permutation must be a rectangular array"):
        Permutation([[0], [1, 2]])


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
def test_in_place_decode_of_a_read_only_array_decodes_a_copy() -> None:
    want = Y[np.argsort(PI)][:3]
    for _, ops in OPS:
        y = Y.copy()
        y.setflags(write=False)
        got = decode_rows_numpy(y, PI, 3, ops, in_place=True)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(y, Y)  # not written
        broadcast = np.broadcast_to(np.arange(4.0), (5, 4))  # read-only, no memory of its own per row
        np.testing.assert_array_equal(
            decode_rows_numpy(broadcast, PI, 3, ops, in_place=True), np.broadcast_to(np.arange(4.0), (3, 4))
        )


SCALAR = "the array must have at least one dimension (rows)"
SCALAR_CASES: list[tuple[str, Callable[[ArrayOps[Any]], Any]]] = [
    ("blind", lambda o: blind(np.float64(1.0), np.float64(2.0), o)),
    ("blind-0d-arrays", lambda o: blind(np.array(1.0), np.array(2.0), o)),
    ("unblind", lambda o: unblind(np.float64(1.0), np.float64(2.0), o)),
    ("unlock", lambda o: unlock_scores(np.float64(1.0), [0], 1, o)),
    ("decode", lambda o: decode_rows(np.float64(1.0), PI, 3, o)),
    ("permute", lambda o: permute_rows(np.float64(1.0), [0], o)),
    ("strip", lambda o: strip_decoys(np.float64(1.0), 0, o)),
    ("reorder", lambda o: reorder_cache(np.float64(1.0), np.float64(1.0), [0], o)),
    ("python-float", lambda o: permute_rows(1.0, [0], o)),
]


@pytest.mark.parametrize("call", [c[1] for c in SCALAR_CASES], ids=[c[0] for c in SCALAR_CASES])
def test_scalar_inputs_are_refused_alike(call: Callable[[ArrayOps[Any]], Any]) -> None:
    for _, ops in OPS:
        with pytest.raises(ShapeError, match=re.escape(SCALAR)):
            call(ops)


# --- 6: blinding never returns an overflow -------------------------------------------------------

BIG = np.full((3, 4), 1.7e308)
OVERFLOW_CASES: list[tuple[str, Callable[[ArrayOps[Any]], Any], str]] = [
    ("blind", lambda o: blind(BIG, BIG, o), "^x \\+ eta overflows"),
    ("unblind", lambda o: unblind(BIG, -BIG, o), "^y - correction overflows"),
    (
        "correction",
        lambda o: blinding_correction(np.full((3, 4), 1e200), np.full((4, 4), 1e200), o),
        "^the blinding correction eta·w overflows",
    ),
]


@pytest.mark.parametrize(
    ("call", "match"), [c[1:] for c in OVERFLOW_CASES], ids=[c[0] for c in OVERFLOW_CASES]
)
def test_blinding_refuses_an_overflow(call: Callable[[ArrayOps[Any]], Any], match: str) -> None:
    for _, ops in OPS:
        with no_warnings(), pytest.raises(NonFiniteError, match=match):
            call(ops)


def test_blinding_refuses_an_overflow_in_float32() -> None:
    big = np.full((3, 4), 3e38, dtype=np.float32)
    for ops in (NUMPY, TorchOps(torch.float32)):
        with no_warnings(), pytest.raises(NonFiniteError, match=r"^x \+ eta overflows"):
            blind(big, big, ops)
        with no_warnings():  # the same magnitudes without an overflow: the sum, unchanged
            np.testing.assert_array_equal(np.asarray(blind(big, -big, ops)), np.zeros((3, 4), np.float32))


def test_blinding_names_the_input_that_is_not_finite_and_the_overflow_apart() -> None:
    x, eta = np.arange(12.0).reshape(3, 4), np.ones((3, 4))
    inf = x.copy()
    inf[1, 2] = np.inf
    for _, ops in OPS:
        with no_warnings():
            np.testing.assert_array_equal(np.asarray(blind(x, eta, ops)), x + eta)
            np.testing.assert_array_equal(np.asarray(unblind(x, eta, ops)), x - eta)
            with pytest.raises(NonFiniteError, match=r"^eta holds NaN or Inf$"):
                blind(x, -inf, ops)  # -inf + finite: named, not called an overflow
            with pytest.raises(NonFiniteError, match=r"^x holds NaN or Inf$"):
                blind(inf, -inf, ops)  # inf + -inf (NaN, no numpy warning): the first input is named
            with pytest.raises(NonFiniteError, match=r"^correction holds NaN or Inf$"):
                unblind(x, inf, ops)
            with pytest.raises(NonFiniteError, match=r"^x \+ eta overflows"):
                blind(BIG, BIG, ops)

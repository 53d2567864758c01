"""The transforms' input checks say exactly what was wrong, and their edge cases behave as documented.

``tests/test_errors.py`` checks the error *types*; here every message is checked in full, so an error names
the argument at fault (``x``, ``decoys``, ``perm``, ``rho``, ``eta``, …) and the sizes it saw, and the
boundary cases of each check (0 rows kept, all rows kept, non-finite values in a decode) go the right way.
Also the memoised feature indices of :class:`HeadPermutation` (computed once, read-only) and the Laplace
sampler's clamp at u = 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import DTypeError, NonFiniteError, PermutationError, SCXError, ShapeError
from scx_ref.transforms import (
    HeadPermutation,
    blind,
    blinding_correction,
    decode_rows,
    encode_rows,
    head_permute,
    head_permute_stacked,
    head_unpermute,
    inverse_permutation,
    laplace_noise,
    permute_rows,
    reorder_cache,
    strip_decoys,
    unblind,
    unlock_scores,
    unpermute_rows,
    with_decoys,
)

X = np.arange(12.0).reshape(4, 3)
NAN = np.where(np.arange(12).reshape(4, 3) == 5, np.nan, X)
INTS = np.arange(12).reshape(4, 3)
ID4 = np.arange(4)
HP = HeadPermutation(np.array([1, 0]), np.array([[1, 0, 3, 2], [2, 3, 0, 1]]))

# (id, call, error type, the whole message)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("permute-x-nan", lambda: permute_rows(NAN, ID4), NonFiniteError, "x holds NaN or Inf"),
    (
        "permute-x-int",
        lambda: permute_rows(INTS, ID4),
        DTypeError,
        "x must be a floating-point array, got dtype int64",
    ),
    (
        "permute-perm-len",
        lambda: permute_rows(X, [0, 1, 2]),
        PermutationError,
        "perm must have length 4, got 3",
    ),
    (
        "permute-0d",
        lambda: permute_rows(np.float64(1.0), [0]),
        ShapeError,
        "the array must have at least one dimension (rows)",
    ),
    (
        "unpermute-y-int",
        lambda: unpermute_rows(INTS, ID4),
        DTypeError,
        "y must be a floating-point array, got dtype int64",
    ),
    (
        "unpermute-perm-len",
        lambda: unpermute_rows(X, [0, 1, 2]),
        PermutationError,
        "perm must have length 4, got 3",
    ),
    ("decoys-x-nan", lambda: with_decoys(NAN, X), NonFiniteError, "x holds NaN or Inf"),
    ("decoys-decoys-nan", lambda: with_decoys(X, NAN), NonFiniteError, "decoys holds NaN or Inf"),
    (
        "decoys-width",
        lambda: with_decoys(X, np.zeros((2, 4))),
        ShapeError,
        "x ((4, 3)) and decoys ((2, 4)) must be 2-D with the same width",
    ),
    (
        "decoys-1d",
        lambda: with_decoys(X, np.zeros(3)),
        ShapeError,
        "x ((4, 3)) and decoys ((3,)) must be 2-D with the same width",
    ),
    (
        "decoys-x-1d",
        lambda: with_decoys(np.zeros(3), np.zeros((1, 3))),
        ShapeError,
        "x ((3,)) and decoys ((1, 3)) must be 2-D with the same width",
    ),
    ("strip-too-many", lambda: strip_decoys(X, 5), ShapeError, "cannot keep 5 rows of an array with 4"),
    ("strip-negative", lambda: strip_decoys(X, -1), ShapeError, "cannot keep -1 rows of an array with 4"),
    (
        "strip-y-int",
        lambda: strip_decoys(INTS, 1),
        DTypeError,
        "y must be a floating-point array, got dtype int64",
    ),
    (
        "encode-x-int",
        lambda: encode_rows(INTS, X, np.arange(8)),
        DTypeError,
        "x must be a floating-point array, got dtype int64",
    ),
    (
        "encode-decoys-int",
        lambda: encode_rows(X, INTS, np.arange(8)),
        DTypeError,
        "decoys must be a floating-point array, got dtype int64",
    ),
    (
        "encode-width",
        lambda: encode_rows(X, np.zeros((1, 2)), np.arange(5)),
        ShapeError,
        "x ((4, 3)) and decoys ((1, 2)) must be 2-D with the same width",
    ),
    (
        "encode-decoys-1d",
        lambda: encode_rows(X, np.zeros(3), np.arange(5)),
        ShapeError,
        "x ((4, 3)) and decoys ((3,)) must be 2-D with the same width",
    ),
    (
        "encode-x-1d",
        lambda: encode_rows(np.zeros(3), np.zeros((1, 3)), np.arange(4)),
        ShapeError,
        "x ((3,)) and decoys ((1, 3)) must be 2-D with the same width",
    ),
    (
        "encode-perm-len",
        lambda: encode_rows(X, np.zeros((1, 3)), ID4),
        PermutationError,
        "perm must have length 5, got 4",
    ),
    (
        "encode-nan-x",
        lambda: encode_rows(NAN, np.zeros((1, 3)), np.arange(5)),
        NonFiniteError,
        "x and decoys holds NaN or Inf",
    ),
    (
        "encode-nan-decoys",
        lambda: encode_rows(X, NAN, np.arange(8)),
        NonFiniteError,
        "x and decoys holds NaN or Inf",
    ),
    ("decode-too-many", lambda: decode_rows(X, ID4, 5), ShapeError, "cannot keep 5 rows of an array with 4"),
    (
        "decode-negative",
        lambda: decode_rows(X, ID4, -1),
        ShapeError,
        "cannot keep -1 rows of an array with 4",
    ),
    (
        "decode-perm-len",
        lambda: decode_rows(X, [0, 1, 2], 2),
        PermutationError,
        "perm must have length 4, got 3",
    ),
    (
        "decode-y-int",
        lambda: decode_rows(INTS, ID4, 2),
        DTypeError,
        "y must be a floating-point array, got dtype int64",
    ),
    (
        "inverse-not-perm",
        lambda: inverse_permutation([1, 1]),
        PermutationError,
        "permutation is not a permutation of 0..1",
    ),
    (
        "hp-order",
        lambda: HeadPermutation(np.array([0, 0]), np.zeros((2, 4), dtype=np.int64)),
        PermutationError,
        "group_order is not a permutation of 0..1",
    ),
    (
        "hp-sigma",
        lambda: HeadPermutation(np.array([0, 1]), np.array([[0, 1], [1, 1]])),
        PermutationError,
        "sigmas[1] is not a permutation of 0..1",
    ),
    (
        "hp-sigmas-rows",
        lambda: HeadPermutation(np.array([0, 1]), np.zeros((3, 4), dtype=np.int64)),
        ShapeError,
        "sigmas must have shape (H_kv=2, d_h), got (3, 4)",
    ),
    (
        "hp-sigmas-1d",
        lambda: HeadPermutation(np.array([0]), np.arange(4)),
        ShapeError,
        "sigmas must have shape (H_kv=1, d_h), got (4,)",
    ),
    (
        "head-not-hp",
        lambda: head_permute(np.zeros((1, 2, 4)), "P", 1),
        SCXError,
        "perm must be a HeadPermutation, got str",
    ),
    (
        "head-x-shape",
        lambda: head_permute(np.zeros((3, 2, 4)), HP, 2),
        ShapeError,
        "x must have shape (rows, 4, 4), got (3, 2, 4)",
    ),
    (
        "head-x-dh",
        lambda: head_permute(np.zeros((3, 2, 5)), HP, 1),
        ShapeError,
        "x must have shape (rows, 2, 4), got (3, 2, 5)",
    ),
    (
        "head-x-2d",
        lambda: head_permute(np.zeros((3, 8)), HP, 1),
        ShapeError,
        "x must have shape (rows, 2, 4), got (3, 8)",
    ),
    (
        "head-x-int",
        lambda: head_permute(np.zeros((3, 2, 4), dtype=np.int32), HP, 1),
        DTypeError,
        "x must be a floating-point array, got dtype int32",
    ),
    (
        "head-y-shape",
        lambda: head_unpermute(np.zeros((3, 2, 4)), HP, 3),
        ShapeError,
        "y must have shape (rows, 6, 4), got (3, 2, 4)",
    ),
    (
        "head-y-int",
        lambda: head_unpermute(np.zeros((3, 2, 4), dtype=np.int32), HP, 1),
        DTypeError,
        "y must be a floating-point array, got dtype int32",
    ),
    (
        "head-y-not-hp",
        lambda: head_unpermute(np.zeros((1, 2, 4)), None, 1),
        SCXError,
        "perm must be a HeadPermutation, got NoneType",
    ),
    (
        "apply-shape",
        lambda: HP.apply(np.zeros((3, 2, 4)), 2),
        ShapeError,
        "x must have shape (rows, 4, 4), got (3, 2, 4)",
    ),
    (
        "invert-shape",
        lambda: HP.invert(np.zeros((3, 2, 4)), 2),
        ShapeError,
        "y must have shape (rows, 4, 4), got (3, 2, 4)",
    ),
    (
        "stacked-not-hp",
        lambda: head_permute_stacked(np.zeros((1, 6, 4)), 3, (2, 1)),
        SCXError,
        "perm must be a HeadPermutation, got int",
    ),
    (
        "stacked-heads",
        lambda: head_permute_stacked(np.zeros((1, 4, 4)), HP, (2, 1)),
        ShapeError,
        "x must have shape (rows, 6, 4) for group sizes (2, 1), got (1, 4, 4)",
    ),
    (
        "stacked-dh",
        lambda: head_permute_stacked(np.zeros((1, 6, 3)), HP, (2, 1)),
        ShapeError,
        "x must have shape (rows, 6, 4) for group sizes (2, 1), got (1, 6, 3)",
    ),
    (
        "stacked-2d",
        lambda: head_permute_stacked(np.zeros((1, 24)), HP, (2, 1)),
        ShapeError,
        "x must have shape (rows, 6, 4) for group sizes (2, 1), got (1, 24)",
    ),
    (
        "stacked-zero-group",
        lambda: head_permute_stacked(np.zeros((1, 4, 4)), HP, (2, 0)),
        ShapeError,
        "x must have shape (rows, 4, 4) for group sizes (2, 0), got (1, 4, 4)",
    ),
    (
        "stacked-x-int",
        lambda: head_permute_stacked(np.zeros((1, 6, 4), dtype=np.int8), HP, (2, 1)),
        DTypeError,
        "x must be a floating-point array, got dtype int8",
    ),
    ("cache-k-nan", lambda: reorder_cache(NAN, X, ID4), NonFiniteError, "k holds NaN or Inf"),
    ("cache-v-nan", lambda: reorder_cache(X, NAN, ID4), NonFiniteError, "v holds NaN or Inf"),
    (
        "cache-rows",
        lambda: reorder_cache(np.zeros((3, 1, 2)), np.zeros((4, 1, 2)), [0, 1, 2]),
        ShapeError,
        "k and v must have the same number of rows, got (3, 1, 2) and (4, 1, 2)",
    ),
    (
        "cache-rho-len",
        lambda: reorder_cache(X, X, [0, 1, 2]),
        PermutationError,
        "rho must have length 4, got 3",
    ),
    (
        "cache-0d",
        lambda: reorder_cache(np.float64(0.0), X, [0]),
        ShapeError,
        "the array must have at least one dimension (rows)",
    ),
    (
        "unlock-int",
        lambda: unlock_scores(np.zeros((1, 4), dtype=np.int64), ID4, 2),
        DTypeError,
        "scores must be a floating-point array, got dtype int64",
    ),
    (
        "unlock-rho",
        lambda: unlock_scores(np.zeros((1, 4)), [0, 0, 1], 2),
        PermutationError,
        "rho is not a permutation of 0..2",
    ),
    (
        "unlock-rho-long",
        lambda: unlock_scores(np.zeros((1, 5)), np.arange(6), 2),
        ShapeError,
        "5 score columns cannot hold a locked cache of 6 rows with 2 real",
    ),
    (
        "unlock-n-long",
        lambda: unlock_scores(np.zeros((1, 5)), np.arange(3), 4),
        ShapeError,
        "5 score columns cannot hold a locked cache of 3 rows with 4 real",
    ),
    (
        "unlock-n-negative",
        lambda: unlock_scores(np.zeros((1, 5)), np.arange(3), -1),
        ShapeError,
        "5 score columns cannot hold a locked cache of 3 rows with -1 real",
    ),
    ("blind-x-nan", lambda: blind(NAN, X), NonFiniteError, "x holds NaN or Inf"),
    ("blind-eta-nan", lambda: blind(X, NAN), NonFiniteError, "eta holds NaN or Inf"),
    (
        "blind-shape",
        lambda: blind(X, np.zeros((4, 2))),
        ShapeError,
        "x (4, 3) and eta (4, 2) must have the same shape",
    ),
    (
        "correction-eta-nan",
        lambda: blinding_correction(NAN, np.zeros((3, 2))),
        NonFiniteError,
        "eta holds NaN or Inf",
    ),
    ("correction-w-nan", lambda: blinding_correction(X, NAN[:3]), NonFiniteError, "w holds NaN or Inf"),
    (
        "correction-shape",
        lambda: blinding_correction(X, np.zeros((2, 5))),
        ShapeError,
        "cannot multiply rows of shape (4, 3) by a matrix of shape (2, 5) (in × out)",
    ),
    ("unblind-y-nan", lambda: unblind(NAN, X), NonFiniteError, "y holds NaN or Inf"),
    ("unblind-c-nan", lambda: unblind(X, NAN), NonFiniteError, "correction holds NaN or Inf"),
    (
        "unblind-shape",
        lambda: unblind(np.zeros((4, 5)), np.zeros((4, 4))),
        ShapeError,
        "y (4, 5) and correction (4, 4) must have the same shape",
    ),
    (
        "laplace-negative",
        lambda: laplace_noise((2,), -1.0, np.random.default_rng(0)),
        SCXError,
        "Laplace scale beta must be >= 0, got -1.0",
    ),
    (
        "laplace-inf",
        lambda: laplace_noise((2,), np.inf, np.random.default_rng(0)),
        SCXError,
        "Laplace scale beta must be finite and >= 0, got inf",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_errors_name_the_argument_and_the_sizes(
    call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


def test_checks_are_not_vacuous() -> None:
    """Control: an exact-message check fails on a message that names the wrong argument."""
    with pytest.raises(NonFiniteError) as info:
        blind(X, NAN)
    assert str(info.value) != "x holds NaN or Inf"
    assert re.fullmatch(r"eta holds NaN or Inf", str(info.value))


def test_decodes_pass_non_finite_values_through() -> None:
    """Decoding is a pure gather: an overflowed reply (±inf, NaN) comes back decoded, not refused (whether a
    reply is plausible is the verifier's question), and so does the head permutation of one."""
    y = np.array([[np.inf, 1.0], [2.0, np.nan], [-np.inf, 3.0]])
    perm = np.array([2, 0, 1])
    np.testing.assert_array_equal(unpermute_rows(y, perm), y[inverse_permutation(perm)])
    np.testing.assert_array_equal(strip_decoys(y, 2), y[:2])
    np.testing.assert_array_equal(decode_rows(y, perm, 2), y[inverse_permutation(perm)][:2])
    h = np.full((2, 2, 4), np.inf)
    h[0, 1, 2] = np.nan
    np.testing.assert_array_equal(head_unpermute(head_permute(h, HP), HP), h)
    np.testing.assert_array_equal(HP.invert(HP.apply(h)), h)
    np.testing.assert_array_equal(
        head_permute_stacked(np.full((1, 6, 4), np.inf), HP, (2, 1)), np.full((1, 6, 4), np.inf)
    )
    scores = np.array([[np.inf, 0.0, -np.inf, 1.0]])
    np.testing.assert_array_equal(unlock_scores(scores, [2, 0, 1], 3), scores[:, [1, 2, 0, 3]])


def test_keeping_no_rows_and_every_row() -> None:
    assert strip_decoys(X, 0).shape == (0, 3)
    np.testing.assert_array_equal(strip_decoys(X, 4), X)
    assert decode_rows(X, ID4, 0).shape == (0, 3)
    np.testing.assert_array_equal(decode_rows(X, [3, 2, 1, 0], 4), X[::-1])
    np.testing.assert_array_equal(with_decoys(X, np.zeros((0, 3))), X)
    # unlock: no real rows, and a locked cache that fills every score column
    np.testing.assert_array_equal(unlock_scores(np.array([[5.0, 6.0, 7.0]]), [1, 0], 0), [[7.0]])
    np.testing.assert_array_equal(unlock_scores(np.array([[5.0, 6.0, 7.0]]), [1, 2, 0], 3), [[7.0, 5.0, 6.0]])


def test_decoys_take_the_rows_dtype_and_go_below() -> None:
    x32 = X.astype(np.float32)
    out = with_decoys(x32, np.ones((2, 3), dtype=np.float64))
    assert out.shape == (6, 3)
    np.testing.assert_array_equal(out[4:], np.ones((2, 3)))
    np.testing.assert_array_equal(out[:4], x32)


def test_head_permutation_is_normalised_and_its_indices_memoised_read_only() -> None:
    p = HeadPermutation([1, 0], [[1, 0, 3, 2], [2, 3, 0, 1]])  # lists, not arrays
    assert isinstance(p.group_order, np.ndarray) and p.group_order.dtype == np.int64
    assert isinstance(p.sigmas, np.ndarray) and p.sigmas.dtype == np.int64
    assert p.n_kv_heads == 2 and p.head_dim == 4
    for g in (1, 2):
        f, finv = p.flat_index(g), p.flat_index(g, inverse=True)
        assert f is p.flat_index(g) and finv is p.flat_index(g, True)  # computed once
        assert not f.flags.writeable and not finv.flags.writeable
        assert f.dtype == np.int64 and f.shape == (2 * g * 4,)
        np.testing.assert_array_equal(f[finv], np.arange(f.shape[0]))
        np.testing.assert_array_equal(finv, inverse_permutation(f))
    # slot 0 holds group order[0] = 1, i.e. heads G..2G-1, with coordinates sigma[1]
    np.testing.assert_array_equal(p.flat_index(1), [6, 7, 4, 5, 1, 0, 3, 2])
    np.testing.assert_array_equal(p.flat_index(2)[:8], [10, 11, 8, 9, 14, 15, 12, 13])
    s = p.stacked_index((2, 1))
    assert s is p.stacked_index((2, 1)) and not s.flags.writeable
    np.testing.assert_array_equal(s, np.concatenate([p.flat_index(2), p.flat_index(1) + 16]))
    np.testing.assert_array_equal(
        p.stacked_index((1, 1), True), np.concatenate([p.flat_index(1, True), p.flat_index(1, True) + 8])
    )
    empty = p.stacked_index(())
    assert empty.shape == (0,) and empty.dtype == np.int64
    # the default group size is 1 for apply and invert
    x = np.arange(16.0).reshape(2, 2, 4)
    np.testing.assert_array_equal(p.apply(x), head_permute(x, p, 1))
    np.testing.assert_array_equal(p.invert(x), head_unpermute(x, p, 1))


def test_laplace_noise_clamps_u_zero_and_keeps_dtype_and_shape() -> None:
    """u = 0 is the one uniform where 1 − 2|s| = 0: the clamp turns it into the finite extreme
    −β·53·ln 2 instead of −inf; u = ½ (s = 0) gives exactly 0; β = 0 gives zeros of the requested dtype;
    a source that returns a flat array or float32 uniforms gives the same noise as float64 uniforms of the
    right shape."""

    class Fixed:
        def __init__(self, u: Any) -> None:
            self.u = u

        def random(self, size: Any = None) -> Any:
            return self.u

    eta = laplace_noise((4,), 2.0, Fixed(np.array([0.0, 0.25, 0.5, 0.75])))
    np.testing.assert_allclose(
        eta, [-2.0 * 53 * np.log(2.0), 2.0 * np.log(0.5), 0.0, -2.0 * np.log(0.5)], rtol=1e-12
    )
    zeros = laplace_noise((2, 2), 0.0, Fixed(None), dtype=np.float32)
    assert zeros.dtype == np.float32 and zeros.shape == (2, 2) and not zeros.any()
    u64 = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    want = laplace_noise((2, 3), 1.5, Fixed(u64.reshape(2, 3)))
    np.testing.assert_array_equal(laplace_noise((2, 3), 1.5, Fixed(u64)), want)
    u32 = u64.astype(np.float32)
    got = laplace_noise((2, 3), 1.5, Fixed(u32))
    np.testing.assert_array_equal(
        got, laplace_noise((2, 3), 1.5, Fixed(u32.astype(np.float64).reshape(2, 3)))
    )
    assert got.dtype == np.float64


def test_fused_client_passes_name_what_was_wrong() -> None:
    """``decode_qkv_heads`` and ``encode_head_rows`` check their inputs as the transforms they fuse do: the
    reply's width against the heads, the positions against the rows kept, the decoys' width, and a
    non-finite result of the encode."""
    from scx_ref.backends.numpy_backend import NumpyBackend
    from scx_ref.config import ModelConfig
    from scx_ref.transforms import decode_qkv_heads, encode_head_rows
    from scx_ref.weights import random_weights

    c = ModelConfig(
        vocab_size=4, hidden_size=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=2, intermediate_size=4
    )
    b = NumpyBackend(random_weights(c, np.random.default_rng(0)))
    head = HeadPermutation(np.array([1, 0]), np.array([[1, 0], [0, 1]]))
    z = np.zeros((5, (4 + 2 * 2) * 2))
    qk, v = decode_qkv_heads(z, np.arange(5), 3, np.arange(3), head, 2, b)
    assert qk.shape == (3, 6, 2) and v.shape == (3, 2, 2)
    with pytest.raises(
        ShapeError, match=re.escape("z must be 2-D with 16 columns ([Q K V] heads), got (5, 15)")
    ):
        decode_qkv_heads(z[:, :15], np.arange(5), 3, np.arange(3), head, 2, b)
    with pytest.raises(ShapeError, match=re.escape("2 positions for 3 rows")):
        decode_qkv_heads(z, np.arange(5), 3, np.arange(2), head, 2, b)
    with pytest.raises(ShapeError, match=re.escape("cannot keep 6 rows of an array with 5")):
        decode_qkv_heads(z, np.arange(5), 6, np.arange(6), head, 2, b)
    with pytest.raises(PermutationError):
        decode_qkv_heads(z, np.arange(4), 3, np.arange(3), head, 2, b)
    o = np.ones((3, 4, 2))
    assert encode_head_rows(o, head, 2, np.zeros((2, 8)), np.arange(5)).shape == (5, 8)
    with pytest.raises(ShapeError, match=re.escape("decoys ((2, 7)) must be 2-D with 8 columns")):
        encode_head_rows(o, head, 2, np.zeros((2, 7)), np.arange(5))
    with pytest.raises(ShapeError, match=re.escape("o must have shape (rows, 4, 2), got (3, 2, 2)")):
        encode_head_rows(o[:, :2], head, 2, np.zeros((2, 8)), np.arange(5))
    with pytest.raises(NonFiniteError, match="o and decoys"):
        encode_head_rows(o, head, 2, np.full((2, 8), np.nan), np.arange(5))
    with pytest.raises(SCXError, match="head must be a HeadPermutation"):
        encode_head_rows(o, "P", 2, np.zeros((2, 8)), np.arange(5))  # type: ignore[arg-type]

"""Tests that kill mutants of :mod:`scx_ref.transforms` that survived ``python -m mutation.run transforms``
(``mutation/annotations.toml`` names each).

The selected tests proved the identities and refused bad input by class, but never read the whole message of
a wrong dtype in the blinding pair (so either array could be named for the other), of a scalar score array,
or of a noise source that is not one; never decoded logits to numpy with a name outside the client (where a
name turns the finiteness test on and no name leaves it off); never asked for an empty identity head
permutation; never checked that a Permutation leaves the caller's array alone and hands out a copy of its
own; never hashed two different head permutations; and never ran the Laplace scale's overflow refusal with
warnings as errors."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref import transforms
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, PermutationError, SCXError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.transforms import HeadPermutation, Permutation, blind, laplace_noise, unblind, unlock_scores

from .refusals import Refusal, refusal_test

ROWS = np.ones((2, 3))
INTS = np.ones((2, 3), dtype=np.int64)


class _Strings:
    """A noise source whose ``random`` gives text, not uniforms."""

    def random(self, size: Any = None) -> str:
        return "abc"


REFUSALS: list[Refusal] = [
    (
        "blind-int-x",
        lambda: blind(INTS, ROWS),
        DTypeError,
        "x must be a floating-point array, got dtype int64",
    ),
    (
        "blind-int-eta",
        lambda: blind(ROWS, INTS),
        DTypeError,
        "eta must be a floating-point array, got dtype int64",
    ),
    (
        "unblind-int-correction",
        lambda: unblind(ROWS, INTS),
        DTypeError,
        "correction must be a floating-point array, got dtype int64",
    ),
    (
        "unlock-scalar-scores",
        lambda: unlock_scores(np.array(1.0), [0], 1),
        ShapeError,
        "the array must have at least one dimension (rows)",
    ),
    (
        "noise-gen-object",
        lambda: laplace_noise((2,), 1.0, object()),  # type: ignore[arg-type]
        ConfigError,
        "gen must have random(size) (a KeyStream or a Generator), got object",
    ),
    (
        "noise-gen-module",
        lambda: laplace_noise((2,), 1.0, np.random),
        ConfigError,
        "gen must have random(size) (a KeyStream or a Generator), got module numpy.random "
        "(global random state)",
    ),
    (
        "noise-gen-gives-text",
        lambda: laplace_noise((2,), 1.0, _Strings()),
        ConfigError,
        "gen.random((2,)) gave str, not uniform floats",
    ),
]

test_transform_refusals_are_whole = refusal_test(REFUSALS)

# the refusal of a β whose largest draw overflows float32 is decided in float64 and cast: the cast's own
# overflow warning must not escape before the ConfigError (a caller running with warnings as errors got a
# RuntimeWarning instead)
test_the_overflow_refusal_does_not_warn_first = refusal_test(
    [
        (
            "noise-beta-too-large-float32",
            lambda: laplace_noise((2,), 1e38, np.random.default_rng(0), np.float32),
            ConfigError,
            "Laplace scale beta = 1e+38 is too large for float32: its noise (up to 36.74·beta) would "
            "overflow to inf",
        )
    ],
    warnings_as_errors=True,
)


def _logits_with_inf() -> np.ndarray:
    y = np.arange(8.0).reshape(4, 2)
    y[1, 0] = np.inf  # row 1 of the encoded order: a real row under π = [1, 3, 0, 2]
    return y


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in-place"])
def test_decode_rows_numpy_tests_finiteness_only_when_named(in_place: bool) -> None:
    """With ``name`` the decode refuses a non-finite entry by that name; without it, it decodes whatever it
    is given (the caller tests elsewhere), on both the copying and the in-place path."""
    perm = [1, 3, 0, 2]
    with pytest.raises(NonFiniteError) as info:
        transforms.decode_rows_numpy(_logits_with_inf(), perm, 3, in_place=in_place, name="logits")
    assert str(info.value) == "logits holds NaN or Inf"
    got = transforms.decode_rows_numpy(_logits_with_inf(), perm, 3, in_place=in_place)
    want = _logits_with_inf()[np.argsort(perm)][:3]
    assert np.array_equal(got, want)


def test_identity_head_permutation_takes_zero_heads_or_zero_width() -> None:
    """``identity`` takes sizes >= 0: zero KV heads, or heads of width 0, give an empty P."""
    none = HeadPermutation.identity(0, 4)
    assert (none.n_kv_heads, none.head_dim) == (0, 4)
    flat = HeadPermutation.identity(2, 0)
    assert (flat.n_kv_heads, flat.head_dim) == (2, 0)
    with pytest.raises(ShapeError, match=r"^n_kv_heads and head_dim must be >= 0, got -1 and 2$"):
        HeadPermutation.identity(-1, 2)


def test_a_permutation_keeps_its_own_copy_and_hands_out_copies() -> None:
    """Building a Permutation leaves the caller's int64 array writable and unshared; ``np.asarray`` of one
    is a fresh writable array (changing it changes nothing), in the dtype asked for."""
    p = np.array([2, 0, 3, 1], dtype=np.int64)
    perm = Permutation(p)
    assert p.flags.writeable and not np.shares_memory(p, perm.forward)
    p[0] = 0
    assert perm.forward.tolist() == [2, 0, 3, 1]
    out = np.asarray(perm)
    assert out.flags.writeable and not np.shares_memory(out, perm.forward)
    out[:] = 0
    assert perm.forward.tolist() == [2, 0, 3, 1]
    assert np.asarray(perm, dtype=np.int32).dtype == np.int32


def test_different_head_permutations_hash_apart() -> None:
    """Equal head permutations hash alike; 20 different ones of one shape do not all share one hash (a
    constant hash would be consistent with ``==`` but put every P of a memo in one bucket)."""
    ks = KeySchedule(bytes(range(1, 33)), bytes(range(16)))
    perms = [
        HeadPermutation(
            ks.permutation(("g", t), 3), np.stack([ks.permutation(("s", t, h), 8) for h in range(3)])
        )
        for t in range(20)
    ]
    assert len(set(perms)) == 20
    again = HeadPermutation(perms[0].group_order.copy(), perms[0].sigmas.copy())
    assert again == perms[0] and hash(again) == hash(perms[0])
    assert len({hash(p) for p in perms}) > 10


def test_the_float32_cast_itself_warns() -> None:
    """Control for the test above: the cast does warn outside the check, so that test can fail."""
    with warnings.catch_warnings(), pytest.raises(RuntimeWarning):
        warnings.simplefilter("error")
        np.float64(1e38 * 36.74).astype(np.float32)


# --- the fused row transforms: every input named in its refusals -------------------------------------------
# (the mutants that *survived* these functions were stopped by mutmut's wall clock, its forked workers
# hanging in threads the parent had started; each was then run in a pytest process of its own)

_S, _Y, _D = np.ones((3, 2)), np.ones((3, 2)), np.ones((1, 2))
_IDS, _PERM4 = [0, 1, 2], [3, 0, 1, 2]


def _with(a: np.ndarray, value: float) -> np.ndarray:
    out: np.ndarray = a.copy()
    out[0, 0] = value
    return out


def _reencode(**changes: Any) -> Any:
    args: dict[str, Any] = {"s": _S, "perm_s": _IDS, "y": _Y, "perm_y": _IDS, "decoys": _D, "perm": _PERM4}
    args.update(changes)
    return transforms.reencode_sum(**args)


def _backend() -> Any:
    from scx_ref.backends import NumpyBackend

    from .tiny import tiny_weights

    return NumpyBackend(tiny_weights(0))


def _qkv(z: Any = None, perm: Any = _IDS, n: int = 2, positions: Any = (0, 1), **kw: Any) -> Any:
    be = _backend()
    c = be.config
    head = kw.pop("head", HeadPermutation.identity(c.n_kv_heads, c.head_dim))
    width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    z = np.ones((3, width)) if z is None else z
    if isinstance(positions, tuple):
        positions = list(positions)
    return transforms.decode_qkv_heads(z, perm, n, positions, head, c.n_heads // c.n_kv_heads, be, **kw)


def _qkv_width() -> int:
    c = _backend().config
    return int((c.n_heads + 2 * c.n_kv_heads) * c.head_dim)


def _head_rows(o: Any = None, decoys: Any = None, perm: Any = _IDS, head: Any = None) -> Any:
    p = HeadPermutation.identity(2, 4) if head is None else head
    o = np.ones((2, 4, 4)) if o is None else o
    decoys = np.ones((1, 16)) if decoys is None else decoys
    return transforms.encode_head_rows(o, p, 2, decoys, perm)


FUSED_REFUSALS: list[Refusal] = [
    # reencode_sum: each input by name, its shapes, its permutations
    (
        "reencode-int-s",
        lambda: _reencode(s=_S.astype(np.int64)),
        DTypeError,
        "s must be a floating-point array, got dtype int64",
    ),
    (
        "reencode-int-y",
        lambda: _reencode(y=_Y.astype(np.int64)),
        DTypeError,
        "y must be a floating-point array, got dtype int64",
    ),
    (
        "reencode-int-decoys",
        lambda: _reencode(decoys=_D.astype(np.int64)),
        DTypeError,
        "decoys must be a floating-point array, got dtype int64",
    ),
    (
        "reencode-inf-s",
        lambda: _reencode(s=_with(_S, np.inf)),
        NonFiniteError,
        "reencoded sum holds NaN or Inf",
    ),
    (
        "reencode-nan-y",
        lambda: _reencode(y=_with(_Y, np.nan)),
        NonFiniteError,
        "reencoded sum holds NaN or Inf",
    ),
    (
        "reencode-inf-decoys",
        lambda: _reencode(decoys=_with(_D, np.inf)),
        NonFiniteError,
        "reencoded sum holds NaN or Inf",
    ),
    (
        "reencode-3d-s",
        lambda: _reencode(s=np.ones((3, 2, 1))),
        ShapeError,
        "s ((3, 2, 1)), y ((3, 2)) and decoys ((1, 2)) must be 2-D with the same width",
    ),
    (
        "reencode-3d-y",
        lambda: _reencode(y=np.ones((3, 2, 1))),
        ShapeError,
        "s ((3, 2)), y ((3, 2, 1)) and decoys ((1, 2)) must be 2-D with the same width",
    ),
    (
        "reencode-3d-decoys",
        lambda: _reencode(decoys=np.ones((1, 2, 1))),
        ShapeError,
        "s ((3, 2)), y ((3, 2)) and decoys ((1, 2, 1)) must be 2-D with the same width",
    ),
    (
        "reencode-decoy-width",
        lambda: _reencode(decoys=np.ones((1, 3))),
        ShapeError,
        "s ((3, 2)), y ((3, 2)) and decoys ((1, 3)) must be 2-D with the same width",
    ),
    (
        "reencode-perm-not-a-permutation",
        lambda: _reencode(perm=[0, 0, 1, 2]),
        PermutationError,
        "perm is not a permutation of 0..3",
    ),
    (
        "reencode-too-few-rows",
        lambda: _reencode(perm=[3, 0, 1, 2, 4]),
        ShapeError,
        "5 rows with 1 decoys: s and y need at least 4 rows",
    ),
    # s of 2 rows but 3 columns, y of 3: the rows of s are too few (not its width)
    (
        "reencode-s-rows-too-few",
        lambda: _reencode(s=np.ones((2, 3)), perm_s=[0, 1], y=np.ones((3, 3)), decoys=np.ones((1, 3))),
        ShapeError,
        "4 rows with 1 decoys: s and y need at least 3 rows",
    ),
    (
        "reencode-y-rows-too-few",
        lambda: _reencode(s=np.ones((3, 3)), y=np.ones((2, 3)), perm_y=[0, 1], decoys=np.ones((1, 3))),
        ShapeError,
        "4 rows with 1 decoys: s and y need at least 3 rows",
    ),
    (
        "reencode-perm-s-length",
        lambda: _reencode(perm_s=[0, 1]),
        PermutationError,
        "perm_s must have length 3, got 2",
    ),
    (
        "reencode-perm-y-length",
        lambda: _reencode(perm_y=[0, 1]),
        PermutationError,
        "perm_y must have length 3, got 2",
    ),
    (
        "reencode-perm-s-object-length",
        lambda: _reencode(perm_s=Permutation([0, 1])),
        PermutationError,
        "perm_s must have length 3, got 2",
    ),
    # encode_head_rows
    (
        "head-rows-int-o",
        lambda: _head_rows(o=np.ones((2, 4, 4), dtype=np.int64)),
        DTypeError,
        "o must be a floating-point array, got dtype int64",
    ),
    (
        "head-rows-int-decoys",
        lambda: _head_rows(decoys=np.ones((1, 16), dtype=np.int64)),
        DTypeError,
        "decoys must be a floating-point array, got dtype int64",
    ),
    (
        "head-rows-nan-o",
        lambda: _head_rows(o=np.full((2, 4, 4), np.nan)),
        NonFiniteError,
        "o and decoys holds NaN or Inf",
    ),
    (
        "head-rows-perm-length",
        lambda: _head_rows(perm=[0, 1]),
        PermutationError,
        "perm must have length 3, got 2",
    ),
    (
        "head-rows-perm-object-length",
        lambda: _head_rows(perm=Permutation([0, 1])),
        PermutationError,
        "perm must have length 3, got 2",
    ),
    (
        "head-rows-not-a-head",
        lambda: _head_rows(head="P"),
        SCXError,
        "head must be a HeadPermutation, got str",
    ),
    # decode_qkv_heads
    (
        "qkv-int-z",
        lambda: _qkv(z=np.ones((3, _qkv_width()), dtype=np.int64)),
        DTypeError,
        "z must be a floating-point array, got dtype int64",
    ),
    ("qkv-perm-length", lambda: _qkv(perm=[0, 1]), PermutationError, "perm must have length 3, got 2"),
    (
        "qkv-inf-named",
        lambda: _qkv(z=_with(np.ones((3, _qkv_width())), np.inf), name="qkv reply"),
        NonFiniteError,
        "qkv reply holds NaN or Inf in float64",
    ),
    ("qkv-not-a-head", lambda: _qkv(head=3), SCXError, "head must be a HeadPermutation, got int"),
    (
        "qkv-later-position-negative",
        lambda: _qkv(positions=(0, -1)),
        ShapeError,
        "positions must be >= 0, got -1",
    ),
    (
        "qkv-positions-ragged",
        lambda: _qkv(positions=[[0], [1, 2]]),
        ShapeError,
        "positions must be a rectangular array, got nested sequences of different lengths",
    ),
    # the shared helpers, through their callers
    (
        "decode-0d-rows",
        lambda: transforms.decode_rows(np.array(1.0), [0], 0),
        ShapeError,
        "the array must have at least one dimension (rows)",
    ),
    (
        "decode-perm-object-length",
        lambda: transforms.decode_rows(np.ones((3, 2)), Permutation([0, 1]), 1),
        PermutationError,
        "perm must have length 3, got 2",
    ),
    (
        "stacked-sizes-int",
        lambda: transforms.head_permute_stacked(
            np.ones((1, 2, 2)),
            HeadPermutation.identity(1, 2),
            5,  # type: ignore[arg-type]
        ),
        ShapeError,
        "group_sizes must be a tuple of integers, got int",
    ),
]

test_fused_refusals_are_whole = refusal_test(FUSED_REFUSALS)


def test_decode_qkv_heads_takes_positions_of_any_shape_and_no_name_tests_nothing() -> None:
    """Positions are read flat (a (1, n) array is n positions), and without ``name`` a non-finite reply
    is decoded, not refused (the caller tests it elsewhere; with a name it is refused, above)."""
    flat = _qkv()
    for got, want in zip(_qkv(positions=np.array([[0, 1]])), flat, strict=True):
        assert np.array_equal(got, want)
    with np.errstate(invalid="ignore"):  # RoPE of inf: inf·0 is NaN
        q_k, v = _qkv(z=_with(np.ones((3, _qkv_width())), np.inf))
    assert not np.isfinite(q_k).all() and np.isfinite(v).all()


def test_a_head_permutation_of_group_size_zero_has_an_empty_index() -> None:
    """``flat_index`` takes group sizes >= 0: size 0 is the empty index (no heads in that block)."""
    p = HeadPermutation.identity(2, 3)
    assert p.flat_index(0).shape == (0,) and p.flat_index(0, inverse=True).shape == (0,)

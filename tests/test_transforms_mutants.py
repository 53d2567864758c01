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
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
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

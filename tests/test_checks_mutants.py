"""Tests that kill mutants of :mod:`scx_ref._checks` that survived ``python -m mutation.run checks``
(mutation/REPORT_checks.md): each checks a documented property of the shared argument checks — the class
each refusal raises, its whole message, and the value each returns."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref._checks import (
    as_float_array,
    check_int,
    check_permutation,
    check_real,
    float_dtype,
    short_repr,
    token_ids,
)
from scx_ref.errors import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    PermutationError,
    ProtocolError,
    ShapeError,
    VocabularyError,
)
from tests.accelerator import OnAccelerator
from tests.refusals import refused


@pytest.mark.parametrize(
    ("value", "lo", "hi", "message"),
    [
        (2.5, 0, None, "n must be an integer, got float 2.5"),
        (True, 0, None, "n must be an integer, got bool True"),
        (np.bool_(True), 0, None, "n must be an integer, got bool np.True_"),
        (np.array([1]), 0, None, "n must be an integer, got ndarray array([1])"),
        (6, 0, 5, "n must lie in [0, 5], got 6"),
        (-1, 0, 5, "n must lie in [0, 5], got -1"),
        (0, 1, None, "n must be >= 1, got 0"),
        (6, None, 5, "n must be <= 5, got 6"),
        (2**70, 0, 5, "n must lie in [0, 5], got an integer of 71 bits"),
    ],
    ids=["float", "bool", "numpy-bool", "array", "above", "below", "lo-only", "hi-only", "huge"],
)
def test_check_int_refuses_with_the_documented_message(value: Any, lo: Any, hi: Any, message: str) -> None:
    with refused(ProtocolError, message):
        check_int(value, "n", lo, hi, error=ProtocolError)
    with refused(ConfigError, message):
        check_int(value, "n", lo, hi)


@pytest.mark.parametrize(
    "value", [0, 5, np.int64(3), np.uint8(5), np.array(4)], ids=["0", "5", "int64", "uint8", "0-d"]
)
def test_check_int_returns_a_python_int_within_the_bounds(value: Any) -> None:
    out = check_int(value, "n", 0, 5)
    assert type(out) is int and out == int(value)


class _Index:
    """An integer that is neither int nor numpy: it has ``__index__`` and no ``ndim``."""

    def __index__(self) -> int:
        return 3


def test_check_int_takes_anything_with_index() -> None:
    assert check_int(_Index(), "n") == 3


def test_short_repr_shortens_past_64_bits_and_60_characters() -> None:
    """A huge integer by its bit length (past 64 bits), anything else cut at 60 characters."""
    assert short_repr(2**64) == "an integer of 65 bits"
    assert short_repr(2**64 - 1) == "18446744073709551615"
    assert short_repr("a" * 58) == "'" + "a" * 58 + "'"  # 60 characters: kept
    assert short_repr("a" * 59) == "'" + "a" * 56 + "..."  # 61: cut to 57 and "..."


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"lo": 0, "hi": 1, "hi_open": True}, 1.0, "x must lie in [0, 1), got 1.0"),
        ({"lo": 0, "hi": 1, "lo_open": True}, 0.0, "x must lie in (0, 1], got 0.0"),
        ({"lo": 0, "hi": 2.0**53}, -1.0, "x must lie in [0, 9007199254740992.0], got -1.0"),
        ({"lo": 0, "hi": 2.0**53 - 1}, -1.0, "x must lie in [0, 9007199254740991], got -1.0"),
        ({"lo": 0, "hi": 200.0}, 201.0, "x must lie in [0, 200], got 201.0"),
        ({"lo": 0, "hi": 1, "hi_open": True}, float("nan"), "x must be finite and in [0, 1), got nan"),
        ({"allow_inf": True}, float("nan"), "x must be a number (inf allowed), got nan"),
        ({"lo": 0, "allow_inf": True}, float("nan"), "x must be a number >= 0 (inf allowed), got nan"),
    ],
    ids=[
        "hi-open",
        "lo-open",
        "bound-2**53",
        "bound-below-2**53",
        "bound-200",
        "nan-in-range",
        "nan-inf",
        "nan-inf-lo",
    ],
)
def test_check_real_messages_write_each_bound_and_end(
    kwargs: dict[str, Any], value: float, message: str
) -> None:
    """Bounds as integers up to 2⁵³ (``0``, ``200``), as floats from there; an open end by its bracket."""
    with refused(ConfigError, message):
        check_real(value, "x", **kwargs)


def test_as_float_array_checks_dtype_rank_and_finiteness() -> None:
    x = np.arange(3.0, dtype=np.float32)
    assert as_float_array(x, "x", ndim=1) is x
    with pytest.raises(DTypeError, match=r"^x must be a floating-point array, got dtype int64$"):
        as_float_array(np.array([1, 2], dtype=np.int64), "x")
    with pytest.raises(ShapeError, match=r"^x must have 1 dimensions, got shape \(2, 2\)$"):
        as_float_array(np.zeros((2, 2)), "x", ndim=1)
    with pytest.raises(NonFiniteError, match=r"^x holds NaN or Inf$"):
        as_float_array(np.array([np.nan]), "x")
    assert np.isnan(as_float_array(np.array([np.nan]), "x", allow_nonfinite=True)[0])


def test_check_permutation_returns_int64_and_names_each_fault() -> None:
    out = check_permutation(np.array([1, 0], dtype=np.int32))
    assert out.dtype == np.int64 and out.tolist() == [1, 0]
    cases: list[tuple[tuple[Any, ...], str]] = [
        (([[0]],), "permutation must be one-dimensional, got shape (1, 1)"),
        (([0.0, 1.0],), "permutation must hold integers, got dtype float64"),
        (([0, 1], 3), "permutation must have length 3, got 2"),
        (([0, 2],), "permutation is not a permutation of 0..1"),
        (([0, 2, 2], None, "π"), "π is not a permutation of 0..2"),
    ]
    for args, message in cases:
        with refused(PermutationError, message):
            check_permutation(*args)


def test_float_dtype_takes_floating_dtypes_and_names_the_rest() -> None:
    assert float_dtype("float32") == np.float32 and float_dtype(np.float16) == np.float16
    for bad, message in (
        ("bogus", "dtype must be a floating numpy dtype, got 'bogus'"),
        (np.int32, "dtype must be a floating numpy dtype, got int32"),
        (None, "dtype must be a floating numpy dtype, got None"),
    ):
        with refused(DTypeError, message):
            float_dtype(bad)


def test_token_ids_reads_a_tensor_on_any_device() -> None:
    assert token_ids(OnAccelerator(torch.tensor([4, 1]))).tolist() == [4, 1]


def test_token_ids_refuses_with_the_documented_class_and_message() -> None:
    cases: list[tuple[Any, type[Exception], str]] = [
        ([[1]], VocabularyError, "token ids must be a 1-D integer array, got list of shape (1, 1)"),
        ([], ProtocolError, "no token ids: at least one token is needed"),
        ([1.0], VocabularyError, "token ids must be integers, got dtype float64"),
        ([5], VocabularyError, "token ids must lie in [0, 5), got range [5, 5]"),
    ]
    for ids, error, message in cases:
        with refused(error, message):
            token_ids(ids, 5)
    with pytest.raises(
        VocabularyError, match=r"^token ids must be a 1-D integer array: setting an array element"
    ):
        token_ids([[1], [1, 2]])

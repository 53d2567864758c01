"""The shared argument checks of ``scx_ref._checks``: one integer check (``check_int``) every module
calls with its own error class, and the permutation check's refusal of what numpy cannot read."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref._checks import check_int, check_permutation, short_repr
from scx_ref.errors import ConfigError, KeyScheduleError, PermutationError, ProtocolError, ShapeError


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), torch.tensor(3)])
def test_integers_of_any_kind_are_taken_as_int(value: Any) -> None:
    got = check_int(value, "n")
    assert got == 3 and type(got) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "n must be an integer, got bool True"),  # a bool is not a count
        (np.True_, "n must be an integer, got bool np.True_"),
        (2.0, "n must be an integer, got float 2.0"),  # never truncated
        ("3", "n must be an integer, got str '3'"),
        (None, "n must be an integer, got NoneType None"),
        (-1, "n must be >= 0, got -1"),
    ],
)
def test_what_is_not_a_count_is_refused_with_its_type(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_int(value, "n")
    assert str(info.value) == message


def test_bounds_and_error_classes() -> None:
    assert check_int(-5, "layer", None) == -5  # no lower bound
    assert check_int(5, "layer", 0, 5) == 5  # hi is inclusive
    with pytest.raises(ProtocolError, match=r"^layer must lie in \[0, 5\], got 6$"):
        check_int(6, "layer", 0, 5, error=ProtocolError)
    with pytest.raises(ShapeError, match=r"^n must be <= 2, got 3$"):
        check_int(3, "n", None, 2, error=ShapeError)
    with pytest.raises(KeyScheduleError):
        check_int(1.5, "size", error=KeyScheduleError)


def test_a_huge_integer_is_reported_by_its_size() -> None:
    """Python refuses to print an int of more than 4300 digits: the message gives its bit length."""
    with pytest.raises(ConfigError, match="an integer of 16610 bits"):
        check_int(10**5000, "n", 0, 10)
    assert short_repr("x" * 100).endswith("...") and len(short_repr("x" * 100)) == 60


@pytest.mark.parametrize(
    "perm", [torch.arange(4, dtype=torch.bfloat16), [[0], [1, 2]]], ids=["bf16", "ragged"]
)
def test_a_permutation_numpy_cannot_read_is_a_permutation_error(perm: Any) -> None:
    with pytest.raises(PermutationError, match="not an array numpy can read"):
        check_permutation(perm)

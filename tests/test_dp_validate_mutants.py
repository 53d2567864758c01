"""Tests added for mutants of :mod:`scx_ref.dp._validate` that survived ``python -m mutation.run dp_validate``
(mutation/REPORT_dp_validate.md): each checks a documented property of the DP module's scalar checks."""

from __future__ import annotations

import math

import pytest

from scx_ref.dp._validate import check_count, quotient_up
from scx_ref.errors import NonFiniteError


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_check_count_names_the_count_and_the_value_of_a_non_finite_float(value: float) -> None:
    with pytest.raises(NonFiniteError) as info:
        check_count(value, "compositions")
    assert str(info.value) == f"compositions must be a finite integer, got {value!r}"


def test_quotient_up_below_the_range_is_the_smallest_positive_float() -> None:
    """A positive quotient that rounds to 0 is reported as 5e-324, the least upper bound float64 holds —
    not a larger one (ulp(1) would overstate the loss by 2^1022)."""
    assert 5e-324 / 1e300 == 0.0  # the case: the exact quotient is positive
    got = quotient_up(5e-324, 1e300)
    assert got == 5e-324 == math.ulp(0.0)
    assert quotient_up(0.0, 1e300) == 0.0  # an output that does not depend on the input stays 0
    assert quotient_up(1.0, 4.0) == 0.25

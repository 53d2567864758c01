"""Scalar input checks for :mod:`scx_ref.dp`; each raises a subclass of :class:`~scx_ref.errors.SCXError`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .._checks import check_int, check_real
from ..errors import NonFiniteError

__all__ = [
    "check_count",
    "check_delta",
    "check_nonnegative",
    "check_positive",
    "count_as_float",
    "quotient_up",
    "sum_nonnegative",
    "times",
]


def check_positive(value: Any, name: str) -> float:
    """Return ``value`` as a float after checking it is a real number (not a bool), finite and > 0:
    NonFiniteError for NaN, ±Inf or a number past float64, else ConfigError
    (:func:`~scx_ref._checks.check_real`)."""
    return check_real(value, name, 0, lo_open=True, nonfinite_error=NonFiniteError)


def check_nonnegative(value: Any, name: str, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float after checking it is a real number (not a bool), finite (or +inf with
    ``allow_inf``) and >= 0 (errors as :func:`check_positive`); -0.0 is returned as 0.0."""
    return check_real(value, name, 0, allow_inf=allow_inf, nonfinite_error=NonFiniteError) + 0.0


def check_delta(value: Any, name: str = "delta") -> float:
    """Return ``value`` as a float after checking it is a real number with 0 < value < 1 (errors as
    :func:`check_positive`)."""
    return check_real(value, name, 0, 1, lo_open=True, hi_open=True, nonfinite_error=NonFiniteError)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int after checking it is an integer >= ``minimum`` (NonFiniteError for a
    non-finite float, else :func:`~scx_ref._checks.check_int`'s ConfigError)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteError(f"{name} must be a finite integer, got {value!r}")
    return check_int(value, name, minimum)


def count_as_float(count: int) -> float:
    """``float(count)`` for a non-negative integer count; +inf when it exceeds the float64 range."""
    try:
        return float(count)
    except OverflowError:
        return math.inf


def times(count: int, value: float) -> float:
    """``count · value`` for a count ≥ 0 and a value ≥ 0, in float64: +inf on overflow, 0 when either is 0."""
    if count == 0 or value == 0.0:
        return 0.0
    return count_as_float(count) * value


def quotient_up(num: float, den: float) -> float:
    """``num / den`` for num >= 0 and den > 0 (a privacy loss such as Δ₁/β): never 0 unless num is 0.

    A positive quotient below the float64 range would round to 0.0, which reads as "the output does not
    depend on the input"; it is reported as the smallest positive float instead (still an upper bound).
    """
    q = num / den
    return math.ulp(0.0) if q == 0.0 and num > 0.0 else q


def sum_nonnegative(values: Iterable[float]) -> float:
    """``math.fsum`` of non-negative values (+inf allowed); +inf when the sum exceeds the float64 range."""
    try:
        return math.fsum(values)
    except OverflowError:  # intermediate overflow: every term is >= 0, so the sum is beyond the range
        return math.inf

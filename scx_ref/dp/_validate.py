"""Scalar input checks for :mod:`scx_ref.dp`; each raises a subclass of :class:`~scx_ref.errors.SCXError`."""

from __future__ import annotations

import math
import numbers
from typing import Any

from ..errors import ConfigError, NonFiniteError

__all__ = ["check_count", "check_delta", "check_nonnegative", "check_positive"]


def _as_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteError(f"{name} must be finite, got {value!r}")
    return out


def check_positive(value: Any, name: str) -> float:
    """Return ``value`` as a float after checking it is finite and > 0."""
    out = _as_real(value, name)
    if out <= 0.0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return out


def check_nonnegative(value: Any, name: str) -> float:
    """Return ``value`` as a float after checking it is finite and >= 0."""
    out = _as_real(value, name)
    if out < 0.0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return out


def check_delta(value: Any, name: str = "delta") -> float:
    """Return ``value`` as a float after checking 0 < value < 1."""
    out = _as_real(value, name)
    if not 0.0 < out < 1.0:
        raise ConfigError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return out


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{name} must be a finite integer, got {value!r}")
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    out = int(value)
    if out < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return out

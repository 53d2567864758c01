"""Tests that kill mutants of :mod:`scx_ref.dp.mechanisms` that survived ``python -m mutation.run
dp_mechanisms`` (``mutation/annotations.toml`` names each).

The tests of the mechanisms matched the refusal of a Laplace scale below the float64 range by a part of its
message, and never built a mechanism of zero releases."""

from __future__ import annotations

from scx_ref.dp.mechanisms import LaplaceMechanism, laplace_scale_for_epsilon
from scx_ref.errors import ConfigError

from .refusals import Refusal, refusal_test

REFUSALS: list[Refusal] = [
    (
        "scale-below-float64",
        lambda: laplace_scale_for_epsilon(1e-300, 1e300),
        ConfigError,
        "the Laplace scale for sensitivity 1e-300 and epsilon 1e+300 is below the float64 range "
        "(it would round to 0: no noise)",
    ),
    # a mechanism of no releases would compose to ε = 0 whatever its scale
    (
        "mechanism-count-zero",
        lambda: LaplaceMechanism(1.0, 1.0, count=0),
        ConfigError,
        "count must be >= 1, got 0",
    ),
    (
        "mechanism-count-negative",
        lambda: LaplaceMechanism(1.0, 1.0, count=-1),
        ConfigError,
        "count must be >= 1, got -1",
    ),
]

test_mechanism_refusals_are_whole = refusal_test(REFUSALS)


def test_one_release_is_the_smallest_count() -> None:
    """``count = 1`` (the default) is a valid mechanism: one release, ε = Δ₁ / β."""
    assert LaplaceMechanism(1.0, 4.0).count == 1
    assert LaplaceMechanism(1.0, 4.0, count=1).epsilon == 0.25

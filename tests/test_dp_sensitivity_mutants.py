"""Tests that kill mutants of :mod:`scx_ref.dp.sensitivity` (the L1 sensitivities the DP budgets rest on)
that survived ``python -m mutation.run dp_sensitivity`` (mutation/REPORT_dp_sensitivity.md)."""

from __future__ import annotations

import math

import numpy as np

from scx_ref.dp import sensitivity as sens


def test_rmsnorm_bounds_of_a_hand_computed_gamma() -> None:
    """γ = (3, −4): ‖γ‖∞ = 4, ‖γ‖₂ = 5, d = 2."""
    g = np.array([3.0, -4.0])
    assert sens.rmsnorm_l2_bound(g) == math.sqrt(2) * 4.0
    assert sens.rmsnorm_l1_bound(g) == math.sqrt(2) * 5.0
    assert sens.rmsnorm_sensitivity(g) == 2.0 * math.sqrt(2) * 5.0

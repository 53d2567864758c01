"""Laplace mechanism (DESIGN.md §7, T6): releasing a + Lap(β)^d is ε-DP with ε = ‖a − a′‖₁ / β.

With p(z | a) = Π_i exp(−|z_i − a_i| / β) / (2β):

1. p(z | a) / p(z | a′) = exp(Σ_i (|z_i − a′_i| − |z_i − a_i|) / β) exactly (symbolic, d = 3).
2. Per coordinate |z − a′| − |z − a| ≤ |a − a′| (triangle inequality), by a case split over every order
   of z, a, a′ and 0.
3. Summing, the log-ratio is at most Σ_i |a_i − a′_i| / β; the claimed bound B(a, a′)/β must dominate
   the ℓ1 distance (case split over every order of the coordinates, d = 2).
4. Tightness: z ≤ a ≤ a′ (coordinate-wise) attains the ℓ1 bound with equality, so the claim must
   not undercut it.

Negative controls, through the same checker: the per-coordinate reading ε = ‖a − a′‖∞ / β (the paper's
Δf, not a DP guarantee for d ≥ 2), and a bound of half the ℓ1 distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

from proofs._registry import identity
from proofs._sym import is_zero, nonnegative_on_every_ordering

Bound = Callable[[Sequence[sp.Expr], Sequence[sp.Expr]], sp.Expr]

_BETA = sp.Symbol("beta", positive=True)


def _density(z: Sequence[sp.Expr], a: Sequence[sp.Expr]) -> sp.Expr:
    return sp.Mul(*[sp.exp(-sp.Abs(zi - ai) / _BETA) / (2 * _BETA) for zi, ai in zip(z, a, strict=True)])


def _step_ratio() -> bool:
    z = sp.symbols("z0:3", real=True)
    a = sp.symbols("a0:3", real=True)
    a2 = sp.symbols("b0:3", real=True)
    ratio = _density(z, a) / _density(z, a2)
    exponent = (
        sp.Add(*[sp.Abs(zi - bi) - sp.Abs(zi - ai) for zi, ai, bi in zip(z, a, a2, strict=True)]) / _BETA
    )
    return is_zero(sp.powsimp(ratio) - sp.exp(exponent))


def _step_per_coordinate() -> bool:
    z, a, a2 = sp.symbols("z a b", real=True)
    return nonnegative_on_every_ordering(sp.Abs(a - a2) - (sp.Abs(z - a2) - sp.Abs(z - a)), [z, a, a2])


def _step_sum(bound: Bound) -> bool:
    a = sp.symbols("a0:2", real=True)
    a2 = sp.symbols("b0:2", real=True)
    l1 = sp.Add(*[sp.Abs(u - v) for u, v in zip(a, a2, strict=True)])
    return nonnegative_on_every_ordering(bound(a, a2) - l1, [*a, *a2])


def _step_tight(bound: Bound) -> bool:
    a = [sp.Integer(0), sp.Integer(0)]
    a2 = [sp.Integer(1), sp.Integer(2)]
    z = [sp.Integer(-5), sp.Integer(-5)]
    log_ratio = sp.log(_density(z, a) / _density(z, a2))
    return sp.simplify(bound(a, a2) / _BETA - log_ratio).is_nonnegative is True


def check_laplace(bound: Bound) -> bool:
    """Prove p(z | a) / p(z | a′) ≤ exp(bound(a, a′) / β) for all z, a, a′ step by step."""
    return _step_ratio() and _step_per_coordinate() and _step_sum(bound) and _step_tight(bound)


def l1_distance(a: Sequence[sp.Expr], a2: Sequence[sp.Expr]) -> sp.Expr:
    """‖a − a′‖₁ (the correct bound)."""
    return sp.Add(*[sp.Abs(u - v) for u, v in zip(a, a2, strict=True)])


def linf_distance(a: Sequence[sp.Expr], a2: Sequence[sp.Expr]) -> sp.Expr:
    """‖a − a′‖∞ (the per-coordinate reading)."""
    return sp.Max(*[sp.Abs(u - v) for u, v in zip(a, a2, strict=True)])


@identity(
    "laplace.density_ratio",
    "ratio for d = 3; per-coordinate step for all reals (case split); sum step for d = 2",
    negative_controls=[
        ("ε = ‖a − a′‖∞ / β (per-coordinate reading)", lambda: check_laplace(linf_distance)),
        ("ε = ‖a − a′‖₁ / (2β)", lambda: check_laplace(lambda a, b: l1_distance(a, b) / 2)),
    ],
)
def density_ratio() -> bool:
    """p(z | a) / p(z | a′) ≤ exp(‖a − a′‖₁ / β)."""
    return check_laplace(l1_distance)

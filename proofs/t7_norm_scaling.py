"""T7, norm scaling — a claim of the paper to check (DESIGN.md §4, §5.3).

RMSNorm_ε(x) = γ ⊙ x / sqrt(mean(x²) + ε).

1. Scaling rule (proved): RMSNorm_ε(c·x) = RMSNorm_{ε/c²}(x) for every c > 0, symbolic x, γ, ε ≥ 0,
   d = 1..4; hence RMSNorm_0(c·x) = RMSNorm_0(x): scaling invariance holds at ε = 0.
2. The paper's claim (its Lemma 1, fourth round: the norm is invariant under scaling and, after adding a
   constant, still gives the same output) is false: an exact witness shows RMSNorm_ε(c·x) ≠ RMSNorm_ε(x)
   for ε = 1/100 > 0, c = 2; and another shows RMSNorm(x + α) ≠ RMSNorm(x) for α = 1, even at ε = 0.
   Reported as a proved counterexample.

Negative controls, through the same checkers: the rule with ε/c instead of ε/c²; the rule with ε unchanged
(the paper's invariance) at symbolic ε; the counterexample search at ε = 0 (where invariance does hold)
and the shift counterexample at α = 0 — each must find nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import is_zero, nonzero_at_random_point, rmsnorm_row

EpsMap = Callable[[sp.Expr, sp.Expr], sp.Expr]

_C = sp.Symbol("c", positive=True)
_EPS = sp.Symbol("epsilon", positive=True)
_DIMS = range(1, 5)
_TWO = sp.Integer(2)


def rms_norm(x: sp.Matrix, gamma: sp.Matrix, eps: sp.Expr) -> sp.Matrix:
    """RMSNorm_ε of every row: γ ⊙ x / sqrt(mean(x²) + ε) (``scx_ref.ops.rms_norm``)."""
    g = list(gamma)
    return sp.Matrix([rmsnorm_row(list(x.row(i)), g, eps) for i in range(x.rows)])


#: The library function T7's statements are about, with the row map the checkers use.
IMPLEMENTS = (Implementation("scx_ref.ops.rms_norm", rms_norm),)


def _norm(row: list[sp.Expr], gamma: list[sp.Expr], eps: sp.Expr) -> list[sp.Expr]:
    """One row through :func:`rms_norm`: the checkers evaluate the very statement that
    ``tests/test_proof_links.py`` holds ``scx_ref.ops.rms_norm`` to."""
    return list(rms_norm(sp.Matrix([row]), sp.Matrix(gamma), eps))


def check_scaling_rule(eps_map: EpsMap, eps: sp.Expr = _EPS) -> bool:
    """RMSNorm_eps(c·x) == RMSNorm_{eps_map(eps, c)}(x) for symbolic x, γ, c > 0 and every d in 1..4.

    Both sides are γ_i x_i times a scale factor: the check proves the squared denominators agree,
    (c² m + eps)/c² = m + eps_map(eps, c) with m = mean(x²), and that the two factors are positive with
    equal squares, hence equal (x is nonzero, so rms(x) > 0 even at eps = 0).
    """
    for d in _DIMS:
        x = list(sp.symbols(f"x0:{d}", real=True, nonzero=True))
        gamma = list(sp.symbols(f"g0:{d}", real=True, nonzero=True))
        lhs = _norm([_C * v for v in x], gamma, eps)
        rhs = _norm(x, gamma, eps_map(eps, _C))
        mean_sq = sp.Add(*[v**2 for v in x]) / d
        if not is_zero((_C**2 * mean_sq + eps) / _C**2 - (mean_sq + eps_map(eps, _C))):
            return False
        for a, b, g, v in zip(lhs, rhs, gamma, x, strict=True):
            fa, fb = sp.cancel(a / (g * v)), sp.cancel(b / (g * v))
            if not (fa.is_positive and fb.is_positive and is_zero(fa**2 - fb**2)):
                return False
    return True


def _witness_x() -> list[sp.Expr]:
    return [sp.Integer(1), sp.Integer(2), sp.Integer(3)]


def find_scaling_counterexample(eps: sp.Expr, c: sp.Expr = _TWO) -> bool:
    """True iff RMSNorm_eps(c·x) − RMSNorm_eps(x) is provably nonzero at x = (1, 2, 3), symbolic γ."""
    gamma = list(sp.symbols("g0:3", positive=True))
    x = _witness_x()
    scaled = _norm([c * v for v in x], gamma, eps)
    plain = _norm(x, gamma, eps)
    return any(
        nonzero_at_random_point(a - b, seed=i) for i, (a, b) in enumerate(zip(scaled, plain, strict=True))
    )


def find_shift_counterexample(alpha: sp.Expr, eps: sp.Expr = sp.S.Zero) -> bool:
    """True iff RMSNorm_eps(x + α) − RMSNorm_eps(x) is provably nonzero at x = (1, 2, 3), symbolic γ."""
    gamma = list(sp.symbols("g0:3", positive=True))
    x = _witness_x()
    shifted = _norm([v + alpha for v in x], gamma, eps)
    plain = _norm(x, gamma, eps)
    return any(
        nonzero_at_random_point(a - b, seed=i) for i, (a, b) in enumerate(zip(shifted, plain, strict=True))
    )


def eps_over_c_squared(eps: sp.Expr, c: sp.Expr) -> sp.Expr:
    """The correct rule ε ↦ ε / c²."""
    return eps / c**2


def eps_unchanged(eps: sp.Expr, _c: sp.Expr) -> sp.Expr:
    """The paper's invariance: ε unchanged."""
    return eps


@identity(
    "t7.scaling_rule",
    "symbolic x, γ, ε, c > 0; d = 1..4; and invariance at ε = 0",
    implements=IMPLEMENTS,
    negative_controls=[
        ("rule with ε/c instead of ε/c²", lambda: check_scaling_rule(lambda e, c: e / c)),
        ("paper's invariance at symbolic ε > 0", lambda: check_scaling_rule(eps_unchanged)),
    ],
)
def scaling_rule() -> bool:
    """RMSNorm_ε(c·x) = RMSNorm_{ε/c²}(x), and RMSNorm_0(c·x) = RMSNorm_0(x)."""
    return check_scaling_rule(eps_over_c_squared) and check_scaling_rule(eps_unchanged, sp.Integer(0))


@identity(
    "t7.paper_claim",
    "exact witnesses: ε = 1/100, c = 2 and α = 1 at x = (1, 2, 3), symbolic γ",
    implements=IMPLEMENTS,
    negative_controls=[
        ("scaling counterexample search at ε = 0", lambda: find_scaling_counterexample(sp.Integer(0))),
        ("shift counterexample search at α = 0", lambda: find_shift_counterexample(sp.Integer(0))),
    ],
    proved_label="COUNTEREXAMPLE PROVED (paper claim false for eps>0)",
)
def paper_claim() -> bool:
    """RMSNorm_ε(c·x) ≠ RMSNorm_ε(x) for ε > 0, and RMSNorm(x + α) ≠ RMSNorm(x)."""
    return find_scaling_counterexample(sp.Rational(1, 100)) and find_shift_counterexample(sp.Integer(1))

"""L1 sensitivity of a normalized row (DESIGN.md §7): for y = γ ⊙ x / rms(x) with eps = 0,

    ‖y‖₁ ≤ √d·‖γ‖₂,   hence   Δ₁ = ‖y − y′‖₁ ≤ 2·√d·‖γ‖₂.

Checked certificate of each step:

1. ‖y‖₁ = Σ|γ_i||x_i| / rms(x) (rms > 0), symbolic, for d = 1..6.
2. Cauchy–Schwarz Σ|γ_i||x_i| ≤ ‖γ‖₂‖x‖₂: the Lagrange identity
   (Σa_i²)(Σb_i²) − (Σa_ib_i)² = Σ_{i<j}(a_ib_j − a_jb_i)² (a sum of squares, hence ≥ 0), for d = 1..6.
3. ‖x‖₂ / rms(x) = √d exactly, for symbolic d (and explicitly for d = 1..6).
4. The claimed constant C satisfies √d ≤ C (symbolic d > 0).
5. Triangle inequality |u − v| ≤ |u| + |v| by a case split on the order of u, v, 0; so Δ₁ ≤ ‖y‖₁ + ‖y′‖₁
   ≤ 2C‖γ‖₂, and the claimed Δ₁ constant K satisfies 2C ≤ K.
6. Tightness: x = γ = 1, x′ = −x attains ‖y‖₁ = √d‖γ‖₂ and Δ₁ = 2√d‖γ‖₂ (d = 1..6), so the claimed
   constant and the claimed bound must not undercut it.
7. The claimed Δ₁ bound as a function of the gains — :func:`rmsnorm_sensitivity`, the statement
   ``tests/test_proof_links.py`` holds ``scx_ref.dp.sensitivity.rmsnorm_sensitivity`` to — is at least
   K·‖γ‖₂ for symbolic real γ, d = 1..6 (and it is what step 6 evaluates).

Negative controls, through the same checker: C = √d/2 (a wrong sensitivity constant), K = √d (the factor 2
of the triangle inequality dropped), and a bound function √d‖γ‖₂ (the factor 2 dropped from the code's
statement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import is_zero, nonnegative_on_every_ordering

Constant = Callable[[sp.Expr], sp.Expr]
Bound = Callable[[Sequence[sp.Expr]], sp.Expr]

_D = sp.Symbol("d", positive=True, integer=True)
_EXPLICIT_D = range(1, 7)


def _step_l1_as_sum(d: int) -> bool:
    x = sp.symbols(f"x0:{d}", real=True)
    g = sp.symbols(f"g0:{d}", real=True)
    r = sp.Symbol("r", positive=True)
    y = [gi * xi / r for gi, xi in zip(g, x, strict=True)]
    return is_zero(
        sp.Add(*[sp.Abs(v) for v in y])
        - sp.Add(*[sp.Abs(gi) * sp.Abs(xi) for gi, xi in zip(g, x, strict=True)]) / r
    )


def _step_lagrange(d: int) -> bool:
    a = sp.symbols(f"a0:{d}", nonnegative=True)
    b = sp.symbols(f"b0:{d}", nonnegative=True)
    gap = (
        sp.Add(*[v**2 for v in a]) * sp.Add(*[v**2 for v in b])
        - sp.Add(*[u * v for u, v in zip(a, b, strict=True)]) ** 2
    )
    squares = sp.Add(*[(a[i] * b[j] - a[j] * b[i]) ** 2 for i in range(d) for j in range(i + 1, d)])
    return is_zero(gap - squares) and bool(sp.sympify(squares).is_nonnegative or squares == 0)


def _step_norm_ratio() -> bool:
    total = sp.Symbol("S", positive=True)  # Σ x_i² > 0
    symbolic = is_zero(sp.sqrt(total) / sp.sqrt(total / _D) - sp.sqrt(_D))
    explicit = True
    for d in _EXPLICIT_D:
        x = sp.symbols(f"x0:{d}", positive=True)
        s = sp.Add(*[v**2 for v in x])
        explicit = explicit and is_zero(sp.sqrt(s) / sp.sqrt(s / d) - sp.sqrt(d))
    return symbolic and explicit


def _step_triangle() -> bool:
    u, v = sp.symbols("u v", real=True)
    return nonnegative_on_every_ordering(sp.Abs(u) + sp.Abs(v) - sp.Abs(u - v), [u, v])


def _at_least(claimed: sp.Expr, needed: sp.Expr) -> bool:
    return sp.simplify(claimed - needed).is_nonnegative is True


def _l2(gamma: Sequence[sp.Expr]) -> sp.Expr:
    return sp.sqrt(sp.Add(*[g**2 for g in gamma]))


def _step_bound(c_delta: Constant, bound: Bound) -> bool:
    """bound(γ) ≥ c_delta(d)·‖γ‖₂ for symbolic real γ, d = 1..6."""
    for d in _EXPLICIT_D:
        gamma = list(sp.symbols(f"g0:{d}", real=True))
        if not _at_least(bound(gamma), c_delta(sp.Integer(d)) * _l2(gamma)):
            return False
    return True


def _tight_instance_respected(c_l1: Constant, bound: Bound) -> bool:
    for d in _EXPLICIT_D:
        x = [sp.Integer(1)] * d
        gamma = [sp.Integer(1)] * d
        gamma_norm = _l2(gamma)
        r = sp.sqrt(sp.Add(*[v**2 for v in x]) / d)
        y = [v / r for v in x]
        y_prime = [-v for v in y]
        l1 = sp.Add(*[sp.Abs(v) for v in y])
        delta = sp.Add(*[sp.Abs(a - b) for a, b in zip(y, y_prime, strict=True)])
        if not (_at_least(c_l1(sp.Integer(d)) * gamma_norm, l1) and _at_least(bound(gamma), delta)):
            return False
    return True


def check_sensitivity(c_l1: Constant, c_delta: Constant, bound: Bound) -> bool:
    """Prove ‖y‖₁ ≤ c_l1(d)·‖γ‖₂ and Δ₁ ≤ c_delta(d)·‖γ‖₂ ≤ bound(γ) step by step; False if any step
    fails."""
    return (
        all(_step_l1_as_sum(d) for d in _EXPLICIT_D)
        and all(_step_lagrange(d) for d in _EXPLICIT_D)
        and _step_norm_ratio()
        and _at_least(c_l1(_D), sp.sqrt(_D))
        and _step_triangle()
        and _at_least(c_delta(_D), 2 * c_l1(_D))
        and _step_bound(c_delta, bound)
        and _tight_instance_respected(c_l1, bound)
    )


def sqrt_d(d: sp.Expr) -> sp.Expr:
    """The correct ℓ1 constant √d."""
    return sp.sqrt(d)


def two_sqrt_d(d: sp.Expr) -> sp.Expr:
    """The correct Δ₁ constant 2√d."""
    return 2 * sp.sqrt(d)


def rmsnorm_sensitivity(gamma: Sequence[sp.Expr]) -> sp.Expr:
    """Δ₁ of a normalized row, as proved: 2√d‖γ‖₂ (``scx_ref.dp.sensitivity.rmsnorm_sensitivity``)."""
    return two_sqrt_d(sp.Integer(len(gamma))) * _l2(gamma)


#: The library function this identity is about, with the bound the checker proves.
IMPLEMENTS = (Implementation("scx_ref.dp.sensitivity.rmsnorm_sensitivity", rmsnorm_sensitivity),)


@identity(
    "sensitivity.rmsnorm_l1",
    "steps 1, 2, 6, 7 for d = 1..6; steps 3-5 for symbolic d; eps = 0",
    implements=IMPLEMENTS,
    negative_controls=[
        (
            "wrong constant √d/2 for ‖y‖₁",
            lambda: check_sensitivity(lambda d: sp.sqrt(d) / 2, two_sqrt_d, rmsnorm_sensitivity),
        ),
        ("Δ₁ ≤ √d‖γ‖₂ (factor 2 dropped)", lambda: check_sensitivity(sqrt_d, sqrt_d, rmsnorm_sensitivity)),
        (
            "bound function √d‖γ‖₂ (factor 2 dropped from the code's statement)",
            lambda: check_sensitivity(sqrt_d, two_sqrt_d, lambda g: sqrt_d(sp.Integer(len(g))) * _l2(g)),
        ),
    ],
)
def rmsnorm_l1() -> bool:
    """‖y‖₁ ≤ √d‖γ‖₂ and Δ₁ ≤ 2√d‖γ‖₂ = rmsnorm_sensitivity(γ)."""
    return check_sensitivity(sqrt_d, two_sqrt_d, rmsnorm_sensitivity)

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

A second identity (``sensitivity.rmsnorm_l2_and_eps``) proves the other bound of DESIGN §7 and the step from
eps = 0 to the model's eps ≥ 0, both through the RMSNorm statement ``scx_ref.ops.rms_norm`` is held to:
‖RMSNorm_ε(x)‖₂ ≤ √d‖γ‖∞ (``rmsnorm_l2_bound``, which the attention-output and SwiGLU bounds start from), and
|RMSNorm_ε(x)_i| ≤ |RMSNorm_0(x)_i| for every ε ≥ 0, so the bounds above hold at every ε ≥ 0 (as
``rmsnorm_l1_bound`` and ``rmsnorm_sensitivity`` promise). Negative controls: the constant d/2 for ‖y‖₂², and
the comparison backwards (RMSNorm_0 bounded by RMSNorm_ε).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

import proofs.t7_norm_scaling as t7
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


# --------------------------------------------------------------------------- ‖y‖₂ ≤ √d‖γ‖∞, and any ε ≥ 0

_EPS = sp.Symbol("epsilon", nonnegative=True)


def _normalized(x: Sequence[sp.Expr], gamma: Sequence[sp.Expr], eps: sp.Expr) -> list[sp.Expr]:
    """RMSNorm_ε of one row through :func:`proofs.t7_norm_scaling.rms_norm`, the statement
    ``tests/test_proof_links.py`` holds ``scx_ref.ops.rms_norm`` to."""
    return list(t7.rms_norm(sp.Matrix([list(x)]), sp.Matrix(list(gamma)), eps))


def _step_l2(c2: Constant, eps: sp.Expr) -> bool:
    """c2(d)·‖γ‖∞² − ‖RMSNorm_eps(x)‖₂² ≥ 0 for symbolic real nonzero x and d = 1..6.

    Any real γ is γ_i² = M − t_i with M = ‖γ‖∞² and t_i = M − γ_i² ≥ 0, so this is the certificate: with
    r² = mean(x²) + eps > 0, r²·(c2(d)·M − ‖y‖₂²) expands to a polynomial sympy shows nonnegative (for
    c2(d) = d: Σ t_i x_i² + d·M·eps).
    """
    m = sp.Symbol("M", nonnegative=True)
    for d in _EXPLICIT_D:
        x = sp.symbols(f"x0:{d}", real=True, nonzero=True)
        t = sp.symbols(f"t0:{d}", nonnegative=True)
        y = _normalized(x, [sp.sqrt(m - ti) for ti in t], eps)
        r2 = sp.Add(*[v**2 for v in x]) / d + eps
        scaled = sp.expand(sp.cancel(r2 * (c2(sp.Integer(d)) * m - sp.Add(*[v**2 for v in y]))))
        if not (r2.is_positive and scaled.is_nonnegative is True):
            return False
    return True


def _step_eps_shrinks(eps: sp.Expr, base: sp.Expr) -> bool:
    """|RMSNorm_eps(x)_i| = f·|RMSNorm_base(x)_i| with 0 < f ≤ 1, for symbolic real x, γ and d = 1..6: f² =
    (m + base) / (m + eps) with m = mean(x²) > 0, and 1 − f² = (eps − base) / (m + eps) ≥ 0. With base = 0
    every bound on RMSNorm_0 (‖y‖₁ ≤ √d‖γ‖₂, Δ₁ ≤ 2√d‖γ‖₂) holds at every eps ≥ 0."""
    for d in _EXPLICIT_D:
        x = sp.symbols(f"x0:{d}", real=True, nonzero=True)
        g = sp.symbols(f"g0:{d}", real=True, nonzero=True)
        mean_sq = sp.Add(*[v**2 for v in x]) / d
        for a, b in zip(_normalized(x, g, eps), _normalized(x, g, base), strict=True):
            f = sp.cancel(a / b)
            if not (f.is_positive and is_zero(f**2 - (mean_sq + base) / (mean_sq + eps))):
                return False
        if sp.simplify(1 - (mean_sq + base) / (mean_sq + eps)).is_nonnegative is not True:
            return False
    return True


def check_l2_and_eps(c2: Constant, *, eps: sp.Expr = _EPS, base: sp.Expr = sp.S.Zero) -> bool:
    """‖RMSNorm_eps(x)‖₂² ≤ c2(d)·‖γ‖∞², and |RMSNorm_eps(x)_i| ≤ |RMSNorm_base(x)_i| for every coordinate."""
    return _step_l2(c2, eps) and _step_eps_shrinks(eps, base)


@identity(
    "sensitivity.rmsnorm_l2_and_eps",
    "‖RMSNorm_ε(x)‖₂ ≤ √d‖γ‖∞ and |RMSNorm_ε(x)_i| ≤ |RMSNorm_0(x)_i|; symbolic x, γ, ε ≥ 0; d = 1..6",
    implements=t7.IMPLEMENTS,
    negative_controls=[
        ("‖y‖₂² ≤ (d/2)‖γ‖∞² (constant too small)", lambda: check_l2_and_eps(lambda d: d / 2)),
        (
            "backwards: |RMSNorm_0(x)_i| ≤ |RMSNorm_ε(x)_i|",
            lambda: check_l2_and_eps(lambda d: d, eps=sp.S.Zero, base=_EPS),
        ),
    ],
)
def rmsnorm_l2_and_eps() -> bool:
    """‖RMSNorm_ε(x)‖₂ ≤ √d‖γ‖∞ (DESIGN §7; ``scx_ref.dp.sensitivity.rmsnorm_l2_bound``), and the ε = 0
    bounds above hold at every ε ≥ 0 (``rmsnorm_l1_bound`` / ``rmsnorm_sensitivity`` promise any eps ≥ 0)."""
    return check_l2_and_eps(lambda d: d)

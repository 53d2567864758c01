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

Sampling (``laplace.inverse_cdf``): the sampler's map from a uniform u ∈ (0, 1) to η,
Q(u) = −β·sign(u − ½)·ln(1 − 2|u − ½|), is the inverse of the CDF F(z) = ∫_{−∞}^{z} p(t | 0) dt of the same
density: F(Q(u)) = u on (0, ½) and on [½, 1). Negative controls: Q without the factor 2 inside the
logarithm, and Q with the sign flipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

from proofs._registry import Implementation, identity
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


_U = sp.Symbol("u", positive=True)


def laplace_quantile(u: sp.Expr, beta: sp.Expr) -> sp.Expr:
    """The sampler's inverse CDF: Q(u) = −β·sign(u − ½)·ln(1 − 2|u − ½|)."""
    s = u - sp.Rational(1, 2)
    return -beta * sp.sign(s) * sp.log(1 - 2 * sp.Abs(s))


def laplace_noise(shape: tuple[int, ...], beta: sp.Expr, uniforms: Sequence[sp.Expr]) -> list[sp.Expr]:
    """η for the generator's uniforms, entry by entry (``scx_ref.transforms.laplace_noise``; β = 0 gives
    zeros)."""
    if beta == 0:
        return [sp.Integer(0) for _ in uniforms]
    return [laplace_quantile(u, beta) for u in uniforms]


#: The library function the sampling identity is about, with the expression the checker uses.
IMPLEMENTS = (Implementation("scx_ref.transforms.laplace_noise", laplace_noise),)


def _cdf(z: sp.Expr) -> sp.Expr:
    """F(z) = ∫_{−∞}^{z} exp(−|t|/β)/(2β) dt for a symbol z of known sign, integrated by sympy on each
    half-line (where |t| resolves): z < 0 gives ∫_{−∞}^{z}; z ≥ 0 gives ∫_{−∞}^{0} + ∫_{0}^{z}."""
    t_neg, t_pos = sp.Symbol("t", negative=True), sp.Symbol("t", positive=True)
    left = _density([t_neg], [sp.Integer(0)])
    if z.is_negative:
        return sp.integrate(left, (t_neg, -sp.oo, z))
    right = _density([t_pos], [sp.Integer(0)])
    return sp.integrate(left, (t_neg, -sp.oo, 0)) + sp.integrate(right, (t_pos, 0, z))


def check_inverse_cdf(quantile: Callable[[sp.Expr, sp.Expr], sp.Expr]) -> bool:
    """F(Q(u)) = u on (0, ½), at ½, and on (½, 1).

    The open halves are u = ½ ∓ w/2 with w = k/(1 + k), k > 0 (so 0 < w < 1 exactly); the sign of Q(u)
    must be provably that of the half-line whose CDF is used (Q < 0 below ½, Q ≥ 0 above), so a wrong
    quantile cannot borrow the other half's formula.
    """
    k = sp.Symbol("k", positive=True)
    w = k / (1 + k)
    half = sp.Rational(1, 2)
    z_neg, z_pos = sp.Symbol("z", negative=True), sp.Symbol("z", nonnegative=True)
    for u, z, sign_ok in ((half - w / 2, z_neg, "is_negative"), (half + w / 2, z_pos, "is_nonnegative")):
        q = sp.simplify(quantile(u, _BETA))
        if getattr(q, sign_ok) is not True or not is_zero(sp.simplify(_cdf(z).subs(z, q) - u)):
            return False
    q_mid = sp.simplify(quantile(half, _BETA))
    return bool(q_mid.is_nonnegative is True and is_zero(_cdf(z_pos).subs(z_pos, q_mid) - half))


@identity(
    "laplace.inverse_cdf",
    "F(Q(u)) = u for u in (0, ½) and [½, 1), F integrated from the density, symbolic β",
    implements=IMPLEMENTS,
    negative_controls=[
        (
            "Q(u) without the factor 2: −β·sign·ln(1 − |u − ½|)",
            lambda: check_inverse_cdf(
                lambda u, b: -b * sp.sign(u - sp.S.Half) * sp.log(1 - sp.Abs(u - sp.S.Half))
            ),
        ),
        ("Q(u) with the sign flipped", lambda: check_inverse_cdf(lambda u, b: -laplace_quantile(u, b))),
    ],
)
def inverse_cdf() -> bool:
    """The inverse-CDF sampler draws from the Laplace density the mechanism is proved for (checked through
    :func:`laplace_noise`, the statement ``scx_ref.transforms.laplace_noise`` is held to, one draw)."""
    return check_inverse_cdf(lambda u, beta: laplace_noise((1,), beta, [u])[0])

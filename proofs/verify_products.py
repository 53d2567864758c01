"""The reply verifier's folded products (DESIGN §5.5; ``scx_ref.protocol.verify``).

Freivalds' check of a stage the server normalizes itself compares y·r with x̂·(W r), x̂ = RMSNorm_ε(x) =
γ ⊙ x · s, s = (mean(x²) + ε)^-½, and its tolerance needs ‖x̂‖. The client's fused pass
(``project64_norm``) never forms x̂:

1. x̂·v = s · Σ_t x_t (γ_t v_t) for any vector v (v = a column of W r), and
2. ‖x̂‖² = s² · Σ_t (γ_t x_t)²,

proved for symbolic x, γ, v, ε ≥ 0 and d = 1..4 (both sides are polynomials in x, γ, v times a power of
the same s).

Negative controls, through the same checker: the fold without γ (s·Σ x_t v_t), and the norm with s in
place of s² — each must be refuted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import is_zero, rmsnorm_row

Fold = Callable[[Sequence[sp.Expr], Sequence[sp.Expr], Sequence[sp.Expr], sp.Expr], tuple[sp.Expr, sp.Expr]]

_DIMS = range(1, 5)
_EPS = sp.Symbol("epsilon", nonnegative=True)


def _scale(x: Sequence[sp.Expr], eps: sp.Expr) -> sp.Expr:
    """s = (mean(x²) + ε)^-½."""
    return 1 / sp.sqrt(sp.Add(*[v**2 for v in x]) / len(x) + eps)


def folded(
    x: Sequence[sp.Expr], gamma: Sequence[sp.Expr], v: Sequence[sp.Expr], eps: sp.Expr
) -> tuple[sp.Expr, sp.Expr]:
    """What the fused pass computes for one row and one vector: (s·Σ x_t γ_t v_t, s²·Σ (γ_t x_t)²)."""
    s = _scale(x, eps)
    return (
        s * sp.Add(*[a * g * b for a, g, b in zip(x, gamma, v, strict=True)]),
        s**2 * sp.Add(*[(g * a) ** 2 for a, g in zip(x, gamma, strict=True)]),
    )


def _without_gain(
    x: Sequence[sp.Expr], gamma: Sequence[sp.Expr], v: Sequence[sp.Expr], eps: sp.Expr
) -> tuple[sp.Expr, sp.Expr]:
    _, sq = folded(x, gamma, v, eps)
    s = _scale(x, eps)
    return s * sp.Add(*[a * b for a, b in zip(x, v, strict=True)]), sq


def _norm_with_s(
    x: Sequence[sp.Expr], gamma: Sequence[sp.Expr], v: Sequence[sp.Expr], eps: sp.Expr
) -> tuple[sp.Expr, sp.Expr]:
    dot, _ = folded(x, gamma, v, eps)
    return dot, _scale(x, eps) * sp.Add(*[(g * a) ** 2 for a, g in zip(x, gamma, strict=True)])


def project64_norm(
    x: sp.Matrix, gamma: Sequence[sp.Expr], eps: sp.Expr, right: sp.Matrix
) -> tuple[sp.Matrix, sp.Matrix]:
    """The library's ``project64_norm`` stated on the normalized rows themselves: (x̂·right, ‖x̂_i‖) for
    x̂ = RMSNorm_ε(x) row by row (the code computes it by the fold this family proves)."""
    rows = [rmsnorm_row(list(x.row(i)), list(gamma), eps) for i in range(x.rows)]
    xh = sp.Matrix(rows)
    return xh * right, sp.Matrix([sp.sqrt(sum(v**2 for v in row)) for row in rows])


def check_fold(fold: Fold) -> bool:
    """fold(x, γ, v, ε) == (x̂·v, ‖x̂‖²), both from :func:`project64_norm`, for symbolic x, γ, v, ε ≥ 0 and
    every d in 1..4."""
    for d in _DIMS:
        x = list(sp.symbols(f"x0:{d}", real=True, nonzero=True))
        gamma = list(sp.symbols(f"g0:{d}", real=True))
        v = list(sp.symbols(f"v0:{d}", real=True))
        # the right-hand sides are the statement tests/test_proof_links.py holds project64_norm to
        product, norm = project64_norm(sp.Matrix([x]), gamma, _EPS, sp.Matrix(v))
        dot, sq = fold(x, gamma, v, _EPS)
        if not is_zero(dot - product[0, 0]):
            return False
        if not is_zero(sq - norm[0] ** 2):
            return False
    return True


@identity(
    "verify.rmsnorm_folded",
    "symbolic x, γ, v, ε ≥ 0; d = 1..4",
    negative_controls=[
        ("fold without the gain γ", lambda: check_fold(_without_gain)),
        ("norm scaled by s instead of s²", lambda: check_fold(_norm_with_s)),
    ],
    implements=(
        Implementation("scx_ref.backends.torch_backend.TorchBackend.project64_norm", project64_norm),
    ),
)
def rmsnorm_folded() -> bool:
    """RMSNorm(x)·v = s·Σ x_t γ_t v_t and ‖RMSNorm(x)‖² = s²·Σ (γ_t x_t)²."""
    return check_fold(folded)

"""Small sympy helpers shared by the proof modules: symbolic matrices, permutations, softmax, zero tests.

Conventions (matching DESIGN.md §4, rows are tokens): a permutation is a tuple ``p`` of ``range(n)``;
``permute_rows(X, p)`` is ``X[p]`` (row ``i`` of the result is row ``p[i]`` of ``X``), which equals
``perm_matrix(p) * X``; ``permute_cols(X, p)`` is ``X[:, p]``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence

import sympy as sp

Perm = tuple[int, ...]


def sym_matrix(name: str, rows: int, cols: int, **assumptions: bool) -> sp.Matrix:
    """A ``rows × cols`` matrix of distinct scalar symbols ``name_i_j`` (with the given assumptions)."""
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}_{j}", **assumptions))


def perms(n: int) -> Iterator[Perm]:
    """Every permutation of ``range(n)`` (all of S_n)."""
    return itertools.permutations(range(n))


def inverse(p: Sequence[int]) -> Perm:
    """The inverse permutation: ``inverse(p)[p[i]] == i``."""
    inv = [0] * len(p)
    for i, target in enumerate(p):
        inv[target] = i
    return tuple(inv)


def compose(p: Sequence[int], q: Sequence[int]) -> Perm:
    """Index composition: ``X[compose(p, q)] == X[p][q]``."""
    return tuple(p[i] for i in q)


def perm_matrix(p: Sequence[int]) -> sp.Matrix:
    """The permutation matrix P with ``P * X == X[p]``."""
    n = len(p)
    return sp.Matrix(n, n, lambda i, j: 1 if p[i] == j else 0)


def permute_rows(x: sp.Matrix, p: Sequence[int]) -> sp.Matrix:
    """``X[p]``: row ``i`` of the result is row ``p[i]`` of ``x``."""
    return x.extract(list(p), list(range(x.cols)))


def permute_cols(x: sp.Matrix, p: Sequence[int]) -> sp.Matrix:
    """``X[:, p]``: column ``j`` of the result is column ``p[j]`` of ``x``."""
    return x.extract(list(range(x.rows)), list(p))


def softmax_rows(scores: sp.Matrix) -> sp.Matrix:
    """Row-wise softmax ``exp(s_ij) / Σ_k exp(s_ik)`` (an entry ``-oo`` gets weight exactly 0)."""
    out = sp.zeros(scores.rows, scores.cols)
    for i in range(scores.rows):
        weights = [sp.exp(scores[i, j]) for j in range(scores.cols)]
        total = sp.Add(*weights)
        for j in range(scores.cols):
            out[i, j] = weights[j] / total
    return out


def rms(row: Sequence[sp.Expr], eps: sp.Expr = sp.S.Zero) -> sp.Expr:
    """``sqrt(mean(x²) + eps)`` of one row."""
    return sp.sqrt(sp.Add(*[v**2 for v in row]) / len(row) + eps)


def rmsnorm_row(row: Sequence[sp.Expr], gamma: Sequence[sp.Expr], eps: sp.Expr = sp.S.Zero) -> list[sp.Expr]:
    """RMSNorm of one row: ``γ ⊙ x / sqrt(mean(x²) + eps)``."""
    r = rms(row, eps)
    return [g * v / r for g, v in zip(gamma, row, strict=True)]


def is_zero(expr: sp.Expr) -> bool:
    """Whether ``expr`` simplifies to exactly 0.

    Structure-preserving first (already 0, or 0 after ``expand``), then ``cancel`` of the rational
    function, then ``simplify`` as a last resort. Returns ``False`` whenever no step reaches 0: the
    checkers built on it can only ever *prove* a zero, never assume one.
    """
    expr = sp.sympify(expr)
    if expr == 0:
        return True
    expanded = sp.expand(expr)
    if expanded == 0:
        return True
    if sp.cancel(sp.together(expanded)) == 0:
        return True
    return bool(sp.simplify(expanded) == 0)


def quick_is_zero(expr: sp.Expr) -> bool:
    """Whether ``expr`` is 0 structurally or after ``expand`` (no heavier simplification)."""
    expr = sp.sympify(expr)
    return bool(expr == 0 or sp.expand(expr) == 0)


def matrices_equal(a: sp.Matrix, b: sp.Matrix, *, quick: bool = False) -> bool:
    """Whether ``a - b`` is the zero matrix (entry by entry through :func:`is_zero`)."""
    if a.shape != b.shape:
        return False
    test = quick_is_zero if quick else is_zero
    return all(test(x - y) for x, y in zip(a, b, strict=True))


def nonzero_at_random_point(expr: sp.Expr, seed: int = 0, digits: int = 30) -> bool:
    """A certificate that ``expr`` is *not* identically zero: its exact value at a random rational point,
    evaluated to ``digits`` significant digits with sympy's error-controlled ``evalf``, is nonzero. A point
    where ``expr`` is not finite (a pole, 0/0) certifies nothing: ``False``, never a crash or ``zoo ≠ 0``."""
    rng = random.Random(seed)
    point: dict[sp.Basic, sp.Rational] = {}
    for symbol in sorted(sp.sympify(expr).free_symbols, key=str):
        numerator = rng.randint(1, 9) if symbol.is_nonnegative else rng.randint(-9, 9)
        point[symbol] = sp.Rational(numerator, rng.randint(1, 5))
    value = sp.sympify(expr).subs(point)
    if value.is_finite is not True:  # a pole or 0/0 at the point (zoo, nan): no certificate there
        return False
    return bool(abs(sp.N(value, digits)) > sp.Float(10) ** (-digits // 2))


def attention(
    q: sp.Matrix, k: sp.Matrix, v: sp.Matrix, scale: sp.Expr, mask: sp.Matrix | None = None
) -> sp.Matrix:
    """softmax(QKᵀ·s + M)V, with the score polynomials QKᵀ put in canonical (expanded) form first, so
    that equal score polynomials give structurally equal softmax weights."""
    scores = (q * k.T).applyfunc(sp.expand) * scale
    if mask is not None:
        scores = scores + mask
    return softmax_rows(scores) * v


def causal_mask(n_q: int, n_k: int) -> sp.Matrix:
    """Additive causal mask: 0 where key j ≤ query i (queries aligned to the last keys), −∞ elsewhere."""
    offset = n_k - n_q
    return sp.Matrix(n_q, n_k, lambda i, j: 0 if j <= i + offset else -sp.oo)


def nonnegative_on_every_ordering(expr: sp.Expr, variables: Sequence[sp.Symbol]) -> bool:
    """Prove ``expr ≥ 0`` for all real values of ``variables`` by a case split on their order relative to
    each other and to 0.

    For each total order of ``variables ∪ {0}`` (ties included, as zero gaps), every variable is written as
    ± a sum of nonnegative gap symbols, so each ``Abs`` in ``expr`` resolves; the case holds when sympy can
    show the resulting expression is nonnegative. Returns ``False`` unless every case is proved.
    """
    items: list[sp.Expr | None] = [*variables, None]  # None stands for the reference point 0
    gaps = sp.symbols(f"t0:{len(items)}", nonnegative=True)
    for order in itertools.permutations(items):
        zero_at = order.index(None)
        values: dict[sp.Basic, sp.Expr] = {}
        for position, item in enumerate(order):
            if item is None:
                continue
            if position > zero_at:
                values[item] = sp.Add(*gaps[zero_at:position])
            else:
                values[item] = -sp.Add(*gaps[position:zero_at])
        case = sp.expand(sp.sympify(expr).subs(values, simultaneous=True))
        if case.is_nonnegative is not True:
            return False
    return True

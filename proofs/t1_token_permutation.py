"""T1, token permutation (DESIGN.md §4): a row-wise map commutes with any permutation of the rows.

For every row-wise f — a linear map with bias, RMSNorm, SwiGLU, a generic row function — and every
permutation matrix P:  f(PX) = P f(X), i.e. decoding with Pᵀ = P⁻¹ gives back f(X).

* At symbolic sizes (MatrixSymbol): (PX)W + 1bᵀ = P(XW + 1bᵀ) for symbolic n×d X, d×m W, m-vector b and
  an n×n P, using only the defining property of a permutation matrix that P1 = 1 (it permutes the all-ones
  column to itself).
* Element-wise for explicit sizes: for every P in S_n, n ≤ 4, with symbolic entries.

Negative controls, through the same checkers: forget that P1 = 1 (a general matrix P), encode with Pᵀ but
compare against P, decode with P instead of P⁻¹, and a map that is *not* row-wise (position-dependent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import Perm, inverse, matrices_equal, perms, permute_rows, rmsnorm_row, sym_matrix

RowMap = Callable[[sp.Matrix], sp.Matrix]

_N, _D, _M = sp.symbols("n d m", integer=True, positive=True)


def check_matrix_symbol(*, use_row_sums: bool = True, encode_transpose: bool = False) -> bool:
    """(PX)W + 1bᵀ − P(XW + 1bᵀ) = 0 at symbolic sizes, rewriting P·1 → 1 when ``use_row_sums``."""
    x = sp.MatrixSymbol("X", _N, _D)
    w = sp.MatrixSymbol("W", _D, _M)
    b = sp.MatrixSymbol("b", _M, 1)
    p = sp.MatrixSymbol("P", _N, _N)
    ones = sp.OneMatrix(_N, 1)
    encode = p.T if encode_transpose else p
    lhs = (encode * x) * w + ones * b.T
    rhs = (p * (x * w + ones * b.T)).expand()
    if use_row_sums:
        rhs = rhs.subs(p * ones, ones)
    difference = sp.simplify((lhs - rhs).doit())
    return bool(difference == sp.ZeroMatrix(_N, _M))


def encode(x: sp.Matrix, pi: Perm) -> sp.Matrix:
    """T1 encode as the proof writes it: X ↦ X[π] (``scx_ref.transforms.permute_rows``)."""
    return permute_rows(x, pi)


def decode(y: sp.Matrix, pi: Perm) -> sp.Matrix:
    """T1 decode as the proof writes it: Y ↦ Y[π⁻¹] (``scx_ref.transforms.unpermute_rows``)."""
    return permute_rows(y, inverse(pi))


#: The library functions T1's identities are about, with the expressions the checkers use.
IMPLEMENTS = (
    Implementation("scx_ref.transforms.permute_rows", encode),
    Implementation("scx_ref.transforms.unpermute_rows", decode),
    Implementation("scx_ref.transforms.inverse_permutation", inverse),
)


def apply_rows(f: Callable[[list[sp.Expr], int], list[sp.Expr]], x: sp.Matrix) -> sp.Matrix:
    """Apply ``f(row, index)`` to every row of ``x``; a row-wise map ignores ``index``."""
    return sp.Matrix([f(list(x.row(i)), i) for i in range(x.rows)])


def check_rowwise(
    f: Callable[[list[sp.Expr], int], list[sp.Expr]],
    sizes: Sequence[tuple[int, int]],
    *,
    decode_with_inverse: bool = True,
) -> bool:
    """For every n×d in ``sizes`` and every π in S_n: decode(f(X[π])) == f(X), entry by entry."""
    for n, d in sizes:
        x = sym_matrix("x", n, d, real=True)
        plain = apply_rows(f, x)
        for pi in perms(n):
            encoded = apply_rows(f, encode(x, pi))
            decoded = decode(encoded, pi) if decode_with_inverse else permute_rows(encoded, pi)
            if not matrices_equal(decoded, plain, quick=True):
                return False
    return True


_W = sym_matrix("w", 3, 2)
_B = sym_matrix("b", 1, 2)
_GAMMA = list(sp.symbols("gamma0:3", positive=True))
_EPS = sp.Symbol("epsilon", nonnegative=True)
_F = [sp.Function(f"f{k}") for k in range(2)]
_SIZES_AFFINE = [(n, 3) for n in range(1, 5)]


def affine(row: list[sp.Expr], _index: int) -> list[sp.Expr]:
    """x ↦ xW + b (a linear stage with bias)."""
    return list(sp.Matrix([row]) * _W + _B)


def rmsnorm(row: list[sp.Expr], _index: int) -> list[sp.Expr]:
    """x ↦ γ ⊙ x / sqrt(mean(x²) + ε)."""
    return rmsnorm_row(row, _GAMMA, _EPS)


def swiglu(row: list[sp.Expr], _index: int) -> list[sp.Expr]:
    """x ↦ SiLU(x w₀) · (x w₁) (the SwiGLU gate on a 3-dim row)."""
    gate, up = list(sp.Matrix([row]) * _W)
    return [gate / (1 + sp.exp(-gate)) * up]


def generic(row: list[sp.Expr], _index: int) -> list[sp.Expr]:
    """x ↦ (f0(x), f1(x)) for undefined sympy Functions f0, f1 of the whole row."""
    return [fk(*row) for fk in _F]


def position_dependent(row: list[sp.Expr], index: int) -> list[sp.Expr]:
    """NOT row-wise: x_i ↦ f0(x_i, i) depends on the row's position (as RoPE does)."""
    return [_F[0](*row, index)]


@identity(
    "t1.matrix_symbol",
    "symbolic n, d, m (MatrixSymbol); uses only P·1 = 1",
    negative_controls=[
        ("general matrix P (P·1 = 1 not used)", lambda: check_matrix_symbol(use_row_sums=False)),
        ("encode with Pᵀ, decode as if P", lambda: check_matrix_symbol(encode_transpose=True)),
    ],
)
def matrix_symbol() -> bool:
    """(PX)W + 1bᵀ = P(XW + 1bᵀ) for symbolic sizes."""
    return check_matrix_symbol()


@identity(
    "t1.affine",
    "XW + 1bᵀ, d=3, m=2, every π in S_n for n = 1..4",
    implements=IMPLEMENTS,
    negative_controls=[
        (
            "decode with π instead of π⁻¹",
            lambda: check_rowwise(affine, _SIZES_AFFINE, decode_with_inverse=False),
        ),
    ],
)
def affine_identity() -> bool:
    """Linear map with bias commutes with every row permutation."""
    return check_rowwise(affine, _SIZES_AFFINE)


@identity(
    "t1.rmsnorm",
    "RMSNorm with symbolic γ, ε; d=3, every π in S_n for n = 1..4",
    implements=IMPLEMENTS,
    negative_controls=[
        ("position-dependent map (not row-wise)", lambda: check_rowwise(position_dependent, _SIZES_AFFINE)),
    ],
)
def rmsnorm_identity() -> bool:
    """RMSNorm commutes with every row permutation."""
    return check_rowwise(rmsnorm, _SIZES_AFFINE)


@identity(
    "t1.swiglu_and_generic_row_function",
    "SwiGLU and undefined f(row) (sympy Function), d=3, every π in S_n for n = 1..4",
    implements=IMPLEMENTS,
    negative_controls=[
        (
            "decode with π instead of π⁻¹",
            lambda: check_rowwise(generic, _SIZES_AFFINE, decode_with_inverse=False),
        ),
    ],
)
def generic_identity() -> bool:
    """SwiGLU and an arbitrary row function commute with every row permutation."""
    return check_rowwise(swiglu, _SIZES_AFFINE) and check_rowwise(generic, _SIZES_AFFINE)

"""T2, redundant (decoy) rows (DESIGN.md §4): append r decoy rows, permute, compute, unpermute, strip.

For a row-wise f, symbolic real rows X (n×d) and symbolic decoys R (r×d), and every π in S_{n+r}:
(f([X; R][π]))[π⁻¹][:n] = f(X) — every decoy is dropped and no decoy leaks into a real row.

Negative controls, through the same checker: keep the first n rows without unpermuting, decode with π
instead of π⁻¹, and a map that mixes rows (bidirectional attention pooling) so decoys leak into real rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import (
    Perm,
    inverse,
    matrices_equal,
    perms,
    permute_rows,
    rmsnorm_row,
    softmax_rows,
    sym_matrix,
)

MatrixMap = Callable[[sp.Matrix], sp.Matrix]

_D = 2
_W = sym_matrix("w", _D, _D)
_B = sym_matrix("b", 1, _D)
_GAMMA = list(sp.symbols(f"gamma0:{_D}", positive=True))
_F = sp.Function("f")
_SIZES = [(1, 0), (3, 0), (1, 1), (2, 1), (1, 2), (2, 2), (3, 1)]  # (n, r): r = 0 is no decoys


def with_decoys(x: sp.Matrix, decoys: sp.Matrix) -> sp.Matrix:
    """[X; R]: the decoy rows below the real rows (``scx_ref.transforms.with_decoys``)."""
    return x.col_join(decoys)


def strip_decoys(y: sp.Matrix, n: int) -> sp.Matrix:
    """The first n rows (``scx_ref.transforms.strip_decoys``)."""
    return y[:n, :]


def encode(x: sp.Matrix, decoys: sp.Matrix, pi: Perm) -> sp.Matrix:
    """T1 + T2 encode as the proof writes it: [X; R][π] (``scx_ref.transforms.encode_rows``)."""
    return permute_rows(with_decoys(x, decoys), pi)


def decode(y: sp.Matrix, pi: Perm, n: int) -> sp.Matrix:
    """T1 + T2 decode as the proof writes it: (Y[π⁻¹])[:n] (``scx_ref.transforms.decode_rows``)."""
    return strip_decoys(permute_rows(y, inverse(pi)), n)


#: The library functions T2's identity is about, with the expressions the checker uses.
IMPLEMENTS = (
    Implementation("scx_ref.transforms.with_decoys", with_decoys),
    Implementation("scx_ref.transforms.strip_decoys", strip_decoys),
    Implementation("scx_ref.transforms.encode_rows", encode),
    Implementation("scx_ref.transforms.decode_rows", decode),
    Implementation("scx_ref.transforms.decode_rows_numpy", decode),
)


def rowwise(row_map: Callable[[list[sp.Expr]], list[sp.Expr]]) -> MatrixMap:
    """Lift a map of one row to a map of a matrix, row by row."""
    return lambda x: sp.Matrix([row_map(list(x.row(i))) for i in range(x.rows)])


def _affine_then_norm(row: list[sp.Expr]) -> list[sp.Expr]:
    """x ↦ (RMSNorm(x) W + b, f(x)): a linear stage after a norm, plus a generic row function."""
    normed = rmsnorm_row(row, _GAMMA)
    return [*list(sp.Matrix([normed]) * _W + _B), _F(*row)]


AFFINE_NORM = rowwise(_affine_then_norm)


def attention_pool(x: sp.Matrix) -> sp.Matrix:
    """NOT row-wise: bidirectional self-attention softmax(XXᵀ)X, every row sees every other row."""
    return softmax_rows((x * x.T).applyfunc(sp.expand)) * x


def check_decoys(
    f: MatrixMap, sizes: Sequence[tuple[int, int]], *, mode: str = "unpermute-then-strip"
) -> bool:
    """For every (n, r) in ``sizes`` and every π in S_{n+r}: decoding f([X; R][π]) gives f(X).

    ``mode`` is ``"unpermute-then-strip"`` (the protocol), ``"strip-only"`` (keep the first n rows of
    the permuted output without unpermuting) or ``"permute-again"`` (apply π instead of π⁻¹).
    """
    for n, r in sizes:
        x = sym_matrix("x", n, _D, real=True)
        decoys = sym_matrix("r", r, _D, real=True)
        plain = f(x)
        for pi in perms(n + r):
            y = f(encode(x, decoys, pi))
            if mode == "unpermute-then-strip":
                out = decode(y, pi, n)
            elif mode == "strip-only":
                out = strip_decoys(y, n)
            elif mode == "permute-again":
                out = strip_decoys(permute_rows(y, pi), n)
            else:
                raise ValueError(mode)
            if not matrices_equal(out, plain, quick=True):
                return False
    return True


@identity(
    "t2.decoys",
    "RMSNorm·W + b and f(row); d=2, (n, r) in {(1,0),(3,0),(1,1),(2,1),(1,2),(2,2),(3,1)}, "
    "every π in S_{n+r}",
    implements=IMPLEMENTS,
    negative_controls=[
        ("strip without unpermuting", lambda: check_decoys(AFFINE_NORM, _SIZES, mode="strip-only")),
        ("decode with π instead of π⁻¹", lambda: check_decoys(AFFINE_NORM, _SIZES, mode="permute-again")),
        ("row-mixing map (attention pooling): decoys leak", lambda: check_decoys(attention_pool, [(1, 1)])),
    ],
)
def decoys() -> bool:
    """Append-permute-compute-unpermute-strip equals compute on X."""
    return check_decoys(AFFINE_NORM, _SIZES)


def reencode_sum(
    s: sp.Matrix, pi_s: Perm, y: sp.Matrix, pi_y: Perm, decoys: sp.Matrix, pi: Perm
) -> sp.Matrix:
    """The residual add across encodings as the proof writes it: decode S and Y, add, encode with fresh
    decoys under π (``scx_ref.transforms.reencode_sum``, which fuses the gathers)."""
    n = len(pi) - decoys.rows
    return encode(decode(s, pi_s, n) + decode(y, pi_y, n), decoys, pi)


#: (n, r_s, r_y, r): real rows, decoys of S (the QKV stage's), of Y (the O stage's), and fresh decoys.
_RESIDUAL_SIZES = [(1, 1, 0, 1), (2, 1, 1, 0), (1, 0, 1, 2), (2, 0, 0, 1)]


def check_residual(sizes: Sequence[tuple[int, int, int, int]], *, mode: str = "protocol") -> bool:
    """For every size and every π_s, π_y, π: S = [H; R_s][π_s] and Y = [O; R_y][π_y] re-encode to a
    Z with Z[π⁻¹][:n] = H + O (the residual in true order) and Z[π⁻¹][n:] = R (the fresh decoys, with
    nothing of R_s, R_y, H or O in them).

    ``mode``: ``"protocol"``, ``"same-key"`` (decode Y with π_s) or ``"old-decoys"`` (carry S's decoy
    rows on instead of fresh ones).
    """
    for n, r_s, r_y, r in sizes:
        h, o = sym_matrix("h", n, _D), sym_matrix("o", n, _D)
        r_old, r_new = sym_matrix("q", r_s, _D), sym_matrix("r", r, _D)
        r_o = sym_matrix("p", r_y, _D)
        for pi_s in perms(n + r_s):
            s = encode(h, r_old, pi_s)
            for pi_y in perms(n + r_y):
                y = encode(o, r_o, pi_y)
                for pi in perms(n + r):
                    if mode == "protocol":
                        z = reencode_sum(s, pi_s, y, pi_y, r_new, pi)
                    elif mode == "same-key":
                        if len(pi_s) != len(pi_y):
                            continue
                        z = reencode_sum(s, pi_s, y, pi_s, r_new, pi)
                    elif mode == "old-decoys":
                        if r_s != r:
                            continue
                        z = encode(
                            decode(s, pi_s, n) + decode(y, pi_y, n), decode(s, pi_s, n + r_s)[n:, :], pi
                        )
                    else:
                        raise ValueError(mode)
                    back = permute_rows(z, inverse(pi))
                    if not matrices_equal(back[:n, :], h + o, quick=True):
                        return False
                    if not matrices_equal(back[n:, :], r_new, quick=True):
                        return False
    return True


@identity(
    "t2.residual_reencode",
    "S = [H; R_s][π_s], Y = [O; R_y][π_y] re-encoded under π with fresh R: decode = H + O, decoy rows = R; "
    "d=2, (n, r_s, r_y, r) in {(1,1,0,1),(2,1,1,0),(1,0,1,2),(2,0,0,1)}, every π_s, π_y, π",
    implements=(Implementation("scx_ref.transforms.reencode_sum", reencode_sum),),
    negative_controls=[
        ("decode Y with π_s instead of π_y", lambda: check_residual([(2, 0, 0, 0)], mode="same-key")),
        (
            "carry S's decoy rows on instead of fresh ones",
            lambda: check_residual([(1, 1, 0, 1)], mode="old-decoys"),
        ),
    ],
)
def residual_reencode() -> bool:
    """The client's residual add in encoded order: the real rows add, the decoys are replaced."""
    return check_residual(_RESIDUAL_SIZES)

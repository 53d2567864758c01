"""T5, additive blinding (DESIGN.md §4): (x + η)W + b − ηW = xW + b.

Proved at symbolic sizes (MatrixSymbol x: n×d, η: n×d, W: d×m, bias rows 1bᵀ) and element-wise for an
explicit 2×3 x, η, 3×2 W and bias. The correction ηW is what the client precomputes.

Negative controls, through the same checker: drop the correction; subtract η (not ηW); subtract ηW + b
(bias removed twice); and blinding across a non-linear stage (SiLU(xW + b)), where no correction of the
form ηW can work.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import matrices_equal, sym_matrix

Stage = Callable[[sp.MatrixBase, sp.MatrixBase, sp.MatrixBase], sp.MatrixBase]
Correction = Callable[[sp.MatrixBase, sp.MatrixBase, sp.MatrixBase], sp.MatrixBase]

_N, _D, _M = sp.symbols("n d m", integer=True, positive=True)


def blind(x: sp.MatrixBase, eta: sp.MatrixBase) -> sp.MatrixBase:
    """T5 encode as the proof writes it: x + η (``scx_ref.transforms.blind``)."""
    return x + eta


def unblind(y: sp.MatrixBase, correction: sp.MatrixBase) -> sp.MatrixBase:
    """T5 decode: y − ηW (``scx_ref.transforms.unblind``)."""
    return y - correction


def blinding_correction(eta: sp.MatrixBase, w: sp.MatrixBase) -> sp.MatrixBase:
    """The correction ηW (``scx_ref.transforms.blinding_correction``, in × out W)."""
    return eta * w


#: The library functions T5's identity is about, with the expressions the checker uses.
IMPLEMENTS = (
    Implementation("scx_ref.transforms.blind", blind),
    Implementation("scx_ref.transforms.unblind", unblind),
    Implementation("scx_ref.transforms.blinding_correction", blinding_correction),
)


def affine(x: sp.MatrixBase, w: sp.MatrixBase, bias: sp.MatrixBase) -> sp.MatrixBase:
    """The server's linear stage xW + 1bᵀ (``bias`` is already the n×m matrix 1bᵀ)."""
    return x * w + bias


def silu_affine(x: sp.MatrixBase, w: sp.MatrixBase, bias: sp.MatrixBase) -> sp.MatrixBase:
    """A non-linear stage SiLU(xW + b), entry-wise (explicit matrices only)."""
    pre = sp.Matrix(x * w + bias)
    return pre.applyfunc(lambda z: z / (1 + sp.exp(-z)))


def eta_w(eta: sp.MatrixBase, w: sp.MatrixBase, _bias: sp.MatrixBase) -> sp.MatrixBase:
    """The protocol's correction ηW."""
    return blinding_correction(eta, w)


def nothing(eta: sp.MatrixBase, w: sp.MatrixBase, _bias: sp.MatrixBase) -> sp.MatrixBase:
    """Wrong: no correction (as a zero matrix of the output's shape)."""
    return (
        sp.ZeroMatrix(eta.shape[0], w.shape[1])
        if isinstance(eta, sp.MatrixSymbol)
        else sp.zeros(*(eta * w).shape)
    )


def eta_w_plus_b(eta: sp.MatrixBase, w: sp.MatrixBase, bias: sp.MatrixBase) -> sp.MatrixBase:
    """Wrong: subtract ηW + b (the bias is removed too)."""
    return eta * w + bias


def check_blinding(stage: Stage, correction: Correction, *, symbolic_sizes: bool) -> bool:
    """stage(x + η) − correction(η) == stage(x), at symbolic sizes (MatrixSymbol) or for explicit 2×3·3×2."""
    if symbolic_sizes:
        x, eta = sp.MatrixSymbol("x", _N, _D), sp.MatrixSymbol("eta", _N, _D)
        w, b = sp.MatrixSymbol("W", _D, _M), sp.MatrixSymbol("b", _M, 1)
        bias = sp.OneMatrix(_N, 1) * b.T
        decoded = unblind(stage(blind(x, eta), w, bias), correction(eta, w, bias))
        difference = (decoded - stage(x, w, bias)).expand().doit()
        return bool(sp.simplify(difference) == sp.ZeroMatrix(_N, _M))
    x, eta = sym_matrix("x", 2, 3), sym_matrix("eta", 2, 3)
    w, b = sym_matrix("w", 3, 2), sym_matrix("b", 1, 2)
    bias = sp.ones(2, 1) * b
    return matrices_equal(unblind(stage(blind(x, eta), w, bias), correction(eta, w, bias)), stage(x, w, bias))


@identity(
    "t5.blinding",
    "symbolic n, d, m (MatrixSymbol) and explicit 2×3·3×2 entries",
    implements=IMPLEMENTS,
    negative_controls=[
        ("correction dropped", lambda: check_blinding(affine, nothing, symbolic_sizes=True)),
        (
            "subtract η·W + b (bias removed twice)",
            lambda: check_blinding(affine, eta_w_plus_b, symbolic_sizes=True),
        ),
        ("correction dropped (explicit)", lambda: check_blinding(affine, nothing, symbolic_sizes=False)),
        ("blinding across SiLU(xW + b)", lambda: check_blinding(silu_affine, eta_w, symbolic_sizes=False)),
    ],
)
def blinding() -> bool:
    """(x + η)W + b − ηW = xW + b."""
    return check_blinding(affine, eta_w, symbolic_sizes=True) and check_blinding(
        affine, eta_w, symbolic_sizes=False
    )

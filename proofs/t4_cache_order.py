"""T4, cache row order (DESIGN.md §4): a query that attends to every cached row ignores their order.

For a symbolic query q (1×d_h), a symbolic cache K, V (t×d_h), a symbolic scale s > 0 and every row
permutation ρ in S_t (t ≤ 4): softmax(q K[ρ]ᵀ·s) V[ρ] = softmax(q Kᵀ·s) V. The sums over cached rows are
the same sums in another order.

Negative controls, through the same checker: permute K's rows but not V's; a different ρ′ on V; and a
position-dependent mask (a window that drops the last cached row by index), which breaks the premise that
the query attends to *all* rows.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from proofs._registry import identity
from proofs._sym import Perm, attention, compose, matrices_equal, perms, permute_rows, sym_matrix

#: ρ ↦ (row order of K, row order of V).
Scheme = Callable[[Perm], tuple[Perm, Perm]]

_SCALE = sp.Symbol("s", positive=True)
_DH = 2
_CACHE_SIZES = (1, 2, 3, 4)


def same_order(rho: Perm) -> tuple[Perm, Perm]:
    """The protocol: K and V rows stored in the same order ρ."""
    return rho, rho


def k_only(rho: Perm) -> tuple[Perm, Perm]:
    """Wrong: K rows reordered, V rows left in true order."""
    return rho, tuple(range(len(rho)))


def different_v_order(rho: Perm) -> tuple[Perm, Perm]:
    """Wrong: V rows in a different order ρ′ (ρ then a cyclic shift)."""
    return rho, compose(rho, tuple((i + 1) % len(rho) for i in range(len(rho))))


def _window_mask(t: int) -> sp.Matrix:
    """A position-dependent mask: the last row *by storage index* is masked out."""
    return sp.Matrix(1, t, lambda _i, j: -sp.oo if j == t - 1 and t > 1 else 0)


def check_cache_order(scheme: Scheme, *, windowed: bool = False) -> bool:
    """For every cache size t and every ρ in S_t: Attn(q, K[ρ_K], V[ρ_V]) == Attn(q, K, V) symbolically."""
    q = sym_matrix("q", 1, _DH, real=True)
    for t in _CACHE_SIZES:
        k = sym_matrix("k", t, _DH, real=True)
        v = sym_matrix("v", t, _DH, real=True)
        mask = _window_mask(t) if windowed else None
        plain = attention(q, k, v, _SCALE, mask)
        for rho in perms(t):
            k_order, v_order = scheme(rho)
            stored = attention(q, permute_rows(k, k_order), permute_rows(v, v_order), _SCALE, mask)
            if not matrices_equal(stored, plain, quick=True):
                return False
    return True


@identity(
    "t4.cache_order",
    f"symbolic q, K, V, scale; d_h={_DH}; cache sizes t = 1..4; every ρ in S_t",
    negative_controls=[
        ("K rows permuted, V rows not", lambda: check_cache_order(k_only)),
        ("different order ρ′ on V", lambda: check_cache_order(different_v_order)),
        ("position-dependent mask over stored rows", lambda: check_cache_order(same_order, windowed=True)),
    ],
)
def cache_order() -> bool:
    """Attn(q, K[ρ], V[ρ]) = Attn(q, K, V) for every ρ."""
    return check_cache_order(same_order)

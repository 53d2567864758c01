"""T4, cache row order (DESIGN.md §4): a query that attends to every cached row ignores their order.

For a symbolic query q (1×d_h), a symbolic cache K, V (t×d_h), a symbolic scale s > 0 and every row
permutation ρ in S_t (t ≤ 4): softmax(q K[ρ]ᵀ·s) V[ρ] = softmax(q Kᵀ·s) V. The sums over cached rows are
the same sums in another order.

Negative controls, through the same checker: permute K's rows but not V's; a different ρ′ on V; and a
position-dependent mask (a window that drops the last cached row by index), which breaks the premise that
the query attends to *all* rows.

Locked cache scores (DESIGN §5.3, last guard blocks): the server scores q against ρ(K ⊕ R) (n real rows,
r decoys, stored in the order ρ) followed by a rows appended in true order; the client's decode — column
ρ⁻¹[i] for true row i, then the appended columns, decoys dropped — gives exactly q·[K; A]ᵀ, for every ρ
in S_{n+r} (n + r ≤ 4, r = 0 included). The locked cache ρ(K ⊕ R) is built by T2's :func:`encode` — the
statement ``tests/test_proof_links.py`` holds ``scx_ref.transforms.encode_rows`` to, the function the client
locks the cache with. Negative control: decode with ρ instead of ρ⁻¹.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import (
    Perm,
    attention,
    compose,
    inverse,
    matrices_equal,
    perms,
    permute_cols,
    permute_rows,
    sym_matrix,
)
from proofs.t2_decoys import encode

#: ρ ↦ (row order of K, row order of V).
Scheme = Callable[[Perm], tuple[Perm, Perm]]

_SCALE = sp.Symbol("s", positive=True)
_DH = 2
_CACHE_SIZES = (1, 2, 3, 4)


def reorder_cache(k: sp.Matrix, v: sp.Matrix, rho: Perm) -> tuple[sp.Matrix, sp.Matrix]:
    """T4 as the proof writes it: (K[ρ], V[ρ]) (``scx_ref.transforms.reorder_cache``)."""
    return permute_rows(k, rho), permute_rows(v, rho)


def unlock_scores(scores: sp.Matrix, rho: Perm, n: int) -> sp.Matrix:
    """Decode of scores against ρ(K ⊕ R) then appended rows: column ρ⁻¹[i] for true row i < n, then the
    appended columns (``scx_ref.transforms.unlock_scores``)."""
    return _unlock(scores, rho, n, inverse(rho))


def _unlock(scores: sp.Matrix, rho: Perm, n: int, decode_order: Perm) -> sp.Matrix:
    cols = list(decode_order[:n]) + list(range(len(rho), scores.cols))
    return permute_cols(scores, tuple(cols))


#: The library functions T4's identities are about, with the expressions the checkers use.
IMPLEMENTS = (
    Implementation("scx_ref.transforms.reorder_cache", reorder_cache),
    Implementation("scx_ref.transforms.unlock_scores", unlock_scores),
)


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
            if k_order == v_order:
                k_stored, v_stored = reorder_cache(k, v, k_order)
            else:
                k_stored, v_stored = permute_rows(k, k_order), permute_rows(v, v_order)
            stored = attention(q, k_stored, v_stored, _SCALE, mask)
            if not matrices_equal(stored, plain, quick=True):
                return False
    return True


@identity(
    "t4.cache_order",
    f"symbolic q, K, V, scale; d_h={_DH}; cache sizes t = 1..4; every ρ in S_t",
    implements=IMPLEMENTS[:1],
    negative_controls=[
        ("K rows permuted, V rows not", lambda: check_cache_order(k_only)),
        ("different order ρ′ on V", lambda: check_cache_order(different_v_order)),
        ("position-dependent mask over stored rows", lambda: check_cache_order(same_order, windowed=True)),
    ],
)
def cache_order() -> bool:
    """Attn(q, K[ρ], V[ρ]) = Attn(q, K, V) for every ρ."""
    return check_cache_order(same_order)


_LOCK_SIZES = [(1, 0), (3, 0), (1, 1), (2, 1), (1, 2), (2, 2), (3, 1)]  # (n real, r decoy); one appended


def check_locked_scores(*, decode_with_inverse: bool = True) -> bool:
    """For every (n, r) and every ρ in S_{n+r}: decoding q·[ρ(K ⊕ R); A]ᵀ gives q·[K; A]ᵀ."""
    q = sym_matrix("q", 1, _DH, real=True)
    a = sym_matrix("a", 1, _DH, real=True)
    for n, r in _LOCK_SIZES:
        k = sym_matrix("k", n, _DH, real=True)
        decoys = sym_matrix("r", r, _DH, real=True)
        plain = q * k.col_join(a).T
        for rho in perms(n + r):
            stored = encode(k, decoys, rho).col_join(a)  # the client's encode_rows, then the appended row
            scores = q * stored.T
            out = unlock_scores(scores, rho, n) if decode_with_inverse else _unlock(scores, rho, n, rho)
            if not matrices_equal(out, plain, quick=True):
                return False
    return True


@identity(
    "t4.locked_scores",
    "q·[ρ(K ⊕ R); A]ᵀ decoded = q·[K; A]ᵀ; d_h=2, (n, r) in {(1,0),(3,0),(1,1),(2,1),(1,2),(2,2),"
    "(3,1)}, every ρ",
    implements=(*IMPLEMENTS[1:], Implementation("scx_ref.transforms.encode_rows", encode)),
    negative_controls=[
        ("decode with ρ instead of ρ⁻¹", lambda: check_locked_scores(decode_with_inverse=False))
    ],
)
def locked_scores() -> bool:
    """The client's decode of the last guard blocks' scores drops the decoys and restores true order."""
    return check_locked_scores()

"""Head structure of the feature permutation P (DESIGN.md §4, T3).

GQA with H_kv = 2 KV heads, G = 2 query heads per KV head, d_h = 2, n = 2 tokens, causal mask, symbolic
Q, K, V and scale. A permutation p of the H_kv·d_h KV coordinates acts on K and V; it is lifted to the
H·d_h query coordinates by moving query head (g, j) coordinate c wherever p moves KV coordinate (g, c)
(so a reordering of KV groups moves each group's query heads along). The output O is decoded with the
inverse of the lifted permutation.

Proved: every *head-structured* P = (τ, σ) — a reordering τ of the KV groups composed with a per-group
coordinate permutation σ_g (2!·2!·2! = 8 of them) — is exact as the client applies it: Q and K encoded
together by :func:`head_permute_stacked` with group sizes (G, 1) (how ``decode_qkv_heads`` ends), V by
:func:`head_permute` with group size 1, the attention output decoded by :func:`head_unpermute` (G) and
re-encoded for the O stage by :func:`encode_head_rows` (with one symbolic decoy row and every π in S_3),
all through :func:`flat_index` — the statements ``tests/test_proof_links.py`` holds the library functions
to. And every one of the other 16 permutations of S_4 of the KV coordinates, which mix coordinates across
heads, is *not* exact (an exact nonzero witness for each); that characterization ranges over flat index
arrays (no head-structured statement can express a cross-head P) built from the same pieces as
:func:`flat_index` (:func:`kv_permutation`, :func:`lift_to_queries`).

Negative controls, through the same checkers: a P swapping one coordinate of head 0 with one of head 1; a
group reordering whose query heads are *not* moved along; decoding with P instead of P⁻¹; the O stage's rows
re-encoded in P's feature order; and, for the characterization, every P claimed exact, and one
head-structured P claimed inexact (the witness search must find nothing).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import (
    Perm,
    attention,
    causal_mask,
    inverse,
    matrices_equal,
    nonzero_at_random_point,
    perms,
    permute_cols,
    sym_matrix,
)
from proofs.t2_decoys import encode

_HKV, _G, _DH, _N = 2, 2, 2, 2
_SCALE = sp.Symbol("s", positive=True)


#: A head permutation in sympy form: (KV-group order τ, per-group coordinate permutations σ_g).
HeadPerm = tuple[Perm, tuple[Perm, ...]]


def kv_permutation(tau: Perm, sigmas: tuple[Perm, ...]) -> Perm:
    """The head-structured p of (τ, σ) as an index array ``K[:, p]``: encoded KV head g' holds true head
    τ[g'] with its coordinates permuted by that head's σ."""
    dh = len(sigmas[0])
    return tuple(tau[g] * dh + sigmas[tau[g]][c] for g in range(len(tau)) for c in range(dh))


def head_structured() -> list[Perm]:
    """Every p = (reorder the KV groups by τ) ∘ (σ_g inside group g), as an index array ``K[:, p]``."""
    return [
        kv_permutation(tau, sigmas)
        for tau in perms(_HKV)
        for sigmas in itertools.product(list(perms(_DH)), repeat=_HKV)
    ]


def flat_index(perm: HeadPerm, group_size: int) -> Perm:
    """The feature index of the head-structured P on rows of H = H_kv·G heads: the lift of its KV
    permutation to the query heads (``scx_ref.transforms.HeadPermutation.flat_index``)."""
    tau, sigmas = perm
    return lift_to_queries(kv_permutation(tau, sigmas), n_kv=len(tau), group=group_size, dh=len(sigmas[0]))


def head_permute(x: sp.Matrix, perm: HeadPerm, group_size: int) -> sp.Matrix:
    """T3 encode of rows × (H·d_h) features as the proof writes it: ``X[:, lift(p)]``
    (``scx_ref.transforms.head_permute``)."""
    return permute_cols(x, flat_index(perm, group_size))


def head_unpermute(y: sp.Matrix, perm: HeadPerm, group_size: int) -> sp.Matrix:
    """T3 decode: ``Y[:, lift(p)⁻¹]`` (``scx_ref.transforms.head_unpermute``)."""
    return permute_cols(y, inverse(flat_index(perm, group_size)))


def head_permute_stacked(x: sp.Matrix, perm: HeadPerm, group_sizes: tuple[int, ...]) -> sp.Matrix:
    """T3 encode of head blocks stacked side by side (block b: H_kv·g_b heads), each block encoded as
    :func:`head_permute` with its own group size (``scx_ref.transforms.head_permute_stacked``)."""
    tau, sigmas = perm
    width = len(tau) * len(sigmas[0])
    blocks, offset = [], 0
    for g in group_sizes:
        blocks.append(head_permute(x[:, offset : offset + width * g], perm, g))
        offset += width * g
    return sp.Matrix.hstack(*blocks)


def encode_head_rows(o: sp.Matrix, perm: HeadPerm, group_size: int, decoys: sp.Matrix, pi: Perm) -> sp.Matrix:
    """T3 decode then T1 + T2 encode as the proof writes them: ``encode(head_unpermute(O, P, G), R, π)``
    (``scx_ref.transforms.encode_head_rows``, which fuses the two gathers)."""
    return encode(head_unpermute(o, perm, group_size), decoys, pi)


#: The library functions the head-structure identities are about, with the expressions the checker uses.
IMPLEMENTS = (
    Implementation("scx_ref.transforms.HeadPermutation.flat_index", flat_index),
    Implementation("scx_ref.transforms.head_permute", head_permute),
    Implementation("scx_ref.transforms.head_unpermute", head_unpermute),
    Implementation("scx_ref.transforms.head_permute_stacked", head_permute_stacked),
    Implementation("scx_ref.transforms.encode_head_rows", encode_head_rows),
)


def lift_to_queries(
    p: Perm, *, move_query_heads: bool = True, n_kv: int = _HKV, group: int = _G, dh: int = _DH
) -> Perm:
    """The query-coordinate permutation induced by the KV-coordinate permutation ``p``.

    Encoded query head (g', j) coordinate c' takes true query head (g, j) coordinate c, where (g, c) is the
    KV coordinate that ``p`` puts at (g', c'). With ``move_query_heads=False`` (wrong) the query head stays
    at (g', j) and only the coordinate is taken from there: ``Q[(g', j), c]``.
    """
    lifted: list[int] = []
    for g_new in range(n_kv):
        for j in range(group):
            for c_new in range(dh):
                g, c = divmod(p[g_new * dh + c_new], dh)
                source_group = g if move_query_heads else g_new
                lifted.append((source_group * group + j) * dh + c)
    return tuple(lifted)


def gqa_attention(q: sp.Matrix, k: sp.Matrix, v: sp.Matrix) -> sp.Matrix:
    """Causal GQA attention: query head h attends to KV head h // G; heads laid out side by side."""
    mask = causal_mask(_N, _N)
    blocks = []
    for h in range(_HKV * _G):
        g = h // _G
        qh = q[:, h * _DH : (h + 1) * _DH]
        kh, vh = k[:, g * _DH : (g + 1) * _DH], v[:, g * _DH : (g + 1) * _DH]
        blocks.append(attention(qh, kh, vh, _SCALE, mask))
    return sp.Matrix.hstack(*blocks)


def _difference(p: Perm, *, move_query_heads: bool) -> sp.Matrix:
    q = sym_matrix("q", _N, _HKV * _G * _DH, real=True)
    k = sym_matrix("k", _N, _HKV * _DH, real=True)
    v = sym_matrix("v", _N, _HKV * _DH, real=True)
    pq = lift_to_queries(p, move_query_heads=move_query_heads)
    encoded = gqa_attention(permute_cols(q, pq), permute_cols(k, p), permute_cols(v, p))
    return (permute_cols(encoded, inverse(pq)) - gqa_attention(q, k, v)).applyfunc(sp.expand)


def is_exact(p: Perm, *, move_query_heads: bool = True) -> bool:
    """Whether encoding with ``p`` and decoding with its inverse reproduces GQA attention symbolically."""
    return all(entry == 0 for entry in _difference(p, move_query_heads=move_query_heads))


Encoded = tuple[sp.Matrix, sp.Matrix, sp.Matrix]
Decoded = tuple[sp.Matrix, sp.Matrix]
#: How the client encodes the attention stage's inputs under P: (Q, K, V, P) ↦ (Q̃, K̃, Ṽ).
Encode = Callable[[sp.Matrix, sp.Matrix, sp.Matrix, HeadPerm], Encoded]
#: How it decodes the attention output Õ: (Õ, P, R, π) ↦ (O, the O stage's rows [O; R][π]).
Decode = Callable[[sp.Matrix, HeadPerm, sp.Matrix, Perm], Decoded]

_QW = _HKV * _G * _DH  # query (and attention output) features


def protocol_encode(q: sp.Matrix, k: sp.Matrix, v: sp.Matrix, perm: HeadPerm) -> Encoded:
    """The protocol: [Q K] through :func:`head_permute_stacked` with group sizes (G, 1), V through
    :func:`head_permute` with group size 1."""
    qk = head_permute_stacked(q.row_join(k), perm, (_G, 1))
    return qk[:, :_QW], qk[:, _QW:], head_permute(v, perm, 1)


def protocol_decode(o: sp.Matrix, perm: HeadPerm, decoys: sp.Matrix, pi: Perm) -> Decoded:
    """The protocol: O = :func:`head_unpermute` (G) and the O stage's rows :func:`encode_head_rows`."""
    return head_unpermute(o, perm, _G), encode_head_rows(o, perm, _G, decoys, pi)


def _flat_scheme(kv_index: Callable[[HeadPerm], Perm], *, move_query_heads: bool) -> tuple[Encode, Decode]:
    """Encode K, V by ``kv_index(P)`` and Q by its lift, decode O by the lift's inverse (the rows by
    ``encode``): the form of a wrong P or a wrong lift."""

    def lift(perm: HeadPerm) -> Perm:
        return lift_to_queries(kv_index(perm), move_query_heads=move_query_heads)

    def enc(q: sp.Matrix, k: sp.Matrix, v: sp.Matrix, perm: HeadPerm) -> Encoded:
        p = kv_index(perm)
        return permute_cols(q, lift(perm)), permute_cols(k, p), permute_cols(v, p)

    def dec(o: sp.Matrix, perm: HeadPerm, decoys: sp.Matrix, pi: Perm) -> Decoded:
        out = permute_cols(o, inverse(lift(perm)))
        return out, encode(out, decoys, pi)

    return enc, dec


def _decode_with_p(o: sp.Matrix, perm: HeadPerm, decoys: sp.Matrix, pi: Perm) -> Decoded:
    """Wrong: the attention output decoded with P instead of P⁻¹."""
    out = head_permute(o, perm, _G)
    return out, encode(out, decoys, pi)


def _rows_in_p_order(o: sp.Matrix, perm: HeadPerm, decoys: sp.Matrix, pi: Perm) -> Decoded:
    """Wrong: O decoded, but the O stage's rows re-encoded from Õ without undoing P."""
    return head_unpermute(o, perm, _G), encode(o, decoys, pi)


def check_head_structured(encode_inputs: Encode, decode_output: Decode) -> bool:
    """For every head-structured P = (τ, σ) (all 8) and every π in S_{n+1}: GQA attention on the encoded
    Q, K, V, decoded, equals GQA attention on Q, K, V, and the O stage's rows equal [O; R][π] of it (R one
    symbolic decoy row), entry by entry."""
    q = sym_matrix("q", _N, _QW, real=True)
    k = sym_matrix("k", _N, _HKV * _DH, real=True)
    v = sym_matrix("v", _N, _HKV * _DH, real=True)
    decoys = sym_matrix("r", 1, _QW, real=True)
    plain = gqa_attention(q, k, v)
    for tau in perms(_HKV):
        for sigmas in itertools.product(list(perms(_DH)), repeat=_HKV):
            perm = (tau, tuple(sigmas))
            output = gqa_attention(*encode_inputs(q, k, v, perm))
            for pi in perms(_N + 1):
                decoded, rows = decode_output(output, perm, decoys, pi)
                if not (
                    matrices_equal(decoded, plain, quick=True)
                    and matrices_equal(rows, encode(plain, decoys, pi), quick=True)
                ):
                    return False
    return True


def check_characterization(claimed_exact: frozenset[Perm] | None = None) -> bool:
    """Exactly the permutations in ``claimed_exact`` (default: the head-structured ones) of S_4 are exact:
    each is proved exact, each other one is refuted by a nonzero witness."""
    structured = set(head_structured()) if claimed_exact is None else set(claimed_exact)
    for p in perms(_HKV * _DH):
        if p in structured:
            if not is_exact(p):
                return False
        elif not any(
            nonzero_at_random_point(e, seed=i) for i, e in enumerate(_difference(p, move_query_heads=True))
        ):
            return False
    return True


_CROSS_HEAD: Perm = (0, 2, 1, 3)  # swaps coordinate 1 of head 0 with coordinate 0 of head 1
_GROUP_SWAP: Perm = (2, 3, 0, 1)  # reorders the two KV groups


@identity(
    "head_structure.head_structured_exact",
    "GQA 4 query / 2 KV heads, d_h=2, n=2, causal; all 8 head-structured P; O stage rows: 1 decoy, every π",
    implements=IMPLEMENTS,
    negative_controls=[
        (
            "P mixing coordinates across heads",
            lambda: check_head_structured(*_flat_scheme(lambda _: _CROSS_HEAD, move_query_heads=True)),
        ),
        (
            "KV groups reordered, query heads not moved",
            lambda: check_head_structured(
                *_flat_scheme(lambda perm: flat_index(perm, 1), move_query_heads=False)
            ),
        ),
        ("O decoded with P instead of P⁻¹", lambda: check_head_structured(protocol_encode, _decode_with_p)),
        (
            "O stage rows re-encoded in P's feature order",
            lambda: check_head_structured(protocol_encode, _rows_in_p_order),
        ),
    ],
)
def head_structured_exact() -> bool:
    """Every head-structured P (group reorder + per-group σ) is exact, through the library's statements."""
    return check_head_structured(protocol_encode, protocol_decode)


@identity(
    "head_structure.only_head_structured_exact",
    "all 24 P in S_4 of KV coordinates: 8 exact, 16 cross-head ones refuted by exact witnesses",
    negative_controls=[
        ("every P in S_4 claimed exact", lambda: check_characterization(frozenset(perms(_HKV * _DH)))),
        (
            "a head-structured P claimed inexact (no witness exists)",
            lambda: check_characterization(frozenset(head_structured()) - {_GROUP_SWAP}),
        ),
    ],
)
def only_head_structured_exact() -> bool:
    """A P that mixes coordinates across heads is not exact."""
    return check_characterization()

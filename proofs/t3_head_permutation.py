"""T3, head-dim permutation (DESIGN.md §4): attention commutes with a permutation σ of head coordinates.

With fully symbolic real Q, K, V (n×d_h), a symbolic real scale s (any scale: 0 and negative too, as
DESIGN §4 states it) and every σ in S_{d_h}:

    softmax(Q_σ K_σᵀ·s + M) V_σ · σ⁻¹ − softmax(QKᵀ·s + M) V = 0

for M = no mask, the causal mask (−∞ above the diagonal) and a fully symbolic additive mask; and with
GQA, two query heads Q₁, Q₂ sharing one KV head under the group's σ. The proof is structural: the score
polynomials Q_σK_σᵀ and QKᵀ expand to the same polynomial (Σ_c q_{i,σ(c)} k_{j,σ(c)} = Σ_c q_{ic}k_{jc}), so
the softmax weights agree symbolically, and V_σ·σ⁻¹ = V.

Negative controls, through the same checker: permute Q but not K; σ on Q and a different σ′ on K; decode
with σ instead of σ⁻¹; leave V unpermuted; in GQA, give the second query head its own σ′ ≠ σ of its group.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import (
    Perm,
    attention,
    causal_mask,
    compose,
    inverse,
    matrices_equal,
    perms,
    permute_cols,
    sym_matrix,
)

#: σ ↦ (σ for query head 1, σ for query head 2, σ for K, σ for V, permutation applied to decode O).
Scheme = Callable[[Perm], tuple[Perm, Perm, Perm, Perm, Perm]]

_SCALE = sp.Symbol("s", real=True)  # any real scale (DESIGN §4 T3: "any scale"), 0 and negative included
_SIZES = [(n, dh) for n in (1, 2, 3) for dh in (1, 2, 3)]
_MASKS = ("none", "causal", "symbolic")


#: A head permutation in sympy form: (KV-group order, per-group coordinate permutations σ_g).
HeadPerm = tuple[Perm, tuple[Perm, ...]]


def encode_group(x: sp.Matrix, perm: HeadPerm, group_size: int) -> sp.Matrix:
    """T3 encode of one KV group as the proof writes it: every one of the group's ``group_size`` head
    blocks of ``x`` (rows × group_size·d_h) gets the group's σ (``scx_ref.transforms.head_permute`` with one
    KV head)."""
    order, sigmas = perm
    if tuple(order) != (0,):
        raise ValueError("T3 is stated for one KV group; head_structure covers group reordering")
    sigma = sigmas[0]
    dh = len(sigma)
    return sp.Matrix.hstack(*[permute_cols(x[:, h * dh : (h + 1) * dh], sigma) for h in range(group_size)])


def decode_group(y: sp.Matrix, perm: HeadPerm, group_size: int) -> sp.Matrix:
    """T3 decode of one KV group: σ⁻¹ on every head block (``scx_ref.transforms.head_unpermute``)."""
    order, sigmas = perm
    return encode_group(y, (order, (inverse(sigmas[0]),)), group_size)


#: The library functions T3's identities are about (one KV group), with the expressions the checker uses.
IMPLEMENTS = (
    Implementation("scx_ref.transforms.head_permute", encode_group),
    Implementation("scx_ref.transforms.head_unpermute", decode_group),
)


def _shift(p: Perm) -> Perm:
    """σ followed by a fixed cyclic shift of the coordinates: differs from σ whenever d_h ≥ 2."""
    return compose(p, tuple((i + 1) % len(p) for i in range(len(p))))


def protocol(s: Perm) -> tuple[Perm, Perm, Perm, Perm, Perm]:
    """The protocol: σ on every query head of the group, on K and on V; decode with σ⁻¹."""
    return s, s, s, s, inverse(s)


def q_not_k(s: Perm) -> tuple[Perm, Perm, Perm, Perm, Perm]:
    """Wrong: permute Q but not K."""
    ident = tuple(range(len(s)))
    return s, s, ident, s, inverse(s)


def different_sigma_on_k(s: Perm) -> tuple[Perm, Perm, Perm, Perm, Perm]:
    """Wrong: σ on Q and a different σ′ on K."""
    return s, s, _shift(s), s, inverse(s)


def decode_with_sigma(s: Perm) -> tuple[Perm, Perm, Perm, Perm, Perm]:
    """Wrong: decode with σ instead of σ⁻¹."""
    return s, s, s, s, s


def v_unpermuted(s: Perm) -> tuple[Perm, Perm, Perm, Perm, Perm]:
    """Wrong: V is sent unpermuted but O is still decoded with σ⁻¹."""
    return s, s, s, tuple(range(len(s))), inverse(s)


def second_head_own_sigma(s: Perm) -> tuple[Perm, Perm, Perm, Perm, Perm]:
    """Wrong (GQA): the second query head of the group uses σ′ ≠ σ while K, V use σ."""
    return s, _shift(s), s, s, inverse(s)


def _mask(kind: str, n: int) -> sp.Matrix | None:
    if kind == "none":
        return None
    if kind == "causal":
        return causal_mask(n, n)
    return sym_matrix("m", n, n, real=True)


def check_attention(scheme: Scheme, *, gqa: bool, min_dh: int = 1) -> bool:
    """For every (n, d_h) in the sizes, every mask kind and every σ in S_{d_h}: decoded encoded attention
    equals plaintext attention, entry by entry (for each of the one or two query heads)."""
    for n, dh in _SIZES:
        if dh < min_dh:
            continue
        heads = [sym_matrix(f"q{h}", n, dh, real=True) for h in range(2 if gqa else 1)]
        k = sym_matrix("k", n, dh, real=True)
        v = sym_matrix("v", n, dh, real=True)
        for kind in _MASKS:
            mask = _mask(kind, n)
            plain = [attention(q, k, v, _SCALE, mask) for q in heads]
            for sigma in perms(dh):
                q1, q2, ks, vs, dec = scheme(sigma)
                k_enc, v_enc = encode_group(k, ((0,), (ks,)), 1), encode_group(v, ((0,), (vs,)), 1)
                for q, q_perm, expected in zip(heads, (q1, q2), plain, strict=False):
                    q_enc = encode_group(q, ((0,), (q_perm,)), 1)
                    # decode_group applies the inverse of the σ it is given: dec⁻¹ makes it apply dec
                    out = decode_group(
                        attention(q_enc, k_enc, v_enc, _SCALE, mask), ((0,), (inverse(dec),)), 1
                    )
                    if not matrices_equal(out, expected, quick=True):
                        return False
    return True


@identity(
    "t3.attention_mha",
    "symbolic Q, K, V, scale; n, d_h in 1..3; masks none/causal(−∞)/symbolic; every σ in S_{d_h}",
    implements=IMPLEMENTS,
    negative_controls=[
        ("permute Q but not K", lambda: check_attention(q_not_k, gqa=False)),
        ("σ on Q, a different σ′ on K", lambda: check_attention(different_sigma_on_k, gqa=False)),
        ("decode with σ instead of σ⁻¹", lambda: check_attention(decode_with_sigma, gqa=False)),
        ("V left unpermuted", lambda: check_attention(v_unpermuted, gqa=False)),
    ],
)
def attention_mha() -> bool:
    """Attn(Qσ, Kσ, Vσ)σ⁻¹ = Attn(Q, K, V) for one head, every σ, with and without masks."""
    return check_attention(protocol, gqa=False)


@identity(
    "t3.attention_gqa",
    "GQA: 2 query heads on 1 KV head; n, d_h in 1..3; masks none/causal/symbolic; every σ in S_{d_h}",
    implements=IMPLEMENTS,
    negative_controls=[
        (
            "second query head with its own σ′ ≠ group σ",
            lambda: check_attention(second_head_own_sigma, gqa=True),
        ),
        ("permute Q but not K", lambda: check_attention(q_not_k, gqa=True)),
    ],
)
def attention_gqa() -> bool:
    """Both query heads of a KV group under the group's σ: exact for every σ and mask."""
    return check_attention(protocol, gqa=True)

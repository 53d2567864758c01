"""RoPE versus the head-dim permutation σ (DESIGN.md §4, T3): why the client applies RoPE before σ.

RoPE in the Hugging Face rotate_half convention, head dim d_h = 4, symbolic base θ > 0 and position m:
rope(x, m) = x ⊙ cos(m·f) + rotate_half(x) ⊙ sin(m·f), rotate_half(x) = concat(−x₂, x₁), and
f = (θ^(−2i/d_h))_{i < d_h/2} duplicated over both halves.

1. Counterexample: RoPE does not commute with a generic σ. For every σ ≠ id in S_4,
   rope(x[σ], m) − rope(x, m)[σ] is not identically zero; each is certified by its exact value at a point
   (m = 1, θ = 10000, rational x), evaluated with error-controlled evalf. Negative control: at m = 0 RoPE
   is the identity, so the same checker must find no witness.
2. Protocol order is exact: with symbolic q, k and positions m, n, for every σ in S_4,
   rope(q, m)[σ] · rope(k, n)[σ] = rope(q, m) · rope(k, n) (the server's scores are the true RoPE'd
   scores). Negative controls: σ before RoPE (the server applying RoPE after σ), and σ on q with σ′ on k.

Both checkers compute rope(x, m)[σ] — what the client sends — through :func:`decode_qkv_heads` (one KV
head, G = 1, P = σ; x in the Q or K heads of a two-row reply), the statement ``tests/test_proof_links.py``
holds ``scx_ref.transforms.decode_qkv_heads`` to, and the true RoPE'd vectors through :func:`apply_rope`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp

from proofs._registry import Implementation, identity
from proofs._sym import Perm, compose, nonzero_at_random_point, perms, quick_is_zero

_DH = 4
_THETA = sp.Symbol("theta", positive=True)
_M, _N = sp.symbols("m n", positive=True)


def rope(x: Sequence[sp.Expr], position: sp.Expr, theta: sp.Expr = _THETA) -> list[sp.Expr]:
    """HF RoPE of one head vector: x·cos(m f) + rotate_half(x)·sin(m f)."""
    dh = len(x)
    half = dh // 2
    inv_freq = [theta ** (sp.Integer(-2 * i) / dh) for i in range(half)]
    freq = inv_freq + inv_freq
    rotated = [-x[c + half] for c in range(half)] + [x[c] for c in range(half)]
    return [x[c] * sp.cos(position * freq[c]) + rotated[c] * sp.sin(position * freq[c]) for c in range(dh)]


def apply_rope(
    x: Sequence[Sequence[Sequence[sp.Expr]]], positions: Sequence[sp.Expr], theta: sp.Expr
) -> list[list[list[sp.Expr]]]:
    """RoPE of rows × heads × d_h, row r at ``positions[r]``: :func:`rope` on every head vector
    (``scx_ref.ops.apply_rope``)."""
    return [[rope(head, m, theta) for head in row] for row, m in zip(x, positions, strict=True)]


def decode_qkv_heads(
    z: sp.Matrix,
    pi: Perm,
    n: int,
    positions: Sequence[sp.Expr],
    theta: sp.Expr,
    perm: tuple[Perm, tuple[Perm, ...]],
    group_size: int,
) -> tuple[sp.Matrix, sp.Matrix]:
    """The client's QKV decode in the protocol order this module proves exact — decode the rows, RoPE
    Q and K, *then* apply P — as the proof writes it: ``(head_permute_stacked(rope([Q K]), P, (G, 1)),
    head_permute(V, P, 1))`` (``scx_ref.transforms.decode_qkv_heads``, which fuses the passes)."""
    from proofs.head_structure import head_permute, head_permute_stacked
    from proofs.t2_decoys import decode

    tau, sigmas = perm
    dh, kv = len(sigmas[0]), len(tau)
    t = decode(z, pi, n)
    qk_width = kv * (group_size + 1) * dh
    heads = [[[t[r, h * dh + c] for c in range(dh)] for h in range(qk_width // dh)] for r in range(n)]
    roped = apply_rope(heads, positions, theta)
    qk = sp.Matrix([[v for head in row for v in head] for row in roped]) if n else sp.zeros(0, qk_width)
    v = t[:, qk_width:]
    return head_permute_stacked(qk, perm, (group_size, 1)), head_permute(v, perm, 1)


#: The library functions the RoPE identities are about, with the expressions the checkers use.
IMPLEMENTS = (
    Implementation("scx_ref.ops.apply_rope", apply_rope),
    Implementation("scx_ref.transforms.decode_qkv_heads", decode_qkv_heads),
)


def _apply(x: Sequence[sp.Expr], sigma: Perm) -> list[sp.Expr]:
    """x[σ]: coordinate c of the result is coordinate σ(c) of x."""
    return [x[i] for i in sigma]


def _dot(a: Sequence[sp.Expr], b: Sequence[sp.Expr]) -> sp.Expr:
    return sp.Add(*[u * v for u, v in zip(a, b, strict=True)])


def _roped(x: Sequence[sp.Expr], position: sp.Expr, theta: sp.Expr = _THETA) -> list[sp.Expr]:
    """One head vector through :func:`apply_rope` (one row, one head): the checkers evaluate the very
    statement that ``tests/test_proof_links.py`` holds ``scx_ref.ops.apply_rope`` to."""
    return apply_rope([[x]], [position], theta)[0][0]


def _sent(
    q: Sequence[sp.Expr], k: Sequence[sp.Expr], m: sp.Expr, n: sp.Expr, theta: sp.Expr, sigma: Perm
) -> tuple[list[sp.Expr], list[sp.Expr]]:
    """(rope(q, m)[σ], rope(k, n)[σ]) as the client computes them: a two-row QKV reply (one KV head,
    G = 1) holding q in row 0's Q head at position m and k in row 1's K head at position n (every other
    entry 0) through :func:`decode_qkv_heads` with P = σ; row 0's Q head and row 1's K head of the result."""
    zero = [sp.S.Zero] * _DH
    z = sp.Matrix([[*q, *zero, *zero], [*zero, *k, *zero]])
    qk, _ = decode_qkv_heads(z, (0, 1), 2, [m, n], theta, ((0,), (sigma,)), 1)
    return list(qk[0, :_DH]), list(qk[1, _DH : 2 * _DH])


def check_rope_noncommuting(position: sp.Expr) -> bool:
    """True iff for every σ ≠ id in S_{d_h} some coordinate of rope(x[σ]) − rope(x)[σ] has an exact
    nonzero witness (at θ = 10000 and the given position); rope(x)[σ] is what :func:`decode_qkv_heads`
    sends for x."""
    x = list(sp.symbols(f"x0:{_DH}", real=True))
    zero = [sp.S.Zero] * _DH
    identity_perm = tuple(range(_DH))
    for sigma in perms(_DH):
        if sigma == identity_perm:
            continue
        lhs = _roped(_apply(x, sigma), position, sp.Integer(10000))
        rhs = _sent(x, zero, position, sp.S.Zero, sp.Integer(10000), sigma)[0]
        if not any(
            nonzero_at_random_point(a - b, seed=c) for c, (a, b) in enumerate(zip(lhs, rhs, strict=True))
        ):
            return False
    return True


def check_score_order(order: str) -> bool:
    """For every σ in S_{d_h}: the encoded score equals rope(q, m)·rope(k, n) symbolically.

    ``order`` is ``"rope-then-sigma"`` (the protocol: q and k as :func:`decode_qkv_heads` sends them),
    ``"sigma-then-rope"`` (wrong: RoPE after σ) or ``"different-sigma-on-k"`` (wrong: q sent under σ,
    k under σ′).
    """
    q = list(sp.symbols(f"q0:{_DH}", real=True))
    k = list(sp.symbols(f"k0:{_DH}", real=True))
    plain = _dot(_roped(q, _M), _roped(k, _N))
    shift = tuple((i + 1) % _DH for i in range(_DH))
    for sigma in perms(_DH):
        if order == "rope-then-sigma":
            score = _dot(*_sent(q, k, _M, _N, _THETA, sigma))
        elif order == "sigma-then-rope":
            score = _dot(_roped(_apply(q, sigma), _M), _roped(_apply(k, sigma), _N))
        elif order == "different-sigma-on-k":
            q_sent = _sent(q, k, _M, _N, _THETA, sigma)[0]
            score = _dot(q_sent, _sent(q, k, _M, _N, _THETA, compose(sigma, shift))[1])
        else:
            raise ValueError(order)
        if not quick_is_zero(score - plain):
            return False
    return True


@identity(
    "rope.does_not_commute_with_sigma",
    f"d_h={_DH}, every σ ≠ id in S_{_DH}; exact witnesses at m=1, θ=10000",
    implements=IMPLEMENTS,
    negative_controls=[
        ("same checker at position m = 0 (RoPE = identity)", lambda: check_rope_noncommuting(sp.Integer(0))),
    ],
    proved_label="COUNTEREXAMPLE PROVED (RoPE∘σ ≠ σ∘RoPE)",
)
def rope_does_not_commute() -> bool:
    """RoPE does not commute with any non-identity head-dim permutation."""
    return check_rope_noncommuting(sp.Integer(1))


@identity(
    "rope.rope_then_sigma_exact",
    f"symbolic q, k, positions m, n, base θ; d_h={_DH}; every σ in S_{_DH}",
    implements=IMPLEMENTS,
    negative_controls=[
        ("σ before RoPE (RoPE after σ)", lambda: check_score_order("sigma-then-rope")),
        ("RoPE then σ on q, σ′ on k", lambda: check_score_order("different-sigma-on-k")),
    ],
)
def rope_then_sigma() -> bool:
    """rope(q)[σ] · rope(k)[σ] = rope(q) · rope(k) for every σ."""
    return check_score_order("rope-then-sigma")

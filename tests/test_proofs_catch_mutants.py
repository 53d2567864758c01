"""The proof evidence (``python -m proofs``): what the proofs check, whether they can fail.

* Each identity's checker evaluates the very symbolic statement that ``implements`` names — the statement
  ``tests/test_proof_links.py`` holds the library function to — so proof ∧ link is about the code. There
  are no exceptions: the composites (``decode_qkv_heads``: decode, RoPE, P) are evaluated whole by the RoPE
  checkers, the sensitivity bound as a function of γ by its checker's step 7, and the head-permutation
  family by the head-structure checker (the cross-head characterization, which no head-structured
  statement can express, implements nothing).
* Mutations: a broken statement makes its identity fail; a broken library function is caught by its link
  (the proofs themselves never run scx_ref).
* Negative controls go through the identity's own checker; edge cases (r = 0 decoys) are proved; a
  failing identity makes the run exit 1; a filter that matches nothing is an error (exit 2).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import sympy as sp

import proofs.head_structure as hs
import proofs.laplace as lap
import proofs.rope_order as rope
import proofs.sensitivity as sens
import proofs.t1_token_permutation as t1
import proofs.t2_decoys as t2
import proofs.t3_head_permutation as t3
import proofs.t4_cache_order as t4
import proofs.t5_blinding as t5
import proofs.t7_norm_scaling as t7
import proofs.verify_products as vp
from proofs import Identity, Implementation, all_identities
from proofs.__main__ import main, run
from proofs._sym import inverse, nonzero_at_random_point, permute_rows, rmsnorm_row
from scx_ref import ops, transforms
from scx_ref.transforms import HeadPermutation
from tests import test_proof_links as links

IDENTITIES = {entry.name: entry for entry in all_identities()}

PAIRS = [(entry, impl) for entry in IDENTITIES.values() for impl in entry.implements]


@contextmanager
def replaced(function: Callable[..., Any], by: Callable[..., Any]) -> Iterator[None]:
    """Replace ``function`` by ``by`` wherever a proofs module holds it (its own module and importers)."""
    holders = [
        (module, name)
        for module_name, module in list(sys.modules.items())
        if module_name == "proofs" or module_name.startswith("proofs.")
        for name, value in list(vars(module).items())
        if value is function
    ]
    assert holders, f"{function.__qualname__} is held by no proofs module"
    try:
        for module, name in holders:
            setattr(module, name, by)
        yield
    finally:
        for module, name in holders:
            setattr(module, name, function)


# ----------------------------------------------------------------------------- statements are checked


@pytest.mark.parametrize(
    ("entry", "impl"), PAIRS, ids=[f"{e.name}:{i.function.rpartition('.')[2]}" for e, i in PAIRS]
)
def test_the_identity_checks_the_statement_its_link_holds_the_code_to(
    entry: Identity, impl: Implementation
) -> None:
    """A statement the checker never evaluates would let the linked code differ from what was proved."""
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return impl.symbolic(*args, **kwargs)

    with replaced(impl.symbolic, counted):
        assert entry.check() is True
    assert calls, (entry.name, impl.function)


# ----------------------------------------------------------------------------- mutated statements fail


def _rope_ignoring_position(x: Any, positions: Any, theta: sp.Expr) -> Any:
    return [[list(head) for head in row] for row in x]


def _rms_norm_eps_outside_sqrt(x: sp.Matrix, gamma: sp.Matrix, eps: sp.Expr) -> sp.Matrix:
    def row(v: list[sp.Expr]) -> list[sp.Expr]:
        r = sp.sqrt(sp.Add(*[a**2 for a in v]) / len(v)) + eps
        return [g * a / r for g, a in zip(gamma, v, strict=True)]

    return sp.Matrix([row(list(x.row(i))) for i in range(x.rows)])


def _rms_norm_without_eps(x: sp.Matrix, gamma: sp.Matrix, eps: sp.Expr) -> sp.Matrix:
    return sp.Matrix([rmsnorm_row(list(x.row(i)), list(gamma)) for i in range(x.rows)])


_PROJECT64_NORM, _LAPLACE_NOISE = vp.project64_norm, lap.laplace_noise  # the originals, for the mutants
_DECODE_QKV, _APPLY_ROPE, _STACKED = rope.decode_qkv_heads, rope.apply_rope, hs.head_permute_stacked
_PERMUTE, _UNPERMUTE, _SENSITIVITY = hs.head_permute, hs.head_unpermute, sens.rmsnorm_sensitivity


def _decode_qkv_p_before_rope(
    z: sp.Matrix, pi: Any, n: int, positions: Any, theta: sp.Expr, perm: Any, group_size: int
) -> tuple[sp.Matrix, sp.Matrix]:
    """decode_qkv_heads with P applied *before* RoPE (RoPE at position 0 is the identity: P alone)."""
    qk, v = _DECODE_QKV(z, pi, n, [sp.S.Zero] * n, theta, perm, group_size)
    dh = len(perm[1][0])
    heads = [[[qk[r, h * dh + c] for c in range(dh)] for h in range(qk.cols // dh)] for r in range(n)]
    roped = _APPLY_ROPE(heads, positions, theta)
    return sp.Matrix([[x for head in row for x in head] for row in roped]), v


def _flat_index_queries_not_moved(perm: Any, group_size: int) -> tuple[int, ...]:
    """flat_index moving the KV heads (group size 1) but not the query heads with their group. (Not moving
    either would be another head-structured P, exact too: a wrong key, which only the link catches.)"""
    tau, sigmas = perm
    p = hs.kv_permutation(tau, sigmas)
    return hs.lift_to_queries(
        p, move_query_heads=group_size == 1, n_kv=len(tau), group=group_size, dh=len(sigmas[0])
    )


def _norm_squared(x: sp.Matrix, gamma: Any, eps: sp.Expr, right: sp.Matrix) -> tuple[sp.Matrix, sp.Matrix]:
    product, norm = _PROJECT64_NORM(x, gamma, eps, right)
    return product, norm.applyfunc(lambda v: v**2)


MUTANTS: dict[str, tuple[Callable[..., Any], Callable[..., Any], str]] = {
    "t1 decode with an off-by-one inverse": (
        t1.decode,
        lambda y, pi: permute_rows(y, tuple(inverse(pi)[(i + 1) % len(pi)] for i in range(len(pi)))),
        "t1.affine",
    ),
    "t3 head_unpermute applies σ, not σ⁻¹": (
        t3.decode_group,
        lambda y, perm, g: t3.encode_group(y, perm, g),
        "t3.attention_mha",
    ),
    "t5 correction with the wrong sign": (t5.blinding_correction, lambda e, w: -(e * w), "t5.blinding"),
    "RoPE ignoring the position": (
        rope.apply_rope,
        _rope_ignoring_position,
        "rope.does_not_commute_with_sigma",
    ),
    "RMSNorm with ε outside the root": (t7.rms_norm, _rms_norm_eps_outside_sqrt, "t7.scaling_rule"),
    "RMSNorm without ε": (t7.rms_norm, _rms_norm_without_eps, "t7.paper_claim"),
    "Laplace sampler with the sign flipped": (
        lap.laplace_noise,
        lambda shape, beta, u: [-v for v in _LAPLACE_NOISE(shape, beta, u)],
        "laplace.inverse_cdf",
    ),
    "project64_norm returning ‖x̂‖²": (vp.project64_norm, _norm_squared, "verify.rmsnorm_folded"),
    "decode_qkv_heads with P before RoPE (rope_then_sigma)": (
        rope.decode_qkv_heads,
        _decode_qkv_p_before_rope,
        "rope.rope_then_sigma_exact",
    ),
    "decode_qkv_heads with P before RoPE (does_not_commute)": (
        rope.decode_qkv_heads,
        _decode_qkv_p_before_rope,
        "rope.does_not_commute_with_sigma",
    ),
    "sensitivity bound with the factor 2 dropped": (
        sens.rmsnorm_sensitivity,
        lambda gamma: _SENSITIVITY(gamma) / 2,
        "sensitivity.rmsnorm_l1",
    ),
    "flat_index not moving the query heads": (
        hs.flat_index,
        _flat_index_queries_not_moved,
        "head_structure.head_structured_exact",
    ),
    "head_permute applying P⁻¹": (
        hs.head_permute,
        lambda x, perm, g: _UNPERMUTE(x, perm, g),
        "head_structure.head_structured_exact",
    ),
    "head_unpermute applying P": (
        hs.head_unpermute,
        lambda y, perm, g: _PERMUTE(y, perm, g),
        "head_structure.head_structured_exact",
    ),
    "head_permute_stacked with group size 1 for every block": (
        hs.head_permute_stacked,
        lambda x, perm, sizes: _STACKED(x, perm, (1,) * sum(sizes)),
        "head_structure.head_structured_exact",
    ),
    "encode_head_rows without the head unpermute": (
        hs.encode_head_rows,
        lambda o, perm, g, decoys, pi: t2.encode(o, decoys, pi),
        "head_structure.head_structured_exact",
    ),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_broken_statement_makes_its_identity_fail(mutant: str) -> None:
    function, broken, name = MUTANTS[mutant]
    assert IDENTITIES[name].check() is True  # the control: the unbroken statement is proved
    with replaced(function, broken):
        assert IDENTITIES[name].check() is False


# ----------------------------------------------------------------------------- edge cases: r = 0


def test_decoy_free_decode_is_proved() -> None:
    """A decode wrong only when there are no decoys (r = 0: π left applied) must fail t2.decoys."""
    proper = t2.decode

    def wrong_without_decoys(y: sp.Matrix, pi: tuple[int, ...], n: int) -> sp.Matrix:
        return permute_rows(y, pi)[:n, :] if len(pi) == n else proper(y, pi, n)

    with replaced(t2.decode, wrong_without_decoys):
        assert IDENTITIES["t2.decoys"].check() is False


def test_decoy_free_locked_scores_are_proved() -> None:
    """An unlock wrong only without decoys must fail t4.locked_scores."""
    proper = t4.unlock_scores

    def wrong_without_decoys(scores: sp.Matrix, rho: tuple[int, ...], n: int) -> sp.Matrix:
        return t4._unlock(scores, rho, n, rho) if len(rho) == n else proper(scores, rho, n)

    with replaced(t4.unlock_scores, wrong_without_decoys):
        assert IDENTITIES["t4.locked_scores"].check() is False


# ----------------------------------------------------------------------------- code mutations: links


def _orig(path: str) -> Callable[..., Any]:
    return links.resolve(path)


CODE_MUTANTS: dict[str, tuple[str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = {
    "off-by-one inverse": (
        "scx_ref.transforms.inverse_permutation",
        lambda f: lambda p: np.roll(f(p), 1) if len(p) > 1 else f(p),
    ),
    "unblind adds the correction": (
        "scx_ref.transforms.unblind",
        lambda f: lambda y, c, *a: f(y, -np.asarray(c), *a),
    ),
    "correction off by 1e-3": (
        "scx_ref.transforms.blinding_correction",
        lambda f: lambda e, w, *a: f(e, w, *a) + 1e-3,
    ),
    "RoPE position shifted by one": (
        "scx_ref.ops.apply_rope",
        lambda f: lambda x, pos, theta: f(x, np.asarray(pos) + 1, theta),
    ),
    "RMSNorm scale off": ("scx_ref.ops.rms_norm", lambda f: lambda x, g, e: f(x, g, e) * (1 + 1e-9)),
    "sensitivity constant √d instead of 2√d": (
        "scx_ref.dp.sensitivity.rmsnorm_sensitivity",
        lambda f: lambda g: f(g) / 2,
    ),
    "decode_qkv_heads RoPE one position late": (
        "scx_ref.transforms.decode_qkv_heads",
        lambda f: lambda z, p, n, pos, hp, g, b: f(z, p, n, np.asarray(pos) + 1, hp, g, b),
    ),
    "decode_qkv_heads applying P before RoPE": (
        "scx_ref.transforms.decode_qkv_heads",
        lambda f: _np_decode_qkv_p_before_rope,
    ),
    "decode_qkv_heads sending V unpermuted": (
        "scx_ref.transforms.decode_qkv_heads",
        lambda f: (
            lambda z, p, n, pos, hp, g, b: (
                f(z, p, n, pos, hp, g, b)[0],
                f(z, p, n, pos, HeadPermutation.identity(hp.n_kv_heads, hp.head_dim), g, b)[1],
            )
        ),
    ),
    "flat_index not moving the query heads": (
        "scx_ref.transforms.HeadPermutation.flat_index",
        lambda f: lambda hp, g: _np_flat_index_queries_not_moved(f, hp, g),
    ),
    "head_permute applying P⁻¹": (
        "scx_ref.transforms.head_permute",
        lambda f: lambda x, hp, g: transforms.head_unpermute(x, hp, g),
    ),
    "head_unpermute applying P": (
        "scx_ref.transforms.head_unpermute",
        lambda f: lambda y, hp, g: transforms.head_permute(y, hp, g),
    ),
    "head_permute_stacked with group size 1 for every block": (
        "scx_ref.transforms.head_permute_stacked",
        lambda f: lambda x, hp, sizes: f(x, hp, (1,) * sum(sizes)),
    ),
    "encode_head_rows without the head unpermute": (
        "scx_ref.transforms.encode_head_rows",
        lambda f: lambda o, hp, g, dec, p: transforms.encode_rows(np.asarray(o).reshape(len(o), -1), dec, p),
    ),
}


def _np_decode_qkv_p_before_rope(
    z: Any, perm: Any, n: int, positions: Any, hp: HeadPermutation, g: int, backend: Any
) -> tuple[np.ndarray, np.ndarray]:
    """decode_qkv_heads in the wrong order: decode the rows, apply P, *then* RoPE Q and K."""
    heads: np.ndarray = np.asarray(transforms.decode_rows(z, perm, n)).reshape(n, -1, hp.head_dim)
    qk = hp.n_kv_heads * (g + 1)
    permuted: np.ndarray = transforms.head_permute_stacked(heads[:, :qk], hp, (g, 1))
    v: np.ndarray = transforms.head_permute(heads[:, qk:], hp, 1)
    return ops.apply_rope(permuted, positions, backend.config.rope_theta), v


def _np_flat_index_queries_not_moved(f: Callable[..., Any], hp: HeadPermutation, g: int) -> np.ndarray:
    """flat_index with the KV heads (group size 1) reordered but each query head left in its slot (only its
    coordinates taken from the moved group's σ)."""
    kv, dh = f(hp, 1), hp.head_dim
    if g == 1:
        return np.asarray(kv, dtype=np.int64)
    index = [
        (j * g + t) * dh + int(kv[j * dh + c]) % dh
        for j in range(hp.n_kv_heads)
        for t in range(g)
        for c in range(dh)
    ]
    return np.array(index, dtype=np.int64)


def _link_holds(path: str, function: Callable[..., Any]) -> bool:
    """Whether ``function`` passes every link test of ``path`` (each naming identity's statement, with its
    family's instances, every seed) — the comparison of tests/test_proof_links.py."""
    family_impls = {(family, i.symbolic) for _, family, i in links.LINKS if i.function == path}
    assert family_impls, f"no link names {path}"
    for family, symbolic in family_impls:
        for seed in links.SEEDS:
            code, sym, to_numpy = links.case(path, family, np.random.default_rng([seed, len(path)]))
            try:
                links._close(
                    function(*code), to_numpy(symbolic(*sym)), path.rpartition(".")[2] in links._GATHERS
                )
            except AssertionError:
                return False
    return True


@pytest.mark.parametrize("mutant", list(CODE_MUTANTS))
def test_a_broken_library_function_is_caught_by_its_link(mutant: str) -> None:
    """The proofs never run scx_ref (a code mutation leaves every identity proved): the link to the
    proof's statement is what catches it. The unmutated function must pass the same comparison."""
    path, mutate = CODE_MUTANTS[mutant]
    assert _link_holds(path, _orig(path))
    assert not _link_holds(path, mutate(_orig(path)))


# ----------------------------------------------------------------------------- controls and the runner


def test_the_characterization_controls_run_the_identitys_own_checker() -> None:
    entry = IDENTITIES["head_structure.only_head_structured_exact"]
    calls: list[int] = []
    proper = hs.check_characterization

    def counted(*args: Any, **kwargs: Any) -> bool:
        calls.append(1)
        return proper(*args, **kwargs)

    with replaced(proper, counted):
        for _, control in entry.negative_controls:
            before = len(calls)
            assert control() is False
            assert len(calls) > before
    assert len(entry.negative_controls) >= 2


def test_a_failing_identity_fails_the_run(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    good = IDENTITIES["t5.blinding"]
    failing = Identity("t5.broken", good.covers, lambda: False, good.negative_controls)
    monkeypatch.setattr("proofs.__main__.all_identities", lambda: [good, failing])
    buffer = io.StringIO()
    assert run(out=buffer) == 1
    assert "t5.broken" in buffer.getvalue() and "FAILED (did not simplify to 0)" in buffer.getvalue()
    assert "1 FAILURE(S)" in buffer.getvalue()
    assert main(["t5."]) == 1


def test_the_run_says_where_the_code_is_held_to_the_statements() -> None:
    buffer = io.StringIO()
    assert run(["t5."], out=buffer) == 0
    assert "tests/test_proof_links.py" in buffer.getvalue()


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [["t5.", "no-such-identity"], ["no-such-identity", "t1."]])
def test_a_filter_that_matches_nothing_is_an_error_even_beside_a_good_one(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("python -m proofs: error: no identity name contains 'no-such-identity';")


def test_bad_options_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as bad:
        main(["--bogus"])
    assert bad.value.code == 2 and "python -m proofs: error: unrecognized arguments: --bogus" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    assert shown.value.code == 0 and "FILTER matches no" in capsys.readouterr().out


# ----------------------------------------------------------------------------- certificates


def test_a_pole_certifies_nothing() -> None:
    """At a point where the expression is 0/0 or infinite, no nonzero certificate (and no crash)."""
    x = sp.Symbol("x", real=True)
    removable = (x**2 - 1) / (x - 1) - (x + 1)  # identically 0 where defined; 0/0 at x = 1
    seeds = [s for s in range(40) if removable.subs(x, 1) is sp.nan]
    assert seeds
    pole_seeds = []
    for seed in range(40):
        point = sp.Rational(*_first_point(seed))
        if point == 1:
            pole_seeds.append(seed)
    assert pole_seeds, "no seed puts x at the pole"
    for seed in pole_seeds:
        assert nonzero_at_random_point(removable, seed=seed) is False
        assert nonzero_at_random_point(1 / (x - 1), seed=seed) is False
    assert nonzero_at_random_point(1 / (x - 1), seed=next(s for s in range(40) if s not in pole_seeds))


def _first_point(seed: int) -> tuple[int, int]:
    """The value nonzero_at_random_point gives the only (real) symbol for ``seed``."""
    import random

    rng = random.Random(seed)
    return rng.randint(-9, 9), rng.randint(1, 5)

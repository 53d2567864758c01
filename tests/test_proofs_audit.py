"""Audit of the proof evidence (``python -m proofs``): what the proofs check, whether they can fail.

* Each identity's checker evaluates the very symbolic statement that ``implements`` names — the statement
  ``tests/test_proof_links.py`` holds the library function to — so proof ∧ link is about the code. A few
  statements are documented exceptions (``NOT_EVALUATED``).
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
from tests import test_proof_links as links

IDENTITIES = {entry.name: entry for entry in all_identities()}

#: (identity, function) pairs whose statement the identity's checker does not evaluate, and why:
#: composites of proved parts (decode_qkv_heads: decode, RoPE, P), a constant proved on its own
#: (rmsnorm_sensitivity = 2√d‖γ‖₂ from the proved two_sqrt_d), and the head-structure family, whose checker
#: must range over *every* p in S_4 (cross-head ones too, which no head-structured statement can express)
#: and so uses kv_permutation / lift_to_queries, the pieces flat_index is built from.
NOT_EVALUATED = {
    ("rope.does_not_commute_with_sigma", "scx_ref.transforms.decode_qkv_heads"),
    ("rope.rope_then_sigma_exact", "scx_ref.transforms.decode_qkv_heads"),
    ("sensitivity.rmsnorm_l1", "scx_ref.dp.sensitivity.rmsnorm_sensitivity"),
    *(
        ("head_structure.head_structured_exact", f"scx_ref.transforms.{name}")
        for name in (
            "HeadPermutation.flat_index",
            "head_permute",
            "head_unpermute",
            "head_permute_stacked",
            "encode_head_rows",
        )
    ),
}
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
    assert bool(calls) == ((entry.name, impl.function) not in NOT_EVALUATED), (entry.name, impl.function)


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
}


def _link_holds(path: str, function: Callable[..., Any]) -> bool:
    impl = next(i for _, _, i in links.LINKS if i.function == path)
    for seed in links.SEEDS:
        code, sym, to_numpy = links.case(path, "", np.random.default_rng([seed, len(path)]))
        try:
            links._close(
                function(*code), to_numpy(impl.symbolic(*sym)), path.rpartition(".")[2] in links._GATHERS
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

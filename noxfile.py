"""nox sessions. The CPU build of torch is pinned and installed first: any looser torch requirement
installed first would pull a multi-GB CUDA build."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "typecheck", "lint", "proofs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

TORCH_PIN = "torch==2.13.0"


def _install(session: nox.Session, extras: str = "all") -> None:
    session.install(TORCH_PIN)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The default test suite: fast examples and properties (pytest -n auto)."""
    _install(session)
    session.run("pytest", "-n", "auto", "-m", "not slow", *session.posargs)


@nox.session
def thorough(session: nox.Session) -> None:
    """Everything, with many more Hypothesis examples, including the slow full-model checks."""
    _install(session)
    session.run("pytest", "-n", "auto", "--hypothesis-profile", "thorough", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library, the full-model runs (models/), the proofs and the Hypothesis
    properties (properties/)."""
    _install(session)
    session.run("mypy", "--strict", "scx_ref", "models", "proofs", "properties")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.17,<0.18")  # the formatter's output changes between minor releases
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def proofs(session: nox.Session) -> None:
    """Run every sympy proof and negative control."""
    session.install("sympy>=1.12")
    session.run("python", "-m", "proofs")


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the key schedule, DP mechanisms, accountants and permutation bounds,
    transforms, decoy policies, server validation and the bench's and attacks' interval statistics; writes
    mutation/REPORT.md (per-target reports: REPORT_stats.md, REPORT_perm.md, REPORT_decoys.md). Not a default
    session (timings in the report).
    ``nox -s mutation -- keys dp_accountants`` runs only those targets (names in mutation/targets.py)."""
    _install(session)
    # pinned: mutant names (which mutation/annotations.toml refers to) may change between mutmut releases
    session.install("mutmut==3.8.1")
    invoked = " ".join(["nox -s mutation", *(["--", *session.posargs] if session.posargs else [])])
    session.run("python", "-m", "mutation.run", *session.posargs, env={"MUTATION_INVOKED_AS": invoked})


@nox.session
def models(session: nox.Session) -> None:
    """Full-model checks (tests/test_full_models.py): SmolLM2, Mixtral and Qwen2 equivalence (ΔPPL, greedy
    tokens), SmolLM2 at levels paper and blind at β the committed ΔPPL-vs-β sweep covers (no new sweep)."""
    _install(session)
    session.run("pytest", "-n", "2", "-m", "slow", "tests/test_full_models.py", *session.posargs)

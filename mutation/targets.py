"""What ``nox -s mutation`` mutates and which fast tests run against each module's mutants.

Each target is one mutmut run in its own scratch copy of the repository (``build/mutation/<name>``), so
every module gets its own test selection: only the tests that exercise it, never the slow full-model or
CLI-model checks. mutmut then runs, for each mutant, only the selected tests that call the mutated function.

``explained``: every surviving mutant of this module must be killed by a test or listed in
:mod:`mutation.annotations` as equivalent (the run fails otherwise). It is off for modules that are being
rewritten (issue 11, phase 2): their survivors are reported but not yet triaged.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TARGETS", "Target"]


@dataclass(frozen=True)
class Target:
    name: str
    path: str
    tests: tuple[str, ...]
    deselect: tuple[str, ...] = ()
    explained: bool = True


TARGETS: tuple[Target, ...] = (
    Target(
        "keys",
        "scx_ref/keys.py",
        ("tests/test_keys.py", "tests/test_keys_vectors.py", "properties/test_keys.py"),
    ),
    Target(
        "dp_mechanisms",
        "scx_ref/dp/mechanisms.py",
        ("tests/test_dp.py", "tests/test_dp_accounting.py", "properties/test_dp_properties.py"),
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "dp_accountants",
        "scx_ref/dp/accountants.py",
        ("tests/test_dp.py", "tests/test_dp_accounting.py", "properties/test_dp_properties.py"),
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "transforms",
        "scx_ref/transforms.py",
        (
            "properties/test_transforms.py",
            "properties/test_torch_parity.py",
            "tests/test_proof_links.py",
            "tests/test_errors.py",
            "tests/test_keys_vectors.py",
        ),
        explained=False,
    ),
    Target(
        "server",
        "scx_ref/protocol/server.py",
        (
            "tests/test_protocol_errors.py",
            "tests/test_protocol_view.py",
            "tests/test_release_plan.py",
            "properties/test_protocol.py",
        ),
        explained=False,
    ),
)

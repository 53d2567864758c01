"""Run every sympy identity in ``proofs/`` and every negative control, one test each.

An identity must check out (``check()`` is True); a negative control — a deliberately wrong variant fed to
the same checker — must be rejected (``check()`` is False), which shows the checker can fail.
"""

from __future__ import annotations

import io

import pytest

from proofs import Identity, all_identities
from proofs.__main__ import main, run
from proofs._registry import FAMILIES

IDENTITIES: list[Identity] = all_identities()
CONTROLS = [(entry, name, check) for entry in IDENTITIES for name, check in entry.negative_controls]


def test_registry_is_complete() -> None:
    """Every family registers something, names are unique, and every identity has a negative control."""
    names = [entry.name for entry in IDENTITIES]
    assert len(names) == len(set(names))
    families = {entry.check.__module__.rpartition(".")[2] for entry in IDENTITIES}
    assert families == set(FAMILIES)
    assert all(entry.negative_controls for entry in IDENTITIES)


@pytest.mark.parametrize("entry", IDENTITIES, ids=[entry.name for entry in IDENTITIES])
def test_identity_holds(entry: Identity) -> None:
    assert entry.check() is True, f"{entry.name} did not check out"


@pytest.mark.parametrize(
    ("entry", "control_name", "check"),
    CONTROLS,
    ids=[f"{entry.name}::{name}" for entry, name, _ in CONTROLS],
)
def test_negative_control_rejected(entry: Identity, control_name: str, check: object) -> None:
    assert callable(check)
    assert check() is False, f"{entry.name}: negative control {control_name!r} was accepted"


def test_runner_filter_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI runs a filtered subset, prints each identity and control, and exits 0 when all hold."""
    assert main(["t5."]) == 0
    printed = capsys.readouterr().out
    assert "t5.blinding" in printed and "PROVED" in printed
    assert "negative control: correctly rejected" in printed
    assert "t1." not in printed
    assert main(["no-such-identity"]) == 2


def test_runner_counts_an_accepted_control_as_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A negative control that passes makes the runner report a failure (exit status non-zero)."""
    entry = next(e for e in IDENTITIES if e.name == "t5.blinding")
    broken = Identity(entry.name, entry.covers, entry.check, [("always accepted", lambda: True)])
    monkeypatch.setattr("proofs.__main__.all_identities", lambda: [broken])
    buffer = io.StringIO()
    assert run(out=buffer) == 1
    assert "WRONGLY ACCEPTED" in buffer.getvalue()

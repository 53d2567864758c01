"""The mutation report's accounting (``mutation/run.py``): a mutant the run's tests left undetected whose
"killed by" test lies outside the selection counts as killed only when the re-check saw that test fail on
it, and is neither *survived* nor a problem then."""

from __future__ import annotations

from pathlib import Path

import pytest

from mutation import run
from mutation.annotations import Equivalent, KilledBy
from mutation.targets import Target

TARGET = Target("demo", "scx_ref/demo.py", ("tests/test_demo.py",))
M = "scx_ref.demo.x_f__mutmut_"


@pytest.fixture
def outcome(monkeypatch: pytest.MonkeyPatch) -> run.Outcome:
    monkeypatch.setattr(
        run, "KILLED_BY", {M + "2": KilledBy("", "tests/other.py::t"), M + "3": KilledBy("", "t2")}
    )
    monkeypatch.setattr(run, "EQUIVALENT", {M + "4": Equivalent("", "why")})
    mutants = [
        run.Mutant(M + "1", "killed"),
        run.Mutant(M + "2", "survived"),  # killed by a test outside the selection: re-checked, fails there
        run.Mutant(M + "3", "survived"),  # its test does not fail on it
        run.Mutant(M + "4", "survived"),  # equivalent
        run.Mutant(M + "5", "survived"),  # unexplained
        run.Mutant(M + "6", "timeout"),
    ]
    o = run.Outcome(TARGET, 60.0, mutants)
    o.verified = {M + "2": True, M + "3": False}
    return o


def test_outside_kills_count_only_when_confirmed(outcome: run.Outcome) -> None:
    assert [m.name for m in outcome.unexplained()] == [M + "5"]
    assert [m.name for m in outcome.killed_outside()] == [M + "2", M + "3"]
    assert outcome.outside_confirmed() == 1
    assert [m.name for m in outcome.equivalent()] == [M + "4"]


def test_report_row_counts_confirmed_outside_kills(
    outcome: run.Outcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "_source_of", lambda target: "the current source")
    monkeypatch.setattr(run, "version", lambda package: "0")  # mutmut is not installed by the test sessions
    path = tmp_path / "REPORT.md"
    run.write_report([outcome], path, "python -m mutation.run demo", 2, 60.0, "abc1234")
    text = path.read_text(encoding="utf-8")
    # mutants | killed | timed out | added | equivalent | survived | other | not run | killed % | score
    assert "| `scx_ref/demo.py` | 6 | 1 | 1 | 1 | 1 | 1 | 0 | 0 | 50.0 % | 60.0 % |" in text
    assert f"| {M}2 |  | `tests/other.py::t` | survived | yes |" in text
    assert f"| {M}3 |  | `t2` | survived | **NO** |" in text
    assert "### Surviving, not explained (1)" in text


def test_report_names_the_runs_own_max_children(
    outcome: run.Outcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--report-only`` invocation's ``--max-children`` (its default, the CPU count) was printed as the
    runs': the header now reads what each run recorded, and says where a run recorded none."""
    monkeypatch.setattr(run, "_source_of", lambda target: "the current source")
    monkeypatch.setattr(run, "version", lambda package: "0")
    path = tmp_path / "REPORT.md"
    outcome.runs = [{"seconds": 60.0, "load": [1.0, 1.0], "cpu": 1.0, "date": "d", "max_children": 1}]
    run.write_report([outcome], path, "python -m mutation.run demo --report-only", 2, 60.0, "abc1234")
    assert "mutmut `--max-children 1`\n" in path.read_text(encoding="utf-8")
    outcome.runs.append({"seconds": 1.0, "load": [1.0, 1.0], "cpu": 1.0, "date": "d", "rerun": 1})
    run.write_report([outcome], path, "python -m mutation.run demo --report-only", 2, 60.0, "abc1234")
    assert "mutmut `--max-children 1`, `--max-children` not recorded for 1 run(s)\n" in path.read_text(
        encoding="utf-8"
    )
    outcome.runs = []  # no runs read (as in the test above): this invocation's value
    run.write_report([outcome], path, "python -m mutation.run demo", 2, 60.0, "abc1234")
    assert "mutmut `--max-children 2`\n" in path.read_text(encoding="utf-8")


def test_report_lists_a_resumes_changed_functions(
    outcome: run.Outcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--resume`` after the target's source changed re-makes and runs every mutant of the changed
    functions (their earlier results dropped): the report names them with that run; a run without changes
    says nothing of the kind."""
    monkeypatch.setattr(run, "_source_of", lambda target: "the current source")
    monkeypatch.setattr(run, "version", lambda package: "0")
    path = tmp_path / "REPORT.md"
    first = {"seconds": 60.0, "load": [1.0, 1.0], "cpu": 1.0, "date": "d0", "max_children": 2}
    resumed = {**first, "date": "d1", "rerun": 3, "changed": ["x_f", "xǁCǁg"]}
    outcome.runs = [first, {**first, "date": "d2", "rerun": 2}]
    run.write_report([outcome], path, "python -m mutation.run demo --report-only", 2, 60.0, "abc1234")
    assert "whose source had changed" not in path.read_text(encoding="utf-8")
    outcome.runs = [first, resumed]
    run.write_report([outcome], path, "python -m mutation.run demo --report-only", 2, 60.0, "abc1234")
    assert (
        "- d1: the 3 undetected mutants, and every mutant of the functions whose source had changed since"
        " (`x_f`, `xǁCǁg`; their earlier results dropped), 1.0 min wall"
    ) in path.read_text(encoding="utf-8")

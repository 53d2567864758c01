"""Run mutmut on each target of :mod:`mutation.targets` and write ``mutation/REPORT.md``.

Usage (``nox -s mutation`` runs the first form on every target)::

    python -m mutation.run [TARGET ...] [--max-children N] [--report PATH] [--no-verify]
                           [--resume [--unreached | --survivors | --unforked [--timeout S]]]
    python -m mutation.run --which-test TARGET MUTANT [MUTANT ...] [--tests TEST ...]

For every target it copies the repository into ``build/mutation/<target>`` (mutmut's own ``mutants/``
directory lives there), writes a ``[tool.mutmut]`` section that mutates that one file and selects that
target's tests, and runs ``mutmut run`` with the Hypothesis profile ``mutation`` (derandomized, fewer
examples, no shrinking, no example database). The report counts, per module, killed / timed out /
equivalent / surviving mutants and lists every survivor of an earlier run with either the test added to
kill it — re-checked here by running that test against the mutant (``MUTANT_UNDER_TEST``), which must fail —
or the reason it is equivalent (:mod:`mutation.annotations`). The exit status is non-zero when a module
marked ``explained`` has a survivor that is neither, when an annotation no longer matches its mutant, or
when a "killed by" test does not fail on its mutant.

``--report-only`` runs no mutmut: it reports the results the last runs left in the scratch copies (for a run
that had to be stopped, its unreached mutants are counted as *not run*).

``--which-test`` (after a run) runs the target's selected tests (or ``--tests``) against the given mutants
and prints the first test that fails on each: the test to name in ``mutation/annotations.toml``.

``--resume`` (after a run) keeps each target's scratch copy and mutmut's results, copies the current tests
into it and re-runs only the mutants the earlier run did not detect, less those annotated as equivalent —
mutmut's own incremental mode: tests were only added, so a mutant killed before stays killed. It also copies
the current library in: a function of the target whose source changed since (by mutmut's function hashes) has
its mutants made again, its earlier results dropped, and every one of them run; the other functions' results
are kept (the report lists the changed functions with the run). New tests must go into files the target
already selects (a changed selection makes mutmut discard every result); a test outside the selection may be
named too, and counts as killing its mutant when the re-check sees it fail there (*added* in the report). The
report counts the earlier run and the resumed ones together (times added; each run is listed). Mutants a
stopped run never reached are not run by ``--resume`` alone; ``--resume --unreached`` runs them too (on the
current tests), finishing a stopped run;
``--resume --survivors`` re-runs only the mutants that survived (exit 0), not those mutmut stopped at its wall
clock limit (*suspicious*: a slow mutant, or one run on a loaded machine), which can take minutes each.
``--resume --unforked`` runs exactly those *suspicious* mutants again (and those whose forked worker failed
to run the tests at all, *error*), each in a pytest process of its own
(the target's tests, ``-x``, up to ``--max-children`` at once, ``--timeout`` seconds each) instead of in
mutmut's forked workers, and writes their exit statuses into mutmut's results (1 killed, 0 survived, a timeout
as mutmut's *timeout*). A forked worker inherits the threads its parent started (numba's, the check kernels'
pools), and some mutants of the verifier's attention check never finished there on an idle machine, while each
takes under a minute in a fresh process (stop 73).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mutation.annotations import EQUIVALENT, KILLED_BY
from mutation.targets import TARGETS, Target

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / "build" / "mutation"
REPORT = ROOT / "mutation" / "REPORT.md"
# pyproject.toml is not copied: _write_config writes the scratch copy's
COPY = ("scx_ref", "tests", "properties", "models", "proofs", "conftest.py", "README.md")
ALSO_COPY = ("properties", "models", "proofs", "conftest.py", "README.md")
PYTEST_ARGS = ("-p", "no:cacheprovider", "-q", "-m", "not slow")
HYPOTHESIS_PROFILE = "mutation"

DETECTED = ("killed", "timeout")


@dataclass
class Mutant:
    """One mutant: its mutmut name, its status and the lines its diff removes and adds."""

    name: str
    status: str
    removed: str = ""
    added: str = ""


@dataclass
class Outcome:
    """What one target's mutmut runs gave: every mutant, the report's problems and the runs' costs."""

    target: Target
    seconds: float
    mutants: list[Mutant]
    problems: list[str] = field(default_factory=list)
    verified: dict[str, bool] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and end of the mutmut run
    cpu_seconds: float = 0.0  # user + system CPU time of mutmut and its workers
    runs: list[dict[str, Any]] = field(default_factory=list)  # the mutmut runs counted (a full one, resumes)

    def count(self, *statuses: str) -> int:
        """How many mutants have one of ``statuses``."""
        return sum(m.status in statuses for m in self.mutants)

    def equivalent(self) -> list[Mutant]:
        """The undetected mutants that the annotations list as equivalent."""
        return [m for m in self.mutants if m.status not in DETECTED and m.name in EQUIVALENT]

    def unexplained(self) -> list[Mutant]:
        """The undetected mutants that the annotations do not explain (the run fails on them)."""
        return [
            m
            for m in self.mutants
            if m.status not in DETECTED and m.name not in EQUIVALENT and m.name not in KILLED_BY
        ]

    def killed_by_new_tests(self) -> list[Mutant]:
        """The mutants the annotations name a test added for."""
        return [m for m in self.mutants if m.name in KILLED_BY]

    def killed_outside(self) -> list[Mutant]:
        """The mutants the selection left undetected whose "killed by" test lies outside it: killed only if
        :func:`verify` sees that test fail on them."""
        return [m for m in self.killed_by_new_tests() if m.status not in DETECTED]

    def outside_confirmed(self) -> int:
        """How many of :meth:`killed_outside` :func:`verify` saw killed by their test."""
        return sum(self.verified.get(m.name, False) for m in self.killed_outside())


def _scratch(target: Target) -> Path:
    return WORKDIR / target.name


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _write_config(target: Target) -> None:
    """The scratch copy's ``pyproject.toml``: the repository's, plus a ``[tool.mutmut]`` section with the
    target's module, its test selection and deselected tests. Written again by a ``--resume``, so that a
    selection changed since the first run is the one run: mutmut collects which functions a test it has not
    seen calls, and drops the results of every mutant of those functions (killed ones too), so such a resume
    needs ``--unreached`` to run them again (stop 88: three files added to ``verify``'s selection dropped
    2 413 of its 2 842 results)."""
    pytest_args = [*PYTEST_ARGS]
    for node in target.deselect:
        pytest_args += ["--deselect", node]
    section = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["scx_ref"]',
            f"only_mutate = {_toml_list([target.path])}",
            f"also_copy = {_toml_list(ALSO_COPY)}",
            f"pytest_add_cli_args = {_toml_list(pytest_args)}",
            f"pytest_add_cli_args_test_selection = {_toml_list(target.tests)}",
            "use_git_change_detection = false",
            f"process_isolation = {json.dumps(target.isolation)}",
            "",
        ]
    )
    base = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (_scratch(target) / "pyproject.toml").write_text(base + section, encoding="utf-8")


def prepare(target: Target) -> Path:
    """A fresh copy of the repository with a ``[tool.mutmut]`` section for this target."""
    scratch = _scratch(target)
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, scratch / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, scratch / name)
    _write_config(target)
    return scratch


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["HYPOTHESIS_PROFILE"] = HYPOTHESIS_PROFILE
    # mutmut forks its workers from a process that has already run the tests: a BLAS/OpenMP thread pool
    # started before the fork spins forever in the child (mutants then "time out"), so one thread each;
    # the parallelism is mutmut's --max-children
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env.pop("MUTANT_UNDER_TEST", None)
    return env


def _mutmut() -> str:
    exe = Path(sys.executable).parent / "mutmut"
    return str(exe) if exe.exists() else "mutmut"


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timing_file(target: Target) -> Path:
    return _scratch(target) / "timing.json"


def _meta_file(target: Target) -> Path:
    """mutmut's results for the target's module in its scratch copy (exit statuses, function hashes)."""
    return _scratch(target) / "mutants" / (target.path + ".meta")


def _module(target: Target) -> str:
    """The target module's dotted name, which begins each of its mutants' names."""
    return target.path.removesuffix(".py").replace("/", ".")


@contextmanager
def _in_scratch(target: Target) -> Iterator[None]:
    """Work in the target's scratch copy (mutmut reads its configuration and mutants from the working
    directory), then return to where we were."""
    cwd = Path.cwd()
    os.chdir(_scratch(target))
    try:
        yield
    finally:
        os.chdir(cwd)


def _exit_codes(target: Target) -> dict[str, int | None]:
    """mutmut's exit status of each mutant of the target's last run (None: never run)."""
    meta = json.loads(_meta_file(target).read_text(encoding="utf-8"))
    codes: dict[str, int | None] = meta["exit_code_by_key"]
    return codes


#: the exit status of a forked worker whose test run raised instead of returning pytest's status
#: (``os._exit(-1)`` in mutmut's fork server): no verdict. mutmut files it as a *timeout*, which counted it
#: as detected: 162 mutants of ``ServeOptions`` so in stop 86, each with a duration of 0 s
WORKER_ERROR_CODE = 255


def _status(code: int | None) -> str:
    """mutmut's status for an exit status, except a worker's error (:data:`WORKER_ERROR_CODE`): *error*, no
    verdict — neither detected nor survived, re-run by ``--resume`` and by ``--resume --unforked``."""
    from mutmut.stats import status_by_exit_code

    return "error" if code == WORKER_ERROR_CODE else status_by_exit_code[code]


def _undetected(target: Target) -> list[str]:
    """The mutants of the target's last run that no test detected (survived, no tests, a worker's error)."""
    return [name for name, code in _exit_codes(target).items() if _status(code) not in DETECTED]


def _survived(target: Target) -> set[str]:
    """The mutants of the target's last run that survived (their tests passed: exit status 0)."""
    return {name for name, code in _exit_codes(target).items() if code == 0}


def _not_run(target: Target) -> set[str]:
    """The mutants the target's last run never reached (it was stopped)."""
    return {name for name, code in _exit_codes(target).items() if code is None}


def _suspicious(target: Target) -> set[str]:
    """The mutants mutmut stopped at its wall clock (status *suspicious*) in the target's last run, and those
    whose forked worker failed to run the tests (*error*)."""
    return {name for name, code in _exit_codes(target).items() if _status(code) in ("suspicious", "error")}


#: mutmut's exit status for a mutant stopped at its time limit (SIGXCPU; "timeout" in its stats)
TIMEOUT_CODE = -24


def _copy_tests_into(mutants_dir: Path) -> None:
    """Copy the current tests (and test helpers) into a mutants' tree: the tests as they are now, the
    mutants as they were."""
    for name in ("tests", "properties", "conftest.py"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, mutants_dir / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, mutants_dir / name)


def _pytest_on(
    target: Target, mutant: str, tests: Sequence[str], timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``tests`` run against one mutant in a pytest process of its own (``-x``: up to the first failure);
    TimeoutExpired after ``timeout`` seconds."""
    env = _env()
    env["MUTANT_UNDER_TEST"] = mutant
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-rf", "-p", "no:randomly", *PYTEST_ARGS, *tests],
        cwd=_scratch(target) / "mutants",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _run_unforked(target: Target, names: Sequence[str], max_children: int, timeout: float) -> None:
    """Run each of ``names`` against the target's tests in a pytest process of its own (``-x``; at most
    ``max_children`` at once; ``timeout`` seconds, then it counts as timed out) with the current tests
    copied into the mutants' tree, and record each exit status and duration in mutmut's results."""
    from concurrent.futures import ThreadPoolExecutor

    mutants_dir = _scratch(target) / "mutants"
    _copy_tests_into(mutants_dir)

    def one(name: str) -> tuple[str, int, float]:
        start = time.monotonic()
        try:
            code = _pytest_on(target, name, target.tests, timeout).returncode
        except subprocess.TimeoutExpired:
            code = TIMEOUT_CODE
        return name, code, time.monotonic() - start

    with ThreadPoolExecutor(max(1, max_children)) as pool:
        results = list(pool.map(one, names))
    meta_path = _meta_file(target)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for name, code, seconds in results:
        meta["exit_code_by_key"][name] = code
        meta.setdefault("durations_by_key", {})[name] = seconds
    meta_path.write_text(json.dumps(meta, indent=4), encoding="utf-8")


def _sync_tests(target: Target) -> None:
    """Copy the current tests (and test helpers) over the scratch copy's, for a resumed run."""
    scratch = _scratch(target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in ("tests", "properties"):
        shutil.copytree(ROOT / name, scratch / name, ignore=ignore, dirs_exist_ok=True)


def _changed_functions(target: Target) -> list[str]:
    """The target's functions whose source changed since its scratch copy's mutants were made, by mutmut's
    own function hashes (its mangled names, ``x_peer_host``): mutmut drops their earlier results when it
    re-makes their mutants, and a ``--resume`` runs them all; the other functions' results are kept —
    mutmut's incremental mode."""
    from mutmut.mutation.file_mutation import mutate_file_contents

    meta = json.loads(_meta_file(target).read_text(encoding="utf-8"))
    old_hashes: dict[str, str] = meta.get("hash_by_function_name", {})
    source = (ROOT / target.path).read_text(encoding="utf-8")
    with _in_scratch(target):
        new_hashes = dict(mutate_file_contents(target.path, source).hash_by_function_name)
    return sorted(f for f, h in new_hashes.items() if old_hashes.get(f) != h)


def _sync_library(target: Target) -> None:
    """Copy the current library over a resumed scratch copy's: each file whose content differs, with a new
    modification time, so that mutmut re-makes the target's mutants when its source changed."""
    scratch = _scratch(target)
    for src in sorted((ROOT / "scx_ref").rglob("*.py")):
        dst = scratch / src.relative_to(ROOT)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def run_mutmut(
    target: Target,
    max_children: int,
    resume: bool = False,
    report_only: bool = False,
    unreached: bool = False,
    survivors: bool = False,
    unforked: bool = False,
    timeout: float = 600.0,
) -> tuple[float, tuple[float, float], float]:
    """Run mutmut on one target: (wall seconds, load average at start and end, CPU seconds).

    With ``resume`` only the mutants the previous run left undetected are run again (on the current tests),
    with ``unreached`` also those a stopped run never reached, with ``survivors`` only those that survived,
    with ``unforked`` only the *suspicious* ones, each in a pytest process of its own (:func:`_run_unforked`,
    ``timeout`` seconds each); the times returned are the previous run's plus this one's."""
    before: dict[str, Any] = {}
    if report_only:  # no mutmut: the results and times the earlier runs left
        runs = json.loads(_timing_file(target).read_text(encoding="utf-8"))["runs"]
        load0 = (runs[0]["load"][0], runs[-1]["load"][1])
        cpu = sum(float("nan") if r["cpu"] is None else r["cpu"] for r in runs)
        return sum(r["seconds"] for r in runs), load0, cpu
    if resume:
        if not (_scratch(target) / "mutants").exists() or not _timing_file(target).exists():
            raise SystemExit(
                f"--resume: no earlier run of {target.name} (run `python -m mutation.run {target.name}`)"
            )
        scratch = _scratch(target)
        before = json.loads(_timing_file(target).read_text(encoding="utf-8"))
        changed = _changed_functions(target)
        if changed and unforked:  # refused before anything in the scratch copy changes
            raise SystemExit(
                f"--resume --unforked: {target.path} changed since the run ({', '.join(changed)}); run"
                f" `python -m mutation.run {target.name} --resume` first, to make and run their new mutants"
            )
        _sync_tests(target)
        _sync_library(target)
        _write_config(target)
        # equivalent ones stay as they were; so do the mutants a stopped run never reached (still "not run")
        # unless ``unreached`` asks for them
        skip = set() if unreached else _not_run(target)
        prefix = _module(target) + "."
        stale = tuple(f"{prefix}{f}__mutmut_" for f in changed)  # their old names name other mutants now
        names = [n for n in _undetected(target) if n not in EQUIVALENT and n not in skip]
        names = [n for n in names if not n.startswith(stale)]
        if survivors:
            names = [n for n in names if n in _survived(target)]
        if unforked:
            names = [n for n in names if n in _suspicious(target)]
        rerun = len(names)
        names += [f"{prefix}{f}__mutmut_*" for f in changed]  # every new mutant of a changed function
    else:
        scratch = prepare(target)
        names, changed, rerun = [], [], 0
    load_start = _load()
    cpu_start = _children_cpu()
    start = time.monotonic()
    proc = None
    if unforked and names:
        _run_unforked(target, names, max_children, timeout)
    elif not resume or names:
        with (scratch / ("mutmut-resume.log" if resume else "mutmut.log")).open("w", encoding="utf-8") as log:
            proc = subprocess.run(
                [_mutmut(), "run", "--max-children", str(max_children), *names],
                cwd=scratch,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
    seconds = time.monotonic() - start
    load = (load_start, _load())
    cpu = _children_cpu() - cpu_start
    if proc is not None and proc.returncode != 0:
        log_name = "mutmut-resume.log" if resume else "mutmut.log"
        tail = (scratch / log_name).read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"mutmut run failed for {target.name} (exit {proc.returncode}):\n{tail}")
    this = {
        "seconds": seconds,
        "load": list(load),
        "cpu": cpu,
        "rerun": rerun if resume else None,
        **({"changed": changed} if changed else {}),
        "max_children": max_children,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **({"unforked": True} if unforked else {}),
    }
    ran = proc is not None or (unforked and bool(names))
    runs = [*before.get("runs", []), *([this] if ran else [])]  # a resume with nothing to re-run
    _timing_file(target).write_text(json.dumps({"runs": runs}, indent=1), encoding="utf-8")
    total = sum(r["seconds"] for r in runs)
    total_cpu = sum(float("nan") if r["cpu"] is None else r["cpu"] for r in runs)  # None: not measured
    return total, (runs[0]["load"][0], runs[-1]["load"][1]), total_cpu


def _diff_lines(target: Target, name: str) -> tuple[str, str]:
    """The original and mutated lines of one mutant (mutmut's diff, '-' and '+' lines joined)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    with _in_scratch(target):
        diff = get_diff_for_mutant(name, path=Path(target.path))
    removed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(removed), " / ".join(added)


def collect(target: Target, seconds: float) -> Outcome:
    """Read ``target``'s mutmut results from its scratch copy into an :class:`Outcome`."""
    module = _module(target)
    mutants = [Mutant(name, _status(code)) for name, code in _exit_codes(target).items()]
    outcome = Outcome(target, seconds, mutants)
    for m in mutants:
        if m.status == "not checked" and m.name not in EQUIVALENT and m.name not in KILLED_BY:
            continue  # never run (a stopped run): counted, not listed
        if m.status not in DETECTED or m.name in EQUIVALENT or m.name in KILLED_BY:
            m.removed, m.added = _diff_lines(target, m.name)
    known = {m.name for m in mutants}
    for name in [*EQUIVALENT, *KILLED_BY]:
        if name.startswith(module + ".") and name not in known:
            outcome.problems.append(f"annotation for {name}: no such mutant (the code changed; re-triage)")
    for m in mutants:
        note = EQUIVALENT.get(m.name) or KILLED_BY.get(m.name)
        if note is not None and note.mutation != m.added:
            outcome.problems.append(
                f"annotation for {m.name} describes `{note.mutation}`, the mutant is `{m.added}` (re-triage)"
            )
        if m.name in EQUIVALENT and m.status in DETECTED:
            outcome.problems.append(
                f"{m.name} is annotated equivalent but was {m.status}: drop the annotation"
            )
    unexplained = [m for m in outcome.unexplained() if m.status != "not checked"]
    not_run = len(outcome.unexplained()) - len(unexplained)
    if not_run:
        outcome.problems.append(f"{not_run} mutant(s) not run: the run was stopped before it reached them")
    if target.explained and unexplained:
        outcome.problems.append(
            f"{len(unexplained)} surviving mutant(s) neither killed nor listed as equivalent: "
            + ", ".join(m.name for m in unexplained)
        )
    return outcome


def fails_on(target: Target, mutant: str, tests: Sequence[str]) -> tuple[bool, str]:
    """Run ``tests`` against one mutant; (whether a test failed, the first failing test id)."""
    proc = _pytest_on(target, mutant, tests)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.MULTILINE)
    return proc.returncode == 1 and bool(failed), failed[0] if failed else ""


def verify(outcome: Outcome) -> None:
    """Each "killed by" test must fail when run against its mutant (all pairs in one warm worker), the tests
    as they are now: they are copied into the mutants' tree first (``--report-only`` runs no mutmut, which
    would copy them)."""
    pairs = [[m.name, KILLED_BY[m.name].test] for m in outcome.killed_by_new_tests()]
    if not pairs:
        return
    _copy_tests_into(_scratch(outcome.target) / "mutants")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "mutation" / "verify_worker.py"),
            "--",
            *PYTEST_ARGS,
            "-p",
            "no:randomly",
        ],
        cwd=_scratch(outcome.target) / "mutants",
        env=_env(),
        input=json.dumps(pairs),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"verify_worker failed for {outcome.target.name}:\n{proc.stderr[-3000:]}")
    codes: list[int] = json.loads(proc.stdout.strip().splitlines()[-1])
    for (name, test), code in zip(pairs, codes, strict=True):
        # 1: the test failed; 124: it ran into the time limit (an endless loop counts as caught, as in mutmut)
        ok = code in (1, 124)
        outcome.verified[name] = ok
        if not ok:
            outcome.problems.append(f"{test} does not fail on {name} (pytest exit {code})")


def _commit() -> str:
    """The checked-out commit, with "+ local changes" when tracked files (other than the reports) differ."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!mutation/REPORT*.md"]
    dirty = subprocess.run(status, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + local changes" if dirty else "")


def _source_of(target: Target) -> str:
    """Which version of the target's module its mutants were made from: the current file when the scratch
    copy's equals it, else the newest commit whose file does (``--report-only`` changes no mutant; a
    ``--resume`` re-makes those of the functions that changed)."""
    made_from = _scratch(target) / target.path
    if not made_from.exists():
        return "unknown (no scratch copy)"
    if made_from.read_bytes() == (ROOT / target.path).read_bytes():
        return "the current source"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    blob = git("hash-object", str(made_from))
    for commit in git("log", "--format=%h", "-n", "200", "--", target.path).split():
        if git("rev-parse", f"{commit}:{target.path}") == blob:
            return (
                f"`{target.path}` as of commit {commit}, which has changed since (a `--resume` re-makes"
                " the mutants of the functions that changed; a run without it mutates the current source)"
            )
    return (
        f"a version of `{target.path}` that no recent commit holds (a `--resume` re-makes the mutants of"
        " the functions that changed; a run without it mutates the current source)"
    )


def _minutes(seconds: float | None) -> str:
    """Seconds as minutes; "n/a" for a time that was not measured (a run stopped from outside)."""
    return "n/a" if seconds is None or seconds != seconds else f"{seconds / 60:.1f} min"


def _pct(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f} %" if den else "n/a"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""


def _children(outcomes: Sequence[Outcome], max_children: int) -> str:
    """The ``--max-children`` of the mutmut runs a report covers, as each run recorded it: a
    ``--report-only`` invocation's own value is not theirs. ``max_children`` only where no run is listed."""
    recorded = [r.get("max_children") for o in outcomes for r in o.runs]
    if not recorded:
        return f"`--max-children {max_children}`"
    known = sorted({int(c) for c in recorded if c is not None})
    parts = [f"`--max-children {c}`" for c in known]
    missing = sum(c is None for c in recorded)
    if missing:
        parts.append(f"`--max-children` not recorded for {missing} run(s)")
    return ", ".join(parts)


def write_report(
    outcomes: Sequence[Outcome], path: Path, command: str, max_children: int, wall_s: float, commit: str
) -> None:
    """Write the markdown report of ``outcomes`` to ``path``."""
    total_s = sum(o.seconds for o in outcomes)
    resumed = any(len(o.runs) > 1 for o in outcomes)
    lines = [
        "# Mutation testing report",
        "",
        "Generated by `python -m mutation.run` (the `nox -s mutation` session); do not edit by hand —",
        "triage lives in `mutation/annotations.toml`, the module/test selection in `mutation/targets.py`.",
        "",
        f"- command: `{command}`, at commit {commit}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- mutmut {version('mutmut')}, hypothesis {version('hypothesis')},"
        f" Python {platform.python_version()}, Hypothesis profile `{HYPOTHESIS_PROFILE}`",
        f"- machine: {os.cpu_count()} CPUs, mutmut {_children(outcomes, max_children)}",
        (
            f"- wall time: {wall_s / 60:.1f} min; mutmut runs {total_s / 60:.1f} min (per module below),"
            " the rest re-checks the 'killed by' tests"
            if not resumed
            else f"- wall time of this invocation (`--resume` or `--report-only`): {wall_s / 60:.1f} min;"
            f" mutmut runs in all, the earlier full runs included: {total_s / 60:.1f} min (per module below,"
            " each run listed)"
        ),
        f"- CPU time of the mutmut runs: {_minutes(sum(o.cpu_seconds for o in outcomes))}"
        + (
            " (a run stopped from outside has no CPU time: n/a)"
            if any(o.cpu_seconds != o.cpu_seconds for o in outcomes)
            else ""
        ),
        "",
        "*added*: mutants the run's tests left undetected that the test named for them (one outside the",
        "selection, or one added after the mutant was run) kills, re-checked in this run on the mutant.",
        "killed % = (killed + timed out + added) / all mutants; score = the same over the mutants that are",
        "not equivalent. *survived* counts only survivors that are neither killed nor listed as equivalent;",
        "*not run*: mutants a stopped run never reached (`--report-only` after stopping it); *other*:",
        "neither killed nor survived nor listed as equivalent — mutmut's *no tests*, *suspicious*",
        "(stopped at its wall-clock limit, 15 × (the tests' expected time + 1 s): a slow mutant, or a",
        "loaded machine), or *error* (the forked worker's test run raised: exit status 255, which mutmut",
        "files as a timeout; no verdict).",
        "",
        "The machine may be shared: *load* is the 1-minute load average when the module's run started",
        "and ended (on 2 CPUs, a load of 4 means about half the CPU time went to mutmut); *CPU* is the CPU",
        "time of mutmut and its workers, so CPU / number of CPUs estimates the wall time on an idle machine.",
        "",
        "| module | mutants | killed | timed out | added | equivalent | survived | other | not run | killed %"
        " | score | wall | load | CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        n, eq, added = len(o.mutants), len(o.equivalent()), o.outside_confirmed()
        det = o.count(*DETECTED) + added
        survived = sum(m.status == "survived" for m in o.unexplained())
        not_run = sum(m.status == "not checked" for m in o.unexplained())
        no_tests = sum(m.status not in ("survived", "not checked") for m in o.unexplained())
        lines.append(
            f"| `{o.target.path}` | {n} | {o.count('killed')} | {o.count('timeout')} | {added} | {eq} |"
            f" {survived} | {no_tests} | {not_run} | {_pct(det, n)} | {_pct(det, n - eq)} |"
            f" {o.seconds / 60:.1f} min |"
            f" {o.load[0]:.1f} → {o.load[1]:.1f} | {_minutes(o.cpu_seconds)} |"
        )
    for o in outcomes:
        lines += ["", f"## `{o.target.path}`", ""]
        lines += [f"mutants made from: {_source_of(o.target)}", ""]
        lines.append("tests: " + ", ".join(f"`{t}`" for t in o.target.tests))
        if o.target.deselect:
            lines.append("; deselected: " + ", ".join(f"`{t}`" for t in o.target.deselect))
        if len(o.runs) > 1 or any(r.get("stopped") for r in o.runs):
            lines += [
                "",
                "mutmut runs counted here (the first over every mutant, then `--resume` passes):",
                "",
            ]
            for r in o.runs:
                what = "every mutant" if r.get("rerun") is None else f"the {r['rerun']} undetected mutants"
                if r.get("unforked"):
                    what = f"the {r['rerun']} suspicious mutants, each in a pytest process of its own"
                    what += " (`--unforked`)"
                if r.get("changed"):
                    what += (
                        ", and every mutant of the functions whose source had changed since ("
                        + ", ".join(f"`{f}`" for f in r["changed"])
                        + "; their earlier results dropped)"
                    )
                if r.get("stopped"):
                    what += " (stopped before the end: the mutants it never reached are counted as *not run*)"
                lines.append(
                    f"- {r['date']}: {what}, {r['seconds'] / 60:.1f} min wall, {_minutes(r['cpu'])} CPU,"
                    f" load {r['load'][0]:.1f} → {r['load'][1]:.1f}"
                )
            ran = [m for m in o.mutants if m.status != "not checked"]
            if len(ran) < len(o.mutants):
                det_ran = sum(m.status in DETECTED or o.verified.get(m.name, False) for m in ran)
                eq_ran = sum(m.name in EQUIVALENT and m.status not in DETECTED for m in ran)
                lines.append(
                    f"- of the {len(ran)} mutants run: killed % {_pct(det_ran, len(ran))},"
                    f" score {_pct(det_ran, len(ran) - eq_ran)}"
                )
            lines.append("")
        if not o.target.explained:
            lines += ["", "Being rewritten (issue 11, phase 2): survivors are listed but not triaged yet."]
        killed = o.killed_by_new_tests()
        if killed:
            lines += [
                "",
                f"### Killed by tests added for them ({len(killed)})",
                "",
                "Each survived an earlier run. *checked*: this run ran the test on the mutant and it failed."
                " *run's tests*: what the run's own tests gave it (*survived* where the test named lies"
                " outside the selection or was added after the mutant was run: the check is what kills it).",
                "",
                "| mutant | mutation | killed by | run's tests | checked |",
                "| --- | --- | --- | --- | --- |",
            ]
            for m in killed:
                check = "not run"
                if m.name in o.verified:
                    check = "yes" if o.verified[m.name] else "**NO**"
                lines.append(
                    f"| {m.name} | {_cell(m.added)} | `{KILLED_BY[m.name].test}` | {m.status} | {check} |"
                )
        equivalent = o.equivalent()
        if equivalent:
            lines += ["", f"### Equivalent ({len(equivalent)})", "", "| mutant | mutation | why |"]
            lines.append("| --- | --- | --- |")
            for m in equivalent:
                lines.append(f"| {m.name} | {_cell(m.added)} | {EQUIVALENT[m.name].reason} |")
        unexplained = [m for m in o.unexplained() if m.status != "not checked"]
        if unexplained:
            lines += ["", f"### Surviving, not explained ({len(unexplained)})", ""]
            lines += ["| mutant | status | original | mutation |", "| --- | --- | --- | --- |"]
            for m in unexplained:
                lines.append(f"| {m.name} | {m.status} | {_cell(m.removed)} | {_cell(m.added)} |")
        if o.problems:
            lines += ["", "### Problems", ""] + [f"- {p}" for p in o.problems]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def which_test(target: Target, mutants: Sequence[str], tests: Sequence[str]) -> None:
    """Print, for each of ``mutants``, the first of ``tests`` (default: the target's) that fails on it."""
    mutants_dir = _scratch(target) / "mutants"
    if not mutants_dir.exists():
        raise SystemExit(f"run `python -m mutation.run {target.name}` first")
    _copy_tests_into(mutants_dir)
    for name in mutants:
        failed, test = fails_on(target, name, tests or target.tests)
        print(f"{name}: {test if failed else 'no selected test fails'}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of the module docstring; the exit status (1 when a report lists a problem)."""
    names = [t.name for t in TARGETS]
    parser = argparse.ArgumentParser(prog="python -m mutation.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"targets to run (default: all of {', '.join(names)})")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--no-verify", action="store_true", help="do not re-run the 'killed by' tests")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="re-run only the mutants the last run left undetected (docstring)",
    )
    parser.add_argument(
        "--unreached",
        action="store_true",
        help="with --resume: also run the mutants a stopped run never reached",
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="with --resume: re-run only the mutants that survived (not the wall-clock-stopped ones)",
    )
    parser.add_argument(
        "--unforked",
        action="store_true",
        help=(
            "with --resume: re-run only the suspicious (wall-clock-stopped) and error (worker failed) "
            "mutants, each in its own pytest process"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="with --unforked: seconds per mutant before it counts as timed out (default 600)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run no mutmut: report what the last runs left (a stopped run's unreached mutants: 'not run')",
    )
    parser.add_argument("--which-test", nargs="+", metavar="TARGET MUTANT", help="see the module docstring")
    parser.add_argument("--tests", nargs="+", default=[], help="with --which-test: the tests to try")
    args = parser.parse_args(argv)
    by_name = {t.name: t for t in TARGETS}
    if args.which_test:
        target_name, *mutants = args.which_test
        which_test(by_name[target_name], mutants, args.tests)
        return 0
    if (args.unreached or args.survivors or args.unforked) and not args.resume:
        parser.error(
            "--unreached, --survivors and --unforked choose what --resume re-runs: they need --resume"
        )
    if sum((args.unreached, args.survivors, args.unforked)) > 1:
        parser.error("--unreached, --survivors and --unforked each choose other mutants: give one")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    unknown = [n for n in args.targets if n not in by_name]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {names}")
    selected = [by_name[n] for n in args.targets] if args.targets else list(TARGETS)
    command = os.environ.get("MUTATION_INVOKED_AS") or "python -m mutation.run " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    started = time.monotonic()
    commit = _commit()
    outcomes = []
    for target in selected:
        print(f"mutation: {target.path} ...", flush=True)
        seconds, load, cpu = run_mutmut(
            target,
            args.max_children,
            resume=args.resume,
            report_only=args.report_only,
            unreached=args.unreached,
            survivors=args.survivors,
            unforked=args.unforked,
            timeout=args.timeout,
        )
        outcome = collect(target, seconds)
        outcome.load, outcome.cpu_seconds = load, cpu
        outcome.runs = json.loads(_timing_file(target).read_text(encoding="utf-8"))["runs"]
        if not args.no_verify:
            verify(outcome)
        else:
            for m in outcome.killed_outside():
                outcome.problems.append(
                    f"{m.name}: {m.status} by the run's tests, and its test {KILLED_BY[m.name].test} was not"
                    " re-checked (--no-verify)"
                )
        det, n = outcome.count(*DETECTED) + outcome.outside_confirmed(), len(outcome.mutants)
        print(
            f"  {n} mutants, {det} killed ({_pct(det, n)}), {len(outcome.equivalent())} equivalent, "
            f"{len(outcome.unexplained())} unexplained, {seconds / 60:.1f} min",
            flush=True,
        )
        outcomes.append(outcome)
        wall = time.monotonic() - started
        write_report(outcomes, args.report, command.strip(), args.max_children, wall, commit)
    problems = [p for o in outcomes for p in o.problems]
    for p in problems:
        print("problem:", p)
    print(f"report: {args.report}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

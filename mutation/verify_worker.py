"""Run (mutant, test) pairs in one warm process: ``python mutation/verify_worker.py`` in a ``mutants/`` copy.

Reads ``[[mutant, test], ...]`` as JSON on stdin, collects the tests once (imports pytest, the mutated package
and the test modules), then forks one child per pair that sets ``MUTANT_UNDER_TEST`` (read by mutmut's
trampolines at every call) and runs that one test; prints the exit statuses, in order, as a JSON list. A
child that runs longer than ``--timeout`` seconds is stopped and reported as 124. This is how mutmut itself
runs its mutants; it costs a fork instead of a Python start-up and an import of numpy and scx_ref per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence


def _run_child(mutant: str, test: str, pytest_args: Sequence[str], timeout: int) -> None:
    import pytest

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ["MUTANT_UNDER_TEST"] = mutant
    signal.alarm(timeout)  # SIGALRM's default action ends the child
    code = pytest.main([*pytest_args, "-x", test])
    os._exit(int(code))


def main(argv: Sequence[str] | None = None) -> int:
    """The worker's command line (the module docstring); the exit status."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    pairs: list[list[str]] = json.loads(sys.stdin.read())
    os.environ.pop("MUTANT_UNDER_TEST", None)
    sys.path.insert(0, os.getcwd())  # the mutated package in the current directory, not the installed one
    import pytest

    tests = sorted({test for _, test in pairs})
    stdout = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        pytest.main([*args.pytest_args, "--collect-only", "-q", *tests])  # warm up: import everything once
    finally:
        os.dup2(stdout, 1)
    results: list[int] = []
    for mutant, test in pairs:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            _run_child(mutant, test, args.pytest_args, args.timeout)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        results.append(124 if code == -signal.SIGALRM else code)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

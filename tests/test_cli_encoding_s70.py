"""``scx`` on a terminal whose encoding lacks β, ε, Δ (an ASCII locale, ``PYTHONIOENCODING=ascii``): the
output escapes them instead of stopping with a UnicodeEncodeError traceback (found by stop 70's audit of
``scx dp``; the fix is in ``scx_ref.cli.main``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _scx(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    return subprocess.run(
        [sys.executable, "-m", "scx_ref.cli", *args],
        capture_output=True,
        text=True,
        encoding="ascii",
        errors="strict",  # what came back is pure ASCII: escapes, not the characters
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("args", [("dp", "--sensitivity", "1"), ("dp", "--help")])
def test_non_ascii_output_is_escaped_on_an_ascii_stream(args: tuple[str, ...]) -> None:
    run = _scx(*args)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "\\u03b2" in run.stdout or "\\u0394" in run.stdout or "\\u03b5" in run.stdout, run.stdout[:400]


def test_an_error_line_on_an_ascii_stream_is_one_line_not_a_traceback() -> None:
    run = _scx("dp", "--sensitivity", "nan")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("scx dp: error:") or "usage:" in run.stderr

"""What the command-line tests share: running ``scx ARGV`` expecting one usage error, and refusing every way a
command starts its work (so a test shows a bad option is refused before any of it)."""

from __future__ import annotations

import re
from typing import Any

import pytest

import scx_ref.commands.ppl as ppl_mod
import scx_ref.commands.serve as serve_mod
import scx_ref.commands.verify as verify_mod
import scx_ref.zoo as zoo
from scx_ref.cli import main

#: What must never show on a usage error's stderr.
NOISE = ("Traceback", "Exception ignored", "Error in", "OverflowError", "ValueError")


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    """Run ``scx ARGV``: exit status 2 (argparse's SystemExit or main's return) and exactly one
    ``scx <command>: error:`` line holding ``words``, no traceback; that line is returned."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if re.match(r"scx [a-z-]+: error: ", ln)]
    assert len(errors) == 1, err
    assert not any(w in err for w in NOISE), err
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def refuse_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every way the commands load a model or start their run fail the test, recorded in the list
    returned (a test asserts it stayed empty)."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def load(*_a: Any, **_k: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called: the work began before the options were checked")

        return load

    monkeypatch.setattr(zoo, "load_hf", refuse("load_hf"))
    monkeypatch.setattr(verify_mod, "load_model", refuse("load_model"))
    monkeypatch.setattr(ppl_mod, "ppl_run", refuse("ppl_run"))
    monkeypatch.setattr(serve_mod, "build_backend", refuse("build_backend"))
    return calls

"""``scx generate``, ``scx ppl`` and ``scx verify`` as a new user meets them: values past what
the program can hold, an empty ``--json``, a standard output that is a closed pipe (``scx … | head``), and
checks that must run before any model loads. Tiny random models only."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scx_ref.cli import main
from scx_ref.commands import generate, ppl, verify
from scx_ref.commands._args import stdout_closed_quietly

ROOT = Path(__file__).resolve().parents[1]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage error
        return int(exc.code or 0)


def _no_work(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("the command started work before refusing its options")


def test_a_prompt_id_past_int64_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a raw OverflowError traceback from numpy (after the model loaded)."""
    code = _exit_code(["generate", "--model", "tiny-llama", "--prompt-ids", "1," + "9" * 25])
    err = capsys.readouterr().err
    assert code == 2 and "scx generate: error: argument --prompt-ids" in err, err


def test_an_empty_json_path_is_named_as_empty_not_as_a_directory(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("ppl", "verify"):
        assert _exit_code([command, "--model", "tiny-llama", "--json", ""]) == 2
        err = capsys.readouterr().err
        assert f"scx {command}: error: argument --json: must not be empty" in err, err
        assert "directory" not in err, err


@pytest.mark.parametrize("command", ["ppl", "verify"])
def test_a_beta_past_the_protocol_bound_is_refused_before_any_work(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: accepted by the parser, then refused (not naming --beta) only after the model had loaded."""
    monkeypatch.setattr(ppl, "ppl_run", _no_work)
    monkeypatch.setattr(verify, "verify", _no_work)
    assert _exit_code([command, "--model", "tiny-llama", "--beta", "1e101"]) == 2
    assert f"scx {command}: error: argument --beta" in capsys.readouterr().err


def test_verify_refuses_a_token_count_past_the_corpus_before_loading_a_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the model loaded and the prefill and generation checks ran before the ΔPPL check refused it."""
    monkeypatch.setattr(verify, "load_model", _no_work)
    assert main(["verify", "--model", "tiny-llama", "--tokens", "99999999", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "scx verify: error: the number of tokens 99999999 is more than the corpus holds" in err, err


class _ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_the_printer_stops_writing_after_a_broken_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first failed write raises (stopping the generation); the end of the generation writes nothing
    more (was: its newline raised a second BrokenPipeError inside the first one's clean-up)."""
    import torch

    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    printer = generate._Printer(None)
    printer.put(torch.tensor([[1, 2]]))  # the prompt: not printed
    with pytest.raises(BrokenPipeError):
        printer.put(torch.tensor([3]))
    printer.end()
    printer.put(torch.tensor([4]))
    assert printer.ids == [3, 4]


def test_a_broken_pipe_without_a_file_descriptor_is_re_raised_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # fileno() raises io.UnsupportedOperation
    with pytest.raises(BrokenPipeError), stdout_closed_quietly():
        raise BrokenPipeError(32, "Broken pipe")


def _run_into_closed_pipe(argv: list[str], cwd: Path, unbuffered: bool) -> subprocess.CompletedProcess[str]:
    """Run ``scx argv`` with its standard output a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        return subprocess.run(
            [sys.executable, "-m", "scx_ref.cli", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
            timeout=300,
        )
    finally:
        os.close(write)


def test_generate_into_a_closed_pipe_exits_2_with_one_line(tmp_path: Path) -> None:
    """``scx generate … | head``: was exit status 120 with Python's ``Exception ignored … BrokenPipeError``
    after the error line (the unwritten tokens flushed again at exit)."""
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1,2", "--max-new-tokens", "4", "--no-eos"]
    res = _run_into_closed_pipe(argv, tmp_path, unbuffered=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("scx generate: error:") and "Broken pipe" in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_ppl_into_a_closed_pipe_still_writes_its_json(tmp_path: Path, unbuffered: bool) -> None:
    """``scx ppl --json r.json | head``: the record is written and the exit is one error line, status 2.
    Was: unbuffered, the table's BrokenPipeError skipped the JSON; buffered, exit 120 and ``Exception
    ignored``."""
    out = tmp_path / "r.json"
    argv = ["ppl", "--model", "tiny-llama", "--tokens", "8", "--json", str(out)]
    res = _run_into_closed_pipe(argv, tmp_path, unbuffered=unbuffered)
    assert res.returncode == 2, res.stderr
    assert "scx ppl: error:" in res.stderr and "Broken pipe" in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    rec = json.loads(out.read_text())
    assert rec["kind"] == "ppl" and rec["tokens"] == 8


def test_verify_refuses_a_zero_beta_at_a_noised_level_before_any_check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``scx verify --beta 0``: was every check run (the model loaded, prefill, generation, ΔPPL), then a
    ConfigError from the DP budget (β must be > 0) with no verdict table and no JSON."""
    monkeypatch.setattr(verify, "load_model", _no_work)
    assert _exit_code(["verify", "--model", "tiny-llama", "--beta", "0", "--quiet"]) == 2
    assert "scx verify: error: argument --beta: must lie in (0, 1e+100], got 0.0" in capsys.readouterr().err
    from scx_ref.errors import ConfigError

    with pytest.raises(ConfigError, match=r"beta must lie in \(0, 1e\+100\]"):
        verify.verify("tiny-llama", level="paper", beta=0.0, progress=False)


def test_every_command_into_a_closed_pipe_exits_2_with_one_line(tmp_path: Path) -> None:
    """A command without handling of its own (``scx dp``): its table into a pipe whose reader has gone was
    exit status 120 with Python's ``Exception ignored … BrokenPipeError`` (buffered output flushed at exit);
    cli.main now handles a closed standard output for every command."""
    res = _run_into_closed_pipe(["dp", "--model", "tiny-llama"], tmp_path, unbuffered=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("scx dp: error:") and "Broken pipe" in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr and "Traceback" not in res.stderr, res.stderr

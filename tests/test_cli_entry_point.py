"""The ``scx`` entry point: ``scx --version`` prints what ``scx version`` prints, and Ctrl-C inside a
command is one line on stderr and exit status 130, not a traceback."""

from __future__ import annotations

import pytest

from scx_ref.cli import main


def test_scx_version_flag_prints_what_scx_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    from scx_ref import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"scx_ref {__version__}"
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"scx_ref {__version__}"


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KeyboardInterrupt raised inside a command's run (here `scx dp`'s) gave a traceback; now one line
    on stderr and exit code 130. Control: the same command without the interrupt exits 0."""
    from scx_ref.dp import cli as dp_cli

    argv = ["dp", "--sensitivity", "1", "--scale", "2", "--compositions", "3", "--no-pld"]
    assert main(argv) == 0
    capsys.readouterr()

    def interrupted(*_a: object, **_k: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(dp_cli, "run", interrupted)
    parser_run = main(argv)
    err = capsys.readouterr().err
    assert parser_run == 130 and err.strip() == "scx dp: interrupted", err

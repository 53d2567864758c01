"""``scx dp`` and ``scx ppl``: no option silently ignored or changed, bad combinations refused with exit 2
and a one-line message before any model loads, truthful output (the PLD row, the window, the preset)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import scx_ref.commands.ppl as ppl_cli
import scx_ref.dp.cli as dp_cli
from scx_ref.cli import build_parser, main
from scx_ref.dp.accountants import pld_available
from scx_ref.errors import ConfigError


def _no_load(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a model was loaded before the options were checked")


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model (dp's weights, ppl's run) fails the test: refusals come first."""
    monkeypatch.setattr(dp_cli, "load_weights", _no_load)
    monkeypatch.setattr(ppl_cli, "ppl_run", _no_load)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``scx`` on ``argv``, expect exit 2 with one ``error:`` line and no traceback; the line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "error:" in err and "Traceback" not in err, err
    assert captured.out == ""
    return err


# -- scx dp: the PLD row ----------------------------------------------------------------------------------
def test_dp_no_pld_says_skipped_not_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dp", "--sensitivity", "1", "--scale", "2", "--no-pld"]) == 0
    out = capsys.readouterr().out
    assert "skipped (--no-pld)" in out and "not installed" not in out


def test_dp_model_mode_no_pld_says_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--tokens", "2", "--no-pld"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped (--no-pld)" in out and "not installed" not in out


def test_dp_pld_not_installed_still_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import scx_ref.dp.accountants as acc

    monkeypatch.setattr(acc, "pld_available", lambda: False)
    monkeypatch.setattr(dp_cli, "pld_available", lambda: False)
    assert main(["dp", "--sensitivity", "1", "--scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "not installed (pip install scx-ref[dp])" in out and "skipped" not in out


@pytest.mark.skipif(not pld_available(), reason="dp_accounting not installed")
def test_dp_pld_row_when_installed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dp", "--sensitivity", "1", "--scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "PLD (dp_accounting" in out and "skipped" not in out and "not installed" not in out


# -- scx dp: refused combinations -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--beta", "3"], ["--beta"]),
        (["--level", "blind"], ["--level"]),
        (["--level", "paper"], ["--level"]),  # the preset's own value, given: still refused
        (["--guard", "2"], ["--guard"]),
        (["--decoys", "1"], ["--decoys"]),
        (["--guard-ffn", "clear"], ["--guard-ffn"]),
        (["--beta", "3", "--level", "blind"], ["--level", "--beta"]),
    ],
)
def test_dp_config_with_an_option_it_sets_is_refused(
    extra: list[str], named: list[str], no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(["dp", "--model", "tiny-llama", "--config", "paper", *extra], capsys)
    assert all(flag in err for flag in named) and "--config" in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--sensitivity", "1", "--model", "tiny-llama"], "--sensitivity"),
        (["--model", "tiny-llama", "--scale", "2"], "--scale"),
        (["--model", "tiny-llama", "-k", "3"], "--compositions"),
        (["--model", "tiny-llama", "--per-coordinate", "0.25", "--dim", "8"], "--per-coordinate, --dim"),
        (["--sensitivity", "1", "--level", "blind"], "--level"),
        (["--sensitivity", "1", "--tokens", "4"], "--tokens"),
        (["--sensitivity", "1", "--config", "paper"], "--config"),
        (["--per-coordinate", "0.25", "--dim", "8", "--embedding", "bound"], "--embedding"),
        (["--sensitivity", "1", "--dim", "8"], "--dim"),
        (["--sensitivity", "1", "--no-pld", "--pld-interval", "0.01"], "--pld-interval"),
        (["--model", "tiny-llama", "--embedding", "bound", "--device", "cpu"], "--device"),
    ],
)
def test_dp_ignored_options_are_refused(
    argv: list[str], named: str, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert named in _refused(["dp", *argv], capsys)


def test_dp_config_reports_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--no-pld", "--config", "hardened"]
    assert main([*argv, "--json", str(out)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "config=hardened level=blind" in head
    assert json.loads(out.read_text())["preset"] == "hardened"


def test_dp_defaults_unchanged(tmp_path: Path) -> None:
    """Options left out still take their documented defaults (scale 5, k 1; level paper, beta 5, ...)."""
    out = tmp_path / "r.json"
    assert main(["dp", "--sensitivity", "1", "--no-pld", "--json", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["scale"] == 5.0 and raw["k"] == 1
    assert main(["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--json", str(out)]) == 0
    model = json.loads(out.read_text())
    assert model["level"] == "paper" and model["beta"]["qkv"] == 5.0 and model["tokens"] == 0


# -- scx ppl: refused combinations ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--config", "paper", "--beta", "3", "--level", "blind"], "--level, --beta"),
        (["--config", "paper", "--beta", "3"], "--beta"),
        (["--config", "blind", "--level", "blind"], "--level"),
        (["--level", "permute", "--beta", "3"], "--beta"),
        (["--tokens", "5000", "--window", "5000"], "--window"),  # tiny-llama: 4096 positions
        (["--tokens", "64", "--window", "10000"], "--window"),
        (["--tokens", "64", "--window", "100"], "--window"),
    ],
)
def test_ppl_refuses_before_loading(
    extra: list[str], named: str, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert named in _refused(["ppl", "--model", "tiny-llama", *extra], capsys)


def test_ppl_window_limits_and_default() -> None:
    parser = build_parser()

    def opts(*argv: str) -> tuple[str, float, int]:
        return ppl_cli.check_options(parser.parse_args(["ppl", *argv]))

    assert opts("--model", "tiny-llama", "--tokens", "64") == ("paper", 5.0, 64)  # default 512, capped
    assert opts("--model", "tiny-llama") == ("paper", 5.0, 512)
    assert opts("--model", "tiny-llama", "--tokens", "4096", "--window", "4096")[2] == 4096
    assert opts("--model", "smollm2", "--tokens", "8192", "--window", "8192")[2] == 8192
    with pytest.raises(ConfigError, match="--window"):
        opts("--model", "smollm2", "--tokens", "9000", "--window", "8193")


def test_ppl_config_run_reports_preset_and_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    argv = ["ppl", "--model", "tiny-llama", "--tokens", "48", "--dtype", "float64", "--config", "blind"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "config blind, level blind, beta 5" in text and "windows of 48" in text
    rec = json.loads(out.read_text())
    assert rec["preset"] == "blind" and rec["window"] == 48 and rec["pass"]


def test_compare_ppl_reports_the_window_it_ran() -> None:
    from scx_ref.zoo.perplexity import compare_ppl

    def logits(w: Any) -> Any:
        return np.zeros((len(w), 8))

    res = compare_ppl(np.arange(10) % 8, 100, logits, logits)
    assert res.window == 10 and res.tokens == 10


def test_ppl_run_names_the_window_past_the_model() -> None:
    from scx_ref.zoo.perplexity import ppl_run

    with pytest.raises(ConfigError, match="window 5000"):
        ppl_run("tiny-llama", "float64", tokens=5000, window=5000)


# -- help -----------------------------------------------------------------------------------------------
def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[name]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


@pytest.mark.parametrize("command", ["ppl", "dp"])
def test_every_option_has_help(command: str) -> None:
    for action in _subparser(command)._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize("option", ["--model", "--level", "--dtype", "--window", "--beta", "--tokens"])
def test_ppl_help_shows_defaults(option: str) -> None:
    action = next(a for a in _subparser("ppl")._actions if option in a.option_strings)
    assert action.help is not None and "default" in action.help

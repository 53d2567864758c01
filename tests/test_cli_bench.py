"""``scx bench``: lengths past what a bench session holds, a level named twice and an ignored
``--gen-prompt`` are refused with exit 2 and a one-line message naming the option, before any model loads;
the generation phase's bound is exact (a prompt and its fed-back tokens fill the session)."""

from __future__ import annotations

from typing import Any

import pytest

import scx_ref.commands.bench as bench_cli
from scx_ref.cli import main
from scx_ref.errors import ConfigError


def _no_load(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a model was loaded before the options were checked")


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(bench_cli, "build_models", _no_load)
    assert main(["bench", "--no-progress", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("scx bench: error:") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--model", "tiny-llama", "--n", "4097"], "--n 4097"),
        # a model of 8192 positions: the bench's sessions hold 4096 (it used to fail in the first round)
        (["--model", "random:smollm2-shape", "--n", "4097"], "--n 4097"),
        (["--model", "smollm2", "--n", "128,5000"], "--n 5000"),
        (["--model", "tiny-llama", "--gen-prompt", "4000", "--gen-tokens", "97"], "= 4097 positions"),
        (["--model", "tiny-llama", "--gen-prompt", "8", "--gen-tokens", "0"], "--gen-prompt"),
        (["--model", "tiny-llama", "--levels", "permute,permute"], "named twice"),
    ],
)
def test_refused_before_loading(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert names in _refused(argv, capsys, monkeypatch)


def test_check_lengths_bound_is_exact() -> None:
    bench_cli.check_lengths([4096], 4000, 96, 4096)  # fills the session: taken (a bench ran it)
    bench_cli.check_lengths([8], 5000, 0, 4096)  # no decode phase: its prompt is not checked
    with pytest.raises(ConfigError, match="--gen-tokens 97"):
        bench_cli.check_lengths([8], 4000, 97, 4096)
    with pytest.raises(ConfigError, match="--n 33"):
        bench_cli.check_lengths([8, 33], 1, 1, 32)


@pytest.mark.slow
def test_a_full_session_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The bound's edge runs end to end: a 4000-token prompt and 96 fed-back tokens fill tiny-llama's
    4096 positions (with the old bound, one more than the session held, it was refused)."""
    argv = ["bench", "--model", "tiny-llama", "--n", "8", "--gen-prompt", "4000", "--gen-tokens", "96"]
    assert main([*argv, "--repeats", "1", "--warmup", "0", "--no-plain-runner", "--no-progress"]) == 0
    assert "decode" in capsys.readouterr().out


def test_repeats_past_the_cap_are_refused_before_anything_loads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any count of rounds was taken: the bootstrap after the run (4000 draws of every round) needed
    gigabytes past ~10⁴ rounds, after hours of timing; the cap is refused at once, naming it."""
    monkeypatch.setattr(bench_cli, "build_models", _no_load)
    with pytest.raises(SystemExit) as exc:  # argparse's refusal of the option's type
        main(["bench", "--model", "tiny-llama", "--repeats", str(bench_cli.MAX_REPEATS + 1)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --repeats" in err and f"<= {bench_cli.MAX_REPEATS}" in err and "Traceback" not in err

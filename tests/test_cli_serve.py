"""``scx serve`` and ``scx bench-serve`` at the command line: bad input refused with exit status 2 and
one ``scx <command>: error:`` line before long work starts, no ``scx serve`` child left running on any way
out (errors and Ctrl-C), an untimed warm-up round that the results do not count, progress bars on stderr, a
clean refusal of an address ``scx serve`` cannot listen on, and help text with defaults for every option.

All runs use ``tiny-llama`` (no download) with the smallest sizes; nothing asserts about time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")
pytest.importorskip("torch")

import scx_ref.service.spawn as spawn_mod
from scx_ref.cli import build_parser, main
from scx_ref.protocol import Client

MODEL = "tiny-llama"
SMALL = ["--model", MODEL, "--n", "4", "--gen-tokens", "1", "--repeats", "2", "--threads", "1"]
NOISE = ("Traceback", "Exception ignored", "never awaited", "RuntimeError")


def _children() -> list[int]:
    """Pids of this process's live child processes (from /proc; zombies excluded)."""
    out = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                out.append(int(pid))
    return out


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every ServerProcess that bench-serve starts; any still running at the end is killed (so that a
    failing test leaves nothing behind either)."""
    made: list[Any] = []
    original = spawn_mod.ServerProcess

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(spawn_mod, "ServerProcess", Spy)
    yield made
    for sp in made:
        if hasattr(sp, "proc") and sp.proc.poll() is None:
            sp.kill()


def _alive(made: list[Any]) -> list[int]:
    return [sp.proc.pid for sp in made if hasattr(sp, "proc") and sp.proc.poll() is None]


def _one_error_line(err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"scx [a-z-]+: error: ", ln)]
    assert len(errors) == 1, err
    assert not any(w in err for w in NOISE), err
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


# -- defect 1: no orphan server ----------------------------------------------------------------------


def test_bench_serve_too_long_prompt_is_refused_before_a_server_starts(
    spawned: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    before = set(_children())
    rc = main(["bench-serve", "--model", MODEL, "--n", "100000", "--tiles", "", "--skip-load"])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "--n 100000")
    assert _alive(spawned) == [], "a scx serve child is still running"
    assert set(_children()) <= before
    assert spawned == [], "the server was started before --n was checked"


@pytest.mark.parametrize("interrupt", [False, True], ids=["error", "ctrl-c"])
def test_bench_serve_stops_its_server_when_a_run_fails(
    spawned: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], interrupt: bool
) -> None:
    """An error (exit 2) or Ctrl-C (exit 130, one line, no traceback) in the middle of the measurements: the
    server it started is stopped."""
    from scx_ref.errors import ProtocolError

    def fail(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt if interrupt else ProtocolError("injected failure")

    monkeypatch.setattr(Client, "prefill", fail)
    argv = ["bench-serve", *SMALL, "--tiles", "", "--skip-load", "--no-progress"]
    if interrupt:
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert "scx bench-serve: interrupted" in err and "Traceback" not in err, err
    else:
        assert main(argv) == 2
        _one_error_line(capsys.readouterr().err, "injected failure")
    assert len(spawned) == 1
    assert _alive(spawned) == [], "the spawned scx serve is still running"


# -- defect 2 and 3: warm-up, progress -----------------------------------------------------------------


def test_bench_serve_warms_up_untimed_and_shows_progress(
    spawned: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    calls: list[int] = []
    original = Client.prefill

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(Client, "prefill", counted)
    out = tmp_path / "r.json"
    assert (
        main(["bench-serve", *SMALL, "--warmup", "1", "--tiles", "", "--skip-load", "--json", str(out)]) == 0
    )
    assert len(calls) == 2 * (1 + 2)  # both sides: one warm-up round, two timed rounds
    r = json.loads(out.read_text())
    assert r["warmup_rounds"] == 1 and r["latency"]["warmup"] == 1 and r["latency"]["repeats"] == 2
    for phase in ("prefill", "token"):
        assert len(r["latency"][phase]["in_process_rounds_s"]) == 2  # the warm-up round is not counted
        assert len(r["latency"][phase]["remote_rounds_s"]) == 2
    cap = capsys.readouterr()
    assert "warm-up" in cap.out
    assert "scx bench-serve latency" in cap.err and "6/6" in cap.err  # the bar: 2 sides x 3 rounds
    assert _alive(spawned) == []


def test_tile_run_warms_up_untimed_and_reports_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    import scx_ref.forward as forward
    from scx_ref.commands import bench_serve
    from scx_ref.commands.serve import build_backend

    backend = build_backend("random:tiny-dense", "float32", "cpu")  # 4 blocks: 2 middle ones
    middle = backend.config.n_layers - 2
    calls: list[int] = []
    original = forward.block_rows

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(forward, "block_rows", counted)
    steps: list[str] = []
    rows = bench_serve._tile_costs(backend, [1, 2], 4, 1, warmup=2, step=steps.append)
    assert [r["tile"] for r in rows] == [1, 2]
    rounds = 2 + 3  # two warm-up rounds, then at least 3 timed ones
    assert len(steps) == rounds * 2 * 2  # tiles x (1 row, 8 rows)
    assert sum("warm-up" in s for s in steps) == 2 * 2 * 2
    assert len(calls) == rounds * 2 * 2 * middle


def test_progress_bar_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    from scx_ref.commands.bench_serve import _Progress

    with _Progress(3, "scx bench-serve latency", False) as bar:
        bar.step("x")
        bar.write("row")
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == "row\n"
    assert build_parser().parse_args(["bench-serve", "--no-progress"]).no_progress


# -- defect 4: options that would measure nothing or be ignored ----------------------------------------


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--skip-latency", "--skip-load", "--tiles", ""], "nothing to measure"),
        (["--server", "scx://127.0.0.1:1", "--serve-args", "--workers 1"], "--serve-args"),
        (["--serve-args", "--workers 0"], "--serve-args"),
        (["--serve-args", "--dtype float64"], "--serve-args"),
        (["--skip-latency", "--tiles", "", "--gen-tokens", "3"], "--gen-tokens"),
        (["--skip-load", "--clients", "2"], "--clients"),
    ],
    ids=["nothing", "serve-args-with-server", "bad-serve-args", "serve-args-dtype", "gen-tokens", "clients"],
)
def test_bench_serve_refuses_runs_that_measure_nothing_or_ignore_an_option(
    spawned: list[Any], capsys: pytest.CaptureFixture[str], argv: list[str], word: str
) -> None:
    rc = main(["bench-serve", "--model", MODEL, *argv])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, word)
    assert spawned == [] and _alive(spawned) == []


# -- defect 5: scx serve cannot bind ---------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port of 127.0.0.1 this test holds (listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "scx_ref.cli", "serve", "--model", MODEL, "--host", "127.0.0.1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=150)


@pytest.mark.parametrize("which", ["grpc", "ops"])
def test_serve_on_a_busy_port_exits_2_with_one_line(busy_port: int, which: str) -> None:
    if which == "grpc":
        r = _serve("--port", str(busy_port), "--ops-port", "-1")
    else:
        r = _serve("--port", "0", "--ops-port", str(busy_port))
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr, f"127.0.0.1:{busy_port}")
    assert ("ops" in line) == (which == "ops")
    assert "scx serve:" not in r.stdout  # it never said it was listening


def test_serve_on_an_address_not_of_this_host_exits_2() -> None:
    r = _serve("--host", "999.1.1.1", "--port", "0", "--ops-port", "-1")  # the last --host wins
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, "999.1.1.1:0")


_START = """
import asyncio, sys
from scx_ref.commands.serve import build_backend
from scx_ref.errors import ServiceError
from scx_ref.protocol.server import Server
from scx_ref.service.service import SCXService, ServeOptions

port, ops = int(sys.argv[1]), int(sys.argv[2])
opts = ServeOptions(port=port, ops_port=None if ops < 0 else ops)
service = SCXService(Server(build_backend("random:tiny-dense", "float32", "cpu")), opts)
try:
    asyncio.run(service.start())
except ServiceError as exc:
    print("ServiceError:", exc)
"""


@pytest.mark.parametrize("which", ["grpc", "ops"])
def test_service_start_on_a_busy_port_raises_service_error_and_cleans_up(busy_port: int, which: str) -> None:
    """SCXService.start itself (the port taken after scx serve's own check): ServiceError naming the
    address, and a clean exit — no ignored exception or un-awaited shutdown from a half-started server."""
    port, ops = (busy_port, -1) if which == "grpc" else (0, busy_port)
    r = subprocess.run(
        [sys.executable, "-c", _START, str(port), str(ops)], capture_output=True, text=True, timeout=150
    )
    assert r.returncode == 0, r.stderr
    assert f"ServiceError: cannot listen on 127.0.0.1:{busy_port}" in r.stdout, r.stdout + r.stderr
    assert not any(w in r.stderr for w in NOISE), r.stderr


# -- defect 6: help ------------------------------------------------------------------------------


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser: argparse.ArgumentParser = sub.choices[name]  # type: ignore[index]
    return parser


@pytest.mark.parametrize("command", ["serve", "bench-serve"])
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = _subparser(command)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{command} {flag} has no help"
        if action.default not in (None, False) and not action.required:
            assert "default" in action.help, f"{command} {flag} does not show its default {action.default!r}"
    assert "an running" not in parser.format_help()


# -- an in-process run leaves the logger as it found it -------------------------------------------


def test_an_in_process_serve_leaves_the_scx_serve_logger_as_it_found_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``scx serve`` writes its JSON lines through a handler of its own on the ``scx.serve`` logger, at the
    ``--log-level`` asked, not propagating to the root's handlers, while it runs. However the run ends — here
    at the model's load — the logger's handlers, level and propagation are as before. Before, each
    in-process run (a second ``main``, a test) left its handler writing to the stderr of its time: pytest's
    capture, closed since, so every later line of the service printed "--- Logging error ---"."""
    import logging

    from scx_ref.commands import serve as serve_cmd

    from .test_size_caps import _Loaded

    logger = logging.getLogger("scx.serve")
    before = (list(logger.handlers), logger.level, logger.propagate)
    during: list[tuple[list[logging.Handler], int, bool]] = []

    def loader(*_a: Any, **_k: Any) -> Any:
        during.append((list(logger.handlers), logger.level, logger.propagate))
        raise _Loaded

    monkeypatch.setattr(serve_cmd, "build_backend", loader)
    argv = [
        "serve",
        "--model",
        "random:tiny-dense",
        "--port",
        "0",
        "--ops-port",
        "-1",
        "--log-level",
        "debug",
    ]
    for _ in range(2):
        with pytest.raises(_Loaded):
            main(argv)
        assert (list(logger.handlers), logger.level, logger.propagate) == before
    assert len(during) == 2
    for handlers, level, propagate in during:
        (own,) = [h for h in handlers if h not in before[0]]
        assert isinstance(own, logging.StreamHandler) and level == logging.DEBUG and propagate is False

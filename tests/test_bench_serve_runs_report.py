"""``scx bench-serve``, ``models/runs.py`` and ``models/report.py``:

* bench-serve's latency rounds end each round's session on its server (the in-process server's cache
  bytes were left counted after its table was cleared, and every remote session stayed open on the
  stream), record the ``--serve-args`` actually passed (``''`` was recorded as the default), take the
  server's ``batch_rows`` only as an integer >= 1 (a raw KeyError/ValueError, or 2.7 truncated to 2),
  count in tokens/s only the sessions that completed, bound ``--clients`` (one thread each), and leave no
  load thread running when the run is abandoned (a thread that cannot start, Ctrl-C);
* ``python -m scx_models.runs`` refuses a ``--tokens`` past anything the corpus holds before listing its
  windows (a MemoryError, or the machine swapping, for ``--tokens 1000000000000``);
* ``python -m scx_models.report`` refuses a record whose ``command`` is not a string (a raw TypeError),
  whose number is an integer past float range (a raw OverflowError), or whose sweep row's ``wide`` is not a
  bool (a silently wrong column), and names a sweep's own level (it said ``blind`` for any).

Models: ``tiny-llama`` (no download) at the smallest sizes.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "models" / "results"
MODEL = "tiny-llama"


# ---- scx bench-serve --------------------------------------------------------------------------------


class _Bar:
    def step(self, label: str) -> None:
        pass


def test_latency_rounds_free_every_sessions_caches_on_both_servers() -> None:
    """After the interleaved rounds neither server holds a session or counts a cache byte (the in-process
    table was cleared without its byte count, so repeated rounds crept toward ``max_cache_bytes``; the
    remote sessions were never closed)."""
    pytest.importorskip("torch")
    from scx_ref.commands import bench_serve
    from scx_ref.commands.serve import build_backend
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
    from scx_ref.zoo import load_hf
    from scx_ref.zoo.corpus import corpus_tokens

    b = build_backend(MODEL, "float32", "cpu")
    ids = corpus_tokens(4, load_hf(MODEL)[1], b.config.vocab_size)
    cfg = SCXConfig(level="paper")
    local, remote = Server(b), Server(b)  # "remote": a second server behind its own transport
    times, msgs = bench_serve._latency_rounds(
        lambda: Client(b, KeySchedule.generate(), cfg), local, LocalTransport(remote), ids, 1, 0, 2, _Bar()
    )
    assert len(times["local"]["prefill"]) == len(times["remote"]["token"]) == 2
    assert msgs["prefill"] > 0 and msgs["token"] > 0  # the CLOSE messages are not counted
    for server in (local, remote):
        assert server.cache_bytes == 0 and not server.sessions


@pytest.mark.parametrize("value", [None, "2", 2.7, True, 0, -1, [2]])
def test_server_batch_rows_must_be_an_integer_of_at_least_one(
    value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A greeting whose ``batch_rows`` is missing or not an integer >= 1 is refused with a ServiceError naming
    the server, before the in-process side is built on it."""
    from scx_ref.commands import bench_serve
    from scx_ref.errors import ServiceError
    from scx_ref.service import remote as remote_mod

    def connect(self: Any) -> None:
        self.info = {"service": "scx"} if value is None else {"service": "scx", "batch_rows": value}

    monkeypatch.setattr(remote_mod.RemoteTransport, "_connect", connect)
    args = argparse.Namespace(server="scx://127.0.0.1:1", timeout=5.0, no_progress=True, level="paper")
    with pytest.raises(ServiceError, match="batch_rows"):
        bench_serve._measure(args, {}, object(), [], None, None, None)


class _FakeClient:
    """Logits of a fixed argmax; ``prefill`` refuses the prompt ``bad``; ``decode`` takes ``pause`` s."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause

    def prefill(self, ids: Any, link: Any) -> np.ndarray:
        if ids == "bad":
            raise RuntimeError("refused")
        return np.eye(4)[[1]]

    def decode(self, tok: int, link: Any) -> np.ndarray:
        time.sleep(self.pause)
        return np.eye(4)[1]


def test_load_tokens_per_s_counts_only_the_sessions_that_completed() -> None:
    """Of two sessions one fails: tokens/s is one session's tokens over the wall time, not two's."""
    from scx_ref.commands import bench_serve

    tokens = 3
    row = bench_serve._load_run(2, object, _FakeClient, ["ok", "bad"], [[1] * tokens] * 2, tokens)
    assert row["errors"] == 1 and row["wrong_outputs"] == 0
    assert row["tokens_per_s"] == pytest.approx(tokens / row["wall_s"])


def test_abandoned_load_run_leaves_no_session_thread_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """The third session thread cannot start: the run raises only once the two started sessions have ended
    (they used to go on to their last token: after Ctrl-C the command hung until they did)."""
    from scx_ref.commands import bench_serve

    started: list[threading.Thread] = []

    class Thread(threading.Thread):
        def start(self) -> None:
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
            started.append(self)
            super().start()

    fake = types.SimpleNamespace(Thread=Thread, Lock=threading.Lock, Event=threading.Event)
    monkeypatch.setattr(bench_serve, "threading", fake)
    tokens = 2000  # 10 s a session at 5 ms a token: far past the bound below
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="start new thread"):
        bench_serve._load_run(3, object, lambda: _FakeClient(0.005), ["ok"], [[1] * tokens], tokens)
    assert len(started) == 2 and not any(t.is_alive() for t in started)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("clients", ["100000", "1,1025"])
def test_clients_past_the_thread_bound_are_refused_at_parse_time(
    clients: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from scx_ref.cli import build_parser
    from scx_ref.commands._args import MAX_THREADS

    assert MAX_THREADS == 1024
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["bench-serve", "--model", MODEL, "--clients", clients])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "scx bench-serve: error: argument --clients" in err and "Traceback" not in err


def test_bench_serve_records_the_serve_args_it_passed(tmp_path: Path) -> None:
    """``--serve-args ''`` starts ``scx serve`` with no extra options, and the JSON says so (it recorded
    the default ``--workers 2 --threads 1``); the ratio is remote over in-process of the medians."""
    pytest.importorskip("grpc")
    pytest.importorskip("prometheus_client")
    pytest.importorskip("torch")
    from scx_ref.cli import main

    out = tmp_path / "r.json"
    argv = ["bench-serve", "--model", MODEL, "--n", "4", "--gen-tokens", "1", "--repeats", "1"]
    argv += ["--warmup", "0", "--tiles", "", "--skip-load", "--no-progress", "--serve-args", ""]
    assert main([*argv, "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["serve_args"] == ""
    for phase in ("prefill", "token"):
        lat = rec["latency"][phase]
        assert lat["ratio"] == pytest.approx(lat["remote_s"] / lat["in_process_s"])
        assert lat["in_process_rounds_s"] == [lat["in_process_s"]]  # one timed round, no warm-up


# ---- python -m scx_models.runs ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ppl", "sweep"])
def test_runs_refuses_tokens_past_the_corpus_before_anything_runs(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from models import runs

    calls: list[Any] = []
    monkeypatch.setattr(runs, "ppl_run", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(runs, "sweep_run", lambda *a, **k: calls.append(a))
    argv = [kind, "--model", MODEL, "--tokens", "1000000000000", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as info:
        runs.main(argv)
    assert info.value.code == 2 and not calls and not (tmp_path / "r.json").exists()
    err = capsys.readouterr().err
    assert f"runs {kind}: error: argument --tokens" in err and "Traceback" not in err


# ---- python -m scx_models.report ----------------------------------------------------------------------


def _stored(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return data


def _report_refuses(
    tmp_path: Path, rec: dict[str, Any], word: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from models import report

    (tmp_path / "r.json").write_text(json.dumps(rec))
    out = tmp_path / "tables.md"
    with pytest.raises(SystemExit) as info:
        report.main(["--results", str(tmp_path), "--out", str(out)])
    assert info.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "r.json" in lines[0] and word in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["python", "-m"], None, 7])
def test_report_refuses_a_command_that_is_not_a_string(
    command: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = {**_stored("ppl-mixtral-random-float32-permute.json"), "command": command}
    _report_refuses(tmp_path, rec, "'command'", capsys)


def test_report_refuses_an_integer_past_float_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = {**_stored("ppl-mixtral-random-float32-permute.json"), "ppl_plain": 10**400}
    _report_refuses(tmp_path, rec, "'ppl_plain'", capsys)


@pytest.mark.parametrize("wide", ["no", 1, None])
def test_report_refuses_a_sweep_row_whose_wide_is_not_a_bool(
    wide: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = _stored("sweep-smollm2-blind-float32.json")
    rec["rows"][0]["wide"] = wide
    _report_refuses(tmp_path, rec, "'wide'", capsys)


def test_report_names_the_sweeps_own_level(tmp_path: Path) -> None:
    from models.report import load_results, render

    rec = _stored("sweep-smollm2-blind-float32.json")
    (tmp_path / "blind.json").write_text(json.dumps(rec))
    (tmp_path / "paper.json").write_text(json.dumps({**rec, "level": "paper", "command": "paper run"}))
    text = render(load_results(tmp_path))
    assert text.count("Level `blind` on smollm2") == 1 and text.count("Level `paper` on smollm2") == 1


def test_load_row_shows_a_latency_without_samples_as_a_dash() -> None:
    """Every session failed, or ``--tokens 1`` (no decode step): the table shows ``—``, not ``0.00 s``."""
    from scx_ref.commands import bench_serve

    row = bench_serve._load_run(2, object, _FakeClient, ["bad"], [[1]], 1)
    assert row["errors"] == 2 and row["request_p50_s"] is None and row["tokens_per_s"] == 0
    line = bench_serve._row_line(2, "remote", row)
    assert line.count("—") == 4 and " 0.00 s" not in line and " 0.0 ms" not in line
    ok = bench_serve._load_run(1, object, _FakeClient, ["ok"], [[1]], 1)  # completes; no decode step
    line = bench_serve._row_line(1, "remote", ok)
    assert ok["token_p50_ms"] is None and line.count("—") == 2 and "request p50 —" not in line

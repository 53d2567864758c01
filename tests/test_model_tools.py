"""The measurement tools of ``models/`` refuse bad arguments as command-line tools should — exit status 2,
argparse's usage and one ``error:`` line, no traceback, before any model is loaded — and accept good ones;
``models.report`` never empties the README's results section; and the MLP inverter of
:mod:`scx_ref.attacks.inversion` leaves torch's global random state alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def refused(main: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The ``error:`` line ``main(argv)`` exits with (status 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and err.startswith("usage:"), err
    return lines[0]


# ---- 1. fit_inverter(kind="mlp") and the global random state


def test_mlp_inverter_leaves_the_global_random_state_and_is_seeded() -> None:
    """Fitting an MLP inverter draws only from its own seed's generator: torch's global random state is
    what it was (``torch.rand`` after ``torch.manual_seed`` gives the same number with or without a fit in
    between), and one seed gives one inverter."""
    import torch

    from scx_ref.attacks.inversion import fit_inverter
    from scx_ref.config import ModelConfig
    from scx_ref.weights import random_weights

    cfg = ModelConfig(
        vocab_size=32, hidden_size=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, intermediate_size=24
    )
    weights = random_weights(cfg, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    feats, toks = rng.standard_normal((40, 12)), rng.integers(0, 32, 40)

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    state = torch.get_rng_state().clone()
    first = fit_inverter(feats, toks, weights, kind="mlp", epochs=3, hidden=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)

    torch.manual_seed(999)  # another global state: the fit does not depend on it
    again = fit_inverter(feats, toks, weights, kind="mlp", epochs=3, hidden=8, seed=5)
    other = fit_inverter(feats, toks, weights, kind="mlp", epochs=3, hidden=8, seed=6)
    assert np.array_equal(first.embed(feats), again.embed(feats))
    assert not np.array_equal(first.embed(feats), other.embed(feats))


# ---- 2. models.report and the README


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    """A copy of the README (the tests never touch the real one)."""
    copy = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", copy)
    return copy


def test_report_refuses_missing_or_empty_results(
    readme: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing results directory, one with no results records, or one with a file that is not JSON is
    refused (exit 2) with the README untouched and no ``--out`` file written; the real results rewrite the
    copy to the README's own tables; blank tables never replace the section."""
    from models.report import main, update_readme

    before = readme.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.json").write_text('{"kind": "bench"}')  # JSON, but no results record
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ppl.json").write_text("{not json")
    out = tmp_path / "tables.md"
    assert "--results" in refused(
        main, ["--results", str(tmp_path / "none"), "--readme", str(readme)], capsys
    )
    assert "no results records" in refused(main, ["--results", str(empty), "--readme", str(readme)], capsys)
    assert "no results records" in refused(main, ["--results", str(empty), "--out", str(out)], capsys)
    line = refused(main, ["--results", str(broken), "--readme", str(readme)], capsys)
    assert "cannot read the results" in line
    assert "--out" in refused(main, ["--out", str(tmp_path / "no" / "such.md")], capsys)
    assert "--readme" in refused(main, ["--readme", str(tmp_path / "none.md")], capsys)
    assert readme.read_bytes() == before and not out.exists()
    with pytest.raises(ValueError, match="no tables"):
        update_readme(before.decode(), " \n")

    marked = tmp_path / "marked.md"  # a README without the markers: refused, not a traceback
    marked.write_text("# no markers\n")
    assert "markers" in refused(main, ["--readme", str(marked)], capsys)

    assert main(["--readme", str(readme)]) == 0  # the control: the stored results make the README's tables
    assert readme.read_bytes() == before
    assert main(["--out", str(out)]) == 0
    tables = out.read_text()
    assert "| PASS |" in tables and tables.strip() in readme.read_text()


def test_report_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from models.report import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "results JSON files" in text and "write the tables to PATH" in text


# ---- 3. the timing tools' arguments


def _stub(module: Any, name: str, value: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replace ``module.name`` by a function recording its arguments and returning ``value`` (no model is
    loaded by the controls); the list of calls."""
    calls: list[tuple[Any, ...]] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return value

    monkeypatch.setattr(module, name, fake)
    return calls


def test_split_time_refuses_bad_counts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import split_time

    calls = _stub(split_time, "split_prefill", {"hf": 1.0, "server": 0.5, "client": 0.5}, monkeypatch)
    for argv in (["--rounds", "0"], ["--n", "-3"], ["--n", "0"], ["--threads", "0"], ["--n", "2.5"]):
        line = refused(split_time.main, ["--model", "tiny-llama", *argv], capsys)
        assert argv[0] in line
    assert "unknown model" in refused(split_time.main, ["--model", "bogus"], capsys)
    assert "--n" in refused(split_time.main, ["--n", "5000"], capsys)  # past the session's max_length
    assert not calls
    assert split_time.main(["--model", "tiny-llama", "--rounds", "1", "--n", "4", "--threads", "2"]) == 0
    assert calls == [("tiny-llama", 4, 2, True, 1)]


def test_timing_parser_checks_its_options() -> None:
    """The shared parser's types: counts of at least 1 (``--rounds`` at least ``min_rounds``), ``--n`` at
    most ``max_n``, a known model."""
    from models.timing_args import timing_parser

    p = timing_parser("models.x", "doc", rounds=3, min_rounds=2, max_n=64)
    a = p.parse_args(["--model", "random:tiny-dense:3", "--n", "64", "--threads", "1", "--rounds", "2"])
    assert (a.model, a.n, a.threads, a.rounds) == ("random:tiny-dense:3", 64, 1, 2)
    assert p.parse_args([]).rounds == 3
    for argv in (["--n", "65"], ["--rounds", "1"], ["--threads", "-1"], ["--model", "random:nope"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    assert all(action.help for action in p._actions)


def test_client_ab_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from models import client_ab

    row = [(0.01, 0.02, 0.001)] * 4
    calls = _stub(
        client_ab,
        "client_times",
        {(s, v): row for s in ("this", "other") for v in (True, False)},
        monkeypatch,
    )
    other = ["--other", str(ROOT)]
    for argv in (["--rounds", "0"], ["--rounds", "3"], ["--n", "0"], ["--threads", "0"], ["--tokens", "-1"]):
        assert argv[0] in refused(client_ab.main, [*other, *argv], capsys)
    assert "--other" in refused(client_ab.main, ["--other", str(tmp_path)], capsys)
    assert "max_length" in refused(client_ab.main, [*other, "--n", "4000", "--tokens", "100"], capsys)
    assert not calls
    assert client_ab.main([*other, "--model", "tiny-llama", "--rounds", "4", "--n", "4"]) == 0
    assert len(calls) == 1 and calls[0][1:5] == ("tiny-llama", 4, 1, 4)


def test_host_memory_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import host_memory

    calls = _stub(host_memory, "process_peak", (100, 120), monkeypatch)
    for argv in (["--pool-mib", "-1"], ["--rounds", "0"], ["--n", "-3"], ["--threads", "0"]):
        assert argv[0] in refused(host_memory.main, ["--peak-child", "pool", *argv], capsys)
    assert not calls
    assert (
        host_memory.main(["--peak-child", "pool", "--model", "tiny-llama", "--n", "4", "--pool-mib", "0"])
        == 0
    )
    assert calls == [("tiny-llama", 4, 1, True, 0)]


def test_cold_caches_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import cold_caches

    calls = _stub(cold_caches, "client_times", {"plain": [0.01], "evicted": [0.02]}, monkeypatch)
    for argv in (["--evict-mb", "-5"], ["--evict-mb", "0"], ["--rounds", "0"], ["--n", "0"]):
        assert argv[0] in refused(cold_caches.main, ["--model", "tiny-llama", *argv], capsys)
    assert not calls
    assert cold_caches.main(["--model", "tiny-llama", "--rounds", "1", "--n", "4", "--evict-mb", "1"]) == 0
    assert calls == [("tiny-llama", 4, 1, True, 1, 1)]


def test_request_profile_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import request_profile

    calls = _stub(request_profile, "profile_prefill", "report", monkeypatch)
    for argv in (["--device", "bogus"], ["--device", "cuda:01"], ["--top", "0"], ["--rounds", "0"]):
        assert argv[0] in refused(request_profile.main, ["--model", "tiny-llama", *argv], capsys)
    assert not calls
    assert request_profile.main(["--model", "tiny-llama", "--device", "cpu", "--n", "4", "--top", "3"]) == 0
    assert calls == [("tiny-llama", 4, "cpu", True, 5, 3, 1)]


def test_transport_choice_refuses_bad_arguments_and_explains_itself(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from models import transport_choice

    calls = _stub(transport_choice, "measure", [{"library": "x", "bytes": 1, "rtt_ms": 0.1}], monkeypatch)
    assert "--reps" in refused(transport_choice.main, ["--reps", "0"], capsys)
    assert "--json" in refused(transport_choice.main, ["--json", str(tmp_path / "no" / "r.json")], capsys)
    assert not calls
    with pytest.raises(SystemExit) as info:
        transport_choice.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m models.transport_choice")
    assert "echoed by a server in another process" in text and "(2 MB)." in text
    assert "runs per library and size" in text and "write the rows as JSON" in text
    out = tmp_path / "r.json"
    assert transport_choice.main(["--reps", "2", "--json", str(out)]) == 0
    assert calls == [(2,)] and '"rtt_ms": 0.1' in out.read_text()


def test_the_tools_refuse_through_python_m() -> None:
    """Through ``python -m`` (what the auditor ran): exit 2 and one ``error:`` line, no traceback; the
    helper module says it is one."""
    for argv in (
        ["models.split_time", "--model", "tiny-llama", "--rounds", "0"],
        [
            "models.host_memory",
            "--model",
            "tiny-llama",
            "--n",
            "4",
            "--peak-child",
            "pool",
            "--pool-mib",
            "-1",
        ],
    ):
        run = subprocess.run(
            [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert sum("error:" in ln for ln in run.stderr.splitlines()) == 1
    run = subprocess.run(
        [sys.executable, "-m", "models.timing_args", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "helper module" in run.stderr


def test_gemm_and_attention_forms_refuse_bad_counts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from models import attention_forms, gemm_forms
    from scx_ref.commands import bench

    for argv in (["--threads", "0"], ["--rounds", "0"], ["--rounds", "-2"]):
        assert argv[0] in refused(gemm_forms.main, argv, capsys)
    assert "--threads" in refused(attention_forms.main, ["--threads", "0"], capsys)

    class Reached(Exception):
        pass

    def build(*args: Any) -> Any:
        raise Reached(args)

    threads = torch.get_num_threads()
    try:  # the controls: valid counts get as far as the model
        calls = _stub(gemm_forms, "shapes", {}, monkeypatch)
        assert gemm_forms.main(["--model", "tiny-llama", "--threads", "1", "--rounds", "1"]) == 0
        assert calls == [("tiny-llama",)]
        monkeypatch.setattr(bench, "build_models", build)
        with pytest.raises(Reached):
            attention_forms.main(["--model", "tiny-llama", "--threads", "1", "--calls", "1", "--keys", "4"])
    finally:
        torch.set_num_threads(threads)


# ---- the full-model runs' command lines


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["ppl", "--tokens", "0"], "--tokens"),
        (["ppl", "--beta", "nan"], "--beta"),
        (["generate", "--prompts", "0"], "--prompts"),
        (["sweep", "--betas", "0,1"], "--betas"),
        (["sweep", "--dtypes", "float16"], "--dtypes"),
        (["ppl", "--out", "/nonexistent/x.json"], "--out"),
    ],
)
def test_runs_refuses_bad_arguments(argv: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m scx_models.runs``: bad counts, scales, dtypes and paths exit 2 before any model loads
    (they used to run into a traceback)."""
    from models import runs

    def loader(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "load_model", loader)
        mp.setattr(runs, "ppl_run", loader)
        assert word in refused(runs.main, argv, capsys)


def test_runs_reports_what_the_model_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    """A value only the model can refuse (a window past its positions) exits 2 with the model's message."""
    from models import runs

    line = refused(
        runs.main, ["ppl", "--model", "tiny-llama", "--tokens", "8000", "--window", "8000"], capsys
    )
    assert "window" in line


@pytest.mark.parametrize(
    ("argv", "word"),
    [(["--out", "x.json", "--prompts", "0"], "--prompts"), (["--out", "/nonexistent/x.json"], "--out")],
)
def test_security_refuses_bad_arguments(
    argv: list[str], word: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from models import security

    assert word in refused(security.main, argv, capsys)

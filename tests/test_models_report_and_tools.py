"""``models/`` (``scx_models``): a results table is made only from well-formed records whose verdicts
follow from their numbers, one file per table cell; ``models.bench_intervals`` judges the goals (SCX /
Hugging Face) only against a Hugging Face baseline and refuses malformed rows with exit status 2; the sweep
refuses repeated scales and dtypes and a window past the model's positions before any model loads;
``models.security`` says ``not sent`` for a stage the model never sends (rather than ``not detected``)
and shows progress; ``models.host_memory`` leaves torch's global random state alone."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "models" / "results"


def refused(main: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error:`` line ``main(argv)`` exits with (status 2, argparse's usage, no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage:"), err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def _stored(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return data


# ---- models.report: malformed records, verdicts that do not follow, two files for one cell

PPL = "ppl-mixtral-random-float32-permute.json"
GEN = "generate-mixtral-random-float32-permute.json"
SWEEP = "sweep-smollm2-blind-float64.json"


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda r: r.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r.__setitem__(key, value)


def _first_row(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r["rows"][0].__setitem__(key, value)


@pytest.mark.parametrize(
    ("name", "change", "word"),
    [
        (PPL, _without("ppl_scx"), "ppl_scx"),  # a KeyError traceback before
        (PPL, _set("rel_delta_ppl", float("nan")), "rel_delta_ppl"),  # shown as "nan (≤ 1e-05) … PASS"
        (PPL, _set("rel_delta_ppl", 0.5), "pass=True"),  # PASS beside a ΔPPL 50 000 × the bound
        (PPL, _set("criterion_rel_delta_ppl", 1.0), "criterion"),  # a bound other than the dtype's
        (PPL, _set("tokens", "4096"), "tokens"),
        (GEN, _set("identical", 3), "continuations"),  # "3/8 prompts … PASS"
        (GEN, _set("continuations", []), "continuations"),  # a partial run kept as a whole one
        (SWEEP, _set("rows", 5), "rows"),  # a TypeError traceback before
        (SWEEP, _first_row("within", False), "within"),  # ✗ beside a ΔPPL within the bound
        (SWEEP, _first_row("max_abs_dlogit", float("nan")), "max_abs_dlogit"),
        (SWEEP, _first_row("rel_delta_ppl", float("inf")), "within"),  # inf beside within=True
    ],
)
def test_report_refuses_a_malformed_or_inconsistent_record(
    name: str,
    change: Callable[[dict[str, Any]], None],
    word: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record whose table cells would be missing, not finite, or a verdict its own numbers contradict is
    refused (exit 2, naming the file and the field) and nothing is written; the same record unchanged is
    the control: it makes a table."""
    from models.report import main

    rec = _stored(name)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / name).write_text(json.dumps(rec))
    changed = copy.deepcopy(rec)
    change(changed)
    (bad / name).write_text(json.dumps(changed))
    out = tmp_path / "tables.md"
    line = refused(main, ["--results", str(bad), "--out", str(out)], capsys)
    assert name in line and word in line
    assert not out.exists()
    assert main(["--results", str(good), "--out", str(out)]) == 0
    assert rec["command"] in out.read_text()


def test_report_refuses_two_records_of_one_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two ppl records of one model, dtype and level (a rerun at 64 tokens kept beside the 4096-token
    one), or two sweep files with one (dtype, β) row, are refused naming both files: the table used to
    show whichever file sorted last, silently."""
    from models.report import main

    ppl, sweep = _stored(PPL), _stored(SWEEP)
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / PPL).write_text(json.dumps(ppl))
    (twice / "ppl-rerun.json").write_text(json.dumps({**ppl, "tokens": 64, "command": "rerun"}))
    line = refused(main, ["--results", str(twice)], capsys)
    assert PPL in line and "ppl-rerun.json" in line

    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / SWEEP).write_text(json.dumps(sweep))
    (rows / "sweep-again.json").write_text(json.dumps({**sweep, "rows": sweep["rows"][:1]}))
    line = refused(main, ["--results", str(rows)], capsys)
    assert SWEEP in line and "sweep-again.json" in line

    (rows / "sweep-again.json").unlink()  # the control: one file per cell makes the tables
    assert main(["--results", str(rows)]) == 0


def test_report_gives_sweeps_of_other_lengths_their_own_table(tmp_path: Path) -> None:
    """Sweeps of one model at other token counts or windows are separate tables, each headed by its own
    counts (the merged table used to state the first file's counts for every row)."""
    from models.report import load_results, render

    sweep = _stored(SWEEP)
    (tmp_path / "sweep-a.json").write_text(json.dumps(sweep))
    longer = {**sweep, "tokens": 1024, "window": 512, "command": "longer"}
    (tmp_path / "sweep-b.json").write_text(json.dumps(longer))
    text = render(load_results(tmp_path))
    assert text.count("### ΔPPL against β (smollm2)") == 2
    assert "(256 tokens, windows of 256)" in text and "(1024 tokens, windows of 512)" in text


# ---- models.bench_intervals


BENCH = "bench_hf_s58_2t.json"


def _bench(tmp_path: Path, change: Callable[[dict[str, Any]], None] | None = None) -> str:
    data = _stored(BENCH)
    if change is not None:
        change(data)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_bench_intervals_judges_only_a_hugging_face_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The goals are SCX / Hugging Face ratios: a file whose baseline is PlainRunner (what ``scx bench``
    runs against for a model without a Hugging Face one) gets no verdicts — it used to be judged met or
    missed against them. The control: the same rows against Hugging Face are judged."""
    from models.bench_intervals import main

    assert main([_bench(tmp_path)]) == 0
    judged = capsys.readouterr().out
    assert "met" in judged and "goal 1.10" in judged

    plain = "PlainRunner: the project's plain torch forward with a KV cache on the same TorchBackend"
    assert main([_bench(tmp_path, lambda d: d["meta"].__setitem__("baseline", plain))]) == 0
    out = capsys.readouterr().out
    assert "no verdicts: the baseline is not Hugging Face" in out
    assert " met" not in out and "missed" not in out and "undecided" not in out
    assert out.rstrip().endswith("verdicts: - 8")


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda d: d["rows"][0]["baseline_round_s"].__setitem__(0, 0.0), "baseline round seconds"),
        (lambda d: d["rows"][0].__setitem__("n", None), "length n"),
        (lambda d: d["rows"][0].pop("phase"), "phase"),
        (lambda d: d.__setitem__("rows", []), "no rows"),
    ],
)
def test_bench_intervals_refuses_malformed_rows(
    change: Callable[[dict[str, Any]], None], word: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A zero baseline round (ZeroDivisionError), a row without an integer length or a phase (TypeError,
    KeyError while printing) and a file without rows (an empty tally, exit 0) exit 2 with one error line."""
    from models.bench_intervals import main

    line = refused(main, [_bench(tmp_path, change)], capsys)
    assert "not a scx bench --json file" in line and word in line


# ---- models.runs sweep


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--betas", "1,10,1"], "--betas"),
        (["--betas", "1,1e0"], "--betas"),
        (["--dtypes", "float32,float32"], "--dtypes"),
        (["--tokens", "5000", "--window", "5000"], "window 5000 exceeds the 4096 positions"),
    ],
)
def test_sweep_refuses_repeats_and_long_windows_before_loading(
    argv: list[str], word: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeated scale or dtype (run twice, two rows for one table cell) and a window past the model's
    positions (refused by the SCX side only after the plaintext logits were computed) exit 2 before any
    model is loaded."""
    from models import runs

    def loader(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runs, "load_model", loader)
    line = refused(runs.main, ["sweep", "--model", "tiny-llama", *argv], capsys)
    assert word in line


def test_sweep_accepts_distinct_scales() -> None:
    """The control of the repeats: distinct scales and dtypes parse, in order."""
    from models.runs import _dtypes, beta_list

    assert beta_list("1,10,0.5") == [1.0, 10.0, 0.5]
    assert _dtypes("float64,float32") == ["float64", "float32"]


# ---- models.security


def test_security_says_not_sent_for_a_stage_never_sent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """tiny-llama has 2 blocks, all guard blocks at r1 = r2 = 4: ``gen_mid`` is never sent, so a tampering
    of it changes nothing and is ``not sent`` (it was reported ``not detected`` — for NaN, an integer dtype
    and an extra row too, which a sent reply has detected). The control: ``gen_qkv``, sent, is detected.
    The run shows its progress on stderr."""
    pytest.importorskip("torch")
    from models import security
    from scx_ref.stages import Stage

    monkeypatch.setattr(security, "STAGES", [(Stage.GEN_MID, "blinded"), (Stage.GEN_QKV, "blinded")])
    changes = security._changes()
    monkeypatch.setattr(security, "_changes", lambda: {"NaN": changes["NaN"]})
    rec = security.security_run("tiny-llama", "float32", 1, 4, 1, progress=True)
    outcomes = {t["stage"]: t["outcome"] for t in rec["tampering"]}
    assert outcomes == {"gen_mid": "not sent", "gen_qkv": "detected"}
    assert "security" in capsys.readouterr().err


# ---- models.host_memory


def test_host_memory_product_forms_leave_the_global_random_state() -> None:
    """The LM-head product's random rows come from their own generator: torch's global random state is
    what it was (they used ``torch.randn`` without one)."""
    torch = pytest.importorskip("torch")
    from models.host_memory import product_forms
    from scx_ref.commands.bench import build_models

    backend, _hf, _used = build_models("tiny-llama", "float32", "cpu")
    state = torch.get_rng_state().clone()
    got = product_forms(backend, 3, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(got) == 3 and all(len(v) == 3 for v in got.values())


def test_generate_refuses_a_continuation_past_the_positions_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt and continuation longer than the model's positions exit 2 before any model is loaded (the
    SCX side refused them only after every plaintext continuation had run)."""
    from models import runs

    def loader(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runs, "load_model", loader)
    argv = ["generate", "--model", "tiny-llama", "--prompt-len", "8", "--new", "4089"]
    assert "exceed the 4096 positions" in refused(runs.main, argv, capsys)


# ---- the timing tools that need a Hugging Face model


@pytest.mark.parametrize(
    ("name", "function", "extra"),
    [
        ("split_time", "split_prefill", []),
        ("client_ab", "client_times", ["--other", str(ROOT), "--rounds", "4"]),
        ("request_profile", "profile_prefill", []),
    ],
)
def test_hf_timing_tools_refuse_a_random_preset_while_parsing(
    name: str,
    function: str,
    extra: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``random:<preset>`` has no Hugging Face model to compare with or build from: refused while parsing
    (exit 2, one error line) — it used to build the weights and then exit 1. The control: a registered
    model gets as far as the measurement."""
    import importlib

    module = importlib.import_module(f"models.{name}")
    calls: list[tuple[Any, ...]] = []

    def fake(*args: Any, **_: Any) -> Any:
        calls.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(module, function, fake)
    line = refused(module.main, ["--model", "random:tiny-dense", "--n", "4", *extra], capsys)
    assert "--model" in line and "no Hugging Face model" in line
    assert not calls
    with pytest.raises(SystemExit) as info:
        module.main(["--model", "tiny-llama", "--n", "4", *extra])
    assert info.value.code == 0 and len(calls) == 1


def test_report_shows_a_ppl_past_float_range_as_inf_beyond_its_bound(tmp_path: Path) -> None:
    """A sweep row whose SCX perplexity left float range (ΔPPL inf, ``within`` false) is a measured
    failure, shown as such (``inf ✗``), not refused like a NaN."""
    from models.report import load_results, render

    sweep = _stored(SWEEP)
    sweep["rows"][0].update(rel_delta_ppl=float("inf"), within=False)
    (tmp_path / SWEEP).write_text(json.dumps(sweep))
    assert "| inf ✗ |" in render(load_results(tmp_path))


def test_runs_default_out_keeps_another_commands_stored_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run without --out whose default file holds another command's results (a README table's source)
    is refused before anything runs, the file untouched; the same command, or an explicit --out, writes."""
    from models import runs

    stored = tmp_path / "ppl-mixtral-random-float32-permute.json"
    held = "python -m scx_models.runs ppl --model mixtral-random --dtype float32 --tokens 4096 --window 1024"
    stored.write_text(json.dumps({"kind": "ppl", "command": held}))
    before = stored.read_text()
    monkeypatch.setattr(runs, "RESULTS_DIR", tmp_path)
    calls: list[tuple[Any, ...]] = []

    def fake_ppl(*args: Any, **kw: Any) -> dict[str, Any]:
        calls.append(args)
        return {"kind": "ppl", "pass": True}

    monkeypatch.setattr(runs, "ppl_run", fake_ppl)
    with pytest.raises(SystemExit) as info:
        runs.main(["ppl", "--model", "mixtral-random", "--tokens", "64", "--window", "32"])
    assert info.value.code == 2 and not calls and stored.read_text() == before
    assert "holds the results of another run" in capsys.readouterr().err
    assert runs.main(held.split()[3:]) == 0 and len(calls) == 1  # the stored command again: rewritten
    assert json.loads(stored.read_text())["command"] == held
    other = tmp_path / "mine.json"
    assert runs.main(["ppl", "--model", "mixtral-random", "--tokens", "64", "--out", str(other)]) == 0
    assert json.loads(other.read_text())["command"].endswith(str(other))

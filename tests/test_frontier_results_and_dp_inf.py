"""The frontier report's result files and ``scx dp``'s infinite ε.

- the frontier read a result's ``dp``, ``exactness32``, ``cost``, ``preset``, counts and ``missing`` and an
  ``scx bench --json`` file's ``meta`` and rows without checking their types: a text or a list where a
  number or an object belongs was a ValueError/TypeError/KeyError/AttributeError traceback from
  ``python -m scx_ref.attacks.report``; NaN, negative sizes, a bool as a number or ``n`` were shown as
  table cells ("nan GB", "-10 B", "n=True"); an ``at_baseline`` verdict of an attack this version does not
  know was a KeyError; ``--n_new 0`` printed "-1 decode steps"; an unreadable ``--bench`` was reported as
  "cannot write";
- ``scx dp`` printed PLD ε = inf (dp_accounting's privacy-loss distribution overflowing exp()) and an
  advanced ε = inf without a word on why or on what still holds, with numpy's overflow warnings on stderr;
  a δ of 0.9999999 was shown as 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from scx_ref.attacks import frontier, report
from scx_ref.cli import main
from scx_ref.errors import ConfigError
from tests.documents import edited
from tests.test_dp import needs_pld

_RATE = {"rate": 0.5, "lo": 0.2, "hi": 0.8, "k": 5, "n": 10}


def _setting(name: str, preset: str | None, level: str) -> dict[str, Any]:
    return {
        "setting": name,
        "preset": preset,
        "mechanism": "m",
        "config": {"level": level, "r1": 0, "r2": 0, "beta": 5.0, "l_s": 1, "l_e": 1},
        "metrics": {"vm_qkv1_bag_recall": 0.5},
        "rates": {"vm_qkv1_bag_recall": dict(_RATE)},
        "baselines": {"prompt_bag": dict(_RATE)},
        "at_baseline": {"vm_qkv1_bag_recall": False},
        "cost": {
            "client_flop_share_prefill": 0.1,
            "bytes_per_prompt": 100.0,
            "bytes_per_token": 10.0,
            "round_trips_per_prompt": 2,
            "round_trips_per_token": 1,
        },
        "exactness": {"max_rel_logit_err": 1e-14, "greedy_identical": 1.0},
        "exactness32": {"rel_delta_ppl": 1e-7, "pass": True, "greedy_identical": "2/2"},
        "dp": {"epsilon_request": 3.0, "epsilon_prefill": 1.0, "releases_per_token": 3, "exposures": ["a"]},
    }


def _result() -> dict[str, Any]:
    return {
        "kind": "frontier",
        "model": "tiny",
        "n_prompts": 1,
        "prompt_len": 2,
        "n_new": 2,
        "settings": [_setting("plaintext", None, "permute"), _setting("paper", "paper", "paper")],
    }


def _bench() -> dict[str, Any]:
    return {
        "meta": {"command": "scx bench", "configs": {"paper": {}}},
        "rows": [
            {"config": "paper", "phase": "prefill", "n": 8, "ratio_median": 1.5, "total_ratio_median": 2.0},
            {"config": "paper", "phase": "decode", "ratio_median": 1.2},
        ],
    }


def _report_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``python -m scx_ref.attacks.report ARGV`` must exit 2 with one error line; returns it."""
    with pytest.raises(SystemExit) as exc:
        report.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("python -m scx_ref.attacks.report: error: "), err
    return line


# -- malformed result files ------------------------------------------------------------------------------

_BAD_RESULT: dict[str, tuple[list[Any], Any]] = {
    "dp epsilon a text": (["settings", 1, "dp", "epsilon_request"], "lots"),
    "dp epsilon a list": (["settings", 1, "dp", "epsilon_prefill"], [1]),
    "dp epsilon a bool": (["settings", 1, "dp", "epsilon_prefill"], True),
    "dp epsilon NaN": (["settings", 1, "dp", "epsilon_prefill"], math.nan),
    "dp epsilon negative": (["settings", 1, "dp", "epsilon_prefill"], -1.0),
    "dp exposures a number": (["settings", 1, "dp", "exposures"], 3),
    "dp exposures a text": (["settings", 1, "dp", "exposures"], "abc"),
    "exactness32 without rel_delta_ppl": (["settings", 1, "exactness32", "rel_delta_ppl"], KeyError),
    "exactness32 rel_delta_ppl a text": (["settings", 1, "exactness32", "rel_delta_ppl"], "x"),
    "exactness32 without greedy": (["settings", 1, "exactness32", "greedy_identical"], KeyError),
    "exactness32 pass a text": (["settings", 1, "exactness32", "pass"], "no"),
    "exactness NaN": (["settings", 1, "exactness", "max_rel_logit_err"], math.nan),
    "cost NaN": (["settings", 1, "cost", "bytes_per_prompt"], math.nan),
    "cost negative": (["settings", 1, "cost", "bytes_per_token"], -10.0),
    "cost infinite": (["settings", 1, "cost", "client_flop_share_prefill"], math.inf),
    "at_baseline verdict a text": (["settings", 1, "at_baseline", "vm_qkv1_bag_recall"], "no"),
    "preset a list": (["settings", 1, "preset"], ["paper"]),
    "n_new a text": (["n_new"], "2"),
    "n_new negative": (["n_new"], -3),
    "n_prompts a bool": (["n_prompts"], True),
    "prompt_len zero": (["prompt_len"], 0),
    "missing a number": (["missing"], 5),
    "missing of numbers": (["missing"], [1, 2]),
}


@pytest.mark.parametrize("case", sorted(_BAD_RESULT))
def test_frontier_report_refuses_a_malformed_result(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = edited(_result(), *_BAD_RESULT[case])
    with pytest.raises(ConfigError):
        frontier.frontier_report(bad)
    src = tmp_path / "f.json"
    src.write_text(json.dumps(bad))
    line = _report_exit([str(src), "--out", str(tmp_path / "F.md")], capsys)
    assert "result" in line or "setting 'paper'" in line, line
    assert not (tmp_path / "F.md").exists()


@pytest.mark.parametrize(
    ("path", "value"),
    [(["settings", 1, "preset"], ["paper"]), (["seconds"], "fast"), (["missing"], [["paper"]])],
)
def test_frontier_merge_refuses_a_malformed_part(
    path: list[Any], value: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was: TypeError (unhashable preset, a list in ``missing``) or ValueError (``float('fast')``)."""
    bad = edited(_result(), path, value)
    with pytest.raises(ConfigError):
        frontier.merge_results([_result(), bad])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result()))
    b.write_text(json.dumps(bad))
    _report_exit([str(a), "--with", str(b), "--merged", str(tmp_path / "m.json")], capsys)
    assert not (tmp_path / "m.json").exists()


_BAD_BENCH: dict[str, tuple[list[Any], Any]] = {
    "meta a list": (["meta"], [1]),
    "configs a number": (["meta", "configs"], 3),
    "total_ratio_median a text": (["rows", 0, "total_ratio_median"], "x"),
    "n a bool": (["rows", 0, "n"], True),
    "n negative": (["rows", 0, "n"], -8),
    "ratio_median NaN": (["rows", 0, "ratio_median"], math.nan),
    "ratio_median a bool": (["rows", 1, "ratio_median"], True),
    "ratio_median negative": (["rows", 1, "ratio_median"], -1.0),
}


@pytest.mark.parametrize("case", sorted(_BAD_BENCH))
def test_frontier_refuses_a_malformed_bench(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the function (an in-memory bench), the report and ``scx attack --frontier --bench``
    (refused before any model loads)."""
    bad = edited(_bench(), *_BAD_BENCH[case])
    with pytest.raises(ConfigError):
        frontier.frontier_rows(_result(), bad)
    res, src = tmp_path / "f.json", tmp_path / "b.json"
    res.write_text(json.dumps(_result()))
    src.write_text(json.dumps(bad))
    line = _report_exit([str(res), "--bench", str(src)], capsys)
    assert f"--bench {str(src)!r}" in line
    with pytest.raises(ConfigError):
        frontier.read_bench(src)

    def no_model(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a model loaded before --bench was checked")

    monkeypatch.setattr("scx_ref.attacks.cli.load_model", no_model)
    argv = ["attack", "--model", "tiny-llama", "--frontier", "--prompts", "1", "--length", "4"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--bench", str(src)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--bench" in err.strip().splitlines()[-1]


def test_unreadable_bench_is_named_as_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``--bench`` that cannot be read (here a directory) was reported by the report as "cannot write"."""
    res = tmp_path / "f.json"
    res.write_text(json.dumps(_result()))
    line = _report_exit([str(res), "--bench", str(tmp_path)], capsys)
    assert "cannot read" in line and "cannot write" not in line


def test_frontier_renders_what_it_should(tmp_path: Path) -> None:
    """The well-formed result still renders, with an infinite ε as a JSON number or as ``"inf"`` (how
    ``scx dp --json`` writes it), the bench merged in, an attack this version does not know shown by its
    key (was: KeyError), and no "-1 decode steps" for a run with no generated tokens."""
    res = _result()
    res["settings"][1]["dp"]["epsilon_request"] = math.inf
    res["settings"][1]["dp"]["epsilon_prefill"] = "inf"
    res["settings"][1]["at_baseline"]["an_attack_of_a_later_version"] = False
    res["n_new"] = 0
    src, bench, out = tmp_path / "f.json", tmp_path / "b.json", tmp_path / "F.md"
    src.write_text(json.dumps(res))
    bench.write_text(json.dumps(_bench()))
    assert report.main([str(src), "--bench", str(bench), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| ∞ · ∞ |" in text and "1.50× (n=8) · 1.20×" in text
    assert "- paper: an_attack_of_a_later_version, VM QKV-1 bag" in text
    assert "(0 decode steps)" in text and "-1 decode" not in text
    bench.write_text(json.dumps(dict(_bench(), meta=None)))  # no meta: was AttributeError on None
    assert report.main([str(src), "--bench", str(bench), "--out", str(out)]) == 0
    assert "and the latency ratios of:\n\n    ?" in out.read_text()


@pytest.mark.parametrize(
    "kwargs", [{"tokens": 0}, {"prompts": -1}, {"new": 0}, {"new": 1.5}, {"prompts": True}]
)
def test_exactness32_refuses_bad_counts_before_loading(
    kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: ``prompts=-1`` blamed "the number of tokens ... got -56", ``new=0`` reported greedy agreement
    "2/2" having compared nothing."""
    from scx_ref.protocol.presets import preset

    def no_model(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a model loaded before the counts were checked")

    monkeypatch.setattr("scx_ref.zoo.load_model", no_model)
    monkeypatch.setattr("scx_ref.zoo.perplexity.ppl_run", no_model)
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        frontier.exactness32("tiny-llama", preset("paper").config(2), **kwargs)


def test_frontier_rows_of_a_result_without_mechanisms() -> None:
    """``frontier_rows`` checks the short shape (no ``mechanism`` needed): was a KeyError."""
    res = _result()
    for s in res["settings"]:
        del s["mechanism"]
    rows = frontier.frontier_rows(res)
    assert [r["summary"] for r in rows] == ["?", "?"]


# -- scx dp: infinite ε explained --------------------------------------------------------------------------


def _dp(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    """Run ``scx dp ARGV --json``: stdout and the JSON, read strictly (no bare Infinity/NaN)."""
    out = tmp_path / "dp.json"
    assert main(["dp", *argv, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err  # dp_accounting's numpy overflow warnings stay off stderr

    def refuse(name: str) -> Any:
        raise AssertionError(f"bare {name} in the JSON")

    return captured.out, json.loads(out.read_text(), parse_constant=refuse)


def _line(text: str, start: str) -> str:
    """The first line of ``text`` that starts with ``start``, without trailing blanks."""
    return next(line for line in text.splitlines() if line.startswith(start)).rstrip()


@needs_pld
def test_dp_pld_overflow_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ε = 1000 per release: the PLD (interval 0.1) overflows exp(); the basic bound holds."""
    text, data = _dp(["--sensitivity", "1000", "--scale", "1"], tmp_path, capsys)
    assert "inf (see note)" in text
    note = next(line for line in text.splitlines() if line.startswith("note: PLD epsilon = inf"))
    assert "does not apply" in note and "basic epsilon = 1000 (delta = 0)" in note and "709.8" in note
    assert "note: advanced DRV epsilon = inf" in text
    assert (
        data["epsilon_pld"] == "inf"
        and data["pld_inf_reason"] == "overflow"
        and data["epsilon_basic"] == 1000
    )
    assert any(n.startswith("PLD epsilon = inf") for n in data["notes"])


@needs_pld
def test_dp_pld_overflow_from_a_coarse_interval_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ε = 1 at --pld-interval 1e300: the rounding alone overflows; the note says so, and what holds."""
    text, data = _dp(["--sensitivity", "1", "--scale", "1", "--pld-interval", "1e300"], tmp_path, capsys)
    note = next(line for line in text.splitlines() if line.startswith("note: PLD epsilon = inf"))
    assert "the --pld-interval given is that coarse" in note
    assert "basic epsilon = 1 (delta = 0) and advanced DRV epsilon = 6.9748" in note
    assert data["pld_inf_reason"] == "overflow" and len(data["notes"]) == 1


@needs_pld
def test_dp_pld_inf_below_the_truncated_tail_is_not_called_an_overflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1000 releases of ε = 1 at δ = 1e-16: dp_accounting counts the 1e-15 tail it truncates when
    composing as an infinite loss, so its ε at that δ is inf; a δ of 1e-10 gives a finite one."""
    argv = ["--sensitivity", "1", "--scale", "1", "-k", "1000"]
    text, data = _dp([*argv, "--delta", "1e-16"], tmp_path, capsys)
    note = _line(text, "note: PLD epsilon = inf")
    assert "within the probability mass dp_accounting truncates" in note and "overflow" not in note
    assert "basic epsilon = 1000 (delta = 0)" in note
    assert data["pld_inf_reason"] == "delta_below_tail" and data["epsilon_basic"] == 1000
    text, data = _dp([*argv, "--delta", "1e-10"], tmp_path, capsys)
    assert data["pld_inf_reason"] is None and data["epsilon_pld"] < 1000 and "note:" not in text


@needs_pld
def test_dp_model_mode_pld_overflow_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "random:tiny-dense", "--embedding", "bound", "--pld-interval", "1000"]
    text, data = _dp(argv, tmp_path, capsys)
    assert _line(text, "PLD (dp_accounting)").endswith("inf (see note)  1e-06")
    assert "note: PLD epsilon = inf is no privacy measurement" in text
    assert data["pld_inf_reason"] == "overflow" and data["epsilon_pld"] == "inf"
    assert data["notes"][-1].startswith("PLD epsilon = inf")  # after the budget's own notes


@needs_pld
def test_dp_finite_run_has_no_inf_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, data = _dp(["--sensitivity", "1", "--scale", "1"], tmp_path, capsys)
    assert "note:" not in text and "overflow" not in text
    assert data["notes"] == [] and data["pld_inf_reason"] is None


def test_dp_every_epsilon_inf_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ε per release past float64 (raw), or nothing noised (level permute): every ε is inf, and says why."""
    text, data = _dp(["--sensitivity", "1e308", "--scale", "1e-10", "--no-pld"], tmp_path, capsys)
    assert "note: every epsilon is inf" in text and "exceeds the float64 range" in text
    assert data["epsilon_basic"] == "inf" and len(data["notes"]) == 1
    argv = ["--model", "random:tiny-dense", "--embedding", "bound", "--level", "permute", "--no-pld"]
    text, data = _dp(argv, tmp_path, capsys)
    assert "note: every epsilon is inf: no message of this configuration is a Laplace release" in text
    assert data["notes"][-1].startswith("every epsilon is inf")


def test_dp_delta_just_below_one_is_not_shown_as_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dp", "--sensitivity", "1", "--scale", "1", "--delta", "0.9999999", "--no-pld"]) == 0
    assert _line(capsys.readouterr().out, "best closed form").endswith(" 0.9999999")

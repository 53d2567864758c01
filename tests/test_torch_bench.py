"""``scx bench`` runs end to end on a tiny model and writes the documented JSON rows (ratios are
measured, not asserted: they depend on the machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from scx_ref.cli import main
from scx_ref.commands.bench import build_backend
from scx_ref.errors import ConfigError


def test_bench_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        "tiny-llama",
        "--quick",
        "--repeats",
        "1",
        "--n",
        "16",
        "--gen-prompt",
        "16",
        "--gen-tokens",
        "2",
        "--json",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["phase"], r["n"], r["level"]) for r in rows} == {
        ("prefill", 16, "permute"),
        ("prefill", 16, "blind"),
        ("decode", 16, "permute"),
        ("decode", 16, "blind"),
    }
    for r in rows:
        assert r["ratio_median"] > 0 and r["plain_median_s"] > 0 and 0 <= r["client_flop_share"] < 1
        assert r["state_ratio"] >= 1
    blind = [r for r in rows if r["level"] == "blind"]
    permute = [r for r in rows if r["level"] == "permute" and r["phase"] == "prefill"]
    assert all(r["client_flop_share"] > 0 for r in blind) and permute[0]["client_flop_share"] == 0
    assert data["meta"]["model"] == "tiny-llama" and "PlainRunner" in data["meta"]["baseline"]
    assert "ratio" in capsys.readouterr().out


def test_bench_rejects_unknown_model_and_lengths() -> None:
    with pytest.raises(ConfigError):
        build_backend("gpt-5", "float32", "cpu")
    assert main(["bench", "--model", "tiny-llama", "--n", "5000", "--gen-tokens", "0", "--no-progress"]) == 2

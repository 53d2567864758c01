"""FRONTIER.md and the README's frontier table are what the report makes of the merged JSON they cite.

Until stop 76 the table took five presets from a run made before stop 69's stronger attacks, and nothing
noticed that its σ-recovery cells no longer matched what the harness measures. These checks keep the
documents tied to the JSON: a re-run must regenerate them (the README section "The frontier, measured" gives
the command), and an edit by hand of either fails here."""

from __future__ import annotations

import json
from pathlib import Path

from scx_ref.attacks.frontier import frontier_report, read_bench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "models" / "results"


def _frontier_md() -> str:
    return (RESULTS / "FRONTIER.md").read_text(encoding="utf-8")


def test_frontier_md_is_the_report_of_the_merged_json() -> None:
    merged = json.loads((RESULTS / "frontier_smollm2_merged.json").read_text(encoding="utf-8"))
    bench = read_bench(RESULTS / "bench_smollm2_pool_n512_s70.json")
    assert frontier_report(merged, bench, "plots_frontier") == _frontier_md()


def test_the_readme_frontier_table_is_frontier_md_s() -> None:
    """The README's block between its frontier markers opens with FRONTIER.md's sample line, verdict and
    table, word for word."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- frontier:begin -->\n", 1)[1].split("<!-- frontier:end -->", 1)[0]
    lines = _frontier_md().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("5 victim prompts"))
    end = next(i for i, line in enumerate(lines) if line.startswith("| configuration |"))
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    assert block.startswith("\n".join(lines[start:end]) + "\n")

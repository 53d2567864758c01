"""``python -m scx_models.report``: the README's results tables (markdown) from ``models/results/*.json``.

Every number in the tables is read from a results file; each file carries the ``command`` that produced
it, listed under the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_results", "main", "render"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("ppl", "generate", "sweep")
_MODEL_ORDER = {"smollm2": 0, "mixtral-random": 1, "qwen2-random": 2, "tiny-llama": 3}


def load_results(directory: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every full-model results record in ``directory`` (kinds ppl, generate, sweep; sorted by file name;
    other JSON files there are skipped), with its file name under ``_file``."""
    out = []
    for path in sorted(directory.glob("*.json")):
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and rec.get("kind") in KINDS:
            rec["_file"] = path.name
            out.append(rec)
    return out


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def _equivalence(records: list[dict[str, Any]]) -> list[str]:
    keyed: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") in ("ppl", "generate"):
            keyed.setdefault((r["model"], r["dtype"], r["level"]), {})[r["kind"]] = r
    lines = [
        "| model | dtype | level | tokens | PPL plaintext | PPL SCX | \\|ΔPPL\\|/PPL (bound) "
        "| max \\|Δlogit\\| | greedy tokens identical | result |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    order = sorted(keyed.items(), key=lambda kv: (_MODEL_ORDER.get(kv[0][0], 9), kv[0]))
    for (model, dtype, level), kinds in order:
        p, g = kinds.get("ppl"), kinds.get("generate")
        cells = [model, dtype, level]
        if p:
            cells += [
                str(p["tokens"]),
                f"{p['ppl_plain']:.6g}",
                f"{p['ppl_scx']:.6g}",
                f"{_e(p['rel_delta_ppl'])} (≤ {p['criterion_rel_delta_ppl']:.0e})",
                _e(p["max_abs_dlogit"]),
            ]
        else:
            cells += ["—"] * 5
        cells.append(f"{g['identical']}/{g['prompts']} prompts × {g['new_tokens']} tokens" if g else "—")
        ok = all(r["pass"] for r in (p, g) if r)
        cells.append("PASS" if ok else "**FAIL**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep(rec: dict[str, Any]) -> list[str]:
    dtypes = sorted({r["dtype"] for r in rec["rows"]})
    betas = sorted({r["beta"] for r in rec["rows"]})
    by = {(r["dtype"], r["beta"]): r for r in rec["rows"]}
    head = "| β | " + " | ".join(f"{d}: \\|ΔPPL\\|/PPL | {d}: max \\|Δlogit\\|" for d in dtypes) + " |"
    lines = [
        f"Level `blind` on {rec['model']} ({rec['tokens']} tokens, windows of {rec['window']}); "
        "✗ marks a run beyond the dtype's bound (float32 1e-5, float64 1e-9).",
        "",
        head,
        "|---:|" + "---:|---:|" * len(dtypes),
    ]
    for b in betas:
        cells = [f"{b:g}"]
        for d in dtypes:
            r = by.get((d, b))
            if r is None:
                cells += ["—", "—"]
            else:
                cells += [_e(r["rel_delta_ppl"]) + ("" if r["within"] else " ✗"), _e(r["max_abs_dlogit"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(records: list[dict[str, Any]]) -> str:
    """The markdown: the equivalence table, one ΔPPL-vs-β table per sweep, and the commands."""
    parts = [
        "### Exactness on full models",
        "",
        *_equivalence(records),
        "",
        "Random models (`*-random`) score byte tokens with random weights, so their perplexity is far above "
        "V; only ΔPPL is meaningful there. Level `permute`: permutations and decoys, no noise.",
        "",
    ]
    sweeps: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:  # sweeps of one model and level (one file per dtype) make one table
        if rec.get("kind") == "sweep":
            merged = sweeps.setdefault((rec["model"], rec["level"]), {**rec, "rows": []})
            merged["rows"] = merged["rows"] + [
                {**r, "tokens": rec["tokens"], "window": rec["window"]} for r in rec["rows"]
            ]
    for rec in sweeps.values():
        parts += [f"### ΔPPL against β ({rec['model']})", "", *_sweep(rec), ""]
    parts += ["Produced by:", "", "```bash"]
    parts += sorted({r["command"] for r in records if "command" in r})
    parts += ["python -m scx_models.report", "```", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables (or write them to ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m scx_models.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    text = render(load_results(a.results))
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The attack × setting table (markdown) of a harness or frontier result: one home for the table that the
privacy report (:mod:`.report`) and the frontier report (:mod:`.frontier`) both print."""

from __future__ import annotations

from typing import Any

from . import catalog

__all__ = ["METRICS", "fmt", "markdown_table"]

#: (metric key, title) of every measured quantity, in table order (from :mod:`.catalog`).
METRICS: tuple[tuple[str, str], ...] = tuple((m.key, m.title) for m in catalog.METRICS)


def fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def _cell(setting: dict[str, Any], key: str, intervals: bool) -> str:
    """A metric's cell: the pooled rate, its 95 % interval when asked (and known), and a ✓ when the
    attack is at its baseline; – when not run."""
    v = setting["metrics"].get(key)
    if v is None:
        return "–"
    r = (setting.get("rates") or {}).get(key)
    text = fmt(v)
    if intervals and r is not None:
        text += f" [{r['lo']:.2f}, {r['hi']:.2f}]"
    if (setting.get("at_baseline") or {}).get(key):
        text += " ✓"
    return text


def markdown_table(result: dict[str, Any], intervals: bool = False) -> str:
    """Attack × setting table (✓: at the frequency-prior baseline; with ``intervals`` each cell's 95 %
    Wilson interval), the baselines, the statelessness table, the noise-fitting table and search spaces."""
    sets = result["settings"]
    lines = ["| attack | " + " | ".join(s["setting"] for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for key, title in METRICS:
        vals = [s["metrics"].get(key) for s in sets]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {title} | " + " | ".join(_cell(s, key, intervals) for s in sets) + " |")
    for key, title in _BASELINES:
        cells = [(s.get("baselines") or {}).get(key) for s in sets]
        if any(c is not None for c in cells):
            shown = [
                "–"
                if c is None
                else f"{c['rate']:.2f}" + (f" [{c['lo']:.2f}, {c['hi']:.2f}]" if intervals else "")
                for c in cells
            ]
            lines.append(f"| *baseline: {title}* | " + " | ".join(shown) + " |")
    out = ["\n".join(lines)]
    st = [s for s in sets if "statelessness" in s]
    if st:
        pols = list(st[0]["statelessness"])
        rows = [
            "| server decodes with | " + " | ".join(s["setting"] for s in st) + " |",
            "|---|" + "---|" * len(st),
        ]
        for p in pols:
            rows.append(
                f"| {p} | "
                + " | ".join(
                    f"{s['statelessness'][p]['ppl']:.1f} / {s['statelessness'][p]['top1']:.2f}" for s in st
                )
                + " |"
            )
        out.append(
            "Statelessness (token PPL of the true continuation / greedy top-1 agreement):\n\n"
            + "\n".join(rows)
        )
    nf = result.get("noise_fitting") or {}
    if nf:
        modes = list(next(iter(nf.values())))
        rows = ["| β | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        rows += [f"| {b} | " + " | ".join(fmt(v[m]) for m in modes) + " |" for b, v in nf.items()]
        out.append(
            "Block-1 rows N(E[t]) + Laplace(β): top-1 token recovery (fixed vs one-time noise):\n\n"
            + "\n".join(rows)
        )
    if result.get("enumeration"):
        out.append(
            f"Order enumeration (n = {result.get('enumeration_n')}, model likelihood), exact-order rate: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in result["enumeration"].items())
        )
    if result.get("search_space"):
        out.append(
            "Search spaces: "
            + "; ".join(
                f"{r['stage']}[{r['layer']}] {r['rows']} rows → {r['bits']:.0f} bits"
                for r in result["search_space"]
            )
        )
    return "\n\n".join(out) + "\n"


_BASELINES = (
    ("prompt_pos", "prior, per position"),
    ("prompt_bag", "prior, bag"),
    ("generated", "prior, generated"),
    ("no_prompt_top1", "server without the prompt, top-1"),
)

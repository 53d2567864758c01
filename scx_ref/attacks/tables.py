"""The attack × setting table (markdown) of a harness or frontier result: one home for the table that the
privacy report (:mod:`.report`) and the frontier report (:mod:`.frontier`) both print."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from . import catalog

__all__ = ["METRICS", "check_result", "fmt", "markdown_table"]

#: (metric key, title) of every measured quantity, in table order (from :mod:`.catalog`).
METRICS: tuple[tuple[str, str], ...] = tuple((m.key, m.title) for m in catalog.METRICS)


def fmt(x: Any) -> str:
    """A table cell: – for None, else the number to two decimals (ConfigError for what is no number)."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not hasattr(x, "__float__"):
        raise ConfigError(f"a table cell must be a number or None, got {x!r}")
    return f"{float(x):.2f}"


def _number(x: Any) -> bool:
    """A finite int or float (not a bool): a measured value a table can show."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_result(result: Any, full: bool = True) -> dict[str, Any]:
    """``result`` after checking it has the shape an ``scx attack --json`` result has, so that a hand-edited
    or foreign file is refused with a ConfigError naming what is wrong, not a KeyError deep in a table:
    an object whose ``settings`` are objects with a ``setting`` name and a ``metrics`` object of finite
    numbers (or null: a NaN is a broken measurement, not a cell), whose ``rates`` and ``baselines`` (when
    present) hold ``rate``, ``lo``, ``hi`` numbers in [0, 1]; with ``full`` also the run's ``model``,
    ``n_prompts``, ``prompt_len``, ``n_new`` and each setting's ``mechanism`` and ``config`` object."""
    if not isinstance(result, dict) or not isinstance(result.get("settings"), list):
        raise ConfigError("not an `scx attack --json` result: no list of settings")
    if full:
        missing = [k for k in ("model", "n_prompts", "prompt_len", "n_new") if k not in result]
        if missing:
            raise ConfigError(f"not an `scx attack --json` result: no {', '.join(missing)}")
    for i, s in enumerate(result["settings"]):
        where = f"setting {i}"
        if not isinstance(s, dict) or not isinstance(s.get("setting"), str):
            raise ConfigError(f"{where} is not an object with a setting name")
        where = f"setting {s['setting']!r}"
        need = ("metrics", "mechanism", "config") if full else ("metrics",)
        for key in need:
            if key not in s or (key != "mechanism" and not isinstance(s[key], dict)):
                raise ConfigError(f"{where} has no {key} object")
        bad = [k for k, v in s["metrics"].items() if v is not None and not _number(v)]
        if bad:
            raise ConfigError(f"{where}: metrics {bad} are not finite numbers")
        for part in ("rates", "baselines"):
            for key, r in (s.get(part) or {}).items():
                ok = isinstance(r, dict) and all(_number(r.get(f)) for f in ("rate", "lo", "hi"))
                if not ok or not all(0.0 <= float(r[f]) <= 1.0 for f in ("rate", "lo", "hi")):
                    raise ConfigError(f"{where}: {part}[{key!r}] is not a rate with lo, hi in [0, 1]")
    return result


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
    Wilson interval), the baselines, the statelessness table, the noise-fitting table and search spaces.
    ConfigError when ``result`` is not shaped as a harness result (:func:`check_result`)."""
    sets = check_result(result, full=False)["settings"]
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

"""Which of the overhead goals a ``scx bench`` run *shows* met, shows missed, or leaves undecided.

A bench ratio is a median of a few rounds on a noisy machine, so a reading of 1.04 against a goal of
1.05 says little by itself. For every row of the given ``scx bench --json`` files this prints the ratio
of medians with its paired-bootstrap 95 % interval, the median of the rounds' paired ratios with its
distribution-free interval (:mod:`scx_ref.commands.bench_stats`; both recomputed here from the rounds the
file keeps, so files written before the bench reported them are read the same way), the goal, and the
verdict: **met** when the interval lies at or below the goal, **missed** when it lies above, **undecided**
when it holds the goal; none (``-``) for a row of fewer than 6 rounds, whose median has no 95 % interval
(the bootstrap's of 1 round is the ratio itself: it would say met or missed from one reading).

The goals are the open performance issue's (``GOALS``): prefill ≤ 1.10 at 128 tokens, ≤ 1.05 at 512 and
2048; decode ≤ 1.03 a token. Other rows are listed without a verdict, and so are the rows of a file whose
baseline is not Hugging Face (a ``random:`` model's bench runs against PlainRunner; the goals are SCX /
Hugging Face).

Run: ``python -m models.bench_intervals models/results/bench_hf_s42_1t.json [more.json …] [--paired]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scx_ref.commands.bench_stats import SEED, median_interval, ratio_interval
from scx_ref.errors import ConfigError

__all__ = ["GOALS", "hf_baseline", "judged", "main", "verdict"]

#: (phase, n) → the largest SCX / Hugging Face ratio the goal allows (decode: any prompt length, n = None)
GOALS: dict[tuple[str, int | None], float] = {
    ("prefill", 128): 1.10,
    ("prefill", 512): 1.05,
    ("prefill", 2048): 1.05,
    ("decode", None): 1.03,
}


def goal_for(phase: str, n: int) -> float | None:
    """The goal for a row, or None for a shape the goals do not name."""
    return GOALS.get((phase, None if phase == "decode" else n))


def verdict(interval: Sequence[float] | None, goal: float | None) -> str:
    """``met`` (the whole interval at or below the goal), ``missed`` (above it), ``undecided`` (it holds the
    goal), ``-`` with no goal or no interval."""
    if goal is None or interval is None:
        return "-"
    lo, hi = interval[0], interval[1]
    return "met" if hi <= goal else "missed" if lo > goal else "undecided"


def judged(row: dict[str, Any], paired: bool = False) -> Sequence[float] | None:
    """The interval a row of :func:`rows_of` is judged on: its paired median's (``paired``) or its ratio of
    medians'; None below 6 rounds, where no pair of order statistics covers a median 95 % of the time and
    the bootstrap's interval falls as short (of 1 round it is [ratio, ratio]: a verdict from one reading)."""
    if paired or row["_paired_interval"] is None:
        return row["_paired_interval"]  # type: ignore[no-any-return]
    return row["_ratio_interval"]  # type: ignore[no-any-return]


def _end(x: float, goal: float | None) -> str:
    """An interval's end to 3 decimals, or to as many more as tell it from a goal it is not equal to (1.0504
    against 1.05: ``1.0504``, not ``1.050``), so that the verdict printed beside it follows from the text."""
    for digits in range(3, 18):
        text = f"{x:.{digits}f}"
        if goal is None or x == goal or text != f"{goal:.{digits}f}":
            return text
    return repr(x)


def hf_baseline(meta: dict[str, Any]) -> bool:
    """Whether a bench file's rows are judged against the goals: its baseline is Hugging Face (or, in a file
    from before the bench named its baseline, unnamed)."""
    baseline = meta.get("baseline")
    return baseline is None or (isinstance(baseline, str) and baseline.startswith("Hugging Face"))


def rows_of(path: Path) -> list[dict[str, Any]]:
    """The file's rows, each with both intervals and the ratio of medians (``_ratio``) recomputed from its
    rounds (``scx_round_s``, ``baseline_round_s``); ConfigError (a ValueError) for no rows, or a row
    without a phase, an integer length, a level, or two equal series of finite rounds, the baseline's
    positive."""
    return _rows(json.loads(path.read_text()), path.name)


def _seconds(v: Any) -> bool:
    """Whether ``v`` is a request's seconds: a JSON number (not true/false) > 0 (finite: ratio_interval)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _rows(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    if not isinstance(data["rows"], list) or not data["rows"]:
        raise ConfigError("no rows")
    out = []
    for r in data["rows"]:
        if not isinstance(r.get("phase"), str) or not isinstance(r.get("level"), str):
            raise ConfigError("a row without a phase or a level")
        if not isinstance(r.get("n"), int) or isinstance(r["n"], bool):
            raise ConfigError(f"a row whose length n is not an integer: {r.get('n')!r}")
        scx, base = r["scx_round_s"], r["baseline_round_s"]
        for what, series in (("SCX", scx), ("baseline", base)):  # a JSON true is no time, a 0 s request none
            if not isinstance(series, list) or not all(_seconds(v) for v in series):
                raise ConfigError(f"the {what} round seconds are not a list of numbers > 0")
        interval = ratio_interval(scx, base, np.random.default_rng(SEED))  # checks the rounds first
        paired = [s / b for s, b in zip(scx, base, strict=True)]
        around = median_interval(paired)
        out.append(
            {
                **r,
                "_file": name,
                "_ratio": float(np.median(scx) / np.median(base)),
                "_ratio_interval": interval,
                "_paired": float(np.median(paired)),
                "_paired_interval": None if around is None else around[:2],
                "_coverage": None if around is None else around[2],
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print each file's rows with their intervals and verdicts, then the tally; a file that is missing,
    named twice or not a ``scx bench --json`` file with its rounds exits 2 (argparse's usage and one
    ``error:`` line)."""
    p = argparse.ArgumentParser(
        prog="python -m models.bench_intervals", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("files", nargs="+", type=Path, help="scx bench --json files")
    p.add_argument(
        "--paired",
        action="store_true",
        help="judge the goals on the median of paired round ratios (default: the ratio of medians)",
    )
    args = p.parse_args(argv)
    named: set[Path] = set()
    for path in args.files:  # one file twice (overlapping globs) would count its verdicts twice
        if path.resolve() in named:
            p.error(f"{path}: given twice (its rows would be counted twice in the verdicts)")
        named.add(path.resolve())
    tally: dict[str, int] = {}
    for path in args.files:
        if not path.is_file():
            p.error(f"{path}: no such file")
        try:
            data = json.loads(path.read_text())
            rows = _rows(data, path.name)
            command = data["meta"].get("command", "")
            goals = hf_baseline(data["meta"])
        except (KeyError, ValueError, TypeError, AttributeError, OSError) as exc:
            p.error(f"{path}: not a scx bench --json file with its rounds ({exc})")
        print(f"{path.name}: {command}")
        if not goals:
            print(f"  no verdicts: the baseline is not Hugging Face ({data['meta']['baseline']})")
        for r in rows:
            goal = goal_for(r["phase"], r["n"]) if goals else None
            lo, hi = r["_ratio_interval"]
            pi = r["_paired_interval"]
            v = verdict(judged(r, args.paired), goal)
            tally[v] = tally.get(v, 0) + 1
            paired_ci = (
                f"[{_end(pi[0], goal)}, {_end(pi[1], goal)}] ({100 * r['_coverage']:.1f} %)" if pi else "-"
            )
            print(
                f"  {r['phase']:7} {r['n']:5d} {r['level']:18} ratio {r['_ratio']:.3f} "
                f"[{_end(lo, goal)}, {_end(hi, goal)}]  paired {r['_paired']:.3f} {paired_ci}  "
                f"goal {'-' if goal is None else f'{goal:.2f}'}  {v}"
            )
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

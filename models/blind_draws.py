"""Exactness of blinded configurations against β over several key draws (DESIGN §6): for each named
configuration and β, ``--draws`` perplexity runs (:func:`scx_ref.zoo.perplexity.ppl_run`, fresh keys each,
so fresh noise), and per β the largest |ΔPPL|/PPL and max |Δlogit| and how many draws passed the dtype's
bound. One draw is one sample of the rounding that blinding adds: the limits of
:mod:`scx_ref.protocol.config` (``F32_BETA_LIMIT`` and those scaled from it) are read off the largest over
draws, not off one run.

    python -m models.blind_draws --model smollm2 --configs no-share,hardened --betas 1,2,3,5 --draws 4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scx_ref._files import result_json, write_text_whole
from scx_ref.commands._args import input_file, int_at_least, output_file
from scx_ref.errors import ConfigError
from scx_ref.protocol.config import BLIND_DTYPES, MAX_BETA, BlindDtype, SCXConfig
from scx_ref.protocol.presets import preset, preset_names
from scx_ref.zoo import MODEL_NAMES, load_model, max_positions
from scx_ref.zoo.perplexity import PPL_CRITERION, ppl_run

__all__ = ["draws_run", "main", "report_table", "summarize"]


def _config(name: str, n_layers: int, beta: float, blind_dtype: BlindDtype) -> SCXConfig:
    """The named configuration on a model of ``n_layers`` blocks, every β set to ``beta`` and its blinded
    stages in ``blind_dtype``."""
    return replace(preset(name).config(n_layers), beta=beta, stage_beta=None, blind_dtype=blind_dtype)


def draws_run(
    model: str,
    dtype: str,
    configs: list[str],
    betas: list[float],
    draws: int,
    blind_dtype: BlindDtype,
    tokens: int,
) -> list[dict[str, Any]]:
    """One record per (configuration, β, draw): |ΔPPL|/PPL, max |Δlogit| and pass over the first
    ``tokens`` corpus tokens (one window), the blinded stages in ``blind_dtype``."""
    n_layers = load_model(model, dtype)[2].config.n_layers  # cached: ppl_run loads the same
    out: list[dict[str, Any]] = []
    jobs = [(c, b, d) for c in configs for b in betas for d in range(draws)]
    for name, beta, d in tqdm(jobs, desc="blind draws", unit="run", file=sys.stderr):
        start = time.perf_counter()
        cfg = _config(name, n_layers, beta, blind_dtype)
        rec = ppl_run(model, dtype, tokens=tokens, window=tokens, config=cfg)
        out.append(
            {
                "configuration": name,
                "beta": beta,
                "draw": d,
                "rel_delta_ppl": rec["rel_delta_ppl"],
                "max_abs_dlogit": rec["max_abs_dlogit"],
                "pass": bool(rec["pass"]),
                "seconds": time.perf_counter() - start,
            }
        )
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per β (ascending), over every configuration and draw: the largest |ΔPPL|/PPL and max |Δlogit|,
    the draws that passed and the draws run."""
    rows = []
    for beta in sorted({r["beta"] for r in records}):
        at = [r for r in records if r["beta"] == beta]
        rows.append(
            {
                "beta": beta,
                "max_rel_delta_ppl": max(r["rel_delta_ppl"] for r in at),
                "max_abs_dlogit": max(r["max_abs_dlogit"] for r in at),
                "passed": sum(r["pass"] for r in at),
                "draws": len(at),
            }
        )
    return rows


def report_table(results: list[dict[str, Any]]) -> str:
    """One markdown table of several ``--json`` results: per (run dtype, blinded dtype, β) — the run kinds
    in the order first met, β rising within each — the draws within the bound over every result and
    configuration, the largest |ΔPPL|/PPL and the largest max |Δlogit| (✗ where a draw left the bound)."""
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for res in results:
        if res.get("kind") != "blind_draws":
            raise ConfigError(f"not a blind_draws result: kind {res.get('kind')!r}")
        blinded = res["dtype"] if res["blind_dtype"] == "backend" else res["blind_dtype"]
        label = f"{res['dtype']}, blinded in {blinded}" if res["dtype"] != "float64" else "float64"
        for r in res["records"]:
            groups.setdefault((label, r["beta"], res["bound"]), []).append(r)
    lines = [
        "| run | β | draws within the bound | largest \\|ΔPPL\\|/PPL | largest max \\|Δlogit\\| |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = list(dict.fromkeys(key[0] for key in groups))  # each run kind in the order first met, β rising
    for (label, beta, bound), rs in sorted(groups.items(), key=lambda kv: (labels.index(kv[0][0]), kv[0][1])):
        ok = sum(bool(r["pass"]) for r in rs)
        worst = max(r["rel_delta_ppl"] for r in rs)
        dlogit = max(r["max_abs_dlogit"] for r in rs)
        lines.append(
            f"| {label} (bound {bound:g}) | {beta:g} | {ok}/{len(rs)}{' ✗' if ok < len(rs) else ''} | "
            f"{worst:.1e} | {dlogit:.1e} |"
        )
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0.0 <= v <= MAX_BETA for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"distinct β in [0, {MAX_BETA:g}], got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    try:
        for n in names:
            preset(n)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"distinct configuration names, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints each draw and the per-β summary (markdown), writes ``--json`` if asked."""
    ap = argparse.ArgumentParser(prog="python -m models.blind_draws", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODEL_NAMES, default="smollm2", help="a registered model")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the run's dtype")
    ap.add_argument(
        "--configs",
        type=_names,
        default=["no-share", "hardened"],
        help=f"comma-separated named configurations ({', '.join(preset_names())}; default no-share,hardened)",
    )
    ap.add_argument("--betas", type=_floats, default=[1.0, 2.0, 3.0, 5.0], help="comma-separated β")
    ap.add_argument("--draws", type=int_at_least(1), default=4, help="key draws per β (default 4)")
    ap.add_argument(
        "--blind-dtype",
        choices=BLIND_DTYPES,
        default="backend",
        help="dtype of the blinded stages (default backend: the rounding of the run's own dtype measured)",
    )
    ap.add_argument("--tokens", type=int_at_least(2), default=256, help="corpus tokens, one window (256)")
    ap.add_argument("--json", type=output_file, default=None, help="write the records and summary here")
    ap.add_argument(
        "--report",
        nargs="+",
        type=input_file,
        default=None,
        help="print one table of these --json results (in the order given) and run nothing",
    )
    args = ap.parse_args(argv)
    if args.report is not None:
        print(report_table([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.report]))
        return 0
    if args.tokens > max_positions(args.model):
        ap.error(f"--tokens {args.tokens} exceeds the model's {max_positions(args.model)} positions")
    records = draws_run(
        args.model, args.dtype, args.configs, args.betas, args.draws, args.blind_dtype, args.tokens
    )
    bound = PPL_CRITERION[args.dtype]
    print(f"{args.model} {args.dtype}, blinded stages: {args.blind_dtype}; bound |ΔPPL|/PPL ≤ {bound:g}")
    print("| β | largest \\|ΔPPL\\|/PPL | largest max \\|Δlogit\\| | draws within the bound |")
    print("|---:|---:|---:|---:|")
    summary = summarize(records)
    for row in summary:
        print(
            f"| {row['beta']:g} | {row['max_rel_delta_ppl']:.1e} | {row['max_abs_dlogit']:.1e} | "
            f"{row['passed']}/{row['draws']} |"
        )
    if args.json is not None:
        res = {
            "kind": "blind_draws",
            "model": args.model,
            "dtype": args.dtype,
            "blind_dtype": args.blind_dtype,
            "tokens": args.tokens,
            "bound": bound,
            "records": records,
            "summary": summary,
            "command": shlex.join(["python", "-m", "models.blind_draws", *(argv or sys.argv[1:])]),
        }
        write_text_whole(args.json, result_json(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``scx dp``: the differential-privacy budget calculator (DESIGN §7).

Raw mode (one Laplace mechanism, composed k times)::

    scx dp --sensitivity 1 --scale 2 --compositions 100 --delta 1e-6
    scx dp --per-coordinate 0.25 --scale 5 --dim 4096          # the paper's LLaMA-2-7B setting

Model mode (a per-request budget from a model's own weights)::

    scx dp --model tiny-llama --level paper --beta 5 --guard 1 --prompt-len 32 --tokens 16

Models come from the registry :mod:`scx_ref.zoo` (:func:`~scx_ref.zoo.load_weights`, in float64 so
sensitivities are computed from the exact weights): a registered model, or ``random:<preset>[:seed]``
for seeded random weights of a preset shape.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..protocol.config import BETA_KINDS, LEVELS
from ..zoo import load_weights, weights_names_help
from .accountants import compose, pld_available
from .budget import RequestBudget, request_budget
from .mechanisms import LaplaceMechanism, metric_dp_epsilon_per_unit, per_coordinate_reading
from .permutation import bayes_guess_bound
from .sensitivity import model_sensitivities

__all__ = ["register", "run"]


def _parse_beta(text: str) -> float | dict[str, float]:
    try:
        if "=" not in text:
            return float(text)
        out: dict[str, float] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            out[key.strip()] = float(value)
        return out
    except ValueError as exc:
        raise ConfigError(f"--beta must be a number or stage=value pairs, got {text!r}") from exc


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.6g}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _raw(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    out: dict[str, Any] = {"mode": "raw"}
    text: list[str] = []
    if args.per_coordinate is not None:
        if args.sensitivity is not None:
            raise ConfigError("give --sensitivity or --per-coordinate, not both")
        if args.dim is None:
            raise ConfigError("--per-coordinate needs --dim (the row's dimension d)")
        reading = per_coordinate_reading(args.per_coordinate, args.scale, args.dim)
        out.update(reading.to_dict())
        sensitivity = reading.l1_sensitivity
        text.append(
            _table(
                ["reading", "sensitivity", "scale", "epsilon", "DP guarantee?"],
                [
                    [
                        "per-coordinate (paper: Δf/s)",
                        reading.delta_inf,
                        reading.scale,
                        reading.epsilon_per_coordinate,
                        "NO - one coordinate only",
                    ],
                    [
                        f"L1 (d·Δf/β, d={reading.dim})",
                        reading.l1_sensitivity,
                        reading.scale,
                        reading.epsilon_l1,
                        "yes (pure eps-DP)",
                    ],
                ],
            )
        )
    elif args.sensitivity is not None:
        sensitivity = args.sensitivity
    else:
        raise ConfigError("raw mode needs --sensitivity D or --per-coordinate DF --dim D (or use --model)")
    mech = LaplaceMechanism(sensitivity, args.scale, args.compositions)
    result = compose(
        [mech],
        args.delta,
        args.delta_prime,
        use_pld=not args.no_pld,
        value_discretization_interval=args.pld_interval,
    )
    out.update(
        sensitivity_l1=mech.sensitivity,
        scale=mech.scale,
        epsilon_single=mech.epsilon,
        metric_dp_epsilon_per_unit_l1=metric_dp_epsilon_per_unit(mech.scale),
        **result.to_dict(),
    )
    rows = [
        ["single release (Δ₁/β)", mech.epsilon, "0"],
        [f"basic (k={result.k})", result.epsilon_basic, "0"],
        [f"advanced DRV (k={result.k})", result.epsilon_advanced, _fmt(result.delta_prime)],
        ["best closed form", result.epsilon_best_closed_form, _fmt(result.delta_prime)],
    ]
    if result.epsilon_pld is not None:
        rows.append(
            [
                f"PLD (dp_accounting, interval {result.pld_interval:.3g})",
                result.epsilon_pld,
                _fmt(result.delta),
            ]
        )
    else:
        rows.append(["PLD", "not installed (pip install scx-ref[dp])", "-"])
    text.append(_table(["accountant", "epsilon", "delta"], rows))
    text.append(
        f"metric-DP reading: {_fmt(out['metric_dp_epsilon_per_unit_l1'])} eps per unit of L1 distance"
    )
    return out, "\n\n".join(text)


def _budget_text(b: RequestBudget, sens_dict: dict[str, Any]) -> str:
    beta = _fmt(b.beta["qkv"]) if len(set(b.beta.values())) == 1 else str(b.beta)
    head = (
        f"model {b.model}: level={b.level} guard={b.guard} prompt_len={b.prompt_len} tokens={b.tokens} "
        f"decoys={b.decoys} rows={b.rows} beta={beta}"
    )
    parts = [head]
    diam = sens_dict.get("embed_normalized_diameter")
    if diam is not None:
        parts.append(
            f"embedding L1 diameter: normalized {_fmt(diam)} (block-1 Δ₁), "
            f"raw {_fmt(sens_dict['embed_raw_diameter'])}"
        )
    if b.stages:
        parts.append(
            _table(
                ["phase", "stage", "block", "count", "Δ₁", "β", "eps each", "eps count·each"],
                [
                    [
                        s.phase,
                        s.stage,
                        s.block or "final",
                        s.count,
                        s.sensitivity,
                        s.scale,
                        s.epsilon_each,
                        s.epsilon_total,
                    ]
                    for s in b.stages
                ],
            )
        )
    rows = [
        ["basic", b.epsilon_basic, "0"],
        ["advanced DRV", b.epsilon_advanced, _fmt(b.delta_prime)],
        ["best closed form", b.epsilon_best_closed_form, _fmt(b.delta_prime)],
    ]
    if b.epsilon_pld is not None:
        rows.append(["PLD (dp_accounting)", b.epsilon_pld, _fmt(b.delta)])
    parts.append(_table(["per-request (one prompt token)", "epsilon", "delta"], rows))
    parts.append(
        f"permutation: {_fmt(b.permutation_bits_per_stage)} bits per permuted stage "
        f"({b.permuted_stages_prefill} permuted stages in the prefill)\n"
        f"token guess bound (pure eps = {_fmt(b.epsilon_basic)}): Bayes {_fmt(b.token_guess_bayes)}, "
        f"paper Lemma 2 {_fmt(b.token_guess_paper_lemma2)}"
    )
    parts.append("not covered by the DP guarantee:\n" + "\n".join(f"  - {u}" for u in b.uncovered))
    parts.append("\n".join(f"note: {n}" for n in b.notes))
    return "\n\n".join(parts)


def _model(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    weights = load_weights(args.model, np.float64)
    sens = model_sensitivities(weights, embedding=args.embedding, device=args.device)
    budget = request_budget(
        sens,
        level=args.level,
        beta=_parse_beta(args.beta),
        guard=args.guard,
        prompt_len=args.prompt_len,
        tokens=args.tokens,
        decoys=args.decoys,
        delta=args.delta,
        delta_prime=args.delta_prime,
        rows=args.rows,
        guard_ffn=args.guard_ffn,
        use_pld=not args.no_pld,
        pld_interval=args.pld_interval,
    )
    sd = sens.to_dict()
    out: dict[str, Any] = {"mode": "model", **budget.to_dict(), "sensitivities": sd}
    if sens.embed_normalized_diameter is not None:
        single = sens.embed_normalized_diameter / budget.beta["qkv"]
        out["block1_single_release"] = {
            "epsilon": single,
            "token_guess_bayes": bayes_guess_bound(single, sens.vocab_size),
        }
    return out, _budget_text(budget, sd)


def _json_ready(v: Any) -> Any:
    """Infinities (e.g. an overflowing advanced composition) become the string "inf" for strict JSON."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: _json_ready(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_ready(x) for x in v]
    return v


def run(args: argparse.Namespace) -> int:
    """Entry point of ``scx dp``: prints the table, writes ``--json`` if asked; returns the exit code."""
    out, text = _model(args) if args.model is not None else _raw(args)
    out["pld_installed"] = pld_available()
    print(text)
    if args.json is not None:
        Path(args.json).write_text(
            json.dumps(_json_ready(out), indent=2, sort_keys=True, allow_nan=False) + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


def register(subparsers: Any) -> None:
    """Add the ``dp`` subcommand to the ``scx`` parser."""
    p = subparsers.add_parser(
        "dp",
        help="differential-privacy budget calculator (Laplace mechanism, composition, per-request budget)",
        description=(
            "Differential-privacy budget of SCX's Laplace blinding (DESIGN §7). Raw mode: one Laplace "
            "mechanism (eps = Δ₁/β) composed k times with basic, advanced (Dwork–Rothblum–Vadhan) and, when "
            "dp-accounting is installed, PLD accounting. Model mode: per-request (eps, delta) for one prompt "
            "token, from the model's own weights, with a per-stage breakdown. The paper's per-coordinate "
            "reading (eps = Δf/s) is printed beside the L1 reading and is NOT a DP guarantee by itself."
        ),
        epilog=(
            "examples:\n"
            "  scx dp --sensitivity 1 --scale 2 --compositions 100 --delta 1e-6\n"
            "  scx dp --per-coordinate 0.25 --scale 5 --dim 4096\n"
            "  scx dp --model tiny-llama --level paper --beta 5 --guard 1 --prompt-len 32 --tokens 16\n"
            "  scx dp --model random:tiny-moe:3 --level blind --beta qkv=5,default=50 --json budget.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    raw = p.add_argument_group("raw mode")
    raw.add_argument("--sensitivity", type=_positive_float, help="L1 sensitivity Δ₁ of one release")
    raw.add_argument(
        "--per-coordinate",
        type=_positive_float,
        metavar="DF",
        help="the paper's per-coordinate sensitivity Δf (needs --dim); L1 sensitivity = d·Δf",
    )
    raw.add_argument("--dim", type=int, help="row dimension d for --per-coordinate")
    raw.add_argument(
        "--scale", type=_positive_float, default=5.0, help="Laplace scale β (the paper's s; default 5)"
    )
    raw.add_argument("--compositions", "-k", type=int, default=1, help="number of releases k (default 1)")
    model = p.add_argument_group("model mode")
    model.add_argument(
        "--model",
        help=f"model name: {weights_names_help()}",
    )
    model.add_argument("--level", choices=LEVELS, default="paper", help="SCX privacy level (default paper)")
    model.add_argument(
        "--beta",
        default="5",
        help=f"Laplace scale: one number, or stage=value pairs over "
        f"{', '.join(BETA_KINDS)}, default (e.g. qkv=5,default=20). Default 5",
    )
    model.add_argument("--guard", type=int, default=1, help="guard blocks g = l_s = l_e (default 1)")
    model.add_argument("--prompt-len", type=int, default=1, help="prompt length n (default 1)")
    model.add_argument("--tokens", type=int, default=0, help="generated tokens T (default 0)")
    model.add_argument("--decoys", type=int, default=0, help="decoy rows r per permuted stage (default 0)")
    model.add_argument(
        "--rows",
        choices=("own", "all"),
        default="own",
        help="count a token's own rows only (default) or every prefill row downstream of attention",
    )
    model.add_argument(
        "--guard-ffn",
        choices=("blinded", "clear"),
        default="blinded",
        help="guard blocks' FFN during generation: blinded (the protocol default; counted) or clear",
    )
    model.add_argument(
        "--embedding",
        choices=("exact", "bound"),
        default="exact",
        help="block-1 Δ₁: exact normalized-vocabulary L1 diameter (default) or the 2√d‖γ‖₂ bound",
    )
    model.add_argument("--device", default=None, help="torch device for the exact diameter (e.g. cuda)")
    acc = p.add_argument_group("accounting")
    acc.add_argument("--delta", type=_positive_float, default=1e-6, help="target δ for PLD (default 1e-6)")
    acc.add_argument(
        "--delta-prime",
        type=_positive_float,
        default=None,
        help="δ' of advanced composition (default: --delta)",
    )
    acc.add_argument("--no-pld", action="store_true", help="skip the PLD accountant")
    acc.add_argument(
        "--pld-interval",
        type=_positive_float,
        default=None,
        help="PLD value discretization interval (default: 1e-4, coarser for large eps)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=run)

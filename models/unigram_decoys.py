"""Block-1 decoys against a frequency prior (DESIGN §5.1: "block 1: embeddings of tokens drawn from a public
unigram distribution"; measured, :func:`scx_ref.attacks.decoy_detect.frequency_prior`).

Where block 1 is not noised (level ``permute``) every row of block 1's QKV message is a vocabulary row, so
the server reads each row's token; told r₁, it calls the r₁ rows whose tokens a public unigram finds least
probable decoys. Per setting of the client's calibration text — drawn uniformly from the vocabulary (the
default), or from the public unigram (``Client(unigram=...)``: add-one smoothed counts, or counts scaled by
k before the +1 so the smoothing mass is ≤ 1 %) — one client (one master secret, one pool) runs one
prefill per victim prompt (reply checks off: they change no message); the score is the fraction of its
decoys the prior finds (chance r₁ / (n + r₁)).
The public text is CPython's ``pydoc_data.topics`` (the corpus the victim prompts come from: the prior is
the attacker's best case).

    python -m models.unigram_decoys --model smollm2 --prompts 24 --length 48 --r1 2 16 [--json FILE]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from scx_ref._files import result_json, write_text_whole
from scx_ref.attacks import vocab_match
from scx_ref.attacks.decoy_detect import frequency_prior
from scx_ref.attacks.stats import FrequencyPrior
from scx_ref.backends import NumpyBackend
from scx_ref.commands._args import int_at_least, output_file
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.decoys import unigram_counts
from scx_ref.stages import Stage
from scx_ref.zoo import MODEL_NAMES, load_model
from scx_ref.zoo.corpus import corpus_text, prompts, tokenize

__all__ = ["main", "unigram_run"]


def unigram_run(model: str, n_prompts: int, length: int, r1s: list[int]) -> dict[str, Any]:
    """Per r₁ and calibration text: decoys found by the frequency prior (mean over prompts), chance, and
    how many block-1 rows matched a vocabulary row exactly (all of them, un-noised)."""
    _, tok, w = load_model(model, np.dtype("float32"))
    vocab = w.config.vocab_size
    public = tokenize(corpus_text(), tok, vocab)
    scaled = unigram_counts(public, vocab, smoothing=0.01)  # k·count + 1 with V / (k·N + V) ≤ 1 %
    k = int(scaled.max() - 1) // int(np.bincount(public).max())
    texts: list[tuple[str, Any]] = [
        ("uniform (default)", None),
        ("unigram, add-one", unigram_counts(public, vocab)),
        (f"unigram, {k}·count + 1", scaled),
    ]
    log_prior = FrequencyPrior(public, vocab).log_probs
    embed = np.asarray(w.embed, dtype=np.float64)
    victims = prompts(n_prompts, length, tok, vocab)
    backend = NumpyBackend(w, w.dtype)
    rows_out: list[dict[str, Any]] = []
    for r1 in r1s:
        cfg = SCXConfig(level="permute", r1=r1, max_length=length, verify=False)  # the messages are the same
        for name, unigram in texts:
            master = KeySchedule.generate()
            client: Client[Any] = Client(backend, master, cfg, unigram=unigram)
            found, exact = [], 0
            for ids in tqdm(victims, desc=f"r1={r1} {name}", leave=False):
                nonce = KeySchedule.new_nonce()
                link = LocalTransport(Server(backend), record_view=True)
                client.prefill(np.asarray(ids), link, nonce=nonce)
                x = link.view.select(stage=Stage.QKV, layer=0)[0].arrays["x"]
                tokens, dist = vocab_match.nearest_rows(np.asarray(x, dtype=np.float64), embed, "l2")
                exact += int(np.sum(dist == 0.0))
                truth = master.for_nonce(nonce).permutation(("tok", 0, "qkv"), length + r1) >= length
                found.append(frequency_prior(tokens, truth, log_prior))
            client.close()
            row = {
                "r1": r1,
                "calibration text": name,
                "found": float(np.mean(found)),
                "sd over prompts": float(np.std(found)),
                "chance": r1 / (length + r1),
                "decoys": r1 * len(victims),
                "exact rows": f"{exact}/{(length + r1) * len(victims)}",
            }
            rows_out.append(row)
            print(_line(row), flush=True)
    return {
        "model": model,
        "prompts": n_prompts,
        "length": length,
        "public tokens": len(public),
        "k": k,
        "rows": rows_out,
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['r1']} | {r['calibration text']} | {r['found']:.3f} (sd {r['sd over prompts']:.3f}) | "
        f"{r['chance']:.3f} | {r['decoys']} | {r['exact rows']} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints the table (markdown), writes ``--json`` if asked."""
    ap = argparse.ArgumentParser(prog="python -m models.unigram_decoys", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODEL_NAMES, default="smollm2", help="a registered model")
    ap.add_argument("--prompts", type=int_at_least(1), default=24, help="victim prompts (default 24)")
    ap.add_argument("--length", type=int_at_least(2), default=48, help="tokens per prompt (default 48)")
    ap.add_argument(
        "--r1",
        type=int_at_least(1),
        nargs="+",
        default=[2, 16],
        help="decoy rows per QKV stage (default 2 16)",
    )
    ap.add_argument("--json", type=output_file, default=None, help="write the results here")
    args = ap.parse_args(argv)
    print("| r₁ | calibration text | decoys found | chance | decoys | rows at distance 0 |")
    print("|---:|---|---:|---:|---:|---:|")
    res = unigram_run(args.model, args.prompts, args.length, args.r1)
    if args.json is not None:
        res["command"] = shlex.join(["python", "-m", "models.unigram_decoys", *(argv or sys.argv[1:])])
        write_text_whole(args.json, result_json(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

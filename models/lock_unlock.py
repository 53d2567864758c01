"""The server unlocks the last guard blocks' locked key caches with no key (DESIGN §5.1 step 6; measured,
:func:`scx_ref.attacks.statelessness.unlock_locked`): for each level and named configuration, one SCX
prefill per victim prompt (recorded view), then the server's two routes — its own QKV-stage rows RoPE'd at
each position, and the attention stage's K·P rows matched by sorted values — and the caches they rebuild
against the plaintext caches.

    python -m models.lock_unlock --model smollm2 --prompts 3 --length 48 [--dtype float32] [--json FILE]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from scx_ref._files import result_json, write_text_whole
from scx_ref.attacks.statelessness import unlock_locked
from scx_ref.backends import NumpyBackend
from scx_ref.commands._args import int_at_least, output_file
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.config import LEVELS
from scx_ref.protocol.presets import preset, preset_names
from scx_ref.reference import ReferenceModel
from scx_ref.zoo import MODEL_NAMES, load_model
from scx_ref.zoo.corpus import prompts

__all__ = ["main", "unlock_run"]


def _configs(n_layers: int, max_length: int) -> list[tuple[str, SCXConfig]]:
    """The three levels at their defaults, then every named configuration."""
    out = [(f"level {lv}", SCXConfig(level=lv, max_length=max_length)) for lv in LEVELS]
    out += [(name, replace(preset(name).build(n_layers), max_length=max_length)) for name in preset_names()]
    return out


def unlock_run(model: str, n_prompts: int, length: int, dtype: str = "float32") -> dict[str, Any]:
    """Per configuration: locked blocks, prompt rows each route placed (of all), caches rebuilt, and the
    largest relative error of a rebuilt K or V against the plaintext cache (float64 reference); the SCX
    requests run on the numpy backend in ``dtype``."""
    _, tok, w = load_model(model, np.dtype(dtype))
    _, _, w64 = load_model(model, np.float64)
    items = prompts(n_prompts, length, tok, w.config.vocab_size)
    plain = [ReferenceModel(w64).prefill(np.asarray(ids))[1] for ids in items]
    rows: list[dict[str, Any]] = []
    for name, cfg in _configs(w.config.n_layers, length):
        row: dict[str, Any] = {"configuration": name, "locked": 0, "rows": 0, "raw": 0, "attention": 0}
        row.update(rebuilt=0, max_rel_err=0.0)
        for ids, cache in zip(items, plain, strict=True):
            b = NumpyBackend(w, w.dtype)
            link = LocalTransport(Server(b), record_view=True)
            client = Client(b, KeySchedule.generate(), cfg)
            client.prefill(np.asarray(ids), link)
            client.close()
            for i, r in unlock_locked(link.view, w).items():
                row["locked"] += 1
                row["rows"] += len(ids)
                row["raw"] += r["raw"]
                row["attention"] += r["attention"]
                if r["k"] is not None:
                    row["rebuilt"] += 1
                    for got, want in ((r["k"], cache.keys[i]), (r["v"], cache.values[i])):
                        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                        row["max_rel_err"] = max(row["max_rel_err"], err)
        rows.append(row)
        print(_line(row), flush=True)
    return {"model": model, "dtype": dtype, "prompts": n_prompts, "length": length, "rows": rows}


def _line(r: dict[str, Any]) -> str:
    if not r["locked"]:
        return f"| {r['configuration']} | 0 | – | – | – | – |"
    return (
        f"| {r['configuration']} | {r['locked']} | {r['raw']}/{r['rows']} | {r['attention']}/{r['rows']} | "
        f"{r['rebuilt']}/{r['locked']} | {r['max_rel_err']:.1e} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints the table (markdown), writes ``--json`` if asked."""
    ap = argparse.ArgumentParser(prog="python -m models.lock_unlock", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODEL_NAMES, default="smollm2", help="a registered model")
    ap.add_argument("--prompts", type=int_at_least(1), default=3, help="victim prompts (default 3)")
    ap.add_argument("--length", type=int_at_least(2), default=48, help="tokens per prompt (default 48)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the SCX run's dtype")
    ap.add_argument("--json", type=output_file, default=None, help="write the results here")
    args = ap.parse_args(argv)
    print(
        "| configuration | locked blocks × prompts | rows placed, raw route | rows placed, attention route "
        "| caches rebuilt | max rel. error |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    res = unlock_run(args.model, args.prompts, args.length, args.dtype)
    if args.json is not None:
        res["command"] = shlex.join(["python", "-m", "models.lock_unlock", *(argv or sys.argv[1:])])
        write_text_whole(args.json, result_json(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

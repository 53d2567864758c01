"""Reply verification on a full model (issue 12, DESIGN §5.5): false alarms over honest runs, and which
tamperings of which replies are detected. Writes one results JSON with the command that produced it.

    python -m scx_models.security --model smollm2 --dtype float32 \
        --out models/results/security-smollm2-float32.json

* honest runs: corpus prompts × (level, β) — every check's |residual|/τ is recorded (``worst``: the largest;
  a false alarm would be an IntegrityError);
* tamperings (level ``paper``, one session each): the issue's changes of one reply of each stage — × 1.001,
  + 1e3, one NaN, an integer dtype, an extra row — detected (IntegrityError) or not (``not sent``: the
  model never sends that stage, so nothing was changed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from scx_ref._files import result_json, write_text_whole
from scx_ref.attacks.active import TamperingTransport
from scx_ref.backends import NumpyBackend
from scx_ref.commands._args import int_at_least, output_file
from scx_ref.errors import IntegrityError, SCXError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.verify import SketchCache
from scx_ref.stages import Stage
from scx_ref.zoo import MODEL_NAMES, load_model
from scx_ref.zoo.corpus import prompts
from scx_ref.zoo.engines import ENGINE_DTYPES

__all__ = ["main", "security_run"]

Change = Callable[[Any], Any]


def _changes() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    def each(f: Change) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda a: {k: f(v) for k, v in a.items()}

    def nan(v: Any) -> Any:
        out = v.clone() if hasattr(v, "clone") else v.copy()
        out.reshape(-1)[0] = float("nan")
        return out

    def integer(v: Any) -> Any:
        return v.round().long() if hasattr(v, "long") else np.rint(v).astype(np.int64)

    def extra_row(v: Any) -> Any:
        import torch

        return torch.cat([v, v[:1]]) if hasattr(v, "clone") else np.concatenate([v, v[:1]])

    return {
        "x1.001": each(lambda v: v * 1.001),
        "+1e3": each(lambda v: v + 1e3),
        "NaN": each(nan),
        "int dtype": each(integer),
        "extra row": each(extra_row),
    }


STAGES = [
    (Stage.QKV, "blinded"),
    (Stage.ATTN, "blinded"),
    (Stage.O, "blinded"),
    (Stage.FFN, "blinded"),
    (Stage.HEAD, "blinded"),
    (Stage.GEN_QKV, "blinded"),
    (Stage.GEN_ATTN, "blinded"),
    (Stage.GEN_FFN, "clear"),
    (Stage.GEN_FFN_UP, "blinded"),
    (Stage.GEN_FFN_DOWN, "blinded"),
    (Stage.GEN_LAST, "blinded"),
    (Stage.GEN_MID, "blinded"),
]


def security_run(
    model: str, dtype: str, n_prompts: int, prompt_len: int, n_new: int, progress: bool = False
) -> dict[str, Any]:
    """The honest-run margins and the tampering table of ``model`` in ``dtype``. A tampering's outcome is
    ``detected`` (IntegrityError), ``not detected``, or ``not sent`` where the stage's request never came
    (nothing was tampered with). ``progress``: a bar over the sessions on stderr."""
    _, tok, w = load_model(model, dtype)
    if dtype == "float64":
        b: Any = NumpyBackend(w)
    else:
        from scx_ref.backends.torch_backend import TorchBackend

        b = TorchBackend(w, dtype)
    keys = KeySchedule.generate()
    t0 = time.perf_counter()
    sketches = SketchCache(b, keys)
    sketches.build()
    sketch_s = time.perf_counter() - t0
    items = [np.asarray(p) for p in prompts(n_prompts, prompt_len, tok, w.config.vocab_size)]
    settings = [("permute", 5.0), ("paper", 5.0), ("blind", 5.0), ("blind", 50.0)]
    if dtype == "float64":
        settings.append(("blind", 1e4))
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(settings) * len(items) + len(STAGES) * len(_changes())
        bar = tqdm(total=total, desc=f"{model} {dtype} security", unit="session", file=sys.stderr)

    def tick() -> None:
        if bar is not None:
            bar.update()

    honest = []
    for level, beta in settings:
        worst, checks, alarms = 0.0, 0, 0
        for ids in items:
            cfg = SCXConfig(level=level, beta=beta, r1=4, r2=4)  # type: ignore[arg-type]
            client: Client[Any] = Client(b, keys.for_nonce(KeySchedule.new_nonce()), cfg, sketches=sketches)
            try:
                client.generate(ids, n_new, LocalTransport(Server(b)))
            except IntegrityError:
                alarms += 1
            tick()
            worst = max(worst, client.verify_worst)
            st = client.state
            checks += 0 if st is None or st.verifier is None else st.verifier.checks
        honest.append(
            {
                "level": level,
                "beta": beta,
                "sessions": len(items),
                "row_checks": checks,
                "worst": worst,
                "false_alarms": alarms,
            }
        )
    tampering = []
    for stage, guard_ffn in STAGES:
        for name, change in _changes().items():
            seen = {"n": 0}

            def tamper(
                req: Request, reply: Reply, stage: Stage = stage, change: Any = change, seen: Any = seen
            ) -> Reply:
                if req.stage is not stage:
                    return reply
                seen["n"] += 1
                return replace(reply, arrays=change(dict(reply.arrays))) if seen["n"] == 1 else reply

            # the paper's generation flow, so that gen_attn is sent (and its reply tampered with)
            cfg = SCXConfig(level="paper", r1=4, r2=4, guard_ffn=guard_ffn, gen_attention="server")  # type: ignore[arg-type]
            client = Client(b, keys.for_nonce(KeySchedule.new_nonce()), cfg, sketches=sketches)
            try:
                client.generate(items[0], 3, TamperingTransport(LocalTransport(Server(b)), tamper))
                # a stage this model and configuration never send (no middle blocks on a model of at most
                # r1 + r2 blocks: gen_mid) was never tampered with: neither detected nor missed
                outcome = "not detected" if seen["n"] else "not sent"
            except IntegrityError:
                outcome = "detected"
            tick()
            tampering.append({"stage": stage.value, "change": name, "outcome": outcome})
            sketches = SketchCache(b, keys) if outcome == "detected" else sketches  # a detection rotates
    if bar is not None:
        bar.close()
    return {
        "model": model,
        "dtype": dtype,
        "prompts": n_prompts,
        "prompt_len": prompt_len,
        "new_tokens": n_new,
        "sketch_seconds": sketch_s,
        "honest": honest,
        "tampering": tampering,
    }


def main(argv: list[str] | None = None) -> int:
    """Run and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m scx_models.security", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", choices=MODEL_NAMES, default="smollm2", help="registered model (default smollm2)"
    )
    p.add_argument("--dtype", choices=ENGINE_DTYPES, default="float32", help="dtype (default float32)")
    p.add_argument("--prompts", type=int_at_least(1), default=4, help="honest sessions per level (default 4)")
    p.add_argument("--prompt-len", type=int_at_least(1), default=64, help="tokens per prompt (default 64)")
    p.add_argument("--new", type=int_at_least(1), default=8, help="generated tokens per session (default 8)")
    p.add_argument("--out", type=output_file, required=True, help="results JSON to write")
    args = p.parse_args(argv)
    try:  # a value the model refuses: exit 2 with its message
        rec = security_run(args.model, args.dtype, args.prompts, args.prompt_len, args.new, progress=True)
    except SCXError as exc:
        p.error(str(exc))
    rec["command"] = shlex.join(
        ["python", "-m", "scx_models.security", *(sys.argv[1:] if argv is None else argv)]
    )
    write_text_whole(args.out, result_json(rec, indent=1) + "\n")
    for h in rec["honest"]:
        print(
            f"{h['level']:8} β={h['beta']:<8g} sessions {h['sessions']}  checks {h['row_checks']:7d}  "
            f"worst {h['worst']:.4f}  false alarms {h['false_alarms']}"
        )
    for t in rec["tampering"]:
        print(f"{t['stage']:13} {t['change']:10} {t['outcome']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

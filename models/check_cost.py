"""What the reply checks' compiled verdicts cost a verified prefill's client, measured two ways at once.

The client checks each reply (DESIGN §5.5) through four fused CPU kernels that return a verdict and change
nothing: ``freivalds_excess`` (the W_qkv, W_o and LM-head products), ``gate_up_excess`` (the MLP),
``attention_check`` and ``attention_excess`` (attention). Their cost can be read by timing their calls (what
``models.split_time --kernels`` does for every kernel) or by removing them: this script alternates three arms
over the same requests —

- ``checked``: the kernels as loaded;
- ``passed``: those four kernels replaced by ones that read nothing and return a passing verdict (every other
  kernel and all of the client's Python as in ``checked``; against an honest server the logits are the same);
- ``timed``: the kernels as loaded, each call timed (numba's dispatch included).

``checked`` − ``passed`` (paired per round) is what the verdicts cost the request, cache effects and threads
included; ``timed``'s sum is what the timers see. The two agree when the timers see the whole cost. (At stop
60 py-spy put 76 % of the client's samples on lines that call fused kernels, where the timers gave 40–50 %.)

Run: ``python -m models.check_cost --model smollm2 --n 128 --threads 2 [--rounds 21]``. Keys are derived
before each request (untimed). A benchmark: it asserts nothing; it needs the fused kernels (numba, and
``SCX_NUMBA`` not ``0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .timing_args import timing_parser

#: the session's ``max_length`` (or the model's positions, if fewer): the longest prompt timed
MAX_LENGTH = 4096

#: the kernels that return a reply check's verdict, and the verdict each returns when the check passes
VERDICTS: dict[str, Any] = {
    "freivalds_excess": 0.0,
    "gate_up_excess": (0.0, 0.0),
    "attention_check": (0.0, 0.0),
    "attention_excess": 0.0,
}


def passing(verdict: Any) -> Callable[..., Any]:
    """A kernel that reads nothing and returns ``verdict`` (a passing check's)."""

    def kernel(*_args: Any) -> Any:
        return verdict

    return kernel


def quartiles(ms: list[float]) -> str:
    """``q1 / median / q3`` of ``ms`` (milliseconds), two decimals."""
    q1, q2, q3 = np.percentile(np.asarray(ms), [25, 50, 75])
    return f"{q1:.2f} / {q2:.2f} / {q3:.2f}"


def measure(model: str, n: int, threads: int, rounds: int) -> dict[str, list[float]]:
    """Per round (after one warm-up of each arm), in milliseconds: the client's own time in each arm
    (``checked``, ``passed``, ``timed``), the server's in ``checked`` and ``passed``, and the timed kernels'
    sum (``timers``); arms in alternating order. SystemExit when the fused kernels are not in use."""
    import torch

    from scx_ref.backends import cpu_kernels
    from scx_ref.commands.bench import build_models
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig, Server
    from scx_ref.timing import timed_kernels, timed_prefill, timed_server

    loaded = cpu_kernels.kernels()
    if loaded is None:
        raise SystemExit("models.check_cost: the fused CPU kernels are not in use (no numba, or SCX_NUMBA=0)")
    torch.set_num_threads(threads)
    backend, _, _ = build_models(model, "float32", "cpu")
    cfg = SCXConfig(level="permute", max_length=min(backend.config.max_positions, MAX_LENGTH), verify=True)
    client = Client(backend, KeySchedule.generate(), cfg)
    ids = np.random.default_rng(0).integers(0, backend.config.vocab_size, size=n)
    served, in_server = timed_server(Server)
    passed: dict[str, Any] = {k: passing(v) for k, v in VERDICTS.items()}
    arms: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
        "checked": lambda: cpu_kernels.replaced(loaded),
        "passed": lambda: cpu_kernels.replaced(dataclasses.replace(loaded, **passed)),
        "timed": lambda: timed_kernels(names=VERDICTS),
    }
    out: dict[str, list[float]] = {k: [] for k in ("checked", "passed", "timed", "timers")}
    out.update({"server checked": [], "server passed": []})
    with torch.inference_mode():
        for r in range(rounds + 1):
            order = list(arms.items()) if r % 2 else list(reversed(arms.items()))
            for name, arm in order:
                with arm() as spent:
                    server_s, own_s = timed_prefill(client, served, backend, ids, in_server)
                if r == 0:
                    continue  # the warm-up round
                out[name].append(1e3 * own_s)
                if name == "timed":
                    out["timers"].append(1e3 * spent[0])
                else:
                    out[f"server {name}"].append(1e3 * server_s)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = timing_parser(
        "models.check_cost",
        __doc__,
        rounds=21,
        model_help="a registered model or random:<preset>[:seed]",
        max_n=MAX_LENGTH,
    )
    a = p.parse_args(argv)
    t = measure(a.model, a.n, a.threads, a.rounds)
    med = statistics.median
    cost = [c - s for c, s in zip(t["checked"], t["passed"], strict=True)]
    print(f"{a.model} n={a.n} threads={a.threads}, {a.rounds} rounds (ms, medians; q1 / median / q3):")
    arms = ", ".join(f"{k} {med(t[k]):.2f}" for k in ("checked", "passed", "timed"))
    print(f"  client: {arms}")
    print(f"  the verdicts' cost, checked - passed (paired): {quartiles(cost)}")
    print(f"  the verdicts' timers (timed arm):              {quartiles(t['timers'])}")
    print(f"  server: checked {med(t['server checked']):.1f}, passed {med(t['server passed']):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

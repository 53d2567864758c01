"""Where an SCX prefill's time goes: the server's ``handle`` against the client's own work, and each against
Hugging Face's forward on the same tensors, in alternating rounds of one process.

``scx bench`` gives SCX / Hugging Face; on a shared machine that ratio moves by ±0.2 from run to run, more
than a change to the client does. Timing ``Server.handle`` inside the prefill splits each SCX request into the
server's part and the client's (the rest), so a change to either side shows in its own number. For an A/B of
two checkouts, run this module from each checkout's own directory (``cd <checkout> && python -m
models.split_time …``: ``python -m`` puts the working directory first on ``sys.path``, so its ``scx_ref`` is
the one imported — ``PYTHONPATH`` alone does not override it), alternating the two; the first line printed
names the ``scx_ref`` that ran.

Run: ``python -m models.split_time --n 512 --threads 2 [--no-verify] [--rounds 7] [--model llama1b-random]
[--kernels]``. It prints the medians (seconds), the ratios and SCX's time less Hugging Face's; a benchmark, it
asserts nothing. On ``--model smollm2-depth-random`` (SmolLM2's 30 blocks at tiny widths, arithmetic
negligible) that difference is the fixed per-request cost. ``--kernels`` splits the client's time further:
its calls of the fused CPU kernels (:func:`scx_ref.timing.timed_kernels`, dispatch included; the server's
calls are the server's) and the rest — the protocol's Python, torch's and numpy's small operations.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import numpy as np

from scx_ref.timing import around, timed_kernels, timed_prefill, timed_server

from .timing_args import timing_parser

#: the session's ``max_length`` (or the model's positions, if fewer): the longest prompt timed
MAX_LENGTH = 4096


def flagged(server_cls: type[Any], busy: list[bool]) -> type[Any]:
    """A subclass of ``server_cls`` whose ``handle`` sets ``busy[0]`` while it runs (so that a kernel timer
    can leave the server's calls out); replies, errors and state changes are the original's."""

    def raise_flag() -> None:
        busy[0] = True

    def lower_flag(_: object) -> None:
        busy[0] = False

    return around(server_cls, "handle", raise_flag, lower_flag, f"Flagged{server_cls.__name__}")


def split_prefill(
    model: str,
    n: int,
    threads: int,
    verify: bool,
    rounds: int,
    level: str = "permute",
    *,
    kernels: bool = False,
) -> dict[str, float]:
    """Median seconds of Hugging Face's forward (``hf``), of the server's ``handle`` calls within one SCX
    prefill (``server``) and of the rest of that prefill (``client``), over ``rounds`` alternating rounds
    after one warm-up; keys are derived ahead (``Client.precompute``) and not timed. With ``kernels`` also
    the client's seconds in the fused CPU kernels (``kernels``) and in the rest of its work (``rest``),
    medians of the same rounds (0 and the whole client where the kernels are not in use)."""
    import torch

    from scx_ref.commands.bench import build_models
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig, Server

    torch.set_num_threads(threads)
    backend, hf_model, _used = build_models(model, "float32", "cpu")
    if hf_model is None:
        raise SystemExit(f"{model}: no Hugging Face model to compare with")
    cfg = SCXConfig(level=level, max_length=min(backend.config.max_positions, MAX_LENGTH), verify=verify)  # type: ignore[arg-type]
    client = Client(backend, KeySchedule.generate(), cfg)
    ids = np.random.default_rng(0).integers(0, backend.config.vocab_size, size=n)
    tid = torch.from_numpy(ids)[None]
    TimedServer, in_server = timed_server(Server)
    busy = [False]
    served = flagged(TimedServer, busy) if kernels else TimedServer
    timer = timed_kernels(lambda: busy[0]) if kernels else contextlib.nullcontext([0.0])

    def scx(in_kernels: list[float]) -> tuple[float, float]:
        in_kernels[0] = 0.0
        return timed_prefill(client, served, backend, ids, in_server)

    def hf() -> float:
        t0 = time.perf_counter()
        hf_model(tid, use_cache=True).logits[0].float().numpy()
        return time.perf_counter() - t0

    server, own, base, kern = [], [], [], []
    with torch.inference_mode(), timer as in_kernels:
        scx(in_kernels)
        hf()
        for r in range(rounds):
            if r % 2:
                base.append(hf())
            s, c = scx(in_kernels)
            server.append(s)
            own.append(c)
            kern.append(in_kernels[0])
            if not r % 2:
                base.append(hf())
    med = statistics.median
    out = {"hf": med(base), "server": med(server), "client": med(own)}
    if kernels:
        out["kernels"] = med(kern)
        out["rest"] = med([c - k for c, k in zip(own, kern, strict=True)])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = timing_parser("models.split_time", __doc__, rounds=7, max_n=MAX_LENGTH, hf=True)
    p.add_argument("--no-verify", action="store_true", help="reply verification off")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="split the client's time into its fused kernels' calls and the rest",
    )
    a = p.parse_args(argv)
    import scx_ref

    print(f"scx_ref from {scx_ref.__file__}")
    t = split_prefill(a.model, a.n, a.threads, not a.no_verify, a.rounds, kernels=a.kernels)
    hf, server, client = t["hf"], t["server"], t["client"]
    print(
        f"{a.model} n={a.n} threads={a.threads} verify={not a.no_verify}: "
        f"hf {hf:.3f} s, server {server:.3f} s, client {client:.3f} s; "
        f"server/hf {server / hf:.3f}, client/hf {client / hf:.3f}, "
        f"(server + client)/hf {(server + client) / hf:.3f}; "
        f"SCX − hf {1e3 * (server + client - hf):.1f} ms"
    )
    if a.kernels:
        print(
            f"client: fused kernels {1e3 * t['kernels']:.1f} ms, the rest {1e3 * t['rest']:.1f} ms (medians)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

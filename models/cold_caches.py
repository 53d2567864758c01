"""What cold caches cost the client: its own work per SCX prefill with and without a pass over memory at the
end of every server ``handle``, in alternating rounds of one process.

In a real request each server stage streams its weights through the caches (SmolLM2: about 14 MB a block,
113 MB for the LM head), so the client's next steps — Python, torch's and numpy's dispatch, the verifier's
vectors — run on caches the server has just filled with weights. ``--model smollm2-depth-random`` has
SmolLM2's 30 blocks at tiny widths, so nothing evicts the client's working set there; writing
``--evict-mb`` MiB at the end of each ``handle`` (inside the server's timed part, so it does not count as
the client's) puts back what the real weights do. The difference between the two client medians is the
client's cost of cold caches at that eviction, the rest of its work unchanged.

Run: ``python -m models.cold_caches --model smollm2-depth-random --n 8 --threads 1 --evict-mb 64
[--no-verify] [--rounds 15]``. It prints the client's median and quartiles (ms) for each; a benchmark, it
asserts nothing.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from scx_ref.commands._args import int_at_least
from scx_ref.timing import around, timed_prefill, timed_server

from .timing_args import timing_parser

#: the session's ``max_length`` (or the model's positions, if fewer): the longest prompt timed
MAX_LENGTH = 4096


def evicting(server_cls: type[Any], mib: int) -> type[Any]:
    """A subclass of ``server_cls`` whose ``handle`` writes over ``mib`` MiB of its own memory after each
    reply is computed (one float32 pass: as if the stage had streamed that much weight). Replies, errors
    and state changes are the original's."""
    import torch

    buf = torch.ones(max(1, mib) * (1 << 18))  # 2¹⁸ float32 = 1 MiB

    def evict(_: object) -> None:
        buf.mul_(1.0)

    return around(server_cls, "handle", lambda: None, evict, f"Evicting{server_cls.__name__}")


def client_times(
    model: str, n: int, threads: int, verify: bool, rounds: int, mib: int
) -> dict[str, list[float]]:
    """The client's own seconds per prefill (the request less its server ``handle`` calls) over ``rounds``
    rounds after one warm-up, each round one prefill on a plain server (``plain``) and one on a server
    that evicts ``mib`` MiB after each reply (``evicted``), their order alternating; keys derived ahead,
    untimed."""
    import torch

    from scx_ref.commands.bench import build_models
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig, Server

    if mib < 1 or rounds < 1:
        raise SystemExit("--evict-mb and --rounds must be at least 1")
    torch.set_num_threads(threads)
    backend, _hf, _used = build_models(model, "float32", "cpu")
    cfg = SCXConfig(level="permute", max_length=min(backend.config.max_positions, MAX_LENGTH), verify=verify)
    client = Client(backend, KeySchedule.generate(), cfg)
    ids = np.random.default_rng(0).integers(0, backend.config.vocab_size, size=n)
    plain, in_plain = timed_server(Server)
    hot, in_hot = timed_server(evicting(Server, mib))
    out: dict[str, list[float]] = {"plain": [], "evicted": []}
    with torch.inference_mode():
        timed_prefill(client, plain, backend, ids, in_plain)
        timed_prefill(client, hot, backend, ids, in_hot)
        for r in range(rounds):
            order = (("plain", plain, in_plain), ("evicted", hot, in_hot))
            for name, cls, spent in order if r % 2 == 0 else order[::-1]:
                out[name].append(timed_prefill(client, cls, backend, ids, spent)[1])
    return out


def _summary(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0], xs[0], xs[0]]
    return f"{1e3 * statistics.median(xs):.1f} ms [q1 {1e3 * q[0]:.1f}, q3 {1e3 * q[2]:.1f}]"


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = timing_parser(
        "models.cold_caches",
        __doc__,
        rounds=15,
        model_help="a registered model or random:<preset>[:seed]",
        max_n=MAX_LENGTH,
    )
    p.add_argument(
        "--evict-mb", type=int_at_least(1), default=64, help="MiB written after each server reply, >= 1 (64)"
    )
    p.add_argument("--no-verify", action="store_true", help="reply verification off")
    a = p.parse_args(argv)
    import scx_ref

    print(f"scx_ref from {scx_ref.__file__}")
    t = client_times(a.model, a.n, a.threads, not a.no_verify, a.rounds, a.evict_mb)
    diff = statistics.median(t["evicted"]) - statistics.median(t["plain"])
    print(
        f"{a.model} n={a.n} threads={a.threads} verify={not a.no_verify}: client {_summary(t['plain'])}; "
        f"with {a.evict_mb} MiB evicted after each reply {_summary(t['evicted'])}; "
        f"cold caches cost the client {1e3 * diff:.1f} ms a request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The client's time per SCX prefill (or per generated token), this checkout's ``scx_ref`` against another
checkout's, in one process.

``scx bench`` and :mod:`models.split_time` compare SCX with Hugging Face; across two checkouts they must run
in two processes, minutes apart, on a machine whose speed drifts by more than a change to the client. This
module loads the other checkout's ``scx_ref`` too — copied to a temporary directory as the package
``scx_ref_other`` (the package imports itself only by relative imports, so the copy is self-contained) — and
times both on the same weights in alternating rounds, each round's order reversed from the last, each side
with its own checkout's server. The client's time is a prefill's wall time minus the server's ``handle``
calls within it. With ``--tokens T`` each round times T greedy generation steps after an untimed prefill
instead, per token (key sharing included, as ``scx bench`` counts it). Keys are derived ahead and not timed.
For each verification setting it prints both medians and the median of the per-round differences (this
checkout − the other) with its quartiles — a paired difference, steadier than either median — for the
client's time, (verified) the time inside its value checks (``Client._verify``) alone, the server's
``handle`` calls, and their sum (the request's wall time). The copy's numba kernels compile afresh in each
run (its disk cache lives in the copy), inside the untimed warm-up round.

Run: ``python -m models.client_ab --other ../old-checkout [--n 512] [--tokens 0] [--threads 1] [--rounds 9]
[--verify both|on|off] [--model smollm2]``. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from scx_ref.commands._args import int_at_least
from scx_ref.timing import timed, timed_server

from .timing_args import timing_parser

OTHER = "scx_ref_other"
#: the sessions' ``max_length`` (or the model's positions, if fewer): prompt and generated tokens together
MAX_LENGTH = 4096


def checkout(text: str) -> Path:
    """A type for ``--other``: a directory holding an ``scx_ref`` package (checked before any model loads)."""
    path = Path(text)
    if not (path / "scx_ref" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a checkout: it has no scx_ref package")
    return path


checkout.__name__ = "checkout"


def load_other(checkout: Path, into: Path) -> ModuleType:
    """The ``scx_ref`` package of ``checkout`` imported as :data:`OTHER` (copied under ``into``)."""
    src = checkout / "scx_ref"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"{checkout} has no scx_ref package")
    shutil.copytree(src, into / OTHER, ignore=shutil.ignore_patterns("__pycache__"))
    for name in [m for m in sys.modules if m == OTHER or m.startswith(OTHER + ".")]:
        del sys.modules[name]  # a copy loaded by an earlier call (its directory is gone)
    sys.path.insert(0, str(into))
    importlib.invalidate_caches()
    return importlib.import_module(OTHER)


@dataclass
class _Side:
    """One package's client on the shared weights, with its server class timed into ``in_server`` and its
    reply checks (``Client._verify``, the value checks of a verified session) into ``in_verify``."""

    proto: Any
    keys: Any
    backend: Any
    client: Any
    server_cls: Any
    in_server: list[float]
    in_verify: list[float]


def _side(pkg: str, hf_model: Any, verify: bool, max_length: int) -> _Side:
    """A client of package ``pkg`` (``scx_ref`` or :data:`OTHER`) at level ``permute``."""
    hf = importlib.import_module(f"{pkg}.hf")
    keys = importlib.import_module(f"{pkg}.keys")
    proto = importlib.import_module(f"{pkg}.protocol")
    backend = hf.backend_from_hf(hf_model, dtype="float32")
    server_cls, in_server = timed_server(proto.Server)
    cfg = proto.SCXConfig(level="permute", max_length=max_length, verify=verify)
    client_cls, in_verify = timed(proto.Client, "_verify")  # the value checks of a verified session
    client = client_cls(backend, keys.KeySchedule.generate(), cfg)
    return _Side(proto, keys, backend, client, server_cls, in_server, in_verify)


def client_times(
    other: Path, model: str, n: int, threads: int, rounds: int, verify: list[bool], tokens: int = 0
) -> dict[tuple[str, bool], list[tuple[float, float, float]]]:
    """Per round, (client seconds, server seconds, seconds in the client's value checks) of one
    prefill of ``n`` tokens — or, with ``tokens``, per generated token over that many steps after it — for
    each side ("this", "other") and verification setting, after one warm-up round."""
    import torch

    from scx_ref.commands.bench import build_models

    torch.set_num_threads(threads)
    first, hf_model, _used = build_models(model, "float32", "cpu")
    if hf_model is None:
        raise SystemExit(f"{model}: no Hugging Face model to build both backends from")
    max_length = min(first.config.max_positions, MAX_LENGTH)
    if n + tokens > max_length:
        raise SystemExit(f"{n} + {tokens} positions exceed the model's {max_length}")
    ids = np.random.default_rng(0).integers(0, first.config.vocab_size, size=n)
    del first
    with tempfile.TemporaryDirectory() as tmp:
        load_other(other, Path(tmp))
        sides: dict[tuple[str, bool], _Side] = {}
        for label, pkg in (("this", "scx_ref"), ("other", OTHER)):
            for v in verify:
                sides[(label, v)] = _side(pkg, hf_model, v, max_length)
        out: dict[tuple[str, bool], list[tuple[float, float, float]]] = {k: [] for k in sides}
        order = list(sides)
        with torch.inference_mode():
            for r in range(rounds + 1):
                for key in order if r % 2 else reversed(order):
                    side = sides[key]
                    nonce = side.keys.KeySchedule.new_nonce()
                    side.client.precompute(n, steps=tokens, nonce=nonce)
                    link = side.proto.LocalTransport(side.server_cls(side.backend))
                    side.in_server[0] = side.in_verify[0] = 0.0
                    t0 = time.perf_counter()
                    logits = side.client.prefill(ids, link, nonce=nonce)
                    wall = time.perf_counter() - t0
                    if tokens:
                        tok = int(np.argmax(logits[-1]))
                        side.in_server[0] = side.in_verify[0] = 0.0
                        t0 = time.perf_counter()
                        for _ in range(tokens):
                            tok = int(np.argmax(side.client.decode(tok, link)))
                        wall = (time.perf_counter() - t0) / tokens
                        side.in_server[0] /= tokens
                        side.in_verify[0] /= tokens
                    if r:
                        out[key].append((wall - side.in_server[0], side.in_server[0], side.in_verify[0]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    # at least 4 rounds: the quartiles of the paired differences
    p = timing_parser("models.client_ab", __doc__, rounds=9, min_rounds=4, max_n=MAX_LENGTH, hf=True)
    p.add_argument("--other", type=checkout, required=True, help="the other checkout's root (holds scx_ref/)")
    p.add_argument(
        "--tokens",
        type=int_at_least(0),
        default=0,
        help="time this many generation steps per round, per token, >= 0 (0: the prefill)",
    )
    p.add_argument(
        "--verify", choices=["both", "on", "off"], default="both", help="reply verification (both)"
    )
    a = p.parse_args(argv)
    if a.n + a.tokens > MAX_LENGTH:
        p.error(f"--n {a.n} + --tokens {a.tokens} positions exceed the sessions' max_length {MAX_LENGTH}")
    verify = {"both": [True, False], "on": [True], "off": [False]}[a.verify]
    times = client_times(a.other.resolve(), a.model, a.n, a.threads, a.rounds, verify, a.tokens)
    med = statistics.median
    unit = "ms per token" if a.tokens else "ms"
    for v in verify:
        this, other = times[("this", v)], times[("other", v)]
        head = f"{a.model} n={a.n}{f' tokens={a.tokens}' if a.tokens else ''} threads={a.threads} verify={v}"
        parts = []
        names = [("client", 0), ("checks", 2), ("server", 1), ("total", 3)]
        for what, i in names if v else [nm for nm in names if nm[0] != "checks"]:
            mine = [t[i] if i < 3 else t[0] + t[1] for t in this]
            theirs = [o[i] if i < 3 else o[0] + o[1] for o in other]
            diff = [1e3 * (t - o) for t, o in zip(mine, theirs, strict=True)]
            q1, _, q3 = statistics.quantiles(diff, n=4)
            parts.append(
                f"{what} {unit} this {1e3 * med(mine):.2f}, other {1e3 * med(theirs):.2f}, "
                f"this − other per round {med(diff):+.2f} (q1 {q1:+.2f}, q3 {q3:+.2f})"
            )
        print(f"{head}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

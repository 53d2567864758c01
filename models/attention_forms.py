"""One generation step's attention through the torch backend, timed against the form it replaced (stop 50).

A generation step's query row sees every key of its cache: the server's middle blocks and the client's first
guard block compute it with ``TorchBackend.attention(q, k, v, positions, None)``. Since stop 50 that call
runs, with several query heads per KV head on CPU, as ``_grouped_attention``: one
``scaled_dot_product_attention`` over the KV heads with each head's g query heads as g query rows. Before,
it was one call with ``enable_gqa`` over the H query heads, in which torch's CPU flash kernel reads each KV
head's cache once per query head. This module times both through ``attention`` itself (its checks
included; the earlier form patched in for ``_grouped_attention``) on the model's head counts, one query
row, for a few cache lengths. K and V are strided views of a cache buffer with spare rows, as in a
request, one cache per block of the model taken in turn, so that one call's cache is not left in the
caches for the next. Calls alternate, each pair's order reversed from the last. It prints each form's
median microseconds, their ratio (earlier / now) and the largest difference of their outputs. A
benchmark: it asserts nothing.

Run: ``python -m models.attention_forms --model llama1b-random --threads 2 [--keys 16,128,513,2049,4097]
[--calls 400]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from scx_ref.commands._args import int_at_least, int_list

from .timing_args import model_name


def enable_gqa_form(self: Any, q: Any, k: Any, v: Any) -> Any:
    """The call ``TorchBackend.attention`` made before stop 50 where every query sees every key: its one
    batched ``scaled_dot_product_attention`` with ``enable_gqa`` (``_batched_attention``, no mask)."""
    return self._batched_attention(q, k, v, None, False)


def time_forms(backend: Any, keys: int, calls: int) -> tuple[list[float], list[float], float]:
    """Seconds per call of ``backend.attention`` for one query row over ``keys`` keys as it is (``now``)
    and with :func:`enable_gqa_form` in place of its grouped form (``before``), alternating, after 20
    untimed pairs; and the largest difference of the two outputs."""
    import torch

    c = backend.config
    gen = torch.Generator().manual_seed(keys)
    caches = [torch.randn(keys + 64, 2, c.n_kv_heads, c.head_dim, generator=gen) for _ in range(c.n_layers)]
    kv = [(buf[:keys, 0], buf[:keys, 1]) for buf in caches]
    q = torch.randn(1, c.n_heads + 3, c.head_dim, generator=gen)[:, : c.n_heads]  # a view, as in a step
    pos = np.array([keys - 1])
    grouped = backend._grouped_attention
    before_form = types.MethodType(enable_gqa_form, backend)

    def now(i: int) -> Any:
        return backend.attention(q, *kv[i % len(kv)], pos, None)

    def before(i: int) -> Any:
        backend._grouped_attention = before_form
        try:
            return backend.attention(q, *kv[i % len(kv)], pos, None)
        finally:
            backend._grouped_attention = grouped

    diff = float((now(0) - before(0)).abs().max())
    times: dict[str, list[float]] = {"now": [], "before": []}
    forms: list[tuple[str, Callable[[int], Any]]] = [("now", now), ("before", before)]
    with torch.inference_mode():
        for i in range(20):
            now(i)
            before(i)
        for i in range(calls):
            for name, f in forms if i % 2 else forms[::-1]:
                t0 = time.perf_counter()
                f(i)
                times[name].append(time.perf_counter() - t0)
    return times["now"], times["before"], diff


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = argparse.ArgumentParser(prog="python -m models.attention_forms", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=model_name,
        default="smollm2",
        help="a registered model or random:<preset>[:seed] (its head counts and blocks)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads, >= 1 (1)")
    p.add_argument(
        "--keys",
        type=int_list(1),
        default="16,128,513,2049,4097",
        help="comma-separated cache lengths, each >= 1",
    )
    p.add_argument(
        "--calls", type=int_at_least(1), default=400, help="timed calls of each form per length, >= 1 (400)"
    )
    a = p.parse_args(argv)
    lengths: list[int] = a.keys
    import torch

    from scx_ref.commands.bench import build_models

    torch.set_num_threads(a.threads)
    backend, _, _ = build_models(a.model, "float32", "cpu")
    c = backend.config
    heads = f"{c.n_heads} query heads on {c.n_kv_heads} KV heads"
    print(f"{a.model}: {heads}, {a.threads} thread(s), {a.calls} calls")
    for keys in lengths:
        now, before, diff = time_forms(backend, keys, a.calls)
        m_now, m_before = statistics.median(now), statistics.median(before)
        print(
            f"keys {keys:5d}: now {m_now * 1e6:8.1f} us  enable_gqa {m_before * 1e6:8.1f} us  "
            f"enable_gqa/now {m_before / m_now:5.2f}  max |difference| {diff:.1e}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

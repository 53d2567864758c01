"""The server's projection products in other forms than the torch backend's ``dense``, timed against it.

SCX's server computes every projection of a prompt as ``dense`` (``scx_ref.backends.torch_backend``): one
``F.linear`` with the weight stored out × in — Hugging Face's layout — or, for wide outputs on some CPUs,
one GEMM per block of 1 024 output columns. This module times, for one model's projection shapes and a few
row counts, the forms a faster server could take instead:

* ``in_out``: the weight stored in × out (contiguous) and ``torch.mm`` (MKL's other transposition);
* ``mkl_packed``: MKL's packed weights (``torch.ops.mkl._mkl_linear``), packed for exactly that row count —
  torch uses the packed form only for the row count it was packed for, and the pack is ~3× the weight;
* ``onednn``: oneDNN's reordered weights (``torch.ops.mkldnn._linear_pointwise``), any row count;
* ``unpadded``: ``dense`` on the rows as given, where ``dense`` itself pads 8–15 rows to 16 for large
  weights (``GEMM_PAD_MIN_ROWS``): the padding's gain is this form's ratio above 1.

Each form runs on its own random weights of the model's shapes (as many distinct matrices as the model has
layers, so the caches hold none of them from one product to the next, as in a request), alternating with
``dense`` round by round. It prints, per shape and row count, ``dense``'s median milliseconds and each
form's median ratio to it over the rounds (with the smallest and largest), and whether its product equals
``dense``'s bit for bit. A benchmark: it asserts nothing.

Run: ``python -m models.gemm_forms --model smollm2 --threads 2 --rows 1,130,514 [--rounds 7]
[--forms unpadded]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from scx_ref.backends.base import WeightName, out_width
from scx_ref.commands._args import int_at_least, int_list

from .timing_args import model_name

FORMS = ("in_out", "mkl_packed", "onednn", "unpadded")


def shapes(model: str) -> dict[WeightName, tuple[int, int, int]]:
    """(out, in, count) of each dense projection of ``model`` (``out_width``'s names and widths): its fused
    QKV, O, fused gate/up and down maps (one matrix per block) and its LM head (one)."""
    from scx_ref.commands.bench import build_models

    backend, _, _ = build_models(model, "float32", "cpu")
    c = backend.config
    inputs: dict[WeightName, int] = {
        "wqkv": c.hidden_size,
        "wo": c.q_dim,
        "w_gate_up": c.hidden_size,
        "w_down": c.intermediate_size,
        "lm_head": c.hidden_size,
    }
    return {w: (out_width(c, w), width, 1 if w == "lm_head" else c.n_layers) for w, width in inputs.items()}


def form(name: str, weights: list[Any], rows: int) -> Callable[[Any], list[Any]] | None:
    """The products x·Wᵀ over ``weights`` (out × in) in form ``name``, or None where torch lacks it."""
    import torch

    if name == "in_out":
        wts = [w.t().contiguous() for w in weights]
        return lambda x: [torch.mm(x, wt) for wt in wts]
    if name == "mkl_packed":
        if not hasattr(torch.ops.mkl, "_mkl_linear"):
            return None
        packs = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        return lambda x: [
            torch.ops.mkl._mkl_linear(x, p, w, None, rows) for p, w in zip(packs, weights, strict=True)
        ]
    if name == "onednn":
        if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return None
        reordered = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        return lambda x: [torch.ops.mkldnn._linear_pointwise(x, r, None, "none", [], "") for r in reordered]
    if name == "unpadded":
        from scx_ref.backends.torch_backend import _dense

        return lambda x: [_dense(x, w, None, pooled=False) for w in weights]
    raise ValueError(f"unknown form {name!r}")


def _ms(run: Callable[[], Any], repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - t0) / repeat * 1e3


def time_forms(
    weights: list[Any], x: Any, rounds: int, forms: tuple[str, ...] = FORMS
) -> tuple[list[float], dict[str, tuple[list[float], bool]]]:
    """``dense``'s milliseconds per round over ``weights`` on rows ``x``, and per available form its ratios
    to ``dense`` round by round and whether its first product equals ``dense``'s bit for bit."""
    import torch

    from scx_ref.backends.torch_backend import dense

    rows = int(x.shape[0])
    runs: dict[str, Callable[[], Any]] = {"dense": lambda: [dense(x, w) for w in weights]}
    equal: dict[str, bool] = {}
    for name in forms:
        f = form(name, weights, rows)
        if f is not None:
            runs[name] = functools.partial(f, x)
            equal[name] = bool(torch.equal(f(x)[0], dense(x, weights[0])))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():
        run()  # warm-up
    # each timing about 0.25 s of dense's products (at least one run)
    repeat = max(1, round(0.25e3 / _ms(runs["dense"], 1)))
    for r in range(rounds):
        for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[k].append(_ms(runs[k], repeat))
    base = times.pop("dense")
    return base, {k: ([t / d for t, d in zip(v, base, strict=True)], equal[k]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the module's command line (its docstring) on ``argv`` and print the tables; the exit status."""
    p = argparse.ArgumentParser(prog="python -m models.gemm_forms", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=model_name,
        default="smollm2",
        help="a registered model or random:<preset>[:seed] (its projection shapes)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads, >= 1 (1)")
    p.add_argument(
        "--rows",
        type=int_list(1),
        default="1,130,514",
        help="comma-separated row counts, each >= 1 (1,130,514)",
    )
    p.add_argument("--rounds", type=int_at_least(1), default=7, help="alternating rounds, >= 1 (7)")
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated forms ({','.join(FORMS)})")
    a = p.parse_args(argv)
    forms = tuple(f.strip() for f in a.forms.split(",") if f.strip())
    if not forms or not set(forms) <= set(FORMS):
        p.error(f"--forms: choose from {', '.join(FORMS)}")
    import torch

    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(
        f"{a.model}, {a.threads} thread(s), {a.rounds} rounds: form / dense, median [min, max]; ≠: not equal"
    )
    with torch.inference_mode():
        for what, (out, inp, count) in shapes(a.model).items():
            weights = [torch.randn(out, inp, generator=gen) for _ in range(count)]
            for rows in a.rows:
                base, got = time_forms(weights, torch.randn(rows, inp, generator=gen), a.rounds, forms)
                cells = "  ".join(
                    f"{k} {statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]{'' if eq else ' ≠'}"
                    for k, (v, eq) in got.items()
                )
                head = f"{what} {out}×{inp} ×{count}, rows {rows}"
                print(f"{head:34s} dense {statistics.median(base):8.2f} ms  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

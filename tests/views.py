"""Comparing two recorded server views of one request made under the same keys by two routes (keys derived
ahead or on demand, a mask pool's entry or none), and a view's noised releases with the DP budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from scx_ref.dp import model_sensitivities, request_budget
from scx_ref.protocol import SCXConfig, ServerView
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.plan import Release, ReleasePlan

#: How far two arrays of the same message may differ, relative to the larger of 1 and their largest
#: entry. The routes send the same η, but a mask pool's (or a longer precomputation's) η·W is a product
#: of more rows, which BLAS may round differently row by row: OpenBLAS's Haswell kernel on an AMD EPYC
#: (Zen 2) gives 1.8e-15 on a 16 × 48 float64 product of 12 rows against the same 9 rows alone.
#: Unblinding carries that rounding into the messages that follow; a wrong mask, row or permutation
#: moves them by far more.
ROUNDING = 1e-12


def assert_same_view(a: ServerView, b: ServerView, *, rounding: bool = False) -> None:
    """The same messages in the same order: stage, layer, step, metadata, array names, shapes and dtypes
    equal, and every array byte-identical. ``rounding`` (η·W of one route a product of more rows): the first
    message's arrays byte-identical (no T5 correction has been applied yet), every later array within
    :data:`ROUNDING` of the other."""
    assert len(a.messages) == len(b.messages)
    first = True
    for ma, mb in zip(a.messages, b.messages, strict=True):
        assert (ma.stage, ma.layer, ma.step, ma.meta) == (mb.stage, mb.layer, mb.step, mb.meta)
        assert ma.arrays.keys() == mb.arrays.keys()
        for key in ma.arrays:
            x, y = np.asarray(ma.arrays[key]), np.asarray(mb.arrays[key])
            assert x.shape == y.shape and x.dtype == y.dtype, (ma.stage, ma.layer, key)
            if first or not rounding:
                assert np.array_equal(x, y), (ma.stage, ma.layer, key)
            elif x.size:
                scale = max(1.0, float(np.max(np.abs(y))))
                assert float(np.max(np.abs(x - y))) <= ROUNDING * scale, (ma.stage, ma.layer, key)
        first = first and not ma.arrays


def assert_budget_counts(
    weights: Any, cfg: SCXConfig, plan: ReleasePlan, noised: Iterable[Release], prompt_len: int, tokens: int
) -> None:
    """The DP budget of ``cfg`` (``rows="own"``: one release per prefill release and decode step) composes
    exactly the Laplace releases a session sent (``noised``: those its recorded view shows), less those
    whose noise key sharing reveals (``plan.shared``)."""
    budget = request_budget(
        model_sensitivities(weights, embedding="bound"),
        cfg,
        prompt_len=prompt_len,
        tokens=tokens,
        use_pld=False,
    )
    counted = [r for r in noised if r.is_laplace_mechanism and r not in plan.shared]
    assert sum(s.count for s in budget.stages) == len(counted)


def planned_noise(
    a: Any, b: Any, name: str, plans: tuple[ReleasePlan, ReleasePlan], keys: RequestKeys
) -> tuple[Release, int | None]:
    """The release (and expert) of array ``name`` of two recordings ``a``, ``b`` of one noised message, sent
    under the same keys at β and at β/2 (``plans``): the message is in both plans, and the arrays differ by
    exactly their noises' difference (the rest of the message is the same in both runs)."""
    experts = a.meta.get("experts")
    expert = None if experts is None else int(experts[0])
    ra, rb = plans[0].find(a.stage, a.layer, expert), plans[1].find(b.stage, b.layer, expert)
    assert ra is not None and rb is not None, f"noised message not in the plan: {a.stage} {a.layer}"
    xa, xb = a.arrays[name], b.arrays[name]
    step = None if a.step < 0 else a.step
    rows, width = xa.shape
    want = keys.noise(ra, step, rows, width) - keys.noise(rb, step, rows, width)
    scale = 1.0 + float(np.abs(xa).max(initial=0.0))
    np.testing.assert_allclose(xa - xb, want, rtol=1e-9, atol=1e-9 * scale)
    return ra, expert

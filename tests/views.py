"""Comparing two recorded server views of one request made under the same keys by two routes (keys derived
ahead or on demand, a mask pool's entry or none), a view's noised and clear messages with the release plan,
and its noised releases with the DP budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from scx_ref.dp import model_sensitivities, request_budget
from scx_ref.protocol import SCXConfig, ServerView, Stage
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


#: The exposure a clear message falls under when its own stage has none: a blinded MLP is several messages,
#: and where its first one is clear the server derives the rest from it (the plan names the first).
EXPOSED_AS = {
    Stage.FFN_DOWN: Stage.FFN,
    Stage.ROUTER: Stage.FFN,
    Stage.GEN_FFN_DOWN: Stage.GEN_FFN_UP,
    Stage.GEN_ROUTER: Stage.GEN_FFN_UP,
}

#: A noised message's place: stage, block, step (−1 at prefill) and expert (None: not an expert's message).
Key = tuple[Stage, int, int, int | None]


def observed_releases(
    a: ServerView,
    b: ServerView,
    plans: tuple[ReleasePlan, ReleasePlan],
    keys: RequestKeys,
    cfg: SCXConfig,
    n_layers: int,
) -> tuple[dict[Key, Release], set[tuple[Stage, int]]]:
    """Two recordings ``a``, ``b`` of one session run under the same keys at β and at β/2 (``plans``): the
    noised messages, each checked against the plan's noise (:func:`planned_noise`), by key; and the
    (stage, block) of every clear message, by its own stage — control messages aside, a key-sharing message
    as the exposure of its block's cache, a clear gen_mid message as one of every middle block. An array
    that differs between the runs by more than rounding is noised (η(β/2) = η(β)/2 exactly; everything
    else the client sends is the same up to rounding)."""
    noised: dict[Key, Release] = {}
    clear: set[tuple[Stage, int]] = set()
    assert len(a.messages) == len(b.messages)
    for ma, mb in zip(a.messages, b.messages, strict=True):
        assert (ma.stage, ma.layer, ma.step) == (mb.stage, mb.layer, mb.step)
        if ma.stage in (Stage.OPEN, Stage.CLOSE):
            continue
        if ma.stage is Stage.SHARE:  # the keys reveal the block's prompt cache: an exposure (its perm and
            clear.add((Stage.SHARE, ma.layer))  # alpha are keys, checked against the plan by the callers)
            continue
        for name in sorted(ma.arrays):  # every array of every other message: q, k, v included
            xa, xb = ma.arrays[name], mb.arrays[name]
            scale = 1.0 + float(np.abs(xa).max(initial=0.0))
            if np.abs(xa - xb).max(initial=0.0) <= 1e-9 * scale:
                if ma.stage is Stage.GEN_MID:  # one message runs every middle block
                    clear |= {(Stage.GEN_MID, m) for m in cfg.blocks(n_layers)[1]}
                else:
                    clear.add((ma.stage, ma.layer))
                continue  # not noised: the runs agree to rounding
            release, expert = planned_noise(ma, mb, name, plans, keys)
            noised[(ma.stage, ma.layer, ma.step, expert)] = release
    return noised, clear


def planned_releases(plan: ReleasePlan, steps: int) -> set[Key]:
    """The keys of the noised messages ``plan`` says a session of ``steps`` decode steps sends."""
    out: set[Key] = {(r.stage, r.block, -1, r.expert) for r in plan.prefill}
    for t in range(steps):
        out |= {(r.stage, r.block, t, r.expert) for r in plan.generation}
    return out


def assert_sent_as_planned(
    noised: dict[Key, Release],
    clear: set[tuple[Stage, int]],
    plan: ReleasePlan,
    cfg: SCXConfig,
    n_layers: int,
    steps: int,
) -> None:
    """What :func:`observed_releases` saw is what ``plan`` says: the noised messages exactly its releases,
    every clear message under one of its exposures (its own stage's, or :data:`EXPOSED_AS`'s) and every
    exposure witnessed by a clear message. The paper's last-block offset rows are noised (by a scalar) yet
    listed as exposures: not a Laplace mechanism on the row."""
    planned = planned_releases(plan, steps)
    assert set(noised) == planned, (
        f"sent noised, not planned: {sorted(map(str, set(noised) - planned))}; "
        f"planned, not sent noised: {sorted(map(str, planned - set(noised)))}"
    )
    exposed = {(e.stage, b) for e in plan.exposures for b in e.blocks}
    if cfg.last_ffn == "paper":
        exposed -= {(Stage.GEN_FFN, b) for b in cfg.blocks(n_layers)[2]}
    uncovered = {(s, b) for s, b in clear if (s, b) not in exposed and (EXPOSED_AS.get(s), b) not in exposed}
    assert not uncovered, f"clear messages outside the plan's exposures: {sorted(map(str, uncovered))}"
    witnessed = clear | {(EXPOSED_AS[s], b) for s, b in clear if s in EXPOSED_AS}
    assert exposed <= witnessed, f"exposures with no clear message: {sorted(map(str, exposed - witnessed))}"

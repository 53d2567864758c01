"""The release plan is what the protocol does: the noised messages the server sees are exactly the plan's
releases — no more, no fewer — and the DP budget composes exactly those releases.

How a noised message is recognised without trusting the client's own bookkeeping: the same request is run
twice with the same keys and prompt, at β and at β/2. Laplace noise is drawn by inverse CDF from the key
stream, so η(β/2) = η(β)/2 exactly, while everything else the client sends is the same up to rounding
(every blinded stage is unblinded exactly). A message array that differs between the two runs by more than
rounding is noised; its difference must equal η(β) − η(β/2) drawn under the plan's key label, which also
pins the label and the β of each release.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.dp import model_sensitivities, request_budget
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server, ServerView, Stage
from scx_ref.protocol.config import LEVELS
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.plan import Release, ReleasePlan
from scx_ref.stages import Phase
from scx_ref.weights import ModelWeights, random_weights
from tests.views import Key, assert_budget_counts, assert_sent_as_planned, observed_releases

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))
IDS = np.array([5, 17, 42, 8, 33, 2, 9])
N_NEW = 3  # 2 decode steps
BETA = 4.0


def _model(moe: bool) -> ModelWeights:
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        n_experts=4 if moe else 0,
        top_k=2 if moe else 0,
        qkv_bias=not moe,
        max_positions=64,
    )
    return random_weights(cfg, np.random.default_rng(3))


def _view(weights: ModelWeights, cfg: SCXConfig) -> tuple[ServerView, list[int]]:
    backend = NumpyBackend(weights)
    link = LocalTransport(Server(backend), record_view=True)
    tokens = Client(backend, KeySchedule(MASTER, NONCE), cfg).generate(IDS, N_NEW, link)
    return link.view, tokens


def _observed(
    weights: ModelWeights, cfg: SCXConfig
) -> tuple[dict[Key, Release], set[tuple[Stage, int]], ServerView]:
    """The noised messages of a run at ``cfg`` (each checked against the plan's noise) by key, the clear
    messages' (stage, block) and the run's view (:func:`tests.views.observed_releases`)."""
    half = dataclasses.replace(cfg, beta=cfg.beta / 2)
    view_a, tokens_a = _view(weights, cfg)
    view_b, tokens_b = _view(weights, half)
    assert tokens_a == tokens_b  # both runs are exact, so they generate the same tokens
    plans = ReleasePlan.of(cfg, weights.config), ReleasePlan.of(half, weights.config)
    keys = RequestKeys(KeySchedule(MASTER, NONCE), weights.config)
    seen, clear = observed_releases(view_a, view_b, plans, keys, cfg, weights.config.n_layers)
    return seen, clear, view_a


CASES = [
    pytest.param(level, moe, g, guard_ffn, id=f"{level}-{'moe' if moe else 'dense'}-g{g}-{guard_ffn}")
    for level in LEVELS
    for moe in (False, True)
    for g in (1, 2)
    for guard_ffn in ("blinded", "clear")
]


#: The hardened options (DESIGN §5.7): client attention, no key sharing (l_s = 3 of 4 blocks) and W_o / LM
#: head on the server, one-time blinded — alone and together.
HARDENED = [
    pytest.param(level, moe, options, id=f"{level}-{'moe' if moe else 'dense'}-{name}")
    for level in LEVELS
    for moe in (False, True)
    for name, options in (
        ("client-attn", {"attention": "client"}),
        ("gen-linear", {"gen_linear": "server"}),
        ("no-share", {"l_s": 3}),
        ("hardened", {"attention": "client", "gen_linear": "server", "l_s": 3}),
    )
]


def _check_plan(weights: ModelWeights, cfg: SCXConfig) -> tuple[ReleasePlan, dict[Key, Release], ServerView]:
    """The noised messages are exactly the plan's releases, and the clear ones exactly its exposures."""
    plan = ReleasePlan.of(cfg, weights.config)
    seen, clear, view = _observed(weights, cfg)
    assert_sent_as_planned(seen, clear, plan, cfg, weights.config.n_layers, N_NEW - 1)
    return plan, seen, view


@pytest.mark.parametrize(("level", "moe", "options"), HARDENED)
def test_hardened_options_send_exactly_the_plan(level: Any, moe: bool, options: dict[str, Any]) -> None:
    weights = _model(moe)
    cfg = SCXConfig(level=level, beta=BETA, r1=2, r2=3, max_length=64, **options)
    plan, seen, _ = _check_plan(weights, cfg)
    if level != "permute" and options.get("gen_linear") == "server":
        assert any(k[0] is Stage.GEN_HEAD for k in seen) and any(k[0] is Stage.GEN_O for k in seen)
    if level == "blind" and len(options) == 3:  # the hardened configuration: nothing in the clear
        assert plan.exposures == ()
    budget = request_budget(
        model_sensitivities(weights, embedding="bound"), cfg, prompt_len=len(IDS), tokens=N_NEW, use_pld=False
    )
    counted = [r for r in seen.values() if r.is_laplace_mechanism and r not in plan.shared]
    assert sum(s.count for s in budget.stages) == len(counted)


@pytest.mark.parametrize(("level", "moe", "g", "guard_ffn"), CASES)
def test_noised_messages_are_exactly_the_plan(level: Any, moe: bool, g: int, guard_ffn: Any) -> None:
    weights = _model(moe)
    cfg = SCXConfig(level=level, beta=BETA, r1=2, r2=3, l_s=g, l_e=g, guard_ffn=guard_ffn, max_length=64)
    plan, seen, view = _check_plan(weights, cfg)
    # the noise uploaded at key sharing is exactly the plan's shared releases' noise
    keys = RequestKeys(KeySchedule(MASTER, NONCE), weights.config)
    shares = {m.layer: m for m in view.select(stage=Stage.SHARE)}
    assert {r.block for r in plan.shared} == {i for i, m in shares.items() if "alpha" in m.arrays}
    for r in plan.shared:
        alpha = shares[r.block].arrays["alpha"]
        np.testing.assert_array_equal(alpha, keys.noise(r, None, *alpha.shape))
    assert_budget_counts(weights, cfg, plan, seen.values(), len(IDS), N_NEW)  # the same releases


def test_paper_offset_form_is_in_the_plan() -> None:
    """``last_ffn="paper"`` sends the last guard blocks' FFN input with the paper's scalar offset: the view
    shows it noised at every step, and the plan lists it (not as a Laplace mechanism on the row)."""
    weights = _model(False)
    cfg = SCXConfig(level="paper", beta=BETA, last_ffn="paper", max_length=64)
    plan, _, _ = _check_plan(weights, cfg)
    offsets = [r for r in plan.generation if r.kind == "offset"]
    assert offsets and not any(r.is_laplace_mechanism for r in offsets)


def test_detection_has_teeth() -> None:
    """Control: a plan that forgets a release the client still noises is caught, and so is a plan that
    lists a release the client never sends; likewise for an exposure."""
    weights = _model(False)
    cfg = SCXConfig(level="blind", beta=BETA, max_length=64)
    plan = ReleasePlan.of(cfg, weights.config)
    seen, clear, _ = _observed(weights, cfg)
    assert_sent_as_planned(seen, clear, plan, cfg, weights.config.n_layers, N_NEW - 1)
    dropped = dataclasses.replace(plan, generation=plan.generation[1:])
    with pytest.raises(AssertionError, match="sent noised, not planned"):
        assert_sent_as_planned(seen, clear, dropped, cfg, weights.config.n_layers, N_NEW - 1)
    ghost = Release(Phase.GENERATE, Stage.GEN_MID, 1, "qkv", BETA)  # the middle blocks are never noised
    extra = dataclasses.replace(plan, generation=(*plan.generation, ghost))
    with pytest.raises(AssertionError, match="planned, not sent noised"):
        assert_sent_as_planned(seen, clear, extra, cfg, weights.config.n_layers, N_NEW - 1)
    # and the exposures: a clear message no exposure covers, and an exposure no clear message witnesses
    stray = clear | {(Stage.GEN_HEAD, weights.config.n_layers)}  # no exposure at blind is a step's LM head
    with pytest.raises(AssertionError, match="clear messages outside the plan's exposures"):
        assert_sent_as_planned(seen, stray, plan, cfg, weights.config.n_layers, N_NEW - 1)
    unseen = clear - {(Stage.ATTN, 0)}  # the attention stage is clear at blind: its exposure loses a witness
    with pytest.raises(AssertionError, match="exposures with no clear message"):
        assert_sent_as_planned(seen, unseen, plan, cfg, weights.config.n_layers, N_NEW - 1)

"""Tests that kill mutants of :mod:`scx_ref.dp.budget` that survived ``python -m mutation.run dp_budget``
(``mutation/annotations.toml`` names each).

The selected tests compared the budget's ε with an independent composition and read its JSON, but read few
refusals whole, never called :func:`config_for_budget` with its defaults or with a per-kind β mapping that
names every kind, never read which block a release is shown under (the LM head's is 0), the text of the
releases key sharing reveals, the notes, or a sensitivity note that the budget lists as uncovered."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.dp.accountants import pld_available
from scx_ref.dp.budget import StageRelease, _sensitivity, config_for_budget, request_budget
from scx_ref.dp.permutation import permutation_bits, prompt_order_bits
from scx_ref.dp.sensitivity import ModelSensitivities, model_sensitivities
from scx_ref.errors import ConfigError, NonFiniteError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Server
from scx_ref.protocol.config import BETA_KINDS, SCXConfig
from scx_ref.protocol.plan import Release
from scx_ref.stages import Phase, Stage

from .refusals import Refusal, refusal_test
from .tiny import tiny_weights

SENS = model_sensitivities(tiny_weights(0, n_layers=3))
KINDS = "('qkv', 'o', 'gate_up', 'down', 'router', 'lm_head')"

REFUSALS: list[Refusal] = [
    ("guard-zero", lambda: config_for_budget(guard=0), ConfigError, "guard must be >= 1, got 0"),
    ("decoys-negative", lambda: config_for_budget(decoys=-1), ConfigError, "decoys must be >= 0, got -1"),
    ("beta-zero", lambda: config_for_budget(beta=0), ConfigError, "beta must be > 0, got 0"),
    (
        "beta-default-zero",
        lambda: config_for_budget(beta={"default": 0}),
        ConfigError,
        "beta[default] must be > 0, got 0",
    ),
    (
        "beta-kinds-missing",
        lambda: config_for_budget(beta={"qkv": 1, "down": 2}),
        ConfigError,
        "beta gives no scale for ['o', 'gate_up', 'router', 'lm_head'] (add them or a 'default')",
    ),
    (
        "beta-unknown-kind",
        lambda: config_for_budget(beta={"qkv": 1, "default": 2, "bogus": 3, 4: 5}),
        ConfigError,
        f"unknown stage(s) in beta: 'bogus', 4; kinds are {KINDS} (+ 'default')",
    ),
    (
        "level-unknown",
        lambda: config_for_budget(level="x"),  # type: ignore[arg-type]
        ConfigError,
        "level must be one of ('permute', 'paper', 'blind'), got 'x'",
    ),
    (
        "prompt-len-zero",
        lambda: request_budget(SENS, prompt_len=0),
        ConfigError,
        "prompt_len must be >= 1, got 0",
    ),
    ("tokens-negative", lambda: request_budget(SENS, tokens=-1), ConfigError, "tokens must be >= 0, got -1"),
    (
        "delta-prime-past-one",
        lambda: request_budget(SENS, delta_prime=2.0),
        ConfigError,
        "delta_prime must lie in the open interval (0, 1), got 2.0",
    ),
    (
        "model-not-sensitivities",
        lambda: request_budget("x"),  # type: ignore[arg-type]
        ConfigError,
        "model must be ModelWeights or ModelSensitivities, got str",
    ),
    (
        "config-not-scxconfig",
        lambda: request_budget(SENS, config="x"),  # type: ignore[arg-type]
        ConfigError,
        "config must be an SCXConfig, got str",
    ),
    (
        "guard-ffn-unknown",
        lambda: request_budget(SENS, guard_ffn="x"),  # type: ignore[arg-type]
        ConfigError,
        "guard_ffn must be 'blinded' or 'clear', got 'x'",
    ),
    (
        "rows-unknown",
        lambda: request_budget(SENS, rows="x"),  # type: ignore[arg-type]
        ConfigError,
        "rows must be 'own' or 'all', got 'x'",
    ),
    (
        "release-not-laplace",
        lambda: _sensitivity(SENS, Release(Phase.GENERATE, Stage.GEN_FFN, 2, "offset", 1.0)),
        ConfigError,
        "release kind 'offset' is not a Laplace mechanism on its input",
    ),
]

test_each_refusal_has_its_message = refusal_test(REFUSALS)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: config_for_budget(guard=1.5), "guard"),  # type: ignore[arg-type]
        (lambda: config_for_budget(decoys=0.5), "decoys"),  # type: ignore[arg-type]
        (lambda: request_budget(SENS, prompt_len=1.5), "prompt_len"),  # type: ignore[arg-type]
        (lambda: request_budget(SENS, tokens=0.5), "tokens"),  # type: ignore[arg-type]
    ],
    ids=["guard", "decoys", "prompt_len", "tokens"],
)
def test_a_count_that_is_not_an_integer_is_named(call: object, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    assert str(info.value).startswith(f"{name} must be an integer, got float ")


def test_config_for_budget_defaults_are_the_paper_level_at_the_papers_beta() -> None:
    assert config_for_budget() == SCXConfig(
        level="paper", beta=5.0, l_s=1, l_e=1, r1=0, r2=0, guard_ffn="blinded"
    )


@pytest.mark.parametrize("mapping", [False, True], ids=["one-beta", "beta-per-kind"])
def test_config_for_budget_sets_every_option(mapping: bool) -> None:
    beta = {k: 1.0 + i for i, k in enumerate(BETA_KINDS)} if mapping else 3.0
    cfg = config_for_budget("blind", beta, guard=2, decoys=3, guard_ffn="clear")
    assert (cfg.level, cfg.l_s, cfg.l_e, cfg.r1, cfg.r2, cfg.guard_ffn) == ("blind", 2, 2, 3, 3, "clear")
    if mapping:  # every kind named, no default: the base β is qkv's
        assert cfg.beta == 1.0 and cfg.stage_beta == beta
        assert {k: cfg.beta_for(k) for k in BETA_KINDS} == beta
    else:
        assert cfg.beta == 3.0 and cfg.stage_beta is None


def test_request_budget_defaults_are_one_prompt_token_and_no_generation() -> None:
    b = request_budget(SENS)
    assert (b.prompt_len, b.tokens, b.level, b.guard, b.decoys, b.rows) == (1, 0, "paper", 1, 0, "own")
    assert b.delta == b.delta_prime == 1e-6
    assert b.notes == (
        "the releases are the protocol's release plan (scx_ref.protocol.plan) for this configuration",
        "neighbouring prompts differ in one token; per-token composition over the stages, blocks and "
        "decode steps that touch that token (rows='own'); T generated tokens = T - 1 decode steps",
        "epsilon_basic is pure (delta = 0); epsilon_advanced at delta_prime; epsilon_pld at delta",
    )


def test_the_lm_head_release_is_shown_as_block_0_and_the_others_one_based() -> None:
    b = request_budget(SENS, level="blind")
    blocks = {(s.stage, s.block) for s in b.stages}
    assert ("head", 0) in blocks and ("qkv", 1) in blocks and ("qkv", 3) in blocks
    assert all(s.block > 0 for s in b.stages if s.kind != "lm_head")
    head = next(s for s in b.stages if s.kind == "lm_head")
    assert head.sensitivity == SENS.lm_head


def test_key_sharing_names_the_middle_blocks_it_reveals() -> None:
    cfg = config_for_budget("blind", guard=1)
    sens = model_sensitivities(tiny_weights(0, n_layers=5))
    b = request_budget(sens, cfg, tokens=2)
    assert b.uncovered[-1] == (
        "prefill QKV rows of middle blocks 2, 3, 4: their noise is uploaded at key sharing (DESIGN §5.2), "
        "so the server holds those rows exactly"
    )


def test_a_sensitivity_note_of_what_is_not_covered_is_listed_uncovered() -> None:
    note = "the router's choices are not covered by these bounds"
    sens = dataclasses.replace(SENS, notes=(*SENS.notes, note))
    assert isinstance(sens, ModelSensitivities)
    b = request_budget(sens, level="blind")
    assert note in b.uncovered and SENS.notes[0] not in b.uncovered
    assert note not in request_budget(SENS, level="blind").uncovered


@pytest.mark.skipif(not pld_available(), reason="dp_accounting is not installed")
def test_the_pld_interval_reaches_the_accountant() -> None:
    fine = request_budget(SENS, level="blind", pld_interval=1e-4)
    coarse = request_budget(SENS, level="blind", pld_interval=1.0)
    assert fine.epsilon_pld is not None and coarse.epsilon_pld is not None
    assert coarse.epsilon_pld > fine.epsilon_pld  # a coarser discretization is more pessimistic


@pytest.mark.parametrize("use_pld", [True, False], ids=["pld", "no-pld"])
def test_no_release_gives_infinite_epsilons_and_pld_as_with_releases(use_pld: bool) -> None:
    b = request_budget(SENS, level="permute", use_pld=use_pld)
    assert b.stages == () and b.composition is None
    assert b.epsilon_basic == b.epsilon_advanced == b.epsilon_best == math.inf
    assert b.epsilon_pld == (math.inf if use_pld and pld_available() else None)
    assert b.to_dict()["composition"] is None


def test_to_dict_carries_the_composition() -> None:
    b = request_budget(SENS, level="blind", use_pld=False)
    assert b.composition is not None
    out = b.to_dict()
    assert out["composition"] == b.composition.to_dict()
    assert out["composition"]["epsilon_basic"] == b.epsilon_basic


def test_a_release_groups_mechanism_is_named_by_phase_stage_and_block() -> None:
    s = StageRelease("prefill", "qkv", "qkv", 2, 3, 1.5, 2.0, 0.75)
    m = s.mechanism()
    assert (m.name, m.sensitivity, m.scale, m.count) == ("prefill:qkv:2", 1.5, 2.0, 3)


def test_a_delta_that_is_not_finite_is_refused() -> None:
    with pytest.raises((ConfigError, NonFiniteError)):
        request_budget(SENS, delta_prime=math.nan)


def test_every_field_of_a_budget_with_decoys_and_generation() -> None:
    b = request_budget(SENS, level="blind", beta=1e4, prompt_len=4, tokens=3, decoys=2, rows="all")
    assert (b.model, b.level, b.prompt_len, b.tokens, b.decoys, b.rows) == (
        SENS.name,
        "blind",
        4,
        3,
        2,
        "all",
    )
    assert b.composition is not None
    assert b.epsilon_best_closed_form == b.composition.epsilon_best_closed_form
    assert b.permutation_bits_per_stage == permutation_bits(4, 2) == pytest.approx(math.log2(720), rel=1e-12)
    assert (
        b.prompt_order_bits_per_stage
        == prompt_order_bits(4, 2)
        == pytest.approx(math.log2(720 / 2), rel=1e-12)
    )
    # a finite pure ε: the guessing bounds are the formulas' values, below 1
    eps, v = b.epsilon_basic, SENS.vocab_size
    assert math.isfinite(eps) and eps < 1.0
    assert b.token_guess_bayes == pytest.approx(1.0 / (1.0 + (v - 1) * math.exp(-eps)), rel=1e-12)
    assert (
        b.token_guess_paper_lemma2 == pytest.approx(math.exp(eps) / v, rel=1e-12)
        and b.token_guess_paper_lemma2 < 1
    )


def test_without_a_release_the_guessing_bounds_are_one() -> None:
    b = request_budget(SENS, level="permute")
    assert b.token_guess_bayes == 1.0 and b.token_guess_paper_lemma2 == 1.0


@pytest.mark.parametrize(
    ("level", "diameter", "noted"),
    [("paper", None, True), ("permute", None, False), ("paper", "computed", False)],
    ids=["bound-used", "nothing-noised", "exact-diameter"],
)
def test_the_block1_bound_note_only_when_the_bound_is_used(
    level: str, diameter: str | None, noted: bool
) -> None:
    sens = SENS if diameter else dataclasses.replace(SENS, embed_normalized_diameter=None)
    assert SENS.embed_normalized_diameter is not None
    note = "block-1 QKV uses the bound 2*sqrt(d)*||gamma||_2 (exact embedding diameter not computed)"
    b = request_budget(sens, level=level)  # type: ignore[arg-type]
    assert (note in b.notes) is noted
    assert len(b.notes) == 3 + noted


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("level", ["permute", "paper", "blind"])
def test_permuted_stages_are_qkv_o_ffn_of_every_block_and_the_head(level: str, moe: bool) -> None:
    """The count of the prefill's token-permuted stages: each block's QKV, O and FFN messages and the LM
    head's, as a real prefill sends them (a blinded MLP's later messages travel under its FFN stage's
    permutation, as do an MoE layer's router and experts)."""
    weights = tiny_weights(0, moe=moe, n_layers=3)
    backend = NumpyBackend(weights, np.float64)
    link = LocalTransport(Server(backend), record_view=True)
    Client(backend, KeySchedule.generate(), SCXConfig(level=level)).prefill(np.arange(1, 6), link)  # type: ignore[arg-type]
    stages = {(m.stage, m.layer) for m in link.view.messages}
    permuted = {(s, i) for s, i in stages if s in (Stage.QKV, Stage.O, Stage.FFN, Stage.HEAD)}
    assert (
        request_budget(model_sensitivities(weights), level=level).permuted_stages_prefill
        == len(permuted)
        == 10
    )  # type: ignore[arg-type]

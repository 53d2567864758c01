"""Per-request privacy budget of an SCX configuration (DESIGN §5.1, §5.3, §7).

**What is composed.** Exactly the noised releases of the protocol's
:class:`~scx_ref.protocol.plan.ReleasePlan` for the configuration: the plan is the list the client
executes (a test checks that the server sees exactly those noised messages), so the budget cannot drift
from the protocol. Each release is a Laplace mechanism with the data-independent L1 sensitivity of its
input kind (:mod:`.sensitivity`) and the plan's β.

**Neighbouring relation.** Two requests are neighbours when their prompts differ in one token (replace-one).
The budget is the (ε, δ) that one token of the prompt gets from every Laplace release that depends on it.

**Counting (the choice, stated).** In the prefill every row (token) of the n rows is noised; each token's
row is a separate release about *that* token, so a token's ε composes over the stages and blocks that touch
its row, **not** over the n rows. This is exact for block 1 (a block-1 row depends only on its own token).
Past the first attention, a row also depends on the earlier tokens; the default ``rows="own"`` does not
count those cross-token releases (the choice this project made). ``rows="all"`` is the conservative
alternative: every prefill release downstream of block 1's attention is counted n times. Every decode step
depends on the prompt, so each step's releases count once per step under either choice; T generated tokens
take T − 1 decode steps (the first token comes from the prefill's logits and the last is never sent back).

**Not covered** (reported in ``uncovered``): every un-noised message of the configuration
(:attr:`~scx_ref.protocol.plan.ReleasePlan.exposures`: e.g. the attention stage's Q, K, V under a feature
permutation when the server computes attention, un-noised stages of the level, the middle blocks after
key sharing, the paper's last-block offset — a scalar, not a Laplace mechanism on the row), the middle
blocks' prefill QKV releases whose noise key sharing uploads (revealed, not counted), and MoE routing
choices. Those are exposures to measure (DESIGN §5.4), with ε = ∞ in the DP sense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .._files import json_ready
from ..errors import ConfigError
from ..protocol.config import BETA_KINDS, GUARD_FFN, LEVELS, GuardFFN, Level, SCXConfig
from ..protocol.plan import InputKind, Release, ReleasePlan
from ..stages import Phase, Stage
from ..weights import ModelWeights
from ._validate import check_count, check_delta, check_nonnegative, check_positive, quotient_up, times
from .accountants import CompositionResult, compose, pld_available
from .mechanisms import LaplaceMechanism
from .permutation import bayes_guess_bound, permutation_bits, prompt_order_bits, statelessness_bound_paper
from .sensitivity import ModelSensitivities, model_sensitivities

__all__ = ["RequestBudget", "StageRelease", "config_for_budget", "request_budget"]

DEFAULT_BETA = 5.0  # the paper's s


@dataclass(frozen=True)
class StageRelease:
    """``count`` Laplace releases of one stage in one block, per prompt token (1-based ``block``; 0 for
    the LM-head stage); ``kind`` is the input kind that fixes the sensitivity."""

    phase: str
    stage: str
    kind: str
    block: int
    count: int
    sensitivity: float
    scale: float
    epsilon_each: float

    @property
    def epsilon_total(self) -> float:
        """Basic composition of this group: count·ε (+inf when it exceeds the float64 range, as
        :func:`~scx_ref.dp.accountants.basic_composition`)."""
        return times(self.count, self.epsilon_each)

    def mechanism(self) -> LaplaceMechanism:
        """The group as a :class:`LaplaceMechanism` with ``count`` releases."""
        return LaplaceMechanism(
            self.sensitivity, self.scale, self.count, f"{self.phase}:{self.stage}:{self.block}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The release's fields as a dict, with its ``epsilon_total``."""
        out = asdict(self)
        out["epsilon_total"] = self.epsilon_total
        return out


@dataclass(frozen=True)
class RequestBudget:
    """The (ε, δ) one prompt token gets in one request, with its per-stage breakdown.

    ``epsilon_basic`` is pure (δ = 0); ``epsilon_advanced`` holds at ``delta_prime``; ``epsilon_pld`` at
    ``delta`` (None without dp_accounting); ``epsilon_best`` at ``delta`` (the smallest of those that hold
    there, see :class:`~scx_ref.dp.accountants.CompositionResult`). All are +inf when no message is a
    Laplace release (level ``permute``). ``guard`` is the configuration's l_s; ``config`` the whole
    configuration (l_e, attention, gen_linear, ... — what a named preset sets beside the options).
    ``permuted_stages_prefill`` counts the prefill's token-permuted stages, 3·L + 1: each block's QKV, O and
    FFN and the LM head (a blinded MLP's later messages, an MoE layer's router and experts, travel under
    their FFN stage's permutation); ``permutation_bits_per_stage`` and ``prompt_order_bits_per_stage`` are
    each one's bits (:mod:`.permutation`).
    """

    model: str
    level: str
    beta: dict[str, float]
    guard: int
    prompt_len: int
    tokens: int
    decoys: int
    rows: str
    delta: float
    delta_prime: float
    stages: tuple[StageRelease, ...]
    composition: CompositionResult | None
    epsilon_basic: float
    epsilon_advanced: float
    epsilon_best_closed_form: float
    epsilon_pld: float | None
    epsilon_best: float
    permutation_bits_per_stage: float
    prompt_order_bits_per_stage: float
    permuted_stages_prefill: int
    token_guess_bayes: float
    token_guess_paper_lemma2: float
    uncovered: tuple[str, ...]
    notes: tuple[str, ...]
    config: SCXConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (:func:`~scx_ref._files.json_ready`: ±inf become the texts "inf" and "-inf")."""
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "model",
                "level",
                "beta",
                "guard",
                "prompt_len",
                "tokens",
                "decoys",
                "rows",
                "delta",
                "delta_prime",
                "epsilon_basic",
                "epsilon_advanced",
                "epsilon_best_closed_form",
                "epsilon_pld",
                "epsilon_best",
                "permutation_bits_per_stage",
                "prompt_order_bits_per_stage",
                "permuted_stages_prefill",
                "token_guess_bayes",
                "token_guess_paper_lemma2",
            )
        }
        if self.epsilon_pld is None:
            out.pop("epsilon_pld")
        out["config"] = self.config.to_dict()
        out["releases"] = sum(s.count for s in self.stages)
        out["stages"] = [s.to_dict() for s in self.stages]
        out["composition"] = None if self.composition is None else self.composition.to_dict()
        out["uncovered"] = list(self.uncovered)
        out["notes"] = list(self.notes)
        return json_ready(out)  # type: ignore[no-any-return]


def _sensitivity(sens: ModelSensitivities, r: Release) -> float:
    """Δ₁ of a release's input kind in its block (block 1's QKV input: the embedding diameter)."""
    if r.kind == "lm_head":
        return sens.lm_head
    ls = sens.layers[r.block]
    if r.kind == "qkv":
        return sens.block1_qkv if r.block == 0 else ls.qkv
    if r.kind == "o":
        return ls.o
    if r.kind in ("gate_up", "router"):
        return ls.gate_up
    if r.kind == "down":
        return ls.down
    raise ConfigError(f"release kind {r.kind!r} is not a Laplace mechanism on its input")


def config_for_budget(
    level: Level = "paper",
    beta: float | Mapping[str, float] = DEFAULT_BETA,
    guard: int = 1,
    decoys: int = 0,
    guard_ffn: GuardFFN = "blinded",
) -> SCXConfig:
    """The :class:`SCXConfig` of the budget calculator's options: ``guard`` = l_s = l_e, ``decoys`` =
    r₁ = r₂ = r_lock, ``beta`` one β > 0 or a mapping kind → β (kinds :data:`BETA_KINDS`, or ``default``
    > 0). A kind's β may be 0, as in :attr:`SCXConfig.stage_beta`: its messages are sent clear, so they
    are no release and the budget lists them as uncovered."""
    if level not in LEVELS:
        raise ConfigError(f"level must be one of {LEVELS}, got {level!r}")
    g = check_count(guard, "guard")
    r = check_count(decoys, "decoys", minimum=0)
    if isinstance(beta, Mapping):
        unknown = [k for k in beta if not isinstance(k, str) or (k not in BETA_KINDS and k != "default")]
        if unknown:  # keys of any type (1, None, ...): list their reprs, never compare them
            raise ConfigError(
                f"unknown stage(s) in beta: {', '.join(sorted(repr(k) for k in unknown))}; "
                f"kinds are {BETA_KINDS} (+ 'default')"
            )
        stage_beta = {k: check_nonnegative(v, f"beta[{k}]") for k, v in beta.items() if k != "default"}
        default = beta.get("default")
        base = check_positive(default, "beta[default]") if default is not None else None
        if base is None:
            missing = [k for k in BETA_KINDS if k not in stage_beta]
            if missing:
                raise ConfigError(f"beta gives no scale for {missing} (add them or a 'default')")
            base = stage_beta["qkv"]
        return SCXConfig(
            level=level, beta=base, stage_beta=stage_beta, l_s=g, l_e=g, r1=r, r2=r, guard_ffn=guard_ffn
        )
    return SCXConfig(
        level=level, beta=check_positive(beta, "beta"), l_s=g, l_e=g, r1=r, r2=r, guard_ffn=guard_ffn
    )


def request_budget(
    model: ModelWeights | ModelSensitivities,
    config: SCXConfig | None = None,
    *,
    level: Level = "paper",
    beta: float | Mapping[str, float] = DEFAULT_BETA,
    guard: int = 1,
    prompt_len: int = 1,
    tokens: int = 0,
    decoys: int = 0,
    delta: float = 1e-6,
    delta_prime: float | None = None,
    rows: Literal["own", "all"] = "own",
    use_pld: bool = True,
    pld_interval: float | None = None,
    guard_ffn: GuardFFN = "blinded",
    key_sharing: bool | None = None,
) -> RequestBudget:
    """Per-request (ε, δ) for one prompt token under an SCX configuration (see the module docstring).

    ``model``: ModelWeights (sensitivities computed, block-1 diameter exactly) or precomputed
    :class:`ModelSensitivities`. ``config``: the protocol configuration; without it, one is built from
    ``level``, ``beta`` (one β, or a mapping kind → β with kinds qkv, o, gate_up, down, router, lm_head or
    'default'), ``guard`` = l_s = l_e, ``decoys`` = r and ``guard_ffn`` (:func:`config_for_budget`).
    ``prompt_len`` = n, ``tokens`` = T generated tokens (T − 1 decode steps). ``key_sharing``: whether the
    client uploads the middle blocks' keys (DESIGN §5.2, :meth:`~scx_ref.protocol.Client.share_keys`), which
    reveals their noised prefill QKV rows; None: when it decodes (T ≥ 2, as ``generate`` does) — pass True
    for a client that calls ``share_keys`` without decoding (ConfigError for False with T ≥ 2: decoding
    needs the shared caches). Guards larger than the model
    count as the protocol runs them (:func:`~scx_ref.protocol.config.guard_blocks`: clamped to its blocks).

    Guarantee: under replace-one-token neighbours, the noised releases of the configuration's
    :class:`~scx_ref.protocol.plan.ReleasePlan` together are (epsilon_basic, 0)-, (epsilon_advanced,
    delta_prime)- and (epsilon_pld, delta)-DP for each prompt token, with the counting of the module
    docstring; the ``uncovered`` releases are outside the guarantee. With ``use_pld``, a request whose
    releases the PLD accountant cannot compose within its size limit (e.g. ~10⁸ decode steps or more) is a
    ConfigError before composing (:func:`~scx_ref.dp.accountants.compose`); ``use_pld=False`` is not limited.
    """
    sens = model_sensitivities(model) if isinstance(model, ModelWeights) else model
    if not isinstance(sens, ModelSensitivities):
        raise ConfigError(f"model must be ModelWeights or ModelSensitivities, got {type(model).__name__}")
    if guard_ffn not in GUARD_FFN:
        raise ConfigError(f"guard_ffn must be 'blinded' or 'clear', got {guard_ffn!r}")
    if rows not in ("own", "all"):
        raise ConfigError(f"rows must be 'own' or 'all', got {rows!r}")
    cfg = config if config is not None else config_for_budget(level, beta, guard, decoys, guard_ffn)
    if not isinstance(cfg, SCXConfig):
        raise ConfigError(f"config must be an SCXConfig, got {type(cfg).__name__}")
    n_layers = sens.n_layers  # guards larger than the model are clamped, as the protocol clamps them
    n = check_count(prompt_len, "prompt_len")
    t = check_count(tokens, "tokens", minimum=0)
    dl = check_delta(delta)
    dp = dl if delta_prime is None else check_delta(delta_prime, "delta_prime")
    plan = ReleasePlan.of(cfg, sens)
    steps = max(t - 1, 0)
    if key_sharing is None:
        key_sharing = steps > 0
    elif not isinstance(key_sharing, bool):
        raise ConfigError(f"key_sharing must be True, False or None, got {key_sharing!r:.40}")
    elif steps and not key_sharing:
        raise ConfigError(f"{t} tokens decode {steps} step(s), which needs key sharing (DESIGN §5.2)")
    revealed = plan.shared if key_sharing else ()  # their noise is uploaded at key sharing: x is revealed

    grouped: dict[tuple[Phase, Stage, InputKind, int, float], int] = {}
    for r in plan.prefill:
        if r.is_laplace_mechanism and r not in revealed:
            cross = 1 if (r.block == 0 and r.stage is Stage.QKV) or rows == "own" else n
            key = (r.phase, r.stage, r.kind, r.block, r.beta)
            grouped[key] = grouped.get(key, 0) + cross
    if steps:
        for r in plan.generation:
            if r.is_laplace_mechanism:
                key = (r.phase, r.stage, r.kind, r.block, r.beta)
                grouped[key] = grouped.get(key, 0) + steps
    releases: list[StageRelease] = []
    for (phase, stage, kind, block, b), count in grouped.items():
        d1 = _sensitivity(sens, Release(phase, stage, block, kind, b))
        shown = 0 if kind == "lm_head" else block + 1
        releases.append(StageRelease(phase.value, stage.value, kind, shown, count, d1, b, quotient_up(d1, b)))

    level_ = cfg.level
    # every un-noised message of the plan (DESIGN §5.4), then the releases key sharing reveals
    uncovered = [str(e) for e in plan.exposures]
    if revealed:
        blocks = ", ".join(str(r.block + 1) for r in revealed)
        uncovered.append(
            f"prefill QKV rows of middle blocks {blocks}: their noise is uploaded at key sharing "
            "(DESIGN §5.2), so the server holds those rows exactly"
        )
    if sens.notes:
        uncovered += [n_ for n_ in sens.notes if "not covered" in n_]

    composition: CompositionResult | None = None
    if releases:
        composition = compose(
            [s.mechanism() for s in releases],
            dl,
            dp,
            use_pld=use_pld,
            value_discretization_interval=pld_interval,
        )
        eps_basic, eps_adv = composition.epsilon_basic, composition.epsilon_advanced
        eps_cf, eps_pld, eps_best = (
            composition.epsilon_best_closed_form,
            composition.epsilon_pld,
            composition.epsilon_best,
        )
    else:
        eps_basic = eps_adv = eps_cf = eps_best = math.inf
        eps_pld = math.inf if use_pld and pld_available() else None  # None: no accountant, as with releases

    token_eps = eps_basic  # pure ε about the token (δ = 0), what the guessing bounds need
    notes = [
        "the releases are the protocol's release plan (scx_ref.protocol.plan) for this configuration",
        "neighbouring prompts differ in one token; per-token composition over the stages, blocks and "
        f"decode steps that touch that token (rows={rows!r}); T generated tokens = T - 1 decode steps",
        "epsilon_basic is pure (delta = 0); epsilon_advanced at delta_prime; epsilon_pld at delta",
    ]
    if sens.embed_normalized_diameter is None and level_ != "permute":
        notes.append(
            "block-1 QKV uses the bound 2*sqrt(d)*||gamma||_2 (exact embedding diameter not computed)"
        )
    return RequestBudget(
        model=sens.name,
        level=level_,
        beta={k: cfg.beta_for(k) for k in BETA_KINDS},
        guard=cfg.l_s,
        prompt_len=n,
        tokens=t,
        decoys=cfg.r1,
        rows=rows,
        delta=dl,
        delta_prime=dp,
        stages=tuple(releases),
        composition=composition,
        epsilon_basic=eps_basic,
        epsilon_advanced=eps_adv,
        epsilon_best_closed_form=eps_cf,
        epsilon_pld=eps_pld,
        epsilon_best=eps_best,
        permutation_bits_per_stage=permutation_bits(n, cfg.r1),
        prompt_order_bits_per_stage=prompt_order_bits(n, cfg.r1),
        permuted_stages_prefill=3 * n_layers + 1,
        token_guess_bayes=bayes_guess_bound(token_eps, sens.vocab_size) if math.isfinite(token_eps) else 1.0,
        token_guess_paper_lemma2=(
            statelessness_bound_paper(token_eps, sens.hidden_size, sens.vocab_size)
            if math.isfinite(token_eps)
            else 1.0
        ),
        uncovered=tuple(uncovered),
        notes=tuple(notes),
        config=cfg,
    )

"""Per-request privacy budget of an SCX configuration (DESIGN §5.1, §5.3, §7).

**Neighbouring relation.** Two requests are neighbours when their prompts differ in one token (replace-one).
The budget is the (ε, δ) that one token of the prompt gets from every Laplace release that depends on it.

**What is counted (the choice, stated).** In the prefill every row (token) of the n rows is noised; each
token's row is a separate release about *that* token, so a token's ε composes over the stages, blocks and
generation steps that touch its row, **not** over the n rows. This is exact for block 1 (a block-1 row depends
only on its own token). Past the first attention, a row also depends on the earlier tokens; the default
``rows="own"`` does not count those cross-token releases (the choice this project made). ``rows="all"`` is the
conservative alternative: every prefill release downstream of block 1's attention is counted n times (a
change to the first token can move all n rows). Every generated token depends on the prompt, so each
generation step's noised releases count once per generated token under either choice.

**Levels.**

- ``permute``: no noise anywhere. ε = ∞ for the content (permutations hide order, not content); the report
  gives the permutation bits instead.
- ``paper``: prefill noises block 1's QKV stage only (Δ₁ = exact diameter of the normalized vocabulary rows
  when computed); each generated token gets one-time noise in the QKV stage of the first g guard blocks
  (l_s = l_e = g); block 1's Δ₁ there is the vocabulary diameter, blocks 2..g use 2√d‖γ_attn‖₂.
- ``blind``: every linear stage is noised: QKV, O, FFN gate/up, down in every block, plus the
  final-norm/LM-head stage in the prefill (the client applies the final norm and LM head itself during
  generation, §5.3); generated tokens go through the same four stages in every block.

**Not covered by any level** (reported in ``uncovered``): the attention stage's Q, K, V (sent un-noised under
a feature permutation), every un-noised stage (paper: blocks 2..L of the prefill, the guard FFN, the middle
blocks after key sharing), and MoE routing choices. Those are exposures to measure (DESIGN §5.4), with
ε = ∞ in the DP sense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import ConfigError
from ..weights import ModelWeights
from ._validate import check_count, check_delta, check_positive
from .accountants import CompositionResult, compose
from .mechanisms import LaplaceMechanism
from .permutation import bayes_guess_bound, permutation_bits, statelessness_bound_paper
from .sensitivity import ModelSensitivities, model_sensitivities

__all__ = ["LEVELS", "STAGES", "RequestBudget", "StageRelease", "request_budget"]

Level = Literal["permute", "paper", "blind"]
LEVELS: tuple[str, ...] = ("permute", "paper", "blind")
STAGES: tuple[str, ...] = ("qkv", "o", "gate_up", "down", "lm_head")
DEFAULT_BETA = 5.0  # the paper's s


@dataclass(frozen=True)
class StageRelease:
    """``count`` Laplace releases of one stage in one block (1-based ``block``; 0 for the LM-head stage)."""

    phase: str
    stage: str
    block: int
    count: int
    sensitivity: float
    scale: float
    epsilon_each: float

    @property
    def epsilon_total(self) -> float:
        """Basic composition of this group: count·ε."""
        return self.count * self.epsilon_each

    def mechanism(self) -> LaplaceMechanism:
        """The group as a :class:`LaplaceMechanism` with ``count`` releases."""
        return LaplaceMechanism(
            self.sensitivity, self.scale, self.count, f"{self.phase}:{self.stage}:{self.block}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["epsilon_total"] = self.epsilon_total
        return out


@dataclass(frozen=True)
class RequestBudget:
    """The (ε, δ) one prompt token gets in one request, with its per-stage breakdown.

    ``epsilon_basic`` is pure (δ = 0); ``epsilon_advanced`` holds at ``delta_prime``; ``epsilon_pld`` at
    ``delta`` (None without dp_accounting). All are +inf at level ``permute``.
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
    permuted_stages_prefill: int
    token_guess_bayes: float
    token_guess_paper_lemma2: float
    uncovered: tuple[str, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinities become the string "inf")."""

        def fix(v: Any) -> Any:
            if isinstance(v, float) and math.isinf(v):
                return "inf"
            if isinstance(v, dict):
                return {k: fix(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [fix(x) for x in v]
            return v

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
                "permuted_stages_prefill",
                "token_guess_bayes",
                "token_guess_paper_lemma2",
            )
        }
        if self.epsilon_pld is None:
            out.pop("epsilon_pld")
        out["releases"] = sum(s.count for s in self.stages)
        out["stages"] = [s.to_dict() for s in self.stages]
        out["composition"] = None if self.composition is None else self.composition.to_dict()
        out["uncovered"] = list(self.uncovered)
        out["notes"] = list(self.notes)
        return fix(out)  # type: ignore[no-any-return]


def _betas(beta: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(beta, Mapping):
        unknown = set(beta) - set(STAGES) - {"default"}
        if unknown:
            raise ConfigError(
                f"unknown stage(s) in beta: {sorted(unknown)}; stages are {STAGES} (+ 'default')"
            )
        default = beta.get("default")
        out = {}
        for s in STAGES:
            value = beta.get(s, default)
            if value is None:
                raise ConfigError(f"beta gives no scale for stage {s!r} (add it or a 'default')")
            out[s] = check_positive(value, f"beta[{s}]")
        return out
    b = check_positive(beta, "beta")
    return dict.fromkeys(STAGES, b)


def request_budget(
    model: ModelWeights | ModelSensitivities,
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
    guard_ffn: Literal["blinded", "clear"] = "blinded",
) -> RequestBudget:
    """Per-request (ε, δ) for one prompt token under an SCX configuration (see the module docstring).

    ``model``: ModelWeights (sensitivities computed, block-1 diameter exactly) or precomputed
    :class:`ModelSensitivities`. ``beta``: one Laplace scale for every stage or a mapping stage → β
    (stages: qkv, o, gate_up, down, lm_head, or 'default'). ``guard`` = g = l_s = l_e. ``prompt_len`` = n,
    ``tokens`` = T generated, ``decoys`` = r decoy rows per permuted stage. ``guard_ffn`` as in
    :class:`~scx_ref.protocol.SCXConfig`: ``blinded`` (the protocol's default) noises the guard blocks'
    MLP maps during generation, and those releases are counted; ``clear`` sends their input un-noised.

    Guarantee: under replace-one-token neighbours, the noised releases together are
    (epsilon_basic, 0)-, (epsilon_advanced, delta_prime)- and (epsilon_pld, delta)-DP for each prompt token,
    with the counting of the module docstring; the ``uncovered`` releases are outside the guarantee.
    """
    sens = model_sensitivities(model) if isinstance(model, ModelWeights) else model
    if not isinstance(sens, ModelSensitivities):
        raise ConfigError(f"model must be ModelWeights or ModelSensitivities, got {type(model).__name__}")
    if level not in LEVELS:
        raise ConfigError(f"level must be one of {LEVELS}, got {level!r}")
    if guard_ffn not in ("blinded", "clear"):
        raise ConfigError(f"guard_ffn must be 'blinded' or 'clear', got {guard_ffn!r}")
    if rows not in ("own", "all"):
        raise ConfigError(f"rows must be 'own' or 'all', got {rows!r}")
    betas = _betas(beta)
    n_layers = sens.n_layers
    g = check_count(guard, "guard")
    if g > n_layers:
        raise ConfigError(f"guard ({g}) exceeds the number of blocks ({n_layers})")
    n = check_count(prompt_len, "prompt_len")
    t = check_count(tokens, "tokens", minimum=0)
    r = check_count(decoys, "decoys", minimum=0)
    dl = check_delta(delta)
    dp = dl if delta_prime is None else check_delta(delta_prime, "delta_prime")

    def qkv_sens(block: int) -> float:
        return sens.block1_qkv if block == 1 else sens.layers[block - 1].qkv

    releases: list[StageRelease] = []

    def add(phase: str, stage: str, block: int, count: int, d1: float) -> None:
        b = betas[stage]
        releases.append(StageRelease(phase, stage, block, count, d1, b, d1 / b))

    cross = n if rows == "all" else 1  # prefill releases downstream of block 1's attention
    if level == "paper":
        add("prefill", "qkv", 1, 1, qkv_sens(1))
        if t:
            for blk in range(1, g + 1):
                add("generate", "qkv", blk, t, qkv_sens(blk))
            if guard_ffn == "blinded":  # first and last guard blocks' MLP maps, one-time noise
                for blk in sorted({*range(1, g + 1), *range(max(g, n_layers - g) + 1, n_layers + 1)}):
                    add("generate", "gate_up", blk, t, sens.layers[blk - 1].gate_up)
                    add("generate", "down", blk, t, sens.layers[blk - 1].down)
    elif level == "blind":
        for phase, count_first, count_rest in (("prefill", 1, cross), ("generate", t, t)):
            if count_first == 0:
                continue
            for blk in range(1, n_layers + 1):
                ls = sens.layers[blk - 1]
                add(phase, "qkv", blk, count_first if blk == 1 else count_rest, qkv_sens(blk))
                add(phase, "o", blk, count_rest, ls.o)
                add(phase, "gate_up", blk, count_rest, ls.gate_up)
                add(phase, "down", blk, count_rest, ls.down)
            if phase == "prefill":
                add(phase, "lm_head", 0, count_rest, sens.lm_head)

    uncovered = ["attention stage Q, K, V (un-noised, feature-permuted) in every block"]
    if level == "permute":
        uncovered.insert(0, "every stage: no noise anywhere (content released un-noised, permuted only)")
    elif level == "paper":
        uncovered += [
            "prefill QKV of blocks 2..L, O, FFN and LM-head stages (un-noised, permuted only)",
            "middle blocks' caches after key sharing and generated tokens' middle-block states",
        ]
        if guard_ffn == "clear":
            uncovered.append("guard-block FFN input during generation (sent in the clear, as in the paper)")
    else:
        uncovered.append("middle blocks computed by the server alone during generation (protocol §5.3)")
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
        eps_pld = math.inf if use_pld else None

    token_eps = eps_basic  # pure ε about the token (δ = 0), what the guessing bounds need
    notes = [
        "neighbouring prompts differ in one token; per-token composition over the stages, blocks and "
        f"generation steps that touch that token (rows={rows!r})",
        "epsilon_basic is pure (delta = 0); epsilon_advanced at delta_prime; epsilon_pld at delta",
    ]
    if sens.embed_normalized_diameter is None and level != "permute":
        notes.append(
            "block-1 QKV uses the bound 2*sqrt(d)*||gamma||_2 (exact embedding diameter not computed)"
        )
    return RequestBudget(
        model=sens.name,
        level=level,
        beta=betas,
        guard=g,
        prompt_len=n,
        tokens=t,
        decoys=r,
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
        permutation_bits_per_stage=permutation_bits(n, r),
        permuted_stages_prefill=3 * n_layers + 1,
        token_guess_bayes=bayes_guess_bound(token_eps, sens.vocab_size) if math.isfinite(token_eps) else 1.0,
        token_guess_paper_lemma2=(
            statelessness_bound_paper(token_eps, sens.hidden_size, sens.vocab_size)
            if math.isfinite(token_eps)
            else 1.0
        ),
        uncovered=tuple(uncovered),
        notes=tuple(notes),
    )

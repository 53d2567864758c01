"""The release plan: every noised message of an SCX request, enumerated once (DESIGN §5.1, §5.3, §7).

A *release* is a message whose array is ``x + η`` with η ~ Laplace(0, β) drawn from the key schedule. The
:class:`ReleasePlan` of an :class:`~scx_ref.protocol.config.SCXConfig` and a model lists them per phase:
the prefill's releases happen once per request, the generation releases once per decode step. The
client asks the plan for the β of every message it may blind (:meth:`ReleasePlan.beta`) and draws the
noise under the plan's key label (:meth:`Release.label`), so the plan is what the client executes; the
per-request DP budget (:func:`scx_ref.dp.budget.request_budget`) composes exactly these releases; and a
test runs real sessions and checks that the noised messages the server saw are exactly the plan's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from .._checks import check_int
from ..errors import ConfigError, ProtocolError
from ..keys import Label
from ..stages import Phase, Stage
from .config import BetaKind, SCXConfig

__all__ = ["INPUT_KINDS", "Exposure", "InputKind", "PlanModel", "Release", "ReleasePlan"]


class PlanModel(Protocol):
    """What a plan needs of a model: its block count and experts (a ModelConfig or ModelSensitivities)."""

    @property
    def n_layers(self) -> int:
        """L, the number of transformer blocks."""
        ...

    @property
    def n_experts(self) -> int:
        """E, the experts of each MoE layer (0 for a dense model)."""
        ...

    @property
    def is_moe(self) -> bool:
        """Whether the MLP is a mixture of experts."""
        ...


#: What a release's x is, which fixes its sensitivity (dp.sensitivity) and its key label:
#: ``qkv`` the normalized attention input, ``o`` the attention output, ``gate_up`` / ``router`` the
#: normalized MLP input, ``down`` the SwiGLU product, ``lm_head`` the normalized final row, ``offset`` the
#: paper's constant last-block offset (``last_ffn="paper"``; a scalar added to every coordinate, not a
#: Laplace mechanism on x).
InputKind = Literal[BetaKind, "offset"]
INPUT_KINDS: tuple[InputKind, ...] = get_args(InputKind)  # the β kinds, then offset

_LABEL_ROOT: dict[InputKind, str] = {
    "qkv": "qkv",
    "o": "o",
    "lm_head": "head",
    "gate_up": "ffn",
    "down": "ffn",
    "router": "ffn",
    "offset": "offset",
}
_FFN_PART: dict[InputKind, str] = {"gate_up": "up", "down": "down", "router": "router"}


@dataclass(frozen=True)
class Release:
    """One noised message of a phase: stage ``stage`` of block ``block`` (0-based; ``n_layers`` for the
    LM-head stage) sends ``x + η``, η ~ Laplace(0, ``beta``), x of kind ``kind`` (for an MoE layer's
    blinded experts, ``expert`` names the expert the message is for)."""

    phase: Phase
    stage: Stage
    block: int
    kind: InputKind
    beta: float
    expert: int | None = None

    def label(self, step: int | None = None) -> Label:
        """The key label η is drawn from: ``("alpha", block, root[, "gen", step][, part][, expert])``.
        ProtocolError for a generation release unless ``step`` is an integer >= 0 (a prefill release
        ignores it)."""
        out: Label = ("alpha", self.block, _LABEL_ROOT[self.kind])
        if self.phase is Phase.GENERATE:
            if step is None:
                raise ProtocolError("a generation release needs its step")
            out = (*out, "gen", check_int(step, "step", 0, error=ProtocolError))
        if self.kind in _FFN_PART:
            out = (*out, _FFN_PART[self.kind])
        if self.expert is not None:
            out = (*out, self.expert)
        return out

    @property
    def is_laplace_mechanism(self) -> bool:
        """Whether η is a Laplace vector on x (a DP mechanism); the paper's scalar offset is not."""
        return self.kind != "offset"


@dataclass(frozen=True)
class Exposure:
    """Messages the server receives whose prompt-dependent content carries **no** Laplace noise (DESIGN
    §5.4): stage ``stage`` of ``blocks`` (0-based; ``n_layers`` is the LM-head stage) in ``phase``, with
    ``what`` the server gets. They are outside any DP guarantee; the attacks measure them."""

    phase: Phase
    stage: Stage
    blocks: tuple[int, ...]
    what: str

    def __str__(self) -> str:
        shown = ", ".join(str(b + 1) for b in self.blocks)
        return f"{self.phase.value} {self.stage.value} (blocks {shown}): {self.what}"


def _mlp_releases(
    phase: Phase, block: int, config: SCXConfig, model: PlanModel, up: Stage, down: Stage, router: Stage
) -> list[Release]:
    """The blinded MLP of one block (client norm, T5 on every linear map): dense gate/up then down; MoE
    the router, then every expert's gate/up and down (the server does not learn the routing).

    At prefill the client blinds the MLP only when its first message is noised (the gate/up map's β, an
    MoE layer's router's, above 0); else it sends the block's rows in one clear ``ffn`` message and the
    server runs the whole MLP, so none of the MLP's maps is a release. A generation step always sends the
    maps one by one, each noised as its own β says."""
    b_up, b_down = config.beta_for("gate_up"), config.beta_for("down")
    first = config.beta_for("router") if model.is_moe else b_up
    if phase is Phase.PREFILL and first <= 0:
        return []
    if not model.is_moe:
        return [Release(phase, up, block, "gate_up", b_up), Release(phase, down, block, "down", b_down)]
    out = [Release(phase, router, block, "router", config.beta_for("router"))]
    for e in range(model.n_experts):
        out += [Release(phase, up, block, "gate_up", b_up, e), Release(phase, down, block, "down", b_down, e)]
    return out


@dataclass(frozen=True)
class ReleasePlan:
    """Every noised release of one request under ``config`` on ``model``: ``prefill`` (once per request)
    and ``generation`` (once per decode step)."""

    config: SCXConfig
    model: PlanModel
    prefill: tuple[Release, ...]
    generation: tuple[Release, ...]
    _index: dict[tuple[Stage, int, int | None], Release] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for r in (*self.prefill, *self.generation):
            self._index[(r.stage, r.block, r.expert)] = r

    @classmethod
    def of(cls, config: SCXConfig, model: PlanModel) -> ReleasePlan:
        """The plan of ``config`` (DESIGN §5.1 levels, §5.3 generation, §5.7 hardened options) on ``model``.

        Prefill: level ``paper`` blinds block 1's QKV stage; level ``blind`` every linear stage of every
        block (QKV, O, the MLP's maps — none where the MLP's first map has β = 0: the client then sends the
        block's rows in one clear ``ffn`` message) and the LM-head stage. Generation (levels ``paper`` and
        ``blind``, one-time noise per step): the QKV stage of the first guard blocks (whoever computes their
        attention) and, with ``attention="client"``, of the last guard blocks too; with
        ``guard_ffn="blinded"``, the first guard blocks' MLP maps; the last guard blocks' MLP maps
        (``last_ffn="exact"``); with ``gen_linear="server"`` every guard block's W_o (``gen_o``) and the
        LM head (``gen_head``). With ``last_ffn="paper"`` the last guard blocks send the paper's offset
        at every level. The middle blocks run on the server alone, un-noised, so they never appear.

        ConfigError when ``config`` is not an SCXConfig or ``model`` is no :class:`PlanModel` (``n_layers``,
        ``n_experts``, ``is_moe``) with an integer ``n_layers`` >= 1, an integer ``n_experts`` >= 0 and
        ``is_moe`` equal to ``n_experts > 0``.
        """
        if not isinstance(config, SCXConfig):
            raise ConfigError(f"config must be an SCXConfig, got {type(config).__name__}")
        if not all(hasattr(model, a) for a in ("n_layers", "n_experts", "is_moe")):
            raise ConfigError(
                f"model must be a ModelConfig (with n_layers, n_experts, is_moe), got {type(model).__name__}"
            )
        L = check_int(model.n_layers, "model.n_layers", 1, error=ConfigError)
        n_experts = check_int(model.n_experts, "model.n_experts", 0, error=ConfigError)
        if model.is_moe != (n_experts > 0):  # an MoE's blinded MLP is one release per expert
            raise ConfigError(
                f"model.is_moe must be n_experts > 0, got {model.is_moe!r:.40} with {n_experts} experts"
            )
        first, _, last = config.blocks(L)
        p, g = Phase.PREFILL, Phase.GENERATE
        pre: list[Release] = []
        if config.level == "paper":
            pre.append(Release(p, Stage.QKV, 0, "qkv", config.beta_for("qkv")))
        elif config.level == "blind":
            for i in range(L):
                pre.append(Release(p, Stage.QKV, i, "qkv", config.beta_for("qkv")))
                pre.append(Release(p, Stage.O, i, "o", config.beta_for("o")))
                pre += _mlp_releases(p, i, config, model, Stage.FFN, Stage.FFN_DOWN, Stage.ROUTER)
            pre.append(Release(p, Stage.HEAD, L, "lm_head", config.beta_for("lm_head")))
        gen: list[Release] = []
        up, down, router = Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, Stage.GEN_ROUTER
        noised = config.level != "permute"
        client_attn = config.attention == "client"
        offload = noised and config.gen_linear == "server"
        for i in first:
            if noised:
                gen.append(Release(g, Stage.GEN_QKV, i, "qkv", config.beta_for("qkv")))
                if offload:
                    gen.append(Release(g, Stage.GEN_O, i, "o", config.beta_for("o")))
                if config.guard_ffn == "blinded":
                    gen += _mlp_releases(g, i, config, model, up, down, router)
        for i in last:
            if noised and client_attn:
                gen.append(Release(g, Stage.GEN_QKV, i, "qkv", config.beta_for("qkv")))
            if offload:
                gen.append(Release(g, Stage.GEN_O, i, "o", config.beta_for("o")))
            if config.last_ffn == "paper":  # the paper's offset (β ≥ 1 even at level permute)
                gen.append(Release(g, Stage.GEN_FFN, i, "offset", config.offset_beta))
            elif noised:
                gen += _mlp_releases(g, i, config, model, up, down, router)
        if offload:
            gen.append(Release(g, Stage.GEN_HEAD, L, "lm_head", config.beta_for("lm_head")))
        # a release with β = 0 sends x itself: it is not noised, so it is not a release
        return cls(config, model, tuple(r for r in pre if r.beta > 0), tuple(r for r in gen if r.beta > 0))

    def releases(self, phase: Phase) -> tuple[Release, ...]:
        """The releases of ``phase`` (PREFILL: once per request; GENERATE: once per decode step; CONTROL:
        none); ConfigError for anything that is not a :class:`~scx_ref.stages.Phase` (an empty answer would
        read as "nothing is noised")."""
        if phase is Phase.PREFILL:
            return self.prefill
        if phase is Phase.GENERATE:
            return self.generation
        if phase is Phase.CONTROL:
            return ()
        raise ConfigError(f"phase must be a Phase, got {type(phase).__name__} {phase!r:.40}")

    @property
    def shared(self) -> tuple[Release, ...]:
        """The prefill releases whose noise the client uploads at key sharing (DESIGN §5.2: a noised QKV
        stage of a middle block, so the server can remove α_i W from that block's raw cache). Once keys
        are shared — before the first decode step — the server holds x of these messages exactly."""
        _, middle, _ = self.config.blocks(self.model.n_layers)
        return tuple(r for r in self.prefill if r.stage is Stage.QKV and r.block in middle)

    @property
    def exposures(self) -> tuple[Exposure, ...]:
        """Every un-noised, prompt-dependent message of the configuration (blocks 1-based in ``str``):
        the complement of the releases among the messages the client sends. Empty exactly when every
        message that depends on the prompt or the generated tokens is a release (or a key upload)."""
        cfg, L = self.config, self.model.n_layers
        first, middle, last = cfg.blocks(L)
        guards = (*first, *last)
        p, g = Phase.PREFILL, Phase.GENERATE
        out: list[Exposure] = []

        def clear(phase: Phase, stage: Stage, blocks: Sequence[int], what: str) -> None:
            # a message is exposed in the blocks where the plan has no release for it (MoE: the router's)
            left = tuple(b for b in blocks if self.find_any(stage, b) is None)
            if left:
                out.append(Exposure(phase, stage, left, what))

        def inner(phase: Phase, up: Stage, down: Stage, blocks: Sequence[int]) -> None:
            # a blinded MLP (its first message noised) whose later messages are not (a stage_beta of 0):
            # an MoE layer's experts' gate/up rows, the SwiGLU product. Where the first message is clear
            # the server derives these itself from it, so they add nothing to that exposure.
            moe = self.model.is_moe
            blinded = [b for b in blocks if self.find_any(up, b) is not None]
            rows = tuple(b for b in blinded if moe and self.find(up, b, 0) is None)
            if rows:
                out.append(Exposure(phase, up, rows, "the normalized row before each expert's gate/up map"))
            products = tuple(b for b in blinded if self.find(down, b, 0 if moe else None) is None)
            if products:
                out.append(Exposure(phase, down, products, "the MLP's SwiGLU product before the down map"))

        every = range(L)
        clear(p, Stage.QKV, every, "block input rows, permuted with decoys")
        attn_blocks = every if cfg.attention == "server" else middle
        if attn_blocks:
            out.append(
                Exposure(p, Stage.ATTN, tuple(attn_blocks), "Q, K, V in true row order, head-permuted")
            )
        clear(p, Stage.O, every, "attention output rows, permuted with decoys")
        clear(p, Stage.FFN, every, "residual rows before the MLP, permuted with decoys")
        inner(p, Stage.FFN, Stage.FFN_DOWN, every)
        clear(p, Stage.HEAD, (L,), "final rows, permuted with decoys")
        if cfg.attention == "server" and last:
            out.append(Exposure(p, Stage.LOCK, tuple(last), "locked key cache, row order ρ with decoys"))
        if middle:  # π_i also permutes block i−1's FFN rows (DESIGN §5.1): sharing it orders those too
            ffn = ", ".join(str(i) for i in middle)  # block i−1's FFN, 1-based: i
            what = f"the prompt's valid caches; the shared π orders their QKV rows and blocks {ffn}' FFN rows"
            out.append(Exposure(p, Stage.SHARE, tuple(middle), what))
        client_attn = first if cfg.attention == "server" else guards
        clear(g, Stage.GEN_QKV, client_attn, "the normalized row of the token")
        server_gen_attn = cfg.server_gen_attention(L)
        if server_gen_attn:
            what = "q and the whole cache under a one-time P"
            out.append(Exposure(g, Stage.GEN_ATTN, tuple(server_gen_attn), what))
        if cfg.gen_linear == "server":
            clear(g, Stage.GEN_O, guards, "the attention output of the token")
            clear(g, Stage.GEN_HEAD, (L,), "the final normalized row of the token")
        if cfg.guard_ffn == "clear":
            clear(g, Stage.GEN_FFN, first, "guard-block FFN input in the clear (the paper's form)")
        else:
            clear(g, Stage.GEN_FFN_UP, first, "the normalized row before the MLP")
            inner(g, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, first)
        if cfg.last_ffn == "paper":
            out.append(Exposure(g, Stage.GEN_FFN, tuple(last), "the residual row plus one scalar offset"))
        else:
            clear(g, Stage.GEN_FFN_UP, last, "the normalized row before the MLP")
            inner(g, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, last)
        if middle:
            out.append(
                Exposure(g, Stage.GEN_MID, tuple(middle), "the token's row; the server runs them alone")
            )
        if cfg.attention == "server" and last:
            out.append(Exposure(g, Stage.GEN_LAST, tuple(last), "the row entering the block"))
        return tuple(out)

    def find_any(self, stage: Stage, block: int) -> Release | None:
        """A release of ``stage`` in ``block`` for any expert (an MoE layer's blinded MLP is one message
        per expert; its first stage counts as noised when the router's input is)."""
        if stage in (Stage.FFN, Stage.GEN_FFN_UP) and self.model.is_moe:
            stage = Stage.ROUTER if stage is Stage.FFN else Stage.GEN_ROUTER
        return self._index.get((stage, block, None))

    def find(self, stage: Stage, block: int, expert: int | None = None) -> Release | None:
        """The release sent by ``stage`` of ``block`` (and ``expert``), or None when that message is not
        noised."""
        return self._index.get((stage, block, expert))

"""The one vocabulary of protocol stages (DESIGN §5): every message, server handler, cost-meter entry,
noised release, decoy-pool key and attack refers to a stage by a member of :class:`Stage`.

A stage is a ``str`` enum, so its value is what travels on the wire (``Stage.QKV.value == "qkv"``) and
``Stage("qkv")`` parses it back; a value that names no stage raises ``ValueError``. Nothing else in the
library spells a stage name as a bare string.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["PREFILL_BLOCK_STAGES", "Phase", "Stage"]


class Phase(str, Enum):
    """When a stage runs: session control, the prefill (§5.1–§5.2) or a generation step (§5.3)."""

    CONTROL = "control"
    PREFILL = "prefill"
    GENERATE = "generate"


class Stage(str, Enum):
    """A protocol stage. Values are the wire names; :attr:`phase` says when the stage runs."""

    # control
    OPEN = "open"  # start a session
    CLOSE = "close"  # end a session, free its caches
    # prefill (step −1)
    QKV = "qkv"  # block input rows π_i(X ⊕ R) (+ α_i); the server keeps Z_k, Z_v as the raw cache
    ATTN = "attn"  # Q, K, V after RoPE in true row order under a head-structured permutation
    O = "o"  # attention output rows π′_i(O ⊕ R′) (+ α)
    FFN = "ffn"  # residual rows π_{i+1}(H ⊕ R) (level blind: the blinded gate/up input)
    FFN_DOWN = "ffn_down"  # level blind: the blinded SwiGLU product for W_down
    ROUTER = "router"  # level blind, MoE: the blinded router input
    HEAD = "head"  # final hidden rows, permuted with decoys; the server returns per-row logits
    LOCK = "lock"  # the locked key cache ρ_i(K ⊕ R) of a last guard block
    SHARE = "share"  # key sharing of a middle block (π_i, its commitment salt, α_i at level blind)
    # generation (step t ≥ 0)
    GEN_QKV = "gen_qkv"  # first guard block: the normalized, one-time-blinded row
    GEN_ATTN = "gen_attn"  # first guard block: q and the whole cache under a one-time P_t
    GEN_O = "gen_o"  # guard block (gen_linear="server"): the one-time-blinded attention output for W_o
    GEN_FFN = "gen_ffn"  # guard block FFN input in the clear (paper form)
    GEN_FFN_UP = "gen_ffn_up"  # guard block FFN: blinded gate/up input
    GEN_FFN_DOWN = "gen_ffn_down"  # guard block FFN: blinded SwiGLU product
    GEN_ROUTER = "gen_router"  # guard block FFN, MoE: blinded router input
    GEN_MID = "gen_mid"  # the row entering the middle blocks, which the server runs alone
    GEN_LAST = "gen_last"  # the row entering a last guard block; the server returns scores and z
    GEN_HEAD = "gen_head"  # final norm and LM head of a generated token: client work, or (gen_linear=
    # "server") the one-time-blinded normalized row the server multiplies by the LM head

    def __str__(self) -> str:
        return self.value

    @property
    def phase(self) -> Phase:
        """The phase this stage belongs to."""
        if self in (Stage.OPEN, Stage.CLOSE):
            return Phase.CONTROL
        return Phase.GENERATE if self.value.startswith("gen_") else Phase.PREFILL


#: The per-block prefill stages, in the order they run inside a block (blinded MoE adds ROUTER, which
#: runs before its experts' FFN and FFN_DOWN messages).
PREFILL_BLOCK_STAGES: tuple[Stage, ...] = (
    Stage.QKV,
    Stage.ATTN,
    Stage.O,
    Stage.ROUTER,
    Stage.FFN,
    Stage.FFN_DOWN,
)

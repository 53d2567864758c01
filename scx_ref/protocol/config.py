"""SCX protocol configuration: privacy level, decoys, guard blocks, noise scale, limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from .._checks import check_int, check_real
from ..errors import ConfigError

__all__ = [
    "ATTENTION_SITES",
    "BETA_KINDS",
    "BLIND_DTYPES",
    "F32_BETA_LIMIT",
    "GEN_ATTENTION_SITES",
    "GEN_LINEAR_SITES",
    "LEVELS",
    "MAX_BETA",
    "BetaKind",
    "BlindDtype",
    "Level",
    "SCXConfig",
    "guard_blocks",
    "server_gen_attention",
]

Level = Literal["permute", "paper", "blind"]
#: The dtype of blinded messages (``SCXConfig.blind_dtype``).
BlindDtype = Literal["auto", "backend", "float64"]
#: Its values.
BLIND_DTYPES: tuple[BlindDtype, ...] = ("auto", "backend", "float64")
#: The privacy levels, weakest first.
LEVELS: tuple[Level, ...] = ("permute", "paper", "blind")
#: The kinds of blinded input a per-kind β may be set for (see :mod:`scx_ref.protocol.plan`, whose
#: ``InputKind`` is these and the paper's ``offset``).
BetaKind = Literal["qkv", "o", "gate_up", "down", "router", "lm_head"]
#: Its values.
BETA_KINDS: tuple[BetaKind, ...] = get_args(BetaKind)
#: Where the guard blocks' attention runs (``SCXConfig.attention``).
ATTENTION_SITES: tuple[str, ...] = ("server", "client")
#: Where a generation step's attention of the first guard blocks runs (``SCXConfig.gen_attention``).
GEN_ATTENTION_SITES: tuple[str, ...] = ("client", "server")
#: Where a generation step's W_o of the guard blocks and its LM head run (``SCXConfig.gen_linear``).
GEN_LINEAR_SITES: tuple[str, ...] = ("client", "server")
#: The largest β at which float32 blinded stages were measured within |ΔPPL|/PPL ≤ 1e-5 on SmolLM2 with
#: every linear stage blinded (DESIGN §6; 3.2e-5 at β = 10). ``blind_dtype="auto"`` runs the blinded
#: stages in float64 above it.
F32_BETA_LIMIT = 5.0
#: The largest β a configuration takes: the largest at which the client's own float64 arithmetic on
#: blinded rows stays finite for any model. A Laplace draw is |η| ≤ β·53·ln 2 < 37β (the uniforms are
#: multiples of 2⁻⁵³ and :func:`~scx_ref.transforms.laplace_noise` clips 2|s| at 1 − 2⁻⁵³). The client
#: forms float64 norms of blinded rows x + η and of the server's products on them (‖X̂_i‖, ‖Y_i‖ and the
#: tolerances τ built from them, DESIGN §5.5) through sums of squares, which overflow once a norm passes
#: √(1.8e308) ≈ 1.3e154: τ becomes inf and a correct reply fails its check (an IntegrityError that blames
#: the server; on tests/tiny.py's model every check passes at β = 1e150 and block 0's QKV check fails at
#: 1e154). At β ≤ 1e100 an entry of η is below 3.7e101, so a norm stays below 1.3e154 for any factor up to
#: 3e52 from the row's width, the rows and the weight norms — far above any model. (Exactness is lost long
#: before: x + η keeps x only to float64's spacing near |η|, so past β ≈ 2⁵³·|x|/37 — about 1e14 for
#: activations of size 1 — the result carries nothing of x; that loss is the ΔPPL against β that DESIGN §6
#: measures and reports, not refuses.) The largest β anything here uses is 1e8 (the README's float64 sweep).
MAX_BETA = 1e100


def guard_blocks(n_layers: int, l_s: int, l_e: int) -> tuple[range, range, range]:
    """(first guard, middle, last guard) block ranges, 0-based, for guard sizes l_s, l_e ≥ 1 (DESIGN §5):
    the first ``l_s`` blocks, the last ``l_e`` blocks, and the blocks between. First guards take
    precedence when they overlap."""
    first = range(0, min(l_s, n_layers))
    last_start = max(first.stop, n_layers - l_e)
    return first, range(first.stop, last_start), range(last_start, n_layers)


def server_gen_attention(first: range, attention: str, gen_attention: str) -> range:
    """The first guard blocks ``first`` whose attention the server computes in a generation step (their
    ``gen_attn`` messages): all of them with ``attention="server"`` and ``gen_attention="server"`` (the
    paper), none otherwise. The client's flow and the server's admission of ``gen_attn`` both read it."""
    return first if attention == "server" and gen_attention == "server" else range(0)


@dataclass(frozen=True)
class SCXConfig:
    """How one SCX request is encoded (DESIGN §5).

    level      ``permute``: permutations and decoys, no noise anywhere. ``paper`` (default): noise in
               block 1's QKV stage at prefill and one-time noise on every client-blinded generation
               stage — the paper's choice. ``blind``: noise on every linear stage, with the norms that
               precede them moved to the client.
    r1, r2     decoy rows at the QKV/FFN stages (π_i) and at the O stage (π′_i); ``r_lock`` decoy key
               rows in each locked cache (default r1).
    l_s, l_e   first and last guard blocks (≥ 1). Blocks between them are *middle* blocks whose
               prompt caches the server decodes after key sharing.
    beta       Laplace scale β of every noised stage (DESIGN §6: float32 stays within |ΔPPL|/PPL ≤ 1e-5
               up to β ≈ 5; larger β wants float64).
    stage_beta per-kind overrides of β (keys from :data:`BETA_KINDS`: ``qkv``, ``o``, ``gate_up``,
               ``down``, ``router``, ``lm_head``), e.g. ``{"qkv": 5.0, "o": 50.0}``.
    guard_ffn  first guard blocks' FFN during generation: ``clear`` (the paper: the server sees the
               activation) or ``blinded`` (client norm + additive blinding of the MLP's linear maps).
    last_ffn   last guard blocks' FFN during generation: ``exact`` (client norm + blinded linear maps)
               or ``paper`` (the paper's constant-offset form, which relies on T7 and is NOT exact).
    attention  where the guard blocks' attention runs (DESIGN §5.7): ``server`` (the paper: the server
               gets Q, K, V under a head-structured permutation at prefill, the first guard blocks' whole
               cache under a one-time P at each step, and keeps the last guard blocks' locked key cache)
               or ``client`` (the client keeps every guard block's K and V and computes its attention;
               the server sees only the guard blocks' linear stages). Every block is a guard block when
               ``l_s + l_e`` ≥ the model's blocks: then nothing is key-shared.
    gen_attention where a generation step's attention of the first guard blocks runs when
               ``attention="server"``: ``client`` (default; the client holds q and the block's valid
               cache already and computes the row itself — the paper's one-time head permutation of the
               whole cache costs the client the same O(t·d) reads, and a verified reply is recomputed in
               full anyway) or ``server`` (the paper, DESIGN §5.3: q and the whole cache under a one-time
               P in a ``gen_attn`` message). ``attention="client"`` requires ``client``. Either way the
               result is the exact attention row; ``client`` removes one message per first guard block
               per step and the whole ``gen_attn`` exposure.
    gen_linear where a generation step's W_o of the guard blocks and its LM head run: ``client`` (the
               paper) or ``server`` (sent one-time-blinded as ``gen_o`` / ``gen_head`` messages at levels
               paper and blind — with the corrections from a mask pool the client's online work is an
               add and a subtract).
    blind_dtype the dtype of blinded messages and of the server's products on them: ``backend`` (the
               backend's own), ``float64``, or ``auto`` (float64 when a β of the plan exceeds
               :data:`F32_BETA_LIMIT` and the backend computes in a narrower dtype; else the backend's).
    decoys     decoy policy: ``calibration`` (real-looking rows from a public calibration pool) or
               ``gaussian`` (moment-matched Gaussian, for comparison).
    max_length the most positions (prompt + generated) a session may reach (None: the model's
               ``max_positions``).
    verify     whether the client verifies every reply before using it (DESIGN §5.5,
               :mod:`scx_ref.protocol.verify`; default on). Off only to measure its cost or, in tests,
               to show an attack it stops.

    A bad value of any field is refused (ConfigError naming the field). Integer fields take Python or
    numpy integers (not bools), β's any real number (not a bool) in [0, :data:`MAX_BETA`] (past it the
    client's float64 checks would overflow); they are stored as ``int`` / ``float``,
    and ``stage_beta`` (a mapping) as a dict of its own, so a later change to the caller's mapping does not
    reach the checked configuration.
    """

    level: Level = "paper"
    r1: int = 2
    r2: int = 2
    r_lock: int | None = None
    l_s: int = 1
    l_e: int = 1
    beta: float = 5.0
    stage_beta: Mapping[str, float] | None = None
    guard_ffn: Literal["clear", "blinded"] = "blinded"
    last_ffn: Literal["exact", "paper"] = "exact"
    attention: Literal["server", "client"] = "server"
    gen_attention: Literal["client", "server"] = "client"
    gen_linear: Literal["client", "server"] = "client"
    blind_dtype: BlindDtype = "auto"
    decoys: Literal["calibration", "gaussian"] = "calibration"
    max_length: int | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"level must be one of {LEVELS}, got {self.level!r}")
        for name in ("r1", "r2"):  # numpy integers are stored as int
            object.__setattr__(self, name, check_int(getattr(self, name), name, 0))
        if self.r_lock is not None:
            object.__setattr__(self, "r_lock", check_int(self.r_lock, "r_lock", 0))
        if self.max_length is not None:
            object.__setattr__(self, "max_length", check_int(self.max_length, "max_length", 1))
        for name in ("l_s", "l_e"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 1))
        object.__setattr__(self, "beta", _check_beta(self.beta, "beta"))
        if self.stage_beta is not None:
            if not isinstance(self.stage_beta, Mapping):
                raise ConfigError(
                    f"stage_beta must be a mapping of kind to β or None, got {type(self.stage_beta).__name__}"
                )
            unknown = ", ".join(sorted(repr(k) for k in set(self.stage_beta) - set(BETA_KINDS)))
            if unknown:
                raise ConfigError(f"unknown stage_beta kind(s) [{unknown}]; kinds are {BETA_KINDS}")
            checked = {kind: _check_beta(v, f"stage_beta[{kind!r}]") for kind, v in self.stage_beta.items()}
            object.__setattr__(self, "stage_beta", checked)
        if self.guard_ffn not in ("clear", "blinded"):
            raise ConfigError(f"guard_ffn must be 'clear' or 'blinded', got {self.guard_ffn!r}")
        if self.last_ffn not in ("exact", "paper"):
            raise ConfigError(f"last_ffn must be 'exact' or 'paper', got {self.last_ffn!r}")
        if self.attention not in ("server", "client"):
            raise ConfigError(f"attention must be 'server' or 'client', got {self.attention!r}")
        if self.gen_attention not in GEN_ATTENTION_SITES:
            raise ConfigError(f"gen_attention must be 'client' or 'server', got {self.gen_attention!r}")
        if self.attention == "client" and self.gen_attention == "server":
            raise ConfigError(
                "gen_attention='server' contradicts attention='client' (the client computes every guard "
                "block's attention, in generation as well)"
            )
        if self.gen_linear not in ("client", "server"):
            raise ConfigError(f"gen_linear must be 'client' or 'server', got {self.gen_linear!r}")
        if self.blind_dtype not in BLIND_DTYPES:
            raise ConfigError(f"blind_dtype must be 'auto', 'backend' or 'float64', got {self.blind_dtype!r}")
        if self.decoys not in ("calibration", "gaussian"):
            raise ConfigError(f"decoys must be 'calibration' or 'gaussian', got {self.decoys!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"verify must be True or False, got {self.verify!r}")

    @property
    def lock_decoys(self) -> int:
        return self.r1 if self.r_lock is None else self.r_lock

    def beta_for(self, kind: str) -> float:
        """β of a blinded input of ``kind`` (its ``stage_beta`` override, else ``beta``)."""
        if self.stage_beta is not None and kind in self.stage_beta:
            return float(self.stage_beta[kind])
        return float(self.beta)

    def blocks(self, n_layers: int) -> tuple[range, range, range]:
        """(first guard, middle, last guard) block ranges of an ``n_layers`` model (:func:`guard_blocks`)."""
        return guard_blocks(n_layers, self.l_s, self.l_e)

    def server_gen_attention(self, n_layers: int) -> range:
        """The first guard blocks whose attention the server computes in a generation step
        (:func:`server_gen_attention` of this configuration on an ``n_layers`` model)."""
        return server_gen_attention(self.blocks(n_layers)[0], self.attention, self.gen_attention)

    @property
    def max_beta(self) -> float:
        """The largest β any blinded input kind may get (``beta`` and every ``stage_beta`` value)."""
        return max([float(self.beta), *(float(v) for v in (self.stage_beta or {}).values())])

    def wide_blinding(self, backend_itemsize: int) -> bool:
        """Whether blinded messages travel and are multiplied in float64 on a backend whose dtype has
        ``backend_itemsize`` bytes: ``blind_dtype="float64"``, or ``auto`` with a β above
        :data:`F32_BETA_LIMIT` on a backend narrower than float64 (DESIGN §5.7, §6)."""
        if backend_itemsize >= 8 or self.blind_dtype == "backend":
            return False
        return self.blind_dtype == "float64" or self.max_beta > F32_BETA_LIMIT

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stage_beta"] = None if self.stage_beta is None else dict(self.stage_beta)
        return out


def _check_beta(value: Any, name: str) -> float:
    """``value`` as a float: a real number (Python or numpy, not a bool) in [0, :data:`MAX_BETA`];
    ConfigError naming ``name`` otherwise (:func:`~scx_ref._checks.check_real`)."""
    return check_real(value, name, 0, MAX_BETA)

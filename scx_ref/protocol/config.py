"""SCX protocol configuration: privacy level, decoys, guard blocks, noise scale, limits."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from .._checks import check_int, check_real
from ..backends.base import UNIT_ROUNDOFF, float_dtype_name
from ..errors import ConfigError, PrecisionWarning

__all__ = [
    "ATTENTION_SITES",
    "BETA_KINDS",
    "BLIND_DTYPES",
    "F32_BETA_LIMIT",
    "F64_BETA_LIMIT",
    "GEN_ATTENTION_SITES",
    "GEN_LINEAR_SITES",
    "LEVELS",
    "MAX_BETA",
    "WIDE_BETA_LIMIT",
    "BetaKind",
    "BlindDtype",
    "Level",
    "SCXConfig",
    "beta_limit",
    "guard_blocks",
    "server_gen_attention",
]

Level = Literal["permute", "paper", "blind"]
#: The dtype of blinded messages (``SCXConfig.blind_dtype``).
BlindDtype = Literal["auto", "backend", "float64"]
#: Its values.
BLIND_DTYPES: tuple[BlindDtype, ...] = ("auto", "backend", "float64")
#: The privacy levels, weakest first.
LEVELS: tuple[Level, ...] = get_args(Level)
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
#: How the first guard blocks' MLP stages are sent (``SCXConfig.guard_ffn``).
GuardFFN = Literal["clear", "blinded"]
#: Its values.
GUARD_FFN: tuple[GuardFFN, ...] = get_args(GuardFFN)
#: The largest β at which float32 blinded stages keep |ΔPPL|/PPL ≤ 1e-5 on SmolLM2 with every linear stage
#: blinded, read off the largest of many key draws, with room to spare (``python -m models.blind_draws``,
#: README "How large β may be"; one draw is one sample of blinding's rounding, whose spread grows with β):
#: at β = 1 the largest of 26 draws is 3.9e-6; β = 2 stays within in every draw but reaches 9.5e-6; β = 3,
#: 4 and 5 leave the bound in 5 of 26, 4 of 18 and 7 of 26 draws (up to 2.7e-5). DESIGN §6's "up to β ≈ 5"
#: was one 256-token draw of level ``blind``, and this limit was 5 until stop 70. ``blind_dtype="auto"``
#: runs the blinded stages of a float32 run in float64 above it (of a bfloat16 or float16 run above
#: :func:`beta_limit` of that dtype, this limit scaled by the unit roundoffs).
F32_BETA_LIMIT = 1.0
#: The largest β at which a float32 (or narrower) run whose blinded stages run in float64
#: (``blind_dtype="float64"``, or ``"auto"`` above the run dtype's own limit) keeps float32's bound
#: |ΔPPL|/PPL ≤ 1e-5. Blinding's rounding is that of x + η: x survives only to the spacing near |η|, so
#: it grows as u·β, and float64's limit is float32's times u₃₂/u₆₄ = 2²⁹: 1·2²⁹ ≈ 5.4e8, rounded down;
#: measured there, the largest of 6 draws is 3.1e-6 (7.9e-7 at 1e8), the same room as float32's at β = 1.
WIDE_BETA_LIMIT = 5e8
#: The largest β at which a float64 run keeps float64's bound |ΔPPL|/PPL ≤ 1e-9: the same scaling, 1·2²⁹
#: for the bound 1e-5, times 1e-9/1e-5, is 5.4e4, rounded down. Measured on float64 runs: the largest of
#: 8 draws is 2.0e-10 at 5e4 and of 6 is 6.1e-10 at 1e5, and 3e5 (this limit until stop 70, after one
#: draw's 8.6e-10) leaves the bound in 4 of 6 draws (up to 2.3e-9).
F64_BETA_LIMIT = 5e4
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
#: measures and reports, not refuses: :meth:`SCXConfig.precision_warning` says when a β is past the limit
#: of its dtype.) The largest β anything here uses is 1e8 (the README's float64 sweep).
MAX_BETA = 1e100


def _dtype_name(dtype: Any) -> str:
    """The name of a numpy or torch floating dtype a backend computes in (or of the name itself):
    ``float64``, ``float32``, ``bfloat16`` or ``float16``; ConfigError for anything else."""
    name = float_dtype_name(dtype)
    if name is None:
        raise ConfigError(f"backend dtype must be one of {tuple(UNIT_ROUNDOFF)}, got {dtype!r}")
    return name


def beta_limit(backend_dtype: Any, blinded_dtype: Any) -> float:
    """The largest β at which blinded stages computed in ``blinded_dtype`` keep the exactness measured for
    a run in ``backend_dtype`` (numpy or torch dtypes, or their names; ConfigError for another):
    :data:`F64_BETA_LIMIT` for a float64 run (its bound 1e-9), :data:`WIDE_BETA_LIMIT` for float64 blinded
    stages of a narrower run (float32's bound 1e-5), and for stages blinded in the run's own narrower
    dtype :data:`F32_BETA_LIMIT` scaled by the unit roundoffs u₃₂/u (1 in float32; 1.5e-5 in bfloat16 and
    1.2e-4 in float16, whose blinding the project has not measured: float32's bound is the one held)."""
    run, blinded = _dtype_name(backend_dtype), _dtype_name(blinded_dtype)
    if blinded == "float64":
        return F64_BETA_LIMIT if run == "float64" else WIDE_BETA_LIMIT
    if blinded != run:
        raise ConfigError(f"blinded stages run in the backend's dtype or float64, not {blinded} on {run}")
    return F32_BETA_LIMIT * UNIT_ROUNDOFF["float32"] / UNIT_ROUNDOFF[run]


def guard_blocks(n_layers: int, l_s: int, l_e: int) -> tuple[range, range, range]:
    """(first guard, middle, last guard) block ranges, 0-based, for guard sizes l_s, l_e ≥ 1 (DESIGN §5):
    the first ``l_s`` blocks, the last ``l_e`` blocks, and the blocks between. First guards take
    precedence when they overlap; guards larger than the model are clamped to its blocks. ConfigError
    unless ``n_layers``, ``l_s`` and ``l_e`` are integers >= 1 (Python or numpy, not bools)."""
    n_layers = check_int(n_layers, "n_layers", 1)
    l_s, l_e = check_int(l_s, "l_s", 1), check_int(l_e, "l_e", 1)
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
               up to β ≈ 5; larger β wants float64). A β past its dtype's limit is taken, not refused;
               :meth:`precision_warning` says so (a :class:`~scx_ref.errors.PrecisionWarning`).
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
               backend's own), ``float64``, or ``auto`` (float64 when :attr:`max_beta` — every β of the
               configuration, used by the plan or not — exceeds :func:`beta_limit` of the backend's own
               dtype (:data:`F32_BETA_LIMIT` on float32, 1.5e-5 on bfloat16, 1.2e-4 on float16) and the
               backend computes in a narrower dtype than float64; else the backend's: :meth:`wide_blinding`).
    decoys     decoy policy: ``calibration`` (real-looking rows from a public calibration pool) or
               ``gaussian`` (moment-matched Gaussian, for comparison).
    max_length the most positions (prompt + generated) a session may reach (None: the model's
               ``max_positions``).
    verify     whether the client verifies every reply before using it (DESIGN §5.5,
               :mod:`scx_ref.protocol.verify`; default on). Off only to measure its cost or, in tests,
               to show an attack it stops.

    A bad value of any field is refused (ConfigError naming the field). Integer fields take Python or
    numpy integers (not bools), β's any real number (not a bool) in [0, :data:`MAX_BETA`] (past it the
    client's float64 checks would overflow); they are stored as ``int`` / ``float``; the named choices
    (``level``, ``attention``, ...) take only strings, stored as ``str``; and ``stage_beta`` (a mapping) as a
    read-only mapping of its own, so neither a later change to the caller's mapping nor one through the
    configuration reaches the checked configuration (or its hash).
    """

    level: Level = "paper"
    r1: int = 2
    r2: int = 2
    r_lock: int | None = None
    l_s: int = 1
    l_e: int = 1
    beta: float = 5.0
    stage_beta: Mapping[str, float] | None = None
    guard_ffn: GuardFFN = "blinded"
    last_ffn: Literal["exact", "paper"] = "exact"
    attention: Literal["server", "client"] = "server"
    gen_attention: Literal["client", "server"] = "client"
    gen_linear: Literal["client", "server"] = "client"
    blind_dtype: BlindDtype = "auto"
    decoys: Literal["calibration", "gaussian"] = "calibration"
    max_length: int | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        _choice(self, "level", LEVELS, f"one of {LEVELS}")
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
            checked = {str(k): _check_beta(v, f"stage_beta[{k!r}]") for k, v in self.stage_beta.items()}
            object.__setattr__(self, "stage_beta", _Betas(checked))
        _choice(self, "guard_ffn", GUARD_FFN, "'clear' or 'blinded'")
        _choice(self, "last_ffn", ("exact", "paper"), "'exact' or 'paper'")
        _choice(self, "attention", ATTENTION_SITES, "'server' or 'client'")
        _choice(self, "gen_attention", GEN_ATTENTION_SITES, "'client' or 'server'")
        if self.attention == "client" and self.gen_attention == "server":
            raise ConfigError(
                "gen_attention='server' contradicts attention='client' (the client computes every guard "
                "block's attention, in generation as well)"
            )
        _choice(self, "gen_linear", GEN_LINEAR_SITES, "'client' or 'server'")
        _choice(self, "blind_dtype", BLIND_DTYPES, "'auto', 'backend' or 'float64'")
        _choice(self, "decoys", ("calibration", "gaussian"), "'calibration' or 'gaussian'")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"verify must be True or False, got {self.verify!r}")

    def __hash__(self) -> int:
        """A hash agreeing with ``==`` (``stage_beta``, a mapping, by its items), so every configuration can
        key a dict or join a set."""
        stage_beta = None if self.stage_beta is None else frozenset(self.stage_beta.items())
        values = (stage_beta if f.name == "stage_beta" else getattr(self, f.name) for f in fields(self))
        return hash(tuple(values))

    @property
    def lock_decoys(self) -> int:
        """Decoy key rows in each locked cache: ``r_lock``, or ``r1`` where it is None."""
        return self.r1 if self.r_lock is None else self.r_lock

    def beta_for(self, kind: str) -> float:
        """β of a blinded input of ``kind`` (its ``stage_beta`` override, else ``beta``); ConfigError for a
        kind outside :data:`BETA_KINDS` (a misspelt kind must not silently get ``beta``)."""
        if not isinstance(kind, str) or kind not in BETA_KINDS:
            raise ConfigError(f"unknown β kind {kind!r:.40}; kinds are {BETA_KINDS}")
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
    def offset_beta(self) -> float:
        """The scale of the paper's last-block offset (``last_ffn="paper"``): ``beta`` at levels paper and
        blind, at least 1 (also at level permute, where nothing else is noised)."""
        return max(float(self.beta) if self.level != "permute" else 0.0, 1.0)

    @property
    def max_beta(self) -> float:
        """The largest β any blinded input kind may get (``beta`` and every ``stage_beta`` value)."""
        return max([float(self.beta), *(float(v) for v in (self.stage_beta or {}).values())])

    def wide_blinding(self, backend_dtype: Any) -> bool:
        """Whether blinded messages travel and are multiplied in float64 on a backend computing in
        ``backend_dtype`` (a numpy or torch floating dtype or its name): ``blind_dtype="float64"``, or
        ``auto`` with a β above :func:`beta_limit` of the backend's own dtype (:data:`F32_BETA_LIMIT` on
        float32, 1.5e-5 on bfloat16, 1.2e-4 on float16) on a backend narrower than float64 — so that
        ``auto`` blinds in the backend's dtype only where that dtype keeps the measured exactness (DESIGN
        §5.7, §6).
        ConfigError for another dtype."""
        run = _dtype_name(backend_dtype)
        if run == "float64" or self.blind_dtype == "backend":
            return False
        return self.blind_dtype == "float64" or self.max_beta > beta_limit(run, run)

    def precision_warning(self, backend_dtype: Any, betas: Iterable[float] | None = None) -> str | None:
        """Why a session of this configuration on a backend computing in ``backend_dtype`` (a numpy or
        torch floating dtype, or its name: float64, float32, bfloat16, float16) is not as exact as the
        project measured — or None when it is. Nothing is refused: the message says the β, the dtypes,
        the rounding to expect and the fix.

        The blinded stages run in float64 on a float64 backend or where :meth:`wide_blinding` says so,
        else in ``backend_dtype``; the message is returned when the largest β of ``betas`` exceeds
        :func:`beta_limit` of the two (float32 blinded stages above :data:`F32_BETA_LIMIT`, float64 ones
        above :data:`WIDE_BETA_LIMIT`, or above :data:`F64_BETA_LIMIT` on a float64 run; bfloat16 and
        float16 blinded stages — ``blind_dtype="backend"`` — at nearly any β). ``betas``: the β of every
        blinded message — the client's :class:`~scx_ref.protocol.plan.ReleasePlan` releases; None: this
        configuration's own, without the model (none at level ``permute`` with ``last_ffn="exact"``; else
        :attr:`max_beta`, and :attr:`offset_beta` for the paper's offset). No blinded message (β = 0, level
        ``permute``): None.

        ConfigError for another dtype or a β outside [0, :data:`MAX_BETA`]."""
        run = _dtype_name(backend_dtype)
        if betas is None:
            noised = self.level != "permute"
            own = [self.max_beta] if noised else []
            betas = own + ([self.offset_beta] if self.last_ffn == "paper" else [])
        beta = max([0.0, *(_check_beta(b, "betas") for b in betas)])
        if beta == 0.0:
            return None
        blinded = "float64" if run == "float64" or self.wide_blinding(run) else run
        limit = beta_limit(run, blinded)
        if beta <= limit:
            return None
        u = UNIT_ROUNDOFF[blinded]
        if run == "float64":
            held = f"the project measured float64 runs within |ΔPPL|/PPL ≤ 1e-9 only up to β = {limit:.2g}"
        elif blinded == "float64":
            held = f"float64 blinding keeps float32's |ΔPPL|/PPL ≤ 1e-5 only up to β = {limit:.2g}"
        elif run == "float32":
            held = (
                f"the project measured float32 blinding within |ΔPPL|/PPL ≤ 1e-5 only up to β = {limit:.2g}"
            )
        else:  # bfloat16 / float16: not measured; float32's limit scaled by the unit roundoffs
            held = (
                f"{run} blinding was not measured: its rounding is {u / UNIT_ROUNDOFF['float32']:g} "
                f"times float32's, measured within |ΔPPL|/PPL ≤ 1e-5 only up to β = {F32_BETA_LIMIT:g}, so "
                f"the same bound needs β ≤ {limit:.2g}"
            )
        lost = " (entries of size 1 are lost entirely)" if u * beta >= 1 else ""
        if blinded == "float64":
            fix = f"a β ≤ {limit:.2g}"
        elif beta <= WIDE_BETA_LIMIT:
            fix = f"blind_dtype='float64' (or a β ≤ {limit:.2g})"
        else:
            fix = f"a β ≤ {limit:.2g}, or blind_dtype='float64' with a β ≤ {WIDE_BETA_LIMIT:.2g}"
        return (
            f"β = {beta:.3g} with the blinded stages in {blinded} on a {run} backend "
            f"(blind_dtype={self.blind_dtype!r}) is not exact: x + η keeps x only to {blinded}'s spacing "
            f"near |η| ~ β, about {u * beta:.1e} per entry{lost}; {held} (README, 'How large β may be'), and "
            f"every reply check still passes. Use {fix}."
        )

    def warn_precision(
        self, backend_dtype: Any, betas: Iterable[float] | None = None, *, stacklevel: int = 2
    ) -> str | None:
        """Issue :meth:`precision_warning` as a :class:`~scx_ref.errors.PrecisionWarning` (``stacklevel``
        as :func:`warnings.warn`'s, counted from the caller), if there is one; return its message."""
        message = self.precision_warning(backend_dtype, betas)
        if message is not None:
            warnings.warn(message, PrecisionWarning, stacklevel=stacklevel + 1)
        return message

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (``stage_beta`` a dict of its own); ``SCXConfig(**to_dict())`` == self"""
        out = asdict(self)
        out["stage_beta"] = None if self.stage_beta is None else dict(self.stage_beta)
        return out


class _Betas(Mapping[str, float]):
    """``SCXConfig.stage_beta`` once checked: a read-only mapping kind → β (equal to a dict of the same
    items, shown as one), so a configuration cannot be changed after its validation."""

    def __init__(self, items: dict[str, float]) -> None:
        self._items = items

    def __getitem__(self, kind: str) -> float:
        return self._items[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


def _choice(config: SCXConfig, name: str, choices: tuple[str, ...], shown: str) -> None:
    """Check the named choice ``name`` of ``config``: a string among ``choices`` (stored as ``str``: a
    numpy string too; never an array, whose ``==`` would pass a one-element one); ConfigError otherwise."""
    value = getattr(config, name)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be {shown}, got {value!r}")
    object.__setattr__(config, name, str(value))


def _check_beta(value: Any, name: str) -> float:
    """``value`` as a float: a real number (Python or numpy, not a bool) in [0, :data:`MAX_BETA`];
    ConfigError naming ``name`` otherwise (:func:`~scx_ref._checks.check_real`)."""
    return check_real(value, name, 0, MAX_BETA)

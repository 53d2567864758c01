"""Run every attack on SCX server views, one mechanism varied at a time, against a plaintext control.

:func:`server_view` is the one way a view is built (here and in the tests): a real SCX request through the
protocol engine (:class:`~scx_ref.protocol.Client` → :class:`~scx_ref.protocol.LocalTransport` with
``record_view=True`` → :class:`~scx_ref.protocol.Server`). A mechanism is switched off by a key schedule
whose permutations of that key role are the identity (:class:`AblatedKeys`) — so the engine also runs
ablations such as "token permutation on, head permutation off". The *plaintext control*
(:func:`plaintext_control`) switches every permutation off, with no decoys and no noise (level
``permute``, r = 0): the server sees the plaintext rows, so each attack must succeed there. Scoring uses
the victim's true tokens; the attacks never see them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import token_ids
from ..backends.numpy_backend import NumpyBackend
from ..errors import ConfigError, ShapeError
from ..keys import KeySchedule, Label
from ..protocol import Client, LocalTransport, SCXConfig, Server, ServerView, Stage
from ..protocol.cost import CostReport, StageCost
from ..protocol.decoys import CalibrationPool, DecoyPolicy
from ..protocol.plan import ReleasePlan
from ..protocol.presets import PAPER_CONFIG, PRESETS
from ..reference import ReferenceModel
from ..stages import Phase
from ..transforms import laplace_noise
from ..weights import ModelWeights
from . import (
    bruteforce,
    catalog,
    decoy_detect,
    inversion,
    llm_reorder,
    multiview,
    statelessness,
    vocab_match,
)
from ._model import float_arg, forward_trace, int_arg
from ._view import message, prompt_length, raw_qkv, shared_caches, stage_array
from .stats import FrequencyPrior, Rate, at_baseline, bag_hits

__all__ = [
    "KEY_ROLES",
    "AblatedKeys",
    "Context",
    "RequestRun",
    "Setting",
    "default_settings",
    "fit_tools",
    "frontier_settings",
    "noise_fitting",
    "plaintext_control",
    "probe_block",
    "run_all",
    "run_request",
    "run_setting",
    "server_view",
]

Array = npt.NDArray[Any]
Progress = Callable[[str], None]


#: The permutation roles of the client's key labels (label[0], DESIGN §3): ``tok`` the token
#: permutations π_i, π′_i (with decoys), ``head`` the head-structured P_i, ``lock`` the locked caches' ρ_i.
#: These are key-schedule roles, not protocol stages.
KEY_ROLES: frozenset[str] = frozenset({"tok", "head", "lock"})


def _roles(identity: Any) -> frozenset[str]:
    """``identity`` as a frozenset of :data:`KEY_ROLES` (ConfigError for a string — ``"tok"`` would read as
    the roles t, o, k — anything that is not a set of role names, or an unknown role)."""
    if isinstance(identity, str) or not isinstance(identity, (set, frozenset)):
        raise ConfigError(f"the identity roles must be a set of role names, got {type(identity).__name__}")
    unknown = sorted(str(r) for r in identity - KEY_ROLES)
    if unknown:
        raise ConfigError(f"unknown permutation roles {unknown}; known: {sorted(KEY_ROLES)}")
    return frozenset(identity)


class AblatedKeys(KeySchedule):
    """A key schedule whose permutations of the roles in ``identity`` (a subset of :data:`KEY_ROLES`)
    are the identity — to switch one SCX mechanism off in the real engine. Every other key (noise,
    decoy choice, the other roles' permutations) is the plain :class:`KeySchedule`'s."""

    def __init__(self, master: bytes, nonce: bytes, identity: frozenset[str]) -> None:
        identity = _roles(identity)
        super().__init__(master, nonce)
        self.identity = identity
        self._m = master

    def for_nonce(self, nonce: bytes) -> AblatedKeys:
        """The same ablated schedule under another nonce (the client derives each session's keys so)."""
        return self._adopt(AblatedKeys(self._m, nonce, self.identity))

    def permutation(self, label: Label, n: int) -> npt.NDArray[np.int64]:
        """The identity of size n when the label's role is ablated, else the schedule's permutation."""
        if str(label[0]) in self.identity:
            return np.arange(n, dtype=np.int64)
        return super().permutation(label, n)


@dataclass(frozen=True)
class Setting:
    """One configuration: the engine's SCXConfig and the permutation roles switched off. ``stateless``
    and ``reorder``: also run the statelessness table and the LLM reordering (the slow attacks) here.
    Checked when made (ConfigError): ``name`` and ``mechanism`` are texts, ``config`` an SCXConfig,
    ``identity`` a set of :data:`KEY_ROLES`, ``stateless`` and ``reorder`` true/false (the text "False" would
    run the slow attacks) and ``preset`` a name or None (a run of many settings would otherwise fail only
    when the bad one's turn came)."""

    name: str
    mechanism: str
    config: SCXConfig
    identity: frozenset[str] = frozenset()
    stateless: bool = False
    reorder: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, SCXConfig):
            raise ConfigError(f"a setting's config must be an SCXConfig, got {type(self.config).__name__}")
        if not isinstance(self.name, str) or not isinstance(self.mechanism, str):
            raise ConfigError(
                f"a setting's name and mechanism must be texts, got {type(self.name).__name__} and "
                f"{type(self.mechanism).__name__}"
            )
        if not isinstance(self.stateless, bool) or not isinstance(self.reorder, bool):
            raise ConfigError(
                f"a setting's stateless and reorder must be true/false, got {self.stateless!r:.20} and "
                f"{self.reorder!r:.20}"
            )
        if self.preset is not None and not isinstance(self.preset, str):
            raise ConfigError(f"a setting's preset must be a name or None, got {self.preset!r:.40}")
        object.__setattr__(self, "identity", _roles(self.identity))


def plaintext_control() -> Setting:
    """The setting under which the server sees plaintext: level ``permute`` (no noise), no decoys
    (r1 = r2 = r_lock = 0) and every permutation role the identity. Every stage's rows then equal the
    plaintext forward's, so an attack that fails here is broken, not defeated by SCX."""
    config = SCXConfig(level="permute", r1=0, r2=0, r_lock=0, gen_attention="server")
    return Setting("plaintext", "none (control)", config, KEY_ROLES, stateless=True, reorder=True)


def default_settings(quick: bool = False) -> list[Setting]:
    """Plaintext control, then one mechanism added at a time, a β sweep, a decoy-count sweep, level
    ``blind`` and guard sizes (``quick``: the same mechanisms, fewer sweep points)."""
    paper = PAPER_CONFIG
    control = plaintext_control()
    perm0 = control.config
    head = frozenset({"head"})
    s = [
        control,
        Setting("tok-perm", "token permutation", perm0, head, reorder=True),
        Setting("+decoys", "+ decoys r=4", replace(perm0, r1=4, r2=4, r_lock=None), head, reorder=True),
        Setting(
            "perm r=16", "permute, decoys r=16", replace(perm0, r1=16, r2=16, r_lock=None), head, reorder=True
        ),
        Setting("+head-perm", "+ head-dim permutation", replace(perm0, r1=4, r2=4, r_lock=None)),
        Setting("paper b=5", "+ Laplace β=5 (block-1 QKV)", paper, stateless=True, reorder=True),
        Setting("paper b=0.1", "Laplace β=0.1", replace(paper, beta=0.1)),
        Setting("paper b=1", "Laplace β=1", replace(paper, beta=1.0)),
        Setting("paper b=20", "Laplace β=20", replace(paper, beta=20.0)),
        Setting(
            "blind b=5", "level blind β=5 (every linear stage)", replace(paper, level="blind"), stateless=True
        ),
        Setting("guards 2", "guards l_s=l_e=2 (β=5)", replace(paper, l_s=2, l_e=2), stateless=True),
    ]
    if not quick:
        s += [
            Setting("paper b=100", "Laplace β=100", replace(paper, beta=100.0)),
            Setting("perm r=64", "permute, decoys r=64", replace(perm0, r1=64, r2=64, r_lock=None), head),
            Setting(
                "blind b=20", "level blind β=20", replace(paper, level="blind", beta=20.0), stateless=True
            ),
        ]
    return s


@dataclass
class RequestRun:
    """One real SCX request as the harness records it: the server's ``view``, the ``generated`` tokens,
    the prefill ``logits`` the client decoded, the session's cost report (client and server meters and
    the link's bytes), the bytes of the client's own per-request state (its guard caches), and the prefill's
    token permutations π_0 … π_L (``token_perms``) — the ground truth that scores decoy detection, never
    shown to an attack: row j of block i's QKV-stage message holds a real token iff π_i[j] < n, of its
    FFN-stage message iff π_{i+1}[j] < n (:func:`~scx_ref.transforms.encode_rows`)."""

    view: ServerView
    generated: list[int]
    logits: Array
    cost: CostReport
    client_state_bytes: int
    token_perms: tuple[npt.NDArray[np.int64], ...]


def run_request(
    weights: ModelWeights,
    ids: npt.ArrayLike,
    config: SCXConfig,
    identity: frozenset[str] = frozenset(),
    *,
    n_new: int = 0,
    seed: int = 0,
    public: Array | None = None,
    decoys: DecoyPolicy | None = None,
) -> RequestRun:
    """One real SCX request under ``config`` — prefill of ``ids``, key sharing when the configuration
    has middle blocks, ``n_new`` greedy tokens (the same as plaintext greedy decoding) — run by
    :class:`~scx_ref.protocol.Client` and :class:`~scx_ref.protocol.Server` (numpy, float64) over a
    recording :class:`~scx_ref.protocol.LocalTransport`. Keys derive from ``seed`` only; the permutation
    roles in ``identity`` are the identity (:class:`AblatedKeys`). ``decoys``: a calibration pool built
    once (else the client builds one from ``public``, a plaintext forward over it — the slow part).
    ConfigError unless ``seed`` is an integer (a Generator's text would make unrepeatable keys) and
    ``n_new`` ≥ 0; VocabularyError unless ``ids`` (and ``public``) are 1-D integer ids of the model's
    vocabulary (a float is refused, never truncated to another token)."""
    seed, n_new = int_arg(seed, "seed", None), int_arg(n_new, "n_new")
    vocab = weights.config.vocab_size
    # float ids would be truncated to other tokens (the view would be of another prompt than the caller's)
    prompt = np.asarray(token_ids(ids, vocab, allow_empty=True), dtype=np.int64)
    tokens = None
    if public is not None:
        tokens = np.asarray(token_ids(public, vocab, allow_empty=True), dtype=np.int64)
    backend = NumpyBackend(weights, np.float64)
    master = hashlib.sha256(f"scx-attack-{seed}".encode()).digest()
    nonce = hashlib.sha256(f"nonce-{seed}".encode()).digest()[:16]
    keys = AblatedKeys(master, nonce, identity)
    server = Server(backend)
    link = LocalTransport(server, record_view=True)
    client = Client(backend, keys, config, decoys=decoys, public_tokens=tokens)
    # the one-time masks come from an offline pool entry (the view is the same as without one: its nonce
    # is the schedule's, and tests/test_hardened.py checks the messages are byte-identical); the cost
    # report then separates the client's online work from the corrections η·W derived ahead
    entry = client._new_prepared(keys.nonce, len(prompt))
    entry.fill(max(n_new - 1, 0))
    perms = tuple(entry.token_perm(i).forward for i in range(weights.config.n_layers + 1))
    client._prepared = entry
    logits = np.asarray(client.prefill(prompt, link, nonce=keys.nonce))
    gen: list[int] = []
    nxt = int(np.argmax(logits[-1]))
    for step in range(n_new):  # greedy, as Client.generate
        gen.append(nxt)
        if step + 1 < n_new:
            nxt = int(np.argmax(client.decode(nxt, link)))
    st = client.state
    held = 0 if st is None else sum(int(a.nbytes) for a in (*st.guard_k.values(), *st.guard_v.values()))
    cost = client.cost_report(link, server.cost(client.session))
    return RequestRun(link.view, gen, logits, cost, held, perms)


def frontier_settings(n_layers: int) -> list[Setting]:
    """The plaintext control, then every named configuration of
    :data:`~scx_ref.protocol.presets.PRESETS` on a model of ``n_layers`` blocks (the frontier: each
    with the statelessness test). LLM reordering — a weak attack here, whose beam search costs minutes per
    48-token prompt — runs in the mechanism ablation (:func:`default_settings`), not on the frontier."""
    out = [replace(plaintext_control(), reorder=False)]
    for p in PRESETS:
        out.append(Setting(p.name, p.summary, p.config(n_layers), stateless=True, preset=p.name))
    return out


def server_view(
    weights: ModelWeights,
    ids: npt.ArrayLike,
    config: SCXConfig,
    identity: frozenset[str] = frozenset(),
    *,
    n_new: int = 0,
    seed: int = 0,
    public: Array | None = None,
    decoys: DecoyPolicy | None = None,
) -> tuple[ServerView, list[int]]:
    """The server's recorded view of one real SCX request and the generated tokens
    (:func:`run_request`, whose arguments these are)."""
    run = run_request(weights, ids, config, identity, n_new=n_new, seed=seed, public=public, decoys=decoys)
    return run.view, run.generated


@dataclass
class Context:
    """Model, public text, and the attacker's fitted tools (shared by every setting).

    ``traces``: plaintext forwards of the public text in windows of ``window`` tokens, run once; they
    feed both the client's calibration pool (:meth:`decoys`) and the attacker's inverters."""

    weights: ModelWeights
    public: Array
    lm: llm_reorder.LanguageModel | None
    window: int = 64
    inverters: dict[str, Any] = field(default_factory=dict)
    middle_ref: dict[int, Array] = field(default_factory=dict)
    tables: vocab_match.Block1Tables | None = None
    _traces: list[Any] | None = None
    _pool: CalibrationPool | None = None
    _prior: FrequencyPrior | None = None
    _vocabulary: Array | None = None

    @property
    def vocabulary(self) -> Array:
        """:func:`~.inversion.unit_vocabulary` of the model, computed once: the targets and decoding table
        of every inverter fitted in this context (one V × d copy, where each fit used to make its own)."""
        if self._vocabulary is None:
            self._vocabulary = inversion.unit_vocabulary(self.weights)
        return self._vocabulary

    #: The prefixes of the inverters fitted for one configuration's messages — the joint inverters of its
    #: views (:func:`_joint`) and the noise-aware inverters of its β (:func:`_noisy_inverter`), whose keys
    #: are built from them — as opposed to the plaintext tools of :func:`fit_tools`.
    JOINT_FIT: ClassVar[str] = "joint/"
    NOISY_FIT: ClassVar[str] = "ffn-noisy/"
    SETTING_FITS: ClassVar[tuple[str, ...]] = (JOINT_FIT, NOISY_FIT)

    def forget_setting_fits(self) -> int:
        """Drop the inverters fitted for one configuration (:attr:`SETTING_FITS`) and return how many: a
        run of many configurations holds one configuration's at a time (on SmolLM2, `hardened`'s fits,
        every block a guard block, held ~1.5 GB). A later setting that asks for one again refits it to
        the same values — its noise is drawn from a fixed seed (the view's block for the noise-aware
        inverter, 0 for a joint one), never from the order the settings ran in."""
        gone = [k for k in self.inverters if k.startswith(self.SETTING_FITS)]
        for k in gone:
            del self.inverters[k]
        return len(gone)

    @property
    def prior(self) -> FrequencyPrior:
        """The unigram prior of the public text (the attacker's knowledge without a view)."""
        if self._prior is None:
            self._prior = FrequencyPrior(self.public, self.weights.config.vocab_size)
        return self._prior

    @property
    def traces(self) -> list[Any]:
        """Per-window plaintext traces of the public text (computed once); ConfigError unless the window
        is ≥ 1 and the public text holds at least one window."""
        if self._traces is None:
            w = int_arg(self.window, "window", 1)
            if len(self.public) < w:
                raise ConfigError(f"{len(self.public)} public tokens hold no window of {w}")
            self._traces = [
                forward_trace(self.weights, self.public[s : s + w], logits=False)
                for s in range(0, len(self.public) - w + 1, w)
            ]
        return self._traces

    @property
    def public_tokens(self) -> Array:
        """The public tokens the traces cover, in order."""
        return np.asarray(self.public[: len(self.traces) * self.window])

    def decoys(self) -> CalibrationPool:
        """The client's calibration pool (DESIGN §5.1) from the public traces: block inputs
        (:attr:`Stage.QKV`), post-RoPE keys (:attr:`Stage.LOCK`: the locked caches' decoys), attention outputs
        (:attr:`Stage.O`), residuals before the MLP (:attr:`Stage.FFN`) and final residuals
        (:attr:`Stage.HEAD`) — the rows :meth:`CalibrationPool.from_tokens` records, built once per model
        instead of once per request."""
        if self._pool is None:
            rows: dict[tuple[Stage, int], list[Array]] = {}
            for t in self.traces:
                for i in range(self.weights.config.n_layers):
                    rows.setdefault((Stage.QKV, i), []).append(t.x[i])
                    rows.setdefault((Stage.LOCK, i), []).append(t.k[i].reshape(len(t.k[i]), -1))
                    rows.setdefault((Stage.O, i), []).append(t.o[i])
                    rows.setdefault((Stage.FFN, i), []).append(t.h[i])
                rows.setdefault((Stage.HEAD, self.weights.config.n_layers), []).append(t.final)
            self._pool = CalibrationPool({k: np.concatenate(v) for k, v in rows.items()})
        return self._pool

    def block1(self) -> vocab_match.Block1Tables:
        """The precomputed block-1 vocabulary tables."""
        if self.tables is None:
            self.tables = vocab_match.Block1Tables(self.weights)
        return self.tables


def _kv_rows(t: Any, layer: int) -> Array:
    return np.concatenate(
        [t.k[layer].reshape(len(t.k[layer]), -1), t.v[layer].reshape(len(t.v[layer]), -1)], 1
    )


def fit_tools(
    ctx: Context, layers: Sequence[int], mlp: bool = True, epochs: int = 300, per_layer: Sequence[int] = ()
) -> None:
    """Fit the inverters on public text: per block in ``layers``, on [K|V] cache rows (after key
    sharing), on plain V rows, on sorted V rows (σ-invariant), on FFN-stage rows and on block inputs
    (the generated tokens' rows entering the middle blocks); keep public V columns for σ recovery.
    ``per_layer``: blocks that get the ridge inverters of the per-layer curve (cache, plain and sorted V)
    and the public V columns for σ recovery: every block with a plain-V inverter has them. ConfigError
    for a block that is not an integer in [0, n_layers) (a negative one would fit another block under
    its name) or, with ``mlp``, ``epochs`` that is not an integer ≥ 0 — checked before anything is fitted."""
    layers, per_layer = _blocks(layers, ctx, "layers"), _blocks(per_layer, ctx, "per_layer")
    if mlp:  # before any inverter is stored: a bad count would leave the context half-fitted
        epochs = int_arg(epochs, "epochs")
    traces = ctx.traces
    toks = ctx.public_tokens
    w = ctx.weights
    table = ctx.vocabulary  # one copy shared by every inverter

    def fit(feats: Array, kind: str = "ridge", **kw: Any) -> inversion.Inverter:
        return inversion.fit_inverter(feats, toks, w, kind, table=table, **kw)

    for layer in layers:
        kv = np.concatenate([_kv_rows(t, layer) for t in traces])
        v = np.concatenate([t.v[layer].reshape(len(t.v[layer]), -1) for t in traces])
        h = np.concatenate([t.h[layer] for t in traces])
        x = np.concatenate([t.x[layer] for t in traces])
        ctx.middle_ref[layer] = v
        ctx.inverters[f"kv{layer}/ridge"] = fit(kv, lam=10.0)
        ctx.inverters[f"v{layer}/ridge"] = fit(v, lam=10.0)
        ctx.inverters[f"vsorted{layer}/ridge"] = fit(inversion.sorted_rows(v), lam=10.0)
        ctx.inverters[f"ffn{layer}/ridge"] = fit(h, lam=10.0)
        ctx.inverters[f"x{layer}/ridge"] = fit(x, lam=10.0)
        if mlp:
            ctx.inverters[f"kv{layer}/mlp"] = fit(kv, "mlp", epochs=epochs)
            ctx.inverters[f"ffn{layer}/mlp"] = fit(h, "mlp", epochs=epochs)
    for layer in per_layer:
        if f"kv{layer}/ridge" not in ctx.inverters:
            kv = np.concatenate([_kv_rows(t, layer) for t in traces])
            ctx.inverters[f"kv{layer}/ridge"] = fit(kv, lam=10.0)
        if f"vsorted{layer}/ridge" not in ctx.inverters:
            v = np.concatenate([t.v[layer].reshape(len(t.v[layer]), -1) for t in traces])
            ctx.middle_ref[layer] = v  # the σ-recovery reference goes with every plain-V inverter
            ctx.inverters[f"vsorted{layer}/ridge"] = fit(inversion.sorted_rows(v), lam=10.0)
            ctx.inverters[f"v{layer}/ridge"] = fit(v, lam=10.0)


def _blocks(blocks: Sequence[int], ctx: Context, name: str) -> list[int]:
    """``blocks`` as a list of block indices of the context's model (ConfigError for any other value)."""
    n_layers = ctx.weights.config.n_layers
    return [int_arg(b, f"{name} block", 0, n_layers) for b in blocks]


def _real_rows(rows: Array, truth: Array) -> Array:
    """Which message rows equal (relative 1e-8) one of the true plaintext rows: ground truth for
    scoring decoy detection (the attack never sees it)."""
    d = np.linalg.norm(rows[:, None, :] - truth[None, :, :], axis=2).min(axis=1)
    return np.asarray(d <= 1e-8 * (np.linalg.norm(rows, axis=1) + 1e-12))


def _score_blinded_link(tally: _Tally, view: ServerView, perms: Sequence[Array], layer: int, n: int) -> None:
    """Score :func:`~.decoy_detect.blinded_links` on block ``layer``'s QKV- and FFN-stage messages: the
    fraction of real rows it calls real (``decoy_blind_link_real_found``) and of decoys it calls decoys
    (``decoy_blind_link_decoys_rejected``), each the mean of the two messages' fractions; the truth is the
    request's token permutations (:attr:`RequestRun.token_perms`: the QKV message under π_layer, the FFN
    message under π_layer+1). Chance: n / (n + r) and r / (n + r). Nothing is scored where the messages
    hold no decoys (every row is real); ShapeError where a message's rows are not one per permuted
    position (the truth would not be the message's)."""
    q = stage_array(view, Stage.QKV, layer)
    f = stage_array(view, Stage.FFN, layer)
    truth_q, truth_f = np.asarray(perms[layer]) < n, np.asarray(perms[layer + 1]) < n
    if len(q) != len(truth_q) or len(f) != len(truth_f):
        raise ShapeError(
            f"block {layer}: {len(q)} QKV and {len(f)} FFN rows against permutations of {len(truth_q)} "
            f"and {len(truth_f)}"
        )
    if truth_q.all() or truth_f.all():
        return
    q_real, f_real = decoy_detect.blinded_links(q, f, n)
    found = (q_real[truth_q].mean() + f_real[truth_f].mean()) / 2
    rejected = ((~q_real[~truth_q]).mean() + (~f_real[~truth_f]).mean()) / 2
    tally.value("decoy_blind_link_real_found", float(found))
    tally.value("decoy_blind_link_decoys_rejected", float(rejected))


def probe_block(config: SCXConfig, n_layers: int) -> int:
    """The block whose stages the inversion and linking attacks read: the first middle block (the first
    block the server holds a valid cache of), else block 2 (0-based 1) when every block is a guard.
    ConfigError unless ``config`` is an SCXConfig and ``n_layers`` ≥ 1."""
    if not isinstance(config, SCXConfig):
        raise ConfigError(f"config must be an SCXConfig, got {type(config).__name__}")
    n_layers = int_arg(n_layers, "n_layers", 1)
    _, middle, _ = config.blocks(n_layers)
    return middle.start if len(middle) else min(1, n_layers - 1)


def _recover_sigma(
    ctx: Context, view: ServerView, layer: int, v_obs: Array, shared: dict[int, tuple[Array, Array]]
) -> Array:
    """The server's best column order ``idx`` for block ``layer``'s attention-stage V·P (n rows, true
    order), from what it holds alone: exact where it holds the same rows unpermuted — its own QKV-stage
    rows Z_v (un-noised: levels ``permute`` and ``paper`` past block 1), or the block's shared cache —
    (:func:`~.inversion.match_permuted_rows`); else the identity or the statistical guess
    (:func:`~.inversion.recover_column_permutation`), whichever leaves the smaller reconstruction residual
    ‖V·P[:, idx] − V(t̂)‖₁, V(t̂) the block's V rows of the plaintext forward of the tokens it inverts to
    (ties: the identity) — so the route never does worse than no σ recovery by what the server can check."""
    w = ctx.weights
    n = len(v_obs)
    refs = [raw_qkv(view, w, layer)[2]]
    if layer in shared:
        refs.append(shared[layer][1].reshape(n, -1))
    for ref in refs:
        _, idx = inversion.match_permuted_rows(v_obs, ref)
        if idx is not None:
            return idx
    v_inv = ctx.inverters[f"v{layer}/ridge"]

    def residual(idx: Array) -> float:
        guess = v_inv.predict(v_obs[:, idx])[:, 0]
        v_hat = forward_trace(w, guess, upto=layer, logits=False).v[layer].reshape(n, -1)
        return float(np.abs(v_obs[:, idx] - v_hat).sum())

    ident = np.arange(v_obs.shape[1])
    stat = inversion.recover_column_permutation(v_obs, ctx.middle_ref[layer])
    return stat if residual(stat) < residual(ident) else ident


def _noisy_inverter(ctx: Context, layer: int, beta: float, normalized: bool) -> inversion.Inverter:
    """A ridge inverter of FFN-stage rows fitted on public rows processed exactly as the message is —
    normalized by the block's MLP norm when the message says so, plus Laplace(β) noise drawn by the
    attacker (β is part of the public configuration): the noise-aware fitting attack (paper §7.3)."""
    key = f"{Context.NOISY_FIT}{layer}/{beta}/{int(normalized)}"
    if key not in ctx.inverters:
        w = ctx.weights
        h = np.concatenate([t.h[layer] for t in ctx.traces])
        if normalized:
            h = ops.rms_norm(h, w.layers[layer].mlp_norm, w.config.rms_eps)
        rng = np.random.default_rng(20_000 + layer)
        feats = np.concatenate([h + laplace_noise(h.shape, beta, rng) for _ in range(2)])
        toks = np.concatenate([ctx.public_tokens] * 2)
        ctx.inverters[key] = inversion.fit_inverter(feats, toks, w, "ridge", lam=10.0, table=ctx.vocabulary)
    inv: inversion.Inverter = ctx.inverters[key]
    return inv


def _release_beta(setting: Setting, stage: Stage, layer: int, n_layers: int) -> float:
    """β of a message in the configuration's release plan (0 when that message is not noised): public."""
    release = ReleasePlan.of(setting.config, _PlanShape(n_layers)).find(stage, layer)
    return 0.0 if release is None else release.beta


@dataclass(frozen=True)
class _PlanShape:
    """A dense model of ``n_layers`` blocks, for reading a plan's β (the harness runs dense models)."""

    n_layers: int
    n_experts: int = 0
    is_moe: bool = False


class _Tally:
    """Per-prompt (hits, scored) of count metrics and plain values of diagnostics. With ``prior`` and
    ``base`` (the run's baseline tally), scoring a bag attack also records its equal-budget prior in
    ``base`` under the attack's key: the prior's best bag of as many tokens as the attack guessed, against
    the same truth (:func:`~scx_ref.attacks.catalog.equal_budget`) — shown beside the attack; its verdict
    stays against the n-guess prior (:func:`~scx_ref.attacks.catalog.judged_against`)."""

    def __init__(self, prior: FrequencyPrior | None = None, base: _Tally | None = None) -> None:
        self.counts: dict[str, list[tuple[float, float]]] = {}
        self.values: dict[str, list[float]] = {}
        self.prior, self.base = prior, base

    def hit(self, key: str, hits: float, total: float) -> None:
        if total > 0:
            self.counts.setdefault(key, []).append((float(hits), float(total)))

    def pos(self, key: str, pred: npt.ArrayLike, truth: npt.ArrayLike) -> None:
        t = np.asarray(truth)
        self.hit(key, float(np.sum(np.asarray(pred)[: len(t)] == t)), len(t))

    def bag(self, key: str, pred: npt.ArrayLike, truth: npt.ArrayLike) -> int:
        """Score a bag guess (|pred ∩ truth| of |truth|) and its equal-budget baseline; the hits."""
        p, t = np.asarray(pred), np.asarray(truth)
        hits = bag_hits(p, t)
        self.hit(key, hits, t.size)
        if self.prior is not None and self.base is not None:
            self.base.hit(key, self.prior.bag_hits(t, p.size), t.size)
        return hits

    def value(self, key: str, v: float) -> None:
        self.values.setdefault(key, []).append(float(v))


def run_setting(
    ctx: Context,
    setting: Setting,
    prompts: Sequence[Array],
    n_new: int,
    seed: int = 0,
    sequential: bool = True,
    reorder: bool = True,
    progress: Progress | None = None,
    per_layer: Sequence[int] = (),
) -> dict[str, Any]:
    """Every attack on the views of ``prompts`` under ``setting``, with 95 % intervals, the frequency-prior
    baselines, the statelessness table, and the request's cost and exactness.

    An attack whose message the configuration never sends is not run (and scores nothing: the attacker
    then knows only the prior). ``per_layer``: blocks where the shared-cache and sorted-attention
    inverters are also scored. Returns a JSON-ready dict; ``metrics`` holds the pooled rates, ``baselines``
    the prior's (by baseline name, and under a bag attack's key its equal-budget prior, shown, not judged by).
    ConfigError for no prompts (nothing would be measured, yet the result would read as exact), a
    ``setting`` that is not a :class:`Setting`, a ``per_layer`` block outside the model, or a ``seed`` or
    ``n_new`` that is not an integer (≥ 0); VocabularyError unless each prompt is a 1-D array of the model's
    ids."""
    w = ctx.weights
    if not len(prompts):
        raise ConfigError("no prompts: nothing to attack")
    if not isinstance(setting, Setting):
        raise ConfigError(f"a setting must be a harness Setting, got {type(setting).__name__}")
    per_layer = _blocks(per_layer, ctx, "per_layer")
    prompts = [np.asarray(token_ids(p, w.config.vocab_size), dtype=np.int64) for p in prompts]
    n_new, seed = int_arg(n_new, "n_new"), int_arg(seed, "seed", None)
    L = w.config.n_layers
    tabs = ctx.block1()
    prior = ctx.prior
    base = _Tally()
    tally = _Tally(prior, base)
    layer_acc: dict[str, dict[int, list[float]]] = {}
    tables: list[dict[str, dict[str, float]]] = []
    costs: list[dict[str, float]] = []
    exact: list[dict[str, float]] = []
    _, middle, _ = setting.config.blocks(L)
    probe = probe_block(setting.config, L)
    beta_qkv0 = _release_beta(setting, Stage.QKV, 0, L)
    beta_gen0 = _release_beta(setting, Stage.GEN_QKV, 0, L)
    beta_ffn = _release_beta(setting, Stage.FFN, probe, L)
    reference = ReferenceModel(w)

    t0 = time.perf_counter()
    for pi, ids in enumerate(prompts):
        ids = np.asarray(ids, dtype=np.int64)
        run = run_request(
            w,
            ids,
            setting.config,
            setting.identity,
            n_new=n_new,
            seed=seed + pi,
            public=ctx.public,
            decoys=ctx.decoys(),
        )
        view, gen = run.view, run.generated
        n = prompt_length(view)
        steps = max(n_new - 1, 0)
        fed = np.asarray(gen[:steps], dtype=np.int64)  # the generated tokens the decode steps carried
        # -- exactness and cost of this request --
        ref_logits, _ = reference.prefill(ids)
        scale = float(np.abs(ref_logits).max())
        exact.append(
            {
                "max_rel_logit_err": float(np.abs(run.logits - ref_logits).max() / scale),
                "greedy_identical": float(gen == [int(t) for t in reference.generate(ids, n_new)]),
            }
        )
        costs.append(_request_cost(run, n, max(n_new - 1, 0)))
        # -- baselines: the frequency prior, no view --
        base.hit("prompt_pos", prior.positional_hits(ids), n)
        base.hit("prompt_bag", prior.bag_hits(ids), n)
        # the tokens the LM-head rows predict: the prompt's after the first, then the first generated one
        nxt_truth = np.concatenate([ids[1:], np.asarray(gen[:1], dtype=np.int64)])
        base.hit("prompt_next_bag", prior.bag_hits(nxt_truth), len(nxt_truth))
        # each generated baseline scores the tokens its attacks score (catalog.Metric.tokens)
        base.hit("generated", prior.positional_hits(gen), len(gen))
        base.hit("generated_fed", prior.positional_hits(fed), len(fed))
        base.hit("generated_next", prior.positional_hits(gen[1 : steps + 1]), len(gen[1 : steps + 1]))
        # -- prompt: block 1 --
        m0 = message(view, Stage.QKV, 0)
        x0 = np.asarray(m0.arrays["x"], dtype=np.float64)
        norm0 = bool(m0.meta.get("normalized", False))
        table0 = tabs.normalized if norm0 else np.asarray(w.embed, dtype=np.float64)
        d0 = vocab_match.l1_distances(x0, table0)  # one pass serves the ML and the MAP match
        t_qkv = np.argmin(d0, axis=1)  # Laplace maximum likelihood = L1 nearest (match_block1_qkv)
        hits = tally.bag("vm_qkv1_bag_recall", t_qkv, ids)
        tally.value("vm_qkv1_bag_precision", hits / max(len(t_qkv), 1))
        t_map = vocab_match.map_tokens(d0, beta_qkv0, prior.log_probs)
        tally.bag("vm_qkv1_map_bag_recall", t_map, ids)
        t_res, d_res = vocab_match.match_block1_residual(
            stage_array(view, Stage.O, 0), stage_array(view, Stage.FFN, 0), w
        )
        tally.bag("vm_resid1_bag_recall", t_res[d_res < 1e-6], ids)
        exact_guess: list[tuple[Array, Array]] = []  # (ids, exact-match flags), strongest first
        if view.select(stage=Stage.ATTN, layer=0):
            t_att, d_att = vocab_match.match_block1_attn(
                stage_array(view, Stage.ATTN, 0, "k"), stage_array(view, Stage.ATTN, 0, "v"), w, tables=tabs
            )
            tally.pos("vm_attn1_pos_acc", t_att, ids)
            exact_guess.append((t_att, d_att < 1e-6))
        head = message(view, Stage.HEAD, L)
        xh: Array = np.asarray(head.arrays["x"], dtype=np.float64)
        if not head.meta.get("normalized", False):
            xh = ops.rms_norm(xh, w.final_norm, w.config.rms_eps)
        tally.bag("head_next_bag_recall", np.argmax(xh @ w.lm_head, axis=1), nxt_truth)
        # -- prompt: the probe block (shared cache, attention stage, FFN rows, residual links) --
        rec: Array | None = None
        shared_now = shared_caches(view, w) if len(middle) else {}
        if len(middle) and middle.start in shared_now:  # no decode step (n_new <= 1): keys never shared
            ell = middle.start
            kk, vv = shared_now[ell]
            target = np.concatenate([kk.reshape(n, -1), vv.reshape(n, -1)], axis=1)
            for kind in ("ridge", "mlp"):
                key = f"kv{ell}/{kind}"
                if key in ctx.inverters:
                    tally.pos(f"inv_cache_{kind}_pos_acc", ctx.inverters[key].predict(target)[:, 0], ids)
            if sequential:
                inv = ctx.inverters.get(f"kv{ell}/ridge")
                rec, d_rec = vocab_match.match_sequential(target, w, ell, "kv", ranker=_ranker(inv))
                tally.pos("vm_cache_seq_pos_acc", rec, ids)
                exact_guess.insert(0, (rec, d_rec < 1e-4))
        if view.select(stage=Stage.ATTN, layer=probe) and f"v{probe}/ridge" in ctx.inverters:
            v_obs = stage_array(view, Stage.ATTN, probe, "v").reshape(n, -1)
            v_inv = ctx.inverters[f"v{probe}/ridge"]
            tally.pos("inv_attn_naive_pos_acc", v_inv.predict(v_obs)[:, 0], ids)
            idx = _recover_sigma(ctx, view, probe, v_obs, shared_now)
            tally.pos("inv_attn_sigma_rec_pos_acc", v_inv.predict(v_obs[:, idx])[:, 0], ids)
            srt = ctx.inverters[f"vsorted{probe}/ridge"].predict(inversion.sorted_rows(v_obs))[:, 0]
            tally.pos("inv_attn_sorted_pos_acc", srt, ids)
        f_msg = message(view, Stage.FFN, probe)
        f_rows = np.asarray(f_msg.arrays["x"], dtype=np.float64)
        f_norm = bool(f_msg.meta.get("normalized", False))
        for kind in ("ridge", "mlp"):
            if f"ffn{probe}/{kind}" in ctx.inverters:
                pred = ctx.inverters[f"ffn{probe}/{kind}"].predict(f_rows)[:, 0]
                tally.bag(f"inv_ffn_{kind}_bag_recall", pred, ids)
        if beta_ffn > 0 or f_norm:
            pred = _noisy_inverter(ctx, probe, beta_ffn, f_norm).predict(f_rows)[:, 0]
            tally.bag("inv_ffn_noisy_bag_recall", pred, ids)
        if not w.config.is_moe:
            _prompt_joint(ctx, setting, view, ids, tally)
        _, _, fr = decoy_detect.residual_links(
            stage_array(view, Stage.QKV, probe),
            stage_array(view, Stage.O, probe),
            f_rows,
            w,
            probe,
            bool(message(view, Stage.QKV, probe).meta.get("normalized")),
        )
        real = _real_rows(f_rows, forward_trace(w, ids, upto=probe, logits=False).h[probe])
        if real.any():
            tally.value("decoy_link_real_found", float(fr[real].mean()))
            if (~real).any():
                tally.value("decoy_link_decoys_rejected", float((~fr[~real]).mean()))
        else:  # the rows are noised: no row links, the attack finds nothing
            tally.value("decoy_link_real_found", 0.0)
        # block 1's link where only its QKV stage is noised (level paper): maximum likelihood under the
        # public β, the n best links kept (n is public)
        block1 = [view.select(stage=st, layer=0) for st in (Stage.QKV, Stage.O, Stage.FFN)]
        raw_o_ffn = (
            _release_beta(setting, Stage.O, 0, L) == 0 and _release_beta(setting, Stage.FFN, 0, L) == 0
        )
        if (
            probe != 0
            and all(block1)
            and block1[0][0].meta.get("normalized")
            and raw_o_ffn
            and not block1[2][0].meta.get("normalized")
        ):
            f1 = stage_array(view, Stage.FFN, 0)
            _, _, fr1 = decoy_detect.residual_links(
                stage_array(view, Stage.QKV, 0),
                stage_array(view, Stage.O, 0),
                f1,
                w,
                0,
                True,
                beta=beta_qkv0,
                n_real=n,
            )
            real1 = _real_rows(f1, forward_trace(w, ids, upto=0, logits=False).h[0])
            if real1.any() and (~real1).any():
                tally.value("decoy_link1_noised_real_found", float(fr1[real1].mean()))
                tally.value("decoy_link1_noised_decoys_rejected", float((~fr1[~real1]).mean()))
        # the last block's link where its QKV and FFN stages are both blinded (level blind's last guard
        # block), so the residual link cannot be formed: the blinded-rows link, scored on both messages
        if all(_release_beta(setting, st, L - 1, L) > 0 for st in (Stage.QKV, Stage.FFN)):
            _score_blinded_link(tally, view, run.token_perms, L - 1, n)
        # -- the attacker's best prompt: exact matches where it has them, else the prior's mode --
        recovered = np.full(n, prior.mode, dtype=np.int64)
        settled = np.zeros(n, dtype=bool)
        for guess, ok in exact_guess:
            take = ok & ~settled
            recovered[take] = guess[take]
            settled |= take
        tally.pos("recovered_pos_acc", recovered, ids)
        # -- generated tokens --
        if steps:
            rows = np.concatenate([stage_array(view, Stage.GEN_QKV, 0, step=s) for s in range(steps)])
            g_map, _ = vocab_match.match_block1_map(rows, w, beta_gen0, prior.log_probs, True, tables=tabs)
            tally.pos("gen_qkv1_map_acc", g_map, fed)
            if view.select(stage=Stage.GEN_ATTN, layer=0):
                ks, vs = [], []
                for s in range(steps):
                    ks.append(stage_array(view, Stage.GEN_ATTN, 0, "k", step=s)[-1:])
                    vs.append(stage_array(view, Stage.GEN_ATTN, 0, "v", step=s)[-1:])
                g_fp, _ = vocab_match.match_block1_attn(
                    np.concatenate(ks), np.concatenate(vs), w, tables=tabs, positions=n + np.arange(steps)
                )
                tally.pos("gen_attn1_fp_acc", g_fp, fed)
            if view.select(stage=Stage.GEN_HEAD):
                lg = np.concatenate([stage_array(view, Stage.GEN_HEAD, L, step=s) for s in range(steps)])
                tally.pos("gen_head_acc", np.argmax(lg @ w.lm_head, axis=1), gen[1 : steps + 1])
            if not w.config.is_moe:
                _generation_joint(ctx, setting, view, steps, fed, tally)
            if len(middle) and sequential:
                ell = middle.start
                gx = np.concatenate([stage_array(view, Stage.GEN_MID, ell, step=s) for s in range(steps)])
                xinv = ctx.inverters.get(f"x{ell}/ridge")
                g_rec, _ = vocab_match.match_sequential(
                    gx, w, ell, "x", prefix=recovered, ranker=_ranker(xinv)
                )
                tally.pos("vm_gen_seq_acc", g_rec, fed)
        if n_new:
            tally.pos("gen_predict_acc", reference.generate(recovered, n_new), gen)
        # -- per-layer inversion curve --
        shared = shared_caches(view, w) if per_layer else {}
        for layer in per_layer:
            if not view.select(stage=Stage.ATTN, layer=layer):
                continue
            v_obs = stage_array(view, Stage.ATTN, layer, "v").reshape(n, -1)
            key = f"vsorted{layer}/ridge"
            if key in ctx.inverters:
                pred = ctx.inverters[key].predict(inversion.sorted_rows(v_obs))[:, 0]
                layer_acc.setdefault("inv_attn_sorted", {}).setdefault(layer, []).append(np.mean(pred == ids))
            if f"v{layer}/ridge" in ctx.inverters:
                pred = ctx.inverters[f"v{layer}/ridge"].predict(v_obs)[:, 0]
                layer_acc.setdefault("inv_attn_naive", {}).setdefault(layer, []).append(np.mean(pred == ids))
            if layer in shared and f"kv{layer}/ridge" in ctx.inverters:
                k_l, v_l = shared[layer]
                feats = np.concatenate([k_l.reshape(n, -1), v_l.reshape(n, -1)], axis=1)
                pred = ctx.inverters[f"kv{layer}/ridge"].predict(feats)[:, 0]
                layer_acc.setdefault("inv_cache_ridge", {}).setdefault(layer, []).append(np.mean(pred == ids))
        # -- LLM-assisted reordering of the block-1 bag (decoys included; n is public) --
        if reorder and setting.reorder and ctx.lm is not None:
            order = llm_reorder.beam_reorder(t_qkv, n, ctx.lm, beam=16)
            sc = llm_reorder.order_scores(order, ids)
            tally.value("llm_reorder_exact", sc["exact"])
            tally.value("llm_reorder_kendall_tau", sc["kendall_tau"])
            tally.value("llm_reorder_recall", sc["recall"])
        # -- statelessness (paper Table 5): can the server continue alone? --
        if setting.stateless and len(gen) >= 2:
            tab = statelessness.statelessness_table(view, w, ids, gen, recovered=recovered)
            tables.append(tab)
            m = len(gen) - 1
            best = max(tab[pol]["top1"] for pol in statelessness.SERVER_POLICIES if pol in tab)
            tally.hit("stateless_top1", round(best * m), m)
            base.hit("no_prompt_top1", round(tab["no-prompt"]["top1"] * m), m)
        if progress:
            progress(f"{setting.name} prompt {pi}")
    rates = {k: Rate.pool(v) for k, v in tally.counts.items()}
    baselines = {k: Rate.pool(v) for k, v in base.counts.items()}
    out: dict[str, Any] = {
        "setting": setting.name,
        "mechanism": setting.mechanism,
        "preset": setting.preset,
        "config": setting.config.to_dict(),
        "identity_roles": sorted(setting.identity),
        "probe_block": probe,
        "metrics": {
            **{k: r.rate for k, r in rates.items()},
            **{k: float(np.mean(v)) for k, v in tally.values.items()},
        },
        "rates": {k: r.to_dict() for k, r in rates.items()},
        "baselines": {k: r.to_dict() for k, r in baselines.items()},
        "at_baseline": _verdicts(rates, baselines),
        "cost": {k: float(np.mean([c[k] for c in costs])) for k in costs[0]} if costs else {},
        "exactness": {
            "max_rel_logit_err": max(e["max_rel_logit_err"] for e in exact) if exact else 0.0,
            "greedy_identical": float(np.mean([e["greedy_identical"] for e in exact])) if exact else 1.0,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if layer_acc:
        out["per_layer"] = {
            m: {str(layer): float(np.mean(v)) for layer, v in sorted(d.items())} for m, d in layer_acc.items()
        }
    if tables:
        out["statelessness"] = {
            pol: {m: float(np.mean([t[pol][m] for t in tables])) for m in tables[0][pol]} for pol in tables[0]
        }
    return out


#: The message stages a joint inversion reads, with the form of their row (:data:`multiview.Form`);
#: an un-normalized message (level permute/paper) has the raw form.
_FORMS: dict[Stage, tuple[multiview.Form, multiview.Form]] = {
    Stage.QKV: ("xhat", "x"),
    Stage.FFN: ("hn", "h"),
    Stage.FFN_DOWN: ("m", "m"),
    Stage.GEN_QKV: ("xhat", "xhat"),
    Stage.GEN_O: ("o", "o"),
    Stage.GEN_FFN_UP: ("hn", "hn"),
    Stage.GEN_FFN_DOWN: ("m", "m"),
    Stage.GEN_FFN: ("h", "h"),
    Stage.GEN_LAST: ("x", "x"),
    Stage.GEN_MID: ("x", "x"),
}


def _joint(ctx: Context, views: list[tuple[multiview.Form, int, float]]) -> multiview.JointInverter:
    """The joint inverter of ``views`` (form, block, β), fitted once per context: the ridge mix or the
    template likelihood, whichever recovers more held-out public tokens (:class:`.multiview.JointInverter`;
    each token's exact row where a view depends on the token alone, :func:`.multiview.token_rows`)."""
    key = Context.JOINT_FIT + ";".join(f"{f},{b},{beta}" for f, b, beta in views)
    if key not in ctx.inverters:
        w = ctx.weights
        public = [multiview.public_rows(w, ctx.traces, f, b) for f, b, _ in views]
        exact = []
        for f, b, _ in views:  # one copy of each V × width table, shared by every joint inverter
            if f"rows/{f},{b}" not in ctx.inverters:
                ctx.inverters[f"rows/{f},{b}"] = multiview.token_rows(w, f, b)
            exact.append(ctx.inverters[f"rows/{f},{b}"])
        ctx.inverters[key] = multiview.JointInverter.fit(
            public,
            [beta for _, _, beta in views],
            ctx.public_tokens,
            w,
            ctx.vocabulary,
            exact=exact,
        )
    inv: multiview.JointInverter = ctx.inverters[key]
    return inv


def _form(msg: Any) -> multiview.Form:
    normalized, raw = _FORMS[msg.stage]
    return normalized if msg.meta.get("normalized", msg.stage is Stage.FFN_DOWN) else raw


def _prompt_joint(ctx: Context, setting: Setting, view: ServerView, ids: Array, tally: _Tally) -> None:
    """Joint inversion of the rows sent under π_1: block 1's FFN stage, its down-projection input (level
    blind) and block 2's QKV stage — three views of each token, row-aligned (:mod:`.multiview`)."""
    L = ctx.weights.config.n_layers
    if L < 2:
        return
    msgs = [message(view, Stage.FFN, 0)]
    msgs += view.select(stage=Stage.FFN_DOWN, layer=0)[:1]
    msgs.append(message(view, Stage.QKV, 1))
    views = [
        (_form(m), 1 if m.stage is Stage.QKV else 0, _release_beta(setting, m.stage, m.layer, L))
        for m in msgs
    ]
    inv = _joint(ctx, views)
    rows = [np.asarray(m.arrays["m" if m.stage is Stage.FFN_DOWN else "x"], dtype=np.float64) for m in msgs]
    tally.bag("inv_joint_bag_recall", inv.predict(rows), ids)


def _generation_joint(
    ctx: Context, setting: Setting, view: ServerView, steps: int, fed: Array, tally: _Tally
) -> None:
    """Joint inversion of every linear-stage row of a decode step (every block's QKV input, attention
    output, MLP input and SwiGLU product the configuration sends, blinded or not): all about the step's
    token (:mod:`.multiview`). The paper's offset row is left out (its form is the residual + a scalar)."""
    L = ctx.weights.config.n_layers
    per_step: list[list[Any]] = []
    for s in range(steps):
        msgs = [
            m
            for m in view.select(step=s)
            if m.stage in _FORMS
            and m.meta.get("experts") is None
            and not (m.stage is Stage.GEN_FFN and _release_beta(setting, m.stage, m.layer, L) > 0)
        ]
        per_step.append(msgs)
    if not per_step or not per_step[0]:
        return
    first = per_step[0]
    views = [(_form(m), m.layer, _release_beta(setting, m.stage, m.layer, L)) for m in first]
    inv = _joint(ctx, views)
    rows = []
    for j, m in enumerate(first):
        name = "m" if m.stage in (Stage.GEN_FFN_DOWN,) else "x"
        rows.append(np.concatenate([np.asarray(ps[j].arrays[name], dtype=np.float64) for ps in per_step]))
    tally.pos("gen_joint_acc", inv.predict(rows), fed)


def _baseline_of(key: str) -> str:
    """The baseline of the tokens a count metric scores (catalog: its target and scoring), the one it is
    judged against (:func:`.catalog.judged_against`)."""
    return catalog.metric(key).baseline


def _verdicts(rates: dict[str, Rate], baselines: dict[str, Rate]) -> dict[str, bool]:
    """For every attack metric scored: is it at the baseline it is judged against
    (:func:`~scx_ref.attacks.catalog.judged_against`, :func:`~scx_ref.attacks.stats.at_baseline`)?"""
    out: dict[str, bool] = {}
    for key, r in rates.items():
        m = catalog.metric(key)
        b = catalog.judged_against(key, baselines)
        if m.attack and b is not None:
            out[key] = at_baseline(r, b)
    return out


def _request_cost(run: RequestRun, n: int, steps: int) -> dict[str, float]:
    """Client flop share, bytes and round trips per prompt (control + prefill stages, key sharing
    included) and per decode step (generation stages), and the client's per-request state per token."""
    pre = run.cost.phase_total(Phase.PREFILL)
    pre.add(run.cost.phase_total(Phase.CONTROL))
    gen = run.cost.phase_total(Phase.GENERATE)
    per = max(steps, 1)
    return {
        "client_flop_share": run.cost.client_flop_share,
        "offline_flop_share": run.cost.offline_flop_share,
        "client_flop_share_prefill": _share(pre),
        "client_flop_share_decode": _share(gen),
        "offline_flop_share_prefill": _share(pre, offline=True),
        "offline_flop_share_decode": _share(gen, offline=True),
        "bytes_per_prompt": float(pre.bytes_up + pre.bytes_down),
        "round_trips_per_prompt": float(pre.round_trips),
        "bytes_per_token": float(gen.bytes_up + gen.bytes_down) / per if steps else 0.0,
        "round_trips_per_token": float(gen.round_trips) / per if steps else 0.0,
        "client_state_bytes_per_token": run.client_state_bytes / max(n + steps, 1),
    }


def _share(cost: StageCost, offline: bool = False) -> float:
    """The client's online (or, ``offline``, ahead-of-time) flops over all flops of ``cost``."""
    total = cost.client_flops + cost.server_flops + cost.offline_flops
    part = cost.offline_flops if offline else cost.client_flops
    return part / total if total else 0.0


def _ranker(inv: Any) -> Callable[[Array], Array] | None:
    """Candidate order for sequential matching: tokens by the inverter's cosine score (None: vocab order)."""
    if inv is None:
        return None

    def rank(t: Array) -> Array:
        sims = inv.embed(t[None, :]) @ inv.table.T
        return np.asarray(np.argsort(-sims[0]))

    return rank


def noise_fitting(
    weights: ModelWeights, public: Array, victim: Array, beta: float, seed: int = 0, mlp_epochs: int = 300
) -> dict[str, float]:
    """The paper's fixed- vs one-time-noise fitting attack on block-1 rows N(E[t]) + α: inverters fitted
    on public rows under the same noise process, and the Laplace maximum-likelihood vocabulary match.
    ``fixed``: one noise row reused for every row (train and victim); ``one-time``: fresh noise per row.
    ConfigError unless both token sets are non-empty and ``seed`` is an integer ≥ 0; VocabularyError for ids
    outside the vocabulary."""
    from .vocab_match import match_block1_qkv, normalized_table

    V = weights.config.vocab_size
    seed = int_arg(seed, "seed")
    public = np.asarray(token_ids(public, V, allow_empty=True), dtype=np.int64)
    victim = np.asarray(token_ids(victim, V, allow_empty=True), dtype=np.int64)
    if not len(public) or not len(victim):
        raise ConfigError(
            f"noise fitting needs public and victim tokens, got {len(public)} and {len(victim)}"
        )
    rng = np.random.default_rng(seed)
    tab = normalized_table(weights)
    d = tab.shape[1]
    fixed = laplace_noise((1, d), beta, rng)
    out: dict[str, float] = {}
    for mode in ("fixed", "one-time"):

        def enc(ids: Array, mode: str = mode) -> Array:
            noise = fixed if mode == "fixed" else laplace_noise((len(ids), d), beta, rng)
            return np.asarray(tab[ids] + noise)

        xtr, xte = enc(public), enc(victim)
        for kind in ("ridge", "mlp"):
            inv = inversion.fit_inverter(xtr, public, weights, kind, lam=10.0, epochs=mlp_epochs, seed=seed)
            out[f"{mode}/{kind}"] = float(np.mean(inv.predict(xte)[:, 0] == victim))
        out[f"{mode}/vocab-ml"] = float(np.mean(match_block1_qkv(xte, weights, True)[0] == victim))
    return out


#: The order-enumeration experiment of :func:`run_all`: decoy counts r, and the most bag rows it enumerates.
_ENUM_DECOYS: tuple[int, ...] = (0, 2)
_ENUM_MAX_ROWS = 7


def run_all(
    ctx: Context,
    prompts: Sequence[Array],
    settings: Sequence[Setting],
    n_new: int = 4,
    enum_prompts: Sequence[Array] = (),
    progress: Progress | None = None,
    mlp_epochs: int = 300,
    sequential: bool = True,
    per_layer: Sequence[int] = (),
    fitting_betas: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 5.0),
) -> dict[str, Any]:
    """Every setting, the noise-fitting experiment (β sweep ``fitting_betas``), order enumeration for
    tiny n, and the search-space table. Returns a JSON-ready dict.

    Checked before any setting runs (a long run would otherwise fail only at its end): ConfigError for
    no prompts or no settings, a setting that is not a :class:`Setting`, ``n_new`` or ``mlp_epochs`` that
    is not an integer ≥ 0, a β that is not a finite number ≥ 0, or (with a language model) an enumeration
    prompt whose bag — its tokens plus up to 2 decoys — exceeds the enumeration's limit of
    :data:`_ENUM_MAX_ROWS` rows; VocabularyError unless every prompt and enumeration prompt is a
    non-empty 1-D array of the model's ids."""
    w = ctx.weights
    if not len(prompts) or not len(settings):
        raise ConfigError("run_all needs at least one prompt and one setting")
    bad = [type(s).__name__ for s in settings if not isinstance(s, Setting)]
    if bad:  # before any setting runs (a long run would fail only at the bad one)
        raise ConfigError(f"settings must be harness Settings, got {', '.join(bad)}")
    V = w.config.vocab_size
    prompts = [np.asarray(token_ids(p, V), dtype=np.int64) for p in prompts]
    n_new, mlp_epochs = int_arg(n_new, "n_new"), int_arg(mlp_epochs, "mlp_epochs")
    fitting_betas = [float_arg(b, "fitting beta", 0.0) for b in fitting_betas]
    enum_prompts = [np.asarray(token_ids(p, V), dtype=np.int64) for p in enum_prompts]
    if ctx.lm is not None:
        for p in enum_prompts:
            if len(p) + max(_ENUM_DECOYS) > _ENUM_MAX_ROWS:
                raise ConfigError(
                    f"an enumeration prompt of {len(p)} tokens plus {max(_ENUM_DECOYS)} decoys exceeds the "
                    f"enumeration's {_ENUM_MAX_ROWS} rows"
                )
    results = [
        run_setting(ctx, s, prompts, n_new, sequential=sequential, progress=progress, per_layer=per_layer)
        for s in settings
    ]
    victim = np.concatenate([np.asarray(p) for p in prompts])
    fitting = {str(b): noise_fitting(w, ctx.public, victim, b, mlp_epochs=mlp_epochs) for b in fitting_betas}
    if progress:
        progress("noise fitting")
    enum: dict[str, float] = {}
    if ctx.lm is not None and enum_prompts:
        rng = np.random.default_rng(1)
        public = np.asarray(ctx.public)
        for r in _ENUM_DECOYS:
            hits = []
            for p in enum_prompts:
                bag = np.concatenate([p, public[rng.integers(0, len(public), size=r)]])
                order = bruteforce.enumerate_orders(bag, len(p), ctx.lm, max_rows=_ENUM_MAX_ROWS)
                hits.append(order == [int(t) for t in p])
            enum[f"r={r}"] = float(np.mean(hits))
        if progress:
            progress("enumeration")
    n0 = len(prompts[0])
    last = settings[-1]
    view, _ = server_view(
        w, prompts[0], last.config, last.identity, seed=99, public=ctx.public, decoys=ctx.decoys()
    )
    return {
        "model": w.config.name,
        "n_prompts": len(prompts),
        "prompt_len": n0,
        "n_new": n_new,
        "settings": results,
        "noise_fitting": fitting,
        "enumeration": enum,
        "enumeration_n": len(enum_prompts[0]) if len(enum_prompts) else 0,
        "search_space": bruteforce.stage_search_spaces(view, w.config)[:8],
    }

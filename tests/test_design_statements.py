"""DESIGN statements about what each message carries, under which key, and what each side keeps, checked
against the code where no other test pinned them (DESIGN §3, §5.1, §5.2, §5.3, §6).

Every key is re-derived here from a fresh :class:`~scx_ref.keys.KeySchedule` of the same (master, nonce)
under the label DESIGN §3 names for its role, never taken from the client, and every plaintext value from
the reference forward pass — so a client that stays self-consistent (and exact) while it drifts from the
design (another label, another row order, another stage's key, a block left out) fails here. Each check has
a negative control that makes such a drift in-test and shows the check catches it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref import ops
from scx_ref.backends import NumpyBackend
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.plan import Release, ReleasePlan
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.stages import Phase, Stage
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_weights

Array = npt.NDArray[Any]
IDS = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.int64)
N = len(IDS)
MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))


def _close(got: Any, want: Any) -> None:
    """float64 exactness (DESIGN §6: "SCX output equals plaintext output to rtol 1e-10")."""
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _decode(rows: Array, perm: Array, n: int) -> Array:
    """The n real rows of ``rows`` in true order, for the encoding row j = [X; R][π[j]] (DESIGN T1, T2:
    X → X[π]); written here, independently of :mod:`scx_ref.transforms`."""
    true = np.empty_like(rows)
    true[perm] = rows
    return true[:n]


def _trace(w: ModelWeights, ids: Array) -> tuple[dict[tuple[str, int], Array], Array, KVCache]:
    """The plaintext forward's per-block values (``x`` block input, ``xhat``, ``q``/``k`` after RoPE,
    ``v``, ``o`` the attention output, ``h`` the residual before the MLP), its logits and its cache."""
    seen: dict[tuple[str, int], Array] = {}

    def record(stage: str, layer: int, x: Any) -> None:
        seen[(stage, layer)] = np.array(x, dtype=np.float64)

    ref = ReferenceModel(w, trace=record)
    logits, cache = ref.prefill(ids)
    return seen, logits, cache


class _Run:
    """One SCX prefill on a float64 numpy backend, its server and the server's recorded view."""

    def __init__(self, w: ModelWeights, cfg: SCXConfig, *, share: bool = False, steps: int = 0) -> None:
        self.w, self.cfg = w, cfg
        b = NumpyBackend(w)
        self.server: Server[Any] = Server(b)
        self.link = LocalTransport(self.server, record_view=True)
        self.client: Client[Any] = Client(b, KeySchedule(MASTER, NONCE), cfg)
        self.logits = self.client.prefill(IDS, self.link)
        self.trace, want, self.cache = _trace(w, IDS)
        _close(self.logits, want)  # exact: every check below is of a correct run
        self.ref = ReferenceModel(w)
        self.tokens: list[int] = []
        if share:
            self.client.share_keys(self.link)
        token = int(np.argmax(want[-1]))
        for _ in range(steps):
            got = self.client.decode(token, self.link)
            _close(got, self.ref.decode(token, self.cache))
            self.tokens.append(token)
            token = int(np.argmax(got))
        self.session = self.server.sessions[self.client.session]
        self.keys = KeySchedule(MASTER, NONCE)  # the same keys, re-derived from (master, nonce, label)

    def one(self, stage: Stage, layer: int) -> Array:
        """The ``x`` of the one prefill message of ``stage`` for block ``layer``."""
        got = self.link.view.select(stage=stage, layer=layer)
        assert len(got) == 1, f"{len(got)} {stage.value} messages for block {layer}"
        return np.asarray(got[0].arrays["x"], dtype=np.float64)


def _drift(monkeypatch: pytest.MonkeyPatch, method: str, label: str) -> None:
    """Make :class:`RequestKeys`.``method`` draw its permutation under another label: the client stays
    self-consistent (and exact), but no longer uses the key DESIGN names for that role."""

    def drifted(self: RequestKeys, block: int, rows: int) -> Array:
        return self.schedule.permutation((label, block), rows)

    monkeypatch.setattr(RequestKeys, method, drifted)


# -- §5.1: each prefill stage's rows, under its key ---------------------------------------------------------


def _check_prefill_rows(run: _Run) -> None:
    c, cfg, keys, tr = run.w.config, run.cfg, run.keys, run.trace
    q, kv = c.q_dim, c.kv_dim
    L = c.n_layers
    for i in range(L):
        pi = keys.permutation(("tok", i, "qkv"), N + cfg.r1)
        pi_next = keys.permutation(("tok", i + 1, "qkv"), N + cfg.r1)
        pi_o = keys.permutation(("tok", i, "o"), N + cfg.r2)
        e = run.one(Stage.QKV, i)
        assert e.shape == (N + cfg.r1, c.hidden_size)
        _close(_decode(e, pi, N), tr[("x", i)])
        # the server keeps Z_k, Z_v as block i's raw cache: π_i order, n + r₁ rows, before RoPE
        zk, zv = (np.asarray(a, dtype=np.float64) for a in run.session.raw[i])
        lw = run.w.layers[i]
        _, k_pre, v_pre = ops.qkv(tr[("xhat", i)], lw, c.n_heads, c.n_kv_heads, c.head_dim)
        assert zk.shape == zv.shape == (N + cfg.r1, kv)
        _close(_decode(zk, pi, N), k_pre.reshape(N, kv))
        _close(_decode(zv, pi, N), v_pre.reshape(N, kv))
        o = run.one(Stage.O, i)
        assert o.shape == (N + cfg.r2, q)
        _close(_decode(o, pi_o, N), tr[("o", i)])
        f = run.one(Stage.FFN, i)
        assert f.shape == (N + cfg.r1, c.hidden_size)
        _close(_decode(f, pi_next, N), tr[("h", i)])
    h = tr[("h", L - 1)]
    lw = run.w.layers[L - 1]
    final = h + ops.mlp(ops.rms_norm(h, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
    head = run.one(Stage.HEAD, L)
    _close(_decode(head, keys.permutation(("tok", L, "qkv"), N + cfg.r1), N), final)


PERMUTE = SCXConfig(level="permute", r1=2, r2=3, max_length=12)


def test_each_prefill_stage_sends_its_rows_under_the_key_design_names() -> None:
    """DESIGN §5.1: "a token permutation π_i over n + r₁ rows (used by block i's QKV stage *and* block
    i−1's FFN stage, as in the paper), a token permutation π′_i over n + r₂ rows for the O-projection
    stage"; step 1 "The client sends E = π_i(X̂ ⊕ r_{i,1}) [...] The server [...] keeps Z_k, Z_v as block
    i's raw cache"; step 3 "The client sends π′_i(O ⊕ r_{i,2})"; step 4 "The client sends π_{i+1}(H ⊕
    r_{i+1,1})"; step 5 "After block L: final norm and LM head as one more permuted stage"; §3 labels
    ``("tok", l, "qkv")``. At level ``permute`` (no noise; the server applies the norms), each message
    decoded with the key re-derived under its label is the plaintext value, the raw cache is Z_k, Z_v of
    the real rows under π_i, and every stage has n + r rows."""
    _check_prefill_rows(_Run(tiny_weights(11), PERMUTE))


@pytest.mark.parametrize(
    ("method", "label"), [("o_perm", "tok-o"), ("token_perm", "tok-qkv")], ids=["pi-prime", "pi"]
)
def test_prefill_rows_check_catches_a_key_drift(
    method: str, label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: with π′_i (or π_i, at QKV, FFN, head and key sharing alike) drawn under another
    label the client is still exact (asserted in ``_Run``), and the check above fails."""
    _drift(monkeypatch, method, label)
    run = _Run(tiny_weights(11), PERMUTE)
    with pytest.raises(AssertionError):
        _check_prefill_rows(run)


# -- §5.1 step 6, §5.3: the locked cache and what the client keeps, through generation ---------------------


def _check_caches(run: _Run) -> None:
    c, cfg, keys = run.w.config, run.cfg, run.keys
    first, middle, last = cfg.blocks(c.n_layers)
    st, s = run.client.state, run.session
    assert st is not None
    t = len(run.tokens)
    kv = c.kv_dim
    true_k = [np.asarray(k).reshape(-1, kv) for k in run.cache.keys]  # after RoPE, n + t rows
    true_v = [np.asarray(v).reshape(-1, kv) for v in run.cache.values]
    assert sorted(s.locked) == list(last)
    for i in last:
        # K^c_i = ρ_i(K_rope ⊕ R_i): n + r_lock rows under ρ_i, then one appended row per generated token
        rho = keys.permutation(("lock", i), N + cfg.lock_decoys)
        locked = np.asarray(s.locked[i], dtype=np.float64)
        assert locked.shape == (N + cfg.lock_decoys + t, kv)
        _close(_decode(locked[: N + cfg.lock_decoys], rho, N), true_k[i][:N])
        _close(locked[N + cfg.lock_decoys :], true_k[i][N:])
        # ... "and keeps that block's V itself" (not its K)
        assert i not in st.guard_k
        _close(np.asarray(st.guard_v[i]).reshape(-1, kv), true_v[i])
    for i in first:  # the client's own valid cache of a first guard block, extended by each token
        _close(np.asarray(st.guard_k[i]).reshape(-1, kv), true_k[i])
        _close(np.asarray(st.guard_v[i]).reshape(-1, kv), true_v[i])
    for i in middle:  # the client keeps none of a middle block; the server's valid cache grows alone
        assert i not in st.guard_k and i not in st.guard_v
        k, v = (np.asarray(a).reshape(-1, kv) for a in s.valid[i])
        _close(k, true_k[i])
        _close(v, true_v[i])


CACHES = SCXConfig(r1=2, r2=1, r_lock=3, l_s=1, l_e=2, max_length=12)


@pytest.mark.parametrize("steps", [0, 2])
def test_locked_caches_and_the_caches_each_side_keeps(steps: int) -> None:
    """DESIGN §5.1 step 6: "For each of the last l_e blocks the client also stores on the server a locked
    key cache K^c_i = ρ_i(K_rope ⊕ R_i) (fresh token permutation, decoy rows) and keeps that block's V
    itself"; §5.3: the client "appends k, v to its own valid cache of that block" (first guard blocks),
    "Middle blocks. The server computes alone on its valid caches", last guard blocks: the server "scores q
    against the locked K^c (plus the new row)"; §3 label ``("lock", i)``. After the prefill and after
    generated tokens: the locked cache decoded with ρ_i is the plaintext RoPE'd K with n + r_lock rows plus
    one plaintext row per token; the client holds the last guard blocks' V but not their K, and both K and
    V of the first guard blocks; the server's middle caches are the plaintext ones."""
    _check_caches(_Run(tiny_weights(12), CACHES, share=True, steps=steps))


def test_cache_check_catches_a_lock_key_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: ρ_i drawn under another label — the client still exact through generation (it
    unlocks the scores with the same drifted ρ_i) — fails the check above."""
    _drift(monkeypatch, "lock_perm", "lock-drift")
    run = _Run(tiny_weights(12), CACHES, share=True, steps=1)
    with pytest.raises(AssertionError):
        _check_caches(run)


def test_cache_check_catches_a_client_that_keeps_a_last_guard_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a client that also keeps the last guard blocks' K (attention done right, so still
    exact) fails the check above, which asks that it keep their V only."""
    run = _Run(tiny_weights(12), CACHES, share=True)
    st = run.client.state
    assert st is not None
    _, _, last = CACHES.blocks(run.w.config.n_layers)
    monkeypatch.setitem(st.guard_k, last.start, run.cache.keys[last.start])
    with pytest.raises(AssertionError):
        _check_caches(run)


# -- §5.2: key sharing uploads π_i of exactly the middle blocks --------------------------------------------


def _check_shares(run: _Run) -> None:
    c, cfg = run.w.config, run.cfg
    L = c.n_layers
    shares = run.link.view.select(stage=Stage.SHARE)
    # blocks numbered 1..L: the middle ones are l_s < i ≤ L − l_e (block i is layer i − 1)
    assert [m.layer for m in shares] == [i - 1 for i in range(1, L + 1) if cfg.l_s < i <= L - cfg.l_e]
    for m in shares:
        want = run.keys.permutation(("tok", m.layer, "qkv"), N + cfg.r1)
        np.testing.assert_array_equal(m.arrays["perm"], want)
        assert ("alpha" in m.arrays) is (cfg.level == "blind")  # §5.2: at level blind the noise too


@pytest.mark.parametrize(
    "cfg",
    [
        SCXConfig(l_s=1, l_e=1, max_length=12),
        SCXConfig(l_s=2, l_e=1, max_length=12),
        SCXConfig(level="blind", l_s=1, l_e=2, max_length=12),
        SCXConfig(l_s=2, l_e=2, max_length=12),
    ],
    ids=["1-1", "2-1", "blind-1-2", "2-2-no-middle"],
)
def test_key_sharing_uploads_pi_of_exactly_the_middle_blocks(cfg: SCXConfig) -> None:
    """DESIGN §5.2: "The client uploads π_i for the middle blocks l_s < i ≤ L − l_e. [...] The guard blocks
    stay locked. [...] (At level ``blind`` the middle blocks' noise is uploaded too [...])". The share
    messages name exactly those blocks, in order, and carry π_i as re-derived under ``("tok", i, "qkv")``
    (the QKV stage's key); with l_s + l_e = L nothing is shared."""
    _check_shares(_Run(tiny_weights(13), cfg, share=True))


def test_share_check_catches_a_block_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a client whose key sharing leaves out the last middle block (its cache is then
    never decodable; the prefill and the sharing still go through) fails the check above."""
    original = Client.share_keys

    def fewer(self: Client[Any], link: Any) -> None:
        middle = self.middle
        self.middle = range(middle.start, middle.stop - 1)
        try:
            original(self, link)
        finally:
            self.middle = middle

    monkeypatch.setattr(Client, "share_keys", fewer)
    run = _Run(tiny_weights(13), SCXConfig(l_s=1, l_e=1, max_length=12), share=True)
    with pytest.raises(AssertionError):
        _check_shares(run)


# -- §5.1 decoys, §5.1 levels, §6 default β ------------------------------------------------------------------


def _block1_decoys(w: ModelWeights, cfg: SCXConfig) -> Array:
    """The decoy rows of block 1's QKV message (level permute: the rows as the client encoded them)."""
    run = _Run(w, cfg)
    pi = run.keys.permutation(("tok", 0, "qkv"), N + cfg.r1)
    return run.one(Stage.QKV, 0)[pi >= N]


def _vocabulary_rows(w: ModelWeights, rows: Array) -> bool:
    table = np.asarray(w.embed, dtype=np.float64)
    return all(bool(np.any(np.all(table == r, axis=1))) for r in rows)


def test_default_decoys_of_block_1_are_vocabulary_rows() -> None:
    """DESIGN §5.1: "Decoys must look like real rows to an attacker who knows the architecture [...] (a
    block-1 row is a vocabulary-table row). The default policy draws decoys from a calibration pool [...]
    (block 1: embeddings of tokens [...])". With the default policy every decoy row of block 1's QKV
    message is a row of the embedding table; the moment-matched Gaussian (``decoys="gaussian"``), which the
    same sentence says is "flagged at once", is not (the control that the membership test can fail)."""
    w = tiny_weights(14)
    cfg = SCXConfig(level="permute", r1=4, max_length=12)
    assert SCXConfig().decoys == "calibration"
    decoys = _block1_decoys(w, cfg)
    assert decoys.shape == (4, w.config.hidden_size)
    assert _vocabulary_rows(w, decoys)
    gaussian = _block1_decoys(w, SCXConfig(level="permute", r1=4, decoys="gaussian", max_length=12))
    assert not any(_vocabulary_rows(w, r[None]) for r in gaussian)


def _levels_hold(plan_of: Callable[[SCXConfig, Any], ReleasePlan]) -> None:
    c = tiny_weights(15).config
    default = SCXConfig()
    assert (default.level, default.beta) == ("paper", 5.0)
    paper = plan_of(default, c)
    assert [(r.stage, r.block, r.beta) for r in paper.prefill] == [(Stage.QKV, 0, 5.0)]
    for g in (1, 2):  # permute: no noise anywhere, prefill or generation
        plan = plan_of(SCXConfig(level="permute", l_s=g, l_e=g), c)
        assert plan.prefill == () and plan.generation == ()
    blind = plan_of(SCXConfig(level="blind"), c)
    linear = {(Stage.QKV, i) for i in range(c.n_layers)} | {(Stage.O, i) for i in range(c.n_layers)}
    linear |= {(s, i) for s in (Stage.FFN, Stage.FFN_DOWN) for i in range(c.n_layers)}
    assert {(r.stage, r.block) for r in blind.prefill} == linear | {(Stage.HEAD, c.n_layers)}


def test_privacy_levels_and_the_default_beta() -> None:
    """DESIGN §5.1: "Privacy levels: ``permute`` (no noise anywhere), ``paper`` (noise in block 1 only —
    the paper's choice and scx_ref's default), ``blind`` (noise on every linear stage [...])"; §6: "Default
    β for level ``paper`` is the paper's s = 5". The default configuration is level ``paper`` at β = 5,
    whose prefill noises block 1's QKV stage alone; ``permute`` has no release at all (prefill or
    generation, with one or two guard blocks); ``blind`` noises every linear stage of every block and the
    LM head at prefill."""
    _levels_hold(ReleasePlan.of)


def test_levels_check_catches_a_plan_that_noises_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a plan whose level ``paper`` also noised the last block's QKV stage fails the check
    above."""
    original = ReleasePlan.of

    def more(config: SCXConfig, model: Any) -> ReleasePlan:
        plan = original(config, model)
        if config.level != "paper":
            return plan
        extra = Release(Phase.PREFILL, Stage.QKV, model.n_layers - 1, "qkv", config.beta)
        return ReleasePlan(config, model, (*plan.prefill, extra), plan.generation)

    with pytest.raises(AssertionError):
        _levels_hold(more)


# -- §5.3: a generation step's attention message is under a one-time P_t ----------------------------------


def _head_permute(x: Array, order: Array, sigmas: Array) -> Array:
    """T3 on KV heads (rows × H_kv × d_h), written here: slot j holds KV group ``order[j]``, its coordinates
    reordered by that group's σ (X[…, σ])."""
    return np.stack([x[:, g, :][:, sigmas[g]] for g in order], axis=1)


def _check_one_time_heads(run: _Run) -> None:
    c, keys = run.w.config, run.keys
    first = run.cfg.server_gen_attention(c.n_layers)
    assert list(first)
    kv = (c.n_kv_heads, c.head_dim)
    for t in range(len(run.tokens)):
        for i in first:
            (m,) = run.link.view.select(stage=Stage.GEN_ATTN, layer=i, step=t)
            label = ("head", i, "gen", t)
            order = keys.permutation((*label, "groups"), c.n_kv_heads)
            sigmas = np.stack([keys.permutation((*label, "sigma", g), c.head_dim) for g in range(kv[0])])
            rows = N + t + 1  # "the whole cache, O(t)"
            true_k = np.asarray(run.cache.keys[i])[:rows].reshape(rows, *kv)
            true_v = np.asarray(run.cache.values[i])[:rows].reshape(rows, *kv)
            _close(m.arrays["k"], _head_permute(true_k, order, sigmas))
            _close(m.arrays["v"], _head_permute(true_v, order, sigmas))


GEN_SERVER = SCXConfig(gen_attention="server", max_length=12)


def test_a_generation_step_sends_the_cache_under_a_one_time_head_permutation() -> None:
    """DESIGN §5.3: "[the client] draws a one-time P_t and sends qP_t, KP_t, VP_t (the whole cache, O(t))";
    §5.1: "Generation uses **one-time** keys per token"; §3: labels name "the key's role, layer and step".
    With the paper's flow (``gen_attention="server"``) each step's ``gen_attn`` message carries the block's
    whole plaintext K and V cache (n + t + 1 rows) under the head-structured P re-derived from
    ``("head", i, "gen", t)``: a fresh P per token."""
    _check_one_time_heads(_Run(tiny_weights(17), GEN_SERVER, share=True, steps=3))


def test_one_time_head_check_catches_a_reused_head_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a client that reuses the prefill's P_i at every step (still exact) fails the check
    above."""
    original = RequestKeys.head_perm

    def reused(self: RequestKeys, block: int, step: int | None = None) -> Any:
        return original(self, block)

    monkeypatch.setattr(RequestKeys, "head_perm", reused)
    run = _Run(tiny_weights(17), GEN_SERVER, share=True, steps=3)
    with pytest.raises(AssertionError):
        _check_one_time_heads(run)

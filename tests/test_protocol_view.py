"""What the server sees (DESIGN §5.4), and negative controls proving the exactness checks can fail.

* No secret in the view: the master secret, every guard-block key (π_i, π′_i, ρ_i, P_i, α_i) and every
  one-time generation key (P_t, α_t) is searched for in every recorded array (as a contiguous run of
  values and as raw bytes) and in every meta value; the middle blocks' shared π_i — which *are* sent —
  are found by the same search (positive control of the search itself).
* The attention stage's Q, K, V differ from plaintext Q, K, V; they equal them under the client's
  head-structured P_i (so the comparison is meaningful).
* The server alone — its view, its weights, its caches, the shared keys, even the true next token —
  cannot produce the next logits: its best attempts with the locked / raw guard caches are far off,
  while the same forward pass with the true caches reproduces them (positive control).
* Negative controls: a wrong key, a skipped unblinding correction, a skipped unpermutation, RoPE applied
  after σ, and the paper's last-guard FFN (T7) each break exactness; the unbroken client is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref import ops
from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.keys import KeySchedule
from scx_ref.protocol import CalibrationPool, Client, LocalTransport, SCXConfig, Server, Stage
from scx_ref.protocol import client as client_mod
from scx_ref.protocol.decoys import default_public_tokens
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.reference import KVCache, ReferenceModel
from scx_ref.transforms import HeadPermutation, laplace_noise, strip_decoys
from scx_ref.weights import ModelWeights, random_weights

Array = npt.NDArray[Any]
RTOL = 1e-10
N, R1, R2, R_LOCK, GEN = 12, 3, 2, 4, 3
MASTER = bytes(range(100, 132))
NONCE = bytes(range(16))


def model(moe: bool = False, layers: int = 4) -> ModelWeights:
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        n_layers=layers,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        n_experts=4 if moe else 0,
        top_k=2 if moe else 0,
        qkv_bias=not moe,
        max_positions=64,
    )
    return random_weights(cfg, np.random.default_rng(7))


def prompt(vocab: int = 64) -> npt.NDArray[np.int64]:
    return np.random.default_rng(3).integers(0, vocab, size=N).astype(np.int64)


def rel_err(got: Array, want: Array) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def scx_config(level: str = "paper", **kw: Any) -> SCXConfig:
    base: dict[str, Any] = dict(level=level, r1=R1, r2=R2, r_lock=R_LOCK, l_s=1, l_e=1, beta=5.0)
    base.update(kw)
    return SCXConfig(**base)


def run(
    weights: ModelWeights, cfg: SCXConfig, backend: Any = None, gen: int = GEN
) -> tuple[Client[Any], Server[Any], LocalTransport, list[Array], list[Array]]:
    """Prefill + ``gen`` decode steps with the plaintext argmax tokens; returns SCX and plaintext logits."""
    true_backend = NumpyBackend(weights)
    server: Server[Any] = Server(true_backend)
    link = LocalTransport(server, record_view=True)
    pool = CalibrationPool.from_tokens(true_backend, default_public_tokens(weights.config.vocab_size))
    client: Client[Any] = Client(backend or true_backend, KeySchedule(MASTER, NONCE), cfg, decoys=pool)
    ref = ReferenceModel(weights)
    ids = prompt(weights.config.vocab_size)
    want, cache = ref.prefill(ids)
    got_all, want_all = [client.prefill(ids, link)], [want]
    client.share_keys(link)
    token = int(np.argmax(want[-1]))
    for _ in range(gen):
        got_all.append(client.decode(token, link))
        want_all.append(ref.decode(token, cache))
        token = int(np.argmax(want_all[-1]))
    return client, server, link, got_all, want_all


def max_err(got: list[Array], want: list[Array]) -> float:
    return max(rel_err(g, w) for g, w in zip(got, want, strict=True))


# -- searching the view ---------------------------------------------------------------------------
def contains_run(hay: Array, needle: Array) -> bool:
    """Does ``needle`` occur as a contiguous run of values in ``hay`` (flattened, numeric equality)?"""
    flat = np.asarray(hay).reshape(-1)
    k = needle.size
    if k == 0 or flat.size < k or not np.issubdtype(flat.dtype, np.number):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(flat, k)
    return bool(np.any(np.all(windows == needle.reshape(1, k), axis=1)))


def contains_rows(hay: Array, rows: Array, atol: float = 1e-12) -> bool:
    """Does any row of ``rows`` (width d) appear, to ``atol``, as a length-d run of ``hay``?"""
    flat = (
        np.asarray(hay, dtype=np.float64).reshape(-1)
        if np.issubdtype(np.asarray(hay).dtype, np.number)
        else np.zeros(0)
    )
    d = rows.shape[-1]
    if flat.size < d:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(flat, d)
    return any(bool(np.any(np.all(np.abs(windows - r) <= atol, axis=1))) for r in rows.reshape(-1, d))


def meta_text(link: LocalTransport) -> str:
    return " ".join(repr(m.meta) + " " + m.session for m in link.view.messages)


def all_arrays(link: LocalTransport) -> list[Array]:
    return [a for m in link.view.messages + link.view.replies for a in m.arrays.values()]


def perm_found(link: LocalTransport, perm: Array) -> bool:
    """``perm`` in any array (values or int64/int32/float64 bytes) or any meta value of the view."""
    patterns = [np.asarray(perm, dtype=t).tobytes() for t in ("<i8", "<i4", "<f8")]
    for a in all_arrays(link):
        raw = np.ascontiguousarray(a).tobytes()
        if contains_run(a, perm) or any(p in raw for p in patterns):
            return True
    text = meta_text(link)
    listed = ", ".join(str(int(v)) for v in perm)
    return listed in text or any(p.hex() in text for p in patterns)


def secret_keys(cfg: SCXConfig, weights: ModelWeights, gen: int) -> dict[str, Array]:
    """Every key §5.4 says must never reach the server, re-derived from the schedule: name → array."""
    c = weights.config
    keys = KeySchedule(MASTER, NONCE)
    first, _, last = cfg.blocks(c.n_layers)
    out: dict[str, Array] = {}
    for i in [*first, *last]:
        out[f"pi_{i}"] = keys.permutation(("tok", i, "qkv"), N + R1)
    for i in range(c.n_layers):
        out[f"pi'_{i}"] = keys.permutation(("tok", i, "o"), N + R2)
        out[f"P_{i}"] = _head_perm_flat(keys, ("head", i), c)
    out["pi_head"] = keys.permutation(("tok", c.n_layers, "qkv"), N + R1)
    for i in last:
        out[f"rho_{i}"] = keys.permutation(("lock", i), N + R_LOCK)
    for t in range(gen):
        for i in first:
            out[f"P_{i},t{t}"] = _head_perm_flat(keys, ("head", i, "gen", t), c)
    return out


def _head_perm_flat(keys: KeySchedule, label: tuple[Any, ...], c: ModelConfig) -> Array:
    """The σ_g of a head-structured P, concatenated (n_kv·d_h values: long enough to be unmistakable)."""
    return np.concatenate([keys.permutation((*label, "sigma", g), c.head_dim) for g in range(c.n_kv_heads)])


def secret_noise(cfg: SCXConfig, weights: ModelWeights, gen: int) -> dict[str, Array]:
    """Guard-block prefill noise α_i and one-time generation noise α_t (the rows the client adds)."""
    c, keys = weights.config, KeySchedule(MASTER, NONCE)
    first, _, last = cfg.blocks(c.n_layers)
    plan = ReleasePlan.of(cfg, c)
    out: dict[str, Array] = {}
    for i in first:
        if plan.find(Stage.QKV, i) is not None:
            out[f"alpha_{i}"] = laplace_noise(
                (N + R1, c.hidden_size), cfg.beta, keys.generator(("alpha", i, "qkv"))
            )
    for t in range(gen):
        for i in first:
            out[f"alpha_{i},t{t}"] = laplace_noise(
                (1, c.hidden_size), cfg.beta, keys.generator(("alpha", i, "qkv", "gen", t))
            )
        for i in [*first, *last]:
            label: tuple[Any, ...] = ("alpha", i, "ffn", "gen", t, "up", *((0,) if c.is_moe else ()))
            out[f"alpha_ffn_{i},t{t}"] = laplace_noise((1, c.hidden_size), cfg.beta, keys.generator(label))
    return out


@pytest.mark.parametrize("level", ["paper", "blind"])
@pytest.mark.parametrize("moe", [False, True])
def test_no_secret_in_the_view(level: str, moe: bool) -> None:
    weights = model(moe)
    cfg = scx_config(level)
    _, _, link, got, want = run(weights, cfg)
    assert max_err(got, want) <= RTOL  # the run itself is exact
    arrays = all_arrays(link)
    # the master secret: in no array's bytes, no meta value, no session id
    text = meta_text(link)
    assert MASTER.hex() not in text and MASTER.hex().upper() not in text
    assert not any(MASTER in np.ascontiguousarray(a).tobytes() for a in arrays)
    assert not any(MASTER[:16] in np.ascontiguousarray(a).tobytes() for a in arrays)
    # guard-block and one-time keys: never found
    found = [name for name, perm in secret_keys(cfg, weights, GEN).items() if perm_found(link, perm)]
    assert found == [], f"secret keys visible to the server: {found}"
    # positive control: the middle blocks' π_i are shared, and the same search finds them
    keys = KeySchedule(MASTER, NONCE)
    middle = cfg.blocks(weights.config.n_layers)[1]
    assert len(middle) == 2
    for i in middle:
        assert perm_found(link, keys.permutation(("tok", i, "qkv"), N + R1)), f"search misses shared π_{i}"
    # noise: no guard-block / one-time noise row appears in any array
    for name, eta in secret_noise(cfg, weights, GEN).items():
        assert not any(contains_rows(a, eta) for a in arrays), f"noise {name} visible to the server"
        assert not any(eta[0].tobytes() in np.ascontiguousarray(a).tobytes() for a in arrays)


def test_noise_search_finds_shared_alpha_at_level_blind() -> None:
    """Positive control of the noise search: at level blind the middle blocks' α_i are uploaded."""
    weights = model()
    cfg = scx_config("blind")
    _, _, link, _, _ = run(weights, cfg, gen=1)
    keys = KeySchedule(MASTER, NONCE)
    for i in cfg.blocks(weights.config.n_layers)[1]:
        alpha = laplace_noise((N + R1, 32), cfg.beta, keys.generator(("alpha", i, "qkv")))
        assert any(contains_rows(a, alpha) for a in all_arrays(link))


# -- the attention stage -------------------------------------------------------------------------
def plaintext_qkv(weights: ModelWeights, ids: Array) -> list[tuple[Array, Array, Array]]:
    """Plaintext Q, K (after RoPE) and V of every block at prefill, from the reference forward."""
    c, ref = weights.config, ReferenceModel(weights)
    pos = np.arange(len(ids))
    x = ops.embed(ids, weights.embed)
    out = []
    cache = KVCache()
    for i, lw in enumerate(weights.layers):
        q, k, v = ops.qkv(ops.rms_norm(x, lw.attn_norm, c.rms_eps), lw, c.n_heads, c.n_kv_heads, c.head_dim)
        out.append((ops.apply_rope(q, pos, c.rope_theta), ops.apply_rope(k, pos, c.rope_theta), v))
        x = ref.block(x, lw, pos, i, cache)
    return out


@pytest.mark.parametrize("level", ["permute", "paper"])
def test_attention_stage_differs_from_plaintext_qkv(level: str) -> None:
    weights = model()
    c = weights.config
    _, _, link, _, _ = run(weights, scx_config(level), gen=0)
    keys = KeySchedule(MASTER, NONCE)
    plain = plaintext_qkv(weights, prompt())
    for i, (q, k, v) in enumerate(plain):
        (msg,) = link.view.select(stage="attn", layer=i)
        for name, sent, clear in (
            ("q", msg.arrays["q"], q),
            ("k", msg.arrays["k"], k),
            ("v", msg.arrays["v"], v),
        ):
            assert sent.shape == clear.shape
            assert not np.allclose(sent, clear), f"block {i}: {name} sent in the clear"
        # what was sent is exactly the plaintext under the client's P_i (so "differs" is meaningful)
        hp = HeadPermutation(
            keys.permutation(("head", i, "groups"), c.n_kv_heads),
            np.stack([keys.permutation(("head", i, "sigma", g), c.head_dim) for g in range(c.n_kv_heads)]),
        )
        np.testing.assert_allclose(msg.arrays["q"], hp.apply(q, c.group_size), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(msg.arrays["k"], hp.apply(k, 1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(msg.arrays["v"], hp.apply(v, 1), rtol=1e-10, atol=1e-12)


# -- the server alone ----------------------------------------------------------------------------
def forward_with_caches(
    weights: ModelWeights, token: int, pos: int, caches: list[tuple[Array, Array]]
) -> Array:
    """Plaintext logits of ``token`` at position ``pos`` given per-block (K after RoPE, V) caches that
    the new query attends to in full (T4: row order does not matter)."""
    c = weights.config
    p = np.array([pos])
    x = ops.embed(np.array([token]), weights.embed)
    for lw, (ck, cv) in zip(weights.layers, caches, strict=True):
        q, k, v = ops.qkv(ops.rms_norm(x, lw.attn_norm, c.rms_eps), lw, c.n_heads, c.n_kv_heads, c.head_dim)
        q, k = ops.apply_rope(q, p, c.rope_theta), ops.apply_rope(k, p, c.rope_theta)
        keys = np.concatenate([ck.reshape(-1, c.n_kv_heads, c.head_dim), k])
        vals = np.concatenate([cv.reshape(-1, c.n_kv_heads, c.head_dim), v])
        x = x + ops.attention(q, keys, vals).reshape(1, c.q_dim) @ lw.wo
        x = x + ops.mlp(ops.rms_norm(x, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
    return (ops.rms_norm(x, weights.final_norm, c.rms_eps) @ weights.lm_head)[0]


@pytest.mark.parametrize("level", ["permute", "paper"])
def test_server_alone_cannot_produce_the_next_logits(level: str) -> None:
    weights = model()
    c = weights.config
    cfg = scx_config(level)
    client, server, _, _, want = run(weights, cfg, gen=0)
    ids = prompt()
    token = int(np.argmax(want[0][-1]))  # the server is even handed the true next token
    _, true_cache = ReferenceModel(weights).prefill(ids)
    true_next = ReferenceModel(weights).decode(token, true_cache.copy())
    truth = list(zip(true_cache.keys, true_cache.values, strict=True))
    # positive control: this forward pass with the true caches gives the true next logits
    assert rel_err(forward_with_caches(weights, token, N, truth), true_next) <= RTOL
    s = server.sessions[client.session]
    first, middle, _ = cfg.blocks(c.n_layers)
    kv = (c.n_kv_heads, c.head_dim)
    # the middle caches the server holds after key sharing are the true ones
    for i in middle:
        np.testing.assert_allclose(s.valid[i][0], truth[i][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.valid[i][1], truth[i][1], rtol=1e-10, atol=1e-12)

    def raw(i: int) -> tuple[Array, Array]:  # the raw (permuted, decoyed) cache, RoPE at row positions
        zk, zv = s.raw[i]
        return ops.apply_rope(zk.reshape(-1, *kv), np.arange(zk.shape[0]), c.rope_theta), zv

    def locked(i: int) -> tuple[Array, Array]:  # the locked keys, with the raw values cut/padded to fit
        k, zv = s.locked[i], s.raw[i][1]
        v = np.zeros((k.shape[0], zv.shape[1]))
        m = min(k.shape[0], zv.shape[0])
        v[:m] = zv[:m]
        return k, v

    attempts: dict[str, list[tuple[Array, Array]]] = {
        # raw caches of the guard blocks, the locked keys with raw values of the last blocks
        "raw first, locked/raw last": [
            raw(i) if i in first else s.valid[i] if i in middle else locked(i) for i in range(c.n_layers)
        ],
        # zeros for the first blocks, the locked keys with zero values for the last blocks
        "zero first, locked/zero last": [
            (np.zeros((N, *kv)), np.zeros((N, *kv)))
            if i in first
            else s.valid[i]
            if i in middle
            else (s.locked[i], np.zeros((s.locked[i].shape[0], *kv)))
            for i in range(c.n_layers)
        ],
        # only the first guard is missing: even with the true last-guard caches it fails
        "raw first, true last": [
            raw(i) if i in first else s.valid[i] if i in middle else truth[i] for i in range(c.n_layers)
        ],
        # only the last guard is missing
        "true first, locked/raw last": [
            truth[i] if i in first else s.valid[i] if i in middle else locked(i) for i in range(c.n_layers)
        ],
    }
    for name, caches in attempts.items():
        err = rel_err(forward_with_caches(weights, token, N, caches), true_next)
        assert err > 1e-3, f"the server's attempt {name!r} came within {err:.2e} of the true logits"


# -- negative controls: break one client step, exactness must fail ------------------------------
# Each control replaces one transform the client calls (its single implementation, imported into
# scx_ref.protocol.client) or one backend weight op, then checks that exactness is lost.
_OTHER = KeySchedule(b"\x01" * 32, bytes(16))


def _wrong_key(mp: pytest.MonkeyPatch, b: NumpyBackend) -> None:
    """T1 decode with another KeySchedule's permutation of the same size."""
    real, real_qkv = client_mod.decode_rows, client_mod.decode_qkv_heads

    def other(perm: Any) -> Any:
        return _OTHER.permutation(("tok", 0, "qkv"), len(perm))

    mp.setattr(client_mod, "decode_rows", lambda y, perm, n, ops: real(y, other(perm), n, ops))
    mp.setattr(
        client_mod,
        "decode_qkv_heads",
        lambda z, perm, n, pos, head, g, ops, **kw: real_qkv(z, other(perm), n, pos, head, g, ops, **kw),
    )


def _no_correction(mp: pytest.MonkeyPatch, b: NumpyBackend) -> None:
    """Skip the unblinding correction ηW (T5): the client backend's correction returns zeros."""
    real = b.correction
    mp.setattr(b, "correction", lambda eta, *a, **k: np.zeros_like(real(eta, *a, **k)))


def _no_unpermute(mp: pytest.MonkeyPatch, b: NumpyBackend) -> None:
    """Skip the token unpermutation (T1 decode): keep the server's row order, only drop the tail."""
    real_qkv = client_mod.decode_qkv_heads
    mp.setattr(client_mod, "decode_rows", lambda y, perm, n, ops: strip_decoys(y, n, ops))
    mp.setattr(
        client_mod,
        "decode_qkv_heads",
        lambda z, perm, n, pos, head, g, ops, **kw: real_qkv(
            z, np.arange(len(perm)), n, pos, head, g, ops, **kw
        ),
    )


def _no_head_unpermute(mp: pytest.MonkeyPatch, b: NumpyBackend) -> None:
    """Skip the T3 decode of the attention output."""
    real = client_mod.encode_head_rows

    def encode_head_rows(o: Array, head: HeadPermutation, g: int, dec: Array, pi: Any, ops: Any) -> Array:
        return real(o, HeadPermutation.identity(head.n_kv_heads, head.head_dim), g, dec, pi, ops)

    mp.setattr(client_mod, "head_unpermute", lambda y, perm, group_size=1, ops=None: y)
    mp.setattr(client_mod, "encode_head_rows", encode_head_rows)


def _rope_after_sigma(mp: pytest.MonkeyPatch, b: NumpyBackend) -> None:
    """Apply RoPE *after* the head permutation σ (RoPE does not commute with σ, DESIGN T3): the client
    backend's fused decode gathers the columns first and rotates the permuted heads."""
    real_rope, dh = b.rope, b.config.head_dim

    def rope_take(x: Array, rows: Any, positions: Any, rope_index: Any, plain_index: Any, **kw: Any) -> Any:
        t = np.asarray(x)[np.asarray(rows)]
        n, w = t.shape[0], len(rope_index)
        permuted = t[:, :w][:, np.asarray(rope_index)].reshape(n, -1, dh)
        plain = t[:, w:][:, np.asarray(plain_index)].reshape(n, -1, dh)
        return real_rope(permuted, positions), plain

    mp.setattr(b, "rope_take", rope_take)


@pytest.mark.parametrize(
    "broken", [_wrong_key, _no_correction, _no_unpermute, _no_head_unpermute, _rope_after_sigma]
)
def test_a_broken_client_step_breaks_exactness(broken: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = model(layers=3)
    cfg = scx_config("paper")
    _, _, _, got, want = run(weights, cfg, gen=1)
    assert max_err(got, want) <= RTOL  # the unbroken client is exact on this very setup
    true_backend = NumpyBackend(weights)  # the server's backend is built before the break
    server: Server[Any] = Server(true_backend)
    pool = CalibrationPool.from_tokens(true_backend, default_public_tokens(weights.config.vocab_size))
    client_backend = NumpyBackend(weights)
    with monkeypatch.context() as mp:
        broken(mp, client_backend)
        client: Client[Any] = Client(client_backend, KeySchedule(MASTER, NONCE), cfg, decoys=pool)
        got_b = client.prefill(prompt(weights.config.vocab_size), LocalTransport(server))
    err = rel_err(got_b, want[0])
    assert err > 1e-6, f"{broken.__name__}: prefill logits still match plaintext (rel err {err:.1e})"


@pytest.mark.parametrize("moe", [False, True])
def test_paper_last_guard_ffn_is_not_exact(moe: bool) -> None:
    """T7: the paper's constant-offset last-guard FFN relies on RMSNorm(x + α) = RMSNorm(x), which is
    false — its generation logits differ; the default exact form matches plaintext."""
    weights = model(moe, layers=3)
    _, _, _, got, want = run(weights, scx_config("paper", last_ffn="exact"))
    assert max_err(got, want) <= RTOL
    _, _, _, got_p, want_p = run(weights, scx_config("paper", last_ffn="paper"))
    assert rel_err(got_p[0], want_p[0]) <= RTOL  # prefill does not use it
    errs = [rel_err(g, w) for g, w in zip(got_p[1:], want_p[1:], strict=True)]
    assert min(errs) > 1e-6, f"the paper's last-guard FFN came out exact: {errs}"

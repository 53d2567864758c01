"""The hardened configurations (DESIGN §5.7) are exact and send what they claim.

* every option — client-side guard attention, no key sharing (every block a guard) and guards in between,
  W_o and the LM head blinded on the server at every step — equals plaintext inference in float64 (rtol
  1e-10, greedy identical) on dense, MoE and Qwen2-bias models, at every level;
* float32 on the torch backend stays within DESIGN §6's bound, and with β above the float32 limit the
  blinded stages run in float64 (``blind_dtype="auto"``) and stay within it where float32 blinding does not;
* the server refuses the stages a configuration does not use (attention of a client-attention guard block,
  a locked cache, W_o / LM head messages the client keeps), so a view has exactly the configuration's
  messages;
* the offline mask pool: an entry serves exactly one request (taken from the pool, its masks dropped as
  used, its nonce refused afterwards), the view equals the one without a pool, any length up to capacity.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, PrecisionWarning, ProtocolError, SessionError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import CalibrationPool, Client, LocalTransport, SCXConfig, Server, Stage
from scx_ref.protocol.config import F32_BETA_LIMIT
from scx_ref.protocol.messages import Request
from scx_ref.protocol.pool import MaskPool
from scx_ref.protocol.presets import preset
from scx_ref.reference import ReferenceModel
from scx_ref.weights import ModelWeights, random_weights
from tests.views import assert_same_view

MASTER = bytes(range(1, 33))
IDS = np.array([5, 17, 42, 8, 33, 2, 9])
STEPS = 3
BASE = dict(
    vocab_size=64, hidden_size=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48,
    max_positions=64,
)  # fmt: skip
MODELS = {
    "dense": ModelConfig(**BASE),  # type: ignore[arg-type]
    "moe": ModelConfig(**BASE, n_experts=4, top_k=2),  # type: ignore[arg-type]
    "qwen": ModelConfig(**BASE, qkv_bias=True),  # type: ignore[arg-type]
}


def _weights(name: str) -> ModelWeights:
    return random_weights(MODELS[name], np.random.default_rng(3))


def _run(client: Client[Any], weights: ModelWeights, link: Any) -> float:
    """Prefill and STEPS decode steps against ReferenceModel; the worst relative logit error (asserts
    greedy agreement at every step)."""
    ref = ReferenceModel(weights)
    want, cache = ref.prefill(IDS)
    got = client.prefill(IDS, link)
    assert client.cfg.verify and client.state is not None and client.state.verifier is not None
    err = float(np.abs(got - want).max() / np.abs(want).max())
    token = int(np.argmax(want[-1]))
    assert int(np.argmax(got[-1])) == token
    for step in range(STEPS):
        w, g = ref.decode(token, cache), client.decode(token, link)
        err = max(err, float(np.abs(g - w).max() / np.abs(w).max()))
        assert int(np.argmax(g)) == int(np.argmax(w)), f"greedy token differs at step {step}"
        token = int(np.argmax(w))
    assert client.verify_worst > 0  # every reply was checked (Freivalds) before it was used
    return err


OPTIONS = [
    pytest.param(m, level, att, gl, guards, id=f"{m}-{level}-{att}-{gl}-g{guards[0]}{guards[1]}")
    for m in MODELS
    for level, att, gl, guards in itertools.product(
        ("permute", "paper", "blind"), ("server", "client"), ("client", "server"), ((1, 1), (2, 1), (3, 1))
    )
    if not (att == "server" and gl == "client" and guards == (1, 1))  # the paper's own: tested elsewhere
]


@pytest.mark.parametrize(("model", "level", "attention", "gen_linear", "guards"), OPTIONS)
def test_every_option_is_exact_in_float64(
    model: str, level: Any, attention: Any, gen_linear: Any, guards: tuple[int, int]
) -> None:
    weights = _weights(model)
    backend = NumpyBackend(weights)
    cfg = SCXConfig(
        level=level, attention=attention, gen_linear=gen_linear, l_s=guards[0], l_e=guards[1], r1=2, r2=3,
        max_length=64,
    )  # fmt: skip
    client = Client(backend, KeySchedule(MASTER, bytes(16)), cfg)
    assert _run(client, weights, LocalTransport(Server(backend))) <= 1e-10


@pytest.mark.parametrize("model", list(MODELS))
def test_hardened_preset_is_exact_and_its_view_has_no_clear_stage(model: str) -> None:
    weights = _weights(model)
    backend = NumpyBackend(weights)
    cfg = preset("hardened").config(weights.config.n_layers)
    link = LocalTransport(Server(backend), record_view=True)
    client = Client(backend, KeySchedule(MASTER, bytes(16)), cfg)
    assert _run(client, weights, link) <= 1e-10
    stages = {m.stage for m in link.view.messages}
    assert not stages & {Stage.ATTN, Stage.LOCK, Stage.SHARE, Stage.GEN_ATTN, Stage.GEN_MID, Stage.GEN_LAST}
    assert {Stage.GEN_O, Stage.GEN_HEAD, Stage.GEN_QKV} <= stages
    assert {m.layer for m in link.view.select(stage=Stage.GEN_QKV)} == set(range(weights.config.n_layers))


@pytest.mark.parametrize("gen_attention", ["client", "server"])
@pytest.mark.parametrize("model", list(MODELS))
def test_step_attention_on_either_side_is_exact_and_only_the_papers_is_sent(
    model: str, gen_attention: Any
) -> None:
    """``gen_attention``: a step's attention of the first guard blocks by the client on the cache it
    holds (the default) or by the server under a one-time P (the paper's ``gen_attn``) — exact either
    way; the view holds ``gen_attn`` messages (one per first guard block and step) only for the paper's,
    and the rest of the view has the same stages."""
    weights = _weights(model)
    backend = NumpyBackend(weights)
    cfg = SCXConfig(level="paper", l_s=2, l_e=1, r1=2, r2=3, max_length=64, gen_attention=gen_attention)
    link = LocalTransport(Server(backend), record_view=True)
    client = Client(backend, KeySchedule(MASTER, bytes(16)), cfg)
    assert _run(client, weights, link) <= 1e-10
    sent = [(m.layer, m.step) for m in link.view.select(stage=Stage.GEN_ATTN)]
    if gen_attention == "server":
        assert sorted(sent) == [(i, t) for i in (0, 1) for t in range(STEPS)]
    else:
        assert sent == []
    stages = {m.stage for m in link.view.messages} - {Stage.GEN_ATTN}
    assert {Stage.GEN_QKV, Stage.GEN_MID, Stage.GEN_LAST, Stage.GEN_FFN_UP} <= stages


def test_gen_attention_server_contradicts_client_attention() -> None:
    with pytest.raises(ConfigError, match="gen_attention='server' contradicts attention='client'"):
        SCXConfig(attention="client", gen_attention="server")
    with pytest.raises(ConfigError, match="gen_attention must be 'client' or 'server', got 'gpu'"):
        SCXConfig(gen_attention="gpu")  # type: ignore[arg-type]


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("model", list(MODELS))
def test_float32_and_wide_blinding(model: str) -> None:
    """float32: within the bound at float32's blinding limit (β = 1) and at β = 5 (``auto``: blinded in
    float64 since stop 70); at β = 1000 float32 blinding is far off (its rounding grows with β), and
    ``blind_dtype="auto"`` runs the blinded stages in float64 and is back within float32's own rounding;
    greedy identical throughout."""
    from scx_ref.backends.torch_backend import TorchBackend

    weights = _weights(model)
    w32 = weights.astype(np.float32)
    errors = {}
    for beta, blind_dtype in ((F32_BETA_LIMIT, "auto"), (5.0, "auto"), (1000.0, "backend"), (1000.0, "auto")):
        backend = TorchBackend(w32, torch.float32)
        cfg = preset("hardened").config(4)
        cfg = SCXConfig(**{**cfg.to_dict(), "beta": beta, "blind_dtype": blind_dtype, "max_length": 64})
        if blind_dtype == "backend" and beta > F32_BETA_LIMIT:  # float32 blinding past its limit: said
            with pytest.warns(PrecisionWarning, match="float32 on a float32 backend"):
                client = Client(backend, KeySchedule(MASTER, bytes(16)), cfg)
        else:
            client = Client(backend, KeySchedule(MASTER, bytes(16)), cfg)
        assert client.wide == (blind_dtype == "auto" and beta > F32_BETA_LIMIT)
        errors[(beta, blind_dtype)] = _run(client, weights, LocalTransport(Server(backend)))
    assert errors[(F32_BETA_LIMIT, "auto")] < 1e-4 and errors[(5.0, "auto")] < 1e-4
    assert errors[(1000.0, "backend")] > 10 * errors[(1000.0, "auto")]
    assert errors[(1000.0, "auto")] < 1e-5


@pytest.mark.parametrize("wide", [False, True], ids=["float64", "float32-wide"])
def test_hardened_replies_are_verified(wide: bool) -> None:
    """Every reply of the hardened configuration is checked before use: W_o and the LM head sent blinded
    at each step (gen_o, gen_head), a client-attention guard block's QKV stage, a last guard block's
    generation QKV — ×1.001 on any of them is an IntegrityError, also when the blinded stages travel in
    float64 from a float32 client (β above the float32 limit); without verification the same tampering
    silently changes the logits (the control)."""
    from scx_ref.backends.torch_backend import TorchBackend
    from tests.test_adversarial_server import detected, on, scaled, undetected_and_wrong
    from tests.test_adversarial_server import weights as adv_weights

    w = adv_weights(bias=True)
    cfg = replace(preset("hardened").config(w.config.n_layers), r1=2, r2=2)
    backend = None
    if wide:
        cfg = replace(cfg, beta=20.0)
        backend = TorchBackend(w.astype(np.float32), torch.float32)
        assert Client(backend, KeySchedule(MASTER, bytes(16)), cfg).wide
    for stage, nth in ((Stage.GEN_O, 0), (Stage.GEN_O, 5), (Stage.GEN_HEAD, 1), (Stage.QKV, 2)):
        detected(w, cfg, on(stage, scaled(1.001), nth=nth), backend=backend)
    L = w.config.n_layers
    last_qkv = on(Stage.GEN_QKV, scaled(1.001), nth=L - 1)  # step 0's message of the last block
    detected(w, cfg, last_qkv, backend=backend)
    if not wide:
        undetected_and_wrong(w, cfg, on(Stage.GEN_O, scaled(1.001)))
        undetected_and_wrong(w, cfg, on(Stage.GEN_HEAD, scaled(1.001)))


def _raw(server: Server[Any], client: Client[Any], stage: Stage, layer: int, step: int, **arrays: Any) -> Any:
    """A hand-made message on ``client``'s session (its id, next seq and token)."""
    st = client.state
    assert st is not None
    return server.handle(Request(st.keys.session_id, stage, layer, step, st.seq, arrays, {}, st.token))


def test_server_refuses_stages_the_configuration_does_not_use() -> None:
    weights = _weights("dense")
    backend = NumpyBackend(weights)
    c = weights.config
    cfg = SCXConfig(level="blind", attention="client", l_s=1, l_e=1, max_length=64)
    server = Server(backend)
    client = Client(backend, KeySchedule(MASTER, bytes(16)), cfg)
    link = LocalTransport(server)
    client.prefill(IDS, link)
    st = client.state
    assert st is not None
    sid, n = st.keys.session_id, len(IDS)
    with pytest.raises(ProtocolError, match="locked cache"):
        _raw(server, client, Stage.LOCK, c.n_layers - 1, -1, k=np.zeros((n + 2, c.kv_dim)))
    with pytest.raises(ProtocolError, match="gen_o"):
        _raw(server, client, Stage.GEN_O, 0, 0, x=np.zeros((1, c.q_dim)))
    with pytest.raises(ProtocolError, match="gen_head"):
        _raw(server, client, Stage.GEN_HEAD, c.n_layers, 0, x=np.zeros((1, c.hidden_size)))
    q = np.zeros((1, c.n_heads, c.head_dim))
    kv = np.zeros((n + 1, c.n_kv_heads, c.head_dim))
    with pytest.raises(ProtocolError, match="gen_attn"):
        _raw(server, client, Stage.GEN_ATTN, 0, 0, q=q, k=kv, v=kv)
    x = np.zeros((1, c.hidden_size))
    with pytest.raises(ProtocolError, match="gen_last"):
        _raw(server, client, Stage.GEN_LAST, c.n_layers - 1, 0, x=x)
    # a float64 blinded message in a session not opened wide
    req = Request(sid, Stage.GEN_QKV, 0, 0, st.seq, {"x": x}, {"wide": True}, st.token)
    with pytest.raises(ProtocolError, match="wide"):
        server.handle(req)
    client.decode(3, link)  # the session is intact
    # and the prefill attention of a client-attention guard block is refused
    server2 = Server(backend)
    client2 = Client(backend, KeySchedule(MASTER, bytes(range(16))), cfg)
    client2.cfg = SCXConfig(level="blind", attention="server", l_s=1, l_e=1, max_length=64)  # a lying client
    client2.client_attention = frozenset()
    client2.first, client2.middle, client2.last = client2.cfg.blocks(c.n_layers)
    opened = dict(attention="client")
    with pytest.raises(ProtocolError, match="client"):
        _prefill_with_open(client2, server2, opened)


def _prefill_with_open(client: Client[Any], server: Server[Any], extra: dict[str, Any]) -> None:
    """Prefill through a transport that adds ``extra`` to the open message's metadata."""

    class Link(LocalTransport):
        def send(self, req: Request) -> Any:
            if req.stage is Stage.OPEN:
                req = Request(
                    req.session, req.stage, req.layer, req.step, req.seq, req.arrays, {**req.meta, **extra}
                )
            return super().send(req)

    client.prefill(IDS, Link(server))


def _pool_client(
    cfg: SCXConfig, weights: ModelWeights, nonce: bytes = bytes(16), pool_nonce: bytes | None = None
) -> Client[Any]:
    """A client of MASTER under ``nonce``; its calibration pool that of a client created under
    ``pool_nonce`` when given (a fresh pool of the same text: the same decoys for the same draws — a
    client's own pool is keyed by its first nonce and hands out no row twice)."""
    b = NumpyBackend(weights)
    decoys = None if pool_nonce is None else CalibrationPool.secret(b, KeySchedule(MASTER, pool_nonce))
    return Client(b, KeySchedule(MASTER, nonce), cfg, decoys=decoys)


def test_mask_pool_entries_are_used_exactly_once() -> None:
    weights = _weights("dense")
    cfg = preset("hardened").config(4)
    cfg = SCXConfig(**{**cfg.to_dict(), "max_length": 64})
    client = _pool_client(cfg, weights)
    pool = MaskPool(client, capacity=12, steps=STEPS)
    pool.fill(2)
    assert len(pool) == 2 and pool.bytes_per_prompt_token > 0 and pool.bytes_per_step > 0
    assert pool.tokens_per_second > 0
    first, second = pool._entries[0], pool._entries[1]
    assert first.nonce != second.nonce and first.remaining > 0
    link = LocalTransport(Server(client.b), record_view=True)
    assert _run(client, weights, link) <= 1e-10
    st = client.state
    assert st is not None and st.prep is first and len(pool) == 1
    assert first.remaining == 0  # every mask of the entry consumed: none can be sent again
    assert first not in pool._entries  # and the entry is never handed out again
    # the entry's nonce cannot drive another request: the client refuses to reuse a nonce for a new prompt
    with pytest.raises(SessionError):
        client.prefill(IDS[::-1], LocalTransport(Server(client.b)), nonce=first.nonce)
    # the second request takes the second entry, a shorter prompt served by its first rows
    client.prefill(IDS[:4], LocalTransport(Server(client.b)))
    assert client.state is not None and client.state.prep is second and len(pool) == 0
    with pytest.raises(ProtocolError, match="empty"):
        pool.take(3)
    with pytest.raises(ProtocolError):
        MaskPool(client, capacity=65)


@pytest.mark.parametrize("n", [len(IDS), 12])
def test_mask_pool_view_equals_the_view_without_it(n: int) -> None:
    """Masks derived offline for a longer prompt are exactly the masks derived on demand: the server sees the
    same messages, the first byte-identical and the rest up to the rounding of η·W over more rows
    (:data:`tests.views.ROUNDING`), and the client the same logits."""
    weights = _weights("moe")
    cfg = SCXConfig(level="blind", attention="client", gen_linear="server", l_s=2, l_e=1, max_length=64)
    client = _pool_client(cfg, weights)
    pool = MaskPool(client, capacity=n, steps=STEPS)
    pool.fill(1, background=True)
    pool.wait()
    nonce = pool._entries[0].nonce
    link = LocalTransport(Server(client.b), record_view=True)
    got = [client.prefill(IDS, link)] + [client.decode(t, link) for t in (3, 4, 5)]
    other = _pool_client(cfg, weights, nonce, pool_nonce=bytes(16))
    link2 = LocalTransport(Server(other.b), record_view=True)
    want = [other.prefill(IDS, link2)] + [other.decode(t, link2) for t in (3, 4, 5)]
    assert_same_view(link.view, link2.view, rounding=n > len(IDS))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)

"""Conformance of the server and the protocol messages to DESIGN §5 (sessions, ordering, limits, caches,
what a message may carry, what the server sees), for statements no other test pinned down.

Each test states the DESIGN sentence it checks. Refusals are checked to change nothing (the session's
snapshot, the server's cache bytes and its memories); each refusal has a control that the same kind of
message, correctly formed, is accepted — so the refusal is what the statement asks, not a blanket one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.base import Backend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ConfigError, DTypeError, ProtocolError, SCXError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Phase, Stage
from scx_ref.transforms import laplace_noise
from scx_ref.weights import ModelWeights
from tests.refusals import refused
from tests.server_state import server_state
from tests.tiny import tiny_weights

IDS = np.array([3, 1, 4, 1, 5, 9], dtype=np.int64)
N = len(IDS)
OPEN_META: dict[str, Any] = dict(n=N, r1=2, r2=1, r_lock=2, l_s=1, l_e=1, max_length=12, level="blind")


def _backend(kind: str, w: ModelWeights) -> Backend[Any]:
    if kind == "numpy32":
        return NumpyBackend(w, np.float32)
    return TorchBackend(w, dtype=torch.float32)


class _Raw:
    """One session driven by hand-made messages (the server does not care what the rows mean)."""

    def __init__(self, server: Server[Any], **meta: Any) -> None:
        self.server = server
        self.sid = KeySchedule.new_nonce().hex()
        reply = server.handle(Request(self.sid, Stage.OPEN, -1, -1, 0, {}, {**OPEN_META, **meta}))
        self.token = str(reply.meta["token"])
        self.seq = 1

    def req(self, stage: Stage, layer: int, arrays: dict[str, Any], step: int = -1, **meta: Any) -> Request:
        return Request(self.sid, stage, layer, step, self.seq, arrays, meta, self.token)

    def send(self, stage: Stage, layer: int, arrays: dict[str, Any], step: int = -1, **meta: Any) -> Reply:
        reply = self.server.handle(self.req(stage, layer, arrays, step, **meta))
        self.seq += 1
        return reply

    def refused(self, stage: Stage, layer: int, arrays: dict[str, Any], match: str, **meta: Any) -> None:
        before = server_state(self.server)
        with pytest.raises(ProtocolError, match=match):
            self.server.handle(self.req(stage, layer, arrays, **meta))
        assert server_state(self.server) == before, "a refused message changed the server"


# -- §5.7 / §6: "blinded stages in float64" — a wide message carries rows the client normalized -------


def test_the_wide_refusal_has_its_whole_message() -> None:
    """The refusal of a wide message without ``normalized`` true, word for word."""
    server: Server[Any] = Server(_backend("numpy32", tiny_weights(2)))
    raw = _Raw(server, wide=True)
    x = np.zeros((N + OPEN_META["r1"], server.b.config.hidden_size))
    with refused(
        ProtocolError,
        "qkv: a float64 (wide) message must carry rows the client normalized (normalized true)",
    ):
        server.handle(raw.req(Stage.QKV, 0, {"x": x}, commit="01" * 32, wide=True))


@pytest.mark.parametrize("stage", [Stage.QKV, Stage.FFN, Stage.HEAD])
@pytest.mark.parametrize("kind", ["numpy32", "torch32"])
def test_a_wide_message_the_server_would_normalize_is_refused(kind: str, stage: Stage) -> None:
    """DESIGN §5.1: the client applies the norm whenever the rows are noised, and §5.7: blinded stages may
    run in float64. A float64 (``wide``) message is a blinded one, so its rows come normalized; one asking
    the server to normalize them was a raw torch RuntimeError (float != double) at the QKV and head stages
    of a float32 torch server, and silently mixed precisions on numpy. It is a ProtocolError, nothing
    changed; the same message with ``normalized`` true is computed."""
    w = tiny_weights(2)
    c = w.config
    server: Server[Any] = Server(_backend(kind, w))
    raw = _Raw(server, wide=True)
    rng = np.random.default_rng(0)
    rows = N + OPEN_META["r1"]
    x = rng.standard_normal((rows, c.hidden_size))
    for layer in range(c.n_layers if stage is Stage.HEAD else 1):
        commit = f"{layer + 1:02x}" * 32
        if stage is Stage.QKV:
            raw.refused(stage, layer, {"x": x}, "normalized true", commit=commit, wide=True)
            raw.refused(stage, layer, {"x": x}, "normalized true", commit=commit, wide=True, normalized=False)
        z = raw.send(Stage.QKV, layer, {"x": x}, commit=commit, wide=True, normalized=True).arrays["z"]
        assert np.all(np.isfinite(np.asarray(z)))  # control: the blinded (normalized) QKV is computed
        if stage is Stage.FFN:
            raw.refused(stage, layer, {"x": x}, "normalized true", wide=True)
            y = raw.send(Stage.FFN, layer, {"x": x}, wide=True, normalized=True).arrays["y"]
            assert tuple(y.shape) == (rows, 2 * c.intermediate_size)  # control: blinded gate/up
        raw.send(Stage.FFN, layer, {"x": x})  # the whole MLP, the server's norm, not wide: accepted
    if stage is Stage.HEAD:
        raw.refused(stage, c.n_layers, {"x": x}, "normalized true", wide=True)
        logits = raw.send(stage, c.n_layers, {"x": x}, wide=True, normalized=True).arrays["logits"]
        assert tuple(logits.shape) == (rows, c.vocab_size)


# -- §5.2 / §5.3: a valid cache's row p holds position p; a step's row extends the rows of every earlier --


@pytest.mark.parametrize("stage", [Stage.GEN_MID, Stage.GEN_LAST])
def test_a_generation_step_cannot_extend_a_cache_that_missed_a_step(stage: Stage) -> None:
    """DESIGN §5.2: the server's valid caches hold the keys at positions 0..n−1 (RoPE'd there), and §5.3:
    token t is at position n + t, appended to those caches. A ``gen_mid`` / ``gen_last`` at step t + 1
    whose cache lacks step t's row (that step sent only its first guard block) used to be computed —
    the new row appended at the cache's row n + t while RoPE put it at n + t + 1, a silently wrong
    "valid" cache. It is refused, nothing changed; the step's own message (t) is accepted."""
    w = tiny_weights(2)
    b = NumpyBackend(w)
    c = w.config
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(max_length=12))
    logits = client.prefill(IDS, link)
    client.share_keys(link)
    client.decode(int(np.argmax(logits[-1])), link)  # step 0, complete
    st = client.state
    assert st is not None
    sid, token = client.session, st.token
    s = server.sessions[sid]
    assert (s.step, s.n) == (0, N)
    x = np.random.default_rng(1).standard_normal((1, c.hidden_size))

    def req(stg: Stage, layer: int, step: int, arrays: dict[str, Any]) -> Request:
        return Request(sid, stg, layer, step, server.sessions[sid].seq, arrays, {}, token)

    server.handle(req(Stage.GEN_QKV, 0, 1, {"x": x}))  # step 1 starts; its middle/last rows never come
    layer = 1 if stage is Stage.GEN_MID else c.n_layers - 1
    before = server_state(server)
    with pytest.raises(ProtocolError, match=r"at step 2: its cache holds \d+ rows where step 2 needs"):
        server.handle(req(stage, layer, 2, {"x": x}))
    assert server_state(server) == before
    server.handle(req(stage, layer, 1, {"x": x}))  # control: step 1's own row is accepted


# -- messages.py: "token: the session capability returned by open (empty on open itself)" ----------------


def test_open_carries_no_token() -> None:
    """An ``open`` carrying a token was accepted, the token silently ignored. It is refused, and the nonce
    is not spent: the same open without a token then succeeds."""
    server: Server[Any] = Server(NumpyBackend(tiny_weights(2)))
    sid = KeySchedule.new_nonce().hex()
    bad = Request(sid, Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META), "t" * 43)
    with pytest.raises(ProtocolError, match="open carries no session token"):
        server.handle(bad)
    assert server.sessions == {} and list(server._nonces) == []
    reply = server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META)))
    assert len(str(reply.meta["token"])) >= 43


# -- §5.2 key sharing: a malformed key is a project error --------------------------------------------------


def test_a_shared_permutation_numpy_cannot_read_is_a_protocol_error() -> None:
    """A ``share`` whose ``perm`` is a tensor of a dtype numpy lacks (bfloat16; in-process) raised a raw
    TypeError from ``np.asarray``. It is a ProtocolError naming the malformed share, nothing changed; the
    honest client then shares its keys."""
    w = tiny_weights(2)
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    client: Client[Any] = Client(b, KeySchedule.generate(), SCXConfig(max_length=12))
    client.prefill(IDS, link)
    st = client.state
    assert st is not None
    rows = N + client.cfg.r1
    perm = torch.from_numpy(np.array(st.keys.token_perm(1, rows), dtype=np.int64)).to(torch.bfloat16)
    salt = st.keys.commit_salt(1).hex()
    req = Request(client.session, Stage.SHARE, 1, -1, st.seq, {"perm": perm}, {"salt": salt}, st.token)
    before = server_state(server)
    with pytest.raises(ProtocolError, match="share message for block 1 is malformed"):
        server.handle(req)
    assert server_state(server) == before
    client.share_keys(link)
    assert sorted(server.sessions[client.session].valid) == [1, 2]


# -- §5.5 limits: "the server enforces limits (... cache memory ...)" — what it counts bounds what it holds --


def _nbytes(a: Any) -> int:
    return int(a.nbytes) if isinstance(a, np.ndarray) else int(a.element_size() * a.nelement())


def _held(server: Server[Any]) -> int:
    total = 0
    for s in server.sessions.values():
        total += sum(_nbytes(k) + _nbytes(v) for k, v in [*s.raw.values(), *s.valid.values()])
        total += sum(_nbytes(k) for k in s.locked.values())
    return total


@pytest.mark.parametrize("kind", ["numpy32", "torch32"])
def test_the_counted_cache_bytes_bound_the_bytes_held_in_a_wide_session(kind: str) -> None:
    """``max_cache_bytes`` bounds the bytes of every session's caches. A wide session's QKV replies are
    float64, and so are the raw caches kept from them until key sharing removes α W; they were counted
    at the server's float32 width, so on a model whose Q is no wider than K and V together (here every
    head its own KV head) the server held more than it counted (8704 bytes held, 6656 counted). Counted
    now at the width held: the count bounds the bytes at every stage and returns to 0 at close."""
    w = tiny_weights(2, n_kv_heads=4)
    b = _backend(kind, w)
    server: Server[Any] = Server(b)
    link = LocalTransport(server)
    cfg = SCXConfig(level="blind", blind_dtype="float64", max_length=12)
    client: Client[Any] = Client(b, KeySchedule.generate(), cfg)
    assert client.wide
    client.prefill(IDS, link)
    s = server.sessions[client.session]
    assert {str(b.to_numpy(k).dtype) for k, _ in s.raw.values()}  # raw caches exist
    assert server.cache_bytes >= _held(server) > 0
    client.share_keys(link)
    assert server.cache_bytes >= _held(server) > 0
    client.decode(3, link)
    assert server.cache_bytes >= _held(server) > 0
    client.close()
    assert server.cache_bytes == 0


# -- §5.1 step 2: "the server runs causal GQA attention" on rows in true order -----------------------------


def _causal_gqa(q: npt.NDArray[Any], k: npt.NDArray[Any], v: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """softmax(q kᵀ/√d_h + causal mask) v per query head h, on KV head h // G (an independent loop)."""
    n, heads, dh = q.shape
    group = heads // k.shape[1]
    out = np.zeros((n, heads, dh))
    for h in range(heads):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(n):
            sc = kh[: i + 1] @ q[i, h] / math.sqrt(dh)
            p = np.exp(sc - sc.max())
            out[i, h] = (p / p.sum()) @ vh[: i + 1]
    return out


def test_the_attention_stage_is_causal_gqa_on_the_rows_as_sent() -> None:
    """DESIGN §5.1 step 2: the client sends QP, KP, VP in true row order and the server runs causal GQA
    attention on them. The reply equals an independent causal GQA loop (row i attends to rows 0..i, query
    head h to KV head h // G), and differs from the attention without the mask (the control that the
    comparison can fail)."""
    w = tiny_weights(2)
    c = w.config
    server: Server[Any] = Server(NumpyBackend(w))
    raw = _Raw(server, level="paper")
    rng = np.random.default_rng(3)
    raw.send(Stage.QKV, 0, {"x": rng.standard_normal((N + 2, c.hidden_size))}, commit="ab" * 32)
    q = rng.standard_normal((N, c.n_heads, c.head_dim))
    k = rng.standard_normal((N, c.n_kv_heads, c.head_dim))
    v = rng.standard_normal((N, c.n_kv_heads, c.head_dim))
    o = np.asarray(raw.send(Stage.ATTN, 0, {"q": q, "k": k, "v": v}).arrays["o"]).reshape(N, c.n_heads, -1)
    np.testing.assert_allclose(o, _causal_gqa(q, k, v), rtol=1e-10, atol=1e-12)
    full = _causal_gqa(q[::-1].copy(), k[::-1].copy(), v[::-1].copy())[::-1]  # row 0 sees every row
    assert not np.allclose(o[0], full[0], rtol=1e-6, atol=1e-8)


# -- §5.3: "the client embeds the token; the server never sees a token id or a logit" ----------------------


def _rows(a: npt.NDArray[Any], width: int) -> npt.NDArray[Any]:
    return a.reshape(-1, width) if a.ndim and a.shape[-1] == width else np.zeros((0, width))


def _holds(arrays: list[npt.NDArray[Any]], logits: npt.NDArray[Any]) -> bool:
    """Whether any array holds a row whose sorted values are ``logits``' sorted values (any order)."""
    want = np.sort(logits)
    for a in arrays:
        rows = np.sort(_rows(np.asarray(a, dtype=np.float64), logits.shape[0]), axis=1)
        if rows.size and np.any(np.all(np.abs(rows - want) <= 1e-6 * (1 + np.abs(want)), axis=1)):
            return True
    return False


@pytest.mark.parametrize(
    "cfg",
    [
        SCXConfig(max_length=12),
        SCXConfig(gen_attention="server", gen_linear="server", max_length=12),
        SCXConfig(level="blind", attention="client", gen_linear="server", max_length=12),
    ],
    ids=["paper", "server-gen-attention-and-linear", "blind-client-attention"],
)
def test_no_generation_message_carries_a_token_id_or_a_logit(cfg: SCXConfig) -> None:
    """During generation no array the server receives or computes is an integer array (a token id), and
    none holds the step's logits in any order — also where the server multiplies the LM head itself
    (``gen_linear="server"``: the row is one-time blinded). Positive control: the same search finds the
    prompt's last-row logits in the prefill head stage's reply (§5.1 step 5: per-row logits there), except
    at level blind, where that stage is blinded too."""
    w = tiny_weights(2)
    b = NumpyBackend(w)
    server: Server[Any] = Server(b)
    link = LocalTransport(server, record_view=True)
    client: Client[Any] = Client(b, KeySchedule.generate(), cfg)
    ref = ReferenceModel(w)
    want, cache = ref.prefill(IDS)
    got = client.prefill(IDS, link)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    heads = [a for m in link.view.replies if m.stage is Stage.HEAD for a in m.arrays.values()]
    shuffled = want[::-1, np.random.default_rng(0).permutation(want.shape[1])]
    assert _holds([shuffled], want[-1])  # the search is blind to row and column order
    # the prefill head stage returns per-row logits (§5.1 step 5) — blinded at level blind, where no
    # linear stage is clear
    assert _holds(heads, want[-1]) is (cfg.level != "blind")
    step_logits = []
    token = int(np.argmax(want[-1]))
    for _ in range(3):
        got_t = client.decode(token, link)
        want_t = ref.decode(token, cache)
        np.testing.assert_allclose(got_t, want_t, rtol=1e-9, atol=1e-9)
        step_logits.append(want_t)
        token = int(np.argmax(want_t))
    gen = [m for m in [*link.view.messages, *link.view.replies] if m.stage.phase is Phase.GENERATE]
    assert gen
    arrays = [a for m in gen for a in m.arrays.values()]
    assert all(np.issubdtype(a.dtype, np.floating) for a in arrays), "an integer array in generation"
    for t, logits in enumerate(step_logits):
        assert not _holds(arrays, logits), f"the logits of step {t} reached the server"
    assert not any("token" in str(k) or "ids" in str(k) for m in gen for k in m.meta)


# -- §4 T6 / project rules: the Laplace sampler refuses what it cannot sample with a project error -------


class _Short:
    def random(self, size: Any = None) -> npt.NDArray[Any]:
        return np.full(3, 0.25)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (((2,), "1", None), ConfigError, "beta must be a real number, got str"),
        (((2,), True, None), ConfigError, "beta must be a real number, got bool"),
        (((2,), None, None), ConfigError, "beta must be a real number, got NoneType"),
        (((2,), np.ones(2), None), ConfigError, "beta must be a real number, got ndarray"),
        (((2,), 10**400, None), ConfigError, r"finite and >= 0, got an integer of \d+ bits"),
        (((2,), math.nan, None), ConfigError, "finite and >= 0, got nan"),
        ((3, 1.0, None), ShapeError, "shape must be a tuple of sizes, got int 3"),
        ((("a",), 1.0, None), ShapeError, "a size of shape must be an integer, got str"),
        (((2.5,), 1.0, None), ShapeError, "a size of shape must be an integer, got float"),
        (((-1,), 1.0, None), ShapeError, "a size of shape must be >= 0, got -1"),
        (((2,), 1.0, "no generator"), ConfigError, "gen must have random"),
        (((2, 2), 1.0, _Short()), ShapeError, r"gave 3 uniforms, not 4"),
        (((2,), 1.0, None, np.int64), DTypeError, "dtype must be a floating numpy dtype, got int64"),
        (((2,), 1.0, None, "no dtype"), DTypeError, "dtype must be a floating numpy dtype"),
    ],
    ids=[
        "beta-str",
        "beta-bool",
        "beta-none",
        "beta-array",
        "beta-huge-int",
        "beta-nan",
        "shape-int",
        "shape-str",
        "shape-float",
        "shape-negative",
        "gen-without-random",
        "gen-short",
        "dtype-int",
        "dtype-unknown",
    ],
)
def test_laplace_noise_refuses_bad_arguments(
    args: tuple[Any, ...], error: type[SCXError], message: str
) -> None:
    """Each of these was a raw TypeError / ValueError / AttributeError (β = True: noise of scale 1; β = nan:
    a bare SCXError, now the ConfigError of every other bad β)."""
    shape, beta, gen, *rest = args
    gen = np.random.default_rng(0) if gen is None else gen
    with pytest.raises(error, match=message):
        laplace_noise(shape, beta, gen, *rest)
    # control: the same call with good arguments samples
    eta = laplace_noise((2, 2), 1.5, np.random.default_rng(0), np.float32)
    assert eta.shape == (2, 2) and eta.dtype == np.float32 and np.all(np.isfinite(eta))

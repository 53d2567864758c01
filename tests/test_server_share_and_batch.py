"""The server (DESIGN §5.5–5.7): a ``share`` must carry exactly what the session's level and the
block's QKV stage require, and ``handle_batch`` keeps its cache accounting when a batch fails internally.

Key sharing: at level ``blind`` a middle block's raw cache is (x̂ + α)·W; a ``share`` that left ``alpha`` out
was accepted and left α·W in the valid cache (later decode steps wrong, no refusal). The server now
remembers the level at OPEN and which blocks' QKV rows came noised (normalized by the client, wide or not),
and refuses a share without the noise they need, with noise they never had, or of the wrong width — before
anything changes.

``handle_batch``: every ``gen_mid`` group is computed before any session commits, so an internal exception
(not an SCXError) in a later group, in the clock, or in a commit releases every reserved cache byte and
leaves ``Server.cache_bytes`` equal to the sessions' own counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ProtocolError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.server_state import frozen, session_state
from tests.tiny import tiny_weights

W: ModelWeights = tiny_weights(3)
IDS = np.array([7, 3, 21, 9, 14, 2], dtype=np.int64)
_SEED = [0]


def _key_bytes() -> tuple[bytes, bytes]:
    """A fresh (master, nonce) pair for every client (the twin of a run reuses its pair on its own)."""
    _SEED[0] += 1
    return bytes([_SEED[0] % 250 + 1]) * 32, (6500 + _SEED[0]).to_bytes(16, "big")


def _reference() -> tuple[np.ndarray, np.ndarray, int]:
    ref = ReferenceModel(W)
    logits, cache = ref.prefill(IDS)
    token = int(np.argmax(logits[-1]))
    return logits, ref.decode(token, cache), token


PREFILL, DECODE, TOKEN = _reference()
#: float32 for the wide (float64-blinded) configurations: a float64 backend never sends wide messages
F32, F64 = np.float32, np.float64


def _close(got: Any, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def _run(
    cfg: SCXConfig, dtype: Any, link_class: type[LocalTransport], keys: tuple[bytes, bytes]
) -> list[Any]:
    """Prefill and the first decode step (which shares the middle blocks' keys) on a fresh server."""
    b = NumpyBackend(W, dtype)
    client: Client[Any] = Client(b, KeySchedule(*keys), cfg)
    link = link_class(Server(b))
    out = [client.prefill(IDS, link), client.decode(TOKEN, link)]
    client.close()
    return out


def _check_exact(got: list[Any], cfg: SCXConfig, dtype: Any, keys: tuple[bytes, bytes]) -> None:
    """``got`` is bit for bit an honest run under the same keys, and (float64) the plaintext reference."""
    for g, w in zip(got, _run(cfg, dtype, LocalTransport, keys), strict=True):
        np.testing.assert_array_equal(g, w)
    if dtype is F64:
        _close(got[0], PREFILL)
        _close(got[1], DECODE)


def _state(server: Server[Any], sid: str) -> Any:
    """Everything a refused message must leave as it was: the session (its meter too) and the byte count."""
    return frozen((session_state(server, sid), server.cache_bytes))


# --- 1. what a share must carry ------------------------------------------------------------------------


def _drop(name: str) -> Callable[[Request], Request]:
    return lambda r: replace(r, arrays={k: v for k, v in r.arrays.items() if k != name})


def _meta_without(name: str) -> Callable[[Request], Request]:
    return lambda r: replace(r, meta={k: v for k, v in r.meta.items() if k != name})


def _add_alpha(r: Request) -> Request:
    rows = len(np.asarray(r.arrays["perm"]))
    return replace(r, arrays={**r.arrays, "alpha": np.zeros((rows, W.config.hidden_size))})


def _add_wide(r: Request) -> Request:
    return replace(r, meta={**r.meta, "wide": True})


BLIND, PAPER, PERMUTE = (SCXConfig(level=lv, r1=2, r2=2) for lv in ("blind", "paper", "permute"))
BLIND_WIDE = SCXConfig(level="blind", r1=2, r2=2, blind_dtype="float64")
# (id, SCXConfig, backend dtype, tampering of the honest share, the refusal's message)
SHARE_CASES: list[tuple[str, SCXConfig, Any, Callable[[Request], Request], str]] = [
    (
        "blind-alpha-dropped",
        BLIND,
        F64,
        _drop("alpha"),
        "^share message for block [12] lacks array 'alpha': at level blind its QKV stage was noised, so the "
        "key sharing must upload that noise$",
    ),
    ("blind-perm-dropped", BLIND, F64, _drop("perm"), "lacks array 'perm'"),
    ("blind-wide-alpha-without-wide", BLIND_WIDE, F32, _meta_without("wide"), "wide must be true"),
    (
        "blind-wide-alpha-dropped",
        BLIND_WIDE,
        F32,
        lambda r: _drop("alpha")(_meta_without("wide")(r)),
        "lacks array 'alpha'",
    ),
    ("paper-alpha-added", PAPER, F64, _add_alpha, "its QKV stage was not noised"),
    ("permute-alpha-added", PERMUTE, F64, _add_alpha, "was not noised"),
    (
        "blind-qkv-not-noised-alpha-added",  # β of the QKV stage 0: blind, yet its rows are not noised
        SCXConfig(level="blind", r1=2, r2=2, stage_beta={"qkv": 0.0}),
        F64,
        _add_alpha,
        "was not noised [(]level blind[)]",
    ),
    (
        "paper-wide-without-alpha",
        SCXConfig(level="paper", r1=2, r2=2, blind_dtype="float64"),
        F32,
        _add_wide,
        "wide is for a share that carries 'alpha'",
    ),
]


@pytest.mark.parametrize(
    ("cfg", "dtype", "tamper", "message"), [c[1:] for c in SHARE_CASES], ids=[c[0] for c in SHARE_CASES]
)
def test_a_share_that_does_not_match_its_level_is_refused_and_changes_nothing(
    cfg: SCXConfig, dtype: Any, tamper: Callable[[Request], Request], message: str
) -> None:
    """Before each honest share reaches the server, its tampered copy is handed to Server.handle: a
    ProtocolError naming what is wrong, the session exactly as it was; then the honest share, and the run
    is bit for bit an honest one under the same keys (float64: the reference to rtol 1e-10). Without the
    check a blind share without ``alpha`` was accepted and the decode step was off by ~2."""
    refused: list[int] = []

    class Hostile(LocalTransport):
        def send(self, request: Request) -> Reply:
            if request.stage is Stage.SHARE:
                server = self.server
                assert isinstance(server, Server)
                before = _state(server, request.session)
                with pytest.raises(ProtocolError, match=message):
                    server.handle(tamper(request))
                assert _state(server, request.session) == before
                refused.append(request.layer)
            return super().send(request)

    keys = _key_bytes()
    got = _run(cfg, dtype, Hostile, keys)
    assert refused == [1, 2]
    _check_exact(got, cfg, dtype, keys)


@pytest.mark.parametrize(
    ("cfg", "dtype"),
    [
        (BLIND, F64),
        (BLIND_WIDE, F32),
        (SCXConfig(level="blind", r1=2, r2=2, stage_beta={"qkv": 0.0}), F64),
        (SCXConfig(level="blind", r1=2, r2=2, beta=0.0), F64),
        (PAPER, F64),
        (PERMUTE, F64),
    ],
    ids=["blind", "blind-wide", "blind-qkv-beta-0", "blind-beta-0", "paper", "permute"],
)
def test_the_honest_share_is_what_the_server_requires(cfg: SCXConfig, dtype: Any) -> None:
    """Control: the honest client's shares — with ``alpha`` (and ``wide``) exactly where its QKV stage was
    noised, none where β = 0 leaves it un-noised — are accepted and the run is exact."""
    seen: dict[int, tuple[bool, bool]] = {}

    class Tap(LocalTransport):
        def send(self, request: Request) -> Reply:
            if request.stage is Stage.SHARE:
                seen[request.layer] = ("alpha" in request.arrays, request.meta.get("wide", False) is True)
            return super().send(request)

    keys = _key_bytes()
    got = _run(cfg, dtype, Tap, keys)
    noised = cfg.level == "blind" and cfg.beta_for("qkv") > 0
    assert seen == {i: (noised, noised and cfg.blind_dtype == "float64") for i in (1, 2)}
    _check_exact(got, cfg, dtype, keys)


# --- 2. handle_batch: an internal failure leaves the accounting consistent --------------------------------

GUARDS = [1, 1, 2]  # l_s of each session: the first two share their middle blocks, the third is its own group


def _batch_sessions() -> tuple[Server[Any], list[Request]]:
    """A server with one shared-key session per entry of GUARDS and each session's gen_mid of step 0."""
    server: Server[Any] = Server(NumpyBackend(W), batch_rows=2)
    reqs = []
    for i, l_s in enumerate(GUARDS):
        scx = SCXConfig(level="paper", r1=2, r2=1, l_s=l_s, l_e=1, max_length=12)
        client: Client[Any] = Client(NumpyBackend(W), KeySchedule(*_key_bytes()), scx)
        link = LocalTransport(server)
        client.prefill(IDS[: 4 + i], link)
        client.share_keys(link)
        st = client.state
        assert st is not None
        x = np.random.default_rng(i).normal(size=(1, W.config.hidden_size))
        reqs.append(Request(st.keys.session_id, Stage.GEN_MID, l_s, 0, st.seq, {"x": x}, {}, st.token))
    return server, reqs


def _all(server: Server[Any], reqs: list[Request]) -> list[tuple[Any, ...]]:
    return [_state(server, r.session) for r in reqs]


def _consistent(server: Server[Any]) -> None:
    """The server's cache-byte total is its sessions' own counts, nothing reserved and left behind."""
    assert server.cache_bytes == sum(s.cache_bytes for s in server.sessions.values())


def _honest_batch_runs(server: Server[Any], reqs: list[Request]) -> None:
    """After the failure the same batch runs as handle() would: every session advances by one."""
    seqs = [server.sessions[r.session].seq for r in reqs]
    out = server.handle_batch(reqs)
    for got, req, seq in zip(out, reqs, seqs, strict=True):
        assert isinstance(got, Reply) and got.seq == req.seq == seq
        assert server.sessions[req.session].seq == seq + 1
    _consistent(server)


def test_a_later_group_failing_commits_no_group() -> None:
    """_mid_compute raising a non-project exception for the second group: the first group used to have
    committed (seq advanced, caches extended) with its replies lost; now no session changes and every
    reserved byte is released."""
    server, reqs = _batch_sessions()
    before = _all(server, reqs)
    real = server._mid_compute
    calls = [0]

    def failing(items: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("internal fault in the second group")
        return real(items)

    server._mid_compute = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="second group"):
        server.handle_batch(reqs)
    assert calls[0] == 2
    assert _all(server, reqs) == before
    _consistent(server)
    server._mid_compute = real  # type: ignore[method-assign]
    _honest_batch_runs(server, reqs)


def test_a_commit_failing_releases_what_the_rest_reserved() -> None:
    """The first commit of the batch raising (a bug in a commit): the requests not committed used to keep
    their reserved cache bytes, so ``cache_bytes`` stayed too high for good; now they are released."""
    server, reqs = _batch_sessions()
    before = _all(server, reqs)
    real = server._mid_compute
    armed = [True]

    def boom() -> None:
        raise RuntimeError("a commit failed")

    def failing(items: Any) -> Any:
        out = real(items)
        if armed[0]:
            armed[0] = False
            out[0] = (out[0][0], boom)
        return out

    server._mid_compute = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a commit failed"):
        server.handle_batch(reqs)
    assert _all(server, reqs) == before  # the failing commit was the batch's first: nothing committed
    _consistent(server)
    server._mid_compute = real  # type: ignore[method-assign]
    _honest_batch_runs(server, reqs)


class _Clock:
    """A clock that raises while ``server`` holds a session's lock and ``armed`` is set (the moment
    handle/handle_batch reads it to stamp an accepted message)."""

    def __init__(self) -> None:
        self.server: Server[Any] | None = None
        self.armed = False

    def __call__(self) -> float:
        server = self.server
        if self.armed and server is not None and any(s.lock.locked() for s in server.sessions.values()):
            raise RuntimeError("clock failed")
        return 0.0


def _failing_clock(run: Any) -> tuple[Any, Any, Any]:
    """The batch sessions, with ``run(server, reqs)`` called under a clock that raises while a session is
    locked (the error checked); returns them and their state before the call."""
    server, reqs = _batch_sessions()
    clock = _Clock()
    clock.server = server
    server.clock = clock
    before = _all(server, reqs)
    clock.armed = True
    with pytest.raises(RuntimeError, match="clock failed"):
        run(server, reqs)
    clock.armed = False
    return server, reqs, before


def test_a_failing_clock_in_a_batch_commits_nothing() -> None:
    """The clock raising when the batch stamps its sessions: it used to raise after the first session had
    committed, leaving the other requests' bytes reserved; now it is read before any commit."""
    server, reqs, before = _failing_clock(lambda server, reqs: server.handle_batch(reqs))
    assert _all(server, reqs) == before
    _consistent(server)
    _honest_batch_runs(server, reqs)


def test_a_failing_clock_in_handle_changes_nothing() -> None:
    """The same for one message through handle(): the session used to commit (seq, caches) and then have
    its grown bytes taken off the server's total, so the total fell below the sessions' counts."""
    server, reqs, before = _failing_clock(lambda server, reqs: server.handle(reqs[2]))
    assert _all(server, reqs) == before
    _consistent(server)
    reply = server.handle(reqs[2])
    assert reply.seq == reqs[2].seq and server.sessions[reqs[2].session].seq == reqs[2].seq + 1
    _consistent(server)


@pytest.mark.parametrize(
    ("cfg", "dtype"),
    [
        (BLIND_WIDE, F32),
        (BLIND, F64),
        (SCXConfig(level="blind", r1=5, r2=2, blind_dtype="float64"), F32),  # more decoys than n / 3
    ],
    ids=["blind-wide", "blind", "blind-wide-r1-5"],
)
def test_a_share_gives_back_the_raw_cache_its_qkv_counted_and_a_second_one_is_refused(
    cfg: SCXConfig, dtype: Any
) -> None:
    """A share replaces block ℓ's raw cache, counted when its QKV came — (n + r₁) · (q + 2·kv) entries
    at the width Z was computed in, float64 for a wide message — by the valid one (n · 2·kv entries in the
    server's dtype): the byte total moves by exactly that. The same share sent again, on a server whose
    cache limit the session fills, is refused as a second share (its block's count is gone), not as a
    cache that would grow past the limit."""
    c = W.config
    n, r1, item = len(IDS), cfg.r1, np.dtype(dtype).itemsize
    width = 8 if cfg.blind_dtype == "float64" else item
    moved: dict[int, int] = {}
    sent: list[Request] = []

    class Tap(LocalTransport):
        def send(self, request: Request) -> Reply:
            if request.stage is not Stage.SHARE:
                return super().send(request)
            server = self.server
            assert isinstance(server, Server)
            before = server.cache_bytes
            reply = super().send(request)
            moved[request.layer] = server.cache_bytes - before
            sent.append(request)
            return reply

    b = NumpyBackend(W, dtype)
    server: Server[Any] = Server(b)
    client: Client[Any] = Client(b, KeySchedule(*_key_bytes()), cfg)
    link = Tap(server)
    client.prefill(IDS, link)
    client.decode(TOKEN, link)
    want = n * 2 * c.kv_dim * item - (n + r1) * (c.q_dim + 2 * c.kv_dim) * width
    assert moved == {1: want, 2: want}
    again = replace(sent[0], seq=server.sessions[sent[0].session].seq)
    server.limits = replace(server.limits, max_cache_bytes=server.cache_bytes)
    before = _state(server, again.session)
    with pytest.raises(ProtocolError, match=r"^block 1's key was already shared$"):
        server.handle(again)
    assert _state(server, again.session) == before

"""Cross-session batching of the middle blocks (DESIGN §5.6): several sessions' ``gen_mid`` rows run
through one tile of ``batch_rows`` rows, and every reply is bit-for-bit the reply of the same session run
alone on a server with the same ``batch_rows``; against the row-at-a-time server (``batch_rows=1``) the
rows agree to float64 rounding (rtol 1e-10) and the greedy tokens are identical.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scx_ref.backends.torch_backend import TorchBackend  # noqa: E402
from scx_ref.errors import ProtocolError  # noqa: E402
from scx_ref.forward import block, block_rows  # noqa: E402
from scx_ref.keys import KeySchedule  # noqa: E402
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server  # noqa: E402
from scx_ref.protocol.cost import CostMeter  # noqa: E402
from scx_ref.protocol.messages import Reply, Request  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402
from scx_ref.weights import random_weights  # noqa: E402
from scx_ref.zoo import RANDOM_PRESETS  # noqa: E402

N_SESSIONS = 5
N_NEW = 4


def _backend(preset: str) -> TorchBackend:
    w = random_weights(RANDOM_PRESETS[preset], np.random.default_rng(7), dtype=np.float64)
    return TorchBackend(w, torch.float64)


class _Barrier:
    """A transport for N client threads: ``gen_mid`` messages wait until every thread has sent one, then
    one ``handle_batch`` call serves them all; other messages go to ``handle``."""

    def __init__(self, server: Server[Any], parties: int) -> None:
        self.server = server
        self.meter = CostMeter()
        self.barrier = threading.Barrier(parties, action=self._run)
        self.pending: dict[str, Request] = {}
        self.replies: dict[str, Any] = {}
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def _run(self) -> None:
        reqs = list(self.pending.values())
        self.batches.append(len(reqs))
        for req, rep in zip(reqs, self.server.handle_batch(reqs), strict=True):
            self.replies[req.session] = rep
        self.pending.clear()

    def send(self, req: Request) -> Reply:
        if req.stage is not Stage.GEN_MID:
            with self.lock:
                return self.server.handle(req)
        with self.lock:
            self.pending[req.session] = req
        self.barrier.wait(timeout=60)
        rep = self.replies.pop(req.session)
        if isinstance(rep, Exception):
            raise rep
        assert isinstance(rep, Reply)
        return rep


class _Recorder:
    """A LocalTransport that keeps every ``gen_mid`` reply."""

    def __init__(self, server: Server[Any]) -> None:
        self.link = LocalTransport(server)
        self.meter = self.link.meter
        self.mid: list[Any] = []

    def send(self, req: Request) -> Reply:
        rep = self.link.send(req)
        if req.stage is Stage.GEN_MID:
            self.mid.append(rep.arrays["x"].clone())
        return rep


def _prompts(vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, vocab, size=int(rng.integers(3, 9))) for _ in range(N_SESSIONS)]


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("tile", [4, 8])
def test_batched_middle_blocks_equal_unbatched_bit_for_bit(preset: str, tile: int) -> None:
    b = _backend(preset)
    cfg = SCXConfig(level="paper", decoys="gaussian")
    master = bytes(
        range(1, 33)
    )  # fresh KeySchedule objects per run: one (master, nonce) drives one session each
    nonces = [bytes([i + 1]) * 16 for i in range(N_SESSIONS)]
    prompts = _prompts(b.config.vocab_size)

    # alone: each session on its own, replies recorded
    alone_tokens, alone_mid = [], []
    for ids, nonce in zip(prompts, nonces, strict=True):
        rec = _Recorder(Server(b, batch_rows=tile))
        client = Client(b, KeySchedule(master, nonce), cfg)
        alone_tokens.append(client.generate(ids, N_NEW, rec))  # type: ignore[arg-type]
        alone_mid.append(rec.mid)

    # batched: all sessions at once, every gen_mid step in one handle_batch call
    server = Server(b, batch_rows=tile)
    link = _Barrier(server, N_SESSIONS)
    results: dict[int, Any] = {}
    mids: dict[str, list[Any]] = {}

    def run(i: int) -> None:
        client = Client(b, KeySchedule(master, nonces[i]), cfg)
        rec_mid: list[Any] = []

        class Tap:
            meter = link.meter

            def send(self, req: Request) -> Reply:
                rep = link.send(req)
                if req.stage is Stage.GEN_MID:
                    rec_mid.append(rep.arrays["x"].clone())
                return rep

        try:
            results[i] = client.generate(prompts[i], N_NEW, Tap())  # type: ignore[arg-type]
        except BaseException as exc:  # reported below
            results[i] = exc
            link.barrier.abort()
        mids[str(i)] = rec_mid

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert link.batches and all(n == N_SESSIONS for n in link.batches), link.batches
    for i in range(N_SESSIONS):
        assert results[i] == alone_tokens[i], f"session {i}: {results[i]!r}"
        assert len(mids[str(i)]) == len(alone_mid[i]) == N_NEW - 1
        for got, want in zip(mids[str(i)], alone_mid[i], strict=True):
            assert torch.equal(got, want), f"session {i}: batched gen_mid differs from alone"

    # against the row-at-a-time server (tile 1, a different kernel): float64 rounding only, same tokens
    for ids, nonce, want_tokens, want_mid in zip(prompts, nonces, alone_tokens, alone_mid, strict=True):
        rec = _Recorder(Server(b, batch_rows=1))
        client = Client(b, KeySchedule(master, nonce), cfg)
        assert client.generate(ids, N_NEW, rec) == want_tokens  # type: ignore[arg-type]
        for got, want in zip(rec.mid, want_mid, strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


def test_block_rows_tile_1_is_block() -> None:
    """With tile 1, block_rows runs exactly block's operations on each row (bit for bit)."""
    b = _backend("tiny-dense")
    c = b.config
    gen = np.random.default_rng(0)
    caches, xs, pos = [], [], []
    for length in (3, 5, 1):
        kv = tuple(b.from_numpy(gen.normal(size=(length, c.n_kv_heads, c.head_dim))) for _ in range(2))
        caches.append(kv)
        xs.append(b.from_numpy(gen.normal(size=(1, c.hidden_size))))
        pos.append(length)
    out, new = block_rows(b, b.concat_rows(xs), 1, np.array(pos), caches, tile=1)  # type: ignore[arg-type]
    for j in range(3):
        want, kv = block(b, xs[j], 1, np.array([pos[j]]), caches[j])  # type: ignore[arg-type]
        assert torch.equal(out[j : j + 1], want)
        assert torch.equal(new[j][0], kv[0]) and torch.equal(new[j][1], kv[1])


def test_handle_batch_isolates_bad_requests() -> None:
    """A bad request in a batch gets its own error; the others are served; one session twice is refused."""
    b = _backend("tiny-dense")
    server = Server(b, batch_rows=4)
    cfg = SCXConfig(level="permute", decoys="gaussian")
    clients, links = [], []
    for i in range(2):
        client = Client(b, KeySchedule.generate(), cfg)
        link = LocalTransport(server)
        client.prefill(np.array([1, 2, 3 + i]), link)
        client.share_keys(link)
        clients.append(client)
        links.append(link)
    st = [c.state for c in clients]
    assert st[0] is not None and st[1] is not None
    x = b.from_numpy(np.ones((1, b.config.hidden_size)))
    good = Request(st[0].keys.session_id, Stage.GEN_MID, 1, 0, st[0].seq, {"x": x}, {}, st[0].token)
    bad = Request(st[1].keys.session_id, Stage.GEN_MID, 1, 0, st[1].seq + 5, {"x": x}, {}, st[1].token)
    out = server.handle_batch([good, bad])
    assert isinstance(out[0], Reply) and isinstance(out[1], ProtocolError)
    with pytest.raises(ProtocolError, match="one message per session"):
        server.handle_batch([good, good])
    with pytest.raises(ProtocolError, match="batch_rows"):
        Server(b, batch_rows=0)

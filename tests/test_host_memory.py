"""The pool of large host buffers (:mod:`scx_ref.backends.host_memory`): a buffer is lent again only once no
array refers to its memory, the pool stays within its bound, what a block reused is counted, and the product
written into it (the LM head's) equals one ``F.linear``; a prefill's logits survive the next prefill."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from scx_ref.backends import host_memory
from scx_ref.backends.torch_backend import TorchBackend, dense
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from tests.tiny import tiny_weights

KIB = 1 << 10


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty pool lending from 64 KiB on, of at most 1 MiB (the module's own state restored after)."""
    monkeypatch.setattr(host_memory, "_maps", [])
    monkeypatch.setattr(host_memory, "_marked", set())
    monkeypatch.setattr(host_memory, "_reused", {})
    monkeypatch.setattr(host_memory, "LARGE_BYTES", 64 * KIB)
    monkeypatch.setattr(host_memory, "POOL_BYTES", 1024 * KIB)
    yield


def _pooled(t: torch.Tensor) -> bool:
    return any(t.data_ptr() == np.frombuffer(m, dtype=np.uint8).ctypes.data for m in host_memory._maps)


def test_small_buffers_are_plain_and_large_ones_pooled(pool: None) -> None:
    small = host_memory.empty((16, 1023), torch.float32)  # 65 472 bytes: below LARGE_BYTES
    large = host_memory.empty((16, 1024), torch.float32)
    assert small.shape == (16, 1023) and large.shape == (16, 1024)
    assert small.dtype == large.dtype == torch.float32 and large.is_contiguous()
    assert not _pooled(small) and _pooled(large)
    assert host_memory.held_bytes() == 64 * KIB
    f64 = host_memory.empty((8, 1024), torch.float64)
    assert f64.dtype == torch.float64 and _pooled(f64)


def test_a_buffer_is_lent_again_only_once_nothing_refers_to_it(pool: None) -> None:
    """While the tensor, a narrow view of it or a numpy array over it lives, the next request gets other
    memory and the values held are untouched; once the last of them is gone, the same mapping is lent."""
    a = host_memory.empty((32, 1024), torch.float32)
    a.fill_(1.0)
    held = [a.numpy()[:3], a.narrow(0, 5, 2)]
    first = a.data_ptr()
    del a
    for keep in range(len(held), -1, -1):
        b = host_memory.empty((32, 1024), torch.float32)
        if keep:
            assert b.data_ptr() != first
            b.fill_(2.0)  # written while the views live: they still read 1
            assert all(float(np.asarray(v).min()) == float(np.asarray(v).max()) == 1.0 for v in held)
            del held[-1]
        else:
            assert b.data_ptr() == first
        del b
    assert len(host_memory._maps) == 2  # the second mapping served while the first was held


def test_live_arrays_never_share_memory(pool: None) -> None:
    """A random sequence of requests and releases: every live array owns its bytes (each filled with its
    own number reads it back whole at the end) and the pool stays within POOL_BYTES."""
    rng = np.random.default_rng(3)
    live: dict[int, torch.Tensor] = {}
    for step in range(200):
        if live and rng.random() < 0.45:
            live.pop(int(rng.choice(list(live))))
        else:
            rows = int(rng.integers(8, 80))
            t = host_memory.empty((rows, 1024), torch.float32)  # 32–320 KiB
            t.fill_(float(step))
            live[step] = t
        assert host_memory.held_bytes() <= host_memory.POOL_BYTES
    for step, t in live.items():
        assert float(t.min()) == float(t.max()) == float(step)


def test_the_pool_stays_within_its_bound(pool: None) -> None:
    """Past POOL_BYTES the idle mappings are released to make room, and while every mapping is lent a
    large buffer is a plain tensor."""
    a = host_memory.empty((128, 1024), torch.float32)  # 512 KiB
    b = host_memory.empty((64, 1024), torch.float32)  # 256 KiB
    c = host_memory.empty((64, 1024), torch.float32)  # 256 KiB: 1 MiB held
    assert _pooled(a) and _pooled(b) and _pooled(c) and host_memory.held_bytes() == 1024 * KIB
    d = host_memory.empty((64, 1024), torch.float32)
    assert not _pooled(d)
    del a, b
    e = host_memory.empty((192, 1024), torch.float32)  # 768 KiB: both idle mappings released for it
    assert _pooled(e) and host_memory.held_bytes() == 1024 * KIB and len(host_memory._maps) == 2
    f = host_memory.empty((64, 1024), torch.float32)  # nothing idle to release: a plain tensor
    assert not _pooled(f) and host_memory.held_bytes() == 1024 * KIB
    del c, d, e, f


def test_reused_bytes_is_the_most_pooled_memory_lent_at_once(pool: None) -> None:
    """Of the mappings held at mark(): lent one after another, the larger counts; lent at the same time,
    both; a mapping made after the mark is growth, not counted."""
    a, b = host_memory.empty((32, 1024), torch.float32), host_memory.empty((48, 1024), torch.float32)
    del a, b  # two idle mappings: 128 and 192 KiB
    host_memory.mark()
    for _ in range(3):  # the same mapping lent three times
        x = host_memory.empty((32, 1024), torch.float32)
        del x
    assert host_memory.reused_bytes() == 128 * KIB
    y = host_memory.empty((48, 1024), torch.float32)
    del y  # the other one, after the first was released: the larger
    assert host_memory.reused_bytes() == 192 * KIB
    c = host_memory.empty((64, 1024), torch.float32)  # 256 KiB: larger than both, a new mapping
    x, y = host_memory.empty((32, 1024), torch.float32), host_memory.empty((48, 1024), torch.float32)
    assert host_memory.reused_bytes() == 320 * KIB  # both marked ones at once; the new one not
    host_memory.mark()
    assert host_memory.reused_bytes() == 0
    del c, x, y


@pytest.mark.parametrize("bias", [False, True])
def test_dense_writes_a_large_product_into_the_pool_as_f_linear(pool: None, bias: bool) -> None:
    """A pooled product (the LM head's) of LARGE_BYTES or more is written into pooled memory and equals one
    F.linear bit for bit (the same GEMM, given its output); the other products, and one that needs
    gradients, are not pooled."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((40, 24)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((1000, 24)).astype(np.float32))  # 160 000 bytes out
    b = torch.from_numpy(rng.standard_normal(1000).astype(np.float32)) if bias else None
    with torch.inference_mode():
        got, other = dense(x, w, b, pooled=True), dense(x, w, b)
    assert _pooled(got) and not _pooled(other)
    assert torch.equal(got, torch.nn.functional.linear(x, w, b)) and torch.equal(other, got)
    xg = x.clone().requires_grad_(True)
    out = dense(xg, w, b, pooled=True)
    assert out.requires_grad and not _pooled(out)


def test_logits_survive_the_next_prefill(pool: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the LM head's product pooled from 2 KiB on, a prefill's logits, still held, are unchanged by the
    next prefill, and equal bit for bit those of a run on the same keys without the pool."""
    monkeypatch.setattr(host_memory, "LARGE_BYTES", 2 * KIB)
    b = TorchBackend(tiny_weights(7, n_layers=2), "float32")
    ids = np.arange(20) % b.config.vocab_size
    master = bytes(range(1, 33))
    nonces = [bytes([k]) * 16 for k in (1, 2)]

    def client() -> Client[torch.Tensor]:
        return Client(b, KeySchedule(master, nonces[0]), SCXConfig(level="permute", max_length=32))

    pooled = client()
    first = pooled.prefill(ids, LocalTransport(Server(b)), nonce=nonces[0])
    assert host_memory.held_bytes() > 0
    kept = first.copy()
    second = pooled.prefill(ids[::-1].copy(), LocalTransport(Server(b)), nonce=nonces[1])
    np.testing.assert_array_equal(first, kept)
    assert first.ctypes.data != second.ctypes.data
    monkeypatch.setattr(host_memory, "LARGE_BYTES", 1 << 62)  # no pool: the same keys, the same logits
    np.testing.assert_array_equal(client().prefill(ids, LocalTransport(Server(b)), nonce=nonces[0]), kept)

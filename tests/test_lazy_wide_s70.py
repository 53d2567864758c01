"""The torch backend's float64 twin converts each weight when it is first read (stop 70).

Since stop 70 a float32 session at the presets' β = 5 blinds in float64 (``blind_dtype="auto"`` above
float32's limit, 1), and ``TorchBackend.widened`` held a float64 copy of the whole model — twice a float32
model's memory on the client and again on the server — even for level ``paper``, whose blinded messages
are its guard blocks' alone. The twin now converts a block's weights on their first read: level ``paper``
converts its two guard blocks' (of the tiny model's 4; SmolLM2: 2 of 30), level ``blind`` every block's;
the values are an eager copy's, bit for bit. Since stop 74 the numpy reference backend's twin does the same
(``tests/test_lazy_wide_numpy.py``); the session and thread tests here run on both backends."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.reference import ReferenceModel

from .tiny import tiny_weights

torch = pytest.importorskip("torch")

from scx_ref.backends.torch_backend import TorchBackend  # noqa: E402

PROMPT = np.array([3, 9, 1, 7, 4, 2])


def _converted_blocks(b: TorchBackend) -> list[int]:
    return b.widened()._w.converted_blocks()  # type: ignore[union-attr]


def test_the_twin_converts_nothing_until_read() -> None:
    b = TorchBackend(tiny_weights(3).astype(np.float32), torch.float32)
    wide = b.widened()
    assert wide.dtype == torch.float64 and wide is b.widened()  # built once
    assert wide._w.converted() == 0  # type: ignore[union-attr]


def _backend(kind: str, w: Any) -> Any:
    """A float32 backend of ``kind`` (torch or numpy) over ``w``."""
    return (
        TorchBackend(w.astype(np.float32), torch.float32) if kind == "torch" else NumpyBackend(w, np.float32)
    )


# level paper blinds the first guard block's rows and the last guard block's FFN (last_ffn="exact"); the numpy
# reference backend's twin (tests/test_lazy_wide_numpy.py) converts the same blocks
@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize(("level", "blocks"), [("paper", [0, 3]), ("blind", None)])
def test_a_session_converts_the_blocks_it_blinds(kind: str, level: str, blocks: list[int] | None) -> None:
    w = tiny_weights(3)
    b: Any = (
        TorchBackend(w.astype(np.float32), torch.float32) if kind == "torch" else NumpyBackend(w, np.float32)
    )
    cfg = SCXConfig(level=level, beta=5.0, max_length=16)  # type: ignore[arg-type]
    client = Client(b, KeySchedule.generate(), cfg)
    assert client.wide
    tokens = client.generate(PROMPT, 3, LocalTransport(Server(b)))
    assert tokens == ReferenceModel(w).generate(PROMPT, 3)
    want = list(range(w.config.n_layers)) if blocks is None else blocks
    twin = b.widened()._w if kind == "torch" else b.widened().weights
    assert twin.converted_blocks() == want


def test_the_twins_values_are_an_eager_copys() -> None:
    b = TorchBackend(tiny_weights(3).astype(np.float32), torch.float32)
    eager = TorchBackend.from_tensors(b.config, b._w, torch.float64, b.device)  # type: ignore[arg-type]
    wide = b.widened()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, b.config.hidden_size)))
    for layer in range(b.config.n_layers):
        for which in ("wqkv", "wo"):
            assert torch.equal(wide.project(x, which, layer), eager.project(x, which, layer))
    assert torch.equal(wide.project(x, "lm_head"), eager.project(x, "lm_head"))
    ids = np.array([1, 2, 3])
    assert torch.equal(wide.embed(ids), eager.embed(ids))


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_threads_reading_a_block_first_get_one_copy(kind: str) -> None:
    b = _backend(kind, tiny_weights(3))
    twin = b.widened()._w if kind == "torch" else b.widened().weights
    seen: list[object] = []
    barrier = threading.Barrier(8)

    def read() -> None:
        barrier.wait()
        seen.append(twin.layers[1])

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(s is seen[0] for s in seen)
    assert twin.converted_blocks() == [1]

"""A prefill holds no block's attention-half replies through that block's FFN stage.

The FFN stage's intermediates are a block's largest arrays where the MLP is wide; the replies of the block's
QKV, attention and O stages are dead by then (each was consumed by the pass that produced the FFN rows), so
they must be freed before the FFN message is sent, not kept alive by the client until the block returns.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.stages import Stage

from .tiny import tiny_weights

_ATTENTION_HALF = (Stage.QKV, Stage.ATTN, Stage.O)


class _Watching:
    """A local transport that keeps weak references to the arrays of every prefill reply of a block's
    QKV, attention and O stages, and counts, when the block's FFN message is sent, those still alive."""

    def __init__(self, server: Server[Any]) -> None:
        self.inner = LocalTransport(server)
        self.meter = self.inner.meter
        self.refs: dict[int, list[weakref.ref[Any]]] = {}
        self.alive_at_ffn: dict[int, int] = {}

    def send(self, request: Request) -> Reply:
        if request.stage == Stage.FFN and request.step == -1:
            self.alive_at_ffn[request.layer] = sum(r() is not None for r in self.refs.get(request.layer, []))
        reply = self.inner.send(request)
        if request.stage in _ATTENTION_HALF and request.step == -1:
            self.refs.setdefault(request.layer, []).extend(weakref.ref(a) for a in reply.arrays.values())
        return reply


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("level", ["permute", "paper"])
def test_a_blocks_attention_replies_are_freed_before_its_ffn_stage(
    backend: str, verify: bool, level: str
) -> None:
    """At every block's FFN message no reply array of that block's QKV, attention or O stage is alive
    (weak references: the arrays are freed, not merely unused), with and without verification, on both
    backends; and the replies were there to watch (each block's three stages replied)."""
    w = tiny_weights(7)
    b: Any = NumpyBackend(w) if backend == "numpy" else TorchBackend(w, torch.float64)
    client = Client(b, KeySchedule.generate(), SCXConfig(level=level, r1=2, r2=2, verify=verify))  # type: ignore[arg-type]
    prompt = [3, 1, 4, 1, 5, 9, 2]
    # one request first: a kernel's first call in a process compiles it (or loads it from numba's cache), and
    # that path left its arguments in reference cycles until the next garbage collection (seen with a fresh
    # cache: block 0's three replies alive, none after gc.collect())
    client.prefill(prompt, LocalTransport(Server(b)))
    link = _Watching(Server(b))
    client.prefill(prompt, link)
    layers = range(w.config.n_layers)
    assert all(len(link.refs.get(i, [])) >= 3 for i in layers)
    assert link.alive_at_ffn == {i: 0 for i in layers}

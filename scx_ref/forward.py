"""The plaintext forward over the :class:`~scx_ref.backends.base.Backend` interface: one block loop.

:func:`block` is one pre-norm decoder block on rows that continue a KV cache. Every plaintext path built
on a backend runs it: :class:`PlainRunner` (the project's own plaintext baseline on numpy or torch, and the
source of the public calibration pool through its ``trace``) and the server's middle blocks during
generation (DESIGN §5.3), which are plaintext computation on the server's valid caches. The numpy
:class:`~scx_ref.reference.ReferenceModel` stays a separate, independent oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic

import numpy as np

from .backends.base import A, Backend, IndexArray, split_qkv
from .errors import ProtocolError
from .stages import Stage

__all__ = ["PlainRunner", "Trace", "block"]

#: ``trace(stage, layer, rows)`` receives the input rows of each stage: QKV (block input), LOCK
#: (post-RoPE keys, flattened), O (attention output), FFN (residual before the MLP), HEAD (final rows).
Trace = Callable[[Stage, int, Any], None]


def block(
    b: Backend[A],
    x: A,
    layer: int,
    positions: IndexArray,
    cache: tuple[A, A] | None,
    trace: Trace | None = None,
) -> tuple[A, tuple[A, A]]:
    """One pre-norm block: ``x + Attn(norm(x))`` then ``+ MLP(norm(·))``, the rows at ``positions``
    attending causally to ``cache`` (post-RoPE keys and values of earlier positions, or None) and to
    themselves. Returns the block output and the extended cache (keys after RoPE)."""
    c = b.config
    n = b.nrows(x)
    if trace:
        trace(Stage.QKV, layer, x)
    q, k, v = split_qkv(b, b.project(b.norm(x, "attn", layer), "wqkv", layer))
    q, k = b.rope(q, positions), b.rope(k, positions)
    if trace:
        trace(Stage.LOCK, layer, b.reshape(k, (n, c.kv_dim)))
    if cache is not None:
        k, v = b.concat_rows([cache[0], k]), b.concat_rows([cache[1], v])
    start = b.nrows(k) - n
    # one new row sees the whole cache: no mask; several rows are causal among themselves
    k_pos = None if n == 1 else np.arange(start + n)
    o = b.reshape(b.attention(q, k, v, positions, k_pos), (n, c.q_dim))
    if trace:
        trace(Stage.O, layer, o)
    x = b.add(x, b.project(o, "wo", layer))
    if trace:
        trace(Stage.FFN, layer, x)
    return b.add(x, b.mlp(b.norm(x, "mlp", layer), layer)), (k, v)


class PlainRunner(Generic[A]):
    """Plaintext prefill/decode over a backend, with a per-layer KV cache (post-RoPE keys)."""

    def __init__(self, backend: Backend[A], trace: Trace | None = None) -> None:
        self.b = backend
        self.trace = trace
        self.cache: list[tuple[A, A]] = []

    @property
    def length(self) -> int:
        """Positions held in the cache."""
        return self.b.nrows(self.cache[0][0]) if self.cache else 0

    def reset(self) -> None:
        """Empty the cache (a new sequence)."""
        self.cache = []

    def forward(self, ids: Any, last_only: bool = False) -> A:
        """Logits of ``ids`` continuing the cache (rows × V, or only the last row); extends the cache."""
        b, c = self.b, self.b.config
        ids_arr = np.asarray(ids, dtype=np.int64)
        n, start = len(ids_arr), self.length
        if start + n > c.max_positions:
            raise ProtocolError(f"sequence length {start + n} exceeds max_positions {c.max_positions}")
        pos = np.arange(start, start + n)
        x = b.embed(ids_arr)
        for i in range(c.n_layers):
            x, kv = block(b, x, i, pos, self.cache[i] if i < len(self.cache) else None, self.trace)
            if i < len(self.cache):
                self.cache[i] = kv
            else:
                self.cache.append(kv)
        if self.trace:
            self.trace(Stage.HEAD, c.n_layers, x)
        if last_only:
            x = b.narrow(x, 0, n - 1, n)
        return b.project(b.norm(x, "final"), "lm_head")

    def prefill(self, ids: Any, last_only: bool = False) -> A:
        """Logits of a prompt on a fresh cache."""
        self.reset()
        return self.forward(ids, last_only)

    def decode(self, token: int) -> A:
        """Logits (1 × V) of one new token."""
        return self.forward(np.asarray([token], dtype=np.int64))

    def generate(self, ids: Any, n_new: int) -> list[int]:
        """Greedy continuation (``n_new`` tokens), as plaintext greedy decoding."""
        nxt = self.b.argmax_last(self.prefill(ids, last_only=True))
        out: list[int] = []
        for step in range(n_new):
            out.append(nxt)
            if step + 1 < n_new:
                nxt = self.b.argmax_last(self.decode(nxt))
        return out

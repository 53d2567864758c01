"""Plaintext inference written against the Backend interface.

It is the same computation as :mod:`scx_ref.reference` but runs on any backend (numpy or torch), so
it serves as the plaintext baseline of benchmarks and as the source of the public calibration pool
(``trace`` receives each stage's input rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic

import numpy as np

from ..backends.base import A, Backend, split_qkv

__all__ = ["PlainRunner"]

Trace = Callable[[str, int, Any], None]


class PlainRunner(Generic[A]):
    """Plaintext prefill/decode over a backend, with a per-layer KV cache (post-RoPE keys)."""

    def __init__(self, backend: Backend[A], trace: Trace | None = None) -> None:
        self.b = backend
        self.trace = trace
        self.keys: list[A] = []
        self.values: list[A] = []
        self.length = 0

    def reset(self) -> None:
        self.keys, self.values, self.length = [], [], 0

    def forward(self, ids: np.ndarray) -> A:
        """Logits of ``ids`` continuing the cache (rows × V); extends the cache."""
        b, c = self.b, self.b.config
        n = len(ids)
        pos = np.arange(self.length, self.length + n)
        x = b.embed(np.asarray(ids, dtype=np.int64))
        for i in range(c.n_layers):
            if self.trace:
                self.trace("qkv", i, x)
            z = b.project(b.norm(x, "attn", i), "wqkv", i)
            q, k, v = split_qkv(b, z)
            q, k = b.rope(q, pos), b.rope(k, pos)
            if self.trace:
                self.trace("k", i, b.reshape(k, (n, c.kv_dim)))
            if i < len(self.keys):
                self.keys[i] = b.concat_rows([self.keys[i], k])
                self.values[i] = b.concat_rows([self.values[i], v])
            else:
                self.keys.append(k)
                self.values.append(v)
            k_pos = np.arange(self.length + n)
            o = b.reshape(b.attention(q, self.keys[i], self.values[i], pos, k_pos), (n, c.q_dim))
            if self.trace:
                self.trace("o", i, o)
            x = b.add(x, b.project(o, "wo", i))
            if self.trace:
                self.trace("ffn", i, x)
            x = b.add(x, b.mlp(b.norm(x, "mlp", i), i))
        self.length += n
        if self.trace:
            self.trace("head", c.n_layers, x)
        return b.project(b.norm(x, "final"), "lm_head")

"""The plaintext reference forward: the oracle every SCX run is checked against.

Read it top to bottom: embed → L pre-norm blocks (attention with RoPE and GQA, then MLP or MoE,
each with a residual add) → final norm → LM head. ``prefill`` runs a prompt and returns a KV cache
(post-RoPE keys); ``decode`` runs one token against that cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import ops
from ._checks import FloatArray
from .errors import ProtocolError
from .weights import LayerWeights, ModelWeights

__all__ = ["KVCache", "ReferenceModel", "Trace"]

Trace = Callable[[str, int, FloatArray], None]


@dataclass
class KVCache:
    """Per-layer keys (after RoPE) and values, each rows × H_kv × d_h."""

    keys: list[FloatArray] = field(default_factory=list)
    values: list[FloatArray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[0])

    def copy(self) -> KVCache:
        return KVCache([k.copy() for k in self.keys], [v.copy() for v in self.values])


class ReferenceModel:
    """Plaintext inference on :class:`ModelWeights` (numpy, in the weights' dtype)."""

    def __init__(self, weights: ModelWeights, trace: Trace | None = None) -> None:
        self.weights = weights
        self.config = weights.config
        self.trace = trace

    def _record(self, stage: str, layer: int, x: FloatArray) -> None:
        if self.trace is not None:
            self.trace(stage, layer, x)

    def block(
        self, x: FloatArray, lw: LayerWeights, positions: np.ndarray, layer: int, cache: KVCache
    ) -> FloatArray:
        """One pre-norm block; appends this call's keys/values to ``cache`` at ``layer``.

        With a ``trace``, it receives the block input ``x``, the normalized input ``xhat``, post-RoPE
        ``q``/``k`` and ``v``, the attention output ``o`` and the residual before the MLP ``h``.
        """
        c = self.config
        self._record("x", layer, x)
        h = ops.rms_norm(x, lw.attn_norm, c.rms_eps)
        self._record("xhat", layer, h)
        q, k, v = ops.qkv(h, lw, c.n_heads, c.n_kv_heads, c.head_dim)
        q = ops.apply_rope(q, positions, c.rope_theta)
        k = ops.apply_rope(k, positions, c.rope_theta)
        self._record("q", layer, q)
        self._record("k", layer, k)
        self._record("v", layer, v)
        if layer < len(cache.keys):
            cache.keys[layer] = np.concatenate([cache.keys[layer], k])
            cache.values[layer] = np.concatenate([cache.values[layer], v])
        else:
            cache.keys.append(k)
            cache.values.append(v)
        keys, values = cache.keys[layer], cache.values[layer]
        mask = ops.causal_mask(x.shape[0], keys.shape[0])
        att = ops.attention(q, keys, values, mask=mask).reshape(x.shape[0], c.q_dim)
        self._record("o", layer, att)
        x = x + att @ lw.wo
        self._record("h", layer, x)
        h = ops.rms_norm(x, lw.mlp_norm, c.rms_eps)
        return x + ops.mlp(h, lw.mlp, c.top_k)

    def forward(
        self, ids: np.ndarray, cache: KVCache | None = None, upto: int | None = None
    ) -> tuple[FloatArray, KVCache]:
        """Logits (rows × V) of ``ids`` continuing ``cache`` (a new cache when None).

        With ``upto``, stop after block ``upto`` and return that block's output rows instead of logits.
        """
        cache = KVCache() if cache is None else cache
        start = cache.length
        if start + len(ids) > self.config.max_positions:
            raise ProtocolError(
                f"sequence length {start + len(ids)} exceeds max_positions {self.config.max_positions}"
            )
        positions = np.arange(start, start + len(ids))
        x = ops.embed(ids, self.weights.embed)
        for i, lw in enumerate(self.weights.layers):
            x = self.block(x, lw, positions, i, cache)
            if i == upto:
                return x, cache
        self._record("final", self.config.n_layers, x)
        x = ops.rms_norm(x, self.weights.final_norm, self.config.rms_eps)
        return x @ self.weights.lm_head, cache

    def prefill(self, ids: np.ndarray) -> tuple[FloatArray, KVCache]:
        """Logits of every prompt row, and the prompt's KV cache."""
        return self.forward(np.asarray(ids))

    def decode(self, token: int, cache: KVCache) -> FloatArray:
        """Logits (V,) of one new token at position ``cache.length``; extends ``cache`` in place."""
        logits, _ = self.forward(np.asarray([token]), cache)
        row: FloatArray = logits[0]
        return row

    def generate(self, ids: np.ndarray, n_new: int) -> list[int]:
        """Greedy continuation: ``n_new`` argmax tokens after the prompt."""
        logits, cache = self.prefill(ids)
        out: list[int] = []
        nxt = int(np.argmax(logits[-1]))
        for step in range(n_new):
            out.append(nxt)
            if step + 1 < n_new:
                nxt = int(np.argmax(self.decode(nxt, cache)))
        return out

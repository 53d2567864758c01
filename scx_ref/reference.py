"""The plaintext reference forward: the oracle every SCX run is checked against.

Read it top to bottom: embed → L pre-norm blocks (attention with RoPE and GQA, then MLP or MoE,
each with a residual add) → final norm → LM head. ``prefill`` runs a prompt and returns a KV cache
(post-RoPE keys); ``decode`` runs one token against that cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ops
from ._checks import FloatArray, as_float_array, check_int, token_ids
from .errors import ConfigError, ProtocolError, ShapeError
from .sampling import greedy_tokens
from .transforms import _positions
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
        """Positions held: the rows of block 0 (0 for an empty cache)."""
        return 0 if not self.keys else int(self.keys[0].shape[0])

    def copy(self) -> KVCache:
        """An independent copy (every array copied): extending either leaves the other as it was."""
        return KVCache([k.copy() for k in self.keys], [v.copy() for v in self.values])


def _upto_of(stop: int, n_layers: int) -> str:
    """How a forward through block ``stop`` is asked for (the ``upto`` argument)."""
    return f"None or {stop}" if stop == n_layers - 1 else str(stop)


class ReferenceModel:
    """Plaintext inference on :class:`ModelWeights` (numpy, in the weights' dtype).

    ConfigError when ``weights`` is not a :class:`ModelWeights` or ``trace`` is neither None nor callable.
    """

    def __init__(self, weights: ModelWeights, trace: Trace | None = None) -> None:
        if not isinstance(weights, ModelWeights):
            raise ConfigError(f"ReferenceModel needs ModelWeights, got {type(weights).__name__}")
        if trace is not None and not callable(trace):
            raise ConfigError(f"trace must be a callable or None, got {type(trace).__name__}")
        self.weights = weights
        self.config = weights.config
        self.trace = trace

    def _record(self, stage: str, layer: int, x: FloatArray) -> None:
        if self.trace is not None:
            self.trace(stage, layer, x)

    def block(
        self, x: FloatArray, lw: LayerWeights, positions: np.ndarray, layer: int, cache: KVCache
    ) -> FloatArray:
        """One pre-norm block, h = x + Attn(RMSNorm(x)), then h + MLP(RMSNorm(h)); the rows at
        ``positions`` attend causally to the cached keys/values of block ``layer`` and to themselves, and
        this call's keys (after RoPE) and values are appended to ``cache`` at ``layer`` once the block ran.

        With a ``trace``, it receives the block input ``x``, the normalized input ``xhat``, post-RoPE
        ``q``/``k`` and ``v``, the attention output ``o`` and the residual before the MLP ``h``.
        ProtocolError (``cache`` unchanged) unless ``cache`` is a KVCache (lists of as many keys as
        values) and ``layer`` an integer in [0, len(cache.keys)]: the next block of a cache being built,
        or one it holds (never filed at another index), whose keys and values are then arrays of the same
        shape rows × H_kv × d_h. ConfigError unless ``lw`` is a LayerWeights; DTypeError or ShapeError unless
        ``x`` is a floating-point array of rows × d (NaN and ±inf pass through, as in :meth:`forward`) and
        ``positions`` one integer >= 0 per row. A call that raises (a bad ``x`` or ``positions``, a
        ``trace``) leaves ``cache`` as it was.
        """
        if (
            not isinstance(cache, KVCache)
            or not isinstance(cache.keys, list)
            or not isinstance(cache.values, list)
            or len(cache.keys) != len(cache.values)
        ):
            got = type(cache).__name__
            if isinstance(cache, KVCache):
                got = " and ".join(
                    f"{len(a) if isinstance(a, list) else type(a).__name__} {what}"
                    for what, a in (("keys", cache.keys), ("values", cache.values))
                )
            raise ProtocolError(f"block needs a KVCache holding lists of as many keys as values, got {got}")
        layer = check_int(layer, "layer", 0, len(cache.keys), error=ProtocolError)
        c = self.config
        if not isinstance(lw, LayerWeights):
            raise ConfigError(f"block needs a block's LayerWeights, got {type(lw).__name__}")
        x = as_float_array(x, "x", ndim=2, allow_nonfinite=True)
        if x.shape[1] != c.hidden_size:
            raise ShapeError(f"x must be rows × {c.hidden_size}, got shape {x.shape}")
        positions = _positions(positions, x.shape[0])
        n_kv, d_h = c.n_kv_heads, c.head_dim
        old_k, old_v = (cache.keys[layer], cache.values[layer]) if layer < len(cache.keys) else (None, None)
        # checked before anything runs: a block of the wrong shape raised with the keys extended alone
        ok = old_k is None or (
            isinstance(old_k, np.ndarray)
            and isinstance(old_v, np.ndarray)
            and old_k.ndim == 3
            and old_k.shape[1:] == (n_kv, d_h)
            and old_v.shape == old_k.shape
        )
        if not ok:
            got = ", ".join(str(getattr(a, "shape", type(a).__name__)) for a in (old_k, old_v))
            raise ProtocolError(
                f"cache block {layer} must hold keys and values of shape (rows, {n_kv}, {d_h}), got {got}"
            )
        self._record("x", layer, x)
        h = ops.rms_norm(x, lw.attn_norm, c.rms_eps)
        self._record("xhat", layer, h)
        q, k, v = ops.qkv(h, lw, c.n_heads, n_kv, d_h)
        q = ops.apply_rope(q, positions, c.rope_theta)
        k = ops.apply_rope(k, positions, c.rope_theta)
        self._record("q", layer, q)
        self._record("k", layer, k)
        self._record("v", layer, v)
        keys = k if old_k is None else np.concatenate([old_k, k])
        values = v if old_v is None else np.concatenate([old_v, v])
        mask = ops.causal_mask(x.shape[0], keys.shape[0])  # the new rows are the last ones
        att = ops.attention(q, keys, values, mask=mask).reshape(x.shape[0], c.q_dim)
        self._record("o", layer, att)
        x = x + att @ lw.wo
        self._record("h", layer, x)
        out = x + ops.mlp(ops.rms_norm(x, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
        if old_k is None:  # the cache is extended (new arrays, never the old ones changed) only now
            cache.keys.append(keys)
            cache.values.append(values)
        else:
            cache.keys[layer], cache.values[layer] = keys, values
        return out

    def _check_cache(self, cache: Any, stop: int) -> KVCache:
        """``cache`` (a new one when None) after checking it can be continued through block ``stop``:
        a KVCache whose layers all hold the same rows of floating-point keys and values, and either none
        or exactly blocks 0..stop."""
        if cache is None:
            return KVCache()
        if not isinstance(cache, KVCache):
            raise ProtocolError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        keys, values = cache.keys, cache.values
        if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
            raise ProtocolError("cache.keys and cache.values must be lists of one array per block")
        if keys and len(keys) != stop + 1:
            raise ProtocolError(
                f"the cache holds blocks 0..{len(keys) - 1}, so only a forward with upto="
                f"{_upto_of(len(keys) - 1, self.config.n_layers)} continues it, not one through block {stop}"
            )
        want = (self.config.n_kv_heads, self.config.head_dim)
        rows = -1
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            ok = isinstance(k, np.ndarray) and isinstance(v, np.ndarray) and k.ndim == 3
            ok = ok and k.shape[1:] == want and v.shape == k.shape
            rows = k.shape[0] if ok and rows < 0 else rows
            if not ok or k.shape[0] != rows:
                raise ProtocolError(
                    f"cache block {i} must hold keys and values of shape (rows, {want[0]}, {want[1]}) with "
                    f"the rows of block 0, got {getattr(k, 'shape', type(k).__name__)}, "
                    f"{getattr(v, 'shape', type(v).__name__)}"
                )
            if not (np.issubdtype(k.dtype, np.floating) and np.issubdtype(v.dtype, np.floating)):
                raise ProtocolError(
                    f"cache block {i} must hold floating-point keys and values, got {k.dtype}, {v.dtype}"
                )
        return cache

    def forward(
        self, ids: np.ndarray, cache: KVCache | None = None, upto: int | None = None
    ) -> tuple[FloatArray, KVCache]:
        """Logits (rows × V) of ``ids`` continuing ``cache`` (a new cache when None), which is extended
        in place.

        With ``upto``, stop after block ``upto`` (0 ≤ upto < n_layers) and return that block's output rows
        instead of logits; the cache then holds blocks 0..upto only, and only a forward with the same
        ``upto`` continues it. Everything is checked before the cache is touched (VocabularyError for
        the ids, ProtocolError for an empty prompt, a bad ``upto`` or cache, or too long a sequence), and
        a call that raises leaves ``cache`` as it was.
        """
        n_layers = self.config.n_layers
        if upto is not None and (
            isinstance(upto, bool) or not isinstance(upto, (int, np.integer)) or not 0 <= upto < n_layers
        ):
            raise ProtocolError(f"upto must be None or a block index in [0, {n_layers}), got {upto!r}")
        stop = n_layers - 1 if upto is None else int(upto)
        arr = token_ids(ids)
        cache = self._check_cache(cache, stop)
        start = cache.length
        if start + len(arr) > self.config.max_positions:
            raise ProtocolError(
                f"sequence length {start + len(arr)} exceeds max_positions {self.config.max_positions}"
            )
        positions = np.arange(start, start + len(arr))
        x = ops.embed(arr, self.weights.embed)
        old_keys, old_values = list(cache.keys), list(cache.values)  # block() replaces, never mutates
        try:
            for i, lw in enumerate(self.weights.layers[: stop + 1]):
                x = self.block(x, lw, positions, i, cache)
            if upto is not None:
                return x, cache
            self._record("final", n_layers, x)
            x = ops.rms_norm(x, self.weights.final_norm, self.config.rms_eps)
        except BaseException:
            cache.keys[:], cache.values[:] = old_keys, old_values
            raise
        return x @ self.weights.lm_head, cache

    def prefill(self, ids: Any) -> tuple[FloatArray, KVCache]:
        """Logits of every prompt row, and the prompt's KV cache (``ids``: a non-empty 1-D integer
        array-like; VocabularyError/ProtocolError otherwise, as :meth:`forward`)."""
        return self.forward(ids)

    def decode(self, token: int, cache: KVCache) -> FloatArray:
        """Logits (V,) of one new token at position ``cache.length``; extends ``cache`` in place (a
        complete cache from :meth:`prefill`, or an empty KVCache: the token is then at position 0;
        ProtocolError otherwise, the cache then unchanged)."""
        if not isinstance(cache, KVCache):
            raise ProtocolError(f"decode needs the KVCache of a prefill, got {type(cache).__name__}")
        logits, _ = self.forward(np.asarray([token]), cache)
        row: FloatArray = logits[0]
        return row

    def generate(self, ids: Any, n_new: int) -> list[int]:
        """Greedy continuation: ``n_new`` (an integer >= 0, else ConfigError) argmax tokens after the
        prompt. An SCXError raised after generation started carries the tokens made so far in
        ``tokens`` (another exception gets them in a note)."""
        n_new = check_int(n_new, "n_new", 0)
        cache: list[KVCache] = []  # the prefill's, which the steps extend

        def first() -> int:
            logits, kv = self.prefill(ids)
            cache.append(kv)
            return int(np.argmax(logits[-1]))

        return greedy_tokens(first, lambda tok: int(np.argmax(self.decode(tok, cache[0]))), n_new)

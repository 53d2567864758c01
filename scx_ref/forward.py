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

from ._checks import check_int, token_ids
from .backends.base import A, Backend, IndexArray, is_backend
from .errors import ConfigError, ProtocolError
from .sampling import greedy_tokens
from .stages import Stage

__all__ = ["PlainRunner", "Trace", "block", "block_rows"]

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
    themselves. Returns the block output and the extended cache (keys after RoPE). ProtocolError when
    ``cache`` is neither None nor a (keys, values) pair."""
    c = b.config
    n = b.nrows(x)
    if cache is not None and not (isinstance(cache, (tuple, list)) and len(cache) == 2):
        raise ProtocolError(f"block: cache must be None or a (keys, values) pair, got {type(cache).__name__}")
    if trace:
        trace(Stage.QKV, layer, x)
    q, k, v = _qkv(b, x, layer, positions)
    if trace:
        trace(Stage.LOCK, layer, b.reshape(k, (n, c.kv_dim)))
    if cache is not None:
        k, v = b.append_rows(cache[0], k), b.append_rows(cache[1], v)
    else:  # the cache keeps K and V alone, not the Q heads and projections they are views of
        k, v = b.compact(k), b.compact(v)
    start = b.nrows(k) - n
    # one new row sees the whole cache: no mask; several rows are causal among themselves
    k_pos = None if n == 1 else np.arange(start + n)
    o = b.reshape(b.attention(q, k, v, positions, k_pos), (n, c.q_dim))
    if trace:
        trace(Stage.O, layer, o)
    x = b.add(x, b.project(o, "wo", layer))
    if trace:
        trace(Stage.FFN, layer, x)
    return _mlp_residual(b, x, layer), (k, v)


def _qkv(b: Backend[A], x: A, layer: int, positions: IndexArray) -> tuple[A, A, A]:
    """Q, K, V of rows ``x`` (K and Q after RoPE at ``positions``; Q and K may be views of one array)."""
    c = b.config
    n = b.nrows(x)
    z = b.project(b.norm(x, "attn", layer), "wqkv", layer)
    heads = c.n_heads + c.n_kv_heads  # RoPE on the Q and K heads of z at once
    qk = b.rope(b.reshape(b.narrow(z, 1, 0, c.q_dim + c.kv_dim), (n, heads, c.head_dim)), positions)
    q, k = b.narrow(qk, 1, 0, c.n_heads), b.narrow(qk, 1, c.n_heads, heads)
    v = b.reshape(b.narrow(z, 1, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim), (n, c.n_kv_heads, c.head_dim))
    return q, k, v


def _mlp_residual(b: Backend[A], x: A, layer: int) -> A:
    return b.add(x, b.mlp(b.norm(x, "mlp", layer), layer))


def block_rows(
    b: Backend[A],
    x: A,
    layer: int,
    positions: IndexArray,
    caches: list[tuple[A, A]],
    tile: int = 1,
) -> tuple[A, list[tuple[A, A]]]:
    """One block on r *independent* rows: row j is the next token of its own sequence, at
    ``positions[j]``, attending to ``caches[j]`` (post-RoPE keys and values) and itself — the middle
    blocks of several sessions' generation steps at once (DESIGN §5.6). Returns the r output rows and
    the r extended caches. ProtocolError unless there is at least one row, one integer position and one
    cache (a (keys, values) pair, in a list) per row, and ``tile`` is an integer >= 1.

    Batch invariance: every row-wise stage (norms, projections, RoPE, dense MLP) runs on tiles of
    exactly ``tile`` rows (zero rows pad the last tile) and attention runs per row on its own cache, so a
    row's result is bit-for-bit the same whichever rows share its tiles and wherever it sits in them
    (a matrix product's rounding depends on its shape, never on the other rows of a fixed shape). An
    MoE MLP, whose expert products take as many rows as are routed to each expert, runs per row. With
    ``tile = 1`` each row runs exactly the operations :func:`block` runs on one row.
    """
    c = b.config
    r = b.nrows(x)
    try:
        pos = np.asarray(positions)
    except (TypeError, ValueError) as exc:  # ragged nested sequences: numpy's bare ValueError
        raise ProtocolError(f"block_rows: positions must be one integer per row: {exc}") from None
    if not isinstance(caches, (list, tuple)) or not all(
        isinstance(kv, (tuple, list)) and len(kv) == 2 for kv in caches
    ):
        raise ProtocolError(f"block_rows: caches must be a list of (keys, values) pairs, got {caches!r:.60}")
    if r == 0 or len(caches) != r or pos.shape != (r,) or (pos.dtype.kind not in "iu"):
        raise ProtocolError(
            f"block_rows: {r} rows (at least one), positions {pos.dtype} of shape {pos.shape} (one integer "
            f"per row), {len(caches)} caches"
        )
    tile = check_int(tile, "tile", 1, error=ProtocolError)
    outs: list[A] = []
    new: list[tuple[A, A]] = []
    pos = pos.astype(np.int64, copy=False)
    for start in range(0, r, tile):
        m = min(tile, r - start)
        xt = b.narrow(x, 0, start, start + m)
        pt = pos[start : start + m]
        if m < tile:  # pad with zero rows at position 0: their results are dropped
            xt = b.concat_rows([xt, b.from_numpy(np.zeros((tile - m, c.hidden_size)))])
            pt = np.concatenate([pt, np.zeros(tile - m, dtype=np.int64)])
        q, k, v = _qkv(b, xt, layer, pt)
        rows_o = []
        for j in range(m):
            kc = b.append_rows(caches[start + j][0], b.narrow(k, 0, j, j + 1))
            vc = b.append_rows(caches[start + j][1], b.narrow(v, 0, j, j + 1))
            new.append((kc, vc))
            o = b.attention(b.narrow(q, 0, j, j + 1), kc, vc, pt[j : j + 1], None)
            rows_o.append(b.reshape(o, (1, c.q_dim)))
        if m < tile:
            rows_o.append(b.from_numpy(np.zeros((tile - m, c.q_dim))))
        xt = b.add(xt, b.project(b.concat_rows(rows_o) if tile > 1 else rows_o[0], "wo", layer))
        if c.is_moe and tile > 1:
            xt = b.concat_rows([_mlp_residual(b, b.narrow(xt, 0, j, j + 1), layer) for j in range(m)])
        else:
            xt = b.narrow(_mlp_residual(b, xt, layer), 0, 0, m)
        outs.append(xt)
    return (b.concat_rows(outs) if len(outs) > 1 else outs[0]), new


class PlainRunner(Generic[A]):
    """Plaintext prefill/decode over a backend, with a per-layer KV cache (post-RoPE keys).

    ConfigError when ``backend`` is not a backend (:func:`~scx_ref.backends.base.is_backend`: a
    :class:`~scx_ref.config.ModelConfig` ``config`` and every backend method; a model's weights are not one)
    or ``trace`` is neither None nor callable."""

    def __init__(self, backend: Backend[A], trace: Trace | None = None) -> None:
        if not is_backend(backend):
            raise ConfigError(f"PlainRunner needs a Backend, got {type(backend).__name__}")
        if trace is not None and not callable(trace):
            raise ConfigError(f"trace must be a callable or None, got {type(trace).__name__}")
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
        """Logits of ``ids`` continuing the cache (rows × V, or only the last row when ``last_only``: a bool,
        else ConfigError); extends the cache.
        ``ids`` are checked first (:func:`~scx_ref._checks.token_ids`: VocabularyError unless 1-D integers in
        the vocabulary, ProtocolError when empty), the cache left as it was: a float id was truncated to an
        integer token before. A call that raises later (in a ``trace``, in the backend) leaves the cache as
        it was too."""
        b, c = self.b, self.b.config
        if not isinstance(last_only, (bool, np.bool_)):
            raise ConfigError(
                f"last_only must be True or False, got {type(last_only).__name__} {last_only!r:.40}"
            )
        ids_arr = token_ids(ids, c.vocab_size)
        n, start = len(ids_arr), self.length
        if start + n > c.max_positions:
            raise ProtocolError(f"sequence length {start + n} exceeds max_positions {c.max_positions}")
        pos = np.arange(start, start + n)
        x = b.embed(ids_arr)
        # the extended caches are kept aside and replace the old ones only once the whole forward ran: a
        # call that raises midway (a trace, the backend) leaves the cache as it was, never some blocks
        # extended and others not (append_rows never changes a view it extends)
        cache: list[tuple[A, A]] = []
        for i in range(c.n_layers):
            x, kv = block(b, x, i, pos, self.cache[i] if i < len(self.cache) else None, self.trace)
            cache.append(kv)
        if self.trace:
            self.trace(Stage.HEAD, c.n_layers, x)
        if last_only:
            x = b.narrow(x, 0, n - 1, n)
        logits = b.project(b.norm(x, "final"), "lm_head")
        self.cache = cache
        return logits

    def prefill(self, ids: Any, last_only: bool = False) -> A:
        """Logits of a prompt on a fresh cache. A call that raises (bad ``ids``, too long a prompt, a
        ``trace``, the backend) leaves the cache as it was: the previous sequence's, not emptied."""
        old, self.cache = self.cache, []
        try:
            return self.forward(ids, last_only)
        except BaseException:
            self.cache = old
            raise

    def decode(self, token: int) -> A:
        """Logits (1 × V) of one new token (an integer id in the vocabulary: VocabularyError otherwise)."""
        return self.forward([token])

    def generate(self, ids: Any, n_new: int) -> list[int]:
        """Greedy continuation (``n_new`` tokens: an integer >= 0, else ConfigError before anything runs),
        as plaintext greedy decoding. An SCXError raised after generation started (e.g. the sequence
        passing max_positions) carries the tokens made so far in ``tokens``, as
        :meth:`scx_ref.reference.ReferenceModel.generate`'s (another exception gets them in a note)."""
        n_new = check_int(n_new, "n_new", 0)
        return greedy_tokens(
            lambda: self.b.argmax_last(self.prefill(ids, last_only=True)),
            lambda tok: self.b.argmax_last(self.decode(tok)),
            n_new,
        )

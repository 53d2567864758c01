"""An *active* server (DESIGN §5.5): what a server that returns crafted values learns, and the tools the
tests use to tamper with replies.

:class:`MarkerServer` is the attack issue 12 measured. In block 1's QKV reply it replaces the value
columns by markers — value ``BIG·(j·kv_dim + c + 1)`` at row j, column c — far larger than any noise. A
client that does not verify decodes them with its secret keys (π₁ and the decoys, the noise correction
α₁·W_v, the head permutation P₁) and sends them back in the attention stage, in true row order. Each
received value names its marker's row and column, so the server reads π₁ on the real rows (and so which
rows were decoys), P₁ and, from what is left over, α₁·W_v; subtracting that from its honest value rows
gives x̂·W_v of every prompt row, which it matches against the vocabulary: the prompt, exactly, at levels
``permute`` and ``paper``. It then answers the attention stage honestly (it can rebuild the true values),
so the prefill's logits equal plaintext and nothing looks wrong. A verifying client
(:mod:`scx_ref.protocol.verify`) rejects the QKV reply before anything derived from it is sent.

:class:`TamperingTransport` applies any change to chosen replies (scaling, offsets, NaN, dtypes, shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ..backends.base import A, Backend
from ..errors import ConfigError, ProtocolError
from ..protocol.cost import CostMeter
from ..protocol.messages import Reply, Request
from ..protocol.server import Server
from ..protocol.transport import Transport

__all__ = ["MarkerServer", "TamperingTransport"]

Array = npt.NDArray[Any]


class TamperingTransport:
    """A transport that hands every reply to ``tamper(request, reply)`` and returns what it returns
    (the identity for replies it leaves alone); ``sent`` counts the messages the client sent. ConfigError
    unless ``inner`` is a transport (``send`` and ``meter``) and ``tamper`` is callable."""

    def __init__(self, inner: Transport, tamper: Callable[[Request, Reply], Reply]) -> None:
        if not callable(getattr(inner, "send", None)) or not hasattr(inner, "meter"):
            raise ConfigError(f"inner must be a transport (send, meter), got {type(inner).__name__}")
        if not callable(tamper):
            raise ConfigError(f"tamper must be callable, got {type(tamper).__name__}")
        self.inner = inner
        self.tamper = tamper
        self.sent = 0
        self.meter: CostMeter = inner.meter

    def send(self, request: Request) -> Reply:
        """Forward ``request``; return the (possibly tampered) reply."""
        self.sent += 1
        return self.tamper(request, self.inner.send(request))


class MarkerServer(Server[A]):
    """A server that plants markers in block 1's QKV reply and reads the client's keys and the prompt
    from the attention stage that follows (see the module docstring). ``recovered`` is the prompt it
    found (None until block 1's attention stage arrives); ``pi`` the real rows' positions in the QKV
    message, ``feature`` the head permutation's flat feature index."""

    BIG = float(1 << 10)  # ≫ the block-1 noise α·W_v at β = 5, small enough to keep float64 precision

    def __init__(self, backend: Backend[A], **kw: Any) -> None:
        super().__init__(backend, **kw)
        self.honest_v: Array | None = None
        self.markers: Array | None = None
        self.recovered: list[int] | None = None
        self.pi: Array | None = None
        self.feature: Array | None = None
        c = backend.config
        # the vocabulary's block-1 value rows: x̂·W_v for x̂ the normalized embedding of each token
        table = backend.norm(backend.embed(np.arange(c.vocab_size)), "attn", 0)
        z = backend.to_numpy(backend.project(table, "wqkv", 0))
        bias = backend.to_numpy(backend.project(backend.from_numpy(np.zeros((1, c.hidden_size))), "wqkv", 0))
        self._vocab_v = np.asarray(z - bias, dtype=np.float64)[:, c.q_dim + c.kv_dim :]

    def _qkv(self, s: Any, req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        arrays, commit = super()._qkv(s, req)
        if req.layer != 0:
            return arrays, commit
        b, c = self.b, self.c
        z = np.array(b.to_numpy(arrays["z"]), dtype=np.float64)
        lo = c.q_dim + c.kv_dim
        self.honest_v = z[:, lo:].copy()
        rows = z.shape[0]
        self.markers = self.BIG * (np.arange(rows)[:, None] * c.kv_dim + np.arange(c.kv_dim)[None, :] + 1)
        z[:, lo:] = self.markers
        return {"z": b.from_numpy(z)}, commit

    def _attn(self, s: Any, req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        if req.layer != 0 or self.markers is None or self.honest_v is None:
            return super()._attn(s, req)
        b, c = self.b, self.c
        n = s.n
        v_seen = np.asarray(b.to_numpy(b.check(req.arrays["v"], "attn.v", (n, c.n_kv_heads, c.head_dim))))
        flat = v_seen.reshape(n, c.kv_dim).astype(np.float64)
        code = np.rint(flat / self.BIG).astype(np.int64) - 1  # j·kv_dim + column, noise rounded away
        rows, cols = code // c.kv_dim, code % c.kv_dim
        if not (np.all(rows == rows[:, :1]) and np.all(cols == cols[:1, :])):
            raise ProtocolError("markers did not come back intact")
        self.pi, self.feature = rows[:, 0], cols[0]
        noise = self.markers[self.pi][:, self.feature] - flat  # α₁·W_v at (π row, P column), in P order
        true_v = self.honest_v[self.pi][:, self.feature] - noise  # x̂·W_v (+ b_v), features in P order
        inv = np.argsort(self.feature)
        bias_v = np.asarray(
            b.to_numpy(b.project(b.from_numpy(np.zeros((1, c.hidden_size))), "wqkv", 0)), dtype=np.float64
        )[0, c.q_dim + c.kv_dim :]
        rows_v = true_v[:, inv] - bias_v
        dist = ((rows_v[:, None, :] - self._vocab_v[None, :, :]) ** 2).sum(-1)
        self.recovered = [int(t) for t in dist.argmin(axis=1)]
        # answer honestly: the true value rows, in the received (permuted) feature order
        honest = replace(req, arrays={**req.arrays, "v": b.from_numpy(true_v.reshape(v_seen.shape))})
        return super()._attn(s, honest)

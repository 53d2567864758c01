"""The untrusted server (DESIGN §5): holds the plaintext weights, computes every heavy stage on
encoded data, and stores the encoded KV cache.

Each message is validated completely — session, sequence number, stage order, layer role, array
shapes, dtypes and finiteness — *before* any state changes, and the state changes of a message are
applied together at the end, so a rejected message leaves the server's caches exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic

import numpy as np

from .._checks import check_permutation
from ..backends.base import A, Backend, split_qkv
from ..errors import ProtocolError, SCXError, SessionError
from ..forward import block
from ..stages import PREFILL_BLOCK_STAGES, Phase, Stage
from ..transforms import decode_rows, unblind
from .config import guard_blocks
from .cost import CostMeter
from .keyring import commitment
from .messages import Reply, Request

__all__ = ["Server"]


@dataclass
class _Session(Generic[A]):
    n: int
    r1: int
    r2: int
    r_lock: int
    first: range
    middle: range
    last: range
    max_length: int
    seq: int = 1
    layer: int = -1  # prefill: the block whose stages are running
    ffn_done: int = -1  # prefill: last block whose FFN stage ran
    head_done: bool = False
    step: int = -1  # generation step in progress
    gen_done: set[tuple[Stage, int]] = field(default_factory=set)  # cache-extending stages run this step
    raw: dict[int, tuple[A, A]] = field(default_factory=dict)
    commits: dict[int, str] = field(default_factory=dict)
    valid: dict[int, tuple[A, A]] = field(default_factory=dict)
    locked: dict[int, A] = field(default_factory=dict)
    meter: CostMeter = field(default_factory=CostMeter)


class Server(Generic[A]):
    """The cloud side of SCX. ``handle`` is its only entry point."""

    def __init__(self, backend: Backend[A]) -> None:
        self.b = backend
        self.c = backend.config
        self.sessions: dict[str, _Session[A]] = {}

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, req: Request) -> Reply:
        """Validate ``req``, compute the stage, commit the session's state changes, reply."""
        try:
            stage = Stage(req.stage)
        except ValueError:
            raise ProtocolError(f"unknown stage {req.stage!r}") from None
        if stage is not req.stage:
            req = replace(req, stage=stage)
        if req.stage is Stage.OPEN:
            return self._open(req)
        s = self.sessions.get(req.session)
        if s is None:
            raise SessionError(f"unknown session {req.session[:12]}…: open it first")
        if req.seq != s.seq:
            raise ProtocolError(f"message out of order: expected seq {s.seq}, got {req.seq}")
        handler = self._handlers().get(req.stage)
        if handler is None:
            raise ProtocolError(f"unknown stage {req.stage!r}")
        self._check_order(s, req)
        arrays, commit = handler(s, req)
        commit()
        s.seq += 1
        return Reply(req.session, req.stage, req.layer, req.step, req.seq, arrays)

    def cost(self, session: str) -> CostMeter:
        """The server-side flop meter of ``session``."""
        return self.sessions[session].meter

    def _handlers(
        self,
    ) -> dict[Stage, Callable[[_Session[A], Request], tuple[dict[str, A], Callable[[], None]]]]:
        return {
            Stage.QKV: self._qkv,
            Stage.ATTN: self._attn,
            Stage.O: self._o,
            Stage.FFN: self._ffn,
            Stage.FFN_DOWN: self._ffn_down,
            Stage.ROUTER: self._router,
            Stage.HEAD: self._head,
            Stage.LOCK: self._lock,
            Stage.SHARE: self._share,
            Stage.GEN_QKV: self._gen_qkv,
            Stage.GEN_ATTN: self._gen_attn,
            Stage.GEN_FFN: self._gen_ffn,
            Stage.GEN_FFN_UP: self._gen_ffn_up,
            Stage.GEN_FFN_DOWN: self._gen_ffn_down,
            Stage.GEN_ROUTER: self._gen_router,
            Stage.GEN_MID: self._gen_mid,
            Stage.GEN_LAST: self._gen_last,
        }

    def _open(self, req: Request) -> Reply:
        if req.session in self.sessions:
            raise SessionError("this nonce already opened a session: a nonce must never be reused")
        if req.seq != 0:
            raise ProtocolError(f"open must be message 0, got seq {req.seq}")
        m = req.meta
        try:
            n, r1, r2, r_lock = int(m["n"]), int(m["r1"]), int(m["r2"]), int(m["r_lock"])
            l_s, l_e, max_length = int(m["l_s"]), int(m["l_e"]), int(m["max_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"open message lacks a valid field: {exc}") from exc
        if (
            n < 1
            or min(r1, r2, r_lock) < 0
            or min(l_s, l_e) < 1
            or not n <= max_length <= self.c.max_positions
        ):
            raise ProtocolError(f"invalid session parameters {m}")
        self.sessions[req.session] = _Session(
            n, r1, r2, r_lock, *guard_blocks(self.c.n_layers, l_s, l_e), max_length
        )
        return Reply(req.session, Stage.OPEN, -1, -1, 0, {})

    def _check_order(self, s: _Session[A], req: Request) -> None:
        L, stage, layer = self.c.n_layers, req.stage, req.layer
        if stage in PREFILL_BLOCK_STAGES or stage is Stage.HEAD:
            if s.head_done:
                raise ProtocolError(f"prefill stage {stage.value!r} after the prefill finished")
            if stage is Stage.HEAD:
                if s.ffn_done != L - 1:
                    raise ProtocolError("head stage before every block's FFN stage")
                return
            if not 0 <= layer < L:
                raise ProtocolError(f"layer {layer} out of range 0..{L - 1}")
            if stage is Stage.QKV:
                if layer != s.layer + 1 or s.ffn_done != layer - 1:
                    raise ProtocolError(f"qkv stage of block {layer} out of order")
            elif layer != s.layer:
                raise ProtocolError(f"{stage.value} stage for block {layer} while block {s.layer} is running")
            return
        if not s.head_done:
            raise ProtocolError(f"stage {stage.value!r} before the prefill finished")
        if stage is Stage.LOCK and layer not in s.last:
            raise ProtocolError(f"block {layer} is not a last guard block; it has no locked cache")
        if stage is Stage.SHARE and layer not in s.middle:
            raise ProtocolError(
                f"key for block {layer} refused: only middle blocks {list(s.middle)} are shared"
            )
        if stage.phase is Phase.GENERATE:
            if req.step not in (s.step, s.step + 1) or req.step < 0:
                raise ProtocolError(f"generation step {req.step} out of order (at step {s.step})")
            if s.n + req.step >= s.max_length:
                raise ProtocolError(
                    f"position {s.n + req.step} is past the session's max length {s.max_length}"
                )
            if stage in (Stage.GEN_QKV, Stage.GEN_ATTN) and layer not in s.first:
                raise ProtocolError(f"{stage.value} for block {layer}, which is not a first guard block")
            if stage is Stage.GEN_LAST and layer not in s.last:
                raise ProtocolError(f"gen_last for block {layer}, which is not a last guard block")
            if stage is Stage.GEN_MID and set(s.middle) - set(s.valid):
                raise ProtocolError("gen_mid before every middle block's key was shared")
            if stage is Stage.GEN_LAST and layer not in s.locked:
                raise ProtocolError(f"gen_last for block {layer} before its locked cache was stored")
            done = (stage, -1 if stage is Stage.GEN_MID else layer)  # gen_mid runs every middle block
            if stage in (Stage.GEN_MID, Stage.GEN_LAST) and req.step == s.step and done in s.gen_done:
                raise ProtocolError(
                    f"{stage.value} for block {layer} already ran at step {req.step} (a replay)"
                )

    def _arr(self, req: Request, name: str, shape: tuple[int, ...]) -> A:
        if name not in req.arrays:
            raise ProtocolError(f"{req.stage.value} message lacks array {name!r}")
        return self.b.check(req.arrays[name], f"{req.stage.value}.{name}", shape)

    def _experts(self, req: Request) -> np.ndarray | None:
        if not self.c.is_moe:
            return None
        try:
            e = np.asarray(req.meta["experts"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"{req.stage.value} on an MoE layer needs meta['experts']") from exc
        if e.ndim != 1 or e.size == 0 or e.min() < 0 or e.max() >= self.c.n_experts:
            raise ProtocolError(f"invalid experts {e.tolist()}")
        return e

    @staticmethod
    def _nothing() -> None:
        return None

    # -- prefill stages ------------------------------------------------------------------------
    def _qkv(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows, layer = self.c, s.n + s.r1, req.layer
        x = self._arr(req, "x", (rows, c.hidden_size))
        commit_hex = req.meta.get("commit")
        if not isinstance(commit_hex, str) or len(commit_hex) != 64:
            raise ProtocolError("qkv message lacks the key commitment")
        if not req.meta.get("normalized", False):
            x = self.b.norm(x, "attn", layer)
        z = self.b.project(x, "wqkv", layer)
        s.meter.matmul(Stage.QKV, rows, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
        zk = self.b.narrow(z, 1, c.q_dim, c.q_dim + c.kv_dim)
        zv = self.b.narrow(z, 1, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim)

        def commit() -> None:
            s.layer = layer
            s.raw[layer] = (zk, zv)
            s.commits[layer] = commit_hex

        return {"z": z}, commit

    def _attn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, n = self.c, s.n
        q = self._arr(req, "q", (n, c.n_heads, c.head_dim))
        k = self._arr(req, "k", (n, c.n_kv_heads, c.head_dim))
        v = self._arr(req, "v", (n, c.n_kv_heads, c.head_dim))
        pos = np.arange(n)
        s.meter.attention(Stage.ATTN, c.n_heads, n, n, c.head_dim, "server")
        return {"o": self.b.attention(q, k, v, pos, pos)}, self._nothing

    def _o(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows = self.c, s.n + s.r2
        x = self._arr(req, "x", (rows, c.q_dim))
        s.meter.matmul(Stage.O, rows, c.q_dim, c.hidden_size, "server")
        return {"y": self.b.project(x, "wo", req.layer)}, self._nothing

    def _mlp_flops(self, meter: CostMeter, stage: Stage, rows: int, experts: int) -> None:
        c = self.c
        meter.matmul(stage, rows * experts, c.hidden_size, 3 * c.intermediate_size, "server")
        if c.is_moe:  # the router is a matrix product too
            meter.matmul(stage, rows, c.hidden_size, c.n_experts, "server")

    def _ffn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows, layer = self.c, s.n + s.r1, req.layer
        if req.meta.get("normalized", False):  # level blind: blinded gate/up input
            experts = self._experts(req)
            x = self._arr(req, "x", (rows, c.hidden_size))
            width = 2 * c.intermediate_size * (1 if experts is None else len(experts))
            s.meter.matmul(Stage.FFN, rows, c.hidden_size, width, "server")
            return {"y": self.b.project(x, "w_gate_up", layer, experts)}, self._nothing
        x = self._arr(req, "x", (rows, c.hidden_size))
        self._mlp_flops(s.meter, Stage.FFN, rows, c.top_k if c.is_moe else 1)
        y = self.b.mlp(self.b.norm(x, "mlp", layer), layer)

        def commit() -> None:
            s.ffn_done = layer

        return {"y": y}, commit

    def _ffn_down(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows, layer = self.c, s.n + s.r1, req.layer
        experts = self._experts(req)
        width = c.intermediate_size * (1 if experts is None else len(experts))
        m = self._arr(req, "m", (rows, width))
        s.meter.matmul(req.stage, rows, width, c.hidden_size, "server")
        y = self.b.project(m, "w_down", layer, experts)

        def commit() -> None:
            if req.meta.get("last", True):
                s.ffn_done = layer

        return {"y": y}, commit

    def _router(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows = self.c, s.n + s.r1
        x = self._arr(req, "x", (rows, c.hidden_size))
        s.meter.matmul(Stage.ROUTER, rows, c.hidden_size, c.n_experts, "server")
        return {"y": self.b.project(x, "router", req.layer)}, self._nothing

    def _head(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows = self.c, s.n + s.r1
        x = self._arr(req, "x", (rows, c.hidden_size))
        if not req.meta.get("normalized", False):
            x = self.b.norm(x, "final")
        s.meter.matmul(Stage.HEAD, rows, c.hidden_size, c.vocab_size, "server")

        def commit() -> None:
            s.head_done = True

        return {"logits": self.b.project(x, "lm_head")}, commit

    def _lock(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        k = self._arr(req, "k", (s.n + s.r_lock, self.c.kv_dim))
        if req.layer in s.locked:
            raise ProtocolError(f"block {req.layer} already has a locked cache")

        def commit() -> None:
            s.locked[req.layer] = k

        return {}, commit

    def _share(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, n, layer = self.c, s.n, req.layer
        if layer in s.valid:
            raise ProtocolError(f"block {layer}'s key was already shared")
        try:
            perm: np.ndarray[Any, np.dtype[np.int64]] = check_permutation(
                req.arrays.get("perm"), n + s.r1, "shared permutation"
            ).astype(np.int64)
            salt = bytes.fromhex(str(req.meta["salt"]))
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"share message for block {layer} is malformed: {exc}") from exc
        except SCXError as exc:
            raise ProtocolError(f"share message for block {layer}: {exc}") from exc
        if commitment(salt, layer, perm) != s.commits.get(layer):
            raise SessionError(
                f"the key offered for block {layer} does not match that block's commitment "
                "(a key for the wrong layer, or from another session)"
            )
        b = self.b
        zk, zv = s.raw[layer]
        if "alpha" in req.arrays:  # a noised QKV stage: remove α W from the raw cache (T5 decode)
            alpha = self._arr(req, "alpha", (n + s.r1, c.hidden_size))
            corr = b.correction(alpha, "wqkv", layer)
            s.meter.matmul(Stage.SHARE, n + s.r1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
            zk = unblind(zk, b.narrow(corr, 1, c.q_dim, c.q_dim + c.kv_dim), b)
            zv = unblind(zv, b.narrow(corr, 1, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim), b)
        shape = (n, c.n_kv_heads, c.head_dim)
        k = b.rope(b.reshape(decode_rows(zk, perm, n, b), shape), np.arange(n))  # T1 + T2 decode
        v = b.reshape(decode_rows(zv, perm, n, b), shape)

        def commit() -> None:
            s.valid[layer] = (k, v)
            del s.raw[layer]  # the valid cache replaces the encoded one

        return {}, commit

    # -- generation stages -----------------------------------------------------------------------
    def _gen_commit(
        self, s: _Session[A], step: int, extra: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        def commit() -> None:
            if step != s.step:
                s.gen_done = set()
            s.step = step
            if extra:
                extra()

        return commit

    def _gen_qkv(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        s.meter.matmul(Stage.GEN_QKV, 1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
        return {"z": self.b.project(x, "wqkv", req.layer)}, self._gen_commit(s, req.step)

    def _gen_attn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, m = self.c, s.n + req.step + 1
        q = self._arr(req, "q", (1, c.n_heads, c.head_dim))
        k = self._arr(req, "k", (m, c.n_kv_heads, c.head_dim))
        v = self._arr(req, "v", (m, c.n_kv_heads, c.head_dim))
        s.meter.attention(Stage.GEN_ATTN, c.n_heads, 1, m, c.head_dim, "server")
        o = self.b.attention(q, k, v, np.array([m - 1]), None)
        return {"o": o}, self._gen_commit(s, req.step)

    def _gen_ffn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        self._mlp_flops(s.meter, Stage.GEN_FFN, 1, c.top_k if c.is_moe else 1)
        return {"y": self.b.mlp(self.b.norm(x, "mlp", req.layer), req.layer)}, self._gen_commit(s, req.step)

    def _gen_ffn_up(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        experts = self._experts(req)
        x = self._arr(req, "x", (1, c.hidden_size))
        width = 2 * c.intermediate_size * (1 if experts is None else len(experts))
        s.meter.matmul(req.stage, 1, c.hidden_size, width, "server")
        return {"y": self.b.project(x, "w_gate_up", req.layer, experts)}, self._gen_commit(s, req.step)

    def _gen_ffn_down(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        experts = self._experts(req)
        width = c.intermediate_size * (1 if experts is None else len(experts))
        m = self._arr(req, "m", (1, width))
        s.meter.matmul(req.stage, 1, width, c.hidden_size, "server")
        return {"y": self.b.project(m, "w_down", req.layer, experts)}, self._gen_commit(s, req.step)

    def _gen_router(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        s.meter.matmul(Stage.GEN_ROUTER, 1, c.hidden_size, c.n_experts, "server")
        return {"y": self.b.project(x, "router", req.layer)}, self._gen_commit(s, req.step)

    def _gen_mid(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        """Run every middle block alone on the server's valid caches (DESIGN §5.3): plaintext blocks
        (:func:`scx_ref.forward.block`) on the row entering them."""
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        pos = np.array([s.n + req.step])
        new: dict[int, tuple[A, A]] = {}
        for layer in s.middle:
            x, new[layer] = block(self.b, x, layer, pos, s.valid[layer])
            m = self.b.nrows(new[layer][0])
            s.meter.matmul(Stage.GEN_MID, 1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
            s.meter.attention(Stage.GEN_MID, c.n_heads, 1, m, c.head_dim, "server")
            s.meter.matmul(Stage.GEN_MID, 1, c.q_dim, c.hidden_size, "server")
            self._mlp_flops(s.meter, Stage.GEN_MID, 1, c.top_k if c.is_moe else 1)

        def extra() -> None:
            s.valid.update(new)
            s.gen_done.add((Stage.GEN_MID, -1))

        return {"x": x}, self._gen_commit(s, req.step, extra)

    def _gen_last(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        """Scores of the new query against the locked cache (plus the new key) and the new value."""
        b, c, layer = self.b, self.c, req.layer
        x = self._arr(req, "x", (1, c.hidden_size))
        pos = np.array([s.n + req.step])
        z = b.project(b.norm(x, "attn", layer), "wqkv", layer)
        q, k, v = split_qkv(b, z)
        q, k = b.rope(q, pos), b.rope(k, pos)
        locked = b.concat_rows([s.locked[layer], b.reshape(k, (1, c.kv_dim))])
        m = b.nrows(locked)
        scores = b.scores(q, b.reshape(locked, (m, c.n_kv_heads, c.head_dim)))
        s.meter.matmul(Stage.GEN_LAST, 1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
        s.meter.matmul(Stage.GEN_LAST, c.n_heads, c.head_dim, m, "server")

        def extra() -> None:
            s.locked[layer] = locked
            s.gen_done.add((Stage.GEN_LAST, layer))

        return {"scores": scores, "v": v}, self._gen_commit(s, req.step, extra)

    def sessions_snapshot(self, session: str) -> dict[str, Any]:
        """A deep numpy copy of a session's caches (for tests that check nothing changed)."""
        s = self.sessions[session]
        to = self.b.to_numpy
        return {
            "seq": s.seq,
            "layer": s.layer,
            "ffn_done": s.ffn_done,
            "head_done": s.head_done,
            "step": s.step,
            "gen_done": sorted(s.gen_done),
            "raw": {k: (to(a), to(v)) for k, (a, v) in s.raw.items()},
            "valid": {k: (to(a), to(v)) for k, (a, v) in s.valid.items()},
            "locked": {k: to(a) for k, a in s.locked.items()},
            "commits": dict(s.commits),
        }

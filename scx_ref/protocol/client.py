"""The trusted client (DESIGN §5): holds the key schedule, the embeddings, norms and RoPE, encodes
every message and decodes every reply, so that the decoded result is exactly plaintext inference.

Every encoding step is a transform of :mod:`scx_ref.transforms` run on the client's backend — T1+T2
(:func:`~scx_ref.transforms.with_decoys`, :func:`~scx_ref.transforms.permute_rows`,
:func:`~scx_ref.transforms.decode_rows`, :func:`~scx_ref.transforms.unpermute_rows`), T3
(:func:`~scx_ref.transforms.head_permute` / :func:`~scx_ref.transforms.head_unpermute`), T4
(:func:`~scx_ref.transforms.encode_rows` of the locked cache, :func:`~scx_ref.transforms.unlock_scores`),
T5 (:func:`~scx_ref.transforms.blind` / :func:`~scx_ref.transforms.unblind`) and T6 (Laplace noise drawn
by :class:`~scx_ref.protocol.keyring.RequestKeys`). Which messages are noised, and with which β and key,
is the :class:`~scx_ref.protocol.plan.ReleasePlan`'s decision, never the client's own.

Prefill (§5.1), key sharing (§5.2) and generation (§5.3) are methods; each message goes through a
:class:`~scx_ref.protocol.transport.Transport`. The client keeps only what the protocol says it keeps:
the first guard blocks' valid caches and the last guard blocks' values. Every key is re-derived from
the schedule when needed (:mod:`~scx_ref.protocol.keyring`), which is what makes it stateless.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Generic

import numpy as np
import numpy.typing as npt

from ..backends.base import A, Backend, IndexArray, WeightName, split_qkv
from ..errors import ProtocolError, SessionError
from ..keys import KeySchedule
from ..stages import Stage
from ..transforms import (
    blind,
    decode_rows,
    decode_rows_numpy,
    encode_rows,
    head_permute,
    head_unpermute,
    permute_rows,
    unblind,
    unlock_scores,
    unpermute_rows,
    with_decoys,
)
from .config import SCXConfig
from .cost import CostMeter, CostReport
from .decoys import CalibrationPool, DecoyPolicy, GaussianDecoys, default_public_tokens
from .keyring import RequestKeys, commitment
from .messages import Reply, Request
from .plan import ReleasePlan
from .transport import Transport

__all__ = ["Client"]


@dataclass
class _State(Generic[A]):
    """What the client keeps between calls for one session."""

    keys: RequestKeys
    n: int
    seq: int
    step: int = 0
    shared: bool = False
    guard_k: dict[int, A] = field(default_factory=dict)  # first guard blocks: rows × H_kv × d_h (RoPE'd)
    guard_v: dict[int, A] = field(default_factory=dict)  # first and last guard blocks
    failed: bool = False


class Client(Generic[A]):
    """The SCX client. One prefill opens a session (one nonce); decode/generate continue it."""

    def __init__(
        self,
        backend: Backend[A],
        keys: KeySchedule,
        config: SCXConfig | None = None,
        decoys: DecoyPolicy | None = None,
        public_tokens: IndexArray | None = None,
    ) -> None:
        self.b = backend
        self.c = backend.config
        self.cfg = config or SCXConfig()
        self.plan = ReleasePlan.of(self.cfg, self.c)
        self.max_length = self.c.max_positions if self.cfg.max_length is None else self.cfg.max_length
        if self.max_length > self.c.max_positions:
            raise ProtocolError(
                f"max_length {self.max_length} exceeds the model's max_positions {self.c.max_positions}"
            )
        self._master_keys = keys
        self._next_nonce: bytes | None = keys.nonce
        self._used: dict[bytes, str] = {}
        self.meter = CostMeter()
        self.state: _State[A] | None = None
        self.first, self.middle, self.last = self.cfg.blocks(self.c.n_layers)
        if decoys is not None:
            self.decoys: DecoyPolicy = decoys
        elif self.cfg.decoys == "gaussian":
            self.decoys = GaussianDecoys()
        else:
            tokens = default_public_tokens(self.c.vocab_size) if public_tokens is None else public_tokens
            self.decoys = CalibrationPool.from_tokens(backend, tokens)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def session(self) -> str:
        if self.state is None:
            raise ProtocolError("no session: call prefill first")
        return self.state.keys.session_id

    def _keys(self) -> RequestKeys:
        assert self.state is not None
        return self.state.keys

    def _send(
        self, link: Transport, stage: Stage, layer: int, step: int, arrays: dict[str, Any], **meta: Any
    ) -> Reply:
        st = self.state
        assert st is not None
        req = Request(st.keys.session_id, stage, layer, step, st.seq, arrays, meta)
        try:
            reply = link.send(req)
        except Exception:
            st.failed = True
            raise
        if reply.session != req.session or reply.seq != req.seq or reply.stage != stage:
            st.failed = True
            raise SessionError("reply does not match the request (another session, or out of order)")
        st.seq += 1
        return reply

    def _decoys(self, stage: Stage, layer: int, count: int, real: A) -> A:
        """``count`` decoy rows for (stage, layer), in the backend."""
        width = self.b.shape(real)[1]
        if self.decoys.needs_real and count:
            real_np = np.asarray(self.b.to_numpy(real), dtype=np.float64)
        else:
            real_np = np.zeros((0, width))
        rows = self.decoys.draw(stage, layer, count, real_np, self._keys().decoy_stream(stage, layer))
        return self.b.from_numpy(np.asarray(rows, dtype=np.float64).reshape(count, width))

    def _linear(
        self,
        link: Transport,
        stage: Stage,
        layer: int,
        step: int,
        x: A,
        which: WeightName,
        *,
        reply_key: str = "y",
        arr_key: str = "x",
        expert: int | None = None,
        **meta: Any,
    ) -> A:
        """A linear stage of the server on rows ``x``: blinded (T5) when the release plan noises this
        message — send x + η, return the reply − ηW = xW (+ b) — else x itself."""
        b = self.b
        experts = None if expert is None else np.array([expert], dtype=np.int64)
        if experts is not None:
            meta["experts"] = experts.tolist()
        release = self.plan.find(stage, layer, expert)
        if release is None:
            y: A = self._send(link, stage, layer, step, {arr_key: x}, **meta).arrays[reply_key]
            return y
        rows, width = b.shape(x)
        eta = b.from_numpy(self._keys().noise(release, None if step < 0 else step, rows, width))
        self.meter.elementwise(stage, rows * width)
        sent = blind(x, eta, b)
        y = self._send(link, stage, layer, step, {arr_key: sent}, **meta).arrays[reply_key]
        self.meter.matmul(stage, rows, width, b.shape(y)[1], "client")
        return unblind(y, b.correction(eta, which, layer, experts), b)

    def _blinded(self, stage: Stage, layer: int) -> bool:
        """Whether the plan noises ``stage`` of ``layer`` (then the client applies the norm before it).
        For the MLP's first stage of an MoE layer the router's release decides (experts are per message)."""
        if self.c.is_moe and stage in (Stage.FFN, Stage.GEN_FFN_UP):
            stage = Stage.ROUTER if stage is Stage.FFN else Stage.GEN_ROUTER
        return self.plan.find(stage, layer) is not None

    # -- prefill (§5.1) --------------------------------------------------------------------------
    def prefill(self, ids: Any, link: Transport, nonce: bytes | None = None) -> npt.NDArray[Any]:
        """Encoded prefill of prompt ``ids``; returns its logits (n × V, numpy), equal to plaintext.

        Opens a new session under a fresh nonce (or ``nonce``). Reusing a nonce for a different prompt
        raises SessionError: the same keys would encode two prompts.
        """
        b, c, cfg = self.b, self.c, self.cfg
        ids_arr = np.asarray(ids)
        if ids_arr.size == 0:
            raise ProtocolError("the prompt must have at least one token")
        x0 = b.embed(ids_arr)  # validates the ids against the vocabulary
        n = int(ids_arr.shape[0])
        if n > self.max_length:
            raise ProtocolError(f"prompt of {n} tokens is longer than max_length {self.max_length}")
        if nonce is None:
            nonce = self._next_nonce or KeySchedule.new_nonce()
        self._next_nonce = None
        digest = hashlib.sha256(np.ascontiguousarray(ids_arr, dtype="<i8").tobytes()).hexdigest()
        if self._used.get(nonce, digest) != digest:
            raise SessionError("nonce reused for a different prompt: every prompt needs a fresh nonce")
        self._used[nonce] = digest
        self.meter = CostMeter()
        st: _State[A] = _State(RequestKeys(self._master_keys.for_nonce(nonce), c), n, seq=0)
        self.state = st
        self._send(
            link,
            Stage.OPEN,
            -1,
            -1,
            {},
            n=n,
            r1=cfg.r1,
            r2=cfg.r2,
            r_lock=cfg.lock_decoys,
            l_s=cfg.l_s,
            l_e=cfg.l_e,
            max_length=self.max_length,
            level=cfg.level,
        )
        pos = np.arange(n)
        h = x0
        dec = self._decoys(Stage.QKV, 0, cfg.r1, h)  # carried decoy rows of the π_i stages
        keys_kept: dict[int, A] = {}
        for i in range(c.n_layers):
            h, dec, k_rope, v = self._prefill_block(link, i, h, dec, pos)
            if i in self.first:
                st.guard_k[i], st.guard_v[i] = k_rope, v
            elif i in self.last:
                st.guard_v[i] = v
                keys_kept[i] = k_rope
        logits = self._prefill_head(link, h, dec)
        for i, k_rope in keys_kept.items():  # locked key caches of the last guard blocks (T4 + T2)
            rho = st.keys.lock_perm(i, n + cfg.lock_decoys)
            k_flat = b.reshape(k_rope, (n, c.kv_dim))
            locked = encode_rows(k_flat, self._decoys(Stage.LOCK, i, cfg.lock_decoys, k_flat), rho, b)
            self._send(link, Stage.LOCK, i, -1, {"k": locked})
        return logits

    def _prefill_block(self, link: Transport, i: int, h: A, dec: A, pos: IndexArray) -> tuple[A, A, A, A]:
        b, c, cfg, keys = self.b, self.c, self.cfg, self._keys()
        n = len(pos)
        # 1. QKV stage: E = π_i(X ⊕ R) (+ α_i, with the client's norm)
        pi = keys.token_perm(i, n + cfg.r1)
        rows = with_decoys(h, dec, b)
        normalized = self._blinded(Stage.QKV, i)
        if normalized:
            rows = b.norm(rows, "attn", i)
            self.meter.elementwise(Stage.QKV, (n + cfg.r1) * c.hidden_size)
        z = self._linear(
            link,
            Stage.QKV,
            i,
            -1,
            permute_rows(rows, pi, b),
            "wqkv",
            reply_key="z",
            normalized=normalized,
            commit=commitment(keys.commit_salt(i), i, pi),
        )
        q, k, v = split_qkv(b, decode_rows(z, pi, n, b))
        q, k = b.rope(q, pos), b.rope(k, pos)
        self.meter.elementwise(Stage.QKV, 3 * n * (c.q_dim + c.kv_dim))
        # 2. attention stage: Q P_i, K P_i, V P_i in true row order
        hp, g = keys.head_perm(i), c.group_size
        sent = {
            "q": head_permute(q, hp, g, b),
            "k": head_permute(k, hp, 1, b),
            "v": head_permute(v, hp, 1, b),
        }
        o = self._send(link, Stage.ATTN, i, -1, sent).arrays["o"]
        o = b.reshape(head_unpermute(o, hp, g, b), (n, c.q_dim))
        # 3. O stage: π′_i(O ⊕ R′)
        pi_o = keys.o_perm(i, n + cfg.r2)
        rows = encode_rows(o, self._decoys(Stage.O, i, cfg.r2, o), pi_o, b)
        y = self._linear(link, Stage.O, i, -1, rows, "wo")
        h = b.add(h, decode_rows(y, pi_o, n, b))
        # 4. FFN stage under π_{i+1}; its decoys ride on into block i+1's QKV stage
        pi_next = keys.token_perm(i + 1, n + cfg.r1)
        rows = with_decoys(h, self._decoys(Stage.FFN, i, cfg.r1, h), b)
        if self._blinded(Stage.FFN, i):
            xn = permute_rows(b.norm(rows, "mlp", i), pi_next, b)
            y = self._blinded_mlp(link, i, -1, xn, Stage.FFN, Stage.FFN_DOWN, Stage.ROUTER)
        else:
            y = self._send(link, Stage.FFN, i, -1, {"x": permute_rows(rows, pi_next, b)}).arrays["y"]
        self.meter.elementwise(Stage.FFN, 2 * (n + cfg.r1) * c.hidden_size)
        out = b.add(rows, unpermute_rows(y, pi_next, b))
        return b.narrow(out, 0, 0, n), b.narrow(out, 0, n, n + cfg.r1), k, v

    def _prefill_head(self, link: Transport, h: A, dec: A) -> npt.NDArray[Any]:
        b, cfg, n, L = self.b, self.cfg, self.b.nrows(h), self.c.n_layers
        pi = self._keys().token_perm(L, n + cfg.r1)
        rows = with_decoys(h, dec, b)
        normalized = self._blinded(Stage.HEAD, L)
        if normalized:
            rows = b.norm(rows, "final")
        logits = self._linear(
            link,
            Stage.HEAD,
            L,
            -1,
            permute_rows(rows, pi, b),
            "lm_head",
            reply_key="logits",
            normalized=normalized,
        )
        return decode_rows_numpy(logits, pi, n, b)  # T1 + T2 decode straight to numpy

    def _blinded_mlp(
        self, link: Transport, i: int, step: int, xn: A, up: Stage, down: Stage, router: Stage
    ) -> A:
        """The MLP of normalized rows ``xn`` as the server's linear maps with the client's SwiGLU between
        them (every map blinded as the plan says: T5); exact.

        Dense: gate/up → client SwiGLU → down. MoE: the router → client softmax/top-k → every expert's
        gate/up and down, so the server does not learn the routing; rows not routed to an expert get
        weight 0.
        """
        b, c = self.b, self.c
        rows, f = b.nrows(xn), c.intermediate_size
        if not c.is_moe:
            gu = self._linear(link, up, i, step, xn, "w_gate_up", normalized=True)
            m = b.swiglu_act(gu)
            self.meter.elementwise(up, rows * f)
            return self._linear(link, down, i, step, m, "w_down", arr_key="m", last=True)
        logits = np.asarray(b.to_numpy(self._linear(link, router, i, step, xn, "router")), dtype=np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : c.top_k]
        w_top = np.take_along_axis(probs, top, axis=-1)
        w_top /= w_top.sum(axis=-1, keepdims=True)
        out: A | None = None
        for e in range(c.n_experts):
            weight = np.where(top == e, w_top, 0.0).sum(axis=-1)
            gu = self._linear(link, up, i, step, xn, "w_gate_up", expert=e, normalized=True)
            m = b.scale_rows(b.swiglu_act(gu), weight)
            y = self._linear(
                link, down, i, step, m, "w_down", arr_key="m", expert=e, last=e == c.n_experts - 1
            )
            out = y if out is None else b.add(out, y)
        assert out is not None
        return out

    # -- key sharing (§5.2) ----------------------------------------------------------------------
    def share_keys(self, link: Transport) -> None:
        """Upload π_i (and the noise α_i of a noised QKV stage) of every middle block, so the server can
        decode those blocks' prompt caches. Guard blocks stay locked."""
        st = self._require()
        if st.shared:
            return
        rows = st.n + self.cfg.r1
        for i in self.middle:
            arrays: dict[str, Any] = {"perm": st.keys.token_perm(i, rows)}
            release = self.plan.find(Stage.QKV, i)
            if release is not None:  # the server removes α_i W from the raw cache (plan.shared)
                alpha = st.keys.noise(release, None, rows, self.c.hidden_size)
                arrays["alpha"] = alpha.astype(self.b.numpy_dtype())  # the wire dtype of the backend
            self._send(link, Stage.SHARE, i, -1, arrays, salt=st.keys.commit_salt(i).hex())
        st.shared = True

    def _require(self) -> _State[A]:
        st = self.state
        if st is None:
            raise ProtocolError("no session: call prefill first")
        if st.failed:
            raise ProtocolError("this session failed on an earlier error; start a new prefill")
        return st

    # -- generation (§5.3) -------------------------------------------------------------------------
    def decode(self, token: int, link: Transport) -> npt.NDArray[Any]:
        """Feed ``token`` at the next position with one-time keys; return the next logits (V,).

        Equal to plaintext decoding. Raises ProtocolError past ``max_length`` (nothing is sent then).
        """
        st = self._require()
        b, c = self.b, self.c
        t, p = st.step, st.n + st.step
        if p >= self.max_length:
            raise ProtocolError(f"generation past the configured maximum length {self.max_length}")
        h = b.embed(np.asarray([token]))  # validate the token before anything is sent
        if self.middle and not st.shared:
            self.share_keys(link)
        new_k: dict[int, A] = {}
        new_v: dict[int, A] = {}
        for i in self.first:
            h, new_k[i], new_v[i] = self._gen_first(link, i, t, p, h)
        if self.middle:
            h = self._send(link, Stage.GEN_MID, self.middle.start, t, {"x": h}).arrays["x"]
        for i in self.last:
            h, new_v[i] = self._gen_last(link, i, t, h)
        for i, k in new_k.items():  # commit the new rows only once the whole step succeeded
            st.guard_k[i] = k
        for i, v in new_v.items():
            st.guard_v[i] = v
        st.step += 1
        logits = b.project(b.norm(h, "final"), "lm_head")
        self.meter.matmul(Stage.GEN_HEAD, 1, c.hidden_size, c.vocab_size, "client")
        out: npt.NDArray[Any] = np.asarray(b.to_numpy(logits))[0]
        return out

    def _gen_first(self, link: Transport, i: int, t: int, p: int, h: A) -> tuple[A, A, A]:
        b, c, st = self.b, self.c, self._require()
        z = self._linear(link, Stage.GEN_QKV, i, t, b.norm(h, "attn", i), "wqkv", reply_key="z")
        q, k, v = split_qkv(b, z)
        pos = np.array([p])
        q, k = b.rope(q, pos), b.rope(k, pos)
        keys = b.concat_rows([st.guard_k[i], k])
        values = b.concat_rows([st.guard_v[i], v])
        hp, g = st.keys.head_perm(i, t), c.group_size
        sent = {
            "q": head_permute(q, hp, g, b),
            "k": head_permute(keys, hp, 1, b),
            "v": head_permute(values, hp, 1, b),
        }
        o = self._send(link, Stage.GEN_ATTN, i, t, sent).arrays["o"]
        o = b.reshape(head_unpermute(o, hp, g, b), (1, c.q_dim))
        h = b.add(h, b.project(o, "wo", i))
        self.meter.matmul(Stage.GEN_ATTN, 1, c.q_dim, c.hidden_size, "client")
        h = b.add(h, self._gen_ffn(link, i, t, h, clear=self.cfg.guard_ffn == "clear"))
        return h, keys, values

    def _gen_ffn(self, link: Transport, i: int, t: int, h: A, clear: bool) -> A:
        if clear:
            y: A = self._send(link, Stage.GEN_FFN, i, t, {"x": h}).arrays["y"]
            return y
        xn = self.b.norm(h, "mlp", i)
        return self._blinded_mlp(link, i, t, xn, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, Stage.GEN_ROUTER)

    def _gen_last(self, link: Transport, i: int, t: int, h: A) -> tuple[A, A]:
        b, c, cfg, st = self.b, self.c, self.cfg, self._require()
        reply = self._send(link, Stage.GEN_LAST, i, t, {"x": h}).arrays
        scores, v_new = reply["scores"], b.reshape(reply["v"], (1, c.n_kv_heads, c.head_dim))
        rho = st.keys.lock_perm(i, st.n + cfg.lock_decoys)
        values = b.concat_rows([st.guard_v[i], v_new])
        o = b.reshape(b.softmax_values(unlock_scores(scores, rho, st.n, b), values), (1, c.q_dim))
        self.meter.attention(Stage.GEN_LAST, c.n_heads, 1, st.n + t + 1, c.head_dim // 2, "client")
        h = b.add(h, b.project(o, "wo", i))
        self.meter.matmul(Stage.GEN_LAST, 1, c.q_dim, c.hidden_size, "client")
        if cfg.last_ffn == "paper":
            # the paper's form: send h + a constant offset and let the server normalize — relies on
            # RMSNorm(x + α) = RMSNorm(x), which is false (T7), so this is NOT exact
            release = self.plan.find(Stage.GEN_FFN, i)
            assert release is not None  # the plan lists the offset of every last guard block
            offset = b.from_numpy(st.keys.noise(release, t, 1, c.hidden_size))
            y = self._send(link, Stage.GEN_FFN, i, t, {"x": b.add(h, offset)}).arrays["y"]
            return b.add(h, y), values
        return b.add(h, self._gen_ffn(link, i, t, h, clear=False)), values

    def generate(self, ids: Any, n_new: int, link: Transport) -> list[int]:
        """Greedy SCX generation: prefill, then ``n_new`` argmax tokens (the same tokens as plaintext
        greedy decoding): ``n_new`` − 1 decode steps, the first of which shares the middle blocks' keys."""
        logits = self.prefill(ids, link)
        out: list[int] = []
        nxt = int(np.argmax(logits[-1]))
        for step in range(n_new):
            out.append(nxt)
            if step + 1 < n_new:
                nxt = int(np.argmax(self.decode(nxt, link)))
        return out

    def cost_report(self, link: Transport, server_meter: CostMeter | None = None) -> CostReport:
        """Client flops, server flops (when its meter is given), bytes each way and round trips."""
        meters = [self.meter, link.meter] + ([server_meter] if server_meter is not None else [])
        return CostReport.merge(*meters)

"""The trusted client (DESIGN §5): holds the key schedule, the embeddings, norms and RoPE, encodes
every message and decodes every reply, so that the decoded result is exactly plaintext inference.

Prefill (§5.1), key sharing (§5.2) and generation (§5.3) are methods; each message goes through a
:class:`~scx_ref.protocol.transport.Transport`. The client keeps only what the protocol says it keeps:
the first guard blocks' valid caches and the last guard blocks' values. Every key is re-derived from
the schedule when needed (labels below), which is what makes it stateless.

Key labels: ``("tok", i, "qkv")`` π_i over n+r₁ rows (block i's QKV stage and block i−1's FFN stage;
i = L is the LM-head stage), ``("tok", i, "o")`` π′_i over n+r₂, ``("head", i[, "gen", t])`` the
head-structured P, ``("alpha", i, stage[, "gen", t])`` Laplace noise, ``("decoy", i, stage)`` decoy
choice, ``("lock", i)`` ρ_i of a locked cache, ``("commit", i)`` the commitment salt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Generic

import numpy as np
import numpy.typing as npt

from ..backends.base import A, Backend, split_qkv
from ..errors import ProtocolError, SessionError
from ..keys import KeySchedule, Label
from ..transforms import HeadPermutation, inverse_permutation, laplace_noise
from .config import SCXConfig
from .cost import CostMeter, CostReport
from .decoys import CalibrationPool, DecoyPolicy, GaussianDecoys, default_public_tokens
from .messages import Reply, Request
from .server import commitment
from .transport import Transport

__all__ = ["Client"]

IntArray = npt.NDArray[np.int64]


@dataclass
class _State(Generic[A]):
    """What the client keeps between calls for one session."""

    keys: KeySchedule
    n: int
    seq: int
    step: int = 0
    shared: bool = False
    guard_k: dict[int, A] = field(default_factory=dict)  # first guard blocks: rows × H_kv × d_h (RoPE'd)
    guard_v: dict[int, A] = field(default_factory=dict)  # first and last guard blocks
    lock_cols: dict[int, IntArray] = field(default_factory=dict)  # derived from ρ_i, memoised
    failed: bool = False


class Client(Generic[A]):
    """The SCX client. One prefill opens a session (one nonce); decode/generate continue it."""

    def __init__(
        self,
        backend: Backend[A],
        keys: KeySchedule,
        config: SCXConfig | None = None,
        decoys: DecoyPolicy | None = None,
        public_tokens: IntArray | None = None,
    ) -> None:
        self.b = backend
        self.c = backend.config
        self.cfg = config or SCXConfig()
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

    def _send(
        self, link: Transport, stage: str, layer: int, step: int, arrays: dict[str, Any], **meta: Any
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

    def _noise(self, label: Label, rows: int, width: int, beta: float) -> A | None:
        if beta == 0:
            return None
        st = self.state
        assert st is not None
        eta = laplace_noise((rows, width), beta, st.keys.generator(label), dtype=np.float64)
        self.meter.elementwise("noise", rows * width)
        return self.b.from_numpy(eta)

    def _head_perm(self, label: Label) -> HeadPermutation:
        keys = self._keys()
        order = keys.permutation((*label, "groups"), self.c.n_kv_heads)
        sigmas = np.stack(
            [keys.permutation((*label, "sigma", g), self.c.head_dim) for g in range(self.c.n_kv_heads)]
        )
        return HeadPermutation(order, sigmas)

    def _keys(self) -> KeySchedule:
        assert self.state is not None
        return self.state.keys

    def _decoys(self, stage: str, layer: int, count: int, real: A) -> A:
        """``count`` decoy rows for (stage, layer), in the backend."""
        width = self.b.shape(real)[1]
        if self.decoys.needs_real and count:
            real_np = np.asarray(self.b.to_numpy(real), dtype=np.float64)
        else:
            real_np = np.zeros((0, width))
        rows = self.decoys.draw(stage, layer, count, real_np, self._keys().stream(("decoy", layer, stage)))
        return self.b.from_numpy(np.asarray(rows, dtype=np.float64).reshape(count, width))

    def _blinded_linear(
        self,
        link: Transport,
        stage: str,
        layer: int,
        step: int,
        x: A,
        which: str,
        label: Label,
        beta: float,
        reply_key: str = "y",
        arr_key: str = "x",
        experts: IntArray | None = None,
        **meta: Any,
    ) -> A:
        """Send x + η for the server to apply W (+ b); return xW (+ b) = server reply − ηW (T5)."""
        rows, width = self.b.shape(x)
        eta = self._noise(label, rows, width, beta)
        sent = x if eta is None else self.b.add(x, eta)
        extra = {} if experts is None else {"experts": experts.tolist()}
        y: A = self._send(link, stage, layer, step, {arr_key: sent}, **meta, **extra).arrays[reply_key]
        if eta is None:
            return y
        corr = self.b.correction(eta, which, layer, experts)  # type: ignore[arg-type]
        self.meter.matmul(stage, rows, width, self.b.shape(y)[1], "client")
        return self.b.sub(y, corr)

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
        if n < 1:
            raise ProtocolError("the prompt must have at least one token")
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
        st: _State[A] = _State(self._master_keys.for_nonce(nonce), n, seq=0)
        self.state = st
        r1, r2, L = cfg.r1, cfg.r2, c.n_layers
        self._send(
            link,
            "open",
            -1,
            -1,
            {},
            n=n,
            r1=r1,
            r2=r2,
            r_lock=cfg.lock_decoys,
            l_s=cfg.l_s,
            l_e=cfg.l_e,
            max_length=self.max_length,
            level=cfg.level,
        )
        pos = np.arange(n)
        h = x0
        dec = self._decoys("qkv", 0, r1, h)  # carried decoy rows of the π_i stages
        keys_kept: dict[int, A] = {}
        for i in range(L):
            h, dec, k_rope, v = self._prefill_block(link, i, h, dec, pos)
            if i in self.first:
                st.guard_k[i], st.guard_v[i] = k_rope, v
            elif i in self.last:
                st.guard_v[i] = v
                keys_kept[i] = k_rope
        logits_np = self._prefill_head(link, h, dec)
        for i, k_rope in keys_kept.items():  # locked key caches of the last guard blocks
            rho = self._keys().permutation(("lock", i), n + cfg.lock_decoys)
            k_flat = b.reshape(k_rope, (n, c.kv_dim))
            kc = b.take_rows(b.concat_rows([k_flat, self._decoys("k", i, cfg.lock_decoys, k_flat)]), rho)
            self._send(link, "lock", i, -1, {"k": kc})
        return logits_np

    def _prefill_block(self, link: Transport, i: int, h: A, dec: A, pos: IntArray) -> tuple[A, A, A, A]:
        b, c, cfg, keys = self.b, self.c, self.cfg, self._keys()
        n, r1, r2 = len(pos), cfg.r1, cfg.r2
        # 1. QKV stage: E = π_i(X ⊕ R) (+ α_i, with the client's norm)
        pi = keys.permutation(("tok", i, "qkv"), n + r1)
        beta = cfg.prefill_beta("qkv", i)
        rows = b.concat_rows([h, dec])
        if beta > 0:
            rows = b.norm(rows, "attn", i)
            self.meter.elementwise("qkv", (n + r1) * c.hidden_size)
        salt = keys.key(("commit", i))
        z = self._blinded_linear(
            link,
            "qkv",
            i,
            -1,
            b.take_rows(rows, pi),
            "wqkv",
            ("alpha", i, "qkv"),
            beta,
            reply_key="z",
            normalized=beta > 0,
            commit=commitment(salt, i, pi),
        )
        q, k, v = split_qkv(b, b.narrow(b.put_rows(z, pi), 0, 0, n))
        q, k = b.rope(q, pos), b.rope(k, pos)
        self.meter.elementwise("qkv", 3 * n * (c.q_dim + c.kv_dim))
        # 2. attention stage: Q P_i, K P_i, V P_i in true row order
        hp = self._head_perm(("head", i))
        g = c.group_size
        o = self._send(
            link,
            "attn",
            i,
            -1,
            {"q": b.head_permute(q, hp, g), "k": b.head_permute(k, hp, 1), "v": b.head_permute(v, hp, 1)},
        ).arrays["o"]
        o = b.reshape(b.head_unpermute(o, hp, g), (n, c.q_dim))
        # 3. O stage: π′_i(O ⊕ R′)
        pi_o = keys.permutation(("tok", i, "o"), n + r2)
        rows = b.take_rows(b.concat_rows([o, self._decoys("o", i, r2, o)]), pi_o)
        y = self._blinded_linear(link, "o", i, -1, rows, "wo", ("alpha", i, "o"), cfg.prefill_beta("o", i))
        h = b.add(h, b.narrow(b.put_rows(y, pi_o), 0, 0, n))
        # 4. FFN stage under π_{i+1}; its decoys ride on into block i+1's QKV stage
        pi_next = keys.permutation(("tok", i + 1, "qkv"), n + r1)
        dec_mid = self._decoys("ffn", i, r1, h)
        rows = b.concat_rows([h, dec_mid])
        beta = cfg.prefill_beta("ffn", i)
        if beta > 0:
            xn = b.take_rows(b.norm(rows, "mlp", i), pi_next)
            y = self._blinded_mlp(link, i, -1, xn, beta, ("alpha", i, "ffn"), "ffn", "ffn_down", "router")
        else:
            y = self._send(link, "ffn", i, -1, {"x": b.take_rows(rows, pi_next)}).arrays["y"]
        y = b.put_rows(y, pi_next)
        self.meter.elementwise("ffn", 2 * (n + r1) * c.hidden_size)
        out = b.add(rows, y)
        return b.narrow(out, 0, 0, n), b.narrow(out, 0, n, n + r1), k, v

    def _prefill_head(self, link: Transport, h: A, dec: A) -> npt.NDArray[Any]:
        b, c, cfg, n = self.b, self.c, self.cfg, self.b.nrows(h)
        L = c.n_layers
        pi = self._keys().permutation(("tok", L, "qkv"), n + cfg.r1)
        rows = b.concat_rows([h, dec])
        beta = cfg.prefill_beta("head", L)
        if beta > 0:
            rows = b.norm(rows, "final")
        logits = self._blinded_linear(
            link,
            "head",
            L,
            -1,
            b.take_rows(rows, pi),
            "lm_head",
            ("alpha", L, "head"),
            beta,
            reply_key="logits",
            normalized=beta > 0,
        )
        keep = inverse_permutation(pi)[:n].astype(np.int64)  # T1 decode with the decoy rows stripped
        return b.rows_to_numpy(logits, keep)

    def _blinded_mlp(
        self,
        link: Transport,
        i: int,
        step: int,
        xn: A,
        beta: float,
        label: Label,
        up_stage: str,
        down_stage: str,
        router_stage: str,
    ) -> A:
        """The MLP of normalized rows ``xn`` with every linear map blinded (T5); exact.

        Dense: gate/up (blinded) → client SwiGLU → down (blinded). MoE: the router (blinded) → client
        softmax/top-k → every expert's gate/up and down (blinded), so the server does not learn the
        routing; rows not routed to an expert get weight 0.
        """
        b, c = self.b, self.c
        rows, f = b.nrows(xn), c.intermediate_size
        if not c.is_moe:
            gu = self._blinded_linear(
                link, up_stage, i, step, xn, "w_gate_up", (*label, "up"), beta, normalized=True
            )
            m = b.swiglu_act(gu)
            self.meter.elementwise(up_stage, rows * f)
            return self._blinded_linear(
                link, down_stage, i, step, m, "w_down", (*label, "down"), beta, arr_key="m", last=True
            )
        logits = np.asarray(
            b.to_numpy(
                self._blinded_linear(link, router_stage, i, step, xn, "router", (*label, "router"), beta)
            ),
            dtype=np.float64,
        )
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : c.top_k]
        w_top = np.take_along_axis(probs, top, axis=-1)
        w_top /= w_top.sum(axis=-1, keepdims=True)
        out: A | None = None
        for e in range(c.n_experts):
            weight = np.where(top == e, w_top, 0.0).sum(axis=-1, keepdims=True)
            ex = np.array([e], dtype=np.int64)
            gu = self._blinded_linear(
                link, up_stage, i, step, xn, "w_gate_up", (*label, "up", e), beta, experts=ex, normalized=True
            )
            m = b.scale_rows(b.swiglu_act(gu), weight[:, 0])
            y = self._blinded_linear(
                link,
                down_stage,
                i,
                step,
                m,
                "w_down",
                (*label, "down", e),
                beta,
                arr_key="m",
                experts=ex,
                last=e == c.n_experts - 1,
            )
            out = y if out is None else b.add(out, y)
        assert out is not None
        return out

    # -- key sharing (§5.2) ----------------------------------------------------------------------
    def share_keys(self, link: Transport) -> None:
        """Upload π_i (and, at level ``blind``, α_i) of every middle block, so the server can decode
        those blocks' prompt caches. Guard blocks stay locked."""
        st = self._require()
        if st.shared:
            return
        n, r1 = st.n, self.cfg.r1
        for i in self.middle:
            pi = st.keys.permutation(("tok", i, "qkv"), n + r1)
            arrays: dict[str, Any] = {"perm": pi}
            beta = self.cfg.prefill_beta("qkv", i)
            if beta > 0:
                arrays["alpha"] = laplace_noise(
                    (n + r1, self.c.hidden_size), beta, st.keys.generator(("alpha", i, "qkv"))
                ).astype(self.b.numpy_dtype())  # the wire dtype of the backend
            self._send(link, "share", i, -1, arrays, salt=st.keys.key(("commit", i)).hex())
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
        b, c, cfg = self.b, self.c, self.cfg
        t, p = st.step, st.n + st.step
        if p >= self.max_length:
            raise ProtocolError(f"generation past the configured maximum length {self.max_length}")
        h = b.embed(np.asarray([token]))  # validate the token before anything is sent
        if self.middle and not st.shared:
            self.share_keys(link)
        beta = cfg.generation_beta()
        new_k: dict[int, A] = {}
        new_v: dict[int, A] = {}
        for i in self.first:
            h, new_k[i], new_v[i] = self._gen_first(link, i, t, p, h, beta)
        if self.middle:
            h = self._send(link, "gen_mid", self.middle.start, t, {"x": h}).arrays["x"]
        for i in self.last:
            h, new_v[i] = self._gen_last(link, i, t, h, beta)
        for i, k in new_k.items():  # commit the new rows only once the whole step succeeded
            st.guard_k[i] = k
        for i, v in new_v.items():
            st.guard_v[i] = v
        st.step += 1
        logits = b.project(b.norm(h, "final"), "lm_head")
        self.meter.matmul("gen_head", 1, c.hidden_size, c.vocab_size, "client")
        out: npt.NDArray[Any] = np.asarray(b.to_numpy(logits))[0]
        return out

    def _gen_first(self, link: Transport, i: int, t: int, p: int, h: A, beta: float) -> tuple[A, A, A]:
        b, c, st = self.b, self.c, self._require()
        xn = b.norm(h, "attn", i)
        z = self._blinded_linear(
            link, "gen_qkv", i, t, xn, "wqkv", ("alpha", i, "qkv", "gen", t), beta, reply_key="z"
        )
        q, k, v = split_qkv(b, z)
        pos = np.array([p])
        q, k = b.rope(q, pos), b.rope(k, pos)
        keys = b.concat_rows([st.guard_k[i], k])
        values = b.concat_rows([st.guard_v[i], v])
        hp = self._head_perm(("head", i, "gen", t))
        g = c.group_size
        o = self._send(
            link,
            "gen_attn",
            i,
            t,
            {
                "q": b.head_permute(q, hp, g),
                "k": b.head_permute(keys, hp, 1),
                "v": b.head_permute(values, hp, 1),
            },
        ).arrays["o"]
        o = b.reshape(b.head_unpermute(o, hp, g), (1, c.q_dim))
        h = b.add(h, b.project(o, "wo", i))
        self.meter.matmul("gen_attn", 1, c.q_dim, c.hidden_size, "client")
        h = b.add(h, self._gen_ffn(link, i, t, h, beta, self.cfg.guard_ffn == "clear"))
        return h, keys, values

    def _gen_ffn(self, link: Transport, i: int, t: int, h: A, beta: float, clear: bool) -> A:
        if clear:
            y: A = self._send(link, "gen_ffn", i, t, {"x": h}).arrays["y"]
            return y
        xn = self.b.norm(h, "mlp", i)
        return self._blinded_mlp(
            link, i, t, xn, beta, ("alpha", i, "ffn", "gen", t), "gen_ffn_up", "gen_ffn_down", "gen_router"
        )

    def _gen_last(self, link: Transport, i: int, t: int, h: A, beta: float) -> tuple[A, A]:
        b, c, cfg, st = self.b, self.c, self.cfg, self._require()
        reply = self._send(link, "gen_last", i, t, {"x": h}).arrays
        scores, v_new = reply["scores"], b.reshape(reply["v"], (1, c.n_kv_heads, c.head_dim))
        n, r = st.n, cfg.lock_decoys
        if i not in st.lock_cols:  # locked column j holds row ρ[j]: true row m sits at column ρ⁻¹[m]
            rho = st.keys.permutation(("lock", i), n + r)
            inv = np.empty_like(rho)
            inv[rho] = np.arange(n + r)
            st.lock_cols[i] = inv[:n]
        cols = np.concatenate([st.lock_cols[i], np.arange(n + r, n + r + t + 1)])
        values = b.concat_rows([st.guard_v[i], v_new])
        o = b.reshape(b.softmax_values(b.take_last(scores, cols), values), (1, c.q_dim))
        self.meter.attention("gen_last", c.n_heads, 1, n + t + 1, c.head_dim // 2, "client")
        h = b.add(h, b.project(o, "wo", i))
        self.meter.matmul("gen_last", 1, c.q_dim, c.hidden_size, "client")
        if cfg.last_ffn == "paper":
            # the paper's form: send h + a constant offset and let the server normalize — relies on
            # RMSNorm(x + α) = RMSNorm(x), which is false (T7), so this is NOT exact
            offset = laplace_noise(
                (1, 1), max(beta, 1.0), st.keys.generator(("alpha", i, "offset", "gen", t))
            )
            shifted = b.add(h, b.from_numpy(np.full((1, c.hidden_size), float(offset[0, 0]))))
            return b.add(h, self._send(link, "gen_ffn", i, t, {"x": shifted}).arrays["y"]), values
        return b.add(h, self._gen_ffn(link, i, t, h, beta, clear=False)), values

    def generate(self, ids: Any, n_new: int, link: Transport) -> list[int]:
        """Greedy SCX generation: prefill, share keys, then ``n_new`` argmax tokens (the same tokens as
        plaintext greedy decoding)."""
        logits = self.prefill(ids, link)
        self.share_keys(link)
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

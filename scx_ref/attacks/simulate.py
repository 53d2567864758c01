"""A server view simulated from the numpy reference, one SCX mechanism switchable at a time.

It produces the same :class:`~scx_ref.protocol.transport.ServerView` messages (stage, layer, step, array
names) the protocol engine records (see :mod:`scx_ref.protocol.messages`), following DESIGN §5.1–§5.3:
QKV stage rows π_i(X̂ ⊕ r_{i,1}) + α_i, attention-stage Q/K/V in true order under a head-structured
permutation, O-stage rows π′_i(O ⊕ r_{i,2}), FFN-stage rows π_{i+1}(H ⊕ r_{i+1,1}), the head stage,
locked caches ρ_i(K ⊕ R_i), key sharing, and the generation rows entering the middle / last blocks.

Uses: (1) the *plaintext control* (every switch off — what the server would see with no SCX), which proves an
attack works; (2) ablations the engine cannot express (head permutation off with token permutation on);
(3) fast tests of the attacks before/without the engine. The harness prefers the real engine when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .. import ops
from ..errors import ConfigError
from ..protocol.transport import ServerView, ViewedMessage
from ..reference import KVCache
from ..transforms import HeadPermutation, laplace_noise
from ..weights import ModelWeights
from ._model import forward_trace

__all__ = ["SimSettings", "calibration_pool", "simulate_view"]

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class SimSettings:
    """Which SCX mechanisms are on. ``SimSettings.plaintext()`` turns every one off."""

    token_perm: bool = True
    head_perm: bool = True
    r1: int = 2
    r2: int = 2
    r_lock: int = 2
    level: Literal["permute", "paper", "blind"] = "paper"
    beta: float = 5.0
    l_s: int = 1
    l_e: int = 1
    decoys: Literal["calibration", "gaussian"] = "calibration"

    def __post_init__(self) -> None:
        if min(self.r1, self.r2, self.r_lock) < 0 or min(self.l_s, self.l_e) < 1 or self.beta < 0:
            raise ConfigError(f"invalid simulation settings {self}")

    @classmethod
    def plaintext(cls, l_s: int = 1, l_e: int = 1) -> SimSettings:
        """No permutation, no decoys, no noise: the attack's sanity control."""
        return cls(
            token_perm=False,
            head_perm=False,
            r1=0,
            r2=0,
            r_lock=0,
            level="permute",
            beta=0.0,
            l_s=l_s,
            l_e=l_e,
        )

    def beta_at(self, stage: str, layer: int) -> float:
        if self.level == "blind" or (self.level == "paper" and stage == "qkv" and layer == 0):
            return self.beta
        return 0.0


@dataclass
class _Sim:
    weights: ModelWeights
    s: SimSettings
    pool: dict[tuple[str, int], Array]
    rng: np.random.Generator
    view: ServerView = field(default_factory=ServerView)
    session: str = "sim"

    def send(
        self, stage: str, layer: int, step: int, meta: dict[str, Any] | None = None, **arrays: Array
    ) -> None:
        self.view.messages.append(
            ViewedMessage(
                self.session, stage, layer, step, {k: np.array(v) for k, v in arrays.items()}, meta or {}
            )
        )

    def perm(self, n: int) -> Array:
        return self.rng.permutation(n) if self.s.token_perm else np.arange(n)

    def decoys(self, stage: str, layer: int, count: int, real: Array) -> Array:
        if count == 0:
            return np.zeros((0, real.shape[1]), dtype=real.dtype)
        if self.s.decoys == "gaussian":
            mu, sd = real.mean(axis=0), real.std(axis=0) + 1e-6
            return np.asarray(mu + sd * self.rng.standard_normal((count, real.shape[1])), dtype=real.dtype)
        pool = self.pool[(stage, layer)]
        return np.asarray(pool[self.rng.integers(0, pool.shape[0], size=count)], dtype=real.dtype)

    def head_perm(self) -> HeadPermutation:
        c = self.weights.config
        if not self.s.head_perm:
            return HeadPermutation.identity(c.n_kv_heads, c.head_dim)
        sig = np.stack([self.rng.permutation(c.head_dim) for _ in range(c.n_kv_heads)])
        return HeadPermutation(self.rng.permutation(c.n_kv_heads), sig)


def calibration_pool(
    weights: ModelWeights, public_ids: npt.ArrayLike, window: int = 64
) -> dict[tuple[str, int], Array]:
    """Stage rows of public text (DESIGN §5.1 calibration pool): ``qkv`` block inputs, ``o`` attention
    outputs, ``ffn`` residuals before the MLP, ``k`` post-RoPE keys (flattened), ``head`` final residuals."""
    ids = np.asarray(public_ids, dtype=np.int64)
    rows: dict[tuple[str, int], list[Array]] = {}
    for start in range(0, len(ids), window):
        tr = forward_trace(weights, ids[start : start + window], logits=False)
        for i in range(weights.config.n_layers):
            rows.setdefault(("qkv", i), []).append(tr.x[i])
            rows.setdefault(("o", i), []).append(tr.o[i])
            rows.setdefault(("ffn", i), []).append(tr.h[i])
            rows.setdefault(("k", i), []).append(tr.k[i].reshape(len(tr.k[i]), -1))
        assert tr.final is not None
        rows.setdefault(("head", weights.config.n_layers), []).append(tr.final)
    return {key: np.concatenate(parts) for key, parts in rows.items()}


def simulate_view(
    weights: ModelWeights,
    ids: npt.ArrayLike,
    settings: SimSettings,
    pool: dict[tuple[str, int], Array],
    rng: np.random.Generator,
    n_new: int = 0,
) -> tuple[ServerView, list[int]]:
    """The server's view of one SCX request (prefill of ``ids``, key sharing, ``n_new`` greedy tokens),
    and the generated tokens (ground truth for scoring). ``rng`` stands in for the client's keys."""
    w, c, s = weights, weights.config, settings
    ids = np.asarray(ids, dtype=np.int64)
    n, L = len(ids), c.n_layers
    sim = _Sim(w, s, pool, rng)
    first = range(0, min(s.l_s, L))
    last = range(max(first.stop, L - s.l_e), L)
    middle = range(first.stop, last.start)
    sim.send("open", -1, -1, {"n": n, "r1": s.r1, "r2": s.r2, "r_lock": s.r_lock, "l_s": s.l_s, "l_e": s.l_e})
    tr = forward_trace(w, ids)
    perms = [sim.perm(n + s.r1) for _ in range(L + 1)]  # π_i, and π_{L} for the head stage
    dec1 = sim.decoys("qkv", 0, s.r1, tr.x[0])  # block-1 decoys: embeddings of public tokens
    for i, lw in enumerate(w.layers):
        beta = s.beta_at("qkv", i)
        normalized = beta > 0
        real = tr.xhat[i] if normalized else tr.x[i]
        dec = ops.rms_norm(dec1, lw.attn_norm, c.rms_eps) if normalized else dec1
        e = np.concatenate([real, dec])[perms[i]]
        if beta > 0:
            e = e + laplace_noise(e.shape, beta, rng)
        sim.send("qkv", i, -1, {"normalized": normalized}, x=e)
        hp = sim.head_perm()
        sim.send(
            "attn", i, -1, q=hp.apply(tr.q[i], c.group_size), k=hp.apply(tr.k[i], 1), v=hp.apply(tr.v[i], 1)
        )
        po = sim.perm(n + s.r2)
        sim.send("o", i, -1, x=np.concatenate([tr.o[i], sim.decoys("o", i, s.r2, tr.o[i])])[po])
        # as in the engine: the FFN stage's decoys ride on (through the MLP) into block i+1's QKV stage
        dec_mid = sim.decoys("ffn", i, s.r1, tr.h[i])
        sim.send("ffn", i, -1, x=np.concatenate([tr.h[i], dec_mid])[perms[i + 1]])
        dec1 = dec_mid + ops.mlp(ops.rms_norm(dec_mid, lw.mlp_norm, c.rms_eps), lw.mlp, c.top_k)
    assert tr.final is not None
    sim.send("head", L, -1, x=np.concatenate([tr.final, dec1])[perms[L]])
    for i in last:
        kk = tr.k[i].reshape(n, c.kv_dim)
        sim.send(
            "lock", i, -1, k=np.concatenate([kk, sim.decoys("k", i, s.r_lock, kk)])[sim.perm(n + s.r_lock)]
        )
    for i in middle:
        sim.send("share", i, -1, {"salt": "00" * 32}, perm=perms[i])
    assert tr.logits is not None
    generated: list[int] = []
    cache = KVCache()
    forward_trace(w, ids, cache=cache, logits=False)
    nxt_tok = int(np.argmax(tr.logits[-1]))
    for step in range(n_new):
        generated.append(nxt_tok)
        gt = forward_trace(w, [nxt_tok], cache=cache)
        if middle:
            sim.send("gen_mid", middle.start, step, x=gt.x[middle.start])
        for i in last:
            sim.send("gen_last", i, step, x=gt.x[i])
        assert gt.logits is not None
        nxt_tok = int(np.argmax(gt.logits[-1]))
    return sim.view, generated

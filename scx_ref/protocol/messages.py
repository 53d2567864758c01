"""The messages between client and server: plain data (arrays plus metadata), nothing else.

A :class:`Request` goes client → server, a :class:`Reply` server → client. Both carry the session id
(the public nonce in hex), the stage, the layer (0-based; −1 when none), the generation step
(−1 during prefill) and a sequence number, so the server can reject a message from another session,
an out-of-order one, or one for the wrong layer, before it changes any state. Because they are
plain data, a network transport can replace the in-process one without touching either side.

Stages (:class:`~scx_ref.stages.Stage`; what the server receives, ``arrays`` keys in brackets; the
server refuses any other array or ``meta`` field, :data:`scx_ref.protocol.server._ARRAYS` / ``_META``):

control
  ``open``        start a session [] (seq 0, layer −1, step −1, no token) — ``meta``: n (prompt rows),
                  r1, r2, r_lock, l_s, l_e, max_length, level; optional attention, gen_attention,
                  gen_linear, wide. The reply's ``meta["token"]`` is the session capability
  ``close``       end the session [] (layer −1, step −1); its caches are freed
prefill (step −1)
  ``qkv``         block input rows, permuted with decoys, maybe blinded [x] + its key commitment; server
                  keeps Z_k, Z_v (the raw cache)
  ``attn``        Q, K, V after RoPE in true row order under a head-structured permutation [q, k, v]
  ``o``           attention output rows, permuted with decoys [x]
  ``ffn``         residual rows, permuted with decoys (blind level: normalized + blinded gate/up
                  input [x]; then the blinded SwiGLU product [m] in a ``ffn_down`` message)
  ``router``      (blind level, MoE) normalized + blinded rows for the router [x]
  ``head``        final hidden rows, permuted with decoys [x]; server returns per-row logits
  ``lock``        the locked key cache of a last guard block [k]
  ``share``       key sharing for a middle block [perm] + its salt (+ [alpha] where its QKV was noised)
generation (step t ≥ 0)
  ``gen_qkv``     a guard block whose attention the client computes: normalized + one-time-blinded row [x]
  ``gen_attn``    first guard block (gen_attention "server"): q and the whole cache under a one-time head
                  permutation [q, k, v]
  ``gen_o`` / ``gen_head``  (gen_linear "server") the one-time-blinded row for W_o / the LM head [x]
  ``gen_ffn``     guard block FFN: the clear residual row [x] (paper form)
  ``gen_ffn_up`` / ``gen_ffn_down`` / ``gen_router``  blinded guard FFN pieces [x] / [m] / [x]
  ``gen_mid``     the hidden row entering the middle blocks [x]; server runs them on its valid caches,
                  once a step, extending each by the step's row (position n + t)
  ``gen_last``    the hidden row entering a last guard block [x]; server returns scores and z = [q k v]

A ``wide`` message (a session opened wide) carries blinded rows in float64 and is multiplied in float64;
at the stages the server would otherwise normalize (qkv, ffn, head) it must carry ``normalized`` true.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..stages import Stage

__all__ = ["Reply", "Request"]

Arrays = dict[str, Any]  # numpy arrays on the wire; backend-native arrays in-process


@dataclass(frozen=True)
class Request:
    """Client → server."""

    session: str
    stage: Stage
    layer: int
    step: int
    seq: int
    arrays: Arrays = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    token: str = ""  # the session capability returned by ``open`` (empty on ``open`` itself)


@dataclass(frozen=True)
class Reply:
    """Server → client."""

    session: str
    stage: Stage
    layer: int
    step: int
    seq: int
    arrays: Arrays = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the session token in ``open``'s reply

"""The messages between client and server: plain data (arrays plus metadata), nothing else.

A :class:`Request` goes client → server, a :class:`Reply` server → client. Both carry the session id
(the public nonce in hex), the stage, the layer (0-based; −1 when none), the generation step
(−1 during prefill) and a sequence number, so the server can reject a message from another session,
an out-of-order one, or one for the wrong layer, before it changes any state. Because they are
plain data, a network transport can replace the in-process one without touching either side.

Stages (:class:`~scx_ref.stages.Stage`; what the server receives, ``arrays`` keys in brackets):

prefill (step −1)
  ``open``        start a session [] — ``meta``: n (prompt rows), r1, r2, level
  ``qkv``         block input rows, permuted with decoys, maybe blinded [x]; server keeps Z_k, Z_v
  ``attn``        Q, K, V after RoPE in true row order under a head-structured permutation [q, k, v]
  ``o``           attention output rows, permuted with decoys [x]
  ``ffn``         residual rows, permuted with decoys (blind level: normalized + blinded gate/up
                  input [x]; then the blinded SwiGLU product [m] in a ``ffn_down`` message)
  ``router``      (blind level, MoE) normalized + blinded rows for the router [x]
  ``head``        final hidden rows, permuted with decoys [x]; server returns per-row logits
  ``lock``        the locked key cache of a last guard block [k]
  ``share``       key sharing for a middle block [perm, salt] (+ [alpha] at level ``blind``)
generation (step t ≥ 0)
  ``gen_qkv``     first guard block: normalized + one-time-blinded row [x]
  ``gen_attn``    first guard block: q and the whole cache under a one-time head permutation [q, k, v]
  ``gen_ffn``     guard block FFN: the clear residual row [x] (paper form), or blinded pieces
  ``gen_ffn_up`` / ``gen_ffn_down`` / ``gen_router``  blinded guard FFN pieces [x]
  ``gen_mid``     the hidden row entering the middle blocks [x]; server runs them on its valid caches
  ``gen_last``    the hidden row entering a last guard block [x]; server returns scores and z = [q k v]
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

"""The keys of one request by role (DESIGN §3): one home for every key label the protocol uses.

Labels: ``("tok", i, "qkv")`` π_i over n + r₁ rows (block i's QKV stage and block i−1's FFN stage; i = L
is the LM-head stage), ``("tok", i, "o")`` π′_i over n + r₂ rows, ``("head", i[, "gen", t])`` the
head-structured P (its KV-group order ``(…, "groups")`` and per-group σ ``(…, "sigma", g)``),
``("decoy", i, stage)`` the decoy choice, ``("lock", i)`` ρ_i of a locked cache, ``("commit", i)`` the
key-sharing commitment salt; the Laplace noise labels come from the release plan
(:meth:`scx_ref.protocol.plan.Release.label`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..config import ModelConfig
from ..keys import KeyStream, Label
from ..stages import Stage
from ..transforms import HeadPermutation, laplace_noise
from .plan import Release

__all__ = ["KeySource", "RequestKeys", "commitment"]

IntArray = npt.NDArray[np.int64]


class KeySource(Protocol):
    """What a request's keys come from: a :class:`~scx_ref.keys.KeySchedule` (or a wrapper of one)."""

    nonce: bytes

    @property
    def session_id(self) -> str: ...

    def key(self, label: Label, length: int = 32) -> bytes: ...

    def stream(self, label: Label) -> KeyStream: ...

    def permutation(self, label: Label, n: int) -> IntArray: ...

    def generator(self, label: Label) -> KeyStream: ...


def commitment(salt: bytes, layer: int, perm: npt.NDArray[Any]) -> str:
    """SHA-256(salt ‖ layer ‖ π): binds a key-sharing message to its layer without revealing π
    (the 32-byte salt, revealed only with π, defeats enumeration of small permutations)."""
    data = salt + int(layer).to_bytes(4, "big") + np.ascontiguousarray(perm, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


class RequestKeys:
    """Every key of one request, derived on demand from its key schedule (nothing else is stored)."""

    def __init__(self, keys: KeySource, model: ModelConfig) -> None:
        self.schedule = keys
        self.model = model

    @property
    def session_id(self) -> str:
        """The public nonce in hex."""
        return self.schedule.session_id

    def token_perm(self, block: int, rows: int) -> IntArray:
        """π_block over ``rows`` = n + r₁ rows: block ``block``'s QKV stage and block ``block``−1's FFN
        stage (``block`` = L: the LM-head stage)."""
        return self.schedule.permutation(("tok", block, "qkv"), rows)

    def o_perm(self, block: int, rows: int) -> IntArray:
        """π′_block over ``rows`` = n + r₂ rows: block ``block``'s O stage."""
        return self.schedule.permutation(("tok", block, "o"), rows)

    def lock_perm(self, block: int, rows: int) -> IntArray:
        """ρ_block over n + r_lock rows: the row order of block ``block``'s locked key cache."""
        return self.schedule.permutation(("lock", block), rows)

    def head_perm(self, block: int, step: int | None = None) -> HeadPermutation:
        """P of block ``block``'s attention stage (prefill), or the one-time P of generation ``step``."""
        label: Label = ("head", block) if step is None else ("head", block, "gen", step)
        c = self.model
        order = self.schedule.permutation((*label, "groups"), c.n_kv_heads)
        sigmas = np.stack(
            [self.schedule.permutation((*label, "sigma", g), c.head_dim) for g in range(c.n_kv_heads)]
        )
        return HeadPermutation(order, sigmas)

    def decoy_stream(self, stage: Stage, block: int) -> KeyStream:
        """The stream that picks the decoy rows of ``stage`` in block ``block``."""
        return self.schedule.stream(("decoy", block, stage.value))

    def commit_salt(self, block: int) -> bytes:
        """The 32-byte salt of block ``block``'s key-sharing commitment."""
        return self.schedule.key(("commit", block))

    def noise(self, release: Release, step: int | None, rows: int, width: int) -> npt.NDArray[np.float64]:
        """η ~ Laplace(0, β)^(rows × width) of ``release`` (at generation ``step``), float64 on the host.
        The paper's offset release is one scalar broadcast to every coordinate."""
        gen = self.schedule.generator(release.label(step))
        if release.kind == "offset":
            return np.full((rows, width), float(laplace_noise((1, 1), release.beta, gen)[0, 0]))
        return laplace_noise((rows, width), release.beta, gen, dtype=np.float64)

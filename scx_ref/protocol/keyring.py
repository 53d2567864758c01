"""The keys of one request by role (DESIGN §3): one home for every key label the protocol uses.

Labels: ``("tok", i, "qkv")`` π_i over n + r₁ rows (block i's QKV stage and block i−1's FFN stage; i = L
is the LM-head stage), ``("tok", i, "o")`` π′_i over n + r₂ rows, ``("head", i[, "gen", t])`` the
head-structured P (its KV-group order ``(…, "groups")`` and per-group σ ``(…, "sigma", g)``),
``("decoy", i, stage)`` the decoy choice, ``("lock", i)`` ρ_i of a locked cache, ``("commit", i)`` the
key-sharing commitment salt; the Laplace noise labels come from the release plan
(:meth:`scx_ref.protocol.plan.Release.label`). Reply verification (:mod:`scx_ref.protocol.verify`, DESIGN
§5.5) draws its secrets under ``"verify"``: ``("verify", "basis", epoch, weight, i + 1)`` a client's
Freivalds basis of one weight matrix (from the client's root schedule, :func:`basis_label`),
``("verify", "mix")`` this session's combinations of those bases (its check vectors r),
``("verify", "rows", i[, "gen", t])`` the attention rows recomputed, ``("verify", "lock", i[, "gen", t])``
the coefficients of the locked-score check.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..config import ModelConfig
from ..errors import ProtocolError
from ..keys import KeyStream, Label
from ..stages import Stage
from ..transforms import HeadPermutation, laplace_noise
from .plan import Release

__all__ = ["KeySource", "RequestKeys", "basis_label", "commitment", "gaussian"]

IntArray = npt.NDArray[np.int64]

#: The length of a key-sharing commitment's salt (:meth:`RequestKeys.commit_salt`).
COMMIT_SALT_BYTES = 32


class KeySource(Protocol):
    """What a request's keys come from: a :class:`~scx_ref.keys.KeySchedule` (or a wrapper of one)."""

    nonce: bytes

    @property
    def session_id(self) -> str:
        """The public session id (the nonce in hex)."""
        ...

    def key(self, label: Label, length: int = 32) -> bytes:
        """``length`` key bytes for ``label`` (:meth:`~scx_ref.keys.KeySchedule.key`)."""
        ...

    def stream(self, label: Label) -> KeyStream:
        """An independent byte/float stream for ``label``."""
        ...

    def permutation(self, label: Label, n: int) -> IntArray:
        """The uniform permutation of 0 … n − 1 named by ``label``."""
        ...

    def generator(self, label: Label) -> KeyStream:
        """A noise source for ``label`` (a key stream: never global random state)."""
        ...


def commitment(salt: bytes, session: str, layer: int, perm: npt.NDArray[Any]) -> str:
    """SHA-256(salt ‖ session ‖ layer ‖ π): binds a key-sharing message to its session and layer without
    revealing π (the 32-byte salt, revealed only with π, defeats enumeration of small permutations).
    Because the session id is inside, a transcript replayed under another session id fails at key
    sharing. ProtocolError for a ``layer`` outside 0 … 2³² − 1 (its 4-byte field), a session that is not
    a string, a salt that is not 32 bytes (its length is not encoded: a shorter one would let the salt's
    and the session's bytes trade places, and an empty one admits enumeration) or a ``perm`` that is not a
    1-D array of integers (a float one would be truncated: two different arrays, one commitment)."""
    if not isinstance(salt, (bytes, bytearray)) or len(salt) != COMMIT_SALT_BYTES:
        got = f"{len(salt)} bytes" if isinstance(salt, (bytes, bytearray)) else type(salt).__name__
        raise ProtocolError(f"a commitment's salt must be {COMMIT_SALT_BYTES} bytes, got {got}")
    if not isinstance(session, str):
        raise ProtocolError(f"a commitment's session must be a string, got {type(session).__name__}")
    arr = np.asarray(perm)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ProtocolError(
            f"a commitment's permutation must be a 1-D integer array, got {arr.dtype} {arr.shape}"
        )
    layer = check_int(layer, "commitment layer", 0, 2**32 - 1, error=ProtocolError)
    sid = session.encode("utf-8")
    data = (
        bytes(salt)
        + len(sid).to_bytes(4, "big")
        + sid
        + layer.to_bytes(4, "big")
        + np.ascontiguousarray(arr, dtype="<i8").tobytes()
    )
    return hashlib.sha256(data).hexdigest()


def basis_label(epoch: int, weight: str, layer: int, expert: int | None) -> Label:
    """The label of a client's Freivalds basis of one weight matrix (``epoch`` counts the rotations)."""
    label: Label = ("verify", "basis", epoch, weight, layer + 1)  # layer −1 (LM head) → 0
    return label if expert is None else (*label, expert)


def gaussian(stream: KeyStream, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Standard normal float64 values from a key stream (Box–Muller on its 53-bit uniforms)."""
    count = int(np.prod(shape)) if shape else 1
    u = stream.random((2, (count + 1) // 2))
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # u < 1, so 1 − u > 0
    angle = 2.0 * np.pi * u[1]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
    return z.reshape(shape)


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
        return self.schedule.key(("commit", block), COMMIT_SALT_BYTES)

    # -- reply verification (DESIGN §5.5) ------------------------------------------------------------
    def verify_mix(self, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
        """This session's secret Gaussian combinations (``shape``: matrices × basis × vectors) of the
        client's Freivalds bases: the session's check vectors r = B·c of every weight matrix."""
        return gaussian(self.schedule.stream(("verify", "mix")), shape)

    def verify_rows(self, block: int, rows: int, count: int, step: int | None = None) -> IntArray:
        """``min(count, rows)`` distinct secret rows of ``rows`` (sorted): the attention rows of block
        ``block`` (at generation ``step``) the client recomputes (ConfigError for a ``count`` that is not an
        integer ≥ 0: a negative one would slice from the end)."""
        count = check_int(count, "verified row count")
        label: Label = ("verify", "rows", block) if step is None else ("verify", "rows", block, "gen", step)
        return np.sort(self.schedule.permutation(label, rows)[: min(count, rows)])

    def verify_lock(self, block: int, rows: int, k: int, step: int | None = None) -> npt.NDArray[np.float64]:
        """The secret Gaussian coefficients (``rows`` × ``k``) of the locked-score check of block
        ``block``: row j weighs column j of the locked cache as stored at prefill, or (at generation
        ``step``) the one column that step appends."""
        label: Label = ("verify", "lock", block) if step is None else ("verify", "lock", block, "gen", step)
        return gaussian(self.schedule.stream(label), (rows, k))

    def noise(self, release: Release, step: int | None, rows: int, width: int) -> npt.NDArray[np.float64]:
        """η ~ Laplace(0, β)^(rows × width) of ``release`` (at generation ``step``), float64 on the host.
        The paper's offset release is one scalar broadcast to every coordinate."""
        gen = self.schedule.generator(release.label(step))
        if release.kind == "offset":
            return np.full((rows, width), float(laplace_noise((1, 1), release.beta, gen)[0, 0]))
        return laplace_noise((rows, width), release.beta, gen, dtype=np.float64)

"""The key schedule (DESIGN §3): every key is derived from (master secret, public nonce, label).

``KDF(master, nonce, label)`` is HKDF-SHA256 (RFC 5869): extract with the nonce as salt, expand with
the canonical encoding of the label as info, giving a 32-byte label key. The label key seeds a
SHAKE-256 stream (counter blocks), from which

* permutations are drawn by Fisher–Yates with unbiased rejection sampling, and
* uniform floats (53 random bits each) feed the noise samplers.

Nothing here touches ``random`` or numpy's global state, and no non-cryptographic generator is
ever used for a key. Because every key is a pure function of (master, nonce, label), the client is
*stateless*: it can re-derive any key of any layer at any step.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ._checks import check_int
from .errors import KeyScheduleError, SessionError

__all__ = [
    "CLAIM_MEMORY",
    "MASTER_SECRET_BYTES",
    "NONCE_BYTES",
    "PERM_MEMORY",
    "KeySchedule",
    "KeyStream",
    "Label",
    "NonceClaims",
    "encode_label",
    "fisher_yates",
    "hkdf_sha256",
]

MASTER_SECRET_BYTES = 32
NONCE_BYTES = 16
#: How many claimed nonces a master secret's schedules remember (the most recent ones; 16 bytes each).
CLAIM_MEMORY = 1 << 16
#: How many permutations a schedule memoises (the most recently used). A request re-reads few of them
#: (π_i of the middle blocks when their keys are shared, ρ_i of the last guard blocks at every generation
#: step), while each generation step derives a one-time head permutation P per first guard block, read
#: once (1 + n_kv_heads arrays): without a bound a long generation grew the memo by those every step.
#: 4096 entries hold every permutation of one request's prefill (~12 per block with 8 KV heads) for models of
#: up to ~300 blocks; a permutation evicted and asked again is re-derived, bit for bit the same.
PERM_MEMORY = 1 << 12
_DOMAIN = b"scx_ref/v1"

LabelPart = str | int
Label = tuple[LabelPart, ...]
KS = TypeVar("KS", bound="KeySchedule")


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869): ``Expand(Extract(salt, ikm), info, length)``; length ≤ 255·32.
    KeyScheduleError for an input that is not bytes or a length that is not an integer in 1..8160."""
    for name, value in (("ikm", ikm), ("salt", salt), ("info", info)):
        if not isinstance(value, (bytes, bytearray)):
            raise KeyScheduleError(f"HKDF {name} must be bytes, got {type(value).__name__}")
    return _hkdf_expand(_hkdf_extract(salt, ikm), info, length)


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract: PRK = HMAC-SHA256(salt, ikm)."""
    return hmac.digest(salt, ikm, "sha256")


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand: T(1) ‖ T(2) ‖ … with T(i) = HMAC-SHA256(PRK, T(i−1) ‖ info ‖ i), cut to ``length``."""
    length = check_int(length, "HKDF output length", 1, 255 * 32, error=KeyScheduleError)
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def _check_label(label: object) -> None:
    """KeyScheduleError unless ``label`` is a tuple of str/int parts (what :func:`encode_label` takes,
    checked before a label is extended by parts, ``(*label, "perm", n)``, or used as a memo key): a string
    would silently become its characters."""
    if (
        not isinstance(label, tuple)
        or not label
        or not all(isinstance(part, str | int) and not isinstance(part, bool) for part in label)
    ):
        raise KeyScheduleError(f"a label must be a non-empty tuple of str/int, got {label!r}")


def encode_label(label: Sequence[LabelPart]) -> bytes:
    """Canonical, injective byte encoding of a label: type tag + length prefix for every part."""
    if not isinstance(label, tuple) or not label:
        raise KeyScheduleError(f"a label must be a non-empty tuple of str/int, got {label!r}")
    parts = [_DOMAIN]
    for part in label:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise KeyScheduleError(f"label parts must be str or int, got {part!r} in {label!r}")
        if isinstance(part, str):
            try:
                raw = part.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") has no UTF-8 encoding
                raise KeyScheduleError(f"label parts must be valid Unicode text, got {part!r}") from None
            parts.append(b"s" + len(raw).to_bytes(4, "big") + raw)
        else:
            if part < 0:
                raise KeyScheduleError(f"integer label parts must be >= 0, got {part}")
            raw = part.to_bytes(max(1, (part.bit_length() + 7) // 8), "big")
            parts.append(b"i" + len(raw).to_bytes(4, "big") + raw)
    return b"".join(parts)


class KeyStream:
    """A deterministic stream of pseudo-random bytes: SHAKE-256(label key ‖ block counter).

    It also offers ``random(size)`` (uniform floats in [0, 1) with 53 random bits), so it can be
    passed wherever a noise generator is expected.
    """

    _BLOCK = 1 << 12  # most labels need a few KB; a block is the unit of hashing
    _FIRST = 1 << 6  # the first squeeze of a block: most labels read far less than a block

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise KeyScheduleError("a stream key must be 32 bytes")
        self._key = bytes(key)
        self._xof: Any = None  # the SHAKE-256 state of the current block
        self._squeezed = b""  # the current block's first bytes (a prefix of its _BLOCK bytes)
        self._pos = 0  # bytes of the current block already read
        self._block = 0  # index of the next block

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of the stream.

        Byte i of the stream is byte i mod 4096 of SHAKE-256(key ‖ ⌊i / 4096⌋) — fixed-size blocks, so it
        does not depend on how the reads were split. A block is squeezed only as far as the reads go
        (SHAKE's output of a shorter length is a prefix of the longer one), which makes short reads cheap.
        KeyScheduleError unless ``n`` is an integer >= 0.
        """
        _check_count(n, "byte count")
        parts: list[bytes] = []
        while n > 0:
            if self._xof is None or self._pos == self._BLOCK:
                self._xof = hashlib.shake_256(self._key + self._block.to_bytes(8, "big"))
                self._block += 1
                self._squeezed, self._pos = b"", 0
            take = min(n, self._BLOCK - self._pos)
            end = self._pos + take
            if end > len(self._squeezed):  # squeeze further: at least double, at most the block
                self._squeezed = self._xof.digest(
                    min(self._BLOCK, max(end, 2 * len(self._squeezed), self._FIRST))
                )
            parts.append(self._squeezed[self._pos : end])
            self._pos = end
            n -= take
        return b"".join(parts)

    def uint64(self, count: int) -> npt.NDArray[np.uint64]:
        """``count`` independent uniform 64-bit words (KeyScheduleError unless ``count`` is an int >= 0)."""
        _check_count(count, "word count")
        return np.frombuffer(self.read(8 * count), dtype="<u8").astype(np.uint64)

    def random(self, size: int | tuple[int, ...] | None = None) -> Any:
        """Uniform floats in [0, 1): the top 53 bits of each word, divided by 2**53 (a float for
        ``size=None``, else an array of that shape; KeyScheduleError for a size that is not an integer >= 0
        or a tuple of them)."""
        if size is None:
            shape: tuple[int, ...] = ()
        elif isinstance(size, (tuple, list)):
            shape = tuple(size)
        else:
            shape = (size,)
        for n in shape:
            _check_count(n, "random size")
        count = int(np.prod(shape)) if shape else 1
        words = self.uint64(count) >> np.uint64(11)
        out = words.astype(np.float64) * (1.0 / (1 << 53))
        return out.reshape(shape) if shape else float(out[0])

    def randbelow(self, bounds: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """For each bound m ≥ 1 an unbiased uniform integer in [0, m), by rejection sampling: int64, of the
        bounds' shape (the draws in the bounds' row-major order).

        A 64-bit word u is accepted when u < m·⌊2⁶⁴/m⌋ (so every residue is equally likely) and
        mapped to u mod m; rejected positions are redrawn from fresh stream bytes. KeyScheduleError, with
        nothing read from the stream, unless every bound is an integer in [1, 2⁶³) (a larger one gave
        draws that wrapped to negative int64).
        """
        raw = np.asarray(bounds)
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise KeyScheduleError(f"randbelow bounds must be integers, got dtype {raw.dtype}")
        if raw.size and int(raw.min()) < 1:
            raise KeyScheduleError("randbelow bounds must be >= 1")
        if raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            raise KeyScheduleError(f"randbelow bounds must be < 2**63 (int64 draws), got {int(raw.max())}")
        m = raw.astype(np.uint64).reshape(-1)  # flat: the draws index positions 0..size-1
        # reject u ≥ m·⌊2⁶⁴/m⌋, i.e. u > (2⁶⁴ − 1) − (2⁶⁴ mod m); computed in uint64 without overflow
        top = np.uint64(0xFFFFFFFFFFFFFFFF)
        rem = (top % m + np.uint64(1)) % m
        max_ok = top - rem
        out = np.zeros(m.shape, dtype=np.int64)
        todo = np.arange(m.size)
        while todo.size:
            words = self.uint64(todo.size)
            ok = words <= max_ok[todo]
            idx = todo[ok]
            out[idx] = (words[ok] % m[idx]).astype(np.int64)
            todo = todo[~ok]
        return out.reshape(raw.shape)


def fisher_yates(n: int, stream: KeyStream) -> npt.NDArray[np.int64]:
    """A uniformly random permutation of 0..n-1 (Durstenfeld's Fisher–Yates, unbiased draws).

    For i = n-1 … 1, swap position i with j ~ Uniform{0..i}; every one of the n! permutations has
    probability exactly 1/n! when the draws are uniform, which ``randbelow`` guarantees.
    """
    n = check_int(n, "permutation size", 0, error=KeyScheduleError)
    perm = list(range(n))
    if n > 1:
        draws = stream.randbelow(np.arange(n, 1, -1, dtype=np.int64)).tolist()
        for i, j in zip(range(n - 1, 0, -1), draws, strict=True):
            perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


def _check_count(n: object, what: str) -> None:
    """KeyScheduleError unless ``n`` is an integer >= 0 (:func:`~scx_ref._checks.check_int`)."""
    check_int(n, what, 0, error=KeyScheduleError)


def _nonce_bytes(nonce: object) -> bytes:
    """``nonce`` as bytes (a bytearray is copied); KeyScheduleError for anything else."""
    if not isinstance(nonce, (bytes, bytearray)):
        raise KeyScheduleError(f"a nonce must be bytes, got {type(nonce).__name__}")
    return bytes(nonce)


class NonceClaims:
    """The nonces that have driven a session under one master secret, shared by a schedule and every
    schedule :meth:`KeySchedule.for_nonce` derives from it (thread-safe).

    Guarantee: :meth:`claim` succeeds at most once per nonce among the ``memory`` most recent claims, so
    one (master, nonce) pair — one set of keys — drives one session only. Two sessions under the same
    keys would let the server difference their messages and cancel the noise exactly.
    """

    def __init__(self, memory: int = CLAIM_MEMORY) -> None:
        memory = check_int(memory, "the claim memory", 1, error=KeyScheduleError)
        self._lock = threading.Lock()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._memory = memory

    def claim(self, nonce: bytes | bytearray) -> None:
        """Record that ``nonce`` drives a session; SessionError if it already did (KeyScheduleError for a
        nonce that is not bytes or bytearray — a bytearray is the nonce its bytes hold)."""
        key = _nonce_bytes(nonce)
        with self._lock:
            if key in self._seen:
                raise SessionError(
                    "nonce reused: a (master secret, nonce) pair drives one session only; "
                    "every prompt needs a fresh nonce"
                )
            self._seen[key] = None
            while len(self._seen) > self._memory:
                self._seen.popitem(last=False)

    def claimed(self, nonce: bytes | bytearray) -> bool:
        """Whether ``nonce`` already drove a session (within the memory); a bytearray is the nonce its bytes
        hold (KeyScheduleError for anything else that is not bytes: it used to be a raw TypeError, or a
        wrong False)."""
        key = _nonce_bytes(nonce)
        with self._lock:
            return key in self._seen


class KeySchedule:
    """All keys of one request, derived on demand from ``(master, nonce, label)``.

    Identity: the same (master, nonce, label) always gives the same key; different labels or nonces
    give independent keys (HKDF is a PRF in its info and salt). The master secret is never exposed
    by any method; ``session_id`` is the public nonce in hex. The all-zero master secret is refused
    (it is what an uninitialised buffer holds, not a secret). ``claims`` records which nonces of this
    master secret already drove a session (:class:`NonceClaims`, shared with :meth:`for_nonce`).
    """

    def __init__(self, master: bytes, nonce: bytes) -> None:
        if not isinstance(master, (bytes, bytearray)) or len(master) != MASTER_SECRET_BYTES:
            raise KeyScheduleError(f"the master secret must be exactly {MASTER_SECRET_BYTES} bytes")
        if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
            raise KeyScheduleError(f"the nonce must be exactly {NONCE_BYTES} bytes")
        if not any(master):
            raise KeyScheduleError("the all-zero master secret is refused: use KeySchedule.generate()")
        self._master = bytes(master)
        self.nonce = bytes(nonce)
        self._prk = _hkdf_extract(self.nonce, self._master)  # HKDF-Extract is the same for every label
        self._perms: OrderedDict[tuple[Label, int], npt.NDArray[np.int64]] = OrderedDict()
        self._perms_lock = threading.Lock()  # callers in several threads (a background precompute, …)
        self.claims = NonceClaims()

    @classmethod
    def generate(cls) -> KeySchedule:
        """A schedule with a fresh random master secret and nonce (from the OS CSPRNG)."""
        return cls(secrets.token_bytes(MASTER_SECRET_BYTES), secrets.token_bytes(NONCE_BYTES))

    def for_nonce(self, nonce: bytes) -> KeySchedule:
        """The schedule of another request under the same master secret (sharing :attr:`claims`)."""
        return self._adopt(KeySchedule(self._master, nonce))

    def _adopt(self, child: KS) -> KS:
        """``child`` (a schedule of this master secret) made to share this schedule's claims."""
        child.claims = self.claims
        return child

    @staticmethod
    def new_nonce() -> bytes:
        """A fresh random 16-byte nonce from the OS CSPRNG (never from a global RNG)."""
        return secrets.token_bytes(NONCE_BYTES)

    @property
    def session_id(self) -> str:
        """The public nonce in hex (never anything derived from the master secret)."""
        return self.nonce.hex()

    def key(self, label: Label, length: int = 32) -> bytes:
        """``length`` key bytes for ``label``: HKDF-SHA256(master, salt=nonce, info=label) (its Extract step,
        which does not depend on the label, is computed once per schedule)."""
        return _hkdf_expand(self._prk, encode_label(label), length)

    def stream(self, label: Label) -> KeyStream:
        """An independent byte/float stream for ``label``."""
        return KeyStream(self.key(label))

    def permutation(self, label: Label, n: int) -> npt.NDArray[np.int64]:
        """The permutation of 0..n-1 named by ``label`` (uniform over S_n).

        Derived once per (label, n) and memoised for this request (a request asks for some permutations
        again: a middle block's π when its keys are shared, a last guard block's ρ at every generation step);
        the memo keeps the :data:`PERM_MEMORY` most recently used (one-time permutations, such as a
        generation step's head permutation, no longer accumulate). The value never depends on the memo: an
        evicted permutation is re-derived identically. Thread-safe. The returned array is read-only.
        """
        _check_label(label)
        n = check_int(n, "permutation size", 0, error=KeyScheduleError)
        memo_key = (label, n)
        with self._perms_lock:
            perm = self._perms.get(memo_key)
            if perm is not None:
                self._perms.move_to_end(memo_key)
                return perm
        perm = fisher_yates(n, self.stream((*label, "perm", n)))  # outside the lock: the costly part
        perm.setflags(write=False)
        with self._perms_lock:
            perm = self._perms.setdefault(memo_key, perm)  # derived meanwhile by another thread: same values
            self._perms.move_to_end(memo_key)
            while len(self._perms) > PERM_MEMORY:
                self._perms.popitem(last=False)
        return perm

    def generator(self, label: Label) -> KeyStream:
        """A noise source for ``label``: a stream with ``random(size)``, for ``laplace_noise``."""
        _check_label(label)
        return self.stream((*label, "noise"))

    def __repr__(self) -> str:  # never print the master secret
        return f"KeySchedule(session={self.session_id})"

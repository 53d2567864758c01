"""Tests that kill mutants of :mod:`scx_ref.keys` that survived ``python -m mutation.run keys``
(``mutation/annotations.toml`` names each).

The selected tests pinned every derived value (the vectors of ``test_keys_vectors.py``) and checked that bad
arguments are refused, but read few refusals whole (so a message naming the wrong argument, or the wrong
type, passed), never read zero-length reads and draws, never checked what the permutation memo keeps at its
bound (only that it stays within it), and never measured how far a stream squeezes SHAKE-256 for short reads
(the bytes are the same whatever the squeeze schedule; the cost is not)."""

from __future__ import annotations

import hashlib
import itertools
import math
import types
from typing import Any

import numpy as np
import pytest

import scx_ref.keys as keys_module
from scx_ref.errors import KeyScheduleError, SessionError
from scx_ref.keys import KeySchedule, KeyStream, NonceClaims, hkdf_sha256

from .refusals import Refusal, refusal_test
from .test_key_cache_bound import _Tracked  # counts the permutation streams a schedule opens

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))
KEY = bytes(range(32))


def _stream() -> KeyStream:
    return KeyStream(KEY)


REFUSALS: list[Refusal] = [
    ("read-negative", lambda: _stream().read(-1), KeyScheduleError, "byte count must be >= 0, got -1"),
    ("uint64-negative", lambda: _stream().uint64(-2), KeyScheduleError, "word count must be >= 0, got -2"),
    ("random-negative", lambda: _stream().random(-3), KeyScheduleError, "random size must be >= 0, got -3"),
    (
        "random-shape-float",
        lambda: _stream().random((2, 1.5)),  # type: ignore[arg-type]
        KeyScheduleError,
        "random size must be an integer, got float 1.5",
    ),
    (
        "randbelow-float-bounds",
        lambda: _stream().randbelow([2.5]),
        KeyScheduleError,
        "randbelow bounds must be integers, got dtype float64",
    ),
    (
        "randbelow-bound-2**63",
        lambda: _stream().randbelow([2**63]),
        KeyScheduleError,
        "randbelow bounds must be < 2**63 (int64 draws), got 9223372036854775808",
    ),
    (
        "permutation-negative-size",
        lambda: KeySchedule(MASTER, NONCE).permutation(("pi", 0), -1),
        KeyScheduleError,
        "permutation size must be >= 0, got -1",
    ),
    (
        "hkdf-ikm-str",
        lambda: hkdf_sha256("ikm", b"salt", b"info", 32),  # type: ignore[arg-type]
        KeyScheduleError,
        "HKDF ikm must be bytes, got str",
    ),
    (
        "hkdf-salt-int",
        lambda: hkdf_sha256(b"ikm", 7, b"info", 32),  # type: ignore[arg-type]
        KeyScheduleError,
        "HKDF salt must be bytes, got int",
    ),
    (
        "hkdf-info-list",
        lambda: hkdf_sha256(b"ikm", b"salt", [1], 32),  # type: ignore[arg-type]
        KeyScheduleError,
        "HKDF info must be bytes, got list",
    ),
    (
        "claim-str-nonce",
        lambda: NonceClaims().claim("0123456789abcdef"),  # type: ignore[arg-type]
        KeyScheduleError,
        "a nonce must be bytes, got str",
    ),
    (
        "claims-memory-zero",
        lambda: NonceClaims(0),
        KeyScheduleError,
        "the claim memory must be >= 1, got 0",
    ),
    # a part that is neither str nor int is refused by the label check itself, before the memo (where an
    # unhashable part was a raw TypeError) or the stream's encoding (another message) sees it
    (
        "permutation-list-part",
        lambda: KeySchedule(MASTER, NONCE).permutation(("pi", [1]), 3),  # type: ignore[arg-type]
        KeyScheduleError,
        "a label must be a non-empty tuple of str/int, got ('pi', [1])",
    ),
    (
        "permutation-float-part",
        lambda: KeySchedule(MASTER, NONCE).permutation(("pi", 1.5), 3),  # type: ignore[arg-type]
        KeyScheduleError,
        "a label must be a non-empty tuple of str/int, got ('pi', 1.5)",
    ),
    (
        "generator-bool-part",
        lambda: KeySchedule(MASTER, NONCE).generator(("noise", True)),
        KeyScheduleError,
        "a label must be a non-empty tuple of str/int, got ('noise', True)",
    ),
]

test_key_refusals_are_whole = refusal_test(REFUSALS)


def test_zero_length_reads_and_draws_are_empty_and_read_nothing() -> None:
    """A count of 0 is allowed everywhere (``>= 0``): it returns an empty result and leaves the stream where
    it was, so the next bytes are the stream's first."""
    stream = _stream()
    assert stream.read(0) == b""
    assert stream.uint64(0).shape == (0,) and stream.uint64(0).dtype == np.uint64
    assert stream.random(0).shape == (0,)
    assert stream.random((3, 0)).shape == (3, 0)
    assert stream.read(16) == _stream().read(16)


def test_a_claim_memory_of_one_holds_the_last_nonce_only() -> None:
    """``NonceClaims(1)`` is valid: it refuses the nonce it holds and forgets it once another is claimed."""
    claims = NonceClaims(1)
    claims.claim(b"a" * 16)
    with pytest.raises(SessionError):
        claims.claim(b"a" * 16)
    claims.claim(b"b" * 16)
    assert not claims.claimed(b"a" * 16) and claims.claimed(b"b" * 16)
    claims.claim(b"a" * 16)  # forgotten, so claimable again


def test_the_permutation_memo_keeps_exactly_the_most_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo holds the PERM_MEMORY most recently used permutations, not one fewer, and evicts the least
    recently used: with a bound of 8, eight labels are all held (the same array comes back); a ninth
    evicts the first, never itself."""
    monkeypatch.setattr(keys_module, "PERM_MEMORY", 8)
    ks = KeySchedule(MASTER, NONCE)
    labels = [("perm-memo", t) for t in range(9)]
    first = {label: ks.permutation(label, 5) for label in labels[:8]}
    for label in labels[:8]:  # all eight held, each now moved to the end in the same order
        assert ks.permutation(label, 5) is first[label], label
    newest = ks.permutation(labels[8], 5)
    assert ks.permutation(labels[8], 5) is newest  # the newest is held …
    for label in labels[1:8]:
        assert ks.permutation(label, 5) is first[label], label
    again = ks.permutation(labels[0], 5)  # … and the least recently used was evicted: derived anew
    assert again is not first[labels[0]] and np.array_equal(again, first[labels[0]])


def test_a_memoised_permutation_is_derived_once() -> None:
    """Asking for the same (label, n) again returns the memoised array without deriving it again (a
    derivation is O(n) hashing: a generation re-reads the last guard blocks' ρ every step)."""
    ks = _Tracked(MASTER, NONCE)
    first = ks.permutation(("rho", 2), 64)
    assert ks.derived[("rho", 2)] == 1
    for _ in range(3):
        assert ks.permutation(("rho", 2), 64) is first
    assert ks.derived[("rho", 2)] == 1
    ks.permutation(("rho", 2), 65)  # another size is another permutation
    assert ks.derived[("rho", 2)] == 2


class _CountingShake:
    """``hashlib`` for :mod:`scx_ref.keys` whose SHAKE-256 objects record every squeeze length."""

    def __init__(self) -> None:
        self.squeezes: list[list[int]] = []  # per SHAKE object (one per stream block)

    def shake_256(self, data: bytes) -> Any:
        inner = hashlib.shake_256(data)
        lengths: list[int] = []
        self.squeezes.append(lengths)

        def digest(n: int) -> bytes:
            lengths.append(n)
            return inner.digest(n)

        return types.SimpleNamespace(digest=digest)


def test_byte_by_byte_reads_squeeze_each_block_a_few_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a stream one byte at a time squeezes each 4096-byte block from its first 64 bytes, at least
    doubling each time: at most 1 + log2(4096 / 64) = 7 squeezes and under 2 × 4096 bytes squeezed per
    block (a squeeze to just the bytes read, or without the 64-byte start, costs a SHAKE call per few
    bytes); the bytes are those of one large read."""
    block, first = KeyStream._BLOCK, KeyStream._FIRST
    counter = _CountingShake()
    monkeypatch.setattr(keys_module, "hashlib", types.SimpleNamespace(shake_256=counter.shake_256))
    stream = _stream()
    total = 2 * block + 100
    got = b"".join(stream.read(1) for _ in range(total))
    monkeypatch.undo()
    assert got == _stream().read(total)
    assert len(counter.squeezes) == 3
    for lengths in counter.squeezes:
        assert lengths[0] == first, lengths
        assert len(lengths) <= 1 + math.log2(block // first), lengths
        assert sum(lengths) < 2 * block, lengths
        assert all(b >= 2 * a or b == block for a, b in itertools.pairwise(lengths)), lengths

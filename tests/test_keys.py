"""Key schedule: HKDF test vector, uniformity of derived permutations and of ``randbelow`` (chi-square
tests that are shown to reject deliberately biased samplers), and errors on malformed inputs."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from scx_ref.errors import KeyScheduleError, SCXError
from scx_ref.keys import NONCE_BYTES, KeySchedule, KeyStream, encode_label, fisher_yates, hkdf_sha256

ALPHA = 1e-3
MASTER = bytes(range(32))
NONCE = bytes(range(100, 116))

PermSampler = Callable[[int, int], np.ndarray]  # (n, draw index) -> permutation


def permutation_chi_square(sampler: PermSampler, n: int, draws_per_cell: int = 200) -> float:
    """p-value of a chi-square test that ``sampler`` is uniform over the n! permutations of 0..n-1."""
    index = {p: i for i, p in enumerate(itertools.permutations(range(n)))}
    counts = np.zeros(len(index), dtype=np.int64)
    for t in range(draws_per_cell * len(index)):
        counts[index[tuple(int(v) for v in sampler(n, t))]] += 1
    return float(stats.chisquare(counts).pvalue)


def residue_chi_square(draw: Callable[[int, int], np.ndarray], m: int, count: int = 30_000) -> float:
    """p-value of a chi-square test that ``draw(m, count)`` is uniform over 0..m-1."""
    values = draw(m, count)
    assert values.min() >= 0 and values.max() < m
    return float(stats.chisquare(np.bincount(values, minlength=m)).pvalue)


def _schedule_sampler(n: int, t: int) -> np.ndarray:
    return KeySchedule(MASTER, NONCE).permutation(("chi2", t), n)


def _biased_mod_sampler(seed: int) -> PermSampler:
    """Fisher–Yates with j = word % (i + 1) on 3-bit words: modulo bias (for i + 1 = 3, residues 0 and 1
    get 3/8 each, 2 only 2/8)."""
    rng = np.random.default_rng(seed)

    def sample(n: int, _t: int) -> np.ndarray:
        perm = list(range(n))
        for i in range(n - 1, 0, -1):
            j = int(rng.integers(0, 8)) % (i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        return np.asarray(perm)

    return sample


def _naive_swap_sampler(seed: int) -> PermSampler:
    """The naive shuffle that swaps every position with *any* index: n^n equally likely paths, which n!
    does not divide, so it cannot be uniform."""
    rng = np.random.default_rng(seed)

    def sample(n: int, _t: int) -> np.ndarray:
        perm = list(range(n))
        for i in range(n):
            j = int(rng.integers(0, n))
            perm[i], perm[j] = perm[j], perm[i]
        return np.asarray(perm)

    return sample


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    """hkdf_sha256 reproduces RFC 5869 Appendix A.1."""
    okm = hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.mark.parametrize("n", [2, 3, 4])
def test_derived_permutations_are_uniform(n: int) -> None:
    """Permutations from distinct labels pass a chi-square uniformity test over S_n at α = 0.001
    (n! · 200 draws; fixed master and nonce, so the p-value is reproducible)."""
    p = permutation_chi_square(_schedule_sampler, n)
    assert p > ALPHA, f"uniformity rejected for n={n}: p={p:.3g}"


@pytest.mark.parametrize("make", [_biased_mod_sampler, _naive_swap_sampler])
def test_permutation_chi_square_rejects_biased_samplers(make: Callable[[int], PermSampler]) -> None:
    """The same test function rejects biased shuffles at α = 0.001: the uniformity test has teeth."""
    p = permutation_chi_square(make(11), 4)
    assert p < ALPHA, f"biased sampler not detected: p={p:.3g}"


def test_fisher_yates_is_uniform_with_a_plain_stream() -> None:
    """fisher_yates itself, fed one continuing stream, is uniform over S_4."""
    stream = KeyStream(bytes(32))
    assert permutation_chi_square(lambda n, _t: fisher_yates(n, stream), 4) > ALPHA


@pytest.mark.parametrize("m", [3, 5, 7])
def test_randbelow_is_unbiased(m: int) -> None:
    """KeyStream.randbelow gives each residue 0..m-1 equally often (chi-square, α = 0.001)."""
    stream = KeySchedule(MASTER, NONCE).stream(("randbelow", m))
    p = residue_chi_square(lambda mm, c: stream.randbelow(np.full(c, mm, dtype=np.int64)), m)
    assert p > ALPHA, f"randbelow({m}) rejected: p={p:.3g}"


@pytest.mark.parametrize("m", [3, 5, 7])
def test_residue_chi_square_rejects_modulo_bias(m: int) -> None:
    """word % m on 3-bit words is biased, and the same residue test rejects it."""
    rng = np.random.default_rng(m)
    p = residue_chi_square(lambda mm, c: rng.integers(0, 8, size=c) % mm, m)
    assert p < ALPHA


def test_randbelow_edge_cases() -> None:
    """Bound 1 always gives 0; a mixture of bounds keeps each draw below its own bound."""
    stream = KeyStream(bytes(range(32)))
    assert not np.any(stream.randbelow(np.ones(50, dtype=np.int64)))
    bounds = np.arange(1, 200, dtype=np.int64)
    out = stream.randbelow(bounds)
    assert np.all((out >= 0) & (out < bounds))
    with pytest.raises(KeyScheduleError):
        stream.randbelow(np.array([3, 0]))


def test_stream_is_deterministic_and_read_sizes_do_not_matter() -> None:
    """Reading a stream in pieces gives the same bytes as one read (across the 64 KiB block boundary)."""
    a, b = KeyStream(bytes(32)), KeyStream(bytes(32))
    whole = a.read(70_000)
    pieces = b.read(1) + b.read(65_535) + b.read(4_464)
    assert whole == pieces


def test_stream_bytes_are_shake_blocks_whatever_the_reads() -> None:
    """Byte i of a stream is byte i mod 4096 of SHAKE-256(key ‖ block index), for reads of any sizes
    (short reads squeeze a block only partly; the bytes must not change)."""
    key = bytes(range(32))
    want = b"".join(hashlib.shake_256(key + i.to_bytes(8, "big")).digest(4096) for i in range(3))
    for sizes in ([1] * 70 + [12_218], [63, 1, 64, 4000, 8160], [4096, 4096, 4096], [12_288]):
        stream = KeyStream(key)
        assert b"".join(stream.read(k) for k in sizes) == want[: sum(sizes)]


def test_derived_keys_are_pinned() -> None:
    """The schedule's outputs (permutations of many sizes, stream bytes, uniforms, unbiased integers,
    label keys) are fixed: a change of the derivation — not only of its speed — fails here."""
    ks = KeySchedule(bytes(range(32)), bytes(range(100, 116)))
    h = hashlib.sha256()
    for n in (0, 1, 2, 3, 7, 64, 130, 515, 2050):
        h.update(ks.permutation(("tok", 3, "qkv"), n).astype("<i8").tobytes())
    stream = ks.stream(("decoy", 1, "o"))
    for size in (1, 7, 100, 4096, 5000, 3):
        h.update(stream.read(size))
    h.update(np.asarray(ks.generator(("alpha", 0, "qkv")).random((3, 5))).tobytes())
    h.update(ks.stream(("x",)).randbelow(np.array([1, 2, 3, 1000, 2**40])).astype("<i8").tobytes())
    h.update(ks.key(("commit", 4)) + ks.key(("long",), 100))
    assert h.hexdigest() == "3d3c07eea9744f9a2c5322ad052efe2ac5ca0cb8ae1262b2a931c904a242fa29"


@pytest.mark.parametrize(
    ("master", "nonce"),
    [
        (bytes(31), bytes(16)),
        (bytes(33), bytes(16)),
        (bytes(32), bytes(15)),
        (bytes(32), bytes(17)),
        ("x" * 32, bytes(16)),
        (bytes(32), None),
    ],
)
def test_malformed_secret_or_nonce_is_rejected(master: object, nonce: object) -> None:
    with pytest.raises(KeyScheduleError, match="exactly"):
        KeySchedule(master, nonce)  # type: ignore[arg-type]


@pytest.mark.parametrize("label", [(), ["a", 1], ("a", -1), ("a", 1.5), ("a", True), ("a", None), "a"])
def test_malformed_label_is_rejected(label: object) -> None:
    with pytest.raises(KeyScheduleError):
        encode_label(label)  # type: ignore[arg-type]
    with pytest.raises(SCXError):
        KeySchedule(MASTER, NONCE).key(label)  # type: ignore[arg-type]


def test_negative_permutation_size_and_bad_stream_key() -> None:
    with pytest.raises(KeyScheduleError):
        KeySchedule(MASTER, NONCE).permutation(("x",), -1)
    with pytest.raises(KeyScheduleError):
        KeyStream(bytes(16))
    with pytest.raises(KeyScheduleError):
        hkdf_sha256(b"k", b"s", b"i", 0)


def test_repr_and_session_id_never_show_the_master_secret() -> None:
    ks = KeySchedule(MASTER, NONCE)
    assert MASTER.hex() not in repr(ks) and ks.session_id == NONCE.hex()
    fresh = KeySchedule.generate()
    assert fresh.key(("a",)) != KeySchedule.generate().key(("a",))


class _ScriptedStream(KeyStream):
    """A KeyStream whose 64-bit words are given, to drive randbelow's acceptance test word by word."""

    def __init__(self, words: list[int]) -> None:
        super().__init__(bytes(32))
        self._words = list(words)

    def uint64(self, count: int) -> np.ndarray:
        out, self._words = self._words[:count], self._words[count:]
        assert len(out) == count, "the script ran out of words"
        return np.asarray(out, dtype=np.uint64)


def test_randbelow_rejection_boundary() -> None:
    """The acceptance test at its edge, word by word. m = 3: 2⁶⁴ = 3·⌊2⁶⁴/3⌋ + 1, so 2⁶⁴ − 2 is the largest
    accepted word and 2⁶⁴ − 1 alone is rejected. m = 2⁶³ − 1: ⌊2⁶⁴/m⌋ = 2, so 2⁶⁴ − 3 is accepted and
    2⁶⁴ − 2, 2⁶⁴ − 1 are rejected. Rejected positions are redrawn, in order, from the following words."""
    top = 2**64 - 1
    stream = _ScriptedStream([top - 1, top, 7, top, 10])
    assert stream.randbelow(np.array([3, 3, 5], dtype=np.int64)).tolist() == [(top - 1) % 3, 10 % 3, 7 % 5]
    m = 2**63 - 1
    stream = _ScriptedStream([top - 1, top - 2, top, 5])
    assert stream.randbelow(np.array([m, m], dtype=np.int64)).tolist() == [5, (top - 2) % m]
    assert stream.uint64(0).size == 0 and not stream._words  # every scripted word was used, no more


def test_permutations_are_memoised_per_label_and_size_and_read_only() -> None:
    """One schedule answers several (label, n) without mixing them up, returns the memoised (read-only)
    array on a repeat call, and agrees with a fresh schedule."""
    ks = KeySchedule(MASTER, NONCE)
    a, b, c = (
        ks.permutation(("tok", 0, "qkv"), 12),
        ks.permutation(("tok", 1, "qkv"), 12),
        ks.permutation(("tok", 0, "qkv"), 13),
    )
    assert ks.permutation(("tok", 0, "qkv"), 12) is a
    for label, n, perm in (
        (("tok", 0, "qkv"), 12, a),
        (("tok", 1, "qkv"), 12, b),
        (("tok", 0, "qkv"), 13, c),
    ):
        assert np.array_equal(KeySchedule(MASTER, NONCE).permutation(label, n), perm)
    assert not np.array_equal(a, b) and c.shape == (13,)
    assert not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 0


def test_fresh_nonces_and_schedules() -> None:
    """new_nonce() is NONCE_BYTES long and fresh each time; generate() makes a valid, fresh schedule."""
    n1, n2 = KeySchedule.new_nonce(), KeySchedule.new_nonce()
    assert len(n1) == len(n2) == NONCE_BYTES and n1 != n2
    ks = KeySchedule.generate()
    assert len(ks.nonce) == NONCE_BYTES and ks.for_nonce(n1).nonce == n1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: hkdf_sha256(b"k", b"s", b"i", 0), r"^HKDF output length must lie in \[1, 8160\], got 0$"),
        (
            lambda: hkdf_sha256(b"k", b"s", b"i", 255 * 32 + 1),
            r"^HKDF output length must lie in \[1, 8160\], got 8161$",
        ),
        (lambda: encode_label(()), r"^a label must be a non-empty tuple of str/int, got \(\)$"),
        (lambda: encode_label(("a", 1.5)), r"^label parts must be str or int, got 1\.5 in \('a', 1\.5\)$"),
        (lambda: encode_label(("a", -2)), r"^integer label parts must be >= 0, got -2$"),
        (lambda: KeyStream(bytes(31)), r"^a stream key must be 32 bytes$"),
        (lambda: KeyStream(bytes(32)).randbelow(np.array([0])), r"^randbelow bounds must be >= 1$"),
        (lambda: fisher_yates(-3, KeyStream(bytes(32))), r"^permutation size must be >= 0, got -3$"),
    ],
    ids=[
        "hkdf-length-0",
        "hkdf-length-8161",
        "label-empty",
        "label-part-float",
        "label-part-negative",
        "stream-key-31-bytes",
        "randbelow-bound-0",
        "fisher-yates-negative-n",
    ],
)
def test_key_schedule_error_messages(call: Callable[[], object], message: str) -> None:
    """Each malformed input is named in its error (the messages are what a user sees)."""
    with pytest.raises(KeyScheduleError, match=message):
        call()


def test_hkdf_accepts_lengths_1_and_8160() -> None:
    """The two ends of RFC 5869's range 1..255·HashLen are accepted (and give prefixes of each other)."""
    longest = hkdf_sha256(MASTER, NONCE, b"info", 255 * 32)
    assert len(longest) == 8160 and hkdf_sha256(MASTER, NONCE, b"info", 1) == longest[:1]


def test_nonce_claims_once_per_nonce_within_a_bounded_memory() -> None:
    """NonceClaims: a nonce is claimed once (the refusal says why), the oldest claims are forgotten first
    when more than ``memory`` are held, and a schedule's claims are shared by every for_nonce schedule."""
    from scx_ref.errors import SessionError
    from scx_ref.keys import CLAIM_MEMORY, NonceClaims

    claims = NonceClaims(memory=2)
    a, b, c = (bytes([i]) * NONCE_BYTES for i in range(3))
    assert not claims.claimed(a)
    claims.claim(a)
    assert claims.claimed(a) and not claims.claimed(b)
    with pytest.raises(SessionError) as info:
        claims.claim(a)
    assert str(info.value) == (
        "nonce reused: a (master secret, nonce) pair drives one session only; "
        "every prompt needs a fresh nonce"
    )
    claims.claim(b)
    assert claims.claimed(a) and claims.claimed(b)  # exactly `memory` claims are held
    claims.claim(c)
    assert not claims.claimed(a) and claims.claimed(b) and claims.claimed(c)  # the oldest one left
    claims.claim(a)  # forgotten, so claimable again
    assert NonceClaims()._memory == CLAIM_MEMORY

    ks = KeySchedule(bytes(range(1, 33)), a)
    other = ks.for_nonce(b)
    assert isinstance(ks.claims, NonceClaims) and other.claims is ks.claims
    other.claims.claim(c)
    assert ks.claims.claimed(c) and not KeySchedule(bytes(range(1, 33)), a).claims.claimed(c)
    with pytest.raises(KeyScheduleError) as zero:
        KeySchedule(bytes(32), a)
    assert str(zero.value) == "the all-zero master secret is refused: use KeySchedule.generate()"

"""Known-answer vectors for the key schedule (DESIGN §3).

Client and server share ``scx_ref.keys``, so a change to a label ("perm", "noise"), to the label encoding,
to the stream's block counter or to the float conversion would go unnoticed by every round-trip test: both
sides would change together. These vectors pin the outputs for a fixed master secret, nonce and the labels
the protocol uses. They were computed once from the implementation and are *not* only self-consistent:
:func:`test_vectors_match_independent_implementations` recomputes every one of them from the specification
in the module docstring with independent code — the ``cryptography`` package's HKDF and SHAKE-256 and a
pure-Python label encoding, rejection sampler and Fisher–Yates — and RFC 5869's published test cases pin
HKDF itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scx_ref.keys import KeySchedule, KeyStream, encode_label, fisher_yates, hkdf_sha256
from scx_ref.transforms import laplace_noise

MASTER = bytes(range(32))
NONCE = bytes(range(100, 116))

# canonical label encodings: b"scx_ref/v1", then per part a tag (s/i), a 4-byte big-endian length, the bytes
LABEL_VECTORS = {
    ("tok", 0, "qkv"): "7363785f7265662f76317300000003746f6b6900000001007300000003716b76",
    (0,): "7363785f7265662f7631690000000100",
    (255,): "7363785f7265662f76316900000001ff",
    (256,): "7363785f7265662f763169000000020100",
    ("é",): "7363785f7265662f76317300000002c3a9",
}
# HKDF-SHA256(MASTER, salt=NONCE, info=encode_label(label)), 32 bytes (64 for the "commit" label)
KEY_VECTORS = {
    ("commit", 0): "47fa9260fba11a40c2c4b278f9c6eb721ee788af4580f3e0a3e084a5a6a7c525",
    ("tok", 0, "qkv", "perm", 10): "b6e1e35e7cd8dc9f4bfed307e7f4a81fb9346325351bec71befde4f86ba1a921",
    ("alpha", 0, "qkv", "noise"): "c2049dc79100b1a66e987847e44357aa00b8fb6dd95c829416d015dd11848b66",
}
COMMIT_64 = (
    "47fa9260fba11a40c2c4b278f9c6eb721ee788af4580f3e0a3e084a5a6a7c525"
    "bfc921fe481a32eb000762578dd3eb320a76cd9f832cd6817f2eeefb4c663c8a"
)
# the stream of the permutation key: bytes 0..15 (block 0) and 4096..4111 (block 1)
STREAM_HEAD = "68967b1bfc0c23a475cdedc9f9412256"
STREAM_BLOCK1 = "3e295c320fcf0eeca2fc9b13d3d138c8"
# permutation(("tok", 0, "qkv"), n): all of n = 10, the first 12 values of n = 1000
PERM_10 = [3, 5, 6, 1, 7, 9, 4, 8, 0, 2]
PERM_1000_HEAD = [890, 157, 834, 233, 891, 255, 576, 17, 537, 477, 848, 452]
# generator(("alpha", 0, "qkv")): its first four uniforms, and Laplace(0, β = 1) noise drawn from a fresh copy
NOISE_UNIFORMS = [0.5079579378432102, 0.8822311008159619, 0.578757201810491, 0.24899088971130245]
NOISE_LAPLACE_BETA1 = [0.016043893395535348, 1.4458838757803054, 0.17139871318779537, -0.6971917901316327]


def test_label_encoding_vectors() -> None:
    for label, want in LABEL_VECTORS.items():
        assert encode_label(label).hex() == want, label


def test_key_vectors() -> None:
    ks = KeySchedule(MASTER, NONCE)
    for label, want in KEY_VECTORS.items():
        assert ks.key(label).hex() == want, label
    assert ks.key(("commit", 0), 64).hex() == COMMIT_64


def test_stream_vectors_across_a_block_boundary() -> None:
    stream = KeySchedule(MASTER, NONCE).stream(("tok", 0, "qkv", "perm", 10))
    data = stream.read(4096 + 16)
    assert data[:16].hex() == STREAM_HEAD
    assert data[4096:].hex() == STREAM_BLOCK1


def test_permutation_vectors() -> None:
    """The "perm" label and the size are part of the permutation's key; the values are pinned."""
    ks = KeySchedule(MASTER, NONCE)
    assert ks.permutation(("tok", 0, "qkv"), 10).tolist() == PERM_10
    assert ks.permutation(("tok", 0, "qkv"), 1000)[:12].tolist() == PERM_1000_HEAD


def test_noise_stream_vectors_at_beta_1() -> None:
    """The "noise" label is pinned, and so is Laplace noise at β = 1 (not zeros, not another scale)."""
    ks = KeySchedule(MASTER, NONCE)
    assert ks.generator(("alpha", 0, "qkv")).random(4).tolist() == NOISE_UNIFORMS
    eta = laplace_noise((4,), 1.0, ks.generator(("alpha", 0, "qkv")))
    assert eta.tolist() == pytest.approx(NOISE_LAPLACE_BETA1, rel=1e-14)


def test_scalar_and_shaped_draws_consume_the_stream_in_order() -> None:
    """random() is a Python float (one word), random(n)/random(shape) continue the same word sequence."""
    gen = KeySchedule(MASTER, NONCE).generator(("alpha", 0, "qkv"))
    first = gen.random()
    assert type(first) is float and first == NOISE_UNIFORMS[0]
    assert gen.random(1).tolist() == NOISE_UNIFORMS[1:2]
    block = gen.random((1, 2))
    assert block.shape == (1, 2) and block.ravel().tolist() == NOISE_UNIFORMS[2:]


# ----------------------------------------------------------------------------- independent implementations


def _encode_label_reference(label: tuple[str | int, ...]) -> bytes:
    out = b"scx_ref/v1"
    for part in label:
        if isinstance(part, str):
            raw = part.encode("utf-8")
            out += b"s" + _u32(len(raw)) + raw
        else:
            raw = part.to_bytes(max(1, math.ceil(part.bit_length() / 8)), "big")
            out += b"i" + _u32(len(raw)) + raw
    return out


def _u32(n: int) -> bytes:
    return bytes([(n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF])


class _ReferenceStream:
    """SHAKE-256(key ‖ 8-byte big-endian block counter), 4096-byte blocks, by the ``cryptography`` package."""

    def __init__(self, key: bytes) -> None:
        self.key, self.data, self.block = key, b"", 0

    def read(self, n: int) -> bytes:
        from cryptography.hazmat.primitives import hashes

        while len(self.data) < n:
            h = hashes.Hash(hashes.SHAKE256(digest_size=4096))
            h.update(self.key + self.block.to_bytes(8, "big"))
            self.data += h.finalize()
            self.block += 1
        out, self.data = self.data[:n], self.data[n:]
        return out

    def words(self, count: int) -> list[int]:
        raw = self.read(8 * count)
        return [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(count)]

    def uniforms(self, count: int) -> list[float]:
        return [(w >> 11) / 2.0**53 for w in self.words(count)]

    def randbelow(self, bounds: list[int]) -> list[int]:
        """Accept u when u < m·⌊2⁶⁴/m⌋, value u mod m; rejected positions redrawn together, in order."""
        out = [0] * len(bounds)
        todo = list(range(len(bounds)))
        while todo:
            words = self.words(len(todo))
            rejected = []
            for pos, u in zip(todo, words, strict=True):
                m = bounds[pos]
                if u < m * (2**64 // m):
                    out[pos] = u % m
                else:
                    rejected.append(pos)
            todo = rejected
        return out

    def permutation(self, n: int) -> list[int]:
        perm = list(range(n))
        draws = self.randbelow(list(range(n, 1, -1)))
        for i, j in zip(range(n - 1, 0, -1), draws, strict=True):
            perm[i], perm[j] = perm[j], perm[i]
        return perm


def test_vectors_match_independent_implementations() -> None:
    """Every vector above, recomputed without scx_ref.keys: cryptography's HKDF and SHAKE-256, pure Python."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def kdf(label: tuple[str | int, ...], length: int = 32) -> bytes:
        info = _encode_label_reference(label)
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=NONCE, info=info).derive(MASTER)

    for label, want in LABEL_VECTORS.items():
        assert _encode_label_reference(label).hex() == want
    for label, want in KEY_VECTORS.items():
        assert kdf(label).hex() == want
    assert kdf(("commit", 0), 64).hex() == COMMIT_64
    stream = _ReferenceStream(kdf(("tok", 0, "qkv", "perm", 10))).read(4096 + 16)
    assert (stream[:16].hex(), stream[4096:].hex()) == (STREAM_HEAD, STREAM_BLOCK1)
    assert _ReferenceStream(kdf(("tok", 0, "qkv", "perm", 10))).permutation(10) == PERM_10
    assert _ReferenceStream(kdf(("tok", 0, "qkv", "perm", 1000))).permutation(1000)[:12] == PERM_1000_HEAD
    uniforms = _ReferenceStream(kdf(("alpha", 0, "qkv", "noise"))).uniforms(4)
    assert uniforms == NOISE_UNIFORMS
    # η = −β·sign(u − ½)·ln(1 − 2|u − ½|), β = 1
    laplace = [-math.copysign(1.0, u - 0.5) * math.log1p(-2.0 * abs(u - 0.5)) for u in uniforms]
    assert laplace == pytest.approx(NOISE_LAPLACE_BETA1, rel=1e-14)


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 255 * 32])
def test_hkdf_matches_cryptography(length: int) -> None:
    """hkdf_sha256 equals cryptography's HKDF for every length from 1 to the RFC maximum 255·32."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    ikm, salt, info = MASTER, NONCE, encode_label(("tok", 3, "o"))
    want = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
    assert hkdf_sha256(ikm, salt, info, length) == want


def test_hkdf_matches_rfc5869_test_cases_2_and_3() -> None:
    """RFC 5869 Appendix A.2 (long inputs, L = 82) and A.3 (empty salt and info)."""
    okm = hkdf_sha256(bytes(range(0x00, 0x50)), bytes(range(0x60, 0xB0)), bytes(range(0xB0, 0x100)), 82)
    assert okm.hex() == (
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87"
    )
    okm = hkdf_sha256(bytes([0x0B] * 22), b"", b"", 42)
    assert okm.hex() == "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"


def test_randbelow_matches_reference_where_rejection_is_frequent() -> None:
    """Bounds near 2⁶² reject about a quarter of the words, so the redraw path and exact int64 results
    (above 2⁵³, where a float round trip would lose bits) are exercised against the pure-Python sampler."""
    pytest.importorskip("cryptography")
    key = bytes(range(7, 39))
    bounds = [2**62 + 1, 2**62 + 12345, 3 * 2**60 + 7, 2**63 - 1, 5, 1] * 8
    got = KeyStream(key).randbelow(np.asarray(bounds, dtype=np.int64)).tolist()
    assert got == _ReferenceStream(key).randbelow(bounds)


def test_fisher_yates_matches_reference_for_a_plain_stream() -> None:
    pytest.importorskip("cryptography")
    key = bytes(32)
    for n in (0, 1, 2, 3, 17):
        assert fisher_yates(n, KeyStream(key)).tolist() == _ReferenceStream(key).permutation(n)

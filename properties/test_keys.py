"""Hypothesis properties of the key schedule (DESIGN §3): determinism, independence of labels and
nonces, an injective label encoding, and valid permutations for every n (0 and 1 included)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from properties.strategies import key_labels, master_secrets, nonces
from scx_ref.keys import KeySchedule, encode_label, fisher_yates

labels = key_labels()
secrets_32 = master_secrets()  # never the refused all-zero secret
nonces_16 = nonces()


@given(master=secrets_32, nonce=nonces_16, label=labels, n=st.integers(0, 40))
def test_same_inputs_same_keys(master: bytes, nonce: bytes, label: tuple[str | int, ...], n: int) -> None:
    """The same (master, nonce, label) always gives the same key, stream and permutation (statelessness)."""
    a, b = KeySchedule(master, nonce), KeySchedule(master, nonce)
    assert a.key(label) == b.key(label)
    assert a.stream(label).read(100) == b.stream(label).read(100)
    assert np.array_equal(a.permutation(label, n), b.permutation(label, n))
    assert np.array_equal(a.generator(label).random(7), b.generator(label).random(7))


@given(master=secrets_32, nonce=nonces_16, l1=labels, l2=labels)
def test_different_labels_give_different_keys(
    master: bytes, nonce: bytes, l1: tuple[str | int, ...], l2: tuple[str | int, ...]
) -> None:
    """Different labels → different encodings → different keys (HKDF info differs)."""
    assume(l1 != l2)
    assert encode_label(l1) != encode_label(l2)
    ks = KeySchedule(master, nonce)
    assert ks.key(l1) != ks.key(l2)


@given(master=secrets_32, n1=nonces_16, n2=nonces_16, label=labels)
def test_different_nonces_or_masters_give_different_keys(
    master: bytes, n1: bytes, n2: bytes, label: tuple[str | int, ...]
) -> None:
    """Different nonces (requests) → different keys; a different master secret → different keys."""
    assume(n1 != n2)
    ks = KeySchedule(master, n1)
    assert ks.key(label) != ks.for_nonce(n2).key(label)
    flip = 1 if any(master[1:]) or master[0] != 1 else 3  # never the refused all-zero secret
    other = bytes([master[0] ^ flip]) + master[1:]
    assert ks.key(label) != KeySchedule(other, n1).key(label)


def test_label_encoding_is_injective_on_tricky_cases() -> None:
    """Concatenation, type and length ambiguities are all resolved by the encoding."""
    cases = [
        ("a", 1),
        ("a1",),
        ("a", "1"),
        ("a1", ""),
        ("", "a1"),
        (1,),
        ("1",),
        (0,),
        (256,),
        (1, 0),
        ("tok", 1, "qkv"),
        ("tok", "1qkv"),
        ("tok1", "qkv"),
    ]
    encodings = {encode_label(c) for c in cases}
    assert len(encodings) == len(cases)


@given(master=secrets_32, nonce=nonces_16, label=labels, n=st.integers(0, 300))
def test_every_output_is_a_valid_permutation(
    master: bytes, nonce: bytes, label: tuple[str | int, ...], n: int
) -> None:
    """permutation(label, n) is a permutation of 0..n-1 (int64) for every n, including 0 and 1."""
    perm = KeySchedule(master, nonce).permutation(label, n)
    assert perm.dtype == np.int64 and perm.shape == (n,)
    assert np.array_equal(np.sort(perm), np.arange(n))


@given(master=secrets_32, nonce=nonces_16, label=labels, n=st.integers(0, 40))
def test_permutations_of_different_sizes_are_separate_keys(
    master: bytes, nonce: bytes, label: tuple[str | int, ...], n: int
) -> None:
    """The size is part of the permutation's label: ``permutation(label, n)`` is Fisher–Yates on the stream
    of ``(*label, "perm", n)`` (the label the test vectors pin), a stream separate from size n + 1's; and a
    stream's floats lie in [0, 1)."""
    ks = KeySchedule(master, nonce)
    perm = ks.permutation(label, n)
    assert np.array_equal(perm, fisher_yates(n, ks.stream((*label, "perm", n))))
    assert ks.stream((*label, "perm", n)).read(32) != ks.stream((*label, "perm", n + 1)).read(32)
    u = ks.generator(label).random((4, 5))
    assert u.shape == (4, 5) and np.all((u >= 0) & (u < 1))

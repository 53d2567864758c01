"""Edges of the key schedule's samplers, the label encoding and the numpy reference ops.

Each test names the defect it guards: a 2-D or 0-d ``randbelow`` raised IndexError after reading the
stream, a bound >= 2**63 gave negative draws, a lone surrogate in a label raised UnicodeEncodeError, a
negative permutation size was reported as a label part, an additive (float) attention mask was read as
booleans, and ``rms_norm``/``softmax``/``embed``/``qkv`` let raw numpy errors through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref import ops
from scx_ref.errors import DTypeError, KeyScheduleError, ShapeError
from scx_ref.keys import KeySchedule, KeyStream, encode_label
from scx_ref.transforms import (
    HeadPermutation,
    decode_rows,
    encode_rows,
    head_permute,
    head_unpermute,
    reencode_sum,
)

from .tiny import tiny_weights

MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))


def _stream() -> KeyStream:
    return KeyStream(bytes(range(32)))


# -- keys.py ---------------------------------------------------------------------------------------


def test_randbelow_keeps_the_bounds_shape_and_draws_as_the_flat_bounds() -> None:
    """Bounds of any shape give draws of that shape: the same draws, in row-major order, as the flat
    bounds (a 2-D array raised IndexError after reading the stream, a 0-d bound too)."""
    bounds = np.array([[3, 7, 1], [2**40, 5, 9]], dtype=np.int64)
    out = _stream().randbelow(bounds)
    assert out.shape == bounds.shape and out.dtype == np.int64
    assert np.array_equal(out.reshape(-1), _stream().randbelow(bounds.reshape(-1)))
    assert np.all((out >= 0) & (out < bounds))
    scalar = _stream().randbelow(np.int64(6))
    assert scalar.shape == () and int(scalar) == int(_stream().randbelow(np.array([6]))[0])


@pytest.mark.parametrize("bound", [2**63, 2**64 - 1])
def test_randbelow_refuses_bounds_past_int64_and_reads_nothing(bound: int) -> None:
    """A bound of 2**63 or more gave int64 draws that wrapped negative (outside [0, m)); it is refused
    before any stream byte is read."""
    stream = _stream()
    with pytest.raises(KeyScheduleError, match="2\\*\\*63"):
        stream.randbelow(np.array([5, bound], dtype=np.uint64))
    assert stream.read(16) == _stream().read(16)
    top = np.array([2**63 - 1] * 8, dtype=np.uint64)  # the largest bound still taken
    assert np.all(_stream().randbelow(top) >= 0)


@pytest.mark.parametrize("label", [("\ud800",), ("tok", "a\udfffb", 3)])
def test_a_label_with_a_lone_surrogate_is_a_key_schedule_error(label: tuple[Any, ...]) -> None:
    """Text with no UTF-8 encoding raised UnicodeEncodeError from every derivation, not a project error."""
    ks = KeySchedule(MASTER, NONCE)
    with pytest.raises(KeyScheduleError, match="Unicode"):
        encode_label(label)
    for derive in (lambda: ks.key(label), lambda: ks.permutation(label, 4), lambda: ks.generator(label)):
        with pytest.raises(KeyScheduleError):
            derive()
    assert ks.permutation(("tok",), 4).shape == (4,)  # the schedule still derives (nothing memoised)


def test_a_negative_permutation_size_is_refused_as_a_size() -> None:
    """permutation(label, -1) was refused by the label encoding ("integer label parts must be >= 0"):
    the message now names the argument the caller got wrong."""
    with pytest.raises(KeyScheduleError, match="permutation size must be >= 0"):
        KeySchedule(MASTER, NONCE).permutation(("tok", 0, "qkv"), -1)


# -- ops.py ----------------------------------------------------------------------------------------


def _qkv(seed: int = 0) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 2, 2)), rng.standard_normal((3, 2, 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_attention_refuses_a_mask_that_is_not_boolean(dtype: Any) -> None:
    """Hugging Face's additive mask (0 where a key may be seen, −inf where not) was read as truth values:
    attention then attended exactly to the barred keys, silently (causal: row 0 saw keys 1 and 2 only)."""
    q, k, v = _qkv()
    causal = ops.causal_mask(3, 3)
    additive = np.where(causal, 0.0, -np.inf).astype(dtype) if dtype != np.int64 else causal.astype(dtype)
    with pytest.raises(DTypeError, match="boolean"):
        ops.attention(q, k, v, mask=additive)


def test_attention_takes_a_nested_list_of_booleans_as_the_mask() -> None:
    """A list-of-lists mask raised TypeError (``list[None, None]``); it is the mask its booleans hold."""
    q, k, v = _qkv(1)
    causal = ops.causal_mask(3, 3)
    got = ops.attention(q, k, v, mask=causal.tolist())
    assert np.array_equal(got, ops.attention(q, k, v, mask=causal))


def test_rms_norm_and_softmax_refuse_arrays_that_are_not_real_numbers() -> None:
    """Strings reached numpy's ufuncs (TypeError / UFuncTypeError); silu and attention refused them."""
    with pytest.raises(DTypeError, match="RMSNorm"):
        ops.rms_norm(np.array([["a", "b"]]), np.ones(2), 1e-6)
    with pytest.raises(DTypeError, match="softmax"):
        ops.softmax(np.array([["a", "b"]]))
    with pytest.raises(DTypeError, match="softmax"):
        ops.softmax(np.array([[1 + 2j, 0j]]))


def test_embed_refuses_a_table_that_is_not_vocabulary_by_d() -> None:
    """A list table raised AttributeError (``.shape``); a 1-D table returned scalars as rows."""
    with pytest.raises(ShapeError, match="embedding table"):
        ops.embed([0], np.arange(4.0))
    assert np.array_equal(ops.embed([1, 0], [[1.0, 2.0], [3.0, 4.0]]), [[3.0, 4.0], [1.0, 2.0]])


@pytest.mark.parametrize("heads", [(-4, -2, -4), (4, 2, 4.0)])
def test_qkv_refuses_head_counts_that_are_not_positive_integers(heads: tuple[Any, Any, Any]) -> None:
    """Negative head counts (or a float head_dim) whose products matched the projections' widths (16 and
    8 in the tiny model) reached reshape: a raw ValueError / TypeError."""
    layer = tiny_weights(0).layers[0]
    with pytest.raises(ShapeError):
        ops.qkv(np.ones((1, 16)), layer, *heads)
    assert [t.shape for t in ops.qkv(np.ones((1, 16)), layer, 4, 2, 4)] == [(1, 4, 4), (1, 2, 4), (1, 2, 4)]


# -- transforms.py: the edges of DESIGN §4 that already held (guards) ------------------------------


@pytest.mark.parametrize("n, r", [(1, 0), (0, 2), (1, 3), (0, 0)])
def test_row_transforms_at_one_token_no_decoys_and_no_rows_keep_float32(n: int, r: int) -> None:
    """T1+T2 with n = 1, r = 0 and empty inputs: float32 in, float32 out, decode(encode(X)) = X, and the
    residual re-encode equals decode–add–encode."""
    rng = np.random.default_rng(n * 10 + r)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = rng.standard_normal((n, 3)).astype(np.float32)
    decoys = rng.standard_normal((r, 3)).astype(np.float32)
    pi = rng.permutation(n + r)
    enc: npt.NDArray[Any] = encode_rows(x, decoys, pi)
    assert enc.dtype == np.float32 and enc.shape == (n + r, 3)
    assert np.array_equal(decode_rows(enc, pi, n), x)
    enc_y: npt.NDArray[Any] = encode_rows(y, decoys, pi)
    summed: npt.NDArray[Any] = reencode_sum(enc, pi, enc_y, pi, decoys, pi)
    assert summed.dtype == np.float32
    assert np.array_equal(summed, encode_rows(x + y, decoys, pi))


@pytest.mark.parametrize("kv, group, dh", [(1, 1, 2), (1, 4, 3), (2, 3, 1)])
def test_head_permutation_with_one_kv_head_or_gqa_keeps_float32_and_inverts(
    kv: int, group: int, dh: int
) -> None:
    """T3 with one KV head, a GQA ratio > 1 and d_h = 1: float32 stays float32 and the attention identity
    Attn(QP, KP, VP) = Attn(Q, K, V)P holds (a causal mask, a non-default scale)."""
    rng = np.random.default_rng(kv * 100 + group * 10 + dh)
    perm = HeadPermutation(rng.permutation(kv), np.stack([rng.permutation(dh) for _ in range(kv)]))
    q = rng.standard_normal((4, kv * group, dh)).astype(np.float32)
    k = rng.standard_normal((4, kv, dh)).astype(np.float32)
    v = rng.standard_normal((4, kv, dh)).astype(np.float32)
    qp: npt.NDArray[Any] = head_permute(q, perm, group)
    kp: npt.NDArray[Any] = head_permute(k, perm)
    vp: npt.NDArray[Any] = head_permute(v, perm)
    assert qp.dtype == kp.dtype == vp.dtype == np.float32
    assert np.array_equal(head_unpermute(qp, perm, group), q)
    mask = ops.causal_mask(4, 4)
    plain = ops.attention(q, k, v, mask=mask, scale=0.7)
    enc = ops.attention(qp, kp, vp, mask=mask, scale=0.7)
    assert enc.dtype == np.float32
    np.testing.assert_allclose(head_unpermute(enc, perm, group), plain, rtol=1e-6, atol=1e-6)

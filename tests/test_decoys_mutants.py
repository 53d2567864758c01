"""Tests that kill mutants of :mod:`scx_ref.protocol.decoys` that survived ``python -m mutation.run decoys``
(mutation/REPORT_decoys.md): each checks a documented property of the decoy policies or a value computed by
hand from the docstring's rule — the bounds and names of every argument check, the default lengths, the
exact integer counts of ``unigram_weights`` and ``unigram_counts(smoothing=)`` at their boundaries, the
inverse-CDF map of the unigram draw, the pool's checks and its zero-count and epoch paths."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule, KeyStream
from scx_ref.protocol import decoys as decoys_module
from scx_ref.protocol.decoys import (
    CalibrationPool,
    GaussianDecoys,
    configured_unigram,
    default_public_tokens,
    secret_calibration_tokens,
    unigram_counts,
    unigram_weights,
)
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))
INT64_MAX = 2**63 - 1


def _keys() -> KeySchedule:
    return KeySchedule(MASTER, NONCE)


def _stream(label: str = "mutants") -> KeyStream:
    return _keys().stream((label,))


# -- default_public_tokens / secret_calibration_tokens: argument checks and defaults ------------------------


@pytest.mark.parametrize(
    ("call", "name", "bound"),
    [
        (lambda: default_public_tokens(0, 8), "vocab_size", ">= 1"),
        (lambda: default_public_tokens(4, -1), "length", ">= 0"),
        (lambda: secret_calibration_tokens(_keys(), 0, 8), "vocab_size", ">= 1"),
        (lambda: secret_calibration_tokens(_keys(), 4, 0), "length", ">= 1"),
        (lambda: secret_calibration_tokens(_keys(), 4, 8, epoch=-1), "epoch", ">= 0"),
        (lambda: unigram_counts(np.array([0]), 0), "vocab_size", ">= 1"),
    ],
    ids=["public-vocab", "public-length", "secret-vocab", "secret-length", "secret-epoch", "counts-vocab"],
)
def test_refusals_name_the_argument_and_its_bound(call: Any, name: str, bound: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name} must be {bound}"):
        call()


def test_the_least_sizes_the_docstrings_allow_are_accepted() -> None:
    """vocab_size 1 (every token 0), length 0 for the public text and 1 for the secret one, epoch 0."""
    assert default_public_tokens(1, 5).tolist() == [0] * 5
    empty = default_public_tokens(7, 0)
    assert empty.shape == (0,) and empty.dtype == np.int64
    assert secret_calibration_tokens(_keys(), 1, 3).tolist() == [0, 0, 0]
    one = secret_calibration_tokens(_keys(), 9, 1, epoch=0)
    assert one.shape == (1,) and 0 <= int(one[0]) < 9


def test_texts_are_256_int64_tokens_over_the_whole_vocabulary_by_default() -> None:
    """Both texts are 256 tokens long by default, int64, and draw from all of [0, V): token 0 included
    (a draw from [1, V) never gives it; 256 draws over V = 2 miss a token with probability 2⁻²⁵⁵)."""
    public = default_public_tokens(2)
    assert public.shape == (256,) and public.dtype == np.int64
    assert set(public.tolist()) == {0, 1}
    secret = secret_calibration_tokens(_keys(), 2)
    assert secret.shape == (256,) and secret.dtype == np.int64
    assert set(secret.tolist()) == {0, 1}
    weighted = secret_calibration_tokens(_keys(), 2, unigram=np.array([1, 1]))
    assert weighted.shape == (256,) and weighted.dtype == np.int64


def test_the_unigram_draw_maps_each_uniform_integer_to_its_tokens_interval() -> None:
    """Weights [0, 2, 0, 1, 0]: cumulative counts [0, 2, 2, 3, 3], so u ∈ {0, 1} is token 1 and u = 2 token
    3 — worked out by hand from u, the ("decoy-pool", epoch) stream's randbelow(Σw = 3)."""
    for epoch in (0, 2):
        u = _keys().stream(("decoy-pool", epoch)).randbelow(np.full(64, 3, np.int64))
        expected = np.where(u < 2, 1, 3)
        text = secret_calibration_tokens(_keys(), 5, 64, unigram=np.array([0, 2, 0, 1, 0]), epoch=epoch)
        assert text.dtype == np.int64 and text.tolist() == expected.tolist()
    assert {0, 1, 2} <= set(u.tolist())  # the draw used every interval


# -- unigram_weights ---------------------------------------------------------------------------------------


def test_floating_weights_become_counts_summing_to_two_to_the_53() -> None:
    """w / max w, over its (exact) sum, × 2⁵³, rounded up: [1, 1, 2, 0] → [2⁵¹, 2⁵¹, 2⁵², 0]; float32 too."""
    for dtype in (np.float64, np.float32):
        out = unigram_weights(np.array([1.0, 1.0, 2.0, 0.0], dtype=dtype), 4)
        assert out.dtype == np.int64 and out.tolist() == [2**51, 2**51, 2**52, 0]
    # scale-free: the same counts for weights 1e300 times larger (their plain sum would overflow)
    assert unigram_weights(np.array([1e300, 1e300, 2e300, 0.0]), 4).tolist() == [2**51, 2**51, 2**52, 0]


def test_a_positive_weight_that_underflows_stays_drawable() -> None:
    """5e-324 / 1e300 is 0.0 in float64: its count is raised to 1, the other keeps 2⁵³; a true 0 stays 0."""
    assert unigram_weights(np.array([5e-324, 1e300, 0.0]), 3).tolist() == [1, 2**53, 0]


def test_integer_weights_are_kept_up_to_the_largest_that_cannot_overflow() -> None:
    """Integer weights are used as given (as int64); each may be at most (2⁶³ − 1) // V."""
    out = unigram_weights(np.array([3, 0, 5], dtype=np.int32), 3)
    assert out.dtype == np.int64 and out.tolist() == [3, 0, 5]
    top = INT64_MAX // 2
    assert unigram_weights(np.array([top, 1], dtype=np.int64), 2).tolist() == [top, 1]
    with pytest.raises(ConfigError, match=r"unigram counts too large: each must be <= \(2\*\*63 - 1\) // 2"):
        unigram_weights(np.array([top + 1, 1], dtype=np.int64), 2)


@pytest.mark.parametrize(
    ("unigram", "error", "message"),
    [
        (np.ones(3, dtype=bool), DTypeError, "unigram must hold real numbers"),
        (np.array(["a", "b", "c"]), DTypeError, "unigram must hold real numbers"),
        ([[1, 2], [3]], DTypeError, "unigram must be an array of real numbers"),
        (np.ones(2), ShapeError, r"unigram must be 1-D of length vocab_size = 3, got shape \(2,\)"),
        (np.array([1.0, np.nan, 1.0]), NonFiniteError, "^unigram holds NaN or Inf$"),
        (np.array([1.0, -1.0, 1.0]), ConfigError, "^unigram weights must be >= 0$"),
        (np.array([1, -1, 1]), ConfigError, "^unigram weights must be >= 0$"),
        (np.zeros(3), ConfigError, "^unigram weights sum to 0: no token can be drawn$"),
        (np.zeros(3, dtype=np.int64), ConfigError, "^unigram weights sum to 0: no token can be drawn$"),
    ],
    ids=["bool", "str", "ragged", "shape", "nan", "negative", "negative-int", "zero", "zero-int"],
)
def test_unigram_refusals_say_what_is_wrong(unigram: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        unigram_weights(unigram, 3)


def test_a_single_positive_weight_is_enough() -> None:
    """One positive weight among zeros is a valid unigram (integer or floating): all of its mass."""
    assert unigram_weights(np.array([0, 0, 4]), 3).tolist() == [0, 0, 4]
    assert unigram_weights(np.array([0.0, 0.5, 0.0]), 3).tolist() == [0, 2**53, 0]


# -- unigram_counts(smoothing=) ----------------------------------------------------------------------------


def test_smoothing_takes_the_least_factor_that_meets_it() -> None:
    """k is the least integer ≥ 1 with V / (k·N + V) ≤ smoothing, worked out by hand:
    V = 4, N = 3, 0.5: k = 1 gives 4/7 > 0.5, k = 2 gives 4/10 → counts 2·[2, 1, 0, 0] + 1;
    V = 4, N = 4, 0.25: k = 3 gives exactly 4/16 = 0.25 (k = 2: 4/12 > 0.25) → 3·[1, 1, 1, 1] + 1;
    V = 4, N = 4, 0.5: k = 1 gives exactly 4/8 = 0.5 → add-one; smoothing 1: always k = 1."""
    assert unigram_counts(np.array([0, 0, 1]), 4, smoothing=0.5).tolist() == [5, 3, 1, 1]
    assert unigram_counts(np.array([0, 1, 2, 3]), 4, smoothing=0.25).tolist() == [4, 4, 4, 4]
    assert unigram_counts(np.array([0, 1, 2, 2]), 4, smoothing=0.5).tolist() == [2, 2, 3, 1]
    assert unigram_counts(np.array([0, 1, 2, 2]), 4, smoothing=1.0).tolist() == [2, 2, 3, 1]
    assert unigram_counts(np.array([0, 1, 2, 2]), 4).tolist() == [2, 2, 3, 1]
    out = unigram_counts(np.array([0, 0, 1]), 4, smoothing=0.5)
    assert out.dtype == np.int64


def test_smoothing_of_an_empty_text() -> None:
    """An empty text leaves all the mass to the +1's: smoothing 1 is met (all ones), anything less is not."""
    assert unigram_counts(np.zeros(0, dtype=np.int64), 3, smoothing=1.0).tolist() == [1, 1, 1]
    with pytest.raises(ConfigError, match=r"an empty text leaves all its mass to smoothing, more than 0\.5"):
        unigram_counts(np.zeros(0, dtype=np.int64), 3, smoothing=0.5)


@pytest.mark.parametrize(
    "smoothing", [0.0, 1.5, -0.1, float("nan"), "0.5", True], ids=["0", "1.5", "-0.1", "nan", "str", "bool"]
)
def test_smoothing_outside_zero_one_is_refused(smoothing: Any) -> None:
    with pytest.raises(ConfigError, match=r"^smoothing must"):
        unigram_counts(np.array([0, 1]), 4, smoothing=smoothing)


def test_smoothing_may_scale_the_counts_up_to_what_the_draw_takes() -> None:
    """V = 2, ids [0, 0], smoothing 2⁻⁶¹: k = 2·(1 − 2⁻⁶¹) / (2⁻⁶¹·2) = 2⁶¹ − 1 exactly, so the largest count
    k·2 + 1 = 2⁶² − 1 = (2⁶³ − 1) // 2, the most ``unigram_weights`` takes for V = 2: accepted, and drawable.
    Smoothing 2⁻⁶² needs k = 2⁶² − 1, a count of 2⁶³ − 1: refused."""
    out = unigram_counts(np.array([0, 0]), 2, smoothing=2.0**-61)
    assert out.tolist() == [2**62 - 1, 1] and out[0] == INT64_MAX // 2
    assert unigram_weights(out, 2).tolist() == out.tolist()
    with pytest.raises(
        ConfigError, match=r"^smoothing 2\.168404344971009e-19 scales the counts by a 19-digit"
    ):
        unigram_counts(np.array([0, 0]), 2, smoothing=2.0**-62)


# -- CalibrationPool ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        ([np.ones((2, 3))], ConfigError, "calibration pool rows must be a mapping, got list"),
        ({Stage.FFN: np.ones((2, 3))}, ConfigError, r"calibration pool keys are \(Stage, layer\) pairs"),
        ({("ffn", 1): np.ones((2, 3))}, ConfigError, r"calibration pool keys are \(Stage, layer\) pairs"),
        ({(Stage.FFN, 1, 2): np.ones((2, 3))}, ConfigError, r"calibration pool keys are \(Stage, layer\)"),
        ({(Stage.FFN, 1.0): np.ones((2, 3))}, ConfigError, "^calibration pool layer must be an integer"),
        ({(Stage.FFN, -1): np.ones((2, 3))}, ConfigError, "^calibration pool layer must be >= 0"),
        ({(Stage.FFN, 1): np.ones(3)}, ShapeError, r"rows of \('ffn', 1\) must be rows × width \(2-D\)"),
        (
            {(Stage.FFN, 1): np.ones((2, 3), dtype=bool)},
            DTypeError,
            r"of \('ffn', 1\) must hold real numbers",
        ),
        ({(Stage.FFN, 1): np.ones((2, 3), dtype=complex)}, DTypeError, "must hold real numbers"),
        ({(Stage.FFN, 1): np.array([[1.0, np.inf]])}, NonFiniteError, r"of \('ffn', 1\) hold NaN or Inf"),
    ],
    ids=[
        "list",
        "stage-only",
        "str-stage",
        "triple",
        "float-layer",
        "negative-layer",
        "1-D",
        "bool",
        "complex",
        "inf",
    ],
)
def test_a_bad_pool_is_refused_with_what_is_wrong(rows: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        CalibrationPool(rows)


def test_a_pool_takes_real_number_arrays_as_given() -> None:
    """Floating and integer tables are both accepted and kept as given (no copy); a numpy layer becomes an
    int key; a fresh pool is at epoch 0."""
    floats, ints = np.ones((2, 3)), np.arange(6).reshape(3, 2)
    pool = CalibrationPool({(Stage.FFN, np.int64(1)): floats, (Stage.O, 0): ints})
    assert pool.rows[(Stage.FFN, 1)] is floats and pool.rows[(Stage.O, 0)] is ints
    assert all(type(layer) is int for _, layer in pool.rows)
    assert pool.epoch == 0 and not pool.needs_real
    assert pool.draw(Stage.O, 0, 3, np.zeros((0, 2)), _stream()).dtype == ints.dtype


def test_zero_decoys_have_the_pools_width_else_the_real_rows() -> None:
    pool = CalibrationPool({(Stage.FFN, 1): np.ones((4, 3), dtype=np.float32)})
    empty = pool.draw(Stage.FFN, 1, 0, np.zeros((2, 7)), _stream())
    assert empty.shape == (0, 3) and empty.dtype == np.float32
    assert pool.draw(Stage.O, 1, 0, np.zeros((2, 7)), _stream()).shape == (0, 7)
    assert pool.draw(Stage.FFN, 2, 0, np.zeros(5), _stream()).shape == (0, 0)


def test_a_pool_of_zero_width_rows_draws_them() -> None:
    """A pool's rows may be empty vectors (0 wide): a draw is count × 0, not a refusal for want of rows."""
    pool = CalibrationPool({(Stage.FFN, 1): np.ones((3, 0))})
    assert pool.draw(Stage.FFN, 1, 2, np.zeros((0, 0)), _stream()).shape == (2, 0)


def test_a_missing_or_empty_stage_is_named_in_the_refusal() -> None:
    pool = CalibrationPool({(Stage.FFN, 1): np.ones((4, 3)), (Stage.O, 2): np.ones((0, 3))})
    with pytest.raises(ConfigError, match="calibration pool has no rows for stage 'o', layer 1"):
        pool.draw(Stage.O, 1, 1, np.zeros((0, 3)), _stream())
    with pytest.raises(ConfigError, match="calibration pool has no rows for stage 'o', layer 2"):
        pool.draw(Stage.O, 2, 1, np.zeros((0, 3)), _stream())


def test_a_count_of_exactly_the_pool_is_a_permutation_of_its_rows() -> None:
    """count == the pool's rows: every row once (one round of the shuffle)."""
    pool = CalibrationPool({(Stage.FFN, 1): np.arange(5.0)[:, None]})
    for t in range(5):
        assert sorted(pool.draw(Stage.FFN, 1, 5, np.zeros((0, 1)), _stream(f"p{t}"))[:, 0]) == [0, 1, 2, 3, 4]


def _refilled_pool(sizes: list[int]) -> tuple[CalibrationPool, list[int]]:
    """A pool that never hands out a row twice, as :meth:`CalibrationPool.secret` builds (its ``_refill``
    hook), whose epoch e holds ``sizes[e]`` rows numbered 100·e + i; the epochs it was asked to build."""
    built: list[int] = []

    def table(epoch: int) -> CalibrationPool:
        return CalibrationPool(
            {(Stage.FFN, 1): 100.0 * epoch + np.arange(sizes[epoch], dtype=np.float64)[:, None]}
        )

    def refill(epoch: int) -> CalibrationPool:
        built.append(epoch)
        return table(epoch)

    pool = table(0)
    pool._refill = refill
    return pool, built


def test_a_secret_pool_spends_every_row_once_then_builds_the_next_epoch() -> None:
    """A 5-row epoch gives 2 + 2 distinct rows, then the 1 left is too few for 2: epoch 1 (rows 100…),
    built once; a draw of exactly the rows left takes them all; a draw larger than the pool shuffles."""
    pool, built = _refilled_pool([5, 4, 3])
    a = pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("a"))[:, 0].tolist()
    b = pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("b"))[:, 0].tolist()
    assert len(set(a + b)) == 4 and set(a + b) <= {0, 1, 2, 3, 4} and pool.epoch == 0 and built == []
    c = pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("c"))[:, 0].tolist()
    assert pool.epoch == 1 and built == [1] and set(c) <= {100, 101, 102, 103} and len(set(c)) == 2
    d = pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("d"))[:, 0].tolist()
    assert sorted(c + d) == [100, 101, 102, 103] and pool.epoch == 1  # exactly the 2 left: no new epoch
    with pytest.raises(ConfigError, match=r"the next calibration pool has fewer than 4 rows for \(<Stage"):
        pool.draw(Stage.FFN, 1, 4, np.zeros((0, 1)), _stream("e"))  # epoch 1 spent, epoch 2 holds only 3
    assert pool.epoch == 1 and built == [1, 2]  # refused with nothing changed
    f = pool.draw(Stage.FFN, 1, 6, np.zeros((0, 1)), _stream("f"))[:, 0].tolist()  # more than the pool
    assert sorted(f[:4]) == [100, 101, 102, 103] and len(set(f[4:])) == 2 and pool.epoch == 1


def test_a_secret_pool_counts_each_stage_and_layer_apart() -> None:
    """Rows taken at one (stage, layer) leave another's untouched; a new epoch rebuilds every stage."""
    rows = {(Stage.FFN, 1): np.arange(3.0)[:, None], (Stage.O, 1): 10 + np.arange(3.0)[:, None]}
    pool = CalibrationPool(rows)
    nxt = CalibrationPool({k: v + 100 for k, v in rows.items()})
    pool._refill = lambda epoch: nxt
    assert sorted(pool.draw(Stage.FFN, 1, 3, np.zeros((0, 1)), _stream("a"))[:, 0]) == [0, 1, 2]
    assert sorted(pool.draw(Stage.O, 1, 3, np.zeros((0, 1)), _stream("b"))[:, 0]) == [10, 11, 12]
    assert pool.epoch == 0
    assert sorted(pool.draw(Stage.O, 1, 1, np.zeros((0, 1)), _stream("c"))[:, 0]) in ([110], [111], [112])
    assert pool.epoch == 1 and pool.rows is nxt.rows
    assert sorted(pool.draw(Stage.FFN, 1, 3, np.zeros((0, 1)), _stream("d"))[:, 0]) == [100, 101, 102]


def test_the_secret_pool_is_built_from_the_epochs_secret_text() -> None:
    """``CalibrationPool.secret``: block 1's QKV rows are the embeddings of the epoch-0 secret text (uniform,
    or the unigram's), and its next epoch those of the epoch-1 text."""
    w = tiny_weights(4)
    b = NumpyBackend(w)
    embed = np.asarray(w.embed, dtype=np.float64)
    vocab = w.config.vocab_size
    weights = np.zeros(vocab, dtype=np.int64)
    weights[[2, 5]] = [1, 3]
    pool = CalibrationPool.secret(b, _keys(), unigram=weights)
    text0 = secret_calibration_tokens(_keys(), vocab, unigram=weights, epoch=0)
    assert set(text0.tolist()) == {2, 5}
    np.testing.assert_array_equal(pool.rows[(Stage.QKV, 0)], embed[text0])
    assert pool._refill is not None
    np.testing.assert_array_equal(
        pool._refill(1).rows[(Stage.QKV, 0)],
        embed[secret_calibration_tokens(_keys(), vocab, unigram=weights, epoch=1)],
    )


# -- GaussianDecoys ----------------------------------------------------------------------------------------


def test_zero_gaussian_decoys_have_the_real_rows_width() -> None:
    policy = GaussianDecoys()
    assert policy.needs_real
    assert policy.draw(Stage.FFN, 1, 0, np.ones((3, 4)), _stream()).shape == (0, 4)
    assert policy.draw(Stage.FFN, 1, 0, np.zeros((0, 4)), _stream()).shape == (0, 4)  # no rows needed for 0
    with pytest.raises(DTypeError, match="Gaussian decoys need real-number rows, got dtype complex128"):
        policy.draw(Stage.FFN, 1, 1, np.ones((3, 4), dtype=complex), _stream())
    with pytest.raises(
        ShapeError, match=r"Gaussian decoys need the real rows \(rows × width\), got shape \(4,\)"
    ):
        policy.draw(Stage.FFN, 1, 0, np.ones(4), _stream())


def test_gaussian_decoys_of_integer_rows_and_of_one_row() -> None:
    """Integer rows are real numbers (their moments in float64); one row r gives N(r, (|r| + 1e-3)²)."""
    real = np.array([[0, 10], [2, 10], [4, 10]], dtype=np.int32)
    draws = GaussianDecoys().draw(Stage.FFN, 1, 40000, real, _stream("int"))
    assert draws.shape == (40000, 2) and draws.dtype == np.float64
    np.testing.assert_allclose(draws.mean(axis=0), [2.0, 10.0], atol=0.03)
    np.testing.assert_allclose(draws.std(axis=0)[0], np.sqrt(8 / 3), rtol=0.02)
    assert (draws[:, 1] == 10.0).all()  # a constant column: std 0
    one = GaussianDecoys().draw(Stage.FFN, 1, 40000, np.array([[-3.0, 0.0]]), _stream("one"))
    assert abs(one[:, 0].mean() + 3.0) < 0.075 and abs(one[:, 1].mean()) < 3e-5  # 5 standard errors
    np.testing.assert_allclose(one.std(axis=0), [3.001, 1e-3], rtol=0.02)


def test_gaussian_draws_are_standard_normal_by_the_stream() -> None:
    """Rows ±1 in one column: mean 0, std 1, so the decoys are the stream's standard normals; their
    quartiles are ±0.6745 (the normal's), and a second stream draws other values."""
    real = np.array([[1.0], [-1.0]])
    z = GaussianDecoys().draw(Stage.FFN, 1, 40000, real, _stream("z"))[:, 0]
    np.testing.assert_allclose(np.quantile(z, [0.25, 0.5, 0.75]), [-0.6745, 0.0, 0.6745], atol=0.02)
    np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=0.02)
    assert np.isfinite(z).all()
    again = GaussianDecoys().draw(Stage.FFN, 1, 40000, real, _stream("z"))[:, 0]
    np.testing.assert_array_equal(z, again)


# -- CalibrationPool.from_tokens: windows -------------------------------------------------------------------


def _concat(pools: list[CalibrationPool]) -> dict[tuple[Stage, int], Any]:
    return {key: np.concatenate([p.rows[key] for p in pools]) for key in pools[0].rows}


def _assert_same_rows(a: dict[tuple[Stage, int], Any], b: dict[tuple[Stage, int], Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_from_tokens_runs_its_text_in_windows_each_from_position_zero() -> None:
    """The pool of a text in windows of w tokens is the pools of its w-token pieces, one after the other;
    a window past the model's max_positions (32) is cut to it; a window of 1 is each token alone."""
    b = NumpyBackend(tiny_weights(5))
    ids = np.random.default_rng(1).integers(0, 32, size=40)
    by_three = CalibrationPool.from_tokens(b, ids, window=3)
    _assert_same_rows(
        by_three.rows, _concat([CalibrationPool.from_tokens(b, ids[i : i + 3]) for i in range(0, 40, 3)])
    )
    single = CalibrationPool.from_tokens(b, ids[:5], window=1)
    _assert_same_rows(
        single.rows, _concat([CalibrationPool.from_tokens(b, ids[i : i + 1]) for i in range(5)])
    )
    wide = CalibrationPool.from_tokens(b, ids, window=1000)
    _assert_same_rows(
        wide.rows,
        _concat([CalibrationPool.from_tokens(b, ids[:32]), CalibrationPool.from_tokens(b, ids[32:])]),
    )
    assert all(t.shape[0] == 40 for t in wide.rows.values())
    with pytest.raises(ConfigError, match=r"^window must be >= 1"):
        CalibrationPool.from_tokens(b, ids, window=0)


def test_from_tokens_windows_are_256_tokens_by_default() -> None:
    """On a model of 512 positions, a 300-token text runs as tokens [0, 256) and [256, 300)."""
    b = NumpyBackend(tiny_weights(6, max_positions=512))
    ids = np.random.default_rng(2).integers(0, 32, size=300)
    pieces = [
        CalibrationPool.from_tokens(b, ids[:256], window=512),
        CalibrationPool.from_tokens(b, ids[256:]),
    ]
    _assert_same_rows(CalibrationPool.from_tokens(b, ids).rows, _concat(pieces))


# -- further survivors of the first run --------------------------------------------------------------------


def test_the_public_text_is_fixed() -> None:
    """The shared calibration text is the same on every call (seed 0)."""
    a = default_public_tokens(1000, 64)
    assert np.array_equal(a, default_public_tokens(1000, 64))
    assert len(set(a.tolist())) > 32  # and not a constant


@pytest.mark.parametrize(
    "policy", [CalibrationPool({(Stage.FFN, 1): np.ones((4, 3))}), GaussianDecoys()], ids=["pool", "gaussian"]
)
def test_a_bad_count_is_refused_by_its_name(policy: Any) -> None:
    with pytest.raises(ConfigError, match=r"^decoy count must be >= 0, got -1"):
        policy.draw(Stage.FFN, 1, -1, np.ones((2, 3)), _stream())


def test_smoothing_of_a_one_token_text() -> None:
    """V = 4, N = 1, smoothing 0.5: k = 4·0.5 / (0.5·1) = 4 (4/8 = 0.5; k = 3: 4/7 > 0.5) → [1, 1, 5, 1]."""
    assert unigram_counts(np.array([2]), 4, smoothing=0.5).tolist() == [1, 1, 5, 1]


def test_smoothing_past_int64_is_refused_not_wrapped() -> None:
    """V = 1, ids [0], smoothing 2⁻⁶³: k = 2⁶³ − 1, a count k + 1 = 2⁶³ that int64 cannot hold: refused
    (k + 1 > (2⁶³ − 1) // 1, in integers: as a float quotient 2⁶³ − 1 rounds to 2⁶³ and would pass)."""
    with pytest.raises(ConfigError, match="scales the counts by a 19-digit factor: too large"):
        unigram_counts(np.array([0]), 1, smoothing=2.0**-63)
    assert unigram_counts(np.array([0]), 1, smoothing=2.0**-62).tolist() == [2**62]  # k = 2⁶² − 1


def test_a_float32_unigram_is_checked_and_scaled_as_float64() -> None:
    with pytest.raises(NonFiniteError, match="unigram holds NaN or Inf"):
        unigram_weights(np.array([1.0, np.nan, 1.0], dtype=np.float32), 3)
    with pytest.raises(NonFiniteError):
        unigram_weights(np.array([1.0, np.inf, 1.0], dtype=np.float16), 3)


def test_a_one_row_pool_draws_its_row() -> None:
    pool = CalibrationPool({(Stage.FFN, 1): np.array([[7.0, 8.0]])})
    assert pool.draw(Stage.FFN, 1, 1, np.zeros((0, 2)), _stream()).tolist() == [[7.0, 8.0]]
    assert pool.draw(Stage.FFN, 1, 3, np.zeros((0, 2)), _stream()).tolist() == [[7.0, 8.0]] * 3


def test_a_next_epoch_of_exactly_the_rows_asked_for_is_enough() -> None:
    """An epoch of 3 rows, 2 taken: a draw of 2 builds epoch 1, of exactly 2 rows, and takes them both."""
    pool, built = _refilled_pool([3, 2])
    assert set(pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("a"))[:, 0]) <= {0, 1, 2}
    assert sorted(pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("b"))[:, 0]) == [100, 101]
    assert pool.epoch == 1 and built == [1]


def test_gaussian_moments_are_taken_in_float64() -> None:
    """float32 rows draw exactly the decoys of their float64 copy (the moments are float64's)."""
    real = np.random.default_rng(3).standard_normal((7, 5)).astype(np.float32) * 3 + 1
    got = GaussianDecoys().draw(Stage.FFN, 1, 50, real, _stream("f32"))
    want = GaussianDecoys().draw(Stage.FFN, 1, 50, real.astype(np.float64), _stream("f32"))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


def test_gaussian_decoys_of_one_small_row() -> None:
    """One row r: sd = |r| + 1e-3, so r = 0.001 draws with sd 0.002 (|r| − 1e-3 would be a constant)."""
    one = GaussianDecoys().draw(Stage.FFN, 1, 40000, np.array([[0.001]]), _stream("small"))[:, 0]
    assert abs(one.mean() - 0.001) < 5e-5 and abs(one.std() / 0.002 - 1) < 0.03


def test_gaussian_columns_of_very_different_sizes_keep_their_own_spread() -> None:
    """Columns of ~1 and ~1e-300 in the same rows: each column is scaled by its own largest entry, so the
    small column's std (~1e-300, its squares below float64's range) is not lost."""
    base = np.random.default_rng(4).standard_normal((64, 2))
    real = base * np.array([1.0, 1e-300])
    draws = GaussianDecoys().draw(Stage.FFN, 1, 20000, real, _stream("mixed"))
    want = base.std(axis=0)
    np.testing.assert_allclose(draws[:, 0].std(), want[0], rtol=0.05)
    np.testing.assert_allclose((draws[:, 1] / 1e-300).std(), want[1], rtol=0.05)


# -- CalibrationPool.from_tokens: tokens whose pass is not finite --------------------------------------------


def _zero_token_weights() -> Any:
    w = tiny_weights(0, rms_eps=0.0)
    w.embed[3] = 0.0  # token 3's block-0 RMSNorm is 0/0
    return w


def test_from_tokens_leaves_non_finite_tokens_out_without_a_warning() -> None:
    """The left-out token's NaN arithmetic runs under np.errstate(all="ignore"): no RuntimeWarning."""
    w = _zero_token_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = CalibrationPool.from_tokens(NumpyBackend(w), np.array([1, 3, 2, 4]), window=4)
    assert all(t.shape[0] == 3 and np.isfinite(t).all() for t in pool.rows.values())


def test_from_tokens_refuses_a_text_of_only_non_finite_tokens() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^calibration pool: the model's own arithmetic is not finite \(NaN or ±inf\) for every "
        r"token of the calibration text; give other public_tokens$",
    ):
        CalibrationPool.from_tokens(NumpyBackend(_zero_token_weights()), np.array([3, 3, 3]))


def test_from_tokens_on_a_one_block_model() -> None:
    """The first filter is block 0's norm: a one-block model has no other."""
    b = NumpyBackend(tiny_weights(7, n_layers=1))
    pool = CalibrationPool.from_tokens(b, np.array([1, 2, 3]))
    assert (Stage.QKV, 0) in pool.rows and (Stage.QKV, 1) not in pool.rows
    assert all(t.shape[0] == 3 for t in pool.rows.values())


def test_from_tokens_drops_a_token_with_a_non_finite_row_at_any_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token whose row at one stage is not finite (its logits finite) is dropped at every stage; the other
    tokens stay. (Made here by a runner that records NaN in token 9's O-stage row of block 2.)"""
    from scx_ref.protocol import decoys

    class Runner(PlainRunner[Any]):
        def __init__(self, backend: Any, trace: Any) -> None:
            def spoiled(stage: Stage, layer: int, x: Any) -> None:
                x = np.array(x, dtype=np.float64)
                if stage is Stage.O and layer == 2:
                    x[np.asarray(self.ids) == 9] = np.nan
                trace(stage, layer, x)

            super().__init__(backend, spoiled)

        def forward(self, ids: Any, last_only: bool = False) -> Any:
            self.ids = ids
            return super().forward(ids, last_only)

    monkeypatch.setattr(decoys, "PlainRunner", Runner)
    w = tiny_weights(0)
    pool = CalibrationPool.from_tokens(NumpyBackend(w), np.array([1, 9, 2, 4]), window=2)
    for key, table in pool.rows.items():
        assert table.shape[0] == 3 and np.isfinite(table).all(), key
    np.testing.assert_array_equal(pool.rows[(Stage.QKV, 0)], w.embed[[1, 2, 4]])


def test_from_tokens_drops_a_token_whose_logits_are_not_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits NaN for the window holding token 9 (its stage rows finite): that window's tokens go."""
    from scx_ref.protocol import decoys

    class Runner(PlainRunner[Any]):
        def forward(self, ids: Any, last_only: bool = False) -> Any:
            out = super().forward(ids, last_only)
            return out * np.nan if 9 in np.asarray(ids).tolist() else out

    monkeypatch.setattr(decoys, "PlainRunner", Runner)
    w = tiny_weights(0)
    pool = CalibrationPool.from_tokens(NumpyBackend(w), np.array([1, 9, 2, 4, 5]), window=2)
    for key, table in pool.rows.items():
        assert table.shape[0] == 3, key
    np.testing.assert_array_equal(pool.rows[(Stage.QKV, 0)], w.embed[[2, 4, 5]])


def test_from_tokens_runs_an_overflowing_text_without_a_warning() -> None:
    """A token of embedding 1e300 overflows the squares of its norms (block 0's, then the pass's): both
    run under np.errstate(all="ignore"), so the pool is built without a warning, whatever the caller's."""
    w = tiny_weights(0)
    w.embed[5] = 1e300
    with warnings.catch_warnings(), np.errstate(all="warn"):
        warnings.simplefilter("error")
        pool = CalibrationPool.from_tokens(NumpyBackend(w), np.array([1, 5, 2]))
    assert all(np.isfinite(t).all() for t in pool.rows.values())
    np.testing.assert_array_equal(pool.rows[(Stage.QKV, 0)][[0, -1]], w.embed[[1, 2]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_pool_holds_its_backends_dtype_in_rows_of_their_own(dtype: type) -> None:
    """The traced rows are kept in the backend's dtype (exactly the values its pass computed; a float64 copy
    of a float32 pass doubled the memory)."""
    w = tiny_weights(8)
    pool = CalibrationPool.from_tokens(NumpyBackend(w, dtype), np.array([1, 2, 3]))
    assert all(t.dtype == dtype for t in pool.rows.values())
    np.testing.assert_array_equal(pool.rows[(Stage.QKV, 0)], w.embed[[1, 2, 3]].astype(dtype))


def test_a_torch_backends_pool_keeps_rows_of_its_own() -> None:
    """A torch backend's pool holds copies of its tensors (``to_numpy``'s contract: the backend reuses its
    buffers): more passes on the backend afterwards leave the pool as it was, every table float32 and equal
    to the numpy backend's float32 pool to float32 rounding."""
    torch = pytest.importorskip("torch")
    from scx_ref.backends.torch_backend import TorchBackend

    w = tiny_weights(8)
    b = TorchBackend(w.astype(np.float32), torch.float32)
    pool = CalibrationPool.from_tokens(b, np.arange(1, 20))
    before = {k: v.copy() for k, v in pool.rows.items()}
    for seed in range(3):
        CalibrationPool.from_tokens(b, np.random.default_rng(seed).integers(0, w.config.vocab_size, 19))
    assert all(v.dtype == np.float32 and np.array_equal(pool.rows[k], v) for k, v in before.items())
    ref = CalibrationPool.from_tokens(NumpyBackend(w, np.float32), np.arange(1, 20))
    for k, v in ref.rows.items():
        np.testing.assert_allclose(pool.rows[k], v, rtol=1e-4, atol=1e-5)


def test_a_stage_that_is_not_a_stage_is_named_as_given() -> None:
    pool = CalibrationPool({(Stage.FFN, 1): np.ones((4, 3))})
    with pytest.raises(ConfigError, match="calibration pool has no rows for stage 'nope', layer 1"):
        pool.draw("nope", 1, 1, np.zeros((0, 3)), _stream())  # type: ignore[arg-type]


def test_the_first_draw_of_a_new_epoch_counts_as_taken() -> None:
    """Epoch 0 of one row, epoch 1 of six: the draw that builds epoch 1 takes one of its rows, the next five
    the other five (six distinct rows), and only then is epoch 1 spent — the seventh draw builds epoch 2."""
    pool, built = _refilled_pool([1, 6, 6])
    assert pool.draw(Stage.FFN, 1, 1, np.zeros((0, 1)), _stream("s0")).tolist() == [[0.0]]
    taken = [pool.draw(Stage.FFN, 1, 1, np.zeros((0, 1)), _stream(f"s{i}"))[0, 0] for i in range(1, 7)]
    assert sorted(taken) == [100, 101, 102, 103, 104, 105] and pool.epoch == 1 and built == [1]
    assert 200 <= pool.draw(Stage.FFN, 1, 1, np.zeros((0, 1)), _stream("s7"))[0, 0] < 206
    assert pool.epoch == 2 and built == [1, 2]


# -- CalibrationPool.refill_every / time_refill (stop 74) ------------------------------------------------


def test_refill_every_reads_the_most_rows_one_draw_took_at_each_key() -> None:
    """A 12-row epoch drawn 3 rows then 2 at FFN-1: an epoch serves 12 // 3 = 4 requests (the larger
    draw, not the last), an int; an O-stage key drawn 5 at a time (rows // 5 = 2) is the first to run out."""
    pool, _ = _refilled_pool([12, 12])
    pool.rows[(Stage.O, 1)] = np.arange(12, dtype=np.float64)[:, None]
    pool.draw(Stage.FFN, 1, 3, np.zeros((0, 1)), _stream("a"))
    pool.draw(Stage.FFN, 1, 2, np.zeros((0, 1)), _stream("b"))
    got = pool.refill_every()
    assert got == 4 and type(got) is int
    pool.draw(Stage.O, 1, 5, np.zeros((0, 1)), _stream("c"))
    assert pool.refill_every() == 2


def test_time_refill_builds_the_next_epoch_once_and_times_only_that() -> None:
    """``time_refill`` asks the pool's builder for epoch + 1 — once, leaving the pool at its epoch — and
    returns seconds within the call's own wall time."""
    pool, built = _refilled_pool([4, 4, 4])
    pool.draw(Stage.FFN, 1, 3, np.zeros((0, 1)), _stream("a"))
    pool.draw(Stage.FFN, 1, 3, np.zeros((0, 1)), _stream("b"))  # 1 left: epoch 1 built
    assert pool.epoch == 1 and built == [1]
    start = time.perf_counter()
    seconds = pool.time_refill()
    wall = time.perf_counter() - start
    assert built == [1, 2] and pool.epoch == 1
    assert seconds is not None and 0.0 < seconds <= wall


def test_a_gaussian_configuration_refuses_a_unigram_by_name() -> None:
    with pytest.raises(
        ConfigError, match=r"^unigram weighs the calibration text's draw: Gaussian decoys draw none$"
    ):
        configured_unigram(np.ones(4), 4, "gaussian")


def test_add_one_counts_past_the_draws_range_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``smoothing=None`` the overflow branch (Σc ≥ 2⁶³: N·V ≳ 2⁶³, out of reach of a test's memory)
    raised UnboundLocalError from its message, which named the smoothing mass. The branch is reached here
    by lowering the module's int64 bound to 100 (the check and the message are the code's own): 60
    occurrences of one id over V = 2 exceed 100 // 2."""
    ids = np.zeros(60, dtype=np.int64)
    monkeypatch.setattr(decoys_module, "_INT64_MAX", 100)
    with pytest.raises(
        ConfigError, match=r"^add-one counting scales the counts by a 1-digit factor: too lar"
    ):
        unigram_counts(ids, 2)
    with pytest.raises(ConfigError, match=r"^smoothing 0\.5 scales the counts"):  # k = 1 here too
        unigram_counts(ids, 2, smoothing=0.5)
    monkeypatch.undo()
    assert unigram_counts(ids, 2).tolist() == [61, 1]

"""Tests that kill mutants of the reply verifier (scx_ref/protocol/verify.py) that survived
``python -m mutation.run verify`` (mutation/REPORT_verify.md): each names the weakened check it guards."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.backends import NumpyBackend, cpu_kernels
from scx_ref.backends.base import WeightName, split_qkv, sum_norm_slack
from scx_ref.errors import IntegrityError, NonFiniteError, SCXError
from scx_ref.keys import KeySchedule
from scx_ref.ops import route
from scx_ref.protocol import Reply, Request, verify
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.mlp import traced_mlp
from scx_ref.protocol.verify import (
    LAMBDA,
    LockSketch,
    RecomputedRows,
    SessionVerifier,
    SketchCache,
    _Check,
    attention_excess,
    attention_rows64,
    attention_tau,
    check_reply,
    excess_ratio,
    linear_excess,
    lock_scores_excess,
    prefix_extreme,
    range_excess,
    range_shapes,
    row_norms,
)
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

W = tiny_weights(5)
W_MOE = tiny_weights(6, moe=True)


def _keys(seed: int) -> KeySchedule:
    return KeySchedule(bytes([seed + 1]) * 32, bytes([seed + 2]) * 16)


def _verifier(
    b: NumpyBackend, cache: SketchCache | None = None, seed: int = 0
) -> tuple[SessionVerifier[Any], SketchCache]:
    keys = _keys(seed)
    cache = SketchCache(b, keys) if cache is None else cache
    return SessionVerifier(b, RequestKeys(_keys(seed + 10), b.config), cache), cache


# -- SessionVerifier.prepare, SketchCache.noted_terms, SessionVerifier.current ------------------------


def test_prepare_derives_every_matrix_and_every_blocks_rows_ahead_and_returns_itself() -> None:
    """prepare(n) derives the check of every matrix the cache lists and, for n, each block's recomputed
    attention rows — the same ones the checks would derive on demand — and returns the verifier."""
    for w in (W, W_MOE):
        b = NumpyBackend(w)
        ver, cache = _verifier(b)
        assert ver.prepare(9) is ver
        assert set(ver._checks) == set(cache.matrices())
        assert set(ver._rows) == {(block, 9) for block in range(w.config.n_layers)}
        fresh, _ = _verifier(b, cache)
        for which, layer, expert in cache.matrices():
            got, want = ver._checks[(which, layer, expert)], fresh._check(which, layer, expert)
            assert np.array_equal(got.r, want.r) and np.array_equal(got.wr, want.wr)
        for block in range(w.config.n_layers):
            assert np.array_equal(ver._rows[(block, 9)], fresh.attention_rows(block, 9))
        only, _ = _verifier(b, cache)
        only.prepare()  # no length: the matrices only
        assert set(only._checks) == set(cache.matrices()) and not only._rows


def test_prepare_derives_the_tau_terms_an_earlier_session_noted() -> None:
    """τ's terms a session computed are noted (arguments only, listed in the order of their repr) and a
    later session's prepare derives exactly those, for the same matrix (an expert's too) and vector count,
    ahead."""
    b = NumpyBackend(W_MOE)
    first, cache = _verifier(b)
    assert cache.noted_terms() == []
    uses: list[tuple[tuple[WeightName, int, int | None], int, float, float, float]] = [
        (("wo", 1, None), 2, 2.0**-24, 0.5, 3.0),
        (("wo", 1, None), 2, 2.0**-11, 0.5, 3.0),  # sorts after 2⁻²⁴ by value, before it by repr
        (("w_gate_up", 0, 1), 1, 2.0**-24, 0.0, 1.0),
        (("lm_head", -1, None), first.vectors, 2.0**-53, 0.0, 1.0),
    ]
    for (which, layer, expert), k, u, extra, slack in uses:
        a, bb = first._check(which, layer, expert).first(k).tau_terms(u, extra, slack)
        assert a.shape == bb.shape == (k,)
    noted = cache.noted_terms()
    assert noted == sorted(uses, key=repr)
    assert noted.index(uses[1]) < noted.index(uses[0]) and sorted(uses) != noted  # repr's order
    noted.clear()  # a snapshot: the cache's own set is unchanged
    assert len(cache.noted_terms()) == 4
    later, _ = _verifier(b, cache, seed=3)
    later.prepare()
    for (which, layer, expert), k, u, extra, slack in uses:
        assert ("tau", u, extra, slack) in later._checks[(which, layer, expert)].first(k).memo
    assert ("tau", 2.0**-24, 0.0, 1.0) not in later._checks[("w_gate_up", 0, 0)].first(1).memo
    assert ("tau", 2.0**-24, 0.5, 3.0) not in later._checks[("wo", 0, None)].first(2).memo


def test_current_is_the_cache_and_its_basis_epoch() -> None:
    """Checks drawn from a cache are current for that cache only, until it rotates to a fresh basis."""
    b = NumpyBackend(W)
    ver, cache = _verifier(b)
    other = SketchCache(b, _keys(7))
    assert ver.current(cache) and not ver.current(other)
    cache.rotate()
    assert not ver.current(cache)
    assert _verifier(b, cache)[0].current(cache)


def test_every_rotation_draws_a_fresh_basis() -> None:
    """Each detected tampering moves the cache to a basis never used before: after a second rotation the
    basis differs from both earlier ones, and checks drawn after the first are no longer current."""
    b = NumpyBackend(W)
    cache = SketchCache(b, _keys(4))
    bases = [cache.get("wo", 0, None).basis]
    after_first = None
    for _ in range(2):
        cache.rotate()
        bases.append(cache.get("wo", 0, None).basis)
        after_first = after_first or _verifier(b, cache)[0]
    assert cache.epoch == 2
    assert not any(np.array_equal(bases[i], bases[j]) for i in range(3) for j in range(i))
    assert after_first is not None and not after_first.current(cache)


# -- prefix_extreme, range_shapes, range_excess, attention_excess: shapes and messages ----------------


def test_prefix_extreme_takes_a_single_row_axis_and_refuses_a_scalar_with_its_message() -> None:
    """A 1-D array is a row axis of scalars (its running max/min; the input left as it was); only a 0-d
    array is refused."""
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    assert prefix_extreme(x, True).tolist() == np.maximum.accumulate(x).tolist()
    assert prefix_extreme(x, False).tolist() == np.minimum.accumulate(x).tolist()
    assert x.tolist() == [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]  # its own copy: the input is not written
    with pytest.raises(SCXError) as err:
        prefix_extreme(np.float64(1.0), True)
    assert str(err.value) == "prefix_extreme needs an array with a row axis"


def test_range_shapes_refuses_each_misfit_with_its_message() -> None:
    """Values that are not keys × H_kv × d_h (even when the outputs are well formed), queries past the keys
    (one query already), and the messages naming the shapes; no queries may start anywhere."""
    with pytest.raises(SCXError) as err:
        range_shapes((5, 2, 4, 1), (1, 2, 1, 4), 0)  # 4-D values whose dims 1, 2 fit the outputs
    assert str(err.value) == (
        "outputs (1, 2, 1, 4) for values (5, 2, 4, 1): (queries × H_kv × g × d_h, keys × H_kv × d_h)"
    )
    with pytest.raises(SCXError) as err:
        range_shapes((2, 3, 4), (1, 3, 1, 4), 2)  # one query at position 2 of 2 keys
    assert str(err.value) == "1 queries from position 2 attend past the 2 keys"
    with pytest.raises(SCXError) as err:
        range_shapes((5, 3, 4), (4, 3, 1, 4), 3)
    assert str(err.value) == "4 queries from position 3 attend past the 5 keys"
    range_shapes((2, 3, 4), (0, 3, 1, 4), 5)  # no queries: nothing attends past the keys
    range_shapes((5, 3, 4), (2, 3, 1, 4), 3)  # the last query at the last key


@pytest.mark.parametrize("dtypes", [("float32", "float64"), ("float16", "float16")])
def test_range_excess_off_the_kernels_dtypes_is_the_eager_value(dtypes: tuple[str, str]) -> None:
    """Values and outputs of two dtypes, or of a dtype the kernels do not take, give the eager passes'
    verdict with the kernels installed too."""
    rng = np.random.default_rng(3)
    v = rng.standard_normal((6, 2, 4)).astype(dtypes[0])
    o = (rng.standard_normal((3, 2, 2, 4)) * 1.5).astype(dtypes[1])
    got = range_excess(v, o, 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", False)
        want = range_excess(v, o, 3)
    assert got == want and got[0] > 0.0


def _fitting_rows() -> RecomputedRows:
    """Two recomputed rows of 4 query heads over 2 KV heads whose arrays fit one another."""
    return RecomputedRows(
        np.zeros((2, 4, 2)),
        np.zeros((2, 4)),
        np.ones((2, 4)),
        np.ones((2, 4)),
        np.ones((2, 2)),
        np.ones((2, 2)),
    )


def test_attention_excess_refuses_rows_that_are_not_rows_by_heads() -> None:
    """Distances that are not rows × heads (0-d, 1-d) and a group of 0 are SCXError, not an IndexError or
    ZeroDivisionError; norms of one KV head for a group that does not tile the heads are refused before
    the kernel reads them."""
    ok = _fitting_rows()
    pos = np.zeros(2, np.int64)
    for dist in (np.zeros(()), np.zeros(2)):
        with pytest.raises(SCXError, match="do not fit"):
            attention_excess(ok._replace(dist=dist), pos, 2, 0.5, 2.0**-24)
    with pytest.raises(SCXError, match="do not fit"):
        attention_excess(ok, pos, 0, 0.5, 2.0**-24)
    one = ok._replace(kmax=np.ones((2, 1)), vmax=np.ones((2, 1)))
    for fused in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", fused)
            with pytest.raises(SCXError, match="do not fit"):
                attention_excess(one, pos, 3, 0.5, 2.0**-24)


def test_attention_excess_refuses_each_misfit_alone_and_takes_no_rows_or_no_heads() -> None:
    """Each norm array of the wrong shape on its own (the others fitting) is refused, with the message
    naming every shape; no rows, or no heads, give the verdict of no entries (0.0)."""
    ok = _fitting_rows()
    pos = np.zeros(2, np.int64)
    for field in ("onorm", "qnorm", "kmax", "vmax"):
        for fused in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "ENABLED", fused)
                with pytest.raises(SCXError) as err:
                    attention_excess(ok._replace(**{field: np.ones((2, 3))}), pos, 2, 0.5, 2.0**-24)
        if field == "vmax":
            assert str(err.value) == (
                "recomputed rows (2, 4) (rows × H), norms (2, 4), (2, 4), (2, 2), (2, 3) "
                "(rows × H_kv, group 2) at (2,) positions do not fit one another"
            )
    none = RecomputedRows(np.zeros((0, 4, 2)), *(np.zeros((0, 4)),) * 3, *(np.zeros((0, 2)),) * 2)
    assert attention_excess(none, np.zeros(0, np.int64), 2, 0.5, 2.0**-24) == 0.0
    headless = RecomputedRows(np.zeros((2, 0, 2)), *(np.zeros((2, 0)),) * 5)
    assert attention_excess(headless, pos, 1, 0.5, 2.0**-24) == 0.0


# -- excess_ratio, row_norms, _linear_tau --------------------------------------------------------------


def test_excess_ratio_of_no_entries_mixed_arguments_and_no_warnings() -> None:
    """No entries: 0.0. A float residual against an array of τ takes the array path (the largest ratio).
    Ratios that overflow or are inf / inf give their verdict (inf: refused as NaN) without a warning."""
    assert excess_ratio(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    assert excess_ratio(2.0, np.array([4.0, 8.0])) == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(excess_ratio(np.array([1e300]), np.array([1e-300])))
        assert math.isnan(excess_ratio(np.array([math.inf, 1.0]), np.array([math.inf, 1.0])))
        assert math.isnan(excess_ratio(np.array([1.0, 1.0]), np.array([0.0, -math.inf])))


def test_row_norms_are_the_float64_norms_with_their_slack_for_any_input() -> None:
    """For rows of ordinary size, row_norms is the float64 norm √Σx² times sum_norm_slack at float64's
    epsilon (as the kernels' project64 rounds its norms up), whatever the input's dtype; zero-width rows
    have norm 0; a 1-D or 3-D array is refused with its message; rows past float64's range, NaN or ±inf
    give their norms without a warning."""
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal((5, 24)) * np.array([[1e-3], [1.0], [7.0], [1e3], [0.25]])).astype(dtype)
        got = row_norms(x)
        assert got.dtype == np.float64
        # within float64 rounding (1e-15) of the float64 norm times the slack 1 + 26·2⁻⁵² (5.8e-15 above 1)
        want = np.linalg.norm(x.astype(np.float64), axis=1) * sum_norm_slack(24, 2.0**-52)
        assert np.allclose(got, want, rtol=1e-15, atol=0.0)
        assert np.array_equal(got, row_norms(x.astype(np.float64)))
    assert np.array_equal(row_norms(np.zeros((3, 0))), np.zeros(3))
    for bad in (np.zeros(4), np.zeros((2, 2, 2))):
        with pytest.raises(SCXError) as err:
            row_norms(bad)
        assert str(err.value) == f"row norms of an array of shape {bad.shape}: rows × width"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = row_norms(
            np.array([[1.7e308, 1.7e308], [math.nan, 1.0], [math.inf, -math.inf], [math.inf, math.nan]])
        )
    assert got[0] == math.inf and math.isnan(got[1]) and got[2] == math.inf and math.isnan(got[3])


def test_linear_tau_is_the_two_row_norms_weighed_by_the_checks_terms() -> None:
    """τ_ij = ‖x̂_i‖·a_j + ‖y_i‖·b_j with (a, b) the check's tau_terms for the same arguments."""
    ver, _ = _verifier(NumpyBackend(W))
    ch = ver._check("w_down", 0, None).first(3)
    xnorm, ynorm = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 4.0])
    a, bb = ch.tau_terms(2.0**-24, 2.0, 1.0)
    got = SessionVerifier._linear_tau(xnorm, ynorm, ch, 2.0**-24, 2.0, 1.0)
    assert np.array_equal(got, np.multiply.outer(xnorm, a) + np.multiply.outer(ynorm, bb))


# -- the client's own norm (NonFiniteError before IntegrityError) --------------------------------------


def test_own_norm_not_finite_is_a_nonfinite_error_with_its_message_and_no_warning() -> None:
    """A zero row at rms_eps = 0: the model's own RMSNorm of it is 0/0; the client says so (NonFiniteError
    naming the norm and the stage), without a floating-point warning on the way."""
    b = NumpyBackend(tiny_weights(0, rms_eps=0.0))
    ver, _ = _verifier(b)
    x = np.ones((3, b.config.hidden_size))
    x[1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError) as err:
            ver._own_norm_finite(Stage.QKV, 2, x, "attn", 0)
        ver._own_norm_finite(Stage.QKV, 2, np.ones((3, b.config.hidden_size)), "attn", 0)  # finite: returns
    assert str(err.value) == (
        "qkv of block 2: the model's own attn RMSNorm of a row sent is not finite "
        "(a zero row at rms_eps = 0, or one past the dtype's range)"
    )


# -- attention_rows64 --------------------------------------------------------------------------------


def _rows64_case() -> tuple[np.ndarray, ...]:
    """Two rows (4 heads, group 2, d_h 3) at positions 1 and 4 over 5 keys."""
    rng = np.random.default_rng(12)
    q, o = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    k, v = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 3))
    return q, k, v, o, np.array([1, 4], dtype=np.int64)


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "eager"])
def test_attention_rows64_refuses_each_misfit_with_its_message_and_takes_no_rows(fused: bool) -> None:
    """Each misfit names the shapes (positions of the wrong rank included); no rows give empty arrays of
    the heads' shapes."""
    q, k, v, o, pos = _rows64_case()
    cases = [
        (
            (q, k, v, o, pos[:, None], 2),
            "rows (2, 4, 3) at (2, 1) positions for keys (5, 2, 3), values (5, 2, 3): "
            "(rows × H × d_h, rows, keys × H_kv × d_h)",
        ),
        ((q, k, v, o[:1], pos, 2), "(1, 4, 3) server rows for (2, 4, 3) recomputed ones"),
        (
            (q, k, v, o, pos, 3),
            "rows (2, 4, 3) at (2,) positions with group 3 for keys (5, 2, 3), values (5, 2, 3)",
        ),
        ((q, k, v, o, pos + 1, 2), "recomputed rows at positions up to 5 for 5 keys"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        for args, message in cases:
            with pytest.raises(SCXError) as err:
                attention_rows64(*args, 1.0)
            assert str(err.value) == message
        rec = attention_rows64(q[:0], k, v, o[:0], pos[:0], 2, 1.0)
    assert rec.want.shape == (0, 4, 3)
    assert rec.dist.shape == rec.onorm.shape == rec.qnorm.shape == (0, 4)
    assert rec.kmax.shape == rec.vmax.shape == (0, 2)


# -- τ: the module docstring's bounds, term by term -----------------------------------------------------

LAM, U64 = 8.0, 2.0**-53


def test_tau_terms_are_the_documented_bound() -> None:
    """τ_i = ‖x̂_i‖·a + ‖y_i‖·b with, per vector r (in = rows of W r, out = rows of r),
    a = λ[u((√in + 2)ρ + s‖W r‖) + u₆₄((√in + 6)‖W r‖ + √out‖W‖_F‖r‖)] and
    b = λ[u(1 + extra_out)max|r| + u₆₄√out‖r‖] — each term checked on its own by varying its input."""
    ver, _ = _verifier(NumpyBackend(W))
    ch = ver._check("wo", 1, None).first(3)
    wo = np.asarray(W.layers[1].wo, dtype=np.float64)
    n_in, n_out = ch.wr.shape[0], ch.r.shape[0]
    assert (n_in, n_out) == wo.shape and ch.r.shape[1] == 3
    assert np.allclose(ch.wr, wo @ ch.r, rtol=1e-12, atol=1e-14)
    rho = np.sqrt((ch.r**2 * (np.linalg.norm(wo, axis=0) ** 2)[:, None]).sum(axis=0))
    assert np.allclose(ch.rho, rho, rtol=1e-12)
    assert np.allclose(ch.wr_norm, np.linalg.norm(ch.wr, axis=0), rtol=1e-14)
    assert np.array_equal(ch.r_inf, np.abs(ch.r).max(axis=0))
    assert np.allclose(ch.r_norm, np.linalg.norm(ch.r, axis=0), rtol=1e-14)
    assert math.isclose(ch.w_fro, float(np.linalg.norm(wo)), rel_tol=1e-12)
    for u, extra, slack in ((2.0**-24, 0.0, 1.0), (2.0**-11, 2.0, 7.5), (2.0**-53, 0.0, 0.0)):
        a, b = ch.tau_terms(u, extra, slack)
        want_a = LAM * (
            u * ((math.sqrt(n_in) + 2.0) * ch.rho + slack * ch.wr_norm)
            + U64 * ((math.sqrt(n_in) + 6.0) * ch.wr_norm + math.sqrt(n_out) * ch.w_fro * ch.r_norm)
        )
        want_b = LAM * (u * (1.0 + extra) * ch.r_inf + U64 * math.sqrt(n_out) * ch.r_norm)
        assert np.allclose(a, want_a, rtol=1e-13, atol=0.0)
        assert np.allclose(b, want_b, rtol=1e-13, atol=0.0)
        assert ch.tau_terms(u, extra, slack)[0] is a  # derived once per arguments


def _rec(seed: int) -> tuple[RecomputedRows, np.ndarray]:
    """Recomputed rows with norms of unequal sizes (3 rows, 4 heads, group 2, d_h 9)."""
    rng = np.random.default_rng(seed)
    shape, kv = (3, 4), (3, 2)
    rec = RecomputedRows(
        np.zeros((3, 4, 9)),
        rng.uniform(0.0, 1e-5, shape),
        rng.uniform(0.5, 3.0, shape),
        rng.uniform(0.5, 3.0, shape),
        rng.uniform(0.5, 3.0, kv),
        rng.uniform(0.5, 3.0, kv),
    )
    return rec, np.array([0, 5, 30], dtype=np.int64)


def test_attention_tau_is_the_documented_bound_on_both_paths() -> None:
    """τ per row and head: λ[u((2.1(√d_h + 2)·S + 2(√m + 4))·V + ‖o‖) + u₆₄(√m + √d_h)(S + 1)·V] with
    S = ‖q‖·max‖k_j‖·scale (the largest |score|), V = max‖v_j‖ of the head's KV head, m = pos + 1 keys;
    attention_excess is max dist/τ on the kernels and the eager path alike."""
    rec, pos = _rec(4)
    scale, u, g = 1.0 / 3.0, 2.0**-24, 2
    s = rec.qnorm * np.repeat(rec.kmax, g, axis=1) * scale
    vv = np.repeat(rec.vmax, g, axis=1)
    m = np.sqrt(pos + 1.0)[:, None]
    want = LAM * (
        u * ((2.1 * (3.0 + 2.0) * s + 2.0 * (m + 4.0)) * vv + rec.onorm) + U64 * (m + 3.0) * (s + 1.0) * vv
    )
    assert np.allclose(attention_tau(rec, pos, g, scale, u), want, rtol=1e-13, atol=0.0)
    ratio = float(np.max(rec.dist / want))
    for fused in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", fused)
            assert math.isclose(attention_excess(rec, pos, g, scale, u), ratio, rel_tol=1e-12)


def _rows64_reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray, pos: np.ndarray, group: int, scale: float
) -> tuple[np.ndarray, ...]:
    """attention_rows64's values, one row and head at a time in float64 (its definition)."""
    q64, k64, v64, o64 = (np.asarray(a, dtype=np.float64) for a in (q, k, v, o))
    n_r, n_h, _ = q.shape
    h_kv = k.shape[1]
    want = np.zeros(q.shape)
    kmax, vmax = np.zeros((n_r, h_kv)), np.zeros((n_r, h_kv))
    for r, p in enumerate(pos.tolist()):
        for kv in range(h_kv):
            kmax[r, kv] = max(np.linalg.norm(k64[j, kv]) for j in range(p + 1))
            vmax[r, kv] = max(np.linalg.norm(v64[j, kv]) for j in range(p + 1))
        for h in range(n_h):
            s = k64[: p + 1, h // group] @ q64[r, h] * scale
            w = np.exp(s - s.max())
            want[r, h] = (w / w.sum()) @ v64[: p + 1, h // group]
    dist = np.linalg.norm(o64 - want, axis=-1)
    return want, dist, np.linalg.norm(o64, axis=-1), np.linalg.norm(q64, axis=-1), kmax, vmax


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "eager"])
def test_attention_rows64_is_the_float64_attention_of_each_row(fused: bool, dtype: Any) -> None:
    """Every field of the recomputed rows — the float64 attention of each row over the keys up to its
    position, the distance to the server's rows, ‖o‖, ‖q‖, and the largest ‖k_j‖, ‖v_j‖ (j ≤ pos) per KV
    head — whatever the input dtype (the arithmetic is float64), on the kernels and the eager path."""
    rng = np.random.default_rng(21)
    q, o = rng.standard_normal((3, 4, 5)).astype(dtype), rng.standard_normal((3, 4, 5)).astype(dtype)
    k = (rng.standard_normal((7, 2, 5)) * rng.uniform(0.2, 3.0, (7, 2, 1))).astype(dtype)
    v = (rng.standard_normal((7, 2, 5)) * rng.uniform(0.2, 3.0, (7, 2, 1))).astype(dtype)
    pos = np.array([0, 3, 6], dtype=np.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        rec = attention_rows64(q, k, v, o, pos, 2, 0.4)
    for got, want in zip(rec, _rows64_reference(q, k, v, o, pos, 2, 0.4), strict=True):
        assert got.dtype == np.float64 and got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-12, atol=1e-14)


# -- check_reply: the reply's header, its arrays, their dtype -------------------------------------------


def _req() -> Request:
    return Request("s1", Stage.O, 2, 3, 4)


def _reply(**kw: Any) -> Reply:
    fields: dict[str, Any] = {"session": "s1", "stage": Stage.O, "layer": 2, "step": 3, "seq": 4}
    fields["arrays"] = {"y": np.ones((2, 3), np.float32)}
    fields.update(kw)
    return Reply(**fields)


def test_check_reply_takes_exactly_the_answer_and_refuses_each_other_header() -> None:
    """The reply answers the request only with the same session, stage, layer, step and sequence number,
    integers of any width but never bools; every other header is refused with what it carried."""
    b = NumpyBackend(W, np.float32)
    out, u = check_reply(b, _req(), _reply(layer=np.int64(2), step=np.int32(3)), {"y": (2, 3)})
    assert set(out) == {"y"} and u == 2.0**-24 and out["y"].dtype == np.float32
    for bad in (
        {"session": "s2"},
        {"session": b"s1"},
        {"stage": Stage.QKV},
        {"stage": 7},
        {"layer": 1},
        {"step": 4},
        {"seq": 5},
        {"layer": 2.0},
        {"seq": np.array([4, 4])},
    ):
        with pytest.raises(IntegrityError, match="o: the reply does not answer the request"):
            check_reply(b, _req(), _reply(**bad), {"y": (2, 3)})
    one = Request("s1", Stage.O, 1, 1, 1)
    for flag in (
        {"layer": True, "step": 1, "seq": 1},
        {"layer": 1, "step": True, "seq": 1},
        {"layer": 1, "step": 1, "seq": True},
    ):
        with pytest.raises(IntegrityError) as err:
            check_reply(b, one, _reply(**flag), {"y": (2, 3)})
        assert str(err.value).startswith("o: the reply does not answer the request (got ('s1', ")
    with pytest.raises(IntegrityError) as err:
        check_reply(b, _req(), {"y": np.ones((2, 3))}, {"y": (2, 3)})
    assert str(err.value) == "o: the reply is a dict, not a Reply"


def test_check_reply_refuses_other_arrays_a_coarser_dtype_and_unchecked_non_finite_entries() -> None:
    """Exactly the expected arrays, of their shape, in the client's dtype or a finer one (a finer one is
    judged at the client's unit roundoff); a NaN is refused here unless a value check reads that array."""
    b = NumpyBackend(W, np.float32)
    expect = {"y": (2, 3), "gu": (2, 4)}
    ok = {"y": np.ones((2, 3), np.float64), "gu": np.ones((2, 4), np.float32)}
    out, u = check_reply(b, _req(), _reply(arrays=ok), expect)
    assert u == 2.0**-24 and set(out) == {"y", "gu"}
    with pytest.raises(IntegrityError) as err:
        check_reply(b, _req(), _reply(arrays={"y": ok["y"], "z": ok["gu"]}), expect)
    assert str(err.value) == "o: the reply carries arrays ['y', 'z'], expected ['gu', 'y']"
    with pytest.raises(IntegrityError) as err:
        check_reply(b, _req(), _reply(arrays=[ok["y"]]), expect)
    assert str(err.value).startswith("o: the reply carries arrays [array(") and str(err.value).endswith(
        ", expected ['gu', 'y']"
    )
    half = {"y": np.ones((2, 3), np.float16), "gu": ok["gu"]}
    with pytest.raises(IntegrityError) as err:
        check_reply(b, _req(), _reply(arrays=half), expect)
    assert str(err.value) == "o: reply y is float16, coarser than the session's float32"
    with pytest.raises(IntegrityError, match=r"^o: reply o\.gu must have shape \(2, 4\)"):
        check_reply(b, _req(), _reply(arrays={"y": ok["y"], "gu": np.ones((4, 2), np.float32)}), expect)
    nan = {"y": ok["y"], "gu": np.full((2, 4), np.nan, np.float32)}
    with pytest.raises(IntegrityError, match=r"^o: "):
        check_reply(b, _req(), _reply(arrays=nan), expect)
    with pytest.raises(IntegrityError, match=r"^o: "):
        check_reply(b, _req(), _reply(arrays=nan), expect, value_checked=("y",))
    out, _ = check_reply(b, _req(), _reply(arrays=nan), expect, value_checked=("gu",))
    assert np.isnan(out["gu"]).all()
    with pytest.raises(IntegrityError) as err:
        check_reply(b, _req(), _reply(arrays={"y": ok["y"], "gu": np.ones((2, 4), np.int64)}), expect)
    assert str(err.value) == "o: unsupported floating dtype int64"


# -- linear_excess: each misfit on its own -----------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "eager"])
def test_linear_excess_refuses_each_misfit_alone_and_judges_the_residual_against_tau(fused: bool) -> None:
    """Products of 3 rows × 2 vectors: any one argument of the wrong shape (the others fitting) is refused
    with the message naming the shapes; fitting ones give max |(y·r − x̂·W r) − b·r| / (‖x̂_i‖a + ‖y_i‖b)."""
    yr = np.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    xr = np.array([[1.0, 1.0], [3.0, -3.0], [0.0, 0.5]])
    bias_r, a, b = np.array([0.0, 0.5]), np.array([1.0, 2.0]), np.array([0.5, 0.25])
    xnorm, ynorm = np.array([1.0, 2.0, 4.0]), np.array([2.0, 1.0, 1.0])
    args = [yr, xr, bias_r, xnorm, ynorm, a, b]
    wrong = [np.ones((3, 3)), np.ones((2, 2)), np.ones(3), np.ones(2), np.ones(4), np.ones(1), np.ones(3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        for i, bad in enumerate(wrong):
            call = list(args)
            call[i] = bad
            with pytest.raises(SCXError, match="do not fit one another") as err:
                linear_excess(*call)
            if i == 4:
                assert str(err.value) == (
                    "a Freivalds check's products (3, 2), (3, 2), norms (3,), (4,) and terms (2,), (2,), "
                    "(2,) do not fit one another (rows × k, rows, k)"
                )
        with pytest.raises(SCXError, match="do not fit one another"):
            # products of one dimension, every other shape derived from them as for rows × k
            linear_excess(yr[0], xr[0], np.zeros(()), np.ones(2), np.ones(2), np.ones(()), np.ones(()))
        got = linear_excess(*args)
    residual = yr - xr - bias_r
    tau = np.multiply.outer(xnorm, a) + np.multiply.outer(ynorm, b)
    assert got == float(np.max(np.abs(residual) / tau)) and got > 0.0


def test_unit_roundoff_of_each_dtype_is_computed_not_only_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cache empty: each floating dtype's unit roundoff (numpy and torch dtypes, by name), cached
    once met; a dtype that is not floating is IntegrityError naming it (and not cached)."""
    import torch

    monkeypatch.setattr(verify, "_UNIT_OF", {})
    want = {np.dtype(np.float64): 2.0**-53, np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11}
    want |= {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
    for dtype, u in want.items():
        assert verify.unit_roundoff(dtype) == u
    assert want == verify._UNIT_OF
    for bad in (np.dtype(np.int64), torch.int32):
        with pytest.raises(IntegrityError) as err:
            verify.unit_roundoff(bad)
        assert str(err.value) == f"unsupported floating dtype {bad}"
    assert want == verify._UNIT_OF


# -- the MLP check's tolerances ---------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mlp_check_uses_the_documented_slacks_and_passes_an_honest_reply(kernels_on: bool, moe: bool) -> None:
    """An honest traced MLP reply passes, and τ's arguments are the documented ones (noted by the sketch
    cache): the server normalized x itself, so its gate/up (and router) inputs are within √d + 4 roundings;
    the client's SwiGLU of the server's gate/up within 4 (dense down check); an MoE's down check sums
    top_k weighted slots (k more output roundings, no input slack: the experts' terms are added apart)."""
    w = W_MOE if moe else W
    b = NumpyBackend(w)
    ver, cache = _verifier(b)
    c, layer = b.config, 1
    for rows in (3, 6):  # 8 vectors for a generation step's rows, 2 for a prompt's
        x = np.random.default_rng(rows).standard_normal((rows, c.hidden_size))
        y, parts = traced_mlp(b, b.norm(x, "mlp", layer), layer)
        before = ver.flops
        ver.mlp(Stage.FFN, layer, x, {"y": y, **parts}, 2.0**-53)
        if not moe:  # metered: gate/up's products and its SwiGLU's, and the rows x and y against W r, r
            kv, f, d = (8 if rows <= 4 else 2), c.intermediate_size, c.hidden_size
            assert ver.flops - before == 2 * rows * (kv + 1) * (2 * f + f + d + d)
    assert 0.0 < ver.worst <= 1.0
    normed = math.sqrt(c.hidden_size) + 4.0
    if moe:  # an expert's gate/up check has as many vectors as the rows routed to it
        noted = cache.noted_terms()
        experts = [n for n in noted if n[0][0] == "w_gate_up"]
        assert len({n[0][2] for n in experts}) >= 2
        assert all(n[0][1] == layer and n[2:] == (2.0**-53, 0.0, normed) for n in experts)
        want = [(("router", layer, None), k, 2.0**-53, 0.0, normed) for k in (8, 2)] + experts
        want += [(("w_down", layer, 0), k, 2.0**-53, float(c.top_k), 0.0) for k in (8, 2)]
    else:
        want = [(("w_gate_up", layer, None), k, 2.0**-53, 0.0, normed) for k in (8, 2)]
        want += [(("w_down", layer, None), k, 2.0**-53, 0.0, 4.0) for k in (8, 2)]
    assert cache.noted_terms() == sorted(want, key=repr)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mlp_refusals_name_the_stage_block_and_product(kernels_on: bool, moe: bool) -> None:
    """A changed entry of gate/up, the router or y is refused naming the stage, the block and the product;
    a row the client sent whose own RMSNorm is not finite (a zero row at rms_eps = 0) is the model's
    NonFiniteError, not the server's fault."""
    b = NumpyBackend(W_MOE if moe else W)
    c, layer = b.config, 1
    x = np.random.default_rng(2).standard_normal((3, c.hidden_size))
    y, parts = traced_mlp(b, b.norm(x, "mlp", layer), layer)
    honest = {"y": y, **parts}
    names = {
        "gu": "the w_gate_up product",
        "y": "the experts' down products" if moe else "the w_down product",
    }
    if moe:
        names["router"] = "the router product"
    for key, what in names.items():
        forged = {k: np.array(a, copy=True) for k, a in honest.items()}
        forged[key].reshape(-1)[0] += 1.0
        with pytest.raises(IntegrityError) as err:
            _verifier(b)[0].mlp(Stage.FFN, layer, x, forged, 2.0**-53)
        assert str(err.value).startswith(f"ffn of block 1: {what} failed verification (|residual| = ")
    if moe:  # the server's own routing refuses such a row's NaN logits before a reply exists
        return
    zero = NumpyBackend(tiny_weights(5, rms_eps=0.0))
    x[1] = 0.0
    with np.errstate(all="ignore"):
        y, parts = traced_mlp(zero, zero.norm(x, "mlp", layer), layer)
    with (
        np.errstate(all="ignore"),
        pytest.raises(NonFiniteError, match=r"^ffn of block 1: the model's own mlp"),
    ):
        _verifier(zero)[0].mlp(Stage.FFN, layer, x, {"y": y, **parts}, 2.0**-53)


def test_the_fused_dense_mlp_check_names_what_failed_and_traces_the_clients_own_norm() -> None:
    """The torch backend's fused gate/up + down verdicts (one compiled call on CPU): a changed gate/up or y
    entry is refused naming the stage, the block and the product; a zero row at rms_eps = 0 that the
    client sent is the model's NonFiniteError."""
    import torch

    from scx_ref.backends.torch_backend import TorchBackend

    for seed, eps in ((5, 1e-6), (5, 0.0)):
        b = TorchBackend(tiny_weights(seed, rms_eps=eps), torch.float64)
        layer = 1
        x_np = np.random.default_rng(2).standard_normal((3, b.config.hidden_size))
        if eps == 0.0:
            x_np[1] = 0.0
        x = b.from_numpy(x_np)
        with np.errstate(all="ignore"):
            y, parts = traced_mlp(b, b.norm(x, "mlp", layer), layer)
        honest = {"y": y, **parts}
        if eps == 0.0:
            with pytest.raises(NonFiniteError, match=r"^ffn of block 1: the model's own mlp RMSNorm"):
                _verifier_of(b).mlp(Stage.FFN, layer, x, honest, 2.0**-53)
            continue
        _verifier_of(b).mlp(Stage.FFN, layer, x, honest, 2.0**-53)
        for key, what in (("gu", "the w_gate_up product"), ("y", "the w_down product")):
            forged = {k: a.clone() for k, a in honest.items()}
            forged[key].reshape(-1)[0] += 1.0
            with pytest.raises(IntegrityError) as err:
                _verifier_of(b).mlp(Stage.FFN, layer, x, forged, 2.0**-53)
            assert str(err.value).startswith(f"ffn of block 1: {what} failed verification (|residual| = ")


def _verifier_of(b: Any) -> SessionVerifier[Any]:
    return SessionVerifier(b, RequestKeys(_keys(10), b.config), SketchCache(b, _keys(0)))


# ==== stop 72 (helper h2): SessionVerifier.lock_step, .gen_last and .mlp ====

# -- SessionVerifier.lock_step ---------------------------------------------------------------------------


def test_lock_step_is_the_steps_own_draw_kept_once_derived() -> None:
    """lock_step(block, step) is the 1 × vectors draw of that generation step (RequestKeys.verify_lock with
    the step: not the prefill's draw, not another step's), and once derived it is kept: a second call
    returns the kept coefficients, not a fresh derivation."""
    ver, _ = _verifier(NumpyBackend(W))
    got = ver.lock_step(1, 3)
    assert got.shape == (1, ver.vectors)
    assert np.array_equal(got, ver.keys.verify_lock(1, 1, ver.vectors, 3))
    assert not np.array_equal(got, ver.keys.verify_lock(1, 1, ver.vectors))
    assert not np.array_equal(got, ver.keys.verify_lock(1, 1, ver.vectors, 4))
    assert ver.lock_step(1, 3) is got and ver._lock_steps[(1, 3)] is got


# -- SessionVerifier.gen_last ----------------------------------------------------------------------------


def _gen_last_case(b: NumpyBackend, layer: int, step: int, m: int) -> tuple[np.ndarray, ...]:
    """An honest gen_last reply as the server computes it: the locked cache (m keys), the row h sent, its
    position, the scores (H × 1 × (m + 1)) and z."""
    c = b.config
    rng = np.random.default_rng(layer + 10 * step)
    locked = rng.standard_normal((m, c.kv_dim))
    h = rng.standard_normal((1, c.hidden_size))
    pos = np.array([m + step])
    z = b.project(b.norm(h, "attn", layer), "wqkv", layer)
    q, k, _ = split_qkv(b, z)
    q, k = b.rope(q, pos), b.rope(k, pos)
    keys = b.append_rows(locked, b.reshape(k, (1, c.kv_dim)))
    scores = b.scores(q, b.reshape(keys, (m + 1, c.n_kv_heads, c.head_dim)))
    return locked, h, pos, np.asarray(scores), np.asarray(z)


def test_gen_last_meters_and_counts_its_checks_and_uses_the_documented_slack(kernels_on: bool) -> None:
    """An honest gen_last reply passes; its checks are metered as documented: z's Freivalds check (one
    row against r and W r: 2·width·(k + 1) each side) plus the scores' 2·H·(m + 1)·k, and counted as
    k + H·k entries; z's τ takes the server's own norm of h (√d + 4 roundings of input slack)."""
    b = NumpyBackend(W)
    c, layer, m, u = b.config, 1, 5, 2.0**-53
    ver, cache = _verifier(b)
    locked, h, pos, scores, z = _gen_last_case(b, layer, 0, m)
    ver.lock(layer, locked)
    flops, checks = ver.flops, ver.checks
    ver.gen_last(layer, 0, h, int(pos[0]), scores, z, u)
    k, H = ver.vectors, c.n_heads
    assert ver.checks - checks == k + H * k
    want = 2 * (k + 1) * (z.shape[1] + c.hidden_size) + 2 * H * (m + 1) * k
    assert ver.flops - flops == want
    assert 0.0 < ver.worst <= 1.0
    normed = math.sqrt(c.hidden_size) + 4.0
    assert cache.noted_terms() == [(("wqkv", layer, None), k, u, 0.0, normed)]
    assert (layer, 0) not in ver._lock_steps  # the step's draw is used once


def test_gen_last_refusals_name_the_block_and_what_failed(kernels_on: bool) -> None:
    """gen_last is refused, naming the block: before the block's locked cache was stored; a changed z
    (the wqkv product); a changed score (against the locked cache); scores for a wrong number of keys."""
    b = NumpyBackend(W)
    layer, m, u = 1, 5, 2.0**-53
    locked, h, pos, scores, z = _gen_last_case(b, layer, 0, m)
    with pytest.raises(IntegrityError) as err:
        _verifier(b)[0].gen_last(layer, 0, h, int(pos[0]), scores, z, u)
    assert str(err.value) == "gen_last of block 1 before its locked cache was stored"
    bad_z = z.copy()
    bad_z[0, 0] += 1.0
    bad_s = scores.copy()
    bad_s[0, 0, 0] += 1.0
    for s, zz, what in (
        (scores, bad_z, "the wqkv product"),
        (bad_s, z, "the scores against the locked cache"),
    ):
        ver, _ = _verifier(b)
        ver.lock(layer, locked)
        with pytest.raises(IntegrityError) as err:
            ver.gen_last(layer, 0, h, int(pos[0]), s, zz, u)
        assert str(err.value).startswith(f"gen_last of block 1: {what} failed verification (|residual| = ")
    ver, _ = _verifier(b)
    ver.lock(layer, locked)
    with pytest.raises(IntegrityError) as err:
        ver.gen_last(layer, 0, h, int(pos[0]), scores[:, :, :m], z, u)
    assert str(err.value) == f"gen_last of block 1: {m} scores for {m + 1} keys"


# -- SessionVerifier.mlp -----------------------------------------------------------------------------------


def test_moe_mlp_down_check_tau_is_the_documented_bound() -> None:
    """The MoE down check's τ is the documented bound: ‖y_i‖·b (k output roundings) + λu Σ_slots |w|·‖m‖·
    ((√f + 2)ρ_e + (4 + 1)‖W_e r‖) + λu₆₄√f Σ_slots |w|·‖m‖·‖W r‖ — computed here from the check vectors."""
    b = NumpyBackend(W_MOE)
    c, layer, u = b.config, 1, 2.0**-53
    ver, _ = _verifier(b)
    x = np.random.default_rng(4).standard_normal((3, c.hidden_size))
    y, parts = traced_mlp(b, b.norm(x, "mlp", layer), layer)
    seen: list[tuple[Any, Any]] = []
    real = verify.excess_ratio

    def spy(residual: Any, tau: Any) -> float:
        seen.append((residual, tau))
        return real(residual, tau)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "excess_ratio", spy)
        ver.mlp(Stage.FFN, layer, x, {"y": y, **parts}, u)
    got = seen[-1][1]
    rows, k, f, kv = 3, c.top_k, c.intermediate_size, ver.vectors
    top, weights = route(np.asarray(parts["router"]), k)
    m_all = np.asarray(b.swiglu_act(np.asarray(parts["gu"]).reshape(rows * k, 2 * f))).reshape(rows, k, f)
    down = ver._check("w_down", layer, 0).first(kv)
    want = np.multiply.outer(np.linalg.norm(y, axis=1), down.tau_terms(u, float(k), 0.0)[1])
    for i in range(rows):
        for s in range(k):
            ch = ver._check("w_down", layer, int(top[i, s])).first(kv)
            wm = abs(weights[i, s]) * np.linalg.norm(m_all[i, s])
            want[i] += 8.0 * u * wm * ((math.sqrt(f) + 2.0) * ch.rho + 5.0 * ch.wr_norm)
            want[i] += 8.0 * 2.0**-53 * math.sqrt(f) * wm * down.wr_norm
    assert got.shape == (rows, kv)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0.0)


def test_moe_mlp_traces_a_non_finite_router_verdict_to_the_clients_own_norm_without_warnings() -> None:
    """MoE: a row the client sent whose own RMSNorm is not finite (a zero row at rms_eps = 0) makes the
    router's verdict not finite; that is the model's NonFiniteError naming the stage and block, and the
    client's norm of it raises no floating-point warning."""
    zero = NumpyBackend(tiny_weights(6, moe=True, rms_eps=0.0))
    c, layer = zero.config, 1
    x = np.random.default_rng(2).standard_normal((3, c.hidden_size))
    y, parts = traced_mlp(zero, zero.norm(x, "mlp", layer), layer)  # a reply for the rows before the zero
    x[1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError) as err:
            _verifier(zero)[0].mlp(Stage.FFN, layer, x, {"y": y, **parts}, 2.0**-53)
    assert str(err.value).startswith(
        "ffn of block 1: the model's own mlp RMSNorm of a row sent is not finite"
    )


def test_the_fused_dense_mlp_check_counts_meters_and_rejudges_tiny_rows() -> None:
    """The torch backend's fused dense MLP verdicts: an honest reply counts rows·k entries for each of the
    two products and meters only their products (no re-judgment of a passing verdict); an honest reply on
    rows whose SwiGLU is ~1e-200 (norm gains ×1e-100: float64 sums of squares underflow) fails the fused
    verdict and passes when judged again with norms that do not underflow (the same τ)."""
    import torch

    from scx_ref.backends.torch_backend import TorchBackend

    w = tiny_weights(5)
    b = TorchBackend(w, torch.float64)
    c, layer, rows = b.config, 1, 3
    x = b.from_numpy(np.random.default_rng(2).standard_normal((rows, c.hidden_size)))
    y, parts = traced_mlp(b, b.norm(x, "mlp", layer), layer)
    ver = _verifier_of(b)
    ver.mlp(Stage.FFN, layer, x, {"y": y, **parts}, 2.0**-53)
    kv, f, d = ver.vectors, c.intermediate_size, c.hidden_size
    assert ver.checks == 2 * rows * kv
    assert ver.flops == 2 * rows * (kv + 1) * (2 * f + f + d + d)
    for lay in w.layers:
        lay.mlp_norm = lay.mlp_norm * 1e-100
    tiny = TorchBackend(w, torch.float64)
    y, parts = traced_mlp(tiny, tiny.norm(x, "mlp", layer), layer)
    ver = _verifier_of(tiny)
    ver.mlp(Stage.FFN, layer, x, {"y": y, **parts}, 2.0**-53)
    assert 0.0 < ver.worst <= 0.25


def _torch_case(gains: float = 1.0) -> tuple[Any, Any, dict[str, Any]]:
    """A float64 TorchBackend of tiny_weights(5) with its MLP norm gains × ``gains``, three rows x and the
    honest traced MLP reply of block 1."""
    import torch

    from scx_ref.backends.torch_backend import TorchBackend

    w = tiny_weights(5)
    for lay in w.layers:
        lay.mlp_norm = lay.mlp_norm * gains
    b = TorchBackend(w, torch.float64)
    x = b.from_numpy(np.random.default_rng(2).standard_normal((3, b.config.hidden_size)))
    y, parts = traced_mlp(b, b.norm(x, "mlp", 1), 1)
    return b, x, {"y": y, **parts}


def test_the_fused_dense_mlp_rejudges_with_the_down_checks_own_tau_terms() -> None:
    """Rows whose SwiGLU is ~1e-200 (fused verdict fails: its sums of squares underflow): the down product
    is judged again once, with the very τ terms (a, b) of the down check (u, no extra output roundings,
    the SwiGLU's 4 roundings of input slack) — the same τ, not a wider one."""
    b, x, reply = _torch_case(1e-100)
    ver = _verifier_of(b)
    calls: list[tuple[Any, ...]] = []
    real = verify.linear_excess

    def spy(*args: Any) -> float:
        calls.append(args)
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "linear_excess", spy)
        ver.mlp(Stage.FFN, 1, x, reply, 2.0**-53)
    assert len(calls) == 1
    a, bb = ver._check("w_down", 1, None).first(ver.vectors).tau_terms(2.0**-53, 0.0, 4.0)
    assert np.array_equal(calls[0][5], a) and np.array_equal(calls[0][6], bb)


@pytest.mark.parametrize("verdict", [1.0, 1.5])
def test_the_fused_dense_down_verdict_is_final_at_one_and_judged_again_above(
    monkeypatch: pytest.MonkeyPatch, verdict: float
) -> None:
    """The fused down verdict (stubbed on an honest reply) is accepted as it is at exactly 1.0 (ratio ≤ 1:
    no second judgment, the largest ratio recorded is 1.0) and judged again above 1 — at 1.5 too, not only
    far above — where the honest reply's own re-judgment passes."""
    b, x, reply = _torch_case()
    real = b.gate_up_excess
    monkeypatch.setattr(b, "gate_up_excess", lambda *args: (real(*args)[0], verdict))
    ver = _verifier_of(b)
    ver.mlp(Stage.FFN, 1, x, reply, 2.0**-53)
    if verdict == 1.0:
        assert ver.worst == 1.0
    else:
        assert ver.worst < 1.0


@pytest.mark.parametrize("verdict", [1.0, 1.5])
def test_the_moe_down_verdict_is_final_at_one_and_judged_again_above(verdict: float) -> None:
    """The MoE experts' down verdict (the mlp check's last, stubbed on an honest reply) is accepted as it
    is at exactly 1.0 (no second judgment: the largest ratio recorded is 1.0) and judged again, with norms
    that neither underflow nor overflow, above 1 — at 1.5 too, not only far above."""
    b = NumpyBackend(W_MOE)
    x = np.random.default_rng(4).standard_normal((3, b.config.hidden_size))
    y, parts = traced_mlp(b, b.norm(x, "mlp", 1), 1)
    reply = {"y": y, **parts}
    real = verify.excess_ratio
    count = [0]

    def counting(residual: Any, tau: Any) -> float:
        count[0] += 1
        return real(residual, tau)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "excess_ratio", counting)
        _verifier(b)[0].mlp(Stage.FFN, 1, x, reply, 2.0**-53)
    last, count[0] = count[0], 0

    def stub(residual: Any, tau: Any) -> float:
        count[0] += 1
        return verdict if count[0] == last else real(residual, tau)

    ver, _ = _verifier(b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "excess_ratio", stub)
        ver.mlp(Stage.FFN, 1, x, reply, 2.0**-53)
    assert count[0] == (last if verdict == 1.0 else last + 1)
    if verdict == 1.0:
        assert ver.worst == 1.0
    else:
        assert ver.worst < 1.0


# ==== stop 72 (helper h3): LockSketch.start, lock_scores_excess, SessionVerifier.attention_rows, _host, lock

# -- LockSketch.start, lock_scores_excess ------------------------------------------------------------------


def test_lock_sketch_start_is_the_sums_over_the_locked_keys() -> None:
    """The sketch of locked keys K_j with coefficients c: κ_v = Σ_j c_jv K_j, Σ_j c_jv²‖K_jh‖², no slack,
    max_j |c_jv| (what bounds the scores' output rounding in τ; 0 with no keys) and Σ_j c_jv²."""
    rng = np.random.default_rng(11)
    coef, keys = rng.standard_normal((5, 3)), rng.standard_normal((5, 2, 4))
    lk = LockSketch.start(coef, keys)
    for v in range(3):
        assert np.allclose(lk.kappa[v], sum(coef[j, v] * keys[j] for j in range(5)), rtol=1e-13)
        for h in range(2):
            want = sum(coef[j, v] ** 2 * float(keys[j, h] @ keys[j, h]) for j in range(5))
            assert math.isclose(lk.sq[v, h], want, rel_tol=1e-13)
        assert lk.cmax[v] == max(abs(coef[j, v]) for j in range(5)) > 0.0
        assert math.isclose(lk.csq[v], float(coef[:, v] @ coef[:, v]), rel_tol=1e-13)
    assert np.array_equal(lk.slack, np.zeros((3, 2))) and lk.coef is coef
    none = LockSketch.start(np.zeros((0, 3)), np.zeros((0, 2, 4)))
    assert np.array_equal(none.cmax, np.zeros(3)) and np.array_equal(none.kappa, np.zeros((3, 2, 4)))


def _lock_case(seed: int) -> tuple[np.ndarray, ...]:
    """5 locked keys (H_kv 2, d_h 4) sketched with k = 3 vectors, a step's [q; k] (4 query heads, group
    2), its coefficients and its 6 scores, the honest ones moved by a relative 10⁻³ (a residual far above
    float64 rounding, so that every implementation of the check gets the same ratio)."""
    rng = np.random.default_rng(seed)
    keys, coef = rng.standard_normal((5, 2, 4)), rng.standard_normal((5, 3))
    qk, new = rng.standard_normal((6, 4)), rng.standard_normal(3)
    every = np.concatenate([keys, qk[None, 4:]])
    s = np.einsum("hd,jhd->hj", qk[:4], np.repeat(every, 2, axis=1)) * 0.5
    return keys, coef, qk, new, s * (1.0 + 1e-3 * rng.standard_normal(s.shape))


def _lock_reference(
    keys: np.ndarray, coef: np.ndarray, qk: np.ndarray, new: np.ndarray, s: np.ndarray, u: float
) -> tuple[float, tuple[np.ndarray, ...]]:
    """lock_scores_excess by its definition, one head and vector at a time (group 2, scale ½): the sketch
    extended by the step's key k with coefficients c' (its slack |c'_v|·2λ·5u‖k‖: the two sides' RoPE),
    and max |Σ_j s_hj c_jv − ½ q_h·κ_v| / τ_hv with τ = λu(√d_h + 3)·qs·√(Σ_j c_jv²‖K_j‖²) + λu‖s_h‖·max|c_v|
    + 2λ·5u·qs·‖κ_v‖ + qs·slack_v + λu₆₄√m‖s_h‖‖c_v‖, qs = ½‖q_h‖, m the keys with the new one."""
    n_h, d_h = 4, 4
    rope = 2.0 * LAMBDA * 5.0 * u
    c2, k2 = np.vstack([coef, new]), np.concatenate([keys, qk[None, n_h:]])
    m, k = c2.shape
    kappa = np.einsum("jv,jhd->vhd", c2, k2)
    sq = np.array(
        [
            [sum(c2[j, v] ** 2 * float(k2[j, g] @ k2[j, g]) for j in range(m)) for g in (0, 1)]
            for v in range(k)
        ]
    )
    slack = np.abs(new)[:, None] * rope * np.linalg.norm(qk[n_h:], axis=1)[None, :]
    cmax, csq = np.abs(c2).max(axis=0), (c2 * c2).sum(axis=0)
    worst = 0.0
    for h in range(n_h):
        g, qs, snorm = h // 2, float(np.linalg.norm(qk[h])) * 0.5, float(np.linalg.norm(s[h]))
        for v in range(k):
            tau = (
                LAMBDA * u * (math.sqrt(d_h) + 3.0) * qs * math.sqrt(sq[v, g])
                + LAMBDA * u * snorm * cmax[v]
                + rope * qs * float(np.linalg.norm(kappa[v, g]))
                + qs * slack[v, g]
                + LAMBDA * 2.0**-53 * math.sqrt(m) * snorm * math.sqrt(csq[v])
            )
            worst = max(worst, abs(float(s[h] @ c2[:, v]) - 0.5 * float(qk[h] @ kappa[v, g])) / tau)
    return worst, (c2, kappa, sq, slack, cmax, csq)


@pytest.mark.parametrize("u", [2.0**-53, 2.0**-24])
@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "eager"])
def test_lock_scores_excess_is_the_documented_tau_and_extension(fused: bool, u: float) -> None:
    """The locked-score verdict is |residual|/τ with each of τ's terms as documented — the RoPE slack 2λ·5u
    (on q against κ and on the appended key), the output rounding λu‖s_h‖·max|c|, the client's float64
    sums λu₆₄·√m (m the keys, not the vectors) ·‖s_h‖·‖c‖ added — and the sketch extended by the step's
    key, on the kernels and the eager path (in float64, where the client's own term is of τ's size)."""
    keys, coef, qk, new, s = _lock_case(4)
    want, want_lk = _lock_reference(keys, coef, qk, new, s, u)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        got, lk = lock_scores_excess(LockSketch.start(coef, keys), qk, new, s, 2, 0.5, u)
    assert math.isclose(got, want, rel_tol=1e-9) and got > 1.0
    for field, ref in zip(("coef", "kappa", "sq", "slack", "cmax", "csq"), want_lk, strict=True):
        assert np.allclose(getattr(lk, field), ref, rtol=1e-12, atol=0.0), field


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "eager"])
def test_lock_scores_excess_refuses_non_finite_scores_without_a_warning(fused: bool) -> None:
    """A NaN, ±inf, or scores whose squares overflow float64 give a verdict that is not finite (refused)
    with no floating-point warning on the way, whatever the caller's error state."""
    keys, coef, qk, new, s = _lock_case(5)
    for bad in ([math.inf, -math.inf], [math.nan], [1e200], [math.inf], [-1e300, 1e300]):
        scores = s.copy()
        scores[1, : len(bad)] = bad
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(), np.errstate(all="warn"):
            mp.setattr(cpu_kernels, "ENABLED", fused)
            warnings.simplefilter("error")
            got, _ = lock_scores_excess(LockSketch.start(coef, keys), qk, new, scores, 2, 0.5, 2.0**-24)
        assert math.isnan(got), bad


def test_lock_scores_excess_takes_any_float_dtype_as_its_float64_values() -> None:
    """The compiled check reads float64: [q; k], coefficients and scores given in float16 (a dtype the
    kernels do not take) or float32 give the verdict and sketch of their float64 values."""
    keys, coef, qk, new, s = _lock_case(6)
    lk = LockSketch.start(coef, keys)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", True)
        if cpu_kernels.kernels() is None:
            pytest.skip("numba not installed")
        for dtype in (np.float16, np.float32):
            narrow = [a.astype(dtype) for a in (qk, new, s)]
            got, ext = lock_scores_excess(lk, narrow[0], narrow[1], narrow[2], 2, 0.5, 2.0**-24)
            wide = [a.astype(np.float64) for a in narrow]
            want, ext64 = lock_scores_excess(lk, wide[0], wide[1], wide[2], 2, 0.5, 2.0**-24)
            assert got == want and np.array_equal(ext.kappa, ext64.kappa) and ext.kappa.dtype == np.float64


def test_lock_scores_excess_names_the_shapes_that_do_not_fit() -> None:
    """Scores for fewer keys than the sketch holds are refused by the compiled check with the message
    naming the scores' and [q; k]'s shapes."""
    keys, coef, qk, new, s = _lock_case(7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", True)
        if cpu_kernels.kernels() is None:
            pytest.skip("numba not installed")
        with pytest.raises(SCXError) as err:
            lock_scores_excess(LockSketch.start(coef, keys), qk, new, s[:, :5], 2, 0.5, 2.0**-24)
    assert str(err.value) == "scores (4, 5) and a step's [q; k] (6, 4) do not fit the locked sketch"


# -- SessionVerifier.attention_rows, _host, lock --------------------------------------------------------


def test_attention_rows_of_an_empty_prompt_are_none() -> None:
    """No rows for n = 0 (no last row to add: row −1 is not a row); for n = 1 the one row."""
    ver, _ = _verifier(NumpyBackend(W))
    assert ver.attention_rows(0, 0).tolist() == [] and ver.attention_rows(1, 1).tolist() == [0]


def test_host_is_a_float64_host_array_and_no_copy_of_one() -> None:
    """_host gives float64 numpy arrays of the same values for numpy arrays of other dtypes and for
    torch tensors, and a float64 numpy array itself (no copy)."""
    import torch

    from scx_ref.backends.torch_backend import TorchBackend

    ver, _ = _verifier(NumpyBackend(W))
    x64 = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    assert ver._host(x64) is x64
    x32 = x64.astype(np.float32)
    got = ver._host(x32)
    assert got.dtype == np.float64 and np.array_equal(got, x32.astype(np.float64))
    tb = TorchBackend(W, torch.float32)
    tver = SessionVerifier(tb, RequestKeys(_keys(10), tb.config), SketchCache(tb, _keys(0)))
    got = tver._host(torch.from_numpy(x32))
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert np.array_equal(got, x32.astype(np.float64))


def test_lock_meters_its_products_and_sketches_the_locked_cache() -> None:
    """lock adds 4·(cache entries)·vectors to the metered flops (to what was metered before) and keeps the
    sketch of the locked cache, as columns × H_kv × d_h, with the block's secret coefficients."""
    b = NumpyBackend(W)
    c = b.config
    ver, _ = _verifier(b)
    ver.flops = 1000
    locked = np.random.default_rng(3).standard_normal((7, c.n_kv_heads * c.head_dim))
    ver.lock(1, locked)
    assert ver.flops == 1000 + 4 * locked.size * ver.vectors
    want = LockSketch.start(
        ver.keys.verify_lock(1, 7, ver.vectors), locked.reshape(7, c.n_kv_heads, c.head_dim)
    )
    assert np.array_equal(ver._locks[1].kappa, want.kappa) and np.array_equal(ver._locks[1].coef, want.coef)


# ==== stop 72 (helper h4): linear, _linear_judge, _accept, _check, check_reply, SketchCache.get and more ====

# -- SessionVerifier.linear, SessionVerifier._linear_judge ------------------------------------------------


def _one_entry_check() -> _Check:
    """A hand-made check of a 1 × 1 matrix W = 0 with r = 1 (so x·W r = 0 and y·r = y) and τ's terms
    a = 1, b = 0 for (u, extra, slack) = (2⁻⁵³, 0, 1): τ = ‖x‖, the verdict |y| / ‖x‖ per row."""
    one, zero = np.ones(1), np.zeros(1)
    ch = _Check(np.ones((1, 1)), np.zeros((1, 1)), one, zero, one, one, 0.0, zero.copy())
    ch.memo[("tau", 2.0**-53, 0.0, 1.0)] = (np.ones(1), np.zeros(1))
    return ch


def test_linear_uses_the_documented_input_slack() -> None:
    """τ's input slack for y = x̂·W: 1 rounding for rows the client sent as they are (no norm), √in + 4
    for a norm the server recomputes (in = W's input width, not the number of check vectors), and the
    caller's ``input_slack`` when given — noted by the sketch cache and the one the verdict is judged by."""
    b = NumpyBackend(W)
    c, u, rows = b.config, 2.0**-53, 3
    x = np.random.default_rng(4).standard_normal((rows, c.hidden_size))
    cases = [
        ("wo", None, None, 1.0),
        ("wqkv", "attn", None, math.sqrt(c.hidden_size) + 4.0),
        ("wqkv", "attn", 3.5, 3.5),
        ("wo", None, 2.5, 2.5),
    ]
    for which, norm, given, slack in cases:
        ver, cache = _verifier(b, SketchCache(b, _keys(0)))
        xn = x if norm is None else b.norm(x, norm, 1)
        y = np.asarray(b.project(xn, which, 1))
        ver.linear(Stage.O, 1, x, y, which, u, norm=norm, norm_layer=1, input_slack=given)
        k = ver.vectors_for(rows)
        assert k not in (c.hidden_size, c.q_dim)  # √in + 4 is told apart from √k + 4
        assert cache.noted_terms() == [((which, 1, None), k, u, 0.0, slack)]
        ch = ver._check(which, 1, None).first(k)
        yr, ynorm = b.project64(y, ch.r)
        xr, xnorm = b.project64(xn, ch.wr)
        want = linear_excess(yr, xr, ch.bias_r, xnorm, ynorm, *ch.tau_terms(u, 0.0, slack))
        assert 0.0 < ver.worst == want <= 1.0


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba not installed: no backend fuses the check")
def test_linear_on_a_fusing_backend_is_one_call_and_meters_both_sides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the backend fuses the check (the torch backend on CPU), linear's verdict is its one
    ``freivalds_excess`` call — no separate project64 / project64_norm pass over the rows — and the products
    of the rows y with r and x̂ with W r are still metered: 2·rows·width·(k + 1) flops each."""
    torch = pytest.importorskip("torch")
    from scx_ref.backends.torch_backend import TorchBackend

    b = TorchBackend(W, torch.float32)
    c, rows = b.config, 3

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("a separate pass over the rows")

    for name in ("project64", "project64_norm"):
        monkeypatch.setattr(b, name, no_pass)
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((rows, c.q_dim)).astype(np.float32))
    assert b._fused(x) is not None  # the fused path applies
    assert c.q_dim == c.hidden_size  # the same rows serve as the O stage's and the QKV stage's input
    for which, norm in (("wo", None), ("wqkv", "attn")):
        y = b.project(x if norm is None else b.norm(x, "attn", 0), which, 0)
        ver, _ = _verifier(b)  # type: ignore[arg-type]
        ver.linear(Stage.O, 0, x, y, which, 2.0**-24, norm=norm, norm_layer=0)
        k = ver.vectors_for(rows)
        assert ver.flops == 2 * rows * (x.shape[1] + y.shape[1]) * (k + 1)
        assert 0.0 < ver.worst <= 1.0


def test_linear_judge_takes_a_verdict_of_exactly_one_as_it_is() -> None:
    """A verdict of exactly 1 (|residual| = τ) passes: it is recorded as it is, and the rows are not read
    a second time (the re-judgment is for a failing verdict only)."""
    b = NumpyBackend(W, np.float64)
    ver, _ = _verifier(b)
    x, y = np.ones((1, 1)), np.ones((1, 1))
    ver._linear_judge(Stage.O, 0, "wo", 2.0**-53, _one_entry_check(), y, x, 1.0)
    assert ver.worst == 1.0  # 1 / ‖x‖ = 1 exactly; the re-judged norm (√ with slack) would give less
    assert ver.flops == 2 * (2 * 1 * 1 * 2) and ver.checks == 1


def test_linear_judge_rejudges_a_failing_verdict_on_rows_the_client_holds_only() -> None:
    """A verdict that fails because the float64 sum of squares underflows (‖x‖ of a row s = 1.2·2⁻⁵³⁷:
    s² rounds down to 2⁻¹⁰⁷⁴, ‖x‖ to s / 1.2, so the plain verdict is ≈ 1.2) is judged again with
    row_norms — for x given as rows, or as Products with ``x_rows`` — and passes; with Products and no
    rows to read it is refused as it stands (IntegrityError, nothing else)."""
    b = NumpyBackend(W, np.float64)
    s = 1.2 * 2.0**-537
    x, y = np.full((1, 1), s), np.full((1, 1), s)
    plain = b.project64(x, np.zeros((1, 1)))
    assert 1.1 < s / float(plain[1][0]) < 2.0  # the plain verdict fails, by less than a factor 2
    for given in ("rows", "products"):
        ver, _ = _verifier(b)
        xs = x if given == "rows" else plain
        ver._linear_judge(Stage.O, 0, "wo", 2.0**-53, _one_entry_check(), y, xs, 1.0, x_rows=lambda: x)
        assert 0.99 < ver.worst <= 1.0
    ver, _ = _verifier(b)
    with pytest.raises(IntegrityError, match="block 0: the wo product failed verification"):
        ver._linear_judge(Stage.O, 0, "wo", 2.0**-53, _one_entry_check(), y, plain, 1.0)
    assert ver.worst == 0.0


def test_accept_refuses_a_verdict_over_one_and_one_not_finite_naming_the_stage_block_and_product() -> None:
    """A verdict just over the bound (|residual| = 1.5 τ, re-judged and still over) and a NaN residual are
    refused with IntegrityError naming the stage, the block and the product; neither is recorded as the
    worst verdict passed."""
    b = NumpyBackend(W, np.float64)
    x = np.ones((1, 1))
    for y, says in (
        (np.full((1, 1), 1.5), r"o of block 2: the wo product failed verification \(\|residual\| = 1\.5 ×"),
        (np.full((1, 1), np.nan), "o of block 2: the wo product is not finite"),
    ):
        ver, _ = _verifier(b)
        with pytest.raises(IntegrityError, match=says):
            ver._linear_judge(Stage.O, 2, "wo", 2.0**-53, _one_entry_check(), y, x, 1.0)
        assert ver.worst == 0.0


def test_linear_checks_count_rows_times_vectors_and_add_up() -> None:
    """Each linear verdict counts rows × k checked entries — the rows of x (its rows, or its Products'
    rows), not its width or k — and the counts of a session's verdicts add up."""
    b = NumpyBackend(W)
    c, u, rows = b.config, 2.0**-53, 3
    ver, _ = _verifier(b)
    k = ver.vectors_for(rows)
    x = np.random.default_rng(6).standard_normal((rows, c.q_dim))
    y = np.asarray(b.project(x, "wo", 0))
    assert len({rows, k, c.q_dim}) == 3
    ver.linear(Stage.O, 0, x, y, "wo", u)
    assert ver.checks == rows * k
    ch = ver._check("wo", 0, None).first(k)
    ver._linear_judge(Stage.O, 0, "wo", u, ch, y, b.project64(x, ch.wr), 1.0)
    assert ver.checks == 2 * rows * k


def test_vectors_for_gives_every_vector_up_to_few_rows() -> None:
    """A reply of at most FEW_ROWS rows (a generation step) is checked with all the session's vectors; one
    more row, with VECTORS_MANY."""
    ver, _ = _verifier(NumpyBackend(W))
    assert [ver.vectors_for(n) for n in (1, verify.FEW_ROWS, verify.FEW_ROWS + 1)] == [
        ver.vectors,
        ver.vectors,
        min(ver.vectors, verify.VECTORS_MANY),
    ]
    assert ver.vectors > verify.VECTORS_MANY


def test_first_of_all_vectors_is_the_check_itself() -> None:
    """``first(k)`` for k ≥ the check's vectors is the check itself, so τ's terms derived on it (ahead, by
    ``prepare``) are the ones a reply of few rows reads, not derived again."""
    ver, _ = _verifier(NumpyBackend(W))
    ch = ver._check("wo", 0, None)
    a, _b = ch.tau_terms(2.0**-53, 0.0, 1.0)
    for k in (ver.vectors, ver.vectors + 1):
        same = ch.first(k)
        assert same is ch and same.tau_terms(2.0**-53, 0.0, 1.0)[0] is a
    assert ch.first(ver.vectors - 1) is not ch


def test_sketch_cache_computes_each_matrix_once_per_basis(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix's sketch is computed on first use only (one ``weight_sketch`` pass over W) and then served
    as the same object — until a rotation moves the cache to a fresh basis; a sketch whose computation a
    rotation overtook is not kept."""
    b = NumpyBackend(W)
    cache = SketchCache(b, _keys(2))
    passes: list[tuple[object, ...]] = []
    sketch = b.weight_sketch

    def counted(*args: Any) -> Any:
        passes.append(args[:3])
        return sketch(*args)

    monkeypatch.setattr(b, "weight_sketch", counted)
    first = cache.get("wo", 1, None)
    assert cache.get("wo", 1, None) is first and passes == [("wo", 1, None)]
    cache.rotate()
    second = cache.get("wo", 1, None)
    assert second is not first and len(passes) == 2
    assert not np.array_equal(second.basis, first.basis)
    # a rotation while a sketch is being computed (another request detected tampering): that sketch, of the
    # discarded basis, is not kept — the next use computes one from the fresh basis
    rotate_during = [True]

    def rotating(*args: Any) -> Any:
        if rotate_during.pop() if rotate_during else False:
            cache.rotate()
        return counted(*args)

    monkeypatch.setattr(b, "weight_sketch", rotating)
    stale = cache.get("w_down", 0, None)
    fresh = cache.get("w_down", 0, None)
    assert fresh is not stale and not np.array_equal(fresh.basis, stale.basis) and len(passes) == 4
    assert cache.get("w_down", 0, None) is fresh and len(passes) == 4


def test_one_expert_moe_mlp_reply_is_checked() -> None:
    """An MoE of one expert (top_k = 1, a valid config) is checked like any other: its down maps share the
    r drawn for expert 0 — the only expert there is — and an honest traced reply passes."""
    w = tiny_weights(8, moe=True, n_experts=1, top_k=1)
    b = NumpyBackend(w)
    ver, _ = _verifier(b)
    x = np.random.default_rng(7).standard_normal((3, b.config.hidden_size))
    y, parts = traced_mlp(b, b.norm(x, "mlp", 1), 1)
    ver.mlp(Stage.FFN, 1, x, {"y": y, **parts}, 2.0**-53)
    assert 0.0 < ver.worst <= 1.0
    assert ("w_down", 1, 0) in ver._checks  # the down check ran


class _NoDtype:
    """A backend without a ``dtype`` attribute (the Backend protocol does not name one): ``b``'s methods."""

    def __init__(self, b: NumpyBackend) -> None:
        self._b = b

    def __getattr__(self, name: str) -> Any:
        if name == "dtype":
            raise AttributeError(name)
        return getattr(self._b, name)


def test_check_reply_judges_at_the_clients_compute_dtype() -> None:
    """check_reply's unit roundoff is the client's compute dtype: a bfloat16 torch backend's 2⁻⁸ (its arrays
    leave in float32, whose 2⁻²⁴ would refuse its own bf16 rows as coarser), and for a backend without a
    ``dtype`` attribute its ``numpy_dtype``'s."""
    plain = _NoDtype(NumpyBackend(W, np.float32))
    out, u = check_reply(plain, _req(), _reply(), {"y": (2, 3)})  # type: ignore[arg-type]
    assert u == 2.0**-24 and out["y"].dtype == np.float32
    torch = pytest.importorskip("torch")
    from scx_ref.backends.torch_backend import TorchBackend

    bf = TorchBackend(W, torch.bfloat16)
    assert bf.numpy_dtype() == np.float32
    out, u = check_reply(
        bf, _req(), _reply(arrays={"y": torch.ones(2, 3, dtype=torch.bfloat16)}), {"y": (2, 3)}
    )
    assert u == 2.0**-8 and out["y"].dtype == torch.bfloat16


def test_check_reply_refuses_a_reply_entry_without_a_dtype_by_what_it_is() -> None:
    """An array entry without a dtype is judged by its type's name: a Python float (float64, finer) passes
    the dtype gate and is refused as not an array; a list, as no floating dtype at all."""
    b = NumpyBackend(W, np.float32)
    for raw, says in (
        (2.5, "o: reply o.y must be a numpy array, got float"),
        ([[1.0] * 3] * 2, "o: unsupported floating dtype list"),
    ):
        with pytest.raises(IntegrityError) as err:
            check_reply(b, _req(), _reply(arrays={"y": raw}), {"y": (2, 3)})
        assert str(err.value) == says


class _UnhashableName(list[Any]):
    """An unhashable object whose str is a floating dtype's name (float_dtype_name reads names)."""

    def __str__(self) -> str:
        return "float32"


def test_unit_roundoff_answers_an_unhashable_dtype_without_memoising_it() -> None:
    """unit_roundoff memoises hashable dtypes only: an unhashable one naming float32 is still answered
    (2⁻²⁴), not refused with the memo's TypeError."""
    assert verify.unit_roundoff(_UnhashableName()) == 2.0**-24
    assert verify.unit_roundoff(_UnhashableName()) == 2.0**-24


# -- SketchCache.__init__, SessionVerifier.attention / _attention_fused (stop 73: the mutants mutmut had
#    stopped at its wall clock, run to the end outside it) ------------------------------------------------


def test_sketch_cache_refuses_what_it_cannot_use_with_its_message_and_takes_a_basis_of_one() -> None:
    """A backend without a model configuration, keys that are no KeySchedule and a basis that is not an
    integer >= 1 are ProtocolErrors (not ConfigErrors) naming what is wrong; a basis of 1 (Python or numpy
    integer) is taken as it is."""
    b = NumpyBackend(W)
    cases: list[tuple[Any, Any, Any, str]] = [
        (object(), _keys(0), 2, "backend must be a Backend, got object"),
        (None, _keys(0), 2, "backend must be a Backend, got NoneType"),
        (b, "keys", 2, "keys must be a KeySchedule, got str"),
        (b, _keys(0), 0, "basis must be >= 1, got 0"),
        (b, _keys(0), -1, "basis must be >= 1, got -1"),
        (b, _keys(0), True, "basis must be an integer, got bool True"),
        (b, _keys(0), 1.0, "basis must be an integer, got float 1.0"),
    ]
    for backend, keys, basis, message in cases:
        with pytest.raises(SCXError) as err:
            SketchCache(backend, keys, basis)
        assert type(err.value).__name__ == "ProtocolError" and str(err.value) == message
    assert SketchCache(b, _keys(0), 1).m == 1 and SketchCache(b, _keys(0), np.int64(2)).m == 2


def _attention_case(dtype: Any, n_q: int, first: int, seed: int = 0) -> tuple[Any, ...]:
    """Queries at positions first … first + n_q − 1 of W's shapes over first + n_q keys and values, and
    their exact causal GQA attention outputs (computed in float64, rounded to ``dtype``)."""
    c = W.config
    rng = np.random.default_rng(seed)
    n_k = first + n_q
    q = rng.standard_normal((n_q, c.n_heads, c.head_dim))
    k = rng.standard_normal((n_k, c.n_kv_heads, c.head_dim))
    v = rng.standard_normal((n_k, c.n_kv_heads, c.head_dim))
    o = ops.attention(q, k, v, mask=ops.causal_mask(n_q, n_k))  # the reference forward's attention
    return tuple(a.astype(dtype) for a in (q, k, v, o))


def _attention_run(
    dtype: Any, rows: Any, n_q: int = 6, first: int = 3, forge: bool = False, fused: bool = True
) -> tuple[list[tuple[Any, ...]], int, int, bool]:
    """SessionVerifier.attention on one case: the (layer, ratio, checks, what) it accepted, its flops, the
    compiled calls it made and whether the fused path answered."""
    b = NumpyBackend(W, dtype)
    ver, _ = _verifier(b)
    q, k, v, o = _attention_case(dtype, n_q, first)
    if forge:
        o[rows[-1] if len(rows) else 0, 0, 0] += 4.0
    seen: list[tuple[Any, ...]] = []
    calls: list[int] = []
    answered: list[bool] = []
    kern = cpu_kernels.kernels()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        mp.setattr(ver, "_accept", lambda stage, layer, ratio, n, what: seen.append((layer, ratio, n, what)))
        if kern is not None and fused:
            real = kern.attention_check
            counted = dataclasses.replace(kern, attention_check=lambda *a: (calls.append(1), real(*a))[1])
            mp.setattr(verify, "kernels", lambda: counted)
        inner = ver._attention_fused
        mp.setattr(ver, "_attention_fused", lambda *a: (answered.append(inner(*a)), answered[-1])[1])
        ver.attention(
            Stage.ATTN, 1, q, k, v, o, float(np.finfo(dtype).eps) / 2, np.asarray(rows, np.int64), first
        )
    return seen, ver.flops, len(calls), answered[0]


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba not installed: nothing is fused")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [[1, 4], [0, 1, 2, 3, 4, 5], []])
def test_attention_is_one_compiled_call_with_the_eager_paths_counts_flops_and_block(
    dtype: Any, rows: list[int]
) -> None:
    """With the kernels installed, float32 and float64 host arrays are checked in one compiled call (the
    fused path answers): the same block, check counts, messages and flops as the eager path — the range
    check (1 check, 4·n_q·H·d_h flops) unless every row is recomputed, then H checks per recomputed row and
    4·H·d_h·Σ(pos + 1) flops — honest outputs accepted by both with rounding-level ratios, and a forged entry
    refused."""
    c = W.config
    n_q, first = 6, 3
    every = len(rows) == n_q
    want_flops = (0 if every else 4 * n_q * c.n_heads * c.head_dim) + 4 * c.n_heads * c.head_dim * sum(
        first + r + 1 for r in rows
    )
    want = ([] if every else [(1, 1, "an attention row outside its values' range")]) + (
        [(1, len(rows) * c.n_heads, "a recomputed attention row")] if rows else []
    )
    fused, flops, calls, answered = _attention_run(dtype, rows)
    eager, eager_flops, eager_calls, eager_answered = _attention_run(dtype, rows, fused=False)
    assert answered and calls == 1 and not eager_answered and eager_calls == 0
    assert flops == eager_flops == want_flops
    assert [(layer, n, what) for layer, _, n, what in fused] == want
    assert [(layer, n, what) for layer, _, n, what in eager] == want
    for (_, r1, _, _), (_, r2, _, _) in zip(fused, eager, strict=True):
        assert 0.0 <= r1 < 0.1 and 0.0 <= r2 < 0.1  # rounding-level residuals (in another order when eager)
    if rows:
        forged, _, _, _ = _attention_run(dtype, rows, forge=True)
        assert forged[-1][1] > 1.0


def test_attention_of_a_dtype_the_kernels_do_not_take_is_checked_eagerly() -> None:
    """float16 arrays are not the compiled check's (float32/float64 only): the fused path declines
    (nothing checked there) and the eager checks run, so a forged entry is still refused."""
    rows = [1, 4]
    seen, flops, calls, answered = _attention_run(np.float16, rows)
    assert not answered and calls == 0 and flops > 0
    assert [what for *_, what in seen] == [
        "an attention row outside its values' range",
        "a recomputed attention row",
    ]
    forged, _, _, _ = _attention_run(np.float16, rows, forge=True)
    assert forged[-1][1] > 1.0


def test_attention_recomputes_every_row_once_without_the_range_check_and_only_then() -> None:
    """The range check is skipped only when the recomputed rows are each query once: not for as many rows
    with one repeated, nor for all but one."""
    n_q = 6
    for rows, ranged in [
        ([0, 1, 2, 3, 4, 5], False),
        ([5, 3, 1, 0, 2, 4], False),
        ([0, 0, 2, 3, 4, 5], True),
        ([0, 1, 2, 3, 4], True),
    ]:
        for fused in [True, False] if cpu_kernels.kernels() is not None else [False]:
            seen, _, _, _ = _attention_run(np.float64, rows, n_q=n_q, fused=fused)
            got = [what for *_, what in seen]
            assert ("an attention row outside its values' range" in got) == ranged, (rows, fused)
            assert got[-1] == "a recomputed attention row"


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba not installed: nothing is fused")
def test_attention_fused_refuses_arrays_the_kernel_finds_misfit_naming_them() -> None:
    """The compiled check reports arrays that do not fit one another (outputs of fewer heads than the
    queries) as −1 twice; that is a ShapeError naming the shapes, never a verdict."""
    b = NumpyBackend(W, np.float64)
    ver, _ = _verifier(b)
    q, k, v, o = _attention_case(np.float64, 4, 0)
    with pytest.raises(SCXError) as err:
        ver._attention_fused(Stage.ATTN, 0, (q, k, v, o[:, :1]), 2.0**-53, np.array([0, 3]), 0, False)
    assert str(err.value) == (
        f"queries {q.shape}, outputs {o[:, :1].shape} from position 0, keys {k.shape}, values {v.shape} and "
        "recomputed rows [0, 3] do not fit one another"
    )


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba not installed: nothing is fused")
def test_attention_of_mixed_dtypes_is_checked_eagerly() -> None:
    """The compiled check takes four arrays of one dtype: queries in float32 with float64 keys, values and
    outputs are declined by the fused path (it checks nothing) and checked eagerly, honest rows accepted."""
    b = NumpyBackend(W, np.float64)
    ver, _ = _verifier(b)
    q, k, v, o = _attention_case(np.float64, 6, 3)
    seen: list[tuple[Any, ...]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ver, "_accept", lambda stage, layer, ratio, n, what: seen.append((layer, ratio, n, what)))
        rows = np.array([1, 4], np.int64)
        assert not ver._attention_fused(
            Stage.ATTN, 1, (q.astype(np.float32), k, v, o), 2.0**-24, rows, 3, False
        )
        assert not seen and ver.flops == 0
        ver.attention(Stage.ATTN, 1, q.astype(np.float32), k, v, o, 2.0**-24, rows, 3)
    assert [(layer, n, what) for layer, _, n, what in seen] == [
        (1, 1, "an attention row outside its values' range"),
        (1, 2 * W.config.n_heads, "a recomputed attention row"),
    ]
    assert all(0.0 <= ratio < 1.0 for _, ratio, _, _ in seen)


@pytest.mark.parametrize("push", [0.0, 0.5, 3.0])
def test_attention_range_check_ratio_is_the_excess_over_the_documented_slack_on_both_paths(
    push: float,
) -> None:
    """No row recomputed, so the range check alone judges: its ratio is the largest excess of an output
    over its values' range divided by λ·u·(√n_k + 4)·max|v| — 0 exactly for outputs inside the range (no
    negative excess counts), ``push`` for one entry pushed that many slacks past its values' maximum — on
    the compiled path and the eager one."""
    c = W.config
    n_q, first, u = 6, 3, 2.0**-24
    q, k, v, o = _attention_case(np.float32, n_q, first)
    n_k = first + n_q
    if push:
        vmax = float(np.abs(v[:n_k]).max())
        slack = LAMBDA * u * (math.sqrt(n_k) + 4.0) * vmax
        top = float(v[: first + 3, 0, 2].max())  # query 2 sees keys 0 … first + 2; its head 0 reads KV head 0
        o[2, 0, 2] = np.float32(top + push * slack)
    og = o.reshape(n_q, c.n_kv_heads, c.group_size, c.head_dim)
    over, vmax = range_excess(v.astype(np.float64), og.astype(np.float64), first)
    want = max(over, 0.0) / (LAMBDA * u * (math.sqrt(n_k) + 4.0) * vmax)
    for fused in [True, False] if cpu_kernels.kernels() is not None else [False]:
        b = NumpyBackend(W, np.float32)
        ver, _ = _verifier(b)
        seen: list[tuple[Any, ...]] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", fused)
            mp.setattr(
                ver,
                "_accept",
                lambda stage, layer, ratio, n, what, out=seen: out.append((layer, ratio, n, what)),
            )
            ver.attention(Stage.ATTN, 1, q, k, v, o, u, np.zeros(0, np.int64), first)
        [(layer, ratio, n, what)] = seen
        assert (layer, n, what) == (1, 1, "an attention row outside its values' range")
        if push:
            assert math.isclose(ratio, want, rel_tol=1e-6) and math.isclose(ratio, push, rel_tol=0.05), fused
        else:
            assert ratio == 0.0 == want, fused


def test_attention_outputs_as_rows_of_flat_heads_are_checked_by_their_rows() -> None:
    """Outputs handed as rows × (H·d_h) — not the compiled check's 3-D form, so it declines — are read as
    rows × H × d_h by the eager checks: the recomputed rows' outputs take the queries' shape, honest rows
    are accepted and a forged one refused."""
    c = W.config
    b = NumpyBackend(W, np.float64)
    rows = np.array([1, 4], np.int64)
    for forge in (False, True):
        ver, _ = _verifier(b)
        q, k, v, o = _attention_case(np.float64, 6, 3)
        if forge:
            o[4, 0, 0] += 4.0
        seen: list[tuple[Any, ...]] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(
                ver, "_accept", lambda stage, layer, ratio, n, what, out=seen: out.append((ratio, n, what))
            )
            ver.attention(Stage.ATTN, 1, q, k, v, o.reshape(6, c.n_heads * c.head_dim), 2.0**-53, rows, 3)
        assert [(n, what) for _, n, what in seen] == [
            (1, "an attention row outside its values' range"),
            (2 * c.n_heads, "a recomputed attention row"),
        ]
        assert (seen[-1][0] > 1.0) == forge and seen[-1][0] >= 0.0

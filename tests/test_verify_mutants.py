"""Tests that kill mutants of the reply verifier (scx_ref/protocol/verify.py) that survived
``python -m mutation.run verify`` (mutation/REPORT_verify.md): each names the weakened check it guards."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend, cpu_kernels
from scx_ref.backends.base import WeightName, sum_norm_slack
from scx_ref.errors import IntegrityError, NonFiniteError, SCXError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Reply, Request, verify
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.mlp import traced_mlp
from scx_ref.protocol.verify import (
    RecomputedRows,
    SessionVerifier,
    SketchCache,
    attention_excess,
    attention_rows64,
    attention_tau,
    check_reply,
    excess_ratio,
    linear_excess,
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

"""Hypothesis properties of the reply verifier's helpers (scx_ref.protocol.verify) against numpy's own
definitions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import dtypes, float_matrices
from scx_ref.protocol.verify import excess_ratio, prefix_extreme


@given(st.data(), dtypes(), st.integers(0, 3), st.integers(0, 2))
def test_prefix_extreme_is_the_running_max_and_min(
    data: st.DataObject, dtype: np.dtype, cols: int, extra: int
) -> None:
    """The doubling scan equals ``np.maximum.accumulate`` / ``np.minimum.accumulate`` along the rows for any
    row count (n = 0, 1, powers of two and between), width (0 included), extra axes, ties and zeros; the
    input is left as it was."""
    x = data.draw(float_matrices(st.integers(0, 40), cols, dtype, extra_dims=(2,) * extra))
    before = x.copy()
    for largest, op in ((True, np.maximum), (False, np.minimum)):
        got = prefix_extreme(x, largest)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert np.array_equal(got, op.accumulate(x, axis=0))
    assert np.array_equal(x, before)


_SPECIAL = st.sampled_from([0.0, -0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan])


@given(
    residual=st.one_of(st.floats(allow_nan=True, allow_infinity=True), _SPECIAL),
    tau=st.one_of(st.floats(min_value=0.0), _SPECIAL),  # NaN, ±inf and -0.0 from _SPECIAL
)
def test_excess_ratio_of_one_entry_is_the_array_verdict(residual: float, tau: float) -> None:
    """A check with one entry (the attention range check) judged on two floats gives the verdict of the
    same entry as arrays: |residual| / max(τ, tiny), NaN (refused) when either is not finite."""
    one = excess_ratio(residual, tau)
    arrays = excess_ratio(np.array([residual]), np.array([tau]))
    assert (math.isnan(one) and math.isnan(arrays)) or one == arrays
    if not (math.isfinite(residual) and math.isfinite(tau)):
        assert math.isnan(one)

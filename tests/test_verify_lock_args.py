"""lock_scores_excess (a generation step's locked-score check) refuses arguments whose shapes do not fit
the sketch, and reads float64 values of any float input, on both paths (compiled kernels and numpy): the
numpy path broadcast a missing KV head's key to every head and read a 3-D score array as scores, and it
computed in the caller's dtype (found by mutation triage at stop 72)."""

from __future__ import annotations

import numpy as np
import pytest

from scx_ref.errors import ShapeError
from scx_ref.protocol.verify import LockSketch, lock_scores_excess
from tests.test_verify_mutants import _lock_case


@pytest.mark.parametrize(
    "case",
    ["scores 3-D", "a KV head missing from [q; k]", "new of another k", "scores for fewer keys", "qk 1-D"],
)
def test_shapes_that_do_not_fit_the_sketch_are_refused(kernels_on: bool, case: str) -> None:
    keys, coef, qk, new, s = _lock_case(11)
    lk = LockSketch.start(coef, keys)
    bad = {
        "scores 3-D": (qk, new, s[:, None, :]),
        "a KV head missing from [q; k]": (qk[:5], new, s),
        "new of another k": (qk, new[:2], s),
        "scores for fewer keys": (qk, new, s[:, :5]),
        "qk 1-D": (qk.ravel(), new, s),
    }[case]
    with pytest.raises(ShapeError, match="do not fit the locked sketch"):
        lock_scores_excess(lk, *bad, 2, 0.5, 2.0**-24)
    assert lock_scores_excess(lk, qk, new, s, 2, 0.5, 2.0**-24)[0] > 0  # the fitting case is judged


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_narrow_inputs_are_judged_as_their_float64_values(kernels_on: bool, dtype: type) -> None:
    keys, coef, qk, new, s = _lock_case(12)
    lk = LockSketch.start(coef, keys)
    narrow = [a.astype(dtype) for a in (qk, new, s)]
    got, ext = lock_scores_excess(lk, *narrow, 2, 0.5, 2.0**-24)
    want, ext64 = lock_scores_excess(lk, *(a.astype(np.float64) for a in narrow), 2, 0.5, 2.0**-24)
    assert got == want and ext.kappa.dtype == np.float64 and np.array_equal(ext.kappa, ext64.kappa)

"""lock_scores_excess (a generation step's locked-score check) refuses arguments whose shapes do not fit
the sketch, and reads float64 values of any float input, on both paths (compiled kernels and numpy): the
numpy path broadcast a missing KV head's key to every head and read a 3-D score array as scores, and it
computed in the caller's dtype (found by mutation triage at stop 72)."""

from __future__ import annotations

from dataclasses import fields

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


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_narrow_sketch_is_read_as_its_float64_values(kernels_on: bool, dtype: type) -> None:
    """A LockSketch whose arrays are float16 (a dtype the kernels do not take) or float32 (the class is
    public; the verifier's own sketches are float64) gives the verdict and extended sketch of the same
    values in float64, on both paths: the compiled check reads the sketch's arrays as float64 too, and the
    extended sketch is float64."""
    keys, coef, qk, new, s = _lock_case(13)
    lk = LockSketch.start(coef, keys)
    narrow = LockSketch(*(np.asarray(getattr(lk, f.name), dtype=dtype) for f in fields(LockSketch)))
    wide = LockSketch(*(np.asarray(getattr(narrow, f.name), dtype=np.float64) for f in fields(LockSketch)))
    got, ext = lock_scores_excess(narrow, qk, new, s, 2, 0.5, 2.0**-24)
    want, ext64 = lock_scores_excess(wide, qk, new, s, 2, 0.5, 2.0**-24)
    assert got == want
    for f in fields(LockSketch):
        part, part64 = getattr(ext, f.name), getattr(ext64, f.name)
        assert part.dtype == np.float64 and np.array_equal(part, part64), f.name


@pytest.mark.parametrize("answer", [1.0, -1.0])
def test_the_kernels_shape_refusal_is_minus_one_and_one_is_a_verdict(
    monkeypatch: pytest.MonkeyPatch, answer: float
) -> None:
    """The compiled check answers −1 for arrays that do not fit (its own guard: the kernel indexes without
    bounds checks), which is refused with the shapes named; any other answer is the verdict, +1 (a residual
    at its bound) included, returned with the extended sketch the kernel gave."""
    from scx_ref.protocol import verify

    keys, coef, qk, new, s = _lock_case(14)
    lk = LockSketch.start(coef, keys)
    ext = lk.extend(new, qk[4:], np.ones(2))
    parts = tuple(getattr(ext, f.name) for f in fields(LockSketch))

    class Kernels:
        def lock_check(self, *args: object) -> tuple[object, ...]:
            return (answer, *parts)

    monkeypatch.setattr(verify, "kernels", Kernels)
    if answer < 0:
        with pytest.raises(ShapeError) as info:
            lock_scores_excess(lk, qk, new, s, 2, 0.5, 2.0**-24)
        want = f"scores {s.shape} and a step's [q; k] {qk.shape} do not fit the locked sketch"
        assert str(info.value) == want
    else:
        got, sketch = lock_scores_excess(lk, qk, new, s, 2, 0.5, 2.0**-24)
        assert got == answer
        assert all(getattr(sketch, f.name) is p for f, p in zip(fields(LockSketch), parts, strict=True))

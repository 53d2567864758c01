"""Controls for the shared snapshot helper (``tests/server_state.py``): it sees the changes a comparison of
reprs misses, so the "refused message changes nothing" tests built on it can fail."""

from __future__ import annotations

import numpy as np

from tests.server_state import frozen, same


def test_frozen_sees_one_ulp_in_the_middle_of_a_large_array() -> None:
    a = np.linspace(0.0, 1.0, 5000)
    b = a.copy()
    b[2500] = np.nextafter(b[2500], 2.0)
    assert repr({"k": a}) == repr({"k": b})  # what the old helpers compared
    assert frozen({"k": a}) != frozen({"k": b})
    assert not same({"k": a}, {"k": b})
    assert frozen({"k": a}) == frozen({"k": a.copy()}) and same({"k": a}, {"k": a.copy()})


def test_frozen_sees_dtype_and_shape() -> None:
    a = np.zeros((2, 3), dtype=np.float32)
    assert frozen(a) != frozen(a.astype(np.float64))
    assert frozen(a) != frozen(a.reshape(3, 2))
    assert frozen({1: a, 2: [a]}) == frozen({2: [a.copy()], 1: a.copy()})
    assert frozen([a]) != frozen((a,))

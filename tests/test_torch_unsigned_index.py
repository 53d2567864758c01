"""An unsigned row index past int64 is refused by the torch backend's ``gather_sum``, as by the numpy one.

Before: the torch backend cast ``from_y`` to int64 first, which wrapped 2⁶³ to a negative index, and
``gather_sum`` reads a negative ``from_y`` as a decoy row: ``extra``'s row was returned where the numpy
backend refused the index (ShapeError), on the fused and the eager path alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend, cpu_kernels
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ShapeError
from tests.tiny import tiny_weights


@pytest.mark.parametrize("fused", [True, False])
def test_an_unsigned_index_past_int64_is_refused_not_read_as_a_decoy(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_kernels, "ENABLED", fused)
    w = tiny_weights(1)
    d = w.config.hidden_size
    rows = np.arange(2 * d, dtype=np.float64).reshape(2, d)
    from_s = np.array([0, 1], np.uint64)
    from_y = np.array([0, 2**63], np.uint64)
    backends: list[Any] = [NumpyBackend(w), TorchBackend(w, torch.float64)]
    for b in backends:
        s = b.from_numpy(rows) if isinstance(b, TorchBackend) else rows
        with pytest.raises(ShapeError, match="past int64"):
            b.gather_sum(s, from_s, s, from_y, s)
        # control: unsigned indices that fit int64 are taken as they are
        ok = b.gather_sum(s, from_s, s, np.array([0, 1], np.uint64), s)
        np.testing.assert_array_equal(np.asarray(b.to_numpy(ok)), rows + rows)

"""Every shape refusal of the reply verifier's helpers (scx_ref/protocol/verify.py) is a ShapeError, on the
compiled path and the numpy one alike: until stop 73 most raised the base SCXError while the torch fused
path and ``lock_scores_excess`` raised ShapeError, so the error class a caller saw for one misfit depended on
the backend. (An IntegrityError is still what a misfit *reply* becomes: the verifier wraps these.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from properties.kernel_paths import FUSED_OR_EAGER
from scx_ref.backends import cpu_kernels
from scx_ref.errors import ShapeError
from scx_ref.protocol.verify import (
    RecomputedRows,
    attention_excess,
    attention_rows64,
    linear_excess,
    prefix_extreme,
    range_excess,
    range_shapes,
    row_norms,
)


def _rows(n: int, norms: int) -> RecomputedRows:
    """``n`` recomputed rows (4 heads, group 2) whose norms are ``norms`` rows long."""
    kv = np.ones((norms, 2))
    return RecomputedRows(
        np.zeros((n, 4, 2)), np.zeros((n, 4)), np.ones((norms, 4)), np.ones((norms, 4)), kv, kv
    )


def _misfits() -> dict[str, Callable[[], Any]]:
    """One call per refusal, each with shapes that do not fit (and nothing else wrong)."""
    q, kv, pos = np.zeros((2, 4, 2)), np.zeros((3, 2, 2)), np.zeros(2, np.int64)
    one = np.ones(1)
    v = np.arange(12.0).reshape(6, 1, 2)
    return {
        "prefix_extreme of a scalar": lambda: prefix_extreme(np.float64(1.0), True),
        "range_shapes: outputs of other heads": lambda: range_shapes((6, 1, 2), (2, 2, 1, 2), 0),
        "range_shapes: values of width 0": lambda: range_shapes((6, 1, 0), (2, 1, 1, 0), 0),
        "range_shapes: queries before position 0": lambda: range_shapes((6, 1, 2), (2, 1, 1, 2), -1),
        "range_shapes: queries past the keys": lambda: range_shapes((6, 1, 2), (2, 1, 1, 2), 5),
        "range_excess: queries past the keys": lambda: range_excess(v, np.zeros((3, 1, 1, 2)), 4),
        "attention_rows64: queries of rank 2": lambda: attention_rows64(
            q[:, :, 0], kv, kv, q[:, :, 0], pos, 2, 0.5
        ),
        "attention_rows64: a group that does not tile": lambda: attention_rows64(q, kv, kv, q, pos, 3, 0.5),
        "attention_rows64: positions for other rows": lambda: attention_rows64(q, kv, kv, q, pos[:1], 2, 0.5),
        "attention_rows64: outputs for other rows": lambda: attention_rows64(q, kv, kv, q[:1], pos, 2, 0.5),
        "attention_rows64: positions past the keys": lambda: attention_rows64(
            q, kv, kv, q, np.array([0, 3], np.int64), 2, 0.5
        ),
        "attention_excess: norms of fewer rows": lambda: attention_excess(
            _rows(3, 1), pos[:1], 2, 0.5, 2.0**-24
        ),
        "attention_excess: a group that does not tile": lambda: attention_excess(
            _rows(2, 2), pos, 3, 0.5, 2.0**-24
        ),
        "row_norms of a vector": lambda: row_norms(np.zeros(4)),
        "linear_excess: more products than norms": lambda: linear_excess(
            np.ones((4, 2)), np.ones((1, 2)), np.zeros(2), one, one, np.ones(2), np.ones(2)
        ),
    }


@pytest.mark.parametrize("fused", FUSED_OR_EAGER)
@pytest.mark.parametrize("case", sorted(_misfits()))
def test_each_shape_refusal_is_a_shape_error_on_both_paths(fused: bool, case: str) -> None:
    """The misfit is refused with ShapeError itself (not only some SCXError), with the kernels installed
    and without them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        with pytest.raises(ShapeError):
            _misfits()[case]()


@pytest.mark.parametrize("fused", FUSED_OR_EAGER)
def test_the_fitting_shapes_of_those_cases_are_accepted(fused: bool) -> None:
    """The same calls with shapes that fit return a verdict: the refusals above are the shapes' doing."""
    q, kv, pos = np.zeros((2, 4, 2)), np.zeros((3, 2, 2)), np.zeros(2, np.int64)
    v = np.arange(12.0).reshape(6, 1, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        assert prefix_extreme(np.array([1.0, 3.0, 2.0]), True).tolist() == [1.0, 3.0, 3.0]
        range_shapes((6, 1, 2), (2, 1, 1, 2), 4)
        assert range_excess(v, np.full((2, 1, 1, 2), 5.0), 4)[0] <= 0.0
        attention_rows64(q, kv, kv, q, np.array([0, 2], np.int64), 2, 0.5)
        assert attention_excess(_rows(2, 2), pos, 2, 0.5, 2.0**-24) == 0.0
        assert np.allclose(row_norms(np.ones((2, 4))), 2.0, rtol=1e-14, atol=0.0)
        one = np.ones(1)
        assert (
            linear_excess(np.ones((1, 2)), np.ones((1, 2)), np.zeros(2), one, one, np.ones(2), np.ones(2))
            == 0.0
        )

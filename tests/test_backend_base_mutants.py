"""What the mutants of ``scx_ref/backends/base.py`` showed untested (``python -m mutation.run backend_base``):
the shape checks both backends share, the dtype names behind the reply checks' tolerances, the QKV split and
the backend check."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import base
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, ShapeError
from tests.refusals import refused
from tests.tiny import tiny_weights

# q_dim 6·4 = 24, kv_dim 2·4 = 8, hidden 20, intermediate 7, experts 3, vocab 11
_MOE = ModelConfig(
    vocab_size=11,
    hidden_size=20,
    n_layers=1,
    n_heads=6,
    n_kv_heads=2,
    head_dim=4,
    intermediate_size=7,
    n_experts=3,
    top_k=2,
)


def test_each_weight_has_its_output_width() -> None:
    widths = {w: base.out_width(_MOE, w) for w in ("wqkv", "wo", "w_gate_up", "w_down", "router", "lm_head")}
    assert widths == {"wqkv": 40, "wo": 20, "w_gate_up": 14, "w_down": 20, "router": 3, "lm_head": 11}


def test_the_norm_slack_is_one_plus_width_plus_two_epsilons() -> None:
    assert base.sum_norm_slack(10, 2.0**-10) == 1.0 + 12 * 2.0**-10
    assert base.sum_norm_slack(0, 2.0**-23) == 1.0 + 2 * 2.0**-23


_DTYPES: dict[str, tuple[Any, str | None]] = {
    "none": (None, None),
    "np-float64-type": (np.float64, "float64"),
    "np-float32-dtype": (np.dtype(np.float32), "float32"),
    "name-float16": ("float16", "float16"),
    "name-bfloat16": ("bfloat16", "bfloat16"),
    "torch-float32": (torch.float32, "float32"),
    "torch-bfloat16": (torch.bfloat16, "bfloat16"),
    "torch-float16": (torch.float16, "float16"),
    "torch-float64": (torch.float64, "float64"),
    "name-torch-float64": ("torch.float64", "float64"),
    "np-int32-type": (np.int32, None),
    "name-int8": ("int8", None),
    "torch-int64": (torch.int64, None),
    "name-torch-int8": ("torch.int8", None),
    "np-longdouble-type": (np.longdouble, None),
    "name-unknown": ("not a dtype", None),
    "object": (object(), None),
    "float": (3.5, None),
}


@pytest.mark.parametrize("case", list(_DTYPES))
def test_the_float_dtype_name_of_each_kind(case: str) -> None:
    dtype, name = _DTYPES[case]
    assert base.float_dtype_name(dtype) == name


def test_a_dtype_name_that_numpy_cannot_read_is_none_not_an_error() -> None:
    """``np.dtype`` raises TypeError for an object and for an unknown name: both read as no float dtype."""
    for bad in ([1, 2], {"a": 1}, "float33"):
        assert base.float_dtype_name(bad) is None


def test_the_experts_of_a_stage_are_checked_and_flattened() -> None:
    got = base.check_experts(np.array([[0, 2]], dtype=np.uint8), 3, "w_down")
    assert got.dtype == np.int64 and got.tolist() == [0, 2]
    assert base.check_experts([2], 3, "w_down").tolist() == [2]  # the last expert
    with refused(ConfigError, "w_gate_up of an MoE layer needs the selected experts"):
        base.check_experts(None, 3, "w_gate_up")
    with refused(ConfigError, "w_down needs at least one integer expert id, got int64 of shape (0,)"):
        base.check_experts(np.zeros(0, dtype=np.int64), 3, "w_down")
    with refused(ConfigError, "w_down needs at least one integer expert id, got float64 of shape (1,)"):
        base.check_experts([1.0], 3, "w_down")
    with refused(ConfigError, "expert ids must lie in [0, 3), got [3]"):
        base.check_experts([3], 3, "w_down")
    with refused(ConfigError, "expert ids must lie in [0, 3), got [0, -1]"):
        base.check_experts([0, -1], 3, "w_down")


def test_the_rope_split_must_be_whole_heads_within_the_row() -> None:
    base.check_rope_split((4, 20), 10, 10, 5)  # every column RoPE'd or plain
    base.check_rope_split((4, 20), 20, 0, 5)  # the RoPE'd columns reach the row's end
    base.check_rope_split((4, 20), 0, 5, 5)
    for shape, roped, plain in [((4, 20, 1), 10, 10), ((20,), 10, 10), ((4, 20), 12, 5), ((4, 20), 10, 7)]:
        message = (
            f"{roped} RoPE'd and {plain} plain columns of rows {shape}: whole heads of 5, the RoPE'd ones "
            "within the row"
        )
        with refused(ShapeError, message):
            base.check_rope_split(shape, roped, plain, 5)
    with refused(
        ShapeError,
        "25 RoPE'd and 0 plain columns of rows (4, 20): whole heads of 5, the RoPE'd ones within the row",
    ):
        base.check_rope_split((4, 20), 25, 0, 5)


def test_attention_shapes_are_checked_bound_by_bound() -> None:
    base.check_heads((3, 4, 5), (2, 2, 5))  # GQA 2, no v
    base.check_heads((3, 4, 5), (2, 4, 5), (2, 4, 7))  # v of k's rows and heads, any width
    base.check_heads((3, 2, 5), (2, 2, 5), None)
    bad: list[tuple[Any, ...]] = [
        ((3, 4, 5), (2, 0, 5)),  # no KV head
        ((3, 4, 0), (2, 2, 0)),  # heads of width 0
        ((3, 3, 5), (2, 2, 5)),  # 3 query heads over 2 KV heads
        ((3, 4, 5), (2, 2, 6)),  # q and k of other widths
        ((3, 4, 5), (2, 2, 5), (3, 2, 5)),  # v of other rows
        ((3, 4, 5), (2, 2, 5), (2, 1, 5)),  # v of other heads
    ]
    for args in bad:
        q, k, v = args[0], args[1], args[2] if len(args) > 2 else None
        tail = "" if v is None else f", v {v}"
        with refused(ShapeError, f"incompatible attention shapes q {q}, k {k}{tail}"):
            base.check_heads(*args)
    with refused(ShapeError, "attention needs 3-D q, k, v (rows × heads × head_dim), got (3, 4), (2, 2, 5)"):
        base.check_heads((3, 4), (2, 2, 5))
    with refused(
        ShapeError, "attention needs 3-D q, k, v (rows × heads × head_dim), got (3, 4, 5), (2, 2, 5), (2, 2)"
    ):
        base.check_heads((3, 4, 5), (2, 2, 5), (2, 2))
    with refused(
        ShapeError, "attention needs 3-D q, k, v (rows × heads × head_dim), got (3, 4, 5), (2, 2, 5, 1)"
    ):
        base.check_heads((3, 4, 5), (2, 2, 5, 1))


def test_score_shapes_are_checked_bound_by_bound() -> None:
    base.check_scores((4, 3, 2), (2, 2, 5))
    base.check_scores((2, 3, 2), (2, 2, 5))
    for scores, v in [
        ((4, 3), (2, 2, 5)),
        ((4, 3, 2), (2, 2)),
        ((4, 3, 2), (2, 0, 5)),
        ((3, 3, 2), (2, 2, 5)),
        ((4, 3, 3), (2, 2, 5)),
    ]:
        message = f"scores {scores} against values {v}: heads × queries × keys and keys × KV heads × d_h"
        with refused(ShapeError, message):
            base.check_scores(scores, v)


@pytest.mark.parametrize("torch_backend", [False, True], ids=["numpy", "torch"])
def test_the_qkv_split_reads_each_part_of_the_fused_row(torch_backend: bool) -> None:
    w = tiny_weights(0)  # 4 heads and 2 KV heads of 4: [Q K V] of 16 + 8 + 8 columns
    b: Any = TorchBackend(w, "float64") if torch_backend else NumpyBackend(w)
    z = np.arange(3 * 32, dtype=np.float64).reshape(3, 32)
    q, k, v = (b.to_numpy(a) for a in base.split_qkv(b, b.from_numpy(z)))
    np.testing.assert_array_equal(q, z[:, :16].reshape(3, 4, 4))
    np.testing.assert_array_equal(k, z[:, 16:24].reshape(3, 2, 4))
    np.testing.assert_array_equal(v, z[:, 24:].reshape(3, 2, 4))

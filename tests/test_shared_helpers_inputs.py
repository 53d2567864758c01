"""Shared input checks: inputs the shared helpers of ``_checks``, ``arrays``, ``config``,
``stages`` and ``timing`` wrongly took or refused with a raw error."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref import KeySchedule
from scx_ref._checks import as_float_array, check_int
from scx_ref.arrays import NumpyOps, gather_sum_index
from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, DTypeError, ShapeError
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.stages import PREFILL_BLOCK_STAGES, Phase
from scx_ref.timing import timed_kernels

from .tiny import TINY, tiny_weights


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(2, dtype=torch.bfloat16),
        torch.zeros(2, requires_grad=True),
        [[1.0], [1.0, 2.0]],
    ],
    ids=["bf16-tensor", "grad-tensor", "ragged"],
)
def test_an_array_numpy_cannot_read_is_a_dtype_error(x: Any) -> None:
    """These raised numpy's / torch's TypeError, RuntimeError or ValueError from ``np.asarray``."""
    with pytest.raises(DTypeError, match="x must be a floating-point array numpy can read"):
        as_float_array(x, "x")
    with pytest.raises(DTypeError):
        NumpyOps(np.float32).floating(x, "x")


@pytest.mark.parametrize(
    "value", [torch.tensor(True), torch.tensor([3]), torch.tensor([[3]])], ids=["bool", "1-d", "2-d"]
)
def test_a_bool_tensor_or_a_tensor_of_one_element_is_not_an_integer(value: Any) -> None:
    """torch's ``__index__`` made ``tensor(True)`` the count 1 and ``tensor([3])`` 3 (numpy refuses both)."""
    with pytest.raises(ConfigError, match="n must be an integer, got Tensor"):
        check_int(value, "n")
    assert check_int(torch.tensor(3), "n") == 3 and check_int(np.array(3), "n") == 3


def test_integer_fields_of_other_types_are_stored_as_python_ints() -> None:
    """A numpy int64 field made ``to_dict`` unserializable (the service's config fingerprint is JSON), a
    0-d array the config unhashable, a bool tensor was taken as 1 layer."""
    cfg = ModelConfig(
        **{**TINY, "vocab_size": np.int64(32), "hidden_size": np.array(16), "n_layers": torch.tensor(4)}
    )
    assert all(type(getattr(cfg, f.name)) is int for f in dataclasses.fields(cfg) if f.type == "int")
    assert cfg == ModelConfig(**TINY) and hash(cfg) == hash(ModelConfig(**TINY))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="n_layers must be an integer"):
        ModelConfig(**{**TINY, "n_layers": torch.tensor(True)})
    moe = ModelConfig(**{**TINY, "n_experts": np.int32(4), "top_k": np.uint8(2), "qkv_bias": np.True_})
    assert (type(moe.n_experts), type(moe.top_k), moe.qkv_bias) == (int, int, True)
    assert type(moe.qkv_bias) is bool
    with pytest.raises(ConfigError, match="qkv_bias must be True or False"):
        ModelConfig(**{**TINY, "qkv_bias": 1})


@pytest.mark.parametrize("cols", [np.array(1), None, 1], ids=["0-d", "None", "int"])
def test_columns_that_are_not_an_index_are_a_shape_error(cols: Any) -> None:
    """``len(cols)`` raised TypeError before the column index was checked."""
    x, extra = np.zeros((2, 2)), np.zeros((1, 2))
    with pytest.raises(ShapeError, match="column index must be a 1-D integer array"):
        NumpyOps().take_rows_cols_concat(x, cols, extra, np.array([0]))


def test_an_unsigned_index_past_int64_is_not_a_decoy() -> None:
    """The int64 cast wrapped 2**64 − 1 to −1, which ``gather_sum`` reads as a decoy row of ``extra``."""
    with pytest.raises(ShapeError, match="from_y holds an index past int64"):
        gather_sum_index(np.array([0]), np.array([2**64 - 1], dtype=np.uint64), 1, 1, 1)
    with pytest.raises(ShapeError):
        NumpyOps().gather_sum(
            np.ones((1, 2)), np.array([0]), np.ones((1, 2)), np.array([2**64 - 1], np.uint64), np.ones((1, 2))
        )
    fs, fy = gather_sum_index(np.array([0], np.uint64), np.array([0], np.uint64), 1, 1, 1)
    assert fs.tolist() == [0] and fy.tolist() == [0]


def test_kernel_names_given_as_a_generator_are_timed() -> None:
    """The name check used the generator up, so no kernel was replaced and the time stayed 0."""
    from scx_ref.backends import cpu_kernels

    loaded = cpu_kernels.kernels()
    if loaded is None:
        pytest.skip("the fused kernels are not in use (numba missing or SCX_NUMBA=0)")
    names = ["rows_finite", "add_rows"]
    with timed_kernels(names=(n for n in names)):
        inside = cpu_kernels.kernels()
        assert inside is not None
        assert all(getattr(inside, n) is not getattr(loaded, n) for n in names)
        assert inside.gather_sum is loaded.gather_sum


def test_prefill_block_stages_are_listed_in_the_order_they_run() -> None:
    """The tuple said FFN, FFN_DOWN, ROUTER; a blinded MoE block sends its router message first."""
    w = tiny_weights(0, moe=True, n_layers=2)
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    client = Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level="blind", r1=2, r2=2))
    client.prefill(np.array([5, 17, 3]), link)
    first: list[Any] = []
    for m in link.view.messages:
        if m.stage.phase is Phase.PREFILL and m.layer == 0 and m.stage not in first:
            first.append(m.stage)
    assert tuple(first) == PREFILL_BLOCK_STAGES


def test_a_rope_theta_whose_angles_overflow_is_refused() -> None:
    """θ = 1e-320 with head_dim 128 passed, and the reference then decoded from NaN logits (token 0)."""
    base = {**TINY, "n_heads": 2, "n_kv_heads": 1, "head_dim": 128}
    with pytest.raises(ConfigError, match="rope_theta 1e-320 is too small"):
        ModelConfig(**{**base, "rope_theta": 1e-320})
    with pytest.raises(ConfigError, match="rope_theta 1e-300 is too small"):  # finite tables, angles past
        ModelConfig(**{**base, "rope_theta": 1e-300, "max_positions": 10**30})
    assert ModelConfig(**{**base, "rope_theta": 1e-300}).rope_theta == 1e-300  # finite at 32 positions
    assert ModelConfig(**{**base, "rope_theta": 1, "max_positions": 10**30}).rope_theta == 1
    # the check computes what rope_cos_sin computes: where it passes, the tables are finite
    from scx_ref.ops import rope_cos_sin

    cos, sin = rope_cos_sin(np.arange(32), 128, 1e-300)
    assert np.isfinite(cos).all() and np.isfinite(sin).all()

"""The foundation every module trusts (``weights``, ``config``, ``_checks``, ``arrays``): a weight set the
checks pass must be the one the model computes with, the one check of each kind of argument must refuse
what its docstring refuses, and a refusal is a project error."""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref._checks import check_int, check_real, float_dtype
from scx_ref.arrays import (
    NumpyOps,
    check_narrow,
    gather_sum_index,
    permutation_of_rows,
    permute_rows_in_place,
    row_index,
)
from scx_ref.config import ModelConfig
from scx_ref.dp.mechanisms import LaplaceMechanism
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, SCXError, ShapeError
from scx_ref.weights import ModelWeights, MoEMLP, random_weights
from tests.tiny import TINY, tiny_config, tiny_weights

# --- weights.py -----------------------------------------------------------------------------------------


def _masked_with_hidden_nan(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a masked array whose one masked entry is NaN (every visible entry finite)."""
    data = arr.copy()
    mask = np.zeros(arr.shape, dtype=bool)
    data[(0,) * arr.ndim] = np.nan
    mask[(0,) * arr.ndim] = True
    out: np.ndarray = np.ma.masked_array(data, mask=mask)
    assert np.isfinite(out.sum())  # what the finiteness test saw
    return out


@pytest.mark.parametrize("where", ["embed", "layers.0.wq"])
def test_a_masked_weight_hiding_a_nan_is_refused(where: str) -> None:
    # before: accepted (a masked array's sum skips its masked NaN, so the finiteness test passed), and the
    # reference forward then returned NaN logits from weights the check had called finite
    w = tiny_weights(0)
    embed, layers = w.embed, w.layers
    if where == "embed":
        embed = _masked_with_hidden_nan(w.embed)
    else:
        layers = [dataclasses.replace(w.layers[0], wq=_masked_with_hidden_nan(w.layers[0].wq)), *w.layers[1:]]
    with pytest.raises(DTypeError, match=rf"{where}.*masked array"):
        ModelWeights(w.config, embed, layers, w.final_norm, w.lm_head)


def test_a_masked_weight_is_refused_whatever_it_hides() -> None:
    # the same refusal for a mask over finite values: its arithmetic skips masked entries, so the model it
    # would compute is not the one its arrays hold (before: accepted)
    w = tiny_weights(0)
    masked = np.ma.masked_array(w.final_norm, mask=np.zeros(w.final_norm.shape, dtype=bool))
    with pytest.raises(DTypeError, match=r"final_norm.*masked array"):
        ModelWeights(w.config, w.embed, w.layers, masked, w.lm_head)


def test_weights_compare_by_identity_not_by_a_numpy_error() -> None:
    # before: the dataclass __eq__ compared arrays with ==, so ``a == b`` and ``a in [b]`` raised numpy's
    # "truth value of an array ... is ambiguous" ValueError, and the objects were unhashable
    a, b = tiny_weights(0), tiny_weights(0)
    assert a == a and a != b and a not in [b] and b in [a, b]
    assert len({a, b, a}) == 2
    assert a.layers[0] != b.layers[0] and a.layers[0] == a.layers[0]
    assert a.layers[0].mlp != b.layers[0].mlp
    moe_a, moe_b = tiny_weights(0, moe=True), tiny_weights(0, moe=True)
    assert moe_a.layers[0].mlp != moe_b.layers[0].mlp and moe_a.layers[0].mlp not in [moe_b.layers[0].mlp]


def _moe_fewer_experts(w: ModelWeights) -> None:
    mlp = w.layers[0].mlp
    assert isinstance(mlp, MoEMLP)
    mlp.experts = mlp.experts[:-1]


def _moe_router_width(w: ModelWeights) -> None:
    mlp = w.layers[1].mlp
    assert isinstance(mlp, MoEMLP)
    mlp.router = mlp.router[:, :-1]


def _moe_expert_not_dense(w: ModelWeights) -> None:
    mlp = w.layers[0].mlp
    assert isinstance(mlp, MoEMLP)
    mlp.experts = [*mlp.experts[:-1], mlp]  # type: ignore[list-item]


def _bias_missing(w: ModelWeights) -> None:
    w.layers[2].bk = None


def _bias_width(w: ModelWeights) -> None:
    w.layers[0].bv = np.zeros(w.config.q_dim)  # a query-width bias where H_kv·d_h is needed (GQA)


def _kv_width(w: ModelWeights) -> None:
    w.layers[0].wk = np.zeros((w.config.hidden_size, w.config.q_dim))  # H·d_h: no GQA


def _mixed_dtype(w: ModelWeights) -> None:
    w.layers[3].wo = w.layers[3].wo.astype(np.float32)


@pytest.mark.parametrize(
    ("moe", "bias", "spoil", "error", "match"),
    [
        (True, False, _moe_fewer_experts, ConfigError, r"layers\.0\.mlp must be a MoEMLP with 4 experts"),
        (True, False, _moe_router_width, ShapeError, r"layers\.1\.mlp\.router"),
        (True, False, _moe_expert_not_dense, ConfigError, r"layers\.0\.mlp must be a MoEMLP"),
        (False, True, _bias_missing, ShapeError, r"layers\.2\.bk .* got None"),
        (False, True, _bias_width, ShapeError, r"layers\.0\.bv must have shape \(8,\)"),
        (False, False, _kv_width, ShapeError, r"layers\.0\.wk must have shape \(16, 8\)"),
        (False, False, _mixed_dtype, DTypeError, r"layers\.3\.wo must have the embedding's dtype"),
    ],
    ids=["experts", "router", "expert-kind", "bias-missing", "bias-gqa", "wk-gqa", "dtype"],
)
def test_every_disagreement_with_the_config_is_refused_when_revalidated(
    moe: bool, bias: bool, spoil: Callable[[ModelWeights], None], error: type[SCXError], match: str
) -> None:
    # a guard (held before): no other test makes these through the constructor's own objects rather than
    # through from_dict's names, and validate() is what every backend trusts
    w = tiny_weights(0, moe=moe, qkv_bias=bias)
    spoil(w)
    with pytest.raises(error, match=match):
        w.validate()
    with pytest.raises(error, match=match):
        ModelWeights(w.config, w.embed, w.layers, w.final_norm, w.lm_head)


# --- _checks.py: float_dtype ----------------------------------------------------------------------------


def test_none_is_not_a_floating_dtype() -> None:
    # before: float_dtype(None) was float64 (numpy reads None so), while the backends refuse None and
    # backends.base.float_dtype_name says None is no dtype
    with pytest.raises(DTypeError, match="dtype must be a floating numpy dtype, got None"):
        float_dtype(None)


def test_random_weights_refuse_a_missing_dtype_before_drawing() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(DTypeError, match="got None"):
        random_weights(tiny_config(), rng, dtype=None)
    assert rng.bit_generator.state == state  # refused before anything was drawn


def test_rope_tables_refuse_a_missing_dtype() -> None:
    with pytest.raises(DTypeError, match="RoPE dtype must be a floating numpy dtype, got None"):
        ops.rope_cos_sin(np.arange(3), 4, 10000.0, None)  # type: ignore[arg-type]


def test_numpy_ops_without_a_dtype_still_keep_each_arrays_own() -> None:
    # a guard on the one caller for which None means something (every array keeps its dtype): it checks
    # None before float_dtype, so refusing None there changed nothing here
    x = np.ones((2, 3), dtype=np.float32)
    assert NumpyOps(None).dtype is None and NumpyOps(None).floating(x, "x").dtype == np.float32


# --- _checks.py: check_real -----------------------------------------------------------------------------


class _PastFloat64:
    """A real number (registered as ``numbers.Real``) whose float() is +inf without an OverflowError, as a
    numpy longdouble past float64's range is: finite, but float64 cannot hold it."""

    def __float__(self) -> float:
        return float("inf")

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return 0

    def __gt__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "_PastFloat64()"


numbers.Real.register(_PastFloat64)


def _beyond_float64() -> list[Any]:
    values: list[Any] = [_PastFloat64()]
    if np.finfo(np.longdouble).max > np.finfo(np.float64).max:  # x86-64 Linux: 80-bit extended
        values.append(np.longdouble("1e400"))
    return values


@pytest.mark.parametrize("value", _beyond_float64(), ids=lambda v: type(v).__name__)
def test_a_finite_number_past_float64_is_not_made_infinite_where_inf_is_allowed(value: Any) -> None:
    # before: float() made it +inf, which allow_inf then took as "unbounded" (an int past float64 was
    # refused: "a finite value is not silently made infinite")
    with pytest.raises(ConfigError, match="x is beyond the float64 range"):
        check_real(value, "x", 0, allow_inf=True)
    with pytest.raises(ConfigError, match="x must be finite"):  # unchanged where inf is not allowed
        check_real(value, "x", 0)
    assert check_real(np.float64("inf"), "x", 0, allow_inf=True) == float("inf")  # a true inf still is


@pytest.mark.skipif(
    np.finfo(np.longdouble).max <= np.finfo(np.float64).max, reason="longdouble is float64 here"
)
def test_a_dp_sensitivity_past_float64_is_refused_not_taken_as_inf() -> None:
    # LaplaceMechanism's docstring: "NaN and an integer beyond the float64 range refused"; a longdouble
    # beyond it was taken as +inf sensitivity (ε = +inf) before
    with pytest.raises(NonFiniteError, match="beyond the float64 range"):
        LaplaceMechanism(sensitivity=np.longdouble("1e400"), scale=1.0)
    assert LaplaceMechanism(sensitivity=float("inf"), scale=1.0).sensitivity == float("inf")


# --- config.py ------------------------------------------------------------------------------------------


def test_a_numpy_float64_hyper_parameter_is_stored_as_a_python_float() -> None:
    # before: np.float64 is a float subclass, so isinstance(value, float) kept it as np.float64 (the repr
    # and to_dict held numpy scalars), while a float32 was stored as a float, as the docstring says
    cfg = ModelConfig(**{**TINY, "rms_eps": np.float64(1e-6), "rope_theta": np.float64(5e5)})
    assert type(cfg.rms_eps) is float and type(cfg.rope_theta) is float
    assert (cfg.rms_eps, cfg.rope_theta) == (1e-6, 5e5)
    assert "np.float64" not in repr(cfg)
    assert all(type(v) in (int, float, bool, str) for v in cfg.to_dict().values())
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- arrays.py ------------------------------------------------------------------------------------------


def test_narrow_bounds_are_checked_by_the_one_integer_check() -> None:
    # before: check_narrow re-implemented check_int and refused a 0-d integer array, which check_int (the
    # one check of an integer argument) takes; both still refuse a bool and a float
    check_narrow((3, 2), np.array(0), np.array(1), np.array(2))  # type: ignore[arg-type]
    rows = NumpyOps().narrow(np.arange(6.0).reshape(3, 2), 0, np.array(1), 3)  # type: ignore[arg-type]
    assert rows.shape == (2, 2)
    with pytest.raises(ShapeError, match=r"narrow's start must be an integer, got float 0\.5"):
        check_narrow((3, 2), 0, 0.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="narrow's stop must be an integer, got bool"):
        check_narrow((3, 2), 0, 0, True)
    assert check_int(np.array(2), "n") == 2  # what the narrow check now takes, as check_int does


def test_permuting_rows_in_place_refuses_what_is_not_a_numpy_array() -> None:
    # before: a list passed the permutation check, then raised a raw AttributeError ('list' has no flags)
    rows = [[1.0], [2.0], [3.0]]
    with pytest.raises(DTypeError, match="only a numpy array is permuted in place, got list"):
        permute_rows_in_place(rows, np.array([2, 0, 1]))  # type: ignore[arg-type]
    assert rows == [[1.0], [2.0], [3.0]]
    x = np.arange(3.0)[:, None]
    assert permute_rows_in_place(x, np.array([2, 0, 1])) is x and x[:, 0].tolist() == [2.0, 0.0, 1.0]


def test_an_index_numpy_cannot_read_from_a_grad_tensor_is_a_shape_error() -> None:
    # before: torch's raw RuntimeError ("Can't call numpy() on Tensor that requires grad") escaped the three
    # index readers, where as_float_array, token_ids and check_permutation refuse it with a project error
    torch = pytest.importorskip("torch")
    t = torch.ones(2, requires_grad=True)
    for call in (
        lambda: row_index(t, 3),
        lambda: permutation_of_rows(t, 2),
        lambda: gather_sum_index(t, [0, 1], 2, 2, 1),
    ):
        with pytest.raises(ShapeError, match="must be a 1-D integer array"):
            call()


# --- errors.py ------------------------------------------------------------------------------------------


def test_every_class_errors_exports_is_an_scx_error_or_an_scx_warning() -> None:
    # a guard (held before): test_errors lists seven classes by hand; this reads errors.__all__, so a class
    # added later that does not derive from SCXError (or SCXWarning) fails here
    from scx_ref import errors

    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert len(classes) == len(errors.__all__) - 1  # every name but note_tokens is a class
    for cls in classes:
        assert issubclass(cls, errors.SCXError) or issubclass(cls, errors.SCXWarning), cls
        if issubclass(cls, errors.SCXError):
            assert issubclass(cls, ValueError)
        else:
            assert issubclass(cls, UserWarning)

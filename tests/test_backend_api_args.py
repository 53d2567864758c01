"""Bad arguments to the backends' public API — constructors, every :class:`~scx_ref.backends.base.Backend`
method, the plaintext runner, the machine and timing helpers — are refused with a project error, the same
class on the numpy reference, the torch backend's eager ops and its fused CPU kernels (numba), and good
input gives equal results on all three (float64). Each refusal used to be a raw IndexError, ValueError,
RuntimeError or AttributeError on at least one of them, a silently different answer (a negative index
read from the end, a float index truncated, the layer −1 taken as the last block), or, on the eager
torch path, a row of another array (``gather_sum`` past ``s``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref import timing
from scx_ref.arrays import permute_rows_in_place
from scx_ref.backends import cpu_kernels
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend, TorchLayer, TorchWeights, parse_device
from scx_ref.errors import ConfigError, DTypeError, SCXError, ShapeError, VocabularyError
from scx_ref.forward import PlainRunner

from .tiny import tiny_config, tiny_weights

W = tiny_weights(0)
C = W.config
NB = NumpyBackend(W)
TB = TorchBackend(W, torch.float64)
#: the three implementations every case runs on: numpy, torch's eager ops, torch's fused CPU kernels
PATHS = ("numpy", "torch-eager", "torch-fused")


def _path(name: str, mp: pytest.MonkeyPatch) -> Any:
    """The backend of path ``name``, the fused kernels switched on or off (``cpu_kernels.ENABLED``)."""
    mp.setattr(cpu_kernels, "ENABLED", name == "torch-fused")
    return NB if name == "numpy" else TB


class Host:
    """An argument that stays a host numpy array on every backend (check vectors, a basis)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a


def _arg(b: Any, a: Any) -> Any:
    """A float array as the backend's own array type (a fresh copy each time: some ops write in place)."""
    if isinstance(a, Host):
        return a.a.copy()
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return torch.from_numpy(a.copy()) if isinstance(b, TorchBackend) else a.copy()
    if isinstance(a, list):
        return [_arg(b, t) for t in a]
    return a


def _host(r: Any) -> Any:
    if isinstance(r, tuple):
        return tuple(_host(t) for t in r)
    return r.numpy() if isinstance(r, torch.Tensor) else r


_rng = np.random.default_rng(7)
X = _rng.standard_normal((5, 16))
QKV = _rng.standard_normal((5, C.q_dim + 2 * C.kv_dim))
Q, K, V = _rng.standard_normal((5, 4, 4)), _rng.standard_normal((5, 2, 4)), _rng.standard_normal((5, 2, 4))
POS, ROWS = np.arange(5), np.arange(5)
ROPE, PLAIN = np.arange(C.q_dim + C.kv_dim), np.arange(C.kv_dim)
R2 = Host(_rng.standard_normal((16, 2)))

#: name → (method, args, kwargs, error class or None for good input)
CASES: dict[str, tuple[str, tuple[Any, ...], dict[str, Any], type[SCXError] | None]] = {
    # gathers: a negative index (numpy read from the end), past the end, float, 2-D
    "take_rows-good": ("take_rows", (X, np.array([4, 0, 2])), {}, None),
    "take_rows-negative": ("take_rows", (X, np.array([-1, 0])), {}, ShapeError),
    "take_rows-past_the_end": ("take_rows", (X, np.array([5])), {}, ShapeError),
    "take_rows-float": ("take_rows", (X, np.array([1.0, 2.0])), {}, ShapeError),
    "take_rows-2d": ("take_rows", (X, np.array([[0, 1], [2, 3]])), {}, ShapeError),
    "take_rows-empty": ("take_rows", (X, np.array([], dtype=np.int64)), {}, None),
    "take_last-negative": ("take_last", (X, np.array([-1, 0])), {}, ShapeError),
    "take_last-float": ("take_last", (X, np.array([1.5])), {}, ShapeError),
    "rows_to_numpy-negative": ("rows_to_numpy", (X, np.array([-1])), {}, ShapeError),
    "rows_finite-good": ("rows_finite", (X, np.array([0, 4])), {}, None),
    "rows_finite-negative": ("rows_finite", (X, np.array([-1])), {}, ShapeError),
    "rows_finite-past_the_end": ("rows_finite", (X, np.array([5])), {}, ShapeError),
    "rows_finite-2d": ("rows_finite", (X, np.array([[0, 1]])), {}, ShapeError),
    "take_rows_concat-negative": ("take_rows_concat", ([X, X[:2]], np.array([-1])), {}, ShapeError),
    "take_rows_concat-past_both": ("take_rows_concat", ([X, X[:2]], np.array([7])), {}, ShapeError),
    "take_rows_cols_concat-good": (
        "take_rows_cols_concat",
        (X, np.arange(16)[::-1].copy(), X[:2], np.array([6, 0, 3])),
        {},
        None,
    ),
    "take_rows_cols_concat-negative_row": (
        "take_rows_cols_concat",
        (X, np.arange(16), X[:2], np.array([-1, 0])),
        {},
        ShapeError,
    ),
    "take_rows_cols_concat-negative_column": (
        "take_rows_cols_concat",
        (X, np.r_[-1, np.arange(1, 16)], X[:2], np.array([0])),
        {},
        ShapeError,
    ),
    "take_rows_cols_concat-float_rows": (
        "take_rows_cols_concat",
        (X, np.arange(16), X[:2], np.array([0.5])),
        {},
        ShapeError,
    ),
    "take_rows_cols_concat-2d_rows": (
        "take_rows_cols_concat",
        (X, np.arange(16), X[:2], np.array([[0], [1]])),
        {},
        ShapeError,
    ),
    "gather_sum-good": (
        "gather_sum",
        (X, np.array([0, 1, 4]), X, np.array([2, -1, 0]), X[:2]),
        {},
        None,
    ),
    # past s: the eager torch path read row 0 of extra (the concatenation) instead
    "gather_sum-past_s": ("gather_sum", (X, np.array([5]), X, np.array([0]), X[:2]), {}, ShapeError),
    "gather_sum-past_y": ("gather_sum", (X, np.array([0]), X, np.array([5]), X[:2]), {}, ShapeError),
    "gather_sum-negative": ("gather_sum", (X, np.array([-1]), X, np.array([0]), X[:2]), {}, ShapeError),
    "gather_sum-float": ("gather_sum", (X, np.array([0.0]), X, np.array([0]), X[:2]), {}, ShapeError),
    "take_rows_in_place-negative": (
        "take_rows_in_place",
        (X, np.array([-1, 0, 1, 2, 3])),
        {},
        ShapeError,
    ),
    "take_rows_in_place-past_the_end": (
        "take_rows_in_place",
        (X, np.array([5, 0, 1, 2, 3])),
        {},
        ShapeError,
    ),
    "take_rows_in_place-float": (
        "take_rows_in_place",
        (X, np.array([4.0, 0, 1, 2, 3])),
        {"name": "x"},
        ShapeError,
    ),
    "take_rows_in_place-good": ("take_rows_in_place", (X, np.array([4, 0, 1, 3, 2])), {"name": "x"}, None),
    # shapes and slices
    "narrow-past_the_end": ("narrow", (X, 1, 2, 30), {}, ShapeError),
    "narrow-negative_start": ("narrow", (X, 0, -2, 3), {}, ShapeError),
    "concat_rows-two_widths": ("concat_rows", ([X, X[:, :3]],), {}, ShapeError),
    "concat_rows-none": ("concat_rows", ([],), {}, ShapeError),
    "append_rows-another_width": ("append_rows", (X, X[:, :3]), {}, ShapeError),
    "scale_rows-short": ("scale_rows", (X, np.ones(3)), {}, ShapeError),
    "argmax_last-no_rows": ("argmax_last", (X[:0],), {}, ShapeError),
    "project64-good": ("project64", (X, R2), {}, None),
    "project64-1d": ("project64", (X[0], R2), {}, ShapeError),
    "project64-another_width": ("project64", (X[:, :15], R2), {}, ShapeError),
    # weight stages: layers, norms, widths
    "norm-good": ("norm", (X, "attn", 1), {"name": "x"}, None),
    "norm-layer_past_the_model": ("norm", (X, "attn", 9), {}, ConfigError),
    "norm-layer_minus_one": ("norm", (X, "attn", -1), {}, ConfigError),  # numpy took the last block
    "norm-unknown": ("norm", (X, "bogus", 0), {}, ConfigError),  # numpy took the MLP's gain
    "norm-another_width": ("norm", (X[:, :15], "attn", 0), {}, ShapeError),
    "project-good": ("project", (X, "wqkv", 2), {}, None),
    "project-another_width": ("project", (X[:, :15], "wqkv", 0), {}, ShapeError),
    "project-layer_minus_one": ("project", (X, "wo", -1), {}, ConfigError),
    "mlp-good": ("mlp", (X, 3), {}, None),
    "mlp-another_width": ("mlp", (X[:, :15], 0), {}, ShapeError),
    "mlp-layer_past_the_model": ("mlp", (X, 4), {}, ConfigError),
    "project64_norm-good": ("project64_norm", (X, "mlp", 1, R2), {}, None),
    "project64_norm-3d": ("project64_norm", (X[None], "mlp", 1, R2), {}, ShapeError),
    "project64_norm-another_width": ("project64_norm", (X[:, :15], "mlp", 1, R2), {}, ShapeError),
    "swiglu_act-good": ("swiglu_act", (_rng.standard_normal((5, 48)),), {}, None),
    "swiglu_act-odd_width": ("swiglu_act", (_rng.standard_normal((5, 47)),), {}, ShapeError),
    "project64_gate_up-odd_width": (
        "project64_gate_up",
        (
            _rng.standard_normal((5, 47)),
            Host(_rng.standard_normal((47, 2))),
            Host(_rng.standard_normal((23, 2))),
        ),
        {},
        ShapeError,
    ),
    "weight_sketch-good": ("weight_sketch", ("wo", 0, None, Host(_rng.standard_normal((16, 3)))), {}, None),
    "weight_sketch-another_basis": (
        "weight_sketch",
        ("wo", 0, None, Host(_rng.standard_normal((15, 3)))),
        {},
        ShapeError,
    ),
    "weight_sketch-layer_past_the_model": (
        "weight_sketch",
        ("wo", 9, None, Host(_rng.standard_normal((16, 3)))),
        {},
        ConfigError,
    ),
    # RoPE and attention
    "rope-good": ("rope", (Q, POS), {}, None),
    "rope-negative_position": ("rope", (Q, POS - 1), {}, ShapeError),  # numpy rotated backwards
    "rope-float_position": ("rope", (Q, POS + 0.5), {}, ShapeError),  # torch truncated, numpy did not
    "rope-2d_positions": ("rope", (Q, POS[:, None]), {}, ShapeError),
    "rope-another_head_width": ("rope", (_rng.standard_normal((5, 2, 8)), POS), {}, ShapeError),
    "rope-odd_head_width": ("rope", (_rng.standard_normal((5, 2, 3)), POS), {}, ShapeError),
    "rope_take-good": ("rope_take", (QKV, ROWS[::-1].copy(), POS, ROPE[::-1].copy(), PLAIN), {}, None),
    "rope_take-no_rows": ("rope_take", (QKV, ROWS[:0], POS[:0], ROPE, PLAIN), {}, None),
    "rope_take-negative_row": ("rope_take", (QKV, np.r_[-1, ROWS[1:]], POS, ROPE, PLAIN), {}, ShapeError),
    "rope_take-float_rows": ("rope_take", (QKV, ROWS + 0.0, POS, ROPE, PLAIN), {}, ShapeError),
    "rope_take-negative_column": ("rope_take", (QKV, ROWS, POS, np.r_[-1, ROPE[1:]], PLAIN), {}, ShapeError),
    "rope_take-negative_plain_column": (
        "rope_take",
        (QKV, ROWS, POS, ROPE, np.r_[-1, PLAIN[1:]]),
        {},
        ShapeError,
    ),
    "attention-good": ("attention", (Q, K, V, POS, POS), {}, None),
    "attention-every_key": ("attention", (Q, K, V, POS, None), {}, None),
    "attention-no_keys": ("attention", (Q, K[:0], V[:0], POS, POS[:0]), {}, None),
    "attention-2d": ("attention", (X, X, X, POS, POS), {}, ShapeError),
    "attention-head_widths_differ": ("attention", (Q, K[..., :2], V, POS, POS), {}, ShapeError),
    "attention-heads_not_a_multiple": ("attention", (Q[:, :3], K, V, POS, POS), {}, ShapeError),
    "attention-short_positions": ("attention", (Q, K, V, POS[:2], POS), {}, ShapeError),
    "scores-good": ("scores", (Q, K), {}, None),
    "scores-heads_not_a_multiple": ("scores", (Q[:, :3], K), {}, ShapeError),
    "scores-head_widths_differ": ("scores", (Q, K[..., :2]), {}, ShapeError),
    "scores-2d": ("scores", (X, X), {}, ShapeError),
    "softmax_values-good": ("softmax_values", (_rng.standard_normal((4, 5, 5)), V), {}, None),
    "softmax_values-keys_differ": ("softmax_values", (_rng.standard_normal((4, 5, 3)), V), {}, ShapeError),
    "softmax_values-heads_not_a_multiple": (
        "softmax_values",
        (_rng.standard_normal((3, 5, 5)), V),
        {},
        ShapeError,
    ),
    "embed-good": ("embed", (np.array([3, 0, 31]),), {}, None),
    "embed-float": ("embed", (np.array([1.5]),), {}, VocabularyError),
}


def _call(path: str, mp: pytest.MonkeyPatch, case: str) -> Any:
    method, args, kwargs, _ = CASES[case]
    b = _path(path, mp)
    return _host(getattr(b, method)(*[_arg(b, a) for a in args], **kwargs))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_torch_and_the_fused_kernels_refuse_alike_and_agree(case: str) -> None:
    """Each case on the three paths: the same project error class for bad input, equal values (float64,
    to 1e-12) for good input."""
    paths = PATHS if cpu_kernels.kernels() is not None else PATHS[:2]
    want = CASES[case][3]
    got = []
    for path in paths:
        with pytest.MonkeyPatch.context() as mp:
            if want is None:
                got.append(_call(path, mp, case))
            else:
                with pytest.raises(want):
                    _call(path, mp, case)
    for other in got[1:]:
        assert _equal(got[0], other), case


@pytest.mark.parametrize(
    "bad", [[-1, 0, 1, 2], [4, 0, 1, 2], [1, 2, 0, 1], [3.0, 0.0, 1.0, 2.0], [[0], [1], [2], [3]]]
)
def test_a_refused_row_permutation_moves_nothing(bad: list[Any]) -> None:
    """``permute_rows_in_place`` checks the whole index before it moves a row: a duplicate was found only
    mid-way, with a cycle already moved; a negative entry was read from the end and a float one truncated
    (accepted as a permutation); an entry past the end raised IndexError from the bookkeeping, a 2-D
    index TypeError."""
    x = np.arange(12.0).reshape(4, 3)
    with pytest.raises(ShapeError):
        permute_rows_in_place(x, np.array(bad))
    assert np.array_equal(x, np.arange(12.0).reshape(4, 3))
    assert np.array_equal(
        permute_rows_in_place(x, np.array([3, 0, 1, 2])), np.arange(12.0).reshape(4, 3)[[3, 0, 1, 2]]
    )


# -- constructors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, {}, "weights", W.layers, np.zeros(3)])
def test_a_backend_needs_model_weights(weights: Any) -> None:
    """NumpyBackend raised AttributeError (``.dtype`` / ``.config`` of what it was given)."""
    for make in (NumpyBackend, TorchBackend):
        with pytest.raises(ConfigError, match="needs ModelWeights"):
            make(weights)


def test_no_dtype_is_a_dtype_error_on_both_backends() -> None:
    """``dtype=None``: DTypeError on both (numpy raised ConfigError)."""
    with pytest.raises(DTypeError):
        NumpyBackend(W, None)  # type: ignore[arg-type]
    with pytest.raises(DTypeError):
        TorchBackend(W, None)  # type: ignore[arg-type]
    assert NumpyBackend(W, "float32").dtype == np.float32 and TorchBackend(W, "float").dtype == torch.float32


def test_a_device_without_data_or_without_support_is_refused() -> None:
    """``meta`` holds no data (the backend was built, and failed at its first result); a device type this
    torch is not built for (``mps`` without MPS, ``xla``) raised RuntimeError at the first tensor."""
    for dev in ("meta", torch.device("meta")):
        with pytest.raises(ConfigError, match="no data"):
            parse_device(dev)
    unbuilt = [d for d in ("mps", "xla") if not (d == "mps" and torch.backends.mps.is_built())]
    for dev in unbuilt:
        with pytest.raises(ConfigError, match="unsupported device"):
            TorchBackend(W, "float32", dev)
    assert parse_device("cpu") == torch.device("cpu")  # control


def _tensors(b: TorchBackend = TB) -> TorchWeights:
    return b._w


def test_from_tensors_checks_them_against_the_config() -> None:
    """A config of another width or depth, a missing or integer tensor, or something that is not a
    config or TorchWeights, is refused up front (torch raised RuntimeError or IndexError at the first
    stage, or cast an integer embedding without a word)."""
    t = _tensors()
    bad: dict[str, tuple[Any, Any, type[SCXError]]] = {
        "another width": (tiny_config(hidden_size=32), t, ShapeError),
        "more layers": (tiny_config(n_layers=6), t, ConfigError),
        "not a config": ("config", t, ConfigError),
        "not tensors": (C, W, ConfigError),
        "no embedding": (C, TorchWeights(None, t.layers, t.final_norm, t.lm_head), ConfigError),  # type: ignore[arg-type]
        "integer embedding": (C, TorchWeights(t.embed.long(), t.layers, t.final_norm, t.lm_head), DTypeError),
        "an MoE router on a dense model": (
            C,
            TorchWeights(
                t.embed,
                [TorchLayer(**{**vars(t.layers[0]), "router": t.embed}), *t.layers[1:]],
                t.final_norm,
                t.lm_head,
            ),
            ConfigError,
        ),
    }
    for name, (config, tensors, error) in bad.items():
        with pytest.raises(error):
            TorchBackend.from_tensors(config, tensors, "float32", "cpu")
        assert name
    # control: mixed dtypes are converted to the backend's one dtype
    mixed = TorchWeights(
        t.embed.half(), [TorchLayer(**vars(lw)) for lw in t.layers], t.final_norm.double(), t.lm_head.float()
    )
    b = TorchBackend.from_tensors(C, mixed, torch.float32, "cpu")
    assert {b._w.embed.dtype, b._w.final_norm.dtype, b._w.lm_head.dtype, b._w.layers[0].wqkv.dtype} == {
        torch.float32
    }


def test_widened_twins_hold_the_same_weights_in_float64() -> None:
    """``widened()``: itself at float64, else a float64 twin built once, equal to the weights widened."""
    for b64 in (NumpyBackend(W), TorchBackend(W, "float64")):
        assert b64.widened() is b64
    nb = NumpyBackend(W, np.float32)
    assert nb.widened() is nb.widened() and nb.widened().dtype == np.float64
    assert np.array_equal(nb.widened().weights.embed, nb.weights.embed.astype(np.float64))
    tb = TorchBackend(W, "bfloat16")
    wide = tb.widened()
    assert wide is tb.widened() and wide.dtype == torch.float64 and wide.widened() is wide
    assert torch.equal(wide._w.layers[1].wqkv, tb._w.layers[1].wqkv.double())


# -- the plaintext runner, machine and timing helpers -----------------------------------------------------


def test_the_plain_runner_refuses_ids_that_are_not_integers_and_keeps_its_cache() -> None:
    """A float id was truncated to a token (1.5 → 1) before the embedding's check; now VocabularyError
    (ProtocolError for none), and the cache is left as it was."""
    from scx_ref.errors import ProtocolError

    r = PlainRunner(NB)
    r.prefill([1, 2, 3])
    for ids, error in (([1.5, 2.0], VocabularyError), ([], ProtocolError), (["a"], VocabularyError)):
        with pytest.raises(error):
            r.forward(ids)
        assert r.length == 3
    with pytest.raises(VocabularyError):
        r.decode(2.7)  # type: ignore[arg-type]
    assert r.length == 3
    assert r.decode(4).shape == (1, C.vocab_size) and r.length == 4  # control


@pytest.mark.parametrize(
    "cls, method", [(dict, "no_such_method"), (dict, 3), ("dict", "get"), (dict, "__doc__")]
)
def test_timing_wraps_only_a_method_of_a_class(cls: Any, method: Any) -> None:
    """A name the class lacks failed only at the first call (AttributeError from ``super()``); a class
    given by name raised AttributeError (``__name__``)."""
    with pytest.raises(ConfigError, match="around"):
        timing.timed(cls, method)
    sub, spent = timing.timed(dict, "get")  # control
    assert sub(a=1).get("a") == 1 and spent[0] > 0


# -- global state ------------------------------------------------------------------------------------------


@pytest.fixture
def global_state() -> Iterator[Callable[[], tuple[Any, ...]]]:
    def state() -> tuple[Any, ...]:
        return (
            torch.get_num_threads(),
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            bytes(torch.random.get_rng_state().numpy()),
            np.random.get_state()[1].tobytes(),  # type: ignore[index]  # noqa: NPY002 (read, to compare)
            random.getstate(),
        )

    yield state


def test_backends_leave_global_state_alone(global_state: Callable[[], tuple[Any, ...]]) -> None:
    """Building backends (every dtype, a widened twin) and running their stages, fused and eager, changes
    no global setting: torch's thread count and default dtype, grad mode, and no global random state."""
    before = global_state()
    g = np.random.default_rng(1)
    w = tiny_weights(1, hidden_size=64, n_heads=4, head_dim=16, intermediate_size=96)
    for fused in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", fused)
            for dtype in ("float32", "float64", "bfloat16"):
                b = TorchBackend(w, dtype)
                b.widened()
                x = b.from_numpy(g.standard_normal((1100, 64)))  # past the fused norm's threshold
                b.norm(x, "attn", 0, name="x")
                b.add(x, x, name="s")
                b.take_rows_cols_concat(x, np.arange(64), x[:2], np.arange(1102), name="t")
                b.project64(x, g.standard_normal((64, 2)))
                q = b.rope(b.from_numpy(g.standard_normal((6, 4, 16))), np.arange(6))
                b.attention(q, q[:, :2], q[:, :2], np.arange(6), np.arange(6))
    PlainRunner(NumpyBackend(w)).generate([1, 2], 2)
    assert global_state() == before

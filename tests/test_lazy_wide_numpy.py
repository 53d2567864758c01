"""The numpy backend's float64 twin casts each weight when it is first read, as the torch backend's does
(``tests/test_lazy_wide_s70.py``): ``NumpyBackend.widened`` made a float64 copy of the whole model — twice a
float32 model's memory — for every wide session, even level ``paper``'s, whose blinded messages are its
guard blocks' alone. The values are ``ModelWeights.astype``'s, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.backends.numpy_backend import WideWeights
from scx_ref.zoo import load_weights

from .tiny import tiny_weights

PROMPT = np.array([3, 9, 1, 7, 4, 2])


def _twin(b: NumpyBackend) -> WideWeights:
    w = b.widened().weights
    assert isinstance(w, WideWeights)
    return w


def test_the_twin_casts_nothing_until_read() -> None:
    b = NumpyBackend(tiny_weights(3), np.float32)
    wide = b.widened()
    assert wide.dtype == np.float64 and wide is b.widened() and wide.widened() is wide  # built once
    assert _twin(b).converted_blocks() == [] and _twin(b)._held.items() == []
    assert (
        NumpyBackend(tiny_weights(3)).widened().weights.__class__.__name__ == "ModelWeights"
    )  # float64: itself


# a session converts the blocks it blinds, on both backends: tests/test_lazy_wide_s70.py


@pytest.mark.parametrize("model", ["random:tiny-dense", "random:tiny-moe", "random:tiny-qwen"])
def test_the_twins_values_are_an_eager_copys(model: str) -> None:
    """Every product, norm and embedding of the twin equals a float64 backend's over ``astype(float64)`` of
    the float32 weights, bit for bit — dense, MoE (router and experts) and Qwen2's biases."""
    w32 = load_weights(model).astype(np.float32)
    b = NumpyBackend(w32, np.float32)
    eager, wide = NumpyBackend(w32.astype(np.float64)), b.widened()
    # the eager copy itself: every named array of the float32 weights, cast, in its place
    cast = {k: v.astype(np.float64) for k, v in w32.to_dict().items()}
    got = eager.weights.to_dict()
    assert got.keys() == cast.keys() and all(np.array_equal(got[k], cast[k]) for k in cast)
    assert all(got[k].dtype == np.float64 for k in got)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, b.config.hidden_size))
    experts = np.arange(b.config.n_experts) if b.config.is_moe else None
    for layer in range(b.config.n_layers):
        for which in ("wqkv", "wo", "router", "w_gate_up", "w_down"):
            if which == "router" and not b.config.is_moe:
                continue
            rows = x if which != "wo" else rng.standard_normal((5, b.config.q_dim))
            if which == "w_down":
                rows = rng.standard_normal(
                    (5, b.config.intermediate_size * (len(experts) if experts is not None else 1))
                )
            kw = {"experts": experts} if which in ("w_gate_up", "w_down") else {}
            assert np.array_equal(
                wide.project(rows, which, layer, **kw), eager.project(rows, which, layer, **kw)
            )
        assert np.array_equal(wide.norm(x, "attn", layer), eager.norm(x, "attn", layer))
    assert np.array_equal(wide.project(x, "lm_head"), eager.project(x, "lm_head"))
    assert np.array_equal(wide.norm(x, "final"), eager.norm(x, "final"))
    ids = np.array([1, 2, 3])
    assert np.array_equal(wide.embed(ids), eager.embed(ids))


# threads reading a block first get one copy, on both backends: tests/test_lazy_wide_s70.py

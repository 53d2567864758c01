"""Sampling, ops and transforms: each test is a defect found there, now refused by name or fixed.

* ``generate_tokens`` took any ``generator``: a numpy Generator (or a string) raised torch's raw TypeError
  mid-generation, after the prompt's prefill and the streamer's first ``put``.
* ``GenerationSettings`` built directly was not checked: temperature 0 raised transformers' raw
  ValueError, ``top_k=True`` torch's TypeError at the first sampled token.
* a logits row that is not one non-empty row raised torch's IndexError/RuntimeError.
* a model whose ``generation_config`` has ``temperature=0.0`` could not decode greedily (ConfigError),
  where Hugging Face's ``generate`` ignores the sampling values when ``do_sample`` is False.
* ``ops.rms_norm`` in float16 squared in float16: |x| > 256 overflowed and the row became 0 (Hugging Face's
  LlamaRMSNorm upcasts to float32); ``ops.softmax`` in float16 summed in float16: a row wider than 65504
  entries gave zeros (Hugging Face's attention softmax runs in float32).
* ``transforms.laplace_noise`` took the ``numpy.random`` module (global random state) as ``gen``, and
  ``random.Random`` raised a raw TypeError.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.errors import ConfigError, ShapeError
from scx_ref.transforms import laplace_noise

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_weights

V = 6


def _prefill(ids: Any) -> Any:
    return np.tile(np.arange(V, dtype=np.float32), (len(ids), 1))


# -- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.random.default_rng(0), "seed", 3], ids=["numpy", "str", "int"])
def test_generator_not_a_cpu_torch_generator_is_refused_before_anything_runs(bad: Any) -> None:
    pytest.importorskip("torch")
    from scx_ref.sampling import generate_tokens, generation_settings

    settings = generation_settings(None, {"max_new_tokens": 3, "do_sample": True, "seed": 0})
    calls: list[str] = []

    class Streamer:
        def put(self, ids: Any) -> None:
            calls.append("put")

        def end(self) -> None:
            calls.append("end")

    def prefill(ids: Any) -> Any:
        calls.append("prefill")
        return _prefill(ids)

    with pytest.raises(ConfigError, match=r"CPU torch\.Generator"):
        generate_tokens(
            np.array([1]), settings, prefill, lambda t: np.zeros(V), generator=bad, streamer=Streamer()
        )
    assert calls == []  # neither the prefill nor the streamer ran


def test_a_torch_generator_passed_in_is_the_one_drawn_from() -> None:
    torch = pytest.importorskip("torch")
    from scx_ref.sampling import generate_tokens, generation_settings

    settings = generation_settings(None, {"max_new_tokens": 4, "do_sample": True, "top_k": 0})

    g = torch.Generator()
    g.manual_seed(5)
    got = generate_tokens(
        np.array([1]), settings, lambda ids: np.zeros((len(ids), V)), lambda t: np.zeros(V), generator=g
    )
    g.manual_seed(5)  # the same draws, made directly: uniform over V tokens
    uniform = torch.full((1, V), 1.0 / V)
    assert got == [int(torch.multinomial(uniform, 1, generator=g)[0, 0]) for _ in range(4)]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", 0.0, "temperature must be > 0"),
        ("temperature", float("nan"), "temperature must be finite"),
        ("top_k", True, "top_k must be an integer"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_p", 1.5, r"top_p must lie in \[0, 1\]"),
        ("repetition_penalty", 0, "repetition_penalty must be > 0"),
        ("seed", -1, "seed must lie in"),
        ("do_sample", "yes", "do_sample must be True or False"),
        ("max_new_tokens", 2.0, "max_new_tokens must be an integer"),
        ("eos_token_ids", (-1,), "eos_token_id must be >= 0"),
        ("stop_strings", ("",), "stop_strings must be non-empty strings"),
    ],
)
def test_generation_settings_built_directly_are_checked(field: str, value: Any, match: str) -> None:
    from scx_ref.sampling import GenerationSettings

    with pytest.raises(ConfigError, match=match):
        GenerationSettings(**{"do_sample": True, field: value})


def test_generation_settings_built_directly_take_numpy_numbers_as_python_ones() -> None:
    pytest.importorskip("torch")
    from scx_ref.sampling import GenerationSettings, generate_tokens

    s = GenerationSettings(do_sample=True, temperature=np.float32(0.5), top_k=np.int64(2), seed=np.uint64(7))
    assert (type(s.temperature), type(s.top_k), type(s.seed)) == (float, int, int)
    out = generate_tokens(np.array([1]), s, _prefill, lambda t: np.arange(V, dtype=np.float32))
    assert len(out) == s.max_new_tokens and set(out) <= {V - 2, V - 1}  # top-2 of increasing logits


@pytest.mark.parametrize("do_sample", [False, True])
def test_logits_that_are_not_one_row_are_a_shape_error(do_sample: bool) -> None:
    pytest.importorskip("torch")
    from scx_ref.sampling import generate_tokens, generation_settings

    options = {"max_new_tokens": 3, "do_sample": do_sample, **({"seed": 0} if do_sample else {})}
    settings = generation_settings(None, options)
    with pytest.raises(ShapeError, match=r"after 1 new token.*shape \(1, 6\)") as info:
        generate_tokens(np.array([1]), settings, _prefill, lambda t: np.zeros((1, V)))
    assert info.value.tokens == [V - 1]
    with pytest.raises(ShapeError, match=r"after 0 new token.*shape \(\)"):
        generate_tokens(np.array([1]), settings, lambda ids: np.zeros(V), lambda t: np.zeros(V))
    with pytest.raises(ShapeError, match=r"shape \(0,\)"):
        generate_tokens(np.array([1]), settings, lambda ids: np.zeros((1, 0)), lambda t: np.zeros(0))


def test_greedy_decoding_ignores_the_model_configs_sampling_values() -> None:
    """A ``generation_config`` with temperature 0.0 (Hugging Face decodes greedily with it, warning) was
    refused even for greedy decoding; sampling with it is still refused, as transformers refuses it."""
    transformers = pytest.importorskip("transformers")
    from scx_ref.sampling import generate_tokens, generation_settings

    config = transformers.GenerationConfig(do_sample=False, temperature=0.0, top_p=0.0, top_k=3)
    settings = generation_settings(config, {"max_new_tokens": 3})
    assert (settings.do_sample, settings.temperature, settings.top_k, settings.top_p) == (False, 1.0, 50, 1.0)
    assert (
        generate_tokens(np.array([1]), settings, _prefill, lambda t: np.arange(V, dtype=np.float32))
        == [V - 1] * 3
    )
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        generation_settings(config, {"max_new_tokens": 3, "do_sample": True})
    with pytest.raises(ConfigError, match="temperature must be > 0"):  # the call's own value is checked
        generation_settings(None, {"max_new_tokens": 3, "temperature": 0.0})


# -- ops in float16 ------------------------------------------------------------------------------------


def test_rms_norm_float16_upcasts_as_llama_rmsnorm() -> None:
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 8)) * np.array([[1.0], [400.0], [1e-3]])).astype(np.float16)
    gamma = (1.0 + 0.1 * rng.standard_normal(8)).astype(np.float16)
    norm = llama.LlamaRMSNorm(8, eps=1e-6).to(torch.float16)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        want = norm(torch.from_numpy(x)).numpy()
    got = ops.rms_norm(x, gamma, 1e-6)
    assert got.dtype == np.float16
    assert np.abs(got[1]).max() > 0.5  # the row of |x| > 256 used to be all zeros
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2**-10, atol=0)


def test_numpy_backend_float16_norm_of_large_rows_is_not_zero() -> None:
    from scx_ref.backends.numpy_backend import NumpyBackend

    backend = NumpyBackend(tiny_weights(0), np.float16)
    x = np.full((1, 16), 300.0, dtype=np.float16)
    x[0, ::2] = -300.0
    got = backend.norm(x, "final")
    want = backend.weights.final_norm * np.sign(x)  # every |x_i| is the row's rms: x / rms = ±1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rms_norm_and_softmax_keep_float32_and_float64_arithmetic_bit_for_bit(dtype: Any) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16)).astype(dtype) * 3
    gamma = rng.standard_normal(16).astype(dtype)
    want = gamma * (x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-5))
    np.testing.assert_array_equal(ops.rms_norm(x, gamma, 1e-5), want)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    np.testing.assert_array_equal(ops.softmax(x), e / e.sum(axis=-1, keepdims=True))


def test_softmax_float16_sums_in_float32() -> None:
    torch = pytest.importorskip("torch")

    wide = np.zeros((1, 70_000), dtype=np.float16)  # its float16 sum overflows (> 65504)
    got = ops.softmax(wide)
    assert got.dtype == np.float16 and got.sum(dtype=np.float64) == pytest.approx(1.0, rel=1e-2)
    x = np.random.default_rng(2).standard_normal((3, 50)).astype(np.float16) * 4
    want = torch.softmax(torch.from_numpy(x), dim=-1, dtype=torch.float32).to(torch.float16).numpy()
    np.testing.assert_array_equal(ops.softmax(x), want)  # as Hugging Face's eager attention
    np.testing.assert_array_equal(ops.softmax(np.full((2, 3), -np.inf, dtype=np.float16)), np.zeros((2, 3)))


# -- transforms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [np.random, random], ids=["numpy.random", "random"])
def test_laplace_noise_refuses_a_module_global_random_state(module: Any) -> None:
    with pytest.raises(ConfigError, match="global random state"):
        laplace_noise((2, 3), 1.0, module)


def test_laplace_noise_refuses_a_generator_whose_random_takes_no_size() -> None:
    with pytest.raises(ConfigError, match="gen must take a size"):
        laplace_noise((2,), 1.0, random.Random(0))  # type: ignore[arg-type]

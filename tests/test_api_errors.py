"""Bad arguments to the public Python API are refused with a project error (an SCXError naming what is
wrong), not with whatever torch, numpy or Python raises further in: a backend's device and dtype, the
random-weight builder's generator, the Hugging Face wrapper's model, the key schedule's labels and sizes,
and two backends of different kinds joined in-process. Each case has a control that is accepted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend, parse_device
from scx_ref.errors import ConfigError, DTypeError, KeyScheduleError, SCXError
from scx_ref.hf import SCXModel, backend_from_hf
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.weights import random_weights

from .tiny import tiny_config, tiny_weights


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", 5, None, torch.float32])
def test_a_device_torch_does_not_read_is_refused(device: Any) -> None:
    with pytest.raises(ConfigError, match="device"):
        TorchBackend(tiny_weights(0), torch.float32, device)
    assert TorchBackend(tiny_weights(0), torch.float32, "cpu").device == torch.device("cpu")  # control


def test_a_cuda_device_is_refused_unless_torch_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA (mocked absent): ``cuda`` is refused up front (torch raised an AssertionError when the
    first tensor moved). With two GPUs (mocked): ``cuda:1`` is read, ``cuda:2`` refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for text in ("cuda", "cuda:0", torch.device("cuda", 0)):
        with pytest.raises(ConfigError, match="no such CUDA device"):
            parse_device(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="no such CUDA device"):
        parse_device("cuda:2")


@pytest.mark.parametrize("dtype", ["bogus", "int64", object()])
def test_a_numpy_backend_dtype_that_is_not_floating_is_refused(dtype: Any) -> None:
    with pytest.raises(SCXError, match="dtype"):
        NumpyBackend(tiny_weights(0), dtype)
    assert NumpyBackend(tiny_weights(0), "float32").dtype == np.float32  # control


@pytest.mark.parametrize("rng", [0, None, "seed", np.random.RandomState(0)])
def test_random_weights_takes_a_generator_only(rng: Any) -> None:
    """A seed or the legacy RandomState is refused by name (it raised AttributeError deep inside)."""
    with pytest.raises(ConfigError, match="Generator"):
        random_weights(tiny_config(), rng)
    random_weights(tiny_config(), np.random.default_rng(0))  # control


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M", object(), torch.nn.Linear(2, 2)])
def test_the_hf_wrapper_wants_a_loaded_model(model: Any) -> None:
    """A model name or another object is refused, saying to load the model first."""
    with pytest.raises(ConfigError, match="loaded transformers model"):
        SCXModel.from_hf(model)
    with pytest.raises(ConfigError, match="loaded transformers model"):
        backend_from_hf(model)


@pytest.mark.parametrize("label", ["abc", ["a", 1], object(), ("a", [1]), ("a", 1.5), ("a", True)])
def test_a_label_that_is_not_a_tuple_of_str_and_int_is_refused(label: Any) -> None:
    """A string label used to be split into its characters, so ``"abc"`` named the same permutation as
    ``("a", "b", "c")``; other types raised TypeError (or were hashed as memo keys first)."""
    keys = KeySchedule.generate()
    with pytest.raises(KeyScheduleError, match="label"):
        keys.permutation(label, 3)
    with pytest.raises(KeyScheduleError, match="label"):
        keys.generator(label)


@pytest.mark.parametrize("n", ["3", 3.0, True, None])
def test_a_permutation_size_that_is_not_an_integer_is_refused(n: Any) -> None:
    keys = KeySchedule.generate()
    with pytest.raises(KeyScheduleError, match="size"):
        keys.permutation(("a",), n)
    # control: a numpy integer names the same permutation as the int
    assert np.array_equal(keys.permutation(("a",), np.int64(5)), keys.permutation(("a",), 5))


def test_a_torch_client_against_a_numpy_server_in_process_says_so() -> None:
    """The in-process transport hands the client's tensors to the server as they are: a numpy server
    refuses them, saying that the two backends differ in kind. Control: a torch server serves them."""
    weights = tiny_weights(0)
    prompt = np.array([1, 2, 3])
    client = Client(TorchBackend(weights, torch.float64), KeySchedule.generate(), SCXConfig(level="permute"))
    with pytest.raises(DTypeError, match="same backend kind"):
        client.prefill(prompt, LocalTransport(Server(NumpyBackend(weights))))
    client = Client(TorchBackend(weights, torch.float64), KeySchedule.generate(), SCXConfig(level="permute"))
    assert client.prefill(prompt, LocalTransport(Server(TorchBackend(weights, torch.float64)))).shape[0] == 3


def test_check_prompt_is_what_generate_refuses_before_a_session() -> None:
    """``SCXModel.check_prompt``: ids outside the vocabulary (VocabularyError) and a prompt with new tokens
    past max_length (ConfigError) are refused; at the limit (n + new − 1 = max_length) accepted, and
    ``generate`` refuses the same request with the same error before any message is sent."""
    from scx_ref.errors import VocabularyError
    from scx_ref.zoo import load_hf

    scx = SCXModel.from_hf(load_hf("tiny-llama")[0], level="permute", dtype="float32")
    limit, vocab = scx.max_length, scx.backend.config.vocab_size
    with pytest.raises(VocabularyError, match="token ids"):
        scx.check_prompt(np.array([1, vocab]), 1)
    with pytest.raises(ConfigError, match="max_length"):
        scx.check_prompt(np.array([1, 2]), limit)
    scx.check_prompt(np.array([1, 2]), limit - 1)  # control: 2 + (limit − 1) − 1 = limit
    with pytest.raises(ConfigError, match="max_length"):
        scx.generate(torch.tensor([[1, 2]]), max_new_tokens=limit)
    assert scx.last_view is None  # no session ran

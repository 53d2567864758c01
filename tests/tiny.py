"""The tiny random-weight models the protocol tests run on: one builder, so a test states only how its
model differs from the common one (4 blocks of width 16, 4 query and 2 KV heads of width 4)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scx_ref.config import ModelConfig
from scx_ref.weights import ModelWeights, random_weights

#: The common tiny model's fields; a test overrides what it needs (a keyword of ModelConfig).
TINY: dict[str, Any] = dict(
    vocab_size=32,
    hidden_size=16,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    intermediate_size=24,
    max_positions=32,
)


def tiny_config(*, moe: bool = False, **fields: Any) -> ModelConfig:
    """The common tiny model with ``fields`` changed; ``moe``: 4 experts, top-2."""
    if moe:
        fields = {"n_experts": 4, "top_k": 2, **fields}
    return ModelConfig(**{**TINY, **fields})


def tiny_weights(seed: int, *, moe: bool = False, **fields: Any) -> ModelWeights:
    """Random weights (numpy generator seeded with ``seed``) of :func:`tiny_config`."""
    return random_weights(tiny_config(moe=moe, **fields), np.random.default_rng(seed))

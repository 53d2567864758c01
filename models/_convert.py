"""Hugging Face model → scx_ref ModelWeights (private converter; superseded by scx_ref.hf when it lands).

HF ``nn.Linear.weight`` is out × in, scx_ref uses ``y = x @ W`` with W in × out, so every projection is
transposed: ``wq = q_proj.weight.T``. Mixtral experts in transformers 5.x are fused 3-D tensors:
``experts.gate_up_proj`` (E × 2f × d, gate rows first) and ``experts.down_proj`` (E × d × f).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError
from scx_ref.weights import DenseMLP, LayerWeights, ModelWeights, MoEMLP

__all__ = ["config_from_hf", "weights_from_hf"]


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"only default RoPE is supported, got rope_type={params.get('rope_type')!r}")
        return float(params["rope_theta"])
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ConfigError("the HF config carries no RoPE base (rope_parameters / rope_theta)")
    return float(theta)


def config_from_hf(cfg: Any, name: str = "custom") -> ModelConfig:
    """The scx_ref ModelConfig of an HF LLaMA / Mixtral / Qwen2 config (same shapes, eps and RoPE base)."""
    model_type = getattr(cfg, "model_type", "")
    if model_type not in ("llama", "mixtral", "qwen2"):
        raise ConfigError(f"unsupported model_type {model_type!r} (llama, mixtral, qwen2)")
    if model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise ConfigError("Qwen2 sliding-window attention is not supported")
    if getattr(cfg, "sliding_window", None) and model_type == "mixtral":
        raise ConfigError("Mixtral sliding-window attention is not supported")
    n_heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    moe = model_type == "mixtral"
    return ModelConfig(
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        n_layers=int(cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(cfg.num_key_value_heads),
        head_dim=int(head_dim),
        intermediate_size=int(cfg.intermediate_size),
        rms_eps=float(cfg.rms_norm_eps),
        rope_theta=_rope_theta(cfg),
        n_experts=int(cfg.num_local_experts) if moe else 0,
        top_k=int(cfg.num_experts_per_tok) if moe else 0,
        qkv_bias=model_type == "qwen2",
        max_positions=int(cfg.max_position_embeddings),
        name=name,
    )


def weights_from_hf(model: Any, dtype: Any = np.float64, name: str = "custom") -> ModelWeights:
    """ModelWeights (in ``dtype``) holding exactly the HF model's parameters, transposed to in × out."""
    config = config_from_hf(model.config, name)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}

    def arr(key: str) -> np.ndarray:
        if key not in sd:
            raise ConfigError(f"HF state dict has no {key!r}")
        return np.array(sd[key].double().numpy(), dtype=dtype)

    f = config.intermediate_size
    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        mlp: DenseMLP | MoEMLP
        if config.is_moe:
            gate_up, down = arr(p + "mlp.experts.gate_up_proj"), arr(p + "mlp.experts.down_proj")
            experts = [
                DenseMLP(gate_up[e, :f].T.copy(), gate_up[e, f:].T.copy(), down[e].T.copy())
                for e in range(config.n_experts)
            ]
            mlp = MoEMLP(arr(p + "mlp.gate.weight").T.copy(), experts)
        else:
            mlp = DenseMLP(
                arr(p + "mlp.gate_proj.weight").T.copy(),
                arr(p + "mlp.up_proj.weight").T.copy(),
                arr(p + "mlp.down_proj.weight").T.copy(),
            )
        bias = [arr(p + f"self_attn.{n}_proj.bias") for n in "qkv"] if config.qkv_bias else [None] * 3
        layers.append(
            LayerWeights(
                arr(p + "input_layernorm.weight"),
                arr(p + "self_attn.q_proj.weight").T.copy(),
                arr(p + "self_attn.k_proj.weight").T.copy(),
                arr(p + "self_attn.v_proj.weight").T.copy(),
                arr(p + "self_attn.o_proj.weight").T.copy(),
                arr(p + "post_attention_layernorm.weight"),
                mlp,
                *bias,
            )
        )
    embed = arr("model.embed_tokens.weight")
    head = arr("lm_head.weight") if "lm_head.weight" in sd else embed  # tied embeddings
    return ModelWeights(config, embed, layers, arr("model.norm.weight"), head.T.copy())

"""The registered random-weight models, built in code: ``tiny-llama``, ``mixtral-random``, ``qwen2-random``,
``llama1b-random``, ``smollm2-depth-random``.

Each is a transformers config with realistic shape ratios (GQA, head_dim 64 — 8 in ``smollm2-depth-random``;
Mixtral top-2 of 8 experts and Qwen2 QKV bias) and parameters drawn from a ``torch.Generator`` with a fixed
seed — no global random state is read or written (the HF init is skipped; every parameter is filled from
the generator). A spec whose fields do not agree is refused (:func:`check_spec`) before anything is built.

Initialisation: embeddings N(0, 1); norm gains 1 + 0.1·N(0, 1); projections N(0, 1/fan_in); Qwen2 biases
0.1·N(0, 1); the LM head N(0, (4²)/d), so logits have a standard deviation near 4, like a trained model's,
and perplexity responds to small logit errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .._checks import check_int, check_real
from ..config import ModelConfig
from ..errors import ConfigError

__all__ = ["RANDOM_MODELS", "RandomModelSpec", "build_random_model", "check_spec", "hf_config"]


@dataclass(frozen=True)
class RandomModelSpec:
    """Shapes of one random model and the seed of its parameters."""

    family: Literal["llama", "mixtral", "qwen2"]
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    seed: int
    head_dim: int = 64
    rope_theta: float = 10000.0
    n_experts: int = 0
    top_k: int = 0
    max_positions: int = 4096
    rms_eps: float = 1e-5
    logit_scale: float = 4.0


# name → spec; with ``smollm2`` these are the registry's model names (``scx_ref.zoo.MODEL_NAMES``)
RANDOM_MODELS: dict[str, RandomModelSpec] = {
    # a small LLaMA for fast tests: 2 blocks, GQA 2:1
    "tiny-llama": RandomModelSpec("llama", 512, 128, 2, 2, 1, 384, seed=1),
    # Mixtral 8x7B ratios scaled down: d/H = 64, GQA 4:1, f = 3.5·d, top-2 of 8 experts, RoPE base 1e6
    "mixtral-random": RandomModelSpec(
        "mixtral", 4096, 512, 4, 8, 2, 1792, seed=2, rope_theta=1e6, n_experts=8, top_k=2
    ),
    # Qwen2-0.5B ratios halved: d = 448, GQA 7:1, f ≈ 5.4·d, QKV bias, RoPE base 1e6
    "qwen2-random": RandomModelSpec("qwen2", 8192, 448, 4, 7, 1, 2432, seed=3, rope_theta=1e6, rms_eps=1e-6),
    # a 1B-class width in 4 blocks: TinyLlama-1.1B's d = 2048, 32 heads, GQA 8:1, f = 5632, vocab 32000 —
    # for measuring how SCX's O(n·d) client work compares with the O(n·d²) model at a production width
    # (`scx bench --model llama1b-random`); 1.2 GB of float32 parameters, built in a few seconds
    "llama1b-random": RandomModelSpec("llama", 32000, 2048, 4, 32, 4, 5632, seed=4),
    # SmolLM2-135M's depth and heads (30 blocks, 9 query and 3 KV heads) at tiny widths (d = 72, head 8,
    # f = 128, vocab 256): its arithmetic is negligible, so SCX's time less Hugging Face's on it is the fixed
    # per-request cost — messages, their checks, Python — that a short prompt on SmolLM2 pays on top of the
    # matmuls (`python -m models.split_time --model smollm2-depth-random --n 128`)
    "smollm2-depth-random": RandomModelSpec("llama", 256, 72, 30, 9, 3, 128, seed=5, head_dim=8),
}


#: torch.Generator.manual_seed's seeds less the negative ones (it takes -1 as 2**64 - 1: one model, two seeds)
_MAX_SEED = 2**64 - 1
_FAMILIES = ("llama", "mixtral", "qwen2")


def check_spec(spec: RandomModelSpec) -> ModelConfig:
    """The :class:`~scx_ref.config.ModelConfig` ``spec`` describes (so its checks: positive integer sizes,
    ``n_heads`` a multiple of ``n_kv_heads``, an even ``head_dim``, 1 <= top_k <= n_experts for MoE);
    ConfigError unless, beyond those, the family is known and agrees with the experts (a ``mixtral`` spec
    has n_experts >= 1, a ``llama`` or ``qwen2`` one none: they would be ignored), a ``qwen2`` spec has
    hidden_size == n_heads * head_dim (Qwen2Config derives head_dim from them), the seed is an integer
    in [0, 2**64 - 1] and ``logit_scale`` a finite number > 0."""
    if not isinstance(spec, RandomModelSpec):
        raise ConfigError(f"a random model spec must be a RandomModelSpec, got {type(spec).__name__}")
    if not isinstance(spec.family, str) or spec.family not in _FAMILIES:
        raise ConfigError(f"unknown family {spec.family!r}; families: {', '.join(_FAMILIES)}")
    config = ModelConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        rms_eps=spec.rms_eps,
        rope_theta=spec.rope_theta,
        n_experts=spec.n_experts,
        top_k=spec.top_k,
        qkv_bias=spec.family == "qwen2",
        max_positions=spec.max_positions,
    )
    if (spec.family == "mixtral") != config.is_moe:
        raise ConfigError(
            f"a {spec.family} spec needs "
            + ("n_experts >= 1" if spec.family == "mixtral" else "n_experts 0 and top_k 0 (a dense MLP)")
            + f", got n_experts={config.n_experts}, top_k={config.top_k}"
        )
    if spec.family == "qwen2" and config.hidden_size != config.q_dim:  # Qwen2 derives head_dim from these
        raise ConfigError(f"a Qwen2 spec needs hidden_size == n_heads * head_dim, got {spec}")
    check_int(spec.seed, "seed", 0, _MAX_SEED)
    check_real(spec.logit_scale, "logit_scale", 0, lo_open=True)
    return config


def hf_config(spec: RandomModelSpec) -> Any:
    """The transformers config of ``spec`` (LlamaConfig, MixtralConfig or Qwen2Config); ConfigError for a
    spec :func:`check_spec` refuses or transformers cannot express (a hidden size that is not a multiple
    of the heads)."""
    check_spec(spec)
    try:
        return _hf_config(spec)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"transformers cannot express {spec}: {exc}") from None
    except Exception as exc:  # huggingface_hub's StrictDataclassError (not a ValueError) in recent versions
        if type(exc).__module__.split(".")[0] != "huggingface_hub":
            raise
        raise ConfigError(f"transformers cannot express {spec}: {exc}") from None


def _hf_config(spec: RandomModelSpec) -> Any:
    """:func:`hf_config` of a checked spec."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=spec.rms_eps,
        rope_parameters={"rope_theta": spec.rope_theta, "rope_type": "default"},
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_dropout=0.0,
    )
    if spec.family == "llama":
        return LlamaConfig(head_dim=spec.head_dim, attention_bias=False, mlp_bias=False, **common)
    if spec.family == "mixtral":
        return MixtralConfig(
            head_dim=spec.head_dim,
            num_local_experts=spec.n_experts,
            num_experts_per_tok=spec.top_k,
            router_jitter_noise=0.0,
            sliding_window=None,
            **common,
        )
    if spec.family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    raise ConfigError(f"unknown family {spec.family!r}")


def build_random_model(spec: RandomModelSpec) -> Any:
    """The HF causal-LM of ``spec`` in float32 with parameters drawn from ``torch.Generator(spec.seed)``.

    Guarantee: the same spec gives bit-identical parameters on every call and every platform's CPU
    generator; global torch random state is neither read nor changed. ConfigError for a spec
    :func:`hf_config` refuses (:func:`check_spec`: an unknown family, sizes that do not agree, experts
    that the family would ignore, a seed outside [0, 2**64 - 1]), before any parameter is made.
    """
    import torch
    from transformers import LlamaForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    config = hf_config(spec)  # ConfigError for a spec it refuses, before the lookup below
    cls = {"llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM, "qwen2": Qwen2ForCausalLM}[spec.family]
    with no_init_weights():
        model = cls(config)
    gen = torch.Generator().manual_seed(int(spec.seed))
    d = spec.hidden_size
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                value = noise
            elif "norm" in name:
                value = 1.0 + 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            elif name == "lm_head.weight":
                value = noise * (spec.logit_scale / d**0.5)
            else:  # out × in (or E × out × in): fan-in is the last axis
                value = noise / param.shape[-1] ** 0.5
            param.copy_(value)
    return model.to(torch.float32).eval()

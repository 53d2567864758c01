"""The plaintext reference forward: prefill/decode consistency, greedy generation, weight round trips,
and (the strong oracle) agreement with Hugging Face transformers' own Llama / Qwen2 / Mixtral forward."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from properties.strategies import model_configs, model_weights, seeds, token_ids
from scx_ref.config import ModelConfig
from scx_ref.reference import ReferenceModel
from scx_ref.weights import ModelWeights, MoEMLP, random_weights


@settings(max_examples=15)
@given(data=st.data(), cfg=model_configs(max_layers=2), seed=seeds())
def test_prefill_equals_prefill_then_decode(data: st.DataObject, cfg: ModelConfig, seed: int) -> None:
    """Logits of a prompt prefilled at once equal those of prefilling a prefix and decoding the rest
    token by token (rtol 1e-10), for dense, MoE and QKV-bias configs with GQA ratios 1/2/4."""
    model = ReferenceModel(random_weights(cfg, np.random.default_rng(seed)))
    ids = data.draw(token_ids(cfg.vocab_size, 1, 7))
    split = data.draw(st.integers(1, len(ids)))
    full, full_cache = model.prefill(ids)
    assert full.shape == (len(ids), cfg.vocab_size)
    logits, cache = model.prefill(ids[:split])
    rows = [*logits]
    for t in ids[split:]:
        rows.append(model.decode(int(t), cache))
    np.testing.assert_allclose(np.stack(rows), full, rtol=1e-10, atol=1e-10)
    assert cache.length == full_cache.length == len(ids)
    for a, b in zip(cache.keys + cache.values, full_cache.keys + full_cache.values, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@settings(max_examples=10)
@given(data=st.data(), weights=model_weights(model_configs(max_layers=2)), n_new=st.integers(0, 4))
def test_generate_is_greedy(data: st.DataObject, weights: ModelWeights, n_new: int) -> None:
    """generate(ids, k) appends, one at a time, the argmax of a full forward of everything so far."""
    model = ReferenceModel(weights)
    ids = data.draw(token_ids(weights.config.vocab_size, 1, 5))
    seq = list(ids)
    want = []
    for _ in range(n_new):
        nxt = int(np.argmax(model.prefill(np.asarray(seq))[0][-1]))
        want.append(nxt)
        seq.append(nxt)
    assert model.generate(ids, n_new) == want


@settings(max_examples=10)
@given(weights=model_weights(model_configs(max_layers=2)))
def test_weights_dict_round_trip(weights: ModelWeights) -> None:
    """ModelWeights.from_dict(config, w.to_dict()) reproduces every array exactly; astype casts all."""
    d = weights.to_dict()
    back = ModelWeights.from_dict(weights.config, d)
    d2 = back.to_dict()
    assert d.keys() == d2.keys()
    assert all(np.array_equal(d[k], d2[k]) for k in d)
    assert isinstance(back.layers[0].mlp, MoEMLP) == weights.config.is_moe
    assert (back.layers[0].bq is not None) == weights.config.qkv_bias
    assert ModelConfig.from_dict(weights.config.to_dict()) == weights.config
    f32 = weights.astype(np.float32)
    assert f32.dtype == np.float32 and all(v.dtype == np.float32 for v in f32.to_dict().values())


# --- Hugging Face transformers as an independent oracle ------------------------------------------

HF_CASES = {
    "llama_gqa2": (
        "llama",
        ModelConfig(
            vocab_size=32,
            hidden_size=16,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=4,
            intermediate_size=24,
            rms_eps=1e-6,
            rope_theta=10000.0,
        ),
    ),
    "llama_one_head": (
        "llama",
        ModelConfig(
            vocab_size=20,
            hidden_size=8,
            n_layers=1,
            n_heads=1,
            n_kv_heads=1,
            head_dim=8,
            intermediate_size=12,
            rms_eps=1e-5,
            rope_theta=500.0,
        ),
    ),
    "qwen2_bias_mha": (
        "qwen2",
        ModelConfig(
            vocab_size=24,
            hidden_size=12,
            n_layers=2,
            n_heads=2,
            n_kv_heads=2,
            head_dim=6,
            intermediate_size=20,
            rms_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
        ),
    ),
    "mixtral_gqa4_top2": (
        "mixtral",
        ModelConfig(
            vocab_size=28,
            hidden_size=16,
            n_layers=2,
            n_heads=4,
            n_kv_heads=1,
            head_dim=4,
            intermediate_size=10,
            rms_eps=1e-5,
            rope_theta=10000.0,
            n_experts=4,
            top_k=2,
        ),
    ),
    "mixtral_top1": (
        "mixtral",
        ModelConfig(
            vocab_size=16,
            hidden_size=8,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            head_dim=4,
            intermediate_size=8,
            n_experts=3,
            top_k=1,
        ),
    ),
}

# HF keeps some arithmetic in float32 even after model.double(): LlamaRMSNorm casts to float32 before
# normalising, eager attention runs softmax with dtype=float32, and the Mixtral router's softmax is
# float32. Each such step perturbs activations by ~eps_f32 = 1.2e-7 relative; through ≤ 2 blocks (each a
# few of these steps) plus the final norm, with weights of order 1, that is a few 1e-7 relative to the
# logits' scale. We allow 2e-6 · max(1, max|logit|) — about 16·eps_f32 — and check below that a genuine
# semantic change (wrong RoPE base) is orders of magnitude larger than this tolerance.
HF_TOL = 2e-6


def _hf_model(kind: str, cfg: ModelConfig) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_positions,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    }
    if kind == "llama":
        hf_cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        model = transformers.LlamaForCausalLM(hf_cfg)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        # the default grouped-mm experts kernel rejects float64 on CPU: ask for the eager loop
        hf_cfg = transformers.MixtralConfig(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            experts_implementation="eager",
            **common,
        )
        model = transformers.MixtralForCausalLM(hf_cfg)
    torch.manual_seed(0)  # HF's own initialisation is overwritten below; seeded only for determinism
    return model.double().eval()


def _copy_weights(model: Any, w: ModelWeights) -> None:
    """Copy scx_ref weights (y = x @ W, in × out) into the HF model (nn.Linear.weight is out × in)."""
    import torch

    def put(param: Any, arr: np.ndarray) -> None:
        assert tuple(param.shape) == arr.shape, (tuple(param.shape), arr.shape)
        param.data.copy_(torch.from_numpy(np.ascontiguousarray(arr)))

    m = model.model
    put(m.embed_tokens.weight, w.embed)
    put(m.norm.weight, w.final_norm)
    put(model.lm_head.weight, w.lm_head.T)
    for hl, lw in zip(m.layers, w.layers, strict=True):
        att = hl.self_attn
        put(hl.input_layernorm.weight, lw.attn_norm)
        put(hl.post_attention_layernorm.weight, lw.mlp_norm)
        put(att.q_proj.weight, lw.wq.T)
        put(att.k_proj.weight, lw.wk.T)
        put(att.v_proj.weight, lw.wv.T)
        put(att.o_proj.weight, lw.wo.T)
        if lw.bq is not None and lw.bk is not None and lw.bv is not None:
            put(att.q_proj.bias, lw.bq)
            put(att.k_proj.bias, lw.bk)
            put(att.v_proj.bias, lw.bv)
        if isinstance(lw.mlp, MoEMLP):
            # transformers 5.x Mixtral: router hl.mlp.gate.weight (E × d), fused experts
            # gate_up_proj (E × 2f × d, gate rows first) and down_proj (E × d × f)
            put(hl.mlp.gate.weight, lw.mlp.router.T)
            put(
                hl.mlp.experts.gate_up_proj,
                np.stack([np.concatenate([ex.w_gate.T, ex.w_up.T], axis=0) for ex in lw.mlp.experts]),
            )
            put(hl.mlp.experts.down_proj, np.stack([ex.w_down.T for ex in lw.mlp.experts]))
        else:
            put(hl.mlp.gate_proj.weight, lw.mlp.w_gate.T)
            put(hl.mlp.up_proj.weight, lw.mlp.w_up.T)
            put(hl.mlp.down_proj.weight, lw.mlp.w_down.T)


def _hf_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids[None, :].astype(np.int64)), use_cache=False)
    return np.asarray(out.logits[0].numpy(), dtype=np.float64)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_reference_forward_matches_hugging_face(case: str) -> None:
    """numpy ReferenceModel logits == HF LlamaForCausalLM / Qwen2ForCausalLM / MixtralForCausalLM logits
    (float64 model; tolerance from HF's internal float32 steps, see HF_TOL); greedy tokens agree."""
    kind, cfg = HF_CASES[case]
    weights = random_weights(cfg, np.random.default_rng(sum(map(ord, case))))
    model = _hf_model(kind, cfg)
    _copy_weights(model, weights)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=11)
    ref = ReferenceModel(weights).prefill(ids)[0]
    hf = _hf_logits(model, ids)
    scale = max(1.0, float(np.max(np.abs(ref))))
    delta = float(np.max(np.abs(ref - hf)))
    assert delta <= HF_TOL * scale, f"{case}: max |Δlogit| = {delta:.3g} (logit scale {scale:.3g})"
    assert np.array_equal(np.argmax(ref, axis=-1), np.argmax(hf, axis=-1))


def test_hugging_face_comparison_has_teeth() -> None:
    """Control: the same comparison with a reference whose RoPE base differs from HF's fails by far more
    than HF_TOL, so the tolerance cannot hide a RoPE (or similar) semantic mismatch."""
    kind, cfg = HF_CASES["llama_gqa2"]
    weights = random_weights(cfg, np.random.default_rng(5))
    model = _hf_model(kind, cfg)
    _copy_weights(model, weights)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=11)
    wrong = ModelConfig(**{**cfg.to_dict(), "rope_theta": 2 * cfg.rope_theta})
    ref = ReferenceModel(ModelWeights.from_dict(wrong, weights.to_dict())).prefill(ids)[0]
    assert np.max(np.abs(ref - _hf_logits(model, ids))) > 1000 * HF_TOL * max(1.0, float(np.max(np.abs(ref))))

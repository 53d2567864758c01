"""Hugging Face integration: SCX on a loaded LLaMA / Mixtral / Qwen2 gives the HF model's own logits and
its greedy tokens (tiny random configs, attention implementations ``eager`` and ``sdpa``).

Tolerances
----------
* float32, SCX vs HF forward: the two runs round differently — HF computes RoPE angles in float32
  (angle error up to p·u with u = 2⁻²⁴) while scx_ref uses float64 tables rounded once, and the SCX
  stages reorder GEMM rows (permutations, decoys) and, at levels ``paper``/``blind``, round x + η with
  |η| ~ β = 5 (DESIGN §6: error ∝ u·β·|W|). Each of L = 2 blocks contributes a few u·(1 + β) relative
  to the activations' scale, so max |Δlogit| ≤ 64·L·u·(1 + β)·(1 + max|logit|) ≈ 1.2e-4·(1 + max|logit|)
  is generous for rounding yet 4+ orders of magnitude below any real error (a wrong permutation or a
  missed bias moves logits by O(max|logit|)). The measured max |Δ| is printed (``-s``) per case.
* float64: HF's RMSNorm computes in float32 even after ``.double()``, so the float64 SCX logits are
  compared with the numpy reference forward on ``weights_from_hf(model)`` (rtol 1e-10, DESIGN §6), and
  HF-float64 against that reference with the float32 bound above (β = 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from scx_ref.errors import ConfigError, SCXError  # noqa: E402
from scx_ref.hf import SCXModel, backend_from_hf, config_from_hf, weights_from_hf  # noqa: E402
from scx_ref.keys import KeySchedule  # noqa: E402
from scx_ref.reference import ReferenceModel  # noqa: E402

U32 = 2.0**-24
N_LAYERS = 2
KINDS = ["llama", "mixtral", "qwen2"]
IMPLS = ["eager", "sdpa"]
PROMPT = np.array([[5, 17, 3, 88, 41, 9, 60, 2, 77, 31, 12]])


def tiny_model(kind: str, attn: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random HF model with O(1) logits (weights re-drawn from a seeded torch.Generator)."""
    common: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
        pad_token_id=0,
        eos_token_id=1,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager"
        )
        model = transformers.MixtralForCausalLM(cfg)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # Qwen2 q/k/v bias
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                scale = 1.0 if "embed" in name else 1.5 / np.sqrt(fan_in)
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def _keys(seed: int = 0) -> KeySchedule:
    return KeySchedule(bytes([seed + 1]) * 32, b"\x07" * 16)  # never the refused all-zero secret


@pytest.mark.parametrize("kind", KINDS)
def test_config_from_hf(kind: str) -> None:
    model = tiny_model(kind, "eager")
    c = config_from_hf(model.config)
    assert (c.vocab_size, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (
        97,
        32,
        2,
        4,
        2,
        8,
    )
    assert c.intermediate_size == 40 and c.rms_eps == model.config.rms_norm_eps
    assert c.rope_theta == model.config.rope_parameters["rope_theta"]
    assert c.is_moe == (kind == "mixtral") and c.qkv_bias == (kind == "qwen2")


@pytest.mark.parametrize("kind", KINDS)
def test_weights_from_hf_float64_reference_equals_scx_and_hf(kind: str) -> None:
    model = tiny_model(kind, "eager", dtype=torch.float64)
    w = weights_from_hf(model)
    assert w.dtype == np.float64
    ids = PROMPT[0]
    ref, _ = ReferenceModel(w).prefill(ids)
    with torch.no_grad():
        hf = model(torch.from_numpy(PROMPT)).logits[0].numpy()
    # HF's RMSNorm rounds through float32: float32-justified bound with β = 0
    tol = 64 * N_LAYERS * U32 * (1 + np.abs(ref).max())
    print(f"\n{kind}: float64 HF vs reference max|Δ| = {np.abs(hf - ref).max():.3e} (tol {tol:.1e})")
    assert np.abs(hf - ref).max() <= tol
    for level in ("permute", "paper", "blind"):
        scx = SCXModel.from_hf(model, level=level, keys=_keys())
        assert scx.backend.dtype == torch.float64
        got = scx.logits(PROMPT)[0].numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", ["permute", "paper"])
def test_scx_logits_equal_hf_float32(kind: str, attn: str, level: str) -> None:
    model = tiny_model(kind, attn)
    with torch.no_grad():
        hf = model(torch.from_numpy(PROMPT)).logits.numpy()
    scx = SCXModel.from_hf(model, level=level, keys=_keys())
    got = scx.logits(PROMPT).numpy()
    assert got.shape == hf.shape and got.dtype == np.float32
    beta = scx.scx_config.beta if level != "permute" else 0.0
    tol = 64 * N_LAYERS * U32 * (1 + beta) * (1 + np.abs(hf).max())
    delta = np.abs(got - hf).max()
    print(
        f"\n{kind}/{attn}/{level}: float32 SCX vs HF max|Δlogit| = {delta:.3e} (tol {tol:.1e}, "
        f"max|logit| {np.abs(hf).max():.2f})"
    )
    assert delta <= tol
    assert np.array_equal(got.argmax(-1), hf.argmax(-1))


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_scx_greedy_generation_equals_hf_generate(kind: str, attn: str) -> None:
    model = tiny_model(kind, attn, seed=1)
    prompt = torch.from_numpy(PROMPT)
    with torch.no_grad():
        want = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12
        )
    scx = SCXModel.from_hf(model, level="paper", keys=_keys(1))
    got = scx.generate(PROMPT, max_new_tokens=12)
    assert got.tolist() == want.tolist()


def test_generation_never_stopping_at_eos_matches_reference() -> None:
    model = tiny_model("llama", "sdpa", seed=2)
    scx = SCXModel.from_hf(model, level="permute", keys=_keys(2))
    got = scx.generate(PROMPT[0], max_new_tokens=10, eos_token_id=None)
    ref = ReferenceModel(weights_from_hf(model, np.float64)).generate(PROMPT[0], 10)
    assert got[0, PROMPT.shape[1] :].tolist() == ref


def test_batch_rows_are_separate_sessions() -> None:
    model = tiny_model("qwen2", "eager")
    batch = np.concatenate([PROMPT, PROMPT[:, ::-1]])
    scx = SCXModel.from_hf(model, level="paper", keys=_keys())
    got = scx.logits(batch).numpy()
    with torch.no_grad():
        hf = model(torch.from_numpy(batch.copy())).logits.numpy()
    assert np.abs(got - hf).max() <= 64 * N_LAYERS * U32 * 6 * (1 + np.abs(hf).max())
    sessions = {m.session for m in scx.last_view.messages}
    assert len(sessions) == 1  # the view of the last row's session only


def test_backend_from_hf_shares_tensors() -> None:
    model = tiny_model("llama", "eager")
    b = backend_from_hf(model)
    assert b._w.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert b._w.layers[0].wo.data_ptr() == model.model.layers[0].self_attn.o_proj.weight.data_ptr()


def test_unsupported_models_raise_clear_errors() -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
    with pytest.raises(ConfigError, match="unsupported model"):
        SCXModel.from_hf(gpt2)
    with pytest.raises(ConfigError, match="unsupported model"):
        weights_from_hf(gpt2)
    cfg = tiny_model("llama", "eager").config
    cfg.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ConfigError, match="RoPE"):
        config_from_hf(cfg)
    cfg2 = tiny_model("llama", "eager").config
    cfg2.attention_bias = True
    with pytest.raises(SCXError):
        config_from_hf(cfg2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_scx_on_cuda_equals_hf_on_cuda(kind: str) -> None:
    """The model on a GPU: SCX (client and server on the GPU) gives the HF model's own float32 logits on
    that GPU within the float32 bound above (TF32 off, as torch's default), its greedy tokens, and, in
    float64, the numpy reference forward's logits (rtol 1e-10)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    model = tiny_model(kind, "sdpa").to("cuda")
    with torch.no_grad():
        hf = model(torch.from_numpy(PROMPT).to("cuda")).logits.cpu().numpy()
    for level in ("permute", "paper"):
        scx = SCXModel.from_hf(model, level=level, keys=_keys())
        assert scx.backend.device.type == "cuda"
        got = scx.logits(PROMPT).numpy()
        beta = scx.scx_config.beta if level != "permute" else 0.0
        tol = 64 * N_LAYERS * U32 * (1 + beta) * (1 + np.abs(hf).max())
        delta = np.abs(got - hf).max()
        print(f"\n{kind}/cuda/{level}: float32 SCX vs HF max|Δlogit| = {delta:.3e} (tol {tol:.1e})")
        assert delta <= tol and np.array_equal(got.argmax(-1), hf.argmax(-1))
    prompt = torch.from_numpy(PROMPT).to("cuda")
    with torch.no_grad():
        want = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12
        )
    assert SCXModel.from_hf(model, level="paper", keys=_keys(1)).generate(
        PROMPT, max_new_tokens=12
    ).tolist() == (want.cpu().tolist())
    model64 = tiny_model(kind, "sdpa", dtype=torch.float64)
    ref, _ = ReferenceModel(weights_from_hf(model64)).prefill(PROMPT[0])
    got64 = SCXModel.from_hf(model64.to("cuda"), level="paper", keys=_keys()).logits(PROMPT)[0].numpy()
    np.testing.assert_allclose(got64, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())

"""The plaintext forwards against Hugging Face at float64 precision, and the edges of the HF conversion.

``tests/test_reference.py`` compares the reference with a ``.double()`` HF model only to 2e-6, because HF
keeps float32 steps inside it (RMSNorm, the RoPE angles, the eager softmax, Mixtral's router). That bound
cannot see an ε-sized slip (ε inside or outside the square root moves logits by ~ε/2) or a RoPE table
rounded through float32. Here those steps of HF's modules are replaced, on the model instance, by the same
formulas in float64 (checked to agree with HF's own modules to float32 rounding), so the reference, the
:class:`~scx_ref.forward.PlainRunner` and HF's own KV-cached decode must agree to float64 rounding
(DESIGN §6: rtol 1e-10) — with one token, a cache continued step by step, GQA ratios 1, 2 and 4, a head
dim other than d/H, tied embeddings, Qwen2's bias, Mixtral's top-1 and top-all routing and a sliding
window at its cap.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.forward import PlainRunner
from scx_ref.reference import KVCache, ReferenceModel
from tests.tiny import tiny_weights

transformers = pytest.importorskip("transformers")

RTOL = 1e-10  # DESIGN §6, relative to the largest logit
COMMON: dict[str, Any] = dict(
    vocab_size=53,
    hidden_size=24,
    intermediate_size=20,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
    rms_norm_eps=1e-2,  # large: an ε slip moves logits by ~1e-3, far past float64 rounding
    attn_implementation="sdpa",  # float64 attention throughout (eager's softmax is float32)
)
# name -> (family, config fields beyond COMMON)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa2_head_dim_8": (
        "llama",
        dict(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    ),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen2_mha": ("qwen2", dict(num_key_value_heads=4)),
    "qwen2_gqa4": ("qwen2", dict(num_key_value_heads=1)),
    "mixtral_top2_of_4": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_top1_mha": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1, num_key_value_heads=4)),
    "mixtral_top_all_window": (
        "mixtral",
        dict(num_local_experts=3, num_experts_per_tok=3, sliding_window=10),
    ),
}
IDS = np.array([5, 17, 3, 33, 41, 9, 50, 2, 29, 11])


def _hf_config(family: str, **fields: Any) -> Any:
    cls = {"llama": "LlamaConfig", "mixtral": "MixtralConfig", "qwen2": "Qwen2Config"}[family]
    extra = {"experts_implementation": "eager"} if family == "mixtral" else {}
    return getattr(transformers, cls)(**{**COMMON, **extra, **fields})


def _hf_model(family: str, seed: int, **fields: Any) -> Any:
    """A float64 HF model with weights from a seeded torch.Generator (HF's initialisation is skipped: it
    reads the global torch generator)."""
    from transformers.initialization import no_init_weights

    cls = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    with no_init_weights():
        model = getattr(transformers, cls)(_hf_config(family, **fields))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:  # Qwen2's Q/K/V bias
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (1.0 if "embed" in name else 1.5 / p.shape[-1] ** 0.5))
    return model.double().eval()


def _float64_steps(model: Any) -> Any:
    """``model`` with HF's float32 steps done in float64, the formulas unchanged: RMSNorm
    w ⊙ x·rsqrt(mean(x²) + ε), the default RoPE tables cos/sin(p·θ^(−2i/d_h)) (halves duplicated), and
    Mixtral's router softmax → top-k → renormalise."""
    cfg = model.config
    d_h = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_h, 2, dtype=torch.float64) / d_h))

    def norm(self: Any, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.weight * (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )
        return out

    def rope(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def router(self: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(h.reshape(-1, self.hidden_dim), self.weight)
        top, index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    for module in model.modules():
        kind = type(module).__name__
        for suffix, fn in (("RMSNorm", norm), ("RotaryEmbedding", rope), ("TopKRouter", router)):
            if kind.endswith(suffix):
                module.forward = types.MethodType(fn, module)
    return model


def _hf_logits(model: Any, parts: list[np.ndarray]) -> np.ndarray:
    """HF's logits of ``parts`` fed one after another through its own DynamicCache, rows stacked."""
    cache = transformers.DynamicCache(config=model.config)
    rows = []
    with torch.no_grad():
        for part in parts:
            out = model(input_ids=torch.from_numpy(np.asarray(part, dtype=np.int64))[None], cache=cache)
            rows.append(out.logits[0].numpy())
    return np.concatenate(rows)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_and_plain_runner_equal_hf_to_float64_rounding(case: str) -> None:
    """Whole prompt, one token then a cache continued token by token, and 3 + 1 + 6 tokens: the reference,
    the PlainRunner on the numpy backend and HF agree to rtol 1e-10 of the largest logit (HF at float64,
    itself first checked against HF's own float32-step modules)."""
    from scx_ref.hf import config_from_hf, weights_from_hf

    family, fields = CASES[case]
    model = _hf_model(family, sum(map(ord, case)), **fields)
    whole = [IDS]
    plain = _hf_logits(model, whole)  # HF as shipped: float32 steps inside
    model = _float64_steps(model)
    want = _hf_logits(model, whole)
    scale = float(np.abs(want).max())
    assert np.abs(plain - want).max() <= 2e-6 * scale  # the float64 steps are HF's formulas
    c = config_from_hf(model.config)
    assert c.max_positions == min(COMMON["max_position_embeddings"], fields.get("sliding_window", 99))
    w = weights_from_hf(model)
    assert w.dtype == np.float64
    steps = [IDS[i : i + 1] for i in range(len(IDS))]
    chunks = [IDS[:3], IDS[3:4], IDS[4:]]
    for parts in (whole, steps, chunks):
        hf = _hf_logits(model, parts)
        ref = ReferenceModel(w)
        cache: KVCache | None = None
        rows = []
        for part in parts:
            logits, cache = ref.forward(np.asarray(part), cache)
            rows.append(logits)
        runner = PlainRunner(NumpyBackend(w))
        got = {"hf": hf, "reference": np.concatenate(rows)}
        got["runner"] = np.concatenate([runner.forward(np.asarray(part)) for part in parts])
        for who, logits in got.items():
            delta = float(np.abs(logits - want).max())
            assert delta <= RTOL * scale, (
                f"{case}/{who}, {len(parts)} parts: max |Δ| {delta:.3g} ({scale:.3g})"
            )


def test_a_sliding_window_caps_the_sequence_where_hf_stops_matching_full_attention() -> None:
    """Mixtral's window, and a Qwen2 window on any layer, cap max_positions at the window; a Qwen2 window on
    no layer (max_window_layers >= layers) does not; the reference refuses a position past the cap."""
    from scx_ref.hf import config_from_hf, weights_from_hf

    assert config_from_hf(_hf_config("mixtral", sliding_window=6)).max_positions == 6
    assert config_from_hf(_hf_config("mixtral", sliding_window=None)).max_positions == 16
    qwen = dict(use_sliding_window=True, sliding_window=7)
    assert config_from_hf(_hf_config("qwen2", max_window_layers=1, **qwen)).max_positions == 7
    assert config_from_hf(_hf_config("qwen2", max_window_layers=2, **qwen)).max_positions == 16
    ref = ReferenceModel(weights_from_hf(_hf_model("mixtral", 1, sliding_window=6)))
    _, cache = ref.prefill(IDS[:6])
    with pytest.raises(ProtocolError, match="max_positions"):
        ref.decode(int(IDS[6]), cache)
    assert cache.length == 6


@pytest.mark.parametrize(
    "fields",
    [
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 2.0,
                "rope_theta": 1e4,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        ),
        dict(attention_bias=True),
        dict(mlp_bias=True),
        dict(hidden_act="gelu"),
        dict(pretraining_tp=2),
    ],
)
def test_llama_configs_that_change_the_math_are_refused(fields: dict[str, Any]) -> None:
    from scx_ref.hf import config_from_hf

    with pytest.raises(ConfigError):
        config_from_hf(_hf_config("llama", **fields))


def _namespace(**changes: Any) -> Any:
    """A config object that is not a transformers config (a user's own, or one read by hand)."""
    fields = {k: v for k, v in COMMON.items() if k != "attn_implementation"}  # the sizes of COMMON
    fields.update(
        model_type="llama", rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    )
    fields.update(changes)
    return types.SimpleNamespace(**{k: v for k, v in fields.items() if v is not None})


def test_config_from_hf_reads_a_plain_config_object() -> None:
    from scx_ref.hf import config_from_hf

    c = config_from_hf(_namespace())
    assert (c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta) == (24, 4, 2, 6, 1e4)


@pytest.mark.parametrize(
    "changes",
    [
        dict(num_attention_heads=None),  # AttributeError before
        dict(rms_norm_eps=None),  # AttributeError before
        dict(rms_norm_eps="1e-5"),  # ValueError before (float('x')), or a str read as a number
        dict(rope_parameters={"rope_type": "default", "rope_theta": None}),  # TypeError before
        dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),  # read as 1e4 before
        dict(hidden_size=24.5),  # truncated to 24 before: another model, silently
        dict(intermediate_size=20.7),  # truncated to 20 before
        dict(max_position_embeddings=16.5),  # truncated to 16 before
        dict(max_position_embeddings=0),  # silently replaced by 4096 before
    ],
)
def test_config_from_hf_refuses_a_missing_or_mistyped_field(changes: dict[str, Any]) -> None:
    from scx_ref.hf import config_from_hf

    with pytest.raises(ConfigError):
        config_from_hf(_namespace(**changes))


def test_config_from_hf_refuses_a_mistyped_rope_theta_in_a_transformers_config() -> None:
    """transformers checks a config's fields, not what its rope_parameters dict holds."""
    from scx_ref.hf import config_from_hf

    cfg = _hf_config("qwen2")
    cfg.rope_parameters["rope_theta"] = None
    with pytest.raises(ConfigError, match="rope_theta"):
        config_from_hf(cfg)


def test_backend_from_hf_refuses_a_module_without_parameters_by_its_class() -> None:
    """A module that carries a supported config but is not the model (and holds no parameter) raised
    StopIteration from reading its first parameter."""
    from scx_ref.hf import backend_from_hf

    module = torch.nn.Module()
    module.config = _hf_config("llama")
    with pytest.raises(ConfigError, match="unsupported model class"):
        backend_from_hf(module)


# --- ReferenceModel.block: a call that raises leaves the cache as it was ---------------------------------


def _prefilled() -> tuple[ReferenceModel, KVCache]:
    ref = ReferenceModel(tiny_weights(3))
    _, cache = ref.prefill([1, 2, 3])
    return ref, cache


def _snapshot(cache: KVCache) -> list[tuple[int, ...]]:
    return [a.shape for a in cache.keys] + [a.shape for a in cache.values]


@pytest.mark.parametrize("damage", ["values_short", "values_misshapen", "values_not_array"])
def test_block_refuses_a_malformed_cache_before_changing_it(damage: str) -> None:
    """Keys and values that do not pair up raised IndexError/ValueError with the keys already extended."""
    ref, cache = _prefilled()
    if damage == "values_short":
        cache.values.pop()
    elif damage == "values_misshapen":
        cache.values[0] = cache.values[0][:, :1]
    else:
        cache.values[0] = cache.values[0].tolist()
    before = _snapshot(cache) if damage != "values_not_array" else [a.shape for a in cache.keys]
    x = np.ones((1, ref.config.hidden_size))
    layer = len(cache.keys) - 1 if damage == "values_short" else 0
    with pytest.raises(ProtocolError):
        ref.block(x, ref.weights.layers[layer], np.array([3]), layer, cache)
    after = _snapshot(cache) if damage != "values_not_array" else [a.shape for a in cache.keys]
    assert after == before


@pytest.mark.parametrize("stage", ["o", "h"])
def test_block_whose_trace_raises_leaves_the_cache(stage: str) -> None:
    """The keys and values are filed once the block ran: a trace raising after attention left them in."""

    class Stop(Exception):
        pass

    def trace(name: str, layer: int, x: Any) -> None:
        if name == stage:
            raise Stop

    ref, cache = _prefilled()
    ref.trace = trace
    before = [k.copy() for k in cache.keys]
    with pytest.raises(Stop):
        ref.block(np.ones((1, ref.config.hidden_size)), ref.weights.layers[0], np.array([3]), 0, cache)
    assert _snapshot(cache) == [k.shape for k in before] * 2
    assert all(np.array_equal(a, b) for a, b in zip(cache.keys, before, strict=True))


@pytest.mark.parametrize("opts", [{"tls": "x"}, {"timeout": 5.0, "retries": 3}, ["timeout"]], ids=str)
def test_scx_model_refuses_unknown_server_options_before_connecting(opts: Any) -> None:
    """An unknown key reached RemoteTransport as a raw TypeError (a list: a raw TypeError from ``**``)."""
    from scx_ref.hf import SCXModel

    model = transformers.LlamaForCausalLM(_hf_config("llama"))
    with pytest.raises(ConfigError, match=r"server_options|server option"):
        SCXModel.from_hf(model, server="scx://127.0.0.1:1", server_options=opts)

"""Hugging Face ``transformers`` integration: SCX on a loaded ``LlamaForCausalLM``,
``MixtralForCausalLM`` or ``Qwen2ForCausalLM``.

Supported: **transformers 5.x** (checked with 5.24; ``transformers>=5.0,<6`` as in the ``hf`` extra).
What is read, and where (5.x layout): ``model.model.embed_tokens``, ``model.model.layers[i]``
(``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``;
Mixtral: ``mlp.gate.weight`` (router, E × d) and ``mlp.experts.gate_up_proj`` (E × 2f × d, gate rows then
up rows) / ``mlp.experts.down_proj`` (E × d × f)), ``model.model.norm`` and ``model.lm_head``; the RoPE
base from ``config.rope_parameters["rope_theta"]`` (default RoPE only). Anything SCX cannot reproduce
exactly — another model class, scaled RoPE, an O-projection or MLP bias, an activation other than SiLU —
raises :class:`~scx_ref.errors.ConfigError` instead of running a different model. A sliding attention
window caps ``max_positions`` at the window (below it, sliding and full attention coincide).

Three entry points:

* :func:`config_from_hf` — the :class:`~scx_ref.config.ModelConfig` of an HF config;
* :func:`weights_from_hf` — the model's weights as numpy :class:`~scx_ref.weights.ModelWeights`
  (for the numpy reference and backend); :func:`hf_tensors` gives the torch tensors in place, used by
  :func:`backend_from_hf` (a :class:`~scx_ref.backends.torch_backend.TorchBackend` sharing them);
* :class:`SCXModel` — the user-facing wrapper::

      scx = SCXModel.from_hf(model, level="paper")      # keys: a fresh KeySchedule by default
      logits = scx.logits(input_ids)                      # batch × n × V, = model(input_ids).logits
      out = scx.generate(input_ids, max_new_tokens=32)    # = model.generate(do_sample=False)
      out = scx.generate(ids, max_new_tokens=32, do_sample=True, top_p=0.9, seed=0)  # scx_ref.sampling
      remote = SCXModel.from_hf(model, server="scx://host:8470")  # the server role on an `scx serve`

  Every request (each row of a batch, each call) runs its own SCX session under a fresh nonce of the
  same master secret, closed when the request ends; the model's attention implementation
  (``eager``/``sdpa``) only affects the HF plaintext side, SCX runs on the
  :class:`~scx_ref.backends.torch_backend.TorchBackend`. ``generate`` takes ``attention_mask`` with left
  padding (each row runs on its unpadded ids, as ``model.generate`` does), samples as HF does
  (:mod:`scx_ref.sampling`) and refuses every option it cannot honour with a ConfigError naming what is
  supported (:data:`GENERATE_OPTIONS`) — and every ``generation_config`` setting ``model.generate`` would
  apply that it cannot (beam search, n-gram blocking, suppressed or forced tokens, …).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ._checks import check_int, check_real, float_dtype, token_ids
from .backends.torch_backend import TorchBackend, TorchLayer, TorchWeights, parse_device, parse_dtype
from .config import ModelConfig
from .errors import ConfigError, SCXError, VocabularyError
from .keys import KeySchedule
from .protocol import Client, DecoyPolicy, Level, LocalTransport, SCXConfig, Server, ServerView, Transport
from .protocol.decoys import configured_unigram
from .protocol.verify import SketchCache
from .sampling import GENERATE_OPTIONS, check_streamer, generate_tokens, generation_settings
from .weights import DenseMLP, LayerWeights, ModelWeights, MoEMLP

__all__ = [
    "GENERATE_OPTIONS",
    "SUPPORTED_MODEL_TYPES",
    "SCXModel",
    "backend_from_hf",
    "config_from_hf",
    "hf_tensors",
    "weights_from_hf",
]

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _rope_theta(cfg: Any) -> float:
    params = _get(cfg, "rope_parameters")
    if isinstance(params, dict) and params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"RoPE type {rope_type!r} is not supported (only the default RoPE is exact here)"
            )
        if "rope_theta" not in params:
            raise ConfigError("config.rope_parameters has no rope_theta")
        return check_real(params["rope_theta"], "rope_parameters['rope_theta']", 0, lo_open=True)
    theta = _get(cfg, "rope_theta")
    if theta is None:
        raise ConfigError("the HF config names no RoPE base (rope_parameters['rope_theta'] or rope_theta)")
    if _get(cfg, "rope_scaling"):
        raise ConfigError("scaled RoPE (config.rope_scaling) is not supported")
    return check_real(theta, "rope_theta", 0, lo_open=True)


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a LLaMA / Mixtral / Qwen2 HF config.

    Guarantee: a config is returned only when the SCX forward on it is the HF forward (same shapes,
    RMSNorm ε, default RoPE base, SiLU, biases only on Qwen2's Q/K/V); otherwise ConfigError — also for a
    config object missing a field the model needs or holding one of the wrong type (a size that is not an
    integer is refused, never truncated).
    """
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model type {model_type!r}; scx_ref supports "
            f"{sorted(SUPPORTED_MODEL_TYPES)} (transformers 5.x)"
        )
    act = _get(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"unsupported MLP activation {act!r} (SwiGLU with SiLU only)")
    if model_type == "llama" and (_get(hf_config, "attention_bias") or _get(hf_config, "mlp_bias")):
        raise ConfigError("LLaMA with attention_bias/mlp_bias is not supported (O-projection/MLP bias)")
    if (_get(hf_config, "pretraining_tp") or 1) != 1:
        raise ConfigError("pretraining_tp != 1 is not supported")
    try:  # integers are checked as they are (ModelConfig checks the rest): int() truncated 24.5 to 24
        n_heads = check_int(hf_config.num_attention_heads, "num_attention_heads", 1)
        hidden = check_int(hf_config.hidden_size, "hidden_size", 1)
        head_dim = _get(hf_config, "head_dim") or hidden // n_heads
        max_pos = _get(hf_config, "max_position_embeddings")  # absent: 4096; 0 is refused, not replaced
        max_pos = 4096 if max_pos is None else check_int(max_pos, "max_position_embeddings", 1)
        window = _get(hf_config, "sliding_window")
        layer_types = _get(hf_config, "layer_types") or []
        sliding = window is not None and (model_type == "mixtral" or "sliding_attention" in layer_types)
        if sliding:
            max_pos = min(max_pos, check_int(window, "sliding_window", 1))
        n_experts = (
            check_int(_get(hf_config, "num_local_experts", 0) or 0, "num_local_experts")
            if model_type == "mixtral"
            else 0
        )
        return ModelConfig(
            vocab_size=hf_config.vocab_size,
            hidden_size=hidden,
            n_layers=hf_config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=_get(hf_config, "num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=hf_config.intermediate_size,
            rms_eps=check_real(hf_config.rms_norm_eps, "rms_norm_eps", 0),
            rope_theta=_rope_theta(hf_config),
            n_experts=n_experts,
            top_k=hf_config.num_experts_per_tok if n_experts else 0,
            qkv_bias=model_type == "qwen2",
            max_positions=max_pos,
            name=str(_get(hf_config, "_name_or_path", "") or model_type),
        )
    except AttributeError as exc:  # a config object without a field every supported model has
        raise ConfigError(f"the {model_type} config has no {exc.name or 'required field'}: {exc}") from None


def _check_model(model: Any) -> None:
    cls = type(model).__name__
    model_type = _get(_get(model, "config"), "model_type")
    expected = SUPPORTED_MODEL_TYPES.get(str(model_type))
    if expected is None or not any(c.__name__ == expected for c in type(model).__mro__):
        raise ConfigError(
            f"unsupported model class {cls} (model_type {model_type!r}); scx_ref supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES.values())} from transformers 5.x"
        )


def hf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights as torch tensors in the F.linear (out × in) layout, keyed ``embed``,
    ``final_norm``, ``lm_head`` (V × d), ``layers.{i}.{attn_norm, mlp_norm, wqkv, bqkv, wo, gate_up,
    down, router, experts_gate_up, experts_down}``. Tensors that exist in the model are returned as
    they are (no copy); only the fused QKV (and dense gate/up) are concatenated."""
    _check_model(model)
    config = config_from_hf(model.config)
    inner = model.model
    out: dict[str, torch.Tensor] = {
        "embed": inner.embed_tokens.weight.detach(),
        "final_norm": inner.norm.weight.detach(),
        "lm_head": model.lm_head.weight.detach(),
    }
    if getattr(model.lm_head, "bias", None) is not None:
        raise ConfigError("an LM head bias is not supported")
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}."
        att = layer.self_attn
        out[p + "attn_norm"] = layer.input_layernorm.weight.detach()
        out[p + "mlp_norm"] = layer.post_attention_layernorm.weight.detach()
        out[p + "wqkv"] = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach()
        if att.q_proj.bias is not None:
            out[p + "bqkv"] = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).detach()
        if att.o_proj.bias is not None:
            raise ConfigError("an O-projection bias is not supported")
        out[p + "wo"] = att.o_proj.weight.detach()
        mlp = layer.mlp
        if config.is_moe:
            out[p + "router"] = mlp.gate.weight.detach()
            experts = mlp.experts
            if hasattr(experts, "gate_up_proj"):
                gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
                f = config.intermediate_size
                if tuple(gu.shape) != (config.n_experts, 2 * f, config.hidden_size):
                    raise ConfigError(
                        f"unexpected Mixtral expert layout gate_up_proj {tuple(gu.shape)} "
                        "(transformers 5.x stores E × 2f × d)"
                    )
                if (
                    getattr(experts, "has_bias", False)
                    or getattr(experts, "gate_up_proj_bias", None) is not None
                ):
                    raise ConfigError("expert biases are not supported")
                out[p + "experts_gate_up"], out[p + "experts_down"] = gu, down
            else:  # per-expert modules (w1 = gate, w3 = up, w2 = down), as transformers 4.x stored them
                out[p + "experts_gate_up"] = torch.stack(
                    [torch.cat([e.w1.weight, e.w3.weight]) for e in experts]
                ).detach()
                out[p + "experts_down"] = torch.stack([e.w2.weight for e in experts]).detach()
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(mlp, name).bias is not None:
                    raise ConfigError("an MLP bias is not supported")
            out[p + "gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            out[p + "down"] = mlp.down_proj.weight.detach()
    return out


def backend_from_hf(
    model: Any, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> TorchBackend:
    """A :class:`TorchBackend` reading the weights straight from a loaded ``LlamaForCausalLM``,
    ``MixtralForCausalLM`` or ``Qwen2ForCausalLM``: tensors are shared, not copied, wherever the layout,
    dtype and device already match (QKV and gate/up are fused once). Defaults: the model's own dtype
    and device."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(
            f"expected a loaded transformers model (LlamaForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM), "
            f"got {type(model).__name__}: load it first, e.g. AutoModelForCausalLM.from_pretrained(...)"
        )
    _check_model(model)  # before its parameters are read: a module without any raised StopIteration
    param = next(model.parameters())
    dt = parse_dtype(dtype) if dtype is not None else parse_dtype(param.dtype)
    dev = parse_device(device) if device is not None else param.device
    config = config_from_hf(model.config)
    t = hf_tensors(model)
    layers = []
    for i in range(config.n_layers):
        p = f"layers.{i}."
        layers.append(
            TorchLayer(
                attn_norm=t[p + "attn_norm"],
                mlp_norm=t[p + "mlp_norm"],
                wqkv=t[p + "wqkv"],
                bqkv=t.get(p + "bqkv"),
                wo=t[p + "wo"],
                gate_up=t.get(p + "gate_up"),
                down=t.get(p + "down"),
                router=t.get(p + "router"),
                experts_gate_up=t.get(p + "experts_gate_up"),
                experts_down=t.get(p + "experts_down"),
            )
        )
    tensors = TorchWeights(t["embed"], layers, t["final_norm"], t["lm_head"])
    return TorchBackend.from_tensors(config, tensors, dt, dev)


def _np(t: torch.Tensor, dtype: Any) -> Any:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy().astype(dtype)


def weights_from_hf(model: Any, dtype: Any = None, name: str | None = None) -> ModelWeights:
    """The HF model's weights as numpy :class:`ModelWeights` (``y = x @ W``: Linear weights transposed).

    Default dtype: float64 for a float64 model, float32 otherwise; ``name`` overrides the config's
    name. Guarantee: the reference forward on these weights is the HF forward's mathematics (tested to
    rtol 1e-10 in float64, against HF with its float32 steps done in float64, in
    ``tests/test_forward_hf_edges.py``).
    ConfigError for anything but a supported model (checked before it is read), DTypeError unless
    ``dtype`` is None or names a floating numpy dtype.
    """
    _check_model(model)
    if dtype is not None:
        float_dtype(dtype)
    config = config_from_hf(model.config)
    if name is not None:
        config = ModelConfig(**{**config.to_dict(), "name": name})
    t = hf_tensors(model)
    if dtype is None:
        dtype = np.float64 if t["embed"].dtype == torch.float64 else np.float32
    f = config.intermediate_size
    layers = []
    for i in range(config.n_layers):
        p = f"layers.{i}."
        wqkv = _np(t[p + "wqkv"], dtype).T
        q, kv = config.q_dim, config.kv_dim
        bias: list[Any] = [None, None, None]
        if p + "bqkv" in t:
            b = _np(t[p + "bqkv"], dtype)
            bias = [b[:q], b[q : q + kv], b[q + kv :]]
        mlp: DenseMLP | MoEMLP
        if config.is_moe:
            gu = _np(t[p + "experts_gate_up"], dtype)
            dn = _np(t[p + "experts_down"], dtype)
            mlp = MoEMLP(
                _np(t[p + "router"], dtype).T,
                [
                    DenseMLP(gu[e, :f].T.copy(), gu[e, f:].T.copy(), dn[e].T.copy())
                    for e in range(config.n_experts)
                ],
            )
        else:
            gu = _np(t[p + "gate_up"], dtype)
            mlp = DenseMLP(gu[:f].T.copy(), gu[f:].T.copy(), _np(t[p + "down"], dtype).T.copy())
        layers.append(
            LayerWeights(
                _np(t[p + "attn_norm"], dtype),
                wqkv[:, :q].copy(),
                wqkv[:, q : q + kv].copy(),
                wqkv[:, q + kv :].copy(),
                _np(t[p + "wo"], dtype).T.copy(),
                _np(t[p + "mlp_norm"], dtype),
                mlp,
                *bias,
            )
        )
    return ModelWeights(
        config, _np(t["embed"], dtype), layers, _np(t["final_norm"], dtype), _np(t["lm_head"], dtype).T.copy()
    )


def _as_batch(input_ids: Any) -> np.ndarray:
    """Token ids (list, 1-D or 2-D array/tensor) as a 2-D int64 array (one row per session).
    VocabularyError for anything else: a ragged list, non-integer ids (never truncated), no rows."""
    try:
        arr = (
            input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
        )
    except (TypeError, ValueError) as exc:
        raise VocabularyError(f"input_ids must be a rectangular array of token ids: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise VocabularyError(f"input_ids must be a non-empty 1-D or 2-D id array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise VocabularyError(f"input_ids must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:  # would wrap to negative ids
        raise VocabularyError(f"input_ids hold {int(arr.max())}, which is no token id")
    return arr.astype(np.int64)


def _left_padded(ids: np.ndarray, mask: Any, what: str) -> list[np.ndarray]:
    """Each row's unpadded ids under a left-padding ``mask`` (batch × n of 0/1: zeros, then ones)."""
    try:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be an array of 0/1: {exc}") from exc
    if m.ndim == 1:
        m = m[None, :]
    if m.shape != ids.shape:
        raise ConfigError(f"{what} has shape {m.shape}; input_ids has {ids.shape}")
    if m.dtype == np.bool_:
        m = m.astype(np.int64)
    if not np.issubdtype(m.dtype, np.integer):  # "must hold only 0 and 1" misled for a float 0./1. mask
        raise ConfigError(f"{what} must be an integer or bool array of 0 and 1, got dtype {m.dtype}")
    if not np.isin(m, (0, 1)).all():
        raise ConfigError(f"{what} must hold only 0 and 1")
    rows = []
    for i, row in enumerate(m):
        start = int(np.argmax(row)) if row.any() else row.shape[0]
        if start == row.shape[0] or not row[start:].all():
            raise ConfigError(
                f"{what} row {i} is not left padding (zeros, then at least one 1); SCXModel supports "
                "left padding only, as decoder-only generation needs"
            )
        rows.append(ids[i, start:])
    return rows


#: ``GenerationConfig`` fields ``model.generate`` applies (or refuses) that :func:`generation_settings`
#: does not read, with the value that leaves the tokens alone (None, or an empty list, always does).
_UNAPPLIED: dict[str, Any] = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "dola_layers": None,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": 0,
    "exponential_decay_length_penalty": None,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "watermarking_config": None,
    "token_healing": False,
    "max_time": None,
    "stop_strings": None,
    "return_dict_in_generate": False,
}
#: The same, for the warpers ``model.generate`` applies only when sampling.
_UNAPPLIED_SAMPLING: dict[str, Any] = {
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
}


def _check_generation_config(gen: Any, do_sample: bool) -> None:
    """ConfigError naming every field of the model's ``generation_config`` that ``model.generate`` would
    apply and :class:`SCXModel` cannot (beam search, n-gram blocking, suppressed or forced tokens, …): the
    tokens would silently differ from ``model.generate``'s."""
    if gen is None:
        return
    fields_ = {**_UNAPPLIED, **(_UNAPPLIED_SAMPLING if do_sample else {})}
    set_: list[str] = []
    for name, neutral in fields_.items():
        value = getattr(gen, name, None)
        if value is None or (isinstance(value, (list, tuple, dict, str)) and not value):
            continue
        if isinstance(value, (bool, int, float, np.integer, np.floating)) and value == neutral:
            continue
        set_.append(f"{name}={value!r:.60}")
    if set_:
        raise ConfigError(
            f"the model's generation_config sets {', '.join(set_)}, which model.generate applies and "
            "SCXModel.generate cannot (its output would differ): unset them on model.generation_config "
            f"(e.g. model.generation_config.{set_[0].split('=')[0]} = None)"
        )


class SCXModel:
    """SCX inference on a Hugging Face causal LM: same logits, same greedy tokens, with the heavy work
    on an SCX :class:`~scx_ref.protocol.Server` that sees only encoded data.

    Each request (each call, each batch row) is one SCX session with its own keys: a fresh nonce under
    this model's master secret (``keys``; a random one by default). ``last_view`` is the server's
    recorded view of the last session (for audits; in-process server only). With ``link`` (e.g. a
    :class:`~scx_ref.service.RemoteTransport` to an ``scx serve``) every session goes through it instead.
    ``unigram``: a public unigram distribution over the vocabulary (e.g.
    :func:`~scx_ref.zoo.corpus.public_unigram`) the secret calibration text's tokens are drawn from
    (DESIGN §5.1; :class:`~scx_ref.protocol.Client`'s ``unigram``); None draws them uniformly.
    ``eos_token_id`` / ``pad_token_id``: what :meth:`generate` uses when a call names none, over the
    ``generation_config``'s (None: the ``generation_config``'s, read at each call — :meth:`from_hf` leaves
    them None, so a change to ``model.generation_config`` applies, as with ``model.generate``).
    ConfigError for a ``backend`` that is not a TorchBackend, a ``scx_config`` that is not an SCXConfig or
    an ``eos_token_id``/``pad_token_id`` that is no id.
    """

    def __init__(
        self,
        backend: TorchBackend,
        scx_config: SCXConfig,
        keys: KeySchedule | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_config: Any = None,
        link: Transport | None = None,
        unigram: npt.ArrayLike | None = None,
    ) -> None:
        if not isinstance(backend, TorchBackend):  # an AttributeError further down
            raise ConfigError(
                f"backend must be a TorchBackend (backend_from_hf), got {type(backend).__name__}"
            )
        if not isinstance(scx_config, SCXConfig):
            raise ConfigError(f"scx_config must be an SCXConfig, got {type(scx_config).__name__}")
        # checked here (generation_settings' checks), not at the first generate: they were never read
        generation_settings(
            None, {"max_new_tokens": 0, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        )
        self.backend = backend
        self.scx_config = scx_config
        self.keys = keys if keys is not None else KeySchedule.generate()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.generation_config = generation_config
        self.link = link
        # checked here, not by the first session's client
        self.unigram = configured_unigram(unigram, backend.config.vocab_size, scx_config.decoys)
        self.last_view: ServerView | None = None
        self._sketches = SketchCache(backend, self.keys) if scx_config.verify else None
        self._decoys: DecoyPolicy | None = None  # the calibration pool, built by the first session

    @classmethod
    def from_hf(
        cls,
        model: Any,
        level: Level = "paper",
        keys: KeySchedule | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        server: str | None = None,
        server_options: dict[str, Any] | None = None,
        unigram: npt.ArrayLike | None = None,
        **scx_options: Any,
    ) -> SCXModel:
        """Wrap a loaded LLaMA/Mixtral/Qwen2 model; ``scx_options`` go to :class:`SCXConfig`
        (``r1``, ``r2``, ``l_s``, ``l_e``, ``beta``, …). The backend shares the model's tensors.

        ``server``: the URL of an ``scx serve`` of the same model (``scx://HOST:PORT``, ``scxs://`` for
        TLS) to run the server role on; ``server_options`` go to
        :class:`~scx_ref.service.RemoteTransport` (``timeout``, ``connect_timeout``, ``tls_ca``,
        ``max_message_bytes``; another key is a ConfigError). Default: an in-process server."""
        backend = backend_from_hf(model, dtype=dtype, device=device)
        known = {f.name for f in fields(SCXConfig)} - {"level"}
        unknown = sorted(set(scx_options) - known)
        if unknown:
            raise ConfigError(f"unknown SCX option(s) {unknown}; SCXConfig takes {sorted(known)}")
        scx_options.setdefault("max_length", backend.config.max_positions)
        cfg = SCXConfig(level=level, **scx_options)
        gen = getattr(model, "generation_config", None)  # its EOS and pad ids are read at each call
        link: Transport | None = None
        if server_options is not None and not isinstance(server_options, dict):
            raise ConfigError(f"server_options must be a dict, got {type(server_options).__name__}")
        if server is not None:
            from .service.remote import RemoteTransport

            params = inspect.signature(RemoteTransport).parameters.values()
            allowed = {q.name for q in params if q.kind is inspect.Parameter.KEYWORD_ONLY}
            unknown = sorted(set(server_options or {}) - allowed, key=str)
            if unknown:  # RemoteTransport raised a raw TypeError for them
                raise ConfigError(
                    f"unknown server option(s) {unknown}; RemoteTransport takes {sorted(allowed)}"
                )
            link = RemoteTransport(server, backend, **(server_options or {}))
        elif server_options:
            raise ConfigError("server_options given without a server URL")
        return cls(backend, cfg, keys, None, None, gen, link, unigram)

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt and new tokens but the last) a session of this model runs: the
        configuration's ``max_length``, else the model's ``max_positions`` (as :class:`Client` takes it)."""
        limit = self.scx_config.max_length
        return self.backend.config.max_positions if limit is None else limit

    def check_prompt(self, ids: Any, max_new_tokens: int) -> None:
        """What :meth:`generate` (and, with 0 new tokens, :meth:`logits`) checks of every row before any
        session sends anything: VocabularyError unless ``ids`` is a 1-D array of ids of the vocabulary and
        ProtocolError when it is empty (:func:`~scx_ref._checks.token_ids`, the check the prefill makes
        again); ConfigError unless ``max_new_tokens`` is an integer >= 0 and the prompt and its new tokens
        fit :attr:`max_length` (the last new token is never fed back: n + new − 1 ≤ max_length; the prompt
        itself, n ≤ max_length, even for 0 new tokens, as :meth:`Client.generate` has it)."""
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 0)
        arr = token_ids(ids, self.backend.config.vocab_size)
        n = arr.shape[0]
        if n > self.max_length:  # a prompt the prefill refuses is refused for 0 new tokens too
            raise ConfigError(
                f"a prompt of {n} tokens is longer than the session's max_length {self.max_length}"
            )
        if max_new_tokens and n + max_new_tokens - 1 > self.max_length:
            raise ConfigError(
                f"{n} prompt tokens + {max_new_tokens} new exceed the session's max_length {self.max_length}"
            )

    def _session(self) -> tuple[Client[torch.Tensor], Transport]:
        keys = self.keys.for_nonce(KeySchedule.new_nonce())
        first = self._decoys is None  # the first session draws the pool's text (from ``unigram`` if given)
        client = Client(
            self.backend,
            keys,
            self.scx_config,
            decoys=self._decoys,
            sketches=self._sketches,
            unigram=self.unigram if first else None,
        )
        self._decoys = client.decoys  # from the master secret's text: every later session draws from it
        if self.link is not None:
            return client, self.link
        link = LocalTransport(Server(self.backend), record_view=True)
        self.last_view = link.view
        return client, link

    def logits(self, input_ids: Any, **options: Any) -> torch.Tensor:
        """SCX prefill logits, batch × n × V (float32, or float64 for a float64 backend): equal to
        ``model(input_ids).logits`` up to the dtype's rounding. Takes no options (ConfigError): every row
        is scored as given. Every row is checked (:meth:`check_prompt` with 0 new tokens) before any
        session opens: a bad row leaves ``last_view`` and the server untouched."""
        if options:
            raise ConfigError(
                f"SCXModel.logits takes input_ids only, got {sorted(options)}; for left-padded batches "
                "use generate(attention_mask=…)"
            )
        batch = _as_batch(input_ids)
        for ids in batch:
            self.check_prompt(ids, 0)
        rows = []
        for ids in batch:
            client, link = self._session()
            try:
                rows.append(torch.from_numpy(np.asarray(client.prefill(ids, link))))
            except BaseException:
                _close_quietly(client)
                raise
            client.close()
        return torch.stack(rows)

    def generate(
        self, input_ids: Any = None, max_new_tokens: int | None = None, **options: Any
    ) -> torch.Tensor:
        """SCX generation, as ``model.generate``: prompt + up to ``max_new_tokens`` tokens per row, greedy
        by default or sampled (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``seed``) with transformers' own logits processors on the client's logits;
        a row stops at an EOS token (the constructor's ``eos_token_id``, else the model's
        ``generation_config``'s, by default; ``eos_token_id=None`` never stops) or a stop string
        (``stop_strings`` with ``tokenizer``); finished rows padded (with ``pad_token_id``, else the first
        EOS id, as HF); ``streamer`` fed as HF's. Returns batch × length int64. The prompt is
        ``input_ids`` or, as ``model.generate`` names it, ``inputs`` (ConfigError for neither or both).

        ``attention_mask`` (left padding) runs each row on its unpadded ids; without one, a batch
        holding the pad id is masked as Hugging Face infers it (pad ≠ EOS), and a batch whose rows may
        be padded with a pad id that is also EOS is refused (ConfigError: pass the mask). Options beyond
        :data:`GENERATE_OPTIONS` raise ConfigError naming them, and so does a ``generation_config``
        setting one that ``model.generate`` would apply (``num_beams``, ``no_repeat_ngram_size``,
        ``suppress_tokens``, …). Every row is checked (:meth:`check_prompt`) before any session opens.
        Guarantee: for one row, the tokens of ``model.generate`` with the same options (sampling: after
        ``torch.manual_seed(seed)``) — tested in float64. A row that fails midway raises its SCXError
        with the tokens that row already made in ``tokens``, and every row's new tokens so far (the rows
        before it complete) in ``rows``.
        """
        if "inputs" in options:  # model.generate's name for its first argument
            if input_ids is not None:
                raise ConfigError("give the prompt once: input_ids or inputs, not both")
            input_ids = options.pop("inputs")
        if input_ids is None:
            raise ConfigError("generate needs input_ids (the prompt's token ids)")
        ids = _as_batch(input_ids)
        own = {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}  # the constructor's
        defaults = {k: v for k, v in own.items() if v is not None}
        plan = generation_settings(
            self.generation_config, {**defaults, **options, "max_new_tokens": max_new_tokens}, ids.shape[1]
        )
        _check_generation_config(self.generation_config, plan.do_sample)
        mask = options.get("attention_mask")
        eos = set(plan.eos_token_ids)
        pad = plan.pad_token_id
        if mask is None and pad is not None and pad not in eos and (ids == pad).any():
            mask = ids != pad  # as transformers infers it
        elif mask is None and pad is not None and ids.shape[0] > 1 and (ids[:, 0] == pad).any():
            # pad == EOS: transformers cannot infer the mask either (it warns and uses the pads as tokens)
            raise ConfigError(
                f"input_ids rows begin with the pad id {pad}, which is also an EOS id, so padding cannot be "
                "told from tokens: pass attention_mask (left padding; all ones to use the ids as given)"
            )
        rows = (
            [ids[i] for i in range(ids.shape[0])]
            if mask is None
            else _left_padded(ids, mask, "attention_mask")
        )
        streamer = options.get("streamer")
        check_streamer(streamer)
        if streamer is not None and len(rows) > 1:
            raise ConfigError("a streamer takes one row at a time (batch size 1)")
        for row in rows:  # every row before any session: a bad row k ran the k rows before it
            self.check_prompt(row, plan.max_new_tokens)  # a bad prompt is an error even for 0 new tokens
        gen = plan.generator()
        news: list[list[int]] = []
        for row in rows:
            try:
                news.append(self._generate_row(row, plan, gen, options.get("tokenizer"), streamer))
            except SCXError as exc:  # the rows already done, and this row's tokens, are reported
                exc.rows = [*news, list(exc.tokens or [])]
                raise
        width = max(len(n) for n in news)
        # no pad id: HF pads with the first EOS id
        fill = plan.pad_token_id if plan.pad_token_id is not None else (plan.eos_token_ids or (0,))[0]
        out = [list(ids[i].tolist()) + n + [fill] * (width - len(n)) for i, n in enumerate(news)]
        return torch.tensor(out, dtype=torch.long)

    def _generate_row(self, ids: np.ndarray, plan: Any, gen: Any, tokenizer: Any, streamer: Any) -> list[int]:
        """One row's new tokens (one session, closed at the end; the row checked by :meth:`check_prompt`
        first); its SCXError carries the tokens made."""
        if not plan.max_new_tokens:  # no session; the streamer still sees the prompt and the end
            if streamer is not None:
                streamer.put(torch.as_tensor(ids)[None, :])
                streamer.end()
            return []
        client, link = self._session()
        try:
            new = generate_tokens(
                ids,
                plan,
                functools.partial(client.prefill, link=link),
                functools.partial(client.decode, link=link),
                generator=gen,
                tokenizer=tokenizer,
                streamer=streamer,
            )
        except BaseException:
            _close_quietly(client)
            raise
        client.close()
        return new


def _close_quietly(client: Client[Any]) -> None:
    """Close ``client``'s session after a failure that did not fail the session itself (a streamer, a
    tokenizer, a logits row that is not finite): the server frees it instead of holding it until its idle
    timeout. A failed or closed session sends nothing; an error closing it is dropped, so the caller's
    error is the one raised."""
    with contextlib.suppress(Exception):
        client.close()

"""The torch backend: the SCX production path (CPU or CUDA; float64, float32, bfloat16, float16).

:class:`TorchBackend` implements the :class:`~scx_ref.backends.base.Backend` protocol with the same
semantics as :class:`~scx_ref.backends.numpy_backend.NumpyBackend` (property-tested against it in
``properties/test_torch_parity.py``: float64 agrees to rtol 1e-12). Design:

* weights are converted **once**, at construction, to the compute dtype on the device, and stored in
  the ``out × in`` layout of ``torch.nn.functional.linear`` (so every projection is one GEMM with no
  transpose at call time): the fused ``[W_q W_k W_v]`` (and Qwen2 bias), ``W_o``, the fused dense
  ``[W_gate W_up]``, ``W_down``; MoE experts as stacked ``E × 2f × d`` / ``E × d × f`` tensors;
* row permutations and the head-structured feature permutation are gathers (``index_select``);
* attention is ``scaled_dot_product_attention`` with ``enable_gqa`` (no K/V head expansion), with
  ``is_causal`` when query and key positions coincide and an explicit boolean mask otherwise; rows
  with no visible key fall back to the reference's safe softmax (zeros, as the numpy reference);
* RoPE cos/sin tables are computed once in float64 (the reference's formula) and cached per position;
* norms, softmaxes and MoE routing run in float32 for bfloat16/float16 (as Hugging Face does).

Batching is **by session**: a batch of requests is several SCX sessions, each with its own keys, so
every op here works on one session's rows (dim 0 is the row/token axis the permutations act on).
Row-wise ops (``norm``, ``project``, ``correction``, ``swiglu_act``, dense ``mlp``, ``add``, ``sub``)
accept extra leading dims; the row-gathers, RoPE and attention take exactly one session.

:class:`TorchPlainModel` is the plaintext forward over the same backend ops with a KV cache: the fair
baseline of ``scx bench`` (same weights, same kernels, no encoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from ..errors import ConfigError, DTypeError, NonFiniteError, ProtocolError, ShapeError, VocabularyError
from ..transforms import HeadPermutation
from ..transforms_torch import as_index, head_index
from ..weights import DenseMLP, ModelWeights
from .base import IndexArray, WeightName

__all__ = ["TorchBackend", "TorchPlainModel", "parse_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_LOW = (torch.bfloat16, torch.float16)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype named by ``dtype`` (``"float32"``, ``"bf16"``, ``torch.float16``, …)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise DTypeError(f"unsupported backend dtype {dtype}")
        return dtype
    alias = {
        "fp64": "float64",
        "double": "float64",
        "fp32": "float32",
        "float": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
    }
    name = alias.get(dtype, dtype)
    if name not in _DTYPES:
        raise DTypeError(f"unsupported backend dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class _Layer:
    """One block's weights, out × in (F.linear layout)."""

    attn_norm: torch.Tensor  # d
    mlp_norm: torch.Tensor  # d
    wqkv: torch.Tensor  # (H + 2 H_kv)·d_h × d
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # d × H·d_h
    gate_up: torch.Tensor | None = None  # 2f × d (dense)
    down: torch.Tensor | None = None  # d × f (dense)
    router: torch.Tensor | None = None  # E × d
    experts_gate_up: torch.Tensor | None = None  # E × 2f × d
    experts_down: torch.Tensor | None = None  # E × d × f


@dataclass
class _Weights:
    embed: torch.Tensor  # V × d
    layers: list[_Layer]
    final_norm: torch.Tensor  # d
    lm_head: torch.Tensor  # V × d
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def _t(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of ``x`` (numpy or torch) in dtype on device (no copy when already so)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.detach().to(device=device, dtype=dtype).contiguous()


def _from_model_weights(w: ModelWeights, dtype: torch.dtype, device: torch.device) -> _Weights:
    layers = []
    for lw in w.layers:
        bqkv = lw.bqkv
        layer = _Layer(
            attn_norm=_t(lw.attn_norm, dtype, device),
            mlp_norm=_t(lw.mlp_norm, dtype, device),
            wqkv=_t(np.concatenate([lw.wq, lw.wk, lw.wv], axis=1).T, dtype, device),
            bqkv=None if bqkv is None else _t(bqkv, dtype, device),
            wo=_t(lw.wo.T, dtype, device),
        )
        if isinstance(lw.mlp, DenseMLP):
            layer.gate_up = _t(np.concatenate([lw.mlp.w_gate, lw.mlp.w_up], axis=1).T, dtype, device)
            layer.down = _t(lw.mlp.w_down.T, dtype, device)
        else:
            layer.router = _t(lw.mlp.router.T, dtype, device)
            layer.experts_gate_up = _t(
                np.stack([np.concatenate([e.w_gate, e.w_up], axis=1).T for e in lw.mlp.experts]),
                dtype,
                device,
            )
            layer.experts_down = _t(np.stack([e.w_down.T for e in lw.mlp.experts]), dtype, device)
        layers.append(layer)
    return _Weights(
        _t(w.embed, dtype, device), layers, _t(w.final_norm, dtype, device), _t(w.lm_head.T, dtype, device)
    )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, in one reduction pass: a sum is finite only if every term is
    (NaN and ±Inf propagate; +Inf + −Inf is NaN), so a finite sum proves it; a non-finite sum (or an
    overflow of finite terms) falls back to the elementwise test."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


class TorchBackend:
    """Backend[torch.Tensor] over a model's weights, in ``dtype`` on ``device`` (see the module doc)."""

    name = "torch"

    def __init__(
        self,
        weights: ModelWeights | None,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        _config: ModelConfig | None = None,
        _tensors: _Weights | None = None,
    ) -> None:
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        if weights is not None:
            self.config: ModelConfig = weights.config
            self._w = _from_model_weights(weights, self.dtype, self.device)
        elif _config is not None and _tensors is not None:
            self.config = _config
            self._w = _tensors
        else:
            raise ConfigError("TorchBackend needs ModelWeights (or use TorchBackend.from_hf)")
        self._compute = torch.float32 if self.dtype in _LOW else self.dtype
        self._rope_cos = torch.empty(0, self.config.head_dim, dtype=self._compute, device=self.device)
        self._rope_sin = self._rope_cos

    @classmethod
    def from_hf(
        cls, model: Any, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
    ) -> TorchBackend:
        """A backend reading the weights straight from a loaded Hugging Face ``LlamaForCausalLM``,
        ``MixtralForCausalLM`` or ``Qwen2ForCausalLM`` (tensors are shared, not copied, wherever the
        layout, dtype and device already match; QKV and gate/up are fused once). Defaults: the
        model's own dtype and device."""
        from ..hf import config_from_hf, hf_tensors

        param = next(model.parameters())
        dt = parse_dtype(dtype) if dtype is not None else parse_dtype(param.dtype)
        dev = torch.device(device) if device is not None else param.device
        config = config_from_hf(model.config)
        t = hf_tensors(model)

        def c(x: torch.Tensor) -> torch.Tensor:
            return _t(x, dt, dev)

        layers = []
        for i in range(config.n_layers):
            p = f"layers.{i}."
            bias = t.get(p + "bqkv")
            layer = _Layer(
                attn_norm=c(t[p + "attn_norm"]),
                mlp_norm=c(t[p + "mlp_norm"]),
                wqkv=c(t[p + "wqkv"]),
                bqkv=None if bias is None else c(bias),
                wo=c(t[p + "wo"]),
            )
            if config.is_moe:
                layer.router = c(t[p + "router"])
                layer.experts_gate_up = c(t[p + "experts_gate_up"])
                layer.experts_down = c(t[p + "experts_down"])
            else:
                layer.gate_up = c(t[p + "gate_up"])
                layer.down = c(t[p + "down"])
            layers.append(layer)
        tensors = _Weights(c(t["embed"]), layers, c(t["final_norm"]), c(t["lm_head"]))
        return cls(None, dt, dev, _config=config, _tensors=tensors)

    # -- conversion --------------------------------------------------------------------------
    def from_numpy(self, x: npt.NDArray[Any]) -> torch.Tensor:
        """The tensor holding ``x`` cast to the backend dtype, on the backend device."""
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=self.dtype)

    def to_numpy(self, x: torch.Tensor) -> npt.NDArray[Any]:
        """A numpy copy of ``x`` in the wire dtype (float64 for float64, float32 otherwise)."""
        if x.is_floating_point():
            x = x.to(self._wire)
        return np.array(x.detach().cpu().numpy())

    def rows_to_numpy(self, x: torch.Tensor, index: IndexArray) -> npt.NDArray[Any]:
        """A numpy copy of ``x[index]`` in the wire dtype, with one gather.

        On CPU in the wire dtype the gather is numpy's (it reads the tensor's memory once); otherwise
        the rows are gathered on the device and only they are transferred.
        """
        idx = np.asarray(index, dtype=np.int64)
        x = x.detach()
        if x.device.type == "cpu" and (x.dtype == self._wire or not x.is_floating_point()):
            return np.asarray(x.numpy()[idx])
        y = x.index_select(0, self._idx(idx))
        if y.is_floating_point():
            y = y.to(self._wire)
        return np.asarray(y.cpu().numpy())  # a fresh tensor: its memory is not shared

    @property
    def _wire(self) -> torch.dtype:
        """The dtype arrays leave the backend in: float64 for float64, float32 otherwise."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def numpy_dtype(self) -> np.dtype[Any]:
        """float64 for a float64 backend, float32 otherwise (the wire format of bf16/fp16)."""
        return np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)

    def check_input(self, x: Any, name: str) -> torch.Tensor:
        """Validate an incoming array (floating, finite) and return it as a backend tensor."""
        if isinstance(x, torch.Tensor):
            t = x
        else:
            arr = np.asarray(x)
            if not np.issubdtype(arr.dtype, np.floating):
                raise DTypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(arr))
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be a floating-point array, got dtype {t.dtype}")
        t = t.to(device=self.device, dtype=self.dtype)
        if not _all_finite(t):
            raise NonFiniteError(f"{name} holds NaN or Inf")
        return t

    def _idx(self, index: IndexArray) -> torch.Tensor:
        return as_index(np.asarray(index), self.device)

    # -- weights -----------------------------------------------------------------------------
    def _layer(self, layer: int) -> _Layer:
        if not -self.config.n_layers <= layer < self.config.n_layers:
            raise ConfigError(f"layer {layer} out of range for a {self.config.n_layers}-layer model")
        return self._w.layers[layer]

    def _experts(self, experts: IndexArray | None, which: str) -> torch.Tensor:
        if experts is None:
            raise ConfigError(f"{which} of an MoE layer needs the selected experts")
        e = np.asarray(experts, dtype=np.int64).reshape(-1)
        if e.size and (e.min() < 0 or e.max() >= self.config.n_experts):
            raise ConfigError(f"expert ids must lie in [0, {self.config.n_experts}), got {e.tolist()}")
        return self._idx(e)

    def _matrix(self, which: WeightName, layer: int, experts: IndexArray | None) -> torch.Tensor:
        """The named weight, out × in (experts' maps stacked in the order given, as NumpyBackend)."""
        if which == "lm_head":
            return self._w.lm_head
        lw = self._layer(layer)
        if which == "wqkv":
            return lw.wqkv
        if which == "wo":
            return lw.wo
        if which == "router":
            if lw.router is None:
                raise ConfigError(f"layer {layer} has no router")
            return lw.router
        if which == "w_gate_up":
            if lw.gate_up is not None:
                return lw.gate_up
            assert lw.experts_gate_up is not None
            sel = lw.experts_gate_up.index_select(0, self._experts(experts, which))
            return sel.reshape(-1, sel.shape[-1])  # [GU_e1 GU_e2 …] along the output axis
        if which == "w_down":
            if lw.down is not None:
                return lw.down
            assert lw.experts_down is not None
            sel = lw.experts_down.index_select(0, self._experts(experts, which))  # k × d × f
            return sel.permute(1, 0, 2).reshape(sel.shape[1], -1)  # d × k·f: inputs stacked
        raise ConfigError(f"unknown weight {which!r}")

    def embed(self, ids: IndexArray) -> torch.Tensor:
        """Rows of the embedding table (ids validated against the vocabulary)."""
        arr = np.asarray(ids)
        vocab = self.config.vocab_size
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise VocabularyError(
                f"token ids must be a 1-D integer array, got shape {arr.shape}, dtype {arr.dtype}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise VocabularyError(f"token ids must lie in [0, {vocab}), got range [{arr.min()}, {arr.max()}]")
        return self._w.embed.index_select(0, self._idx(arr.astype(np.int64)))

    def _rms(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        xc = x.to(self._compute)
        var = xc.square().mean(dim=-1, keepdim=True)
        return (gamma.to(self._compute) * (xc * torch.rsqrt(var + self.config.rms_eps))).to(self.dtype)

    def norm(self, x: torch.Tensor, which: Literal["attn", "mlp", "final"], layer: int = -1) -> torch.Tensor:
        """RMSNorm_ε(x) = γ ⊙ x / sqrt(mean(x²) + ε) with the named gain."""
        if which == "final":
            gamma = self._w.final_norm
        elif which in ("attn", "mlp"):
            lw = self._layer(layer)
            gamma = lw.attn_norm if which == "attn" else lw.mlp_norm
        else:
            raise ConfigError(f"unknown norm {which!r}")
        return self._rms(x, gamma)

    def correction(
        self, eta: torch.Tensor, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> torch.Tensor:
        """ηW for the named weight (no bias): the exact T5 correction."""
        return F.linear(eta, self._matrix(which, layer, experts))

    def project(
        self, x: torch.Tensor, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> torch.Tensor:
        """xW + b (the bias only for ``wqkv`` of a Qwen2 model)."""
        bias = self._layer(layer).bqkv if which == "wqkv" else None
        return F.linear(x, self._matrix(which, layer, experts), bias)

    def mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The block's MLP on normalized rows: SwiGLU, or Mixtral MoE (softmax router, top-k with ties
        to the lower expert id as the reference's stable sort, renormalised weights)."""
        lw = self._layer(layer)
        if lw.gate_up is not None and lw.down is not None:
            return F.linear(self.swiglu_act(F.linear(x, lw.gate_up)), lw.down)
        assert lw.router is not None and lw.experts_gate_up is not None and lw.experts_down is not None
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        probs = torch.softmax(F.linear(x2, lw.router).to(self._compute), dim=-1)
        top_p, top = torch.sort(probs, dim=-1, descending=True, stable=True)
        k = self.config.top_k
        top, weights = top[:, :k], top_p[:, :k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x2)
        hit = torch.zeros(self.config.n_experts, dtype=torch.bool, device=x.device)
        hit[top.reshape(-1)] = True
        for e in torch.nonzero(hit).reshape(-1).tolist():
            rows, slot = torch.nonzero(top == e, as_tuple=True)
            h = self.swiglu_act(F.linear(x2.index_select(0, rows), lw.experts_gate_up[e]))
            y = F.linear(h, lw.experts_down[e])
            out.index_add_(0, rows, (weights[rows, slot][:, None] * y.to(self._compute)).to(self.dtype))
        return out.reshape(shape)

    def swiglu_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) ⊙ up for rows [gate up]."""
        f = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :f]) * gate_up[..., f:]

    # -- array ops -----------------------------------------------------------------------------
    def take_rows(self, x: torch.Tensor, index: IndexArray) -> torch.Tensor:
        """x[index] as one gather (T1 encode when index is π)."""
        return x.index_select(0, self._idx(index))

    def put_rows(self, y: torch.Tensor, perm: IndexArray) -> torch.Tensor:
        """out[perm] = y, computed as the gather y[π⁻¹] (T1 decode)."""
        p = np.asarray(perm, dtype=np.int64)
        if p.shape != (y.shape[0],):
            raise ShapeError(f"perm of shape {p.shape} cannot scatter {y.shape[0]} rows")
        inv = np.empty_like(p)
        inv[p] = np.arange(p.shape[0])
        return y.index_select(0, self._idx(inv))

    def concat_rows(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=0)

    def narrow(self, x: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
        """x[start:stop] along ``axis`` (a view, no copy)."""
        return x.narrow(axis, start, stop - start)

    def reshape(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(shape)

    def nrows(self, x: torch.Tensor) -> int:
        return int(x.shape[0])

    def shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def scale_rows(self, x: torch.Tensor, weights: npt.NDArray[Any]) -> torch.Tensor:
        """x ⊙ w[:, None] (w cast to the backend dtype, as NumpyBackend)."""
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64)).to(self.device, self.dtype)
        return x * w[:, None]

    def take_last(self, x: torch.Tensor, index: IndexArray) -> torch.Tensor:
        """x[..., index]: a gather along the last axis."""
        return x.index_select(x.ndim - 1, self._idx(index))

    def check(self, x: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Validate an incoming array — floating dtype (else DTypeError), exactly ``shape`` (else
        ShapeError), finite (else NonFiniteError) — and return it as a backend tensor. Accepts a
        tensor (in-process transport) or a numpy array (the wire)."""
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise DTypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(x))
        elif isinstance(x, torch.Tensor):
            t = x
        else:
            raise DTypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be a floating-point array, got dtype {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        t = t.to(device=self.device, dtype=self.dtype)
        if not _all_finite(t):
            raise NonFiniteError(f"{name} holds NaN or Inf")
        return t

    def head_permute(self, x: torch.Tensor, perm: HeadPermutation, group_size: int) -> torch.Tensor:
        """T3 encode on rows × heads × d_h (one gather over flattened features)."""
        rows, h, dh = x.shape
        idx = self._idx(head_index(perm, group_size))
        return x.reshape(rows, h * dh).index_select(1, idx).reshape(rows, h, dh)

    def head_unpermute(self, y: torch.Tensor, perm: HeadPermutation, group_size: int) -> torch.Tensor:
        """T3 decode on rows × heads × d_h (gather with the inverse flat index)."""
        rows, h, dh = y.shape
        inv = perm.flat_index(group_size, inverse=True)
        return y.reshape(rows, h * dh).index_select(1, self._idx(inv)).reshape(rows, h, dh)

    def _cos_sin(self, positions: IndexArray) -> tuple[torch.Tensor, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and pos.min() < 0:
            raise ShapeError("RoPE positions must be >= 0")
        need = int(pos.max()) + 1 if pos.size else 0
        have = self._rope_cos.shape[0]
        if need > have:
            size = max(need, 2 * have, 256)
            cos, sin = ops.rope_cos_sin(np.arange(size), self.config.head_dim, self.config.rope_theta)
            self._rope_cos = _t(cos, self._compute, self.device)
            self._rope_sin = _t(sin, self._compute, self.device)
        idx = self._idx(pos)
        return self._rope_cos.index_select(0, idx), self._rope_sin.index_select(0, idx)

    def rope(self, x: torch.Tensor, positions: IndexArray) -> torch.Tensor:
        """RoPE (HF rotate_half) on rows × heads × d_h: x·cos + rotate_half(x)·sin at each row's position."""
        if x.ndim != 3:
            raise ShapeError(f"RoPE input must be rows × heads × head_dim, got {tuple(x.shape)}")
        cos, sin = self._cos_sin(positions)
        xc = x.to(self._compute)
        half = x.shape[-1] // 2
        rotated = torch.cat([-xc[..., half:], xc[..., :half]], dim=-1)
        return (xc * cos[:, None, :] + rotated * sin[:, None, :]).to(self.dtype)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_positions: IndexArray,
        k_positions: IndexArray | None,
    ) -> torch.Tensor:
        """Causal GQA attention (query at position p sees keys at positions ≤ p; all keys when
        ``k_positions`` is None). Returns rows × H × d_h."""
        n_q, n_heads, _ = q.shape
        n_k, n_kv, _ = k.shape
        if n_heads % n_kv or v.shape[:2] != k.shape[:2]:
            raise ShapeError(
                f"incompatible attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        mask: torch.Tensor | None = None
        causal = False
        if k_positions is not None and n_k:
            qp = np.asarray(q_positions, dtype=np.int64).reshape(-1)
            kp = np.asarray(k_positions, dtype=np.int64).reshape(-1)
            if qp.size and qp.min() < kp.min():  # a query with no visible key: the reference gives 0
                return self.softmax_values(self._masked_scores(q, k, qp, kp), v)
            if qp.size and kp.max() <= qp.min():
                pass  # every query sees every key
            elif n_q == n_k and np.array_equal(qp, kp) and bool(np.all(np.diff(kp) > 0)):
                causal = True
            else:
                mask = torch.from_numpy(kp[None, :] <= qp[:, None]).to(self.device)
        if n_k == 0:
            return q.new_zeros(n_q, n_heads, v.shape[-1])
        qt, kt, vt = (t.transpose(0, 1).to(self._compute) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, is_causal=causal, enable_gqa=n_heads != n_kv
        )
        return out.transpose(0, 1).to(self.dtype).contiguous()

    def _masked_scores(
        self, q: torch.Tensor, k: torch.Tensor, qp: npt.NDArray[np.int64], kp: npt.NDArray[np.int64]
    ) -> torch.Tensor:
        s = self.scores(q, k)
        mask = torch.from_numpy(kp[None, :] <= qp[:, None]).to(self.device)
        return s.masked_fill(~mask[None], -math.inf)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled scores q kᵀ/√d_h per head with GQA: (H, rows_q, rows_k)."""
        n_q, n_heads, d_h = q.shape
        n_k, n_kv, _ = k.shape
        if n_heads % n_kv:
            raise ShapeError(f"incompatible score shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
        g = n_heads // n_kv
        qg = q.to(self._compute).reshape(n_q, n_kv, g, d_h).permute(1, 2, 0, 3)  # H_kv × g × q × d
        kt = k.to(self._compute).permute(1, 2, 0).unsqueeze(1)  # H_kv × 1 × d × k
        s = torch.matmul(qg, kt) / math.sqrt(d_h)
        return s.reshape(n_heads, n_q, n_k).to(self.dtype)

    def softmax_values(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(scores)·v per head (rows with no finite score give zeros, as the reference)."""
        n_heads, n_q, n_k = scores.shape
        n_kv = v.shape[1]
        s = scores.to(self._compute)
        m = s.amax(dim=-1, keepdim=True) if n_k else s.new_zeros(n_heads, n_q, 1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        tot = e.sum(dim=-1, keepdim=True)
        probs = (e / torch.where(tot == 0, torch.ones_like(tot), tot)).reshape(
            n_kv, n_heads // n_kv, n_q, n_k
        )
        vt = v.to(self._compute).permute(1, 0, 2).unsqueeze(1)  # H_kv × 1 × k × d
        out = torch.matmul(probs, vt)  # H_kv × g × q × d
        return out.permute(2, 0, 1, 3).reshape(n_q, n_heads, v.shape[-1]).to(self.dtype)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y

    def sub(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x - y

    def argmax_last(self, logits: torch.Tensor) -> int:
        """Argmax of the last row (first index among ties, as numpy)."""
        return int(torch.argmax(logits[-1]).item())


class TorchPlainModel:
    """Plaintext inference over a :class:`TorchBackend`'s own ops, with a KV cache.

    The same weights and kernels SCX uses, with no encoding: the fair baseline for ``scx bench``
    (and a float64 cross-check of the backend against :class:`~scx_ref.reference.ReferenceModel`).
    """

    def __init__(self, backend: TorchBackend) -> None:
        self.b = backend
        self.config = backend.config
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[0])

    def reset(self) -> None:
        self.keys, self.values = [], []

    @torch.inference_mode()
    def forward(self, ids: IndexArray, last_only: bool = False) -> torch.Tensor:
        """Logits of ``ids`` continuing the cache (all rows, or the last one), extending the cache."""
        b, c = self.b, self.config
        n = len(ids)
        start = self.length
        if start + n > c.max_positions:
            raise ProtocolError(f"sequence length {start + n} exceeds max_positions {c.max_positions}")
        pos = np.arange(start, start + n)
        x = b.embed(np.asarray(ids, dtype=np.int64))
        q_dim, kv_dim = c.q_dim, c.kv_dim
        for i in range(c.n_layers):
            h = b.norm(x, "attn", i)
            qkv = b.project(h, "wqkv", i)
            q = b.rope(qkv[:, :q_dim].reshape(n, c.n_heads, c.head_dim), pos)
            k = b.rope(qkv[:, q_dim : q_dim + kv_dim].reshape(n, c.n_kv_heads, c.head_dim), pos)
            v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)
            if i < len(self.keys):
                self.keys[i] = torch.cat([self.keys[i], k])
                self.values[i] = torch.cat([self.values[i], v])
            else:
                self.keys.append(k)
                self.values.append(v)
            kpos = np.arange(start + n) if n > 1 else None  # one new row sees the whole cache
            att = b.attention(q, self.keys[i], self.values[i], pos, kpos)
            x = x + b.project(att.reshape(n, q_dim), "wo", i)
            x = x + b.mlp(b.norm(x, "mlp", i), i)
        if last_only:
            x = x[-1:]
        return b.project(b.norm(x, "final"), "lm_head")

    def prefill(self, ids: IndexArray, last_only: bool = False) -> torch.Tensor:
        """Logits of a prompt (a fresh cache)."""
        self.reset()
        return self.forward(ids, last_only)

    def decode(self, token: int) -> torch.Tensor:
        """Logits (V,) of one new token."""
        return self.forward(np.asarray([token], dtype=np.int64))[0]

    def generate(self, ids: IndexArray, n_new: int) -> list[int]:
        """Greedy continuation (``n_new`` tokens)."""
        nxt = self.b.argmax_last(self.prefill(ids, last_only=True))
        out: list[int] = []
        for step in range(n_new):
            out.append(nxt)
            if step + 1 < n_new:
                nxt = int(torch.argmax(self.decode(nxt)).item())
        return out

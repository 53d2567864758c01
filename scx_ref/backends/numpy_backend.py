"""The numpy reference backend: every op is the matching function of :mod:`scx_ref.ops` /
:mod:`scx_ref.transforms`, computed in the weights' dtype (float64 for exactness checks)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import FloatArray, as_float_array
from ..errors import ConfigError, DTypeError, ShapeError
from ..transforms import HeadPermutation
from ..weights import DenseMLP, ModelWeights, MoEMLP
from .base import IndexArray, WeightName

__all__ = ["NumpyBackend"]


class NumpyBackend:
    """Backend[numpy.ndarray] over :class:`ModelWeights` (cast to ``dtype`` once, at construction)."""

    name = "numpy"

    def __init__(self, weights: ModelWeights, dtype: npt.DTypeLike = np.float64) -> None:
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ConfigError(f"backend dtype must be floating, got {self.dtype}")
        self.weights = weights if weights.dtype == self.dtype else weights.astype(self.dtype)
        self.config = weights.config
        self._fused: dict[tuple[str, int], FloatArray] = {}

    # -- conversion --------------------------------------------------------------------------
    def from_numpy(self, x: npt.NDArray[Any]) -> FloatArray:
        return np.asarray(x, dtype=self.dtype)

    def to_numpy(self, x: FloatArray) -> npt.NDArray[Any]:
        return np.array(x)

    def rows_to_numpy(self, x: FloatArray, index: IndexArray) -> npt.NDArray[Any]:
        """``x[index]``: fancy indexing already copies."""
        return np.asarray(x[np.asarray(index, dtype=np.int64)])

    def numpy_dtype(self) -> np.dtype[Any]:
        return self.dtype

    # -- weights -----------------------------------------------------------------------------
    def _gate_up(self, layer: int, experts: IndexArray | None) -> FloatArray:
        mlp = self.weights.layers[layer].mlp
        if isinstance(mlp, DenseMLP):
            key = ("gate_up", layer)
            if key not in self._fused:
                self._fused[key] = np.concatenate([mlp.w_gate, mlp.w_up], axis=1)
            return self._fused[key]
        if experts is None:
            raise ConfigError("w_gate_up of an MoE layer needs the selected experts")
        return np.concatenate(
            [np.concatenate([mlp.experts[e].w_gate, mlp.experts[e].w_up], axis=1) for e in experts.tolist()],
            axis=1,
        )

    def _down(self, layer: int, experts: IndexArray | None) -> FloatArray:
        mlp = self.weights.layers[layer].mlp
        if isinstance(mlp, DenseMLP):
            return mlp.w_down
        if experts is None:
            raise ConfigError("w_down of an MoE layer needs the selected experts")
        return np.concatenate([mlp.experts[e].w_down for e in experts.tolist()], axis=0)

    def _matrix(self, which: WeightName, layer: int, experts: IndexArray | None) -> FloatArray:
        if which == "lm_head":
            return self.weights.lm_head
        lw = self.weights.layers[layer]
        if which == "wqkv":
            key = ("wqkv", layer)
            if key not in self._fused:
                self._fused[key] = lw.wqkv
            return self._fused[key]
        if which == "wo":
            return lw.wo
        if which == "w_gate_up":
            return self._gate_up(layer, experts)
        if which == "w_down":
            return self._down(layer, experts)
        if which == "router":
            if not isinstance(lw.mlp, MoEMLP):
                raise ConfigError(f"layer {layer} has no router")
            return lw.mlp.router
        raise ConfigError(f"unknown weight {which!r}")

    def embed(self, ids: IndexArray) -> FloatArray:
        return ops.embed(ids, self.weights.embed)

    def norm(self, x: FloatArray, which: Literal["attn", "mlp", "final"], layer: int = -1) -> FloatArray:
        if which == "final":
            gamma = self.weights.final_norm
        else:
            lw = self.weights.layers[layer]
            gamma = lw.attn_norm if which == "attn" else lw.mlp_norm
        return ops.rms_norm(x, gamma, self.config.rms_eps)

    def correction(
        self, eta: FloatArray, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> FloatArray:
        return eta @ self._matrix(which, layer, experts)

    def project(
        self, x: FloatArray, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> FloatArray:
        bias = self.weights.layers[layer].bqkv if which == "wqkv" else None
        if bias is not None and which == "wqkv":
            key = ("bqkv", layer)
            if key not in self._fused:
                self._fused[key] = bias
            bias = self._fused[key]
        return ops.linear(x, self._matrix(which, layer, experts), bias)

    def mlp(self, x: FloatArray, layer: int) -> FloatArray:
        return ops.mlp(x, self.weights.layers[layer].mlp, self.config.top_k)

    def swiglu_act(self, gate_up: FloatArray) -> FloatArray:
        f = gate_up.shape[-1] // 2
        return ops.silu(gate_up[..., :f]) * gate_up[..., f:]

    # -- array ops -----------------------------------------------------------------------------
    def take_rows(self, x: FloatArray, index: IndexArray) -> FloatArray:
        return x[index]

    def put_rows(self, y: FloatArray, perm: IndexArray) -> FloatArray:
        out = np.empty_like(y)
        out[perm] = y
        return out

    def concat_rows(self, xs: list[FloatArray]) -> FloatArray:
        return np.concatenate(xs, axis=0)

    def narrow(self, x: FloatArray, axis: int, start: int, stop: int) -> FloatArray:
        return x[start:stop] if axis == 0 else x[:, start:stop]

    def reshape(self, x: FloatArray, shape: tuple[int, ...]) -> FloatArray:
        return x.reshape(shape)

    def nrows(self, x: FloatArray) -> int:
        return int(x.shape[0])

    def shape(self, x: FloatArray) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def scale_rows(self, x: FloatArray, weights: npt.NDArray[Any]) -> FloatArray:
        out: FloatArray = x * np.asarray(weights, dtype=self.dtype)[:, None]
        return out

    def head_permute(self, x: FloatArray, perm: HeadPermutation, group_size: int) -> FloatArray:
        return perm.apply(x, group_size)

    def head_unpermute(self, y: FloatArray, perm: HeadPermutation, group_size: int) -> FloatArray:
        return perm.invert(y, group_size)

    def rope(self, x: FloatArray, positions: IndexArray) -> FloatArray:
        return ops.apply_rope(x, positions, self.config.rope_theta)

    def attention(
        self,
        q: FloatArray,
        k: FloatArray,
        v: FloatArray,
        q_positions: IndexArray,
        k_positions: IndexArray | None,
    ) -> FloatArray:
        mask = None if k_positions is None else k_positions[None, :] <= q_positions[:, None]
        return ops.attention(q, k, v, mask=mask)

    def scores(self, q: FloatArray, k: FloatArray) -> FloatArray:
        n_q, n_heads, d_h = q.shape
        n_kv = k.shape[1]
        g = n_heads // n_kv
        s = np.einsum("qhgd,khd->hgqk", q.reshape(n_q, n_kv, g, d_h), k) * float(1.0 / np.sqrt(d_h))
        out: FloatArray = s.reshape(n_heads, n_q, k.shape[0])
        return out

    def softmax_values(self, scores: FloatArray, v: FloatArray) -> FloatArray:
        n_heads, n_q, n_k = scores.shape
        n_kv = v.shape[1]
        probs = ops.softmax(scores, axis=-1).reshape(n_kv, n_heads // n_kv, n_q, n_k)
        out: FloatArray = np.einsum("hgqk,khd->qhgd", probs, v).reshape(n_q, n_heads, v.shape[-1])
        return out

    def add(self, x: FloatArray, y: FloatArray) -> FloatArray:
        return x + y

    def sub(self, x: FloatArray, y: FloatArray) -> FloatArray:
        return x - y

    def argmax_last(self, logits: FloatArray) -> int:
        return int(np.argmax(logits[-1]))

    def take_last(self, x: FloatArray, index: IndexArray) -> FloatArray:
        out: FloatArray = x[..., index]
        return out

    def check(self, x: Any, name: str, shape: tuple[int, ...]) -> FloatArray:
        if not isinstance(x, np.ndarray):
            raise DTypeError(f"{name} must be a numpy array, got {type(x).__name__}")
        if tuple(x.shape) != tuple(shape):
            raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        return as_float_array(x, name).astype(self.dtype, copy=False)

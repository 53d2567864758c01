"""The numpy reference backend: every op is the matching function of :mod:`scx_ref.ops` /
:mod:`scx_ref.transforms`, computed in the weights' dtype (float64 for exactness checks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import FloatArray
from ..arrays import NumpyOps, row_index
from ..errors import ConfigError, DTypeError, ShapeError
from ..transforms import blinding_correction
from ..weights import DenseMLP, LayerWeights, ModelWeights, MoEMLP
from .base import (
    Check,
    IndexArray,
    NormName,
    Products,
    WeightName,
    check_experts,
    check_heads,
    check_rope_split,
    check_scores,
)
from .built_once import BuiltOnce

__all__ = ["NumpyBackend", "WideWeights"]


def _floating_rows(x: Any, what: str) -> None:
    """DTypeError unless ``x`` holds floating-point numbers, as the torch backend refuses other rows:
    integer rows made a stage compute in float64 whatever the backend's dtype (an MoE layer's in int64,
    which truncated every row to zeros)."""
    try:
        dtype = np.asarray(x).dtype
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DTypeError(f"{what} must be a floating-point array numpy can read: {exc}") from None
    if not np.issubdtype(dtype, np.floating):
        raise DTypeError(f"{what} must be a floating-point array, got dtype {dtype}")


def _positions(p: Any, what: str) -> npt.NDArray[Any]:
    """Positions as an array of integers (ShapeError otherwise, as :meth:`NumpyBackend.rope`): a float
    position was compared as it is here and truncated on torch, a string one compared as text."""
    arr = np.asarray(p)
    if arr.size and arr.dtype.kind not in "iu":
        raise ShapeError(f"{what} positions must be integers, got {arr.dtype}")
    return arr


class _WideLayers:
    """The blocks of :class:`WideWeights`: block i cast to float64 when first read, then kept."""

    def __init__(self, src: ModelWeights, held: BuiltOnce[int | str, Any]) -> None:
        self._src, self._held = src, held

    def __len__(self) -> int:
        return len(self._src.layers)

    def __getitem__(self, i: int) -> LayerWeights:
        layer: LayerWeights = self._held.get(int(i), lambda: self._src.layers[i].astype(np.float64))
        return layer


class WideWeights:
    """A float64 twin of :class:`ModelWeights` of a narrower dtype whose arrays are cast on first read and
    kept (:meth:`NumpyBackend.widened`): what the backend reads of ModelWeights — ``config``, ``dtype``,
    ``layers`` (indexed and counted), ``embed``, ``final_norm``, ``lm_head`` — each the same
    ``numpy.ndarray.astype`` of the same source array as :meth:`ModelWeights.astype` makes."""

    def __init__(self, src: ModelWeights) -> None:
        self.src, self.config = src, src.config
        self._held: BuiltOnce[int | str, Any] = BuiltOnce()  # block index or top-level name -> float64 form
        self.layers = _WideLayers(src, self._held)

    @property
    def dtype(self) -> np.dtype[Any]:
        """float64."""
        return np.dtype(np.float64)

    def _array(self, name: str) -> FloatArray:
        arr: FloatArray = self._held.get(name, lambda: getattr(self.src, name).astype(np.float64))
        return arr

    @property
    def embed(self) -> FloatArray:
        """The embedding table in float64 (cast on its first read)."""
        return self._array("embed")

    @property
    def final_norm(self) -> FloatArray:
        """The final norm's gain in float64 (cast on its first read)."""
        return self._array("final_norm")

    @property
    def lm_head(self) -> FloatArray:
        """The LM head in float64 (cast on its first read)."""
        return self._array("lm_head")

    def converted_blocks(self) -> list[int]:
        """The blocks held in float64 so far, in order."""
        return sorted(k for k, _ in self._held.items() if isinstance(k, int))


class NumpyBackend(NumpyOps):
    """Backend[numpy.ndarray] over :class:`ModelWeights` (cast to ``dtype`` once, at construction).

    Refuses what the torch backend refuses, with the same error classes: weights that are not
    :class:`ModelWeights` (ConfigError), a dtype that is not floating (DTypeError), a layer outside the
    model or an unknown norm (ConfigError), rows of another width than the stage reads (ShapeError), rows
    that are not floating-point numbers (DTypeError; torch raised its own errors)."""

    name = "numpy"

    def __init__(self, weights: ModelWeights, dtype: npt.DTypeLike = np.float64) -> None:
        if not isinstance(weights, ModelWeights):
            raise ConfigError(f"NumpyBackend needs ModelWeights, got {type(weights).__name__}")
        if dtype is None:
            raise DTypeError("backend dtype must be floating, got None")
        super().__init__(dtype)
        self._setup(weights if weights.dtype == self.dtype else weights.astype(self.dtype))

    def _setup(self, weights: ModelWeights | WideWeights) -> None:
        self.weights = weights
        self.config = weights.config
        self._fused: dict[tuple[str, int], FloatArray] = {}
        self._wide: NumpyBackend | None = None
        self._wide_lock = threading.Lock()  # the float64 twin is built once, whichever thread asks first

    def widened(self) -> NumpyBackend:
        """This backend's weights in float64 (itself when already float64), built once. Each block's weights,
        and the embedding, final norm and LM head, are converted when the twin first reads them
        (:class:`WideWeights`): a float64 copy of a block exists only once a blinded stage of that block has
        run in float64 — level ``paper``'s guard blocks, not the whole model. The values are an eager
        copy's (``ModelWeights.astype``), bit for bit."""
        if self.dtype == np.float64:
            return self
        with self._wide_lock:
            if self._wide is None:
                wide = NumpyBackend.__new__(NumpyBackend)
                NumpyOps.__init__(wide, np.float64)
                assert isinstance(self.weights, ModelWeights)  # only a float64 backend holds WideWeights
                wide._setup(WideWeights(self.weights))
                self._wide = wide
        return self._wide

    def _fuse(self, name: str, layer: int, build: Callable[[], FloatArray]) -> FloatArray:
        """A fused matrix (QKV, its bias, dense gate/up) built once per layer and kept."""
        key = (name, layer)
        if key not in self._fused:
            self._fused[key] = build()
        return self._fused[key]

    # -- weights -----------------------------------------------------------------------------
    def _layer(self, layer: int) -> LayerWeights:
        """The block ``layer`` (ConfigError outside 0 … n_layers − 1: −1 is not the last block)."""
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int | np.integer)
            or not 0 <= layer < len(self.weights.layers)
        ):
            raise ConfigError(f"layer {layer} out of range for a {self.config.n_layers}-layer model")
        return self.weights.layers[int(layer)]

    def _gate_up(self, layer: int, experts: IndexArray | None) -> FloatArray:
        mlp = self._layer(layer).mlp
        if isinstance(mlp, DenseMLP):
            dense = mlp
            return self._fuse("gate_up", layer, lambda: np.concatenate([dense.w_gate, dense.w_up], axis=1))
        sel = check_experts(experts, len(mlp.experts), "w_gate_up").tolist()
        return np.concatenate(
            [np.concatenate([mlp.experts[e].w_gate, mlp.experts[e].w_up], axis=1) for e in sel], axis=1
        )

    def _down(self, layer: int, experts: IndexArray | None) -> FloatArray:
        mlp = self._layer(layer).mlp
        if isinstance(mlp, DenseMLP):
            return mlp.w_down
        sel = check_experts(experts, len(mlp.experts), "w_down").tolist()
        return np.concatenate([mlp.experts[e].w_down for e in sel], axis=0)

    def _matrix(self, which: WeightName, layer: int, experts: IndexArray | None) -> FloatArray:
        if which == "lm_head":
            return self.weights.lm_head
        lw = self._layer(layer)
        if which == "wqkv":
            return self._fuse("wqkv", layer, lambda: lw.wqkv)
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

    def _qkv_bias(self, layer: int) -> FloatArray | None:
        """The fused [b_q b_k b_v] of a Qwen2 layer (built once), or None."""
        key = ("bqkv", layer)
        if key not in self._fused:
            bias = self._layer(layer).bqkv
            if bias is None:
                return None
            self._fused[key] = bias
        return self._fused[key]

    def embed(self, ids: IndexArray) -> FloatArray:
        """The embedding rows of ``ids`` (:func:`~scx_ref.ops.embed`)."""
        return ops.embed(ids, self.weights.embed)

    def norm(self, x: FloatArray, which: NormName, layer: int = -1, *, name: str | None = None) -> FloatArray:
        """RMSNorm with the named gain (``name``: x scanned first, see Backend.norm); DTypeError for rows
        that are not floating. Rows of another floating dtype are computed in the backend's (cast first, as
        :meth:`project`, :meth:`mlp` and the torch backend: float64 rows on a float32 backend were
        normalized in float64 without ``name``, in float32 with it)."""
        if which == "final":
            gamma = self.weights.final_norm
        elif which in ("attn", "mlp"):
            lw = self._layer(layer)
            gamma = lw.attn_norm if which == "attn" else lw.mlp_norm
        else:
            raise ConfigError(f"unknown norm {which!r}")
        if np.ndim(x) == 0 or np.shape(x)[-1] != gamma.shape[0]:
            raise ShapeError(f"rows {np.shape(x)} for a norm of width {gamma.shape[0]}")
        x = self.floating(x, "RMSNorm rows" if name is None else name, finite=name is not None)
        return ops.rms_norm(x, gamma, self.config.rms_eps)

    def correction(
        self, eta: FloatArray, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> FloatArray:
        """ηW: :func:`~scx_ref.transforms.blinding_correction` with the named matrix."""
        return blinding_correction(eta, self._matrix(which, layer, experts), self)

    def weight_sketch(
        self, which: WeightName, layer: int, expert: int | None, basis: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``(W·basis, column sums of W²)`` in float64 (W in × out), read in slices of input rows."""
        w = self._matrix(which, layer, None if expert is None else np.array([expert], dtype=np.int64))
        basis = np.asarray(basis)
        if basis.ndim != 2 or basis.shape[0] != w.shape[1]:
            raise ShapeError(f"a basis {basis.shape} for a matrix {w.shape} (in × out): out × m")
        wb = np.empty((w.shape[0], basis.shape[1]), dtype=np.float64)
        col_sq = np.zeros(w.shape[1], dtype=np.float64)
        step = max(1, (1 << 22) // max(1, w.shape[1]))
        for start in range(0, w.shape[0], step):
            part = np.asarray(w[start : start + step], dtype=np.float64)
            wb[start : start + step] = part @ basis
            col_sq += np.einsum("ij,ij->j", part, part)
        return wb, col_sq

    def project(
        self, x: FloatArray, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> FloatArray:
        """xW + b (the bias only for ``wqkv`` of a Qwen2 model): DTypeError for rows that are not floating;
        rows of another floating dtype computed in the backend's, as the torch backend (numpy promoted
        float64 rows on a float32 backend to a float64 product)."""
        bias = self._qkv_bias(layer) if which == "wqkv" else None
        w = self._matrix(which, layer, experts)
        x = self.floating(x, f"rows of a {which} product", finite=False)
        return self.linear(x, w, bias)

    def mlp(self, x: FloatArray, layer: int) -> FloatArray:
        """The block's MLP (ShapeError for rows of another width than the model's, DTypeError for rows that
        are not floating), row by row over any leading dims, as the torch backend (the MoE routing read 2-D
        rows only: IndexError); rows of another floating dtype computed in the backend's, as there."""
        mlp = self._layer(layer).mlp
        if np.ndim(x) == 0 or np.shape(x)[-1] != self.config.hidden_size:
            raise ShapeError(f"rows {np.shape(x)} for an MLP of width {self.config.hidden_size}")
        x = self.floating(x, "MLP rows", finite=False)
        if isinstance(mlp, DenseMLP) or np.ndim(x) == 2:
            return ops.mlp(x, mlp, self.config.top_k)
        out: FloatArray = ops.mlp(x.reshape(-1, x.shape[-1]), mlp, self.config.top_k).reshape(x.shape)
        return out

    def swiglu_act(self, gate_up: FloatArray) -> FloatArray:
        """silu(gate) ⊙ up (ShapeError unless the rows split into two equal halves, DTypeError unless they
        are floating)."""
        if np.ndim(gate_up) == 0 or np.shape(gate_up)[-1] % 2:
            raise ShapeError(f"[gate up] rows {np.shape(gate_up)}: not two equal halves")
        _floating_rows(gate_up, "[gate up] rows")
        f = gate_up.shape[-1] // 2
        return ops.silu(gate_up[..., :f]) * gate_up[..., f:]

    def project64_norm(
        self, x: FloatArray, which: NormName, layer: int, right: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``project64(norm(x, which, layer), right)``, as it reads."""
        return self.project64(self.norm(x, which, layer), right)

    def freivalds_excess(
        self,
        y: FloatArray | Products,
        right_y: npt.NDArray[np.float64],
        x: FloatArray | Products,
        right_x: npt.NDArray[np.float64],
        terms: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], float],
        norm: NormName | None = None,
        norm_layer: int = -1,
    ) -> float | None:
        """``None``: the reference fuses nothing; the verifier composes the check as it reads."""
        return None

    def gate_up_excess(
        self, gate_up: FloatArray, y: FloatArray, x: FloatArray, layer: int, up: Check, down: Check
    ) -> tuple[float, float] | None:
        """``None``: the reference fuses nothing; the verifier composes the checks as they read."""
        return None

    def project64_gate_up(
        self, gate_up: FloatArray, right_gate_up: npt.NDArray[np.float64], right_down: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
        """``project64(gate_up, right_gate_up) + project64(swiglu_act(gate_up), right_down)``, as it reads."""
        return self.project64(gate_up, right_gate_up) + self.project64(self.swiglu_act(gate_up), right_down)

    # -- position and attention ----------------------------------------------------------------
    def rope(self, x: FloatArray, positions: IndexArray) -> FloatArray:
        """:func:`~scx_ref.ops.apply_rope` at integer positions in [0, max_positions) on heads of the model's
        head_dim (ShapeError otherwise, as the torch backend, whose tables are the model's: they start at 0
        and end at max_positions, where the config holds the angles finite)."""
        pos = np.asarray(positions)
        if pos.size and (pos.dtype.kind not in "iu" or int(pos.min()) < 0):
            raise ShapeError(f"RoPE positions must be integers >= 0, got {pos.dtype}")
        if pos.size and int(pos.max()) >= self.config.max_positions:
            raise ShapeError(
                f"RoPE position {int(pos.max())} past the model's max_positions = {self.config.max_positions}"
            )
        if np.ndim(x) == 3 and np.shape(x)[-1] != self.config.head_dim:
            raise ShapeError(
                f"RoPE on heads of width {np.shape(x)[-1]}, the model's are {self.config.head_dim}"
            )
        return ops.apply_rope(x, positions, self.config.rope_theta)

    def rope_take(
        self,
        x: FloatArray,
        rows: IndexArray,
        positions: IndexArray,
        rope_index: IndexArray,
        plain_index: IndexArray,
        *,
        name: str | None = None,
    ) -> tuple[FloatArray, FloatArray]:
        """The definition as written: gather the rows (scanned with ``name``), RoPE the first w columns,
        gather the columns."""
        if np.ndim(rope_index) != 1 or np.ndim(plain_index) != 1:  # len() of a 0-d index: a raw TypeError
            raise ShapeError(
                f"column indices must be 1-D, got {np.shape(rope_index)} and {np.shape(plain_index)}"
            )
        dh, w = self.config.head_dim, len(rope_index)
        check_rope_split(np.shape(x), w, len(plain_index), dh)
        ri = row_index(rope_index, w, "column")
        pi = row_index(plain_index, np.shape(x)[1] - w, "column")
        t = self.take_rows(x, row_index(rows, np.shape(x)[0]))
        if name is not None:
            t = self.floating(t, name)
        n = t.shape[0]
        roped = self.rope(t[:, :w].reshape(n, w // dh, dh), np.asarray(positions)).reshape(n, w)
        plain = t[:, w:][:, pi]
        return roped[:, ri].reshape(n, w // dh, dh), plain.reshape(n, len(pi) // dh, dh)

    def attention(
        self,
        q: FloatArray,
        k: FloatArray,
        v: FloatArray,
        q_positions: IndexArray,
        k_positions: IndexArray | None,
    ) -> FloatArray:
        """:func:`~scx_ref.ops.attention` with the causal mask of the positions (one integer per row;
        ShapeError otherwise, or for shapes :func:`~.base.check_heads` refuses); no keys give zeros, as on
        torch."""
        check_heads(np.shape(q), np.shape(k), np.shape(v))
        qp = np.asarray(q_positions)
        kp = None if k_positions is None else _positions(k_positions, "key")
        if kp is not None:
            qp = _positions(qp, "query")
        if (kp is not None and qp.shape != q.shape[:1]) or (kp is not None and kp.shape != k.shape[:1]):
            raise ShapeError(
                f"positions {qp.shape}, {None if kp is None else kp.shape} for {q.shape[0]} queries and "
                f"{k.shape[0]} keys"
            )
        if k.shape[0] == 0:
            return np.zeros((q.shape[0], q.shape[1], v.shape[-1]), dtype=np.result_type(q, v))
        mask = None if kp is None else kp[None, :] <= qp[:, None]
        return ops.attention(q, k, v, mask=mask)

    def scores(self, q: FloatArray, k: FloatArray) -> FloatArray:
        """q kᵀ/√d_h per head (ShapeError for shapes :func:`~.base.check_heads` refuses)."""
        check_heads(np.shape(q), np.shape(k))
        n_q, n_heads, d_h = q.shape
        n_kv = k.shape[1]
        g = n_heads // n_kv
        s = np.einsum("qhgd,khd->hgqk", q.reshape(n_q, n_kv, g, d_h), k) * float(1.0 / np.sqrt(d_h))
        out: FloatArray = s.reshape(n_heads, n_q, k.shape[0])
        return out

    def softmax_values(self, scores: FloatArray, v: FloatArray) -> FloatArray:
        """softmax(scores)·v per head (ShapeError unless scores are heads × queries × v's rows, with the
        heads a multiple of v's); no keys give zeros, as :meth:`attention` and the torch backend."""
        check_scores(np.shape(scores), np.shape(v))
        n_heads, n_q, n_k = scores.shape
        n_kv = v.shape[1]
        if n_k == 0:  # no keys give zeros, as attention() and the torch backend (a softmax over nothing)
            return np.zeros((n_q, n_heads, v.shape[-1]), dtype=np.result_type(scores, v))
        probs = ops.softmax(scores, axis=-1).reshape(n_kv, n_heads // n_kv, n_q, n_k)
        out: FloatArray = np.einsum("hgqk,khd->qhgd", probs, v).reshape(n_q, n_heads, v.shape[-1])
        return out

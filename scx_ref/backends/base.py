"""The Backend interface: the array operations the SCX protocol needs, on one model's weights.

A backend owns the model's weights placed where it computes (host memory, a GPU) and exposes

* *weight stages* named by layer: the projections (``qkv``, ``o_proj``), the norms, the MLP/MoE,
  the LM head, and the client's blinding corrections ``ηW`` (``correction``);
* *array ops* the client and server use: gathers and scatters of rows (T1/T2), the head-structured
  feature permutation (T3), RoPE, attention, elementwise add/sub, concatenation.

The protocol engine is written against this interface only, so the numpy reference
(:class:`~scx_ref.backends.numpy_backend.NumpyBackend`) and the torch backend are interchangeable.
Arrays cross the interface as the backend's native type ``A``; keys (permutations, index arrays)
are numpy int64 arrays; ``to_numpy`` / ``from_numpy`` convert at message boundaries.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ..config import ModelConfig
from ..transforms import HeadPermutation

__all__ = ["A", "Backend", "WeightName", "split_qkv"]

A = TypeVar("A")

# Names of the per-layer linear maps a client may blind (T5) and so needs ηW for.
WeightName = Literal["wqkv", "wo", "w_gate_up", "w_down", "router", "lm_head"]
IndexArray = npt.NDArray[np.int64]


class Backend(Protocol, Generic[A]):
    """Array operations on one model, in one dtype, on one device."""

    config: ModelConfig
    name: str

    # -- conversion --------------------------------------------------------------------------
    def from_numpy(self, x: npt.NDArray[Any]) -> A:
        """The backend array holding ``x`` (cast to the backend's dtype)."""
        ...

    def to_numpy(self, x: A) -> npt.NDArray[Any]:
        """A numpy copy of ``x``."""
        ...

    def rows_to_numpy(self, x: A, index: IndexArray) -> npt.NDArray[Any]:
        """A numpy copy of ``x[index]`` (rows), equal to ``to_numpy(take_rows(x, index))``.

        One gather instead of a gather and a copy: the client's T1 decode + decoy strip of the
        logits, the largest array of a prefill.
        """
        ...

    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype matching the backend's compute dtype (float32 for bf16/fp16 wire format)."""
        ...

    # -- client-side weight ops ----------------------------------------------------------------
    def embed(self, ids: IndexArray) -> A:
        """Rows of the embedding table (validates ids against the vocabulary)."""
        ...

    def norm(self, x: A, which: Literal["attn", "mlp", "final"], layer: int = -1) -> A:
        """RMSNorm with the named gain (``layer`` ignored for ``final``)."""
        ...

    def correction(self, eta: A, which: WeightName, layer: int = -1, experts: IndexArray | None = None) -> A:
        """ηW for the named weight (no bias): the exact T5 correction. For ``w_gate_up`` of an MoE
        layer, ``experts`` selects the experts whose maps are stacked (same order as ``project``)."""
        ...

    # -- server-side weight ops ----------------------------------------------------------------
    def project(self, x: A, which: WeightName, layer: int = -1, experts: IndexArray | None = None) -> A:
        """xW + b for the named weight (the bias only for ``wqkv`` of a Qwen2 model)."""
        ...

    def mlp(self, x: A, layer: int) -> A:
        """The block's MLP (dense SwiGLU, or MoE with routing) on normalized rows x."""
        ...

    def swiglu_act(self, gate_up: A) -> A:
        """silu(gate) ⊙ up for gate_up = [gate up] rows (the client's share of a blinded MLP)."""
        ...

    # -- array ops -----------------------------------------------------------------------------
    def take_rows(self, x: A, index: IndexArray) -> A:
        """x[index] (T1 encode when index is π)."""
        ...

    def put_rows(self, y: A, perm: IndexArray) -> A:
        """The inverse of ``take_rows`` for a permutation: out[perm] = y (T1 decode)."""
        ...

    def concat_rows(self, xs: list[A]) -> A: ...

    def narrow(self, x: A, axis: int, start: int, stop: int) -> A:
        """x[start:stop] along ``axis`` (0 = rows, 1 = columns)."""
        ...

    def reshape(self, x: A, shape: tuple[int, ...]) -> A: ...

    def nrows(self, x: A) -> int: ...

    def shape(self, x: A) -> tuple[int, ...]: ...

    def scale_rows(self, x: A, weights: npt.NDArray[Any]) -> A:
        """x ⊙ w[:, None]: row i scaled by ``weights[i]`` (MoE routing weights)."""
        ...

    def head_permute(self, x: A, perm: HeadPermutation, group_size: int) -> A:
        """T3 encode on rows × heads × d_h."""
        ...

    def head_unpermute(self, y: A, perm: HeadPermutation, group_size: int) -> A:
        """T3 decode on rows × heads × d_h."""
        ...

    def rope(self, x: A, positions: IndexArray) -> A:
        """RoPE (HF rotate_half convention) on rows × heads × d_h at the given absolute positions."""
        ...

    def attention(self, q: A, k: A, v: A, q_positions: IndexArray, k_positions: IndexArray | None) -> A:
        """Causal GQA attention: query at position p sees keys at positions ≤ p. ``k_positions`` None
        means 'attend to every key' (a locked or reordered cache; T4). Returns rows × H × d_h."""
        ...

    def scores(self, q: A, k: A) -> A:
        """Scaled scores q kᵀ/√d_h per head with GQA: (H, rows_q, rows_k)."""
        ...

    def softmax_values(self, scores: A, v: A) -> A:
        """softmax(scores)·v per head, scores (H, rows_q, rows_k) → rows_q × H × d_h."""
        ...

    def add(self, x: A, y: A) -> A: ...

    def sub(self, x: A, y: A) -> A: ...

    def take_last(self, x: A, index: IndexArray) -> A:
        """x[..., index]: a gather along the last axis (unpermuting score columns)."""
        ...

    def argmax_last(self, logits: A) -> int:
        """Argmax of the last row of logits."""
        ...

    def check(self, x: Any, name: str, shape: tuple[int, ...]) -> A:
        """Validate an incoming array — floating dtype (else DTypeError), exactly ``shape`` (else
        ShapeError), finite (else NonFiniteError) — and return it in the backend's dtype."""
        ...


def split_qkv(b: Backend[A], z: A) -> tuple[A, A, A]:
    """Split fused projections z = [Q K V] (rows × (H + 2·H_kv)·d_h) into rows × heads × d_h arrays."""
    c = b.config
    rows = b.nrows(z)
    q = b.reshape(b.narrow(z, 1, 0, c.q_dim), (rows, c.n_heads, c.head_dim))
    k = b.reshape(b.narrow(z, 1, c.q_dim, c.q_dim + c.kv_dim), (rows, c.n_kv_heads, c.head_dim))
    v = b.reshape(
        b.narrow(z, 1, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim), (rows, c.n_kv_heads, c.head_dim)
    )
    return q, k, v

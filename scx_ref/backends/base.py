"""The interfaces the SCX code is written against: :class:`ArrayOps` (array operations, no weights) and
:class:`Backend` (those operations plus one model's weights).

* :class:`ArrayOps` is what the transforms T1–T6 of :mod:`scx_ref.transforms` need: gathers of rows and
  of the last axis, concatenation, slicing, reshapes, elementwise add/sub, a product with a matrix in the
  implementation's own layout, validation of incoming arrays and conversion to and from numpy. Because
  the transforms are written once over this interface, the function the proofs and properties check is
  the function the protocol runs, on numpy and on torch.
* :class:`Backend` adds the weight stages named by layer — the projections (``wqkv``, ``wo``), the
  norms, the MLP/MoE, the LM head, the client's blinding corrections ηW — and RoPE and attention.

The numpy reference (:class:`~scx_ref.backends.numpy_backend.NumpyBackend`) and the torch backend are
interchangeable. Arrays cross the interface as the implementation's native type ``A``; keys
(permutations, index arrays) are numpy int64 arrays; ``to_numpy`` / ``from_numpy`` convert at message
boundaries.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..arrays import A, ArrayOps, IndexArray, check_rows
from ..config import ModelConfig
from ..errors import ConfigError, ShapeError

__all__ = [
    "BACKEND_METHODS",
    "TORCH_DTYPES",
    "UNIT_ROUNDOFF",
    "A",
    "ArrayOps",
    "Backend",
    "Check",
    "IndexArray",
    "NormName",
    "Products",
    "WeightName",
    "check_experts",
    "check_heads",
    "check_rope_split",
    "check_rows",
    "check_scores",
    "float_dtype_name",
    "is_backend",
    "out_width",
    "split_qkv",
]

#: The per-layer linear maps the protocol applies (and a client may blind with T5, so needs ηW for).
WeightName = Literal["wqkv", "wo", "w_gate_up", "w_down", "router", "lm_head"]
#: The RMSNorm gains of a model.
NormName = Literal["attn", "mlp", "final"]
#: A Freivalds check's vectors and verdict terms: (r, W r, (bias·r, a, b, tiny)) — see ``freivalds_excess``.
Check = tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], float],
]
#: One side of a Freivalds check already projected: (rows·right, an upper bound of each row's norm), float64.
Products = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


class Backend(ArrayOps[A], Protocol[A]):
    """:class:`ArrayOps` plus one model's weights, RoPE and attention, in one dtype on one device."""

    config: ModelConfig
    name: str

    # -- client-side weight ops ----------------------------------------------------------------
    def embed(self, ids: IndexArray) -> A:
        """Rows of the embedding table (validates ids against the vocabulary)."""
        ...

    def norm(self, x: A, which: NormName, layer: int = -1, *, name: str | None = None) -> A:
        """RMSNorm with the named gain (``layer`` ignored for ``final``). With ``name``: NonFiniteError
        (naming it) when an entry of ``x`` is not finite, tested in the norm's own pass where the
        implementation can — the check of an incoming array that a norm reads first."""
        ...

    def correction(self, eta: A, which: WeightName, layer: int = -1, experts: IndexArray | None = None) -> A:
        """ηW for the named weight (no bias): the exact T5 correction
        (:func:`scx_ref.transforms.blinding_correction` on that matrix). For ``w_gate_up``/``w_down`` of an
        MoE layer, ``experts`` selects the experts whose maps are stacked (same order as ``project``)."""
        ...

    def weight_sketch(
        self, which: WeightName, layer: int, expert: int | None, basis: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """For the named matrix W (in × out; ``expert`` selects one expert's map of an MoE layer) and a
        host ``basis`` (out × m): ``(W·basis, Σ_i W_ij²)`` in float64 on the host — ``in × m`` and
        ``(out,)`` — computed in float64 from the stored weights (the client's Freivalds precomputation,
        :mod:`scx_ref.protocol.verify`). Reads W once, in slices (no full float64 copy)."""
        ...

    def widened(self) -> Backend[A]:
        """The same weights in float64 on the same device (this backend itself when it is float64): where
        blinded stages run when β is above the float32 limit (``SCXConfig.blind_dtype``, DESIGN §6). Built
        once, on first use; it holds a float64 copy of the weights."""
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

    def project64_norm(
        self, x: A, which: NormName, layer: int, right: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """:meth:`project64` of ``norm(x, which, layer)``: ``(x̂·right, ‖x̂_i‖)``. Where the backend fuses
        it, x̂ is not formed: x̂_i·r = s_i·Σ_t x_it·(γ_t r_t), s_i = (mean_t x_it² + ε)^-½, all in float64 — a
        more exact x̂ than the backend's own norm (the verifier's tolerance allows the server's norm to
        differ from the client's by its roundings) — except when a row's sum of squares reaches half the
        dtype's largest value, where the backend's own norm may overflow to a row of zeros (as Hugging
        Face's does): then the products are those of the backend's own norm, what an honest server sends."""
        ...

    def project64_gate_up(
        self, gate_up: A, right_gate_up: npt.NDArray[np.float64], right_down: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
        """The two checks' products on an MLP's [gate up] rows (rows × 2f): ``project64(gate_up,
        right_gate_up) + project64(swiglu_act(gate_up), right_down)`` — the gate/up reply against its
        check vectors, and m = silu(gate) ⊙ up (in the backend's dtype; a fused pass may compute silu its own
        way, within a few roundings of the dtype) against the down projection's W r. One pass over the rows
        where fused, without storing m."""
        ...

    def freivalds_excess(
        self,
        y: A | Products,
        right_y: npt.NDArray[np.float64],
        x: A | Products,
        right_x: npt.NDArray[np.float64],
        terms: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], float],
        norm: NormName | None = None,
        norm_layer: int = -1,
    ) -> float | None:
        """A whole Freivalds check in one fused call, or ``None`` where the backend does not fuse it: the
        verdict ``linear_excess(y·right_y, x̂·right_x, bias_r, ‖x̂_i‖, ‖y_i‖, a, b, tiny)`` for ``terms`` =
        (bias_r, a, b, tiny), each side by :meth:`project64` (x̂ = x) or :meth:`project64_norm` (x̂ =
        ``norm(x)``) — or given as its :data:`Products`. Equal to that composition
        (:mod:`scx_ref.protocol.verify` composes it where this returns ``None``)."""
        ...

    def gate_up_excess(
        self, gate_up: A, y: A, x: A, layer: int, up: Check, down: Check
    ) -> tuple[float, float] | None:
        """A dense MLP reply's two Freivalds verdicts in one fused call, or ``None`` where the backend does
        not fuse it: with ``(gr, gn, mr, mn) = project64_gate_up(gate_up, up r, down W r)``, the gate/up
        check ``freivalds_excess((gr, gn), …, x, …, norm="mlp")`` and the down check
        ``freivalds_excess(y, …, (mr, mn), …)``, in that order. Equal to those three calls
        (:mod:`scx_ref.protocol.verify` makes them where this returns ``None``)."""
        ...

    # -- position and attention ----------------------------------------------------------------
    def rope(self, x: A, positions: IndexArray) -> A:
        """RoPE (HF rotate_half convention) on rows × heads × d_h at the given absolute positions: integers
        in [0, ``config.max_positions``) (ShapeError otherwise, on every backend: the model's positions, where
        its config holds the angles finite and the torch backend's cached tables end)."""
        ...

    def rope_take(
        self,
        x: A,
        rows: IndexArray,
        positions: IndexArray,
        rope_index: IndexArray,
        plain_index: IndexArray,
        *,
        name: str | None = None,
    ) -> tuple[A, A]:
        """Rows ``x[rows]`` (2-D) split at w = len(``rope_index``) columns: the first w as heads of d_h,
        RoPE'd at ``positions`` (one per row) and gathered along their flat columns by ``rope_index``; the
        rest gathered by ``plain_index``. Both as rows × heads × d_h, in new arrays. The same values as
        ``rope(take_rows(x, rows)[:, :w] as heads, positions)[flat][:, rope_index]`` — one pass where the
        backend can fuse it. The caller checks the indices (:func:`scx_ref.transforms.decode_qkv_heads`);
        ShapeError when w or the plain columns are not whole heads, or w is wider than the rows (the torch
        backend's fused pass, which reads without bounds checks, also refuses an index outside x). With
        ``name``: NonFiniteError (naming it) when an entry of the rows read is not finite."""
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


#: Every method of a :class:`Backend` (its own and :class:`ArrayOps`'s), read from the two protocols.
BACKEND_METHODS: frozenset[str] = frozenset(
    name
    for protocol in (Backend, ArrayOps)
    for name, member in vars(protocol).items()
    if callable(member) and not name.startswith("_")
)


def is_backend(obj: object) -> bool:
    """True when ``obj`` has a :class:`~scx_ref.config.ModelConfig` ``config`` and every method in
    :data:`BACKEND_METHODS`: what a component that keeps a backend (a runner, a server, a client, a sketch
    cache) checks at construction, so that a model's weights or another object with a ``config`` is refused
    there, not with a TypeError or AttributeError at its first use."""
    return isinstance(getattr(obj, "config", None), ModelConfig) and all(
        callable(getattr(obj, name, None)) for name in BACKEND_METHODS
    )


def out_width(c: ModelConfig, which: WeightName) -> int:
    """The output width of the named weight matrix W (in × out; one expert's map of an MoE layer): the
    width of a linear stage's reply per row."""
    return {
        "wqkv": c.q_dim + 2 * c.kv_dim,
        "wo": c.hidden_size,
        "w_gate_up": 2 * c.intermediate_size,
        "w_down": c.hidden_size,
        "router": c.n_experts,
        "lm_head": c.vocab_size,
    }[which]


#: The fused ``freivalds_excess`` kernel's verdict (and ``gate_up_excess``'s first) where a normalized row
#: comes near the dtype's range (``numba_kernels.project64_rms``): the backend then composes the check from
#: its own norm (a verdict is otherwise ≥ 0 or NaN, and −1 where the arrays do not fit).
NEAR_RANGE = -2.0


# not mutated (pragma): numba_kernels compiles this function, and numba cannot compile mutmut's trampoline
def sum_norm_slack(width: int, eps: float) -> float:  # pragma: no mutate block
    """The factor that makes √(Σ_t x_t²), summed in a dtype of machine epsilon ``eps`` (2⁻⁵² float64, 2⁻²³
    float32) over ``width`` squares, an upper bound of the row norm: 1 + (width + 2)·eps. With u = eps/2,
    the sum of ``width`` non-negative rounded squares is within width·u of the true sum (relative, first
    order), its square root halves that and adds one rounding: (width/2 + 1)·u; the factor is four times
    that. Every ``project64`` path rounds its norms up by it (numba's ``sum_norms``, the torch fallbacks);
    a float32 overflow stays +inf."""
    return 1.0 + (width + 2) * eps


#: The dtypes the torch backend computes in, by name (``scx serve``, ``bench`` and ``bench-serve`` take
#: them; :func:`~.torch_backend.parse_dtype` reads them and its aliases). Here, not in the torch backend, so
#: that the commands list them without importing torch.
TORCH_DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
#: The unit roundoff u of each floating dtype a backend computes in, by name (the reply checks' tolerances,
#: the precision limits of blinding).
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


def float_dtype_name(dtype: Any) -> str | None:
    """The name in :data:`UNIT_ROUNDOFF` of a numpy or torch floating dtype (or of such a name itself),
    None for anything else (None included: ``np.dtype(None)`` would read float64)."""
    if dtype is None:
        return None
    name = str(dtype)
    if name in UNIT_ROUNDOFF:  # a numpy dtype, or its name
        return name
    if name.startswith("torch."):
        name = name[len("torch.") :]
    else:
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            return None
    return name if name in UNIT_ROUNDOFF else None


def check_experts(experts: Any, n_experts: int, which: str) -> npt.NDArray[np.int64]:
    """The experts whose maps an MoE layer's ``which`` stacks, as int64 ids (flattened): ConfigError for
    none given, ids that are not integers (a float one was truncated on torch), no id at all, or an id
    outside 0 … n_experts − 1 — the same refusals on every backend (numpy raised IndexError or TypeError,
    or read a negative id from the end)."""
    if experts is None:
        raise ConfigError(f"{which} of an MoE layer needs the selected experts")
    e = np.asarray(experts)
    if e.size == 0 or e.dtype.kind not in "iu":
        raise ConfigError(f"{which} needs at least one integer expert id, got {e.dtype} of shape {e.shape}")
    e = e.astype(np.int64, copy=False).reshape(-1)
    if e.min() < 0 or e.max() >= n_experts:
        raise ConfigError(f"expert ids must lie in [0, {n_experts}), got {e.tolist()}")
    return e


def check_rope_split(shape: tuple[int, ...], roped: int, plain: int, d_h: int) -> None:
    """The column split ``Backend.rope_take`` reads from rows of ``shape``: ShapeError unless the rows are
    2-D, the ``roped`` and ``plain`` columns are whole heads of ``d_h`` and the RoPE'd ones lie within a
    row (a fused pass reads them without bounds checks)."""
    if len(shape) != 2 or roped % d_h or plain % d_h or roped > shape[1]:
        raise ShapeError(
            f"{roped} RoPE'd and {plain} plain columns of rows {shape}: whole heads of {d_h}, the RoPE'd "
            "ones within the row"
        )


def check_heads(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...] | None = None) -> None:
    """The shapes :meth:`Backend.attention` and :meth:`Backend.scores` read (``v`` where given): ShapeError
    unless q, k (and v) are rows × heads × d_h with q's heads a multiple of k's (≥ 1), q and k of one head
    width (≥ 1), and v of k's rows and heads — the same refusals on every backend (torch raised its own
    errors, or none, further in; heads of width 0 gave NaN scores, scaled by 1/√0)."""
    shapes = (q, k) if v is None else (q, k, v)
    if any(len(s) != 3 for s in shapes):
        raise ShapeError(
            "attention needs 3-D q, k, v (rows × heads × head_dim), got " + ", ".join(str(s) for s in shapes)
        )
    if k[1] == 0 or q[2] == 0 or q[1] % k[1] or k[2] != q[2] or (v is not None and v[:2] != k[:2]):
        raise ShapeError(f"incompatible attention shapes q {q}, k {k}" + ("" if v is None else f", v {v}"))


def check_scores(scores: tuple[int, ...], v: tuple[int, ...]) -> None:
    """The shapes :meth:`Backend.softmax_values` reads: ShapeError unless ``scores`` is heads × queries ×
    keys and ``v`` keys × KV heads × d_h, with the heads a multiple of the KV heads (≥ 1)."""
    if len(scores) != 3 or len(v) != 3 or v[1] == 0 or scores[0] % v[1] or scores[2] != v[0]:
        raise ShapeError(
            f"scores {scores} against values {v}: heads × queries × keys and keys × KV heads × d_h"
        )


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

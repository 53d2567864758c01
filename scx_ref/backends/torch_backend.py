"""The torch backend: the SCX production path (CPU or CUDA; float64, float32, bfloat16, float16).

:class:`TorchBackend` implements the :class:`~scx_ref.backends.base.Backend` protocol with the same
semantics as :class:`~scx_ref.backends.numpy_backend.NumpyBackend` (property-tested against it in
``properties/test_torch_parity.py``: float64 agrees to rtol 1e-12). Design:

* weights are converted **once**, at construction, to the compute dtype on the device, and stored in
  the ``out × in`` layout of ``torch.nn.functional.linear`` (no transpose at call time): the fused
  ``[W_q W_k W_v]`` (and Qwen2 bias), ``W_o``, the fused dense ``[W_gate W_up]``, ``W_down``; MoE experts
  as stacked ``E × 2f × d`` / ``E × d × f`` tensors. Every projection is :func:`dense`: one GEMM, or on
  the CPU one per block of output columns when the output is wide (and, but on AMD CPUs, the input too);
* row permutations and the head-structured feature permutation are gathers (``index_select``);
* attention is ``scaled_dot_product_attention`` with ``enable_gqa`` (no K/V head expansion), with
  ``is_causal`` when query and key positions coincide and an explicit boolean mask otherwise; rows
  with no visible key fall back to the reference's safe softmax (zeros, as the numpy reference);
* RoPE cos/sin tables are computed once in float64 (the reference's formula) and cached per position
  (grown under a lock, so concurrent sessions may share a backend);
* norms, softmaxes and MoE routing run in float32 for bfloat16/float16 (as Hugging Face does; a norm's
  gain multiplies the normalized row rounded to the dtype, as LlamaRMSNorm's).

Batching is **by session**: a batch of requests is several SCX sessions, each with its own keys, so
every op here works on one session's rows (dim 0 is the row/token axis the permutations act on).
Row-wise ops (``norm``, ``project``, ``correction``, ``swiglu_act``, dense ``mlp``, ``add``, ``sub``)
accept extra leading dims; the row-gathers, RoPE and attention take exactly one session.

:class:`TorchOps` is the weight-free part (the :class:`~scx_ref.arrays.ArrayOps` the transforms run on);
:class:`TorchBackend` adds a model's weights. A backend for a loaded Hugging Face model is built by
:func:`scx_ref.hf.backend_from_hf`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .. import ops
from .._checks import token_ids
from ..arrays import (
    broadcast_shape,
    check_concat,
    check_narrow,
    gather_sum_index,
    permutation_of_rows,
    permute_rows_in_place,
    row_index,
)
from ..config import ModelConfig
from ..errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from ..machine import cpuinfo
from ..transforms import blinding_correction
from ..weights import DenseMLP, ModelWeights
from . import host_memory
from .base import (
    NEAR_RANGE,
    TORCH_DTYPES,
    Check,
    IndexArray,
    NormName,
    Products,
    WeightName,
    check_experts,
    check_heads,
    check_rope_split,
    check_rows,
    check_scores,
    sum_norm_slack,
)
from .built_once import BuiltOnce
from .cpu_kernels import Kernels, column_index, kernels

__all__ = [
    "GEMM_BLOCK",
    "GEMM_BLOCK_MAX_ROWS",
    "GEMM_BLOCK_MIN_IN",
    "GEMM_BLOCK_ROWS",
    "GEMM_PAD_MIN_ROWS",
    "GEMM_PAD_MIN_WEIGHTS",
    "TorchBackend",
    "TorchLayer",
    "TorchOps",
    "TorchWeights",
    "as_index",
    "dense",
    "parse_dtype",
]

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in TORCH_DTYPES}
_LOW = (torch.bfloat16, torch.float16)
#: Output columns per GEMM of :func:`dense` on the CPU when an output is wide.
GEMM_BLOCK = 1024
#: The fewest rows for which :func:`dense` splits a wide product into column blocks.
GEMM_BLOCK_ROWS = 16
#: The first row count for which :func:`dense` is one GEMM again: from about this many rows one F.linear
#: is as fast or faster (``models/results/dense_blocks.txt``: SmolLM2's LM head on 2 050 rows 762 ms as
#: one F.linear against 792 ms in blocks on 2 threads, 1 475 against 1 612 ms on one; a 2048-wide model's
#: gate/up 1 032 against 1 129 ms on one thread, within the runs' spread on two).
GEMM_BLOCK_MAX_ROWS = 768


#: The narrowest input (``in``, ``w.shape[1]``) for which :func:`dense` splits a wide CPU product into
#: column blocks: every width (0) on AMD CPUs with torch's MKL BLAS, 1024 elsewhere. MKL picks its kernels by
#: CPU vendor, and the two kinds of machine measured disagree on narrow inputs
#: (``models/results/dense_blocks.txt``): on an AMD EPYC the blocks were 5–20 % faster for SmolLM2's
#: (in = 576) and a 1B-wide LLaMA's (in = 2048) LM heads and gate/up maps; on an Intel Xeon (AVX-512) they
#: were 5–10 % slower for SmolLM2's (one F.linear: the server's prefill 9.8 ms less at n = 128 on two
#: threads, 23.6 ms less at n = 512, paired), and within ±5 % of one F.linear from in = 1024 (1 024, 2 048
#: and 4 096 measured; ``llama1b-random``'s prefill at n = 512 was 16 ms faster in blocks). Tests set it.
GEMM_BLOCK_MIN_IN = (
    0 if cpuinfo("vendor_id") == "AuthenticAMD" and bool(torch.backends.mkl.is_available()) else 1024  # type: ignore[no-untyped-call]
)


#: The fewest rows that :func:`dense` pads with zero rows to :data:`GEMM_BLOCK_ROWS` for a large weight
#: (:data:`GEMM_PAD_MIN_WEIGHTS`) on the CPU. torch's CPU GEMM (MKL) picks its kernel by the row count, and
#: from 8 to 15 rows it is slower than at 16 for large weights. On an Intel Xeon (AVX-512,
#: ``models/results/dense_pad.txt``; unpadded over padded) llama1b-random's fused gate/up, down and LM
#: head (11.5–65.5 M weights) took 1.15–2.30× as long unpadded at 8–15 rows (one and two threads), its
#: W_qkv and W_o (5.2, 4.2 M) 1.09–1.91× on one thread and 0.88–1.48× on two (padding them loses at 8–9
#: rows there), and SmolLM2's LM head (28 M) 1.16–2.26×; at 4–7 rows padding was slower (an ad hoc sweep
#: of stop 48: 1.08–1.66× the time).
#: A prompt of n tokens is n + r1 rows at the server, so this is a prompt of 6–13 tokens with the default
#: r1 = 2. ``python -m models.gemm_forms --forms unpadded --rows 8,10,15`` re-measures it on another machine.
GEMM_PAD_MIN_ROWS = 8
#: The fewest weights (out × in) of a product that :func:`dense` pads to :data:`GEMM_BLOCK_ROWS` rows: a
#: 2048 × 2048 W_o (4.19 M) is padded, SmolLM2's fused gate/up map (3072 × 576, 1.77 M) is not.
GEMM_PAD_MIN_WEIGHTS = 4_000_000


def dense(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, pooled: bool = False
) -> torch.Tensor:
    """``x·Wᵀ + b`` for ``w`` stored out × in (``F.linear``'s semantics and layout): every projection of the
    torch backend. Each row of the result is that row of ``x`` times ``Wᵀ`` (plus ``b``), whatever the other
    rows are; so on the CPU a 2-D ``x`` of :data:`GEMM_PAD_MIN_ROWS` to :data:`GEMM_BLOCK_ROWS` − 1 rows times
    a ``w`` of at least :data:`GEMM_PAD_MIN_WEIGHTS` weights is computed as the product of ``x`` padded with
    zero rows to :data:`GEMM_BLOCK_ROWS` rows, of which the first rows are returned (a faster GEMM kernel; the
    padding rows' products are discarded). On the CPU, a 2-D ``x`` of :data:`GEMM_BLOCK_ROWS` to
    :data:`GEMM_BLOCK_MAX_ROWS` − 1 rows (padded or not) times a ``w`` of at least 2·:data:`GEMM_BLOCK`
    outputs and :data:`GEMM_BLOCK_MIN_IN` inputs is one GEMM per block of :data:`GEMM_BLOCK` output columns,
    written into one result: each entry is the same length-``in`` dot product, while a block's weights and
    outputs stay in the cache across the rows. Measured (``models/results/dense_blocks.txt``) 5–20 % faster
    than one ``F.linear`` for the LM heads and fused gate/up maps of SmolLM2 and a 1B-wide LLaMA at 130–514
    rows on an AMD EPYC, and slower from about 768 rows; on an Intel Xeon slower for SmolLM2's narrow inputs
    (hence :data:`GEMM_BLOCK_MIN_IN`). Narrower products, fewer or more rows (a generation step, a long
    prompt), other devices and products that need gradients are one ``F.linear``.

    ``pooled`` (the LM head's product: the largest, made once a request, at its end): a product of
    :data:`.host_memory.LARGE_BYTES` or more is written into the pool's memory (:mod:`.host_memory`), the
    same GEMM given its output. Not the blocks' intermediates: a pooled buffer stays resident between its
    uses, and one idle while a request peaks adds to that peak (:data:`.host_memory.POOL_BYTES`; with every
    product of 32 MiB or more pooled, `llama1b-random`'s gate/up product too, a 2048-token prefill's peak
    rose by 209 MiB, by 195 MiB with the LM head's alone; the blocks' products were not timed pooled)."""
    if _padded(x, w, bias):
        rows = x.new_zeros((GEMM_BLOCK_ROWS, x.shape[1]))
        rows[: x.shape[0]] = x
        return _dense(rows, w, bias, pooled=pooled)[: x.shape[0]]
    return _dense(x, w, bias, pooled=pooled)


def _padded(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`dense` computes ``x·Wᵀ (+ b)`` on ``x`` padded with zero rows to
    :data:`GEMM_BLOCK_ROWS` rows: a :func:`_cpu_product` of :data:`GEMM_PAD_MIN_ROWS` to
    :data:`GEMM_BLOCK_ROWS` − 1 rows and a ``w`` of at least :data:`GEMM_PAD_MIN_WEIGHTS` weights."""
    return (
        _cpu_product(x, w, bias)
        and GEMM_PAD_MIN_ROWS <= x.shape[0] < GEMM_BLOCK_ROWS
        and w.shape[0] * w.shape[1] >= GEMM_PAD_MIN_WEIGHTS
    )


def _cpu_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``x·Wᵀ (+ b)`` is a 2-D product on the CPU in one dtype without autograd: the products that
    :func:`dense` may pad, split into column blocks or write into pooled memory (``out=`` writes take no
    autograd: a product that needs gradients is one ``F.linear``)."""
    return (
        x.ndim == 2
        and w.ndim == 2
        and x.shape[1] == w.shape[1]
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.dtype == w.dtype
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)))
    )


def _floating_rows(x: torch.Tensor, what: str) -> None:
    """DTypeError unless ``x`` holds floating-point numbers (integer rows raised torch's own RuntimeError
    or NotImplementedError further in; NumpyBackend refuses them the same way)."""
    if not x.is_floating_point():
        raise DTypeError(f"{what} must be a floating-point array, got dtype {x.dtype}")


def _dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *, pooled: bool) -> torch.Tensor:
    """:func:`dense` on ``x``'s rows as given: one ``F.linear``, or one GEMM per column block."""
    out_dim = w.shape[0]
    if (
        not _cpu_product(x, w, bias)
        or out_dim < 2 * GEMM_BLOCK
        or not GEMM_BLOCK_ROWS <= x.shape[0] < GEMM_BLOCK_MAX_ROWS
        or w.shape[1] < GEMM_BLOCK_MIN_IN
    ):
        if pooled and _large_product(x, w, bias):  # one product into pooled memory (host_memory)
            out = host_memory.empty((x.shape[0], out_dim), x.dtype)
            if bias is None:
                return torch.matmul(x, w.t(), out=out)
            return torch.addmm(bias, x, w.t(), out=out)
        return F.linear(x, w, bias)
    shape = (x.shape[0], out_dim)
    out = host_memory.empty(shape, x.dtype) if pooled else torch.empty(shape, dtype=x.dtype, device=x.device)
    for lo in range(0, out_dim, GEMM_BLOCK):
        hi = min(lo + GEMM_BLOCK, out_dim)
        if bias is None:
            torch.matmul(x, w[lo:hi].t(), out=out[:, lo:hi])
        else:
            torch.addmm(bias[lo:hi], x, w[lo:hi].t(), out=out[:, lo:hi])
    return out


def _large_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`dense` writes a ``pooled`` product ``x·Wᵀ (+ b)`` into :func:`.host_memory.empty`'s
    memory: a :func:`_cpu_product` of at least :data:`.host_memory.LARGE_BYTES`, its bias (if any) in the
    same dtype on the CPU — SmolLM2's LM head from about 171 rows."""
    return (
        _cpu_product(x, w, bias)
        and x.shape[0] * w.shape[0] * x.dtype.itemsize >= host_memory.LARGE_BYTES
        and (bias is None or (bias.dtype == x.dtype and bias.device.type == "cpu"))
    )


def parse_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``device`` (``"cpu"``, ``"cuda:1"``, a ``torch.device``), ConfigError when
    torch does not read it as a device, it is a CUDA device this machine lacks, a device type this torch
    cannot allocate on (``mps``, ``xla`` where torch is not built for them) — torch would raise its own
    RuntimeError or AssertionError at the first tensor moved there — or ``meta`` (no data to compute on)."""
    if not isinstance(device, str | torch.device) or isinstance(device, bool):
        raise ConfigError(f"device must be a string or a torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unsupported device {device!r}: {exc}") from exc
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"device {device!r} asked for, but torch sees no such CUDA device here")
    if dev.type == "meta":
        raise ConfigError(f"device {device!r} holds no data: a backend computes on cpu or cuda")
    if dev.type not in ("cpu", "cuda"):  # a type this torch may not be built for (mps, xla, …)
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError) as exc:
            first = str(exc).split(". ")[0]  # then torch lists every dispatch key it has
            raise ConfigError(f"unsupported device {device!r}: {first}") from exc
    return dev


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
    name = alias.get(dtype, dtype) if isinstance(dtype, str) else dtype  # a list raised TypeError here
    if not isinstance(name, str) or name not in _DTYPES:
        raise DTypeError(f"unsupported backend dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class TorchLayer:
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
class TorchWeights:
    """A model's weights as tensors in the F.linear layout (what :class:`TorchBackend` computes with)."""

    embed: torch.Tensor  # V × d
    layers: list[TorchLayer]
    final_norm: torch.Tensor  # d
    lm_head: torch.Tensor  # V × d


class _WideLayers:
    """The blocks of :class:`_WideWeights`: block i converted to float64 when first read, then kept."""

    def __init__(self, owner: _WideWeights) -> None:
        self._owner = owner

    def __len__(self) -> int:
        return len(self._owner.src.layers)

    def __getitem__(self, i: int) -> TorchLayer:
        return self._owner.layer(i)


class _WideWeights:
    """A float64 twin of a narrower backend's weights whose tensors are converted on first use and kept
    (:meth:`TorchBackend.widened`). The blinded stages of a wide session (``SCXConfig.blind_dtype``) read
    the weights of the blocks they blind only — level ``paper``'s guard blocks — so a float64 copy of the
    whole model (twice a float32 model's memory, on the client and again on the server) is made only where
    a configuration blinds every block. The values are those of an eager copy: each tensor is the same
    ``_t`` conversion of the same source tensor."""

    def __init__(self, src: TorchWeights, dtype: torch.dtype, device: torch.device) -> None:
        self.src, self._dtype, self._device = src, dtype, device
        self._held: BuiltOnce[int | str, Any] = BuiltOnce()  # block index or top-level name -> float64 form
        self.layers = _WideLayers(self)

    def _c(self, x: torch.Tensor | None) -> Any:
        return None if x is None else _t(x, self._dtype, self._device)

    def layer(self, i: int) -> TorchLayer:
        """Block ``i`` in float64 (converted on its first read)."""
        src = vars(self.src.layers[i])
        layer: TorchLayer = self._held.get(
            int(i), lambda: TorchLayer(**{k: self._c(v) for k, v in src.items()})
        )
        return layer

    def _tensor(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self._held.get(name, lambda: self._c(getattr(self.src, name)))
        return tensor

    @property
    def embed(self) -> torch.Tensor:
        """The embedding table in float64 (converted on its first read)."""
        return self._tensor("embed")

    @property
    def final_norm(self) -> torch.Tensor:
        """The final norm's gain in float64 (converted on its first read)."""
        return self._tensor("final_norm")

    @property
    def lm_head(self) -> torch.Tensor:
        """The LM head in float64 (converted on its first read)."""
        return self._tensor("lm_head")

    def converted(self) -> int:
        """How many tensors are held in float64 so far (blocks count their tensors)."""
        return sum(
            sum(v is not None for v in vars(x).values()) if isinstance(x, TorchLayer) else 1
            for _, x in self._held.items()
        )

    def converted_blocks(self) -> list[int]:
        """The blocks held in float64 so far, in order."""
        return sorted(k for k, _ in self._held.items() if isinstance(k, int))


def as_index(index: npt.NDArray[np.int64], device: torch.device) -> torch.Tensor:
    """An int64 index tensor on ``device`` (no copy on CPU unless ``index`` is read-only)."""
    arr = np.ascontiguousarray(index, dtype=np.int64)
    if not arr.flags.writeable:  # memoised keys are read-only; torch cannot share them
        arr = arr.copy()
    t = torch.from_numpy(arr)
    return t if device.type == "cpu" else t.to(device)


def _index(index: Any, what: str = "an index") -> npt.NDArray[np.int64]:
    """``index`` as a C-contiguous int64 array for a fused kernel: ShapeError unless it is 1-D and of an
    integer dtype (or empty), and unless an unsigned one's entries fit int64 (the cast wrapped 2⁶³ to a
    negative index, which ``gather_sum`` reads as a decoy row). A float index was truncated and a 2-D one
    failed inside numba's compiler; the kernels check the range themselves."""
    arr = np.asarray(index)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ShapeError(f"{what} must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
        raise ShapeError(f"{what} holds an index past int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _t(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of ``x`` (numpy or torch) in dtype on device (no copy when already so). A numpy
    array is read as :func:`_torch_readable` gives it: weights of another byte order or wider than float64
    (which NumpyBackend takes) raised torch's ValueError or TypeError here."""
    t = torch.from_numpy(_torch_readable(x)) if isinstance(x, np.ndarray) else x
    return t.detach().to(device=device, dtype=dtype).contiguous()


#: The numpy dtypes torch.from_numpy takes for a floating array (in the machine's own byte order).
_TORCH_FLOATS = (np.float16, np.float32, np.float64)


def _torch_readable(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``arr`` C-contiguous in a form ``torch.from_numpy`` takes: a floating array of another byte order
    than the machine's in its own (the same values), one wider than float64 (``np.longdouble``) in
    float64, every other array as it is. torch raised ValueError for the first and TypeError for the
    second, where the numpy backend takes both. A read-only array is copied: a tensor is always writable,
    and the backend's in-place ops (``add_into``, a reply decoded in its own memory) wrote through the
    alias into memory its owner had marked read-only (a transport's received buffer, a caller's array)."""
    dt = arr.dtype
    if dt.kind == "f" and (not dt.isnative or dt.type not in _TORCH_FLOATS):
        own = dt.newbyteorder("=") if dt.type in _TORCH_FLOATS else np.dtype(np.float64)
        return np.ascontiguousarray(arr, dtype=own)
    if not arr.flags.writeable:
        return np.array(arr, order="C")
    return np.ascontiguousarray(arr)


def _check_tensors(c: ModelConfig, w: TorchWeights) -> None:
    """That ``w`` holds the F.linear-layout tensors of a model of config ``c`` (see
    :meth:`TorchBackend.from_tensors`)."""
    if not isinstance(c, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, got {type(c).__name__}")
    if not isinstance(w, TorchWeights) or not isinstance(w.layers, list):
        raise ConfigError(f"tensors must be TorchWeights, got {type(w).__name__}")
    if len(w.layers) != c.n_layers or not all(isinstance(lw, TorchLayer) for lw in w.layers):
        raise ConfigError(f"config has {c.n_layers} layers, the tensors {len(w.layers)} TorchLayer entries")
    d, f, e = c.hidden_size, c.intermediate_size, c.n_experts

    def need(t: Any, shape: tuple[int, ...] | None, name: str) -> None:
        if shape is None:
            if t is not None:
                raise ConfigError(f"tensor {name} given, but a model of this config has none")
            return
        if not isinstance(t, torch.Tensor | np.ndarray):
            raise ConfigError(f"tensor {name} must be a torch tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ShapeError(f"tensor {name} must have shape {shape}, got {tuple(t.shape)}")
        floating = t.is_floating_point() if isinstance(t, torch.Tensor) else t.dtype.kind == "f"
        if not floating:
            raise DTypeError(f"tensor {name} must be floating-point, got {t.dtype}")

    need(w.embed, (c.vocab_size, d), "embed")
    need(w.final_norm, (d,), "final_norm")
    need(w.lm_head, (c.vocab_size, d), "lm_head")
    qkv = c.q_dim + 2 * c.kv_dim
    for i, lw in enumerate(w.layers):
        p = f"layers.{i}."
        need(lw.attn_norm, (d,), p + "attn_norm")
        need(lw.mlp_norm, (d,), p + "mlp_norm")
        need(lw.wqkv, (qkv, d), p + "wqkv")
        need(lw.bqkv, (qkv,) if c.qkv_bias else None, p + "bqkv")
        need(lw.wo, (d, c.q_dim), p + "wo")
        need(lw.gate_up, None if c.is_moe else (2 * f, d), p + "gate_up")
        need(lw.down, None if c.is_moe else (d, f), p + "down")
        need(lw.router, (e, d) if c.is_moe else None, p + "router")
        need(lw.experts_gate_up, (e, 2 * f, d) if c.is_moe else None, p + "experts_gate_up")
        need(lw.experts_down, (e, d, f) if c.is_moe else None, p + "experts_down")


def _from_model_weights(w: ModelWeights, dtype: torch.dtype, device: torch.device) -> TorchWeights:
    layers = []
    for lw in w.layers:
        bqkv = lw.bqkv
        layer = TorchLayer(
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
    return TorchWeights(
        _t(w.embed, dtype, device), layers, _t(w.final_norm, dtype, device), _t(w.lm_head.T, dtype, device)
    )


#: Elements up to which project64 multiplies on the host in numpy (a few rows: torch's per-call overhead
#: is then most of the cost).
_SMALL = 1 << 14


_LOCAL = threading.local()


def _scratch64(numel: int, device: torch.device) -> torch.Tensor:
    """A float64 buffer of at least ``numel`` elements on ``device``, this thread's own (reused by every
    call of this thread: project64 converts its slices into it)."""
    buf: torch.Tensor | None = getattr(_LOCAL, "scratch64", None)
    if buf is None or buf.numel() < numel or buf.device != device:
        with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
            buf = torch.empty(numel, dtype=torch.float64, device=device)
        _LOCAL.scratch64 = buf
    return buf


def _outputs64(rows: int, right: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
    """The product (rows × k) and squared-norm (rows) arrays a project64 kernel writes."""
    return np.empty((rows, right.shape[1]), dtype=np.float64), np.empty(rows, dtype=np.float64)


def _transposed(right: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``rightᵀ`` (k × width) C-contiguous in float64: each check vector's entries next to each other."""
    return np.ascontiguousarray(np.transpose(right), dtype=np.float64)


# a Freivalds side given as its products (TorchBackend.freivalds_excess): no rows, no gain, no products
_NO_ROWS = np.empty((0, 0), dtype=np.float64)
_NO_GAIN = np.empty(0, dtype=np.float64)
_NO_PRODUCTS = (np.empty((0, 0), dtype=np.float64), np.empty(0, dtype=np.float64))


def _products(given: Any) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """A Freivalds side given as its products and norms, as the compiled check reads them: float64 (no copy
    when they are), rows × k and rows — ShapeError otherwise. Another dtype or number of dimensions failed
    inside numba's compiler (a TypingError)."""
    try:
        products, norms = given
    except (TypeError, ValueError):
        raise ShapeError("a Freivalds side must be rows or (products, norms)") from None
    pr, nr = np.asarray(products, dtype=np.float64), np.asarray(norms, dtype=np.float64)
    if pr.ndim != 2 or nr.ndim != 1:
        raise ShapeError(f"a Freivalds side's products {pr.shape} and norms {nr.shape}: rows × k and rows")
    return pr, nr


def _terms(*terms: npt.NDArray[Any]) -> bool:
    """Whether a check's terms (bias·r, a, b) are numpy vectors, as the compiled verdict reads them: a
    matrix failed inside numba's compiler (a TypingError)."""
    return all(isinstance(t, np.ndarray) and t.ndim == 1 for t in terms)


def _right(width: int, right: npt.NDArray[Any], k: int | None = None) -> bool:
    """Whether ``right`` is width × k (any k when None): a side's check vectors. The fused kernels index
    without bounds checks, so the shapes they are given are checked before they run (the message of the
    ShapeError built only then: formatting it on every call cost more than the test)."""
    return right.ndim == 2 and right.shape[0] == width and (k is None or right.shape[1] == k)


#: The dtypes the fused CPU kernels (:mod:`.cpu_kernels`) are compiled for.
_FUSED_DTYPES = (torch.float32, torch.float64)
#: Half the largest finite value of each fused dtype: from a float64 sum of squares this large on, the eager
#: RMSNorm's sum in the dtype may overflow (:meth:`TorchBackend._rms`).
_HALF_MAX = {t: float(torch.finfo(t).max) / 2 for t in _FUSED_DTYPES}
#: The fewest entries from which :meth:`TorchBackend.norm` runs as one fused pass (a prompt's rows): below
#: it — a generation step's row — the eager ops. Fused on one row, `llama1b-random`'s generation step was
#: 3.9 ms a token slower on two threads (q1 +1.6, q3 +4.8, paired in one process; the kernel alone is faster
#: there, and the cause was not found).
FUSED_NORM_MIN = 1 << 16


def _np(t: torch.Tensor) -> npt.NDArray[Any]:
    """A C-contiguous numpy view of a CPU tensor (a copy only when the tensor is not contiguous).

    A contiguous tensor without autograd history (every tensor of a request) is viewed as it is: each of
    a request's few hundred calls runs right after the server's products have left the caches cold, where
    the detached alias it used to make first cost several microseconds."""
    if t.requires_grad or not t.is_contiguous():
        return t.detach().contiguous().numpy()
    return t.numpy()


def spare_rows(rows: int) -> int:
    """The rows a cache buffer holds beyond its ``rows`` when it grows: an eighth more, at least 64 (a
    generation step then copies the cache once in every max(64, t/8) steps, not every step; the spare
    memory is at most that)."""
    return max(64, rows // 8)


class _Rows:
    """The buffer behind :meth:`TorchOps.append_rows`' views: ``filled`` rows written so far. A view
    carries its buffer (``_scx_rows``); it may be extended in place only while it shows every filled row."""

    __slots__ = ("buf", "filled", "lock")

    def __init__(self, buf: torch.Tensor, filled: int) -> None:
        self.buf, self.filled, self.lock = buf, filled, threading.Lock()

    def view(self) -> torch.Tensor:
        out = self.buf.narrow(0, 0, self.filled)
        out._scx_rows = self  # type: ignore[attr-defined]
        return out

    @staticmethod
    def append(x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        n, m = int(x.shape[0]), int(new.shape[0])
        store: _Rows | None = getattr(x, "_scx_rows", None)
        if store is not None:
            with store.lock:
                buf = store.buf
                if (
                    store.filled == n
                    and buf.shape[0] >= n + m
                    and x.data_ptr() == buf.data_ptr()
                    and x.is_contiguous()
                ):
                    buf.narrow(0, n, m).copy_(new)
                    store.filled = n + m
                    return store.view()
        buf = torch.empty((n + m + spare_rows(n + m), *x.shape[1:]), dtype=x.dtype, device=x.device)
        buf.narrow(0, 0, n).copy_(x)
        buf.narrow(0, n, m).copy_(new)
        return _Rows(buf, n + m).view()


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, in one reduction pass: a sum is finite only if every term is
    (NaN and ±Inf propagate; +Inf + −Inf is NaN), so a finite sum proves it; a non-finite sum (or an
    overflow of finite terms) falls back to the elementwise test."""
    if t.numel() == 0:
        return True
    if math.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item()):
        return True
    return bool(torch.isfinite(t).all())


def range_excess_where(v: torch.Tensor, o: torch.Tensor, first: int) -> tuple[float, float]:
    """:func:`scx_ref.protocol.verify.range_excess` by torch operations on the tensors' own device (shapes
    checked by the caller): the running max and min of ``v`` over its rows by ``torch.cummax``/``cummin``
    (NaN propagates, as in the host passes), the largest difference of ``o`` above or below them in the
    tensors' dtype, and max |v|; two numbers then move to the host. The same values as the host passes:
    max and min round nothing, and each difference rounds once in the same dtype."""
    n_q = o.shape[0]
    vmax = v.abs().amax() if v.numel() else v.new_zeros(())
    if n_q == 0:
        return -math.inf, float(vmax.item())
    hi = torch.cummax(v, 0).values.narrow(0, first, n_q).unsqueeze(2)
    lo = torch.cummin(v, 0).values.narrow(0, first, n_q).unsqueeze(2)
    over = torch.maximum((o - hi).amax(), (lo - o).amax())
    got = torch.stack([over, vmax]).tolist()
    return float(got[0]), float(got[1])


class TorchOps:
    """``ArrayOps[torch.Tensor]`` in ``dtype`` on ``device``: the weight-free operations the transforms run
    on. Arrays leave as numpy in the *wire* dtype (float64 for float64, float32 otherwise)."""

    name = "torch"

    def __init__(self, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.dtype = parse_dtype(dtype)
        self.device = parse_device(device)
        self._on_cpu = self.device.type == "cpu"  # floating's common case reads this, not a device object
        self._compute = torch.float32 if self.dtype in _LOW else self.dtype

    @property
    def _wire(self) -> torch.dtype:
        """The dtype arrays leave in: float64 for float64, float32 otherwise."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _idx(self, index: IndexArray) -> torch.Tensor:
        """``index`` as an int64 tensor on the device; ShapeError for an index array of another kind than
        integers (a float one was truncated, a boolean one read as 0s and 1s)."""
        arr = np.asarray(index)
        if arr.dtype.kind not in "iu" and arr.size:
            raise ShapeError(f"an index must be an integer array, got {arr.dtype}")
        return as_index(arr, self.device)

    # -- conversion and validation -----------------------------------------------------------
    def from_numpy(self, x: npt.NDArray[Any]) -> torch.Tensor:
        """The tensor holding ``x`` cast to the dtype, on the device."""
        return torch.from_numpy(_torch_readable(np.asarray(x))).to(device=self.device, dtype=self.dtype)

    def to_numpy(self, x: torch.Tensor) -> npt.NDArray[Any]:
        """A numpy copy of ``x`` in the wire dtype: from a device, the one copy to the host (numpy then
        owns that fresh tensor's memory; a second copy of a prefill's logits took 81 ms of a 350 ms
        request on an H200: stop 57's GPU runs, in the README's Performance section until they move to
        models/results/PERFORMANCE.md)."""
        x = x.detach()
        if x.is_floating_point():
            x = x.to(self._wire)
        if x.device.type != "cpu":
            return np.asarray(x.cpu().numpy())
        return np.array(x.numpy())

    def rows_finite(self, x: torch.Tensor, index: IndexArray) -> bool:
        """Whether every entry of the rows ``x[index]`` is finite: on CPU in float32/float64 one pass over
        those rows in place (:mod:`.cpu_kernels`), else a gather and a test on the device."""
        if x.dim() == 0:
            raise ShapeError("rows_finite reads rows of an array of at least one dimension")
        k = self._fused(x) if x.dim() == 2 else None
        if k is None:  # the range checked as the fused pass checks it (index_select raised IndexError)
            idx = row_index(index, int(x.shape[0]))
            return bool(torch.isfinite(x.detach().index_select(0, self._idx(idx))).all())
        idx = _index(index, "a row index")
        got = int(k.rows_finite(_np(x), idx))
        if got < 0:
            raise ShapeError(f"row index out of range for {x.shape[0]} rows")
        return got == 1

    def rows_to_numpy(self, x: torch.Tensor, index: IndexArray) -> npt.NDArray[Any]:
        """A numpy copy of ``x[index]`` in the wire dtype, with one gather.

        On CPU in the wire dtype the gather is numpy's (it reads the tensor's memory once); otherwise
        the rows are gathered on the device and only they are transferred.
        """
        idx = row_index(index, int(x.shape[0]) if x.dim() else 0)  # as NumpyOps (a negative one wrapped)
        x = x.detach()
        if x.device.type == "cpu" and (x.dtype == self._wire or not x.is_floating_point()):
            return np.asarray(x.numpy()[idx])
        y = x.index_select(0, self._idx(idx))
        if y.is_floating_point():
            y = y.to(self._wire)
        return np.asarray(y.cpu().numpy())  # a fresh tensor: its memory is not shared

    def head_to_numpy(self, x: torch.Tensor, n: int) -> npt.NDArray[Any]:
        """``x[:n]`` as numpy: a view of a CPU tensor already in the wire dtype, a copy otherwise."""
        x = x.detach()
        if x.device.type == "cpu" and x.dtype == self._wire:
            return np.asarray(x.numpy()[:n])
        return self.to_numpy(x.narrow(0, 0, n))

    def numpy_dtype(self) -> np.dtype[Any]:
        """float64 for a float64 backend, float32 otherwise (the wire format of bf16/fp16)."""
        return np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)

    def floating(self, x: Any, name: str, *, finite: bool = True) -> torch.Tensor:
        """``x`` (tensor or numpy array) as a floating tensor in the dtype on the device.

        A strided CPU tensor already in the dtype and without autograd history — every array of an
        in-process request — is taken after four reads of it (dtype, device, layout, history), the tests
        the general path makes in more: each read of a tensor's attributes costs microseconds right after
        the server's products have left the caches cold (models/results/PERFORMANCE.md, stop 51)."""
        t: torch.Tensor
        as_it_is = isinstance(x, torch.Tensor) and self._as_it_is(x)
        if as_it_is:
            t = x
        elif isinstance(x, torch.Tensor):
            if x.device.type == "meta" or x.layout != torch.strided:
                raise DTypeError(f"{name} must be a dense tensor with data, got {x.layout} on {x.device}")
            t = x.detach() if x.requires_grad else x  # only a tensor that requires grad has history
        else:
            arr = np.asarray(x)
            if not np.issubdtype(arr.dtype, np.floating):
                raise DTypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
            t = torch.from_numpy(_torch_readable(arr))
        if not as_it_is:
            if not t.is_floating_point():
                raise DTypeError(f"{name} must be a floating-point array, got dtype {t.dtype}")
            if t.dtype != self.dtype or t.device != self.device:
                t = t.to(device=self.device, dtype=self.dtype)
        if finite and not _all_finite(t):
            raise NonFiniteError(f"{name} holds NaN or Inf")
        return t

    def _as_it_is(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a strided CPU tensor in the dtype without autograd history on a CPU backend:
        what :meth:`floating` takes as it is (a dtype of the backend is floating)."""
        return (
            self._on_cpu
            and x.dtype is self.dtype
            and x.is_cpu
            and x.layout is torch.strided
            and not x.requires_grad
        )

    def check(self, x: Any, name: str, shape: tuple[int, ...], *, finite: bool = True) -> torch.Tensor:
        """Validate an incoming array — floating dtype (else DTypeError), exactly ``shape`` (else
        ShapeError), finite (else NonFiniteError; not with ``finite=False``) — and return it as a
        tensor. Accepts a tensor (in-process transport) or a numpy array (the wire)."""
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise DTypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        elif not isinstance(x, torch.Tensor):
            raise DTypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
        if tuple(x.shape) != tuple(shape):
            raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        return self.floating(x, name, finite=finite)

    # -- gathers, slices, shapes ---------------------------------------------------------------
    def take_rows(self, x: torch.Tensor, index: IndexArray) -> torch.Tensor:
        """x[index] as one gather (ShapeError for an index that is not 1-D integers within x's rows, as
        NumpyOps: torch's IndexError turned into it, so no pass of its own over the index)."""
        try:
            return x.index_select(0, self._idx(index))
        except (IndexError, RuntimeError) as exc:
            raise ShapeError(f"a row index outside rows {tuple(x.shape)}, or not 1-D: {exc}") from exc

    def take_last(self, x: torch.Tensor, index: IndexArray) -> torch.Tensor:
        """x[..., index]: a gather along the last axis (ShapeError as :meth:`take_rows`)."""
        try:
            return x.index_select(x.ndim - 1, self._idx(index))
        except (IndexError, RuntimeError) as exc:
            raise ShapeError(f"a column index outside rows {tuple(x.shape)}, or not 1-D: {exc}") from exc

    def concat_rows(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The tensors stacked along the rows (ShapeError for none, or rows of different shapes)."""
        check_concat([tuple(x.shape) for x in xs])
        return torch.cat(xs, dim=0)

    def append_rows(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``cat([x, new])`` as a view of a growing buffer (:class:`_Rows`): ``new`` is written into the
        buffer's spare rows when ``x`` is the buffer's longest view, so a generation step copies its own
        rows, not the whole cache (``torch.cat`` copied ~24 MB a token on SmolLM2 at 512 positions: 2.8 ms
        a token in the request on one thread, 1.1 ms for the appends; ``models/results/cache_append.txt``).
        Otherwise (``x`` not from this method, another view already
        extended past ``x``, no spare rows left) a new buffer with :func:`spare_rows` spare rows. The rows
        a view shows are written once, before it is made, so no earlier view changes."""
        if x.shape[1:] != new.shape[1:] or x.dtype != new.dtype or x.device != new.device:
            raise ShapeError(
                f"cannot append rows {tuple(new.shape)} ({new.dtype}) to {tuple(x.shape)} ({x.dtype})"
            )
        return _Rows.append(x, new)

    def take_rows_concat(self, xs: list[torch.Tensor], index: IndexArray) -> torch.Tensor:
        """``cat(xs)[index]`` as one gather of the first array over every output row, the few rows that
        come from the others (decoys) then written over theirs: a gather is 1.5–3× faster than scattering
        the rows with ``index_copy_`` on CPU, and nothing of the concatenation's size is allocated.
        ShapeError for an index outside the rows (as NumpyOps)."""
        check_concat([tuple(x.shape) for x in xs])
        idx = row_index(index, sum(int(x.shape[0]) for x in xs))
        first = xs[0].to(self.dtype)
        n0 = int(first.shape[0])
        later = idx >= n0
        if not later.any():
            return first.index_select(0, self._idx(idx))
        if n0 == 0:
            return self.concat_rows([x.to(self.dtype) for x in xs]).index_select(0, self._idx(idx))
        out = first.index_select(0, self._idx(np.where(later, 0, idx)))
        at = np.flatnonzero(later)
        rest = xs[1].to(self.dtype) if len(xs) == 2 else self.concat_rows([x.to(self.dtype) for x in xs[1:]])
        out.index_copy_(0, self._idx(at), rest.index_select(0, self._idx(idx[at] - n0)))
        return out

    def _fused(self, *xs: torch.Tensor) -> Kernels | None:
        """The fused CPU kernels when they apply to ``xs`` (CPU, float32/float64, numba installed)."""
        dtype = self.dtype
        if dtype not in _FUSED_DTYPES or not self._on_cpu:
            return None
        for x in xs:  # a plain loop: a request makes ~150 of these calls, each on cold caches
            if x.dtype is not dtype or not x.is_cpu or x.requires_grad:
                return None
        return kernels()

    def take_rows_cols_concat(
        self,
        x: torch.Tensor,
        cols: IndexArray,
        extra: torch.Tensor,
        index: IndexArray,
        *,
        name: str | None = None,
    ) -> torch.Tensor:
        """``cat([x[:, cols], extra])[index]``: one fused pass on CPU (:mod:`.cpu_kernels`; with ``name``
        it also tells whether every entry is finite), else a column gather of x and
        :meth:`take_rows_concat` (then a scan with ``name``)."""
        cols = _index(cols, "a column index")  # 1-D integers (len() of a 0-d index raised TypeError)
        if x.dim() != 2 or extra.dim() != 2 or extra.shape[1] != len(cols):
            raise ShapeError(
                f"rows {tuple(x.shape)} and extra rows {tuple(extra.shape)} for {len(cols)} columns"
            )
        k = self._fused(x, extra)
        if k is None:  # the column range checked as the fused pass checks it
            out = self.take_rows_concat(
                [self.take_last(x, row_index(cols, int(x.shape[1]), "column")), extra], index
            )
            return out if name is None else self.floating(out, name)
        idx = _index(index, "a row index")
        out = torch.empty((idx.shape[0], len(cols)), dtype=self.dtype)
        cols_u = column_index(cols)
        o = out.numpy()
        with k.parts(o.size, self.threads()) as parts:
            got = k.take_rows_cols_concat(
                _np(x), cols_u, _np(extra), idx, o, np.empty((parts, len(cols)), o.dtype)
            )
        if got < 0:
            raise ShapeError(f"a row or column index outside rows {tuple(x.shape)} + {extra.shape[0]} extra")
        return self._finite_or_raise(out, name, got == 1)

    def gather_sum(
        self,
        s: torch.Tensor,
        from_s: IndexArray,
        y: torch.Tensor,
        from_y: IndexArray,
        extra: torch.Tensor,
        *,
        name: str | None = None,
    ) -> torch.Tensor:
        """Rows ``s[from_s] + y[from_y]``, decoy rows (``from_y < 0``) copied from ``extra[from_s]``: one
        fused pass on CPU (:mod:`.cpu_kernels`; with ``name`` it also tells whether every entry is
        finite), else two gathers and an add in the first one's memory (then a scan with ``name``)."""
        fs, fy = _index(from_s, "from_s"), _index(from_y, "from_y")
        if (
            s.dim() != 2
            or y.dim() != 2
            or extra.dim() != 2
            or y.shape[1] != s.shape[1]
            or extra.shape[1] != s.shape[1]
        ):
            raise ShapeError(
                f"s {tuple(s.shape)}, y {tuple(y.shape)} and extra {tuple(extra.shape)}: 2-D, one width"
            )
        if fy.shape != fs.shape:
            raise ShapeError(f"{fs.shape[0]} rows from s but {fy.shape[0]} from y")
        k = self._fused(s, y, extra)
        if k is None:  # the ranges checked as the fused pass checks them (an index past s read extra)
            fs, fy = gather_sum_index(fs, fy, int(s.shape[0]), int(y.shape[0]), int(extra.shape[0]))
            real = fy >= 0
            first = self.take_rows_concat([s, extra], np.where(real, fs, fs + s.shape[0]))
            zero = torch.zeros((1, y.shape[1]), dtype=self.dtype, device=self.device)
            # decoy rows add a row of zeros: the same value (−0 turns +0, equal under ==)
            out = self.add_into(first, self.take_rows_concat([y, zero], np.where(real, fy, y.shape[0])))
            return out if name is None else self.floating(out, name)
        out = torch.empty((fs.shape[0], s.shape[1]), dtype=self.dtype)
        o = out.numpy()
        with k.parts(o.size, self.threads()) as parts:
            got = k.gather_sum(_np(s), fs, _np(y), fy, _np(extra), o, np.empty((parts, s.shape[1]), o.dtype))
        if got < 0:
            raise ShapeError("a row index outside s, y or extra")
        return self._finite_or_raise(out, name, got == 1)

    @staticmethod
    def _finite_or_raise(out: torch.Tensor, name: str | None, finite: bool) -> torch.Tensor:
        """``out``, or NonFiniteError when a name is given and a fused kernel found an entry not finite."""
        if name is not None and not finite:
            raise NonFiniteError(f"{name} holds NaN or Inf")
        return out

    def take_rows_in_place(
        self, x: torch.Tensor, index: IndexArray, *, name: str | None = None
    ) -> torch.Tensor:
        """``x[index]`` over x's memory: on CPU, cycle by cycle through numpy's view of the tensor (with
        ``name`` testing every entry for finiteness as it moves: :mod:`.cpu_kernels`); on another device
        (or a dtype numpy lacks) one gather copied back (then a scan with ``name``); for an x that is not
        contiguous (an expanded or overlapping view, whose rows may share entries) that gather, a new
        tensor, not copied back: writing it over x raised RuntimeError or mixed the rows."""
        if x.device.type == "cpu" and x.is_contiguous() and x.dtype not in _LOW:
            k = self._fused(x) if name is not None and x.dim() == 2 else None
            if k is None:
                permute_rows_in_place(x.detach().numpy(), index)
                return x if name is None else self.floating(x, name)
            a = x.detach().numpy()
            idx = _index(index, "a row permutation")
            if idx.shape != (a.shape[0],):
                raise ShapeError(
                    f"a permutation of {idx.shape[0]} rows cannot reorder an array of {a.shape[0]}"
                )
            with k.parts(a.size, self.threads()) as parts:
                got = k.permute_rows(a, idx, parts, np.empty(a.shape[1], a.dtype))
            if got < 0:
                raise ShapeError("the index is not a permutation of the rows")
            return self._finite_or_raise(x, name, got == 1)
        perm = permutation_of_rows(index, int(x.shape[0]))  # as the host paths check it, nothing moved
        out = x.index_select(0, self._idx(perm))
        if x.is_contiguous():  # a strided x may hold an entry in several places: not written over
            out = x.copy_(out)
        return out if name is None else self.floating(out, name)

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``x`` (its own storage)."""
        return x.clone(memory_format=torch.contiguous_format)

    def narrow(self, x: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
        """x[start:stop] along ``axis`` (a view, no copy; ShapeError unless 0 ≤ start ≤ stop ≤ its
        length)."""
        check_narrow(tuple(x.shape), axis, start, stop)
        return x.narrow(axis, start, stop - start)

    def reshape(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``x.reshape(shape)``."""
        return x.reshape(shape)

    def nrows(self, x: torch.Tensor) -> int:
        """The length of ``x``'s first axis."""
        return int(x.shape[0])

    def shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """``x``'s shape as a tuple of Python ints."""
        return tuple(int(s) for s in x.shape)

    # -- arithmetic ------------------------------------------------------------------------------
    def add(self, x: torch.Tensor, y: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
        """x + y; with ``name`` on CPU one fused pass that also tests every entry for finiteness
        (:mod:`.cpu_kernels`, 2-D arrays of one shape), else the sum then a scan. ShapeError when the
        shapes do not broadcast (as the numpy backend; torch raised RuntimeError)."""
        try:
            if name is None:
                return x + y
            k = self._fused(x, y)
            if k is None or x.dim() != 2 or x.shape != y.shape:
                return self.floating(x + y, name)
        except RuntimeError:
            broadcast_shape(x, y)  # ShapeError when the shapes do not broadcast, else torch's own error
            raise
        out = torch.empty(x.shape, dtype=self.dtype)
        o = out.numpy()
        with k.parts(o.size, self.threads()) as parts:
            finite = k.add_rows(_np(x), _np(y), o, np.empty((parts, o.shape[1]), o.dtype))
        return self._finite_or_raise(out, name, bool(finite))

    def add_into(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + y in x's memory when the result keeps x's dtype and shape (no fresh multi-MB tensor: on
        CPU a third of a residual re-encode's time at n = 512 went to the sum's allocation); ShapeError
        when the shapes do not broadcast (:func:`~scx_ref.arrays.broadcast_shape`, as the numpy backend)."""
        if torch.result_type(x, y) != x.dtype or broadcast_shape(x, y) != x.shape:
            return self.add(x, y)  # y widens the result, or the sum is wider than x
        return x.add_(y)

    def sub(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x − y (ShapeError when the shapes do not broadcast, as the numpy backend)."""
        try:
            return x - y
        except RuntimeError:
            broadcast_shape(x, y)  # as in add
            raise

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x·W (+ b)`` with ``w`` stored out × in (``F.linear``); ShapeError when the widths differ.
        Operands of different dtypes are computed in their promoted dtype, as numpy's product (torch raised
        RuntimeError)."""
        if w.ndim != 2 or x.ndim == 0 or x.shape[-1] != w.shape[1]:
            raise ShapeError(
                f"cannot multiply rows of shape {tuple(x.shape)} by a matrix of shape "
                f"{tuple(w.shape)} (out × in)"
            )
        if x.dtype is not w.dtype or (bias is not None and bias.dtype is not w.dtype):
            dt = torch.promote_types(x.dtype, w.dtype)
            dt = dt if bias is None else torch.promote_types(dt, bias.dtype)
            x, w, bias = x.to(dt), w.to(dt), None if bias is None else bias.to(dt)
        return dense(x, w, bias)

    def scale_rows(self, x: torch.Tensor, weights: npt.NDArray[Any]) -> torch.Tensor:
        """x ⊙ w[:, None] (w cast to the dtype, as NumpyBackend; ShapeError unless x is 2-D rows,
        :func:`~.base.check_rows`, with one weight per row)."""
        check_rows(tuple(x.shape), "rows to scale")
        if np.shape(weights) != tuple(x.shape[:1]):
            raise ShapeError(f"{np.shape(weights)} weights for rows {tuple(x.shape)}: one per row")
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64)).to(self.device, self.dtype)
        return x * w[:, None]

    def argmax_last(self, logits: torch.Tensor) -> int:
        """Argmax of the last row (first index among ties, as numpy; ShapeError unless ``logits`` are 2-D
        rows, :func:`~.base.check_rows`, and for no rows, or an empty row, as NumpyBackend)."""
        check_rows(tuple(logits.shape), "logits")
        if logits.shape[0] == 0 or logits.numel() == 0:
            raise ShapeError(
                f"argmax of the last row of logits {tuple(logits.shape)}: no row, or an empty one"
            )
        return int(torch.argmax(logits[-1]).item())

    def on_host(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a CPU tensor."""
        return x.device.type == "cpu"

    def device_range_excess(self, v: torch.Tensor, o: torch.Tensor, first: int) -> tuple[float, float] | None:
        """The attention range check's two values on the device (None for CPU tensors): the running max
        and min of v over its rows (torch.cummax/cummin; NaN propagates, as in the host passes), o's
        largest excess over them in the wire dtype, and max |v| — the values
        :func:`scx_ref.protocol.verify.range_excess` gives (max and min round nothing; each difference
        rounds once in the wire dtype, as there), then two numbers to the host."""
        if self.on_host(v) and self.on_host(o):
            return None
        return range_excess_where(v.detach().to(self._wire), o.detach().to(self._wire), first)

    def threads(self) -> int:
        """torch's intra-op thread count (the fused CPU passes split their rows across as many)."""
        return int(torch.get_num_threads())

    def matmul64(self, a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``a @ b`` in float64 by torch on the host (its intra-op threads: numpy's BLAS would start a
        second thread pool that competes with torch's)."""
        ta = torch.from_numpy(np.asarray(a, dtype=np.float64))
        tb = torch.from_numpy(np.asarray(b, dtype=np.float64))
        out: npt.NDArray[np.float64] = torch.matmul(ta, tb).numpy()
        return out

    def project64(
        self, x: torch.Tensor, right: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(x·right, ‖x_i‖₂)``: on CPU in float32/float64 one fused pass per row (each element widened to
        float64 and summed into the k products and the squared norm; :mod:`.cpu_kernels`). Otherwise the
        product in float64, in row slices of about 2¹⁷ elements per thread
        (1 MiB of float64 each: the converted slice stays in cache, and a large slice's fresh pages cost
        more than the product — 2–4× on the LM head and the MLP's gate/up on one thread); the norms
        summed in float32 or wider and rounded *up* by :func:`~.base.sum_norm_slack` of that dtype, so
        they are upper bounds (a float32 overflow gives +inf)."""
        right = np.asarray(right)
        if x.dim() != 2 or not _right(x.shape[1], right):
            raise ShapeError(f"rows {tuple(x.shape)} against check vectors {right.shape}")
        rows, width = x.shape
        k = self._fused(x)
        if k is not None:  # one pass per row (cpu_kernels.project64)
            out, sq = _outputs64(rows, right)
            with k.parts(rows * width, self.threads()) as parts:
                k.project64(_np(x), _transposed(right), out, sq, parts)
            return out, k.sum_norms(sq, width)
        if rows * width <= _SMALL and x.device.type == "cpu":  # a generation step's row: on the host
            x64 = x.detach().to(torch.float64).numpy()
            norm = np.sqrt(np.einsum("ij,ij->i", x64, x64)) * sum_norm_slack(width, 2.0**-52)
            return x64 @ np.asarray(right, dtype=np.float64), norm
        # rᵀ (k × width) times the rows' transpose: BLAS runs this orientation of a thin product faster
        rt = torch.from_numpy(np.ascontiguousarray(np.transpose(right), dtype=np.float64)).to(self.device)
        step = max(1, ((1 << 17) * torch.get_num_threads()) // max(1, width))
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        prods, norms = [], []
        scratch = None if x.dtype == torch.float64 else _scratch64(min(rows, step) * width, x.device)
        for start in range(0, rows, step):
            part = x[start : start + step].detach()
            if scratch is None:
                part64 = part
            else:  # converted into memory already mapped: no fresh pages per slice
                part64 = scratch[: part.numel()].view(part.shape)
                part64.copy_(part)
            prods.append((rt @ part64.T).T)
            norms.append(torch.linalg.vector_norm(part, dim=-1, dtype=wide))
        slack = sum_norm_slack(width, 2.0**-52 if wide == torch.float64 else 2.0**-23)
        return torch.cat(prods).cpu().numpy(), torch.cat(norms).double().cpu().numpy() * slack


class TorchBackend(TorchOps):
    """Backend[torch.Tensor] over a model's weights, in ``dtype`` on ``device`` (see the module doc).

    Built from numpy :class:`ModelWeights` (converted once), or from tensors already in the F.linear
    layout (``TorchBackend.from_tensors``; :func:`scx_ref.hf.backend_from_hf` shares a loaded Hugging Face
    model's tensors this way).
    """

    def __init__(
        self,
        weights: ModelWeights,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(dtype, device)
        if not isinstance(weights, ModelWeights):
            raise ConfigError(f"TorchBackend needs ModelWeights, got {type(weights).__name__}")
        self._setup(weights.config, _from_model_weights(weights, self.dtype, self.device))

    @classmethod
    def from_tensors(
        cls, config: ModelConfig, tensors: TorchWeights, dtype: str | torch.dtype, device: str | torch.device
    ) -> TorchBackend:
        """A backend over ``tensors`` (converted to dtype/device only where they differ). ConfigError unless
        ``config`` is a ModelConfig and ``tensors`` TorchWeights holding, for each of its blocks, the
        tensors of its kind (dense or MoE, a QKV bias or not); ShapeError (DTypeError) when a tensor is not
        of the shape the config gives it (not floating): torch raised its own errors at the first use, or
        none (an integer tensor was cast)."""
        self = cls.__new__(cls)
        TorchOps.__init__(self, dtype, device)
        _check_tensors(config, tensors)

        def c(x: torch.Tensor | None) -> Any:
            return None if x is None else _t(x, self.dtype, self.device)

        layers = [TorchLayer(**{k: c(v) for k, v in vars(layer).items()}) for layer in tensors.layers]
        self._setup(config, TorchWeights(c(tensors.embed), layers, c(tensors.final_norm), c(tensors.lm_head)))
        return self

    def _setup(self, config: ModelConfig, tensors: TorchWeights | _WideWeights) -> None:
        self.config: ModelConfig = config
        self._w = tensors
        self._wide: TorchBackend | None = None
        self._wide_lock = threading.Lock()  # the float64 twin is built once, whichever thread asks first
        self._rope_lock = threading.Lock()
        empty = torch.empty(0, config.head_dim, dtype=self._compute, device=self.device)
        self._rope: tuple[torch.Tensor, torch.Tensor] = (empty, empty)

    def widened(self) -> TorchBackend:
        """This backend's tensors in float64 on the same device (itself when already float64), built once.
        Each weight is converted when the float64 twin first reads it (:class:`_WideWeights`): a float64
        copy of a block's weights exists only once a blinded stage of that block has run in float64."""
        if self.dtype == torch.float64:
            return self
        with self._wide_lock:
            if self._wide is None:
                wide = TorchBackend.__new__(TorchBackend)
                TorchOps.__init__(wide, torch.float64, self.device)
                assert isinstance(self._w, TorchWeights)  # only a float64 backend holds a _WideWeights
                wide._setup(self.config, _WideWeights(self._w, torch.float64, wide.device))
                self._wide = wide
        return self._wide

    # -- weights -----------------------------------------------------------------------------
    def _layer(self, layer: int) -> TorchLayer:
        """The block ``layer`` (ConfigError outside 0 … n_layers − 1, and for a layer that is not an
        integer — a float or a bool — as the numpy backend: a float raised TypeError, True read block 1)."""
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int | np.integer)
            or not 0 <= layer < self.config.n_layers
        ):
            raise ConfigError(f"layer {layer} out of range for a {self.config.n_layers}-layer model")
        return self._w.layers[layer]

    def _experts(self, experts: IndexArray | None, which: str) -> torch.Tensor:
        """The selected experts as an index tensor (ConfigError as :func:`~.base.check_experts`)."""
        return self._idx(check_experts(experts, self.config.n_experts, which))

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
        arr = token_ids(ids, self.config.vocab_size, allow_empty=True)
        return self._w.embed.index_select(0, self._idx(arr.astype(np.int64)))

    def _rms(self, x: torch.Tensor, gamma: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """RMSNorm_ε(x) with gain ``gamma``; with ``name``, NonFiniteError (naming it) when an entry of
        ``x`` is not finite. On CPU in float32/float64 one fused pass per row (:mod:`.cpu_kernels`: the
        mean of squares summed in float64, the scale rounded to the dtype, then γ·(x·s) rounded as the
        eager form rounds it; x's entries tested finite as they are read) from :data:`FUSED_NORM_MIN`
        entries on, else a scan, then the eager ops. ShapeError for rows of another width than γ.

        The two paths differ by rounding alone, whatever the call's size: a row whose float64 sum of squares
        reaches half the dtype's range (where the eager mean, summed in the dtype, may overflow to inf and
        give a row of zeros, as Hugging Face's LlamaRMSNorm does in float32) is normalized again by the
        eager ops — their bits, not the fused pass's finite norm (which made a prompt's row and the same
        row alone, a generation step's, differ wholly)."""
        if x.dim() == 0 or x.shape[-1] != gamma.shape[0]:
            raise ShapeError(f"rows {tuple(x.shape)} for a norm of width {gamma.shape[0]}")
        k = self._fused(x, gamma) if x.numel() >= FUSED_NORM_MIN else None
        if k is not None and x.dim() >= 1 and x.shape[-1] == gamma.shape[0] == self.config.hidden_size:
            rows = _np(x).reshape(-1, gamma.shape[0])
            out = torch.empty(x.shape, dtype=self.dtype)
            scale = np.empty(rows.shape[0], dtype=rows.dtype)
            dst, eps = out.numpy().reshape(rows.shape), float(self.config.rms_eps)
            with k.parts(rows.size, self.threads()) as parts:
                bad = np.empty((parts, rows.shape[1]), dtype=rows.dtype)
                finite = k.rms_norm(rows, _np(gamma), eps, dst, scale, bad)
            self._finite_or_raise(out, name, bool(finite))
            # s_i ≤ √(w / (max / 2)) ⇔ Σ_t x_it² ≳ max / 2: the eager sum, in the dtype, may overflow there
            floor = math.sqrt(rows.shape[1] / _HALF_MAX[self.dtype])
            if k.any_at_most(scale, floor):  # a compiled loop: numpy's test cost 10 % of a prompt's norm
                idx = torch.from_numpy(np.flatnonzero(scale <= floor))
                out.view(rows.shape)[idx] = self._rms_eager(x.reshape(rows.shape)[idx], gamma)
            return out
        if name is not None:
            x = self.floating(x, name)
        return self._rms_eager(x, gamma)

    def _rms_eager(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """RMSNorm_ε(x) by the eager torch ops (the mean of squares summed in the compute dtype: +inf, then a
        row of zeros, where that sum overflows). torch reduces each row on its own, so a row's values do not
        depend on the rows beside it (tests/test_backends_broadcast_and_rmsnorm_range.py)."""
        if self.dtype in _LOW:  # x̂ in float32 for bf16/fp16, then γ·x̂ in the dtype, as Hugging Face does
            xc = x.to(self._compute)
            var = xc.square().mean(dim=-1, keepdim=True)
            return gamma * (xc * torch.rsqrt(var + self.config.rms_eps)).to(self.dtype)
        var = x.square().mean(dim=-1, keepdim=True)
        return gamma * (x * var.add_(self.config.rms_eps).rsqrt_())

    def _gain(self, which: NormName, layer: int) -> torch.Tensor:
        """The named RMSNorm gain γ."""
        if which == "final":
            return self._w.final_norm
        if which in ("attn", "mlp"):
            lw = self._layer(layer)
            return lw.attn_norm if which == "attn" else lw.mlp_norm
        raise ConfigError(f"unknown norm {which!r}")

    def norm(
        self, x: torch.Tensor, which: NormName, layer: int = -1, *, name: str | None = None
    ) -> torch.Tensor:
        """RMSNorm_ε(x) = γ ⊙ x / sqrt(mean(x²) + ε) with the named gain; ``name``: see Backend.norm
        (tested in the norm's own pass where it is fused: :meth:`_rms`). Rows of another floating dtype are
        computed in the backend's, as :meth:`project` and :meth:`mlp` (and NumpyBackend) compute them: the
        norm of the rows rounded to the dtype (float64 rows on a float32 backend gave float64)."""
        _floating_rows(x, "RMSNorm rows" if name is None else name)
        if x.dtype is not self.dtype:
            x = x.to(self.dtype)
        return self._rms(x, self._gain(which, layer), name)

    def project64_norm(
        self, x: torch.Tensor, which: NormName, layer: int, right: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(x̂·right, ‖x̂_i‖)`` for x̂ = RMSNorm(x): on CPU in float32/float64 one fused pass per row that
        never forms x̂ (x̂_i·r = s_i·Σ_t x_it γ_t r_t, all in float64; :mod:`.cpu_kernels`), otherwise
        ``project64(norm(x))`` — also where the pass finds a row whose sum of squares comes within a factor
        2 of the dtype's range: the backend's own norm (:meth:`_rms`) gives a row of zeros where its sum in
        the dtype overflows, as an honest server's (and Hugging Face's) does, where the float64 x̂ is a
        finite unit row, which judged that server's reply a forgery."""
        gamma = self._gain(which, layer)
        if x.dim() != 2:
            raise ShapeError(f"rows {tuple(x.shape)} against check vectors {np.shape(right)}")
        k = self._fused(x, gamma)
        if k is None:  # integer rows (never fused) refused by norm (torch's RuntimeError), others cast there
            return self.project64(self.norm(x, which, layer), right)
        rows, width = x.shape
        if not (_right(width, right) and gamma.shape == (width,)):
            raise ShapeError(
                f"rows {tuple(x.shape)} against check vectors {right.shape} and a gain of "
                f"{tuple(gamma.shape)}"
            )
        out, sq = _outputs64(rows, right)
        with k.parts(rows * width, self.threads()) as parts:
            eps = float(self.config.rms_eps)
            near = k.project64_rms(_np(x), _np(gamma), eps, _transposed(right), out, sq, parts)
        if near:  # a row near the dtype's range (rare): x̂ as the server's norm computes it
            return self.project64(self._rms(x, gamma), right)
        return out, k.rms_norms(sq, width)

    def freivalds_excess(
        self,
        y: torch.Tensor | Products,
        right_y: npt.NDArray[np.float64],
        x: torch.Tensor | Products,
        right_x: npt.NDArray[np.float64],
        terms: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], float],
        norm: NormName | None = None,
        norm_layer: int = -1,
    ) -> float | None:
        """A Freivalds check's verdict (Backend.freivalds_excess): on CPU in float32/float64 one compiled
        call — :meth:`project64` / :meth:`project64_norm`'s kernels and norm bounds, then the verdict's
        (:mod:`.cpu_kernels`), so the same value as the three calls — else ``None``. Where a normalized
        row comes near the dtype's range the call reports it and the three calls are made (the verdict on
        the backend's own norm of the rows, as :meth:`project64_norm` takes it there)."""
        ys = y if isinstance(y, torch.Tensor) else None
        xs = x if isinstance(x, torch.Tensor) else None
        gamma = self._gain(norm, norm_layer) if norm is not None and xs is not None else None
        given = [t for t in (ys, xs, gamma) if t is not None]
        k = self._fused(*given)
        if k is None or any(t.dim() != 2 for t in (ys, xs) if t is not None):
            return None
        bias_r, a, b, tiny = terms
        yr, yn = _NO_PRODUCTS if ys is not None else _products(y)
        xr, xn = _NO_PRODUCTS if xs is not None else _products(x)
        ya = _NO_ROWS if ys is None else _np(ys)
        xa = _NO_ROWS if xs is None else _np(xs)
        ga = _NO_GAIN if gamma is None else _np(gamma)
        rty = _NO_ROWS if ys is None else _transposed(right_y)
        rtx = _NO_ROWS if xs is None else _transposed(right_x)
        if rty.ndim != 2 or rtx.ndim != 2 or not _terms(bias_r, a, b):
            raise ShapeError(
                f"a Freivalds check's check vectors {np.shape(right_y)}, {np.shape(right_x)} and terms "
                f"{np.shape(bias_r)}, {np.shape(a)}, {np.shape(b)}: width × k and k"
            )
        with k.parts(max(ya.size, xa.size), self.threads()) as parts:
            ratio = k.freivalds_excess(
                ya, rty, yr, yn, xa, ga, float(self.config.rms_eps), rtx, xr, xn, bias_r, a, b, tiny, parts
            )
        if ratio == NEAR_RANGE:
            assert xs is not None and norm is not None
            yp = (yr, yn) if ys is None else self.project64(ys, right_y)
            xp = self.project64_norm(xs, norm, norm_layer, right_x)
            return float(k.linear_excess(yp[0], xp[0], bias_r, xp[1], yp[1], a, b, tiny))
        if ratio < 0:  # the kernel checks that the arrays fit (it indexes without bounds checks)
            raise ShapeError("a Freivalds check's two sides, check vectors and terms do not match")
        return float(ratio)

    def gate_up_excess(
        self, gate_up: torch.Tensor, y: torch.Tensor, x: torch.Tensor, layer: int, up: Check, down: Check
    ) -> tuple[float, float] | None:
        """A dense MLP reply's two verdicts (Backend.gate_up_excess): on CPU in float32/float64 one compiled
        call — :meth:`project64_gate_up`'s pass, then :meth:`freivalds_excess`'s twice
        (:mod:`.cpu_kernels`), so the same values as those calls — else ``None``. Where a normalized row of
        ``x`` comes near the dtype's range the call reports it and those calls are made
        (:meth:`freivalds_excess`).

        The reply's [gate up] is read in place and its SwiGLU formed four rows at a time inside the pass, in
        the dtype (the kernel's own silu: :func:`.numba_kernels.silu_value`): nothing of the reply's size is
        allocated. silu(gate) by torch before the call was a pass of its own over the reply's gate half
        into a fresh array: in a verified SmolLM2 request on this stop's two vCPUs it took 0.4–0.7 ms a
        layer at 130 rows, where the same call on warm memory took 0.1–0.2 ms (README: Performance, stop
        45)."""
        gamma = self._gain("mlp", layer)
        k = self._fused(gate_up, y, x, gamma)
        if k is None or gate_up.dim() != 2 or y.dim() != 2 or x.dim() != 2:
            return None
        (r_up, wr_up, (bias_up, a_up, b_up, tiny)), (r_down, wr_down, (bias_down, a_down, b_down, _)) = (
            up,
            down,
        )
        rows = gate_up.shape[0]
        if y.shape[0] != rows or x.shape[0] != rows:
            raise ShapeError(
                f"an MLP reply {tuple(gate_up.shape)}, {tuple(y.shape)} for rows {tuple(x.shape)}: its row "
                "counts differ"
            )
        rt_up, rd, rt_x, rt_y = (_transposed(r) for r in (r_up, wr_down, wr_up, r_down))
        if any(r.ndim != 2 for r in (rt_up, rd, rt_x, rt_y)) or not (
            _terms(bias_up, a_up, b_up) and _terms(bias_down, a_down, b_down)
        ):
            raise ShapeError("an MLP reply's check vectors must be width × k and its terms k long")
        with k.parts(gate_up.shape[0] * gate_up.shape[1], self.threads()) as parts:
            got = k.gate_up_excess(
                _np(gate_up),
                rt_up,
                rd,
                _np(x),
                _np(gamma),
                float(self.config.rms_eps),
                rt_x,
                _np(y),
                rt_y,
                bias_up,
                a_up,
                b_up,
                bias_down,
                a_down,
                b_down,
                tiny,
                parts,
            )
        if got[0] == NEAR_RANGE:
            gr, gn, mr, mn = self.project64_gate_up(gate_up, r_up, wr_down)
            got_up = self.freivalds_excess((gr, gn), r_up, x, wr_up, up[2], "mlp", layer)
            got_down = self.freivalds_excess(y, r_down, (mr, mn), wr_down, down[2])
            assert got_up is not None and got_down is not None
            return got_up, got_down
        if got[0] < 0 or got[1] < 0:  # the kernel checks that the arrays fit (no bounds checks in it)
            raise ShapeError(
                f"an MLP reply {tuple(gate_up.shape)}, {tuple(y.shape)} for rows {tuple(x.shape)} does "
                "not match its check vectors"
            )
        return float(got[0]), float(got[1])

    def project64_gate_up(
        self,
        gate_up: torch.Tensor,
        right_gate_up: npt.NDArray[np.float64],
        right_down: npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
        """``project64(gate_up, right_gate_up) + project64(swiglu_act(gate_up), right_down)``: on CPU in
        float32/float64 one fused pass per row that reads [gate up] once, sums its products and norms in
        float64, and forms silu(gate) ⊙ up in the dtype (the kernel's silu, within a few roundings of
        torch's: the verifier's tolerance allows the client's SwiGLU four roundings from the server's) into
        the second products without storing it (:mod:`.cpu_kernels`); elsewhere as it reads."""
        k = self._fused(gate_up)
        if k is None or gate_up.dim() != 2:
            return self.project64(gate_up, right_gate_up) + self.project64(
                self.swiglu_act(gate_up), right_down
            )
        rows, f = gate_up.shape[0], gate_up.shape[1] // 2
        if not (gate_up.shape[1] == 2 * f and _right(2 * f, right_gate_up) and _right(f, right_down)):
            raise ShapeError(
                f"[gate up] rows {tuple(gate_up.shape)} against check vectors {right_gate_up.shape}, "
                f"{right_down.shape}"
            )
        gu = _np(gate_up)
        out_g, sq_g = _outputs64(rows, right_gate_up)
        out_d, sq_d = _outputs64(rows, right_down)
        rg, rd = _transposed(right_gate_up), _transposed(right_down)
        with k.parts(gu.size, self.threads()) as parts:
            k.project64_gate_up(gu, rg, rd, out_g, sq_g, out_d, sq_d, parts)
        return out_g, k.sum_norms(sq_g, 2 * f), out_d, k.sum_norms(sq_d, f)

    def correction(
        self, eta: torch.Tensor, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> torch.Tensor:
        """ηW: :func:`~scx_ref.transforms.blinding_correction` with the named matrix."""
        return blinding_correction(eta, self._matrix(which, layer, experts), self)

    def weight_sketch(
        self, which: WeightName, layer: int, expert: int | None, basis: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``(W·basis, column sums of W²)`` in float64 on the host (W in × out; stored out × in here),
        read in slices of output rows on the device."""
        sel = None if expert is None else np.array([expert], dtype=np.int64)
        w = self._matrix(which, layer, sel)  # out × in
        if np.ndim(basis) != 2 or np.shape(basis)[0] != w.shape[0]:
            raise ShapeError(
                f"a basis {np.shape(basis)} for a matrix {(w.shape[1], w.shape[0])} (in × out): out × m"
            )
        right = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float64)).to(self.device)
        wb = torch.zeros(w.shape[1], right.shape[1], dtype=torch.float64, device=self.device)
        col_sq = torch.empty(w.shape[0], dtype=torch.float64, device=self.device)
        step = max(1, (1 << 22) // max(1, w.shape[1]))
        for start in range(0, w.shape[0], step):
            part = w[start : start + step].to(torch.float64)
            wb += part.T @ right[start : start + step]
            col_sq[start : start + step] = part.square().sum(dim=1)
        return wb.cpu().numpy(), col_sq.cpu().numpy()

    def project(
        self, x: torch.Tensor, which: WeightName, layer: int = -1, experts: IndexArray | None = None
    ) -> torch.Tensor:
        """xW + b (the bias only for ``wqkv`` of a Qwen2 model); ShapeError when the rows are not as wide as
        W's input, as NumpyBackend. Rows of another floating dtype are computed in the backend's (torch
        raised RuntimeError)."""
        bias = self._layer(layer).bqkv if which == "wqkv" else None
        w = self._matrix(which, layer, experts)
        if x.dim() == 0 or x.shape[-1] != w.shape[1]:
            raise ShapeError(
                f"cannot multiply rows of shape {tuple(x.shape)} by a matrix of shape {tuple(w.shape)} "
                "(out × in)"
            )
        _floating_rows(x, f"rows of a {which} product")
        if x.dtype is not w.dtype:
            x = x.to(w.dtype)
        return dense(x, w, bias, pooled=which == "lm_head")

    def mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The block's MLP on normalized rows: SwiGLU, or Mixtral MoE (softmax router, top-k with ties
        to the lower expert id as the reference's stable sort, renormalised weights); ShapeError for rows of
        another width than the model's, NonFiniteError for router logits that are not finite (no routing,
        as the reference: a NaN made the row's experts torch's sort order of NaN). Rows of another floating
        dtype are computed in the backend's (torch raised RuntimeError)."""
        lw = self._layer(layer)
        if x.dim() == 0 or x.shape[-1] != self.config.hidden_size:
            raise ShapeError(f"rows {tuple(x.shape)} for an MLP of width {self.config.hidden_size}")
        _floating_rows(x, "MLP rows")
        if x.dtype is not self.dtype:
            x = x.to(self.dtype)
        if lw.gate_up is not None and lw.down is not None:
            return dense(self.swiglu_act(dense(x, lw.gate_up)), lw.down)
        assert lw.router is not None and lw.experts_gate_up is not None and lw.experts_down is not None
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = dense(x2, lw.router)
        if not _all_finite(logits):  # rows × experts: small beside the experts' products
            raise NonFiniteError("router logits hold NaN or ±Inf")
        probs = torch.softmax(logits.to(self._compute), dim=-1)
        top_p, top = torch.sort(probs, dim=-1, descending=True, stable=True)
        k = self.config.top_k
        top, weights = top[:, :k], top_p[:, :k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x2)
        hit = torch.zeros(self.config.n_experts, dtype=torch.bool, device=x.device)
        hit[top.reshape(-1)] = True
        for e in torch.nonzero(hit).reshape(-1).tolist():
            rows, slot = torch.nonzero(top == e, as_tuple=True)
            h = self.swiglu_act(dense(x2.index_select(0, rows), lw.experts_gate_up[e]))
            y = dense(h, lw.experts_down[e])
            out.index_add_(0, rows, (weights[rows, slot][:, None] * y.to(self._compute)).to(self.dtype))
        return out.reshape(shape)

    def swiglu_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) ⊙ up for rows [gate up] (the product written over silu's fresh output: the same
        roundings as ``silu(gate) * up``, one allocation fewer); ShapeError unless the rows split into two
        equal halves."""
        if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
            raise ShapeError(f"[gate up] rows {tuple(gate_up.shape)}: not two equal halves")
        _floating_rows(gate_up, "[gate up] rows")
        f = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :f]).mul_(gate_up[..., f:])

    # -- position and attention ----------------------------------------------------------------
    def _cos_sin(self, positions: IndexArray) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (rows × d_h) at ``positions``: a view of the cached tables for consecutive positions
        (a prompt, a decode step), one gather otherwise. ShapeError unless the positions are integers in
        [0, max_positions), as NumpyBackend.rope: the tables grow on demand up to the model's max_positions
        rows, never past them (a position of 10⁹ asked for a billion rows)."""
        raw = np.asarray(positions)
        if raw.size and raw.dtype.kind not in "iu":  # a float position was truncated
            raise ShapeError(f"RoPE positions must be integers >= 0, got {raw.dtype}")
        pos = raw.astype(np.int64, copy=False).reshape(-1)
        if pos.size > 1:
            lo, hi = int(pos.min()), int(pos.max())
        else:  # a decode step (one position) or nothing: no numpy reductions
            lo = hi = int(pos[0]) if pos.size else 0
        if lo < 0:
            raise ShapeError("RoPE positions must be >= 0")
        limit = self.config.max_positions
        if hi >= limit:
            raise ShapeError(f"RoPE position {hi} past the model's max_positions = {limit}")
        need = hi + 1 if pos.size else 0
        cos, sin = self._rope  # one read of the pair: a concurrent grow replaces it whole
        if need > cos.shape[0]:
            with self._rope_lock:
                cos, sin = self._rope
                if need > cos.shape[0]:
                    size = min(max(need, 2 * cos.shape[0], 256), limit)
                    c, s = ops.rope_cos_sin(np.arange(size), self.config.head_dim, self.config.rope_theta)
                    cos, sin = _t(c, self._compute, self.device), _t(s, self._compute, self.device)
                    self._rope = (cos, sin)
        start = int(pos[0]) if pos.size else 0
        if pos.size <= 1 or (need - start == pos.size and bool(np.all(np.diff(pos) == 1))):
            return cos.narrow(0, start, pos.size), sin.narrow(0, start, pos.size)
        idx = self._idx(pos)
        return cos.index_select(0, idx), sin.index_select(0, idx)

    def rope(self, x: torch.Tensor, positions: IndexArray) -> torch.Tensor:
        """RoPE (HF rotate_half) on rows × heads × d_h at each row's position: x·cos + rotate_half(x)·sin
        with rotate_half(x) = [−x₂, x₁]. HF's tables repeat their halves (cos = [c, c], sin = [s, s]), so
        the result is [x₁c − x₂s, x₂c + x₁s]: x·cos and x·sin over the whole head, then each half's sine
        term added in place. Every product is rounded before its add, exactly as HF's and the numpy
        reference's form (no fused multiply-add: torch's ``addcmul`` contracts to one on FMA CPUs, which
        changes about a quarter of the results by an ulp). ``x`` may be a strided view (e.g. the Q and K
        heads of a fused QKV row). ShapeError for positions that are not integers in [0, max_positions)."""
        if x.ndim != 3:
            raise ShapeError(f"RoPE input must be rows × heads × head_dim, got {tuple(x.shape)}")
        _floating_rows(x, "RoPE input")  # as NumpyBackend (integer heads were cast)
        if x.shape[-1] != self.config.head_dim:
            raise ShapeError(f"RoPE on heads of width {x.shape[-1]}, the model's are {self.config.head_dim}")
        if np.ndim(positions) != 1:
            raise ShapeError(
                f"RoPE needs one position per row: {x.shape[0]} rows, positions {np.shape(positions)}"
            )
        cos, sin = self._cos_sin(positions)
        if cos.shape[0] != x.shape[0]:
            raise ShapeError(f"{cos.shape[0]} positions for {x.shape[0]} rows")
        xc = x.to(self._compute)
        half = x.shape[-1] // 2
        out = torch.mul(xc, cos[:, None, :])  # [x₁c, x₂c]: the table's halves are equal
        prod = torch.mul(xc, sin[:, None, :])  # [x₁s, x₂s]
        out[..., :half].sub_(prod[..., half:])
        out[..., half:].add_(prod[..., :half])
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def rope_take(
        self,
        x: torch.Tensor,
        rows: IndexArray,
        positions: IndexArray,
        rope_index: IndexArray,
        plain_index: IndexArray,
        *,
        name: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``x[rows]`` split at w = len(``rope_index``) columns: the first w RoPE'd head by head and
        gathered by ``rope_index``, the rest gathered by ``plain_index`` (Backend.rope_take). On CPU one
        fused pass (:mod:`.cpu_kernels`: each row read once, the rotation in a row-sized buffer, the same
        per-element operations as :meth:`rope`; with ``name`` each row read is tested for finiteness in
        it), else a row gather (then scanned with ``name``), :meth:`rope` and two column gathers."""
        # 1-D integers (len() of a 0-d index raised TypeError)
        rope_index, plain_index = _index(rope_index, "a column index"), _index(plain_index, "a column index")
        dh, w = self.config.head_dim, len(rope_index)
        check_rope_split(tuple(x.shape), w, len(plain_index), dh)
        k = self._fused(x)
        rows_a = _index(rows, "a row index") if k is not None else row_index(rows, int(x.shape[0]))
        n = rows_a.shape[0]
        if k is None:  # the column ranges checked as the fused pass checks them
            ri = row_index(rope_index, w, "column")
            pi = row_index(plain_index, int(x.shape[1]) - w, "column")
            t = self.take_rows(x, rows_a)
            if name is not None:
                t = self.floating(t, name)
            roped = self.rope(t.narrow(1, 0, w).reshape(n, w // dh, dh), positions).reshape(n, w)
            plain = self.take_last(t.narrow(1, w, t.shape[1] - w), pi)
            return self.take_last(roped, ri).reshape(n, w // dh, dh), plain.reshape(n, len(pi) // dh, dh)
        pos = _index(positions, "RoPE positions")
        if pos.shape[0] != n:
            raise ShapeError(f"{pos.shape[0]} positions for {n} rows")
        out_rope = torch.empty((n, w // dh, dh), dtype=self.dtype)
        out_plain = torch.empty((n, len(plain_index) // dh, dh), dtype=self.dtype)
        xa = _np(x)
        with k.parts(n * xa.shape[1], self.threads()) as parts:
            rest = (
                column_index(rope_index),
                column_index(plain_index),
                dh,
                out_rope.numpy().reshape(n, w),
                out_plain.numpy().reshape(n, len(plain_index)),
                np.empty((parts, xa.shape[1]), xa.dtype),
            )
            # the cached tables, read by position in the kernel; a position past them grows them (one
            # below 0 is refused there, one at max_positions or past it by _cos_sin) and the pass runs again
            cos, sin = self._rope
            got = k.rope_take(xa, rows_a, pos, _np(cos), _np(sin), *rest)
            if got == -1:
                self._cos_sin(pos)
                cos, sin = self._rope
                got = k.rope_take(xa, rows_a, pos, _np(cos), _np(sin), *rest)
        if got == -2:
            raise ShapeError(f"a row or column index outside rows {tuple(x.shape)}")
        if got < 0:
            raise ShapeError("RoPE positions outside the tables")
        finite = got == 1
        self._finite_or_raise(out_rope, name, bool(finite))
        return out_rope, out_plain

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_positions: IndexArray,
        k_positions: IndexArray | None,
    ) -> torch.Tensor:
        """Causal GQA attention (query at position p sees keys at positions ≤ p; all keys when
        ``k_positions`` is None). Returns rows × H × d_h.

        Runs as one batched (1 × heads × rows × d_h) ``scaled_dot_product_attention`` with ``enable_gqa``
        — on CPU the fused flash kernel, which a 3-D call without the batch axis misses — with
        ``is_causal`` when the keys are the queries' own rows in true order, no mask when every query
        sees every key, and a boolean mask otherwise. Where every query sees every key and several query
        heads share a KV head, on CPU, the call is :meth:`_grouped_attention`'s instead (the same
        softmax(q kᵀ/√d_h)·v per query head, each KV head's cache read once). Inputs may be strided
        views (rows × heads × d_h of a wider array); the output is contiguous rows × H × d_h. A query row's
        head with a NaN or ±inf entry gives NaN in that row's head, as the reference does (the CPU flash
        kernel gives zeros for a NaN one: a silent finite result); no keys give zeros. ShapeError for
        shapes :func:`~.base.check_heads` refuses, or positions that are not one integer per row (as
        NumpyBackend)."""
        out = self._attention(q, k, v, q_positions, k_positions)
        if out.numel() == 0 or k.shape[0] == 0 or (self._on_cpu and _all_finite(q)):
            return out  # no keys give zeros, as on numpy
        # not finite (or on a device, where a test on the host would wait for the kernels): NaN where a
        # query head is not finite, whatever the kernel made of it (the CPU flash kernel: zeros)
        return out.masked_fill(~torch.isfinite(q).all(dim=-1, keepdim=True), math.nan)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_positions: IndexArray,
        k_positions: IndexArray | None,
    ) -> torch.Tensor:
        """:meth:`attention` before the NaN of the non-finite query heads."""
        check_heads(tuple(q.shape), tuple(k.shape), tuple(v.shape))
        n_q, n_heads, _ = q.shape
        n_k, n_kv, _ = k.shape
        mask: torch.Tensor | None = None
        causal = False
        if k_positions is not None:
            qp, kp = np.asarray(q_positions), np.asarray(k_positions)
            if qp.shape != (n_q,) or kp.shape != (n_k,):
                raise ShapeError(f"positions {qp.shape}, {kp.shape} for {n_q} queries and {n_k} keys")
            for what, p in (("key", kp), ("query", qp)):  # a float one was truncated to another mask
                if p.size and p.dtype.kind not in "iu":
                    raise ShapeError(f"{what} positions must be integers, got {p.dtype}")
            qp, kp = qp.astype(np.int64, copy=False), kp.astype(np.int64, copy=False)
        if k_positions is not None and n_k:
            if qp.size and qp.min() < kp.min():  # a query with no visible key: the reference gives 0
                return self.softmax_values(self._masked_scores(q, k, qp, kp), v)
            if qp.size and kp.max() <= qp.min():
                pass  # every query sees every key
            elif n_q == n_k and np.array_equal(qp, kp) and bool(np.all(np.diff(kp) > 0)):
                causal = True
            else:
                mask = torch.from_numpy(kp[None, :] <= qp[:, None]).to(self.device)
        if n_k == 0:  # in the backend's dtype, as every other path's output (q's dtype may differ)
            return torch.zeros(n_q, n_heads, v.shape[-1], dtype=self.dtype, device=q.device)
        if mask is None and not causal and n_heads > n_kv and q.device.type == "cpu":
            return self._grouped_attention(q, k, v)
        return self._batched_attention(q, k, v, mask, causal)

    def _batched_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """:meth:`attention` as one (1 × H × rows × d_h) ``scaled_dot_product_attention`` call, with
        ``enable_gqa`` where query heads share KV heads, the mask or the causal flag given."""
        qt, kt, vt = (self._heads_first(t) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
        )[0].transpose(0, 1)  # the CPU kernel writes rows × heads × d_h: this view is contiguous
        return out.to(self.dtype).contiguous()

    def _heads_first(self, t: torch.Tensor) -> torch.Tensor:
        """rows × heads × d_h as 1 × heads × rows × d_h in the compute dtype (a view where no cast is due)."""
        return t.to(self._compute).transpose(0, 1).unsqueeze(0)

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q_h kᵀ/√d_h)·v per query head h, every query seeing every key, with the g = H/H_kv query
        heads of each KV head as g·rows query rows of that one head: one (1 × H_kv × g·rows × d_h)
        ``scaled_dot_product_attention`` call without ``enable_gqa``. Each row's output is the same
        function of its own scores as in the ``enable_gqa`` call (nothing masks one row against another), so
        only the kernel's rounding differs.

        Why: with ``enable_gqa`` torch's CPU flash kernel works per query head, reading its KV head's
        cache g times over; a generation step has one query row, so that is all it does. Timed through
        :meth:`attention`, the ``enable_gqa`` call patched in for this one (``python -m
        models.attention_forms``: one row, strided K and V, 400 calls alternating): ``llama1b-random``
        (32 query heads on 4 KV heads) 431 → 223 µs at 513 keys and 3.6 → 1.1 ms at 2 049 on one thread,
        223 → 107 µs and 1.87 → 0.61 ms on two; SmolLM2 (9 on 3) 1.02–1.12× as fast at 513 keys and
        1.19–1.26× at 2 049; as fast at 16 keys (0.98–1.19×) (models/results/PERFORMANCE.md, stop 50)."""
        n_q, n_heads, d_h = q.shape
        n_kv = k.shape[1]
        g = n_heads // n_kv
        qt = q.to(self._compute).reshape(n_q, n_kv, g, d_h).transpose(0, 1).reshape(1, n_kv, g * n_q, d_h)
        kt, vt = self._heads_first(k), self._heads_first(v)
        out = F.scaled_dot_product_attention(qt, kt, vt)[0]  # H_kv × (rows · g) × d_v
        d_v = out.shape[-1]
        return (
            out.reshape(n_kv, n_q, g, d_v)
            .transpose(0, 1)
            .reshape(n_q, n_heads, d_v)
            .to(self.dtype)
            .contiguous()
        )

    def _masked_scores(
        self, q: torch.Tensor, k: torch.Tensor, qp: npt.NDArray[np.int64], kp: npt.NDArray[np.int64]
    ) -> torch.Tensor:
        """:meth:`scores` with −inf where a key lies after the query, kept in the compute dtype (float32
        for bfloat16/float16, as the fused call's): rounded to the dtype, one query that saw no key made
        every other query's softmax read scores rounded to bfloat16."""
        s = self._scores(q, k)
        mask = torch.from_numpy(kp[None, :] <= qp[:, None]).to(self.device)
        return s.masked_fill(~mask[None], -math.inf)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled scores q kᵀ/√d_h per head with GQA: (H, rows_q, rows_k); ShapeError for shapes
        :func:`~.base.check_heads` refuses."""
        return self._scores(q, k).to(self.dtype)

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """:meth:`scores` in the compute dtype."""
        check_heads(tuple(q.shape), tuple(k.shape))
        n_q, n_heads, d_h = q.shape
        n_k, n_kv, _ = k.shape
        g = n_heads // n_kv
        # one (g·q × d)·(d × k) product per KV head, K read in place (a strided view): a 4-D matmul that
        # broadcasts K over the g query heads copies it g times first (12× slower for one decode row)
        qg = q.to(self._compute).reshape(n_q, n_kv, g, d_h).permute(1, 2, 0, 3).reshape(n_kv, g * n_q, d_h)
        kt = k.to(self._compute).permute(1, 2, 0)  # H_kv × d × k
        s = torch.bmm(qg, kt) / math.sqrt(d_h)
        return s.reshape(n_heads, n_q, n_k)

    def softmax_values(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(scores)·v per head (rows with no finite score give zeros, as the reference); ShapeError
        for shapes :func:`~.base.check_scores` refuses."""
        check_scores(tuple(scores.shape), tuple(v.shape))
        n_heads, n_q, n_k = scores.shape
        n_kv = v.shape[1]
        s = scores.to(self._compute)
        m = s.amax(dim=-1, keepdim=True) if n_k else s.new_zeros(n_heads, n_q, 1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        tot = e.sum(dim=-1, keepdim=True)
        g, d_v = n_heads // n_kv, v.shape[-1]
        probs = (e / torch.where(tot == 0, torch.ones_like(tot), tot)).reshape(n_kv, g * n_q, n_k)
        vt = v.to(self._compute).permute(1, 0, 2)  # H_kv × k × d, V read in place (as K in scores)
        out = torch.bmm(probs, vt).reshape(n_kv, g, n_q, d_v)
        return out.permute(2, 0, 1, 3).reshape(n_q, n_heads, d_v).to(self.dtype)

"""Model shapes (DESIGN §2): LLaMA, Mixtral (MoE) and Qwen2 (QKV bias) decoder-only transformers."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ._checks import check_int, check_real, short_repr
from .errors import ConfigError

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a pre-norm decoder-only transformer.

    ``n_experts == 0`` means a dense SwiGLU MLP; otherwise each block's MLP is a Mixtral-style
    mixture of ``n_experts`` SwiGLU experts with top-``top_k`` softmax routing. ``qkv_bias`` adds
    the Qwen2 bias on the Q/K/V projections.
    """

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_experts: int = 0
    top_k: int = 0
    qkv_bias: bool = False
    max_positions: int = 4096
    name: str = "custom"

    def __post_init__(self) -> None:
        """ConfigError unless every field has its type and the fields agree: sizes are positive ints (not
        bool), ``n_heads`` a multiple of ``n_kv_heads``, ``head_dim`` even, ``n_experts``/``top_k`` ints with
        1 <= top_k <= n_experts for MoE and top_k == 0 for a dense model, ``rms_eps`` >= 0 and ``rope_theta``
        > 0 finite reals (one that is not a Python int or float, e.g. a numpy float32 or float64 or a
        Fraction, is stored as a float; a ``rope_theta`` below 1 so small that RoPE's angle at position
        max_positions − 1 is not finite — NaN tables — is refused), ``qkv_bias`` a bool (a numpy bool is
        stored as one), ``name`` a str. An integer field given as another integer type (a numpy int64, a 0-d
        array or tensor) is stored as a Python int, so the config hashes and its :meth:`to_dict` is JSON."""
        for field in (
            "vocab_size",
            "hidden_size",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_positions",
        ):
            _store_int(self, field, 1)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for field in ("n_experts", "top_k"):
            _store_int(self, field, 0)
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"need 1 <= top_k <= n_experts for MoE, got top_k={self.top_k}, n_experts={self.n_experts}"
            )
        if not self.n_experts and self.top_k:
            raise ConfigError(f"top_k={self.top_k} needs n_experts >= 1 (a dense model has top_k 0)")
        for field, open_at_0 in (("rms_eps", False), ("rope_theta", True)):
            value = getattr(self, field)
            checked = check_real(value, field, 0, lo_open=open_at_0)
            if type(value) not in (int, float):  # e.g. a numpy float32 or float64 (a float subclass): a float
                object.__setattr__(self, field, checked)
        if float(self.rope_theta) < 1:  # frequencies above 1: the fastest may overflow (NaN RoPE tables)
            _check_rope_angles(float(self.rope_theta), self.head_dim, self.max_positions)
        if isinstance(self.qkv_bias, np.bool_):  # stored as a Python bool, as a numpy int is stored as an int
            object.__setattr__(self, "qkv_bias", bool(self.qkv_bias))
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be True or False, got {self.qkv_bias!r}")
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection, H·d_h."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection, H_kv·d_h."""
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        """Whether the MLP is a mixture of experts (``n_experts`` > 0)."""
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as plain Python values (JSON takes it); :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config of :meth:`to_dict`'s mapping; ConfigError for a non-mapping, an unknown or a missing
        field, or a bad value."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model config must be a mapping of fields, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - names))
        if unknown:
            raise ConfigError(
                f"unknown model config field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}"
            )
        try:
            return cls(**data)
        except TypeError as exc:  # a required field missing
            raise ConfigError(f"incomplete model config: {exc}") from exc


def _store_int(config: ModelConfig, field: str, lo: int) -> None:
    """Check ``config``'s integer ``field`` (>= ``lo``) and store it as a Python int where it is another
    integer type: a numpy int64 made ``to_dict`` unserializable, a 0-d array the config unhashable."""
    value = getattr(config, field)
    checked = check_int(value, field, lo)
    if type(value) is not int:
        object.__setattr__(config, field, checked)


def _check_rope_angles(theta: float, head_dim: int, max_positions: int) -> None:
    """ConfigError unless RoPE's angles (:func:`scx_ref.ops.rope_cos_sin`: position × θ^(−2i/d_h)) are
    finite at every position below ``max_positions``: θ = 1e-320 made the reference decode NaN logits."""
    with np.errstate(all="ignore"):
        inv_freq = 1.0 / (np.float64(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    top = float(inv_freq.max())
    if not math.isfinite(top) or max_positions - 1 > sys.float_info.max / top:
        raise ConfigError(
            f"rope_theta {theta!r} is too small: RoPE's angles are not finite for head_dim {head_dim} "
            f"up to position {short_repr(max_positions - 1)}"
        )

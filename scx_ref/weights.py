"""Model weights as plain numpy arrays, in the ``y = x @ W`` convention (W has shape in × out).

Hugging Face stores ``nn.Linear.weight`` as out × in; the HF adapter transposes on load. A flat
``dict[str, ndarray]`` view (``to_dict`` / ``from_dict``) uses the names documented on each field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._checks import check_real, float_dtype
from .config import ModelConfig
from .errors import ConfigError, DTypeError, NonFiniteError, ShapeError

__all__ = ["DenseMLP", "LayerWeights", "MoEMLP", "ModelWeights", "random_weights"]

Array = npt.NDArray[np.floating[Any]]


def _all_finite(arr: Array) -> bool:
    """Whether every entry is finite, in one pass: a finite float64 sum proves it (NaN and ±Inf propagate);
    a non-finite sum (or an overflow of finite terms) falls back to the elementwise test."""
    if arr.size == 0 or np.isfinite(arr.sum(dtype=np.float64)):
        return True
    return bool(np.isfinite(arr).all())


# eq=False: the generated __eq__ compared arrays with ==, so ``a == b`` (and ``a in [b]``) raised numpy's
# ambiguous-truth ValueError for two weight objects; they compare (and hash) by identity instead.
@dataclass(eq=False)
class DenseMLP:
    """SwiGLU MLP: down(silu(x @ w_gate) * (x @ w_up))."""

    w_gate: Array  # d × f
    w_up: Array  # d × f
    w_down: Array  # f × d


@dataclass(eq=False)
class MoEMLP:
    """Mixtral sparse MoE: softmax router over experts, top-k, renormalised weights."""

    router: Array  # d × E
    experts: list[DenseMLP]


@dataclass(eq=False)
class LayerWeights:
    """One block's weights: the norms' gains, the attention projections (Qwen2: their biases) and the MLP."""

    attn_norm: Array  # d
    wq: Array  # d × H·d_h
    wk: Array  # d × H_kv·d_h
    wv: Array  # d × H_kv·d_h
    wo: Array  # H·d_h × d
    mlp_norm: Array  # d
    mlp: DenseMLP | MoEMLP
    bq: Array | None = None  # H·d_h (Qwen2)
    bk: Array | None = None
    bv: Array | None = None

    @property
    def wqkv(self) -> Array:
        """The fused projection [W_q W_k W_v] (d × (H + 2·H_kv)·d_h)."""
        return np.concatenate([self.wq, self.wk, self.wv], axis=1)

    @property
    def bqkv(self) -> Array | None:
        """The fused bias [b_q b_k b_v] ((H + 2·H_kv)·d_h), None without QKV bias."""
        if self.bq is None or self.bk is None or self.bv is None:
            return None
        return np.concatenate([self.bq, self.bk, self.bv])

    def astype(self, dtype: npt.DTypeLike) -> LayerWeights:
        """A copy of this block with every array cast to ``dtype`` (``numpy.ndarray.astype``: the gains, the
        projections, their biases where there are any, and the MLP's — each expert's and the router of an
        MoE MLP). Not checked here: :meth:`ModelWeights.astype` checks the dtype and the model it builds."""

        def cast(a: Array) -> Array:
            return a.astype(dtype)

        def dense(m: DenseMLP) -> DenseMLP:
            return DenseMLP(cast(m.w_gate), cast(m.w_up), cast(m.w_down))

        mlp = self.mlp
        return LayerWeights(
            cast(self.attn_norm),
            cast(self.wq),
            cast(self.wk),
            cast(self.wv),
            cast(self.wo),
            cast(self.mlp_norm),
            MoEMLP(cast(mlp.router), [dense(e) for e in mlp.experts])
            if isinstance(mlp, MoEMLP)
            else dense(mlp),
            *(None if b is None else cast(b) for b in (self.bq, self.bk, self.bv)),
        )


@dataclass(eq=False)
class ModelWeights:
    """Every weight of a model of ``config``, checked by :meth:`validate` when made. The arrays are the
    caller's own (not copied): a weight changed afterwards is not checked again."""

    config: ModelConfig
    embed: Array  # V × d
    layers: list[LayerWeights]
    final_norm: Array  # d
    lm_head: Array  # d × V

    def __post_init__(self) -> None:
        self.validate()

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of every weight (the embedding's, which :meth:`validate` holds every other to)."""
        return self.embed.dtype

    def validate(self) -> None:
        """Check every array against ``config``: ShapeError for a missing or misshapen one, DTypeError for
        one that is not a numpy floating array of the embedding's dtype (a ``numpy.matrix`` or a masked array
        included: the first multiplies as matrices, the second hides masked NaN from the test), NonFiniteError
        (naming it) for one holding NaN or Inf, ConfigError for a config, layer list or MLP of the wrong
        kind."""
        c = self.config
        if not isinstance(c, ModelConfig):
            raise ConfigError(f"config must be a ModelConfig, got {type(c).__name__}")
        d, f = c.hidden_size, c.intermediate_size
        dtype = getattr(self.embed, "dtype", None)

        def need(arr: Array | None, shape: tuple[int, ...], name: str) -> None:
            if arr is not None and not isinstance(arr, np.ndarray):
                raise DTypeError(f"weight {name} must be a numpy array, got {type(arr).__name__}")
            if isinstance(arr, np.matrix):  # its * is a matrix product and it never reshapes to heads
                raise DTypeError(f"weight {name} must be a numpy array, not a numpy matrix")
            if isinstance(arr, np.ma.MaskedArray):  # its sum skips masked entries: a masked NaN passed
                raise DTypeError(f"weight {name} must be a numpy array, not a masked array")
            if arr is None or tuple(arr.shape) != shape:
                got = None if arr is None else tuple(arr.shape)
                raise ShapeError(f"weight {name} must have shape {shape}, got {got}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise DTypeError(f"weight {name} must be a floating-point array, got dtype {arr.dtype}")
            if arr.dtype != dtype:
                raise DTypeError(f"weight {name} must have the embedding's dtype {dtype}, got {arr.dtype}")
            if not _all_finite(arr):
                raise NonFiniteError(f"weight {name} holds NaN or Inf")

        need(self.embed, (c.vocab_size, d), "embed")
        need(self.final_norm, (d,), "final_norm")
        need(self.lm_head, (d, c.vocab_size), "lm_head")
        if not isinstance(self.layers, list) or not all(isinstance(lw, LayerWeights) for lw in self.layers):
            raise ConfigError("layers must be a list of LayerWeights")
        if len(self.layers) != c.n_layers:
            raise ConfigError(f"config has {c.n_layers} layers, weights have {len(self.layers)}")
        for i, lw in enumerate(self.layers):
            p = f"layers.{i}."
            need(lw.attn_norm, (d,), p + "attn_norm")
            need(lw.mlp_norm, (d,), p + "mlp_norm")
            need(lw.wq, (d, c.q_dim), p + "wq")
            need(lw.wk, (d, c.kv_dim), p + "wk")
            need(lw.wv, (d, c.kv_dim), p + "wv")
            need(lw.wo, (c.q_dim, d), p + "wo")
            if c.qkv_bias:
                need(lw.bq, (c.q_dim,), p + "bq")
                need(lw.bk, (c.kv_dim,), p + "bk")
                need(lw.bv, (c.kv_dim,), p + "bv")
            elif lw.bq is not None or lw.bk is not None or lw.bv is not None:
                raise ConfigError(f"{p}: QKV bias given but config.qkv_bias is False")
            experts: list[DenseMLP]
            if c.is_moe:
                if (
                    not isinstance(lw.mlp, MoEMLP)
                    or not isinstance(lw.mlp.experts, list)
                    or len(lw.mlp.experts) != c.n_experts
                    or not all(isinstance(ex, DenseMLP) for ex in lw.mlp.experts)
                ):
                    raise ConfigError(f"{p}mlp must be a MoEMLP with {c.n_experts} experts")
                need(lw.mlp.router, (d, c.n_experts), p + "mlp.router")
                experts = lw.mlp.experts
            else:
                if not isinstance(lw.mlp, DenseMLP):
                    raise ConfigError(f"{p}mlp must be a DenseMLP for a dense config")
                experts = [lw.mlp]
            for e, ex in enumerate(experts):
                q = p + (f"mlp.experts.{e}." if c.is_moe else "mlp.")
                need(ex.w_gate, (d, f), q + "w_gate")
                need(ex.w_up, (d, f), q + "w_up")
                need(ex.w_down, (f, d), q + "w_down")

    def astype(self, dtype: Any) -> ModelWeights:
        """A copy with every array cast to ``dtype`` (DTypeError unless it names a floating numpy dtype: one
        numpy cannot read, or :meth:`validate`'s naming the first weight). None is refused too (DTypeError,
        nothing copied), as :func:`~scx_ref._checks.float_dtype` and the backends refuse it: numpy reads it
        as float64, so a missing dtype made a float64 copy — neither "unchanged" (the weights themselves are
        that) nor asked for."""
        if dtype is None:
            raise DTypeError("dtype must be a floating numpy dtype, got None (numpy would read float64)")
        try:
            dtype = np.dtype(dtype)
        except (TypeError, ValueError):
            raise DTypeError(f"dtype must be a floating numpy dtype, got {dtype!r:.40}") from None
        return ModelWeights(
            self.config,
            self.embed.astype(dtype),
            [lw.astype(dtype) for lw in self.layers],
            self.final_norm.astype(dtype),
            self.lm_head.astype(dtype),
        )

    def to_dict(self) -> dict[str, Array]:
        """Flat name → array view (names: embed, final_norm, lm_head, layers.{i}.wq, …)."""
        out: dict[str, Array] = {"embed": self.embed, "final_norm": self.final_norm, "lm_head": self.lm_head}
        for i, lw in enumerate(self.layers):
            p = f"layers.{i}."
            for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "bq", "bk", "bv"):
                arr = getattr(lw, name)
                if arr is not None:
                    out[p + name] = arr
            if isinstance(lw.mlp, MoEMLP):
                out[p + "mlp.router"] = lw.mlp.router
                for e, ex in enumerate(lw.mlp.experts):
                    for name in ("w_gate", "w_up", "w_down"):
                        out[p + f"mlp.experts.{e}.{name}"] = getattr(ex, name)
            else:
                for name in ("w_gate", "w_up", "w_down"):
                    out[p + f"mlp.{name}"] = getattr(lw.mlp, name)
        return out

    @classmethod
    def from_dict(cls, config: ModelConfig, d: Mapping[str, Array]) -> ModelWeights:
        """Inverse of :meth:`to_dict` (each value is read with ``numpy.asarray``, the Q/K/V biases too: an
        array is not copied); raises ShapeError/ConfigError on a missing, misshapen or unknown array (a name
        :meth:`to_dict` of this config does not give), ShapeError/DTypeError for a value numpy cannot read as
        an array (a ragged list, a bfloat16 tensor), and :meth:`validate`'s errors."""
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(d, Mapping):
            raise ConfigError(f"weights must be a mapping of names to arrays, got {type(d).__name__}")

        def read(name: str) -> Array:
            try:
                return np.asarray(d[name])
            except ValueError as exc:  # a ragged nested list
                raise ShapeError(f"weight {name} is not an array numpy can read: {exc}") from None
            except (TypeError, RuntimeError) as exc:  # e.g. a bfloat16 tensor, an object refusing __array__
                raise DTypeError(f"weight {name} is not an array numpy can read: {exc}") from None

        def get(name: str) -> Array:
            if name not in d:
                raise ConfigError(f"weight {name!r} missing")
            return read(name)

        layers = []
        for i in range(config.n_layers):
            p = f"layers.{i}."
            mlp: DenseMLP | MoEMLP
            if config.is_moe:
                mlp = MoEMLP(
                    get(p + "mlp.router"),
                    [
                        DenseMLP(*(get(p + f"mlp.experts.{e}.{n}") for n in ("w_gate", "w_up", "w_down")))
                        for e in range(config.n_experts)
                    ],
                )
            else:
                mlp = DenseMLP(*(get(p + f"mlp.{n}") for n in ("w_gate", "w_up", "w_down")))
            bias = [read(p + n) if d.get(p + n) is not None else None for n in ("bq", "bk", "bv")]
            layers.append(
                LayerWeights(
                    get(p + "attn_norm"),
                    get(p + "wq"),
                    get(p + "wk"),
                    get(p + "wv"),
                    get(p + "wo"),
                    get(p + "mlp_norm"),
                    mlp,
                    *bias,
                )
            )
        out = cls(config, get("embed"), layers, get("final_norm"), get("lm_head"))
        unknown = sorted(map(str, set(d) - set(out.to_dict())))
        if unknown:  # another model's weights (more layers, experts) or a misspelt name: never dropped
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ConfigError(f"weight(s) {shown} not in a model of this config ({config.name})")
        return out


def random_weights(
    config: ModelConfig, rng: np.random.Generator, dtype: Any = np.float64, scale: float = 1.0
) -> ModelWeights:
    """Random weights for tests: N(0, scale²/fan_in) matrices, norm gains near 1, embeddings N(0, 1).
    ConfigError for a config that is not a ModelConfig, one with a weight too large for numpy to allocate
    (raised before ``rng`` draws anything), or a scale that is not a finite number, DTypeError for a dtype
    that is not floating.

    ``rng`` is the caller's generator: the library never touches global random state (ConfigError for
    anything else, a seed included: ``np.random.default_rng(seed)`` makes one).
    """
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, got {type(config).__name__}")
    float_dtype(dtype)
    scale = check_real(scale, "scale")
    d, f = config.hidden_size, config.intermediate_size
    shapes = [(config.vocab_size, d), (d, config.q_dim), (d, f), (d, max(config.n_experts, 1))]
    biggest = max(shapes, key=lambda s: s[0] * s[1])
    if biggest[0] * biggest[1] * 8 > np.iinfo(np.intp).max:  # checked before ``rng`` draws anything
        raise ConfigError(f"{config.name}: a weight of shape {biggest} is beyond what numpy can allocate")

    def mat(n_in: int, n_out: int) -> Array:
        out: Array = (rng.standard_normal((n_in, n_out)) * (scale / np.sqrt(n_in))).astype(dtype)
        return out

    def gain() -> Array:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(dtype)

    def dense() -> DenseMLP:
        return DenseMLP(mat(d, f), mat(d, f), mat(f, d))

    layers = []
    for _ in range(config.n_layers):
        mlp: DenseMLP | MoEMLP = (
            MoEMLP(mat(d, config.n_experts), [dense() for _ in range(config.n_experts)])
            if config.is_moe
            else dense()
        )
        bias: list[Array | None] = [None, None, None]
        if config.qkv_bias:
            bias = [
                (0.1 * rng.standard_normal(n)).astype(dtype)
                for n in (config.q_dim, config.kv_dim, config.kv_dim)
            ]
        layers.append(
            LayerWeights(
                gain(),
                mat(d, config.q_dim),
                mat(d, config.kv_dim),
                mat(d, config.kv_dim),
                mat(config.q_dim, d),
                gain(),
                mlp,
                *bias,
            )
        )
    embed = rng.standard_normal((config.vocab_size, d)).astype(dtype)
    return ModelWeights(config, embed, layers, gain(), mat(d, config.vocab_size))

"""Shared Hypothesis strategies for every property suite of scx_ref.

Import from here; do not redefine these in test modules. Every strategy is deterministic given
Hypothesis's draws (random data comes from ``numpy.random.default_rng(seed)`` with a drawn seed,
never from global random state) and covers the edge cases the identities must survive:
one row (n = 1), no decoys (r = 0), a single head, GQA ratios 1/2/3/4 (3: SmolLM2's 9 query heads on 3
KV heads, the one ratio of a model the project serves that is not a power of two).

Main strategies
---------------
* :func:`dtypes` – float32 / float64 (or a chosen subset).
* :func:`torch_dtypes` – the torch backend's dtypes: float64, float32, bfloat16, float16 (or a subset).
* :func:`perms` – a permutation of 0..n-1 as an int64 array (n an int or a strategy).
* :func:`sized_perms` – ``(n, perm)`` with n drawn in a range.
* :func:`row_indices` – a row index for a gather: distinct rows (injective) in two draws of three, the
  others any rows, repeats allowed.
* :func:`float_matrices` – finite float arrays of a given shape with bounded entries.
* :func:`gaussian_arrays` – N(0, scale²) arrays from a drawn seed ("generic" data, no ties).
* :func:`head_permutations` – a :class:`~scx_ref.transforms.HeadPermutation` for H_kv heads of d_h.
* :func:`attention_shapes` – ``(n_kv_heads, group_size, head_dim)`` over GQA ratios.
* :func:`token_ids` – 1-D int64 token ids below ``vocab``.
* :func:`decoy_counts` – r in 0..8.
* :func:`model_configs` / :func:`model_weights` – tiny :class:`~scx_ref.config.ModelConfig` (dense,
  MoE, QKV bias, GQA) and random weights for them.
* :func:`protocol_cases` / :func:`protocol_edge_cases` – an end-to-end protocol run (model, SCX config,
  prompt, steps, keys); the edge ones pin a one-token prompt, no decoys and one KV head, often with the
  run filling the context to ``max_length``.
* :func:`seeds` – a seed for ``numpy.random.default_rng``.
* :func:`key_labels` / :func:`master_secrets` / :func:`nonces` – the key schedule's inputs: labels of 1–4
  parts (text, empty included, and integers past 2⁶⁴), 32-byte master secrets (never the refused all-zero
  one) and 16-byte nonces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scx_ref.config import ModelConfig
from scx_ref.keys import MASTER_SECRET_BYTES, NONCE_BYTES, KeySchedule
from scx_ref.protocol.config import SCXConfig
from scx_ref.transforms import HeadPermutation
from scx_ref.weights import ModelWeights, random_weights

#: Settings for reachability checks (``hypothesis.find``: the first example of a strategy meeting a
#: condition): a fixed seed, no database, no shrinking, 2000 tries — a strategy that cannot draw an edge
#: case fails with NoSuchExample.
REACH = settings(
    database=None,
    max_examples=2000,
    derandomize=True,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)

__all__ = [
    "FloatArray",
    "ProtocolCase",
    "attention_shapes",
    "decoy_counts",
    "dtypes",
    "float_matrices",
    "gaussian_arrays",
    "head_permutations",
    "key_labels",
    "master_secrets",
    "model_configs",
    "model_weights",
    "nonces",
    "perms",
    "protocol_cases",
    "protocol_edge_cases",
    "protocol_model_configs",
    "row_counts",
    "row_indices",
    "scx_configs",
    "seeds",
    "sized_perms",
    "token_ids",
    "torch_dtypes",
]

IntOrStrategy = int | st.SearchStrategy[int]
#: What :func:`float_matrices` and :func:`gaussian_arrays` draw, and what the numpy transforms return for
#: them (annotations of their results: the transforms' ``ops`` default leaves the array type open to mypy).
FloatArray = npt.NDArray[np.floating[Any]]


def _ints(value: IntOrStrategy) -> st.SearchStrategy[int]:
    return value if isinstance(value, st.SearchStrategy) else st.just(int(value))


def seeds() -> st.SearchStrategy[int]:
    """A seed for ``np.random.default_rng`` (the only way tests make random data)."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def key_labels() -> st.SearchStrategy[tuple[str | int, ...]]:
    """A key-schedule label: a tuple of 1–4 parts, each a short text (the empty one included) or an integer
    in 0..2⁷⁰ (past 64 bits, for the label encoding's length prefix)."""
    part = st.one_of(st.text(max_size=6), st.integers(min_value=0, max_value=2**70))
    return st.lists(part, min_size=1, max_size=4).map(tuple)


def master_secrets() -> st.SearchStrategy[bytes]:
    """A 32-byte master secret; the all-zero secret (refused by :class:`KeySchedule`) is never drawn: it is
    mapped to 01 00 … 00 (Hypothesis's favourite draw stays usable rather than being thrown away)."""
    raw = st.binary(min_size=MASTER_SECRET_BYTES, max_size=MASTER_SECRET_BYTES)
    return raw.map(lambda b: b if any(b) else b"\x01" + b[1:])


def nonces() -> st.SearchStrategy[bytes]:
    """A 16-byte request nonce (any bytes, all-zero included)."""
    return st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)


def dtypes(choices: Sequence[Any] = (np.float32, np.float64)) -> st.SearchStrategy[np.dtype[Any]]:
    """A floating dtype among ``choices`` (default float32 and float64)."""
    return st.sampled_from([np.dtype(c) for c in choices])


def torch_dtypes(
    choices: Sequence[str] = ("float64", "float32", "bfloat16", "float16"),
) -> st.SearchStrategy[Any]:
    """A torch dtype among ``choices`` (names; default every dtype the torch backend runs in: float64,
    float32, bfloat16 and float16). torch is imported only when this is called."""
    import torch

    return st.sampled_from([getattr(torch, c) for c in choices])


def row_counts(min_n: int = 1, max_n: int = 12) -> st.SearchStrategy[int]:
    """A number of rows (tokens); the default range includes the edge case n = 1."""
    return st.integers(min_value=min_n, max_value=max_n)


def decoy_counts(max_r: int = 8) -> st.SearchStrategy[int]:
    """A number of decoy rows r in 0..max_r (r = 0, no decoys, included)."""
    return st.integers(min_value=0, max_value=max_r)


@st.composite
def perms(draw: st.DrawFn, n: IntOrStrategy) -> npt.NDArray[np.int64]:
    """A permutation of 0..n-1 as an int64 array (n = 0 gives an empty array)."""
    size = draw(_ints(n))
    return np.asarray(draw(st.permutations(list(range(size)))), dtype=np.int64).reshape(size)


@st.composite
def sized_perms(draw: st.DrawFn, min_n: int = 0, max_n: int = 12) -> tuple[int, npt.NDArray[np.int64]]:
    """``(n, perm)``: n drawn in [min_n, max_n] and a permutation of 0..n-1."""
    n = draw(st.integers(min_value=min_n, max_value=max_n))
    return n, draw(perms(n))


@st.composite
def row_indices(draw: st.DrawFn, n: IntOrStrategy, max_len: int | None = None) -> npt.NDArray[np.int64]:
    """A 1-D int64 index into the rows of an n-row array (for gathers: ``take_rows``, ``rows_finite``, …) of
    length 0..max_len (default 2n). Two draws in three are injective — distinct rows in any order: the first
    k rows of a permutation of 0..n-1, k = min(n, max_len) (a full permutation where max_len allows) in
    half of them, otherwise k = 0 (empty) to min(n, max_len) — and the others any rows, repeats allowed
    (and, past one row, usually present), so that of the indices of two or more rows about half are
    injective and half repeat a row. n = 0 gives the empty index."""
    size = draw(_ints(n))
    longest = 2 * size if max_len is None else max_len
    if size == 0:
        rows: list[int] = []
    elif draw(st.sampled_from(["distinct", "distinct", "any"])) == "distinct":
        most = min(size, longest)
        k = draw(st.just(most) | st.integers(0, most))
        rows = draw(st.permutations(list(range(size))))[:k]
    else:
        rows = draw(st.lists(st.integers(0, size - 1), max_size=longest))
    return np.asarray(rows, dtype=np.int64).reshape(len(rows))


@st.composite
def float_matrices(
    draw: st.DrawFn,
    rows: IntOrStrategy,
    cols: IntOrStrategy | None = None,
    dtype: Any = np.float64,
    *,
    bound: float = 4.0,
    extra_dims: Sequence[int] = (),
) -> FloatArray:
    """A finite array of shape (rows, cols, *extra_dims) (or (rows,) when cols is None), entries in
    [−bound, bound] chosen by Hypothesis (so it can shrink and hit zeros, ties and extremes)."""
    shape: tuple[int, ...] = (draw(_ints(rows)),)
    if cols is not None:
        shape += (draw(_ints(cols)),)
    shape += tuple(extra_dims)
    dt = np.dtype(dtype)
    width = 8 * dt.itemsize
    elements = st.floats(
        min_value=-bound,
        max_value=bound,
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
        width=width,
    )
    return draw(hnp.arrays(dt, shape, elements=elements))


@st.composite
def gaussian_arrays(
    draw: st.DrawFn, shape: tuple[int, ...], dtype: Any = np.float64, scale: float = 1.0
) -> FloatArray:
    """N(0, scale²) array of ``shape`` from ``default_rng(drawn seed)``: generic data (no ties),
    for identities whose *failure* must be visible, e.g. negative controls."""
    rng = np.random.default_rng(draw(seeds()))
    return (scale * rng.standard_normal(shape)).astype(dtype)


@st.composite
def head_permutations(draw: st.DrawFn, n_kv_heads: IntOrStrategy, head_dim: IntOrStrategy) -> HeadPermutation:
    """A head-structured permutation P (T3): a random order of the KV groups and one coordinate
    permutation σ_g per group."""
    h_kv = draw(_ints(n_kv_heads))
    d_h = draw(_ints(head_dim))
    order = draw(perms(h_kv))
    sigmas = np.stack([draw(perms(d_h)) for _ in range(h_kv)]).reshape(h_kv, d_h)
    return HeadPermutation(order, sigmas)


def attention_shapes(
    max_kv_heads: int = 3,
    gqa_ratios: Sequence[int] = (1, 2, 3, 4),
    head_dims: Sequence[int] = (1, 2, 4, 6, 8),
) -> st.SearchStrategy[tuple[int, int, int]]:
    """``(n_kv_heads, group_size, head_dim)``: H = n_kv_heads·group_size query heads (one head included),
    head_dim 1 included by default (attention and T3 need no even head_dim; only RoPE does, so a model's
    head_dim comes from :func:`model_configs`)."""
    return st.tuples(
        st.integers(1, max_kv_heads), st.sampled_from(list(gqa_ratios)), st.sampled_from(list(head_dims))
    )


@st.composite
def token_ids(
    draw: st.DrawFn, vocab: IntOrStrategy, min_len: int = 1, max_len: int = 8
) -> npt.NDArray[np.int64]:
    """A 1-D int64 array of token ids in [0, vocab) of length in [min_len, max_len]."""
    v = draw(_ints(vocab))
    ids = draw(st.lists(st.integers(0, v - 1), min_size=min_len, max_size=max_len))
    return np.asarray(ids, dtype=np.int64).reshape(len(ids))


@st.composite
def model_configs(
    draw: st.DrawFn,
    max_layers: int = 2,
    moe: bool | None = None,
    qkv_bias: bool | None = None,
    gqa_ratios: Sequence[int] = (1, 2, 3, 4),
    max_kv_heads: int = 2,
    head_dims: Sequence[int] = (2, 4, 6, 8),
    max_positions: int = 64,
) -> ModelConfig:
    """A tiny, valid ModelConfig: LLaMA-like (dense), Mixtral-like (``moe``) or Qwen2-like (``qkv_bias``),
    of ``max_positions`` positions (RoPE refuses a position past them).

    ``moe`` / ``qkv_bias`` = None lets Hypothesis choose. GQA ratio H / H_kv is drawn from
    ``gqa_ratios``; a single KV head (and, with ratio 1, a single head) is included.
    """
    is_moe = draw(st.booleans()) if moe is None else moe
    bias = draw(st.booleans()) if qkv_bias is None else qkv_bias
    n_kv = draw(st.integers(1, max_kv_heads))
    ratio = draw(st.sampled_from(list(gqa_ratios)))
    n_experts = draw(st.integers(2, 4)) if is_moe else 0
    top_k = draw(st.integers(1, n_experts)) if is_moe else 0
    return ModelConfig(
        vocab_size=draw(st.integers(4, 32)),
        hidden_size=draw(st.sampled_from([4, 8, 12, 16])),
        n_layers=draw(st.integers(1, max_layers)),
        n_heads=n_kv * ratio,
        n_kv_heads=n_kv,
        head_dim=draw(st.sampled_from(list(head_dims))),
        intermediate_size=draw(st.integers(2, 16)),
        rms_eps=draw(st.sampled_from([1e-6, 1e-5, 0.0])),
        rope_theta=draw(st.sampled_from([100.0, 10000.0, 1e6])),
        n_experts=n_experts,
        top_k=top_k,
        qkv_bias=bias,
        max_positions=max_positions,
        name="hypothesis",
    )


@st.composite
def model_weights(
    draw: st.DrawFn,
    config: ModelConfig | st.SearchStrategy[ModelConfig] | None = None,
    dtype: Any = np.float64,
) -> ModelWeights:
    """Random weights (``random_weights`` with a drawn seed) for a drawn or given config."""
    if config is None:
        cfg = draw(model_configs())
    elif isinstance(config, ModelConfig):
        cfg = config
    else:
        cfg = draw(config)
    return random_weights(cfg, np.random.default_rng(draw(seeds())), dtype=dtype)


# -- protocol engine (issue 4) ------------------------------------------------------------------------


@st.composite
def protocol_model_configs(
    draw: st.DrawFn,
    min_layers: int = 1,
    max_layers: int = 4,
    moe: bool | None = None,
    qkv_bias: bool | None = None,
    max_positions: int = 128,
) -> ModelConfig:
    """A tiny model for end-to-end protocol runs: 1–4 layers, hidden 16–32, vocab ≤ 64, GQA ratio 1/2/3/4
    (one or two KV heads), dense or MoE (2–4 experts, top-k ≥ 1), with or without the Qwen2 QKV bias.
    ``max_positions`` (default 128) leaves room for a 64-token prompt plus 8 generated tokens."""
    is_moe = draw(st.booleans()) if moe is None else moe
    bias = draw(st.booleans()) if qkv_bias is None else qkv_bias
    n_kv = draw(st.integers(1, 2))
    ratio = draw(st.sampled_from([1, 2, 3, 4]))
    n_experts = draw(st.integers(2, 4)) if is_moe else 0
    top_k = draw(st.integers(1, n_experts)) if is_moe else 0
    return ModelConfig(
        vocab_size=draw(st.integers(8, 64)),
        hidden_size=draw(st.sampled_from([16, 24, 32])),
        n_layers=draw(st.integers(min_layers, max_layers)),
        n_heads=n_kv * ratio,
        n_kv_heads=n_kv,
        head_dim=draw(st.sampled_from([2, 4, 8])),
        intermediate_size=draw(st.integers(4, 48)),
        rms_eps=draw(st.sampled_from([1e-6, 1e-5])),
        rope_theta=draw(st.sampled_from([100.0, 10000.0])),
        n_experts=n_experts,
        top_k=top_k,
        qkv_bias=bias,
        max_positions=max_positions,
        name="hypothesis-protocol",
    )


@st.composite
def scx_configs(draw: st.DrawFn, max_length: int = 128, max_r: int = 8) -> SCXConfig:
    """An :class:`~scx_ref.protocol.SCXConfig` over every level, r1/r2/r_lock in 0..max_r (r_lock may
    default to r1), guard sizes l_s ∈ {1, 2, 4} (4: every block of a ≤ 4-block model is a guard, no key
    sharing) and l_e ∈ {1, 2}, guard FFN clear or blinded, the guard blocks' attention on the server or the
    client (with server attention, a step's first-guard attention on either side), a step's W_o and LM
    head on the client or (blinded) on the server, calibration or Gaussian decoys, and a Laplace scale
    β ∈ {0.5, 5} (the paper's s = 5)."""
    attention: Literal["server", "client"] = draw(st.sampled_from(["server", "client"]))
    return SCXConfig(
        level=draw(st.sampled_from(["permute", "paper", "blind"])),
        r1=draw(decoy_counts(max_r)),
        r2=draw(decoy_counts(max_r)),
        r_lock=draw(st.none() | decoy_counts(max_r)),
        l_s=draw(st.sampled_from([1, 2, 4])),
        l_e=draw(st.integers(1, 2)),
        attention=attention,
        gen_attention=draw(st.sampled_from(["client", "server"])) if attention == "server" else "client",
        gen_linear=draw(st.sampled_from(["client", "server"])),
        beta=draw(st.sampled_from([0.5, 5.0])),
        guard_ffn=draw(st.sampled_from(["clear", "blinded"])),
        decoys=draw(st.sampled_from(["calibration", "gaussian"])),
        max_length=max_length,
    )


@dataclass(frozen=True)
class ProtocolCase:
    """One end-to-end protocol run: a model (weights from ``weight_seed``), an SCX config, a prompt,
    how many tokens to generate, and the client's key schedule (master secret and nonce from
    ``key_seed``, so a failing example replays exactly). Its repr stays short (no weight arrays)."""

    model: ModelConfig
    weight_seed: int
    scx: SCXConfig
    ids: npt.NDArray[np.int64]
    n_new: int
    key_seed: int

    @property
    def weights(self) -> ModelWeights:
        return random_weights(self.model, np.random.default_rng(self.weight_seed), dtype=np.float64)

    def keys(self) -> KeySchedule:
        """The client's key schedule (deterministic in ``key_seed``)."""
        rng = np.random.default_rng(self.key_seed)
        return KeySchedule(rng.bytes(MASTER_SECRET_BYTES), rng.bytes(NONCE_BYTES))


@st.composite
def protocol_cases(draw: st.DrawFn, max_prompt: int = 64, max_new: int = 8) -> ProtocolCase:
    """A :class:`ProtocolCase`: a :func:`protocol_model_configs` model (float64 weights), an
    :func:`scx_configs` config, a prompt of 1..max_prompt tokens and 1..max_new tokens to generate
    (prompt + generated fits in ``max_length``)."""
    n_new = draw(st.integers(1, max_new))
    cfg = draw(protocol_model_configs(max_positions=max_prompt + max_new + 8))
    weight_seed = draw(seeds())
    ids = draw(token_ids(cfg.vocab_size, min_len=1, max_len=max_prompt))
    scx = draw(scx_configs(max_length=cfg.max_positions))
    return ProtocolCase(cfg, weight_seed, scx, ids, n_new, draw(seeds()))


@st.composite
def protocol_edge_cases(draw: st.DrawFn, max_new: int = 4) -> ProtocolCase:
    """A :class:`ProtocolCase` pinned at the edges that :func:`protocol_cases` reaches together only by
    chance (about one case in fifty, so rarely in a run of the default profile): a one-token prompt
    (n = 1), no decoys anywhere (r1 = r2 = 0, ``r_lock`` 0 or defaulting to r1) and a single KV head (GQA
    ratio 1 to 4: one head in all, or one KV head shared by 2, 3 or 4 query heads); dense or MoE, with or
    without the QKV bias, at every level, 1..max_new tokens to generate. In half of them the run fills the
    context: ``max_length`` = ``max_positions`` = 1 + n_new, so the last generation step is the model's
    last position (and one more is refused)."""
    n_new = draw(st.integers(1, max_new))
    room = 1 + n_new + (0 if draw(st.booleans()) else 8)
    cfg = draw(protocol_model_configs(max_positions=room))
    cfg = replace(cfg, n_heads=cfg.group_size, n_kv_heads=1)
    weight_seed = draw(seeds())
    ids = draw(token_ids(cfg.vocab_size, min_len=1, max_len=1))
    scx = replace(draw(scx_configs(max_length=room)), r1=0, r2=0, r_lock=draw(st.sampled_from([None, 0])))
    return ProtocolCase(cfg, weight_seed, scx, ids, n_new, draw(seeds()))

"""Bad input raises a clear error of one family (SCXError subclasses), never a bare numpy error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref import ops
from scx_ref.config import ModelConfig
from scx_ref.errors import (
    ConfigError,
    DTypeError,
    KeyScheduleError,
    NonFiniteError,
    PermutationError,
    SCXError,
    ShapeError,
    VocabularyError,
)
from scx_ref.keys import KeySchedule
from scx_ref.reference import ReferenceModel
from scx_ref.transforms import (
    HeadPermutation,
    blind,
    blinding_correction,
    decode_rows,
    encode_rows,
    inverse_permutation,
    laplace_noise,
    permute_rows,
    reorder_cache,
    strip_decoys,
    unblind,
    unpermute_rows,
    with_decoys,
)
from scx_ref.weights import ModelWeights, random_weights

CFG = ModelConfig(
    vocab_size=10, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, intermediate_size=6
)
X = np.arange(12.0).reshape(4, 3)


def test_every_error_is_an_scx_error_and_a_value_error() -> None:
    for cls in (
        ConfigError,
        DTypeError,
        KeyScheduleError,
        NonFiniteError,
        PermutationError,
        ShapeError,
        VocabularyError,
    ):
        assert issubclass(cls, SCXError) and issubclass(cls, ValueError)


@pytest.mark.parametrize(
    ("master", "nonce"), [(bytes(31), bytes(16)), (bytes(32), bytes(8)), (bytearray(40), bytes(16))]
)
def test_wrong_secret_or_nonce_length(master: bytes, nonce: bytes) -> None:
    with pytest.raises(KeyScheduleError, match="exactly"):
        KeySchedule(master, nonce)


@pytest.mark.parametrize(
    "perm",
    [
        [0, 0, 1, 2],  # duplicate
        [0, 1, 2, 4],  # out of range
        [-1, 0, 1, 2],  # negative
        [0, 1, 2],  # wrong length
        [0, 1, 2, 3, 4],  # wrong length
        np.array([0.0, 1.0, 2.0, 3.0]),  # float dtype, even though the values form a permutation
        [[0, 1], [2, 3]],  # not 1-D
        ["0", "1", "2", "3"],  # strings
    ],
)
def test_not_a_permutation(perm: Any) -> None:
    with pytest.raises(PermutationError):
        permute_rows(X, perm)
    with pytest.raises(PermutationError):
        unpermute_rows(X, perm)
    with pytest.raises(PermutationError):
        reorder_cache(X, X, perm)


def test_not_a_permutation_elsewhere() -> None:
    with pytest.raises(PermutationError):
        inverse_permutation([1, 1])
    with pytest.raises(PermutationError):
        encode_rows(X, np.zeros((1, 3)), [0, 1, 2, 3])  # 5 rows need a permutation of 5
    with pytest.raises(PermutationError):
        decode_rows(X, [0, 1, 2, 2], 3)
    with pytest.raises(PermutationError):
        HeadPermutation(np.array([0, 0]), np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(PermutationError):
        HeadPermutation(np.array([0]), np.array([[0, 1, 1, 3]]))


def test_wrong_shapes() -> None:
    with pytest.raises(ShapeError):
        with_decoys(X, np.zeros((2, 4)))  # width mismatch
    with pytest.raises(ShapeError):
        with_decoys(X, np.zeros(3))  # 1-D decoys
    with pytest.raises(ShapeError):
        strip_decoys(X, 5)
    with pytest.raises(ShapeError):
        strip_decoys(X, -1)
    with pytest.raises(ShapeError):
        reorder_cache(np.zeros((3, 1, 2)), np.zeros((4, 1, 2)), [0, 1, 2])
    with pytest.raises(ShapeError):
        blind(X, np.zeros((4, 2)))
    with pytest.raises(ShapeError):
        blinding_correction(np.zeros((4, 3)), np.zeros((2, 5)))
    with pytest.raises(ShapeError):
        blinding_correction(np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(ShapeError):
        unblind(np.zeros((4, 5)), np.zeros((4, 4)))
    p = HeadPermutation.identity(2, 4)
    with pytest.raises(ShapeError):
        p.apply(np.zeros((3, 2, 5)))  # wrong head dim
    with pytest.raises(ShapeError):
        p.apply(np.zeros((3, 2, 4)), group_size=2)  # needs 4 query heads
    with pytest.raises(ShapeError):
        p.invert(np.zeros((3, 8)))  # not rows × heads × d_h
    with pytest.raises(ShapeError):
        HeadPermutation(np.array([0, 1]), np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ShapeError):
        ops.attention(np.zeros((2, 3, 4)), np.zeros((2, 2, 4)), np.zeros((2, 2, 4)))  # 3 heads, 2 KV heads
    with pytest.raises(ShapeError):
        ops.attention(np.zeros((2, 2, 4)), np.zeros((2, 2, 4)), np.zeros((3, 2, 4)))  # k, v rows differ
    with pytest.raises(ShapeError):
        ops.apply_rope(np.zeros((2, 4)), np.arange(2), 10000.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(bad: float) -> None:
    y = X.copy()
    y[1, 2] = bad
    with pytest.raises(NonFiniteError):
        permute_rows(y, [0, 1, 2, 3])
    with pytest.raises(NonFiniteError):
        with_decoys(X, y[1:2])
    with pytest.raises(NonFiniteError):
        blind(y, np.zeros_like(y))
    with pytest.raises(NonFiniteError):
        blind(X, y)
    with pytest.raises(NonFiniteError):
        reorder_cache(y, X, [0, 1, 2, 3])
    with pytest.raises(SCXError):
        laplace_noise((2,), bad, np.random.default_rng(0))


def test_wrong_dtypes() -> None:
    with pytest.raises(DTypeError):
        permute_rows(np.arange(4), [0, 1, 2, 3])  # integer rows
    with pytest.raises(DTypeError):
        blind(np.zeros(3, dtype=np.complex128), np.zeros(3))
    with pytest.raises(SCXError):
        laplace_noise((2,), -1.0, np.random.default_rng(0))


def test_token_ids_outside_vocabulary() -> None:
    model = ReferenceModel(random_weights(CFG, np.random.default_rng(0)))
    for ids in ([0, 10], [-1, 2], [3, 2**40]):
        with pytest.raises(VocabularyError, match="token ids"):
            model.prefill(np.asarray(ids))
    with pytest.raises(VocabularyError):
        model.prefill(np.array([1.0, 2.0]))  # float ids
    with pytest.raises(VocabularyError):
        model.prefill(np.array([[1, 2]]))  # 2-D ids
    _, cache = model.prefill(np.array([1, 2]))
    with pytest.raises(VocabularyError):
        model.decode(10, cache)


@pytest.mark.parametrize(
    "changes",
    [
        {"n_heads": 3, "n_kv_heads": 2},  # n_heads not a multiple of n_kv_heads
        {"head_dim": 5},  # odd head_dim (RoPE pairs)
        {"n_experts": 2, "top_k": 3},  # top_k > n_experts
        {"n_experts": 2, "top_k": 0},
        {"n_experts": -1},
        {"hidden_size": 0},
        {"n_layers": -2},
        {"vocab_size": 2.5},
        {"rms_eps": -1e-5},
        {"rope_theta": 0.0},
        {"rope_theta": float("nan")},
    ],
)
def test_bad_model_config(changes: dict[str, Any]) -> None:
    base = CFG.to_dict()
    base.update(changes)
    with pytest.raises(ConfigError):
        ModelConfig(**base)


def test_misshapen_weights() -> None:
    good = random_weights(CFG, np.random.default_rng(0)).to_dict()
    for name, shape in (
        ("embed", (9, 8)),
        ("layers.0.wq", (8, 4)),
        ("layers.0.wk", (8, 8)),
        ("layers.0.mlp.w_down", (8, 6)),
        ("lm_head", (10, 8)),
        ("final_norm", (7,)),
    ):
        bad = dict(good)
        bad[name] = np.zeros(shape)
        with pytest.raises(ShapeError, match=name):
            ModelWeights.from_dict(CFG, bad)
    missing = dict(good)
    del missing["layers.0.wv"]
    with pytest.raises(ConfigError, match="missing"):
        ModelWeights.from_dict(CFG, missing)
    with_bias = dict(good, **{"layers.0.bq": np.zeros(8)})
    with pytest.raises(ConfigError, match="bias"):
        ModelWeights.from_dict(CFG, with_bias)
    moe_cfg = ModelConfig(**{**CFG.to_dict(), "n_experts": 2, "top_k": 1})
    with pytest.raises(ConfigError):
        ModelWeights.from_dict(moe_cfg, good)  # dense weights for an MoE config
    fewer_layers = ModelConfig(**{**CFG.to_dict(), "n_layers": 2})
    with pytest.raises(ConfigError):
        ModelWeights(
            fewer_layers,
            *(
                getattr(random_weights(CFG, np.random.default_rng(1)), f)
                for f in ("embed", "layers", "final_norm", "lm_head")
            ),
        )


def test_sequence_too_long() -> None:
    cfg = ModelConfig(**{**CFG.to_dict(), "max_positions": 3})
    model = ReferenceModel(random_weights(cfg, np.random.default_rng(0)))
    with pytest.raises(SCXError, match="max_positions"):
        model.prefill(np.array([1, 2, 3, 4]))

"""The reply verifier never blames an honest server (DESIGN §5.5), at the edges of its inputs: rows whose
float64 sum of squares underflows or overflows, one-token prompts, prompts at the model's length, no
decoys and many, one KV head and wide GQA, long generations, sampled tokens, every preset.

A Freivalds check's tolerance τ_i = ‖x̂_i‖·a + ‖y_i‖·b scales with the rows' norms, which the client took
from float64 sums of squares: for a row whose entries are all below ~1e-154 that sum underflows to 0, so
τ was 0 while the honest residual (u times the row's size) was not — refused 1e76–1e130 times over: an MoE
expert's SwiGLU row scaled by a routing weight near e⁻⁵⁰⁰ (router logits far apart, level permute, float64),
an O-stage row of tiny attention outputs, a traced MLP's SwiGLU row of tiny activations. Above ~1.3e154
the sum overflowed: τ = ∞, a verdict that is not finite, refused. A failing verdict is now judged again
with norms taken at a power-of-two scale (``row_norms``): the same τ, evaluated exactly; a tampered reply
on such rows is still refused.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import IntegrityError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.presets import PRESETS
from scx_ref.protocol.verify import SessionVerifier, SketchCache
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import DenseMLP, ModelWeights
from tests.tiny import tiny_weights

PAPER_GEN: dict[str, Any] = {
    "gen_attention": "server",
    "gen_linear": "server",
    "guard_ffn": "clear",
    "last_ffn": "paper",
}


def _experts(w: ModelWeights, layer: int) -> list[DenseMLP]:
    mlp = w.layers[layer].mlp
    return list(mlp.experts) if not isinstance(mlp, DenseMLP) else [mlp]


def _scaled(w: ModelWeights, *, mats: float = 1.0, wv: float = 1.0, gains: float = 1.0) -> ModelWeights:
    """A copy of ``w`` with every projection (router, experts, LM head) times ``mats``, W_v times ``wv``
    and every RMSNorm gain times ``gains``."""
    w = copy.deepcopy(w)
    for i, layer in enumerate(w.layers):
        layer.wq, layer.wk, layer.wo = layer.wq * mats, layer.wk * mats, layer.wo * mats
        layer.wv = layer.wv * mats * wv
        layer.attn_norm, layer.mlp_norm = layer.attn_norm * gains, layer.mlp_norm * gains
        if not isinstance(layer.mlp, DenseMLP):
            layer.mlp.router = layer.mlp.router * mats
        for e in _experts(w, i):
            e.w_gate, e.w_up, e.w_down = e.w_gate * mats, e.w_up * mats, e.w_down * mats
    w.lm_head, w.final_norm = w.lm_head * mats, w.final_norm * gains
    w.validate()
    return w


def _honest_run(
    w: ModelWeights, dtype: Any, cfg: SCXConfig, ids: np.ndarray[Any, Any], steps: int, seed: int
) -> tuple[list[np.ndarray[Any, Any]], float]:
    """An honest in-process server's prefill and ``steps`` greedy decode steps (every reply verified): the
    logits of each, and the client's largest |residual|/τ."""
    b = NumpyBackend(w, dtype)
    link = LocalTransport(Server(b))
    client: Client[Any] = Client(b, KeySchedule(bytes([seed]) * 32, bytes([seed ^ 0x5A]) * 16), cfg)
    outs = [np.asarray(client.prefill(ids, link), dtype=np.float64)]
    for _ in range(steps):
        token = int(np.argmax(np.reshape(outs[-1], (-1, w.config.vocab_size))[-1]))
        outs.append(np.asarray(client.decode(token, link), dtype=np.float64))
    return outs, client.verify_worst


def _reference(w: ModelWeights, ids: np.ndarray[Any, Any], outs: list[np.ndarray[Any, Any]]) -> float:
    """The largest |SCX − plaintext| of the run's logits (the same tokens fed) relative to the plaintext's
    largest |logit|."""
    ref = ReferenceModel(w)
    want, cache = ref.prefill(ids)
    gaps = [float(np.abs(outs[0] - want).max() / np.abs(want).max())]
    for prev, got in itertools.pairwise(outs):
        want = ref.decode(int(np.argmax(np.reshape(prev, (-1, w.config.vocab_size))[-1])), cache)
        gaps.append(float(np.abs(np.reshape(got, -1) - np.reshape(want, -1)).max() / np.abs(want).max()))
    return max(gaps)


# -- rows whose sum of squares underflows: honest replies accepted, the answer the plaintext model's ----


@pytest.mark.parametrize("seed", [20, 21, 23])
def test_moe_expert_row_scaled_by_a_vanishing_routing_weight(kernels_on: bool, seed: int) -> None:
    """Weights ×1e3 (float64, level permute): the router's logits lie hundreds apart, a top-2 expert's
    weight is ~e⁻⁵⁰⁰ and its weighted SwiGLU row, sent to the blinded guard FFN's down map, ~1e-220 — an
    honest reply on it was refused (gen_ffn_down, |residual| = 1e56–1e100 × τ)."""
    w = _scaled(tiny_weights(seed, moe=True), mats=1e3)
    ids = np.random.default_rng(seed).integers(0, 32, 9)
    outs, worst = _honest_run(w, np.float64, SCXConfig(level="permute", r1=2, r2=2), ids, 3, seed)
    assert worst <= 0.25
    assert _reference(w, ids, outs) <= 1e-9


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("level", ["permute", "paper"])
def test_o_stage_rows_of_tiny_attention_outputs(kernels_on: bool, moe: bool, level: str) -> None:
    """W_v ×1e-200 (float64): the attention outputs the O stage sends are ~1e-200 (unblinded at levels
    permute and paper) — an honest W_o reply was refused (|residual| = 1e93 × τ)."""
    w = _scaled(tiny_weights(40, moe=moe), wv=1e-200)
    ids = np.random.default_rng(40).integers(0, 32, 9)
    outs, worst = _honest_run(w, np.float64, SCXConfig(level=level, r1=2, r2=2), ids, 3, 40)  # type: ignore[arg-type]
    assert worst <= 0.25
    assert _reference(w, ids, outs) <= 1e-9


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("extra", [{}, PAPER_GEN], ids=["default", "papergen"])
def test_traced_mlp_of_tiny_activations(kernels_on: bool, moe: bool, extra: dict[str, Any]) -> None:
    """RMSNorm gains ×1e-100 (float64): the normalized rows are ~1e-100 and the traced MLP's SwiGLU rows
    ~1e-200 — the honest down projection was refused at the prefill's ``ffn`` stage (dense: the fused and
    the composed check; MoE: the experts' weighted sum) and at ``gen_ffn``."""
    w = _scaled(tiny_weights(41, moe=moe), gains=1e-100)
    ids = np.random.default_rng(41).integers(0, 32, 9)
    outs, worst = _honest_run(w, np.float64, SCXConfig(level="permute", r1=2, r2=2, **extra), ids, 3, 41)
    assert worst <= 0.25
    assert _reference(w, ids, outs) <= 1e-9


# -- the linear check itself on such rows: honest accepted, tampered refused ---------------------------


def _verifier(b: NumpyBackend) -> SessionVerifier[Any]:
    keys = KeySchedule(bytes([3]) * 32, bytes([4]) * 16)
    return SessionVerifier(b, RequestKeys(keys, b.config), SketchCache(b, keys))


@pytest.mark.parametrize("scale", [1e-300, 1e-250, 1e-200, 1e-160, 1.0, 1e160, 1e200, 1e250])
@pytest.mark.parametrize("rows", [1, 6])
def test_linear_check_at_any_scale_accepts_the_honest_product_and_refuses_a_change(
    kernels_on: bool, scale: float, rows: int
) -> None:
    """The O stage's check on rows of every size float64 holds: the honest product x·W_o passes; one entry
    changed by 3 % of the reply's largest, a NaN or an infinity is refused — the re-judgment evaluates the
    same τ, it does not widen it."""
    b = NumpyBackend(tiny_weights(7), np.float64)
    x = np.random.default_rng(1).standard_normal((rows, b.config.q_dim)) * scale
    y = np.asarray(b.project(x, "wo", 0))
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    v = _verifier(b)
    v.linear(Stage.O, 0, x, y, "wo", 2.0**-53)
    assert v.worst <= 0.25
    for bad in ("small", "nan", "inf"):
        z = y.copy()
        z[rows // 2, 3] += {"small": 3e-2 * np.abs(y).max(), "nan": np.nan, "inf": np.inf}[bad]
        with pytest.raises(IntegrityError):
            _verifier(b).linear(Stage.O, 0, x, z, "wo", 2.0**-53)


def test_row_norms_at_any_scale() -> None:
    """row_norms bounds the norm of each row from above, tightly, wherever it is representable: a row 2ᵏ·v
    gets 2ᵏ·‖v‖ (to project64's slack) from 2⁻¹⁰⁴⁰ (subnormal entries) to 2¹⁰⁰⁰ — where a plain float64 sum
    of squares gives 0 or inf; a zero row 0; NaN or ±inf entries a norm that is not finite."""
    from scx_ref.protocol.verify import row_norms

    v = np.random.default_rng(2).standard_normal((1, 24))
    exps = np.array([-1040, -1000, -600, -520, 0, 520, 600, 1000])
    got = row_norms(np.concatenate([np.ldexp(v, k) for k in exps]))
    want = np.ldexp(np.linalg.norm(v), exps)
    # an upper bound, by project64's slack 1 + (24 + 2)·2⁻⁵² at most
    assert np.all(got[1:] >= want[1:]) and np.all(got[1:] <= want[1:] * (1 + 30 * 2.0**-52))
    assert abs(got[0] - want[0]) <= 1e-9 * want[0]  # entries near 2⁻¹⁰⁴⁰ are subnormal: rounded to 2⁻¹⁰⁷⁴
    odd = np.zeros((3, 24))
    odd[1, 5], odd[2, 7] = np.nan, -np.inf
    got = row_norms(odd)
    assert got[0] == 0.0 and np.isnan(got[1]) and not np.isfinite(got[2])


# -- edges that an honest server always passed: guarded so they stay so ------------------------------

EDGES: list[tuple[dict[str, Any], Any, SCXConfig, int, int]] = [
    # (model fields, dtype, config, prompt length, decode steps)
    ({}, np.float64, SCXConfig(level="paper", r1=0, r2=0), 1, 3),
    ({"moe": True}, np.float32, SCXConfig(level="blind", r1=0, r2=0), 1, 3),
    ({"qkv_bias": True}, np.float32, SCXConfig(level="permute", r1=9, r2=9), 5, 3),
    ({"n_kv_heads": 1}, np.float32, SCXConfig(level="blind", r1=3, r2=3, **PAPER_GEN), 9, 3),
    ({"n_heads": 8, "n_kv_heads": 1, "hidden_size": 32}, np.float64, SCXConfig(level="paper"), 17, 3),
    ({}, np.float32, SCXConfig(level="blind", l_s=2, l_e=1, gen_attention="server"), 32, 0),
    ({"moe": True, "qkv_bias": True}, np.float32, SCXConfig(level="paper"), 1, 31),
    ({}, np.float32, SCXConfig(level="blind", beta=1e8, blind_dtype="float64"), 9, 3),
    ({}, np.float64, SCXConfig(level="blind", beta=1e12), 9, 3),
]


@pytest.mark.filterwarnings("ignore::scx_ref.errors.PrecisionWarning")  # β = 1e12 is past its limit
@pytest.mark.parametrize("case", range(len(EDGES)))
def test_honest_edges_pass(case: int) -> None:
    """One-token prompts, no decoys and nine, one KV head and GQA 8:1, a prompt of the model's whole length,
    31 decode steps, β = 1e8 and 1e12 (blinded in float64): every honest reply is accepted with a wide
    margin."""
    fields, dtype, cfg, n, steps = EDGES[case]
    w = tiny_weights(case + 3, **fields)
    ids = np.random.default_rng(case).integers(0, 32, n)
    _, worst = _honest_run(w, dtype, cfg, ids, steps, case + 3)
    assert worst <= 0.25


@pytest.mark.parametrize("preset", [p.name for p in PRESETS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_honest_presets_pass(preset: str, dtype: Any) -> None:
    """Every preset on the tiny MoE model with QKV bias: a one-token prompt and a 24-token one, 4 steps."""
    w = tiny_weights(11, moe=True, qkv_bias=True)
    cfg = next(p for p in PRESETS if p.name == preset).config(w.config.n_layers)
    for n in (1, 24):
        _, worst = _honest_run(w, dtype, cfg, np.random.default_rng(n).integers(0, 32, n), 4, 11)
        assert worst <= 0.25

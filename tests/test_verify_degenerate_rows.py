"""The reply verifier on degenerate rows (a row whose sum of squares overflows the dtype, a row mixing one
huge entry with normal ones, an all-zero row, a row whose squares underflow): an honest server is never
judged a forgery, and a server that deviates on such a row is still caught.

Where a row's sum of squares overflows the dtype (|x| ≳ 1.8e19 in float32, ≳ 1e154 in float64), the
backend's RMSNorm — and Hugging Face's LlamaRMSNorm in float32 — gives a row of zeros: the honest server's
reply on it is the bias. The verifier's fused x̂·r (``project64_norm``: float64 sums, x̂ never formed)
modelled x̂ as the finite float64 normalization instead, so the honest reply failed the check
(IntegrityError; in float64 the sums overflowed to a NaN verdict). It now takes the backend's own norm
of the rows wherever its pass finds one near the dtype's range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.attacks.active import TamperingTransport
from scx_ref.backends import NumpyBackend, cpu_kernels
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import IntegrityError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.verify import linear_excess
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_weights

needs_numba = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba not installed")

IDS = np.array([5, 3, 9, 12, 7, 1, 20, 2], dtype=np.int64)
HUGE = 3  # the token whose embedding row is made degenerate
#: a row's largest entry per case: its float32 / float64 sum of squares overflows (or underflows)
CASES = {
    "f32-row-1e20": ("float32", 1e20, False),
    "f32-one-entry-2e19": ("float32", 2e19, True),
    "f64-row-1e155": ("float64", 1e155, False),
    "f32-row-1e-23": ("float32", 1e-23, False),
    "f32-zero-row": ("float32", 0.0, False),
}
OVERFLOWING = ["f32-row-1e20", "f32-one-entry-2e19", "f64-row-1e155"]


def keys() -> KeySchedule:
    return KeySchedule(bytes([7]) * 32, bytes([8]) * 16)


def degenerate(case: str, **fields: Any) -> tuple[ModelWeights, str]:
    """The tiny model with token HUGE's embedding made degenerate, and its dtype."""
    dtype, scale, one_entry = CASES[case]
    w = tiny_weights(0, **fields)
    if one_entry:
        w.embed[HUGE, 5] = scale  # the other entries stay N(0, 1)
    else:
        w.embed[HUGE] = w.embed[HUGE] / np.abs(w.embed[HUGE]).max() * scale
    return w, dtype


# -- the backend's products of normalized rows ---------------------------------------------------


def _rows(dtype: str) -> np.ndarray[Any, Any]:
    """Eight rows: normal, near the dtype's range (whole row / one entry), all zero, squares underflowing."""
    w = tiny_weights(0).config.hidden_size
    rng = np.random.default_rng(5)
    big = 1e20 if dtype == "float32" else 1e155
    x = rng.standard_normal((8, w))
    x[1] *= big / np.abs(x[1]).max()
    x[2, 3] = big
    x[3] = 0.0
    x[4] *= 1e-23
    x[6, :] = 3e19 if dtype == "float32" else 3e154  # every entry's square overflows alone
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_project64_norm_is_the_products_of_the_backends_own_norm(dtype: str, kernels_on: bool) -> None:
    """``project64_norm`` on rows near the dtype's range gives what ``project64(norm(x))`` gives — zeros
    for a row whose sum of squares overflows in the dtype (the backend's norm, and Hugging Face's in
    float32, is a row of zeros there), on the fused and the eager path. The fused pass gave the float64
    normalization, a finite unit row (the same row's products differed wholly between the paths)."""
    b = TorchBackend(tiny_weights(0), dtype)
    x = torch.from_numpy(_rows(dtype)).to(b.dtype)
    right = np.random.default_rng(1).standard_normal((x.shape[1], 3))
    for which in ("attn", "mlp", "final"):
        xh = b.norm(x, which, 0)
        assert not xh[[1, 2, 6]].any(), "the backend's norm of an overflowing row is a row of zeros"
        want_p, want_n = b.project64(xh, right)
        got_p, got_n = b.project64_norm(x, which, 0, right)
        assert np.array_equal(got_p, want_p) and np.array_equal(got_n, want_n), which
        assert not got_p[[1, 2, 6]].any() and not got_n[[1, 2, 6]].any()
        assert np.isfinite(got_p).all() and np.isfinite(got_n).all()


def test_the_numpy_backend_models_the_overflowing_row_as_zeros() -> None:
    """The reference backend (float64): ``project64_norm`` of a row whose sum of squares overflows is
    zeros, as its norm (and torch's) gives, not NaN."""
    b = NumpyBackend(tiny_weights(0))
    x = _rows("float64")
    right = np.random.default_rng(1).standard_normal((x.shape[1], 2))
    with np.errstate(over="ignore"):
        prod, norms = b.project64_norm(x, "attn", 0, right)
    assert not prod[[1, 2, 6]].any() and not norms[[1, 2, 6]].any()
    assert np.isfinite(prod).all() and np.isfinite(norms).all()


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_fused_verdicts_are_the_composed_ones_near_the_range(dtype: str) -> None:
    """``freivalds_excess`` and ``gate_up_excess`` (one compiled call each) on rows near the range: the
    verdicts the verifier composes from ``project64`` / ``project64_norm`` / ``project64_gate_up`` —
    the same values: the gate/up check's x side the products of the backend's own norm (zeros on the
    overflowing rows). (That an honest reply passes: the end-to-end tests below, with the verifier's τ.)"""
    w = tiny_weights(0)
    b = TorchBackend(w, dtype)
    c = w.config
    x = torch.from_numpy(_rows(dtype)).to(b.dtype)
    rng = np.random.default_rng(2)
    xh = b.norm(x, "mlp", 0)
    gu = b.project(xh, "w_gate_up", 0)
    y = b.project(b.swiglu_act(gu), "w_down", 0)
    w_gu = np.concatenate([w.layers[0].mlp.w_gate, w.layers[0].mlp.w_up], axis=1)  # type: ignore[union-attr]
    w_down = w.layers[0].mlp.w_down  # type: ignore[union-attr]
    r_up, r_down = rng.standard_normal((2 * c.intermediate_size, 2)), rng.standard_normal((c.hidden_size, 2))
    u = float(torch.finfo(b.dtype).eps)
    terms = (np.zeros(2), np.full(2, 64 * u), np.full(2, 64 * u), float(np.finfo(np.float64).tiny))
    up = (r_up, w_gu @ r_up, terms)
    down = (r_down, w_down @ r_down, terms)
    fused = b.gate_up_excess(gu, y, x, 0, up, down)
    gr, gn, mr, mn = b.project64_gate_up(gu, up[0], down[1])
    composed = (
        b.freivalds_excess((gr, gn), up[0], x, up[1], terms, "mlp", 0),
        b.freivalds_excess(y, down[0], (mr, mn), down[1], terms),
    )
    assert fused is not None and fused == composed
    # the gate/up check composed by hand: the products of the backend's norm
    xp, xn = b.project64(xh, up[1])
    assert not xp[[1, 2, 6]].any()
    yp, yn = b.project64(gu, up[0])
    assert fused[0] == linear_excess(yp, xp, terms[0], xn, yn, terms[1], terms[2])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_an_all_zero_row_at_eps_0_is_not_finite_on_every_path(dtype: str, kernels_on: bool) -> None:
    """ε = 0 (a valid ModelConfig) and an all-zero row: the model's norm is 0·∞ = NaN, so the row's
    products are NaN on the fused path as on the eager one (and a Freivalds verdict on it NaN, refused)
    — the fused pass raised a raw ZeroDivisionError out of the verifier."""
    b = TorchBackend(tiny_weights(0, rms_eps=0.0), dtype)
    x = torch.from_numpy(_rows(dtype)[[0, 3]]).to(b.dtype)
    right = np.random.default_rng(1).standard_normal((x.shape[1], 2))
    prod, norms = b.project64_norm(x, "attn", 0, right)
    assert np.isfinite(prod[0]).all() and not np.isfinite(prod[1]).any() and not np.isfinite(norms[1])
    terms = (np.zeros(2), np.ones(2), np.ones(2), float(np.finfo(np.float64).tiny))
    y = b.project(b.norm(x, "attn", 0), "wqkv", 0)
    wr = b.project64(torch.eye(x.shape[1], dtype=b.dtype), right)[0]  # the identity's products: right
    got = b.freivalds_excess(y[:, : x.shape[1]], right, x, wr, terms, "attn", 0)
    assert got is None or np.isnan(got)


# -- end to end: an honest server ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    ("level", "guard_ffn"), [("permute", "blinded"), ("paper", "clear")], ids=["permute", "paper-clear"]
)
def test_an_honest_server_is_not_judged_a_forgery(
    case: str, level: str, guard_ffn: str, kernels_on: bool
) -> None:
    """A model whose token HUGE embeds at a degenerate row, verify on, an honest server: the prompt and a
    generation step on that token run, and give plaintext's greedy tokens and finite logits. Before, the
    fused check raised IntegrityError at the first stage where the server normalizes such a row (float32:
    the wqkv product "failed verification"; float64: "is not finite")."""
    w, dtype = degenerate(case)
    want = PlainRunner(TorchBackend(w, dtype)).generate(IDS, 3)
    cfg = SCXConfig(level=level, guard_ffn=guard_ffn)  # type: ignore[arg-type]
    for steps in (3, 0):  # greedy tokens; then a prompt followed by a generation step on the HUGE token
        client: Client[Any] = Client(TorchBackend(w, dtype), keys(), cfg)
        link = LocalTransport(Server(TorchBackend(w, dtype)))
        if steps:
            assert client.generate(IDS, steps, link) == want
        else:
            assert np.isfinite(client.prefill(IDS, link)).all()
            assert np.isfinite(client.decode(HUGE, link)).all()
        assert client.verify_worst < 0.25


# -- a server that deviates on such a row is caught --------------------------------------------------


class UnitNormBackend(TorchBackend):
    """A server's backend whose RMSNorm of a row the model's norm turns into zeros (its sum of squares
    overflows) is instead the row's exact normalization, a finite unit row (computed in float64 on the
    row scaled by its largest entry) — the x̂ the verifier's fused pass modelled before, so its replies
    passed while the client's result left plaintext. Every other row is the model's norm."""

    def norm(self, x: torch.Tensor, which: Any, layer: int = -1, *, name: str | None = None) -> torch.Tensor:
        out = super().norm(x, which, layer, name=name)
        zeroed = (out == 0).all(dim=-1) & (x != 0).any(dim=-1)
        x64 = x[zeroed].to(torch.float64)
        x64 = x64 / x64.abs().amax(dim=-1, keepdim=True)
        unit = self._gain(which, layer).to(torch.float64) * x64 * torch.rsqrt(x64.square().mean(-1, True))
        out[zeroed] = unit.to(out.dtype)
        return out


@pytest.mark.parametrize("case", OVERFLOWING)
@pytest.mark.parametrize("level", ["permute", "paper"])
def test_a_server_normalizing_the_overflowing_row_to_a_unit_row_is_caught(
    case: str, level: str, kernels_on: bool
) -> None:
    """A server that normalizes the overflowing row as a finite unit row instead of the model's zeros
    (:class:`UnitNormBackend`): IntegrityError. With the fused pass the verifier accepted it before
    in float32 (the client went on with that row's wrong values); unverified, the logits leave
    plaintext's."""
    w, dtype = degenerate(case)
    cfg = SCXConfig(level=level)  # type: ignore[arg-type]
    client: Client[Any] = Client(TorchBackend(w, dtype), keys(), cfg)
    with pytest.raises(IntegrityError):
        client.generate(IDS, 2, LocalTransport(Server(UnitNormBackend(w, dtype))))
    # control: unverified, the deviation reaches the client's logits (plaintext's differ)
    want = PlainRunner(TorchBackend(w, dtype)).prefill(IDS).numpy()
    unverified: Client[Any] = Client(TorchBackend(w, dtype), keys(), replace(cfg, verify=False))
    got = unverified.prefill(IDS, LocalTransport(Server(UnitNormBackend(w, dtype))))
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def _shift_the_huge_row(stage: Stage, key: str) -> Callable[[Request, Reply], Reply]:
    """Add 1e-3 of the reply's largest entry to every entry of its row for the request's largest input
    row (the degenerate one: the server sees it), in the first reply of ``stage``."""
    seen = {"n": 0}

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is not stage or seen["n"]:
            return reply
        seen["n"] += 1
        x = torch.as_tensor(req.arrays["x"])
        row = int(x.abs().amax(dim=1).argmax())
        arrays = dict(reply.arrays)
        y = torch.as_tensor(arrays[key]).clone()
        y[row] += 1e-3 * float(y.abs().max())
        arrays[key] = y if isinstance(reply.arrays[key], torch.Tensor) else y.numpy()
        return replace(reply, arrays=arrays)

    return tamper


@pytest.mark.parametrize("case", OVERFLOWING)
@pytest.mark.parametrize(
    ("stage", "key"), [(Stage.QKV, "z"), (Stage.FFN, "y"), (Stage.FFN, "gu"), (Stage.HEAD, "logits")]
)
def test_a_changed_reply_on_the_overflowing_row_is_caught(
    case: str, stage: Stage, key: str, kernels_on: bool
) -> None:
    """The reply row of the overflowing input (the bias, zeros here: the model's norm gives zeros) moved by
    1e-3 of the reply's scale, at a stage where the server normalizes (level permute): IntegrityError."""
    w, dtype = degenerate(case)
    client: Client[Any] = Client(TorchBackend(w, dtype), keys(), SCXConfig(level="permute"))
    link = TamperingTransport(LocalTransport(Server(TorchBackend(w, dtype))), _shift_the_huge_row(stage, key))
    with pytest.raises(IntegrityError):
        client.generate(IDS, 2, link)
    assert client.state is not None and client.state.failed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_backends_fused_norm_of_an_all_zero_row_at_eps_0_is_nan_as_the_eager(
    dtype: str, kernels_on: bool
) -> None:
    """The torch backend's own RMSNorm at ε = 0 over enough entries to take the fused pass
    (FUSED_NORM_MIN), one row all zeros: NaN on that row as the eager ops give (0·rsqrt(0) = 0·∞), the other
    rows as the eager ones — the fused kernel's ``1/sqrt(0)`` raised SystemError out of ``norm``."""
    from scx_ref.backends.torch_backend import FUSED_NORM_MIN

    b = TorchBackend(tiny_weights(0, rms_eps=0.0), dtype)
    w = b.config.hidden_size
    rows = -(-FUSED_NORM_MIN // w)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((rows, w))).to(b.dtype)
    x[5] = 0.0
    got = b.norm(x, "attn", 0)
    eager = b._rms_eager(x, b._gain("attn", 0))
    assert torch.isnan(got[5]).all() and torch.isnan(eager[5]).all()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(got[keep], eager[keep])

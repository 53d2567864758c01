"""Whole-protocol parity: SCX on the TorchBackend gives the numpy backend's logits and tokens on the
same keys (float64: rtol 1e-10, DESIGN §6), and runs on CUDA when a GPU is present.

float32 tolerance: the torch float32 run against the float64 numpy run differs by float32 rounding
only: a few u = 2⁻²⁴ per stage, times (1 + β) on blinded stages (DESIGN §6), over L blocks, relative
to the logits' scale — bound 64·L·u·(1 + β)·(1 + max|logit|).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from properties.kernel_paths import one_chunk_or_split
from scx_ref.backends import cpu_kernels
from scx_ref.backends.base import Backend
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import (
    GEMM_BLOCK,
    GEMM_BLOCK_MAX_ROWS,
    GEMM_BLOCK_ROWS,
    TorchBackend,
    TorchOps,
    dense,
    parse_dtype,
)
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, Level, LocalTransport, SCXConfig, Server
from scx_ref.protocol.config import LEVELS
from scx_ref.reference import ReferenceModel
from scx_ref.weights import ModelWeights, random_weights

U32 = 2.0**-24
IDS = np.array([3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7])
VARIANTS = {"dense": (0, False), "moe": (4, False), "qkv_bias": (0, True)}


def weights(variant: str, n_layers: int = 4) -> ModelWeights:
    n_experts, bias = VARIANTS[variant]
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=16,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        head_dim=4,
        intermediate_size=24,
        n_experts=n_experts,
        top_k=2 if n_experts else 0,
        qkv_bias=bias,
        max_positions=64,
    )
    return random_weights(cfg, np.random.default_rng(11))


def run(backend: Backend[Any], level: Level, n_new: int = 4) -> tuple[np.ndarray, list[int], np.ndarray]:
    keys = KeySchedule(b"\x05" * 32, b"\x09" * 16)
    cfg = SCXConfig(level=level, max_length=64)
    client = Client(backend, keys, cfg)
    link = LocalTransport(Server(backend), record_view=True)
    logits = client.prefill(IDS, link)
    client.share_keys(link)
    tokens = [int(np.argmax(logits[-1]))]
    last = logits[-1]
    for _ in range(n_new - 1):
        last = client.decode(tokens[-1], link)
        tokens.append(int(np.argmax(last)))
    return logits, tokens, last


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("level", LEVELS)
def test_numpy_and_torch_scx_agree_on_the_same_keys(variant: str, level: Level) -> None:
    w = weights(variant)
    np_logits, np_tokens, np_last = run(NumpyBackend(w), level)
    t_logits, t_tokens, t_last = run(TorchBackend(w, torch.float64), level)
    scale = np.abs(np_logits).max()
    np.testing.assert_allclose(t_logits, np_logits, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(t_last, np_last, rtol=1e-10, atol=1e-10 * scale)
    assert t_tokens == np_tokens == ReferenceModel(w).generate(IDS, 4)
    f_logits, f_tokens, _ = run(TorchBackend(w, torch.float32), level)
    beta = 0.0 if level == "permute" else SCXConfig().beta
    assert np.abs(f_logits - np_logits).max() <= 64 * w.config.n_layers * U32 * (1 + beta) * (1 + scale)
    assert f_tokens == np_tokens


def test_server_view_is_the_same_for_both_backends() -> None:
    """Same keys → the same messages (the encodings do not depend on the backend)."""
    w = weights("dense")
    views = []
    for backend in (NumpyBackend(w), TorchBackend(w, torch.float64)):
        link = LocalTransport(Server(backend), record_view=True)
        keys = KeySchedule(
            b"\x05" * 32, b"\x09" * 16
        )  # the same keys, rebuilt (one object drives one session)
        Client(backend, keys, SCXConfig(level="paper", max_length=64)).prefill(IDS, link)
        views.append(link.view.messages)
    assert [(m.stage, m.layer) for m in views[0]] == [(m.stage, m.layer) for m in views[1]]
    for a, b in zip(views[0], views[1], strict=True):
        for key in a.arrays:
            np.testing.assert_allclose(b.arrays[key], a.arrays[key], rtol=1e-10, atol=1e-10)


def test_plain_torch_runner_matches_reference() -> None:
    w = weights("moe")
    ref_logits, _ = ReferenceModel(w).prefill(IDS)
    plain = PlainRunner(TorchBackend(w, torch.float64))
    np.testing.assert_allclose(plain.prefill(IDS).numpy(), ref_logits, rtol=1e-10, atol=1e-12)
    assert plain.generate(IDS, 5) == ReferenceModel(w).generate(IDS, 5)


def test_floating_takes_tensors_in_the_dtype_as_they_are_and_tests_everything_else() -> None:
    """TorchOps.floating's short path (a strided CPU tensor in the dtype without history) returns the tensor
    itself and still refuses NaN and ±inf; every other input takes the general path: cast, detached,
    refused when it is not floating, not dense or has no data."""
    ops = TorchOps(torch.float32)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert ops.floating(x, "x") is x
    view = x.t()  # a strided view (not contiguous) is taken as it is too
    assert ops.floating(view, "v") is view
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(NonFiniteError, match="y holds NaN or Inf"):
            ops.floating(y, "y")
        assert ops.floating(y, "y", finite=False) is y  # a value check that follows reads it
    wide = x.double()
    got = ops.floating(wide, "w")
    assert got.dtype is torch.float32 and torch.equal(got, x)
    g = x.clone().requires_grad_(True)
    got = ops.floating(g, "g")
    assert not got.requires_grad and torch.equal(got, x)
    with pytest.raises(DTypeError, match="floating-point"):
        ops.floating(torch.arange(3), "i")
    with pytest.raises(DTypeError, match="dense tensor"):
        ops.floating(torch.empty(2, 3, device="meta"), "m")
    with pytest.raises(DTypeError, match="dense tensor"):
        ops.floating(x.to_sparse(), "s")
    arr = np.array([[1.0, 2.0]], dtype=np.float32)
    assert torch.equal(ops.floating(arr, "a"), torch.from_numpy(arr))


def test_dtype_parsing_and_wire_format() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float64") is torch.float64
    with pytest.raises(DTypeError):
        parse_dtype("int8")
    w = weights("dense", 2)
    for dt, want in [
        (torch.float64, np.float64),
        (torch.float32, np.float32),
        (torch.bfloat16, np.float32),
        (torch.float16, np.float32),
    ]:
        b = TorchBackend(w, dt)
        assert b.numpy_dtype() == want
        x = b.from_numpy(np.ones((2, 16)))
        assert x.dtype == dt and b.to_numpy(x).dtype == want
        rows = b.from_numpy(np.arange(32.0).reshape(4, 8))
        got = b.rows_to_numpy(rows, np.array([3, 0, 2]))
        assert got.dtype == want and np.array_equal(got, b.to_numpy(b.take_rows(rows, np.array([3, 0, 2]))))
        got[:] = -1  # a copy: the backend tensor is untouched
        assert b.to_numpy(rows)[0, 1] == 1.0
    with pytest.raises(ConfigError):
        TorchBackend(None)  # type: ignore[arg-type]


def test_add_into_writes_in_place_only_when_the_result_keeps_the_array() -> None:
    from scx_ref.arrays import NumpyOps

    t = TorchOps(torch.float32)
    x = torch.ones(3, 2)
    assert t.add_into(x, torch.full((3, 2), 2.0)) is x and bool((x == 3).all())
    wide = t.add_into(x, torch.ones(3, 2, dtype=torch.float64))  # would narrow: a new array instead
    assert wide.dtype == torch.float64 and bool((x == 3).all())
    grown = t.add_into(torch.ones(1, 2), torch.ones(3, 2))  # would not fit: a new array
    assert grown.shape == (3, 2)
    n = NumpyOps(None)
    a = np.ones((3, 2), dtype=np.float32)
    assert n.add_into(a, np.ones((3, 2), dtype=np.float32)) is a and (a == 2).all()
    b = n.add_into(a, np.ones((3, 2)))
    assert b.dtype == np.float64 and (a == 2).all() and (b == 3).all()


def test_rope_equals_the_rotate_half_form_bit_for_bit() -> None:
    """RoPE gives exactly Hugging Face's x·cos + rotate_half(x)·sin — every product rounded before its
    add, no fused multiply-add — on a strided view (the Q and K heads of a fused QKV row). The
    ``addcmul`` form it replaced differs on FMA CPUs, which this test would catch there."""
    w = weights("dense", 1)
    b = TorchBackend(w, torch.float32)
    d_h, pos = w.config.head_dim, np.arange(5) * 7
    z = torch.randn(5, 3 * 4 * d_h, generator=torch.Generator().manual_seed(0))
    x = z[:, : 2 * 4 * d_h].reshape(5, 8, d_h)
    cos, sin = b._cos_sin(pos)
    h = d_h // 2
    x1, x2 = x[..., :h], x[..., h:]
    rotate_half = torch.cat([-x2, x1], dim=-1)
    assert torch.equal(b.rope(x, pos), x * cos[:, None] + rotate_half * sin[:, None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scx_runs_and_stays_close(dtype: torch.dtype) -> None:
    """bf16/fp16 SCX at level permute: within the dtype's rounding of the float64 logits.
    Bound: 64·L·u·(1 + max|logit|) with u = 2⁻⁸ (bf16) / 2⁻¹¹ (fp16), as for float32 above."""
    w = weights("dense")
    want, _, _ = run(NumpyBackend(w), "permute", 1)
    got, _, _ = run(TorchBackend(w, dtype), "permute", 1)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert np.abs(got - want).max() <= 64 * w.config.n_layers * u * (1 + np.abs(want).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_backend_matches_cpu(variant: str) -> None:
    w = weights(variant)
    cpu_logits, cpu_tokens, _ = run(TorchBackend(w, torch.float64, "cpu"), "paper")
    gpu = TorchBackend(w, torch.float64, "cuda")
    assert gpu._w.embed.is_cuda and gpu._w.layers[0].wqkv.is_cuda
    gpu_logits, gpu_tokens, _ = run(gpu, "paper")
    np.testing.assert_allclose(gpu_logits, cpu_logits, rtol=1e-10, atol=1e-10 * np.abs(cpu_logits).max())
    assert gpu_tokens == cpu_tokens
    f_logits, f_tokens, _ = run(TorchBackend(w, torch.float32, "cuda"), "paper")
    # TF32 may be on for CUDA matmuls: u = 2⁻¹¹ instead of 2⁻²⁴
    u = 2.0**-11 if torch.backends.cuda.matmul.allow_tf32 else U32
    assert np.abs(f_logits - cpu_logits).max() <= 64 * w.config.n_layers * u * 6 * (
        1 + np.abs(cpu_logits).max()
    )
    assert f_tokens == cpu_tokens
    for dt in (torch.bfloat16, torch.float16):
        run(TorchBackend(w, dt, "cuda"), "permute", 2)


@pytest.mark.parametrize("rows", [1, 3, 40, 2000])  # the host path (a few rows) and the sliced torch path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_verifier_products_are_float64_accurate_and_norms_upper_bounds(rows: int, dtype: torch.dtype) -> None:
    """project64 (the reply verifier's x·r and ‖x_i‖) agrees with an exact float64 product to float64
    rounding on every path, and its norms are never below the true ones; matmul64 is numpy's matmul."""
    rng = np.random.default_rng(rows)
    ops = TorchOps(dtype)
    x = torch.from_numpy(rng.standard_normal((rows, 24))).to(dtype)
    right = rng.standard_normal((24, 3))
    prod, norms = ops.project64(x, right)
    x64 = x.double().numpy()
    np.testing.assert_allclose(prod, x64 @ right, rtol=1e-13, atol=1e-13)
    true = np.linalg.norm(x64, axis=1)
    assert np.all(norms >= true) and np.all(norms <= true * (1 + 1e-5))
    a, b = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 4, 6))
    np.testing.assert_allclose(ops.matmul64(a, b), a @ b, rtol=1e-14, atol=1e-14)


def test_verifier_products_over_many_slices_in_and_out_of_inference_mode() -> None:
    """project64 converts its row slices into one reused float64 buffer: a product over many slices (the
    last one short) equals the float64 product, called inside torch.inference_mode and outside it, in
    either order, and after a narrower call."""
    rng = np.random.default_rng(7)
    ops = TorchOps(torch.float32)
    x = torch.from_numpy(rng.standard_normal((301, 3000))).float()  # ≥ 3 slices of 2¹⁷ elements per thread
    right = rng.standard_normal((3000, 2))
    want = x.double().numpy() @ right
    with torch.inference_mode():
        inside, _ = ops.project64(x, right)
    outside, _ = ops.project64(x, right)
    small, _ = ops.project64(x[:5, :40].contiguous(), right[:40])
    with torch.inference_mode():
        again, _ = ops.project64(x, right)
    for got in (inside, outside, again):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(small, x[:5, :40].double().numpy() @ right[:40], rtol=1e-12, atol=1e-12)


def test_dense_splits_wide_cpu_products_and_keeps_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the real threshold (a wide output, enough rows) ``dense`` in blocks matches one F.linear to float32
    rounding, and a product that needs gradients runs as one F.linear (``out=`` writes take no autograd)
    with the same gradients."""
    from scx_ref.backends import torch_backend

    monkeypatch.setattr(torch_backend, "GEMM_BLOCK_MIN_IN", 0)  # blocks at any input width
    rng = np.random.default_rng(0)
    rows, width, out = GEMM_BLOCK_ROWS, 64, 2 * GEMM_BLOCK + 5  # a last block narrower than the others
    x = torch.from_numpy(rng.standard_normal((rows, width)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((out, width)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(out).astype(np.float32))
    one = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(dense(x, w, b), one, rtol=1e-5, atol=1e-5)
    grads = []
    for f in (dense, torch.nn.functional.linear):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        f(xg, wg, b).sum().backward()
        grads.append((xg.grad, wg.grad))
    (dx, dw), (want_dx, want_dw) = grads
    assert dx is not None and dw is not None and want_dx is not None and want_dw is not None
    torch.testing.assert_close(dx, want_dx, rtol=0, atol=0)
    torch.testing.assert_close(dw, want_dw, rtol=0, atol=0)


def test_dense_splits_only_between_its_row_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide product of inputs at least :data:`GEMM_BLOCK_MIN_IN` wide is one F.linear below
    :data:`GEMM_BLOCK_ROWS` rows and from :data:`GEMM_BLOCK_MAX_ROWS` rows on (where one GEMM is the
    faster), column blocks in between; of narrower inputs, one F.linear at any row count; every form
    within float32 rounding of one F.linear."""
    from scx_ref.backends import torch_backend

    calls: list[int] = []
    linear = torch.nn.functional.linear

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(torch_backend.F, "linear", counted)
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((2 * GEMM_BLOCK, 8)).astype(np.float32))
    for min_in, rows, one_gemm in (
        (0, GEMM_BLOCK_ROWS - 1, True),
        (0, GEMM_BLOCK_ROWS, False),
        (0, GEMM_BLOCK_MAX_ROWS - 1, False),
        (0, GEMM_BLOCK_MAX_ROWS, True),
        (9, GEMM_BLOCK_ROWS, True),  # inputs (8) narrower than GEMM_BLOCK_MIN_IN: one F.linear at any rows
        (9, GEMM_BLOCK_MAX_ROWS - 1, True),
        (8, GEMM_BLOCK_ROWS, False),
    ):
        monkeypatch.setattr(torch_backend, "GEMM_BLOCK_MIN_IN", min_in)
        calls.clear()
        x = torch.from_numpy(rng.standard_normal((rows, 8)).astype(np.float32))
        got = dense(x, w)
        assert calls == ([rows] if one_gemm else []), rows
        torch.testing.assert_close(got, linear(x, w), rtol=1e-5, atol=1e-5)


def test_rope_take_refuses_a_negative_position() -> None:
    """The fused RoPE pass reads the tables by position: one below 0 is refused (ShapeError), as the
    eager RoPE refuses it, and nothing is returned."""
    from scx_ref.errors import ShapeError

    b = TorchBackend(weights("dense", n_layers=1), "float32")
    c = b.config
    x = torch.randn(3, c.q_dim + 2 * c.kv_dim)
    idx = np.arange(c.q_dim + c.kv_dim, dtype=np.int64)
    rest = np.arange(c.kv_dim, dtype=np.int64)
    b.rope_take(x, np.arange(3), np.array([0, 1, 2]), idx, rest)  # accepted
    for numba in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", numba == "1")
            with pytest.raises(ShapeError):
                b.rope_take(x, np.arange(3), np.array([0, -1, 2]), idx, rest)


def _out_of_bounds_calls(b: TorchBackend) -> dict[str, Any]:
    """Calls of the fused CPU passes with an index or a shape outside their arrays: each read (or wrote)
    outside the arrays before the kernels checked them."""
    c = b.config
    w = c.q_dim + c.kv_dim
    x = torch.randn(3, w + c.kv_dim)
    rope, plain = np.arange(w, dtype=np.int64), np.arange(c.kv_dim, dtype=np.int64)
    rows, extra = torch.randn(4, 6), torch.randn(1, 6)
    cols, idx = np.arange(6), np.arange(5)
    s = torch.randn(4, 6)
    fs, fy = np.array([0, 1, 2, 3, 0]), np.array([0, 1, 2, 3, -1])
    h, r8 = torch.randn(5, c.hidden_size), np.random.default_rng(0).standard_normal((c.hidden_size, 2))
    f = c.intermediate_size
    gu = torch.randn(5, 2 * f)
    up = (np.ones((2 * f, 2)), np.ones((c.hidden_size, 2)), (np.zeros(2), np.ones(2), np.ones(2), 1e-300))
    down = (np.ones((c.hidden_size, 2)), np.ones((f + 1, 2)), (np.zeros(2), np.ones(2), np.ones(2), 1e-300))
    terms = (np.zeros(2), np.ones(2), np.ones(2), 1e-300)
    return {
        "rope_take-a_row_past_x": lambda: b.rope_take(x, np.array([0, 1, 3]), np.arange(3), rope, plain),
        "rope_take-a_roped_column_past_them": lambda: b.rope_take(
            x, np.arange(3), np.arange(3), np.r_[rope[:-1], w], plain
        ),
        "rope_take-a_plain_column_past_the_row": lambda: b.rope_take(
            x, np.arange(3), np.arange(3), rope, np.r_[plain[:-1], c.kv_dim]
        ),
        "rope_take-part_of_a_head": lambda: b.rope_take(x, np.arange(3), np.arange(3), rope, plain[:-1]),
        "take_rows_cols_concat-a_row_past_x_and_extra": lambda: b.take_rows_cols_concat(
            rows, cols, extra, np.array([0, 1, 2, 3, 5])
        ),
        "take_rows_cols_concat-a_column_past_x": lambda: b.take_rows_cols_concat(
            rows, np.array([0, 1, 2, 3, 4, 6]), extra, idx
        ),
        "take_rows_cols_concat-a_negative_column": lambda: b.take_rows_cols_concat(
            rows, np.array([0, 1, 2, 3, 4, -1]), extra, idx
        ),
        "take_rows_cols_concat-extra_of_another_width": lambda: b.take_rows_cols_concat(
            rows, cols[:3], torch.randn(2, 3 + 3), idx
        ),
        "gather_sum-a_row_past_s": lambda: b.gather_sum(s, np.array([0, 1, 2, 4, 0]), s, fy, extra),
        "gather_sum-a_row_past_y": lambda: b.gather_sum(s, fs, s, np.array([0, 1, 2, 4, -1]), extra),
        "gather_sum-a_decoy_row_past_extra": lambda: b.gather_sum(s, np.array([0, 1, 2, 3, 1]), s, fy, extra),
        "gather_sum-a_negative_row": lambda: b.gather_sum(s, np.array([0, 1, 2, -1, 0]), s, fy, extra),
        "project64-check_vectors_of_another_width": lambda: b.project64(h, r8[1:]),
        "project64_norm-check_vectors_of_another_width": lambda: b.project64_norm(h, "attn", 0, r8[1:]),
        "project64_gate_up-down_vectors_of_another_width": lambda: b.project64_gate_up(
            gu, np.ones((2 * f, 2)), np.ones((f + 1, 2))
        ),
        "freivalds_excess-check_vectors_of_another_width": lambda: b.freivalds_excess(
            h, r8[1:], h, r8, terms
        ),
        "freivalds_excess-products_of_other_rows": lambda: b.freivalds_excess(
            h, r8, (np.zeros((4, 2)), np.zeros(4)), r8, terms
        ),
        "gate_up_excess-down_vectors_of_another_width": lambda: b.gate_up_excess(gu, h, h, 0, up, down),
        "gate_up_excess-a_reply_of_more_rows": lambda: b.gate_up_excess(
            gu, torch.cat([h, h]), h, 0, up, (down[0], np.ones((f, 2)), down[2])
        ),
    }


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed (no fused passes)")
@pytest.mark.parametrize("case", sorted(_out_of_bounds_calls(TorchBackend(weights("dense", n_layers=1)))))
def test_the_fused_passes_refuse_what_lies_outside_their_arrays(case: str) -> None:
    """The fused CPU kernels index without bounds checks: an index outside the arrays (a row, a column,
    a decoy row) or a shape that does not match (a partial head, check vectors of another width) is
    refused with ShapeError before the kernel reads anything — it read (or wrote) outside the arrays
    before — in one chunk and split across threads."""
    from scx_ref.errors import ShapeError

    b = TorchBackend(weights("dense", n_layers=1), "float32")
    for split in (False, True):
        with one_chunk_or_split(split), pytest.raises(ShapeError):
            _out_of_bounds_calls(b)[case]()


def test_rope_take_refuses_columns_that_are_not_whole_heads() -> None:
    """``rope_take``'s column split must be whole heads with the RoPE'd columns inside the row: ShapeError
    on the numpy reference, the eager torch ops and the fused pass alike (the fused pass wrote past its
    output before)."""
    from scx_ref.errors import ShapeError

    w = weights("dense", n_layers=1)
    c = w.config
    x_np = np.random.default_rng(1).standard_normal((3, c.q_dim + 2 * c.kv_dim))
    roped, plain = np.arange(c.q_dim + c.kv_dim), np.arange(c.kv_dim)
    bad = {
        "plain columns not whole heads": (roped, plain[:-1]),
        "RoPE'd columns not whole heads": (roped[:-1], plain),
        "RoPE'd columns wider than the row": (np.arange(x_np.shape[1] + c.head_dim) % 4, plain[:0]),
    }
    np_b, t_b = NumpyBackend(w), TorchBackend(w, "float32")
    x_t = torch.from_numpy(x_np).float()
    for r_idx, p_idx in bad.values():
        with pytest.raises(ShapeError, match="whole heads"):
            np_b.rope_take(x_np, np.arange(3), np.arange(3), r_idx, p_idx)
        for fused in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "ENABLED", fused)
                with pytest.raises(ShapeError, match="whole heads"):
                    t_b.rope_take(x_t, np.arange(3), np.arange(3), r_idx, p_idx)
    np_b.rope_take(x_np, np.arange(3), np.arange(3), roped, plain)  # the whole-head split is accepted


def test_compiled_norm_bounds_follow_the_one_slack_rule() -> None:
    """numba's sum_norms / rms_norms are √sq times base.sum_norm_slack (width, and width + 6 for a folded
    RMSNorm scale), bit for bit, as the torch fallbacks compute it."""
    from scx_ref.backends.base import sum_norm_slack

    k = cpu_kernels.kernels()
    if k is None:
        pytest.skip("numba is not installed")
    sq = np.array([0.0, 1.0, 2.5e3, 7.0e-20])
    for width in (1, 64, 576):
        assert np.array_equal(k.sum_norms(sq, width), np.sqrt(sq) * sum_norm_slack(width, 2.0**-52))
        assert np.array_equal(k.rms_norms(sq, width), np.sqrt(sq) * sum_norm_slack(width + 6, 2.0**-52))


def _fake_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes) -> Path:
    """``/proc/cpuinfo`` read from a file of ``data`` (returned: delete it to have no such file)."""
    import builtins

    fake = tmp_path / "cpuinfo"
    fake.write_bytes(data)
    real_open = builtins.open

    def fake_open(path: Any, *args: Any, **kw: Any) -> Any:
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    return fake


def test_cpuinfo_reads_the_first_line_of_a_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cpuinfo`` returns the first value of a field, stripped, whatever the spacing before its colon; None
    for a field the file lacks and where there is no such file (not Linux)."""
    from scx_ref import machine

    fake = _fake_cpuinfo(
        tmp_path,
        monkeypatch,
        b"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
        b"processor\t: 1\nvendor_id\t: GenuineIntel\n",
    )
    assert machine.cpuinfo("vendor_id") == "AuthenticAMD"
    assert machine.cpuinfo("model name") == "AMD EPYC 7B13"
    assert machine.cpuinfo("flags") is None
    fake.unlink()
    assert machine.cpuinfo("vendor_id") is None


def test_cpuinfo_survives_bytes_it_cannot_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte outside the codec raised UnicodeDecodeError out of ``cpuinfo`` — and so out of the torch
    backend's import, which reads the vendor; now it is replaced and the other fields still read. A file
    that cannot be opened reads as none."""
    import builtins

    from scx_ref import machine

    _fake_cpuinfo(tmp_path, monkeypatch, b"model name\t: Some\xffCPU\nvendor_id\t: AuthenticAMD\n")
    assert machine.cpuinfo("vendor_id") == "AuthenticAMD"
    assert machine.cpuinfo("model name") == "Some\ufffdCPU"
    real_open = builtins.open

    def denied(path: Any, *args: Any, **kw: Any) -> Any:
        if path == "/proc/cpuinfo":
            raise PermissionError(path)
        return real_open(path, *args, **kw)

    monkeypatch.setattr(builtins, "open", denied)
    assert machine.cpuinfo("vendor_id") is None

"""Attention of a query row holding a NaN or ±inf entry: NaN in exactly that row's head on the numpy and the
torch backends (never a silent finite value), every other entry as with a finite query; the guards' own
zeros (no keys, a row that sees no key) kept, and torch's device branch agreeing with its CPU branch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend

from .tiny import tiny_weights

N, D = 5, 4
BAD = 2  # the query row given a NaN or ±inf entry (row 0 for one decode row)
#: positions per case: (query positions, key positions or None = every query sees every key)
CASES: dict[str, tuple[Any, Any]] = {
    "all": (np.arange(N), None),  # no mask: the fused kernel (grouped when H > H_kv)
    "causal": (np.arange(N), np.arange(N)),  # is_causal
    "mask": (np.array([4, 2, 3, 1, 4]), np.arange(N)),  # an explicit boolean mask
    "novis": (np.array([0, 2, 3, 1, 4]), np.arange(1, N + 1)),  # row 0 sees no key: the eager softmax
    "decode": (np.array([N - 1]), None),  # one row, the whole cache
}
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def _inputs(case: str, heads: tuple[int, int], dtype: Any, bad: float) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    n_q = 1 if case == "decode" else N
    q = rng.standard_normal((n_q, heads[0], D))
    k, v = rng.standard_normal((2, N, heads[1], D))
    q[0 if case == "decode" else BAD, 0, 1] = bad
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _nonfinite_heads(out: np.ndarray) -> set[tuple[int, int]]:
    return {(int(i), int(h)) for i, h in zip(*np.nonzero(~np.isfinite(out).all(axis=-1)), strict=True)}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ±inf scores
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_nonfinite_query_head_gives_nan_there_on_both_backends(
    case: str, heads: tuple[int, int], dtype: Any, bad: float
) -> None:
    """A query row's head with a NaN (or ±inf) entry: NaN in exactly that row's head on numpy and on torch,
    every other entry as before (before: torch's fused kernel — no mask, causal, one decode row — gave that
    head zeros, a finite output the finiteness checks let through)."""
    w = tiny_weights(0, n_heads=heads[0], n_kv_heads=heads[1])
    qp, kp = CASES[case]
    q, k, v = _inputs(case, heads, dtype, bad)
    want = NumpyBackend(w, dtype).attention(q, k, v, qp, kp)
    tb = TorchBackend(w, TORCH_DTYPES[dtype])
    got = tb.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), qp, kp).numpy()
    row = 0 if case == "decode" else BAD
    assert _nonfinite_heads(want) == _nonfinite_heads(got) == {(row, 0)}
    assert np.isnan(got[row, 0]).all() and np.isnan(want[row, 0]).all()
    # the other heads and rows: as with a finite query (q's bad row made finite changes only that head)
    q_ok = q.copy()
    q_ok[row, 0] = 0.5
    clean = NumpyBackend(w, dtype).attention(q_ok, k, v, qp, kp)
    keep = np.ones(want.shape[:2], dtype=bool)
    keep[row, 0] = False
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_array_equal(want[keep], clean[keep])
    np.testing.assert_allclose(got[keep], clean[keep], rtol=rtol, atol=rtol)
    if case == "novis":  # the row that sees no key still gives zeros (the guard's own case)
        assert not want[0].any() and not got[0].any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ±inf scores
@pytest.mark.parametrize("case", ["all", "causal", "decode"])
def test_a_query_whose_scores_are_all_minus_inf_gives_nan_not_zeros(case: str) -> None:
    """+inf in a query whose keys are all negative in that feature: every score is −inf, which read as a row
    that sees no key and gave zeros on both backends; now NaN on both."""
    w = tiny_weights(0)
    qp, kp = CASES[case]
    q, k, v = _inputs(case, (4, 2), np.float64, np.inf)
    k[:, 0, 1] = -np.abs(k[:, 0, 1]) - 0.1
    row = 0 if case == "decode" else BAD
    assert np.isneginf(k[:, 0] @ q[row, 0]).all()  # every score of that head is −∞
    want = NumpyBackend(w).attention(q, k, v, qp, kp)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    got = TorchBackend(w, torch.float64).attention(tq, tk, tv, qp, kp).numpy()
    assert _nonfinite_heads(want) == _nonfinite_heads(got) == {(row, 0)}


def test_the_attention_guards_keep_their_zeros_and_the_device_branch_agrees() -> None:
    """No keys: zeros on both, whatever the query (documented); bfloat16 NaN query: NaN; the branch the
    non-CPU devices take (the mask always applied, no host test) gives the CPU branch's result."""
    w = tiny_weights(0)
    q, k, v = _inputs("causal", (4, 2), np.float64, np.nan)
    none = np.zeros((0, 2, D))
    assert not NumpyBackend(w).attention(q, none, none, np.arange(N), np.arange(0)).any()
    tb = TorchBackend(w, torch.float64)
    t0 = torch.from_numpy(none)
    assert not tb.attention(torch.from_numpy(q), t0, t0, np.arange(N), np.arange(0)).any()
    bf = TorchBackend(w, torch.bfloat16)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    out = bf.attention(tq.bfloat16(), tk.bfloat16(), tv.bfloat16(), np.arange(N), None)
    assert _nonfinite_heads(out.float().numpy()) == {(BAD, 0)}
    cpu = tb.attention(tq, tk, tv, np.arange(N), None)
    tb._on_cpu = False  # the device branch, run on CPU tensors
    device = tb.attention(tq, tk, tv, np.arange(N), None)
    np.testing.assert_array_equal(device.numpy(), cpu.numpy())
    finite = tb.attention(tq.nan_to_num(), tk, tv, np.arange(N), None)
    assert torch.isfinite(finite).all()

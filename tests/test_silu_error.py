"""``python -m models.silu_error``, the sweep behind the MLP check's SiLU bound: it visits every float32 it
claims to, measures the error of the kernel the check runs, and reports a wrong SiLU as wrong."""

from __future__ import annotations

import numpy as np
import pytest

from models import silu_error
from properties.kernel_paths import needs_numba
from scx_ref.ops import silu


def test_chunks_visit_every_float32_once_each_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(silu_error, "CHUNK", 1 << 12)
    limit = float(np.float32(1e-41))  # a subnormal: 7 137 bit patterns from 0 up
    top = silu_error.top_bits(limit)
    seen = np.concatenate(list(silu_error.chunks(limit, 1)))
    pos, neg = seen[~np.signbit(seen)], seen[np.signbit(seen)]
    assert np.array_equal(np.unique(pos.view(np.int32)), np.arange(top + 1, dtype=np.int32))
    assert np.array_equal(np.unique((-neg).view(np.int32)), np.arange(top + 1, dtype=np.int32))
    assert all(c.size % silu_error.ROW == 0 for c in silu_error.chunks(limit, 1))


def test_a_wrong_silu_is_reported_wrong() -> None:
    x = np.linspace(-20, 20, 4096, dtype=np.float32)
    exact = silu(x.astype(np.float64)).astype(np.float32)  # one rounding: <= 1 u32
    good, bad = silu_error.Worst(), silu_error.Worst()
    good.update(x, exact)
    bad.update(x, exact * np.float32(1 + 2**-20))  # 16 u32 off everywhere
    assert good.ulps <= 1.0
    assert 14.0 <= bad.ulps <= 18.0  # 16 u32, give or take the two roundings


@needs_numba
def test_the_sweep_reads_the_kernel_within_its_bound(capsys: pytest.CaptureFixture[str]) -> None:
    silu_error.main(["--limit", "87", "--stride", "4099", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("client (numba_kernels.swiglu_rows)")
    ulps = [float(line.split("max relative error ")[1].split(" u32")[0]) for line in out]
    assert 1.0 < ulps[0] <= 4.1 and 1.0 < ulps[1] <= 4.1


def test_the_sweep_refuses_a_limit_past_the_kernels_cut() -> None:
    with pytest.raises(SystemExit):
        silu_error.main(["--limit", "100"])

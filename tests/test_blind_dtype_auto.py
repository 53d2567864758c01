"""``blind_dtype="auto"`` on a bfloat16/float16 backend, and where ``scx ppl``/``scx verify`` print a
PrecisionWarning.

1. ``auto`` is to pick the dtype of blinded messages so the measured exactness holds. It widened to
   float64 only above float32's limit (β = 5), so a bfloat16 run at the default β = 5 — or β = 1 — blinded
   in bfloat16, whose limit is 7.6e-5: the logits were off plaintext bfloat16 by up to 0.19 on the tiny
   model, with a PrecisionWarning. Now ``auto`` blinds in the backend's dtype only up to that dtype's own
   :func:`beta_limit`, else in float64; ``backend`` still blinds in bfloat16 and warns.
2. The warning was printed into the progress bar's line (each client is built inside the bar's loop); now
   it is printed once, on its own line, before the bar starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref import KeySchedule
from scx_ref.errors import ConfigError, PrecisionWarning
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.config import F32_BETA_LIMIT, beta_limit
from scx_ref.protocol.messages import Reply, Request

from .tiny import tiny_weights

torch = pytest.importorskip("torch")

BF16_LIMIT = beta_limit("bfloat16", "bfloat16")  # 1.5e-5
FP16_LIMIT = beta_limit("float16", "float16")  # 1.2e-4


# -- 1. the choice ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [1.0, F32_BETA_LIMIT])
def test_auto_widens_a_half_precision_run_past_its_own_limit(dtype: Any, beta: float) -> None:
    assert SCXConfig(beta=beta).wide_blinding(dtype)
    assert not SCXConfig(beta=beta, blind_dtype="backend").wide_blinding(dtype)
    assert SCXConfig(beta=beta, blind_dtype="float64").wide_blinding(dtype)


def test_auto_keeps_the_backend_dtype_within_its_limit() -> None:
    """Within a dtype's own limit ``auto`` blinds in it: float32 up to β = 1 (by name, numpy or torch
    dtype; up to β = 5 until stop 70, whose SmolLM2 draws left float32's bound at β = 3 and 5), float16 up
    to 1.2e-4, bfloat16 up to 1.5e-5; float64 never widens."""
    for f32 in ("float32", np.float32, torch.float32):
        assert not SCXConfig(beta=F32_BETA_LIMIT).wide_blinding(f32)
        assert SCXConfig(beta=5.5).wide_blinding(f32)
        assert SCXConfig(beta=5.0).wide_blinding(f32)  # the presets' β
        assert SCXConfig(level="blind", beta=2.0).wide_blinding(f32)
    for f64 in ("float64", np.float64, torch.float64):
        assert not SCXConfig(beta=1e8).wide_blinding(f64)
    assert not SCXConfig(beta=FP16_LIMIT).wide_blinding(torch.float16)
    assert not SCXConfig(beta=BF16_LIMIT).wide_blinding(torch.bfloat16)
    between = SCXConfig(beta=2 * BF16_LIMIT)  # past bfloat16's limit, within float16's
    assert between.wide_blinding("bfloat16") and not between.wide_blinding("float16")
    assert not SCXConfig(beta=0.0).wide_blinding("bfloat16")
    assert not SCXConfig(beta=BF16_LIMIT, stage_beta={"qkv": BF16_LIMIT}).wide_blinding("bfloat16")
    assert SCXConfig(beta=0.0, stage_beta={"o": 1.0}).wide_blinding("bfloat16")  # every β counts


@pytest.mark.parametrize("bad", [2, 4, 8, np.int64(4), True, None, "int32", "bf16", 4.0, object()])
def test_a_dtype_no_backend_computes_in_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="backend dtype must be one of"):
        SCXConfig().wide_blinding(bad)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_auto_on_half_precision_is_not_warned_and_backend_is(dtype: Any) -> None:
    for beta in (1.0, F32_BETA_LIMIT):
        assert SCXConfig(beta=beta).precision_warning(dtype) is None
        message = SCXConfig(beta=beta, blind_dtype="backend").precision_warning(dtype)
        assert message is not None and f"on a {str(dtype).replace('torch.', '')} backend" in message


# -- 1. end to end on a bfloat16 torch backend --------------------------------------------------------


class _Spy(LocalTransport):
    """A LocalTransport that notes each request's stage, array dtypes and ``wide`` flag."""

    def __init__(self, server: Server[Any]) -> None:
        super().__init__(server)
        self.seen: list[tuple[str, str, bool]] = []

    def send(self, request: Request) -> Reply:
        for v in request.arrays.values():
            self.seen.append((request.stage.value, str(v.dtype), request.meta.get("wide", False) is True))
        return super().send(request)


def _prefill(backend: Any, cfg: SCXConfig, prompt: np.ndarray) -> tuple[Client[Any], _Spy, np.ndarray]:
    client = Client(backend, KeySchedule(bytes([7]) * 32, bytes(16)), cfg)
    link = _Spy(Server(backend))
    logits = client.prefill(prompt, link)
    return client, link, np.asarray(logits, np.float64)[-len(prompt) :]


@pytest.mark.parametrize("level", ["paper", "blind"])
@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_bfloat16_auto_blinds_in_float64_end_to_end(level: str, beta: float) -> None:
    """On tests/tiny.py's model in bfloat16: ``auto`` sends the blinded QKV rows in float64 (wide), warns
    nothing and gives plaintext bfloat16's logits (measured: identical); ``backend`` blinds in bfloat16,
    warns, and is off by 0.03–0.19 (the error ``auto`` had before)."""
    from scx_ref.backends.torch_backend import TorchBackend
    from scx_ref.forward import PlainRunner

    w = tiny_weights(0)
    prompt = np.array([1, 5, 9, 3, 7, 2, 11, 4])
    backend = TorchBackend(w, torch.bfloat16)
    plain = PlainRunner(backend).forward(prompt).float().numpy().astype(np.float64)
    kw: dict[str, Any] = {"level": level, "beta": beta, "max_length": 16, "decoys": "gaussian"}

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        client, link, auto = _prefill(backend, SCXConfig(**kw), prompt)
    assert client.wide
    qkv = {(dt, wide) for stage, dt, wide in link.seen if stage == "qkv"}
    assert ("torch.float64", True) in qkv and all(wide for dt, wide in qkv if dt == "torch.float64")

    with pytest.warns(PrecisionWarning, match="in bfloat16 on a bfloat16 backend"):
        client, link, narrow = _prefill(backend, SCXConfig(**kw, blind_dtype="backend"), prompt)
    assert not client.wide
    assert {dt for stage, dt, _ in link.seen if stage == "qkv"} == {"torch.bfloat16"}

    err_auto, err_narrow = np.abs(auto - plain).max(), np.abs(narrow - plain).max()
    assert err_narrow > 1e-2, err_narrow  # the control: bfloat16 blinding is visibly off
    assert err_auto <= 0.1 * err_narrow and err_auto < 1e-2, (err_auto, err_narrow)


# -- 2. the warning on its own line -------------------------------------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scx_ref.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _warning_lines(stderr: str) -> list[str]:
    """The lines (between newlines) of ``stderr`` that carry a PrecisionWarning: each must be a line of
    its own, not the tail of a progress bar's (which tqdm redraws with carriage returns)."""
    lines = [line for line in stderr.split("\n") if "PrecisionWarning" in line]
    for line in lines:
        assert "\r" not in line and "window" not in line.split("PrecisionWarning")[0], repr(line)
        assert ": PrecisionWarning: β = 1e+10 " in line and "is not exact" in line, line
    return lines


def test_scx_ppl_prints_the_warning_on_its_own_line() -> None:
    """β = 1e10 on float32 (float64 blinding past its 1e9): the warning, then the bar — each client used
    to issue it after the bar had started, into the bar's line."""
    r = _cli("ppl", "--model", "tiny-llama", "--tokens", "48", "--window", "16", "--beta", "1e10")
    assert r.returncode in (0, 1), r.stderr
    assert len(_warning_lines(r.stderr)) == 1, r.stderr
    assert r.stderr.index("PrecisionWarning") < r.stderr.index("window"), r.stderr


def test_scx_verify_prints_the_warning_once_on_its_own_line() -> None:
    """With every warning shown (``-W always``), ``scx verify`` says it once, before any bar — each of its
    clients (the ΔPPL run's inside its bar) used to repeat it."""
    r = _cli("verify", "--model", "tiny-llama", "--tokens", "16", "--beta", "1e10", PYTHONWARNINGS="always")
    assert r.returncode in (0, 1), r.stderr
    assert len(_warning_lines(r.stderr)) == 1, r.stderr
    assert r.stderr.index("PrecisionWarning") < r.stderr.index("window"), r.stderr


def test_the_sweep_prints_the_warning_on_its_own_line(tmp_path: Path) -> None:
    """``python -m scx_models.runs sweep`` builds a client per β inside its bar's loop: β = 10 blinded in
    float32 (``--blind-dtype backend``, past its 5) is said once, before that β's bar, not into it."""
    args = ["--model", "tiny-llama", "--dtypes", "float32", "--betas", "10", "--blind-dtype", "backend"]
    args += ["--tokens", "48", "--window", "16"]
    r = subprocess.run(
        [sys.executable, "-m", "scx_models.runs", "sweep", *args, "--out", str(tmp_path / "sweep.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode in (0, 1), r.stderr
    lines = [line for line in r.stderr.split("\n") if "PrecisionWarning" in line]
    assert len(lines) == 1, r.stderr
    assert "\r" not in lines[0] and "window" not in lines[0].split("PrecisionWarning")[0], repr(lines[0])
    assert r.stderr.index("PrecisionWarning") < r.stderr.index("window"), r.stderr

"""A β past the limit of the dtype its blinded stages run in is taken, not refused — and not silent:
:meth:`SCXConfig.precision_warning` says so (β, dtypes, the rounding to expect, the fix) and
:meth:`SCXConfig.warn_precision` issues it as a :class:`PrecisionWarning`. Before, β = 1e13 on float64 (or
β = 50 with ``blind_dtype="backend"`` on float32) ran with every reply check passing and no word."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref import KeySchedule
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, PrecisionWarning, SCXError, SCXWarning
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.config import F32_BETA_LIMIT, F64_BETA_LIMIT, MAX_BETA, WIDE_BETA_LIMIT, beta_limit
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.protocol.presets import PRESETS
from scx_ref.reference import ReferenceModel

from .tiny import tiny_config, tiny_weights


def _plan_betas(cfg: SCXConfig, **model: Any) -> list[float]:
    """The β of every blinded message of ``cfg`` on the tiny model (what the client would pass)."""
    plan = ReleasePlan.of(cfg, tiny_config(**model))
    return [r.beta for r in (*plan.prefill, *plan.generation)]


# (configuration, backend dtype, what the message must name)
WARNS: list[tuple[dict[str, Any], Any, tuple[str, ...]]] = [
    # float32 blinding past its measured limit (only with blind_dtype="backend": "auto" widens)
    ({"beta": 50.0, "blind_dtype": "backend"}, "float32", ("β = 50", "float32", "blind_dtype='float64'")),
    ({"level": "blind", "beta": 5.5, "blind_dtype": "backend"}, np.float32, ("β = 5.5", "β ≤ 1")),
    # β = 5, the presets' β, blinded in float32: beyond the bound in 7 of 26 SmolLM2 draws (stop 70)
    ({"level": "blind", "beta": 5.0, "blind_dtype": "backend"}, "float32", ("β = 5", "β ≤ 1")),
    ({"beta": 1.0, "stage_beta": {"qkv": 40.0}, "blind_dtype": "backend"}, "float32", ("β = 40",)),
    # float64 blinded stages of a float32 run past float32's bound
    ({"beta": 1e13}, "float32", ("β = 1e+13", "in float64 on a float32", "β ≤ 5e+08")),
    ({"beta": 2e9, "blind_dtype": "float64"}, np.dtype(np.float32), ("β = 2e+09", "1e-5")),
    # a float64 run past float64's measured bound 1e-9
    ({"beta": 1e13}, "float64", ("β = 1e+13", "float64 backend", "1e-9", "β ≤ 5e+04")),
    ({"level": "blind", "beta": 1e6}, np.float64, ("β = 1e+06",)),
    ({"level": "blind", "beta": 3e5}, np.float64, ("β = 3e+05",)),  # quiet until stop 70's draws
    ({"beta": 1e17}, "float64", ("lost entirely",)),
    # bfloat16 / float16 blinding (in the backend's own dtype)
    (
        {"beta": 1.0, "blind_dtype": "backend"},
        "bfloat16",
        ("bfloat16", "not measured", "blind_dtype='float64'"),
    ),
    ({"beta": 1.0, "blind_dtype": "backend"}, torch.float16, ("float16 backend",)),
    ({"beta": 5.0, "blind_dtype": "backend"}, torch.bfloat16, ("β = 5", "bfloat16")),
    ({"beta": 1e12, "blind_dtype": "backend"}, "float16", ("blind_dtype='float64' with a β ≤ 5e+08",)),
]


@pytest.mark.parametrize(("kw", "dtype", "names"), WARNS)
def test_a_beta_past_its_dtypes_limit_warns(kw: dict[str, Any], dtype: Any, names: tuple[str, ...]) -> None:
    cfg = SCXConfig(**kw)
    with pytest.warns(PrecisionWarning) as record:
        message = cfg.warn_precision(dtype, stacklevel=1)
    assert len(record) == 1 and str(record[0].message) == message
    assert message is not None and "not exact" in message and "Use " in message
    for name in names:
        assert name in message, (name, message)


def test_the_warning_points_at_the_caller_stacklevel_frames_up() -> None:
    """``stacklevel`` counts from warn_precision's caller, as :func:`warnings.warn`'s does: 1 is the calling
    line (a client passes 2: its own caller's)."""
    with pytest.warns(PrecisionWarning) as record:
        SCXConfig(beta=1e13).warn_precision("float64", stacklevel=1)
    assert len(record) == 1 and record[0].filename == __file__

    def caller() -> None:
        SCXConfig(beta=1e13).warn_precision("float64", stacklevel=2)

    with pytest.warns(PrecisionWarning) as record:
        caller()
    assert record[0].filename == __file__
    assert record[0].lineno == sys._getframe().f_lineno - 2


# (configuration, backend dtype) that keep the measured exactness, or blind nothing
QUIET: list[tuple[dict[str, Any], Any]] = [
    *(({}, d) for d in ("float32", "float64", np.float32, np.float64, torch.float32, torch.float64)),
    *(({"level": "blind"}, d) for d in ("float32", "float64")),
    ({"beta": F32_BETA_LIMIT, "blind_dtype": "backend"}, "float32"),
    ({"beta": 5.5}, "float32"),  # "auto" blinds in float64 above the float32 limit
    ({"level": "blind", "beta": 5.0}, "float32"),  # the presets' β: "auto" blinds it in float64 too
    ({"beta": 1e4, "blind_dtype": "float64"}, "float32"),
    ({"beta": WIDE_BETA_LIMIT}, "float32"),
    ({"beta": WIDE_BETA_LIMIT}, torch.bfloat16),  # float64 blinding of a bfloat16 run
    ({"beta": 5.0}, torch.bfloat16),  # "auto" blinds in float64 past bfloat16's own limit (1.5e-5)
    ({"level": "blind", "beta": 1.0}, torch.float16),  # and past float16's (1.2e-4)
    ({"beta": 50.0, "blind_dtype": "backend"}, "float64"),
    ({"level": "blind", "beta": F64_BETA_LIMIT}, "float64"),
    ({"beta": 0.0}, "float32"),
    ({"beta": 0.0, "blind_dtype": "backend"}, torch.bfloat16),
    ({"level": "blind", "beta": 0.0}, "float64"),
    ({"level": "permute", "beta": MAX_BETA}, "float64"),
    ({"level": "permute", "beta": 1e13, "blind_dtype": "backend"}, "float32"),
    ({"level": "permute", "beta": 50.0, "blind_dtype": "backend"}, torch.bfloat16),
]


@pytest.mark.parametrize(("kw", "dtype"), QUIET)
def test_no_warning_within_the_limits_or_without_blinding(kw: dict[str, Any], dtype: Any) -> None:
    cfg = SCXConfig(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.warn_precision(dtype) is None
        assert cfg.warn_precision(dtype, _plan_betas(cfg)) is None


def test_the_limits_follow_the_unit_roundoffs() -> None:
    """float32's measured 1, float64 blinding of a float32 run below 1·2²⁹ ≈ 5.4e8, a float64 run's
    5e4 (≈ 1·2²⁹·1e-4, its bound 1e-9 against 1e-5), and float32's 1 scaled to bf16/fp16."""
    assert beta_limit("float32", "float32") == F32_BETA_LIMIT == 1.0
    assert beta_limit("float32", "float64") == beta_limit(torch.bfloat16, "float64") == WIDE_BETA_LIMIT
    assert WIDE_BETA_LIMIT <= F32_BETA_LIMIT * 2**29 < 10 * WIDE_BETA_LIMIT
    assert beta_limit("float64", "float64") == F64_BETA_LIMIT
    assert F64_BETA_LIMIT / 2 < F32_BETA_LIMIT * 2**29 * 1e-4 < F64_BETA_LIMIT * 2
    assert beta_limit("bfloat16", "bfloat16") == F32_BETA_LIMIT * 2.0**-16
    assert beta_limit(torch.float16, torch.float16) == F32_BETA_LIMIT * 2.0**-13
    with pytest.raises(ConfigError):
        beta_limit("float64", "float32")  # blinded stages never run narrower than the backend


def test_the_plan_decides_which_beta_counts() -> None:
    """With the client's plan only the β of stages that are blinded counts: an override for a stage the
    plan does not blind (``o`` at generation with ``gen_linear="client"``; ``router`` on a dense model)
    does not warn; once that stage is blinded it does."""
    quiet = SCXConfig(beta=1.0, stage_beta={"o": 1e12})  # level paper: only QKV is blinded
    assert quiet.precision_warning("float32", _plan_betas(quiet)) is None
    assert quiet.precision_warning("float32") is not None  # without the model: every override counts
    loud = SCXConfig(beta=1.0, stage_beta={"o": 1e12}, gen_linear="server")
    message = loud.precision_warning("float32", _plan_betas(loud))
    assert message is not None and "β = 1e+12" in message
    router = SCXConfig(level="blind", beta=1.0, stage_beta={"router": 1e12})
    assert router.precision_warning("float64", _plan_betas(router)) is None
    assert router.precision_warning("float64", _plan_betas(router, moe=True)) is not None
    assert _plan_betas(SCXConfig(level="permute", beta=1e13)) == []


def test_making_a_configuration_never_warns() -> None:
    """The warning comes with a backend dtype; constructing any configuration — the presets, the largest
    β, every blind_dtype — stays silent (nothing existing turns noisy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for level in ("permute", "paper", "blind"):
            for blind in ("auto", "backend", "float64"):
                SCXConfig(level=level, beta=MAX_BETA, blind_dtype=blind)
        for p in PRESETS:
            p.config(4)


@pytest.mark.parametrize("bad", ["int32", "float128", "bf16", None, 4, object()])
def test_a_dtype_that_no_backend_computes_in_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="backend dtype must be one of"):
        SCXConfig().precision_warning(bad)


@pytest.mark.parametrize("betas", [[-1.0], [float("nan")], [True], [MAX_BETA * 2], ["5"]])
def test_a_beta_a_configuration_would_refuse_is_refused(betas: list[Any]) -> None:
    with pytest.raises(ConfigError, match="betas"):
        SCXConfig().precision_warning("float32", betas)


def test_the_warning_is_a_project_warning_not_an_error() -> None:
    assert issubclass(PrecisionWarning, SCXWarning) and issubclass(SCXWarning, UserWarning)
    assert not issubclass(PrecisionWarning, SCXError)


def test_the_warning_tells_the_truth_on_a_session() -> None:
    """What the warning says happens: on the tiny float64 model at level blind, β = 1e13 gets past every
    reply check with logits far from the plaintext ones (float64's own rounding is ~1e-15), and β = 1
    stays exact without a warning."""
    w = tiny_weights(0)
    prompt = np.array([1, 5, 9, 3, 7, 2])
    ref, _ = ReferenceModel(w).forward(prompt)
    errors = {}
    for beta in (1.0, 1e13):
        cfg = SCXConfig(level="blind", beta=beta, max_length=16, decoys="gaussian")
        with warnings.catch_warnings():  # whether the client itself warns is not what this test checks
            warnings.simplefilter("ignore", PrecisionWarning)
            client = Client(NumpyBackend(w), KeySchedule.generate(), cfg)
            logits = client.prefill(prompt, LocalTransport(Server(NumpyBackend(w))))
        errors[beta] = float(np.max(np.abs(np.asarray(logits)[-ref.shape[0] :] - ref)))
        message = cfg.precision_warning(NumpyBackend(w).dtype, _plan_betas(cfg))
        assert (message is not None) == (beta > F64_BETA_LIMIT)
    assert errors[1.0] < 1e-12 and errors[1e13] > 1e-6, errors

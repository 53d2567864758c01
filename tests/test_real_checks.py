"""The one check of a real-number argument, :func:`scx_ref._checks.check_real`, and its callers.

Each home that used to check a float its own way (the attacks' ``float_arg``, the DP checks, ModelConfig's
``rms_eps``/``rope_theta``, ``random_weights``' scale, SCXConfig's β, ``laplace_noise``'s β, the service's
timeouts, ServerLimits' ``idle_ttl``, the CLI's ``float_at_least``, the sampling settings) now calls it:
the same accepted set (a real number, never a bool), the same refusals (NaN, ±Inf unless allowed, an
integer past float64 — which used to be a raw OverflowError/TypeError in several of them), each caller's
own error class. SCXConfig also refuses a β past :data:`~scx_ref.protocol.config.MAX_BETA`, where the
client's own float64 checks overflowed and blamed the server.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from scx_ref._checks import check_real
from scx_ref.attacks._model import float_arg
from scx_ref.backends import NumpyBackend
from scx_ref.commands._args import float_at_least
from scx_ref.config import ModelConfig
from scx_ref.dp._validate import check_delta, check_nonnegative, check_positive
from scx_ref.errors import (
    ConfigError,
    IntegrityError,
    NonFiniteError,
    PrecisionWarning,
    ProtocolError,
    SCXError,
)
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.config import MAX_BETA
from scx_ref.protocol.limits import ServerLimits
from scx_ref.protocol.presets import PRESETS
from scx_ref.sampling import generation_settings
from scx_ref.transforms import laplace_noise
from scx_ref.weights import random_weights

from .tiny import TINY, tiny_config, tiny_weights

HUGE = 10**400  # an integer float64 cannot hold: float(HUGE) raises OverflowError


# -- check_real itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [0, 3, 2.5, np.float32(0.5), np.float64(1e-5), np.int64(7), np.uint8(4), Fraction(1, 4)]
)
def test_a_real_number_of_any_kind_comes_back_as_a_python_float(value: Any) -> None:
    out = check_real(value, "x")
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (True, "bool True"),
        (np.bool_(False), "bool np.False_"),
        ("1.5", "str '1.5'"),
        (b"1", "bytes b'1'"),
        (1j, "complex 1j"),
        (None, "NoneType None"),
        (np.array(1.0), "ndarray array(1.)"),
        (Decimal("0.5"), "Decimal Decimal('0.5')"),
    ],
)
def test_what_is_not_a_real_number_is_refused_naming_its_type(value: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_real(value, "x", 0)
    assert str(info.value) == f"x must be a real number, got {shown}"


@pytest.mark.parametrize(
    ("value", "kw", "message"),
    [
        (math.nan, {}, "x must be finite, got nan"),
        (math.inf, {"lo": 0}, "x must be finite and >= 0, got inf"),
        (-math.inf, {"lo": 0, "hi": 1}, "x must be finite and in [0, 1], got -inf"),
        (np.float32("nan"), {"lo": 0, "lo_open": True}, "x must be finite and > 0, got np.float32(nan)"),
        (HUGE, {"lo": 0}, "x must be finite and >= 0, got an integer of 1329 bits"),
        (-HUGE, {}, "x must be finite, got an integer of 1329 bits"),
        (
            Fraction(HUGE, 3),
            {},
            "x must be finite, got Fraction(100000000000000000000000000000000000000000000000...",
        ),
        (math.nan, {"lo": 0, "allow_inf": True}, "x must be a number >= 0 (inf allowed), got nan"),
        (
            HUGE,
            {"allow_inf": True},
            "x is beyond the float64 range (pass inf for an unbounded value), got an integer of 1329 bits",
        ),
    ],
)
def test_nan_inf_and_numbers_past_float64_are_refused(value: Any, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_real(value, "x", **kw)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "kw", "message"),
    [
        (-1.0, {"lo": 0}, "x must be >= 0, got -1.0"),
        (0.0, {"lo": 0, "lo_open": True}, "x must be > 0, got 0.0"),
        (2, {"hi": 1}, "x must be <= 1, got 2"),
        (1, {"hi": 1, "hi_open": True}, "x must be < 1, got 1"),
        (1.5, {"lo": 0, "hi": 1}, "x must lie in [0, 1], got 1.5"),
        (0, {"lo": 0, "hi": 1, "lo_open": True}, "x must lie in (0, 1], got 0"),
        (
            1.0,
            {"lo": 0, "hi": 1, "lo_open": True, "hi_open": True},
            "x must lie in the open interval (0, 1), got 1.0",
        ),
        (0.1, {"lo": 0.25}, "x must be >= 0.25, got 0.1"),
        (2e100, {"hi": 1e100}, "x must be <= 1e+100, got 2e+100"),
        (-math.inf, {"lo": 0, "allow_inf": True}, "x must be >= 0, got -inf"),
    ],
)
def test_a_value_out_of_range_names_the_range(value: Any, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_real(value, "x", **kw)
    assert str(info.value) == message


def test_the_ends_of_a_range_and_infinity_where_allowed() -> None:
    assert check_real(0, "x", 0) == 0.0 and check_real(1, "x", 0, 1) == 1.0
    assert check_real(1e-300, "x", 0, lo_open=True) == 1e-300
    assert check_real(math.inf, "x", 0, allow_inf=True) == math.inf
    assert check_real(-math.inf, "x", allow_inf=True) == -math.inf


def test_each_caller_keeps_its_error_class() -> None:
    with pytest.raises(ProtocolError, match="must be a real number"):
        check_real("1", "x", error=ProtocolError)
    with pytest.raises(ProtocolError, match="must be >= 0"):
        check_real(-1, "x", 0, error=ProtocolError, nonfinite_error=NonFiniteError)
    with pytest.raises(NonFiniteError, match="must be finite"):
        check_real(math.nan, "x", 0, error=ProtocolError, nonfinite_error=NonFiniteError)
    with pytest.raises(NonFiniteError, match="must be finite"):
        check_real(HUGE, "x", 0, error=ProtocolError, nonfinite_error=NonFiniteError)


# -- the callers ---------------------------------------------------------------------------------------


def _serve_options(**kw: Any) -> Any:
    pytest.importorskip("grpc")
    from scx_ref.service.service import ServeOptions

    return ServeOptions(**kw)


#: (name, a call with an integer past float64, the error class). Before check_real: a raw OverflowError
#: (math.isfinite / float of the int) or TypeError (np.isfinite of a Python int object) in most of them.
HUGE_CALLS: list[tuple[str, Callable[[], object], type[SCXError]]] = [
    ("float_arg", lambda: float_arg(HUGE, "tol", 0.0), ConfigError),
    ("model-config-rms-eps", lambda: ModelConfig(**{**TINY, "rms_eps": HUGE}), ConfigError),
    ("model-config-rope-theta", lambda: ModelConfig(**{**TINY, "rope_theta": HUGE}), ConfigError),
    (
        "random-weights-scale",
        lambda: random_weights(tiny_config(), np.random.default_rng(0), scale=HUGE),
        ConfigError,
    ),
    ("scx-config-beta", lambda: SCXConfig(beta=HUGE), ConfigError),
    ("scx-config-stage-beta", lambda: SCXConfig(stage_beta={"o": HUGE}), ConfigError),
    ("server-limits-idle-ttl", lambda: ServerLimits(idle_ttl=HUGE), ConfigError),
    ("serve-options-grace", lambda: _serve_options(grace=HUGE), ConfigError),
    ("serve-options-idle-timeout", lambda: _serve_options(idle_timeout=HUGE), ConfigError),
    (
        "sampling-temperature",
        lambda: generation_settings(None, {"max_new_tokens": 1, "temperature": HUGE}),
        ConfigError,
    ),
    ("laplace-beta", lambda: laplace_noise((2,), HUGE, np.random.default_rng(0)), ConfigError),
    ("dp-positive", lambda: check_positive(HUGE, "scale"), NonFiniteError),
    ("dp-nonnegative", lambda: check_nonnegative(HUGE, "sensitivity"), NonFiniteError),
    ("dp-delta", lambda: check_delta(HUGE), NonFiniteError),
]


@pytest.mark.parametrize(("call", "error"), [c[1:] for c in HUGE_CALLS], ids=[c[0] for c in HUGE_CALLS])
def test_an_integer_past_float64_is_a_project_error_everywhere(
    call: Callable[[], object], error: type
) -> None:
    with pytest.raises(error, match="an integer of 1329 bits"):
        call()


BOOL_CALLS: list[tuple[str, Callable[[], object]]] = [
    ("float_arg", lambda: float_arg(True, "tol", 0.0)),  # was accepted as 1.0
    ("float_arg-numpy", lambda: float_arg(np.True_, "beta", 0.0, allow_inf=True)),  # was accepted as 1.0
    ("model-config", lambda: ModelConfig(**{**TINY, "rope_theta": True})),
    ("random-weights", lambda: random_weights(tiny_config(), np.random.default_rng(0), scale=True)),
    ("scx-config", lambda: SCXConfig(beta=np.bool_(True))),  # type: ignore[arg-type]
    ("server-limits", lambda: ServerLimits(idle_ttl=True)),
    ("serve-options", lambda: _serve_options(grace=True)),
    ("sampling", lambda: generation_settings(None, {"max_new_tokens": 1, "top_p": True})),
    ("laplace", lambda: laplace_noise((2,), True, np.random.default_rng(0))),
    ("dp", lambda: check_positive(np.True_, "scale")),
]


@pytest.mark.parametrize("call", [c[1] for c in BOOL_CALLS], ids=[c[0] for c in BOOL_CALLS])
def test_a_bool_is_not_a_real_number_anywhere(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigError, match=r"must be a real number, got bool"):
        call()


def test_numpy_numbers_are_taken_and_stored_as_python_floats() -> None:
    cfg = ModelConfig(**{**TINY, "rms_eps": np.float32(1e-5), "rope_theta": np.int64(500)})
    assert type(cfg.rms_eps) is float and cfg.rms_eps == float(np.float32(1e-5))
    assert type(cfg.rope_theta) is float and cfg.rope_theta == 500.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # stays a plain, serializable config
    plain = ModelConfig(**{**TINY, "rope_theta": 10000})  # a Python number is kept as given
    assert type(plain.rope_theta) is int
    assert ServerLimits(idle_ttl=np.float32(2.5)).idle_ttl == 2.5
    assert type(ServerLimits(idle_ttl=np.float32(2.5)).idle_ttl) is float
    w = random_weights(tiny_config(), np.random.default_rng(0), scale=np.float32(0.5))
    assert np.array_equal(
        w.layers[0].wq, random_weights(tiny_config(), np.random.default_rng(0), scale=0.5).layers[0].wq
    )
    assert float_arg(np.float32(0.25), "tol", 0.0) == 0.25
    assert float_arg(math.inf, "beta", 0.0, allow_inf=True) == math.inf


def test_the_cli_number_type_refuses_what_float64_makes_infinite() -> None:
    positive = float_at_least(0.0, strict=True)
    assert positive("2.5") == 2.5
    for text, message in (
        ("1e400", "must be finite and > 0, got inf"),
        ("nan", "must be finite and > 0, got nan"),
        ("0", "must be > 0, got 0.0"),
    ):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            positive(text)
        assert str(info.value) == message
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must lie in \[0, 1\], got 2\.0$"):
        float_at_least(0, maximum=1)("2")
    with pytest.raises(argparse.ArgumentTypeError, match="not a number"):
        positive("abc")


# -- the largest β (SCXConfig) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"beta": 1e200},
        {"beta": MAX_BETA * (1 + 2**-52)},
        {"beta": 2 * 10**100},
        {"stage_beta": {"o": 1e154}},
        {"level": "blind", "stage_beta": {"qkv": 5.0, "lm_head": 1e300}},
    ],
)
def test_a_beta_past_max_beta_is_refused_when_the_config_is_made(kw: dict[str, Any]) -> None:
    """β = 1e200 used to be accepted; a session then failed at block 0's QKV stage with an IntegrityError
    ("the wqkv product is not finite") that blamed the server: the client's float64 norms of the blinded
    rows overflowed."""
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1e\+100\], got"):
        SCXConfig(**kw)


def test_every_beta_the_project_uses_is_still_taken() -> None:
    for beta in (0, 5.0, 1e4, 1e6, 1e8, MAX_BETA, np.float64(MAX_BETA), 10**100):
        assert SCXConfig(level="blind", beta=beta, stage_beta={"o": beta}).max_beta == float(beta)
    assert all(p.config(4).max_beta <= MAX_BETA for p in PRESETS)


@pytest.mark.parametrize("level", ["paper", "blind"])
def test_a_session_at_max_beta_passes_every_check(level: str) -> None:
    """At the largest β every float64 quantity of the client's checks stays finite, so an honest server's
    replies are accepted (the tokens are not the plaintext ones: at such a β the blinded rows keep nothing
    of x — DESIGN §6's ΔPPL against β — but no reply is wrongly blamed on the server)."""
    w = tiny_weights(0)
    with pytest.warns(PrecisionWarning, match="not exact"):  # x is lost in x + η: said, not refused
        client = Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level=level, beta=MAX_BETA))  # type: ignore[arg-type]
    try:
        tokens = client.generate(np.array([5, 17, 2, 8, 9]), 2, LocalTransport(Server(NumpyBackend(w))))
    except IntegrityError as exc:  # pragma: no cover - the failure this bound prevents
        pytest.fail(f"an honest server was blamed at β = MAX_BETA: {exc}")
    assert len(tokens) == 2

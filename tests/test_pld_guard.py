"""The PLD accountant refuses, before composing, an interval whose composed distribution is too big (an
explicit one, or the default one at a huge k).

``scx dp --sensitivity 1 --scale 1 -k 10000 --pld-interval 1e-4`` used to compose ~34 M values (~27 s,
~2.5 GB); it is now a ConfigError (``scx dp: error: ...``, exit 2) naming the size, the memory and the
smallest interval that fits. Runs that fit give the same ε as before, bit for bit.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest

from scx_ref.cli import main
from scx_ref.dp.accountants import (
    MAX_PLD_COMPOSED_POINTS,
    _composed_size,
    _single_plds,
    pld_available,
    pld_epsilon,
    pld_interval_for,
)
from scx_ref.dp.mechanisms import LaplaceMechanism
from scx_ref.errors import ConfigError
from tests.conftest import Composing

pytestmark = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")

MAX_COMPOSITIONS = 10**7  # scx dp's limit on -k (scx_ref.dp.cli.MAX_COMPOSITIONS)


def _suggested(message: str) -> float:
    found = re.search(r"use an interval >= ([0-9.e+-]+)$", message)
    assert found, message
    return float(found.group(1))


def test_fine_interval_refused_before_composing(no_composition: None) -> None:
    mech = [LaplaceMechanism(1.0, 1.0, 10000)]
    with pytest.raises(ConfigError) as info:
        pld_epsilon(mech, 1e-6, value_discretization_interval=1e-4)
    msg = str(info.value)
    assert "~33789152 values" in msg and "GB of memory" in msg and f"limit {MAX_PLD_COMPOSED_POINTS}" in msg
    fit = _suggested(msg)
    # the suggestion fits (the guard lets it through to the composition) ...
    with pytest.raises(Composing):
        pld_epsilon(mech, 1e-6, value_discretization_interval=fit)
    # ... and is the smallest that does at 3 significant digits
    with pytest.raises(ConfigError):
        pld_epsilon(mech, 1e-6, value_discretization_interval=fit - 1e-6)


def test_groups_add_up(no_composition: None) -> None:
    """Two groups that each fit but together do not are refused (composed lengths add)."""
    a, b = LaplaceMechanism(1.0, 1.0, 5000), LaplaceMechanism(1.0, 2.0, 5000)
    h = 3e-4
    sizes = [_composed_size(_single_plds({(m.sensitivity, m.scale): m.count}, h)) for m in (a, b)]
    assert all(s is not None and s <= MAX_PLD_COMPOSED_POINTS for s in sizes)
    for m in (a, b):
        with pytest.raises(Composing):
            pld_epsilon([m], 1e-6, value_discretization_interval=h)
    with pytest.raises(ConfigError, match="would compose the releases"):
        pld_epsilon([a, b], 1e-6, value_discretization_interval=h)


@pytest.mark.parametrize("eps", [1e-9, 1e-4, 0.01, 0.1, 1.0, 2.0, 10.0, 1e3, 1e4])
@pytest.mark.parametrize("k", [1, 2, 100, 10**4, 10**6, MAX_COMPOSITIONS])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_default_interval_never_refused(eps: float, k: int, scale: float, no_composition: None) -> None:
    """Over every k scx dp accepts, even the default interval passed explicitly passes the guard."""
    mech = [LaplaceMechanism(eps * scale, scale, k)]
    for interval in (None, pld_interval_for(mech)):
        with contextlib.suppress(Composing):  # k = 1 composes nothing; a ConfigError fails the test
            pld_epsilon(mech, 1e-6, value_discretization_interval=interval)


def test_default_interval_not_refused_for_large_k_that_fits(no_composition: None) -> None:
    """Model mode has no cap on k: where the default interval's composition fits (ε = 1, k = 10⁸:
    ~7.9·10⁶ values) it is not refused."""
    with pytest.raises((Composing, OverflowError)):
        pld_epsilon([LaplaceMechanism(1.0, 1.0, 10**8)], 1e-6)


@pytest.mark.parametrize("eps,k", [(0.5, 10**9), (1e-4, 10**12)])
def test_default_interval_refused_for_huge_k(eps: float, k: int, no_composition: None) -> None:
    """Past the composed-size limit even the default interval is refused, before composing, with the way
    out (tests/test_dp_model_k_guard.py covers the decision)."""
    with pytest.raises(ConfigError, match=r"no interval fits.*--no-pld"):
        pld_epsilon([LaplaceMechanism(eps, 1.0, k)], 1e-6)


def test_fine_interval_that_fits_gives_the_same_epsilon() -> None:
    """A run the guard lets through is exactly the unguarded dp_accounting computation."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    h = 1e-4
    mechs = [LaplaceMechanism(1.0, 1.0, 30), LaplaceMechanism(0.5, 2.0, 7), LaplaceMechanism(1.0, 1.0, 1)]
    total: Any = None
    for (sens, beta), count in [((0.5, 2.0), 7), ((1.0, 1.0), 31)]:
        one = pld.from_laplace_mechanism(
            beta, sensitivity=sens, pessimistic_estimate=True, value_discretization_interval=h
        )
        part = one.self_compose(count)
        total = part if total is None else total.compose(part)
    expected = float(total.get_epsilon_for_delta(1e-6))
    assert pld_epsilon(mechs, 1e-6, value_discretization_interval=h) == expected


def test_cli_error_line(capsys: pytest.CaptureFixture[str], no_composition: None) -> None:
    argv = ["dp", "--sensitivity", "1", "--scale", "1", "-k", "10000", "--pld-interval", "1e-4"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("scx dp: error: a PLD interval of 0.0001 would compose the releases into ~33789152")
    assert captured.out == ""


def test_missing_internals_fall_back_to_composing(
    monkeypatch: pytest.MonkeyPatch, no_composition: None
) -> None:
    """A dp_accounting without the sizing helper composes unguarded, as before (no crash, no refusal)."""
    from dp_accounting.pld import common

    monkeypatch.delattr(common, "compute_self_convolve_bounds")
    with pytest.raises(Composing):
        pld_epsilon([LaplaceMechanism(1.0, 1.0, 10000)], 1e-6, value_discretization_interval=1e-4)

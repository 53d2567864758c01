"""The composed-size guard covers the default PLD interval too (model mode has no cap on the releases).

``scx dp --model ... --tokens 1000000000`` (or ``compose`` of 10⁹ releases of ε = 0.5) used to compose, with
the default interval, a distribution dp-accounting sizes at ~5.7·10⁷ values (~4 GB), after computing
``3 ** 10⁹`` as a Python integer (hours). No interval fits there: once the interval exceeds the releases' ε
the size grows with their number, not with the interval. It is now a ConfigError (exit 2) before composing,
naming the size and telling to skip the PLD accountant. Runs that fit give the same ε as before, bit for
bit, and large ones no longer spend minutes in that integer power.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from scx_ref.cli import main
from scx_ref.dp import accountants as acc
from scx_ref.dp.accountants import (
    MAX_PLD_COMPOSED_POINTS,
    _composed_size,
    _dense_if_composed,
    _fitting_interval,
    _single_plds,
    pld_available,
    pld_epsilon,
    pld_interval_for,
)
from scx_ref.dp.mechanisms import LaplaceMechanism
from scx_ref.errors import ConfigError
from tests.conftest import Composing

pytestmark = pytest.mark.skipif(not pld_available(), reason="dp-accounting not installed")


def _groups(m: LaplaceMechanism) -> dict[tuple[float, float], int]:
    return {(m.sensitivity, m.scale): m.count}


@pytest.mark.parametrize("eps,k", [(0.5, 10**9), (0.1, 10**9), (0.01, 10**10), (1.0, 2 * 10**8)])
def test_default_interval_refused_when_nothing_fits(eps: float, k: int, no_composition: None) -> None:
    mech = LaplaceMechanism(eps, 1.0, k)
    h = pld_interval_for([mech])
    size = _composed_size(_single_plds(_groups(mech), h))
    assert size is not None and size > MAX_PLD_COMPOSED_POINTS  # the run the guard must stop
    assert _fitting_interval(_groups(mech), h, size) is None  # coarsening does not help
    with pytest.raises(ConfigError) as info:
        pld_epsilon([mech], 1e-6)
    msg = str(info.value)
    head = f"the default PLD interval ({h:.3g}) would compose the releases into ~{size} values"
    assert msg.startswith(head), msg
    assert "no interval fits" in msg and "--no-pld" in msg and f"at {k} releases" in msg


def test_no_interval_fits_is_true(no_composition: None) -> None:
    """'No interval fits' at ε = 0.5, k = 10⁹: finer and coarser intervals alike predict past the limit."""
    groups = {(0.5, 1.0): 10**9}
    for h in (0.05, 0.5, 2.0, 20.0, 100.0, 500.0, 700.0):
        size = _composed_size(_single_plds(groups, h))
        assert size is not None and size > MAX_PLD_COMPOSED_POINTS, h


@pytest.mark.parametrize("eps", [1e-3, 0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("k", [1, 2, 100, 10**4, 10**6, 10**7, 10**8])
def test_default_interval_that_fits_is_not_refused(eps: float, k: int, no_composition: None) -> None:
    """Control: wherever the default's predicted size fits, the guard lets it through to the composition."""
    mech = LaplaceMechanism(eps, 1.0, k)
    h = pld_interval_for([mech])
    try:
        size = _composed_size(_single_plds(_groups(mech), h))
    except OverflowError:  # interval past exp()'s range: pld_epsilon reports +inf, nothing composed
        assert pld_epsilon([mech], 1e-6) == math.inf
        return
    assert size is not None and size <= MAX_PLD_COMPOSED_POINTS
    if k == 1:
        assert pld_epsilon([mech], 1e-6) is not None
    else:
        with pytest.raises(Composing):
            pld_epsilon([mech], 1e-6)


def test_default_interval_suggests_one_that_fits(
    monkeypatch: pytest.MonkeyPatch, no_composition: None
) -> None:
    """Where a coarser interval does fit (here under a lowered limit), the refusal names it, and it passes."""
    monkeypatch.setattr(acc, "MAX_PLD_COMPOSED_POINTS", 200_000)
    mech = [LaplaceMechanism(1.0, 1.0, 100)]  # default interval 1e-4: ~1.3 M values
    with pytest.raises(ConfigError) as info:
        pld_epsilon(mech, 1e-6)
    msg = str(info.value)
    assert msg.startswith("the default PLD interval (0.0001) would compose the releases"), msg
    assert "limit 200000" in msg
    found = re.search(r"use an interval >= ([0-9.e+-]+)$", msg)
    assert found, msg
    with pytest.raises(Composing):
        pld_epsilon(mech, 1e-6, value_discretization_interval=float(found.group(1)))


def test_explicit_interval_never_suggests_one_that_does_not_fit(no_composition: None) -> None:
    """An explicit interval where nothing fits: the message says so instead of naming an interval that is
    refused in turn (the search used to give up after 20 tries and print its last, still too fine, guess)."""
    mech = [LaplaceMechanism(0.5, 1.0, 10**9)]
    with pytest.raises(ConfigError) as info:
        pld_epsilon(mech, 1e-6, value_discretization_interval=1.0)
    msg = str(info.value)
    assert msg.startswith("a PLD interval of 1 would compose the releases") and "no interval fits" in msg
    assert "use an interval >=" not in msg


def test_cli_model_mode_refuses_quickly(capsys: pytest.CaptureFixture[str], no_composition: None) -> None:
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--beta", "5000"]
    assert main([*argv, "--tokens", "300000000"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("scx dp: error: the default PLD interval (151) would compose the releases into ~")
    assert "no interval fits" in err and "--no-pld" in err
    assert captured.out == ""
    # what the message says to do works: the closed forms, no composition
    assert main([*argv, "--tokens", "300000000", "--no-pld"]) == 0
    assert re.search(r"^PLD +skipped \(--no-pld\)", capsys.readouterr().out, re.M)


# --- the composed result, and the sparse → dense shortcut -------------------------------------------------


def _unguarded(groups: dict[tuple[float, float], int], h: float, delta: float) -> float:
    """dp_accounting's own computation, as pld_epsilon did it before any guard or shortcut."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    total: Any = None
    for (sens, beta), count in sorted(groups.items()):
        one = pld.from_laplace_mechanism(
            beta, sensitivity=sens, pessimistic_estimate=True, value_discretization_interval=h
        )
        part = one.self_compose(count) if count > 1 else one
        total = part if total is None else total.compose(part)
    return float(total.get_epsilon_for_delta(delta))


@pytest.mark.parametrize(
    "mechs",
    [
        [LaplaceMechanism(0.5, 1.0, k)]
        for k in (1, 2, 6, 7, 9, 10, 11, 1000, 10**5)  # sparse/dense switch of dp_accounting: size**k vs 1000
    ]
    + [[LaplaceMechanism(3.0, 1.0, 12), LaplaceMechanism(0.05, 1.0, 5), LaplaceMechanism(0.7, 2.0, 3000)]],
)
@pytest.mark.parametrize("h", [None, 0.2, 1.0])
def test_same_epsilon_bit_for_bit(mechs: list[LaplaceMechanism], h: float | None) -> None:
    interval = pld_interval_for(mechs) if h is None else h
    groups: dict[tuple[float, float], int] = {}
    for m in mechs:
        groups[(m.sensitivity, m.scale)] = groups.get((m.sensitivity, m.scale), 0) + m.count
    assert pld_epsilon(mechs, 1e-6, value_discretization_interval=h) == _unguarded(groups, interval, 1e-6)


@pytest.mark.parametrize("eps,h", [(1.0, 1.0), (0.3, 0.5), (2.0, 3.0), (1.0, 0.2)])
@pytest.mark.parametrize("count", [2, 3, 5, 6, 7, 9, 10, 11, 64, 65, 1000])
def test_dense_shortcut_matches_dp_accounting(eps: float, h: float, count: int) -> None:
    """_dense_if_composed converts exactly when dp_accounting's self_compose would, to the same result."""
    from dp_accounting.pld import pld_pmf

    ((one, _),) = _single_plds({(eps, 1.0): count}, h)
    pmf = one._pmf_remove
    got = _dense_if_composed(one, count)
    if isinstance(pmf, pld_pmf.SparsePLDPmf) and pmf.size**count <= pld_pmf._MAX_PMF_SPARSE_SIZE:
        assert got is one  # dp_accounting stays sparse: left to it
    else:
        assert isinstance(got._pmf_remove, pld_pmf.DensePLDPmf)
    a, b = one.self_compose(count), got.self_compose(count)
    for name in ("_pmf_remove", "_pmf_add"):
        pa, pb = getattr(a, name), getattr(b, name)
        assert type(pa) is type(pb)
        assert pa.get_epsilon_for_delta(1e-6) == pb.get_epsilon_for_delta(1e-6)
        assert pa._infinity_mass == pb._infinity_mass
        if isinstance(pa, pld_pmf.DensePLDPmf):
            assert pa._lower_loss == pb._lower_loss and (pa._probs == pb._probs).all()
        else:
            assert pa._loss_probs == pb._loss_probs


def test_large_count_skips_the_integer_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse PMF composed 10⁶ times goes to the dense path directly: the sparse self_compose (whose
    ``size ** count`` costs 2.3 s at 10⁷ and minutes at 10⁸) is never called."""
    from dp_accounting.pld import pld_pmf

    def slow(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("sparse self_compose called with a large count")

    monkeypatch.setattr(pld_pmf.SparsePLDPmf, "self_compose", slow)
    mech = [LaplaceMechanism(0.5, 1.0, 10**6)]  # default interval 0.5 = ε: a 3-value sparse PMF
    ((one, _),) = _single_plds(_groups(mech[0]), pld_interval_for(mech))
    assert isinstance(one._pmf_remove, pld_pmf.SparsePLDPmf)
    eps = pld_epsilon(mech, 1e-6)
    assert eps is not None and math.isfinite(eps) and eps > 0

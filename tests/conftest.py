"""Fixtures shared by the test modules of tests/."""

from __future__ import annotations

from typing import Any

import pytest


class Composing(Exception):
    """Raised by the patched PLD composition (:func:`no_composition`): the size guard let the run through."""


@pytest.fixture
def no_composition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any dp-accounting PLD composition raise :class:`Composing`, so a test proves the composed-size
    guard decides before composing."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise Composing

    monkeypatch.setattr(pld.PrivacyLossDistribution, "self_compose", boom)
    monkeypatch.setattr(pld.PrivacyLossDistribution, "compose", boom)


@pytest.fixture(params=[True, False], ids=["fused", "eager"])
def kernels_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test with the compiled CPU kernels (``fused``; skipped without numba) and without them
    (``eager``): the value is whether they are on."""
    from scx_ref.backends import cpu_kernels

    on = bool(request.param)
    if on and cpu_kernels.kernels() is None:
        pytest.skip("numba not installed")
    monkeypatch.setattr(cpu_kernels, "ENABLED", on)
    return on

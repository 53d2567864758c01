"""scx_ref.timing: a method's calls timed without changing what they return or raise."""

from __future__ import annotations

import time

import numpy as np
import pytest

from scx_ref.backends import cpu_kernels
from scx_ref.timing import around, timed, timed_kernels, timed_server


class _Slow:
    def work(self, x: int, *, pause: float = 0.0) -> int:
        time.sleep(pause)
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    def handle(self, request: str) -> str:
        return request.upper()


def test_timed_adds_each_calls_seconds_and_keeps_results_and_errors() -> None:
    cls, spent = timed(_Slow, "work")
    obj = cls()
    assert isinstance(obj, _Slow) and obj.work(3, pause=0.02) == 6
    first = spent[0]
    assert first >= 0.02
    with pytest.raises(ValueError, match="negative"):
        obj.work(-1, pause=0.01)  # a call that raises is timed too
    assert spent[0] >= first + 0.01
    spent[0] = 0.0  # the caller resets it between measurements
    assert obj.handle("a") == "A" and spent[0] == 0.0  # other methods untouched


def test_around_calls_enter_and_leave_on_every_call_however_it_ends() -> None:
    events: list[str] = []
    cls = around(
        _Slow, "work", lambda: events.append("in") or 7, lambda t: events.append(f"out {t}"), "Around"
    )
    obj = cls()
    assert cls.__name__ == "Around" and isinstance(obj, _Slow) and obj.work(2) == 4
    with pytest.raises(ValueError, match="negative"):
        obj.work(-1)
    assert events == ["in", "out 7", "in", "out 7"]
    assert obj.handle("b") == "B" and len(events) == 4  # other methods untouched


def test_timed_server_times_handle() -> None:
    cls, spent = timed_server(_Slow)
    assert cls().handle("x") == "X" and spent[0] > 0.0


def test_timed_kernels_times_the_calls_it_is_not_told_to_skip() -> None:
    """Within the block each kernel call adds its seconds, one made while ``skip()`` holds does not, the
    results are the kernels' own; after the block (however it ends) the loaded kernels are back."""
    k = cpu_kernels.kernels()
    if k is None:
        pytest.skip("numba is not installed here: there are no kernels to time")
    x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    skipping = [False]
    with timed_kernels(lambda: skipping[0]) as spent:
        inside = cpu_kernels.kernels()
        assert inside is not None and inside is not k
        assert inside.rows_finite(x, np.array([0, 2])) == 1 and spent[0] > 0.0
        before = spent[0]
        skipping[0] = True
        assert inside.rows_finite(x, np.array([1])) == 1 and spent[0] == before
        assert inside.max_threads == k.max_threads
    assert cpu_kernels.kernels() is k
    with pytest.raises(RuntimeError), timed_kernels():
        raise RuntimeError("the block failed")
    assert cpu_kernels.kernels() is k


def test_timed_kernels_yields_zero_where_the_kernels_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    with timed_kernels() as spent:
        assert cpu_kernels.kernels() is None
    assert spent == [0.0]

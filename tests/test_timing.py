"""scx_ref.timing: a method's calls timed without changing what they return or raise."""

from __future__ import annotations

import time

import pytest

from scx_ref.timing import timed, timed_server


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


def test_timed_server_times_handle() -> None:
    cls, spent = timed_server(_Slow)
    assert cls().handle("x") == "X" and spent[0] > 0.0

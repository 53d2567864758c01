"""Shared checks that a call is refused with its project error and its whole message.

:func:`refused` is the one assertion every "each refusal has its class and whole message" test uses;
:func:`refusal_test` builds the parametrized test for a list of :data:`Refusal` cases, one case per entry
with the entry's name as its test id (the ids that ``mutation/annotations.toml`` names as "killed by")."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

#: (test id, the call, the error class it must raise, its whole message)
Refusal = tuple[str, Callable[[], object], type[Exception], str]


@contextmanager
def refused(error: type[Exception], message: str) -> Iterator[Any]:
    """The block must raise ``error`` (or a subclass) whose ``str`` is exactly ``message``."""
    with pytest.raises(error) as info:
        yield info
    got = str(info.value)
    assert got == message, (
        f"{type(info.value).__name__} message:\n  got:      {got!r}\n  expected: {message!r}"
    )


def refusal_test(refusals: Sequence[Refusal], *, warnings_as_errors: bool = False) -> Callable[..., None]:
    """A test, parametrized over ``refusals``, that each call is :func:`refused` with its error and message.

    ``warnings_as_errors``: a warning raised on the way is an error (a refusal must not warn first).
    Assign it to a module-level name starting with ``test_`` for pytest to collect it."""

    @pytest.mark.parametrize(
        ("call", "error", "message"), [r[1:] for r in refusals], ids=[r[0] for r in refusals]
    )
    def test(call: Callable[[], object], error: type[Exception], message: str) -> None:
        with warnings.catch_warnings():
            if warnings_as_errors:
                warnings.simplefilter("error")
            with refused(error, message):
                call()

    return test

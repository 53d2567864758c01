"""Whole messages of the server's refusals of a bad construction, an object that is not a Request, and a
second ``open`` carrying a token; and a new server's eviction count. Each was a surviving mutant of
``python -m mutation.run server`` (stop 82): the tests refused these calls but read no message."""

from __future__ import annotations

from typing import Any

from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.errors import ProtocolError
from scx_ref.protocol import Request, Server
from scx_ref.stages import Stage

from .refusals import Refusal, refusal_test
from .tiny import tiny_weights

W = tiny_weights(5)
OPEN_META: dict[str, Any] = dict(n=4, r1=1, r2=1, r_lock=1, l_s=1, l_e=1, max_length=8, level="paper")


def _server() -> Server[Any]:
    return Server(NumpyBackend(W))


REFUSALS: list[Refusal] = [
    ("backend-not-a-backend", lambda: Server("x"), ProtocolError, "backend must be a Backend, got str"),  # type: ignore[arg-type]
    ("not-a-request", lambda: _server().handle("x"), ProtocolError, "a request must be a Request, got str"),  # type: ignore[arg-type]
    (
        "open-with-a-token",
        lambda: _server().handle(Request("1" * 32, Stage.OPEN, -1, -1, 0, {}, dict(OPEN_META), "tok")),
        ProtocolError,
        "open carries no session token (its reply gives the session one)",
    ),
]

test_each_refusal_has_its_message = refusal_test(REFUSALS)


def test_a_new_server_has_evicted_nothing() -> None:
    assert _server().evictions == 0

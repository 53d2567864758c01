"""``ServeOptions`` bounds what its greeting carries: ``max_sessions`` and ``batch_rows`` at 2⁶³ − 1.

Before: only ``scx serve``'s option parser bounded ``--max-sessions``; a ``ServeOptions`` built in code took
any size, the service started, and every client's hello was refused (``codec.encode_hello`` holds int64
integers only), which each client reported as "not an SCX server".
"""

from __future__ import annotations

import pytest

from scx_ref.errors import ConfigError, WireError
from scx_ref.service import codec
from scx_ref.service.service import ServeOptions

LIMIT = 2**63 - 1


@pytest.mark.parametrize("name", ["max_sessions", "batch_rows"])
def test_a_size_the_greeting_cannot_carry_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ServeOptions(**{name: LIMIT + 1})  # type: ignore[arg-type]
    with pytest.raises(WireError):  # the greeting's own refusal, the reason for the bound
        codec.encode_hello({name: LIMIT + 1})
    ok = ServeOptions(**{name: LIMIT})  # type: ignore[arg-type]
    assert getattr(ok, name) == LIMIT
    codec.encode_hello({name: LIMIT})


def test_the_service_refuses_arguments_of_the_wrong_kind_before_starting_anything() -> None:
    """Before: an AttributeError (a server or options of another type) or a non-string model name in the
    greeting; now a ConfigError with the whole message, and no thread pool started."""
    import threading

    from scx_ref.backends import NumpyBackend
    from scx_ref.protocol import Server
    from scx_ref.service.service import SCXService
    from tests.refusals import refused
    from tests.tiny import tiny_weights

    server = Server(NumpyBackend(tiny_weights(0)))
    opts = ServeOptions(port=0, ops_port=None)
    before = threading.active_count()
    for args, message in [
        ((server.b, opts), "server must be a Server, got NumpyBackend"),
        ((server, {"port": 0}), "options must be ServeOptions, got dict"),
        ((server, opts, 3), "model_name must be a str, got int"),
    ]:
        with refused(ConfigError, message):
            SCXService(*args)  # type: ignore[arg-type]
    assert threading.active_count() == before

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

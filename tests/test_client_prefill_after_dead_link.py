"""A new prefill after the previous session's link died (or its close reply was refused): the new session
opens on a healthy link and runs exactly, the old one is left failed; on the same dead link the prefill
fails with the transport's own error and the client then recovers on a healthy link."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ProtocolError, ServiceError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage

from .tiny import tiny_weights

IDS = np.array([3, 1, 4, 1, 5])


class Flaky(LocalTransport):
    """A link that can die (every send then raises, as RemoteTransport on a lost connection), or answer
    CLOSE with a reply to another request."""

    dead = False
    bad_close = False

    def send(self, request: Request) -> Reply:
        if self.dead:
            raise ServiceError("the SCX server at scx://127.0.0.1:1 closed the connection")
        reply = super().send(request)
        if self.bad_close and request.stage is Stage.CLOSE:
            return dataclasses.replace(reply, seq=reply.seq + 1)
        return reply


def _client() -> tuple[Server[Any], Client[Any], ReferenceModel]:
    w = tiny_weights(0)
    b = NumpyBackend(w)
    return Server(b), Client(b, KeySchedule.generate(), SCXConfig(l_s=1, l_e=1)), ReferenceModel(w)


@pytest.mark.parametrize("how", ["dead", "bad_close"])
def test_a_failed_close_of_the_old_session_does_not_stop_a_new_prefill(how: str) -> None:
    """The old session's link died (or its close reply is refused): the new prefill on a healthy link opens
    and is exact, the old session is left failed (its server side expires at the idle TTL); generation on
    the new session goes on exactly. Before: the close's ServiceError stopped the prefill."""
    server, client, ref = _client()
    flaky, good = Flaky(server), LocalTransport(server)
    client.prefill(IDS, flaky)
    old = client.state
    setattr(flaky, how, True)
    logits = client.prefill(IDS[:3], good)
    np.testing.assert_allclose(logits, ref.prefill(IDS[:3])[0], rtol=1e-10, atol=1e-10)
    assert old is not None and old.failed and not old.closed
    new = client.state
    assert new is not None and new is not old and not new.failed and new.link is good
    # dead: the server still holds it (freed at its idle timeout); bad_close: the server did close it
    assert (old.keys.session_id in server.sessions) == (how == "dead")
    _, cache = ref.prefill(IDS[:3])
    token = int(np.argmax(logits[-1]))
    np.testing.assert_allclose(client.decode(token, good), ref.decode(token, cache), rtol=1e-10, atol=1e-10)


def test_a_new_prefill_on_the_dead_link_fails_with_the_transport_error_and_the_client_recovers() -> None:
    """The same dead link for the new prefill: the close is skipped past, the open fails with the transport's
    own (project) error, both sessions are failed, and a prefill on a healthy link then works."""
    server, client, ref = _client()
    flaky = Flaky(server)
    client.prefill(IDS, flaky)
    old = client.state
    flaky.dead = True
    with pytest.raises(ServiceError, match="closed the connection"):
        client.prefill(IDS[:3], flaky)
    failed = client.state
    assert old is not None and old.failed and failed is not None and failed is not old and failed.failed
    with pytest.raises(ProtocolError, match="failed"):  # the failed session sends nothing more
        client.decode(1, flaky)
    logits = client.prefill(IDS[:4], LocalTransport(server))
    np.testing.assert_allclose(logits, ref.prefill(IDS[:4])[0], rtol=1e-10, atol=1e-10)

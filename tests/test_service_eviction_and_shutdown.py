"""``scx serve``'s per-stream session bookkeeping after the protocol server evicts a session (DESIGN §5.6):

a stream kept the ids of the sessions it opened until it ended, also those the server had evicted (idle past
the TTL, by the idle sweep or on access), so a graceful shutdown waited its whole grace period for a
session that was already gone while the client's stream stayed open (it sends hellos, or messages the
server refuses).

Two stops of a service at once (a second signal, a second caller) drain and stop it once.

Waits are bounded loops on a condition; the one bound on time is that a shutdown ends well inside its grace.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.protocol import Server  # noqa: E402
from scx_ref.protocol.messages import Request  # noqa: E402
from scx_ref.service.codec import (  # noqa: E402
    FrameKind,
    reply_from,
)
from scx_ref.stages import Stage  # noqa: E402

from .services import InProcess, RawStream, wait_for  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

OPEN_META = {"n": 4, "r1": 1, "r2": 1, "r_lock": 1, "l_s": 1, "l_e": 1, "max_length": 16, "level": "paper"}
SID = "ab" * 16
GRACE = 30.0  # seconds a shutdown may wait for open sessions; one with none left must end well inside it


def _stop_seconds(srv: InProcess) -> float:
    t0 = time.monotonic()
    srv.stop()
    return time.monotonic() - t0


def _stream_ids(srv: InProcess) -> list[set[str]]:
    return [set(s.sessions) for s in list(srv.service.streams)]


def test_evict_idle_sessions_names_what_it_evicted() -> None:
    """The protocol server reports the evicted ids (evict_idle still counts them)."""
    now = [0.0]
    server: Server[Any] = Server(NumpyBackend(tiny_weights(3)), clock=lambda: now[0])
    ids = ["ab" * 16, "cd" * 16]
    for sid in ids:
        server.handle(Request(sid, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
    assert server.evict_idle_sessions() == []
    now[0] = server.limits.idle_ttl + 1
    assert sorted(server.evict_idle_sessions()) == ids and server.sessions == {}
    assert server.evict_idle_sessions() == [] and server.evict_idle() == 0


def test_shutdown_does_not_wait_for_a_session_the_idle_sweep_evicted() -> None:
    srv = InProcess(idle_timeout=1.0, grace=GRACE)
    link = RawStream(srv.address)
    try:
        assert reply_from(link.request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META))).meta["token"]
        assert _stream_ids(srv) == [{SID}]
        wait_for(lambda: not srv.server.sessions, "the idle sweep's eviction")
        # the stream is still open (it keeps sending hellos) but no longer counts the evicted session
        wait_for(lambda: _stream_ids(srv) == [set()], "the stream forgetting the evicted session")
        seconds = _stop_seconds(srv)
        assert seconds < GRACE / 2, f"shutdown waited {seconds:.1f} s for an evicted session"
    finally:
        link.close()


class _NoSweep(Server[Any]):
    """A protocol server whose idle sweep finds nothing: an idle session is evicted only on access."""

    def evict_idle(self) -> int:
        return 0

    def evict_idle_sessions(self) -> list[str]:
        return []


def test_shutdown_does_not_wait_for_a_session_evicted_on_access() -> None:
    srv = InProcess(_NoSweep, idle_timeout=1.0, grace=GRACE)
    link = RawStream(srv.address)
    try:
        opened = reply_from(link.request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META)))
        token = opened.meta["token"]
        base = srv.server.clock()
        srv.server.clock = lambda: time.monotonic() - base + 1e6  # the session is now long idle
        answer = link.request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, token))
        assert answer.kind is FrameKind.ERROR and "unknown session" in answer.header["message"]
        assert srv.server.sessions == {} and len(srv.service.streams) == 1
        seconds = _stop_seconds(srv)
        assert seconds < GRACE / 2, f"shutdown waited {seconds:.1f} s for an evicted session"
    finally:
        link.close()


def test_two_stops_of_a_service_run_one_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """SCXService.stop called twice at once (a second signal, a second caller) drains and stops once."""
    pytest.importorskip("grpc")
    import asyncio
    import logging

    from scx_ref.commands.serve import build_backend
    from scx_ref.protocol.server import Server
    from scx_ref.service.service import SCXService, ServeOptions

    service = SCXService(
        Server(build_backend("random:tiny-dense", "float32", "cpu")), ServeOptions(port=0, ops_port=None)
    )

    async def main() -> None:
        await service.start()
        await asyncio.gather(service.stop(), service.stop())
        await service.wait_stopped()

    with caplog.at_level(logging.INFO, logger="scx.serve"):
        asyncio.run(main())
    events = [r.getMessage() for r in caplog.records]
    assert sum('"event": "draining"' in e for e in events) == 1, events
    assert sum('"event": "stopped"' in e for e in events) == 1, events

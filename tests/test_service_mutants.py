"""``scx serve`` in the test's own process, for what the service's mutation target (``mutation/targets.py``,
``service``) found no in-process test of: the graceful shutdown (before only a subprocess test ran it, which
the target cannot see), a start that fails leaving nothing listening, a refusal's log line, metric and
sequence number, a failing batch, ``/metrics``, each ``ServeOptions`` refusal and bound, and ``unbracketed``.

Waits are bounded loops on a condition; the only bounds on time are that a shutdown with no session left ends
well inside its grace, and that one with a session left open waits for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from scx_ref.errors import ConfigError, ProtocolError, ServiceError  # noqa: E402
from scx_ref.protocol import Server  # noqa: E402
from scx_ref.protocol.messages import Request  # noqa: E402
from scx_ref.service.codec import (  # noqa: E402
    MAX_MESSAGE_BYTES,
    FrameKind,
    decode,
    encode_hello,
    encode_request,
    reply_from,
)
from scx_ref.service.service import METHOD, SCXService, ServeOptions, unbracketed  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .refusals import Refusal, refusal_test  # noqa: E402
from .services import InProcess, RawStream, tls_files, wait_for  # noqa: E402

OPEN_META = {"n": 4, "r1": 1, "r2": 1, "r_lock": 1, "l_s": 1, "l_e": 1, "max_length": 16, "level": "paper"}
SID = "ab" * 16
GRACE = 30.0
TLS_PAIR = "TLS needs both a certificate (--tls-cert) and a key (--tls-key)"


@pytest.mark.parametrize(
    ("host", "bare"),
    [
        ("[::1]", "::1"),
        ("[fe80::1]", "fe80::1"),
        ("[]", ""),
        ("[::1", "[::1"),  # one bracket: as it is
        ("::1]", "::1]"),
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "localhost"),
    ],
)
def test_unbracketed_drops_only_a_pair_of_brackets(host: str, bare: str) -> None:
    assert unbracketed(host) == bare


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The service's structured log lines (JSON) of event ``name``; other records (a bug's) are skipped."""
    records = [r for r in caplog.records if r.name == "scx.serve" and r.exc_info is None]
    return [e for e in map(json.loads, (r.getMessage() for r in records)) if e["event"] == name]


def _open_then_silent(channel: Any, until: threading.Event, sid: str = SID, timeout: float = 60.0) -> Any:
    """A raw stream on ``channel`` that sends an ``open`` of session ``sid`` and then nothing until ``until``
    is set (or ``timeout`` seconds pass): its call (the open's answer not read yet)."""

    def frames() -> Iterator[bytes]:
        yield encode_request(Request(sid, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
        until.wait(timeout)

    return channel.stream_stream(METHOD)(frames(), timeout=timeout)


def _unread_hellos(quit_: threading.Event) -> Iterator[bytes]:
    """The frames of a client that never reads its replies: 2 000 hellos of 30 kB each, far more reply bytes
    than HTTP/2's flow-control windows hold, then nothing until ``quit_`` is set."""
    hello = encode_hello({"client": "never reads", "pad": "x" * 30_000})
    for _ in range(2_000):
        if quit_.is_set():
            return
        yield hello
    quit_.wait(120)


def _refused(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return _events(caplog, "refused")


def test_a_refusal_answers_its_seq_and_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """A message for a session this stream did not open: an error frame naming the error class and the
    message's seq; one ``refused`` log line with the stage, seq, class and message; one count of the class."""
    srv = InProcess()
    link = RawStream(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            answer = link.request(Request(SID, Stage.CLOSE, -1, -1, 7, {}, {}, "t" * 20))
            assert answer.kind is FrameKind.ERROR
            assert answer.header["error"] == "SessionError" and answer.header["seq"] == 7
            assert "is not open on this connection" in answer.header["message"]
            wait_for(lambda: bool(_refused(caplog)), "the refusal's log line")
        (event,) = _refused(caplog)
        assert event == {
            "event": "refused",
            "stage": "close",
            "seq": 7,
            "error": "SessionError",
            "message": answer.header["message"],
        }
        text = srv.service.metrics.text().decode()
        assert 'scx_errors_total{cls="SessionError"} 1.0' in text
        assert 'scx_messages_total{stage="close"} 1.0' in text
    finally:
        link.close()
        srv.stop(bound=15)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _open(link: RawStream) -> str:
    token: str = reply_from(link.request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META))).meta["token"]
    return token


def test_shutdown_lets_an_open_session_finish_refuses_new_streams_then_closes_the_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``stop`` with a session open: draining is logged with the sessions and grace; a new stream is refused
    as the server shutting down; the open session's next message is still answered; once it closes, the
    shutdown ends well inside its grace and nothing listens on the port any more."""
    srv = InProcess(grace=GRACE)
    link = RawStream(srv.address)
    late: Any = None
    try:
        token = _open(link)
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            t0 = time.monotonic()
            stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop)
            wait_for(lambda: srv.service.draining, "the service draining")
        (draining,) = _events(caplog, "draining")
        assert draining == {"event": "draining", "sessions": 1, "grace": GRACE}
        late = grpc.insecure_channel(srv.address)
        with pytest.raises(grpc.RpcError) as refused:
            list(late.stream_stream(METHOD)(iter([b"x"]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == "server is shutting down"
        assert not stopping.done()  # waiting for the open session
        answer = link.request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, token))
        assert answer.kind is FrameKind.REPLY
        stopping.result(GRACE)
        assert time.monotonic() - t0 < GRACE / 2, "the shutdown waited for a session already closed"
        assert srv.service.streams == set() or all(not s.sessions for s in srv.service.streams)
        assert not _listening(srv.service.port), "the gRPC port still listens after the shutdown"
    finally:
        if late is not None:
            late.close()
        link.close()
        srv.stop(bound=15)  # nothing more if the test's own stop finished


def test_a_session_left_open_is_waited_for_then_its_stream_is_ended() -> None:
    """``stop`` with a session its client never closes: the session is still served a while into the
    shutdown (its grace), then its stream ends and the shutdown finishes."""
    grace = 3.0
    srv = InProcess(grace=grace)
    link = RawStream(srv.address)
    try:
        _open(link)
        stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop)
        wait_for(lambda: srv.service.draining, "the service draining")
        # a message inside the grace is answered: refused as a new session, on a stream still served
        answer = link.request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
        assert answer.kind is FrameKind.ERROR
        assert (answer.header["error"], answer.header["message"]) == (
            "ServiceError",
            "server is shutting down: new sessions are refused",
        )
        assert not stopping.done()
        stopping.result(GRACE)
        link.reader.join(30)
        assert not link.reader.is_alive(), "the session's stream did not end with the shutdown"
        wait_for(lambda: srv.server.sessions == {}, "the ended stream's session dropped")
        assert not _listening(srv.service.port)
    finally:
        link.close()
        srv.stop(bound=15)  # nothing more if the test's own stop finished


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("busy", ["grpc", "ops"])
def test_a_start_that_fails_on_either_port_leaves_nothing_listening_or_running(busy: str) -> None:
    """Start raises ServiceError naming the port it could not bind, and leaves neither port listening (before:
    when the ops port was taken, the gRPC port bound before it kept listening: gRPC closes a bound port only
    once its server has started), the ops port forgotten and the compute pool shut."""

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = int(taken.getsockname()[1])
        other = _free_port()
        grpc_port, ops_port = (busy_port, other) if busy == "grpc" else (other, busy_port)
        opts = ServeOptions(port=grpc_port, ops_port=ops_port)
        service = SCXService(Server(InProcess.default_backend()), opts)

        async def start() -> None:
            await service.start()

        with pytest.raises(ServiceError) as refused:
            asyncio.run(start())
    assert str(refused.value) == (
        f"cannot listen on 127.0.0.1:{busy_port} (ops port): Address already in use"  # the system's words
        if busy == "ops"
        else f"cannot listen on 127.0.0.1:{busy_port}: address in use or not an address of this host"
    )
    assert not _listening(other), f"the {'ops' if busy == 'grpc' else 'gRPC'} port was left listening"
    assert service.ops_port is None
    assert service.port == 0  # no port, as before the start
    with pytest.raises(RuntimeError, match="shutdown"):
        service.pool.submit(int)


@contextmanager
def _prefilled(
    server_cls: type[Server[Any]], batch_rows: int
) -> Iterator[tuple[InProcess, Callable[[], object]]]:
    """An in-process service over ``server_cls`` (tests/tiny.py's model) and a client that has prefilled a
    short prompt over it; the callable decodes one token (its ``gen_mid`` messages included)."""
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig
    from scx_ref.service.remote import RemoteTransport

    backend = InProcess.default_backend()
    srv = InProcess(server_cls, backend=backend, batch_rows=batch_rows)
    link = RemoteTransport(srv.url, backend, timeout=20.0)
    try:
        client = Client(backend, KeySchedule.generate(), SCXConfig(level="paper"))
        logits = client.prefill([3, 1, 4, 1, 5], link)
        yield srv, lambda: client.decode(int(logits[-1].argmax()), link)
    finally:
        link.close()
        srv.stop(bound=15)


class _BrokenBatch(Server[Any]):
    """A protocol server whose cross-session batch of the middle blocks fails with a bug (not an SCXError)."""

    def handle_batch(self, reqs: Any) -> Any:
        raise RuntimeError("a bug in the batch")


def test_a_batch_that_fails_with_a_bug_answers_each_message_with_an_internal_service_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``gen_mid`` batch raising something other than an SCXError: each waiting message is answered with
    a ServiceError naming the exception's class (never its text), and the bug is logged with its traceback."""
    with _prefilled(_BrokenBatch, batch_rows=2) as (srv, decode_one):
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            with pytest.raises(ServiceError) as failed:
                decode_one()
            wait_for(lambda: any(r.exc_info for r in caplog.records), "the bug's log record")
        assert str(failed.value) == "server: internal server error (RuntimeError)"
        (record,) = [r for r in caplog.records if r.exc_info]
        assert record.getMessage() == "internal error in a gen_mid batch" and record.levelno == logging.ERROR
        assert record.exc_info is not None and record.exc_info[0] is RuntimeError
        _, values = _samples(srv)  # the failed batch was one message's row
        rows = {dict(k[1])["le"]: v for k, v in values.items() if k[0] == "scx_batch_rows_bucket"}
        assert rows == {"1.0": 1.0, **{f"{b:.1f}": 1.0 for b in (2, 4, 8, 16, 32, 64, 128)}, "+Inf": 1.0}
        assert values[("scx_batch_rows_count", ())] == 1.0 and values[("scx_batch_rows_sum", ())] == 1.0


#: every metric family of the service (process_* aside): its type and help text, as /metrics shows them
METRICS = {
    "scx_sessions_open": ("gauge", "SCX sessions open"),
    "scx_streams_open": ("gauge", "client streams open"),
    "scx_messages": ("counter", "messages handled"),
    "scx_bytes_received": ("counter", "frame bytes received"),
    "scx_bytes_sent": ("counter", "frame bytes sent"),
    "scx_errors": ("counter", "messages refused or failed, by error class"),
    "scx_stage_seconds": ("histogram", "time from a message's arrival to its reply, by stage"),
    "scx_batch_rows": ("histogram", "gen_mid rows per batch"),
    "scx_sessions_evicted": (
        "counter",
        "sessions ended other than by their client's close (stream end, idle TTL)",
    ),
    "scx_draining": ("gauge", "1 while shutting down"),
}
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _samples(srv: InProcess) -> tuple[dict[str, Any], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(srv.service.metrics.text().decode())}
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    return families, values


def test_metrics_count_each_stream_message_byte_refusal_and_eviction() -> None:
    """``/metrics`` after one raw stream of a hello, an ``open`` and a message for a session the stream did
    not open, which then ends: each family with its type and help; the frame bytes each way exactly; one
    message per stage and its latency in the stage histogram's buckets; the refusal by class; the session
    the stream's end took counted as evicted; nothing open and not draining."""
    srv = InProcess()
    channel = grpc.insecure_channel(srv.address)
    try:
        frames = [
            encode_hello({"client": "metrics"}),
            encode_request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META)),
            encode_request(Request("cd" * 16, Stage.CLOSE, -1, -1, 1, {}, {}, "t" * 20)),
        ]
        replies = list(channel.stream_stream(METHOD)(iter(frames), timeout=30))
        assert [decode(r).kind for r in replies] == [FrameKind.HELLO, FrameKind.REPLY, FrameKind.ERROR]
        wait_for(lambda: not srv.service.streams and not srv.server.sessions, "the stream and session gone")
        families, values = _samples(srv)
        for name, (kind, doc) in METRICS.items():
            assert (families[name].type, families[name].documentation) == (kind, doc), name
        assert "process_resident_memory_bytes" in families
        assert values[("scx_bytes_received_total", ())] == sum(map(len, frames))
        assert values[("scx_bytes_sent_total", ())] == sum(map(len, replies))
        for stage in ("hello", "open", "close"):
            assert values[("scx_messages_total", (("stage", stage),))] == 1.0, stage
            assert values[("scx_stage_seconds_count", (("stage", stage),))] == 1.0, stage
        buckets = [k for k in values if k[0] == "scx_stage_seconds_bucket" and ("stage", "open") in k[1]]
        les = [dict(labels)["le"] for _, labels in buckets]
        assert les == [*(str(float(b)) for b in STAGE_BUCKETS), "+Inf"]
        assert values[("scx_errors_total", (("cls", "SessionError"),))] == 1.0
        errors = [k for k in values if k[0] == "scx_errors_total"]
        assert errors == [("scx_errors_total", (("cls", "SessionError"),))]
        assert values[("scx_sessions_evicted_total", ())] == 1.0
        assert values[("scx_sessions_open", ())] == 0.0 and values[("scx_streams_open", ())] == 0.0
        assert values[("scx_draining", ())] == 0.0
    finally:
        channel.close()
        srv.stop(bound=15)


_INT64 = 2**63 - 1
SERVE_OPTION_REFUSALS: list[Refusal] = [
    *(
        (name, partial(ServeOptions, **{name: 0}), ConfigError, f"{name} must be >= 1, got 0")
        for name in ("workers", "max_batch", "max_rows", "max_sessions_per_peer")
    ),
    *(
        (name, partial(ServeOptions, **{name: 0}), ConfigError, f"{name} must lie in [1, {_INT64}], got 0")
        for name in ("batch_rows", "max_sessions")
    ),
    (
        "max_message_bytes-past-grpc",
        partial(ServeOptions, max_message_bytes=MAX_MESSAGE_BYTES + 1),
        ConfigError,
        f"max_message_bytes must lie in [1, {MAX_MESSAGE_BYTES}], got {MAX_MESSAGE_BYTES + 1}",
    ),
    ("idle_timeout-0", partial(ServeOptions, idle_timeout=0), ConfigError, "idle_timeout must be > 0, got 0"),
    ("grace-negative", partial(ServeOptions, grace=-1.5), ConfigError, "grace must be > 0, got -1.5"),
    (
        "grace-str",
        partial(ServeOptions, grace="1"),
        ConfigError,
        "grace must be a real number, got str '1'",
    ),
    *(
        (
            f"{name}-65536",
            partial(ServeOptions, **{name: 65536}),
            ConfigError,
            f"{name} must lie in [0, 65535], got 65536",
        )
        for name in ("port", "ops_port")
    ),
    (
        "port-None",
        partial(ServeOptions, port=None),
        ConfigError,
        "port must be an integer, got NoneType None",
    ),
    (
        "per-peer-bool",
        partial(ServeOptions, max_sessions_per_peer=True),
        ConfigError,
        "max_sessions_per_peer must be an integer, got bool True",
    ),
    *(
        (f"only-{name}", partial(ServeOptions, **{name: "x.pem"}), ConfigError, TLS_PAIR)
        for name in ("tls_cert", "tls_key")
    ),
    # the protocol server's own checks of the limits it shares
    (
        "max_decoys",
        partial(ServeOptions, max_decoys=-1),
        ConfigError,
        "max_decoys must be an integer >= 1, got -1",
    ),
    (
        "max_cache_bytes",
        partial(ServeOptions, max_cache_bytes=0),
        ConfigError,
        "max_cache_bytes must be an integer >= 1, got 0",
    ),
]
test_each_serve_option_refusal_names_its_option_and_bound = refusal_test(SERVE_OPTION_REFUSALS)


def test_serve_options_take_their_bounds_store_python_numbers_and_share_their_limits() -> None:
    """The lowest and highest values accepted; numpy numbers stored as Python int and float; ops_port None
    kept; and the protocol server's limits are these options' values."""
    low = ServeOptions(
        workers=1,
        max_batch=1,
        max_rows=1,
        batch_rows=1,
        max_sessions=1,
        max_sessions_per_peer=1,
        max_message_bytes=1,
        idle_timeout=1e-9,
        grace=1e-9,
        port=0,
        ops_port=0,
    )
    assert (low.workers, low.max_batch, low.max_rows, low.batch_rows, low.max_sessions) == (1, 1, 1, 1, 1)
    high = ServeOptions(
        batch_rows=_INT64,
        max_sessions=_INT64,
        max_message_bytes=MAX_MESSAGE_BYTES,
        port=65535,
        ops_port=None,
        tls_cert="c.pem",
        tls_key="k.pem",
    )
    assert (high.port, high.ops_port, high.max_message_bytes) == (65535, None, MAX_MESSAGE_BYTES)
    o = ServeOptions(
        workers=np.int64(3),
        max_sessions_per_peer=np.int64(2),
        port=np.int64(5),
        ops_port=np.int64(6),
        idle_timeout=np.float32(2),
        grace=1,
        max_rows=np.int32(7),
        max_decoys=5,
        max_cache_bytes=1 << 20,
        max_message_bytes=np.int64(1 << 16),
        max_sessions=9,
    )
    stored = {
        k: getattr(o, k)
        for k in (
            "workers",
            "max_sessions_per_peer",
            "port",
            "ops_port",
            "idle_timeout",
            "grace",
            "max_rows",
            "max_message_bytes",
        )
    }
    assert stored == {
        "workers": 3,
        "max_sessions_per_peer": 2,
        "port": 5,
        "ops_port": 6,
        "idle_timeout": 2.0,
        "grace": 1.0,
        "max_rows": 7,
        "max_message_bytes": 1 << 16,
    }
    assert [type(v) for v in stored.values()] == [int, int, int, int, float, float, int, int]
    limits = o.server_limits()
    assert (limits.max_sessions, limits.max_rows, limits.max_decoys, limits.max_message_bytes) == (
        9,
        7,
        5,
        1 << 16,
    )
    assert (limits.max_cache_bytes, limits.idle_ttl) == (1 << 20, 2.0) and type(limits.idle_ttl) is float


def _status(channel: Any, frames: list[bytes]) -> Any:
    """The status a raw stream sending ``frames`` ends with (its replies read to the end)."""
    with pytest.raises(grpc.RpcError) as ended:
        list(channel.stream_stream(METHOD)(iter(frames), timeout=30))
    return ended.value


def test_a_stream_past_max_sessions_is_refused_counted_and_the_freed_place_is_taken_again() -> None:
    """With ``max_sessions`` streams open, one more ends at once with RESOURCE_EXHAUSTED ("server full: N
    sessions open") and one ServerFull count; once a stream ends, its place serves a new one."""
    srv = InProcess(max_sessions=1)
    first = RawStream(srv.address)
    channel = grpc.insecure_channel(srv.address)
    try:
        wait_for(lambda: len(srv.service.streams) == 1, "the first stream")
        status = _status(channel, [encode_hello({"client": "second"})])
        assert status.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status.details() == "server full: 1 sessions open"
        _, values = _samples(srv)
        assert values[("scx_errors_total", (("cls", "ServerFull"),))] == 1.0
        assert values[("scx_streams_open", ())] == 1.0
        first.close()
        wait_for(lambda: not srv.service.streams, "the first stream's place freed")
        replies = list(channel.stream_stream(METHOD)(iter([encode_hello({"client": "third"})]), timeout=30))
        assert [decode(r).kind for r in replies] == [FrameKind.HELLO]
    finally:
        first.close()
        channel.close()
        srv.stop(bound=15)


def test_a_peer_over_its_cap_is_refused_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    srv = InProcess(max_sessions_per_peer=1)
    first = RawStream(srv.address)
    channel = grpc.insecure_channel(srv.address)
    try:
        wait_for(lambda: len(srv.service.streams) == 1, "the first stream")
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            status = _status(channel, [encode_hello({"client": "second"})])
        assert status.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status.details() == (
            "server full for this address: 1 sessions open from it (--max-sessions-per-peer)"
        )
        (event,) = _events(caplog, "peer_full")
        assert event["limit"] == 1 and event["peer"].startswith("ipv4:127.0.0.1:")
        _, values = _samples(srv)
        assert values[("scx_errors_total", (("cls", "PeerFull"),))] == 1.0
        assert len(srv.service.streams) == 1 and srv.service._peer_handlers == {"ipv4:127.0.0.1": 1}
    finally:
        first.close()
        channel.close()
        wait_for(lambda: not srv.service._peer_handlers, "the peer's count gone with its streams")
        srv.stop(bound=15)


def test_a_stream_idle_past_the_timeout_ends_with_deadline_exceeded(caplog: pytest.LogCaptureFixture) -> None:
    """A stream whose client sends nothing for ``idle_timeout`` seconds ends with DEADLINE_EXCEEDED naming
    the wait, an ``idle_timeout`` log line, and its session dropped."""
    srv = InProcess(idle_timeout=0.5)
    channel = grpc.insecure_channel(srv.address)
    gate = threading.Event()

    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            call = _open_then_silent(channel, gate)
            assert decode(next(call)).kind is FrameKind.REPLY
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
            wait_for(lambda: bool(_events(caplog, "idle_timeout")), "the idle_timeout log line")
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert ended.value.details() == "no message for 0.5 s: session closed"
        (event,) = _events(caplog, "idle_timeout")
        assert event["seconds"] == 0.5 and event["peer"].startswith("ipv4:127.0.0.1:")
        wait_for(
            lambda: not srv.server.sessions and not srv.service.streams, "the idle stream's session dropped"
        )
    finally:
        gate.set()
        channel.close()
        srv.stop(bound=15)


class _BrokenOpen(Server[Any]):
    """A protocol server whose ``open`` fails with a bug (not an SCXError)."""

    def _open(self, req: Request) -> Any:
        raise KeyError("a bug in open")


def test_a_stage_that_fails_with_a_bug_answers_an_internal_service_error_and_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stage raising something other than an SCXError: the message is answered with a ServiceError naming
    the exception's class only, with its seq; the bug is logged with its traceback and the stage; the stream
    serves its next message and no session is left behind."""
    srv = InProcess(_BrokenOpen)
    link = RawStream(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            answer = link.request(Request(SID, Stage.OPEN, -1, -1, 3, {}, OPEN_META))
            wait_for(lambda: any(r.exc_info for r in caplog.records), "the bug's log record")
        assert answer.kind is FrameKind.ERROR
        assert (answer.header["error"], answer.header["message"], answer.header["seq"]) == (
            "ServiceError",
            "internal server error (KeyError)",
            3,
        )
        (record,) = [r for r in caplog.records if r.exc_info]
        assert record.getMessage() == "internal error in stage open" and record.levelno == logging.ERROR
        assert record.exc_info is not None and record.exc_info[0] is KeyError
        (event,) = _refused(caplog)
        assert (event["stage"], event["seq"], event["error"]) == ("open", 3, "ServiceError")
        assert srv.server.sessions == {}
        assert all(not s.sessions and not s.busy for s in srv.service.streams)
        again = link.request(Request(SID, Stage.CLOSE, -1, -1, 4, {}, {}, "t" * 20))
        assert again.header["error"] == "SessionError"  # served; the failed open opened nothing
    finally:
        link.close()
        srv.stop(bound=15)


def test_a_gen_mid_message_the_server_refuses_in_a_batch_is_answered_with_its_own_error() -> None:
    """A ``gen_mid`` message with a wrong token, computed in a cross-session batch: its answer is the
    server's own refusal (SessionError, its seq), and the session and stream go on."""
    srv = InProcess(batch_rows=2)
    link = RawStream(srv.address)
    try:
        _open(link)
        x = np.zeros((1, srv.backend.config.hidden_size))
        answer = link.request(Request(SID, Stage.GEN_MID, 1, 0, 5, {"x": x}, {}, "x" * 20))
        assert answer.kind is FrameKind.ERROR
        assert (answer.header["error"], answer.header["message"], answer.header["seq"]) == (
            "SessionError",
            "unknown session or invalid session token",
            5,
        )
        assert list(srv.server.sessions) == [SID]
    finally:
        link.close()
        srv.stop(bound=15)


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of an HTTP GET of ``path`` on the ops port."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.getheader("Content-Length") == str(len(body))
        return resp.status, str(resp.getheader("Content-Type")), body
    finally:
        conn.close()


def test_the_ops_port_serves_health_metrics_and_not_found_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    """``/health``: 200 and JSON with the status, the open sessions and streams and the greeting's fields,
    503 and ``draining`` once a shutdown starts; ``/metrics``: the Prometheus text; anything else 404 naming
    the two paths. No request is logged to stderr (``http.server`` logs each one by default)."""
    srv = InProcess(ops_port=0, grace=GRACE)
    ops = srv.service.ops_port
    assert ops
    link = RawStream(srv.address)
    try:
        wait_for(lambda: len(srv.service.streams) == 1, "the stream registered")
        status, ctype, body = _get(ops, "/health")
        assert (status, ctype) == (200, "application/json")
        assert json.loads(body) == {"status": "serving", "sessions": 0, "streams": 1, **srv.service.info}
        token = _open(link)
        assert json.loads(_get(ops, "/health")[2])["sessions"] == 1
        status, ctype, body = _get(ops, "/metrics")
        assert (status, ctype) == (200, "text/plain; version=0.0.4")
        assert b"scx_sessions_open 1.0" in body and b"# TYPE scx_messages_total counter" in body
        assert _get(ops, "/nothing") == (404, "text/plain", b"not found: /health, /metrics\n")
        stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop)
        wait_for(lambda: srv.service.draining, "the service draining")
        status, ctype, body = _get(ops, "/health")
        assert (status, ctype, json.loads(body)["status"]) == (503, "application/json", "draining")
        link.request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, token))
        stopping.result(GRACE)
        assert not _listening(ops), "the ops port still listens after the shutdown"
    finally:
        link.close()
        srv.stop(bound=15)  # nothing more if the test's own stop finished
    assert '"GET /' not in capsys.readouterr().err  # http.server's request log line


def test_the_ops_listener_takes_the_address_family_of_its_host() -> None:
    """An IPv6 address gets an IPv6 HTTP server (``http.server``'s own is IPv4 only); an IPv4 one the
    plain class."""
    from http.server import ThreadingHTTPServer

    from scx_ref.service.service import _ops_server_class

    assert _ops_server_class("127.0.0.1") is ThreadingHTTPServer
    v6 = _ops_server_class("::1")
    assert issubclass(v6, ThreadingHTTPServer) and v6.address_family == socket.AF_INET6


def test_stop_after_a_start_that_failed_on_its_grpc_port_stops_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A start refused on its gRPC port (the ops listener already up, then shut) leaves a service whose
    stop finishes without error and marks it stopped."""

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        opts = ServeOptions(port=int(taken.getsockname()[1]), ops_port=0)
        service = SCXService(Server(InProcess.default_backend()), opts)

        async def start_then_stop() -> None:
            with pytest.raises(ServiceError, match="cannot listen on"):
                await service.start()
            await service.stop()
            await service.wait_stopped()

        with caplog.at_level(logging.INFO, logger="scx.serve"):
            asyncio.run(start_then_stop())
    assert len(_events(caplog, "stopped")) == 1 and service.ops_port is None


def test_a_stalled_ops_client_does_not_hold_up_the_shutdown(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The ops listener runs in a daemon thread named ``scx-ops``, and its request threads are daemons too:
    a client that opened a connection to the ops port and never finished its request does not keep the
    shutdown waiting for it (``http.server`` joins non-daemon request threads when it closes). When that
    client then goes, its request is answered into a closed connection: nothing is printed (before, the
    BrokenPipeError's traceback on stderr)."""
    srv = InProcess(ops_port=0, grace=0.5)
    ops = srv.service.ops_port
    assert ops
    (thread,) = [t for t in threading.enumerate() if t.name == "scx-ops"]
    assert thread.daemon
    stalled = socket.create_connection(("127.0.0.1", ops), timeout=30)
    caplog.set_level(logging.DEBUG, logger="scx.serve")
    try:
        stalled.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        assert _get(ops, "/health")[0] == 200  # served beside the stalled one
        stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop)
        stopping.result(GRACE)  # before: the close waited for the stalled request's thread
        thread.join(30)
        assert not thread.is_alive()
        assert not _listening(ops)
        stalled.close()

        def answered() -> bool:
            return not any("process_request" in t.name for t in threading.enumerate())

        wait_for(answered, "the stalled request answered")
        err = capsys.readouterr().err  # (another test's log handler may write there: not read whole)
        assert "Exception occurred during processing of request" not in err and "BrokenPipeError" not in err
        assert _events(caplog, "ops_client_gone") == [{"event": "ops_client_gone", "path": "/health"}]
        (gone,) = [r for r in caplog.records if "ops_client_gone" in r.getMessage()]
        assert gone.levelno == logging.DEBUG
    finally:
        stalled.close()
        srv.stop(bound=15)  # nothing more if the test's own stop finished


def test_stop_before_start_does_nothing() -> None:

    service = SCXService(Server(InProcess.default_backend()), ServeOptions(port=0, ops_port=None))
    asyncio.run(service.stop())
    assert not service.draining and not service.closing


def test_a_message_in_flight_when_the_grace_ends_is_answered_then_its_stream_closed() -> None:
    """An ``open`` still computing when the shutdown's grace ends (no session open yet, so no wait): the
    shutdown waits for it, its reply reaches the client, and the stream then ends with UNAVAILABLE "server is
    shutting down"; the scx_draining gauge reads 1 meanwhile; once stopped no task of the service is left
    on its event loop."""
    from .test_service_hostile import Gate, gated_server

    gate = Gate()
    gate.stage = "open"
    srv = InProcess(gated_server(gate), grace=0.2)
    channel = grpc.insecure_channel(srv.address)
    sent = threading.Event()

    try:
        call = _open_then_silent(channel, sent)
        assert gate.entered.wait(30)
        stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop)
        wait_for(lambda: srv.service.closing, "the grace over")
        assert _samples(srv)[1][("scx_draining", ())] == 1.0
        assert not stopping.done()  # waiting for the message in flight
        gate.release.set()
        assert decode(next(call)).kind is FrameKind.REPLY
        with pytest.raises(grpc.RpcError) as ended:
            next(call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "server is shutting down"
        stopping.result(GRACE)

        async def pending() -> list[str]:
            me = asyncio.current_task()
            return [repr(t) for t in asyncio.all_tasks() if t is not me and not t.done()]

        assert asyncio.run_coroutine_threadsafe(pending(), srv.loop).result(30) == []
    finally:
        gate.release.set()
        sent.set()
        channel.close()
        srv.stop(bound=15)


def test_a_silent_stream_does_not_hold_up_the_shutdown_after_its_grace() -> None:
    """A client that opened a session and then sends nothing (its stream idle, far from ``idle_timeout``):
    once the grace is over the shutdown ends the stream and finishes, long before the idle timeout."""
    srv = InProcess(grace=0.5)  # idle_timeout 300 s
    channel = grpc.insecure_channel(srv.address)
    sent = threading.Event()

    try:
        call = _open_then_silent(channel, sent, timeout=120.0)
        assert decode(next(call)).kind is FrameKind.REPLY
        asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop).result(GRACE)
        with pytest.raises(grpc.RpcError) as ended:
            next(call)
        # the stream ended itself, with its status (not cancelled by gRPC's listener closing)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "server is shutting down"
        wait_for(lambda: not srv.server.sessions, "the silent stream's session dropped")
    finally:
        sent.set()
        channel.close()
        srv.stop(bound=15)


class _LongRefusal(Server[Any]):
    """A protocol server whose ``open`` is refused with a message of 400 characters."""

    def _open(self, req: Request) -> Any:
        raise ProtocolError("x" * 400)


def test_a_refusals_log_line_holds_the_first_300_characters_of_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = InProcess(_LongRefusal)
    link = RawStream(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            answer = link.request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
            wait_for(lambda: bool(_refused(caplog)), "the refusal's log line")
        assert (answer.header["error"], answer.header["message"]) == ("ProtocolError", "x" * 400)
        (event,) = _refused(caplog)
        assert (event["stage"], event["seq"], event["message"]) == ("open", 0, "x" * 300)
    finally:
        link.close()
        srv.stop(bound=15)


def test_the_ops_thread_is_a_daemon_whichever_thread_starts_the_service() -> None:
    """Started from the main thread (as ``scx serve`` starts it), the ops listener's thread is still a
    daemon: it cannot keep the process alive after the service is gone."""

    service = SCXService(Server(InProcess.default_backend()), ServeOptions(port=0, ops_port=0))
    seen: list[bool] = []

    async def run() -> None:
        await service.start()
        seen.extend(t.daemon for t in threading.enumerate() if t.name == "scx-ops")
        await service.stop()

    assert threading.current_thread() is threading.main_thread()
    asyncio.run(run())
    assert seen == [True]


def test_a_client_that_never_reads_does_not_hold_up_the_shutdown() -> None:
    """A stream whose replies its client never reads (the server's writes wait on HTTP/2 flow control, far
    from ``idle_timeout``): the shutdown does not wait for that client, it cancels the stream after at
    most max(5, grace) seconds."""
    srv = InProcess(grace=0.2)  # idle_timeout 300 s
    channel = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    quit_ = threading.Event()
    unread = channel.stream_stream(METHOD)(_unread_hellos(quit_))  # its replies are never read
    try:

        def stuck() -> bool:  # a reply in flight, and no frame answered for half a second
            before = _samples(srv)[1].get(("scx_messages_total", (("stage", "hello"),)))
            time.sleep(0.5)
            after = _samples(srv)[1].get(("scx_messages_total", (("stage", "hello"),)))
            return before is not None and before == after and srv.service.inflight == 1

        wait_for(stuck, "a reply waiting on the unread stream")
        t0 = time.monotonic()
        asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop).result(GRACE)
        assert time.monotonic() - t0 >= 4.0  # it gave the stream max(5, grace) seconds, then cancelled it
        assert not _listening(srv.service.port)
    finally:
        quit_.set()
        unread.cancel()
        channel.close()
        srv.stop(bound=15)


def _open_reply(max_message_bytes: int, caplog: pytest.LogCaptureFixture) -> Any:
    """The frame ``scx serve`` answers an ``open`` with under ``max_message_bytes`` (computed on a worker as
    the service computes it), and whether the server still holds the session."""
    from scx_ref.service.service import _Stream

    server: Server[Any] = Server(InProcess.default_backend())
    service = SCXService(server, ServeOptions(port=0, ops_port=None, max_message_bytes=max_message_bytes))
    try:
        stream = _Stream("ipv4:127.0.0.1:5000")
        stream.busy = 1
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            frame = service._compute(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META), stream)
        return frame, SID in server.sessions
    finally:
        service.pool.shutdown()


def test_a_reply_of_exactly_max_message_bytes_is_sent_one_byte_more_ends_its_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    size = len(_open_reply(1 << 20, caplog)[0])
    frame, held = _open_reply(size, caplog)
    assert len(frame) == size and decode(frame).kind is FrameKind.REPLY and held
    caplog.clear()
    frame, held = _open_reply(size - 1, caplog)
    answer = decode(frame)
    assert answer.kind is FrameKind.ERROR and not held
    assert answer.header["message"] == (
        f"reply of {size} bytes exceeds max_message_bytes ({size - 1}): session closed"
    )
    assert _events(caplog, "session_closed") == [
        {"event": "session_closed", "session": SID[:12], "why": "reply too large to send"}
    ]
    (refused,) = _refused(caplog)
    assert (refused["stage"], refused["seq"], refused["error"]) == ("open", 0, "ServiceError")


def test_a_shutdown_waits_for_a_stage_still_computing_past_its_bound() -> None:
    """A stage still computing when the shutdown's wait for messages in flight has run out (max(5, grace)
    seconds): the shutdown closes the listener but does not finish — its compute pool waits for the stage."""
    from .test_service_hostile import Gate, gated_server

    gate = Gate()
    gate.stage = "open"
    srv = InProcess(gated_server(gate), grace=0.1)
    channel = grpc.insecure_channel(srv.address)
    sent = threading.Event()

    try:
        call = _open_then_silent(channel, sent)
        assert gate.entered.wait(30)
        stopping = asyncio.run_coroutine_threadsafe(srv.service.stop(), srv.loop)
        wait_for(lambda: not _listening(srv.service.port), "the listener closed after the wait")
        time.sleep(0.5)
        assert not stopping.done(), "the shutdown finished while a stage was still computing"
        gate.release.set()
        stopping.result(GRACE)
        with pytest.raises(grpc.RpcError):
            list(call)
    finally:
        gate.release.set()
        sent.set()
        channel.close()
        srv.stop(bound=15)


def test_a_session_closed_by_its_client_is_no_longer_open_on_its_stream() -> None:
    """After its ``close``, a message for the session is refused by the stream (not open on this
    connection), before the protocol server is asked."""
    srv = InProcess()
    link = RawStream(srv.address)
    try:
        token = _open(link)
        assert link.request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, token)).kind is FrameKind.REPLY
        assert all(not s.sessions for s in srv.service.streams)
        again = link.request(Request(SID, Stage.CLOSE, -1, -1, 2, {}, {}, token))
        assert (again.header["error"], again.header["message"]) == (
            "SessionError",
            f"session {SID[:12]}… is not open on this connection",
        )
    finally:
        link.close()
        srv.stop(bound=15)


def test_a_session_opened_after_its_client_went_is_dropped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ``open`` still computing when its client goes: the session it opens is dropped once it is done,
    logged as closed because its stream ended."""
    from .test_service_hostile import Gate, gated_server

    gate = Gate()
    gate.stage = "open"
    srv = InProcess(gated_server(gate))
    channel = grpc.insecure_channel(srv.address)
    try:
        call = channel.stream_stream(METHOD)(
            iter([encode_request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META))])
        )
        assert gate.entered.wait(30)
        call.cancel()  # the client goes while its open computes
        wait_for(lambda: not srv.service.streams, "the stream's end")
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            gate.release.set()
            wait_for(lambda: bool(_events(caplog, "session_closed")), "the orphaned session's log line")
        assert _events(caplog, "session_closed") == [
            {"event": "session_closed", "session": SID[:12], "why": "stream ended"}
        ]
        assert srv.server.sessions == {}
    finally:
        gate.release.set()
        channel.close()
        srv.stop(bound=15)


def test_a_reply_left_unread_past_the_idle_timeout_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    srv = InProcess(idle_timeout=1.0)
    channel = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    quit_ = threading.Event()
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            unread = channel.stream_stream(METHOD)(_unread_hellos(quit_))  # its replies are never read
            wait_for(lambda: bool(_events(caplog, "reply_not_read")), "the unread reply's log line")
        (event,) = _events(caplog, "reply_not_read")
        assert event["seconds"] == 1.0 and event["peer"].startswith("ipv4:127.0.0.1:")
        assert set(event) == {"event", "peer", "seconds"}
        quit_.set()
        with pytest.raises(grpc.RpcError) as ended:  # the replies it held, then the stream's status
            for _ in unread:
                pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert ended.value.details() == "reply not read for 1 s: session closed"
    finally:
        quit_.set()
        unread.cancel()
        channel.close()
        srv.stop(bound=15)


def test_a_frame_that_does_not_decode_is_refused_and_counted_as_invalid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = InProcess()
    channel = grpc.insecure_channel(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            (reply,) = list(channel.stream_stream(METHOD)(iter([b"not a frame"]), timeout=30))
            wait_for(lambda: bool(_refused(caplog)), "the refusal's log line")
        answer = decode(reply)
        assert answer.kind is FrameKind.ERROR and answer.header["error"] == "WireError"
        (event,) = _refused(caplog)
        assert (event["stage"], event["seq"], event["error"]) == ("invalid", -1, "WireError")
        assert _samples(srv)[1][("scx_messages_total", (("stage", "invalid"),))] == 1.0
    finally:
        channel.close()
        srv.stop(bound=15)


def test_a_new_open_on_a_stream_ends_its_previous_session_and_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = InProcess()
    link = RawStream(srv.address)
    other = "cd" * 16
    try:
        _open(link)
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            reply_from(link.request(Request(other, Stage.OPEN, -1, -1, 0, {}, OPEN_META)))
        assert list(srv.server.sessions) == [other]
        assert _events(caplog, "session_closed") == [
            {"event": "session_closed", "session": SID[:12], "why": "a new session opened on its stream"}
        ]
    finally:
        link.close()
        srv.stop(bound=15)


def test_a_frame_past_max_message_bytes_within_grpcs_slack_is_refused() -> None:
    """gRPC takes frames up to max_message_bytes plus a header's slack (1 KiB); the service's own decode
    refuses one past max_message_bytes itself."""
    srv = InProcess(max_message_bytes=4096)
    channel = grpc.insecure_channel(srv.address)
    try:
        hello = encode_hello({"client": "big", "pad": "x" * 4200})
        assert 4096 < len(hello) <= 4096 + 1024
        (reply,) = list(channel.stream_stream(METHOD)(iter([hello]), timeout=30))
        answer = decode(reply)
        assert answer.kind is FrameKind.ERROR and answer.header["error"] == "WireError"
        assert "4096" in answer.header["message"]
    finally:
        channel.close()
        srv.stop(bound=15)


def test_opening_and_closing_a_session_is_logged_and_refusals_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = InProcess()
    link, refused = RawStream(srv.address), RawStream(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            token = _open(link)
            bad = Request("cd" * 16, Stage.OPEN, -1, -1, 0, {}, {**OPEN_META, "n": -1})
            assert refused.request(bad).kind is FrameKind.ERROR  # an open refused: nothing opened
            link.request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, "t" * 20))  # a wrong token: refused
            assert _events(caplog, "session_closed") == []  # a refused close closes nothing
            assert link.request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, token)).kind is FrameKind.REPLY
        (opened,) = _events(caplog, "session_open")
        assert set(opened) == {"event", "session", "peer"} and opened["session"] == SID[:12]
        assert opened["peer"].startswith("ipv4:127.0.0.1:")
        assert _events(caplog, "session_closed") == [
            {"event": "session_closed", "session": SID[:12], "why": "closed by its client"}
        ]
    finally:
        link.close()
        refused.close()
        srv.stop(bound=15)


class _Threads(Server[Any]):
    """A protocol server that records the thread each ``open`` and each cross-session batch runs on."""

    names: ClassVar[dict[str, list[str]]] = {}

    def _open(self, req: Request) -> Any:
        _Threads.names.setdefault("open", []).append(threading.current_thread().name)
        return super()._open(req)

    def handle_batch(self, reqs: Any) -> Any:
        _Threads.names.setdefault("batch", []).append(threading.current_thread().name)
        return super().handle_batch(reqs)


def test_stages_and_batches_run_on_the_services_compute_pool() -> None:
    _Threads.names = {}
    with _prefilled(_Threads, batch_rows=2) as (_, decode_one):
        decode_one()
    assert set(_Threads.names) == {"open", "batch"}
    assert all(n.startswith("scx-compute") for names in _Threads.names.values() for n in names)


def test_gen_mid_messages_are_batched_only_when_batch_rows_exceeds_one() -> None:
    """With ``batch_rows`` 1 a ``gen_mid`` message is computed on its own (``handle``), never in a
    cross-session batch (here one that would fail)."""
    with _prefilled(_BrokenBatch, batch_rows=1) as (srv, decode_one):
        decode_one()  # its gen_mid messages, each on its own
        assert _samples(srv)[1][("scx_batch_rows_count", ())] == 0.0


def test_a_message_that_cannot_be_scheduled_is_an_internal_error_and_settles_its_stream() -> None:
    """The compute pool refusing work (shut down): the message is answered with an internal ServiceError
    naming the pool's RuntimeError, and its stream is not left counting it as busy."""
    from scx_ref.service.service import _Stream

    service = SCXService(Server(InProcess.default_backend()), ServeOptions(port=0, ops_port=None))
    service.pool.shutdown()
    stream = _Stream("ipv4:127.0.0.1:5000")
    stream.sessions.add(SID)
    frame = decode(
        asyncio.run(
            service._message(stream, encode_request(Request(SID, Stage.CLOSE, -1, -1, 1, {}, {}, "t" * 20)))
        )
    )
    assert (frame.header["error"], frame.header["message"]) == (
        "ServiceError",
        "internal server error (RuntimeError)",
    )
    assert stream.busy == 0 and stream.sessions == {SID}


def test_each_message_is_logged_at_debug_with_its_stage_seq_time_and_sizes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = InProcess()
    channel = grpc.insecure_channel(srv.address)
    try:
        frames = [
            encode_hello({"client": "debug"}),
            encode_request(Request(SID, Stage.CLOSE, -1, -1, 4, {}, {}, "t" * 20)),
        ]
        with caplog.at_level(logging.DEBUG, logger="scx.serve"):
            replies = list(channel.stream_stream(METHOD)(iter(frames), timeout=30))
            wait_for(lambda: len(_events(caplog, "message")) == 2, "both messages' log lines")
        events = _events(caplog, "message")
        assert [(e["stage"], e["seq"], e["up"], e["down"]) for e in events] == [
            ("hello", -1, len(frames[0]), len(replies[0])),
            ("close", 4, len(frames[1]), len(replies[1])),
        ]
        assert all(
            set(e) == {"event", "stage", "seq", "ms", "up", "down"} and 0 <= e["ms"] < 10_000 for e in events
        )
        (record, _) = [r for r in caplog.records if '"event": "message"' in r.getMessage()]
        assert record.levelno == logging.DEBUG
        _, values = _samples(srv)  # each message's time is in the stage histogram's 10 s bucket
        for stage, event in zip(("hello", "close"), events, strict=True):
            assert values[("scx_stage_seconds_bucket", (("le", "10.0"), ("stage", stage)))] == 1.0
            seconds = values[("scx_stage_seconds_sum", (("stage", stage),))]
            assert 0 <= seconds < 10 and event["ms"] == round(1e3 * seconds, 3)  # ms to the microsecond
    finally:
        channel.close()
        srv.stop(bound=15)


def test_a_failing_batchs_error_frame_names_service_error() -> None:
    srv = InProcess(_BrokenBatch, batch_rows=2)
    link = RawStream(srv.address)
    try:
        token = _open(link)
        x = np.zeros((1, srv.backend.config.hidden_size))
        answer = link.request(Request(SID, Stage.GEN_MID, 1, 0, 1, {"x": x}, {}, token))
        assert (answer.kind, answer.header["error"], answer.header["message"], answer.header["seq"]) == (
            FrameKind.ERROR,
            "ServiceError",
            "internal server error (RuntimeError)",
            -1,  # a batch's failure answers each of its messages, whatever their seq
        )
    finally:
        link.close()
        srv.stop(bound=15)


class _SlowOpen(Server[Any]):
    """A protocol server whose ``open`` takes at least 20 ms (so its time has digits to compare)."""

    def _open(self, req: Request) -> Any:
        time.sleep(0.02)
        return super()._open(req)


def test_a_messages_debug_line_gives_the_time_the_latency_histogram_observed_in_ms(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ``message`` line (DEBUG) of an ``open``: its ``ms`` is the one time ``scx_stage_seconds`` observed
    for the stage, in milliseconds rounded to the microsecond, beside the frame's seq and sizes."""
    srv = InProcess(_SlowOpen)
    link = RawStream(srv.address)
    try:
        with caplog.at_level(logging.DEBUG, logger="scx.serve"):
            _open(link)
            wait_for(lambda: bool(_events(caplog, "message")), "the open's message line")
        (event,) = [e for e in _events(caplog, "message") if e["stage"] == "open"]
        values = _samples(srv)[1]
        seconds = values[("scx_stage_seconds_sum", (("stage", "open"),))]
        assert values[("scx_stage_seconds_count", (("stage", "open"),))] == 1.0
        assert seconds >= 0.02
        assert event["ms"] == round(1e3 * seconds, 3)
        assert event["seq"] == 0 and event["up"] > 0 and event["down"] > 0
        assert event["up"] == values[("scx_bytes_received_total", ())]
    finally:
        link.close()
        srv.stop(bound=15)


def test_a_stream_ended_while_awaiting_a_frame_leaves_nothing_for_asyncio_to_report() -> None:
    """An idle stream's pending read is cancelled when its timeout ends it: the service's event loop is
    handed no error — neither from the read's done callback nor, later, an outcome no one retrieved."""
    import gc

    srv = InProcess(idle_timeout=0.3)
    reported: list[dict[str, Any]] = []
    srv.loop.call_soon_threadsafe(srv.loop.set_exception_handler, lambda _loop, ctx: reported.append(ctx))
    channel = grpc.insecure_channel(srv.address)
    gate = threading.Event()

    try:
        call = _open_then_silent(channel, gate)
        assert decode(next(call)).kind is FrameKind.REPLY
        with pytest.raises(grpc.RpcError) as ended:
            next(call)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: not srv.service.streams, "the idle stream ended")
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.1), srv.loop).result(10)  # callbacks run
        gc.collect()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.1), srv.loop).result(10)
        assert reported == []
    finally:
        gate.set()
        channel.close()
        srv.stop(bound=15)


class _TwoAtOnce(Server[Any]):
    """A protocol server whose ``open`` goes on only once two opens are computing at the same time."""

    barrier: ClassVar[threading.Barrier]

    def _open(self, req: Request) -> Any:
        _TwoAtOnce.barrier.wait(30)
        return super()._open(req)


def test_messages_in_flight_on_two_streams_at_once_are_each_counted_and_uncounted() -> None:
    """Two streams' ``open`` computing at the same time: the count of messages in flight — what a shutdown
    waits for — is 2 while both are, and 0 once both are answered (not negative: a shutdown would then wait
    its whole bound for a message that is not there)."""
    _TwoAtOnce.barrier = threading.Barrier(2)
    srv = InProcess(_TwoAtOnce, workers=2)
    channels = [grpc.insecure_channel(srv.address) for _ in range(2)]
    gate = threading.Event()
    seen: list[int] = []

    try:
        real_wait = _TwoAtOnce.barrier.wait

        def wait(timeout: float | None = None) -> int:
            seen.append(srv.service.inflight)
            return real_wait(timeout)

        _TwoAtOnce.barrier.wait = wait  # type: ignore[method-assign]
        calls = [  # each sends nothing after its open: no other message is counted
            _open_then_silent(ch, gate, sid) for ch, sid in zip(channels, ("ab" * 16, "cd" * 16), strict=True)
        ]
        assert [decode(next(call)).kind for call in calls] == [FrameKind.REPLY, FrameKind.REPLY]
        assert max(seen) == 2  # the second open to arrive saw both counted
        wait_for(lambda: srv.service.inflight <= 0, "both replies uncounted")
        assert srv.service.inflight == 0
    finally:
        gate.set()
        for ch in channels:
            ch.close()
        srv.stop(bound=15)


def test_a_session_whose_stream_ends_between_messages_is_dropped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that goes with its session open and no message of it computing: the session is dropped at
    once, logged as closed because its stream ended."""
    srv = InProcess()
    link = RawStream(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            _open(link)
            link.close()  # the stream ends between messages
            wait_for(lambda: bool(_events(caplog, "session_closed")), "the session's log line")
        assert _events(caplog, "session_closed") == [
            {"event": "session_closed", "session": SID[:12], "why": "stream ended"}
        ]
        assert srv.server.sessions == {}
    finally:
        srv.stop(bound=15)


def test_an_ops_port_error_without_the_systems_words_is_shown_as_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OSError with no ``strerror`` (raised with a message alone): shown by its text."""

    def refuse(self: SCXService, port: int) -> None:
        raise OSError("no interface of that name")

    monkeypatch.setattr(SCXService, "_start_http", refuse)
    port = _free_port()
    service = SCXService(Server(InProcess.default_backend()), ServeOptions(port=0, ops_port=port))

    async def start() -> None:
        await service.start()

    with pytest.raises(ServiceError) as refused:
        asyncio.run(start())
    assert str(refused.value) == f"cannot listen on 127.0.0.1:{port} (ops port): no interface of that name"


def test_the_grpc_server_allows_the_clients_keepalive_pings_and_shares_no_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gRPC server is built with the channel options both ends use (:func:`grpc_options`), pings
    without data allowed every 5 s — clients ping every 20 s, even with no call in flight, and gRPC's
    default (5 min) would count those pings as abuse and close the connection — and ``SO_REUSEPORT`` off,
    so no other process can bind the port beside it."""
    from scx_ref.service.codec import grpc_options

    built: list[dict[str, Any]] = []
    real = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", server)
    srv = InProcess(max_message_bytes=1 << 20)
    try:
        (kwargs,) = built
        assert kwargs["options"] == [
            *grpc_options(1 << 20),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0),
        ]
    finally:
        srv.stop(bound=15)


# -- the start: its TLS listener and its log line ----------------------------------------------------------
def test_a_tls_service_listens_on_its_port_and_a_client_with_the_ca_is_served(tmp_path: Any) -> None:
    from scx_ref.service import RemoteTransport

    ((cert, key, ca_file),) = tls_files(tmp_path)
    srv = InProcess(tls_cert=str(cert), tls_key=str(key))
    try:
        assert srv.service.port > 0 and srv.service.ops_port is None  # no ops listener asked for
        assert srv.url == f"scxs://127.0.0.1:{srv.service.port}"
        with RemoteTransport(
            srv.url, srv.backend, timeout=60.0, connect_timeout=60.0, tls_ca=ca_file
        ) as link:
            link.send(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
            assert len(srv.server.sessions) == 1
    finally:
        srv.stop()


def test_a_tls_pair_that_does_not_match_is_refused_whole(tmp_path: Any) -> None:
    (cert, _, _), (_, other_key, _) = tls_files(tmp_path, 2)
    opts = ServeOptions(port=0, ops_port=None, tls_cert=str(cert), tls_key=str(other_key))
    service = SCXService(Server(InProcess.default_backend(), limits=opts.server_limits()), opts)
    with pytest.raises(ServiceError) as refused:
        asyncio.run(service.start())
    assert str(refused.value) == (
        "cannot listen on 127.0.0.1:0: address in use or not an address of this host, or the TLS certificate "
        "and key are not a matching PEM pair"
    )


def test_a_start_logs_one_listening_line_with_its_ports_and_greeting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="scx.serve"):
        srv = InProcess(ops_port=0)
    try:
        (listening,) = _events(caplog, "listening")
        info = json.loads(json.dumps(srv.service.info, default=str))
        assert info["service"] == "scx" and "fingerprint" in info
        assert listening == {
            "event": "listening",
            "port": srv.service.port,
            "ops_port": srv.service.ops_port,
            **info,
        }
        assert srv.service.port > 0 and srv.service.ops_port is not None and srv.service.ops_port > 0
    finally:
        srv.stop()


def test_the_idle_sweep_logs_how_many_sessions_it_evicted(caplog: pytest.LogCaptureFixture) -> None:
    """A session idle past ``idle_timeout`` on a stream that stays alive (hellos every 0.2 s) is evicted by
    the sweep, which logs one ``idle_evicted`` line counting it."""
    srv = InProcess(idle_timeout=0.5)
    raw = RawStream(srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="scx.serve"):
            assert raw.request(Request(SID, Stage.OPEN, -1, -1, 0, {}, OPEN_META)).kind is FrameKind.REPLY
            wait_for(lambda: bool(_events(caplog, "idle_evicted")), "the idle sweep's log line")
        assert _events(caplog, "idle_evicted") == [{"event": "idle_evicted", "sessions": 1}]
        assert not srv.server.sessions
    finally:
        raw.close()
        srv.stop()


@pytest.mark.parametrize("model_name", ["", "served-as"], ids=["no-name-given", "given-name"])
def test_the_greeting_names_the_service_its_model_and_its_bounds(model_name: str) -> None:
    """The greeting (``info``, what a hello is answered with): the protocol's version 1, the model's name
    (the one given, else the configuration's), its fingerprint and dtype, the batch and session bounds."""
    from scx_ref.service.service import model_fingerprint

    backend = InProcess.default_backend()
    opts = ServeOptions(port=0, ops_port=None, max_sessions=7, max_message_bytes=12345, batch_rows=3)
    server = Server(backend, limits=opts.server_limits(), batch_rows=opts.batch_rows)
    service = SCXService(server, opts, model_name) if model_name else SCXService(server, opts)
    try:
        assert service.info == {
            "service": "scx",
            "version": 1,
            "model": model_name or backend.config.name,
            "fingerprint": model_fingerprint(backend),
            "wire_dtype": "<f8",
            "batch_rows": 3,
            "max_sessions": 7,
            "max_message_bytes": 12345,
        }
    finally:
        service.pool.shutdown()


def test_the_compute_pool_has_workers_threads() -> None:
    opts = ServeOptions(port=0, ops_port=None, workers=3)
    service = SCXService(Server(InProcess.default_backend()), opts)
    try:
        assert service.pool._max_workers == 3  # CPython's ThreadPoolExecutor: its bound on threads
    finally:
        service.pool.shutdown()


def test_the_fingerprint_reads_the_hyper_parameters_but_not_the_name() -> None:
    """Weights and shapes equal: a model renamed is the same model; one whose RMSNorm ε differs (no sampled
    weight shows it) is not."""
    from scx_ref.backends import NumpyBackend
    from scx_ref.service.service import model_fingerprint

    from .tiny import tiny_weights

    base = model_fingerprint(NumpyBackend(tiny_weights(3)))
    assert model_fingerprint(NumpyBackend(tiny_weights(3, name="renamed"))) == base
    assert model_fingerprint(NumpyBackend(tiny_weights(3, rms_eps=1e-6))) != base


def test_a_log_field_json_cannot_write_is_written_as_its_text(caplog: pytest.LogCaptureFixture) -> None:
    from scx_ref.service.service import _event

    with caplog.at_level(logging.INFO, logger="scx.serve"):
        _event("probe", count=np.int64(5), ratio=np.float32(0.5))
    assert _events(caplog, "probe") == [{"event": "probe", "count": "5", "ratio": "0.5"}]


def test_the_fingerprint_is_the_documented_hash_and_agrees_across_dtypes() -> None:
    """SHA-256 over the configuration's fields but the name (JSON, keys sorted), then 16 embedding rows and
    block 1's QKV map of 4 unit vectors, each as little-endian float32; its first 16 hex digits. The same
    weights in float32 and float64 give one fingerprint; another sampled weight gives another."""
    import hashlib
    import json as json_

    from scx_ref.backends import NumpyBackend
    from scx_ref.service.service import model_fingerprint

    from .tiny import tiny_weights

    w = tiny_weights(3)
    b64 = NumpyBackend(w)
    c = w.config
    h = hashlib.sha256(
        json_.dumps({k: v for k, v in c.to_dict().items() if k != "name"}, sort_keys=True).encode()
    )
    h.update(np.asarray(w.embed[:16], dtype="<f4").tobytes())
    h.update(np.asarray(b64.project(np.eye(4, c.hidden_size), "wqkv", 0), dtype="<f4").tobytes())
    assert model_fingerprint(b64) == h.hexdigest()[:16]
    assert model_fingerprint(NumpyBackend(w, np.float32)) == model_fingerprint(b64)
    changed = tiny_weights(3)
    changed.embed[15, 0] += 1.0
    assert model_fingerprint(NumpyBackend(changed)) != model_fingerprint(b64)

"""``scx serve`` and ``RemoteTransport`` against a hostile peer, second pass (DESIGN §5.5–5.6):

- a client that sends but never reads its replies: the server's write waits on HTTP/2 flow control, and
  the client's transport keeps answering keepalive pings, so only a bound on that wait frees its stream
  (a place under ``max_sessions``) and its session's caches;
- a server whose reply travels in a dtype coarser than the session's (float32 or int64 to a float64
  client): ``RemoteTransport`` converts every array to the client backend's dtype, which hid that from
  the client's own check of the reply — in the middle blocks, which no value check covers, the rounded
  reply was used as exact;
- the codec's names and session ids: ``re.match`` with ``$`` let a trailing newline through.

No assertion is about time: waits are bounded loops on a condition, every client has a timeout.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from scx_ref.backends import NumpyBackend  # noqa: E402
from scx_ref.errors import IntegrityError, SCXError, WireError  # noqa: E402
from scx_ref.keys import KeySchedule  # noqa: E402
from scx_ref.protocol import Client, SCXConfig, Server  # noqa: E402
from scx_ref.protocol.messages import Reply, Request  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import (  # noqa: E402
    FrameKind,
    decode,
    encode_error,
    encode_hello,
    encode_reply,
    encode_request,
    request_from,
)
from scx_ref.service.service import METHOD, model_fingerprint  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402

from .services import InProcess, grpc_stub, wait_for  # noqa: E402
from .tiny import tiny_weights  # noqa: E402

PROMPT = np.array([1, 2, 3, 4, 5])
TIMEOUT = 20.0  # seconds a client waits for a reply: a bound against hangs, never an assertion


# -- a client that never reads ---------------------------------------------------------------------
class _Counting(Server[Any]):
    """A protocol server that counts the sessions it opened."""

    opened = 0

    def _open(self, req: Request) -> Reply:
        reply = super()._open(req)
        type(self).opened += 1
        return reply


OPEN_META = {"n": 4, "r1": 1, "r2": 1, "r_lock": 1, "l_s": 1, "l_e": 1, "max_length": 16, "level": "paper"}


def test_a_client_that_never_reads_its_replies_loses_its_stream_and_session() -> None:
    _Counting.opened = 0
    srv = InProcess(_Counting, idle_timeout=1.0, grace=0.5, max_sessions=1)
    # no BDP probing: the client's receive window stays small, so the server's writes soon wait on it
    channel = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    stop = threading.Event()
    hello = encode_hello({"client": "never reads"})

    def frames() -> Iterator[bytes]:
        yield encode_request(Request("ab" * 16, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
        for _ in range(20_000):  # far more replies than the flow-control windows hold
            if stop.is_set():
                return
            yield hello
        stop.wait(120)  # then silence, the stream still open: the client neither reads nor closes

    call = channel.stream_stream(METHOD)(frames())  # its replies are never read
    try:
        wait_for(lambda: _Counting.opened == 1, "the open")
        wait_for(
            lambda: not srv.service.streams and not srv.server.sessions,
            "the unread stream's eviction",
            bound=60.0,
        )
        # its place (the only one) is free: another client opens and closes a session
        with RemoteTransport(f"scx://{srv.address}", srv.backend, timeout=TIMEOUT) as link:
            opened = link.send(Request("cd" * 16, Stage.OPEN, -1, -1, 0, {}, OPEN_META))
            link.send(Request("cd" * 16, Stage.CLOSE, -1, -1, 1, {}, {}, opened.meta["token"]))
    finally:
        stop.set()
        call.cancel()
        channel.close()
        srv.stop()


# -- a server whose replies travel in a coarser dtype ----------------------------------------------
class Proxy:
    """A hostile gRPC server: a real protocol Server behind it, the ``nth`` reply (counting from 0) of
    ``stage`` passed through ``mutate`` before it is sent."""

    def __init__(
        self, backend: NumpyBackend, stage: str, mutate: Callable[[Reply], Reply], nth: int = 0
    ) -> None:
        real: Server[Any] = Server(NumpyBackend(tiny_weights(3)))
        hello = encode_hello(
            {
                "service": "scx",
                "fingerprint": model_fingerprint(backend),
                "wire_dtype": backend.numpy_dtype().str,
            }
        )
        self.mutated = 0
        self.seen = 0

        def handler(frames: Iterator[bytes], context: Any) -> Iterator[bytes]:
            for data in frames:
                if data[4] == FrameKind.HELLO:
                    yield hello
                    continue
                req = request_from(decode(data))
                try:
                    reply = real.handle(req)
                except SCXError as exc:
                    yield encode_error(type(exc).__name__, str(exc), req.seq)
                    continue
                if req.stage.value == stage:
                    if self.seen == nth:
                        reply = mutate(reply)
                        self.mutated += 1
                    self.seen += 1
                yield encode_reply(reply)

        self.server, self.url = grpc_stub(handler, 2)


def _as(dtype: Any) -> Callable[[Reply], Reply]:
    def mutate(r: Reply) -> Reply:
        arrays = {k: np.asarray(v).astype(dtype) for k, v in r.arrays.items()}
        return Reply(r.session, r.stage, r.layer, r.step, r.seq, arrays, r.meta)

    return mutate


def _generate(backend: NumpyBackend, url: str) -> list[int]:
    with RemoteTransport(url, backend, timeout=TIMEOUT) as link:
        client = Client(backend, KeySchedule.generate(), SCXConfig(level="paper"))
        toks = [int(np.argmax(client.prefill(PROMPT, link)[-1]))]
        for _ in range(2):
            toks.append(int(np.argmax(client.decode(toks[-1], link))))
        client.close(link)
    return toks


@pytest.fixture
def backend() -> NumpyBackend:
    return NumpyBackend(tiny_weights(3))


def test_the_proxy_passes_an_honest_session_through(backend: NumpyBackend) -> None:
    proxy = Proxy(backend, "gen_mid", lambda r: r)
    try:
        assert len(_generate(backend, proxy.url)) == 3
        assert proxy.seen == 2  # both generation steps ran the middle blocks through the proxy
    finally:
        proxy.server.stop(0)


@pytest.mark.parametrize("stage", ["gen_mid", "qkv"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float16])
def test_a_reply_in_a_dtype_coarser_than_the_sessions_is_refused(
    backend: NumpyBackend, stage: str, dtype: Any
) -> None:
    """gen_mid is the stage no value check covers: a float32 reply there was cast back to float64 by the
    transport and used as if exact (the session went on, without an error)."""
    proxy = Proxy(backend, stage, _as(dtype))
    try:
        with pytest.raises(IntegrityError, match="travelled as"):
            _generate(backend, proxy.url)
        assert proxy.mutated == 1
    finally:
        proxy.server.stop(0)


# -- the codec --------------------------------------------------------------------------------------
_PREFIX = struct.Struct("<4sB3xI")


def _frame(header: dict[str, Any], kind: int = 1) -> bytes:
    head = json.dumps(header).encode()
    out = _PREFIX.pack(b"SCX\x01", kind, len(head)) + head
    return out + b"\0" * (-len(out) % 64) if header.get("arrays") else out


BASE = {"session": "ab" * 16, "stage": "qkv", "layer": 0, "step": -1, "seq": 1, "token": "t", "meta": {}}


@pytest.mark.parametrize(
    "header",
    [
        {**BASE, "arrays": [["x\n", "<f8", [0, 16]]]},
        {**BASE, "session": "ab" * 16 + "\n"},
    ],
    ids=["array name", "session"],
)
def test_a_trailing_newline_in_a_name_or_session_is_a_wire_error(header: dict[str, Any]) -> None:
    from scx_ref.service.codec import request_from as parse

    with pytest.raises(WireError):
        parse(decode(_frame(header)))
    honest = {**header, "session": "ab" * 16, "arrays": [["x", "<f8", [0, 16]]]}
    assert parse(decode(_frame(honest))).arrays["x"].shape == (0, 16)

"""``scx serve``: load a model once and serve the untrusted SCX server role to many clients over gRPC
(DESIGN §5.6; :mod:`scx_ref.service.service`). Clients connect with ``scx generate --server
scx://HOST:PORT`` or :class:`scx_ref.service.RemoteTransport`.

Prints one line when it listens (``scx serve: MODEL on scx://HOST:PORT …``), then one JSON log line per
event on stderr. SIGTERM or Ctrl-C shuts it down gracefully: new sessions are refused, open ones get
``--grace`` seconds, in-flight messages finish (a second signal changes nothing). Started by
:class:`scx_ref.service.spawn.ServerProcess` (the environment variable :data:`PARENT_ENV` holds its pid),
it shuts down the same way once that process is gone, however it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ..backends.base import TORCH_DTYPES
from ..errors import ConfigError, ServiceError
from ..service.codec import MAX_MESSAGE_BYTES
from ..service.service import ServeOptions, unbracketed
from ..zoo import MODEL_NAMES, parse_random, weights_names_help
from ._args import (
    MAX_THREADS,
    device,
    float_at_least,
    input_file,
    int_at_least,
    plain_description,
    require_device,
)

__all__ = [
    "DEFAULT_MAX_BATCH_ROWS",
    "MAX_SESSIONS",
    "PARENT_ENV",
    "batch_rows_bound",
    "build_backend",
    "check_batch_rows",
    "check_tls",
    "register",
    "run",
]

#: The environment variable :class:`~scx_ref.service.spawn.ServerProcess` sets to its own pid: the server
#: stops (gracefully) once its parent is no longer that process — a killed ``scx bench-serve`` or test run
#: leaves no server behind.
PARENT_ENV = "SCX_SERVE_PARENT_PID"
#: The largest ``--max-message-mb``: whole MiB within :data:`~scx_ref.service.codec.MAX_MESSAGE_BYTES`
#: (gRPC's message-size options are C ints; a frame may carry 1 KiB of header beyond the limit): 2047
MAX_MESSAGE_MB = MAX_MESSAGE_BYTES >> 20
#: The largest ``--max-sessions``: the server's greeting carries it, and a greeting holds int64 integers
#: only (:func:`~scx_ref.service.codec.encode_hello`) — past it the server started and then refused every
#: client's hello, which each client reported as "not an SCX server"
MAX_SESSIONS = 2**63 - 1


def batch_rows_bound(max_batch: int, max_sessions: int) -> int:
    """The tallest useful ``--batch-rows`` of a server with these limits: a batch of the middle blocks holds
    one row per session (at most ``max_sessions``) and at most ``max_batch`` rows, so a taller tile adds
    only zero rows of padding (:func:`scx_ref.forward.block_rows`) — as many as the tile is tall, whatever
    the load: a tile of 10**9 rows runs out of memory at the first batch."""
    return min(max_batch, max_sessions)


#: The tallest ``--batch-rows`` of an ``scx serve`` with its default limits (64), and so the tallest tile
#: ``scx bench-serve --tiles`` times.
DEFAULT_MAX_BATCH_ROWS = batch_rows_bound(ServeOptions.max_batch, ServeOptions.max_sessions)


def build_backend(model: str, dtype: str, device: str) -> Any:
    """The TorchBackend of a ``--model`` name: a registered model on its HF weights, or
    ``random:<preset>[:seed]`` on :func:`scx_ref.zoo.load_weights` — never a stand-in (client and server
    must hold the same weights). ConfigError for any other name."""
    import numpy as np

    from ..backends.torch_backend import TorchBackend, parse_dtype
    from ..hf import backend_from_hf
    from ..zoo import load_hf, load_weights

    if parse_random(model) is None:
        if model not in MODEL_NAMES:
            raise ConfigError(f"unknown model {model!r}; choose {weights_names_help()}")
        return backend_from_hf(load_hf(model)[0], dtype=dtype, device=device)
    np_dtype = np.float64 if parse_dtype(dtype).itemsize == 8 else np.float32
    return TorchBackend(load_weights(model, np_dtype), dtype=dtype, device=device)


def _is_ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 address, bare (``::1``) or bracketed (``[::1]``)."""
    bare = unbracketed(host)
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        return False
    return True


def _grpc_host(host: str) -> str:
    """``host`` as gRPC's ``HOST:PORT`` address needs it: a bare IPv6 address (``::1``) in brackets (gRPC
    reads ``::1:8470`` as another address); anything else unchanged. ConfigError for brackets around
    anything but an IPv6 address (``[127.0.0.1]`` passed the listen check, loaded the model, and then
    gRPC could not parse it: reported as a port in use)."""
    if ("[" in host or "]" in host) and not (
        host.startswith("[") and host.endswith("]") and _is_ipv6(host) and "[" not in host[1:-1]
    ):
        raise ConfigError(f"argument --host: brackets are only for an IPv6 address ([::1]), got {host!r}")
    return f"[{host}]" if _is_ipv6(host) and not host.startswith("[") else host


#: The largest process id: ``pid_t`` is a C int (a larger one made ``os.kill`` raise OverflowError in the
#: parent watcher, which then never stopped the server)
MAX_PID = 2**31 - 1


def _parent_pid() -> int | None:
    """The pid in :data:`PARENT_ENV` (None when unset); ConfigError for anything but ASCII digits of an
    integer in [1, :data:`MAX_PID`] (``"²"`` passes ``str.isdigit`` but not ``int``)."""
    text = os.environ.get(PARENT_ENV)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PID:
        raise ConfigError(f"environment variable {PARENT_ENV} must be a process id, got {text!r}")
    return int(text)


def check_tls(cert: str, key: str) -> None:
    """ConfigError (one line, naming both files) unless ``cert`` is a PEM certificate chain and ``key``
    the unencrypted PEM private key of its first certificate — what gRPC needs to serve TLS. Checked
    before the model loads: gRPC itself only logs its reason and fails to bind, which read as a port that
    was in use. An encrypted key is refused (gRPC cannot use one), never prompted for."""
    import ssl

    def no_password() -> bytes:
        raise ConfigError("encrypted")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the pair's form only: key sizes are gRPC's policy, not ours
    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ConfigError:
        reason = "the private key is encrypted; give an unencrypted one"
    except ssl.SSLError as exc:
        reason = f"not a PEM certificate chain and the private key that matches it ({exc.reason or exc})"
    else:
        return
    raise ConfigError(f"--tls-cert {cert} / --tls-key {key}: {reason}")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists and has not ended (a zombie has, where ``/proc`` tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc here
        return True


async def _watch_parent(pid: int, stop: Callable[[], None], logger: logging.Logger) -> None:
    """Call ``stop`` (a graceful shutdown) once process ``pid`` has ended: this process's parent is no
    longer ``pid`` (it was handed to another), or — when ``pid`` was not the direct parent (a launcher
    between them) — no process ``pid`` exists."""
    direct = os.getppid() == pid
    while os.getppid() == pid if direct else _alive(pid):
        await asyncio.sleep(0.25)
    logger.warning(json.dumps({"event": "parent_gone", "parent": pid}))
    stop()


def check_listen(host: str, port: int, what: str) -> None:
    """ServiceError (one line, naming ``host:port``) unless this process could listen on ``host:port`` now:
    the host must resolve to an address of this machine and the port (unless 0) must be free on at least
    one of its addresses — the rule gRPC binds by. Checked before the model loads; :meth:`SCXService.start`
    still reports a port taken in between."""
    import socket

    bare = unbracketed(host)  # gRPC's [v6]:port form
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ServiceError(f"cannot listen on {host}:{port} ({what}): {reason}") from None
    reasons: list[str] = []
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server do
            try:
                sock.bind(addr)
            except OSError as exc:
                reasons.append(exc.strerror or str(exc))
            else:
                return
    raise ServiceError(f"cannot listen on {host}:{port} ({what}): {'; '.join(dict.fromkeys(reasons))}")


class _JsonLines(logging.Formatter):
    """One JSON object per line: time, level, and the event's fields (or its message)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": self.formatTime(record), "level": record.levelname}
        msg = record.getMessage()
        try:
            fields = json.loads(msg) if msg.startswith("{") else None
        except ValueError:
            fields = None
        out.update(fields if isinstance(fields, dict) else {"message": msg})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def register(subparsers: Any) -> None:
    """Add ``scx serve`` to the CLI."""
    d = ServeOptions()
    p = subparsers.add_parser(
        "serve",
        help="serve the SCX server role over the network (gRPC, binary frames, optional TLS)",
        description=plain_description(__doc__),
    )
    p.add_argument("--model", required=True, help=f"model to serve: {weights_names_help()}")
    p.add_argument(
        "--host",
        default=d.host,
        help=f"address to listen on, for gRPC and the ops port (default {d.host}); IPv6 as ::1 or [::1]",
    )
    p.add_argument(
        "--port",
        type=int_at_least(0, 65535),
        default=d.port,
        help=f"gRPC port (default {d.port}; 0: any free port)",
    )
    p.add_argument(
        "--ops-port",
        type=int_at_least(-1, 65535),
        default=d.ops_port,
        help=f"HTTP port of /health and /metrics (default {d.ops_port}; 0: any free port; -1: none)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=TORCH_DTYPES,
        help="float32 (default), float64, bfloat16, float16",
    )
    p.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        default=None,
        help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's)",
    )
    p.add_argument(
        "--workers", type=int_at_least(1), default=d.workers, help=f"compute threads (default {d.workers})"
    )
    p.add_argument(
        "--batch-rows",
        type=int_at_least(1),
        default=None,
        help=f"tile of the middle blocks' cross-session batches (default {d.batch_rows}, or less where the "
        f"bound is; 1: no batching); at most --max-batch and --max-sessions ({DEFAULT_MAX_BATCH_ROWS} with "
        "their defaults): a batch holds one row per session, a taller tile only pads",
    )
    p.add_argument(
        "--max-batch",
        type=int_at_least(1),
        default=d.max_batch,
        help=f"most gen_mid rows in one batch (default {d.max_batch})",
    )
    p.add_argument(
        "--max-sessions",
        type=int_at_least(1, MAX_SESSIONS),
        default=d.max_sessions,
        help=f"most sessions at once (default {d.max_sessions}; at most 2**63 - 1)",
    )
    p.add_argument(
        "--max-sessions-per-peer",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="most sessions at once from one client address, its port aside (default: no cap but "
        "--max-sessions; clients behind one NAT or proxy share an address)",
    )
    p.add_argument(
        "--max-message-mb",
        type=int_at_least(1, MAX_MESSAGE_MB),
        default=d.max_message_bytes >> 20,
        help=f"largest frame, MiB (default {d.max_message_bytes >> 20}; at most {MAX_MESSAGE_MB})",
    )
    p.add_argument(
        "--max-rows",
        type=int_at_least(1),
        default=d.max_rows,
        help=f"most rows one session may reach (default {d.max_rows})",
    )
    p.add_argument(
        "--max-decoys",
        type=int_at_least(1),
        default=d.max_decoys,
        help=f"most decoy rows at one stage (default {d.max_decoys})",
    )
    p.add_argument(
        "--max-cache-mb",
        type=int_at_least(1),
        default=d.max_cache_bytes >> 20,
        help=f"all sessions' caches together, MiB (default {d.max_cache_bytes >> 20})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float_at_least(0, strict=True),
        default=d.idle_timeout,
        help=f"seconds before an idle session, or one whose client leaves a reply unread, is evicted "
        f"(default {d.idle_timeout:g})",
    )
    p.add_argument(
        "--grace",
        type=float_at_least(0, strict=True),
        default=d.grace,
        help=f"seconds open sessions get at shutdown (default {d.grace:g})",
    )
    p.add_argument(
        "--tls-cert", type=input_file, default=None, help="PEM certificate (with --tls-key: serve scxs://)"
    )
    p.add_argument("--tls-key", type=input_file, default=None, help="PEM private key (with --tls-cert)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least level of the JSON log lines on stderr: debug, info (default), warning, error",
    )
    p.set_defaults(func=run)


def check_batch_rows(args: argparse.Namespace) -> int:
    """The ``batch_rows`` of ``scx serve`` options ``args``: ``args.batch_rows`` — ConfigError unless it is
    at most :func:`batch_rows_bound` of ``args.max_batch`` and ``args.max_sessions`` — or, where it is None
    (not given), the default of :class:`~scx_ref.service.service.ServeOptions` lowered to that bound."""
    bound = batch_rows_bound(args.max_batch, args.max_sessions)
    if args.batch_rows is None:
        return min(ServeOptions.batch_rows, bound)
    if args.batch_rows > bound:
        raise ConfigError(
            f"argument --batch-rows: must be <= {bound} (--max-batch {args.max_batch}, --max-sessions "
            f"{args.max_sessions}: a batch holds one row per session), got {args.batch_rows}"
        )
    return int(args.batch_rows)


@contextlib.contextmanager
def _json_log(level: str) -> Iterator[logging.Logger]:
    """The ``scx.serve`` logger writing JSON lines to stderr at ``level`` and above (not to the root's
    handlers) while the command runs. However the run ends, the logger's handlers, level and propagation
    are as they were before: a second in-process run (a test, a caller of :func:`scx_ref.cli.main`) writes
    each line once, and no handler is left writing to a stream that has since closed."""
    logger = logging.getLogger("scx.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    level_before, propagate_before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level_before)
        logger.propagate = propagate_before


def run(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT, shut down gracefully."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's own info lines are not JSON; errors still show
    batch_rows = check_batch_rows(args)
    require_device(args.device)  # before any model is loaded
    parent = _parent_pid()
    host = _grpc_host(args.host)
    if args.ops_port == args.port and args.port > 0:
        raise ConfigError(f"--port and --ops-port are both {args.port}: give them different ports")
    check_listen(host, args.port, "gRPC port")  # before any model is loaded
    if args.ops_port >= 0:
        check_listen(host, args.ops_port, "ops port")
    if args.tls_cert is not None and args.tls_key is not None:
        check_tls(str(args.tls_cert), str(args.tls_key))
    opts = ServeOptions(
        host=host,
        port=args.port,
        ops_port=None if args.ops_port < 0 else args.ops_port,
        workers=args.workers,
        batch_rows=batch_rows,
        max_batch=args.max_batch,
        max_sessions=args.max_sessions,
        max_sessions_per_peer=args.max_sessions_per_peer,
        max_message_bytes=args.max_message_mb << 20,
        max_rows=args.max_rows,
        max_decoys=args.max_decoys,
        max_cache_bytes=args.max_cache_mb << 20,
        idle_timeout=args.idle_timeout,
        grace=args.grace,
        tls_cert=None if args.tls_cert is None else str(args.tls_cert),
        tls_key=None if args.tls_key is None else str(args.tls_key),
    )
    with _json_log(args.log_level.upper()) as logger:
        return _serve(args, opts, parent, logger)


def _serve(args: argparse.Namespace, opts: ServeOptions, parent: int | None, logger: logging.Logger) -> int:
    """Load the model and serve with ``opts`` until a signal (or the parent's end), then shut down."""
    from ..protocol.server import Server
    from ..service.service import SCXService

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    backend = build_backend(args.model, args.dtype, args.device)
    server = Server(backend, limits=opts.server_limits(), batch_rows=opts.batch_rows)
    service = SCXService(server, opts, args.model)

    async def main() -> None:
        await service.start()
        scheme = "scxs" if opts.tls_cert else "scx"
        ops = (
            "" if service.ops_port is None else f"; ops http://{opts.host}:{service.ops_port}/health /metrics"
        )
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[None]] = []

        def stop() -> None:  # the first signal (or the parent's end) starts the one graceful shutdown
            if not stopping:
                stopping.append(loop.create_task(service.stop()))

        # before the ready line: a SIGTERM sent as soon as it is read (ServerProcess.stop) found the default
        # action still in place and killed the server without its graceful shutdown
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        watch = None if parent is None else loop.create_task(_watch_parent(parent, stop, logger))
        try:
            print(
                f"scx serve: {args.model} ({args.dtype}) on {scheme}://{opts.host}:{service.port}{ops}",
                flush=True,
            )
        except BaseException:  # stdout gone (a closed pipe): shut down as on a signal, then report it
            if watch is not None:
                watch.cancel()
            await service.stop()
            raise
        await service.wait_stopped()
        if watch is not None:
            watch.cancel()

    asyncio.run(main())
    print("scx serve: stopped", flush=True)
    return 0

"""Start and stop an ``scx serve`` process (tests and ``scx bench-serve``): on any free port, its URLs
read from the line it prints once it listens."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from .._checks import check_int, check_real
from ..commands.serve import PARENT_ENV
from ..errors import ConfigError, ServiceError

__all__ = ["ServerProcess"]

_READY = re.compile(r"on (scxs?://[^\s;]+)(?:; ops (http://[^\s/]+))?")


class ServerProcess:
    """A running ``scx serve --model MODEL ARGS…`` child process.

    ``url`` is its ``scx://`` (or ``scxs://``) address, ``ops`` its ``http://`` ops address. The server's
    stderr (JSON log lines) is kept in ``log``. ``start_timeout`` bounds the wait for the ready line
    (loading a model takes a while); a process that exits first, or prints no address in time, raises
    ServiceError with all it printed (its reason included) and which of the two happened. ``args`` is a
    sequence of separate arguments (ConfigError for one string); ``model``, each argument and each key and
    value of ``env`` must be strings (none holding a NUL, no ``=`` in a variable's name), ``port`` in
    [0, 65535] and ``start_timeout`` positive and finite (ConfigError otherwise, before any process starts;
    ServiceError when the interpreter cannot be run). A constructor that raises (KeyboardInterrupt
    included) has killed the process. What the process prints is read in the locale's encoding, a byte
    that is not in it written as its escape (such a byte once ended the reader, leaving the pipe unread).
    Once the process has ended (:meth:`stop`, :meth:`kill`) its pipes are closed. The server stops by
    itself (gracefully) once this process is gone, however it ends — a SIGTERM or SIGKILL included
    (:data:`scx_ref.commands.serve.PARENT_ENV`).
    """

    def __init__(
        self,
        model: str,
        args: Sequence[str] = (),
        *,
        port: int = 0,
        start_timeout: float = 180.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if isinstance(args, (str, bytes)):
            raise ConfigError(f"ServerProcess args must be a list of arguments, not the string {args!r}")
        # checked before the process starts: a start_timeout of "x" raised (and NaN waited for ever) once
        # it ran, leaving it running; an iterator's "--ops-port" was consumed by the test below
        if not isinstance(args, Iterable) or (env is not None and not isinstance(env, dict)):
            raise ConfigError("ServerProcess args must be a list of strings and env a dict of strings")
        args = list(args)
        texts: list[Any] = [model, *args, *(x for kv in (env or {}).items() for x in kv)]
        bad = [x for x in texts if not isinstance(x, str)]
        if bad:
            raise ConfigError(f"ServerProcess model, args and env must be strings, got {bad[0]!r:.60}")
        port = check_int(port, "port", 0, 65535)
        start_timeout = check_real(start_timeout, "start_timeout", 0, threading.TIMEOUT_MAX, lo_open=True)
        cmd = [sys.executable, "-m", "scx_ref.cli", "serve", "--model", model, "--port", str(port)]
        if "--ops-port" not in args:
            cmd += ["--ops-port", "0"]
        cmd += args
        self.log: list[str] = []
        self._out: list[str] = []
        self._readers: list[threading.Thread] = []
        ready = threading.Event()
        self.url = self.ops = ""

        def read_stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._out.append(line)
                m = _READY.search(line)
                if m and not ready.is_set():
                    self.url, self.ops = m.group(1), m.group(2) or ""
                    ready.set()

        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="backslashreplace",
                env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())},
            )
        except ValueError as exc:  # a NUL in an argument or a value, "=" in a variable's name
            raise ConfigError(f"cannot start scx serve: {exc}") from None
        except OSError as exc:
            raise ServiceError(f"cannot start scx serve: {exc}") from None
        try:  # from here on, however this fails (a reader thread that cannot start, too), the process dies
            self._readers.append(
                threading.Thread(target=self._drain, args=(self.proc.stderr, self.log), daemon=True)
            )
            self._readers.append(threading.Thread(target=read_stdout, daemon=True))
            for t in self._readers:
                t.start()
            end = time.monotonic() + start_timeout
            while not ready.wait(0.05):
                exited = self.proc.poll() is not None
                if exited or time.monotonic() > end:
                    self.kill()  # reads what the process printed to the end: its reason is in the message
                    why = (
                        f"exited with status {self.proc.returncode}"
                        if exited
                        else f"printed no address within {start_timeout:g} s (killed)"
                    )
                    raise ServiceError(
                        f"scx serve did not start: it {why}\n"
                        + "".join(self._out)[-2000:]
                        + "\n".join(self.log)[-4000:]
                    )
        except BaseException:  # Ctrl-C while it starts, too: no server is left behind
            self.kill()
            raise

    @staticmethod
    def _drain(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def port(self) -> int:
        """The gRPC port."""
        return int(self.url.rsplit(":", 1)[1])

    def _ops_url(self, path: str) -> str:
        if not self.ops:
            raise ServiceError("this scx serve has no ops address (--ops-port -1): no /health or /metrics")
        return self.ops + path

    def health(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of ``/health``; ServiceError when there is no ops address, it cannot be
        reached (a stopped server) or the body is not a JSON object; ConfigError unless ``timeout`` is a
        number of seconds > 0."""
        timeout = check_real(timeout, "timeout", 0, threading.TIMEOUT_MAX, lo_open=True)
        url = self._ops_url("/health")
        try:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    status, body = int(r.status), json.loads(r.read())
            except urllib.error.HTTPError as exc:
                status, body = int(exc.code), json.loads(exc.read())
        except (OSError, ValueError) as exc:  # URLError, a timeout, a body that is not JSON
            raise ServiceError(f"no health report from {url}: {exc}") from None
        if not isinstance(body, dict):
            raise ServiceError(f"{url} answered {str(body)[:100]!r}, not a JSON object")
        return status, body

    def metrics(self, timeout: float = 5.0) -> str:
        """The Prometheus text of ``/metrics``; ServiceError when there is no ops address or it cannot be
        reached (a stopped server); ConfigError unless ``timeout`` is a number of seconds > 0."""
        timeout = check_real(timeout, "timeout", 0, threading.TIMEOUT_MAX, lo_open=True)
        url = self._ops_url("/metrics")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                text: str = r.read().decode()
                return text
        except (OSError, ValueError) as exc:  # URLError, HTTPError, a timeout, a body that is not UTF-8
            raise ServiceError(f"no metrics from {url}: {exc}") from None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown), wait, return the exit code (killed after ``timeout``). ConfigError,
        before any signal, unless ``timeout`` is a number of seconds > 0."""
        timeout = check_real(timeout, "timeout", 0, threading.TIMEOUT_MAX, lo_open=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL: the server dies at once, mid-message or not."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        """After the process ended: let the readers take what it printed to the end, then close the pipes
        (a reader still blocked — a grandchild holding the pipe — keeps its pipe open)."""
        readers: list[threading.Thread | None] = [*self._readers, None, None]  # one not made: no reader
        for t, stream in zip(readers, (self.proc.stderr, self.proc.stdout), strict=False):
            if t is not None and t.ident is not None:  # a thread never started cannot be joined
                t.join(5.0)
            if (t is None or not t.is_alive()) and stream is not None:
                stream.close()

    def stdout(self) -> str:
        """What the server printed on stdout so far."""
        return "".join(self._out)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

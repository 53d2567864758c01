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
from collections.abc import Sequence
from typing import Any

from ..commands.serve import PARENT_ENV
from ..errors import ServiceError

__all__ = ["ServerProcess"]

_READY = re.compile(r"on (scxs?://[^\s;]+)(?:; ops (http://[^\s/]+))?")


class ServerProcess:
    """A running ``scx serve --model MODEL ARGS…`` child process.

    ``url`` is its ``scx://`` (or ``scxs://``) address, ``ops`` its ``http://`` ops address. The server's
    stderr (JSON log lines) is kept in ``log``. ``start_timeout`` bounds the wait for the ready line
    (loading a model takes a while); a process that exits first raises ServiceError with its output. A
    constructor that raises (KeyboardInterrupt included) has killed the process. The server stops by itself
    (gracefully) once this process is gone, however it ends — a SIGTERM or SIGKILL included
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
        cmd = [sys.executable, "-m", "scx_ref.cli", "serve", "--model", model, "--port", str(port)]
        if "--ops-port" not in args:
            cmd += ["--ops-port", "0"]
        cmd += list(args)
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())},
        )
        self.log: list[str] = []
        self._out: list[str] = []
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.log), daemon=True).start()
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

        threading.Thread(target=read_stdout, daemon=True).start()
        end = time.monotonic() + start_timeout
        try:
            while not ready.wait(0.05):
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.kill()
                    raise ServiceError(
                        f"scx serve did not start (exit {self.proc.returncode}): "
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

    def health(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of ``/health``."""
        try:
            with urllib.request.urlopen(self.ops + "/health", timeout=timeout) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read())

    def metrics(self, timeout: float = 5.0) -> str:
        """The Prometheus text of ``/metrics``."""
        with urllib.request.urlopen(self.ops + "/metrics", timeout=timeout) as r:
            text: str = r.read().decode()
            return text

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown), wait, return the exit code (killed after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        """SIGKILL: the server dies at once, mid-message or not."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stdout(self) -> str:
        """What the server printed on stdout so far."""
        return "".join(self._out)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The ``scx`` commands a new user meets (generate, serve, bench-serve, verify) and
:class:`~scx_ref.service.spawn.ServerProcess`: options that gave a traceback (a message size past gRPC's C
int, a thread count past torch's, a timeout past ``threading.TIMEOUT_MAX``, a seed past 64 bits) are usage
errors (exit 2, one ``scx <command>: error:`` line); ``--tls-ca`` beside a plaintext ``scx://`` server is
refused, not ignored; a malformed ``--server`` URL is refused before any model loads; an IPv6 ``--host`` is
served, its ops listener too (stop 62; stop 61 refused it); a bare IPv6 ``--host`` is bracketed for gRPC; a
``scx serve`` started by ServerProcess stops once its parent is gone (even SIGKILLed); a second Ctrl-C does
not run the shutdown twice.

Models: ``tiny-llama`` and ``random:tiny-dense`` (no download); nothing asserts about time beyond generous
bounds on a process ending.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("torch")

from scx_ref.commands._args import MAX_SEED, MAX_THREADS, MAX_TIMEOUT_S
from scx_ref.commands.serve import MAX_MESSAGE_MB, PARENT_ENV
from scx_ref.service.codec import grpc_options
from scx_ref.service.spawn import ServerProcess
from tests.cli_checks import refuse_work, usage_error
from tests.services import needs_ipv6


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way the commands load a model or start their run, recorded (and failing the test)."""
    return refuse_work(monkeypatch)


# -- numbers past what the libraries take: usage errors, not tracebacks ------------------------------------


def test_max_message_mb_stops_where_grpc_s_c_int_does(
    capsys: pytest.CaptureFixture[str], no_model: list[str]
) -> None:
    """``--max-message-mb 99999999`` gave an OverflowError traceback from gRPC after the model loaded."""
    from scx_ref.errors import ConfigError

    sizes = [v for _k, v in grpc_options(MAX_MESSAGE_MB << 20)]
    assert max(sizes) <= 2**31 - 1, "the largest accepted limit overflows gRPC's int options"
    assert ((MAX_MESSAGE_MB + 1) << 20) + 1024 > 2**31 - 1, "the bound is not tight"
    with pytest.raises(ConfigError, match="max_message_bytes"):
        grpc_options((MAX_MESSAGE_MB + 1) << 20)
    for text in (str(MAX_MESSAGE_MB + 1), "99999999"):
        argv = ["serve", "--model", "tiny-llama", "--port", "0", "--ops-port", "-1", "--max-message-mb", text]
        usage_error(capsys, argv, "--max-message-mb")
    assert no_model == []


@pytest.mark.parametrize("command", ["serve", "bench-serve"])
def test_threads_past_the_cap_are_usage_errors(
    capsys: pytest.CaptureFixture[str], no_model: list[str], command: str
) -> None:
    """``--threads 100000000000`` gave torch's ValueError traceback (serve: after the listen checks)."""
    ports = ["--port", "0", "--ops-port", "-1"] if command == "serve" else ["--skip-load", "--tiles", ""]
    for text in (str(MAX_THREADS + 1), str(2**31), "100000000000"):
        usage_error(capsys, [command, "--model", "tiny-llama", *ports, "--threads", text], "--threads")
    assert no_model == []


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--server", "scx://127.0.0.1:1", "--prompt-ids", "1", "--timeout", "1e300"],
        ["generate", "--server", "scx://127.0.0.1:1", "--prompt-ids", "1", "--connect-timeout", "1e300"],
        ["generate", "--server", "scx://127.0.0.1:1", "--prompt-ids", "1", "--timeout", "1e10"],
        ["bench-serve", "--timeout", "1e300"],
    ],
    ids=["generate-timeout", "generate-connect-timeout", "generate-timeout-1e10", "bench-serve-timeout"],
)
def test_client_timeouts_past_the_cap_are_usage_errors(
    capsys: pytest.CaptureFixture[str], no_model: list[str], argv: list[str]
) -> None:
    """A timeout past ``threading.TIMEOUT_MAX`` raised OverflowError in the client's watchdog or gRPC's
    connectivity thread: a traceback, and (connect) exit status 1."""
    assert MAX_TIMEOUT_S <= threading.TIMEOUT_MAX
    option = next(a for a in argv if a.endswith("timeout"))
    usage_error(capsys, [*argv, "--model", "tiny-llama"], option)
    assert no_model == []


def test_a_seed_past_64_bits_is_refused_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], no_model: list[str]
) -> None:
    """``--seed 2**64`` was refused only after the model loaded and the server was reached, as
    'generation stopped after 0 new token(s)'."""
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1", "--do-sample", "--seed"]
    usage_error(capsys, [*argv, str(MAX_SEED + 1)], "--seed")
    assert no_model == []


# -- conflicting or malformed options: refused before any model loads ------------------------------------


def test_tls_ca_beside_a_plaintext_server_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], no_model: list[str], tmp_path: Path
) -> None:
    """``--tls-ca ca.pem --server scx://…`` connected in plaintext, silently ignoring the CA the user gave."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before the URL\n")
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1", "--tls-ca", str(ca)]
    usage_error(capsys, [*argv, "--server", "scx://127.0.0.1:1"], "--tls-ca", "scxs://")
    assert no_model == []


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt-ids", "1"],
        ["verify", "--quiet", "--tokens", "16"],
        ["bench-serve", "--skip-load", "--tiles", "", "--n", "4"],
    ],
    ids=["generate", "verify", "bench-serve"],
)
@pytest.mark.parametrize("url", ["nothing", "http://127.0.0.1:8470", "scx://127.0.0.1"])
def test_a_malformed_server_url_is_refused_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], no_model: list[str], argv: list[str], url: str
) -> None:
    """The URL was parsed only when the first session opened, after loading the model (seconds on
    SmolLM2, and after part of ``scx verify``'s checks)."""
    usage_error(capsys, [*argv, "--model", "tiny-llama", "--server", url], "scx://HOST:PORT")
    assert no_model == []


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_is_served_with_its_ops_listener(host: str) -> None:
    """The ops listener was an IPv4 http.server: ``--host [::1]`` loaded the model, bound gRPC, then failed
    on the ops port ('Name or service not known'), and ``--host ::1`` failed in gRPC as 'address in use'
    (stop 61 refused both before the model loaded). Now /health and /metrics answer on ``[::1]`` too."""
    with ServerProcess("random:tiny-dense", ["--host", host, "--dtype", "float64"]) as server:
        assert re.fullmatch(r"http://\[::1\]:\d+", server.ops), server.ops
        status, body = server.health()
        assert status == 200 and body["status"] == "serving"
        assert "scx_sessions_open" in server.metrics()


@needs_ipv6
def test_a_bare_ipv6_host_is_served_on_a_valid_url() -> None:
    """``--host ::1`` gave gRPC ``::1:PORT``, which it read as another address ('Failed to add port');
    now the server listens on ``[::1]`` and prints an ``scx://[::1]:PORT`` URL."""
    import grpc

    with ServerProcess(
        "random:tiny-dense", ["--host", "::1", "--ops-port", "-1", "--dtype", "float64"]
    ) as server:
        m = re.fullmatch(r"scx://\[::1\]:(\d+)", server.url)
        assert m, server.url
        channel = grpc.insecure_channel(f"[::1]:{m.group(1)}")
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        finally:
            channel.close()
        # and a client reaches it by that URL (RemoteTransport bracketed nothing: it dialled ::1:PORT and
        # timed out), the session exact
        import torch

        from scx_ref.backends.torch_backend import TorchBackend
        from scx_ref.keys import KeySchedule
        from scx_ref.protocol import Client, SCXConfig
        from scx_ref.reference import ReferenceModel
        from scx_ref.service import RemoteTransport
        from scx_ref.zoo import load_weights

        w = load_weights("random:tiny-dense", np.float64)
        prompt = np.array([5, 17, 3, 88, 41, 9])
        with RemoteTransport(server.url, timeout=60.0, connect_timeout=30.0) as link:
            got = Client(
                TorchBackend(w, torch.float64), KeySchedule.generate(), SCXConfig(level="paper")
            ).prefill(prompt, link)
        want, _ = ReferenceModel(w).prefill(prompt)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": 1e300}, "timeout"),
        ({"connect_timeout": -1.0}, "connect_timeout"),
        ({"connect_timeout": "10"}, "connect_timeout"),
        ({"tls_ca": "ca.pem"}, "tls_ca"),
    ],
)
def test_remote_transport_refuses_bad_waits_and_a_tls_ca_without_tls(
    kw: dict[str, Any], message: str
) -> None:
    """A NaN timeout passed ``timeout <= 0`` and waited forever; one past threading.TIMEOUT_MAX raised
    OverflowError in the watchdog's thread; ``tls_ca`` beside ``scx://`` was ignored (a plaintext link)."""
    from scx_ref.errors import ConfigError
    from scx_ref.service import RemoteTransport

    with pytest.raises(ConfigError, match=message):
        RemoteTransport("scx://127.0.0.1:9", **kw)


# -- no server left behind; one shutdown --------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_spawned_server_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    """``scx bench-serve`` (or a test run) ended by SIGTERM or SIGKILL left its ``scx serve`` child running,
    re-parented, holding its port, forever. Now the child notices its parent is gone and shuts down."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from scx_ref.service.spawn import ServerProcess
            server = ServerProcess("random:tiny-dense", ["--ops-port", "-1", "--grace", "1"])
            print(server.proc.pid, server.port, flush=True)
            time.sleep(600)
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        child, port = map(int, line.split())
        assert _state(child) not in (None, "Z")
        parent.kill()  # SIGKILL: no finally, no atexit in the parent
        parent.wait(30)
        deadline = time.monotonic() + 60
        while _state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(child) in (None, "Z"), "the scx serve child outlived its killed parent"
        assert _port_free(port)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)


def test_parent_pid_variable_is_checked() -> None:
    """A malformed :data:`PARENT_ENV` (only ServerProcess sets it) is a ConfigError before any model loads."""
    env = {**os.environ, PARENT_ENV: "abc"}
    argv = ["serve", "--model", "random:tiny-dense", "--port", "0", "--ops-port", "-1"]
    out = subprocess.run(
        [sys.executable, "-m", "scx_ref.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"scx serve: error: environment variable {PARENT_ENV}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_second_signal_does_not_run_the_shutdown_twice() -> None:
    """Ctrl-C twice while open sessions drain started a second shutdown beside the first ('draining' and
    'stopped' logged twice). The server also runs at the largest ``--max-message-mb`` (gRPC's int)."""
    from scx_ref.backends.numpy_backend import NumpyBackend
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig
    from scx_ref.service import RemoteTransport
    from scx_ref.zoo import load_weights

    weights = load_weights("random:tiny-dense", np.float64)
    args = ["--dtype", "float64", "--grace", "2", "--max-message-mb", str(MAX_MESSAGE_MB)]
    server = ServerProcess("random:tiny-dense", args)
    link = RemoteTransport(server.url, NumpyBackend(weights))
    try:
        client = Client(NumpyBackend(weights), KeySchedule.generate(), SCXConfig(level="paper"))
        client.prefill(np.array([1, 2, 3]), link)  # a session stays open: the shutdown waits --grace
        server.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while not any('"draining"' in ln for ln in server.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(60) == 0
        time.sleep(0.2)  # the log reader drains what is left
        events = [ln for ln in server.log if '"event"' in ln]
        assert sum('"draining"' in ln for ln in events) == 1, events
        assert sum('"stopped"' in ln for ln in events) == 1, events
        assert server.stdout().count("scx serve: stopped") == 1
    finally:
        link.close()
        server.kill()


def test_a_server_watching_a_process_that_is_not_its_parent_waits_for_that_process() -> None:
    """With a launcher between ServerProcess and ``scx serve`` (the pid in :data:`PARENT_ENV` is not the
    direct parent), the server serves while that process lives and stops once it has ended — it neither
    stops at once nor outlives it."""
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    argv = ["serve", "--model", "random:tiny-dense", "--port", "0", "--ops-port", "-1", "--grace", "1"]
    server = subprocess.Popen(
        [sys.executable, "-m", "scx_ref.cli", *argv],
        env={**os.environ, PARENT_ENV: str(watched.pid)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "on scx://" in server.stdout.readline()
        time.sleep(1.0)
        assert server.poll() is None, "the server stopped while the watched process lives"
        watched.kill()
        watched.wait()
        assert server.wait(60) == 0
        assert '"parent_gone"' in server.communicate(timeout=10)[1]
    finally:
        for proc in (watched, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

"""``scx serve`` as a real process on a free port, and clients in this process talking to it over gRPC:
exact outputs at every level, concurrency, bad input on the wire (including a Hypothesis fuzzer running
beside an honest client), timeouts, faults (server killed, restarted, stopped; clients vanishing or
slow), graceful shutdown, limits, model/dtype mismatch and TLS with a certificate made on the fly.

No assertion is about time: waits are bounded loops on a condition (a server that never evicts a session
fails the test when the bound runs out), and each client has a timeout so nothing can hang.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")
torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scx_ref.backends.torch_backend import TorchBackend  # noqa: E402
from scx_ref.errors import (  # noqa: E402
    ConfigError,
    ProtocolError,
    ServiceError,
    SessionError,
    ShapeError,
)
from scx_ref.keys import KeySchedule  # noqa: E402
from scx_ref.protocol import Client, SCXConfig  # noqa: E402
from scx_ref.protocol.messages import Request  # noqa: E402
from scx_ref.reference import ReferenceModel  # noqa: E402
from scx_ref.sampling import generate_tokens, generation_settings  # noqa: E402
from scx_ref.service import RemoteTransport  # noqa: E402
from scx_ref.service.codec import FrameKind, decode, encode_request  # noqa: E402
from scx_ref.service.spawn import ServerProcess  # noqa: E402
from scx_ref.stages import Stage  # noqa: E402
from scx_ref.zoo import load_weights  # noqa: E402

MODEL = "random:tiny-dense"  # 4 blocks: first guard, two middle blocks, last guard
PROMPT = np.array([5, 17, 3, 88, 41, 9, 60, 2, 77, 31, 12])
N_NEW = 6
ARRAY_LIKE = re.compile(r"(-?\d+\.\d+(e-?\d+)?[,\s]+){4}")  # four numbers in a row: array contents
TIMEOUT = 60.0  # seconds a client waits for any reply: a bound against hangs, never an assertion


@pytest.fixture(scope="module")
def weights() -> Any:
    return load_weights(MODEL, np.float64)


@pytest.fixture(scope="module")
def backend(weights: Any) -> TorchBackend:
    return TorchBackend(weights, torch.float64)


@pytest.fixture(scope="module")
def plain(weights: Any) -> tuple[np.ndarray, list[int]]:
    """Plaintext prompt logits and greedy tokens (numpy reference, float64)."""
    ref = ReferenceModel(weights)
    logits, cache = ref.prefill(PROMPT)
    toks = [int(np.argmax(logits[-1]))]
    for _ in range(N_NEW - 1):
        toks.append(int(np.argmax(ref.decode(toks[-1], cache))))
    return np.asarray(logits), toks


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(
        MODEL, ["--dtype", "float64", "--batch-rows", "4", "--workers", "2", "--log-level", "debug"]
    )
    yield srv
    assert srv.stop() == 0
    assert "scx serve: stopped" in srv.stdout()
    assert len(srv.log) > 10  # events were logged: sessions opened and closed, frames refused
    for line in srv.log:  # structured: one JSON object per line, never an array's contents
        event = json.loads(line)
        assert {"ts", "level"} <= set(event), line
        assert not ARRAY_LIKE.search(line), line


def run_session(
    backend: TorchBackend, link: Any, level: str = "paper", n_new: int = N_NEW
) -> tuple[np.ndarray, list[int]]:
    client = Client(backend, KeySchedule.generate(), SCXConfig(level=level, decoys="gaussian"))  # type: ignore[arg-type]
    logits = client.prefill(PROMPT, link)
    toks = [int(np.argmax(logits[-1]))]
    for _ in range(n_new - 1):
        toks.append(int(np.argmax(client.decode(toks[-1], link))))
    return np.asarray(logits), toks


def assert_exact(got: tuple[np.ndarray, list[int]], want: tuple[np.ndarray, list[int]]) -> None:
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-10)
    assert got[1] == want[1]


def wait_for(cond: Any, what: str, bound: float = 60.0) -> None:
    """Poll ``cond`` until true; fail naming ``what`` when ``bound`` seconds pass (a bound, not a timing)."""
    end = time.monotonic() + bound
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"{what} did not happen")
        time.sleep(0.05)


# -- exactness and concurrency ----------------------------------------------------------------------
@pytest.mark.parametrize("level", ["permute", "paper", "blind"])
def test_remote_session_is_exact_at_every_level(
    server: ServerProcess, backend: TorchBackend, plain: Any, level: str
) -> None:
    with RemoteTransport(server.url, backend, timeout=TIMEOUT) as link:
        assert_exact(run_session(backend, link, level), plain)
        assert link.meter.stages[Stage.QKV].round_trips == backend.config.n_layers
        assert link.info is not None and link.info["batch_rows"] == 4


def test_concurrent_clients_are_exact_and_health_metrics_report_them(
    server: ServerProcess, backend: TorchBackend, plain: Any
) -> None:
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        try:
            with RemoteTransport(server.url, backend, timeout=TIMEOUT) as link:
                results[i] = run_session(backend, link, "paper", n_new=N_NEW)
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert not isinstance(results[i], Exception), results[i]
        assert_exact(results[i], plain)
    code, health = server.health()
    assert code == 200 and health["status"] == "serving" and health["model"] == MODEL
    wait_for(lambda: server.health()[1]["sessions"] == 0, "every closed stream's session evicted")
    text = server.metrics()
    assert 'scx_messages_total{stage="gen_mid"}' in text
    assert "scx_stage_seconds_bucket" in text and "scx_batch_rows_count" in text
    assert "process_resident_memory_bytes" in text


def test_python_subprocess_client_is_exact(server: ServerProcess, plain: Any) -> None:
    """A client in another process (the README's Python usage) gets the plaintext tokens."""
    code = (
        "import numpy as np, torch\n"
        "from scx_ref.zoo import load_weights\n"
        "from scx_ref.backends.torch_backend import TorchBackend\n"
        "from scx_ref.keys import KeySchedule\n"
        "from scx_ref.protocol import Client, SCXConfig\n"
        "from scx_ref.service import RemoteTransport\n"
        f"b = TorchBackend(load_weights({MODEL!r}, np.float64), torch.float64)\n"
        f"link = RemoteTransport({server.url!r}, b, timeout={TIMEOUT})\n"
        "c = Client(b, KeySchedule.generate(), SCXConfig(level='blind', decoys='gaussian'))\n"
        f"print(c.generate(np.array({PROMPT.tolist()}), {N_NEW}, link))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(plain[1])


# -- bad input on the wire -----------------------------------------------------------------------------
def _raw(server: ServerProcess, backend: TorchBackend) -> RemoteTransport:
    link = RemoteTransport(server.url, backend, timeout=TIMEOUT)
    link._connect()
    return link


def _error_of(reply: bytes) -> tuple[str, str]:
    f = decode(reply)
    assert f.kind is FrameKind.ERROR, f.header
    return str(f.header["error"]), str(f.header["message"])


def _build(header: dict[str, Any], arrays: list[Any], payload: bytes = b"") -> bytes:
    """A frame with exactly this header (the codec would refuse to write a bad one)."""
    head = json.dumps({**header, "arrays": arrays}).encode()
    pre = b"SCX\x01" + bytes([1, 0, 0, 0]) + len(head).to_bytes(4, "little") + head
    return pre + (b"\0" * (-len(pre) % 64) + payload if arrays else b"")


def _valid_frame(session: str = "ab" * 16, seq: int = 0) -> bytes:
    meta = {"n": 4, "r1": 1, "r2": 1, "r_lock": 1, "l_s": 1, "l_e": 1, "max_length": 16, "level": "paper"}
    return encode_request(Request(session, Stage.OPEN, -1, -1, seq, {"x": np.ones((2, 3))}, meta))


def test_malformed_frames_get_clear_errors_and_the_stream_goes_on(
    server: ServerProcess, backend: TorchBackend, plain: Any
) -> None:
    link = _raw(server, backend)
    frame = _valid_frame()
    hlen = int.from_bytes(frame[8:12], "little")
    cases = {
        "truncated": frame[:7],
        "truncated arrays": frame[:-5],
        "bad magic": b"XXXX" + frame[4:],
        "unknown kind": frame[:4] + b"\x09" + frame[5:],
        "huge header": frame[:8] + (10**9).to_bytes(4, "little") + frame[12:],
        "header past end": frame[:8] + (hlen + 50).to_bytes(4, "little") + frame[12:],
        "garbage": os.urandom(300),
        "empty": b"",
        "trailing bytes": frame + b"\0" * 8,
    }
    for name, data in cases.items():
        cls, msg = _error_of(link._roundtrip(data))
        assert cls == "WireError", (name, cls, msg)
    head = {"session": "ab" * 16, "stage": "open", "layer": -1, "step": -1, "seq": 0, "meta": {}}
    crafted = [
        ({**head}, [["x", "<f8", [99999999, 99999999]]], "declares bytes past"),  # nothing allocated
        ({**head}, [["x", "<f2", [1]]], "dtype"),
        ({**head}, [["x", "<f8", [1, 1, 1, 1, 1]]], "sizes"),
        ({**head, "meta": {"n": 4.5}}, [], "non-integer"),
        ({**head, "stage": "nope"}, [], "names no stage"),
        ({**head, "session": "ZZ"}, [], "hex"),
        ({**head, "seq": -4}, [], "'seq'"),
        ({**head, "layer": 2**40}, [], "'layer'"),
        ({**head, "token": 7}, [], "'token'"),
    ]
    for header, arrays, why in crafted:
        cls, msg = _error_of(link._roundtrip(_build(header, arrays)))
        assert cls == "WireError" and why in msg, (header, arrays, msg)
    # a message for a session this stream never opened (another client's): refused
    cls, msg = _error_of(link._roundtrip(encode_request(Request("cd" * 16, Stage.QKV, 0, -1, 1, {}))))
    assert cls == "SessionError" and "not open on this connection" in msg
    link.close()
    with RemoteTransport(server.url, backend, timeout=TIMEOUT) as honest:
        assert_exact(run_session(backend, honest), plain)


def test_server_errors_come_back_as_the_same_class(server: ServerProcess, backend: TorchBackend) -> None:
    with RemoteTransport(server.url, backend, timeout=TIMEOUT) as link:
        client = Client(backend, KeySchedule.generate(), SCXConfig(decoys="gaussian"))
        client.prefill(PROMPT, link)
        st_ = client.state
        assert st_ is not None
        sid, tok = st_.keys.session_id, st_.token

        def req(seq: int, x: Any, token: str = tok) -> Request:
            return Request(sid, Stage.GEN_MID, 1, 0, seq, {"x": x}, {}, token)

        with pytest.raises(ProtocolError):  # gen_mid before key sharing
            link.send(req(st_.seq, np.ones((1, 64))))
        client.share_keys(link)
        with pytest.raises(ShapeError, match="server: "):
            link.send(req(st_.seq, np.ones((2, 5))))
        with pytest.raises(ProtocolError, match="out of order"):
            link.send(req(st_.seq - 3, np.ones((1, 64))))
        for wrong in ("", "x" * 43, tok[:-1] + ("A" if tok[-1] != "A" else "B")):  # wrong tokens
            with pytest.raises(SessionError, match="invalid session token"):
                link.send(req(st_.seq, np.ones((1, 64)), wrong))
        client.close(link)  # close ends the session: its token is refused from then on
        with pytest.raises(SessionError):
            link.send(req(st_.seq, np.ones((1, 64))))


_MUTATIONS = st.one_of(
    st.binary(max_size=2048).map(lambda b: ("random", b)),
    st.tuples(st.integers(0, 400), st.integers(0, 255)).map(lambda t: ("flip", t)),
    st.integers(0, 400).map(lambda n: ("truncate", n)),
    st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=64)).map(lambda t: ("insert", t)),
    st.integers(0, 2**32 - 1).map(lambda n: ("hlen", n)),
)


def _mutate(frame: bytes, mutation: tuple[str, Any]) -> bytes:
    kind, arg = mutation
    if kind == "random":
        return bytes(arg)
    if kind == "flip":
        i, v = arg
        i %= len(frame)
        return frame[:i] + bytes([frame[i] ^ (v or 1)]) + frame[i + 1 :]
    if kind == "truncate":
        return frame[: arg % len(frame)]
    if kind == "insert":
        i, b = arg
        return frame[: i % len(frame)] + b + frame[i % len(frame) :]
    return frame[:8] + int(arg).to_bytes(4, "little") + frame[12:]


def test_fuzzed_frames_never_disturb_an_honest_client(
    server: ServerProcess, backend: TorchBackend, plain: Any
) -> None:
    """Random bytes and random mutations of valid frames, thrown at the running server while an honest
    client runs sessions beside them: every fuzzed frame gets a frame back (an error, or a reply when the
    mutation happens to be valid), and every honest session is exact."""
    stop = threading.Event()
    honest: list[Any] = []

    def honest_loop() -> None:
        with RemoteTransport(server.url, backend, timeout=TIMEOUT) as link:
            for _ in range(50):  # bounded
                try:
                    honest.append(run_session(backend, link, "paper", n_new=3))
                except Exception as exc:  # reported below
                    honest.append(exc)
                if stop.is_set() and len(honest) >= 2:
                    return

    want = (plain[0], plain[1][:3])
    t = threading.Thread(target=honest_loop)
    t.start()
    link = _raw(server, backend)
    frames = [_valid_frame(), _valid_frame("12" * 16, 3)]
    kinds: set[str] = set()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(which=st.integers(0, 1), mutation=_MUTATIONS)
    def fuzz(which: int, mutation: tuple[str, Any]) -> None:
        f = decode(link._roundtrip(_mutate(frames[which], mutation)))
        kinds.add(f.kind.name)

    try:
        fuzz()
    finally:
        stop.set()
        t.join()
        link.close()
    assert "ERROR" in kinds
    assert honest and all(not isinstance(h, Exception) for h in honest), honest
    for h in honest:
        assert_exact(h, want)


# -- mismatches, limits, timeouts ------------------------------------------------------------------------
def test_model_and_dtype_mismatch_refused_at_connect(server: ServerProcess, weights: Any) -> None:
    other = TorchBackend(load_weights("random:tiny-dense:1", np.float64), torch.float64)
    with pytest.raises(ConfigError, match="not the same model"), RemoteTransport(server.url, other) as link:
        link.send(Request("ab" * 16, Stage.OPEN, -1, -1, 0))
    f32 = TorchBackend(weights, torch.float32)
    with pytest.raises(ConfigError, match="same dtype"), RemoteTransport(server.url, f32) as link:
        link.send(Request("ab" * 16, Stage.OPEN, -1, -1, 0))


def test_unreachable_server_and_bad_urls() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ServiceError, match="cannot reach"):
        RemoteTransport(f"scx://127.0.0.1:{port}", connect_timeout=1.0).send(
            Request("ab" * 16, Stage.OPEN, -1, -1, 0)
        )
    for url in ["http://x:1", "scx://nohost", "scx://h:1/path", "scx://h:99999"]:
        with pytest.raises(ConfigError):
            RemoteTransport(url)


def test_stopped_server_gives_a_timeout_error_not_a_hang(backend: TorchBackend) -> None:
    with ServerProcess(MODEL, ["--dtype", "float64"]) as srv:
        link = RemoteTransport(srv.url, backend, timeout=2.0)
        client = Client(backend, KeySchedule.generate(), SCXConfig(decoys="gaussian"))
        client.prefill(PROMPT, link)
        os.kill(srv.proc.pid, 19)  # SIGSTOP: the server is alive but answers nothing
        try:
            with pytest.raises(ServiceError, match=r"no reply .* within 2 s"):
                client.share_keys(link)
        finally:
            os.kill(srv.proc.pid, 18)  # SIGCONT
        # the stream was dropped: the old session is gone, a new one works
        assert run_session(backend, link)[1]
        link.close()


def test_max_sessions_limit_refuses_more(backend: TorchBackend, plain: Any) -> None:
    with ServerProcess(MODEL, ["--dtype", "float64", "--max-sessions", "2"]) as srv:
        a = RemoteTransport(srv.url, backend, timeout=TIMEOUT)
        b = RemoteTransport(srv.url, backend, timeout=TIMEOUT)
        a._connect()
        b._connect()
        with pytest.raises(ServiceError, match="server full"):
            RemoteTransport(srv.url, backend, timeout=TIMEOUT)._connect()
        a.close()
        wait_for(lambda: srv.health()[1]["streams"] == 1, "a closed stream to be released")
        with RemoteTransport(srv.url, backend, timeout=TIMEOUT) as c:
            assert_exact(run_session(backend, c), plain)
        b.close()


# -- faults ---------------------------------------------------------------------------------------------
def test_server_killed_mid_generation_then_restarted(backend: TorchBackend, plain: Any) -> None:
    srv = ServerProcess(MODEL, ["--dtype", "float64"])
    link = RemoteTransport(srv.url, backend, timeout=TIMEOUT)
    client = Client(backend, KeySchedule.generate(), SCXConfig(decoys="gaussian"))
    made: list[int] = []

    def decode_step(tok: int) -> np.ndarray:
        made.append(tok)
        if len(made) == 3:
            srv.kill()  # the server dies between two messages of this session
        return np.asarray(client.decode(tok, link))

    settings_ = generation_settings(None, {"max_new_tokens": N_NEW, "eos_token_id": None})
    with pytest.raises(ServiceError) as info:
        generate_tokens(PROMPT, settings_, lambda ids: client.prefill(ids, link), decode_step)
    assert info.value.tokens == plain[1][:3]  # the tokens made so far, reported
    session = client.session
    seq = client.state.seq if client.state else 0

    # restarted on the same port: new sessions work; the old session is refused
    srv2 = ServerProcess(MODEL, ["--dtype", "float64"], port=srv.port)
    try:
        with pytest.raises(SessionError):
            link.send(Request(session, Stage.GEN_MID, 1, 3, seq, {"x": np.ones((1, 64))}))
        assert_exact(run_session(backend, link), plain)
    finally:
        link.close()
        assert srv2.stop() == 0


def test_vanished_client_is_evicted_and_slow_client_stalls_no_one(
    server: ServerProcess, backend: TorchBackend, plain: Any
) -> None:
    code = (
        "import os, numpy as np, torch\n"
        "from scx_ref.zoo import load_weights\n"
        "from scx_ref.backends.torch_backend import TorchBackend\n"
        "from scx_ref.keys import KeySchedule\n"
        "from scx_ref.protocol import Client, SCXConfig\n"
        "from scx_ref.service import RemoteTransport\n"
        f"b = TorchBackend(load_weights({MODEL!r}, np.float64), torch.float64)\n"
        f"link = RemoteTransport({server.url!r}, b)\n"
        "c = Client(b, KeySchedule.generate(), SCXConfig(decoys='gaussian'))\n"
        "c.prefill(np.arange(30), link)\n"
        "print('opened', flush=True)\n"
        "os._exit(1)  # vanish mid-session: no close, no goodbye\n"
    )
    before = server.health()[1]["sessions"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "opened" in out.stdout, out.stderr[-2000:]
    wait_for(lambda: server.health()[1]["sessions"] <= before, "the vanished client's session evicted")
    assert "scx_sessions_evicted_total" in server.metrics()

    # a slow client holds its session open, idle, while another completes whole sessions
    with RemoteTransport(server.url, backend, timeout=TIMEOUT) as slow:
        slow_client = Client(backend, KeySchedule.generate(), SCXConfig(decoys="gaussian"))
        slow_client.prefill(PROMPT, slow)  # ... and then does nothing for a while
        with RemoteTransport(server.url, backend, timeout=TIMEOUT) as fast:
            for _ in range(2):
                assert_exact(run_session(backend, fast), plain)
        slow_client.share_keys(slow)  # still served afterwards
        assert int(np.argmax(slow_client.decode(plain[1][0], slow))) == plain[1][1]


def test_graceful_shutdown_finishes_open_sessions_and_refuses_new(backend: TorchBackend, plain: Any) -> None:
    srv = ServerProcess(MODEL, ["--dtype", "float64", "--grace", "60"])
    link = RemoteTransport(srv.url, backend, timeout=TIMEOUT)
    client = Client(backend, KeySchedule.generate(), SCXConfig(decoys="gaussian"))
    logits = client.prefill(PROMPT, link)
    srv.proc.send_signal(15)  # SIGTERM
    wait_for(lambda: srv.health()[0] == 503, "the server to report draining")
    with pytest.raises(ServiceError, match="shutting down"), RemoteTransport(srv.url, backend) as late:
        run_session(backend, late)
    toks = [int(np.argmax(logits[-1]))]  # the open session carries on to the end
    for _ in range(N_NEW - 1):
        toks.append(int(np.argmax(client.decode(toks[-1], link))))
    assert toks == plain[1]
    link.close()  # its session ends: the server stops
    assert srv.proc.wait(120) == 0
    assert "scx serve: stopped" in srv.stdout()


def test_idle_session_is_evicted_after_the_idle_timeout(backend: TorchBackend) -> None:
    with ServerProcess(MODEL, ["--dtype", "float64", "--idle-timeout", "1"]) as srv:
        link = RemoteTransport(srv.url, backend, timeout=TIMEOUT)
        client = Client(backend, KeySchedule.generate(), SCXConfig(decoys="gaussian"))
        client.prefill(PROMPT, link)
        wait_for(lambda: srv.health()[1]["sessions"] == 0, "the idle session evicted")
        with pytest.raises(ServiceError, match="DEADLINE_EXCEEDED"):
            client.share_keys(link)
        link.close()


def test_scx_generate_command_against_scx_serve() -> None:
    """`scx generate --server` prints HF's greedy tokens; an unreachable server is a clear error (exit 2)."""
    from scx_ref.zoo import load_hf

    model, _ = load_hf("tiny-llama")
    ids = [5, 17, 3, 88, 41]
    with torch.no_grad():
        t = torch.tensor([ids])
        want = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=6)[0]
    cmd = [sys.executable, "-m", "scx_ref.cli", "generate", "--model", "tiny-llama", "--no-eos"]
    cmd += ["--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "6"]
    with ServerProcess("tiny-llama", []) as srv:
        out = subprocess.run([*cmd, "--server", srv.url], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [str(int(x)) for x in want[len(ids) :]]
        port = srv.port
    out = subprocess.run(
        [*cmd, "--server", f"scx://127.0.0.1:{port}", "--connect-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        out.returncode == 2 and "scx generate: error: " in out.stderr and "cannot reach the SCX" in out.stderr
    )
    out = subprocess.run(
        [sys.executable, "-m", "scx_ref.cli", "serve", "--model", MODEL, "--tls-cert", __file__],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "TLS needs both" in out.stderr
    out = subprocess.run(  # a certificate file that is not there: refused before the model is loaded
        [sys.executable, "-m", "scx_ref.cli", "serve", "--model", MODEL, "--tls-cert", "x.pem"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "cannot read 'x.pem'" in out.stderr


def test_scx_verify_runs_against_a_server() -> None:
    """`scx verify --server` (the numpy float64 client against a torch float64 server): every check passes."""
    from scx_ref.commands.verify import verify

    with ServerProcess("tiny-llama", ["--dtype", "float64"]) as srv:
        rec = verify("tiny-llama", "float64", "paper", n_prompts=1, n_new=4, ppl_tokens=48, window=24,
                     progress=False, server=srv.url)  # fmt: skip
        assert rec["pass"], rec["checks"]
        assert srv.health()[1]["sessions"] <= 3  # one live session per stream: a new open ends the last
        assert 'scx_messages_total{stage="head"}' in srv.metrics()


# -- TLS ------------------------------------------------------------------------------------------------
def test_tls_with_a_certificate_made_on_the_fly(tmp_path: Any, backend: TorchBackend, plain: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    key_file, cert_file, ca_file = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    args = [
        "--dtype",
        "float64",
        "--host",
        "localhost",
        "--tls-cert",
        str(cert_file),
        "--tls-key",
        str(key_file),
    ]
    with ServerProcess(MODEL, args) as srv:
        assert srv.url.startswith("scxs://localhost:")
        with RemoteTransport(srv.url, backend, timeout=TIMEOUT, tls_ca=str(ca_file)) as link:
            assert_exact(run_session(backend, link, "blind"), plain)
        plain_url = srv.url.replace("scxs://", "scx://")
        with pytest.raises(ServiceError), RemoteTransport(plain_url, backend, connect_timeout=3.0) as link:
            run_session(backend, link)  # a plaintext client cannot talk to a TLS server
        other_ca = tmp_path / "other.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        with (
            pytest.raises(ServiceError),
            RemoteTransport(srv.url, backend, connect_timeout=3.0, tls_ca=str(other_ca)) as link,
        ):
            run_session(backend, link)  # a certificate from an unknown CA is refused


# -- slow: SmolLM2 over the network, and the 64-client load run ---------------------------------------------
@pytest.mark.slow
def test_smollm2_over_the_network_generates_hf_greedy_tokens() -> None:
    """`SCXModel.from_hf(model, server=…)` on SmolLM2 (float32): HF generate's greedy tokens, every level."""
    from scx_ref.hf import SCXModel
    from scx_ref.zoo import load_hf

    model, tok = load_hf("smollm2")
    ids = np.asarray(tok("The capital of France is", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        t = torch.from_numpy(ids)[None]
        want = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=12)
    with ServerProcess("smollm2", ["--dtype", "float32"]) as srv:
        for level in ("permute", "paper", "blind"):
            scx = SCXModel.from_hf(model, level=level, server=srv.url, server_options={"timeout": 600.0})
            try:
                assert scx.generate(ids, max_new_tokens=12).tolist() == want.tolist()
            finally:
                assert scx.link is not None
                scx.link.close()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_load_64_concurrent_clients_all_exact(backend: TorchBackend, plain: Any) -> None:
    """64 concurrent clients (4 processes × 16 threads) against one server: no error, every output exact,
    and the server's sessions all evicted afterwards (its memory bounded by --max-sessions)."""
    code = (
        "import sys, threading, numpy as np, torch\n"
        "from scx_ref.zoo import load_weights\n"
        "from scx_ref.backends.torch_backend import TorchBackend\n"
        "from scx_ref.keys import KeySchedule\n"
        "from scx_ref.protocol import Client, SCXConfig\n"
        "from scx_ref.service import RemoteTransport\n"
        "torch.set_num_threads(1)\n"
        f"b = TorchBackend(load_weights({MODEL!r}, np.float64), torch.float64)\n"
        "out = {}\n"
        "def one(i):\n"
        "    with RemoteTransport(sys.argv[1], b, timeout=600) as link:\n"
        "        c = Client(b, KeySchedule.generate(), SCXConfig(decoys='gaussian'))\n"
        f"        out[i] = c.generate(np.array({PROMPT.tolist()}), {N_NEW}, link)\n"
        "ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(sorted(set(map(str, out.values()))), len(out))\n"
    )
    with ServerProcess(MODEL, ["--dtype", "float64", "--max-sessions", "64", "--threads", "1"]) as srv:
        procs = [
            subprocess.Popen([sys.executable, "-c", code, srv.url], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=1200)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert all(o.strip() == f"{[str(plain[1])]} 16" for o in outs), outs
        wait_for(lambda: srv.health()[1]["sessions"] == 0, "every session evicted")
        assert "scx_batch_rows_bucket" in srv.metrics()

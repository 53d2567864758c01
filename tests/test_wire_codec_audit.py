"""An adversarial audit of the wire layer (DESIGN §5.5–5.6): what a peer's frames, a caller's arguments and
the ``scx serve`` launcher may not get past.

The codec: an array's wire form is a float or an integer array, never a timedelta64 one numpy counts as an
integer, and a tensor numpy cannot read is a WireError; an error frame's seq is an integer in
[-1, 2**31 - 1] (a float one was truncated, one past int64 made the frame the peer cannot decode that
"always decodes"); only a request or a reply frame carries arrays (a hello or error frame with arrays was
decoded, the arrays allocated and dropped); the receiver's limits are checked when they are made (a
string limit raised a raw TypeError in ``decode``). The client's URL names a port a client can connect to
(not 0) and nothing that would be ignored (a user name, a fragment). The launcher: an argument it cannot
pass (a NUL, ``=`` in a variable's name) is a ConfigError and an interpreter that cannot run a
ServiceError, not a raw ValueError/OSError; a reader thread that cannot start leaves no process behind;
output that is not in the locale's encoding does not end the reader; ``metrics`` checks its timeout as
``health`` does.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, ServiceError, WireError
from scx_ref.protocol.messages import Reply
from scx_ref.service.codec import (
    FrameKind,
    WireLimits,
    decode,
    encode_error,
    encode_reply,
    reply_from,
    to_wire_array,
)
from scx_ref.service.remote import RemoteTransport, parse_url
from scx_ref.stages import Stage


def _raw(kind: FrameKind, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """A frame built by hand as the module doc lays it out (a hostile peer's encoder)."""
    header = {**header, "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}
    head = json.dumps(header).encode()
    out = b"SCX\x01" + struct.pack("<B3xI", int(kind), len(head)) + head
    for a in arrays.values():
        out += b"\0" * (-len(out) % 64) + a.tobytes()
    return out


# -- the codec ---------------------------------------------------------------------------------------------
def test_a_timedelta_array_has_no_wire_form() -> None:
    """numpy's issubdtype counts timedelta64 an integer: it travelled as int64, its unit lost."""
    with pytest.raises(WireError, match="no wire form"):
        to_wire_array(np.array([3, 4], dtype="m8[s]"))
    reply = Reply("ab", Stage.QKV, 0, -1, 1, {"x": np.array([1], dtype="m8[ms]")})
    with pytest.raises(WireError, match="no wire form"):
        encode_reply(reply)
    for ok in (np.array([1, 2], dtype=np.uint32), np.array([-3], dtype=">i2")):  # integers still travel
        out = to_wire_array(ok)
        assert out.dtype == np.dtype("<i8") and out.tolist() == ok.tolist()


def test_a_tensor_numpy_cannot_read_is_a_wire_error() -> None:
    """A meta tensor (no data) or a conjugated one: torch's NotImplementedError or RuntimeError, raw."""
    import torch

    for x in (torch.zeros(2, device="meta"), torch.ones(2, dtype=torch.complex64).conj()):
        with pytest.raises(WireError, match="wire form"):
            to_wire_array(x)
    assert to_wire_array(torch.ones(2, dtype=torch.bfloat16)).dtype == np.dtype("<f4")  # bf16 still widens


@pytest.mark.parametrize("seq", [1.7, "3", None, True, 2**63, -2, 2**31])
def test_an_error_frame_seq_that_is_not_a_wire_seq_is_a_wire_error(seq: Any) -> None:
    with pytest.raises(WireError, match="seq"):
        encode_error("ServiceError", "boom", seq)


@pytest.mark.parametrize("seq", [-1, 0, np.int64(7), 2**31 - 1])
def test_an_error_frame_keeps_every_wire_seq(seq: Any) -> None:
    frame = decode(encode_error("ServiceError", "boom", seq))
    assert frame.kind is FrameKind.ERROR and frame.header["seq"] == int(seq)
    assert type(frame.header["seq"]) is int


@pytest.mark.parametrize("kind", [FrameKind.HELLO, FrameKind.ERROR])
def test_a_hello_or_error_frame_with_arrays_is_refused(kind: FrameKind) -> None:
    header = {"service": "scx"} if kind is FrameKind.HELLO else {"error": "X", "message": "m", "seq": 1}
    with pytest.raises(WireError, match="carries no arrays"):
        decode(_raw(kind, header, {"x": np.zeros(3)}))
    assert decode(_raw(kind, header, {})).header == header  # the same frame without arrays decodes


def test_a_reply_frame_built_by_hand_still_carries_its_arrays() -> None:
    """The control: the hand-built layout is the codec's, so the refusal above is about the kind alone."""
    header = {"session": "ab", "stage": "qkv", "layer": 0, "step": -1, "seq": 1, "meta": {}}
    x = np.arange(6.0).reshape(2, 3)
    reply = reply_from(decode(_raw(FrameKind.REPLY, header, {"x": x})))
    assert np.array_equal(reply.arrays["x"], x)


@pytest.mark.parametrize(
    "bad",
    [{"max_header": "64"}, {"max_frame": -1}, {"max_arrays": None}, {"max_ndim": True}, {"max_frame": 1.5}],
)
def test_wire_limits_are_checked_when_made(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="WireLimits"):
        WireLimits(**bad)
    limits = WireLimits(max_frame=np.int64(4096))
    assert type(limits.max_frame) is int and decode(encode_error("E", "m"), limits).kind is FrameKind.ERROR


# -- the client's URL --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "scx://127.0.0.1:0",
        "scxs://[::1]:0",
        "scx://host:000",
        "scx://u:pw@host:5",
        "scx://tok@h:5",
        "scx://h:5#f",
    ],
)
def test_a_url_naming_port_zero_or_an_ignored_part_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"port 0|user"):
        parse_url(url)
    with pytest.raises(ConfigError):  # before any connection is tried
        RemoteTransport(url)


def test_a_plain_url_still_parses() -> None:
    assert parse_url("scx://Host:1") == ("host", 1, False)
    assert parse_url("scxs://[::1]:65535/") == ("::1", 65535, True)


# -- the launcher ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env"), [(["--dtype", "float\0"], None), ([], {"A": "x\0y"}), ([], {"A=B": "1"})]
)
def test_an_argument_a_process_cannot_take_is_a_config_error(
    args: list[str], env: dict[str, str] | None
) -> None:
    from scx_ref.service.spawn import ServerProcess

    with pytest.raises(ConfigError, match="cannot start scx serve"):
        ServerProcess("random:tiny-dense", args, env=env)


def _fake_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Make ServerProcess run ``script`` (sh) in place of ``python -m scx_ref.cli serve …``."""
    exe = tmp_path / "fake-python"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(exe))


def test_an_interpreter_that_cannot_run_is_a_service_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scx_ref.service.spawn import ServerProcess

    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(ServiceError, match="cannot start scx serve"):
        ServerProcess("random:tiny-dense")


def test_output_not_in_the_locales_encoding_does_not_end_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte that is not UTF-8 before the ready line: the reader raised on it and the address was never
    seen (a stderr reader so ended left the pipe to fill and the server to block on its next log line)."""
    from scx_ref.service.spawn import ServerProcess

    _fake_server(
        tmp_path,
        monkeypatch,
        "printf 'boot \\377\\376\\n' >&2\nprintf 'x \\377\\n'\n"
        "echo 'serving on scx://127.0.0.1:5; ops http://127.0.0.1:9'\nexec sleep 60\n",
    )
    server = ServerProcess("random:tiny-dense", start_timeout=20)
    try:
        assert server.url == "scx://127.0.0.1:5" and server.ops == "http://127.0.0.1:9"
        assert "\\xff" in server.stdout()
    finally:
        server.kill()
    assert any("\\xff\\xfe" in line for line in server.log)


def test_metrics_checks_its_timeout_as_health_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scx_ref.service.spawn import ServerProcess

    _fake_server(
        tmp_path, monkeypatch, "echo 'serving on scx://127.0.0.1:5; ops http://127.0.0.1:9'\nexec sleep 60\n"
    )
    server = ServerProcess("random:tiny-dense", start_timeout=20)
    try:
        timeouts: list[Any] = ["5", -1.0, float("nan"), 0]
        for timeout in timeouts:
            for call in (server.health, server.metrics):
                with pytest.raises(ConfigError, match="timeout"):
                    call(timeout=timeout)
    finally:
        server.kill()


def test_a_reader_that_cannot_start_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scx_ref.service import spawn

    _fake_server(tmp_path, monkeypatch, "exec sleep 60\n")
    made: list[subprocess.Popen[str]] = []

    class Recording(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(subprocess, "Popen", Recording)
    try:
        with monkeypatch.context() as m:
            m.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                spawn.ServerProcess("random:tiny-dense", start_timeout=20)
        assert len(made) == 1
        assert made[0].poll() is not None, "the process was left running"
        assert made[0].stdout is not None and made[0].stdout.closed
    finally:
        for proc in made:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

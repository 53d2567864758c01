"""The wire codec and the ``scx serve`` launcher (DESIGN §5.5–5.6).

The codec: every dtype and shape the protocol sends survives encode → decode exactly (0-size, 0-d,
non-contiguous and big-endian inputs included); the decoder refuses what the encoder never writes (a
non-zero padding byte, an integer past int64); the encoders refuse, as a WireError, every field the decoder
would refuse instead of sending it, raising a raw exception, or changing it on the way (a float layer was
truncated); an error frame always decodes. The launcher: a server that cannot start says why (its own
message, even when the reader is slow), one that prints no address in time says so, and a server with no
ops address or one that is gone gives a ServiceError from ``health``/``metrics``.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, ServiceError, WireError
from scx_ref.protocol.messages import Reply, Request
from scx_ref.service.codec import (
    Frame,
    FrameKind,
    decode,
    encode_error,
    encode_hello,
    encode_reply,
    encode_request,
    reply_from,
    request_from,
    to_wire_array,
)
from scx_ref.stages import Stage
from tests.refusals import Refusal, refusal_test

SESSION = "ab" * 16
PREFIX = struct.Struct("<4sB3xI")
BASE = {"session": SESSION, "stage": "qkv", "layer": 0, "step": -1, "seq": 1, "token": "t", "meta": {}}


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(b"SCX\x01", 1, len(head)) + head + body


# -- round trip -------------------------------------------------------------------------------------------
_INPUTS: list[tuple[Any, str]] = [
    (np.arange(12, dtype=np.float32).reshape(3, 4), "<f4"),
    (np.arange(12, dtype=np.float64).reshape(3, 4) / 7, "<f8"),
    (np.arange(-6, 6, dtype=np.int64).reshape(2, 6), "<i8"),
    (np.arange(5, dtype=np.int32), "<i8"),
    (np.arange(5, dtype=np.uint8), "<i8"),
    (np.array([0, 2**63 - 1], dtype=np.uint64), "<i8"),
    (np.array([1.5, -2.25, 65504.0], dtype=np.float16), "<f4"),  # widens exactly
    (np.arange(6, dtype=">f8").reshape(2, 3) / 3, "<f8"),  # big-endian input
    (np.arange(24, dtype=np.float64).reshape(4, 6).T, "<f8"),  # non-contiguous (transposed)
    (np.arange(40, dtype=np.float32).reshape(5, 8)[::2, 1::3], "<f4"),  # non-contiguous (strided)
    (np.zeros((0,), np.float32), "<f4"),
    (np.zeros((0, 16), np.float64), "<f8"),
    (np.zeros((3, 0), np.int64), "<i8"),
    (np.zeros((2, 0, 4, 1), np.float32), "<f4"),
    (np.float64(np.pi), "<f8"),  # 0-d
    ([[1.0, 2.0], [3.0, 4.0]], "<f8"),  # a nested list
]


@pytest.mark.parametrize("kind", ["request", "reply"])
def test_every_wire_dtype_and_shape_round_trips_exactly(kind: str) -> None:
    arrays = {f"a{i}": x for i, (x, _) in enumerate(_INPUTS)}
    for start in range(0, len(arrays), 8):  # at most 8 arrays a frame (WireLimits.max_arrays)
        part = dict(list(arrays.items())[start : start + 8])
        meta = {"n": 2**63 - 1, "m": -(2**63), "flag": True, "s": "é", "deep": {"a": [[None]]}}
        if kind == "request":
            got: Request | Reply = request_from(
                decode(encode_request(Request(SESSION, Stage.FFN, 3, 7, 9, part, meta, "tok")))
            )
        else:
            got = reply_from(decode(encode_reply(Reply(SESSION, Stage.FFN, 3, 7, 9, part, meta))))
        assert (got.session, got.stage, got.layer, got.step, got.seq, got.meta) == (
            SESSION,
            Stage.FFN,
            3,
            7,
            9,
            meta,
        )
        assert list(got.arrays) == list(part)
        for name, x in part.items():
            want = np.asarray(x)
            out = got.arrays[name]
            dt = _INPUTS[int(name[1:])][1]
            assert out.dtype.str == dt and out.shape == want.shape, name
            assert out.flags.c_contiguous and out.flags.writeable, name
            np.testing.assert_array_equal(out, want.astype(out.dtype), strict=True)


def test_numpy_integer_fields_encode_as_integers() -> None:
    req = Request(SESSION, Stage.QKV, np.int64(2), np.int32(-1), np.uint8(5), {}, {"k": np.int16(3)}, "t")
    got = request_from(decode(encode_request(req)))
    assert (got.stage, got.layer, got.step, got.seq, got.meta) == (Stage.QKV, 2, -1, 5, {"k": 3})


# -- the decoder: nothing the encoder never writes -------------------------------------------------------
def test_a_non_zero_padding_byte_is_refused() -> None:
    data = encode_request(Request(SESSION, Stage.QKV, 0, -1, 3, {"x": np.ones((2, 4), np.float32)}, {}, "t"))
    start = PREFIX.size + int.from_bytes(data[8:12], "little")
    assert -start % 64 > 0  # this frame has padding before its array
    assert request_from(decode(data)).arrays["x"].sum() == 8  # the honest frame decodes
    for at in (start, start + (-start % 64) - 1):
        bad = bytearray(data)
        bad[at] = 0xFF
        with pytest.raises(WireError, match="padding"):
            decode(bytes(bad))


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**300])
@pytest.mark.parametrize("where", ["meta", "nested", "extra"])
def test_a_header_integer_past_int64_is_refused(value: int, where: str) -> None:
    header: dict[str, Any] = dict(BASE)
    if where == "meta":
        header["meta"] = {"n": value}
    elif where == "nested":
        header["meta"] = {"a": [1, {"b": value}]}
    else:
        header["extra"] = value
    with pytest.raises(WireError, match="int64"):
        decode(frame(header))
    edge = {**BASE, "meta": {"n": 2**63 - 1, "m": -(2**63)}}
    assert request_from(decode(frame(edge))).meta == {"n": 2**63 - 1, "m": -(2**63)}


def test_limits_that_are_not_wire_limits_are_a_wire_error() -> None:
    with pytest.raises(WireError, match="WireLimits"):
        decode(frame(BASE), limits="small")  # type: ignore[arg-type]


# -- the encoders: a bad field is a WireError on the sending side ----------------------------------------
_BAD_REQUESTS: dict[str, Request] = {
    "float layer": Request(SESSION, Stage.QKV, 1.7, -1, 3, {}, {}, "t"),  # type: ignore[arg-type]
    "bool seq": Request(SESSION, Stage.QKV, 0, -1, True, {}, {}, "t"),
    "None layer": Request(SESSION, Stage.QKV, None, -1, 3, {}, {}, "t"),  # type: ignore[arg-type]
    "seq past int32": Request(SESSION, Stage.QKV, 0, -1, 2**40, {}, {}, "t"),
    "unknown stage": Request(SESSION, "nope", 0, -1, 3, {}, {}, "t"),  # type: ignore[arg-type]
    "list stage": Request(SESSION, [], 0, -1, 3, {}, {}, "t"),  # type: ignore[arg-type]
    "upper-case session": Request("AB", Stage.QKV, 0, -1, 3, {}, {}, "t"),
    "None token": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {}, None),  # type: ignore[arg-type]
    "long token": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {}, "t" * 513),
    "surrogate token": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {}, "\ud800"),
    "surrogate in meta": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {"x": ["\udfff"]}, "t"),
    "surrogate meta key": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {"\ud800": 1}, "t"),
    "meta a list": Request(SESSION, Stage.QKV, 0, -1, 3, {}, [1], "t"),  # type: ignore[arg-type]
    "meta int past int64": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {"n": 2**63}, "t"),
    "meta int of 5000 digits": Request(SESSION, Stage.QKV, 0, -1, 3, {}, {"n": 10**5000}, "t"),
    "arrays a list": Request(SESSION, Stage.QKV, 0, -1, 3, [np.ones(1)], {}, "t"),  # type: ignore[arg-type]
    "ragged array": Request(SESSION, Stage.QKV, 0, -1, 3, {"x": [[1.0], [1.0, 2.0]]}, {}, "t"),
}


@pytest.mark.parametrize("name", list(_BAD_REQUESTS))
def test_the_encoder_refuses_what_the_decoder_would(name: str) -> None:
    req = _BAD_REQUESTS[name]
    with pytest.raises(WireError):
        encode_request(req)
    reply = Reply(req.session, req.stage, req.layer, req.step, req.seq, req.arrays, req.meta)
    if "token" not in name:  # a reply has no token
        with pytest.raises(WireError):
            encode_reply(reply)


_REQ = Request(SESSION, Stage.QKV, 0, -1, 1, {}, {}, "t")
_REP = Reply(SESSION, Stage.QKV, 0, -1, 1, {}, {})
_MESSAGE_REFUSALS: list[Refusal] = [
    (
        "encode_request-reply",
        lambda: encode_request(_REP),  # type: ignore[arg-type]
        WireError,
        "encode_request takes a Request, not Reply",
    ),
    (
        "encode_request-dict",
        lambda: encode_request(BASE),  # type: ignore[arg-type]
        WireError,
        "encode_request takes a Request, not dict",
    ),
    (
        "encode_reply-request",
        lambda: encode_reply(_REQ),  # type: ignore[arg-type]
        WireError,
        "encode_reply takes a Reply, not Request",
    ),
    (
        "encode_reply-none",
        lambda: encode_reply(None),  # type: ignore[arg-type]
        WireError,
        "encode_reply takes a Reply, not NoneType",
    ),
    (
        "request_from-bytes",
        lambda: request_from(b"SCX"),  # type: ignore[arg-type]
        WireError,
        "expected a Frame, got bytes",
    ),
    (
        "reply_from-dict",
        lambda: reply_from({"kind": 2}),  # type: ignore[arg-type]
        WireError,
        "expected a Frame, got dict",
    ),
    (
        "reply_from-int-kind",
        lambda: reply_from(Frame(2, dict(BASE))),  # type: ignore[arg-type]
        WireError,
        "a frame's kind must be a FrameKind and its header a dict",
    ),
    (
        "request_from-list-header",
        lambda: request_from(Frame(FrameKind.REQUEST, [])),  # type: ignore[arg-type]
        WireError,
        "a frame's kind must be a FrameKind and its header a dict",
    ),
    (
        "request_from-arrays-list",
        lambda: request_from(Frame(FrameKind.REQUEST, dict(BASE), [])),  # type: ignore[arg-type]
        WireError,
        "a frame's arrays must be a dict, not list",
    ),
]
#: what is not a message or a frame is a WireError before any field is read (was: AttributeError)
test_a_message_or_frame_of_another_type_is_a_wire_error = refusal_test(_MESSAGE_REFUSALS)


def test_a_hand_made_frame_of_the_right_types_reads_as_decode_reads_it() -> None:
    wire = decode(encode_request(Request(SESSION, Stage.QKV, 0, -1, 1, {"x": np.ones(2)}, {}, "t")))
    again = request_from(Frame(wire.kind, dict(wire.header), dict(wire.arrays)))
    assert (again.session, again.stage, again.seq, again.token) == (SESSION, Stage.QKV, 1, "t")
    np.testing.assert_array_equal(again.arrays["x"], np.ones(2))
    assert reply_from(decode(encode_reply(_REP))).seq == 1


def test_uint64_values_past_int64_have_no_wire_form() -> None:
    with pytest.raises(WireError, match="int64"):
        to_wire_array(np.array([1, 2**63], dtype=np.uint64))
    assert to_wire_array(np.array([1, 2**63 - 1], dtype=np.uint64)).tolist() == [1, 2**63 - 1]
    assert to_wire_array(np.zeros(0, dtype=np.uint64)).dtype.str == "<i8"


def test_an_error_frame_always_decodes() -> None:
    """A message with a lone surrogate (text that came from a file name, say) travels as its escape: the
    client gets the server's error, not a WireError about the frame."""
    f = decode(encode_error("ProtocolError", "bad name 'a\udcffb'", 4))
    assert f.kind is FrameKind.ERROR
    assert f.header == {"error": "ProtocolError", "message": "bad name 'a\\udcffb'", "seq": 4}
    long = decode(encode_error("X" * 500, "é" * 5000, -1)).header
    assert len(long["message"]) == 2000 and len(long["error"]) == 200


@pytest.mark.parametrize("info", [[("service", "scx")], "scx", {"service": "scx", "arrays": [1]}])
def test_a_hello_is_a_dict_without_the_codecs_own_key(info: Any) -> None:
    with pytest.raises(WireError, match="hello"):
        encode_hello(info)
    assert decode(encode_hello({"service": "scx", "n": 3})).header == {"service": "scx", "n": 3}


# -- the launcher -----------------------------------------------------------------------------------------
def test_a_server_that_cannot_start_says_why_even_when_its_output_is_read_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The port is taken: the child prints why and exits. The message carries that reason although the
    thread reading the child's stderr is slow (it once raised before the reader had it)."""
    from scx_ref.service import spawn

    def slow(stream: Any, sink: list[str]) -> None:  # each line lands in the log half a second late
        for line in stream:
            time.sleep(0.5)
            sink.append(line.rstrip("\n"))

    monkeypatch.setattr(spawn.ServerProcess, "_drain", staticmethod(slow))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceError, match="exited with status 2") as err:
            spawn.ServerProcess("random:tiny-dense", ["--host", "127.0.0.1"], port=port)
    assert "Address already in use" in str(err.value) and str(port) in str(err.value)


def test_a_server_that_prints_no_address_in_time_is_killed_and_says_so() -> None:
    from scx_ref.service.spawn import ServerProcess

    with pytest.raises(ServiceError, match=r"printed no address within 0\.01 s \(killed\)"):
        ServerProcess("random:tiny-dense", start_timeout=0.01)


def test_args_given_as_one_string_are_a_config_error() -> None:
    from scx_ref.service.spawn import ServerProcess

    with pytest.raises(ConfigError, match="list of arguments"):
        ServerProcess("random:tiny-dense", "--dtype float64")


def test_health_and_metrics_of_a_server_without_ops_or_gone_are_service_errors() -> None:
    from scx_ref.service.spawn import ServerProcess

    quiet = ServerProcess("random:tiny-dense", ["--ops-port", "-1"])
    try:
        assert quiet.ops == ""
        for call in (quiet.health, quiet.metrics):
            with pytest.raises(ServiceError, match="no ops address"):
                call()
    finally:
        quiet.stop()
    assert quiet.proc.stdout is not None and quiet.proc.stdout.closed  # its pipes are closed
    assert quiet.proc.stderr is not None and quiet.proc.stderr.closed
    assert "scx serve: random:tiny-dense" in quiet.stdout()  # what it printed is kept
    srv = ServerProcess("random:tiny-dense")
    try:
        assert srv.health()[0] == 200
    finally:
        srv.stop()
    for call in (srv.health, srv.metrics):
        with pytest.raises(ServiceError, match=r"no (health report|metrics) from http://"):
            call()

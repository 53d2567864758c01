"""The wire codec's refusals and edges, pinned where the codec tests left them loose (``python -m mutation.run
codec``; ``mutation/REPORT_codec.md``). A peer sees each refusal as the text of an error frame, so each is
checked word for word; each bound is checked on both sides of its edge; the bytes the encoder writes are
checked against the layout the module doc states (compact JSON: a header near ``max_header`` must fit).

- the decoder: every refusal's exact message, in the order the module doc states the checks (a header
  declaring more bytes than arrive is *truncated*, not a frame with bytes after its last array); a float,
  NaN or Infinity in a header is refused (no test decoded one); the edges ``max_frame``, ``max_header``,
  ``max_arrays = 0``, a zero dimension counted as 1, layer/step -1, 2**31 - 1, a 512-character token; an
  absent ``meta`` / ``token`` is ``{}`` / ``""``; a dict nested as deep as the encoder writes decodes;
- the encoders: the message of every refusal names the message kind (request, reply, hello) and the field;
  an array name that is not an identifier is refused on the sending side (not by the peer);
  ``np.bool_`` travels as its value;
- ``to_wire_array``: a tensor is copied to the host first, a narrow integer tensor travels as int64 (not as
  float32), the result is C-contiguous, a refusal keeps the cause's first 200 characters;
- ``grpc_options``: the documented sizes and keepalive, and ``max_message_bytes``'s bounds by name.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, WireError
from scx_ref.protocol.messages import Reply, Request
from scx_ref.service.codec import (
    MAX_MESSAGE_BYTES,
    WireLimits,
    decode,
    encode_error,
    encode_hello,
    encode_reply,
    encode_request,
    grpc_options,
    reply_from,
    request_from,
    to_wire_array,
)
from scx_ref.stages import Stage

SESSION = "ab" * 16
PREFIX = struct.Struct("<4sB3xI")
BASE: dict[str, Any] = {"session": SESSION, "stage": "qkv", "layer": 0, "step": -1, "seq": 1, "token": "t"}
FLOAT_TEXT = (
    " holds a float; only strings, integers, booleans, null, lists and objects travel in a header"
    " (numbers that are not integers travel as arrays)"
)


def frame(header: dict[str, Any] | bytes, kind: int = 1, body: bytes = b"", hlen: int | None = None) -> bytes:
    """A frame built by hand as the module doc lays it out: ``body`` follows the header as given."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(b"SCX\x01", kind, len(head) if hlen is None else hlen) + head + body


def with_array(header: dict[str, Any], dtype: str, shape: list[int], nbytes: int) -> bytes:
    """A request frame declaring one array ``x`` and carrying ``nbytes`` zero bytes after its padding."""
    out = frame({**header, "arrays": [["x", dtype, shape]]})
    return out + b"\0" * (-len(out) % 64 + nbytes)


def refusal(call: Any) -> str:
    with pytest.raises(WireError) as info:
        call()
    return str(info.value)


# -- the decoder's refusals, word for word ------------------------------------------------------------------
_DEEP: Any = [[[[[[1]]]]]]
_DECODE_REFUSALS: list[tuple[str, Any, WireLimits | None, str]] = [
    ("not-bytes", 12, None, "a frame must be bytes, not int"),
    ("frame-limit", b"\0" * 21, WireLimits(max_frame=20), "frame of 21 bytes exceeds the limit of 20"),
    ("short", b"SCX\x01" + b"\0" * 7, None, "truncated frame: 11 bytes, a frame needs at least 12"),
    (
        "no-header",
        PREFIX.pack(b"SCX\x01", 1, 0),
        None,
        "frame header is not valid JSON: Expecting value: line 1 column 1 (char 0)",
    ),
    ("magic", b"SCX\x02" + frame(BASE)[4:], None, "not an SCX frame (bad magic or version)"),
    ("reserved", frame(BASE)[:6] + b"\1" + frame(BASE)[7:], None, "reserved header bytes are not zero"),
    ("kind", frame(BASE, kind=9), None, "unknown frame kind 9"),
    (
        "header-limit",
        frame(b"{" + b" " * 9 + b"}"),
        WireLimits(max_header=10),
        "header of 11 bytes exceeds the limit of 10",
    ),
    (
        "header-truncated",
        frame(b"{}", hlen=100),
        None,
        "truncated frame: header declares 100 bytes, 2 present",
    ),
    (
        "bad-json",
        frame(b"{"),
        None,
        "frame header is not valid JSON: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)",
    ),
    ("float", frame(b'{"layer":1.5}'), None, "a header holds the non-integer number '1.5'"),
    (
        "long-float",
        frame(b'{"m":' + b"1" * 30 + b".0}"),
        None,
        "a header holds the non-integer number '" + "1" * 20 + "'",
    ),
    ("nan", frame(b'{"m":NaN}'), None, "a header holds the non-integer number 'NaN'"),
    ("infinity", frame(b'{"m":-Infinity}'), None, "a header holds the non-integer number '-Infinity'"),
    ("not-an-object", frame(b"[1]"), None, "frame header must be a JSON object"),
    ("repeated-key", frame(b'{"a":1,"a":2}'), None, "a header object repeats a key"),
    (
        "surrogate",
        frame({**BASE, "token": "\ud800"}),
        None,
        "a header string holds an unpaired surrogate escape",
    ),
    ("int64", frame({**BASE, "meta": {"n": 2**63}}), None, "a header holds an integer outside int64's range"),
    ("deep", frame({**BASE, "meta": {"a": _DEEP}}), None, "frame header is nested more than 5 levels deep"),
    ("arrays", frame({**BASE, "arrays": 5}), None, "'arrays' must be a list of at most 8 entries"),
    ("hello-arrays", frame({"arrays": [["x", "<f4", [0]]]}, kind=4), None, "a hello frame carries no arrays"),
    (
        "spec",
        frame({**BASE, "arrays": [["x", "<f4"]]}),
        None,
        "each array must be declared as [name, dtype, shape]",
    ),
    ("name", frame({**BASE, "arrays": [["X", "<f4", [0]]]}), None, "array name 'X' is invalid or repeated"),
    (
        "dtype",
        frame({**BASE, "arrays": [["x", ">f4", [0]]]}),
        None,
        "array 'x': dtype '>f4' is not one of ['<f4', '<f8', '<i8']",
    ),
    (
        "shape",
        frame({**BASE, "arrays": [["x", "<f4", [-1]]]}),
        None,
        "array 'x': shape [-1] is not a list of at most 4 sizes",
    ),
    (
        "span",
        with_array(BASE, "<f4", [0, 2**31 - 1, 2**31 - 1], 0),
        None,
        "array 'x': shape [0, 2147483647, 2147483647] spans more than 1073741824 bytes",
    ),
    ("trailing", frame(BASE, body=b"\0\0\0"), None, "frame has 3 bytes after its last array"),
]
_IDS = [c[0] for c in _DECODE_REFUSALS]


@pytest.mark.parametrize(("what", "data", "limits", "message"), _DECODE_REFUSALS, ids=_IDS)
def test_each_decoder_refusal_says_what_it_refused(
    what: str, data: Any, limits: WireLimits | None, message: str
) -> None:
    assert refusal(lambda: decode(data, limits)) == message


def test_limits_that_are_not_wire_limits_are_named_by_type() -> None:
    assert refusal(lambda: decode(b"", 5)) == "limits must be a WireLimits, not int"  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [[3], [65536] * 4], ids=["3-floats", "2**64-floats"])
def test_an_array_past_the_frame_is_a_truncated_frame(shape: list[int]) -> None:
    """Sizes are exact Python integers: 2**64 elements do not wrap to an empty array in int64."""
    data = with_array(BASE, "<f4", shape, 0)
    want = f"truncated frame: array 'x' declares bytes past the frame's {len(data)}"
    assert refusal(lambda: decode(data)) == want


def test_a_non_zero_padding_byte_is_named() -> None:
    assert -len(frame({**BASE, "arrays": [["x", "<f4", [2]]]})) % 64 > 0  # padding before the array
    data = bytearray(with_array(BASE, "<f4", [2], 8))
    assert request_from(decode(bytes(data))).arrays["x"].tolist() == [0.0, 0.0]  # the honest frame decodes
    data[-9] = 1  # the last padding byte
    assert refusal(lambda: decode(bytes(data))) == "the padding before an array is not zero bytes"


# -- the decoder's edges -----------------------------------------------------------------------------------
def test_a_frame_or_header_of_exactly_the_limit_decodes() -> None:
    data = frame(BASE)
    assert decode(data, WireLimits(max_frame=len(data))).header == BASE
    assert decode(data, WireLimits(max_header=len(data) - PREFIX.size)).header == BASE
    assert decode(data, WireLimits(max_arrays=0, max_ndim=0)).header == BASE  # 0 is a limit like any other


def test_a_zero_dimension_counts_as_one_up_to_max_frame_exactly() -> None:
    limits = WireLimits(max_frame=4096)
    ok = decode(with_array(BASE, "<f8", [0, 512], 0), limits)  # 8 * 512 bytes: the limit, not past it
    assert ok.arrays["x"].shape == (0, 512)
    too_wide = with_array(BASE, "<f8", [0, 513], 0)
    assert refusal(lambda: decode(too_wide, limits)) == "array 'x': shape [0, 513] spans more than 4096 bytes"


@pytest.mark.parametrize(
    ("field", "value", "lo"),
    [("layer", -2, -1), ("step", -2, -1), ("seq", -1, 0), ("layer", 2**31, -1), ("step", 2**31, -1)],
    ids=["layer-low", "step-low", "seq-low", "layer-high", "step-high"],
)
def test_a_field_past_its_range_is_refused_by_name(field: str, value: int, lo: int) -> None:
    data = frame({**BASE, field: value})
    want = f"header field {field!r} must be an integer in [{lo}, 2147483647], got {value}"
    assert refusal(lambda: request_from(decode(data))) == want


def test_every_field_at_its_edge_decodes() -> None:
    for field, value in [
        ("layer", -1),
        ("layer", 2**31 - 1),
        ("step", 2**31 - 1),
        ("seq", 0),
        ("seq", 2**31 - 1),
    ]:
        assert getattr(request_from(decode(frame({**BASE, field: value}))), field) == value
    long_token = "t" * 512
    req = Request(SESSION, Stage.QKV, 0, -1, 1, {}, {}, long_token)
    assert request_from(decode(encode_request(req))).token == long_token
    assert request_from(decode(frame({**BASE, "token": long_token}))).token == long_token


def test_an_absent_meta_or_token_is_empty() -> None:
    header = {k: v for k, v in BASE.items() if k != "token"}
    req = request_from(decode(frame(header)))
    assert (req.meta, req.token) == ({}, "")
    assert reply_from(decode(frame(header, kind=2))).meta == {}


def test_dicts_as_deep_as_the_encoder_writes_round_trip() -> None:
    deepest = {"a": {"b": {"c": {"d": 7}}}}  # 7 is 4 levels below meta, in dicts all the way down
    req = Request(SESSION, Stage.OPEN, -1, -1, 0, {}, deepest)
    assert request_from(decode(encode_request(req))).meta == deepest


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            {**BASE, "session": "AB"},
            "header field 'session' must be a lower-case hex string of at most 128 digits",
        ),
        ({**BASE, "stage": "nope"}, "header field 'stage' names no stage: 'nope'"),
        ({**BASE, "stage": "s" * 60}, f"header field 'stage' names no stage: {'s' * 40!r}"),
        ({**BASE, "meta": []}, "header field 'meta' must be an object"),
        ({**BASE, "token": "t" * 513}, "header field 'token' must be a string of at most 512 characters"),
    ],
    ids=["session", "stage", "long-stage", "meta", "token"],
)
def test_each_field_refusal_says_what_it_refused(header: dict[str, Any], message: str) -> None:
    assert refusal(lambda: request_from(decode(frame(header)))) == message


def test_a_frame_of_the_other_kind_is_named() -> None:
    assert refusal(lambda: request_from(decode(frame(BASE, kind=2)))) == "expected a request frame, got reply"
    assert refusal(lambda: reply_from(decode(frame(BASE)))) == "expected a reply frame, got request"


# -- the encoders ------------------------------------------------------------------------------------------
def test_the_encoder_writes_the_documented_layout_in_compact_json() -> None:
    x = np.array([1.0, 2.0], dtype="<f4")
    data = encode_request(Request(SESSION, Stage.QKV, 0, -1, 1, {"x": x}, {"n": 2}, "t"))
    header = {"session": SESSION, "stage": "qkv", "layer": 0, "step": -1, "seq": 1, "meta": {"n": 2}}
    header |= {"token": "t", "arrays": [["x", "<f4", [2]]]}
    head = json.dumps(header, separators=(",", ":")).encode()
    want = PREFIX.pack(b"SCX\x01", 1, len(head)) + head
    assert data == want + b"\0" * (-len(want) % 64) + x.tobytes()


def _request(arrays: Any = None, meta: Any = None, stage: Any = Stage.QKV, token: str = "t") -> Request:
    return Request(
        SESSION, stage, 0, -1, 1, {} if arrays is None else arrays, {} if meta is None else meta, token
    )


_ENCODE_REFUSALS: list[tuple[str, Any, str]] = [
    (
        "arrays",
        lambda: encode_request(_request(arrays=[1])),
        "a message's arrays must be a dict of name to array, not list",
    ),
    (
        "name",
        lambda: encode_request(_request(arrays={"X": np.zeros(1)})),
        "array name 'X' is not a short lower-case identifier",
    ),
    (
        "int-name",
        lambda: encode_request(_request(arrays={5: np.zeros(1)})),
        "array name 5 is not a short lower-case identifier",
    ),
    ("stage", lambda: encode_request(_request(stage="nope")), "request field 'stage' names no stage: 'nope'"),
    (
        "long-stage",
        lambda: encode_reply(Reply(SESSION, "s" * 60, 0, -1, 1)),  # type: ignore[arg-type]
        f"reply field 'stage' names no stage: {'s' * 40!r}",
    ),
    ("meta", lambda: encode_request(_request(meta=[1])), "request meta must be a dict, not list"),
    (
        "reply-meta",
        lambda: encode_reply(Reply(SESSION, Stage.QKV, 0, -1, 1, {}, [1])),  # type: ignore[arg-type]
        "reply meta must be a dict, not list",
    ),
    ("float", lambda: encode_request(_request(meta={"a": 1.5})), "request meta" + FLOAT_TEXT),
    ("float-in-list", lambda: encode_request(_request(meta={"a": [1.5]})), "request meta" + FLOAT_TEXT),
    ("float-in-dict", lambda: encode_request(_request(meta={"a": {"b": 1.5}})), "request meta" + FLOAT_TEXT),
    (
        "reply-float",
        lambda: encode_reply(Reply(SESSION, Stage.QKV, 0, -1, 1, {}, {"a": 1.5})),
        "reply meta" + FLOAT_TEXT,
    ),
    ("hello-float", lambda: encode_hello({"a": 1.5}), "hello" + FLOAT_TEXT),
    (
        "deep-list",
        lambda: encode_request(_request(meta={"a": [[[[1]]]]})),
        "request meta is nested too deeply",
    ),
    (
        "deep-dict",
        lambda: encode_request(_request(meta={"a": {"b": {"c": {"d": {"e": 1}}}}})),
        "request meta is nested too deeply",
    ),
    (
        "int64",
        lambda: encode_request(_request(meta={"a": [2**63]})),
        "request meta holds an integer outside int64's range",
    ),
    ("key", lambda: encode_request(_request(meta={1: 2})), "request meta has a non-string key 1"),
    (
        "surrogate",
        lambda: encode_request(_request(meta={"a": ["\ud800"]})),
        "request meta holds a string with an unpaired surrogate",
    ),
    (
        "surrogate-key",
        lambda: encode_request(_request(meta={"a": {"\udfff": 1}})),
        "request meta holds a string with an unpaired surrogate",
    ),
    (
        "token",
        lambda: encode_request(_request(token="\ud800")),
        "header field 'token' holds a string with an unpaired surrogate",
    ),
    (
        "long-token",
        lambda: encode_request(_request(token="t" * 513)),
        "header field 'token' must be a string of at most 512 characters",
    ),
    ("hello", lambda: encode_hello({"arrays": []}), "a hello carries a dict without the key 'arrays'"),
    (
        "error-seq",
        lambda: encode_error("E", "m", "s" * 60),  # type: ignore[arg-type]
        "an error frame's seq must be an integer in [-1, 2147483647], got " + "s" * 40,
    ),
]


@pytest.mark.parametrize(("what", "call", "message"), _ENCODE_REFUSALS, ids=[c[0] for c in _ENCODE_REFUSALS])
def test_each_encoder_refusal_names_the_message_and_field(what: str, call: Any, message: str) -> None:
    assert refusal(call) == message


def test_a_numpy_bool_travels_as_its_value() -> None:
    req = _request(meta={"t": np.True_, "f": np.False_})
    assert request_from(decode(encode_request(req))).meta == {"t": True, "f": False}


# -- to_wire_array -----------------------------------------------------------------------------------------
class _OffHost:
    """A tensor as ``to_wire_array`` sees one (it has ``detach``), on a device that is not the host's."""

    def __init__(self) -> None:
        self.moved_to: list[Any] = []

    def detach(self) -> _OffHost:
        return self

    def to(self, device: Any) -> Any:
        import torch

        self.moved_to.append(device)
        return torch.arange(3.0)


def test_a_tensor_is_copied_to_the_host_before_numpy_reads_it() -> None:
    x = _OffHost()
    assert to_wire_array(x).tolist() == [0.0, 1.0, 2.0]
    assert x.moved_to == ["cpu"]


def test_a_narrow_integer_tensor_travels_as_int64_and_a_bool_one_not_at_all() -> None:
    import torch

    for dtype in (torch.int8, torch.int16, torch.uint8):
        out = to_wire_array(torch.tensor([1, 2, 3], dtype=dtype))
        assert out.dtype == np.dtype("<i8") and out.tolist() == [1, 2, 3], dtype
    assert refusal(lambda: to_wire_array(torch.tensor([True]))) == "array dtype bool has no wire form"


def test_a_wire_array_is_c_contiguous() -> None:
    for x in (np.arange(6.0).reshape(2, 3).T, np.asfortranarray(np.arange(6).reshape(2, 3))):
        out = to_wire_array(x)
        assert out.flags.c_contiguous and np.array_equal(out, x)


class _Unreadable:
    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        raise ValueError("v" * 300)


def test_a_refusal_keeps_the_first_200_characters_of_its_cause() -> None:
    assert refusal(lambda: to_wire_array(_Unreadable())) == "not an array with a wire form: " + "v" * 200


def test_a_float_wider_than_float64_is_refused_by_its_dtype() -> None:
    x = np.ones(2, dtype=np.longdouble)
    if x.dtype.itemsize > 8:  # x86-64 Linux: float128
        want = f"array dtype {x.dtype} has no wire form (float32 or float64)"
        assert refusal(lambda: to_wire_array(x)) == want
    else:  # where long double is double, it travels as one
        assert to_wire_array(x).dtype == np.dtype("<f8")


# -- grpc_options ------------------------------------------------------------------------------------------
def test_grpc_options_are_the_documented_sizes_and_keepalive() -> None:
    assert grpc_options(1) == [
        ("grpc.max_receive_message_length", 1025),
        ("grpc.max_send_message_length", 1025),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def test_grpc_options_refuse_a_size_outside_their_range_by_name() -> None:
    for bad in (0, MAX_MESSAGE_BYTES + 1):
        with pytest.raises(ConfigError, match=r"^max_message_bytes must lie in \[1, "):
            grpc_options(bad)
    assert grpc_options(MAX_MESSAGE_BYTES)[0] == ("grpc.max_receive_message_length", 2**31 - 1)

"""The wire format of ``scx serve``: one binary frame per protocol message, arrays as raw little-endian
buffers behind a small typed header — never a float as text.

Frame layout (every integer little-endian)::

    0   4  magic   b"SCX" + version byte (1)
    4   1  kind    1 request, 2 reply, 3 error, 4 hello
    5   3  zero
    8   4  H       header length in bytes
    12  H  header  UTF-8 JSON object (no floats, no NaN/Infinity: numbers in it are integers)
    ... arrays, each starting at the next multiple of 64 bytes from the frame start, in header order;
        the padding before each is zero bytes; the frame ends exactly where the last array ends

The header of a request or reply holds ``session``, ``stage`` (the :class:`~scx_ref.stages.Stage` wire
value), ``layer``, ``step``, ``seq``, ``meta`` (JSON values: strings, integers, booleans, null, lists and
objects of them; every integer in a header fits int64), ``arrays`` (a list of ``[name, dtype, shape]``
with dtype one of ``<f4``, ``<f8``, ``<i8``) and, in a request, ``token``. An error frame's header is
``{"error": class name, "message": text, "seq": int}``; a hello frame's header is free-form metadata (no
arrays).

:func:`decode` validates everything before it allocates anything proportional to a declared size: the
magic, the kind, the header length against :class:`WireLimits`, the JSON, every field's type and range,
every array's dtype and shape, and that the declared sizes add up to exactly the bytes received. Any
violation raises :class:`~scx_ref.errors.WireError` naming it. The encoders check a message's fields
as the decoder does (its size limits aside, which are the receiver's): a bad field is a WireError on the
sending side, never a frame the peer must refuse or a value changed on the way (a float layer truncated).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..errors import WireError
from ..protocol.messages import Reply, Request
from ..stages import Stage

__all__ = [
    "DTYPES",
    "Frame",
    "FrameKind",
    "WireLimits",
    "decode",
    "encode_error",
    "encode_hello",
    "encode_reply",
    "encode_request",
    "grpc_options",
    "reply_from",
    "request_from",
    "to_wire_array",
]

MAGIC = b"SCX\x01"
_PREFIX = struct.Struct("<4sB3xI")
ALIGN = 64
#: The dtypes arrays may travel in (float32, float64, int64 — the permutations of key sharing).
DTYPES: dict[str, np.dtype[Any]] = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8"), "<i8": np.dtype("<i8")}
#: matched with ``fullmatch`` (``$`` alone also matches before a final newline: "x\n" passed as a name)
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_HEX = re.compile(r"[0-9a-f]{1,128}")
_INT_MAX = 2**31 - 1
#: every integer in a header is an int64 (what a peer in any language can read; Python's str() of an int
#: also stops at 4300 digits)
_I64 = (-(2**63), 2**63 - 1)
#: How deep a header's JSON may nest (the header object is level 0): a request's ``meta`` is level 1 and
#: the encoder lets its values nest 4 deeper (``_plain``), so nothing it writes is deeper than 5.
_MAX_DEPTH = 5


class FrameKind(IntEnum):
    """What a frame carries."""

    REQUEST = 1
    REPLY = 2
    ERROR = 3
    HELLO = 4


@dataclass(frozen=True)
class WireLimits:
    """Bounds :func:`decode` enforces before allocating: header bytes, frame bytes, arrays per frame,
    dimensions per array. Each a non-negative integer (ConfigError otherwise, when the limits are made:
    a string compared in :func:`decode` raised a raw TypeError there)."""

    max_header: int = 64 * 1024
    max_frame: int = 1 << 30
    max_arrays: int = 8
    max_ndim: int = 4

    def __post_init__(self) -> None:
        for name in ("max_header", "max_frame", "max_arrays", "max_ndim"):
            object.__setattr__(self, name, check_int(getattr(self, name), f"WireLimits.{name}", 0))


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its kind, its header (validated JSON) and its arrays (writable numpy)."""

    kind: FrameKind
    header: dict[str, Any]
    arrays: dict[str, npt.NDArray[Any]] = field(default_factory=dict)


def _pad(n: int) -> int:
    return -n % ALIGN


def to_wire_array(x: Any) -> npt.NDArray[Any]:
    """``x`` (numpy array or torch tensor) as a C-contiguous little-endian numpy array of the same shape
    (0-d included) in a wire dtype: floating arrays as float32 or float64 (bf16/fp16 widen exactly to
    float32), integer ones as int64.
    WireError for any other kind of array (timedelta64 included), a ragged one, a tensor numpy cannot read
    (a meta or conjugated one), or unsigned integers past int64's range."""
    try:
        if hasattr(x, "detach"):  # a torch tensor
            t = x.detach().to("cpu")
            if t.is_floating_point() and t.dtype.itemsize < 4:
                t = t.float()
            x = t.numpy()
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged nested lists, a tensor dtype numpy lacks,
        # a tensor with no data (meta: NotImplementedError is a RuntimeError) or a conjugate bit
        raise WireError(f"not an array with a wire form: {str(exc)[:200]}") from None
    target: np.dtype[Any]
    if np.issubdtype(arr.dtype, np.floating):
        target = np.dtype("<f8") if arr.dtype.itemsize == 8 else np.dtype("<f4")
        if arr.dtype.itemsize > 8:
            raise WireError(f"array dtype {arr.dtype} has no wire form (float32 or float64)")
    elif arr.dtype.kind in "iu":  # not issubdtype(np.integer): numpy counts timedelta64 an integer
        target = np.dtype("<i8")
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > _I64[1]:
            raise WireError(f"array of {arr.dtype} holds values past int64's range (its wire form)")
    else:
        raise WireError(f"array dtype {arr.dtype} has no wire form")
    return np.asarray(arr, dtype=target, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` as JSON data with no float anywhere (numpy integers and booleans become Python ones)."""
    if depth > 4:
        raise WireError(f"{where} is nested too deeply")
    if isinstance(value, str):
        return _utf8(value, where)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        if not _I64[0] <= int(value) <= _I64[1]:
            raise WireError(f"{where} holds an integer outside int64's range")
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise WireError(f"{where} has a non-string key {k!r}")
            out[_utf8(k, where)] = _plain(v, where, depth + 1)
        return out
    raise WireError(
        f"{where} holds a {type(value).__name__}; only strings, integers, booleans, null, lists and "
        "objects travel in a header (numbers that are not integers travel as arrays)"
    )


def _utf8(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; WireError for a lone surrogate (:func:`decode` refuses its escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"{where} holds a string with an unpaired surrogate") from None
    return text


def _whole(value: Any) -> Any:
    """A numpy integer as a Python int; anything else unchanged (for :func:`_int` to judge: no float is
    truncated to an integer on the way out)."""
    return int(value) if isinstance(value, np.integer) else value


def _frame(kind: FrameKind, header: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    header = dict(header)
    header["arrays"] = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    parts: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, int(kind), len(head)), head]
    pos = _PREFIX.size + len(head)
    for a in arrays.values():
        pad = _pad(pos)
        parts.append(b"\0" * pad)
        buf = a.reshape(-1).view(np.uint8).data if a.size else memoryview(b"")
        parts.append(buf)
        pos += pad + a.nbytes
    return b"".join(parts)


def _arrays(arrays: dict[str, Any], convert: Callable[[Any], npt.NDArray[Any]]) -> dict[str, Any]:
    if not isinstance(arrays, dict):
        raise WireError(f"a message's arrays must be a dict of name to array, not {type(arrays).__name__}")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise WireError(f"array name {name!r} is not a short lower-case identifier")
        out[name] = to_wire_array(convert(a))
    return out


def _message_header(msg: Request | Reply, what: str) -> dict[str, Any]:
    """The header fields of ``msg``, checked as :func:`request_from` / :func:`reply_from` check them."""
    try:
        stage = Stage(msg.stage).value
    except (ValueError, TypeError):
        raise WireError(f"{what} field 'stage' names no stage: {str(msg.stage)[:40]!r}") from None
    if not isinstance(msg.meta, dict):
        raise WireError(f"{what} meta must be a dict, not {type(msg.meta).__name__}")
    header = {
        "session": msg.session,
        "stage": stage,
        "layer": _whole(msg.layer),
        "step": _whole(msg.step),
        "seq": _whole(msg.seq),
        "meta": _plain(msg.meta, f"{what} meta"),
    }
    _fields(header)
    return header


def encode_request(req: Request, convert: Callable[[Any], Any] = lambda a: a) -> bytes:
    """The frame of ``req``; ``convert`` maps each array to numpy first (e.g. a backend's ``to_numpy``).
    WireError for a field :func:`request_from` would refuse (a float layer is not truncated), and for
    ``req`` that is not a Request."""
    if not isinstance(req, Request):
        raise WireError(f"encode_request takes a Request, not {type(req).__name__}")
    header = _message_header(req, "request")
    header["token"] = _token(req.token)
    return _frame(FrameKind.REQUEST, header, _arrays(req.arrays, convert))


def encode_reply(reply: Reply, convert: Callable[[Any], Any] = lambda a: a) -> bytes:
    """The frame of ``reply``; ``convert`` maps each array to numpy first. WireError for a field
    :func:`reply_from` would refuse, and for ``reply`` that is not a Reply."""
    if not isinstance(reply, Reply):
        raise WireError(f"encode_reply takes a Reply, not {type(reply).__name__}")
    return _frame(FrameKind.REPLY, _message_header(reply, "reply"), _arrays(reply.arrays, convert))


def _text(value: Any, limit: int) -> str:
    """``str(value)`` cut to ``limit`` characters, a lone surrogate written as its ``\\udXXX`` escape."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def encode_error(error: str, message: str, seq: int = -1) -> bytes:
    """An error frame: the exception's class name, its message (no array contents; at most 2000
    characters, a lone surrogate in it written as an escape so the frame always decodes) and the
    request's seq: an integer in [-1, 2**31 - 1] (-1: no request's), WireError otherwise (a float seq is
    not truncated to another request's, nor a seq past int64 written into a frame no peer decodes)."""
    seq = _whole(seq)
    if not isinstance(seq, int) or isinstance(seq, bool) or not -1 <= seq <= _INT_MAX:
        raise WireError(f"an error frame's seq must be an integer in [-1, {_INT_MAX}], got {_text(seq, 40)}")
    return _frame(
        FrameKind.ERROR, {"error": _text(error, 200), "message": _text(message, 2000), "seq": seq}, {}
    )


def encode_hello(info: dict[str, Any]) -> bytes:
    """A hello frame carrying ``info`` (a dict of strings, integers, booleans, lists, objects; its key
    ``arrays`` is the codec's own). WireError for anything else."""
    if not isinstance(info, dict) or "arrays" in info:
        raise WireError("a hello carries a dict without the key 'arrays'")
    return _frame(FrameKind.HELLO, _plain(info, "hello"), {})


# -- decoding ---------------------------------------------------------------------------------------
def _no_float(text: str) -> Any:
    raise WireError(f"a header holds the non-integer number {text[:20]!r}")


def _int(h: dict[str, Any], key: str, lo: int) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= _INT_MAX:
        raise WireError(f"header field {key!r} must be an integer in [{lo}, {_INT_MAX}], got {v!r}")
    return v


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; WireError for a repeated key (readers could disagree on it)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireError("a header object repeats a key")
    return out


def _check_header(header: dict[str, Any]) -> None:
    """WireError if ``header`` nests deeper than :data:`_MAX_DEPTH` or holds a string that is not valid
    Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes can make) or an integer past int64."""
    todo: list[tuple[Any, int]] = [(header, 0)]
    while todo:
        value, level = todo.pop()
        if level > _MAX_DEPTH:
            raise WireError(f"frame header is nested more than {_MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            todo.extend((k, level + 1) for k in value)
            todo.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            todo.extend((v, level + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError("a header string holds an unpaired surrogate escape") from None
        elif isinstance(value, int) and not _I64[0] <= value <= _I64[1]:
            raise WireError("a header holds an integer outside int64's range")


def decode(data: bytes | bytearray | memoryview, limits: WireLimits | None = None) -> Frame:
    """Parse and validate one frame (see the module doc); WireError on anything malformed, including
    ``data`` that is not a bytes-like object.

    Guarantee: nothing is allocated in proportion to a declared size until the declared sizes are shown
    to add up to exactly ``len(data)``; the arrays returned are writable copies in their wire dtype. The
    header has no repeated key, no string that is not valid Unicode, no integer past int64, and nests at
    most 5 levels deep; the padding before each array is zero bytes; only a request or reply frame
    carries arrays; every array's shape, with each 0 counted as 1, spans at most ``max_frame`` bytes."""
    if limits is not None and not isinstance(limits, WireLimits):
        raise WireError(f"limits must be a WireLimits, not {type(limits).__name__}")
    lim = limits or WireLimits()
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise WireError(f"a frame must be bytes, not {type(data).__name__}") from None
    total = len(view)
    if total > lim.max_frame:
        raise WireError(f"frame of {total} bytes exceeds the limit of {lim.max_frame}")
    if total < _PREFIX.size:
        raise WireError(f"truncated frame: {total} bytes, a frame needs at least {_PREFIX.size}")
    magic, kind_raw, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError("not an SCX frame (bad magic or version)")
    if bytes(view[5:8]) != b"\0\0\0":
        raise WireError("reserved header bytes are not zero")
    try:
        kind = FrameKind(kind_raw)
    except ValueError:
        raise WireError(f"unknown frame kind {kind_raw}") from None
    if hlen > lim.max_header:
        raise WireError(f"header of {hlen} bytes exceeds the limit of {lim.max_header}")
    if _PREFIX.size + hlen > total:
        raise WireError(f"truncated frame: header declares {hlen} bytes, {total - _PREFIX.size} present")
    try:
        header = json.loads(
            bytes(view[_PREFIX.size : _PREFIX.size + hlen]).decode("utf-8"),
            parse_float=_no_float,
            parse_constant=_no_float,
            object_pairs_hook=_unique,
        )
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"frame header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    _check_header(header)
    specs = header.pop("arrays", [])
    if not isinstance(specs, list) or len(specs) > lim.max_arrays:
        raise WireError(f"'arrays' must be a list of at most {lim.max_arrays} entries")
    if specs and kind not in (FrameKind.REQUEST, FrameKind.REPLY):  # nothing rides beside an error or hello
        raise WireError(f"a {kind.name.lower()} frame carries no arrays")
    layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
    pads: list[tuple[int, int]] = []
    pos = _PREFIX.size + hlen
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3):
            raise WireError("each array must be declared as [name, dtype, shape]")
        name, dt, shape = spec
        if not isinstance(name, str) or not _NAME.fullmatch(name) or any(name == n for n, *_ in layout):
            raise WireError(f"array name {name!r} is invalid or repeated")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise WireError(f"array {name!r}: dtype {dt!r} is not one of {sorted(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > lim.max_ndim
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _INT_MAX for s in shape)
        ):
            raise WireError(f"array {name!r}: shape {shape!r} is not a list of at most {lim.max_ndim} sizes")
        nbytes = DTYPES[dt].itemsize * int(np.prod(shape, dtype=object))  # exact: Python integers
        pads.append((pos, pos + _pad(pos)))
        pos += _pad(pos)
        layout.append((name, dt, tuple(shape), pos, nbytes))
        pos += nbytes
        if pos > total:
            raise WireError(f"truncated frame: array {name!r} declares bytes past the frame's {total}")
        if DTYPES[dt].itemsize * math.prod(max(s, 1) for s in shape) > lim.max_frame:  # e.g. [0, 2**31-1]
            raise WireError(f"array {name!r}: shape {shape!r} spans more than {lim.max_frame} bytes")
    if pos != total:
        raise WireError(f"frame has {total - pos} bytes after its last array")
    if any(any(view[a:b]) for a, b in pads):  # one encoding per message: nothing rides in the padding
        raise WireError("the padding before an array is not zero bytes")
    arrays = {}
    for name, dt, shape, start, nbytes in layout:
        arrays[name] = np.frombuffer(bytearray(view[start : start + nbytes]), dtype=DTYPES[dt]).reshape(shape)
    return Frame(kind, header, arrays)


def _fields(h: dict[str, Any]) -> tuple[str, Stage, int, int, int, dict[str, Any]]:
    """The fields a request and a reply share, each checked (WireError naming the first bad one)."""
    session = h.get("session")
    if not isinstance(session, str) or not _HEX.fullmatch(session):
        raise WireError("header field 'session' must be a lower-case hex string of at most 128 digits")
    stage_raw = h.get("stage")
    try:
        stage = Stage(stage_raw)
    except ValueError:
        raise WireError(f"header field 'stage' names no stage: {str(stage_raw)[:40]!r}") from None
    meta = h.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("header field 'meta' must be an object")
    return session, stage, _int(h, "layer", -1), _int(h, "step", -1), _int(h, "seq", 0), meta


def _token(token: Any) -> str:
    if not isinstance(token, str) or len(token) > 512:
        raise WireError("header field 'token' must be a string of at most 512 characters")
    return _utf8(token, "header field 'token'")


def _check_frame(frame: Any) -> None:
    """WireError unless ``frame`` is a :class:`Frame` of a known kind with a dict header (what
    :func:`decode` returns; a hand-made one is checked before its fields are read)."""
    if not isinstance(frame, Frame):
        raise WireError(f"expected a Frame, got {type(frame).__name__}")
    if not isinstance(frame.kind, FrameKind) or not isinstance(frame.header, dict):
        raise WireError("a frame's kind must be a FrameKind and its header a dict")
    if not isinstance(frame.arrays, dict):
        raise WireError(f"a frame's arrays must be a dict, not {type(frame.arrays).__name__}")


def request_from(frame: Frame) -> Request:
    """The :class:`Request` a request frame carries (WireError for another kind, a bad field or a
    ``frame`` that is not a Frame)."""
    _check_frame(frame)
    if frame.kind is not FrameKind.REQUEST:
        raise WireError(f"expected a request frame, got {frame.kind.name.lower()}")
    session, stage, layer, step, seq, meta = _fields(frame.header)
    token = _token(frame.header.get("token", ""))
    return Request(session, stage, layer, step, seq, dict(frame.arrays), meta, token)


def reply_from(frame: Frame) -> Reply:
    """The :class:`Reply` a reply frame carries (WireError for another kind, a bad field or a ``frame``
    that is not a Frame)."""
    _check_frame(frame)
    if frame.kind is not FrameKind.REPLY:
        raise WireError(f"expected a reply frame, got {frame.kind.name.lower()}")
    session, stage, layer, step, seq, meta = _fields(frame.header)
    return Reply(session, stage, layer, step, seq, dict(frame.arrays), meta)


#: the largest ``max_message_bytes`` either end takes: gRPC's message-size options are C ints, and a frame
#: may carry 1 KiB of header beyond the limit (:func:`grpc_options`)
MAX_MESSAGE_BYTES = (1 << 31) - 1 - 1024


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The gRPC channel options both ends use: frames up to ``max_message_bytes`` (plus a header's
    slack) each way, HTTP/2 keepalive every 20 s (a vanished peer is noticed within 30 s), no retries.
    ConfigError unless ``max_message_bytes`` is an integer in [1, :data:`MAX_MESSAGE_BYTES`] (past it the
    sizes overflow gRPC's C int, and the options failed only when a channel or server started)."""
    size = check_int(max_message_bytes, "max_message_bytes", 1, MAX_MESSAGE_BYTES) + 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]

"""The wire codec (scx_ref.service.codec): every request and reply survives encode → decode exactly (arrays
bit for bit, in their wire dtype), and any byte string — random, or a valid frame mutated — either decodes
to a frame or raises WireError, never another exception."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import seeds
from scx_ref.errors import WireError
from scx_ref.protocol.messages import Reply, Request
from scx_ref.service.codec import (
    FrameKind,
    decode,
    encode_error,
    encode_reply,
    encode_request,
    reply_from,
    request_from,
)
from scx_ref.stages import Stage

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.text(max_size=20))
_meta = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(_scalars, st.lists(st.integers(-1000, 1000), max_size=5)),
    max_size=5,
)


@st.composite
def _arrays(draw: Any) -> dict[str, np.ndarray]:
    out = {}
    for name in draw(st.lists(st.sampled_from(["x", "q", "k", "v", "perm", "m"]), unique=True, max_size=4)):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
        seed = draw(seeds())
        out[name] = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    return out


_requests = st.builds(
    Request,
    session=st.text("0123456789abcdef", min_size=1, max_size=64),
    stage=st.sampled_from(list(Stage)),
    layer=st.integers(-1, 1000),
    step=st.integers(-1, 1000),
    seq=st.integers(0, 2**31 - 1),
    arrays=_arrays(),
    meta=_meta,
    token=st.text(max_size=64),
)


def _same_arrays(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape
        assert np.array_equal(a[k], b[k])
        assert b[k].flags.writeable


@given(_requests)
def test_requests_round_trip(req: Request) -> None:
    back = request_from(decode(encode_request(req)))
    assert (back.session, back.stage, back.layer, back.step, back.seq, back.token) == (
        req.session, req.stage, req.layer, req.step, req.seq, req.token
    )  # fmt: skip
    assert back.meta == req.meta
    _same_arrays(req.arrays, back.arrays)


@given(_requests)
def test_replies_round_trip(req: Request) -> None:
    rep = Reply(req.session, req.stage, req.layer, req.step, req.seq, req.arrays, req.meta)
    back = reply_from(decode(encode_reply(rep)))
    assert (back.session, back.stage, back.layer, back.step, back.seq, back.meta) == (
        rep.session, rep.stage, rep.layer, rep.step, rep.seq, rep.meta
    )  # fmt: skip
    _same_arrays(rep.arrays, back.arrays)


@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):  # any other exception fails the test
        decode(data)


@given(_requests, st.integers(0, 10_000), st.integers(1, 255), st.integers(0, 10_000))
def test_mutated_frames_decode_or_raise_wire_error(req: Request, i: int, x: int, cut: int) -> None:
    frame = encode_request(req)
    mutated = frame[: i % len(frame)] + bytes([frame[i % len(frame)] ^ x]) + frame[i % len(frame) + 1 :]
    for data in (mutated, frame[: cut % len(frame)]):
        with contextlib.suppress(WireError):  # any other exception fails the test
            f = decode(data)
            if f.kind is FrameKind.REQUEST:
                request_from(f)


@given(st.text(max_size=50), st.text(max_size=3000), st.integers(-1, 2**31 - 1))
def test_error_frames_round_trip(cls: str, message: str, seq: int) -> None:
    f = decode(encode_error(cls, message, seq))
    assert f.kind is FrameKind.ERROR
    assert f.header == {"error": cls, "message": message[:2000], "seq": seq}


def test_floats_never_travel_as_text() -> None:
    for meta in ({"beta": 0.5}, {"x": [1, 2.0]}, {"nan": float("nan")}):
        try:
            encode_request(Request("ab", Stage.OPEN, -1, -1, 0, {}, meta))
        except WireError as exc:
            assert "integers" in str(exc)
        else:
            raise AssertionError(f"a float in {meta} was encoded")

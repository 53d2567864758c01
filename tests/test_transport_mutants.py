"""Tests that kill mutants of :mod:`scx_ref.protocol.transport` that survived ``python -m mutation.run
transport`` (mutation/REPORT_config_transport_cost_presets.md): each checks a documented property of the in-
process transport — what the server's view records and when, that its records are read-only copies, which
messages :meth:`ServerView.select` returns, and the bytes the meter counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.transport import LocalTransport, ServerView, ViewedMessage
from scx_ref.stages import Stage
from tests.accelerator import OnAccelerator


def _seen(stage: Stage, layer: int, step: int) -> ViewedMessage:
    return ViewedMessage("s", stage, layer, step, {"x": np.zeros(1)}, {})


def test_select_returns_the_messages_matching_every_given_field_in_order() -> None:
    """:meth:`ServerView.select`: a field left None matches every message; each given one must match."""
    msgs = [
        _seen(Stage.QKV, 0, -1),
        _seen(Stage.QKV, 1, -1),
        _seen(Stage.FFN, 1, -1),
        _seen(Stage.QKV, 1, 0),
    ]
    view = ServerView(messages=list(msgs))
    assert view.select() == msgs
    assert view.select(stage=Stage.QKV) == [msgs[0], msgs[1], msgs[3]]
    assert view.select(layer=1) == msgs[1:]
    assert view.select(step=-1) == msgs[:3]
    assert view.select(stage=Stage.QKV, layer=1) == [msgs[1], msgs[3]]
    assert view.select(stage=Stage.QKV, layer=1, step=0) == [msgs[3]]
    assert view.select(stage=Stage.FFN, layer=0) == []


# -- LocalTransport against a handler that answers what it is told to ---------------------------------


class _Echo:
    """A handler that records what reached it and answers ``answer`` (a Reply by default)."""

    def __init__(self, answer: Any = None, arrays: Any = None) -> None:
        self.got: list[Any] = []
        self.answer = answer
        self.arrays = {"y": np.arange(4.0)} if arrays is None else arrays

    def handle(self, request: Any) -> Any:
        self.got.append(request)
        if self.answer is not None:
            return self.answer
        return Reply(request.session, request.stage, request.layer, request.step, request.seq, self.arrays)


def _request(arrays: Any, meta: Any = None, **fields: Any) -> Request:
    base: dict[str, Any] = {"session": "ab", "stage": Stage.FFN, "layer": 2, "step": 3, "seq": 5}
    return Request(**{**base, **fields}, arrays=arrays, meta={} if meta is None else meta)


def test_no_view_is_kept_unless_asked() -> None:
    """``record_view`` is off by default (production use): neither requests nor replies are recorded."""
    transport = LocalTransport(_Echo())
    transport.send(_request({"x": np.ones(2)}))
    assert transport.view.messages == [] and transport.view.replies == []


def test_the_view_records_every_field_of_a_request_and_its_reply() -> None:
    """Each recorded message keeps the session, stage, layer and step it crossed with; a reply's meta is
    recorded as an empty dict (its arrays are what the client reads)."""
    transport = LocalTransport(_Echo(), record_view=True)
    transport.send(_request({"x": np.ones(2)}, {"n": 4}))
    (seen,) = transport.view.messages
    assert (seen.session, seen.stage, seen.layer, seen.step) == ("ab", Stage.FFN, 2, 3)
    assert seen.meta == {"n": 4} and list(seen.arrays) == ["x"]
    (back,) = transport.view.replies
    assert (back.session, back.stage, back.layer, back.step) == ("ab", Stage.FFN, 2, 3)
    assert back.meta == {}
    np.testing.assert_array_equal(back.arrays["y"], np.arange(4.0))


def test_a_reply_whose_arrays_cannot_be_read_is_not_recorded() -> None:
    """A reply of ragged lists is handed back as it is (the client refuses it) and not recorded."""
    transport = LocalTransport(_Echo(arrays={"y": [[1.0], [1.0, 2.0]]}), record_view=True)
    reply = transport.send(_request({"x": np.ones(2)}))
    assert reply.arrays["y"] == [[1.0], [1.0, 2.0]]
    assert len(transport.view.messages) == 1 and transport.view.replies == []


def test_a_malformed_answer_is_returned_as_it_is_unrecorded_and_unmetered() -> None:
    """An answer that is not a Reply, or a Reply whose arrays are not a mapping, is returned untouched;
    nothing of it is recorded and it counts 0 bytes down (the request's bytes and the round trip count)."""
    for answer in (
        "not a reply",
        Reply("ab", Stage.FFN, 2, 3, 5, [np.ones(3)]),  # type: ignore[arg-type]
    ):
        transport = LocalTransport(_Echo(answer=answer), record_view=True)
        assert transport.send(_request({"x": np.ones(2)})) is answer
        assert transport.view.replies == []
        cost = transport.meter.stages[Stage.FFN]
        assert (cost.bytes_up, cost.bytes_down, cost.round_trips) == (16, 0, 1)


def test_a_request_whose_arrays_are_not_a_mapping_counts_no_bytes() -> None:
    """Arrays that are not a mapping are not recorded and count 0 bytes up (a handler that answers them
    anyway still gets one round trip metered)."""
    transport = LocalTransport(_Echo(), record_view=True)
    transport.send(_request([np.ones(2)]))
    assert transport.view.messages == []
    cost = transport.meter.stages[Stage.FFN]
    assert (cost.bytes_up, cost.bytes_down, cost.round_trips) == (0, 32, 1)


def test_every_array_counts_even_after_one_that_is_not() -> None:
    """What is not an array counts 0, and the arrays after it still count; an object with only one of a
    tensor's two size methods is not a tensor."""

    class _Half:
        def nelement(self) -> int:
            return 10

    transport = LocalTransport(_Echo())
    transport.send(_request({"a": "text", "b": _Half(), "c": np.ones(3, dtype=np.float32)}))
    assert transport.meter.stages[Stage.FFN].bytes_up == 12


def test_meta_is_recorded_as_deep_copies_of_tuples_too() -> None:
    """A tuple in ``meta`` is recorded as a tuple of copies: editing a list inside it later changes no
    record."""
    experts = [1, 2]
    transport = LocalTransport(_Echo(), record_view=True)
    transport.send(_request({"x": np.ones(2)}, {"pair": (experts, 3)}))
    experts.append(9)
    assert transport.view.messages[0].meta == {"pair": ([1, 2], 3)}


# -- torch tensors in the view --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    ids=["float32", "float64", "bfloat16", "float16"],
)
def test_a_torch_tensor_is_recorded_as_a_read_only_numpy_copy(dtype: torch.dtype) -> None:
    """A tensor (one that requires grad too) is recorded as numpy, bf16/fp16 widened to float32 (numpy
    has no bf16), float32 and float64 kept; the record is a read-only copy an edit of the tensor leaves."""
    t = torch.tensor([0.5, -1.25, 3.0], dtype=dtype, requires_grad=True)
    transport = LocalTransport(_Echo(), record_view=True)
    transport.send(_request({"x": t}))
    (seen,) = transport.view.messages
    got = seen.arrays["x"]
    want = np.float64 if dtype == torch.float64 else np.float32
    assert isinstance(got, np.ndarray) and got.dtype == want
    np.testing.assert_array_equal(got, [0.5, -1.25, 3.0])
    assert not got.flags.writeable
    with torch.no_grad():
        t.mul_(2)
    np.testing.assert_array_equal(got, [0.5, -1.25, 3.0])
    width = 8 if dtype == torch.float64 else 4
    assert transport.meter.stages[Stage.FFN].bytes_up == 3 * width


def test_a_tensor_on_an_accelerator_is_copied_to_the_host_before_it_is_recorded() -> None:
    """The view holds numpy arrays, so a tensor on another device is first copied to the CPU."""
    transport = LocalTransport(_Echo(), record_view=True)
    transport.send(_request({"x": OnAccelerator(torch.tensor([1.0, 2.0]))}))
    np.testing.assert_array_equal(transport.view.messages[0].arrays["x"], [1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_tensor_is_recorded() -> None:
    transport = LocalTransport(_Echo(), record_view=True)
    transport.send(_request({"x": torch.tensor([1.0, 2.0], device="cuda")}))
    np.testing.assert_array_equal(transport.view.messages[0].arrays["x"], [1.0, 2.0])

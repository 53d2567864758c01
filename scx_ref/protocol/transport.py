"""Transports carry messages between client and server; the in-process one can record the server's
view (DESIGN §5.4) and meters bytes and round trips."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..stages import Stage
from .cost import CostMeter
from .messages import Reply, Request

__all__ = ["LocalTransport", "ServerView", "Transport", "ViewedMessage"]


class _Handler(Protocol):
    def handle(self, request: Request) -> Reply: ...


class Transport(Protocol):
    """How a client reaches a server: in-process (:class:`LocalTransport`) or over the network
    (:class:`~scx_ref.service.remote.RemoteTransport`). ``meter`` counts what crossed it."""

    meter: CostMeter

    def send(self, request: Request) -> Reply:
        """Deliver ``request`` and return the server's reply (unchecked: the client verifies it)."""
        ...


@dataclass(frozen=True)
class ViewedMessage:
    """One message as the server received it: arrays copied to numpy, read-only (an analysis takes its own
    copy to edit)."""

    session: str
    stage: Stage
    layer: int
    step: int
    arrays: dict[str, npt.NDArray[Any]]
    meta: dict[str, Any]


@dataclass
class ServerView:
    """Everything the server received, in order (and what it sent back, for completeness)."""

    messages: list[ViewedMessage] = field(default_factory=list)
    replies: list[ViewedMessage] = field(default_factory=list)

    def select(
        self, stage: Stage | None = None, layer: int | None = None, step: int | None = None
    ) -> list[ViewedMessage]:
        """The received messages matching every given field."""
        return [
            m
            for m in self.messages
            if (stage is None or m.stage == stage)
            and (layer is None or m.layer == layer)
            and (step is None or m.step == step)
        ]


def _numpy(x: Any) -> npt.NDArray[Any]:
    if hasattr(x, "detach"):  # a torch tensor: bf16/fp16 widen to float32 (numpy has no bf16)
        t = x.detach().to("cpu")
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        x = t.numpy()
    out: npt.NDArray[Any] = np.array(x, copy=True)
    out.flags.writeable = False  # a record: an analysis that edits it in place changes no other's reading
    return out


class LocalTransport:
    """Calls the server in-process. ``record_view=True`` keeps a :class:`ServerView` (off by default
    in production use; tests and the attack harness turn it on)."""

    def __init__(self, server: _Handler, record_view: bool = False) -> None:
        self.server = server
        self.record_view = record_view
        self.view = ServerView()
        self.meter = CostMeter()

    def send(self, request: Request) -> Reply:
        """Hand ``request`` to the server and return what it answers, as it is: a malformed answer (not a
        :class:`Reply`, or arrays that are not a mapping of arrays) is neither recorded nor metered, and
        is left to the client's checks to refuse (IntegrityError).

        The view records copies taken before the server runs (the arrays, and ``meta`` with every nested
        list and dict): neither side editing a message after it crossed changes the record. A request whose
        fields cannot be copied (not a :class:`Request`, ``arrays`` or ``meta`` not a mapping, an array
        numpy cannot read) is not recorded and goes to the server as it is, which refuses it with its own
        error (ProtocolError), as it does when no view is kept. The meter counts a request's bytes as they
        were when it was sent, once the server answered (a refused message counts nothing)."""
        seen: ViewedMessage | None = None
        up = 0
        if isinstance(request, Request) and isinstance(request.arrays, Mapping):
            up = _nbytes(request.arrays)
            if self.record_view and isinstance(request.meta, Mapping):
                try:
                    seen = ViewedMessage(
                        request.session,
                        request.stage,
                        request.layer,
                        request.step,
                        {k: _numpy(v) for k, v in request.arrays.items()},
                        _copy_meta(request.meta),
                    )
                except (TypeError, ValueError, RuntimeError):  # not arrays (ragged lists, a sparse or meta
                    # tensor): the server refuses them
                    seen = None
        if seen is not None:
            self.view.messages.append(seen)
        reply = self.server.handle(request)
        arrays = reply.arrays if isinstance(reply, Reply) and isinstance(reply.arrays, Mapping) else {}
        if self.record_view and isinstance(reply, Reply) and arrays is reply.arrays:
            try:
                got = {k: _numpy(v) for k, v in arrays.items()}
            except (TypeError, ValueError, RuntimeError):  # not arrays (ragged lists, a sparse or meta
                # tensor: NotImplementedError is a RuntimeError): the client refuses them
                got = None
            if got is not None:
                self.view.replies.append(
                    ViewedMessage(reply.session, reply.stage, reply.layer, reply.step, got, {})
                )
        self.meter.message(request.stage, up, _nbytes(arrays))
        return reply


def _copy_meta(value: Any) -> Any:
    """``value`` with every mapping, list, tuple and numpy array in it copied: a request's ``meta`` as the
    view records it (a later edit of a nested list, such as ``experts``, must not change the record)."""
    if isinstance(value, Mapping):
        return {k: _copy_meta(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_meta(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _nbytes(arrays: Mapping[str, Any]) -> int:
    """The payload bytes ``arrays`` take on the wire (:func:`scx_ref.service.codec.to_wire_array`): a
    float64 element 8 bytes, any narrower float (bf16/fp16 widen to float32) 4, an integer 8 (int64) — so
    an in-process session meters what a network transport would carry. What is not an array counts 0."""
    total = 0
    for a in arrays.values():
        if hasattr(a, "element_size") and hasattr(a, "nelement"):  # a torch tensor
            count, size, floating = int(a.nelement()), int(a.element_size()), bool(a.is_floating_point())
        elif isinstance(a, np.ndarray):
            count, size, floating = int(a.size), int(a.itemsize), a.dtype.kind == "f"
        else:
            continue
        total += count * (8 if not floating or size == 8 else 4)
    return total

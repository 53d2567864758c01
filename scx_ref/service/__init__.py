"""``scx serve`` and its clients (DESIGN §5.6): the wire codec (:mod:`~scx_ref.service.codec`), the gRPC
service around :class:`~scx_ref.protocol.Server` (:mod:`~scx_ref.service.service`) and
:class:`~scx_ref.service.remote.RemoteTransport`, the client's transport to it.

Needs the ``serve`` extra (``grpcio``, ``prometheus-client``); importing this package does not import
them — they load when a service starts or a transport connects.
"""

from __future__ import annotations

from .codec import Frame, FrameKind, WireLimits, decode, encode_reply, encode_request
from .remote import RemoteTransport, parse_url
from .service import SCXService, ServeOptions, model_fingerprint

__all__ = [
    "Frame",
    "FrameKind",
    "RemoteTransport",
    "SCXService",
    "ServeOptions",
    "WireLimits",
    "decode",
    "encode_reply",
    "encode_request",
    "model_fingerprint",
    "parse_url",
]

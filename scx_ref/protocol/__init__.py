"""The SCX protocol (DESIGN §5): a trusted :class:`Client` and an untrusted :class:`Server` that talk
only through :mod:`~scx_ref.protocol.messages`, over a :class:`LocalTransport` (in-process) that can
record the server's view."""

from __future__ import annotations

from ..stages import Phase, Stage
from .client import Client
from .config import Level, SCXConfig
from .cost import CostMeter, CostReport, StageCost
from .decoys import CalibrationPool, DecoyPolicy, GaussianDecoys
from .messages import Reply, Request
from .pool import MaskPool
from .presets import PRESETS, Preset, preset
from .server import Server
from .transport import LocalTransport, ServerView, Transport, ViewedMessage

__all__ = [
    "PRESETS",
    "CalibrationPool",
    "Client",
    "CostMeter",
    "CostReport",
    "DecoyPolicy",
    "GaussianDecoys",
    "Level",
    "LocalTransport",
    "MaskPool",
    "Phase",
    "Preset",
    "Reply",
    "Request",
    "SCXConfig",
    "Server",
    "ServerView",
    "Stage",
    "StageCost",
    "Transport",
    "ViewedMessage",
    "preset",
]

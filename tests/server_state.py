"""Exact snapshots of a :class:`~scx_ref.protocol.server.Server`'s state, for the tests that a refused or
failed message changes nothing (DESIGN §5.5). One home for every such test: arrays are compared bit for
bit with their dtype and shape (``repr`` of an array rounds its values and elides the middle of a large
one, so a comparison of reprs misses most changes)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from scx_ref.protocol.server import Server

__all__ = ["frozen", "same", "server_state", "session_state"]


def frozen(x: Any) -> Any:
    """A hashable copy of ``x`` that compares equal with ``==`` exactly when ``x`` does, arrays bit for bit
    (dtype, shape and bytes), mappings and sets whatever their order, dataclasses field by field."""
    if isinstance(x, np.ndarray):
        return ("ndarray", x.dtype.str, x.shape, np.ascontiguousarray(x).tobytes())
    if isinstance(x, Mapping):
        return ("mapping", tuple(sorted(((frozen(k), frozen(v)) for k, v in x.items()), key=repr)))
    if isinstance(x, (set, frozenset)):
        return ("set", tuple(sorted((frozen(v) for v in x), key=repr)))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(frozen(v) for v in x))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, frozen({f.name: getattr(x, f.name) for f in dataclasses.fields(x)}))
    return x


def same(a: Any, b: Any) -> bool:
    """Exact deep equality of snapshots: :func:`frozen` of each compared (arrays bit for bit, with their dtype
    and shape)."""
    return bool(frozen(a) == frozen(b))


def session_state(server: Server[Any], sid: str) -> tuple[Any, ...]:
    """What a refused or failed message must leave as it was in one session: its snapshot (caches, counters,
    commits) and its flop meter (a deep copy: compare with :func:`same`)."""
    return server.sessions_snapshot(sid), copy.deepcopy(dict(server.cost(sid).stages))


def server_state(server: Server[Any]) -> Any:
    """Everything a refused message must leave alone on the whole server, frozen (compare with ``==``): the
    open sessions and each one's :func:`session_state`, the cache byte total, the nonces and commitments
    seen."""
    return frozen(
        (
            sorted(server.sessions),
            {sid: session_state(server, sid) for sid in server.sessions},
            server.cache_bytes,
            list(server._nonces),
            list(server._commits),
        )
    )

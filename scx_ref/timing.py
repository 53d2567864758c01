"""Wall time spent inside one method, for the benchmarks: ``scx bench``, :mod:`models.split_time`,
:mod:`models.client_ab` and :mod:`models.cold_caches` split an SCX request into the server's part (the time
inside its ``handle`` calls) and the client's (the rest of the request) with :func:`timed_server`."""

from __future__ import annotations

import time
from typing import Any, TypeVar

__all__ = ["timed", "timed_prefill", "timed_server"]

T = TypeVar("T")


def timed(cls: type[T], method: str) -> tuple[type[T], list[float]]:
    """A subclass of ``cls`` whose ``method`` adds the seconds each call takes (wall clock, the call's
    own and everything it calls) to the returned one-element list; the caller resets it between
    measurements. The method's behaviour, results and exceptions are the original's."""
    spent = [0.0]

    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(super(sub, self), method)(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    sub: type[T] = type(f"Timed{cls.__name__}", (cls,), {method: wrapper})
    return sub, spent


def timed_server(server_cls: type[T]) -> tuple[type[T], list[float]]:
    """:func:`timed` on the server's ``handle``: the seconds a request spends in the server, transport
    aside (in process, the rest of the request is the client's own work)."""
    return timed(server_cls, "handle")


def timed_prefill(
    client: Any, server_cls: type[Any], backend: Any, ids: Any, in_server: list[float]
) -> tuple[float, float]:
    """One SCX prefill of ``ids`` by ``client`` under a fresh nonce whose keys are derived first (untimed),
    on a new ``server_cls(backend)`` from :func:`timed_server` (its ``in_server``): (seconds inside the
    server's ``handle`` calls, seconds of the rest of the prefill)."""
    from .keys import KeySchedule
    from .protocol import LocalTransport

    nonce = KeySchedule.new_nonce()
    client.precompute(len(ids), nonce=nonce)
    in_server[0] = 0.0
    t0 = time.perf_counter()
    client.prefill(ids, LocalTransport(server_cls(backend)), nonce=nonce)
    wall = time.perf_counter() - t0
    return in_server[0], wall - in_server[0]

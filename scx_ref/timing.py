"""Wall time spent inside one method, for the benchmarks: ``scx bench``, :mod:`models.split_time`,
:mod:`models.client_ab` and :mod:`models.cold_caches` split an SCX request into the server's part (the time
inside its ``handle`` calls) and the client's (the rest of the request) with :func:`timed_server`;
:func:`timed_kernels` times the fused CPU kernels' calls (``models.split_time --kernels``)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["around", "timed", "timed_kernels", "timed_prefill", "timed_server"]

T = TypeVar("T")


def around(
    cls: type[T], method: str, enter: Callable[[], Any], leave: Callable[[Any], None], name: str
) -> type[T]:
    """A subclass of ``cls`` (named ``name``) whose ``method`` calls ``enter()`` before each call and
    ``leave(what enter returned)`` after it, however it ends: what the benchmarks put around a server's
    ``handle`` (a timer, a flag, a pass over memory). The method's arguments, results and exceptions are
    the original's. Two plain calls rather than a context manager: a timed ``handle`` runs ~124 times a
    request, and a generator-based context cost 1.5 µs a call more. ConfigError unless ``cls`` is a class
    with a method named ``method`` (a name it lacks failed only at the first call)."""
    if not isinstance(cls, type) or not isinstance(method, str) or not callable(getattr(cls, method, None)):
        raise ConfigError(
            f"around() needs a class and the name of one of its methods, got {cls!r}, {method!r}"
        )

    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        token = enter()
        try:
            return getattr(super(sub, self), method)(*args, **kw)
        finally:
            leave(token)

    sub: type[T] = type(name, (cls,), {method: wrapper})
    return sub


def timed(cls: type[T], method: str) -> tuple[type[T], list[float]]:
    """A subclass of ``cls`` whose ``method`` adds the seconds each call takes (wall clock, the call's
    own and everything it calls) to the returned one-element list; the caller resets it between
    measurements. The method's behaviour, results and exceptions are the original's."""
    spent = [0.0]

    def stop(t0: float) -> None:
        spent[0] += time.perf_counter() - t0

    name = f"Timed{getattr(cls, '__name__', '')}"  # around() refuses what is not a class
    return around(cls, method, time.perf_counter, stop, name), spent


def timed_server(server_cls: type[T]) -> tuple[type[T], list[float]]:
    """:func:`timed` on the server's ``handle``: the seconds a request spends in the server, transport
    aside (in process, the rest of the request is the client's own work)."""
    return timed(server_cls, "handle")


def timed_prefill(
    client: Any, server_cls: type[Any], backend: Any, ids: Any, in_server: list[float]
) -> tuple[float, float]:
    """One SCX prefill of ``ids`` by ``client`` under a fresh nonce whose keys are derived first (untimed),
    on a new ``server_cls(backend)`` from :func:`timed_server` (its ``in_server``): (seconds inside the
    server's ``handle`` calls, seconds of the rest of the prefill). The server and its transport are built
    before the clock starts: building them is neither side's part of the request."""
    from .keys import KeySchedule
    from .protocol import LocalTransport

    nonce = KeySchedule.new_nonce()
    client.precompute(len(ids), nonce=nonce)
    link = LocalTransport(server_cls(backend))  # untimed: its construction was counted as the client's
    in_server[0] = 0.0
    t0 = time.perf_counter()
    client.prefill(ids, link, nonce=nonce)
    wall = time.perf_counter() - t0
    return in_server[0], wall - in_server[0]


@contextlib.contextmanager
def timed_kernels(
    skip: Callable[[], bool] = lambda: False, names: Collection[str] | None = None
) -> Iterator[list[float]]:
    """Within the block, each call of a fused CPU kernel (:func:`scx_ref.backends.cpu_kernels.kernels`;
    only those named in ``names``, where given) adds its seconds (numba's dispatch included) to the yielded
    one-element list, except the calls made while ``skip()`` is true (the server's, when the caller times
    only the client's); the caller resets the list between measurements. The kernels' arguments, results
    and exceptions are the originals'; the loaded kernels are back after the block
    (:func:`~scx_ref.backends.cpu_kernels.replaced`). The list stays 0 where the kernels are not in use
    (numba missing, or ``SCX_NUMBA=0``). ConfigError for a name no kernel has (kernels in use or not), or
    ``names`` not a collection of names (one string: its characters were read as names)."""
    from .backends import cpu_kernels

    untimed = ("set_num_threads", "max_threads")
    timed = [f.name for f in dataclasses.fields(cpu_kernels.Kernels) if f.name not in untimed]
    if names is not None:
        try:
            if isinstance(names, (str, bytes)):
                raise TypeError
            names = tuple(names)  # read once: a generator's names were used up by this check, timing none
            unknown = [n for n in names if n not in timed]
        except TypeError:
            raise ConfigError(f"names must be a collection of kernel names, got {names!r:.40}") from None
        if unknown:
            raise ConfigError(f"no fused kernel named {unknown}; kernels: {timed}")
    spent = [0.0]
    k = cpu_kernels.kernels()
    if k is None:
        yield spent
        return

    def timer(f: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if skip():
                return f(*args)
            t0 = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[0] += time.perf_counter() - t0

        return call

    wrapped: dict[str, Any] = {n: timer(getattr(k, n)) for n in timed if names is None or n in names}
    with cpu_kernels.replaced(dataclasses.replace(k, **wrapped)):
        yield spent

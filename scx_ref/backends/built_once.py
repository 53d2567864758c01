"""Values built on their first read and kept: the float64 twins of both backends
(:meth:`~scx_ref.backends.numpy_backend.NumpyBackend.widened`, :meth:`~scx_ref.backends.torch_backend.
TorchBackend.widened`) convert a block's weights only when a blinded stage of that block first runs wide."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["BuiltOnce"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BuiltOnce(Generic[K, V]):
    """A map whose value for a key is ``build()`` of its first :meth:`get`, then the kept value. Thread-safe:
    threads asking for a key at once get one value, built once (a server's sessions may read a block for
    the first time together); a build that raises keeps nothing, so the next read builds again."""

    def __init__(self) -> None:
        self._held: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K, build: Callable[[], V]) -> V:
        """The value of ``key``: ``build()`` on its first read (under the lock), the kept value after."""
        try:
            return self._held[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._held:
                self._held[key] = build()
            return self._held[key]

    def items(self) -> list[tuple[K, V]]:
        """The keys built so far with their values, in the order they were built."""
        with self._lock:
            return list(self._held.items())

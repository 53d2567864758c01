"""The offline mask pool (DESIGN §4 T5, §5.7): one-time blinding masks η and their corrections η·W for
future requests, derived before any prompt exists.

Every mask is a function of the key schedule alone — the master secret, a request's nonce and the
release's key label (:meth:`~scx_ref.protocol.plan.Release.label`) — so the client can draw a fresh nonce
per future request and compute, ahead of time, η and η·W of every release of the configuration's
:class:`~scx_ref.protocol.plan.ReleasePlan`: the prefill's for a prompt of up to ``capacity`` tokens,
and those of the first ``steps`` decode steps. A request then only adds η and subtracts η·W: the
O(rows·d²) corrections leave the critical path.

**Exactly once.** An entry is a :class:`~scx_ref.protocol.prepare.PreparedKeys` under its own fresh nonce.
:meth:`MaskPool.take` removes it from the pool; the request that uses it drops each (η, η·W) as it reads it;
the client refuses a second request under a nonce it already used (SessionError) — so no mask is ever
sent twice, and the server never sees two messages blinded by the same η.

**Any length up to capacity.** The noise stream is read row by row, so the η of a prompt of n ≤ capacity
tokens is exactly the first n + r rows of the capacity's η; η·W is row-wise too, its first rows equal to the
shorter product to rounding, not bit for bit (:meth:`~scx_ref.protocol.prepare.PreparedKeys.blinding`);
the token permutations, which do depend on n, are derived when the prompt arrives (O(n) per block).

**Cost.** :attr:`MaskPool.bytes_per_prompt_token` and :attr:`MaskPool.bytes_per_step` are the memory an
entry takes per prompt token and per decode step (η and η·W of every release, in the blinded stages'
dtype); :attr:`MaskPool.tokens_per_second` is the fill throughput measured so far.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Generic, Protocol

import numpy as np

from .._checks import check_int
from ..backends.base import A
from ..errors import ProtocolError
from ..keys import KeySchedule, NonceClaims
from .prepare import BackgroundJob, PreparedKeys


class PoolOwner(Protocol[A]):
    """What a mask pool needs of its client (:class:`~scx_ref.protocol.client.Client`): its maximum
    length, the slot the pool attaches itself to, and the derivation of one request's keys."""

    max_length: int
    pool: MaskPool[A] | None

    def _new_prepared(self, nonce: bytes, n: int) -> PreparedKeys[A]: ...


__all__ = ["MaskPool", "PoolOwner"]


def _used(entry: PreparedKeys[Any]) -> bool:
    """Whether ``entry``'s nonce already drove a session under its master secret (a request given that
    nonce explicitly): its masks must never be sent (they would blind a second prompt with the same η)."""
    claims = getattr(entry.keys.schedule, "claims", None)
    return isinstance(claims, NonceClaims) and claims.claimed(entry.nonce)


def _integer(v: Any, name: str) -> int:
    """``v`` as an int: a Python or numpy integer, not a bool (ProtocolError otherwise)."""
    return check_int(v, name, None, error=ProtocolError)


class MaskPool(Generic[A]):
    """One-time masks for ``client``'s next requests: each entry serves one prompt of at most
    ``capacity`` tokens and ``steps`` decode steps. Creating the pool attaches it to the client, whose
    :meth:`~scx_ref.protocol.client.Client.prefill` then takes an entry per request (while any is left;
    afterwards, or for a prompt longer than ``capacity``, it derives its masks itself, as without a pool).

    ``capacity`` and ``steps`` are integers (Python or numpy, not bool) with 1 <= capacity and
    capacity + steps <= the client's ``max_length`` (ProtocolError otherwise; the client is then left
    without this pool)."""

    def __init__(self, client: PoolOwner[A], capacity: int, steps: int = 0) -> None:
        max_length = getattr(client, "max_length", None)
        if not hasattr(client, "_new_prepared") or not isinstance(max_length, (int, np.integer)):
            raise ProtocolError(f"a mask pool needs a Client, got {type(client).__name__}")
        capacity = _integer(capacity, "capacity")
        steps = _integer(steps, "steps")
        if not 1 <= capacity <= client.max_length:
            raise ProtocolError(
                f"a pool entry serves 1 to max_length = {client.max_length} tokens, not {capacity}"
            )
        if steps < 0 or capacity + steps > client.max_length:
            raise ProtocolError(f"{steps} decode steps after {capacity} tokens exceed max_length")
        self.client = client
        self.capacity = capacity
        self.steps = steps
        self._entries: deque[PreparedKeys[A]] = deque()
        self._nonces: set[bytes] = set()
        self._lock = threading.Lock()
        self._job = BackgroundJob()
        self.seconds = 0.0  # wall time spent filling
        self.filled = 0  # entries filled so far
        self.bytes_per_prompt_token = 0.0
        self.bytes_per_step = 0.0
        client.pool = self

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def fill(self, count: int = 1, background: bool = False) -> None:
        """Derive ``count`` more entries (an integer >= 0; ProtocolError otherwise), each under a fresh
        nonce (in a background thread when asked: :meth:`wait` joins it). A background fill first waits for
        the one still running, if any — so the call may block — and re-raises its error (nothing is then
        started)."""
        count = _integer(count, "count")
        if count < 0:
            raise ProtocolError(f"count must be >= 0, got {count}")
        if background:
            self.wait()
            self._job.start(lambda: self._fill(count), "scx-mask-pool")
        else:
            self._fill(count)

    def _fill(self, count: int) -> None:
        for _ in range(count):
            nonce = KeySchedule.new_nonce()
            t0 = time.perf_counter()
            entry = self.client._new_prepared(nonce, self.capacity)
            entry.fill(self.steps, perms=False)
            seconds = time.perf_counter() - t0
            prefill = entry.mask_bytes_of(step=False)
            per_step = (entry.mask_bytes - prefill) / self.steps if self.steps else 0.0
            with self._lock:  # the metrics move together with the entries (a fill beside another, a reader)
                self.seconds += seconds
                self.bytes_per_prompt_token = prefill / self.capacity
                self.bytes_per_step = per_step
                # 128-bit nonces: never, but a repeat must not be served. Held entries are checked here,
                # used ones by their master's claims; a taken entry's nonce is forgotten (bounded memory)
                if nonce in self._nonces or _used(entry):
                    continue
                self._nonces.add(nonce)
                self._entries.append(entry)
                self.filled += 1

    def wait(self) -> None:
        """Wait for a background :meth:`fill` (re-raising its error)."""
        self._job.wait()

    def take(self, n: int) -> PreparedKeys[A]:
        """Remove and return the oldest entry, bound to a prompt of ``n`` tokens (ProtocolError when n is
        not an integer in [1, capacity] or the pool is empty; the pool is then unchanged). The entry is
        never handed out again; an entry whose nonce already drove a session (given to a request
        explicitly) is dropped, never served."""
        entry = self._take(n)
        if entry is None:
            raise ProtocolError("the mask pool is empty: fill it first")
        return entry

    def take_fitting(self, n: int) -> PreparedKeys[A] | None:
        """As :meth:`take`, but None (the pool unchanged, but for entries whose nonce already drove a session,
        which are dropped) when no entry serves a prompt of ``n`` tokens: the pool is empty or ``n`` exceeds
        its capacity (the caller then derives its own keys)."""
        n = _integer(n, "n")
        return self._take(n) if n <= self.capacity else None

    def _take(self, n: int) -> PreparedKeys[A] | None:
        n = _integer(n, "n")
        if not 1 <= n <= self.capacity:
            raise ProtocolError(f"this pool's entries serve prompts of 1 to {self.capacity} tokens, not {n}")
        with self._lock:
            while True:
                if not self._entries:
                    return None
                entry = self._entries.popleft()
                self._nonces.discard(entry.nonce)
                if not _used(entry):
                    break
        entry.bind(n)
        return entry

    @property
    def tokens_per_second(self) -> float:
        """Fill throughput: prompt tokens of masks derived per second of filling — the entries counted and
        the seconds spent on them read together, under the lock a fill updates them under."""
        with self._lock:
            return self.filled * self.capacity / self.seconds if self.seconds else 0.0

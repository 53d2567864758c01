"""The server's limits (DESIGN §5.5) and the typed checks of every field a request carries.

:class:`ServerLimits` bounds what one client can make the server hold or compute: open sessions, rows per
session, decoys per stage, bytes per message, the total bytes of every session's caches, how long an idle
session lives, and how many past nonces and key commitments the server remembers (to refuse a reused
nonce and a replayed transcript). Every limit has a safe default and is configurable; a request over a
limit is refused with :class:`~scx_ref.errors.LimitError` and changes nothing.

The field checkers turn untrusted message fields into typed values or raise
:class:`~scx_ref.errors.ProtocolError`: a ``bool`` is not an integer, a float is never truncated to one,
strings have their exact format, and an expert list is a sorted, duplicate-free subset of the experts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .._checks import check_int, check_real
from ..errors import ConfigError, ProtocolError

__all__ = [
    "ServerLimits",
    "field_bool",
    "field_experts",
    "field_hex",
    "field_int",
    "field_str",
    "known_fields",
]


@dataclass(frozen=True)
class ServerLimits:
    """Configurable server limits; the defaults suit one CPU or GPU host serving a small model.

    max_sessions       open sessions at once (idle ones past ``idle_ttl`` are evicted first)
    max_rows           rows one session may reach: its ``max_length`` (prompt + generated) plus its most
                       decoys at any stage
    max_decoys         decoy rows at any one stage (``r1``, ``r2``, ``r_lock``)
    max_message_bytes  bytes of the arrays of one request
    max_cache_bytes    bytes of every session's caches together (raw, valid and locked caches), counted
                       by the rows they hold (a raw cache as the whole Z it came from, at the width Z was
                       computed in: float64 for a wide message); a cache extended by generation steps
                       keeps up to max(64, rows/8) spare rows in its buffer (the torch backend's
                       ``spare_rows``)
    idle_ttl           seconds a session may stay idle before it is evicted
    nonce_memory       past session nonces remembered (a nonce seen before is refused)
    commit_memory      past key commitments remembered (a replayed QKV message is refused)

    Every limit but ``idle_ttl`` is an integer >= 1 (Python or numpy, stored as an int; never a bool or a
    float), ``idle_ttl`` a finite real number > 0 (stored as a float); ConfigError otherwise.
    """

    max_sessions: int = 256
    max_rows: int = 1 << 15
    max_decoys: int = 256
    max_message_bytes: int = 256 << 20
    max_cache_bytes: int = 8 << 30
    idle_ttl: float = 600.0
    nonce_memory: int = 1 << 17
    commit_memory: int = 1 << 17

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "idle_ttl":  # seconds: stored as float (a numpy number included)
                object.__setattr__(self, name, check_real(value, name, 0, lo_open=True))
            else:  # a count or a size: a Python or numpy integer (never a bool or a float), stored as int
                if isinstance(value, np.integer):
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
                object.__setattr__(self, name, value)


def known_fields(meta: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    """ProtocolError when ``meta`` holds a field outside ``allowed`` (no value is silently ignored)."""
    extra = sorted(str(k) for k in meta if k not in allowed)
    if extra:
        raise ProtocolError(f"{what} carries unknown field(s) {extra}; allowed: {sorted(allowed)}")


def field_int(value: Any, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]: an integral number (numpy integers included), never a bool,
    float or string (ProtocolError; :func:`~scx_ref._checks.check_int`)."""
    return check_int(value, name, lo, hi, error=ProtocolError)


def field_bool(value: Any, name: str) -> bool:
    """``value`` as a bool (only ``True`` or ``False``)."""
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, got {type(value).__name__} {value!r:.40}")
    return value


def field_str(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value``, a string among ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ProtocolError(f"{name} must be one of {list(choices)}, got {value!r:.40}")
    return value


_HEX = re.compile(r"[0-9a-f]*")


def field_hex(value: Any, name: str, length: int) -> str:
    """``value``, a string of exactly ``length`` lowercase hex digits."""
    if not isinstance(value, str) or len(value) != length or _HEX.fullmatch(value) is None:
        raise ProtocolError(f"{name} must be {length} lowercase hex digits, got {value!r:.80}")
    return value


def field_experts(value: Any, n_experts: int, max_len: int) -> list[int]:
    """``value``, a list of expert ids: 1 to ``max_len`` integers in [0, n_experts), strictly increasing
    (sorted, no repeats — a repeated expert would make the server stack its weights again)."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_len:
        raise ProtocolError(
            f"experts must be a list of 1 to {max_len} expert ids, got {type(value).__name__} {value!r:.60}"
        )
    out = [field_int(e, "an expert id", 0, n_experts - 1) for e in value]
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ProtocolError(f"experts must be sorted and free of repeats, got {out}")
    return out

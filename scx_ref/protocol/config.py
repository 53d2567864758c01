"""SCX protocol configuration: privacy level, decoys, guard blocks, noise scale, limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError

__all__ = ["BETA_KINDS", "LEVELS", "Level", "SCXConfig", "guard_blocks"]

Level = Literal["permute", "paper", "blind"]
#: The privacy levels, weakest first.
LEVELS: tuple[Level, ...] = ("permute", "paper", "blind")
#: The kinds of blinded input a per-kind β may be set for (see :mod:`scx_ref.protocol.plan`).
BETA_KINDS: tuple[str, ...] = ("qkv", "o", "gate_up", "down", "router", "lm_head")


def guard_blocks(n_layers: int, l_s: int, l_e: int) -> tuple[range, range, range]:
    """(first guard, middle, last guard) block ranges, 0-based, for guard sizes l_s, l_e ≥ 1 (DESIGN §5):
    the first ``l_s`` blocks, the last ``l_e`` blocks, and the blocks between. First guards take
    precedence when they overlap."""
    first = range(0, min(l_s, n_layers))
    last_start = max(first.stop, n_layers - l_e)
    return first, range(first.stop, last_start), range(last_start, n_layers)


@dataclass(frozen=True)
class SCXConfig:
    """How one SCX request is encoded (DESIGN §5).

    level      ``permute``: permutations and decoys, no noise anywhere. ``paper`` (default): noise in
               block 1's QKV stage at prefill and one-time noise on every client-blinded generation
               stage — the paper's choice. ``blind``: noise on every linear stage, with the norms that
               precede them moved to the client.
    r1, r2     decoy rows at the QKV/FFN stages (π_i) and at the O stage (π′_i); ``r_lock`` decoy key
               rows in each locked cache (default r1).
    l_s, l_e   first and last guard blocks (≥ 1). Blocks between them are *middle* blocks whose
               prompt caches the server decodes after key sharing.
    beta       Laplace scale β of every noised stage (DESIGN §6: float32 stays within |ΔPPL|/PPL ≤ 1e-5
               up to β ≈ 5; larger β wants float64).
    stage_beta per-kind overrides of β (keys from :data:`BETA_KINDS`: ``qkv``, ``o``, ``gate_up``,
               ``down``, ``router``, ``lm_head``), e.g. ``{"qkv": 5.0, "o": 50.0}``.
    guard_ffn  first guard blocks' FFN during generation: ``clear`` (the paper: the server sees the
               activation) or ``blinded`` (client norm + additive blinding of the MLP's linear maps).
    last_ffn   last guard blocks' FFN during generation: ``exact`` (client norm + blinded linear maps)
               or ``paper`` (the paper's constant-offset form, which relies on T7 and is NOT exact).
    decoys     decoy policy: ``calibration`` (real-looking rows from a public calibration pool) or
               ``gaussian`` (moment-matched Gaussian, for comparison).
    max_length the most positions (prompt + generated) a session may reach (None: the model's
               ``max_positions``).
    """

    level: Level = "paper"
    r1: int = 2
    r2: int = 2
    r_lock: int | None = None
    l_s: int = 1
    l_e: int = 1
    beta: float = 5.0
    stage_beta: Mapping[str, float] | None = None
    guard_ffn: Literal["clear", "blinded"] = "blinded"
    last_ffn: Literal["exact", "paper"] = "exact"
    decoys: Literal["calibration", "gaussian"] = "calibration"
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"level must be one of {LEVELS}, got {self.level!r}")
        for name in ("r1", "r2"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.r_lock is not None and (not isinstance(self.r_lock, int) or self.r_lock < 0):
            raise ConfigError(f"r_lock must be an integer >= 0, got {self.r_lock!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ConfigError(f"max_length must be an integer >= 1 or None, got {self.max_length!r}")
        for name in ("l_s", "l_e"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        _check_beta(self.beta, "beta")
        if self.stage_beta is not None:
            unknown = sorted(set(self.stage_beta) - set(BETA_KINDS))
            if unknown:
                raise ConfigError(f"unknown stage_beta kind(s) {unknown}; kinds are {BETA_KINDS}")
            for kind, value in self.stage_beta.items():
                _check_beta(value, f"stage_beta[{kind!r}]")
        if self.guard_ffn not in ("clear", "blinded"):
            raise ConfigError(f"guard_ffn must be 'clear' or 'blinded', got {self.guard_ffn!r}")
        if self.last_ffn not in ("exact", "paper"):
            raise ConfigError(f"last_ffn must be 'exact' or 'paper', got {self.last_ffn!r}")
        if self.decoys not in ("calibration", "gaussian"):
            raise ConfigError(f"decoys must be 'calibration' or 'gaussian', got {self.decoys!r}")

    @property
    def lock_decoys(self) -> int:
        return self.r1 if self.r_lock is None else self.r_lock

    def beta_for(self, kind: str) -> float:
        """β of a blinded input of ``kind`` (its ``stage_beta`` override, else ``beta``)."""
        if self.stage_beta is not None and kind in self.stage_beta:
            return float(self.stage_beta[kind])
        return float(self.beta)

    def blocks(self, n_layers: int) -> tuple[range, range, range]:
        """(first guard, middle, last guard) block ranges of an ``n_layers`` model (:func:`guard_blocks`)."""
        return guard_blocks(n_layers, self.l_s, self.l_e)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stage_beta"] = None if self.stage_beta is None else dict(self.stage_beta)
        return out


def _check_beta(value: Any, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (np.isfinite(value) and value >= 0)
    ):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")

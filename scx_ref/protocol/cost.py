"""Cost accounting: flops on each side, bytes each way, round trips — per stage and in total.

Flop convention (stated once, used everywhere): a matrix product (m×k)(k×n) costs 2mkn; attention
costs 4·H·n_q·n_k·d_h (scores and the weighted sum of values); elementwise work (norms, RoPE,
residual adds, noise, activations, gathers) is O(rows·d) and counted separately as ``elementwise``
(one per element produced). The client's reply verification (:mod:`scx_ref.protocol.verify`) is
counted apart, as ``verify_flops``, so the protocol's own costs read the same with it on or off.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .._checks import check_int
from .._files import result_json
from ..errors import ConfigError
from ..stages import Phase, Stage

__all__ = ["CostMeter", "CostReport", "Side", "StageCost"]

#: Who computes: the server, the client during the request, or the client ahead of it (``offline``: the
#: blinding corrections η·W of a mask pool or of ``Client.precompute``, off the critical path).
Side = Literal["client", "server", "offline"]


@dataclass
class StageCost:
    """The costs of one stage: flops on each side (``offline``: derived ahead of the request), the
    client's elementwise work, bytes each way, round trips, and the client's verification flops."""

    client_flops: int = 0
    server_flops: int = 0
    offline_flops: int = 0
    client_elementwise: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    verify_flops: int = 0

    def add(self, other: StageCost) -> None:
        """Add every count of ``other`` to this one's."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StageCost))


def _stage(stage: Stage) -> Stage:
    """``stage``, a :class:`Stage` (its wire name, a str equal to it, would key the meter and break the
    report's ``to_dict`` and ``phase_total`` later); ConfigError otherwise."""
    if not isinstance(stage, Stage):
        raise ConfigError(f"stage must be a Stage, got {type(stage).__name__} {stage!r:.40}")
    return stage


class CostMeter:
    """Accumulates costs per :class:`~scx_ref.stages.Stage`. Every count is checked before anything is
    counted: a refused call (ConfigError) leaves the meter as it was — no stage entry added either."""

    def __init__(self) -> None:
        self.stages: dict[Stage, StageCost] = defaultdict(StageCost)

    def matmul(self, stage: Stage, m: int, k: int, n: int, side: Side) -> None:
        """A product (m×k)(k×n) on ``side``: 2mkn flops (ConfigError, counting nothing, unless ``stage`` is a
        Stage and m, k, n are integers ≥ 0)."""
        m, k, n = check_int(m, "m"), check_int(k, "k"), check_int(n, "n")
        self._flops(stage, 2 * m * k * n, side)

    def attention(self, stage: Stage, heads: int, n_q: int, n_k: int, d_h: int, side: Side) -> None:
        """Attention of ``n_q`` queries over ``n_k`` keys on ``side``: 4·heads·n_q·n_k·d_h flops (ConfigError,
        counting nothing, unless ``stage`` is a Stage and every size is an integer ≥ 0)."""
        heads, n_q = check_int(heads, "heads"), check_int(n_q, "n_q")
        n_k, d_h = check_int(n_k, "n_k"), check_int(d_h, "d_h")
        self._flops(stage, 4 * heads * n_q * n_k * d_h, side)

    def elementwise(self, stage: Stage, count: int) -> None:
        """``count`` elements the client produced (ConfigError, counting nothing, unless ``stage`` is a Stage
        and ``count`` an integer ≥ 0)."""
        count = check_int(count, "count")  # before the entry: a refused count adds no stage
        self.stages[_stage(stage)].client_elementwise += count

    def verification(self, stage: Stage, flops: int) -> None:
        """The client's flops verifying a reply of ``stage`` (ConfigError, counting nothing, unless ``stage``
        is a Stage and ``flops`` an integer ≥ 0)."""
        flops = check_int(flops, "flops")  # before the entry: a refused count adds no stage
        self.stages[_stage(stage)].verify_flops += flops

    def message(self, stage: Stage, up: int, down: int) -> None:
        """One round trip of ``stage`` carrying ``up`` bytes to the server and ``down`` back (ConfigError,
        counting nothing, unless ``stage`` is a Stage and both are integers ≥ 0)."""
        up, down = check_int(up, "bytes up"), check_int(down, "bytes down")
        s = self.stages[_stage(stage)]
        s.bytes_up += up
        s.bytes_down += down
        s.round_trips += 1

    def snapshot(self) -> dict[Stage, StageCost]:
        """A copy of the per-stage costs so far (for :meth:`since`)."""
        return {stage: replace(cost) for stage, cost in self.stages.items()}

    def since(self, base: dict[Stage, StageCost]) -> CostMeter:
        """A new meter holding what was added to this one after ``base`` (a :meth:`snapshot` of it): every
        count is this meter's minus the snapshot's, so non-negative for a snapshot this meter grew from."""
        out = CostMeter()
        for stage, cost in self.stages.items():
            before = base.get(stage, StageCost())
            delta = StageCost(**{name: getattr(cost, name) - getattr(before, name) for name in _FIELDS})
            if delta != StageCost():
                out.stages[stage] = delta
        return out

    def _flops(self, stage: Stage, flops: int, side: Side) -> None:
        stage = _stage(stage)
        if side == "client":
            self.stages[stage].client_flops += flops
        elif side == "offline":
            self.stages[stage].offline_flops += flops
        elif side == "server":
            self.stages[stage].server_flops += flops
        else:  # a typo must not pass as server work
            raise ConfigError(f"side must be 'client', 'server' or 'offline', got {side!r}")


@dataclass
class CostReport:
    """Costs of one session, per stage and in total."""

    stages: dict[Stage, StageCost] = field(default_factory=dict)

    @classmethod
    def merge(cls, *meters: CostMeter) -> CostReport:
        """The per-stage sums of ``meters`` (client, server, transport), stages in wire-name order."""
        out: dict[Stage, StageCost] = {}
        for meter in meters:
            for name, cost in meter.stages.items():
                out.setdefault(name, StageCost()).add(cost)
        return cls(dict(sorted(out.items())))

    @property
    def total(self) -> StageCost:
        """The summed costs of every stage."""
        t = StageCost()
        for cost in self.stages.values():
            t.add(cost)
        return t

    def phase_total(self, phase: Phase) -> StageCost:
        """The summed costs of the stages of ``phase`` (:attr:`Stage.phase`)."""
        t = StageCost()
        for stage, cost in self.stages.items():
            if stage.phase is phase:
                t.add(cost)
        return t

    @property
    def client_flop_share(self) -> float:
        """The client's flops during the request over all of the request's flops (client, offline,
        server): with every correction derived ahead, the online share."""
        t = self.total
        all_flops = t.client_flops + t.server_flops + t.offline_flops
        return t.client_flops / all_flops if all_flops else 0.0

    @property
    def verify_flop_share(self) -> float:
        """The client's verification flops over the protocol's flops (client + server)."""
        t = self.total
        all_flops = t.client_flops + t.server_flops
        return t.verify_flops / all_flops if all_flops else 0.0

    @property
    def offline_flop_share(self) -> float:
        """The client's flops derived ahead of the request (η·W of a mask pool) over all of the request's
        flops (client, offline, server)."""
        t = self.total
        all_flops = t.client_flops + t.server_flops + t.offline_flops
        return t.offline_flops / all_flops if all_flops else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (a copy: changing it leaves the report as it was)."""
        return {
            "stages": {k.value: asdict(v) for k, v in self.stages.items()},
            "total": asdict(self.total),
            "client_flop_share": self.client_flop_share,
            "verify_flop_share": self.verify_flop_share,
            "offline_flop_share": self.offline_flop_share,
        }

    def to_json(self) -> str:
        """The report as strict JSON (:func:`~scx_ref._files.result_json`)."""
        return result_json(self.to_dict(), indent=2)

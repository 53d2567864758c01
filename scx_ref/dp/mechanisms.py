"""The Laplace mechanism (DESIGN §4 T6, §7), kept apart from composition (:mod:`.accountants`).

Releasing ``x + η`` with ``η ~ Laplace(0, β)^d`` (density ``exp(-|z|/β) / 2β`` per coordinate) is
ε-differentially private with ``ε = Δ₁ / β`` for any two inputs ``x, x'`` with ``‖x − x'‖₁ ≤ Δ₁``
(Dwork–Roth, Theorem 3.6). Equivalently it is ``(1/β)``-metric-DP in the L1 metric: for *any* two inputs
the output densities differ by at most ``exp(‖x − x'‖₁ / β)``.

The SCX paper (§5.3) instead quotes ``s = Δf / ε`` with ``Δf`` the largest *per-coordinate* difference.
That reading is not a DP guarantee for a d-dimensional row: two rows that differ by ``Δf`` in every
coordinate are ``d·Δf`` apart in L1, and the ε the Laplace mechanism actually gives them is
``d·Δf / s``. :func:`per_coordinate_reading` reports both numbers side by side and labels them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ._validate import check_count, check_nonnegative, check_positive, quotient_up, times

__all__ = [
    "LaplaceMechanism",
    "PerCoordinateReading",
    "laplace_epsilon",
    "laplace_scale_for_epsilon",
    "metric_dp_epsilon_per_unit",
    "per_coordinate_reading",
]

PER_COORDINATE_LABEL = (
    "per-coordinate reading (paper §5.3: eps = Δf/s): NOT a differential-privacy guarantee by itself; "
    "it bounds the privacy loss of one coordinate only"
)
L1_LABEL = "L1 reading (eps = Δ₁/β with Δ₁ = d·Δf): the pure eps-DP guarantee of the Laplace mechanism"


def laplace_epsilon(sensitivity: float, scale: float) -> float:
    """ε of the Laplace mechanism: ``ε = Δ₁ / β``.

    Guarantee: releasing ``x + Laplace(0, β)^d`` is ε-DP (δ = 0) for inputs within L1 distance
    ``sensitivity`` = Δ₁ of each other. Δ₁ = 0 gives ε = 0 (the output does not depend on the input);
    Δ₁ > 0 never gives 0 (a quotient below the float64 range is the smallest positive float).
    Raises ConfigError / NonFiniteError for Δ₁ < 0, β ≤ 0 or non-finite values (an integer beyond the
    float64 range counts as non-finite); a quotient beyond the float64 range is +inf.
    """
    d1 = check_nonnegative(sensitivity, "sensitivity")
    beta = check_positive(scale, "scale (beta)")
    return quotient_up(d1, beta)


def laplace_scale_for_epsilon(sensitivity: float, epsilon: float) -> float:
    """The Laplace scale β that gives a target ε: ``β = Δ₁ / ε``.

    Guarantee: with this β, releasing ``x + Laplace(0, β)^d`` is ``epsilon``-DP for inputs within
    L1 distance ``sensitivity``. Needs Δ₁ > 0 and ε > 0. β is rounded up where ``Δ₁ / ε`` rounds down, so
    ``laplace_epsilon(Δ₁, β) <= ε`` holds in float64 too; ConfigError when β would be 0 (below the float64
    range: no noise, no ε); +inf when it exceeds the range.
    """
    d1 = check_positive(sensitivity, "sensitivity")
    eps = check_positive(epsilon, "epsilon")
    beta = d1 / eps
    if beta == 0.0:
        raise ConfigError(
            f"the Laplace scale for sensitivity {d1!r} and epsilon {eps!r} is below the float64 range "
            "(it would round to 0: no noise)"
        )
    while d1 / beta > eps:  # Δ₁/ε rounded down: step up (once, in practice) to keep the promised ε
        beta = math.nextafter(beta, math.inf)
    return beta


def metric_dp_epsilon_per_unit(scale: float) -> float:
    """The metric-DP reading: ε per unit of L1 distance, ``1 / β``.

    Guarantee: for any two inputs x, x' (no sensitivity bound needed) and every output set S,
    ``P[x + η ∈ S] ≤ exp(‖x − x'‖₁ / β) · P[x' + η ∈ S]``.
    """
    return 1.0 / check_positive(scale, "scale (beta)")


@dataclass(frozen=True)
class LaplaceMechanism:
    """One release of ``x + Laplace(0, scale)^d`` about inputs within L1 distance ``sensitivity``.

    ``epsilon`` is the pure-DP ε (δ = 0) of one release; ``count`` independent releases with the same
    (Δ₁, β) are composed by :mod:`.accountants`. ``sensitivity`` may be +inf, a bound beyond the float64
    range (as :class:`~scx_ref.dp.sensitivity.LayerSensitivities` allows): ε is then +inf, which every
    accountant reports as +inf.
    """

    sensitivity: float
    scale: float
    count: int = 1
    name: str = "laplace"

    def __post_init__(self) -> None:
        """ConfigError / NonFiniteError unless ``sensitivity`` is a real >= 0 (+inf allowed; NaN and an
        integer beyond the float64 range refused), ``scale`` a finite real > 0, ``count`` an integer >= 1
        and ``name`` a string (the label of the release)."""
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {type(self.name).__name__} {self.name!r:.40}")
        object.__setattr__(
            self, "sensitivity", check_nonnegative(self.sensitivity, "sensitivity", allow_inf=True)
        )
        object.__setattr__(self, "scale", check_positive(self.scale, "scale (beta)"))
        object.__setattr__(self, "count", check_count(self.count, "count", minimum=1))

    @property
    def epsilon(self) -> float:
        """Pure ε of one release, Δ₁ / β (never 0 when Δ₁ > 0: see :func:`laplace_epsilon`)."""
        return quotient_up(self.sensitivity, self.scale)

    @property
    def delta(self) -> float:
        """δ of one release: 0 (the Laplace mechanism is pure DP)."""
        return 0.0


@dataclass(frozen=True)
class PerCoordinateReading:
    """The paper's per-coordinate number beside the L1 number it must be compared with.

    ``epsilon_per_coordinate = Δf / s`` is labelled :data:`PER_COORDINATE_LABEL` (not a DP guarantee);
    ``epsilon_l1 = d·Δf / s`` is the ε of pure DP for rows whose coordinates each differ by at most Δf.
    """

    delta_inf: float
    scale: float
    dim: int
    epsilon_per_coordinate: float
    l1_sensitivity: float
    epsilon_l1: float
    per_coordinate_label: str = PER_COORDINATE_LABEL
    l1_label: str = L1_LABEL

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (is_dp_guarantee flags included)."""
        return {
            "per_coordinate": {
                "delta_f": self.delta_inf,
                "scale": self.scale,
                "epsilon": self.epsilon_per_coordinate,
                "is_dp_guarantee": False,
                "label": self.per_coordinate_label,
            },
            "l1": {
                "dim": self.dim,
                "l1_sensitivity": self.l1_sensitivity,
                "scale": self.scale,
                "epsilon": self.epsilon_l1,
                "is_dp_guarantee": True,
                "label": self.l1_label,
            },
        }


def per_coordinate_reading(delta_inf: float, scale: float, dim: int) -> PerCoordinateReading:
    """Both readings of the paper's ``s = Δf / ε`` for a ``dim``-dimensional row.

    ``epsilon_per_coordinate = Δf / s`` (the paper's number; NOT a DP guarantee for a row) and
    ``epsilon_l1 = dim·Δf / s``, the pure-DP ε of the Laplace mechanism for rows with
    ``‖x − x'‖∞ ≤ Δf`` (hence ``‖x − x'‖₁ ≤ dim·Δf``, tight when every coordinate moves by Δf).
    Example (paper, LLaMA-2-7B): Δf = 0.25, s = 5, d = 4096 → 0.05 per coordinate, 204.8 in L1.
    """
    df = check_positive(delta_inf, "per-coordinate sensitivity (delta f)")
    s = check_positive(scale, "scale (s)")
    d = check_count(dim, "dim", minimum=1)
    l1 = times(d, df)  # +inf when d·Δf exceeds the float64 range
    return PerCoordinateReading(
        delta_inf=df,
        scale=s,
        dim=d,
        epsilon_per_coordinate=quotient_up(df, s),
        l1_sensitivity=l1,
        epsilon_l1=quotient_up(l1, s),
    )

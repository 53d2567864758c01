"""Differential-privacy budget calculator for SCX (DESIGN §7).

Mechanisms (:mod:`.mechanisms`) are kept apart from accountants (:mod:`.accountants`), as in Google's
``dp_accounting``; :mod:`.sensitivity` derives L1 sensitivities from a model's weights, :mod:`.permutation`
gives guessing bounds, :mod:`.budget` the per-request budget, :mod:`.cli` the ``scx dp`` command.
``dp_accounting`` is optional: the closed forms work without it.
"""

from __future__ import annotations

from ..protocol.config import BETA_KINDS, LEVELS
from .accountants import (
    CompositionResult,
    advanced_composition,
    advanced_composition_heterogeneous,
    basic_composition,
    basic_composition_heterogeneous,
    compose,
    pld_available,
    pld_discretization_slack,
    pld_epsilon,
    pld_interval_for,
)
from .budget import RequestBudget, StageRelease, config_for_budget, request_budget
from .mechanisms import (
    LaplaceMechanism,
    PerCoordinateReading,
    laplace_epsilon,
    laplace_scale_for_epsilon,
    metric_dp_epsilon_per_unit,
    per_coordinate_reading,
)
from .permutation import (
    bayes_guess_bound,
    expected_bruteforce_trials,
    log2_expected_bruteforce_trials,
    log2_factorial,
    permutation_bits,
    permutation_guess_probability,
    prompt_order_bits,
    statelessness_bound_paper,
)
from .sensitivity import (
    LayerSensitivities,
    ModelSensitivities,
    attention_output_l1_bound,
    embedding_l1_diameter,
    l1_diameter,
    model_sensitivities,
    normalize_rows,
    rmsnorm_l1_bound,
    rmsnorm_l2_bound,
    rmsnorm_sensitivity,
    swiglu_down_l1_bound,
)

__all__ = [
    "BETA_KINDS",
    "LEVELS",
    "CompositionResult",
    "LaplaceMechanism",
    "LayerSensitivities",
    "ModelSensitivities",
    "PerCoordinateReading",
    "RequestBudget",
    "StageRelease",
    "advanced_composition",
    "advanced_composition_heterogeneous",
    "attention_output_l1_bound",
    "basic_composition",
    "basic_composition_heterogeneous",
    "bayes_guess_bound",
    "compose",
    "config_for_budget",
    "embedding_l1_diameter",
    "expected_bruteforce_trials",
    "l1_diameter",
    "laplace_epsilon",
    "laplace_scale_for_epsilon",
    "log2_expected_bruteforce_trials",
    "log2_factorial",
    "metric_dp_epsilon_per_unit",
    "model_sensitivities",
    "normalize_rows",
    "per_coordinate_reading",
    "permutation_bits",
    "permutation_guess_probability",
    "pld_available",
    "pld_discretization_slack",
    "pld_epsilon",
    "pld_interval_for",
    "prompt_order_bits",
    "request_budget",
    "rmsnorm_l1_bound",
    "rmsnorm_l2_bound",
    "rmsnorm_sensitivity",
    "statelessness_bound_paper",
    "swiglu_down_l1_bound",
]

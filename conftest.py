"""Shared pytest configuration: Hypothesis profiles (``default`` fast, ``thorough`` on demand, ``ci``
derandomized, ``mutation`` for ``nox -s mutation``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# mutation testing runs the selected tests once per mutant: a fixed, smaller set of examples (derandomized, so
# a mutant's verdict does not depend on the run), no shrinking (a failure is all it needs, not a minimal one)
# and no example database (an example saved while one mutant fails must not be replayed for the next)
settings.register_profile(
    "mutation",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.target],
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

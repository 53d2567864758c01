"""The triage of surviving mutants, read from ``mutation/annotations.toml`` (see the comment at its top).

``KILLED_BY`` maps a mutant that survived an earlier run to the test added to kill it; ``EQUIVALENT`` maps a
mutant that cannot be killed to the reason. Both keep the mutated line, so a stale entry is detected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - mutmut itself needs the ``toml`` package on Python 3.10
    import toml as tomllib  # type: ignore[import-untyped]

__all__ = ["ANNOTATIONS", "EQUIVALENT", "KILLED_BY", "Equivalent", "KilledBy"]

ANNOTATIONS = Path(__file__).with_name("annotations.toml")


@dataclass(frozen=True)
class Equivalent:
    """A mutant triaged as equivalent: its mutation and why no test can tell it from the original."""

    mutation: str
    reason: str


@dataclass(frozen=True)
class KilledBy:
    """A mutant that survived an earlier run and the test added for it (re-checked on each run)."""

    mutation: str
    test: str


def _load() -> dict[str, Any]:
    text = ANNOTATIONS.read_text(encoding="utf-8")
    data: dict[str, Any] = tomllib.loads(text)
    return data


_DATA = _load()
EQUIVALENT: dict[str, Equivalent] = {k: Equivalent(**v) for k, v in _DATA.get("equivalent", {}).items()}
KILLED_BY: dict[str, KilledBy] = {k: KilledBy(**v) for k, v in _DATA.get("killed_by", {}).items()}

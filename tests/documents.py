"""Hand-edited copies of result documents (JSON objects), for the tests of what a command refuses."""

from __future__ import annotations

import copy
from typing import Any


def edited(doc: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` whose entry at ``path`` (keys and list indices) is ``value``, or removed
    where ``value`` is ``KeyError``; ``doc`` is left as it was."""
    out = copy.deepcopy(doc)
    obj: Any = out
    for key in path[:-1]:
        obj = obj[key]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return out

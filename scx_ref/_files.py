"""Files written whole: whoever reads a file this library writes — a later run, a report, a concurrent
worker — finds the new content or what the file held before, never a part of either.

Every result file (``--json``, ``--out``) and every file of the model cache is written under a private
sibling name and published by one atomic ``os.replace``; a result file's JSON is formed by
:func:`result_json`, strict JSON that any reader parses (no ``Infinity`` or ``NaN`` tokens).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["json_ready", "private_name", "result_json", "write_text_whole"]


def private_name(target: Path) -> Path:
    """A sibling of ``target`` no other writer uses (hidden; pid and a random suffix; ends in ``.part``),
    to write into before ``os.replace(private, target)``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.part")


def write_text_whole(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path``: into :func:`private_name` of it, then ``os.replace`` onto it.

    Guarantee: afterwards ``path`` holds all of ``text``; if anything fails first (a full disk, Ctrl-C),
    ``path`` holds what it held before (or does not exist) and the private file is removed. OSError
    propagates to the caller, as a plain write's would."""
    target = Path(path)
    part = private_name(target)
    try:
        part.write_text(text, encoding=encoding)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def json_ready(value: Any) -> Any:
    """``value`` as strict JSON can carry it (a copy; ``value`` is not changed): +inf and −inf as the texts
    ``"inf"`` and ``"-inf"`` (``float("inf")`` reads them back), NaN as null (a broken measurement, not a
    number), numpy scalars and arrays as Python numbers and lists, tuples as lists; dicts and lists
    recursively; anything else unchanged."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        if math.isnan(f):
            return None
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    return value


def result_json(
    value: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> str:
    """The JSON text of a result file: :func:`json_ready` of ``value``, then ``json.dumps`` with
    ``allow_nan=False`` — so the file is strict JSON (Python's writer otherwise emits ``Infinity`` and
    ``NaN``, which strict readers refuse). ``default`` converts objects JSON has no form for (e.g. ``str``
    for paths); what it returns is not made ready, so it must return finite numbers or texts."""
    return json.dumps(json_ready(value), indent=indent, sort_keys=sort_keys, allow_nan=False, default=default)

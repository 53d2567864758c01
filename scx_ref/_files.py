"""Files written whole: whoever reads a file this library writes — a later run, a report, a concurrent
worker — finds the new content or what the file held before, never a part of either.

Every result file (``--json``, ``--out``) and every file of the model cache is written under a private
sibling name and published by one atomic ``os.replace``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["private_name", "write_text_whole"]


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

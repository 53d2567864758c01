"""The user cache of downloaded and converted models, safe under concurrent first use.

Two rules make several processes (or pytest-xdist workers) that need the same file at once safe:

* every writer writes under a name of its own (:func:`private_name`: pid and a random suffix) and
  publishes with an atomic ``os.replace``, so a reader sees a complete file (or directory) or none;
* the work itself (download, extract, convert) runs under :func:`cache_lock`, an exclusive
  ``fcntl.flock`` on a lock file in the cache directory: one process does it while the others wait,
  then find the result and reuse it. The OS drops the lock if its holder dies.

Cache directory: ``$SCX_CACHE`` if set, else ``~/.cache/scx_ref``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .._files import private_name
from ..errors import SCXError

__all__ = ["cache_dir", "cache_lock", "private_name"]

# Private test hook: False skips the lock (the unique names still apply), so a test can show that its
# concurrent scenario really overlaps when nothing serialises it.
_LOCKING = True


def cache_dir() -> Path:
    """The user cache directory of downloaded and converted models ($SCX_CACHE or ~/.cache/scx_ref; a
    leading ``~`` in $SCX_CACHE is the home directory, as in a shell, not a directory named ``~``)."""
    root = os.environ.get("SCX_CACHE") or os.path.join("~", ".cache", "scx_ref")
    return Path(os.path.expanduser(root))


def _unusable(root: Path, exc: OSError) -> SCXError:
    return SCXError(
        f"the model cache directory {root} cannot be used ({exc.strerror or exc}); "
        "set SCX_CACHE to a writable directory"
    )


@contextlib.contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock ``root/<name>.lock`` for the block (``root`` is created if missing).

    Guarantee: while one process (or thread) is inside the block for ``(root, name)``, every other one
    waits at the entrance. Not reentrant: a holder that enters again for the same ``(root, name)``
    deadlocks. On a platform without ``fcntl`` (Windows) there is no lock; the unique names still keep
    concurrent writers from corrupting each other, they only repeat the work. SCXError, before the block
    runs, when ``root`` cannot be created, the lock file cannot be opened (a file in the way, no
    permission) or locked (a file system without locks).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unusable(root, exc) from exc
    if not _LOCKING or sys.platform == "win32":
        yield
        return
    import fcntl

    try:
        lock = open(root / f"{name}.lock", "ab")  # noqa: SIM115 (entered below); append: never truncated
    except OSError as exc:
        raise _unusable(root, exc) from exc
    with lock as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks (some NFS or FUSE mounts: ENOLCK, ENOTSUP)
            raise _unusable(root, exc) from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

"""Argument types for the ``scx`` subcommands: each parses one option's text or rejects it with a message
argparse prints (``scx <command>: error: argument …``, exit status 2) — before any work starts, and
never by truncating, wrapping or silently ignoring a value."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._checks import check_real
from ..errors import ConfigError
from ..protocol.config import LEVELS
from ..sampling import MAX_SEED  # the largest --seed: the sampler's own bound

__all__ = [
    "MAX_SEED",
    "MAX_THREADS",
    "MAX_TIMEOUT_S",
    "device",
    "float_at_least",
    "input_file",
    "int_at_least",
    "int_list",
    "output_dir",
    "output_file",
    "plain_description",
    "require_device",
    "stdout_closed_quietly",
]


#: The most torch threads a ``--threads`` option takes: torch refuses more than 2**31 - 1 with a raw
#: ValueError, and a count in the millions would try to start as many threads.
MAX_THREADS = 1024
#: The longest client timeout, in seconds (about 11.6 days), a ``--timeout``/``--connect-timeout`` option
#: takes: ``threading`` and gRPC refuse a wait past ``threading.TIMEOUT_MAX`` with an OverflowError in one
#: of their threads (a traceback, and a generation that fails or never times out).
MAX_TIMEOUT_S = 1e6


#: The reST inline markup of a docstring: a Sphinx role with its target (a leading ~ keeps the target's
#: last dotted part only), a literal in double backquotes, strong text in double asterisks
_MARKUP = re.compile(r":[a-z]+:`(~?)([^`]+)`|``([^`]+)``|\*\*([^*]+)\*\*")


def _unmarked(m: re.Match[str]) -> str:
    if m.group(2) is not None:
        return m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)
    return m.group(3) if m.group(3) is not None else m.group(4)


def plain_description(doc: str | None, *, whole: bool = False) -> str | None:
    """The first paragraph of a command module's docstring ``doc`` (all of it with ``whole``) as plain text
    for ``--help`` (None for None): its reST markup removed (:data:`_MARKUP`: a literal reads as its text, a
    role as its target), nothing else changed — argparse prints a description as it is."""
    if doc is None:
        return None
    return _MARKUP.sub(_unmarked, doc if whole else doc.split("\n\n")[0])


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A type for an integer option in [minimum, maximum] (a decimal integer: ``2.5``, ``1e3`` and
    ``abc`` are refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def int_list(
    minimum: int, maximum: int | None = None, *, allow_empty: bool = False
) -> Callable[[str], list[int]]:
    """A type for a comma-separated list of integers, each in [minimum, maximum]; at least one (or, with
    ``allow_empty``, the empty text for an empty list)."""
    one = int_at_least(minimum, maximum)

    def parse(text: str) -> list[int]:
        if allow_empty and not text.strip():
            return []
        items = [t.strip() for t in text.split(",")]
        if not any(items) or not all(items):
            raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}")
        return [one(t) for t in items]

    parse.__name__ = "integer list"
    return parse


def float_at_least(
    minimum: float, *, strict: bool = False, maximum: float | None = None
) -> Callable[[str], float]:
    """A type for a finite number >= ``minimum`` (> with ``strict``) and, given ``maximum``, <= it;
    ``nan`` and ``inf`` (and what float64 rounds to inf, such as ``1e400``) are refused
    (:func:`~scx_ref._checks.check_real`; argparse names the option)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        try:
            return check_real(value, "", minimum, maximum, lo_open=strict)
        except ConfigError as exc:  # " must be > 0, got 0.0": argparse puts the option's name before it
            raise argparse.ArgumentTypeError(str(exc).strip()) from None

    parse.__name__ = "number"
    return parse


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def output_file(text: str) -> Path:
    """A file the command will write: its directory must exist and be writable, and it must not be a
    directory itself, nor anything else that is not a regular file (a device such as ``/dev/stdout``, a
    FIFO, a socket) — the file is written whole, into a private sibling then renamed onto the path
    (:func:`~scx_ref._files.write_text_whole`), which would put a regular file in that thing's place. A
    symbolic link is written through: the path returned is its target's."""
    if not text:  # Path("") is "." — a directory, which the text did not name
        raise argparse.ArgumentTypeError("must not be empty: give a file to write")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file to write")
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a regular file (a device, FIFO or socket): give a file to write"
        )
    if path.is_symlink():  # the rename would replace the link itself, not the file it names
        path = Path(os.path.realpath(path))
    parent = path.parent if str(path.parent) else Path(".")
    if not _writable_dir(parent):
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: {str(parent)!r} is not a writable directory"
        )
    return path


@contextmanager
def stdout_closed_quietly() -> Iterator[None]:
    """Run the block; if it raises BrokenPipeError (standard output is a pipe whose reader has gone, as in
    ``scx … | head``), point file descriptor 1 at ``os.devnull`` and re-raise it, so the CLI reports it
    once (``scx <command>: error: …``, exit 2) — never Python's flush of the unwritten output at exit
    (``Exception ignored … BrokenPipeError``, exit status 120). A ``sys.stdout`` with no file descriptor
    (a test's capture) is left as it is."""
    try:
        yield
    except BrokenPipeError:
        _stdout_to_devnull()
        raise


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def nonempty(text: str) -> str:
    """A string option that must not be empty (an empty stop string would stop at once)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def input_file(text: str) -> Path:
    """A file the command will read: it must exist, be a file and be readable."""
    path = Path(text)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: not a readable file")
    return path


def output_dir(text: str) -> Path:
    """A directory the command will write into (created if missing): it, or its nearest existing
    ancestor, must be a writable directory."""
    path = Path(text)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not _writable_dir(probe):
        raise argparse.ArgumentTypeError(
            f"cannot write into {text!r}: {str(probe)!r} is not a writable directory"
        )
    return path


#: The device names the commands take: ``cpu``, ``cuda`` or ``cuda:N`` with N in ASCII digits and no leading
#: zero — exactly the strings ``torch.device`` reads as that device and writes back unchanged.
_DEVICE = re.compile(r"cpu|cuda(?::(?:0|[1-9][0-9]*))?", re.ASCII)


def device(text: str) -> str:
    """A torch device for the command: ``cpu``, ``cuda`` or ``cuda:N`` (checked available when run).
    Anything else — ``cuda:``, ``cuda:01``, ``cpu:0``, a non-ASCII digit — is refused here, before any model
    is loaded, rather than by torch after it."""
    if _DEVICE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: choose cpu, cuda or cuda:N")
    return text


def require_device(text: str) -> None:
    """ConfigError unless torch can use device ``text`` here (CUDA present, the index in range)."""
    from ..errors import ConfigError

    if _DEVICE.fullmatch(text) is None:
        raise ConfigError(f"unsupported device {text!r}: choose cpu, cuda or cuda:N")
    if text == "cpu":
        return
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(f"device {text!r} needs torch: {exc}") from exc
    index = int(text.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ConfigError(f"device {text!r} asked for, but torch sees no such CUDA device here")


def add_level(
    parser: Any,
    *,
    default: str | None = "paper",
    help: str = "SCX's protection level (default paper; README: Choosing a configuration)",
) -> None:
    """Add ``--level`` to ``parser``: one of the protocol's levels (:data:`~scx_ref.protocol.config.LEVELS`,
    the list's one home)."""
    parser.add_argument("--level", choices=LEVELS, default=default, help=help)

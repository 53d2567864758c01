"""The ``scx`` command line. Each subcommand lives in its own module and registers itself here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code. The modules import only numpy and
scx_ref at load time; a subcommand whose optional dependencies (torch, transformers, …) are missing
still registers, and reports them as an error when run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from . import __version__
from .attacks import cli as attack_cli
from .commands import bench, bench_serve, generate, ppl, serve, verify
from .commands._args import stdout_closed_quietly
from .dp import cli as dp_cli
from .errors import SCXError

_SUBCOMMANDS = (verify, ppl, bench, bench_serve, serve, generate, dp_cli, attack_cli)


def build_parser() -> argparse.ArgumentParser:
    """The ``scx`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="scx",
        description="scx_ref: run, verify and measure SCX (stateless KV-cache encoding) on transformers.",
        epilog="Run `scx <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"scx_ref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    version = sub.add_parser("version", help="print the scx_ref version")
    version.set_defaults(func=lambda _args: print(f"scx_ref {__version__}") or 0)
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``command`` (``parser`` itself when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


def _escape_unencodable() -> None:
    """Standard output and error write a character their encoding lacks (β, ε, ≤ on an ASCII terminal or
    ``PYTHONIOENCODING=ascii``) as a backslash escape instead of raising UnicodeEncodeError mid-output."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            with contextlib.suppress(ValueError, OSError, TypeError):  # a stream that cannot change
                reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``scx`` on ``argv`` (default ``sys.argv[1:]``); the exit code: 2 with ``scx <command>: error: …``
    (argparse's own form for a bad option) on bad input (SCXError) or a file it cannot read or write
    (OSError; a standard output whose reader has gone included, after which nothing more is written to it),
    never a traceback for either; 130 with ``scx <command>: interrupted`` on Ctrl-C (the command's
    own clean-up — a spawned server stopped, a session closed — has run by then)."""
    _escape_unencodable()  # before --help, whose text holds β and ε
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser: ``scx <command>: error:`` and its usage
        _command_parser(parser, getattr(args, "command", None)).error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        with stdout_closed_quietly():  # ``scx … | head``: one error line, not Python's at exit (status 120)
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # what is still buffered: a reader that has gone is reported here
        return code
    except (SCXError, OSError) as exc:  # bad input, or a file the command could not read or write
        print(f"scx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (128 + SIGINT, as shells report it)
        print(f"scx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

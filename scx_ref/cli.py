"""The ``scx`` command line. Each subcommand lives in its own module and registers itself here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import SCXError

# (module, subcommand) pairs; a module whose optional dependencies are missing still registers,
# and its ``func`` reports the missing dependency when run.
_SUBCOMMANDS = (
    "scx_ref.commands.verify",
    "scx_ref.commands.ppl",
    "scx_ref.commands.bench",
    "scx_ref.dp.cli",
    "scx_ref.attacks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scx",
        description="scx_ref: run, verify and measure SCX (stateless KV-cache encoding) on transformers.",
        epilog="Run `scx <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    version = sub.add_parser("version", help="print the scx_ref version")
    version.set_defaults(func=lambda _args: print(f"scx_ref {__version__}") or 0)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subcommand not built yet, or an optional dep missing
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except SCXError as exc:
        print(f"scx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

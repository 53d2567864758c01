"""Run the SCX proofs: ``python -m proofs [--list] [FILTER ...]``.

Prints one line per identity (name, what it covers, result, seconds) and one per negative control, and
exits 1 if any identity fails (or raises), any negative control is wrongly accepted (or raises), any check
returns something other than ``True`` / ``False``, or an identity has no negative control; exits 2 (with
the known names) when a filter matches no identity.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from proofs._registry import Check, Identity, all_identities


def _run(check: Check) -> tuple[bool | None, float, str]:
    """Run one check; returns (result, seconds, error text). ``None`` means it raised or returned something
    other than a bool: a check that forgot its ``return`` (``None``) must not count as a rejection."""
    start = time.perf_counter()
    result: bool | None = None
    try:
        value: object = check()
    except Exception as exc:  # a crashing proof is a failing proof; report it and go on
        error = f"{type(exc).__name__}: {exc}"
    else:
        if isinstance(value, bool):
            result, error = value, ""
        else:
            error = f"returned {type(value).__name__} {str(value)[:60]!r}, not True or False"
    return result, time.perf_counter() - start, error


def _selected(identities: list[Identity], filters: Sequence[str]) -> list[Identity]:
    if not filters:
        return identities
    return [entry for entry in identities if any(f.lower() in entry.name.lower() for f in filters)]


_LINKS_NOTE = (
    "(these are proofs about each identity's symbolic statement of the functions it implements; that each "
    "function computes its statement is checked by pytest tests/test_proof_links.py)"
)


def run(filters: Sequence[str] = (), *, controls: bool = True, out: TextIO | None = None) -> int:
    """Run the selected identities (and their negative controls); return the number of failures. A filter
    that matches no identity counts as a failure (a mistyped name must not report "all proved" for less)."""
    stream = out if out is not None else sys.stdout
    if isinstance(filters, str):  # one name, not a sequence of one-letter filters
        filters = (filters,)
    identities = all_identities()
    selected = _selected(identities, filters)
    failures = 0
    for unmatched in (f for f in filters if not _selected(identities, [f])):
        failures += 1
        print(f"no identity name contains {unmatched!r}: FAILED (nothing run for it)", file=stream)
    total_start = time.perf_counter()
    width = max((len(entry.name) for entry in selected), default=10)
    for entry in selected:
        result, seconds, error = _run(entry.check)
        if result:
            verdict = entry.proved_label
        else:
            failures += 1
            verdict = f"FAILED ({error})" if error else "FAILED (did not simplify to 0)"
        print(f"{entry.name:<{width}}  {verdict}  ({seconds:.2f}s)  covers: {entry.covers}", file=stream)
        for impl in entry.implements:
            print(f"    implements: {impl.function}", file=stream)
        if not controls:
            continue
        if not entry.negative_controls:
            failures += 1
            print("    negative control: NONE (the checker is never shown to fail)", file=stream)
        for control_name, control in entry.negative_controls:
            result, seconds, error = _run(control)
            if result is False:
                verdict = "negative control: correctly rejected"
            elif result is None:
                failures += 1
                verdict = f"negative control: ERROR ({error})"
            else:
                failures += 1
                verdict = "negative control: WRONGLY ACCEPTED (checker cannot fail)"
            print(f"    {verdict}  ({seconds:.2f}s)  {control_name}", file=stream)
    n_controls = sum(len(entry.negative_controls) for entry in selected) if controls else 0
    elapsed = time.perf_counter() - total_start
    summary = "all proved" if failures == 0 else f"{failures} FAILURE(S)"
    print(
        f"{len(selected)} identities, {n_controls} negative controls: {summary} in {elapsed:.1f}s",
        file=stream,
    )
    if any(entry.implements for entry in selected):
        # the proofs never run scx_ref: say where the code itself is held to each statement
        print(_LINKS_NOTE, file=stream)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m proofs",
        description=(
            "Machine-checked sympy identities for the SCX transforms (T1-T7, RoPE order, sensitivity, "
            "Laplace, head structure), each with negative controls that the same checker must reject. "
            "Exits 1 if an identity fails or a negative control is accepted, 2 if a FILTER matches no "
            "identity. The run checks each proof's symbolic statement of the code it 'implements'; that the "
            "code equals the statement is tested by tests/test_proof_links.py."
        ),
    )
    parser.add_argument(
        "filters", nargs="*", metavar="FILTER", help="run only identities whose name contains FILTER"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the identities and their controls, run nothing"
    )
    parser.add_argument("--no-controls", action="store_true", help="skip the negative controls")
    args = parser.parse_args(argv)
    identities = all_identities()
    selected = _selected(identities, args.filters)
    # every filter must match something: a mistyped one beside a good one must not silently run less
    unmatched = [f for f in args.filters if not _selected(identities, [f])]
    if not selected or unmatched:
        known = ", ".join(entry.name for entry in identities)
        wanted = ", ".join(repr(f) for f in (unmatched or args.filters))
        print(
            f"{parser.prog}: error: no identity name contains {wanted}; known identities: {known}",
            file=sys.stderr,
        )
        return 2
    if args.list:
        for entry in selected:
            print(f"{entry.name}  [{entry.covers}]")
            for impl in entry.implements:
                print(f"    - implements: {impl.function}")
            for control_name, _ in entry.negative_controls:
                print(f"    - negative control: {control_name}")
        return 0
    return 1 if run(args.filters, controls=not args.no_controls) else 0


def _console() -> int:
    """``main()`` for a real console: characters the terminal's encoding lacks (σ, π, ᵀ) are escaped
    rather than crashing the run, and a closed pipe (``| head``) ends it quietly."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away: point stdout at devnull so the interpreter's final flush cannot fail too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(_console())

"""The registry of identities: each entry is a symbolic check plus its negative controls, and the
scx_ref functions it is about.

An :class:`Identity` is proved when ``check()`` returns ``True``. Each negative control is a deliberately
wrong variant run through the *same* checker function; it is correctly rejected when it returns ``False``.
A checker that accepted its negative control would be a checker that cannot fail, so the runner treats an
accepted control as a failure.

``implements`` names the library functions whose identity the entry proves (:class:`Implementation`),
each with the proof's own symbolic statement of that function — the very expression the checker uses.
``tests/test_proof_links.py`` evaluates each named function on random instances against its symbolic
statement, so a proof cannot silently drift from the code the protocol runs. The proofs themselves
never import scx_ref.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[], bool]

#: The family modules, in the order the runner prints them.
FAMILIES: tuple[str, ...] = (
    "t1_token_permutation",
    "t2_decoys",
    "t3_head_permutation",
    "t4_cache_order",
    "t5_blinding",
    "rope_order",
    "sensitivity",
    "laplace",
    "t7_norm_scaling",
    "head_structure",
    "verify_products",
)


@dataclass(frozen=True)
class Implementation:
    """A library function (dotted path, e.g. ``scx_ref.transforms.permute_rows``) and the proof's symbolic
    statement of it: ``symbolic`` takes the function's arguments in sympy form (matrices as
    ``sympy.Matrix``, permutations as tuples) and returns what the function must return."""

    function: str
    symbolic: Callable[..., Any]


@dataclass(frozen=True)
class Identity:
    """One machine-checked identity.

    ``name`` is a short dotted id (``"t3.attention_mha"``), ``covers`` says which sizes or how much
    generality the check covers, ``check`` runs the symbolic computation, ``negative_controls`` holds
    ``(description, check)`` pairs that must return ``False``, and ``proved_label`` is what the runner
    prints on success (a refuted paper claim prints ``COUNTEREXAMPLE PROVED ...``).
    """

    name: str
    covers: str
    check: Check
    negative_controls: list[tuple[str, Check]] = field(default_factory=list)
    proved_label: str = "PROVED"
    implements: tuple[Implementation, ...] = ()


REGISTRY: list[Identity] = []


def identity(
    name: str,
    covers: str,
    negative_controls: Sequence[tuple[str, Check]] = (),
    proved_label: str = "PROVED",
    implements: Sequence[Implementation] = (),
) -> Callable[[Check], Check]:
    """Register the decorated zero-argument function as the check of a new :class:`Identity`."""

    def register(check: Check) -> Check:
        if any(entry.name == name for entry in REGISTRY):
            raise ValueError(f"identity {name!r} registered twice")
        REGISTRY.append(
            Identity(name, covers, check, list(negative_controls), proved_label, tuple(implements))
        )
        return check

    return register


def all_identities() -> list[Identity]:
    """Import every family module (which registers its identities) and return the registry in order."""
    for family in FAMILIES:
        importlib.import_module(f"proofs.{family}")
    order = {family: index for index, family in enumerate(FAMILIES)}
    return sorted(REGISTRY, key=lambda entry: order[entry.check.__module__.rpartition(".")[2]])

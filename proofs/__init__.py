"""Machine-checked sympy identities for every SCX transform (DESIGN.md §4, §6, §7), with negative controls.

Run ``python -m proofs`` (``--help`` for options). Each family module registers its identities in
:data:`proofs._registry.REGISTRY`; :func:`all_identities` imports them all. The proofs stand alone: they
do not import ``scx_ref``.
"""

from __future__ import annotations

from proofs._registry import REGISTRY, Identity, Implementation, all_identities, identity

__all__ = ["REGISTRY", "Identity", "Implementation", "all_identities", "identity"]

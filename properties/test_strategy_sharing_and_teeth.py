"""The property suites use the shared strategies and check the functions the protocol calls.

* The key-schedule properties drew their labels, master secrets and nonces from strategies of their own;
  those now live in :mod:`properties.strategies` (:func:`~properties.strategies.key_labels`,
  :func:`~properties.strategies.master_secrets`, :func:`~properties.strategies.nonces`), and every property
  module draws from there.
* "Permutations of different sizes are separate keys" never called ``KeySchedule.permutation`` (what the
  keyring calls for every π, π_o and ρ): it compared two hand-built stream labels, so a permutation that
  left the size out of its label passed it. It now checks the permutation itself.
* The reply round trip of the wire codec compared session, stage, seq and meta but not layer and step,
  which the client's reply check (``check_reply``) compares: a codec that lost them passed it.

Each mutation test runs the property on the ci profile's examples with the library broken in memory
(``monkeypatch``) and requires it to fail, and to pass on the library as it is.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import find
from hypothesis.errors import NoSuchExample

from properties import strategies as S
from properties import test_codec, test_keys
from properties.test_properties_have_teeth import _fails
from scx_ref.keys import MASTER_SECRET_BYTES, NONCE_BYTES, KeySchedule, fisher_yates
from scx_ref.protocol.messages import Reply
from scx_ref.service.codec import Frame, reply_from

PROPERTIES = Path(__file__).resolve().parent


def _size_free_permutation(self: KeySchedule, label: Any, n: int) -> np.ndarray:
    """KeySchedule.permutation with the size left out of its stream label (sizes share one stream)."""
    return fisher_yates(int(n), self.stream((*label, "perm")))


def test_size_property_checks_the_permutation_the_keyring_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    test = test_keys.test_permutations_of_different_sizes_are_separate_keys
    assert not _fails(test)
    monkeypatch.setattr(KeySchedule, "permutation", _size_free_permutation)
    assert _fails(test)


def _reply_without_layer_and_step(frame: Frame) -> Reply:
    """reply_from losing the reply's layer and step (both read back as -1)."""
    rep = reply_from(frame)
    return Reply(rep.session, rep.stage, -1, -1, rep.seq, rep.arrays, rep.meta)


def test_reply_round_trip_checks_layer_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    test = test_codec.test_replies_round_trip
    assert not _fails(test)
    monkeypatch.setattr(test_codec, "reply_from", _reply_without_layer_and_step)
    assert _fails(test)


def _reaches(strategy: Any, condition: Any) -> bool:
    find(strategy, condition, settings=S.REACH)  # NoSuchExample when it cannot
    return True


def test_key_strategies_reach_their_edges() -> None:
    """Labels with an empty text part, an integer past 64 bits and four parts; the all-zero nonce; the
    master secret Hypothesis draws first (all zeros) mapped to a valid one, never the refused one."""
    assert _reaches(S.key_labels(), lambda t: "" in t)
    assert _reaches(S.key_labels(), lambda t: any(isinstance(p, int) and p >= 2**64 for p in t))
    assert _reaches(S.key_labels(), lambda t: len(t) == 4)
    assert _reaches(S.nonces(), lambda b: b == bytes(NONCE_BYTES))
    assert _reaches(S.master_secrets(), lambda b: b == b"\x01" + bytes(MASTER_SECRET_BYTES - 1))
    with pytest.raises(NoSuchExample):
        find(S.master_secrets(), lambda b: not any(b) or len(b) != MASTER_SECRET_BYTES, settings=S.REACH)


def _module_strategies(tree: ast.Module) -> list[str]:
    """Module-level names bound to a Hypothesis strategy call (``x = st.…``) in a parsed module."""
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            call = ast.unparse(node.value.func)
            if call.startswith("st.") and call != "st.composite":
                names += [ast.unparse(t) for t in node.targets]
    return names


_FLOAT_DTYPES = {f"{m}.{t}" for m in ("np", "torch") for t in ("float16", "bfloat16", "float32", "float64")}


def _inline_duplicates(tree: ast.Module) -> list[str]:
    """Strategy calls anywhere in a parsed module (inside composites too) that redo a shared one: a choice
    among floating dtypes only (:func:`~properties.strategies.dtypes` / ``torch_dtypes``) or a permutation
    (:func:`~properties.strategies.perms`)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        call, args = ast.unparse(node.func), node.args
        choices = args[0] if args and isinstance(args[0], (ast.List, ast.Tuple)) else None
        if call == "st.permutations" or (
            call == "st.sampled_from"
            and choices is not None
            and choices.elts
            and all(ast.unparse(e) in _FLOAT_DTYPES for e in choices.elts)
        ):
            found.append(ast.unparse(node))
    return found


def test_every_property_module_draws_from_the_shared_strategies() -> None:
    """Every module with a Hypothesis property imports properties.strategies, and none binds a module-level
    strategy that the shared module already offers (one for labels, secrets, nonces, seeds, dtypes, decoy
    or row counts, permutations), nor draws a floating dtype or a permutation from a strategy of its own
    inside a function (``st.sampled_from([np.float32, np.float64])`` is ``strategies.dtypes()``)."""
    shared = ("label", "secret", "nonce", "seed", "dtype", "decoy", "row", "perm", "token")
    for path in sorted(PROPERTIES.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if "@given" not in text:
            continue
        assert "from properties.strategies import" in text or "from properties import strategies" in text, (
            path.name
        )
        duplicates = [
            name
            for name in _module_strategies(ast.parse(text))
            if any(word in name.lower() for word in shared)
        ]
        assert not duplicates, f"{path.name} defines its own {duplicates}"
        inline = _inline_duplicates(ast.parse(text))
        assert not inline, f"{path.name} draws from its own {inline}"

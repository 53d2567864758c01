"""The key schedule's permutation memo is bounded (:data:`scx_ref.keys.PERM_MEMORY`, least recently used out).

Every generation step derives a one-time head permutation P per first guard block (``("head", i, "gen",
t, …)``, 1 + n_kv_heads arrays, read once): the memo kept every one of them, so a long generation grew the
client's memory by those every step. Bounding it must change no derived value (an evicted permutation is
re-derived, bit for bit the same: the pinned vectors of ``test_keys_vectors.py`` pin the values) and must
keep the permutations the client re-reads every step (ρ of the last guard blocks, O(n) to derive) memoised.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

import scx_ref.keys as keys_module
from scx_ref.backends import NumpyBackend
from scx_ref.keys import PERM_MEMORY, KeySchedule, KeyStream, Label, fisher_yates
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server

from .tiny import tiny_weights

MASTER = bytes(range(1, 33))
NONCE = bytes(range(100, 116))
STEPS = 40


def _unbounded(label: Label, n: int) -> np.ndarray:
    """The permutation (label, n) as a schedule that never asked for anything else derives it."""
    return KeySchedule(MASTER, NONCE).permutation(label, n)


class _Tracked(KeySchedule):
    """A schedule whose per-request schedules are kept (to read their memo) and count the permutation
    streams they open (one per derivation of a permutation)."""

    def __init__(self, master: bytes, nonce: bytes) -> None:
        super().__init__(master, nonce)
        self.children: list[_Tracked] = []
        self.derived: Counter[Label] = Counter()

    def for_nonce(self, nonce: bytes) -> _Tracked:
        child = self._adopt(_Tracked(MASTER, nonce))
        self.children.append(child)
        return child

    def stream(self, label: Label) -> KeyStream:
        if len(label) >= 2 and label[-2] == "perm":
            self.derived[label[:-2]] += 1
        return super().stream(label)


def _generate(memory: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[Any], _Tracked]:
    """A paper-level generation of STEPS decode steps with the server's generation attention (a one-time P
    per step) on the tiny model, under a memo of ``memory`` permutations: its tokens, every message the
    server saw, and the request's schedule."""
    monkeypatch.setattr(keys_module, "PERM_MEMORY", memory)
    w = tiny_weights(0, max_positions=STEPS + 8)
    root = _Tracked(MASTER, NONCE)
    client = Client(NumpyBackend(w), root, SCXConfig(level="paper", gen_attention="server"))
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    tokens = client.generate([1, 2, 3, 4], STEPS + 1, link)
    (request,) = [child for child in root.children if child.derived]  # (others: the client's own checks)
    return tokens, link.view.messages, request


def test_a_long_generation_keeps_the_memo_bounded_and_every_message_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memo of a request's schedule grew by 1 + n_kv_heads = 3 one-time permutations per step (26 + 3 ×
    40 = 146 entries after 40 steps, unbounded); with a bound of 32 it holds 32, every message the server
    sees is bit for bit the one a memo holding everything gives (same keys), and ρ — re-read every step —
    is still derived once."""
    tokens_all, seen_all, request_all = _generate(1 << 20, monkeypatch)
    assert len(request_all._perms) > 3 * STEPS  # control: the one-time permutations are there to bound
    tokens, seen, request = _generate(32, monkeypatch)
    assert len(request._perms) <= 32
    assert tokens == tokens_all
    assert len(seen) == len(seen_all)
    for mine, want in zip(seen, seen_all, strict=True):
        assert (mine.stage, mine.layer, mine.step) == (want.stage, want.layer, want.step)
        assert mine.arrays.keys() == want.arrays.keys()
        for name in want.arrays:
            assert np.array_equal(mine.arrays[name], want.arrays[name]), (mine.stage, mine.step, name)
    locks = {label: count for label, count in request.derived.items() if label[0] == "lock"}
    assert locks and all(count == 1 for count in locks.values()), locks
    gen = [label for label in request.derived if "gen" in label]
    assert len(gen) == 3 * STEPS and set(request.derived[label] for label in gen) == {1}


def test_one_time_permutations_are_bounded_and_a_reused_one_stays_memoised() -> None:
    """Under the real bound: 2 × PERM_MEMORY one-time labels leave at most PERM_MEMORY entries; a label asked
    between every two of them is the same (memoised) array throughout; every value equals the unbounded
    derivation, also for an evicted label asked again."""
    ks = KeySchedule(MASTER, NONCE)
    hot = ks.permutation(("lock", 3), 40)
    first: dict[int, np.ndarray] = {}
    for t in range(2 * PERM_MEMORY):
        first[t] = ks.permutation(("head", 0, "gen", t, "sigma", 0), 4)
        assert ks.permutation(("lock", 3), 40) is hot
        assert len(ks._perms) <= PERM_MEMORY
    for t in (0, 1, PERM_MEMORY, 2 * PERM_MEMORY - 1):  # evicted (0, 1) and still held
        label: Label = ("head", 0, "gen", t, "sigma", 0)
        assert np.array_equal(first[t], _unbounded(label, 4))
        assert np.array_equal(ks.permutation(label, 4), first[t])
        assert np.array_equal(
            first[t], fisher_yates(4, KeySchedule(MASTER, NONCE).stream((*label, "perm", 4)))
        )
    assert np.array_equal(hot, _unbounded(("lock", 3), 40))
    assert not ks.permutation(("head", 0, "gen", 0, "sigma", 0), 4).flags.writeable


def test_threads_sharing_a_schedule_get_the_right_permutations_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four threads deriving overlapping labels through one schedule while the memo evicts: no error, each
    answer the unbounded derivation, the memo within its bound."""
    monkeypatch.setattr(keys_module, "PERM_MEMORY", 8)
    ks = KeySchedule(MASTER, NONCE)
    labels: list[Label] = [("head", 1, "gen", t, "groups") for t in range(24)]
    want = {label: _unbounded(label, 6) for label in labels}
    errors: list[BaseException] = []
    wrong: list[Label] = []
    start = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            start.wait()
            for r in range(6):
                for label in labels[k % 3 :: 1 + (k + r) % 3]:
                    if not np.array_equal(ks.permutation(label, 6), want[label]):
                        wrong.append(label)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong
    assert len(ks._perms) <= 8

"""Tests that kill mutants of :mod:`scx_ref.protocol.pool` that survived ``python -m mutation.run pool``
(mutation/REPORT_prepare_pool.md): each checks a documented property of the mask pool — its refusals (the
error class, the argument named, the bounds of ``capacity``, ``steps``, ``count`` and ``n``, each exact
message), its defaults, the metrics it reports (seconds under a fake clock, bytes per prompt token and per
decode step, from a fresh pool on), the keys an entry holds, the thread a background fill runs in, a
repeated nonce skipped without stopping the fill, and an entry whose key source keeps no nonce claims."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ProtocolError
from scx_ref.keys import KeySchedule, KeyStream, Label
from scx_ref.protocol import Client, SCXConfig
from scx_ref.protocol import pool as pool_module
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.pool import MaskPool
from scx_ref.protocol.prepare import PreparedKeys
from tests.tiny import tiny_weights

W = tiny_weights(7)
MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))
MAX_LENGTH = 8


def _client(max_length: int = MAX_LENGTH) -> Client[Any]:
    """A blinding client (replies verified) of the tiny model, limited to ``max_length`` tokens."""
    cfg = SCXConfig(level="blind", max_length=max_length)
    return Client(NumpyBackend(W), KeySchedule(MASTER, NONCE), cfg)


# -- what a pool is built on, and its arguments --------------------------------------------------------


class _NoMaxLength:
    def _new_prepared(self, nonce: bytes, n: int) -> Any:  # pragma: no cover - never called
        raise AssertionError


class _TextMaxLength(_NoMaxLength):
    max_length = "8"
    pool = None


@pytest.mark.parametrize(
    ("owner", "kind"),
    [
        (object(), "object"),
        (SimpleNamespace(max_length=MAX_LENGTH, pool=None), "SimpleNamespace"),
        (_NoMaxLength(), "_NoMaxLength"),
        (_TextMaxLength(), "_TextMaxLength"),
    ],
    ids=["nothing", "no-derivation", "no-max-length", "text-max-length"],
)
def test_a_pool_refuses_an_owner_that_is_not_a_client(owner: Any, kind: str) -> None:
    """Anything without both the key derivation and an integer max_length is refused, named, unattached."""
    with pytest.raises(ProtocolError, match=f"^a mask pool needs a Client, got {kind}$"):
        MaskPool(owner, 2)
    assert getattr(owner, "pool", None) is None


@pytest.mark.parametrize("argument", ["capacity", "steps"])
@pytest.mark.parametrize("bad", [2.5, "2", True, None])
def test_a_pool_names_its_non_integer_argument_in_a_protocol_error(argument: str, bad: Any) -> None:
    """capacity and steps must be integers (not bool): a ProtocolError naming it; no pool attached."""
    client = _client()
    kwargs = {"capacity": 2, "steps": 0, argument: bad}
    with pytest.raises(ProtocolError, match=f"^{argument} must be an integer, got {type(bad).__name__} "):
        MaskPool(client, **kwargs)
    assert client.pool is None


def test_a_pool_takes_capacities_from_one_to_max_length_and_numpy_integers() -> None:
    """capacity 1 and capacity = max_length (no decode steps) are both allowed, numpy integers too."""
    for capacity in (1, MAX_LENGTH, np.int64(3)):
        client = _client()
        pool = MaskPool(client, capacity)
        assert client.pool is pool and pool.capacity == capacity and type(pool.capacity) is int


@pytest.mark.parametrize("capacity", [0, -1, MAX_LENGTH + 1])
def test_a_capacity_outside_one_to_max_length_is_refused_with_its_bounds(capacity: int) -> None:
    """The message gives the allowed range and the capacity asked for; the client is left without a pool."""
    client = _client()
    want = f"^a pool entry serves 1 to max_length = {MAX_LENGTH} tokens, not {capacity}$"
    with pytest.raises(ProtocolError, match=want):
        MaskPool(client, capacity)
    assert client.pool is None


def test_a_pool_serves_no_decode_steps_unless_asked() -> None:
    """steps defaults to 0: a pool of capacity max_length is allowed, its entries hold prefill masks only."""
    client = _client()
    pool = MaskPool(client, MAX_LENGTH)
    assert pool.steps == 0
    pool.fill()
    entry = pool.take(MAX_LENGTH)
    assert entry.mask_bytes_of(step=True) == 0 and entry.mask_bytes > 0


def test_capacity_plus_steps_may_reach_max_length_exactly() -> None:
    client = _client()
    pool = MaskPool(client, 3, steps=MAX_LENGTH - 3)
    assert (pool.capacity, pool.steps) == (3, MAX_LENGTH - 3) and client.pool is pool


@pytest.mark.parametrize(("capacity", "steps"), [(2, -1), (2, MAX_LENGTH - 1), (3, MAX_LENGTH - 2)])
def test_negative_steps_or_steps_past_max_length_are_refused(capacity: int, steps: int) -> None:
    """steps < 0, or capacity + steps > max_length: a ProtocolError that says so, the client unattached."""
    client = _client()
    want = f"^{steps} decode steps after {capacity} tokens exceed max_length$"
    with pytest.raises(ProtocolError, match=want):
        MaskPool(client, capacity, steps)
    assert client.pool is None


# -- fill ---------------------------------------------------------------------------------------------


def test_a_fresh_pool_reports_no_entries_time_or_memory() -> None:
    """Before any fill: no entry, no second spent, 0 bytes per prompt token and per step, 0 tokens/s."""
    pool = MaskPool(_client(), 3, steps=2)
    assert len(pool) == 0 and pool.filled == 0
    assert pool.seconds == 0.0 and pool.tokens_per_second == 0.0
    assert pool.bytes_per_prompt_token == 0.0 and pool.bytes_per_step == 0.0


def test_fill_adds_one_entry_by_default_and_none_for_zero() -> None:
    pool = MaskPool(_client(), 2)
    pool.fill(0)
    assert len(pool) == 0 and pool.filled == 0
    pool.fill()
    assert len(pool) == 1 and pool.filled == 1
    pool.fill(np.int64(2))
    assert len(pool) == 3


@pytest.mark.parametrize("background", [False, True])
def test_fill_refuses_a_bad_count_with_a_protocol_error_naming_it(background: bool) -> None:
    """A non-integer or negative count: ProtocolError (count named), nothing filled or started."""
    pool = MaskPool(_client(), 2)
    with pytest.raises(ProtocolError, match=r"^count must be an integer, got float 1\.5$"):
        pool.fill(1.5, background=background)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"^count must be an integer, got bool True$"):
        pool.fill(True, background=background)
    with pytest.raises(ProtocolError, match=r"^count must be >= 0, got -1$"):
        pool.fill(-1, background=background)
    pool.wait()
    assert len(pool) == 0 and pool.filled == 0


def test_a_background_fill_runs_in_a_thread_named_scx_mask_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fill thread is named (told apart in a thread dump); a foreground fill runs in the caller's."""
    client = _client()
    pool = MaskPool(client, 2)
    names: list[str] = []
    derive = client._new_prepared

    def recording(nonce: bytes, n: int) -> PreparedKeys[Any]:
        names.append(threading.current_thread().name)
        return derive(nonce, n)

    monkeypatch.setattr(client, "_new_prepared", recording)
    pool.fill(1, background=True)
    pool.wait()
    pool.fill(1)
    assert names == ["scx-mask-pool", threading.current_thread().name] and len(pool) == 2


class _Clock:
    """A fake ``time`` module whose perf_counter returns the given readings in turn."""

    def __init__(self, readings: list[float]) -> None:
        self._readings: Iterator[float] = iter(readings)

    def perf_counter(self) -> float:
        return next(self._readings)


def test_seconds_add_up_each_entrys_fill_time_and_give_tokens_per_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a fake clock: seconds sums each fill's (end - start); tokens/s = filled · capacity / seconds."""
    monkeypatch.setattr(pool_module, "time", _Clock([100.0, 100.5, 200.0, 201.5, 300.0, 301.0]))
    pool = MaskPool(_client(), 3)
    pool.fill(2)
    assert pool.seconds == 2.0 and pool.filled == 2
    assert pool.tokens_per_second == 2 * 3 / 2.0
    pool.fill(1)
    assert pool.seconds == 3.0 and pool.tokens_per_second == 3 * 3 / 3.0


def test_bytes_per_prompt_token_and_per_step_split_an_entrys_masks() -> None:
    """bytes_per_prompt_token = the prefill masks' bytes / capacity, bytes_per_step = the decode masks'
    bytes / steps; an entry holds the masks of every decode step asked for (as a precompute of as many)."""
    client = _client()
    pool = MaskPool(client, 3, steps=2)
    pool.fill(1)
    entry = pool.take(3)
    prefill, steps = entry.mask_bytes_of(step=False), entry.mask_bytes_of(step=True)
    assert prefill > 0 and steps > 0 and prefill + steps == entry.mask_bytes
    assert pool.bytes_per_prompt_token == prefill / 3
    assert pool.bytes_per_step == steps / 2
    direct = _client().precompute(3, steps=2)
    assert (direct.mask_bytes_of(step=False), direct.mask_bytes_of(step=True)) == (prefill, steps)


def test_a_pool_without_decode_steps_takes_no_bytes_per_step() -> None:
    pool = MaskPool(_client(), 3)
    pool.fill(1)
    assert pool.bytes_per_step == 0.0 and pool.bytes_per_prompt_token > 0


def test_pool_entries_leave_the_prompt_length_dependent_keys_to_their_request() -> None:
    """An entry holds masks and head permutations only: no token permutations, block keys or reply checks
    (they depend on the prompt's n, derived when it arrives; the checks hold ~0.6 MB per block)."""
    client = _client()
    assert client.sketches is not None  # replies are verified: a full precompute would derive checks
    pool = MaskPool(client, 3, steps=1)
    pool.fill(1)
    entry = pool._entries[0]
    assert entry._tok == {} and entry._blocks == {} and entry._lock == {} and entry.verifier is None
    assert entry.remaining > 0


def test_a_repeated_nonce_is_skipped_and_the_fill_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A nonce generator that repeats one nonce: the repeat is not kept, the entries after it are."""
    first, second = bytes(range(60, 76)), bytes(range(80, 96))
    nonces = iter([first, first, second])
    monkeypatch.setattr(KeySchedule, "new_nonce", staticmethod(lambda: next(nonces)))
    pool = MaskPool(_client(), 2)
    pool.fill(3)
    assert len(pool) == 2 and pool.filled == 2
    assert [pool.take(2).nonce, pool.take(2).nonce] == [first, second]


class _Unclaimed:
    """A key source (:class:`~scx_ref.protocol.keyring.KeySource`) wrapping a schedule, keeping no claims."""

    def __init__(self, inner: KeySchedule) -> None:
        self._inner = inner
        self.nonce = inner.nonce

    @property
    def session_id(self) -> str:
        return self._inner.session_id

    def key(self, label: Label, length: int = 32) -> bytes:
        return self._inner.key(label, length)

    def stream(self, label: Label) -> KeyStream:
        return self._inner.stream(label)

    def permutation(self, label: Label, n: int) -> Any:
        return self._inner.permutation(label, n)

    def generator(self, label: Label) -> KeyStream:
        return self._inner.generator(label)


def test_entries_whose_key_source_keeps_no_claims_are_kept_and_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key source without nonce claims (any KeySource may lack them) counts as never used: served."""
    client = _client()

    def unclaimed(nonce: bytes, n: int) -> PreparedKeys[Any]:
        keys = RequestKeys(_Unclaimed(client._master_keys.for_nonce(nonce)), client.c)
        return PreparedKeys(
            keys, client.b, client.cfg, client.plan, client.decoys, n, client.bb, client.sketches
        )

    monkeypatch.setattr(client, "_new_prepared", unclaimed)
    pool = MaskPool(client, 3)
    pool.fill(2)
    assert len(pool) == 2
    entry = pool.take(2)
    assert isinstance(entry.keys.schedule, _Unclaimed) and entry.n == 2 and len(pool) == 1


# -- take / take_fitting -----------------------------------------------------------------------------------


def test_taking_from_an_empty_pool_says_to_fill_it() -> None:
    pool = MaskPool(_client(), 2)
    with pytest.raises(ProtocolError, match=r"^the mask pool is empty: fill it first$"):
        pool.take(1)


@pytest.mark.parametrize("method", ["take", "take_fitting"])
def test_taking_for_a_non_integer_length_names_n_in_a_protocol_error(method: str) -> None:
    """take / take_fitting of a float, a text or a bool: ProtocolError naming n, the pool unchanged."""
    pool = MaskPool(_client(), 3)
    pool.fill(1)
    for bad, kind in ((2.5, "float 2.5"), ("2", "str '2'"), (True, "bool True")):
        with pytest.raises(ProtocolError, match=f"^n must be an integer, got {kind}$"):
            getattr(pool, method)(bad)
    assert len(pool) == 1


@pytest.mark.parametrize("method", ["take", "take_fitting"])
@pytest.mark.parametrize("n", [0, -1])
def test_taking_for_less_than_one_token_is_refused_with_the_pools_range(method: str, n: int) -> None:
    pool = MaskPool(_client(), 3)
    pool.fill(1)
    with pytest.raises(ProtocolError, match=f"^this pool's entries serve prompts of 1 to 3 tokens, not {n}$"):
        getattr(pool, method)(n)
    assert len(pool) == 1


def test_take_fitting_gives_none_for_a_prompt_longer_than_the_capacity() -> None:
    """A prompt past the capacity is not an error for take_fitting: None, the entry kept for the next one."""
    pool = MaskPool(_client(), 3)
    pool.fill(1)
    assert pool.take_fitting(4) is None and len(pool) == 1
    with pytest.raises(ProtocolError, match=r"^this pool's entries serve prompts of 1 to 3 tokens, not 4$"):
        pool.take(4)
    entry = pool.take_fitting(3)
    assert entry is not None and entry.n == 3 and len(pool) == 0

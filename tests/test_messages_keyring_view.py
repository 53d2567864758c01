"""Messages, transport, limits, keyring, prepare: the recorded server view is a copy that a later
edit of a sent message cannot change, and recording never turns a malformed message into a raw error; the
meter counts the bytes that were sent; the limits take numpy integers; a key-sharing commitment refuses a
salt or permutation that would make two inputs commit alike; prepared keys refuse a bad prompt length and
may be counted while a background fill runs; every key label of a request names one purpose only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.keys import KeySchedule, Label, encode_label
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server, Stage
from scx_ref.protocol.keyring import RequestKeys, commitment
from scx_ref.protocol.limits import ServerLimits
from scx_ref.protocol.messages import Reply, Request
from tests.tiny import tiny_config, tiny_weights

SESSION = "ab" * 16
MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))


class _Echo:
    """A handler that answers every request with an empty reply (and records nothing itself)."""

    def handle(self, r: Request) -> Reply:
        return Reply(r.session, r.stage, r.layer, r.step, r.seq, {"y": np.zeros((1, 2))}, {})


class _Editing:
    """A handler that edits the request it was handed (its arrays and its meta's nested list)."""

    def handle(self, r: Request) -> Reply:
        r.arrays["m"][0, 0] = 99.0
        r.arrays["extra"] = np.ones(1000)
        r.meta["experts"].append(3)
        return Reply(r.session, r.stage, r.layer, r.step, r.seq, {}, {})


# -- transport ------------------------------------------------------------------------------------------
def test_the_view_records_meta_as_sent_not_as_edited_later() -> None:
    """``meta`` was recorded by a shallow copy: a nested list (``experts``) edited after the send — by the
    client or by the server — changed the recorded history."""
    link = LocalTransport(_Echo(), record_view=True)
    experts, m = [0, 1], np.ones((2, 3))
    link.send(Request(SESSION, Stage.FFN_DOWN, 0, -1, 3, {"m": m}, {"experts": experts, "w": {"a": [1]}}))
    experts.append(3)
    m[0, 0] = 7.0
    seen = link.view.messages[-1]
    assert seen.meta == {"experts": [0, 1], "w": {"a": [1]}}
    assert (seen.arrays["m"] == 1.0).all()
    with pytest.raises(ValueError, match="read-only"):  # a record: no analysis edits it for the next one
        link.view.replies[-1].arrays["y"][0, 0] = 0.0
    assert not seen.arrays["m"].flags.writeable

    editing = LocalTransport(_Editing(), record_view=True)
    editing.send(Request(SESSION, Stage.FFN_DOWN, 0, -1, 3, {"m": np.ones((2, 3))}, {"experts": [0, 1]}))
    got = editing.view.messages[-1]
    assert got.meta["experts"] == [0, 1] and (got.arrays["m"] == 1.0).all() and set(got.arrays) == {"m"}


def test_the_meter_counts_the_bytes_sent_not_the_handlers_edit() -> None:
    """The request's bytes were counted after the server ran: an array the handler added (1000 float64)
    was metered as if it had been sent."""
    link = LocalTransport(_Editing())
    link.send(Request(SESSION, Stage.FFN_DOWN, 0, -1, 3, {"m": np.ones((2, 3))}, {"experts": [0, 1]}))
    assert link.meter.stages[Stage.FFN_DOWN].bytes_up == 6 * 8
    assert link.meter.stages[Stage.FFN_DOWN].round_trips == 1


@pytest.mark.parametrize(
    ("arrays", "meta"),
    [
        ([1, 2], {}),  # arrays not a mapping: AttributeError while recording
        ({"x": [[1.0, 2.0], [3.0]]}, {}),  # a ragged array: ValueError while recording
        ({}, 5),  # meta not a mapping: TypeError while recording
        ({}, [("n", 1)]),  # meta a list of pairs: recorded as a dict, though the server refused it
    ],
)
def test_recording_a_malformed_request_leaves_the_refusal_to_the_server(arrays: Any, meta: Any) -> None:
    """With ``record_view`` on, a malformed request raised the transport's raw error (AttributeError,
    ValueError, TypeError) where the server refuses it with a ProtocolError; now the server refuses it in
    both cases, and nothing is recorded or metered."""
    server: Server[Any] = Server(NumpyBackend(tiny_weights(0)))
    for record in (False, True):
        link = LocalTransport(server, record_view=record)
        with pytest.raises(ProtocolError):
            link.send(Request(SESSION, Stage.OPEN, -1, -1, 0, arrays, meta))
        assert link.view.messages == [] and link.view.replies == []
        assert dict(link.meter.stages) == {}


# -- limits ---------------------------------------------------------------------------------------------
def test_server_limits_take_numpy_integers_and_store_ints() -> None:
    """A numpy integer limit was refused ("must be an integer >= 1, got np.int64(100)"), where every other
    count of the project takes one (and ``idle_ttl`` takes a numpy number)."""
    lim = ServerLimits(max_rows=np.int64(100), nonce_memory=np.uint16(7), max_sessions=np.int32(3))
    assert (lim.max_rows, lim.nonce_memory, lim.max_sessions) == (100, 7, 3)
    assert all(type(v) is int for v in (lim.max_rows, lim.nonce_memory, lim.max_sessions))
    bads: tuple[Any, ...] = (np.int64(0), np.bool_(True), np.float64(3.0))
    for bad in bads:
        with pytest.raises(ConfigError, match=r"^max_rows must be an integer >= 1, got "):
            ServerLimits(max_rows=bad)


# -- keyring --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("salt", [b"", b"s" * 31, b"s" * 33, "s" * 32])
def test_commitment_refuses_a_salt_that_is_not_32_bytes(salt: Any) -> None:
    """The salt's length is not encoded: salt ``b"ab"`` with session ``"cd…"`` hashed the same bytes as other
    splits, and an empty salt admitted enumeration of small permutations (a str salt: raw TypeError)."""
    with pytest.raises(ProtocolError, match="salt must be 32 bytes"):
        commitment(salt, "ab", 1, np.arange(3))


def test_commitment_refuses_a_permutation_that_is_not_integers() -> None:
    """A float permutation was truncated to int64: [0.5, 1.7, 2.2] committed exactly as [0, 1, 2]."""
    salt = bytes(32)
    want = commitment(salt, "ab", 1, np.arange(3))
    other: Any = bytearray(salt)  # a bytearray salt is its bytes
    assert commitment(other, "ab", 1, np.arange(3, dtype=np.int32)) == want
    for bad in (np.array([0.5, 1.7, 2.2]), np.arange(4).reshape(2, 2)):
        with pytest.raises(ProtocolError, match="1-D integer array"):
            commitment(salt, "ab", 1, bad)


class _Spy:
    """A key source that records, per encoded final label, the purposes (set by the test) that used it."""

    def __init__(self) -> None:
        self.schedule = KeySchedule(MASTER, NONCE)
        self.nonce = self.schedule.nonce
        self.purpose = ""
        self.uses: dict[bytes, set[str]] = {}

    @property
    def session_id(self) -> str:
        return self.schedule.session_id

    def _note(self, label: Label) -> None:
        self.uses.setdefault(encode_label(label), set()).add(self.purpose)

    def key(self, label: Label, length: int = 32) -> bytes:
        self._note(label)
        return self.schedule.key(label, length)

    def stream(self, label: Label) -> Any:
        self._note(label)
        return self.schedule.stream(label)

    def permutation(self, label: Label, n: int) -> Any:
        self._note((*label, "perm", n))
        return self.schedule.permutation(label, n)

    def generator(self, label: Label) -> Any:
        self._note((*label, "noise"))
        return self.schedule.generator(label)


def test_every_key_of_a_request_has_a_label_of_its_own() -> None:
    """Every role of :class:`RequestKeys`, at every block, step and stage, derives from final labels (after
    ``permutation``'s and ``generator``'s suffixes) that no other role, block, step or stage uses: no stream
    serves two purposes."""
    spy = _Spy()
    rk = RequestKeys(spy, tiny_config())

    def use(purpose: str, call: Any, *args: Any) -> None:
        spy.purpose = purpose
        call(*args)

    for i in range(tiny_config().n_layers + 1):
        use(f"token_perm {i}", rk.token_perm, i, 7)
        use(f"o_perm {i}", rk.o_perm, i, 7)
        use(f"lock_perm {i}", rk.lock_perm, i, 7)
        use(f"head_perm {i}", rk.head_perm, i)
        use(f"verify_rows {i}", rk.verify_rows, i, 7, 3)
        use(f"verify_lock {i}", rk.verify_lock, i, 2, 2)
        use(f"commit_salt {i}", rk.commit_salt, i)
        for stage in Stage:
            use(f"decoy_stream {stage} {i}", rk.decoy_stream, stage, i)
        for t in range(3):
            use(f"head_perm {i} gen {t}", rk.head_perm, i, t)
            use(f"verify_rows {i} gen {t}", rk.verify_rows, i, 7, 3, t)
            use(f"verify_lock {i} gen {t}", rk.verify_lock, i, 1, 2, t)
    use("verify_mix", rk.verify_mix, (2, 3, 4))
    shared = {k: v for k, v in spy.uses.items() if len(v) > 1}
    assert shared == {}
    assert len(spy.uses) > 200


# -- prepare --------------------------------------------------------------------------------------------
def _client() -> Client[Any]:
    return Client(NumpyBackend(tiny_weights(0)), KeySchedule(MASTER, NONCE), SCXConfig(level="blind"))


@pytest.mark.parametrize("n", [0, -2, "4", 2.0, True])
def test_prepared_keys_refuse_a_bad_prompt_length(n: Any) -> None:
    """A PreparedKeys of n = 0 was built and filled; a str n raised a raw TypeError, a float one a
    KeyScheduleError about a "permutation size"."""
    with pytest.raises(ProtocolError, match=r"^n must be"):
        _client()._new_prepared(bytes(range(100, 116)), n)


def test_prepared_keys_take_a_numpy_length() -> None:
    prep = _client()._new_prepared(bytes(range(100, 116)), np.int64(3))
    assert prep.n == 3 and type(prep.n) is int


class _Interleaving(NumpyBackend):
    """A backend whose ``shape`` lets a pending derivation land first, as a background fill's would."""

    pending: list[Any]

    def shape(self, x: Any) -> tuple[int, ...]:
        while self.pending:
            self.pending.pop()()
        return super().shape(x)


def test_mask_bytes_may_be_read_while_a_fill_adds_masks() -> None:
    """``mask_bytes`` iterated the live dict of masks: read while a background ``start`` filled it, it
    raised RuntimeError ("dictionary changed size during iteration"). The interleaving is made
    deterministic here: a mask is added between two reads of the count's iteration."""
    client = _client()
    prep = client._new_prepared(bytes(range(100, 116)), 4)
    prep.fill()
    before = prep.mask_bytes
    assert before > 0 and prep.plan.generation
    bb = _Interleaving(tiny_weights(0))
    release = prep.plan.generation[0]
    bb.pending = [lambda: prep._prepare_blinding(release, 0)]
    prep.bb = bb
    assert prep.mask_bytes_of(step=False) == before  # the count as it was when read began
    assert prep.mask_bytes > before  # the mask added meanwhile counts from the next read

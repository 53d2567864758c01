"""Prepare, decoys and pool: key material derived ahead and the decoy policies it draws from.

A calibration pool is checked when built (a NaN row made the client blame the server's honest reply; a
pool of another width raised numpy's reshape error mid-request); a decoy policy's rows are checked before
they are sent; zero decoys need no pool rows; the public helpers refuse bad sizes with project errors; two
threads waiting on one background job both wait for it to finish."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import (
    ConfigError,
    DTypeError,
    IntegrityError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
    VocabularyError,
)
from scx_ref.keys import KeySchedule, KeyStream
from scx_ref.protocol import CalibrationPool, Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.decoys import GaussianDecoys, default_public_tokens
from scx_ref.protocol.prepare import BackgroundJob
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))


@pytest.fixture(scope="module")
def setup() -> tuple[Any, NumpyBackend, CalibrationPool]:
    w = tiny_weights(1)
    b = NumpyBackend(w)
    return w, b, CalibrationPool.from_tokens(b, default_public_tokens(w.config.vocab_size, 40))


def _client(b: NumpyBackend, decoys: Any, **cfg: Any) -> Client[Any]:
    return Client(
        b,
        KeySchedule(MASTER, NONCE),
        SCXConfig(**{"level": "permute", "r1": 3, "r2": 2, **cfg}),
        decoys=decoys,
    )


def _stream() -> KeyStream:
    return KeySchedule(MASTER, NONCE).stream(("audit-s66",))


@pytest.mark.parametrize(("vocab", "length"), [(0, 8), (32, -1), (32, 2.5), ("a", 8), (True, 8)])
def test_default_public_tokens_refuses_bad_sizes(vocab: Any, length: Any) -> None:
    """Was numpy's ValueError/TypeError ("high <= 0", "negative dimensions are not allowed")."""
    with pytest.raises(ConfigError):
        default_public_tokens(vocab, length)


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_from_tokens_refuses_a_bad_window(setup: Any, window: Any) -> None:
    """window 0 was range()'s ValueError, 2.5 a TypeError, -3 a misleading 'not finite' ConfigError."""
    w, b, _ = setup
    with pytest.raises(ConfigError, match="window"):
        CalibrationPool.from_tokens(b, default_public_tokens(w.config.vocab_size, 8), window)


def test_from_tokens_checks_its_ids_as_the_client_does(setup: Any) -> None:
    """Float ids were truncated silently (0.7 → token 0), a string a raw ValueError, an empty text a
    ConfigError saying the model's arithmetic was not finite."""
    _, b, _ = setup
    with pytest.raises(VocabularyError):
        CalibrationPool.from_tokens(b, np.arange(8) + 0.7)  # type: ignore[arg-type]
    with pytest.raises(VocabularyError):
        CalibrationPool.from_tokens(b, "hello")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="no token ids"):
        CalibrationPool.from_tokens(b, np.zeros(0, np.int64))


@pytest.mark.parametrize(
    ("rows", "error"),
    [
        ([np.ones((3, 16))], ConfigError),  # not a mapping
        ({("qkv", 0): np.ones((3, 16))}, ConfigError),  # a key that is not (Stage, layer)
        ({(Stage.QKV, 0.5): np.ones((3, 16))}, ConfigError),
        ({(Stage.QKV, 0): np.ones(16)}, ShapeError),
        ({(Stage.QKV, 0): np.full((3, 16), "x")}, DTypeError),
        ({(Stage.QKV, 0): np.where(np.eye(3, 16) > 0, np.nan, 1.0)}, NonFiniteError),
    ],
)
def test_a_calibration_pool_is_checked_when_built(rows: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        CalibrationPool(rows)


def test_a_pool_given_as_lists_draws_arrays() -> None:
    """Rows given as nested lists: draw raised AttributeError ('list' object has no attribute 'shape')."""
    pool = CalibrationPool({(Stage.QKV, 0): [[float(i)] * 4 for i in range(5)]})  # type: ignore[dict-item]
    got = pool.draw(Stage.QKV, 0, 5, np.zeros((0, 4)), _stream())
    assert got.shape == (5, 4) and sorted(got[:, 0].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_nan_decoy_row_is_the_clients_error_not_the_servers(setup: Any) -> None:
    """A NaN row of the client's own decoy policy was reported as the server's fault (IntegrityError
    'attn: o and decoys holds NaN or Inf') after the server had answered it honestly."""
    _, b, good = setup

    class NanO:
        needs_real = False

        def draw(self, stage: Stage, layer: int, count: int, real: Any, stream: KeyStream) -> Any:
            rows = good.draw(stage, layer, count, real, stream)
            return np.full_like(rows, np.nan) if stage is Stage.O else rows

    client = _client(b, NanO())
    with pytest.raises(NonFiniteError, match="decoy policy") as got:
        client.prefill(np.arange(5), LocalTransport(Server(b)))
    assert not isinstance(got.value, IntegrityError)
    assert client.state is not None and client.state.failed


@pytest.mark.parametrize("ahead", [False, True])
def test_a_pool_of_another_width_is_a_shape_error(setup: Any, ahead: bool) -> None:
    """A pool built for another model's width raised numpy's 'cannot reshape array' ValueError."""
    _, b, good = setup
    client = _client(b, CalibrationPool({k: v[:, :-1] for k, v in good.rows.items()}))
    with pytest.raises(ShapeError, match="must be 3 × 16"):
        if ahead:
            client.precompute(5)
        else:
            client.prefill(np.arange(5), LocalTransport(Server(b)))


def test_zero_decoys_need_no_pool_rows(setup: Any) -> None:
    """r₂ = 0 with a pool that has no O-stage rows (none are needed) was refused with ConfigError."""
    w, b, good = setup
    rows = {k: v for k, v in good.rows.items() if k[0] is not Stage.O}
    client = _client(b, CalibrationPool(rows), r2=0)
    ids = np.arange(5)
    got = client.prefill(ids, LocalTransport(Server(b)))
    want, _ = ReferenceModel(w).prefill(ids)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)  # float64: rounding only


def test_gaussian_decoys_take_array_likes_and_refuse_text() -> None:
    """Real rows given as a list raised AttributeError ('list' object has no attribute 'shape')."""
    g = GaussianDecoys()
    assert g.draw(Stage.QKV, 0, 3, [[1.0, 2.0], [3.0, 5.0]], _stream()).shape == (3, 2)  # type: ignore[arg-type]
    with pytest.raises(DTypeError):
        g.draw(Stage.QKV, 0, 3, np.full((2, 2), "x"), _stream())


def test_two_threads_waiting_on_a_job_both_wait_for_it() -> None:
    """wait() popped the thread it joined: a second waiter found the list empty and returned at once,
    while the work still ran (its error then went to the first waiter alone)."""
    job = BackgroundJob()
    release = threading.Event()
    job.start(release.wait, "audit-s66-work")
    first = threading.Thread(target=job.wait)
    first.start()
    first.join(0.2)  # the first waiter is now joining the job's thread (it never ends before release)
    second_done = threading.Event()

    def second() -> None:
        job.wait()
        second_done.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    try:
        assert not second_done.wait(0.5), "the second wait returned while the job still ran"
    finally:
        release.set()
        first.join(5)
        waiter.join(5)
    assert second_done.is_set() and not first.is_alive()


class _GatedDecoys(GaussianDecoys):
    """Gaussian decoys whose first draw waits for ``gate``; counts its draws."""

    needs_real = False

    def __init__(self) -> None:
        self.gate, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def draw(self, stage: Stage, layer: int, count: int, real: Any, stream: KeyStream) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.gate.wait(30.0)
        return np.zeros((count, np.shape(real)[1]))


@pytest.mark.parametrize("replaced", [True, False])
def test_a_replaced_background_precompute_stops_instead_of_running_on(replaced: bool) -> None:
    """A background precompute the client replaced (another precompute, or a prefill of another length)
    ran to its end beside the request that replaced it, taking CPU; it now stops at its next step, and
    the request is exact. Control (``replaced`` False): the same derivation left alone draws every row."""
    w = tiny_weights(1)
    backend = NumpyBackend(w)
    policy = _GatedDecoys()
    client = Client(backend, KeySchedule.generate(), SCXConfig(level="permute", max_length=32), decoys=policy)
    old = client.precompute(5, background=True)
    assert policy.entered.wait(30.0)  # the background thread is inside its first draw
    if replaced:
        client.precompute(6)  # replaces it (a foreground derivation: its own draws count too)
    policy.gate.set()
    old.wait()
    counting = _GatedDecoys()
    counting.gate.set()
    Client(
        backend, KeySchedule.generate(), SCXConfig(level="permute", max_length=32), decoys=counting
    ).precompute(5)
    full = counting.calls  # every stage's decoys, block by block
    assert full > 2
    if replaced:
        assert policy.calls == 1 + full  # the old one's first draw, then the new one's every draw
        ids = np.array([3, 1, 4, 1, 5, 9])
        logits = client.prefill(ids, LocalTransport(Server(backend)))
        np.testing.assert_allclose(logits, ReferenceModel(w).prefill(ids)[0], atol=1e-9)
    else:
        assert policy.calls == full

"""The client's public API as a state machine (``Client``, ``precompute``, ``MaskPool``, ``SCXConfig``,
presets, ``ReleasePlan``, ``SketchCache``, cost reports): every call out of order, with an argument of
the wrong kind, or from a second thread is refused with a project error *before* it changes anything —
no claimed nonce, no failed session, no consumed mask — and the client stays usable for the next call.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, ProtocolError, SCXError, VocabularyError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.protocol.pool import MaskPool
from scx_ref.protocol.presets import PRESETS, preset
from scx_ref.protocol.verify import SketchCache
from scx_ref.reference import ReferenceModel
from tests.refusals import refused

from .tiny import TINY, tiny_weights

W = tiny_weights(0)
PROMPT = np.array([3, 1, 4, 1, 5])
BACKENDS = ("numpy", "torch")


def _backend(name: str) -> Any:
    return NumpyBackend(W) if name == "numpy" else TorchBackend(W, torch.float64)


def _setup(backend: str = "numpy", **cfg: Any) -> tuple[Server[Any], LocalTransport, Client[Any]]:
    b = _backend(backend)
    server: Server[Any] = Server(b)
    return server, LocalTransport(server), Client(b, KeySchedule.generate(), SCXConfig(**cfg))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_link_that_is_not_a_transport_is_refused_before_anything_changes(backend: str) -> None:
    """``prefill``/``generate``/``decode``/``share_keys``/``close`` with a non-transport link: ProtocolError,
    and nothing changed — no nonce claimed, no session failed (before: an AttributeError raised from
    inside ``_send`` after the nonce was claimed, and the open session marked failed)."""
    _, link, client = _setup(backend, l_s=1, l_e=1)
    reserved = client._next_nonce
    for bad in (None, object(), "scx://127.0.0.1:8470"):
        with pytest.raises(ProtocolError, match="link must be a Transport"):
            client.prefill(PROMPT, bad)  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match="link must be a Transport"):
            client.generate(PROMPT, 2, bad)  # type: ignore[arg-type]
    assert client.state is None and client._next_nonce == reserved
    assert reserved is not None and not client._master_keys.claims.claimed(reserved)
    logits = client.prefill(PROMPT, link)
    st = client.state
    assert st is not None
    seq = st.seq
    not_links: tuple[Any, ...] = (None, object())
    for bad in not_links:
        with pytest.raises(ProtocolError, match="link must be a Transport"):
            client.decode(1, bad)
        with pytest.raises(ProtocolError, match="link must be a Transport"):
            client.share_keys(bad)
    with pytest.raises(ProtocolError, match="link must be a Transport"):
        client.close(not_links[1])  # None is the session's own link
    assert (st.failed, st.closed, st.seq, st.step, st.shared) == (False, False, seq, 0, False)
    # the session goes on exactly as plaintext decoding
    ref = ReferenceModel(W)
    nxt = int(np.argmax(logits[-1]))
    got = int(np.argmax(client.decode(nxt, link)))
    assert [nxt, got] == ref.generate(PROMPT, 2)
    client.close()
    assert st.closed


def test_arguments_of_the_wrong_kind_to_the_client_are_project_errors() -> None:
    b, keys = NumpyBackend(W), KeySchedule.generate
    with pytest.raises(ProtocolError, match="backend must be a Backend"):
        Client(None, keys())  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="decoys must be a DecoyPolicy"):
        Client(b, keys(), decoys=5)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="sketches must be a SketchCache"):
        Client(b, keys(), sketches=5)  # type: ignore[arg-type]
    with pytest.raises(VocabularyError):
        Client(b, keys(), public_tokens="abc")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="no token ids"):  # before: accepted, every prefill failing later
        Client(b, keys(), public_tokens=np.array([], dtype=np.int64))
    _, link, client = _setup()
    with refused(ProtocolError, "link must be a Transport with a CostMeter meter, got NoneType"):
        client.cost_report(None)  # type: ignore[arg-type]
    with refused(ProtocolError, "link must be a Transport with a CostMeter meter, got object"):
        client.cost_report(object())  # type: ignore[arg-type]
    with refused(ProtocolError, "server_meter must be a CostMeter or None, not int"):
        client.cost_report(link, 5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n": "3"}, "n must be an integer"),
        ({"n": 2.5}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"n": None}, "n must be an integer"),
        ({"n": 3, "steps": -1}, "steps must be >= 0"),
        ({"n": 3, "steps": 1.0}, "steps must be an integer"),
        ({"n": 3, "steps": True}, "steps must be an integer"),
        ({"n": 3, "steps": 30}, "exceed max_length"),
    ],
)
def test_precompute_refuses_a_bad_length_before_reserving_anything(kw: dict[str, Any], match: str) -> None:
    """Before: TypeError for a str/None n, KeyScheduleError about a 'permutation size' for a float or bool
    n, TypeError for a float steps, and any number of steps past max_length derived."""
    _, link, client = _setup()
    reserved = client._next_nonce
    with pytest.raises(ProtocolError, match=match):
        client.precompute(**kw)
    assert client._prepared is None and client._next_nonce == reserved
    prep = client.precompute(np.int64(3), steps=np.int64(2))  # numpy integers are integers
    assert prep.n == 3 and client._prepared is prep
    assert client.generate(PROMPT[:3], 3, link) == ReferenceModel(W).generate(PROMPT[:3], 3)


class _Gate(LocalTransport):
    """A transport whose first ``open`` waits until released, so a second thread can call in meanwhile."""

    def __init__(self, server: Server[Any]) -> None:
        super().__init__(server)
        self.inside = threading.Event()
        self.release = threading.Event()

    def send(self, request: Request) -> Reply:
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(30)
        return super().send(request)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_from_a_second_thread_is_refused_while_one_runs(backend: str) -> None:
    """Two threads on one client: the second call is refused (ProtocolError) and the first finishes with
    plaintext's tokens. Before, both ran interleaved on the shared session state: the server saw one
    session's messages out of order and both requests failed with unrelated-looking errors."""
    b = _backend(backend)
    server: Server[Any] = Server(b)
    link = _Gate(server)
    client = Client(b, KeySchedule.generate(), SCXConfig())
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(client.generate(PROMPT, 3, link)))
    worker.start()
    try:
        assert link.inside.wait(30)
        for call in (
            lambda: client.prefill(PROMPT, link),
            lambda: client.generate(PROMPT, 2, link),
            lambda: client.decode(1, link),
            lambda: client.share_keys(link),
            lambda: client.close(),
            lambda: client.precompute(4),
        ):
            with pytest.raises(ProtocolError, match="in use by another thread"):
                call()
    finally:
        link.release.set()
        worker.join(60)
    assert result == [ReferenceModel(W).generate(PROMPT, 3)]
    assert client.generate(PROMPT, 2, link) == ReferenceModel(W).generate(PROMPT, 2)  # free again


def test_cost_report_of_a_session_on_a_reused_link_counts_that_session_only() -> None:
    """A link that carried earlier sessions: the report is this session's (before: the link's bytes and
    round trips of every session it carried beside this session's flops)."""
    server, fresh, client = _setup()
    empty = client.cost_report(fresh).total  # no session yet: nothing
    assert all(v == 0 for v in vars(empty).values())
    client.prefill(PROMPT, fresh)
    alone = client.cost_report(fresh, server.cost(client.session)).total
    assert alone.server_flops > 0 and client.cost_report(fresh).total.server_flops == 0  # the server's merged
    server2, reused, client2 = _setup()
    client2.generate(PROMPT, 3, reused)  # an earlier session on the same link
    client2.prefill(PROMPT, reused)
    again = client2.cost_report(reused, server2.cost(client2.session)).total
    assert vars(again) == vars(alone)
    assert all(v >= 0 for v in vars(again).values()) and again.round_trips > 0


def test_a_failed_request_consumes_its_pool_entry() -> None:
    """A request whose transport fails at ``open``: its one-time masks are never used again (its nonce is
    claimed, the entry gone); the next prefill takes the next entry and matches plaintext."""
    server, link, client = _setup(level="blind")
    pool = MaskPool(client, 8, steps=2)
    pool.fill(2)
    first = pool._entries[0].nonce

    class Down(LocalTransport):
        def send(self, request: Request) -> Reply:
            raise ConnectionError("network down")

    with pytest.raises(ConnectionError):
        client.prefill(PROMPT, Down(server))
    assert len(pool) == 1 and client._master_keys.claims.claimed(first) and client._prepared is None
    assert client.generate(PROMPT, 3, link) == ReferenceModel(W).generate(PROMPT, 3)
    st = client.state
    assert st is not None and st.keys.schedule.nonce not in (first,) and len(pool) == 0


def test_scx_config_takes_numpy_numbers_and_keeps_its_own_stage_beta() -> None:
    """Integers and β of numpy types are the numbers they hold (before: ``r1=np.int64(2)`` was refused as
    'not an integer' while ``beta=np.float64`` passed and ``np.float32`` did not); ``stage_beta`` is
    copied, so a later change to the caller's dict does not reach the checked configuration."""
    cfg = SCXConfig(
        r1=np.int64(2), r2=np.int32(3), l_s=np.int64(1), max_length=np.int64(16), beta=np.float32(1)
    )
    assert cfg == SCXConfig(r1=2, r2=3, l_s=1, max_length=16, beta=1.0)
    assert type(cfg.r1) is int and type(cfg.max_length) is int and type(cfg.beta) is float
    given = {"qkv": np.float32(2.0)}
    cfg = SCXConfig(stage_beta=given)
    given["qkv"] = np.float32("nan")
    assert cfg.stage_beta == {"qkv": 2.0} and cfg.beta_for("qkv") == 2.0
    _, link, client = _setup(r1=np.int64(3), r2=np.int64(1))  # the open message carries plain ints
    assert client.generate(PROMPT, 2, link) == ReferenceModel(W).generate(PROMPT, 2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stage_beta": 5}, "stage_beta must be a mapping"),
        ({"stage_beta": [("qkv", 1.0)]}, "stage_beta must be a mapping"),
        ({"stage_beta": {1: 1.0, "foo": 2.0}}, r"unknown stage_beta kind\(s\) \['foo', 1\]"),
        ({"r1": np.True_}, "r1 must be an integer"),
        ({"beta": np.bool_(False)}, "beta must be a real number, got bool"),
        ({"beta": np.float64("inf")}, r"beta must be finite and in \[0, 1e\+100\], got np.float64\(inf\)"),
    ],
)
def test_scx_config_refuses_a_bad_value_naming_the_field(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SCXConfig(**kw)


def test_presets_and_plans_refuse_what_is_not_a_model_or_config() -> None:
    for bad in ("4", True, 2.5, None):
        with pytest.raises(ConfigError, match="n_layers"):
            preset("paper").config(bad)  # type: ignore[arg-type]
    assert [p.config(np.int64(4)) for p in PRESETS] == [p.config(4) for p in PRESETS]
    with pytest.raises(ConfigError, match="config must be an SCXConfig"):
        ReleasePlan.of(None, ModelConfig(**TINY))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="model must be a ModelConfig"):
        ReleasePlan.of(SCXConfig(), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("basis", [0, -1, True, 2.5, "a", None])
def test_a_sketch_cache_without_a_basis_vector_is_refused(basis: Any) -> None:
    """``basis=0`` gave check vectors r = 0, so every Freivalds check passed whatever the server sent;
    the other values raised numpy or Python errors."""
    with pytest.raises(ProtocolError, match="basis must"):
        SketchCache(NumpyBackend(W), KeySchedule.generate(), basis)
    with pytest.raises(ProtocolError, match="keys must be a KeySchedule"):
        SketchCache(NumpyBackend(W), None)  # type: ignore[arg-type]


def test_calls_out_of_order_are_refused_and_the_client_recovers() -> None:
    """The documented lifecycle: no session → ProtocolError (close is a no-op); after close, after a
    finished generate, or past max_length → ProtocolError with the session unchanged; a new prefill
    always works."""
    _, link, client = _setup(max_length=7)
    for call in (lambda: client.decode(1, link), lambda: client.share_keys(link), lambda: client.session):
        with pytest.raises(ProtocolError, match="no session"):
            call()
    client.close()
    assert client.generate(PROMPT, 0, link) == [] and client.state is None
    assert client.generate(PROMPT, 1, link) == ReferenceModel(W).generate(PROMPT, 1)
    with pytest.raises(ProtocolError, match="closed"):
        client.decode(1, link)
    client.prefill(PROMPT, link)
    client.decode(1, link)
    client.decode(1, link)
    st = client.state
    assert st is not None
    with pytest.raises(ProtocolError, match="past the configured maximum length"):
        client.decode(1, link)
    assert (st.step, st.failed, st.closed) == (2, False, False)
    with pytest.raises(SCXError):
        client.generate(PROMPT, 4, link)  # 5 + 4 − 1 positions > 7, refused before anything is sent
    assert client.state is st

"""A model whose own arithmetic is not finite on some input (an embedding row of zeros at rms_eps = 0:
RMSNorm's 0/0) is the model's failure, not the server's: the client says so (NonFiniteError), prompts
that avoid that input run exactly as plaintext (the decoy pool keeps no such token), and a prefill or
decode step cut short after a message went leaves the session failed rather than half-run."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from scx_ref import KeySchedule
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, IntegrityError, NonFiniteError, ProtocolError, VocabularyError
from scx_ref.protocol import CalibrationPool, Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

ZERO = 3  # the token whose embedding row is zeroed


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # numpy's 0/0 warnings, from the server's and the reference's norms
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _weights(moe: bool = False) -> Any:
    w = tiny_weights(0, moe=moe, rms_eps=0.0)
    w.embed[ZERO] = 0.0
    return w


def _client(w: Any, level: str, **cfg: Any) -> tuple[Client[Any], LocalTransport]:
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    return Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level=level, r1=3, r2=3, **cfg)), link


@pytest.mark.parametrize("level", ["permute", "paper", "blind"])
def test_prompts_without_the_zero_row_are_exactly_plaintext(level: str) -> None:
    # before: the calibration pool held the zero row (finite) and the NaN rows after it, so decoys made
    # every request fail with IntegrityError, whatever its prompt
    w = _weights()
    client, link = _client(w, level)
    for prompt in ([5, 4, 7], [1, 2, 5, 6, 7, 8, 9, 10]):
        ids = np.array(prompt)
        got = client.prefill(ids, link)
        want, _ = ReferenceModel(w).prefill(ids)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)  # float64: rounding only
        assert client.generate(ids, 3, link) == ReferenceModel(w).generate(ids, 3)


def test_the_pool_drops_every_token_whose_plaintext_pass_is_not_finite() -> None:
    w = _weights()
    ids = np.array([1, 2, ZERO, 5, 6, 7, 1, 2])
    pool = CalibrationPool.from_tokens(NumpyBackend(w), ids, window=4)
    # the zero token is left out before the text runs: run, it turns its whole window NaN (softmax's 0
    # weight times its NaN value row is NaN, for the rows before it too), as plaintext does
    with np.errstate(all="ignore"):
        assert np.isnan(ReferenceModel(w).forward(ids[:4])[0]).all(axis=1).all()
    for key, table in pool.rows.items():
        assert table.shape[0] == 7, key
        assert np.isfinite(table).all(), key
    q0 = pool.rows[(Stage.QKV, 0)]
    assert not (q0 == 0.0).all(axis=1).any()  # the zero row, finite itself, is gone too
    np.testing.assert_array_equal(q0, w.embed[[1, 2, 5, 6, 7, 1, 2]])
    with pytest.raises(ConfigError, match=r"every\s+token of the calibration text"):
        CalibrationPool.from_tokens(NumpyBackend(w), np.array([ZERO, ZERO]), window=4)


def test_a_window_whose_pass_is_not_finite_otherwise_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # the second filter: a window whose logits come out NaN for another cause (here a runner that says
    # so for any window holding token 9) loses its tokens at every stage; the other windows stay
    from scx_ref.protocol import decoys

    class Runner(decoys.PlainRunner):  # type: ignore[misc]
        def forward(self, ids: Any, last_only: bool = False) -> Any:
            out = super().forward(ids, last_only)
            return out * np.nan if 9 in np.asarray(ids).tolist() else out

    monkeypatch.setattr(decoys, "PlainRunner", Runner)
    w = tiny_weights(0)
    pool = CalibrationPool.from_tokens(NumpyBackend(w), np.array([1, 9, 2, 4, 5, 6, 7]), window=3)
    for key, table in pool.rows.items():
        assert table.shape[0] == 4, key
    np.testing.assert_array_equal(pool.rows[(Stage.QKV, 0)], w.embed[[4, 5, 6, 7]])
    with pytest.raises(ConfigError, match="every"):
        CalibrationPool.from_tokens(NumpyBackend(w), np.array([1, 9, 2]), window=3)


@pytest.mark.parametrize("level", ["permute", "paper", "blind"])
def test_a_prompt_the_model_cannot_run_is_a_nonfinite_error_and_fails_the_session(level: str) -> None:
    # before: level permute blamed the server (IntegrityError "the wqkv product is not finite"), and
    # levels paper/blind left the half-run session open, so a decode went to the server
    w = _weights()
    client, link = _client(w, level)
    with pytest.raises(NonFiniteError, match="qkv of block 0") as err:
        client.prefill(np.array([5, ZERO, 7]), link)
    assert not isinstance(err.value, IntegrityError)
    assert client.state is not None and client.state.failed
    before = len(link.view.messages)
    assert before > 0
    with pytest.raises(ProtocolError, match="failed on an earlier error"):
        client.decode(4, link)
    assert len(link.view.messages) == before  # refused here: nothing went to the server
    ids = np.array([5, 4, 7])  # the client goes on with a new session
    assert client.generate(ids, 2, link) == ReferenceModel(w).generate(ids, 2)


class _NaNReply:
    """A server that answers one stage with a NaN in its reply's first array."""

    def __init__(self, server: Server[Any], stage: Stage) -> None:
        self.server, self.stage = server, stage

    def handle(self, req: Request) -> Reply:
        reply = self.server.handle(req)
        if req.stage is self.stage and req.layer == 1:
            name = next(iter(reply.arrays))
            arr = np.array(reply.arrays[name], copy=True)
            arr.reshape(-1)[0] = np.nan
            reply.arrays[name] = arr
        return reply


@pytest.mark.parametrize("stage", [Stage.QKV, Stage.FFN])
def test_a_nan_reply_for_finite_rows_is_still_the_servers_fault(stage: Stage) -> None:
    # the new check reads the client's own rows only: a server cannot make its own NaN look like the model's
    w = _weights()
    server = Server(NumpyBackend(w))
    link = LocalTransport(_NaNReply(server, stage))  # type: ignore[arg-type]
    client = Client(NumpyBackend(w), KeySchedule.generate(), SCXConfig(level="permute", r1=2, r2=2))
    with pytest.raises(IntegrityError):
        client.prefill(np.array([5, 4, 7]), link)


@pytest.mark.parametrize("moe", [False, True])
def test_the_mlp_check_traces_a_nan_verdict_to_the_clients_own_norm(moe: bool) -> None:
    # an FFN stage's rows the client sent with a zero row at rms_eps = 0: the honest reply is NaN, and the
    # verifier says the model's arithmetic (dense: the fused gate/up verdict; MoE: the client's own norm)
    w = _weights(moe)
    client, link = _client(w, "permute")
    client.prefill(np.array([5, 4, 7]), link)
    v = client.state.verifier if client.state is not None else None
    assert v is not None
    x = np.array(w.embed[[1, 2, 5]], dtype=np.float64)
    x[1] = 0.0
    reply = _mlp_reply(NumpyBackend(w), x, moe)
    with pytest.raises(NonFiniteError, match="mlp RMSNorm"):
        v.mlp(Stage.FFN, 1, x, reply, 2.0**-53)
    x[1] = w.embed[4]  # the same reply for finite rows: the server's NaN
    with pytest.raises(IntegrityError):
        v.mlp(Stage.FFN, 1, x, reply, 2.0**-53)


def _mlp_reply(b: NumpyBackend, x: Any, moe: bool) -> dict[str, Any]:
    """A traced MLP reply's arrays for rows ``x``, NaN where the norm is (what an honest server sends)."""
    c = b.config
    rows = x.shape[0]
    y = np.full((rows, c.hidden_size), np.nan)
    if not moe:
        return {"y": y, "gu": np.full((rows, 2 * c.intermediate_size), np.nan)}
    return {
        "y": y,
        "router": np.full((rows, c.n_experts), np.nan),
        "gu": np.full((rows, c.top_k, 2 * c.intermediate_size), np.nan),
    }


def test_a_decode_step_cut_short_after_a_send_fails_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    # before: an error (or ^C) raised by the client between two messages of a step left the session open
    # with the server's step half-run; the next decode then resent the step
    w = tiny_weights(0)
    client, link = _client(w, "paper")
    ids = np.array([5, 4, 7])
    logits = client.prefill(ids, link)
    with pytest.raises(VocabularyError):  # refused before anything is sent
        client.decode(10_000, link)
    assert client.state is not None and not client.state.failed
    first = int(np.argmax(logits[-1]))
    out = client.decode(first, link)  # the session goes on
    monkeypatch.setattr(client, "_gen_last", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    sent = len(link.view.messages)
    with pytest.raises(KeyboardInterrupt):
        client.decode(int(np.argmax(out)), link)
    assert len(link.view.messages) > sent  # the step's first messages went
    assert client.state.failed
    monkeypatch.undo()
    with pytest.raises(ProtocolError, match="failed on an earlier error"):
        client.decode(int(np.argmax(out)), link)

"""The protocol's parts (messages, keyring, decoys, mlp, cost, transport) and the ArrayOps layer:
bad input gives a project error (SCXError) before anything changes, calibration decoys do not repeat a
row within one message, and the in-process transport meters the bytes the wire would carry."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.arrays import NumpyOps
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, NonFiniteError, ProtocolError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import CalibrationPool, Client, GaussianDecoys, LocalTransport, SCXConfig, Server
from scx_ref.protocol.cost import CostMeter
from scx_ref.protocol.keyring import RequestKeys, commitment
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.mlp import route, traced_mlp
from scx_ref.stages import Stage
from tests.tiny import tiny_config, tiny_weights


def _keys(tag: int = 0) -> KeySchedule:
    return KeySchedule(bytes([1 + tag]) * 32, bytes([7]) * 16)


# -- mlp.route ----------------------------------------------------------------------------------------
LOGITS = np.random.default_rng(0).normal(size=(3, 4))


@pytest.mark.parametrize("top_k", [0, -1, 5, 2.0, True])
def test_route_refuses_a_top_k_outside_one_to_experts(top_k: Any) -> None:
    """top_k = −1 used to return E − 1 experts, top_k > E only E, top_k = 0 none: never k experts."""
    with pytest.raises(ConfigError, match="top_k"):
        route(LOGITS, top_k)


@pytest.mark.parametrize("logits", [LOGITS[0], LOGITS[:, :0], np.zeros((2, 3, 4))])
def test_route_refuses_logits_that_are_not_rows_by_experts(logits: Any) -> None:
    with pytest.raises(ShapeError, match="router logits"):
        route(logits, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_route_refuses_non_finite_logits(bad: float) -> None:
    logits = LOGITS.copy()
    logits[1, 2] = bad
    with pytest.raises(NonFiniteError, match="router logits"):
        route(logits, 2)


def test_route_with_every_expert_is_the_sorted_softmax() -> None:
    """top_k = E: every expert, in descending probability, weights the full softmax (sums to 1)."""
    top, weights = route(LOGITS, 4)
    probs = np.exp(LOGITS - LOGITS.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(top, np.argsort(-probs, axis=1, kind="stable"))
    np.testing.assert_allclose(weights, np.take_along_axis(probs, top, axis=1), rtol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("top_k", [1, 4])
def test_traced_mlp_matches_the_backend_mlp_at_the_top_k_extremes(top_k: int) -> None:
    """traced_mlp's stated identity (y = b.mlp(x)) on a tiny MoE with top_k = 1 and top_k = n_experts."""
    b = NumpyBackend(tiny_weights(3, moe=True, top_k=top_k))
    x = np.random.default_rng(1).normal(size=(5, 16))
    y, parts = traced_mlp(b, x, 1)
    np.testing.assert_allclose(y, b.mlp(x, 1), rtol=1e-10, atol=1e-12)
    assert parts["gu"].shape == (5, top_k, 2 * 24)


# -- decoys ---------------------------------------------------------------------------------------------
def _pool(rows: int) -> CalibrationPool:
    return CalibrationPool({(Stage.FFN, 1): np.arange(rows, dtype=np.float64)[:, None] * np.ones((1, 3))})


def test_calibration_decoys_are_distinct_rows_of_the_pool() -> None:
    """Drawn with replacement, 5 decoys from a 5-row pool repeated a row 96% of the time."""
    pool = _pool(5)
    for t in range(30):
        rows = pool.draw(Stage.FFN, 1, 5, np.zeros((0, 3)), _keys().stream(("decoy", t)))
        assert sorted(rows[:, 0].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_calibration_decoys_beyond_the_pool_take_every_row_before_any_twice() -> None:
    rows = _pool(4).draw(Stage.FFN, 1, 10, np.zeros((0, 3)), _keys().stream(("decoy",)))[:, 0]
    assert sorted(rows[:4].tolist()) == sorted(rows[4:8].tolist()) == [0.0, 1.0, 2.0, 3.0]
    assert len(set(rows[8:].tolist())) == 2


def test_calibration_decoys_are_uniform_over_ordered_pairs() -> None:
    counts: dict[tuple[float, ...], int] = {}
    pool = _pool(3)
    for t in range(1200):
        pair = tuple(pool.draw(Stage.FFN, 1, 2, np.zeros((0, 3)), _keys().stream(("u", t)))[:, 0].tolist())
        counts[pair] = counts.get(pair, 0) + 1
    assert len(counts) == 6 and all(150 <= c <= 250 for c in counts.values())  # 200 each; ±7σ


def test_no_message_past_block_one_repeats_a_row() -> None:
    """End to end (permute level, 16 decoys per stage from the default 256-row pool): a row repeated within
    one message past block 1's QKV stage is a decoy for certain; before the fix most runs showed one."""
    w = tiny_weights(0)
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    client = Client(NumpyBackend(w), _keys(), SCXConfig(level="permute", r1=16, r2=16))
    client.prefill(np.array([3, 1, 4, 1, 5, 9, 2, 6]), link)
    checked = 0
    for m in link.view.messages:
        if m.stage in (Stage.QKV, Stage.O, Stage.FFN, Stage.HEAD) and "x" in m.arrays:
            if m.stage is Stage.QKV and m.layer == 0:
                continue  # block 1's real rows are vocabulary rows: a repeated token repeats its row
            x = m.arrays["x"]
            assert np.unique(x, axis=0).shape[0] == x.shape[0], (m.stage, m.layer)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("count", [-1, 2.5, "2", None])
def test_decoy_policies_refuse_a_bad_count(count: Any) -> None:
    real = np.ones((2, 3))
    for policy in (_pool(4), GaussianDecoys()):
        with pytest.raises(ConfigError, match="decoy count"):
            policy.draw(Stage.FFN, 1, count, real, _keys().stream(("d",)))


@pytest.mark.parametrize("real", [np.zeros((0, 3)), np.ones(3)])
def test_gaussian_decoys_need_real_rows(real: Any) -> None:
    with pytest.raises(ShapeError, match="real rows"):
        GaussianDecoys().draw(Stage.FFN, 1, 2, real, _keys().stream(("d",)))


@pytest.mark.parametrize("size", [1.0, 1e155, 1e-300])
def test_gaussian_decoys_match_the_rows_moments_without_overflow(size: float) -> None:
    """Rows of ~1e155 (finite in float64, their squares not) gave an infinite std, so the decoys were
    refused as non-finite although the model's rows were finite, and rows of ~1e-300 a zero one; the
    moments are numpy's where its squares stay in range."""
    real = np.random.default_rng(0).standard_normal((64, 5)) * size
    real[:, 4] = 0.0  # a column of zeros: std 0, the decoys equal to its mean
    mean, std = real.mean(axis=0), (real / size).std(axis=0) * size  # numpy's, computed where it holds
    draws = GaussianDecoys().draw(Stage.FFN, 1, 20000, real, _keys().stream(("d",)))
    assert np.isfinite(draws).all() and (draws[:, 4] == 0.0).all()
    unit = draws / size  # the draws' moments, measured in units that neither overflow nor underflow
    np.testing.assert_allclose(unit.mean(axis=0)[:4], mean[:4] / size, atol=0.05 * (std[:4] / size).max())
    np.testing.assert_allclose(unit.std(axis=0)[:4], std[:4] / size, rtol=0.05)


# -- keyring --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [-1, 2**32, 1.0])
def test_commitment_refuses_a_layer_outside_its_field(layer: Any) -> None:
    with pytest.raises(ProtocolError, match="commitment layer"):
        commitment(b"s" * 32, "ab", layer, np.arange(3))


def test_commitment_refuses_a_session_that_is_not_a_string() -> None:
    with pytest.raises(ProtocolError, match="session"):
        commitment(b"s" * 32, b"ab", 1, np.arange(3))  # type: ignore[arg-type]


def test_verify_rows_refuses_a_negative_count() -> None:
    """count −1 used to return rows − 1 rows (a slice from the end), not min(count, rows)."""
    keys = RequestKeys(_keys(), tiny_config())
    assert keys.verify_rows(0, 10, 0).shape == (0,)
    assert keys.verify_rows(0, 10, 20).tolist() == list(range(10))
    with pytest.raises(ConfigError, match="verified row count"):
        keys.verify_rows(0, 10, -1)


# -- cost meter and transport ---------------------------------------------------------------------------
def test_meter_refuses_bad_byte_counts_and_sides_with_project_errors() -> None:
    meter = CostMeter()
    with pytest.raises(ConfigError, match="bytes up"):
        meter.message(Stage.QKV, 1.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bytes down"):
        meter.message(Stage.QKV, 1, -2)
    with pytest.raises(ConfigError, match="side"):
        meter.matmul(Stage.QKV, 1, 2, 3, "sever")  # type: ignore[arg-type]
    assert meter.snapshot() == {}  # nothing counted


class _Echo:
    def handle(self, request: Request) -> Reply:
        return Reply(request.session, request.stage, request.layer, request.step, request.seq, request.arrays)


def test_local_transport_meters_the_wire_bytes() -> None:
    """Each array counts as scx_ref.service.codec.to_wire_array sends it: float64 8 bytes, narrower floats 4
    (bf16/fp16 widen to float32), integers 8 (int64); a bf16 session used to meter half its bytes."""
    torch = pytest.importorskip("torch")
    from scx_ref.service.codec import to_wire_array

    arrays = {
        "x": torch.ones((3, 5), dtype=torch.bfloat16),
        "h": np.ones((2, 2), dtype=np.float16),
        "f": np.ones((2, 3), dtype=np.float32),
        "d": np.ones((4,), dtype=np.float64),
        "perm": np.arange(6, dtype=np.int32),
        "t": torch.arange(3, dtype=torch.int32),
    }
    link = LocalTransport(_Echo())
    link.send(Request("ab", Stage.QKV, 0, -1, 1, arrays))
    wire = sum(to_wire_array(a).nbytes for a in arrays.values())
    assert wire == 3 * 5 * 4 + 4 * 4 + 6 * 4 + 4 * 8 + 6 * 8 + 3 * 8
    cost = link.meter.stages[Stage.QKV]
    assert (cost.bytes_up, cost.bytes_down, cost.round_trips) == (wire, wire, 1)


# -- ArrayOps -------------------------------------------------------------------------------------------
OPS = NumpyOps()
A3 = np.ones((3, 4))


@pytest.mark.parametrize(
    "call",
    [
        lambda: OPS.take_rows(np.float64(1.0), np.arange(1)),
        lambda: OPS.take_last(np.float64(1.0), np.arange(1)),
        lambda: OPS.rows_finite(np.float64(1.0), np.arange(1)),
        lambda: OPS.rows_to_numpy(np.float64(1.0), np.arange(1)),
        lambda: OPS.take_rows_in_place(np.float64(1.0), np.arange(1)),
        lambda: OPS.add(A3, np.ones((2, 4))),
        lambda: OPS.add(A3, np.ones((2, 4)), name="x"),
        lambda: OPS.add_into(A3.copy(), np.ones((2, 4))),
        lambda: OPS.sub(A3, np.ones((2, 4))),
        lambda: OPS.linear(A3, np.ones((4, 2)), np.ones(3)),
    ],
)
def test_array_ops_refuse_bad_shapes_with_shape_error(call: Any) -> None:
    with pytest.raises(ShapeError):
        call()


def test_array_ops_still_broadcast_what_broadcasts() -> None:
    np.testing.assert_array_equal(OPS.add(A3, np.arange(4.0)), A3 + np.arange(4.0))
    np.testing.assert_array_equal(OPS.sub(A3, 2.0 * np.ones((1, 4))), -A3)
    np.testing.assert_array_equal(OPS.linear(A3, np.ones((4, 2)), np.ones(2)), np.full((3, 2), 5.0))
    x = A3.copy()
    assert OPS.add_into(x, np.ones(4)) is x and (x == 2.0).all()


def _rows_in_pool(view_messages: Any, pool: CalibrationPool) -> tuple[int, int]:
    """(rows found verbatim in ``pool``, rows) over the prefill's QKV/O/FFN/HEAD inputs past block 1's QKV
    stage (block-1 rows are vocabulary rows: every text's are in every pool)."""
    found = total = 0
    for m in view_messages:
        if m.stage not in (Stage.QKV, Stage.O, Stage.FFN, Stage.HEAD) or m.step != -1 or "x" not in m.arrays:
            continue
        p = pool.rows.get((m.stage, m.layer))
        if p is None or (m.layer == 0 and m.stage is Stage.QKV):
            continue
        x = np.asarray(m.arrays["x"])
        found += int((np.abs(x[:, None, :] - p[None, :, :]).max(-1).min(-1) < 1e-9).sum())
        total += x.shape[0]
    return found, total


def test_the_default_decoys_are_not_in_a_pool_the_server_can_rebuild() -> None:
    """The client's default calibration text is drawn by its key schedule: a server that rebuilds the pool
    from the public seed-0 text (what the client used before, stop 61) finds none of the decoys in it —
    while a client given that public text has every decoy found (the attack this closes)."""
    from scx_ref.protocol.decoys import default_public_tokens

    w = tiny_weights(0)
    public = default_public_tokens(w.config.vocab_size)
    rebuilt = CalibrationPool.from_tokens(NumpyBackend(w), public)  # the server's copy
    prompt = np.random.default_rng(1).integers(0, w.config.vocab_size, 10)
    cfg = SCXConfig(level="permute", r1=8, r2=8)
    counts = {}
    for name, tokens in (("default", None), ("public", public)):
        link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
        Client(NumpyBackend(w), KeySchedule.generate(), cfg, public_tokens=tokens).generate(prompt, 1, link)
        counts[name] = _rows_in_pool(link.view.messages, rebuilt)
    found, total = counts["public"]
    assert total and found >= total * 8 // 18  # every decoy (8 of each 18 rows)
    found, total = counts["default"]
    # none of its decoys, bar a chance match of a window's first row (a position-0 row is its token's)
    assert total and found <= total // 18

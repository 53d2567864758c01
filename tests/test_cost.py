"""The cost report (``Client.cost_report``) against closed-form counts derived here from the configs.

Conventions (scx_ref.protocol.cost): a matrix product (m×k)(k×n) costs 2mkn flops; attention costs
4·H·n_q·n_k·d_h (scores and weighted sum); the client's softmax·V of a last guard block costs
2·H·n_k·d_h; bytes are the arrays' nbytes each way (the backend's itemsize; shared permutations are
int64, the blind level's uploaded α float64; a verifying client's un-blinded MLP replies carry the MLP's
intermediates); a round trip is one message. Verification flops are metered apart (``verify_flops``).
Every stage's client flops, server flops, bytes up, bytes down and round trips must match exactly, and
so must the totals.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import given

from properties.strategies import ProtocolCase, protocol_cases
from scx_ref.backends import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, CostReport, LocalTransport, SCXConfig, Server
from scx_ref.weights import ModelWeights, random_weights

FIELDS = ("client_flops", "server_flops", "bytes_up", "bytes_down", "round_trips")
Expected = dict[str, dict[str, int]]


class Tally:
    """Closed-form cost accumulator: stage → field → count."""

    def __init__(self) -> None:
        self.s: Expected = defaultdict(lambda: dict.fromkeys(FIELDS, 0))

    def msg(self, stage: str, up: int, down: int, server: int = 0, client: int = 0, count: int = 1) -> None:
        e = self.s[stage]
        e["bytes_up"] += count * up
        e["bytes_down"] += count * down
        e["server_flops"] += count * server
        e["client_flops"] += count * client
        e["round_trips"] += count

    def client(self, stage: str, flops: int) -> None:
        self.s[stage]["client_flops"] += flops


def expected_costs(c: ModelConfig, scx: SCXConfig, n: int, steps: int, itemsize: int) -> Expected:
    """Every stage's cost for a prefill of n tokens, key sharing and ``steps`` decode steps."""
    d, q, kv, f, V, H, dh = (
        c.hidden_size,
        c.q_dim,
        c.kv_dim,
        c.intermediate_size,
        c.vocab_size,
        c.n_heads,
        c.head_dim,
    )
    E, moe = c.n_experts, c.n_experts > 0
    qkv_w = q + 2 * kv
    r1, r2, rl = scx.r1, scx.r2, (scx.r1 if scx.r_lock is None else scx.r_lock)
    L = c.n_layers
    first = set(range(min(scx.l_s, L)))
    last = set(range(max(len(first), L - scx.l_e), L))
    middle = set(range(L)) - first - last
    blind, noised_gen = scx.level == "blind", scx.level != "permute"
    it = itemsize
    t = Tally()

    def traced(rows: int) -> int:  # the MLP's intermediates a verifying client asks for (elements)
        if not scx.verify:
            return 0
        return rows * (c.top_k * 2 * f + E) if moe else rows * 2 * f

    def server_mlp(rows: int) -> int:  # the server's plain MLP / MoE on ``rows`` rows
        experts_per_row = c.top_k if moe else 1
        return 2 * rows * experts_per_row * d * 3 * f + (2 * rows * d * E if moe else 0)

    def blinded_mlp(rows: int, up: str, down: str, router: str, noised: bool) -> None:
        """Client-normalized MLP with every linear map sent blinded (one message per map and expert)."""
        k = 1 if noised else 0
        if moe:
            t.msg(router, rows * d * it, rows * E * it, 2 * rows * d * E, k * 2 * rows * d * E)
        for _ in range(E if moe else 1):
            t.msg(up, rows * d * it, rows * 2 * f * it, 2 * rows * d * 2 * f, k * 2 * rows * d * 2 * f)
            t.msg(down, rows * f * it, rows * d * it, 2 * rows * f * d, k * 2 * rows * f * d)

    # prefill (§5.1)
    R1, R2 = n + r1, n + r2
    t.msg("open", 0, 0)
    client_attn = (first | last) if scx.attention == "client" else set()
    # the first guard blocks whose step attention the server computes (the paper's gen_attn)
    server_gen = first if scx.attention == "server" and scx.gen_attention == "server" else set()
    wo_server = scx.gen_linear == "server"
    for i in range(L):
        noised_qkv = blind or (scx.level == "paper" and i == 0)
        t.msg(
            "qkv", R1 * d * it, R1 * qkv_w * it, 2 * R1 * d * qkv_w, 2 * R1 * d * qkv_w if noised_qkv else 0
        )
        if i in client_attn:  # the client's own causal attention
            t.client("attn", 4 * H * n * n * dh)
        else:
            t.msg("attn", n * qkv_w * it, n * q * it, 4 * H * n * n * dh)
        t.msg("o", R2 * q * it, R2 * d * it, 2 * R2 * q * d, 2 * R2 * q * d if blind else 0)
        if blind:
            blinded_mlp(R1, "ffn", "ffn_down", "router", True)
        else:
            t.msg("ffn", R1 * d * it, (R1 * d + traced(R1)) * it, server_mlp(R1))
    t.msg("head", R1 * d * it, R1 * V * it, 2 * R1 * d * V, 2 * R1 * d * V if blind else 0)
    for _ in last - client_attn:
        t.msg("lock", (n + rl) * kv * it, 0)
    # key sharing (§5.2): int64 permutation (+ float64 α and the server's α·W_qkv at level blind)
    for _ in middle:
        t.msg("share", R1 * 8 + (R1 * d * 8 if blind else 0), 0, 2 * R1 * d * qkv_w if blind else 0)

    # generation (§5.3)
    def wo(stage: str) -> int:  # W_o of a guard block: a blinded gen_o message, or the client's own
        if wo_server:
            t.msg("gen_o", q * it, d * it, 2 * q * d, 2 * q * d if noised_gen else 0)
            return 0
        return 2 * q * d

    for step in range(steps):
        m = n + step + 1  # cache rows after this step's token
        for i in sorted(first | client_attn):
            t.msg("gen_qkv", d * it, qkv_w * it, 2 * d * qkv_w, 2 * d * qkv_w if noised_gen else 0)
            if i not in server_gen:  # the client's own attention on the cache it holds
                t.client("gen_attn", 4 * H * m * dh + wo("gen_attn"))
            else:
                t.msg("gen_attn", (q + 2 * m * kv) * it, q * it, 4 * H * m * dh, wo("gen_attn"))
            if i in last:
                blinded_mlp(1, "gen_ffn_up", "gen_ffn_down", "gen_router", noised_gen)
            elif scx.guard_ffn == "clear":
                t.msg("gen_ffn", d * it, (d + traced(1)) * it, server_mlp(1))
            else:
                blinded_mlp(1, "gen_ffn_up", "gen_ffn_down", "gen_router", noised_gen)
        if middle:
            per_block = 2 * d * qkv_w + 4 * H * m * dh + 2 * q * d + server_mlp(1)
            t.msg("gen_mid", d * it, d * it, len(middle) * per_block)
        for _ in last - client_attn:
            locked = n + rl + step + 1
            t.msg(
                "gen_last",
                d * it,
                (H * locked + qkv_w) * it,  # the scores and z = [q k v]
                2 * d * qkv_w + 2 * H * dh * locked,
                2 * H * m * dh + wo("gen_last"),
            )
            blinded_mlp(1, "gen_ffn_up", "gen_ffn_down", "gen_router", noised_gen)
        if wo_server:
            t.msg("gen_head", d * it, V * it, 2 * d * V, 2 * d * V if noised_gen else 0)
        else:
            t.client("gen_head", 2 * d * V)
    return dict(t.s)


def run_costs(
    w: ModelWeights,
    scx: SCXConfig,
    ids: np.ndarray,
    steps: int,
    dtype: Any = np.float64,
    keys: KeySchedule | None = None,
) -> CostReport:
    backend = NumpyBackend(w, dtype=dtype)
    server: Server[Any] = Server(backend)
    link = LocalTransport(server)
    client: Client[Any] = Client(backend, keys or KeySchedule.generate(), scx)
    logits = client.prefill(ids, link)
    client.share_keys(link)
    token = int(np.argmax(logits[-1]))
    for _ in range(steps):
        token = int(np.argmax(client.decode(token, link)))
    return client.cost_report(link, server.cost(client.session))


def check_report(report: CostReport, want: Expected) -> None:
    got = {name: {f: getattr(cost, f) for f in FIELDS} for name, cost in report.stages.items()}
    for stage in sorted(set(got) | set(want)):
        g = got.get(stage, dict.fromkeys(FIELDS, 0))
        e = want.get(stage, dict.fromkeys(FIELDS, 0))
        assert g == e, f"stage {stage!r}: report {g} != closed form {e}"
    total = report.total
    for f in FIELDS:
        assert getattr(total, f) == sum(e[f] for e in want.values()), f"total {f}"
    data = json.loads(report.to_json())
    assert set(data["stages"]) == set(report.stages)
    for f in FIELDS:
        assert data["total"][f] == getattr(total, f)
        assert sum(s[f] for s in data["stages"].values()) == data["total"][f]
    flops = total.client_flops + total.server_flops
    assert data["client_flop_share"] == pytest.approx(total.client_flops / flops)


def model(layers: int, moe: bool, bias: bool, ratio: int = 2) -> ModelWeights:
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=24,
        n_layers=layers,
        n_heads=2 * ratio,
        n_kv_heads=2,
        head_dim=4,
        intermediate_size=20,
        n_experts=3 if moe else 0,
        top_k=2 if moe else 0,
        qkv_bias=bias,
        max_positions=32,
    )
    return random_weights(cfg, np.random.default_rng(5))


CASES = [
    (
        "dense permute clear",
        dict(layers=4, moe=False, bias=False),
        dict(level="permute", r1=2, r2=3, guard_ffn="clear"),
    ),
    (
        "dense paper blinded l_s=2",
        dict(layers=4, moe=False, bias=True),
        dict(level="paper", r1=3, r2=0, r_lock=5, l_s=2),
    ),
    ("moe blind", dict(layers=4, moe=True, bias=False, ratio=1), dict(level="blind", r1=1, r2=2)),
    (
        "moe paper clear l_e=2",
        dict(layers=3, moe=True, bias=True, ratio=4),
        dict(level="paper", r1=0, r2=1, l_e=2, guard_ffn="clear"),
    ),
    ("one layer, no middle", dict(layers=1, moe=False, bias=False), dict(level="blind", r1=2, r2=2)),
    ("two layers l_s=l_e=2", dict(layers=2, moe=True, bias=False), dict(level="paper", l_s=2, l_e=2)),
]


@pytest.mark.parametrize(
    ("name", "mkw", "skw"), CASES, ids=[c[0].replace(", ", "-").replace(" ", "-") for c in CASES]
)
def test_cost_report_matches_closed_form(name: str, mkw: dict[str, Any], skw: dict[str, Any]) -> None:
    w, scx = model(**mkw), SCXConfig(**skw)
    ids = np.array([1, 7, 3, 9, 2, 11, 5], dtype=np.int64)
    check_report(run_costs(w, scx, ids, 3), expected_costs(w.config, scx, len(ids), 3, 8))


def test_float32_backend_halves_the_array_bytes() -> None:
    """At a β within float32's blinding limit (1): above it (the presets' β = 5, since stop 70) the blinded
    messages travel in float64 and keep 8 bytes an entry (tests/test_wide_default_s70.py)."""
    w, scx = model(4, False, False), SCXConfig(level="paper", r1=2, r2=2, beta=1.0)
    ids = np.array([4, 8, 15, 16, 23], dtype=np.int64)
    report = run_costs(w, scx, ids, 2, dtype=np.float32)
    check_report(report, expected_costs(w.config, scx, len(ids), 2, 4))
    assert report.stages["share"].bytes_up == 2 * (len(ids) + 2) * 8  # the int64 π of 2 middle blocks


def test_closed_form_is_not_vacuous() -> None:
    """Control: a wrong count (one more decoy row than was used) is caught by ``check_report``."""
    w, scx = model(4, False, False), SCXConfig(level="paper", r1=2, r2=2)
    ids = np.array([1, 2, 3], dtype=np.int64)
    report = run_costs(w, scx, ids, 1)
    with pytest.raises(AssertionError, match="stage"):
        check_report(report, expected_costs(w.config, SCXConfig(level="paper", r1=3, r2=2), 3, 1, 8))
    with pytest.raises(AssertionError, match="stage"):
        check_report(report, expected_costs(w.config, scx, 3, 2, 8))


@given(protocol_cases(max_prompt=16, max_new=4))
def test_cost_report_matches_closed_form_on_random_configs(case: ProtocolCase) -> None:
    report = run_costs(case.weights, case.scx, case.ids, case.n_new, keys=case.keys())
    check_report(report, expected_costs(case.model, case.scx, len(case.ids), case.n_new, 8))


def test_meter_refuses_an_unknown_side() -> None:
    """Flops go to exactly the side named; a misspelt side is an error, not silently server work."""
    from scx_ref.protocol import CostMeter
    from scx_ref.stages import Stage

    meter = CostMeter()
    meter.matmul(Stage.QKV, 2, 3, 4, "server")
    meter.matmul(Stage.QKV, 1, 1, 1, "client")
    meter.attention(Stage.QKV, 1, 1, 1, 1, "offline")
    cost = meter.stages[Stage.QKV]
    assert (cost.server_flops, cost.client_flops, cost.offline_flops) == (48, 2, 4)
    for side in ("Server", "cloud", None):
        with pytest.raises(ValueError, match="side must be"):
            meter.matmul(Stage.QKV, 1, 1, 1, side)  # type: ignore[arg-type]
    assert (cost.server_flops, cost.client_flops, cost.offline_flops) == (48, 2, 4)

"""The release plan, the presets, the cost meters and SCXConfig.

The plan is checked against real sessions on tiny models (``tests/tiny.py``) where tests/test_release_plan.py
does not reach: 1- and 2-block models, guards covering (or larger than) the whole model, generation attention
on the server, the paper's last-block offset, and per-kind β of 0 (``stage_beta``), on dense and MoE models.
A noised message is found as there: the same request runs at β and at β/2 under the same keys; Laplace noise
is drawn by inverse CDF, so η(β/2) = η(β)/2 exactly, and a message array that differs between the runs by
more than rounding is noised — its difference must be the plan's noise for that release, which pins the
release's label and β. Every other message is clear and must be one of the plan's exposures.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.dp import model_sensitivities, request_budget
from scx_ref.errors import ConfigError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server, Stage
from scx_ref.protocol.cost import CostMeter, CostReport
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.protocol.presets import PRESETS, preset
from scx_ref.stages import Phase
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_config, tiny_weights
from tests.views import assert_budget_counts, assert_sent_as_planned, observed_releases

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))
IDS = np.array([5, 17, 3, 8, 2, 9])


def _weights(n_layers: int, moe: bool) -> ModelWeights:
    return tiny_weights(7, moe=moe, n_layers=n_layers)


def _session(weights: ModelWeights, cfg: SCXConfig, n_new: int) -> tuple[LocalTransport, list[int]]:
    backend = NumpyBackend(weights)
    link = LocalTransport(Server(backend), record_view=True)
    tokens = Client(backend, KeySchedule(MASTER, NONCE), cfg).generate(IDS, n_new, link)
    return link, tokens


def _half(cfg: SCXConfig) -> SCXConfig:
    """``cfg`` with every β halved (a per-kind β of 0 stays 0)."""
    sb = None if cfg.stage_beta is None else {k: v / 2 for k, v in cfg.stage_beta.items()}
    return dataclasses.replace(cfg, beta=cfg.beta / 2, stage_beta=sb)


def _check(weights: ModelWeights, cfg: SCXConfig, n_new: int = 3) -> ReleasePlan:
    """Noised messages == the plan's releases; every clear message under an exposure and every exposure
    witnessed by a clear message (:func:`tests.views.assert_sent_as_planned`); the DP budget counts exactly
    the releases sent (guards within the model)."""
    half = _half(cfg)
    link_a, tokens_a = _session(weights, cfg, n_new)
    link_b, tokens_b = _session(weights, half, n_new)
    assert tokens_a == tokens_b
    plan = ReleasePlan.of(cfg, weights.config)
    plans = plan, ReleasePlan.of(half, weights.config)
    keys = RequestKeys(KeySchedule(MASTER, NONCE), weights.config)
    L = weights.config.n_layers
    noised, clear = observed_releases(link_a.view, link_b.view, plans, keys, cfg, L)
    assert_sent_as_planned(noised, clear, plan, cfg, L, n_new - 1)
    assert_budget_counts(weights, cfg, plan, noised.values(), len(IDS), n_new)  # guards past L clamped
    return plan


GRID = [
    pytest.param(L, moe, level, opts, id=f"L{L}-{'moe' if moe else 'dense'}-{level}-{name}")
    for L in (1, 2)
    for moe in (False, True)
    for level in ("permute", "paper", "blind")
    for name, opts in (
        ("default", {}),
        ("g2", {"l_s": 2, "l_e": 2}),  # the whole model on 2 blocks; larger than the model on 1
        ("hardened", {"attention": "client", "gen_linear": "server", "l_s": L}),
        ("gen-attn-server", {"gen_attention": "server"}),
        ("ffn-clear-gen-linear", {"guard_ffn": "clear", "gen_linear": "server"}),
    )
]


@pytest.mark.parametrize(("n_layers", "moe", "level", "opts"), GRID)
def test_small_models_send_exactly_the_plan(
    n_layers: int, moe: bool, level: Any, opts: dict[str, Any]
) -> None:
    cfg = SCXConfig(level=level, beta=2.0, r1=2, r2=1, max_length=32, **opts)
    _check(_weights(n_layers, moe), cfg)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", ["gate_up", "down", "router"])
@pytest.mark.parametrize("level", ["paper", "blind"])
def test_a_zero_mlp_beta_sends_exactly_the_plan(level: Any, kind: str, moe: bool) -> None:
    """A per-kind β of 0 leaves that map's messages clear: the plan lists no release the client does not
    send (at prefill a clear first map means one clear ffn message, no blinded MLP at all), and the clear
    ones inside a blinded MLP (the SwiGLU product, an expert's gate/up row) are exposures."""
    cfg = SCXConfig(level=level, beta=2.0, stage_beta={kind: 0.0}, max_length=32)
    _check(_weights(2, moe), cfg)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("level", ["paper", "blind"])
def test_the_paper_offset_is_the_plans(n_layers: int, moe: bool, level: Any) -> None:
    """``last_ffn="paper"``: one decode step (the offset form is not exact, so later tokens may differ
    between the two runs); the offset of every last guard block is the plan's."""
    cfg = SCXConfig(level=level, beta=4.0, last_ffn="paper", attention="client", max_length=32)
    plan = _check(_weights(n_layers, moe), cfg, n_new=2)
    assert any(r.kind == "offset" for r in plan.generation) == bool(cfg.blocks(n_layers)[2])


def test_prefill_plan_has_no_mlp_release_when_its_first_map_is_clear() -> None:
    """The client sends a block's rows in one clear ffn message when the MLP's first map is not noised, so
    the DP budget must not count the down map (nor the experts) as released."""
    for moe, kind in ((False, "gate_up"), (True, "router")):
        model = tiny_config(moe=moe, n_layers=3)
        plan = ReleasePlan.of(SCXConfig(level="blind", stage_beta={kind: 0.0}), model)
        mlp = {Stage.FFN, Stage.FFN_DOWN, Stage.ROUTER}
        assert not [r for r in plan.prefill if r.stage in mlp]
        assert (Phase.PREFILL, Stage.FFN) in {(e.phase, e.stage) for e in plan.exposures}
        # a generation step sends the maps one by one: the noised ones stay releases
        assert plan.find(Stage.GEN_FFN_DOWN, 0, 0 if moe else None) is not None


def test_a_clear_down_map_inside_a_blinded_mlp_is_an_exposure() -> None:
    plan = ReleasePlan.of(SCXConfig(level="blind", stage_beta={"down": 0.0}), tiny_config(n_layers=2))
    shown = {(e.phase, e.stage, b) for e in plan.exposures for b in e.blocks}
    assert {(Phase.PREFILL, Stage.FFN_DOWN, b) for b in (0, 1)} <= shown
    assert {(Phase.GENERATE, Stage.GEN_FFN_DOWN, b) for b in (0, 1)} <= shown
    assert any("SwiGLU product" in str(e) for e in plan.exposures)


# -- presets -------------------------------------------------------------------------------------------


def test_preset_names_unique_and_found() -> None:
    names = [p.name for p in PRESETS]
    assert len(set(names)) == len(names)
    assert all(preset(n).name == n for n in names)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 30])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_presets_hold_their_claims(n_layers: int, moe: bool) -> None:
    model = tiny_config(moe=moe, n_layers=n_layers)
    for p in PRESETS:
        cfg = p.config(n_layers)
        assert isinstance(cfg, SCXConfig)
        assert max(cfg.l_s, cfg.l_e) <= n_layers, p.name  # the DP budget refuses a guard past the model
        middle = cfg.blocks(n_layers)[1]
        beta = re.search(r"β = (\d+)", p.summary)
        if cfg.level != "permute" and beta is not None:
            assert cfg.beta == float(beta.group(1)), p.name
        if p.name.startswith("hardened"):
            assert cfg.beta == {"hardened": 5.0, "hardened-b20": 20.0, "hardened-b100": 100.0}[p.name]
        if "every block a guard" in p.summary:
            assert len(middle) == 0, p.name
        if "client" in p.summary and "attention" in p.summary:
            assert cfg.attention == "client" and cfg.gen_attention == "client", p.name
        if "W_o and LM head blinded" in p.summary:
            assert cfg.gen_linear == "server" and cfg.level == "blind", p.name
        if "every message the server receives is one-time blinded" in p.protects:
            assert ReleasePlan.of(cfg, model).exposures == (), p.name
        guards = re.search(r"guards (\d+)/(\d+)", p.summary)
        if guards is not None and n_layers >= 8:
            assert (cfg.l_s, cfg.l_e) == (int(guards.group(1)), int(guards.group(2))), p.name


def test_every_preset_has_a_dp_budget_on_a_one_block_model() -> None:
    """paper-g2 asked for 2 guard blocks on a 1-block model: the DP budget (and so ``scx dp`` and the
    frontier's DP column) refused it (ConfigError 'guard (2) exceeds the number of blocks (1)')."""
    sens = model_sensitivities(_weights(1, False), embedding="bound")
    for p in PRESETS:
        budget = request_budget(sens, p.config(1), prompt_len=4, tokens=3, use_pld=False)
        assert budget.epsilon_basic >= 0


def test_a_guard_past_the_model_is_budgeted_as_the_protocol_runs_it() -> None:
    """SCXConfig, the client and the server clamp guards to the model (guard_blocks); the budget refused
    them (ConfigError 'guard (2) exceeds the number of blocks (1)'). Now it counts what the protocol runs."""
    sens = model_sensitivities(_weights(3, False), embedding="bound")
    for big, fit in (((5, 5), (3, 3)), ((9, 1), (3, 1)), ((1, 7), (1, 3))):
        got = request_budget(
            sens, SCXConfig(level="paper", l_s=big[0], l_e=big[1]), prompt_len=4, tokens=3, use_pld=False
        )
        want = request_budget(
            sens, SCXConfig(level="paper", l_s=fit[0], l_e=fit[1]), prompt_len=4, tokens=3, use_pld=False
        )
        assert got.epsilon_basic == want.epsilon_basic and got.epsilon_advanced == want.epsilon_advanced
        assert [str(u) for u in got.uncovered] == [str(u) for u in want.uncovered]


# -- cost -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_metered_bytes_are_the_recorded_arrays(moe: bool) -> None:
    cfg = SCXConfig(level="blind", beta=50.0, attention="client", gen_linear="server", l_s=3)  # float64 wire
    link, _ = _session(_weights(4, moe), cfg, 3)

    def nbytes(arrays: dict[str, Any]) -> int:
        return sum(a.size * (8 if a.dtype.kind != "f" or a.itemsize == 8 else 4) for a in arrays.values())

    want: dict[Stage, list[int]] = {}
    for m in link.view.messages:
        row = want.setdefault(m.stage, [0, 0, 0])
        row[0] += nbytes(m.arrays)
        row[2] += 1
    for r in link.view.replies:
        want[r.stage][1] += nbytes(r.arrays)
    got = {s: [c.bytes_up, c.bytes_down, c.round_trips] for s, c in link.meter.stages.items()}
    assert got == want
    assert any(m.arrays and any(a.dtype == np.float64 for a in m.arrays.values()) for m in link.view.messages)


def test_cost_counts_refuse_negative_and_fractional_values() -> None:
    meter = CostMeter()
    meter.matmul(Stage.QKV, 2, 3, 4, "client")
    meter.attention(Stage.ATTN, np.int64(2), 1, 5, 4, "server")
    before = meter.snapshot()
    bad: list[tuple[str, tuple[Any, ...]]] = [
        ("matmul", (Stage.QKV, -1, 3, 4, "client")),
        ("matmul", (Stage.QKV, 2.5, 3, 4, "server")),
        ("matmul", (Stage.QKV, True, 3, 4, "server")),
        ("attention", (Stage.ATTN, 2, -1, 5, 4, "client")),
        ("elementwise", (Stage.QKV, -10)),
        ("elementwise", (Stage.QKV, 2.7)),
        ("verification", (Stage.QKV, -3)),
        ("matmul", (Stage.QKV, 2, 3, 4, "sever")),
    ]
    for name, args in bad:
        with pytest.raises(ConfigError):
            getattr(meter, name)(*args)
    assert meter.snapshot() == before  # nothing counted
    assert meter.stages[Stage.QKV].client_flops == 48
    assert meter.stages[Stage.ATTN].server_flops == 160


def test_cost_numpy_sizes_do_not_overflow() -> None:
    meter = CostMeter()
    big = np.int64(2**21)
    meter.matmul(Stage.HEAD, big, big, big, "server")  # 2^64 flops: past int64
    assert meter.stages[Stage.HEAD].server_flops == 2**64


def test_cost_report_dict_is_a_copy() -> None:
    meter = CostMeter()
    meter.message(Stage.QKV, 10, 20)
    report = CostReport.merge(meter)
    out = report.to_dict()
    out["stages"]["qkv"]["bytes_up"] = 999
    out["total"]["bytes_up"] = 999
    assert report.stages[Stage.QKV].bytes_up == 10
    assert report.total.bytes_up == 10


# -- config ---------------------------------------------------------------------------------------------


def test_a_config_with_stage_beta_is_hashable() -> None:
    a = SCXConfig(stage_beta={"qkv": 1.0, "o": 2})
    b = SCXConfig(stage_beta={"o": 2.0, "qkv": 1})
    assert a == b and hash(a) == hash(b)
    assert len({a, b, SCXConfig()}) == 2
    assert hash(SCXConfig()) == hash(SCXConfig())


@pytest.mark.parametrize(
    "fields",
    [
        {"beta": float("nan")},
        {"beta": float("inf")},
        {"beta": True},
        {"beta": -1.0},
        {"stage_beta": {"qkv": float("nan")}},
        {"stage_beta": {"qkv": True}},
        {"stage_beta": {"offset": 1.0}},
        {"stage_beta": "qkv"},
        {"r1": True},
        {"r2": 2.0},
        {"l_s": 0},
        {"l_e": np.bool_(True)},
        {"max_length": True},
        {"verify": 1},
        {"level": ["paper"]},
        {"attention": "client", "gen_attention": "server"},
    ],
)
def test_bad_config_fields_are_config_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SCXConfig(**fields)

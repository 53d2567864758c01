"""Tests that kill mutants of :mod:`scx_ref.protocol.cost` and :mod:`scx_ref.protocol.presets` that survived
``python -m mutation.run cost presets`` (mutation/REPORT_config_transport_cost_presets.md): each checks a
documented property of the cost meter (what each count adds, on which side, what a refused count names and
leaves, a report's sums by phase and its shares) or of the named configurations (what each preset sets on a
model of each size, the refusals of a name or a block count)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from scx_ref.errors import ConfigError
from scx_ref.protocol.config import SCXConfig
from scx_ref.protocol.cost import CostMeter, CostReport, StageCost
from scx_ref.protocol.presets import PAPER_CONFIG, preset, preset_names
from scx_ref.stages import Stage
from tests.refusals import refused


def test_each_count_adds_its_closed_form_to_its_own_field() -> None:
    """matmul 2mkn flops, attention 4·heads·n_q·n_k·d_h, each on its side; elementwise, verification and
    a message add to their own fields, a message one round trip."""
    meter = CostMeter()
    meter.matmul(Stage.QKV, 2, 3, 5, "client")
    meter.matmul(Stage.QKV, 1, 1, 1, "server")
    meter.matmul(Stage.QKV, 1, 2, 1, "offline")
    meter.attention(Stage.QKV, 2, 3, 5, 7, "server")
    meter.elementwise(Stage.QKV, 11)
    meter.verification(Stage.QKV, 13)
    meter.message(Stage.QKV, 17, 19)
    meter.message(Stage.QKV, 1, 2)
    assert meter.stages == {
        Stage.QKV: StageCost(
            client_flops=60,
            server_flops=2 + 4 * 2 * 3 * 5 * 7,
            offline_flops=4,
            client_elementwise=11,
            bytes_up=18,
            bytes_down=21,
            round_trips=2,
            verify_flops=13,
        )
    }


def test_a_side_that_is_not_one_of_the_three_is_refused() -> None:
    meter = CostMeter()
    with pytest.raises(ConfigError, match="side must be 'client', 'server' or 'offline', got 'gpu'"):
        meter.matmul(Stage.QKV, 1, 1, 1, "gpu")  # type: ignore[arg-type]
    assert meter.stages == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.matmul(Stage.QKV, -1, 1, 1, "client"), "m must be >= 0, got -1"),
        (lambda m: m.matmul(Stage.QKV, 1, -1, 1, "client"), "k must be >= 0, got -1"),
        (lambda m: m.matmul(Stage.QKV, 1, 1, -1, "client"), "n must be >= 0, got -1"),
        (lambda m: m.attention(Stage.QKV, -1, 1, 1, 1, "server"), "heads must be >= 0, got -1"),
        (lambda m: m.attention(Stage.QKV, 1, -1, 1, 1, "server"), "n_q must be >= 0, got -1"),
        (lambda m: m.attention(Stage.QKV, 1, 1, -1, 1, "server"), "n_k must be >= 0, got -1"),
        (lambda m: m.attention(Stage.QKV, 1, 1, 1, 1.5, "server"), "d_h must be an integer, got float 1.5"),
        (lambda m: m.elementwise(Stage.QKV, -3), "count must be >= 0, got -3"),
        (lambda m: m.verification(Stage.QKV, -3), "flops must be >= 0, got -3"),
        (lambda m: m.message(Stage.QKV, -1, 0), "bytes up must be >= 0, got -1"),
        (lambda m: m.message(Stage.QKV, 0, -2), "bytes down must be >= 0, got -2"),
        (lambda m: m.elementwise("qkv", 1), "stage must be a Stage, got str 'qkv'"),
    ],
    ids=["m", "k", "n", "heads", "n_q", "n_k", "d_h", "count", "flops", "up", "down", "stage"],
)
def test_a_refused_count_names_what_it_refuses_and_counts_nothing(
    call: Callable[[CostMeter], None], message: str
) -> None:
    meter = CostMeter()
    meter.message(Stage.FFN, 1, 1)
    before = meter.snapshot()
    with refused(ConfigError, message):
        call(meter)
    assert meter.stages == before


def test_every_count_accumulates() -> None:
    """A second count of a stage adds to the first (on each side, and each per-stage field)."""
    meter = CostMeter()
    for count in (3, 4):
        meter.elementwise(Stage.O, count)
        meter.verification(Stage.O, 10 * count)
        for side in ("client", "server", "offline"):
            meter.matmul(Stage.O, 1, 1, count, side)
    assert meter.stages[Stage.O] == StageCost(
        client_flops=14, server_flops=14, offline_flops=14, client_elementwise=7, verify_flops=70
    )


def test_a_report_sums_its_stages_by_phase_and_in_total() -> None:
    """:meth:`CostReport.phase_total` sums the stages of one phase only; ``total`` every stage; the shares
    are each count over the request's flops."""
    client, server = CostMeter(), CostMeter()
    client.matmul(Stage.QKV, 1, 1, 1, "client")  # prefill: 2 flops
    client.matmul(Stage.QKV, 1, 1, 3, "offline")  # 6 offline flops
    client.verification(Stage.QKV, 5)
    server.matmul(Stage.QKV, 1, 1, 2, "server")  # 4 server flops
    server.matmul(Stage.GEN_QKV, 1, 1, 4, "server")  # generation: 8
    report = CostReport.merge(client, server)
    assert report.phase_total(Stage.QKV.phase) == StageCost(
        client_flops=2, server_flops=4, offline_flops=6, verify_flops=5
    )
    assert report.phase_total(Stage.GEN_QKV.phase) == StageCost(server_flops=8)
    assert report.total == StageCost(client_flops=2, server_flops=12, offline_flops=6, verify_flops=5)
    out = report.to_dict()
    assert out["client_flop_share"] == 2 / 20 and out["offline_flop_share"] == 6 / 20
    assert out["verify_flop_share"] == 5 / 14
    assert json.loads(report.to_json()) == out
    assert report.to_json().splitlines()[1].startswith('  "stages": {')  # two spaces a level


# -- presets ---------------------------------------------------------------------------------------------

_PAPER = {"level": "paper", "r1": 4, "r2": 4, "beta": 5.0, "attention": "server", "gen_attention": "server"}
_CLIENT = {"attention": "client", "gen_attention": "client"}


@pytest.mark.parametrize("n_layers", [1, 2, 5, 30])
def test_every_preset_is_the_configuration_its_summary_names(n_layers: int) -> None:
    """DESIGN §5.7's named configurations: each preset's fields on a model of ``n_layers`` blocks (guards
    no larger than the model; "every block a guard" is l_s = n_layers − l_e, at least 1)."""
    L = n_layers
    all_guards = max(L - 1, 1)
    want: dict[str, dict[str, Any]] = {
        "permute": {**_PAPER, "level": "permute", "l_s": 1, "l_e": 1},
        "paper": {**_PAPER, "l_s": 1, "l_e": 1},
        "paper-g2": {**_PAPER, "l_s": min(2, L), "l_e": min(2, L)},
        "blind": {**_PAPER, "level": "blind", "l_s": 1, "l_e": 1},
        "client-attn": {**_PAPER, **_CLIENT, "level": "blind", "l_s": 1, "l_e": 1},
        "client-attn-g4": {**_PAPER, **_CLIENT, "level": "blind", "l_s": min(4, L), "l_e": min(4, L)},
        "no-share": {**_PAPER, "level": "blind", "l_s": all_guards, "l_e": 1},
        **{
            name: {
                **_PAPER,
                **_CLIENT,
                "level": "blind",
                "beta": beta,
                "gen_linear": "server",
                "l_s": all_guards,
                "l_e": 1,
            }
            for name, beta in (("hardened", 5.0), ("hardened-b20", 20.0), ("hardened-b100", 100.0))
        },
    }
    assert preset_names() == tuple(want)
    for name, fields in want.items():
        assert preset(name).config(L) == SCXConfig(**fields), name
    assert preset("paper").config(L) == PAPER_CONFIG


@pytest.mark.parametrize(
    ("n_layers", "message"),
    [
        (2.0, "n_layers must be an integer, got float 2.0"),
        (0, "n_layers: a model has at least one block, got 0"),
    ],
    ids=["float", "zero"],
)
def test_a_preset_refuses_a_block_count_that_is_not_a_model_s(n_layers: Any, message: str) -> None:
    with refused(ConfigError, message):
        preset("hardened").config(n_layers)


def test_an_unknown_preset_name_lists_the_names() -> None:
    with pytest.raises(ConfigError) as raised:
        preset("nope")
    assert str(raised.value) == f"unknown configuration 'nope'; choose one of {', '.join(preset_names())}"
    assert ", paper-g2, blind, " in str(raised.value)

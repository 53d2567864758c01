"""An audit of the release plan, SCXConfig, the presets, the cost meter and the limits against DESIGN §5.

Each test names what the code did before: a configuration whose ``stage_beta`` could be changed after its
validation (a NaN β then made the plan send block 1's QKV rows clear), named choices that took a numpy
array, guard sizes and β kinds taken unchecked, a cost meter that kept a stage entry from a refused call or
keyed on a bare string, a plan that answered "no releases" for a misspelt phase, and a key-sharing
exposure that did not say the shared permutations also order the previous blocks' FFN rows.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import pytest

from scx_ref import forward
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Server
from scx_ref.protocol.config import BETA_KINDS, LEVELS, SCXConfig, guard_blocks
from scx_ref.protocol.cost import CostMeter, CostReport
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.stages import Phase, Stage
from tests.tiny import tiny_config, tiny_weights

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))

# -- SCXConfig ----------------------------------------------------------------------------------------


def test_stage_beta_cannot_be_changed_after_validation() -> None:
    """``cfg.stage_beta`` was the checked dict itself: ``cfg.stage_beta["qkv"] = nan`` went through, the
    plan then compared nan > 0, dropped block 1's QKV release and the client sent those rows clear (and
    the configuration's hash changed under a dict that held it)."""
    cfg = SCXConfig(level="paper", stage_beta={"qkv": 1.0})
    before = hash(cfg)
    held = {cfg: "kept"}
    with pytest.raises(TypeError):
        cast(Any, cfg.stage_beta)["qkv"] = math.nan
    with pytest.raises(TypeError):
        cast(Any, cfg.stage_beta)["bogus"] = -1.0
    assert cfg.beta_for("qkv") == 1.0 and hash(cfg) == before and held[cfg] == "kept"
    plan = ReleasePlan.of(cfg, tiny_config(n_layers=2))
    qkv = plan.find(Stage.QKV, 0)
    assert qkv is not None and qkv.beta == 1.0
    # still a mapping equal to the dict it was given, shown as one, copied, pickled and rebuilt alike
    assert cfg.stage_beta == {"qkv": 1.0} and "stage_beta={'qkv': 1.0}" in repr(cfg)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert cfg.to_dict()["stage_beta"] == {"qkv": 1.0} and type(cfg.to_dict()["stage_beta"]) is dict
    assert SCXConfig(**cfg.to_dict()) == cfg and replace(cfg, beta=2.0).stage_beta == {"qkv": 1.0}


CHOICES = {
    "level": "blind",
    "guard_ffn": "clear",
    "last_ffn": "paper",
    "attention": "client",
    "gen_attention": "server",
    "gen_linear": "server",
    "blind_dtype": "float64",
    "decoys": "gaussian",
}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_named_choices_take_only_strings(name: str) -> None:
    """A one-element numpy array passed ``value not in choices`` (its ``==`` is truthy) and was stored —
    the configuration could not be hashed; a two-element one raised numpy's ValueError, not a
    ConfigError. A numpy string is a string: taken, stored as ``str``."""
    value = CHOICES[name]
    extra: dict[str, Any] = {"attention": "server"} if name == "gen_attention" else {}
    bads: tuple[Any, ...] = (np.array([value]), np.array([value, value]), [value], b"paper", None)
    for bad in bads:
        with pytest.raises(ConfigError, match=f"^{name} must be"):
            SCXConfig(**{name: bad, **extra})
    cfg = SCXConfig(**{name: np.str_(value), **extra})
    plain = SCXConfig(**{name: value, **extra})
    assert type(getattr(cfg, name)) is str and getattr(cfg, name) == value
    assert cfg == plain and hash(cfg) == hash(plain)


def test_guard_blocks_checks_its_sizes() -> None:
    """``guard_blocks`` is public (the server calls it with an open message's sizes): it took l_s = l_e = 0
    (every block a middle block: no guard at all, against DESIGN §5's l_s, l_e ≥ 1), bools, and a float
    (numpy's TypeError from ``range``)."""
    bad: tuple[tuple[Any, Any, Any], ...] = (
        (4, 0, 0),
        (4, 1, 0),
        (4, True, 1),
        (4, 1, np.bool_(True)),
        (4, 1.5, 1),
        (0, 1, 1),
        (-2, 1, 1),
    )
    for args in bad:
        with pytest.raises(ConfigError):
            guard_blocks(*args)
    # guards larger than the model are clamped (first guards first); numpy integers are integers
    assert guard_blocks(3, 5, 5) == (range(0, 3), range(3, 3), range(3, 3))
    assert guard_blocks(np.int64(6), np.int32(2), 1) == (range(0, 2), range(2, 5), range(5, 6))
    with pytest.raises(ConfigError):
        SCXConfig().blocks(0)


def test_beta_for_refuses_an_unknown_kind() -> None:
    """A misspelt kind (or the paper's ``offset``, which is no β kind) silently got ``beta``."""
    cfg = SCXConfig(beta=3.0, stage_beta={"o": 7.0})
    for kind in ("qkvv", "offset", "QKV", 1):
        with pytest.raises(ConfigError, match="unknown β kind"):
            cfg.beta_for(cast(Any, kind))
    assert {k: cfg.beta_for(k) for k in BETA_KINDS} == {k: 7.0 if k == "o" else 3.0 for k in BETA_KINDS}
    assert LEVELS == ("permute", "paper", "blind")


# -- the release plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    n_layers: int
    n_experts: Any
    is_moe: Any


def test_plan_checks_the_models_experts() -> None:
    """Only ``n_layers`` was checked: a float expert count raised range's TypeError, and an MoE flag that
    disagreed with the count made a plan of a router with no experts (or of dense releases for an MoE)."""
    for bad in (_Model(2, 2.5, True), _Model(2, True, True), _Model(2, -1, False), _Model(2, 0, True)):
        with pytest.raises(ConfigError, match="model"):
            ReleasePlan.of(SCXConfig(level="blind"), bad)
    with pytest.raises(ConfigError, match="is_moe"):
        ReleasePlan.of(SCXConfig(level="blind"), _Model(2, 4, False))
    moe = ReleasePlan.of(SCXConfig(level="blind"), _Model(2, np.int64(4), np.bool_(True)))  # tiny's MoE
    assert moe == ReleasePlan.of(SCXConfig(level="blind"), _Model(2, 4, True))
    assert ReleasePlan.of(SCXConfig(level="blind"), tiny_config(moe=True, n_layers=2)).prefill == moe.prefill


def test_releases_refuses_what_is_not_a_phase() -> None:
    """``releases("prefill")`` (the phase's wire name) answered () — "nothing noised" — for a plan that
    noises block 1."""
    plan = ReleasePlan.of(SCXConfig(level="paper"), tiny_config(n_layers=2))
    for bad in ("prefill", "generate", None, 1):
        with pytest.raises(ConfigError, match="phase"):
            plan.releases(cast(Any, bad))
    assert plan.releases(Phase.PREFILL) == plan.prefill and len(plan.prefill) == 1
    assert plan.releases(Phase.GENERATE) == plan.generation and plan.releases(Phase.CONTROL) == ()


def test_key_sharing_exposure_says_it_orders_the_previous_blocks_ffn_rows() -> None:
    """π_i permutes block i's QKV rows and block i−1's FFN rows (DESIGN §5.1), so the π_i key sharing
    uploads puts both in true order — the FFN rows of the last first guard block included. Shown on a real
    session: the shared π decodes the FFN message of the block before to the plaintext model's residual
    rows. The exposure said only "the prompt's valid caches"."""
    weights = tiny_weights(3)  # 4 blocks; l_s = l_e = 1: blocks 2, 3 (1-based) are key-shared
    backend = NumpyBackend(weights)
    link = LocalTransport(Server(backend), record_view=True)
    cfg = SCXConfig(level="paper", r1=2, r2=2, max_length=16)
    ids = np.array([5, 17, 3, 8, 2, 9])
    n = len(ids)
    Client(backend, KeySchedule(MASTER, NONCE), cfg).generate(ids, 2, link)  # one decode step: shares keys
    plain: dict[tuple[Stage, int], Any] = {}
    h = backend.embed(ids)
    for layer in range(weights.config.n_layers):
        h, _ = forward.block(
            backend, h, layer, np.arange(n), None, trace=lambda s, i, rows: plain.__setitem__((s, i), rows)
        )
    sent = {(m.stage, m.layer): m.arrays for m in link.view.messages if m.step == -1}
    middle = cfg.blocks(weights.config.n_layers)[1]
    for i in middle:
        perm = np.asarray(sent[(Stage.SHARE, i)]["perm"])
        for stage, block in ((Stage.QKV, i), (Stage.FFN, i - 1)):
            x = np.asarray(sent[(stage, block)]["x"])
            ordered = np.empty_like(x)
            ordered[perm] = x  # the message is X[π]: the server undoes it with the shared π
            np.testing.assert_allclose(ordered[:n], np.asarray(plain[(stage, block)]), rtol=0, atol=1e-12)
    (share,) = [e for e in ReleasePlan.of(cfg, weights.config).exposures if e.stage is Stage.SHARE]
    assert share.blocks == tuple(middle)
    text = str(share)
    assert "FFN rows" in text and "blocks 1, 2' FFN" in text  # blocks i−1 of the middle, 1-based


# -- the cost meter ------------------------------------------------------------------------------------


def test_a_refused_count_adds_no_stage_and_a_stage_must_be_a_stage() -> None:
    """``elementwise``/``verification`` read ``self.stages[stage]`` (a defaultdict) before checking the
    count: a refused call left a zero entry for its stage in the report. A bare string (a Stage's wire
    name, equal to it) keyed the meter and broke ``CostReport.to_dict`` later with an AttributeError."""
    meter = CostMeter()
    calls: tuple[Callable[[], None], ...] = (
        lambda: meter.elementwise(Stage.HEAD, -1),
        lambda: meter.verification(Stage.ATTN, cast(Any, 2.5)),
        lambda: meter.message(cast(Any, "qkv"), 1, 1),
        lambda: meter.matmul(cast(Any, "o"), 1, 1, 1, "client"),
        lambda: meter.attention(cast(Any, None), 1, 1, 1, 1, "server"),
        lambda: meter.elementwise(cast(Any, "ffn"), 3),
        lambda: meter.verification(cast(Any, "ffn"), 3),
    )
    for call in calls:
        with pytest.raises(ConfigError):
            call()
    assert dict(meter.stages) == {}
    # a few numbers by hand: 2·m·k·n and 4·H·n_q·n_k·d_h
    meter.matmul(Stage.QKV, 3, 5, 7, "server")  # 210
    meter.matmul(Stage.QKV, 3, 5, 1, "client")  # 30
    meter.matmul(Stage.QKV, 2, 5, 2, "offline")  # 40
    meter.attention(Stage.ATTN, 2, 3, 5, 4, "client")  # 480
    meter.message(Stage.QKV, 100, 20)
    report = CostReport.merge(meter)
    t = report.total
    assert (t.server_flops, t.client_flops, t.offline_flops) == (210, 510, 40)
    assert report.client_flop_share == 510 / 760 and report.offline_flop_share == 40 / 760
    assert report.to_dict()["stages"]["qkv"]["bytes_up"] == 100

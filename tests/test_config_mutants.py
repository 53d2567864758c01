"""Tests that kill mutants of :mod:`scx_ref.protocol.config` that survived ``python -m mutation.run config``
(mutation/REPORT_config_transport_cost_presets.md): each checks a documented property of a configuration —
the guard block ranges, β's limits by dtype, each refusal (its class and the field it names), what a checked
configuration stores, and the precision warning's wording by case."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, PrecisionWarning
from scx_ref.protocol.config import SCXConfig, beta_limit, guard_blocks, server_gen_attention
from tests.refusals import refused


@pytest.mark.parametrize(
    ("n_layers", "l_s", "l_e", "first", "middle", "last"),
    [
        (1, 1, 1, (0, 1), (1, 1), (1, 1)),
        (2, 1, 1, (0, 1), (1, 1), (1, 2)),
        (5, 1, 1, (0, 1), (1, 4), (4, 5)),
        (5, 2, 2, (0, 2), (2, 3), (3, 5)),
        (5, 3, 3, (0, 3), (3, 3), (3, 5)),
        (5, 9, 1, (0, 5), (5, 5), (5, 5)),
        (5, 1, 9, (0, 1), (1, 1), (1, 5)),
    ],
)
def test_guard_blocks_are_the_first_l_s_and_last_l_e_blocks_first_taking_precedence(
    n_layers: int, l_s: int, l_e: int, first: tuple[int, int], middle: tuple[int, int], last: tuple[int, int]
) -> None:
    """DESIGN §5: the first l_s blocks, the last l_e blocks and the blocks between, clamped to the model;
    where the guards overlap the first guards keep the block."""
    assert guard_blocks(n_layers, l_s, l_e) == (range(*first), range(*middle), range(*last))


def test_blinded_stages_run_in_the_backends_dtype_or_float64_only() -> None:
    """:func:`beta_limit` refuses blinded stages in a third dtype, naming both."""
    with pytest.raises(
        ConfigError, match="blinded stages run in the backend's dtype or float64, not float32 on bfloat16"
    ):
        beta_limit("bfloat16", "float32")


def test_distinct_configurations_hash_apart_and_equal_ones_together() -> None:
    """``__hash__`` agrees with ``==`` and reads every field, ``stage_beta`` by its items: configurations
    that differ in any one field (stage_beta included) get distinct hashes here, so they spread over a
    dict's buckets instead of colliding."""
    configs = [
        SCXConfig(),
        SCXConfig(level="blind"),
        SCXConfig(r1=3),
        SCXConfig(beta=2.0),
        SCXConfig(verify=False),
        SCXConfig(stage_beta={"qkv": 1.0}),
        SCXConfig(stage_beta={"qkv": 2.0}),
        SCXConfig(stage_beta={"o": 1.0}),
    ]
    assert len({hash(c) for c in configs}) == len(configs)
    assert hash(SCXConfig(stage_beta={"qkv": 1.0, "o": 2.0})) == hash(
        SCXConfig(stage_beta={"o": 2.0, "qkv": 1.0})
    )
    assert hash(SCXConfig(stage_beta={"qkv": 1.0})) == hash(SCXConfig(stage_beta={"qkv": 1.0}))


@pytest.mark.parametrize("stage_beta", [None, {"qkv": 3.0}])
def test_to_dict_round_trips(stage_beta: dict[str, float] | None) -> None:
    """``SCXConfig(**to_dict()) == self``, ``stage_beta`` None or a plain dict of its own."""
    cfg = SCXConfig(level="blind", r1=3, stage_beta=stage_beta, verify=False)
    out = cfg.to_dict()
    assert out["stage_beta"] == stage_beta and (stage_beta is None or type(out["stage_beta"]) is dict)
    assert SCXConfig(**out) == cfg


def test_blind_dtype_float64_widens_a_narrow_run_at_any_beta() -> None:
    """``blind_dtype="float64"`` blinds a float32 run in float64 even at a β within float32's limit; "auto"
    does not there, and "backend" never does."""
    assert SCXConfig(beta=0.5, blind_dtype="float64").wide_blinding("float32")
    assert not SCXConfig(beta=0.5, blind_dtype="auto").wide_blinding("float32")
    assert not SCXConfig(beta=1e6, blind_dtype="backend").wide_blinding("float32")
    assert not SCXConfig(beta=1e6, blind_dtype="float64").wide_blinding("float64")


def test_the_paper_offset_counts_at_level_permute() -> None:
    """Without ``betas``, the paper's last-block offset (β at least 1, also at level permute) is a blinded
    message: on a bfloat16 run blinded in bfloat16 it is past that dtype's limit."""
    paper = SCXConfig(level="permute", last_ffn="paper", blind_dtype="backend")
    message = paper.precision_warning("bfloat16")
    assert message is not None and "β = 1 " in message
    assert (
        SCXConfig(level="permute", last_ffn="exact", blind_dtype="backend").precision_warning("bfloat16")
        is None
    )


def test_warn_precision_judges_the_betas_it_is_given() -> None:
    """``warn_precision(dtype, betas)`` warns about the given βs (the plan's releases), not the
    configuration's own."""
    cfg = SCXConfig(beta=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.warn_precision("float32") is None
    with pytest.warns(PrecisionWarning, match="β = 1e\\+13"):
        assert cfg.warn_precision("float32", [1e13]) is not None


@pytest.mark.parametrize(("stacklevel", "passed"), [(None, 3), (1, 2), (4, 5)])
def test_warn_precision_passes_its_stacklevel_counted_from_its_caller(
    monkeypatch: pytest.MonkeyPatch, stacklevel: int | None, passed: int
) -> None:
    """``stacklevel`` counts from warn_precision's caller (default 2: the caller's caller), so
    :func:`warnings.warn`, one frame further down, gets one more (test_beta_precision.py checks the file
    and line it points at)."""
    got: list[dict[str, Any]] = []
    monkeypatch.setattr(warnings, "warn", lambda *a, **k: got.append({"args": a, **k}))
    cfg = SCXConfig(beta=1e13)
    if stacklevel is None:
        message = cfg.warn_precision("float64")
    else:
        message = cfg.warn_precision("float64", stacklevel=stacklevel)
    assert got == [{"args": (message, PrecisionWarning), "stacklevel": passed}]


_TAIL = "(README, 'How large β may be'), and every reply check still passes."

#: (configuration, backend dtype, the whole warning): one per case of the message — a float64 run; float64
#: blinding of a float32 run; float32 blinding; bfloat16 blinding (not measured, past float64's limit
#: too); and the edges: u·β = 1 exactly (an entry of size 1 is lost) and β = WIDE_BETA_LIMIT exactly
#: (float64 blinding would still keep the bound) against just above it.
MESSAGES: list[tuple[dict[str, Any], str, str]] = [
    (
        {"beta": 1e13},
        "float64",
        "β = 1e+13 with the blinded stages in float64 on a float64 backend (blind_dtype='auto') is not "
        "exact: x + η keeps x only to float64's spacing near |η| ~ β, about 1.1e-03 per entry; the project "
        f"measured float64 runs within |ΔPPL|/PPL ≤ 1e-9 only up to β = 5e+04 {_TAIL} Use a β ≤ 5e+04.",
    ),
    (
        {"beta": 2e9, "blind_dtype": "float64"},
        "float32",
        "β = 2e+09 with the blinded stages in float64 on a float32 backend (blind_dtype='float64') is not "
        "exact: x + η keeps x only to float64's spacing near |η| ~ β, about 2.2e-07 per entry; float64 "
        f"blinding keeps float32's |ΔPPL|/PPL ≤ 1e-5 only up to β = 5e+08 {_TAIL} Use a β ≤ 5e+08.",
    ),
    (
        {"beta": 40.0, "blind_dtype": "backend"},
        "float32",
        "β = 40 with the blinded stages in float32 on a float32 backend (blind_dtype='backend') is not "
        "exact: x + η keeps x only to float32's spacing near |η| ~ β, about 2.4e-06 per entry; the project "
        f"measured float32 blinding within |ΔPPL|/PPL ≤ 1e-5 only up to β = 1 {_TAIL} Use "
        "blind_dtype='float64' (or a β ≤ 1).",
    ),
    (
        {"beta": 1e12, "blind_dtype": "backend"},
        "bfloat16",
        "β = 1e+12 with the blinded stages in bfloat16 on a bfloat16 backend (blind_dtype='backend') is not "
        "exact: x + η keeps x only to bfloat16's spacing near |η| ~ β, about 3.9e+09 per entry (entries of "
        "size 1 are lost entirely); bfloat16 blinding was not measured: its rounding is 65536 times "
        "float32's, measured within |ΔPPL|/PPL ≤ 1e-5 only up to β = 1, so the same bound needs β ≤ 1.5e-05 "
        f"{_TAIL} Use a β ≤ 1.5e-05, or blind_dtype='float64' with a β ≤ 5e+08.",
    ),
    (
        {"beta": 2.0**24, "blind_dtype": "backend"},
        "float32",
        "β = 1.68e+07 with the blinded stages in float32 on a float32 backend (blind_dtype='backend') is not "
        "exact: x + η keeps x only to float32's spacing near |η| ~ β, about 1.0e+00 per entry (entries of "
        "size 1 are lost entirely); the project measured float32 blinding within |ΔPPL|/PPL ≤ 1e-5 only up "
        f"to β = 1 {_TAIL} Use blind_dtype='float64' (or a β ≤ 1).",
    ),
    (
        {"beta": 5e8, "blind_dtype": "backend"},
        "float32",
        "β = 5e+08 with the blinded stages in float32 on a float32 backend (blind_dtype='backend') is not "
        "exact: x + η keeps x only to float32's spacing near |η| ~ β, about 3.0e+01 per entry (entries of "
        "size 1 are lost entirely); the project measured float32 blinding within |ΔPPL|/PPL ≤ 1e-5 only up "
        f"to β = 1 {_TAIL} Use blind_dtype='float64' (or a β ≤ 1).",
    ),
    (
        {"beta": 5e8 + 1e3, "blind_dtype": "backend"},
        "float32",
        "β = 5e+08 with the blinded stages in float32 on a float32 backend (blind_dtype='backend') is not "
        "exact: x + η keeps x only to float32's spacing near |η| ~ β, about 3.0e+01 per entry (entries of "
        "size 1 are lost entirely); the project measured float32 blinding within |ΔPPL|/PPL ≤ 1e-5 only up "
        f"to β = 1 {_TAIL} Use a β ≤ 1, or blind_dtype='float64' with a β ≤ 5e+08.",
    ),
]


@pytest.mark.parametrize(
    ("fields", "dtype", "message"),
    MESSAGES,
    ids=["float64-run", "float64-blinding", "float32", "bfloat16", "u-beta-1", "wide-limit", "past-wide"],
)
def test_the_precision_warning_says_the_beta_the_dtypes_the_rounding_and_the_fix(
    fields: dict[str, Any], dtype: str, message: str
) -> None:
    """The whole message of each case (:meth:`SCXConfig.precision_warning`): the β, where the blinded
    stages run, the rounding u·β per entry, the bound the project measured and the fix."""
    assert SCXConfig(**fields).precision_warning(dtype) == message


def test_a_beta_outside_the_range_is_refused_naming_betas() -> None:
    with pytest.raises(ConfigError, match=r"^betas must lie in \[0, 1e\+100\], got -1.0$"):
        SCXConfig().precision_warning("float32", [-1.0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1, 1), "n_layers must be >= 1, got 0"),
        ((2.0, 1, 1), "n_layers must be an integer, got float 2.0"),
        ((2, 0, 1), "l_s must be >= 1, got 0"),
        ((2, "1", 1), "l_s must be an integer, got str '1'"),
        ((2, 1, 0), "l_e must be >= 1, got 0"),
        ((2, 1, True), "l_e must be an integer, got bool True"),
    ],
    ids=["n_layers-0", "n_layers-float", "l_s-0", "l_s-str", "l_e-0", "l_e-bool"],
)
def test_guard_blocks_refuses_each_size_by_name(args: tuple[Any, Any, Any], message: str) -> None:
    with refused(ConfigError, message):
        guard_blocks(*args)


@pytest.mark.parametrize(
    ("attention", "gen_attention", "sends"),
    [
        ("server", "server", True),
        ("server", "client", False),
        ("client", "client", False),
        ("client", "server", False),
    ],
)
def test_only_the_papers_flow_sends_gen_attn(attention: str, gen_attention: str, sends: bool) -> None:
    """:func:`server_gen_attention`: every first guard block with attention and generation attention on the
    server, none otherwise; the configuration's method gives the first guard blocks of its model."""
    first = range(0, 2)
    assert server_gen_attention(first, attention, gen_attention) == (first if sends else range(0))
    if (attention, gen_attention) != ("client", "server"):  # a contradiction SCXConfig refuses
        cfg = SCXConfig(l_s=2, l_e=1, attention=attention, gen_attention=gen_attention)  # type: ignore[arg-type]
        assert cfg.server_gen_attention(5) == (range(0, 2) if sends else range(0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"level": "x"}, "level must be one of ('permute', 'paper', 'blind'), got 'x'"),
        ({"r1": -1}, "r1 must be >= 0, got -1"),
        ({"r2": -1}, "r2 must be >= 0, got -1"),
        ({"r2": 1.0}, "r2 must be an integer, got float 1.0"),
        ({"r_lock": -1}, "r_lock must be >= 0, got -1"),
        ({"r_lock": 1.5}, "r_lock must be an integer, got float 1.5"),
        ({"max_length": 0}, "max_length must be >= 1, got 0"),
        ({"max_length": 2.0}, "max_length must be an integer, got float 2.0"),
        ({"l_s": 0}, "l_s must be >= 1, got 0"),
        ({"l_e": 0}, "l_e must be >= 1, got 0"),
        ({"l_e": 1.0}, "l_e must be an integer, got float 1.0"),
        ({"beta": True}, "beta must be a real number, got bool True"),
        ({"beta": -1.0}, "beta must lie in [0, 1e+100], got -1.0"),
        ({"beta": 2e100}, "beta must lie in [0, 1e+100], got 2e+100"),
        ({"stage_beta": [("qkv", 1.0)]}, "stage_beta must be a mapping of kind to β or None, got list"),
        (
            {"stage_beta": {"qkv": 1.0, "zz": 1, "bad": 2.0}},
            "unknown stage_beta kind(s) ['bad', 'zz']; kinds are ('qkv', 'o', 'gate_up', 'down', 'router', "
            "'lm_head')",
        ),
        ({"stage_beta": {"o": -2.0}}, "stage_beta['o'] must lie in [0, 1e+100], got -2.0"),
        ({"stage_beta": {"o": True}}, "stage_beta['o'] must be a real number, got bool True"),
        ({"guard_ffn": "x"}, "guard_ffn must be 'clear' or 'blinded', got 'x'"),
        ({"last_ffn": "x"}, "last_ffn must be 'exact' or 'paper', got 'x'"),
        ({"attention": "x"}, "attention must be 'server' or 'client', got 'x'"),
        ({"gen_attention": "x"}, "gen_attention must be 'client' or 'server', got 'x'"),
        (
            {"attention": "client", "gen_attention": "server"},
            "gen_attention='server' contradicts attention='client' (the client computes every guard block's "
            "attention, in generation as well)",
        ),
        ({"gen_linear": "x"}, "gen_linear must be 'client' or 'server', got 'x'"),
        ({"blind_dtype": "x"}, "blind_dtype must be 'auto', 'backend' or 'float64', got 'x'"),
        ({"decoys": "x"}, "decoys must be 'calibration' or 'gaussian', got 'x'"),
        ({"verify": 1}, "verify must be True or False, got 1"),
        (
            {"level": np.array(["paper"])},
            "level must be one of ('permute', 'paper', 'blind'), got array(['paper'], dtype='<U5')",
        ),
    ],
    ids=[
        "level",
        "r1",
        "r2",
        "r2-float",
        "r_lock",
        "r_lock-float",
        "max_length",
        "max_length-float",
        "l_s",
        "l_e",
        "l_e-float",
        "beta-bool",
        "beta-negative",
        "beta-huge",
        "stage_beta-list",
        "stage_beta-kinds",
        "stage_beta-negative",
        "stage_beta-bool",
        "guard_ffn",
        "last_ffn",
        "attention",
        "gen_attention",
        "contradiction",
        "gen_linear",
        "blind_dtype",
        "decoys",
        "verify",
        "level-array",
    ],
)
def test_each_field_is_refused_by_name_with_what_it_must_be(fields: dict[str, Any], message: str) -> None:
    with refused(ConfigError, message):
        SCXConfig(**fields)


def test_no_decoys_is_a_configuration_and_r_lock_is_stored_as_an_int() -> None:
    """r1 = r2 = r_lock = 0 (no decoy rows) is allowed; a numpy r_lock is stored as ``int``, and
    :attr:`lock_decoys` is r_lock where given, else r1."""
    cfg = SCXConfig(r1=0, r2=0, r_lock=0)
    assert (cfg.r1, cfg.r2, cfg.r_lock, cfg.lock_decoys) == (0, 0, 0, 0)
    cfg = SCXConfig(r1=5, r_lock=np.int64(3))
    assert type(cfg.r_lock) is int and cfg.r_lock == 3 and cfg.lock_decoys == 3
    assert SCXConfig(r1=5).lock_decoys == 5


def test_what_a_checked_configuration_stores() -> None:
    """Integers as ``int``, βs as ``float``, named choices as ``str`` (numpy scalars converted), and
    ``stage_beta`` as a read-only mapping of its own (equal to a dict of the same items, shown as one):
    a later change to the caller's dict reaches neither the configuration nor its hash."""
    kinds = {"qkv": np.float32(2.5), "o": 3}
    cfg = SCXConfig(
        level=np.str_("blind"),
        r1=np.int64(3),
        r2=np.int32(1),
        l_s=np.int64(2),
        l_e=np.int16(1),
        max_length=np.int64(64),
        beta=np.float64(4.0),
        stage_beta=kinds,
        attention=np.str_("client"),
        decoys=np.str_("gaussian"),
    )
    stored = [
        cfg.level,
        cfg.r1,
        cfg.r2,
        cfg.l_s,
        cfg.l_e,
        cfg.max_length,
        cfg.beta,
        cfg.attention,
        cfg.decoys,
    ]
    assert [type(v) for v in stored] == [str, int, int, int, int, int, float, str, str]
    assert stored == ["blind", 3, 1, 2, 1, 64, 4.0, "client", "gaussian"]
    assert cfg.stage_beta == {"qkv": 2.5, "o": 3.0} and repr(cfg.stage_beta) == "{'qkv': 2.5, 'o': 3.0}"
    assert all(type(v) is float for v in cfg.stage_beta.values()) and len(cfg.stage_beta) == 2
    before = hash(cfg)
    kinds["qkv"] = 9.0
    assert cfg.stage_beta["qkv"] == 2.5 and hash(cfg) == before
    with pytest.raises(TypeError):
        cfg.stage_beta["qkv"] = 1.0  # type: ignore[index]

"""The field checkers of :mod:`scx_ref.protocol.limits` on their own: every boundary, every refusal's whole
message (it names the field and shows the value), and the documented defaults of :class:`ServerLimits`.

``tests/test_limits.py`` drives them through the server (a refused request changes nothing); here each
checker's contract is pinned down directly, so a bound that moves by one or a message that loses the field
name fails a test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.protocol.limits import (
    ServerLimits,
    field_bool,
    field_experts,
    field_hex,
    field_int,
    field_str,
    known_fields,
)


def test_accepted_values_and_their_types() -> None:
    for value in (0, 5, 3, np.int64(2), np.uint8(5)):
        got = field_int(value, "n", 0, 5)
        assert got == int(value) and type(got) is int
    assert field_int(-(1 << 62), "n", -(1 << 62), 0) == -(1 << 62)
    assert field_bool(True, "wide") is True and field_bool(False, "wide") is False
    assert field_str("b", "level", ("a", "b")) == "b"
    assert field_hex("0123456789abcdef", "salt", 16) == "0123456789abcdef"
    assert field_hex("", "salt", 0) == ""
    assert field_experts([0, 3], 4, 2) == [0, 3]
    assert field_experts((np.int64(1),), 4, 2) == [1]
    assert all(type(e) is int for e in field_experts([np.int32(0), np.int64(2)], 4, 2))
    known_fields({"a": 1}, frozenset({"a", "b"}), "open message")
    known_fields({}, frozenset(), "close message")


REFUSED: list[tuple[str, Callable[[], Any], str]] = [
    ("int-bool", lambda: field_int(True, "n", 0, 5), "n must be an integer, got bool True"),
    ("int-float", lambda: field_int(1.0, "n", 0, 5), "n must be an integer, got float 1.0"),
    ("int-str", lambda: field_int("3", "layer", 0, 5), "layer must be an integer, got str '3'"),
    ("int-long-repr", lambda: field_int("x" * 50, "n", 0, 5), "n must be an integer, got str '" + "x" * 39),
    ("int-above", lambda: field_int(6, "n", 0, 5), "n must lie in [0, 5], got 6"),
    ("int-below", lambda: field_int(-1, "n", 0, 5), "n must lie in [0, 5], got -1"),
    ("int-numpy-above", lambda: field_int(np.int64(6), "step", 0, 5), "step must lie in [0, 5], got 6"),
    ("bool-int", lambda: field_bool(1, "wide"), "wide must be true or false, got int 1"),
    ("bool-str", lambda: field_bool("yes", "trace"), "trace must be true or false, got str 'yes'"),
    (
        "bool-numpy",
        lambda: field_bool(np.bool_(True), "last"),
        f"last must be true or false, got {type(np.bool_(True)).__name__} {np.bool_(True)!r}",
    ),
    ("str-choice", lambda: field_str("c", "level", ("a", "b")), "level must be one of ['a', 'b'], got 'c'"),
    (
        "str-type",
        lambda: field_str(1, "attention", ("server",)),
        "attention must be one of ['server'], got 1",
    ),
    ("hex-short", lambda: field_hex("abc", "salt", 4), "salt must be 4 lowercase hex digits, got 'abc'"),
    ("hex-upper", lambda: field_hex("ABCD", "salt", 4), "salt must be 4 lowercase hex digits, got 'ABCD'"),
    ("hex-x", lambda: field_hex("abXX", "commit", 4), "commit must be 4 lowercase hex digits, got 'abXX'"),
    ("hex-g", lambda: field_hex("000g", "commit", 4), "commit must be 4 lowercase hex digits, got '000g'"),
    ("hex-type", lambda: field_hex(1234, "commit", 4), "commit must be 4 lowercase hex digits, got 1234"),
    (
        "hex-bytes",
        lambda: field_hex(b"abcd", "commit", 4),
        "commit must be 4 lowercase hex digits, got b'abcd'",
    ),
    (
        "experts-empty",
        lambda: field_experts([], 4, 2),
        "experts must be a list of 1 to 2 expert ids, got list []",
    ),
    (
        "experts-too-many",
        lambda: field_experts([0, 1, 2], 4, 2),
        "experts must be a list of 1 to 2 expert ids, got list [0, 1, 2]",
    ),
    (
        "experts-str",
        lambda: field_experts("01", 4, 2),
        "experts must be a list of 1 to 2 expert ids, got str '01'",
    ),
    (
        "experts-array",
        lambda: field_experts(np.array([0]), 4, 2),
        "experts must be a list of 1 to 2 expert ids, got ndarray array([0])",
    ),
    ("experts-range", lambda: field_experts([0, 4], 4, 2), "an expert id must lie in [0, 3], got 4"),
    ("experts-negative", lambda: field_experts([-1], 4, 2), "an expert id must lie in [0, 3], got -1"),
    ("experts-type", lambda: field_experts([0.0], 4, 2), "an expert id must be an integer, got float 0.0"),
    (
        "experts-unsorted",
        lambda: field_experts([1, 0], 4, 2),
        "experts must be sorted and free of repeats, got [1, 0]",
    ),
    (
        "experts-repeat",
        lambda: field_experts([2, 2], 4, 2),
        "experts must be sorted and free of repeats, got [2, 2]",
    ),
    (
        "unknown-fields",
        lambda: known_fields({"z": 1, "a": 2, "y": 3}, frozenset({"a", "b"}), "open message"),
        "open message carries unknown field(s) ['y', 'z']; allowed: ['a', 'b']",
    ),
]


@pytest.mark.parametrize(("call", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refusals_name_the_field_and_show_the_value(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        call()
    assert str(info.value) == message


def test_server_limits_defaults_and_checks() -> None:
    lim = ServerLimits()
    assert (lim.max_sessions, lim.max_rows, lim.max_decoys) == (256, 1 << 15, 256)
    assert (lim.max_message_bytes, lim.max_cache_bytes, lim.idle_ttl) == (256 << 20, 8 << 30, 600.0)
    assert (lim.nonce_memory, lim.commit_memory) == (1 << 17, 1 << 17)
    ones = ServerLimits(1, 1, 1, 1, 1, 0.001, 1, 1)  # every limit at its smallest
    assert ones.max_sessions == ones.commit_memory == 1 and ones.idle_ttl == 0.001
    assert ServerLimits(idle_ttl=5).idle_ttl == 5  # an int number of seconds is fine
    for name in ("max_sessions", "max_rows", "max_decoys", "max_message_bytes", "max_cache_bytes"):
        for bad in (0, -1, True, 2.0, "3"):
            with pytest.raises(ConfigError) as info:
                ServerLimits(**{name: bad})
            assert str(info.value) == f"{name} must be an integer >= 1, got {bad!r}"
    for name in ("nonce_memory", "commit_memory"):
        with pytest.raises(ConfigError, match=f"^{name} must be an integer >= 1, got 0$"):
            ServerLimits(**{name: 0})
    for bad_ttl, rule in (
        (0, "be > 0"),
        (-1.0, "be > 0"),
        (math.inf, "be finite and > 0"),
        (math.nan, "be finite and > 0"),
        (True, "be a real number, got bool"),
        ("60", "be a real number, got str"),
        (None, "be a real number, got NoneType"),
    ):
        with pytest.raises(ConfigError) as info:
            ServerLimits(idle_ttl=bad_ttl)  # type: ignore[arg-type]
        assert str(info.value) == f"idle_ttl must {rule}{'' if 'got' in rule else ', got'} {bad_ttl!r}"

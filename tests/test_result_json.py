"""Result files are strict JSON: one writer (:func:`scx_ref._files.result_json`) for every ``--json``, and
the readers take back what it writes (an infinity as the text ``"inf"``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref._files import json_ready, result_json
from scx_ref.attacks import cli, frontier, tables


def _strict(text: str) -> Any:
    def refuse(const: str) -> None:
        raise AssertionError(f"not strict JSON: {const}")

    return json.loads(text, parse_constant=refuse)


def test_json_ready_carries_every_non_finite_float_and_numpy_value_as_strict_json() -> None:
    value = {
        "a": [float("inf"), -math.inf, float("nan"), 1.5],
        "b": (np.float32(np.inf), np.float64(-np.inf), np.float32(np.nan), np.float32(0.25)),
        "c": {"d": np.int64(7), "e": np.bool_(True), "f": np.array([[1.0, np.inf]])},
        "g": "inf",
        "h": None,
    }
    back = _strict(result_json(value))
    assert back == {
        "a": ["inf", "-inf", None, 1.5],
        "b": ["inf", "-inf", None, 0.25],
        "c": {"d": 7, "e": True, "f": [[1.0, "inf"]]},
        "g": "inf",
        "h": None,
    }
    assert float(back["a"][0]) == math.inf and float(back["a"][1]) == -math.inf
    assert value["a"][0] == math.inf  # the value itself is not changed
    assert json_ready([np.float64(2.0)]) == [2.0] and type(json_ready([np.float64(2.0)])[0]) is float


def test_result_json_refuses_a_non_finite_float_that_default_returns() -> None:
    """``default``'s own return value is not made ready: a NaN from it is refused, not written as NaN."""

    class Odd:
        pass

    with pytest.raises(ValueError):
        result_json({"x": Odd()}, default=lambda _o: float("nan"))


def _setting(name: str) -> dict[str, Any]:
    return {
        "setting": name,
        "preset": name,
        "metrics": {"head_next_bag_recall": 0.1},
        "at_baseline": {"head_next_bag_recall": True},
        "rates": {},
        "mechanism": name,
        "config": {"level": "paper", "r1": 0, "r2": 0, "beta": 1.0, "l_s": 1, "l_e": 1},
    }


def test_an_attack_result_with_infinite_ppl_and_exactness_is_strict_and_reads_back(tmp_path: Path) -> None:
    """An infinite statelessness perplexity and an infinite exactness error (a configuration whose output
    diverged) were written as the bare token ``Infinity``; now as ``"inf"``, which the tables and the
    frontier take back and show."""
    s = _setting("paper")
    s["statelessness"] = {"normal": {"ppl": float("inf"), "top1": 0.0, "emb_sim": 0.5}}
    s["exactness"] = {"max_rel_logit_err": float("inf")}
    s["exactness32"] = {"rel_delta_ppl": float("inf"), "greedy_identical": "0/8", "pass": False}
    result = {"settings": [s]}
    path = tmp_path / "r.json"
    cli._write_json(path, result)
    back = _strict(path.read_text())
    got = back["settings"][0]
    assert got["statelessness"]["normal"]["ppl"] == "inf"
    assert got["exactness"]["max_rel_logit_err"] == "inf"
    assert got["exactness32"]["rel_delta_ppl"] == "inf"
    tables.check_result(back, full=False)
    assert "∞ / 0.00" in tables.markdown_table(back)
    table = frontier.frontier_markdown(frontier.frontier_rows(back))
    assert "| inf · inf ✗ (0/8) |" in table

"""The frontier and ``scx attack``: the verdict "every attack at baseline" counts only judged
attacks, the ``--json`` file is strict JSON and describes the run from its start, and the view readers
refuse a view of several sessions (or a malformed key-sharing message) instead of mixing requests."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import _view, cli, frontier, harness
from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.protocol import Stage
from scx_ref.protocol.presets import preset
from scx_ref.protocol.transport import ServerView

from .tiny import tiny_weights


def _rate(p: float) -> dict[str, float]:
    return {"rate": p, "lo": max(p - 0.1, 0.0), "hi": min(p + 0.1, 1.0), "k": p * 10, "n": 10.0}


def _setting(name: str, preset_name: str | None, rates: dict[str, float], verdicts: dict[str, bool]) -> Any:
    return {
        "setting": name,
        "preset": preset_name,
        "metrics": dict(rates),
        "rates": {k: _rate(v) for k, v in rates.items()},
        "baselines": {"prompt_bag": _rate(0.1)},
        "at_baseline": verdicts,
        "cost": {"client_flop_share": 0.1, "offline_flop_share": 0.0},
    }


def test_an_attack_scored_without_a_verdict_is_not_at_baseline() -> None:
    """A setting whose ``rates`` hold an attack with no verdict (a hand-edited or another version's file)
    is not "every attack at baseline": the unjudged attack recovered everything."""
    ctl = _setting("plaintext", None, {"vm_qkv1_bag_recall": 1.0}, {"vm_qkv1_bag_recall": False})
    bad = _setting(
        "permute",
        "permute",
        {"vm_qkv1_bag_recall": 1.0, "head_next_bag_recall": 0.1},
        {"head_next_bag_recall": True},
    )
    rows = frontier.frontier_rows({"settings": [ctl, bad]})
    assert not rows[1]["all_at_baseline"] and rows[1]["above_baseline"] == ["vm_qkv1_bag_recall"]
    assert frontier.cheapest_at_baseline(rows) is None
    # judged at baseline on every attack it scored: it counts (and of two equal costs the earlier wins)
    good = _setting("paper", "paper", {"head_next_bag_recall": 0.1}, {"head_next_bag_recall": True})
    also = _setting("blind", "blind", {"head_next_bag_recall": 0.1}, {"head_next_bag_recall": True})
    rows = frontier.frontier_rows({"settings": [ctl, bad, good, also]})
    best = frontier.cheapest_at_baseline(rows)
    assert best is not None and best["name"] == "paper"


def test_json_is_strict_with_an_infinite_dp_epsilon(tmp_path: Path) -> None:
    """An un-noised configuration's ε = ∞ is written as ``"inf"`` (strict JSON, as ``scx dp --json``), read
    back by the frontier as ∞; the result in memory keeps its float."""
    s = _setting("permute", "permute", {"head_next_bag_recall": 0.1}, {"head_next_bag_recall": True})
    s["dp"] = {"epsilon_request": float("inf"), "epsilon_prefill": float("inf"), "exposures": ["a"]}
    result = {"settings": [s]}
    path = tmp_path / "f.json"
    cli._write_json(path, result)

    def refuse(const: str) -> None:
        raise AssertionError(f"not strict JSON: {const}")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back["settings"][0]["dp"]["epsilon_request"] == "inf"
    assert s["dp"]["epsilon_request"] == float("inf")
    assert "∞ · ∞" in frontier.frontier_markdown(frontier.frontier_rows(back))


@pytest.mark.slow
def test_frontier_json_says_incomplete_when_cut_before_any_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--frontier --json`` run cut short before its first configuration finished leaves a readable
    file of this run saying nothing was measured — not an earlier run's complete result."""
    from scx_ref.cli import main

    out = tmp_path / "f.json"
    out.write_text(json.dumps({"kind": "frontier", "complete": True, "command": "an earlier run"}))

    def cut(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_setting", cut)
    argv = ["attack", "--model", "tiny-llama", "--frontier", "--quick", "--prompts", "1", "--length", "4"]
    argv += ["--new", "2", "--configs", "permute", "--threads", "1", "--json", str(out)]
    assert main(argv) == 130  # Ctrl-C: "scx attack: interrupted"
    res = json.loads(out.read_text())
    assert res["complete"] is False and res["settings"] == [] and res["missing"] == ["plaintext", "permute"]
    assert "--configs permute" in res["command"]
    assert "Incomplete run" in frontier.frontier_report(res)


Views = tuple[Any, ServerView, ServerView]


@pytest.fixture(scope="module")
def two_views() -> Views:
    w = tiny_weights(0)
    cfg = preset("paper").config(4)
    one, _ = harness.server_view(w, [1, 2, 3, 4, 5], cfg, n_new=3)
    two, _ = harness.server_view(w, [7, 8, 9], cfg, n_new=3, seed=1)
    return w, one, two


def test_view_readers_refuse_a_view_of_several_sessions(two_views: Views) -> None:
    """Two requests recorded by one transport: reading "the" QKV message or the shared caches would mix
    one request's rows with the other's permutation (a raw ValueError, or silently wrong caches)."""
    w, one, two = two_views
    both = ServerView(one.messages + two.messages, one.replies + two.replies)
    for read in (
        lambda: _view.shared_caches(both, w),
        lambda: _view.open_meta(both),
        lambda: _view.message(both, Stage.QKV, 1),
        lambda: _view.raw_qkv(both, w, 1),
    ):
        with pytest.raises(ProtocolError, match="2 sessions"):
            read()
    assert set(_view.shared_caches(one, w)) == {1, 2}  # one session: read as before


def test_shared_caches_refuse_a_malformed_share_message(two_views: Views) -> None:
    """A shared ``perm`` that is not a permutation of the block's rows is a ProtocolError, not an
    IndexError / ValueError from numpy (or caches read through a repeated row)."""
    w, one, _ = two_views
    i = next(k for k, m in enumerate(one.messages) if m.stage is Stage.SHARE)
    share = one.messages[i]
    rows = len(share.arrays["perm"])
    for perm in (np.zeros(rows, dtype=np.int64), np.arange(rows - 1), np.arange(rows) + 1):
        bad = replace(share, arrays={**share.arrays, "perm": perm})
        view = ServerView([*one.messages[:i], bad, *one.messages[i + 1 :]])
        with pytest.raises(ProtocolError, match="perm"):
            _view.shared_caches(view, w)


def test_message_layer_and_step_are_checked(two_views: Views) -> None:
    """``layer=True`` compared as given equals 1 and picked block 1's message; a float layer likewise."""
    _, one, _ = two_views
    for layer in (True, 1.0):
        with pytest.raises(ConfigError):
            _view.message(one, Stage.QKV, layer)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        _view.message(one, Stage.GEN_MID, 1, step=True)
    assert _view.message(one, Stage.GEN_MID, 1, step=1).step == 1

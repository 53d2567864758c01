"""``scx attack`` on a model too small for middle blocks, and its option checks: every option it would
ignore or could not honour is refused with exit status 2 and a one-line ``error:`` naming the option,
before any model loads; every option's help shows its default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import harness
from scx_ref.attacks.cli import public_and_victims
from scx_ref.cli import build_parser, main
from scx_ref.errors import ConfigError
from scx_ref.weights import random_weights
from tests.tiny import tiny_config


def _topic_lengths() -> list[int]:
    """Characters of each victim topic's body (the odd-indexed pydoc topics, after title and underline):
    a victim prompt of ``length`` tokens needs a body of more than 16 characters per token."""
    from scx_ref.zoo.corpus import topic_texts

    parts = [t.split("\n\n", 1) for t in topic_texts()[1::2]]
    return [len((p[1] if len(p) == 2 else p[0]).strip()) for p in parts]


def _longest() -> int:
    return (max(_topic_lengths()) - 1) // 16


def _long_enough(length: int) -> int:
    return sum(n > 16 * length for n in _topic_lengths())


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage error
        return int(exc.code or 0)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ``scx`` on ``argv``, which must be refused before any model loads; return the error line."""

    def no_load(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("scx_ref.attacks.cli.load_model", no_load)
    assert _exit_code(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_every_block_a_guard_probe_block_inverters_are_complete() -> None:
    """On a 2-block model every default setting's blocks are guards (no middle block), so the probe
    block is block 2 (0-based 1). Fitting only the per-layer curve's inverters there (what ``scx attack
    --model tiny-llama`` did) must leave the tools consistent: the σ-recovery attack, run whenever the
    plain-V inverter exists, has its public reference (was: KeyError 1 after the first step)."""
    w = random_weights(tiny_config(n_layers=2, max_positions=128), np.random.default_rng(0))
    L = w.config.n_layers
    settings = harness.default_settings(quick=True)
    assert all(len(s.config.blocks(L)[1]) == 0 for s in settings)  # the premise: no middle block
    assert {harness.probe_block(s.config, L) for s in settings} == {1}
    ctx = harness.Context(w, np.random.default_rng(1).integers(0, w.config.vocab_size, 256), None)
    harness.fit_tools(ctx, [], mlp=False, per_layer=[0, 1])
    assert set(ctx.middle_ref) == {0, 1}
    victim = np.random.default_rng(2).integers(0, w.config.vocab_size, 6)
    res = harness.run_setting(ctx, settings[0], [victim], n_new=2, per_layer=[0, 1])
    assert res["probe_block"] == 1
    assert "inv_attn_sigma_rec_pos_acc" in res["metrics"] and "inv_attn_naive_pos_acc" in res["metrics"]


def test_scx_attack_quick_runs_on_tiny_llama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``scx attack --model tiny-llama --quick`` (fewer, shorter prompts) runs every setting to the end
    (was: KeyError after 1 step), and the probe block's FFN inverters are fitted and scored there too
    (the CLI fitted tools only for middle blocks, which tiny-llama's settings do not have)."""
    out = tmp_path / "a.json"
    argv = ["attack", "--model", "tiny-llama", "--quick", "--threads", "1", "--prompts", "1"]
    argv += ["--length", "4", "--new", "2", "--json", str(out)]
    assert main(argv) == 0
    assert "| attack |" in capsys.readouterr().out
    res = json.loads(out.read_text())
    names = [s["setting"] for s in res["settings"]]
    assert names == [s.name for s in harness.default_settings(quick=True)]
    for s in res["settings"]:
        assert s["probe_block"] == 1
        assert "inv_ffn_ridge_bag_recall" in s["metrics"] and "inv_attn_sigma_rec_pos_acc" in s["metrics"]


def test_length_longer_than_any_topic_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--length 100000`` (no victim topic that long: was IndexError): exit 2 naming ``--length`` and
    the longest length there is, before any model loads. Control: that longest length has a topic."""
    longest = _longest()
    line = _refused(["attack", "--model", "tiny-llama", "--length", "100000", "--quick"], capsys, monkeypatch)
    assert "--length 100000" in line and f"longest --length is {longest}" in line
    line = _refused(
        ["attack", "--frontier", "--length", str(longest + 1), "--prompts", "1"], capsys, monkeypatch
    )
    assert "--length" in line


def test_more_prompts_than_long_enough_topics_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More ``--prompts`` than topics of that ``--length`` (was: the same topic repeated, silently)."""
    longest = _longest()
    n = _long_enough(longest)
    line = _refused(["attack", "--length", str(longest), "--prompts", str(n + 1)], capsys, monkeypatch)
    assert "--prompts" in line and "--length" in line and f"only {n}" in line


def test_public_and_victims_refuses_what_it_cannot_draw() -> None:
    """The library function behind the option: ConfigError, never an IndexError or repeated prompts.
    Control: a length it can draw gives distinct prompts of exactly that length."""
    with pytest.raises(ConfigError, match="--length"):
        public_and_victims(None, 512, 64, 1, 100_000)
    longest = _longest()
    with pytest.raises(ConfigError, match="--prompts"):
        public_and_victims(None, 512, 64, _long_enough(longest) + 1, longest)
    public, victims = public_and_victims(None, 512, 64, 3, 8)
    assert len(public) == 64 and [len(v) for v in victims] == [8, 8, 8]
    assert len({tuple(v.tolist()) for v in victims}) == 3


def test_victim_topic_helpers() -> None:
    """The longest --length the CLI names has a topic, one more has none; the topics counted are those
    long enough."""
    from scx_ref.attacks.cli import max_victim_length, victim_topics

    assert max_victim_length() == _longest()
    assert len(victim_topics(_longest())) == _long_enough(_longest()) >= 1
    assert not victim_topics(_longest() + 1) and len(victim_topics(8)) == _long_enough(8)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--configs", "paper"], "--configs"),
        (["--exactness"], "--exactness"),
        (["--bench", "README.md"], "--bench"),
        (["--quick", "--configs", "paper,blind", "--exactness"], "--configs, --exactness"),
    ],
)
def test_frontier_options_without_frontier_are_refused(
    extra: list[str], named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--configs``, ``--exactness`` and ``--bench`` are read only by ``--frontier``: without it they
    were silently ignored; now exit 2 naming them and ``--frontier``."""
    line = _refused(["attack", "--model", "tiny-llama", *extra], capsys, monkeypatch)
    assert named in line and "--frontier" in line


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--configs", ","], "--configs"),
        (["--configs", "paper,bogus"], "bogus"),
        (["--bench", "README.md"], "--bench"),
    ],
)
def test_bad_frontier_options_are_refused_before_loading(
    extra: list[str], named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--frontier``: no configuration named, an unknown one, or a ``--bench`` file that is not an
    ``scx bench --json`` result (was read after the whole run) — refused before the model loads."""
    line = _refused(["attack", "--model", "tiny-llama", "--frontier", *extra], capsys, monkeypatch)
    assert named in line


def test_bench_file_of_the_wrong_shape_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON ``--bench`` without rows, or with a row the frontier table cannot read, is refused."""
    bad: Any
    for bad in ({"meta": {}}, {"rows": [{"phase": "prefill", "ratio_median": 1.5}]}, [1, 2]):
        path = tmp_path / "b.json"
        path.write_text(json.dumps(bad))
        line = _refused(["attack", "--frontier", "--bench", str(path)], capsys, monkeypatch)
        assert "--bench" in line


def test_every_attack_option_has_help_with_its_default() -> None:
    """Every option of ``scx attack`` has help text, and the help says its default."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    attack = sub.choices["attack"]  # type: ignore[index]
    options = [a for a in attack._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"model", "json", "plots", "quick", "frontier", "configs"}
    for action in options:
        assert action.help, action.option_strings
        assert "default" in action.help, (action.option_strings, action.help)

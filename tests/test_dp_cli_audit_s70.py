"""Audit of ``scx dp`` and the permutation bounds (DESIGN §7): the prompt-order bound stays a number for
prompts past 10¹⁶⁰ rows with 2²⁰ decoys or more (it was NaN, printed as "nan bits" and written as null),
and ``--beta`` at level permute is refused as the ignored option it is (as ``scx ppl`` and ``scx verify``
refuse it), the head no longer naming a β for a configuration that adds no noise; a PLD ε above a closed
form that holds at the same δ is called the looser bound it is (the DESIGN's tight number is not that)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import scx_ref.dp.cli as dp_cli
from scx_ref.cli import main
from scx_ref.dp.accountants import pld_available
from scx_ref.dp.permutation import _log_rising, log2_factorial, permutation_bits, prompt_order_bits

#: (n, r) where the Stirling branch of the prompt-order bound squared x = n / (r + 1) past float64
_HUGE = [(10**170, 2**20), (10**250, 2**20), (10**170, 10**9), (10**300, 10**100)]


@pytest.mark.parametrize(("n", "r"), _HUGE)
def test_prompt_order_bits_of_a_huge_prompt_with_decoys_is_a_number(n: int, r: int) -> None:
    """log₂((n + r)!/r!) = log₂((n + r)!) − log₂(r!), and it lies between log₂(n!) and log₂((n + r)!) (to
    float rounding: here the three differ by far less than one part in 10¹⁶)."""
    bits = prompt_order_bits(n, r)
    assert not math.isnan(bits)
    assert bits == pytest.approx(permutation_bits(n, r) - log2_factorial(r), rel=1e-12)
    assert log2_factorial(n) * (1 - 1e-12) <= bits <= permutation_bits(n, r) * (1 + 1e-12)


@pytest.mark.parametrize(("n", "r"), [(4097, 2**20), (5000, 2**21), (10**5, 10**12)])
def test_stirling_branch_still_agrees_with_the_direct_sum(n: int, r: int) -> None:
    """The rewritten last term of the Stirling branch keeps it exact to float rounding where it was."""
    exact = math.fsum(math.log(r + i) for i in range(1, n + 1))
    assert _log_rising(r, n) == pytest.approx(exact, rel=1e-13)


def test_cli_prints_and_writes_the_prompt_order_bits_of_a_huge_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.json"
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--no-pld"]
    argv += ["--prompt-len", str(10**170), "--decoys", str(2**20), "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower()
    value = json.loads(out.read_text())["prompt_order_bits_per_stage"]
    assert isinstance(value, float) and math.isfinite(value)
    assert value == pytest.approx(permutation_bits(10**170, 2**20) - log2_factorial(2**20), rel=1e-12)


def _no_load(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a model was loaded before the options were checked")


@pytest.mark.parametrize("beta", ["3", "5", "qkv=3,default=5"])
def test_beta_at_level_permute_is_refused_before_loading(
    beta: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dp_cli, "load_weights", _no_load)
    assert main(["dp", "--model", "tiny-llama", "--level", "permute", "--beta", beta]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and "--beta" in err and "permute" in err


@pytest.mark.parametrize("mode", [["--level", "permute"], ["--config", "permute"]])
def test_level_permute_head_names_no_beta(mode: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--no-pld", *mode]
    assert main(argv) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "level=permute" in head and "beta=none" in head and "beta=5" not in head


def test_beta_at_a_noised_level_is_still_taken(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dp", "--model", "random:tiny-dense", "--embedding", "bound", "--no-pld", "--beta", "3"]
    assert main(argv) == 0
    assert "level=paper" in (head := capsys.readouterr().out.splitlines()[0]) and "beta=3 " in head


needs_pld = pytest.mark.skipif(not pld_available(), reason="dp_accounting not installed")


def _dp(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "dp.json"
    assert main(["dp", *argv, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


@needs_pld
def test_pld_above_a_closed_form_at_the_same_delta_is_called_looser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ε = 0.2 at --pld-interval 5: dp_accounting rounds the loss up to 5, so its ε (≈ 5) is far above the
    basic ε = 0.2 that holds at every δ; the output says the PLD row is the looser one, and which holds."""
    text, data = _dp(["--sensitivity", "1", "--pld-interval", "5"], tmp_path, capsys)
    assert data["epsilon_pld"] > data["epsilon_basic"] == 0.2 == data["epsilon_best"]
    note = next(line for line in text.splitlines() if line.startswith("note: PLD epsilon = "))
    assert "above the basic epsilon = 0.2" in note and "the best epsilon at this delta is 0.2" in note
    assert any(n.startswith("PLD epsilon = ") and "above the basic" in n for n in data["notes"])


@needs_pld
def test_pld_above_the_model_budgets_basic_is_called_looser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", "random:tiny-dense", "--embedding", "bound", "--tokens", "2", "--pld-interval", "50"]
    text, data = _dp(argv, tmp_path, capsys)
    assert data["epsilon_pld"] > data["epsilon_basic"] == data["epsilon_best"]
    assert any("above the basic epsilon" in n for n in data["notes"])
    assert "note: PLD epsilon = " in text and "is above the basic epsilon" in text


@needs_pld
@pytest.mark.parametrize(
    "argv",
    [
        ["--sensitivity", "1", "--scale", "1"],  # one release: the PLD is below ε = 1
        # the advanced ε at δ' = 0.5 is below the PLD's at δ = 1e-10, but holds at another δ: no note
        ["--sensitivity", "0.01", "-k", "10000", "--delta", "1e-10", "--delta-prime", "0.5"],
    ],
)
def test_no_looser_pld_note_where_no_closed_form_at_its_delta_is_below_it(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, data = _dp(argv, tmp_path, capsys)
    assert "above the" not in text and not any("above the" in n for n in data["notes"])

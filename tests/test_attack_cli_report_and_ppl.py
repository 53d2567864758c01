"""``scx attack``, the attack report (``python -m scx_ref.attacks.report``) and the zoo's
perplexity: options refused before any work (exit 2, one ``error:`` line), results written whole or not
at all, hand-edited results refused with a ConfigError instead of a KeyError, and perplexity checked
against a hand computation of exp(mean NLL) over the scored tokens (a mean NLL past the float64 range an
infinite PPL, not an OverflowError)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import harness, report, tables
from scx_ref.cli import main
from scx_ref.errors import ConfigError
from scx_ref.reference import ReferenceModel
from scx_ref.zoo import perplexity
from scx_ref.zoo.perplexity import compare_ppl, ppl_run, windows
from tests.documents import edited
from tests.tiny import tiny_weights


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage error
        return int(exc.code or 0)


def _no_load(*_a: Any, **_k: Any) -> Any:
    raise AssertionError("a model was loaded before the options were checked")


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ``scx`` on ``argv``, which must be refused before any model loads; the one error line."""
    monkeypatch.setattr("scx_ref.attacks.cli.load_model", _no_load)
    assert _exit_code(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("scx attack: error:"), lines[0]
    return lines[0]


# -- scx attack: options ---------------------------------------------------------------------------------


def test_attack_threads_past_the_limit_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: torch.set_num_threads' raw ``ValueError: Overflow when unpacking long`` (a traceback)."""
    line = _refused(["attack", "--model", "tiny-llama", "--threads", "99999999999"], capsys, monkeypatch)
    assert "--threads" in line and "<= 1024" in line


@pytest.mark.parametrize(
    ("argv", "needed"),
    [
        (["--new", "5000"], 16 + 4999),  # the ablation's default --length 16
        (["--frontier", "--prompts", "1", "--length", "3100", "--new", "998"], 4097),
    ],
)
def test_attack_prompt_and_generation_past_the_models_positions_is_refused(
    argv: list[str], needed: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: accepted, the inverters fitted, then a ProtocolError at the first request's decode (minutes
    into a SmolLM2 run)."""
    line = _refused(["attack", "--model", "tiny-llama", *argv], capsys, monkeypatch)
    assert f"needs {needed} positions" in line and "4096" in line


def test_attack_prompt_and_generation_at_the_positions_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is exact: the last generated token is never fed back, so length + new − 1 positions."""
    monkeypatch.setattr("scx_ref.attacks.cli.load_model", _no_load)
    argv = ["attack", "--model", "tiny-llama", "--frontier", "--prompts", "1", "--length", "3100"]
    with pytest.raises(AssertionError, match="a model was loaded"):  # past the checks: the model loads
        main([*argv, "--new", "997"])


@pytest.mark.parametrize("where", ["", "frontier.png", "attacks_by_setting.png"])
def test_attack_json_where_a_plot_goes_is_refused(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: accepted; the JSON then written where the plots go, and the plots failing (or overwriting it)
    after the whole run."""
    plots = tmp_path / "plots"
    plots.mkdir()
    target = plots / where if where else tmp_path / "plots"
    if not where:  # --json names the (not yet created) plot directory itself
        plots.rmdir()
    argv = ["attack", "--model", "tiny-llama", "--json", str(target), "--plots", str(plots)]
    line = _refused(argv, capsys, monkeypatch)
    assert "--json" in line and "--plots" in line


def _canned_result() -> dict[str, Any]:
    return {
        "model": "tiny",
        "n_prompts": 1,
        "prompt_len": 2,
        "n_new": 0,
        "settings": [
            {
                "setting": "plaintext",
                "mechanism": "none (control)",
                "config": {"level": "permute", "r1": 0, "r2": 0, "beta": 5.0, "l_s": 1, "l_e": 1},
                "identity_roles": ["head", "lock", "tok"],
                "metrics": {"vm_qkv1_bag_recall": 1.0},
                "statelessness": {
                    "normal": {"ppl": 6.5, "top1": 1.0},
                    "no-prompt": {"ppl": 2000.0, "top1": 0.0},
                },
                "per_layer": {"inv_cache_ridge": {"0": 1.0, "1": 0.5}},
            },
            {
                "setting": "paper b=5",
                "mechanism": "+ Laplace",
                "config": {"level": "paper", "r1": 4, "r2": 4, "beta": 5.0, "l_s": 1, "l_e": 1},
                "metrics": {"vm_qkv1_bag_recall": 0.25},
                "statelessness": {"normal": {"ppl": 7.0, "top1": 0.5}},  # one policy fewer
            },
        ],
        "noise_fitting": {"0.1": {"fixed/ridge": 1.0, "one-time/ridge": 0.0}},
        "enumeration": {"r=0": 1.0},
        "enumeration_n": 2,
        "search_space": [{"stage": "qkv", "layer": 0, "rows": 6, "n": 2, "bits": 9.0}],
    }


def _stub_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``scx attack``'s run instant: a tiny model, no fitting, a canned result."""
    w = tiny_weights(0)
    monkeypatch.setattr("scx_ref.attacks.cli.load_model", lambda *_a, **_k: (None, None, w))
    monkeypatch.setattr(harness, "fit_tools", lambda *_a, **_k: None)
    monkeypatch.setattr(harness, "run_all", lambda *_a, **_k: _canned_result())


def test_attack_json_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (a full disk) leaves the previous results file as it was and no
    ``.part`` behind; exit 2 with one error line. Was: the target truncated to the half written."""
    _stub_run(monkeypatch)
    out = tmp_path / "res.json"
    argv = ["attack", "--model", "tiny-llama", "--quick", "--prompts", "1", "--length", "2", "--new", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"][0]["setting"] == "plaintext"
    before = out.read_bytes()
    real = Path.write_text

    def half(self: Path, text: str, *a: Any, **k: Any) -> int:
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    assert main([*argv, "--json", str(out)]) == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]


def test_attack_help_names_the_new_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["attack", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "at most 1024" in text and "--length + --new - 1 must fit the model's positions" in text


# -- the report of a results file ------------------------------------------------------------------------


def test_report_renders_the_canned_result_and_a_missing_policy_as_a_dash(tmp_path: Path) -> None:
    """A setting that ran fewer statelessness policies than the first shows – (was: KeyError 'no-prompt')."""
    text = tables.markdown_table(_canned_result())
    assert "| no-prompt | 2000.0 / 0.00 | – |" in text
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_canned_result()))
    assert report.main([str(src), "--out", str(tmp_path / "A.md")]) == 0
    assert "| normal | 6.5 / 1.00 | 7.0 / 0.50 |" in (tmp_path / "A.md").read_text()


_MALFORMED = {
    "statelessness not an object": (["settings", 0, "statelessness"], 5),
    "statelessness without ppl": (["settings", 0, "statelessness"], {"x": {"top1": 1.0}}),
    "noise fitting a list": (["noise_fitting"], [1, 2]),
    "noise fitting of different modes": (["noise_fitting", "0.3"], {"fixed/ridge": 1.0}),
    "noise fitting β not a number": (["noise_fitting"], {"b": {"fixed/ridge": 1.0}}),
    "enumeration of text": (["enumeration"], {"r=0": "x"}),
    "search space without layer": (["search_space"], [{"stage": "qkv"}]),
    "at_baseline a list": (["settings", 0, "at_baseline"], [1]),
    "config without level": (["settings", 0, "config", "level"], KeyError),
    "config r1 text": (["settings", 0, "config", "r1"], "four"),
    "per_layer block not a number": (["settings", 0, "per_layer"], {"inv_cache_ridge": {"x": 1.0}}),
    "identity_roles a number": (["settings", 0, "identity_roles"], 3),
    "cost a number": (["settings", 0, "cost"], 5),  # the frontier table's .get on it
    "exactness of text": (["settings", 0, "exactness"], {"max_rel_logit_err": "x"}),
    "dp a list": (["settings", 0, "dp"], [1]),
    "exactness32 a number": (["settings", 0, "exactness32"], 3),
    "rates a list": (["settings", 0, "rates"], [1]),  # was AttributeError from .items()
    "baselines a text": (["settings", 0, "baselines"], "x"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_report_refuses_a_malformed_result(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a raw TypeError/KeyError/AttributeError/ValueError traceback from the table or the report."""
    bad = edited(_canned_result(), *_MALFORMED[case])
    with pytest.raises(ConfigError):
        report.markdown_report(bad)
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(bad))
    with pytest.raises(SystemExit) as exc:
        report.main([str(src)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_report_refuses_options_it_would_ignore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--merged`` without ``--with``, ``--bench`` on a mechanism-ablation result: was silently ignored."""
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_canned_result()))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": []}))
    for argv, word in (
        ([str(src), "--merged", str(tmp_path / "m.json")], "--merged"),
        ([str(src), "--bench", str(bench)], "--bench"),
    ):
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {word}" in err
    assert not (tmp_path / "m.json").exists()


def test_report_out_is_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_canned_result()))
    out = tmp_path / "A.md"
    out.write_text("the previous report\n")
    real = Path.write_text

    def half(self: Path, text: str, *a: Any, **k: Any) -> int:
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(SystemExit) as exc:
        report.main([str(src), "--out", str(out)])
    assert exc.value.code == 2 and "cannot write" in capsys.readouterr().err
    assert out.read_text() == "the previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.md", "r.json"]


# -- perplexity ------------------------------------------------------------------------------------------


def _hand_ppl(ids: np.ndarray, window: int, ref: ReferenceModel) -> tuple[float, list[int]]:
    """exp(mean NLL) over every window's tokens 2..len, by an independent loop (math.fsum log-sum-exp);
    and the positions scored."""
    nll, scored = [], []
    for start in range(0, len(ids), window):
        win = ids[start : start + window]
        if len(win) < 2:
            continue
        logits = ref.prefill(win)[0]
        for t in range(len(win) - 1):
            row = [float(v) for v in logits[t]]
            top = max(row)
            lse = top + math.log(math.fsum(math.exp(v - top) for v in row))
            nll.append(lse - row[int(win[t + 1])])
            scored.append(start + t + 1)
    return math.exp(math.fsum(nll) / len(nll)), scored


@pytest.mark.parametrize(("n", "window"), [(23, 8), (25, 8), (24, 8), (12, 12), (12, 50), (2, 2)])
def test_perplexity_is_exp_of_the_mean_nll_over_the_scored_tokens(n: int, window: int) -> None:
    """Each window predicts its tokens 2..len: position 1 is the first scored, n − 1 the last (unless a
    1-token tail is dropped), every window start is unscored; PPL matches the hand computation."""
    ref = ReferenceModel(tiny_weights(3))
    ids = np.random.default_rng(n).integers(0, 32, n)
    seen: list[np.ndarray] = []

    def plain(x: np.ndarray) -> np.ndarray:
        seen.append(np.array(x))
        return np.asarray(ref.prefill(np.asarray(x))[0])

    res = compare_ppl(ids, window, plain, plain)
    want, scored = _hand_ppl(ids, window, ref)
    assert scored[0] == 1
    assert scored[-1] == (n - 2 if n % window == 1 else n - 1)
    assert not set(range(0, n, window)) & set(scored)
    assert res.predicted == len(scored)
    assert res.ppl_plain == pytest.approx(want, rel=1e-12) and res.ppl_scx == res.ppl_plain
    assert res.rel_delta_ppl == 0.0
    # the two sides each ran every window once, the windows in order and covering the tokens
    assert [len(s) for s in seen[::2]] == [s.stop - s.start for s in windows(n, window)]
    assert np.array_equal(np.concatenate(seen[::2]), ids[: sum(len(s) for s in seen[::2])])


def test_ppl_run_refuses_bad_calls_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: a window past the positions refused only after loading (for SmolLM2, after the download); a
    config of the wrong type a raw TypeError from dataclasses.replace; device 'gpu' torch's RuntimeError."""
    monkeypatch.setattr(perplexity, "load_model", _no_load)
    for kw, match in (
        (dict(window=5000, tokens=8192), "positions"),
        (dict(config=123), "config must be"),
        (dict(config={"level": "paper"}), "config must be"),
        (dict(device="gpu"), "unsupported device"),
        (dict(device="cuda:01"), "unsupported device"),
        (dict(window=1), "window"),
        (dict(tokens=1), "tokens"),
    ):
        args: dict[str, Any] = {"tokens": 64, "window": 32, **kw}
        with pytest.raises(ConfigError, match=match):
            ppl_run("tiny-llama", **args)
    with pytest.raises(ConfigError, match="unknown model"):
        ppl_run("gpt-5", tokens=64, window=32)


def test_compare_ppl_past_the_float64_range_is_inf_not_an_overflow() -> None:
    """Finite logits whose mean NLL passes ~709 (what a blind float32 sweep at a huge β reaches) give an
    infinite PPL and |ΔPPL|/PPL, not an OverflowError that loses the sweep; equal sides still give 0."""
    from scx_ref.zoo.perplexity import compare_ppl

    ids = np.array([0, 1, 0, 1, 0], dtype=np.int64)
    plain = np.zeros((5, 2), dtype=np.float64)
    wild = np.tile(np.array([[0.0, -1e4], [-1e4, 0.0]]), (3, 1))[:5]  # the next token always at -1e4
    r = compare_ppl(ids, 5, lambda w: plain[: len(w)], lambda w: wild[: len(w)])
    assert r.ppl_plain == pytest.approx(2.0) and math.isinf(r.ppl_scx)
    assert math.isinf(r.delta_ppl) and r.delta_ppl > 0 and math.isinf(r.rel_delta_ppl)
    same = compare_ppl(ids, 5, lambda w: wild[: len(w)], lambda w: wild[: len(w)])
    assert math.isinf(same.ppl_plain) and same.delta_ppl == 0.0 and same.rel_delta_ppl == 0.0


# -- the harness's block and setting arguments -----------------------------------------------------------
@pytest.fixture(scope="module")
def small_ctx() -> harness.Context:
    w = tiny_weights(0)  # 4 blocks
    return harness.Context(w, np.random.default_rng(5).integers(0, 32, 256), None, window=32)


@pytest.mark.parametrize("block", [4, -1, 99])
def test_fit_tools_refuses_a_block_outside_the_model(small_ctx: harness.Context, block: int) -> None:
    """Was: IndexError for 4 and 99; -1 silently fitted the last block's rows under the name 'kv-1'."""
    with pytest.raises(ConfigError, match=r"block must lie in \[0, 3\]"):
        harness.fit_tools(small_ctx, [block], mlp=False)
    with pytest.raises(ConfigError, match=r"block must lie in \[0, 3\]"):
        harness.fit_tools(small_ctx, [], mlp=False, per_layer=[block])
    assert not any(k.startswith(f"kv{block}/") for k in small_ctx.inverters)


def test_run_setting_and_run_all_refuse_what_they_cannot_run(small_ctx: harness.Context) -> None:
    """Was: a per-layer block outside the model silently scored nothing; a non-Setting an AttributeError
    (in run_all only when its turn came, after the settings before it had run)."""
    victim = [np.array([1, 2, 3])]
    with pytest.raises(ConfigError, match="per_layer block"):
        harness.run_setting(small_ctx, harness.plaintext_control(), victim, 0, per_layer=[4])
    with pytest.raises(ConfigError, match="Setting"):
        harness.run_setting(small_ctx, "plaintext", victim, 0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Settings, got int"):
        harness.run_all(small_ctx, victim, [harness.plaintext_control(), 1])  # type: ignore[list-item]


def test_generated_attacks_are_judged_against_a_baseline_of_the_tokens_they_score(
    small_ctx: harness.Context,
) -> None:
    """The 'generated' baseline scored all n_new generated tokens, while the step attacks score the n_new − 1
    the decode steps carried (or, the LM-head rows, the n_new − 1 they predict): each is now judged against
    the prior on its own tokens (counts: prompts × (n_new − 1)), and the catalog says which."""
    from scx_ref.attacks import catalog

    prompts = [np.array([3, 1, 4, 1, 5]), np.array([2, 7, 1, 8])]
    n_new = 4
    res = harness.run_setting(small_ctx, harness.plaintext_control(), prompts, n_new, reorder=False)
    base = res["baselines"]
    assert base["generated"]["n"] == len(prompts) * n_new
    assert base["generated_fed"]["n"] == base["generated_next"]["n"] == len(prompts) * (n_new - 1)
    fed = {m.key for m in catalog.METRICS if m.target == "generated" and m.tokens == "fed"}
    assert fed == {"vm_gen_seq_acc", "gen_qkv1_map_acc", "gen_attn1_fp_acc", "gen_joint_acc"}
    assert catalog.metric("gen_head_acc").tokens == "next"
    assert catalog.metric("gen_predict_acc").tokens == "all"
    for key in ("gen_qkv1_map_acc", "gen_joint_acc"):  # what they score is what their baseline scores
        assert res["rates"][key]["n"] == base[harness._baseline_of(key)]["n"] == len(prompts) * (n_new - 1)
    assert res["rates"]["gen_predict_acc"]["n"] == base[harness._baseline_of("gen_predict_acc")]["n"]
    assert harness._baseline_of("gen_head_acc") == "generated_next"  # scored where the server runs the head

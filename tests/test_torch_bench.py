"""``scx bench`` runs end to end on a tiny model and writes the documented JSON rows (ratios are
measured, not asserted: they depend on the machine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest

pytest.importorskip("torch")

from scx_ref.backends import cpu_kernels, torch_backend
from scx_ref.cli import main
from scx_ref.commands.bench import build_backend
from scx_ref.errors import ConfigError


def test_bench_quick_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        "tiny-llama",
        "--quick",
        "--repeats",
        "1",
        "--n",
        "16",
        "--gen-prompt",
        "16",
        "--gen-tokens",
        "2",
        "--levels",
        "permute,blind",
        "--json",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["phase"], r["n"], r["level"]) for r in rows} == {
        ("prefill", 16, "permute"),
        ("prefill", 16, "blind"),
        ("decode", 16, "permute"),
        ("decode", 16, "blind"),
    }
    for r in rows:
        assert r["ratio_median"] > 0 and r["baseline_median_s"] > 0 and 0 <= r["client_flop_share"] < 1
        assert r["plain_runner_median_s"] > 0 and r["plain_runner_ratio"] > 0
        assert r["total_ratio_median"] >= r["ratio_median"] and r["keys_median_s"] > 0
        assert r["state_ratio"] >= 1
        assert len(r["round_ratios"]) == r["repeats"] and all(x > 0 for x in r["round_ratios"])
        assert min(r["round_ratios"]) <= r["round_ratio_q1"] <= r["round_ratio_q3"] <= max(r["round_ratios"])
        assert r["round_ratio_q1"] <= r["round_ratio_median"] <= r["round_ratio_q3"]
        # one round: its bootstrap interval is the ratio itself; too few rounds for a median interval
        assert r["ratio_interval"] == [r["ratio_median"]] * 2 and r["round_ratio_interval"] is None
        assert r["round_ratio_coverage"] is None
        assert len(r["scx_round_s"]) == len(r["baseline_round_s"]) == r["repeats"] and r["warmup"] == 1
        for got, scx, base in zip(r["round_ratios"], r["scx_round_s"], r["baseline_round_s"], strict=True):
            assert got == pytest.approx(scx / base, rel=1e-12)
        # the request split: the server's handle calls inside each round's SCX time, the rest the client's
        assert len(r["server_round_s"]) == r["repeats"]
        assert all(0 < srv < scx for srv, scx in zip(r["server_round_s"], r["scx_round_s"], strict=True))
        assert r["server_median_s"] == pytest.approx(r["server_round_s"][0], rel=1e-12)  # one round
        assert r["client_median_s"] == pytest.approx(r["scx_round_s"][0] - r["server_round_s"][0], rel=1e-9)
        assert r["server_ratio_median"] == pytest.approx(r["server_median_s"] / r["baseline_median_s"])
        assert r["client_ratio_median"] == pytest.approx(r["client_median_s"] / r["baseline_median_s"])
    blind = [r for r in rows if r["level"] == "blind"]
    permute = [r for r in rows if r["level"] == "permute" and r["phase"] == "prefill"]
    # the corrections η·W are derived ahead of each request: offline work, not the request's
    assert all(r["offline_flop_share"] > 0 for r in blind) and permute[0]["client_flop_share"] == 0
    assert permute[0]["offline_flop_share"] == 0
    assert data["meta"]["model"] == "tiny-llama" and "Hugging Face" in data["meta"]["baseline"]
    assert "PlainRunner" in data["meta"]["second_column"]
    assert data["meta"]["gemm_block_min_in"] == torch_backend.GEMM_BLOCK_MIN_IN
    assert data["meta"]["accelerator"] is None  # a CPU run (a cuda run names its GPU)
    pad_rows = [torch_backend.GEMM_PAD_MIN_ROWS, torch_backend.GEMM_BLOCK_ROWS - 1]
    assert data["meta"]["gemm_pad_rows"] == pad_rows
    assert "ratio" in capsys.readouterr().out


def test_bench_without_a_hugging_face_model_names_plainrunner_its_baseline(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "random:tiny-dense", "--repeats", "1", "--n", "8", "--gen-prompt", "8"]
    argv += ["--gen-tokens", "1", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert "PlainRunner" in data["meta"]["baseline"] and data["meta"]["second_column"] is None
    assert {(r["phase"], r["level"]) for r in data["rows"]} == {("prefill", "permute"), ("decode", "permute")}
    assert all(r["plain_runner_ratio"] is None and r["baseline_median_s"] > 0 for r in data["rows"])


def test_bench_named_configurations_with_a_mask_pool(tmp_path: Path) -> None:
    """``--configs`` times presets beside the levels; ``--pool`` derives each request's masks in a pool
    entry and reports its memory per token and fill throughput."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "random:tiny-dense", "--repeats", "1", "--n", "8", "--gen-prompt", "8"]
    argv += ["--gen-tokens", "2", "--levels", "permute", "--configs", "hardened", "--pool"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    hard = [r for r in data["rows"] if r["level"] == "hardened"]
    assert len(hard) == 2 and data["meta"]["configs"]["hardened"]["attention"] == "client"
    pre = next(r for r in hard if r["phase"] == "prefill")
    assert pre["pool"]["bytes_per_prompt_token"] > 0 and pre["pool"]["prompt_tokens_per_s"] > 0
    assert pre["offline_flop_share"] > 0.2 and pre["keys_median_s"] > 0
    dec = next(r for r in hard if r["phase"] == "decode")
    assert dec["pool"]["bytes_per_step"] > 0
    assert main(["bench", "--configs", "nope", "--no-progress"]) == 2


def test_bench_warmup_rounds_are_run_and_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every side runs ``warmup`` untimed rounds before the timed ones: a slow first call (a kernel
    compiled on first use) is in none of the reported times."""
    from scx_ref.commands import bench

    calls: dict[str, int] = {}

    def side(sides: Any, name: str, phase: str, *rest: object) -> tuple[float, float, float, float]:
        calls[name] = calls.get(name, 0) + 1
        sides.state[name], sides.share[name], sides.offline[name] = 1, 0.0, 0.0  # what a run leaves
        first = calls[name] == 1
        wall = 100.0 if first else (2.0 if name.startswith("permute") else 1.0)
        return wall, wall, 0.0, 0.0

    monkeypatch.setattr(bench, "_run_side", side)
    backend, _ = build_backend("random:tiny-dense", "float32", "cpu")
    rows = bench.run_bench(backend, ["permute"], [8], 8, 0, repeats=3, progress=False, warmup=2)
    assert calls == {"baseline": 5, "permute": 5}  # no HF model: the baseline is PlainRunner, no 2nd column
    (row,) = rows
    assert row.scx_round_s == [2.0, 2.0, 2.0] and row.baseline_round_s == [1.0, 1.0, 1.0]
    assert row.ratio_median == row.round_ratio_median == 2.0 and row.warmup == 2
    assert row.ratio_interval == [2.0, 2.0] and row.round_ratio_interval is None  # 3 rounds: no interval


def test_bench_rejects_unknown_model_and_lengths() -> None:
    with pytest.raises(ConfigError):
        build_backend("gpt-5", "float32", "cpu")
    assert main(["bench", "--model", "tiny-llama", "--n", "5000", "--gen-tokens", "0", "--no-progress"]) == 2


def test_split_time_parts_are_positive(capsys: pytest.CaptureFixture[str]) -> None:
    """models.split_time splits an SCX prefill into the server's handle and the client's rest, both timed,
    beside Hugging Face's forward (a tiny registered model, two rounds)."""
    from models.split_time import main, split_prefill

    t = split_prefill("tiny-llama", 8, 1, True, 2)
    assert set(t) == {"hf", "server", "client"} and all(v > 0 for v in t.values())
    t = split_prefill("tiny-llama", 8, 1, True, 2, kernels=True)  # the client's kernels and the rest
    assert set(t) == {"hf", "server", "client", "kernels", "rest"} and t["rest"] > 0 <= t["kernels"]
    assert t["kernels"] + t["rest"] == pytest.approx(t["client"])  # two rounds: medians are means
    assert main(["--model", "tiny-llama", "--n", "6", "--rounds", "1", "--no-verify", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "server/hf" in out and "tiny-llama n=6" in out and "client: fused kernels" in out
    import scx_ref

    assert f"scx_ref from {scx_ref.__file__}" in out  # names the checkout that ran (an A/B's provenance)


def test_cold_caches_times_the_client_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    """models.cold_caches times the client's own work on a plain server and on one that writes over memory
    after each reply, in alternating rounds; the evicting server's replies are the plain one's."""
    import secrets

    import numpy as np

    from models.cold_caches import client_times, evicting, main
    from scx_ref.commands.bench import build_models
    from scx_ref.keys import MASTER_SECRET_BYTES, KeySchedule
    from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server

    t = client_times("tiny-llama", 6, 1, True, 2, 1)
    assert set(t) == {"plain", "evicted"} and all(len(v) == 2 and min(v) > 0 for v in t.values())
    backend, _hf, _ = build_models("tiny-llama", "float32", "cpu")
    master, nonce, ids = secrets.token_bytes(MASTER_SECRET_BYTES), KeySchedule.new_nonce(), np.arange(5)
    logits = []
    for cls in (Server, evicting(Server, 1)):  # one request each: the same master secret, nonce and prompt
        client = Client(backend, KeySchedule(master, nonce), SCXConfig(level="permute", max_length=64))
        logits.append(np.asarray(client.prefill(ids, LocalTransport(cls(backend)), nonce=nonce)))
    assert np.array_equal(logits[0], logits[1])
    assert main(["--model", "tiny-llama", "--n", "6", "--rounds", "1", "--evict-mb", "1", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "cold caches cost the client" in out and "tiny-llama n=6" in out
    with pytest.raises(SystemExit):
        client_times("tiny-llama", 6, 1, True, 1, 0)


def test_request_profile_reports_both_sides_and_the_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    """models.request_profile prints SCX's and Hugging Face's medians, torch's profiler table and
    cProfile's for one prefill; a device torch cannot use here is refused before any model is built."""
    import torch

    from models.request_profile import cuda_counts, main

    assert main(["--model", "tiny-llama", "--n", "6", "--rounds", "1", "--top", "5", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama n=6 cpu float32 verify=False: SCX" in out and "ratio" in out
    assert "by self CPU time" in out and "aten::" in out and "cProfile, one SCX prefill" in out
    assert ("by self device time" in out) is False  # no device table for a CPU run
    if not torch.cuda.is_available():  # refused before the model loads: a usage error, exit 2
        with pytest.raises(SystemExit) as exited:
            main(["--model", "tiny-llama", "--device", "cuda"])
        assert exited.value.code == 2 and "no such CUDA device" in capsys.readouterr().err

    class Entry(NamedTuple):
        key: str
        count: int

    averages = [Entry("cudaLaunchKernel", 520), Entry("cudaLaunchKernelExC", 72), Entry("aten::mm", 9)]
    averages += [Entry("cudaMemcpyAsync", 288), Entry("cudaStreamSynchronize", 251)]
    got = cuda_counts(averages)
    assert got == {"kernel launches": 592, "host-device copies": 288, "synchronisations": 251}


def test_request_profile_neither_times_nor_profiles_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """The keys of the profiled request are derived before cProfile starts, as they are before the timed
    rounds: its table (all entries) names no key derivation (``Client.precompute``, ``fisher_yates``),
    which a request that derives its own keys spends its first milliseconds in."""
    from models.request_profile import main

    assert main(["--model", "tiny-llama", "--n", "6", "--rounds", "1", "--top", "100000", "--no-verify"]) == 0
    out = capsys.readouterr().out
    profile = out.split("cProfile, one SCX prefill")[1]
    assert "prefill" in profile and "handle" in profile  # the table lists the request's own calls
    assert "precompute" not in profile and "fisher_yates" not in profile


def test_gemm_forms_compute_dense_products(capsys: pytest.CaptureFixture[str]) -> None:
    """models.gemm_forms times forms of x·Wᵀ that compute ``dense``'s product (within float32 rounding) for
    every projection shape of a model — a tiny registered one: fused QKV, O, gate/up, down, LM head — and
    prints one line per shape and row count."""
    import torch

    from models.gemm_forms import FORMS, form, main, shapes
    from scx_ref.backends.torch_backend import dense

    got = shapes("tiny-llama")
    assert list(got) == ["wqkv", "wo", "w_gate_up", "w_down", "lm_head"]
    gen = torch.Generator().manual_seed(0)
    tried = 0
    with torch.inference_mode():
        for out, inp, _ in got.values():
            weights = [torch.randn(out, inp, generator=gen) for _ in range(2)]
            for rows in (1, 5):
                x = torch.randn(rows, inp, generator=gen)
                for name in FORMS:
                    f = form(name, weights, rows)
                    if f is None:
                        continue
                    tried += 1
                    for y, w in zip(f(x), weights, strict=True):
                        # two float32 sums of the same `inp` products in any order: each within
                        # γ_inp·|x|·|w|ᵀ of the exact product (γ_n = nu / (1 − nu), u = 2⁻²⁴), so within
                        # twice that of each other (a fixed 1e-5 failed on an AMD EPYC, whose kernels sum
                        # in another order: 1.09e-5)
                        gamma = inp * 2.0**-24 / (1 - inp * 2.0**-24)
                        bound = 2 * gamma * (x.double().abs() @ w.double().abs().T)
                        assert y.shape == bound.shape and y.dtype == torch.float32
                        diff = (y.double() - dense(x, w).double()).abs()
                        assert bool((diff <= bound).all()), (name, rows, inp)
    assert tried >= 2 * 5  # in_out at least, for every shape and row count
    assert main(["--model", "tiny-llama", "--rows", "1,3", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(" dense " in line and "in_out" in line for line in lines) == 5 * 2
    assert main(["--model", "tiny-llama", "--rows", "9", "--rounds", "1", "--forms", "unpadded"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(" dense " in line and "unpadded" in line and "in_out" not in line for line in lines) == 5
    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--forms", "padded"])
    assert "--forms: choose from" in capsys.readouterr().err


def test_attention_forms_time_the_same_attention(capsys: pytest.CaptureFixture[str]) -> None:
    """models.attention_forms times one step's attention through ``TorchBackend.attention`` as it is and
    with the earlier enable_gqa call patched in for its grouped form: both compute the same attention
    (within float32 rounding), the patch is undone, and it prints one line per cache length."""
    from models.attention_forms import main, time_forms
    from scx_ref.commands.bench import build_models

    backend, _, _ = build_models("tiny-llama", "float32", "cpu")
    assert backend.config.n_heads > backend.config.n_kv_heads  # the grouped form runs
    grouped = backend._grouped_attention
    now, before, diff = time_forms(backend, 9, 3)
    assert len(now) == len(before) == 3 and min(now + before) > 0
    assert diff <= 1e-5 and backend._grouped_attention == grouped
    assert main(["--model", "tiny-llama", "--keys", "5,17", "--calls", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("keys ") and "enable_gqa/now" in line for line in lines) == 2
    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--keys", "0"])


def test_client_ab_times_both_checkouts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """models.client_ab times this checkout's client against another checkout's — here this very one, copied
    and imported as ``scx_ref_other`` — in one process (a tiny registered model, four rounds), and refuses a
    directory without a scx_ref package."""
    import sys
    from pathlib import Path

    from models.client_ab import OTHER, main

    # the copy's kernels would compile afresh: eager ops here (the copy reads the variable as it is imported)
    monkeypatch.setenv("SCX_NUMBA", "0")
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    root = Path(__file__).resolve().parents[1]
    assert main(["--other", str(root), "--model", "tiny-llama", "--n", "6", "--rounds", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "tiny-llama n=6 threads=1 verify=True",
        "tiny-llama n=6 threads=1 verify=False",
    ]
    assert all("this − other per round" in line for line in out)
    assert (
        main(["--other", str(root), "--model", "tiny-llama", "--n", "6", "--tokens", "3", "--rounds", "4"])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "tiny-llama n=6 tokens=3 threads=1 verify=True",
        "tiny-llama n=6 tokens=3 threads=1 verify=False",
    ]
    assert all("client ms per token this" in line for line in out)
    assert "checks ms per token this" in out[0]
    assert (
        sys.modules[OTHER].__file__ is not None and "scx_ref" not in Path(sys.modules[OTHER].__file__).parts
    )
    with pytest.raises(SystemExit) as refused:  # a usage error: exit 2, before any model loads
        main(["--other", str(root / "tests"), "--model", "tiny-llama", "--n", "6", "--rounds", "4"])
    assert refused.value.code == 2 and "no scx_ref package" in capsys.readouterr().err


def test_bench_intervals_read_back_from_the_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Six rounds: the bench writes both intervals (the median's from the 1st and 6th of six, coverage
    1 − 2/64); ``models.bench_intervals`` recomputes the same two from the rounds the JSON keeps and judges
    them against a goal (met / missed / undecided)."""
    from models import bench_intervals

    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "random:tiny-dense", "--repeats", "6", "--n", "8", "--gen-tokens", "0"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["round_ratio_interval"] == [min(row["round_ratios"]), max(row["round_ratios"])]
    assert row["round_ratio_coverage"] == 1 - 2 / 64
    lo, hi = row["ratio_interval"]
    assert lo <= row["ratio_median"] <= hi
    (again,) = bench_intervals.rows_of(out)
    assert list(again["_ratio_interval"]) == row["ratio_interval"]
    assert list(again["_paired_interval"]) == row["round_ratio_interval"]
    assert bench_intervals.main([str(out)]) == 0 and bench_intervals.main([str(out), "--paired"]) == 0
    assert "verdicts:" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": [{"phase": "prefill"}]}))
    for bad in (other, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            bench_intervals.main([str(bad)])
    assert bench_intervals.verdict([0.9, 1.0], 1.05) == "met"
    assert bench_intervals.verdict([1.06, 1.2], 1.05) == "missed"
    assert bench_intervals.verdict([1.0, 1.1], 1.05) == "undecided"
    assert bench_intervals.verdict(None, 1.05) == bench_intervals.verdict([1.0, 1.1], None) == "-"
    assert bench_intervals.goal_for("decode", 77) == 1.03 and bench_intervals.goal_for("prefill", 64) is None

"""An audit of ``scx bench`` (the benchmark that judges the performance goals) and of ``scx generate``'s
report of a failure before its first token.

* ``scx generate`` failing before any token was made (the server unreachable, the session or the prompt's
  prefill refused) said "generation stopped after 0 new token(s)", which reads as if generation ran. Now
  it says it failed before its first new token; a failure after k > 0 tokens still says how many.
* The memory goal (peak memory ≤ 1.05) was judged on ``mem_ratio`` alone: the JSON kept every round's
  seconds but none of the memory readings, so that verdict (and a ratio left out below 1 MiB) could not
  be recomputed from a run's file. Each row now keeps both sides' reading of every timed round.
* ``--configs ""`` (or an empty item, ``hardened,``) timed no configuration, silently: now refused before
  any model loads, as ``--levels`` refuses one.
* Guard: Hugging Face's timed decode window runs exactly as many one-token forwards as SCX and PlainRunner
  run decode steps (the per-token ratio compares the same work).

Models: ``tiny-llama`` (seeded random Hugging Face weights) only.
"""

from __future__ import annotations

import json
import socket
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import scx_ref.commands.bench as bench
import scx_ref.hf as hf_mod
from scx_ref.cli import main
from scx_ref.errors import ProtocolError

# -- scx generate: a failure before the first token ---------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_generate_failing_before_its_first_token_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """Was: 'generation stopped after 0 new token(s): cannot reach the SCX server …' — as if it had run."""
    url = f"scx://127.0.0.1:{_closed_port()}"
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1,2", "--server", url]
    assert main([*argv, "--connect-timeout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "scx generate: error: generation failed before its first new token: cannot reach" in err, err
    assert "stopped after" not in err and "Traceback" not in err


@pytest.mark.parametrize("made", [None, [], [5, 7]], ids=["options", "prefill", "midway"])
def test_generate_reports_how_far_it_got(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, made: list[int] | None
) -> None:
    """An error raised before the generation began (no ``tokens``: an option refused), in the prompt's
    prefill (no token made) or midway (two tokens, shown already)."""

    def generate(self: Any, ids: Any, max_new_tokens: int, **options: Any) -> Any:
        exc = ProtocolError("the server went away")
        if made is None:
            raise exc
        streamer = options["streamer"]
        streamer.put(np.asarray(ids)[None])
        for t in made:
            streamer.put(np.asarray([t]))
        streamer.end()
        exc.tokens = list(made)
        raise exc

    monkeypatch.setattr(hf_mod.SCXModel, "generate", generate)
    assert main(["generate", "--model", "tiny-llama", "--prompt-ids", "1,2", "--max-new-tokens", "4"]) == 2
    out, err = capsys.readouterr()
    if made:
        assert "5 7" in out
        assert "generation stopped after 2 new token(s): the server went away" in err, err
    else:
        assert "generation failed before its first new token: the server went away" in err, err
        assert "stopped after" not in err


# -- scx bench: the memory readings a run's JSON keeps ----------------------------------------------------


def test_rows_keep_each_rounds_memory_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mem_ratio`` is the ratio of the two sides' median readings, and the row keeps those readings in
    round order (before: only the ratio, the memory goal's verdict not recomputable)."""
    count: dict[str, int] = {}

    def side(sides: Any, name: str, phase: str, *rest: object) -> tuple[float, float, float, float, float]:
        count[name] = count.get(name, 0) + 1
        sides.state[name], sides.share[name], sides.offline[name] = 1, 0.0, 0.0
        k = count[name]  # round k - warmup
        mem = float(k << 20) * (1.5 if name == "permute" else 1.0)
        return 1.0, 1.0, mem, 0.0, 0.0

    monkeypatch.setattr(bench, "_run_side", side)
    backend, _ = bench.build_backend("random:tiny-dense", "float32", "cpu")
    (row,) = bench.run_bench(backend, ["permute"], [8], 8, 0, repeats=3, progress=False, warmup=1)
    mib = float(1 << 20)
    assert row.baseline_mem_round_bytes == [2 * mib, 3 * mib, 4 * mib]  # the warm-up's reading left out
    assert row.scx_mem_round_bytes == [3 * mib, 4.5 * mib, 6 * mib]
    assert row.mem_ratio == pytest.approx(
        statistics.median(row.scx_mem_round_bytes) / statistics.median(row.baseline_mem_round_bytes)
    )


def test_bench_json_keeps_its_baseline_and_rounds(tmp_path: Path) -> None:
    """A run's JSON names its Hugging Face baseline and keeps, per row, every timed round's seconds and
    memory on both sides: its ratios are recomputable from the file."""
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny-llama", "--n", "8", "--gen-prompt", "8", "--gen-tokens", "2"]
    assert (
        main(
            [
                *argv,
                "--repeats",
                "2",
                "--warmup",
                "0",
                "--no-plain-runner",
                "--no-progress",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    data = json.loads(path.read_text())
    assert data["meta"]["baseline"].startswith("Hugging Face")
    assert [(r["phase"], r["n"]) for r in data["rows"]] == [("prefill", 8), ("decode", 8)]
    for r in data["rows"]:
        for key in ("scx_round_s", "baseline_round_s", "scx_mem_round_bytes", "baseline_mem_round_bytes"):
            assert len(r[key]) == 2 and all(v >= 0 for v in r[key]), (key, r[key])
        assert r["ratio_median"] == pytest.approx(
            np.median(r["scx_round_s"]) / np.median(r["baseline_round_s"])
        )
        scx_mem, base_mem = np.median(r["scx_mem_round_bytes"]), np.median(r["baseline_mem_round_bytes"])
        expect = scx_mem / base_mem if min(scx_mem, base_mem) >= float(1 << 20) else None
        assert r["mem_ratio"] == (None if expect is None else pytest.approx(expect))
        # the level's secret calibration pool: an epoch's requests, one build's seconds, the build per request
        assert isinstance(r["refill_every"], int) and r["refill_every"] >= 1 and r["refill_s"] > 0
        request_s = r["baseline_median_s"] * (r["tokens"] if r["phase"] == "decode" else 1)
        assert r["refill_ratio"] == pytest.approx(r["refill_s"] / r["refill_every"] / request_s)
    assert "refill_ratio" in data["meta"]["refill"]


# -- scx bench: options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("configs", ["", ",", "hardened,", "hardened,,paper"])
def test_an_empty_configuration_name_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, configs: str
) -> None:
    """``--configs ""`` ran the bench with no configuration, ``hardened,`` dropped its empty item."""

    def no_load(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(bench, "build_models", no_load)
    assert main(["bench", "--no-progress", "--model", "tiny-llama", "--configs", configs]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scx bench: error: --configs: an empty name") and "\n" not in err, err


# -- scx bench: both sides do the same work -----------------------------------------------------------------


def test_hf_decode_times_as_many_one_token_steps_as_scx_and_plain_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guard: after its first token (the prefill's, untimed), Hugging Face's ``generate`` runs n one-token
    forwards — as SCX and PlainRunner run n decode steps — on the bench's prompt."""
    import torch

    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig

    backend, hf, _ = bench.build_models("tiny-llama", "float32", "cpu")
    assert hf is not None
    forwards: list[int] = []  # each HF forward's input length
    client = Client(backend, KeySchedule.generate(), SCXConfig(level="permute", max_length=64))
    sides = bench._Sides(backend, hf, {"permute": client}, backend.device)
    steps = {"plain": 0, "scx": 0}
    plain_decode, scx_decode = sides.plain.decode, client.decode

    def plain_step(*a: Any) -> Any:
        steps["plain"] += 1
        return plain_decode(*a)

    def scx_step(*a: Any, **k: Any) -> Any:
        steps["scx"] += 1
        return scx_decode(*a, **k)

    monkeypatch.setattr(sides.plain, "decode", plain_step)
    monkeypatch.setattr(client, "decode", scx_step)
    first_at: list[int] = []
    put = bench._FirstToken.put

    def noted(self: bench._FirstToken, value: Any) -> None:
        put(self, value)
        if self.calls == 2:
            first_at.append(len(forwards))

    ids = np.arange(1, 13, dtype=np.int64)
    monkeypatch.setattr(bench._FirstToken, "put", noted)
    # the zoo's cached model, shared with other tests: the hook is removed after the one decode it counts
    hook = hf.register_forward_pre_hook(
        lambda _m, _a, kw: forwards.append(kw["input_ids"].shape[-1]), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            sides.hf_decode(ids, 5)
    finally:
        hook.remove()
    with torch.inference_mode():
        sides.plain_decode(ids, 5)
        sides.scx_decode("permute", ids, 5)
    assert first_at == [1] and forwards == [12, 1, 1, 1, 1, 1]  # the prompt, then 5 timed steps
    assert steps == {"plain": 5, "scx": 5}

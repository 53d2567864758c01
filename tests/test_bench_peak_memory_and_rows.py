"""``scx bench``: the decode phase's peak memory is the generation steps' on the Hugging Face
side too (not its prompt's prefill), a configuration named like a level (or twice) no longer replaces a
row silently, and ``run_bench`` refuses rounds it could not time."""

from __future__ import annotations

import gc
import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from scx_ref.cli import main
from scx_ref.commands import bench
from scx_ref.errors import ConfigError

MIB = 1 << 20


def _resettable() -> bool:
    return not all(bench._PeakMemory._reset_peak() is None for _ in range(5))


_INNER = "SCX_TEST_PEAK_MEMORY_INNER"


def _ran_apart(name: str) -> bool:
    """Run this file's test ``name`` in a fresh interpreter and report whether it did (False: this *is*
    that interpreter, so the caller runs the body). A test worker's other threads (earlier tests' servers
    shutting down, the allocator returning memory) move the resident set between the peak's reset and its
    check, which then reads as a reset the kernel refused: the peak needs a quiet process. The fresh run's
    skip (no resettable peak on this machine) is this test's skip, its failure this test's failure."""
    if os.environ.get(_INNER):
        return False
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*cmd, f"{Path(__file__).resolve()}::{name}"],
        cwd=root,
        env={**os.environ, _INNER: "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout + run.stderr
    if run.returncode == 0 and " skipped" in out and " passed" not in out:
        pytest.skip(f"in a fresh process: {out.strip().splitlines()[-1]}")
    assert run.returncode == 0 and "1 passed" in out, out[-4000:]
    return True


def test_peak_memory_counts_a_freed_allocation_and_runs_no_thread() -> None:
    """The CPU peak is the kernel's high-water mark where Linux offers it: 64 MiB of fresh pages written and
    unmapped inside the block count (a sampler could miss them), and no sampling thread runs beside it. In a
    fresh process (moved here from ``test_torch_bench.py``: in a test worker another test's pool winding down
    made the reset read as refused, and the block then started its sampler)."""
    import threading

    import torch

    if _ran_apart("test_peak_memory_counts_a_freed_allocation_and_runs_no_thread"):
        return
    if not _resettable():
        pytest.skip("no resettable peak resident set here (not Linux, or /proc/self/clear_refs refused)")
    before = set(threading.enumerate())
    size = 64 << 20
    # pages mapped for this test alone (an array from malloc may reuse memory the process already holds,
    # which the resident set does not see), and no garbage collection inside the block
    gc.collect()
    gc.disable()
    try:
        with bench._PeakMemory(torch.device("cpu")) as mem:
            assert not set(threading.enumerate()) - before
            region = mmap.mmap(-1, size)
            for at in range(0, size, mmap.PAGESIZE):
                region[at] = 1
            region.close()
    finally:
        gc.enable()
    assert mem.peak >= 60 * MIB
    with bench._PeakMemory(torch.device("cpu")) as idle:
        pass
    assert idle.peak < 8 * MIB


def test_the_peak_reset_retries_a_race_and_gives_up_after_its_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peak left above the resident set (another thread freed memory between the reset and the read) is
    tried again: the first read that agrees gives the base; ``tries`` reads that never agree give None (the
    caller then samples); a refused write or an unreadable status gives None at once."""
    import builtins
    import io

    writes: list[str] = []

    class _Sink(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    real_open = builtins.open

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return _Sink() if path == "/proc/self/clear_refs" else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    reads = iter([{"VmRSS": 10, "VmHWM": 12}, {"VmRSS": 9, "VmHWM": 11}, {"VmRSS": 8, "VmHWM": 8}])
    monkeypatch.setattr(bench._PeakMemory, "_status", staticmethod(lambda: next(reads)))
    assert bench._PeakMemory._reset_peak() == 8 and writes == ["5"] * 3
    writes.clear()
    monkeypatch.setattr(bench._PeakMemory, "_status", staticmethod(lambda: {"VmRSS": 1, "VmHWM": 2}))
    assert bench._PeakMemory._reset_peak(tries=4) is None and writes == ["5"] * 4
    writes.clear()
    monkeypatch.setattr(bench._PeakMemory, "_status", staticmethod(lambda: None))
    assert bench._PeakMemory._reset_peak() is None and writes == ["5"]

    def refused(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if path == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refused)
    unread = staticmethod(lambda: pytest.fail("status read after a refused reset"))
    monkeypatch.setattr(bench._PeakMemory, "_status", unread)
    assert bench._PeakMemory._reset_peak() is None


def test_peak_memory_restart_leaves_out_what_came_before() -> None:
    """``restart()`` measures from its call on: 48 MiB written and freed before it are not in the peak,
    16 MiB written after it are."""
    import torch

    if _ran_apart("test_peak_memory_restart_leaves_out_what_came_before"):
        return
    if not _resettable():
        pytest.skip("no resettable peak resident set here (not Linux, or /proc/self/clear_refs refused)")

    def touch(size: int) -> None:
        region = mmap.mmap(-1, size)
        for at in range(0, size, mmap.PAGESIZE):
            region[at] = 1
        region.close()

    gc.collect()
    gc.disable()
    try:
        with bench._PeakMemory(torch.device("cpu")) as mem:
            touch(48 * MIB)
            mem.restart()
            touch(16 * MIB)
    finally:
        gc.enable()
    assert 15 * MIB <= mem.peak < 40 * MIB


def test_hf_decode_peak_is_the_steps_not_the_prompts_prefill() -> None:
    """The baseline's decode peak is taken over its generation steps, as SCX's and PlainRunner's are: a
    2048-token prompt's prefill (its 2048 × 2048 attention mask alone is 16 MiB) was in it, so a decode
    ratio compared SCX's steps with Hugging Face's prefill and steps together."""
    import torch

    if _ran_apart("test_hf_decode_peak_is_the_steps_not_the_prompts_prefill"):
        return
    if not _resettable():
        pytest.skip("no resettable peak resident set here (not Linux, or /proc/self/clear_refs refused)")
    backend, hf, _used = bench.build_models("tiny-llama", "float32", "cpu")
    sides = bench._Sides(backend, hf, {}, backend.device)
    ids = np.random.default_rng(0).integers(0, backend.config.vocab_size, size=2048, dtype=np.int64)
    with torch.inference_mode():
        wall, _cpu, peak, keys, server = sides.hf_decode(ids, 2)
    assert wall > 0 and keys == server == 0.0
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB: the prefill's memory is in the decode's peak"


def _tiny(argv: list[str]) -> list[str]:
    fixed = ["--model", "random:tiny-dense", "--n", "4", "--gen-tokens", "0", "--repeats", "1"]
    return ["bench", *fixed, *argv, "--no-progress"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--configs", "permute"], "also named in --levels"),  # the default level permute's row replaced
        (["--levels", "permute,blind", "--configs", "blind"], "also named in --levels"),
        (["--configs", "blind,blind"], "named twice"),
    ],
)
def test_a_configuration_never_replaces_a_row_silently(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The preset ``permute`` is not the level ``permute``'s default configuration: timed under the same
    name, its row replaced the level's and the level's measurement was lost."""
    assert main(_tiny(argv)) == 2
    err = capsys.readouterr().err
    assert "scx bench: error:" in err and says in err


def test_run_bench_refuses_a_configuration_named_like_a_level() -> None:
    from scx_ref.protocol.presets import preset

    backend, _ = bench.build_backend("random:tiny-dense", "float32", "cpu")
    cfg = preset("permute").config(backend.config.n_layers)
    with pytest.raises(ConfigError, match="also named in --levels"):
        bench.run_bench(backend, ["permute"], [4], 4, 0, repeats=1, progress=False, configs={"permute": cfg})


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 1), (1, -1), (3, -2)])
def test_run_bench_refuses_rounds_it_cannot_time(repeats: int, warmup: int) -> None:
    """A negative warm-up started the timed rounds at round |warmup| (fewer timed rounds than the rows'
    ``repeats`` said, none at all for warmup = -repeats: a raw StatisticsError)."""
    backend, _ = bench.build_backend("random:tiny-dense", "float32", "cpu")
    with pytest.raises(ConfigError, match="repeats >= 1 and warmup >= 0"):
        bench.run_bench(backend, ["permute"], [4], 4, 0, repeats=repeats, progress=False, warmup=warmup)


def test_rounds_alternate_pair_and_keep_their_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed rounds alternate the order (warm-up rounds untimed on every side), each row's round ratios
    pair the same round's two times, and the JSON keeps each round's key derivation: ``total_ratio_median``
    is recomputable from the rows' own rounds."""
    order: list[str] = []
    count: dict[str, int] = {}

    def side(sides: object, name: str, phase: str, *rest: object) -> tuple[float, float, float, float, float]:
        count[name] = count.get(name, 0) + 1
        order.append(name)
        sides.state[name], sides.share[name], sides.offline[name] = 1, 0.0, 0.0  # type: ignore[attr-defined]
        k = count[name]  # round k - warmup; each side's k-th call is the same round's
        wall = float(k) * (3.0 if name == "permute" else 1.0)
        return wall, wall, 0.0, (0.5 * k if name == "permute" else 0.0), 0.0

    monkeypatch.setattr(bench, "_run_side", side)
    backend, _ = bench.build_backend("random:tiny-dense", "float32", "cpu")
    (row,) = bench.run_bench(backend, ["permute"], [8], 8, 0, repeats=4, progress=False, warmup=1)
    # warm-up (round -1) reversed, then forward, reversed, forward, reversed
    assert order == ["permute", "baseline"] + ["baseline", "permute", "permute", "baseline"] * 2
    assert row.baseline_round_s == [2.0, 3.0, 4.0, 5.0] and row.scx_round_s == [6.0, 9.0, 12.0, 15.0]
    assert row.round_ratios == [3.0] * 4
    assert row.keys_round_s == [1.0, 1.5, 2.0, 2.5]
    total = [s + k for s, k in zip(row.scx_round_s, row.keys_round_s, strict=True)]
    assert row.total_ratio_median == pytest.approx(np.median(total) / np.median(row.baseline_round_s))


def test_an_scx_measurement_closes_its_session_before_the_next() -> None:
    """Each SCX run ends its session once measured, as the baselines drop their caches: left open, the
    client's link kept the server and its caches resident into the next SCX request, whose prefill closed
    it — a close timed in that request, and memory freed there that its peak reading reused unseen."""
    import torch

    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig

    backend, _ = bench.build_backend("random:tiny-dense", "float32", "cpu")
    client = Client(backend, KeySchedule.generate(), SCXConfig(level="permute", max_length=64))
    sides = bench._Sides(backend, None, {"permute": client}, backend.device)
    ids = np.arange(8, dtype=np.int64)
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            if phase == "prefill":
                sides.scx_prefill("permute", ids)
            else:
                sides.scx_decode("permute", ids, 2)
            assert client.state is not None and client.state.closed
            assert not getattr(client.state.link, "server").sessions  # noqa: B009 (Transport has no server)
            assert sides.state["permute"] > 0  # the state ratio still read before the close

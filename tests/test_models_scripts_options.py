"""The measurement scripts of ``models/``: bad options exit 2 with argparse's usage and one
``error:`` line before any model is loaded (they ran into tracebacks: ``gemm_forms --rows abc``,
``attention_forms --keys abc``, an unknown ``--model`` in either, ``request_profile --n`` past the model's
positions or ``--device cuda`` on a machine without one, ``transport_choice`` without its libraries); an
option that would be silently ignored is refused (``host_memory --pool-mib`` without ``--peak``); and
``host_memory --peak`` starts its children under the name it was run by."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_model_tools import refused


class Reached(Exception):
    """Raised by a stub: the script got as far as loading a model (or starting a server)."""


def _reach(*args: Any, **kw: Any) -> Any:
    raise Reached(args, kw)


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any model build raises :class:`Reached` (nothing is loaded), and torch's thread count is restored."""
    import torch

    from scx_ref.commands import bench

    monkeypatch.setattr(bench, "build_models", _reach)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("no_models")
def test_gemm_forms_refuses_bad_rows_and_unknown_models(capsys: pytest.CaptureFixture[str]) -> None:
    """``--rows abc`` / ``-1`` / ``0`` and ``--model nosuch`` used to end in a ValueError, RuntimeError or
    ConfigError traceback (exit 1), the model name only once the model was being built; ``--rows 0``
    printed nothing and exited 0. The control: good values get as far as the model."""
    from models import gemm_forms

    for argv, word in (
        (["--rows", "abc"], "--rows"),
        (["--rows", "-1"], "--rows"),
        (["--rows", "0"], "--rows"),
        (["--rows", "1,,3"], "--rows"),
        (["--model", "nosuch"], "--model"),
        (["--model", "random:nosuch"], "--model"),
    ):
        assert word in refused(gemm_forms.main, ["--model", "tiny-llama", *argv], capsys)
    with pytest.raises(Reached):
        gemm_forms.main(["--model", "random:tiny-dense", "--rows", "1,3", "--rounds", "1"])


@pytest.mark.usefixtures("no_models")
def test_attention_forms_refuses_bad_lengths_and_unknown_models(capsys: pytest.CaptureFixture[str]) -> None:
    """``--keys abc`` and ``--model nosuch`` used to end in a traceback; the control reaches the model."""
    from models import attention_forms

    for argv, word in (
        (["--keys", "abc"], "--keys"),
        (["--keys", "4,-2"], "--keys"),
        (["--calls", "0"], "--calls"),
        (["--model", "nosuch"], "--model"),
    ):
        assert word in refused(attention_forms.main, ["--model", "tiny-llama", *argv], capsys)
    with pytest.raises(Reached):
        attention_forms.main(["--model", "random:tiny-dense", "--keys", "4,8", "--calls", "1"])


def test_request_profile_refuses_a_long_prompt_and_a_missing_device_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--n`` past the model's positions was refused by the client (a ProtocolError traceback) only after
    the model was loaded and timed; ``--device cuda`` on a machine without CUDA by a ConfigError traceback.
    The control: the model's own positions and the CPU get to the measurement."""
    import torch

    from models import request_profile
    from scx_ref.zoo import max_positions

    calls: list[tuple[Any, ...]] = []

    def profile(*args: Any) -> str:
        calls.append(args)
        return "report"

    monkeypatch.setattr(request_profile, "profile_prefill", profile)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    top = max_positions("tiny-llama")
    line = refused(request_profile.main, ["--model", "tiny-llama", "--n", str(top + 1)], capsys)
    assert "--n" in line and str(top) in line
    line = refused(request_profile.main, ["--model", "tiny-llama", "--n", "4", "--device", "cuda"], capsys)
    assert "--device" in line and "no such CUDA device" in line
    assert not calls
    assert request_profile.main(["--model", "tiny-llama", "--n", str(top), "--device", "cpu"]) == 0
    assert len(calls) == 1 and calls[0][:3] == ("tiny-llama", top, "cpu")


def test_transport_choice_names_a_missing_library_before_any_server_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``websockets`` it started that library's server, waited 10 s for a port that never opened and
    ended in a ModuleNotFoundError traceback (the child's too); now exit 2 naming the package to install.
    The control: with every library found, it goes on to start the first server."""
    import importlib.util
    import multiprocessing

    from models import transport_choice

    found = importlib.util.find_spec
    monkeypatch.setattr(multiprocessing, "Process", _reach)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "websockets" else found("json")
    )
    line = refused(transport_choice.main, ["--reps", "1"], capsys)
    assert "websockets" in line and "pip install" in line
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: found("json"))
    with pytest.raises(Reached):
        transport_choice.main(["--reps", "1"])


@pytest.mark.usefixtures("no_models")
def test_host_memory_refuses_a_pool_bound_without_peak(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--pool-mib`` bounds only ``--peak``'s pool: without ``--peak`` it was ignored, and the product and
    prefill timings ran with the default pool as if the bound had been applied. The control: with
    ``--peak`` the bound goes to both children."""
    from models import host_memory

    line = refused(host_memory.main, ["--model", "tiny-llama", "--n", "4", "--pool-mib", "8"], capsys)
    assert "--pool-mib" in line and "--peak" in line
    runs: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **_: runs.append(argv))
    assert host_memory.main(["--model", "tiny-llama", "--n", "4", "--peak", "--pool-mib", "8"]) == 0
    assert len(runs) == 2 and all(r[r.index("--pool-mib") + 1] == "8" for r in runs)


def test_host_memory_peak_children_run_under_the_name_it_was_run_by(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m scx_models.host_memory --peak`` (the installed package, any directory) started its
    children as ``-m models.host_memory``, a name importable only from the repository's root: outside it
    each child failed and the parent ended in a CalledProcessError traceback."""
    import importlib

    module = importlib.import_module("scx_models.host_memory")
    runs: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **_: runs.append(argv))
    assert module.main(["--model", "tiny-llama", "--n", "4", "--peak"]) == 0
    assert [r[1:3] for r in runs] == [["-m", "scx_models.host_memory"]] * 2


@pytest.mark.parametrize("name", ["check_cost", "host_memory", "cold_caches"])
def test_timing_help_says_random_models_are_taken(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """These scripts take ``random:<preset>`` (they need no Hugging Face model); check_cost's ``--help``
    said "a registered model with Hugging Face weights", host_memory's and cold_caches' "a registered
    model"."""
    import importlib

    module = importlib.import_module(f"models.{name}")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL a registered model or random:<preset>[:seed] (smollm2)" in out


def test_silu_error_refuses_a_sweep_that_compares_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """A stride past every bit pattern (only x = 0) or a limit below float32's normals compared no value,
    and printed "max relative error 0.000 u32 at x = nan" with exit 0 — a reading of an exact SiLU. The
    control: a coarse sweep that does compare values prints its errors."""
    from models import silu_error

    for argv in (["--stride", "2000000000"], ["--limit", "1e-40"]):
        line = refused(silu_error.main, [*argv, "--no-progress"], capsys)
        assert "normal float32" in line
    silu_error.main(["--limit", "2", "--stride", "1000000", "--no-progress"])
    out = capsys.readouterr().out
    assert out.count("max relative error") == 2 and "x = nan" not in out


def test_bench_intervals_refuses_one_file_twice(capsys: pytest.CaptureFixture[str]) -> None:
    """Overlapping globs named one file twice: its rows were printed and counted twice in the verdicts'
    tally. The control: the file once."""
    from pathlib import Path

    from models import bench_intervals

    one = Path(__file__).resolve().parent.parent / "models" / "results" / "bench_hf_s64_128_2t.json"
    other = one.parent / ".." / "results" / one.name
    assert "given twice" in refused(bench_intervals.main, [str(one), str(other)], capsys)
    assert bench_intervals.main([str(one)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verdicts: ")

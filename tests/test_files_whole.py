"""Result files are written whole (:func:`scx_ref._files.write_text_whole`): after a failed write the file
holds what it held before and no private sibling is left; every command's ``--json`` goes through it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from scx_ref import _files
from scx_ref._files import private_name, write_text_whole
from scx_ref.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_write_text_whole_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_text_whole(target, "first")
    write_text_whole(str(target), "second — ü")
    assert target.read_text(encoding="utf-8") == "second — ü"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half-way (here: the disk fills after 3 characters) leaves the file as it was."""
    target = tmp_path / "out.json"
    target.write_text("old")
    real = Path.write_text

    def full_disk(self: Path, data: str, *args: object, **kwargs: object) -> int:
        real(self, data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_text_whole(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_private_names_are_hidden_siblings(tmp_path: Path) -> None:
    a, b = private_name(tmp_path / "r.json"), private_name(tmp_path / "r.json")
    assert a != b and a.parent == tmp_path and a.name.startswith(".r.json.") and a.suffix == ".part"


def test_a_command_whose_write_fails_keeps_the_previous_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``scx dp --json``: the publishing rename fails, the earlier result survives whole."""
    out = tmp_path / "dp.json"
    argv = ["dp", "--sensitivity", "1", "--scale", "2", "-k", "10", "--json", str(out)]
    assert main(argv) == 0
    before = out.read_text()
    assert json.loads(before)

    def no_rename(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_files.os, "replace", no_rename)
    assert main([*argv[:-4], "-k", "20", "--json", str(out)]) == 2  # scx dp: error: ... Input/output error
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dp.json"]


def _direct_writes(path: Path) -> list[int]:
    """Lines of ``path`` that call ``.write_text(`` or ``open(..., "w")`` (a write that is not whole; a
    kernel file under /proc is not a result)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "write_text":
            lines.append(node.lineno)
        proc = bool(node.args) and isinstance(node.args[0], ast.Constant)
        proc = proc and str(getattr(node.args[0], "value", "")).startswith("/proc/")
        mode_w = any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) and "w" in a.value for a in node.args[1:]
        )
        if isinstance(f, ast.Name) and f.id == "open" and mode_w and not proc:
            lines.append(node.lineno)
    return lines


#: files that write on purpose outside write_text_whole: the helper itself, and the model cache, which
#: writes into private names it then publishes (scx_ref.zoo.smollm2)
_ALLOWED = {"scx_ref/_files.py", "scx_ref/zoo/smollm2.py"}


def test_no_result_file_is_written_directly() -> None:
    """Every file the library and models/ write goes through write_text_whole (the control below shows
    the scan finds a direct write)."""
    found = {
        str(p.relative_to(ROOT)): lines
        for folder in ("scx_ref", "models")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if str(p.relative_to(ROOT)) not in _ALLOWED and (lines := _direct_writes(p))
    }
    assert found == {}


def test_the_scan_finds_a_direct_write(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        'from pathlib import Path\nPath("x").write_text("y")\nwith open("z", "w") as h:\n    pass\n'
        'with open("/proc/self/clear_refs", "w") as h:\n    pass\n'
    )
    assert _direct_writes(f) == [2, 3]

"""Tests that kill mutants of :mod:`scx_ref._files` that survived ``python -m mutation.run files``
(mutation/REPORT_files.md): the encoding a file is written in, and the layout and key order of a result
file's JSON."""

from __future__ import annotations

from pathlib import Path

from scx_ref._files import result_json, write_text_whole


def test_a_file_is_written_in_the_encoding_asked_for(tmp_path: Path) -> None:
    """``encoding`` reaches the write (UTF-8 by default), not the locale's."""
    path = tmp_path / "r.txt"
    write_text_whole(path, "β ≤ 5", encoding="utf-16")
    assert path.read_bytes() == "β ≤ 5".encode("utf-16")
    write_text_whole(path, "β ≤ 5")
    assert path.read_bytes() == "β ≤ 5".encode()


def test_a_result_file_keeps_its_key_order_one_value_a_line() -> None:
    """Keys in the order the result holds them (``sort_keys=True`` sorts them), one value a line indented
    by one space a level (the layout of every JSON under models/results, which reviews diff line by
    line)."""
    value = {"b": 1, "a": [2]}
    assert result_json(value) == '{\n "b": 1,\n "a": [\n  2\n ]\n}'
    assert result_json(value, sort_keys=True) == '{\n "a": [\n  2\n ],\n "b": 1\n}'
    assert result_json(value, indent=None) == '{"b": 1, "a": [2]}'

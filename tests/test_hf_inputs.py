"""SCXModel's inputs (issue 12): left-padded batches generate as ``model.generate`` does, every option
it cannot honour is a ConfigError naming what is supported, bad ids are project errors, and a generation
that fails midway reports the tokens it already made."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from scx_ref.attacks.active import TamperingTransport
from scx_ref.errors import ConfigError, IntegrityError, VocabularyError
from scx_ref.hf import SCXModel
from scx_ref.protocol import Reply, Request
from scx_ref.sampling import GENERATE_OPTIONS
from scx_ref.stages import Stage
from tests.test_hf import _keys, tiny_model

PAD = 0  # the tiny models' pad id (EOS is 1)
ROWS = [[5, 17, 3, 88, 41, 9], [60, 2, 77, 31], [12, 44, 8, 70, 19]]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2"])
def test_left_padded_batch_equals_hf_generate(kind: str) -> None:
    model = tiny_model(kind, "eager", seed=1)
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    scx = SCXModel.from_hf(model, level="paper", keys=_keys(1))
    assert scx.generate(ids, max_new_tokens=6, attention_mask=mask).tolist() == want.tolist()
    # without a mask the pads are masked as transformers infers them (pad id present, pad ≠ EOS)
    assert scx.generate(ids, max_new_tokens=6).tolist() == want.tolist()
    # max_length instead of max_new_tokens
    with torch.no_grad():
        want_len = model.generate(ids, attention_mask=mask, do_sample=False, max_length=ids.shape[1] + 4)
    assert scx.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 4).tolist() == want_len.tolist()


def test_each_padded_row_is_its_own_session_on_its_unpadded_ids() -> None:
    model = tiny_model("llama", "eager", seed=1)
    scx = SCXModel.from_hf(model, level="permute", keys=_keys(1))
    ids, mask = left_padded(ROWS)
    batch = scx.generate(ids, max_new_tokens=5, attention_mask=mask, eos_token_id=None)
    for i, row in enumerate(ROWS):
        alone = scx.generate(torch.tensor([row]), max_new_tokens=5, eos_token_id=None)
        assert batch[i, ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()
        assert scx.last_view is not None
    assert {m.stage for m in scx.last_view.messages if m.stage is Stage.OPEN}  # sessions ran
    assert all(m.meta["n"] == len(ROWS[-1]) for m in scx.last_view.messages if m.stage is Stage.OPEN)


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample="yes"),
        dict(do_sample=True, temperature=0.0),
        dict(do_sample=True, top_p=1.5),
        dict(do_sample=True, top_k=-1),
        dict(num_beams=2),
        dict(repetition_penalty=0.0),
        dict(output_scores=True),
        dict(max_new_tokens=True),
        dict(max_new_tokens=2.5),
        dict(max_new_tokens=-1),
        dict(max_new_tokens=3, max_length=9),
        dict(max_new_tokens=None),
        dict(eos_token_id="stop"),
        dict(pad_token_id=1.5),
    ],
)
def test_unsupported_generate_options_are_config_errors(options: dict[str, Any]) -> None:
    scx = SCXModel.from_hf(tiny_model("llama", "eager"), level="paper", keys=_keys())
    options = {"max_new_tokens": 3, **options}
    with pytest.raises(ConfigError) as info:
        scx.generate(torch.tensor([ROWS[0]]), **options)
    unknown = set(options) - set(GENERATE_OPTIONS)
    if unknown:  # an option SCX does not have is refused by name, with what is supported
        assert all(repr(k) in str(info.value) for k in unknown)
        assert "Supported" in str(info.value) and "max_new_tokens" in str(info.value)


def test_bad_masks_and_ids() -> None:
    scx = SCXModel.from_hf(tiny_model("llama", "eager"), level="paper", keys=_keys())
    ids, mask = left_padded(ROWS)
    right = mask.flip(1)
    for bad_mask, match in (
        (right, "left padding"),
        (mask[:, 1:], "shape"),
        (mask * 2, "0 and 1"),
        (torch.zeros_like(mask), "left padding"),
    ):
        with pytest.raises(ConfigError, match=match):
            scx.generate(ids, max_new_tokens=2, attention_mask=bad_mask)
    for bad_ids in (
        [[1.0, 2.0]],
        [[1, 2], [3]],
        np.zeros((0, 3), dtype=np.int64),
        np.zeros((1, 2, 3), dtype=np.int64),
        [[]],
    ):
        with pytest.raises(VocabularyError):
            scx.generate(bad_ids, max_new_tokens=2)
        with pytest.raises(VocabularyError):
            scx.logits(bad_ids)
    with pytest.raises(ConfigError, match="input_ids only"):
        scx.logits(ids, attention_mask=mask)
    with pytest.raises(ConfigError, match="unknown SCX option"):
        SCXModel.from_hf(tiny_model("llama", "eager"), level="paper", decoy_rows=3)


def test_padding_that_equals_eos_needs_the_mask() -> None:
    """A pad id that is also EOS cannot be told from tokens: without a mask the batch is refused (HF only
    warns and runs the pads as tokens — the issue's silently wrong case); with the mask it matches
    ``model.generate``. Control: a single row starting with that id is a prompt, used as given."""
    model = tiny_model("llama", "eager", seed=2)
    scx = SCXModel.from_hf(model, level="paper", keys=_keys(2))
    eos = 1
    width = max(map(len, ROWS))
    ids = torch.tensor([[eos] * (width - len(r)) + r for r in ROWS])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in ROWS])[:, None]).long()
    options: dict[str, Any] = dict(max_new_tokens=3, eos_token_id=eos, pad_token_id=eos)
    with pytest.raises(ConfigError, match="attention_mask"):
        scx.generate(ids, **options)
    got = scx.generate(ids, attention_mask=mask, **options)
    want = model.generate(ids, attention_mask=mask, do_sample=False, **options)
    assert got.tolist() == want.tolist()
    one = torch.tensor([[eos, *ROWS[1]]])
    assert scx.generate(one, **options).tolist() == model.generate(one, do_sample=False, **options).tolist()


def test_a_failure_midway_reports_the_tokens_made(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama", "eager", seed=1)
    scx = SCXModel.from_hf(model, level="paper", keys=_keys(1))
    prompt = torch.tensor([ROWS[0]])
    want = scx.generate(prompt, max_new_tokens=6, eos_token_id=None)[0, len(ROWS[0]) :].tolist()
    real = scx._session
    seen = {"n": 0}

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is Stage.GEN_QKV:
            seen["n"] += 1
            if seen["n"] == 3:  # the third decode step's first reply is forged
                return replace(reply, arrays={"z": reply.arrays["z"] * 1.01})
        return reply

    def session() -> Any:
        client, link = real()
        return client, TamperingTransport(link, tamper)

    monkeypatch.setattr(scx, "_session", session)
    with pytest.raises(IntegrityError) as info:
        scx.generate(prompt, max_new_tokens=6, eos_token_id=None)
    assert info.value.tokens == want[:3]  # the prefill's token and two decode steps


def test_a_batch_failing_midway_reports_every_row_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 0 completes; row 1's session is forged at its second decode step: the error carries row 0's
    tokens and row 1's first two (nothing made is lost)."""
    model = tiny_model("llama", "eager", seed=1)
    scx = SCXModel.from_hf(model, level="paper", keys=_keys(4))
    ids, mask = left_padded(ROWS[:2])
    want = scx.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)[:, ids.shape[1] :]
    real = scx._session
    made = {"sessions": 0}

    def session() -> Any:
        client, link = real()
        made["sessions"] += 1
        if made["sessions"] < 2:
            return client, link
        seen = {"n": 0}

        def tamper(req: Request, reply: Reply) -> Reply:
            if req.stage is Stage.GEN_QKV:
                seen["n"] += 1
                if seen["n"] == 2:
                    return replace(reply, arrays={"z": reply.arrays["z"] * 1.01})
            return reply

        return client, TamperingTransport(link, tamper)

    monkeypatch.setattr(scx, "_session", session)
    with pytest.raises(IntegrityError) as info:
        scx.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    assert info.value.rows == [want[0].tolist(), want[1].tolist()[:2]]
    assert info.value.tokens == want[1].tolist()[:2]

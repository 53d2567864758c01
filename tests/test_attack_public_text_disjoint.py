"""The attack harness's public text and victim prompts are disjoint (scx_ref.attacks.cli.public_and_victims):
pydoc repeats itself ("else" and "if" are one text; "specialnames" and "naming" hold other topics' passages
whole), so the even/odd split alone let a long public text hold a victim's prompt verbatim."""

from __future__ import annotations

import numpy as np
import pytest

from scx_ref.attacks.cli import public_and_victims, victim_topics
from scx_ref.zoo.corpus import tokenize, topic_texts

VOCAB = 256  # the byte tokenizer (no tokenizer given): one token per character of ASCII text
SHARED = 60  # the passage length the split keeps apart (cli._SHARED)


def _text(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


@pytest.mark.parametrize(("length", "count"), [(16, 3), (48, 5), (8, 2)])
def test_no_victim_passage_is_in_the_public_text(length: int, count: int) -> None:
    # a public text long enough to reach every even-indexed topic; before the fix the "assignment" victim's
    # passages were in topics 32 and 48 (16 x 3, 48 x 5), "id-classes"' in topic 40 (8 x 2)
    public, victims = public_and_victims(None, VOCAB, 400_000, count, length)
    pub = _text(public)
    assert len(pub) > 200_000
    odd = victim_topics(length)
    for i in range(count):
        body = odd[(i * len(odd)) // count][: 16 * length + 64]
        assert _text(victims[i]) == body[:length]
        for k in range(len(body) - SHARED + 1):
            assert body[k : k + SHARED] not in pub, (i, k)


@pytest.mark.parametrize(("n_public", "length", "count"), [(4096, 16, 3), (4096, 48, 5), (1024, 8, 2)])
def test_the_published_runs_public_text_is_unchanged(n_public: int, length: int, count: int) -> None:
    # the topics left out all lie past the public text these runs read (their first 8·n + 1024 characters),
    # so the recorded results (README, models/results) still reproduce
    public, _ = public_and_victims(None, VOCAB, n_public, count, length)
    every_even = "\n\n".join(topic_texts()[0::2])
    want = tokenize(every_even[: 8 * n_public + 1024], None, VOCAB)[:n_public]
    np.testing.assert_array_equal(public, np.asarray(want))


def test_a_tokenizer_of_long_tokens_still_gets_the_public_tokens_asked_for() -> None:
    """The public text was cut at 8 characters a token before tokenizing: a tokenizer of 16 characters a
    token got half the tokens asked for, though the text held many more."""

    def sixteen(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(text[k]) % 200 for k in range(0, len(text), 16)]}

    public, victims = public_and_victims(sixteen, 256, 2000, 2, 8)
    assert len(public) == 2000
    assert all(len(v) == 8 for v in victims)

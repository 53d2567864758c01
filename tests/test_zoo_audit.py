"""Audit of the model zoo behind ``scx verify``, ``ppl`` and ``bench`` (random models only): the corpus's
first tokens under a coarse tokenizer, arguments refused before any model work, and guards of the
perplexity arithmetic and the random models' generators."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest

import scx_ref.zoo.corpus as corpus_mod
import scx_ref.zoo.engines as engines_mod
import scx_ref.zoo.perplexity as perplexity_mod
from scx_ref.errors import ConfigError, VocabularyError
from scx_ref.zoo import load_weights
from scx_ref.zoo.corpus import corpus_text, corpus_tokens, prompts, topic_texts
from scx_ref.zoo.perplexity import compare_ppl


class _LineTokenizer:
    """One token per line (id: the line's length mod 97): ~25 characters a token, coarser than the 8 a
    token :func:`corpus_tokens` budgets its prefix for."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [len(line) % 97 for line in text.split("\n")]}


class _RunTokenizer:
    """One token per maximal run of whitespace or of other characters (id: its length mod 97), so a
    prefix that ends inside a run of newlines tokenizes its end differently from the whole text."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [len(run) % 97 for run in re.findall(r"\s+|\S+", text)]}


def _ids(tok: Any, text: str) -> np.ndarray[Any, np.dtype[np.int64]]:
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


# -- corpus ------------------------------------------------------------------------------------------------


def test_corpus_tokens_are_the_whole_texts_first_tokens_for_a_coarse_tokenizer() -> None:
    """The prefix tokenized was cut at 8·n + 1024 characters, inside a line: corpus_tokens(38) of the line
    tokenizer ended with the cut line's token, not the corpus's 38th."""
    tok = _LineTokenizer()
    full = _ids(tok, corpus_text())
    for n in range(2, 400):
        got = corpus_tokens(n, tok, 97)
        assert np.array_equal(got, full[:n]), n


def test_corpus_tokens_are_not_cut_inside_a_run_of_newlines(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefix that ends inside the blank lines after a topic ends with a shorter run of newlines than the
    whole text has there: 1039 characters, then three newlines cut after the first (at 8·2 + 1024)."""
    text = "x" * 1039 + "\n\n\n" + "cd"
    monkeypatch.setattr(corpus_mod, "corpus_text", lambda: text)
    tok = _RunTokenizer()
    assert corpus_tokens(2, tok, 97).tolist() == _ids(tok, text)[:2].tolist() == [1039 % 97, 3]


def test_prompts_are_their_topics_first_tokens_for_a_coarse_tokenizer() -> None:
    """Each topic was cut at 16·length + 64 characters: the line tokenizer's third prompt of 5 ended with
    a cut line, and a length of 10 was refused with "topic 0 is shorter than 10 tokens" (it has 30 lines)."""
    tok, texts = _LineTokenizer(), topic_texts()
    for length in (5, 10, 20):
        got = prompts(3, length, tok, 97)
        for i, ids in enumerate(got):
            assert np.array_equal(ids, _ids(tok, texts[(i * len(texts)) // 3])[:length]), (length, i)
    short = min(range(len(texts)), key=lambda i: len(texts[i].split("\n")))
    lines = len(texts[short].split("\n"))
    with pytest.raises(ConfigError, match=f"shorter than {lines + 1} tokens"):  # a true refusal stays one
        prompts(len(texts), lines + 1, tok, 97)


# -- arguments refused before any model work ---------------------------------------------------------------


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded for a call that is refused")


@pytest.mark.parametrize(
    "kwargs",
    [{"config": "no-such-preset"}, {"level": "bogus"}, {"level": "paper", "beta": -1.0}],
    ids=["preset", "level", "beta"],
)
def test_ppl_run_refuses_a_bad_configuration_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any]
) -> None:
    """An unknown preset name (documented as refused before the model loads), level or β was refused only
    after the model was loaded and the corpus tokenized."""
    monkeypatch.setattr(perplexity_mod, "load_model", _no_model)
    with pytest.raises(ConfigError):
        perplexity_mod.ppl_run("tiny-llama", "float64", tokens=64, window=32, **kwargs)


def test_scx_engines_refuse_a_malformed_server_url_before_building_a_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL was parsed by RemoteTransport, after the backend had copied the weights (on the device)."""
    w = load_weights("random:tiny-dense", np.float64)
    cfg = engines_mod.scx_config("permute", 0.0, max_length=32)
    monkeypatch.setattr(engines_mod, "_backend", _no_model)
    for make in (engines_mod.scx_logits, engines_mod.scx_generate):
        with pytest.raises(ConfigError, match="server URL must be scx://HOST:PORT"):
            make(w, "float64", cfg, server="http://localhost:1")


def test_scx_engines_check_the_ids_before_a_client_is_built() -> None:
    """Bad ids were refused only after a session's client had been built (keys derived, a nonce drawn)."""
    w = load_weights("random:tiny-dense", np.float64)
    cfg = engines_mod.scx_config("permute", 0.0, max_length=32)
    with (
        engines_mod.scx_logits(w, "float64", cfg) as logits,
        engines_mod.scx_generate(w, "float64", cfg) as gen,
    ):
        built: list[int] = []
        for engine in (logits, gen):
            session = engine._scx.session

            def counted(session: Any = session) -> Any:
                built.append(1)
                return session()

            engine._scx.session = counted  # type: ignore[method-assign]
        with pytest.raises(VocabularyError):
            logits(np.array([1.5]))
        with pytest.raises(VocabularyError):
            gen(np.array([300]), 1)
        assert built == []
        assert logits(np.array([1, 2])).shape == (2, 256) and len(gen(np.array([1, 2]), 2)) == 2
        assert built == [1, 1]


# -- guards: behaviour that held -----------------------------------------------------------------------------


def test_compare_ppl_on_a_three_token_toy_is_the_hand_computed_perplexity() -> None:
    """Tokens (0, 2, 1): row 0 predicts 2, row 1 predicts 1, row 2 predicts nothing; PPL is e^(mean NLL)."""
    logits = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [5.0, -7.0, 5.0]])
    nll = [math.log(math.e + 1 + math.e**2) - 2.0, math.log(2 + math.e**3) - 3.0]
    want = math.exp(sum(nll) / 2)
    res = compare_ppl(np.array([0, 2, 1]), 3, lambda w: logits[: len(w)], lambda w: logits[: len(w)])
    assert res.predicted == 2 and res.tokens == 3
    assert res.ppl_plain == res.ppl_scx == pytest.approx(want, rel=1e-15)
    # windows of 2 score (0→2) and nothing of the 1-token tail: one token, scored once
    one = compare_ppl(np.array([0, 2, 1]), 2, lambda w: logits[: len(w)], lambda w: logits[: len(w)])
    assert one.predicted == 1 and one.ppl_plain == pytest.approx(math.exp(nll[0]), rel=1e-15)


@pytest.mark.parametrize("name", ["mixtral-random", "qwen2-random"])
def test_random_models_of_the_other_families_leave_global_rng_alone(name: str) -> None:
    """tests/test_models.py checks tiny-llama; the Mixtral and Qwen2 classes build other modules (experts,
    a router, QKV biases) that could draw from torch's global generator at construction."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from scx_ref.zoo.random_models import RANDOM_MODELS, build_random_model

    state = torch.random.get_rng_state()
    model = build_random_model(RANDOM_MODELS[name])
    assert torch.equal(torch.random.get_rng_state(), state)
    spec, attn, hf = RANDOM_MODELS[name], model.model.layers[0].self_attn, model.config
    assert (hf.num_attention_heads, hf.num_key_value_heads) == (spec.n_heads, spec.n_kv_heads)
    assert attn.k_proj.weight.shape == (spec.n_kv_heads * spec.head_dim, spec.hidden_size)

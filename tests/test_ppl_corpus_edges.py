"""Perplexity, corpus and timing edges.

* ``timing.timed_prefill`` built the server and its transport after the clock started, so their
  construction was counted as the client's part of the request; they are now built before it.
* ``compare_ppl`` on rows × 0 logits raised numpy's raw ValueError; now a ConfigError.
* The ΔPPL evidence: ``compare_ppl`` on a tiny random model matches a perplexity computed by hand (token
  t+1 scored from row t, each window's first token never a target, a 1-token tail dropped, the mean over
  exactly the scored tokens), its two sides are computed independently (a perturbed SCX side moves
  ΔPPL, with its sign, and leaves the plaintext PPL bit-identical), and ``ppl_run`` fails a run whose SCX
  side computes another model.
* The corpus: the first n tokens are those of the whole text (the prefix tokenized for speed gives the
  same ids), counts past the corpus are refused at the exact boundary.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError
from scx_ref.reference import ReferenceModel
from scx_ref.timing import timed_prefill, timed_server
from scx_ref.zoo import load_weights
from scx_ref.zoo import perplexity as perplexity_mod
from scx_ref.zoo.corpus import byte_tokenize, corpus_text, corpus_tokens
from scx_ref.zoo.perplexity import check_corpus_tokens, compare_ppl, ppl_run

# -- timing ------------------------------------------------------------------------------------------------


class _SlowToBuild:
    """A server whose construction takes :data:`_BUILD` seconds and whose ``handle`` is instant."""

    def __init__(self, backend: Any) -> None:
        time.sleep(_BUILD)
        self.backend = backend

    def handle(self, request: Any) -> Any:
        return request


_BUILD = 0.1


class _Client:
    """The client calls timed_prefill makes: precompute (untimed) and a prefill sending one message."""

    def precompute(self, n: int, nonce: bytes) -> None:
        pass

    def prefill(self, ids: Any, link: Any, nonce: bytes) -> None:
        link.server.handle("open")


def test_timed_prefill_does_not_count_building_the_server_as_the_clients_time() -> None:
    served, in_server = timed_server(_SlowToBuild)
    server_s, client_s = timed_prefill(_Client(), served, None, [1, 2, 3], in_server)
    assert 0.0 <= server_s < _BUILD / 4
    assert client_s < _BUILD / 4  # was >= _BUILD: the server's construction read as the client's work


# -- perplexity by hand ------------------------------------------------------------------------------------


def _hand_ppl(logits_of: Any, ids: np.ndarray, window: int) -> tuple[float, int]:
    """PPL of non-overlapping windows, one Python float at a time: row t of a window's logits scores the
    window's token t+1; a window's first token is never scored; a 1-token window is skipped."""
    nll: list[float] = []
    for start in range(0, len(ids), window):
        w = ids[start : start + window]
        if len(w) < 2:
            continue
        rows = logits_of(w)
        for t in range(len(w) - 1):
            row = [float(v) for v in rows[t]]
            top = max(row)
            lse = top + math.log(math.fsum(math.exp(v - top) for v in row))
            nll.append(lse - row[int(w[t + 1])])
    return math.exp(math.fsum(nll) / len(nll)), len(nll)


@pytest.fixture(scope="module")
def two_models() -> tuple[ReferenceModel, ReferenceModel]:
    """A tiny random model and a copy whose LM head is 1 % larger (another model: a different PPL)."""
    w = load_weights("random:tiny-dense:3")
    other = copy.deepcopy(w)
    other.lm_head *= 1.01
    return ReferenceModel(w), ReferenceModel(other)


@pytest.mark.parametrize(("window", "predicted"), [(10, 3 * 9 + 6), (12, 3 * 11), (37, 36), (100, 36)])
def test_compare_ppl_is_the_hand_computed_perplexity(
    two_models: tuple[ReferenceModel, ReferenceModel], window: int, predicted: int
) -> None:
    """37 corpus tokens: windows of 10 score 9+9+9+6, of 12 score 11·3 (the 1-token tail scores nothing),
    one window scores 36."""
    ref, other = two_models
    ids = corpus_tokens(37, None, 256)
    plain = lambda w: ref.prefill(w)[0]  # noqa: E731
    scx = lambda w: other.prefill(w)[0]  # noqa: E731
    want_p, n_p = _hand_ppl(plain, ids, window)
    want_s, n_s = _hand_ppl(scx, ids, window)
    assert n_p == n_s == predicted

    same = compare_ppl(ids, window, plain, plain)
    assert same.predicted == predicted and same.ppl_plain == same.ppl_scx
    assert same.delta_ppl == 0.0 and same.rel_delta_ppl == 0.0 and same.max_abs_dlogit == 0.0
    assert same.ppl_plain == pytest.approx(want_p, rel=1e-12)

    res = compare_ppl(ids, window, plain, scx)
    assert res.predicted == predicted and res.tokens == 37 and res.window == min(window, 37)
    assert res.ppl_plain == same.ppl_plain  # the plaintext side is not touched by the other one
    assert res.ppl_scx == pytest.approx(want_s, rel=1e-12)
    assert abs(want_s - want_p) > 1e-3 * want_p  # the two models really differ
    assert res.delta_ppl == pytest.approx(want_s - want_p, rel=1e-9)  # signed: SCX minus plaintext
    assert res.rel_delta_ppl == pytest.approx(abs(want_s - want_p) / want_p, rel=1e-9)
    swapped = compare_ppl(ids, window, scx, plain)
    assert swapped.delta_ppl == pytest.approx(want_p - want_s, rel=1e-9)
    assert swapped.rel_delta_ppl == pytest.approx(abs(want_s - want_p) / want_s, rel=1e-9)


def test_compare_ppl_refuses_logits_of_no_vocabulary_with_a_config_error() -> None:
    """Rows × 0 logits (an engine with no vocabulary) were numpy's raw ValueError (a max over nothing)."""
    empty = lambda w: np.zeros((len(w), 0))  # noqa: E731
    with pytest.raises(ConfigError, match=r"3 rows × V for a window of 3, got \(3, 0\)"):
        compare_ppl(np.arange(6), 3, empty, empty)


def test_ppl_run_fails_when_the_scx_side_computes_another_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """ΔPPL = 0 is evidence only if the SCX side runs its own computation: an SCX engine on weights with
    one LM-head column changed gives ΔPPL ≠ 0 and a FAIL, and the plaintext PPL stays what it was."""
    honest = ppl_run("tiny-llama", "float64", "permute", 0.0, tokens=64, window=32)
    assert honest["pass"] and honest["max_abs_dlogit"] > 0.0  # independent sides: rounding differs

    from scx_ref.zoo.engines import scx_logits as real

    def other_model(weights: Any, *a: Any, **k: Any) -> Any:
        changed = copy.deepcopy(weights)
        changed.lm_head[:, 7] += 0.5
        return real(changed, *a, **k)

    monkeypatch.setattr(perplexity_mod, "scx_logits", other_model)
    rec = ppl_run("tiny-llama", "float64", "permute", 0.0, tokens=64, window=32)
    assert not rec["pass"] and rec["rel_delta_ppl"] > 1e-6 and rec["delta_ppl"] != 0.0
    assert rec["ppl_plain"] == honest["ppl_plain"] and rec["predicted"] == honest["predicted"] == 62
    assert rec["max_abs_dlogit"] > 0.1


# -- corpus ------------------------------------------------------------------------------------------------


class _WordTokenizer:
    """A tokenizer whose tokens are whitespace-separated words (id: the word's length mod 97)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [len(word) % 97 for word in text.split()]}


@pytest.mark.parametrize("n", [2, 500, 40_000])
def test_corpus_tokens_are_the_whole_texts_first_tokens(n: int) -> None:
    tok = _WordTokenizer()
    full = np.asarray(tok(corpus_text(), add_special_tokens=False)["input_ids"], dtype=np.int64)
    got = corpus_tokens(n, tok, 97)
    assert got.dtype == np.int64 and np.array_equal(got, full[:n])
    assert np.array_equal(corpus_tokens(n, tok, 97), got)  # deterministic


def test_corpus_counts_are_refused_exactly_past_the_corpus() -> None:
    data = corpus_text().encode("utf-8")
    most = len(data)
    assert check_corpus_tokens(most) == most
    assert np.array_equal(corpus_tokens(most, None, 256), np.frombuffer(data, np.uint8).astype(np.int64))
    assert np.array_equal(corpus_tokens(most, None, 256), byte_tokenize(corpus_text(), 256))
    with pytest.raises(ConfigError, match="more than the corpus holds"):
        check_corpus_tokens(most + 1)
    with pytest.raises(ConfigError, match="only"):
        corpus_tokens(most + 1, None, 256)
    words = len(corpus_text().split())
    with pytest.raises(ConfigError, match=f"only {words} tokens"):
        corpus_tokens(words + 1, _WordTokenizer(), 97)

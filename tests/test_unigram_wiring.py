"""The public unigram reaches the clients a user runs (DESIGN §5.1: "block 1: embeddings of tokens drawn
from a public unigram distribution"): :func:`~scx_ref.zoo.corpus.public_unigram`, the zoo engines'
``unigram`` (``scx verify``, ``scx ppl``) and :class:`~scx_ref.hf.SCXModel`'s (``scx generate``), and
``unigram_counts``' ``smoothing``. The measurement that asks for it is ``models/unigram_decoys.py``."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, ShapeError
from scx_ref.protocol.decoys import CalibrationPool, secret_calibration_tokens, unigram_counts
from scx_ref.stages import Stage
from scx_ref.zoo.corpus import UNIGRAM_SMOOTHING, byte_tokenize, corpus_text, public_unigram
from scx_ref.zoo.engines import scx_config, scx_generate, scx_logits
from tests.tiny import tiny_weights


def _qkv0(pool: Any) -> np.ndarray:
    return np.asarray(pool.rows[(Stage.QKV, 0)])


# -- unigram_counts' smoothing ---------------------------------------------------------------------
def test_smoothing_picks_the_least_scale_that_meets_it() -> None:
    """c = k·count + 1 with the least k ≥ 1 making V / Σc ≤ smoothing (hand-computed: V = 5, N = 3)."""
    ids = np.array([1, 1, 3])
    assert unigram_counts(ids, 5).tolist() == [1, 3, 1, 2, 1]  # add-one: k = 1, share 5/8
    # share ≤ 1/2 needs 5 ≤ (3k + 5)/2, k ≥ 5/3: k = 2 → [1, 5, 1, 3, 1], share 5/11
    assert unigram_counts(ids, 5, smoothing=0.5).tolist() == [1, 5, 1, 3, 1]
    # share ≤ 0.01 needs k ≥ 5·0.99/(0.01·3) = 165 exactly (float 0.01 is a hair above 1/100: 165 meets it)
    got = unigram_counts(ids, 5, smoothing=0.01)
    assert got.tolist() == [1, 331, 1, 166, 1]
    assert Fraction(5, int(got.sum())) <= Fraction(0.01)
    assert Fraction(5, 3 * 164 + 5) > Fraction(0.01)  # one less would not do
    assert unigram_counts(ids, 5, smoothing=1.0).tolist() == [1, 3, 1, 2, 1]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_a_smoothing_outside_0_1_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError):
        unigram_counts(np.array([1]), 5, smoothing=bad)


def test_a_smoothing_an_empty_text_cannot_meet_or_too_small_to_draw_by_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty text"):
        unigram_counts(np.zeros(0, dtype=np.int64), 5, smoothing=0.5)
    assert unigram_counts(np.zeros(0, dtype=np.int64), 5, smoothing=1.0).tolist() == [1] * 5
    with pytest.raises(ConfigError, match="too large"):
        unigram_counts(np.array([1]), 5, smoothing=1e-300)


# -- the corpus's public unigram -------------------------------------------------------------------
def test_public_unigram_is_the_corpus_counts_smoothed_to_one_percent() -> None:
    vocab = 300
    counts = public_unigram(None, vocab)
    ids = byte_tokenize(corpus_text(), vocab)
    np.testing.assert_array_equal(counts, unigram_counts(ids, vocab, UNIGRAM_SMOOTHING))
    assert vocab / counts.sum() <= UNIGRAM_SMOOTHING
    k = int(counts.max() - 1) // int(np.bincount(ids).max())
    np.testing.assert_array_equal(counts, k * np.bincount(ids, minlength=vocab) + 1)


# -- the zoo engines -------------------------------------------------------------------------------
def test_an_engine_draws_its_pool_text_from_the_unigram_given() -> None:
    w = tiny_weights(3)
    vocab = w.config.vocab_size
    unigram = public_unigram(None, vocab)
    cfg = scx_config("permute", 1.0, max_length=16)
    for make in (scx_logits, scx_generate):
        with make(w, "float64", cfg, unigram=unigram) as engine:
            scx = engine._scx
            text = secret_calibration_tokens(scx.keys, vocab, unigram=unigram)
            want = CalibrationPool.from_tokens(scx.backend, text)
            np.testing.assert_array_equal(_qkv0(scx.pool), _qkv0(want))
            uniform = CalibrationPool.from_tokens(scx.backend, secret_calibration_tokens(scx.keys, vocab))
            assert not np.array_equal(_qkv0(scx.pool), _qkv0(uniform))


def test_an_engine_refuses_a_bad_unigram_and_one_with_gaussian_decoys() -> None:
    w = tiny_weights(3)
    cfg = scx_config("permute", 1.0, max_length=16)
    with pytest.raises(ShapeError):
        scx_logits(w, "float64", cfg, unigram=np.ones(w.config.vocab_size + 1))
    gauss = scx_config("permute", 1.0, max_length=16, decoys="gaussian")
    with pytest.raises(ConfigError, match="Gaussian"):
        scx_generate(w, "float64", gauss, unigram=np.ones(w.config.vocab_size))


# -- the Hugging Face bridge -----------------------------------------------------------------------
def test_scx_model_draws_its_pool_text_from_the_unigram_given() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from scx_ref.hf import SCXModel

    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    unigram = np.arange(97) % 5  # tokens ≡ 0 (mod 5) can never be drawn
    scx = SCXModel.from_hf(model, level="permute", unigram=unigram)
    ids = torch.tensor([[5, 17, 3, 8]])
    out = scx.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 6)
    pool = scx._decoys
    assert isinstance(pool, CalibrationPool)
    # block-1 pool rows are embedding rows of the text's tokens: every one of positive weight, not ≡ 0 (5)
    embed = model.get_input_embeddings().weight.detach().double().numpy()
    rows = _qkv0(pool).astype(np.float64)
    match = np.argmin(((rows[:, None, :] - embed[None, :, :]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_array_equal(rows, embed[match])
    assert set((match % 5).tolist()) <= {1, 2, 3, 4} and len(set(match.tolist())) > 20
    with pytest.raises(ShapeError):  # refused when the model is wrapped, before any session
        SCXModel.from_hf(model, level="permute", unigram=np.ones(3))
    with pytest.raises(ConfigError, match="Gaussian"):
        SCXModel.from_hf(model, level="permute", unigram=np.ones(97), decoys="gaussian")


# -- the client ------------------------------------------------------------------------------------
def test_a_client_refuses_a_bad_unigram_before_building_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked first: before, a bad ``unigram`` was refused only when the pool was drawn, after the reply
    verifier's precomputation (a pass over every weight matrix) had been built for nothing."""
    from scx_ref.backends import NumpyBackend
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig
    from scx_ref.protocol import client as client_module

    w = tiny_weights(3)
    built: list[int] = []
    real = client_module.SketchCache.build

    def spy(self: Any) -> None:
        built.append(1)
        real(self)

    monkeypatch.setattr(client_module.SketchCache, "build", spy)
    keys = KeySchedule.generate()
    with pytest.raises(ShapeError):
        Client(NumpyBackend(w), keys, SCXConfig(level="permute"), unigram=np.ones(w.config.vocab_size - 1))
    assert not built
    Client(NumpyBackend(w), keys, SCXConfig(level="permute"), unigram=np.ones(w.config.vocab_size))
    assert built == [1]


# -- the commands -----------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a spy once it has seen what a command hands its SCX side."""


def test_verify_and_ppl_hand_their_engines_the_public_unigram(monkeypatch: pytest.MonkeyPatch) -> None:
    """``scx verify`` and ``scx ppl`` build their SCX engines with the corpus's public unigram (and none
    with Gaussian decoys: ``pool_unigram``)."""
    from scx_ref.cli import main
    from scx_ref.zoo import engines, load_model

    seen: list[Any] = []

    def spy(
        self: Any, weights: Any, dtype: Any, cfg: Any, device: Any, server: Any = None, unigram: Any = None
    ) -> None:
        seen.append(unigram)
        raise _Stop

    monkeypatch.setattr(engines._SCX, "__init__", spy)
    vocab = load_model("tiny-llama")[2].config.vocab_size
    want = public_unigram(None, vocab)
    for argv in (
        ["verify", "--model", "tiny-llama", "--quiet"],
        ["ppl", "--model", "tiny-llama", "--tokens", "64"],
    ):
        with pytest.raises(_Stop):
            main(argv)
        np.testing.assert_array_equal(seen.pop(), want)
    from scx_ref.zoo.engines import pool_unigram

    assert pool_unigram(scx_config("paper", 1.0, decoys="gaussian"), None, vocab) is None


def test_generate_hands_its_model_the_public_unigram(monkeypatch: pytest.MonkeyPatch) -> None:
    from scx_ref import hf
    from scx_ref.cli import main
    from scx_ref.zoo import load_model

    seen: dict[str, Any] = {}

    def spy(model: Any, **options: Any) -> None:
        seen.update(options)
        raise _Stop

    monkeypatch.setattr(hf.SCXModel, "from_hf", staticmethod(spy))
    with pytest.raises(_Stop):
        main(["generate", "--model", "tiny-llama", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
    vocab = load_model("tiny-llama")[2].config.vocab_size
    np.testing.assert_array_equal(seen["unigram"], public_unigram(None, vocab))

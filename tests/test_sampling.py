"""Sampling on the client's logits (scx_ref.sampling): with the same seed and settings SCX generation is HF
``generate``'s, token for token (float64 models); stop strings and EOS stop where HF stops; the streamer
sees what HF's sees; every unsupported option is refused by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scx_ref.errors import ConfigError, ServiceError  # noqa: E402
from scx_ref.hf import SCXModel  # noqa: E402
from scx_ref.keys import KeySchedule  # noqa: E402
from scx_ref.sampling import SUPPORTED, generate_tokens, generation_settings  # noqa: E402

PROMPT = np.array([[5, 17, 3, 88, 41, 9, 60, 2, 77, 31, 12]])


def tiny(kind: str = "llama", seed: int = 0) -> Any:
    """A tiny random float64 HF model (4 blocks, so SCX has middle blocks) with O(1) logits."""
    common: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.05) + (p.ndim == 1))
    return model.double().eval()


def hf_generate(model: Any, prompt: np.ndarray, seed: int, **kw: Any) -> list[int]:
    ids = torch.from_numpy(prompt)
    with torch.random.fork_rng(), torch.no_grad():  # HF samples from the global generator
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return [int(t) for t in out[0]]


SETTINGS = [
    dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    dict(do_sample=True, temperature=1.3, top_k=50, repetition_penalty=1.3),
    dict(do_sample=True, top_p=0.6),
    dict(do_sample=False, repetition_penalty=1.5),
]


CASES = [("llama", s) for s in SETTINGS] + [("qwen2", SETTINGS[1])]


@pytest.mark.parametrize(("kind", "settings"), CASES, ids=lambda c: str(c))
def test_sampling_equals_hf_generate_token_for_token(kind: str, settings: dict[str, Any]) -> None:
    model = tiny(kind, seed=1)
    scx = SCXModel.from_hf(model, level="paper", keys=KeySchedule.generate(), decoys="gaussian")
    runs = []
    for seed in (0, 1):
        want = hf_generate(model, PROMPT, seed, max_new_tokens=16, eos_token_id=None, **settings)
        sampler = {"seed": seed} if settings["do_sample"] else {}  # greedy takes no seed (it would warn)
        got = scx.generate(PROMPT, max_new_tokens=16, eos_token_id=None, **sampler, **settings)
        assert got[0].tolist() == want, f"seed {seed}"
        runs.append(want)
    if settings["do_sample"]:  # the seed matters: the two seeds give two continuations
        assert runs[0] != runs[1]


def _char_tokenizer() -> Any:
    """A word-level tokenizer whose 97 tokens are single characters (for stop strings on the tiny model)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {chr(0x41 + i): i for i in range(97)}
    tok = Tokenizer(WordLevel(vocab, unk_token="A"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def test_stop_strings_and_eos_stop_where_hf_stops() -> None:
    model = tiny("llama", seed=3)
    scx = SCXModel.from_hf(model, level="permute", keys=KeySchedule.generate(), decoys="gaussian")
    tok = _char_tokenizer()
    free = hf_generate(model, PROMPT, 0, max_new_tokens=12, eos_token_id=None, do_sample=True)
    new = free[PROMPT.shape[1] :]
    stop = tok.convert_ids_to_tokens(new[3]) + tok.convert_ids_to_tokens(new[4])  # ends at new token 5
    kw: dict[str, Any] = dict(max_new_tokens=12, eos_token_id=None, do_sample=True, stop_strings=[stop])
    want = hf_generate(model, PROMPT, 0, tokenizer=tok, **kw)
    got = scx.generate(PROMPT, seed=0, tokenizer=tok, **kw)[0].tolist()
    assert got == want and len(got) - PROMPT.shape[1] <= 5
    eos = new[2]  # the third new token as EOS: both stop after it
    want = hf_generate(model, PROMPT, 0, max_new_tokens=12, eos_token_id=eos, do_sample=True)
    got = scx.generate(PROMPT, max_new_tokens=12, eos_token_id=eos, do_sample=True, seed=0)[0].tolist()
    assert got == want and got[-1] == eos and len(got) - PROMPT.shape[1] <= 3


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def put(self, value: Any) -> None:
        self.calls.append(("put", [int(v) for v in torch.as_tensor(value).reshape(-1)]))

    def end(self) -> None:
        self.calls.append(("end", []))


def test_streamer_gets_what_hf_streamer_gets() -> None:
    model = tiny("llama", seed=4)
    scx = SCXModel.from_hf(model, level="paper", keys=KeySchedule.generate(), decoys="gaussian")
    ids = torch.from_numpy(PROMPT)
    hf_rec, scx_rec = _Recorder(), _Recorder()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, eos_token_id=None,
                       do_sample=False, streamer=hf_rec)  # fmt: skip
    scx.generate(PROMPT, max_new_tokens=6, eos_token_id=None, streamer=scx_rec)
    assert scx_rec.calls == hf_rec.calls
    with pytest.raises(ConfigError, match="batch size 1"):
        scx.generate(np.concatenate([PROMPT, PROMPT]), 2, streamer=_Recorder())


def test_unsupported_options_are_refused_by_name() -> None:
    model = tiny("llama")
    scx = SCXModel.from_hf(model, level="permute", keys=KeySchedule.generate(), decoys="gaussian")
    refused = [("min_p", 0.1), ("typical_p", 0.5), ("output_scores", True), ("penalty_alpha", 0.6)]
    refused += [("no_repeat_ngram_size", 3), ("generation_config", None), ("num_return_sequences", 2)]
    for name, value in refused:
        with pytest.raises(ConfigError, match=f"'{name}'"):
            scx.generate(PROMPT, 4, **{name: value})
    with pytest.raises(ConfigError, match="'min_p', 'penalty_alpha'"):
        scx.generate(PROMPT, 4, penalty_alpha=0.6, min_p=0.2)
    with pytest.raises(ConfigError, match="num_beams must be 1"):
        scx.generate(PROMPT, 4, num_beams=4)
    with pytest.raises(ConfigError, match="exactly one"):
        scx.generate(PROMPT, 4, max_length=30)
    bad_values = [dict(temperature=0.0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)]
    bad_values += [dict(seed=-1), dict(do_sample="yes"), dict(max_new_tokens=-1), dict(stop_strings=[""])]
    for bad in bad_values:
        with pytest.raises(ConfigError):
            scx.generate(PROMPT, **bad)
    with pytest.raises(ConfigError, match="tokenizer"):
        scx.generate(PROMPT, 4, stop_strings=["x"])
    with pytest.raises(ConfigError, match="left padding"):
        scx.generate(PROMPT, 4, attention_mask=np.zeros_like(PROMPT))
    assert "do_sample" in SUPPORTED and "min_p" not in SUPPORTED


def test_generation_settings_follow_the_model_config() -> None:
    gc = transformers.GenerationConfig(do_sample=True, top_k=7, temperature=0.5, eos_token_id=[4, 9])
    s = generation_settings(gc, {"max_new_tokens": 5})
    assert (s.do_sample, s.top_k, s.temperature, s.top_p, s.eos_token_ids) == (True, 7, 0.5, 1.0, (4, 9))
    s = generation_settings(gc, {"top_k": 3, "eos_token_id": None, "max_length": 12}, width=4)
    assert s.top_k == 3 and s.eos_token_ids == () and s.max_new_tokens == 8
    assert generation_settings(None, {"max_new_tokens": 1}).top_k == 50  # transformers' default


def test_an_error_mid_generation_reports_the_tokens_made() -> None:
    logits = np.eye(5)[[0, 1, 2]]
    steps = iter([np.eye(5)[3], np.eye(5)[4]])

    def decode(tok: int) -> np.ndarray:
        nxt = next(steps, None)
        if nxt is None:
            raise ServiceError("the server went away")
        return nxt

    settings = generation_settings(None, {"max_new_tokens": 10})
    with pytest.raises(ServiceError, match="went away") as info:  # the same error, its class kept
        generate_tokens(np.array([0, 1, 2]), settings, lambda ids: logits, decode)
    assert info.value.tokens == [2, 3, 4]
    # an exception that is not a project error (a custom transport's): its class kept, the tokens noted
    steps = iter([np.eye(5)[3]])

    def broken(tok: int) -> np.ndarray:
        nxt = next(steps, None)
        if nxt is None:
            raise ConnectionResetError("peer reset")
        return nxt

    with pytest.raises(ConnectionResetError) as reset:
        generate_tokens(np.array([0, 1, 2]), settings, lambda ids: logits, broken)
    assert reset.value.__notes__ == ["scx_ref: 2 token(s) made before the failure: [2, 3]"]


def test_sampling_options_without_do_sample_warn() -> None:
    """Greedy decoding ignores temperature/top_k/top_p/seed: said with a warning (as transformers does),
    never silently — an SCXWarning, as errors.py promises of every warning the library gives (a
    UserWarning subclass; it was a plain UserWarning). Control: with do_sample=True, or without them,
    nothing is said."""
    import warnings

    from scx_ref.errors import SCXWarning

    with pytest.warns(SCXWarning, match="temperature, top_p given with do_sample=False"):
        generation_settings(None, {"max_new_tokens": 2, "temperature": 0.7, "top_p": 0.9})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation_settings(None, {"max_new_tokens": 2, "temperature": 0.7, "do_sample": True})
        generation_settings(None, {"max_new_tokens": 2, "repetition_penalty": 1.2})


def test_an_explicit_none_means_not_applied_as_in_hf() -> None:
    """transformers 5.x reads ``temperature=None`` (``top_k``, ``top_p``, ``repetition_penalty``) as "not
    applied": a neutral value, not the model's generation_config. Before, SCX refused the None
    (ConfigError); here the model's own config sets every one of them, so "the model's value" differs."""
    model = tiny("llama", seed=1)
    gc = model.generation_config
    gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty = 0.3, 5, 0.5, 1.4
    nones: dict[str, Any] = dict(temperature=None, top_k=None, top_p=None, repetition_penalty=None)
    s = generation_settings(gc, dict(do_sample=True, max_new_tokens=4, **nones))
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    scx = SCXModel.from_hf(model, level="paper", keys=KeySchedule.generate(), decoys="gaussian")
    kw: dict[str, Any] = dict(max_new_tokens=12, eos_token_id=None, do_sample=True, **nones)
    want = hf_generate(model, PROMPT, 0, **kw)
    assert scx.generate(PROMPT, seed=0, **kw)[0].tolist() == want
    assert want != hf_generate(model, PROMPT, 0, max_new_tokens=12, eos_token_id=None, do_sample=True)

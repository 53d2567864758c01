"""Tests that kill mutants of :mod:`scx_ref.sampling` that survived ``python -m mutation.run sampling``
(mutation/REPORT_sampling.md): each refusal's class and whole message, settings read from a model config
without the sampling attributes, greedy decoding's loop and its notes, a sampled draw with one token left,
and generation that warns of nothing it handles itself."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from scx_ref import sampling
from scx_ref.errors import ConfigError, NonFiniteError, ProtocolError, SCXWarning, ShapeError
from scx_ref.sampling import GenerationSettings, generate_tokens, generation_settings, greedy_tokens
from tests.accelerator import GeneratorOnAccelerator
from tests.refusals import Refusal, refusal_test

V = 5


def _logits(ids: Any) -> Any:
    return np.tile(np.arange(V, dtype=np.float64), (len(ids), 1))


def _next(token: int) -> Any:
    return np.roll(np.arange(V, dtype=np.float64), token)


def test_the_option_names_are_generate_options_keys_and_the_sampling_ones_among_them() -> None:
    assert tuple(sampling.GENERATE_OPTIONS) == sampling.SUPPORTED
    assert set(sampling._SAMPLING_ONLY) <= set(sampling.SUPPORTED)
    assert sampling.MAX_SEED == 2**64 - 1


_S = generation_settings(None, {"max_new_tokens": 2})
_STOPS = generation_settings(None, {"max_new_tokens": 2, "stop_strings": "x"})

REFUSALS: list[Refusal] = [
    (
        "options-list",
        lambda: generation_settings(None, [1]),  # type: ignore[arg-type]
        ConfigError,
        "generation options must be a mapping of names to values, got list",
    ),
    (
        "do-sample-str",
        lambda: generation_settings(None, {"do_sample": "yes", "max_new_tokens": 1}),
        ConfigError,
        "do_sample must be True or False, got 'yes'",
    ),
    (
        "beams-true",
        lambda: generation_settings(None, {"num_beams": True, "max_new_tokens": 1}),
        ConfigError,
        "num_beams must be 1 (SCX has no beam search), got True",
    ),
    (
        "neither-length",
        lambda: generation_settings(None, {}),
        ConfigError,
        "give exactly one of max_new_tokens and max_length",
    ),
    (
        "new-negative",
        lambda: generation_settings(None, {"max_new_tokens": -1}),
        ConfigError,
        "max_new_tokens must be >= 0, got -1",
    ),
    (
        "length-below-prompt",
        lambda: generation_settings(None, {"max_length": 2}, 3),
        ConfigError,
        "max_length must be >= 3, got 2",
    ),
    (
        "stops-int",
        lambda: generation_settings(None, {"max_new_tokens": 1, "stop_strings": 3}),
        ConfigError,
        "stop_strings must be a string or a list of strings, got 3",
    ),
    (
        "stops-not-str",
        lambda: generation_settings(None, {"max_new_tokens": 1, "stop_strings": ["a", 5]}),
        ConfigError,
        "stop_strings must be non-empty strings",
    ),
    (
        "temperature-zero",
        lambda: generation_settings(None, {"max_new_tokens": 1, "do_sample": True, "temperature": 0}),
        ConfigError,
        "temperature must be > 0, got 0",
    ),
    (
        "top-p-above",
        lambda: generation_settings(None, {"max_new_tokens": 1, "top_p": 1.5}),
        ConfigError,
        "top_p must lie in [0, 1], got 1.5",
    ),
    (
        "seed-65-bits",
        lambda: generation_settings(None, {"max_new_tokens": 1, "seed": 2**64}),
        ConfigError,
        "seed must lie in [0, 18446744073709551615], got an integer of 65 bits",
    ),
    (
        "eos-negative",
        lambda: generation_settings(None, {"max_new_tokens": 1, "eos_token_id": [-1]}),
        ConfigError,
        "eos_token_id must be >= 0, got -1",
    ),
    (
        "pad-negative",
        lambda: generation_settings(None, {"max_new_tokens": 1, "pad_token_id": -1}),
        ConfigError,
        "pad_token_id must be >= 0, got -1",
    ),
    (
        "direct-do-sample",
        lambda: GenerationSettings(do_sample="y" * 60),  # type: ignore[arg-type]
        ConfigError,
        f"do_sample must be True or False, got '{'y' * 39}",  # the repr cut at 40 characters
    ),
    (
        "direct-eos-int",
        lambda: GenerationSettings(eos_token_ids=5),  # type: ignore[arg-type]
        ConfigError,
        "eos_token_ids must be a tuple, got int",
    ),
    (
        "direct-stops-str",
        lambda: GenerationSettings(stop_strings="ab"),  # type: ignore[arg-type]
        ConfigError,
        "stop_strings must be a tuple, got str",
    ),
    (
        "direct-stops-empty",
        lambda: GenerationSettings(stop_strings=("",)),
        ConfigError,
        "stop_strings must be non-empty strings",
    ),
    ("direct-top-k", lambda: GenerationSettings(top_k=-1), ConfigError, "top_k must be >= 0, got -1"),
    (
        "direct-penalty",
        lambda: GenerationSettings(repetition_penalty=0),
        ConfigError,
        "repetition_penalty must be > 0, got 0",
    ),
    (
        "direct-seed",
        lambda: GenerationSettings(seed=-1),
        ConfigError,
        "seed must lie in [0, 18446744073709551615], got -1",
    ),
    (
        "settings-dict",
        lambda: generate_tokens(np.array([1]), {"max_new_tokens": 1}, _logits, _next),  # type: ignore[arg-type]
        ConfigError,
        "settings must be GenerationSettings, got dict",
    ),
    (
        "generator-numpy",
        lambda: generate_tokens(np.array([1]), _S, _logits, _next, generator=np.random.default_rng(0)),
        ConfigError,
        "generator must be None or a CPU torch.Generator (the sampler's), got Generator",
    ),
    (
        "generator-cuda",
        lambda: generate_tokens(np.array([1]), _S, _logits, _next, generator=GeneratorOnAccelerator()),
        ConfigError,
        "generator must be None or a CPU torch.Generator (the sampler's), got GeneratorOnAccelerator on "
        "cuda:0",
    ),
    (
        "stops-no-tokenizer",
        lambda: generate_tokens(np.array([1]), _STOPS, _logits, _next),
        ConfigError,
        "stop_strings needs the model's tokenizer (tokenizer=...)",
    ),
    (
        "prefill-scalar",
        lambda: generate_tokens(np.array([1]), _S, lambda ids: np.float64(1.0), _next),
        ShapeError,
        "the prompt's logits must be n × V, got float64 of shape ()",
    ),
    (
        "prefill-none",
        lambda: generate_tokens(np.array([1]), _S, lambda ids: None, _next),  # type: ignore[arg-type,return-value]
        ShapeError,
        "the prompt's logits must be n × V, got NoneType of shape None",
    ),
    (
        "sampling-overflow",
        lambda: generate_tokens(
            np.array([1]),
            GenerationSettings(max_new_tokens=1, do_sample=True, temperature=1e-40, top_k=0),
            _logits,
            _next,
        ),
        NonFiniteError,
        "the sampling probabilities after 0 new token(s) are not finite: the scores overflow float32 "
        "(temperature or repetition_penalty too close to 0?)",
    ),
    (
        "greedy-overflow",
        lambda: generate_tokens(np.array([1]), _S, lambda ids: np.array([[1e300, 0.0]]), _next),
        NonFiniteError,
        "the logits after 0 new token(s) overflow float32 (the scores greedy decoding compares; "
        "repetition_penalty too close to 0?)",
    ),
]


# an overflow past float32 is refused, never warned of
test_each_refusal_has_its_class_and_whole_message = refusal_test(REFUSALS, warnings_as_errors=True)


def test_an_unknown_option_is_named_with_every_supported_one() -> None:
    supported = (
        "max_new_tokens: new tokens per row (an integer >= 0); max_length: prompt width + new tokens "
        "(instead of max_new_tokens); attention_mask: left padding (0s then 1s per row); "
    )
    with pytest.raises(ConfigError) as info:
        generation_settings(None, {"min_p": 0.1, "max_new_tokens": 1})
    text = str(info.value)
    assert text.startswith(f"unsupported generation option(s) 'min_p'. Supported: {supported}")
    assert text.endswith("; streamer: an object with put(ids) and end(), as HF's streamers")


def test_a_tokenizer_stop_strings_cannot_use_is_named() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^tokenizer must be the model's transformers tokenizer \(for "
        r"stop_strings\), got object: ",
    ):
        generate_tokens(np.array([1]), _STOPS, _logits, _next, tokenizer=object())


def test_a_streamer_without_put_is_refused_before_the_prefill() -> None:
    calls: list[Any] = []

    def prefill(ids: Any) -> Any:
        calls.append(ids)
        return _logits(ids)

    with pytest.raises(
        ConfigError, match=r"^streamer must have put\(ids\) and end\(\) methods .* got object$"
    ):
        generate_tokens(np.array([1]), _S, prefill, _next, streamer=object())
    assert calls == []


def test_settings_from_a_config_without_sampling_attributes_are_transformers_defaults() -> None:
    settings = generation_settings(SimpleNamespace(), {"max_new_tokens": 1})
    assert settings == GenerationSettings(max_new_tokens=1)
    assert generation_settings(None, {"max_length": 0}).max_new_tokens == 0  # a prompt of width 0 by default


def test_sampling_options_with_greedy_decoding_warn_in_these_words_at_the_callers_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The level is read where it is passed on (a test of the warning's file and line is
    tests/test_hf_generate_api.py's)."""
    seen: list[tuple[str, Any, int]] = []
    monkeypatch.setattr(
        warnings,
        "warn",
        lambda text, category, stacklevel=1: seen.append((text, category, stacklevel)),
    )
    generation_settings(None, {"max_new_tokens": 1, "temperature": 0.5, "seed": 3})
    assert seen == [
        (
            "temperature, seed given with do_sample=False: greedy decoding does not use them "
            "(pass do_sample=True to sample)",
            SCXWarning,
            3,
        )
    ]


def test_greedy_tokens_calls_following_once_per_token_after_the_first() -> None:
    calls: list[int] = []

    def following(t: int) -> int:
        calls.append(t)
        return t + 1

    assert greedy_tokens(lambda: 5, following, 4) == [5, 6, 7, 8]
    assert calls == [5, 6, 7]
    assert greedy_tokens(lambda: 5, following, 0) == []


def test_greedy_tokens_notes_the_tokens_made_before_a_foreign_error() -> None:
    def following(t: int) -> int:
        if t == 6:
            raise ValueError("transport down")
        return t + 1

    with pytest.raises(ValueError, match="transport down") as info:
        greedy_tokens(lambda: 5, following, 4)
    assert getattr(info.value, "__notes__", None) == ["scx_ref: 2 token(s) made before the failure: [5, 6]"]


def test_greedy_tokens_raises_an_scx_error_again_with_its_tokens() -> None:
    def following(t: int) -> int:
        raise ProtocolError("bad reply")

    with pytest.raises(ProtocolError, match="bad reply") as info:
        greedy_tokens(lambda: 5, following, 3)
    assert info.value.tokens == [5]


def test_sampling_with_one_token_left_draws_it_without_a_warning() -> None:
    """top_k = 1 leaves one token of nonzero probability: one draw from it (two draws without replacement
    cannot be made), and nothing is warned of (softmax over the vocabulary axis, named)."""
    settings = generation_settings(None, {"max_new_tokens": 3, "do_sample": True, "top_k": 1, "seed": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = generate_tokens(np.array([1]), settings, _logits, _next)
    greedy = generate_tokens(np.array([1]), GenerationSettings(max_new_tokens=3), _logits, _next)
    assert tokens == greedy == [4, 3, 2]


def test_settings_built_directly_store_python_numbers_and_tuples() -> None:
    settings = GenerationSettings(
        max_new_tokens=np.int16(4),
        temperature=np.float32(0.5),
        top_k=np.int64(3),
        top_p=np.float64(0.25),
        repetition_penalty=np.float32(2.0),
        seed=np.uint64(7),
        eos_token_ids=[np.int64(2)],  # type: ignore[arg-type]
        pad_token_id=np.int32(1),
        stop_strings=["a"],  # type: ignore[arg-type]
    )
    stored = {
        name: getattr(settings, name)
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
    }
    assert stored == {
        "max_new_tokens": 4,
        "temperature": 0.5,
        "top_k": 3,
        "top_p": 0.25,
        "repetition_penalty": 2.0,
        "seed": 7,
    }
    assert [type(v) for v in stored.values()] == [int, float, int, float, float, int]
    assert settings.eos_token_ids == (2,) and type(settings.eos_token_ids[0]) is int
    assert settings.pad_token_id == 1 and type(settings.pad_token_id) is int
    assert settings.stop_strings == ("a",)


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (
            {"do_sample": True, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "repetition_penalty": 1.2},
            [
                "RepetitionPenaltyLogitsProcessor",
                "TemperatureLogitsWarper",
                "TopKLogitsWarper",
                "TopPLogitsWarper",
            ],
        ),
        (
            {"do_sample": False, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "repetition_penalty": 1.2},
            ["RepetitionPenaltyLogitsProcessor"],
        ),
        ({"do_sample": True}, ["TopKLogitsWarper"]),
        ({"do_sample": True, "top_k": 0, "top_p": 1.0}, []),
        ({"do_sample": True, "top_k": 0, "top_p": 0.999}, ["TopPLogitsWarper"]),
        ({"do_sample": True, "top_k": 0, "temperature": 0.999}, ["TemperatureLogitsWarper"]),
    ],
    ids=["all", "greedy", "default-sampling", "none", "top-p", "temperature"],
)
def test_the_processors_are_generates_in_its_order(options: dict[str, Any], names: list[str]) -> None:
    processors = GenerationSettings(**options).processors()
    assert [type(p).__name__ for p in processors] == names
    for p in processors:
        value = {
            "RepetitionPenaltyLogitsProcessor": ("penalty", options.get("repetition_penalty")),
            "TemperatureLogitsWarper": ("temperature", options.get("temperature")),
            "TopKLogitsWarper": ("top_k", options.get("top_k", 50)),
            "TopPLogitsWarper": ("top_p", options.get("top_p")),
        }[type(p).__name__]
        assert getattr(p, value[0]) == value[1]
        if hasattr(p, "min_tokens_to_keep"):
            assert p.min_tokens_to_keep == 1


def test_the_generator_is_seeded_with_the_seed_or_from_entropy() -> None:
    assert GenerationSettings(seed=7).generator().initial_seed() == 7
    assert GenerationSettings(seed=2**64 - 1).generator().initial_seed() == 2**64 - 1
    fresh = {GenerationSettings().generator().initial_seed() for _ in range(3)}
    assert len(fresh) == 3 and 67280421310721 not in fresh  # not torch's default seed


def test_seeded_sampling_draws_from_its_own_generator_not_the_global_one() -> None:
    """Without a generator passed in, the draws come from ``settings.generator()`` (seeded by ``seed``): the
    same tokens whatever the global random state, which they leave as it was."""
    torch = pytest.importorskip("torch")
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, top_k=0, seed=11)
    flat = lambda ids: np.zeros((len(ids), 50))  # noqa: E731 - uniform over 50 tokens
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(generate_tokens(np.array([1]), settings, flat, lambda t: np.zeros(50)))
        assert torch.equal(torch.get_rng_state(), state)
    own = torch.Generator()
    own.manual_seed(11)
    passed = generate_tokens(np.array([1]), settings, flat, lambda t: np.zeros(50), generator=own)
    assert runs[0] == runs[1] == passed and len(set(passed)) > 3


def test_sampling_from_a_vocabulary_of_one_token_draws_it() -> None:
    """One draw per token (a second draw without replacement from one category cannot be made)."""
    settings = GenerationSettings(max_new_tokens=3, do_sample=True, top_k=0, seed=0)
    one = np.zeros(1)
    tokens = generate_tokens(np.array([0]), settings, lambda ids: np.zeros((len(ids), 1)), lambda t: one)
    assert tokens == [0, 0, 0]

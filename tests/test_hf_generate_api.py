"""SCXModel.generate, scx_ref.sampling and ``scx generate`` as a new user meets them: a
batch's finished rows are padded as HF pads them, a bad prompt is an error even for 0 new tokens, a
temperature that overflows float32 is a project error, a streamer or tokenizer that is not one is a
ConfigError, and greedy/sampled decoding keeps its guarantees (HF's greedy tokens at several prompt
lengths; a seeded sampler untouched by, and not touching, the global random state)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from scx_ref.cli import main  # noqa: E402
from scx_ref.errors import ConfigError, NonFiniteError, SCXWarning, VocabularyError  # noqa: E402
from scx_ref.hf import SCXModel  # noqa: E402
from tests.test_hf import _keys  # noqa: E402
from tests.test_sampling import hf_generate, tiny  # noqa: E402

PROMPT = np.array([[5, 17, 3, 88, 41]])


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny("llama", seed=1)  # float64: SCX's greedy tokens are HF's exactly


def _scx(model: Any) -> SCXModel:
    return SCXModel.from_hf(model, level="paper", keys=_keys(), decoys="gaussian")


def test_finished_rows_without_pad_id_are_padded_with_the_first_eos_as_hf(model: Any) -> None:
    """eos_token_id=[other, e] with no pad id: HF pads a finished row with eos[0] (``other``), not with
    the smallest EOS id. Control: the row that never meets an EOS id is the same in both."""
    scx = _scx(model)
    ids = np.array([[5, 17, 3, 88], [60, 2, 77, 31]])
    full = scx.generate(ids, max_new_tokens=8, eos_token_id=None)
    e = int(full[0, 4])  # row 0's first new token: as an EOS id it finishes row 0 at once
    used = set(full[:, 4:].reshape(-1).tolist())
    assert e not in full[1, 4:].tolist()  # row 1 runs all 8 tokens
    other = max(set(range(97)) - used)  # an EOS id no row makes, above e: min() would pick e
    assert other > e
    eos = [other, e]
    out = scx.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=None)
    with torch.no_grad():
        ref = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=None,
        )
    assert out.tolist() == ref.tolist()
    assert out[0, 5:].tolist() == [other] * 7
    assert out[1].tolist() == full[1].tolist()


def test_zero_new_tokens_still_checks_the_prompt(model: Any) -> None:
    """max_new_tokens=0 (or max_length = the prompt width) with an id outside the vocabulary is a
    VocabularyError, as with any other length, never the bad ids echoed back. Control: a good prompt
    comes back as it is."""
    scx = _scx(model)
    for opts in ({"max_new_tokens": 0}, {"max_length": 2}):
        with pytest.raises(VocabularyError, match="97"):
            scx.generate([[5, 97]], **opts)
        with pytest.raises(VocabularyError):
            scx.generate([[-1, 5]], **opts)
        assert scx.generate([[5, 96]], **opts).tolist() == [[5, 96]]


def test_unsigned_ids_past_int64_are_named_as_given(model: Any) -> None:
    """A uint64 id ≥ 2**63 is a VocabularyError naming that id (not the negative number it wraps to)."""
    scx = _scx(model)
    big = 2**63 + 5
    with pytest.raises(VocabularyError, match=str(big)):
        scx.generate(np.array([[3, big]], dtype=np.uint64), max_new_tokens=1)
    with pytest.raises(VocabularyError, match=str(big)):
        scx.logits(np.array([[big]], dtype=np.uint64))
    # control: small unsigned ids run
    assert scx.generate(np.array([[5, 17]], dtype=np.uint64), max_new_tokens=1).shape == (1, 3)


@pytest.mark.parametrize(
    "options",
    [{"temperature": 1e-40}, {"temperature": 1e-300}, {"repetition_penalty": 1e-320}],
    ids=["temperature-1e-40", "temperature-1e-300", "repetition-penalty-1e-320"],
)
def test_scores_overflowing_float32_are_a_nonfinite_error(model: Any, options: dict[str, Any]) -> None:
    """A temperature (or repetition penalty) so close to 0 that the scores overflow float32 is a
    NonFiniteError naming the cause, never torch.multinomial's RuntimeError. Control: a small temperature
    that does not overflow samples (and picks the argmax, as greedy does)."""
    scx = _scx(model)
    with pytest.raises(NonFiniteError, match="temperature or repetition_penalty"):
        scx.generate(PROMPT, max_new_tokens=3, do_sample=True, seed=0, **options)
    cold = scx.generate(PROMPT, max_new_tokens=3, do_sample=True, seed=0, temperature=1e-6)
    assert cold.tolist() == scx.generate(PROMPT, max_new_tokens=3).tolist()


def test_cli_tiny_temperature_exits_2_with_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1,2", "--max-new-tokens", "3"]
    assert main([*argv, "--do-sample", "--temperature", "1e-300", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeError" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("scx generate: error:") and "temperature" in lines[0]
    assert main([*argv, "--do-sample", "--temperature", "0.5", "--seed", "1"]) == 0  # control
    assert len(capsys.readouterr().out.split()) == 3


def test_a_streamer_without_put_and_end_is_a_config_error(model: Any) -> None:
    """Refused before any session opens (last_view stays None); control: an object with both runs."""
    scx = _scx(model)

    class PutOnly:
        def put(self, value: Any) -> None:
            pass

    for bad in (object(), PutOnly(), "stdout"):
        with pytest.raises(ConfigError, match="put"):
            scx.generate(PROMPT, max_new_tokens=2, streamer=bad)
    assert scx.last_view is None

    class Both(PutOnly):
        ended = False

        def end(self) -> None:
            self.ended = True

    good = Both()
    scx.generate(PROMPT, max_new_tokens=2, streamer=good)
    assert good.ended


def test_stop_strings_with_something_not_a_tokenizer_is_a_config_error(model: Any) -> None:
    scx = _scx(model)
    with pytest.raises(ConfigError, match="tokenizer"):
        scx.generate(PROMPT, max_new_tokens=2, stop_strings="x", tokenizer=object())


def test_greedy_equals_hf_at_several_prompt_and_output_lengths(model: Any) -> None:
    """Coverage (passes before and after the fixes): HF's greedy token ids exactly, prompts of 1 to 20
    tokens, 1 to 17 new ones (float64)."""
    scx = _scx(model)
    rng = np.random.default_rng(3)
    for n, new in [(1, 17), (2, 5), (7, 1), (20, 17)]:
        p = rng.integers(2, 97, size=(1, n))
        assert scx.generate(p, max_new_tokens=new)[0].tolist() == hf_generate(
            model, p, 0, max_new_tokens=new, do_sample=False
        )


def test_seeded_sampling_ignores_and_keeps_the_global_random_state(model: Any) -> None:
    """Coverage: the same seed gives the same tokens whatever torch.manual_seed says, generate leaves
    torch's and numpy's global states as they were, and top_k=1 sampling is greedy decoding."""
    scx = _scx(model)
    with torch.random.fork_rng():  # the test's own global seeds, undone afterwards
        torch.manual_seed(123)
        t0, n0 = torch.get_rng_state().clone(), np.random.get_state()[1].copy()  # noqa: NPY002
        a = scx.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=7)
        scx.generate(PROMPT, max_new_tokens=6, do_sample=True)  # fresh entropy, still not global
        assert torch.equal(t0, torch.get_rng_state())
        assert (n0 == np.random.get_state()[1]).all()  # noqa: NPY002
        torch.manual_seed(999)
        assert torch.equal(a, scx.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=7))
    greedy = scx.generate(PROMPT, max_new_tokens=6)
    assert torch.equal(greedy, scx.generate(PROMPT, max_new_tokens=6, do_sample=True, top_k=1, seed=3))


def test_the_prompt_may_be_named_inputs_as_model_generate_names_it(model: Any) -> None:
    """``scx.generate(inputs=ids)`` (model.generate's keyword) is ``scx.generate(ids)``, never Python's
    TypeError; neither or both is a ConfigError."""
    scx = _scx(model)
    ids = torch.tensor([[5, 17, 3]])
    assert scx.generate(inputs=ids, max_new_tokens=3).tolist() == scx.generate(ids, max_new_tokens=3).tolist()
    with pytest.raises(ConfigError, match="not both"):
        scx.generate(ids, inputs=ids, max_new_tokens=3)
    with pytest.raises(ConfigError, match="input_ids"):
        scx.generate(max_new_tokens=3)


def test_zero_new_tokens_still_shows_the_prompt_and_the_end_to_the_streamer(
    model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The streamer contract (put(prompt), put of each new token, end()) holds for 0 new tokens too, as
    generate_tokens keeps it: `scx generate --max-new-tokens 0` ends its (empty) output line."""
    scx = _scx(model)
    seen: list[Any] = []

    class Recorder:
        def put(self, value: Any) -> None:
            seen.append(np.asarray(value).tolist())

        def end(self) -> None:
            seen.append("end")

    assert scx.generate([[5, 17]], max_new_tokens=0, streamer=Recorder()).tolist() == [[5, 17]]
    assert seen == [[[5, 17]], "end"]
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1,2", "--max-new-tokens", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "\n"


def test_sampling_options_with_greedy_decoding_warn_at_the_line_that_calls_generate(model: Any) -> None:
    """The warning points at the user's call (stacklevel 3: past ``generation_settings`` and ``generate``).
    Deselected for mutation (mutmut's trampoline adds a frame); the level passed on is checked in
    tests/test_sampling_mutants.py."""
    scx = _scx(model)
    with pytest.warns(SCXWarning, match="greedy decoding does not use them") as record:
        scx.generate(PROMPT, max_new_tokens=1, temperature=0.5)
    assert [w.filename for w in record] == [__file__]

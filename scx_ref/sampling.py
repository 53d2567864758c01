"""Generation as production uses it, on the client's logits (the server never sees a logit or a token):
greedy or sampled tokens chosen by transformers' own logits processors and stopping criteria, EOS and
stop strings, and a streamer.

The step is Hugging Face ``generate``'s, operation for operation: the last row's logits copied to float32,
the processors in ``generate``'s order (repetition penalty; then, when sampling, temperature, top-k,
top-p), then ``argmax`` or ``softmax`` + ``torch.multinomial`` — drawn from a ``torch.Generator`` seeded by
``seed`` (never the global random state). So with the same model, seed and settings a single sequence
gets HF ``generate``'s tokens, token for token (tested in float64).

Options not listed in :data:`GENERATE_OPTIONS` are refused by name (:func:`generation_settings`), never
ignored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._checks import check_int, check_real, token_ids
from .errors import ConfigError, DTypeError, NonFiniteError, SCXError, SCXWarning, ShapeError, note_tokens

__all__ = [
    "GENERATE_OPTIONS",
    "SUPPORTED",
    "GenerationSettings",
    "check_streamer",
    "generate_tokens",
    "generation_settings",
    "greedy_tokens",
]

#: What ``SCXModel.generate`` accepts besides ``input_ids`` (the one place generation options are named).
GENERATE_OPTIONS: dict[str, str] = {
    "max_new_tokens": "new tokens per row (an integer >= 0)",
    "max_length": "prompt width + new tokens (instead of max_new_tokens)",
    "attention_mask": "left padding (0s then 1s per row)",
    "eos_token_id": "an id, a list of ids, or None (never stop)",
    "pad_token_id": "the id that pads finished rows",
    "do_sample": "True samples, False (default) decodes greedily",
    "num_beams": "1 only (no beam search)",
    "temperature": "a number > 0 (sampling)",
    "top_k": "an integer >= 0 (sampling; 0 keeps every token)",
    "top_p": "a number in [0, 1] (sampling)",
    "repetition_penalty": "a number > 0",
    "seed": "an integer in [0, 2**64 - 1] seeding the sampler (default: fresh entropy)",
    "stop_strings": "a string or a list of strings (needs tokenizer)",
    "tokenizer": "the model's tokenizer (for stop_strings)",
    "streamer": "an object with put(ids) and end(), as HF's streamers",
}
#: The options only sampling uses (greedy decoding with one of them set warns, as transformers does).
_SAMPLING_ONLY: tuple[str, ...] = ("temperature", "top_k", "top_p", "seed")
#: The option names (:data:`GENERATE_OPTIONS`' keys).
SUPPORTED: tuple[str, ...] = tuple(GENERATE_OPTIONS)

#: transformers' defaults for the sampling options (``GenerationConfig``), used when neither the call
#: nor the model's ``generation_config`` sets one.
_HF_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
#: What a call's explicit None means for a sampling option, as in transformers 5.x: not applied (its
#: neutral value), whatever the model's ``generation_config`` says (``top_k=None``: no top-k filter).
_NOT_APPLIED: dict[str, Any] = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class GenerationSettings:
    """Validated generation options (see :func:`generation_settings`). Built directly, each field is
    checked too (ConfigError, as :func:`generation_settings`'s): ``max_new_tokens`` an int >= 0,
    ``do_sample`` a bool, ``temperature`` and ``repetition_penalty`` finite and > 0, ``top_k`` an int >= 0,
    ``top_p`` in [0, 1], ``seed`` None or in [0, 2**64 - 1], ids ints >= 0, ``stop_strings`` non-empty
    strings — never a raw ValueError from transformers' processors or a TypeError mid-generation."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be True or False, got {self.do_sample!r:.40}")
        fields: dict[str, Any] = {
            "max_new_tokens": check_int(self.max_new_tokens, "max_new_tokens", 0),
            "temperature": check_real(self.temperature, "temperature", 0, lo_open=True),
            "top_k": check_int(self.top_k, "top_k", 0),
            "top_p": check_real(self.top_p, "top_p", 0, 1),
            "repetition_penalty": check_real(self.repetition_penalty, "repetition_penalty", 0, lo_open=True),
            "seed": None if self.seed is None else check_int(self.seed, "seed", 0, MAX_SEED),
            "pad_token_id": None
            if self.pad_token_id is None
            else check_int(self.pad_token_id, "pad_token_id", 0),
        }
        for name in ("eos_token_ids", "stop_strings"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ConfigError(f"{name} must be a tuple, got {type(getattr(self, name)).__name__}")
        fields["eos_token_ids"] = tuple(check_int(e, "eos_token_id", 0) for e in self.eos_token_ids)
        if not all(isinstance(t, str) and t for t in self.stop_strings):
            raise ConfigError("stop_strings must be non-empty strings")
        fields["stop_strings"] = tuple(self.stop_strings)
        for name, value in fields.items():  # Python numbers (a numpy scalar or a list would pass through)
            object.__setattr__(self, name, value)

    def processors(self) -> Any:
        """transformers' ``LogitsProcessorList`` for these settings, in ``generate``'s order."""
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k != 0:
                out.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return out

    def generator(self) -> Any:
        """A ``torch.Generator`` seeded with ``seed`` (from the OS's entropy when None)."""
        import torch

        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


#: The largest sampling seed: what a ``torch.Generator`` takes (``manual_seed`` reads an unsigned 64-bit
#: integer), and what ``scx generate --seed`` takes.
MAX_SEED = 2**64 - 1


def generation_settings(defaults: Any, options: Mapping[str, Any], width: int = 0) -> GenerationSettings:
    """Validated settings from ``options`` (the call's keyword arguments; None counts as absent for
    ``max_new_tokens``/``max_length``) over ``defaults`` (a model's ``generation_config``, or None) over
    transformers' defaults; ``width`` is the prompt width (for ``max_length``).

    ConfigError naming every option not in :data:`GENERATE_OPTIONS` (e.g. ``min_p``) with what is
    supported, and for a value out of range or of the wrong type: exactly one of ``max_new_tokens`` and
    ``max_length``, ``num_beams`` 1 only, numbers (Python or numpy) finite, ``seed`` in [0, 2**64 - 1]
    (what a ``torch.Generator`` takes), ``stop_strings`` a string or a list of strings.
    ``eos_token_id=None`` never stops at EOS; when absent, the model's EOS is used. An explicit None for
    ``temperature``, ``top_k``, ``top_p`` or ``repetition_penalty`` means not applied, as in transformers
    (:data:`_NOT_APPLIED`), not the model's value. Decoding greedily, the
    model's ``temperature``, ``top_k`` and ``top_p`` are not read (transformers ignores them too: a
    ``generation_config`` with ``temperature=0.0`` still decodes greedily); the call's own are checked.
    """
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"generation options must be a mapping of names to values, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - set(GENERATE_OPTIONS), key=repr)  # keys of any types
    if unknown:
        supported = "; ".join(f"{k}: {v}" for k, v in GENERATE_OPTIONS.items())
        raise ConfigError(
            f"unsupported generation option(s) {', '.join(map(repr, unknown))}. Supported: {supported}"
        )

    do_sample = options.get("do_sample", getattr(defaults, "do_sample", False) or False)
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")

    def pick(name: str) -> Any:
        if name in options:
            given = options[name]
            return _NOT_APPLIED[name] if given is None and name in _NOT_APPLIED else given
        v = getattr(defaults, name, None) if defaults is not None else None
        # greedy decoding never reads the model's sampling values (a config's temperature 0.0 is not refused)
        unused = not do_sample and name in _SAMPLING_ONLY
        return _HF_DEFAULTS.get(name) if v is None or unused else v

    beams = options.get("num_beams", 1)
    if isinstance(beams, bool) or not isinstance(beams, (int, float, np.integer, np.floating)) or beams != 1:
        raise ConfigError(f"num_beams must be 1 (SCX has no beam search), got {beams!r}")
    has_new = options.get("max_new_tokens") is not None
    has_len = options.get("max_length") is not None
    if has_new == has_len:
        raise ConfigError("give exactly one of max_new_tokens and max_length")
    if has_new:
        n_new = options["max_new_tokens"]  # checked by GenerationSettings
    else:
        n_new = check_int(options["max_length"], "max_length", width) - width
    has_eos = "eos_token_id" in options
    eos_raw = options["eos_token_id"] if has_eos else getattr(defaults, "eos_token_id", None)
    eos = [eos_raw] if isinstance(eos_raw, (int, np.integer)) and not isinstance(eos_raw, bool) else eos_raw
    if isinstance(eos, bool) or not isinstance(eos, (list, tuple, type(None))):
        raise ConfigError(f"eos_token_id must be an id, a list of ids or None, got {eos_raw!r}")
    stops_raw = options.get("stop_strings")
    if stops_raw is None or (isinstance(stops_raw, (str, list, tuple)) and not stops_raw):
        stops: tuple[Any, ...] = ()
    elif isinstance(stops_raw, str):
        stops = (stops_raw,)
    elif isinstance(stops_raw, (list, tuple)):
        stops = tuple(stops_raw)
    else:
        raise ConfigError(f"stop_strings must be a string or a list of strings, got {stops_raw!r}")
    pad = options["pad_token_id"] if "pad_token_id" in options else getattr(defaults, "pad_token_id", None)
    seed = options.get("seed")
    top_k = pick("top_k")
    settings = GenerationSettings(  # which checks each value (one check per field, its own)
        max_new_tokens=n_new,
        do_sample=do_sample,
        temperature=pick("temperature"),
        top_k=0 if top_k is None else top_k,
        top_p=pick("top_p"),
        repetition_penalty=pick("repetition_penalty"),
        seed=seed,
        eos_token_ids=tuple(eos or ()),
        pad_token_id=pad,
        stop_strings=stops,
    )
    unused = [k for k in _SAMPLING_ONLY if options.get(k) is not None]
    if unused and not do_sample:  # as transformers does: greedy decoding ignores them, said out loud
        warnings.warn(
            f"{', '.join(unused)} given with do_sample=False: greedy decoding does not use them "
            "(pass do_sample=True to sample)",
            SCXWarning,
            stacklevel=3,
        )
    return settings


def greedy_tokens(
    first: Callable[[], int],
    following: Callable[[int], int],
    n_new: int,
    finish: Callable[[], object] | None = None,
) -> list[int]:
    """Greedy decoding's loop, the one every plain and SCX ``generate`` runs: ``first()`` is the argmax
    token after the prompt, ``following(t)`` the argmax after token t; returns ``n_new`` (≥ 0, checked by
    the caller) tokens, ``following`` called n_new − 1 times, then ``finish()`` (a session's close).
    ``first`` runs even when n_new is 0 (a bad prompt is still an error). An SCXError raised after the
    loop began (in ``first``, ``following`` or ``finish``) is raised again with the tokens made so far in
    its ``tokens``; any other exception (a custom transport's) keeps its class and lists them in a note
    (:func:`~scx_ref.errors.note_tokens`)."""
    out: list[int] = []
    try:
        nxt = first()
        for step in range(n_new):
            out.append(nxt)
            if step + 1 < n_new:
                nxt = following(nxt)
        if finish is not None:
            finish()
    except SCXError as exc:
        exc.tokens = list(out)
        raise
    except Exception as exc:  # not ours (e.g. a custom transport's): its class kept, the tokens noted
        note_tokens(exc, out)
        raise
    return out


def check_streamer(streamer: Any) -> None:
    """ConfigError unless ``streamer`` is None or has callable ``put`` and ``end`` (as HF's streamers)."""
    if streamer is not None and not (
        callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))
    ):
        raise ConfigError(
            f"streamer must have put(ids) and end() methods (as transformers' TextStreamer), "
            f"got {type(streamer).__name__}"
        )


def generate_tokens(
    prompt: npt.NDArray[np.int64],
    settings: GenerationSettings,
    prefill: Callable[[npt.NDArray[np.int64]], npt.NDArray[Any]],
    decode: Callable[[int], npt.NDArray[Any]],
    *,
    generator: Any = None,
    tokenizer: Any = None,
    streamer: Any = None,
) -> list[int]:
    """Up to ``settings.max_new_tokens`` new tokens after ``prompt``: ``prefill(ids)`` gives the prompt's
    logits (n × V), ``decode(token)`` the next logits (V,) — an SCX client's, for instance.

    Greedy ties go to the lowest id (``torch.argmax``'s first maximum, as HF's): scores are compared after
    the float32 copy, so a float64 row picks what its float32 rounding picks. Sampling draws from
    softmax(processed scores): softmax(logits / T) restricted to the top-k and then the top-p tokens (HF's
    warpers: a top-k tie at the k-th score keeps every tied token), renormalised. The caller's logits are
    never written to.

    Stops after an EOS token (kept) or when the text ends a stop string (transformers'
    ``StopStringCriteria``; needs ``tokenizer``). ``streamer`` gets ``put(prompt)``, ``put`` of each new
    token and ``end()``, as HF's. An SCXError after k ≥ 0 tokens is raised again, its class kept, with
    those k tokens in its ``tokens`` (the streamer has already shown them). Before anything runs:
    ConfigError unless ``settings`` is a :class:`GenerationSettings`, the prompt's check
    (:func:`~scx_ref._checks.token_ids`: VocabularyError, ProtocolError when empty), ConfigError for a
    ``generator`` that is not None or a CPU ``torch.Generator`` (sampling draws from it; None: a fresh one
    from ``settings.generator()``), a streamer without ``put``/``end`` (:func:`check_streamer`) or a
    ``tokenizer`` StopStringCriteria cannot use. A logits row that is not one-dimensional and non-empty (or
    prefill's logits that have no last row) is a ShapeError, one that is not floating-point a DTypeError
    (any layout, byte order or float width is taken: it is copied to float32 as HF does); one that is not
    finite, greedy scores whose maximum is not (finite logits past float32's range), or sampling
    probabilities that are not (scores overflowing float32, e.g. under a temperature near 0), is a
    NonFiniteError (never a token)."""
    import torch

    if not isinstance(settings, GenerationSettings):
        raise ConfigError(f"settings must be GenerationSettings, got {type(settings).__name__}")
    prompt = token_ids(prompt)
    if generator is not None and not (
        isinstance(generator, torch.Generator) and generator.device.type == "cpu"
    ):  # torch.multinomial raised a TypeError (or a RuntimeError) mid-generation, after the prefill
        where = f" on {generator.device}" if isinstance(generator, torch.Generator) else ""
        raise ConfigError(
            f"generator must be None or a CPU torch.Generator (the sampler's), got "
            f"{type(generator).__name__}{where}"
        )
    check_streamer(streamer)
    processors = settings.processors()
    stopping = None
    if settings.stop_strings:
        if tokenizer is None:
            raise ConfigError("stop_strings needs the model's tokenizer (tokenizer=...)")
        from transformers import StopStringCriteria

        try:
            stopping = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(settings.stop_strings))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"tokenizer must be the model's transformers tokenizer (for stop_strings), got "
                f"{type(tokenizer).__name__}: {exc}"
            ) from exc
    gen = generator if generator is not None else settings.generator()
    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None, :]
    if streamer is not None:
        streamer.put(ids.cpu())
    new: list[int] = []
    try:
        if settings.max_new_tokens:
            first = prefill(np.asarray(prompt, dtype=np.int64))
            try:
                logits = first[-1]  # the last prompt row's
            except (IndexError, TypeError, KeyError) as exc:  # a 0-d array, a number, None: not n × V
                raise ShapeError(
                    f"the prompt's logits must be n × V, got {type(first).__name__} of shape "
                    f"{getattr(first, 'shape', None)}"
                ) from exc
            while True:
                try:
                    row = np.asarray(logits)
                except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a ragged list, a bfloat16 tensor
                    raise DTypeError(
                        f"the logits after {len(new)} new token(s) are not an array of real numbers: {exc}"
                    ) from exc
                if row.ndim != 1 or row.size == 0:  # torch raised an IndexError or a RuntimeError
                    raise ShapeError(
                        f"the logits after {len(new)} new token(s) must be one non-empty row (V,), got "
                        f"shape {row.shape}"
                    )
                if not np.issubdtype(row.dtype, np.floating):  # integers are no logits ("not finite" misled)
                    raise DTypeError(
                        f"the logits after {len(new)} new token(s) must be floating-point, got dtype "
                        f"{row.dtype}"
                    )
                if not np.isfinite(row).all():
                    raise NonFiniteError(f"the logits after {len(new)} new token(s) are not all finite")
                # HF's float32 copy, made by numpy (the same rounding): torch.from_numpy refused a row with a
                # negative stride, in another byte order or of long doubles (a raw ValueError or TypeError).
                # Always a copy (as HF's ``.to(copy=True)``): a float32 row was shared with the caller (a
                # read-only one made torch warn of undefined behaviour)
                with np.errstate(over="ignore"):  # past float32's range: ±inf, refused below
                    row32 = np.array(row, dtype=np.float32, order="C", copy=True)
                scores = processors(ids, torch.from_numpy(row32)[None, :])
                if not settings.do_sample and not bool(torch.isfinite(scores.max())):
                    # finite logits whose largest is past float32's range (or a repetition penalty overflowing
                    # it): argmax of several +inf is the first of them, not the largest logit — never a token
                    raise NonFiniteError(
                        f"the logits after {len(new)} new token(s) overflow float32 (the scores greedy "
                        "decoding compares; repetition_penalty too close to 0?)"
                    )
                if settings.do_sample:
                    probs = torch.nn.functional.softmax(scores, dim=-1)
                    if not bool(torch.isfinite(probs).all()):  # e.g. logits / a tiny temperature overflow
                        raise NonFiniteError(
                            f"the sampling probabilities after {len(new)} new token(s) are not finite: the "
                            "scores overflow float32 (temperature or repetition_penalty too close to 0?)"
                        )
                    tok = int(torch.multinomial(probs, num_samples=1, generator=gen)[0, 0])
                else:
                    tok = int(torch.argmax(scores, dim=-1)[0])
                new.append(tok)
                ids = torch.cat([ids, torch.tensor([[tok]])], dim=-1)
                if streamer is not None:
                    streamer.put(torch.tensor([tok]))
                if (
                    len(new) >= settings.max_new_tokens
                    or tok in settings.eos_token_ids
                    or (stopping is not None and bool(stopping(ids, scores)[0]))
                ):
                    break
                logits = decode(tok)
    except SCXError as exc:
        exc.tokens = list(new)
        raise
    except Exception as exc:  # not ours (e.g. a custom transport's): its class kept, the tokens in a note
        note_tokens(exc, new)
        raise
    finally:
        if streamer is not None:
            streamer.end()
    return new

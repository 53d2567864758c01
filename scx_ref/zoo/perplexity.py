"""Perplexity over non-overlapping windows, plaintext against SCX.

The first ``tokens`` corpus tokens are cut into consecutive windows of ``window`` tokens (the last one
may be shorter); each window is one independent forward pass (one SCX request) and predicts its tokens
2..len from the preceding ones. PPL = exp(mean NLL) over all predicted tokens; the NLL is computed in
float64 from each side's logits (log-softmax in float64), so the two sides differ only by their logits.

:func:`ppl_run` is the check of ``scx ppl`` and ``scx verify`` (and of the full-model runs in
``models/``): a registered model on the corpus, with the pass criterion of DESIGN §6.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..config import ModelConfig
from ..errors import ConfigError, NonFiniteError, PrecisionWarning, ShapeError, VocabularyError
from ..protocol import Level, SCXConfig
from ..protocol.plan import ReleasePlan
from . import load_model, max_positions
from .corpus import corpus_text, corpus_tokens
from .engines import LogitsFn, check_device, plain_logits, plain_model, pool_unigram, scx_config, scx_logits

__all__ = [
    "PPL_CRITERION",
    "PPLComparison",
    "check_corpus_tokens",
    "compare_ppl",
    "ppl_run",
    "precision_warned",
    "progress_bar",
    "token_nll",
    "windows",
]

# |ΔPPL| / PPL bound per dtype (DESIGN §6)
PPL_CRITERION = {"float32": 1e-5, "float64": 1e-9}

IdArray = npt.NDArray[np.int64]


def windows(n_tokens: int, window: int) -> list[slice]:
    """Consecutive non-overlapping slices of ``window`` tokens covering 0..n_tokens (last one ≥ 2 tokens;
    a 1-token tail predicts nothing and is dropped). ConfigError unless both are integers >= 2."""
    window, n_tokens = check_int(window, "window", 2), check_int(n_tokens, "the number of tokens", 2)
    out = [slice(s, min(s + window, n_tokens)) for s in range(0, n_tokens, window)]
    return [s for s in out if s.stop - s.start >= 2]


def check_corpus_tokens(tokens: int) -> int:
    """``tokens`` as an int, a count of corpus tokens a run may ask for: ConfigError unless an integer >= 2
    and at most the corpus's UTF-8 bytes (a tokenizer makes at most one token per byte) — checked before
    any window is listed or model loaded, so a huge count is refused rather than exhausting memory. A count
    within the bound may still exceed the tokens a given tokenizer makes (:func:`corpus_tokens` says so)."""
    tokens = check_int(tokens, "the number of tokens", 2)
    most = len(corpus_text().encode("utf-8"))
    if tokens > most:
        raise ConfigError(f"the number of tokens {tokens} is more than the corpus holds ({most} bytes)")
    return tokens


def token_nll(logits: npt.NDArray[Any], ids: IdArray) -> npt.NDArray[np.float64]:
    """−log p(ids[t+1] | ids[..t]) for t = 0..n−2, from rows × V logits, in float64.

    ShapeError unless ``logits`` is n × V for the n ``ids``; VocabularyError for an id that is not an integer
    in [0, V) (a negative one would silently index from the end); NonFiniteError for non-finite logits."""
    logits = np.asarray(logits)
    ids = np.asarray(ids)
    if ids.ndim != 1 or logits.ndim != 2 or logits.shape[0] != ids.shape[0] or logits.shape[1] == 0:
        raise ShapeError(f"need n × V logits for n ids, got logits {logits.shape} for ids {ids.shape}")
    if ids.size and (
        not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= logits.shape[1]
    ):
        raise VocabularyError(f"ids must be integers in [0, {logits.shape[1]})")
    if not np.issubdtype(logits.dtype, np.floating) or not np.isfinite(logits).all():
        raise NonFiniteError("logits must be finite floating-point numbers")
    z = np.asarray(logits[:-1], dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    target = z[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return np.asarray(lse - target, dtype=np.float64)


@dataclass
class PPLComparison:
    """Plaintext vs SCX perplexity over the same windows (``window``: the longest one run, at most
    ``tokens``)."""

    tokens: int
    window: int
    predicted: int
    ppl_plain: float
    ppl_scx: float
    delta_ppl: float
    rel_delta_ppl: float
    max_abs_dlogit: float
    max_abs_logit: float
    max_abs_dnll: float
    seconds_plain: float
    seconds_scx: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (the keys of a ``ppl`` results record)."""
        return asdict(self)


def compare_ppl(
    ids: IdArray,
    window: int,
    plain: LogitsFn,
    scx: LogitsFn,
    progress: Callable[[Iterable[slice]], Iterable[slice]] | None = None,
) -> PPLComparison:
    """Run both sides on every window and compare.

    Reports ΔPPL = PPL_scx − PPL_plain, its relative size |ΔPPL|/PPL_plain, the largest |Δlogit| over every
    row and vocabulary entry, and the largest per-token |ΔNLL|. VocabularyError for ``ids`` that are not a
    1-D integer array; ConfigError for a side whose logits are not rows × V (V >= 1) of the window (or differ
    in shape from the other side's); NonFiniteError, naming the side and window, for non-finite logits. A
    PPL past the float64 range (finite logits whose mean NLL exceeds ~709) is inf, and so are ΔPPL and
    |ΔPPL|/PPL then (the relative change read as |e^(NLL_scx − NLL_plain) − 1|).
    """
    raw = np.asarray(ids)
    if raw.ndim != 1 or (raw.size and not np.issubdtype(raw.dtype, np.integer)):
        raise VocabularyError(f"ids must be a 1-D integer array, got {raw.dtype} of shape {raw.shape}")
    ids = raw.astype(np.int64)
    spans = windows(len(ids), window)
    nll_p: list[npt.NDArray[np.float64]] = []
    nll_s: list[npt.NDArray[np.float64]] = []
    max_dlogit = max_logit = 0.0
    t_plain = t_scx = 0.0
    for span in progress(spans) if progress else spans:
        w = ids[span]
        t0 = time.perf_counter()
        lp = np.asarray(plain(w))
        t1 = time.perf_counter()
        ls = np.asarray(scx(w))
        t2 = time.perf_counter()
        t_plain += t1 - t0
        t_scx += t2 - t1
        if lp.shape != ls.shape:
            raise ConfigError(f"logit shapes differ: plaintext {lp.shape}, SCX {ls.shape}")
        if lp.ndim != 2 or lp.shape[0] != len(w) or lp.shape[1] == 0:  # V = 0: numpy's raw ValueError below
            raise ConfigError(f"logits must be {len(w)} rows × V for a window of {len(w)}, got {lp.shape}")
        for side, arr in (("plaintext", lp), ("SCX", ls)):
            if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise NonFiniteError(
                    f"{side} logits of tokens {span.start}..{span.stop - 1} are not all finite"
                )
        diff = np.asarray(ls, np.float64) - np.asarray(lp, np.float64)
        max_dlogit = max(max_dlogit, float(np.max(np.abs(diff))))
        max_logit = max(max_logit, float(np.max(np.abs(lp))))
        nll_p.append(token_nll(lp, w))
        nll_s.append(token_nll(ls, w))
    p, s = np.concatenate(nll_p), np.concatenate(nll_s)
    mean_p, mean_s = float(p.mean()), float(s.mean())
    ppl_p, ppl_s = _exp(mean_p), _exp(mean_s)
    if math.isfinite(ppl_p) and math.isfinite(ppl_s):
        delta, rel = ppl_s - ppl_p, abs(ppl_s - ppl_p) / ppl_p
    else:  # a PPL past float64 (mean NLL > ~709: a sweep at a huge β): inf, never an OverflowError
        rel = abs(_exp(mean_s - mean_p) - 1.0)
        delta = ppl_s - ppl_p if math.isfinite(ppl_p) else math.copysign(math.inf, mean_s - mean_p)
        delta = 0.0 if mean_s == mean_p else delta
    return PPLComparison(
        tokens=len(ids),
        window=min(window, len(ids)),  # the longest window run: ``window`` or, fewer, every token
        predicted=len(p),
        ppl_plain=ppl_p,
        ppl_scx=ppl_s,
        delta_ppl=delta,
        rel_delta_ppl=rel,
        max_abs_dlogit=max_dlogit,
        max_abs_logit=max_logit,
        max_abs_dnll=float(np.max(np.abs(s - p))),
        seconds_plain=t_plain,
        seconds_scx=t_scx,
    )


def _exp(x: float) -> float:
    """e^x, inf where it passes the float64 range (math.exp raises OverflowError there)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def progress_bar(desc: str, enabled: bool) -> Callable[[Iterable[Any]], Iterable[Any]] | None:
    """A tqdm wrapper over windows (on stderr) when ``enabled``, else None (no progress output)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(list(it), desc=desc, unit="window", file=sys.stderr)


@contextmanager
def precision_warned(cfg: SCXConfig, dtype: str, model: ModelConfig) -> Iterator[str | None]:
    """Issue, on entry, the :class:`~scx_ref.errors.PrecisionWarning` every SCX client of a run of ``cfg``
    on an engine of ``dtype`` (:data:`~scx_ref.zoo.engines.ENGINE_DTYPES`) and ``model`` would issue —
    :meth:`SCXConfig.warn_precision` with the β of each message the client's
    :class:`~scx_ref.protocol.plan.ReleasePlan` blinds — and keep that same warning quiet inside the block,
    yielding its message (None: no warning). So it is printed once, on its own line, before any progress
    bar starts: each client is built inside the bar's loop, where the warning was printed into the bar's
    line. Other warnings are untouched. It changes the process's warning filters while the block runs
    (:class:`warnings.catch_warnings`): a command's, not a library call's, tool."""
    plan = ReleasePlan.of(cfg, model)
    betas = [r.beta for r in (*plan.prefill, *plan.generation)]
    with warnings.catch_warnings():
        message = cfg.warn_precision(dtype, betas, stacklevel=3)  # the ``with`` line of the caller
        if message is not None:
            warnings.filterwarnings("ignore", message=re.escape(message), category=PrecisionWarning)
        yield message


def ppl_run(
    model: str,
    dtype: str = "float32",
    level: Level = "permute",
    beta: float = 5.0,
    tokens: int = 4096,
    window: int = 1024,
    progress: bool = False,
    server: str | None = None,
    config: SCXConfig | str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Plaintext vs SCX perplexity record of a registered model on the first ``tokens`` corpus tokens;
    ``pass`` is |ΔPPL|/PPL ≤ PPL_CRITERION[dtype]. SCX runs on the ``scx serve`` at ``server`` if given.
    ``config``: a whole SCX configuration, or the name of a preset of :mod:`scx_ref.protocol.presets`,
    instead of ``level`` and ``beta``. ``device``: the torch device both float32 sides run on
    (:mod:`scx_ref.zoo.engines`; ConfigError for float64 off the CPU). ConfigError, before the model is
    loaded, for an unknown model, a ``tokens`` or ``window`` that is not an integer >= 2, a ``tokens``
    past the corpus's UTF-8 bytes (:func:`check_corpus_tokens`), a window past the model's positions, a
    ``config`` that is neither an SCXConfig, a preset name nor None, or (without ``config``) a ``level``
    or ``beta`` SCXConfig refuses. The configuration's
    PrecisionWarning, if any, is issued once, before the progress bar (:func:`precision_warned`)."""
    check_device(dtype, device)
    window, tokens = check_int(window, "window", 2), check_corpus_tokens(tokens)
    positions = max_positions(model)  # the name checked too: nothing is downloaded for a bad call
    if window > positions:
        raise ConfigError(f"window {window} exceeds the {positions} positions of model {model!r}")
    if config is not None and not isinstance(config, (str, SCXConfig)):
        raise ConfigError(f"config must be an SCXConfig or a preset name, got {type(config).__name__}")
    max_length = min(positions, max(window, 16))  # the model's max_positions, known before it loads
    config_name = config if isinstance(config, str) else None
    if isinstance(config, str):
        from ..protocol.presets import preset

        named = preset(config)  # an unknown name refused before the model loads (its blocks need it)
    elif config is None:
        cfg = scx_config(level, beta, max_length=max_length)  # a bad level or β refused before it too
    else:
        cfg = replace(config, max_length=max_length)
    hf, tok, w = load_model(model, dtype)
    if isinstance(config, str):
        config = named.config(w.config.n_layers)
        cfg = replace(config, max_length=max_length)
    if config is not None:
        level, beta = cfg.level, cfg.beta
    ids = corpus_tokens(tokens, tok, w.config.vocab_size)
    with (
        precision_warned(cfg, dtype, w.config),  # said once, before the progress bar starts
        scx_logits(
            w, dtype, cfg, device, server=server, unigram=pool_unigram(cfg, tok, w.config.vocab_size)
        ) as scx,
    ):
        res = compare_ppl(
            ids,
            window,
            plain_logits(plain_model(hf, device), w, dtype),
            scx,
            progress_bar(f"{model} {dtype} {level}", progress),
        )
    out: dict[str, Any] = {
        "kind": "ppl",
        "model": model,
        "dtype": dtype,
        "device": device,
        "level": level,
        "beta": beta,
    }
    if config is not None:
        out["config"] = cfg.to_dict()
        out["preset"] = config_name
    out.update(res.to_dict())
    out["criterion_rel_delta_ppl"] = PPL_CRITERION[dtype]
    out["pass"] = bool(res.rel_delta_ppl <= PPL_CRITERION[dtype])
    return out

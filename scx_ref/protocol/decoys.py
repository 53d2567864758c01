"""Decoy policies (DESIGN §5.1, T2): rows appended to a permuted stage so the server cannot tell
how many rows are real, or which.

* :class:`CalibrationPool` (default) draws real-looking rows: hidden states of *public* text at the
  same block and stage (block 1: embeddings of public tokens). Such rows pass the structural checks an
  attacker can run (rms(x̂/γ) = 1 after the norm; vocabulary-table membership in block 1). The client's
  default text is a pseudo-text its key schedule picks (:func:`secret_calibration_tokens`; uniform over the
  vocabulary, or drawn from a public unigram such as :func:`unigram_counts`): from a text the server
  knows it would rebuild the pool and find the decoys in it.
* :class:`GaussianDecoys` draws a Gaussian matched to the real rows' per-coordinate moments — for
  comparison: the invariant checks above flag its rows at once.

Which pool rows (or Gaussian draws) are used is decided by the key stream passed in, never by global
random state.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._checks import check_int, check_real
from .._checks import token_ids as checked_ids
from ..backends.base import Backend
from ..errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from ..forward import PlainRunner
from ..keys import KeySchedule, KeyStream
from ..stages import Stage

__all__ = [
    "CalibrationPool",
    "DecoyPolicy",
    "GaussianDecoys",
    "configured_unigram",
    "default_public_tokens",
    "secret_calibration_tokens",
    "unigram_counts",
    "unigram_weights",
]

Array = npt.NDArray[Any]


class DecoyPolicy(Protocol):
    """Draws ``count`` decoy rows for (stage, layer); ``real`` holds the real rows (numpy) when
    ``needs_real`` is true, else an empty placeholder (so the client skips a device→host copy)."""

    needs_real: bool

    def draw(self, stage: Stage, layer: int, count: int, real: Array, stream: KeyStream) -> Array:
        """``count`` decoy rows (count × width) for ``stage`` of ``layer``, their choice read from ``stream``
        (the request's key stream for that stage) only."""
        ...


def default_public_tokens(vocab_size: int, length: int = 256) -> npt.NDArray[np.int64]:
    """A fixed, public pseudo-text (seed 0): a shared calibration text for tests and tools. Not the client's
    default (:func:`secret_calibration_tokens`): a server holding the weights rebuilds a pool made from it
    and finds every decoy in it verbatim. ConfigError unless ``vocab_size`` is an integer >= 1 and
    ``length`` one >= 0 (Python or numpy, not bool)."""
    bound = check_int(vocab_size, "vocab_size", 1)
    size = check_int(length, "length", 0)
    return np.random.default_rng(0).integers(0, bound, size=size, dtype=np.int64)


def secret_calibration_tokens(
    keys: KeySchedule,
    vocab_size: int,
    length: int = 256,
    unigram: npt.ArrayLike | None = None,
    epoch: int = 0,
) -> npt.NDArray[np.int64]:
    """The client's default calibration text: ``length`` tokens drawn by the key schedule (label
    ``("decoy-pool", epoch)`` under ``keys``' own nonce — the client's first one: every client its own
    texts, one per ``epoch`` of its pool, :meth:`CalibrationPool.secret`) — uniformly from the vocabulary,
    or, given ``unigram``, from that public
    unigram distribution (DESIGN §5.1: "block 1: embeddings of tokens drawn from a public unigram
    distribution"). Its hidden states look like any public pseudo-text's, but which text it is depends on
    the master secret: a pool made from a fixed public text (:func:`default_public_tokens`) the server can
    rebuild from the weights, and it then found every decoy verbatim (480 of 480 past block 1's QKV stage,
    tiny model, level permute: stop 61). A public unigram keeps that property (the distribution is public,
    the draws are not); the uniform draw is mostly rare tokens on a real vocabulary, which a frequency
    prior tells from real prompt tokens where block 1 is not noised
    (:func:`~scx_ref.attacks.decoy_detect.frequency_prior`).

    ``unigram``: a 1-D array of ``vocab_size`` non-negative weights with a positive sum (e.g.
    :func:`unigram_counts` of a public text); token t is drawn with probability w_t / Σw, exactly: each
    draw is a uniform integer u in [0, Σw) from the key stream (unbiased rejection sampling,
    :meth:`~scx_ref.keys.KeyStream.randbelow`), mapped to the token whose cumulative-count interval holds
    it. Integer weights are used as given (Σw < 2⁶³ needed); floating weights are first made integer
    counts by IEEE-754 operations only (w / max w, a correctly rounded ``math.fsum`` total, × 2⁵³ / total,
    rounded up), so the same weights give the same text on every platform, every positive weight stays
    drawable, and each probability is w_t / Σw to within about (V + 1)·2⁻⁵³. ``unigram=None`` is the
    uniform draw (the same text as before the argument existed).

    ConfigError unless ``vocab_size`` is an integer >= 1, ``length`` one >= 1 and ``epoch`` one >= 0
    (Python or numpy, not bool). For ``unigram``: DTypeError unless it holds real numbers (integer or
    floating, not bool), ShapeError unless it is 1-D of length ``vocab_size``, NonFiniteError for NaN or
    ±Inf, ConfigError for a negative weight, a zero sum, or integer weights whose sum could reach 2⁶³."""
    bound = check_int(vocab_size, "vocab_size", 1)
    size = check_int(length, "length", 1)
    label = ("decoy-pool", check_int(epoch, "epoch", 0))
    cumulative = None if unigram is None else np.cumsum(unigram_weights(unigram, bound))
    stream = keys.stream(label)
    if cumulative is None:
        return stream.randbelow(np.full(size, bound, np.int64))
    draws = stream.randbelow(np.full(size, cumulative[-1], np.int64))
    # token t holds [cumulative[t] − w_t, cumulative[t]): the number of cumulative counts ≤ u
    return np.searchsorted(cumulative, draws, side="right").astype(np.int64)


def unigram_counts(
    token_ids: npt.ArrayLike, vocab_size: int, smoothing: float | None = None
) -> npt.NDArray[np.int64]:
    """Smoothed counts of a public text's ids: c_t = k·#{i : ids_i = t} + 1 for every t in the vocabulary
    (int64, length ``vocab_size``): a ``unigram`` for :func:`secret_calibration_tokens`. With
    ``smoothing=None``, k = 1 (add-one: the probabilities c_t / Σc are the attacker's own prior of the same
    text, :class:`~scx_ref.attacks.stats.FrequencyPrior`); else k is the least integer ≥ 1 with
    V / (k·N + V) ≤ ``smoothing``, the share of probability the +1's hold for an N-token text.

    Every token keeps a positive weight on purpose: the unigram is public, so a token of weight 0 could
    never be a decoy, and a row holding one would be known to be real — its token learned with certainty,
    and with it a lower bound on how many rows are real — which the uniform draw never allowed. The cost
    is the smoothing mass V / (k·N + V) spread over the vocabulary: decoys drawn from it are mostly rare
    tokens a frequency prior sets apart (SmolLM2, 113 107 tokens of ``pydoc_data.topics`` over V = 49 152:
    add-one leaves 30 %; README, "Privacy, measured"), which ``smoothing`` bounds. An empty text gives all
    ones (the uniform draw's distribution). ConfigError unless ``vocab_size`` is an integer >= 1, or for a
    ``smoothing`` that is not a real number in (0, 1], that an empty text cannot meet (V / V = 1 > it) or
    that scales the counts past what the draw takes (Σc < 2⁶³); VocabularyError unless ``token_ids`` is a
    1-D integer array of ids in [0, vocab_size)."""
    bound = check_int(vocab_size, "vocab_size", 1)
    ids = checked_ids(token_ids, bound, allow_empty=True)
    k, scaling = 1, "add-one counting"  # ``scaling`` names k's origin in the overflow message below
    if smoothing is not None:
        mass = check_real(smoothing, "smoothing", 0.0, 1.0, lo_open=True)
        scaling = f"smoothing {mass}"
        if len(ids) == 0 and mass < 1.0:
            raise ConfigError(f"an empty text leaves all its mass to smoothing, more than {mass}")
        # the least k with V ≤ mass·(k·N + V), in exact rational arithmetic
        need = Fraction(bound) * (1 - Fraction(mass)) / (Fraction(mass) * max(len(ids), 1))
        k = max(1, math.ceil(need))
    counts = np.bincount(ids, minlength=bound).astype(np.int64)
    if k * int(counts.max()) + 1 > _INT64_MAX // bound:  # the draw needs Σc < 2⁶³ (unigram_weights)
        raise ConfigError(
            f"{scaling} scales the counts by a {len(str(k))}-digit factor: too large for a text of "
            f"{len(ids)} ids over {bound} tokens (the draw needs the counts' sum below 2**63)"
        )
    return k * counts + 1


def configured_unigram(
    unigram: npt.ArrayLike | None, vocab_size: int, decoys: str
) -> npt.NDArray[np.int64] | None:
    """``unigram`` checked where a configuration's decoy policy is ``decoys`` (``SCXConfig.decoys``), before
    anything is built: None stays None; ConfigError unless the policy draws a calibration text (Gaussian
    decoys draw none, so a unigram would mean nothing); else :func:`unigram_weights`."""
    if unigram is None:
        return None
    if decoys != "calibration":
        raise ConfigError("unigram weighs the calibration text's draw: Gaussian decoys draw none")
    return unigram_weights(unigram, vocab_size)


def unigram_weights(unigram: npt.ArrayLike, vocab_size: int) -> npt.NDArray[np.int64]:
    """``unigram`` checked (with the errors :func:`secret_calibration_tokens` lists) and made the integer
    counts (int64) it draws by: the same text for ``unigram`` and for ``unigram_weights(unigram, V)``."""
    try:
        arr = np.asarray(unigram)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DTypeError(f"unigram must be an array of real numbers numpy can read: {exc}") from None
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DTypeError(f"unigram must hold real numbers (integer or floating), got dtype {arr.dtype}")
    if arr.shape != (vocab_size,):
        raise ShapeError(f"unigram must be 1-D of length vocab_size = {vocab_size}, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise NonFiniteError("unigram holds NaN or Inf")
    if (arr < 0).any():
        raise ConfigError("unigram weights must be >= 0")
    if not (arr > 0).any():
        raise ConfigError("unigram weights sum to 0: no token can be drawn")
    if np.issubdtype(arr.dtype, np.integer):
        if int(arr.max()) > _INT64_MAX // vocab_size:  # then Σw < 2⁶³: the cumulative counts fit int64
            raise ConfigError(f"unigram counts too large: each must be <= (2**63 - 1) // {vocab_size}")
        return arr.astype(np.int64)
    unit = arr.astype(np.float64) / float(np.max(arr))  # ≤ 1: the sum below cannot overflow
    scaled = np.ceil(unit / math.fsum(unit.tolist()) * 2.0**53)  # ≤ 2⁵³ each, Σ ≤ 2⁵³ + V
    return np.where(arr > 0, np.maximum(scaled, 1.0), 0.0).astype(np.int64)  # what underflowed stays drawable


_INT64_MAX = int(np.iinfo(np.int64).max)


class CalibrationPool:
    """Stage inputs recorded while running public text: pool[(stage, layer)] is rows × width.

    Stages (:data:`scx_ref.forward.Trace`): QKV (block input), O (attention output), FFN (residual
    before the MLP), LOCK (post-RoPE keys, flattened), HEAD (final residual).

    ``rows`` is checked here, so that a bad pool is refused when built, not mid-request: a mapping
    (ConfigError otherwise) from (Stage, integer layer) keys (ConfigError) to 2-D (ShapeError) real-number
    arrays (floating or integer: DTypeError) whose entries are all finite (NonFiniteError: a NaN decoy row
    made the client refuse the server's honest reply to it as an integrity failure). The mapping is copied;
    its arrays are kept as given (no copy).

    A pool built by :meth:`secret` (the client's default) never hands out one row twice: a server that
    records many sessions saw one pool's rows again, verbatim, and a row seen in two sessions past block 1
    is a decoy (:func:`~scx_ref.attacks.decoy_detect.recurring_rows`: precision ~1, recall 0.7 after 40
    sessions of one client on the tiny model). When a stage's rows run out it is built again from the next
    epoch's secret text. A pool built from given rows or tokens draws each message's rows independently.
    """

    needs_real = False

    def __init__(self, rows: Mapping[tuple[Stage, int], Array]) -> None:
        if not isinstance(rows, Mapping):
            raise ConfigError(f"calibration pool rows must be a mapping, got {type(rows).__name__}")
        checked: dict[tuple[Stage, int], Array] = {}
        for key, table in rows.items():
            if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], Stage)):
                raise ConfigError(f"calibration pool keys are (Stage, layer) pairs, got {key!r:.60}")
            layer = check_int(key[1], "calibration pool layer")
            arr = np.asarray(table)
            name = f"calibration pool rows of ({key[0].value!r}, {layer})"
            if arr.ndim != 2:
                raise ShapeError(f"{name} must be rows × width (2-D), got shape {arr.shape}")
            if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise DTypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
            if not np.isfinite(arr).all():
                raise NonFiniteError(f"{name} hold NaN or Inf")
            checked[(key[0], layer)] = arr
        self.rows = checked
        self.epoch = 0
        self._refill: Callable[[int], CalibrationPool] | None = None  # epoch → the pool of that epoch
        self._used: dict[tuple[Stage, int], npt.NDArray[np.bool_]] = {}  # rows handed out this epoch
        self._largest: dict[tuple[Stage, int], int] = {}  # the most rows one draw took, per (stage, layer)
        self._lock = threading.Lock()

    @classmethod
    def secret(
        cls, backend: Backend[Any], keys: KeySchedule, unigram: npt.ArrayLike | None = None
    ) -> CalibrationPool:
        """The client's default pool: :meth:`from_tokens` of :func:`secret_calibration_tokens` (``keys``,
        ``unigram``) at epoch 0, that never hands out a row twice — every (stage, layer)'s rows go to one
        message each; a draw that finds too few left builds the pool again from the next epoch's text
        (every stage afresh; the cost of one plaintext pass over 256 tokens, every ⌊256 / r⌋ requests).
        A message asking for more rows than the pool holds takes them as an unshared pool does (each row
        once before any twice). Errors as the two functions'."""
        vocab = backend.config.vocab_size

        def build(epoch: int) -> CalibrationPool:
            return cls.from_tokens(
                backend, secret_calibration_tokens(keys, vocab, unigram=unigram, epoch=epoch)
            )

        pool = build(0)
        pool._refill = build
        return pool

    @classmethod
    def from_tokens(
        cls, backend: Backend[Any], token_ids: npt.NDArray[np.int64], window: int = 256
    ) -> CalibrationPool:
        """Run plaintext inference on public ``token_ids`` (in windows of at most ``window`` tokens and
        the model's ``max_positions``) and keep every stage's input, for the tokens whose plaintext pass is
        finite: a decoy the model's own arithmetic left NaN or ±inf would fail the request. A token whose
        own block-0 RMSNorm is not finite (an embedding row of zeros at ``rms_eps`` = 0) is left out of
        the text first — run, it turns its whole window NaN (softmax's zero weight times its NaN value
        row); a token with any other row or logit that is not finite is dropped after. ConfigError when no
        token is left, or unless ``window`` is an integer >= 1; ``token_ids`` is checked as the client's
        ``public_tokens`` are (:func:`~scx_ref._checks.token_ids`: VocabularyError unless a 1-D integer
        array of ids in the vocabulary, ProtocolError when empty). The rows are kept in the backend's own
        dtype — the values its pass computed; a float32 backend's pool held a float64 copy before, twice the
        memory (114 MiB for SmolLM2's 256-token text) and a conversion at every draw."""
        window = min(check_int(window, "window", 1), backend.config.max_positions)
        ids = checked_ids(token_ids, backend.config.vocab_size)
        rows: dict[tuple[Stage, int], list[Array]] = {}

        def trace(stage: Stage, layer: int, x: Any) -> None:  # to_numpy: a copy, in the backend's own dtype
            rows.setdefault((stage, layer), []).append(np.asarray(backend.to_numpy(x)))

        runner = PlainRunner(backend, trace)
        with np.errstate(all="ignore"):  # tokens whose own block-0 norm is not finite are left out first
            first = backend.to_numpy(backend.norm(backend.embed(ids), "attn", 0))
        ids = ids[np.isfinite(first).all(axis=1)]
        finite: list[npt.NDArray[np.bool_]] = []  # per window: which tokens' logits are finite
        for start in range(0, len(ids), window):
            runner.reset()
            with np.errstate(all="ignore"):  # a token whose pass is not finite is dropped below
                logits = runner.forward(ids[start : start + window])
            finite.append(np.isfinite(np.asarray(backend.to_numpy(logits))).all(axis=1))
        tables = {key: parts[0] if len(parts) == 1 else np.concatenate(parts) for key, parts in rows.items()}
        keep = np.concatenate(finite) if finite else np.zeros(0, dtype=bool)
        for table in tables.values():  # one row per token at every stage
            keep &= np.isfinite(table).all(axis=1)
        if not keep.any():
            raise ConfigError(
                "calibration pool: the model's own arithmetic is not finite (NaN or ±inf) for every "
                "token of the calibration text; give other public_tokens"
            )
        return cls({key: table if keep.all() else table[keep] for key, table in tables.items()})

    def draw(self, stage: Stage, layer: int, count: int, real: Array, stream: KeyStream) -> Array:
        """``count`` rows of the pool at (stage, layer), chosen uniformly by ``stream`` and distinct
        (without replacement) while ``count`` ≤ the pool's rows: a row repeated in one message would mark
        both copies as decoys, since two real rows past block 1 are never equal. A larger ``count`` takes
        successive draws without replacement (each pool row once before any twice). A pool of
        :meth:`secret` takes only rows no earlier message took (in any session), building its next epoch
        when they run out. ConfigError for a ``count`` that is not an integer ≥ 0, or > 0 where the pool
        has no rows for (stage, layer); a count of 0 needs none (0 × the pool's width, else ``real``'s when
        it is 2-D, else 0)."""
        count = check_int(count, "decoy count")
        pool = self.rows.get((stage, layer))
        if count == 0:
            if pool is not None:
                return pool[:0]
            return np.zeros((0, np.shape(real)[1] if np.ndim(real) == 2 else 0))
        if pool is None or pool.shape[0] == 0:
            name = getattr(stage, "value", stage)
            raise ConfigError(f"calibration pool has no rows for stage {name!r}, layer {layer}")
        if self._refill is not None and count <= pool.shape[0]:
            return self._draw_unused((stage, layer), count, stream)
        return pool[_shuffled(pool.shape[0], count, stream)]

    def _draw_unused(self, key: tuple[Stage, int], count: int, stream: KeyStream) -> Array:
        """``count`` rows of ``key`` no earlier draw of this epoch took (a new epoch when too few are left),
        chosen uniformly among them by ``stream``; marked taken before they are returned."""
        with self._lock:
            self._largest[key] = max(self._largest.get(key, 0), count)
            used = self._used.setdefault(key, np.zeros(self.rows[key].shape[0], dtype=bool))
            free = np.flatnonzero(~used)
            if len(free) < count:  # this epoch's rows of key are spent: every stage from the next text
                assert self._refill is not None
                fresh = self._refill(self.epoch + 1)
                if key not in fresh.rows or fresh.rows[key].shape[0] < count:
                    raise ConfigError(f"the next calibration pool has fewer than {count} rows for {key}")
                self.rows, self.epoch, self._used = fresh.rows, self.epoch + 1, {}
                used = self._used.setdefault(key, np.zeros(self.rows[key].shape[0], dtype=bool))
                free = np.flatnonzero(~used)
            picks = free[_shuffled(len(free), count, stream)]
            used[picks] = True
            return self.rows[key][picks]

    def refill_every(self) -> int | None:
        """How many requests one epoch of a :meth:`secret` pool serves at the draws seen so far: for each
        (stage, layer) drawn, its rows ÷ the most rows one draw took there (rounded down; each request
        draws each key once), the least of them — the draw after that many builds the next epoch. None for
        a pool that is never built again (given rows or tokens), or before its first draw."""
        if self._refill is None:
            return None
        with self._lock:
            spans = [self.rows[key].shape[0] // c for key, c in self._largest.items() if key in self.rows]
        return min(spans) if spans else None

    def time_refill(self) -> float | None:
        """Seconds that building the next epoch takes — what the draw that finds a stage's rows spent pays
        (one plaintext pass over the next epoch's secret text on the pool's backend) — measured by building
        it and dropping it: the pool is left as it was. None for a pool that is never built again."""
        if self._refill is None:
            return None
        start = time.perf_counter()
        self._refill(self.epoch + 1)
        return time.perf_counter() - start


def _shuffled(size: int, count: int, stream: KeyStream) -> npt.NDArray[np.int64]:
    """``count`` indices of ``range(size)`` drawn by ``stream`` without replacement while ``count`` ≤
    ``size`` (a partial Fisher–Yates shuffle); a larger ``count`` takes successive rounds (each index once
    before any twice)."""
    picks: list[int] = []
    while len(picks) < count:  # a partial Fisher–Yates shuffle of the indices per round
        take = min(count - len(picks), size)
        moved: dict[int, int] = {}  # the shuffled positions that no longer hold their own index
        draws = stream.randbelow(np.arange(size, size - take, -1, dtype=np.int64)).tolist()
        for i, j in enumerate(draws):
            moved[i], moved[i + j] = moved.get(i + j, i + j), moved.get(i, i)
        picks.extend(moved[i] for i in range(take))
    return np.asarray(picks, dtype=np.int64)


class GaussianDecoys:
    """Decoys ~ N(μ, diag(s²)) with μ, s the real rows' per-coordinate mean and std."""

    needs_real = True

    def draw(self, stage: Stage, layer: int, count: int, real: Array, stream: KeyStream) -> Array:
        """Moment-matched Gaussian rows (Box–Muller on the stream's uniforms). ConfigError for a ``count``
        that is not an integer ≥ 0; ShapeError unless ``real`` (an array-like) is rows × width with at least
        one row; DTypeError unless it holds real numbers."""
        count = check_int(count, "decoy count")
        real = np.asarray(real)
        if not (np.issubdtype(real.dtype, np.floating) or np.issubdtype(real.dtype, np.integer)):
            raise DTypeError(f"Gaussian decoys need real-number rows, got dtype {real.dtype}")
        if np.ndim(real) != 2 or (count and np.shape(real)[0] == 0):
            raise ShapeError(f"Gaussian decoys need the real rows (rows × width), got shape {np.shape(real)}")
        width = real.shape[1]
        if count == 0:
            return np.zeros((0, width))
        mu, sd = _moments(real)
        u1 = 1.0 - np.asarray(stream.random((count, width)))
        u2 = np.asarray(stream.random((count, width)))
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)
        return np.asarray(mu + sd * z)


def _moments(real: Array) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-coordinate mean and std of the rows of ``real`` in float64 (one row: the row and |row| + 1e-3),
    each column divided by its largest |entry| first, so that the squares neither overflow nor underflow
    (rows of ~1e155 gave an infinite std, then decoys refused as non-finite although the model's own rows
    were finite; rows of ~1e-300 a zero std, decoys all equal to the mean)."""
    x = np.asarray(real, dtype=np.float64)
    if x.shape[0] == 1:
        return x[0].copy(), np.abs(x[0]) + 1e-3
    scale = np.max(np.abs(x), axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    unit = x / scale
    return unit.mean(axis=0) * scale, unit.std(axis=0) * scale

"""Input validation shared by every module: each check raises a subclass of SCXError."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import (
    ConfigError,
    DTypeError,
    NonFiniteError,
    PermutationError,
    ProtocolError,
    SCXError,
    ShapeError,
    VocabularyError,
)

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.integer[Any]]


def as_float_array(
    x: Any, name: str, *, ndim: int | None = None, allow_nonfinite: bool = False
) -> FloatArray:
    """Return ``x`` as a floating numpy array, checking dtype, rank and finiteness: DTypeError for a
    dtype that is not floating and for what numpy cannot read as an array (a ragged list, a bfloat16 or
    grad-tracking tensor), ShapeError for another rank, NonFiniteError for NaN or ±Inf."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DTypeError(f"{name} must be a floating-point array numpy can read: {exc}") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise DTypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not allow_nonfinite and not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return arr


def check_permutation(perm: Any, n: int | None = None, name: str = "permutation") -> IntArray:
    """Return ``perm`` as an int64 array after checking it is a permutation of 0..len-1 (of length n);
    PermutationError otherwise, including for what numpy cannot read as an array."""
    try:
        arr = np.asarray(perm)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PermutationError(f"{name} is not an array numpy can read: {exc}") from None
    if arr.ndim != 1:
        raise PermutationError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise PermutationError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n is not None and arr.shape[0] != n:
        raise PermutationError(f"{name} must have length {n}, got {arr.shape[0]}")
    if arr.size and not np.array_equal(np.sort(arr), np.arange(arr.shape[0])):
        raise PermutationError(f"{name} is not a permutation of 0..{arr.shape[0] - 1}")
    return arr


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype[Any]:
    """``dtype`` as a numpy dtype: the one check of a dtype argument that must be floating (float16, float32,
    float64, or a name or type numpy reads as one). DTypeError otherwise — for what numpy cannot read as a
    dtype at all, too: ``dtype must be a floating numpy dtype, got 'bogus'``, and for None, which numpy
    reads as float64 (a caller's missing dtype is not silently float64)."""
    if dtype is None:
        raise DTypeError(f"{name} must be a floating numpy dtype, got None")
    try:
        out: np.dtype[Any] = np.dtype(dtype)
    except (TypeError, ValueError):
        raise DTypeError(f"{name} must be a floating numpy dtype, got {dtype!r:.40}") from None
    if not np.issubdtype(out, np.floating):
        raise DTypeError(f"{name} must be a floating numpy dtype, got {out}")
    return out


def token_ids(ids: Any, vocab_size: int | None = None, *, allow_empty: bool = False) -> npt.NDArray[np.int64]:
    """``ids`` (an array-like, or a tensor on any device) as a 1-D int64 numpy array: the one check of a
    token-id argument (the reference's forward, the client's prompt, both backends' embeddings).

    VocabularyError unless it is 1-D of an integer dtype and every id lies in [0, vocab_size) (without
    ``vocab_size``, in int64's range); ProtocolError when it is empty, unless ``allow_empty`` (then any
    dtype passes: no ids, an empty int64 array)."""
    try:
        arr = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise VocabularyError(f"token ids must be a 1-D integer array: {exc}") from exc
    if arr.ndim != 1:
        raise VocabularyError(
            f"token ids must be a 1-D integer array, got {type(ids).__name__} of shape {arr.shape}"
        )
    if arr.size == 0:
        if allow_empty:
            return arr.astype(np.int64) if arr.dtype != np.int64 else arr
        raise ProtocolError("no token ids: at least one token is needed")
    if not np.issubdtype(arr.dtype, np.integer):
        raise VocabularyError(f"token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    top = _INT64_TOP if vocab_size is None else vocab_size
    if lo < 0 or hi >= top:
        raise VocabularyError(f"token ids must lie in [0, {top}), got range [{lo}, {hi}]")
    return arr.astype(np.int64, copy=False)


#: the ids :func:`token_ids` takes without a vocabulary: int64's (every backend indexes in int64)
_INT64_TOP = int(np.iinfo(np.int64).max)


def short_repr(value: Any) -> str:
    """``repr(value)`` for an error message, shortened: a huge integer by its bit length (its decimal form
    may not even be printable: Python refuses more than 4300 digits), anything else cut at 60 characters."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value).bit_length() > 64:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(
    value: Any,
    name: str,
    lo: int | None = 0,
    hi: int | None = None,
    *,
    error: type[SCXError] = ConfigError,
) -> int:
    """``value`` as an int: the one check of an integer argument (a count, a size, an index, a seed, a
    message's field).

    ``error`` (ConfigError by default; each caller passes its own class) unless ``value`` is an integer —
    a Python or numpy one, or anything else with ``__index__`` that is not an array of one or more
    dimensions; never a bool (a bool tensor included), a float or a string, which would be truncated or
    repeated — in [lo, hi] (no bound where None). The messages: ``n must be an integer, got float 2.5``;
    ``n must lie in [0, 5], got 6``; ``n must be >= 1, got 0``."""
    if type(value) is int:  # the usual case, without the __index__ protocol (request paths call this)
        out = value
    else:
        try:
            # a bool, or a tensor of bools or of one or more dimensions (torch's have __index__)
            if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
                raise TypeError
            if getattr(value, "ndim", 0) != 0:
                raise TypeError
            out = operator.index(value)
        except TypeError:
            raise error(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        if lo is not None and hi is not None:
            rule = f"lie in [{lo}, {hi}]"
        else:
            rule = f"be >= {lo}" if hi is None else f"be <= {hi}"
        raise error(f"{name} must {rule}, got {short_repr(out)}")
    return out


def _bound_text(x: float) -> str:
    """A bound for a message: ``0`` for 0.0, ``1e+100`` for 1e100, ``0.5`` for 0.5."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(float(x))


def _range_phrase(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[str, str]:
    """(verb phrase, adjective phrase) of the range [lo, hi] with the given open ends: ``("be >= 0",
    ">= 0")``, ``("lie in (0, 1]", "in (0, 1]")``, ``("lie in the open interval (0, 1)", "in the open
    interval (0, 1)")``; ``("", "")`` without bounds."""
    if lo is not None and hi is not None:
        if lo_open and hi_open:
            span = f"the open interval ({_bound_text(lo)}, {_bound_text(hi)})"
        else:
            span = f"{'(' if lo_open else '['}{_bound_text(lo)}, {_bound_text(hi)}{')' if hi_open else ']'}"
        return f"lie in {span}", f"in {span}"
    if lo is not None:
        rule = f"{'>' if lo_open else '>='} {_bound_text(lo)}"
    elif hi is not None:
        rule = f"{'<' if hi_open else '<='} {_bound_text(hi)}"
    else:
        return "", ""
    return f"be {rule}", rule


def check_real(
    value: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
    error: type[SCXError] = ConfigError,
    nonfinite_error: type[SCXError] | None = None,
) -> float:
    """``value`` as a float: the one check of a real-number argument (a scale, a tolerance, a rate, a
    timeout, a hyper-parameter), the twin of :func:`check_int`.

    Accepted: a real number — a Python or numpy int or float, or any other ``numbers.Real`` such as a
    Fraction — never a bool (Python or numpy), a string, bytes, a complex number, None or an array.
    Refused then: NaN; ±Inf unless ``allow_inf``; a finite number past the float64 range (an integer, a
    Fraction, a numpy longdouble), which would become ±Inf; a value outside [lo, hi] (no bound where None;
    ``lo_open``/``hi_open`` exclude the end). ``error`` (ConfigError by default; each caller passes its own
    class) for a wrong type or a value out of range, ``nonfinite_error`` (default ``error``) for NaN, ±Inf
    and a number past float64. The messages: ``x must be a real number, got str '1'``; ``x must be finite
    and >= 0, got nan``; ``x must be >= 0, got -1.0``; ``x must lie in (0, 1], got 2``; ``x must lie in the
    open interval (0, 1), got 0.0``."""
    if type(value) is float:  # the usual case, without the numbers.Real check (request paths call this)
        out = value
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise error(f"{name} must be a real number, got {type(value).__name__} {value!r:.40}")
        big: Any = value  # numbers.Real declares no comparison with int
        try:
            out = float(value)
        except OverflowError:  # an int or Fraction beyond float64: refused as float() would make it ±Inf
            out = math.inf if big > 0 else -math.inf
        # still refused where ±Inf is allowed: a finite value (an int, a Fraction, a numpy longdouble past
        # float64, which float() makes ±Inf without an error) is not silently made infinite
        if allow_inf and math.isinf(out) and big != out:
            raise (nonfinite_error or error)(
                f"{name} is beyond the float64 range (pass inf for an unbounded value), "
                f"got {short_repr(value)}"
            )
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        rule = _range_phrase(lo, hi, lo_open, hi_open)[1]
        if math.isnan(out) and allow_inf:
            need = f"a number{' ' + rule if rule else ''} (inf allowed)"
        else:
            need = f"finite{' and ' + rule if rule else ''}"
        raise (nonfinite_error or error)(f"{name} must be {need}, got {short_repr(value)}")
    if (lo is not None and (out < lo or (lo_open and out == lo))) or (
        hi is not None and (out > hi or (hi_open and out == hi))
    ):
        raise error(f"{name} must {_range_phrase(lo, hi, lo_open, hi_open)[0]}, got {short_repr(value)}")
    return out

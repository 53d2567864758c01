"""Input validation shared by every module: each check raises a subclass of SCXError."""

from __future__ import annotations

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
    """Return ``x`` as a floating numpy array, checking dtype, rank and finiteness."""
    arr = np.asarray(x)
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
    a Python or numpy one, or anything with ``__index__``; never a bool, a float or a string, which would
    be truncated or repeated — in [lo, hi] (no bound where None). The messages: ``n must be an integer,
    got float 2.5``; ``n must lie in [0, 5], got 6``; ``n must be >= 1, got 0``."""
    if type(value) is int:  # the usual case, without the __index__ protocol (request paths call this)
        out = value
    else:
        try:
            if isinstance(value, bool):
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

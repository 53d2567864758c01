"""Input validation shared by every module: each check raises a subclass of SCXError."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import DTypeError, NonFiniteError, PermutationError, ShapeError

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
    """Return ``perm`` as an int64 array after checking it is a permutation of 0..len-1 (of length n)."""
    arr = np.asarray(perm)
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

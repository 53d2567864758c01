"""Backends: the numpy reference and (with the ``torch`` extra) the torch production path."""

from __future__ import annotations

from .base import Backend
from .numpy_backend import NumpyBackend

__all__ = ["Backend", "NumpyBackend"]

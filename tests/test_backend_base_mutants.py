"""What the mutants of ``scx_ref/backends/base.py`` showed untested (``python -m mutation.run backend_base``):
the shape checks both backends share, the dtype names behind the reply checks' tolerances, the QKV split and
the backend check."""

from __future__ import annotations

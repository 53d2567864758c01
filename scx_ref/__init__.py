"""scx_ref: reference implementation of SCX (stateless KV-cache encoding, SIGCOMM 2025).

The numpy reference lives in :mod:`scx_ref.transforms` (T1–T5), :mod:`scx_ref.ops` (model ops) and
:mod:`scx_ref.reference` (the plaintext oracle); keys in :mod:`scx_ref.keys`; the protocol in
:mod:`scx_ref.protocol`; differential privacy in :mod:`scx_ref.dp`.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import SCXError
from .keys import KeySchedule
from .weights import ModelWeights, random_weights

__version__ = "0.1.0"

__all__ = ["KeySchedule", "ModelConfig", "ModelWeights", "SCXError", "__version__", "random_weights"]

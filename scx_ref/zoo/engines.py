"""The two sides every full-model check compares: plaintext and SCX, as logits and greedy-token functions.

Plaintext: float32 → the HF model's own forward; float64 → the numpy reference forward
(:class:`scx_ref.reference.ReferenceModel` on float64 weights), because an HF model converted with
``.double()`` still computes RMSNorm and the eager softmax in float32.
SCX: the protocol engine (Client/Server over a LocalTransport) on the numpy backend for float64 and the
torch backend for float32. Every prefill/generation is one request with fresh keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ..backends.base import Backend
from ..backends.numpy_backend import NumpyBackend
from ..errors import ConfigError, SCXError
from ..keys import KeySchedule
from ..protocol import CalibrationPool, Client, Level, LocalTransport, SCXConfig, Server
from ..protocol.decoys import default_public_tokens
from ..reference import ReferenceModel
from ..weights import ModelWeights

__all__ = [
    "GenerateFn",
    "LogitsFn",
    "plain_generate",
    "plain_logits",
    "scx_config",
    "scx_generate",
    "scx_logits",
]

IdArray = npt.NDArray[np.int64]
LogitsFn = Callable[[IdArray], npt.NDArray[Any]]
GenerateFn = Callable[[IdArray, int], list[int]]


def _check_dtype(dtype: str) -> str:
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    return dtype


def plain_logits(hf_model: Any, weights: ModelWeights, dtype: str) -> LogitsFn:
    """Plaintext logits (rows × V) of one sequence: HF forward (float32) or ReferenceModel (float64)."""
    if _check_dtype(dtype) == "float64":
        ref = ReferenceModel(weights if weights.dtype == np.float64 else weights.astype(np.float64))
        return lambda ids: ref.prefill(np.asarray(ids, dtype=np.int64))[0]
    import torch

    def run(ids: IdArray) -> npt.NDArray[Any]:
        with torch.no_grad():
            out = hf_model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], use_cache=False)
        return np.asarray(out.logits[0].float().numpy())

    return run


def plain_generate(hf_model: Any, weights: ModelWeights, dtype: str) -> GenerateFn:
    """Plaintext greedy continuation (argmax at every step, no stop token): HF with its KV cache
    (float32) or ReferenceModel.generate (float64)."""
    if _check_dtype(dtype) == "float64":
        ref = ReferenceModel(weights if weights.dtype == np.float64 else weights.astype(np.float64))
        return lambda ids, n: ref.generate(np.asarray(ids, dtype=np.int64), n)
    import torch

    def run(ids: IdArray, n_new: int) -> list[int]:
        out: list[int] = []
        with torch.no_grad():
            res = hf_model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], use_cache=True)
            for step in range(n_new):
                nxt = int(torch.argmax(res.logits[0, -1]))
                out.append(nxt)
                if step + 1 < n_new:
                    res = hf_model(torch.tensor([[nxt]]), cache=res.cache, use_cache=True)
        return out

    return run


def scx_config(level: Level, beta: float, max_length: int = 4096, **kw: Any) -> SCXConfig:
    """The protocol's SCXConfig for a run (level, β; other fields at their defaults unless given)."""
    return SCXConfig(level=level, beta=beta, max_length=max_length, **kw)


def _backend(weights: ModelWeights, dtype: str, device: str) -> Backend[Any]:
    if _check_dtype(dtype) == "float64":
        return NumpyBackend(weights, np.float64)
    try:
        import torch

        from ..backends.torch_backend import TorchBackend
    except ImportError as exc:
        raise SCXError(f"the float32 SCX path needs the torch backend: {exc}") from exc
    return TorchBackend(weights, torch.float32, device)


class _SCX:
    """One server (backend over the model's weights) that serves a fresh client per request."""

    def __init__(self, weights: ModelWeights, dtype: str, cfg: SCXConfig, device: str) -> None:
        self.backend = _backend(weights, dtype, device)
        self.server = Server(self.backend)
        self.cfg = cfg
        self.pool: CalibrationPool | None = None
        if cfg.decoys == "calibration":  # built once per run, not once per request
            self.pool = CalibrationPool.from_tokens(
                self.backend, default_public_tokens(weights.config.vocab_size)
            )

    def session(self) -> tuple[Client[Any], LocalTransport]:
        link = LocalTransport(self.server)
        return Client(self.backend, KeySchedule.generate(), self.cfg, decoys=self.pool), link


def scx_logits(weights: ModelWeights, dtype: str, cfg: SCXConfig, device: str = "cpu") -> LogitsFn:
    """SCX prefill logits (rows × V, numpy) of one sequence, one request with fresh keys per call."""
    scx = _SCX(weights, dtype, cfg, device)

    def run(ids: IdArray) -> npt.NDArray[Any]:
        client, link = scx.session()
        return np.asarray(client.prefill(np.asarray(ids, dtype=np.int64), link))

    return run


def scx_generate(weights: ModelWeights, dtype: str, cfg: SCXConfig, device: str = "cpu") -> GenerateFn:
    """SCX greedy continuation (prefill, key sharing, one-time-key decode steps) of one prompt."""
    scx = _SCX(weights, dtype, cfg, device)

    def run(ids: IdArray, n_new: int) -> list[int]:
        client, link = scx.session()
        return [int(t) for t in client.generate(np.asarray(ids, dtype=np.int64), n_new, link)]

    return run

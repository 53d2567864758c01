"""The two sides every full-model check compares: plaintext and SCX, as logits and greedy-token functions.

Plaintext: float32 → the HF model's own forward; float64 → the numpy reference forward
(:class:`scx_ref.reference.ReferenceModel` on float64 weights), because an HF model converted with
``.double()`` still computes RMSNorm and the eager softmax in float32.
SCX: the protocol engine (Client/Server over a LocalTransport) on the numpy backend for float64 and the
torch backend for float32. Every prefill/generation is one request with fresh keys.

Device: float32's two sides run on one torch device (``cpu``, ``cuda`` or ``cuda:N``): the HF model on it
(:func:`plain_model`) and the SCX client and server's torch backend on it; float64's numpy paths run on the
CPU only (:func:`check_device`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from .._checks import check_int, token_ids
from ..backends.base import Backend
from ..backends.numpy_backend import NumpyBackend
from ..errors import ConfigError, SCXError
from ..keys import KeySchedule
from ..protocol import CalibrationPool, Client, Level, LocalTransport, SCXConfig, Server, Transport
from ..protocol.decoys import configured_unigram
from ..protocol.verify import SketchCache
from ..reference import ReferenceModel
from ..weights import ModelWeights
from .corpus import public_unigram

if TYPE_CHECKING:
    from ..service.remote import RemoteTransport

__all__ = [
    "ENGINE_DTYPES",
    "GenerateFn",
    "LogitsFn",
    "SCXEngine",
    "SCXGenerate",
    "SCXLogits",
    "check_device",
    "plain_generate",
    "plain_logits",
    "plain_model",
    "pool_unigram",
    "scx_config",
    "scx_generate",
    "scx_logits",
]

IdArray = npt.NDArray[np.int64]
LogitsFn = Callable[[IdArray], npt.NDArray[Any]]
GenerateFn = Callable[[IdArray, int], list[int]]


#: The dtypes SCX is checked against plaintext in (``scx verify``, ``ppl``, ``generate``): float32 on the
#: torch backend against Hugging Face's forward, float64 on the numpy backend against the numpy reference.
ENGINE_DTYPES: tuple[str, ...] = ("float32", "float64")


def _check_dtype(dtype: str) -> str:
    # an array's ``in`` raised numpy's ambiguous-truth ValueError; a numpy dtype equals its name
    if not isinstance(dtype, (str, np.dtype)) or dtype not in ENGINE_DTYPES:
        raise ConfigError(f"dtype must be {' or '.join(ENGINE_DTYPES)}, got {dtype!r}")
    return dtype


def check_device(dtype: str, device: str) -> None:
    """ConfigError unless ``dtype``'s paths can run on ``device``: float32 on a torch device named ``cpu``,
    ``cuda`` or ``cuda:N`` (:func:`scx_ref.commands._args.device`; whether this machine has it is the
    caller's check: :func:`scx_ref.commands._args.require_device`), float64 (the numpy reference and the
    numpy backend) on the CPU only."""
    import argparse

    from ..commands._args import device as device_name

    try:
        device_name(device) if isinstance(device, str) else device_name("")
    except argparse.ArgumentTypeError:
        raise ConfigError(f"unsupported device {device!r}: choose cpu, cuda or cuda:N") from None
    if _check_dtype(dtype) == "float64" and device != "cpu":
        raise ConfigError(
            f"float64 runs the numpy reference and the numpy backend, on the CPU only: "
            f"device {device!r} is for float32"
        )


def plain_model(hf_model: Any, device: str) -> Any:
    """The HF model on ``device``: the model itself on the CPU, else a copy moved there (a registered
    model is cached per process on the CPU, :func:`scx_ref.zoo.load_hf`, and stays there)."""
    if device == "cpu":
        return hf_model
    import copy

    return copy.deepcopy(hf_model).to(device)


def _check_weights(weights: Any) -> ModelWeights:
    """``weights`` if it is a ModelWeights (ConfigError otherwise: an AttributeError at first use)."""
    if not isinstance(weights, ModelWeights):
        raise ConfigError(f"weights must be ModelWeights, got {type(weights).__name__}")
    return weights


def _ids(ids: Any, weights: ModelWeights) -> IdArray:
    """``ids`` checked as token ids of ``weights``' vocabulary (:func:`scx_ref._checks.token_ids`:
    VocabularyError for floats, which were truncated, or an id out of range, which was a raw IndexError
    on the HF side; ProtocolError when empty)."""
    return token_ids(ids, weights.config.vocab_size)


def _device_of(hf_model: Any) -> Any:
    """The device the HF model's parameters are on (its inputs go there); ConfigError for anything but a
    torch model with parameters (None raised a raw AttributeError)."""
    try:
        return next(hf_model.parameters()).device
    except (AttributeError, TypeError, StopIteration):
        raise ConfigError(
            f"hf_model must be a torch model with parameters, got {type(hf_model).__name__}"
        ) from None


def plain_logits(hf_model: Any, weights: ModelWeights, dtype: str) -> LogitsFn:
    """Plaintext logits (rows × V, numpy) of one sequence: HF forward (float32, on the device the model is
    on) or ReferenceModel (float64). ConfigError for weights that are not ModelWeights; the sequence must
    be token ids of their vocabulary (VocabularyError, or ProtocolError when empty)."""
    _check_weights(weights)
    if _check_dtype(dtype) == "float64":
        ref = ReferenceModel(weights if weights.dtype == np.float64 else weights.astype(np.float64))
        return lambda ids: ref.prefill(_ids(ids, weights))[0]
    import torch

    dev = _device_of(hf_model)

    def run(ids: IdArray) -> npt.NDArray[Any]:
        with torch.no_grad():
            tid = torch.as_tensor(_ids(ids, weights), device=dev)[None]
            out = hf_model(tid, use_cache=False)
        return np.asarray(out.logits[0].float().cpu().numpy())

    return run


def plain_generate(hf_model: Any, weights: ModelWeights, dtype: str) -> GenerateFn:
    """Plaintext greedy continuation (argmax at every step, no stop token): HF with its KV cache
    (float32, on the device the model is on) or ReferenceModel.generate (float64). As
    :func:`plain_logits` for the weights and the prompt; ``n_new`` must be an integer >= 0 (ConfigError)."""
    _check_weights(weights)
    if _check_dtype(dtype) == "float64":
        ref = ReferenceModel(weights if weights.dtype == np.float64 else weights.astype(np.float64))
        return lambda ids, n: ref.generate(_ids(ids, weights), check_int(n, "n_new", 0))
    import torch

    dev = _device_of(hf_model)

    def run(ids: IdArray, n_new: int) -> list[int]:
        n_new = check_int(n_new, "n_new", 0)  # a negative count gave [], a float a raw TypeError
        out: list[int] = []
        with torch.no_grad():
            tid = torch.as_tensor(_ids(ids, weights), device=dev)[None]
            res = hf_model(tid, use_cache=True)
            for step in range(n_new):
                nxt = int(torch.argmax(res.logits[0, -1]))
                out.append(nxt)
                if step + 1 < n_new:
                    res = hf_model(torch.tensor([[nxt]], device=dev), cache=res.cache, use_cache=True)
        return out

    return run


def scx_config(level: Level, beta: float, max_length: int = 4096, **kw: Any) -> SCXConfig:
    """The protocol's SCXConfig for a run (level, β; other fields at their defaults unless given);
    ConfigError for a value SCXConfig refuses or a keyword that is not one of its fields."""
    fields = {f.name for f in dataclasses.fields(SCXConfig)}
    unknown = sorted(set(kw) - fields)
    if unknown:  # a raw TypeError from SCXConfig
        raise ConfigError(
            f"not an SCXConfig field: {', '.join(unknown)}; fields: {', '.join(sorted(fields))}"
        )
    return SCXConfig(level=level, beta=beta, max_length=max_length, **kw)


def _backend(weights: ModelWeights, dtype: str, device: str) -> Backend[Any]:
    check_device(dtype, device)
    if dtype == "float64":
        return NumpyBackend(weights, np.float64)
    try:
        import torch

        from ..backends.torch_backend import TorchBackend
    except ImportError as exc:
        raise SCXError(f"the float32 SCX path needs the torch backend: {exc}") from exc
    return TorchBackend(weights, torch.float32, device)


def pool_unigram(cfg: SCXConfig, tokenizer: Any | None, vocab_size: int) -> npt.NDArray[np.int64] | None:
    """The ``unigram`` the commands give their clients: the corpus's public unigram
    (:func:`~scx_ref.zoo.corpus.public_unigram`, DESIGN §5.1) where ``cfg`` draws calibration decoys, else
    None (Gaussian decoys draw no text)."""
    return public_unigram(tokenizer, vocab_size) if cfg.decoys == "calibration" else None


class _SCX:
    """One server (backend over the model's weights) that serves a fresh client per request: in-process,
    or the ``scx serve`` at ``server`` (a URL) through one :class:`~scx_ref.service.RemoteTransport`.
    Its calibration pool's secret text is drawn from ``unigram`` when given (:func:`~scx_ref.zoo.corpus.
    public_unigram`), else uniformly."""

    def __init__(
        self,
        weights: ModelWeights,
        dtype: str,
        cfg: SCXConfig,
        device: str,
        server: str | None = None,
        unigram: npt.ArrayLike | None = None,
    ) -> None:
        _check_weights(weights)
        if not isinstance(cfg, SCXConfig):
            raise ConfigError(f"cfg must be an SCXConfig (see scx_config), got {type(cfg).__name__}")
        if server is not None and not isinstance(server, str):
            raise ConfigError(f"server must be a URL string (scx://HOST:PORT), got {type(server).__name__}")
        if server is not None:
            from ..service.remote import parse_url

            parse_url(server)  # a malformed URL refused before the backend copies the weights
        # checked before a backend is built or a server reached
        unigram = configured_unigram(unigram, weights.config.vocab_size, cfg.decoys)
        self.backend = _backend(weights, dtype, device)
        self.server = Server(self.backend)
        self.remote: RemoteTransport | None = None
        if server is not None:
            from ..service.remote import RemoteTransport

            self.remote = RemoteTransport(server, self.backend)
        self.cfg = cfg
        self.keys = KeySchedule.generate()
        self.pool: CalibrationPool | None = None
        if cfg.decoys == "calibration":  # built once per run (then per epoch), from the run's secret texts
            # (a public text let a server holding the weights rebuild the pool and find every decoy)
            self.pool = CalibrationPool.secret(self.backend, self.keys, unigram)
        self.sketches: SketchCache | None = None
        if cfg.verify:  # the reply verifier's precomputation, once per run
            self.sketches = SketchCache(self.backend, self.keys)
            self.sketches.build()

    def session(self) -> tuple[Client[Any], Transport]:
        link = self.remote if self.remote is not None else LocalTransport(self.server)
        keys = self.keys.for_nonce(KeySchedule.new_nonce())
        return Client(self.backend, keys, self.cfg, decoys=self.pool, sketches=self.sketches), link


_E = TypeVar("_E", bound="SCXEngine")


class SCXEngine:
    """An SCX side (:func:`scx_logits`, :func:`scx_generate`): called once per sequence, each call one
    session with fresh keys. Its stream to ``scx serve`` (when given a server) stays open between calls;
    :meth:`close` — or the end of a ``with`` block — closes it, so the server frees it and every session
    on it at once, not when the engine is garbage-collected."""

    def __init__(self, scx: _SCX, weights: ModelWeights) -> None:
        self._scx = scx
        self._weights = weights

    def close(self) -> None:
        """Close the stream to the server, if any (the server ends its sessions); idempotent. A later call
        opens a new stream."""
        if self._scx.remote is not None:
            self._scx.remote.close()

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SCXLogits(SCXEngine):
    """SCX prefill logits of one sequence (:func:`scx_logits`)."""

    def __call__(self, ids: IdArray) -> npt.NDArray[Any]:
        """The prefill logits (rows × V, numpy) of ``ids``, equal to plaintext; the session is closed."""
        ids = _ids(ids, self._weights)  # before a client is built (keys derived, a nonce drawn)
        client, link = self._scx.session()
        logits = np.asarray(client.prefill(ids, link))
        client.close()
        return logits


class SCXGenerate(SCXEngine):
    """SCX greedy continuation of one prompt (:func:`scx_generate`)."""

    def __call__(self, ids: IdArray, n_new: int) -> list[int]:
        """The ``n_new`` greedy tokens after ``ids``, the same as plaintext; the session is closed."""
        ids = _ids(ids, self._weights)  # before a client is built (keys derived, a nonce drawn)
        client, link = self._scx.session()
        return [int(t) for t in client.generate(ids, n_new, link)]


def scx_logits(
    weights: ModelWeights,
    dtype: str,
    cfg: SCXConfig,
    device: str = "cpu",
    server: str | None = None,
    unigram: npt.ArrayLike | None = None,
) -> SCXLogits:
    """SCX prefill logits (rows × V, numpy) of one sequence, one request with fresh keys per call (on the
    ``scx serve`` at ``server`` when given: close the engine, or use it in a ``with`` block, to end its
    stream); decoys from a calibration text drawn from ``unigram`` when given."""
    return SCXLogits(_SCX(weights, dtype, cfg, device, server, unigram), weights)


def scx_generate(
    weights: ModelWeights,
    dtype: str,
    cfg: SCXConfig,
    device: str = "cpu",
    server: str | None = None,
    unigram: npt.ArrayLike | None = None,
) -> SCXGenerate:
    """SCX greedy continuation (prefill, key sharing, one-time-key decode steps) of one prompt (on the
    ``scx serve`` at ``server`` when given: close the engine, or use it in a ``with`` block, to end its
    stream); decoys from a calibration text drawn from ``unigram`` when given."""
    return SCXGenerate(_SCX(weights, dtype, cfg, device, server, unigram), weights)

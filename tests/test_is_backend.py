"""``is_backend``: the one check a component that keeps a backend runs at construction.

A model's weights have a ``config`` too. Before, a ``PlainRunner``, ``Client`` or ``SketchCache`` built on
them was accepted and failed at its first use (a runner's prefill with a TypeError, a client's with an
AttributeError from its sketch cache), and a ``Server`` on them (or on None) raised an AttributeError, not a
project error."""

from __future__ import annotations

from typing import Any

import pytest

from scx_ref.backends.base import BACKEND_METHODS, is_backend
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.protocol.client import Client
from scx_ref.protocol.server import Server
from scx_ref.protocol.verify import SketchCache
from tests.refusals import refused
from tests.tiny import tiny_weights

_W = tiny_weights(0)
_B = NumpyBackend(_W)


class _Without:
    """A backend with one method taken away (``getattr`` of it raises AttributeError) or made an attribute
    that is not callable."""

    def __init__(self, inner: Any, missing: str, value: object = None) -> None:
        self.config = inner.config
        self._inner, self._missing, self._value = inner, missing, value

    def __getattr__(self, name: str) -> Any:
        if name == self._missing:
            if self._value is None:
                raise AttributeError(name)
            return self._value
        return getattr(self._inner, name)


def test_every_backend_of_the_library_is_one() -> None:
    backends: list[Any] = [_B, TorchBackend(_W, "float32"), TorchBackend(_W, "float64")]
    backends += [b.widened() for b in backends]
    assert all(is_backend(b) for b in backends)
    # a delegating wrapper with nothing missing is one too (the stand-ins below differ from it in one name)
    assert is_backend(_Without(_B, "not-a-method"))


def test_the_method_list_is_read_from_the_protocols() -> None:
    known = {"embed", "norm", "project", "mlp", "attention", "take_rows", "to_numpy", "widened"}
    assert known <= BACKEND_METHODS
    assert all(not name.startswith("_") for name in BACKEND_METHODS)
    assert all(callable(getattr(_B, name)) for name in BACKEND_METHODS)


@pytest.mark.parametrize("value", [None, 3], ids=["absent", "not-callable"])
@pytest.mark.parametrize("missing", sorted(BACKEND_METHODS))
def test_an_object_lacking_any_one_method_is_not_a_backend(missing: str, value: object) -> None:
    assert not is_backend(_Without(_B, missing, value))


def test_weights_and_other_objects_are_not_backends() -> None:
    no_config = _Without(_B, "not-a-method")
    no_config.config = dict(vars(_W.config))  # the same fields, but not a ModelConfig
    for obj in (_W, None, 3, object(), no_config):
        assert not is_backend(obj)


def test_runner_server_client_and_sketch_cache_refuse_weights_at_construction() -> None:
    with refused(ConfigError, "PlainRunner needs a Backend, got ModelWeights"):
        PlainRunner(_W)  # type: ignore[arg-type]
    with refused(ProtocolError, "backend must be a Backend, got ModelWeights"):
        Server(_W)  # type: ignore[arg-type]
    with refused(ProtocolError, "backend must be a Backend, got NoneType"):
        Server(None)  # type: ignore[arg-type]
    with refused(ProtocolError, "backend must be a Backend, got ModelWeights"):
        Client(_W, KeySchedule.generate())  # type: ignore[arg-type]
    with refused(ProtocolError, "backend must be a Backend, got ModelWeights"):
        SketchCache(_W, KeySchedule.generate())  # type: ignore[arg-type]

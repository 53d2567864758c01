"""One check of a token-id argument (``_checks.token_ids``): the reference's forward, the client's prefill
and generate, both backends' embeddings and ``SCXModel.check_prompt`` refuse the same ids with the same
error class, and take the same ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref._checks import token_ids
from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ProtocolError, SCXError, VocabularyError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from tests.tiny import TINY, tiny_weights

WEIGHTS = tiny_weights(0)
VOCAB = TINY["vocab_size"]

#: (ids, the error every entry point raises for them)
BAD: list[tuple[Any, type[SCXError]]] = [
    (np.array([[1, 2]]), VocabularyError),  # 2-D: the client used to raise ProtocolError, the reference not
    (np.array(3), VocabularyError),  # 0-d
    (np.array([1.0, 2.0]), VocabularyError),  # floating ids
    (np.array([1, VOCAB]), VocabularyError),  # past the vocabulary
    (np.array([1, -1]), VocabularyError),
    (np.array([2**63 + 5], dtype=np.uint64), VocabularyError),  # past int64: would wrap to negative
    (np.array([1, 2], dtype=object), VocabularyError),
    (np.array([], dtype=np.int64), ProtocolError),  # no tokens
    ([], ProtocolError),
    (torch.tensor([[1, 2]]), VocabularyError),
]


def _client(backend: Any) -> tuple[Client[Any], LocalTransport]:
    client: Client[Any] = Client(backend, KeySchedule.generate(), SCXConfig(level="paper", r1=2, r2=2))
    return client, LocalTransport(Server(backend))


def _reference(ids: Any) -> Any:
    return ReferenceModel(WEIGHTS).forward(ids)


def _prefill(ids: Any) -> Any:
    client, link = _client(NumpyBackend(WEIGHTS))
    return client.prefill(ids, link)


def _generate(ids: Any) -> Any:
    client, link = _client(NumpyBackend(WEIGHTS))
    return client.generate(ids, 2, link)


def _torch_prefill(ids: Any) -> Any:
    client, link = _client(TorchBackend(WEIGHTS, dtype=torch.float64))
    return client.prefill(ids, link)


ENTRY_POINTS: dict[str, Callable[[Any], Any]] = {
    "token_ids": lambda ids: token_ids(ids, VOCAB),
    "reference.forward": _reference,
    "Client.prefill": _prefill,
    "Client.generate": _generate,
    "Client.prefill (torch)": _torch_prefill,
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("ids", "error"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_every_entry_point_refuses_alike(name: str, ids: Any, error: type[SCXError]) -> None:
    with pytest.raises(error):
        ENTRY_POINTS[name](ids)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    "ids", [np.array([3, 1, 4]), [3, 1, 4], np.array([3, 1, 4], dtype=np.uint8), torch.tensor([3, 1, 4])]
)
def test_every_entry_point_takes_integer_ids(name: str, ids: Any) -> None:
    ENTRY_POINTS[name](ids)  # control: the refusals above are about the ids, not the entry point


@pytest.mark.parametrize("backend", [NumpyBackend(WEIGHTS), TorchBackend(WEIGHTS, dtype=torch.float64)])
def test_embeddings_share_the_check_and_allow_no_ids(backend: Any) -> None:
    for ids, error in BAD:
        if error is VocabularyError:
            with pytest.raises(VocabularyError):
                backend.embed(ids)
    rows = backend.embed(np.array([], dtype=np.float64))  # an empty list of ids: no rows
    assert tuple(rows.shape) == (0, TINY["hidden_size"])
    assert np.array_equal(np.asarray(backend.embed(np.array([3, VOCAB - 1]))), WEIGHTS.embed[[3, VOCAB - 1]])


def test_token_ids_returns_int64_without_a_vocabulary() -> None:
    got = token_ids(np.array([5, 7], dtype=np.uint16))
    assert got.dtype == np.int64 and got.tolist() == [5, 7]
    assert token_ids([], allow_empty=True).dtype == np.int64
    with pytest.raises(VocabularyError, match="range"):
        token_ids(np.array([2**63], dtype=np.uint64))

"""Follow-ups of the s69 audits: NumpyOps refuses 1-D rows itself (one ``check_rows``); ``grpc_options``
checks its size; the attack's victim prompts are tokenized past a cut inside a word (``corpus.first_tokens``);
the attacks read the prompt's n through one checked ``_view.prompt_length``."""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, ProtocolError, ShapeError
from scx_ref.protocol.transport import ServerView, ViewedMessage
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

# -- 1. NumpyOps.scale_rows / argmax_last take 2-D rows only -----------------------------------------------


def test_numpy_ops_refuse_1d_rows_as_the_backends_do() -> None:
    """NumpyOps (no weights) broadcast 1-D "rows" of scalars to the 3 × 3 outer product and read index 0 of
    a scalar as the argmax; only NumpyBackend's overrides checked. 2-D rows are served as before."""
    from scx_ref.arrays import NumpyOps

    ops = NumpyOps(np.float64)
    flat = np.array([1.0, 5.0, 3.0])
    with pytest.raises(ShapeError, match="2-D"):
        ops.scale_rows(flat, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ShapeError, match="2-D"):
        ops.argmax_last(flat)
    with pytest.raises(ShapeError, match="2-D"):
        ops.argmax_last(flat.reshape(1, 1, 3))
    with pytest.raises(ShapeError):  # no rows, or an empty row: refused as before
        ops.argmax_last(np.zeros((0, 3)))
    with pytest.raises(ShapeError):
        ops.argmax_last(np.zeros((2, 0)))
    rows = np.array([[1.0, 2.0], [4.0, 3.0]])
    assert np.array_equal(ops.scale_rows(rows, np.array([2.0, -1.0])), [[2.0, 4.0], [-4.0, -3.0]])
    assert ops.argmax_last(rows) == 0


def test_check_rows_is_one_implementation_and_numpy_backend_inherits_it() -> None:
    from scx_ref import arrays
    from scx_ref.backends import base
    from scx_ref.backends.numpy_backend import NumpyBackend

    assert base.check_rows is arrays.check_rows
    assert "scale_rows" not in vars(NumpyBackend) and "argmax_last" not in vars(NumpyBackend)
    b = NumpyBackend(tiny_weights(0))
    with pytest.raises(ShapeError, match="2-D"):
        b.scale_rows(np.ones(3), np.ones(3))
    with pytest.raises(ShapeError, match="2-D"):
        b.argmax_last(np.ones(3))


# -- 2. grpc_options checks its size -----------------------------------------------------------------------


def test_grpc_options_refuses_a_size_grpc_cannot_take() -> None:
    """A size past gRPC's C int (or none: 0, negative, a float, a bool) gave options that failed only when a
    channel or server started (or a negative or float message length)."""
    pytest.importorskip("grpc")
    from scx_ref.service.codec import MAX_MESSAGE_BYTES, grpc_options

    for bad in (MAX_MESSAGE_BYTES + 1, 2**40, 0, -5000, 1.5, True, "1024"):
        with pytest.raises(ConfigError, match="max_message_bytes"):
            grpc_options(bad)  # type: ignore[arg-type]
    assert max(v for _k, v in grpc_options(MAX_MESSAGE_BYTES)) == 2**31 - 1
    assert dict(grpc_options(1))["grpc.max_send_message_length"] == 1025


# -- 3. victim prompts are not cut inside a word ----------------------------------------------------------


def _word_groups(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
    """A tokenizer of long tokens (three words each, about 20 characters) that never spans a blank line."""
    ids: list[int] = []
    for para in text.split("\n\n"):
        words = re.findall(r"\S+", para)
        ids += [zlib.crc32(" ".join(words[k : k + 3]).encode()) % 1000 for k in range(0, len(words), 3)]
    return {"input_ids": ids}


@pytest.mark.parametrize(("count", "length"), [(3, 16), (2, 9)])
def test_victims_are_the_first_tokens_of_their_whole_topic(count: int, length: int) -> None:
    """The body was cut at 16·length + 64 characters before tokenizing: a tokenizer of long tokens had its
    last victim token cut inside a word (another id: 2 × 9, the first victim), or too few tokens
    (ConfigError: 3 × 16)."""
    from scx_ref.attacks.cli import public_and_victims, victim_topics

    _, victims = public_and_victims(_word_groups, 1000, 64, count, length)
    odd = victim_topics(length)
    for i, v in enumerate(victims):
        whole = _word_groups(odd[(i * len(odd)) // count])["input_ids"][:length]
        assert v.tolist() == whole, i


@pytest.mark.parametrize(("n_public", "length", "count"), [(4096, 16, 3), (4096, 48, 5), (1024, 8, 2)])
def test_published_settings_victims_are_unchanged_on_the_byte_path(
    n_public: int, length: int, count: int
) -> None:
    """At the published settings the victims are the first ``length`` characters of the body, as before."""
    from scx_ref.attacks.cli import public_and_victims, victim_topics

    _, victims = public_and_victims(None, 256, n_public, count, length)
    odd = victim_topics(length)
    for i, v in enumerate(victims):
        assert bytes(v.astype(np.uint8).tolist()).decode() == odd[(i * len(odd)) // count][:length]


# -- 4. one checked reading of the prompt's n --------------------------------------------------------------


def _view(n: Any) -> ServerView:
    meta = {} if n is None else {"n": n}
    return ServerView(
        [
            ViewedMessage("s", Stage.OPEN, -1, -1, {}, meta),
            ViewedMessage("s", Stage.O, 0, -1, {"x": np.zeros((4, 8))}, {}),
        ]
    )


@pytest.mark.parametrize("n", [None, 0, -1, "3", 3.0, True])
def test_the_prompt_length_is_an_integer_of_at_least_one(n: Any) -> None:
    from scx_ref.attacks._view import prompt_length

    with pytest.raises(ProtocolError, match="n"):
        prompt_length(_view(n))


@pytest.mark.parametrize("n", [None, 0, -1, "3", 3.0, True])
def test_every_reader_of_the_prompt_length_refuses_what_it_refuses(n: Any) -> None:
    """An open message's n of 0 was read as a prompt of no rows by the search spaces and the shared caches
    (the server refuses such an open); each module had its own check."""
    from scx_ref.attacks import bruteforce, statelessness
    from scx_ref.attacks._view import shared_caches

    view, w = _view(n), tiny_weights(5)
    with pytest.raises(ProtocolError, match="n"):
        bruteforce.stage_search_spaces(view, w.config)
    with pytest.raises(ProtocolError, match="n"):
        shared_caches(view, w)
    with pytest.raises(ProtocolError, match="n"):
        statelessness.server_caches(view, w, "zeros")


def test_the_prompt_length_reads_an_integer_n() -> None:
    from scx_ref.attacks._view import prompt_length

    assert prompt_length(_view(3)) == 3 and prompt_length(_view(np.int64(2))) == 2


def test_the_search_spaces_read_an_integer_n() -> None:
    from scx_ref.attacks import bruteforce

    rows = bruteforce.stage_search_spaces(_view(np.int64(3)), tiny_weights(5).config)
    assert [(r["rows"], r["n"]) for r in rows] == [(4, 3)]

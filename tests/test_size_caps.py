"""Sizes a command or library call takes are bounded before anything is allocated.

* ``scx bench-serve --tiles`` and ``scx serve --batch-rows``: a tile pads to its height with zero rows
  (``forward.block_rows``), so ``--tiles 1000000000`` ran out of memory. A server's batch holds one row per
  session and at most ``--max-batch`` rows: ``--batch-rows`` is refused past min(--max-batch,
  --max-sessions) (exit 2), ``--tiles`` past that bound of a default server (64).
* ``zoo.perplexity.ppl_run``: a huge ``tokens`` listed its windows (memory) before any size check; now
  refused past the corpus's bytes (a tokenizer makes at most one token per byte) before any window.
* ``scx serve`` / ``scx bench-serve`` ``--help``: the description read as plain text, not reST markup.
* gRPC's message-size cap (a C int) has one home that ``ServeOptions``, ``RemoteTransport`` and
  ``scx serve`` check; ``scx bench --threads`` past torch's bound is a usage error.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from scx_ref.cli import build_parser, main
from scx_ref.commands import serve as serve_cmd
from scx_ref.errors import ConfigError
from scx_ref.service.service import ServeOptions

NO_NET = ["--port", "0", "--ops-port", "-1"]


class _Loaded(Exception):
    """Raised by a stand-in model loader: the command got past its checks."""


def _no_model(*_a: Any, **_k: Any) -> Any:
    raise _Loaded


def test_bench_serve_tiles_past_the_bound_are_refused_when_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["bench-serve", "--model", "tiny-llama", "--tiles", "1,1000000000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tiles: must be <= 64, got 1000000000" in err
    assert parser.parse_args(["bench-serve", "--tiles", "1,64"]).tiles == [1, 64]  # the bound itself: taken


def test_serve_batch_rows_past_its_batches_is_refused_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serve_cmd, "build_backend", _no_model)
    argv = ["serve", "--model", "random:tiny-dense", *NO_NET]
    assert main([*argv, "--batch-rows", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "scx serve: error: argument --batch-rows: must be <= 64 (--max-batch 64, --max-sessions"
    )
    assert main([*argv, "--batch-rows", "8", "--max-sessions", "4"]) == 2
    assert "must be <= 4 " in capsys.readouterr().err
    assert main([*argv, "--batch-rows", "8", "--max-batch", "5"]) == 2
    assert "must be <= 5 " in capsys.readouterr().err
    with pytest.raises(_Loaded):  # at the bound: past the checks, to the model
        main([*argv, "--batch-rows", "4", "--max-sessions", "4"])


def test_check_batch_rows_bound_is_the_smaller_of_max_batch_and_max_sessions() -> None:
    ns = argparse.Namespace(batch_rows=7, max_batch=7, max_sessions=9)
    serve_cmd.check_batch_rows(ns)
    for batch, sessions in ((6, 9), (9, 6)):
        ns = argparse.Namespace(batch_rows=7, max_batch=batch, max_sessions=sessions)
        with pytest.raises(ConfigError, match=r"must be <= 6 .* got 7$"):
            serve_cmd.check_batch_rows(ns)


def test_serve_default_batch_rows_is_lowered_to_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-sessions 1`` (or ``--max-batch 1``) alone still starts: the default tile (2) is lowered to
    the bound, never refused; a given ``--batch-rows`` is taken as given."""
    ns = argparse.Namespace(batch_rows=None, max_batch=64, max_sessions=1)
    assert serve_cmd.check_batch_rows(ns) == 1
    ns = argparse.Namespace(batch_rows=None, max_batch=64, max_sessions=256)
    assert serve_cmd.check_batch_rows(ns) == 2
    seen: list[int] = []

    class Stop(Exception):
        pass

    class Options(ServeOptions):
        def __post_init__(self) -> None:  # the options the server would run on: recorded, then stop
            seen.append(self.batch_rows)
            raise Stop

    parser = build_parser()  # before the patch: the parser builds a ServeOptions for its defaults
    monkeypatch.setattr(serve_cmd, "ServeOptions", Options)
    for extra in (["--max-batch", "1"], ["--batch-rows", "3"], []):
        with pytest.raises(Stop):
            serve_cmd.run(parser.parse_args(["serve", "--model", "random:tiny-dense", *NO_NET, *extra]))
    assert seen == [1, 3, 2]


def test_bench_serve_refuses_serve_args_batch_rows_past_the_bound(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serve_cmd, "build_backend", _no_model)
    argv = ["bench-serve", "--model", "tiny-llama", "--skip-load", "--tiles", "", "--no-progress"]
    assert main([*argv, "--serve-args", "--batch-rows 100"]) == 2
    err = capsys.readouterr().err
    assert "scx bench-serve: error: --serve-args: argument --batch-rows: must be <= 64" in err


def test_help_states_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    for command, words in (("serve", "(64 with their defaults)"), ("bench-serve", "each at most 64")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert words in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("command", "start"),
    [
        ("serve", "scx serve: load a model once"),
        ("bench-serve", "scx bench-serve: SCX over the network (an scx serve on loopback) against"),
    ],
)
def test_help_description_is_plain_text(command: str, start: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())
    assert description.startswith(start)
    for markup in ("``", ":mod:", ":class:", ":func:", "**"):
        assert markup not in description


def test_plain_description_unmarks_roles_literals_and_strong_text() -> None:
    from scx_ref.commands._args import plain_description

    doc = "``scx x``: see :mod:`a.b` and :class:`~a.b.C`, **one** ``y``.\n\nnot this"
    assert plain_description(doc) == "scx x: see a.b and C, one y."
    assert plain_description(None) is None


def test_ppl_run_refuses_tokens_past_the_corpus_before_listing_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scx_ref.zoo import perplexity
    from scx_ref.zoo.corpus import corpus_text

    def no_windows(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the windows were listed before the size check")

    monkeypatch.setattr(perplexity, "windows", no_windows)
    monkeypatch.setattr(perplexity, "load_model", _no_model)
    most = len(corpus_text().encode("utf-8"))
    for tokens in (most + 1, 10**12):
        with pytest.raises(ConfigError, match=f"number of tokens {tokens} is more than the corpus holds"):
            perplexity.ppl_run("tiny-llama", tokens=tokens, window=2)
    with pytest.raises(ConfigError, match="the number of tokens must be an integer"):
        perplexity.ppl_run("tiny-llama", tokens=2.5, window=2)  # type: ignore[arg-type]
    with pytest.raises(_Loaded):  # the corpus's byte count itself: past the checks, to the model
        perplexity.ppl_run("tiny-llama", tokens=most, window=2)


def test_the_grpc_message_cap_has_one_home_and_both_ends_check_it() -> None:
    """gRPC's size options are C ints: ServeOptions and RemoteTransport refuse a max_message_bytes past
    codec.MAX_MESSAGE_BYTES (a server failed to start with OverflowError), and scx serve's MiB cap is it."""
    pytest.importorskip("grpc")
    from scx_ref.commands.serve import MAX_MESSAGE_MB
    from scx_ref.errors import ConfigError
    from scx_ref.service import RemoteTransport
    from scx_ref.service.codec import MAX_MESSAGE_BYTES, grpc_options
    from scx_ref.service.service import ServeOptions

    assert max(v for _, v in grpc_options(MAX_MESSAGE_BYTES)) == 2**31 - 1
    assert MAX_MESSAGE_MB == 2047
    assert ServeOptions(max_message_bytes=MAX_MESSAGE_BYTES).max_message_bytes == MAX_MESSAGE_BYTES
    for bad in (MAX_MESSAGE_BYTES + 1, 0, True, 2.0):
        with pytest.raises(ConfigError, match="max_message_bytes"):
            ServeOptions(max_message_bytes=bad)
        with pytest.raises(ConfigError, match="max_message_bytes"):
            RemoteTransport("scx://127.0.0.1:9", max_message_bytes=bad)


def test_scx_bench_threads_past_the_cap_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``scx bench --threads 100000000000`` gave torch's 'Overflow when unpacking long' traceback."""
    from scx_ref.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--threads", "100000000000"])
    assert info.value.code == 2 and "--threads: must be <= 1024" in capsys.readouterr().err

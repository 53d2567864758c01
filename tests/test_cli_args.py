"""Bad command-line input (issue 12): every subcommand rejects it with an error message and exit status 2
— never a traceback, never a silently changed or ignored value — before any long work starts."""

from __future__ import annotations

import pytest

from scx_ref.cli import main

CASES: list[tuple[str, str]] = [
    # scx dp
    ("dp --sensitivity 1 --scale 2 --compositions 1e12", "compositions"),
    ("dp --sensitivity 1 --scale 2 --compositions 1000000000000", "compositions"),
    ("dp --sensitivity 1 --scale 2 --compositions 0", "compositions"),
    ("dp --sensitivity 1 --scale 5 --pld-interval 1e-9", "interval"),
    ("dp --sensitivity 1 --scale 5 --pld-interval 0", "pld-interval"),
    ("dp --sensitivity 1 --scale 2 --json /nonexistent/x.json", "json"),
    ("dp --model tiny-llama --device tpu", "device"),
    ("dp --sensitivity nan --scale 2", "sensitivity"),
    ("dp --sensitivity 1 --scale inf", "scale"),
    ("dp --per-coordinate 1 --dim -3", "dim"),
    ("dp --model tiny-llama --guard 0", "guard"),
    ("dp --model tiny-llama --tokens -1", "tokens"),
    ("dp --model tiny-llama --prompt-len 2.5", "prompt-len"),
    # scx bench
    ("bench --n -1", "--n"),
    ("bench --n abc", "--n"),
    ("bench --n 128,,512", "--n"),
    ("bench --threads -2", "threads"),
    ("bench --threads 0", "threads"),
    ("bench --gen-prompt 0", "gen-prompt"),
    ("bench --gen-tokens -1", "gen-tokens"),
    ("bench --repeats 0", "repeats"),
    ("bench --device tpu", "device"),
    ("bench --levels permute,bogus", "bogus"),
    ("bench --json /nonexistent/b.json", "json"),
    ("bench --dtype bogus", "dtype"),  # was: SmolLM2 loaded, then a misleading "weights unavailable" notice
    # scx attack
    ("attack --prompts 0", "prompts"),
    ("attack --length -1", "length"),
    ("attack --new -1", "new"),
    ("attack --threads 0", "threads"),
    ("attack --json /nonexistent/a.json", "json"),
    ("attack --plots /etc/hostname/plots", "plots"),  # under a file (root may write anywhere else)
    # scx verify, scx ppl
    ("verify --beta -1", "beta"),
    ("verify --tokens 0", "tokens"),
    ("verify --json /", "json"),
    ("verify --device tpu", "device"),
    ("verify --model tiny-llama --level permute --beta 3", "beta"),  # nothing to noise: it would be ignored
    ("verify --dtype float64 --device cuda", "device"),  # float64 runs on the CPU, on any machine
    ("ppl --device cuda:x", "device"),
    # device strings torch refuses, refused here before any model loads (torch raised after loading)
    ("verify --device cuda:", "device"),
    ("ppl --device cuda:01", "device"),
    ("verify --device cpu:0", "device"),
    ("generate --model tiny-llama --prompt-ids 1,2 --device cuda:\u00b2", "device"),
    ("ppl --dtype float64 --device cuda:0", "device"),
    ("ppl --beta nan", "beta"),
    ("ppl --window 1", "window"),
    ("ppl --tokens abc", "tokens"),
    # scx serve: refused before any model is loaded or port bound (never a silently changed port)
    ("serve --model random:tiny-dense --threads -2", "threads"),
    ("serve --model random:tiny-dense --port 99999", "port"),
    ("serve --model random:tiny-dense --port -5", "port"),
    ("serve --model random:tiny-dense --ops-port -5", "ops-port"),
    ("serve --model random:tiny-dense --grace nan", "grace"),
    ("serve --model random:tiny-dense --idle-timeout 0", "idle-timeout"),
    ("serve --model random:tiny-dense --device tpu", "device"),
    ("serve --model random:tiny-dense --dtype bogus", "dtype"),
    ("serve --model random:tiny-dense --workers 0", "workers"),
    ("serve --model random:tiny-dense --max-cache-mb 0", "max-cache-mb"),
    ("serve --model random:tiny-dense --tls-cert /nonexistent/c.pem --tls-key /nonexistent/k.pem", "tls"),
    # scx generate: before the model is loaded; options greedy decoding or no server would ignore
    ("generate --model tiny-llama --prompt-ids 1,2 --max-new-tokens -1", "max-new-tokens"),
    ("generate --model tiny-llama --prompt-ids 1,x", "prompt-ids"),
    ("generate --model tiny-llama --prompt-ids 1,2 --do-sample --temperature nan", "temperature"),
    ("generate --model tiny-llama --prompt-ids 1,2 --do-sample --top-p 2", "top-p"),
    ("generate --model tiny-llama --prompt-ids 1,2 --do-sample --top-k -1", "top-k"),
    ("generate --model tiny-llama --prompt-ids 1,2 --do-sample --seed -1", "seed"),
    ("generate --model tiny-llama --prompt-ids 1,2 --temperature 0.5", "temperature"),
    ("generate --model tiny-llama --prompt-ids 1,2 --timeout 5", "timeout"),
    ("generate --model tiny-llama --prompt-ids 1,2 --dtype bogus", "dtype"),
    ("generate --model tiny-llama --prompt-ids 1,2 --device tpu", "device"),
    ("generate --model tiny-llama --prompt-ids 1,2 --stop=", "stop"),
    # what depends on the model: after it loads, before any request, naming the options
    ("generate --model tiny-llama --prompt-ids 1,2,99999", "prompt-ids"),
    ("generate --model tiny-llama --prompt-ids 1,2 --max-new-tokens 100000", "max-new-tokens"),
    ("generate --model tiny-llama --prompt-ids 1,2 --stop x", "stop"),  # no tokenizer to match it with
    ("generate --model tiny-llama --prompt-ids 1,2 --server scx://127.0.0.1:1 --timeout -1", "timeout"),
    (
        "generate --model tiny-llama --prompt-ids 1,2 --server scxs://127.0.0.1:1 --tls-ca /nonexistent/ca",
        "tls",
    ),
    # scx bench-serve
    ("bench-serve --threads -2", "threads"),
    ("bench-serve --n -1", "--n"),
    ("bench-serve --clients 0", "clients"),
    ("bench-serve --clients 1,,4", "clients"),
    ("bench-serve --tiles 0", "tiles"),
    ("bench-serve --timeout -1", "timeout"),
    ("bench-serve --json /nonexistent/x.json", "json"),
    ("bench-serve --dtype bogus", "dtype"),
]


@pytest.mark.parametrize(("argv", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_exit_2_with_a_message(
    argv: str, names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv.split())
    except SystemExit as exc:  # argparse's own usage error
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, f"{argv}: exit {code}"
    assert "error:" in err and "Traceback" not in err, err
    assert names.lstrip("-").split("-")[0] in err or "interval" in err, err


def test_a_good_quick_command_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Control: the parsers accept valid values (so the refusals above are about the values)."""
    assert main(["dp", "--sensitivity", "1", "--scale", "2", "--compositions", "3", "--no-pld"]) == 0
    assert "basic (k=3)" in capsys.readouterr().out


def test_serve_options_refuse_what_the_cli_refuses() -> None:
    """ServeOptions (the Python face of `scx serve`) checks the same values: a port outside [0, 65535], a
    non-finite or non-positive time. Control: the defaults and port 0 (any free port) are accepted."""
    pytest.importorskip("grpc")
    from scx_ref.errors import ConfigError
    from scx_ref.service.service import ServeOptions

    ServeOptions()
    ServeOptions(port=0, ops_port=None)
    for bad in (
        dict(port=99999),
        dict(port=-5),
        dict(ops_port=-1),
        dict(port=True),
        dict(grace=float("nan")),
        dict(idle_timeout=float("inf")),
        dict(grace=0),
    ):
        with pytest.raises(ConfigError):
            ServeOptions(**bad)


@pytest.mark.parametrize(
    "text", ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:00", "cuda:01", "cuda:", "cpu:0", "cuda:\u00b2"]
)
def test_a_device_passes_only_as_torch_reads_it(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device`` takes a string exactly when torch reads it as that device and writes it back the same
    (``str(torch.device(text)) == text``) — the CPU without an index, which the commands compare with
    ``"cpu"`` — and on a machine with two GPUs (torch.cuda mocked) the run-time
    check agrees: what the parser refuses, it refuses too (ConfigError, not torch's RuntimeError after the
    model loads). Control: ``cuda:1`` passes both, ``cuda:2`` only the parser."""
    import argparse

    import torch

    from scx_ref.commands._args import device, require_device
    from scx_ref.errors import ConfigError

    try:
        torch_reads = str(torch.device(text)) == text and text != "cpu:0"
    except RuntimeError:
        torch_reads = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if torch_reads:
        assert device(text) == text
        require_device(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="unsupported device"):
            device(text)
        with pytest.raises(ConfigError, match="unsupported device"):
            require_device(text)
    assert device("cuda:2") == "cuda:2"
    with pytest.raises(ConfigError, match="no such CUDA device"):
        require_device("cuda:2")


@pytest.mark.parametrize(
    "command", ["verify", "ppl", "bench", "bench-serve", "serve", "generate", "dp", "attack"]
)
def test_an_unknown_option_is_reported_by_its_subcommand(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scx <command> --bogus``: exit 2 with ``scx <command>: error: unrecognized arguments`` (the top-level
    parser used to report it as ``scx: error:`` with the top-level usage)."""
    required = {"serve": ["--model", "tiny-llama"], "generate": ["--prompt-ids", "1"]}.get(command, [])
    with pytest.raises(SystemExit) as exc:
        main([command, *required, "--bogus-option", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"scx {command}: error: unrecognized arguments: --bogus-option 1" in err, err
    assert f"usage: scx {command}" in err, err

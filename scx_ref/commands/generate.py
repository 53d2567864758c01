"""``scx generate``: SCX text generation from a prompt, against an ``scx serve`` (``--server URL``) or an
in-process server, printing the decoded tokens as they come.

The client (this command) holds the keys and the model's client-side weights and tokenizer (SmolLM2's
comes with its GGUF); the server sees only encoded rows. Greedy by default; ``--do-sample`` with
``--temperature``, ``--top-k``, ``--top-p``, ``--repetition-penalty`` and ``--seed`` samples with
transformers' logits processors on the client's logits. If the server fails mid-generation the tokens
made so far stay printed and the error says how many there were (exit 2); a failure before the first new
token (the server unreachable, the session or the prompt's prefill refused) says it came before any.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..errors import ConfigError, SCXError
from ..zoo import MODEL_NAMES
from ..zoo.engines import ENGINE_DTYPES
from ._args import (
    MAX_SEED,
    MAX_TIMEOUT_S,
    add_level,
    device,
    float_at_least,
    input_file,
    int_at_least,
    int_list,
    nonempty,
    plain_description,
    require_device,
)

__all__ = ["check_tls_ca", "register", "run"]


_SAMPLING = "sampling only (needs --do-sample)"
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed")
_REMOTE_ONLY = ("timeout", "connect_timeout", "tls_ca")
#: The largest id ``--prompt-ids`` takes: the prompt is an int64 array (an id past the model's vocabulary is
#: refused once the model is loaded; past int64 it was a raw OverflowError)
_MAX_ID = int(np.iinfo(np.int64).max)


def register(subparsers: Any) -> None:
    """Add ``scx generate`` to the CLI."""
    p = subparsers.add_parser(
        "generate",
        help="generate text with SCX (against `scx serve --model …` with --server, or in-process)",
        description=plain_description(__doc__),
    )
    p.add_argument(
        "--model", choices=MODEL_NAMES, default="smollm2", help="model (the server's; default smollm2)"
    )
    p.add_argument("--server", default=None, help="scx://HOST:PORT or scxs://HOST:PORT (default: in-process)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text (needs the model's tokenizer)")
    src.add_argument(
        "--prompt-ids",
        type=int_list(0, _MAX_ID),
        help="comma-separated token ids (models without a tokenizer)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int_at_least(0),
        default=32,
        help="new tokens, >= 0 (default 32; fewer when EOS or a --stop string comes first)",
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature",
        type=float_at_least(0, strict=True),
        default=None,
        help="> 0 (default: the model's generation config, else 1); " + _SAMPLING,
    )
    p.add_argument(
        "--top-k",
        type=int_at_least(0),
        default=None,
        help=">= 0, 0 keeps every token (default: the model's generation config, else 50); " + _SAMPLING,
    )
    p.add_argument(
        "--top-p",
        type=float_at_least(0, maximum=1),
        default=None,
        help="in [0, 1] (default: the model's generation config, else 1); " + _SAMPLING,
    )
    p.add_argument(
        "--repetition-penalty",
        type=float_at_least(0, strict=True),
        default=None,
        help="Hugging Face's repetition penalty: a token already in the sequence has a positive score "
        "divided by it, a negative one multiplied (> 0; default: the model's generation config, else 1)",
    )
    p.add_argument(
        "--seed",
        type=int_at_least(0, MAX_SEED),
        default=None,
        help="sampling seed (default: fresh entropy); " + _SAMPLING,
    )
    p.add_argument(
        "--stop", action="append", type=nonempty, default=None, help="stop string, not empty (repeatable)"
    )
    p.add_argument("--no-eos", action="store_true", help="do not stop at the model's EOS token")
    add_level(p)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=ENGINE_DTYPES,
        help="float32 (default) or float64: SCX's dtype here and in an in-process server; with --server, "
        "the server's --dtype",
    )
    p.add_argument(
        "--device",
        type=device,
        default="cpu",
        help="cpu (default), cuda or cuda:N: where the client's torch backend and an in-process server run",
    )
    p.add_argument(
        "--timeout",
        type=float_at_least(0, strict=True, maximum=MAX_TIMEOUT_S),
        default=None,
        help=f"seconds to wait for each reply (default 120, at most {MAX_TIMEOUT_S:g}; with --server)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float_at_least(0, strict=True, maximum=MAX_TIMEOUT_S),
        default=None,
        help=f"seconds to reach the server (default 10, at most {MAX_TIMEOUT_S:g}; with --server)",
    )
    p.add_argument(
        "--tls-ca",
        type=input_file,
        default=None,
        help="PEM of the CA that signed the server's certificate (with an scxs:// --server)",
    )
    p.set_defaults(func=run, parser=p)


def check_tls_ca(path: str) -> None:
    """ConfigError (one line, naming ``--tls-ca``) unless ``path`` holds at least one PEM certificate that
    parses — what the client's TLS channel needs as its root certificates. Checked before the model loads:
    the connection reads the file only when the first session opens."""
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--tls-ca {path}: not a PEM file of CA certificates ({exc.reason or exc})"
        ) from None


class _Printer:
    """A streamer printing new tokens as they come: decoded text (with a tokenizer) or ids. A write to a
    closed standard output raises BrokenPipeError (which stops the generation) once: nothing more is written
    after it, not even :meth:`end`'s newline."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0
        self.prompt = True
        self.broken = False

    def _write(self, text: str) -> None:
        if self.broken:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            self.broken = True
            raise

    def put(self, value: Any) -> None:
        if self.prompt:  # the first call carries the prompt
            self.prompt = False
            return
        self.ids.extend(int(v) for v in np.asarray(value).reshape(-1))
        if self.tokenizer is None:
            shown, self.shown = self.shown, len(self.ids)
            self._write(" ".join(str(t) for t in self.ids[shown:]) + " ")
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
                shown, self.shown = self.shown, len(text)
                self._write(text[shown:])

    def end(self) -> None:
        self._write("\n")


def run(args: argparse.Namespace) -> int:
    """Load the client side of the model, generate, print as tokens come."""
    from ..hf import SCXModel, config_from_hf
    from ..service.remote import parse_url
    from ..zoo import load_hf
    from ..zoo.corpus import public_unigram

    sampling = [f"--{n.replace('_', '-')}" for n in _SAMPLING_ONLY if getattr(args, n) is not None]
    if sampling and not args.do_sample:  # greedy decoding would ignore them: refused, never ignored
        args.parser.error(f"{', '.join(sampling)}: sampling options, given without --do-sample")
    remote = [f"--{n.replace('_', '-')}" for n in _REMOTE_ONLY if getattr(args, n) is not None]
    if remote and args.server is None:  # the in-process server would ignore them
        args.parser.error(f"{', '.join(remote)}: options of a remote server, given without --server")
    if args.server is not None:  # before the model is loaded
        tls = parse_url(args.server)[2]
        if args.tls_ca is not None and not tls:  # a plaintext connection would ignore it
            args.parser.error(f"--tls-ca: {args.server} is not a TLS server (scxs://HOST:PORT)")
        if args.tls_ca is not None:
            check_tls_ca(str(args.tls_ca))
    require_device(args.device)  # before the model is loaded
    model, tokenizer = load_hf(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise ConfigError(f"model {args.model!r} has no tokenizer: pass --prompt-ids")
        ids = np.asarray(tokenizer(args.prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)
    else:
        ids = np.array(args.prompt_ids, dtype=np.int64)
    server_options = None
    if args.server is not None:
        server_options = {
            "timeout": 120.0 if args.timeout is None else args.timeout,
            "connect_timeout": 10.0 if args.connect_timeout is None else args.connect_timeout,
            "tls_ca": None if args.tls_ca is None else str(args.tls_ca),
        }
    scx = SCXModel.from_hf(
        model,
        level=args.level,
        dtype=args.dtype,
        device=args.device,
        server=args.server,
        server_options=server_options,
        unigram=public_unigram(tokenizer, config_from_hf(model.config).vocab_size),  # DESIGN §5.1
    )
    options: dict[str, Any] = {"do_sample": args.do_sample, "streamer": _Printer(tokenizer)}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.stop:
        if tokenizer is None:
            args.parser.error(f"--stop: model {args.model!r} has no tokenizer to match stop strings with")
        options["stop_strings"] = args.stop
        options["tokenizer"] = tokenizer
    if args.no_eos:
        options["eos_token_id"] = None
    try:  # what depends on the model, checked once it is loaded and before any request
        scx.check_prompt(ids, args.max_new_tokens)
    except SCXError as exc:
        option = "--prompt-ids" if args.prompt_ids is not None else "--prompt"
        args.parser.error(f"{option} / --max-new-tokens: {exc}")
    try:
        scx.generate(ids, max_new_tokens=args.max_new_tokens, **options)  # a closed pipe: cli.main reports it
    except SCXError as exc:  # the tokens made so far are printed already; say how many
        made = len(exc.tokens or [])
        if not made:  # a setup failure (options, the session, the server, the prompt's prefill): none ran
            raise type(exc)(f"generation failed before its first new token: {exc}") from exc
        raise type(exc)(f"generation stopped after {made} new token(s): {exc}") from exc
    finally:
        if scx.link is not None and hasattr(scx.link, "close"):
            scx.link.close()
    return 0

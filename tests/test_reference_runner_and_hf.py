"""The numpy reference forward, the plaintext runner, the Hugging Face conversion and the request
planning (reference.py, forward.py, hf.py, protocol/plan.py, protocol/prepare.py): bad input gives a
project error and leaves state as it was, a failed generation frees its server session, and the reference
agrees with Hugging Face's own KV-cached decode on configurations ``tests/test_reference.py`` does not
cover (head_dim ≠ d/H, Qwen2 with GQA, Mixtral with top_k = n_experts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.config import ModelConfig
from scx_ref.errors import ConfigError, DTypeError, ProtocolError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, SCXConfig
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.protocol.plan import ReleasePlan
from scx_ref.protocol.prepare import PreparedKeys
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import random_weights
from tests.tiny import tiny_config, tiny_weights

BAD_COUNTS: list[Any] = [1.5, "2", True, -1, None]


def _keys() -> KeySchedule:
    return KeySchedule(b"\x05" * 32, b"\x09" * 16)


# --- the numpy reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["<U8", np.int64, object])
def test_reference_refuses_a_cache_of_non_floats_and_leaves_it(dtype: Any) -> None:
    """A cache whose keys and values are not floating-point is a ProtocolError (a string cache raised a
    raw TypeError from einsum; an integer one was silently promoted), and the cache is left as it was."""
    model = ReferenceModel(tiny_weights(0))
    _, cache = model.prefill([1, 2, 3])
    cache.keys[1] = cache.keys[1].astype(dtype)
    cache.values[1] = cache.values[1].astype(dtype)
    before = cache.copy()
    with pytest.raises(ProtocolError, match="floating-point"):
        model.decode(4, cache)
    assert [k.shape for k in cache.keys] == [k.shape for k in before.keys]
    assert all(np.array_equal(a, b) for a, b in zip(cache.keys, before.keys, strict=True))


# --- the plaintext runner over a backend ---------------------------------------------------------------


def test_plain_runner_failing_midway_leaves_its_cache() -> None:
    """A forward that raises in block 2 (here its trace; a backend error alike) leaves every block's cache
    as it was: before, blocks 0-1 were extended and 2-3 not, and the next decode silently ran on that
    cache (wrong positions, wrong logits)."""
    w = tiny_weights(1)
    failing = {"on": False}

    def trace(stage: Stage, layer: int, x: Any) -> None:
        if failing["on"] and layer == 2:
            raise RuntimeError("trace failed")

    runner = PlainRunner(NumpyBackend(w), trace=trace)
    runner.prefill([3, 1, 4])
    rows = [NumpyBackend(w).nrows(k) for k, _ in runner.cache]
    failing["on"] = True
    with pytest.raises(RuntimeError, match="trace failed"):
        runner.decode(5)
    assert [runner.b.nrows(k) for k, _ in runner.cache] == rows == [3] * w.config.n_layers
    failing["on"] = False
    want = PlainRunner(NumpyBackend(w))
    want.prefill([3, 1, 4])
    np.testing.assert_array_equal(runner.decode(5), want.decode(5))


@pytest.mark.parametrize("n_new", BAD_COUNTS)
def test_plain_runner_generate_refuses_a_bad_count(n_new: Any) -> None:
    """n_new that is not an integer >= 0 is a ConfigError before anything runs (a float or a string
    raised a raw TypeError from range(), -1 returned [] after a prefill), as ReferenceModel.generate."""
    runner = PlainRunner(NumpyBackend(tiny_weights(2)))
    runner.prefill([1, 2])
    with pytest.raises(ConfigError, match="n_new"):
        runner.generate([7, 8, 9], n_new)
    assert runner.length == 2  # the earlier prompt's cache: nothing ran


# --- Hugging Face conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["a model", None, 3])
def test_weights_from_hf_refuses_what_is_not_a_model(model: Any) -> None:
    pytest.importorskip("transformers")
    from scx_ref.hf import weights_from_hf

    with pytest.raises(ConfigError, match="unsupported model"):
        weights_from_hf(model)  # raised AttributeError: no .config


@pytest.mark.parametrize("dtype", ["bogus", np.int32, "int8"])
def test_weights_from_hf_refuses_a_dtype_that_is_not_floating(dtype: Any) -> None:
    pytest.importorskip("transformers")
    from scx_ref.hf import weights_from_hf
    from tests.test_hf import tiny_model

    with pytest.raises(DTypeError, match="floating"):
        weights_from_hf(tiny_model("llama", "eager"), dtype)  # "bogus" raised a raw TypeError


@pytest.mark.parametrize("count", ["3", 1.5, -1, True])
def test_check_prompt_refuses_a_bad_max_new_tokens(count: Any) -> None:
    pytest.importorskip("transformers")
    from scx_ref.hf import SCXModel
    from tests.test_hf import tiny_model

    scx = SCXModel.from_hf(tiny_model("llama", "eager"), level="paper", keys=_keys())
    with pytest.raises(ConfigError, match="max_new_tokens"):
        scx.check_prompt([5, 6, 7], count)  # "3" raised TypeError; -1 and 1.5 passed silently


def test_a_generation_that_fails_midway_closes_its_server_session() -> None:
    """A row whose generation raises outside the protocol (here its streamer) closes its session: the
    server held it (on an ``scx serve``, until its idle timeout, counting against its session limit)."""
    pytest.importorskip("transformers")
    import torch

    from scx_ref.hf import SCXModel
    from scx_ref.protocol import LocalTransport, Server
    from tests.test_hf import tiny_model

    scx = SCXModel.from_hf(tiny_model("llama", "eager", seed=1), level="paper", keys=_keys())
    server = Server(scx.backend)
    scx.link = LocalTransport(server)

    class Streamer:
        def __init__(self) -> None:
            self.puts = 0

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 3:  # the prompt, the first token, then fail
                raise RuntimeError("streamer failed")

        def end(self) -> None:
            pass

    prompt = torch.tensor([[5, 17, 3, 88]])
    with pytest.raises(RuntimeError, match="streamer failed"):
        scx.generate(prompt, max_new_tokens=5, eos_token_id=None, streamer=Streamer())
    assert server.sessions == {}
    scx.generate(prompt, max_new_tokens=2, eos_token_id=None)
    assert server.sessions == {}


HF_DECODE_CASES = {
    "llama_head_dim_6_of_width_16": (
        "llama",
        ModelConfig(
            vocab_size=24,
            hidden_size=16,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=6,
            intermediate_size=20,
            rms_eps=1e-6,
            rope_theta=10000.0,
            max_positions=64,
        ),
    ),
    "qwen2_bias_gqa4": (
        "qwen2",
        ModelConfig(
            vocab_size=24,
            hidden_size=16,
            n_layers=2,
            n_heads=4,
            n_kv_heads=1,
            head_dim=4,
            intermediate_size=20,
            rms_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
            max_positions=64,
        ),
    ),
    "mixtral_top_k_all_experts": (
        "mixtral",
        ModelConfig(
            vocab_size=24,
            hidden_size=16,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=4,
            intermediate_size=20,
            rms_eps=1e-5,
            rope_theta=10000.0,
            n_experts=3,
            top_k=3,
            max_positions=64,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(HF_DECODE_CASES))
def test_reference_decode_matches_hugging_face_kv_cache(case: str) -> None:
    """Prefill 9 tokens then decode 4 with the reference (positions from its cache) equals HF's forward
    with its own DynamicCache, row for row, to test_reference's HF_TOL; config_from_hf and weights_from_hf
    read the same model back (same config, same reference logits)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import DynamicCache

    from scx_ref.hf import config_from_hf, weights_from_hf
    from tests.test_reference import HF_TOL, _copy_weights, _hf_model

    kind, cfg = HF_DECODE_CASES[case]
    weights = random_weights(cfg, np.random.default_rng(sum(map(ord, case))))
    model = _hf_model(kind, cfg)
    _copy_weights(model, weights)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=13)
    ref = ReferenceModel(weights)
    logits, cache = ref.prefill(ids[:9])
    got = np.concatenate([logits, np.stack([ref.decode(int(t), cache) for t in ids[9:]])])
    hf_cache = DynamicCache(config=model.config)
    rows = []
    with torch.no_grad():
        for part in [ids[:9], *([t] for t in ids[9:])]:
            out = model(input_ids=torch.tensor(np.asarray(part, dtype=np.int64))[None, :], cache=hf_cache)
            rows.append(out.logits[0].numpy())
    want = np.concatenate(rows)
    scale = max(1.0, float(np.abs(got).max()))
    delta = float(np.abs(got - want).max())
    assert delta <= HF_TOL * scale, f"{case}: max |Δlogit| = {delta:.3g} (scale {scale:.3g})"
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    back = config_from_hf(model.config)
    assert back == ModelConfig(**{**cfg.to_dict(), "name": back.name})
    np.testing.assert_allclose(
        ReferenceModel(weights_from_hf(model)).prefill(ids)[0], ref.prefill(ids)[0], rtol=1e-12, atol=1e-12
    )


# --- request planning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, -1, 1.5, True, "3"])
def test_a_generation_release_label_refuses_a_bad_step(step: Any) -> None:
    """Release.label of a generation release needs an integer step >= 0: None and -1 raised a bare
    ValueError, "3" a TypeError, and 1.5 / True made a label ("gen", 1.5) instead of an error."""
    plan = ReleasePlan.of(SCXConfig(level="blind"), tiny_config())
    release = plan.generation[0]
    with pytest.raises(ProtocolError, match="step"):
        release.label(step)
    assert release.label(np.int64(3)) == release.label(3)


def test_a_plan_needs_a_model_with_every_plan_field() -> None:
    """A model with n_layers but no is_moe / n_experts is a ConfigError (was an AttributeError from
    deep inside the plan), at every level."""

    class Layers:
        n_layers = 4

    for level in ("permute", "paper", "blind"):
        with pytest.raises(ConfigError, match="is_moe"):
            ReleasePlan.of(SCXConfig(level=level), Layers())  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 7, 2.0, True, "3"])
def test_prepared_keys_bind_refuses_a_bad_length_and_keeps_its_keys(n: Any) -> None:
    """bind(n) takes an integer 1 <= n <= the derived length (ProtocolError otherwise: was a bare
    ValueError, a TypeError for a string, and 2.0 / True were taken); the keys are kept."""
    w = tiny_weights(3)
    b = NumpyBackend(w)
    cfg = SCXConfig()
    client = Client(b, _keys(), cfg)
    prep = PreparedKeys(
        RequestKeys(_keys().for_nonce(b"\x01" * 16), w.config), b, cfg, client.plan, client.decoys, 6
    )
    prep.fill()
    perm = prep.token_perm(0).forward.copy()
    with pytest.raises(ProtocolError, match="n must"):
        prep.bind(n)
    assert prep.n == 6 and np.array_equal(prep.token_perm(0).forward, perm)
    prep.bind(np.int64(4))
    assert prep.n == 4 and len(prep.token_perm(0).forward) == 4 + cfg.r1

"""The float64 ("wide") blinded path as the default of float32 runs (stop 70: F32_BETA_LIMIT 5 -> 1, so
``blind_dtype="auto"`` blinds every preset with noise in float64 at β = 5 on a float32 backend).

On tests/tiny.py's models, numpy and torch float32 backends:

* every preset with noise runs wide: each blinded message (and only those) travels in float64 flagged
  ``wide``, while everything the client returns or keeps comes back float32 — the logits of prefill and
  generation, the guard caches, the generated tokens (Python ints) — and equals plaintext float32 inference
  (greedy identical; the logits within float32's own rounding, several times closer than float32 blinding
  at β = 5 gets), with or without a mask pool, filled at once or in the background, also while requests run;
* a mask pool's entries hold float64 masks and the pool counts their bytes (8 per entry), which is what
  ``scx bench --pool`` reports; a pool of a bfloat16/float16 run that blinds in its own dtype counts 2 bytes
  per entry, not the 4 of its wire dtype;
* every wide reply is checked: an honest server passes, ×1.001 on any blinded stage's reply is an
  IntegrityError, and a failed request spends its own pool entry only (the next one serves the next
  request, exactly); the session's close then sends nothing;
* the cost report counts a blinded message's 8 bytes per entry each way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import IntegrityError, PrecisionWarning, ProtocolError, SessionError
from scx_ref.forward import PlainRunner
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server, Stage
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.pool import MaskPool
from scx_ref.protocol.presets import preset, preset_names
from scx_ref.weights import ModelWeights

from .tiny import tiny_weights

torch = pytest.importorskip("torch")

from scx_ref.attacks.active import TamperingTransport  # noqa: E402  (after torch: it imports torch)
from scx_ref.backends.torch_backend import TorchBackend  # noqa: E402

MASTER = bytes([7]) * 32
IDS = np.array([1, 5, 9, 3, 7, 2, 11, 4])
NEW = 4  # decode steps after the prefill
NOISED = [name for name in preset_names() if name != "permute"]
#: float32 plaintext's own rounding: the wide path measured at most 6.5e-7 (relative to the largest
#: logit) over every preset, backend and pool mode here; float32 blinding at β = 5 is 1.7e-6 – 3.8e-6
EXACT = 2e-6


def _backend(kind: str, w: ModelWeights) -> Any:
    w32 = w.astype(np.float32)
    return NumpyBackend(w32, np.float32) if kind == "numpy" else TorchBackend(w32, torch.float32)


def _dtype(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


class _Spy(LocalTransport):
    """A LocalTransport that notes each request's (stage, layer, expert, wide, dtypes of its float arrays)."""

    def __init__(self, server: Server[Any]) -> None:
        super().__init__(server)
        self.seen: list[tuple[Stage, int, int | None, bool, set[str]]] = []

    def send(self, request: Request) -> Reply:
        experts = request.meta.get("experts")
        expert = int(experts[0]) if isinstance(experts, list) and experts else None
        floats = {_dtype(v) for v in request.arrays.values() if "float" in str(v.dtype)}
        wide = request.meta.get("wide", False) is True
        self.seen.append((request.stage, request.layer, expert, wide, floats))
        return super().send(request)


def _assert_wide_exactly_where_blinded(client: Client[Any], link: _Spy) -> None:
    """The session opens wide; each blinded message (a release of the plan, or a share carrying its noise)
    is float64 and flagged wide; every other message is float32 and not flagged."""
    blinded = 0
    assert link.seen[0][0] is Stage.OPEN and link.seen[0][3]
    for stage, layer, expert, wide, floats in link.seen[1:]:
        release = client.plan.find(stage, layer, expert) is not None
        if release or (stage is Stage.SHARE and floats):
            assert wide and floats == {"float64"}, (stage, layer, expert, wide, floats)
            blinded += 1
        else:
            assert not wide and floats <= {"float32"}, (stage, layer, expert, wide, floats)
    assert blinded > 0


def _plain(b: Any, ids: np.ndarray, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Plaintext float32 logits of the prefill and of ``steps`` greedy steps, and the greedy tokens."""
    runner = PlainRunner(b)
    logits = [np.asarray(b.to_numpy(runner.forward(ids)))]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1][-1])))
        logits.append(np.asarray(b.to_numpy(runner.forward(np.array([tokens[-1]])))))
    return logits, tokens


def test_auto_blinds_every_noised_preset_of_a_float32_run_in_float64() -> None:
    """β = 5 (every preset with noise): ``auto`` widens on float32, by name, numpy or torch dtype; the
    client of such a preset is wide, that of ``permute`` (no noise) is not."""
    b = _backend("numpy", tiny_weights(0))
    for name in preset_names():
        cfg = preset(name).config(4)
        for dtype in ("float32", np.float32, torch.float32):  # permute's β is unused: its client is not wide
            assert cfg.wide_blinding(dtype) or name not in NOISED, (name, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrecisionWarning)  # within the wide limit: nothing is said
            client = Client(b, KeySchedule(MASTER, bytes(16)), replace(cfg, max_length=16))
        assert client.wide == (name in NOISED)
        assert client.bb.numpy_dtype() == (np.float64 if name in NOISED else np.float32)


@pytest.mark.parametrize("pool", ["none", "pool", "background"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", NOISED)
def test_every_preset_is_exact_wide_and_returns_float32(name: str, kind: str, pool: str) -> None:
    """Prefill and NEW greedy steps of every noised preset equal plaintext float32 (greedy identical,
    logits within EXACT); blinded messages travel wide, and what the client returns or keeps is float32."""
    w = tiny_weights(0)
    b = _backend(kind, w)
    want, tokens = _plain(b, IDS, NEW)
    client = Client(b, KeySchedule(MASTER, bytes(16)), replace(preset(name).config(4), max_length=16))
    assert client.wide
    entry = None
    if pool != "none":
        mp = MaskPool(client, capacity=10, steps=NEW)
        mp.fill(1, background=pool == "background")
        mp.wait()
        entry = mp._entries[0]
        assert entry.remaining > 0 and {_dtype(x) for p in entry._blinding.values() for x in p} == {"float64"}
    link = _Spy(Server(b))
    got = [client.prefill(IDS, link)]
    st = client.state
    assert st is not None and (entry is None or st.prep is entry)
    got_tokens = []
    for _ in range(NEW):
        got_tokens.append(int(np.argmax(got[-1][-1])))
        got.append(client.decode(got_tokens[-1], link)[None])
    assert got_tokens == tokens
    for g, wt in zip(got, want, strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        err = float(np.abs(g - wt[-len(g) :]).max() / np.abs(wt).max())
        assert err < EXACT, err
    kept = [*st.guard_k.values(), *st.guard_v.values()]
    assert kept and {_dtype(x) for x in kept} == {"float32"}
    _assert_wide_exactly_where_blinded(client, link)
    assert entry is None or entry.remaining == 0  # its NEW steps' masks all used
    client.close()
    assert st.closed


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_generate_on_a_moe_model_with_a_pool_filling_meanwhile(kind: str) -> None:
    """MoE (per-expert blinded messages): requests served while the pool fills in the background are each
    exact; ``generate`` returns Python ints, the plaintext greedy tokens."""
    w = tiny_weights(0, moe=True)
    b = _backend(kind, w)
    client = Client(b, KeySchedule(MASTER, bytes(16)), replace(preset("hardened").config(4), max_length=16))
    mp = MaskPool(client, capacity=10, steps=NEW)
    mp.fill(4, background=True)
    rng = np.random.default_rng(1)
    for _ in range(4):
        ids = rng.integers(0, 32, size=int(rng.integers(3, 11)))
        want = _plain(b, ids, NEW - 1)[1]
        link = _Spy(Server(b))
        got = client.generate(ids, NEW, link)
        assert all(type(t) is int for t in got)
        assert got[: NEW - 1] == want
        _assert_wide_exactly_where_blinded(client, link)
    mp.wait()
    assert mp.filled == 4 and 0 <= len(mp) <= 4


def _release_bytes(client: Client[Any], capacity: int) -> tuple[int, int]:
    """Bytes of (η, η·W) of the prefill releases for ``capacity`` tokens and of one step's, 8 an entry."""
    c, cfg = client.c, client.cfg
    out = {"wqkv": c.q_dim + 2 * c.kv_dim, "wo": c.hidden_size, "w_gate_up": 2 * c.intermediate_size}
    out |= {"w_down": c.hidden_size, "router": c.n_experts, "lm_head": c.vocab_size}
    width = {Stage.O: c.q_dim, Stage.GEN_O: c.q_dim, Stage.FFN_DOWN: c.intermediate_size}
    width[Stage.GEN_FFN_DOWN] = c.intermediate_size
    which = {Stage.QKV: "wqkv", Stage.GEN_QKV: "wqkv", Stage.O: "wo", Stage.GEN_O: "wo"}
    which |= {Stage.FFN: "w_gate_up", Stage.GEN_FFN_UP: "w_gate_up", Stage.FFN_DOWN: "w_down"}
    which |= {Stage.GEN_FFN_DOWN: "w_down", Stage.ROUTER: "router", Stage.GEN_ROUTER: "router"}
    which |= {Stage.HEAD: "lm_head", Stage.GEN_HEAD: "lm_head"}
    prefill = step = 0
    for r in client.plan.prefill:
        rows = capacity + (cfg.r2 if r.stage is Stage.O else cfg.r1)
        prefill += 8 * rows * (width.get(r.stage, c.hidden_size) + out[which[r.stage]])
    for r in client.plan.generation:
        step += 8 * (width.get(r.stage, c.hidden_size) + out[which[r.stage]])
    return prefill, step


def _held(entry: Any) -> int:
    return sum(x.nbytes for pair in entry._blinding.values() for x in pair)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["paper", "blind", "hardened"])
def test_the_pool_counts_float64_masks(name: str, kind: str, moe: bool) -> None:
    """An entry's masks are float64; the pool's bytes per prompt token and per step are those of the
    plan's releases at 8 bytes an entry, and what the entry holds; ``len`` follows fill and take."""
    w = tiny_weights(0, moe=moe)
    client = Client(
        _backend(kind, w), KeySchedule(MASTER, bytes(16)), replace(preset(name).config(4), max_length=16)
    )
    capacity, steps = 9, 3
    mp = MaskPool(client, capacity=capacity, steps=steps)
    mp.fill(2, background=True)
    mp.wait()
    assert len(mp) == 2 and mp.filled == 2
    entry = mp._entries[0]
    assert {_dtype(x) for p in entry._blinding.values() for x in p} == {"float64"}
    prefill, step = _release_bytes(client, capacity)
    assert mp.bytes_per_prompt_token * capacity == prefill and mp.bytes_per_step == step
    assert entry.mask_bytes == _held(entry) == prefill + steps * step
    assert entry.mask_bytes_of(step=False) == prefill
    assert mp.take(5) is entry and len(mp) == 1
    mp.fill(0)
    assert len(mp) == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_pool_blinding_in_the_run_dtype_counts_its_bytes(dtype: str) -> None:
    """``blind_dtype="backend"`` on a bfloat16/float16 run holds its masks in that dtype: 2 bytes an entry,
    where the pool used to count the 4 of the wire dtype (``numpy_dtype``) — twice what it held. (float32:
    4, as before; ``auto`` at β = 5: float64, 8.)"""
    b = TorchBackend(tiny_weights(0).astype(np.float32), getattr(torch, dtype))
    for blind_dtype, beta, size in (("backend", 1e-6, torch.finfo(b.dtype).bits // 8), ("auto", 5.0, 8)):
        cfg = SCXConfig(level="blind", beta=beta, blind_dtype=blind_dtype, max_length=16)  # type: ignore[arg-type]
        client = Client(b, KeySchedule(MASTER, bytes(16)), cfg)
        mp = MaskPool(client, capacity=8, steps=2)
        mp.fill(1)
        entry = mp._entries[0]
        assert {x.element_size() for p in entry._blinding.values() for x in p} == {size}
        prefill, step = _release_bytes(client, 8)
        assert entry.mask_bytes == _held(entry) == (prefill + 2 * step) * size // 8
        assert mp.bytes_per_prompt_token * 8 == prefill * size // 8 and mp.bytes_per_step == step * size // 8


def _scaled_reply(stage: Stage, factor: float) -> Any:
    """A tampering of the first reply of ``stage``: every array ×``factor``."""
    seen = {"n": 0}

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is not stage:
            return reply
        seen["n"] += 1
        if seen["n"] != 1:
            return reply
        return replace(reply, arrays={k: v * factor for k, v in reply.arrays.items()})

    return tamper


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["paper", "blind", "hardened"])
def test_wide_replies_are_checked(name: str, kind: str) -> None:
    """An honest server's wide replies pass (the worst check well within its tolerance); ×1.001 on the first
    reply of any blinded stage is an IntegrityError, the session failed and nothing sent after it."""
    w = tiny_weights(3, qkv_bias=True, hidden_size=32, head_dim=8, intermediate_size=48, max_positions=64)
    b = _backend(kind, w)
    cfg = replace(preset(name).config(4), r1=2, r2=2, max_length=32)
    client = Client(b, KeySchedule(MASTER, bytes(16)), cfg)
    assert client.wide and client.cfg.verify
    client.generate(IDS, 3, LocalTransport(Server(b)))
    assert 0 < client.verify_worst < 0.5
    stages = {r.stage for r in (*client.plan.prefill, *client.plan.generation)}
    for stage in sorted(stages, key=lambda s: s.value):
        client = Client(b, KeySchedule(MASTER, bytes(16)), cfg)
        link = TamperingTransport(LocalTransport(Server(b)), _scaled_reply(stage, 1.001))
        with pytest.raises(IntegrityError):
            client.generate(IDS, 3, link)
        assert client.state is not None and client.state.failed, stage
        sent = link.sent
        client.close()  # a failed session: nothing is sent
        with pytest.raises(ProtocolError, match="failed"):
            client.decode(3, link)
        assert link.sent == sent, stage


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_failed_wide_request_spends_only_its_pool_entry(kind: str) -> None:
    """A tampered wide reply fails the request that took the pool's first entry: that entry is spent (its
    nonce refused afterwards), the second still held, and the next request takes it and is exact."""
    w = tiny_weights(0)
    b = _backend(kind, w)
    client = Client(b, KeySchedule(MASTER, bytes(16)), replace(preset("blind").config(4), max_length=16))
    mp = MaskPool(client, capacity=10, steps=NEW)
    mp.fill(2)
    first, second = mp._entries
    link = TamperingTransport(LocalTransport(Server(b)), _scaled_reply(Stage.O, 1.001))
    with pytest.raises(IntegrityError):
        client.prefill(IDS, link)
    st = client.state
    assert st is not None and st.failed and st.prep is first and len(mp) == 1
    sent = link.sent
    client.close()
    assert link.sent == sent
    with pytest.raises(SessionError):
        client.prefill(IDS, LocalTransport(Server(b)), nonce=first.nonce)
    assert len(mp) == 1 and mp._entries[0] is second
    want, tokens = _plain(b, IDS, NEW)
    spy = _Spy(Server(b))
    got = client.prefill(IDS, spy)
    assert client.state is not None and client.state.prep is second and len(mp) == 0
    assert float(np.abs(got - want[0]).max() / np.abs(want[0]).max()) < EXACT
    assert [int(np.argmax(got[-1]))] == tokens[:1]
    _assert_wide_exactly_where_blinded(client, spy)
    client.close()
    assert client.state.closed


def test_the_cost_report_counts_float64_blinded_bytes() -> None:
    """Level paper: block 0's QKV message (blinded) and its reply travel in float64 — 8 bytes an entry —
    the other blocks' in float32 — 4 — and the report says so (bytes up and down of the QKV stage)."""
    w = tiny_weights(0)
    b = _backend("torch", w)
    c, cfg = w.config, replace(preset("paper").config(4), max_length=16)
    client = Client(b, KeySchedule(MASTER, bytes(16)), cfg)
    link = LocalTransport(Server(b))
    client.prefill(IDS, link)
    qkv = client.cost_report(link).stages[Stage.QKV]
    rows, d, z = len(IDS) + cfg.r1, c.hidden_size, c.q_dim + 2 * c.kv_dim
    assert client.plan.find(Stage.QKV, 0) is not None and all(
        client.plan.find(Stage.QKV, i) is None for i in range(1, c.n_layers)
    )
    assert qkv.bytes_up == rows * d * (8 + 4 * (c.n_layers - 1))
    assert qkv.bytes_down == rows * z * (8 + 4 * (c.n_layers - 1))


def test_scx_bench_pool_reports_float64_mask_bytes(tmp_path: Path) -> None:
    """``scx bench --pool`` on tiny-llama (float32): an entry of level paper holds block 0's QKV masks —
    (n + r1) rows of η (d wide) and η·W (q + 2·kv wide) — at 8 bytes an entry, as reported."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tiny-llama", "--pool", "--levels", "permute", "--configs", "paper"]
    args += ["--n", "16", "--gen-tokens", "0", "--repeats", "1", "--warmup", "0", "--no-progress"]
    r = subprocess.run(
        [sys.executable, "-m", "scx_ref.cli", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = {row["level"]: row for row in json.loads(out.read_text())["rows"]}
    cfg = preset("paper").config(2)
    d, q, kv = 128, 128, 64  # tiny-llama: d = 128, 2 heads and 1 KV head of width 64
    assert rows["paper"]["pool"]["bytes_per_prompt_token"] == 8 * (16 + cfg.r1) * (d + q + 2 * kv) / 16
    assert rows["paper"]["pool"]["mask_bytes_per_value"] == 8.0  # and says so (stop 70)
    assert rows["permute"]["pool"]["bytes_per_prompt_token"] == 0
    assert "an entry holds 3.8 KiB per prompt token" in r.stdout

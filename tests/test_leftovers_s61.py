"""Three leftovers: attention of a non-finite query row (NaN out on both backends, never a silent finite
value), SmolLM2's loaders leaving the process environment alone (the hub kept away per call), and a new
prefill after the previous session's link died."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import ProtocolError, SCXError, ServiceError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.zoo import smollm2

from .tiny import tiny_weights

# -- 1. attention of a non-finite query row --------------------------------------------------------------
N, D = 5, 4
BAD = 2  # the query row given a NaN or ±inf entry (row 0 for one decode row)
#: positions per case: (query positions, key positions or None = every query sees every key)
CASES: dict[str, tuple[Any, Any]] = {
    "all": (np.arange(N), None),  # no mask: the fused kernel (grouped when H > H_kv)
    "causal": (np.arange(N), np.arange(N)),  # is_causal
    "mask": (np.array([4, 2, 3, 1, 4]), np.arange(N)),  # an explicit boolean mask
    "novis": (np.array([0, 2, 3, 1, 4]), np.arange(1, N + 1)),  # row 0 sees no key: the eager softmax
    "decode": (np.array([N - 1]), None),  # one row, the whole cache
}
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def _inputs(case: str, heads: tuple[int, int], dtype: Any, bad: float) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    n_q = 1 if case == "decode" else N
    q = rng.standard_normal((n_q, heads[0], D))
    k, v = rng.standard_normal((2, N, heads[1], D))
    q[0 if case == "decode" else BAD, 0, 1] = bad
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _nonfinite_heads(out: np.ndarray) -> set[tuple[int, int]]:
    return {(int(i), int(h)) for i, h in zip(*np.nonzero(~np.isfinite(out).all(axis=-1)), strict=True)}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ±inf scores
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_nonfinite_query_head_gives_nan_there_on_both_backends(
    case: str, heads: tuple[int, int], dtype: Any, bad: float
) -> None:
    """A query row's head with a NaN (or ±inf) entry: NaN in exactly that row's head on numpy and on torch,
    every other entry as before (before: torch's fused kernel — no mask, causal, one decode row — gave that
    head zeros, a finite output the finiteness checks let through)."""
    w = tiny_weights(0, n_heads=heads[0], n_kv_heads=heads[1])
    qp, kp = CASES[case]
    q, k, v = _inputs(case, heads, dtype, bad)
    want = NumpyBackend(w, dtype).attention(q, k, v, qp, kp)
    tb = TorchBackend(w, TORCH_DTYPES[dtype])
    got = tb.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), qp, kp).numpy()
    row = 0 if case == "decode" else BAD
    assert _nonfinite_heads(want) == _nonfinite_heads(got) == {(row, 0)}
    assert np.isnan(got[row, 0]).all() and np.isnan(want[row, 0]).all()
    # the other heads and rows: as with a finite query (q's bad row made finite changes only that head)
    q_ok = q.copy()
    q_ok[row, 0] = 0.5
    clean = NumpyBackend(w, dtype).attention(q_ok, k, v, qp, kp)
    keep = np.ones(want.shape[:2], dtype=bool)
    keep[row, 0] = False
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_array_equal(want[keep], clean[keep])
    np.testing.assert_allclose(got[keep], clean[keep], rtol=rtol, atol=rtol)
    if case == "novis":  # the row that sees no key still gives zeros (the guard's own case)
        assert not want[0].any() and not got[0].any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ±inf scores
@pytest.mark.parametrize("case", ["all", "causal", "decode"])
def test_a_query_whose_scores_are_all_minus_inf_gives_nan_not_zeros(case: str) -> None:
    """+inf in a query whose keys are all negative in that feature: every score is −inf, which read as a row
    that sees no key and gave zeros on both backends; now NaN on both."""
    w = tiny_weights(0)
    qp, kp = CASES[case]
    q, k, v = _inputs(case, (4, 2), np.float64, np.inf)
    k[:, 0, 1] = -np.abs(k[:, 0, 1]) - 0.1
    row = 0 if case == "decode" else BAD
    assert np.isneginf(k[:, 0] @ q[row, 0]).all()  # every score of that head is −∞
    want = NumpyBackend(w).attention(q, k, v, qp, kp)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    got = TorchBackend(w, torch.float64).attention(tq, tk, tv, qp, kp).numpy()
    assert _nonfinite_heads(want) == _nonfinite_heads(got) == {(row, 0)}


def test_the_attention_guards_keep_their_zeros_and_the_device_branch_agrees() -> None:
    """No keys: zeros on both, whatever the query (documented); bfloat16 NaN query: NaN; the branch the
    non-CPU devices take (the mask always applied, no host test) gives the CPU branch's result."""
    w = tiny_weights(0)
    q, k, v = _inputs("causal", (4, 2), np.float64, np.nan)
    none = np.zeros((0, 2, D))
    assert not NumpyBackend(w).attention(q, none, none, np.arange(N), np.arange(0)).any()
    tb = TorchBackend(w, torch.float64)
    t0 = torch.from_numpy(none)
    assert not tb.attention(torch.from_numpy(q), t0, t0, np.arange(N), np.arange(0)).any()
    bf = TorchBackend(w, torch.bfloat16)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    out = bf.attention(tq.bfloat16(), tk.bfloat16(), tv.bfloat16(), np.arange(N), None)
    assert _nonfinite_heads(out.float().numpy()) == {(BAD, 0)}
    cpu = tb.attention(tq, tk, tv, np.arange(N), None)
    tb._on_cpu = False  # the device branch, run on CPU tensors
    device = tb.attention(tq, tk, tv, np.arange(N), None)
    np.testing.assert_array_equal(device.numpy(), cpu.numpy())
    finite = tb.attention(tq.nan_to_num(), tk, tv, np.arange(N), None)
    assert torch.isfinite(finite).all()


# -- 2. SmolLM2's loaders and HF_HUB_OFFLINE --------------------------------------------------------------
class _Stop(Exception):
    """Raised by the fake loaders once the call's keywords are recorded."""


def _fake_transformers(
    monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, dict[str, Any]]], *, model_loads: bool = True
) -> None:
    """A ``transformers`` module whose AutoTokenizer and LlamaForCausalLM loaders record their keywords (and
    HF_HUB_OFFLINE at the call); the model's raises _Stop unless ``model_loads``. Nothing is loaded."""

    def loader(name: str, result: Any) -> Any:
        def from_pretrained(path: str, **kw: Any) -> Any:
            calls.append((name, {**kw, "offline_env": os.environ.get("HF_HUB_OFFLINE")}))
            if result is None:
                raise _Stop(name)
            if kw.get("output_loading_info"):  # as transformers: (model, what loaded and what did not)
                return result, {
                    "missing_keys": [],
                    "unexpected_keys": [],
                    "mismatched_keys": [],
                    "error_msgs": [],
                }
            return result

        return staticmethod(from_pretrained)

    class Model:
        def eval(self) -> str:
            return "model"

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = type("Tok", (), {"from_pretrained": loader("tok", "t")})  # type: ignore[attr-defined]
    fake.LlamaForCausalLM = type(  # type: ignore[attr-defined]
        "M", (), {"from_pretrained": loader("model", Model() if model_loads else None)}
    )
    fake.LlamaConfig = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)


@pytest.mark.parametrize("before", [None, "0", "1"])
def test_load_smollm2_leaves_hf_hub_offline_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    """load_smollm2 no longer sets HF_HUB_OFFLINE=1 for the rest of the process (huggingface_hub reads it
    once, at import, so that was both a process-wide side effect and no per-call guarantee): every load is
    given local_files_only=True, and the variable is as before — after success and after an error."""
    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    calls: list[tuple[str, dict[str, Any]]] = []
    _fake_transformers(monkeypatch, calls)
    (tmp_path / smollm2.CONVERTED).mkdir()
    (tmp_path / smollm2.CONVERTED / "config.json").write_text("{}")
    assert smollm2.load_smollm2(tmp_path, lambda dest: dest) == ("model", "t")
    assert [name for name, _ in calls] == ["model", "tok"]
    assert all(kw["local_files_only"] is True and kw["offline_env"] == before for _, kw in calls)
    assert os.environ.get("HF_HUB_OFFLINE") == before
    (tmp_path / smollm2.CONVERTED / "config.json").unlink()  # prepare fails: no GGUF, the fetch refuses

    def no_fetch(dest: Path) -> Path:
        raise SCXError("no download here")

    with pytest.raises(SCXError, match="no download"):
        smollm2.load_smollm2(tmp_path, no_fetch)
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_convert_gguf_loads_local_files_only_and_leaves_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GGUF conversion's tokenizer and model loads are given local_files_only=True (before: neither,
    the hub kept away only by the process-wide variable), and the variable is not set, even when the loader
    fails."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[tuple[str, dict[str, Any]]] = []
    _fake_transformers(monkeypatch, calls, model_loads=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    with pytest.raises(_Stop):
        smollm2.convert_gguf(gguf, tmp_path / "out")
    assert [name for name, _ in calls] == ["tok", "model"]
    assert all(kw["local_files_only"] is True and kw["gguf_file"] == "m.gguf" for _, kw in calls)
    assert all(kw["offline_env"] is None for _, kw in calls)
    assert "HF_HUB_OFFLINE" not in os.environ


# -- 3. a new prefill after the previous session's link died ---------------------------------------------
IDS = np.array([3, 1, 4, 1, 5])


class Flaky(LocalTransport):
    """A link that can die (every send then raises, as RemoteTransport on a lost connection), or answer
    CLOSE with a reply to another request."""

    dead = False
    bad_close = False

    def send(self, request: Request) -> Reply:
        if self.dead:
            raise ServiceError("the SCX server at scx://127.0.0.1:1 closed the connection")
        reply = super().send(request)
        if self.bad_close and request.stage is Stage.CLOSE:
            return dataclasses.replace(reply, seq=reply.seq + 1)
        return reply


def _client() -> tuple[Server[Any], Client[Any], ReferenceModel]:
    w = tiny_weights(0)
    b = NumpyBackend(w)
    return Server(b), Client(b, KeySchedule.generate(), SCXConfig(l_s=1, l_e=1)), ReferenceModel(w)


@pytest.mark.parametrize("how", ["dead", "bad_close"])
def test_a_failed_close_of_the_old_session_does_not_stop_a_new_prefill(how: str) -> None:
    """The old session's link died (or its close reply is refused): the new prefill on a healthy link opens
    and is exact, the old session is left failed (its server side expires at the idle TTL); generation on
    the new session goes on exactly. Before: the close's ServiceError stopped the prefill."""
    server, client, ref = _client()
    flaky, good = Flaky(server), LocalTransport(server)
    client.prefill(IDS, flaky)
    old = client.state
    setattr(flaky, how, True)
    logits = client.prefill(IDS[:3], good)
    np.testing.assert_allclose(logits, ref.prefill(IDS[:3])[0], rtol=1e-10, atol=1e-10)
    assert old is not None and old.failed and not old.closed
    new = client.state
    assert new is not None and new is not old and not new.failed and new.link is good
    # dead: the server still holds it (freed at its idle timeout); bad_close: the server did close it
    assert (old.keys.session_id in server.sessions) == (how == "dead")
    _, cache = ref.prefill(IDS[:3])
    token = int(np.argmax(logits[-1]))
    np.testing.assert_allclose(client.decode(token, good), ref.decode(token, cache), rtol=1e-10, atol=1e-10)


def test_a_new_prefill_on_the_dead_link_fails_with_the_transport_error_and_the_client_recovers() -> None:
    """The same dead link for the new prefill: the close is skipped past, the open fails with the transport's
    own (project) error, both sessions are failed, and a prefill on a healthy link then works."""
    server, client, ref = _client()
    flaky = Flaky(server)
    client.prefill(IDS, flaky)
    old = client.state
    flaky.dead = True
    with pytest.raises(ServiceError, match="closed the connection"):
        client.prefill(IDS[:3], flaky)
    failed = client.state
    assert old is not None and old.failed and failed is not None and failed is not old and failed.failed
    with pytest.raises(ProtocolError, match="failed"):  # the failed session sends nothing more
        client.decode(1, flaky)
    logits = client.prefill(IDS[:4], LocalTransport(server))
    np.testing.assert_allclose(logits, ref.prefill(IDS[:4])[0], rtol=1e-10, atol=1e-10)


def test_compare_ppl_past_the_float64_range_is_inf_not_an_overflow() -> None:
    """Finite logits whose mean NLL passes ~709 (what a blind float32 sweep at a huge β reaches) give an
    infinite PPL and |ΔPPL|/PPL, not an OverflowError that loses the sweep; equal sides still give 0."""
    from scx_ref.zoo.perplexity import compare_ppl

    ids = np.array([0, 1, 0, 1, 0], dtype=np.int64)
    plain = np.zeros((5, 2), dtype=np.float64)
    wild = np.tile(np.array([[0.0, -1e4], [-1e4, 0.0]]), (3, 1))[:5]  # the next token always at -1e4
    r = compare_ppl(ids, 5, lambda w: plain[: len(w)], lambda w: wild[: len(w)])
    assert r.ppl_plain == pytest.approx(2.0) and math.isinf(r.ppl_scx)
    assert math.isinf(r.delta_ppl) and r.delta_ppl > 0 and math.isinf(r.rel_delta_ppl)
    same = compare_ppl(ids, 5, lambda w: wild[: len(w)], lambda w: wild[: len(w)])
    assert math.isinf(same.ppl_plain) and same.delta_ppl == 0.0 and same.rel_delta_ppl == 0.0


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


def test_two_stops_of_a_service_run_one_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """SCXService.stop called twice at once (a second signal, a second caller) drains and stops once."""
    pytest.importorskip("grpc")
    import asyncio
    import logging

    from scx_ref.commands.serve import build_backend
    from scx_ref.protocol.server import Server
    from scx_ref.service.service import SCXService, ServeOptions

    service = SCXService(
        Server(build_backend("random:tiny-dense", "float32", "cpu")), ServeOptions(port=0, ops_port=None)
    )

    async def main() -> None:
        await service.start()
        await asyncio.gather(service.stop(), service.stop())
        await service.wait_stopped()

    with caplog.at_level(logging.INFO, logger="scx.serve"):
        asyncio.run(main())
    events = [r.getMessage() for r in caplog.records]
    assert sum('"event": "draining"' in e for e in events) == 1, events
    assert sum('"event": "stopped"' in e for e in events) == 1, events


def test_scx_bench_threads_past_the_cap_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``scx bench --threads 100000000000`` gave torch's 'Overflow when unpacking long' traceback."""
    from scx_ref.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--threads", "100000000000"])
    assert info.value.code == 2 and "--threads: must be <= 1024" in capsys.readouterr().err

"""The reply verifier's memory safety (scx_ref/protocol/verify.py): its compiled kernels index
without bounds checks, so every public entry point checks the shapes it hands them (SCXError otherwise,
never a read past an array), and a hostile server's malformed replies end in IntegrityError on every
backend, whatever their row count, dtype or memory layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from properties.kernel_paths import FUSED_OR_EAGER
from scx_ref.attacks.active import TamperingTransport
from scx_ref.backends import NumpyBackend, cpu_kernels
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import IntegrityError, ProtocolError, SCXError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.verify import (
    RecomputedRows,
    attention_excess,
    attention_rows64,
    linear_excess,
    range_excess,
)
from scx_ref.stages import Stage
from tests.tiny import tiny_weights


def _linear_case(rows: int) -> tuple[Any, ...]:
    """A Freivalds verdict's arrays with ``rows`` rows of products on the reply's side and one elsewhere."""
    one = np.ones(1)
    return np.ones((rows, 2)), np.ones((1, 2)), np.zeros(2), one, one, np.ones(2), np.ones(2)


@pytest.mark.parametrize("fused", FUSED_OR_EAGER)
@pytest.mark.parametrize("rows", [4, 100_000])
def test_linear_excess_refuses_products_that_do_not_fit(fused: bool, rows: int) -> None:
    """More rows of products than of norms: the kernel read past the norms (a made-up verdict at 4 rows, a
    segmentation fault at 3·10⁶ rows), the eager form raised numpy's ValueError; now SCXError on both."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        with pytest.raises(SCXError, match="do not fit"):
            linear_excess(*_linear_case(rows))
        yr, xr, bias_r, xnorm, ynorm, a, b = _linear_case(1)
        with pytest.raises(SCXError, match="do not fit"):  # terms narrower than the products
            linear_excess(yr, xr, bias_r[:1], xnorm, ynorm, a, b)
        assert linear_excess(yr, xr, bias_r, xnorm, ynorm, a, b) == 0.0  # the fitting shapes still pass


def _recomputed(rows: int, small: int) -> RecomputedRows:
    """``rows`` recomputed rows (4 heads, group 2) whose norms are ``small`` rows long."""
    norms = np.ones((small, 2))
    return RecomputedRows(
        np.zeros((rows, 4, 2)), np.zeros((rows, 4)), np.ones((small, 4)), np.ones((small, 4)), norms, norms
    )


@pytest.mark.parametrize("fused", FUSED_OR_EAGER)
@pytest.mark.parametrize("rows", [4, 100_000])
def test_attention_excess_refuses_rows_that_do_not_fit(fused: bool, rows: int) -> None:
    """Recomputed rows with fewer norms and positions than distances: the kernel read past them (as above);
    now SCXError on both paths, and rows that fit still give their verdict."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        with pytest.raises(SCXError, match="do not fit"):
            attention_excess(_recomputed(rows, 1), np.zeros(1, np.int64), 2, 0.5, 2.0**-24)
        fit = _recomputed(2, 2)
        with pytest.raises(SCXError, match="do not fit"):  # positions for other rows
            attention_excess(fit, np.zeros(3, np.int64), 2, 0.5, 2.0**-24)
        with pytest.raises(SCXError, match="do not fit"):  # a group that does not tile the heads
            attention_excess(fit, np.zeros(2, np.int64), 3, 0.5, 2.0**-24)
        assert attention_excess(fit, np.zeros(2, np.int64), 2, 0.5, 2.0**-24) == 0.0


@pytest.mark.parametrize("fused", FUSED_OR_EAGER)
def test_attention_rows64_refuses_arrays_of_another_rank(fused: bool) -> None:
    """Queries or keys of the wrong rank: numpy's ValueError / IndexError before; now SCXError."""
    q, kv, pos = np.zeros((2, 4, 2)), np.zeros((3, 2, 2)), np.zeros(2, np.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        for args in [
            (q[:, :, 0], kv, kv, q[:, :, 0], pos),
            (q, kv[:, 0, 0], kv, q, pos),
            (q, kv, kv, q, pos[None]),
        ]:
            with pytest.raises(SCXError, match="positions"):
                attention_rows64(*args, group=2, scale=0.5)
        attention_rows64(q, kv, kv, q, pos, group=2, scale=0.5)


@pytest.mark.parametrize("fused", FUSED_OR_EAGER)
def test_range_excess_refuses_queries_before_position_0(fused: bool) -> None:
    """A negative first position: the kernel compared no output with any value and returned −inf ("every
    entry in range") for outputs far outside it; now SCXError."""
    v = np.arange(12.0).reshape(6, 1, 2)
    o = np.full((2, 1, 1, 2), 1e6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        with pytest.raises(SCXError, match="position -3"):
            range_excess(v, o, -3)
        assert range_excess(v, o, 0)[0] > 1e5  # from position 0 the same outputs are far out of range


# -- hostile replies end in IntegrityError on every backend ------------------------------------------------
IDS = np.array([7, 3, 21, 9, 14, 2, 30, 11], dtype=np.int64)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().numpy().copy() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


#: malformed arrays a server may send: each must be refused before a kernel reads it
HOSTILE: dict[str, Callable[[Any], Any]] = {
    "one row more": lambda x: np.concatenate([_numpy(x), _numpy(x)[:1]]),
    "one row less": lambda x: _numpy(x)[:-1],
    "no rows": lambda x: _numpy(x)[:0],
    "one column more": lambda x: np.concatenate([_numpy(x), _numpy(x)[..., :1]], axis=-1),
    "flattened": lambda x: _numpy(x).reshape(-1),
    "integers": lambda x: np.rint(_numpy(x)).astype(np.int64),
    "complex": lambda x: _numpy(x).astype(np.complex128),
    "a huge broadcast": lambda x: np.broadcast_to(_numpy(x)[:1], (2**40, *np.shape(x)[1:])),
    "a list": lambda x: _numpy(x).tolist(),
}
#: the same values in another layout: verified as the honest reply is (accepted)
LAYOUTS: dict[str, Callable[[Any], Any]] = {
    "negative strides": lambda x: np.flip(np.flip(_numpy(x)).copy()),
    "Fortran order": lambda x: np.asfortranarray(_numpy(x)),
    "read-only": lambda x: np.lib.stride_tricks.as_strided(_numpy(x), writeable=False),
}


def _run(backend: str, stage: Stage, change: Callable[[Any], Any]) -> tuple[Any, list[Stage]]:
    w = tiny_weights(3, vocab_size=40, hidden_size=32, head_dim=8, intermediate_size=48, max_positions=64)
    b: Any = NumpyBackend(w) if backend == "numpy" else TorchBackend(w, torch.float32)
    done: list[Stage] = []

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is not stage or done:
            return reply
        done.append(stage)
        return replace(reply, arrays={k: change(v) for k, v in reply.arrays.items()})

    link = TamperingTransport(LocalTransport(Server(b)), tamper)
    client: Any = Client(
        b, KeySchedule(b"\x01" * 32, b"\x02" * 16), SCXConfig(r1=2, r2=2, gen_attention="server")
    )
    try:
        return client.generate(IDS, 2, link), done
    except (IntegrityError, ProtocolError) as exc:
        return exc, done


REPLIES = [
    Stage.QKV,
    Stage.ATTN,
    Stage.O,
    Stage.FFN,
    Stage.HEAD,
    Stage.GEN_QKV,
    Stage.GEN_ATTN,
    Stage.GEN_LAST,
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("stage", REPLIES, ids=[s.value for s in REPLIES])
def test_malformed_replies_are_refused_before_any_kernel_reads_them(backend: str, stage: Stage) -> None:
    for what, change in HOSTILE.items():
        out, done = _run(backend, stage, change)
        assert done == [stage], f"no {stage.value} reply to change"
        assert isinstance(out, IntegrityError), f"{what}: {out!r}"
    for what, change in LAYOUTS.items():
        out, done = _run(backend, stage, change)
        assert isinstance(out, list), f"{what}: {out!r}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("layer", np.array([0, 1])),
        ("session", np.array(["a", "b"])),
        ("seq", np.array([1, 1])),
        ("step", np.array([-1, -1])),
        ("stage", np.array(["qkv", "o"])),
    ],
)
def test_a_reply_header_of_another_type_is_refused(name: str, value: Any) -> None:
    """A reply whose session, stage, layer, step or seq is not of its type: an array raised numpy's
    ValueError ("truth value of an array … is ambiguous") out of the header comparison; now IntegrityError,
    as for any reply that does not answer its request."""
    w = tiny_weights(3, vocab_size=40, hidden_size=32, head_dim=8, intermediate_size=48, max_positions=64)
    b = NumpyBackend(w)

    def tamper(req: Request, reply: Reply) -> Reply:
        return replace(reply, **{name: value}) if req.stage is Stage.QKV else reply

    link = TamperingTransport(LocalTransport(Server(b)), tamper)
    client: Any = Client(b, KeySchedule(b"\x01" * 32, b"\x02" * 16), SCXConfig(r1=2, r2=2))
    with pytest.raises(IntegrityError, match="does not answer the request"):
        client.prefill(IDS, link)
    assert client.state is not None and client.state.failed


def _as(dtype: Any, factor: float) -> Callable[[Any], Any]:
    """Every array of a reply scaled by ``factor`` and cast to ``dtype`` (numpy's or torch's, as sent)."""

    def change(x: Any) -> Any:
        a = (_numpy(x) * factor).astype(dtype)
        return torch.from_numpy(a) if isinstance(x, torch.Tensor) else a

    return change


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("stage", [Stage.QKV, Stage.O, Stage.FFN, Stage.HEAD, Stage.GEN_QKV, Stage.GEN_LAST])
def test_a_reply_coarser_than_the_session_cannot_widen_the_tolerance(backend: str, stage: Stage) -> None:
    """The tolerance was the coarser of the client's dtype and the reply's: a float16 reply to a float32
    session widened it 2¹³ times, and a 1 % change of every entry passed (the audit's table: qkv, o, ffn,
    head, gen_qkv, gen_last). Now a reply coarser than the session is refused, and the control — the
    reply in the session's own dtype, changed by nothing — still passes."""
    out, done = _run(backend, stage, _as(np.float16, 1.01))
    assert done == [stage] and isinstance(out, IntegrityError), f"{out!r}"
    assert "coarser than the session" in str(out)
    out, _ = _run(backend, stage, lambda x: x)
    assert isinstance(out, list), f"the control: {out!r}"
    if backend == "numpy":  # a float64 session: float32 is coarser too (it passed the check at 2²⁹ × τ)
        out, _ = _run(backend, stage, _as(np.float32, 1.0))
        assert isinstance(out, IntegrityError), f"{out!r}"

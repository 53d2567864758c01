"""An active, malicious server (DESIGN §5.5, issue 12): every tampering of a verifiable reply is detected
before anything derived from it is used or sent; the issue's marker attack recovers the prompt only from
a client that does not verify.

Each attack runs twice: with ``verify=False`` (the control: the attack works — the client goes on with
wrong values, or leaks the prompt) and with the default ``verify=True`` (IntegrityError, the session is
failed and the client sends nothing more). Float64 on the numpy backend unless a test says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.attacks.active import MarkerServer, TamperingTransport
from scx_ref.backends import NumpyBackend, cpu_kernels
from scx_ref.backends.torch_backend import TorchBackend, range_excess_where
from scx_ref.errors import IntegrityError, ProtocolError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.protocol.verify import ATTENTION_ROWS
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.tiny import tiny_weights

IDS = np.array([7, 3, 21, 9, 14, 2, 30, 11], dtype=np.int64)
N_NEW = 3


def weights(moe: bool = False, bias: bool = False, layers: int = 4) -> ModelWeights:
    return tiny_weights(
        3, moe=moe, vocab_size=40, hidden_size=32, n_layers=layers, head_dim=8, intermediate_size=48,
        qkv_bias=bias, max_positions=64,
    )  # fmt: skip


def keys(seed: int = 1) -> KeySchedule:
    return KeySchedule(bytes([seed]) * 32, bytes([seed + 1]) * 16)


Tamper = Callable[[Reply], Reply]


def on(
    stage: Stage, change: Callable[[dict[str, Any]], dict[str, Any]], nth: int = 0
) -> Callable[[Request, Reply], Reply]:
    """Change the arrays of the ``nth`` reply of ``stage`` (the others pass unchanged)."""
    seen = {"n": 0}

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is not stage:
            return reply
        seen["n"] += 1
        return replace(reply, arrays=change(dict(reply.arrays))) if seen["n"] == nth + 1 else reply

    return tamper


def scaled(factor: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda a: {k: v * factor for k, v in a.items()}


def run(
    w: ModelWeights, cfg: SCXConfig, tamper: Callable[[Request, Reply], Reply], backend: Any = None
) -> tuple[list[int] | Exception, TamperingTransport, Client[Any]]:
    """Generate with a tampering transport; the tokens, or the exception raised."""
    b = backend if backend is not None else NumpyBackend(w)
    link = TamperingTransport(LocalTransport(Server(b)), tamper)
    client: Client[Any] = Client(b, keys(), cfg)
    try:
        return client.generate(IDS, N_NEW, link), link, client
    except (IntegrityError, ProtocolError) as exc:
        return exc, link, client


def detected(
    w: ModelWeights,
    cfg: SCXConfig,
    tamper: Callable[[Request, Reply], Reply],
    backend: Any = None,
    prefix: str = "",
) -> None:
    """The tampering raises IntegrityError (its message starting with ``prefix``); the session is failed
    and no message follows it."""
    out, link, client = run(w, cfg, tamper, backend)
    assert isinstance(out, IntegrityError), f"tampering not detected: {out!r}"
    assert str(out).startswith(prefix), f"{out} does not start with {prefix!r}"
    assert client.state is not None and client.state.failed
    sent = link.sent
    with pytest.raises(ProtocolError, match="failed"):
        client.decode(int(IDS[0]), link)
    assert link.sent == sent, "the client sent a message after a failed check"


def undetected_and_wrong(
    w: ModelWeights, cfg: SCXConfig, tamper: Callable[[Request, Reply], Reply], verify: bool = False
) -> None:
    """Control: without verification the same tampering passes silently and the client's logits are
    wrong (beyond float64 rounding) — the attack works when the defence is off. (``verify=True``: a
    tampering no check can see.)"""
    b = NumpyBackend(w)
    link = TamperingTransport(LocalTransport(Server(b)), tamper)
    client: Client[Any] = Client(b, keys(), replace(cfg, verify=verify))
    ref = ReferenceModel(w)
    want, cache = ref.prefill(IDS)
    got = client.prefill(IDS, link)
    errors = [np.abs(got - want).max() / np.abs(want).max()]
    token = int(np.argmax(want[-1]))
    for _ in range(N_NEW):
        want_t = ref.decode(token, cache)
        errors.append(np.abs(client.decode(token, link) - want_t).max() / np.abs(want_t).max())
        token = int(np.argmax(want_t))
    assert max(errors) > 1e-8, f"the tampering changed nothing (max relative error {max(errors):.1e})"


# every reply that carries arrays, at the levels where it occurs (stage, level, guard_ffn)
LINEAR = [
    (Stage.QKV, "permute", "blinded"),
    (Stage.QKV, "paper", "blinded"),
    (Stage.O, "permute", "blinded"),
    (Stage.O, "blind", "blinded"),
    (Stage.FFN, "permute", "blinded"),
    (Stage.FFN, "blind", "blinded"),
    (Stage.FFN_DOWN, "blind", "blinded"),
    (Stage.HEAD, "permute", "blinded"),
    (Stage.HEAD, "blind", "blinded"),
    (Stage.GEN_QKV, "paper", "blinded"),
    (Stage.GEN_FFN, "paper", "clear"),
    (Stage.GEN_FFN_UP, "paper", "blinded"),
    (Stage.GEN_FFN_DOWN, "paper", "blinded"),
]


@pytest.mark.parametrize(
    ("stage", "level", "guard_ffn"), LINEAR, ids=[f"{s.value}-{lv}" for s, lv, _ in LINEAR]
)
def test_scaled_linear_reply_is_detected(stage: Stage, level: str, guard_ffn: str) -> None:
    """The issue's ×1.001 on a linear (or MLP) reply: caught by the Freivalds check."""
    w = weights()
    cfg = SCXConfig(level=level, r1=2, r2=2, guard_ffn=guard_ffn)  # type: ignore[arg-type]
    detected(w, cfg, on(stage, scaled(1.001)))
    undetected_and_wrong(w, cfg, on(stage, scaled(1.001)))


@pytest.mark.parametrize("stage", [Stage.ROUTER, Stage.GEN_ROUTER, Stage.FFN, Stage.GEN_FFN_UP])
def test_moe_replies_are_checked(stage: Stage) -> None:
    """MoE: the router logits, each expert's products, and the traced MLP (router, gu, y) of an
    un-blinded FFN stage."""
    w = weights(moe=True)
    level = "permute" if stage is Stage.FFN else "blind"
    cfg = SCXConfig(level=level, r1=2, r2=1)  # type: ignore[arg-type]
    detected(w, cfg, on(stage, scaled(1.001)))
    if stage is Stage.FFN:  # every part of the traced reply is covered, not only y
        for key in ("router", "gu", "y"):
            detected(w, cfg, on(stage, lambda a, key=key: {**a, key: a[key] * 1.001}))


def test_traced_mlp_parts_are_each_checked_dense() -> None:
    w = weights(bias=True)
    cfg = SCXConfig(level="permute", r1=2, r2=2)
    for key in ("gu", "y"):
        detected(w, cfg, on(Stage.FFN, lambda a, key=key: {**a, key: a[key] + 1e-3}))


def test_logits_plus_1e3_and_nan_and_integer_dtype_are_detected() -> None:
    w = weights()
    cfg = SCXConfig(level="paper", r1=2, r2=2)
    detected(w, cfg, on(Stage.HEAD, lambda a: {"logits": a["logits"] + 1e3}))
    nan = lambda a: {"logits": np.where(np.arange(a["logits"].shape[1]) == 3, np.nan, a["logits"])}  # noqa: E731
    detected(w, cfg, on(Stage.HEAD, nan))
    detected(w, cfg, on(Stage.QKV, lambda a: {"z": np.rint(a["z"]).astype(np.int64)}))
    undetected_and_wrong(w, cfg, on(Stage.HEAD, lambda a: {"logits": a["logits"] + 1e3}))


def _one_entry(key: str, value: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Set one entry (the last row's middle column) of reply array ``key`` to ``value``."""

    def change(a: dict[str, Any]) -> dict[str, Any]:
        # a C-ordered copy: set through a flat view of it (a strided reply's own reshape would be a copy,
        # and the entry would never reach the client)
        x = a[key].contiguous().clone() if isinstance(a[key], torch.Tensor) else np.array(a[key], order="C")
        cols = int(np.prod(x.shape[1:]))
        x.reshape(-1)[cols * (x.shape[0] - 1) + cols // 2] = value
        assert not bool((x == x).all() and (abs(x) < float("inf")).all()), "the entry was not set"
        return {**a, key: x}

    return change


# the replies whose arrival scan a later pass replaces: with verification its value check, without it (all
# but the traced MLP's gate/up, sent only when verifying) the pass that consumes the reply
UNSCANNED = [
    (Stage.QKV, "z"),
    (Stage.ATTN, "o"),
    (Stage.O, "y"),
    (Stage.FFN, "y"),
    (Stage.HEAD, "logits"),
    (Stage.GEN_ATTN, "o"),
]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("stage", "key"), [*UNSCANNED, (Stage.FFN, "gu")])
@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-eager"])
def test_one_non_finite_entry_of_a_value_checked_reply_is_refused(
    value: float, stage: Stage, key: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The structure check does not scan the arrays a value check reads next (check_reply's
    ``value_checked``: Freivalds, the attention range check); a single NaN or ±inf anywhere in them
    still fails that check — on the numpy reference, the torch backend's fused kernels and its eager
    ops — and the session ends there."""
    detected(
        weights(),
        SCXConfig(level="permute", r1=2, r2=2, gen_attention="server"),  # gen_attn sent, as in the paper
        on(stage, _one_entry(key, value)),
        _backend(backend, monkeypatch),
    )


def _backend(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    w = weights()
    if name == "torch-eager":
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    return NumpyBackend(w) if name == "numpy" else TorchBackend(w, torch.float64)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("stage", "key"), UNSCANNED)
@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-eager"])
def test_one_non_finite_entry_is_refused_without_verification(
    value: float, stage: Stage, key: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without verification the prompt's replies are not scanned on arrival either: the pass that
    consumes each one (the QKV decode, the O and FFN stages' encodings, the residual add, the logits'
    decode) tests what it reads; one NaN or ±inf still ends the session with IntegrityError, nothing
    sent after it."""
    cfg = SCXConfig(level="permute", r1=2, r2=2, verify=False, gen_attention="server")
    prefix = f"{stage.value}: "  # the stage that sent it, whichever pass found it
    detected(weights(), cfg, on(stage, _one_entry(key, value)), _backend(backend, monkeypatch), prefix)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize(("stage", "key"), [(Stage.QKV, "z"), (Stage.O, "y")])
@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-eager"])
def test_a_non_finite_entry_in_a_dropped_decoy_row_is_refused(
    verify: bool, value: float, stage: Stage, key: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoy rows of the QKV and O replies are dropped unread by the pass that consumes the reply;
    a NaN or ±inf there is refused all the same (a server cannot learn which rows are decoys from
    whether its NaN is refused)."""
    holder: dict[str, Any] = {}

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is not stage or "row" in holder:
            return reply
        keys = holder["client"].state.prep.block(req.layer)
        perm = np.asarray(keys.pi if stage is Stage.QKV else keys.pi_o)
        holder["row"] = row = int(np.flatnonzero(perm >= len(IDS))[0])
        raw = reply.arrays[key]
        x = raw.contiguous().clone() if isinstance(raw, torch.Tensor) else np.array(raw, order="C")
        x[row, x.shape[1] // 2] = value
        return replace(reply, arrays={**reply.arrays, key: x})

    b = _backend(backend, monkeypatch)
    link = TamperingTransport(LocalTransport(Server(b)), tamper)
    client: Client[Any] = Client(b, keys(), SCXConfig(level="permute", r1=2, r2=2, verify=verify))
    holder["client"] = client
    with pytest.raises(IntegrityError) as info:
        client.generate(IDS, N_NEW, link)
    assert "row" in holder and client.state is not None and client.state.failed
    if not verify:  # the dropped rows' own test refused it (verified, the value check may come first)
        assert str(info.value) == f"{stage.value}: reply {stage.value}.{key} holds NaN or Inf"


SHAPES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("an extra row", lambda a: {k: np.concatenate([v, v[:1]]) for k, v in a.items()}),
    ("a missing array", lambda a: {}),
    ("an extra array", lambda a: {**a, "spy": np.zeros(3)}),
    ("a list, not an array", lambda a: {k: v.tolist() for k, v in a.items()}),
    ("a transposed array", lambda a: {k: v.T for k, v in a.items()}),
]


@pytest.mark.parametrize(("what", "change"), SHAPES, ids=[s[0] for s in SHAPES])
def test_malformed_replies_are_integrity_errors(
    what: str, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Tampered shapes used to crash deep in the client (ValueError, KeyError, AttributeError) with
    the session still marked healthy; now: IntegrityError, session failed."""
    w = weights()
    for stage in (Stage.QKV, Stage.ATTN, Stage.GEN_LAST, Stage.GEN_MID):
        detected(w, SCXConfig(level="paper", r1=2, r2=2), on(stage, change))


def test_reply_for_another_request_is_detected() -> None:
    w = weights()
    cfg = SCXConfig(level="paper")
    for field, value in (("seq", 99), ("layer", 2), ("step", 7), ("session", "ab" * 16), ("stage", Stage.O)):
        detected(
            w,
            cfg,
            lambda req, rep, f=field, v=value: replace(rep, **{f: v}) if req.stage is Stage.ATTN else rep,
        )
    detected(w, cfg, lambda req, rep: "not a reply" if req.stage is Stage.O else rep)  # type: ignore[return-value]


def copied(x: Any) -> np.ndarray:
    """A numpy copy of a reply array (numpy, or a CPU tensor from a torch server), as a remote reply
    arrives."""
    return np.array(x.numpy() if isinstance(x, torch.Tensor) else x)


class DeviceLike(TorchBackend):
    """A float64 torch backend whose verifier treats its CPU tensors as a GPU backend's device tensors:
    the attention checks take the path a CUDA backend takes (no compiled host pass; the range check by
    :func:`~scx_ref.backends.torch_backend.range_excess_where` where the tensors are)."""

    device_checks = 0  # the range checks it ran

    def on_host(self, x: torch.Tensor) -> bool:
        return False

    def device_range_excess(self, v: torch.Tensor, o: torch.Tensor, first: int) -> tuple[float, float]:
        self.device_checks += 1
        return range_excess_where(v, o, first)


def attention_backend(name: str, w: ModelWeights) -> Any:
    """The backend of an attention check: numpy, or torch float64 taking a device's path."""
    if name == "numpy":
        return NumpyBackend(w)
    return DeviceLike(w, torch.float64)


@pytest.mark.parametrize("backend", ["numpy", "device-path"])
def test_attention_tampering_is_detected(backend: str) -> None:
    """Prefill attention: a row moved outside its values' range, or swapped with another, is caught by
    the recomputed rows (every row of a prompt this short); generation (the paper's gen_attn): the single
    row is recomputed. On the numpy backend and on the path a GPU backend's verifier takes."""
    w = weights()
    cfg = SCXConfig(level="paper", r1=2, r2=2, gen_attention="server")

    def outside(a: dict[str, Any]) -> dict[str, Any]:
        o = copied(a["o"])
        o[5, 1, :] += 10.0 * np.abs(o).max()
        return {"o": o}

    def swapped(a: dict[str, Any]) -> dict[str, Any]:
        o = copied(a["o"])
        o[[6, 7]] = o[[7, 6]]
        return {"o": o}

    detected(w, cfg, on(Stage.ATTN, outside), attention_backend(backend, w))
    detected(w, cfg, on(Stage.ATTN, swapped, nth=2), attention_backend(backend, w))
    detected(w, cfg, on(Stage.GEN_ATTN, lambda a: {"o": a["o"] * 1.001}), attention_backend(backend, w))
    undetected_and_wrong(w, cfg, on(Stage.ATTN, swapped))


@pytest.mark.parametrize("backend", ["numpy", "device-path"])
def test_attention_range_check_covers_the_rows_not_recomputed(backend: str) -> None:
    """A prompt longer than ATTENTION_ROWS: the client recomputes only some rows of each attention stage,
    and every row is held to its values' range — a reply moved outside it fails that check (before any
    row is recomputed), and the same reply passes unnoticed without verification. On the numpy backend
    and on the path a GPU backend's verifier takes (where an honest reply passes the same checks)."""
    w = weights()
    cfg = SCXConfig(level="paper", r1=2, r2=2)
    ids = (np.arange(ATTENTION_ROWS + 9) * 7 + 3) % 40

    def outside(a: dict[str, Any]) -> dict[str, Any]:
        o = copied(a["o"])
        o[:, 1, :] += 10.0 * np.abs(o).max()
        return {"o": o}

    if backend != "numpy":
        b = attention_backend(backend, w)
        honest: Client[Any] = Client(b, keys(), cfg)
        want, _ = ReferenceModel(w).prefill(ids)
        np.testing.assert_allclose(
            honest.prefill(ids, LocalTransport(Server(b))), want, rtol=1e-10, atol=1e-10
        )
        assert b.device_checks == w.config.n_layers  # one range check per block's attention stage
    for verify in (True, False):
        b = attention_backend(backend, w)
        link = TamperingTransport(LocalTransport(Server(b)), on(Stage.ATTN, outside))
        client: Client[Any] = Client(b, keys(), replace(cfg, verify=verify))
        if verify:
            with pytest.raises(IntegrityError, match="outside its values' range"):
                client.prefill(ids, link)
        else:
            want, _ = ReferenceModel(w).prefill(ids)
            assert np.abs(client.prefill(ids, link) - want).max() > 1e-6 * np.abs(want).max()


def columns_scaled(z: Any, lo: int, hi: int, by: float) -> Any:
    """``z`` with columns lo:hi multiplied by ``by`` (a copy)."""
    out = z.copy()
    out[:, lo:hi] *= by
    return out


def test_last_guard_scores_and_values_are_checked() -> None:
    """A last guard block's reply: its projection z = [q k v] (each part changed by 0.1 %: Freivalds) and
    its scores against the locked cache (the sketch, at the first and a later step)."""
    w = weights(bias=True)
    cfg = SCXConfig(level="paper", r1=2, r2=2, r_lock=3)
    c = ReferenceModel(w).config
    for lo, hi in ((0, c.q_dim), (c.q_dim, c.q_dim + c.kv_dim), (c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim)):
        detected(
            w,
            cfg,
            on(Stage.GEN_LAST, lambda a, lo=lo, hi=hi: {**a, "z": columns_scaled(a["z"], lo, hi, 1.001)}),
        )
    bump = lambda a: {**a, "scores": a["scores"] + 1e-2 * np.arange(a["scores"].shape[-1])}  # noqa: E731
    detected(w, cfg, on(Stage.GEN_LAST, bump))
    detected(w, cfg, on(Stage.GEN_LAST, bump, nth=1))  # a later step: the sketch follows the cache
    undetected_and_wrong(w, cfg, on(Stage.GEN_LAST, bump))


def test_gen_mid_cannot_be_verified_full_guards_remove_it() -> None:
    """The middle blocks run on the server alone (DESIGN §5.5): a shifted gen_mid output is not
    detectable by the client and gives wrong tokens — the documented limit. With every block a guard
    block (l_s + l_e ≥ L) there is no gen_mid stage, and the same shift of any guard stage is caught."""
    w = weights()
    cfg = SCXConfig(level="paper", r1=2, r2=2)
    undetected_and_wrong(w, cfg, on(Stage.GEN_MID, lambda a: {"x": a["x"] + 0.5}), verify=True)
    full = SCXConfig(level="paper", r1=2, r2=2, l_s=2, l_e=2, gen_attention="server")
    out, _link, _ = run(w, full, lambda req, rep: rep)
    assert out == ReferenceModel(w).generate(IDS, N_NEW)
    for stage in (Stage.GEN_QKV, Stage.GEN_ATTN, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, Stage.GEN_LAST):
        detected(w, full, on(stage, lambda a: {k: v + 0.5 for k, v in a.items()}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_detects_the_issue_tamperings(dtype: torch.dtype) -> None:
    """The same on the torch backend, float32 included (τ ~ 1e-4 relative there, far below 1e-3)."""
    w = weights(bias=True)
    b = TorchBackend(w, dtype)
    cfg = SCXConfig(level="paper", r1=2, r2=2)
    for stage in (Stage.QKV, Stage.O, Stage.FFN, Stage.HEAD, Stage.GEN_QKV, Stage.GEN_FFN_DOWN):
        detected(w, cfg, on(stage, lambda a: {k: v * 1.001 for k, v in a.items()}), backend=b)
    detected(w, cfg, on(Stage.HEAD, lambda a: {"logits": a["logits"].to(torch.int64)}), backend=b)


# -- the issue's marker attack ----------------------------------------------------------------------
@pytest.mark.parametrize("level", ["permute", "paper"])
def test_marker_attack_recovers_the_prompt_only_from_a_client_that_does_not_verify(level: str) -> None:
    w = weights(bias=True)
    b = NumpyBackend(w)
    ref = ReferenceModel(w)
    want, _ = ref.prefill(IDS)
    cfg = SCXConfig(level=level, r1=3, r2=2, beta=5.0)  # type: ignore[arg-type]
    # control: no verification — the server reads π, the decoys, P and α·W_v, and the prompt, exactly
    server: MarkerServer[Any] = MarkerServer(b)
    link = LocalTransport(server, record_view=True)
    got = Client(b, keys(), replace(cfg, verify=False)).prefill(IDS, link)
    assert server.recovered == IDS.tolist(), "the attack should recover the prompt"
    # nothing looks wrong: the logits are plaintext's up to the attacker's reconstruction of the values
    assert np.abs(got - want).max() <= 1e-7 * np.abs(want).max()
    # defended: the QKV reply of block 1 is rejected; the attention stage (which leaks) is never sent
    server = MarkerServer(b)
    link = LocalTransport(server, record_view=True)
    client: Client[Any] = Client(b, keys(2), cfg)
    with pytest.raises(IntegrityError, match="qkv of block 0"):
        client.prefill(IDS, link)
    assert server.recovered is None
    assert not link.view.select(stage=Stage.ATTN)
    assert [m.stage for m in link.view.messages] == [Stage.OPEN, Stage.QKV]


def test_a_generation_failing_midway_reports_the_tokens_made() -> None:
    """Client.generate: a forged reply at the third decode step raises IntegrityError carrying the tokens
    made before it (the prefill's and two decode steps'), equal to plaintext's; nothing is lost."""
    w = weights()
    want = ReferenceModel(w).generate(IDS, 6)
    b = NumpyBackend(w)
    link = TamperingTransport(LocalTransport(Server(b)), on(Stage.GEN_QKV, scaled(1.01), nth=2))
    with pytest.raises(IntegrityError) as info:
        Client(b, keys(5), SCXConfig(level="paper", r1=2, r2=2)).generate(IDS, 6, link)
    assert info.value.tokens == want[:3]

    # a transport's own exception (not a project error) keeps its class and notes the tokens made

    def drop(req: Request, reply: Reply) -> Reply:
        if req.stage is Stage.GEN_QKV and req.step == 3:
            raise ConnectionError("link dropped")
        return reply

    link = TamperingTransport(LocalTransport(Server(b)), drop)
    with pytest.raises(ConnectionError) as dropped:
        Client(b, keys(6), SCXConfig(level="paper", r1=2, r2=2)).generate(IDS, 6, link)
    assert f"4 token(s) made before the failure: {want[:4]}" in "\n".join(dropped.value.__notes__)

"""What the mutants of ``scx_ref/protocol/client.py`` showed untested (``python -m mutation.run client``):
the client's argument checks and the bookkeeping around its sessions."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks.active import TamperingTransport
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.errors import IntegrityError, NonFiniteError, ProtocolError, SCXError, SessionError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, SCXConfig, Server
from scx_ref.protocol import client as client_module
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.transport import LocalTransport, ViewedMessage
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.refusals import refused
from tests.tiny import tiny_weights

W = tiny_weights(3)


@pytest.mark.parametrize(
    ("link", "name"),
    [(object(), "object"), (SimpleNamespace(send=1), "SimpleNamespace"), (None, "NoneType")],
    ids=["no-send", "send-not-callable", "none"],
)
def test_a_link_without_a_callable_send_is_refused_by_its_type_name(link: object, name: str) -> None:
    with refused(ProtocolError, f"link must be a Transport (with a send method), got {name}"):
        client_module._check_link(link)
    client_module._check_link(SimpleNamespace(send=lambda message: message))  # a callable send passes


def test_two_schedules_share_a_master_only_when_their_secrets_match() -> None:
    a = KeySchedule.generate()
    assert client_module._same_master(a, a.for_nonce(b"\x01" * 16))
    assert client_module._same_master(a.for_nonce(b"\x02" * 16), a)
    assert not client_module._same_master(a, KeySchedule.generate())


def _tiny_client(keys: KeySchedule) -> Client[Any]:
    return Client(NumpyBackend(W), keys, SCXConfig(level="paper", r1=2, r2=2))


def test_a_reservation_claimed_elsewhere_is_dropped_with_the_keys_precomputed_under_it() -> None:
    """A client that derived its first request's keys ahead under its schedule's nonce, which another
    client of that schedule then claimed: the refusal drops the reservation and those keys (their nonce
    can never drive this client's session), and the next request derives fresh ones."""
    keys = KeySchedule.generate()
    first, late = _tiny_client(keys), _tiny_client(keys)
    link, prompt = LocalTransport(Server(NumpyBackend(W))), np.array([5, 1, 7])
    ahead = late.precompute(3)
    assert ahead.nonce == keys.nonce and late._prepared is ahead and late._next_nonce == keys.nonce
    first.prefill(prompt, link)
    with pytest.raises(SessionError):
        late.prefill(prompt, link)
    assert late._next_nonce is None and late._prepared is None
    np.testing.assert_allclose(late.prefill(prompt, link), ReferenceModel(W).prefill(prompt)[0], rtol=1e-9)
    assert late.session != keys.nonce.hex()


def test_a_refused_nonce_named_by_the_caller_keeps_keys_precomputed_under_another() -> None:
    keys = KeySchedule.generate()
    first, late = _tiny_client(keys), _tiny_client(keys)
    link, prompt = LocalTransport(Server(NumpyBackend(W))), np.array([2, 3])
    first.prefill(prompt, link)
    late._drop_reservation(b"\x07" * 16)  # another nonce than the precomputed one's: those keys stay
    ahead = late.precompute(2, nonce=b"\x05" * 16)
    late._drop_reservation(b"\x07" * 16)
    assert late._prepared is ahead and late._next_nonce is None
    late._drop_reservation(ahead.nonce)
    assert late._prepared is None


def _token_run(meta: Any) -> tuple[BaseException, int]:
    """A prefill whose open reply carries ``meta`` instead of the server's: (its error, messages sent)."""

    def tamper(req: Request, reply: Reply) -> Reply:
        return replace(reply, meta=meta) if req.stage is Stage.OPEN else reply

    link = TamperingTransport(LocalTransport(Server(NumpyBackend(W))), tamper)
    client = _tiny_client(KeySchedule.generate())
    with pytest.raises(SCXError) as info:
        client.prefill(np.array([1, 2, 3]), link)
    assert client.state is not None and client.state.failed
    return info.value, link.sent


NO_TOKEN = "open: the reply carries no valid session token"


@pytest.mark.parametrize(
    "meta",
    [{}, {"token": None}, {"token": 12345678901234567}, {"token": "a" * 15}, {"token": "a" * 257}, ["token"]],
    ids=["none", "null", "int", "15-chars", "257-chars", "meta-a-list"],
)
def test_an_open_reply_without_a_valid_token_is_refused_before_anything_more_is_sent(meta: Any) -> None:
    """The session token is the server's capability for the session: one that is missing, not a string,
    shorter than 16 or longer than 256 characters (or a meta that is no dict) is refused — IntegrityError,
    the session failed, nothing more sent."""
    error, sent = _token_run(meta)
    assert type(error) is IntegrityError and str(error) == NO_TOKEN
    assert sent == 1


@pytest.mark.parametrize("length", [16, 256])
def test_a_token_of_16_or_256_characters_is_taken_and_sent_with_the_next_message(length: int) -> None:
    """At the bounds the token is taken: the next message carries it, and the server (whose token it is
    not) refuses that message — the client's own check passed."""
    error, sent = _token_run({"token": "b" * length})
    assert type(error) is SessionError and str(error) == "unknown session or invalid session token"
    assert sent == 2


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_only_the_last_down_message_of_a_blinded_mlp_ends_the_block(moe: bool) -> None:
    """A blinded MLP's down projection is one message (dense) or one per expert (MoE); the server takes the
    block's FFN as done at the message marked ``last`` (its default: True), so the client marks every
    expert's but the last's ``last=False`` — and the outputs are plaintext's."""
    w = tiny_weights(5, moe=moe)
    cfg = SCXConfig(level="paper", r1=2, r2=2, guard_ffn="blinded")
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    prompt = np.array([3, 1, 4])
    got = Client(NumpyBackend(w), KeySchedule.generate(), cfg).generate(prompt, 3, link)
    assert got == ReferenceModel(w).generate(prompt, 3)
    downs = link.view.select(Stage.GEN_FFN_DOWN)
    assert downs
    by_call: dict[tuple[int, int], list[ViewedMessage]] = {}
    for m in downs:
        by_call.setdefault((m.layer, m.step), []).append(m)
    experts = w.config.n_experts if moe else 1
    for msgs in by_call.values():
        assert len(msgs) == experts
        if moe:
            assert [m.meta["experts"] for m in msgs] == [[e] for e in range(experts)]
            assert [m.meta["last"] for m in msgs] == [False] * (experts - 1) + [True]
        else:
            assert msgs[0].meta.get("last", True) is True


def test_blinding_corrections_derived_ahead_are_metered_offline_and_the_rest_on_the_client() -> None:
    """η·W of a blinded stage is the client's work: ``offline`` when ``precompute`` derived it ahead (the
    prompt's stages and the steps it covered), ``client`` when the request derived it — the same flops."""
    prompt = np.array([3, 1, 4, 1])
    costs = []
    for ahead in (True, False):
        client, link = _tiny_client(KeySchedule.generate()), LocalTransport(Server(NumpyBackend(W)))
        if ahead:
            client.precompute(len(prompt), steps=2)
        client.prefill(prompt, link)
        client.decode(2, link)  # step 0: its masks derived ahead when ahead
        costs.append(client.meter.snapshot())
    before, during = costs
    for stage in (Stage.QKV, Stage.GEN_QKV):  # blinded at level paper (block 0; every step's first block)
        assert before[stage].offline_flops > 0 and during[stage].offline_flops == 0, stage
        assert before[stage].client_flops + before[stage].offline_flops == during[stage].client_flops, stage


def _value_at(
    stage: Stage, layer: int, step: int, key: str, row: int, at: list[int], value: float = np.nan
) -> Callable[[Request, Reply], Reply]:
    """A tampering that sets the first entry of ``row`` of reply ``key`` of (stage, layer, step) to
    ``value`` (a NaN unless given); ``at`` records the number of messages sent when it did."""

    def tamper(req: Request, reply: Reply) -> Reply:
        if (req.stage, req.layer, req.step) != (stage, layer, step) or key not in reply.arrays:
            return reply
        at.append(len(at))
        x = np.array(reply.arrays[key], copy=True)
        x[(row,) + (0,) * (x.ndim - 1)] = value
        return replace(reply, arrays={**reply.arrays, key: x})

    return tamper


_nan_at = _value_at


#: the paper's server-side generation stages (gen_attn, gen_o, gen_head); Gaussian decoys, which read the real
#: rows of the O stage's reply before the FFN stage's rows are built; the clear generation FFN
_NAN_CASES = {
    "paper-server-gen": dict(level="paper", gen_attention="server", gen_linear="server"),
    "permute-gaussian": dict(level="permute", decoys="gaussian"),
    # the guard blocks' generation FFN in one clear message (the paper's), and its last-block offset form
    "clear-guard-ffn": dict(level="paper", guard_ffn="clear", last_ffn="paper"),
}


@pytest.mark.parametrize("verify", [False, True], ids=["unverified", "verified"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("case", list(_NAN_CASES))
def test_a_nan_in_any_row_of_any_reply_is_refused(case: str, moe: bool, verify: bool) -> None:
    """Whichever reply of a generation (prefill, key sharing, steps) and whichever of its rows — a real
    token's or a decoy's — holds a NaN, the client refuses it (IntegrityError) with or without
    verification, before any message derived from it is sent: a reply is never used unread, and a server
    cannot tell decoy rows from real ones by which NaNs are refused."""
    w = tiny_weights(3, moe=moe)
    cfg = SCXConfig(r1=2, r2=2, verify=verify, **_NAN_CASES[case])  # type: ignore[arg-type]
    prompt = np.array([3, 1, 4])
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    Client(NumpyBackend(w), KeySchedule.generate(), cfg).generate(prompt, 3, link)
    first: dict[tuple[Stage, str], tuple[int, int, int]] = {}
    for r in link.view.replies:
        for key, a in r.arrays.items():
            if a.ndim and a.size and np.issubdtype(a.dtype, np.floating):
                first.setdefault((r.stage, key), (r.layer, r.step, a.shape[0]))
    assert {Stage.QKV, Stage.ATTN, Stage.O, Stage.FFN, Stage.HEAD, Stage.GEN_QKV} <= {s for s, _ in first}
    for (stage, key), (layer, step, rows) in first.items():
        for row in range(rows):
            at: list[int] = []
            inner = LocalTransport(Server(NumpyBackend(w)), record_view=True)
            tampered = TamperingTransport(inner, _nan_at(stage, layer, step, key, row, at))
            with pytest.raises(IntegrityError) as info:
                Client(NumpyBackend(w), KeySchedule.generate(), cfg).generate(prompt, 3, tampered)
            if verify and stage not in (Stage.GEN_LAST, Stage.GEN_MID):  # (scanned on arrival, then checked)
                # found by the value check, which reads every entry: a checked reply is read once, not also
                # scanned on arrival (check_reply's value_checked)
                assert str(info.value).endswith(" is not finite"), (stage, key, row, str(info.value))
            # refused on arrival or in the pass that reads it: no message derived from it was sent
            last = inner.view.messages[-1]
            assert at == [0] and (last.stage, last.layer, last.step) == (stage, layer, step), (
                stage,
                key,
                row,
            )


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32-wide"])
def test_a_blinded_stage_of_rows_the_model_made_non_finite_is_the_models_error(dtype: Any) -> None:
    """An embedding row of zeros at rms_eps = 0 makes RMSNorm's 0/0: the client's own rows are NaN before
    the blinded block-0 QKV stage is sent — NonFiniteError naming the stage (the client's fault, not the
    server's), in float64 and in a float32 session that blinds in float64 (β = 5 above float32's limit)."""
    w = tiny_weights(0, rms_eps=0.0)
    w.embed[3] = 0.0
    client = Client(NumpyBackend(w, dtype), KeySchedule.generate(), SCXConfig(level="paper", r1=3, beta=5.0))
    assert client.wide is (dtype is np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's 0/0
        with refused(NonFiniteError, "qkv of block 0, before it was sent: x holds NaN or Inf in float64"):
            client.prefill(np.array([5, 3, 7]), LocalTransport(Server(NumpyBackend(w, dtype))))
    assert client.state is not None and client.state.failed


def _scaled_at(stage: Stage, layer: int, step: int, key: str) -> Callable[[Request, Reply], Reply]:
    """A tampering that scales reply ``key`` of (stage, layer, step) by 1.5 and shifts it by 0.25."""

    def tamper(req: Request, reply: Reply) -> Reply:
        if (req.stage, req.layer, req.step) != (stage, layer, step) or key not in reply.arrays:
            return reply
        return replace(reply, arrays={**reply.arrays, key: np.asarray(reply.arrays[key]) * 1.5 + 0.25})

    return tamper


def test_a_changed_reply_is_refused_by_the_check_of_its_stage_and_block() -> None:
    """Every value-checked reply of a generation (the paper's server-side generation stages included),
    changed by the server, is refused by its stage's check, whose IntegrityError names the stage and
    the block it was for (the LM head's, after the last block, the stage alone: it said "block -1")."""
    w = tiny_weights(3)
    cfg = SCXConfig(level="paper", r1=2, r2=2, gen_attention="server", gen_linear="server")
    prompt = np.array([3, 1, 4])
    link = LocalTransport(Server(NumpyBackend(w)), record_view=True)
    Client(NumpyBackend(w), KeySchedule.generate(), cfg).generate(prompt, 3, link)
    first: dict[tuple[Stage, str], tuple[int, int]] = {}
    for r in link.view.replies:
        for key, a in r.arrays.items():
            if r.stage is not Stage.GEN_MID and a.size and np.issubdtype(a.dtype, np.floating):
                first.setdefault((r.stage, key), (r.layer, r.step))
    assert {Stage.QKV, Stage.ATTN, Stage.GEN_ATTN, Stage.GEN_QKV, Stage.GEN_O} <= {s for s, _ in first}
    for (stage, key), (layer, step) in first.items():
        tampered = TamperingTransport(
            LocalTransport(Server(NumpyBackend(w))), _scaled_at(stage, layer, step, key)
        )
        with pytest.raises(IntegrityError) as info:
            Client(NumpyBackend(w), KeySchedule.generate(), cfg).generate(prompt, 3, tampered)
        where = stage.value if stage in (Stage.HEAD, Stage.GEN_HEAD) else f"{stage.value} of block {layer}"
        assert str(info.value).startswith(f"{where}: "), (stage, key, str(info.value))


def test_the_papers_last_guard_ffn_adds_each_steps_own_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """``last_ffn="paper"``: the last guard block's FFN row of step t is h + α_t, α_t the plan's offset
    release for that block at that step (one row, the model's width) — a fresh offset per step, never the
    prompt's (step None) or another block's."""
    from scx_ref.protocol.keyring import RequestKeys

    calls: list[tuple[int, int | None, int, int]] = []
    original = RequestKeys.noise

    def noise(self: RequestKeys, release: Any, step: int | None, rows: int, width: int) -> Any:
        if release.stage is Stage.GEN_FFN:
            calls.append((release.block, step, rows, width))
        return original(self, release, step, rows, width)

    monkeypatch.setattr(RequestKeys, "noise", noise)
    client = Client(NumpyBackend(W), KeySchedule.generate(), SCXConfig(level="paper", last_ffn="paper"))
    link = LocalTransport(Server(NumpyBackend(W)), record_view=True)
    client.generate(np.array([2, 7, 1]), 4, link)
    last = client.last
    assert last and calls == [(i, t, 1, W.config.hidden_size) for t in range(3) for i in last]
    sent = link.view.select(Stage.GEN_FFN, last[0], 0)
    assert len(sent) == 1 and sent[0].arrays["x"].shape == (1, W.config.hidden_size)


@pytest.mark.parametrize("row", [0, 2, 4], ids=["row0", "row2", "row4"])
def test_a_nan_in_the_unverified_logits_is_refused_naming_the_reply(row: int) -> None:
    """Unverified, the logits are tested as their decode moves them (a real row's or a decoy's): the
    refusal names the stage and the reply array."""

    def tamper(req: Request, reply: Reply) -> Reply:
        if req.stage is not Stage.HEAD:
            return reply
        x = np.array(reply.arrays["logits"], copy=True)
        x[row, 1] = np.nan
        return replace(reply, arrays={"logits": x})

    client = Client(
        NumpyBackend(W), KeySchedule.generate(), SCXConfig(level="paper", r1=2, r2=2, verify=False)
    )
    link = TamperingTransport(LocalTransport(Server(NumpyBackend(W))), tamper)
    with refused(IntegrityError, "head: reply head.logits holds NaN or Inf in float64"):
        client.prefill(np.array([1, 2, 3]), link)


@pytest.mark.parametrize("attention", ["server", "client"], ids=["locked-caches", "client-attention"])
def test_the_verification_flops_metered_are_the_verifiers_own_count(attention: str) -> None:
    """Each reply check adds what it cost (the verifier's count after it less before it): summed over the
    stages, the meter's verification flops are the verifier's whole count for the session — the sketches
    of the last guard blocks' locked key caches included (they were not metered), and with the client's
    own attention in its guard blocks, which locks none."""
    cfg = SCXConfig(level="paper", r1=2, r2=2, attention=attention)  # type: ignore[arg-type]
    client = Client(NumpyBackend(W), KeySchedule.generate(), cfg)
    link = LocalTransport(Server(NumpyBackend(W)))
    client.generate(np.array([3, 1, 4]), 3, link)
    verifier = client.state.verifier if client.state is not None else None
    assert verifier is not None and verifier.flops > 0
    assert sum(cost.verify_flops for cost in client.meter.snapshot().values()) == verifier.flops


def test_the_prompts_logits_are_decoded_in_the_replys_own_memory() -> None:
    """The logits (n × V, the largest array of a prefill) are put in true order inside the reply's own
    array, not copied into a second one."""
    replies: list[Any] = []

    def keep(req: Request, reply: Reply) -> Reply:
        if req.stage is Stage.HEAD:
            replies.append(reply.arrays["logits"])
        return reply

    client = _tiny_client(KeySchedule.generate())
    logits = client.prefill(
        np.array([3, 1, 4]), TamperingTransport(LocalTransport(Server(NumpyBackend(W))), keep)
    )
    np.testing.assert_allclose(logits, ReferenceModel(W).prefill(np.array([3, 1, 4]))[0], rtol=1e-9)
    assert len(replies) == 1 and np.shares_memory(logits, replies[0])


def test_a_changed_step_attention_reply_is_refused_naming_its_block() -> None:
    """The paper's server-side generation attention (gen_attention="server"): a changed output of a first
    guard block's step is refused by the recompute of its one row, naming the stage and the block."""
    cfg = SCXConfig(level="paper", r1=2, r2=2, gen_attention="server")
    link = TamperingTransport(LocalTransport(Server(NumpyBackend(W))), _scaled_at(Stage.GEN_ATTN, 0, 1, "o"))
    with pytest.raises(IntegrityError) as info:
        Client(NumpyBackend(W), KeySchedule.generate(), cfg).generate(np.array([3, 1, 4]), 4, link)
    assert str(info.value).startswith("gen_attn of block 0: a recomputed attention row failed verification")


def test_the_papers_server_side_step_attention_runs_on_the_torch_backend() -> None:
    """gen_attention="server" on the torch backend: the step's attention output comes back as a tensor,
    is unpermuted in the backend and the tokens are plaintext greedy decoding's."""
    torch = pytest.importorskip("torch")
    from scx_ref.backends.torch_backend import TorchBackend

    cfg = SCXConfig(level="paper", r1=2, r2=2, gen_attention="server")
    link = LocalTransport(Server(TorchBackend(W, torch.float64)))
    prompt = np.array([3, 1, 4])
    got = Client(TorchBackend(W, torch.float64), KeySchedule.generate(), cfg).generate(prompt, 4, link)
    assert got == ReferenceModel(W).generate(prompt, 4)


@pytest.mark.parametrize(
    ("level", "stage", "key", "message"),
    [
        ("permute", Stage.FFN, "y", "ffn: reply ffn.y (in the residual sum) holds NaN or Inf in float64"),
        ("paper", Stage.QKV, "z", "qkv: y holds NaN or Inf in float64"),
    ],
    ids=["plain-ffn", "blinded-qkv"],
)
@pytest.mark.parametrize("row", [0, 4], ids=["real-row", "decoy-row"])
def test_an_unverified_reply_holding_nan_is_refused_by_the_pass_that_uses_it(
    level: str, stage: Stage, key: str, message: str, row: int
) -> None:
    """Unverified, a reply that the next pass reads whole — the residual add of a plain FFN reply, the
    unblinding of a blinded QKV reply — is not also scanned on arrival: a NaN in any of its rows is refused by
    that pass, under that pass's name for it (one read of the reply, not two)."""
    cfg = SCXConfig(level=level, r1=2, r2=2, verify=False)  # type: ignore[arg-type]
    at: list[int] = []
    link = TamperingTransport(LocalTransport(Server(NumpyBackend(W))), _nan_at(stage, 0, -1, key, row, at))
    with refused(IntegrityError, message):
        Client(NumpyBackend(W), KeySchedule.generate(), cfg).prefill(np.array([3, 1, 4]), link)
    assert at == [0]


@pytest.mark.parametrize(
    ("stage", "key", "names"),
    [(Stage.QKV, "z", "reply qkv[.]z"), (Stage.O, "y", "reply o[.]y|reencoded sum")],
    ids=["qkv", "o"],
)
def test_a_wide_reply_past_the_float32_range_is_the_servers_error(stage: Stage, key: str, names: str) -> None:
    """A float32 session blinded in float64, unverified: a blinded reply holding 1e39 in any row — finite in
    float64, past float32's range once unblinded — is refused as the server's (IntegrityError, naming the
    stage) by the pass that reads it in float32, before any message derived from it is sent: the conversion
    back to float32 does not refuse it first as a bare NonFiniteError."""
    cfg = SCXConfig(level="blind", r1=2, r2=2, verify=False, blind_dtype="float64")
    for row in range(3 + 2):  # n = 3 real rows and 2 decoys, in the reply's (permuted) order
        inner = LocalTransport(Server(NumpyBackend(W, np.float32)), record_view=True)
        link = TamperingTransport(inner, _value_at(stage, 0, -1, key, row, [], 1e39))
        client: Client[Any] = Client(NumpyBackend(W, np.float32), KeySchedule.generate(), cfg)
        assert client.wide
        with pytest.raises(SCXError) as info:
            client.prefill(np.array([3, 1, 4]), link)
        assert type(info.value) is IntegrityError, (row, info.value)
        assert re.fullmatch(f"{stage.value}: ({names}) holds NaN or Inf( in float32)?", str(info.value)), row
        last = inner.view.messages[-1]
        assert (last.stage, last.layer) == (stage, 0)


def _unverified_refusals(stage: Stage, key: str) -> list[str]:
    """The refusal of an unverified level-permute prefill whose ``stage`` reply of block 0 holds a NaN in
    row j, for each of its n + r = 5 rows (one set of keys, so one permutation, for every row)."""
    cfg = SCXConfig(level="permute", r1=2, r2=2, verify=False)
    seen: list[str] = []
    for row in range(3 + 2):
        at: list[int] = []
        link = TamperingTransport(
            LocalTransport(Server(NumpyBackend(W))), _nan_at(stage, 0, -1, key, row, at)
        )
        with pytest.raises(IntegrityError) as info:
            keys = KeySchedule(bytes([7]) * 32, (99).to_bytes(16, "big"))
            Client(NumpyBackend(W), keys, cfg).prefill(np.array([3, 1, 4]), link)
        seen.append(str(info.value))
        assert at == [0]
    return sorted(seen)


def test_an_unverified_qkv_reply_is_read_by_the_decoding_pass_and_its_decoys_by_the_scan() -> None:
    """Unverified, level permute: a NaN in a real row of the QKV reply is refused by the pass that decodes
    the real rows (in the dtype it reads them), one in a decoy row by the scan of the rows that pass drops —
    so each row is read once: of the n + r₁ = 5 rows, 3 are refused the first way and 2 the second."""
    assert (
        _unverified_refusals(Stage.QKV, "z")
        == ["qkv: reply qkv.z holds NaN or Inf"] * 2 + ["qkv: reply qkv.z holds NaN or Inf in float64"] * 3
    )


def test_an_unverified_o_reply_is_read_by_the_residual_sum_and_its_decoys_by_the_scan() -> None:
    """The same for the O stage's reply: its real rows are read by the residual sum that re-encodes them
    for the FFN stage, its r₂ = 2 decoy rows by the scan of the rows that sum drops."""
    assert (
        _unverified_refusals(Stage.O, "y")
        == ["o: reencoded sum holds NaN or Inf in float64"] * 3 + ["o: reply o.y holds NaN or Inf"] * 2
    )


def _torch_sends_what_numpy_sends(cfg: SCXConfig, nonce: int) -> list[Stage]:
    """A prefill under ``cfg`` by a numpy and a torch client with the same keys: every message the server
    receives is the same (float64, to 1e-12: the two backends round the blinding's sums apart in the last
    bit), and so are the logits. Returns the stages sent."""
    from scx_ref.backends.torch_backend import TorchBackend

    views, logits = [], []
    for backend in (NumpyBackend(W), TorchBackend(W, dtype="float64")):
        link = LocalTransport(Server(backend), record_view=True)
        keys = KeySchedule(bytes([9]) * 32, nonce.to_bytes(16, "big"))
        logits.append(np.asarray(Client(backend, keys, cfg).prefill(np.array([3, 1, 4]), link)))
        views.append(link.view.messages)
    stages = [m.stage for m in views[0]]
    assert stages == [m.stage for m in views[1]]
    for a, b in zip(*views, strict=True):
        assert sorted(a.arrays) == sorted(b.arrays), a.stage
        for k in a.arrays:
            want = np.asarray(a.arrays[k])
            np.testing.assert_allclose(
                np.asarray(b.arrays[k]), want, rtol=1e-12, atol=1e-12, err_msg=f"{a.stage} {k}"
            )
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-12, atol=1e-12)
    return stages


def test_client_side_attention_on_torch_sends_what_numpy_sends() -> None:
    """attention="client" on the torch backend: the client's own attention of the guard blocks and the O
    stage's encoding run on torch tensors, and the server receives what the numpy client sends."""
    stages = _torch_sends_what_numpy_sends(SCXConfig(level="paper", attention="client", r1=2, r2=2), 77)
    assert Stage.O in stages


@pytest.mark.parametrize(
    ("decoys", "message"),
    [
        # the O stage's encoding reads every entry of o as it writes the message: o is not scanned on arrival
        ("calibration", "attn: o and decoys holds NaN or Inf in float64"),
        # Gaussian decoys read the real rows of o first (their statistics): o is scanned on arrival
        ("gaussian", "attn: reply attn.o holds NaN or Inf in float64"),
    ],
    ids=["calibration", "gaussian"],
)
@pytest.mark.parametrize("row", [0, 1, 2])
def test_an_unverified_attention_reply_is_read_once_by_the_first_pass_that_uses_it(
    decoys: str, message: str, row: int
) -> None:
    """Unverified, level permute: a NaN in any row of the attention reply is refused by the first pass that
    reads it — the O stage's encoding, or (for a decoy policy that reads the real rows) the scan on arrival
    — and nothing derived from it is sent."""
    cfg = SCXConfig(level="permute", r1=2, r2=2, verify=False, decoys=decoys)  # type: ignore[arg-type]
    at: list[int] = []
    inner = LocalTransport(Server(NumpyBackend(W)), record_view=True)
    link = TamperingTransport(inner, _nan_at(Stage.ATTN, 0, -1, "o", row, at))
    with refused(IntegrityError, message):
        Client(NumpyBackend(W), KeySchedule.generate(), cfg).prefill(np.array([3, 1, 4]), link)
    assert at == [0] and inner.view.messages[-1].stage is Stage.ATTN


def test_a_prefill_meters_rope_and_two_residual_adds_a_block() -> None:
    """The client's elementwise counts at level permute (the linear maps and the MLP are the server's): under
    the QKV stage, RoPE's three operations per entry of the n real rows' Q and K; under the FFN stage, the
    block's two residual adds, (n + r₁)·d entries each — for every block."""
    cfg = SCXConfig(level="permute", r1=2, r2=2)
    client: Client[Any] = Client(NumpyBackend(W), KeySchedule.generate(), cfg)
    client.prefill(np.array([3, 1, 4]), LocalTransport(Server(NumpyBackend(W))))
    c, stages = W.config, client.meter.stages
    assert c.q_dim != c.kv_dim  # GQA: a sum and a difference of the widths differ from each other
    assert stages[Stage.QKV].client_elementwise == c.n_layers * 3 * 3 * (c.q_dim + c.kv_dim)
    assert stages[Stage.FFN].client_elementwise == c.n_layers * 2 * (3 + 2) * c.hidden_size


def test_gaussian_decoys_on_torch_send_what_numpy_sends() -> None:
    """Gaussian decoys read the real rows (the attention output in true order, the residual stream H′)
    before the rows that carry them are built: on the torch backend the server receives what the numpy
    client sends."""
    _torch_sends_what_numpy_sends(SCXConfig(level="permute", decoys="gaussian", r1=2, r2=2), 78)


_BAD_ARGS = {
    "backend": ({"backend": 5}, "backend must be a Backend, got int"),
    "keys": ({"keys": "key"}, "keys must be a KeySchedule, got str"),
    "config": ({"config": {}}, "config must be an SCXConfig, got dict"),
    "sketches": ({"sketches": 1}, "sketches must be a SketchCache, got int"),
    # a decoy policy has a bool needs_real and a callable draw
    "decoys-without-draw": (
        {"decoys": SimpleNamespace(needs_real=True)},
        "decoys must be a DecoyPolicy, got SimpleNamespace",
    ),
    "decoys-needs-real-not-bool": (
        {"decoys": SimpleNamespace(needs_real=1, draw=lambda *a: None)},
        "decoys must be a DecoyPolicy, got SimpleNamespace",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_ARGS))
def test_each_constructor_argument_of_the_wrong_kind_is_refused_by_name(case: str) -> None:
    given, message = _BAD_ARGS[case]
    args: dict[str, Any] = {"backend": NumpyBackend(W), "keys": KeySchedule.generate(), **given}
    with refused(ProtocolError, message):
        Client(**args)


def test_a_message_without_a_usable_session_says_why() -> None:
    """decode before any prefill, after the session failed, after it closed: three ProtocolErrors, each
    saying what to do."""
    client: Client[Any] = Client(NumpyBackend(W), KeySchedule.generate(), SCXConfig(r1=2, r2=2))
    link = LocalTransport(Server(NumpyBackend(W)))
    with refused(ProtocolError, "no session: call prefill first"):
        client.decode(3, link)
    logits = client.prefill(np.array([3, 1, 4]), link)
    client.close()
    with refused(ProtocolError, "this session is closed; start a new prefill"):
        client.decode(int(np.argmax(logits[-1])), link)
    client.prefill(np.array([3, 1, 4]), link)
    assert client.state is not None
    client.state.fail()
    with refused(ProtocolError, "this session failed on an earlier error; start a new prefill"):
        client.decode(3, link)


_UNIGRAM_REFUSED = (
    "unigram weighs the secret calibration text's draw: it means nothing with decoys, public_tokens or "
    "Gaussian decoys"
)
_UNIGRAM_CASES: dict[str, dict[str, Any]] = {
    "with-decoys": {"decoys": SimpleNamespace(needs_real=False, draw=lambda *a: None)},
    "with-public-tokens": {"public_tokens": np.arange(10)},
    "with-gaussian-decoys": {"config": SCXConfig(r1=2, r2=2, decoys="gaussian")},
}


@pytest.mark.parametrize("case", list(_UNIGRAM_CASES))
def test_a_unigram_with_another_decoy_source_is_refused(case: str) -> None:
    args: dict[str, Any] = {"unigram": np.ones(W.config.vocab_size), **_UNIGRAM_CASES[case]}
    with refused(ProtocolError, _UNIGRAM_REFUSED):
        Client(NumpyBackend(W), KeySchedule.generate(), **args)


@pytest.mark.parametrize("config", [None, SCXConfig(r1=2, r2=2)], ids=["no-config", "calibration"])
def test_a_unigram_alone_is_taken_and_checked_against_the_vocabulary(config: SCXConfig | None) -> None:
    """With the secret calibration text as the decoy source (no config, or its default), a unigram of
    vocab_size weights is taken; one of another length is refused by its own check."""
    V = W.config.vocab_size
    Client(NumpyBackend(W), KeySchedule.generate(), config, unigram=np.ones(V))
    with refused(ShapeError, f"unigram must be 1-D of length vocab_size = {V}, got shape ({V + 1},)"):
        Client(NumpyBackend(W), KeySchedule.generate(), config, unigram=np.ones(V + 1))


def test_the_constructors_other_refusals_say_what_to_do() -> None:
    """A (master secret, nonce) pair that already drove a session, a max_length past the model's, and a sketch
    cache of another backend or another master secret: each refused, with its whole message."""
    from scx_ref.protocol.verify import SketchCache

    b = NumpyBackend(W)
    keys = KeySchedule.generate()
    Client(b, keys, SCXConfig(r1=2, r2=2)).prefill(np.array([3, 1, 4]), LocalTransport(Server(b)))
    with refused(
        SessionError,
        "this KeySchedule's (master secret, nonce) pair already drove a session: a pair drives one session "
        "only (use KeySchedule.generate() or a fresh nonce)",
    ):
        Client(b, keys)
    top = W.config.max_positions
    with refused(ProtocolError, f"max_length {top + 1} exceeds the model's max_positions {top}"):
        Client(b, KeySchedule.generate(), SCXConfig(max_length=top + 1))
    mine = KeySchedule.generate()
    with refused(ProtocolError, "the sketch cache belongs to another backend"):
        Client(b, mine, sketches=SketchCache(NumpyBackend(W), mine))
    with refused(
        ProtocolError,
        "the sketch cache belongs to another master secret: its check vectors are known to whoever holds "
        "that secret (build a SketchCache from this client's KeySchedule)",
    ):
        Client(b, mine, sketches=SketchCache(b, KeySchedule.generate()))


def test_the_worst_check_margin_starts_at_zero_and_stays_below_one_on_an_honest_server() -> None:
    """``verify_worst`` is the largest |residual| / tolerance of any check the client made: 0.0 before any,
    and in (0, 1) after an honest prefill (every check passed, none exactly)."""
    client: Client[Any] = Client(NumpyBackend(W), KeySchedule.generate(), SCXConfig(r1=2, r2=2))
    assert client.verify_worst == 0.0
    client.prefill(np.array([3, 1, 4]), LocalTransport(Server(NumpyBackend(W))))
    assert 0.0 < client.verify_worst < 1.0


@pytest.mark.parametrize(
    ("last_ffn", "wide"),
    [("paper", True), ("exact", False)],
    ids=["generation-offset-only", "nothing-noised"],
)
def test_a_session_is_wide_when_any_message_is_noised(last_ffn: str, wide: bool) -> None:
    """blind_dtype float64 on a float32 backend at level permute: the prefill noises nothing, and generation
    only the paper's last-guard offset (last_ffn="paper") — which is enough for the session to blind in
    float64; with nothing noised at all it stays float32."""
    cfg = SCXConfig(level="permute", r1=2, r2=2, last_ffn=last_ffn, blind_dtype="float64")  # type: ignore[arg-type]
    client: Client[Any] = Client(NumpyBackend(W, np.float32), KeySchedule.generate(), cfg)
    assert not client.plan.prefill and bool(client.plan.generation) is wide
    assert client.wide is wide


def test_gaussian_decoys_are_the_clients_policy_when_configured() -> None:
    from scx_ref.protocol.decoys import CalibrationPool, GaussianDecoys

    gaussian = Client(NumpyBackend(W), KeySchedule.generate(), SCXConfig(r1=2, r2=2, decoys="gaussian"))
    assert isinstance(gaussian.decoys, GaussianDecoys) and gaussian.decoys.needs_real
    default: Client[Any] = Client(NumpyBackend(W), KeySchedule.generate(), SCXConfig(r1=2, r2=2))
    assert isinstance(default.decoys, CalibrationPool) and not default.decoys.needs_real


@pytest.mark.parametrize(("gen_linear", "warns"), [("client", False), ("server", True)])
def test_the_precision_warning_weighs_the_betas_the_plan_sends(gen_linear: str, warns: bool) -> None:
    """A β of 1e4 for the O stage is past float32's limit, but level paper sends O blinded only where the
    server runs the guard blocks' W_o in generation: the client warns (PrecisionWarning) for the β its
    plan sends, not for every β its configuration names."""
    from scx_ref.errors import PrecisionWarning

    cfg = SCXConfig(
        level="paper",
        r1=2,
        r2=2,
        beta=1.0,
        stage_beta={"o": 1e4},
        gen_linear=gen_linear,  # type: ignore[arg-type]
        blind_dtype="backend",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Client(NumpyBackend(W, np.float32), KeySchedule.generate(), cfg)
    assert any(issubclass(w.category, PrecisionWarning) for w in caught) is warns


def test_public_tokens_are_checked_against_the_vocabulary_and_serve_as_decoys() -> None:
    """public_tokens: the decoy rows are drawn from these token ids (checked against the model's vocabulary:
    VocabularyError for one outside it), and a prefill with them is exact."""
    from scx_ref.errors import VocabularyError

    V = W.config.vocab_size
    with refused(VocabularyError, f"token ids must lie in [0, {V}), got range [1, {V}]"):
        Client(NumpyBackend(W), KeySchedule.generate(), SCXConfig(r1=2, r2=2), public_tokens=np.array([1, V]))
    client: Client[Any] = Client(
        NumpyBackend(W), KeySchedule.generate(), SCXConfig(r1=2, r2=2), public_tokens=np.arange(10)
    )
    got = client.prefill(np.array([3, 1, 4]), LocalTransport(Server(NumpyBackend(W))))
    want, _ = ReferenceModel(W).prefill(np.array([3, 1, 4]))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)

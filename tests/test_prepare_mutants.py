"""Tests that kill mutants of :mod:`scx_ref.protocol.prepare` that survived ``python -m mutation.run prepare``
(mutation/REPORT_prepare_pool.md): each checks a documented property of a request's prepared keys — the
background job's thread (daemon, named) and its re-raised error, the refusals of ``n``, ``step``, ``steps``,
``rows``, ``width`` and the decoy count (the error class, the argument named, each exact message), the
blinding backend, each permutation derived once, named in its error and of its own block, the head
permutations kept across a rebind and handed out warm, the decoy rows' width, dtype and the real rows a
policy is given, the held (η, η·W) pairs — their shapes, their bytes by kind and dtype, served or narrowed
without deriving noise —, what :meth:`~PreparedKeys.fill` derives (or not) for each configuration, and its
seconds under a fake clock."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, DTypeError, PermutationError, ProtocolError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, SCXConfig
from scx_ref.protocol import prepare as prepare_module
from scx_ref.protocol.plan import Phase, Release
from scx_ref.protocol.prepare import BackgroundJob, PreparedKeys
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

W = tiny_weights(7)
MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))
N = 3
L = W.config.n_layers


def _client(weights: Any = W, **fields: Any) -> Client[Any]:
    """A blinding client (replies verified) of the tiny model; ``fields`` change its SCXConfig."""
    cfg = SCXConfig(**{"level": "blind", "max_length": 8, **fields})
    return Client(NumpyBackend(weights), KeySchedule(MASTER, NONCE), cfg)


def _prep(n: int = N, client: Client[Any] | None = None, **fields: Any) -> PreparedKeys[Any]:
    """Fresh prepared keys (nothing derived yet) of a request of ``n`` tokens under NONCE."""
    client = _client(**fields) if client is None else client
    return client._new_prepared(NONCE, n)


def _refuse(*_: Any) -> Any:
    raise AssertionError("derived again")


def _same_head(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.group_order, b.group_order) and np.array_equal(a.sigmas, b.sigmas))


def _call_blinding(prep: PreparedKeys[Any], release: Release, step: int | None, rows: int) -> Any:
    which = prepare_module._WEIGHT[release.stage]
    return prep.blinding(release, step, rows, prep._width(release.stage), which, release.block, None)


# -- the background job ------------------------------------------------------------------------------


def test_a_background_job_re_raises_the_error_its_work_raised() -> None:
    """wait() re-raises the first error a started function raised (once)."""
    job = BackgroundJob()

    def fail() -> None:
        raise ValueError("boom")

    job.start(fail, "failing")
    with pytest.raises(ValueError, match=r"^boom$"):
        job.wait()
    job.wait()  # raised once


def test_a_background_job_runs_its_work_in_a_daemon_thread_of_the_given_name() -> None:
    """Each function runs in a daemon thread named as asked."""
    job = BackgroundJob()
    seen: list[tuple[str, bool]] = []
    job.start(
        lambda: seen.append((threading.current_thread().name, threading.current_thread().daemon)), "x-1"
    )
    job.wait()
    assert seen == [("x-1", True)]


def test_start_runs_fill_in_a_daemon_thread_named_scx_precompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """PreparedKeys.start runs fill(steps) in a daemon thread named scx-precompute."""
    prep = _prep()
    seen: list[tuple[str, bool, int]] = []

    def fill(steps: int = 0) -> None:
        seen.append((threading.current_thread().name, threading.current_thread().daemon, steps))

    monkeypatch.setattr(prep, "fill", fill)
    prep.start(2)
    prep.wait()
    assert seen == [("scx-precompute", True, 2)]


# -- construction and bind ---------------------------------------------------------------------------


def test_prepared_keys_keep_the_blinding_backend_given_else_the_backend() -> None:
    """bb is blind_backend when one is given, the backend itself when not."""
    client = _client()
    keys = _prep(client=client).keys
    wide = NumpyBackend(W)
    given = PreparedKeys(keys, client.b, client.cfg, client.plan, client.decoys, N, wide)
    assert given.bb is wide and given.b is client.b
    plain = PreparedKeys(keys, client.b, client.cfg, client.plan, client.decoys, N)
    assert plain.bb is client.b


@pytest.mark.parametrize(
    ("n", "message"),
    [
        (0, r"^n must be >= 1, got 0$"),
        (2.5, r"^n must be an integer, got float 2.5$"),
        (True, r"^n must be an integer, got bool True$"),
    ],
    ids=["zero", "float", "bool"],
)
def test_prepared_keys_refuse_a_length_below_one_or_not_an_integer(n: Any, message: str) -> None:
    """n must be an integer >= 1: ProtocolError naming n, with its bound."""
    client = _client()
    keys = _prep(client=client).keys
    with pytest.raises(ProtocolError, match=message):
        PreparedKeys(keys, client.b, client.cfg, client.plan, client.decoys, n)


def test_prepared_keys_serve_a_one_token_prompt() -> None:
    """n = 1 is the smallest length accepted: its π_0 spans 1 + r₁ rows."""
    prep = _prep(1)
    assert prep.n == 1 and len(prep.token_perm(0)) == 1 + prep.cfg.r1


@pytest.mark.parametrize(
    ("n", "message"),
    [
        (0, r"^n must lie in \[1, 3\], got 0$"),
        (4, r"^n must lie in \[1, 3\], got 4$"),
        (2.5, r"^n must be an integer, got float 2.5$"),
    ],
    ids=["zero", "longer", "float"],
)
def test_bind_refuses_a_length_outside_one_to_the_derived_one(n: Any, message: str) -> None:
    """bind(n) needs an integer in [1, the derived n]: ProtocolError naming n and both bounds."""
    prep = _prep()
    with pytest.raises(ProtocolError, match=message):
        prep.bind(n)
    assert prep.n == N


def test_bind_to_a_shorter_prompt_keeps_each_blocks_head_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    """After bind to a shorter n, block(i) re-derives π for n but keeps the P_i it held (none derived)."""
    prep = _prep().fill()
    heads = [prep.block(i).head for i in range(L)]
    prep.bind(2)
    monkeypatch.setattr(prep.keys, "head_perm", _refuse)
    for i in range(L):
        bk = prep.block(i)
        assert bk.head is heads[i] and len(bk.pi) == 2 + prep.cfg.r1


# -- permutations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "name", "call"),
    [
        ("token_perm", "π", lambda p: p.token_perm(0)),
        ("o_perm", "π′", lambda p: p.block(0)),
        ("lock_perm", "ρ", lambda p: p.lock_perm(L - 1)),
    ],
    ids=["pi", "pi-o", "rho"],
)
def test_a_key_source_that_returns_no_permutation_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch, method: str, name: str, call: Any
) -> None:
    """A derived index that is not a permutation is refused by the key's name (π, π′, ρ)."""
    prep = _prep()
    monkeypatch.setattr(prep.keys, method, lambda block, rows: np.zeros(rows, dtype=np.int64))
    with pytest.raises(PermutationError, match=f"^{name} is not a permutation of 0"):
        call(prep)


def test_each_permutation_is_derived_once_and_kept() -> None:
    """token_perm, block and lock_perm return the same object when asked again (derived once)."""
    prep = _prep()
    assert prep.token_perm(0) is prep.token_perm(0)
    assert prep.block(1) is prep.block(1)
    assert prep.lock_perm(L - 1) is prep.lock_perm(L - 1)


def test_lock_permutations_are_those_of_their_own_block() -> None:
    """ρ_b over n + r_lock rows is the key schedule's ρ of block b, whichever block was asked first."""
    prep = _prep()
    rows = N + prep.cfg.lock_decoys
    for block in (3, 2, 1):
        assert np.array_equal(prep.lock_perm(block).forward, prep.keys.lock_perm(block, rows))
    assert not np.array_equal(prep.keys.lock_perm(3, rows), prep.keys.lock_perm(2, rows))


# -- head permutations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "message"),
    [(-1, r"^step must be >= 0, got -1$"), (2.5, r"^step must be an integer, got float 2.5$")],
    ids=["negative", "float"],
)
def test_gen_head_refuses_a_negative_or_non_integer_step(step: Any, message: str) -> None:
    """gen_head's step must be an integer >= 0: ProtocolError naming step."""
    with pytest.raises(ProtocolError, match=message):
        _prep().gen_head(0, step)


def test_gen_head_derives_the_steps_own_head_permutation_on_demand() -> None:
    """With nothing held, gen_head(block, step) is the schedule's P of that block and step."""
    prep = _prep()
    hp = prep.gen_head(2, 1)
    assert _same_head(hp, prep.keys.head_perm(2, 1))
    assert not _same_head(hp, prep.keys.head_perm(2)) and not _same_head(hp, prep.keys.head_perm(1))


def test_fill_derives_the_server_attention_steps_head_permutations_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With server generation attention, fill(steps) holds each step's P; gen_head hands it out once."""
    prep = _prep(gen_attention="server")
    blocks = list(prep.cfg.server_gen_attention(L))
    assert blocks
    want = {(i, t): prep.keys.head_perm(i, t) for i in blocks for t in range(2)}
    prep.fill(2)
    monkeypatch.setattr(prep.keys, "head_perm", _refuse)
    for (i, t), expected in want.items():
        assert _same_head(prep.gen_head(i, t), expected)
    with pytest.raises(AssertionError, match="derived again"):
        prep.gen_head(blocks[0], 0)  # dropped once read


def test_a_head_permutation_handed_out_has_its_gather_indices_computed() -> None:
    """P_i and a step's P come with flat_index(G, inverse), flat_index(1) and stacked_index((G, 1)) cached."""
    weights = tiny_weights(7, n_kv_heads=1)  # G = 4
    prep = _prep(client=_client(weights))
    g = weights.config.n_heads // weights.config.n_kv_heads
    for hp in (prep.block(0).head, prep.gen_head(0, 0)):
        assert set(hp._flat) == {(g, True), (1, False), (g, False)}
        assert set(hp._stacked) == {((g, 1), False)}


# -- decoys -------------------------------------------------------------------------------------------------


class _Policy:
    """A decoy policy that records the real rows it is given and returns ``rows`` (default: zeros)."""

    def __init__(self, needs_real: bool, rows: Any = None) -> None:
        self.needs_real = needs_real
        self.rows = rows
        self.real: list[Any] = []

    def draw(self, stage: Stage, layer: int, count: int, real: Any, stream: Any) -> Any:
        self.real.append(real)
        return np.zeros((count, 16)) if self.rows is None else self.rows


def _with_policy(policy: _Policy) -> PreparedKeys[Any]:
    client = _client()
    keys = _prep(client=client).keys
    return PreparedKeys(keys, client.b, client.cfg, client.plan, policy, N)  # type: ignore[arg-type]


def test_decoy_count_must_be_an_integer_at_least_zero() -> None:
    """A negative decoy count is a ConfigError naming the decoy count."""
    with pytest.raises(ConfigError, match=r"^decoy count must be >= 0, got -1$"):
        _prep().decoys(Stage.QKV, 0, -1, None)


def test_the_decoy_width_comes_from_the_real_rows_when_given() -> None:
    """Given real rows, the (empty) draw has their width; without them the stage's."""
    prep = _prep()
    assert prep.decoys(Stage.QKV, 0, 0, np.zeros((2, 5))).shape == (0, 5)
    assert prep.decoys(Stage.QKV, 0, 0, None).shape == (0, 16)


def test_a_policy_that_needs_the_real_rows_refuses_none() -> None:
    """A needs_real policy without real rows: ProtocolError saying to pass them."""
    prep = _with_policy(_Policy(True))
    with pytest.raises(
        ProtocolError, match=r"^this decoy policy needs the real rows: pass them as ``real``$"
    ):
        prep.decoys(Stage.QKV, 0, 2, None)


def test_a_policy_that_needs_the_real_rows_gets_them_as_float64() -> None:
    """A needs_real policy is given the real rows as a float64 numpy array of the same values."""
    policy = _Policy(True)
    real = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    _with_policy(policy).decoys(Stage.QKV, 0, 2, real)
    (got,) = policy.real
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and np.array_equal(got, real)


def test_a_policy_that_does_not_need_the_real_rows_gets_an_empty_placeholder() -> None:
    """A policy that does not look at the real rows gets an empty 0 × width placeholder."""
    policy = _Policy(False)
    _with_policy(policy).decoys(Stage.QKV, 0, 2, None)
    (got,) = policy.real
    assert got.shape == (0, 16)


def test_decoy_rows_must_hold_real_numbers() -> None:
    """Boolean decoy rows are a DTypeError naming the stage, layer and dtype."""
    prep = _with_policy(_Policy(False, np.zeros((2, 16), dtype=bool)))
    msg = r"^the decoy policy's rows for \('qkv', layer 0\) must hold real numbers, got dtype bool$"
    with pytest.raises(DTypeError, match=msg):
        prep.decoys(Stage.QKV, 0, 2, None)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
def test_float32_and_integer_decoy_rows_are_accepted_as_float64(dtype: Any) -> None:
    """Real-number rows of any float or integer dtype are accepted and returned as float64."""
    rows = np.arange(32).reshape(2, 16).astype(dtype)
    out = _with_policy(_Policy(False, rows)).decoys(Stage.QKV, 0, 2, None)
    assert out.dtype == np.float64 and np.array_equal(out, rows)


def test_a_single_decoy_row_is_drawn() -> None:
    """A count of 1 gives one row of the stage's width."""
    assert _prep().decoys(Stage.QKV, 0, 1, None).shape == (1, 16)


# -- (η, η·W) pairs --------------------------------------------------------------------------------------


def test_ahead_tells_a_held_pair_from_one_not_derived() -> None:
    """ahead is False before fill, True once derived ahead, False again once the pair was read."""
    prep = _prep()
    release = prep.plan.prefill[0]
    assert not prep.ahead(release, None)
    prep.fill()
    assert prep.ahead(release, None)
    _call_blinding(prep, release, None, N + prep.cfg.r1)
    assert not prep.ahead(release, None)


@pytest.mark.parametrize("argument", ["rows", "width"])
@pytest.mark.parametrize(
    ("bad", "rule"),
    [(-1, r"must be >= 0, got -1$"), (2.5, r"must be an integer, got float 2.5$")],
    ids=["negative", "float"],
)
def test_blinding_refuses_rows_or_width_that_are_not_integers_at_least_zero(
    argument: str, bad: Any, rule: str
) -> None:
    """rows and width must be integers >= 0: ShapeError naming the argument; the held pair is kept."""
    prep = _prep().fill()
    release = prep.plan.prefill[0]
    args = {"rows": N + prep.cfg.r1, "width": 16, argument: bad}
    with pytest.raises(ShapeError, match=f"^{argument} {rule}"):
        prep.blinding(release, None, args["rows"], args["width"], "wqkv", 0, None)
    assert prep.ahead(release, None)


def test_blinding_derives_an_empty_message_for_zero_rows() -> None:
    """rows = 0 is accepted: an empty η and η·W."""
    eta, corr = _prep().blinding(_prep().plan.prefill[0], None, 0, 16, "wqkv", 0, None)
    assert eta.shape == (0, 16) and corr.shape == (0, 32)


def test_blinding_passes_a_zero_width_on_to_the_backends_product() -> None:
    """width = 0 passes blinding's own check: the refusal is the backend's (a 0-wide η times W)."""
    prep = _prep()
    with pytest.raises(ShapeError, match=r"^cannot multiply rows of shape \(5, 0\)"):
        prep.blinding(prep.plan.prefill[0], None, 5, 0, "wqkv", 0, None)


def test_each_held_prefill_pair_is_served_as_is_without_deriving_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fill holds each prefill release's pair at its message's shape (n + r₂ rows at O, n + r₁ elsewhere):
    blinding returns that very pair, deriving no noise."""
    prep = _prep(r2=3).fill()
    held = dict(prep._blinding)
    monkeypatch.setattr(prep.keys, "noise", _refuse)
    stages = set()
    for release in prep.plan.prefill:
        rows = N + (prep.cfg.r2 if release.stage is Stage.O else prep.cfg.r1)
        key = (release.stage, release.block, release.expert, None)
        out = _call_blinding(prep, release, None, rows)
        assert out[0] is held[key][0] and out[1] is held[key][1]
        stages.add(release.stage)
    assert {Stage.O, Stage.QKV} <= stages and prep.mask_bytes_of(False) == 0


def test_a_longer_held_pair_serves_its_first_rows_to_a_shorter_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pair held for more rows serves a shorter message its first rows, deriving no noise."""
    prep = _prep(5).fill()
    release = prep.plan.prefill[0]
    eta, corr = prep._blinding[(release.stage, release.block, release.expert, None)]
    monkeypatch.setattr(prep.keys, "noise", _refuse)
    out = _call_blinding(prep, release, None, 3 + prep.cfg.r1)
    assert np.shares_memory(out[0], eta) and np.array_equal(out[0], eta[: 3 + prep.cfg.r1])
    assert np.array_equal(out[1], corr[: 3 + prep.cfg.r1])


def test_a_held_pair_of_fewer_rows_is_not_served_to_a_longer_message() -> None:
    """A message longer than the held pair gets a fresh pair of its own shape (the held one dropped)."""
    prep = _prep().fill()
    release = prep.plan.prefill[0]
    rows = N + prep.cfg.r1 + 2
    eta, corr = _call_blinding(prep, release, None, rows)
    assert eta.shape == (rows, 16) and corr.shape == (rows, 32) and not prep.ahead(release, None)


def test_mask_bytes_count_each_held_pair_by_kind() -> None:
    """mask_bytes_of(False/True) count the prefill's / the steps' pairs (η and η·W), mask_bytes both."""
    prep = _prep().fill(1)

    def total(step: bool) -> int:
        return sum(e.nbytes + c.nbytes for k, (e, c) in prep._blinding.items() if (k[3] is not None) == step)

    prefill, steps = total(False), total(True)
    assert prefill > 0 and steps > 0
    assert prep.mask_bytes_of(False) == prefill and prep.mask_bytes_of(True) == steps
    assert prep.mask_bytes == prep.mask_bytes_of() == prefill + steps


def test_mask_bytes_count_a_pair_in_the_dtype_it_is_held_in() -> None:
    """A pair held in float32 counts 4 bytes an entry, not the wire dtype's 8."""
    prep = _prep()
    prep._blinding[(Stage.QKV, 0, None, None)] = (np.zeros((2, 3), np.float32), np.zeros((2, 5), np.float32))
    assert prep.mask_bytes == 4 * (6 + 10)


def test_mask_bytes_count_an_array_without_itemsize_at_the_backends_wire_dtype() -> None:
    """An array with no itemsize counts at the blinding backend's numpy dtype (float64: 8 bytes)."""
    prep = _prep()
    prep._blinding[(Stage.QKV, 0, None, None)] = (
        SimpleNamespace(shape=(2, 3)),
        SimpleNamespace(shape=(2, 5)),
    )
    assert prep.mask_bytes == 8 * (6 + 10)


# -- fill / start ------------------------------------------------------------------------------------------


def test_fill_derives_no_generation_step_unless_asked() -> None:
    """fill() with no steps holds the prefill's pairs only."""
    prep = _prep().fill()
    assert prep.mask_bytes_of(False) > 0 and prep.mask_bytes_of(True) == 0


def test_start_derives_no_generation_step_unless_asked() -> None:
    """start() with no steps holds the prefill's pairs only, once waited for."""
    prep = _prep()
    prep.start()
    prep.wait()
    assert prep.mask_bytes_of(False) > 0 and prep.mask_bytes_of(True) == 0


@pytest.mark.parametrize("method", ["fill", "start"])
def test_fill_and_start_refuse_a_negative_step_count_naming_steps(method: str) -> None:
    """A negative steps is a ProtocolError naming steps and its bound."""
    prep = _prep()
    with pytest.raises(ProtocolError, match=r"^steps must be >= 0, got -1$"):
        getattr(prep, method)(-1)
    prep.wait()
    assert prep.remaining == 0


def test_client_attention_derives_no_lock_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    """With client attention there is no locked cache: fill derives no ρ."""
    prep = _prep(attention="client")
    monkeypatch.setattr(prep.keys, "lock_perm", _refuse)
    prep.fill(1)
    assert prep.remaining > 0


def test_a_pool_entry_fill_keeps_the_head_permutations_it_derived(monkeypatch: pytest.MonkeyPatch) -> None:
    """fill(perms=False) holds every P_i: the blocks later built from it derive none again."""
    prep = _prep().fill(perms=False)
    monkeypatch.setattr(prep.keys, "head_perm", _refuse)
    for i in range(L):
        prep.block(i)


def test_a_pool_entry_fill_derives_no_reply_checks() -> None:
    """fill(perms=False) leaves the session's reply checks to its request, even when replies are verified."""
    prep = _prep()
    assert prep.sketches is not None
    prep.fill(perms=False)
    assert prep.verifier is None


def test_fill_keeps_the_reply_checks_it_derived_and_derives_none_unverified() -> None:
    """A second fill keeps the verifier the first derived; without sketches no verifier is derived."""
    prep = _prep().fill()
    verifier = prep.verifier
    assert verifier is not None
    prep.fill()
    assert prep.verifier is verifier
    unverified = _prep(verify=False)
    assert unverified.sketches is None
    assert unverified.fill().verifier is None


def test_fill_derives_the_attention_rows_of_the_prompts_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """fill derives each block's attention-check rows for n: reading them later derives nothing."""
    prep = _prep().fill()
    assert prep.verifier is not None
    monkeypatch.setattr(prep.keys, "verify_rows", _refuse)
    for block in range(L):
        assert prep.verifier.attention_rows(block, N)[-1] == N - 1


def test_fill_reports_its_prefill_and_generation_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """seconds_prefill, seconds_generation and seconds are the clock's differences (fake clock)."""
    clock = iter([10.0, 13.0, 20.0])
    monkeypatch.setattr(prepare_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    prep = _prep().fill(1)
    assert (prep.seconds_prefill, prep.seconds_generation, prep.seconds) == (3.0, 7.0, 10.0)


def test_a_discarded_bundle_refuses_fill_with_its_reason() -> None:
    """fill on discarded keys: ProtocolError saying they serve no request."""
    prep = _prep()
    prep.discard()
    with pytest.raises(ProtocolError, match=r"^these keys were discarded: they serve no request$"):
        prep.fill()


def test_only_linear_non_offset_releases_are_derived_ahead() -> None:
    """A release of a stage without a weight, or of the offset form at any stage, is not derived ahead."""
    client = _client()
    plan = dataclasses.replace(
        client.plan,
        prefill=(Release(Phase.PREFILL, Stage.QKV, 0, "offset", 1.0),),
        generation=(Release(Phase.GENERATE, Stage.GEN_FFN, 0, "gate_up", 1.0),),
    )
    keys = _prep(client=client).keys
    prep = PreparedKeys(keys, client.b, client.cfg, plan, client.decoys, N)
    prep.fill(1, perms=False)
    assert prep.remaining == 0

"""Tests added for the mutants of :mod:`scx_ref.protocol.keyring` and :mod:`scx_ref.protocol.plan` that
survived ``python -m mutation.run keyring plan`` (triage: ``mutation/annotations.toml``).

Both sides of a session derive nothing from each other's labels (the server never derives a key), so a
label changed in the keyring or the plan leaves every session exact: only a test that re-derives each key
under the label the modules document (DESIGN §3: "Labels name the key's role, layer and step") sees it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref.attacks.harness import AblatedKeys
from scx_ref.errors import ConfigError, ProtocolError
from scx_ref.keys import KeySchedule, KeyStream
from scx_ref.protocol.config import SCXConfig
from scx_ref.protocol.keyring import RequestKeys, basis_label, commitment, gaussian
from scx_ref.protocol.plan import Exposure, Release, ReleasePlan
from scx_ref.stages import Phase, Stage
from scx_ref.transforms import laplace_noise
from tests.tiny import tiny_config

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))
C = tiny_config()  # 4 blocks, 2 KV groups of head dim 4


def _close(got: npt.NDArray[np.float64], want: npt.NDArray[np.float64]) -> None:
    """Equal to rounding: numpy's vectorised log1p / cos / sin may differ from libm's by an ulp."""
    assert got.shape == want.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def _schedule() -> KeySchedule:
    return KeySchedule(MASTER, NONCE)


def _box_muller(stream: KeyStream, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Box–Muller written out pair by pair: the k-th pair of uniforms (u₀ = row 0, u₁ = row 1 of one
    (2, ⌈count/2⌉) draw) gives r·cos θ at position k and r·sin θ at position ⌈count/2⌉ + k."""
    count = math.prod(shape)
    half = (count + 1) // 2
    u = stream.random((2, half))
    out = [0.0] * (2 * half)
    for k in range(half):
        r, theta = math.sqrt(-2.0 * math.log1p(-u[0, k])), 2.0 * math.pi * u[1, k]
        out[k], out[half + k] = r * math.cos(theta), r * math.sin(theta)
    return np.array(out[:count], dtype=np.float64).reshape(shape)


# -- keyring: every role under its documented label -------------------------------------------------------
def test_every_role_is_derived_under_its_documented_label() -> None:
    """The keyring's module docstring (DESIGN §3) names each role's label; each method's key is the key
    schedule's under that label (a fresh schedule, so no memoised permutation is shared)."""
    ks, rk = _schedule(), RequestKeys(_schedule(), C)
    assert rk.session_id == NONCE.hex()
    for i in (0, 2, C.n_layers):
        np.testing.assert_array_equal(rk.token_perm(i, 9), ks.permutation(("tok", i, "qkv"), 9))
        np.testing.assert_array_equal(rk.o_perm(i, 9), ks.permutation(("tok", i, "o"), 9))
        np.testing.assert_array_equal(rk.lock_perm(i, 9), ks.permutation(("lock", i), 9))
        for step, label in ((None, ("head", i)), (3, ("head", i, "gen", 3))):
            p = rk.head_perm(i, step)
            np.testing.assert_array_equal(p.group_order, ks.permutation((*label, "groups"), C.n_kv_heads))
            for g in range(C.n_kv_heads):
                np.testing.assert_array_equal(p.sigmas[g], ks.permutation((*label, "sigma", g), C.head_dim))
        for stage in (Stage.QKV, Stage.O, Stage.FFN):
            assert rk.decoy_stream(stage, i).read(40) == ks.stream(("decoy", i, stage.value)).read(40)
        assert rk.commit_salt(i) == ks.key(("commit", i), 32) and len(rk.commit_salt(i)) == 32
        for step, vlabel in ((None, ("verify", "rows", i)), (2, ("verify", "rows", i, "gen", 2))):
            want = np.sort(ks.permutation(vlabel, 9)[:4])
            np.testing.assert_array_equal(rk.verify_rows(i, 9, 4, step), want)
        for step, vlabel in ((None, ("verify", "lock", i)), (1, ("verify", "lock", i, "gen", 1))):
            _close(rk.verify_lock(i, 3, 2, step), _box_muller(ks.stream(vlabel), (3, 2)))
    _close(rk.verify_mix((2, 3, 5)), _box_muller(ks.stream(("verify", "mix")), (2, 3, 5)))


def test_the_attack_ablations_switch_off_exactly_the_roles_they_name() -> None:
    """The attacks switch one mechanism off by the role a label starts with (``AblatedKeys``: "tok",
    "head", "lock"): π and π′ are role "tok", ρ role "lock", P role "head" — an ablation of one role
    leaves the other roles' keys as they were."""
    plain = RequestKeys(_schedule(), C)
    ident = np.arange(9)
    for role in ("tok", "lock", "head"):
        rk = RequestKeys(AblatedKeys(MASTER, NONCE, frozenset({role})), C)
        perms = {"tok": (rk.token_perm(1, 9), rk.o_perm(1, 9)), "lock": (rk.lock_perm(1, 9),)}
        for r, got in perms.items():
            for g in got:
                assert np.array_equal(g, ident) == (r == role)
        for step in (None, 2):
            p, q = rk.head_perm(1, step), plain.head_perm(1, step)
            is_identity = np.array_equal(p.group_order, np.arange(C.n_kv_heads)) and all(
                np.array_equal(s, np.arange(C.head_dim)) for s in p.sigmas
            )
            assert is_identity == (role == "head") and (p == q) == (role != "head")


def test_basis_labels_shift_the_layer_by_one_and_append_the_expert() -> None:
    """A Freivalds basis label: the LM head (layer −1) is 0, block i is i + 1, an expert is appended."""
    assert basis_label(3, "w_q", -1, None) == ("verify", "basis", 3, "w_q", 0)
    assert basis_label(0, "w_up", 2, None) == ("verify", "basis", 0, "w_up", 3)
    assert basis_label(1, "w_up", 2, 0) == ("verify", "basis", 1, "w_up", 3, 0)


# -- keyring: the Gaussian draws --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 4), (2, 3, 3)])
def test_gaussian_is_box_muller_on_the_streams_uniforms(shape: tuple[int, ...]) -> None:
    """Odd counts use the first half-pair only; ``()`` is one value of shape ()."""
    _close(gaussian(_schedule().stream(("g",)), shape), _box_muller(_schedule().stream(("g",)), shape))


def test_gaussian_draws_are_standard_normal() -> None:
    z = gaussian(_schedule().stream(("g",)), (40001,))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    assert abs(np.mean(z[:20000] * z[20001:40001])) < 0.03  # the cos and sin halves are uncorrelated


# -- keyring: the noise of a release -----------------------------------------------------------------------
def test_noise_is_laplace_under_the_release_label_and_an_offset_one_scalar() -> None:
    """η of a Laplace release is Laplace(0, β) of shape rows × width from the release's key label (at
    a step); the paper's offset is one Laplace scalar from its label, broadcast."""
    ks, rk = _schedule(), RequestKeys(_schedule(), C)
    qkv = Release(Phase.PREFILL, Stage.QKV, 1, "qkv", 2.5)
    got = rk.noise(qkv, None, 3, 5)
    want = laplace_noise((3, 5), 2.5, ks.generator(("alpha", 1, "qkv")))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    offset = Release(Phase.GENERATE, Stage.GEN_FFN, 3, "offset", 1.5)
    got = rk.noise(offset, 2, 3, 5)
    scalar = laplace_noise((1, 1), 1.5, ks.generator(("alpha", 3, "offset", "gen", 2)))[0, 0]
    assert got.shape == (3, 5) and got.dtype == np.float64 and scalar != 0.0
    assert (got == scalar).all()


# -- keyring: the key-sharing commitment ------------------------------------------------------------------
def _sha(salt: bytes, session: str, layer: int, perm: list[int]) -> str:
    sid = session.encode("utf-8")
    body = b"".join(p.to_bytes(8, "little", signed=True) for p in perm)
    return hashlib.sha256(
        salt + len(sid).to_bytes(4, "big") + sid + layer.to_bytes(4, "big") + body
    ).hexdigest()


def test_commitment_is_sha256_of_its_documented_fields() -> None:
    """SHA-256(salt ‖ len(session) ‖ session ‖ layer ‖ π), the lengths and layer 4 bytes big-endian, π as
    int64 little-endian; the layer field's edges 0 and 2³² − 1 are accepted, an empty π commits to no
    bytes."""
    salt = bytes(range(100, 132))
    perm = [2, 0, 3, 1]
    for layer in (0, 7, 2**32 - 1):
        assert commitment(salt, "séance", layer, np.array(perm)) == _sha(salt, "séance", layer, perm)
    assert commitment(salt, "ab", 1, np.array([], dtype=np.float64)) == _sha(salt, "ab", 1, [])
    as_bytearray: Any = bytearray(salt)  # a bytearray salt is its bytes; a uint8 π its values
    assert commitment(as_bytearray, "ab", 1, np.array(perm, dtype=np.uint8)) == _sha(salt, "ab", 1, perm)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((b"s" * 31, "ab", 1, np.arange(3)), "a commitment's salt must be 32 bytes, got 31 bytes"),
        (("s" * 32, "ab", 1, np.arange(3)), "a commitment's salt must be 32 bytes, got str"),
        ((b"s" * 32, b"ab", 1, np.arange(3)), "a commitment's session must be a string, got bytes"),
        ((b"s" * 32, "ab", -1, np.arange(3)), "commitment layer must lie in [0, 4294967295], got -1"),
        (
            (b"s" * 32, "ab", 1, np.arange(4.0)),
            "a commitment's permutation must be a 1-D integer array, got float64 (4,)",
        ),
        (
            (b"s" * 32, "ab", 1, np.zeros((2, 2), dtype=np.int64)),
            "a commitment's permutation must be a 1-D integer array, got int64 (2, 2)",
        ),
    ],
    ids=["short-salt", "str-salt", "bytes-session", "negative-layer", "float-perm", "2d-perm"],
)
def test_commitment_refusals_say_what_was_wrong(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        commitment(*args)
    assert str(info.value) == message


def test_verify_rows_refusal_names_the_count() -> None:
    with pytest.raises(ConfigError, match=r"^verified row count must be >= 0, got -1$"):
        RequestKeys(_schedule(), C).verify_rows(0, 10, -1)


# -- plan: a release's key label, an exposure's text, the refusals ----------------------------------------
def test_a_release_label_names_block_root_step_part_and_expert() -> None:
    """``("alpha", block, root[, "gen", step][, part][, expert])``: a prefill release ignores ``step``; a
    generation release needs an integer step >= 0 (0 is one), else ProtocolError."""
    p, g = Phase.PREFILL, Phase.GENERATE
    assert Release(p, Stage.QKV, 1, "qkv", 1.0).label(5) == ("alpha", 1, "qkv")
    assert Release(p, Stage.HEAD, 4, "lm_head", 1.0).label() == ("alpha", 4, "head")
    assert Release(p, Stage.FFN_DOWN, 2, "down", 1.0, 3).label() == ("alpha", 2, "ffn", "down", 3)
    assert Release(g, Stage.GEN_FFN_UP, 0, "gate_up", 1.0, 0).label(0) == (
        "alpha",
        0,
        "ffn",
        "gen",
        0,
        "up",
        0,
    )
    assert Release(g, Stage.GEN_ROUTER, 3, "router", 1.0).label(2) == ("alpha", 3, "ffn", "gen", 2, "router")
    assert Release(g, Stage.GEN_O, 3, "o", 1.0).label(7) == ("alpha", 3, "o", "gen", 7)
    gen = Release(g, Stage.GEN_QKV, 0, "qkv", 1.0)
    for step, message in (
        (None, "a generation release needs its step"),
        (-1, "step must be >= 0, got -1"),
        (True, "step must be an integer, got bool True"),
    ):
        with pytest.raises(ProtocolError) as info:
            gen.label(step)
        assert str(info.value) == message


def test_an_exposure_reads_with_its_blocks_one_based() -> None:
    shown = Exposure(Phase.GENERATE, Stage.GEN_MID, (0, 1, 2), "the token's row")
    assert str(shown) == "generate gen_mid (blocks 1, 2, 3): the token's row"


def test_plan_refusals_name_what_they_got() -> None:
    for args, message in (
        (("blind", C), "config must be an SCXConfig, got str"),
        ((SCXConfig(), 4), "model must be a ModelConfig (with n_layers, n_experts, is_moe), got int"),
    ):
        with pytest.raises(ConfigError) as info:
            ReleasePlan.of(*args)
        assert str(info.value) == message
    with pytest.raises(ConfigError) as info:
        ReleasePlan.of(SCXConfig(), C).releases("generate")  # type: ignore[arg-type]
    assert str(info.value) == "phase must be a Phase, got str 'generate'"


@dataclass(frozen=True)
class _Model:
    """A :class:`~scx_ref.protocol.plan.PlanModel` that is not a ModelConfig (which checks its own fields)."""

    n_layers: int
    n_experts: int = 0
    is_moe: bool = False


def test_a_plan_model_needs_a_block_and_no_negative_expert_count() -> None:
    """ConfigError naming the field for ``n_layers`` < 1 or ``n_experts`` < 0; one expert is an MoE (its
    router and its expert's maps are releases)."""
    for model, message in (
        (_Model(0), "model.n_layers must be >= 1, got 0"),
        (_Model(2, -1), "model.n_experts must be >= 0, got -1"),
    ):
        with pytest.raises(ConfigError) as info:
            ReleasePlan.of(SCXConfig(), model)
        assert str(info.value) == message
    plan = ReleasePlan.of(SCXConfig(level="blind"), _Model(2, 1, True))
    mlp = {
        (r.stage, r.block, r.expert)
        for r in plan.prefill
        if r.stage in (Stage.ROUTER, Stage.FFN, Stage.FFN_DOWN)
    }
    assert mlp == {
        (s, b, e) for b in (0, 1) for s, e in ((Stage.ROUTER, None), (Stage.FFN, 0), (Stage.FFN_DOWN, 0))
    }


@pytest.mark.parametrize(
    "options",
    [
        {"level": "paper", "last_ffn": "paper"},
        {"level": "permute", "last_ffn": "paper"},  # the offset is the only release
        {"level": "blind", "attention": "client", "gen_linear": "server", "guard_ffn": "blinded"},
    ],
    ids=["paper-offset", "permute-offset", "blind-hardened"],
)
def test_every_generation_release_is_one_time(options: dict[str, Any]) -> None:
    """DESIGN §5.1: "Generation uses one-time keys per token": every generation release is of phase
    GENERATE, so its label carries the step and no two steps (nor two releases) share noise."""
    for model in (C, tiny_config(moe=True)):
        plan = ReleasePlan.of(SCXConfig(**options), model)
        assert plan.generation and all(r.phase is Phase.GENERATE for r in plan.generation)
        assert all(r.phase is Phase.PREFILL for r in plan.prefill)
        labels = {r.label(t) for r in plan.generation for t in (0, 1)}
        assert len(labels) == 2 * len(plan.generation)

"""``proofs/``: what the proofs check must be the function the protocol calls.

* ``t4.locked_scores`` built the locked cache ρ(K ⊕ R) with its own gather instead of the statement of
  ``encode_rows`` — the transform the client locks the cache with (``Client._prefill``): it now goes through
  ``proofs.t2_decoys.encode`` and names ``encode_rows``, so a wrong encode statement fails it.
* T3 is stated for "any scale" (DESIGN §4); the proof assumed s > 0: now any real s.
* ``proofs.__main__.run`` reported "all proved" (0 failures) for a filter that matched nothing, and split a
  bare string into one-letter filters.
* DESIGN §7's ‖RMSNorm(x)‖₂ ≤ √d‖γ‖∞ (``rmsnorm_l2_bound``) and the step from eps = 0 to the model's
  eps ≥ 0 (which ``rmsnorm_l1_bound`` / ``rmsnorm_sensitivity`` promise) were not proved: now
  ``sensitivity.rmsnorm_l2_and_eps``.
* The links (``tests/test_proof_links.py``) evaluate each named transform on the default numpy ops; the
  protocol calls them with its backend (``b``: numpy or torch kernels) and decodes the logits in place. Here
  every link is also evaluated through the backends the protocol passes, as the protocol calls them.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch

import proofs.sensitivity as sens
import proofs.t2_decoys as t2
import proofs.t3_head_permutation as t3
import proofs.t7_norm_scaling as t7
from proofs import Identity, all_identities
from proofs.__main__ import run
from proofs._sym import inverse, permute_rows
from scx_ref import ops
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.dp.sensitivity import rmsnorm_l2_bound
from scx_ref.weights import random_weights
from tests import test_proof_links as links
from tests.test_proofs_catch_mutants import replaced
from tests.tiny import tiny_config

IDENTITIES = {entry.name: entry for entry in all_identities()}


# ----------------------------------------------------------------------------- t4.locked_scores


def test_locked_scores_builds_the_cache_through_the_encode_rows_statement() -> None:
    entry = IDENTITIES["t4.locked_scores"]
    assert "scx_ref.transforms.encode_rows" in {impl.function for impl in entry.implements}
    assert entry.check() is True

    def encode_with_inverse(x: sp.Matrix, decoys: sp.Matrix, pi: tuple[int, ...]) -> sp.Matrix:
        return permute_rows(x.col_join(decoys), inverse(pi))  # π⁻¹ where the protocol applies π

    with replaced(t2.encode, encode_with_inverse):
        assert entry.check() is False


# ----------------------------------------------------------------------------- T3: any scale


def test_t3_is_proved_for_any_real_scale() -> None:
    assert t3._SCALE.is_real is True
    assert t3._SCALE.is_positive is None and t3._SCALE.is_nonnegative is None  # 0 and s < 0 included


# ----------------------------------------------------------------------------- the runner's API


def _fake(name: str, seen: list[str]) -> Identity:
    def check() -> bool:
        seen.append(name)
        return True

    return Identity(name, "fake", check, [("control", lambda: False)])


def test_run_counts_a_filter_that_matches_nothing_as_a_failure() -> None:
    buffer = io.StringIO()
    assert run(["no-such-identity"], out=buffer) == 1
    assert "all proved" not in buffer.getvalue()
    assert "no-such-identity" in buffer.getvalue()


def test_run_with_a_good_and_a_mistyped_filter_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr("proofs.__main__.all_identities", lambda: [_fake("aa.x", seen), _fake("bb.y", seen)])
    assert run(["aa.", "cc."], out=io.StringIO()) == 1
    assert seen == ["aa.x"]


def test_run_takes_a_bare_string_as_one_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr("proofs.__main__.all_identities", lambda: [_fake("aa.x", seen), _fake("bb.y", seen)])
    assert run("aa.x", out=io.StringIO()) == 0
    assert seen == ["aa.x"]  # not the one-letter filters "a", "a", ".", "x" ("." matches bb.y)


# ----------------------------------------------------------------------------- ‖y‖₂ and eps ≥ 0


def test_l2_bound_and_any_eps_are_proved_through_the_rms_norm_statement() -> None:
    entry = IDENTITIES["sensitivity.rmsnorm_l2_and_eps"]
    assert {impl.function for impl in entry.implements} == {"scx_ref.ops.rms_norm"}
    assert entry.check() is True

    def eps_outside_the_root(x: sp.Matrix, gamma: sp.Matrix, eps: sp.Expr) -> sp.Matrix:
        def row(v: list[sp.Expr]) -> list[sp.Expr]:
            r = sp.sqrt(sp.Add(*[a**2 for a in v]) / len(v)) - eps  # a norm that grows with eps
            return [g * a / r for g, a in zip(gamma, v, strict=True)]

        return sp.Matrix([row(list(x.row(i))) for i in range(x.rows)])

    with replaced(t7.rms_norm, eps_outside_the_root):
        assert entry.check() is False


def test_l2_controls_fail_at_the_step_they_name() -> None:
    """The constant d/2 is refuted by the ‖y‖₂ step itself; the backwards comparison passes that step and is
    refuted by the eps step's sign (not by a failing simplification before it)."""
    assert sens._step_l2(lambda d: d / 2, sens._EPS) is False
    assert sens._step_l2(lambda d: d, sp.S.Zero) is True
    assert sens._step_eps_shrinks(sp.S.Zero, sens._EPS) is False
    assert sens._step_eps_shrinks(sens._EPS, sp.S.Zero) is True


@pytest.mark.parametrize("seed", range(3))
def test_rmsnorm_l2_bound_bounds_the_code_s_norm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 9))
    gamma = rng.standard_normal(d)
    x = rng.standard_normal((20, d)) * 10.0 ** rng.uniform(-3, 3, size=(20, 1))
    for eps in (0.0, 1e-6, 1.0):
        norms = np.linalg.norm(ops.rms_norm(x, gamma, eps), axis=1)
        assert (norms <= rmsnorm_l2_bound(gamma) * (1 + 1e-12)).all()


# ----------------------------------------------------------------------------- links through the backends


BACKENDS: dict[str, Callable[[Any], Any]] = {
    "numpy": lambda weights: NumpyBackend(weights),
    "torch64": lambda weights: TorchBackend(weights, torch.float64),
}
_WEIGHTS = random_weights(tiny_config(), np.random.default_rng(0))
# every link whose function takes the ops (the protocol passes its backend there)
OPS_LINKS = [
    (ident, family, impl)
    for ident, family, impl in links.LINKS
    if "ops" in inspect.signature(links.resolve(impl.function)).parameters
]


def _to_numpy(b: Any, x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_to_numpy(b, v) for v in x)
    return x if isinstance(x, np.ndarray) else b.to_numpy(x)


def check_link_on_backend(family: str, impl: Any, backend: str, seed: int) -> None:
    """Evaluate ``impl``'s function as the protocol calls it — arrays in the backend, the backend as ops,
    the QKV reply and the logits decoded with a name (the logits in place) — against the proof's statement."""
    function = links.resolve(impl.function)
    name = impl.function.rpartition(".")[2]
    rng = np.random.default_rng([seed, len(impl.function)])
    code, sym, to_numpy = links.case(impl.function, family, rng)
    weights = _WEIGHTS
    if name == "decode_qkv_heads":  # the case built a numpy backend of its own RoPE config: this kind instead
        weights = random_weights(code[-1].config, np.random.default_rng(seed))
        code = code[:-1]
    b = BACKENDS[backend](weights)
    args = [
        # torch keeps a matrix out × in (F.linear): the layout blinding_correction takes on that backend
        b.from_numpy(a.T if name == "blinding_correction" and i == 1 and backend == "torch64" else a)
        if isinstance(a, np.ndarray) and a.dtype.kind == "f"
        else a
        for i, a in enumerate(code)
    ]
    if name == "decode_rows_numpy":
        got = function(*args, b, in_place=True, name="reply head.logits")  # as the client decodes logits
    elif name == "decode_qkv_heads":
        got = function(*args, b, name="reply qkv.z")
    else:
        got = function(*args, b)
    links._close(_to_numpy(b, got), to_numpy(impl.symbolic(*sym)), exact=name in links._GATHERS)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    ("ident", "family", "impl"),
    OPS_LINKS,
    ids=[f"{n}:{i.function.rpartition('.')[2]}" for n, _, i in OPS_LINKS],
)
def test_code_on_the_protocol_s_backend_equals_the_proofs_statement(
    ident: str, family: str, impl: Any, backend: str
) -> None:
    for seed in range(2):
        check_link_on_backend(family, impl, backend, seed)


def test_a_broken_backend_kernel_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the torch backend's in-place row gather (the client's logits decode) leaving the rows where
    they are is caught, though the numpy-ops link would not see it."""
    (family, impl) = next((f, i) for _, f, i in OPS_LINKS if i.function.endswith("decode_rows_numpy"))
    check_link_on_backend(family, impl, "torch64", 1)
    monkeypatch.setattr(TorchBackend, "take_rows_in_place", lambda self, x, index, *, name=None: x)
    with pytest.raises(AssertionError):
        for seed in range(4):
            check_link_on_backend(family, impl, "torch64", seed)

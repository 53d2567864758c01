"""A proof cannot drift from the code: every library function a sympy identity names (``implements``) is
evaluated on random instances against the proof's own symbolic statement of it — the expression the
checker proved things about — and must agree (gathers exactly, arithmetic to float64 rounding).

Every transform of :mod:`scx_ref.transforms` must be named by some identity, and every named function must
have an instance builder here, so neither side can be left out silently.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch

from proofs import Implementation, all_identities
from scx_ref import transforms
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.config import ModelConfig
from scx_ref.transforms import HeadPermutation
from scx_ref.weights import random_weights

IDENTITIES = all_identities()
LINKS = [
    (entry.name, entry.check.__module__.rpartition(".")[2], impl)
    for entry in IDENTITIES
    for impl in entry.implements
]
SEEDS = range(4)

Case = tuple[tuple[Any, ...], tuple[Any, ...], Callable[[Any], Any]]  # code args, sympy args, to numpy


def resolve(path: str) -> Callable[..., Any]:
    """The object at a dotted path (module prefix, then attributes: ``…HeadPermutation.flat_index``)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj  # type: ignore[no-any-return]
    raise ImportError(path)


def _m(a: np.ndarray) -> sp.Matrix:
    return sp.Matrix(np.asarray(a, dtype=np.float64).tolist())


def _np(m: Any) -> np.ndarray:
    return np.array(sp.Matrix(m).evalf(30).tolist(), dtype=np.float64)


def _perm(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(n).astype(np.int64)


def _head_perm(rng: np.random.Generator, n_kv: int, d_h: int) -> tuple[HeadPermutation, Any]:
    order, sigmas = _perm(rng, n_kv), np.stack([_perm(rng, d_h) for _ in range(n_kv)])
    return HeadPermutation(order, sigmas), (tuple(order.tolist()), tuple(tuple(s) for s in sigmas.tolist()))


class _Uniforms:
    """A noise source that returns given uniforms (in order)."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = u

    def random(self, size: Any = None) -> np.ndarray:
        return self.u.reshape(size)


def case(function: str, family: str, rng: np.random.Generator) -> Case:
    """Random arguments for ``function`` (in the code's form and the proof's form) and a converter of the
    proof's result to numpy."""
    name = function.rpartition(".")[2]
    n, r, d = int(rng.integers(1, 5)), int(rng.integers(0, 4)), int(rng.integers(1, 5))
    x = rng.standard_normal((n, d))
    if name == "inverse_permutation":
        p = _perm(rng, n + r)
        return (p,), (tuple(p.tolist()),), lambda s: np.array(s)
    if name in ("permute_rows", "unpermute_rows"):
        p = _perm(rng, n)
        return (x, p), (_m(x), tuple(p.tolist())), _np
    if name == "with_decoys":
        dec = rng.standard_normal((r, d))
        return (x, dec), (_m(x), sp.zeros(0, d) if r == 0 else _m(dec)), _np
    if name == "strip_decoys":
        return (x, n - r // 2 if n > r // 2 else 0), (_m(x), n - r // 2 if n > r // 2 else 0), _np
    if name == "encode_rows":
        dec, p = rng.standard_normal((r, d)), _perm(rng, n + r)
        return (x, dec, p), (_m(x), sp.zeros(0, d) if r == 0 else _m(dec), tuple(p.tolist())), _np
    if name == "reencode_sum":
        r_s, r_y = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        s_rows, y_rows = rng.standard_normal((n + r_s, d)), rng.standard_normal((n + r_y, d))
        dec = rng.standard_normal((r, d))
        p_s, p_y, p = _perm(rng, n + r_s), _perm(rng, n + r_y), _perm(rng, n + r)
        code = (s_rows, p_s, y_rows, p_y, dec, p)
        sym = (_m(s_rows), tuple(p_s.tolist()), _m(y_rows), tuple(p_y.tolist()))
        return code, (*sym, sp.zeros(0, d) if r == 0 else _m(dec), tuple(p.tolist())), _np
    if name in ("decode_rows", "decode_rows_numpy"):
        y, p = rng.standard_normal((n + r, d)), _perm(rng, n + r)
        return (y, p, n), (_m(y), tuple(p.tolist()), n), _np
    if name in ("head_permute", "head_unpermute", "flat_index"):
        n_kv = 1 if family == "t3_head_permutation" else int(rng.integers(1, 4))
        g, d_h = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        hp, sym_hp = _head_perm(rng, n_kv, d_h)
        if name == "flat_index":
            return (hp, g), (sym_hp, g), lambda s: np.array(s)
        h = rng.standard_normal((n, n_kv * g, d_h))
        return (h, hp, g), (_m(h.reshape(n, -1)), sym_hp, g), lambda s: _np(s).reshape(h.shape)
    if name == "head_permute_stacked":
        n_kv, d_h = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        sizes = tuple(int(g) for g in rng.integers(1, 4, size=int(rng.integers(1, 4))))
        hp, sym_hp = _head_perm(rng, n_kv, d_h)
        h = rng.standard_normal((n, n_kv * sum(sizes), d_h))
        return (h, hp, sizes), (_m(h.reshape(n, -1)), sym_hp, sizes), lambda s: _np(s).reshape(h.shape)
    if name == "encode_head_rows":
        n_kv, g, d_h = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 4))
        hp, sym_hp = _head_perm(rng, n_kv, d_h)
        o = rng.standard_normal((n, n_kv * g, d_h))
        dec, p = rng.standard_normal((r, n_kv * g * d_h)), _perm(rng, n + r)
        sym_dec = sp.zeros(0, n_kv * g * d_h) if r == 0 else _m(dec)
        return (o, hp, g, dec, p), (_m(o.reshape(n, -1)), sym_hp, g, sym_dec, tuple(p.tolist())), _np
    if name == "decode_qkv_heads":
        n_kv, g, d_h = int(rng.integers(1, 3)), int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3))
        theta = float(rng.choice([1e4, 5e5]))
        config = ModelConfig(
            vocab_size=4,
            hidden_size=4,
            n_layers=1,
            n_heads=n_kv * g,
            n_kv_heads=n_kv,
            head_dim=d_h,
            intermediate_size=4,
            rms_eps=1e-6,
            rope_theta=theta,
        )
        backend = NumpyBackend(random_weights(config, rng))
        hp, sym_hp = _head_perm(rng, n_kv, d_h)
        z, p = rng.standard_normal((n + r, n_kv * (g + 2) * d_h)), _perm(rng, n + r)
        pos = rng.integers(0, 4096, size=n)
        code = (z, p, n, pos, hp, g, backend)
        sym = (_m(z), tuple(p.tolist()), n, pos.tolist(), sp.Float(theta), sym_hp, g)

        def back(s: Any) -> tuple[Any, Any]:
            qk, v = (np.array(m.evalf(30).tolist(), dtype=np.float64) for m in s)
            return qk.reshape(n, -1, d_h), v.reshape(n, -1, d_h)

        return code, sym, back
    if name == "reorder_cache":
        k, v, rho = rng.standard_normal((n, 2, d)), rng.standard_normal((n, 2, d)), _perm(rng, n)
        sym = (_m(k.reshape(n, -1)), _m(v.reshape(n, -1)), tuple(rho.tolist()))
        return (k, v, rho), sym, lambda s: tuple(_np(m).reshape(k.shape) for m in s)
    if name == "unlock_scores":
        rho, extra = _perm(rng, n + r), int(rng.integers(0, 3))
        s = rng.standard_normal((2, 3, n + r + extra))  # heads × queries × columns
        flat = s.reshape(-1, s.shape[-1])
        return (s, rho, n), (_m(flat), tuple(rho.tolist()), n), lambda m: _np(m).reshape(2, 3, -1)
    if name in ("blind", "unblind"):
        e = rng.standard_normal((n, d)) * 5
        return (x, e), (_m(x), _m(e)), _np
    if name == "blinding_correction":
        e, w = rng.standard_normal((n, d)), rng.standard_normal((d, 3))
        return (e, w), (_m(e), _m(w)), _np
    if name == "laplace_noise":
        u, beta = rng.uniform(1e-9, 1.0, size=n * d), float(rng.choice([0.0, 0.5, 1.0, 5.0]))
        sym_u = [sp.Float(v, 30) for v in u.tolist()]
        return ((n, d), beta, _Uniforms(u)), ((n, d), sp.Float(beta), sym_u), lambda s: _np(s).reshape(n, d)
    if name == "apply_rope":
        h = rng.standard_normal((n, 2, 2 * d))
        pos, theta = rng.integers(0, 4096, size=n), float(rng.choice([1e4, 5e5]))
        sym = (
            [[[sp.Float(v) for v in head] for head in row] for row in h.tolist()],
            pos.tolist(),
            sp.Float(theta),
        )
        return (
            (h, pos, theta),
            sym,
            lambda s: np.array(
                sp.Matrix(np.array(s).reshape(n, -1)).evalf(30).tolist(), dtype=np.float64
            ).reshape(h.shape),
        )
    if name == "rms_norm":
        gamma, eps = rng.standard_normal(d), float(rng.choice([0.0, 1e-6, 1e-5]))
        return (x, gamma, eps), (_m(x), sp.Matrix(gamma.tolist()), sp.Float(eps)), _np
    if name == "rmsnorm_sensitivity":
        gamma = rng.standard_normal(d)
        return (gamma,), ([sp.Float(g) for g in gamma.tolist()],), lambda s: float(sp.N(s, 30))
    if name == "project64_norm":
        config = ModelConfig(
            vocab_size=4,
            hidden_size=d,
            n_layers=1,
            n_heads=1,
            n_kv_heads=1,
            head_dim=2,
            intermediate_size=4,
            rms_eps=float(rng.choice([0.0, 1e-6, 1e-5])),
            max_positions=8,
            name="proof-link",
        )
        b = TorchBackend(random_weights(config, rng), torch.float64)
        which = str(rng.choice(["attn", "mlp", "final"]))
        gamma = b._gain(which, 0).numpy()  # type: ignore[arg-type]
        right = rng.standard_normal((d, int(rng.integers(1, 4))))
        code = (b, torch.from_numpy(x), which, 0, right)
        sym = (_m(x), [sp.Float(g, 30) for g in gamma.tolist()], sp.Float(config.rms_eps, 30), _m(right))
        return code, sym, lambda s: (_np(s[0]), _np(s[1]).reshape(-1))
    raise KeyError(f"no instance builder for {function}")


def _close(got: Any, want: Any, exact: bool) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _close(g, w, exact)
        return
    got_a, want_a = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got_a.shape == want_a.shape
    if exact:
        np.testing.assert_array_equal(got_a, want_a)
    else:
        np.testing.assert_allclose(
            got_a, want_a, rtol=1e-12, atol=1e-12 * (1 + np.abs(want_a).max(initial=0))
        )


_GATHERS = {
    "inverse_permutation",
    "permute_rows",
    "unpermute_rows",
    "with_decoys",
    "strip_decoys",
    "encode_rows",
    "decode_rows",
    "decode_rows_numpy",
    "head_permute",
    "head_unpermute",
    "head_permute_stacked",
    "encode_head_rows",
    "flat_index",
    "reorder_cache",
    "unlock_scores",
}


@pytest.mark.parametrize(
    ("identity_name", "family", "impl"),
    LINKS,
    ids=[f"{n}:{i.function.rpartition('.')[2]}" for n, _, i in LINKS],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_code_equals_the_proofs_statement(
    identity_name: str, family: str, impl: Implementation, seed: int
) -> None:
    function = resolve(impl.function)
    rng = np.random.default_rng([seed, len(impl.function)])
    code_args, sym_args, to_numpy = case(impl.function, family, rng)
    got = function(*code_args)
    want = to_numpy(impl.symbolic(*sym_args))
    _close(got, want, exact=impl.function.rpartition(".")[2] in _GATHERS)


def test_every_transform_is_named_by_a_proof() -> None:
    named = {impl.function for _, _, impl in LINKS}
    public = [
        f"scx_ref.transforms.{name}"
        for name in transforms.__all__
        if callable(getattr(transforms, name))
        and name not in ("HeadPermutation", "NoiseSource", "Permutation")  # carriers, not transforms
    ]
    assert public, "no transforms found"
    assert sorted(set(public) - named) == []
    assert "scx_ref.transforms.HeadPermutation.flat_index" in named


def test_a_wrong_statement_is_caught() -> None:
    """Control: a proof whose symbolic statement of permute_rows were the decode would be caught."""
    t1 = importlib.import_module("proofs.t1_token_permutation")
    wrong = Implementation("scx_ref.transforms.permute_rows", t1.decode)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2))
    p = np.array([1, 2, 3, 0])  # not an involution: X[π] ≠ X[π⁻¹]
    with pytest.raises(AssertionError):
        _close(transforms.permute_rows(x, p), _np(wrong.symbolic(_m(x), tuple(p.tolist()))), exact=True)

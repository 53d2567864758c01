"""The torch and numpy backends refuse the same bad inputs with the same project errors (an entry past the
backend's dtype range included: finiteness is checked in the backend's own dtype), and the compiled kernels'
verdicts and chunking hold on the edge cases an untrusted peer controls (NaN and ±inf in a reply; fewer rows
than chunks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from properties.kernel_paths import one_chunk_or_split
from scx_ref.backends import cpu_kernels
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend, parse_dtype
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from tests.tiny import tiny_weights

needs_numba = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed")


def _fused_and_eager() -> list[bool]:
    """The torch paths to run a call on: the fused kernels (where numba is installed) and the eager ops."""
    return [True, False] if cpu_kernels.kernels() is not None else [False]


def _on_every_path(call: Callable[[Any], Any], error: type[Exception], dtype: str = "float64") -> None:
    """``call(backend)`` raises ``error`` on the numpy backend and on the torch backend, fused and eager."""
    w = tiny_weights(0, n_layers=1)
    with pytest.raises(error):
        call(NumpyBackend(w))
    tb = TorchBackend(w, dtype)
    for fused in _fused_and_eager():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "ENABLED", fused)
            with pytest.raises(error):
                call(tb)


def _arr(b: Any, a: np.ndarray[Any, Any]) -> Any:
    return torch.from_numpy(a.copy()) if isinstance(b, TorchBackend) else a


@pytest.mark.parametrize("op", ["add", "add-named", "sub", "add_into"])
def test_elementwise_ops_refuse_shapes_that_do_not_broadcast(op: str) -> None:
    """x ± y of shapes that do not broadcast: ShapeError on torch as on numpy (torch raised its own
    RuntimeError, with a name given too)."""
    x, y = np.ones((3, 8)), np.ones((3, 2))
    calls = {
        "add": lambda b: b.add(_arr(b, x), _arr(b, y)),
        "add-named": lambda b: b.add(_arr(b, x), _arr(b, y), name="the sum"),
        "sub": lambda b: b.sub(_arr(b, x), _arr(b, y)),
        "add_into": lambda b: b.add_into(_arr(b, x), _arr(b, y)),
    }
    _on_every_path(calls[op], ShapeError)


def test_elementwise_ops_still_broadcast() -> None:
    """A row broadcast against rows is still a sum (and a difference) on torch, as on numpy."""
    w = tiny_weights(0, n_layers=1)
    x, y = np.arange(6.0).reshape(3, 2), np.array([[10.0, 20.0]])
    tb, nb = TorchBackend(w, "float64"), NumpyBackend(w)
    for name in (None, "s"):
        assert np.array_equal(tb.add(torch.from_numpy(x), torch.from_numpy(y), name=name).numpy(), x + y)
        assert np.array_equal(nb.add(x, y, name=name), x + y)
    assert np.array_equal(tb.sub(torch.from_numpy(x), torch.from_numpy(y)).numpy(), x - y)


@pytest.mark.parametrize("dtype", [">f8", ">f4", "longdouble"])
def test_the_torch_backend_takes_float_arrays_numpy_takes(dtype: str) -> None:
    """A float array of the other byte order, or a longdouble one, is read by ``check``, ``floating`` and
    ``from_numpy`` as the numpy backend reads it (the same values): torch.from_numpy raised ValueError
    (byte order) or TypeError (longdouble) out of them."""
    w = tiny_weights(0, n_layers=1)
    x = np.array([[1.5, -2.25], [3.0, 1e-3]]).astype(dtype)
    want = np.asarray(NumpyBackend(w).check(x, "x", (2, 2)), dtype=np.float64)
    for tdt, ndt in (("float64", np.float64), ("float32", np.float32)):
        tb = TorchBackend(w, tdt)
        for got in (tb.check(x, "x", (2, 2)), tb.floating(x, "x"), tb.from_numpy(x)):
            assert got.dtype == tb.dtype
            assert np.array_equal(got.numpy(), want.astype(ndt))


def test_a_big_endian_array_that_is_not_finite_is_refused_on_torch() -> None:
    """The converted array is still scanned: NaN in a big-endian array is NonFiniteError, not a pass."""
    tb = TorchBackend(tiny_weights(0, n_layers=1), "float32")
    with pytest.raises(NonFiniteError):
        tb.check(np.array([[1.0, np.nan]], dtype=">f8"), "x", (1, 2))


@pytest.mark.parametrize("layer", [0.0, 1.0, True, "0"])
def test_a_layer_that_is_not_an_integer_is_refused_alike(layer: Any) -> None:
    """A float, bool or string layer: ConfigError on both backends (torch raised TypeError for a float and
    read True as block 1)."""
    w = tiny_weights(0, n_layers=2)
    x = np.ones((2, w.config.hidden_size))
    for b in (NumpyBackend(w), TorchBackend(w, "float64")):
        with pytest.raises(ConfigError):
            b.norm(_arr(b, x), "attn", layer)
    tb = TorchBackend(w, "float64")
    assert tb.norm(torch.from_numpy(x), "attn", np.int64(1)).shape == x.shape  # numpy integers still read


@pytest.mark.parametrize("fused", [True, False])
def test_take_rows_in_place_of_an_expanded_or_overlapping_view(fused: bool) -> None:
    """A strided x whose rows share entries (an expanded row, an overlapping view) is permuted into a new
    tensor: writing the gather back raised RuntimeError (expanded) or mixed the rows (overlapping)."""
    b = TorchBackend(tiny_weights(0, n_layers=1), "float32")
    perm = np.array([2, 0, 1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "ENABLED", fused)
        for name in (None, "y"):
            row = torch.arange(8.0).reshape(1, 8)
            assert torch.equal(b.take_rows_in_place(row.expand(3, 8), perm, name=name), row.expand(3, 8))
            base = torch.arange(8.0)
            view = base.as_strided((3, 4), (2, 1))
            want = view[perm].clone()
            assert torch.equal(b.take_rows_in_place(view, perm, name=name), want)


@pytest.mark.parametrize(
    "experts", [np.array([99]), np.array([-1]), np.array([1.5]), np.array([], dtype=np.int64), None]
)
def test_moe_experts_are_checked_alike(experts: Any) -> None:
    """An expert id outside the model, a negative one, a float one, none at all: ConfigError on both
    backends, for the projection and the Freivalds sketch (numpy raised IndexError or TypeError, or read
    −1 as the last expert; torch truncated 1.5 to expert 1)."""
    w = tiny_weights(0, n_layers=1, moe=True)
    c = w.config
    x = np.ones((2, c.hidden_size))
    basis = np.ones((2 * c.intermediate_size, 2))
    for b in (NumpyBackend(w), TorchBackend(w, "float64")):
        with pytest.raises(ConfigError):
            b.project(_arr(b, x), "w_gate_up", 0, experts)
        if experts is not None and experts.size == 1 and experts.dtype.kind == "i":
            with pytest.raises(ConfigError):
                b.weight_sketch("w_gate_up", 0, int(experts[0]), basis)


def test_moe_mlp_takes_leading_dims_on_numpy() -> None:
    """The numpy backend's MoE MLP reads rows with leading dims (as its dense MLP and the torch backend):
    the routing indexed 2-D rows only (IndexError)."""
    w = tiny_weights(0, n_layers=1, moe=True)
    x = np.random.default_rng(0).standard_normal((2, 3, w.config.hidden_size))
    nb, tb = NumpyBackend(w), TorchBackend(w, "float64")
    got = nb.mlp(x, 0)
    assert got.shape == x.shape
    np.testing.assert_allclose(got[1], nb.mlp(x[1], 0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got, tb.mlp(torch.from_numpy(x), 0).numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [["float32"], {}, 3, None])
def test_parse_dtype_refuses_what_is_not_a_dtype_name(dtype: Any) -> None:
    """A list (unhashable) raised TypeError out of parse_dtype; now DTypeError as for any other non-name."""
    with pytest.raises(DTypeError):
        parse_dtype(dtype)


# -- the compiled kernels on what an untrusted peer controls -----------------------------------------


def _passes(k: Any, a: dict[str, Any], parts: int) -> list[Any]:
    """Every chunked pass of the kernels on the arrays ``a``, in ``parts`` chunks: their outputs."""
    x, dtype = a["x"], a["x"].dtype
    n, w = x.shape
    p64, prms = (np.empty((n, 2)), np.empty(n)), (np.empty((n, 2)), np.empty(n))
    k.project64(x, a["rt"], *p64, parts)
    k.project64_rms(x, a["gain"], 1e-6, a["rt"], *prms, parts)
    pgu = (np.empty((n, 2)), np.empty(n), np.empty((n, 3)), np.empty(n))
    k.project64_gate_up(a["gu"], a["rg"], a["rd"], *pgu, parts)
    norm, scale = np.empty_like(x), np.empty(n, dtype)
    fin = k.rms_norm(x, a["gain"], 1e-6, norm, scale, np.empty((parts, w), dtype))
    take = np.empty((n + 1, w), dtype)
    got = k.take_rows_cols_concat(x, a["cols"], a["extra"], a["idx"], take, np.empty((parts, w), dtype))
    moved = x.copy()
    ok = k.permute_rows(moved, a["perm"], parts, np.empty(w, dtype))
    return [*p64, *prms, *pgu, norm, scale, fin, take, got, moved, ok]


@needs_numba
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunks_over_fewer_rows_than_chunks_give_the_one_chunk_bits(dtype: Any) -> None:
    """0 … 9 rows (fewer than the chunks, and not multiples of the four rows the products step by) split
    in up to 16 chunks: every pass gives the one-chunk result bit for bit (no row skipped or read past)."""
    k = cpu_kernels.kernels()
    assert k is not None
    rng = np.random.default_rng(4)
    w = 8
    for n in range(10):
        a = {
            "x": rng.standard_normal((n, w)).astype(dtype),
            "gu": rng.standard_normal((n, 2 * w)).astype(dtype),
            "rt": rng.standard_normal((2, w)),
            "rg": rng.standard_normal((2, 2 * w)),
            "rd": rng.standard_normal((3, w)),
            "gain": rng.standard_normal(w).astype(dtype),
            "extra": rng.standard_normal((1, w)).astype(dtype),
            "cols": np.ascontiguousarray(rng.permutation(w), dtype=np.uint64),
            "idx": rng.permutation(n + 1).astype(np.int64),
            "perm": rng.permutation(n).astype(np.int64),
        }
        one = _passes(k, a, 1)
        for parts in (2, 3, 4, 8, 16):
            for want, got in zip(one, _passes(k, a, parts), strict=True):
                assert np.array_equal(want, got), (n, parts)


@needs_numba
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_reply_entry_fails_every_fused_verdict(bad: float) -> None:
    """NaN or ±inf in an entry a check reads — the rows of a Freivalds check, an MLP reply's gate/up, its
    output, an attention reply's values or outputs — gives a NaN verdict (refused), never a small number,
    in one chunk and split (the kernels' fast-math flags are reassociation and contraction only)."""
    from scx_ref import ops
    from scx_ref.protocol.verify import _TINY, _U64, LAMBDA

    k = cpu_kernels.kernels()
    assert k is not None
    rng = np.random.default_rng(1)
    w = tiny_weights(0, n_layers=1)
    b = TorchBackend(w, "float64")
    n, d = 7, w.config.hidden_size
    x = rng.standard_normal((n, d))
    m = rng.standard_normal((d, d))
    r = rng.standard_normal((d, 2))
    terms = (np.zeros(2), np.full(2, 1e-10), np.full(2, 1e-10), 1e-300)
    n_h, h_kv, dh = 4, 2, 4
    q, kk, v = (
        rng.standard_normal((n, n_h, dh)),
        rng.standard_normal((n, h_kv, dh)),
        rng.standard_normal((n, h_kv, dh)),
    )
    o = ops.attention(q, kk, v, mask=np.arange(n)[None, :] <= np.arange(n)[:, None])
    for split in (False, True):
        with one_chunk_or_split(split):
            honest = b.freivalds_excess(torch.from_numpy(x @ m), r, torch.from_numpy(x), m @ r, terms)
            assert honest is not None and honest < 1.0
            for side in ("y", "x"):
                y2, x2 = x @ m, x.copy()
                (y2 if side == "y" else x2)[n - 1, 3] = bad
                got = b.freivalds_excess(torch.from_numpy(y2), r, torch.from_numpy(x2), m @ r, terms)
                assert got is not None and math.isnan(got), (side, got)
            parts = 2 if split else 1
            rows = np.array([1, n - 1])
            args = (rows, 0, n_h // h_kv, 1 / math.sqrt(dh), 2.0**-53, LAMBDA, _U64, _TINY)
            assert max(k.attention_check(q, kk, v, o, *args, True, parts)) < 1.0
            for name in ("v", "o"):
                v2, o2 = v.copy(), o.copy()
                if name == "v":
                    v2[3, 1, 2] = bad
                else:
                    o2[2, 3, 1] = bad  # a row the range check reads, not recomputed
                by_range, _ = k.attention_check(q, kk, v2, o2, *args, True, parts)
                assert math.isnan(by_range), (name, by_range)


# -- the numpy backend's input check: finiteness in its own dtype -------------------------------------------
def test_an_entry_past_the_backends_range_is_refused_alike() -> None:
    """A float64 array holding 1e300, checked by a float32 backend, became ±inf after the check (numpy
    tested finiteness before its cast; torch after): now both refuse it. Controls: an in-range array is
    accepted and cast; a NaN is refused as before; with ``finite=False`` the caller's own pass decides."""
    import torch

    from scx_ref.backends import NumpyBackend
    from scx_ref.backends.torch_backend import TorchBackend
    from scx_ref.errors import NonFiniteError

    from .tiny import tiny_weights

    w = tiny_weights(0)
    big = np.array([[1.0, 1e300]])
    for backend in (NumpyBackend(w, np.float32), TorchBackend(w, torch.float32)):
        with pytest.raises(NonFiniteError, match="x holds NaN or Inf"):
            backend.check(big, "x", (1, 2))
        ok = backend.check(np.array([[1.0, 2.0]]), "x", (1, 2))
        assert np.array_equal(backend.to_numpy(ok), np.array([[1.0, 2.0]], dtype=np.float32))
        with pytest.raises(NonFiniteError):
            backend.check(np.array([[1.0, np.nan]]), "x", (1, 2))
    got = NumpyBackend(w, np.float32).check(big, "x", (1, 2), finite=False)
    assert got.dtype == np.float32 and np.isinf(got[0, 1])

"""The numpy reference and the torch backend called with the same edge inputs — no
rows, one row, one head, GQA ratios 1/2/4, NaN/inf and extreme rows, non-contiguous inputs — agree in
values, dtypes, shapes and error classes; and the numpy backend's refusals found missing (no keys in
``softmax_values``, non-integer attention positions, heads of width 0, integer rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends.base import check_heads
from scx_ref.backends.numpy_backend import NumpyBackend
from scx_ref.errors import DTypeError, SCXError, ShapeError
from tests.tiny import tiny_weights

torch = pytest.importorskip("torch")
from scx_ref.backends.torch_backend import TorchBackend  # noqa: E402

#: Query heads on KV heads of one width: GQA ratios 1, 2 and 4, and one head.
HEADS = {
    "ratio1": dict(n_heads=2, n_kv_heads=2, head_dim=8),
    "ratio2": dict(n_heads=4, n_kv_heads=2, head_dim=4),
    "ratio4": dict(n_heads=4, n_kv_heads=1, head_dim=4),
    "one_head": dict(n_heads=1, n_kv_heads=1, head_dim=16),
}
#: Agreement bound, relative to the largest entry compared: the two backends round differently (fused
#: kernels, torch's attention), a few units of the dtype's roundoff over these tiny widths.
REL = {"float32": 1e-5, "float64": 1e-13}


def _np(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_np(y) for y in x)
    return x.numpy() if isinstance(x, torch.Tensor) else x


def _outcome(backend: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", _np(getattr(backend, method)(*args, **kwargs))
    except SCXError as exc:
        return "refused", type(exc)


def _same(pair: tuple[Any, Any], dtype: str, method: str, *args: Any, **kwargs: Any) -> None:
    """``method`` of both backends on ``args``, numpy arrays handed to torch as tensors, agrees."""
    nb, tb = pair
    targs = tuple(_as_torch(a) for a in args)
    _agree(_outcome(nb, method, args, kwargs), _outcome(tb, method, targs, kwargs), dtype)


def _as_torch(a: Any) -> Any:
    """Float numpy arrays as tensors (Fortran-ordered ones as non-contiguous tensors of the same layout);
    index arrays and names as they are."""
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        if not a.flags.c_contiguous and a.ndim == 2:
            return torch.from_numpy(np.ascontiguousarray(a.T)).T
        return torch.from_numpy(a)
    return a


def _agree(a: Any, b: Any, dtype: str) -> None:
    """Both refused with one project error class, or both gave arrays of one shape and dtype with the
    same NaN and ±inf entries and finite entries within REL of the largest."""
    assert a[0] == b[0], (a, b)
    if a[0] == "refused":
        assert a[1] is b[1]
        return
    xs, ys = (a[1], b[1]) if isinstance(a[1], tuple) else ((a[1],), (b[1],))
    for x, y in zip(xs, ys, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_array_equal(np.where(np.isinf(x), x, 0), np.where(np.isinf(y), y, 0))
        fin = np.isfinite(x)
        if fin.any():
            scale = max(float(np.abs(x[fin]).max()), np.finfo(x.dtype).tiny)
            assert float(np.abs(x[fin] - y[fin]).max()) <= REL[dtype] * scale


def _rows(rng: np.random.Generator, n: int, width: int, dtype: str, kind: str) -> np.ndarray:
    x = rng.standard_normal((n, width))
    if kind == "huge":
        x *= 1e30 if dtype == "float32" else 1e200
    elif kind == "tiny":
        x *= 1e-30 if dtype == "float32" else 1e-300
    x = x.astype(dtype)
    if n and kind == "nan":
        x[0, 1] = np.nan
    if n and kind == "inf":
        x[0, 2] = np.inf
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_numpy_and_torch_backends_agree_on_edge_inputs(heads: str, dtype: str) -> None:
    w = tiny_weights(3, **HEADS[heads])
    c = w.config
    nb, tb = NumpyBackend(w, np.dtype(dtype)), TorchBackend(w, dtype)
    rng = np.random.default_rng(0)
    pair = (nb, tb)
    for n in (0, 1, 3):
        pos = np.arange(n, dtype=np.int64)
        for kind in ("normal", "huge", "tiny", "nan", "inf", "transposed"):
            x = _rows(rng, n, c.hidden_size, dtype, kind)
            if (
                kind == "transposed"
            ):  # a non-contiguous tensor of the same values: torch's passes read strides
                x = np.asfortranarray(x)
            with np.errstate(all="ignore"):
                for which in ("attn", "final"):
                    _same(pair, dtype, "norm", x, which, 0)
                    _same(pair, dtype, "norm", x, which, 0, name="x")
                for which in ("wqkv", "lm_head"):
                    _same(pair, dtype, "project", x, which, 0)
                if kind in ("normal", "transposed", "nan"):
                    _same(pair, dtype, "mlp", x, 0)
                    _same(pair, dtype, "swiglu_act", x)
            q = _rows(rng, n, c.q_dim, dtype, kind).reshape(n, c.n_heads, c.head_dim)
            k = _rows(rng, n, c.kv_dim, dtype, "normal").reshape(n, c.n_kv_heads, c.head_dim)
            v = _rows(rng, n, c.kv_dim, dtype, "normal").reshape(n, c.n_kv_heads, c.head_dim)
            s = _rows(rng, n, c.n_heads * n, dtype, "normal").reshape(c.n_heads, n, n)
            if n and kind == "inf":
                s[0, 0, :] = -np.inf  # a query head that sees no key
            z = _rows(rng, n, c.q_dim + 2 * c.kv_dim, dtype, kind)
            with np.errstate(all="ignore"):
                _same(pair, dtype, "rope", q, pos)
                for qp, kp in ((pos, pos), (pos, None), (pos[::-1].copy(), pos), (pos, pos + 1)):
                    _same(pair, dtype, "attention", q, k, v, qp, kp)
                _same(pair, dtype, "scores", q, k)
                _same(pair, dtype, "softmax_values", s, v)
                ri, pi = np.arange(c.q_dim + c.kv_dim)[::-1].copy(), np.arange(c.kv_dim)
                _same(
                    pair, dtype, "rope_take", np.ascontiguousarray(z), pos[::-1].copy(), pos, ri, pi, name="z"
                )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_values_over_no_keys_gives_zeros_on_both_backends(dtype: str) -> None:
    """Scores over no keys (heads × queries × 0): zeros, as ``attention`` with no keys gives on both — the
    numpy reference refused them (ShapeError: a softmax over nothing) where torch gave zeros."""
    w = tiny_weights(1)
    c = w.config
    nb, tb = NumpyBackend(w, np.dtype(dtype)), TorchBackend(w, dtype)
    scores = np.zeros((c.n_heads, 2, 0), dtype)
    v = np.zeros((0, c.n_kv_heads, c.head_dim), dtype)
    out = nb.softmax_values(scores, v)
    assert out.shape == (2, c.n_heads, c.head_dim) and out.dtype == np.dtype(dtype)
    assert not out.any()
    np.testing.assert_array_equal(
        out, tb.softmax_values(torch.from_numpy(scores), torch.from_numpy(v)).numpy()
    )
    q = np.ones((2, c.n_heads, c.head_dim), dtype)
    np.testing.assert_array_equal(out, nb.attention(q, v, v, np.arange(2), np.arange(0)))


@pytest.mark.parametrize(
    "k_positions", [np.array([0.5, 1.5, 2.5]), np.array(["0", "1", "2"]), np.array([0.0, 1.0, 2.0])]
)
def test_attention_refuses_positions_that_are_not_integers(k_positions: np.ndarray) -> None:
    """Key positions 0.5, 1.5, 2.5 were compared as they are on numpy (no key ≤ query 0: a row of zeros)
    and truncated to 0, 1, 2 on torch (the query sees key 0): two answers, neither refused; string positions
    were compared as text (torch: a raw ValueError). ShapeError on both backends, as ``rope`` refuses them;
    integer positions still run, and a query's positions too."""
    w = tiny_weights(1)
    c = w.config
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, c.n_heads, c.head_dim))
    k = rng.standard_normal((3, c.n_kv_heads, c.head_dim))
    for backend, arr in ((NumpyBackend(w), np.asarray), (TorchBackend(w, "float64"), torch.from_numpy)):
        qb, kb = arr(q), arr(k)
        with pytest.raises(ShapeError, match="key positions must be integers"):
            backend.attention(qb, kb, kb, np.arange(3), k_positions)
        with pytest.raises(ShapeError, match="query positions must be integers"):
            backend.attention(qb, kb, kb, k_positions, np.arange(3))
        assert np.isfinite(np.asarray(backend.attention(qb, kb, kb, np.arange(3), np.arange(3)))).all()
    assert np.isfinite(
        NumpyBackend(w).attention(q, k, k, k_positions, None)
    ).all()  # no mask: positions unused


def test_heads_of_width_zero_are_refused_on_both_backends() -> None:
    """q and k heads of width 0: the scale 1/√0 gave NaN scores on torch and a divide-by-zero on numpy."""
    w = tiny_weights(1)
    nb, tb = NumpyBackend(w), TorchBackend(w, "float64")
    q, k = np.zeros((2, 4, 0)), np.zeros((2, 2, 0))
    with pytest.raises(ShapeError):
        check_heads(q.shape, k.shape)
    for b, a in ((nb, lambda x: x), (tb, torch.from_numpy)):
        with pytest.raises(ShapeError):
            b.scores(a(q), a(k))
        with pytest.raises(ShapeError):
            b.attention(a(q), a(k), a(k), np.arange(2), None)


@pytest.mark.parametrize("moe", [False, True])
def test_numpy_backend_refuses_integer_rows(moe: bool) -> None:
    """Integer rows: the numpy reference computed in float64 on a float32 backend, and an MoE layer's MLP
    in int64 (every row truncated to zeros), where torch refuses them. DTypeError now."""
    w = tiny_weights(1, moe=moe)
    c = w.config
    nb = NumpyBackend(w, np.float32)
    x = np.ones((2, c.hidden_size), np.int64)
    for call in (
        lambda: nb.norm(x, "attn", 0),
        lambda: nb.norm(x, "final", name="x"),
        lambda: nb.project(x, "wqkv", 0),
        lambda: nb.mlp(x, 0),
        lambda: nb.swiglu_act(x),
        lambda: nb.project64_norm(x, "mlp", 0, np.ones((c.hidden_size, 1))),
    ):
        with pytest.raises(DTypeError, match="floating"):
            call()
    out = nb.mlp(x.astype(np.float32), 0)  # the same rows as floats: the stage runs, in the dtype
    assert out.dtype == np.float32 and np.abs(out).max() > 0


@pytest.mark.parametrize("moe", [False, True])
def test_torch_backend_refuses_integer_rows_as_numpy_does(moe: bool) -> None:
    """Integer rows on the torch backend raised torch's own RuntimeError (norm, project, mlp) or
    NotImplementedError (swiglu_act); DTypeError now, as on numpy."""
    w = tiny_weights(1, moe=moe)
    c = w.config
    tb = TorchBackend(w, "float32")
    x = torch.ones((2, c.hidden_size), dtype=torch.int64)
    for call in (
        lambda: tb.norm(x, "attn", 0),
        lambda: tb.norm(x, "final", name="x"),
        lambda: tb.project(x, "wqkv", 0),
        lambda: tb.mlp(x, 0),
        lambda: tb.swiglu_act(x),
    ):
        with pytest.raises(DTypeError, match="floating"):
            call()
    out = tb.mlp(x.float(), 0)  # the same rows as floats: the stage runs, in the dtype
    assert out.dtype == torch.float32 and bool(out.abs().max() > 0)

"""Fitting-based inversion (paper §7.3 "Fitting-based attacks"; DESIGN §8).

An inverter maps what the server sees for one row at one stage to the row's token. It is fitted on
*public* text run through the public weights (plus the noise process the attacker knows), as a map to
the token's unit-norm embedding; the prediction is the vocabulary row of highest cosine similarity.
Two inverters: ridge regression (closed form) and a small MLP (torch, one hidden layer).

At attention stages the features sit under a secret head-structured permutation σ; before inverting,
:func:`match_permuted_rows` undoes it exactly where the server holds the same rows unpermuted (its own
un-noised QKV-stage rows: sorted rows match, then the columns of matched rows), and
:func:`recover_column_permutation` guesses it elsewhere by matching per-coordinate statistics of the
observed rows to those of public rows (Hungarian assignment); :func:`sorted_rows` gives σ-invariant
features (each row's values sorted), the inversion-side twin of the vocabulary fingerprints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from .._checks import token_ids
from ..errors import ConfigError, DTypeError, ShapeError
from ..weights import ModelWeights
from ._model import float_arg, int_arg, rows_arg
from .vocab_match import nearest_rows

__all__ = [
    "Inverter",
    "column_stats",
    "exact_matches",
    "fit_inverter",
    "match_permuted_rows",
    "recover_column_permutation",
    "sorted_rows",
    "unit_vocabulary",
]

Array = npt.NDArray[Any]


def _unit(x: Array) -> Array:
    return np.asarray(x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12))


@dataclass
class Inverter:
    """A fitted map features → unit embedding, decoded by cosine nearest neighbour over the vocabulary."""

    kind: str
    mean: Array
    std: Array
    table: Array  # unit-norm embedding rows
    w: Array | None = None
    mlp: Any = None

    def embed(self, feats: Array) -> Array:
        """The predicted unit embedding of each row (ShapeError unless rows × the fitted feature count;
        NonFiniteError for NaN or ±Inf)."""
        z = (rows_arg(feats, "features", len(self.mean)) - self.mean) / self.std
        if self.kind == "ridge":
            assert self.w is not None
            return _unit(np.concatenate([z, np.ones((len(z), 1))], axis=1) @ self.w)
        import torch

        with torch.no_grad():
            out = self.mlp(torch.from_numpy(z.astype(np.float32))).double().numpy()
        return _unit(out)

    def predict(self, feats: Array, top: int = 1) -> Array:
        """Token ids (rows × top) ranked by cosine similarity of the predicted embedding (ConfigError
        unless 1 ≤ top ≤ the vocabulary size)."""
        top = int_arg(top, "top", 1, len(self.table) + 1)
        sims = self.embed(feats) @ self.table.T
        if top == 1:
            return np.asarray(np.argmax(sims, axis=1)[:, None])
        return np.asarray(np.argsort(-sims, axis=1)[:, :top])


def unit_vocabulary(weights: ModelWeights) -> Array:
    """The embedding rows scaled to unit norm: the targets and the decoding table of every inverter."""
    return _unit(np.asarray(weights.embed, dtype=np.float64))


def fit_inverter(
    feats: Array,
    tokens: npt.ArrayLike,
    weights: ModelWeights,
    kind: str = "ridge",
    lam: float = 1.0,
    seed: int = 0,
    epochs: int = 300,
    hidden: int = 512,
    table: Array | None = None,
) -> Inverter:
    """Fit an inverter on public (features, token) pairs. Ridge: W = (ZᵀZ + λI)⁻¹ZᵀY on standardized
    features Z with an intercept column; MLP: Z → ReLU(hidden) → d, trained by Adam on the cosine loss.

    ``table``: :func:`unit_vocabulary` of ``weights``, when the caller fits many inverters and shares one
    copy (V × d floats each otherwise; SmolLM2's is 226 MB).

    Checked first: ShapeError unless ``feats`` is rows × d (finite: NonFiniteError) with one token per
    row and at least one row; VocabularyError for a token outside the vocabulary; ConfigError for an
    unknown ``kind``, λ < 0 or NaN, an integer ``seed``, ``epochs`` ≥ 0 and ``hidden`` ≥ 1 that are not;
    a ``table`` not of the vocabulary's shape (ShapeError), not numeric (DTypeError) or not finite
    (NonFiniteError)."""
    x = rows_arg(feats, "features")
    t = np.asarray(token_ids(tokens, weights.config.vocab_size, allow_empty=True), dtype=np.int64)
    if len(x) != len(t) or not len(x):
        raise ShapeError(
            f"features {x.shape} and tokens {t.shape} do not match (one token per row, >= 1 row)"
        )
    if kind not in ("ridge", "mlp"):
        raise ConfigError(f"inverter kind must be 'ridge' or 'mlp', got {kind!r}")
    lam = float_arg(lam, "lam", 0.0)
    seed, epochs, hidden = (
        int_arg(seed, "seed", None),
        int_arg(epochs, "epochs"),
        int_arg(hidden, "hidden", 1),
    )
    if table is None:
        table = unit_vocabulary(weights)
    else:
        table = rows_arg(table, "table")  # numeric and finite: a NaN row would decode every row to token 0
        if table.shape != weights.embed.shape:
            raise ShapeError(f"table of shape {table.shape} is not the vocabulary's {weights.embed.shape}")
    y = table[t]
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    z = (x - mean) / std
    if kind == "ridge":
        za = np.concatenate([z, np.ones((len(z), 1))], axis=1)
        reg = lam * np.eye(za.shape[1])
        reg[-1, -1] = 0.0
        try:
            w = np.linalg.solve(za.T @ za + reg, za.T @ y)
        except np.linalg.LinAlgError:
            raise ConfigError(f"the ridge system is singular at lam={lam}: use lam > 0") from None
        return Inverter("ridge", mean, std, table, w=w)
    import torch

    gen = torch.Generator().manual_seed(seed)
    # The layers are built on the meta device (no memory, no numbers: torch's default initialisation would
    # draw from, and advance, the global random state), moved to the CPU uninitialised and initialised from
    # ``gen`` alone — the fit is a function of ``seed`` and leaves the caller's random state untouched.
    meta = torch.device("meta")
    net = torch.nn.Sequential(
        torch.nn.Linear(z.shape[1], hidden, device=meta),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, y.shape[1], device=meta),
    ).to_empty(device="cpu")
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / np.sqrt(max(p.shape[-1], 1))))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    zt, yt = torch.from_numpy(z.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    batch = min(512, len(zt))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP trains fastest on one thread (and spares a busy machine)
    try:
        for _ in range(epochs):
            idx = torch.randperm(len(zt), generator=gen)[:batch]
            loss = 1.0 - torch.nn.functional.cosine_similarity(net(zt[idx]), yt[idx]).mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return Inverter("mlp", mean, std, table, mlp=net)


def sorted_rows(x: Array) -> Array:
    """Each row's values sorted (rows × everything else, flattened): invariant to every permutation of
    its coordinates. ShapeError unless ``x`` has at least 2 dimensions (a 1-D array is one row's values,
    not rows of one value each); DTypeError when it is not numeric; NonFiniteError for NaN or ±Inf."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"rows must be a numeric array: {exc}") from None
    if arr.ndim < 2:
        raise ShapeError(f"rows must have at least 2 dimensions (rows × values), got shape {arr.shape}")
    flat = rows_arg(arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:]))), "rows")
    return np.sort(flat, axis=1)


def column_stats(x: Array) -> Array:
    """Per-column statistics (mean, std, mean |x|, 10/50/90 % quantiles): columns × 6 (ShapeError unless
    ``x`` is 2-D with at least one row; NonFiniteError for NaN or ±Inf)."""
    x = rows_arg(x, "rows")
    if not len(x):
        raise ShapeError("column statistics of no rows")
    q = np.quantile(x, [0.1, 0.5, 0.9], axis=0)
    return np.stack([x.mean(0), x.std(0), np.abs(x).mean(0), q[0], q[1], q[2]], axis=1)


def recover_column_permutation(observed: Array, public: Array) -> Array:
    """An index array ``idx`` with observed[:, idx] ≈ the unpermuted columns: the assignment of observed
    columns to public columns minimizing the distance between their standardized statistics (ShapeError
    unless both have the same number of columns)."""
    so, sp = column_stats(observed), column_stats(public)
    if len(so) != len(sp):
        raise ShapeError(f"observed rows have {len(so)} columns, public rows {len(sp)}")
    scale = sp.std(axis=0) + 1e-12
    cost = np.abs((sp[:, None, :] - so[None, :, :]) / scale).sum(-1)  # public col × observed col
    rows, cols = linear_sum_assignment(cost)
    idx = np.empty(len(rows), dtype=np.int64)
    idx[rows] = cols
    return idx


def exact_matches(a: Array, b: Array, rtol: float) -> Array:
    """For each row of ``a`` the index of its nearest row of ``b`` (:func:`~.vocab_match.nearest_rows`, L2)
    when that row equals it entry by entry within ``rtol`` (|a − b| ≤ rtol·(1 + |a|)); else −1. The checks of
    :func:`~.vocab_match.nearest_rows` (2-D rows of one width, finite, ``b`` non-empty)."""
    if not len(a):
        return np.full(0, -1, dtype=np.int64)
    j, _ = nearest_rows(a, b, "l2")
    ok = np.max(np.abs(b[j] - a) / (1.0 + np.abs(a)), axis=1) <= rtol
    return np.asarray(np.where(ok, j, -1))


def match_permuted_rows(observed: Array, reference: Array, rtol: float = 1e-4) -> tuple[Array, Array | None]:
    """Exact σ recovery from rows the server holds unpermuted. ``rows[j]``: the ``reference`` row holding
    observed row j's values in some order (sorted rows equal within ``rtol``; −1 where none does). ``idx``:
    when every observed row matched and the columns of ``observed`` and of the matched rows pair one to one,
    the column order with ``observed[:, idx] == reference[rows]`` (within ``rtol``) — σ undone, read off the
    rows alone; else None (no σ is fabricated: noised reference rows match nothing).

    Checked first: ShapeError unless both are 2-D of one width with at least one reference row,
    NonFiniteError for NaN or ±Inf, ConfigError for an ``rtol`` that is not a finite number ≥ 0."""
    rtol = float_arg(rtol, "rtol", 0.0)
    obs, ref = rows_arg(observed, "observed rows"), rows_arg(reference, "reference rows")
    if obs.shape[1] != ref.shape[1] or not len(ref):
        raise ShapeError(f"observed rows {obs.shape} and reference rows {ref.shape}: not one width, or none")
    rows = exact_matches(np.sort(obs, axis=1), np.sort(ref, axis=1), rtol)
    if not len(obs) or np.any(rows < 0):
        return rows, None
    col = exact_matches(obs.T, ref[rows].T, rtol)  # column a of observed is column col[a] of the reference
    if np.any(col < 0) or len(set(col.tolist())) != obs.shape[1]:
        return rows, None
    idx = np.empty(obs.shape[1], dtype=np.int64)
    idx[col] = np.arange(obs.shape[1])
    return rows, idx

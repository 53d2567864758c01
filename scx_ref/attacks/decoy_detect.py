"""Invariant checks that separate decoy rows from real rows (DESIGN §5.1, §8).

* :func:`norm_residual` — a row the client normalized satisfies rms(y/γ) = 1 (up to ε); a moment-matched
  Gaussian decoy does not.
* :func:`vocab_distance` — a block-1 row (raw or normalized) is a vocabulary-table row.
* :func:`residual_links` — the protocol's own bookkeeping: block i's FFN-stage rows are
  H = X + O·W_o, a *sum* of one QKV-stage row and one O-stage output row the server itself computed
  (the client keeps the residual stream in true order, so every real row obeys this identity). A row
  that is no such sum is a decoy; a QKV/O row used by no sum is a decoy. Calibration decoys pass the first
  two checks by construction; this one does not care how decoys look. Where the QKV stage is noised
  (level paper, block 1: E = norm(X) + Lap(β)) it links by maximum likelihood under the public β instead.
* :func:`blinded_links` — where all three stages of a block are blinded (level ``blind``) the identity above
  cannot be formed; a real FFN row still continues its own QKV row's residual stream, which a centred inner
  product of the two noised rows can find when the noise is small.
* :func:`frequency_prior` — where block 1 is not noised every QKV row is a known token; decoys whose
  tokens are drawn unlike real text (uniformly over a vocabulary: mostly rare tokens) are the rows a public
  unigram finds least probable.
* :func:`recurring_rows` — a client draws every request's decoys from one calibration pool per master
  secret, so a server that records several sessions of one client sees the same pool rows again, verbatim,
  wherever the stage is not noised; a real row past block 1 depends on its whole prefix and recurs only for
  a shared prefix. Rows seen in two sessions are then decoys (block 1 excepted: its real rows are
  vocabulary rows, which recur whenever two prompts share a token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaincinv

from .. import ops
from .._checks import token_ids
from ..errors import ConfigError, DTypeError, ShapeError
from ..weights import ModelWeights
from ._model import float_arg, int_arg, rows_arg
from .vocab_match import nearest_rows, normalized_table

__all__ = [
    "blinded_links",
    "frequency_prior",
    "norm_residual",
    "recurring_rows",
    "residual_links",
    "vocab_distance",
]

Array = npt.NDArray[Any]


def norm_residual(rows: Array, gamma: Array) -> Array:
    """|rms(y/γ) − 1| per row: 0 for an RMSNorm output y = γ ⊙ x / rms(x) (ε = 0; an ε > 0 makes rms(y/γ) =
    √(mean x² / (mean x² + ε)) < 1, a residual of about ε / (2·mean x²)). ShapeError unless ``rows`` is
    rows × len(γ) and γ 1-D; NonFiniteError for NaN or ±Inf; ConfigError for a γ with a zero entry (y/γ
    is then 0/0 there: the identity cannot be checked, and a NaN residual would pass no threshold, so a
    real row would read as a decoy)."""
    g = rows_arg(gamma, "gamma", ndim=1)
    if not np.all(g != 0):
        raise ConfigError("gamma has a zero entry: rms(y/γ) is undefined, the identity cannot be checked")
    y = rows_arg(rows, "rows", len(g)) / g
    return np.asarray(np.abs(np.sqrt(np.mean(y**2, axis=1)) - 1.0))


def vocab_distance(rows: Array, weights: ModelWeights, normalized: bool) -> Array:
    """Relative L2 distance of each row to the nearest (normalized) embedding row: 0 for a real
    un-noised block-1 row. DTypeError, ShapeError, NonFiniteError unless ``rows`` are finite numeric
    rows × hidden size."""
    table = normalized_table(weights) if normalized else np.asarray(weights.embed, dtype=np.float64)
    rows = rows_arg(rows, "rows", table.shape[1])
    _, d = nearest_rows(rows, table, "l2")
    return np.asarray(d / (np.linalg.norm(rows, axis=1) + 1e-12))


def residual_links(
    x_qkv: Array,
    x_o: Array,
    x_ffn: Array,
    weights: ModelWeights,
    layer: int,
    qkv_normalized: bool = False,
    tol: float = 1e-4,
    beta: float | None = None,
    n_real: int | None = None,
) -> tuple[Array, Array, Array]:
    """Which rows are real, by the identity FFN row = QKV row + O-stage output row (block ``layer``).

    Returns boolean masks (qkv_real, o_real, ffn_real) over each message's rows: a FFN row is real
    when some pair (x, o·W_o) sums to it within relative ``tol``; the rows of such pairs are real, and so
    is every QKV or O row that forms such a pair as well (a repeated token's equal block-1 rows: all real).

    With ``qkv_normalized`` (a noised QKV stage: the client sent E = norm(X) + Lap(β) rows, DESIGN §5.1) the
    QKV rows are not the residual; the O and FFN rows still are raw (level paper), so a real FFN row f and
    its O row o give norm(f − o·W_o) (the block's attention RMSNorm), which is its QKV row up to the noise.
    ``beta`` is that noise's public Laplace scale β (the release plan's): None (not given) checks nothing
    and returns all-False masks, as before; β = 0 compares norm(f − o·W_o) to the rows within relative
    ``tol``; β > 0 is the maximum-likelihood link: the L1 distance D(f, o, e) = ‖e − norm(f − o·W_o)‖₁ of a
    real triple is a sum of d |Lap(β)|, Gamma(d, β), so a triple links when D is at most that law's
    1 − ``tol`` quantile (a real row fails to link with probability ``tol``); the FFN rows are assigned to
    QKV rows one-to-one by least total min(D, threshold) (a repeated token's two noised copies then each keep
    their own row), and the linked pairs' rows are real. With ``n_real`` (the prompt's row count, public in
    the open message) the ``n_real`` assigned pairs of least D less their QKV row's median D link instead,
    whatever the threshold. A decoy links only by chance, more often the larger β: the threshold grows as
    dβ, the distance of a wrong triple less. Where the relation cannot hold (another request's rows; O or
    FFN rows noised too, level blind) only such chance links occur. At block 1 the FFN rows also link
    through the vocabulary (FFN row − O output ∈ embedding table): :func:`vocab_match.match_block1_residual`,
    which the harness scores apart (``vm_resid1_bag_recall``).

    Checked first: ConfigError for a block the model lacks, a ``tol`` that is not a number > 0 (< 1 with
    β > 0), a ``beta`` that is neither None nor a finite number >= 0, an ``n_real`` neither None nor an
    integer >= 0; ShapeError unless the QKV and FFN rows are rows × hidden size and the O rows rows × q_dim;
    NonFiniteError for NaN or ±Inf. A message with no rows links nothing (all-False masks).
    """
    c = weights.config
    lw = weights.layers[int_arg(layer, "layer", 0, c.n_layers)]
    tol = float_arg(tol, "tol", 0.0)
    if tol <= 0:
        raise ConfigError(f"tol must be > 0, got {tol}")
    b = None if beta is None else float_arg(beta, "beta", 0.0)
    if b is not None and b > 0 and tol >= 1:
        raise ConfigError(f"with beta > 0, tol is a probability and must be < 1, got {tol}")
    count = None if n_real is None else int_arg(n_real, "n_real", 0)
    xq = rows_arg(x_qkv, "QKV-stage rows", c.hidden_size)
    y = rows_arg(x_o, "O-stage rows", c.q_dim) @ lw.wo
    f = rows_arg(x_ffn, "FFN-stage rows", c.hidden_size)
    q_real = np.zeros(len(xq), dtype=bool)
    o_real = np.zeros(len(y), dtype=bool)
    f_real = np.zeros(len(f), dtype=bool)
    if (qkv_normalized and b is None) or not (len(xq) and len(y) and len(f)):
        return q_real, o_real, f_real
    if qkv_normalized and b is not None and b > 0:
        return _noised_links(xq, y, f, lw.attn_norm, c.rms_eps, b, tol, count)
    for j, row in enumerate(f):
        # f − y_b must equal some x_a (normalized: norm(f − y_b)): nearest x for each candidate difference
        diff = row[None, :] - y  # (n_o, d)
        if qkv_normalized:
            diff = ops.rms_norm(diff, lw.attn_norm, c.rms_eps)
        scale = np.linalg.norm(diff, axis=1)[:, None] if qkv_normalized else np.linalg.norm(row)
        d = np.linalg.norm(diff[:, None, :] - xq[None, :, :], axis=2) / (scale + 1e-12)
        ok = d < tol  # (n_o, n_q): the pairs that sum to this row
        if ok.any():
            f_real[j] = True
            q_real |= ok.any(axis=0)
            o_real |= ok.any(axis=1)
    return q_real, o_real, f_real


def _noised_links(
    e: Array, y: Array, f: Array, gamma: Array, eps: float, beta: float, miss: float, count: int | None
) -> tuple[Array, Array, Array]:
    """:func:`residual_links`' β > 0 route: the masks of the FFN/QKV rows assigned one-to-one by least
    total min(‖e − norm(f − y)‖₁, t), t the Gamma(d, β) quantile 1 − ``miss``; the pairs within t link, or
    (``count`` given) the ``count`` pairs of least distance less the median distance of their QKV row to
    every FFN row (which removes that row's own noise magnitude, common to all its candidates)."""
    thr = float(gammaincinv(e.shape[1], 1.0 - miss)) * beta
    cost = np.empty((len(f), len(e)))
    best_o = np.empty((len(f), len(e)), dtype=np.int64)
    for j, row in enumerate(f):
        cand = ops.rms_norm(row[None, :] - y, gamma, eps)  # (n_o, d): each O row's candidate QKV row
        # a zero difference normalizes to 0/0 at ε = 0: no candidate there
        d = np.nan_to_num(np.abs(cand[:, None, :] - e[None, :, :]).sum(axis=2), nan=np.inf)  # (n_o, n_q)
        best_o[j] = np.argmin(d, axis=0)
        cost[j] = d[best_o[j], np.arange(len(e))]
    rows, cols = linear_sum_assignment(np.minimum(cost, thr))
    dist = cost[rows, cols]
    if count is None:
        ok = dist <= thr
    else:  # ties broken by row order, as the stable sort keeps it
        ok = np.zeros(len(dist), dtype=bool)
        ok[np.argsort(dist - np.median(cost, axis=0)[cols], kind="stable")[:count]] = True
    q_real = np.zeros(len(e), dtype=bool)
    o_real = np.zeros(len(y), dtype=bool)
    f_real = np.zeros(len(f), dtype=bool)
    f_real[rows[ok]] = True
    q_real[cols[ok]] = True
    o_real[best_o[rows[ok], cols[ok]]] = True
    return q_real, o_real, f_real


def blinded_links(e_qkv: Array, e_ffn: Array, n_real: int) -> tuple[Array, Array]:
    """Which rows are real where a block's QKV, O and FFN stages are all blinded (level ``blind``: the server
    sees E = norm(x) + Lap(β), F = norm(x + o·W_o) + Lap(β) and the O-stage rows o noised as well, so the
    identity "FFN row = QKV row + O·W_o" of :func:`residual_links` cannot be formed). A real FFN row's
    normalized residual stream mostly continues its own QKV row's (one attention update against the whole),
    so the attacker scores every (FFN, QKV) pair by the inner product of their rows, centred (each FFN row's
    and each QKV row's mean score removed: its own noise energy and the direction every row shares cancel),
    assigns FFN rows to QKV rows one to one by the largest total score (``linear_sum_assignment``), and calls
    the ``n_real`` best-scoring pairs real (n is public in the open message). Decoys of the two stages are
    drawn independently, so they pair with nothing but by chance.

    Returns boolean masks (qkv_real, ffn_real) over each message's rows, ``n_real`` true in each. Chance —
    a pairing blind to the rows — marks each decoy real with probability n / (n + r); see
    ``models/blind_links.py`` for what it finds on SmolLM2. ShapeError unless both are rows × one width;
    DTypeError, NonFiniteError as :func:`~scx_ref.attacks._model.rows_arg`; ConfigError unless ``n_real`` is
    an integer from 0 to the fewer rows of the two messages."""
    q = rows_arg(e_qkv, "QKV-stage rows")
    f = rows_arg(e_ffn, "FFN-stage rows", q.shape[1])
    n = int_arg(n_real, "n_real", 0)
    if n > min(len(q), len(f)):
        raise ConfigError(f"n_real {n} is more than the {min(len(q), len(f))} rows of the smaller message")
    q_real = np.zeros(len(q), dtype=bool)
    f_real = np.zeros(len(f), dtype=bool)
    if n == 0:
        return q_real, f_real
    score = f @ q.T
    score = score - score.mean(axis=1, keepdims=True) - score.mean(axis=0, keepdims=True) + score.mean()
    rows, cols = linear_sum_assignment(-score)
    best = np.argsort(-score[rows, cols], kind="stable")[:n]  # ties broken by row order
    f_real[rows[best]] = True
    q_real[cols[best]] = True
    return q_real, f_real


def frequency_prior(tokens: npt.ArrayLike, decoy: npt.ArrayLike, log_prior: npt.ArrayLike) -> float:
    """The fraction of decoys found by a frequency prior: the attacker reads each row's token (block 1
    un-noised: an exact vocabulary-row match, :func:`vocab_distance` 0), ranks the n + r rows by the public
    unigram log-probability of their tokens, and calls the r least probable rows decoys (it is told r).
    Returned: the expected number of true decoys among the called rows, divided by r — recall at r, equal to
    precision at r. Rows tied at the cut (equal log-probability: a repeated token, tokens of equal count)
    are called in proportion, as a uniformly random tie-break would in expectation, so neither the rows'
    order nor the tie decides the score. Chance (a ranking blind to the decoys) scores r / (n + r); 1 means
    every decoy was found.

    ``tokens``: the rows' token ids; ``decoy``: which rows are decoys (the truth the score is taken
    against; r = its count); ``log_prior``: the attacker's log p(t) for every t of the vocabulary (e.g.
    :attr:`~scx_ref.attacks.stats.FrequencyPrior.log_probs`; only its order matters). VocabularyError
    unless ``tokens`` is a 1-D integer array of ids in [0, len(log_prior)) (ProtocolError when empty);
    DTypeError unless ``decoy`` is boolean, ShapeError unless it is 1-D as long as ``tokens``; ConfigError
    when it marks no row (nothing to find); ``log_prior``: DTypeError, ShapeError (not 1-D), NonFiniteError
    (:func:`~scx_ref.attacks._model.rows_arg`)."""
    prior = rows_arg(log_prior, "log_prior", ndim=1)
    ids = token_ids(tokens, len(prior))
    try:
        truth = np.asarray(decoy)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DTypeError(f"decoy must be a boolean mask numpy can read: {exc}") from None
    if truth.dtype != np.bool_:
        raise DTypeError(f"decoy must be a boolean mask, got dtype {truth.dtype}")
    if truth.shape != ids.shape:
        raise ShapeError(f"decoy must be 1-D of the tokens' length {len(ids)}, got shape {truth.shape}")
    r = int(truth.sum())
    if r == 0:
        raise ConfigError("no row is a decoy: there is nothing to find")
    score = prior[ids]
    cut = np.sort(score)[r - 1]  # the r-th least probable row's log-probability
    below, tied = score < cut, score == cut
    share = (r - int(below.sum())) / int(tied.sum())  # the tied rows' chance of being called
    return (int((below & truth).sum()) + share * int((tied & truth).sum())) / r


def recurring_rows(rows_per_session: Sequence[Array], tol: float = 0.0) -> list[Array]:
    """Which rows of each session recur in another session: for the rows one (stage, layer) message of
    each session carried (``rows_per_session[s]``: rows × width), a boolean mask over session s's rows,
    true where some row of a session t ≠ s is equal to it — with ``tol`` = 0, every value equal (−0 and +0
    alike); with ``tol`` > 0, ‖x − y‖₂ ≤ ``tol``·max(‖x‖₂, ‖y‖₂). A row repeated within its own session only
    is not marked. What it measures: how many of the rows a server records it has seen before in another
    session — for a client that draws the decoys of every request from one calibration pool, the decoys it
    re-drew (past block 1's noised QKV stage; real rows there recur only for a shared prefix).

    ConfigError unless ``rows_per_session`` is a sequence (list, tuple, …; not a string or a numpy array)
    and ``tol`` a real number >= 0; each session's rows: DTypeError unless numeric, ShapeError unless 2-D
    of the first session's width, NonFiniteError for NaN or ±Inf (:func:`~scx_ref.attacks._model.rows_arg`).
    No session gives an empty list; a single session, all-False."""
    if isinstance(rows_per_session, (str, bytes)) or not isinstance(rows_per_session, Sequence):
        raise ConfigError(
            "rows_per_session must be a sequence of per-session row arrays, "
            f"got {type(rows_per_session).__name__}"
        )
    tol = float_arg(tol, "tol", 0.0)
    sessions: list[Array] = []
    for k, rows in enumerate(rows_per_session):
        width = sessions[0].shape[1] if sessions else None
        # + 0.0 turns −0 into +0: equal rows, equal bytes
        sessions.append(rows_arg(rows, f"rows of session {k}", width) + 0.0)
    masks = [np.zeros(len(a), dtype=bool) for a in sessions]
    if tol == 0:  # exact: one pass over the rows' bytes
        first: dict[bytes, int] = {}  # each distinct row → the first session holding it
        recurs: set[bytes] = set()
        for k, a in enumerate(sessions):
            for row in a:
                key = row.tobytes()
                if first.setdefault(key, k) != k:
                    recurs.add(key)
        for a, mask in zip(sessions, masks, strict=True):
            mask[:] = [row.tobytes() in recurs for row in a]
        return masks
    # within tol: every pair of sessions, on rows scaled by one power of two (exact) so no norm overflows
    peak = max((float(np.max(np.abs(a))) for a in sessions if a.size), default=0.0)
    unit = [np.ldexp(a, -int(np.frexp(peak)[1])) for a in sessions] if peak > 0 else sessions
    norms = [np.linalg.norm(a, axis=1) for a in unit]
    for s in range(len(unit)):
        for t in range(s + 1, len(unit)):
            dist = np.linalg.norm(unit[s][:, None, :] - unit[t][None, :, :], axis=2)
            close = dist <= tol * np.maximum(norms[s][:, None], norms[t][None, :])
            masks[s] |= close.any(axis=1)
            masks[t] |= close.any(axis=0)
    return masks

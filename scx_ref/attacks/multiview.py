"""Joint noise-aware inversion of many views of one token (DESIGN §8: the strongest fitting attack on
blinded stages that this project knows).

One-time Laplace noise hides each message on its own, but the server often receives *several* noised
messages about the same token whose rows it can align:

* **a generation step** sends one row per stage and block — at level ``blind`` with every block guarded,
  the QKV input, the attention output, the MLP input and the SwiGLU product of every block, each with its
  own noise (:data:`~scx_ref.stages.Stage.GEN_QKV`, ``GEN_O``, ``GEN_FFN_UP``, ``GEN_FFN_DOWN``): one row
  each, all about the step's token;
* **a prefill permutation group**: block i's FFN stage, its down-projection input and block i+1's QKV
  stage are sent under the same π_{i+1}, so row j of each is the same token.

Two routes, the better one on held-out public rows taken (:class:`JointInverter`):

* **ridge mix** — for every view a ridge inverter fitted on public rows in the message's own form
  (normalized or raw, plus Laplace noise of the view's β, which the public configuration fixes), weighed
  by its mean cosine on held-out public rows; the views' predicted unit embeddings are summed: independent
  noise averages out across views. The noisy views' predictions share a bias (towards frequent tokens)
  that does not average out, so that sum can recover fewer tokens than its best view alone: the attacker
  then uses that one view.
* **template likelihood** (:class:`TemplateLikelihood`) — the token maximizing
  Σ_v −‖x_v − μ_v(t)‖₁ / b_v + log p(t): μ_v(t) the token's mean public row in view v (exact where the
  row depends on the token alone: block 1's input and its normalization, :func:`token_rows`), b_v the
  view's Laplace scale fitted on held-out public rows (β for an exact view), p the public unigram prior —
  the Laplace likelihood of one-time noise around each token's row, which the ridge maps only approximate.

A view with no noise (β = 0) is simply a very good view (an exact one identifies the token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import token_ids
from ..errors import ConfigError, ShapeError
from ..transforms import laplace_noise
from ..weights import DenseMLP, ModelWeights
from ._model import Trace, float_arg, int_arg, rows_arg
from .inversion import Inverter, fit_inverter
from .vocab_match import l1_distances, normalized_table

__all__ = ["Form", "JointInverter", "TemplateLikelihood", "public_rows", "token_rows"]

Array = npt.NDArray[Any]
#: What a message row is, as a function of the plaintext forward at its block: ``x`` the block input,
#: ``xhat`` its attention RMSNorm, ``o`` the attention output, ``h`` the residual before the MLP, ``hn`` its
#: MLP RMSNorm, ``m`` the SwiGLU product silu(hn W_gate) ⊙ hn W_up (a dense block's down-projection input).
Form = Literal["x", "xhat", "o", "h", "hn", "m"]
_FORMS: tuple[str, ...] = ("x", "xhat", "o", "h", "hn", "m")
#: How many held-out public rows the template likelihood is compared with the ridge mix on.
_HELD_TEMPLATE = 128
#: The vocabulary size above which the template likelihood scores only a shortlist of each row's tokens.
_SHORTLIST_VOCAB = 4096
_SHORTLIST = 64


def public_rows(weights: ModelWeights, traces: Sequence[Any], form: Form, block: int) -> Array:
    """The rows of ``form`` at ``block`` for every public token (the traces' windows, in order).
    ConfigError for an unknown form, a block the model lacks, no traces, or a trace that is no
    :class:`~._model.Trace` or stops before ``block``."""
    c = weights.config
    if form not in _FORMS:
        raise ConfigError(f"form must be one of {', '.join(_FORMS)}, got {form!r}")
    lw = weights.layers[int_arg(block, "block", 0, c.n_layers)]
    if not traces:
        raise ConfigError("no public traces")
    if any(not isinstance(t, Trace) or len(t.h) <= block for t in traces):
        raise ConfigError(f"every public trace must be a Trace that reaches block {block}")
    if form == "x":
        return np.concatenate([t.x[block] for t in traces])
    if form == "xhat":
        return np.concatenate([t.xhat[block] for t in traces])
    if form == "o":
        return np.concatenate([t.o[block] for t in traces])
    h = np.concatenate([t.h[block] for t in traces])
    if form == "h":
        return h
    hn = ops.rms_norm(h, lw.mlp_norm, c.rms_eps)
    if form == "hn":
        return hn
    if not isinstance(lw.mlp, DenseMLP):
        raise ConfigError("the SwiGLU-product form is per expert in an MoE block")
    return np.asarray(ops.silu(hn @ lw.mlp.w_gate) * (hn @ lw.mlp.w_up))


def token_rows(weights: ModelWeights, form: Form, block: int) -> Array | None:
    """Every token's row of ``form`` at ``block`` (V × width) where it depends on the token alone — block 1's
    input E[t] (``x``) and its attention RMSNorm (``xhat``) — else None (the row depends on the context).
    ConfigError for an unknown form or a block the model lacks."""
    c = weights.config
    if form not in _FORMS:
        raise ConfigError(f"form must be one of {', '.join(_FORMS)}, got {form!r}")
    if int_arg(block, "block", 0, c.n_layers) != 0 or form not in ("x", "xhat"):
        return None
    return np.asarray(weights.embed, dtype=np.float64) if form == "x" else normalized_table(weights)


@dataclass
class TemplateLikelihood:
    """The per-token template likelihood of aligned views (see the module doc). Per view v: ``exact[v]``
    each token's row (V × width) where it depends on the token alone, else ``means[v]`` the mean public row
    of each token the public text holds (row ``seen[t]`` for token t; −1: none) and ``coef[v]`` a ridge
    regression (d + 1 × width) of the row on the token's embedding — the template of a token never seen;
    ``scales[v]`` the view's Laplace scale b_v. ``log_prior``: log p of each token; ``embed``: the
    embedding rows (V × d)."""

    exact: list[Array | None]
    means: list[Array]
    coef: list[Array]
    seen: Array
    scales: list[float]
    log_prior: Array
    embed: Array

    @classmethod
    def fit(
        cls, public: Sequence[Array], tokens: Array, embed: Array, exact: Sequence[Array | None]
    ) -> TemplateLikelihood:
        """Templates from clean public rows ``public[v]`` (one per token of ``tokens``): a token's
        ``exact[v]`` row where given, else its mean row, else (a token the public text lacks) the row
        the ridge regression on its embedding predicts. Prior: (count + ½) / (total + V/2). Scales start
        at 1; set them with :meth:`fit_scales`. Callers check the arguments (:meth:`JointInverter.fit`)."""
        vocab = len(embed)
        counts = np.bincount(tokens, minlength=vocab)
        seen = np.full(vocab, -1, dtype=np.int64)
        seen[counts > 0] = np.arange(int(np.sum(counts > 0)))
        feats = np.concatenate([embed[tokens], np.ones((len(tokens), 1))], axis=1)
        gram = feats.T @ feats
        reg = 1e-6 * float(np.trace(gram)) / len(gram) * np.eye(len(gram))
        means, coef = [], []
        for rows, ex in zip(public, exact, strict=True):
            if ex is not None:
                means.append(np.zeros((0, rows.shape[1])))
                coef.append(np.zeros((0, rows.shape[1])))
                continue
            sums = np.zeros((int(np.sum(counts > 0)), rows.shape[1]))
            np.add.at(sums, seen[tokens], rows)
            means.append(sums / counts[counts > 0][:, None])
            coef.append(np.linalg.solve(gram + reg, feats.T @ rows))
        prior = np.log((counts + 0.5) / (len(tokens) + 0.5 * vocab))
        return cls(list(exact), means, coef, seen, [1.0] * len(means), prior, embed)

    def templates(self, view: int, toks: Array) -> Array:
        """μ_view(t) for each token of ``toks`` (len × width)."""
        ex = self.exact[view]
        if ex is not None:
            return np.asarray(ex[toks])
        c, j = self.coef[view], self.seen[toks]
        out = np.empty((len(toks), c.shape[1]))
        out[j >= 0] = self.means[view][j[j >= 0]]
        out[j < 0] = self.embed[toks[j < 0]] @ c[:-1] + c[-1]
        return out

    def fit_scales(self, noisy: Sequence[Array], tokens: Array) -> None:
        """Each view's Laplace scale b_v = the mean |x − μ_v(t)| over the rows ``noisy[v]`` of ``tokens``
        the public text held (held-out public rows under the attacker's own noise; the maximum-likelihood
        scale), floored at 1e-9 of the templates' mean |entry| (an exact, un-noised view)."""
        known = self.seen[tokens] >= 0
        for v, rows in enumerate(noisy):
            use = known if self.exact[v] is None else np.ones(len(tokens), dtype=bool)
            if not use.any():
                continue
            mu = self.templates(v, tokens[use])
            floor = 1e-9 * float(np.abs(mu).mean()) + 1e-300
            self.scales[v] = max(float(np.abs(rows[use] - mu).mean()), floor)

    def predict(self, observed: Sequence[Array], shortlist: Array | None = None, chunk: int = 16) -> Array:
        """The token of highest Σ_v −‖x_v − μ_v(t)‖₁ / b_v + log p(t) for each aligned row (rows already
        checked): over every token, or over each row's ``shortlist`` (rows × K token ids)."""
        n = len(observed[0])
        out = np.zeros(n, dtype=np.int64)
        every = np.arange(len(self.log_prior))
        for s in range(0, n, chunk):
            rows = [x[s : s + chunk] for x in observed]
            cand = every if shortlist is None else np.unique(shortlist[s : s + chunk])
            score = np.tile(self.log_prior[cand], (len(rows[0]), 1))
            for v, x in enumerate(rows):
                score -= l1_distances(x, self.templates(v, cand)) / self.scales[v]
            if shortlist is not None:
                allowed = (cand[None, :, None] == shortlist[s : s + chunk][:, None, :]).any(axis=2)
                score[~allowed] = -np.inf
            out[s : s + chunk] = cand[np.argmax(score, axis=1)]
        return out


def _shortlist(emb: Array, table: Array, log_prior: Array) -> Array | None:
    """The template likelihood's candidates: every token (None) in a vocabulary of at most
    :data:`_SHORTLIST_VOCAB`, else each row's :data:`_SHORTLIST` tokens of highest cosine to the ridge mix's
    embedding and the :data:`_SHORTLIST` most probable tokens of the prior (the L1 scores and the templates
    of unseen tokens cost candidates × width per view and row: a full vocabulary of ~50k tokens times ~100
    views is out of reach)."""
    if len(table) <= _SHORTLIST_VOCAB:
        return None
    sims = emb @ table.T
    ridge = np.argpartition(-sims, _SHORTLIST, axis=1)[:, :_SHORTLIST]
    common = np.argpartition(-log_prior, _SHORTLIST)[:_SHORTLIST]
    return np.concatenate([ridge, np.broadcast_to(common, (len(emb), _SHORTLIST))], axis=1)


def _tokens(emb: Array, table: Array, chunk: int = 1024) -> Array:
    """The vocabulary row of highest cosine to each predicted embedding (rows × V in chunks of rows)."""
    out = [np.argmax(emb[s : s + chunk] @ table.T, axis=1) for s in range(0, len(emb), chunk)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass
class JointInverter:
    """Per-view ridge inverters and their held-out cosines (see the module doc). ``mix``: the weights the
    predictions are summed with — the cosines, or one view alone where that recovered more held-out
    tokens (None: the cosines). ``template``: the template likelihood, used instead of the ridge mix
    where it recovered at least as many held-out tokens (None: the ridge mix)."""

    views: list[tuple[Inverter, float]]
    mix: list[float] | None = None
    template: TemplateLikelihood | None = None

    @classmethod
    def fit(
        cls,
        public: Sequence[Array],
        betas: Sequence[float],
        tokens: Array,
        weights: ModelWeights,
        table: Array,
        seed: int = 0,
        holdout: float = 0.2,
        exact: Sequence[Array | None] | None = None,
    ) -> JointInverter:
        """Fit one ridge inverter per view on the public rows ``public[v]`` plus Laplace(``betas[v]``)
        noise (the attacker's own draw), on the first 1 − ``holdout`` of the tokens; weigh each by its mean
        cosine to the true unit embedding on the rest (clipped at 0: a useless view gets no weight).
        Guarantee: on those held-out rows the joint prediction recovers at least as many tokens as the best
        single view (it is that view alone when the cosine-weighted sum recovers fewer; ties: the sum). The
        template likelihood (:class:`TemplateLikelihood`: templates from the clean fitting rows and
        ``exact[v]``, a V × width table of each token's row where the view depends on the token alone —
        :func:`token_rows`; scales from the held-out rows) replaces that prediction where it recovers at least
        as many of the first :data:`_HELD_TEMPLATE` held-out tokens.

        Checked first (ConfigError): at least one view, one β (finite, ≥ 0) per view, ``holdout`` in (0, 1)
        leaving tokens on both sides, an integer ``seed`` ≥ 0; ShapeError unless every view has one row per
        token; ``exact`` a sequence of one None or V × width table per view."""
        try:
            public, betas = list(public), list(betas)
        except TypeError:
            raise ConfigError(
                f"public rows and betas must be sequences (one per view), got {type(public).__name__} "
                f"and {type(betas).__name__}"
            ) from None
        seed = int_arg(seed, "seed")
        if not len(public) or len(public) != len(betas):
            raise ConfigError(
                f"need one beta per view and at least one view, got {len(public)} and {len(betas)}"
            )
        betas = [float_arg(b, "beta", 0.0) for b in betas]
        tok = np.asarray(token_ids(tokens, weights.config.vocab_size), dtype=np.int64)
        public = [rows_arg(rows, "public rows") for rows in public]
        if any(len(rows) != len(tok) for rows in public):
            raise ShapeError(f"every view needs one row per token ({len(tok)}): {[len(r) for r in public]}")
        holdout = float_arg(holdout, "holdout")
        cut = int(len(tok) * (1 - holdout))
        if not 0 < holdout < 1 or not 0 < cut < len(tok):
            raise ConfigError(f"holdout {holdout} leaves no fitting or no held-out token of {len(tok)}")
        vocab = weights.config.vocab_size
        try:
            exact = [None] * len(public) if exact is None else list(exact)
        except TypeError:
            raise ConfigError(
                f"exact must be a sequence (one per view), got {type(exact).__name__}"
            ) from None
        if len(exact) != len(public):
            raise ConfigError(f"need one exact table (or None) per view, got {len(exact)} for {len(public)}")
        exact = [
            None if ex is None else rows_arg(ex, "exact rows", rows.shape[1])
            for ex, rows in zip(exact, public, strict=True)
        ]
        if any(ex is not None and len(ex) != vocab for ex in exact):
            raise ShapeError(f"an exact table must hold one row per token ({vocab})")
        tokens = tok
        rng = np.random.default_rng(seed)
        views: list[tuple[Inverter, float]] = []
        held: list[Array] = []  # each view's predicted embeddings of the held-out rows
        held_rows: list[Array] = []  # each view's noisy held-out rows
        for rows, beta in zip(public, betas, strict=True):
            noisy = rows + laplace_noise(rows.shape, beta, rng) if beta > 0 else rows
            inv = fit_inverter(noisy[:cut], tokens[:cut], weights, "ridge", lam=10.0, table=table)
            held_rows.append(noisy[cut:])
            held.append(inv.embed(noisy[cut:]))
            cos = float(np.mean(np.sum(held[-1] * inv.table[tokens[cut:]], axis=1)))
            views.append((inv, max(cos, 0.0)))
        unit = views[0][0].table
        truth = tokens[cut:]

        def hits(mix: list[float]) -> int:
            if not any(mix):  # no weight at all: every token ties, the prediction means nothing
                return -1
            emb = sum((m * e for m, e in zip(mix, held, strict=True)), np.zeros_like(held[0]))
            return int(np.sum(_tokens(emb, unit) == truth))

        cosines = [w for _, w in views]
        single = [[float(i == j) for j in range(len(views))] for i in range(len(views))]
        mix = max([cosines, *single], key=hits)  # the first best: the cosine mix unless a view beats it
        embed = np.asarray(weights.embed, dtype=np.float64)
        template = TemplateLikelihood.fit([r[:cut] for r in public], tokens[:cut], embed, exact)
        template.fit_scales(held_rows, truth)
        m = min(len(truth), _HELD_TEMPLATE)  # the L1 scores cost rows × candidates × width per view
        emb = sum((w * e[:m] for w, e in zip(mix, held, strict=True)), np.zeros_like(held[0][:m]))
        ridge_hits = int(np.sum(_tokens(emb, unit) == truth[:m])) if any(mix) else -1
        short = _shortlist(emb, unit, template.log_prior)
        template_hits = int(np.sum(template.predict([r[:m] for r in held_rows], short) == truth[:m]))
        return cls(views, mix, template if template_hits >= ridge_hits else None)

    def _checked(self, observed: Sequence[Array]) -> list[Array]:
        """``observed`` as one checked row block per fitted view, row-aligned (the checks of
        :meth:`embed`)."""
        try:
            observed = list(observed)
        except TypeError:
            raise ShapeError(
                f"observed rows must be a sequence of one row block per view, got {type(observed).__name__}"
            ) from None
        if len(observed) != len(self.views):
            raise ShapeError(f"{len(observed)} observed views for {len(self.views)} fitted ones")
        out = [
            rows_arg(rows, "observed rows", len(inv.mean))
            for rows, (inv, _) in zip(observed, self.views, strict=True)
        ]
        if len({len(rows) for rows in out}) > 1:
            raise ShapeError(f"the observed views are not row-aligned: {[len(r) for r in out]} rows")
        return out

    def embed(self, observed: Sequence[Array]) -> Array:
        """The ``mix``-weighted sum of the views' predicted unit embeddings (rows × d) of aligned observed
        rows (ShapeError unless ``observed`` is a sequence of one 2-D row block per fitted view, row-aligned;
        NonFiniteError for NaN or ±Inf)."""
        observed = self._checked(observed)
        mix = [w for _, w in self.views] if self.mix is None else self.mix
        out: Array | None = None
        for (inv, _), weight, rows in zip(self.views, mix, observed, strict=True):
            part = weight * inv.embed(rows)
            out = part if out is None else out + part
        assert out is not None
        return out

    def predict(self, observed: Sequence[Array]) -> Array:
        """The token of each aligned row: the template likelihood's where it was chosen, else the vocabulary
        row most similar to the combined embedding (the checks of :meth:`embed`)."""
        table = self.views[0][0].table
        if self.template is not None:
            short = _shortlist(self.embed(observed), table, self.template.log_prior)
            return self.template.predict(self._checked(observed), short)
        return np.asarray(np.argmax(self.embed(observed) @ table.T, axis=1))

    @property
    def heldout_weight(self) -> float:
        """The sum of the views' held-out cosines (how much the attacker expects to learn)."""
        return float(sum(w for _, w in self.views))

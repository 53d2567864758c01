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

For every view the attacker fits a ridge inverter on public rows in the message's own form (normalized or
raw, plus Laplace noise of the view's β, which the public configuration fixes), weighs it by its mean
cosine on held-out public rows, and sums the views' predicted unit embeddings: independent noise averages
out across views. A view with no noise (β = 0) is simply a very good view. The noisy views' predictions
share a bias (towards frequent tokens) that does not average out, so that sum can recover fewer tokens
than its best view alone: the attacker then uses that one view (chosen on the held-out public rows).
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

__all__ = ["Form", "JointInverter", "public_rows"]

Array = npt.NDArray[Any]
#: What a message row is, as a function of the plaintext forward at its block: ``x`` the block input,
#: ``xhat`` its attention RMSNorm, ``o`` the attention output, ``h`` the residual before the MLP, ``hn`` its
#: MLP RMSNorm, ``m`` the SwiGLU product silu(hn W_gate) ⊙ hn W_up (a dense block's down-projection input).
Form = Literal["x", "xhat", "o", "h", "hn", "m"]
_FORMS: tuple[str, ...] = ("x", "xhat", "o", "h", "hn", "m")


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


def _tokens(emb: Array, table: Array, chunk: int = 1024) -> Array:
    """The vocabulary row of highest cosine to each predicted embedding (rows × V in chunks of rows)."""
    out = [np.argmax(emb[s : s + chunk] @ table.T, axis=1) for s in range(0, len(emb), chunk)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass
class JointInverter:
    """Per-view ridge inverters and their held-out cosines (see the module doc). ``mix``: the weights the
    predictions are summed with — the cosines, or one view alone where that recovered more held-out
    tokens (None: the cosines)."""

    views: list[tuple[Inverter, float]]
    mix: list[float] | None = None

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
    ) -> JointInverter:
        """Fit one ridge inverter per view on the public rows ``public[v]`` plus Laplace(``betas[v]``)
        noise (the attacker's own draw), on the first 1 − ``holdout`` of the tokens; weigh each by its mean
        cosine to the true unit embedding on the rest (clipped at 0: a useless view gets no weight).
        Guarantee: on those held-out rows the joint prediction recovers at least as many tokens as the best
        single view (it is that view alone when the cosine-weighted sum recovers fewer; ties: the sum).

        Checked first (ConfigError): at least one view, one β (finite, ≥ 0) per view, ``holdout`` in (0, 1)
        leaving tokens on both sides, an integer ``seed`` ≥ 0; ShapeError unless every view has one row per
        token."""
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
        tokens = tok
        rng = np.random.default_rng(seed)
        views: list[tuple[Inverter, float]] = []
        held: list[Array] = []  # each view's predicted embeddings of the held-out rows
        for rows, beta in zip(public, betas, strict=True):
            noisy = rows + laplace_noise(rows.shape, beta, rng) if beta > 0 else rows
            inv = fit_inverter(noisy[:cut], tokens[:cut], weights, "ridge", lam=10.0, table=table)
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
        return cls(views, mix)

    def embed(self, observed: Sequence[Array]) -> Array:
        """The ``mix``-weighted sum of the views' predicted unit embeddings (rows × d) of aligned observed
        rows (ShapeError unless ``observed`` is a sequence of one 2-D row block per fitted view, row-aligned;
        NonFiniteError for NaN or ±Inf)."""
        try:
            observed = list(observed)
        except TypeError:
            raise ShapeError(
                f"observed rows must be a sequence of one row block per view, got {type(observed).__name__}"
            ) from None
        if len(observed) != len(self.views):
            raise ShapeError(f"{len(observed)} observed views for {len(self.views)} fitted ones")
        observed = [rows_arg(rows, "observed rows") for rows in observed]
        if len({len(rows) for rows in observed}) > 1:
            raise ShapeError(f"the observed views are not row-aligned: {[len(r) for r in observed]} rows")
        mix = [w for _, w in self.views] if self.mix is None else self.mix
        out: Array | None = None
        for (inv, _), weight, rows in zip(self.views, mix, observed, strict=True):
            part = weight * inv.embed(rows)
            out = part if out is None else out + part
        assert out is not None
        return out

    def predict(self, observed: Sequence[Array]) -> Array:
        """The token of each aligned row: the vocabulary row most similar to the combined embedding."""
        table = self.views[0][0].table
        return np.asarray(np.argmax(self.embed(observed) @ table.T, axis=1))

    @property
    def heldout_weight(self) -> float:
        """The sum of the views' held-out cosines (how much the attacker expects to learn)."""
        return float(sum(w for _, w in self.views))

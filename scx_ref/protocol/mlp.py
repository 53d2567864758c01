"""The MLP of one block as the server computes it for the client, with the intermediate values the client
needs to verify it (DESIGN §5.5), and the Mixtral routing shared by everyone who routes on the host.

:func:`route` is the routing of a Mixtral MoE layer — softmax of the router logits, the top-k experts with
ties to the lower expert id (a stable sort), weights renormalised over the k — computed on the host in
float64. The client's blinded MLP, the server's :func:`traced_mlp` and the client's check of its reply all
call it, so client and server route identically on the same logits.

:func:`traced_mlp` is the block's MLP on normalized rows built from the backend's linear maps: dense
SwiGLU ``W_down(silu(x W_gate) ⊙ x W_up)``, or the MoE (router, :func:`route`, each routed row through its
experts, weighted sum). Besides the output it returns the intermediates: ``gu`` = [x W_gate, x W_up] per
row (per row and routing slot for an MoE) and the MoE's ``router`` logits. With them every linear map of
the MLP is a Freivalds-checkable product and the only non-linear steps (SwiGLU, routing) are O(rows·f)
work the client redoes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..backends.base import A, Backend
from ..errors import NonFiniteError, ShapeError

__all__ = ["route", "traced_mlp"]


def route(logits: npt.NDArray[Any], top_k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Mixtral routing of router ``logits`` (rows × E): (the top-k expert ids per row, in descending
    probability with ties to the lower id; their softmax probabilities renormalised to sum to 1), float64.
    ShapeError unless ``logits`` is rows × E with E ≥ 1, ConfigError unless 1 ≤ ``top_k`` ≤ E (fewer or
    more columns would not be k experts), NonFiniteError for a logit that is not finite (no routing).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ShapeError(f"router logits must be rows × experts (at least one), got shape {z.shape}")
    top_k = check_int(top_k, "top_k", 1, z.shape[1])
    if not np.isfinite(z).all():
        raise NonFiniteError("router logits hold NaN or ±Inf")
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k].astype(np.int64)
    weights = np.take_along_axis(probs, top, axis=-1)
    weights /= weights.sum(axis=-1, keepdims=True)
    return top, weights


def traced_mlp(b: Backend[A], x: A, layer: int) -> tuple[A, dict[str, A]]:
    """The MLP of block ``layer`` on normalized rows ``x`` (rows × d) and its intermediates.

    Returns ``(y, parts)``: ``y`` (rows × d) is the block's MLP output (plaintext MLP semantics: the same
    as ``b.mlp(x, layer)`` up to the order of floating-point operations); dense ``parts = {"gu": rows × 2f}``;
    MoE ``parts = {"router": rows × E, "gu": rows × k × 2f}``, slot s of row i holding its s-th expert of
    :func:`route` on ``router``.
    """
    c = b.config
    if not c.is_moe:
        gu = b.project(x, "w_gate_up", layer)
        return b.project(b.swiglu_act(gu), "w_down", layer), {"gu": gu}
    rows, k, f, d = b.nrows(x), c.top_k, c.intermediate_size, c.hidden_size
    logits = b.project(x, "router", layer)
    top, weights = route(b.to_numpy(logits), k)
    where = np.empty((rows, k), dtype=np.int64)  # (row, slot) → its row among the experts' outputs
    gu_parts: list[A] = []
    y_parts: list[A] = []
    offset = 0
    for e in np.unique(top).tolist():
        hit_rows, slots = np.nonzero(top == e)
        one = np.array([e], dtype=np.int64)
        gu_e = b.project(b.take_rows(x, hit_rows.astype(np.int64)), "w_gate_up", layer, one)
        y_parts.append(b.project(b.swiglu_act(gu_e), "w_down", layer, one))
        gu_parts.append(gu_e)
        where[hit_rows, slots] = offset + np.arange(hit_rows.size)
        offset += hit_rows.size
    flat = where.reshape(-1)
    gu = b.reshape(b.take_rows(b.concat_rows(gu_parts), flat), (rows, k, 2 * f))
    ys = b.reshape(
        b.scale_rows(b.take_rows(b.concat_rows(y_parts), flat), weights.reshape(-1)), (rows, k * d)
    )
    y = b.narrow(ys, 1, 0, d)
    for s in range(1, k):
        y = b.add(y, b.narrow(ys, 1, s * d, (s + 1) * d))
    return y, {"router": logits, "gu": gu}

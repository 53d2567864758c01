"""The MLP of one block as the server computes it for the client, with the intermediate values the client
needs to verify it (DESIGN §5.5), and the Mixtral routing shared by everyone who routes on the host.

:func:`route` (:func:`scx_ref.ops.route`, re-exported) is the routing of a Mixtral MoE layer — softmax of
the router logits, the top-k experts with ties to the lower expert id (a stable sort), weights renormalised
over the k — computed on the host in float64. The client's blinded MLP, the server's :func:`traced_mlp`, the
client's check of its reply and the numpy reference's MoE (:func:`scx_ref.ops.moe`) all call it, so they
route identically on the same logits.

:func:`traced_mlp` is the block's MLP on normalized rows built from the backend's linear maps: dense
SwiGLU ``W_down(silu(x W_gate) ⊙ x W_up)``, or the MoE (router, :func:`route`, each routed row through its
experts, weighted sum). Besides the output it returns the intermediates: ``gu`` = [x W_gate, x W_up] per
row (per row and routing slot for an MoE) and the MoE's ``router`` logits. With them every linear map of
the MLP is a Freivalds-checkable product and the only non-linear steps (SwiGLU, routing) are O(rows·f)
work the client redoes.
"""

from __future__ import annotations

import numpy as np

from ..backends.base import A, Backend
from ..ops import route

__all__ = ["route", "traced_mlp"]


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

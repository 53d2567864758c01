"""Reading a :class:`ServerView`: the arrays of one stage, the session parameters, and the caches the
server itself holds (raw QKV caches, decoded middle caches after key sharing, locked caches)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import ops
from .._checks import check_int
from ..errors import ProtocolError, ShapeError
from ..protocol.transport import ServerView, ViewedMessage
from ..stages import Stage
from ..weights import ModelWeights
from ._model import int_arg

__all__ = ["message", "open_meta", "prompt_length", "raw_qkv", "shared_caches", "stage_array"]

Array = npt.NDArray[Any]


def _check_view(view: Any) -> ServerView:
    """``view`` after checking it is a :class:`ServerView` of one session (ProtocolError otherwise: a
    transport that carried several sessions records them all, and a message picked by stage, layer and step
    could then be another request's, its rows mixed with this one's)."""
    if not isinstance(view, ServerView):
        raise ProtocolError(f"view must be a ServerView, got {type(view).__name__}")
    sessions = {m.session for m in view.messages}
    if len(sessions) > 1:
        raise ProtocolError(
            f"the view holds {len(sessions)} sessions: read one at a time "
            "(ServerView([m for m in view.messages if m.session == s]))"
        )
    return view


def open_meta(view: ServerView) -> dict[str, Any]:
    """The ``open`` message's metadata (n, r1, r2, …): public to the server. ProtocolError for a view
    without one or of several sessions."""
    msgs = _check_view(view).select(stage=Stage.OPEN)
    if not msgs:
        raise ProtocolError("the view has no open message")
    return dict(msgs[0].meta)


def prompt_length(view: ServerView) -> int:
    """The prompt's n from the view's ``open`` message (:func:`open_meta`): ProtocolError for a view
    without one, or whose n is not an integer >= 1 (the server refuses an open of no rows)."""
    return check_int(open_meta(view).get("n"), "the open message's n", 1, error=ProtocolError)


def message(
    view: ServerView, stage: Stage, layer: int | None = None, step: int | None = None
) -> ViewedMessage:
    """The first received message of ``stage`` (and layer / step when given); ProtocolError if none (or
    ``stage`` is no :class:`Stage`, or the view holds several sessions); ConfigError for a ``layer`` or
    ``step`` that is not an integer (a bool is none)."""
    try:
        stage = Stage(stage)
    except ValueError:
        raise ProtocolError(f"unknown stage {stage!r}") from None
    # checked, not compared as given: True == 1 would pick block 1's message, 1.0 a float's
    layer = None if layer is None else int_arg(layer, "layer", None)
    step = None if step is None else int_arg(step, "step", None)
    msgs = _check_view(view).select(stage=stage, layer=layer, step=step)
    if not msgs:
        raise ProtocolError(f"the view has no {stage.value!r} message for layer {layer}, step {step}")
    return msgs[0]


def stage_array(
    view: ServerView, stage: Stage, layer: int | None = None, name: str = "x", step: int | None = None
) -> Array:
    """Array ``name`` of the first matching message, as float64 (ProtocolError when it has none)."""
    msg = message(view, stage, layer, step)
    if name not in msg.arrays:
        raise ProtocolError(
            f"the {msg.stage.value!r} message has no array {name!r} (it has {sorted(msg.arrays)})"
        )
    return np.asarray(msg.arrays[name], dtype=np.float64)


def raw_qkv(view: ServerView, weights: ModelWeights, layer: int) -> tuple[Array, Array, Array]:
    """(Z_q, Z_k, Z_v) the server computed at block ``layer``'s QKV stage (encoded row order, decoys,
    noise included): Z = norm(x)·W (+ b) unless the message says the rows were already normalized.
    ConfigError for a block the model lacks, ShapeError when the rows are not the model's width."""
    c = weights.config
    lw = weights.layers[int_arg(layer, "layer", 0, c.n_layers)]
    x = stage_array(view, Stage.QKV, layer)
    if x.ndim != 2 or x.shape[1] != c.hidden_size:
        raise ShapeError(
            f"block {layer}'s QKV rows have shape {x.shape}, not (rows, {c.hidden_size}): "
            "another model's view"
        )
    msg = message(view, Stage.QKV, layer)
    if not msg.meta.get("normalized", False):
        x = ops.rms_norm(x, lw.attn_norm, c.rms_eps)
    z = x @ lw.wqkv
    if lw.bqkv is not None:
        z = z + lw.bqkv
    return z[:, : c.q_dim], z[:, c.q_dim : c.q_dim + c.kv_dim], z[:, c.q_dim + c.kv_dim :]


def shared_caches(view: ServerView, weights: ModelWeights) -> dict[int, tuple[Array, Array]]:
    """The valid caches the server decodes after key sharing (DESIGN §5.2): for each shared block,
    K = RoPE(π_iᵀ Z_k[:n]) and V = π_iᵀ Z_v[:n] (rows × H_kv × d_h), with α_i W removed at level blind.
    ProtocolError for a view of several sessions, an open message without a row count ``n``
    (:func:`prompt_length`), a shared ``perm`` that is not a permutation of that block's QKV rows (fewer
    than ``n``), or an ``alpha`` not of their shape."""
    c = weights.config
    n = prompt_length(view)
    out: dict[int, tuple[Array, Array]] = {}
    for msg in view.select(stage=Stage.SHARE):
        layer = msg.layer
        _, zk, zv = raw_qkv(view, weights, layer)
        rows = len(zk)
        if "alpha" in msg.arrays:
            alpha = np.asarray(msg.arrays["alpha"], dtype=np.float64)
            if alpha.shape != (rows, c.hidden_size):
                raise ProtocolError(
                    f"block {layer}'s shared alpha has shape {alpha.shape}, not its QKV rows' "
                    f"({rows}, {c.hidden_size})"
                )
            corr = alpha @ weights.layers[layer].wqkv
            zk = zk - corr[:, c.q_dim : c.q_dim + c.kv_dim]
            zv = zv - corr[:, c.q_dim + c.kv_dim :]
        perm = np.asarray(msg.arrays.get("perm"))
        if perm.shape != (rows,) or not np.array_equal(np.sort(perm), np.arange(rows)):
            raise ProtocolError(f"block {layer}'s shared perm is not a permutation of its {rows} QKV rows")
        perm = perm.astype(np.int64)
        if n > rows:
            raise ProtocolError(f"block {layer} has {rows} QKV rows, fewer than the prompt's {n}")
        k, v = np.empty_like(zk), np.empty_like(zv)
        k[perm], v[perm] = zk, zv
        kk = ops.apply_rope(k[:n].reshape(n, c.n_kv_heads, c.head_dim), np.arange(n), c.rope_theta)
        out[layer] = (kk, v[:n].reshape(n, c.n_kv_heads, c.head_dim))
    return out

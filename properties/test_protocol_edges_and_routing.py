"""Properties at edges of properties/strategies.py's draws that no other property file pins down.

* The protocol end to end (numpy backend, float64) at a one-token prompt, no decoys and a single KV head
  (:func:`~properties.strategies.protocol_edge_cases`; :func:`~properties.strategies.protocol_cases` draws
  that combination in about one case in fifty), prefill and every decode step equal to plaintext
  (:class:`~scx_ref.reference.ReferenceModel`), including a run that fills ``max_length`` exactly — its
  last step at the model's last position — and a step past it refused with a ProtocolError before any
  message is sent.
* The protocol's MoE routing (:func:`scx_ref.protocol.mlp.route`, what the client and the server call) is
  the Mixtral rule — softmax, top-k with ties to the lower expert id, renormalised — and the server's
  :func:`~scx_ref.protocol.mlp.traced_mlp` equals the reference MoE (``ops.mlp``, what the plaintext model
  runs, which routes with ``route`` too), from one row up and at top_k = 1 and top_k = n_experts.

(Attention and T3 at head_dim 1 are checked by the existing properties of test_ops, test_transforms,
test_torch_parity and test_verifier_kernels: ``attention_shapes`` now draws it.)

Each property runs a quarter of the loaded profile's examples (10 by default, 100 under ``thorough``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from properties.strategies import (
    ProtocolCase,
    model_configs,
    model_weights,
    protocol_edge_cases,
    row_counts,
    seeds,
)
from properties.test_protocol import assert_exact
from scx_ref import ops
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ProtocolError
from scx_ref.protocol import Client, LocalTransport, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.mlp import route, traced_mlp
from scx_ref.reference import ReferenceModel
from scx_ref.weights import MoEMLP

FEW = settings(max_examples=max(1, settings().max_examples // 4))  # settings(): the loaded profile


class _Counting(LocalTransport):
    """A local link that counts the messages sent through it."""

    sent = 0

    def send(self, request: Request) -> Reply:
        self.sent += 1
        return super().send(request)


def _session(case: ProtocolCase) -> tuple[Client[Any], _Counting]:
    backend = NumpyBackend(case.weights)
    return Client(backend, case.keys(), case.scx), _Counting(Server(backend))


@FEW
@given(protocol_edge_cases())
def test_one_token_no_decoys_one_kv_head_equals_plaintext_to_the_last_position(case: ProtocolCase) -> None:
    """n = 1, r1 = r2 = r_lock = 0, H_kv = 1 (GQA 1 to 4): the prefill logits and every decode step's equal
    plaintext; where the run fills ``max_length``, one more step is refused by the client's own gate
    (ProtocolError) before any message is sent, and again on a retry (the session is unchanged)."""
    assert len(case.ids) == 1 and case.scx.r1 == case.scx.r2 == case.scx.lock_decoys == 0
    assert case.model.n_kv_heads == 1
    ref = ReferenceModel(case.weights)
    client, link = _session(case)
    want, cache = ref.prefill(case.ids)
    assert_exact(client.prefill(case.ids, link), want, "prefill logits")
    client.share_keys(link)
    token = int(np.argmax(want[-1]))
    for step in range(case.n_new):
        want_t = ref.decode(token, cache)
        assert_exact(client.decode(token, link), want_t, f"logits at generation step {step}")
        token = int(np.argmax(want_t))
    if 1 + case.n_new == case.scx.max_length:
        sent = link.sent
        for _ in range(2):  # refused before anything is sent, and the session is left as it was
            with pytest.raises(ProtocolError, match="past the configured maximum length"):
                client.decode(token, link)
            assert link.sent == sent


@FEW
@given(protocol_edge_cases())
def test_one_token_greedy_generation_fills_the_context_like_plaintext(case: ProtocolCase) -> None:
    """Greedy generation from one token, no decoys, one KV head: the tokens of plaintext generation, up
    to the longest run ``max_length`` allows (1 + n_new − 1 positions fed)."""
    client, link = _session(case)
    n_new = case.scx.max_length if 1 + case.n_new == case.scx.max_length else case.n_new
    assert client.generate(case.ids, n_new, link) == ReferenceModel(case.weights).generate(case.ids, n_new)


def _mixtral_route(logits: np.ndarray, k: int) -> tuple[list[list[int]], np.ndarray]:
    """The rule, per row, by sorting: experts in descending probability, ties to the lower id."""
    tops, weights = [], []
    for row in np.asarray(logits, dtype=np.float64):
        p = np.exp(row - row.max())
        p /= p.sum()
        top = sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]
        tops.append(top)
        weights.append(p[top] / p[top].sum())
    return tops, np.array(weights)


@FEW
@given(
    logits=st.integers(1, 5).flatmap(
        lambda e: st.lists(st.lists(st.integers(-2, 2), min_size=e, max_size=e), min_size=1, max_size=6)
    ),
    data=st.data(),
)
def test_protocol_routing_is_the_mixtral_rule_with_ties_to_the_lower_expert(
    logits: list[list[int]], data: st.DataObject
) -> None:
    """``route`` on integer logits (ties everywhere, one row and one expert included), every top_k from 1
    to E: the experts of the sorting rule, in its order, and its renormalised weights."""
    z = np.array(logits, dtype=np.float64)
    k = data.draw(st.integers(1, z.shape[1]))
    top, weights = route(z, k)
    want_top, want_weights = _mixtral_route(z, k)
    assert top.tolist() == want_top
    np.testing.assert_allclose(weights, want_weights, rtol=1e-15, atol=0)


@FEW
@given(
    w=model_weights(model_configs(max_layers=1, moe=True)),
    n=row_counts(1, 6),
    seed=seeds(),
    extreme=st.sampled_from(["drawn", "top1", "all"]),
)
def test_the_protocols_traced_moe_is_the_reference_moe(w: Any, n: int, seed: int, extreme: str) -> None:
    """The server's MoE (:func:`traced_mlp`: ``route`` and one projection per expert) equals the reference
    ``ops.mlp`` row for row (to float64 rounding), from one row, at top_k 1, n_experts or as drawn; its
    router logits are x·W_r and its gate/up parts are each row's routed experts' x·[W_gate W_up]."""
    c = w.config
    k = {"drawn": c.top_k, "top1": 1, "all": c.n_experts}[extreme]
    w = replace(w, config=replace(c, top_k=k))
    x = np.random.default_rng(seed).standard_normal((n, c.hidden_size))
    mlp = w.layers[0].mlp
    assert isinstance(mlp, MoEMLP)
    y, parts = traced_mlp(NumpyBackend(w), x, 0)
    want = ops.mlp(x, mlp, k)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12 * float(np.abs(want).max()))
    np.testing.assert_allclose(parts["router"], x @ mlp.router, rtol=1e-12, atol=1e-12)
    top, _ = route(parts["router"], k)
    for i in range(n):
        for s, e in enumerate(top[i]):
            ex = mlp.experts[int(e)]
            gu = np.concatenate([x[i] @ ex.w_gate, x[i] @ ex.w_up])
            np.testing.assert_allclose(parts["gu"][i, s], gu, rtol=1e-12, atol=1e-12)

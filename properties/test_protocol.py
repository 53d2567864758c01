"""Exactness of the SCX protocol engine (DESIGN §5, §6): over random tiny models and random protocol
configurations, the client's decoded logits equal plaintext inference (:class:`ReferenceModel`) in
float64 at prefill and at every generation step, and greedy SCX generation emits the same tokens.

"Equal" is DESIGN §6's float64 criterion: |SCX − plain| ≤ 1e-10·|plain| + 1e-10·max|plain| elementwise
(rtol 1e-10; the absolute term, scaled to the logits' magnitude, only admits reordered reductions on
logits near zero). ``hypothesis.target`` steers the search towards the largest relative error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, target

from properties.strategies import ProtocolCase, protocol_cases
from scx_ref.backends import NumpyBackend
from scx_ref.protocol import Client, LocalTransport, Server
from scx_ref.reference import ReferenceModel
from scx_ref.weights import ModelWeights

RTOL = 1e-10


def rel_err(got: npt.NDArray[Any], want: npt.NDArray[Any]) -> float:
    """max |got − want| / max |want| (the figure reported; 0 when both vanish)."""
    scale = float(np.abs(want).max())
    return float(np.abs(got - want).max()) / scale if scale else float(np.abs(got).max())


def assert_exact(got: npt.NDArray[Any], want: npt.NDArray[Any], what: str) -> float:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()), err_msg=what)
    return rel_err(got, want)


def _session(case: ProtocolCase, weights: ModelWeights) -> tuple[Client[Any], LocalTransport]:
    backend = NumpyBackend(weights)
    link = LocalTransport(Server(backend))
    return Client(backend, case.keys(), case.scx), link


@given(protocol_cases())
def test_prefill_and_every_decode_step_equal_plaintext(case: ProtocolCase) -> None:
    weights, ids, n_new = case.weights, case.ids, case.n_new
    ref = ReferenceModel(weights)
    client, link = _session(case, weights)
    want, cache = ref.prefill(ids)
    got = client.prefill(ids, link)
    worst = assert_exact(got, want, "prefill logits")
    client.share_keys(link)
    token = int(np.argmax(want[-1]))
    assert int(np.argmax(got[-1])) == token
    for step in range(n_new):
        want_t = ref.decode(token, cache)
        got_t = client.decode(token, link)
        worst = max(worst, assert_exact(got_t, want_t, f"logits at generation step {step}"))
        assert int(np.argmax(got_t)) == int(np.argmax(want_t)), f"greedy token differs at step {step}"
        token = int(np.argmax(want_t))
    target(worst, label="max relative logit error")


@given(protocol_cases())
def test_greedy_generation_equals_plaintext(case: ProtocolCase) -> None:
    weights = case.weights
    client, link = _session(case, weights)
    assert client.generate(case.ids, case.n_new, link) == ReferenceModel(weights).generate(
        case.ids, case.n_new
    )

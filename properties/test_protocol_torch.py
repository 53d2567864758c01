"""Exactness of the SCX protocol engine on the torch backend (DESIGN §5, §6): the end-to-end property of
:mod:`properties.test_protocol` (prefill, key sharing, generation through ``Client`` / ``Server`` /
``LocalTransport``, every reply verified) run on :class:`TorchBackend` on CPU, so the way the torch
backend's pieces are *combined* in the protocol (the fused CPU passes ``rope_take``,
``take_rows_cols_concat``, ``gather_sum``, the fused norms, the reply-check kernels, the cache append) is
checked against plaintext, not only each operation against numpy.

Plaintext is :class:`ReferenceModel` (float64 numpy) on the same weights.

Tolerances
----------
* float64: DESIGN §6's criterion, as in :mod:`properties.test_protocol`: |SCX − plain| ≤ 1e-10·|plain| +
  1e-10·max|plain| elementwise; greedy tokens identical.
* float32: the whole-protocol float32 bound of ``tests/test_torch_backend.py`` (float32 rounding only: a
  few u = 2⁻²⁴ per stage, times (1 + β) on blinded stages, over L blocks, relative to the logits' scale):
  max|SCX − plain| ≤ 64·L·u·(1 + β)·(1 + max|plain|), with β = 0 at level ``permute``. A greedy token may
  differ from plaintext's only where plaintext's top two logits are within twice that bound of each other
  (a near-tie float32 cannot resolve); elsewhere it is identical.

Cost: a fraction of the active profile's ``max_examples`` (a quarter, at least 4) over prompts of at most
16 tokens and at most 4 generated — about a second or two under ``HYPOTHESIS_PROFILE=ci``.

The mutation tests at the end break one fused torch path in the test run (monkeypatch) and check that
this property finds a counterexample, on which the numpy protocol property still passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import Phase, find, given, settings, target
from hypothesis import strategies as st

from properties import test_protocol
from properties.strategies import ProtocolCase, protocol_cases, protocol_edge_cases, torch_dtypes
from scx_ref.backends.torch_backend import TorchBackend, TorchOps
from scx_ref.errors import SCXError
from scx_ref.protocol import Client, LocalTransport, Server
from scx_ref.reference import ReferenceModel

U32 = 2.0**-24
#: a quarter of the active profile's examples (ci: 10), at least 4: each example is a whole protocol run
EXAMPLES = max(4, settings().max_examples // 4)
MAX_PROMPT, MAX_NEW = 16, 4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread while this module runs (restored after): on a shared, loaded machine
    two threads spinning over these tiny matrices made a case 30× slower. The fused passes split across
    threads only from :data:`~scx_ref.backends.cpu_kernels.MIN_PARALLEL` entries, which no case reaches,
    so no path is left out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cases() -> st.SearchStrategy[tuple[ProtocolCase, torch.dtype]]:
    """A protocol case (tiny prompt) and the torch backend's dtype: float64 or float32."""
    return st.tuples(
        protocol_cases(max_prompt=MAX_PROMPT, max_new=MAX_NEW), torch_dtypes(("float64", "float32"))
    )


def float32_bound(case: ProtocolCase, scale: float) -> float:
    """The float32 whole-protocol bound (module doc) for logits of magnitude ``scale``."""
    beta = 0.0 if case.scx.level == "permute" else case.scx.beta
    return 64 * case.model.n_layers * U32 * (1 + beta) * (1 + scale)


def check_logits(
    got: npt.NDArray[Any], want: npt.NDArray[Any], case: ProtocolCase, dtype: torch.dtype, what: str
) -> float:
    """Logits within the dtype's tolerance, and each row's greedy token plaintext's (module doc);
    returns the relative error."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    got = got.astype(np.float64)
    scale = float(np.abs(want).max())
    if dtype == torch.float64:
        test_protocol.assert_exact(got, want, what)
        margin = 0.0
    else:
        bound = float32_bound(case, scale)
        err = float(np.abs(got - want).max())
        assert err <= bound, f"{what}: float32 max|Δ| = {err:.3e} > bound {bound:.3e}"
        margin = 2 * bound
    for row, (g, w) in enumerate(
        zip(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]), strict=True)
    ):
        token = int(np.argmax(g))
        # float64: plaintext's own argmax; float32: a token within the near-tie margin of plaintext's best
        ok = token == int(np.argmax(w)) if margin == 0.0 else bool(w[token] >= w.max() - margin)
        assert ok, f"{what}: greedy token {token} of row {row} differs from plaintext's {int(np.argmax(w))}"
    return test_protocol.rel_err(got, want)


def check_case(case: ProtocolCase, dtype: torch.dtype) -> float:
    """Prefill, key sharing and n_new generation steps on TorchBackend(dtype) (replies verified) equal
    ReferenceModel on the same weights; returns the worst relative logit error."""
    assert case.scx.verify, "the property runs with reply verification on"
    weights = case.weights
    backend = TorchBackend(weights, dtype)
    client = Client(backend, case.keys(), case.scx)
    link = LocalTransport(Server(backend))
    ref = ReferenceModel(weights)
    want, cache = ref.prefill(case.ids)
    got = client.prefill(case.ids, link)
    worst = check_logits(got, want, case, dtype, "prefill logits")
    client.share_keys(link)
    token = int(np.argmax(want[-1]))  # plaintext's token drives both (a float32 near-tie must not fork them)
    for step in range(case.n_new):
        want_t = ref.decode(token, cache)
        got_t = client.decode(token, link)
        worst = max(worst, check_logits(got_t, want_t, case, dtype, f"logits at generation step {step}"))
        token = int(np.argmax(want_t))
    return worst


@settings(max_examples=EXAMPLES)
@given(cases())
def test_torch_prefill_and_every_decode_step_equal_plaintext(
    case_dtype: tuple[ProtocolCase, torch.dtype],
) -> None:
    case, dtype = case_dtype
    target(check_case(case, dtype), label=f"max relative logit error ({dtype})")


@settings(max_examples=EXAMPLES)
@given(protocol_edge_cases(max_new=MAX_NEW), torch_dtypes(("float64", "float32")))
def test_torch_one_token_no_decoys_one_kv_head_equals_plaintext(
    case: ProtocolCase, dtype: torch.dtype
) -> None:
    """The torch property at the edges :func:`protocol_cases` reaches together about once in fifty: a
    one-token prompt, no decoys anywhere and a single KV head (GQA 1 to 4), in half the cases filling the
    context to ``max_length``."""
    target(check_case(case, dtype), label=f"max relative logit error at the edges ({dtype})")


@settings(max_examples=EXAMPLES)
@given(protocol_cases(max_prompt=MAX_PROMPT, max_new=MAX_NEW))
def test_torch_float64_greedy_generation_equals_plaintext(case: ProtocolCase) -> None:
    """``Client.generate`` (its own greedy loop, the cache append included) on torch float64 emits
    plaintext's tokens."""
    weights = case.weights
    backend = TorchBackend(weights, torch.float64)
    client = Client(backend, case.keys(), case.scx)
    got = client.generate(case.ids, case.n_new, LocalTransport(Server(backend)))
    assert got == ReferenceModel(weights).generate(case.ids, case.n_new)


# -- mutation tests: a broken fused torch path is caught here and not by the numpy property ------------

MUTANT_SEARCH = settings(
    max_examples=30, database=None, derandomize=True, deadline=None, phases=[Phase.generate]
)


def _counterexample() -> tuple[ProtocolCase, torch.dtype]:
    """The first case (derandomized search, no shrinking) on which the torch property fails."""

    def fails(case_dtype: tuple[ProtocolCase, torch.dtype]) -> bool:
        try:
            check_case(*case_dtype)
        except (AssertionError, SCXError):  # a wrong logit, or a check of the client's that refused
            return True
        return False

    return find(cases(), fails, settings=MUTANT_SEARCH)


def _numpy_property_passes(case: ProtocolCase) -> None:
    """The numpy protocol property's own test body run on ``case`` alone (raises if it fails)."""
    prop: Any = test_protocol.test_prefill_and_every_decode_step_equal_plaintext
    inner = prop.hypothesis.inner_test

    @settings(max_examples=1, database=None, phases=[Phase.explicit, Phase.generate])
    @given(st.just(case))
    def on_case(c: ProtocolCase) -> None:
        inner(c)

    on_case()


def test_unmutated_torch_property_passes_the_mutant_search() -> None:
    """Control for the mutation tests below: with nothing broken, the same search finds no failing case."""
    from hypothesis.errors import NoSuchExample

    with pytest.raises(NoSuchExample):
        _counterexample()


def test_rope_take_position_off_by_one_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TorchBackend.rope_take`` rotating every row after the first at its position + 1 (a relative-position
    error: a shift of every position alike would cancel in attention): the torch property fails, the
    numpy property passes on that very case."""
    original = TorchBackend.rope_take

    def off_by_one(self: TorchBackend, x: Any, rows: Any, positions: Any, *args: Any, **kw: Any) -> Any:
        pos = np.array(positions, dtype=np.int64, copy=True)
        pos[1:] += 1
        return original(self, x, rows, pos, *args, **kw)

    monkeypatch.setattr(TorchBackend, "rope_take", off_by_one)
    case, _dtype = _counterexample()
    _numpy_property_passes(case)


def test_gather_sum_wrong_residual_row_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TorchOps.gather_sum`` (the residual add re-encoded under a fresh permutation) adding the first real
    row's y to every real row: the torch property fails, the numpy property passes on that very case."""
    original = TorchOps.gather_sum

    def wrong_row(self: TorchOps, s: Any, from_s: Any, y: Any, from_y: Any, *args: Any, **kw: Any) -> Any:
        fy = np.array(from_y, dtype=np.int64, copy=True)
        real = fy >= 0
        if real.any():
            fy[real] = fy[real][0]
        return original(self, s, from_s, y, fy, *args, **kw)

    monkeypatch.setattr(TorchOps, "gather_sum", wrong_row)
    case, _dtype = _counterexample()
    _numpy_property_passes(case)

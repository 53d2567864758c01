"""The property suites have teeth: mutation tests and strategy coverage.

A property that passes on a broken implementation of what it claims to check is a defect. Each mutation
test below breaks one library function subtly (in memory, with ``monkeypatch``; no file is touched), runs
the property that claims to check it on exactly the ci profile's examples (derandomized, 40 by default),
and requires it to fail — and to pass on the library as it is. The coverage tests show the shared
strategies reach the edges tests/test_proofs_cli_strategies.py does not name: identity and non-identity
permutations, two or more decoys, every torch dtype (bfloat16 and float16 included), GQA ratio 3 (SmolLM2's)
and a protocol case with grouped queries, MoE and decoys everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import Phase, find, settings

from properties import strategies as S
from properties import test_ops, test_transforms
from scx_ref import ops, transforms


@contextmanager
def _ci_examples(test: Any) -> Iterator[None]:
    """Run a Hypothesis test on the ci profile's examples (derandomized, the loaded profile's count)
    without its database or shrinking (a mutant's failing example is neither saved nor replayed); its own
    settings (Hypothesis keeps them on the test as ``_hypothesis_internal_use_settings``) are put back
    after."""
    saved = test._hypothesis_internal_use_settings
    test._hypothesis_internal_use_settings = settings(
        saved,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,  # the first failure, raised as itself (not an exception group)
    )
    try:
        yield
    finally:
        test._hypothesis_internal_use_settings = saved


def _fails(test: Callable[[], None]) -> bool:
    """Whether the Hypothesis property ``test`` finds a failing example (an AssertionError)."""
    with _ci_examples(test):
        try:
            test()
        except AssertionError:
            return True
    return False


# --- mutation tests -----------------------------------------------------------------------------------


def _unlock_with_pi_for_pi_inverse(scores: Any, rho: Any, n: int, o: Any = transforms.NUMPY) -> Any:
    """unlock_scores reading column ρ[i] for true row i instead of ρ⁻¹[i] (π confused with π⁻¹)."""
    return transforms.unlock_scores(scores, transforms.inverse_permutation(np.asarray(rho)), n, o)


def test_unlock_scores_property_catches_pi_confused_with_its_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the T4 unlock property, ``unlock_scores`` (what the client calls on every generation step's
    locked scores) was checked only torch against numpy — the same index code on both — and this mutant
    failed one end-to-end property (greedy generation) by the way, and passed all others, the
    prefill-and-every-decode-step exactness property included."""
    test = test_transforms.test_t4_unlock_scores_returns_the_true_order_scores
    assert not _fails(test)
    monkeypatch.setattr(test_transforms, "unlock_scores", _unlock_with_pi_for_pi_inverse)
    assert _fails(test)


def _rope_tables(
    scale_exponent: float, sin_sign: float
) -> Callable[..., tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
    """RoPE tables with inv_freq_i = θ^(−2i/(d_h + scale_exponent)) and sin multiplied by ``sin_sign``."""

    def tables(
        positions: Any, head_dim: int, theta: float, dtype: Any = np.float64
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / (head_dim + scale_exponent)))
        freqs = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
        angles = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(angles).astype(dtype), (sin_sign * np.sin(angles)).astype(dtype)

    return tables


@pytest.mark.parametrize(
    ("what", "scale_exponent", "sin_sign"),
    [("wrong frequencies", 2.0, 1.0), ("reversed rotation", 0.0, -1.0)],
)
def test_rope_property_catches_a_wrong_rotation(
    monkeypatch: pytest.MonkeyPatch, what: str, scale_exponent: float, sin_sign: float
) -> None:
    """RoPE's tables are shared by the numpy reference and the torch backend, so parity cannot see a wrong
    one, and the plaintext model uses them too, so the protocol's exactness cannot either. Norm
    preservation, identity at position 0 and relative scores all hold for a wrong frequency or a reversed
    rotation: only the explicit rotation in the property catches them."""
    test = test_ops.test_rope_is_a_relative_rotation
    assert not _fails(test)
    monkeypatch.setattr(ops, "rope_cos_sin", _rope_tables(scale_exponent, sin_sign))
    assert _fails(test), what


# --- strategy coverage --------------------------------------------------------------------------------
# (n = 1, r = 0, one head, GQA 2 and 4, float32 / float64 and their combinations in a protocol case are
# checked in tests/test_proofs_cli_strategies.py; these are the edges it does not name)


def _reaches(strategy: Any, condition: Callable[[Any], bool]) -> bool:
    find(strategy, condition, settings=S.REACH)  # raises NoSuchExample when it cannot
    return True


def _equal_to(want: Any) -> Callable[[Any], bool]:
    return lambda got: bool(got == want)


def test_permutation_strategies_reach_identity_and_non_identity() -> None:
    """Token permutations and head permutations, each both the identity (where a π / π⁻¹ confusion is
    invisible) and not; and two or more decoys (where their order shows)."""
    assert _reaches(S.sized_perms(2), lambda t: np.array_equal(t[1], np.arange(t[0])))
    assert _reaches(S.sized_perms(2), lambda t: not np.array_equal(t[1], np.arange(t[0])))
    assert _reaches(S.head_permutations(2, 4), _equal_to(transforms.HeadPermutation.identity(2, 4)))
    assert _reaches(S.head_permutations(2, 4), lambda p: not np.array_equal(p.group_order, np.arange(2)))
    assert _reaches(S.decoy_counts(), lambda r: r >= 2)


def test_shape_strategies_reach_smollm2s_gqa_ratio_3() -> None:
    """GQA ratio 3 (SmolLM2: 9 query heads on 3 KV heads), the one ratio of a served model that is not a
    power of two, in every strategy that draws attention shapes or models; with 3 KV heads where the
    strategy allows them (SmolLM2's own pair)."""
    assert _reaches(S.attention_shapes(), lambda s: s[0] == 3 and s[1] == 3)
    assert _reaches(S.model_configs(), lambda c: c.n_heads == 3 * c.n_kv_heads)
    assert _reaches(S.protocol_model_configs(), lambda c: c.n_heads == 3 * c.n_kv_heads)
    assert _reaches(S.protocol_cases(), lambda c: c.model.n_heads == 3 * c.model.n_kv_heads)
    assert _reaches(S.protocol_edge_cases(), lambda c: c.model.n_heads == 3)


def test_torch_dtypes_reach_every_dtype_of_the_torch_backend() -> None:
    torch = pytest.importorskip("torch")
    for tdt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert _reaches(S.torch_dtypes(), _equal_to(tdt))


def test_protocol_cases_reach_the_largest_run() -> None:
    """The other end of the protocol property's space: grouped queries, MoE and decoys in every stage."""
    assert _reaches(
        S.protocol_cases(),
        lambda c: (
            c.model.n_heads > c.model.n_kv_heads
            and c.model.n_experts > 0
            and min(c.scx.r1, c.scx.r2) > 0
            and c.scx.r_lock != 0
        ),
    )

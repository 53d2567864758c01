"""``Client.generate`` and the sampler as a user drives them, at their edges: the lengths at and one past
``max_length`` and the model's ``max_positions`` (refused before anything is sent), a one-token prompt,
0 and 1 new tokens, a client reused after a refusal — its reserved nonce claimed by another client of the
same key schedule — and logits rows of any layout, byte order or float width, or past float32's range."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import DTypeError, NonFiniteError, ProtocolError, SessionError, ShapeError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from tests.tiny import tiny_weights

W = tiny_weights(3)  # max_positions 32


def _client(keys: KeySchedule | None = None, **cfg: Any) -> Client[Any]:
    return Client(
        NumpyBackend(W), keys or KeySchedule.generate(), SCXConfig(level="paper", r1=2, r2=2, **cfg)
    )


def _link() -> LocalTransport:
    return LocalTransport(Server(NumpyBackend(W)), record_view=True)


@pytest.mark.parametrize("max_length", [None, 9])  # the model's 32 positions, or fewer configured
def test_generate_fills_max_length_exactly_and_refuses_one_past_it_sending_nothing(max_length: Any) -> None:
    """n prompt tokens and n_new new ones take n + n_new − 1 positions (the last token is never fed): at
    max_length they are plaintext greedy decoding; one past, a ProtocolError before any message; a prompt
    of one token, 0 and 1 new tokens at the edges; one client serves every request in turn."""
    client, link, ref = _client(max_length=max_length), _link(), ReferenceModel(W)
    limit = client.max_length
    assert limit == (32 if max_length is None else 9)
    for n, n_new in [(1, 1), (1, 3), (limit, 1), (limit - 4, 5), (1, limit)]:
        prompt = np.arange(n) % W.config.vocab_size
        assert client.generate(prompt, n_new, link) == ref.generate(prompt, n_new), (n, n_new)
    sent = len(link.view.messages)
    for n, n_new in [(limit, 2), (limit - 4, 6), (1, limit + 1), (limit + 1, 0), (limit + 1, 1)]:
        with pytest.raises(ProtocolError, match="max_length"):
            client.generate(np.arange(n) % W.config.vocab_size, n_new, link)
    assert client.generate(np.arange(3), 0, link) == []
    assert len(link.view.messages) == sent  # the refusals and n_new = 0 sent nothing
    assert client.generate([4, 2], 2, link) == ref.generate(np.array([4, 2]), 2)  # and the client goes on


def test_a_client_whose_reserved_nonce_another_client_claimed_recovers() -> None:
    """Two clients built on one KeySchedule both reserve its nonce for their first request; the second to
    open finds it claimed (SessionError) — and kept, the dead reservation refused every later prefill,
    generate and precompute that names no nonce (generate names none): the client was unusable. The
    reservation is dropped with the refusal, so the next call draws a fresh nonce."""
    keys = KeySchedule.generate()
    first, late, later = _client(keys), _client(keys), _client(keys)
    link, ref, prompt = _link(), ReferenceModel(W), np.array([5, 1, 7])
    want = ref.generate(prompt, 3)
    assert first.generate(prompt, 3, link) == want
    with pytest.raises(SessionError, match="nonce reused") as info:
        late.generate(prompt, 3, link)
    assert info.value.tokens == []
    assert late.generate(prompt, 3, link) == want  # a fresh nonce: it used to be "nonce reused" again
    assert late.session != keys.nonce.hex()
    with pytest.raises(SessionError, match="already drove a session"):
        later.precompute(3, steps=2)
    prep = later.precompute(3, steps=2)  # a fresh nonce, reserved and used by the next request
    assert prep.nonce != keys.nonce
    assert later.generate(prompt, 3, link) == want and later.session == prep.nonce.hex()
    # a nonce named by the caller is not dropped: a reservation stays as it was
    reserved = later.precompute(3)
    with pytest.raises(SessionError):
        later.prefill(prompt, link, nonce=keys.nonce)
    with pytest.raises(SessionError):
        later.precompute(3, nonce=keys.nonce)
    assert later._next_nonce == reserved.nonce and later._prepared is reserved


V = 7
ROW = np.array([0.3, -1.2, 2.5, 0.9, 2.4, -0.1, 1.0])  # argmax 2


def _tokens(row: Any, n: int = 3, **settings: Any) -> list[int]:
    torch = pytest.importorskip("torch")
    from scx_ref.sampling import GenerationSettings, generate_tokens

    s = GenerationSettings(max_new_tokens=n, **settings)
    g = torch.Generator().manual_seed(7) if s.do_sample else None
    return generate_tokens(
        np.array([1]), s, lambda ids: np.stack([ROW] * len(ids)), lambda t: row, generator=g
    )


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_logits_row_of_any_layout_byte_order_or_float_width_is_taken_as_float32(do_sample: bool) -> None:
    """The row is copied to float32 (HF's step): a reversed view, a big-endian array or numpy's long double
    gave torch.from_numpy's raw ValueError or TypeError after the prefill; now each gives the tokens of
    the same values as a native float64 row."""
    want = _tokens(ROW, do_sample=do_sample)
    for row in (
        ROW[::-1].copy()[::-1],  # a negative stride, holding ROW
        ROW.astype(">f8"),
        ROW.astype(np.longdouble),
        ROW.astype(np.float16).astype(">f2"),  # half precision, big-endian (exact in float32)
        np.repeat(ROW, 2)[::2],  # non-contiguous with a positive stride (held before)
    ):
        expected = want if row.dtype.itemsize != 2 else _tokens(ROW.astype(np.float16), do_sample=do_sample)
        assert _tokens(row, do_sample=do_sample) == expected, row.dtype


def test_logits_that_are_not_real_floating_point_numbers_are_a_dtype_error() -> None:
    """Integer logits were a NonFiniteError saying they "are not all finite"; a bfloat16 tensor or a
    ragged list escaped as numpy's or torch's raw TypeError/ValueError. Each is a DTypeError carrying the
    tokens made."""
    torch = pytest.importorskip("torch")
    for row in (np.arange(V), torch.ones(V, dtype=torch.bfloat16), [1.0, [2.0]]):
        with pytest.raises(DTypeError, match="after 1 new token") as info:
            _tokens(row)
        assert info.value.tokens == [2]


def test_prompt_logits_without_a_last_row_are_a_shape_error() -> None:
    """A prefill returning a 0-d array, a number or None escaped from ``[-1]`` as a raw IndexError or
    TypeError; it is a ShapeError (no token made)."""
    pytest.importorskip("torch")
    from scx_ref.sampling import GenerationSettings, generate_tokens

    settings = GenerationSettings(max_new_tokens=2)
    for bad in (np.float64(1.0), np.array(2.0), None, 3.0):

        def prefill(ids: Any, out: Any = bad) -> Any:
            return out

        with pytest.raises(ShapeError, match="prompt's logits must be n × V") as info:
            generate_tokens(np.array([1]), settings, prefill, lambda t: ROW)
        assert info.value.tokens == []


def test_greedy_refuses_finite_logits_whose_maximum_overflows_float32() -> None:
    """Logits finite in float64 past float32's range became several +inf in the float32 copy, and argmax
    returned the first of them — token 0 here, not the largest logit (2): a wrong token, silently. Now a
    NonFiniteError (as sampling's already was); a row whose overflow is only below its maximum (-inf
    entries) still decodes to the true argmax."""
    huge = ROW * 1e300
    assert int(np.argmax(huge)) == 2
    with pytest.raises(NonFiniteError, match="overflow float32") as info:
        _tokens(huge)
    assert info.value.tokens == [2]
    low = ROW.copy()
    low[[1, 5]] = -1e300  # -inf in float32, below the maximum: harmless
    assert _tokens(low) == [2, 2, 2]
    with pytest.raises(NonFiniteError, match="sampling probabilities"):
        _tokens(huge, do_sample=True)


def _reference_probs(x: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top-k (ties with the k-th kept), then top-p (the most probable tokens until their
    mass reaches p, at least one), then softmax: an independent float64 statement of the filters."""
    z = x / temperature
    keep = np.ones(x.size, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][min(top_k, x.size) - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= top_p - 1e-9]] = False
        keep[order[0]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    out: np.ndarray = p / p.sum()
    return out


def test_sampling_filters_equal_an_independent_reference_at_their_edges() -> None:
    """The distribution sampling draws from (the settings' processors, then softmax) equals the reference
    at the filters' edges — top_k 1 and ≥ V, top_p 0, tiny and 1, temperatures far from 1 — as multisets
    where logits tie (which of two tied tokens a boundary keeps is torch.sort's order, as in HF)."""
    torch = pytest.importorskip("torch")
    from scx_ref.sampling import GenerationSettings

    rng = np.random.default_rng(0)
    ids = torch.zeros((1, 1), dtype=torch.long)
    for trial in range(400):
        x = rng.standard_normal(int(rng.integers(1, 10))) * 3
        if trial % 3 == 0:
            x = np.round(x)  # ties
        x = x.astype(np.float32).astype(np.float64)
        t = float(rng.choice([0.05, 0.7, 1.0, 3.0]))
        k = int(rng.choice([0, 1, 2, x.size, x.size + 4]))
        p = float(rng.choice([0.0, 1e-12, 0.4, 0.9, 1.0]))
        procs = GenerationSettings(do_sample=True, temperature=t, top_k=k, top_p=p).processors()
        got = torch.softmax(procs(ids, torch.from_numpy(x.astype(np.float32))[None, :]), -1)[0].double()
        want = _reference_probs(x, t, k, p)
        np.testing.assert_allclose(np.sort(got.numpy()), np.sort(want), atol=1e-5, err_msg=f"{x} {t} {k} {p}")
        if k == 1 or p == 0.0:
            assert int(np.argmax(got.numpy())) in np.flatnonzero(x == x.max())  # greedy's token (a tie's)

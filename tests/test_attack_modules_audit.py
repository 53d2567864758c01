"""Audit of the attack modules (DESIGN §8) for honest measurement: an attack must use only what the server
holds and fail loudly — with a project error — on a view or a table it cannot read, never answer with
another model's tables (recovering nothing, so a leak reads as hidden) nor crash with a numpy or Python
error. Also: known-answer cases at the edges (one row, one head, only decoys) and no input mutated."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from scx_ref.attacks import (
    bruteforce,
    decoy_detect,
    inversion,
    llm_reorder,
    multiview,
    statelessness,
    vocab_match,
)
from scx_ref.attacks._model import forward_trace
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ProtocolError, SCXError, ShapeError
from scx_ref.keys import MASTER_SECRET_BYTES, NONCE_BYTES, KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.transport import ServerView, ViewedMessage
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

IDS = np.array([3, 1, 4, 1, 5, 9, 2, 6])


def _view(ids: Any = IDS, level: Any = "paper") -> ServerView:
    """The server's recorded view of a prefill of ``ids`` (tiny model 5, fixed keys)."""
    w = tiny_weights(5)
    b = NumpyBackend(w)
    link = LocalTransport(Server(b), record_view=True)
    keys = KeySchedule(b"\x01" * MASTER_SECRET_BYTES, b"\x02" * NONCE_BYTES)
    Client(b, keys, replace(SCXConfig(level=level), max_length=20)).prefill(np.asarray(ids), link)
    return link.view


def _edited(view: ServerView, stage: Stage, arrays: Any = None, meta: Any = None) -> ServerView:
    """``view`` with every ``stage`` message's arrays (or metadata) replaced."""
    out = []
    for m in view.messages:
        if m.stage == stage:
            m = ViewedMessage(
                m.session,
                m.stage,
                m.layer,
                m.step,
                m.arrays if arrays is None else arrays,
                m.meta if meta is None else meta,
            )
        out.append(m)
    return ServerView(out)


# -- block-1 tables of another model --


def test_block1_tables_of_a_same_config_model_with_other_weights_are_refused() -> None:
    """Tables of another model of the same config used to be taken: every row was then matched against
    the wrong vocabulary and the attack recovered 0 of 8 tokens it recovers in full — a leak read as
    hidden. Tables of equal weights (a copy) are still taken."""
    w = tiny_weights(3)
    tr = forward_trace(w, IDS)
    other = vocab_match.Block1Tables(tiny_weights(4))
    assert other.weights.config == w.config
    with pytest.raises(ConfigError, match="another model"):
        vocab_match.match_block1_qkv(tr.xhat[0], w, True, tables=other)
    with pytest.raises(ConfigError, match="another model"):
        vocab_match.match_block1_attn(tr.k[0], tr.v[0], w, tables=other)
    with pytest.raises(ConfigError, match="another model"):
        vocab_match.match_block1_map(tr.xhat[0], w, 0.0, np.zeros(w.config.vocab_size), tables=other)
    same = vocab_match.Block1Tables(copy.deepcopy(w))
    assert np.array_equal(vocab_match.match_block1_qkv(tr.xhat[0], w, True, tables=same)[0], IDS)
    assert np.array_equal(vocab_match.match_block1_attn(tr.k[0], tr.v[0], w, tables=same)[0], IDS)


# -- unlock_locked, server_caches, statelessness_table and search spaces on malformed views --


@pytest.fixture(scope="module")
def view() -> ServerView:
    return _view()


def _lock_k(view: ServerView) -> np.ndarray:
    return np.asarray(view.select(stage=Stage.LOCK)[0].arrays["k"])


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda v: _edited(v, Stage.OPEN, meta={}), ProtocolError),  # no n
        (lambda v: _edited(v, Stage.OPEN, meta={**v.messages[0].meta, "n": "8"}), ProtocolError),
        (lambda v: _edited(v, Stage.OPEN, meta={**v.messages[0].meta, "n": 50}), ShapeError),  # another n
        (lambda v: _edited(v, Stage.LOCK, arrays={}), ProtocolError),  # no locked keys
        (lambda v: _edited(v, Stage.LOCK, arrays={"k": _lock_k(v)[..., :3]}), ShapeError),  # another width
        (lambda v: _edited(v, Stage.ATTN, arrays={}), ProtocolError),  # no attention K
        (
            lambda v: _edited(v, Stage.ATTN, arrays={"k": np.zeros((3, 2, 4)), "v": np.zeros((3, 2, 4))}),
            ShapeError,
        ),
    ],
    ids=["no-n", "n-str", "n-50", "lock-no-k", "lock-width", "attn-no-k", "attn-rows"],
)
def test_unlock_locked_refuses_a_malformed_view_with_a_project_error(
    view: ServerView, edit: Any, error: type[SCXError]
) -> None:
    """Each used to raise KeyError, ValueError (a failed reshape) instead of a project error."""
    with pytest.raises(error):
        statelessness.unlock_locked(edit(view), tiny_weights(5))


@pytest.mark.parametrize("rtol", [float("nan"), -1.0, "1e-4", True])
def test_unlock_locked_refuses_a_tolerance_that_is_no_tolerance(view: ServerView, rtol: Any) -> None:
    """A NaN or negative rtol used to place no row — every locked cache read as locked, silently."""
    with pytest.raises(ConfigError, match="rtol"):
        statelessness.unlock_locked(view, tiny_weights(5), rtol=rtol)


def test_statelessness_and_search_spaces_refuse_a_view_without_the_prompts_n(view: ServerView) -> None:
    """Each used to raise KeyError('n')."""
    w = tiny_weights(5)
    bad = _edited(view, Stage.OPEN, meta={})
    with pytest.raises(ProtocolError, match="n"):
        statelessness.server_caches(bad, w, "zeros")
    with pytest.raises(ProtocolError, match="n"):
        statelessness.statelessness_table(bad, w, IDS, [1, 2])
    with pytest.raises(ProtocolError, match="n"):
        bruteforce.stage_search_spaces(bad, w.config)


def test_search_spaces_refuse_a_row_permuted_message_without_rows(view: ServerView) -> None:
    """Used to raise StopIteration (a message with no array) or IndexError (a 0-d one)."""
    cfg = tiny_weights(5).config
    with pytest.raises(ProtocolError, match="no rows"):
        bruteforce.stage_search_spaces(_edited(view, Stage.O, arrays={}), cfg)
    with pytest.raises(ProtocolError, match="no rows"):
        bruteforce.stage_search_spaces(_edited(view, Stage.O, arrays={"x": np.float64(1.0)}), cfg)


def test_server_caches_refuse_locked_keys_without_an_array(view: ServerView) -> None:
    """The ``encoded`` policy reads the locked keys: KeyError before, a project error now."""
    with pytest.raises(ProtocolError, match="no array 'k'"):
        statelessness.server_caches(_edited(view, Stage.LOCK, arrays={}), tiny_weights(5), "encoded")


# -- the inverters' decoding table, their public traces, and the language model's answers --


def test_an_inverters_decoding_table_must_be_finite_numbers() -> None:
    """A NaN table used to be taken: every row then decoded to token 0 (argmax of NaN similarities) and a
    joint inverter's view got the weight NaN — a leak scored as nothing, silently."""
    w = tiny_weights(3)
    tr = forward_trace(w, np.arange(32) % 32)
    bad = inversion.unit_vocabulary(w).copy()
    bad[5, 0] = np.nan
    with pytest.raises(NonFiniteError, match="table"):
        inversion.fit_inverter(tr.x[1], np.arange(32), w, table=bad)
    with pytest.raises(NonFiniteError, match="table"):
        multiview.JointInverter.fit([tr.x[1]], [0.0], np.arange(32), w, bad)
    with pytest.raises(DTypeError, match="table"):
        inversion.fit_inverter(tr.x[1], np.arange(32), w, table=np.full((32, 16), "a"))


def test_public_rows_refuse_traces_that_do_not_reach_the_block() -> None:
    """A trace cut before the block (or no trace at all) used to raise IndexError / AttributeError."""
    w = tiny_weights(3)
    short = forward_trace(w, IDS, upto=1)
    with pytest.raises(ConfigError, match="reaches block 3"):
        multiview.public_rows(w, [short], "x", 3)
    with pytest.raises(ConfigError, match="Trace"):
        multiview.public_rows(w, [1, 2], "x", 0)
    assert multiview.public_rows(w, [short], "h", 1).shape == (len(IDS), 16)


class _NanLM:
    """The tiny model's language model with ``score`` (NaN by default) in place of the scores of token
    ``bad`` and of the sequences holding it."""

    def __init__(self, bad: int, score: float = np.nan) -> None:
        self.lm = llm_reorder.NumpyLM(tiny_weights(3))
        self.bad, self.score = bad, score

    def next_logprobs(self, seqs: np.ndarray) -> np.ndarray:
        out = self.lm.next_logprobs(seqs)
        out[:, self.bad] = self.score
        return out

    def token_logprobs(self, seqs: np.ndarray) -> np.ndarray:
        out = self.lm.token_logprobs(seqs)
        out[np.any(seqs == self.bad, axis=1)] = self.score
        return out


def test_a_language_models_nan_or_misshapen_scores_are_refused() -> None:
    """Enumeration used to return the sequence scored NaN (argmax takes a NaN as the largest), the beam
    search to sort NaN scores at random, and a wrong batch of rows to raise a ValueError from zip."""
    lm = _NanLM(4)
    with pytest.raises(NonFiniteError, match="NaN"):
        bruteforce.enumerate_orders([3, 1, 4], 2, lm)
    with pytest.raises(NonFiniteError, match="NaN"):
        llm_reorder.beam_reorder([3, 1, 4], 2, lm)

    class Wrong:
        def next_logprobs(self, seqs: np.ndarray) -> np.ndarray:
            return np.zeros((len(seqs) + 1, 32))

        def token_logprobs(self, seqs: np.ndarray) -> np.ndarray:
            return np.zeros((len(seqs), seqs.shape[1] + 1))

    with pytest.raises(ShapeError, match="shape"):
        llm_reorder.beam_reorder([3, 1, 4], 2, Wrong())
    with pytest.raises(ShapeError, match="shape"):
        bruteforce.enumerate_orders([3, 1, 4], 2, Wrong())
    # a −∞ score (probability 0) is a score: that token is never chosen while another is possible
    assert 4 not in llm_reorder.beam_reorder([3, 1, 4], 2, _NanLM(4, -np.inf))
    assert 4 not in bruteforce.enumerate_orders([3, 1, 4], 2, _NanLM(4, -np.inf))


# -- known answers at the edges (these held before; kept as guards) --


@pytest.mark.parametrize("level", ["permute", "blind"])
def test_a_one_token_prompts_locked_cache_is_unlocked(level: Any) -> None:
    """n = 1: the attention route reads P off single values per column; the cache comes back exactly."""
    res = statelessness.unlock_locked(_view([7], level), tiny_weights(5))
    _, cache = ReferenceModel(tiny_weights(5)).prefill(np.array([7]))
    assert res
    for i, r in res.items():
        assert r["attention"] == 1 and r["raw"] == (1 if level == "permute" else 0)
        np.testing.assert_allclose(r["k"], cache.keys[i], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r["v"], cache.values[i], rtol=1e-9, atol=1e-12)


def test_matchers_with_one_head_and_one_row_recover_the_token() -> None:
    """One KV head of one query head, and a single row at a later position: the fingerprint and the
    sequential matchers still recover every token (the positions are the rows', not 0..n−1)."""
    w = tiny_weights(2, n_heads=1, n_kv_heads=1, head_dim=8)
    tr = forward_trace(w, IDS)
    ids, dist = vocab_match.match_block1_attn(tr.k[0][5:6], tr.v[0][5:6], w, positions=[5])
    assert ids.tolist() == [IDS[5]] and dist[0] < 1e-9
    kv = np.concatenate([tr.k[2].reshape(len(IDS), -1), tr.v[2].reshape(len(IDS), -1)], axis=1)
    rec, d = vocab_match.match_sequential(kv, w, 2, "kv")
    assert np.array_equal(rec, IDS) and d.max() < 1e-9


def test_random_rows_are_matched_at_chance_and_never_exactly() -> None:
    """Negative control: rows that are no model's rows (same scale) match no token exactly, and the
    fingerprint guesses are at chance — the matchers read nothing the rows do not hold."""
    w = tiny_weights(3)
    tr = forward_trace(w, IDS)
    rng = np.random.default_rng(0)
    k = rng.permutation(tr.k[0].ravel()).reshape(tr.k[0].shape)
    v = rng.permutation(tr.v[0].ravel()).reshape(tr.v[0].shape)
    ids, dist = vocab_match.match_block1_attn(k, v, w)
    assert dist.min() > 1e-3 and np.mean(ids == IDS) <= 0.25
    x = rng.permutation(tr.x[2].ravel()).reshape(tr.x[2].shape)
    rec, d = vocab_match.match_sequential(x, w, 2, "x")
    assert d.min() > 1e-3 and np.mean(rec == IDS) <= 0.25


def test_only_decoy_rows_link_to_nothing() -> None:
    """All rows decoys (another prompt's rows at the FFN stage): no FFN row is a QKV row + O row, and
    none of block 1's FFN rows minus an O row is a vocabulary row."""
    w = tiny_weights(3)
    tr, other = forward_trace(w, IDS), forward_trace(w, np.array([7, 8, 10, 11, 12, 13, 14, 15]))
    q, o, f = decoy_detect.residual_links(tr.x[1], tr.o[1], other.h[1], w, 1)
    assert not (q.any() or o.any() or f.any())
    _, rel = vocab_match.match_block1_residual(tr.o[0], other.h[0], w)
    assert rel.min() > 1e-3


def test_no_attack_writes_to_its_inputs() -> None:
    """Every input read-only (as a recorded view's arrays are): an attack that edited one in place
    would raise here, or change another attack's reading of the same view."""

    def ro(a: Any) -> np.ndarray:
        out = np.array(a, dtype=np.float64)
        out.flags.writeable = False
        return out

    w = tiny_weights(3)
    tr = forward_trace(w, IDS)
    x0, k0, v0, o0, h0 = ro(tr.x[0]), ro(tr.k[0]), ro(tr.v[0]), ro(tr.o[0]), ro(tr.h[0])
    before = [a.copy() for a in (x0, k0, v0, o0, h0)]
    vocab_match.match_block1_qkv(x0, w)
    vocab_match.match_block1_attn(k0, v0, w)
    vocab_match.match_block1_residual(o0, h0, w)
    vocab_match.map_tokens(ro(vocab_match.l1_distances(x0, ro(w.embed))), 1.0, ro(np.zeros(32)))
    decoy_detect.residual_links(x0, o0, h0, w, 0)
    decoy_detect.recurring_rows([x0, x0], tol=0.1)
    decoy_detect.recurring_rows([x0, x0])
    for a, b in zip((x0, k0, v0, o0, h0), before, strict=True):
        assert np.array_equal(a, b)

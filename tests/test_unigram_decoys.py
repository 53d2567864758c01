"""Block-1 decoys drawn from a public unigram distribution (DESIGN §5.1: "block 1: embeddings of tokens
drawn from a public unigram distribution"): ``secret_calibration_tokens(..., unigram=)`` and
``unigram_counts``, the client's ``unigram=`` keyword, and ``decoy_detect.frequency_prior`` — the attack
that ranks un-noised block-1 rows by a public unigram. Measured on a synthetic Zipf vocabulary and on a
tiny model's recorded prefill at level permute: uniform decoys are found far above chance, unigram decoys
at about chance."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from scx_ref.attacks import decoy_detect, vocab_match
from scx_ref.attacks.stats import FrequencyPrior
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ProtocolError, ShapeError, VocabularyError
from scx_ref.keys import NONCE_BYTES, KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.decoys import (
    CalibrationPool,
    GaussianDecoys,
    secret_calibration_tokens,
    unigram_counts,
)
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

Array = npt.NDArray[Any]
MASTER = bytes(range(1, 33))
NONCE = bytes(range(16))
ALPHA = 0.001  # the chi-square tests' level (as tests/test_keys.py)


def _keys(master: bytes = MASTER, nonce: bytes = NONCE) -> KeySchedule:
    return KeySchedule(master, nonce)


def _master(i: int) -> bytes:
    """The i-th of a fixed list of master secrets (never all-zero: a SHA-256 digest)."""
    return hashlib.sha256(b"unigram-decoys/%d" % i).digest()


def _zipf(vocab: int, s: float) -> Array:
    """Zipf probabilities p_k ∝ k^-s over token ids 0..vocab-1 (id k has rank k + 1)."""
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -s
    return np.asarray(p / p.sum())


# -- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unigram, error",
    [
        (np.ones(31), ShapeError),  # not vocab_size long
        (np.ones((32, 1)), ShapeError),  # not 1-D
        (np.ones(32, dtype=bool), DTypeError),
        (["a"] * 32, DTypeError),
        ([[1, 2], [3]], DTypeError),  # ragged: numpy cannot read it
        (np.r_[np.ones(31), np.nan], NonFiniteError),
        (np.r_[np.ones(31), np.inf], NonFiniteError),
        (np.r_[np.ones(31), -1.0], ConfigError),
        (np.r_[np.ones(31, dtype=np.int64), -1], ConfigError),
        (np.zeros(32), ConfigError),  # no token drawable
        (np.zeros(32, dtype=np.int64), ConfigError),
        (np.full(32, 2**62, dtype=np.int64), ConfigError),  # Σw ≥ 2⁶³: the cumulative counts overflow
        (np.full(32, 2**63, dtype=np.uint64), ConfigError),  # past int64 altogether
    ],
)
def test_a_bad_unigram_is_refused(unigram: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        secret_calibration_tokens(_keys(), 32, unigram=unigram)


def test_unigram_counts_check_their_arguments() -> None:
    with pytest.raises(VocabularyError):
        unigram_counts(np.array([0, 5]), 5)
    with pytest.raises(VocabularyError):
        unigram_counts(np.array([[0, 1]]), 5)
    with pytest.raises(VocabularyError):
        unigram_counts(np.array([0.0, 1.0]), 5)
    with pytest.raises(ConfigError):
        unigram_counts(np.array([0]), 0)


def test_frequency_prior_checks_its_arguments() -> None:
    ids, truth, prior = np.array([0, 1, 2]), np.array([False, False, True]), np.zeros(3)
    with pytest.raises(VocabularyError):
        decoy_detect.frequency_prior(np.array([0, 1, 3]), truth, prior)
    with pytest.raises(DTypeError):
        decoy_detect.frequency_prior(ids, np.array([0, 0, 1]), prior)
    with pytest.raises(DTypeError):
        decoy_detect.frequency_prior(ids, [[True], [False, True]], prior)  # ragged
    with pytest.raises(ShapeError):
        decoy_detect.frequency_prior(ids, truth[:2], prior)
    with pytest.raises(ConfigError):
        decoy_detect.frequency_prior(ids, np.zeros(3, dtype=bool), prior)
    with pytest.raises(NonFiniteError):
        decoy_detect.frequency_prior(ids, truth, np.array([0.0, -np.inf, 0.0]))
    with pytest.raises(ShapeError):
        decoy_detect.frequency_prior(ids, truth, np.zeros((3, 1)))


# -- the draw ---------------------------------------------------------------------------------------------


def test_no_unigram_is_the_uniform_draw_bit_for_bit() -> None:
    """``unigram=None`` (and the default) is the uniform draw: randbelow(vocab_size) on the ("decoy-pool",
    epoch) stream of the keys' own nonce (since the pool stopped handing out a row twice, every client its
    own texts: before, the all-zero nonce's ("decoy-pool",) stream, one text per master secret)."""
    text = secret_calibration_tokens(_keys(), 32000)
    assert np.array_equal(text, secret_calibration_tokens(_keys(), 32000, 256, unigram=None, epoch=0))
    direct = _keys().stream(("decoy-pool", 0)).randbelow(np.full(256, 32000))
    assert text.dtype == np.int64 and np.array_equal(text, direct)
    old = _keys().for_nonce(bytes(NONCE_BYTES)).stream(("decoy-pool",)).randbelow(np.full(256, 32000))
    digest = hashlib.sha256(old.astype("<i8").tobytes()).hexdigest()  # the stream the draw used to read
    assert digest == "317e2df232511910bc7fa0b07897ce8caad0d333b4008b4c48f217f40a892f3d"
    assert not np.array_equal(text, old)


def _chi_square(text: Array, weights: Array) -> float:
    """p-value of a chi-square test that ``text`` follows ``weights`` (over the tokens of positive weight;
    a token of weight 0 drawn at all gives 0)."""
    counts = np.bincount(text, minlength=len(weights))
    live = weights > 0
    if counts[~live].any():
        return 0.0
    expected = weights[live] / weights[live].sum() * len(text)
    return float(stats.chisquare(counts[live], expected).pvalue)


def test_the_draw_follows_the_unigram() -> None:
    """20 000 draws of a fixed secret pass a chi-square test against a Zipf-like unigram with zero-weight
    tokens (at α = 0.001), integer and floating weights alike; the uniform draw of the same secret fails
    it (the control that the test can fail), even with its tokens of weight 0 left out, and the unigram
    draw fails a test against the uniform distribution."""
    vocab, size = 50, 20_000
    weights = np.round(1000 * np.arange(1, vocab + 1, dtype=np.float64) ** -1.1).astype(np.int64)
    weights[[3, 17, 40]] = 0
    text = secret_calibration_tokens(_keys(), vocab, size, unigram=weights)
    p = _chi_square(text, weights)
    assert p > ALPHA
    floating = secret_calibration_tokens(_keys(), vocab, size, unigram=weights / weights.sum())
    assert _chi_square(floating, weights) > ALPHA
    uniform = secret_calibration_tokens(_keys(), vocab, size)
    assert _chi_square(text, np.ones(vocab)) < 1e-9
    assert _chi_square(uniform, weights) == 0.0  # it draws tokens of weight 0
    q = _chi_square(uniform[weights[uniform] > 0], weights)  # and, those left out, not the unigram's shape
    assert q < 1e-9
    print(f"\nchi-square p: unigram draw {p:.3f}, uniform draw against the unigram {q:.1e}")


def test_the_draw_is_an_exact_inverse_cdf() -> None:
    """Tokens of weight 0 are never drawn, whatever lies around them: a single positive weight (integer,
    or a float as small as 1e-300) draws only its token; the two ends of the vocabulary only the ends;
    floating weights as large as 1e308 (whose plain sum overflows) draw as their scaled-down copy does."""
    vocab = 40
    for t in (0, 17, vocab - 1):
        for w in (np.eye(vocab, dtype=np.int64)[t] * 7, np.eye(vocab)[t] * 1e-300):
            assert set(secret_calibration_tokens(_keys(), vocab, 300, unigram=w).tolist()) == {t}
    ends = np.zeros(vocab, dtype=np.int64)
    ends[[0, -1]] = [1, 3]
    assert set(secret_calibration_tokens(_keys(), vocab, 300, unigram=ends).tolist()) == {0, vocab - 1}
    huge = secret_calibration_tokens(_keys(), vocab, 300, unigram=np.full(vocab, 1e308))
    assert np.array_equal(huge, secret_calibration_tokens(_keys(), vocab, 300, unigram=np.full(vocab, 1.0)))
    assert len(set(huge.tolist())) > vocab // 2


def test_the_text_is_the_keys_and_the_epochs() -> None:
    """The text is the key schedule's — master secret and the client's first nonce — and the epoch's: two
    clients of one secret draw different texts (their pools share no row, so no decoy of one recurs in the
    other's sessions), and so do a pool's epochs; the same keys and epoch draw the same text. Which tokens
    the pool holds stays secret although the unigram is public."""
    weights = unigram_counts(np.arange(100) % 7, 64)
    a = secret_calibration_tokens(_keys(nonce=bytes(16 * [1])), 64, unigram=weights)
    b = secret_calibration_tokens(_keys(nonce=bytes(16 * [2])), 64, unigram=weights)
    c = secret_calibration_tokens(_keys(master=_master(0)), 64, unigram=weights)
    a1 = secret_calibration_tokens(_keys(nonce=bytes(16 * [1])), 64, unigram=weights, epoch=1)
    again = secret_calibration_tokens(_keys(nonce=bytes(16 * [1])), 64, unigram=weights, epoch=0)
    assert np.array_equal(a, again)
    for other in (b, c, a1):
        assert np.mean(a != other) > 0.5


def test_unigram_counts_are_add_one_smoothed_counts() -> None:
    """c_t = count + 1 for every token: the attacker's :class:`FrequencyPrior` of the same text, and every
    token drawable (an empty text: the uniform distribution)."""
    assert unigram_counts(np.array([1, 1, 3]), 5).tolist() == [1, 3, 1, 2, 1]
    assert unigram_counts(np.zeros(0, dtype=np.int64), 4).tolist() == [1, 1, 1, 1]
    ids = np.random.default_rng(0).integers(0, 30, size=200)
    counts = unigram_counts(ids, 40)
    assert counts.dtype == np.int64 and counts.min() == 1
    np.testing.assert_allclose(counts / counts.sum(), FrequencyPrior(ids, 40).probs, rtol=1e-15)


# -- frequency_prior ------------------------------------------------------------------------------------


def test_frequency_prior_is_recall_at_r_with_ties_called_in_proportion() -> None:
    ids = np.array([0, 1, 2, 3])
    truth = np.array([False, False, True, True])
    assert decoy_detect.frequency_prior(ids, truth, np.array([0.0, -1.0, -2.0, -3.0])) == 1.0
    assert decoy_detect.frequency_prior(ids, truth, np.array([-3.0, -2.0, -1.0, 0.0])) == 0.0
    assert decoy_detect.frequency_prior(ids, truth, np.zeros(4)) == 0.5  # all tied: chance, r / (n + r)
    # one decoy, three rows tied at the cut: each is called with chance 1/3, whatever the rows' order
    one = np.array([False, False, True, False])
    assert decoy_detect.frequency_prior(ids, one, np.array([0.0, -1.0, -1.0, -1.0])) == pytest.approx(1 / 3)
    assert decoy_detect.frequency_prior(ids[::-1], one[::-1], np.array([0.0, -1.0, -1.0, -1.0])) == (
        pytest.approx(1 / 3)
    )
    # a repeated token: its rows share one log-probability, and both are called
    rep = np.array([2, 2, 0, 1])
    called = np.array([True, False, False, True])  # row 0 a decoy, row 1 (the same token) real
    assert decoy_detect.frequency_prior(rep, called, np.array([0.0, -1.0, -2.0])) == 0.5


# -- the client -------------------------------------------------------------------------------------------


def test_the_client_draws_its_pool_text_from_the_unigram() -> None:
    """A client given ``unigram=`` builds its calibration pool from the secret text drawn from it: its
    block-1 QKV pool rows are the embeddings of ``secret_calibration_tokens(keys, V, unigram=...)``, every
    one a token of positive weight, and the decoys of block 1's QKV message in a prefill at level permute
    are such rows too. Without ``unigram`` the pool is the uniform text's."""
    w = tiny_weights(21)
    b = NumpyBackend(w)
    embed = np.asarray(w.embed, dtype=np.float64)
    support = [3, 7, 11, 20]
    weights = np.zeros(w.config.vocab_size, dtype=np.int64)
    weights[support] = [5, 1, 1, 3]
    cfg = SCXConfig(level="permute", r1=4, max_length=12)
    client: Client[Any] = Client(b, _keys(), cfg, unigram=weights)
    assert isinstance(client.decoys, CalibrationPool)
    pool = client.decoys.rows[(Stage.QKV, 0)]
    text = secret_calibration_tokens(_keys(), w.config.vocab_size, unigram=weights)
    assert set(text.tolist()) == set(support)
    assert np.array_equal(pool, embed[text])
    plain: Client[Any] = Client(b, _keys(nonce=bytes(16 * [3])), cfg)
    assert isinstance(plain.decoys, CalibrationPool)
    assert np.array_equal(
        plain.decoys.rows[(Stage.QKV, 0)],
        embed[secret_calibration_tokens(_keys(nonce=bytes(16 * [3])), w.config.vocab_size)],
    )
    link = LocalTransport(Server(b), record_view=True)
    ids = np.array([0, 1, 2, 4, 5, 6, 8], dtype=np.int64)
    client.prefill(ids, link)
    rows = np.asarray(link.view.select(stage=Stage.QKV, layer=0)[0].arrays["x"], dtype=np.float64)
    pi = _keys().permutation(("tok", 0, "qkv"), len(ids) + cfg.r1)
    tokens, dist = vocab_match.nearest_rows(rows, embed, "l2")
    assert np.all(dist == 0.0)
    assert set(tokens[pi >= len(ids)].tolist()) <= set(support)
    assert np.array_equal(tokens[pi < len(ids)], ids[pi[pi < len(ids)]])


def test_the_client_refuses_unigram_where_no_secret_text_is_drawn() -> None:
    w = tiny_weights(22)
    b = NumpyBackend(w)
    u = np.ones(w.config.vocab_size, dtype=np.int64)
    with pytest.raises(ProtocolError):
        Client(b, _keys(), unigram=u, public_tokens=np.arange(10))
    with pytest.raises(ProtocolError):
        Client(b, _keys(), unigram=u, decoys=GaussianDecoys())
    with pytest.raises(ProtocolError):
        Client(b, _keys(), SCXConfig(decoys="gaussian"), unigram=u)
    with pytest.raises(ShapeError):
        Client(b, _keys(), unigram=u[:-1])
    with pytest.raises(ConfigError):
        Client(b, _keys(), unigram=-u)


# -- measurements ---------------------------------------------------------------------------------------

VOCAB, ZIPF_S = 2000, 1.1


def _zipf_world() -> tuple[Array, Array, np.random.Generator]:
    """A public text of 200 000 Zipf(1.1) tokens over 2000 ids, its add-one counts (the client's unigram)
    and the attacker's log-prior of the same text, and a generator for prompts from the same Zipf."""
    p = _zipf(VOCAB, ZIPF_S)
    public = np.random.default_rng(1).choice(VOCAB, size=200_000, p=p)
    return unigram_counts(public, VOCAB), FrequencyPrior(public, VOCAB).log_probs, np.random.default_rng(2)


def test_frequency_prior_finds_uniform_decoys_and_not_unigram_ones() -> None:
    """Synthetic measurement: 300 requests, each a 48-token prompt drawn from Zipf(1.1) over 2000 tokens
    and 16 decoys its own master secret's 256-token pool gives (:meth:`CalibrationPool.draw`, a pool row
    being its token id). The attacker ranks the 64 rows by the public prior and calls the 16 least probable
    decoys; chance is 16 / 64 = 0.25. Observed: uniform pools 0.693, unigram pools 0.256. Margins: 4800
    decoys per setting, chance's standard error √(0.25·0.75/4800) ≈ 0.006; over 12 replications of this
    test with other seeds the two scores were 0.698 ± 0.007 and 0.254 ± 0.006 (mean ± sd). Asserted:
    uniform > 0.6 (~15 sd below its mean, far above chance), unigram < 0.30 (~7 sd above its mean;
    pools drawn a quarter uniformly, three quarters from the unigram, scored 0.37)."""
    counts, log_prior, rng = _zipf_world()
    p = _zipf(VOCAB, ZIPF_S)
    n, r, requests = 48, 16, 300
    scores: dict[str, list[float]] = {"uniform": [], "unigram": []}
    for i in range(requests):
        prompt = rng.choice(VOCAB, size=n, p=p)
        keys = _keys(master=_master(i))
        for name, given in (("uniform", None), ("unigram", counts)):
            text = secret_calibration_tokens(keys, VOCAB, unigram=given)
            pool = CalibrationPool({(Stage.QKV, 0): text[:, None]})
            decoys = pool.draw(Stage.QKV, 0, r, np.zeros((0, 1)), keys.stream(("decoys", i)))[:, 0]
            tokens = np.concatenate([prompt, decoys])
            truth = np.arange(n + r) >= n
            scores[name].append(decoy_detect.frequency_prior(tokens, truth, log_prior))
    uniform, unigram = float(np.mean(scores["uniform"])), float(np.mean(scores["unigram"]))
    print(f"\nZipf({ZIPF_S}) over {VOCAB}: decoys found by the frequency prior (chance {r / (n + r):.3f}):")
    print(f"  uniform pools {uniform:.3f}, unigram pools {unigram:.3f} ({requests} requests × {r} decoys)")
    assert uniform > 0.6
    assert unigram < 0.30


def test_frequency_prior_on_a_recorded_prefill_at_level_permute() -> None:
    """The same attack on what a server records: a tiny model with a 2000-token vocabulary, level permute
    (block 1 not noised), 20 prompts of 24 Zipf(1.1) tokens each with r₁ = 8 decoys. The server-side rows
    of block 1's QKV message are matched to their tokens exactly (L2 distance 0 to an embedding row); the
    truth is the request's permutation (rows with π ≥ n are decoys). Chance is 8 / 32 = 0.25. Observed: a
    client with the default uniform text 0.719, one given ``unigram=unigram_counts(public text)`` 0.231.
    Margins: 160 decoys from one pool per setting, chance's standard error √(0.25·0.75/160) ≈ 0.034; over 8
    replications with other seeds the scores were 0.715 ± 0.034 and 0.252 ± 0.040 (mean ± sd). Asserted:
    uniform > 0.5 (~6 sd below its mean), unigram < 0.40 (~3.7 sd above its mean)."""
    counts, log_prior, rng = _zipf_world()
    p = _zipf(VOCAB, ZIPF_S)
    w = tiny_weights(23, vocab_size=VOCAB)
    b = NumpyBackend(w)
    embed = np.asarray(w.embed, dtype=np.float64)
    n, prompts = 24, 20
    cfg = SCXConfig(level="permute", r1=8)
    server: Server[Any] = Server(b)
    scores: dict[str, list[float]] = {}
    for name, given in (("uniform", None), ("unigram", counts)):
        master = _master(1000 + len(scores))
        client: Client[Any] = Client(b, _keys(master=master), cfg, unigram=given)
        found = []
        for k in range(prompts):
            ids = rng.choice(VOCAB, size=n, p=p)
            nonce = hashlib.sha256(f"prefill/{name}/{k}".encode()).digest()[:NONCE_BYTES]
            link = LocalTransport(server, record_view=True)
            client.prefill(ids, link, nonce=nonce)
            rows = np.asarray(link.view.select(stage=Stage.QKV, layer=0)[0].arrays["x"], dtype=np.float64)
            tokens, dist = vocab_match.nearest_rows(rows, embed, "l2")
            assert np.all(dist == 0.0)  # un-noised: every row is its token's embedding
            truth = _keys(master, nonce).permutation(("tok", 0, "qkv"), n + cfg.r1) >= n
            found.append(decoy_detect.frequency_prior(tokens, truth, log_prior))
        scores[name] = found
    uniform, unigram = float(np.mean(scores["uniform"])), float(np.mean(scores["unigram"]))
    print(f"\nrecorded prefills (tiny model, vocab {VOCAB}, level permute), decoys found (chance 0.25):")
    print(f"  uniform text {uniform:.3f}, unigram text {unigram:.3f} ({prompts} prompts × {cfg.r1} decoys)")
    assert uniform > 0.5
    assert unigram < 0.40

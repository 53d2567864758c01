"""Decoys recurred across one client's requests (DESIGN §5.1: the calibration pool "the client collects
once"); the client's pool now hands out no row twice (``CalibrationPool.secret``), and the last tests
check that none recurs. The measurements reproduce the earlier pool — every request's decoys drawn
independently from one pool — by handing the clients a plain ``CalibrationPool.from_tokens`` of the same
secret text.

Before: one master secret gave one calibration pool (256 tokens of secret pseudo-text, one row per token
at every (stage, layer)); every request of that secret drew its decoys from it — distinct within a
message, but independently across requests. A server that records several sessions of one client
therefore sees the same pool rows again, verbatim, wherever the stage is not noised (level ``permute``
everywhere, level ``paper`` past block 1's QKV stage, and the locked key caches at every level, ``blind``
included), while a real row past block 1 depends on its whole prefix and recurs only for a shared prefix.
``decoy_detect.recurring_rows`` marks the rows seen in another session; measured here on the tiny model
(vocabulary 2000, every block a guard block: nothing key-shared), r₁ = r₂ = r_lock = 8, prompts of 16
Zipf(1.1) tokens with distinct first tokens (no shared prefix). A decoy of one session recurs in S − 1
others with probability 1 − (1 − 8/256)^(S−1): 0.03, 0.12, 0.25, 0.71 for S = 2, 5, 10, 40 — the rule
"recurs ⇒ decoy" is nearly always right past block 1, and finds more of the decoys the more sessions the
server keeps. At block 1 (level permute) it is worthless: real rows are embedding rows, which recur too.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from scx_ref.attacks import decoy_detect
from scx_ref.backends import NumpyBackend
from scx_ref.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from scx_ref.keys import NONCE_BYTES, KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.config import Level
from scx_ref.protocol.decoys import CalibrationPool, secret_calibration_tokens
from scx_ref.protocol.keyring import RequestKeys
from scx_ref.stages import Stage
from tests.tiny import tiny_weights

Array = npt.NDArray[Any]
VOCAB, N, R = 2000, 16, 8
POOL = 256  # the calibration text's length: one pool row per token at every (stage, layer)
WINDOW = 32  # CalibrationPool.from_tokens runs the text in windows of max_positions = 32 tokens
SESSIONS = (2, 5, 10, 40)
#: (stage, layer) of the messages measured: block 1's and block 2's QKV, O and FFN stages
STAGES = ((Stage.QKV, 0), (Stage.O, 0), (Stage.FFN, 0), (Stage.QKV, 1), (Stage.O, 1), (Stage.FFN, 1))
LOCK = (Stage.LOCK, 3)  # the last block's locked key cache (attention="server", l_e = 2: blocks 3 and 4)


def _master(i: int) -> bytes:
    return hashlib.sha256(b"decoy-recurrence/%d" % i).digest()


def _expected_recall(sessions: int) -> float:
    """The chance that a decoy of one session is among the R distinct pool rows of some other session."""
    return 1.0 - (1.0 - R / POOL) ** (sessions - 1)


@functools.cache
def _world() -> tuple[NumpyBackend, Server[Any]]:
    b = NumpyBackend(tiny_weights(23, vocab_size=VOCAB))
    return b, Server(b)


@functools.cache
def _prompts(count: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """``count`` prompts of N Zipf(1.1) tokens whose first tokens are distinct: no two share a prefix."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, VOCAB + 1, dtype=np.float64) ** -1.1
    p /= p.sum()
    firsts = rng.choice(VOCAB, size=count, replace=False, p=p)
    return tuple(tuple(int(t) for t in (first, *rng.choice(VOCAB, size=N - 1, p=p))) for first in firsts)


Recorded = dict[tuple[Stage, int], tuple[Array, Array, Array]]  # rows, is-decoy, position (−1: decoy)


@functools.cache
def _reused_pool(master: int) -> CalibrationPool:
    """The pool the client used to build: its secret text's rows, each request's drawn independently."""
    b, _ = _world()
    return CalibrationPool.from_tokens(b, secret_calibration_tokens(_client_keys(master), VOCAB))


def _client_keys(master: int) -> KeySchedule:
    return KeySchedule(_master(master), bytes(NONCE_BYTES))


@functools.cache
def _record(
    level: Level, master: int, prompts: tuple[tuple[int, ...], ...], reuse: bool = True
) -> tuple[Recorded, ...]:
    """What the server records of one client (master secret ``master``) running each prompt in a session of
    its own, and the truth from the request keys: row j of a message holds item π[j], a decoy when ≥ N.
    ``reuse``: the client draws from the earlier pool (:func:`_reused_pool`), else from its own default."""
    b, server = _world()
    cfg = SCXConfig(level=level, r1=R, r2=R, l_s=2, l_e=2)  # 4 blocks, all guard blocks: nothing key-shared
    decoys = _reused_pool(master) if reuse else None
    client: Client[Any] = Client(b, _client_keys(master), cfg, decoys=decoys)
    out = []
    for k, ids in enumerate(prompts):
        nonce = hashlib.sha256(f"{level}/{master}/{k}/{ids}/{reuse}".encode()).digest()[:NONCE_BYTES]
        link = LocalTransport(server, record_view=True)
        client.prefill(np.asarray(ids, dtype=np.int64), link, nonce=nonce)
        keys = RequestKeys(KeySchedule(_master(master), nonce), b.config)
        rec: Recorded = {}
        for stage, layer in (*STAGES, LOCK):
            if stage is Stage.O:
                perm = keys.o_perm(layer, N + R)
            elif stage is Stage.LOCK:
                perm = keys.lock_perm(layer, N + R)
            else:  # π_i permutes block i's QKV rows and block i − 1's FFN rows
                perm = keys.token_perm(layer + (stage is Stage.FFN), N + R)
            (message,) = link.view.select(stage=stage, layer=layer)
            rows = np.asarray(message.arrays["k" if stage is Stage.LOCK else "x"], dtype=np.float64)
            rec[(stage, layer)] = (rows, perm >= N, np.where(perm < N, perm, -1))
        out.append(rec)
    return tuple(out)


def _score(sessions: tuple[Recorded, ...], key: tuple[Stage, int]) -> tuple[int, int, int, Array]:
    """(decoys, rows called decoys, true decoys among them, the called real rows' session and position)."""
    masks = decoy_detect.recurring_rows([s[key][0] for s in sessions])
    truth = np.concatenate([s[key][1] for s in sessions])
    called = np.concatenate(masks)
    wrong = [
        (k, int(pos)) for k, (s, m) in enumerate(zip(sessions, masks, strict=True)) for pos in s[key][2][m]
    ]
    wrong = [(k, pos) for k, pos in wrong if pos >= 0]
    return int(truth.sum()), int(called.sum()), int((called & truth).sum()), np.asarray(wrong, dtype=np.int64)


def _shares_calibration_prefix(master: int, ids: tuple[int, ...], pos: int) -> bool:
    """Whether prompt ``ids`` up to ``pos`` is the prefix of a window of the client's calibration text: its
    row at ``pos`` is then a pool row, equal to a decoy wherever another session drew that pool row."""
    text = secret_calibration_tokens(_client_keys(master), VOCAB)
    return any(tuple(text[w : w + pos + 1]) == ids[: pos + 1] for w in range(0, POOL, WINDOW))


def _table(level: Level, master: int, prompts: tuple[tuple[int, ...], ...], keys: Any) -> dict[Any, Any]:
    """Precision and recall of "recurs in another session ⇒ decoy" for the first S sessions, S in SESSIONS,
    printed; returned by (stage, layer, S)."""
    sessions = _record(level, master, prompts)
    print(f"\nlevel {level}: recurs in another session ⇒ decoy (r = {R} of {N + R} rows, pool {POOL})")
    print("  stage  layer   S  decoys  called  right  precision  recall  expected recall")
    out = {}
    for stage, layer in keys:
        for s in SESSIONS:
            decoys, called, right, wrong = _score(sessions[:s], (stage, layer))
            precision = right / called if called else float("nan")
            out[(stage, layer, s)] = (decoys, called, right, wrong)
            print(
                f"  {stage.value:5}  {layer:5}  {s:2}  {decoys:6}  {called:6}  {right:5}  {precision:9.3f}  "
                f"{right / decoys:6.3f}  {_expected_recall(s):15.3f}"
            )
    return out


# -- the function --------------------------------------------------------------------------------------


def test_recurring_rows_marks_rows_seen_in_another_session() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [5.0, 6.0]])
    b = np.array([[3.0, 4.0], [7.0, 8.0], [-0.0, 1.0]])
    c = np.array([[0.0, 1.0], [1.0, 2.0 + 1e-9]])
    masks = decoy_detect.recurring_rows([a, b, c])
    # [5, 6] twice in a alone is no recurrence; −0 equals +0; 2 + 1e-9 ≠ 2 exactly
    assert [m.tolist() for m in masks] == [[False, True, False, False], [True, False, True], [True, False]]
    assert all(m.dtype == np.bool_ for m in masks)
    near = decoy_detect.recurring_rows([a, b, c], tol=1e-9)  # ‖Δ‖ = 1e-9 ≤ 1e-9·√5
    assert [m.tolist() for m in near] == [[True, True, False, False], [True, False, True], [True, True]]
    # the relative distance is scale-free: rows of ~1e300 (whose squared norms overflow) and ~1e-300
    for scale in (1e300, 1e-300):
        assert [m.tolist() for m in decoy_detect.recurring_rows([a * scale, c * scale], tol=1e-9)] == [
            [True, False, False, False],
            [False, True],
        ]
    (alone,) = decoy_detect.recurring_rows([a])  # one session: nothing to recur in
    assert alone.shape == (4,) and not alone.any()
    assert decoy_detect.recurring_rows([]) == []
    assert [m.tolist() for m in decoy_detect.recurring_rows((a, np.zeros((0, 2)), a[:1]))] == [
        [True, False, False, False],
        [],
        [True],
    ]


@pytest.mark.parametrize(
    "rows, tol, error",
    [
        (np.zeros((2, 3, 4)), 0.0, ConfigError),  # a numpy array, not a sequence of sessions
        ("ab", 0.0, ConfigError),
        ({0: np.zeros((1, 2))}, 0.0, ConfigError),  # a mapping
        ([np.zeros((1, 2))], -1e-3, ConfigError),
        ([np.zeros((1, 2))], float("nan"), ConfigError),
        ([np.zeros((1, 2))], True, ConfigError),
        ([np.zeros((1, 2)), np.zeros((1, 3))], 0.0, ShapeError),  # widths differ
        ([np.zeros(2)], 0.0, ShapeError),  # not rows × width
        ([np.zeros((1, 2)), np.array([[1.0, np.nan]])], 0.0, NonFiniteError),
        ([np.zeros((1, 2)), np.array([[1.0, np.inf]])], 1e-3, NonFiniteError),
        ([np.array([["a", "b"]])], 0.0, DTypeError),
    ],
)
def test_recurring_rows_checks_its_arguments(rows: Any, tol: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        decoy_detect.recurring_rows(rows, tol)


# -- the measurement -----------------------------------------------------------------------------------


def test_decoys_recur_across_one_clients_sessions_at_level_permute() -> None:
    """Level permute, one master secret, 40 sessions. Observed (seed 7; S = 2, 5, 10, 40), at every stage
    past block 1's QKV stage: recall 0.00–0.12, 0.05–0.15, 0.13–0.40, 0.70–0.74 (0.67–0.75 with the texts
    keyed by the client's nonce since) (expected 0.03, 0.12, 0.25, 0.71; block 2's QKV rows carry block
    1's FFN decoys, so their numbers agree); precision 1.000. A real row is called a decoy only where its
    prompt's prefix is a prefix of a window of the calibration text: such a row *is* a pool row (seen
    once in 12 × 5 stage measurements: one prompt's first token started a window). Margins: over 12 other
    seeds (levels permute and paper) the recall at S = 40 ranged 0.66–0.77 (binomial sd at 320 decoys
    √(0.71·0.29/320) ≈ 0.025) and precision ≥ 0.995; the mean over the five stages of the recall at S =
    10 0.22–0.30. Asserted: recall(40) > 0.55 at every stage (> 6 sd below 0.71), their mean within 0.71
    ± 0.06; the mean recall(10) in [0.15, 0.35]; precision ≥ 0.95; every real row called a decoy shares a
    calibration window's prefix (so the rule's only errors are rows that equal a pool row)."""
    prompts = _prompts(max(SESSIONS), seed=7)
    out = _table("permute", 0, prompts, STAGES[1:])
    _check_past_block_1(out, prompts)


def _check_past_block_1(out: dict[Any, Any], prompts: tuple[tuple[int, ...], ...]) -> None:
    recall = {
        s: [out[(key[0], key[1], s)][2] / out[(key[0], key[1], s)][0] for key in STAGES[1:]] for s in SESSIONS
    }
    assert min(recall[40]) > 0.55
    assert abs(float(np.mean(recall[40])) - _expected_recall(40)) < 0.06
    assert 0.15 <= float(np.mean(recall[10])) <= 0.35
    for key in STAGES[1:]:
        _, called, right, wrong = out[(key[0], key[1], 40)]
        assert right / called >= 0.95
        for k, pos in wrong:
            assert _shares_calibration_prefix(0, prompts[k], pos)


def test_decoys_recur_at_level_paper_past_block_1s_qkv_stage() -> None:
    """Level paper: block 1's QKV stage is noised afresh per request, so no row recurs there (exactly);
    every later stage is as at level permute. Observed (seed 8): no row of block 1's QKV stage recurs at any
    S; elsewhere recall at S = 40 0.68–0.72, precision 1.000. Asserted as at level permute."""
    prompts = _prompts(max(SESSIONS), seed=8)
    out = _table("paper", 0, prompts, STAGES)
    for s in SESSIONS:
        assert out[(Stage.QKV, 0, s)][1] == 0  # noised: no row is seen twice
    _check_past_block_1(out, prompts)


def test_locked_key_cache_decoys_recur_at_every_level() -> None:
    """The locked key caches (post-RoPE keys of the last guard blocks with r_lock pool decoys, DESIGN §5.1
    step 6) are sent un-noised at every level, so their decoys recur even at level blind, where every
    linear stage is noised and nothing else recurs. Observed (seed 10, S = 20, last block): level paper
    77, level blind 69 of 160 (64 and 68 with the texts keyed by the client's nonce since) decoys found
    with no real row called (expected 1 − (1 − 8/256)¹⁹ ≈ 0.45 of them: 72; binomial sd ≈ 6.3); at level
    blind no QKV, O or FFN row of blocks 1–2 recurs. Asserted: more than 0.25 of the locked decoys found
    (> 5 sd below 0.45) at precision 1, and none of the blind stages' rows recurring."""
    prompts = _prompts(20, seed=10)
    print("\nlocked key caches (last block), 20 sessions of one client:")
    for level in ("paper", "blind"):
        sessions = _record(level, 0, prompts)
        decoys, called, right, _ = _score(sessions, LOCK)
        print(f"  level {level}: {right} of {decoys} decoys found, {called - right} real rows called")
        assert right / decoys > 0.25
        assert called == right
    blind = _record("blind", 0, prompts)
    for key in STAGES:
        assert _score(blind, key)[1] == 0


def test_no_row_recurs_between_clients_of_different_master_secrets() -> None:
    """The control: two clients (two master secrets, two pools), 10 sessions each, prompts without a shared
    prefix. Across the two clients no row recurs past block 1's QKV stage — decoy or real — while within
    each client the same rule finds about 1 − (1 − 8/256)⁹ ≈ 0.25 of the decoys (observed 0.19–0.30 per
    stage). Asserted: no cross-client recurrence; within-client recall > 0.1 summed over the five stages
    (400 decoys per client, sd ≈ 0.02: > 7 sd below 0.25)."""
    prompts = _prompts(20, seed=9)
    clients = [_record("permute", m, prompts[10 * m : 10 * m + 10]) for m in (0, 1)]
    print("\ntwo master secrets, 10 sessions each (level permute):")
    for stage, layer in STAGES[1:]:
        both = [np.concatenate([s[(stage, layer)][0] for s in c]) for c in clients]
        across = decoy_detect.recurring_rows(both)
        within = [_score(c, (stage, layer)) for c in clients]
        print(
            f"  {stage.value:5} {layer}: rows seen by both clients {sum(int(m.sum()) for m in across)}; "
            f"within each client, decoys found {[w[2] for w in within]} of {[w[0] for w in within]}"
        )
        assert not any(m.any() for m in across)
    for c in clients:
        found = sum(_score(c, key)[2] for key in STAGES[1:])
        total = sum(_score(c, key)[0] for key in STAGES[1:])
        assert found / total > 0.1


def test_block_1_rows_recur_for_shared_tokens_too() -> None:
    """Block 1's QKV stage at level permute: a real row there is its token's embedding row, which recurs
    whenever two prompts share a token — Zipf prompts share many — so "recurs ⇒ decoy" tells nothing there
    (the frequency prior and vocabulary matching, tests/test_unigram_decoys.py, are the attacks for block
    1). Observed (seed 7, S = 40): 489 of 640 real rows and 244 of 320 decoys recur: precision 0.333, chance
    (calling rows at random) 8 / 24 = 0.333; over 6 other seeds precision 0.327–0.341, real rows recurring
    0.72–0.76. Asserted: precision < 0.42 (sd ≈ √(0.33·0.67/733) ≈ 0.017: 5 sd above chance, against the
    ≥ 0.95 past block 1) and more than 0.6 of the real rows recurring."""
    out = _table("permute", 0, _prompts(max(SESSIONS), seed=7), STAGES[:1])
    _, called, right, _ = out[(Stage.QKV, 0, 40)]
    assert right / called < 0.42
    assert (called - right) / (N * 40) > 0.6


# -- the client's pool now: no row handed out twice -------------------------------------------------------


@pytest.mark.parametrize("level", ["permute", "paper", "blind"])
def test_the_clients_own_pool_hands_out_no_decoy_twice(level: Level) -> None:
    """The same 40 sessions of one client with its default pool (``CalibrationPool.secret``): no pool row
    is handed out twice, at any stage past block 1's QKV stage nor in the locked key caches — 40 × 8 = 320
    draws of a (stage, layer) exceed the 256-row pool, so its second epoch (a new secret text) is drawn
    too. Before, with the same sessions, 0.67–0.75 of the decoys recurred (the tests above). What may
    still recur is a row whose prefix is one token, at the start of one of the text's 32-token windows:
    it is that token's row at position 0, which another window or a prompt starting with the same token
    has too (observed: 1 or 2 of the 2 240 decoys of the seven stages at level permute, none at paper and
    blind). Asserted: every decoy seen in another session is such a row."""
    b, _ = _world()
    prompts = _prompts(max(SESSIONS), seed=7)
    sessions = _record(level, 0, prompts, reuse=False)
    epochs = [
        CalibrationPool.from_tokens(b, secret_calibration_tokens(_client_keys(0), VOCAB, epoch=e))
        for e in (0, 1)
    ]
    found = 0
    for key in (*STAGES[1:], LOCK):
        starts = {
            row.tobytes() for p in epochs for row in np.asarray(p.rows[key], np.float64)[::WINDOW] + 0.0
        }
        masks = decoy_detect.recurring_rows([s[key][0] for s in sessions])
        for s, mask in zip(sessions, masks, strict=True):
            rows, decoy, _ = s[key]
            for row in rows[mask & decoy]:
                found += 1
                assert (row + 0.0).tobytes() in starts, key
        assert sum(int(s[key][1].sum()) for s in sessions) == 40 * R
    print(f"\nlevel {level}, the client's own pool: {found} decoys seen in another session (window starts)")


def test_a_secret_pool_moves_to_its_next_epoch_when_its_rows_run_out() -> None:
    """``CalibrationPool.secret``: each (stage, layer)'s rows go to one message each; the draw that finds
    too few left builds every stage again from the next epoch's text (another secret text: no row shared).
    A plain pool of the same text draws independently (rows repeat across messages)."""
    from scx_ref.keys import KeyStream

    b, _ = _world()
    keys = _client_keys(5)
    pool = CalibrationPool.secret(b, keys)
    first = {k: v.copy() for k, v in pool.rows.items()}
    size = first[(Stage.FFN, 1)].shape[0]
    stream: KeyStream = keys.stream(("test-draws",))
    seen = [pool.draw(Stage.FFN, 1, R, np.zeros((0, 1)), stream) for _ in range(size // R)]
    rows = np.concatenate(seen)
    assert pool.epoch == 0 and len({r.tobytes() for r in rows}) == len(rows)  # no row twice in epoch 0
    more = pool.draw(Stage.FFN, 1, size % R + R, np.zeros((0, 1)), stream)  # more than are left: epoch 1
    assert pool.epoch == 1
    old = {r.tobytes() for r in first[(Stage.FFN, 1)]}
    assert not any(r.tobytes() in old for r in more)
    old_qkv = {r.tobytes() for r in first[(Stage.QKV, 1)]}  # every stage was built again
    assert not any(r.tobytes() in old_qkv for r in pool.rows[(Stage.QKV, 1)])
    plain = CalibrationPool.from_tokens(b, secret_calibration_tokens(keys, VOCAB))
    np.testing.assert_array_equal(plain.rows[(Stage.FFN, 1)], first[(Stage.FFN, 1)])
    again = np.concatenate([plain.draw(Stage.FFN, 1, R, np.zeros((0, 1)), stream) for _ in range(size // R)])
    assert len({r.tobytes() for r in again}) < len(again)  # independent draws repeat rows


def test_precompute_builds_the_next_epoch_ahead_of_the_request() -> None:
    """A client that derives its next request ahead (``Client.precompute``, which draws the request's
    decoys) builds the pool's next epoch there, off the critical path: after 256 / 8 = 32 prefills every
    row is spent, and the precompute of the 33rd request moves the pool to epoch 1 before its prefill."""
    b, server = _world()
    cfg = SCXConfig(level="permute", r1=R, r2=R, l_s=2, l_e=2)
    client: Client[Any] = Client(b, _client_keys(9), cfg)
    pool = client.decoys
    assert isinstance(pool, CalibrationPool) and all(t.shape[0] == POOL for t in pool.rows.values())
    prompts = _prompts(POOL // R + 1, seed=11)
    for ids in prompts[:-1]:
        client.prefill(np.asarray(ids, dtype=np.int64), LocalTransport(server))
    assert pool.epoch == 0
    client.precompute(N)
    assert pool.epoch == 1
    client.prefill(np.asarray(prompts[-1], dtype=np.int64), LocalTransport(server))
    assert pool.epoch == 1


def test_a_secret_pool_says_how_many_requests_an_epoch_serves_and_what_the_next_costs() -> None:
    """``refill_every``: None before the first draw and for a pool that is never built again; after one
    request with r₁ = r₂ = R, POOL // R — exactly the prefills after which the next request builds epoch 1
    (one more prefill each: epoch 0 until then). With r₂ = 2R the O stage's rows run out first: POOL // 2R.
    ``time_refill`` builds the next epoch, returns its seconds and leaves the pool as it was."""
    b, _ = _world()
    for r2, every in ((R, POOL // R), (2 * R, POOL // (2 * R))):
        client: Client[Any] = Client(
            b, _client_keys(13), SCXConfig(level="permute", r1=R, r2=r2, l_s=2, l_e=2)
        )
        pool, server = client.decoys, Server(b)  # its own server: each client opens nonce 0 first
        assert isinstance(pool, CalibrationPool) and pool.refill_every() is None
        prompts = _prompts(every + 1, seed=17)
        for i, ids in enumerate(prompts):
            client.prefill(np.asarray(ids, dtype=np.int64), LocalTransport(server))
            assert pool.refill_every() == every
            assert pool.epoch == (1 if i == every else 0), (r2, i)
        rows, used, epoch = dict(pool.rows), {k: v.copy() for k, v in pool._used.items()}, pool.epoch
        seconds = pool.time_refill()
        assert seconds is not None and seconds > 0
        assert pool.epoch == epoch and all(pool.rows[k] is v for k, v in rows.items())
        assert pool._used.keys() == used.keys() and all(
            np.array_equal(pool._used[k], v) for k, v in used.items()
        )
    plain = CalibrationPool.from_tokens(b, secret_calibration_tokens(_client_keys(13), VOCAB))
    assert plain.refill_every() is None and plain.time_refill() is None

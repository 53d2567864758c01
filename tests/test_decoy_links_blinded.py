"""Decoy links where a block's QKV, O and FFN stages are all blinded (level ``blind``):
``decoy_detect.blinded_links`` pairs FFN rows with QKV rows by their centred inner products and calls the n
best pairs real. On synthetic rows it finds every pair when the noise is small and falls to chance when the
noise swamps the rows; on real SCX requests of the tiny model it tells decoys apart at β = 0.01 and no better
than chance at β = 5 (SmolLM2: ``models/blind_links.py``, README "Privacy, measured")."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scx_ref.attacks._model import forward_trace
from scx_ref.attacks._view import stage_array
from scx_ref.attacks.decoy_detect import blinded_links
from scx_ref.attacks.harness import run_request
from scx_ref.errors import ConfigError, NonFiniteError, ShapeError
from scx_ref.protocol import Stage
from scx_ref.protocol.presets import PAPER_CONFIG, preset
from scx_ref.zoo import load_weights
from tests.tiny import tiny_weights


def _synthetic(
    noise: float, n: int = 12, r: int = 6, d: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """n real rows X (QKV) and X + a small update (FFN), r independent decoys in each message, all plus
    Gaussian noise of scale ``noise``; the real rows first."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    ffn = x + 0.2 * rng.standard_normal((n, d))
    q = np.concatenate([x, rng.standard_normal((r, d))]) + noise * rng.standard_normal((n + r, d))
    f = np.concatenate([ffn, rng.standard_normal((r, d))]) + noise * rng.standard_normal((n + r, d))
    return q, f


def test_small_noise_links_every_real_row_and_no_decoy_whatever_the_order() -> None:
    """Every real row of both messages called real and every decoy a decoy, and the masks follow the rows
    when each message is shuffled (the attack reads values, not positions)."""
    n, r = 12, 6
    q, f = _synthetic(0.05, n, r)
    q_real, f_real = blinded_links(q, f, n)
    assert q_real.tolist() == [True] * n + [False] * r and f_real.tolist() == q_real.tolist()
    rng = np.random.default_rng(1)
    pq, pf = rng.permutation(n + r), rng.permutation(n + r)
    q2, f2 = blinded_links(q[pq], f[pf], n)
    assert np.array_equal(q2, q_real[pq]) and np.array_equal(f2, f_real[pf])


def test_swamping_noise_links_near_chance() -> None:
    """Noise 30 times the rows' scale: over 40 draws the decoys called decoys average near chance r / (n + r)
    = 1/3 (the small-noise case above: 1)."""
    n, r = 12, 6
    rejected = []
    for seed in range(40):
        q, f = _synthetic(30.0, n, r, seed=seed)
        q_real, f_real = blinded_links(q, f, n)
        rejected.append(((~q_real[n:]).mean() + (~f_real[n:]).mean()) / 2)
    assert 0.2 < float(np.mean(rejected)) < 0.5


def test_refusals_and_no_rows() -> None:
    """Rows of two widths, an n larger than a message, a negative or a non-integer n, NaN rows; n = 0 calls
    nothing real."""
    q, f = _synthetic(0.05)
    with pytest.raises(ShapeError):
        blinded_links(q, f[:, :10], 4)
    with pytest.raises(ConfigError, match="more than the 18 rows"):
        blinded_links(q, f, 19)
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError):
            blinded_links(q, f, bad)  # type: ignore[arg-type]
    nan = q.copy()
    nan[0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        blinded_links(nan, f, 4)
    q0, f0 = blinded_links(q, f, 0)
    assert not q0.any() and not f0.any() and q0.shape == (18,) and f0.shape == (18,)


@pytest.mark.parametrize(("beta", "low", "high"), [(0.01, 0.5, 1.0), (5.0, 0.0, 0.45)])
def test_real_blinded_requests_of_the_tiny_model(beta: float, low: float, high: float) -> None:
    """Level blind, r₁ = r₂ = 4, the tiny model's second block (a guard: its three stages blinded), token
    permutations the identity so the first n rows are the real ones: the decoys called decoys over three
    16-token prompts, against chance 4 / 20 = 0.2 — well above it at β = 0.01, not at β = 5."""
    w = load_weights("tiny-llama")
    cfg = replace(PAPER_CONFIG, level="blind", beta=beta, r1=4, r2=4, l_s=2)
    rng = np.random.default_rng(7)
    public = rng.integers(0, w.config.vocab_size, 300)
    rejected = []
    for seed in range(3):
        ids = rng.integers(0, w.config.vocab_size, 16)
        view = run_request(w, ids, cfg, frozenset({"tok"}), seed=seed, public=public).view
        q_real, f_real = blinded_links(stage_array(view, Stage.QKV, 1), stage_array(view, Stage.FFN, 1), 16)
        rejected.append(((~q_real[16:]).mean() + (~f_real[16:]).mean()) / 2)
    assert low <= float(np.mean(rejected)) <= high


def test_request_token_perms_are_the_truth_of_every_message() -> None:
    """RequestRun.token_perms, the truth the harness scores decoy detection by: under level permute with
    decoys (real permutations), row j of block i's QKV message is a real row iff π_i[j] < n, and of its FFN
    message iff π_{i+1}[j] < n — checked against the plaintext rows themselves in every block."""
    w = load_weights("tiny-llama")
    cfg = replace(PAPER_CONFIG, level="permute", r1=4, r2=4, r_lock=None)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, w.config.vocab_size, 12)
    run = run_request(w, ids, cfg, seed=5, public=rng.integers(0, w.config.vocab_size, 300))
    trace = forward_trace(w, ids, logits=False)
    n, L = len(ids), w.config.n_layers
    assert len(run.token_perms) == L + 1
    for i in range(L):
        for stage, rows, perm in (
            (Stage.QKV, trace.x[i], run.token_perms[i]),
            (Stage.FFN, trace.h[i], run.token_perms[i + 1]),
        ):
            got = stage_array(run.view, stage, i)
            assert not np.array_equal(perm, np.arange(n + 4)), "the permutation must not be the identity"
            # each message row against the plaintext row of the token π puts there (decoys: none close)
            for j, t in enumerate(perm):
                close = bool(np.allclose(got[j], rows[t], rtol=1e-9, atol=1e-9)) if t < n else False
                assert close == (t < n), (stage, i, j)


def test_harness_scores_the_blinded_link_under_real_permutations() -> None:
    """The harness's ``decoy_blind_link_*`` values (the last block, truth from the token permutations) on
    real permuted requests of level blind: far above chance (r / (n + r) = 0.2 of decoys rejected) at
        β = 0.01 — a wrong truth would read near chance — and a ShapeError for permutations that are not the
    messages'."""
    from scx_ref.attacks.harness import _score_blinded_link, _Tally

    w = load_weights("tiny-llama")
    rng = np.random.default_rng(11)
    public = rng.integers(0, w.config.vocab_size, 300)
    L = w.config.n_layers
    tally = _Tally()
    for seed in range(3):
        ids = rng.integers(0, w.config.vocab_size, 16)
        cfg = replace(PAPER_CONFIG, level="blind", beta=0.01, r1=4, r2=4, l_s=2)
        run = run_request(w, ids, cfg, seed=seed, public=public)
        _score_blinded_link(tally, run.view, run.token_perms, L - 1, 16)
    # the messages' truth swapped (π_L for the QKV rows, π_{L-1} for the FFN rows) reads 0.33 and 0.83 here
    assert float(np.mean(tally.values["decoy_blind_link_decoys_rejected"])) >= 0.9
    assert float(np.mean(tally.values["decoy_blind_link_real_found"])) >= 0.95
    with pytest.raises(ShapeError, match="permutations"):
        _score_blinded_link(tally, run.view, (*run.token_perms[::-1][:L], np.arange(3)), L - 1, 16)


def test_blind_links_presets_score_the_blinded_guard_blocks(tmp_path: Path) -> None:
    """``models.blind_links --presets``: each preset at its own β and r, scored at the guard blocks among
    {0, 1, L // 2, L − 1} whose QKV and FFN stages are both blinded — every one of them for ``hardened``
    (every block a guard), the first and last for ``blind`` (its middle blocks' blinding is revealed at key
    sharing), none for ``paper`` (its FFN stages are clear); the JSON rows name their preset."""
    import argparse

    from models import blind_links

    four = tiny_weights(3).config  # four blocks: level blind's blocks 1 and 2 are middle blocks

    def blocks(name: str) -> list[int]:
        ((_, cfg, got),) = blind_links._jobs(argparse.Namespace(presets=[name]), four)
        assert cfg.beta == preset(name).config(four.n_layers).beta
        return got

    assert four.n_layers == 4
    assert blocks("hardened") == [0, 1, 2, 3]
    assert blocks("blind") == [0, 3]
    assert blocks("paper") == []
    w = load_weights("tiny-llama")
    L = w.config.n_layers
    with pytest.raises(argparse.ArgumentTypeError, match="'nope'; choose from"):
        blind_links.preset_list("hardened,nope")
    out = tmp_path / "rows.json"
    argv = ["--model", "tiny-llama", "--presets", "hardened-b100", "--prompts", "1", "--length", "6"]
    assert blind_links.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["beta"], r["block"]) for r in rows] == [
        ("hardened-b100", 100.0, b + 1) for b in sorted({0, 1, L // 2, L - 1})
    ]
    assert all(0.0 <= r["decoys_rejected"] <= 1.0 and r["chance_rejected"] == 4 / 10 for r in rows)

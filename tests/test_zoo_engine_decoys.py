"""The zoo engines (``scx verify``, ``scx ppl``, the frontier's runs — with ``--server``, a remote server)
draw their decoys from a pool built from the run's *secret* calibration text, not a public one.

Before: the engines built their pool from :func:`~scx_ref.protocol.decoys.default_public_tokens` (a fixed,
public pseudo-text). A server holding the weights rebuilds that pool and finds every decoy in it verbatim
(stop 61's measurement), so a user checking exactness against a remote server sent it its decoys' identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scx_ref.protocol.decoys import CalibrationPool, default_public_tokens, secret_calibration_tokens
from scx_ref.stages import Stage
from scx_ref.zoo.engines import scx_config, scx_generate, scx_logits
from tests.tiny import tiny_weights


def _rows(pool: Any) -> np.ndarray:
    return np.asarray(pool.rows[(Stage.QKV, 0)])


def test_an_engines_pool_is_built_from_its_own_secret_text_not_the_public_one() -> None:
    w = tiny_weights(3)
    cfg = scx_config("permute", 1.0, max_length=16)
    for make in (scx_logits, scx_generate):
        with make(w, "float64", cfg) as engine:
            scx = engine._scx
            assert scx.pool is not None
            secret = CalibrationPool.from_tokens(
                scx.backend, secret_calibration_tokens(scx.keys, w.config.vocab_size)
            )
            public = CalibrationPool.from_tokens(scx.backend, default_public_tokens(w.config.vocab_size))
            np.testing.assert_array_equal(_rows(scx.pool), _rows(secret))
            # the public pool's block-1 rows (embeddings of the public text) are not what the engine draws
            assert not np.array_equal(_rows(scx.pool), _rows(public))


def test_two_engines_draw_from_different_pools() -> None:
    """Each run has its own master secret, so its own pool (the same text would be a public one)."""
    w = tiny_weights(3)
    cfg = scx_config("permute", 1.0, max_length=16)
    with scx_logits(w, "float64", cfg) as a, scx_logits(w, "float64", cfg) as b:
        assert not np.array_equal(_rows(a._scx.pool), _rows(b._scx.pool))
        ids = np.array([1, 2, 3, 4])
        np.testing.assert_allclose(a(ids), b(ids), rtol=1e-12, atol=1e-12)  # both exact all the same

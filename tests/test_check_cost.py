"""``models.check_cost``: its arms change only what they say (the ``passed`` arm only the reply checks'
verdicts), and its options are checked before any model loads."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest

from scx_ref.backends import cpu_kernels

MASTER, NONCE = bytes(range(1, 33)), bytes(range(16))


def _session() -> tuple[object, object, np.ndarray]:
    """A backend, a function making a client (each with its own record of used nonces, the same master
    secret: a prefill under NONCE then draws the same keys, so two runs compute the same products), and
    a prompt."""
    from scx_ref.commands.bench import build_models
    from scx_ref.keys import KeySchedule
    from scx_ref.protocol import Client, SCXConfig

    backend, _, _ = build_models("smollm2-depth-random", "float32", "cpu")
    cfg = SCXConfig(level="permute", max_length=64, verify=True)

    def client() -> object:
        return Client(backend, KeySchedule(MASTER, NONCE), cfg)

    ids = np.random.default_rng(1).integers(0, backend.config.vocab_size, size=12)
    return backend, client, ids


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="needs the fused CPU kernels (numba)")
def test_the_passed_arm_changes_only_the_verdicts() -> None:
    """Against an honest server the passed arm's logits are the checked arm's, bit for bit; against a server
    that changes one entry of a reply, the checked arm refuses and the passed arm does not (its verdicts
    are really bypassed: what it removes is the checks' work)."""
    from models.check_cost import VERDICTS, passing
    from scx_ref.attacks.active import TamperingTransport
    from scx_ref.errors import IntegrityError
    from scx_ref.protocol import LocalTransport, Server
    from scx_ref.protocol.messages import Reply, Request
    from scx_ref.stages import Stage

    backend, client, ids = _session()
    loaded = cpu_kernels.kernels()
    passed = dataclasses.replace(loaded, **{k: passing(v) for k, v in VERDICTS.items()})
    checked_logits = np.asarray(client().prefill(ids, LocalTransport(Server(backend)), nonce=NONCE))
    with cpu_kernels.replaced(passed):
        passed_logits = np.asarray(client().prefill(ids, LocalTransport(Server(backend)), nonce=NONCE))
    assert np.array_equal(checked_logits, passed_logits)

    def tampering() -> TamperingTransport:
        """An honest server behind a link that scales the first MLP reply by 1.01."""
        seen = {"n": 0}

        def tamper(req: Request, reply: Reply) -> Reply:
            if req.stage is not Stage.FFN or seen["n"]:
                return reply
            seen["n"] += 1
            return replace(reply, arrays={k: v * 1.01 for k, v in reply.arrays.items()})

        return TamperingTransport(LocalTransport(Server(backend)), tamper)

    with pytest.raises(IntegrityError):
        client().prefill(ids, tampering(), nonce=NONCE)
    with cpu_kernels.replaced(passed):
        client().prefill(ids, tampering(), nonce=NONCE)


def test_check_cost_refuses_bad_options_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from models.check_cost import main

    for argv in (["--n", "0"], ["--n", "5000"], ["--rounds", "0"], ["--threads", "x"], ["--model", "nope"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "reply checks" in capsys.readouterr().out

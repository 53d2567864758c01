"""A wide session over ``scx serve``'s transport (stop 70): a float32 client whose blinded messages travel in
float64 (``SCXConfig.blind_dtype="auto"`` above float32's β limit — since stop 70 every preset's β = 5).

``RemoteTransport`` converted every reply to the client backend's dtype, so a wide reply came back float32
and the client refused it ("reply z is torch.float32, coarser than the session's torch.float64"): every
float32 ``scx generate --server`` at the default level failed before its first token. A wide request's reply
is now converted by the backend's float64 twin, and must have travelled as float64."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("grpc")

from scx_ref.backends import NumpyBackend
from scx_ref.errors import IntegrityError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, SCXConfig, Server
from scx_ref.protocol.messages import Reply, Request
from scx_ref.protocol.presets import preset
from scx_ref.reference import ReferenceModel
from scx_ref.service import RemoteTransport
from scx_ref.stages import Stage

from .services import InProcess
from .tiny import tiny_weights

MASTER = bytes(range(32))
PROMPT = np.array([3, 9, 1, 7, 4, 2])


@pytest.fixture(scope="module")
def served() -> Iterator[InProcess]:
    srv = InProcess(backend=NumpyBackend(tiny_weights(3).astype(np.float32), np.float32))
    yield srv
    srv.stop()


def _configs() -> list[SCXConfig]:
    base = [SCXConfig(level=lv, beta=5.0, max_length=16) for lv in ("paper", "blind")]
    hardened = preset("hardened").config(tiny_weights(3).config.n_layers)
    return [*base, SCXConfig(**{**hardened.to_dict(), "max_length": 16})]


@pytest.mark.parametrize(("i", "cfg"), list(enumerate(_configs())), ids=["paper", "blind", "hardened"])
def test_a_wide_float32_session_over_the_wire_equals_the_local_one(
    served: InProcess, i: int, cfg: SCXConfig
) -> None:
    b = NumpyBackend(tiny_weights(3).astype(np.float32), np.float32)
    nonce = bytes([i + 1]) * 16  # one per configuration: the server refuses a reused nonce
    remote = Client(b, KeySchedule(MASTER, nonce), cfg)
    assert remote.wide  # β = 5 > float32's limit: the blinded stages travel in float64
    with RemoteTransport(served.url, b, timeout=20.0) as link:
        got = remote.generate(PROMPT, 4, link)
    local_b = NumpyBackend(tiny_weights(3).astype(np.float32), np.float32)
    local = Client(local_b, KeySchedule(MASTER, nonce), cfg)
    want = local.generate(PROMPT, 4, LocalTransport(Server(local_b)))
    assert got == want == ReferenceModel(tiny_weights(3)).generate(PROMPT, 4)


def test_a_wide_requests_reply_must_travel_as_float64(served: InProcess) -> None:
    """A server answering a wide request in float32 is refused before the reply is widened (after it, the
    client's own check would see float64 and could not tell the rounding)."""
    b = NumpyBackend(tiny_weights(3).astype(np.float32), np.float32)
    link = RemoteTransport(served.url, b, timeout=20.0)
    try:
        wide = Request("ab" * 16, Stage.QKV, 0, -1, 1, {}, {"wide": True})
        narrow = Request("ab" * 16, Stage.QKV, 0, -1, 1, {}, {})
        f32 = Reply("ab" * 16, Stage.QKV, 0, -1, 1, {"z": np.zeros((2, 3), np.float32)}, {})
        f64 = Reply("ab" * 16, Stage.QKV, 0, -1, 1, {"z": np.zeros((2, 3), np.float64)}, {})
        with pytest.raises(IntegrityError, match="travelled as <f4"):
            link._check_dtypes(f32, link._reply_ops(wide))
        link._check_dtypes(f64, link._reply_ops(wide))  # float64 answers a wide request
        link._check_dtypes(f32, link._reply_ops(narrow))  # float32 answers a float32 session's own
        assert link._reply_ops(wide).numpy_dtype() == np.float64 and link._reply_ops(narrow) is b
    finally:
        link.close()

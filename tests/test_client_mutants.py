"""What the mutants of ``scx_ref/protocol/client.py`` showed untested (``python -m mutation.run client``):
the client's argument checks and the bookkeeping around its sessions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scx_ref.errors import ProtocolError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import client as client_module
from tests.refusals import refused


@pytest.mark.parametrize(
    ("link", "name"),
    [(object(), "object"), (SimpleNamespace(send=1), "SimpleNamespace"), (None, "NoneType")],
    ids=["no-send", "send-not-callable", "none"],
)
def test_a_link_without_a_callable_send_is_refused_by_its_type_name(link: object, name: str) -> None:
    with refused(ProtocolError, f"link must be a Transport (with a send method), got {name}"):
        client_module._check_link(link)
    client_module._check_link(SimpleNamespace(send=lambda message: message))  # a callable send passes


def test_two_schedules_share_a_master_only_when_their_secrets_match() -> None:
    a = KeySchedule.generate()
    assert client_module._same_master(a, a.for_nonce(b"\x01" * 16))
    assert client_module._same_master(a.for_nonce(b"\x02" * 16), a)
    assert not client_module._same_master(a, KeySchedule.generate())

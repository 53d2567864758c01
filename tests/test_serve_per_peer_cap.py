"""``scx serve``'s cap on one client address's sessions (``--max-sessions-per-peer``): ``peer_host`` keeps
the address without its port, ``ServeOptions`` and the command line check the cap, and a server refuses
one address past its cap (and serves it again below it) while it has room for others."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from scx_ref.cli import main
from scx_ref.errors import ConfigError, ServiceError
from scx_ref.service import RemoteTransport
from scx_ref.service.service import ServeOptions, peer_host

from .test_service_hostile import TIMEOUT, InProcess, honest_session, wait_for


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:51234", "ipv4:127.0.0.1"),
        ("ipv4:10.0.0.7:1", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:%5B::1%5D:51234", "ipv6:[::1]"),
        ("ipv6:%5b::1%5d:51234", "ipv6:[::1]"),  # percent-encoding in lower case
        ("ipv6:[::1]]:51234", "ipv6:[::1]"),  # the address ends at its first bracket
        ("ipv6:[]:51234", "ipv6:[]"),  # an empty address: only the port dropped
        ("other:10.0.0.7:1", "other:10.0.0.7:1"),  # another kind of name, with a port: as it is
        ("ipv6:[fe80::1%25eth0]:443", "ipv6:[fe80::1%25eth0]"),
        ("unix:/run/scx.sock", "unix:/run/scx.sock"),
        ("ipv4:10.0.0.7", "ipv4:10.0.0.7"),  # no port: as it is
        ("ipv4:10.0.0.7:http", "ipv4:10.0.0.7:http"),  # not a port: as it is
        ("ipv4:10.0.0.7:1:2", "ipv4:10.0.0.7:1:2"),  # an IPv4 address holds no colon: malformed, as it is
        ("ipv6:[::1", "ipv6:[::1"),  # malformed: as it is
        # an IPv6 address without brackets: its port cannot be told from its last group, so as it is
        ("ipv6:fe80::1", "ipv6:fe80::1"),
        ("ipv6:fe80::1]:443", "ipv6:fe80::1]:443"),  # a bracket that closes none: as it is
        ("ipv6:%5B::1", "ipv6:%5B::1"),  # an encoded bracket that is never closed: as it is
        ("", ""),
    ],
)
def test_peer_host_drops_only_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_two_ports_of_one_host_share_an_address_and_two_hosts_do_not() -> None:
    assert peer_host("ipv4:10.0.0.7:1000") == peer_host("ipv4:10.0.0.7:2000")
    assert peer_host("ipv4:10.0.0.7:1000") != peer_host("ipv4:10.0.0.8:1000")
    assert peer_host("ipv6:[::1]:1000") != peer_host("ipv4:127.0.0.1:1000")
    # without brackets, two IPv6 hosts that differ only in their last group stay two hosts
    assert peer_host("ipv6:fe80::1") != peer_host("ipv6:fe80::2")


def test_serve_options_check_the_per_peer_cap() -> None:
    """None (the default: no cap) or an integer ≥ 1, stored as int; anything else a ConfigError."""
    assert ServeOptions().max_sessions_per_peer is None
    opts = ServeOptions(max_sessions_per_peer=np.int64(3))
    assert opts.max_sessions_per_peer == 3 and type(opts.max_sessions_per_peer) is int
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ConfigError, match="max_sessions_per_peer"):
            ServeOptions(max_sessions_per_peer=bad)  # type: ignore[arg-type]


def test_the_cli_refuses_a_bad_per_peer_cap_and_documents_it(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "-2", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--model", "random:tiny-dense", "--max-sessions-per-peer", value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "max-sessions-per-peer" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    assert "--max-sessions-per-peer" in capsys.readouterr().out


def test_one_address_is_refused_past_its_cap_and_served_again_below_it() -> None:
    """With a cap of 2, a third stream from 127.0.0.1 is refused ("server full for this address") while
    the server has room (max_sessions 8); once one of the two closes, a new one is served, exactly."""
    srv = InProcess(workers=2, max_sessions=8, max_sessions_per_peer=2)
    try:
        a = RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT)
        b = RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT)
        a._connect()
        b._connect()
        with pytest.raises(ServiceError, match="server full for this address"):
            RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT)._connect()
        a.close()
        wait_for(lambda: len(srv.service.streams) == 1, "a closed stream to be released")
        with RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT) as c:
            assert len(honest_session(srv.backend, c)) == 3
        b.close()
    finally:
        srv.stop()


def test_without_a_cap_one_address_may_fill_the_server() -> None:
    """Control: the default (no per-peer cap) serves three streams from one address."""
    srv = InProcess(workers=2, max_sessions=8)
    try:
        links = [RemoteTransport(srv.url, srv.backend, timeout=TIMEOUT) for _ in range(3)]
        for link in links:
            link._connect()
        wait_for(lambda: len(srv.service.streams) == 3, "three streams")
        for link in links:
            link.close()
    finally:
        srv.stop()

"""Regression tests of stop 62's fixes outside the audited modules: ``scx serve``'s cap on one client
address's sessions (``--max-sessions-per-peer``)."""

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
        ("ipv6:[fe80::1%25eth0]:443", "ipv6:[fe80::1%25eth0]"),
        ("unix:/run/scx.sock", "unix:/run/scx.sock"),
        ("ipv4:10.0.0.7", "ipv4:10.0.0.7"),  # no port: as it is
        ("ipv4:10.0.0.7:http", "ipv4:10.0.0.7:http"),  # not a port: as it is
        ("ipv6:[::1", "ipv6:[::1"),  # malformed: as it is
        ("", ""),
    ],
)
def test_peer_host_drops_only_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_two_ports_of_one_host_share_an_address_and_two_hosts_do_not() -> None:
    assert peer_host("ipv4:10.0.0.7:1000") == peer_host("ipv4:10.0.0.7:2000")
    assert peer_host("ipv4:10.0.0.7:1000") != peer_host("ipv4:10.0.0.8:1000")
    assert peer_host("ipv6:[::1]:1000") != peer_host("ipv4:127.0.0.1:1000")


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


# -- the numpy backend's input check: finiteness in its own dtype -------------------------------------------
def test_an_entry_past_the_backends_range_is_refused_alike() -> None:
    """A float64 array holding 1e300, checked by a float32 backend, became ±inf after the check (numpy
    tested finiteness before its cast; torch after): now both refuse it. Controls: an in-range array is
    accepted and cast; a NaN is refused as before; with ``finite=False`` the caller's own pass decides."""
    import torch

    from scx_ref.backends import NumpyBackend
    from scx_ref.backends.torch_backend import TorchBackend
    from scx_ref.errors import NonFiniteError

    from .tiny import tiny_weights

    w = tiny_weights(0)
    big = np.array([[1.0, 1e300]])
    for backend in (NumpyBackend(w, np.float32), TorchBackend(w, torch.float32)):
        with pytest.raises(NonFiniteError, match="x holds NaN or Inf"):
            backend.check(big, "x", (1, 2))
        ok = backend.check(np.array([[1.0, 2.0]]), "x", (1, 2))
        assert np.array_equal(backend.to_numpy(ok), np.array([[1.0, 2.0]], dtype=np.float32))
        with pytest.raises(NonFiniteError):
            backend.check(np.array([[1.0, np.nan]]), "x", (1, 2))
    got = NumpyBackend(w, np.float32).check(big, "x", (1, 2), finite=False)
    assert got.dtype == np.float32 and np.isinf(got[0, 1])


# -- the scx entry point: --version, and Ctrl-C as one line -------------------------------------------------
def test_scx_version_flag_prints_what_scx_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    from scx_ref import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"scx_ref {__version__}"
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"scx_ref {__version__}"


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KeyboardInterrupt raised inside a command's run (here `scx dp`'s) gave a traceback; now one line
    on stderr and exit code 130. Control: the same command without the interrupt exits 0."""
    from scx_ref.dp import cli as dp_cli

    argv = ["dp", "--sensitivity", "1", "--scale", "2", "--compositions", "3", "--no-pld"]
    assert main(argv) == 0
    capsys.readouterr()

    def interrupted(*_a: object, **_k: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(dp_cli, "run", interrupted)
    parser_run = main(argv)
    err = capsys.readouterr().err
    assert parser_run == 130 and err.strip() == "scx dp: interrupted", err

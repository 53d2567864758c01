"""A library caller of SCXService (no ``scx serve`` checks before it) with a TLS pair gRPC cannot serve."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scx_ref.backends import NumpyBackend
from scx_ref.errors import ServiceError
from scx_ref.protocol import Server
from scx_ref.service.service import SCXService, ServeOptions
from tests.tiny import tiny_weights

pytest.importorskip("grpc")
trustme = pytest.importorskip("trustme")


def test_a_tls_pair_that_does_not_match_is_named_as_a_cause(tmp_path: Path) -> None:
    """``start`` said only "address in use or not an address of this host" when gRPC could not bind with a
    key that is not the certificate's; the message now names the TLS pair as a cause too."""
    paths = {}
    for i in (1, 2):
        issued = trustme.CA().issue_cert("localhost", "127.0.0.1")
        paths[f"cert{i}"], paths[f"key{i}"] = tmp_path / f"cert{i}.pem", tmp_path / f"key{i}.pem"
        issued.cert_chain_pems[0].write_to_path(str(paths[f"cert{i}"]))
        issued.private_key_pem.write_to_path(str(paths[f"key{i}"]))
    backend = NumpyBackend(tiny_weights(3))
    opts = ServeOptions(port=0, ops_port=None, tls_cert=str(paths["cert1"]), tls_key=str(paths["key2"]))
    service = SCXService(Server(backend, limits=opts.server_limits()), opts)
    with pytest.raises(ServiceError, match="TLS certificate and key are not a matching PEM pair"):
        asyncio.run(service.start())

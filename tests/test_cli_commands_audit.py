"""The first commands a user meets (``scx generate``, ``verify``, ``ppl``, ``serve``): an audit's fixes.

* ``--json PATH`` where PATH is a device (``/dev/stdout``), a FIFO or a link to one: the file is written
  whole (a private sibling renamed onto PATH), which put a regular file in the device's place — run as
  root, ``scx ppl --json /dev/stdout`` replaced the system's ``/dev/stdout`` link. Now a usage error before
  any work. A link to a regular file is written through (the rename replaced the link and left the file it
  names as it was).
* ``scx serve --max-sessions`` past int64: the server started, then refused every client's greeting (the
  greeting carries the count; its integers are int64), each client saying "not an SCX server". Now a usage
  error, at the codec's exact bound.
* ``scx generate --tls-ca FILE`` with no PEM certificate in FILE: reported only after the model had loaded,
  as "generation stopped after 0 new token(s)". Now a usage error before any model loads.

Models: none is loaded (every loader is replaced by one that fails the test); ``scx dp`` (no model) writes
the JSON of the write-through test.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from scx_ref.cli import main
from scx_ref.commands._args import output_file
from tests.cli_checks import refuse_work, usage_error


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way the commands load a model or start their run, recorded (and failing the test)."""
    return refuse_work(monkeypatch)


# -- --json onto something that is not a regular file -------------------------------------------------------


@pytest.fixture
def not_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a link to ``/dev/null`` (a device) and a UNIX socket, each in a writable directory."""
    out = {"fifo": tmp_path / "fifo", "device-link": tmp_path / "null", "socket": tmp_path / "sock"}
    os.mkfifo(out["fifo"])
    out["device-link"].symlink_to(os.devnull)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(out["socket"]))
    return out


@pytest.mark.parametrize("kind", ["fifo", "device-link", "socket"])
@pytest.mark.parametrize("command", ["ppl", "verify"])
def test_json_onto_a_device_fifo_or_socket_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
    no_work: list[str],
    not_files: dict[str, Path],
    kind: str,
    command: str,
) -> None:
    """Was: accepted, the whole run made, then the FIFO / socket / device link replaced by a regular file."""
    path = not_files[kind]
    before = os.lstat(path)
    usage_error(
        capsys, [command, "--model", "tiny-llama", "--json", str(path)], "--json", "not a regular file"
    )
    assert no_work == []
    after = os.lstat(path)
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino, stat.S_IFMT(before.st_mode))


def test_output_file_still_takes_a_new_file_and_an_existing_regular_one(tmp_path: Path) -> None:
    """Control: the refusal is of things that are not regular files only."""
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("{}\n")
    assert output_file(str(new)) == new and output_file(str(old)) == old


def test_json_through_a_symlink_writes_the_file_it_names(tmp_path: Path) -> None:
    """Was: the rename replaced the link by a regular file and left the file it names unchanged."""
    real = tmp_path / "runs" / "run42.json"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    argv = ["dp", "--sensitivity", "1", "--scale", "2", "--compositions", "3", "--no-pld"]
    assert main([*argv, "--json", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())  # the new result, where the link points
    assert output_file(str(link)) == Path(os.path.realpath(real))


# -- scx serve --max-sessions past what the greeting carries ------------------------------------------------


def test_max_sessions_stops_where_the_greeting_s_int64_does(
    capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    """``--max-sessions 2**63`` started a server whose every greeting was refused ("not an SCX server")."""
    from scx_ref.commands.serve import MAX_SESSIONS
    from scx_ref.errors import WireError
    from scx_ref.service.codec import WireLimits, decode, encode_hello

    hello = decode(encode_hello({"service": "scx", "max_sessions": MAX_SESSIONS}), WireLimits())
    assert hello.header["max_sessions"] == MAX_SESSIONS
    with pytest.raises(WireError):  # the bound is tight: one more and the greeting cannot be sent
        encode_hello({"service": "scx", "max_sessions": MAX_SESSIONS + 1})
    for text in (str(MAX_SESSIONS + 1), "100000000000000000000000"):
        argv = ["serve", "--model", "tiny-llama", "--port", "0", "--ops-port", "-1", "--max-sessions", text]
        usage_error(capsys, argv, "argument --max-sessions")
    assert no_work == []


# -- scx generate --tls-ca without a certificate -----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"not a certificate\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "text", "a-key"],
)
def test_a_tls_ca_without_a_certificate_is_refused_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], no_work: list[str], tmp_path: Path, content: bytes
) -> None:
    """Was: the model loaded, then 'generation stopped after 0 new token(s): the TLS CA file … holds no PEM
    certificate'."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1", "--server", "scxs://127.0.0.1:1"]
    usage_error(capsys, [*argv, "--tls-ca", str(ca)], "--tls-ca", str(ca))
    assert no_work == []


def test_a_tls_ca_with_a_certificate_goes_on_to_load_the_model(no_work: list[str], tmp_path: Path) -> None:
    """Control: a CA file that holds a certificate passes the check (the run reaches the model's load)."""
    trustme = pytest.importorskip("trustme")
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    argv = ["generate", "--model", "tiny-llama", "--prompt-ids", "1", "--server", "scxs://127.0.0.1:1"]
    with pytest.raises(AssertionError, match="load_hf called"):
        main([*argv, "--tls-ca", str(ca)])
    assert no_work == ["load_hf"]

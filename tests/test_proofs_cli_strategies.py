"""The proof runner's command line (``python -m proofs``), the nox sessions' Hypothesis profile, and the
reach of the shared Hypothesis strategies (``properties/strategies.py``).

The runner must never report success for a check that did not answer ``True`` / ``False`` (a control that
forgot its ``return`` is not a rejection), nor for an identity without a negative control; an unknown
filter is an error naming the known identities. The shared strategies must actually produce the edge cases
the project's rules name: one row (n = 1), no decoys (r = 0), a single head, GQA ratios 1/2/4, both float
dtypes.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from proofs import Identity, all_identities
from proofs.__main__ import main, run
from properties import strategies as S

ROOT = Path(__file__).resolve().parents[1]
BLINDING = next(entry for entry in all_identities() if entry.name == "t5.blinding")


def _only(monkeypatch: pytest.MonkeyPatch, entry: Identity) -> None:
    monkeypatch.setattr("proofs.__main__.all_identities", lambda: [entry])


# ----------------------------------------------------------------------------- python -m proofs


UNKNOWN = [["no-such-identity"], ["--list", "no-such-identity"], ["zzz", "--no-controls"]]


@pytest.mark.parametrize("argv", UNKNOWN)
def test_unknown_filter_is_an_error_listing_the_known_identities(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("python -m proofs: error: no identity name contains")
    assert "known identities:" in captured.err
    assert all(entry.name in captured.err for entry in all_identities())


@pytest.mark.parametrize(
    "returned", [None, 0, "", [], 1, "yes"], ids=["None", "0", "empty", "list", "1", "str"]
)
def test_a_control_that_returns_a_non_bool_is_an_error_not_a_rejection(
    returned: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control returning None (a forgotten ``return``) or any other non-bool fails the run."""
    control = cast(Callable[[], bool], lambda: returned)
    _only(monkeypatch, Identity(BLINDING.name, BLINDING.covers, BLINDING.check, [("non-bool", control)]))
    buffer = io.StringIO()
    assert run(out=buffer) == 1
    assert "negative control: ERROR (returned" in buffer.getvalue()
    assert "correctly rejected" not in buffer.getvalue()


@pytest.mark.parametrize("returned", [1, "proved", [0]], ids=["1", "str", "list"])
def test_an_identity_that_returns_a_truthy_non_bool_is_not_proved(
    returned: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = cast(Callable[[], bool], lambda: returned)
    _only(monkeypatch, Identity(BLINDING.name, BLINDING.covers, check, BLINDING.negative_controls))
    buffer = io.StringIO()
    assert run(out=buffer) == 1
    assert "FAILED (returned" in buffer.getvalue() and "PROVED" not in buffer.getvalue()


def test_an_identity_without_a_negative_control_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checker never shown to fail proves nothing; ``--no-controls`` (controls skipped) still passes."""
    _only(monkeypatch, Identity(BLINDING.name, BLINDING.covers, BLINDING.check, []))
    buffer = io.StringIO()
    assert run(out=buffer) == 1
    assert "negative control: NONE" in buffer.getvalue()
    assert run(controls=False, out=io.StringIO()) == 0


def _proofs(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proofs", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def test_listing_into_a_closed_pipe_ends_quietly() -> None:
    """``python -m proofs --list | head -1``: the reader goes away; no traceback, exit status 1."""
    child = _proofs("--list")
    assert child.stdout is not None
    child.stdout.close()  # before the child has imported sympy, let alone printed
    _, err = child.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode(errors="replace")
    assert child.returncode == 1


def test_listing_on_an_ascii_console_escapes_instead_of_crashing() -> None:
    child = _proofs("--list", "t1.matrix_symbol", env={"PYTHONIOENCODING": "ascii"})
    out, err = child.communicate(timeout=120)
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert out.startswith(b"t1.matrix_symbol") and b"P\\xb71 = 1" in out


# ----------------------------------------------------------------------------- nox sessions


def test_the_thorough_session_selects_a_registered_larger_profile() -> None:
    """``nox -s thorough`` passes ``--hypothesis-profile NAME``: NAME must be registered (conftest.py) and
    run more examples than the default profile."""
    names = re.findall(r'"--hypothesis-profile",\s*"([^"]+)"', (ROOT / "noxfile.py").read_text())
    assert len(names) == 1  # a name not registered raises InvalidArgument here
    assert settings.get_profile(names[0]).max_examples > settings.get_profile("default").max_examples


# ----------------------------------------------------------------------------- strategies reach edge cases

_SEARCH = settings(
    max_examples=2000, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)


def reachable(strategy: st.SearchStrategy[Any], predicate: Callable[[Any], bool]) -> bool:
    """Whether Hypothesis finds an example of ``strategy`` satisfying ``predicate``."""
    try:
        find(strategy, predicate, settings=_SEARCH)
    except NoSuchExample:
        return False
    return True


def _ratio(c: Any) -> int:
    return int(c.n_heads // c.n_kv_heads)


EDGE_CASES: dict[str, tuple[Callable[[], st.SearchStrategy[Any]], Callable[[Any], bool]]] = {
    "row_counts n=1": (S.row_counts, lambda n: n == 1),
    "decoy_counts r=0": (S.decoy_counts, lambda r: r == 0),
    "sized_perms n=1": (lambda: S.sized_perms(min_n=1), lambda t: t[0] == 1),
    "token_ids one token": (lambda: S.token_ids(8), lambda ids: len(ids) == 1),
    "dtypes float32": (S.dtypes, lambda d: d == np.float32),
    "dtypes float64": (S.dtypes, lambda d: d == np.float64),
    "attention_shapes one head": (S.attention_shapes, lambda s: s[0] * s[1] == 1),
    "attention_shapes GQA 2": (S.attention_shapes, lambda s: s[1] == 2),
    "attention_shapes GQA 4": (S.attention_shapes, lambda s: s[1] == 4),
    "attention_shapes head_dim 1": (S.attention_shapes, lambda s: s[2] == 1),
    "attention_shapes one head of head_dim 1": (S.attention_shapes, lambda s: s[0] * s[1] == 1 and s[2] == 1),
    "head_permutations one KV head": (
        lambda: S.head_permutations(S.row_counts(1, 3), 2),
        lambda p: p.sigmas.shape[0] == 1,
    ),
    "model_configs one head": (S.model_configs, lambda c: c.n_heads == 1),
    "model_configs GQA 2": (S.model_configs, lambda c: _ratio(c) == 2),
    "model_configs GQA 4": (S.model_configs, lambda c: _ratio(c) == 4),
    "model_configs MoE": (S.model_configs, lambda c: c.n_experts > 0),
    "protocol_model_configs one head": (S.protocol_model_configs, lambda c: c.n_heads == 1),
    "protocol_model_configs GQA 4": (S.protocol_model_configs, lambda c: _ratio(c) == 4),
    "scx_configs r1 = r2 = r_lock = 0": (
        S.scx_configs,
        lambda s: s.r1 == 0 and s.r2 == 0 and s.r_lock == 0,
    ),
    "protocol_cases n=1": (S.protocol_cases, lambda c: len(c.ids) == 1),
    "protocol_cases r=0": (S.protocol_cases, lambda c: c.scx.r1 == 0 and c.scx.r2 == 0),
    "protocol_cases one head": (S.protocol_cases, lambda c: c.model.n_heads == 1),
    "protocol_cases GQA 2": (S.protocol_cases, lambda c: _ratio(c.model) == 2),
    "protocol_cases GQA 4": (S.protocol_cases, lambda c: _ratio(c.model) == 4),
    "protocol_cases n=1, r=0, one head at once": (
        S.protocol_cases,
        lambda c: len(c.ids) == 1 and c.scx.r1 == 0 and c.scx.r2 == 0 and c.model.n_heads == 1,
    ),
    "protocol_edge_cases n=1": (S.protocol_edge_cases, lambda c: len(c.ids) == 1),
    "protocol_edge_cases r=0": (
        S.protocol_edge_cases,
        lambda c: c.scx.r1 == 0 and c.scx.r2 == 0 and c.scx.lock_decoys == 0,
    ),
    "protocol_edge_cases one KV head": (S.protocol_edge_cases, lambda c: c.model.n_kv_heads == 1),
    "protocol_edge_cases context filled exactly": (
        S.protocol_edge_cases,
        lambda c: c.scx.max_length == c.model.max_positions == len(c.ids) + c.n_new,
    ),
    "protocol_edge_cases room left": (S.protocol_edge_cases, lambda c: c.scx.max_length > 1 + c.n_new),
    "protocol_edge_cases one head": (S.protocol_edge_cases, lambda c: c.model.n_heads == 1),
    "protocol_edge_cases GQA 4 + MoE + QKV bias": (
        S.protocol_edge_cases,
        lambda c: c.model.n_heads == 4 and c.model.n_experts > 0 and c.model.qkv_bias,
    ),
    "protocol_edge_cases r_lock 0 at level blind": (
        S.protocol_edge_cases,
        lambda c: c.scx.r_lock == 0 and c.scx.level == "blind",
    ),
    "protocol_edge_cases n=1, r=0, one KV head, context filled at once": (
        S.protocol_edge_cases,
        lambda c: (
            len(c.ids) == 1
            and c.scx.lock_decoys == c.scx.r1 == c.scx.r2 == 0
            and c.model.n_kv_heads == 1
            and c.scx.max_length == c.model.max_positions == len(c.ids) + c.n_new
        ),
    ),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_the_shared_strategies_reach_the_edge_case(case: str) -> None:
    make, predicate = EDGE_CASES[case]
    assert reachable(make(), predicate), f"{case}: never drawn"


def test_reachable_reports_an_unreachable_edge_case() -> None:
    """Control for the check above: a decoy count that starts at 1 never gives r = 0."""
    assert not reachable(st.integers(1, 8), lambda r: r == 0)


# ----------------------------------------------------------------------------- kernel_paths.same


def test_same_is_bit_for_bit_on_signed_zeros_and_nan() -> None:
    """``same`` backs the fused-kernel suites' "bit for bit" claims: −0.0 is not 0.0 (a kernel that
    flips a zero's sign is not bit-identical), NaN matches NaN, shapes and dtypes must agree."""
    torch = pytest.importorskip("torch")
    from properties.kernel_paths import same

    zero, nzero, nan = torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), torch.tensor([float("nan"), 1.0])
    assert same(zero, zero.clone()) and same(nan, nan.clone())
    assert not same(zero, nzero)
    assert not same(zero.numpy(), nzero.numpy())
    assert same(nan.numpy(), nan.numpy().copy())
    assert not same(np.zeros((1, 2)), np.zeros(2)) and not same(zero, zero.double())
    assert not same(0.0, -0.0) and same(float("nan"), float("nan")) and same((1.0, zero), (1.0, zero))

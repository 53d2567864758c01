"""A hostile peer, second pass (DESIGN §5.5–5.7): malformed replies of every kind to the client, and
malformed requests to the in-process server, at levels permute/paper/blind, with and without
verification, in the prefill and in decode steps.

Client side: every malformed reply is refused with a project error (IntegrityError; a transport's own
exception stays the transport's), the session is failed and nothing more is sent on it, and the same
Client then runs a fresh request on an honest transport under a fresh nonce with exactly the plaintext
result (float64: the reference forward to rtol 1e-10). Server side: every malformed request is refused with
an SCXError and leaves the session exactly as it was (``Server.sessions_snapshot``), so the honest request
that follows it — a decode step's too — still gives exact results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from scx_ref.attacks.active import TamperingTransport
from scx_ref.backends import NumpyBackend
from scx_ref.backends.torch_backend import TorchBackend
from scx_ref.errors import IntegrityError, ProtocolError, SCXError
from scx_ref.keys import KeySchedule
from scx_ref.protocol import Client, LocalTransport, Reply, Request, SCXConfig, Server
from scx_ref.reference import ReferenceModel
from scx_ref.stages import Stage
from scx_ref.weights import ModelWeights
from tests.server_state import frozen, session_state
from tests.tiny import tiny_weights

IDS = np.array([7, 3, 21, 9, 14, 2, 30, 11], dtype=np.int64)
STEPS = 2  # decode steps after the prefill
W: ModelWeights = tiny_weights(
    3, vocab_size=40, hidden_size=32, n_layers=4, head_dim=8, intermediate_size=48, max_positions=64
)
LEVELS = ("permute", "paper", "blind")
_SEED = [0]


def _keys() -> KeySchedule:
    """A fresh (master, nonce) pair for every client (a pair drives one session only)."""
    _SEED[0] += 1
    return KeySchedule(bytes([_SEED[0] % 250 + 1]) * 32, (1000 + _SEED[0]).to_bytes(16, "big"))


def _reference() -> list[np.ndarray]:
    ref = ReferenceModel(W)
    logits, cache = ref.prefill(IDS)
    out = [logits]
    token = int(np.argmax(logits[-1]))
    for _ in range(STEPS):
        out.append(ref.decode(token, cache))
        token = int(np.argmax(out[-1]))
    return out


WANT = _reference()


def _session(client: Client[Any], link: Any) -> list[np.ndarray]:
    """Prefill, STEPS decode steps (the reference's greedy tokens), close."""
    out = [client.prefill(IDS, link)]
    for s in range(STEPS):
        out.append(client.decode(int(np.argmax(np.atleast_2d(WANT[s])[-1])), link))
    client.close()
    return out


def _assert_exact(got: list[np.ndarray]) -> None:
    for g, w in zip(got, WANT, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-10, atol=1e-10 * np.abs(w).max())


def _np(x: Any) -> np.ndarray:
    return np.array(x.detach().numpy() if isinstance(x, torch.Tensor) else x)


def _first(change: Callable[[Any], Any]) -> Callable[[dict[str, Any]], Any]:
    """Apply ``change`` to the reply's first array (by name)."""
    return lambda a: {**a, sorted(a)[0]: change(a[sorted(a)[0]])}


def _entry(value: float) -> Callable[[Any], Any]:
    def change(x: Any) -> Any:
        y = _np(x)
        y.flat[y.size // 2] = value
        return torch.from_numpy(y) if isinstance(x, torch.Tensor) else y

    return change


def _masked_garbage(x: Any) -> Any:
    """The honest values with one entry changed under a mask (a reader that drops the mask sees it)."""
    y = _np(x)
    y.flat[0] += 1.0
    return np.ma.MaskedArray(y, mask=np.arange(y.size).reshape(y.shape) == 0)


#: malformed replies: each must be refused (with verification: every reply the client can check)
MALFORMED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "renamed key": lambda a: {k + "_": v for k, v in a.items()},
    "extra key": lambda a: {**a, "spy": next(iter(a.values()))},
    "missing key": lambda a: {},
    "not a mapping": lambda a: list(a.values()),
    "float16": _first(lambda x: _np(x).astype(np.float16)),
    "int64": _first(lambda x: _np(x).astype(np.int64)),
    "object": _first(lambda x: _np(x).astype(object)),
    "bool": _first(lambda x: _np(x) > 0),
    "complex": _first(lambda x: _np(x).astype(np.complex128)),
    "one row more": _first(lambda x: np.concatenate([_np(x), _np(x)[:1]])),
    "one row less": _first(lambda x: _np(x)[:-1]),
    "0-d": _first(lambda x: np.array(1.0)),
    "3-d": _first(lambda x: _np(x)[None]),
    "nan": _first(_entry(np.nan)),
    "inf": _first(_entry(-np.inf)),
    "masked garbage": _first(_masked_garbage),
    "sparse tensor": _first(lambda x: torch.from_numpy(_np(x)).to_sparse()),
    "meta tensor": _first(lambda x: torch.empty(tuple(_np(x).shape), device="meta")),
}
#: the honest values in another layout or array type: taken (and exact) or refused, never a raw error
LAYOUTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "negative stride": _first(lambda x: np.ascontiguousarray(_np(x)[::-1])[::-1]),
    "non-contiguous": _first(lambda x: np.repeat(_np(x), 2, axis=-1)[..., ::2]),
    "read-only": _first(lambda x: _ro(x)),
    "fortran order": _first(lambda x: np.asfortranarray(_np(x))),
    "np.matrix": _first(lambda x: np.asmatrix(_np(x)) if _np(x).ndim == 2 else _np(x)),
    "masked, nothing hidden": _first(lambda x: np.ma.MaskedArray(_np(x))),
    "the other array kind": _first(
        lambda x: _np(x) if isinstance(x, torch.Tensor) else torch.from_numpy(_np(x))
    ),
}


def _ro(x: Any) -> np.ndarray:
    y = _np(x)
    y.setflags(write=False)
    return y


def _once(
    stage: Stage, step: int, change: Callable[[dict[str, Any]], Any]
) -> Callable[[Request, Reply], Any]:
    """Tamper the first reply of (stage, step); every other reply passes."""
    done = [False]

    def tamper(req: Request, reply: Reply) -> Any:
        if done[0] or req.stage is not stage or req.step != step:
            return reply
        done[0] = True
        return replace(reply, arrays=change(dict(reply.arrays)))

    return tamper


def _backend(name: str) -> Any:
    return NumpyBackend(W) if name == "numpy" else TorchBackend(W, torch.float64)


# (level, stage, step): a prefill stage and a decode step's stages at each level (the blinded ones where
# the level blinds: QKV of block 1 at paper, O and the LM head at blind)
SITES = [
    ("permute", Stage.QKV, -1),
    ("permute", Stage.ATTN, -1),
    ("permute", Stage.FFN, -1),
    ("permute", Stage.GEN_LAST, 1),
    ("paper", Stage.QKV, -1),
    ("paper", Stage.HEAD, -1),
    ("paper", Stage.GEN_QKV, 1),
    ("paper", Stage.GEN_FFN_UP, 0),
    ("blind", Stage.O, -1),
    ("blind", Stage.FFN_DOWN, -1),
    ("blind", Stage.HEAD, -1),
    ("blind", Stage.GEN_FFN_DOWN, 1),
]


def _hostile_then_honest(
    backend: Any, cfg: SCXConfig, tamper: Callable[[Request, Reply], Any]
) -> tuple[BaseException | None, Client[Any]]:
    """A session against a tampering server, then — on the same Client — one on an honest server:
    the first's exception (None when it was taken), after checking the second is exact under a fresh
    nonce and that nothing was sent on the failed session."""
    server = Server(backend)
    link = TamperingTransport(LocalTransport(server), tamper)
    client: Client[Any] = Client(backend, _keys(), cfg)
    raised: BaseException | None = None
    failed: str | None = None
    try:
        _session(client, link)
    except Exception as exc:  # the caller judges it
        raised = exc
        failed = client.session
        assert client.state is not None and client.state.failed, f"{exc!r} left the session healthy"
        sent = link.sent
        with pytest.raises(ProtocolError, match="failed"):
            client.decode(int(IDS[0]), link)
        assert link.sent == sent, "the client sent a message on a failed session"
    got = _session(client, LocalTransport(server))  # the same server: the failed session is left there
    assert client.session != failed, "the fresh request reused the failed session's nonce"
    _assert_exact(got)
    return raised, client


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize(("level", "stage", "step"), SITES, ids=[f"{lv}-{s.value}@{t}" for lv, s, t in SITES])
def test_malformed_replies_are_refused_and_the_client_recovers_exactly(
    level: str, stage: Stage, step: int, verify: bool
) -> None:
    """Every malformed reply: IntegrityError, the session failed and silent; the same Client's next
    request on an honest server is exact. ``masked garbage`` (an entry changed under a mask: a reader
    that drops the mask sees a wrong value) is a value tampering: refused with verification only."""
    b = NumpyBackend(W)
    cfg = SCXConfig(level=level, r1=2, r2=2, verify=verify)  # type: ignore[arg-type]
    for name, change in MALFORMED.items():
        raised, _ = _hostile_then_honest(b, cfg, _once(stage, step, change))
        if name == "masked garbage" and not verify:
            continue  # no check sees a wrong value without verification (the documented control)
        assert isinstance(raised, IntegrityError), f"{name}: {raised!r}"


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("level", LEVELS)
def test_honest_values_in_another_layout_are_taken_exactly_or_refused(
    level: str, verify: bool, backend: str
) -> None:
    """Negative strides, non-contiguous, read-only, Fortran-ordered, np.matrix, an unmasked masked
    array, the other array kind: the values are the honest ones, so the client takes them with exact
    results or refuses them (IntegrityError) — never a raw error — and recovers."""
    b = _backend(backend)
    cfg = SCXConfig(level=level, r1=2, r2=2, verify=verify)  # type: ignore[arg-type]
    sites = [(s, t) for lv, s, t in SITES if lv == level]
    for name, change in LAYOUTS.items():
        for stage, step in sites:
            raised, _ = _hostile_then_honest(b, cfg, _once(stage, step, change))
            assert raised is None or isinstance(raised, IntegrityError), (
                f"{name} at {stage.value}: {raised!r}"
            )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize(
    ("level", "stage"),
    [("paper", Stage.QKV), ("blind", Stage.O), ("blind", Stage.HEAD), ("blind", Stage.QKV)],
)
def test_a_nonfinite_blinded_prefill_reply_without_verification_fails_the_session(
    level: str, stage: Stage, value: float, backend: str
) -> None:
    """verify=False: a blinded prefill reply is not scanned on arrival (its unblinding reads every entry);
    a NaN or ±inf there used to escape as NonFiniteError with the session still marked healthy (a later
    decode sent messages on it). Now: IntegrityError, the session failed, nothing more sent."""
    cfg = SCXConfig(level=level, r1=2, r2=2, verify=False)  # type: ignore[arg-type]
    raised, _ = _hostile_then_honest(_backend(backend), cfg, _once(stage, -1, _first(_entry(value))))
    assert isinstance(raised, IntegrityError), repr(raised)


class _Boom(Exception):
    """A transport's own failure mid-request."""


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("level", LEVELS)
def test_replayed_foreign_and_dying_replies(level: str, verify: bool) -> None:
    """The reply to the previous message replayed, a reply of another session (with its own header, and
    with the header rewritten to this request's), and a transport that raises mid-request (prefill and a
    decode step): each ends the session — the foreign values with verification only — and the client
    recovers exactly under a fresh nonce."""
    b = NumpyBackend(W)
    cfg = SCXConfig(level=level, r1=2, r2=2, verify=verify)  # type: ignore[arg-type]
    # every reply of an honest session of another client, by (stage, layer, step, nth)
    other: dict[tuple[Stage, int, int, int], Reply] = {}

    def record(req: Request, reply: Reply) -> Reply:
        key = (req.stage, req.layer, req.step, sum(k[:3] == (req.stage, req.layer, req.step) for k in other))
        other[key] = reply
        return reply

    _session(Client(b, _keys(), cfg), TamperingTransport(LocalTransport(Server(b)), record))

    for stage, step in ((Stage.FFN, -1), (Stage.GEN_LAST, 0), (Stage.GEN_QKV, 1)):
        if stage is Stage.GEN_QKV and level == "permute":
            continue  # not sent at permute (no blinded first guard block)
        previous: list[Reply] = []

        def replay(
            req: Request,
            reply: Reply,
            stage: Stage = stage,
            step: int = step,
            previous: list[Reply] = previous,
        ) -> Reply:
            out = previous[-1] if previous and req.stage is stage and req.step == step else reply
            previous.append(reply)
            return out

        raised, _ = _hostile_then_honest(b, cfg, replay)
        assert isinstance(raised, IntegrityError), f"replay at {stage.value}: {raised!r}"

        for rewrite in (False, True):
            seen: dict[tuple[Stage, int, int], int] = {}

            def foreign(
                req: Request,
                reply: Reply,
                stage: Stage = stage,
                step: int = step,
                rw: bool = rewrite,
                seen: dict[tuple[Stage, int, int], int] = seen,
            ) -> Reply:
                at = (req.stage, req.layer, req.step)
                nth = seen[at] = seen.get(at, -1) + 1
                if req.stage is not stage or req.step != step:
                    return reply
                theirs = other[(at[0], at[1], at[2], nth)]
                return replace(theirs, session=reply.session, seq=reply.seq) if rw else theirs

            raised, _ = _hostile_then_honest(b, cfg, foreign)
            if rewrite and not verify:
                continue  # a well-formed reply of wrong values: only verification sees it
            assert isinstance(raised, IntegrityError), f"foreign ({rewrite}) at {stage.value}: {raised!r}"

        def dies(req: Request, reply: Reply, stage: Stage = stage, step: int = step) -> Reply:
            if req.stage is stage and req.step == step:
                raise _Boom("connection lost")
            return reply

        raised, _ = _hostile_then_honest(b, cfg, dies)
        assert isinstance(raised, _Boom), repr(raised)  # the transport's own error, as it raised it


@pytest.mark.parametrize("layout", ["meta", "sparse"])
def test_a_recorded_view_does_not_crash_on_a_reply_without_host_data(layout: str) -> None:
    """LocalTransport(record_view=True) copies each reply to numpy for the view; a meta tensor's copy
    raised NotImplementedError (and a sparse one's TypeError was caught) out of the transport. Now such a
    reply is left unrecorded and the client refuses it (IntegrityError)."""
    b = NumpyBackend(W)

    class Odd(Server[Any]):
        def handle(self, request: Request) -> Reply:
            reply = super().handle(request)
            if request.stage is not Stage.ATTN:
                return reply
            o = torch.from_numpy(np.array(reply.arrays["o"]))
            bad = torch.empty(tuple(o.shape), device="meta") if layout == "meta" else o.to_sparse()
            return replace(reply, arrays={"o": bad})

    server = Odd(b)
    link = LocalTransport(server, record_view=True)
    client: Client[Any] = Client(b, _keys(), SCXConfig(level="paper", r1=2, r2=2))
    with pytest.raises(IntegrityError):
        client.prefill(IDS, link)
    assert client.state is not None and client.state.failed
    assert link.view.select(stage=Stage.ATTN), "the attention message was not recorded"
    assert all(r.stage is not Stage.ATTN for r in link.view.replies), "a reply without data was recorded"
    _assert_exact(_session(client, LocalTransport(Server(b))))


# -- hostile client -> in-process server ------------------------------------------------------------
def _snapshot(server: Server[Any], sid: str) -> Any:
    return frozen((session_state(server, sid), server.cache_bytes, len(server.sessions)))


REQUEST_TAMPERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    **{k: v for k, v in MALFORMED.items() if k not in ("float16", "masked garbage")},
    "a list": _first(lambda x: _np(x).tolist()),
    "a string": _first(lambda x: "abc"),
    "None": _first(lambda x: None),
    "axes moved": _first(lambda x: np.ascontiguousarray(np.moveaxis(_np(x), 0, -1))),
}
#: the tamperings that leave an int64 permutation as it is, or cannot be written into one
PERM_SAME = ("int64", "axes moved", "nan", "inf", "a list")
# (level, stage, step) of the requests tampered: prefill stages, key sharing and decode steps, the ones
# that extend a cache (qkv, lock, share, gen_mid, gen_last) among them
REQUEST_SITES = [
    ("permute", Stage.QKV, -1),
    ("permute", Stage.ATTN, -1),
    ("permute", Stage.LOCK, -1),
    ("permute", Stage.SHARE, -1),
    ("permute", Stage.GEN_MID, 0),
    ("permute", Stage.GEN_MID, 1),
    ("permute", Stage.GEN_LAST, 1),
    ("paper", Stage.GEN_QKV, 0),
    ("blind", Stage.FFN_DOWN, -1),
    ("blind", Stage.SHARE, -1),
    ("blind", Stage.GEN_FFN_UP, 1),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("level", "stage", "step"), REQUEST_SITES, ids=[f"{lv}-{s.value}@{t}" for lv, s, t in REQUEST_SITES]
)
def test_malformed_requests_are_refused_and_change_nothing(
    level: str, stage: Stage, step: int, backend: str
) -> None:
    """Before the client's request of (stage, step) reaches the server, each malformed copy of it is
    handed to Server.handle: an SCXError (a sparse tensor's size used to raise RuntimeError), the session
    exactly as it was; then the honest request, and the whole run stays exact — a refused decode step
    extended no cache."""
    b = _backend(backend)
    server = Server(b)
    outcomes: dict[str, str] = {}

    class Hostile(LocalTransport):
        def send(self, request: Request) -> Reply:
            if request.stage is stage and request.step == step and not outcomes:
                for name, change in REQUEST_TAMPERS.items():
                    if "perm" in request.arrays and "alpha" not in request.arrays and name in PERM_SAME:
                        continue  # the permutation itself (int64, or 1-D axes moved), or no NaN to hold
                    bad = replace(request, arrays=change(dict(request.arrays)))
                    before = _snapshot(server, request.session)
                    with pytest.raises(SCXError):
                        server.handle(bad)
                    assert _snapshot(server, request.session) == before, f"{name} half-updated the session"
                    outcomes[name] = "refused"
            return super().send(request)

    client: Client[Any] = Client(b, _keys(), SCXConfig(level=level, r1=2, r2=2))  # type: ignore[arg-type]
    _assert_exact(_session(client, Hostile(server)))
    assert outcomes, f"{stage.value}@{step} was never sent"


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_precomputed_keys_of_a_failed_request_are_not_used_again(verify: bool) -> None:
    """Keys derived ahead (:meth:`Client.precompute`) for a request that a hostile reply ends: its nonce
    stays claimed — a new precompute or prefill under it is refused — and the next request derives its
    own keys under a fresh nonce, exactly."""
    b = NumpyBackend(W)
    cfg = SCXConfig(level="paper", r1=2, r2=2, verify=verify)
    client: Client[Any] = Client(b, _keys(), cfg)
    prep = client.precompute(len(IDS), steps=STEPS)
    link = TamperingTransport(LocalTransport(Server(b)), _once(Stage.QKV, -1, _first(_entry(np.nan))))
    with pytest.raises(IntegrityError):
        client.prefill(IDS, link)
    assert client.session == prep.keys.session_id
    with pytest.raises(SCXError, match="already drove"):
        client.precompute(len(IDS), nonce=prep.nonce)
    with pytest.raises(SCXError, match="nonce reused"):
        client.prefill(IDS, LocalTransport(Server(b)), nonce=prep.nonce)
    _assert_exact(_session(client, LocalTransport(Server(b))))
    assert client.session != prep.keys.session_id

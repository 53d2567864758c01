"""The untrusted server (DESIGN §5): holds the plaintext weights, computes every heavy stage on
encoded data, and stores the encoded KV cache.

Each message is validated completely — its fields' types, the session capability, sequence number,
stage order, layer role, every ``meta`` field, array names, shapes, dtypes, finiteness and the server's
limits — *before* any state changes, and the state changes of a message are applied together at the end,
so a rejected message leaves the server's caches exactly as they were.

Sessions are capabilities (DESIGN §5.5): ``open`` returns an unguessable token (256 bits from the OS
CSPRNG, in the reply's ``meta["token"]``) that every later message must carry; it is compared in constant
time, and a wrong or missing token, an unknown session, a closed one and an evicted one all get the same
error, which says nothing about the session. ``close`` ends a session and frees its caches. The server
enforces :class:`~scx_ref.protocol.limits.ServerLimits`, refuses a nonce it has seen and a key commitment
it has seen (a replayed transcript), and evicts sessions idle past the TTL.

Concurrency: one lock per session makes check-then-commit atomic (messages of one session are handled one
at a time, in order); a server-wide lock guards the session table, the nonce and commitment memories and
the cache-byte total. Sessions run in parallel.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

import numpy as np

from .._checks import check_int, check_permutation
from ..backends.base import A, Backend, NormName, is_backend, split_qkv
from ..errors import LimitError, ProtocolError, SCXError, SessionError
from ..forward import block_rows
from ..stages import PREFILL_BLOCK_STAGES, Phase, Stage
from ..transforms import decode_rows, unblind
from .config import (
    ATTENTION_SITES,
    GEN_ATTENTION_SITES,
    GEN_LINEAR_SITES,
    LEVELS,
    guard_blocks,
    server_gen_attention,
)
from .cost import CostMeter, StageCost
from .keyring import commitment
from .limits import (
    ServerLimits,
    field_bool,
    field_experts,
    field_hex,
    field_int,
    field_str,
    known_fields,
)
from .messages import Reply, Request
from .mlp import traced_mlp

__all__ = ["Server"]


#: The error for a message whose session cannot be used: unknown, closed, evicted, or a wrong token.
_NO_SESSION = "unknown session or invalid session token"
#: The ``meta`` fields each stage may carry (anything else is refused).
_META: dict[Stage, frozenset[str]] = {
    Stage.OPEN: frozenset(
        {
            "n",
            "r1",
            "r2",
            "r_lock",
            "l_s",
            "l_e",
            "max_length",
            "level",
            "attention",
            "gen_attention",
            "gen_linear",
            "wide",
        }
    ),
    Stage.CLOSE: frozenset(),
    Stage.QKV: frozenset({"commit", "normalized", "wide"}),
    Stage.ATTN: frozenset(),
    Stage.O: frozenset({"wide"}),
    Stage.FFN: frozenset({"normalized", "experts", "trace", "wide"}),
    Stage.FFN_DOWN: frozenset({"experts", "last", "wide"}),
    Stage.ROUTER: frozenset({"wide"}),
    Stage.HEAD: frozenset({"normalized", "wide"}),
    Stage.LOCK: frozenset(),
    Stage.SHARE: frozenset({"salt", "wide"}),
    Stage.GEN_QKV: frozenset({"wide"}),
    Stage.GEN_ATTN: frozenset(),
    Stage.GEN_FFN: frozenset({"trace"}),
    Stage.GEN_FFN_UP: frozenset({"normalized", "experts", "wide"}),
    Stage.GEN_FFN_DOWN: frozenset({"experts", "last", "wide"}),
    Stage.GEN_ROUTER: frozenset({"wide"}),
    Stage.GEN_MID: frozenset(),
    Stage.GEN_LAST: frozenset(),
    Stage.GEN_O: frozenset({"wide"}),
    Stage.GEN_HEAD: frozenset({"wide"}),
}
#: Open's fields that may be absent (their defaults, SCXConfig's: attention "server", gen_attention
#: "client", gen_linear "client", wide false).
_OPEN_OPTIONAL = frozenset({"attention", "gen_attention", "gen_linear", "wide"})
#: The arrays each stage may carry (``share`` may add ``alpha``).
_ARRAYS: dict[Stage, frozenset[str]] = {
    Stage.OPEN: frozenset(),
    Stage.CLOSE: frozenset(),
    Stage.QKV: frozenset({"x"}),
    Stage.ATTN: frozenset({"q", "k", "v"}),
    Stage.O: frozenset({"x"}),
    Stage.FFN: frozenset({"x"}),
    Stage.FFN_DOWN: frozenset({"m"}),
    Stage.ROUTER: frozenset({"x"}),
    Stage.HEAD: frozenset({"x"}),
    Stage.LOCK: frozenset({"k"}),
    Stage.SHARE: frozenset({"perm", "alpha"}),
    Stage.GEN_QKV: frozenset({"x"}),
    Stage.GEN_ATTN: frozenset({"q", "k", "v"}),
    Stage.GEN_FFN: frozenset({"x"}),
    Stage.GEN_FFN_UP: frozenset({"x"}),
    Stage.GEN_FFN_DOWN: frozenset({"m"}),
    Stage.GEN_ROUTER: frozenset({"x"}),
    Stage.GEN_MID: frozenset({"x"}),
    Stage.GEN_LAST: frozenset({"x"}),
    Stage.GEN_O: frozenset({"x"}),
    Stage.GEN_HEAD: frozenset({"x"}),
}
_SESSION_HEX = 32  # a session id is the 16-byte nonce in hex
#: The stages whose rows the server normalizes itself unless ``meta["normalized"]`` is true.
_NORMED = frozenset({Stage.QKV, Stage.FFN, Stage.HEAD})
#: The method that computes each stage after OPEN (CLOSE and OPEN are answered in :meth:`Server.handle`).
_HANDLERS: dict[Stage, str] = {
    Stage.QKV: "_qkv",
    Stage.ATTN: "_attn",
    Stage.O: "_o",
    Stage.FFN: "_ffn",
    Stage.FFN_DOWN: "_ffn_down",
    Stage.ROUTER: "_router",
    Stage.HEAD: "_head",
    Stage.LOCK: "_lock",
    Stage.SHARE: "_share",
    Stage.GEN_QKV: "_gen_qkv",
    Stage.GEN_ATTN: "_gen_attn",
    Stage.GEN_O: "_gen_o",
    Stage.GEN_HEAD: "_gen_head",
    Stage.GEN_FFN: "_gen_ffn",
    Stage.GEN_FFN_UP: "_gen_ffn_up",
    Stage.GEN_FFN_DOWN: "_gen_ffn_down",
    Stage.GEN_ROUTER: "_gen_router",
    Stage.GEN_MID: "_gen_mid",
    Stage.GEN_LAST: "_gen_last",
}


@dataclass
class _Session(Generic[A]):
    n: int
    r1: int
    r2: int
    r_lock: int
    first: range
    middle: range
    last: range
    max_length: int
    attention: str = "server"  # where the guard blocks' attention runs (SCXConfig.attention)
    gen_attention: str = "client"  # where a step's attention of the first guard blocks runs
    gen_linear: str = "client"  # where a step's W_o of the guard blocks and LM head run
    wide: bool = False  # blinded messages may arrive in float64 (SCXConfig.blind_dtype)
    level: str = "paper"  # the privacy level opened with: with ``noised_qkv``, what a share must carry
    seq: int = 1
    layer: int = -1  # prefill: the block whose stages are running
    ffn_done: int = -1  # prefill: last block whose FFN stage ran
    head_done: bool = False
    step: int = -1  # generation step in progress
    gen_done: set[tuple[Stage, int]] = field(default_factory=set)  # cache-extending stages run this step
    raw: dict[int, tuple[A, A]] = field(default_factory=dict)
    raw_bytes: dict[int, int] = field(default_factory=dict)  # what each raw cache counts in cache_bytes
    # prefill: the blocks whose QKV rows the client normalized (noised ones) -> whether they came wide
    noised_qkv: dict[int, bool] = field(default_factory=dict)
    commits: dict[int, str] = field(default_factory=dict)
    valid: dict[int, tuple[A, A]] = field(default_factory=dict)
    locked: dict[int, A] = field(default_factory=dict)
    meter: CostMeter = field(default_factory=CostMeter)
    token: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = 0.0
    cache_bytes: int = 0  # bytes of raw + valid + locked caches held
    closed: bool = False


#: A ``gen_mid`` request admitted to a batch: its slot, session, request, row x and reserved cache bytes.
_Mid = tuple[int, _Session[A], Request, A, int]


class Server(Generic[A]):
    """The cloud side of SCX. ``handle`` is its only entry point; it is safe to call from many threads.

    ``limits``: the server's :class:`~scx_ref.protocol.limits.ServerLimits` (safe defaults when None).
    ``clock``: seconds for the idle TTL (``time.monotonic``; tests pass their own).
    ``batch_rows``: the middle blocks of generation steps run on tiles of exactly this many rows
    (:func:`~scx_ref.forward.block_rows`), so a session's results are bit-for-bit the same whether
    :meth:`handle_batch` runs its rows with other sessions' or :meth:`handle` runs them alone; 1 (the
    default) runs each row as :func:`~scx_ref.forward.block` does.
    ProtocolError for a ``backend`` that is not one (:func:`~scx_ref.backends.base.is_backend`: a model's
    weights are not), a ``batch_rows`` that is not an integer >= 1, ``limits`` that are not ServerLimits or a
    ``clock`` that is not callable.
    """

    def __init__(
        self,
        backend: Backend[A],
        limits: ServerLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_rows: int = 1,
    ) -> None:
        if not is_backend(backend):
            raise ProtocolError(f"backend must be a Backend, got {type(backend).__name__}")
        batch_rows = check_int(batch_rows, "batch_rows", 1, error=ProtocolError)
        self.b = backend
        self.c = backend.config
        self.batch_rows = batch_rows
        self.limits = limits if limits is not None else ServerLimits()
        if not isinstance(self.limits, ServerLimits):
            raise ProtocolError(f"limits must be a ServerLimits, got {type(limits).__name__}")
        if not callable(clock):  # before: accepted, and the first message's TTL check raised a TypeError
            raise ProtocolError(f"clock must be a callable giving seconds, got {type(clock).__name__}")
        self.clock = clock
        self.sessions: dict[str, _Session[A]] = {}
        self._table_lock = threading.Lock()  # the session table, nonce/commitment memories, cache-byte total
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self._commits: OrderedDict[str, None] = OrderedDict()
        self._pending: set[str] = set()  # commitments of QKV messages being handled
        self._cache_bytes = 0
        #: Sessions the server ended other than by their own ``close``: dropped (:meth:`drop`), or evicted
        #: idle past the TTL (by :meth:`evict_idle_sessions`, on access, or to make room for an ``open``).
        #: Each counted once, under the server-wide lock (the service's metrics read it).
        self.evictions = 0
        self._itemsize = int(backend.numpy_dtype().itemsize)

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, req: Request) -> Reply:
        """Validate ``req``, compute the stage, commit the session's state changes, reply.

        Guarantee: a request refused with an SCXError changed nothing on the server (no session, cache,
        counter, flop-meter charge or memory of it), nor did one that failed with another exception (an
        internal fault) after it was admitted; a message is accepted only with its session's token, in order.
        """
        req = self._parse(req)
        if req.stage is Stage.OPEN:
            return self._open(req)
        s = self._session_for(req)
        with s.lock:
            self._admit(s, req)
            if req.stage is Stage.CLOSE:
                self._close(req.session, s)
                return Reply(req.session, Stage.CLOSE, req.layer, req.step, req.seq, {})
            grow = self._growth(s, req)
            self._reserve(grow, req)
            undo_meter = _meter_undo(s.meter, req.stage)
            try:
                arrays, commit = self._handler(req.stage)(s, req)
                return self._finish(s, req, arrays, commit, grow)
            except BaseException:  # the handler charged the flop meter before it failed: take that back
                undo_meter()
                self._unreserve(grow, req)
                raise

    def handle_batch(self, reqs: Sequence[Request]) -> list[Reply | SCXError]:
        """Handle messages of *distinct* sessions at once; the ``gen_mid`` ones (of sessions with the same
        middle blocks) run their middle blocks together, on tiles of ``batch_rows`` rows.

        Returns, per request, its reply or the SCXError :meth:`handle` would have raised for it (a bad
        request never affects another, and a refused one changed nothing). Guarantee: each reply equals,
        bit for bit, the reply :meth:`handle` gives the same request on the same session state.
        ProtocolError, before any request is handled, when ``reqs`` is not a sequence or two of its
        requests name the same session (their order would matter).

        All-or-nothing: every request is checked and computed first — its session's lock held (taken in
        session order), its cache bytes reserved — and the clock read, before any request changes anything
        (a stage's commit, a ``close`` ending its session, an ``open`` adding one). So an exception that is
        not an SCXError (an internal fault) while any request is checked or computed, and any exception
        while a ``gen_mid`` group computes (it cannot be told apart per request), propagates with no request
        of the batch having taken effect: every session as it was (caches, sequence number, flop meter, key
        commitments; none opened or closed), every reserved cache byte released. The changes themselves are
        assignments; should one fail (a bug), the requests changed before it stay changed, the rest's bytes
        are released, and it propagates. (A lookup evicts a session idle past the TTL, as :meth:`handle`'s
        does, whatever becomes of the batch.)"""
        if isinstance(reqs, (str, bytes)) or not isinstance(reqs, Sequence):
            raise ProtocolError(f"handle_batch takes a sequence of requests, got {type(reqs).__name__}")
        given = list(reqs)  # one read of the sequence: its length and its items agree
        out: list[Reply | SCXError | None] = [None] * len(given)
        parsed: list[tuple[int, Request]] = []
        for i, raw in enumerate(given):
            try:
                parsed.append((i, self._parse(raw)))  # no state: an object that is not a request included
            except SCXError as exc:
                out[i] = exc
        if len({req.session for _, req in parsed}) != len(parsed):  # the parsed (plain string) ids
            raise ProtocolError("handle_batch takes at most one message per session")
        opens: list[tuple[int, Request, _Session[A]]] = []
        located: list[tuple[int, _Session[A], Request]] = []
        for i, req in parsed:
            try:
                if req.stage is Stage.OPEN:
                    opens.append((i, req, self._new_session(req)))
                else:
                    located.append((i, self._session_for(req), req))
            except SCXError as exc:
                out[i] = exc
        located.sort(key=lambda t: t[2].session)  # locks taken in one global order: no deadlock
        closes: list[tuple[int, _Session[A], Request]] = []
        mids: list[_Mid[A]] = []
        computed: list[tuple[int, _Session[A], Request, int, tuple[dict[str, A], Callable[[], None]]]] = []
        release: dict[int, Callable[[], None]] = {}  # per slot that reserved: what takes it back
        with contextlib.ExitStack() as held:
            try:  # check and compute every request: no session changes yet
                for i, s, req in located:
                    held.enter_context(s.lock)  # sessions are distinct: no lock is taken twice
                    try:
                        self._admit(s, req)
                        if req.stage is Stage.CLOSE:
                            closes.append((i, s, req))
                            continue
                        mid = req.stage is Stage.GEN_MID
                        x = self._arr(req, "x", (1, self.c.hidden_size)) if mid else None
                        grow = self._growth(s, req)
                        self._reserve(grow, req)
                    except SCXError as exc:
                        out[i] = exc
                        continue
                    release[i] = self._release(s, req, grow)
                    if x is not None:
                        mids.append((i, s, req, x, grow))
                        continue
                    try:
                        computed.append((i, s, req, grow, self._handler(req.stage)(s, req)))
                    except SCXError as exc:  # refused by its stage: its charge and bytes taken back
                        release.pop(i)()
                        out[i] = exc
                groups: dict[tuple[int, int], list[_Mid[A]]] = {}
                for item in mids:
                    groups.setdefault((item[1].middle.start, item[1].middle.stop), []).append(item)
                for items in groups.values():
                    results = self._mid_compute([(s, req, x) for _, s, req, x, _ in items])
                    computed += [
                        (i, s, req, grow, result)
                        for (i, s, req, _, grow), result in zip(items, results, strict=True)
                    ]
                now = self.clock()  # read before the first change: the changes below read nothing
            except BaseException:
                for undo in release.values():
                    undo()
                raise
            try:  # every change: the closes first (room for the opens), then the stages, then the opens
                for i, s, req in closes:
                    self._close(req.session, s)
                    out[i] = Reply(req.session, Stage.CLOSE, req.layer, req.step, req.seq, {})
                for i, s, req, grow, (arrays, commit) in computed:
                    out[i] = self._finish(s, req, arrays, commit, grow, now)
                    del release[i]
            except BaseException:  # a change that failed (a bug): release what the rest reserved
                for undo in release.values():
                    undo()
                raise
            for i, req, fresh in opens:
                try:
                    out[i] = self._register(req, fresh, now)
                except SCXError as exc:  # its nonce seen, a token, or the server full: nothing changed
                    out[i] = exc
        return [r for r in out if r is not None]

    def _release(self, s: _Session[A], req: Request, grow: int) -> Callable[[], None]:
        """What takes back the cache bytes ``req`` reserved (``grow``, its key commitment) and the flop
        meter charges its stage makes from now on (:func:`_meter_undo`)."""
        undo_meter = _meter_undo(s.meter, req.stage)

        def undo() -> None:
            undo_meter()
            self._unreserve(grow, req)

        return undo

    def drop(self, session: str) -> bool:
        """End ``session`` now, without its token (its connection ended: the service that holds the
        connection calls this); frees its caches. False when there was no such session (``session`` not
        a string included)."""
        if not isinstance(session, str):
            return False
        with self._table_lock:
            s = self.sessions.get(session)
        if s is None:
            return False
        with s.lock, self._table_lock:
            if s.closed:
                return False
            self._evict(session, s)
        return True

    def _admit(self, s: _Session[A], req: Request) -> None:
        """Check ``req`` against its session (held under its lock): open, in order, fields (no changes)."""
        if s.closed:  # closed or evicted while this message waited for the lock
            raise SessionError(_NO_SESSION)
        if req.seq != s.seq:
            raise ProtocolError(f"message out of order: expected seq {s.seq}, got {req.seq}")
        self._check_order(s, req)
        self._check_fields(s, req)
        if req.meta.get("wide", False) is True and not s.wide:
            raise ProtocolError(f"{req.stage.value}: a float64 blinded message in a session not opened wide")
        if (
            req.meta.get("wide", False) is True
            and req.stage in _NORMED
            and req.meta.get("normalized") is not True
        ):
            # wide is for blinded rows, which the client normalizes (DESIGN §5.1: the client applies the
            # norm whenever the rows are noised); the server's own norm runs in its own dtype
            raise ProtocolError(
                f"{req.stage.value}: a float64 (wide) message must carry rows the client normalized "
                "(normalized true)"
            )

    def _finish(
        self,
        s: _Session[A],
        req: Request,
        arrays: dict[str, A],
        commit: Callable[[], None],
        grow: int,
        now: float | None = None,
    ) -> Reply:
        """Apply an accepted message's state changes (``commit``, its reserved ``grow`` bytes, its seq) and
        reply. The clock is read first (``now``: already read), so a clock that raises changes nothing."""
        last_used = self.clock() if now is None else now
        commit()
        self._settle(req)
        s.cache_bytes += grow
        s.seq += 1
        s.last_used = last_used
        return Reply(req.session, req.stage, req.layer, req.step, req.seq, arrays)

    def cost(self, session: str) -> CostMeter:
        """The server-side flop meter of ``session`` (an open session; SessionError otherwise)."""
        s = self.sessions.get(session) if isinstance(session, str) else None
        if s is None:
            raise SessionError(_NO_SESSION)
        return s.meter

    @property
    def cache_bytes(self) -> int:
        """Bytes of every open session's caches together (what ``max_cache_bytes`` bounds)."""
        return self._cache_bytes

    def evict_idle(self) -> int:
        """Evict every session idle for longer than the TTL (and not busy); returns how many
        (:meth:`evict_idle_sessions` names them)."""
        return len(self.evict_idle_sessions())

    def evict_idle_sessions(self) -> list[str]:
        """Evict every session idle for longer than the TTL (and not busy, which is skipped); returns the
        ids of the sessions evicted, each once, so whoever tracks sessions by id (the service's streams)
        can forget them."""
        with self._table_lock:
            return self._evict_idle_locked()

    # -- request checks (no state) ---------------------------------------------------------------
    def _parse(self, req: object) -> Request:
        """``req`` with every field type-checked and its stage parsed (ProtocolError otherwise). Says
        nothing about any session.

        Guarantee: the result is a new Request built from one snapshot of ``req``, taken before anything
        is checked — each field read once, the session id and token copied into plain strings, ``arrays``
        and ``meta`` each read once into a plain dict with plain string keys (a ``meta`` string or list
        copied too, :func:`_snapshot`) — and only that snapshot is checked and then used, so an in-process
        object that answers differently on a second read (a Mapping, a str or Request subclass) cannot
        pass the checks with one value and be computed with another."""
        if not isinstance(req, Request):
            raise ProtocolError(f"a request must be a Request, got {type(req).__name__}")
        session, stage_in, layer_in, step_in = req.session, req.stage, req.layer, req.step
        seq_in, arrays_in, meta_in, token = req.seq, req.arrays, req.meta, req.token
        if not isinstance(session, str):
            raise ProtocolError(f"a session id is {_SESSION_HEX} lowercase hex digits (the nonce)")
        session = str.__str__(session)  # a plain copy (a str subclass's own methods are never called)
        if len(session) != _SESSION_HEX:
            raise ProtocolError(f"a session id is {_SESSION_HEX} lowercase hex digits (the nonce)")
        field_hex(session, "session id", _SESSION_HEX)
        try:
            stage = Stage(stage_in)
        except ValueError:
            raise ProtocolError(f"unknown stage {stage_in!r:.40}") from None
        layer = field_int(layer_in, "layer", -1, self.c.n_layers)
        step = field_int(step_in, "step", -1, self.c.max_positions)
        seq = field_int(seq_in, "seq", 0, 1 << 62)
        if isinstance(token, str):
            token = str.__str__(token)
        if not isinstance(token, str) or len(token) > 256 or not token.isascii():
            raise ProtocolError("token must be an ASCII string of at most 256 characters")
        arrays = _snapshot(arrays_in, "arrays", meta=False)
        meta = _snapshot(meta_in, "meta", meta=True)
        unknown = sorted(set(arrays) - _ARRAYS[stage])
        if unknown:
            raise ProtocolError(
                f"{stage.value} message carries unknown array(s) {unknown}; allowed: {sorted(_ARRAYS[stage])}"
            )
        known_fields(meta, _META[stage], f"{stage.value} message")
        size = _nbytes(arrays)
        if size > self.limits.max_message_bytes:
            raise LimitError(
                f"message of {size} bytes exceeds the server's limit of {self.limits.max_message_bytes}"
            )
        return Request(session, stage, layer, step, seq, arrays, meta, token)

    def _session_for(self, req: Request) -> _Session[A]:
        """The session of ``req`` if its token is right; one SessionError for every other case."""
        with self._table_lock:
            s = self.sessions.get(req.session)
            if s is not None and self._expired(s) and s.lock.acquire(blocking=False):
                try:
                    self._evict(req.session, s)
                finally:
                    s.lock.release()
                s = None
        expected = s.token if s is not None else _DUMMY_TOKEN
        ok = hmac.compare_digest(req.token.encode("utf-8"), expected.encode("utf-8"))
        if s is None or not ok:
            raise SessionError(_NO_SESSION)
        return s

    def _check_fields(self, s: _Session[A], req: Request) -> None:
        """Every ``meta`` field of ``req`` typed and range-checked for its stage."""
        m, stage, c = req.meta, req.stage, self.c
        for key in ("normalized", "trace", "last", "wide"):
            if key in m:
                field_bool(m[key], key)
        if stage is Stage.QKV:
            if "commit" not in m:
                raise ProtocolError("qkv message lacks the key commitment")
            field_hex(m["commit"], "commit", 64)
        if stage is Stage.SHARE and "salt" not in m:
            raise ProtocolError(f"share message for block {req.layer} lacks its salt")
        if stage is Stage.GEN_FFN_UP and m.get("normalized", True) is not True:
            raise ProtocolError("gen_ffn_up takes normalized rows (normalized must be true)")
        takes_experts = stage in (Stage.FFN_DOWN, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN) or (
            stage is Stage.FFN and m.get("normalized", False)
        )
        if "experts" in m and not (c.is_moe and takes_experts):
            raise ProtocolError(f"{stage.value} message carries experts it cannot use")
        if "trace" in m and stage is Stage.FFN and m.get("normalized", False):
            raise ProtocolError("ffn: trace is for the un-normalized (whole-MLP) stage only")

    def _growth(self, s: _Session[A], req: Request) -> int:
        """Bytes the session's caches grow by if ``req`` is accepted (negative: they shrink)."""
        c, stage, item = self.c, req.stage, self._itemsize
        kv = 2 * c.kv_dim
        if stage is Stage.QKV:
            return self._raw_bytes(s, req)
        if stage is Stage.LOCK:
            return (s.n + s.r_lock) * c.kv_dim * item
        if stage is Stage.SHARE:  # the valid cache (in the server's dtype) replaces the raw one
            raw = s.raw_bytes.get(req.layer, (s.n + s.r1) * (c.q_dim + kv) * item)
            return s.n * kv * item - raw
        if stage is Stage.GEN_MID:
            return len(s.middle) * kv * item
        if stage is Stage.GEN_LAST:
            return c.kv_dim * item
        return 0

    def _raw_bytes(self, s: _Session[A], req: Request) -> int:
        """What the raw cache a QKV message leaves counts: Z's rows ((n + r1) × (q + 2·kv), a bound on
        the Z_k, Z_v kept) at the width Z is computed in — float64 for a wide message (its raw cache stays
        float64 until key sharing removes α W from it)."""
        c = self.c
        item = self._be(req).numpy_dtype().itemsize
        return (s.n + s.r1) * (c.q_dim + 2 * c.kv_dim) * item

    def _reserve(self, grow: int, req: Request) -> None:
        """Reserve the cache bytes of ``req`` and, for a QKV message, claim its key commitment (refused
        when seen before or in flight); :meth:`_unreserve` undoes both, :meth:`_settle` keeps them."""
        with self._table_lock:
            if grow > 0 and self._cache_bytes + grow > self.limits.max_cache_bytes:
                raise LimitError(
                    f"{req.stage.value}: the server's caches would exceed their limit of "
                    f"{self.limits.max_cache_bytes} bytes; retry later"
                )
            if req.stage is Stage.QKV:
                commit_hex = str(req.meta["commit"])
                if commit_hex in self._commits or commit_hex in self._pending:
                    raise SessionError("key commitment seen before: a replayed message is refused")
                self._pending.add(commit_hex)
            self._cache_bytes += grow

    def _unreserve(self, grow: int, req: Request) -> None:
        """Undo :meth:`_reserve` for a message that failed after it."""
        with self._table_lock:
            self._cache_bytes -= grow
            if req.stage is Stage.QKV:
                self._pending.discard(str(req.meta["commit"]))

    def _settle(self, req: Request) -> None:
        """Remember the key commitment of an accepted QKV message."""
        if req.stage is Stage.QKV:
            with self._table_lock:
                commit_hex = str(req.meta["commit"])
                self._pending.discard(commit_hex)
                _remember(self._commits, commit_hex, self.limits.commit_memory)

    # -- session table ------------------------------------------------------------------------------
    def _expired(self, s: _Session[A], now: float | None = None) -> bool:
        return (self.clock() if now is None else now) - s.last_used > self.limits.idle_ttl

    def _evict(self, sid: str, s: _Session[A], *, closed: bool = False) -> None:
        """Drop session ``sid`` and its caches (the server-wide lock is held); counted in :attr:`evictions`
        unless its own ``close`` ended it (``closed``)."""
        if not closed:
            self.evictions += 1
        s.closed = True
        self._cache_bytes -= s.cache_bytes
        s.cache_bytes = 0
        s.raw.clear()
        s.raw_bytes.clear()
        s.valid.clear()
        s.locked.clear()
        self.sessions.pop(sid, None)

    def _evict_idle_locked(self, now: float | None = None) -> list[str]:
        evicted: list[str] = []
        for sid, s in list(self.sessions.items()):
            if self._expired(s, now) and s.lock.acquire(blocking=False):
                try:
                    self._evict(sid, s)
                    evicted.append(sid)
                finally:
                    s.lock.release()
        return evicted

    def _close(self, sid: str, s: _Session[A]) -> None:
        with self._table_lock:
            self._evict(sid, s, closed=True)

    def _handler(
        self, stage: Stage
    ) -> Callable[[_Session[A], Request], tuple[dict[str, A], Callable[[], None]]]:
        """The method that computes ``stage`` (looked up on the instance by name, :data:`_HANDLERS`: one
        attribute read a message, where building the table of bound methods cost ~2.6 µs)."""
        handler: Callable[[_Session[A], Request], tuple[dict[str, A], Callable[[], None]]] = getattr(
            self, _HANDLERS[stage]
        )
        return handler

    def _open(self, req: Request) -> Reply:
        """Open a session: every field checked, the limits applied, a fresh token in the reply's meta."""
        s = self._new_session(req)
        return self._register(req, s, self.clock())

    def _new_session(self, req: Request) -> _Session[A]:
        """The session an ``open`` asks for, every field checked against the limits, with a fresh token;
        nothing changes (:meth:`_register` adds it to the table)."""
        if req.seq != 0 or req.layer != -1 or req.step != -1:
            raise ProtocolError("open must be message 0 with layer −1 and step −1")
        if req.arrays:
            raise ProtocolError("open carries no arrays")
        m, lim, c = req.meta, self.limits, self.c
        missing = sorted(_META[Stage.OPEN] - _OPEN_OPTIONAL - set(m))
        if missing:
            raise ProtocolError(f"open message lacks field(s) {missing}")
        n = field_int(m["n"], "n", 1, c.max_positions)
        r1, r2, r_lock = (field_int(m[k], k, 0, 1 << 62) for k in ("r1", "r2", "r_lock"))
        if max(r1, r2, r_lock) > lim.max_decoys:
            raise LimitError(
                f"{max(r1, r2, r_lock)} decoy rows at one stage exceed the server's limit of {lim.max_decoys}"
            )
        l_s = field_int(m["l_s"], "l_s", 1, 1 << 16)  # guards beyond the model are clamped to it
        l_e = field_int(m["l_e"], "l_e", 1, 1 << 16)
        max_length = field_int(m["max_length"], "max_length", n, c.max_positions)
        level = field_str(m["level"], "level", LEVELS)
        attention = field_str(m.get("attention", "server"), "attention", ATTENTION_SITES)
        gen_attention = field_str(m.get("gen_attention", "client"), "gen_attention", GEN_ATTENTION_SITES)
        if attention == "client" and gen_attention == "server":
            raise ProtocolError("open: gen_attention 'server' contradicts attention 'client'")
        gen_linear = field_str(m.get("gen_linear", "client"), "gen_linear", GEN_LINEAR_SITES)
        wide = field_bool(m.get("wide", False), "wide")
        rows = max_length + max(r1, r2, r_lock)
        if rows > lim.max_rows:
            raise LimitError(f"a session of {rows} rows exceeds the server's limit of {lim.max_rows} rows")
        return _Session(
            n,
            r1,
            r2,
            r_lock,
            *guard_blocks(c.n_layers, l_s, l_e),
            max_length,
            attention,
            gen_attention,
            gen_linear,
            wide,
            level=level,
            token=secrets.token_urlsafe(32),  # 256 bits from the OS CSPRNG
        )

    def _register(self, req: Request, s: _Session[A], now: float) -> Reply:
        """Add ``open`` message ``req``'s new session ``s`` (:meth:`_new_session`), stamped ``now``, to the
        table — unless its nonce was seen, it carries a token, or the server is full once the idle
        sessions are evicted (read at ``now``: no clock read here) — and reply with its token."""
        lim = self.limits
        with self._table_lock:
            if req.session in self.sessions or req.session in self._nonces:
                raise SessionError("this nonce already opened a session: a nonce must never be reused")
            if req.token:  # after the nonce: a second open of a session is refused as such
                raise ProtocolError("open carries no session token (its reply gives the session one)")
            if len(self.sessions) >= lim.max_sessions:
                self._evict_idle_locked(now)
            if len(self.sessions) >= lim.max_sessions:
                raise LimitError(f"the server holds its limit of {lim.max_sessions} sessions; retry later")
            s.last_used = now
            self.sessions[req.session] = s
            _remember(self._nonces, req.session, lim.nonce_memory)
        return Reply(req.session, Stage.OPEN, -1, -1, 0, {}, {"token": s.token})

    def _check_order(self, s: _Session[A], req: Request) -> None:
        L, stage, layer = self.c.n_layers, req.stage, req.layer
        if stage.phase is not Phase.GENERATE and req.step != -1:
            raise ProtocolError(f"{stage.value} is not a generation stage: its step must be −1")
        if stage is Stage.CLOSE:
            if layer != -1:
                raise ProtocolError("close takes layer −1")
            return
        if stage in PREFILL_BLOCK_STAGES or stage is Stage.HEAD:
            if s.head_done:
                raise ProtocolError(f"prefill stage {stage.value!r} after the prefill finished")
            if stage is Stage.HEAD:
                if layer != L:
                    raise ProtocolError(f"the head stage has layer {L}, got {layer}")
                if s.ffn_done != L - 1:
                    raise ProtocolError("head stage before every block's FFN stage")
                return
            if not 0 <= layer < L:
                raise ProtocolError(f"layer {layer} out of range 0..{L - 1}")
            if stage is Stage.ATTN and s.attention == "client" and layer not in s.middle:
                raise ProtocolError(f"attention of guard block {layer} is the client's (attention='client')")
            if stage is Stage.QKV:
                if layer != s.layer + 1 or s.ffn_done != layer - 1:
                    raise ProtocolError(f"qkv stage of block {layer} out of order")
            elif layer != s.layer:
                raise ProtocolError(f"{stage.value} stage for block {layer} while block {s.layer} is running")
            return
        if not s.head_done:
            raise ProtocolError(f"stage {stage.value!r} before the prefill finished")
        if stage is Stage.LOCK and (layer not in s.last or s.attention == "client"):
            raise ProtocolError(
                f"block {layer} has no locked cache (not a last guard block, or client attention)"
            )
        if stage is Stage.SHARE and layer not in s.middle:
            raise ProtocolError(
                f"key for block {layer} refused: only middle blocks {list(s.middle)} are shared"
            )
        if stage.phase is Phase.GENERATE:
            if req.step not in (s.step, s.step + 1) or req.step < 0:
                raise ProtocolError(f"generation step {req.step} out of order (at step {s.step})")
            if s.n + req.step >= s.max_length:
                raise ProtocolError(
                    f"position {s.n + req.step} is past the session's max length {s.max_length}"
                )
            client_attn = s.attention == "client"
            guards = set(s.first) | set(s.last)
            if stage is Stage.GEN_QKV and layer not in (guards if client_attn else set(s.first)):
                raise ProtocolError(
                    f"gen_qkv for block {layer}: not a first guard block (nor a client-attention guard block)"
                )
            if stage is Stage.GEN_ATTN and layer not in server_gen_attention(
                s.first, s.attention, s.gen_attention
            ):
                raise ProtocolError(
                    f"gen_attn for block {layer}: not a first guard block, or the client's attention "
                    "(attention 'client' or gen_attention 'client')"
                )
            if stage is Stage.GEN_LAST and (layer not in s.last or client_attn):
                raise ProtocolError(
                    f"gen_last for block {layer}: not a last guard block, or client attention"
                )
            if stage is Stage.GEN_O and (layer not in guards or s.gen_linear != "server"):
                raise ProtocolError(f"gen_o for block {layer}: not a guard block, or W_o is the client's")
            if stage is Stage.GEN_HEAD and (layer != L or s.gen_linear != "server"):
                raise ProtocolError("gen_head: the LM head of a generation step is the client's here")
            if stage is Stage.GEN_MID and (not s.middle or layer != s.middle.start):
                raise ProtocolError(f"gen_mid names the first middle block; block {layer} is not it")
            guard_ffn = (Stage.GEN_FFN, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, Stage.GEN_ROUTER)
            if stage in guard_ffn and layer not in guards:
                raise ProtocolError(f"{stage.value} for block {layer}, which is not a guard block")
            if stage is Stage.GEN_MID and set(s.middle) - set(s.valid):
                raise ProtocolError("gen_mid before every middle block's key was shared")
            if stage is Stage.GEN_LAST and layer not in s.locked:
                raise ProtocolError(f"gen_last for block {layer} before its locked cache was stored")
            done = (stage, -1 if stage is Stage.GEN_MID else layer)  # gen_mid runs every middle block
            if stage in (Stage.GEN_MID, Stage.GEN_LAST) and req.step == s.step and done in s.gen_done:
                raise ProtocolError(
                    f"{stage.value} for block {layer} already ran at step {req.step} (a replay)"
                )
            # the row of step t sits at position n + t: the cache it extends must hold every earlier
            # position (a skipped step would leave the cache's rows and their RoPE positions apart)
            if stage is Stage.GEN_MID:
                have, want = self.b.nrows(s.valid[s.middle.start][0]), s.n + req.step
            elif stage is Stage.GEN_LAST:
                have, want = self.b.nrows(s.locked[layer]), s.n + s.r_lock + req.step
            else:
                return
            if have != want:
                raise ProtocolError(
                    f"{stage.value} for block {layer} at step {req.step}: its cache holds {have} rows where "
                    f"step {req.step} needs {want} (an earlier step's row is missing)"
                )

    def _arr(self, req: Request, name: str, shape: tuple[int, ...], *, finite: bool = True) -> A:
        """The message's array ``name``, checked (present, floating, of ``shape``, finite). ``finite=False``
        leaves the finiteness test to the caller's norm (:meth:`_normed`), which reads every entry first."""
        if name not in req.arrays:
            raise ProtocolError(f"{req.stage.value} message lacks array {name!r}")
        return self._be(req).check(req.arrays[name], f"{req.stage.value}.{name}", shape, finite=finite)

    def _normed(self, req: Request, name: str, shape: tuple[int, ...], which: NormName, layer: int) -> A:
        """The RMSNorm ``which`` of the message's array ``name``, which is checked as :meth:`_arr` checks
        it — its finiteness in the norm's own pass (Backend.norm with a name: one read of the rows)."""
        x = self._arr(req, name, shape, finite=False)
        return self.b.norm(x, which, layer, name=f"{req.stage.value}.{name}")

    def _be(self, req: Request) -> Backend[A]:
        """The backend a message is computed on: the float64 twin for a blinded message sent wide
        (``SCXConfig.blind_dtype``: β above the float32 limit), else the server's own."""
        return self.b.widened() if req.meta.get("wide", False) is True else self.b

    def _experts(self, req: Request) -> np.ndarray | None:
        """The experts a blinded MoE message names (None for a dense model): 1 to top_k sorted, distinct
        expert ids (the client sends one per message)."""
        if not self.c.is_moe:
            return None
        if "experts" not in req.meta:
            raise ProtocolError(f"{req.stage.value} on an MoE layer needs meta['experts']")
        return np.asarray(field_experts(req.meta["experts"], self.c.n_experts, self.c.top_k), dtype=np.int64)

    @staticmethod
    def _nothing() -> None:
        return None

    # -- prefill stages ------------------------------------------------------------------------
    def _qkv(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows, layer = self.c, s.n + s.r1, req.layer
        commit_hex = str(req.meta["commit"])  # checked by _check_fields
        normalized = req.meta.get("normalized", False) is True  # the client normalizes noised rows
        wide = req.meta.get("wide", False) is True
        if normalized:
            x = self._arr(req, "x", (rows, c.hidden_size))
        else:
            x = self._normed(req, "x", (rows, c.hidden_size), "attn", layer)
        z = self._be(req).project(x, "wqkv", layer)
        s.meter.matmul(Stage.QKV, rows, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
        kv = self.b.compact(self.b.narrow(z, 1, c.q_dim, c.q_dim + 2 * c.kv_dim))  # not Q's memory too
        zk = self.b.narrow(kv, 1, 0, c.kv_dim)
        zv = self.b.narrow(kv, 1, c.kv_dim, 2 * c.kv_dim)

        raw_bytes = self._raw_bytes(s, req)

        def commit() -> None:
            s.layer = layer
            s.raw[layer] = (zk, zv)
            s.raw_bytes[layer] = raw_bytes
            s.commits[layer] = commit_hex
            if normalized:
                s.noised_qkv[layer] = wide

        return {"z": z}, commit

    def _attn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, n = self.c, s.n
        q = self._arr(req, "q", (n, c.n_heads, c.head_dim))
        k = self._arr(req, "k", (n, c.n_kv_heads, c.head_dim))
        v = self._arr(req, "v", (n, c.n_kv_heads, c.head_dim))
        pos = np.arange(n)
        s.meter.attention(Stage.ATTN, c.n_heads, n, n, c.head_dim, "server")
        return {"o": self.b.attention(q, k, v, pos, pos)}, self._nothing

    def _o(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows = self.c, s.n + s.r2
        x = self._arr(req, "x", (rows, c.q_dim))
        s.meter.matmul(Stage.O, rows, c.q_dim, c.hidden_size, "server")
        return {"y": self._be(req).project(x, "wo", req.layer)}, self._nothing

    def _mlp_flops(self, meter: CostMeter, stage: Stage, rows: int, experts: int) -> None:
        c = self.c
        meter.matmul(stage, rows * experts, c.hidden_size, 3 * c.intermediate_size, "server")
        if c.is_moe:  # the router is a matrix product too
            meter.matmul(stage, rows, c.hidden_size, c.n_experts, "server")

    def _ffn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows, layer = self.c, s.n + s.r1, req.layer
        if req.meta.get("normalized", False):  # level blind: blinded gate/up input
            experts = self._experts(req)
            x = self._arr(req, "x", (rows, c.hidden_size))
            width = 2 * c.intermediate_size * (1 if experts is None else len(experts))
            s.meter.matmul(Stage.FFN, rows, c.hidden_size, width, "server")
            return {"y": self._be(req).project(x, "w_gate_up", layer, experts)}, self._nothing
        xh = self._normed(req, "x", (rows, c.hidden_size), "mlp", layer)
        self._mlp_flops(s.meter, Stage.FFN, rows, c.top_k if c.is_moe else 1)

        def commit() -> None:
            s.ffn_done = layer

        return self._mlp_reply(req, xh), commit

    def _mlp_reply(self, req: Request, xh: A) -> dict[str, A]:
        """The block's MLP on the server's own norm ``xh`` of the rows sent
        (:func:`~scx_ref.protocol.mlp.traced_mlp`): ``{"y": …}``, plus its intermediates when the client
        asks for them (``trace``) to verify it."""
        y, parts = traced_mlp(self.b, xh, req.layer)
        return {"y": y, **parts} if req.meta.get("trace", False) else {"y": y}

    def _ffn_down(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows, layer = self.c, s.n + s.r1, req.layer
        experts = self._experts(req)
        width = c.intermediate_size * (1 if experts is None else len(experts))
        m = self._arr(req, "m", (rows, width))
        s.meter.matmul(req.stage, rows, width, c.hidden_size, "server")
        y = self._be(req).project(m, "w_down", layer, experts)

        def commit() -> None:
            if req.meta.get("last", True):
                s.ffn_done = layer

        return {"y": y}, commit

    def _router(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows = self.c, s.n + s.r1
        x = self._arr(req, "x", (rows, c.hidden_size))
        s.meter.matmul(Stage.ROUTER, rows, c.hidden_size, c.n_experts, "server")
        return {"y": self._be(req).project(x, "router", req.layer)}, self._nothing

    def _head(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, rows = self.c, s.n + s.r1
        if req.meta.get("normalized", False):
            x = self._arr(req, "x", (rows, c.hidden_size))
        else:
            x = self._normed(req, "x", (rows, c.hidden_size), "final", -1)
        s.meter.matmul(Stage.HEAD, rows, c.hidden_size, c.vocab_size, "server")

        def commit() -> None:
            s.head_done = True

        return {"logits": self._be(req).project(x, "lm_head")}, commit

    def _lock(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        k = self._arr(req, "k", (s.n + s.r_lock, self.c.kv_dim))
        if req.layer in s.locked:
            raise ProtocolError(f"block {req.layer} already has a locked cache")

        k = self.b.compact(k)  # the server's own copy: the checked array may be the sender's (in-process)
        # or a view that keeps a larger base alive, which the cache-byte count would not see

        def commit() -> None:
            s.locked[req.layer] = k

        return {}, commit

    def _share(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, n, layer = self.c, s.n, req.layer
        if layer in s.valid:
            raise ProtocolError(f"block {layer}'s key was already shared")
        self._check_share_arrays(s, req)
        try:
            perm: np.ndarray[Any, np.dtype[np.int64]] = check_permutation(
                req.arrays.get("perm"), n + s.r1, "shared permutation"
            ).astype(np.int64)
            salt = bytes.fromhex(field_hex(req.meta.get("salt"), "salt", 64))
        except (KeyError, ValueError, TypeError) as exc:  # every SCXError (PermutationError) is a ValueError;
            # TypeError: a ``perm`` numpy cannot read (a tensor of a dtype numpy lacks, in-process)
            raise ProtocolError(f"share message for block {layer} is malformed: {exc}") from exc
        if not hmac.compare_digest(commitment(salt, req.session, layer, perm), s.commits.get(layer, "")):
            raise SessionError(
                f"the key offered for block {layer} does not match that block's commitment "
                "(a key for the wrong layer, or from another session)"
            )
        b, wb = self.b, self._be(req)
        zk, zv = s.raw[layer]
        if "alpha" in req.arrays:  # a noised QKV stage (checked): remove α W from the raw cache (T5 decode)
            alpha = self._arr(req, "alpha", (n + s.r1, c.hidden_size))
            corr = wb.correction(alpha, "wqkv", layer)
            s.meter.matmul(Stage.SHARE, n + s.r1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
            zk = unblind(
                wb.floating(zk, "raw k", finite=False), wb.narrow(corr, 1, c.q_dim, c.q_dim + c.kv_dim), wb
            )
            zv = unblind(
                wb.floating(zv, "raw v", finite=False),
                wb.narrow(corr, 1, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim),
                wb,
            )
        zk, zv = (
            b.floating(zk, "raw k", finite=False),
            b.floating(zv, "raw v", finite=False),
        )  # the cache's dtype
        shape = (n, c.n_kv_heads, c.head_dim)
        k = b.rope(b.reshape(decode_rows(zk, perm, n, b), shape), np.arange(n))  # T1 + T2 decode
        v = b.reshape(decode_rows(zv, perm, n, b), shape)

        def commit() -> None:
            s.valid[layer] = (k, v)
            del s.raw[layer]  # the valid cache replaces the encoded one
            s.raw_bytes.pop(layer, None)

        return {}, commit

    @staticmethod
    def _check_share_arrays(s: _Session[A], req: Request) -> None:
        """What a ``share`` of block ``req.layer`` must carry, as the honest client sends it
        (:meth:`~scx_ref.protocol.client.Client.share_keys`): ``perm`` always; ``alpha`` exactly when the
        block's QKV stage was noised — at level ``blind``, the rows the client normalized itself (it does so
        exactly when it noises them) — and then ``meta["wide"]`` exactly when that QKV message was wide.
        ProtocolError otherwise (a share without the noise would leave α W in the valid cache; one with
        noise never added would subtract it): nothing has changed yet."""
        layer = req.layer
        noised = s.level == "blind" and layer in s.noised_qkv
        if "perm" not in req.arrays:
            raise ProtocolError(f"share message for block {layer} lacks array 'perm'")
        if noised and "alpha" not in req.arrays:
            raise ProtocolError(
                f"share message for block {layer} lacks array 'alpha': at level blind its QKV stage was "
                "noised, so the key sharing must upload that noise"
            )
        if not noised and "alpha" in req.arrays:
            raise ProtocolError(
                f"share message for block {layer} carries array 'alpha', but its QKV stage was not noised "
                f"(level {s.level})"
            )
        wide = noised and s.noised_qkv[layer]
        if (req.meta.get("wide", False) is True) != wide:
            raise ProtocolError(
                f"share message for block {layer}: wide must be {str(wide).lower()}, as its QKV message was"
                if noised
                else f"share message for block {layer}: wide is for a share that carries 'alpha'"
            )

    # -- generation stages -----------------------------------------------------------------------
    def _gen_commit(
        self, s: _Session[A], step: int, extra: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        def commit() -> None:
            if step != s.step:
                s.gen_done = set()
            s.step = step
            if extra:
                extra()

        return commit

    def _gen_qkv(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        s.meter.matmul(Stage.GEN_QKV, 1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
        return {"z": self._be(req).project(x, "wqkv", req.layer)}, self._gen_commit(s, req.step)

    def _gen_attn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c, m = self.c, s.n + req.step + 1
        q = self._arr(req, "q", (1, c.n_heads, c.head_dim))
        k = self._arr(req, "k", (m, c.n_kv_heads, c.head_dim))
        v = self._arr(req, "v", (m, c.n_kv_heads, c.head_dim))
        s.meter.attention(Stage.GEN_ATTN, c.n_heads, 1, m, c.head_dim, "server")
        o = self.b.attention(q, k, v, np.array([m - 1]), None)
        return {"o": o}, self._gen_commit(s, req.step)

    def _gen_o(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        """W_o of a guard block on the step's (blinded) attention output (``gen_linear="server"``)."""
        c = self.c
        x = self._arr(req, "x", (1, c.q_dim))
        s.meter.matmul(Stage.GEN_O, 1, c.q_dim, c.hidden_size, "server")
        return {"y": self._be(req).project(x, "wo", req.layer)}, self._gen_commit(s, req.step)

    def _gen_head(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        """The LM head on the step's (blinded) normalized final row (``gen_linear="server"``)."""
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        s.meter.matmul(Stage.GEN_HEAD, 1, c.hidden_size, c.vocab_size, "server")
        return {"logits": self._be(req).project(x, "lm_head")}, self._gen_commit(s, req.step)

    def _gen_ffn(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        xh = self._normed(req, "x", (1, c.hidden_size), "mlp", req.layer)
        self._mlp_flops(s.meter, Stage.GEN_FFN, 1, c.top_k if c.is_moe else 1)
        return self._mlp_reply(req, xh), self._gen_commit(s, req.step)

    def _gen_ffn_up(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        experts = self._experts(req)
        x = self._arr(req, "x", (1, c.hidden_size))
        width = 2 * c.intermediate_size * (1 if experts is None else len(experts))
        s.meter.matmul(req.stage, 1, c.hidden_size, width, "server")
        return {"y": self._be(req).project(x, "w_gate_up", req.layer, experts)}, self._gen_commit(s, req.step)

    def _gen_ffn_down(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        experts = self._experts(req)
        width = c.intermediate_size * (1 if experts is None else len(experts))
        m = self._arr(req, "m", (1, width))
        s.meter.matmul(req.stage, 1, width, c.hidden_size, "server")
        return {"y": self._be(req).project(m, "w_down", req.layer, experts)}, self._gen_commit(s, req.step)

    def _gen_router(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        c = self.c
        x = self._arr(req, "x", (1, c.hidden_size))
        s.meter.matmul(Stage.GEN_ROUTER, 1, c.hidden_size, c.n_experts, "server")
        return {"y": self._be(req).project(x, "router", req.layer)}, self._gen_commit(s, req.step)

    def _gen_mid(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        """Run every middle block alone on the server's valid caches (DESIGN §5.3): plaintext blocks
        on the row entering them."""
        return self._mid_compute([(s, req, self._arr(req, "x", (1, self.c.hidden_size)))])[0]

    def _mid_compute(
        self, items: list[tuple[_Session[A], Request, A]]
    ) -> list[tuple[dict[str, A], Callable[[], None]]]:
        """The middle blocks of several sessions' rows (same middle range, validated), together:
        :func:`~scx_ref.forward.block_rows` on tiles of ``batch_rows``; per session its reply arrays and
        the commit of its extended caches."""
        b, c = self.b, self.c
        x = b.concat_rows([x for _, _, x in items]) if len(items) > 1 else items[0][2]
        pos = np.array([s.n + req.step for s, req, _ in items], dtype=np.int64)
        new: list[dict[int, tuple[A, A]]] = [{} for _ in items]
        for layer in items[0][0].middle:
            x, caches = block_rows(b, x, layer, pos, [s.valid[layer] for s, _, _ in items], self.batch_rows)
            for j, (s, _, _) in enumerate(items):
                new[j][layer] = caches[j]
                m = b.nrows(caches[j][0])
                s.meter.matmul(Stage.GEN_MID, 1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
                s.meter.attention(Stage.GEN_MID, c.n_heads, 1, m, c.head_dim, "server")
                s.meter.matmul(Stage.GEN_MID, 1, c.q_dim, c.hidden_size, "server")
                self._mlp_flops(s.meter, Stage.GEN_MID, 1, c.top_k if c.is_moe else 1)
        out: list[tuple[dict[str, A], Callable[[], None]]] = []
        for j, (s, req, _) in enumerate(items):

            def extra(s: _Session[A] = s, kv: dict[int, tuple[A, A]] = new[j]) -> None:
                s.valid.update(kv)
                s.gen_done.add((Stage.GEN_MID, -1))

            row = b.narrow(x, 0, j, j + 1) if len(items) > 1 else x
            out.append(({"x": row}, self._gen_commit(s, req.step, extra)))
        return out

    def _gen_last(self, s: _Session[A], req: Request) -> tuple[dict[str, A], Callable[[], None]]:
        """Scores of the new query against the locked cache (plus the new key), and the row's projection
        z = [q k v] before RoPE (the client takes v from it and checks it — DESIGN §5.5)."""
        b, c, layer = self.b, self.c, req.layer
        x = self._arr(req, "x", (1, c.hidden_size))
        pos = np.array([s.n + req.step])
        z = b.project(b.norm(x, "attn", layer), "wqkv", layer)
        q, k, _v = split_qkv(b, z)
        q, k = b.rope(q, pos), b.rope(k, pos)
        locked = b.append_rows(s.locked[layer], b.reshape(k, (1, c.kv_dim)))
        m = b.nrows(locked)
        scores = b.scores(q, b.reshape(locked, (m, c.n_kv_heads, c.head_dim)))
        s.meter.matmul(Stage.GEN_LAST, 1, c.hidden_size, c.q_dim + 2 * c.kv_dim, "server")
        s.meter.matmul(Stage.GEN_LAST, c.n_heads, c.head_dim, m, "server")

        def extra() -> None:
            s.locked[layer] = locked
            s.gen_done.add((Stage.GEN_LAST, layer))

        return {"scores": scores, "z": z}, self._gen_commit(s, req.step, extra)

    def sessions_snapshot(self, session: str) -> dict[str, Any]:
        """A deep numpy copy of a session's caches (for tests that check nothing changed)."""
        s = self.sessions.get(session) if isinstance(session, str) else None
        if s is None:
            raise SessionError(_NO_SESSION)
        to = self.b.to_numpy
        return {
            "seq": s.seq,
            "layer": s.layer,
            "ffn_done": s.ffn_done,
            "head_done": s.head_done,
            "step": s.step,
            "gen_done": sorted(s.gen_done),
            "raw": {k: (to(a), to(v)) for k, (a, v) in s.raw.items()},
            "valid": {k: (to(a), to(v)) for k, (a, v) in s.valid.items()},
            "locked": {k: to(a) for k, a in s.locked.items()},
            "commits": dict(s.commits),
            "cache_bytes": s.cache_bytes,
        }


#: Compared against when a session is unknown, so both failures take the same time.
_DUMMY_TOKEN = secrets.token_urlsafe(32)


def _meter_undo(meter: CostMeter, stage: Stage) -> Callable[[], None]:
    """What puts ``meter``'s costs of ``stage`` back as they are now. A handler charges only its own
    message's stage, so undoing that stage takes back everything a message that then failed charged."""
    stages = meter.stages
    if stage not in stages:

        def forget() -> None:
            stages.pop(stage, None)

        return forget
    saved = tuple(stages[stage].__dict__.values())  # the fields in order (cheap: no copy on success)

    def undo() -> None:
        stages[stage] = StageCost(*saved)

    return undo


def _remember(memory: OrderedDict[str, None], key: str, size: int) -> None:
    """Add ``key`` to a bounded memory (the oldest entries leave first)."""
    memory[key] = None
    while len(memory) > size:
        memory.popitem(last=False)


#: The types of a ``meta`` value a snapshot keeps as they are (immutable built-ins: nothing to copy).
_PLAIN_META = frozenset({int, bool, float, str, type(None)})
_STR = frozenset({str})


def _snapshot(value: object, what: str, *, meta: bool) -> dict[str, Any]:
    """A message's ``arrays`` or ``meta`` (``what``), read once into a plain dict with plain ``str`` keys
    (a str subclass's key copied: its own ``__hash__``/``__eq__`` are never called); for ``meta`` also each
    value a string (copied into a plain ``str``) or a list or tuple (copied into a plain list, read once).
    ProtocolError when ``value`` is not a mapping with string keys, or reading it raises: nothing of
    ``value`` is read again after this."""
    if not (type(value) is dict or isinstance(value, Mapping)):
        raise ProtocolError(f"{what} must be a mapping with string keys")
    try:
        # the one read (a Mapping: keys() once, then each value once); the usual case checked in C loops
        snap = value.copy() if type(value) is dict else dict(value)
        if _STR.issuperset(map(type, snap)) and (
            not meta or _PLAIN_META.issuperset(map(type, snap.values()))
        ):
            return snap
        if not all(isinstance(k, str) for k in snap):
            raise ProtocolError(f"{what} must be a mapping with string keys")
        out: dict[str, Any] = {}
        for k, v in snap.items():
            if meta and isinstance(v, str):
                v = str.__str__(v)
            elif meta and isinstance(v, (list, tuple)):
                v = list(v)
            out[str.__str__(k)] = v
        return out
    except SCXError:
        raise
    except Exception as exc:  # an in-process mapping (or a value) whose reading raised
        raise ProtocolError(f"{what} could not be read as a mapping ({type(exc).__name__})") from None


def _nbytes(arrays: Mapping[str, Any]) -> int:
    """Bytes of the arrays of a message, from their metadata (no conversion). A torch tensor counts its
    elements of any layout (read first: a sparse tensor's ``nbytes`` raises, where the array check refuses
    the tensor with a project error)."""
    total = 0
    for a in arrays.values():
        if hasattr(a, "element_size") and hasattr(a, "nelement"):
            total += int(a.element_size() * a.nelement())
        elif isinstance(getattr(a, "nbytes", None), int):
            total += int(a.nbytes)
    return total

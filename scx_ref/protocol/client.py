"""The trusted client (DESIGN §5): holds the key schedule, the embeddings, norms and RoPE, encodes
every message and decodes every reply, so that the decoded result is exactly plaintext inference.

Every encoding step is a transform of :mod:`scx_ref.transforms` run on the client's backend — T1+T2
(:func:`~scx_ref.transforms.encode_rows`: decoys appended and rows permuted in one pass,
:func:`~scx_ref.transforms.decode_rows`, :func:`~scx_ref.transforms.decode_rows_numpy`), T3
(:func:`~scx_ref.transforms.head_permute_stacked` for the RoPE'd Q and K heads in one gather,
:func:`~scx_ref.transforms.head_permute` / :func:`~scx_ref.transforms.head_unpermute`), T4
(:func:`~scx_ref.transforms.encode_rows` of the locked cache, :func:`~scx_ref.transforms.unlock_scores`),
T5 (:func:`~scx_ref.transforms.blind` / :func:`~scx_ref.transforms.unblind`) and T6 (Laplace noise drawn
by :class:`~scx_ref.protocol.keyring.RequestKeys`). Which messages are noised, and with which β and key,
is the :class:`~scx_ref.protocol.plan.ReleasePlan`'s decision, never the client's own.

Between blocks the residual stream stays *encoded*: the FFN stage of block i sends π_{i+1}(H ⊕ R) and
adds the server's reply in that order, which is exactly what block i+1's QKV stage sends (T1 for the
row-wise map x ↦ x + MLP(norm(x))), so no decode/re-encode happens between them.

Prefill (§5.1), key sharing (§5.2) and generation (§5.3) are methods; each message goes through a
:class:`~scx_ref.protocol.transport.Transport`. The client keeps only what the protocol says it keeps:
the first guard blocks' valid caches and the last guard blocks' values. Every key is re-derived from
the schedule when needed (:mod:`~scx_ref.protocol.keyring`), which is what makes it stateless; a request's
keys may also be derived before its prompt exists (:meth:`Client.precompute`,
:mod:`~scx_ref.protocol.prepare`), which takes them off the critical path without changing them.

Against an active server and other clients (DESIGN §5.5): every message after ``open`` carries the
session token the server returned; every reply is verified (:mod:`~scx_ref.protocol.verify`) before
anything derived from it is used or sent — a failed check raises IntegrityError, marks the session
failed and nothing more is sent on it; a (master, nonce) pair drives one session only; a session is
closed when its request ends (:meth:`Client.generate` closes it; a new :meth:`Client.prefill` closes the
previous one; :meth:`Client.close` does it explicitly).
"""

from __future__ import annotations

import functools
import hmac
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt

from .._checks import check_int, token_ids
from ..backends.base import A, Backend, IndexArray, NormName, WeightName, is_backend, out_width, split_qkv
from ..errors import IntegrityError, NonFiniteError, ProtocolError, SessionError, VocabularyError
from ..keys import KeySchedule
from ..sampling import greedy_tokens
from ..stages import Stage
from ..transforms import (
    Permutation,
    blind,
    decode_qkv_heads,
    decode_rows,
    decode_rows_numpy,
    encode_head_rows,
    encode_rows,
    head_permute,
    head_unpermute,
    reencode_sum,
    unblind,
    unlock_scores,
)
from .config import SCXConfig
from .cost import CostMeter, CostReport, StageCost
from .decoys import CalibrationPool, DecoyPolicy, GaussianDecoys, unigram_weights
from .keyring import RequestKeys
from .messages import Request
from .mlp import route
from .plan import ReleasePlan
from .prepare import PreparedKeys
from .transport import Transport
from .verify import SessionVerifier, SketchCache, check_reply

if TYPE_CHECKING:
    from .pool import MaskPool

__all__ = ["Client"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _one_call_at_a_time(method: F) -> F:
    """``method`` of a :class:`Client` run under the client's call guard (:meth:`Client._exclusive`)."""

    @functools.wraps(method)
    def run(self: Client[Any], *args: Any, **kwargs: Any) -> Any:
        with self._exclusive():
            return method(self, *args, **kwargs)

    return cast(F, run)


def _check_link(link: Any) -> None:
    """ProtocolError unless ``link`` is a transport (it has a ``send`` method): checked before a call
    changes anything, so a wrong argument neither claims a nonce nor fails the session."""
    if not callable(getattr(link, "send", None)):
        raise ProtocolError(f"link must be a Transport (with a send method), got {type(link).__name__}")


def _lock_sketch(v: SessionVerifier[Any], *, layer: int, locked: Any) -> None:
    """The verifier's sketch of block ``layer``'s locked key cache ``locked`` (:meth:`SessionVerifier.lock`),
    as a check :meth:`Client._verify` runs and meters."""
    v.lock(layer, locked)


def _same_master(a: KeySchedule, b: KeySchedule) -> bool:
    """Whether the schedules ``a`` and ``b`` share one master secret (compared through a key each derives
    under ``b``'s nonce, in constant time: the secrets themselves are never read)."""
    label = ("client", "sketch-owner")
    return hmac.compare_digest(a.for_nonce(b.nonce).key(label), b.key(label))


@dataclass
class _State(Generic[A]):
    """What the client keeps between calls for one session."""

    keys: RequestKeys
    prep: PreparedKeys[A]
    n: int
    seq: int
    step: int = 0
    shared: bool = False
    guard_k: dict[int, A] = field(default_factory=dict)  # first guard blocks: rows × H_kv × d_h (RoPE'd)
    guard_v: dict[int, A] = field(default_factory=dict)  # first and last guard blocks
    failed: bool = False
    closed: bool = False
    token: str = ""  # the session capability from open's reply
    link: Transport | None = None
    verifier: SessionVerifier[A] | None = None
    link_base: dict[Stage, StageCost] | None = None  # the link's meter when the session opened

    def fail(self) -> None:
        """Mark the session failed (nothing more is sent on it) and drop its unused one-time masks."""
        self.failed = True
        self.prep.forget_one_time()

    def end(self) -> None:
        """Mark the session closed (the server freed it) and drop its unused one-time masks."""
        self.closed = True
        self.prep.forget_one_time()


class Client(Generic[A]):
    """The SCX client. One prefill opens a session (one nonce); decode/generate continue it.

    ``keys``: the master secret and the first session's nonce (refused when that pair already drove a
    session). ``sketches``: the reply verifier's precomputation (:class:`~scx_ref.protocol.verify.
    SketchCache`) to share among clients of one backend and master secret (one of another backend or
    master secret is refused: ProtocolError); built here when None and ``config.verify`` is on.
    ``decoys``: the decoy policy; by default a calibration pool built here from ``public_tokens``, or —
    when None — from pseudo-texts the key schedule picks (:meth:`~scx_ref.protocol.decoys.CalibrationPool.
    secret`: a text the server knows lets it rebuild the pool and find every decoy; no row is handed out
    twice, so none recurs across this client's sessions),
    drawn from the public unigram distribution ``unigram`` when given (DESIGN §5.1; e.g.
    :func:`~scx_ref.protocol.decoys.unigram_counts` of a public text), else uniformly from the vocabulary.
    An argument of the wrong kind is refused (ProtocolError; a bad ``public_tokens``: VocabularyError,
    or ProtocolError when empty; a bad ``unigram``: the errors of ``secret_calibration_tokens``), and so is
    ``unigram`` with ``decoys``, ``public_tokens`` or ``config.decoys == "gaussian"`` (ProtocolError: no
    pool is then drawn from the secret text).

    A client runs one call at a time: a session is sequential. A call made while another thread's call
    (``prefill``, ``decode``, ``share_keys``, ``close``, ``generate``, ``precompute``) is running on the
    same client is refused (ProtocolError) and changes nothing; give each thread its own client.
    """

    def __init__(
        self,
        backend: Backend[A],
        keys: KeySchedule,
        config: SCXConfig | None = None,
        decoys: DecoyPolicy | None = None,
        public_tokens: IndexArray | None = None,
        sketches: SketchCache | None = None,
        unigram: npt.ArrayLike | None = None,
    ) -> None:
        if not is_backend(backend):
            raise ProtocolError(f"backend must be a Backend, got {type(backend).__name__}")
        if not isinstance(keys, KeySchedule):
            raise ProtocolError(f"keys must be a KeySchedule, got {type(keys).__name__}")
        if config is not None and not isinstance(config, SCXConfig):
            raise ProtocolError(f"config must be an SCXConfig, got {type(config).__name__}")
        if decoys is not None and not (
            isinstance(getattr(decoys, "needs_real", None), bool) and callable(getattr(decoys, "draw", None))
        ):
            raise ProtocolError(f"decoys must be a DecoyPolicy, got {type(decoys).__name__}")
        if sketches is not None and not isinstance(sketches, SketchCache):
            raise ProtocolError(f"sketches must be a SketchCache, got {type(sketches).__name__}")
        if unigram is not None and (
            decoys is not None
            or public_tokens is not None
            or (config is not None and config.decoys == "gaussian")
        ):
            raise ProtocolError(
                "unigram weighs the secret calibration text's draw: it means nothing with decoys, "
                "public_tokens or Gaussian decoys"
            )
        if unigram is not None:  # checked before the sketches are built, not when the pool is
            unigram = unigram_weights(unigram, backend.config.vocab_size)
        if keys.claims.claimed(keys.nonce):
            raise SessionError(
                "this KeySchedule's (master secret, nonce) pair already drove a session: a pair drives "
                "one session only (use KeySchedule.generate() or a fresh nonce)"
            )
        self.b = backend
        self.c = backend.config
        self.cfg = config or SCXConfig()
        self.plan = ReleasePlan.of(self.cfg, self.c)
        self.max_length = self.c.max_positions if self.cfg.max_length is None else self.cfg.max_length
        if self.max_length > self.c.max_positions:
            raise ProtocolError(
                f"max_length {self.max_length} exceeds the model's max_positions {self.c.max_positions}"
            )
        self._master_keys = keys
        self._next_nonce: bytes | None = keys.nonce
        self._busy = threading.Lock()  # held by the thread whose call is running (_exclusive)
        self._owner: int | None = None
        self.meter = CostMeter()
        self.sketches: SketchCache | None = None
        if self.cfg.verify:
            if sketches is None:
                sketches = SketchCache(backend, keys)
                sketches.build()  # offline, before any request
            elif sketches.b is not backend:
                raise ProtocolError("the sketch cache belongs to another backend")
            elif not _same_master(sketches.keys, keys):
                raise ProtocolError(
                    "the sketch cache belongs to another master secret: its check vectors are known to "
                    "whoever holds that secret (build a SketchCache from this client's KeySchedule)"
                )
            self.sketches = sketches
        self.verify_worst = 0.0  # the largest |residual|/tolerance of any check (the honest margin)
        self.state: _State[A] | None = None
        self._prepared: PreparedKeys[A] | None = None
        self.first, self.middle, self.last = self.cfg.blocks(self.c.n_layers)
        # blocks whose attention the client computes itself (DESIGN §5.7: attention="client")
        self.client_attention = frozenset((*self.first, *self.last) if self.cfg.attention == "client" else ())
        # first guard blocks whose generation attention the server computes (gen_attn; the paper's flow)
        self.server_gen_attention = frozenset(self.cfg.server_gen_attention(self.c.n_layers))
        # the dtype the backend computes in (a torch backend's bfloat16 too, which numpy lacks)
        computes_in = getattr(backend, "dtype", backend.numpy_dtype())
        # blinded messages travel and are multiplied in float64 above the β limit of the backend's dtype (§6)
        self.wide = self.cfg.wide_blinding(computes_in) and bool(self.plan.prefill or self.plan.generation)
        self.bb: Backend[A] = backend.widened() if self.wide else backend
        # a β past the limit of the dtype its blinded stages run in is taken, not refused: said, once per
        # place (a PrecisionWarning; README, "How large β may be")
        betas = [r.beta for r in (*self.plan.prefill, *self.plan.generation)]
        self.cfg.warn_precision(computes_in, betas)
        self.pool: MaskPool[A] | None = None  # offline masks for the next requests (protocol.pool)
        if decoys is not None:
            self.decoys: DecoyPolicy = decoys
        elif self.cfg.decoys == "gaussian":
            self.decoys = GaussianDecoys()
        elif public_tokens is None:  # a secret text, no row handed out twice (CalibrationPool.secret)
            self.decoys = CalibrationPool.secret(backend, keys, unigram)
        else:
            self.decoys = CalibrationPool.from_tokens(backend, token_ids(public_tokens, self.c.vocab_size))

    # -- helpers ---------------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the client for the calling thread (reentrant: ``generate`` calls ``prefill``); a call from
        another thread meanwhile is refused (ProtocolError) before it reads or changes anything."""
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        if not self._busy.acquire(blocking=False):
            raise ProtocolError(
                "this Client is in use by another thread: a client runs one call at a time (a session is "
                "sequential); give each thread its own Client"
            )
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._busy.release()

    @property
    def session(self) -> str:
        """The current session's public id (its nonce in hex); ProtocolError before the first prefill."""
        if self.state is None:
            raise ProtocolError("no session: call prefill first")
        return self.state.keys.session_id

    def _send(
        self,
        link: Transport,
        stage: Stage,
        layer: int,
        step: int,
        arrays: dict[str, Any],
        expect: Mapping[str, tuple[int, ...]],
        *,
        value_checked: Collection[str] = (),
        **meta: Any,
    ) -> tuple[dict[str, A], float]:
        """Send one message of the open session and return the reply's arrays once their structure
        passed (:func:`~scx_ref.protocol.verify.check_reply`) with the unit roundoff their value checks
        assume. Any failure marks the session failed; nothing is sent on a failed or closed session.
        ``value_checked``: reply arrays whose value check follows (it refuses what is not finite)."""
        st = self._require()
        req = Request(st.keys.session_id, stage, layer, step, st.seq, arrays, meta, st.token)
        try:
            reply = link.send(req)
            wire = self.bb if meta.get("wide", False) is True else self.b  # a wide reply stays float64
            got, u = self._guard(lambda: check_reply(wire, req, reply, expect, value_checked))
            if stage is Stage.OPEN:
                token = reply.meta.get("token") if isinstance(reply.meta, dict) else None
                if not isinstance(token, str) or not 16 <= len(token) <= 256:
                    self._guard(self._raise(IntegrityError("open: the reply carries no valid session token")))
                st.token = str(token)
        except BaseException:  # any error, ^C included, once the message may have gone: the server's
            st.fail()  # view of the session is unknown, so nothing more is sent on it
            raise
        st.seq += 1
        return got, u

    @staticmethod
    def _raise(exc: Exception) -> Callable[[], Any]:
        def fail() -> Any:
            raise exc

        return fail

    def _guard(self, check: Callable[[], Any]) -> Any:
        """Run a reply check: on IntegrityError the session is failed, the verifier's basis rotated and
        the error raised — nothing derived from the reply is used or sent."""
        try:
            return check()
        except IntegrityError:
            if self.state is not None:
                self.state.fail()
            if self.sketches is not None:
                self.sketches.rotate()
            raise

    def _consume(self, stage: Stage, build: Callable[[], T]) -> T:
        """Build the next message (or the output) from a reply whose finiteness ``build`` tests in the
        pass that reads it (a reply named in :meth:`_send`'s ``value_checked``): a NonFiniteError there is
        the reply's fault — IntegrityError, the session failed, nothing sent."""

        def run() -> T:
            try:
                return build()
            except NonFiniteError as exc:
                raise IntegrityError(f"{stage.value}: {exc}") from exc

        result: T = self._guard(run)
        return result

    def _dropped_finite(self, stage: Stage, y: A, perm: Permutation, n: int, name: str) -> None:
        """The decoy rows of an encoded reply ``y`` (those holding tokens n, n + 1, … under ``perm``),
        which its consumer drops unread, tested finite: a reply is refused whole, whichever of its rows
        holds a NaN or ±inf (IntegrityError, the session failed)."""
        rows = perm.inverse[n:]
        if rows.size and not self.b.rows_finite(y, rows):
            self._guard(self._raise(IntegrityError(f"{stage.value}: {name} holds NaN or Inf")))

    def _verify(self, stage: Stage, check: Callable[[SessionVerifier[A]], None]) -> None:
        """Run a value check with this session's verifier (none when verification is off); meter it."""
        v = self._require().verifier
        if v is None:
            return
        before = v.flops
        self._guard(lambda: check(v))
        self.meter.verification(stage, v.flops - before)
        self.verify_worst = max(self.verify_worst, v.worst)

    def _decoys(self, stage: Stage, layer: int, count: int, real: A | None) -> A:
        """``count`` decoy rows for (stage, layer), in the backend (derived ahead when they could be)."""
        assert self.state is not None
        return self.state.prep.decoys(stage, layer, count, real)

    def _linear(
        self,
        link: Transport,
        stage: Stage,
        layer: int,
        step: int,
        x: A,
        which: WeightName,
        *,
        reply_key: str = "y",
        arr_key: str = "x",
        expert: int | None = None,
        norm: NormName | None = None,
        consumed: bool = False,
        **meta: Any,
    ) -> A:
        """A linear stage of the server on rows ``x``: blinded (T5) when the release plan noises this
        message — send x + η, return the reply − ηW = xW (+ b) — else x itself. ``norm``: the server
        applies that RMSNorm first (un-blinded QKV and head stages). The reply is verified (Freivalds, on
        what was sent) before it is unblinded or used. ``consumed``: the caller tests the reply's
        finiteness in the pass that reads it (see :meth:`_consume`), so it is not scanned on arrival."""
        b = self.b
        experts = None if expert is None else np.array([expert], dtype=np.int64)
        if experts is not None:
            meta["experts"] = experts.tolist()
        rows, width = b.shape(x)
        expect = {reply_key: (rows, out_width(self.c, which))}
        wl = -1 if which == "lm_head" else layer
        norm_layer = -1 if norm == "final" else layer
        release = self.plan.find(stage, layer, expert)
        checked = (reply_key,) if self._require().verifier is not None or consumed else ()
        if release is None:
            got, u = self._send(link, stage, layer, step, {arr_key: x}, expect, value_checked=checked, **meta)
            y = got[reply_key]
            self._verify(stage, lambda v: v.linear(stage, wl, x, y, which, u, expert, norm, norm_layer))
            return y
        assert self.state is not None
        prep, t = self.state.prep, None if step < 0 else step
        ahead = prep.ahead(release, t)  # derived ahead (a mask pool, precompute): off the critical path
        eta, correction = prep.blinding(release, t, rows, width, which, layer, experts)
        self.meter.elementwise(stage, rows * width)
        bb = self.bb  # the backend itself, or its float64 twin when β is above the float32 limit
        if self.wide:
            meta["wide"] = True
            x = bb.floating(x, "blinded input", finite=False)
        try:
            sent = blind(x, eta, bb)
        except NonFiniteError as exc:  # the client's own rows (η is finite): the model's arithmetic
            raise NonFiniteError(f"{stage.value} of block {layer}, before it was sent: {exc}") from exc
        got, u = self._send(link, stage, layer, step, {arr_key: sent}, expect, value_checked=checked, **meta)
        y = got[reply_key]
        self._verify(stage, lambda v: v.linear(stage, wl, sent, y, which, u, expert, norm, norm_layer))
        self.meter.matmul(stage, rows, width, bb.shape(y)[1], "offline" if ahead else "client")
        # the unblinding tests every entry of the reply (``consumed``: not scanned on arrival): a NaN or ±inf
        # there is the reply's fault — IntegrityError, the session failed (:meth:`_consume`)
        out = self._consume(stage, lambda: unblind(bb.floating(y, "reply", finite=False), correction, bb))
        return b.floating(out, "unblinded", finite=False) if self.wide else out

    def _mlp_stage(
        self, link: Transport, stage: Stage, layer: int, step: int, x: A, *, consumed: bool = False
    ) -> A:
        """The server's norm + MLP on rows ``x`` in one message (un-blinded FFN stages): with verification
        on, the reply carries the MLP's intermediates and is checked before use. ``consumed``: the caller
        tests the reply's finiteness in the pass that reads it (see :meth:`_consume`)."""
        rows, d = self.b.nrows(x), self.c.hidden_size
        v = self._require().verifier
        if v is None:
            checked = ("y",) if consumed else ()
            got, _ = self._send(link, stage, layer, step, {"x": x}, {"y": (rows, d)}, value_checked=checked)
            return got["y"]
        expect = v.mlp_expect(rows)
        got, u = self._send(
            link, stage, layer, step, {"x": x}, expect, value_checked=tuple(expect), trace=True
        )
        self._verify(stage, lambda ver: ver.mlp(stage, layer, x, got, u))
        return got["y"]

    def _blinded(self, stage: Stage, layer: int) -> bool:
        """Whether the plan noises ``stage`` of ``layer`` (then the client applies the norm before it).
        For the MLP's first stage of an MoE layer the router's release decides (experts are per message):
        :meth:`~scx_ref.protocol.plan.ReleasePlan.find_any`, the plan's one answer to that question."""
        return self.plan.find_any(stage, layer) is not None

    # -- key material ahead of the prompt (DESIGN §3) ------------------------------------------------
    @_one_call_at_a_time
    def precompute(
        self, n: int, *, steps: int = 0, nonce: bytes | None = None, background: bool = False
    ) -> PreparedKeys[A]:
        """Derive the keys of the next request — a prompt of ``n`` tokens, and ``steps`` generation steps —
        before the prompt exists, so the prefill only reads them (:mod:`~scx_ref.protocol.prepare`).

        The request's nonce is ``nonce``, else the one already reserved for the next prefill, else a fresh
        one reserved now; a later :meth:`prefill` of n tokens under that nonce uses these keys (another
        length or nonce derives its own). ``background`` derives them in a thread; the prefill waits for
        it. The keys are exactly the ones the prefill would derive itself: what the server sees does not
        change, only when the client's work happens.

        ``n`` and ``steps`` are integers (Python or numpy, not bool) with 1 <= n and n + steps <=
        ``max_length`` (ProtocolError otherwise, before anything is reserved or derived). A nonce that
        already drove a session is a SessionError, the client unchanged — except that a reserved one (not
        given here) is dropped, as :meth:`prefill` drops it, so the next call draws a fresh nonce.
        """
        n = check_int(n, "n", None, error=ProtocolError)
        steps = check_int(steps, "steps", 0, error=ProtocolError)
        if not 1 <= n <= self.max_length:
            raise ProtocolError(f"a prompt has 1 to max_length = {self.max_length} tokens, not {n}")
        if n + steps > self.max_length:
            raise ProtocolError(f"{steps} steps after {n} tokens exceed max_length {self.max_length}")
        reserved = nonce is None and self._next_nonce is not None
        if nonce is None:
            nonce = self._next_nonce or KeySchedule.new_nonce()
        if self._master_keys.claims.claimed(nonce):
            if reserved:  # claimed elsewhere (another client of this schedule): the next call draws afresh
                self._drop_reservation(nonce)
            raise SessionError("this nonce already drove a session under this master secret")
        prep = self._new_prepared(nonce, n)  # validates the nonce
        if background:
            prep.start(steps)
        else:
            prep.fill(steps)
        self._next_nonce = nonce  # reserved once its keys are derived: a failed fill moves nothing
        if self._prepared is not None:  # replaced: its background derivation, if any, stops
            self._prepared.discard()
        self._prepared = prep
        return prep

    def _drop_reservation(self, nonce: bytes) -> None:
        """Forget the reserved next nonce ``nonce`` (and keys precomputed under it), found claimed by another
        client of this master secret: it can never drive this client's session, and kept, it would refuse
        every later call that names no nonce (``generate`` names none)."""
        self._next_nonce = None
        if self._prepared is not None and self._prepared.nonce == nonce:
            self._prepared.discard()
            self._prepared = None

    def _new_prepared(self, nonce: bytes, n: int) -> PreparedKeys[A]:
        keys = RequestKeys(self._master_keys.for_nonce(nonce), self.c)
        return PreparedKeys(keys, self.b, self.cfg, self.plan, self.decoys, n, self.bb, self.sketches)

    def _take_prepared(self, nonce: bytes, n: int) -> PreparedKeys[A]:
        """The keys precomputed for (nonce, n), or a fresh set that derives each key on first use."""
        prep, self._prepared = self._prepared, None
        if prep is not None and prep.nonce == nonce and prep.n == n:
            prep.wait()
            return prep
        if prep is not None and prep.nonce == nonce and prep.n > n:  # a pool entry: its first rows serve
            prep.wait()
            prep.bind(n)
            return prep
        if prep is not None:  # another nonce or length: a background derivation of it stops
            prep.discard()
        return self._new_prepared(nonce, n)

    # -- prefill (§5.1) --------------------------------------------------------------------------
    @_one_call_at_a_time
    def prefill(self, ids: Any, link: Transport, nonce: bytes | None = None) -> npt.NDArray[Any]:
        """Encoded prefill of prompt ``ids``; returns its logits (n × V, numpy), equal to plaintext.

        Opens a new session under a fresh nonce (or ``nonce``; or the one :meth:`precompute` reserved,
        whose keys are then already derived), after closing this client's previous session if it is still
        open. A close that fails (its link gone, or its reply refused) does not stop the new session: the
        previous one is left failed (abandoned; the server frees it at its idle timeout), and the new one
        opens on ``link`` — where a dead ``link`` fails it in turn, with the transport's error (a
        ``RemoteTransport``: ServiceError). A nonce that already drove a session under this master secret is
        refused (SessionError): the same keys would encode two prompts; when it was the reserved one (the
        constructor's, or :meth:`precompute`'s) — claimed by another client of the same schedule — the
        reservation is dropped with it, so the next call that names no nonce draws a fresh one. Every reply
        is verified first (IntegrityError on a failed check; the session is then failed and nothing more is
        sent). Any other error once the session is open (a NonFiniteError of the model's own arithmetic,
        ^C) fails it too: the server's half-built session is sent nothing more.
        """
        b = self.b
        _check_link(link)
        ids_arr = token_ids(ids)
        x0 = b.embed(ids_arr)  # validates the ids against the vocabulary
        n = int(ids_arr.shape[0])
        if n > self.max_length:
            raise ProtocolError(f"prompt of {n} tokens is longer than max_length {self.max_length}")
        if nonce is None and self._prepared is None and self.pool is not None:
            if self.pool.client is not self:  # its nonces are claimed by its own client's master alone
                raise ProtocolError(
                    "this client's pool was filled by another client: its masks come from that client's "
                    "keys, whose nonce claims this client cannot record (build a MaskPool for this client)"
                )
            entry = self.pool.take_fitting(n)  # one-time masks derived offline: used by this request only
            if entry is not None:  # None: no entry serves n tokens (empty, or n > capacity): derived below
                self._prepared, nonce = entry, entry.nonce
        reserved = nonce is None and self._next_nonce is not None
        if nonce is None:
            nonce = self._next_nonce or KeySchedule.new_nonce()
        keys = self._master_keys.for_nonce(nonce)  # validates the nonce
        try:
            self._master_keys.claims.claim(keys.nonce)  # SessionError when this pair drove a session
        except SessionError:
            if reserved:  # claimed by another client of this schedule: the next call draws a fresh nonce
                self._drop_reservation(keys.nonce)
            raise
        self._next_nonce = None
        old = self.state
        if old is not None and not (old.failed or old.closed) and old.link is not None:
            try:
                self.close()
            except Exception:  # its link gone (any transport's error, a custom one's) or its reply refused:
                old.fail()  # the old session is abandoned (_send marked it so); its idle TTL frees it
        self.meter = CostMeter()
        prep = self._take_prepared(keys.nonce, n)
        st: _State[A] = _State(prep.keys, prep, n, seq=0, link=link)
        link_meter = getattr(link, "meter", None)
        if isinstance(link_meter, CostMeter):  # a link that carried earlier sessions: this one's costs only
            st.link_base = link_meter.snapshot()
        if self.sketches is not None:  # the checks derived ahead, unless the basis rotated since
            ahead = prep.verifier
            if ahead is not None and ahead.current(self.sketches):
                st.verifier = ahead
            else:
                st.verifier = SessionVerifier(b, st.keys, self.sketches)
        self.state = st
        try:
            return self._prefill_session(link, st, x0)
        except BaseException:
            st.fail()  # cut short (any error, ^C): the server's half-built session takes nothing more
            raise

    def _prefill_session(self, link: Transport, st: _State[A], x0: A) -> npt.NDArray[Any]:
        """The messages of :meth:`prefill` on its new session ``st``, for the embedded prompt ``x0``."""
        b, c, cfg, prep, n = self.b, self.c, self.cfg, st.prep, st.n
        self._send(
            link,
            Stage.OPEN,
            -1,
            -1,
            {},
            {},
            n=n,
            r1=cfg.r1,
            r2=cfg.r2,
            r_lock=cfg.lock_decoys,
            l_s=cfg.l_s,
            l_e=cfg.l_e,
            max_length=self.max_length,
            level=cfg.level,
            attention=cfg.attention,
            gen_attention=cfg.gen_attention,
            gen_linear=cfg.gen_linear,
            wide=self.wide,
        )
        pos = np.arange(n)
        # the rows block 0's QKV stage sends: π_0(X ⊕ R) (T1 + T2, one pass)
        s = encode_rows(x0, self._decoys(Stage.QKV, 0, cfg.r1, x0), prep.token_perm(0), b)
        keys_kept: dict[int, A] = {}
        for i in range(c.n_layers):
            s, k_rope, v = self._prefill_block(link, i, s, pos)
            if k_rope is None or v is None:  # a middle block: the client keeps none of its K and V
                continue
            if i in self.first or i in self.client_attention:
                st.guard_k[i], st.guard_v[i] = b.compact(k_rope), b.compact(v)
            elif i in self.last:
                st.guard_v[i] = b.compact(v)
                keys_kept[i] = k_rope
        logits = self._prefill_head(link, s)
        for i, k_rope in keys_kept.items():  # locked key caches of the last guard blocks (T4 + T2)
            k_flat = b.reshape(k_rope, (n, c.kv_dim))
            locked = encode_rows(
                k_flat, self._decoys(Stage.LOCK, i, cfg.lock_decoys, k_flat), prep.lock_perm(i), b
            )
            self._send(link, Stage.LOCK, i, -1, {"k": locked}, {})
            # the sketch of the locked keys that later checks the block's scores: verification work, metered
            self._verify(Stage.LOCK, functools.partial(_lock_sketch, layer=i, locked=locked))
        return logits

    @_one_call_at_a_time
    def close(self, link: Transport | None = None) -> None:
        """End this client's session on the server (its caches are freed). Nothing is sent for a session
        that failed or is already closed; ``link`` defaults to the session's own transport (a ``link`` that
        is not a transport: ProtocolError, the session unchanged)."""
        if link is not None:
            _check_link(link)
        st = self.state
        if st is None or st.failed or st.closed:
            return
        target = link if link is not None else st.link
        if target is None:
            raise ProtocolError("no transport to close the session on")
        self._send(target, Stage.CLOSE, -1, -1, {}, {})
        st.end()

    def _prefill_block(self, link: Transport, i: int, s: A, pos: IndexArray) -> tuple[A, A | None, A | None]:
        """Block i on ``s`` = π_i(H ⊕ R), the rows its QKV stage sends (H the residual stream, R the decoy
        rows carried from the previous FFN stage). Returns π_{i+1}(H′ ⊕ R′) — block i+1's QKV rows — and,
        for a guard block, its RoPE'd keys and values in true order (n × H_kv × d_h); None for the others."""
        # the attention half in a call of its own: its replies and messages ([Q K V], the attention output,
        # the O stage's) are freed when it returns instead of being held through the FFN stage, whose
        # intermediates are a block's largest arrays where the MLP is wide (models/results/PERFORMANCE.md,
        # stop 36)
        rows, k_rope, v = self._attention_half(link, i, s, pos)
        # the FFN stage under π_{i+1} on H′ = H + O·W_o (``rows``; its decoys ride on into block i+1)
        b, n = self.b, len(pos)
        if self._blinded(Stage.FFN, i):
            xn = b.norm(rows, "mlp", i)  # row-wise: commutes with π_{i+1}
            y = self._blinded_mlp(link, i, -1, xn, Stage.FFN, Stage.FFN_DOWN, Stage.ROUTER)
            nxt = b.add(rows, y)
        else:
            y = self._mlp_stage(link, Stage.FFN, i, -1, rows, consumed=True)
            # the residual add tests every entry of the sum (so of y) as it writes it
            nxt = self._consume(Stage.FFN, lambda: b.add(rows, y, name="reply ffn.y (in the residual sum)"))
        # the block's two residual adds over its n + r₁ rows: the O stage's (in reencode_sum) and this one
        self.meter.elementwise(Stage.FFN, 2 * (n + self.cfg.r1) * self.c.hidden_size)
        # the residual add in encoded order: π(H ⊕ R) + π(MLP rows) = π(H′ ⊕ R′), block i+1's QKV rows (T1)
        return nxt, k_rope, v

    def _attention_half(self, link: Transport, i: int, s: A, pos: IndexArray) -> tuple[A, A | None, A | None]:
        """Block i's QKV, attention and O stages on ``s`` = π_i(H ⊕ R): returns the FFN stage's rows
        π_{i+1}(H′ ⊕ R′), H′ = H + O·W_o with fresh decoys R′, and (a guard block) its RoPE'd keys and
        values in true order, as :meth:`_prefill_block`."""
        b, c, cfg = self.b, self.c, self.cfg
        assert self.state is not None
        prep, verifier = self.state.prep, self.state.verifier
        keys = prep.block(i)
        n = len(pos)
        # a decoy policy that draws from the real rows reads a reply before the pass that tests it: the
        # replies it reads are scanned on arrival instead
        needs_real = prep.decoy_policy.needs_real
        # 1. QKV stage: E = π_i(X ⊕ R) (+ α_i, with the client's norm: row-wise, so it commutes with π_i)
        normalized = self._blinded(Stage.QKV, i)
        rows = s
        if normalized:
            rows = b.norm(s, "attn", i)
            self.meter.elementwise(Stage.QKV, (n + cfg.r1) * c.hidden_size)
        z = self._linear(
            link,
            Stage.QKV,
            i,
            -1,
            rows,
            "wqkv",
            reply_key="z",
            norm=None if normalized else "attn",
            normalized=normalized,
            commit=keys.commit,
            consumed=i not in self.client_attention,  # decode_qkv_heads tests the rows it reads
        )
        heads, kv_heads, d_h, g = c.n_heads, c.n_kv_heads, c.head_dim, c.group_size
        # 2. attention stage: Q P_i, K P_i, V P_i in true row order, RoPE'd — or, in a guard block with
        #    attention="client", the client's own causal attention
        k_rope: A | None = None  # kept (in true order) by the guard blocks only
        v: A | None = None
        if i in self.client_attention:
            zt = decode_rows(z, keys.pi, n, b)  # [Q K V] of the n real rows, true order
            qk = b.rope(b.reshape(b.narrow(zt, 1, 0, c.q_dim + c.kv_dim), (n, heads + kv_heads, d_h)), pos)
            v = b.reshape(b.narrow(zt, 1, c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim), (n, kv_heads, d_h))
            k_rope = b.narrow(qk, 1, heads, heads + kv_heads)
            o = b.reshape(b.attention(b.narrow(qk, 1, 0, heads), k_rope, v, pos, pos), (n, c.q_dim))
            self.meter.attention(Stage.ATTN, heads, n, n, d_h, "client")
            o_rows = encode_rows(o, self._decoys(Stage.O, i, cfg.r2, o), keys.pi_o, b)
        else:
            # T1 + T2 decode, RoPE and T3 encode in one pass over the reply's real rows
            if verifier is None:  # verified, the Freivalds check read the decoy rows too
                self._dropped_finite(Stage.QKV, z, keys.pi, n, "reply qkv.z")
            qk_p, v_p = self._consume(
                Stage.QKV, lambda: decode_qkv_heads(z, keys.pi, n, pos, keys.head, g, b, name="reply qkv.z")
            )
            sent = {
                "q": b.narrow(qk_p, 1, 0, heads),
                "k": b.narrow(qk_p, 1, heads, heads + kv_heads),
                "v": v_p,
            }
            got, u = self._send(
                link,
                Stage.ATTN,
                i,
                -1,
                sent,
                {"o": (n, c.n_heads, c.head_dim)},
                # the range check (verified) or the O stage's encoding (below) reads every entry next
                value_checked=("o",) if verifier is not None or not needs_real else (),
            )
            o = got["o"]
            self._verify(
                Stage.ATTN,
                lambda ver: ver.attention(
                    Stage.ATTN, i, sent["q"], sent["k"], sent["v"], o, u, ver.attention_rows(i, n), 0
                ),
            )
            if i in self.first or i in self.last:  # the guard blocks keep K and V in true order
                k_rope = head_unpermute(sent["k"], keys.head, 1, b)
                v = head_unpermute(v_p, keys.head, 1, b)
            # 3. O stage: π′_i(O ⊕ R′) — T3 decode and T1 + T2 encode in one pass
            real = None
            if needs_real:  # a policy that looks at the real rows: O in true order
                real = b.reshape(head_unpermute(o, keys.head, g, b), (n, c.q_dim))
            o_dec = self._decoys(Stage.O, i, cfg.r2, real)
            # the message tests every entry of o as it is written
            o_rows = self._consume(Stage.ATTN, lambda: encode_head_rows(o, keys.head, g, o_dec, keys.pi_o, b))
        self.meter.elementwise(Stage.QKV, 3 * n * (c.q_dim + c.kv_dim))
        y = self._linear(link, Stage.O, i, -1, o_rows, "wo", consumed=not needs_real)
        # 4. the FFN stage's rows, π_{i+1}(H′ ⊕ R′) for H′ = H + O·W_o: the residual add carried from π_i (s)
        #    and π′_i (y) straight to π_{i+1} with fresh decoys, which ride on into block i+1's QKV stage
        real = None
        if needs_real:  # a policy that looks at the real rows: H′ in true order
            real = b.add(decode_rows(s, keys.pi, n, b), decode_rows(y, keys.pi_o, n, b))
        decoys = self._decoys(Stage.FFN, i, cfg.r1, real)
        if verifier is None and not needs_real:  # the sum below tests y's real rows as it writes them
            self._dropped_finite(Stage.O, y, keys.pi_o, n, "reply o.y")
        perm = prep.token_perm(i + 1)
        rows = self._consume(Stage.O, lambda: reencode_sum(s, keys.pi, y, keys.pi_o, decoys, perm, b))
        return rows, k_rope, v

    def _prefill_head(self, link: Transport, s: A) -> npt.NDArray[Any]:
        """The LM-head stage on ``s`` = π_L(H ⊕ R); returns the n real rows' logits in true order."""
        b, L = self.b, self.c.n_layers
        assert self.state is not None
        prep = self.state.prep
        rows = s
        normalized = self._blinded(Stage.HEAD, L)
        if normalized:
            rows = b.norm(s, "final")
        logits = self._linear(
            link,
            Stage.HEAD,
            L,
            -1,
            rows,
            "lm_head",
            reply_key="logits",
            norm=None if normalized else "final",
            normalized=normalized,
            consumed=True,
        )
        # T1 + T2 decode straight to numpy, in the reply's own memory (no second n × V array), testing
        # every entry as it moves
        perm = prep.token_perm(L)
        return self._consume(
            Stage.HEAD,
            lambda: decode_rows_numpy(logits, perm, prep.n, b, in_place=True, name="reply head.logits"),
        )

    def _blinded_mlp(
        self, link: Transport, i: int, step: int, xn: A, up: Stage, down: Stage, router: Stage
    ) -> A:
        """The MLP of normalized rows ``xn`` as the server's linear maps with the client's SwiGLU between
        them (every map blinded as the plan says: T5); exact.

        Dense: gate/up → client SwiGLU → down. MoE: the router → client softmax/top-k → every expert's
        gate/up and down, so the server does not learn the routing; rows not routed to an expert get
        weight 0.
        """
        b, c = self.b, self.c
        rows, f = b.nrows(xn), c.intermediate_size
        if not c.is_moe:
            gu = self._linear(link, up, i, step, xn, "w_gate_up", normalized=True)
            m = b.swiglu_act(gu)
            self.meter.elementwise(up, rows * f)
            return self._linear(link, down, i, step, m, "w_down", arr_key="m", last=True)
        top, w_top = route(b.to_numpy(self._linear(link, router, i, step, xn, "router")), c.top_k)
        out: A | None = None
        for e in range(c.n_experts):
            weight = np.where(top == e, w_top, 0.0).sum(axis=-1)
            gu = self._linear(link, up, i, step, xn, "w_gate_up", expert=e, normalized=True)
            m = b.scale_rows(b.swiglu_act(gu), weight)
            y = self._linear(
                link, down, i, step, m, "w_down", arr_key="m", expert=e, last=e == c.n_experts - 1
            )
            out = y if out is None else b.add(out, y)
        assert out is not None
        return out

    # -- key sharing (§5.2) ----------------------------------------------------------------------
    @_one_call_at_a_time
    def share_keys(self, link: Transport) -> None:
        """Upload π_i (and the noise α_i of a noised QKV stage) of every middle block, so the server can
        decode those blocks' prompt caches. Guard blocks stay locked."""
        _check_link(link)
        st = self._require()
        if st.shared:
            return
        rows = st.n + self.cfg.r1
        for i in self.middle:
            arrays: dict[str, Any] = {"perm": st.keys.token_perm(i, rows)}
            release = self.plan.find(Stage.QKV, i)
            meta: dict[str, Any] = {}
            if release is not None:  # the server removes α_i W from the raw cache (plan.shared)
                alpha = st.keys.noise(release, None, rows, self.c.hidden_size)
                arrays["alpha"] = alpha.astype(self.bb.numpy_dtype())  # the wire dtype of the blinded stages
                if self.wide:
                    meta["wide"] = True
            self._send(link, Stage.SHARE, i, -1, arrays, {}, salt=st.keys.commit_salt(i).hex(), **meta)
        st.shared = True

    def _require(self) -> _State[A]:
        st = self.state
        if st is None:
            raise ProtocolError("no session: call prefill first")
        if st.failed:
            raise ProtocolError("this session failed on an earlier error; start a new prefill")
        if st.closed:
            raise ProtocolError("this session is closed; start a new prefill")
        return st

    # -- generation (§5.3) -------------------------------------------------------------------------
    @_one_call_at_a_time
    def decode(self, token: int, link: Transport) -> npt.NDArray[Any]:
        """Feed ``token`` at the next position with one-time keys; return the next logits (V,).

        Equal to plaintext decoding. Raises ProtocolError past ``max_length`` or for a ``link`` that is not
        a transport, VocabularyError unless ``token`` is one integer id of the vocabulary (a Python or
        numpy integer, not a bool; nothing is sent then, and the session is unchanged). An error after a
        message of the step went (any error, ^C) fails the session: the server's step is half-run.
        """
        _check_link(link)
        st = self._require()
        b = self.b
        t, p = st.step, st.n + st.step
        if p >= self.max_length:
            raise ProtocolError(f"generation past the configured maximum length {self.max_length}")
        # validate the token before anything is sent: one integer id of the vocabulary
        tok = check_int(token, "token", 0, self.c.vocab_size - 1, error=VocabularyError)
        h = b.embed(np.asarray([tok], dtype=np.int64))
        sent = st.seq
        try:
            return self._decode_step(link, st, h, t, p)
        except BaseException:
            if st.seq != sent:  # cut short after a message went (any error, ^C): the server's step half-run
                st.fail()
            raise

    def _decode_step(self, link: Transport, st: _State[A], h: A, t: int, p: int) -> npt.NDArray[Any]:
        """The messages of :meth:`decode`'s step ``t`` (position ``p``) for the embedded token ``h``."""
        b, c = self.b, self.c
        if self.middle and not st.shared:
            self.share_keys(link)
        new_k: dict[int, A] = {}
        new_v: dict[int, A] = {}
        for i in self.first:
            h, new_k[i], new_v[i] = self._gen_guard(link, i, t, p, h)
        if self.middle:
            # the middle blocks run on the server alone: only the reply's structure can be checked
            h = self._send(link, Stage.GEN_MID, self.middle.start, t, {"x": h}, {"x": (1, c.hidden_size)})[0][
                "x"
            ]
        for i in self.last:
            if i in self.client_attention:
                h, new_k[i], new_v[i] = self._gen_guard(link, i, t, p, h)
            else:
                h, new_v[i] = self._gen_last(link, i, t, h)
        hn = b.norm(h, "final")
        if self.cfg.gen_linear == "server":  # the LM head on the server, one-time blinded (gen_head)
            logits = self._linear(link, Stage.GEN_HEAD, c.n_layers, t, hn, "lm_head", reply_key="logits")
        else:
            logits = b.project(hn, "lm_head")
            self.meter.matmul(Stage.GEN_HEAD, 1, c.hidden_size, c.vocab_size, "client")
        for i, k in new_k.items():  # commit the new rows only once the whole step succeeded
            st.guard_k[i] = k
        for i, v in new_v.items():
            st.guard_v[i] = v
        st.step += 1
        out: npt.NDArray[Any] = np.asarray(b.to_numpy(logits))[0]
        return out

    def _gen_wo(self, link: Transport, i: int, t: int, o: A, stage: Stage) -> A:
        """W_o of guard block ``i`` on the attention output ``o`` of step ``t``: on the server, one-time
        blinded (``gen_linear="server"``: the ``gen_o`` message), or by the client itself (metered as
        ``stage``)."""
        if self.cfg.gen_linear == "server":
            return self._linear(link, Stage.GEN_O, i, t, o, "wo")
        self.meter.matmul(stage, 1, self.c.q_dim, self.c.hidden_size, "client")
        return self.b.project(o, "wo", i)

    def _gen_guard(self, link: Transport, i: int, t: int, p: int, h: A) -> tuple[A, A, A]:
        """Guard block ``i`` at step ``t`` (position ``p``) on the client's valid cache of the block: the
        blinded QKV stage, attention (by the client on the cache it holds, or with ``attention="server"``
        and ``gen_attention="server"`` by the server under a one-time P), W_o and the FFN (a first guard
        block's as ``guard_ffn`` says; a last guard block's as ``last_ffn`` says). Returns the new
        residual row and the block's extended keys and values."""
        b, c, st = self.b, self.c, self._require()
        z = self._linear(link, Stage.GEN_QKV, i, t, b.norm(h, "attn", i), "wqkv", reply_key="z")
        q, k, v = split_qkv(b, z)
        pos = np.array([p])
        q, k = b.rope(q, pos), b.rope(k, pos)
        keys = b.append_rows(st.guard_k[i], k)
        values = b.append_rows(st.guard_v[i], v)
        if i not in self.server_gen_attention:
            o = b.reshape(b.attention(q, keys, values, pos, None), (1, c.q_dim))
            self.meter.attention(Stage.GEN_ATTN, c.n_heads, 1, b.nrows(keys), c.head_dim, "client")
        else:
            hp, g = st.prep.gen_head(i, t), c.group_size
            sent = {
                "q": head_permute(q, hp, g, b),
                "k": head_permute(keys, hp, 1, b),
                "v": head_permute(values, hp, 1, b),
            }
            got, u = self._send(
                link,
                Stage.GEN_ATTN,
                i,
                t,
                sent,
                {"o": (1, c.n_heads, c.head_dim)},
                # the range check reads every entry next
                value_checked=("o",) if self._require().verifier is not None else (),
            )
            o = got["o"]
            m = b.nrows(keys)
            self._verify(
                Stage.GEN_ATTN,
                lambda ver: ver.attention(
                    Stage.GEN_ATTN, i, sent["q"], sent["k"], sent["v"], o, u, np.zeros(1, np.int64), m - 1
                ),
            )
            o = b.reshape(head_unpermute(o, hp, g, b), (1, c.q_dim))
        h = b.add(h, self._gen_wo(link, i, t, o, Stage.GEN_ATTN))
        if i in self.last:
            return self._last_ffn(link, i, t, h), keys, values
        h = b.add(h, self._gen_ffn(link, i, t, h, clear=self.cfg.guard_ffn == "clear"))
        return h, keys, values

    def _gen_ffn(self, link: Transport, i: int, t: int, h: A, clear: bool) -> A:
        if clear:
            return self._mlp_stage(link, Stage.GEN_FFN, i, t, h)
        xn = self.b.norm(h, "mlp", i)
        return self._blinded_mlp(link, i, t, xn, Stage.GEN_FFN_UP, Stage.GEN_FFN_DOWN, Stage.GEN_ROUTER)

    def _gen_last(self, link: Transport, i: int, t: int, h: A) -> tuple[A, A]:
        b, c, cfg, st = self.b, self.c, self.cfg, self._require()
        m = st.n + cfg.lock_decoys + t + 1
        expect = {"scores": (c.n_heads, 1, m), "z": (1, c.q_dim + 2 * c.kv_dim)}
        reply, u = self._send(link, Stage.GEN_LAST, i, t, {"x": h}, expect)
        scores, z = reply["scores"], reply["z"]
        self._verify(Stage.GEN_LAST, lambda ver: ver.gen_last(i, t, h, st.n + t, scores, z, u))
        v_new = split_qkv(b, z)[2]
        rho = st.keys.lock_perm(i, st.n + cfg.lock_decoys)
        values = b.append_rows(st.guard_v[i], v_new)
        o = b.reshape(b.softmax_values(unlock_scores(scores, rho, st.n, b), values), (1, c.q_dim))
        self.meter.attention(Stage.GEN_LAST, c.n_heads, 1, st.n + t + 1, c.head_dim // 2, "client")
        h = b.add(h, self._gen_wo(link, i, t, o, Stage.GEN_LAST))
        return self._last_ffn(link, i, t, h), values

    def _last_ffn(self, link: Transport, i: int, t: int, h: A) -> A:
        """A last guard block's FFN at step ``t`` on the residual row ``h`` (attention and W_o added):
        exact (client norm + blinded maps), or the paper's offset form (``last_ffn="paper"``)."""
        b, c, cfg, st = self.b, self.c, self.cfg, self._require()
        if cfg.last_ffn == "paper":
            # the paper's form: send h + a constant offset and let the server normalize — relies on
            # RMSNorm(x + α) = RMSNorm(x), which is false (T7), so this is NOT exact
            release = self.plan.find(Stage.GEN_FFN, i)
            assert release is not None  # the plan lists the offset of every last guard block
            offset = b.from_numpy(st.keys.noise(release, t, 1, c.hidden_size))
            y = self._mlp_stage(link, Stage.GEN_FFN, i, t, b.add(h, offset))
            return b.add(h, y)
        return b.add(h, self._gen_ffn(link, i, t, h, clear=False))

    @_one_call_at_a_time
    def generate(self, ids: Any, n_new: int, link: Transport) -> list[int]:
        """Greedy SCX generation: prefill, then ``n_new`` argmax tokens (the same tokens as plaintext
        greedy decoding): ``n_new`` − 1 decode steps, the first of which shares the middle blocks' keys.
        The session is closed at the end.

        ``n_new`` is checked before anything is sent (an integer ≥ 0 whose positions fit in
        ``max_length``; 0 sends nothing, but a prompt that prefill would refuse is still refused). An
        SCXError raised midway carries the tokens already made in its ``tokens`` attribute; any other
        exception (a custom transport's) lists them in a note.
        """
        n_new = check_int(n_new, "n_new", 0, error=ProtocolError)
        _check_link(link)
        ids_arr = token_ids(ids)
        if ids_arr.shape[0] > self.max_length:  # a bad prompt is an error even when n_new is 0
            raise ProtocolError(
                f"prompt of {ids_arr.shape[0]} tokens is longer than max_length {self.max_length}"
            )
        if n_new == 0:
            self.b.embed(ids_arr)  # a bad prompt is still an error
            return []
        if ids_arr.shape[0] + n_new - 1 > self.max_length:
            raise ProtocolError(
                f"{ids_arr.shape[0]} prompt tokens + {n_new} new need {ids_arr.shape[0] + n_new - 1} "
                f"positions; max_length is {self.max_length}"
            )
        return greedy_tokens(
            lambda: int(np.argmax(self.prefill(ids_arr, link)[-1])),
            lambda tok: int(np.argmax(self.decode(tok, link))),
            n_new,
            self.close,
        )

    def cost_report(self, link: Transport, server_meter: CostMeter | None = None) -> CostReport:
        """Client flops, server flops (when its meter is given), bytes each way and round trips of this
        client's latest session: on that session's own ``link``, only the messages sent since the session
        opened count, however many sessions the link carried before (another link's meter counts whole).
        ProtocolError when ``link`` has no CostMeter ``meter`` or ``server_meter`` is neither None nor a
        CostMeter."""
        link_meter = getattr(link, "meter", None)
        if not isinstance(link_meter, CostMeter):
            raise ProtocolError(f"link must be a Transport with a CostMeter meter, got {type(link).__name__}")
        if server_meter is not None and not isinstance(server_meter, CostMeter):
            raise ProtocolError(
                f"server_meter must be a CostMeter or None, not {type(server_meter).__name__}"
            )
        st = self.state
        if st is not None and st.link is link and st.link_base is not None:
            link_meter = link_meter.since(st.link_base)
        meters = [self.meter, link_meter] + ([server_meter] if server_meter is not None else [])
        return CostReport.merge(*meters)

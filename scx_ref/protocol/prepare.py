"""A request's key material, derived ahead of the prompt (DESIGN §3, §5.7): off the client's critical path.

Every key of an SCX request — the token permutations π_i, π′_i, ρ_i, the head-structured P_i (and the
one-time P of each generation step), the decoy rows the policy picks from public data, the Laplace noise
η of every release and its correction η·W — is a function of the key schedule (master secret, nonce) and
the lengths alone: none depends on the prompt's content. :class:`PreparedKeys` derives them on demand
and keeps each one until it is used, so the client may derive them *before* the prompt exists —
:meth:`PreparedKeys.fill`, called by :meth:`~scx_ref.protocol.client.Client.precompute` (at once or in a
background thread) — and the prefill then only reads them. Derived ahead or on demand, the keys are the
same bytes (the same :class:`~scx_ref.protocol.keyring.RequestKeys` calls): precomputation changes when
the work happens, never what the server sees. The exceptions, both stated where they arise: a decoy policy
that hands each row out once (:meth:`~scx_ref.protocol.decoys.CalibrationPool.secret`, the client's
default) gives a request drawn ahead other rows than it would have drawn on demand — rows no other message
took, as on demand; rows drawn ahead for a request that never runs are spent — and a mask pool's entry
serving a shorter prompt than its capacity narrows η·W, which matches the on-demand product to rounding
(:meth:`PreparedKeys.blinding`), so what the client sends after unblinding may differ in its last bits.

Decoys of a policy that looks at the real rows (``needs_real``: the Gaussian comparison policy) cannot be
drawn ahead; they are drawn when the rows exist, as before. One-time material (noise, corrections) is
dropped once used; it is re-derived from the schedule if asked for again (key sharing uploads a middle
block's η again).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic

import numpy as np
import numpy.typing as npt

from .._checks import check_int
from ..backends.base import A, Backend, WeightName
from ..errors import DTypeError, NonFiniteError, ProtocolError, ShapeError
from ..stages import Stage
from ..transforms import HeadPermutation, Permutation
from .config import SCXConfig
from .decoys import DecoyPolicy
from .keyring import RequestKeys, commitment
from .plan import Release, ReleasePlan
from .verify import SessionVerifier, SketchCache

__all__ = ["BackgroundJob", "BlockKeys", "PreparedKeys"]

IntArray = npt.NDArray[np.int64]

#: The matrix a release's correction η·W is taken with, by stage.
_WEIGHT: dict[Stage, WeightName] = {
    Stage.GEN_O: "wo",
    Stage.GEN_HEAD: "lm_head",
    Stage.QKV: "wqkv",
    Stage.O: "wo",
    Stage.FFN: "w_gate_up",
    Stage.FFN_DOWN: "w_down",
    Stage.ROUTER: "router",
    Stage.HEAD: "lm_head",
    Stage.GEN_QKV: "wqkv",
    Stage.GEN_FFN_UP: "w_gate_up",
    Stage.GEN_FFN_DOWN: "w_down",
    Stage.GEN_ROUTER: "router",
}


@dataclass(frozen=True)
class BlockKeys:
    """The prefill keys of block i: π_i (QKV stage, and block i−1's FFN stage), π′_i (O stage), P_i, and
    the key-sharing commitment to π_i. Permutations are checked once and carry their inverses."""

    pi: Permutation
    pi_o: Permutation
    head: HeadPermutation
    commit: str


class BackgroundJob:
    """Functions run in daemon threads; :meth:`wait` joins every one started and re-raises the first error
    they raised (the background derivation of :class:`PreparedKeys` and of a mask pool's entries).
    Thread-safe: a second :meth:`start` before :meth:`wait` (two fills of one pool at once) adds a thread,
    where it used to replace the first one's handle, so that ``wait`` returned while the first still ran
    and lost its error; two threads may :meth:`wait` at once, each returning only when every thread has
    finished (a second ``wait`` used to return at once while the first joined the last thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def start(self, work: Callable[[], object], name: str) -> None:
        """Run ``work()`` in a new daemon thread named ``name``."""

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # re-raised by wait()
                with self._lock:
                    self._errors.append(exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:  # started under the lock: wait() never sees it listed but not yet alive
            self._threads = [t for t in self._threads if t.is_alive()]  # finished ones: no growth
            self._threads.append(thread)
            thread.start()

    def wait(self) -> None:
        """Wait for every thread started (also those started meanwhile) to finish, then re-raise the first
        error one of them raised (once, to one waiter; the others are dropped with it)."""
        while True:
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                if not self._threads:
                    errors, self._errors = self._errors, []
                    break
                thread = self._threads[0]  # listed until it has finished: a second waiter joins it too
            thread.join()
        if errors:
            raise errors[0]


class _Discarded(ProtocolError):
    """A discarded bundle's derivation stops (:meth:`PreparedKeys.discard`): a background one silently, a
    :meth:`PreparedKeys.fill` called on it with this ProtocolError (it serves no request)."""


class PreparedKeys(Generic[A]):
    """The key material of one request of ``n`` prompt tokens under ``keys``, derived on demand and kept
    until used (see the module doc). ``seconds`` is the wall time :meth:`fill` took (0 if never run):
    ``seconds_prefill`` for the prefill's keys, ``seconds_generation`` for the generation steps'.
    ProtocolError, nothing built, unless ``n`` is an integer >= 1 (Python or numpy, not bool). The counts
    (:attr:`remaining`, :attr:`mask_bytes`) may be read while a background :meth:`start` is filling."""

    def __init__(
        self,
        keys: RequestKeys,
        backend: Backend[A],
        config: SCXConfig,
        plan: ReleasePlan,
        decoys: DecoyPolicy,
        n: int,
        blind_backend: Backend[A] | None = None,
        sketches: SketchCache | None = None,
    ) -> None:
        self.keys = keys
        self.sketches = sketches  # the client's Freivalds sketches (None: replies are not verified)
        self.verifier: SessionVerifier[A] | None = None  # the session's checks, derived by fill
        self.b = backend
        self.bb = backend if blind_backend is None else blind_backend  # where (η, η·W) live (§6: wide)
        self.cfg = config
        self.plan = plan
        self.decoy_policy = decoys
        self.n = check_int(n, "n", 1, error=ProtocolError)
        self.seconds = self.seconds_prefill = self.seconds_generation = 0.0
        self._blocks: dict[int, BlockKeys] = {}
        self._tok: dict[int, Permutation] = {}
        self._lock: dict[int, Permutation] = {}
        self._heads: dict[tuple[int, int], HeadPermutation] = {}
        self._decoys: dict[tuple[Stage, int], A] = {}
        self._blinding: dict[tuple[Stage, int, int | None, int | None], tuple[A, A]] = {}
        self._job = BackgroundJob()
        self._discarded = threading.Event()

    @property
    def nonce(self) -> bytes:
        """The request's nonce, the one its keys were derived under."""
        return self.keys.schedule.nonce

    def bind(self, n: int) -> None:
        """Serve a prompt of ``n`` tokens, n at most the length the keys were derived for: its token
        permutations are derived for n (any derived for another length are dropped); the masks derived for
        the longer length serve their first rows (:meth:`blinding`). ProtocolError, nothing changed, unless
        ``n`` is an integer in that range."""
        n = check_int(n, "n", 1, self.n, error=ProtocolError)
        if n != self.n:
            for i, bk in self._blocks.items():  # P_i does not depend on n: keep it
                self._heads.setdefault((i, -1), bk.head)
            self._blocks.clear()
            self._tok.clear()
            self._lock.clear()
            self.n = n

    @property
    def remaining(self) -> int:
        """How many one-time (η, η·W) pairs are still held (0 once a request consumed them all)."""
        return len(self._blinding)

    @property
    def mask_bytes(self) -> int:
        """Bytes of the (η, η·W) pairs still held."""
        return self.mask_bytes_of()

    def mask_bytes_of(self, step: bool | None = None) -> int:
        """Bytes of the (η, η·W) pairs still held: the prefill's (``step=False``), the decode steps'
        (``step=True``) or all of them (None) — each entry at the size of the dtype it is held in (a
        bfloat16/float16 run blinding in its own dtype: 2, not the 4 of its wire dtype ``numpy_dtype``)."""
        held = self._blinding.copy()  # one step under the GIL: a background fill may be adding pairs
        return sum(
            self._bytes(e) + self._bytes(c)
            for key, (e, c) in held.items()
            if step is None or (key[3] is not None) == step
        )

    def _bytes(self, x: A) -> int:
        """Bytes of the array ``x`` of :attr:`bb`: its entries times their size (a numpy array's or torch
        tensor's ``itemsize``; the backend's wire dtype's for an array that has none)."""
        size = getattr(x, "itemsize", None)
        if not isinstance(size, int):
            size = self.bb.numpy_dtype().itemsize
        return size * int(np.prod(self.bb.shape(x)))

    # -- keys by role --------------------------------------------------------------------------------
    def token_perm(self, block: int) -> Permutation:
        """π_block over n + r₁ rows (block = L: the LM-head stage)."""
        return self._kept(self._tok, block, lambda: self.keys.token_perm(block, self.n + self.cfg.r1), "π")

    def block(self, i: int) -> BlockKeys:
        """The prefill keys of block ``i`` (see :class:`BlockKeys`)."""
        bk = self._blocks.get(i)
        if bk is None:
            pi = self.token_perm(i)
            head = self._heads.pop((i, -1), None)
            bk = BlockKeys(
                pi,
                Permutation(self.keys.o_perm(i, self.n + self.cfg.r2), "π′"),
                head if head is not None else _warm(self.keys.head_perm(i), self.b.config.group_size),
                commitment(self.keys.commit_salt(i), self.keys.session_id, i, pi.forward),
            )
            self._blocks[i] = bk
        return bk

    def gen_head(self, block: int, step: int) -> HeadPermutation:
        """The one-time P of generation ``step`` in first guard block ``block`` (dropped once read).
        ProtocolError unless ``step`` is an integer >= 0: step −1 names the prefill's P_block where it is
        held, and must not hand it out as a generation step's (on demand it is refused too)."""
        step = check_int(step, "step", 0, error=ProtocolError)
        hp = self._heads.pop((block, step), None)
        return hp if hp is not None else _warm(self.keys.head_perm(block, step), self.b.config.group_size)

    def lock_perm(self, block: int) -> Permutation:
        """ρ_block over n + r_lock rows."""
        return self._kept(
            self._lock, block, lambda: self.keys.lock_perm(block, self.n + self.cfg.lock_decoys), "ρ"
        )

    @staticmethod
    def _kept(
        kept: dict[int, Permutation], block: int, derive: Callable[[], IntArray], name: str
    ) -> Permutation:
        """Block ``block``'s permutation from ``kept``, derived and checked on first use (for this n)."""
        perm = kept.get(block)
        if perm is None:
            perm = kept[block] = Permutation(derive(), name)
        return perm

    def decoys(self, stage: Stage, layer: int, count: int, real: A | None) -> A:
        """``count`` decoy rows of (stage, layer) in the backend, drawn by the decoy policy from the
        schedule's stream: the precomputed rows when there are any (dropped once read), else drawn now.
        ``real`` (the real rows) is needed only by a policy that looks at them; ``width`` comes from it or
        from the stage. ProtocolError when the policy needs the real rows and ``real`` is None; ShapeError
        when the policy's rows are not ``count`` × width (a calibration pool of another model's width),
        DTypeError when they are not real numbers;
        NonFiniteError when they hold NaN or ±inf while the real rows it was given (if any) are finite —
        the client's own fault, refused before it is sent (the server's honest reply to such a row was
        refused as an integrity failure); ConfigError, the precomputed rows kept, unless ``count`` is an
        integer >= 0."""
        count = check_int(count, "decoy count")
        kept = self._decoys.pop((stage, layer), None)
        if kept is not None and self.b.nrows(kept) == count:
            return kept
        width = self._width(stage) if real is None else self.b.shape(real)[1]
        policy = self.decoy_policy
        if policy.needs_real and count:
            if real is None:
                raise ProtocolError("this decoy policy needs the real rows: pass them as ``real``")
            real_np = np.asarray(self.b.to_numpy(real), dtype=np.float64)
        else:
            real_np = np.zeros((0, width))
        rows = np.asarray(policy.draw(stage, layer, count, real_np, self.keys.decoy_stream(stage, layer)))
        where = f"the decoy policy's rows for ({stage.value!r}, layer {layer})"
        if not (np.issubdtype(rows.dtype, np.floating) or np.issubdtype(rows.dtype, np.integer)):
            raise DTypeError(f"{where} must hold real numbers, got dtype {rows.dtype}")
        if count == 0:  # nothing is sent: an empty draw of any width will do
            rows = np.zeros((0, width))
        elif rows.shape != (count, width):
            raise ShapeError(f"{where} must be {count} × {width}, got shape {rows.shape}")
        rows = rows.astype(np.float64, copy=False)
        if not np.isfinite(rows).all() and np.isfinite(real_np).all():
            raise NonFiniteError(f"{where} hold NaN or Inf")
        return self.b.from_numpy(rows)

    def ahead(self, release: Release, step: int | None) -> bool:
        """Whether (η, η·W) of ``release`` (at generation ``step``) was derived ahead and is still held."""
        return (release.stage, release.block, release.expert, step) in self._blinding

    def blinding(
        self,
        release: Release,
        step: int | None,
        rows: int,
        width: int,
        which: WeightName,
        layer: int,
        experts: IntArray | None,
    ) -> tuple[A, A]:
        """(η, η·W) of ``release`` (at generation ``step``) for a ``rows`` × ``width`` message: the
        precomputed pair when there is one of that shape (dropped once read: one-time keys), else derived
        now. η·W is the exact T5 correction (:meth:`~scx_ref.backends.base.Backend.correction`). A refused
        call (rows or width not integers >= 0: ShapeError; the backend's or the noise's refusals) drops
        nothing: the held pair is dropped only once the pair returned exists."""
        key = (release.stage, release.block, release.expert, step)
        rows = check_int(rows, "rows", 0, error=ShapeError)
        width = check_int(width, "width", 0, error=ShapeError)
        kept = self._blinding.get(key)
        bb = self.bb
        out: tuple[A, A] | None = None
        if kept is not None:
            have, w = bb.shape(kept[0])
            if w == width and have == rows:
                out = kept
            elif w == width and have > rows:
                # a mask pool's entry is derived for its longest prompt; the noise stream is read row by
                # row, so the first rows are exactly this message's η. η·W is row-wise, but as a product of
                # more rows BLAS may round it differently (OpenBLAS on an AMD EPYC: ~1e-15 relative in
                # float64): what follows unblinding matches the on-demand route to rounding, not bit for bit
                out = bb.narrow(kept[0], 0, 0, rows), bb.narrow(kept[1], 0, 0, rows)
        if out is None:  # none held, or one of another shape (dropped below, once this one is derived)
            eta = bb.from_numpy(self.keys.noise(release, step, rows, width))
            out = eta, bb.correction(eta, which, layer, experts)
        self._blinding.pop(key, None)
        return out

    # -- derive ahead ------------------------------------------------------------------------------
    def fill(self, steps: int = 0, perms: bool = True) -> PreparedKeys[A]:
        """Derive every key of the prefill — and of the first ``steps`` generation steps — now.

        Prefill: π_0..π_L, every block's π′_i, P_i and commitment, the last guard blocks' ρ_i, the decoy
        rows of every stage (unless the policy needs the real rows), (η, η·W) of every prefill
        release and, when replies are verified, the session's check vectors and attention rows.
        Generation: the one-time P of each first guard block whose attention the server computes
        (:meth:`~scx_ref.protocol.config.SCXConfig.server_gen_attention`),
        (η, η·W) of every generation release and, when replies are verified, the locked-score check's
        coefficients of the new key, per step. ``perms=False`` skips what depends on the
        prompt's length n (the token permutations, commitments and reply checks): a mask pool's entry
        (:mod:`~scx_ref.protocol.pool`), whose n is known only when its prompt arrives. Returns self.
        ProtocolError, nothing derived, unless ``steps`` is an integer >= 0 (Python or numpy, not bool), or
        when the bundle was discarded (:meth:`discard`).
        """
        steps = check_int(steps, "steps", 0, error=ProtocolError)
        self._going()
        t0 = time.perf_counter()
        cfg, L = self.cfg, self.b.config.n_layers
        _, _, last = cfg.blocks(L)
        locked = last if cfg.attention == "server" else range(0)  # client attention: no locked cache
        if perms:
            for i in range(L):
                self._going()
                self.block(i)
            self.token_perm(L)
            for i in locked:
                self.lock_perm(i)
        else:  # the head permutations do not depend on n
            for i in range(L):
                self._heads.setdefault((i, -1), _warm(self.keys.head_perm(i), self.b.config.group_size))
        if not self.decoy_policy.needs_real:
            wanted = [(Stage.QKV, 0, cfg.r1)]
            for i in range(L):
                wanted += [(Stage.O, i, cfg.r2), (Stage.FFN, i, cfg.r1)]
            wanted += [(Stage.LOCK, i, cfg.lock_decoys) for i in locked]
            for stage, layer, count in wanted:
                self._going()
                if (stage, layer) not in self._decoys:
                    self._decoys[(stage, layer)] = self.decoys(stage, layer, count, None)
        for release in self.plan.prefill:
            self._going()
            self._prepare_blinding(release, None)
        if perms and self.sketches is not None and self.verifier is None:
            # the session's reply checks (r, W r per matrix): keys and sketches only. A mask pool's
            # entry (perms=False) leaves them to its request: they hold ~0.6 MB per block
            self.verifier = SessionVerifier(self.b, self.keys, self.sketches).prepare(self.n)
        t1 = time.perf_counter()
        server_attn = cfg.server_gen_attention(L)  # the one-time P of gen_attn
        for t in range(steps):
            self._going()
            for i in server_attn:
                self._heads[(i, t)] = self.gen_head(i, t)
            if self.verifier is not None:  # the locked-score sketch's coefficient of the step's new key
                for i in locked:
                    self.verifier.lock_step(i, t)
            for release in self.plan.generation:
                self._prepare_blinding(release, t)
        t2 = time.perf_counter()
        self.seconds_prefill, self.seconds_generation = t1 - t0, t2 - t1
        self.seconds = t2 - t0
        return self

    def start(self, steps: int = 0) -> None:
        """:meth:`fill` in a background thread (its work runs while the caller does other things; the
        prefill waits for it in :meth:`wait`). ProtocolError at once, nothing started, unless ``steps`` is an
        integer >= 0."""
        steps = check_int(steps, "steps", 0, error=ProtocolError)

        def work() -> None:
            with contextlib.suppress(_Discarded):  # nobody will read these keys: stopped, not failed
                self.fill(steps)

        self._job.start(work, "scx-precompute")

    def wait(self) -> None:
        """Wait for a background :meth:`start` to finish (re-raising its error)."""
        self._job.wait()

    def discard(self) -> None:
        """These keys will not be used (the client's next prefill is of another nonce or length): a
        background :meth:`start` still deriving them stops at its next block, release or step instead of
        taking CPU from the request that replaced them; its error, if any, is dropped with them. Returns
        at once; a discarded bundle serves no request."""
        self._discarded.set()

    def forget_one_time(self) -> None:
        """The session these keys served has ended (closed, or failed: nothing more is sent on it): the
        one-time (η, η·W) pairs still held — a mask pool's entry or a precompute derives them for every
        generation step ahead, and a request may stop early — are dropped now, instead of staying in memory
        until the client's next prefill replaces the bundle. They could serve no later message: each pair
        blinds one release of this session's nonce (:meth:`blinding` drops a pair once read). A background
        :meth:`start` stops as in :meth:`discard`. Afterwards :attr:`remaining` is 0."""
        self.discard()
        self._blinding.clear()

    def _going(self) -> None:
        if self._discarded.is_set():
            raise _Discarded("these keys were discarded: they serve no request")

    # -- helpers -----------------------------------------------------------------------------------
    def _width(self, stage: Stage) -> int:
        c = self.b.config
        if stage in (Stage.O, Stage.GEN_O):
            return c.q_dim
        if stage is Stage.LOCK:
            return c.kv_dim
        if stage in (Stage.FFN_DOWN, Stage.GEN_FFN_DOWN):
            return c.intermediate_size
        return c.hidden_size

    def _prepare_blinding(self, release: Release, step: int | None) -> None:
        """Derive (η, η·W) of one release for its message shape (the paper's offset form is derived
        when used: its message is not a linear stage)."""
        which = _WEIGHT.get(release.stage)
        if which is None or release.kind == "offset":
            return
        # a prefill message has n + r rows (r₂ at the O stage), a generation message one row
        rows = 1 if step is not None else self.n + (self.cfg.r2 if release.stage is Stage.O else self.cfg.r1)
        experts = None if release.expert is None else np.array([release.expert], dtype=np.int64)
        layer = release.block
        key = (release.stage, release.block, release.expert, step)
        if key not in self._blinding:
            self._blinding[key] = self.blinding(
                release, step, rows, self._width(release.stage), which, layer, experts
            )


def _warm(hp: HeadPermutation, group_size: int) -> HeadPermutation:
    """``hp`` with the flat indices the client gathers with computed (they are cached on it)."""
    hp.flat_index(group_size, inverse=True)
    hp.flat_index(1)
    hp.stacked_index((group_size, 1))
    return hp

"""Large host buffers, reused once released.

Under glibc an allocation of :data:`LARGE_BYTES` or more is a fresh ``mmap`` every time (its threshold for
reusing freed heap memory stops at 32 MiB), first touched 4 KiB page by page and unmapped again when freed.
SmolLM2's LM-head product at n = 512 (514 × 49 152 float32, 101 MB) took 24 673 page faults and 188 ms on one
thread into a fresh ``torch.empty`` (what ``F.linear`` gives), 151 ms into memory already touched, and its
release 2.7 ms; a whole 512-token SCX prefill's server 38 ms less with the pool, a 2048-token one's 127 ms
less while the pool's bound still admitted its logits (``python -m models.host_memory``:
``models/results/host_memory.txt``). A fresh mapping advised for
transparent huge pages instead (655 faults, 164 ms alone) made the 2048-token prefill's server 0.5 s *slower*
than no pool on this project's machines (virtual machines: a fresh 2 MiB page is also the host's to back):
measured, not adopted.

:func:`empty` hands out a large buffer from a small pool of private anonymous mappings, each lent to one
tensor at a time: a mapping is free again once nothing refers to its memory — the tensor, its views, a numpy
array over it — which its reference count tells (the tensor's storage holds the mapping's buffer). Values
are never shared: a buffer is lent only when no array can read or write it any more, and uninitialized, as
``torch.empty``. The pool holds at most :data:`POOL_BYTES`; what it holds between requests stays resident,
which :func:`held_bytes` reports, and ``scx bench`` counts the pooled memory a request used again in its
peak (:func:`reused_bytes`). The torch backend pools one product: the LM head's (``dense(pooled=True)``).
"""

from __future__ import annotations

import math
import mmap
import sys
import threading

import torch

__all__ = ["LARGE_BYTES", "POOL_BYTES", "empty", "held_bytes", "mark", "reused_bytes"]

#: The size from which :func:`empty` lends pooled memory: glibc's largest mmap threshold (32 MiB on 64-bit),
#: from which every allocation is a fresh mapping. Smaller buffers come from the heap, reused without
#: faults once the process has warmed up (a 128-token SmolLM2 request: 35 page faults).
LARGE_BYTES = 32 << 20

#: The most memory the pool keeps mapped (free or lent); a buffer beyond it is a plain ``torch.empty``. An
#: idle buffer stays resident through the next request, adding to that request's peak where its blocks' own
#: buffers peak before it uses the pooled one: `llama1b-random`'s 2048-token logits (250 MiB) pooled raised
#: the process's peak over a prefill by 195 MiB (SmolLM2's 384 MiB by 46 MiB). 128 MiB holds a 512-token
#: prompt's logits on SmolLM2 (96 MiB) or `llama1b-random` (63 MiB), where the faults cost 3–4 % of the
#: request, and not 2048 tokens', where they cost 2–3 % and the memory more.
POOL_BYTES = 128 << 20

_lock = threading.Lock()
_maps: list[mmap.mmap] = []
_marked: set[int] = set()  # the ids of the mappings held at the last mark()
_reused = [0]  # the most bytes of those lent at one time since


def _idle() -> list[int]:
    """The positions in the pool of the mappings nothing refers to any more: ``sys.getrefcount`` of an idle
    one counts the pool's list and the call's own argument; a tensor's storage over it (or a view's) adds
    its buffer's reference."""
    return [i for i in range(len(_maps)) if sys.getrefcount(_maps[i]) == 2]


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized C-contiguous CPU tensor of ``shape`` and ``dtype``, as ``torch.empty``; one of
    :data:`LARGE_BYTES` or more in a pooled mapping that no array refers to any more (the smallest that
    holds it, at most twice its size), else a new one while the pool has room — made by releasing idle
    mappings, the largest first, only when that makes enough room (a buffer the pool cannot hold leaves
    it as it was)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < LARGE_BYTES or min(shape, default=0) < 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.empty(shape, dtype=dtype)  # a negative size is torch.empty's error, nothing mapped
    with _lock:
        idle = _idle()
        fits = [i for i in idle if nbytes <= len(_maps[i]) <= 2 * nbytes]
        if fits:
            m = _maps[min(fits, key=lambda i: len(_maps[i]))]
        else:
            held, dropped = sum(len(m) for m in _maps), set()
            if held - sum(len(_maps[i]) for i in idle) + nbytes > POOL_BYTES:  # no room even if all idle
                return torch.empty(shape, dtype=dtype)  # and the idle mappings stay for what fits
            for i in sorted(idle, key=lambda i: len(_maps[i]), reverse=True):  # the largest idle first
                if held + nbytes <= POOL_BYTES:
                    break
                held -= len(_maps[i])
                dropped.add(i)
            _maps[:] = [m for i, m in enumerate(_maps) if i not in dropped]  # unmapped: unreferenced
            if held + nbytes > POOL_BYTES:
                return torch.empty(shape, dtype=dtype)
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            _maps.append(m)
        out = torch.frombuffer(m, dtype=dtype, count=numel)  # lent: the storage holds the mapping
        if _marked:  # lent at once only grows when a mapping is lent: its peak, exact
            lent = sum(
                len(_maps[i])
                for i in range(len(_maps))
                if sys.getrefcount(_maps[i]) > 2 and id(_maps[i]) in _marked
            )
            _reused[0] = max(_reused[0], lent)
    return out.view(shape)


def held_bytes() -> int:
    """The bytes the pool keeps mapped, lent or free (resident once touched)."""
    with _lock:
        return sum(len(m) for m in _maps)


def mark() -> None:
    """Start counting :func:`reused_bytes` from the mappings the pool holds now."""
    with _lock:
        _marked.clear()
        _marked.update(id(m) for m in _maps)
        _reused[0] = 0


def reused_bytes() -> int:
    """The most bytes of the mappings held at the last :func:`mark` that were lent at one time since: memory a
    request used that was already resident when it began, so that its growth in resident memory does not
    show it (``scx bench`` adds it to the growth it measures: an upper bound of the request's peak, the two
    peaks taken as if they coincided). A mapping made since under an id a released one had counts too."""
    with _lock:
        return _reused[0]

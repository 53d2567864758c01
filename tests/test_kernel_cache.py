"""numba's on-disk cache serves the fused CPU kernels to a new process: nothing is compiled again.

The kernels once lived inside a function; a parallel kernel defined there closed over the dispatchers it
calls and missed the cache in every process (~6 s of compiling on a process's first request, 12 s with
verification on). Each check runs in a fresh interpreter, twice: the first may compile (a cold cache), the
second must only load.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_PROBE = """
import json
import numpy as np
from scx_ref.backends.cpu_kernels import kernels

k = kernels()
a = np.ones((4, 3), np.float32)
k.add_rows(a, a, np.empty_like(a), np.empty((1, 3), np.float32))  # an encoding pass (parallel)
k.project64(a, np.ones((2, 3)), np.empty((4, 2)), np.empty(4), 1)  # a verifier pass (parallel, fast-math)
e2, e1, v = np.empty((0, 0)), np.empty(0), np.ones(2)
r = np.ones((2, 3))
k.freivalds_excess(a, r, e2, e1, a, e1, 0.0, r, e2, e1, v, v, v, 1e-300, 1)  # a whole check (calls project64)
stats = {name: getattr(k, name).stats for name in ("add_rows", "project64", "freivalds_excess")}
print(json.dumps({n: [sum(s.cache_hits.values()), sum(s.cache_misses.values())] for n, s in stats.items()}))
"""


def _probe() -> dict[str, list[int]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600, check=True
    )
    got: dict[str, list[int]] = json.loads(done.stdout.strip().splitlines()[-1])
    return got


def test_a_new_process_loads_the_kernels_from_the_cache() -> None:
    _probe()  # fills the cache if it is cold
    second = _probe()
    assert second == {"add_rows": [1, 0], "project64": [1, 0], "freivalds_excess": [1, 0]}, second

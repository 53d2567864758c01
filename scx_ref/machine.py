"""What this process runs on, as the operating system names it: fields of Linux's ``/proc/cpuinfo``
(the benchmark's machine line, the torch backend's choice of GEMM form by CPU vendor)."""

from __future__ import annotations

__all__ = ["cpuinfo"]


def cpuinfo(field: str) -> str | None:
    """The value of the first ``field : value`` line of ``/proc/cpuinfo`` (``"vendor_id"`` →
    ``"GenuineIntel"``, ``"model name"`` → the CPU's name), stripped; None where there is no such file
    (not Linux) or no such field."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None

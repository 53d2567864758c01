"""What this process runs on, as the operating system names it: fields of Linux's ``/proc/cpuinfo``
(the benchmark's machine line, the torch backend's choice of GEMM form by CPU vendor)."""

from __future__ import annotations

__all__ = ["cpuinfo"]


def cpuinfo(field: str) -> str | None:
    """The value of the first ``field : value`` line of ``/proc/cpuinfo`` (``"vendor_id"`` →
    ``"GenuineIntel"``, ``"model name"`` → the CPU's name), stripped; None where there is no such file
    (not Linux), it cannot be read, or has no such field. Read as UTF-8 with undecodable bytes replaced:
    a byte the locale's codec cannot decode raised UnicodeDecodeError, which the torch backend's import
    (its GEMM form by CPU vendor) passed on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None

"""The process's peak memory on a CPU, which Linux can reset: the peak of one step or one
measurement, not of everything the process did before."""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory to its current one; whether Linux allowed it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """The process's peak resident memory since it started or since :func:`reset_peak_rss`, in MiB."""
    if not PROC_STATUS.exists():
        # ru_maxrss is in bytes on macOS, KiB elsewhere.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    # VmHWM rather than getrusage's ru_maxrss: a process started by another one begins with
    # ru_maxrss at its parent's peak, which no reset lowers.
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10  # VmHWM is in KiB
    raise RuntimeError(f"no VmHWM in {PROC_STATUS}")


def release_freed_memory() -> None:
    """Hand the memory that glibc's malloc keeps after ``free`` back to Linux (``malloc_trim``), so
    that a later peak resident memory in this process counts its allocations again rather than the
    reuse of kept pages. Nothing elsewhere (another C library, another system)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

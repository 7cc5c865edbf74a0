"""Resident memory of this process: now, and peak since a mark.

Linux keeps a high-water mark of each process's RSS (``VmHWM`` in ``/proc/self/status``) that writing ``5`` to
``/proc/self/clear_refs`` restarts (Linux 4.0+). :func:`reset_peak` restarts it so that :func:`peak_since_reset`
is the peak of one stage or one system alone (``tadsr all`` records each stage's). The mark is also what
``getrusage`` reports as ``ru_maxrss`` (for this process, and for its children once they exit), and what
``/usr/bin/time -v`` reads from outside: after a reset those are the peak since the reset.

Elsewhere (macOS, a ``/proc`` that refuses the write) the functions return None / False and callers fall back
to ``ru_maxrss``.
"""

from __future__ import annotations

import ctypes
import resource
import sys

__all__ = ["lifetime_peak", "maxrss_bytes", "peak_since_reset", "reset_peak", "rss_bytes", "trim"]


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration, ValueError):
        return None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux), bytes."""
    return _status("VmRSS:")


def peak_since_reset() -> int | None:
    """This process's peak resident memory since the last :func:`reset_peak` (or its start), bytes (Linux)."""
    return _status("VmHWM:")


def reset_peak() -> bool:
    """Restart the high-water mark; False where not supported."""
    if peak_since_reset() is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def maxrss_bytes(ru_maxrss: int) -> int:
    """``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    return int(ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def lifetime_peak(children: bool = False) -> int:
    """Peak resident memory of this process since its last :func:`reset_peak` (its whole life without one), and
    of its finished children with ``children`` (each child's figure is its own peak since its last reset), bytes."""
    own = max(peak_since_reset() or 0, maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    if children:
        own = max(own, maxrss_bytes(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    return own


def trim() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``): after a phase that freed many
    allocations (an ONNX Runtime session run without its arena, a loaded model), the allocator otherwise keeps
    them resident. False where there is no glibc (macOS, musl)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True

"""Resident memory of this process: now, peak since a mark, and the peak over the process's whole life.

Linux keeps a high-water mark of each process's RSS (``VmHWM`` in ``/proc/self/status``) that writing ``5`` to
``/proc/self/clear_refs`` restarts (Linux 4.0+). :func:`reset_peak` restarts it so that :func:`peak_since_reset`
is the peak of one stage or one system alone. The mark is also what ``getrusage`` reports as ``ru_maxrss``, for
this process and, once they exit, for its children, so :func:`reset_peak` first folds the current mark into a
process-wide maximum and :func:`lifetime_peak` returns that, not ``ru_maxrss``. Tools that read the mark from
outside (``/usr/bin/time -v``) see only the peak since the last reset.

Elsewhere (macOS, a ``/proc`` that refuses the write) the functions return None / False and callers fall back
to ``ru_maxrss``.
"""

from __future__ import annotations

import resource
import sys

__all__ = ["lifetime_peak", "maxrss_bytes", "peak_since_reset", "reset_peak", "rss_bytes"]

_folded = 0  # the largest high-water mark this process had before one of its resets, bytes


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
    """Restart the high-water mark (after folding it into :func:`lifetime_peak`); False where not supported."""
    global _folded
    mark = peak_since_reset()
    if mark is None:
        return False
    _folded = max(_folded, mark)
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
    """Peak resident memory of this process over its life, resets included (and of its finished children with
    ``children``: each child's own figure is its peak since its last reset), bytes."""
    own = max(_folded, peak_since_reset() or 0, maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    if children:
        own = max(own, maxrss_bytes(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    return own

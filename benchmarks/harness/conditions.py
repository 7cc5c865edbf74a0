"""The conditions a timing carries: the machine (:func:`machine_info`) and the library versions.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from typing import Any

from tadsr import versions

logger = logging.getLogger(__name__)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores (and those this process may use), OS, Python, load average."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (affinity or os.cpu_count() or 1):
        # Measured here: the bundled UNet takes 0.1 s with 1 thread on a busy 2-core machine and 5 s with 2
        # threads (every OpenMP region waits for a descheduled worker), so busy-machine timings mislead.
        logger.warning("the machine is busy (1-min load average %.1f on %s usable cores): multi-threaded timings "
                       "will be inflated; benchmark on an idle machine or with --threads 1", load, affinity)
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores_logical": os.cpu_count(),
        "cores_usable": affinity,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a benchmark depends on (None: not installed); imports nothing.

    The tools are :data:`tadsr.versions.BENCH_TOOLS` (the one list, shared with the artifact manifests); the
    report keeps its key ``tadsr-mobile`` for the toolkit itself.
    """
    return versions.tool_versions(versions.BENCH_TOOLS, python=False, keys={"tadsr": "tadsr-mobile"})

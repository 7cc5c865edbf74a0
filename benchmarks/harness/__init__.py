"""tadsr.bench: the benchmark harness behind ``tadsr bench`` (systems, measurement, report).

The public names below are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BenchConfig": "tadsr.bench.bench",
    "BenchResult": "tadsr.bench.bench",
    "run_bench": "tadsr.bench.bench",
    "compute_ratios": "tadsr.bench.bench",
    "manifest_defaults": "tadsr.bench.bench",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

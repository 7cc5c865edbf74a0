"""tadsr.bench: the benchmark harness behind ``tadsr bench`` (systems, measurement, report).

The public names below are imported lazily.
"""

from __future__ import annotations

from tadsr.lazy import lazy_names

_LAZY = {
    "BenchConfig": "tadsr.bench.bench",
    "BenchResult": "tadsr.bench.bench",
    "run_bench": "tadsr.bench.bench",
    "compute_ratios": "tadsr.bench.bench",
    "manifest_defaults": "tadsr.bench.bench",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)

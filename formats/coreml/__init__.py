"""Core ML slice: export (.mlpackage), post-training quantization and localisation (through the simulator)."""

from __future__ import annotations

import sys
from typing import Any

from tadsr.formats.spec import FormatSpec

__all__ = ["SPEC"]


def _runner_options(threads: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Core ML takes no thread count: compute units are chosen at export."""
    return {}, {"coreml": "compute units as exported" if sys.platform == "darwin" else "numpy (simulator)"}


SPEC = FormatSpec(
    name="coreml",
    title="Core ML",
    suffix=".mlpackage",
    export="tadsr.formats.coreml.export:export_coreml",
    quantize="tadsr.formats.coreml.ptq:quantize_job",
    localize="tadsr.formats.coreml.localize:diagnose",
    runner_options=_runner_options,
    quantized_precisions=("int8", "w8"),
    threads=False,
    needs_macos=True,
    simulator="coreml-sim",
    job_graphs=("pipeline",),
    job_precisions=("fp32", "fp16"),
)

"""ExecuTorch slice: export (XNNPACK), post-training quantization (PT2E) and localisation."""

from __future__ import annotations

from typing import Any

from tadsr.formats.spec import FormatSpec

__all__ = ["SPEC"]


def _runner_options(threads: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"threads": threads} if threads else {}), {"executorch_threadpool": threads or "default"}


SPEC = FormatSpec(
    name="executorch",
    title="ExecuTorch",
    suffix=".pte",
    export="tadsr.formats.executorch.export:export_executorch",
    quantize="tadsr.formats.executorch.ptq:quantize_job",
    localize="tadsr.formats.executorch.localize:diagnose",
    runner_options=_runner_options,
)

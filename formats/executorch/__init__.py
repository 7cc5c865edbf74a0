"""ExecuTorch slice: export (XNNPACK), post-training quantization (PT2E) and localisation."""

from __future__ import annotations

from typing import Any

from tadsr.formats.spec import FormatSpec

__all__ = ["SPEC"]


def _runner_options(threads: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """No runner option: ExecuTorch's XNNPACK pool is process-wide and never resized at run time (resizing it
    after a program is loaded corrupts memory), so the record is the pool's actual size."""
    try:
        from tadsr.runtime.executorch_runner import pool_threads

        size: Any = pool_threads()
    except ImportError:
        size = None
    return {}, {"executorch_threadpool": f"{size if size is not None else 'default'} (process-wide, not resized)"}


SPEC = FormatSpec(
    name="executorch",
    title="ExecuTorch",
    suffix=".pte",
    export="tadsr.formats.executorch.export:export_executorch",
    quantize="tadsr.formats.executorch.ptq:quantize_job",
    localize="tadsr.formats.executorch.localize:diagnose",
    threads=False,
    runner_options=_runner_options,
)

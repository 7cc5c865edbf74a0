"""ONNX slice: export, post-training quantization and localisation for ONNX Runtime."""

from __future__ import annotations

from typing import Any

from tadsr.formats.spec import FormatSpec

__all__ = ["SPEC"]


def _runner_options(threads: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    record = {"onnxruntime_intra_op": threads or "default (0)", "onnxruntime_inter_op": 1 if threads else "default"}
    return ({"threads": threads} if threads else {}), record


SPEC = FormatSpec(
    name="onnx",
    title="ONNX",
    suffix=".onnx",
    export="tadsr.formats.onnx.export:export_onnx",
    quantize="tadsr.formats.onnx.ptq:quantize_job",
    localize="tadsr.formats.onnx.localize:diagnose",
    output_scale="tadsr.formats.onnx.localize:onnx_output_scale",
    runner_options=_runner_options,
    exposes_latent=True,
)

"""Core ML INT8: W8A8 from the PT2E-quantized graph, and data-free weight-only INT8 (W8) from the fp32 package.

* W8A8 (:func:`coreml_w8a8`): the graph after the Core ML rewrites, quantized with PT2E exactly as for
  ExecuTorch (:class:`tadsr.formats.executorch.ptq.PT2EQuant`, same recipe machinery), then the converted
  ``ExportedProgram`` goes through ``coremltools.convert``: its quantize / dequantize pairs become MIL
  ``quantize`` / ``dequantize`` ops (activations) and ``constexpr_affine_dequantize`` (weights), which needs
  iOS 17. Ops left float compute in fp32 (the parent artifact's precision), so the measured error is the
  quantization's alone. The blocks the recipe keeps float still store their weights INT8 (weight-only, as
  ONNX does; :func:`~tadsr.formats.executorch.ptq.int8_float_weights`), the pinned ones aside.
* W8 (:func:`coreml_w8`): ``ct.optimize.coreml.linear_quantize_weights`` on the fp32 ``.mlpackage`` with
  ``OpLinearQuantizerConfig(mode="linear_symmetric")``: int8 weights per output channel, dequantized at load
  time, activations untouched. No calibration data; the fallback when no representative images exist.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tadsr.errors import ExportError
from tadsr.formats.artifact import BackendResult
from tadsr.formats.sensitivity import BackendRecipe
from tadsr.formats.spec import QuantizeJob

__all__ = ["W8A8_TARGET", "coreml_w8a8", "coreml_w8", "quantize_job"]

logger = logging.getLogger(__name__)

W8A8_SCHEME = (
    "weights int8 symmetric per-channel, activations int8 asymmetric per-tensor (PT2E -> MIL quantize/dequantize); "
    "blocks kept float: int8 weights, float activations"
)
W8_SCHEME = "weights int8 symmetric per-channel (linear_quantize_weights), activations float"
W8A8_TARGET = "iOS17"  # MIL quantize/dequantize of activations


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send coremltools' per-pass progress bars (stderr) to DEBUG."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield
    for line in buf.getvalue().splitlines()[-5:]:
        logger.debug("%s", line.strip()[-200:])


def _op_counts(ml: Any) -> dict[str, int]:
    prog = getattr(ml, "_mil_program", None)
    if prog is None:
        return {}
    ops = Counter(op.op_type for f in prog.functions.values() for op in f.operations if op.op_type != "const")
    return dict(sorted(ops.items()))


def _set_metadata(ml: Any, metadata: Mapping[str, Any]) -> None:
    import json

    for k, v in sorted(metadata.items()):
        ml.user_defined_metadata[f"tadsr.{k}" if not k.startswith("tadsr.") else k] = (
            v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        )


def coreml_w8a8(
    converted: torch.fx.GraphModule,
    example: Sequence[torch.Tensor],
    out_dir: Path,
    *,
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> BackendResult:
    """Convert a PT2E-converted graph to ``out_dir/<name>.mlpackage`` (W8A8, iOS 17, fp32 elsewhere).

    Raises:
        ExportError: export or conversion failed.
    """
    import coremltools as ct

    from tadsr.formats.coreml.export import convert_validated_once, pass_pipeline

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(converted, tuple(example), strict=False).run_decompositions({})
        with _quiet():
            ml = convert_validated_once(
                program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                inputs=[ct.TensorType(name=n, shape=tuple(x.shape)) for n, x in zip(input_names, example, strict=True)],
                outputs=[ct.TensorType(name=n) for n in output_names], compute_precision=ct.precision.FLOAT32,
                pass_pipeline=pass_pipeline(), skip_model_load=True,  # as the fp32 export: no compile on macOS here
            )  # fmt: skip
    except Exception as e:  # coremltools raises many types; name the step
        raise ExportError(f"Core ML conversion of the PT2E INT8 {name} graph failed: {e}") from e
    _set_metadata(ml, {**dict(metadata or {}), "precision": "int8"})
    path = Path(out_dir) / f"{name}.mlpackage"
    from tadsr.formats.coreml.export import save_package

    save_package(ml, path)
    ops = _op_counts(ml)
    logger.info("coreml w8a8 %s: %d quantize, %d dequantize ops, %.1fs", name, ops.get("quantize", 0),
                ops.get("dequantize", 0), time.perf_counter() - t0)  # fmt: skip
    return BackendResult(files=[path.name], format="coreml", precision="int8",
                         info={"quantizer": "torchao PT2E + XNNPACKQuantizer -> coremltools.convert",
                               "scheme": W8A8_SCHEME, "minimum_deployment_target": W8A8_TARGET,
                               "compute_precision": "fp32", "mil_ops": ops,
                               "convert_s": round(time.perf_counter() - t0, 3), **dict(info or {})})  # fmt: skip


def coreml_w8(
    fp32_package: Path,
    out_dir: Path,
    *,
    name: str,
    weight_threshold: int = 2048,
    metadata: Mapping[str, Any] | None = None,
) -> BackendResult:
    """Weight-only INT8 of an fp32 ``.mlpackage`` into ``out_dir/<name>.mlpackage`` (no calibration data).

    Args:
        fp32_package: the parent artifact's package.
        out_dir: existing folder.
        name: file stem.
        weight_threshold: weights with fewer elements stay float (coremltools' default, 2048).
        metadata: extra ``tadsr.*`` user metadata.

    Raises:
        ExportError: the package cannot be read or compressed.
    """
    import coremltools as ct

    t0 = time.perf_counter()
    try:
        ml = ct.models.MLModel(str(fp32_package), skip_model_load=True)
        config = ct.optimize.coreml.OptimizationConfig(
            global_config=ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                                     weight_threshold=weight_threshold))  # fmt: skip
        with _quiet():
            w8 = ct.optimize.coreml.linear_quantize_weights(ml, config)
    except Exception as e:  # coremltools raises many types
        raise ExportError(f"Core ML weight-only quantization of {fp32_package} failed: {e}") from e
    _set_metadata(w8, {**dict(metadata or {}), "precision": "w8"})
    path = Path(out_dir) / f"{name}.mlpackage"
    from tadsr.formats.coreml.export import save_package

    save_package(w8, path)
    ops = _op_counts(w8)
    logger.info("coreml w8 %s: %.1fs", name, time.perf_counter() - t0)
    return BackendResult(files=[path.name], format="coreml", precision="w8",
                         info={"quantizer": "coremltools.optimize.coreml.linear_quantize_weights", "scheme": W8_SCHEME,
                               "mode": "linear_symmetric", "weight_threshold": weight_threshold, "mil_ops": ops,
                               "quantize_s": round(time.perf_counter() - t0, 3)})  # fmt: skip


# ---------------------------------------------------------------------------------------------------- driver


def quantize_job(job: QuantizeJob) -> list[Path]:
    """The Core ML slice's INT8 driver (registry ``quantize`` hook): PT2E (Core ML quantizer) -> recipe ->
    W8A8 ``.mlpackage`` (``int8``), and (``job.weight_only``) the fp32 package's weights quantized data-free
    (``w8``)."""
    from tadsr.formats.coreml.export import validate_package
    from tadsr.formats.executorch.ptq import output_scales, pt2e_recipe

    # float blocks keep float activations but INT8 weights (constexpr_affine_dequantize), as in ONNX
    converted, entry, (fq, rewrites, example) = pt2e_recipe(job, "coreml", "coreml", float_weights_int8=True)
    in_names = [i.name for i in job.spec.inputs]
    out_names = [o.name for o in job.spec.outputs]
    meta = {"graph": job.name, "calibration_hash": job.calib.info["content_hash"], "float_units": entry.float_units}

    def build_w8a8(folder: Path) -> BackendResult:
        res = coreml_w8a8(converted, example, folder, name=job.name, input_names=in_names, output_names=out_names,
                          metadata=meta, info={"rewrites": rewrites, "int8_fraction": entry.int8_fraction,
                                               "output_scales": output_scales(converted, out_names)})  # fmt: skip
        validate_package(folder / res.files[0], job.spec)
        return res

    paths = [job.write("coreml", "int8", entry, build_w8a8, fq)]
    if not job.weight_only:
        return paths
    w8_entry = BackendRecipe(op_types=["conv", "linear", "matmul (constant weights)"], method="none (data-free)",
                             scheme=W8_SCHEME, source="all")  # fmt: skip

    def build_w8(folder: Path) -> BackendResult:
        res = coreml_w8(job.parent_file, folder, name=job.name, metadata={"graph": job.name})
        validate_package(folder / res.files[0], job.spec)
        return res

    paths.append(job.write("coreml-w8", "w8", w8_entry, build_w8, None))
    return paths

"""ExecuTorch localisation: a ``.pte`` hides its intermediates (delegates are opaque), so the export-ready graph
is re-lowered with the artifact's rewrites and delegate and every unit output tapped
(``executorch.devtools.intermediate_output_tap``), then run in the ExecuTorch runtime."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tadsr.errors import ConfigError
from tadsr.formats.executorch.passes import lean_xnnpack_passes, xnnpack_partitioner
from tadsr.formats.fx_meta import shared_node_sources
from tadsr.formats.localize import (
    GraphTrace,
    Localization,
    LocalizeOutcome,
    LocalizeRequest,
    build_localization,
    trace_graph,
    unit_pairs,
)
from tadsr.metrics import error_stats

__all__ = ["diagnose", "localize_executorch"]

_INT8_NOTE = ("no block localisation for INT8 ExecuTorch programs: a re-lowering would rebuild the float program, "
              "and the PT2E program's intermediates are inside the delegate; the quantize stage's per-block "
              "sensitivity (recipe.json in the artifact) says which blocks lose most")  # fmt: skip


def localize_executorch(
    module: nn.Module, spec: Any, ref_trace: GraphTrace, inputs: Mapping[str, np.ndarray], *, case: str,
    threshold_psnr: float, backend: str = "xnnpack", rewrites: Sequence[str] | str | None = None,
    artifact_output: Mapping[str, np.ndarray] | None = None,
) -> Localization:  # fmt: skip
    """Re-lower the export-ready graph with every unit output tapped, run it in ExecuTorch, compare per unit.

    Args:
        module, spec: the export-ready graph and its GraphSpec.
        ref_trace: ``trace_graph(module, spec, variant="none")`` (units and reference values).
        inputs: the case's inputs; case, threshold_psnr: as for :func:`tadsr.formats.onnx.localize.localize_onnx`.
        backend: the artifact's delegate: ``"xnnpack"`` or ``"portable"`` (no delegate); other delegates
            (Core ML) do not run here.
        rewrites: the rewrites the artifact was exported with (``backend_info["rewrites"]``; default the
            backend's set).
        artifact_output: the artifact's own outputs on this case; compared with the re-lowered program's
            outputs to say whether the file itself computes what a fresh lowering computes.

    Raises:
        ConfigError: ExecuTorch or its devtools are not installed, or the delegate does not run here.
    """
    try:
        from executorch.devtools.intermediate_output_tap import FULL_TENSOR, strip_taps_, tap_intermediate_outputs_
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError as e:
        raise ConfigError(f"ExecuTorch localisation needs executorch with devtools: {e}") from e
    if backend not in ("xnnpack", "portable"):
        raise ConfigError(f"the ExecuTorch {backend} delegate does not run here; re-lowering needs xnnpack or portable")
    from tadsr.formats.rewrites import apply_rewrites

    example = spec.example_inputs()
    names = list(rewrites) if rewrites is not None and not isinstance(rewrites, str) else (rewrites or "xnnpack")
    rewritten, _ = apply_rewrites(module, example, names if names != "portable" else "xnnpack")
    trace = trace_graph(rewritten, spec, variant="none")
    taps = {u.outputs[-1]: u.name for u in trace.units if u.outputs}
    own = trace.run(inputs, keep=list(taps))
    ref = ref_trace.run(inputs, keep=[u.outputs[-1] for u in ref_trace.units if u.outputs])
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), shared_node_sources(), lean_xnnpack_passes():
        ep, specs = tap_intermediate_outputs_(trace.program, (lambda n: n.name in taps, FULL_TENSOR))
        parts = []
        if backend == "xnnpack":
            parts = [xnnpack_partitioner()]
        edge = to_edge_transform_and_lower(ep, partitioner=parts)
        strip_taps_(edge)
        buffer = edge.to_executorch().buffer
    args = [torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32)) for n in trace.input_names]
    flat = Runtime.get().load_program(buffer).load_method("forward").execute(args)
    observed = {s.node_name: flat[s.output_index].detach().float().numpy() for s in specs}
    notes = [(f"re-lowered ({backend}, rewrites {names if isinstance(names, str) else ', '.join(names)}) with the "
             "unit outputs tapped: this localises the lowering and the runtime kernels, not edits of the file")]  # fmt: skip
    if artifact_output is not None:
        worst = min(error_stats(np.asarray(artifact_output[s.name], np.float32), flat[i].detach().float().numpy()).psnr
                    for i, s in enumerate(spec.outputs))  # fmt: skip
        verdict = ("" if worst >= threshold_psnr else ": the file does not compute what a fresh lowering of the "
                   "reference computes (modified after export, other weights or another toolchain)")  # fmt: skip
        notes.append(f"artifact file vs fresh lowering on this case: PSNR {worst:.1f} dB{verdict}")
    method = ("ExecuTorch re-lowering of the export-ready graph with the unit outputs tapped as extra outputs "
              "(executorch.devtools.intermediate_output_tap), run in the ExecuTorch runtime")  # fmt: skip
    return build_localization(ref_trace.units, unit_pairs(ref_trace, ref, trace, own, observed),
                              backend="executorch (re-lowered)", method=method, case=case,
                              threshold_psnr=threshold_psnr, notes=notes)  # fmt: skip


def diagnose(req: LocalizeRequest) -> LocalizeOutcome:
    """The ExecuTorch slice's localize hook: re-lower and tap (fp32 / fp16 programs; INT8 gets a note)."""
    if req.precision == "int8":
        return LocalizeOutcome(notes=[_INT8_NOTE])
    info = req.manifest.get("backend_info") or {}
    rewrites = list(info["rewrites"]) if isinstance(info.get("rewrites"), dict) else None
    loc = localize_executorch(req.module, req.spec, req.trace("none"), req.inputs, case=req.case,
                              threshold_psnr=req.threshold_psnr, backend=str(info.get("backend") or "xnnpack"),
                              rewrites=rewrites, artifact_output=req.artifact_output)  # fmt: skip
    return LocalizeOutcome([loc])

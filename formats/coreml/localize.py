"""Core ML localisation: every MIL variable of the ``.mlpackage`` from the numpy simulator
(:mod:`tadsr.runtime.coreml_sim`), matched by name to the program the Core ML exporter converted."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tadsr.formats.localize import (
    GraphTrace,
    Localization,
    LocalizeOutcome,
    LocalizeRequest,
    build_localization,
    unit_pairs,
)

__all__ = ["diagnose", "localize_coreml"]


def localize_coreml(
    path: Path, trace: GraphTrace, ref_trace: GraphTrace, inputs: Mapping[str, np.ndarray], *, case: str,
    threshold_psnr: float,
) -> Localization:  # fmt: skip
    """Localise a Core ML ``.mlpackage`` with the numpy simulator's intermediates.

    Args:
        path: the ``.mlpackage``.
        trace: the program the Core ML exporter converted (:func:`tadsr.formats.coreml.export.exported_program`:
            rewrites, ``torch.export``, ``run_decompositions({})``); MIL variables carry its node names.
        ref_trace: the export-ready graph itself (units compared by name against it).
        inputs: the case's inputs; case, threshold_psnr: as for :func:`tadsr.formats.onnx.localize.localize_onnx`.
    """
    from tadsr.runtime.coreml_sim import load_mlpackage

    def base(name: str) -> str:
        return re.sub(r"(_cast_fp(16|32))+$", "", name)

    prog = load_mlpackage(path)
    # only the variables a unit comparison can use (at official size every activation of a tile is many GB)
    usable = set(trace.candidates()) | set(trace.graph_outputs.values())
    env = prog.predict({k: np.asarray(v) for k, v in inputs.items()}, precision="as_written",
                       intermediates=lambda name: base(name) in usable)  # fmt: skip
    observed: dict[str, np.ndarray] = {}
    for name, val in env.items():
        if isinstance(val, np.ndarray) and val.dtype.kind == "f":
            observed.setdefault(base(name), val.astype(np.float32))
    del env
    for fx_name, out_name in trace.graph_outputs.items():
        if out_name in observed:
            observed.setdefault(fx_name, observed[out_name])
    wanted = [n for n in trace.candidates() if n in observed]
    own = trace.run(inputs, keep=wanted)
    ref = ref_trace.run(inputs, keep=[u.outputs[-1] for u in ref_trace.units if u.outputs])
    hit = len(trace.node_names & {base(n) for n in prog.variable_names})
    method = (f"coreml_sim intermediates (numpy model of Core ML: fp16 ops rounded as written); MIL variables "
              f"matched to the converted program's torch.export nodes by name ({hit} of {len(trace.node_names)}), "
              "units compared with the export-ready graph's")  # fmt: skip
    notes = [] if hit else [("no MIL variable carries a torch.export node name (converted from TorchScript?); "
                            "localisation needs a conversion from torch.export")]  # fmt: skip
    return build_localization(ref_trace.units, unit_pairs(ref_trace, ref, trace, own, observed), backend="coreml-sim",
                              method=method, case=case, threshold_psnr=threshold_psnr, notes=notes)  # fmt: skip


def diagnose(req: LocalizeRequest) -> LocalizeOutcome:
    """The Core ML slice's localize hook: the converted program's trace against the export-ready graph's."""
    loc = localize_coreml(req.file, req.trace("coreml"), req.trace("none"), req.inputs, case=req.case,
                          threshold_psnr=req.threshold_psnr)  # fmt: skip
    return LocalizeOutcome([loc])

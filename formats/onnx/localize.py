"""ONNX localisation: the file's intermediate tensors exposed as graph outputs and run in ONNX Runtime.

Tensors are matched to the ``torch.export`` nodes of :func:`tadsr.formats.localize.trace_graph` (variant ``onnx``)
by name; :func:`check_onnx_weights` compares named initializers with the reference weights, and
:func:`onnx_output_scale` reads an INT8 output's quantization scale from a QDQ file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr.formats.localize import (
    GraphTrace,
    Localization,
    LocalizeOutcome,
    LocalizeRequest,
    WeightCheck,
    localize_values,
    unit_of_tensor,
)

__all__ = [
    "OnnxTap",
    "check_onnx_weights",
    "diagnose",
    "localize_onnx",
    "onnx_codebook_input",
    "onnx_output_scale",
    "onnx_value_names",
    "run_onnx_with_intermediates",
]

logger = logging.getLogger(__name__)


_FX_META = re.compile(r"^%([A-Za-z_][A-Za-z0-9_]*)\s*:")


def onnx_value_names(model: Any) -> dict[str, str]:
    """ONNX tensor name -> FX node name: every node output, plus metadata-derived names when present."""
    out: dict[str, str] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        fx = _FX_META.match(meta.get("pkg.torch.onnx.fx_node", ""))
        for o in node.output:
            if o:
                out[o] = o
        if fx and node.output and node.output[-1] and fx.group(1) not in out.values():
            out[node.output[-1]] = fx.group(1)
    return out


def _onnx_elem_types(model: Any) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:  # best effort; ORT re-checks
        logger.debug("ONNX shape inference failed (%s); exposed outputs typed float32", e)
        inferred = model
    types = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def structure_only(model: Any, keep_bytes: int = 1024) -> Any:
    """A copy of an ONNX model's graph for inspection (shape inference, tensor names and types) without its large
    weights: initializers over ``keep_bytes`` keep their name, type and dims but no data (an official-size graph's
    weights are ~1 GB; shape and constant tensors stay whole, shape inference reads them)."""
    import onnx

    light = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, f, getattr(model, f))
    light.opset_import.extend(model.opset_import)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        if t.ByteSize() <= keep_bytes:
            g.initializer.append(t)
        else:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return light


def expose_outputs(model: Any, names: Sequence[str]) -> list[str]:
    """Add the tensors ``names`` that nodes of ``model`` produce, and that are not outputs yet, as graph outputs, in
    place, typed by shape inference on the graph without its large weights; returns the names added."""
    import onnx

    present = {o for n in model.graph.node for o in n.output}
    existing = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n in present and n not in existing]
    if added:
        types = _onnx_elem_types(structure_only(model))
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
                                  for n in added)  # fmt: skip
    return added


class OnnxTap:
    """An ONNX file opened in ONNX Runtime with some intermediate tensors added as graph outputs.

    Args:
        path: the ONNX file (not modified: the edit is in memory).
        names: tensor names to expose (names the file does not have are ignored).
        threads: intra-op threads.
    """

    def __init__(self, path: Path, names: Sequence[str], *, threads: int | None = 1) -> None:
        import onnx
        import onnxruntime as ort

        # the graph alone where the weights are in a data file: ORT reads them from beside the file, and Python
        # never holds them (official pipeline: 3.5 -> 0.9 GB to open, 3.6 -> 1.7 GB after a run)
        model = onnx.load(str(path), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        expose_outputs(model, names)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        folder, cpu, session = str(Path(path).resolve().parent), ["CPUExecutionProvider"], None
        if external:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            try:
                session = ort.InferenceSession(model.SerializeToString(), opts, providers=cpu)
            except Exception as e:  # e.g. a small constant that shape inference reads stored in the data file
                logger.debug("ORT could not open %s's graph with its weights beside it (%s); loading them", path, e)
                onnx.load_external_data_for_model(model, folder)
        if session is None:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=cpu)
        self.session = session
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{tensor name: value} for the graph outputs and the exposed tensors."""
        feeds = {k: np.ascontiguousarray(inputs[k], dtype=np.float32) for k in self.inputs}
        return {k: np.asarray(v) for k, v in zip(self.outputs, self.session.run(self.outputs, feeds), strict=True)}


def onnx_codebook_input(path: Path | Any, shape: Sequence[int]) -> str | None:
    """Name of the latent that a VQ graph's codebook search reads: the nearest tensor of ``shape`` upstream of
    the (first) ArgMin, e.g. the denoised latent ``x0`` inside a fused pipeline graph. None if there is none.
    ``path``: an ONNX file, or a loaded ``ModelProto`` (not modified)."""
    import onnx

    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:  # best effort
        logger.debug("ONNX shape inference failed (%s)", e)
    shapes = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in model.graph.value_info}
    producer = {o: n for n in model.graph.node for o in n.output}
    argmin = next((n for n in model.graph.node if n.op_type == "ArgMin"), None)
    if argmin is None:
        return None
    frontier, seen = [argmin.input[0]], set()
    while frontier:
        name = frontier.pop(0)
        if name in seen or name not in producer:
            continue
        seen.add(name)
        if shapes.get(name) == tuple(shape):
            return name
        frontier += [i for i in producer[name].input if i]
    return None


def run_onnx_with_intermediates(
    path: Path, inputs: Mapping[str, np.ndarray], names: Sequence[str], *, threads: int | None = 1
) -> dict[str, np.ndarray]:
    """Run an ONNX file once with ``names`` exposed as extra graph outputs (see :class:`OnnxTap`)."""
    return OnnxTap(path, names, threads=threads).run(inputs)


def localize_onnx(
    path: Path, trace: GraphTrace, inputs: Mapping[str, np.ndarray], *, case: str, threshold_psnr: float
) -> Localization:
    """Localise an ONNX file's divergence (see the module docstring)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = onnx_value_names(model)
    del model
    fx_to_onnx: dict[str, str] = dict(trace.graph_outputs)
    for onnx_name, fx_name in names.items():
        fx_to_onnx.setdefault(fx_name, onnx_name)
    wanted = [n for n in trace.candidates() if n in fx_to_onnx]
    reference = trace.run(inputs, keep=wanted)
    raw = run_onnx_with_intermediates(path, inputs, [fx_to_onnx[n] for n in wanted])
    observed = {n: raw[fx_to_onnx[n]] for n in wanted if fx_to_onnx[n] in raw}
    hit = len(trace.node_names & set(fx_to_onnx))
    method = (f"ONNX intermediates exposed as graph outputs, run in ONNX Runtime; tensors matched to torch.export "
              f"nodes by name ({hit} of {len(trace.node_names)} nodes named in the file; naming: {trace.variant})")  # fmt: skip
    return localize_values(trace, reference, observed, backend="onnx", method=method, case=case,
                           threshold_psnr=threshold_psnr)  # fmt: skip


def check_onnx_weights(path: Path, state: Mapping[str, torch.Tensor], *, precision: str) -> WeightCheck:
    """Compare the file's initializers named like a reference parameter/buffer with that tensor.

    fp32: exact up to 1e-6 relative; fp16: within fp16 rounding (2^-10 relative, plus fp16's smallest normal).
    INT8 weights (``<name>_quantized``) are dequantized and must lie within half a quantization step.
    Initializers the exporter transformed (other shapes) are skipped.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    result = WeightCheck()
    for name, tensor in state.items():
        ref = tensor.detach().float().cpu().numpy()
        stored = None
        tol = 1e-6 * float(np.abs(ref).max(initial=0.0)) + 1e-12
        if name in inits:
            stored = numpy_helper.to_array(inits[name]).astype(np.float32)
            if inits[name].data_type == onnx.TensorProto.FLOAT16:
                tol = float(np.abs(ref).max(initial=0.0)) * 2.0**-10 + 6.2e-5
        elif f"{name}_quantized" in inits and f"{name}_quantized" in dq:
            node = dq[f"{name}_quantized"]
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 else 0.0
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if np.ndim(scale) == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
            stored = (q - zp) * scale
            tol = 0.5 * float(np.max(scale)) * 1.001 + 1e-12
        if stored is None or stored.shape != ref.shape:
            continue
        result.compared += 1
        diff = float(np.abs(stored - ref).max(initial=0.0))
        if diff > tol:
            result.mismatches.append({"tensor": name, "max_abs": diff, "tolerance": tol})
    result.skipped = len(state) - result.compared
    result.precision = precision
    return result


def onnx_output_scale(path: Path, output: str) -> tuple[float | None, str]:
    """Quantization scale of graph output ``output`` in a QDQ ONNX file, and where it was read.

    Looks for the DequantizeLinear that produces the output, walking back through ops that do not change
    the scale (Identity, Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Clip, Relu, MaxPool), or a
    QuantizeLinear that reads it. Returns ``(None, reason)`` when there is none (a float output).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    producer = {o: n for n in model.graph.node for o in n.output}
    passthrough = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Clip", "Relu", "MaxPool"}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    name, hops = output, []
    for _ in range(16):
        node = producer.get(name)
        if node is None:
            break
        if node.op_type == "DequantizeLinear":
            s = value(node.input[1])
            if s is not None and np.size(s) == 1:
                return float(
                    np.asarray(s).reshape(())
                ), f"DequantizeLinear '{node.name}' ({' <- '.join(hops) or 'output'})"
            return None, f"DequantizeLinear '{node.name}' has a per-channel scale on the output"
        if node.op_type not in passthrough:
            break
        hops.append(node.op_type)
        name = node.input[0]
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == output:
            s = value(node.input[1])
            if s is not None and np.size(s) == 1:
                return float(np.asarray(s).reshape(())), f"QuantizeLinear '{node.name}' reading the output"
    return None, f"no QuantizeLinear/DequantizeLinear fixes the scale of output '{output}' (float output)"


def diagnose(req: LocalizeRequest) -> LocalizeOutcome:
    """The ONNX slice's localize hook: per-block localisation and the static weight check."""
    loc = localize_onnx(req.file, req.trace("onnx"), req.inputs, case=req.case, threshold_psnr=req.threshold_psnr)
    tensors = dict(req.module.named_parameters()) | dict(req.module.named_buffers())
    weights = check_onnx_weights(req.file, tensors, precision=req.precision)
    for m in weights.mismatches:
        m["unit"], m["stage"] = unit_of_tensor(m["tensor"], req.graph)
    return LocalizeOutcome([loc], weights)

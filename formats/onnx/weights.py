"""INT8 storage of the float weights an ONNX INT8 graph keeps (:mod:`tadsr.formats.onnx.ptq`'s steps after QDQ).

* :func:`weight_only_int8`: the weights of nodes left float (sensitive blocks) stored as symmetric INT8 with a
  ``DequantizeLinear`` restoring the float tensor: the node computes in float, the file is ~1/4 the size.
* :func:`compress_add_constants`: large float constants read only by ``Add`` (the Swin relative-position bias
  and masks baked into the denoiser) stored the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from tadsr.formats.int8 import ADD_CONSTANT_MIN_ELEMENTS, symmetric_int8

__all__ = ["compress_add_constants", "weight_only_int8"]


def _int8_dq(t: onnx.TensorProto, axis: int) -> tuple[list[onnx.TensorProto], onnx.NodeProto, float, int, int]:
    """Symmetric INT8 of an fp32 initializer, one scale per index of ``axis``; a DequantizeLinear restores its name.

    Returns (new initializers, the DQ node, max abs rounding error, fp32 bytes, int8 bytes incl. zero points).
    """
    w = onnx.numpy_helper.to_array(t).astype(np.float32)
    qw, scale, err = symmetric_int8(w, axis)
    names = (f"{t.name}_int8", f"{t.name}_scale", f"{t.name}_zero_point")
    inits = [onnx.numpy_helper.from_array(qw, names[0]), onnx.numpy_helper.from_array(scale, names[1]),
             onnx.numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), names[2])]  # fmt: skip
    node = onnx.helper.make_node("DequantizeLinear", list(names), [t.name], name=f"{t.name}_dq", axis=axis)
    return inits, node, err, w.nbytes, qw.nbytes + scale.size


def _replace_initializers(model: onnx.ModelProto, picks: Mapping[str, int]) -> dict[str, Any]:
    """Replace the initializers named in ``picks`` (name -> axis) by INT8 + DequantizeLinear; statistics."""
    stats: dict[str, Any] = {"tensors": 0, "fp32_bytes": 0, "int8_bytes": 0, "max_abs_error": 0.0}
    kept: list[onnx.TensorProto] = []
    dq: list[onnx.NodeProto] = []
    for t in model.graph.initializer:
        if t.name not in picks:
            kept.append(t)
            continue
        inits, node, err, fp32_bytes, int8_bytes = _int8_dq(t, picks[t.name])
        kept += inits
        dq.append(node)
        stats["tensors"] += 1
        stats["fp32_bytes"] += fp32_bytes
        stats["int8_bytes"] += int8_bytes
        stats["max_abs_error"] = max(stats["max_abs_error"], err)
    if dq:
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        nodes = dq + list(model.graph.node)  # DQ nodes read initializers only: first is topological
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    stats["max_abs_error"] = round(stats["max_abs_error"], 6)
    return stats


def weight_only_int8(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, Any]:
    """Store the weights of float-kept Conv / Gemm / MatMul ``nodes`` as INT8 per output channel, in place.

    The recipe keeps these nodes' *activations* float (that is what the fidelity floor needs); their weights
    lose almost nothing at per-channel INT8 (the Core ML W8 files show it), and the file shrinks to about a
    quarter for them. A DequantizeLinear feeds the float op. Weight-less MatMuls are skipped.
    """
    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(nodes)
    picks: dict[str, int] = {}
    for n in model.graph.node:
        if n.name not in wanted or len(n.input) < 2 or n.input[1] not in inits:
            continue
        t = inits[n.input[1]]
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        if n.op_type == "Conv":
            picks[t.name] = 0
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            picks[t.name] = 0 if trans_b else 1
        elif n.op_type == "MatMul" and len(t.dims) == 2:
            picks[t.name] = 1
    return _replace_initializers(model, picks)


def compress_add_constants(model: onnx.ModelProto, min_elements: int = ADD_CONSTANT_MIN_ELEMENTS) -> dict[str, Any]:
    """Store large float constants that only ``Add`` nodes read as INT8 + ``DequantizeLinear``, in place.

    In these graphs they are the Swin attention constants: the relative-position bias (heads, N, N) and the
    compact shift mask (values 0 and -100), which are not weights of any quantized op and would otherwise stay
    fp32 (in the bundled model they weigh as much as all INT8 weights together). Symmetric INT8, one scale per
    index of axis 0 (per head for a bias, per window row for a mask; 0 and -100 are exact up to fp32 rounding of
    the scale). The Add itself stays float; parity of the final file measures the effect.

    Returns:
        ``{"tensors", "fp32_bytes", "int8_bytes", "max_abs_error"}``.
    """
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    outputs = {o.name for o in model.graph.output}
    picks = {t.name: 0 for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and readers.get(t.name) == {"Add"} and t.name not in outputs
             and len(t.dims) >= 1 and int(np.prod(t.dims)) >= min_elements}  # fmt: skip
    return _replace_initializers(model, picks)

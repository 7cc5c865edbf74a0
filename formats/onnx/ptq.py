"""ONNX Runtime static INT8 (QDQ) from an fp32 ONNX artifact, calibrated on captured graph inputs.

Steps (:class:`OnnxPTQ`):

1. ``quant_pre_process`` (ONNX shape inference + ORT basic optimizations, ``all_tensors_to_one_file``; the
   symbolic shape inference is skipped: shapes are static),
   then :func:`tadsr.formats.onnx.export.unshare_initializers` again: the optimizer re-merges identical constants and
   ``quantize_static`` rejects initializers shared between nodes.
2. Calibration once: ``quantize_static`` with a ``calibration_cache_path`` collects the tensor ranges of every
   candidate node (``minmax``, ``entropy`` or ``percentile``) on the calibration feeds. Every later variant
   (sensitivity sweep, recipe search, the final file) reuses those ranges, so a variant costs a quantization
   pass, not a calibration.
3. ``quantize_static`` in QDQ format: weights INT8 symmetric per output channel, activations UINT8 asymmetric
   per tensor (ORT's recommended U8S8 CPU scheme, which its kernels fuse into QLinearConv / QGemm /
   QLinearMatMul), only the recipe's op types (default ``Conv``, ``Gemm``, ``MatMul``: element-wise ops cost
   9-15 dB each for no speed-up), with the recipe's float nodes in ``nodes_to_exclude``.

4. :func:`compress_add_constants`: large float constants read only by ``Add`` (the Swin relative-position bias
   and shift mask, not weights of any quantized op) are stored INT8 with a ``DequantizeLinear``; the Add stays
   float.

Units: each candidate node is labelled with the module path of its weight (``...attn.qkv.bias`` ->
``...attn.qkv``) and grouped into blocks by :func:`tadsr.formats.sensitivity.unit_of`. Weight-less MatMuls
(attention scores and mixing) take the label of the nearest labelled producer upstream and form their own unit
``<block>/matmul``, so the search can keep attention float while the block's projections stay INT8.

Always float (``pinned``): the layer whose output reaches the VQ codebook search (``ArgMin``) or the
denoiser's ``x0`` output through non-quantized ops, so that the nearest-code search sees an fp32 latent; and the
weight-less MatMuls of an attention whose softmax spans ``LONG_ATTENTION_KEYS`` keys or more (the autoencoder's
global attention): UINT8 probabilities cannot hold diffuse attention (PT2E, for ExecuTorch and Core ML, never
quantizes these matmuls either).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tadsr import memory
from tadsr.errors import ConfigError, ExportError
from tadsr.formats.artifact import BackendResult
from tadsr.formats.onnx.export import PROTOBUF_LIMIT, save_model, unshare_initializers
from tadsr.formats.onnx.localize import expose_outputs
from tadsr.formats.onnx.weights import compress_add_constants, weight_only_int8
from tadsr.formats.sensitivity import BackendRecipe, SearchResult, shipped_trace, takes_shipped, unit_of, worst_psnr
from tadsr.formats.spec import QuantizeJob

__all__ = ["METHODS", "DEFAULT_OP_TYPES", "LONG_ATTENTION_KEYS", "RANGES_NAME", "OnnxPTQ", "long_attention_nodes",
           "quantize_onnx", "quantize_job", "ranges_key"]

logger = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES = ("Conv", "Gemm", "MatMul")
RANGES_NAME = "calibration_ranges.json"  # in an ONNX INT8 artifact folder: the ranges and their key
SCHEME = "weights int8 symmetric per-channel, activations uint8 asymmetric per-tensor (QDQ)"
_EXTRA = {"WeightSymmetric": True, "ActivationSymmetric": False}
# calibration runs ``CALIB_CHUNK`` patches at a time: ORT's calibrators keep every intermediate tensor of a
# chunk in memory (the fused official pipeline over a whole calibration set peaks at ~18 GiB in one chunk)
CALIB_CHUNK = 4
# ops a float latent passes through unchanged in kind on its way to the VQ argmin / the x0 output
_PASS_THROUGH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Einsum", "Pow",
                 "ReduceSum", "Sub", "Add", "Mul", "Div", "Neg", "Slice", "Concat", "Clip", "Expand"}  # fmt: skip
# Attention whose softmax spans at least this many keys keeps its two weight-less MatMuls float (pinned): the
# autoencoder's global attention (4096 keys at tile 64; the Swin windows have 64). With UINT8 per-tensor
# probabilities the step is max/255, and on smooth content the attention is diffuse (every weight ~1/N): the INT8
# decoder's attention shifted a blurred green photo by +9/-8 levels in R/G (its proj_out 51 % off) while the
# textured held-out patches lost nothing. The MatMuls carry no weights, so keeping them float costs no size.
LONG_ATTENTION_KEYS = 256
_ATTENTION_PASS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Mul", "Div",
                   "Add", "Sub", "Where", "Expand"}  # fmt: skip


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    if name not in METHODS:
        raise ConfigError(f"unknown calibration method {name!r}; choose from {', '.join(METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]  # fmt: skip


class _Feeds:
    """``CalibrationDataReader`` over a list of feed dicts (ORT's reader protocol: ``get_next``)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(x) if (x := next(self._it, None)) is not None else None

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve ``feeds[start:end]`` next (quantize_static's ``CalibStridedMinMax`` chunks)."""
        self._it = iter(self._feeds[start_index:end_index])

    def stride(self, most: int = CALIB_CHUNK) -> int:
        """Largest divisor of the number of feeds that is at most ``most``."""
        n = len(self._feeds)
        return max(k for k in range(1, min(most, n) + 1) if n % k == 0)


def _module_of(name: str) -> str | None:
    """Module path of a parameter-like initializer name (``a.b.weight`` -> ``a.b``; ``val_12`` -> None)."""
    base = re.sub(r"__u\d+$", "", name)
    if "." not in base:
        return None
    return base.rsplit(".", 1)[0] or None


def label_nodes(model: onnx.ModelProto) -> dict[str, tuple[str, bool]]:
    """Node name -> (module path, has a weight of its own).

    The path comes from a ``<module>.weight`` / ``.bias`` initializer input; nodes without one take the label
    of their first labelled producer (topological order), so attention MatMuls get the label of the
    projection that feeds them.
    """
    inits = {t.name for t in model.graph.initializer}
    producer: dict[str, str] = {}
    labels: dict[str, tuple[str, bool]] = {}
    for node in model.graph.node:
        own = next((m for i in node.input[1:] if i in inits and (m := _module_of(i))), None)
        if own is not None:
            labels[node.name] = (own, True)
        else:
            up = next((labels[producer[i]][0] for i in node.input if i in producer and producer[i] in labels), None)
            if up is not None:
                labels[node.name] = (up, False)
        for o in node.output:
            producer[o] = node.name
    return labels


def pinned_nodes(model: onnx.ModelProto, candidates: Sequence[str]) -> dict[str, str]:
    """Candidate nodes whose output reaches the VQ argmin, or a graph output named ``x0``, through float ops."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    cand = set(candidates)
    starts = [(i, "feeds the VQ codebook search (ArgMin)") for n in model.graph.node if n.op_type == "ArgMin"
              for i in n.input]  # fmt: skip
    starts += [(o.name, "produces the latent x0 that the decoder's VQ codebook search reads")
               for o in model.graph.output if o.name == "x0"]  # fmt: skip
    pinned: dict[str, str] = {}
    for tensor, why in starts:
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            node = by_output.get(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.name in cand:
                pinned[node.name] = why
            elif node.op_type in _PASS_THROUGH or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                stack += [i for i in node.input if i in by_output]
    return pinned


def long_attention_nodes(model: onnx.ModelProto, candidates: Sequence[str],
                         min_keys: int = LONG_ATTENTION_KEYS) -> dict[str, str]:  # fmt: skip
    """Weight-less candidate MatMuls around a Softmax over at least ``min_keys`` keys: the scores that feed it and
    the weighted sum that reads it (through reshapes, scaling and bias adds).

    Needs the shape-inferred model (``quant_pre_process`` output): the key count is the last dimension of the
    Softmax input. A Softmax whose input shape is unknown is left alone.
    """
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}  # fmt: skip
    inits = {t.name for t in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    cand = set(candidates)

    def weightless(node: onnx.NodeProto) -> bool:
        return node.op_type == "MatMul" and node.name in cand and not any(i in inits for i in node.input)

    def upstream(t: str) -> list[onnx.NodeProto]:
        return [by_output[t]] if t in by_output else []

    def walk(tensors: list[str], nodes_of: Callable[[str], list[onnx.NodeProto]], onward: Callable[[onnx.NodeProto],
             Sequence[str]], why: str, seen: set[str]) -> None:  # fmt: skip
        """Pin the first weight-less MatMuls reached from ``tensors`` through ``_ATTENTION_PASS`` ops."""
        while tensors:
            for node in nodes_of(tensors.pop()):
                if node.name in seen:
                    continue
                seen.add(node.name)
                if weightless(node):
                    pinned[node.name] = why
                elif node.op_type in _ATTENTION_PASS:
                    tensors += list(onward(node))

    pinned: dict[str, str] = {}
    for sm in model.graph.node:
        if sm.op_type != "Softmax":
            continue
        keys = (shapes.get(sm.input[0]) or [0])[-1]
        if keys < min_keys:
            continue
        why = (f"attention over {keys} keys: a uniform row's weight (1/{keys}) is under one UINT8 step of the "
               "probabilities, so diffuse attention (smooth content) rounds to 0 and shifts colours")  # fmt: skip
        seen: set[str] = set()
        walk([sm.input[0]], upstream, lambda n: n.input, why, seen)  # the scores: through reshapes, scaling, bias
        walk(list(sm.output), lambda t: readers.get(t, []), lambda n: n.output, why, seen)  # the weighted sum
    return pinned


@dataclass
class _Candidate:
    name: str
    op_type: str
    module: str
    unit: str
    params: int


class OnnxPTQ:
    """Pre-processed fp32 model, calibrated once; builds QDQ INT8 variants with some units kept float.

    Args:
        fp32_path: the fp32 ``.onnx`` file (self-contained or with its ``.data`` beside it).
        work_dir: scratch folder (pre-processed model, calibration cache, variants).
        calib_feeds: calibration inputs, one dict per patch.
        method: ``minmax``, ``entropy`` or ``percentile``.
        op_types: ONNX op types to quantize.
        threads: ORT intra-op threads for evaluation sessions (None: ORT default).
    """

    def __init__(
        self,
        fp32_path: Path,
        work_dir: Path,
        calib_feeds: Sequence[Mapping[str, np.ndarray]],
        *,
        method: str = "minmax",
        op_types: Sequence[str] = DEFAULT_OP_TYPES,
        threads: int | None = None,
        known_ranges: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        """See the class docstring. ``known_ranges(key)``: ranges ORT computed before for :attr:`ranges_key` (the
        pre-processed model's bytes, the calibration feeds' bytes, the method and ORT's version), or None."""
        from onnxruntime.quantization import quant_pre_process

        self.method = method
        self._calib_method = _method(method)
        self.op_types = list(op_types)
        self.threads = threads
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.pre_path = self.work / "preprocessed.onnx"
        fp32_path = Path(fp32_path)
        if Path(f"{fp32_path}.data").exists() and fp32_path.stat().st_size + Path(f"{fp32_path}.data").stat().st_size \
                < PROTOBUF_LIMIT - (1 << 24):  # fmt: skip
            # quant_pre_process cannot follow a data file it did not write (it re-saves the model to a temp
            # folder); below 2 GB, hand it a self-contained copy
            inline = self.work / "fp32-inline.onnx"
            save_model(onnx.load(str(fp32_path)), inline, threshold=PROTOBUF_LIMIT)
            fp32_path = inline
        try:
            # shapes are static, so ONNX shape inference is enough; ORT's symbolic inference (for dynamic
            # dims) fails on Constant nodes with scalar ``value_*`` attributes of unoptimized exports
            quant_pre_process(str(fp32_path), str(self.pre_path), skip_symbolic_shape=True,
                              all_tensors_to_one_file=True)  # fmt: skip
        except Exception as e:  # ORT/onnx raise many types; name the step
            raise ExportError(f"onnxruntime quant_pre_process failed on {fp32_path}: {e}") from e
        model = onnx.load(str(self.pre_path))
        _name_nodes(model)
        unshared = unshare_initializers(model)
        save_model(model, self.pre_path, threshold=PROTOBUF_LIMIT)
        labels = label_nodes(model)
        inits = {t.name: t for t in model.graph.initializer}
        self.candidates: dict[str, _Candidate] = {}
        for n in model.graph.node:
            if n.op_type in self.op_types:
                # every node of a quantized op type is a candidate (quantize_static would quantize it anyway)
                path, own = labels.get(n.name, (n.name, True))
                params = sum(int(np.prod(inits[i].dims)) for i in n.input[1:2] if i in inits)
                # weight-less ops (attention MatMuls) form their own unit inside the block: they are the most
                # INT8-sensitive layers and can stay float while the block's convolutions are quantized
                unit = unit_of(path) if own or params else f"{unit_of(path)}/{n.op_type.lower()}"
                self.candidates[n.name] = _Candidate(n.name, n.op_type, path, unit, params)
        self.pinned = {**long_attention_nodes(model, list(self.candidates)),
                       **pinned_nodes(model, list(self.candidates))}  # fmt: skip
        self.output_names = [o.name for o in model.graph.output]
        self.calib_cache = self.work / f"ranges-{method}.json"
        logger.info("onnx pre-process: %d candidate nodes in %d blocks (%d pinned float), %d initializers "
                    "unshared, %.1fs", len(self.candidates), len(self.units()), len(self.pinned), unshared,
                    time.perf_counter() - t0)  # fmt: skip
        t1 = time.perf_counter()
        self.ranges_key = ranges_key(self.pre_path, calib_feeds, method, self.op_types)
        known = None if known_ranges is None else known_ranges(self.ranges_key)
        self.ranges_source = "calibrated" if known is None else "shipped"
        if known is not None:  # the same model and feeds: ORT's cache file as it wrote it then
            self.calib_cache.write_text(json.dumps(known))
            logger.info("onnx calibration (%s): the ranges shipped for this model and these %d patches (key %s)",
                        method, len(calib_feeds), self.ranges_key[:12])  # fmt: skip
        else:
            opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
            del model, inits, labels  # the pre-processed graph's weights: not needed while ORT calibrates
            self._calibrate(_Feeds(calib_feeds), opset)
            logger.info("onnx calibration (%s) on %d patches: %.1fs", method, len(calib_feeds),
                        time.perf_counter() - t1)  # fmt: skip
        self._base: onnx.ModelProto | None = None  # shape-inferred model for in-memory variants
        self.finished: dict[str, Any] = {}  # statistics of the post-QDQ steps of the last build
        self._ranges: Any = None
        self._measured: tuple[Any, ...] | None = None  # the last in-memory variant run: floats, digests, outputs, taps
        self.built_measured: list[dict[str, np.ndarray]] | None = None
        self.built_taps: list[dict[str, np.ndarray]] | None = None
        # ``tap(model) -> tensor names``: intermediate tensors each in-memory variant run also fetches (the caller's
        # VQ lookup), kept with its outputs so that the written file need not run again to expose them
        self.tap: Callable[[onnx.ModelProto], Sequence[str]] | None = None

    # ------------------------------------------------------------------------------------------ structure
    def units(self) -> dict[str, tuple[int, int]]:
        """Unit -> (number of candidate nodes, weight parameters), pinned units excluded."""
        pinned_units = {self.candidates[n].unit for n in self.pinned}
        out: dict[str, list[int]] = {}
        for c in self.candidates.values():
            if c.unit not in pinned_units:
                acc = out.setdefault(c.unit, [0, 0])
                acc[0] += 1
                acc[1] += c.params
        return {u: (a[0], a[1]) for u, a in out.items()}

    def pinned_units(self) -> dict[str, str]:
        """Units that are always float, with the reason."""
        return {self.candidates[n].unit: why for n, why in self.pinned.items()}

    def float_nodes(self, float_units: Sequence[str], extra_nodes: Sequence[str] = ()) -> list[str]:
        """Candidate node names kept float for these units (plus pinned and extra nodes), in graph order."""
        units = set(float_units) | set(self.pinned_units())
        unknown = [n for n in extra_nodes if n not in self.candidates]
        if unknown:
            raise ConfigError(f"recipe lists float nodes that are not quantizable nodes of this graph: {unknown[:5]}")
        return [n for n, c in self.candidates.items() if c.unit in units or n in self.pinned or n in extra_nodes]

    def weight_bytes(self, nodes: Sequence[str]) -> int:
        """fp32 bytes of the weight and bias initializers of ``nodes`` in the pre-processed model."""
        model = onnx.load(str(self.pre_path), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        wanted = set(nodes)
        names = {i for n in model.graph.node if n.name in wanted for i in n.input[1:] if i in inits}
        return int(sum(4 * int(np.prod(inits[i].dims)) for i in names))

    def int8_fraction(self, float_nodes: Sequence[str]) -> float:
        """Share of the candidates' weight parameters that are INT8 with ``float_nodes`` float."""
        total = sum(c.params for c in self.candidates.values())
        kept = sum(self.candidates[n].params for n in float_nodes)
        return round(1.0 - kept / total, 4) if total else 0.0

    def _calibrate(self, reader: _Feeds, opset: int) -> None:
        """ORT's calibration as ``quantize_static`` runs it (its calibrator on the pre-processed file, the feeds in
        ``CalibStridedMinMax`` chunks, the ranges saved as its cache), without the rest of that call (a shape-inferred
        copy of the model held beside the calibrator's, then an INT8 build: ~7 GB more at official size)."""
        import tempfile
        import onnxruntime as ort
        from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

        if opset < 10:  # quantize_static calibrates an opset-11 conversion of such a model: its own path
            self._quantize(self.work / "calibrated.onnx", [], reader)
            (self.work / "calibrated.onnx").unlink(missing_ok=True)
            return
        try:
            with tempfile.TemporaryDirectory(prefix="ort.quant.", dir=self.work) as tmp:
                calibrator = create_calibrator(self.pre_path, self.op_types,
                                               augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
                                               calibrate_method=self._calib_method,
                                               use_external_data_format=_is_big(self.pre_path),
                                               extra_options={})  # fmt: skip
                # ORT's options but its CPU arena, which grows in powers of two: bundled pipeline 2.11 -> 1.82 GB
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                opts.enable_cpu_mem_arena = False
                calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, opts,
                                                                providers=calibrator.execution_providers)  # fmt: skip
                stride = reader.stride()
                for start in range(0, len(reader), stride):
                    reader.set_range(start_index=start, end_index=start + stride)
                    calibrator.collect_data(reader)
                ranges = calibrator.compute_data()
                del calibrator
            memory.trim()  # the arena-less session's freed tensors (official pipeline: ~1 GB left resident)
        except Exception as e:  # ORT raises ValueError/RuntimeError/onnx errors
            raise ExportError(f"onnxruntime calibration failed: {e}") from e
        if not isinstance(ranges, TensorsData):
            raise ExportError(f"onnxruntime calibration returned {type(ranges).__name__}, not TensorsData")
        save_tensors_data(ranges, self.calib_cache, smooth_quant=False)

    # ------------------------------------------------------------------------------------------ building
    def _quantize(self, out: Path, exclude: Sequence[str], reader: _Feeds | None) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        try:
            quantize_static(
                str(self.pre_path), str(out), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=self.op_types, per_channel=True, reduce_range=False,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                calibrate_method=self._calib_method, calibration_cache_path=str(self.calib_cache),
                use_external_data_format=_is_big(self.pre_path),
                extra_options={**_EXTRA, **({"CalibStridedMinMax": reader.stride()} if reader else {})},
            )  # fmt: skip
        except Exception as e:  # quantize_static raises ValueError/RuntimeError/onnx errors
            raise ExportError(f"onnxruntime quantize_static failed: {e}") from e
        return out

    def finish(self, model: onnx.ModelProto, float_nodes: Sequence[str]) -> dict[str, Any]:
        """Steps after QDQ, in place: INT8 Add constants, then INT8 weights of the float nodes (pinned stay fp32)."""
        constants = compress_add_constants(model)
        weights = weight_only_int8(model, [n for n in float_nodes if n not in self.pinned])
        return {"int8_add_constants": constants, "weight_only_int8": weights}

    def build(self, float_units: Sequence[str], out: Path, *, extra_nodes: Sequence[str] = (),
              feeds: Sequence[Mapping[str, np.ndarray]] = ()) -> Path:  # fmt: skip
        """Write the INT8 model with ``float_units`` (and pinned / ``extra_nodes``) float to ``out``;
        :attr:`built_measured`: :meth:`measured` on ``feeds``."""
        floats = self.float_nodes(float_units, extra_nodes)
        path = self._quantize(Path(out), floats, None)
        model = onnx.load(str(path))
        self.finished = self.finish(model, floats)
        self.built_measured = self.measured(model, floats, feeds) if feeds else None
        self.built_taps = self._measured[4] if self.built_measured is not None and self._measured else None
        save_model(model, path, threshold=PROTOBUF_LIMIT)
        return path

    def variant(self, float_units: Sequence[str], *, extra_nodes: Sequence[str] = ()) -> onnx.ModelProto:
        """The INT8 model with ``float_units`` float, in memory, for the search.

        The steps of ``quantize_static`` after its calibration (QDQQuantizer on the shape-inferred model with the
        cached ranges, then the topological sort of its save), without the per-call shape inference and file
        round trip: the serialized model is byte-identical to :meth:`build`'s file (checked on tiny), at about
        half the cost per variant.
        """
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.calibrate import load_tensors_data
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        from onnxruntime.quantization.quant_utils import load_model_with_shape_infer, update_opset_version

        if self._base is None:
            self._base = update_opset_version(load_model_with_shape_infer(self.pre_path), QuantType.QInt8,
                                              QuantType.QUInt8)  # fmt: skip
            self._ranges = load_tensors_data(self.calib_cache)
        quantizer = QDQQuantizer(copy.deepcopy(self._base), True, False, QuantType.QInt8, QuantType.QUInt8,
                                 copy.deepcopy(self._ranges), [], self.float_nodes(float_units, extra_nodes),
                                 self.op_types, dict(_EXTRA))  # fmt: skip
        quantizer.quantize_model()
        quantizer.model.topological_sort()  # as ONNXModel.save_model_to_file does
        model = quantizer.model.model
        self.finish(model, self.float_nodes(float_units, extra_nodes))
        return model

    def release(self) -> None:
        """Drop what only the search uses (:meth:`variant`'s shape-inferred model and ranges: the model's size)."""
        self._base = self._ranges = None
        gc.collect()
        memory.trim()

    def session(self, path: Path | bytes) -> Any:
        """A CPU ``InferenceSession`` of a model file or serialized model."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        model = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def run(self, path: Path | bytes, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Outputs ``{name: array}`` of a model on each feed."""
        sess = self.session(path)
        return [dict(zip(self.output_names, sess.run(self.output_names, dict(f)), strict=True)) for f in feeds]

    def run_variant(self, float_units: frozenset[str], feeds: Sequence[Mapping[str, np.ndarray]],
                    extra_nodes: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:  # fmt: skip
        """Outputs on ``feeds`` of the INT8 model with ``float_units`` float (built in the work folder)."""
        if _is_big(self.pre_path):  # > 2 GB: no in-memory session; go through a file
            path = self.build(sorted(float_units), self.work / "variant.onnx", extra_nodes=extra_nodes)
            try:
                return self.run(path, feeds)
            finally:
                for p in (path, path.with_name(path.name + ".data")):
                    p.unlink(missing_ok=True)
        model = self.variant(sorted(float_units), extra_nodes=extra_nodes)
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()  # of the plain model, as build() writes it
        taps = None
        if self.tap is not None and (names := expose_outputs(model, self.tap(model))):  # tapped as extra outputs
            sess = self.session(model.SerializeToString())
            fetch = [*self.output_names, *names]
            runs = [dict(zip(fetch, sess.run(fetch, dict(f)), strict=True)) for f in feeds]
            outs = [{k: r[k] for k in self.output_names} for r in runs]
            taps = [{k: r[k] for k in names} for r in runs]
        else:
            outs = self.run(model.SerializeToString(), feeds)
        self._measured = (self.float_nodes(sorted(float_units), extra_nodes), digest, _feeds_digest(feeds), outs,
                          taps)  # fmt: skip
        return outs

    def measured(self, model: onnx.ModelProto, float_nodes: Sequence[str],
                 feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | None:  # fmt: skip
        """The outputs on ``feeds`` of the last variant :meth:`run_variant` ran, when ``model`` (with these float
        nodes) serializes to that variant's very bytes; else None."""
        m = self._measured
        if m is None or set(m[0]) != set(float_nodes) or m[2] != _feeds_digest(feeds):
            return None
        return m[3] if hashlib.sha256(model.SerializeToString()).hexdigest() == m[1] else None


def _feeds_digest(feeds: Sequence[Mapping[str, np.ndarray]], h: Any = None) -> str:
    """sha256 of the feeds' names, dtypes, shapes and bytes (continuing ``h`` when given)."""
    h = hashlib.sha256() if h is None else h
    for feed in feeds:
        for k in sorted(feed):
            a = np.ascontiguousarray(feed[k])
            h.update(f"{k}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _is_big(path: Path) -> bool:
    return Path(str(path) + ".data").exists() or Path(path).stat().st_size > PROTOBUF_LIMIT


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed or duplicate-named nodes unique names (nodes_to_exclude works by name)."""
    seen: set[str] = set()
    for k, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_tadsr_{k}"
        seen.add(n.name)


def output_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Graph output -> scale of the DequantizeLinear producing it (outputs computed in float are absent)."""
    inits = {t.name: t for t in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for o in model.graph.output:
        node = by_output.get(o.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            if scale.size == 1:
                out[o.name] = float(scale.reshape(()))
    return out


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of initializers by element type name (``FLOAT``, ``INT8``, ...)."""
    acc: Counter[str] = Counter()
    for t in model.graph.initializer:  # from the shape: raw_data is empty for tensors stored in a .data file
        size = int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        acc[onnx.TensorProto.DataType.Name(t.data_type)] += size
    return dict(sorted(acc.items()))


def _set_metadata(model: onnx.ModelProto, fp32: onnx.ModelProto, extra: Mapping[str, Any]) -> None:
    props = {p.key: p.value for p in fp32.metadata_props}
    props["tadsr.precision"] = "int8"
    for k, v in extra.items():
        props[f"tadsr.{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    del model.metadata_props[:]
    for k in sorted(props):
        model.metadata_props.add(key=k, value=props[k])
    model.producer_name = "tadsr-mobile"
    model.doc_string = (fp32.doc_string or "").replace("fp32", "int8 (QDQ)")


def quantize_onnx(
    ptq: OnnxPTQ,
    recipe: BackendRecipe,
    fp32_path: Path,
    out_dir: Path,
    *,
    name: str,
    metadata: Mapping[str, Any] | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] = (),
) -> BackendResult:
    """Write ``out_dir/<name>.onnx``: the calibrated QDQ INT8 model with the recipe's float units.

    Args:
        ptq: the calibrated :class:`OnnxPTQ`.
        recipe: float units / nodes to keep (its ``op_types`` and ``method`` must match ``ptq``'s).
        fp32_path: the fp32 model (metadata is copied from it).
        out_dir: existing folder (the staged artifact).
        name: file stem (the graph name).
        metadata: extra ``tadsr.*`` metadata (calibration hash, recipe summary); must be deterministic.
        feeds: the held-out inputs the search ran its last variant on (:meth:`OnnxPTQ.measured`).

    Returns:
        BackendResult (format ``onnx``, precision ``int8``) with node counts, bytes by dtype and output scales
        (and ``measured``: the search's outputs on ``feeds`` when the file is its last variant).
    """
    if list(recipe.op_types) != ptq.op_types or recipe.method != ptq.method:
        raise ConfigError(f"recipe ({recipe.op_types}, {recipe.method}) does not match the calibrated "
                          f"quantizer ({ptq.op_types}, {ptq.method})")  # fmt: skip
    t0 = time.perf_counter()
    tmp = ptq.build(recipe.float_units, ptq.work / "final.onnx", extra_nodes=recipe.float_nodes, feeds=feeds)
    model = onnx.load(str(tmp))
    _set_metadata(model, onnx.load(str(fp32_path), load_external_data=False), dict(metadata or {}))
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the quantized {name} model does not pass the ONNX checker: {e}") from e
    path = Path(out_dir) / f"{name}.onnx"
    files = save_model(model, path)  # weights beside the graph above 64 MiB, as the fp32 export does
    floats = ptq.float_nodes(recipe.float_units, recipe.float_nodes)
    ops = Counter(n.op_type for n in model.graph.node)
    by_type = weight_bytes(model)
    quantized = [n for n in ptq.candidates if n not in floats]
    w_fp32 = ptq.weight_bytes(quantized)
    done = ptq.finished
    w_int8 = sum(by_type.get(k, 0) for k in ("INT8", "INT32", "UINT8")) - sum(v["int8_bytes"] for v in done.values())
    info = {
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ)",
        "scheme": SCHEME,
        "method": ptq.method,
        "op_types": ptq.op_types,
        "quantized_nodes": len(ptq.candidates) - len(floats),
        "float_nodes": floats,
        "int8_fraction": ptq.int8_fraction(floats),
        "initializer_bytes": by_type,
        "quantized_weights": {
            "fp32_bytes": w_fp32,
            "int8_bytes": w_int8,
            "ratio": round(w_int8 / w_fp32, 4) if w_fp32 else None,
        },  # fmt: skip
        **done,
        "output_scales": output_scales(model),
        "op_types_after": dict(sorted(ops.items())),
        "quantize_s": round(time.perf_counter() - t0, 3),
    }
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    logger.info("onnx int8 %s: %d of %d candidate nodes quantized, %.2f MB, sha256 %s", name,
                info["quantized_nodes"], len(ptq.candidates), path.stat().st_size / 1e6, digest[:12])  # fmt: skip
    return BackendResult(files=files, format="onnx", precision="int8", info=info, measured=ptq.built_measured,
                         measured_taps=ptq.built_taps)  # fmt: skip


def ranges_key(model: Path, feeds: Sequence[Mapping[str, np.ndarray]], method: str, op_types: Sequence[str]) -> str:
    """What ORT's calibration ranges are a function of: the pre-processed model's files, the feeds' bytes, the
    method, the op types and options, and ORT's version (a digest)."""
    import onnxruntime

    h = hashlib.sha256(json.dumps([method, list(op_types), _EXTRA, CALIB_CHUNK, onnxruntime.__version__]).encode())
    for f in sorted(Path(model).parent.glob(f"{Path(model).name}*")):  # the graph and its external data
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return _feeds_digest(feeds, h)


# ---------------------------------------------------------------------------------------------------- driver


def quantize_job(job: QuantizeJob) -> list[Path]:
    """The ONNX slice's INT8 driver (registry ``quantize`` hook): pre-process and calibrate once, take or search
    the recipe, write the QDQ INT8 ``.onnx`` through ``job.write``."""
    given = job.entry("onnx")
    method = given.method if given else job.method
    ptq = OnnxPTQ(job.parent_file, job.work / "onnx", job.calib.feeds(job.name), method=method,
                  op_types=given.op_types if given else DEFAULT_OP_TYPES, threads=job.threads,
                  known_ranges=job.shipped_ranges)  # fmt: skip
    hold = [c.inputs for c in job.hold.cases(job.name)]
    ptq.tap = job.vq_taps()  # the written file's VQ view then comes from the search's run of the same model
    if given:
        units = job.entry_units(given, ptq.units(), ptq.pinned_units())
        extra_nodes = [n for n in given.float_nodes if n not in ptq.float_nodes(units)]
        outs = ptq.run_variant(frozenset(units), hold, extra_nodes)
        psnr = worst_psnr(outs, job.parent_outputs, job.ranges)
        result = SearchResult(units, psnr, True, list(given.search), job.meets(psnr, outs)[1])
        sens, source = given.sensitivity, "file"
    else:
        extra_nodes, source = [], ""
        if (shipped := job.shipped_search("onnx", ptq.units(), ptq.pinned_units())) is not None:
            units = shipped[0].excluded  # measured here; searched when it misses
            outs = ptq.run_variant(frozenset(units), hold)
            psnr = worst_psnr(outs, job.parent_outputs, job.ranges)
            met, loss = job.meets(psnr, outs)
            trace = shipped_trace(shipped[0], psnr, loss)
            if takes_shipped(shipped[0], met, f"{job.name}/onnx"):
                result, ranking, source = SearchResult(units, psnr, met, trace, loss), shipped[1], "shipped"
            else:
                logger.warning("%s: the shipped recipe misses the criteria here (%.2f dB); searching", job.name, psnr)
        if not source:
            result, ranking = job.search(ptq.run_variant, ptq.units(), ptq.pinned_units(),
                                         lambda feeds: ptq.run(job.parent_file, feeds))  # fmt: skip
            source = "auto" if ranking else "all"
        sens = [r.to_dict() for r in ranking]
    floats = ptq.float_nodes(result.excluded, extra_nodes)
    entry = BackendRecipe(op_types=list(ptq.op_types), float_units=result.excluded, float_nodes=floats,
                          pinned=ptq.pinned_units(), method=method, scheme=SCHEME,
                          target_psnr=None if given else job.target, psnr=result.psnr,
                          int8_fraction=ptq.int8_fraction(floats), source=source, sensitivity=sens,
                          search=result.trace).set_hr(None if given else job.hr(), result.hr_loss)  # fmt: skip
    meta = {"calibration": {k: job.calib.info[k] for k in ("content_hash", "num_patches", "seed")},
            "float_units": entry.float_units, "method": method}  # fmt: skip

    def build(folder: Path) -> BackendResult:
        result = quantize_onnx(ptq, entry, job.parent_file, folder, name=job.name, metadata=meta, feeds=hold)
        # the activation ranges the file was built from, with their key (tadsr.quantize.shipped collects them)
        ranges = {"key": ptq.ranges_key, "source": ptq.ranges_source,
                  "ort_cache": json.loads(ptq.calib_cache.read_text())}  # fmt: skip
        (folder / RANGES_NAME).write_text(json.dumps(ranges, sort_keys=True) + "\n")
        result.info["calibration_ranges"] = {"key": ptq.ranges_key, "source": ptq.ranges_source, "file": RANGES_NAME}
        return result

    ptq.release()
    return [job.write("onnx", "int8", entry, build, None)]

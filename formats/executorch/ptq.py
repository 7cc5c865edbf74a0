"""PT2E INT8 (XNNPACKQuantizer) for ExecuTorch, shared with Core ML W8A8: prepare, calibrate, convert, lower.

:class:`PT2EQuant` holds one graph after the backend's rewrites (:func:`tadsr.formats.rewrites.apply_rewrites`,
the same set the fp32 export applies) and ``torch.export``:

* :meth:`PT2EQuant.simulator` prepares it once with every candidate layer annotated, calibrates once, and
  returns a :class:`FakeQuantSim` that replays the calibrated observers as fake quantizers with any set of
  blocks switched to float: the sensitivity sweep and the recipe search cost one forward pass per variant.
* :meth:`PT2EQuant.convert` is the real thing for a recipe: ``XNNPACKQuantizer`` with
  ``set_operator_type(<overload>, config)`` for the quantized op types (conv2d, conv_transpose2d, linear, cat;
  XNNPACK's quantizer has no matmul pattern, so attention stays float) and a filter function leaving the
  float blocks unannotated (its ``cat`` annotator ignores the filter; :func:`_filtered_xnnpack_quantizer`),
  ``prepare_pt2e``, calibration on every patch, ``convert_pt2e``. The patches run once per graph: later recipes
  (and the simulator) fill their observers from the ranges recorded in that pass
  (:class:`~tadsr.formats.executorch.ranges.RangeTable`, ``minmax``).

:func:`quantize_executorch` lowers a converted graph with ``to_edge_transform_and_lower`` and the
``XnnpackPartitioner`` and writes ``<graph>.pte``.

Scheme: weights int8 symmetric per output channel ([-127, 127]), activations int8 asymmetric per tensor.
Calibration methods: ``minmax`` (MinMaxObserver), ``entropy`` (HistogramObserver, the XNNPACK default: the
range that minimises the L2 quantization error of the histogram), ``percentile`` (99.999th percentile of
each tail of the histogram).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tadsr.errors import ConfigError, ExportError
from tadsr.formats.artifact import BackendResult
from tadsr.formats.executorch.passes import has_batch_norm, lean_xnnpack_passes, xnnpack_partitioner
from tadsr.formats.executorch.ranges import RangeTable
from tadsr.formats.int8 import ADD_CONSTANT_MIN_ELEMENTS, symmetric_int8
from tadsr.formats.sensitivity import BackendRecipe, hr_trace, shipped_trace, takes_shipped, unit_of, worst_psnr
from tadsr.formats.spec import QuantizeJob
from tadsr.threads import fixed_threads

if TYPE_CHECKING:
    from tadsr.formats.executorch.fakequant import FakeQuantSim

__all__ = [
    "PT2E_OP_TYPES", "PT2EQuant", "int8_add_constants", "pt2e_recipe", "quantize_executorch",
    "quantize_job",
]  # fmt: skip

logger = logging.getLogger(__name__)

SCHEME = "weights int8 symmetric per-channel, activations int8 asymmetric per-tensor (PT2E, XNNPACKQuantizer)"
PERCENTILE = 99.999
RANGE_METHODS = ("minmax",)  # calibration methods whose observers a RangeTable rebuilds
# recipe op type -> aten overloads (XNNPACKQuantizer matches the overload, not the packet)
PT2E_OP_TYPES: dict[str, tuple[Any, ...]] = {
    "conv2d": (torch.ops.aten.conv2d.default,),
    "conv_transpose2d": (torch.ops.aten.conv_transpose2d.input,),
    "linear": (torch.ops.aten.linear.default,),
    "cat": (torch.ops.aten.cat.default,),
}
# cat is annotated so that its inputs share one scale: XNNPACK lowers dequantize -> cat -> quantize (the UNet's
# skip concatenations between quantized convs) to a QS8 concatenation, whose inputs must have equal scales
# ("Failed to create cat2 node ... xnn_status_invalid_parameter" at load time otherwise)
DEFAULT_PT2E_OP_TYPES = ("conv2d", "conv_transpose2d", "linear", "cat")
_ANNOTATABLE = {o for ops in PT2E_OP_TYPES.values() for o in ops}


def _percentile_observer() -> type:
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        """HistogramObserver whose range is the [100 - p, p] percentile interval of the histogram."""

        @torch.jit.export
        def calculate_qparams(self):  # type: ignore[no-untyped-def]
            hist = self.histogram.double()
            if hist.sum() == 0 or self.min_val.numel() == 0:
                return super().calculate_qparams()
            cdf = torch.cumsum(hist, 0) / hist.sum()
            edges = torch.linspace(float(self.min_val), float(self.max_val), hist.numel() + 1, dtype=torch.float64)
            q = PERCENTILE / 100.0
            lo = edges[int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=torch.float64)))]
            hi = edges[min(int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))) + 1, hist.numel())]
            return self._calculate_qparams(lo.float().reshape(1), hi.float().reshape(1))

    return PercentileObserver


def quant_config(method: str) -> Any:
    """XNNPACK symmetric per-channel config with the activation observer of ``method``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

    observers = {"minmax": MinMaxObserver, "entropy": HistogramObserver, "percentile": _percentile_observer()}
    if method not in observers:
        raise ConfigError(f"unknown calibration method {method!r}; choose from {', '.join(observers)}")
    base = get_symmetric_quantization_config(is_per_channel=True)
    act = replace(base.input_activation, observer_or_fake_quant_ctr=observers[method].with_args(eps=2**-12))
    return replace(base, input_activation=act, output_activation=act)


def dynamic_quant_config() -> Any:
    """XNNPACK's dynamic INT8 (``qd8``): per-channel INT8 weights, each activation's range taken from the tensor
    itself at run time (no calibration); XNNPACKQuantizer annotates only convolutions and linears with it."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    return get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)


def _module_path(node: torch.fx.Node) -> str:
    """Innermost module path of a node (its own name when it belongs to no submodule)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = str(list(stack.values())[-1][0])
    path = path[len("L['self'].") :] if path.startswith("L['self'].") else path
    return path or node.name


def _in_units(node: torch.fx.Node, units: Collection[str]) -> bool:
    """Whether ``node``'s layer belongs to one of ``units``: its block (:func:`unit_of`) is one of them.

    Exact, not by prefix: a block's name can be a prefix of other blocks' names. The layers the fused pipeline's
    denoiser graph calls itself form the block ``denoiser``; by prefix, keeping it float kept the whole UNet float
    (45 % of the pipeline's weights, session 12) while the recipe counted those few layers alone.
    """
    return unit_of(_module_path(node)) in units


def _is_candidate(node: torch.fx.Node, targets: set[Any]) -> bool:
    return node.op == "call_function" and node.target in targets


def _pinned(gm: torch.fx.GraphModule, targets: set[Any], output_names: Sequence[str]) -> dict[str, str]:
    """Blocks whose layer output reaches the VQ argmin or an ``x0`` graph output without another candidate."""
    starts: list[tuple[torch.fx.Node, str]] = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.argmin.default,):
            starts.append((n, "feeds the VQ codebook search (argmin)"))
        if n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            for name, o in zip(output_names, outs, strict=False):
                if name == "x0" and isinstance(o, torch.fx.Node):
                    starts.append((o, "produces the latent x0 that the decoder's VQ codebook search reads"))
    pinned: dict[str, str] = {}
    for start, why in starts:
        stack, seen = [start], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if _is_candidate(n, targets) and (path := _module_path(n)):
                pinned[unit_of(path)] = why
                continue
            stack += [a for a in n.all_input_nodes if a.op not in ("placeholder", "get_attr")]
    return pinned


class PT2EQuant:
    """One graph, rewritten and exported once, ready for PT2E quantization.

    Args:
        graph: export graph (eval, no grad) from :func:`tadsr.formats.graphs.make_graph`.
        example: example inputs of the spec's shapes.
        output_names: the graph's output names (to pin the layer producing ``x0``).
        rewrites: rewrite set of :data:`tadsr.formats.rewrites.BACKEND_REWRITES` (``"xnnpack"``, ``"coreml"``).
        op_types: quantized op types, keys of :data:`PT2E_OP_TYPES`.
        method: calibration method.
    """

    def __init__(
        self,
        graph: nn.Module,
        example: Sequence[torch.Tensor],
        *,
        output_names: Sequence[str],
        rewrites: str = "xnnpack",
        op_types: Sequence[str] = DEFAULT_PT2E_OP_TYPES,
        method: str = "minmax",
    ) -> None:
        """See the class docstring."""
        from tadsr.formats.rewrites import apply_rewrites

        unknown = [o for o in op_types if o not in PT2E_OP_TYPES]
        if unknown:
            raise ConfigError(f"unknown PT2E op types {unknown}; choose from {', '.join(PT2E_OP_TYPES)}")
        self.op_types = list(op_types)
        self.output_names = list(output_names)
        self.targets = {o for t in op_types for o in PT2E_OP_TYPES[t]}
        self.method = method
        self.config = quant_config(method)
        self.example = tuple(example)
        t0 = time.perf_counter()
        rewritten, report = apply_rewrites(graph, self.example, rewrites)
        self.rewrites = {"set": rewrites, "applied": report.to_dict()}
        try:
            with torch.no_grad():
                self.exported = torch.export.export(rewritten, self.example, strict=False).module()
        except Exception as e:  # torch.export raises many types; name the step
            raise ExportError(f"torch.export of the rewritten graph failed: {e}") from e
        self.layers: dict[str, tuple[str, int]] = {}  # node name -> (module path, weight params)
        for n in self.exported.graph.nodes:
            if _is_candidate(n, self.targets) and (path := _module_path(n)):
                w = n.args[1] if len(n.args) > 1 else None
                params = (
                    int(np.prod(_attr(self.exported, w).shape))
                    if isinstance(w, torch.fx.Node) and w.op == "get_attr"
                    else 0
                )
                self.layers[n.name] = (path, params)
        self.pinned = _pinned(self.exported, self.targets, output_names)
        self.constants: dict[str, Any] = {}  # int8_add_constants statistics of the last convert()
        self._table: RangeTable | None = None  # the observed ranges over the last calibration feeds
        # (load, save) of a range table recorded by another process on this graph and the calibration feeds
        self.table_store: tuple[Callable[[], dict[str, Any] | None], Callable[[dict[str, Any]], None]] | None = None
        logger.info("pt2e: %d candidate layers in %d blocks (%d pinned float), rewrites %s, %.1fs", len(self.layers),
                    len(self.units()), len(self.pinned), report.to_dict(), time.perf_counter() - t0)  # fmt: skip

    def units(self) -> dict[str, tuple[int, int]]:
        """Unit -> (layers, weight params), pinned units excluded."""
        out: dict[str, list[int]] = {}
        for path, params in self.layers.values():
            u = unit_of(path)
            if u not in self.pinned:
                acc = out.setdefault(u, [0, 0])
                acc[0] += 1
                acc[1] += params
        return {u: (a[0], a[1]) for u, a in out.items()}

    def int8_fraction(self, float_units: Sequence[str], dynamic_units: Sequence[str] = ()) -> float:
        """Share of the candidate layers' weight parameters stored INT8 with ``float_units`` float (those of them in
        ``dynamic_units`` store INT8 weights)."""
        floats = (set(float_units) - set(dynamic_units)) | set(self.pinned)
        total = sum(p for _, p in self.layers.values())
        kept = sum(p for path, p in self.layers.values() if unit_of(path) in floats)
        return round(1.0 - kept / total, 4) if total else 0.0

    def quantizer(self, float_units: Sequence[str], dynamic_units: Sequence[str] = ()) -> Any:
        """The XNNPACKQuantizer for the op types, leaving ``float_units`` and the pinned blocks unannotated, and
        the convolutions and linears of ``dynamic_units`` (float units) dynamic INT8 (:func:`dynamic_quant_config`)."""
        q = _filtered_xnnpack_quantizer()
        for t in self.op_types:
            for overload in PT2E_OP_TYPES[t]:
                q.set_operator_type(overload, self.config)
        floats = frozenset(float_units) | frozenset(self.pinned)
        # set_module_name(name, None) is refused by this XNNPACKQuantizer ("not supported yet"); its public
        # filter function has the same effect: nodes inside a float block are not annotated
        q.set_filter_function(lambda n: not _in_units(n, floats))
        dynamic = frozenset(dynamic_units) - frozenset(self.pinned)
        if not dynamic:
            return q
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
        from torchao.quantization.pt2e.quantizer import ComposableQuantizer

        dq = XNNPACKQuantizer()
        dq.set_global(dynamic_quant_config())
        # a layer's weight and bias are get_attr nodes of no module: the layer's own node decides
        dq.set_filter_function(lambda n: n.op == "get_attr" or _in_units(n, dynamic))
        return ComposableQuantizer([q, dq])

    def _prepare(self, float_units: Sequence[str], dynamic_units: Sequence[str] = ()) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        return prepare_pt2e(copy.deepcopy(self.exported), self.quantizer(float_units, dynamic_units))

    @staticmethod
    def _calibrate(prepared: torch.fx.GraphModule, feeds: Sequence[Mapping[str, np.ndarray]], progress: bool) -> None:
        from tqdm.auto import tqdm

        with torch.no_grad(), fixed_threads():  # observer ranges set the scales: the same on every run
            for f in tqdm(feeds, desc="calibrate", unit="patch", disable=not progress):
                prepared(*(torch.from_numpy(np.ascontiguousarray(v)) for v in f.values()))

    def calibrated(self, float_units: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], *,
                   progress: bool = False,
                   dynamic_units: Sequence[str] = ()) -> tuple[torch.fx.GraphModule, str]:  # fmt: skip
        """Prepared with ``float_units`` (and the pinned blocks) float, ``dynamic_units`` dynamic INT8, and
        calibrated on ``feeds``, and how.

        The first call on a feeds list (the same object) records the ranges every observer of the all-INT8
        annotation watches, in one pass (:class:`~tadsr.formats.executorch.ranges.RangeTable`); this and later
        calls on those feeds fill their observers from it instead of running the patches again. Observers the
        table cannot rebuild are calibrated by running the patches; so are the histogram methods (no table).
        """
        prepared = self._prepare(float_units, dynamic_units)
        if self.method in RANGE_METHODS:
            if self._table is None or self._table.feeds is not feeds:
                self._table = self._range_table(feeds, progress)
            if self._table.fill(prepared):
                return prepared, "filled from the range table"
        self._calibrate(prepared, feeds, progress)
        return prepared, "calibrated"

    def _range_table(self, feeds: Sequence[Mapping[str, np.ndarray]], progress: bool) -> RangeTable:
        """The range table of ``feeds``: restored from :attr:`table_store` when another process recorded it (and
        it names only nodes of this graph), else recorded here in one pass and stored there."""
        load, save = self.table_store or (None, None)
        saved = load() if load is not None else None
        if saved is not None:
            table = RangeTable.restored(feeds, saved)
            if table.names() and table.names() <= {n.name for n in self.exported.graph.nodes}:
                logger.info("pt2e: the calibration ranges of %d tensors (and %d observers) recorded by another "
                            "format's call on this graph and these patches; not calibrated again", len(table.ranges),
                            len(saved.get("observers", {})))  # fmt: skip
                return table
        table = RangeTable(self._prepare([]), feeds, lambda gm, fs: self._calibrate(gm, fs, progress))
        if save is not None:
            save(table.to_saved())
        return table

    def convert(self, float_units: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], *,
                progress: bool = False, dynamic_units: Sequence[str] = ()) -> torch.fx.GraphModule:  # fmt: skip
        """Prepare with ``float_units`` (and pinned blocks) float and ``dynamic_units`` dynamic INT8, calibrate on
        ``feeds`` (:meth:`calibrated`), convert.

        The converted graph's large float ``add`` constants are then stored INT8 (:func:`int8_add_constants`;
        statistics in ``self.constants``), so the graph every caller measures is the one that ships.
        """
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        t0 = time.perf_counter()
        prepared, how = self.calibrated(float_units, feeds, progress=progress, dynamic_units=dynamic_units)
        converted = convert_pt2e(prepared)
        self.constants = int8_add_constants(converted)
        logger.info("pt2e convert (%s, %d float blocks, %d dynamic, %s on %d patches): %.1fs; %d add constants INT8 "
                    "(%.2f -> %.2f MB)", self.method, len(float_units), len(dynamic_units), how, len(feeds),
                    time.perf_counter() - t0,
                    self.constants["tensors"], self.constants["fp32_bytes"] / 1e6,
                    self.constants["int8_bytes"] / 1e6)  # fmt: skip
        return converted

    def simulator(self, feeds: Sequence[Mapping[str, np.ndarray]], *, progress: bool = False) -> FakeQuantSim:
        """Prepare with every candidate annotated, calibrate (:meth:`calibrated`: after :meth:`convert` on the same
        feeds, without running them again), and wrap as a :class:`FakeQuantSim`."""
        t0 = time.perf_counter()
        prepared, how = self.calibrated([], feeds, progress=progress)
        from tadsr.formats.executorch.fakequant import FakeQuantSim

        table = self._table if self._table is not None and self._table.feeds is feeds else None
        sim = FakeQuantSim(prepared, self.targets, self.output_names, table.ranges if table else None)
        # what :meth:`convert` ships: without it, the tiny denoiser's simulated x0 was 0.44 (of 3.9) from the
        # converted graph's with every block INT8, and exactly equal with it
        int8_add_constants(sim.gm)
        logger.info("pt2e simulator: %d observers %s on %d patches in %.1fs", len(sim.owners), how, len(feeds),
                    time.perf_counter() - t0)  # fmt: skip
        return sim


def cat_stays_int8(in_float_block: bool, int8_inputs: Iterable[bool]) -> bool:
    """Whether a ``cat`` is INT8 (inputs and output on one shared scale): when its block is INT8, or when one of
    its inputs is, whatever its block: XNNPACK has no float concatenation of INT8 inputs (a mixed dequantize ->
    cat fails to load, "cat2 ... xnn_status_invalid_parameter": the main job's fused pipeline, session 19).

    The one rule of the converted graph (:func:`_filtered_xnnpack_quantizer`) and of the search's simulator
    (:meth:`~tadsr.formats.executorch.fakequant.FakeQuantSim.int8_cats`), which must agree.
    """
    return not in_float_block or any(int8_inputs)


def _filtered_xnnpack_quantizer() -> Any:
    """An ``XNNPACKQuantizer`` whose ``cat`` annotation obeys the filter function, as its other annotators do.

    executorch 1.5's ``_annotate_cat`` ignores the filter: every ``cat`` of the graph was INT8 (inputs and
    output on one shared scale) whatever the recipe kept float. The fused pipeline's UNet concatenations belong
    to the block ``denoiser``, so a recipe that kept the UNet float still rounded its input and every skip
    connection to INT8, which the search's simulator (where a float block is float) did not: session 17 measured
    the converted pipeline 0.2-0.3 dB further from HR than the simulator on every rounding draw, the gap behind
    the repair rounds and the recipes that missed the HR budget. Here a ``cat`` the filter rejects loses its
    annotation before the annotations propagate, unless one of its inputs is INT8: XNNPACK cannot concatenate an
    INT8 tensor in float, so that cat stays INT8 with one shared scale (as before session 17).

    On a graph without ``batch_norm`` it also skips the conv-bn patterns: they cannot match, and their annotators
    build their pattern graphs with ``torch.export`` on every call, most of the cost of a ``prepare_pt2e``.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import (
        _is_share_obs_or_fq_op,
        propagate_annotation,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    class FilteredXNNPACKQuantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # the conv-bn annotators export their pattern graphs with dynamo on every call (12 strict exports,
            # ~7 s a prepare on the CI CPU, session 18) and can only match a batch_norm: skipped without one
            # (set for every graph, so that one instance annotating two graphs does not keep the first's choice)
            has_bn = has_batch_norm(model.graph.nodes)
            self.SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if has_bn or "_bn" not in p.name]
            model = self._annotate_for_quantization_config(model)
            if self.filter_fn is not None:
                quantized: dict[Any, bool] = {}

                def quantized_output(n: Any) -> bool:
                    """Whether ``n``'s output will be INT8 (its own annotation, or propagated from its input)."""
                    if not isinstance(n, torch.fx.Node):
                        return False
                    if n not in quantized:
                        ann = n.meta.get(Q_ANNOTATION_KEY)
                        quantized[n] = bool(ann is not None and ann.output_qspec is not None) or (
                            n.op == "call_function" and _is_share_obs_or_fq_op(n.target) and bool(n.args)
                            and quantized_output(n.args[0]))  # fmt: skip
                    return quantized[n]

                for n in model.graph.nodes:  # graph order: a cat's inputs are decided before the cat
                    if n.op == "call_function" and n.target == torch.ops.aten.cat.default and not cat_stays_int8(
                            not self.filter_fn(n), (quantized_output(a) for a in n.all_input_nodes)):  # fmt: skip
                        n.meta.pop(Q_ANNOTATION_KEY, None)
                        quantized[n] = False
            propagate_annotation(model)
            return model

    return FilteredXNNPACKQuantizer()


def _attr(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


ADD_CONSTANT_MIN_PER_SCALE = 256


def int8_add_constants(
    gm: torch.fx.GraphModule,
    *,
    min_elements: int = ADD_CONSTANT_MIN_ELEMENTS,
    min_per_scale: int = ADD_CONSTANT_MIN_PER_SCALE,
) -> dict[str, Any]:
    """Store large float constants that only ``add`` reads as INT8 + ``dequantize_per_channel``, in place.

    In these graphs they are the Swin attention constants, the relative-position bias ``(1, heads, N, N)`` and
    the compact shift mask ``(rows, 1, 1, N*N)`` (values 0 and -100): not weights of any quantized op, so PT2E
    leaves them fp32, and in the bundled model they weigh a fifth as much as all INT8 weights. Symmetric INT8
    ([-127, 127], zero point 0), one scale per index of the first non-unit axis (per head for a bias, per window
    row for a mask; 0 and -100 are exact up to the fp32 rounding of the scale). The dequantize node has the form
    ``convert_pt2e`` gives weights, so ExecuTorch's constant propagation keeps the INT8 tensor (it does not fold
    dequantize) and coremltools turns it into ``constexpr_affine_dequantize``. The ``add`` stays float.
    Constants with fewer than ``min_per_scale`` values per scale (e.g. the codebook norms ``(1, K)`` of the VQ
    lookup) are left alone: INT8 would not make them smaller.

    Returns:
        ``{"tensors", "fp32_bytes", "int8_bytes", "max_abs_error"}`` (bytes of scales and zero points included).
    """
    adds = {torch.ops.aten.add.Tensor}
    stats: dict[str, Any] = {"tensors": 0, "fp32_bytes": 0, "int8_bytes": 0, "max_abs_error": 0.0}
    for n in list(gm.graph.nodes):
        if n.op != "get_attr" or not n.users:
            continue
        t = _attr(gm, n)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() < min_elements:
            continue
        if any(u.op != "call_function" or u.target not in adds for u in n.users):
            continue
        axis = next((i for i, s in enumerate(t.shape) if s > 1), None)
        if axis is None or t.numel() // t.shape[axis] < min_per_scale:
            continue
        _store_int8(gm, n, t, axis, "int8c_", stats)
    if stats["tensors"]:
        gm.graph.lint()
        gm.recompile()
    return stats


def int8_float_weights(gm: torch.fx.GraphModule, units: Iterable[str], targets: set[Any]) -> dict[str, Any]:
    """Store the fp32 weights of the layers of ``units`` (blocks the recipe keeps float) as INT8 +
    ``dequantize_per_channel`` (per output channel of a conv / linear weight, axis 1 of a transposed conv's),
    in place, as ONNX stores its float blocks' weights: activations stay float, the weights shrink 4x.

    For Core ML, whose converter turns the pair into ``constexpr_affine_dequantize`` (weight-only INT8 inside the
    W8A8 program). Not for ExecuTorch: XNNPACK delegates only convolutions with constant weights.

    Returns:
        ``{"tensors", "fp32_bytes", "int8_bytes", "max_abs_error"}`` as :func:`int8_add_constants`.
    """
    units = set(units)
    stats: dict[str, Any] = {"tensors": 0, "fp32_bytes": 0, "int8_bytes": 0, "max_abs_error": 0.0}
    for n in list(gm.graph.nodes):
        if not _is_candidate(n, targets) or len(n.args) < 2 or not _in_units(n, units):
            continue
        w = n.args[1]
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr" or len(w.users) != 1:
            continue  # quantized layers read a dequantize node; shared weights are left alone
        t = _attr(gm, w)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.ndim < 2:
            continue
        _store_int8(gm, w, t, 1 if n.target == torch.ops.aten.conv_transpose2d.input else 0, "int8w_", stats)
    if stats["tensors"]:
        gm.graph.lint()
        gm.recompile()
    return stats


def _store_int8(gm: torch.fx.GraphModule, n: torch.fx.Node, t: torch.Tensor, axis: int, tag: str,
                stats: dict[str, Any]) -> None:  # fmt: skip
    """Replace the constant ``n`` (value ``t``) by INT8 buffers + ``dequantize_per_channel`` along ``axis``; the
    fp32 original is dropped. Adds to ``stats``."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines the quantized_decomposed ops)

    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    qn, sn, err = symmetric_int8(t.detach().numpy(), axis)
    q, scale = torch.from_numpy(qn), torch.from_numpy(sn)
    base = tag + str(n.target).replace(".", "_")
    gm.register_buffer(f"{base}_q", q)
    gm.register_buffer(f"{base}_scale", scale)
    gm.register_buffer(f"{base}_zp", torch.zeros(scale.numel(), dtype=torch.int64))
    with gm.graph.inserting_before(n):
        args = [gm.graph.get_attr(f"{base}_{k}") for k in ("q", "scale", "zp")]
        d = gm.graph.call_function(dq, (*args, axis, -127, 127, torch.int8))
    d.meta.update({k: v for k, v in n.meta.items() if k in ("stack_trace", "nn_module_stack")})
    n.replace_all_uses_with(d)
    gm.graph.erase_node(n)
    prefix, _, leaf = str(n.target).rpartition(".")
    owner = gm.get_submodule(prefix)  # drop the fp32 original, or export would still carry it
    if leaf in owner._buffers:
        del owner._buffers[leaf]
    elif leaf in owner._parameters:
        del owner._parameters[leaf]
    elif hasattr(owner, leaf):
        delattr(owner, leaf)
    stats["tensors"] += 1
    stats["fp32_bytes"] += t.numel() * 4
    stats["int8_bytes"] += q.numel() + scale.numel() * (4 + 8)
    stats["max_abs_error"] = max(stats["max_abs_error"], err)


def output_scales(converted: torch.fx.GraphModule, output_names: Sequence[str]) -> dict[str, float]:
    """Output name -> scale of the ``dequantize_per_tensor`` that produces it, where one does."""
    out_node = next(n for n in converted.graph.nodes if n.op == "output")
    outs = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    scales = {}
    for name, n in zip(output_names, outs, strict=False):
        if isinstance(n, torch.fx.Node) and n.op == "call_function" and "dequantize_per_tensor" in str(n.target):
            s = n.args[1]
            scales[name] = float(_attr(converted, s)) if isinstance(s, torch.fx.Node) else float(s)
    return scales


def quantize_executorch(
    converted: torch.fx.GraphModule,
    example: Sequence[torch.Tensor],
    out_dir: Path,
    *,
    name: str,
    output_names: Sequence[str],
    info: Mapping[str, Any] | None = None,
) -> BackendResult:
    """Lower a PT2E-converted graph to XNNPACK and write ``out_dir/<name>.pte``.

    Args:
        converted: output of :meth:`PT2EQuant.convert`.
        example: example inputs (the spec's shapes).
        out_dir: existing folder (the staged artifact).
        name: file stem (the graph name).
        output_names: graph output names (for the output scales).
        info: extra facts for ``BackendResult.info`` (recipe summary, rewrites).

    Raises:
        ExportError: export, lowering or serialization failed.
    """
    from executorch.exir import to_edge_transform_and_lower

    # out variants of quantized_decomposed ops that run outside XNNPACK (dequantize of INT8 Add constants)
    import executorch.kernels.quantized  # noqa: F401

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(converted, tuple(example), strict=False)
        with lean_xnnpack_passes():
            edge = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()])
        outside = Counter(str(n.target) for n in edge.exported_program().graph.nodes
                          if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
                          and "getitem" not in str(n.target))  # fmt: skip
        delegates = sum(1 for n in edge.exported_program().graph.nodes if "executorch_call_delegate" in str(n.target))
        et = edge.to_executorch()
    except Exception as e:  # exir raises many types; name the step and keep the cause
        raise ExportError(f"ExecuTorch lowering of the INT8 {name} graph failed: {e}") from e
    path = Path(out_dir) / f"{name}.pte"
    path.write_bytes(et.buffer)
    result_info = {
        "quantizer": "torchao PT2E + executorch XNNPACKQuantizer",
        "scheme": SCHEME,
        "partitioner": "XnnpackPartitioner",
        "delegates": delegates,
        "ops_outside_delegates": dict(sorted(outside.items())),
        "output_scales": output_scales(converted, output_names),
        "lower_s": round(time.perf_counter() - t0, 3),
        **dict(info or {}),
    }
    warnings = []
    if outside:
        warnings.append(f"{name}: {sum(outside.values())} ops run outside XNNPACK (portable kernels): "
                        f"{dict(outside.most_common(5))}")  # fmt: skip
    logger.info("executorch int8 %s: %d delegates, %d ops outside, %.2f MB, %.1fs", name, delegates,
                sum(outside.values()), path.stat().st_size / 1e6, time.perf_counter() - t0)  # fmt: skip
    return BackendResult(files=[path.name], format="executorch", precision="int8", info=result_info, warnings=warnings)


# ---------------------------------------------------------------------------------------------------- driver

FeedsRun = Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]]


def _eager(gm: nn.Module, out_names: Sequence[str]) -> FeedsRun:
    """Run a (converted) torch graph on a list of feeds, with the reproducible thread count.

    These outputs judge a recipe (PSNR vs fp32 and the HR budget, where a VQ codebook near-tie flips with the
    last bit): the judgement must not depend on the caller's threads. With 2 threads instead of the main job's
    lanes' 1, the shipped ExecuTorch pipeline recipe missed the criteria in ``tadsr quantize`` (session 22) and
    a full search ran.
    """

    def run(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outs = []
        with torch.no_grad(), fixed_threads():
            for f in feeds:
                y = gm(*(torch.from_numpy(np.ascontiguousarray(v)) for v in f.values()))
                ys = y if isinstance(y, (tuple, list)) else (y,)
                outs.append({k: t.numpy() for k, t in zip(out_names, ys, strict=True)})
        return outs

    return run


def _remembering(run: FeedsRun, feeds: Sequence[Mapping[str, np.ndarray]],
                 outs: list[dict[str, np.ndarray]]) -> FeedsRun:  # fmt: skip
    """``run``, answering from ``outs`` when asked for feeds equal in content to ``feeds`` (whose outputs they are).

    ``pt2e_recipe`` has just run the converted graph on the held-out patches to judge it; the write's fake-quant
    hop asks for the same patches again (as new arrays: compared by content), a second pass through the graph.
    """

    def answer(asked: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        same = len(asked) == len(feeds) and all(
            a.keys() == f.keys() and all(np.array_equal(a[k], f[k]) for k in f) for a, f in zip(asked, feeds)
        )
        return [dict(o) for o in outs] if same else run(asked)

    return answer


REPAIR_STEPS = 3  # most conversions after the searched one when it misses the criteria (1 + 2 + 4 blocks more)
DYNAMIC_STEPS = 3  # most conversions with float blocks dynamic INT8 (all of them, the less sensitive 1/2, 1/4)


def pt2e_recipe(job: QuantizeJob, backend_key: str, rewrites: str, *, float_weights_int8: bool = False,
                dynamic: bool = False) -> tuple[Any, BackendRecipe, tuple[Any, Any, Any]]:  # fmt: skip
    """Search (or take) the PT2E recipe of ``job`` and convert the graph with it (ExecuTorch and Core ML INT8).

    ``float_weights_int8``: the weights of the blocks the recipe keeps float (pinned ones aside) are stored INT8
    (:func:`int8_float_weights`, Core ML) before the converted graph is measured.
    ``dynamic``: the float blocks' convolutions and linears may run dynamic INT8 (XNNPACK): once the float set
    meets the criteria, all of them are made dynamic in one more conversion, kept when it still meets them; else
    the less sensitive half, then quarter (:data:`DYNAMIC_STEPS`).

    Returns:
        ``(converted graph, recipe entry, (fake-quant run, applied rewrites, example inputs))``.
    """
    from tadsr.formats.rewrites import BACKEND_REWRITES

    given = job.entry(backend_key)
    method = given.method if given else job.method
    example = job.spec.example_inputs()
    out_names = [o.name for o in job.spec.outputs]
    pq = PT2EQuant(job.graph, example, output_names=out_names, rewrites=rewrites,
                   op_types=given.op_types if given else DEFAULT_PT2E_OP_TYPES, method=method)  # fmt: skip
    calib = job.calib.feeds(job.name)
    hold = [c.inputs for c in job.hold.cases(job.name)]
    sens: list[dict[str, Any]] = []
    share = ["pt2e", *BACKEND_REWRITES.get(rewrites, (rewrites,)), *pq.op_types]  # same graph: ExecuTorch, Core ML
    pq.table_store = (lambda: job.shared_ranges(share, method), lambda r: job.save_ranges(share, method, r))
    weights: dict[str, Any] = {}

    def convert(float_units: list[str],
                dyn: Sequence[str] = ()) -> tuple[torch.fx.GraphModule, list[dict[str, np.ndarray]]]:  # fmt: skip
        nonlocal weights
        gm = pq.convert(float_units, calib, progress=job.progress, dynamic_units=dyn)
        if float_weights_int8:
            weights = int8_float_weights(gm, [u for u in float_units if u not in pq.pinned], pq.targets)
            logger.info("%s: the weights of %d float-block layers stored INT8 (%.2f -> %.2f MB, max error %.2g)",
                        job.name, weights["tensors"], weights["fp32_bytes"] / 1e6, weights["int8_bytes"] / 1e6,
                        weights["max_abs_error"])  # fmt: skip
        return gm, _eager(gm, out_names)(hold)

    def judge(outs: list[dict[str, np.ndarray]]) -> tuple[float, bool, Any]:
        psnr = worst_psnr(outs, job.parent_outputs, job.ranges)
        return (psnr, *job.meets(psnr, outs))

    source, dyn = "", list(given.dynamic_units) if given and dynamic else []
    dyn_tried = False  # a shipped recipe whose search already tried dynamic INT8 in its float blocks
    if not given and (shipped := job.shipped_search(backend_key, pq.units(), pq.pinned)) is not None:
        units, dyn = shipped[0].excluded, list(shipped[0].dynamic) if dynamic else []
        converted, outs = convert(list(units), dyn)
        psnr, met, loss = judge(outs)
        if takes_shipped(shipped[0], met, f"{job.name}/{backend_key}"):  # the converted graph is the judge
            trace = shipped_trace(shipped[0], psnr, loss, graph="converted")
            source, sens = "shipped", [r.to_dict() for r in shipped[1]]
            dyn_tried = any("dynamic" in t for t in shipped[0].trace)
        else:
            logger.warning("%s/%s: the shipped recipe misses the criteria here (%.2f dB); searching", job.name,
                           backend_key, psnr)  # fmt: skip
            dyn = []
    if given:
        units, source, trace = job.entry_units(given, pq.units(), pq.pinned), "file", list(given.search)
        sens = list(given.sensitivity)
    elif source == "shipped":
        pass  # converted and measured above
    elif (shared := job.shared_search(pq.units(), pq.pinned, share)) is not None:
        # another format of this run searched this very PT2E graph: convert its recipe, measure it here
        units, source, trace = shared[0].excluded, "shared", list(shared[0].trace)
        sens = [r.to_dict() for r in shared[1]]
    else:
        converted = pq.convert(sorted(pq.pinned), calib, progress=job.progress)
        outs = _eager(converted, out_names)(hold)
        first = worst_psnr(outs, job.parent_outputs, job.ranges)
        ok, loss = job.meets(first, outs)
        trace = [{"float_units": len(pq.pinned), "added": None, "psnr": round(first, 3), **hr_trace(loss)}]
        units, source = sorted(pq.pinned), "all"
        if not ok and pq.units():
            sim = pq.simulator(calib, progress=job.progress)
            result, ranking = job.search(lambda fu, feeds: sim.run(fu, feeds), pq.units(), pq.pinned,
                                         _eager(pq.exported, out_names), share)  # fmt: skip
            units, source, trace = result.excluded, "auto", trace + result.trace
            sens = [r.to_dict() for r in ranking]
    if source not in ("all", "shipped"):  # a new graph to measure (the all-INT8 / shipped one was measured above)
        converted, outs = convert(list(units), dyn)
    psnr, met, loss = judge(outs)
    # The search judged fake-quantized graphs; the converted one can land on the other side of the criteria (a
    # VQ pipeline's loss moves by ~0.1 dB with any small numerical change). It is the judge: keep the next most
    # sensitive blocks float (1, then 2, then 4) until it meets them, at most REPAIR_STEPS more conversions.
    order = [m for r in sens for m in r.get("members", [r["unit"]])]
    for step in range(REPAIR_STEPS if source in ("auto", "shared") else 0):
        added: list[str] = []
        for u in order:  # the next blocks not float already
            if len(added) < 2**step and u not in units and u not in added:
                added.append(u)
        if met or not added:
            break
        logger.info("%s/%s: the converted graph misses the criteria; %s float too", job.name, backend_key, added)
        units = list(units) + added
        converted, outs = convert(units)
        psnr, met, loss = judge(outs)
        trace.append({"float_units": len(units), "added": added, "psnr": round(psnr, 3), **hr_trace(loss),
                      "graph": "converted"})  # fmt: skip
    layers = pq.units()
    cands = ([u for u in units if layers.get(u, (0, 0))[1]]
             if dynamic and met and not given and not dyn and not dyn_tried else [])
    # float blocks need float activations, not float weights: their layers with dynamic INT8 activations, all of
    # them, else the less sensitive half, else quarter (a recipe lists its float blocks most sensitive first); not
    # again where a shipped recipe's search tried that and kept none (its trace says so: the same misses)
    for k in range(DYNAMIC_STEPS if cands else 0):
        tried = cands[len(cands) * (2**k - 1) // 2**k :]
        trial, t_outs = convert(list(units), tried)
        t_psnr, t_met, t_loss = judge(t_outs)
        trace.append({"float_units": len(units), "dynamic": tried, "psnr": round(t_psnr, 3), **hr_trace(t_loss),
                      "graph": "converted"})  # fmt: skip
        if t_met:
            converted, outs, psnr, loss, dyn = trial, t_outs, t_psnr, t_loss, tried
            break
        logger.info("%s/%s: dynamic INT8 in %d float blocks misses the criteria (%.2f dB)", job.name, backend_key,
                    len(tried), t_psnr)  # fmt: skip
    entry = BackendRecipe(op_types=list(pq.op_types), float_units=list(units), pinned=dict(pq.pinned), method=method,
                          scheme=SCHEME, target_psnr=None if given else job.target, psnr=psnr,
                          int8_fraction=pq.int8_fraction(units, dyn), source=source, sensitivity=sens,
                          search=trace, dynamic_units=list(dyn)).set_hr(None if given else job.hr(), loss)  # fmt: skip
    if not given and not met:
        logger.warning("%s/%s: the converted graph reaches %.2f dB on held-out patches (target %.1f dB)%s: the "
                       "search's criteria are not met", job.name, backend_key, psnr, job.target,
                       "" if loss is None else f", {loss.mean:.2f} dB lost vs HR (bound {loss.bound:.2f}, budget "
                       f"{job.hr_budget:.2f} dB)")  # fmt: skip
    # graph rewrites, then the INT8 constants (and float blocks' INT8 weights)
    applied = {**pq.rewrites, "int8_add_constants": dict(pq.constants),
               **({"int8_float_weights": weights} if weights else {})}  # fmt: skip
    return converted, entry, (_remembering(_eager(converted, out_names), hold, outs), applied, example)


def quantize_job(job: QuantizeJob) -> list[Path]:
    """The ExecuTorch slice's INT8 driver (registry ``quantize`` hook): PT2E (XNNPACK quantizer) -> recipe ->
    convert -> XNNPACK ``.pte``, written through ``job.write``."""
    converted, entry, (fq, rewrites, example) = pt2e_recipe(job, "executorch", "xnnpack", dynamic=True)
    out_names = [o.name for o in job.spec.outputs]
    info = {"rewrites": rewrites, "int8_fraction": entry.int8_fraction}

    def build(folder: Path) -> BackendResult:
        return quantize_executorch(converted, example, folder, name=job.name, output_names=out_names, info=info)

    return [job.write("executorch", "int8", entry, build, fq)]

"""Localisation: the first block (or schedule step) where an exported file stops computing what PyTorch computes.

The unit of localisation is a *block*: a top-level module of the network (``input_blocks.N``, ``middle_block``,
``output_blocks.N``, ``out``; ``encoder.down.N``, ``encoder.mid``, ``quant_conv``; ``post_quant_conv``,
``decoder.mid``, ``decoder.up.N``) or a named schedule step written as plain tensor ops in a graph's ``forward``
(``input scaling`` = ``x_t / input_scale`` in the denoiser, ``prior sample`` = ``z_y + noise_scale * noise`` in
the fused pipeline, ``quantize`` = the codebook argmin and lookup, ``clamp``). Units come from
``torch.export``: every node of the exported program carries ``nn_module_stack`` (the module paths it was
traced in), so grouping nodes by their outermost non-container module gives the blocks in execution order,
and each unit's output is the node whose value leaves the unit.

Reference values come from the same exported program, run node by node (:class:`torch.fx.Interpreter`), so each
compared tensor has the exact PyTorch value of the node of the same name. Per backend (each in its slice,
``formats/<name>/localize.py``, reached through the format registry's ``localize`` hook: :class:`LocalizeRequest`
-> :class:`LocalizeOutcome`; the per-format names stay importable from this module):

* **ONNX**: the dynamo exporter names every tensor after the FX node that produced it (after its own
  decompositions, which :func:`trace_graph` replays), and keeps the names through onnxsim and the fp16 / QDQ
  rewrites. The units' output tensors are added as extra graph outputs (an in-memory model edit) and the
  edited model is run in ONNX Runtime. When a unit's output tensor was folded away, the last surviving tensor
  of that unit is compared instead (said in the row). Node metadata (``pkg.torch.onnx.fx_node``), when the file
  still has it, adds names.
* **Core ML**: :mod:`tadsr.runtime.coreml_sim` returns every MIL variable. The Core ML exporter converts a
  rewritten program (:func:`tadsr.formats.coreml.export.exported_program`: mobile rewrites, ``torch.export``,
  ``run_decompositions({})``) and MIL variables keep its node names (fp16 casts add ``_cast_fp16``), so the
  backend's values are matched by name in that program and compared, unit by unit *name*, with the
  export-ready graph's (a wrong rewrite shows too). The simulator's numerics are a model of the device (see its
  docstring), so the result says where the *file* diverges under that model.
* **ExecuTorch**: a ``.pte`` does not expose intermediate values (delegates are opaque). The export-ready
  graph is re-lowered with the artifact's recorded rewrites and delegate, with the unit outputs tapped as
  extra outputs (``executorch.devtools.intermediate_output_tap``), and run in the ExecuTorch runtime. This
  localises divergence of the *toolchain* (rewrites, lowering, kernels); an edit of the file itself is only
  visible as "the file's output differs from a fresh lowering", which is reported as such.

A unit diverges when its PSNR (over the reference's peak-to-peak) is below the threshold, by default the
parity floor (PSNR) of the graph's main output at the artifact's precision (``tadsr/numerics.json``): an
intermediate already worse than what the final output may be is where the error was introduced.
The largest single drop in PSNR is reported as well.

:func:`~tadsr.formats.onnx.localize.check_onnx_weights` compares the file's named initializers with the reference weights (a static
check that names a tampered tensor directly), and :func:`localize_chain` compares the stages of a component
set (encoder -> host prior sample -> denoiser -> decoder) one tile at a time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tadsr.errors import ConfigError
from tadsr.lazy import lazy_names
from tadsr.metrics import error_stats

__all__ = [
    "CodeFlips",
    "GraphTrace",
    "Localization",
    "LocalizeOutcome",
    "LocalizeRequest",
    "Unit",
    "UnitCheck",
    "WeightCheck",
    "build_localization",
    "code_flips",
    "localize_chain",
    "localize_values",
    "make_units",
    "node_pairs",
    "trace_graph",
    "trace_program",
    "unit_of_tensor",
    "unit_pairs",
]

logger = logging.getLogger(__name__)

# network roots: their children are the blocks (their own ops are glue); pass-through containers are skipped
# (the light autoencoder's graphs and networks, tadsr.models.light_ae, are named like the full ones)
_ROOTS = {"PipelineGraph": "", "EncoderGraph": "", "DenoiserGraph": "", "DecoderGraph": "", "UNetModelSwin": "",
          "Encoder": "encoder.", "Decoder": "decoder.", "VQModelTorch": "", "LightEncoderGraph": "",
          "LightDecoderGraph": "", "LightEncoder": "encoder.", "LightDecoder": "decoder."}  # fmt: skip
_PASS_THROUGH = ("ModuleList", "Sequential", "ModuleDict")
_INDEXED = ("input_blocks", "output_blocks", "down", "up", "blocks")  # lists whose items are the blocks
_DECODER_WRAPPERS = ("DecoderGraph", "LightDecoderGraph")
_GRAPH_WRAPPERS = ("PipelineGraph", "EncoderGraph", "DenoiserGraph", "LightEncoderGraph", *_DECODER_WRAPPERS)
_STAGE_OF_WRAPPER = {"EncoderGraph": "encoder", "LightEncoderGraph": "encoder", "DenoiserGraph": "denoiser",
                     "DecoderGraph": "decoder", "LightDecoderGraph": "decoder"}  # fmt: skip
_PSNR_JSON_INF = 999.0
NAME_VARIANTS = ("onnx", "core_aten", "empty", "none")


def _cls(type_str: Any) -> str:
    s = type_str if isinstance(type_str, str) else getattr(type_str, "__qualname__", str(type_str))
    return s.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class Unit:
    """One block or schedule step of an export graph, in execution order.

    Attributes:
        name: short name (``input_blocks.4``, ``decoder.up.1``, ``prior sample``, ``input scaling``).
        stage: ``encoder``, ``prior sample``, ``input scaling``, ``denoiser`` or ``decoder``.
        path: module path in the graph (``denoiser.unet.input_blocks.4``; ``""`` for schedule steps).
        nodes: FX node names of the unit, in graph order.
        outputs: FX nodes whose values are used outside the unit (the unit's outputs), in graph order.
    """

    name: str
    stage: str
    path: str
    nodes: tuple[str, ...]
    outputs: tuple[str, ...]


def _node_unit(stack: list[tuple[str, str]], graph: str) -> tuple[str, str, str] | None:
    """(unit name, block path, stage) of a node from its module stack, or ``("<glue>", path, class)``.

    The block is the first module below the innermost network root (``UNetModelSwin``, ``Encoder``,
    ``Decoder``, a graph wrapper), cut to ``<list>.<index>`` for the block lists (``input_blocks``,
    ``output_blocks``, ``down``, ``up``): the VQ levels ``down.N`` / ``up.N`` are never called as modules, so
    their blocks appear in the stack as ``up.N.block.K`` and are folded back into ``up.N``. Nodes outside
    any block are glue of the innermost module (``None`` without a module stack).
    """
    if not stack:
        return None
    root_path, root_cls, wrapper = "", "", graph
    for path, cls in stack:
        c = _cls(cls)
        if c in _ROOTS:
            root_path, root_cls = path, c
            if c in _GRAPH_WRAPPERS:
                wrapper = c
            continue
        if c in _PASS_THROUGH:
            continue
        rel = path[len(root_path) + 1 :] if root_path else path
        skip = "unet." if rel.startswith("unet.") else ""  # DenoiserGraph calls unet.forward_with_embedding
        parts = rel[len(skip) :].split(".")
        block = ".".join(parts[:2]) if parts[0] in _INDEXED and len(parts) > 1 else parts[0]
        if block == "quantize":
            return "quantize", "", "decoder"
        stage = _STAGE_OF_WRAPPER.get(wrapper, graph)
        full = ".".join(x for x in (root_path, skip.rstrip("."), block) if x)
        return _ROOTS[root_cls] + block, full, stage
    return "<glue>", stack[-1][0], _cls(stack[-1][1])


_GLUE = {"PipelineGraph": ("prior sample", "prior sample"), "DenoiserGraph": ("input scaling", "input scaling")}


def _wrappers(stack: list[tuple[str, str]]) -> list[str]:
    return [p for p, c in stack if _cls(c) in _GRAPH_WRAPPERS]


def make_units(gm: torch.fx.GraphModule, graph: str) -> list[Unit]:
    """Group the call nodes of an exported graph into :class:`Unit` s (see the module docstring).

    Ops written in a graph wrapper's ``forward`` become named schedule steps only where that step is: the
    DenoiserGraph's before its first block (``input scaling``: ``x_t / input_scale`` and the concat with the
    LR), the PipelineGraph's between encoder and denoiser (``prior sample``), the DecoderGraph's before the
    decoder network (``quantize``) and after it (``clamp``). Other glue (skip concats) joins the next block.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    keyed: list[tuple[tuple[str, str, str], list[str]]] = []
    pending: list[str] = []
    started: set[str] = set()  # wrapper paths that have run a block of their own network
    for n in nodes:
        stack = [(p, c) for p, c in (n.meta.get("nn_module_stack") or {}).values()]
        key = _node_unit(stack, graph)
        if key is not None and key[0] == "<glue>":
            key = _glue_key(key[1], key[2], started)
        elif key is not None and key[1]:
            started.update(_wrappers(stack))
        if key is None:
            pending.append(n.name)
            continue
        if keyed and keyed[-1][0] == key:
            keyed[-1][1].extend([*pending, n.name])
        else:
            keyed.append((key, [*pending, n.name]))
        pending = []
    if pending and keyed:
        keyed[-1][1].extend(pending)
    by_name = {n.name: n for n in gm.graph.nodes}
    units = []
    for (name, path, stage), members in keyed:
        inside = set(members)
        outs = [m for m in members if any(u.name not in inside for u in by_name[m].users)]
        units.append(Unit(name, stage, path, tuple(members), tuple(outs)))
    return _dedupe_names(units)


def _glue_key(path: str, cls: str, started: set[str]) -> tuple[str, str, str] | None:
    if cls in _DECODER_WRAPPERS:
        return ("clamp" if path in started else "quantize"), "", "decoder"
    if cls == "PipelineGraph":
        # between the encoder (started) and the denoiser (its wrapper not started yet)
        den = f"{path}.denoiser" if path else "denoiser"
        return None if den in started else ("prior sample", "", "prior sample")
    if cls in _GLUE and path not in started:
        name, stage = _GLUE[cls]
        return name, "", stage
    return None


def _dedupe_names(units: list[Unit]) -> list[Unit]:
    count: dict[str, int] = {}
    for u in units:
        count[u.name] = count.get(u.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for u in units:
        if count[u.name] > 1:
            seen[u.name] = seen.get(u.name, 0) + 1
            u = Unit(f"{u.name}#{seen[u.name]}", u.stage, u.path, u.nodes, u.outputs)
        out.append(u)
    return out


def unit_of_tensor(name: str, graph: str) -> tuple[str, str]:
    """(unit, stage) owning a parameter / buffer of an export graph, named as :func:`make_units` names units.

    E.g. ``unet.input_blocks.4.0.op.weight`` -> ``("input_blocks.4", "denoiser")``, ``decoder.decoder.up.1.block.0
    .conv1.weight`` in the pipeline -> ``("decoder.up.1", "decoder")``, ``noise_scale`` -> ``("prior sample",
    "prior sample")``, ``input_scale`` -> ``("input scaling", "input scaling")``.
    """
    parts = name.split(".")
    stage = graph
    if graph == "pipeline" and parts[0] in ("encoder", "denoiser", "decoder") and len(parts) > 1:
        stage, parts = parts[0], parts[1:]
    if len(parts) == 1:
        if parts[0] in ("input_scale", "inv_input_scale"):
            return "input scaling", "input scaling"
        if parts[0] == "noise_scale":
            return "prior sample", "prior sample"
        return parts[0], stage
    if parts[0] == "unet":
        parts = parts[1:]
    prefix = ""
    if parts[0] in ("encoder", "decoder") and len(parts) > 1:
        prefix, parts = f"{parts[0]}.", parts[1:]
    block = ".".join(parts[:2]) if parts[0] in _INDEXED and len(parts) > 1 else parts[0]
    if block == "quantize":
        return "quantize", "decoder"
    return prefix + block, stage


# ------------------------------------------------------------------------------------------------- tracing


@dataclass
class GraphTrace:
    """The export-ready graph as ``torch.export`` sees it, with its units; reusable across inputs.

    Attributes:
        graph: graph name (``encoder``, ``denoiser``, ``decoder``, ``pipeline``).
        program: the exported program (decomposed as ``variant`` says).
        variant: node naming: ``"onnx"`` (the ONNX exporter's decompositions), ``"core_aten"`` (the default
            ``run_decompositions()``, used by Core ML / ExecuTorch) or ``"none"``.
        units: the units in execution order.
        input_names: the graph's input names in order.
    """

    graph: str
    program: Any
    variant: str
    units: list[Unit]
    input_names: list[str]
    output_names: list[str] = field(default_factory=list)

    @property
    def graph_outputs(self) -> dict[str, str]:
        """FX node name -> graph output name (exporters name the graph outputs after the spec, not the node)."""
        out_node = next(n for n in self.program.graph.nodes if n.op == "output")
        args = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
        return {a.name: o for a, o in zip(args, self.output_names, strict=False) if isinstance(a, torch.fx.Node)}

    @property
    def node_names(self) -> set[str]:
        return {n.name for n in self.program.graph.nodes if n.op == "call_function"}

    def candidates(self, depth: int = 12) -> list[str]:
        """FX nodes worth keeping values of: each unit's outputs and its last ``depth`` nodes."""
        keep: dict[str, None] = {}
        for u in self.units:
            for n in (*u.outputs, *u.nodes[-depth:]):
                keep[n] = None
        return list(keep)

    def run(self, inputs: Mapping[str, np.ndarray], keep: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the program node by node on ``inputs``; return the float values of ``keep`` (default: candidates)."""
        want = set(keep if keep is not None else self.candidates())
        ep = self.program
        args = []
        for spec in ep.graph_signature.input_specs:
            kind = spec.kind.name
            if kind == "USER_INPUT":
                continue
            if spec.target in ep.state_dict:
                args.append(ep.state_dict[spec.target])
            else:
                args.append(ep.constants[spec.target])
        user = [torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32)) for n in self.input_names]
        values: dict[str, np.ndarray] = {}

        class _Recorder(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in want and isinstance(out, torch.Tensor) and out.is_floating_point():
                    values[n.name] = out.detach().float().cpu().numpy().copy()
                return out

        placeholders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
        # the program's placeholders are lifted params/buffers/constants first, then the user inputs
        flat = args + user
        if len(flat) != len(placeholders):
            raise RuntimeError(f"exported program takes {len(placeholders)} inputs, got {len(flat)}")
        with torch.no_grad():
            _Recorder(ep.graph_module).run(*flat)
        return values


def trace_graph(module: nn.Module, spec: Any, *, variant: str = "onnx") -> GraphTrace:
    """``torch.export`` the export-ready graph as its exporter does and find its units.

    Args:
        module: the graph from :func:`tadsr.formats.graphs.make_graphs` (eval, no grad).
        spec: its ``GraphSpec`` (example inputs, names).
        variant: ``"onnx"``: replay the ONNX exporter's decompositions so that node names equal the tensor
            names in the ONNX file; ``"core_aten"``: ``run_decompositions()``; ``"empty"``:
            ``run_decompositions({})`` (what the Core ML export converts); ``"none"``: the program as exported.

    Raises:
        ConfigError: unknown variant.
    """
    if variant not in NAME_VARIANTS:
        raise ConfigError(f"variant must be one of {NAME_VARIANTS}, got {variant!r}")
    args = spec.example_inputs()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        ep = torch.export.export(module, args, strict=False)
        if variant == "onnx":
            ep = _onnx_decompose(ep)
        elif variant == "core_aten":
            ep = ep.run_decompositions()
        elif variant == "empty":
            ep = ep.run_decompositions({})
    return trace_program(ep, spec, variant)


def trace_program(program: Any, spec: Any, variant: str = "given") -> GraphTrace:
    """A :class:`GraphTrace` of an exported program built elsewhere (e.g. the Core ML exporter's)."""
    units = make_units(program.graph_module, spec.name)
    return GraphTrace(spec.name, program, variant, units, [s.name for s in spec.inputs], [s.name for s in spec.outputs])


@functools.cache
def _onnx_registry() -> Any:
    from torch.onnx._internal.exporter import _registration

    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" x4
    try:
        return _registration.ONNXRegistry.from_torchlib()
    finally:
        quiet.setLevel(level)


def _onnx_decompose(ep: Any) -> Any:
    """The decompositions ``torch.onnx.export(dynamo=True)`` applies before translating (node names follow).

    Uses the exporter's private ``_prepare_exported_program_for_export``; if a torch release moves it, the
    program stays undecomposed and fewer tensor names match (units then fall back to tensors inside them).
    """
    try:
        from torch.onnx._internal.exporter import _core

        return _core._prepare_exported_program_for_export(ep, registry=_onnx_registry())
    except (ImportError, AttributeError) as e:  # private API of torch.onnx
        logger.warning("cannot replay the ONNX exporter's decompositions (%s); matching fewer tensor names", e)
        return ep


# ------------------------------------------------------------------------------------------------- results


@dataclass
class UnitCheck:
    """One unit compared: which tensor, its error against the PyTorch value, and the verdict.

    Attributes:
        unit, stage: see :class:`Unit`.
        tensor: the compared tensor's name (FX node name = backend tensor name), or None if not observable.
        is_output: True if ``tensor`` is the unit's output (False: the last surviving tensor inside it).
        shape: its shape.
        max_abs, mean_abs, psnr: error vs the reference (PSNR over the reference's peak-to-peak, dB).
        ref_range: the reference's peak-to-peak.
        status: ``"ok"``, ``"DIVERGED"`` (below the threshold) or ``"n/a"`` (not observable).
    """

    unit: str
    stage: str
    tensor: str | None = None
    is_output: bool = True
    shape: tuple[int, ...] = ()
    max_abs: float = math.nan
    mean_abs: float = math.nan
    psnr: float = math.nan
    ref_range: float = math.nan
    status: str = "n/a"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs", "mean_abs", "psnr", "ref_range"):
            v = d[k]
            d[k] = None if math.isnan(v) else (_PSNR_JSON_INF if math.isinf(v) else float(f"{v:.6g}"))
        d["shape"] = list(self.shape)
        return d

    def numbers(self) -> str:
        psnr = "inf" if math.isinf(self.psnr) else f"{self.psnr:.1f}"
        return f"max abs {self.max_abs:.3g}, mean abs {self.mean_abs:.3g}, PSNR {psnr} dB"


@dataclass
class Localization:
    """Where a backend's run of one case first departs from PyTorch.

    Attributes:
        backend: ``onnx``, ``coreml-sim``, ``executorch (re-lowered)``, ``component chain``.
        method: how intermediates were obtained and matched (one sentence).
        case: the input case used.
        threshold_psnr: a unit diverges below this PSNR (dB).
        units: every unit checked, in execution order.
        first: the first diverging unit (None if none diverged).
        largest_drop: the unit whose PSNR fell the most from the unit before it.
        notes: caveats (unmatched units, fallbacks).
    """

    backend: str
    method: str
    case: str
    threshold_psnr: float
    units: list[UnitCheck] = field(default_factory=list)
    first: UnitCheck | None = None
    largest_drop: UnitCheck | None = None
    notes: list[str] = field(default_factory=list)

    def finish(self) -> Localization:
        """Set ``first`` and ``largest_drop`` from ``units``."""
        seen = [u for u in self.units if u.status != "n/a"]
        self.first = next((u for u in seen if u.status == "DIVERGED"), None)
        best, prev, drop = None, math.inf, 0.0
        for u in seen:
            cur = u.psnr
            d = (min(prev, 200.0) - min(cur, 200.0)) if not math.isnan(cur) else 0.0
            if d > drop:
                best, drop = u, d
            prev = cur
        self.largest_drop = best
        return self

    @property
    def observed(self) -> int:
        return sum(u.status != "n/a" for u in self.units)

    def summary(self) -> str:
        """One line: the first diverging unit with its numbers, or that none diverged."""
        if self.first is None:
            return (f"no unit below {self.threshold_psnr:g} dB ({self.observed}/{len(self.units)} units observed, "
                    f"{self.backend}, case {self.case})")  # fmt: skip
        f = self.first
        before = self._before(f)
        tensor = f"tensor '{f.tensor}'" + ("" if f.is_output else ", last surviving tensor inside the unit")
        return (f"first divergence at {f.unit} (stage: {f.stage}; {tensor}): {f.numbers()}, threshold "
                f"{self.threshold_psnr:g} dB{before} [{self.backend}, case {self.case}]")  # fmt: skip

    def _before(self, u: UnitCheck) -> str:
        seen = [x for x in self.units if x.status != "n/a"]
        i = seen.index(u)
        if i == 0:
            return "; it is the first unit"
        p = seen[i - 1]
        psnr = "inf" if math.isinf(p.psnr) else f"{p.psnr:.1f}"
        return f"; the unit before ({p.unit}) is at {psnr} dB"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "method": self.method,
            "case": self.case,
            "threshold_psnr": self.threshold_psnr,
            "first": None if self.first is None else self.first.unit,
            "first_stage": None if self.first is None else self.first.stage,
            "largest_drop": None if self.largest_drop is None else self.largest_drop.unit,
            "summary": self.summary(),
            "units": [u.to_dict() for u in self.units],
            "notes": list(self.notes),
        }


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float]:
    got = np.asarray(got, dtype=np.float32)
    if not np.isfinite(got).all():
        return math.inf, math.inf, -math.inf, float(np.ptp(ref)) if ref.size else 0.0
    s = error_stats(got, ref)
    return s.max_abs, s.mean_abs, s.psnr, s.data_range


Pair = tuple[np.ndarray | None, np.ndarray | None, str | None, bool]
"""(reference value, backend value, compared tensor name, is the unit's output) for one unit."""


def build_localization(
    units: Sequence[Unit], pairs: Mapping[str, Pair], *, backend: str, method: str, case: str,
    threshold_psnr: float, notes: Sequence[str] = (),
) -> Localization:  # fmt: skip
    """Compare each unit's pair (by unit name); units without a usable pair are "n/a"."""
    loc = Localization(backend, method, case, threshold_psnr, notes=list(notes))
    for u in units:
        ref, got, tensor, is_out = pairs.get(u.name, (None, None, None, True))
        if ref is None or got is None or np.shape(got) != np.shape(ref):
            loc.units.append(UnitCheck(u.name, u.stage))
            continue
        mx, mean, p, rng = _compare(ref, got)
        status = "DIVERGED" if (math.isnan(p) or p < threshold_psnr) else "ok"
        loc.units.append(UnitCheck(u.name, u.stage, tensor, is_out, tuple(ref.shape), mx, mean, p, rng, status))
    missing = [u.unit for u in loc.units if u.status == "n/a"]
    if missing:
        loc.notes.append(f"{len(missing)} unit(s) not observable: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")  # fmt: skip
    return loc.finish()


def node_pairs(
    trace: GraphTrace, reference: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray]
) -> dict[str, Pair]:
    """Pairs by node name: each unit's last output present in ``observed`` (with the reference's shape), else
    the last node inside the unit that is present."""
    pairs: dict[str, Pair] = {}
    for u in trace.units:
        chosen = next((n for n in reversed(u.outputs) if _usable(n, reference, observed)), None)
        is_out = chosen is not None
        if chosen is None:
            chosen = next((n for n in reversed(u.nodes) if _usable(n, reference, observed)), None)
        if chosen is not None:
            pairs[u.name] = (reference[chosen], observed[chosen], chosen, is_out)
    return pairs


def unit_pairs(
    ref_trace: GraphTrace, reference: Mapping[str, np.ndarray], trace: GraphTrace,
    own_reference: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray],
) -> dict[str, Pair]:  # fmt: skip
    """Pairs by unit name between the original graph (``ref_trace``) and a rewritten one (``trace``).

    The backend's value of a rewritten unit's output is compared with the *original* graph's unit output
    (so a wrong rewrite shows); where only a tensor inside the unit is observable, or the shapes differ,
    with the rewritten program's own value of that tensor.
    """
    ref_out = {u.name: u.outputs[-1] for u in ref_trace.units if u.outputs}
    pairs = node_pairs(trace, own_reference, observed)
    for name, (own, got, tensor, is_out) in list(pairs.items()):
        orig = reference.get(ref_out.get(name, ""))
        if is_out and orig is not None and np.shape(orig) == np.shape(got):
            pairs[name] = (orig, got, tensor, is_out)
    return pairs


def localize_values(
    trace: GraphTrace, reference: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray], *, backend: str,
    method: str, case: str, threshold_psnr: float, notes: Sequence[str] = (),
) -> Localization:  # fmt: skip
    """Compare, unit by unit, the backend's values (``observed``: FX node name -> array) with PyTorch's."""
    return build_localization(trace.units, node_pairs(trace, reference, observed), backend=backend, method=method,
                              case=case, threshold_psnr=threshold_psnr, notes=notes)  # fmt: skip


def _usable(name: str, reference: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray]) -> bool:
    return name in reference and name in observed and np.shape(observed[name]) == reference[name].shape


# ------------------------------------------------------------------------------------------ format hooks


@dataclass
class LocalizeRequest:
    """What parity hands a format's ``localize`` hook (:class:`~tadsr.formats.spec.FormatSpec`) for one artifact.

    Attributes:
        file: the artifact's model file.
        manifest: its manifest.
        module, spec: the export-ready graph and its GraphSpec.
        precision: the artifact's precision.
        inputs, case: the case to localise (the worst of the runtime hop) and its name.
        threshold_psnr: a unit diverges below this PSNR.
        trace: ``variant -> GraphTrace`` of the export-ready graph (``"onnx"``: the ONNX exporter's naming,
            ``"coreml"``: the program the Core ML exporter converts, ``"none"``: undecomposed); the caller caches.
        artifact_output: the artifact's own outputs on this case.
    """

    file: Path
    manifest: Mapping[str, Any]
    module: nn.Module
    spec: Any
    precision: str
    inputs: Mapping[str, np.ndarray]
    case: str
    threshold_psnr: float
    trace: Callable[[str], GraphTrace]
    artifact_output: Mapping[str, np.ndarray] | None = None

    @property
    def graph(self) -> str:
        return str(self.manifest["graph"]["name"])


@dataclass
class LocalizeOutcome:
    """A format's diagnosis: block localisations, the static weight check (if the format has one), notes."""

    localizations: list[Localization] = field(default_factory=list)
    weights: WeightCheck | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class WeightCheck:
    """Static comparison of a file's weights with the reference's (see :func:`check_onnx_weights`)."""

    compared: int = 0
    skipped: int = 0
    precision: str = ""
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        if not self.mismatches:
            return f"{self.compared} named weight tensors equal the reference ({self.skipped} transformed or absent)"
        m = max(self.mismatches, key=lambda d: d["max_abs"])
        return (f"{len(self.mismatches)} of {self.compared} weight tensors differ from the reference; largest: "
                f"{m['tensor']} (max abs {m['max_abs']:.3g} > {m['tolerance']:.2g})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"compared": self.compared, "skipped": self.skipped, "passed": self.passed,
                "summary": self.summary(), "mismatches": self.mismatches[:20]}  # fmt: skip


# --------------------------------------------------------------------------------------------- code flips


@dataclass
class CodeFlips:
    """VQ codes chosen differently for an artifact's latent than for the reference latent, and whether the
    latent difference explains each one (a near-tie), see :func:`code_flips`."""

    codes: int = 0
    flipped: int = 0
    explained: int = 0
    worst_margin: float = 0.0

    @property
    def all_explained(self) -> bool:
        return self.explained == self.flipped

    def __add__(self, other: CodeFlips) -> CodeFlips:
        return CodeFlips(self.codes + other.codes, self.flipped + other.flipped, self.explained + other.explained,
                         max(self.worst_margin, other.worst_margin))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def code_flips(codebook: np.ndarray, x0_ref: np.ndarray, x0_got: np.ndarray) -> CodeFlips:
    """Compare the nearest codebook entries of two latents ``(1, C, h, w)``, pixel by pixel.

    A pixel whose code differs (reference picks ``a``, the artifact's latent ``b``) is *explained* when the
    latent difference ``δ`` at that pixel can reorder the two codes: the reference margin
    ``|z - e_b|² - |z - e_a|²`` changes by ``2 δ·(e_a - e_b)``, at most ``2 |δ| |e_a - e_b|`` (Cauchy-Schwarz).
    Such a flip is a near-tie decided by rounding, not a conversion error.
    """
    e = np.asarray(codebook, np.float32)
    c = e.shape[1]
    zr = np.asarray(x0_ref, np.float32).reshape(c, -1).T
    zg = np.asarray(x0_got, np.float32).reshape(c, -1).T
    e2 = (e * e).sum(1)
    dr = (zr * zr).sum(1, keepdims=True) + e2 - 2 * zr @ e.T
    dg = (zg * zg).sum(1, keepdims=True) + e2 - 2 * zg @ e.T
    a, b = dr.argmin(1), dg.argmin(1)
    idx = np.nonzero(a != b)[0]
    if idx.size == 0:
        return CodeFlips(len(a))
    margin = dr[idx, b[idx]] - dr[idx, a[idx]]
    bound = 2 * np.linalg.norm(zg[idx] - zr[idx], axis=1) * np.linalg.norm(e[a[idx]] - e[b[idx]], axis=1)
    tol = 1e-5 * float(np.abs(dr).max(initial=1.0))  # float32 rounding of the distances themselves
    ok = margin <= bound * 1.001 + tol
    return CodeFlips(len(a), int(idx.size), int(ok.sum()), float(margin.max()))


# ------------------------------------------------------------------------------------------ component chain


def localize_chain(
    stages: Sequence[tuple[str, str, Callable[[], np.ndarray], np.ndarray, float]],
    *,
    case: str,
    backend: str,
    method: str = "component artifacts run one after another on one tile; each stage's output compared with the "
    "reference pipeline's",
) -> Localization:
    """Compare a chain of stage outputs (artifact vs reference) and name the first stage below its threshold.

    Args:
        stages: ``(stage, tensor, compute the artifact's value, reference value, threshold PSNR)`` in order;
            e.g. encoder ``z_y``, prior sample ``x_t``, denoiser ``x0``, decoder ``sr``. ``compute`` is called
            in order, so a later stage may read what an earlier one produced.
        case: input case name.
        backend: backend label.
        method: one sentence for the report.
    """
    loc = Localization(backend, method, case, math.nan)
    thresholds = []
    for stage, tensor, compute, ref, thr in stages:
        mx, mean, p, rng = _compare(ref, compute())
        status = "DIVERGED" if (math.isnan(p) or p < thr) else "ok"
        loc.units.append(UnitCheck(stage, stage, tensor, True, tuple(ref.shape), mx, mean, p, rng, status))
        thresholds.append(thr)
    loc.threshold_psnr = min(thresholds) if thresholds else math.nan
    return loc.finish()


# per-format taps live in the slices; their names stay importable from here
__getattr__, __dir__ = lazy_names(__name__, {
    "OnnxTap": "tadsr.formats.onnx.localize",
    "check_onnx_weights": "tadsr.formats.onnx.localize",
    "localize_onnx": "tadsr.formats.onnx.localize",
    "onnx_codebook_input": "tadsr.formats.onnx.localize",
    "onnx_output_scale": "tadsr.formats.onnx.localize",
    "onnx_value_names": "tadsr.formats.onnx.localize",
    "run_onnx_with_intermediates": "tadsr.formats.onnx.localize",
    "localize_coreml": "tadsr.formats.coreml.localize",
    "localize_executorch": "tadsr.formats.executorch.localize",
})  # fmt: skip

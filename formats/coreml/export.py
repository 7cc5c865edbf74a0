"""Core ML export: ``torch.export`` -> rewrites -> ``ct.convert`` (ML program, iOS 17) -> ``<graph>.mlpackage``.

Pipeline::

    apply_rewrites(graph, example, "coreml")      # baked Swin attention, folded ResBlock constants,
                                                  # decomposed GroupNorm, transposed-conv upsampling
    ep = torch.export.export(...).run_decompositions({})
    fp16 only: measure_fp16(ep, calib) -> plan_fp16(ep, stats)   # which layers stay fp32, and why
    ct.convert(ep, inputs/outputs named as the spec, compute_precision=FP16ComputePrecision(op_selector))
    descriptions + metadata -> save to a temp .mlpackage -> rename -> reload the spec and check the I/O

**Mixed precision (fp16).** The decision is made on the PyTorch program that is converted, so every
measured op is a MIL op of the same name (coremltools names MIL ops after the ``torch.export`` nodes):

1. *Measure* (:func:`measure_fp16`): the exported program runs on calibration inputs in float32; every op is
   run a second time on its inputs rounded to fp16 with its output rounded to fp16 (fp16 storage, float32
   arithmetic: the model of ``tadsr.runtime.coreml_sim``). Per op: max |input|, max |output| and the local
   relative error ``||y16 - y32|| / ||y32||``.
2. *Decide per layer* (:func:`plan_fp16`): a layer is the set of ops a module owns directly (its
   ``nn_module_stack`` innermost entry: a GroupNorm's statistics, a window attention's scores + bias +
   softmax + weighted sum, a ResBlock's residual add; the q/k/v/proj linears and convs are layers of their
   own). A layer is kept fp32 when one of its ops *overflows* (|value| x ``headroom`` > 65504, or the fp16 run
   is not finite), *loses accuracy* (local error > ``rel_tol``), feeds a *discrete choice* (argmin/argmax:
   the VQ codebook lookup, where fp16 distances flip codes), or matches ``fp16_keep_fp32``.
3. *Convert* with ``FP16ComputePrecision(op_selector=...)``: everything else is fp16. ``info["fp16"]``
   records the policy, the kept layers with their reasons, the measured ranges, and the fp16 / fp32 op
   census of the converted program.

Core ML runs only on Apple platforms; on Linux the package is checked by reloading its spec and, in
parity, by ``tadsr.runtime.coreml_sim``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tadsr import fileio
from tadsr.errors import ConfigError, ExportError
from tadsr.formats.artifact import BackendResult
from tadsr.formats.graphs import GraphSpec
from tadsr.formats.rewrites import apply_rewrites
from tadsr.versions import version as tool_version

__all__ = [
    "export_coreml",
    "save_package",
    "DEBUG_FILES",
    "OpStats",
    "Fp16Plan",
    "measure_fp16",
    "plan_fp16",
    "exported_program",
    "FP16_MAX",
    "DEFAULT_REL_TOL",
    "DEFAULT_HEADROOM",
    "DEFAULT_LICENSE",
]

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
DEFAULT_REL_TOL = 3e-3  # local fp16 error above ~10x the rounding of a well-scaled op
DEFAULT_HEADROOM = 2.0  # keep fp32 when a calibration value reaches half the fp16 range
DEFAULT_LICENSE = (
    "Converter code: Apache-2.0 (tadsr-mobile). Weights: see the 'tadsr.sources' metadata; the ResShift VQGAN-f4 "
    "is under the S-Lab License 1.0 (non-commercial), TAD-SR code under Apache-2.0."
)
_DISCRETE = ("argmin", "argmax")
# data movement: fp16 changes nothing but the storage rounding already counted at the producer
_MOVES = frozenset({"view", "_unsafe_view", "reshape", "permute", "transpose", "clone", "slice", "cat", "expand",
                    "squeeze", "unsqueeze", "alias", "select", "split", "split_with_sizes", "t"})  # fmt: skip
_SKIP_TARGETS = ("_assert_tensor_metadata",)


# --------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------
def exported_program(graph: nn.Module, spec: GraphSpec) -> tuple[torch.export.ExportedProgram, dict[str, int]]:
    """The Core ML-ready program: rewrites (``"coreml"`` set) + ``torch.export`` + ATen decompositions.

    Returns:
        The program and the rewrite report (rewrite -> modules replaced).
    """
    example = spec.example_inputs()
    rewritten, report = apply_rewrites(graph, example, "coreml")
    try:
        ep = torch.export.export(rewritten, example, strict=False).run_decompositions({})
    except Exception as e:  # torch.export raises many unrelated types; all mean "not exportable"
        raise ExportError(f"torch.export of the {spec.name} graph failed: {e}") from e
    return ep, report.to_dict()


def _node_module(node: torch.fx.Node) -> tuple[str, str]:
    """(qualified module path, class name) of the innermost module that owns ``node`` ("" for the top)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return str(path), kind.rsplit(".", 1)[-1]


def _target_name(node: torch.fx.Node) -> str:
    """ATen op name without namespace and overload (``conv2d``, ``softmax``)."""
    return str(getattr(node.target, "_opname", None) or getattr(node.target, "__name__", node.target))


# --------------------------------------------------------------------------------------------------------
# fp16 measurement
# --------------------------------------------------------------------------------------------------------
@dataclass
class OpStats:
    """fp16 behaviour of one op of the exported program over the calibration inputs.

    Attributes:
        name: node name (= MIL op name after conversion).
        op: ATen op name as in the program (``conv2d``, ``mean``, ``softmax`` ...).
        module: owning module path ("" for graph-level ops); ``module_type`` its class name.
        max_abs_in, max_abs_out: largest |float input| / |output| in float32.
        rel_err: largest local relative error ``||y16 - y32|| / ||y32||`` (inf: fp16 run not finite).
    """

    name: str
    op: str
    module: str
    module_type: str
    max_abs_in: float = 0.0
    max_abs_out: float = 0.0
    rel_err: float = 0.0


def _round16(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(torch.float16).to(torch.float32)
    return x


def _max_abs(ts: Sequence[torch.Tensor]) -> float:
    vals = [float(t.detach().abs().max()) for t in ts if t.is_floating_point() and t.numel()]
    return max(vals, default=0.0)


class _Fp16Probe(torch.fx.Interpreter):
    """Runs the program in float32 and re-runs each float op in fp16 storage to record :class:`OpStats`."""

    def __init__(self, gm: torch.fx.GraphModule, stats: dict[str, OpStats]) -> None:
        super().__init__(gm)
        self.stats = stats

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "call_function" or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        ins = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        module, kind = _node_module(n)
        s = self.stats.setdefault(n.name, OpStats(n.name, _target_name(n), module, kind))
        if s.op not in _MOVES:
            a16, k16 = pytree.tree_map(_round16, (args, kwargs))
            with torch.no_grad():
                y16 = _round16(n.target(*a16, **k16))
            if not bool(torch.isfinite(y16).all()):
                err = math.inf
            else:
                diff, ref = float(torch.linalg.vector_norm(y16 - out)), float(torch.linalg.vector_norm(out))
                err = diff / ref if ref > 0 else diff
            s.rel_err = max(s.rel_err, err)
        s.max_abs_in = max(s.max_abs_in, _max_abs(ins))
        s.max_abs_out = max(s.max_abs_out, _max_abs([out]))
        return out


def _program_args(ep: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    from torch.export.graph_signature import InputKind

    user = iter(inputs)
    args = []
    for s in ep.graph_signature.input_specs:
        if s.kind == InputKind.USER_INPUT:
            args.append(next(user))
        elif s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.target in ep.state_dict:
            args.append(ep.state_dict[s.target])
        else:
            args.append(ep.constants[s.target])
    return args


def measure_fp16(
    ep: torch.export.ExportedProgram, calib_inputs: Sequence[Sequence[torch.Tensor]]
) -> dict[str, OpStats]:
    """Per-op fp16 statistics of ``ep`` over ``calib_inputs`` (each a tuple in the program's input order)."""
    stats: dict[str, OpStats] = {}
    for inputs in calib_inputs:
        with torch.no_grad():
            _Fp16Probe(ep.graph_module, stats).run(*_program_args(ep, inputs))
    return stats


# --------------------------------------------------------------------------------------------------------
# fp16 decision
# --------------------------------------------------------------------------------------------------------
@dataclass
class Fp16Plan:
    """Which layers (and so which MIL ops) stay fp32.

    Attributes:
        kept_layers: module path -> reason (``overflow: ...``, ``fp16 error ...``, ``discrete choice``,
            ``requested``); "" is the graph's top level.
        kept_ops: node names (= MIL op names) kept in fp32.
        kept_op_types: ATen op names kept fp32 everywhere (from ``fp16_keep_fp32``).
        layers: module path -> ``{"type", "ops", "max_abs", "rel_err"}`` for every layer (the measured ranges).
        policy: the thresholds used.
    """

    kept_layers: dict[str, str] = field(default_factory=dict)
    kept_ops: set[str] = field(default_factory=set)
    kept_op_types: set[str] = field(default_factory=set)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)


def _layer_reason(ops: Sequence[OpStats], rel_tol: float, headroom: float) -> str | None:
    big = max(ops, key=lambda s: max(s.max_abs_in, s.max_abs_out))
    peak = max(big.max_abs_in, big.max_abs_out)
    if peak * headroom > FP16_MAX or any(math.isinf(s.rel_err) for s in ops):
        return f"overflow: max |x| = {peak:.4g} at {big.name} ({big.op}); fp16 max 65504, headroom x{headroom:g}"
    worst = max(ops, key=lambda s: s.rel_err)
    if worst.rel_err > rel_tol:
        return f"fp16 error {worst.rel_err:.2g} > {rel_tol:g} at {worst.name} ({worst.op})"
    return None


def _requested(path: str, kind: str, patterns: Sequence[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(path, p) or kind == p:
            return p
    return None


def plan_fp16(
    ep: torch.export.ExportedProgram,
    stats: Mapping[str, OpStats],
    *,
    keep_fp32: Sequence[str] = (),
    rel_tol: float = DEFAULT_REL_TOL,
    headroom: float = DEFAULT_HEADROOM,
) -> Fp16Plan:
    """Decide per layer which ops stay fp32 (see the module docstring for the rules).

    Args:
        ep: the program that will be converted.
        stats: :func:`measure_fp16` output for it.
        keep_fp32: forced-fp32 patterns: module path globs (``"*.attn"``), module class names
            (``"DecomposedGroupNorm"``) or ATen op names as in the program (``"softmax"``, ``"conv2d"``).
        rel_tol: largest accepted local fp16 relative error of an op.
        headroom: factor on measured magnitudes before comparing with 65504.
    """
    plan = Fp16Plan(policy={"rel_tol": rel_tol, "headroom": headroom, "keep_fp32": list(keep_fp32)})
    owners: dict[str, list[torch.fx.Node]] = {}
    kinds: dict[str, str] = {}
    for n in ep.graph.nodes:
        if n.op == "call_function" and _target_name(n) not in _SKIP_TARGETS:
            path, kind = _node_module(n)
            owners.setdefault(path, []).append(n)
            kinds[path] = kind
            if _target_name(n) in keep_fp32:
                plan.kept_op_types.add(_target_name(n))
                plan.kept_ops.add(n.name)
    for path, nodes in owners.items():
        ops = [stats[n.name] for n in nodes if n.name in stats]
        rec: dict[str, Any] = {"type": kinds[path], "ops": len(nodes)}
        if ops:
            rec["max_abs"] = max(max(s.max_abs_in, s.max_abs_out) for s in ops)
            rec["rel_err"] = max(s.rel_err for s in ops)
        plan.layers[path] = rec
        reason = None
        if any(_target_name(n) in _DISCRETE for n in nodes):
            reason = "discrete choice: feeds argmin/argmax (fp16 distances flip codebook indices)"
        elif (p := _requested(path, kinds[path], keep_fp32)) is not None:
            reason = f"requested ({p})"
        elif ops:
            reason = _layer_reason(ops, rel_tol, headroom)
        if reason:
            plan.kept_layers[path] = reason
            plan.kept_ops.update(n.name for n in nodes)
    return plan


def _op_selector(plan: Fp16Plan, node_names: Sequence[str]) -> Any:
    """``op -> bool`` (True: fp16) for ``FP16ComputePrecision``; derived MIL names map by longest prefix."""
    exact = set(node_names)
    known = sorted(exact, key=len, reverse=True)

    def owner(mil_name: str) -> str | None:
        if mil_name in exact or mil_name in plan.kept_ops:
            return mil_name
        for n in known:  # derived names, longest first: "conv_transpose2d_has_output_shape" -> "conv_transpose2d"
            if mil_name.startswith(n + "_"):
                return n
        return None

    def select(op: Any) -> bool:
        o = owner(op.name)
        return o is None or o not in plan.kept_ops

    return select


# --------------------------------------------------------------------------------------------------------
# conversion, description, saving
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Hide coremltools' progress bars (written to stderr) unless ``progress``; captured text goes to DEBUG."""
    if progress:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        text = "\n".join(line for line in buf.getvalue().splitlines() if "%|" not in line).strip()
        if text:
            logger.debug("coremltools: %s", text)


CONST_DEDUP_THRESHOLD = 0  # share identical constants of every size (coremltools' default: 100+ elements only)


def pass_pipeline() -> Any:
    """coremltools' default passes, with ``common::const_deduplication`` extended to small constants.

    Every reshape carries its shape vector and every quantize / dequantize its own scalar scale, zero point and
    dtype constants, each a named ``const`` op in the program; sharing identical ones shrinks the program
    without touching the maths (bundled denoiser, measured: fp32 package 11.20 -> 10.92 MB, W8A8
    4.23 -> 3.74 MB, outputs bit-identical in coreml-sim). Note: coremltools keeps this option in a class
    attribute, so it is set on every call.
    """
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.set_options("common::const_deduplication", {"const_threshold": CONST_DEDUP_THRESHOLD})
    return pipeline


def convert_validated_once(program: Any, **kwargs: Any) -> Any:
    """``ct.convert(program, **kwargs)`` with the program's structural validation run once, on the result.

    coremltools validates the whole program after each of its ~100 MIL passes (``Program.validate``: every var
    visible where used, every producer / consumer count consistent); on the bundled pipeline that was ~45 % of a
    conversion (cProfile: 81 of 176 s for W8A8). Here the passes run without it and the converted program gets the
    same checks once: what is written is validated, and the package is the same (the checks change nothing).
    """
    import coremltools as ct
    from coremltools.converters.mil.mil.program import Program

    stock = Program.validate
    Program.validate = _no_validation  # type: ignore[method-assign]
    try:
        ml = ct.convert(program, **kwargs)
    finally:
        Program.validate = stock  # type: ignore[method-assign]
    mil = getattr(ml, "_mil_program", None)
    if mil is not None:
        stock(mil)
    return ml


def _no_validation(self: Any, check_essential_scope: bool = False) -> None:
    del self, check_essential_scope


def _convert(ep: torch.export.ExportedProgram, spec: GraphSpec, precision: Any, progress: bool) -> Any:
    import coremltools as ct
    import numpy as np

    try:
        with _quiet(progress):
            return convert_validated_once(
                ep,
                convert_to="mlprogram",
                minimum_deployment_target=ct.target.iOS17,
                inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=np.float32) for s in spec.inputs],
                outputs=[ct.TensorType(name=s.name, dtype=np.float32) for s in spec.outputs],
                compute_precision=precision,
                pass_pipeline=pass_pipeline(),
                skip_model_load=True,
            )
    except Exception as e:  # converter errors have no common base class
        raise ExportError(f"coremltools could not convert the {spec.name} graph: {e}") from e


def _census(mlmodel: Any) -> dict[str, Any]:
    """Count the program's compute ops by output precision (consts and casts apart), with op types."""
    from coremltools.converters.mil.mil import types

    counts = {"fp16": 0, "fp32": 0, "cast": 0, "other": 0}
    by_type: dict[str, dict[str, int]] = {"fp16": {}, "fp32": {}}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "const":
            continue
        if op.op_type == "cast":
            counts["cast"] += 1
            continue
        dtypes = {types.builtin_to_string(o.dtype) for o in op.outputs}
        kind = "fp16" if "fp16" in dtypes else "fp32" if "fp32" in dtypes else "other"
        counts[kind] += 1
        if kind != "other":
            by_type[kind][op.op_type] = by_type[kind].get(op.op_type, 0) + 1
    return {
        "ops": counts,
        "fp16_op_types": dict(sorted(by_type["fp16"].items(), key=lambda kv: -kv[1])),
        "fp32_op_types": dict(sorted(by_type["fp32"].items(), key=lambda kv: -kv[1])),
    }


def _describe(mlmodel: Any, spec: GraphSpec, precision: str, meta: Mapping[str, Any]) -> None:
    """Input/output descriptions, author/license/version and ``tadsr.*`` user metadata, in place."""
    for s in (*spec.inputs, *spec.outputs):
        rng = f", range [{s.value_range[0]:g}, {s.value_range[1]:g}]" if s.value_range else ""
        text = f"{s.description or s.name} ({'x'.join(map(str, s.shape))} {s.dtype}{rng})"
        if s in spec.inputs:
            mlmodel.input_description[s.name] = text
        else:
            mlmodel.output_description[s.name] = text
    version = tool_version("tadsr") or "unknown"
    mlmodel.author = str(meta.get("author", "tadsr-mobile"))
    mlmodel.license = str(meta.get("license", DEFAULT_LICENSE))
    mlmodel.version = str(meta.get("version", version))
    mlmodel.short_description = (
        f"TAD-SR x{spec.scale} {spec.name} graph, LR tile {spec.tile}, {precision} (tadsr-mobile {version})"
    )
    user = {"graph": spec.name, "tile": spec.tile, "scale": spec.scale, "precision": precision}
    user.update({f"schedule.{k}": v for k, v in spec.constants.items()})
    user.update({k: v for k, v in meta.items() if k not in ("author", "license", "version")})
    for k, v in user.items():
        mlmodel.user_defined_metadata[f"tadsr.{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)


# coremltools writes this beside Data/ for programs converted from torch.export: a map from ExecuTorch debug
# handles to MIL ops, for ExecuTorch's Core ML delegate tooling. It is not in the package's Manifest.json, Core ML
# never reads it, and it weighs 1-2 MB on the bundled model (5-20 % of the package), so shipped files leave it out.
DEBUG_FILES = ("executorch_debug_handle_mapping.json",)


def save_package(mlmodel: Any, path: Path) -> None:
    """``mlmodel.save(path)`` without the ExecuTorch debug map (:data:`DEBUG_FILES`)."""
    mlmodel.save(str(path))
    for name in DEBUG_FILES:
        (Path(path) / name).unlink(missing_ok=True)


def _save_atomic(mlmodel: Any, final: Path) -> None:
    tmp = fileio.temp_name(final, ".tmp.mlpackage")
    try:
        save_package(mlmodel, tmp)
        fileio.replace_folder(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def validate_package(path: Path, spec: GraphSpec) -> dict[str, Any]:
    """Reload the saved package's spec (no compilation) and check I/O names, shapes and float32 dtypes.

    Returns:
        ``{"inputs": [...], "outputs": [...], "metadata": {...}}`` as read back.

    Raises:
        ExportError: the package does not load or its interface differs from ``spec``.
    """
    import coremltools as ct

    try:
        m = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:  # protobuf / file errors
        raise ExportError(f"{path} does not load back: {e}") from e
    desc = m.get_spec().description
    fp32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    read = {}
    for kind, feats, want in (("inputs", desc.input, spec.inputs), ("outputs", desc.output, spec.outputs)):
        got = [(f.name, tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in feats]
        exp = [(s.name, tuple(s.shape), fp32) for s in want]
        if got != exp:
            raise ExportError(f"{path} {kind} are {got}, expected {exp} (name, shape, dtype)")
        read[kind] = [{"name": n, "shape": list(sh)} for n, sh, _ in got]
    read["metadata"] = dict(desc.metadata.userDefined)
    return read


# --------------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------------
def _calib(spec: GraphSpec, calib_inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    if calib_inputs is None:
        return [spec.example_inputs(seed) for seed in (0, 1)]
    out = []
    for item in calib_inputs:
        if isinstance(item, Mapping):
            item = tuple(item[s.name] for s in spec.inputs)
        ts = tuple(torch.as_tensor(x, dtype=torch.float32) for x in item)
        if [tuple(t.shape) for t in ts] != [s.shape for s in spec.inputs]:
            raise ConfigError(f"calibration input shapes {[tuple(t.shape) for t in ts]} do not match the spec "
                              f"{[s.shape for s in spec.inputs]}")  # fmt: skip
        out.append(ts)
    if not out:
        raise ConfigError("calib_inputs is empty; pass None for seeded example inputs")
    return out


def export_coreml(
    graph: nn.Module,
    spec: GraphSpec,
    out_dir: Path,
    *,
    precision: str = "fp32",
    fp16_keep_fp32: Sequence[str] | None = None,
    calib_inputs: Any = None,
    rel_tol: float = DEFAULT_REL_TOL,
    headroom: float = DEFAULT_HEADROOM,
    progress: bool = False,
    metadata: Mapping[str, Any] | None = None,
    **opts: Any,
) -> BackendResult:
    """Convert ``graph`` to ``out_dir/<spec.name>.mlpackage`` (ML program, iOS 17, static shapes).

    Args:
        graph: an export-ready graph from :func:`tadsr.formats.graphs.make_graphs` (eval, no grad; not changed).
        spec: its :class:`GraphSpec`: input/output names and shapes (float32 I/O at any precision).
        out_dir: existing folder to write into.
        precision: ``"fp32"`` or ``"fp16"`` (mixed: measured layers kept fp32, see the module docstring).
        fp16_keep_fp32: extra forced-fp32 patterns for fp16 (module path globs, module class names, ATen ops).
        calib_inputs: fp16 calibration inputs: tuples in spec order or dicts name -> array (default: the
            spec's seeded example inputs 0 and 1).
        rel_tol, headroom: fp16 decision thresholds (:func:`plan_fp16`).
        progress: show coremltools' progress bars.
        metadata: extra ``tadsr.*`` user metadata (e.g. preset, sources); ``author``/``license``/``version``
            override the package fields.
        **opts: other backends' options; ignored with a DEBUG line.

    Returns:
        ``BackendResult(files=["<graph>.mlpackage"], format="coreml", precision, info)``; ``info`` has
        ``rewrites``, ``seconds``, ``bytes``, ``census`` (fp16/fp32 op counts) and, for fp16, ``fp16`` (policy,
        kept layers with reasons, measured ranges).

    Raises:
        ConfigError: bad precision or calibration inputs.
        ExportError: export, conversion, saving or the reload check failed.
    """
    import coremltools as ct

    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"Core ML precision must be 'fp32' or 'fp16', got {precision!r}")
    if opts:
        logger.debug("export_coreml ignores options %s", sorted(opts))
    out_dir, times, info = Path(out_dir), {}, {}
    calib = _calib(spec, calib_inputs) if precision == "fp16" else []
    t0 = time.perf_counter()
    ep, info["rewrites"] = exported_program(graph, spec)
    times["torch_export"] = time.perf_counter() - t0
    warnings: list[str] = []
    if precision == "fp32":
        compute = ct.precision.FLOAT32
    else:
        t0 = time.perf_counter()
        stats = measure_fp16(ep, calib)
        plan = plan_fp16(ep, stats, keep_fp32=list(fp16_keep_fp32 or ()), rel_tol=rel_tol, headroom=headroom)
        names = [n.name for n in ep.graph.nodes if n.op == "call_function"]
        compute = ct.transform.FP16ComputePrecision(op_selector=_op_selector(plan, names))
        info["fp16"] = _plan_info(plan)
        times["fp16_measure"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mlmodel = _convert(ep, spec, compute, progress)
    times["convert"] = time.perf_counter() - t0
    info["census"] = _census(mlmodel)
    _describe(mlmodel, spec, precision, dict(metadata or {}))
    name = f"{spec.name}.mlpackage"
    t0 = time.perf_counter()
    _save_atomic(mlmodel, out_dir / name)
    validate_package(out_dir / name, spec)
    times["save"] = time.perf_counter() - t0
    info["bytes"] = sum(p.stat().st_size for p in (out_dir / name).rglob("*") if p.is_file())
    info["seconds"] = {k: round(v, 2) for k, v in times.items()}
    info["minimum_deployment_target"] = "iOS17"
    if precision == "fp16" and info["fp16"]["kept_layers"]:
        n = len(info["fp16"]["kept_layers"])
        warnings.append(f"{n} layer(s) kept in fp32 (see backend_info.fp16.kept_layers)")
    c = info["census"]["ops"]
    logger.info("coreml %s %s: %d fp16 / %d fp32 ops, %.1f MB, converted in %.1fs", spec.name, precision,
                c["fp16"], c["fp32"], info["bytes"] / 1e6, times["convert"])  # fmt: skip
    return BackendResult(files=[name], format="coreml", precision=precision, info=info, warnings=warnings)


def _plan_info(plan: Fp16Plan, top: int = 25) -> dict[str, Any]:
    """JSON-able summary: kept layers with reasons, and the measured ranges (kept + the ``top`` largest)."""
    ranked = sorted(plan.layers.items(), key=lambda kv: -kv[1].get("max_abs", 0.0))
    shown = {k for k, _ in ranked[:top]} | set(plan.kept_layers)
    return {
        "policy": plan.policy,
        "kept_layers": dict(plan.kept_layers),
        "n_kept_ops": len(plan.kept_ops),
        "kept_ops": sorted(plan.kept_ops),
        "kept_op_types": sorted(plan.kept_op_types),
        "n_layers": len(plan.layers),
        "ranges": {k: _round(v) for k, v in plan.layers.items() if k in shown},
        "max_abs": _round({"v": max((v.get("max_abs", 0.0) for v in plan.layers.values()), default=0.0)})["v"],
    }


def _round(rec: Mapping[str, Any]) -> dict[str, Any]:
    """4 significant digits; non-finite numbers as strings (manifests are strict JSON)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, float):
            v = float(f"{v:.4g}") if math.isfinite(v) else str(v)
        out[k] = v
    return out

"""ExecuTorch export: ``torch.export`` -> mobile rewrites -> edge dialect lowered to a delegate -> ``.pte``.

Pipeline::

    apply_rewrites(graph, example, backend)      # tadsr.formats.rewrites: baked attention, folded ResBlock
                                                 # constants, decomposed GroupNorm, transposed-conv upsampling
    torch.export.export(rewritten, example)      # static shapes, spec input order
    to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])   # or CoreMLPartitioner
    .to_executorch().buffer  ->  <out_dir>/<graph>.pte   (written to a temp name, then renamed)

With the rewrites, the whole UNet is one XNNPACK partition (upstream-shaped graphs split into 100+: GroupNorm,
``select`` on the qkv tensor, 4-D matmul, ``repeat`` of the mask, nearest upsampling are not delegated). The
VQ codebook lookup of the decoder (``argmin`` + ``embedding``, int64) has no XNNPACK kernel and runs in the
portable kernels between two partitions. ``BackendResult.info`` records the partition count, the ops left
outside the delegates (name -> count) and the delegated op count, so a regression shows in the manifest.

Only fp32 is exported for XNNPACK: XNNPACK's fp16 path has no GELU and would split the graph at every MLP.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tadsr import fileio
from tadsr.errors import ConfigError, ExportError
from tadsr.formats.artifact import BackendResult
from tadsr.formats.executorch.passes import lean_xnnpack_passes
from tadsr.formats.graphs import GraphSpec
from tadsr.formats.rewrites import apply_rewrites

__all__ = ["export_executorch", "partition_info", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("xnnpack", "coreml")
_PRECISIONS = {"xnnpack": ("fp32",), "coreml": ("fp32", "fp16")}


def _partitioner(backend: str, precision: str) -> Any:
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return XnnpackPartitioner()
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as e:
        raise ExportError(f"the ExecuTorch Core ML delegate is not importable here ({e}); use backend='xnnpack'") from e
    specs = CoreMLBackend.generate_compile_specs(
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS17,
    )
    return CoreMLPartitioner(compile_specs=specs)


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.removeprefix("aten.")


def partition_info(edge: Any) -> dict[str, Any]:
    """Delegation facts of a lowered ``EdgeProgramManager``.

    Returns:
        ``partitions`` (delegate calls in the top graph), ``delegated_ops`` (ops inside all delegates),
        ``delegated_ops_per_partition`` (list), ``ops_outside`` (op name -> count, most frequent first,
        ``getitem`` excluded) and ``n_ops_outside``.
    """
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    gm = edge.exported_program().graph_module
    outside: Counter[str] = Counter()
    n_calls = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if _op_name(node.target) == "executorch_call_delegate":
            n_calls += 1
        else:
            outside[_op_name(node.target)] += 1
    per_partition = []
    for _, mod in gm.named_children():
        if isinstance(mod, LoweredBackendModule):
            g = mod.original_module.graph
            per_partition.append(
                sum(1 for n in g.nodes if n.op == "call_function" and n.target is not operator.getitem)
            )
    return {
        "partitions": n_calls,
        "delegated_ops": sum(per_partition),
        "delegated_ops_per_partition": per_partition,
        "ops_outside": dict(outside.most_common()),
        "n_ops_outside": sum(outside.values()),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    fileio.write_bytes(path, data)


def export_executorch(
    graph: nn.Module,
    spec: GraphSpec,
    out_dir: Path,
    *,
    precision: str = "fp32",
    backend: str = "xnnpack",
    progress: bool = False,
    rewrites: str | tuple[str, ...] | None = None,
    metadata: Mapping[str, Any] | None = None,
    **opts: Any,
) -> BackendResult:
    """Export ``graph`` to ``out_dir/<spec.name>.pte`` lowered to XNNPACK (or the Core ML delegate).

    Args:
        graph: an export-ready graph from :func:`tadsr.formats.graphs.make_graphs` (eval, no grad; not changed).
        spec: its :class:`GraphSpec`; the program's inputs follow ``spec.inputs`` (float32, fixed shapes).
        out_dir: existing folder to write into.
        precision: ``"fp32"`` (XNNPACK); ``"fp32"`` or ``"fp16"`` compute precision for ``backend="coreml"``.
        backend: ``"xnnpack"`` or ``"coreml"`` (ExecuTorch's Core ML delegate, if importable).
        progress: unused (no loop worth a bar); accepted for the common backend signature.
        rewrites: rewrite set or names (:data:`tadsr.formats.rewrites.BACKEND_REWRITES`); default: the backend's.
        metadata: accepted for the common signature; a .pte has no free-form metadata (the manifest keeps it).
        **opts: other backends' options; ignored with a DEBUG line.

    Returns:
        ``BackendResult(files=["<graph>.pte"], format="executorch", precision, info)``; ``info`` holds
        ``backend``, ``partitions``, ``delegated_ops``, ``ops_outside``, ``rewrites``, ``rewrite_max_abs`` (rewritten
        vs original torch graph on the example input) and per-step seconds.

    Raises:
        ConfigError: unknown backend or precision not available on it.
        ExportError: ``torch.export``, lowering or serialisation failed (the message names the step).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown ExecuTorch backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in _PRECISIONS[backend]:
        raise ConfigError(
            f"ExecuTorch/{backend} exports {', '.join(_PRECISIONS[backend])}, not {precision!r}"
            + (
                " (XNNPACK's fp16 path has no GELU); use --format coreml or onnx for fp16"
                if backend == "xnnpack"
                else ""
            )
        )
    if opts:
        logger.debug("export_executorch ignores options %s", sorted(opts))
    del progress, metadata
    out_dir = Path(out_dir)
    example = spec.example_inputs()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    rewritten, report = apply_rewrites(graph, example, rewrites or ("xnnpack" if backend == "xnnpack" else "coreml"))
    with torch.no_grad():
        ref, got = graph(*example), rewritten(*example)
    rewrite_err = float((ref - got).abs().max())
    times["rewrite"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        ep = torch.export.export(rewritten, example, strict=False)
    except Exception as e:  # torch.export raises many unrelated types; all mean "not exportable"
        raise ExportError(f"torch.export of the {spec.name} graph failed: {e}") from e
    times["torch_export"] = time.perf_counter() - t0

    from executorch.exir import to_edge_transform_and_lower

    t0 = time.perf_counter()
    try:
        with lean_xnnpack_passes():
            edge = to_edge_transform_and_lower(ep, partitioner=[_partitioner(backend, precision)])
    except (ConfigError, ExportError):
        raise
    except Exception as e:  # exir/partitioner/preprocess errors have no common base
        raise ExportError(f"lowering the {spec.name} graph to ExecuTorch/{backend} failed: {e}") from e
    times["lower"] = time.perf_counter() - t0
    info = partition_info(edge)

    t0 = time.perf_counter()
    try:
        buffer = edge.to_executorch().buffer
    except Exception as e:  # emitter / memory planning errors
        raise ExportError(f"serialising the {spec.name} ExecuTorch program failed: {e}") from e
    name = f"{spec.name}.pte"
    _write_atomic(out_dir / name, buffer)
    times["serialize"] = time.perf_counter() - t0

    warnings = []
    if info["n_ops_outside"]:
        ops = ", ".join(f"{k} x{v}" for k, v in info["ops_outside"].items())
        warnings.append(f"{info['n_ops_outside']} ops run outside the {backend} delegate (portable kernels): {ops}")
    info.update(
        backend=backend,
        rewrites=report.to_dict(),
        rewrite_max_abs=rewrite_err,
        bytes=len(buffer),
        seconds={k: round(v, 2) for k, v in times.items()},
    )
    logger.info(
        "executorch/%s %s: %d partition(s), %d ops delegated, %d outside, %.1f MB, lowered in %.1fs",
        backend, spec.name, info["partitions"], info["delegated_ops"], info["n_ops_outside"], len(buffer) / 1e6,
        times["lower"],
    )  # fmt: skip
    return BackendResult(files=[name], format="executorch", precision=precision, info=info, warnings=warnings)

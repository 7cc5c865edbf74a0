"""ONNX export of one graph: torch.export -> ONNX (dynamo exporter) -> check -> onnxsim -> metadata -> one file.

Steps of :func:`export_onnx`, each recorded in ``BackendResult.info``:

1. ``torch.export.export(graph, spec.example_inputs(), strict=False)`` with the spec's static shapes, then
   ``torch.onnx.export(program, dynamo=True, opset_version=opset)`` with the spec's input and output names and
   the exporter's own onnxscript optimizer (constant folding, dead code removal, rewrites; ``optimize``), less
   the rewrite rules of ``SKIPPED_REWRITE_RULES`` (the same bytes on our graphs, half the export time).
2. ``onnx.checker.check_model(full_check=True)`` (structure plus strict shape inference).
3. onnxsim. It is kept only if onnxsim succeeds *and* ONNX Runtime gives the same outputs for the simplified
   and the plain model on ``spec.example_inputs()`` (max abs difference <= ``SIMPLIFY_ATOL``); otherwise the
   plain model is kept and ``info["simplified"]`` is False with the reason in ``info["simplify_note"]`` and a
   warning.
4. :func:`unshare_initializers`: the exporter lets identical constants (GroupNorm's folded scale/bias, reshape
   shapes) be read by many nodes; ORT's ``quantize_static`` rejects shared weights, so each consumer gets its
   own copy (a few hundred bytes here).
5. fp16 (optional): ``onnxruntime.transformers.float16`` converts weights and activations, keeping float32 graph
   inputs and outputs (``keep_io_types``) so that runners and parity see the same interface.
6. ``metadata_props``: graph, tile, scale, schedule constants, precision, tool versions, plus whatever the caller
   passes as ``metadata`` (``tadsr.export.api`` adds the preset and the source checkpoints' sha256).

The file is ``<graph>.onnx``, self-contained, when its weights are at most ``EXTERNAL_DATA_THRESHOLD`` (64 MiB:
tiny and bundled graphs). Larger models (official size) keep their weights in ``<graph>.onnx.data`` beside it:
ONNX Runtime then holds one copy of the weights instead of two (measured on the official fp32 pipeline, 668 MB,
one thread, ``--low-memory``: RSS after loading 1.39 -> 0.83 GiB, peak over a tile 2.10 -> 1.60 GiB, load time
4.7 -> 1.3 s). Above 2 GB (protobuf's limit) onnxsim is skipped (it cannot load such models).
"""

from __future__ import annotations

import contextlib
import heapq
import io
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_model
from torch import nn

from tadsr.errors import ConfigError, ExportError
from tadsr.formats.artifact import BackendResult, tool_versions
from tadsr.formats.graphs import GraphSpec

__all__ = [
    "EXTERNAL_DATA_THRESHOLD", "MIN_OPSET", "PROTOBUF_LIMIT", "SIMPLIFY_ATOL", "export_onnx", "save_model",
    "unshare_initializers",
]  # fmt: skip

logger = logging.getLogger(__name__)

MIN_OPSET = 18
SIMPLIFY_ATOL = 1e-5
PROTOBUF_LIMIT = 2**31 - 1
# weights above this go to ``<graph>.onnx.data`` (see the module docstring for the measured memory saving)
EXTERNAL_DATA_THRESHOLD = 64 * 2**20
PRECISIONS = ("fp32", "fp16")


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give every consumer of a shared initializer its own copy, in place.

    An initializer read by several node inputs (in the top-level graph) keeps its name for the first reader;
    every further reader gets a copy named ``<name>__u<k>``. Initializers referenced from subgraphs or used
    as graph outputs are left alone.

    Args:
        model: the model to edit.

    Returns:
        The number of copies added.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    untouchable = {o.name for o in graph.output}
    subgraph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in subgraph_types else []:
                untouchable |= {i for n in sub.node for i in n.input}
    seen: Counter[str] = Counter()
    taken = set(inits) | {v for n in graph.node for v in (*n.input, *n.output)}
    added = 0
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name not in inits or name in untouchable:
                continue
            seen[name] += 1
            if seen[name] == 1:
                continue
            k = seen[name] - 1
            new = f"{name}__u{k}"
            while new in taken:
                k += 1
                new = f"{name}__u{k}"
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = new
            graph.initializer.append(copy)
            node.input[slot] = new
            taken.add(new)
            added += 1
    return added


def _ort_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


# exporter loggers that narrate every pass at INFO (and warn that torchvision is absent): quiet unless DEBUG
_CHATTY = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
           "torch.onnx._internal.exporter._registration": logging.ERROR}  # fmt: skip


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    saved = {name: logging.getLogger(name).level for name in _CHATTY}
    try:
        for name, level in _CHATTY.items():
            logging.getLogger(name).setLevel(level)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# onnxscript rewrite rules left out of the exporter's optimizer. SlicesSplit (Slice pairs -> one Split) matches a
# two-output pattern by trying every pair of Slice nodes of the graph, for every node: on the tiny denoiser it took
# 16 s a pass, about half of torch.onnx.export, and never fired. Session 18 checked that the optimized model is
# byte for byte the same without it for every tiny, light, colour-fix and bundled graph; a graph where it would
# fire keeps its Slices (the same numbers, one op more).
SKIPPED_REWRITE_RULES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _rewrite_rules_without(names: frozenset[str]) -> Iterator[None]:
    """onnxscript's default rewrite rules (what ``ONNXProgram.optimize`` applies) without the rules ``names``."""
    from onnxscript import rewriter

    saved = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if saved is None:  # another onnxscript layout: its own optimizer, unchanged
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if getattr(r, "name", None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _to_onnx(graph: nn.Module, spec: GraphSpec, opset: int, optimize: bool) -> onnx.ModelProto:
    """torch.export + dynamo ONNX exporter; the exporter's stdout chatter goes to DEBUG."""
    args = spec.example_inputs()
    buf = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(buf), _quiet_exporter_logs():
            program = torch.export.export(graph, args, strict=False)
            onnx_program = torch.onnx.export(
                program,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=[s.name for s in spec.inputs],
                output_names=[s.name for s in spec.outputs],
                optimize=False,
                verbose=False,
            )
            if optimize:
                with _rewrite_rules_without(SKIPPED_REWRITE_RULES):
                    onnx_program.optimize()  # what optimize=True runs, less the skipped rules
    except Exception as e:  # the exporters raise many unrelated types; name the step and keep the cause
        raise ExportError(f"ONNX export of graph {spec.name!r} failed in torch.export / torch.onnx.export: {e}") from e
    finally:
        for line in buf.getvalue().splitlines():
            logger.debug("%s", line)
    assert onnx_program is not None
    return onnx_program.model_proto


def _check_io(model: onnx.ModelProto, spec: GraphSpec) -> None:
    got_in = [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in model.graph.input]
    got_out = [(o.name, tuple(d.dim_value for d in o.type.tensor_type.shape.dim)) for o in model.graph.output]
    want_in = [(s.name, tuple(s.shape)) for s in spec.inputs]
    want_out = [(s.name, tuple(s.shape)) for s in spec.outputs]
    if got_in != want_in or got_out != want_out:
        raise ExportError(
            f"exported ONNX interface {got_in} -> {got_out} differs from the graph spec {want_in} -> {want_out}"
        )


def _simplify(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, bool, str]:
    """onnxsim, kept only when ORT outputs agree with the plain model's. Returns (model, simplified, note)."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model, check_n=0)
    except Exception as e:  # onnxsim raises RuntimeError / onnx errors / its own; any of them means "keep plain"
        return model, False, f"onnxsim failed ({type(e).__name__}: {str(e)[:300]})"
    if not ok:
        return model, False, "onnxsim reported that its result could not be validated"
    plain_out = _ort_outputs(model, feeds)
    simp_out = _ort_outputs(simplified, feeds)
    worst = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(plain_out, simp_out, strict=True))
    if not worst <= SIMPLIFY_ATOL:
        return model, False, f"onnxsim changed outputs (max abs {worst:.3g} > {SIMPLIFY_ATOL:g}); kept the plain model"
    n0, n1 = len(model.graph.node), len(simplified.graph.node)
    return simplified, True, f"onnxsim: {n0} -> {n1} nodes, outputs agree to {worst:.3g} max abs"


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, float32 graph I/O (ORT's converter; its appended Casts are re-sorted)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _toposort(half.graph)
    return half


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically in place (Kahn; stable for already-sorted parts)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    waiting: dict[int, set[str]] = {}
    users: dict[str, list[int]] = {}
    for k, n in enumerate(graph.node):
        need = {i for i in n.input if i not in available and i in producer}
        waiting[k] = need
        for i in need:
            users.setdefault(i, []).append(k)
    ready = [k for k, need in waiting.items() if not need]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for o in graph.node[k].output:
            for u in users.get(o, []):
                waiting[u].discard(o)
                if not waiting[u]:
                    heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        raise ExportError("fp16 conversion produced a graph with a cycle")
    nodes = [graph.node[k] for k in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _set_metadata(model: onnx.ModelProto, spec: GraphSpec, precision: str, extra: Mapping[str, Any]) -> dict[str, str]:
    props: dict[str, str] = {
        "tadsr.graph": spec.name,
        "tadsr.tile": str(spec.tile),
        "tadsr.scale": str(spec.scale),
        "tadsr.precision": precision,
        "tadsr.constants": json.dumps(spec.constants, sort_keys=True),
        "tadsr.inputs": json.dumps([[s.name, list(s.shape), s.dtype, s.value_range] for s in spec.inputs]),
        "tadsr.outputs": json.dumps([[s.name, list(s.shape), s.dtype, s.value_range] for s in spec.outputs]),
        "tadsr.tool_versions": json.dumps(tool_versions(), sort_keys=True),
    }
    for k, v in extra.items():
        key = k if k.startswith("tadsr.") else f"tadsr.{k}"
        props[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "tadsr-mobile"
    model.doc_string = f"TAD-SR {spec.name} graph, LR tile {spec.tile}, x{spec.scale}, {precision}"
    return props


def save_model(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Write ``path``, with the weights in ``<name>.data`` beside it when they exceed ``threshold`` bytes (or 2 GB).

    Pass ``threshold=PROTOBUF_LIMIT`` for a single file unless protobuf's 2 GB limit forces external data.
    ``model`` is left whole (onnx empties its tensors when it writes them to a data file; they are read back).

    Returns the file names written (``[name]`` or ``[name, name.data]``). The data file gets the same
    permissions as the model file (onnx creates it 0600).
    """
    path = Path(path)
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file; a stale one beside an inline model misleads
    if _too_big(model) or _initializer_bytes(model) > threshold:
        # tensors under 1 KB (shapes, scalars) stay inline: ORT's shape inference reads them from the graph
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)  # fmt: skip
        if not data.exists():
            return [path.name]
        os.chmod(data, stat.S_IMODE(path.stat().st_mode))
        # onnx moved the tensors out of ``model`` (raw_data cleared): read them back so the caller's model is whole
        load_external_data_for_model(model, str(path.parent))
        return [path.name, data.name]
    onnx.save_model(model, path)
    return [path.name]


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def _too_big(model: onnx.ModelProto) -> bool:
    return _initializer_bytes(model) > PROTOBUF_LIMIT - (1 << 24)  # leave 16 MB for the graph itself


def export_onnx(
    graph: nn.Module,
    spec: GraphSpec,
    out_dir: Path,
    *,
    precision: str = "fp32",
    progress: bool = False,
    opset: int = MIN_OPSET,
    simplify: bool = True,
    optimize: bool = True,
    metadata: Mapping[str, Any] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    **opts: Any,
) -> BackendResult:
    """Export ``graph`` to ``out_dir/<spec.name>.onnx`` with static shapes and the spec's I/O names.

    Args:
        graph: an export-ready graph from :func:`tadsr.formats.graphs.make_graphs` (eval, no grad).
        spec: its :class:`GraphSpec`; inputs (float32, fixed shapes) and outputs keep the spec's names.
        out_dir: existing folder to write into.
        precision: ``"fp32"``, or ``"fp16"`` (weights and activations; float32 I/O kept).
        progress: unused (no loop worth a bar); accepted for the common backend signature.
        opset: ONNX opset, at least 18.
        simplify: run onnxsim (kept only if it keeps the outputs, see module doc).
        optimize: run the exporter's onnxscript optimizer (constant folding, pattern rewrites; about a third
            of the export time). Without it onnxsim still folds constants; ORT optimizes at load either way.
        metadata: extra ``metadata_props`` (keys get a ``tadsr.`` prefix; non-strings are JSON-encoded).
        external_data_threshold: weight bytes above which weights go to ``<graph>.onnx.data`` (default
            ``EXTERNAL_DATA_THRESHOLD``; 2 GB always does).
        **opts: other backends' options; unknown ones are ignored with a DEBUG line.

    Returns:
        The :class:`BackendResult` (files, opset, node counts, simplification outcome, warnings).

    Raises:
        ConfigError: unsupported precision or opset.
        ExportError: the exporter or the ONNX checker failed, or the exported interface differs from the spec.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"ONNX export supports precision {', '.join(PRECISIONS)}, got {precision!r} "
                          "(INT8 is made from the fp32 artifact by the quantize stage)")  # fmt: skip
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    if opts:
        logger.debug("export_onnx ignores options %s", sorted(opts))
    out_dir = Path(out_dir)
    warnings: list[str] = []
    t0 = time.perf_counter()
    model = _to_onnx(graph, spec, opset, optimize)
    t_export = time.perf_counter() - t0
    _check_io(model, spec)
    info: dict[str, Any] = {"opset": opset, "ir_version": int(model.ir_version), "exporter": "torch.onnx dynamo",
                            "exporter_optimizer": optimize}  # fmt: skip
    info["nodes_exported"] = len(model.graph.node)
    feeds = {s.name: x.numpy() for s, x in zip(spec.inputs, spec.example_inputs(), strict=True)}
    big = _too_big(model)
    if simplify and big:
        note, simplified = "skipped: model above 2 GB (onnxsim cannot load external data)", False
    elif simplify:
        t1 = time.perf_counter()
        model, simplified, note = _simplify(model, feeds)
        info["simplify_s"] = round(time.perf_counter() - t1, 3)
    else:
        note, simplified = "disabled (simplify=False)", False
    info.update(simplified=simplified, simplify_note=note)
    if simplify and not simplified:
        warnings.append(f"{spec.name}: ONNX not simplified: {note}")
    if precision == "fp16":
        model = _to_fp16(model)
    info["unshared_initializers"] = unshare_initializers(model)
    info["nodes"] = len(model.graph.node)
    info["initializers"] = len(model.graph.initializer)
    info["op_types"] = dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
    info["metadata_props"] = _set_metadata(model, spec, precision, metadata or {})
    try:
        onnx.checker.check_model(model, full_check=not big)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"ONNX checker rejected the {spec.name} model: {e}") from e
    path = out_dir / f"{spec.name}.onnx"
    files = save_model(model, path, external_data_threshold)
    external = len(files) > 1
    if external:
        onnx.checker.check_model(str(path))
    info["external_data"] = external
    info["export_s"] = round(t_export, 3)
    for w in warnings:
        logger.warning("%s", w)
    logger.info("onnx %s: %d nodes, opset %d, %s, %.1fs", spec.name, info["nodes"], opset,
                "simplified" if simplified else "not simplified", time.perf_counter() - t0)  # fmt: skip
    return BackendResult(files=files, format="onnx", precision=precision, info=info, warnings=warnings)

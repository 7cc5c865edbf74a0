"""``export_model``: graphs -> backend files -> parity -> self-describing artifact folders, atomically.

For every requested graph, format and precision::

    make_graphs(models, tile)                        # export-ready torch graphs + GraphSpecs
    reference_runs(models, tile)                     # reference pipeline stages on real LR patches (once)
    make_cases(models, spec, runs)                   # seeded + real-patch inputs, reference outputs
    hop 1: reference torch -> export-ready torch     # once per graph
    staged folder <out>/.<name>.tmp-XXXX:
        get_format(format).hook("export")(graph, spec, stage, precision=...)   # BackendResult
        manifest.json (files + sha256, spec, preset, sources, tool versions)
        load_runner(stage) -> hops 2 and 3           # export-ready torch -> runtime, reference -> runtime
        manifest.json again, with the parity results
    rename to <out>/<graph>-<format>-<precision>-t<tile>  (only if parity passed, or parity_gate=False)

Everything that can be checked without work is checked first: formats, precisions, graph names, tile, that
each requested backend module exists, and that the output folder can be written.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tadsr.config import Preset
from tadsr.errors import ConfigError, ExportError, InputError
from tadsr.formats.artifact import (
    PRECISIONS,
    BackendResult,
    artifact_name,
    build_manifest,
    staged_artifact,
    write_manifest,
)
from tadsr.formats.fx_meta import shared_node_sources
from tadsr.formats.graphs import COMPONENTS, GRAPH_NAMES, check_tile, make_graphs
from tadsr.formats.registry import FORMAT_NAMES, get_format
from tadsr.parity.hops import (
    HOP_REFERENCE,
    light_hop,
    ParityCase,
    ParityReport,
    ReferenceRuns,
    VQCompare,
    compare,
    end_to_end_hop,
    load_floors,
    make_cases,
    reference_runs,
    reference_view,
    run_cases,
    run_cases_vq,
    runtime_hop,
    vq_judge,
)
from tadsr.parity.taps import run_cases_viewed
from tadsr.pipeline import Models
from tadsr.runtime.runner import load_runner
from tadsr.formats.torch_ref import TorchRunner

__all__ = ["ExportResult", "ExportRequest", "export_model", "check_request", "resolve_graphs", "get_exporter"]

logger = logging.getLogger(__name__)

Exporter = Callable[..., BackendResult]


@dataclass
class ExportResult:
    """One artifact written (or, with ``parity_gate=False``, written with a recorded parity failure).

    Attributes:
        path: the artifact folder.
        graph, format, precision, tile: what it holds.
        files: model file paths inside ``path``.
        bytes: total size of the model files.
        parity: the hop results (reference -> export-ready torch -> runtime, and reference -> runtime).
        passed: all hops within their floors.
        backend: the backend exporter's result (info, warnings).
        manifest: the manifest as written.
        timings: seconds spent per step (``export``, ``parity``, ``total``).
    """

    path: Path
    graph: str
    format: str
    precision: str
    tile: int
    files: list[Path]
    bytes: int
    parity: ParityReport
    passed: bool
    backend: BackendResult
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def get_exporter(fmt: str) -> Exporter:
    """The format's exporter (its registry ``export`` hook), imported on demand.

    Raises:
        ConfigError: unknown format.
        ExportError: the backend module is not part of this installation or lacks the function.
    """
    return get_format(fmt).hook("export")


def resolve_graphs(graphs: Sequence[str]) -> list[str]:
    """Expand ``"components"`` to encoder, denoiser, decoder; drop duplicates, keep order.

    Raises:
        ConfigError: an unknown graph name.
    """
    if isinstance(graphs, str):
        graphs = (graphs,)
    out: list[str] = []
    for g in graphs:
        names = COMPONENTS if g == "components" else (g,)
        for n in names:
            if n not in GRAPH_NAMES:
                raise ConfigError(f"unknown graph {n!r}; choose from {', '.join(GRAPH_NAMES)} or 'components'")
            if n not in out:
                out.append(n)
    if not out:
        raise ConfigError("no graphs requested; choose from pipeline, components, encoder, denoiser, decoder")
    return out


@dataclass(frozen=True)
class ExportRequest:
    """A validated request: normalised names and the imported exporter functions."""

    formats: list[str]
    graphs: list[str]
    precisions: list[str]
    exporters: dict[str, Exporter]


def check_request(
    preset: Preset,
    *,
    formats: Sequence[str],
    graphs: Sequence[str],
    tile: int,
    precisions: Sequence[str],
    out_dir: Path | None = None,
) -> ExportRequest:
    """Validate an export request without loading models (the CLI calls this before the slow load).

    Checks the format, graph and precision names, the tile, that each backend module imports, that parity
    floors exist, and (if ``out_dir`` is given) that the output folder can be created and written; folders
    created by that probe are removed again.

    Raises:
        ConfigError, ExportError, InputError: as :func:`export_model`.
    """
    fmts = _names(formats, FORMAT_NAMES, "format")
    precs = _names(precisions, PRECISIONS, "precision")
    names = resolve_graphs(graphs)
    check_tile(tile, preset.pad_multiple)
    exporters = {f: get_exporter(f) for f in fmts}
    for prec in precs:
        for n in names:
            load_floors(prec, n, preset.name)
    if out_dir is not None:
        _remove_empty(prepare_out_dir(Path(out_dir)))
    return ExportRequest(fmts, names, precs, exporters)


def _names(values: Sequence[str] | str, allowed: Sequence[str], what: str) -> list[str]:
    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"unknown {what} {bad or values!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(values))


def prepare_out_dir(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` (and parents) and prove it is writable. Returns the folders it created.

    Raises:
        InputError: it cannot be created or written (nothing created is left behind).
    """
    out_dir = Path(out_dir)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()][::-1]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".tadsr-write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _remove_empty(created)
        raise InputError(f"cannot write to the output folder {out_dir}: {e.strerror or e}; "
                         "choose a writable folder with --out") from e  # fmt: skip
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    for p in reversed(list(folders)):
        try:
            p.rmdir()
        except OSError:
            break


def export_model(
    models: Models,
    *,
    formats: Sequence[str] = ("onnx",),
    graphs: Sequence[str] = ("pipeline",),
    tile: int = 64,
    precisions: Sequence[str] = ("fp32",),
    out_dir: Path,
    parity_gate: bool = True,
    progress: bool = False,
    n_real: int = 3,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    color_fix: str = "none",
    parity_seed: int = 0,
) -> list[ExportResult]:
    """Export graphs of ``models`` to artifact folders under ``out_dir``, each one checked by parity.

    Args:
        models: loaded networks (:func:`tadsr.pipeline.load_models`).
        formats: registered format names (:data:`tadsr.formats.registry.FORMAT_NAMES`).
        graphs: ``"pipeline"``, ``"components"`` (= encoder, denoiser, decoder) or single graph names.
        tile: LR tile side (a multiple of the preset's pad multiple, 64).
        precisions: ``"fp32"`` and/or ``"fp16"``.
        out_dir: parent folder of the artifact folders (created if needed).
        parity_gate: raise :class:`~tadsr.errors.ParityError` when a hop is below its floor (nothing is
            written for that artifact); if False, the artifact is written and the failure recorded.
        progress: passed to the backend exporters (progress bars where they have loops).
        n_real: number of real LR patches used by parity (besides one seeded case).
        backend_options: per-format keyword options for the exporter, e.g. ``{"onnx": {"opset": 20}}``.
        color_fix: colour fix at the end of the fused ``pipeline`` graph (``"none"``, ``"wavelet"``, ``"adain"``,
            ``"luma"``; :mod:`tadsr.color_fix`), recorded in the manifest's ``graph.constants.color_fix``; parity then
            compares against the reference pipeline with the same fix. Components are never changed.
        parity_seed: seed of parity's seeded case and of the real patches drawn from the calibration set.

    Returns:
        One :class:`ExportResult` per graph x format x precision, in that nesting order.

    Raises:
        ConfigError: unknown format / precision / graph, bad tile.
        InputError: the output folder cannot be written.
        ExportError: a backend module is missing, or a backend failed.
        ParityError: a hop below its floor with ``parity_gate`` on.
    """
    req = check_request(models.preset, formats=formats, graphs=graphs, tile=tile, precisions=precisions)
    fmts, names, precs, exporters = req.formats, req.graphs, req.precisions, req.exporters
    created = prepare_out_dir(Path(out_dir))
    results: list[ExportResult] = []
    try:
        built = make_graphs(models, tile, tuple(names), color_fix=color_fix)
        t0 = time.perf_counter()
        runs = reference_runs(models, tile, n_real, parity_seed)
        logger.info("reference pipeline on %d real patches (%s): %.1fs", n_real, runs.source, time.perf_counter() - t0)
        with tqdm(total=len(names) * len(fmts) * len(precs), desc="export", unit="artifact",
                  disable=not progress) as bar:  # fmt: skip
            for n in names:
                results += _export_graph(models, n, built[n], exporters, precs, Path(out_dir), parity_gate,
                                         progress, runs, backend_options or {}, bar, parity_seed)  # fmt: skip
    finally:
        if not results:
            _remove_empty(created)
    return results


def _export_graph(
    models: Models, name: str, graph_and_spec: tuple, exporters: Mapping[str, Exporter], precs: Sequence[str],
    out_dir: Path, gate: bool, progress: bool, runs: ReferenceRuns, backend_options: Mapping[str, Mapping[str, Any]],
    bar: Any, seed: int = 0,
) -> list[ExportResult]:  # fmt: skip
    graph, spec = graph_and_spec
    t0 = time.perf_counter()
    cases, source = make_cases(models, spec, runs=runs, seed=seed)
    eager, eager_view = run_cases_vq(TorchRunner.from_graph(graph, spec).run, cases, graph, models)
    refs = [c.reference for c in cases]
    ranges = {s.name: s.value_range for s in spec.outputs}
    views = None if eager_view is None else (eager_view, reference_view(models, cases))
    judge = vq_judge(models, name, "fp32", spec.constants.get("color_fix", "none"))
    vq = None if judge is None or views is None else VQCompare(judge, views[0], views[1])
    hop1 = compare(HOP_REFERENCE, eager, refs, cases, load_floors("fp32", name, models.preset.name), ranges, vq)
    logger.info("parity %s, %s: %s (%d cases, %.1fs)", name, HOP_REFERENCE, ", ".join(_short(h) for h in hop1),
                len(cases), time.perf_counter() - t0)  # fmt: skip
    light = light_hop(models, spec, cases)
    if light:
        logger.info("parity %s, %s: %s", name, light[0].hop, ", ".join(_short(h) for h in light))
        if gate:  # before any export: a light autoencoder that is not this autoencoder's fails every format
            ParityReport(name, light).raise_if_failed(f"the light {name} (is the light autoencoder distilled from this "
                                                      "autoencoder?)")  # fmt: skip
        hop1 = hop1 + light
    out = []
    for fmt, exporter in exporters.items():
        for prec in precs:
            bar.set_postfix_str(artifact_name(spec.name, fmt, prec, spec.tile))
            out.append(_export_one(models, graph, spec, fmt, exporter, prec, out_dir, gate, progress, cases, eager,
                                   hop1, source, dict(backend_options.get(fmt, {})), views))  # fmt: skip
            bar.update(1)
    return out


def _short(h: Any) -> str:
    vq = f" [VQ: {h.flip_summary()}]" if getattr(h, "flips", None) else ""
    return f"{h.inputs} {h.output} max {h.max_abs:.2g} / {h.psnr:.1f} dB{vq}{'' if h.passed else ' FAIL'}"


def _export_one(
    models: Models, graph: Any, spec: Any, fmt: str, exporter: Exporter, prec: str, out_dir: Path, gate: bool,
    progress: bool, cases: Sequence[ParityCase], eager: list, hop1: list, source: str, opts: dict[str, Any],
    views: tuple[Any, Any] | None = None,
) -> ExportResult:  # fmt: skip
    name = artifact_name(spec.name, fmt, prec, spec.tile)
    p = models.preset
    opts.setdefault("metadata", {"preset": p.name, "sources": models.sources, "artifact": name})
    t0 = time.perf_counter()
    logger.info("exporting %s ...", name)
    with staged_artifact(out_dir, name) as stage:
        with shared_node_sources():
            backend = exporter(graph, spec, stage.path, precision=prec, progress=progress, **opts)
        if not isinstance(backend, BackendResult) or backend.format != fmt:
            raise ExportError(f"export_{fmt} returned {backend!r}, expected a BackendResult with format {fmt!r}")
        t_export = time.perf_counter() - t0
        common = dict(folder=stage.path, graph_spec=spec.to_dict(), backend=backend, preset=p.to_dict(),
                      sources=models.sources)  # fmt: skip
        write_manifest(stage.path, build_manifest(**common))
        runner = load_runner(stage.path)
        judge = vq_judge(models, spec.name, prec, spec.constants.get("color_fix", "none"))
        vq2 = vq3 = None
        if judge is not None and views is not None:  # outputs, latents and codes in one run per case
            outs, mine = run_cases_viewed(runner.run, stage.path, runner.manifest, cases)
            vq2, vq3 = VQCompare(judge, mine, views[0]), VQCompare(judge, mine, views[1])
        else:
            outs = run_cases(runner.run, cases)
        floors = load_floors(prec, spec.name, p.name)
        ranges = {s.name: s.value_range for s in spec.outputs}
        report = ParityReport(spec.name, list(hop1), source)
        report.hops += compare(runtime_hop(fmt), outs, eager, cases, floors, ranges, vq2)
        report.hops += compare(end_to_end_hop(fmt), outs, [c.reference for c in cases], cases, floors, ranges, vq3)
        extra = {"parity_inputs": {"real": source, "cases": [c.name for c in cases]}, "parity_gate": gate}
        manifest = build_manifest(**common, parity=report.to_list(), parity_passed=report.passed, extra=extra)
        if gate:
            report.raise_if_failed(name)
        write_manifest(stage.path, manifest)
        final = stage.commit()
    t_total = time.perf_counter() - t0
    if not report.passed:
        logger.warning("%s written WITHOUT passing parity (gate off): %s", name, report.failures()[0].describe())
    files = [final / f["name"] for f in manifest["files"]]
    size = sum(f["bytes"] for f in manifest["files"])
    by_hop: dict[str, list[str]] = {}
    for h in report.hops[len(hop1) :]:
        by_hop.setdefault(h.hop, []).append(_short(h))
    summary = "; ".join(f"{hop}: {', '.join(parts)}" for hop, parts in by_hop.items())
    logger.info("wrote %s (%.1f MB) in %.1fs: %s", final, size / 1e6, t_total, summary)
    return ExportResult(path=final, graph=spec.name, format=fmt, precision=prec, tile=spec.tile, files=files,
                        bytes=size, parity=report, passed=report.passed, backend=backend, manifest=manifest,
                        timings={"export": round(t_export, 3), "parity": round(t_total - t_export, 3),
                                 "total": round(t_total, 3)})  # fmt: skip

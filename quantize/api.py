"""``quantize_artifact``: an fp32 artifact -> INT8 artifact folder(s), calibrated, searched, checked by parity.

For one fp32 artifact folder (``<graph>-<format>-fp32-t<tile>/``)::

    read its manifest (graph, format, tile, preset, sources)      # never re-derives shapes
    load_models(recorded sources / preset) -> make_graph            # the torch graph, for capture and PT2E
    calibration set: sample_patches(calib) -> reference pipeline    # each graph's real inputs
    held-out set: other images, seed + 1                            # recipe floor and parity
    per format, the slice's INT8 driver (registry ``quantize`` hook, e.g. tadsr.formats.onnx.ptq.quantize_job):
      onnx        OnnxPTQ (pre-process, calibrate once) -> recipe -> QDQ INT8 .onnx
      executorch  PT2EQuant("xnnpack") -> recipe -> convert -> XNNPACK .pte
      coreml      PT2EQuant("coreml") -> recipe -> convert -> W8A8 .mlpackage (int8),
                  and linear_quantize_weights(fp32 package) -> W8 .mlpackage (w8)
    staged folder: model file(s), recipe.json, manifest.json (calibration, held-out, recipe, parity, parent)
    parity on held-out patches: fp32 artifact -> INT8 artifact and reference torch -> INT8 artifact, both
    gated by the int8 floors of tadsr/numerics.json; PT2E artifacts add fake-quant torch -> runtime (in
    quantization steps of the output scale, not gated)
    rename to <out>/<graph>-<format>-int8-t<tile> (or -w8-)

Recipe: from ``recipe`` (a ``recipe.json``) when given, else searched (:mod:`tadsr.formats.sensitivity`):
everything quantized first; if the worst held-out patch is below ``target_psnr`` (default
:data:`~tadsr.formats.sensitivity.DEFAULT_TARGET_PSNR`), the most sensitive blocks stay float until it holds.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr import memory
from tadsr.errors import CheckpointError, ConfigError, ExportError, InputError, TadsrError
from tadsr.export.api import _remove_empty, prepare_out_dir
from tadsr.formats.artifact import BackendResult, artifact_name, build_manifest, staged_artifact, write_manifest
from tadsr.formats.fx_meta import shared_node_sources
from tadsr.formats.graphs import make_graph
from tadsr.parity.hops import (
    Floor,
    ParityReport,
    VQCompare,
    compare,
    load_floors,
    reference_view,
    run_cases,
    vq_judge,
)
from tadsr.parity.taps import artifact_view, run_cases_viewed, view_of_tapped_runs
from tadsr.parity.vq import VQJudge, VQView
from tadsr.pipeline import Models
from tadsr.provenance import models_from_manifest
from tadsr.quantize.calibration import CalibrationSet, CaptureCache, sample_calibration, sample_holdout
from tadsr.quantize.hr_tail import sr_tail
from tadsr.formats.registry import all_formats, get_format
from tadsr.formats.sensitivity import (
    RECIPE_NAME,
    BackendRecipe,
    Recipe,
    HR_CONFIDENCE,
    HRBudget,
    HRLoss,
    SearchResult,
    UnitSensitivity,
    default_target,
    find_float_units,
    load_recipe,
)
from tadsr.metrics import psnr_y_8bit
from tadsr.runtime.runner import MANIFEST_NAME, read_manifest, sha256_path, verify_files

__all__ = ["DEFAULT_HR_BUDGET_DB", "HR_BUDGET_SHARE", "HR_CONFIDENCE", "METHODS", "FORMATS", "CaptureCache", "quantize_artifact", "rebuild_models", "sr_tail"]

# The default HR budget of the recipe search (issue 18): at most this much PSNR-Y vs HR lost against fp32, mean
# over the held-out patches, a patch that INT8 improves counting as 0 (its upper confidence bound, HR_CONFIDENCE).
DEFAULT_HR_BUDGET_DB = 0.3
# A component artifact is one link of the chain encoder -> denoiser -> decoder that the device runs in turn, so what
# the user loses is the chain's. Each component is judged through the rest of the fp32 chain and gets an equal
# share of the budget: three INT8 components chained then stay within it (their losses about add up). Session 12,
# with the budget on the decoder alone: the ONNX INT8 components chained lost 1.30 dB, the fused pipeline 0.07.
HR_BUDGET_SHARE = {"pipeline": 1.0, "encoder": 1 / 3, "denoiser": 1 / 3, "decoder": 1 / 3}

logger = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
FORMATS = tuple(f.name for f in all_formats() if f.quantize)  # the formats with an INT8 driver
_INFO = Floor(None, None, "informational: INT8 runtime vs the fake-quantized torch graph it was lowered from")


# ----------------------------------------------------------------------------------------------- parent


@dataclass
class _Parent:
    path: Path
    manifest: dict[str, Any]
    graph: str
    fmt: str
    tile: int
    model_file: Path
    light_autoencoder: Path | None = None  # the user's override of the recorded light autoencoder
    weight_only: bool = True  # also the weight-only variant (Core ML W8)
    hr_budget: float | None = None  # PSNR-Y vs HR the INT8 image may lose against fp32 (None: no such criterion)
    hr_confidence: float = HR_CONFIDENCE  # confidence of the bound the budget holds
    use_shipped: bool = True  # start from a shipped recipe searched under the same conditions


def find_fp32_artifact(path: Path) -> Path:
    """``path`` if it is an artifact folder; else the one fp32 artifact among its sub-folders (the folder that
    ``tadsr export --out`` wrote).

    Raises:
        InputError: ``path`` does not exist, holds no fp32 artifact, or several (they are listed).
    """
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST_NAME).is_file():
        return path  # read_manifest says what is wrong with it
    fits, others = [], []
    for sub in sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file()):
        try:
            m = json.loads((sub / MANIFEST_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            others.append(sub.name)
            continue
        is_fp32 = isinstance(m, dict) and m.get("precision") == "fp32" and m.get("format") in FORMATS
        (fits if is_fp32 else others).append(sub.name)
    if len(fits) == 1:
        logger.info("quantizing %s, the one fp32 artifact in %s", fits[0], path)
        return path / fits[0]
    if fits:
        raise InputError(f"{path} holds {len(fits)} fp32 artifacts: {', '.join(fits)}; pass one of them, "
                         f"e.g. {path / fits[0]}")  # fmt: skip
    seen = f" (it holds {', '.join(others)}, none an fp32 artifact)" if others else ""
    raise InputError(f"{path} has no {MANIFEST_NAME} and no fp32 artifact folder inside{seen}; pass a folder "
                     "written by tadsr export")  # fmt: skip


def _read_parent(artifact_dir: Path) -> _Parent:
    artifact_dir = find_fp32_artifact(Path(artifact_dir))
    manifest = read_manifest(artifact_dir)
    verify_files(artifact_dir, manifest)
    if manifest["precision"] != "fp32":
        raise InputError(f"{artifact_dir} is a {manifest['precision']} artifact; INT8 is made from the fp32 artifact "
                         "(tadsr export --precision fp32)")  # fmt: skip
    if manifest["format"] not in FORMATS:
        raise InputError(f"{artifact_dir}: format {manifest['format']!r} cannot be quantized ({', '.join(FORMATS)})")
    missing = [k for k in ("preset", "sources") if not manifest.get(k)]
    if missing:
        raise InputError(f"{artifact_dir}/manifest.json lacks {missing}, needed to rebuild the graph; re-export it")
    g = manifest["graph"]
    return _Parent(artifact_dir, manifest, str(g["name"]), str(manifest["format"]), int(g["tile"]),
                   artifact_dir / manifest["files"][0]["name"])  # fmt: skip


def rebuild_models(manifest: Mapping[str, Any], light_autoencoder: Path | None = None) -> Models:
    """The networks an artifact was exported from, as its manifest records them
    (:func:`tadsr.provenance.models_from_manifest`; the light autoencoder too when the artifact uses it).

    ``light_autoencoder``: the light checkpoint, when the recorded one moved.

    Raises:
        InputError: a checkpoint moved, changed, or was an in-memory state dict.
    """
    try:
        return models_from_manifest(manifest, overrides={"light_autoencoder": light_autoencoder},
                                    flags=("light_autoencoder",))  # fmt: skip
    except CheckpointError as e:  # the recorded file changed since the export
        raise InputError(f"{e} (re-export the fp32 artifact from the weights you have now)") from e


def _check_interface(spec: Any, manifest: Mapping[str, Any], where: Path) -> None:
    def io(items: Sequence[Any]) -> list[tuple[str, tuple[int, ...]]]:
        return [(str(t["name"]), tuple(int(x) for x in t["shape"])) for t in items]

    mine, theirs = spec.to_dict(), manifest["graph"]
    if io(mine["inputs"]) != io(theirs["inputs"]) or io(mine["outputs"]) != io(theirs["outputs"]):
        raise InputError(f"{where}: the rebuilt {spec.name} graph's interface {io(mine['inputs'])} -> "
                         f"{io(mine['outputs'])} differs from the manifest's; re-export the fp32 artifact")  # fmt: skip


# ----------------------------------------------------------------------------------------------- context


@dataclass
class _Ctx:
    parent: _Parent
    models: Models
    graph: torch.nn.Module
    spec: Any
    calib: CalibrationSet
    hold: CalibrationSet
    method: str
    target: float
    recipe: Recipe | None
    sens_patches: int
    sens_budget: int
    threads: int | None
    progress: bool
    gate: bool
    out_dir: Path
    parent_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    parent_engine: str = ""
    parent_view: VQView | None = None  # the parent's latents and codes on the held-out cases, where tapped
    judge: VQJudge | None = None  # the flip-aware judge of this graph's INT8 outputs (None: no VQ lookup in it)
    work: Path = Path()
    weight_only: bool = True
    hr_budget: float | None = None
    hr_confidence: float = HR_CONFIDENCE
    captures: CaptureCache | None = None  # the run's shared store (captures, and searches shared between formats)
    use_shipped: bool = True  # start from a shipped recipe searched under the same conditions (tadsr.quantize.shipped)
    _hr: HRBudget | None = field(default=None, repr=False)  # built on first use (it runs the fp32 chain once)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def parent_file(self) -> Path:
        return self.parent.model_file

    @property
    def ranges(self) -> dict[str, tuple[float, float] | None]:
        return {o.name: o.value_range for o in self.spec.outputs}

    def hr(self) -> HRBudget | None:
        """The HR budget of this graph (:class:`~tadsr.formats.sensitivity.HRBudget`), judged on the held-out
        patches' HR against this graph's fp32 parent: a component's outputs go through the rest of the fp32 chain
        (:func:`sr_tail`) and it holds its share of the budget (:data:`HR_BUDGET_SHARE`)."""
        if self.hr_budget is None:
            return None
        if self._hr is None:
            to_sr = sr_tail(self.models, self.name, self.hold, self.parent.tile)
            hr = self.hold.patches.hr
            base = _psnr_y(to_sr(self.parent_outputs), hr)
            reused = getattr(to_sr, "reference_images", None)
            if reused is not None:
                logger.info("%s: HR baseline of the fp32 parent on %d held-out patches, %d of them the captured "
                            "reference image (the same codes)", self.name, len(hr), reused.reused)  # fmt: skip
            self._hr = HRBudget(self.hr_budget * HR_BUDGET_SHARE[self.name],
                                lambda outs: base - _psnr_y(to_sr(outs), hr), self.hr_confidence)  # fmt: skip
        return self._hr

    def meets(self, psnr: float, outputs: Sequence[Mapping[str, np.ndarray]]) -> tuple[bool, HRLoss | None]:
        """Whether held-out ``outputs`` (worst PSNR ``psnr`` vs fp32) meet the floor and the HR budget, and the
        HR loss (None: no budget for this graph)."""
        hr = self.hr()
        if hr is None:
            return psnr >= self.target, None
        score, loss = hr.score(psnr, outputs, self.target)
        return score >= self.target, loss

    def entry(self, backend: str) -> BackendRecipe | None:
        if self.recipe is None:
            return None
        e = self.recipe.get(self.name, backend)
        if e is None:
            have = {g: sorted(b) for g, b in self.recipe.graphs.items()}
            raise ConfigError(f"the recipe has no entry for graph {self.name!r}, backend {backend!r} (it has {have})")
        return e

    # the steps a slice's driver (tadsr.formats.spec.QuantizeJob) calls back into
    def entry_units(self, entry: BackendRecipe, known: Mapping[str, Any], pinned: Mapping[str, str]) -> list[str]:
        return _entry_units(entry, known, pinned)

    def search(self, run: Callable, units: Mapping[str, tuple[int, int]], pinned: Mapping[str, str],
               fp32_run: Callable[[Sequence[Mapping[str, np.ndarray]]], list], share: Sequence[str] | None = None,
               ) -> tuple[SearchResult, list]:  # fmt: skip
        result, ranking = _search(self, run, units, pinned, fp32_run)
        if share is not None and self.captures is not None:
            self.captures.save_search(_search_key(self, units, pinned, share),
                                      {**_search_to_dict(result, ranking), "by": f"the {self.parent.fmt} quantize call"})
        return result, ranking

    def shared_search(self, units: Mapping[str, tuple[int, int]], pinned: Mapping[str, str],
                      share: Sequence[str]) -> tuple[SearchResult, list] | None:  # fmt: skip
        """The search another format's quantize call of this run made on the same graph (``share``: what makes
        the graphs the same beyond their blocks, e.g. the rewrite names), calibration and held-out patches and
        criteria; None: none yet (nothing waits for it)."""
        if self.captures is None:
            return None
        found = self.captures.load_search(_search_key(self, units, pinned, share))
        if found is None:
            return None
        logger.info("%s: recipe search shared from %s (same graph, patches and criteria); not searched again",
                    self.name, found.get("by", "another format"))  # fmt: skip
        return _search_from_dict(found)

    def shared_ranges(self, share: Sequence[str], method: str) -> dict[str, Any] | None:
        if self.captures is None:
            return None
        found = self.captures.load_shared("ranges", _ranges_key(self, share, method))
        return None if found is None else found["table"]

    def save_ranges(self, share: Sequence[str], method: str, ranges: dict[str, Any]) -> None:
        if self.captures is not None:
            self.captures.save_shared("ranges", _ranges_key(self, share, method),
                                      {"table": ranges, "by": f"the {self.parent.fmt} quantize call"})  # fmt: skip

    def shipped_ranges(self, key: str) -> dict[str, Any] | None:
        """ORT calibration ranges shipped for ``key`` (:func:`tadsr.quantize.shipped.lookup_ranges`), unless the
        caller asked for no shipped data (``shipped_recipes=False``)."""
        from tadsr.quantize import shipped

        return shipped.lookup_ranges(key) if self.use_shipped else None

    def shipped_search(self, backend_key: str, units: Mapping[str, tuple[int, int]],
                       pinned: Mapping[str, str]) -> tuple[SearchResult, list] | None:  # fmt: skip
        """The recipe shipped for this graph and backend (:mod:`tadsr.quantize.shipped`), as a search's outcome, when
        it was searched under this call's exact conditions and names only blocks of this graph (``units``,
        ``pinned``); None: none. The caller measures it before using it."""
        from tadsr.quantize import shipped

        if self.recipe is not None or not self.use_shipped:
            return None
        m, hr = self.parent.manifest, self.hr()
        entry = shipped.lookup(shipped.conditions(
            graph=self.name, backend=backend_key, preset=m["preset"]["name"], sources=m["sources"],
            tile=self.parent.tile, method=self.method, target=self.target,
            hr_budget=None if hr is None else hr.budget_db, hr_confidence=None if hr is None else hr.confidence,
            calib_hash=self.calib.patches.content_hash, calib_seed=self.calib.info["seed"],
            hold_hash=self.hold.patches.content_hash, hold_seed=self.hold.info["seed"]))  # fmt: skip
        if entry is None:
            return None
        unknown = [u for u in entry.float_units if u not in units and u not in pinned]
        if unknown:
            logger.warning("%s/%s: the shipped recipe keeps blocks float that this graph does not have (%s); "
                           "searching", self.name, backend_key, unknown[:3])  # fmt: skip
            return None
        logger.info("%s/%s: starting from the shipped recipe (%d float blocks), searched under the same weights, "
                    "patches and criteria; measuring it here", self.name, backend_key, len(entry.float_units))  # fmt: skip
        return shipped.to_search(entry)

    def vq_taps(self) -> Callable[[Any], Sequence[str]] | None:
        """The VQ lookup's tensors of an ONNX model of this graph (:func:`tadsr.parity.taps.tap_plan`), where the
        write judges flips (None: it does not)."""
        from tadsr.parity.taps import TapPlan, tap_plan

        if self.judge is None:
            return None
        manifest = self.parent.manifest

        def names(model: Any) -> list[str]:
            plan = tap_plan(model, manifest)
            return plan.names if isinstance(plan, TapPlan) else []

        return names

    def write(self, backend_key: str, precision: str, entry: BackendRecipe, build: Callable[[Path], BackendResult],
              fake_quant: Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]] | None,
              ) -> Path:  # fmt: skip
        return _write(self, backend_key, precision, entry, build, fake_quant)


def _psnr_y(outputs: Sequence[Mapping[str, np.ndarray]], hr: np.ndarray) -> np.ndarray:
    """Per patch, the SR output's PSNR-Y against HR (8-bit, 4 px border, as the benchmark; at most 100 dB)."""
    return np.array([min(psnr_y_8bit(o["sr"], hr[i]), 100.0) for i, o in enumerate(outputs)])


def _runner(path: Path, fmt: str, threads: int | None) -> tuple[Callable[[dict[str, np.ndarray]], dict], str]:
    """``run`` of an artifact through :func:`load_runner` and the engine's name (Core ML: the simulator off macOS)."""
    from tadsr.runtime.runner import load_runner

    r = load_runner(path, **get_format(fmt).runner_kwargs(threads))
    return r.run, r.backend


def _steps(hops: list[dict[str, Any]], scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """Add ``output_scale`` and ``max_abs_steps`` (max abs error in quantization steps) where a scale is known."""
    for h in hops:
        s = scales.get(h["output"])
        if s:
            h["output_scale"] = s
            h["max_abs_steps"] = round(h["max_abs"] / s, 3)
    return hops


# ----------------------------------------------------------------------------------------------- writing


def _write(
    ctx: _Ctx, backend_key: str, precision: str, entry: BackendRecipe, build: Callable[[Path], BackendResult],
    fake_quant: Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]] | None,
) -> Path:  # fmt: skip
    p, spec = ctx.parent, ctx.spec
    name = artifact_name(spec.name, p.fmt, precision, spec.tile)
    t0 = time.perf_counter()
    with staged_artifact(ctx.out_dir, name) as stage:
        backend = build(stage.path)
        Recipe(graphs={spec.name: {backend_key: entry}}, notes=_recipe_notes(ctx)).save(stage.path / RECIPE_NAME)
        common = dict(folder=stage.path, graph_spec=p.manifest["graph"], backend=backend, preset=p.manifest["preset"],
                      sources=p.manifest["sources"], parent=str(p.path.resolve()))  # fmt: skip
        extra = _extra(ctx, backend_key, entry, backend)
        write_manifest(stage.path, build_manifest(**common, extra=extra))
        cases = ctx.hold.cases(spec.name)
        try:
            run, engine = _runner(stage.path, p.fmt, ctx.threads)
            outs, searched = _held_out_outputs(run, cases, backend.measured, name)
        except TadsrError:
            raise
        except Exception as e:  # runtimes raise their own types (e.g. XNNPACK refusing a node at load time)
            raise ExportError(f"the {precision} {p.fmt} artifact {name} was written but does not run: {e}") from e
        del run  # its session and arena: the VQ views below open their own (the parent's at official size: GBs)
        memory.trim()
        floors = load_floors("int8", spec.name, ctx.models.preset.name)
        report = ParityReport(spec.name, [], ctx.hold.runs.source)
        vq_parent = vq_ref = None
        judge = ctx.judge
        if judge is not None:
            written = read_manifest(stage.path)
            mine = None
            if searched and backend.measured_taps is not None:  # the search's run of this very model tapped it
                mine = view_of_tapped_runs(stage.path, written, cases, outs, backend.measured_taps)
            if mine is None:
                mine = artifact_view(stage.path, written, cases, outs)
            theirs = ctx.parent_view if ctx.parent_view is not None else artifact_view(p.path, p.manifest, cases,
                                                                                       ctx.parent_outputs)  # fmt: skip
            vq_parent = None if mine is None or theirs is None else VQCompare(judge, mine, theirs)
            vq_ref = None if mine is None else VQCompare(judge, mine, reference_view(ctx.models, cases))
        report.hops += compare(f"fp32 {p.fmt} ({ctx.parent_engine}) -> {precision} {p.fmt} ({engine})", outs,
                               ctx.parent_outputs, cases, floors, ctx.ranges, vq_parent)  # fmt: skip
        report.hops += compare(f"reference torch -> {precision} {p.fmt} ({engine})", outs,
                               [c.reference for c in cases], cases, floors, ctx.ranges, vq_ref)  # fmt: skip
        hops = report.to_list()
        if fake_quant is not None:
            fq = fake_quant([c.inputs for c in cases])
            info_floors = {k: _INFO for k in floors}
            hops += [h.to_dict() for h in compare(f"fake-quant torch -> {precision} {p.fmt} ({engine})", outs, fq,
                                                  cases, info_floors, ctx.ranges)]  # fmt: skip
        hops = _steps(hops, backend.info.get("output_scales", {}))
        extra["quantization"]["fidelity"] = _fidelity(report)
        extra["parity_inputs"] = {"heldout": ctx.hold.runs.source, "cases": [c.name for c in cases]}
        extra["parity_gate"] = ctx.gate
        manifest = build_manifest(**common, parity=hops, parity_passed=report.passed, extra=extra)
        if ctx.gate:
            report.raise_if_failed(name)
        write_manifest(stage.path, manifest)
        final = stage.commit()
    size = sum(f["bytes"] for f in manifest["files"])
    parent_size = sum(f["bytes"] for f in p.manifest["files"])
    worst = report.worst()
    logger.info("wrote %s (%.2f MB, %.2fx the fp32 artifact) in %.1fs: %s", final, size / 1e6, size / parent_size,
                time.perf_counter() - t0, worst.describe() if worst else "no parity")  # fmt: skip
    if not report.passed:
        logger.warning("%s written WITHOUT passing parity (gate off): %s", name, report.failures()[0].describe())
    return final


def _held_out_outputs(run: Callable[[dict[str, np.ndarray]], dict], cases: Sequence[Any],
                      measured: Sequence[Mapping[str, np.ndarray]] | None,
                      name: str) -> tuple[list[dict[str, np.ndarray]], bool]:  # fmt: skip
    """The written artifact's outputs on the held-out cases, and whether they are the search's. Where the recipe
    search already ran a model identical to the file but for its metadata on them (``measured``), the file runs the
    first case only: when it reproduces that output bit for bit, the others are taken as measured; else every case
    runs."""
    if measured is not None and len(measured) == len(cases) and cases:
        first = run_cases(run, cases[:1])[0]
        if first.keys() == measured[0].keys() and all(np.array_equal(first[k], measured[0][k]) for k in first):
            logger.info("%s: the file reproduces the search's output on the first held-out case; the other %d are "
                        "the search's", name, len(cases) - 1)  # fmt: skip
            return [first, *(dict(m) for m in measured[1:])], True
        logger.info("%s: the file does not reproduce the search's output on the first held-out case; running all",
                    name)  # fmt: skip
    return run_cases(run, cases), False


def _fidelity(report: ParityReport) -> dict[str, Any]:
    return {h.output: {"psnr": round(h.psnr, 3) if not math.isinf(h.psnr) else 999.0, "max_abs": h.max_abs,
                       "n": h.n} for h in report.hops[:1]}  # fmt: skip


def _recipe_notes(ctx: _Ctx) -> dict[str, Any]:
    return {
        "graph": ctx.name,
        "preset": ctx.models.preset.name,
        "tile": ctx.spec.tile,
        "psnr": "worst held-out patch, INT8 vs fp32, dB (images over [-1, 1]; latents over the fp32 range)",
        "calibration_hash": ctx.calib.info["content_hash"],
        "reuse": "tadsr quantize ARTIFACT --recipe recipe.json",
    }


def _extra(ctx: _Ctx, backend_key: str, entry: BackendRecipe, backend: BackendResult) -> dict[str, Any]:
    p = ctx.parent
    parent_bytes = sum(f["bytes"] for f in p.manifest["files"])
    return {
        "calibration": ctx.calib.info,
        "heldout": ctx.hold.info,
        "recipe": {"backend": backend_key, **entry.to_dict()},
        "quantization": {
            "backend": backend_key,
            "method": entry.method,
            "target_psnr": entry.target_psnr,
            "recipe_psnr": entry.psnr,
            "int8_fraction": entry.int8_fraction,
            "float_units": entry.float_units,
            "dynamic_units": entry.dynamic_units,
            "hr_budget_db": entry.hr_budget_db,
            "hr_loss_db": entry.hr_loss_db,
            "hr_bound_db": entry.hr_bound_db,
            "hr_confidence": entry.hr_confidence,
            "parent_bytes": parent_bytes,
        },
        "parent_manifest": {
            "path": str(p.path.resolve()),
            "sha256": sha256_path(p.path / "manifest.json")[0],
            "files": p.manifest["files"],
        },  # fmt: skip
    }


# ----------------------------------------------------------------------------------------------- backends


def _entry_units(entry: BackendRecipe, known: Mapping[str, Any], pinned: Mapping[str, str]) -> list[str]:
    unknown = [u for u in entry.float_units if u not in known and u not in pinned]
    if unknown:
        raise ConfigError(
            f"the recipe keeps blocks float that this graph does not have: {unknown[:5]} "
            f"(blocks here: {sorted(known)[:8]}...); was it made for another preset or graph?"
        )
    return list(entry.float_units)


def _calibrated_graph(ctx: _Ctx, share: Sequence[str], method: str) -> list[Any]:
    """The graph (weights, tile, ``share``: rewrites and op types) and its calibration (method, feeds): what its
    calibration ranges depend on, and the first part of what a recipe search on it depends on."""
    m = ctx.parent.manifest
    return [ctx.name, m["preset"], m["sources"], ctx.parent.tile, list(share), method, ctx.calib.patches.content_hash,
            ctx.calib.info.get("seed")]  # fmt: skip


def _search_key(ctx: _Ctx, units: Mapping[str, tuple[int, int]], pinned: Mapping[str, str],
                share: Sequence[str]) -> str:  # fmt: skip
    """What a recipe search depends on besides the reference outputs of the format's own fp32 artifact (which agree
    across formats to far below the INT8 error)."""
    return json.dumps([*_calibrated_graph(ctx, share, ctx.method), sorted(units.items()), sorted(pinned), ctx.target,
                       ctx.hr_budget, ctx.hr_confidence, ctx.sens_patches, ctx.sens_budget,
                       ctx.hold.patches.content_hash, ctx.hold.info.get("seed")], sort_keys=True, default=list)  # fmt: skip


def _ranges_key(ctx: _Ctx, share: Sequence[str], method: str) -> str:
    """What a graph's calibration ranges depend on (:func:`_calibrated_graph`)."""
    return json.dumps(_calibrated_graph(ctx, share, method), sort_keys=True, default=list)


def _search_to_dict(result: SearchResult, ranking: Sequence[UnitSensitivity]) -> dict[str, Any]:
    return {"excluded": list(result.excluded), "psnr": result.psnr, "met": result.met, "trace": result.trace,
            "hr_loss": None if result.hr_loss is None else list(result.hr_loss),
            "ranking": [r.to_dict() for r in ranking]}  # fmt: skip


def _search_from_dict(d: Mapping[str, Any]) -> tuple[SearchResult, list[UnitSensitivity]]:
    result = SearchResult(list(d["excluded"]), float(d["psnr"]), bool(d["met"]), list(d["trace"]),
                          None if d["hr_loss"] is None else HRLoss(*d["hr_loss"]))  # fmt: skip
    return result, [UnitSensitivity.from_dict(r) for r in d["ranking"]]


def _search(ctx: _Ctx, run: Callable, units: Mapping[str, tuple[int, int]], pinned: Mapping[str, str],
            fp32_run: Callable[[Sequence[Mapping[str, np.ndarray]]], list]) -> tuple[SearchResult, list]:  # fmt: skip
    sens = ctx.calib.feeds(ctx.name)[: max(1, ctx.sens_patches)]
    hold = [c.inputs for c in ctx.hold.cases(ctx.name)]
    return find_float_units(run, units, list(pinned), sens_feeds=sens, sens_refs=fp32_run(sens), hold_feeds=hold,
                            hold_refs=ctx.parent_outputs, ranges=ctx.ranges, target=ctx.target,
                            budget=ctx.sens_budget, progress=ctx.progress, hr=ctx.hr())  # fmt: skip


# ----------------------------------------------------------------------------------------------- public


def quantize_artifact(
    artifact_dir: Path,
    *,
    calib: Path | None = None,
    num_patches: int | None = None,
    seed: int = 0,
    method: str = "minmax",
    target_psnr: float | None = None,
    recipe: Path | Recipe | None = None,
    out_dir: Path,
    holdout: Path | None = None,
    holdout_patches: int = 16,
    sensitivity_patches: int = 4,
    sensitivity_budget: int = 48,
    parity_gate: bool = True,
    threads: int | None = None,
    progress: bool = False,
    captures: CaptureCache | None = None,
    light_autoencoder: Path | None = None,
    weight_only: bool = True,
    hr_budget_db: float | None = DEFAULT_HR_BUDGET_DB,
    hr_confidence: float = HR_CONFIDENCE,
    shipped_recipes: bool = True,
) -> list[Path]:
    """Make the INT8 artifact(s) of an fp32 artifact folder.

    Args:
        artifact_dir: an fp32 artifact folder written by ``tadsr export`` (ONNX, ExecuTorch or Core ML).
        calib: calibration image folder (DIV2K layout detected), None = the shipped 48-patch set.
        num_patches: calibration patches; None = 64, or every distinct patch of a smaller source (at least 32).
        seed: patch sampling and noise seed (held-out patches use ``seed + 1`` and other images).
        method: calibration method, ``minmax``, ``entropy`` or ``percentile``.
        target_psnr: fidelity floor of the recipe search (PSNR vs fp32 on the worst held-out patch, dB);
            None = :func:`~tadsr.formats.sensitivity.default_target` (30 dB; 25 for the fused pipeline).
            Ignored with ``recipe``.
        recipe: a ``recipe.json`` (path, INT8 artifact folder, or :class:`Recipe`) to reuse instead of searching.
        out_dir: parent folder of the new artifact folders (created if needed).
        holdout: held-out image folder; None = the photo set's validation images (never calibration images).
        holdout_patches: number of held-out patches (recipe floor and parity).
        sensitivity_patches: calibration patches used by the per-block sensitivity sweep.
        sensitivity_budget: most graph evaluations of the sweep (coarser float groups beyond it).
        parity_gate: raise ParityError below the int8 floors of ``tadsr/numerics.json`` (nothing written).
        threads: runtime threads for ORT / ExecuTorch sessions (None: the runtime's default).
        progress: progress bars.
        captures: the calibration and held-out captures to reuse (:class:`CaptureCache`): a caller that quantizes
            several artifacts of one model (the pipeline and its components, several formats) passes the same
            cache to each call so the reference pipeline runs once; None = capture for this call only.
        light_autoencoder: the light autoencoder of an artifact exported with it, when the file its manifest
            records moved (None: the recorded one).
        weight_only: also write the weight-only variant where the format has one (Core ML ``w8``).
        hr_budget_db: a second criterion of the recipe search: the INT8 graph may lose at most this much PSNR-Y
            against the held-out patches' HR, relative to its fp32 parent (mean over patches); None: the PSNR
            floor alone. A component (encoder, denoiser, decoder) is judged through the rest of the fp32 chain
            and holds its share of the budget (:data:`HR_BUDGET_SHARE`: a third), so that the three INT8
            components chained stay within it. A recipe given with ``recipe`` is not searched (its loss is
            measured and recorded).
        hr_confidence: the budget holds the mean loss's one-sided upper confidence bound at this confidence
            (:class:`~tadsr.formats.sensitivity.HRBudget`), so that it also holds on other noise; 0.5: the mean.
        shipped_recipes: without ``recipe``, start from the recipe shipped for this graph and backend when it was
            searched under this call's exact conditions (:mod:`tadsr.quantize.shipped`: the bundled model's; same
            weights, patches and criteria). It is measured on the held-out patches and searched anew when it misses
            the criteria here. Also: ONNX graphs read the calibration ranges shipped for their exact key (model
            and feeds' bytes, method, ORT version) instead of calibrating. False: always search and calibrate.

    Returns:
        The new artifact folders: ``<graph>-<format>-int8-t<tile>`` (and ``<graph>-coreml-w8-t<tile>``, the
        weight-only package, for a Core ML parent).

    Raises:
        InputError: bad artifact folder, calibration / held-out folder, or output folder.
        ConfigError: unknown method, bad target, recipe without an entry for this graph and backend.
        ExportError: a quantizer or converter failed.
        ParityError: below the int8 floors with ``parity_gate``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if target_psnr is not None and not 0 < float(target_psnr) < 200:
        raise ConfigError(f"target PSNR must be in (0, 200) dB, got {target_psnr!r}")
    if hr_budget_db is not None and not 0 <= float(hr_budget_db) < 100:
        raise ConfigError(f"the HR budget must be in [0, 100) dB, got {hr_budget_db!r}")
    if not 0.5 <= float(hr_confidence) < 1:
        raise ConfigError(f"the HR budget's confidence must be in [0.5, 1), got {hr_confidence!r}")
    for n, v in (("holdout_patches", holdout_patches), ("sensitivity_patches", sensitivity_patches),
                 ("sensitivity_budget", sensitivity_budget)):  # fmt: skip
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{n} must be a positive integer, got {v!r}")
    t0 = time.perf_counter()
    parent = _read_parent(artifact_dir)
    parent.light_autoencoder = light_autoencoder
    parent.weight_only = weight_only
    parent.hr_budget = None if hr_budget_db is None else float(hr_budget_db)
    parent.hr_confidence = float(hr_confidence)
    parent.use_shipped = bool(shipped_recipes)
    rec = recipe if isinstance(recipe, Recipe) or recipe is None else load_recipe(Path(recipe))
    if rec is not None and rec.get(parent.graph, parent.fmt) is None:  # fail before any model work
        have = {g: sorted(b) for g, b in rec.graphs.items()}
        raise ConfigError(f"the recipe has no entry for graph {parent.graph!r}, backend {parent.fmt!r} (it has {have})")
    out_dir = Path(out_dir)
    created = prepare_out_dir(out_dir)
    try:
        with shared_node_sources():
            paths = _quantize(parent, rec, calib, num_patches, seed, method, target_psnr, out_dir, holdout,
                              holdout_patches, sensitivity_patches, sensitivity_budget, parity_gate, threads,
                              progress, captures or CaptureCache())  # fmt: skip
    except BaseException:  # Ctrl-C included: leave no empty output folder behind
        _remove_empty(created)
        raise
    logger.info("quantized %s in %.1fs -> %s", parent.path.name, time.perf_counter() - t0, [p.name for p in paths])
    return paths


def _quantize(parent: _Parent, rec: Recipe | None, calib: Path | None, num_patches: int | None, seed: int,
              method: str, target_psnr: float | None, out_dir: Path, holdout: Path | None, holdout_patches: int,
              sensitivity_patches: int, sensitivity_budget: int, parity_gate: bool, threads: int | None,
              progress: bool, captures: CaptureCache) -> list[Path]:  # fmt: skip
    scale = int(parent.manifest["graph"]["scale"])

    def sample() -> tuple:
        cp = sample_calibration(calib, num_patches=num_patches, tile=parent.tile, scale=scale, seed=seed,
                                progress=progress)  # fmt: skip
        return cp, sample_holdout(holdout, num_patches=holdout_patches, tile=parent.tile, scale=scale, seed=seed,
                                  calibration=cp[0])  # fmt: skip

    key = (str(calib), num_patches, parent.tile, scale, seed, str(holdout), holdout_patches)
    calib_patches, hold_patches = captures.patches(key, sample)
    models = rebuild_models(parent.manifest, parent.light_autoencoder)
    graph, spec = make_graph(models, parent.graph, parent.tile)
    _check_interface(spec, parent.manifest, parent.path)
    calib_set, hold = captures.get(parent.manifest, models, calib_patches, hold_patches, progress)
    target = default_target(parent.graph) if target_psnr is None else float(target_psnr)
    ctx = _Ctx(parent, models, graph, spec, calib_set, hold, method, target, rec, sensitivity_patches,
               sensitivity_budget, threads, progress, parity_gate, out_dir)  # fmt: skip
    run, ctx.parent_engine = _runner(parent.path, parent.fmt, threads)
    cases = hold.cases(spec.name)
    ctx.judge = vq_judge(models, spec.name, "int8", spec.constants.get("color_fix", "none"))
    if ctx.judge is not None:
        # the write's flip-aware hop reads the parent's latents and codes: one tapped run per case gives both
        ctx.parent_outputs, ctx.parent_view = run_cases_viewed(run, parent.path, parent.manifest, cases,
                                                               threads=threads)  # fmt: skip
    else:
        ctx.parent_outputs = run_cases(run, cases)
    del run  # the fp32 runtime's session (its weights, its arena): ~2 GB at official size, idle from here on
    work = Path(tempfile.mkdtemp(prefix=f".tadsr-quantize-{secrets.token_hex(3)}-", dir=out_dir))
    ctx.work = work
    ctx.weight_only = parent.weight_only
    ctx.hr_budget = parent.hr_budget
    ctx.hr_confidence = parent.hr_confidence
    ctx.captures = captures
    ctx.use_shipped = parent.use_shipped
    try:
        paths = get_format(parent.fmt).hook("quantize")(ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths

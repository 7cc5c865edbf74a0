"""The main job: export -> INT8 -> parity -> benchmark, in one command (``tadsr all``).

Runs every stage the product offers on one model (by default the shipped ``bundled`` model) and leaves a
folder a mobile engineer can hand over::

    OUT/artifacts/   fp32 / fp16 artifact folders (ONNX, ExecuTorch, Core ML), each with manifest.json
    OUT/int8/        INT8 artifact folders (+ Core ML W8), each with recipe.json and parity vs fp32
    OUT/parity/      parity.json + parity.md (verdict per artifact, localisation of failures)
    OUT/bench/       bench.json + bench.md + plots + image grid (reference, teacher, bicubic, every artifact)
    OUT/SUMMARY.md   what ran, how long each stage took, where the reports are

Each stage calls the same library function as its own CLI verb, so the artifacts are identical to those of
``tadsr export`` / ``tadsr quantize`` / ``tadsr parity`` / ``tadsr bench``.

``tadsr all --smoke`` is the reduced configuration the default test tier runs (minutes on two cores). The model
is chosen as without it, so by default the shipped ``bundled`` one: smaller than ``tiny`` and trained, which the
INT8 floors need (random ``tiny`` weights put the VQ latents on near-ties, and their INT8 pipeline misses the
floor). Every format exports the fused pipeline and the components in fp32 (no Core ML fp16); INT8 of the ONNX
fused pipeline and components, and of the ExecuTorch and Core ML encoders (their INT8 pipelines take minutes to
lower or convert; W8A8 only, no W8 weight-only twin); 8 calibration patches, the HR budget's search on the ONNX
encoder and decoder only; one real parity patch and one whole image of one tile; one benchmark image (one tile) and
one timed pass.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tadsr import fileio
from tadsr.errors import InputError
from tadsr.formats.registry import FORMAT_NAMES

__all__ = ["MainJobConfig", "run_main_job", "add_all_parser"]

log = logging.getLogger(__name__)


def default_bench_dir() -> Path:
    """The shipped held-out HR crops (validation photos of the bundled model, never trained on)."""
    return Path(str(resources.files("tadsr") / "data" / "bench"))


@dataclass
class MainJobConfig:
    out: Path
    preset: str = "bundled"
    init: str | None = None
    student: Path | None = None
    teacher: Path | None = None
    autoencoder: Path | None = None
    light: Path | bool | None = None
    formats: tuple[str, ...] = FORMAT_NAMES
    tile: int = 64
    data: Path | None = None
    calib: Path | None = None
    num_patches: int | None = None
    repeats: int = 5
    threads: int | None = None
    teacher_steps: int = 15
    smoke: bool = False
    progress: bool = False
    jobs: int | None = None  # format lanes at once (None: from the CPUs and the memory budget)
    memory_budget_gb: float | None = None  # None: 85 % of the memory available at the start
    lane_threads: int | None = None  # threads per lane process (None: the usable CPUs / jobs)
    grow_threads: bool = False  # a lane process: take the CPUs of finished lanes (tadsr.cli.lanes.lane_share)
    resume: bool = False  # reuse export / INT8 stages an earlier run into ``out`` finished with the same inputs
    shipped_recipes: bool = True  # start INT8 from the recipes shipped for the same conditions (tadsr.quantize.shipped)
    timings: dict[str, float] = field(default_factory=dict)
    stage_rss: dict[str, float] = field(default_factory=dict)  # peak RSS (GB) of each stage alone (Linux)


def _stage(cfg: MainJobConfig, name: str, fn: Any, timings: dict[str, float] | None = None,
           rss: dict[str, float] | None = None) -> Any:  # fmt: skip
    """Run one stage: its wall time into ``timings`` and its own peak RSS (GB; Linux, the kernel's high-water
    mark restarted when the stage starts, :mod:`tadsr.memory`) into ``rss`` (default: the job's)."""
    from tadsr import memory

    if cfg.grow_threads:
        _take_freed_cpus(cfg)
    log.info("== %s ==", name)
    measured = memory.reset_peak()
    t0 = time.perf_counter()
    out = fn()
    timings = cfg.timings if timings is None else timings
    timings[name] = round(time.perf_counter() - t0, 1)
    peak = memory.peak_since_reset() if measured else None
    if peak is not None:
        (cfg.stage_rss if rss is None else rss)[name] = round(peak / 1e9, 2)
    log.info("%s done in %.1f s%s", name, timings[name], "" if peak is None else f", peak RSS {peak / 1e9:.2f} GB")
    return out


def _take_freed_cpus(cfg: MainJobConfig) -> None:
    """In a lane process: once the other lanes have finished, the stages to come run on the threads
    :func:`tadsr.cli.lanes.run_lanes` now gives this lane (torch's and the runtimes', which read ``cfg.threads``
    when a stage starts; numpy's BLAS keeps the threads it started with)."""
    from tadsr.cli.lanes import lane_share

    n = lane_share()
    if n is None or n <= (cfg.threads or 1):
        return
    import torch

    torch.set_num_threads(n)
    cfg.threads = n
    log.info("%d threads from this stage on (the other lanes have finished)", n)


def run_main_job(cfg: MainJobConfig) -> int:
    """Run all stages; returns the exit code (0 all passed, 1 a parity failure).

    The format lanes (export -> INT8 -> parity of one format, :mod:`tadsr.cli.lanes`) run in parallel processes
    when ``cfg.jobs`` (or, when it is None, the CPUs and the memory budget) allow more than one; the benchmark
    then runs over every artifact in this process.
    """
    from tadsr.bench.bench import BenchConfig, run_bench
    from tadsr.export.api import check_request
    from tadsr.parity.check import write_report
    from tadsr.parity.records import ParityResult

    from tadsr.cli import lanes
    from tadsr.config import get_preset
    from tadsr.pipeline import load_models

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file")
    check_request(get_preset(cfg.preset), formats=cfg.formats, graphs=("pipeline", "components"), tile=cfg.tile,
                  precisions=("fp32",), out_dir=out / "artifacts")  # fmt: skip
    models = _stage(cfg, "load", lambda: _load(cfg, load_models))
    params_m = sum(p.numel() for net in (models.student, models.autoencoder, models.light_autoencoder)
                   if net is not None for p in net.parameters()) / 1e6  # fmt: skip
    budget = cfg.memory_budget_gb if cfg.memory_budget_gb is not None else 0.85 * lanes.available_memory_gb()
    cpus = lanes.usable_cpus()
    names = _lane_names(cfg, min(cpus, cfg.jobs or cpus))
    jobs = lanes.choose_jobs(_estimates(names, params_m), budget, cpus, cfg.jobs)
    if jobs == 1:  # lanes that cannot run side by side: one per format
        names = list(cfg.formats)
    estimates = _estimates(names, params_m)
    if jobs > 1 and any(":" in n for n in names) and not cfg.resume:
        _stage(cfg, "captures", lambda: _prefill_captures(cfg, models))
    t0 = time.perf_counter()
    if jobs == 1:
        captures = _capture_cache(out)  # one model: every artifact is calibrated from the same captures
        done = {}
        for f in cfg.formats:
            t1 = time.perf_counter()
            done[f] = _lane(cfg, f, models, captures)
            done[f].wall_s, done[f].estimate_gb = round(time.perf_counter() - t1, 1), round(estimates[f], 1)
            done[f].peak_rss_gb = max(done[f].stage_rss.values(), default=None)  # while it ran, in this process
    else:
        log.info("== %d lanes (%s), %d at once (memory budget %.1f GB) ==", len(names), ", ".join(names), jobs,
                 budget)  # fmt: skip
        level = logging.getLogger("tadsr").getEffectiveLevel()
        done = lanes.run_lanes(names, _lane_process, lambda f, threads: (cfg, f, threads, level),
                               estimates=estimates, budget_gb=budget, jobs=jobs, threads=cfg.lane_threads)  # fmt: skip
    cfg.timings["format lanes"] = round(time.perf_counter() - t0, 1)
    for res in done.values():
        cfg.timings.update(res.timings)
        cfg.stage_rss.update(res.stage_rss)
    parity = []
    for sub in ("artifacts", "int8"):
        parts = [r.parity[sub] for r in done.values() if sub in r.parity]
        merged = ParityResult(out / sub, [a for p in parts for a in p.artifacts], [s for p in parts for s in p.sets],
                              parts[0].options if parts else {})  # fmt: skip
        write_report(merged, out / "parity" / sub)
        parity.append(merged)
    data = cfg.data or default_bench_dir()
    bench = _stage(cfg, "bench", lambda: run_bench(BenchConfig(
        out_dir=out / "bench", data=data, artifacts=(out / "artifacts", out / "int8"), preset=cfg.preset,
        init=cfg.init, teacher_steps=cfg.teacher_steps, threads=cfg.threads, repeats=cfg.repeats, tile=cfg.tile,
        memory="inprocess", **_SMOKE_BENCH if cfg.smoke else {}), models=models, progress=cfg.progress))  # fmt: skip
    _summary(out, cfg, list(done.values()), parity, bench, _lane_lines(list(done.values()), jobs, budget))
    return 0 if all(p.passed for p in parity) else 1


def _load(cfg: MainJobConfig, load_models: Any) -> Any:
    return load_models(student=cfg.student, teacher=cfg.teacher, autoencoder=cfg.autoencoder, preset=cfg.preset,
                       init=cfg.init, light_autoencoder=cfg.light)  # fmt: skip


def _capture_cache(out: Path) -> Any:
    """Captures and PT2E recipe searches shared by every lane (on disk under ``out/.cache``, one computation per
    model and patch set)."""
    from tadsr.quantize.api import CaptureCache

    from tadsr.cli.resume import source_digest

    return CaptureCache(Path(out) / ".cache" / "captures", salt=source_digest())


def _prefill_captures(cfg: MainJobConfig, models: Any) -> None:
    """Capture the calibration and held-out data once, in one process per CPU, before lanes that would otherwise
    need them at the same time start: the two graph-group lanes of one format reach INT8 together, and one of them
    waited for the other's capture on one core (74 s of the quick path, session 24; a capture runs on one thread,
    :func:`tadsr.quantize.calibration.capture`). The lanes then read them from the shared folder. The key is the
    one each INT8 stage computes from its fp32 artifact's manifest (the preset and the networks' sources as export
    records them) and the patches it samples (:func:`tadsr.quantize.api`)."""
    from tadsr.cli.lanes import usable_cpus

    manifest, calib, hold = capture_request(cfg, models)
    _capture_cache(cfg.out).get(manifest, models, calib, hold, cfg.progress, workers=usable_cpus())


def capture_request(cfg: MainJobConfig, models: Any) -> tuple[dict[str, Any], tuple, tuple]:
    """(manifest, calibration patches, held-out patches) as the job's INT8 stages pass them to the captures."""
    import json

    from tadsr.quantize.calibration import DEFAULT_HOLDOUT_PATCHES, sample_calibration, sample_holdout

    manifest = json.loads(json.dumps({"preset": models.preset.to_dict(), "sources": models.sources}))
    hold_n = _SMOKE_QUANTIZE["holdout_patches"] if cfg.smoke else DEFAULT_HOLDOUT_PATCHES
    calib = sample_calibration(cfg.calib, num_patches=cfg.num_patches, tile=cfg.tile, scale=models.preset.scale)
    hold = sample_holdout(None, num_patches=hold_n, tile=cfg.tile, scale=models.preset.scale, calibration=calib[0])
    return manifest, calib, hold


def _estimates(names: list[str], params_m: float) -> dict[str, float]:
    """Each lane's estimated peak RSS (GB), from its format and the networks' size."""
    from tadsr.cli import lanes

    return {n: lanes.lane_memory_gb(lane_format(n), params_m) for n in names}


def lane_format(lane: str) -> str:
    """The format of a lane (``onnx``, or ``onnx:pipeline`` for the part of it that handles one graph group)."""
    return lane.partition(":")[0]


def _lane_names(cfg: MainJobConfig, slots: int) -> list[str]:
    """The job's lanes: one per format, except where there are fewer formats than ``slots`` (the lanes that may
    run at once: the usable CPUs, or fewer with ``--jobs``). Then a format that exports more than one graph group
    (the fused pipeline and the components) becomes one lane per group (``onnx:pipeline``,
    ``onnx:components``), the first formats first, until every slot has a lane: the quick path
    ``tadsr all --format onnx`` runs its two halves side by side instead of leaving a core idle. The groups share
    nothing but the captures and the whole-image references, which lanes share on disk anyway."""
    names: list[str] = []
    spare = slots - len(cfg.formats)
    for fmt in cfg.formats:
        graphs = _export_plan(cfg, fmt)[0]
        if spare > 0 and len(graphs) > 1:
            names += [f"{fmt}:{g}" for g in graphs]
            spare -= len(graphs) - 1
        else:
            names.append(fmt)
    return names


def _lane(cfg: MainJobConfig, lane: str, models: Any, captures: Any) -> Any:
    """One lane's chain: export, INT8 of its fp32 artifacts, parity of its folders, for a format (``lane`` is its
    name) or one graph group of it (``<format>:<group>``, see :func:`_lane_names`). Export and INT8 stages an
    earlier run finished with the same inputs are reused with ``cfg.resume`` (:mod:`tadsr.cli.resume`)."""
    from tadsr.export.api import export_model
    from tadsr.parity.check import ParityOptions, TraceCache, check_parity
    from tadsr.quantize.api import quantize_artifact

    from tadsr.cli.lanes import LaneResult
    from tadsr.cli.resume import ResumeLog, stage_key

    out = Path(cfg.out)
    fmt, _, group = lane.partition(":")
    res = LaneResult(lane)
    timings: dict[str, float] = {}
    rss: dict[str, float] = {}
    done = ResumeLog(out, lane.replace(":", "_"), cfg.resume)
    graphs, precisions = _export_plan(cfg, fmt)
    graphs = (group,) if group else graphs
    sources = {k: v.get("sha256") for k, v in models.sources.items()}
    export_key = stage_key(sources=sources, preset=cfg.preset, format=fmt, graphs=graphs, precisions=precisions,
                           tile=cfg.tile, smoke=cfg.smoke)  # fmt: skip
    exported = done.reusable(f"export {lane}", export_key, out / "artifacts")
    if exported is None:
        written = _stage(cfg, f"export {lane}", lambda: export_model(
            models, formats=(fmt,), graphs=graphs, tile=cfg.tile, precisions=precisions, out_dir=out / "artifacts",
            progress=cfg.progress, **({"n_real": 1} if cfg.smoke else {})), timings, rss)  # fmt: skip
        exported = [{"name": r.path.name, "precision": r.precision} for r in written]
        done.record(f"export {lane}", export_key, exported)
    res.fp32 = [e["name"] for e in exported]
    # the fused pipeline last: ExecuTorch then finds the PT2E search the Core ML lane made of the same graph
    # (shared through the captures folder) instead of running its own; the INT8 folders are listed in export order
    made: dict[str, list[str]] = {}
    for e in sorted(exported, key=lambda e: e["name"].startswith("pipeline-")):
        name = e["name"]
        if e["precision"] != "fp32" or not _quantized(cfg, name):
            continue
        key = stage_key(parent=_file_digests(out / "artifacts" / name), artifact=name, calib=cfg.calib,
                        num_patches=cfg.num_patches, smoke=cfg.smoke, shipped=cfg.shipped_recipes)  # fmt: skip
        int8 = done.reusable(f"quantize {name}", key, out / "int8")
        if int8 is None:
            written = _stage(cfg, f"quantize {name}", lambda: quantize_artifact(
                out / "artifacts" / name, calib=cfg.calib, num_patches=cfg.num_patches, out_dir=out / "int8",
                threads=cfg.threads, progress=cfg.progress, captures=captures, shipped_recipes=cfg.shipped_recipes,
                **_smoke_quantize(cfg, name)), timings, rss)  # fmt: skip
            int8 = [{"name": Path(p).name, "precision": "int8"} for p in written]
            done.record(f"quantize {name}", key, int8)
        made[name] = [f["name"] for f in int8]
    res.int8 = [n for e in exported for n in made.get(e["name"], [])]
    # one trace cache for the fp32 and the INT8 folders (a trace is the same torch graph); the whole-image
    # references on disk beside the captures, for the other lanes
    from tadsr.cli.resume import source_digest

    traces = TraceCache(refs_folder=out / ".cache" / "whole_refs", salt=source_digest())
    for sub, names in (("artifacts", res.fp32), ("int8", res.int8)):
        if names:
            # gate_tiles: the tile hops of a folder this run has just written come from its write's parity gate
            # where that gate ran the same cases (the fp32 exports); whole images always run
            res.parity[sub] = _stage(cfg, f"parity {lane} {sub}", lambda: check_parity(
                out / sub, options=ParityOptions(threads=cfg.threads, gate_tiles=True,
                                                 **(_SMOKE_PARITY if cfg.smoke else _FULL_PARITY)),
                traces=traces, select=names), timings, rss)  # fmt: skip (threads: read when the stage starts)
    res.timings, res.stage_rss = timings, rss
    return res


def _file_digests(folder: Path) -> dict[str, Any]:
    """What an INT8 stage depends on in its parent artifact folder: its model files' sha256 and the networks it
    was exported from (the calibration captures are rebuilt from them), as its manifest records them."""
    from tadsr.runtime.runner import read_manifest

    manifest = read_manifest(folder)
    return {"files": [(str(f["name"]), str(f["sha256"])) for f in manifest["files"]],
            "sources": manifest.get("sources")}  # fmt: skip


def _lane_process(cfg: MainJobConfig, lane: str, threads: int, level: int) -> Any:
    """A lane in its own process (:func:`tadsr.cli.lanes.run_lanes`): its logging, its threads, its models."""
    import dataclasses

    import torch

    from tadsr.cli import configure_logging
    from tadsr.cli.lanes import peak_rss_gb
    from tadsr.pipeline import load_models

    configure_logging(level)
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter(f"%(levelname)s [{lane}] %(name)s: %(message)s"))
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(cfg, threads=cfg.threads or threads, grow_threads=cfg.threads is None,
                              progress=False, timings={})  # fmt: skip
    res = _lane(cfg, lane, _load(cfg, load_models), _capture_cache(cfg.out))
    res.peak_rss_gb = max([peak_rss_gb(), *res.stage_rss.values()])  # each stage restarted the kernel's mark
    return res


# --smoke: the reduced stages (see the module docstring); every other setting is the full job's.
# The smoke writes every INT8 artifact even below its floor (no parity gate): the parity stage then gives each
# one its verdict and the exit code says whether all passed, so one run shows every failure.
# hr_confidence 0.5: the budget holds the mean; on 4 held-out patches a 95 % bound is mostly the spread of 4
# values, and the deeper search it forced took the default tier's smoke from ~10 to ~15 min (session 12)
# The Core ML encoder also gets its W8 (weight-only) twin, as in the full job: test_quantize checks both of the
# smoke's Core ML encoders instead of converting the tiny one twice more (~60 s of the tier, session 19).
_SMOKE_QUANTIZE: dict[str, Any] = {"holdout_patches": 4, "sensitivity_patches": 2, "sensitivity_budget": 8,
                                   "parity_gate": False, "hr_confidence": 0.5}
# The HR budget (quantize_artifact's default) is held by the smoke's ONNX decoder (judged through the rest of the
# fp32 chain). The other INT8 graphs keep the PSNR floor (the ONNX encoder since session 14: with gains counted
# as 0 it searches, and the tier grew from 19.2 to 23.6 min): the fused ONNX pipeline's 95-block sweep and
# search took ~3 min of its lane (session 12's tier), the ONNX denoiser's (66 blocks, a third of the budget) ~2 min,
# the PT2E decoders' ~1 min each; test_quantize covers every component's budget, the PT2E search, its sharing
# between formats and its repair loop.
_SMOKE_HR_BUDGET = {("onnx", "decoder")}
# one whole image of one tile for every format (the lanes' parity took ~5 min of the tier with 9-tile images for
# ONNX and ExecuTorch); seams between tiles: test_runtime and test_parity
_SMOKE_PARITY: dict[str, Any] = {"patches": 1, "whole_images": 1, "max_side": 64}
# one whole image per artifact set, a strip of 57 x 121 LR px (padded to 64 x 128: 1 x 3 tiles of 64 at overlap 16):
# reflect padding on both axes, a partial last tile, the middle tile blended on both sides, the crop back. What a
# whole image adds to the tile hops is the artifact inside the tiler (its noise per tile, the padding, the crop);
# the blend itself is the tiler's code on both sides of the comparison, its seams in both directions covered by
# test_runtime and test_parity. The 121 x 128 image before (3 x 3 tiles) took 9 tile runs per artifact and 9 of the
# reference: ~25 of the ~130 s of each quick-path lane (session 32), for no case the strip lacks but the other
# seam direction. The parity verb keeps 160 px (4 x 4 tiles) and two images; the parity verb's second image adds
# content, not seams, and content is what the real patches of the tile hops (and the INT8 write gate's 16 held-out
# patches) cover.
_FULL_PARITY: dict[str, Any] = {"max_side": 121, "max_rows": 57, "whole_images": 1}
_SMOKE_BENCH: dict[str, Any] = {"max_images": 1, "hr_crop": 256, "warmup": 0}
SMOKE_DEFAULTS: dict[str, Any] = {"num_patches": 8, "repeats": 1, "teacher_steps": 15}  # the shipped schedule: 1 tile


def _smoke_quantize(cfg: MainJobConfig, artifact: str) -> dict[str, Any]:
    """The smoke's quantize settings for the fp32 artifact folder ``artifact`` (``<graph>-<format>-...``)."""
    graph, fmt = artifact.split("-")[:2]
    hr = {} if (fmt, graph) in _SMOKE_HR_BUDGET else {"hr_budget_db": None}
    return {**_SMOKE_QUANTIZE, **hr} if cfg.smoke else {}


# The smoke's ExecuTorch lane lowers the fused pipeline and the encoder only: its denoiser and decoder components
# took 191 s of the lane (session 18's smoke: pipeline 357 s, denoiser 157 s, encoder 25 s, decoder 34 s, on two
# cores shared with the tier), and the fused pipeline lowers the same networks (tests/test_export_executorch.py
# checks its partitions: the denoiser inside one). The ExecuTorch component set runs in test_runtime and
# test_light_formats; the full job exports every graph.
_SMOKE_GRAPHS = {"executorch": ("pipeline", "encoder")}


def _export_plan(cfg: MainJobConfig, fmt: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(graphs, precisions) exported for ``fmt``.

    The full job exports the components (per-stage latency, INT8 per component) for ONNX and ExecuTorch, the
    fused pipeline everywhere, and Core ML in fp32 and fp16; the smoke exports pipeline + components in fp32 for
    ONNX and Core ML, and the pipeline + the encoder (the base of its INT8) for ExecuTorch (see
    :data:`_SMOKE_GRAPHS`).
    """
    if cfg.smoke:
        return _SMOKE_GRAPHS.get(fmt, ("pipeline", "components")), ("fp32",)
    if fmt == "coreml":
        return ("pipeline",), ("fp32", "fp16")
    return ("pipeline", "components"), ("fp32",)


# the graphs the smoke quantizes per format: ExecuTorch's INT8 lowering of the fused pipeline alone takes ~4 min on
# two cores and Core ML's W8A8 conversion of it ~2 min, so the PT2E formats quantize their encoder, which meets its
# floor all INT8 (their decoders need a recipe search: ~2 min of a lane, session 13's tier); the full job quantizes
# every graph, and test_quantize covers the PT2E search
_SMOKE_INT8 = {"onnx": ("pipeline", "encoder", "denoiser", "decoder"), "executorch": ("encoder",),
               "coreml": ("encoder",)}  # fmt: skip


def _quantized(cfg: MainJobConfig, artifact: str) -> bool:
    """Whether the fp32 artifact folder ``artifact`` (``<graph>-<format>-...``) gets INT8: always in the full
    job; in the smoke the graphs of :data:`_SMOKE_INT8`."""
    graph, fmt = artifact.split("-")[:2]
    return not cfg.smoke or graph in _SMOKE_INT8.get(fmt, ())


def _summary(out: Path, cfg: MainJobConfig, done: list[Any], parity: list, bench: Any, lane_lines: list[str]) -> None:
    fp32 = [n for r in done for n in r.fp32]
    int8 = [n for r in done for n in r.int8]
    lines = [
        "# tadsr main job", "",
        f"preset `{cfg.preset}`{' (random weights)' if cfg.init else ''}, tile {cfg.tile}, formats "
        f"{', '.join(cfg.formats)}{' (smoke: reduced configuration)' if cfg.smoke else ''}"
        + (f"; light autoencoder ({'shipped' if cfg.light is True else cfg.light})" if cfg.light else ""), "",
        "| stage | seconds | peak RSS GB |", "|---|---|---|",
        *(f"| {k} | {v} | {_gb(cfg.stage_rss.get(k))} |" for k, v in cfg.timings.items()), "",
        "Peak RSS per stage: that stage alone, in the process that ran it (its lane's, or this one's), with what "
        "the process already held (Linux; `-`: not measured).", "",
        *lane_lines,
        f"- fp32/fp16 artifacts: {len(fp32)} in `artifacts/`", f"- INT8 artifacts: {len(int8)} in `int8/`",
        f"- parity: {'PASS' if all(p.passed for p in parity) else 'FAIL'} (`parity/artifacts/parity.md`, "
        "`parity/int8/parity.md`)",
        f"- benchmark: `bench/{Path(bench.files.get('markdown', 'bench.md')).name}`", "",
    ]  # fmt: skip
    md = bench.files.get("markdown")
    if md is not None and Path(md).exists():
        lines += ["## Benchmark", "", Path(md).read_text()]
    fileio.write_text(out / "SUMMARY.md", "\n".join(lines))
    print("\n".join(lines))


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _lane_lines(done: list[Any], jobs: int, budget_gb: float) -> list[str]:
    """The lane table: how the format lanes ran (in parallel processes or one after the other), their wall time
    and measured peak RSS beside the estimate the scheduler used."""
    how = (f"{jobs} at once in separate processes" if jobs > 1 else "one after the other in this process")
    lines = [f"Lanes (export -> INT8 -> parity of one format, or of one graph group of it): {how}; memory budget "
             f"{budget_gb:.1f} GB.", "",
             "| lane | wall s | peak RSS GB | estimated GB |", "|---|---|---|---|"]  # fmt: skip
    for r in done:
        lines.append(f"| {r.fmt} | {r.wall_s} | {_gb(r.peak_rss_gb)} | {r.estimate_gb} |")
    return lines + [""]


def add_all_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "all", help="the main job: export, INT8, parity and benchmark of one model",
        description="Export (ONNX, ExecuTorch, Core ML), quantize to INT8, check parity and benchmark, into one folder.",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: %(default)s)")
    from tadsr.cli.common import add_light_args, add_model_args

    add_light_args(add_model_args(p))
    p.add_argument("--format", dest="formats", nargs="+", default=list(FORMAT_NAMES))
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--data", type=Path, help="HR images for the benchmark (default: shipped held-out crops)")
    p.add_argument("--calib", type=Path, help="calibration images, e.g. a DIV2K folder (default: shipped patches)")
    p.add_argument("--num-patches", type=int, help="calibration patches (default: 64, or all shipped; smoke: 8)")
    p.add_argument("--repeats", type=int, help="timed runs per system (default: 5; smoke: 1)")
    p.add_argument("--threads", type=int, help="runtime threads (default: library defaults)")
    p.add_argument("--teacher-steps", type=int, help="teacher sampling steps (default: 15, the shipped schedule)")
    p.add_argument("--jobs", type=int, help="lanes (export -> INT8 -> parity of one format; with fewer formats than "
                   "CPUs, of its pipeline or its components) run at once in separate processes (default: one per "
                   "CPU, as the memory budget allows; 1: all in this process)")
    p.add_argument("--memory-budget", type=float, dest="memory_budget_gb", metavar="GB",
                   help="peak memory the lanes running at once may need together, by their estimates "
                   "(default: 85%% of the memory available at the start)")  # fmt: skip
    p.add_argument("--lane-threads", type=int, help="threads of each lane process (default: the usable CPUs divided "
                   "by the lanes running at once)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the export and INT8 stages an earlier run into --out finished with the same model, "
                   "settings, tool versions and tadsr sources (intact folders only); parity and bench run again")
    p.add_argument("--no-shipped-recipes", dest="shipped_recipes", action="store_false",
                   help="search every INT8 recipe and calibrate every ONNX graph, even where the bundled model "
                   "ships a recipe or ONNX Runtime's ranges for the same conditions (default: start from a shipped "
                   "recipe, measure it, search only when it misses the criteria; read shipped ranges of the same "
                   "model and calibration feeds)")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="reduced configuration for CI (minutes on 2 cores): every format, pipeline + components "
                   "fp32, INT8 of the pipelines (and ONNX components), few calibration/parity cases")  # fmt: skip
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    import sys

    from tadsr.cli.common import light_choice, resolve_preset

    resolve_preset(args)
    full = {"num_patches": None, "repeats": 5, "teacher_steps": 15}
    for key, value in (SMOKE_DEFAULTS if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cfg = MainJobConfig(
        out=args.out, preset=args.preset, init=args.init, student=args.student, teacher=args.teacher,
        autoencoder=args.autoencoder, light=light_choice(args), formats=tuple(args.formats), tile=args.tile,
        data=args.data, calib=args.calib, num_patches=args.num_patches, repeats=args.repeats, threads=args.threads,
        teacher_steps=args.teacher_steps, smoke=args.smoke, progress=sys.stderr.isatty(), jobs=args.jobs,
        memory_budget_gb=args.memory_budget_gb, resume=args.resume, lane_threads=args.lane_threads,
        shipped_recipes=args.shipped_recipes,
    )  # fmt: skip
    return run_main_job(cfg)

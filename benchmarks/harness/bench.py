"""Benchmark harness: fidelity and latency of every system that can upscale, under one set of conditions.

:func:`run_bench` measures, in one run and on the same data, tile, overlap, noise seed and thread count:

* ``bicubic``: MATLAB-style bicubic x4 (:func:`tadsr.imresize.imresize`), the floor;
* ``torch-student``: the PyTorch reference one-step student (fp32), stage by stage;
* ``torch-teacher-T<steps>``: the multi-step teacher, with the same prior noise (``noises[0]`` of every tile equals
  the student's noise, because :func:`tadsr.runtime.tiling.tile_noise` draws the teacher's ``(T*C, t, t)`` noise
  from the same generator and the student's ``(C, t, t)`` noise is its first ``C`` channels);
* every artifact set given (ONNX Runtime / ExecuTorch, fp32 / fp16 / INT8; fused ``pipeline`` graphs end to end
  only, component sets per runner). Core ML is listed with its size and "needs macOS" off macOS; with
  ``coreml_sim`` it is also run through the numpy simulator, labelled as such (its times are not latencies).

Per system:

* **latency** on one LR tile (the first image's top-left tile): ``warmup`` untimed passes (the fidelity passes,
  which run the same system on tiles of the same size first, count as such), then ``repeats`` timed passes; median, p90, min and mean in ms, end to end (``e2e``) and per stage (``encoder``, ``denoiser``,
  ``decoder``), all from the same passes. The teacher's ``denoiser`` is the whole sampling loop
  (``e2e - encoder - decoder``);
* **fidelity** on whole images through the tiler: PSNR and SSIM on the Y channel (BT.601) and on RGB, with a
  ``scale``-pixel border crop (BasicSR's convention), on the 8-bit-rounded output; ``parity`` (PSNR, max abs)
  of the float output against the PyTorch student on the same tiles and noise;
* **sanity** (issue #17): LR consistency (MATLAB bicubic x1/scale of the output vs the LR input, RGB PSNR; mean
  and worst image), colour error (mean CIEDE2000 of low-passed output vs HR), and the do-nothing baseline
  ``decode(encode(bicubic(LR)))`` through the reference autoencoder (``report["baselines"]["do_nothing"]``, run
  through the same tiler; not a system). ``fidelity["sanity"]`` of each system lists why it FAILS
  (:func:`tadsr.metrics.sanity_failures`: LR consistency mean < 35 dB or worst < 30 dB; a model whose PSNR-Y
  does not beat the do-nothing path with its own colour fix); the Markdown shows those systems as red ``❌ FAIL``
  rows;
* **colour fix** (``color_fix``, :mod:`tadsr.color_fix`): ``torch-student [FIX]`` and the baseline
  ``report["baselines"]["do_nothing [FIX]"]`` beside the unfixed ones, for ``cfg.color_fix`` and for every fix an
  artifact was exported with (``graph.constants.color_fix``): such an artifact is compared with the student of
  the same fix (its parity) and must beat the do-nothing path of the same fix;
* **peak RSS**: ``memory="subprocess"`` runs each system once more in a fresh process (load, two passes over one
  tile) that measures itself: its peak while running (Linux ``VmHWM`` reset after loading) and over its whole life
  (imports and loading included); ``"inprocess"`` resets ``VmHWM`` before loading a system in this process and
  reports the peak and its rise over the RSS before loading (other systems' memory included);
* **size**: model files on disk (artifacts) or fp32 parameters in memory (PyTorch).

The report (JSON first, then Markdown, plots and an image grid) is written by :mod:`tadsr.bench.report`.
Timings carry their conditions: machine, load average before and after, library versions, threads per backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tadsr.bench.conditions import library_versions, machine_info
from tadsr.bench.config import MEMORY_MODES, REPORT_SCHEMA, BenchConfig, BenchImage, BenchResult, SystemResult
from tadsr.bench.data import load_images, output_fidelity, round8
from tadsr.formats.registry import all_formats, get_format
from tadsr.bench.systems import (
    STAGES,
    ArtifactSet,
    ArtifactSystem,
    Bicubic,
    InProcessMemory,
    System,
    TorchSystem,
    artifact_color_fix,
    find_artifact_sets,
    measure_latency,
    probe_memory,
    runner_options,
    timing_stats,
)
from tadsr.memory import lifetime_peak
from tadsr.bench.verdicts import baseline_key, compute_ratios, do_nothing_baseline, judge_sanity
from tadsr.errors import ConfigError, InputError, TadsrError
from tadsr.provenance import uses_light_autoencoder
from tadsr.runtime.imageio import from_model
from tadsr.runtime.tiling import pad_for_tiles, tile_noise


__all__ = [
    "BenchConfig",
    "BenchImage",
    "SystemResult",
    "BenchResult",
    "ArtifactSet",
    "run_bench",
    "load_images",
    "find_artifact_sets",
    "timing_stats",
    "compute_ratios",
    "machine_info",
    "library_versions",
    "MEMORY_MODES",
    "STAGES",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- run_bench


def _probe_spec(system: System, cfg: BenchConfig, preset: Any) -> dict[str, Any] | None:
    base = {"tile": None, "threads": cfg.threads, "seed": cfg.seed}
    if isinstance(system, Bicubic):
        return {**base, "kind": "bicubic"}
    if isinstance(system, ArtifactSystem):
        return {
            **base,
            "kind": "artifact",
            "dirs": {k: str(v) for k, v in system.aset.dirs.items()},
            "backend": system.backend,
            "format": system.aset.format,
        }
    if isinstance(system, TorchSystem):
        return {
            **base,
            "kind": "torch",
            "steps": system.steps,
            "light": system.light,
            "color_fix": system.color_fix,
            "model": {**cfg.model_source(), "preset": preset.to_dict()},
        }
    return None


def _resolve(cfg: BenchConfig, sets: Sequence[ArtifactSet]) -> tuple[str, int]:
    """The preset (given, else the artifacts' one) and the tile (the artifacts' one, else given, else 64)."""
    presets = {s.preset for s in sets} - {None}
    preset = cfg.preset or (presets.pop() if len(presets) == 1 else None)
    if preset is None:
        raise ConfigError(
            f"cannot tell the reference model's preset: pass --preset (the artifacts name {sorted(presets) or 'none'})"
        )
    tiles = {s.tile for s in sets}
    if len(tiles) > 1:
        raise ConfigError(
            f"the artifacts have different tiles {sorted(tiles)}; benchmark one tile at a time "
            "(every system must see the same tiles)"
        )
    tile = tiles.pop() if tiles else (cfg.tile or 64)
    if cfg.tile is not None and cfg.tile != tile:
        raise ConfigError(f"--tile {cfg.tile} differs from the artifacts' tile {tile}")
    if tile <= 0 or tile % 64:
        raise ConfigError(f"tile must be a positive multiple of 64, got {tile}")
    return preset, tile


def _prepare_out(out_dir: Path) -> None:
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / f".tadsr-bench-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the report to {out_dir}: {e.strerror or e}; choose another --out") from e


def _same_weights(manifest: Mapping[str, Any], sources: Mapping[str, Any]) -> bool | None:
    """Whether an artifact was made from the reference's student and autoencoder (None: cannot tell)."""
    theirs = manifest.get("sources") or {}
    verdict: bool | None = None
    for part in ("student", "autoencoder"):
        a, b = theirs.get(part), sources.get(part)
        if not isinstance(a, Mapping) or not isinstance(b, Mapping):
            continue
        key = "path" if "random-fill" in (a.get("path"), b.get("path")) else "sha256"
        if not a.get(key) or not b.get(key):
            continue
        verdict = (verdict is not False) and a.get(key) == b.get(key)
    return verdict


def _manifest_facts(s: ArtifactSet) -> dict[str, Any]:
    """Per graph: did parity pass at export / quantization, and which share of candidate nodes is INT8."""
    facts: dict[str, Any] = {"parity_passed": {g: m.get("parity_passed") for g, m in s.manifests.items()}}
    if s.precision == "int8":
        facts["int8_fraction"] = {g: (m.get("backend_info") or {}).get("int8_fraction") for g, m in s.manifests.items()}
    return facts


def _fixes(cfg: BenchConfig, sets: Sequence[ArtifactSet]) -> list[str]:
    """The colour fixes measured besides none: ``cfg.color_fix`` and those of the artifacts, in that order."""
    found = [cfg.color_fix, *(artifact_color_fix(s) for s in sets)]
    return [f for f in dict.fromkeys(found) if f != "none"]


def _nbytes(*nets: Any) -> int:
    return sum(p.numel() * p.element_size() for net in nets for p in net.parameters())


def _torch_record(name: str, note: str, **kw: Any) -> SystemResult:
    return SystemResult(name=name, kind="torch", format="torch", precision="fp32", layout="reference", note=note, **kw)


def _systems(cfg: BenchConfig, models: Any, sets: Sequence[ArtifactSet]) -> list[tuple[System | None, SystemResult]]:
    """Systems to run (None for listed-only ones) with their result records, in measuring order."""
    threads = {"torch": cfg.threads or "default"}
    floor = SystemResult(name="bicubic", kind="bicubic", format="numpy", precision="fp64", layout="floor",
                         note="MATLAB-style bicubic x4 (tadsr.imresize), whole image", size_bytes=0,
                         size_kind="no model", threads={"numpy": "BLAS default"})  # fmt: skip
    out: list[tuple[System | None, SystemResult]] = [(Bicubic(), floor)]
    light = models.light_autoencoder
    full = dataclasses.replace(models, light_autoencoder=None)  # the VQ-f4 path, beside the light one when loaded
    student = _torch_record("torch-student", "PyTorch reference one-step student (eager)", threads=threads,
                            size_bytes=_nbytes(models.student, models.autoencoder),
                            size_kind="fp32 parameters (student + autoencoder)")  # fmt: skip
    out.append((TorchSystem(full, None), student))
    for fix in _fixes(cfg, sets):  # the reference of artifacts exported with a colour fix, and the fix measured
        system = TorchSystem(full, None, fix)
        note = f"PyTorch reference one-step student (eager), colour fix {fix} (tadsr.color_fix)"
        out.append((system, _torch_record(system.name, note, threads=threads, size_bytes=student.size_bytes,
                                          size_kind=student.size_kind, color_fix=fix)))  # fmt: skip
    if light is not None:
        rec = _torch_record("torch-student-light", "PyTorch one-step student with the light autoencoder (eager)",
                            threads=threads, size_bytes=_nbytes(models.student, light),
                            size_kind="fp32 parameters (student + light autoencoder)")  # fmt: skip
        out.append((TorchSystem(models, None), rec))
    if cfg.teacher_steps:
        name = f"torch-teacher-T{cfg.teacher_steps}"
        if models.teacher is None:
            note = "no teacher weights: pass --teacher CKPT (or a preset with a bundled teacher)"
            out.append((None, _torch_record(name, note, status="skipped")))
        else:
            models.preset.teacher_schedule(cfg.teacher_steps)  # ConfigError now rather than mid-run
            rec = _torch_record(name, f"PyTorch teacher, {cfg.teacher_steps} steps, same prior noise", threads=threads,
                                size_bytes=_nbytes(models.teacher, models.autoencoder),
                                size_kind="fp32 parameters (teacher + autoencoder)")  # fmt: skip
            out.append((TorchSystem(full, cfg.teacher_steps), rec))
    for s in sets:
        rec = {"kind": "artifact", "format": s.format, "precision": s.precision, "layout": s.layout,
               "paths": [str(d) for d in s.dirs.values()], "size_bytes": s.size_bytes,
               "size_kind": "files on disk"}  # fmt: skip
        rec["artifact"] = _manifest_facts(s)
        same = _same_weights(next(iter(s.manifests.values())), models.sources)
        note = "" if same is not False else "exported from other weights than the reference: parity is not a check"
        opts, th = runner_options(s.format, cfg.threads)
        fmt = get_format(s.format)
        system = ArtifactSystem(s, None, opts)
        name = system.name  # "[light]" marks sets made with the light autoencoder
        rec["color_fix"] = system.color_fix
        if fmt.needs_macos and sys.platform != "darwin":
            out.append((None, SystemResult(name=name, **rec, status="needs macOS", note=note)))
            if cfg.coreml_sim and fmt.simulator:
                sim = ArtifactSystem(s, fmt.simulator, {})
                note = "numpy simulator of the Core ML program: fidelity is real, times are NOT latencies"
                out.append((sim, SystemResult(name=sim.name, **rec, simulator=True, threads=th, note=note)))
            continue
        out.append((system, SystemResult(name=name, **rec, threads=th, note=note)))
    return out


def _crop_box(hr: np.ndarray, side: int) -> tuple[int, int, int, int]:
    h, w = hr.shape[:2]
    ch, cw = min(h, side), min(w, side)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _measure(
    system: System,
    res: SystemResult,
    cfg: BenchConfig,
    images: Sequence[BenchImage],
    tile_in: tuple[np.ndarray, int],
    refs: dict[str, np.ndarray],
    crops: dict[str, list[np.ndarray]],
    progress: bool,
) -> None:
    with InProcessMemory() if cfg.memory == "inprocess" else contextlib.nullcontext() as mem:
        t0 = time.perf_counter()
        try:
            system.load()
        except (TadsrError, ImportError) as e:
            res.status, res.note = "unavailable", f"{type(e).__name__}: {e}"
            logger.warning("%s: not benchmarked: %s", res.name, res.note)
            return
        res.load_s = round(time.perf_counter() - t0, 3)
        lr_tile, tile = tile_in
        per_image = []
        for im in tqdm(images, desc=res.name, unit="img", disable=not progress, leave=False):
            sr = system.upscale(im.lr, tile=tile, overlap=cfg.overlap, seed=cfg.seed)
            if isinstance(system, TorchSystem) and system.steps is None:
                refs[(system.name, im.name)] = sr
            ref = refs.get((system.reference, im.name))
            per_image.append({"image": im.name, **output_fidelity(sr, im.hr, ref, system.scale, im.lr)})
            y, x, h, w = _crop_box(im.hr, cfg.grid_crop)
            crops.setdefault(res.name, []).append(round8(from_model(sr))[y : y + h, x : x + w])
        if per_image:
            keys = [k for k in per_image[0] if k != "image"]
            mean = {k: round(float(np.mean([p[k] for p in per_image])), 4) for k in keys}
            if "lr_cons" in mean:
                mean["lr_cons_worst"] = round(float(min(p["lr_cons"] for p in per_image)), 4)
            res.fidelity = {"mean": mean, "images": per_image}
        noise = tile_noise(cfg.seed, 0, 0, system.noise_shape(tile))[None]
        # the fidelity passes ran this system on tiles of the same size: they are its warm-up, as far as they go
        warmup = max(0, cfg.warmup - len(per_image))
        res.latency = measure_latency(system, lr_tile, noise, warmup=warmup, repeats=cfg.repeats)
        system.close()
    if mem is not None:
        res.memory = mem.result
    e2e = res.latency["e2e"]
    logger.info(
        "%s: e2e %.1f ms median (p90 %.1f) per %dpx tile%s",
        res.name,
        e2e["median_ms"],
        e2e["p90_ms"],
        tile,
        f", PSNR-Y {res.fidelity['mean']['psnr_y']:.2f} dB" if res.fidelity else "",
    )


def _latency_tile(images: Sequence[BenchImage], tile: int, seed: int) -> tuple[np.ndarray, str]:
    if not images:
        rng = np.random.default_rng(seed)
        return rng.uniform(-1.0, 1.0, (1, 3, tile, tile)).astype(np.float32), "seeded uniform random LR tile"
    padded = pad_for_tiles(images[0].lr, tile)
    return np.ascontiguousarray(padded[:, :, :tile, :tile]), f"top-left LR tile of {images[0].name} (reflect-padded)"


def _warnings(cfg: BenchConfig, machine: Mapping[str, Any], results: Sequence[SystemResult], models: Any) -> list[str]:
    w = []
    if cfg.repeats < 5:
        w.append(f"only {cfg.repeats} timed runs per system (< 5): smoke numbers, not numbers to report")
    load, cores = (machine.get("load_avg_start") or [0])[0], machine.get("cores_usable") or machine["cores_logical"]
    if cores and load > 0.75 * cores:
        w.append(f"machine busy at the start (load {load} on {cores} usable cores): latencies are inflated and noisy")
    if any("random-fill" in str(v.get("path", "")) for v in models.sources.values()):
        w.append("random weights (init random): fidelity numbers say nothing about quality; latency only")
    w += [f"{r.name}: {r.status}: {r.note}" for r in results if r.status not in ("ok", "needs macOS")]
    w += [f"{r.name}: {r.note}" for r in results if r.status == "ok" and "other weights" in r.note]
    for r in results:
        failed = [g for g, ok in r.artifact.get("parity_passed", {}).items() if ok is False]
        if failed:
            w.append(f"{r.name}: written with FAILING parity at export/quantization ({', '.join(failed)}; gate off)")
        unquantized = [g for g, f in r.artifact.get("int8_fraction", {}).items() if f == 0]
        if unquantized:
            w.append(f"{r.name}: no node is INT8 in {', '.join(unquantized)} (the recipe kept everything float)")
    return w


def run_bench(cfg: BenchConfig, *, models: Any = None, progress: bool = False) -> BenchResult:
    """Benchmark every system of ``cfg`` (see :func:`_run_bench`); on any failure (Ctrl-C included) the report
    folder is removed again if this call created it and it is still empty.

    Settings the artifacts' manifests record are taken from them unless given: the preset (``cfg.preset=None``)
    and random weights (``init=None`` and no checkpoints, while every artifact records ``random-fill`` weights).
    """
    cfg = manifest_defaults(cfg, find_artifact_sets(cfg.artifacts)) if models is None else cfg
    out = Path(cfg.out_dir)
    created = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        return _run_bench(cfg, models=models, progress=progress)
    except BaseException:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise


def manifest_defaults(cfg: BenchConfig, sets: Sequence[ArtifactSet]) -> BenchConfig:
    """``cfg`` with ``init="random"`` when no weights are given and every artifact was made from random weights."""
    if cfg.init is not None or any((cfg.student, cfg.teacher, cfg.autoencoder)) or not sets:
        return cfg
    sources = [m.get("sources") or {} for s in sets for m in s.manifests.values()]
    parts = ("student", "autoencoder")
    if all((src.get(part) or {}).get("path") == "random-fill" for src in sources for part in parts):
        logger.info("the artifacts record random-fill weights: the reference uses --init random too")
        return dataclasses.replace(cfg, init="random")
    return cfg


def _run_bench(cfg: BenchConfig, *, models: Any = None, progress: bool = False) -> BenchResult:
    """Benchmark the reference, the teacher, bicubic and the artifacts; write the report into ``cfg.out_dir``.

    Args:
        cfg: the benchmark configuration.
        models: already loaded :class:`tadsr.pipeline.Models` equal to what ``cfg``'s model fields load (saves
            loading them again; subprocess memory probes still load from ``cfg``).
        progress: tqdm bars over systems and images.

    Returns:
        :class:`BenchResult` (JSON document, per-system results, written files).

    Raises:
        ConfigError: inconsistent tiles / presets, no weights, unknown teacher schedule.
        InputError: missing or unreadable data / artifacts, unwritable ``out_dir``.
    """
    import torch

    from tadsr.bench.report import write_report
    from tadsr.pipeline import load_models

    t_start = time.perf_counter()
    machine = machine_info()
    sets = find_artifact_sets(cfg.artifacts)
    preset, tile = _resolve(cfg, sets)
    _prepare_out(cfg.out_dir)
    light = cfg.light_autoencoder
    if light is None and any(uses_light_autoencoder(m) for s in sets for m in s.manifests.values()):
        light = True  # light artifacts are compared with the student on the light autoencoder
    if models is None:
        models = load_models(
            student=cfg.student, teacher=cfg.teacher, autoencoder=cfg.autoencoder, preset=preset, init=cfg.init,
            light_autoencoder=light,
        )
    if models.preset.name != preset:
        raise ConfigError(f"the reference model is preset {models.preset.name!r} but the artifacts are {preset!r}")
    images, data_info = ([], None)
    if cfg.data is not None:
        images, data_info = load_images(
            cfg.data, lr_dir=cfg.lr_dir, scale=models.preset.scale, max_images=cfg.max_images, hr_crop=cfg.hr_crop
        )
    lr_tile, tile_source = _latency_tile(images, tile, cfg.seed)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch_threads = torch.get_num_threads()
    refs: dict[tuple[str, str], np.ndarray] = {}
    crops: dict[str, list[np.ndarray]] = {}
    plan = _systems(cfg, models, sets)
    # what this process held before the systems (libraries, the models) out of the collector's way: the collections
    # between systems then walk only what the systems made (each full one took 0.3 s in the main job's process,
    # 14 of them per quick-path bench); it all stays alive anyway, so no memory figure changes
    gc.collect()
    gc.freeze()
    try:
        for system, res in tqdm(plan, desc="systems", unit="system", disable=not progress):
            if system is None:
                continue
            if res.kind == "torch":
                res.threads = {"torch": torch_threads}
            _measure(system, res, cfg, images, (lr_tile, tile), refs, crops, progress)
            gc.collect()
            spec = _probe_spec(system, cfg, models.preset) if cfg.memory == "subprocess" else None
            if spec is not None and res.status == "ok":
                res.memory = probe_memory(spec, tile)
    finally:
        gc.unfreeze()
        torch.set_num_threads(old_threads)
    crops["HR"] = [im.hr[y : y + h, x : x + w] for im in images for y, x, h, w in [_crop_box(im.hr, cfg.grid_crop)]]
    results = [r for _, r in plan]
    full = dataclasses.replace(models, light_autoencoder=None)  # the do-nothing path through VQ-f4
    fixes = ["none", *_fixes(cfg, sets)]
    baselines = {baseline_key(f): do_nothing_baseline(full, images, tile, cfg, f) for f in fixes} if images else {}
    judge_sanity(results, baselines)
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    report = {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "versions": library_versions(),
        "conditions": {
            "preset": preset,
            "model_sources": models.sources,
            "scale": models.preset.scale,
            "tile": tile,
            "overlap": min(cfg.overlap, tile - 1),
            "blend": "feather",
            "seed": cfg.seed,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "teacher_steps": cfg.teacher_steps,
            "memory": cfg.memory,
            "threads": {
                "requested": cfg.threads,
                "torch": torch_threads,
                # the formats benchmarked here (asking ExecuTorch its pool size loads its runtime: 7 s)
                **{k: v for f in all_formats() if f.name in {r.format for r in results}
                   for k, v in f.runner_options(cfg.threads)[1].items()},
            },
            "latency_input": f"{tile_source}, {tile}x{tile} LR -> {tile * models.preset.scale}px, batch 1",
            "latency_passes": "fidelity passes (same tile size; they count as warm-up passes), then the rest of warmup untimed, then repeats timed; stages from the same passes",
            "metrics": f"8-bit output vs HR, {models.preset.scale}px border crop; Y = BT.601 (BasicSR); SSIM 11x11 "
            "Gaussian; parity = float output vs torch-student (of the same colour fix), PSNR over [-1, 1]",
            "data": data_info,
        },
        "systems": [r.to_dict() for r in results],
        "baselines": baselines,
        "ratios": compute_ratios(results),
        "warnings": _warnings(cfg, machine, results, models),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "process_peak_rss_bytes": lifetime_peak(),  # since the last system's reset of the kernel's mark (tadsr.memory)
    }
    files = write_report(report, crops, Path(cfg.out_dir))
    return BenchResult(report=report, systems=results, files=files)

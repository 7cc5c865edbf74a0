"""The systems a benchmark runs, and how their time and memory are measured (used by :mod:`tadsr.bench.bench`).

A system upscales LR tiles: ``run_tiles(lr (B,3,t,t), noise (B,*noise_shape(t))) -> (B,3,st,st)``; whole images
go through :func:`tadsr.runtime.tiling.upscale_tiled` with the same tile, overlap and seed for every system.

* :class:`Bicubic`: MATLAB-style bicubic (no model, no noise);
* :class:`TorchSystem`: :class:`tadsr.pipeline.OneStepPipeline` or :class:`tadsr.pipeline.TeacherPipeline`, with
  their ``encode`` / ``denoise`` / ``decode`` methods wrapped by a stage clock (the teacher's ``denoiser`` is the
  sampling loop: ``e2e - encoder - decoder``);
* :class:`ArtifactSystem`: :class:`tadsr.runtime.pipeline.MobileSRPipeline` over an :class:`ArtifactSet`, each
  component runner wrapped by the clock (a fused pipeline is timed end to end only).

Memory: :class:`InProcessMemory` (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``, else the rise of
``ru_maxrss``) and :func:`probe_memory`, which runs one system in a fresh interpreter
(``python -m tadsr.bench.systems --probe SPEC --result FILE``) and reads its peak RSS. Imports no torch at module
level, so probes of artifacts measure a process without it.
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.formats.registry import get_format
from tadsr.imresize import imresize
from tadsr.memory import maxrss_bytes, peak_since_reset, reset_peak, rss_bytes
from tadsr.provenance import uses_light_autoencoder
from tadsr.runtime.artifacts import COMPONENTS, ArtifactSet, find_artifact_sets
from tadsr.runtime.tiling import tile_noise, upscale_tiled

__all__ = [
    "STAGES",
    "ArtifactSet",
    "find_artifact_sets",
    "System",
    "Bicubic",
    "TorchSystem",
    "ArtifactSystem",
    "artifact_color_fix",
    "fixed_name",
    "runner_options",
    "timing_stats",
    "measure_latency",
    "InProcessMemory",
    "probe_memory",
]

logger = logging.getLogger(__name__)

STAGES = COMPONENTS  # the stages timed separately: the component graphs of a set


# ----------------------------------------------------------------------------------------------------- systems


class _Clock:
    """Collects per-stage seconds of the current pass when ``on``."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.on = False

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.laps[stage] = self.laps.get(stage, 0.0) + time.perf_counter() - t0
            return out

        return timed


class _TimedRunner:
    """A runner whose ``run`` calls are timed as one stage (same ``spec``)."""

    def __init__(self, inner: Any, clock: _Clock, stage: str) -> None:
        self.inner, self.spec = inner, inner.spec
        self.run = clock.wrap(stage, inner.run)


class System:
    """A way to upscale: ``run_tiles(lr (B,3,t,t), noise (B,*noise_shape)) -> (B,3,st,st)``, stage clock."""

    name: str
    stages: tuple[str, ...] = ()
    scale: int = 4
    reference = "torch-student"  # the PyTorch system its output is compared with (fidelity "vs reference")

    def __init__(self) -> None:
        self.clock = _Clock()

    def load(self) -> None:
        """Build / open the system (timed as ``load_s``)."""

    def noise_shape(self, tile: int) -> tuple[int, ...]:
        raise NotImplementedError

    def run_tiles(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def upscale(self, lr: np.ndarray, *, tile: int, overlap: int, seed: int) -> np.ndarray:
        """Whole image (1,3,H,W) -> (1,3,sH,sW) through the tiler (same tiles, overlap and noise for all)."""
        return upscale_tiled(
            lr,
            self.run_tiles,
            tile=tile,
            scale=self.scale,
            overlap=min(overlap, tile - 1),
            seed=seed,
            noise_shape_fn=self.noise_shape,
        )

    def timed_pass(self, lr: np.ndarray, noise: np.ndarray) -> dict[str, float]:
        """One tile end to end; returns seconds for ``e2e`` and each stage."""
        self.clock.laps, self.clock.on = {}, True
        try:
            t0 = time.perf_counter()
            self.run_tiles(lr, noise)
            e2e = time.perf_counter() - t0
        finally:
            self.clock.on = False
        return {"e2e": e2e, **self.clock.laps}

    def close(self) -> None:
        """Drop references (memory is measured per system)."""


class Bicubic(System):
    """MATLAB-style bicubic x4 of the LR (numpy), the floor; no model and no noise."""

    name = "bicubic"

    def noise_shape(self, tile: int) -> tuple[int, ...]:
        return (1, tile, tile)

    def run_tiles(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        rgb = np.moveaxis(lr[:, :3], 1, -1) * 0.5 + 0.5
        out = np.stack([np.clip(imresize(x, float(self.scale)), 0.0, 1.0) for x in rgb])
        return np.moveaxis(out, -1, 1) * 2.0 - 1.0

    def upscale(self, lr: np.ndarray, *, tile: int, overlap: int, seed: int) -> np.ndarray:
        return self.run_tiles(lr, lr[:, :1])  # deterministic and local: the whole image at once


def fixed_name(name: str, color_fix: str) -> str:
    """A system's or baseline's name with its colour fix: ``torch-student [luma]`` (unchanged for ``none``)."""
    return name if color_fix == "none" else f"{name} [{color_fix}]"


class TorchSystem(System):
    """The PyTorch reference student, or the teacher with ``steps`` steps; ``color_fix`` as the pipelines'."""

    stages = STAGES

    def __init__(self, models: Any, steps: int | None, color_fix: str = "none") -> None:
        super().__init__()
        self.models, self.steps, self.color_fix = models, steps, color_fix
        self.light = models.light_autoencoder is not None
        self.name = "torch-student" if steps is None else f"torch-teacher-T{steps}"
        if self.light:
            self.name += "-light"
            self.reference = "torch-student-light"
        self.name, self.reference = fixed_name(self.name, color_fix), fixed_name(self.reference, color_fix)
        self.scale = models.preset.scale
        self.channels = models.preset.vq.embed_dim

    def load(self) -> None:
        from tadsr.pipeline import OneStepPipeline, TeacherPipeline

        fix = self.color_fix
        pipe = (OneStepPipeline(self.models, color_fix=fix) if self.steps is None
                else TeacherPipeline(self.models, self.steps, color_fix=fix))  # fmt: skip
        pipe.encode = self.clock.wrap("encoder", pipe.encode)  # type: ignore[method-assign]
        pipe.decode = self.clock.wrap("decoder", pipe.decode)  # type: ignore[method-assign]
        if self.steps is None:
            pipe.denoise = self.clock.wrap("denoiser", pipe.denoise)  # type: ignore[method-assign]
        self.pipe = pipe

    def noise_shape(self, tile: int) -> tuple[int, ...]:
        return (self.channels * (self.steps or 1), tile, tile)

    def run_tiles(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))
        n = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
        with torch.inference_mode():
            if self.steps is None:
                return self.pipe(x, noise=n).numpy()
            b, _, t, _ = lr.shape  # (B, T*C, t, t) -> (T, B, C, t, t): noises[0] is the student's noise
            return self.pipe(x, noises=n.reshape(b, self.steps, self.channels, t, t).transpose(0, 1)).numpy()

    def timed_pass(self, lr: np.ndarray, noise: np.ndarray) -> dict[str, float]:
        laps = super().timed_pass(lr, noise)
        if self.steps is not None:  # the sampling loop: everything between encoding and decoding
            laps["denoiser"] = laps["e2e"] - laps["encoder"] - laps["decoder"]
        return laps

    def close(self) -> None:
        self.pipe = None


class DoNothingSystem(System):
    """The do-nothing baseline ``decode(encode(bicubic x4(LR)))`` through the reference autoencoder (no denoiser).

    Not a benchmarked system: ``tadsr bench`` runs it for fidelity only, as the floor every model must beat.
    """

    stages = ("encoder", "decoder")
    name = "do-nothing"

    def __init__(self, models: Any, color_fix: str = "none") -> None:
        super().__init__()
        self.models, self.color_fix = models, color_fix
        self.scale = models.preset.scale
        self.channels = models.preset.vq.embed_dim

    def load(self) -> None:
        from tadsr.pipeline import DoNothingPipeline

        pipe = DoNothingPipeline(self.models, color_fix=self.color_fix)
        pipe.encode = self.clock.wrap("encoder", pipe.encode)  # type: ignore[method-assign]
        pipe.decode = self.clock.wrap("decoder", pipe.decode)  # type: ignore[method-assign]
        self.pipe = pipe

    def noise_shape(self, tile: int) -> tuple[int, ...]:
        return (self.channels, tile, tile)

    def run_tiles(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.pipe(torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))).numpy()

    def close(self) -> None:
        self.pipe = None


def artifact_color_fix(aset: ArtifactSet) -> str:
    """The colour fix an artifact set's output carries (``tadsr export --color-fix``; fused pipelines only)."""
    fixes = {str(((m.get("graph") or {}).get("constants") or {}).get("color_fix", "none"))
             for m in aset.manifests.values()}  # fmt: skip
    return next(iter(fixes - {"none"}), "none")


class ArtifactSystem(System):
    """An artifact set through :class:`tadsr.runtime.pipeline.MobileSRPipeline` (host-side prior sample)."""

    def __init__(self, aset: ArtifactSet, backend: str | None, runner_opts: dict[str, Any]) -> None:
        super().__init__()
        self.aset, self.backend, self.runner_opts = aset, backend, runner_opts
        self.name = aset.name if backend != "coreml-sim" else f"{aset.name} [coreml-sim]"
        if any(uses_light_autoencoder(m) for m in aset.manifests.values()):  # same folder names as the full ones
            self.name = aset.name + " [light]" + self.name[len(aset.name) :]
            self.reference = "torch-student-light"
        self.color_fix = artifact_color_fix(aset)
        self.reference = fixed_name(self.reference, self.color_fix)  # compared with the reference of the same fix
        self.stages = STAGES if aset.layout == "components" else ()

    def load(self) -> None:
        from tadsr.runtime.pipeline import MobileSRPipeline

        self.mobile = MobileSRPipeline(dict(self.aset.dirs), backend=self.backend, **self.runner_opts)
        self.scale = self.mobile.scale
        if not self.mobile.fused:
            self.mobile.runners = {g: _TimedRunner(r, self.clock, g) for g, r in self.mobile.runners.items()}

    def noise_shape(self, tile: int) -> tuple[int, ...]:
        return tuple(self.mobile.noise_shape)

    def run_tiles(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self.mobile.run_tiles(lr, noise)

    def close(self) -> None:
        self.mobile = None


def runner_options(fmt: str, threads: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runner options and the thread setting to record for a format (its registry entry decides)."""
    return get_format(fmt).runner_options(threads)


# -------------------------------------------------------------------------------------------------- measuring


def time_calls(fn: Callable[[], Any], *, warmup: int, runs: int) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed: :func:`timing_stats` + ``warmup``."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return {**timing_stats(seconds), "warmup": warmup}


def timing_stats(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, p90 (linear interpolation), min and mean in ms, plus every run."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": round(float(np.median(ms)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "min_ms": round(float(ms.min()), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "runs": len(ms),
        "runs_ms": [round(float(x), 3) for x in ms],
    }


def measure_latency(system: System, lr: np.ndarray, noise: np.ndarray, *, warmup: int, repeats: int) -> dict[str, Any]:
    """``warmup`` untimed passes, then ``repeats`` timed ones: :func:`timing_stats` for ``e2e`` and each stage."""
    for _ in range(warmup):
        system.run_tiles(lr, noise)
    passes = [system.timed_pass(lr, noise) for _ in range(repeats)]
    return {k: timing_stats([p[k] for p in passes]) for k in ("e2e", *system.stages)}


class InProcessMemory:
    """Peak RSS while one system is loaded and run in this process."""

    def __enter__(self) -> InProcessMemory:
        gc.collect()
        self.reset = reset_peak()
        self.before = rss_bytes() if self.reset else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.reset:
            peak = peak_since_reset() or 0
            self.result = {
                "method": "inprocess-vmhwm",
                "peak_rss_bytes": peak,
                "rise_bytes": peak - (self.before or 0),
                "note": "peak RSS of this process while the system was loaded and run (VmHWM reset "
                "before loading); includes the other systems' memory still held",
            }
        else:
            peak = maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.result = {
                "method": "inprocess-maxrss-delta",
                "peak_rss_bytes": None,
                "process_peak_rss_bytes": peak,
                "rise_bytes": peak - self.before,
                "note": "rise of this process's ru_maxrss: a lower bound (0 when an earlier system peaked higher)",
            }


# ------------------------------------------------------------------------------------------- subprocess probe


def _probe_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: load one system, drop what it does not use, run one tile twice, report RSS."""
    threads = spec["threads"]
    system: System
    if spec["kind"] == "bicubic":
        rss_import = rss_bytes()
        system = Bicubic()
    elif spec["kind"] == "artifact":
        from tadsr.runtime.pipeline import MobileSRPipeline  # noqa: F401  (imports counted before loading)

        rss_import = rss_bytes()
        opts, _ = runner_options(spec["format"], threads)
        aset = ArtifactSet("probe", spec["format"], "", 0, "", {k: Path(v) for k, v in spec["dirs"].items()})
        system = ArtifactSystem(aset, spec["backend"], opts)
    else:
        import torch

        from tadsr.config import Preset
        from tadsr.pipeline import load_models

        rss_import = rss_bytes()
        if threads:
            torch.set_num_threads(threads)
        src = spec["model"]
        models = load_models(
            student=src["student"],
            teacher=src["teacher"],
            autoencoder=src["autoencoder"],
            preset=Preset.from_dict(src["preset"]),
            init=src["init"],
            light_autoencoder=True if spec.get("light") else None,
        )
        if spec["steps"] is None:
            models.teacher = None  # load_models loads both networks; keep only what this system runs
        else:
            models.student = None  # type: ignore[assignment]
        system = TorchSystem(models, spec["steps"], spec.get("color_fix", "none"))
        del models
    system.load()
    gc.collect()
    rss_load = rss_bytes()
    hwm_load = peak_since_reset()  # this process's own peak so far: imports + loading (Linux)
    reset = reset_peak()
    tile = int(spec["tile"])
    rng = np.random.default_rng(spec["seed"])
    lr = rng.uniform(-1, 1, (1, 3, tile, tile)).astype(np.float32)
    noise = tile_noise(spec["seed"], 0, 0, system.noise_shape(tile))[None]
    for _ in range(2):
        system.run_tiles(lr, noise)
    run = peak_since_reset() if reset else None
    if hwm_load is not None and run is not None:
        lifetime = max(hwm_load, run)
    else:  # no /proc: getrusage (macOS reports bytes; a child's own figure there)
        lifetime = maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {
        "peak_rss_bytes": run if run is not None else lifetime,
        "peak_rss_lifetime_bytes": lifetime,
        "rss_after_import_bytes": rss_import,
        "rss_after_load_bytes": rss_load,
        "torch_imported": "torch" in sys.modules,
    }


def probe_memory(spec: dict[str, Any], tile: int) -> dict[str, Any]:
    """Run one system in a fresh interpreter (load, two passes over one tile) and return its peak RSS.

    The child measures itself (Linux ``VmHWM``): ``ru_maxrss`` from ``wait4`` is not used because on Linux a
    child started by fork/vfork + exec inherits the parent's high-water mark at exec, so it would report this
    (large) process's RSS.
    """
    spec = {**spec, "tile": tile}
    with tempfile.TemporaryDirectory(prefix="tadsr-bench-probe-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "tadsr.bench.systems", "--probe", json.dumps(spec), "--result", str(result)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0 or not result.is_file():
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            return {"method": "subprocess", "error": f"probe exited with {proc.returncode}: {' | '.join(tail)}"}
        child = json.loads(result.read_text())
    return {
        "method": "subprocess",
        **child,
        "probe_s": round(time.perf_counter() - t0, 2),
        "note": "fresh process with this system only: peak_rss_bytes is its peak while running (VmHWM reset after "
        "loading), peak_rss_lifetime_bytes includes imports and loading",
    }


# ------------------------------------------------------------------------------------------------- probe entry


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m tadsr.bench.systems --probe JSON --result FILE``: the memory probe's child side."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tadsr.bench.systems", description="memory probe (internal)")
    p.add_argument("--probe", required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    out = _probe_child(json.loads(args.probe))
    args.result.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

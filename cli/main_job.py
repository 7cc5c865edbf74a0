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
    formats: tuple[str, ...] = FORMAT_NAMES
    tile: int = 64
    data: Path | None = None
    calib: Path | None = None
    num_patches: int | None = None
    repeats: int = 5
    threads: int | None = None
    teacher_steps: int = 15
    progress: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _stage(cfg: MainJobConfig, name: str, fn: Any) -> Any:
    log.info("== %s ==", name)
    t0 = time.perf_counter()
    out = fn()
    cfg.timings[name] = round(time.perf_counter() - t0, 1)
    log.info("%s done in %.1f s", name, cfg.timings[name])
    return out


def run_main_job(cfg: MainJobConfig) -> int:
    """Run all stages; returns the exit code (0 all passed, 1 a parity failure)."""
    from tadsr.bench.bench import BenchConfig, run_bench
    from tadsr.export.api import check_request, export_model
    from tadsr.parity.check import ParityOptions, TraceCache, check_parity, write_report
    from tadsr.quantize.api import CaptureCache, quantize_artifact

    from tadsr.config import get_preset
    from tadsr.pipeline import load_models

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file")
    check_request(get_preset(cfg.preset), formats=cfg.formats, graphs=("pipeline", "components"), tile=cfg.tile,
                  precisions=("fp32",), out_dir=out / "artifacts")  # fmt: skip
    models = _stage(cfg, "load", lambda: load_models(
        student=cfg.student, teacher=cfg.teacher, autoencoder=cfg.autoencoder, preset=cfg.preset, init=cfg.init))
    # Components (per-stage latency, INT8 per component) for ONNX and ExecuTorch; the fused pipeline everywhere.
    fp32: list[Any] = []
    for fmt in cfg.formats:
        graphs = ("pipeline",) if fmt == "coreml" else ("pipeline", "components")
        precisions = ("fp32", "fp16") if fmt == "coreml" else ("fp32",)
        fp32 += _stage(cfg, f"export {fmt}", lambda: export_model(
            models, formats=(fmt,), graphs=graphs, tile=cfg.tile, precisions=precisions, out_dir=out / "artifacts",
            progress=cfg.progress))  # fmt: skip
    int8: list[Path] = []
    captures = CaptureCache()  # one model: every artifact is calibrated from the same captures
    for res in fp32:
        if res.precision != "fp32":
            continue
        int8 += _stage(cfg, f"quantize {res.path.name}", lambda: quantize_artifact(
            res.path, calib=cfg.calib, num_patches=cfg.num_patches, out_dir=out / "int8", threads=cfg.threads,
            progress=cfg.progress, captures=captures))  # fmt: skip
    parity = _stage(cfg, "parity", lambda: _parity(out, cfg, check_parity, write_report, ParityOptions,
                                                     TraceCache()))
    data = cfg.data or default_bench_dir()
    bench = _stage(cfg, "bench", lambda: run_bench(BenchConfig(
        out_dir=out / "bench", data=data, artifacts=(out / "artifacts", out / "int8"), preset=cfg.preset,
        init=cfg.init, teacher_steps=cfg.teacher_steps, threads=cfg.threads, repeats=cfg.repeats, tile=cfg.tile,
        memory="inprocess"), models=models, progress=cfg.progress))  # fmt: skip
    _summary(out, cfg, fp32, int8, parity, bench)
    return 0 if all(p.passed for p in parity) else 1


def _parity(out: Path, cfg: MainJobConfig, check_parity: Any, write_report: Any, options_cls: Any,
            traces: Any) -> list[Any]:  # fmt: skip
    """Parity of the fp32 and the INT8 folders; one trace cache for both (a trace is the same torch graph)."""
    results = []
    for sub in ("artifacts", "int8"):
        res = check_parity(out / sub, options=options_cls(threads=cfg.threads), traces=traces)
        write_report(res, out / "parity" / sub)
        results.append(res)
    return results


def _summary(out: Path, cfg: MainJobConfig, fp32: list, int8: list, parity: list, bench: Any) -> None:
    lines = [
        "# tadsr main job", "",
        f"preset `{cfg.preset}`{' (random weights)' if cfg.init else ''}, tile {cfg.tile}, formats "
        f"{', '.join(cfg.formats)}", "",
        "| stage | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in cfg.timings.items()), "",
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


def add_all_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "all", help="the main job: export, INT8, parity and benchmark of one model",
        description="Export (ONNX, ExecuTorch, Core ML), quantize to INT8, check parity and benchmark, into one folder.",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: %(default)s)")
    from tadsr.cli.common import add_model_args

    add_model_args(p)
    p.add_argument("--format", dest="formats", nargs="+", default=list(FORMAT_NAMES))
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--data", type=Path, help="HR images for the benchmark (default: shipped held-out crops)")
    p.add_argument("--calib", type=Path, help="calibration images, e.g. a DIV2K folder (default: shipped patches)")
    p.add_argument("--num-patches", type=int, help="calibration patches (default: 64, or all shipped)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per system (default: %(default)s)")
    p.add_argument("--threads", type=int, help="runtime threads (default: library defaults)")
    p.add_argument("--teacher-steps", type=int, default=15)
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    import sys

    from tadsr.cli.common import resolve_preset

    resolve_preset(args)
    cfg = MainJobConfig(
        out=args.out, preset=args.preset, init=args.init, student=args.student, teacher=args.teacher,
        autoencoder=args.autoencoder, formats=tuple(args.formats), tile=args.tile,
        data=args.data, calib=args.calib, num_patches=args.num_patches, repeats=args.repeats, threads=args.threads,
        teacher_steps=args.teacher_steps, progress=sys.stderr.isatty(),
    )  # fmt: skip
    return run_main_job(cfg)

"""``tadsr bench``: the thin CLI layer over :func:`tadsr.bench.bench.run_bench`.

The main CLI registers the subcommand with :func:`add_bench_parser` (which sets ``func=run_bench_cli``); it
configures logging and turns :class:`~tadsr.errors.TadsrError` into exit status 2. This module prints only the
Markdown table and the paths of the files written (to stdout).

Examples::

    tadsr bench --preset tiny --init random --artifacts out/ --data tadsr/data/calib --max-images 2 --out bench/
    tadsr bench --student s.pth --teacher t.pth --autoencoder ae.pth --artifacts out/onnx out/int8 \\
        --data DIV2K_valid_HR --threads 4 --out bench/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_bench_parser", "run_bench_cli", "config_from_args"]

logger = logging.getLogger(__name__)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "bench",
        help="fidelity and latency of artifacts vs the PyTorch reference, the teacher and bicubic",
        description="Benchmark, under one set of conditions: bicubic x4, the PyTorch reference student, the "
        "multi-step teacher (same prior noise) and every given artifact set. Latency per tile (median / p90 per "
        "stage), peak RSS, sizes, and PSNR / SSIM (Y and RGB) on whole images through the tiler. Writes "
        "report.json first, then report.md, plots and an image grid into --out. Exit status 1 if an artifact "
        "could not be run.",
    )
    from tadsr.cli.common import add_light_args, add_model_args

    title = "reference model (default: the artifacts' preset with its bundled weights)"
    g = add_model_args(p, default_preset=None, title=title,
                       preset_help="model preset (default: the one recorded in the artifacts)")  # fmt: skip
    add_light_args(g)
    d = p.add_argument_group("systems and data")
    d.add_argument(
        "--artifacts",
        type=Path,
        nargs="*",
        default=[],
        metavar="DIR",
        help="artifact folders or folders of artifacts (every runnable set inside is benchmarked)",
    )
    d.add_argument("--data", type=Path, help="HR image folder or file (LR by MATLAB bicubic /4); omit for latency only")
    d.add_argument("--lr", dest="lr_dir", type=Path, help="LR partners of the HR images ({stem}x4.* or {stem}.*)")
    d.add_argument("--max-images", type=int, help="use at most N images")
    d.add_argument("--hr-crop", type=int, help="centre-crop HR images to at most N px per side (faster)")
    d.add_argument("--teacher-steps", type=int, default=15, help="teacher steps, 0 for none (default: %(default)s)")
    d.add_argument("--color-fix", choices=["none", "wavelet", "adain", "luma"], default="none",
                   help="also the student and the do-nothing baseline with this colour fix (artifacts exported with "
                        "a fix get those rows anyway, as their reference and floor; default: %(default)s)")  # fmt: skip
    d.add_argument(
        "--coreml-sim",
        action="store_true",
        help="also run Core ML artifacts in the numpy simulator off macOS (labelled; not a latency)",
    )
    c = p.add_argument_group("conditions")
    c.add_argument("--threads", type=int, help="torch / ONNX Runtime / ExecuTorch threads (default: library defaults)")
    c.add_argument("--repeats", type=int, default=5, help="timed runs per system, >= 5 (default: %(default)s)")
    c.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="tile noise seed (default: %(default)s)")
    c.add_argument("--tile", type=int, help="LR tile (default: the artifacts' tile, else 64)")
    c.add_argument("--overlap", type=int, default=16, help="LR overlap between tiles (default: %(default)s)")
    c.add_argument(
        "--memory",
        choices=["subprocess", "inprocess", "off"],
        default="subprocess",
        help="peak RSS per system: a fresh process per system (default), this process, or none",
    )
    c.add_argument("--smoke", action="store_true", help="allow --repeats below 5 (numbers not worth reporting)")
    p.add_argument("--out", type=Path, required=True, help="report folder (created; files replaced atomically)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.set_defaults(func=run_bench_cli)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`tadsr.bench.bench.BenchConfig` of parsed arguments."""
    from tadsr.bench.bench import BenchConfig
    from tadsr.cli.common import light_choice

    from tadsr.errors import ConfigError

    if args.repeats < 5 and not args.smoke:
        raise ConfigError(
            f"--repeats {args.repeats} < 5: a median needs at least 5 runs (add --smoke for a quick check)"
        )
    return BenchConfig(
        out_dir=args.out,
        data=args.data,
        lr_dir=args.lr_dir,
        artifacts=tuple(args.artifacts),
        preset=args.preset,
        student=args.student,
        teacher=args.teacher,
        autoencoder=args.autoencoder,
        init=args.init,
        light_autoencoder=light_choice(args),
        teacher_steps=args.teacher_steps,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        tile=args.tile,
        overlap=args.overlap,
        memory=args.memory,
        coreml_sim=args.coreml_sim,
        max_images=args.max_images,
        hr_crop=args.hr_crop,
        color_fix=args.color_fix,
    )


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run ``tadsr bench``; prints the Markdown report and the files written.

    Returns:
        0, or 1 when an artifact set could not be run (its runner is missing or it failed to load).
    """
    from tadsr.bench.bench import run_bench

    cfg = config_from_args(args)
    progress = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    result = run_bench(cfg, progress=progress)
    print(result.files["markdown"].read_text(), end="")
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0 if result.ok else 1

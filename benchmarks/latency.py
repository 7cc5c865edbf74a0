"""Latency run: per-stage latency per tile, peak RSS and sizes of the reference, the teacher and exported files.

No images: every system runs the same seeded LR tile (latency does not depend on the content). By default the
official-size model with deterministic random weights, exported to ONNX (fused pipeline + components) into
``<work>/artifacts/<preset>-t<tile>`` (reused when already there); add ready artifact folders (e.g. INT8 from
``tadsr quantize``) with ``--artifacts``. The report (report.json first, then report.md and plots) goes to
``<work>/report``; the per-stage table and the ratios student / teacher, export / eager, INT8 / fp32 are printed.
``--int8`` also quantizes the exported artifacts (``tadsr.quantize.api.quantize_artifact``, shipped calibration set;
slow at the official size) into ``<work>/artifacts/<preset>-t<tile>-int8``.

    python benchmarks/latency.py --work out/latency --threads 2
    python benchmarks/latency.py --preset tiny --work /tmp/lat --repeats 5 --formats onnx executorch
    python benchmarks/latency.py --work out/latency --artifacts out/int8 --no-export
    python benchmarks/latency.py --preset tiny --work /tmp/lat --int8
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("tadsr.benchmarks.latency")


def ensure_exported(models: Any, formats: Sequence[str], graphs: Sequence[str], tile: int, out: Path) -> Path:
    """Export ``graphs`` (``pipeline`` / ``components``) in ``formats`` into ``out``, except sets already there.

    Sets from an earlier call are reused (delete ``out`` to re-export); the benchmark notes any artifact made from
    other weights than the reference.
    """
    from tadsr.bench.systems import find_artifact_sets
    from tadsr.errors import InputError
    from tadsr.export.api import export_model

    try:
        have = {(s.format, s.layout) for s in find_artifact_sets([out]) if s.tile == tile}
    except InputError:
        have = set()
    layouts = {"pipeline": "fused", "components": "components"}
    todo = [f for f in formats if any((f, layouts[g]) not in have for g in graphs)]
    if todo:
        logger.info("exporting %s %s (tile %d) to %s ...", "/".join(todo), "+".join(graphs), tile, out)
        export_model(models, formats=todo, graphs=graphs, tile=tile, out_dir=out, parity_gate=False, n_real=1,
                     progress=sys.stderr.isatty())  # fmt: skip
    else:
        logger.info("reusing the artifacts in %s", out)
    return out


def ensure_quantized(fp32_dir: Path, formats: Sequence[str], threads: int | None, *, gate: bool) -> list[Path]:
    """INT8 artifacts (``tadsr quantize`` with the shipped calibration set) of every fp32 artifact in ``fp32_dir``.

    Written into ``<fp32_dir>-int8`` (reused when there). ``gate=False`` keeps an INT8 file below its parity floor
    (recorded in its manifest): right for random weights, where only latency counts. Returns that folder (or nothing).
    """
    from tadsr.quantize.api import CaptureCache, quantize_artifact
    from tadsr.runtime.runner import read_manifest

    out = fp32_dir.parent / f"{fp32_dir.name}-int8"
    captures = CaptureCache()  # one model: calibrate every artifact from the same captures
    for d in sorted(p for p in fp32_dir.iterdir() if (p / "manifest.json").is_file()):
        m = read_manifest(d)
        if m["precision"] != "fp32" or m["format"] not in formats or m["format"] == "coreml":
            continue
        if (out / d.name.replace("-fp32-", "-int8-")).is_dir():
            continue
        logger.info("quantizing %s -> %s ...", d.name, out)
        quantize_artifact(d, out_dir=out, threads=threads, parity_gate=gate, progress=sys.stderr.isatty(),
                          captures=captures)  # fmt: skip
    return [out] if out.is_dir() else []


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="work folder (artifacts/ and report/ inside)")
    p.add_argument("--preset", default="official-x4")
    p.add_argument("--init", default="random", choices=["random", ""], help="'' for checkpoints / bundled weights")
    p.add_argument("--student", type=Path)
    p.add_argument("--teacher", type=Path)
    p.add_argument("--autoencoder", type=Path)
    p.add_argument("--formats", nargs="+", default=["onnx"], help="formats to export (default: onnx)")
    p.add_argument("--graphs", nargs="+", default=["pipeline", "components"])
    p.add_argument("--no-export", dest="export", action="store_false", help="only benchmark --artifacts")
    p.add_argument("--int8", action="store_true", help="also quantize the exported artifacts (tadsr quantize; slow)")
    p.add_argument("--artifacts", type=Path, nargs="*", default=[], help="more artifact folders (e.g. INT8)")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--teacher-steps", type=int, default=15)
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.repeats < 5:
        raise SystemExit("--repeats must be >= 5 (median and p90 of at least 5 runs)")
    import torch

    from tadsr.bench.bench import BenchConfig, run_bench
    from tadsr.bench.report import render_ratios
    from tadsr.pipeline import load_models

    if args.threads:
        torch.set_num_threads(args.threads)
    init = args.init or None
    models = load_models(student=args.student, teacher=args.teacher, autoencoder=args.autoencoder,
                         preset=args.preset, init=init)  # fmt: skip
    artifacts = list(args.artifacts)
    if args.export:
        out = args.work / "artifacts" / f"{args.preset}-t{args.tile}"
        artifacts.insert(0, ensure_exported(models, args.formats, args.graphs, args.tile, out))
        if args.int8:
            artifacts[1:1] = ensure_quantized(out, args.formats, args.threads, gate=init is None)
    cfg = BenchConfig(out_dir=args.work / "report", artifacts=tuple(artifacts), preset=args.preset,
                      student=args.student, teacher=args.teacher, autoencoder=args.autoencoder, init=init,
                      teacher_steps=args.teacher_steps, threads=args.threads, repeats=args.repeats,
                      warmup=args.warmup, tile=args.tile, memory=args.memory)  # fmt: skip
    result = run_bench(cfg, models=models, progress=sys.stderr.isatty())
    print(render_ratios(result.report), end="")
    for w in result.report["warnings"]:
        print(f"warning: {w}")
    print(f"report: {result.files['json']}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

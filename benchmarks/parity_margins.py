"""Parity floors with measured margins: how far each exported file is from the floor that would fail it.

For one preset (default ``tiny``, random fill) this exports the requested graphs to each format / precision
(``export_model`` with the parity gate off, so nothing is hidden), optionally quantizes the fp32 ONNX and
ExecuTorch artifacts to INT8 (``quantize_artifact``), then runs ``tadsr.parity.check.check_parity`` on everything:
seeded + real patches per graph and whole images through the tiler for the pipeline graph and the component
set. The table lists, per precision x graph x output, the floor from ``tadsr/numerics.json`` and, per
format, the worst measured value over the runtime hops (export-ready torch -> runtime, reference -> runtime)
and both input kinds, with the margin: PSNR - floor (dB) and floor max abs / measured max abs (x).

Core ML runs through ``tadsr.runtime.coreml_sim`` on Linux (a numerical model of Core ML, not the device).
The JSON (conditions + rows) is written before the table is printed::

    python benchmarks/parity_margins.py --formats onnx executorch coreml --int8 --out /tmp/margins
    python benchmarks/parity_margins.py --artifacts out/            # margins of existing artifact folders
    python benchmarks/parity_margins.py --artifacts out/ --int8     # ... after quantizing their fp32 ones
    python benchmarks/parity_margins.py --preset official-x4 ...    # slow: full-size, random weights
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("tadsr.benchmarks.parity_margins")

DEFAULT_PRECISIONS = {"onnx": ("fp32", "fp16"), "executorch": ("fp32",), "coreml": ("fp32", "fp16")}


def _conditions(args: argparse.Namespace) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for dist in ("torch", "onnx", "onnxruntime", "executorch", "coremltools", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"preset": args.preset, "weights": "random fill" if not args.artifacts else "from the manifests",
            "tile": args.tile, "threads": args.threads, "patches": args.patches, "whole_images": args.whole_images,
            "max_side": args.max_side, "seed": args.seed, "os": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "coreml": "tadsr.runtime.coreml_sim (numpy model of Core ML; not the device)"}  # fmt: skip


def _export(args: argparse.Namespace, work: Path) -> list[str]:
    """Export (and quantize) into ``work``; returns notes on what could not be made."""
    import torch
    from tadsr.export.api import export_model

    from tadsr.errors import TadsrError
    from tadsr.pipeline import load_models

    torch.set_num_threads(args.threads)
    models = load_models(preset=args.preset, init="random")
    notes = []
    for fmt in args.formats:
        precs = args.precisions or DEFAULT_PRECISIONS[fmt]
        t0 = time.perf_counter()
        try:
            export_model(models, formats=(fmt,), graphs=args.graphs, tile=args.tile, precisions=precs, out_dir=work,
                         parity_gate=False, n_real=1)  # fmt: skip
        except TadsrError as e:
            notes.append(f"{fmt} {'/'.join(precs)}: not exported ({e})")
            logger.warning("%s", notes[-1])
        logger.info("exported %s %s in %.0fs", fmt, precs, time.perf_counter() - t0)
    if args.int8:
        notes += _quantize(args, work)
    return notes


def _quantize(args: argparse.Namespace, work: Path) -> list[str]:
    from tadsr.errors import TadsrError

    try:
        from tadsr.quantize.api import CaptureCache, quantize_artifact
    except ImportError as e:
        return [f"int8: the quantize stage is not installed ({e})"]
    notes = []
    captures = CaptureCache()  # one model: calibrate every artifact from the same captures
    for d in sorted(work.glob("*-fp32-t*")):
        fmt = d.name.split("-")[1]
        if fmt not in args.int8_formats or (work / d.name.replace("-fp32-", "-int8-")).exists():
            continue
        t0 = time.perf_counter()
        try:
            quantize_artifact(d, out_dir=work, parity_gate=False, num_patches=32, holdout_patches=4,
                              sensitivity_patches=2, threads=args.threads, captures=captures)  # fmt: skip
        except TadsrError as e:
            notes.append(f"int8 {d.name}: not quantized ({e})")
            logger.warning("%s", notes[-1])
        logger.info("quantized %s in %.0fs", d.name, time.perf_counter() - t0)
    return notes


def _rows(result: Any) -> list[dict[str, Any]]:
    """One row per artifact x output (worst over runtime hops and input kinds), one per whole-image set."""
    rows = []
    for a in result.artifacts:
        if a.error:
            rows.append({"artifact": a.name, "graph": a.graph, "format": a.format, "precision": a.precision,
                         "error": a.error})  # fmt: skip
            continue
        for name in dict.fromkeys(o.output for o in a.outputs):
            hops = [o for o in a.outputs if o.output == name and "runtime" in o.hop]
            w = min(hops, key=lambda o: o.psnr)
            mx = max(o.max_abs for o in hops)
            q = [o.qsteps for o in hops if o.qsteps is not None]
            rows.append(_row(a.name, a.graph, a.format, a.precision, name, w.floor, mx, w.psnr, a.passed,
                             f"{w.hop}, {w.inputs} ({w.worst_case})", max(q) if q else None))  # fmt: skip
    for s in result.sets:
        if s.error or not s.images or s.floor is None:
            continue
        w = min(s.images, key=lambda i: i.psnr)
        row = _row(s.name, f"{s.kind} (whole images)", s.format, s.precision, "sr", s.floor,
                   max(i.max_abs for i in s.images), w.psnr, s.passed, w.name, None)  # fmt: skip
        row["note"] = w.note
        rows.append(row)
    return rows


def _row(artifact: str, graph: str, fmt: str, prec: str, output: str, floor: Any, max_abs: float, psnr: float,
         passed: bool, worst: str, qsteps: float | None) -> dict[str, Any]:  # fmt: skip
    def num(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else (999.0 if math.isinf(x) else float(f"{x:.4g}"))

    return {
        "artifact": artifact, "graph": graph, "format": fmt, "precision": prec, "output": output,
        "floor_max_abs": floor.max_abs, "floor_psnr": floor.psnr, "floor_source": floor.source, "why": floor.why,
        "max_abs": num(max_abs), "psnr": num(psnr), "qsteps": num(qsteps),
        "margin_db": num(psnr - floor.psnr) if floor.psnr is not None else None,
        "margin_abs_x": num(floor.max_abs / max(max_abs, 1e-30)) if floor.max_abs is not None else None,
        "passed": passed, "worst": worst,
    }  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["precision", "graph", "output", "format", "floor", "max abs", "PSNR dB", "margin dB", "margin abs", "q-steps",
            "result"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {"fp32": 0, "fp16": 1, "int8": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["precision"], 9), r["graph"], r["format"])):
        if "error" in r:
            out.append(
                f"| {r['precision']} | {r['graph']} | - | {r['format']} | - | - | - | - | - | - | error: {r['error']} |"
            )
            continue
        fl = ", ".join(x for x in (f"≤{r['floor_max_abs']:g}" if r["floor_max_abs"] is not None else "",
                                   f"≥{r['floor_psnr']:g} dB" if r["floor_psnr"] is not None else "") if x)  # fmt: skip
        psnr = "inf" if r["psnr"] == 999.0 else f"{r['psnr']:.1f}"
        cells = [r["precision"], r["graph"], r["output"], r["format"], fl or "-", f"{r['max_abs']:.2g}", psnr,
                 "-" if r["margin_db"] is None else ("inf" if r["psnr"] == 999.0 else f"{r['margin_db']:+.1f}"),
                 "-" if r["margin_abs_x"] is None else f"{r['margin_abs_x']:.3g}x",
                 "-" if r["qsteps"] is None else f"{r['qsteps']:.2f}", "ok" if r["passed"] else "FAIL"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="preset to export with random weights (default: tiny)")
    p.add_argument("--artifacts", type=Path, help="measure these artifact folders instead of exporting")
    p.add_argument("--formats", nargs="+", default=["onnx", "executorch", "coreml"], help="formats to export")
    p.add_argument("--precisions", nargs="+", help="precisions for every format (default: onnx fp32 + fp16, executorch fp32, "
                   "coreml fp32 + fp16)")  # fmt: skip
    p.add_argument("--graphs", nargs="+", default=["pipeline", "components"], help="graphs (default: all four)")
    p.add_argument("--int8", action="store_true", help="also quantize the fp32 artifacts (quantize stage)")
    p.add_argument("--int8-formats", nargs="+", default=["onnx"], help="formats to quantize (default: onnx)")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--patches", type=int, default=3, help="real LR patches per artifact (default: 3)")
    p.add_argument("--whole-images", type=int, default=1, help="whole images per set (default: 1)")
    p.add_argument("--max-side", type=int, default=100, help="whole-image crop (LR px, default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    p.add_argument("--out", type=Path, default=Path("parity_margins"), help="output folder (JSON, Markdown, artifacts)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import torch

    from tadsr.parity.check import ParityOptions, check_parity

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    work = args.artifacts
    if work is None:
        work = args.out / "artifacts"
        work.mkdir(exist_ok=True)
        notes = _export(args, work)
    elif args.int8:  # quantize the given fp32 artifacts in place (existing INT8 folders are kept)
        notes = _quantize(args, work)
    t0 = time.perf_counter()
    result = check_parity(work, options=ParityOptions(seed=args.seed, patches=args.patches, whole_images=args.whole_images,
                                                      max_side=args.max_side, threads=args.threads))  # fmt: skip
    rows = _rows(result)
    doc = {"benchmark": "parity_margins", "conditions": _conditions(args), "notes": notes, "rows": rows,
           "parity_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (args.out / "parity_margins.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    table = _table(rows)
    (args.out / "parity_margins.md").write_text(table + "\n")
    print(table)
    for n in notes:
        print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

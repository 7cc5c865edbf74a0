r"""INT8 benchmark: per format, INT8 vs fp32 file size, fidelity (PSNR) and latency, vs PyTorch eager, in one run.

For one preset (``tiny`` or ``official-x4`` with ``--init random``), tile and list of formats:

1. fp32 artifacts of ``--graphs`` (default: the fused pipeline) are exported into ``<work>/fp32`` (reused if
   there), with the parity gate off so that a marginal fp32 artifact is still measured.
2. Each is quantized with :func:`tadsr.quantize.api.quantize_artifact` into ``<work>/int8`` (calibration on the
   shipped set or ``--calib``; recipe searched to ``--target-psnr`` or taken from ``--recipe``).
3. Sizes: model file bytes of the fp32 and INT8 artifacts (a ``.mlpackage`` counts all its files).
4. Fidelity: worst and mean PSNR of INT8 vs the fp32 artifact on the held-out patches (from the manifest's
   parity hop, computed by the same runtime), plus the recipe's INT8 weight share and float blocks.
5. Latency, in this process, same inputs, same ``--threads``: PyTorch eager (the export-ready graph), the fp32
   and the INT8 artifact through ``load_runner``; ``--warmup`` runs, then median and p90 of ``--runs`` (>= 5).
   Core ML only runs on macOS (the Linux simulator is no latency proxy): sizes and simulator PSNR only.

The JSON (conditions + results) is written before the table::

    python benchmarks/quantize_bench.py --preset tiny --formats onnx executorch coreml --work /tmp/qbench
    python benchmarks/quantize_bench.py --preset official-x4 --init random --formats onnx --work /tmp/qbench-x4 \\
        --num-patches 32 --holdout-patches 4 --target-psnr 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


logger = logging.getLogger("tadsr.benchmarks.quantize_bench")


def _bytes(manifest: dict[str, Any]) -> int:
    return int(sum(f["bytes"] for f in manifest["files"]))


def _fidelity(manifest: dict[str, Any]) -> dict[str, Any]:
    """Worst / mean INT8 vs fp32 PSNR on the held-out patches, from the first parity hop of the manifest."""
    hop = next((h for h in manifest.get("parity", []) if h["hop"].startswith("fp32 ")), None)
    q = manifest.get("quantization", {})
    return {"psnr_worst": hop["psnr"] if hop else None, "max_abs": hop["max_abs"] if hop else None,
            "max_abs_steps": hop.get("max_abs_steps") if hop else None, "heldout_patches": hop["n"] if hop else 0,
            "int8_fraction": q.get("int8_fraction"), "float_units": q.get("float_units"),
            "recipe_psnr": q.get("recipe_psnr"), "parity_passed": manifest.get("parity_passed")}  # fmt: skip


def _export(args: argparse.Namespace, models: Any) -> list[Path]:
    from tadsr.export.api import export_model, resolve_graphs
    from tadsr.formats.artifact import artifact_name

    out = args.work / "fp32"
    want = [(g, f) for g in resolve_graphs(args.graphs) for f in args.formats]
    have = {(g, f) for g, f in want if (out / artifact_name(g, f, "fp32", args.tile) / "manifest.json").is_file()}
    todo_formats = sorted({f for g, f in want if (g, f) not in have})
    if todo_formats:
        t0 = time.perf_counter()
        export_model(models, formats=todo_formats, graphs=args.graphs, tile=args.tile, out_dir=out, n_real=1,
                     parity_gate=False, progress=sys.stderr.isatty())  # fmt: skip
        logger.info("fp32 export of %s: %.1fs", todo_formats, time.perf_counter() - t0)
    return [out / artifact_name(g, f, "fp32", args.tile) for g, f in want]


def _quantize(args: argparse.Namespace, parent: Path, captures: Any = None) -> tuple[list[Path], float]:
    from tadsr.quantize.api import quantize_artifact

    t0 = time.perf_counter()
    paths = quantize_artifact(parent, calib=args.calib, num_patches=args.num_patches, seed=args.seed,
                              method=args.method, target_psnr=args.target_psnr, recipe=args.recipe,
                              out_dir=args.work / "int8", holdout_patches=args.holdout_patches,
                              sensitivity_patches=args.sensitivity_patches, parity_gate=False, threads=args.threads,
                              progress=sys.stderr.isatty(), captures=captures)  # fmt: skip
    return paths, time.perf_counter() - t0


def _latency(args: argparse.Namespace, graph: Any, spec: Any, artifacts: dict[str, Path]) -> dict[str, Any]:
    from tadsr.bench.systems import time_calls
    from tadsr.errors import TadsrError
    from tadsr.runtime.runner import load_runner
    from tadsr.formats.torch_ref import TorchRunner

    feeds = {s.name: x.numpy() for s, x in zip(spec.inputs, spec.example_inputs(), strict=True)}
    eager = TorchRunner.from_graph(graph, spec, threads=args.threads)
    out: dict[str, Any] = {"torch-eager": time_calls(lambda: eager.run(feeds), warmup=args.warmup, runs=args.runs)}
    for key, path in artifacts.items():
        fmt = json.loads((path / "manifest.json").read_text())["format"]
        if fmt == "coreml" and sys.platform != "darwin":
            out[key] = {"skipped": "Core ML runs only on macOS (the Linux simulator is no latency proxy)"}
            continue
        try:
            runner = load_runner(path, threads=args.threads)
        except (TadsrError, ImportError) as e:
            out[key] = {"skipped": f"runner unavailable: {e}"}
            continue
        out[key] = time_calls(lambda r=runner: r.run(feeds), warmup=args.warmup, runs=args.runs)
        logger.info("%s %s: %.1f ms", spec.name, key, out[key]["median_ms"])
    base = out["torch-eager"]["median_ms"]
    for t in out.values():
        if "median_ms" in t:
            t["ratio_vs_eager"] = round(t["median_ms"] / base, 3)
    for prec in ("int8", "w8"):
        if "median_ms" in out.get(prec, {}) and "median_ms" in out.get("fp32", {}):
            out[prec]["ratio_vs_fp32"] = round(out[prec]["median_ms"] / out["fp32"]["median_ms"], 3)
    return out


def _conditions(args: argparse.Namespace) -> dict[str, Any]:
    from tadsr.formats.artifact import tool_versions

    return {
        "preset": args.preset, "init": args.init, "tile": args.tile, "graphs": args.graphs, "formats": args.formats,
        "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "method": args.method,
        "num_patches": args.num_patches, "holdout_patches": args.holdout_patches, "target_psnr": args.target_psnr,
        "recipe": str(args.recipe) if args.recipe else None, "calib": str(args.calib) if args.calib else "shipped",
        "device": "cpu", "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "os": platform.platform(), "load_avg_1min": os.getloadavg()[0],
        "tool_versions": tool_versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": "ORT CPUExecutionProvider, ExecuTorch XNNPACK; eager = export-ready torch graph (fp32, inference "
                 "mode); median / p90 of runs after warm-up, one process, same inputs and threads; PSNR = INT8 vs "
                 "fp32 artifact on held-out patches (other images than calibration), worst patch",
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Export, quantize, measure; returns the report (also written to ``<work>/quantize_bench.json``)."""
    import torch

    from tadsr.formats.graphs import make_graph
    from tadsr.pipeline import load_models

    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_models(preset=args.preset, init=None if args.init == "none" else args.init)
    from tadsr.quantize.api import CaptureCache

    rows = []
    captures = CaptureCache()  # one model: the first artifact's time includes the capture, the others reuse it
    for parent in _export(args, models):
        pm = json.loads((parent / "manifest.json").read_text())
        row: dict[str, Any] = {"graph": pm["graph"]["name"], "format": pm["format"], "fp32": parent.name,
                               "fp32_bytes": _bytes(pm), "variants": {}}  # fmt: skip
        try:
            paths, secs = _quantize(args, parent, captures)
        except Exception as e:  # a benchmark records a failing format and goes on with the others
            logger.exception("quantizing %s failed", parent.name)
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            continue
        row["quantize_s"] = round(secs, 1)
        arts = {"fp32": parent}
        for p in paths:
            m = json.loads((p / "manifest.json").read_text())
            arts[m["precision"]] = p
            row["variants"][m["precision"]] = {"artifact": p.name, "bytes": _bytes(m),
                                               "size_ratio": round(_bytes(m) / row["fp32_bytes"], 4),
                                               **_fidelity(m)}  # fmt: skip
        graph, spec = make_graph(models, row["graph"], args.tile)
        row["latency"] = _latency(args, graph, spec, arts)
        rows.append(row)
    report = {"conditions": _conditions(args), "results": rows}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "quantize_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def table(report: dict[str, Any]) -> str:
    """Plain-text summary of a report."""
    c = report["conditions"]
    lines = [f"INT8 vs fp32 ({c['preset']}, tile {c['tile']}, {c['threads'] or 'default'} thread(s), "
             f"median of {c['runs']} after {c['warmup']} warm-up):",
             f"  {'artifact':<30} {'MB':>7} {'x fp32':>7} {'PSNR':>6} {'int8 w':>7} {'ms':>9} {'p90':>9} "
             f"{'x eager':>8} {'x fp32':>7}"]  # fmt: skip
    for r in report["results"]:
        lat = r.get("latency", {})
        e = lat.get("torch-eager", {})
        lines.append(
            f"  {r['graph'] + ' torch eager':<30} {'':>7} {'':>7} {'':>6} {'':>7} "
            f"{e.get('median_ms', float('nan')):9.1f} {e.get('p90_ms', float('nan')):9.1f} {1.0:8.2f}"
        )
        fp = lat.get("fp32", {})
        lines.append(f"  {r['fp32']:<30} {r['fp32_bytes'] / 1e6:7.2f} {1.0:7.2f} {'':>6} {'':>7} "
                     + _lat(fp))  # fmt: skip
        if "error" in r:
            lines.append(f"    quantization failed: {r['error']}")
        for prec, v in r["variants"].items():
            psnr = "-" if v["psnr_worst"] is None else f"{v['psnr_worst']:.1f}"
            frac = "-" if v["int8_fraction"] is None else f"{100 * v['int8_fraction']:.0f}%"
            lines.append(f"  {v['artifact']:<30} {v['bytes'] / 1e6:7.2f} {v['size_ratio']:7.2f} {psnr:>6} {frac:>7} "
                         + _lat(lat.get(prec, {})))  # fmt: skip
    return "\n".join(lines)


def _lat(t: dict[str, Any]) -> str:
    if "skipped" in t:
        return f"  ({t['skipped'][:60]})"
    if "median_ms" not in t:
        return ""
    ratio = f"{t['ratio_vs_fp32']:7.2f}" if "ratio_vs_fp32" in t else ""
    return f"{t['median_ms']:9.1f} {t['p90_ms']:9.1f} {t['ratio_vs_eager']:8.2f} {ratio}"


def parser() -> argparse.ArgumentParser:
    """The command line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="work folder (fp32/, int8/, quantize_bench.json)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--init", default="random", choices=["random", "none"],
                   help="'random': deterministic random weights; 'none': the preset's bundled weights")  # fmt: skip
    p.add_argument("--formats", nargs="+", default=["onnx", "executorch", "coreml"])
    p.add_argument("--graphs", nargs="+", default=["pipeline"], help="pipeline and/or components or graph names")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="threads for torch, ORT and ExecuTorch (same for all)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calib", type=Path, help="calibration folder (default: the shipped set)")
    p.add_argument("--num-patches", type=int, help="calibration patches (default: 64, or the 48 shipped)")
    p.add_argument("--holdout-patches", type=int, default=16)
    p.add_argument("--sensitivity-patches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--target-psnr", type=float, help="recipe floor in dB (default: the library's)")
    p.add_argument("--recipe", type=Path, help="recipe.json to reuse (no search)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when a format failed to quantize."""
    args = parser().parse_args(argv)
    if args.runs < 5:
        raise SystemExit("--runs must be >= 5 (median and p90 of at least 5 runs)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run(args)
    print(table(report))
    print(f"report: {args.work / 'quantize_bench.json'}")
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

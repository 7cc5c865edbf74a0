"""Export benchmark: wall time and peak memory of each format's export, artifact sizes, runtime vs eager latency.

For one preset (default ``official-x4`` with random weights) and a list of formats:

1. **Export cost.** Each format is exported in its own subprocess (``export_model`` with that format only, all
   requested graphs), so the peak RSS (``ru_maxrss`` from ``os.wait4``) belongs to that export alone. A
   baseline subprocess that only imports and loads the models gives the RSS floor to subtract.
2. **Artifacts.** Size of every artifact and its parity outcome (the export runs with the gate off, so a failing
   artifact is still measured and marked).
3. **Latency.** In this process, per graph: PyTorch eager (the export-ready graph) and every artifact through
   ``load_runner`` (ONNX Runtime; ExecuTorch when its runner is installed; Core ML only on macOS, the Linux
   simulator is not a latency proxy), same inputs, same thread count, ``--warmup`` runs then ``--runs`` timed
   runs; median, p90 and the ratio backend median / eager median.

The JSON (conditions + results) is written before the table is printed::

    python benchmarks/export_bench.py --preset tiny --formats onnx --graphs pipeline components --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


logger = logging.getLogger("tadsr.benchmarks.export_bench")


# ------------------------------------------------------------------------------------------------ child side


def _child(args: argparse.Namespace) -> int:
    """Runs in a subprocess: load models, export one format (or nothing for the baseline), write JSON."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{args.child_format}] %(name)s %(message)s")
    t0 = time.perf_counter()
    import torch

    from tadsr.pipeline import load_models

    torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    models = load_models(preset=args.preset, init=args.init)
    t_load = time.perf_counter() - t1
    out: dict[str, Any] = {"import_s": round(t_import, 3), "load_s": round(t_load, 3), "artifacts": []}
    if args.child_format != "none":
        from tadsr.errors import TadsrError
        from tadsr.export.api import export_model

        t2 = time.perf_counter()
        try:
            results = export_model(models, formats=(args.child_format,), graphs=args.graphs, tile=args.tile,
                                   precisions=(args.precision,), out_dir=args.out / args.child_format,
                                   parity_gate=False, n_real=args.parity_patches)  # fmt: skip
        except TadsrError as e:
            out["error"] = f"{type(e).__name__}: {e}"
            Path(args.child_result).write_text(json.dumps(out, indent=2))
            return 1
        out["export_s"] = round(time.perf_counter() - t2, 3)
        for r in results:
            w = r.parity.worst()
            out["artifacts"].append({
                "path": str(r.path), "graph": r.graph, "format": r.format, "precision": r.precision,
                "bytes": r.bytes, "files": [f.name for f in r.files], "parity_passed": r.passed,
                "worst_hop": None if w is None else w.to_dict(), "timings": r.timings,
                "warnings": r.backend.warnings,
            })  # fmt: skip
    Path(args.child_result).write_text(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- parent side


def _run_child(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """Export ``fmt`` in a subprocess; returns its JSON plus wall time, exit status and peak RSS (MB)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-format", fmt, "--child-result", str(result_path),
           "--preset", args.preset, "--tile", str(args.tile), "--precision", args.precision, "--out", str(args.out),
           "--threads", str(args.threads), "--parity-patches", str(args.parity_patches),
           "--graphs", *args.graphs]  # fmt: skip
    if args.init:
        cmd += ["--init", args.init]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    rss_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20  # KB on Linux
    res: dict[str, Any] = {"format": fmt, "exit_code": proc.returncode, "wall_s": round(wall, 2),
                           "peak_rss_mb": round(rss_mb, 1)}  # fmt: skip
    if result_path.stat().st_size:
        res.update(json.loads(result_path.read_text()))
    result_path.unlink(missing_ok=True)
    return res


def _latency(args: argparse.Namespace, exports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Eager vs each artifact's runtime, per graph, in this process."""
    import torch

    from tadsr.bench.systems import time_calls
    from tadsr.errors import TadsrError
    from tadsr.export.api import resolve_graphs
    from tadsr.formats.graphs import make_graphs
    from tadsr.pipeline import load_models
    from tadsr.runtime.runner import load_runner
    from tadsr.formats.torch_ref import TorchRunner

    torch.set_num_threads(args.threads)
    models = load_models(preset=args.preset, init=args.init)
    names = resolve_graphs(args.graphs)
    graphs = make_graphs(models, args.tile, tuple(names))
    rows = []
    for name in names:
        graph, spec = graphs[name]
        feeds = {s.name: x.numpy() for s, x in zip(spec.inputs, spec.example_inputs(), strict=True)}
        eager = TorchRunner.from_graph(graph, spec, threads=args.threads)
        base = time_calls(lambda r=eager, f=feeds: r.run(f), warmup=args.warmup, runs=args.runs)
        rows.append({"graph": name, "backend": "torch-eager", **base, "ratio_vs_eager": 1.0})
        logger.info("%s torch eager: %.1f ms", name, base["median_ms"])
        for exp in exports:
            for art in exp.get("artifacts", []):
                if art["graph"] != name:
                    continue
                row: dict[str, Any] = {"graph": name, "backend": art["format"], "artifact": Path(art["path"]).name}
                if art["format"] == "coreml" and sys.platform != "darwin":
                    rows.append({**row, "skipped": "Core ML runs only on macOS (the simulator is no latency proxy)"})
                    continue
                opts = {"threads": args.threads} if art["format"] == "onnx" else {}
                try:
                    runner = load_runner(Path(art["path"]), **opts)
                except (TadsrError, ImportError) as e:
                    rows.append({**row, "skipped": f"runner unavailable: {e}"})
                    continue
                t = time_calls(lambda r=runner, f=feeds: r.run(f), warmup=args.warmup, runs=args.runs)
                rows.append({**row, **t, "ratio_vs_eager": round(t["median_ms"] / base["median_ms"], 3)})
                ratio = rows[-1]["ratio_vs_eager"]
                logger.info("%s %s: %.1f ms (%.2fx eager)", name, art["format"], t["median_ms"], ratio)
    return rows


def _conditions(args: argparse.Namespace) -> dict[str, Any]:
    from tadsr.formats.artifact import tool_versions

    return {
        "preset": args.preset, "init": args.init, "tile": args.tile, "precision": args.precision,
        "graphs": args.graphs, "formats": args.formats, "threads": args.threads, "runs": args.runs,
        "warmup": args.warmup, "device": "cpu", "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "os": platform.platform(), "load_avg_1min": os.getloadavg()[0],
        "tool_versions": tool_versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": "ORT CPUExecutionProvider; eager = export-ready torch graph in inference mode; median of runs "
                 "after warm-up; peak RSS per export subprocess includes imports and model loading (see baseline)",
    }  # fmt: skip


def _table(report: dict[str, Any]) -> str:
    lines = [f"export cost ({report['conditions']['preset']}, tile {report['conditions']['tile']}, "
             f"{report['conditions']['precision']}, {report['conditions']['threads']} thread(s)):"]  # fmt: skip
    b = report["baseline"]
    lines.append(f"  baseline (import + load): {b['wall_s']:.1f} s, peak RSS {b['peak_rss_mb']:.0f} MB")
    for e in report["exports"]:
        export_s = e.get("export_s", float("nan"))
        lines.append(f"  {e['format']:<11} {e['wall_s']:7.1f} s wall (export_model {export_s:.1f} s),"
                     f" peak RSS {e['peak_rss_mb']:.0f} MB, exit {e['exit_code']}")  # fmt: skip
        if "error" in e:
            lines.append(f"    error: {e['error']}")
        for a in e.get("artifacts", []):
            w = a["worst_hop"] or {}
            lines.append(f"    {Path(a['path']).name:<32} {a['bytes'] / 1e6:8.1f} MB  parity "
                         f"{'pass' if a['parity_passed'] else 'FAIL'} (worst {w.get('psnr', '-')} dB)")  # fmt: skip
    lines.append("latency (median ms, p90 ms, backend / eager):")
    for r in report["latency"]:
        if "skipped" in r:
            lines.append(f"  {r['graph']:<9} {r['backend']:<12} skipped: {r['skipped']}")
        else:
            lines.append(f"  {r['graph']:<9} {r['backend']:<12} {r['median_ms']:9.1f} {r['p90_ms']:9.1f} "
                         f"{r['ratio_vs_eager']:6.2f}x")  # fmt: skip
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="official-x4")
    p.add_argument("--init", default="random", choices=["random", ""], help="'' to use bundled weights")
    p.add_argument("--formats", nargs="+", default=["onnx"])
    p.add_argument("--graphs", nargs="+", default=["pipeline", "components"])
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parity-patches", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="artifact folder (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: <out>/export_bench.json)")
    p.add_argument("--child-format", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.init = args.init or None
    if args.child_format:
        return _child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.runs < 5:
        raise SystemExit("--runs must be >= 5 (median of at least 5 runs)")
    args.out = Path(args.out or tempfile.mkdtemp(prefix="tadsr-export-bench-"))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"conditions": _conditions(args)}
    logger.info("baseline subprocess (import + load %s)", args.preset)
    report["baseline"] = _run_child(args, "none")
    report["exports"] = []
    for fmt in args.formats:
        logger.info("exporting %s in a subprocess ...", fmt)
        report["exports"].append(_run_child(args, fmt))
    report["latency"] = _latency(args, report["exports"])
    json_path = args.json or args.out / "export_bench.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(_table(report))
    print(f"results: {json_path}")
    return 0 if all(e["exit_code"] == 0 for e in report["exports"]) else 1


if __name__ == "__main__":
    sys.exit(main())

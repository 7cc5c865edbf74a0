"""Whole-image runtime benchmark: peak RSS and wall time to upscale one large LR image with exported files.

Default: a 512x512 LR image (2048x2048 out) through the fused ``pipeline`` ONNX artifact of the official-size
model with random weights, fp32 and (if ``--int8`` artifacts are given or can be made) INT8. Each measured
run happens in a fresh subprocess so ``ru_maxrss`` is that run's own peak.

Usage:
    python benchmarks/runtime_bench.py --artifacts out/official [--int8-artifacts out/official-int8] \
        [--size 512] [--overlap 16] [--threads 2]
    python benchmarks/runtime_bench.py --export --preset official-x4 --init random --work out/rt_bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GOAL_RSS_GIB = 2.0


def _peak_rss_gib() -> float:
    """This process's own peak RSS (VmHWM). ru_maxrss of an exec'ed child can include its parent's pages."""
    from tadsr import memory

    peak = memory.peak_since_reset() or memory.maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 2**30


def _child(args: argparse.Namespace) -> None:
    from tadsr.runtime.pipeline import MobileSRPipeline

    rng = np.random.default_rng(0)
    # a smooth, image-like LR test card (noise smoothed by cumulative sums), values in [-1, 1]
    base = rng.standard_normal((3, args.size, args.size)).cumsum(1).cumsum(2)
    base = (base - base.min()) / (base.max() - base.min()) * 2 - 1
    lr = base[None].astype(np.float32)
    t0 = time.perf_counter()
    pipe = MobileSRPipeline.from_path(Path(args.child), threads=args.threads, low_memory=args.memory == "low")
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    sr = pipe.upscale(lr, seed=0, overlap=args.overlap)
    t_run = time.perf_counter() - t0
    rss = _peak_rss_gib()
    print(json.dumps({"artifact": args.child, "description": pipe.description, "memory": args.memory,
                      "out_shape": list(sr.shape),
                      "load_s": round(t_load, 2), "upscale_s": round(t_run, 2), "peak_rss_gib": round(rss, 3),
                      "finite": bool(np.isfinite(sr).all())}))  # fmt: skip


def _measure(path: Path, args: argparse.Namespace, memory: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--size", str(args.size), "--overlap", str(args.overlap),
           "--threads", str(args.threads), "--memory", memory]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _export(args: argparse.Namespace) -> tuple[Path, Path | None]:
    import tadsr
    from tadsr.export.api import export_model

    models = tadsr.load_models(preset=args.preset, init=args.init)
    work = Path(args.work)
    (res,) = export_model(models, formats=("onnx",), graphs=("pipeline",), tile=args.tile, out_dir=work / "fp32",
                          n_real=1)  # fmt: skip
    int8 = None
    try:
        from tadsr.quantize.api import quantize_artifact
    except ImportError:
        print("tadsr.quantize.api not available: INT8 skipped", file=sys.stderr)
    else:
        int8 = quantize_artifact(res.path, calib=None, num_patches=16, seed=0, out_dir=work / "int8")[0]
    return res.path, int8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, help="fp32 pipeline artifact (or a folder of artifacts)")
    ap.add_argument("--int8-artifacts", type=Path, help="INT8 pipeline artifact (or a folder of artifacts)")
    ap.add_argument("--export", action="store_true", help="export (and quantize) the artifacts first")
    ap.add_argument("--preset", default="official-x4")
    ap.add_argument("--init", default="random")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--work", default="out/runtime_bench")
    ap.add_argument("--size", type=int, default=512, help="LR side (default 512 -> 2048 out)")
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory", choices=["default", "low", "both"], default="both",
                    help="ONNX Runtime memory mode: default (arena + weight pre-packing), low (tadsr upscale "
                         "--low-memory), or both, measured one after the other (default: %(default)s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    fp32, int8 = args.artifacts, args.int8_artifacts
    if args.export:
        fp32, int8 = _export(args)
    if fp32 is None:
        ap.error("give --artifacts or --export")
    modes = ["default", "low"] if args.memory == "both" else [args.memory]
    rows = []
    for precision, path in (("fp32", fp32), ("int8", int8)):
        for mode in modes if path is not None else []:
            rows.append({"precision": precision, **_measure(path, args, mode)})
            print(f"measured {rows[-1]['description']} ({mode} memory): {rows[-1]['upscale_s']:.1f} s, "
                  f"{rows[-1]['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps({"size": args.size, "threads": args.threads, "load_average": os.getloadavg(), "runs": rows},
                     indent=1))  # fmt: skip
    for r in rows:
        ok = "OK" if r["peak_rss_gib"] < GOAL_RSS_GIB else "OVER"
        print(f"{r['description']:<32} {r['memory']:<8} {r['upscale_s']:>8.1f} s  peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"({ok} vs {GOAL_RSS_GIB} GiB goal)")  # fmt: skip
    by = {(r["precision"], r["memory"]): r for r in rows}
    for mode in modes:
        f, q = by.get(("fp32", mode)), by.get(("int8", mode))
        if f and q:
            print(f"INT8/fp32 time ratio ({mode} memory): {q['upscale_s'] / f['upscale_s']:.2f}")
    if len(modes) == 2:
        for prec in ("fp32", "int8"):
            d, lo = by.get((prec, "default")), by.get((prec, "low"))
            if d and lo:
                print(f"{prec} low/default memory: time {lo['upscale_s'] / d['upscale_s']:.2f}x, "
                      f"peak RSS {lo['peak_rss_gib'] / d['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()

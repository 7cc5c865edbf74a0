"""C++ runner (runtime/cpp, tadsr-cpp) vs the Python runtime (MobileSRPipeline) on one ExecuTorch artifact.

Each side runs in its own fresh process (so peak RSS is that runtime's whole footprint: the Python side
includes the interpreter, numpy and the ExecuTorch pybind runtime it needs) on the same image and seed:
load time, latency per image (median of ``--repeat`` runs after one warm-up run) and per tile, peak RSS,
the C++ / Python ratios, and the PSNR between the two outputs (8-bit PNG).

    python benchmarks/cpp_runner_bench.py --artifact DIR [--image PNG] [--size 251x187] [--repeat 3]

DIR: an ExecuTorch ``pipeline`` artifact, or a folder of encoder/denoiser/decoder artifacts (as tadsr upscale).
Default image: a crop of the first shipped calibration photo upscaled by bicubic to ``--size`` (odd by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _python_worker(args: argparse.Namespace) -> None:
    """Run the Python runtime like ``tadsr upscale --artifact``; print one JSON line."""
    import resource

    t0 = time.perf_counter()
    from tadsr.runtime.imageio import from_model, read_image, to_model, write_png
    from tadsr.runtime.pipeline import MobileSRPipeline

    pipe = MobileSRPipeline.from_path(Path(args.artifact))
    load_s = time.perf_counter() - t0
    lr = to_model(read_image(Path(args.image)).rgb)
    runs = []
    for _ in range(args.repeat + 1):
        t1 = time.perf_counter()
        sr = pipe.upscale(lr, seed=args.seed)
        runs.append(time.perf_counter() - t1)
    write_png(Path(args.out), from_model(sr))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "runs_s": runs, "peak_rss_mb": rss, "fused": pipe.fused, "tile": pipe.tile}))


def _tiles(h: int, w: int, tile: int, overlap: int = 16) -> int:
    from tadsr.runtime.tiling import tile_starts

    ph, pw = (-(-max(s, tile) // 64) * 64 for s in (h, w))
    ys = [y for y in tile_starts(ph, tile, min(overlap, tile - 1)) if y < h]
    xs = [x for x in tile_starts(pw, tile, min(overlap, tile - 1)) if x < w]
    return len(ys) * len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="ExecuTorch pipeline artifact, or folder of component artifacts")
    ap.add_argument("--image", help="input PNG (default: a shipped photo resized to --size)")
    ap.add_argument("--size", default="251x187", help="WxH of the default image (default 251x187)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side after one warm-up (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-dir", help="where to build runtime/cpp (default: a temp folder)")
    ap.add_argument("--python-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.python_worker:
        _python_worker(args)
        return

    from PIL import Image

    from tadsr.runtime.cpp_build import build_cpp_runner

    with tempfile.TemporaryDirectory(prefix="tadsr_cpp_bench_") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        build = build_cpp_runner(Path(args.build_dir) if args.build_dir else tmp / "build")
        build_s = time.perf_counter() - t0
        if args.image:
            image = Path(args.image)
        else:
            w, h = (int(v) for v in args.size.lower().split("x"))
            src = min((REPO / "tadsr" / "data" / "calib").glob("*.png"))
            with Image.open(src) as im:
                im.convert("RGB").resize((w, h), Image.BICUBIC).save(tmp / "in.png")
            image = tmp / "in.png"
        with Image.open(image) as im:
            width, height = im.size

        cpp_out, py_out = tmp / "cpp.png", tmp / "py.png"
        cmd = [str(build / "tadsr-cpp"), "upscale", str(image), str(cpp_out), "--artifact", args.artifact,
               "--seed", str(args.seed), "--repeat", str(args.repeat + 1), "--stats"]  # fmt: skip
        cpp = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        cmd = [sys.executable, __file__, "--python-worker", "--artifact", args.artifact, "--image", str(image),
               "--out", str(py_out), "--seed", str(args.seed), "--repeat", str(args.repeat)]  # fmt: skip
        py = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        with Image.open(cpp_out) as a, Image.open(py_out) as b:
            ca, pb = np.asarray(a.convert("RGB"), np.float64), np.asarray(b.convert("RGB"), np.float64)
        mse = float(np.mean((ca - pb) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

    tile = cpp["tile"]
    n = _tiles(height, width, tile)
    kind = "fused pipeline" if cpp["fused"] else "encoder+denoiser+decoder"
    print(f"# C++ runner vs Python runtime, ExecuTorch {cpp['precision']} {kind}, tile {tile}")
    print(f"artifact: {args.artifact}")
    print(f"image: {width}x{height} -> {width * cpp['scale']}x{height * cpp['scale']}, {n} tiles, seed {args.seed}")
    print(f"host: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, default threads; "
          f"median of {args.repeat} runs after 1 warm-up; C++ build {build_s:.1f} s")  # fmt: skip
    print()
    print("| runtime | load s | median s / image | ms / tile | peak RSS MB |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, r in (("C++ (tadsr-cpp)", cpp), ("Python (MobileSRPipeline)", py)):
        med = float(np.median(r["runs_s"][1:]))
        rows[name] = (r["load_s"], med, 1000 * med / n, r["peak_rss_mb"])
        print(f"| {name} | {r['load_s']:.3f} | {med:.3f} | {1000 * med / n:.1f} | {r['peak_rss_mb']:.0f} |")
    c, p = rows["C++ (tadsr-cpp)"], rows["Python (MobileSRPipeline)"]
    print(f"| C++ / Python | {c[0] / p[0]:.3f}x | {c[1] / p[1]:.3f}x | {c[2] / p[2]:.3f}x | {c[3] / p[3]:.3f}x |")
    print()
    print(f"C++ vs Python output (8-bit PNG): PSNR {psnr:.2f} dB" + (" (identical)" if mse == 0 else ""))


if __name__ == "__main__":
    main()

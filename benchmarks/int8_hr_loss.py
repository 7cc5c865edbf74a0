r"""What INT8 costs the user: PSNR-Y against HR lost relative to the fp32 artifact, size and speed (issue 18).

For one fp32 artifact that outputs the image (a fused ``pipeline`` or a ``decoder``) and any number of INT8
artifacts made from it (``tadsr quantize``, e.g. with and without ``--hr-budget``), on held-out patches (the
ones ``tadsr quantize`` judges its recipe on by default: seed 1 of the photo set's validation images, or
``--holdout DIR``):

- PSNR-Y vs HR of each artifact (8-bit, 4 px border, as ``tadsr bench``), mean and worst patch, and the INT8
  loss against the fp32 artifact on the same patches (same noise per patch);
- worst-patch PSNR vs the fp32 artifact's output (what the recipe floor is about);
- model file size vs fp32, the recipe's INT8 weight share, float blocks, HR budget and the loss it recorded;
- latency per tile through ``load_runner`` (median of ``--runs``, one thread; Core ML runs through the simulator
  off macOS, which is no latency proxy: ``-``).

Noise per patch comes from ``--seed`` (not the quantizer's own), so the losses are an independent check of
what the recipe recorded; ``--draws K`` repeats the check on K noise draws (seed ``seed + 1000 k + i``) and
reports the mean loss of each draw, their mean and spread::

    tadsr quantize ART --out q/none --hr-budget none --no-parity-gate
    tadsr quantize ART --out q/hr --no-parity-gate
    python benchmarks/int8_hr_loss.py ART q/none/<int8 folder> q/hr/<int8 folder>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _size(folder: Path) -> int:
    return int(sum(f["bytes"] for f in json.loads((folder / "manifest.json").read_text())["files"]))


def main(argv: list[str] | None = None) -> int:
    from tadsr.formats.registry import get_format
    from tadsr.metrics import psnr, psnr_y_8bit
    from tadsr.quantize.calibration import sample_holdout
    from tadsr.runtime.runner import load_runner, read_manifest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32", type=Path, help="fp32 artifact folder (pipeline or decoder)")
    p.add_argument("int8", type=Path, nargs="+", help="INT8 artifact folders made from it")
    p.add_argument("--holdout", type=Path, help="held-out image folder (default: tadsr quantize's)")
    p.add_argument("--patches", type=int, default=16)
    p.add_argument("--seed", type=int, default=100, help="noise seed of patch i is seed + i")
    p.add_argument("--draws", type=int, default=1, help="independent noise draws of the held-out patches")
    p.add_argument("--runs", type=int, default=5, help="timed runs per artifact (median)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    fp32_manifest = read_manifest(args.fp32)
    graph, tile = fp32_manifest["graph"]["name"], int(fp32_manifest["graph"]["tile"])
    if graph not in ("pipeline", "decoder"):
        p.error(f"{args.fp32} is a {graph} artifact; its output is a latent, not the image")
    hold, info = sample_holdout(args.holdout, num_patches=args.patches, tile=tile, scale=4, seed=0)
    draws: list[list[dict[str, np.ndarray]]] = []  # feeds per noise draw
    for k in range(args.draws):
        seed = args.seed + 1000 * k
        if graph == "pipeline":
            feeds = []
            for i in range(len(hold.lr)):
                noise = np.random.default_rng(seed + i).standard_normal((1, 3, tile, tile)).astype(np.float32)
                feeds.append({"lr": hold.lr[i : i + 1], "noise": noise})
        else:  # the decoder's input: the fp32 reference pipeline's x0 on the same patches
            from tadsr.provenance import models_from_manifest
            from tadsr.quantize.calibration import capture

            runs = capture(models_from_manifest(fp32_manifest), hold.lr, seed=seed)
            feeds = [{"x0": runs.x0[i : i + 1]} for i in range(len(hold.lr))]
        draws.append(feeds)
    feeds = [f for d in draws for f in d]
    hr = np.concatenate([hold.hr] * args.draws)
    n = len(hold.lr)

    def run(folder: Path) -> tuple[list[np.ndarray], float | None]:
        r = load_runner(folder, **get_format(read_manifest(folder)["format"]).runner_kwargs(1))
        outs = [r.run(f)["sr"] for f in feeds]
        if r.backend == "coreml-sim":
            return outs, None
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            r.run(feeds[0])
            times.append(time.perf_counter() - t0)
        return outs, statistics.median(times) * 1e3

    ref, ref_ms = run(args.fp32)
    ref_y = [psnr_y_8bit(o, hr[i]) for i, o in enumerate(ref)]
    print(f"# INT8 loss vs HR: {args.fp32.name}")
    print()
    print(f"held-out: {n} patches of {tile} px from {info['source']} (seed 1 of tadsr quantize), {args.draws} noise "
          f"draw(s), noise seed {args.seed}+1000k+i; PSNR-Y 8-bit, 4 px border; latency median of {args.runs}, 1 "
          "thread, one tile. Loss per draw: mean over the patches of one draw; the loss column is the mean over all "
          "draws (sd across draws)")
    print()
    print("| artifact | PSNR-Y mean | loss vs fp32 (mean) | loss per draw | loss (worst patch) | PSNR vs fp32 (worst) "
          "| size x fp32 | int8 weights | float blocks | HR budget / recorded loss / bound | ms per tile "
          "| speed x fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.fp32.name} | {statistics.mean(ref_y):.3f} | - | - | - | - | 1.000 | - | - | - | "
          f"{'-' if ref_ms is None else f'{ref_ms:.1f}'} | - |")
    for folder in args.int8:
        outs, ms = run(folder)
        ys = [psnr_y_8bit(o, hr[i]) for i, o in enumerate(outs)]
        loss = [a - b for a, b in zip(ref_y, ys, strict=True)]
        per_draw = [statistics.mean(loss[k * n : (k + 1) * n]) for k in range(args.draws)]
        spread = f" (sd {statistics.stdev(per_draw):.3f})" if args.draws > 1 else ""
        vs = min(psnr(o, r, 2.0) for o, r in zip(outs, ref, strict=True))
        m = read_manifest(folder)
        q, recipe = m.get("quantization", {}), m.get("recipe", {})
        budget, rec, bound = recipe.get("hr_budget_db"), recipe.get("hr_loss_db"), recipe.get("hr_bound_db")
        speed = "-" if ms is None or ref_ms is None else f"{ref_ms / ms:.2f}"
        print(f"| {folder.name} ({folder.parent.name}) | {statistics.mean(ys):.3f} | {statistics.mean(loss):+.3f}"
              f"{spread} | {' '.join(f'{x:+.2f}' for x in per_draw)} | {max(loss):+.3f} | {vs:.2f} | {_size(folder) / _size(args.fp32):.3f} | "
              f"{100 * (q.get('int8_fraction') or 0):.1f}% | {len(q.get('float_units') or [])} | "
              f"{'none' if budget is None else budget} / {'-' if rec is None else f'{rec:+.3f}'} / "
              f"{'-' if bound is None else f'{bound:+.3f}'} | "
              f"{'-' if ms is None else f'{ms:.1f}'} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

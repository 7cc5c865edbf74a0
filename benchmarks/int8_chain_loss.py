r"""What INT8 components cost the user once chained (issue 18): PSNR-Y against HR lost relative to fp32.

A component artifact is one link of the chain encoder -> denoiser -> decoder that the device runs in turn, so the
user loses what the chain loses. For a folder of fp32 component artifacts and one or more folders of INT8
components made from them (``tadsr quantize``), on HR images the quantizer never saw (default: the shipped
benchmark photos; LR by MATLAB bicubic / 4), through the tiler with the same noise:

- PSNR-Y vs HR of the fp32 chain and of each INT8 chain (8-bit, 4 px border, as ``tadsr bench``), and the loss:
  its mean, its mean with an image that INT8 improves counted as 0 (as the recipe's HR budget counts held-out
  patches, so that a gain on one photo does not hide a loss on another) and each image's;
- the loss of each INT8 component alone (the other two fp32), which says where the chain's loss comes from;
- the HR budget and loss each INT8 component's recipe recorded on its own held-out patches, and its size::

    python benchmarks/int8_chain_loss.py FP32_DIR INT8_DIR [INT8_DIR ...] [--images DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GRAPHS = ("encoder", "denoiser", "decoder")


def _folders(root: Path, fmt: str | None) -> dict[str, Path]:
    """``{graph: artifact folder}`` of the components in ``root`` (one per graph; ``fmt`` picks among formats)."""
    out: dict[str, Path] = {}
    for g in GRAPHS:
        found = sorted(d for d in root.glob(f"{g}-*") if (d / "manifest.json").exists()
                       and (fmt is None or d.name.split("-")[1] == fmt))  # fmt: skip
        if len(found) != 1:
            sys.exit(f"{root}: expected one {g} artifact{' of ' + fmt if fmt else ''}, found {[d.name for d in found]}")
        out[g] = found[0]
    return out


def _recipe_line(folder: Path) -> str:
    m = json.loads((folder / "manifest.json").read_text())
    q = m.get("quantization", {})
    size = sum(f["bytes"] for f in m["files"])
    budget, loss, bound = q.get("hr_budget_db"), q.get("hr_loss_db"), q.get("hr_bound_db")
    hr = "-" if budget is None else f"{loss:.3f} (bound {bound:.3f}) of {budget:.3f}"
    return f"{size / 1e6:.2f} MB, float blocks {len(q.get('float_units', []))}, recipe HR loss {hr}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fp32", type=Path, help="folder with the fp32 encoder, denoiser and decoder artifacts")
    p.add_argument("int8", type=Path, nargs="+", help="folders with INT8 components made from them")
    p.add_argument("--format", dest="fmt", help="the format to take when a folder holds several")
    p.add_argument("--images", type=Path, help="HR images (default: the shipped benchmark photos)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the tiler")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from tadsr.cli.main_job import default_bench_dir
    from tadsr.imresize import imresize
    from tadsr.metrics import psnr_y_8bit
    from tadsr.runtime.imageio import read_image, to_model
    from tadsr.runtime.pipeline import MobileSRPipeline

    images = sorted((args.images or default_bench_dir()).glob("*.png"))
    if not images:
        sys.exit("no PNG images found")
    data = []
    for f in images:
        rgb = read_image(f).rgb
        h, w = (rgb.shape[0] // 4) * 4, (rgb.shape[1] // 4) * 4
        hr = np.clip(rgb[:h, :w], 0, 1)
        data.append((f.stem, to_model(np.clip(imresize(hr, 1 / 4), 0, 1)), to_model(hr)))

    def score(sets: dict[str, Path]) -> list[float]:
        pipe = MobileSRPipeline(sets)
        return [psnr_y_8bit(pipe.upscale(lr, seed=args.seed), hr) for _, lr, hr in data]

    fp32 = _folders(args.fp32, args.fmt)
    base = score(fp32)
    print(f"# int8_chain_loss: {len(data)} images ({', '.join(n for n, _, _ in data)}), noise seed {args.seed}")
    print(f"fp32 chain ({args.fp32}): PSNR-Y mean {np.mean(base):.3f} dB "
          f"({', '.join(f'{v:.2f}' for v in base)})")  # fmt: skip
    print()
    print("| INT8 folder | what is INT8 | PSNR-Y mean | loss vs fp32 mean | gains as 0 | loss per image | component |")
    print("|---|---|---|---|---|---|---|")
    for root in args.int8:
        int8 = _folders(root, args.fmt)
        rows = [("all three", dict(int8), "")] + [
            (f"{g} only", {**fp32, g: int8[g]}, _recipe_line(int8[g])) for g in GRAPHS]
        for what, sets, note in rows:
            got = score(sets)
            loss = np.asarray(base) - np.asarray(got)
            each = ", ".join(f"{v:.2f}" for v in loss)
            print(f"| {root} | {what} | {np.mean(got):.3f} | {loss.mean():.3f} | {np.maximum(loss, 0).mean():.3f} | "
                  f"{each} | {note} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

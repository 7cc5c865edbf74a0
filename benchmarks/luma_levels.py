"""How many wavelet levels the ``luma`` colour fix should keep from the LR: a sweep on *training* crops.

The ``luma`` fix (:mod:`tadsr.color_fix`) outputs ``ref + Y(high_L(sr)) - Y(high_L(ref))``: the bicubic x4 of the
LR with its luma detail above ``L`` à-trous levels replaced by the SR's. Fewer levels leave the SR only the finest
bands (what a x4 LR cannot hold); more levels let it move coarser luma too. This script picks ``L`` on crops of the
``train`` split, so the held-out crops that report the fix stay unused for the choice. One-step student of the
given weights, grid crops (``--per-image`` per photo, ``--crops`` spread evenly), noise seeded per batch; scored
like ``tadsr.train.validate`` (8-bit outputs, 4-px border): PSNR-Y, SSIM-Y, LR consistency mean and worst, ΔE00.

    python benchmarks/luma_levels.py --photos data/photos --crops 48 --levels 2 3 4 5 6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tadsr.color_fix import luma_fix
from tadsr.models.ops import bicubic_x4_reference
from tadsr.pipeline import OneStepPipeline, make_noise
from tadsr.train.common import chunks
from tadsr.train.data import grid_crops, load_pairs, to_unit
from tadsr.train.validate import _score, _to_uint8, load_bundle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set (its train split is used)")
    ap.add_argument("--weights", type=Path, default=Path("tadsr/weights"))
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--crops", type=int, default=48)
    ap.add_argument("--per-image", type=int, default=2, help="grid crops per photo before the even spread")
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = load_bundle(args.weights, args.preset, torch.device("cpu"))
    side = 4 * models.preset.pad_multiple
    hr, lr, _ = grid_crops(load_pairs(args.photos, "train", min_side=side), side, args.per_image,
                           max_crops=args.crops)  # fmt: skip
    pipe = OneStepPipeline(models)
    srs, refs = [], []
    with torch.inference_mode():
        for k, s in enumerate(chunks(len(lr), 8)):
            y = to_unit(lr[s])
            srs.append(pipe(y, noise=make_noise((y.shape[0], models.preset.vq.embed_dim, *y.shape[-2:]), k)))
            refs.append(bicubic_x4_reference(y))
    sr, ref = torch.cat(srs), torch.cat(refs)
    hr_n, lr_n = hr.transpose(0, 2, 3, 1), lr.transpose(0, 2, 3, 1)

    def row(out: torch.Tensor) -> str:
        a = np.array([_score(o, h, q) for o, h, q in zip(_to_uint8(out.clamp(-1, 1)), hr_n, lr_n)])
        lr_cons = f"{a[:, 3].mean():.2f} / {a[:, 3].min():.2f}"
        return f"{a[:, 0].mean():.2f} | {a[:, 1].mean():.4f} | {lr_cons} | {a[:, 4].mean():.2f}"

    print(f"# Levels of the luma fix, one-step student, {len(hr)} train crops of {args.photos}\n")
    print("| output | PSNR-Y | SSIM-Y | LR cons. mean / worst | ΔE00 |")
    print("|---|---|---|---|---|")
    print(f"| bicubic x4 | {row(ref)} |")
    print(f"| student, no fix | {row(sr)} |")
    for n in args.levels:
        print(f"| student, luma, {n} levels | {row(luma_fix(sr, ref, n))} |")
    print(f"\n{time.perf_counter() - t0:.0f} s, torch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

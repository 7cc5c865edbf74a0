"""Where the autoencoder loses colour: PSNR of luma and of each chroma channel, with and without the VQ lookup.

On the held-out crops of ``tadsr.train.validate`` (same selection: the grid crops of the val split, ``--max-crops``
spread evenly), each autoencoder given reconstructs the HR crop, ``decode(encode(HR))``, once through the
codebook (what every pipeline decodes) and once on the continuous latent (``force_not_quantize``). Scored against
HR (4-px border cropped): PSNR of Y, Cb and Cr (BT.601, as MATLAB ``rgb2ycbcr``), RGB PSNR and ΔE00 of the
low-passed images. Bicubic x4 of the LR is the reference row. A chroma PSNR far below the luma PSNR, with or
without the lookup, says the encoder-decoder pair drops colour, not the codebook.

    python benchmarks/ae_colour_split.py --photos data/photos \\
        --autoencoder shipped=tadsr/weights/bundled_autoencoder.safetensors --max-crops 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tadsr.cli.common import named_path
from tadsr.metrics import color_error, crop_border, psnr, rgb_to_ycbcr
from tadsr.pipeline import load_autoencoder
from tadsr.train.common import chunks
from tadsr.train.data import load_pairs, to_unit
from tadsr.train.validate import _bicubic, _to_uint8, grid_crops

def scores(sr: np.ndarray, hr: np.ndarray) -> list[float]:
    """[PSNR Y, PSNR Cb, PSNR Cr, PSNR RGB, ΔE00] of two uint8 HWC images (4-px border cropped)."""
    a, b = sr.astype(np.float64) / 255.0, hr.astype(np.float64) / 255.0
    ya, yb = crop_border(rgb_to_ycbcr(a), 4), crop_border(rgb_to_ycbcr(b), 4)
    per = [min(psnr(ya[..., c], yb[..., c], 1.0), 100.0) for c in range(3)]
    return [*per, min(psnr(crop_border(a, 4), crop_border(b, 4), 1.0), 100.0), color_error(a, b)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set (val split) or plain image folder")
    ap.add_argument("--autoencoder", action="append", required=True, type=named_path, help="NAME=VQ-f4 checkpoint")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--max-crops", type=int, default=32)
    ap.add_argument("--crop", type=int, default=256,
                    help="HR crop side (the decoder's GroupNorm sees the whole tile, so its size matters)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    hr, lr, _ = grid_crops(load_pairs(args.photos, "val"), args.crop, 8, max_crops=args.max_crops)
    hr_nhwc = hr.transpose(0, 2, 3, 1)
    rows = {"bicubic x4": [scores(s, h) for s, h in zip(_bicubic(lr), hr_nhwc)]}
    with torch.inference_mode():
        for name, path in args.autoencoder:
            ae = load_autoencoder(path, args.preset)
            for label, raw in (("codebook", False), ("no lookup", True)):
                outs = [_to_uint8(ae.decode(ae.encode(to_unit(hr[s])), force_not_quantize=raw).clamp(-1, 1))
                        for s in chunks(len(hr), 8)]  # fmt: skip
                rows[f"{name}, {label}"] = [scores(s, h) for s, h in zip(np.concatenate(outs), hr_nhwc)]
    print(f"# Colour of the autoencoder's reconstruction ({len(hr)} held-out {args.crop}² crops of {args.photos})\n")
    print("| reconstruction | PSNR Y | PSNR Cb | PSNR Cr | PSNR RGB | ΔE00 (low-pass) |")
    print("|---|---|---|---|---|---|")
    for name, v in rows.items():
        m = np.mean(v, axis=0)
        print(f"| {name} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} | {m[4]:.2f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s, torch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

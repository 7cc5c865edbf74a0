"""Which LR tile `tadsr upscale` should run a model at: the same held-out crops, tiled at each size.

The bundled networks normalise with GroupNorm over the whole tile, so the tile the pipeline runs at is part of the
model: a model trained on 256-px HR crops (64-px LR tiles) sees other statistics on a 512-px tile. This runs the
one-step student and the do-nothing path ``decode(encode(bicubic(LR)))`` through :func:`upscale_tiled`, as
``tadsr upscale`` does (feather blend, per-tile noise windows of one seeded field), on the val crops of
``tadsr.train.validate`` (grid crops of ``--crop`` px, ``--max-crops`` spread evenly), once per ``--tiles`` entry,
and scores each against HR like ``validate`` (PSNR-Y, SSIM-Y, PSNR-RGB, LR consistency, ΔE00 of the low-passed
images). Bicubic x4 is the reference row.

    python benchmarks/tile_choice.py --photos data/photos --crop 512 --max-crops 8 --tiles 64 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tadsr.color_fix import COLOR_FIXES
from tadsr.pipeline import DoNothingPipeline, OneStepPipeline
from tadsr.runtime.tiling import upscale_tiled
from tadsr.train.data import grid_crops, load_pairs, to_unit
from tadsr.train.validate import _bicubic, _score, _to_uint8, load_bundle

COLUMNS = ("PSNR-Y", "SSIM-Y", "PSNR-RGB", "LR cons. mean / worst", "ΔE00 (low-pass)")


def _row(name: str, scores: list[tuple[float, ...]], seconds: float | None) -> str:
    s = np.asarray(scores)
    m = s.mean(axis=0)
    sec = "-" if seconds is None else f"{seconds:.1f}"
    return (f"| {name} | {m[0]:.2f} | {m[1]:.4f} | {m[2]:.2f} | {m[3]:.2f} / {s[:, 3].min():.2f} | {m[4]:.2f} "
            f"| {sec} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set (val split) or plain image folder")
    ap.add_argument("--weights", type=Path, default=Path("tadsr/weights"), help="folder of bundled_*.safetensors")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--crop", type=int, default=512, help="HR side of each held-out crop")
    ap.add_argument("--max-crops", type=int, default=8)
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128], help="LR tile sides (multiples of 64)")
    ap.add_argument("--overlap", type=int, default=16, help="LR overlap between tiles (upscale's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--color-fix", default="none", choices=COLOR_FIXES)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if any(t <= 0 or t % 64 or t * 4 > args.crop for t in args.tiles):
        ap.error(f"--tiles {args.tiles}: each must be a positive multiple of 64 and at most --crop / 4")
    torch.set_num_threads(args.threads)
    hr, lr, _ = grid_crops(load_pairs(args.photos, "val"), args.crop, 8, max_crops=args.max_crops)
    hr_nhwc = hr.transpose(0, 2, 3, 1)
    models = load_bundle(args.weights, args.preset, torch.device("cpu"))
    c, scale = models.preset.vq.embed_dim, models.preset.scale
    student = OneStepPipeline(models, color_fix=args.color_fix)
    nothing = DoNothingPipeline(models, color_fix=args.color_fix)

    def runner(pipe: OneStepPipeline | DoNothingPipeline):  # noqa: ANN202
        def run(tiles: np.ndarray, noise: np.ndarray) -> np.ndarray:
            return pipe(torch.from_numpy(tiles), noise=torch.from_numpy(noise)).numpy()

        return run

    rows = [_row("bicubic x4", [_score(s, h, l) for s, h, l in zip(_bicubic(lr), hr_nhwc, lr.transpose(0, 2, 3, 1))],
                 None)]  # fmt: skip
    with torch.inference_mode():
        for tile in args.tiles:
            for name, pipe in (("do-nothing", nothing), ("student, 1 step", student)):
                t0, scores, run = time.perf_counter(), [], runner(pipe)
                for k in range(len(lr)):
                    out = upscale_tiled(to_unit(lr[k : k + 1]).numpy(), run, tile=tile, scale=scale,
                                        overlap=args.overlap, seed=args.seed + k, latent_channels=c,
                                        pad_multiple=models.preset.pad_multiple)  # fmt: skip
                    scores.append(_score(_to_uint8(torch.from_numpy(out))[0], hr_nhwc[k], lr[k].transpose(1, 2, 0)))
                rows.append(_row(f"{name}, LR tile {tile}", scores, (time.perf_counter() - t0) / len(lr)))
    fix = f", colour fix {args.color_fix}" if args.color_fix != "none" else ""
    print(f"# Tile choice: {len(hr)} held-out {args.crop}² crops of {args.photos}, weights {args.weights}, "
          f"overlap {args.overlap}{fix}\n")
    print("| method | " + " | ".join(COLUMNS) + " | s per crop |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    print("\n".join(rows))
    print(f"\ntorch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

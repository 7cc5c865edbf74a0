"""How much a denoiser's result on whole held-out images depends on the image's orientation and on the noise.

Each image of a held-out set (a photo set's ``val`` split or a plain folder such as ``tadsr/data/bench``) is
rotated by 0, 90, 180 and 270 degrees and super-resolved with several noise seeds, untiled, by every network
given: one step from the prior (``--steps 1``, the student's pipeline) or the ResShift sampler (``--steps 15``,
the teacher's pipeline). Scored by PSNR-Y against the rotated HR image. Printed as Markdown: per image and
rotation the mean over seeds and its spread (max - min), then the per-network mean over all rotations and seeds
and over rotation 0 with seed 0 alone (what a single run on the images as stored measures). A swing across
rotations far above the spread across seeds says the result depends on where the content sits, not on the noise.
``--do-nothing`` adds the do-nothing path ``decode(encode(bicubic x4(LR)))`` as a column (no noise: spread 0), so
that a model's margin over it is read over the same rotations.

    python benchmarks/orientation_spread.py --data tadsr/data/bench --steps 1 \\
        --net shipped=tadsr/weights/bundled_teacher.safetensors \\
        --net s36=train/candidates/bundled_teacher_s36.safetensors --seeds 3 [--do-nothing]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from tadsr.cli.common import named_path
from tadsr.config import get_preset
from tadsr.metrics import psnr_y_8bit
from tadsr.pipeline import OneStepPipeline, TeacherPipeline, load_denoiser, load_models, make_noise
from tadsr.train.data import load_pairs, to_unit

WEIGHTS = Path(__file__).resolve().parents[1] / "tadsr" / "weights"


DO_NOTHING = "do-nothing"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="photo set (its val split) or plain image folder")
    ap.add_argument("--net", action="append", required=True, type=named_path,
                    help="NAME=denoiser checkpoint (teacher or student; bundled or official format)")
    ap.add_argument("--steps", type=int, default=1, help="1 (one step from the prior) or the schedule's step count")
    ap.add_argument("--autoencoder", type=Path, default=WEIGHTS / "bundled_autoencoder.safetensors")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds per image and rotation")
    ap.add_argument("--max-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--do-nothing", action="store_true", help="add the do-nothing path decode(encode(bicubic))")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    p = get_preset(args.preset)
    if args.steps not in (1, p.schedule.steps):
        raise SystemExit(f"--steps must be 1 or {p.schedule.steps} (the {args.preset} schedule)")
    if args.do_nothing and DO_NOTHING in {name for name, _ in args.net}:
        raise SystemExit(f"--net name {DO_NOTHING!r} is the --do-nothing column's")
    pipes: dict[str, OneStepPipeline | TeacherPipeline] = {}
    shared = load_models(autoencoder=args.autoencoder, preset=p, student=args.net[0][1])  # one autoencoder for all
    for name, path in args.net:
        net = shared.student if path == args.net[0][1] else load_denoiser(path, p)
        models = dataclasses.replace(shared, student=net, teacher=net)
        pipes[name] = OneStepPipeline(models) if args.steps == 1 else TeacherPipeline(models, args.steps)
    first = next(iter(pipes.values()))  # every pipeline holds the same autoencoder: encode each LR once
    pairs = load_pairs(args.data, "val")
    n_img = min(len(pairs), args.max_images)
    scores: dict[tuple[int, int, str], list[float]] = {}
    with torch.inference_mode():
        for i in range(n_img):
            for k in range(4):
                hr = to_unit(np.rot90(pairs.hr[i], k).transpose(2, 0, 1)[None])
                lr_p, hw = first.prepare(to_unit(np.rot90(pairs.lr[i], k).transpose(2, 0, 1)[None]))
                z_y = first.encode(lr_p)
                if args.do_nothing:
                    scores[(i, k, DO_NOTHING)] = [psnr_y_8bit(first.decode(z_y, hw, lr_p).numpy(), hr.numpy())]
                for seed in range(args.seeds):
                    for name, pipe in pipes.items():
                        if isinstance(pipe, OneStepPipeline):
                            z = pipe.denoise(z_y, make_noise(tuple(z_y.shape), seed), lr_p)
                        else:
                            z = pipe.sample(z_y, make_noise((args.steps, *z_y.shape), seed), lr_p)
                        sr = pipe.decode(z, hw, lr_p)
                        scores.setdefault((i, k, name), []).append(psnr_y_8bit(sr.numpy(), hr.numpy()))
    columns = [*pipes, *([DO_NOTHING] if args.do_nothing else [])]
    print(f"# {args.steps}-step PSNR-Y per image and rotation ({args.data}, {args.seeds} noise seeds)\n")
    print("| image | rotation | " + " | ".join(f"{n}: mean (spread)" for n in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for i in range(n_img):
        for k in range(4):
            cells = [scores[(i, k, n)] for n in columns]
            row = " | ".join(f"{np.mean(c):.2f} ({np.ptp(c):.2f})" for c in cells)
            print(f"| {pairs.names[i]} | {90 * k} | {row} |")
    every = {n: np.mean([np.mean(v) for (_, _, m), v in scores.items() if m == n]) for n in columns}
    stored = {n: np.mean([scores[(i, 0, n)][0] for i in range(n_img)]) for n in columns}
    print("| **mean, all rotations and seeds** | | " + " | ".join(f"**{every[n]:.2f}**" for n in columns) + " |")
    print("| mean, rotation 0 and seed 0 | | " + " | ".join(f"{stored[n]:.2f}" for n in columns) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s, torch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Is a one-step student's loss on an image its bias or its noise? Single seeds against the mean of many seeds' latents.

For each held-out image (a photo set's ``val`` split or a plain folder such as ``tadsr/data/bench``), untiled, as
stored: the student's PSNR-Y at each of the first seeds, the PSNR-Y of the decoded mean of ``--seeds`` latents
(an ensemble over the prior's noise: what the student would give if its output did not depend on the noise), and the
do-nothing path ``decode(encode(bicubic))``. The mean latent's spread over seeds (std of ``x0`` across seeds, mean
over positions) is printed beside them. An ensemble far above the single seeds says the loss is the noise the
student leaves, not a bias that averaging keeps.

    python benchmarks/seed_ensemble.py --data tadsr/data/bench --seeds 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tadsr.metrics import psnr_y_8bit
from tadsr.pipeline import OneStepPipeline, load_models, make_noise
from tadsr.train.data import load_pairs, to_unit

WEIGHTS = Path(__file__).resolve().parents[1] / "tadsr" / "weights"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="photo set (its val split) or plain image folder")
    ap.add_argument("--student", type=Path, default=WEIGHTS / "bundled_student.safetensors")
    ap.add_argument("--autoencoder", type=Path, default=WEIGHTS / "bundled_autoencoder.safetensors")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--seeds", type=int, default=8, help="seeds averaged in latent space (>= 2)")
    ap.add_argument("--show", type=int, default=3, help="single seeds listed")
    ap.add_argument("--max-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.seeds < 2:
        raise SystemExit("--seeds must be at least 2")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = OneStepPipeline(load_models(student=args.student, autoencoder=args.autoencoder, preset=args.preset))
    pairs = load_pairs(args.data, "val")
    show = min(args.show, args.seeds)
    print(f"# One-step student: single seeds vs the mean of {args.seeds} seeds' latents ({args.data})\n")
    print(f"student {args.student}, autoencoder {args.autoencoder}\n")
    print("| image | " + " | ".join(f"seed {s}" for s in range(show)) + " | mean of seeds | ensemble | do-nothing "
          "| x0 std over seeds |")
    print("|---|" + "---|" * (show + 4))
    rows = []
    with torch.inference_mode():
        for i in range(min(len(pairs), args.max_images)):
            hr = to_unit(pairs.hr[i].transpose(2, 0, 1)[None]).numpy()
            lr_p, hw = pipe.prepare(to_unit(pairs.lr[i].transpose(2, 0, 1)[None]))
            z_y = pipe.encode(lr_p)
            zs = torch.stack([pipe.denoise(z_y, make_noise(tuple(z_y.shape), s), lr_p) for s in range(args.seeds)])
            single = [psnr_y_8bit(pipe.decode(z, hw, lr_p).numpy(), hr) for z in zs]
            ens = psnr_y_8bit(pipe.decode(zs.mean(0), hw, lr_p).numpy(), hr)
            dn = psnr_y_8bit(pipe.decode(z_y, hw, lr_p).numpy(), hr)
            rows.append((sum(single) / len(single), ens, dn))
            cells = [f"{x:.2f}" for x in single[:show]] + [f"{rows[-1][0]:.2f}", f"**{ens:.2f}**", f"{dn:.2f}"]
            print(f"| {pairs.names[i]} | " + " | ".join(cells) + f" | {float(zs.std(0).mean()):.3f} |")
    means = [sum(r[j] for r in rows) / len(rows) for j in range(3)]
    print("| **mean** | " + " | " * show + f"{means[0]:.2f} | **{means[1]:.2f}** | {means[2]:.2f} | |")
    print(f"\n{time.perf_counter() - t0:.0f} s, torch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

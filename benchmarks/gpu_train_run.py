"""One prepared GPU training run (<= 12 min on one H200): teacher + distillation on the new photos, sanity metrics.

Preparation, on the CPU machine that has the photo set (``python -m tadsr.train.photos DIR``)::

    python benchmarks/gpu_train_run.py --prepare /path/to/photo_set --photos data/photos_gpu

writes a compact copy that can travel to the GPU machine with the device tool (``carry: ["data/photos_gpu"]``,
64 MiB at most): every photo of both splits (split unchanged) resized so that its long side is at most
``--max-side`` (default 640) but its short side stays >= 256 px (never upscaled), stored as JPEG quality 90, plus
``MANIFEST.json`` (name, split, original size). Then, on the GPU machine, one command::

    bash benchmarks/gpu_train_run.sh train        # this script, ~8.5 min (one device-tool call)
    bash benchmarks/gpu_train_run.sh throughput   # the CUDA throughput table, <= 3.5 min (a second call)

What this script does (``--device cuda``): loads the shipped autoencoder (the latent space the shipped teacher
and student live in), encodes a latent pool of ``--pool-size`` random aligned crops of the train split *on the
GPU* (the pool stays resident there: no data loader in the loop), continues the teacher from the shipped
``bundled_teacher.safetensors`` (``--from-scratch`` for a random start) for ``--teacher-minutes`` at bf16
autocast, distils the student from it for ``--distill-minutes``, and validates on the held-out split
(``tadsr.train.validate``: PSNR-Y vs bicubic and the do-nothing path, LR consistency, CIEDE2000 colour error,
red FAIL rows). Checkpoints (resumable: run the command again to continue), the log, the weights, the
validation JSON/Markdown and the grid go to ``--out`` (default ``$OUT`` under the device tool, else
``runs/gpu_train``). Nothing is written to ``tadsr/weights``: shipping is a separate, reviewed step.

``--dry-run`` runs the same code on the CPU with tiny shapes (a few steps per stage, 64 px crops), so the
script is tested in CI (tests/test_train.py) and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tadsr import fileio
from tadsr.checkpoint import load_state_dict, save_safetensors
from tadsr.config import get_preset
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import Models
from tadsr.train.common import resolve_device, setup_logging
from tadsr.train.data import build_latent_pool, load_pairs
from tadsr.train.distill import DistillConfig, load_teacher, train_distill
from tadsr.train.teacher import TeacherConfig, load_autoencoder, train_teacher
from tadsr.train.validate import format_sanity, save_grid, validate

log = logging.getLogger("gpu_train_run")

WEIGHTS = Path(__file__).resolve().parents[1] / "tadsr" / "weights"


def prepare(src: Path, dst: Path, max_side: int = 640, min_side: int = 256, quality: int = 90) -> dict[str, int]:
    """Compact JPEG copy of both splits of a photo set (see module docstring); returns counts and bytes."""
    from tadsr.train.data import _images_of

    manifest: list[dict[str, object]] = []
    total = 0
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for name, img in _images_of(Path(src), split):  # type: ignore[arg-type]
            h, w = img.shape[:2]
            s = min(1.0, max(max_side / max(h, w), min_side / min(h, w)))
            im = Image.fromarray(img)
            if s < 1.0:
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
            path = dst / split / f"{name}.jpg"
            with fileio.atomic_path(path) as tmp:
                im.save(tmp, format="JPEG", quality=quality, subsampling=0)
            total += path.stat().st_size
            manifest.append({"name": name, "split": split, "size": [h, w], "stored": [im.height, im.width]})
    (dst / "MANIFEST.json").write_text(json.dumps({"source": str(src), "max_side": max_side, "quality": quality,
                                                   "photos": manifest}, indent=1) + "\n")  # fmt: skip
    n_val = sum(m["split"] == "val" for m in manifest)
    return {"train": len(manifest) - n_val, "val": n_val, "bytes": total}


def run(args: argparse.Namespace) -> dict[str, object]:
    """Teacher -> distillation -> validation; returns the summary written to ``<out>/summary.json``."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.dry_run else resolve_device(args.device)
    preset = args.preset
    p = get_preset(preset)
    t0 = time.perf_counter()
    if args.dry_run:  # tiny shapes: 64 px HR crops, batch 2, two steps per stage
        crop, t_batch, d_batch, pool_n, val_crops = 4 * p.pad_multiple, 2, 1, 4, 1
        t_steps, d_steps = args.dry_steps, args.dry_steps
    else:
        crop, t_batch, d_batch, pool_n = 256, args.teacher_batch, args.distill_batch, args.pool_size
        val_crops = args.val_max_crops
        t_steps, d_steps = 10**7, 10**7  # the time limits decide
    amp = device.type == "cuda"
    train_pairs = load_pairs(args.photos, "train", min_side=crop)
    val_pairs = load_pairs(args.photos, "val", min_side=4 * p.pad_multiple)
    ae_path = args.autoencoder
    ae = load_autoencoder(ae_path, preset, device)
    t = time.perf_counter()
    pool = build_latent_pool(ae, train_pairs, pool_n, seed=args.seed, hr_size=crop, device=device, batch=64)
    pool_s = time.perf_counter() - t
    log.info("pool of %d crops resident on %s (%.2f GB) in %.0f s", len(pool), pool.z0.device,
             sum(x.numel() * x.element_size() for x in (pool.z0, pool.zy, pool.lq)) / 1e9, pool_s)  # fmt: skip
    tcfg = TeacherConfig(preset=preset, steps=t_steps, batch=t_batch, crop=crop, lr=args.teacher_lr, warmup=100,
                         pool_size=pool_n, seed=args.seed, amp=amp, log_every=100, save_every=500,
                         time_limit_s=None if args.dry_run else 60 * args.teacher_minutes)  # fmt: skip
    if args.dry_run:
        tcfg = replace(tcfg, warmup=1, log_every=1)
    init = None if args.from_scratch else args.teacher
    t_res = train_teacher(tcfg, pool, out / "teacher", device, init=init)
    teacher = load_teacher(t_res.weights, preset, device)
    dcfg = DistillConfig(preset=preset, steps=d_steps, batch=d_batch, crop=crop, lr=1e-4, lr_d=1e-4, warmup=20,
                         pool_size=pool_n, seed=args.seed, amp=amp, log_every=25, save_every=200,
                         time_limit_s=None if args.dry_run else 60 * args.distill_minutes)  # fmt: skip
    if args.dry_run:
        dcfg = replace(dcfg, warmup=1, log_every=1, c_dim=8)
    d_res = train_distill(dcfg, pool, teacher, out / "distill", device)
    for part, src in (("teacher", t_res.weights), ("student", d_res.weights)):
        save_safetensors(load_state_dict(src), out / f"bundled_{part}.safetensors", {"preset": preset, "part": part})
    t = time.perf_counter()
    student = UNetModelSwin(p.unet)
    student.load_state_dict(load_state_dict(d_res.weights), strict=True)
    vq = VQModelTorch(p.vq)
    vq.load_state_dict(load_state_dict(ae_path), strict=True)
    models = Models(p, student.to(device).eval(), vq.to(device).eval(), teacher.eval())
    val, outs, hr = validate(models, val_pairs, device, crop=4 * p.pad_multiple if args.dry_run else 256,
                             max_crops=val_crops, seed=args.seed)  # fmt: skip
    (out / "validation.json").write_text(val.to_json() + "\n")
    save_grid(outs, hr, val, out / "comparison.png")
    table = format_sanity(val)
    (out / "sanity.md").write_text(table + "\n")
    summary: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dry_run": bool(args.dry_run), "photos": str(args.photos), "n_train": len(train_pairs),
        "n_val": len(val_pairs), "pool": len(pool), "pool_seconds": round(pool_s, 1),
        "teacher": {"steps": t_res.steps, "batch": tcfg.batch, "seconds": round(t_res.seconds, 1),
                    "samples_per_s": round(tcfg.batch / t_res.seconds_per_step, 1), "init": str(init),
                    "metrics": t_res.metrics},
        "distill": {"steps": d_res.steps, "batch": dcfg.batch, "seconds": round(d_res.seconds, 1),
                    "samples_per_s": round(dcfg.batch / d_res.seconds_per_step, 1), "metrics": d_res.metrics},
        "validation_seconds": round(time.perf_counter() - t, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "mean": val.mean, "sanity": val.sanity,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("mean", "sanity")}, indent=2, default=str))
    print()
    print(table)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=Path("data/photos_gpu"))
    ap.add_argument("--prepare", type=Path, metavar="PHOTO_SET", help="only write the compact copy to --photos")
    ap.add_argument("--max-side", type=int, default=640, help="with --prepare")
    default_out = Path(os.environ["OUT"]) / "gpu_train" if os.environ.get("OUT") else Path("runs/gpu_train")
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--autoencoder", type=Path, default=WEIGHTS / "bundled_autoencoder.safetensors")
    ap.add_argument("--teacher", type=Path, default=WEIGHTS / "bundled_teacher.safetensors",
                    help="weights the teacher continues from")
    ap.add_argument("--from-scratch", action="store_true", help="random teacher start instead of --teacher")
    ap.add_argument("--pool-size", type=int, default=16384, help="latent crops resident on the GPU (~2.4 GB)")
    ap.add_argument("--teacher-batch", type=int, default=128)
    ap.add_argument("--teacher-lr", type=float, default=2e-4)
    ap.add_argument("--distill-batch", type=int, default=32)
    ap.add_argument("--teacher-minutes", type=float, default=4.0)
    ap.add_argument("--distill-minutes", type=float, default=2.0)
    ap.add_argument("--val-max-crops", type=int, default=256, help="held-out crops validated (time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: checks the script")
    ap.add_argument("--dry-steps", type=int, default=2)
    args = ap.parse_args(argv)
    if args.prepare:
        setup_logging()
        print(json.dumps(prepare(args.prepare, args.photos, max_side=args.max_side)))
        return 0
    setup_logging(log_file=args.out / "train.log")
    log.info("command: %s", " ".join(sys.argv))
    run(args)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())

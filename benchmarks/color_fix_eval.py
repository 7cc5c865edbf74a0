"""Colour fix and sanity metrics of the bundled model on held-out photos (issue #17, deliverables 2-3).

Methods, each without and with a colour fix (``wavelet``, ``adain``, ``luma``; :mod:`tadsr.color_fix`):
bicubic x4 (MATLAB), the do-nothing path ``decode(encode(bicubic(LR)))`` (:class:`tadsr.pipeline.DoNothingPipeline`),
the one-step student and the 15-step teacher. Metrics per crop (outputs rounded to 8 bit): PSNR-Y against HR
(4-px border), LR consistency (MATLAB bicubic x1/4 of the SR vs the LR, RGB PSNR, :func:`tadsr.metrics.lr_consistency`),
colour error (mean CIEDE2000 of Gaussian(sigma 4) low-passed SR vs HR, :func:`tadsr.metrics.color_error`).
Rows that fail :func:`tadsr.metrics.sanity_failures` (LR consistency mean < 35 dB or worst < 30 dB; a model
that does not beat the do-nothing path with the same colour fix) are marked ``❌ FAIL`` with the reasons.

Crops: the held-out (``val``) photos of a photo set (``python -m tadsr.train.photos DIR``), HR 256² / LR 64²,
per photo the grid cell with the largest luma standard deviation (the most textured one; the val split has
wallpapers, photos, paintings, portraits and cut-outs), ``--crops`` of them spread evenly over the sorted photo
names. A second table runs the student and the do-nothing path on real LR input with no HR: the centre 64²
of ``--real`` val photos at their stored resolution, LR consistency only.

The colour fix is applied to the pipeline's 8-bit-free float output exactly as the pipeline option does (the
decode clamped, fixed towards the bicubic x4 of the LR, clamped); the script checks that identity on the first
batch against ``OneStepPipeline(models, color_fix=...)`` and prints the difference.

Usage (the committed run: about 5 CPU-minutes without the teacher; the teacher adds about 7 s per crop)::

    python -m tadsr.train.photos data/photos
    OMP_NUM_THREADS=1 python benchmarks/color_fix_eval.py --photos data/photos --crops 24 --real 12 --no-teacher \\
        --grid benchmarks/results/color_fix_grid.png --json benchmarks/results/color_fix_bundled.json \\
        > benchmarks/results/color_fix_bundled.md
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tadsr.train.data import load_pairs, to_unit
from tadsr.train.validate import _bicubic, _to_uint8, load_bundle

from tadsr.color_fix import color_fix
from tadsr.metrics import color_error, crop_border, lr_consistency, psnr, rgb_to_y, sanity_failures
from tadsr.models.ops import bicubic_x4_reference
from tadsr.pipeline import DoNothingPipeline, OneStepPipeline, TeacherPipeline, make_noise

FIXES = ("none", "wavelet", "adain", "luma")
log = logging.getLogger("color_fix_eval")


def pick_crops(pairs, n: int, s: int = 256) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per photo the most textured aligned HR s² / LR (s/4)² grid cell; ``n`` photos spread over the names."""
    hrs, lrs, labels = [], [], []
    q = s // 4
    for name, hr, lr in zip(pairs.names, pairs.hr, pairs.lr):
        best = None
        for y in range(0, lr.shape[0] - q + 1, q):
            for x in range(0, lr.shape[1] - q + 1, q):
                h = hr[4 * y : 4 * y + s, 4 * x : 4 * x + s]
                sd = float(rgb_to_y(h.astype(np.float64) / 255.0).std())
                if best is None or sd > best[0]:
                    best = (sd, y, x)
        if best is None:
            continue
        _, y, x = best
        hrs.append(hr[4 * y : 4 * y + s, 4 * x : 4 * x + s])
        lrs.append(lr[y : y + q, x : x + q])
        labels.append(f"{name}@{4 * y},{4 * x}")
    keep = np.linspace(0, len(hrs) - 1, min(n, len(hrs))).round().astype(int)
    return np.stack([hrs[i] for i in keep]), np.stack([lrs[i] for i in keep]), [labels[i] for i in keep]


@torch.no_grad()
def run_methods(models, lr: np.ndarray, batch: int, seed: int) -> tuple[dict[str, np.ndarray], float]:
    """uint8 NHWC outputs of every method x fix; and the max |pipeline option - post-hoc fix| of batch 0."""
    pipes = {"do-nothing": DoNothingPipeline(models), "student": OneStepPipeline(models)}
    if models.teacher is not None:
        pipes["teacher-15"] = TeacherPipeline(models, 15)
    outs: dict[str, list[np.ndarray]] = {}
    check = 0.0
    c = models.preset.vq.embed_dim
    for k in range(0, len(lr), batch):
        y = to_unit(lr[k : k + batch].transpose(0, 3, 1, 2), "cpu")
        noise = make_noise((y.shape[0], c, *y.shape[-2:]), seed + k)
        up = bicubic_x4_reference(y)
        for name, pipe in pipes.items():
            raw = pipe(y, seed=seed + 1000 + k) if name == "teacher-15" else pipe(y, noise=noise)
            for fix in FIXES:
                out = raw if fix == "none" else color_fix(raw, up, fix).clamp(-1, 1)
                outs.setdefault(f"{name} {fix}", []).append(_to_uint8(out))
                if k == 0 and name == "student" and fix != "none":  # the shipped option on the first 2 crops
                    ref = OneStepPipeline(models, color_fix=fix)(y[:2], noise=noise[:2])
                    check = max(check, float((ref - out[:2]).abs().max()))
        log.info("batch %d/%d done", k // batch + 1, -(-len(lr) // batch))
    return {m: np.concatenate(v) for m, v in outs.items()}, check


def scores(sr: np.ndarray, hr: np.ndarray | None, lr: np.ndarray) -> dict[str, float]:
    a, lo = sr.astype(np.float64) / 255.0, lr.astype(np.float64) / 255.0
    m = {"lr_cons": min(lr_consistency(a, lo), 100.0)}
    if hr is not None:
        b = hr.astype(np.float64) / 255.0
        m["psnr_y"] = min(psnr(crop_border(rgb_to_y(a), 4), crop_border(rgb_to_y(b), 4), 1.0), 100.0)
        m["de00"] = color_error(a, b)
    return m


def table(per: dict[str, list[dict[str, float]]], with_hr: bool) -> tuple[list[str], dict]:
    rows, summary = [], {}
    dn = {fix: float(np.mean([s["psnr_y"] for s in per[f"do-nothing {fix}"]])) for fix in FIXES} if with_hr else {}
    head = "| method | colour fix | PSNR-Y (dB) | LR cons. mean (dB) | LR cons. worst (dB) | ΔE00 (low-pass) | verdict |"
    rows += [head if with_hr else head.replace(" PSNR-Y (dB) |", "").replace(" ΔE00 (low-pass) |", ""),
             "|---" * (7 if with_hr else 5) + "|"]  # fmt: skip
    for m, ss in per.items():
        name, _, fix = m.rpartition(" ") if m != "bicubic" else ("bicubic", "", "-")
        lc = [s["lr_cons"] for s in ss]
        py = float(np.mean([s["psnr_y"] for s in ss])) if with_hr else None
        dn_ref = dn.get(fix) if with_hr and name in ("student", "teacher-15") else None
        fails = sanity_failures(lc, py, dn_ref)
        verdict = "❌ FAIL: " + "; ".join(fails) if fails else "✅ pass"
        summary[m] = {"lr_cons_mean": float(np.mean(lc)), "lr_cons_worst": float(np.min(lc)), "fails": fails}
        cells = [name, fix]
        if with_hr:
            de = float(np.mean([s["de00"] for s in ss]))
            summary[m].update(psnr_y=py, de00=de)
            cells += [f"{py:.2f}", f"{np.mean(lc):.2f}", f"{np.min(lc):.2f}", f"{de:.2f}", verdict]
        else:
            cells += [f"{np.mean(lc):.2f}", f"{np.min(lc):.2f}", verdict]
        rows.append("| " + " | ".join(cells) + " |")
    return rows, summary


def save_grid(outs: dict[str, np.ndarray], hr: np.ndarray, path: Path, rows: int = 6) -> list[int]:
    """Rows: the 3 most textured and the 3 most saturated crops; columns: bicubic, do-nothing, student x fixes, HR."""
    cols = ["bicubic", "do-nothing none", "student none", "student wavelet", "student luma", "teacher-15 none", "HR"]
    cols = [c for c in cols if c == "HR" or c in outs]
    f = hr.astype(np.float64) / 255.0
    texture = [float(rgb_to_y(h).std()) for h in f]
    sat = [float((h.max(-1) - h.min(-1)).mean()) for h in f]
    order: list[int] = []
    for i in list(np.argsort(texture)[::-1][:3]) + list(np.argsort(sat)[::-1]):
        if int(i) not in order:
            order.append(int(i))
        if len(order) == rows:
            break
    s, pad, head = hr.shape[1], 4, 16
    canvas = Image.new("RGB", (len(cols) * (s + pad) - pad, head + len(order) * (s + pad) - pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        draw.text((j * (s + pad) + 3, 2), c, fill="black")
        for r, i in enumerate(order):
            canvas.paste(Image.fromarray(hr[i] if c == "HR" else outs[c][i]), (j * (s + pad), head + r * (s + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set (its val split is used)")
    ap.add_argument("--weights", type=Path, default=Path("tadsr/weights"))
    ap.add_argument("--crops", type=int, default=40)
    ap.add_argument("--real", type=int, default=16, help="val photos used as real LR input (no HR)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument("--grid", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    models = load_bundle(args.weights, "bundled", torch.device("cpu"))
    if args.no_teacher:
        models.teacher = None
    pairs = load_pairs(args.photos, "val", min_side=256)
    hr, lr, labels = pick_crops(pairs, args.crops)
    outs, check = run_methods(models, lr, args.batch, args.seed)
    outs = {"bicubic": _bicubic(lr.transpose(0, 3, 1, 2)), **outs}
    per = {m: [scores(o, h, lo) for o, h, lo in zip(sr, hr, lr)] for m, sr in outs.items()}
    rows, summary = table(per, True)
    # real LR input, no HR: the centre 64² of val photos at their stored resolution
    real = []
    for name, img in zip(pairs.names, pairs.hr):
        y, x = (img.shape[0] - 64) // 2, (img.shape[1] - 64) // 2
        real.append((name, img[y : y + 64, x : x + 64]))
    keep = np.linspace(0, len(real) - 1, min(args.real, len(real))).round().astype(int)
    real_lr = np.stack([real[i][1] for i in keep])
    models.teacher = None  # the teacher is too slow for this table on a CPU
    routs, _ = run_methods(models, real_lr, args.batch, args.seed)
    routs = {"bicubic": _bicubic(real_lr.transpose(0, 3, 1, 2)), **routs}
    rper = {m: [scores(o, None, lo) for o, lo in zip(sr, real_lr)] for m, sr in routs.items()}
    rrows, rsummary = table(rper, False)
    order = save_grid(outs, hr, args.grid) if args.grid else []
    print(f"# Colour fix and sanity metrics, bundled model, {len(hr)} held-out crops ({args.photos.name} val split)\n")
    print(f"HR 256² / LR 64² (MATLAB bicubic x4 degradation), most textured cell of each of {len(hr)} val photos; "
          f"seed {args.seed}; outputs rounded to 8 bit. Pipeline option vs post-hoc fix, first 2 crops: max |diff| "
          f"{check:.2e}. Do-nothing comparison uses the do-nothing path with the same colour fix.\n")  # fmt: skip
    print("\n".join(rows))
    print(f"\n## Real LR input without HR: centre 64² of {len(real_lr)} val photos at stored resolution\n")
    print("\n".join(rrows))
    print("\nCrops: " + ", ".join(labels))
    if order:
        print(f"\nGrid rows ({args.grid.name}): " + ", ".join(labels[i] for i in order))
    print(f"\n{time.perf_counter() - t0:.0f} s, torch threads 1")
    if args.json:
        args.json.write_text(json.dumps({"crops": labels, "held_out": summary, "real_lr": rsummary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

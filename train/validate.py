"""Validation of the bundled models on held-out photos: PSNR / SSIM on Y (4-px border), comparison grid.

Rows of the table (all on the same aligned LR/HR val crops, outputs rounded to 8 bit):

* ``bicubic``: MATLAB ``imresize(LR, 4)`` (the classic baseline);
* ``autoencoder``: ``decode(encode(HR))``, the ceiling of every latent method (quantised decode);
* ``do_nothing``: ``decode(encode(bicubic(LR)))`` through the same autoencoder (:class:`DoNothingPipeline`), the
  floor a denoiser must beat;
* ``teacher_15``: the teacher with the ResShift 15-step sampler (:class:`tadsr.pipeline.TeacherPipeline`);
* ``teacher_15_ddim``: the teacher's deterministic 15-step sampler (the distillation target);
* ``teacher_1``: the teacher run once at t = T-1 (= the student before distillation);
* ``student_1``: the distilled one-step student (:class:`tadsr.pipeline.OneStepPipeline`).

Means are over all crops and per photo; PSNR is also given on RGB, which shows colour errors that the
luma-only numbers hide. Sanity metrics per crop (:mod:`tadsr.metrics`): ``lr_cons`` (MATLAB bicubic x1/4 of the
output vs the LR crop, RGB PSNR) and ``de00`` (mean CIEDE2000 of low-passed output vs HR). ``ValResult.sanity``
lists, per method, why it FAILS (LR consistency mean < 35 dB or worst crop < 30 dB; a denoiser method that does
not beat ``do_nothing`` on PSNR-Y); :func:`format_sanity` shows failures as red ``❌ FAIL`` rows.

Usage::

    python -m tadsr.train.validate --photos data/photos --weights tadsr/weights [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tadsr.train.common import chunks, setup_logging
from tadsr.train.data import PhotoPairs, grid_crops, load_pairs, to_unit
from tadsr.train.losses import ddim_teacher_sample

from tadsr.color_fix import COLOR_FIXES
from tadsr.config import get_preset
from tadsr.imresize import imresize
from tadsr.metrics import color_error, crop_border, lr_consistency, psnr, rgb_to_y, sanity_failures, ssim
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import DoNothingPipeline, Models, OneStepPipeline, TeacherPipeline, make_noise
from tadsr.schedule import make_schedule

__all__ = ["ValResult", "validate", "save_grid", "format_sanity", "main"]

log = logging.getLogger(__name__)

METHODS = ("bicubic", "autoencoder", "do_nothing", "teacher_15", "teacher_15_ddim", "teacher_1", "student_1")
DENOISERS = ("teacher_15", "teacher_15_ddim", "teacher_1", "student_1")  # judged against do_nothing
NO_LR_CHECK = ("autoencoder",)  # reconstructs the HR: LR consistency not judged


@dataclass
class ValResult:
    """Mean PSNR (dB, Y and RGB) / SSIM (Y) / sanity metrics per method, over all crops and per photo.

    ``mean[method] = {"psnr": .., "ssim": .., "psnr_rgb": .., "lr_cons": .., "lr_cons_worst": .., "de00": ..}``;
    ``per_photo[photo][method]`` likewise (without ``lr_cons_worst``); ``per_crop[method][metric]`` lists one
    value per crop, in the order of ``labels`` (``"photo@y,x"``); ``sanity[method]`` the reasons the method
    fails the sanity checks (empty: passes); ``color_fix`` the colour fix the pipelines ran with.
    """

    n_crops: int
    crop: int
    mean: dict[str, dict[str, float]]
    per_photo: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    per_crop: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sanity: dict[str, list[str]] = field(default_factory=dict)
    color_fix: str = "none"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), round half to even like upstream."""
    a = ((x.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5) * 255.0).numpy()
    return np.round(a).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _bicubic(lr: np.ndarray) -> np.ndarray:
    """uint8 (B, 3, h, w) -> uint8 (B, 4h, 4w, 3) MATLAB bicubic."""
    out = [np.clip(np.round(imresize(x.transpose(1, 2, 0).astype(np.float64), 4.0)), 0, 255) for x in lr]
    return np.stack(out).astype(np.uint8)


SCORE_KEYS = ("psnr", "ssim", "psnr_rgb", "lr_cons", "de00")


def _score(sr: np.ndarray, hr: np.ndarray, lr: np.ndarray) -> tuple[float, float, float, float, float]:
    """(PSNR Y, SSIM Y, PSNR RGB, LR consistency, ΔE00 low-pass) of uint8 HWC images, 4-px border cropped."""
    a, b = sr.astype(np.float64) / 255.0, hr.astype(np.float64) / 255.0
    ya, yb = crop_border(rgb_to_y(a), 4), crop_border(rgb_to_y(b), 4)
    lr_cons = min(lr_consistency(a, lr.astype(np.float64) / 255.0), 100.0)
    return (min(psnr(ya, yb, 1.0), 100.0), ssim(ya, yb, 1.0), min(psnr(crop_border(a, 4), crop_border(b, 4), 1.0), 100.0),
            lr_cons, color_error(a, b))  # fmt: skip


@torch.no_grad()
def _run_methods(models: Models, hr: np.ndarray, lr: np.ndarray, device: torch.device, seed: int, batch: int,
                 methods: tuple[str, ...] = METHODS, color_fix: str = "none") -> dict[str, np.ndarray]:  # fmt: skip
    """Method outputs as uint8 (N, H, W, 3); ``color_fix`` applies to every pipeline (not bicubic, not the
    autoencoder's reconstruction of HR, which has no LR)."""
    outs: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    if "bicubic" in methods:
        outs["bicubic"] = [_bicubic(lr)]
    one = OneStepPipeline(models, color_fix=color_fix)
    nothing = DoNothingPipeline(models, color_fix=color_fix)
    have_teacher = models.teacher is not None
    if have_teacher:
        steps = models.preset.schedule.steps
        tp = TeacherPipeline(models, steps, color_fix=color_fix)
        tmodels = Models(models.preset, models.teacher, models.autoencoder, models.teacher)  # type: ignore[arg-type]
        t1 = OneStepPipeline(tmodels, color_fix=color_fix)
        sched = make_schedule(models.preset.schedule)
    ae = models.autoencoder
    for k, sl in enumerate(chunks(len(lr), batch)):
        y = to_unit(lr[sl], device)
        x = to_unit(hr[sl], device)
        b, c = y.shape[0], models.preset.vq.embed_dim
        noise = make_noise((b, c, *y.shape[-2:]), seed + k, device)
        if "autoencoder" in methods:
            outs["autoencoder"].append(_to_uint8(ae.decode(ae.encode(x), chunk=4096).clamp(-1, 1)))
        if "do_nothing" in methods:
            outs["do_nothing"].append(_to_uint8(nothing(y)))
        if "student_1" in methods:
            outs["student_1"].append(_to_uint8(one(y, noise=noise)))
        if have_teacher and "teacher_1" in methods:
            outs["teacher_1"].append(_to_uint8(t1(y, noise=noise)))
        if have_teacher and "teacher_15" in methods:
            outs["teacher_15"].append(_to_uint8(tp(y, seed=seed + 1000 + k)))
        if have_teacher and "teacher_15_ddim" in methods:
            lr_p, hw = tp.prepare(y)
            zy = tp.encode(lr_p)
            z = ddim_teacher_sample(models.teacher, sched, sched.prior_sample(zy, noise), zy, lr_p)
            outs["teacher_15_ddim"].append(_to_uint8(tp.decode(z, hw, lr_p)))
    return {m: np.concatenate(v) for m, v in outs.items() if v}


def validate(
    models: Models, pairs: PhotoPairs, device: torch.device, *, crop: int = 256, max_per_image: int = 8,
    max_crops: int | None = None, seed: int = 0, batch: int = 8, methods: tuple[str, ...] = METHODS,
    color_fix: str = "none",
) -> tuple[ValResult, dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """Score the methods (default: all of :data:`METHODS`) on the val crops.

    Returns:
        The result, the method outputs (uint8 NHWC) and the HR crops (uint8 NHWC).
    """
    t0 = time.perf_counter()
    hr, lr, labels = grid_crops(pairs, crop, max_per_image, max_crops=max_crops)
    for m in (models.student, models.autoencoder, models.teacher):
        if m is not None:
            m.to(device).eval()
    outs = _run_methods(models, hr, lr, device, seed, batch, methods, color_fix)
    hr_nhwc = hr.transpose(0, 2, 3, 1)
    lr_nhwc = lr.transpose(0, 2, 3, 1)
    photos = [lab.split("@")[0] for lab in labels]
    keys = SCORE_KEYS
    per_crop: dict[str, dict[str, list[float]]] = {}
    mean: dict[str, dict[str, float]] = {}
    per_photo: dict[str, dict[str, dict[str, float]]] = {p: {} for p in dict.fromkeys(photos)}
    for m, sr in outs.items():
        scores = np.array([_score(s, h, lo) for s, h, lo in zip(sr, hr_nhwc, lr_nhwc)])
        per_crop[m] = {k: [round(float(v), 4) for v in scores[:, j]] for j, k in enumerate(keys)}
        mean[m] = {k: float(scores[:, j].mean()) for j, k in enumerate(keys)}
        mean[m]["lr_cons_worst"] = float(scores[:, keys.index("lr_cons")].min())
        for p in per_photo:
            sel = np.array([q == p for q in photos])
            per_photo[p][m] = {k: float(scores[sel, j].mean()) for j, k in enumerate(keys)}
    sanity = {m: _sanity(m, per_crop, mean) for m in outs}
    res = ValResult(len(hr), crop, mean, per_photo, per_crop, labels, time.perf_counter() - t0, sanity,
                    color_fix)  # fmt: skip
    log.info("validation: %d crops in %.0f s", res.n_crops, res.seconds)
    for m in outs:
        log.info("  %-16s PSNR Y %.2f dB  SSIM Y %.4f  PSNR RGB %.2f dB  LR cons %.2f (worst %.2f) dB  dE00 %.2f%s", m,
                 mean[m]["psnr"], mean[m]["ssim"], mean[m]["psnr_rgb"], mean[m]["lr_cons"], mean[m]["lr_cons_worst"],
                 mean[m]["de00"], "  FAIL: " + "; ".join(sanity[m]) if sanity[m] else "")  # fmt: skip
    return res, outs, hr_nhwc


def _sanity(m: str, per_crop: dict[str, dict[str, list[float]]], mean: dict[str, dict[str, float]]) -> list[str]:
    lr_cons = [] if m in NO_LR_CHECK else per_crop[m]["lr_cons"]
    dn = mean["do_nothing"]["psnr"] if m in DENOISERS and "do_nothing" in mean else None
    return sanity_failures(lr_cons, mean[m]["psnr"] if dn is not None else None, dn)


def format_sanity(val: ValResult, names: dict[str, str] | None = None) -> str:
    """Markdown table of the sanity metrics; a failing method is a ``❌ FAIL`` row with its reasons."""
    names = names or {}
    fix = f", colour fix {val.color_fix}" if val.color_fix != "none" else ""
    head = (f"| method | PSNR Y (dB), {val.n_crops} crops of {val.crop}²{fix} | LR consistency mean / worst (dB) "
            "| ΔE00 (low-pass) | sanity |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|"]
    for m, d in val.mean.items():
        fails = val.sanity.get(m, [])
        verdict = ("❌ FAIL: " + "; ".join(fails)) if fails else ("✅ pass" if m in val.sanity else "")
        lc = f"{d['lr_cons']:.2f} / {d['lr_cons_worst']:.2f}" if "lr_cons" in d and m not in NO_LR_CHECK else "-"
        de = f"{d['de00']:.2f}" if "de00" in d else "-"
        lines.append(f"| {names.get(m, m)} | {d['psnr']:.2f} | {lc} | {de} | {verdict} |")
    return "\n".join(lines)


def save_grid(outs: dict[str, np.ndarray], hr: np.ndarray, res: ValResult, path: Path, rows: int = 3) -> Path:
    """PNG grid: one row per crop (the most textured crops of distinct photos), columns bicubic/teacher/student/HR."""
    cols = [("bicubic", "bicubic x4"), ("teacher_15", "teacher 15 steps"), ("student_1", "student 1 step")]
    cols = [(k, name) for k, name in cols if k in outs] + [("hr", "HR")]
    y_std = [float(rgb_to_y(h.astype(np.float64) / 255.0).std()) for h in hr]
    order, seen = [], set()
    for i in np.argsort(y_std)[::-1]:
        photo = res.labels[i].split("@")[0]
        if photo not in seen:
            order.append(int(i))
            seen.add(photo)
        if len(order) == rows:
            break
    s, pad, head = hr.shape[1], 4, 18
    canvas = Image.new("RGB", (len(cols) * (s + pad) - pad, head + len(order) * (s + pad) - pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (_, name) in enumerate(cols):
        draw.text((j * (s + pad) + 4, 3), name, fill="black")
    for r, i in enumerate(order):
        for j, (k, _) in enumerate(cols):
            img = hr[i] if k == "hr" else outs[k][i]
            canvas.paste(Image.fromarray(img), (j * (s + pad), head + r * (s + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def load_bundle(weights: Path, preset: str, device: torch.device) -> Models:
    """Models from ``<weights>/bundled_{student,teacher,autoencoder}.safetensors`` (teacher optional)."""
    from tadsr.checkpoint import load_state_dict

    p = get_preset(preset)
    stem = p.bundled_weights or preset

    def unet(part: str) -> UNetModelSwin | None:
        f = Path(weights) / f"{stem}_{part}.safetensors"
        if not f.exists():
            return None
        net = UNetModelSwin(p.unet)
        net.load_state_dict(load_state_dict(f), strict=True)
        return net.to(device).eval()

    ae = VQModelTorch(p.vq)
    ae.load_state_dict(load_state_dict(Path(weights) / f"{stem}_autoencoder.safetensors"), strict=True)
    student = unet("student")
    if student is None:
        raise FileNotFoundError(f"{weights}/{stem}_student.safetensors not found")
    return Models(p, student, ae.to(device).eval(), unet("teacher"))


def main(argv: list[str] | None = None) -> int:
    """``python -m tadsr.train.validate --photos DIR --weights DIR [--json OUT] [--grid OUT.png]``."""
    ap = argparse.ArgumentParser(prog="python -m tadsr.train.validate", description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set or .npz pack (val split used)")
    ap.add_argument("--weights", type=Path, default=Path("tadsr/weights"))
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-crops", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--grid", type=Path)
    ap.add_argument("--md", type=Path, help="write the sanity table (Markdown) here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, metavar="PX",
                    help="HR side of each val crop, run as one tile (default: 4 x the preset's pad multiple, 256 "
                         "for bundled: the tile the networks were trained on and every verb runs; 512: one LR tile "
                         "of 128)")  # fmt: skip
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--color-fix", default="none", choices=COLOR_FIXES,
                    help="colour fix of every pipeline (do-nothing, student, teacher); default none")  # fmt: skip
    args = ap.parse_args(argv)
    unit = 4 * get_preset(args.preset).pad_multiple
    crop = unit if args.crop is None else args.crop
    if crop <= 0 or crop % unit:
        ap.error(f"--crop {crop}: must be a positive multiple of {unit} (4 x the {args.preset} preset's pad multiple), "
                 "so that each LR crop is one tile the networks take without padding")  # fmt: skip
    setup_logging()
    torch.set_num_threads(args.threads)
    from tadsr.train.common import resolve_device

    device = resolve_device(args.device)
    models = load_bundle(args.weights, args.preset, device)
    pairs = load_pairs(args.photos, "val")
    res, outs, hr = validate(models, pairs, device, max_crops=args.max_crops, crop=crop,
                             batch=args.batch, methods=tuple(args.methods), color_fix=args.color_fix)  # fmt: skip
    if args.json:
        args.json.write_text(res.to_json())
    if args.grid:
        save_grid(outs, hr, res, args.grid)
    if args.md:
        args.md.write_text(format_sanity(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

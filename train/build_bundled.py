"""One-command rebuild of the bundled model: autoencoder -> teacher -> TAD-SR student -> validation -> model card.

Usage::

    python -m tadsr.train.build_bundled --photos data/photos --out tadsr/weights [--device cuda] [--budget-minutes 60]

Writes ``<out>/bundled_{autoencoder,teacher,student}.safetensors``, ``<out>/MODEL_CARD.md``,
``<out>/bundled_validation.json`` and ``<out>/bundled_comparison.png``. Stage checkpoints go to ``--work``
(default ``runs/bundled``); running the command again resumes them.

The recipe (``--recipe cpu`` or ``gpu``; default by device) fixes batch sizes, crops, learning rates and the
*maximum* step counts; the wall-clock budget is split between the stages (shares below) and each stage fits its
step count and LR schedule to its share after timing its first steps. The model card records the steps done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tadsr.checkpoint import load_state_dict, save_safetensors, sha256_file
from tadsr.config import get_preset
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import Models
from tadsr.train.autoencoder import AEConfig, AEResult, train_autoencoder
from tadsr.train.common import DistEnv, init_distributed, setup_logging
from tadsr.train.data import build_latent_pool, load_pairs, sources_json
from tadsr.train.distill import DistillConfig, load_teacher, train_distill
from tadsr.train.teacher import StageResult, TeacherConfig, load_autoencoder, train_teacher
from tadsr.train.validate import ValResult, format_sanity, save_grid, validate

__all__ = ["Recipe", "RECIPES", "build", "time_recipe", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Stage configs plus how the wall-clock budget is shared (fractions of the time left for training)."""

    name: str
    ae: AEConfig
    teacher: TeacherConfig
    distill: DistillConfig
    shares: tuple[float, float, float] = (0.38, 0.34, 0.28)
    val_reserve: float = 0.08  # fraction of the budget kept for validation and writing
    val_max_crops: int | None = None


RECIPES: dict[str, Recipe] = {
    # ~7 minutes on one H100 / H200 (bf16 autocast); trained the shipped weights (see MODEL_CARD.md).
    "gpu": Recipe(
        name="gpu",
        ae=AEConfig(steps=6000, batch=32, crop=128, final_crop=256, lr=1e-3, log_every=200, save_every=1000),
        teacher=TeacherConfig(steps=8000, batch=64, lr=4e-4, pool_size=4096, log_every=200, save_every=1000),
        distill=DistillConfig(steps=2000, batch=32, lr=1e-4, lr_d=1e-4, pool_size=4096, log_every=50),
        val_reserve=0.06,
    ),
    # ~60 minutes on 2 CPU cores. bf16 autocast on the CPU (cpu_amp) where it was faster in
    # benchmarks/results/train_throughput_cpu.txt (AVX-512 BF16 CPU: autoencoder 1.12x, teacher 1.52x; distillation
    # 1.03x, left fp32); channels-last was slower or inconsistent there. --set teacher.cpu_amp=false to undo.
    # On a CPU without native bf16 the stages train fp32 instead, with a warning (emulated bf16 ran the
    # student step at 0.55x the fp32 speed on an Intel Xeon without AVX-512 BF16, session 35).
    "cpu": Recipe(
        name="cpu",
        ae=AEConfig(steps=1500, batch=8, crop=96, final_crop=256, final_frac=0.1, lr=1e-3, warmup=50,
                    log_every=25, save_every=100, cpu_amp=True),  # fmt: skip
        teacher=TeacherConfig(steps=1500, batch=8, lr=3e-4, warmup=50, pool_size=128, log_every=25, save_every=100,
                              cpu_amp=True),  # fmt: skip
        distill=DistillConfig(steps=300, batch=4, lr=1e-4, lr_d=1e-4, warmup=10, pool_size=128, log_every=5,
                              save_every=25),  # fmt: skip
        val_reserve=0.12,
        val_max_crops=6,
    ),
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class BuildReport:
    """Everything the model card needs."""

    recipe: Recipe
    device: str
    budget_s: float
    stage_seconds: dict[str, float]
    ae: AEResult | None
    teacher: StageResult | None
    distill: StageResult | None
    pool_stats: dict[str, float]
    val: ValResult | None
    files: dict[str, dict[str, object]]
    photos: Path
    n_train: int
    n_val: int
    cpu_timings: dict[str, float] | None
    wall_s: float
    command: str
    notes: str = ""


def _share(left: float, shares: tuple[float, ...], i: int) -> float:
    return max(5.0, left * shares[i] / sum(shares[i:]))


def build(
    photos: Path, out: Path, work: Path, device: torch.device, recipe: Recipe, *, budget_minutes: float,
    seed: int = 0, dist: DistEnv = DistEnv(), reuse_autoencoder: Path | None = None,
    reuse_teacher: Path | None = None, cpu_timings: dict[str, float] | None = None, resume: bool = True,
    init_teacher: Path | None = None, notes: str = "", init_student: Path | None = None,
) -> BuildReport:  # fmt: skip
    """Run all stages within ``budget_minutes`` and write the shipped files to ``out`` (rank 0)."""
    t0 = time.perf_counter()
    budget = 60.0 * budget_minutes
    preset = recipe.ae.preset
    train_pairs = load_pairs(photos, "train", min_side=recipe.ae.final_crop)
    val_crop = 4 * get_preset(preset).pad_multiple
    val_pairs = load_pairs(photos, "val", min_side=val_crop)
    reserve = recipe.val_reserve * budget
    seconds: dict[str, float] = {}

    def left() -> float:
        return budget - reserve - (time.perf_counter() - t0)

    files: dict[str, dict[str, object]] = {}
    stem = get_preset(preset).bundled_weights or preset

    def export(part: str, src: Path) -> None:  # ship each stage as soon as it is done
        if not dist.is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        dst = out / f"{stem}_{part}.safetensors"
        save_safetensors(load_state_dict(src), dst, {"preset": preset, "part": part, "recipe": recipe.name,
                                                     "seed": str(seed)})  # fmt: skip
        files[dst.name] = {"bytes": dst.stat().st_size, "sha256": sha256_file(dst)}

    ae_res = None
    if reuse_autoencoder is not None:
        ae_path = Path(reuse_autoencoder)
    else:
        cfg = replace(recipe.ae, seed=seed, time_limit_s=_share(left(), recipe.shares, 0))
        ae_res = train_autoencoder(cfg, train_pairs, work / "autoencoder", device, dist, resume=resume)
        ae_path, seconds["autoencoder"] = ae_res.weights, ae_res.seconds
    export("autoencoder", ae_path)
    t_pool = time.perf_counter()
    ae = load_autoencoder(ae_path, preset, device)
    tcfg = recipe.teacher
    pool = build_latent_pool(ae, train_pairs, tcfg.pool_size, seed=seed, hr_size=tcfg.crop, device=device,
                             rank=dist.rank, world=dist.world)  # fmt: skip
    seconds["latent_pool"] = time.perf_counter() - t_pool
    t_res = None
    if reuse_teacher is not None:
        teacher_path = Path(reuse_teacher)
    else:
        cfg_t = replace(tcfg, seed=seed, time_limit_s=_share(left(), recipe.shares, 1))
        t_res = train_teacher(cfg_t, pool, work / "teacher", device, dist, resume=resume, init=init_teacher)
        teacher_path, seconds["teacher"] = t_res.weights, t_res.seconds
    export("teacher", teacher_path)
    teacher = load_teacher(teacher_path, preset, device)
    cfg_d = replace(recipe.distill, seed=seed, time_limit_s=_share(left(), recipe.shares, 2))
    d_res = train_distill(cfg_d, pool, teacher, work / "distill", device, dist, resume=resume, init=init_student)
    seconds["distill"] = d_res.seconds
    export("student", d_res.weights)
    val = None
    if dist.is_main:
        t_val = time.perf_counter()
        p = get_preset(preset)
        student = UNetModelSwin(p.unet)
        student.load_state_dict(load_state_dict(out / f"{stem}_student.safetensors"), strict=True)
        vq = VQModelTorch(p.vq)
        vq.load_state_dict(load_state_dict(out / f"{stem}_autoencoder.safetensors"), strict=True)
        models = Models(p, student.to(device), vq.to(device), teacher.eval())
        files[f"{stem}_student.safetensors"]["params"] = _params(student)
        files[f"{stem}_teacher.safetensors"]["params"] = _params(teacher)
        files[f"{stem}_autoencoder.safetensors"]["params"] = _params(vq)
        val, outs, hr = validate(models, val_pairs, device, crop=val_crop, max_crops=recipe.val_max_crops, seed=seed)
        (out / f"{stem}_validation.json").write_text(val.to_json() + "\n")
        save_grid(outs, hr, val, out / f"{stem}_comparison.png")
        seconds["validation"] = time.perf_counter() - t_val
    report = BuildReport(
        recipe=recipe, device=_device_name(device), budget_s=budget, stage_seconds=seconds, ae=ae_res,
        teacher=t_res, distill=d_res, pool_stats=pool.stats(), val=val, files=files, photos=Path(photos),
        n_train=len(train_pairs), n_val=len(val_pairs), cpu_timings=cpu_timings,
        wall_s=time.perf_counter() - t0, command=" ".join(["python -m tadsr.train.build_bundled", *sys.argv[1:]]),
        notes=notes,
    )  # fmt: skip
    if dist.is_main:
        (out / "MODEL_CARD.md").write_text(model_card(report))
        log.info("build done in %.0f s: %s", report.wall_s, out)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__}, bf16 autocast)"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads (torch {torch.__version__})"


def time_recipe(
    recipe: Recipe, photos: Path, device: torch.device, iters: int = 2, batch_divisor: int = 1
) -> dict[str, float]:
    """Seconds per iteration of each stage of ``recipe`` on ``device``.

    Random weights and a pool of one batch; each stage first runs one warm-up step, then ``iters`` timed steps
    (resumed in the same process, so one-off allocation and kernel set-up are not counted). With
    ``batch_divisor`` > 1 the batches are divided by it and the times multiplied by it (CPU time is linear in
    the batch; this keeps the memory of a CPU measurement of the GPU recipe reasonable).
    """
    k = batch_divisor
    recipe = replace(recipe, ae=replace(recipe.ae, batch=max(1, recipe.ae.batch // k)),
                     teacher=replace(recipe.teacher, batch=max(1, recipe.teacher.batch // k)),
                     distill=replace(recipe.distill, batch=max(1, recipe.distill.batch // k)))  # fmt: skip
    tmp = Path(f"/tmp/tadsr_time_recipe_{int(time.time())}")
    pairs = load_pairs(photos, "train", min_side=recipe.ae.final_crop)
    quiet = {"log_every": 10**9, "save_every": 10**9}
    out: dict[str, float] = {}
    for crop in (recipe.ae.crop, recipe.ae.final_crop):
        cfg = replace(recipe.ae, steps=1, crop=crop, final_frac=0.0, restart_every=10**9, **quiet)
        train_autoencoder(cfg, pairs, tmp / f"ae{crop}", device, resume=False)
        res = train_autoencoder(replace(cfg, steps=1 + iters), pairs, tmp / f"ae{crop}", device)
        out[f"autoencoder_crop{crop}"] = res.seconds_per_step
    ae = VQModelTorch(get_preset(recipe.ae.preset).vq).to(device).eval()
    n = max(recipe.teacher.batch, recipe.distill.batch)
    t = time.perf_counter()
    pool = build_latent_pool(ae, pairs, n, seed=0, hr_size=recipe.teacher.crop, device=device)
    out["latent_pool_per_crop"] = (time.perf_counter() - t) / n
    cfg_t = replace(recipe.teacher, steps=1, **quiet)
    train_teacher(cfg_t, pool, tmp / "teacher", device, resume=False)
    out["teacher"] = train_teacher(replace(cfg_t, steps=1 + iters), pool, tmp / "teacher", device).seconds_per_step
    teacher = UNetModelSwin(get_preset(recipe.ae.preset).unet)
    cfg_d = replace(recipe.distill, steps=1, **quiet)
    train_distill(cfg_d, pool, teacher, tmp / "distill", device, resume=False)
    out["distill"] = train_distill(replace(cfg_d, steps=1 + iters), pool, teacher, tmp / "distill",
                                   device).seconds_per_step  # fmt: skip
    out = {name: v if name == "latent_pool_per_crop" else v * k for name, v in out.items()}
    out["batch_divisor"] = float(k)
    out["load_average_1min"] = float(os.getloadavg()[0])
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def apply_overrides(recipe: Recipe, items: list[str], preset: str | None = None) -> Recipe:
    """``stage.field=value`` (stage in ae/teacher/distill) or ``field=value`` items; values parsed as JSON."""
    if preset is not None:
        recipe = replace(recipe, ae=replace(recipe.ae, preset=preset), teacher=replace(recipe.teacher, preset=preset),
                         distill=replace(recipe.distill, preset=preset))  # fmt: skip
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        stage, _, name = key.rpartition(".")
        if stage:
            recipe = replace(recipe, **{stage: replace(getattr(recipe, stage), **{name: value})})
        else:
            recipe = replace(recipe, **{name: value})
    return recipe


_NOT_TIMES = ("load_average_1min", "batch_divisor")


_NAMES = {
    "bicubic": "bicubic x4 (MATLAB imresize)",
    "autoencoder": "autoencoder reconstruction (ceiling)",
    "do_nothing": "do-nothing: decode(encode(bicubic LR))",
    "teacher_15": "teacher, 15 steps (ResShift sampler)",
    "teacher_15_ddim": "teacher, 15 steps (deterministic)",
    "teacher_1": "teacher, 1 step (student before distillation)",
    "student_1": "**student, 1 step (shipped)**",
}


def format_validation(val: ValResult) -> str:
    """Markdown tables of a validation result: means over all crops, then PSNR Y per photo."""
    lines = [f"| method | PSNR Y (dB), {val.n_crops} crops | SSIM Y | PSNR RGB (dB) |", "|---|---|---|---|"]
    for m, d in val.mean.items():
        lines.append(f"| {_NAMES.get(m, m)} | {d['psnr']:.2f} | {d['ssim']:.4f} | {d['psnr_rgb']:.2f} |")
    lines.append("")
    if "student_1" in val.mean:
        for ref, label in (("bicubic", "bicubic"), ("teacher_15", "the 15-step teacher"), ("autoencoder", "the ceiling")):
            if ref in val.mean:
                lines.append(f"Student minus {label}: {val.mean['student_1']['psnr'] - val.mean[ref]['psnr']:+.2f} dB "
                             f"PSNR Y, {val.mean['student_1']['psnr_rgb'] - val.mean[ref]['psnr_rgb']:+.2f} dB PSNR RGB.  ")  # fmt: skip
    if val.sanity:
        lines += ["", "Sanity metrics (a failing method is a red row, never averaged away):", "",
                  format_sanity(val, _NAMES)]  # fmt: skip
    methods = list(val.mean)
    counts = {p: sum(lab.split("@")[0] == p for lab in val.labels) for p in val.per_photo}
    lines += ["", "PSNR Y (dB) per validation photo (mean over its crops):", "",
              "| photo (crops) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]  # fmt: skip
    for p, d in val.per_photo.items():
        lines.append(f"| {p} ({counts[p]}) | " + " | ".join(f"{d[m]['psnr']:.2f}" for m in methods) + " |")
    return "\n".join(lines)


def model_card(r: BuildReport) -> str:
    """Markdown model card of a build."""
    p = get_preset(r.recipe.ae.preset)
    rows = []
    for name, res, cfg in (("autoencoder", r.ae, r.recipe.ae), ("teacher", r.teacher, r.recipe.teacher),
                           ("distill", r.distill, r.recipe.distill)):  # fmt: skip
        if res is None:
            rows.append(f"| {name} | reused | | | | |")
            continue
        m = ", ".join(f"{k} {v:.4g}" for k, v in res.metrics.items())
        rows.append(f"| {name} | {res.steps} (max {cfg.steps}) | {cfg.batch} | {cfg.lr:g} | {res.seconds:.0f} s "
                    f"({res.seconds_per_step:.3f} s/step) | {m} |")  # fmt: skip
    srcs = sources_json(r.photos)
    lic = sorted({f"{s.get('license')}" for s in srcs})
    val_files = [s["file"] for s in srcs if s.get("split") == "val"]
    cpu = ""
    if r.cpu_timings:
        ct = r.cpu_timings
        est = 0.0
        for name, res in (("teacher", r.teacher), ("distill", r.distill)):
            if res is not None and name in ct:
                est += ct[name] * res.steps
        if r.ae is not None:  # the final-crop phase is the last final_frac of the time, fewer of the steps
            a = r.recipe.ae
            small, big = ct.get(f"autoencoder_crop{a.crop}", 0.0), ct.get(f"autoencoder_crop{a.final_crop}", 0.0)
            n_big = r.ae.steps * a.final_frac * small / max(1e-9, (1 - a.final_frac) * big + a.final_frac * small)
            est += small * (r.ae.steps - n_big) + big * n_big
        est += ct.get("latent_pool_per_crop", 0) * r.recipe.teacher.pool_size
        cpu = ("\n## CPU cost of the same recipe\n\nMeasured on the development machine (2 CPU cores shared with "
               f"other jobs, load average {ct.get('load_average_1min', float('nan')):.1f}; torch CPU, fp32): "
               + ", ".join(f"{k} {v:.2f} s/iter" for k, v in ct.items() if k not in _NOT_TIMES) +
               (f" (measured at 1/{ct['batch_divisor']:.0f} of the batch and scaled)" if ct.get("batch_divisor", 1) > 1
                else "") +
               f".\nThe steps above would take about **{est / 3600:.1f} h** on that CPU. "
               "The default CPU recipe (`--device cpu`, `--recipe cpu`) fits one hour by using smaller batches, "
               "crops and pools and fewer steps; it gives a weaker model.\n")  # fmt: skip
    val = format_validation(r.val) if r.val else "(not run on this rank)"
    files = "\n".join(f"| {k} | {v.get('params', 0):,} | {int(v['bytes']) / 1e6:.2f} MB | `{str(v['sha256'])[:16]}` |"
                      for k, v in r.files.items())  # fmt: skip
    st = ", ".join(f"{k} {v:.0f} s" for k, v in r.stage_seconds.items())
    return f"""# Bundled model: `bundled` preset (TAD-SR one-step x4 student, ResShift teacher, VQ-f4)

Trained from scratch by `{r.command}`
on {r.device}; recipe `{r.recipe.name}`, budget {r.budget_s / 60:.1f} min, wall time {r.wall_s:.0f} s ({st}).

{r.notes}
## Architecture

- Denoiser (teacher and student): `UNetModelSwin` with model_channels {p.unet.model_channels}, channel_mult
  {list(p.unet.channel_mult)}, num_res_blocks {list(p.unet.num_res_blocks)}, Swin (embed {p.unet.swin_embed_dim},
  window {p.unet.window_size}, depth {p.unet.swin_depth}) at all four levels as upstream; LR tiles must be
  multiples of {p.pad_multiple} px.
- Autoencoder: `VQModelTorch`, ch {p.vq.ch}, ch_mult {list(p.vq.ch_mult)}, num_res_blocks {p.vq.num_res_blocks},
  codebook {p.vq.n_embed} x {p.vq.embed_dim}; latent standardised to zero mean / unit std after training
  (exact reparametrisation). Diffusion: v1 schedule, T = 15, kappa = 2, p = 0.3; student at t = 14.

| file | parameters | size (fp32) | sha256 |
|---|---|---|---|
{files}

## Data

{r.n_train} training photos and {r.n_val} held-out validation photos from `{r.photos.name}`
(license-clean photos gathered by `python -m tadsr.train.photos`; licences: {"; ".join(lic) or "see SOURCES.json"}).
Validation photos (never used in training): {", ".join(val_files) or "see SOURCES.json"}.
Degradation: bicubic x4, LR = MATLAB `imresize(HR, 1/4)` rounded to 8 bit (DIV2K convention); aligned random
crops (HR 256 / LR 64 for the diffusion stages) with the 8 flips/rotations. Latent pool statistics:
{", ".join(f"{k} {v:.3f}" for k, v in r.pool_stats.items())}.

## Training

| stage | steps | batch | lr | wall time | last logged metrics |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Stage 1: L1 + 0.2 (1 - SSIM) + 0.05 FFT-L1 + codebook + 0.25 commitment, dead-code restart (no perceptual net,
no GAN). Stage 2: ResShift x0-prediction MSE in latent space, EMA 0.999. Stage 3: TAD-SR (regression to the
teacher's deterministic 15-step output from the same x_T, HSD at t in {{0,1,2}}, time-aware discriminator on the
teacher's encoder features, hinge, generator weight 0.02), AdamW, EMA 0.999; the EMA student is shipped.
Decisions on the spec's open points: `train/DECISIONS.md`.
{cpu}
## Validation (held-out photos; Y channel, 4-px border cropped, outputs rounded to 8 bit)

HR {r.val.crop if r.val else 256} px / LR 64 px crops on a centred grid of each validation photo (at most 8 per photo).

{val}

The comparison grid is `bundled_comparison.png` (bicubic / teacher 15 steps / student 1 step / HR); per-crop
numbers are in `bundled_validation.json`.

## Limits

- Every latent method is capped by the autoencoder reconstruction row (`decode(encode(HR))`);
  `benchmarks/ae_ceiling.py` measures what limits that row for a given architecture and training budget.
- A few minutes of training on a few dozen photos: a demonstration model for the export/quantisation
  toolchain and the app, not a competitive SR model. Bicubic degradation only (no real-world degradations).
"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m tadsr.train.build_bundled", description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set folder or .npz pack")
    ap.add_argument("--out", type=Path, default=Path("tadsr/weights"))
    ap.add_argument("--work", type=Path, default=Path("runs/bundled"), help="stage checkpoints (resumed)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--budget-minutes", type=float, default=60.0)
    ap.add_argument("--recipe", choices=sorted(RECIPES), help="default: gpu on cuda, cpu otherwise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="ignore stage checkpoints in --work")
    ap.add_argument("--reuse-autoencoder", type=Path, help="skip stage 1, use these weights")
    ap.add_argument("--reuse-teacher", type=Path, help="skip stage 2, use these weights")
    ap.add_argument("--init-teacher", type=Path, help="stage 2 continues training from these weights")
    ap.add_argument("--init-student", type=Path, help="stage 3 continues from these student weights")
    ap.add_argument("--notes", default="", help="text for the model card (e.g. the lineage of reused stages)")
    ap.add_argument("--cpu-timings", type=Path, help="JSON from --measure-cpu-timings, quoted in the model card")
    ap.add_argument("--measure-cpu-timings", type=Path, help="only time each stage of the recipe, write JSON")
    ap.add_argument("--timing-batch-divisor", type=int, default=1, help="with --measure-cpu-timings")
    ap.add_argument("--log-file", type=Path)
    ap.add_argument("--preset", help="train another preset than 'bundled' (tests, experiments)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides, e.g. ae.batch=8 teacher.pool_size=512 val_max_crops=4")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    torch.set_num_threads(args.threads)
    dist, device = init_distributed(args.device)
    recipe = apply_overrides(RECIPES[args.recipe or ("gpu" if device.type == "cuda" else "cpu")], args.set, args.preset)
    if args.measure_cpu_timings:
        t = time_recipe(recipe, args.photos, device, batch_divisor=args.timing_batch_divisor)
        args.measure_cpu_timings.write_text(json.dumps(t, indent=2) + "\n")
        log.info("timings: %s", t)
        return 0
    cpu_t = json.loads(args.cpu_timings.read_text()) if args.cpu_timings else None
    log.info("recipe %s on %s, budget %.1f min: %s", recipe.name, device, args.budget_minutes,
             json.dumps(dataclasses.asdict(recipe), default=str))  # fmt: skip
    np.random.seed(args.seed)
    build(args.photos, args.out, args.work, device, recipe, budget_minutes=args.budget_minutes, seed=args.seed,
          dist=dist, reuse_autoencoder=args.reuse_autoencoder, reuse_teacher=args.reuse_teacher,
          cpu_timings=cpu_t, resume=not args.fresh, init_teacher=args.init_teacher, notes=args.notes,
          init_student=args.init_student)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage 2: train the ResShift teacher (``UNetModelSwin``) in the frozen autoencoder's latent space.

Per sample: ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = z0 + eta_t (z_y - z0) + kappa sqrt(eta_t) eps`` with
``z0 = E(HR)``, ``z_y = E(bicubic_x4(LR))`` (v1 schedule: T = 15, kappa = 2, p = 0.3); the network sees
``x_t / sqrt(kappa² eta_t + 1)``, the step index and the LR crop, and predicts ``z0`` (plain MSE in latent space).
Latents of random aligned crops are encoded once into a pool (:func:`tadsr.train.data.build_latent_pool`).

Usage::

    python -m tadsr.train.teacher --photos data/photos --autoencoder runs/bundled/autoencoder/final.safetensors \
        --out runs/bundled/teacher [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tadsr.checkpoint import load_state_dict, save_safetensors, sha256_file
from tadsr.config import UNetConfig, get_preset
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.schedule import make_schedule
from tadsr.train.common import (
    DistEnv,
    Ema,
    RunningMean,
    StageCheckpoint,
    StepPlanner,
    autocast,
    resolve_cpu_amp,
    to_memory_format,
    init_distributed,
    setup_logging,
    step_generator,
    warmup_cosine,
)
from tadsr.train.data import LatentPool, PhotoPairs, build_latent_pool, load_pairs
from tadsr.train.losses import LATENT_LOSS_HELP, LATENT_LOSSES, check_latent_loss, latent_regression

__all__ = ["TeacherConfig", "StageResult", "train_teacher", "load_autoencoder", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """Recipe of the teacher stage."""

    preset: str = "bundled"
    steps: int = 8000
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.0
    ema_rate: float = 0.999
    grad_clip: float = 1.0
    pool_size: int = 4096
    crop: int = 256
    seed: int = 0
    amp: bool = True
    cpu_amp: bool = False  # bf16 autocast on the CPU as well (needs amp; see benchmarks/train_throughput.py)
    channels_last: bool = False  # channels-last memory layout for the networks and their inputs
    pause_after_s: float | None = None  # end this run after so many seconds (checkpoint; resume continues)
    log_every: int = 100
    save_every: int = 1000
    time_limit_s: float | None = None
    loss: str = "mse"  # "log": each crop's MSE weighted by the batch mean over its own (latent_regression)

    def __post_init__(self) -> None:
        check_latent_loss("loss", self.loss)


@dataclass(frozen=True)
class StageResult:
    """Outcome of a diffusion stage: final (EMA) weights, steps done, last metrics, wall time."""

    weights: Path
    steps: int
    metrics: dict[str, float]
    seconds: float
    seconds_per_step: float


def load_autoencoder(path: Path, preset: str, device: torch.device) -> VQModelTorch:
    """Frozen autoencoder (eval, no grad) from a safetensors file."""
    ae = VQModelTorch(get_preset(preset).vq)
    ae.load_state_dict(load_state_dict(path), strict=True)
    return ae.to(device).eval().requires_grad_(False)


def train_teacher(
    cfg: TeacherConfig, pool: LatentPool, out_dir: Path, device: torch.device, dist: DistEnv = DistEnv(),
    *, unet_cfg: UNetConfig | None = None, resume: bool = True, init: Path | None = None,
) -> StageResult:  # fmt: skip
    """Train (or resume) the teacher on a latent pool (this rank's shard); write ``out_dir/final.safetensors``.

    The final file holds the EMA weights (all state-dict entries, so it loads strictly). ``init`` starts a
    fresh run from existing teacher weights (continued training) instead of a random initialisation.
    """
    out_dir = Path(out_dir)
    cfg = resolve_cpu_amp(cfg, device, "teacher")
    preset = get_preset(cfg.preset)
    sched = make_schedule(preset.schedule)  # the schedule the one-step student is distilled from (v1)
    torch.manual_seed(cfg.seed)
    net = UNetModelSwin(unet_cfg or preset.unet)
    if init is not None:
        net.load_state_dict(load_state_dict(init), strict=True)
        log.info("teacher: initialised from %s", init)
    net = net.to(device).train()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model: nn.Module = net
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = Ema(net, cfg.ema_rate)
    ckpt = StageCheckpoint(out_dir)
    step, elapsed, metrics = 0, 0.0, {}
    if resume and ckpt.exists():
        st = ckpt.load(model=net, ema=ema, optimizers={"model": opt})
        step, elapsed, metrics = int(st["step"]), float(st["elapsed_s"]), st["metrics"]
        log.info("teacher: resumed %s at step %d", out_dir, step)
    planner = StepPlanner(cfg.steps, cfg.time_limit_s, elapsed_s=elapsed, device=device,
                          pause_after_s=cfg.pause_after_s)
    first, meter = step, RunningMean()
    t_run = time.perf_counter()
    T = sched.num_steps
    prog = planner.progress(step)
    stop = planner.should_stop(step, prog)
    while not stop:
        for gr in opt.param_groups:
            gr["lr"] = cfg.lr * warmup_cosine(step, prog, cfg.warmup)
        g = step_generator(cfg.seed, dist.rank, step, device)
        idx = torch.randint(0, len(pool), (cfg.batch,), generator=g, device=device)
        z0, zy, lq = pool.batch(idx)
        t = torch.randint(0, T, (cfg.batch,), generator=g, device=device)
        eps = torch.randn(z0.shape, generator=g, device=device)
        x_t = sched.q_sample(z0, zy, t, eps)
        cl = cfg.channels_last
        with autocast(device, cfg.amp, cfg.cpu_amp):
            pred = model(to_memory_format(sched.scale_input_batch(x_t, t), cl), t, to_memory_format(lq, cl))
        term, per = latent_regression(pred.float(), z0, cfg.loss)
        loss = term.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        ema.update(net)
        step += 1
        hi = (t >= T // 2).float()
        meter.add({"mse": per.detach().mean(), "grad_norm": gnorm,
                   "mse_t_lo": (per * (1 - hi)).sum() / (1 - hi).sum().clamp_min(1),
                   "mse_t_hi": (per * hi).sum() / hi.sum().clamp_min(1)})  # fmt: skip
        prog = planner.progress(step)
        stop = planner.should_stop(step, prog)
        if step % cfg.log_every == 0 or stop:
            metrics = meter.pop()
            if dist.is_main:
                log.info("teacher step %d (%.0f%%) lr %.2e %s", step, 100 * prog, opt.param_groups[0]["lr"],
                         " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        if dist.is_main and (step % cfg.save_every == 0 or stop):
            ckpt.save(model=net, ema=ema, optimizers={"model": opt}, state={
                "stage": "teacher", "step": step,
                "elapsed_s": elapsed + time.perf_counter() - t_run, "config": dataclasses.asdict(cfg),
                "metrics": metrics})  # fmt: skip
    seconds = elapsed + time.perf_counter() - t_run
    final = out_dir / "final.safetensors"
    if dist.is_main:
        save_safetensors(ema.state, final, {"stage": "teacher", "preset": cfg.preset, "steps": str(step), "weights": "ema"})
        log.info("teacher: %d steps in %.0f s -> %s (EMA)", step, seconds, final)
    if dist.enabled:
        torch.distributed.barrier()
    return StageResult(final, step, metrics, seconds, (time.perf_counter() - t_run) / max(1, step - first))


def pool_for(
    photos: Path, autoencoder: Path, preset: str, n: int, seed: int, crop: int, device: torch.device, dist: DistEnv,
    cache: Path | None = None,
) -> LatentPool:  # fmt: skip
    """Load the train photos and encode this rank's shard of the latent pool.

    With ``cache`` (a stage folder), the pool is kept there as ``latent_pool[.rankR].safetensors`` and reused by
    the next run when it was made from the same autoencoder file, train photos, size, seed, crop and rank: a
    CPU run continued on another day skips the encoding (~20 min for 2048 crops on 2 cores).
    """
    pairs = load_pairs(photos, "train", min_side=crop)
    key = path = None
    if cache is not None:  # the key hashes every train photo: only worth it where a cache is kept
        key = pool_key(autoencoder, pairs, preset=preset, n=n, seed=seed, crop=crop, rank=dist.rank, world=dist.world)
        path = Path(cache) / ("latent_pool.safetensors" if dist.world == 1 else f"latent_pool.rank{dist.rank}.safetensors")
        pool = load_pool(path, key)
        if pool is not None:
            return pool.to(device)
    ae = load_autoencoder(autoencoder, preset, device)
    pool = build_latent_pool(ae, pairs, n, seed=seed, hr_size=crop, device=device, rank=dist.rank, world=dist.world)
    if path is not None and key is not None:
        save_safetensors({"z0": pool.z0, "zy": pool.zy, "lq": pool.lq}, path, {"key": key})
    return pool


def pool_key(autoencoder: Path, pairs: PhotoPairs, **recipe: object) -> str:
    """Digest of what a latent pool depends on: the autoencoder file's bytes, the photos' pixels and the recipe."""
    h = hashlib.sha256(sha256_file(autoencoder).encode())
    for name, hr in zip(pairs.names, pairs.hr):
        h.update(f"{name}:{hr.shape}".encode())
        h.update(np.ascontiguousarray(hr).data)
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


def load_pool(path: Path, key: str) -> LatentPool | None:
    """The pool cached at ``path`` if it was made for ``key``; None (with the reason logged) otherwise."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            log.info("latent pool: %s was made from other inputs; encoding again", path)
            return None
        pool = LatentPool(f.get_tensor("z0"), f.get_tensor("zy"), f.get_tensor("lq"))
    log.info("latent pool: %d crops from %s; %s", len(pool), path, {k: round(v, 4) for k, v in pool.stats().items()})
    return pool


def stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """Arguments shared by the teacher and distillation entry points."""
    from tadsr.train.autoencoder import add_common_args

    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_common_args(p)
    p.add_argument("--autoencoder", type=Path, required=True, help="autoencoder weights (stage 1 final)")
    p.add_argument("--pool-size", type=int, help="number of cached latent crops")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m tadsr.train.teacher --photos DIR --autoencoder AE.safetensors --out DIR [--device cuda]``."""
    from tadsr.train.autoencoder import overrides

    p = stage_parser("python -m tadsr.train.teacher", __doc__)
    p.add_argument("--loss", choices=LATENT_LOSSES, help=f"the teacher's {LATENT_LOSS_HELP}")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    dist, device = init_distributed(args.device)
    extra: dict[str, object] = {"pool_size": args.pool_size} if args.pool_size else {}
    if args.loss:
        extra["loss"] = args.loss
    cfg = TeacherConfig(**overrides(args), **extra)  # type: ignore[arg-type]
    pool = pool_for(args.photos, args.autoencoder, cfg.preset, cfg.pool_size, cfg.seed, cfg.crop, device, dist,
                    cache=args.out)
    res = train_teacher(cfg, pool, args.out, device, dist, resume=not args.fresh, init=args.init)
    if dist.is_main:
        log.info("done: %s", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

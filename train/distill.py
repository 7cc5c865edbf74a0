"""Stage 3: TAD-SR distillation of the teacher into a one-step student (spec: tadsr-distillation.md §2-5, §8).

Per iteration (batch of cached latent crops ``z0 = E(HR)``, ``z_y = E(bicubic_x4(LR))``, LR crop ``y``):

1. ``x_T = z_y + kappa sqrt(eta_{T-1}) eps``; student ``x_s = G(x_T / s_{T-1}, T-1, y)`` (run once, graph kept).
2. Discriminator step: ``t_d ~ U{0..T-2}``, shared noise; real = perturb(z0), fake = perturb(x_s); both through
   the frozen teacher's encoder half at ``t_d``; time-aware heads; hinge loss; AdamW step on the heads only.
3. Student step: target ``z_tch`` = the teacher's deterministic T-step sample from the same ``x_T``;
   ``L = mean_CHW (x_s - z_tch)² + w_hsd mean_CHW(sg(g) x_s) - w_adv mean D(fake)`` with the HSD direction g
   from the frozen teacher at ``t_h ~ U{0, 1, 2}``; AdamW step on the student; EMA 0.999.

Each term has a weight (``teacher_weight``, ``hsd_weight``, ``gan_weight``; upstream 1, 1, 0.02). ``gt_weight``
adds ``mean_CHW (x_s - z0)²``, a regression to the GT latent that the spec does not have (train/DECISIONS.md);
a term at weight 0 is not computed, so ``teacher_weight = hsd_weight = 0`` skips the T teacher calls per step
and ``gan_weight = 0`` the discriminator.

The teacher is frozen (eval, ``requires_grad`` off): gradients pass *through* it to the student, never into it.
Choices on the spec's flagged points are in train/DECISIONS.md.

Usage::

    python -m tadsr.train.distill --photos data/photos --autoencoder AE.safetensors --teacher T.safetensors \
        --out runs/bundled/distill [--device cuda]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tadsr.checkpoint import load_state_dict, save_safetensors
from tadsr.config import get_preset
from tadsr.errors import ConfigError
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.schedule import Schedule, make_schedule
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
)
from tadsr.train.data import LatentPool
from tadsr.train.disc import TimeAwareDiscriminator, teacher_features
from tadsr.train.losses import (
    LATENT_LOSS_HELP,
    LATENT_LOSSES,
    check_latent_loss,
    ddim_teacher_sample,
    generator_adv_loss,
    hinge_d_loss,
    hsd_gradient,
    hsd_loss,
    latent_regression,
    perturb,
)
from tadsr.train.teacher import StageResult, pool_for, stage_parser

__all__ = ["DistillConfig", "Distiller", "train_distill", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Recipe of the distillation stage (upstream values in comments)."""

    preset: str = "bundled"
    steps: int = 2000  # upstream 30000 at batch 8
    batch: int = 32  # upstream 8
    lr: float = 1e-4  # upstream 5e-5 (student)
    lr_d: float = 1e-4  # upstream 5e-5 (discriminator heads, constant)
    warmup: int = 50  # upstream 5000 (linear warm-up, then constant)
    ema_rate: float = 0.999
    teacher_weight: float = 1.0  # regression to the teacher's T-step sample (the spec's L_reg)
    gt_weight: float = 0.0  # regression to the GT latent z0 (not in the spec; train/DECISIONS.md)
    gt_loss: str = "mse"  # "log": each crop's GT MSE weighted by the batch mean over its own (latent_regression)
    hsd_weight: float = 1.0
    gan_weight: float = 0.02
    hsd_t_max: int = 3  # t_h ~ U{0, 1, 2}
    hsd_noise: str = "gaussian"  # upstream draws U[0, 1) (spec F1)
    disc_noise: str = "gaussian"  # upstream draws U[0, 1) (spec F1)
    hsd_double_scaling: bool = False  # upstream divides by s_t twice (spec F2)
    c_dim: int = 64
    pool_size: int = 4096
    crop: int = 256
    seed: int = 0
    amp: bool = True
    cpu_amp: bool = False  # bf16 autocast on the CPU as well (needs amp; see benchmarks/train_throughput.py)
    channels_last: bool = False  # channels-last memory layout for the networks and their inputs
    pause_after_s: float | None = None  # end this run after so many seconds (checkpoint; resume continues)
    log_every: int = 50
    save_every: int = 250
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.hsd_noise not in ("gaussian", "uniform") or self.disc_noise not in ("gaussian", "uniform"):
            raise ValueError("hsd_noise and disc_noise must be 'gaussian' or 'uniform'")
        check_latent_loss("gt_loss", self.gt_loss)
        weights = (self.teacher_weight, self.gt_weight, self.hsd_weight, self.gan_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"loss weights must be >= 0 and not all 0, got teacher {self.teacher_weight}, "
                             f"gt {self.gt_weight}, hsd {self.hsd_weight}, gan {self.gan_weight}")  # fmt: skip


def _noise(kind: str, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(like.shape, generator=g, device=like.device)
    return torch.randn(like.shape, generator=g, device=like.device)


class Distiller:
    """The three networks and one TAD-SR iteration (kept separate from the loop so tests can drive it).

    Args:
        cfg: the recipe.
        teacher: trained teacher (frozen here: eval mode, no grad).
        device: torch device.
        dist: process group facts (student and heads are wrapped in DDP when ``dist.world > 1``).
    """

    def __init__(self, cfg: DistillConfig, teacher: UNetModelSwin, device: torch.device, dist: DistEnv = DistEnv()):
        if cfg.channels_last and device.type == "cpu":
            raise ConfigError("channels_last distillation crashes (segfault) in the discriminator's backward on the "
                              "CPU (torch 2.13, benchmarks/train_throughput.py); use it on CUDA only")  # fmt: skip
        self.cfg, self.device, self.dist = cfg, device, dist
        self.sched: Schedule = make_schedule(get_preset(cfg.preset).schedule)
        self.T = self.sched.num_steps
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        student = UNetModelSwin(teacher.cfg).to(device)
        student.load_state_dict(teacher.state_dict(), strict=True)
        self.student_net = student.train().requires_grad_(True)
        torch.manual_seed(cfg.seed)
        self.disc_net = TimeAwareDiscriminator.for_teacher(teacher, c_dim=cfg.c_dim).to(device).train()
        self.student: nn.Module = self.student_net
        self.disc: nn.Module = self.disc_net
        if dist.enabled:
            ids = [device] if device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.student_net, device_ids=ids)
            self.disc = nn.parallel.DistributedDataParallel(self.disc_net, device_ids=ids)
        self.opt_g = torch.optim.AdamW(self.student_net.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.opt_d = torch.optim.AdamW(self.disc_net.parameters(), lr=cfg.lr_d, weight_decay=0.0)
        if cfg.channels_last:
            for net in (self.teacher, self.student_net, self.disc_net):
                net.to(memory_format=torch.channels_last)
        self.ema = Ema(self.student_net, cfg.ema_rate)

    def init_student(self, path: Path) -> None:
        """Start the student (and its EMA) from existing student weights instead of the teacher's."""
        self.student_net.load_state_dict(load_state_dict(path), strict=True)
        self.ema = Ema(self.student_net, self.cfg.ema_rate)
        log.info("distill: student initialised from %s", path)

    def _teacher_x0(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.cfg.amp, self.cfg.cpu_amp):
            return self.teacher(x, t, lq).float()

    def _teacher_x0_fp32(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """fp32 teacher for HSD: its implied noises are divided by kappa sqrt(eta_t) (0.04 at t = 0)."""
        return self.teacher(x, t, lq).float()

    def _features(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> list[torch.Tensor]:
        with autocast(self.device, self.cfg.amp, self.cfg.cpu_amp):
            return [f.float() for f in teacher_features(self.teacher, self.sched.scale_input_batch(x, t), t, lq)]

    def set_lr(self, step: int) -> None:
        """Linear warm-up of the student LR (step k=0 runs at lr/warmup), then constant; heads constant."""
        scale = min(1.0, (step + 1) / self.cfg.warmup) if self.cfg.warmup else 1.0
        for gr in self.opt_g.param_groups:
            gr["lr"] = self.cfg.lr * scale

    def step(self, z0: torch.Tensor, zy: torch.Tensor, lq: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        """One TAD-SR iteration on a batch; returns the logged quantities (0-d tensors)."""
        cfg, sched, T = self.cfg, self.sched, self.T
        b = z0.shape[0]
        eps = torch.randn(z0.shape, generator=g, device=z0.device)
        x_T = sched.prior_sample(zy, eps)
        t_s = torch.full((b,), T - 1, dtype=torch.int64, device=z0.device)
        with autocast(self.device, cfg.amp, cfg.cpu_amp):
            x_s = self.student(sched.scale_input(x_T, T - 1), t_s, lq).float()

        logs: dict[str, torch.Tensor] = {}
        loss = x_s.new_zeros(b)
        feat_f, t_d = None, None
        if cfg.gan_weight > 0:
            # -- discriminator step: real = GT latent, fake = student output, same t_d and noise -------------
            t_d = torch.randint(0, T - 1, (b,), generator=g, device=z0.device)
            u_d = _noise(cfg.disc_noise, z0, g)
            with torch.no_grad():
                feat_r = self._features(perturb(sched, z0, zy, t_d, u_d), t_d, lq)
            feat_f = self._features(perturb(sched, x_s, zy, t_d, u_d), t_d, lq)  # graph to x_s through the teacher
            logits = self.disc([torch.cat([r, f.detach()]) for r, f in zip(feat_r, feat_f)], torch.cat([t_d, t_d]))
            loss_d = hinge_d_loss(logits[:b], logits[b:])
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            logs.update(loss_d=loss_d.detach(), d_real=logits[:b].mean().detach(), d_fake=logits[b:].mean().detach())

        # -- student step ------------------------------------------------------------------------------------
        if cfg.teacher_weight > 0 or cfg.hsd_weight > 0:  # both need the teacher's T-step sample
            z_tch = ddim_teacher_sample(self._teacher_x0, sched, x_T, zy, lq)
            l_reg = (x_s - z_tch).square().flatten(1).mean(1)
            loss = loss + cfg.teacher_weight * l_reg
            logs.update(mse=l_reg.mean().detach(), teacher_mse_to_gt=(z_tch - z0).square().mean())
            if cfg.hsd_weight > 0:
                hsd = hsd_gradient(self._teacher_x0_fp32, sched, x_s, z_tch, zy, lq, g, t_max=cfg.hsd_t_max,
                                   noise=cfg.hsd_noise, double_scaling=cfg.hsd_double_scaling)  # fmt: skip
                l_hsd = hsd_loss(x_s, hsd.grad)
                loss = loss + cfg.hsd_weight * l_hsd
                logs.update(mse_hsd=l_hsd.mean().detach(), hsd_grad_rms=hsd.grad.square().mean().sqrt())
        gt_term, l_gt = latent_regression(x_s, z0, cfg.gt_loss)
        if cfg.gt_weight > 0:
            loss = loss + cfg.gt_weight * gt_term
        if feat_f is not None:
            l_adv = generator_adv_loss(self.disc(feat_f, t_d))
            loss = loss + cfg.gan_weight * l_adv
            logs["adv"] = l_adv.mean().detach()
        loss = loss.mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        self.ema.update(self.student_net)
        return {"loss": loss.detach(), **logs, "mse_to_gt": l_gt.mean().detach()}

    def checkpoint_parts(self) -> dict[str, object]:
        return {"model": self.student_net, "ema": self.ema, "extra": self.disc_net,
                "optimizers": {"student": self.opt_g, "disc": self.opt_d}}  # fmt: skip


def train_distill(
    cfg: DistillConfig, pool: LatentPool, teacher: UNetModelSwin, out_dir: Path, device: torch.device,
    dist: DistEnv = DistEnv(), *, resume: bool = True, init: Path | None = None,
) -> StageResult:  # fmt: skip
    """Distil (or resume); write the EMA student to ``out_dir/final.safetensors``.

    ``init`` starts a fresh run from existing student weights (continued distillation, e.g. of the shipped
    ``bundled_student.safetensors``) instead of the teacher's; a checkpoint in ``out_dir`` takes precedence.
    """
    out_dir = Path(out_dir)
    cfg = resolve_cpu_amp(cfg, device, "distill")
    d = Distiller(cfg, teacher, device, dist)
    ckpt = StageCheckpoint(out_dir)
    step, elapsed, metrics = 0, 0.0, {}
    if init is not None and not (resume and ckpt.exists()):
        d.init_student(init)
    if resume and ckpt.exists():
        st = ckpt.load(**d.checkpoint_parts())  # type: ignore[arg-type]
        step, elapsed, metrics = int(st["step"]), float(st["elapsed_s"]), st["metrics"]
        log.info("distill: resumed %s at step %d", out_dir, step)
    planner = StepPlanner(cfg.steps, cfg.time_limit_s, elapsed_s=elapsed, device=device,
                          pause_after_s=cfg.pause_after_s)
    first, meter = step, RunningMean()
    t_run = time.perf_counter()
    prog = planner.progress(step)
    stop = planner.should_stop(step, prog)
    while not stop:
        d.set_lr(step)
        g = step_generator(cfg.seed, dist.rank, step, device)
        idx = torch.randint(0, len(pool), (cfg.batch,), generator=g, device=device)
        z0, zy, lq = (to_memory_format(x, cfg.channels_last) for x in pool.batch(idx))
        meter.add(d.step(z0, zy, lq, g))
        step += 1
        prog = planner.progress(step)
        stop = planner.should_stop(step, prog)
        if step % cfg.log_every == 0 or stop:
            metrics = meter.pop()
            if dist.is_main:
                log.info("distill step %d (%.0f%%) %s", step, 100 * prog,
                         " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        if dist.is_main and (step % cfg.save_every == 0 or stop):
            ckpt.save(**d.checkpoint_parts(), state={  # type: ignore[arg-type]
                "stage": "distill", "step": step,
                "elapsed_s": elapsed + time.perf_counter() - t_run, "config": dataclasses.asdict(cfg),
                "metrics": metrics})  # fmt: skip
    seconds = elapsed + time.perf_counter() - t_run
    final = out_dir / "final.safetensors"
    if dist.is_main:
        save_safetensors(d.ema.state, final, {"stage": "distill", "preset": cfg.preset, "steps": str(step), "weights": "ema"})
        log.info("distill: %d steps in %.0f s -> %s (EMA student)", step, seconds, final)
    if dist.enabled:
        torch.distributed.barrier()
    return StageResult(final, step, metrics, seconds, (time.perf_counter() - t_run) / max(1, step - first))


def load_teacher(path: Path, preset: str, device: torch.device) -> UNetModelSwin:
    """Teacher network from a safetensors file (strict)."""
    net = UNetModelSwin(get_preset(preset).unet)
    net.load_state_dict(load_state_dict(path), strict=True)
    return net.to(device)


def main(argv: list[str] | None = None) -> int:
    """``python -m tadsr.train.distill --photos DIR --autoencoder AE --teacher T --out DIR [--device cuda]``."""
    from tadsr.train.autoencoder import overrides

    p = stage_parser("python -m tadsr.train.distill", __doc__)
    p.add_argument("--teacher", type=Path, required=True, help="teacher weights (stage 2 final)")
    p.add_argument("--hsd-noise", choices=("gaussian", "uniform"))
    p.add_argument("--disc-noise", choices=("gaussian", "uniform"))
    p.add_argument("--hsd-double-scaling", action="store_true", help="upstream's s_t² teacher input in HSD")
    p.add_argument("--gt-loss", choices=LATENT_LOSSES, help=f"the student's {LATENT_LOSS_HELP}")
    for name, help_ in (("teacher", "regression to the teacher's T-step sample (default 1)"),
                        ("gt", "regression to the GT latent (default 0, not in the spec)"),
                        ("hsd", "high-frequency score distillation (default 1)"),
                        ("gan", "time-aware adversarial loss (default 0.02)")):  # fmt: skip
        p.add_argument(f"--{name}-weight", type=float, help=f"loss weight: {help_}; 0 skips the term's work")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    dist, device = init_distributed(args.device)
    extra: dict[str, object] = {"pool_size": args.pool_size} if args.pool_size else {}
    if args.hsd_noise:
        extra["hsd_noise"] = args.hsd_noise
    if args.disc_noise:
        extra["disc_noise"] = args.disc_noise
    if args.hsd_double_scaling:
        extra["hsd_double_scaling"] = True
    if args.gt_loss:
        extra["gt_loss"] = args.gt_loss
    for name in ("teacher", "gt", "hsd", "gan"):
        if getattr(args, f"{name}_weight") is not None:
            extra[f"{name}_weight"] = getattr(args, f"{name}_weight")
    cfg = DistillConfig(**overrides(args), **extra)  # type: ignore[arg-type]
    pool = pool_for(args.photos, args.autoencoder, cfg.preset, cfg.pool_size, cfg.seed, cfg.crop, device, dist,
                    cache=args.out)
    teacher = load_teacher(args.teacher, cfg.preset, device)
    res = train_distill(cfg, pool, teacher, args.out, device, dist, resume=not args.fresh, init=args.init)
    if dist.is_main:
        log.info("done: %s", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

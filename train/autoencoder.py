"""Stage 1: train the VQ-f4 autoencoder (``VQModelTorch``) on HR photo crops.

Loss = L1 + ``ssim_weight``·(1 − SSIM) + ``fft_weight``·|ΔFFT| + ``chroma_weight``·|ΔCbCr of 4-px blocks|
+ ‖sg(z) − e‖² + β‖z − sg(e)‖² (β = 0.25),
straight-through quantisation. No perceptual network and no GAN. Dead codes (unused for ``restart_every``
steps) are restarted on random encoder outputs of the current batch (their Adam moments reset), up to
``restart_until`` of training. Reported: reconstruction PSNR of the batch and codebook usage/perplexity.

At the end the latent is standardised by an exact reparametrisation (``z' = a (z − m)``: ``quant_conv`` and the
codebook absorb it, ``post_quant_conv`` undoes it; the decoded image is unchanged), so the diffusion stages
see latents of unit standard deviation.

Usage::

    python -m tadsr.train.autoencoder --photos data/photos --out runs/bundled/autoencoder [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tadsr.checkpoint import load_state_dict, save_safetensors
from tadsr.config import VQConfig, get_preset
from tadsr.errors import ConfigError
from tadsr.models.ops import bicubic_x4_reference
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import Models, OneStepPipeline
from tadsr.train.common import (
    DistEnv,
    RunningMean,
    StageCheckpoint,
    StepPlanner,
    autocast,
    resolve_cpu_amp,
    to_memory_format,
    init_distributed,
    setup_logging,
    step_seed,
    warmup_cosine,
)
from tadsr.train.data import PhotoPairs, load_pairs, sample_crops, to_unit
from tadsr.train.losses import chroma_loss, fft_loss, ssim_loss

__all__ = ["AEConfig", "AEResult", "train_autoencoder", "standardize_latent_", "main"]

log = logging.getLogger(__name__)


PARTS = ("all", "decoder")  # what a run trains (AEConfig.part)


@dataclass(frozen=True, kw_only=True)
class AEConfig:
    """Recipe of the autoencoder stage."""

    preset: str = "bundled"
    steps: int = 3000
    batch: int = 16
    crop: int = 128
    final_crop: int = 256
    final_frac: float = 0.25
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ssim_weight: float = 0.2
    fft_weight: float = 0.05
    chroma_weight: float = 0.0  # weight of losses.chroma_loss (0: the shipped autoencoder's recipe)
    beta: float = 0.25
    restart_every: int = 50
    restart_until: float = 0.8
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = True
    cpu_amp: bool = False  # bf16 autocast on the CPU as well (needs amp; see benchmarks/train_throughput.py)
    channels_last: bool = False  # channels-last memory layout for the networks and their inputs
    pause_after_s: float | None = None  # end this run after so many seconds (checkpoint; resume continues)
    log_every: int = 50
    save_every: int = 500
    time_limit_s: float | None = None
    # "all": train everything; "decoder": refit post_quant_conv + decoder from ``init`` with the encoder,
    # quant_conv and codebook frozen, so every latent (and the teacher and student trained on them) stays valid.
    part: Literal["all", "decoder"] = "all"  # one of PARTS
    # fraction of each batch whose crops are the bicubic x4 of their LR (what the do-nothing path and a
    # denoiser's early latents look like) instead of the HR crop; each is reconstructed as it is
    blur_frac: float = 0.0
    # fraction of each batch (its last rows) decoded from the one-step student's latent of the crop's LR
    # (``student`` of :func:`train_autoencoder`) with the HR crop as the target: the decoder learns the latents the
    # product hands it. Only with part="decoder" (the student was trained on this encoder's latents).
    student_frac: float = 0.0

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ConfigError(f"autoencoder part must be 'all' or 'decoder', not {self.part!r}")
        if not 0.0 <= self.blur_frac <= 1.0:
            raise ConfigError(f"blur_frac must be in [0, 1], not {self.blur_frac}")
        if not 0.0 <= self.student_frac <= 1.0 or self.blur_frac + self.student_frac > 1.0:
            raise ConfigError(f"student_frac must be in [0, 1 - blur_frac], not {self.student_frac}")
        if self.student_frac and self.part != "decoder":
            raise ConfigError("student_frac needs part='decoder': the student was trained on the frozen encoder")


@dataclass(frozen=True)
class AEResult:
    """Outcome: final weights path, steps done, last logged metrics, wall time, latent stats."""

    weights: Path
    steps: int
    metrics: dict[str, float]
    seconds: float
    seconds_per_step: float
    latent_shift: list[float]
    latent_scale: float


class _AEStep(nn.Module):
    """Training forward (one module, so DDP can wrap it): x -> (x_rec, z, e, idx)."""

    def __init__(self, model: VQModelTorch, amp: bool, cpu_amp: bool = False) -> None:
        super().__init__()
        self.model = model
        self.amp = amp
        self.cpu_amp = cpu_amp

    def forward(
        self, x: torch.Tensor, z_given: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z_given``: decode these latents instead of encoding ``x`` (a frozen encoder's stand-in)."""
        if z_given is None:
            with autocast(x.device, self.amp, self.cpu_amp):
                z = self.model.encode(x)
        else:
            z = z_given
        z = z.float()
        idx = self.model.quantize.indices(z)
        e = self.model.quantize.embedding(idx).permute(0, 3, 1, 2)
        zq = z + (e - z).detach()
        with autocast(x.device, self.amp, self.cpu_amp):
            x_rec = self.model.decoder(self.model.post_quant_conv(zq))
        return x_rec.float(), z, e, idx


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, RGB, range [-1, 1]) as a 0-d tensor (no device sync)."""
    mse = F.mse_loss(a.clamp(-1, 1), b).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def _init_codebook(model: VQModelTorch, x: torch.Tensor, seed: int) -> None:
    """Codebook <- random encoder outputs of one batch (plus a little noise)."""
    z = model.encode(x).float().permute(0, 2, 3, 1).reshape(-1, model.cfg.embed_dim)
    g = torch.Generator(device=z.device).manual_seed(seed)
    n = model.cfg.n_embed
    pick = torch.randint(0, z.shape[0], (n,), generator=g, device=z.device)
    noise = torch.randn((n, z.shape[1]), generator=g, device=z.device) * (0.01 * z.std() + 1e-4)
    model.quantize.embedding.weight.copy_(z[pick] + noise)


@torch.no_grad()
def _restart_dead(
    model: VQModelTorch, usage: torch.Tensor, z: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator
) -> int:
    """Move every code with zero usage onto a random current latent; reset its Adam moments.

    Under DDP every rank sees the same (all-reduced) usage, so all reset the same rows; rank 0's new
    codes are then broadcast.
    """
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel():
        zf = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, zf.shape[0], (dead.numel(),), generator=gen, device=zf.device)
        noise = torch.randn((dead.numel(), zf.shape[1]), generator=gen, device=zf.device) * (0.01 * zf.std() + 1e-4)
        w = model.quantize.embedding.weight
        w[dead] = zf[pick] + noise
        st = opt.state.get(w, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][dead] = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(model.quantize.embedding.weight.data, 0)
    return int(dead.numel())


@torch.no_grad()
def standardize_latent_(model: VQModelTorch, z_samples: torch.Tensor) -> tuple[list[float], float]:
    """Reparametrise so latents have zero channel means and unit overall std; decoding is unchanged.

    With ``z' = a (z - m)`` (scalar a, per-channel m): quant_conv and the codebook are mapped the same way
    (nearest-code search is invariant to this map), ``post_quant_conv`` absorbs the inverse.

    Returns:
        The shift m (per channel) and scale a that were applied.
    """
    c = z_samples.shape[1]
    m = z_samples.transpose(0, 1).reshape(c, -1).mean(1)
    a = float(1.0 / (z_samples - m.view(1, c, 1, 1)).std().clamp_min(1e-8))
    qc, pqc, emb = model.quant_conv, model.post_quant_conv, model.quantize.embedding.weight
    qc.weight.mul_(a)
    qc.bias.sub_(m).mul_(a)
    emb.sub_(m).mul_(a)
    # post_quant_conv(z) = W z + b with z = z'/a + m  ->  W' = W / a, b' = b + W m
    w2 = pqc.weight[:, :, 0, 0]
    pqc.bias.add_(w2 @ m)
    pqc.weight.div_(a)
    return [float(v) for v in m], a


_SPECIAL = 10**9  # step numbers of batches outside the training sequence (codebook init, latent stats)


def _batch(
    pairs: PhotoPairs, cfg: AEConfig, dist: DistEnv, step: int, crop: int, device: torch.device, n: int | None = None
) -> torch.Tensor:
    """``n`` (default: the batch) crops in [-1, 1]; the first ``blur_frac`` of the batch are the bicubic x4 of
    their LR instead of HR."""
    rng = np.random.default_rng(step_seed(cfg.seed, dist.rank, step, stream=1))
    hr, lr = sample_crops(pairs, rng, cfg.batch if n is None else n, crop)
    x = to_unit(hr, device)
    n_blur = round(cfg.blur_frac * cfg.batch)
    if n_blur:
        x[:n_blur] = bicubic_x4_reference(to_unit(lr[:n_blur], device))
    return x


def _student_rows(
    pairs: PhotoPairs, cfg: AEConfig, dist: DistEnv, step: int, crop: int, n: int, tile: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """HR crops (n, 3, S, S) and their LR (n, 3, S/4, S/4), ``S`` = ``crop`` rounded up to a multiple of ``tile``.

    Whole tiles, not windows of them: the student needs a multiple of its tile, and the latent of a tile holds
    that tile's normalisation (a window of it decodes to 11-20 dB where the window's own latent gives 25-30).
    """
    size = -(-crop // tile) * tile
    rng = np.random.default_rng(step_seed(cfg.seed, dist.rank, step, stream=5))
    hr, lr = sample_crops(pairs, rng, n, size)
    return to_unit(hr, device), to_unit(lr, device)


def _rec_losses(cfg: AEConfig, x_rec: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(L1, 1 - SSIM, |dFFT|, |dCbCr|) of a reconstruction."""
    l_ssim = ssim_loss(x_rec, x) if cfg.ssim_weight else x.new_zeros(())
    l_fft = fft_loss(x_rec, x) if cfg.fft_weight else x.new_zeros(())
    l_chroma = chroma_loss(x_rec, x) if cfg.chroma_weight else x.new_zeros(())
    return (x_rec - x).abs().mean(), l_ssim, l_fft, l_chroma


def _rec_loss(cfg: AEConfig, l1: torch.Tensor, l_ssim: torch.Tensor, l_fft: torch.Tensor, l_chroma: torch.Tensor):
    """The weighted sum of :func:`_rec_losses`."""
    return l1 + cfg.ssim_weight * l_ssim + cfg.fft_weight * l_fft + cfg.chroma_weight * l_chroma


class _StudentLatents:
    """The one-step student's x0 for LR crops, through :meth:`OneStepPipeline.denoise` (frozen, no gradient)."""

    def __init__(self, path: Path, preset: str, model: VQModelTorch, device: torch.device) -> None:
        p = get_preset(preset)
        net = UNetModelSwin(p.unet)
        net.load_state_dict(load_state_dict(path), strict=True)
        self.pipe = OneStepPipeline(Models(p, net.to(device).eval().requires_grad_(False), model))

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """LR tiles (n, 3, h, w) -> x0 (n, C, h, w), in the decoder's latent units (divided by the scale factor)."""
        z_y = self.pipe.encode(lq).float()
        noise = torch.randn(z_y.shape, generator=gen, device=z_y.device)
        return self.pipe.denoise(z_y, noise, lq).float() / self.pipe.schedule.cfg.scale_factor


def train_autoencoder(
    cfg: AEConfig, pairs: PhotoPairs, out_dir: Path, device: torch.device, dist: DistEnv = DistEnv(),
    *, vq_cfg: VQConfig | None = None, resume: bool = True, init: Path | None = None, student: Path | None = None,
) -> AEResult:  # fmt: skip
    """Train (or resume) the autoencoder; write ``out_dir/final.safetensors`` (standardised latent).

    Args:
        cfg: the recipe.
        pairs: training photos (HR used; never the val split).
        out_dir: stage folder (checkpoints, state.json, final weights).
        device: torch device of this process.
        dist: process group facts (DDP when ``dist.world > 1``).
        vq_cfg: architecture; defaults to the preset's.
        resume: continue from ``out_dir`` when it holds a checkpoint.
        init: start a fresh run from these weights (e.g. the shipped autoencoder) instead of a random one.
        student: one-step student weights (same preset) whose latents feed the last ``cfg.student_frac`` rows.
    """
    out_dir = Path(out_dir)
    cfg = resolve_cpu_amp(cfg, device, "autoencoder")
    vq_cfg = vq_cfg or get_preset(cfg.preset).vq
    torch.manual_seed(cfg.seed)
    model = VQModelTorch(vq_cfg)
    if init is not None:
        model.load_state_dict(load_state_dict(init), strict=True)
        log.info("autoencoder: initialised from %s", init)
    decoder_only = cfg.part == "decoder"
    ckpt = StageCheckpoint(out_dir)
    if decoder_only and init is None and not (resume and ckpt.exists()):
        raise ConfigError("part='decoder' refits the decoder of an existing autoencoder: give init (--init)")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if decoder_only:  # no gradient reaches them, so autograd records nothing of the encoder's forward either
        for mod in (model.encoder, model.quant_conv, model.quantize):
            mod.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    if cfg.student_frac and student is None:
        raise ConfigError("student_frac > 0 decodes the student's latents: give the student weights (--student)")
    n_stu = round(cfg.student_frac * cfg.batch)
    if n_stu and dist.enabled:
        raise ConfigError("student_frac runs in one process (two decoder passes per step do not suit DDP)")
    if n_stu >= cfg.batch:
        raise ConfigError(f"student_frac {cfg.student_frac} leaves no encoded row in a batch of {cfg.batch}")
    stu = _StudentLatents(student, cfg.preset, model, device) if n_stu else None
    tile = 4 * get_preset(cfg.preset).pad_multiple  # HR side of the student's smallest input
    step_mod: nn.Module = _AEStep(model, cfg.amp, cfg.cpu_amp)
    if dist.enabled:
        step_mod = nn.parallel.DistributedDataParallel(step_mod, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0
    metrics_resumed: dict[str, float] = {}
    if resume and ckpt.exists():
        st = ckpt.load(model=model, ema=None, optimizers={"model": opt})
        step, elapsed = int(st["step"]), float(st["elapsed_s"])
        metrics_resumed = dict(st.get("metrics", {}))
        log.info("autoencoder: resumed %s at step %d", out_dir, step)
    elif init is None:
        _init_codebook(model, _batch(pairs, cfg, dist, _SPECIAL, cfg.crop, device), cfg.seed)
        if dist.enabled:
            torch.distributed.broadcast(model.quantize.embedding.weight.data, 0)
    planner = StepPlanner(cfg.steps, cfg.time_limit_s, elapsed_s=elapsed, device=device,
                          pause_after_s=cfg.pause_after_s)
    first = step
    usage = torch.zeros(vq_cfg.n_embed, device=device)
    meter, metrics = RunningMean(), metrics_resumed
    t_run = time.perf_counter()
    prog = planner.progress(step)
    stop = planner.should_stop(step, prog)
    while not stop:
        crop = cfg.final_crop if prog >= 1 - cfg.final_frac else cfg.crop
        for gr in opt.param_groups:
            gr["lr"] = cfg.lr * warmup_cosine(step, prog, cfg.warmup)
        x = to_memory_format(_batch(pairs, cfg, dist, step, crop, device, n=cfg.batch - n_stu), cfg.channels_last)
        x_rec, z, e, idx = step_mod(x)
        l1, l_ssim, l_fft, l_chroma = _rec_losses(cfg, x_rec, x)
        loss = _rec_loss(cfg, l1, l_ssim, l_fft, l_chroma)
        extra: dict[str, torch.Tensor] = {}
        if stu is not None:  # the student's rows: its latent of the LR tile, decoded and scored against HR
            hr_s, lq = _student_rows(pairs, cfg, dist, step, crop, n_stu, tile, device)
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, dist.rank, step, stream=4))
            hr_s = to_memory_format(hr_s, cfg.channels_last)
            s_rec, _, _, s_idx = step_mod(hr_s, stu(lq, gen))
            s_losses = _rec_losses(cfg, s_rec, hr_s)
            s_l1 = s_losses[0]
            w = n_stu / cfg.batch
            loss = (1 - w) * loss + w * _rec_loss(cfg, *s_losses)
            idx = torch.cat([idx.flatten(), s_idx.flatten()])
            extra = {"l1_student": s_l1, "psnr_student": _psnr(s_rec.detach(), hr_s)}
        l_cb = F.mse_loss(e, z.detach())
        l_commit = F.mse_loss(z, e.detach())
        if not decoder_only:  # with the codebook and encoder frozen these two terms have no gradient
            loss = loss + l_cb + cfg.beta * l_commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        counts = torch.bincount(idx.flatten(), minlength=vq_cfg.n_embed).float()
        if dist.enabled:
            torch.distributed.all_reduce(counts)
        usage += counts
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        meter.add({"loss": loss, "l1": l1, "ssim": 1 - l_ssim, "fft": l_fft, "chroma": l_chroma, "codebook": l_cb,
                   "psnr_rgb": _psnr(x_rec.detach(), x), "perplexity": perplexity} | extra)  # fmt: skip
        if step % cfg.restart_every == 0:
            used = float((usage > 0).float().mean())
            restarted = 0
            if prog < cfg.restart_until and not decoder_only:
                gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, 0, step, stream=3))
                restarted = _restart_dead(model, usage, z, opt, gen)
            meter.add({"usage": used, "restarted": restarted})
            usage.zero_()
        prog = planner.progress(step)
        stop = planner.should_stop(step, prog)
        if step % cfg.log_every == 0 or stop:
            metrics = meter.pop()
            if dist.is_main:
                log.info("autoencoder step %d (%.0f%%) crop %d lr %.2e %s", step, 100 * prog, crop,
                         opt.param_groups[0]["lr"], " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        if dist.is_main and (step % cfg.save_every == 0 or stop):
            spent = elapsed + time.perf_counter() - t_run
            ckpt.save(model=model, ema=None, optimizers={"model": opt}, state={
                "stage": "autoencoder", "step": step, "elapsed_s": spent,
                "config": dataclasses.asdict(cfg), "metrics": metrics})  # fmt: skip
    seconds = elapsed + time.perf_counter() - t_run
    done_here = max(1, step - first)
    shift, scale = [0.0] * vq_cfg.embed_dim, 1.0
    final = out_dir / "final.safetensors"
    if dist.is_main:
        model.eval()
        meta = {"stage": "autoencoder", "preset": cfg.preset, "steps": str(step)}
        if decoder_only:  # the latent is that of the initial weights, already standardised: leave it as it is
            meta["part"] = "decoder"
            if student is not None:
                meta |= {"student_frac": str(cfg.student_frac), "student": Path(student).name}
        else:
            with torch.no_grad():
                zs = torch.cat([model.encode(_batch(pairs, cfg, dist, _SPECIAL + 1 + i, cfg.final_crop, device))
                                .float() for i in range(4)])  # fmt: skip
            shift, scale = standardize_latent_(model, zs)
            meta |= {"latent_shift": str(shift), "latent_scale": str(scale)}
        save_safetensors(model.state_dict(), final, meta)
        log.info("autoencoder (%s): %d steps in %.0f s; latent shift %s, scale %.4g -> %s", cfg.part, step, seconds,
                 [round(v, 4) for v in shift], scale, final)  # fmt: skip
    if dist.enabled:
        torch.distributed.barrier()
    return AEResult(final, step, metrics, seconds, (time.perf_counter() - t_run) / done_here, shift, scale)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the stage entry points."""
    p.add_argument("--photos", type=Path, required=True, help="photo set folder or .npz pack (train split used)")
    p.add_argument("--out", type=Path, required=True, help="stage folder (checkpoints, final weights)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--preset", default="bundled")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--minutes", type=float, help="wall-clock limit; the LR schedule is fitted to it")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on the CPU too, where the CPU has native bf16 (AVX-512 BF16 / AMX); "
                        "elsewhere the stage warns and trains fp32, which is faster there")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    p.add_argument("--pause-minutes", type=float,
                   help="end this run after so many minutes with a checkpoint; run again to continue (the LR "
                        "schedule is that of one run of --steps)")  # fmt: skip
    p.add_argument("--init", type=Path, help="start a fresh run from these weights of the stage's network "
                   "(e.g. tadsr/weights/bundled_<part>.safetensors)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true")


def overrides(args: argparse.Namespace) -> dict[str, object]:
    """Config fields set on the command line."""
    out: dict[str, object] = {"preset": args.preset}
    for k in ("steps", "batch", "lr", "seed"):
        if getattr(args, k) is not None:
            out[k] = getattr(args, k)
    if args.minutes is not None:
        out["time_limit_s"] = 60.0 * args.minutes
    if args.no_amp:
        out["amp"] = False
    if args.cpu_bf16:
        out["cpu_amp"] = True
    if args.channels_last:
        out["channels_last"] = True
    if args.pause_minutes is not None:
        out["pause_after_s"] = 60.0 * args.pause_minutes
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tadsr.train.autoencoder --photos DIR --out DIR [--device cuda] [--steps N]``."""
    p = argparse.ArgumentParser(prog="python -m tadsr.train.autoencoder", description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--part", choices=PARTS, default="all",
                   help="decoder: refit post_quant_conv + decoder of --init on the photos, encoder and codebook "
                        "frozen (latents unchanged, so the teacher and student stay valid)")  # fmt: skip
    p.add_argument("--blur-frac", type=float, default=0.0,
                   help="fraction of each batch given as the bicubic x4 of its LR crop instead of the HR crop")
    p.add_argument("--chroma-weight", type=float, default=0.0,
                   help="weight of the loss on the Cb / Cr of 4-px blocks (train/losses.chroma_loss; default 0)")
    p.add_argument("--crop", type=int, help="HR crop size for the whole run (default: 128, then 256 at the end)")
    p.add_argument("--student", type=Path, help="one-step student weights whose latents --student-frac decodes")
    p.add_argument("--student-frac", type=float, default=0.0,
                   help="fraction of each batch decoded from the student's latent of its LR, scored against HR "
                        "(with --part decoder; crop a multiple of the preset's tile)")  # fmt: skip
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    dist, device = init_distributed(args.device)
    extra: dict[str, object] = {"part": args.part, "blur_frac": args.blur_frac, "student_frac": args.student_frac,
                                "chroma_weight": args.chroma_weight}  # fmt: skip
    if args.crop is not None:
        extra |= {"crop": args.crop, "final_crop": args.crop}
    cfg = AEConfig(**overrides(args), **extra)  # type: ignore[arg-type]
    pairs = load_pairs(args.photos, "train", min_side=cfg.final_crop)
    res = train_autoencoder(cfg, pairs, args.out, device, dist, resume=not args.fresh, init=args.init,
                            student=args.student)
    if dist.is_main:
        log.info("done: %s", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

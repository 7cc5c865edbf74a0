"""Distil a light autoencoder (:mod:`tadsr.models.light_ae`) from a frozen VQ-f4 autoencoder.

Targets come from the frozen autoencoder only, so any VQ-f4 checkpoint (the official ``autoencoder_vq_f4.pth``
included) can be used with any photos:

* light encoder: LR crop -> the frozen encoder's ``z_y = quant_conv(Enc(bicubic_x4(LR)))`` (MSE);
* light decoder: quantised latent -> the frozen decoder's image from the same codes (L1), on the codes of the
  HR crop (what the denoiser's output looks like) and, for ``zy_frac`` of the batch, on the codes of ``z_y``;
* optional: ``hr_weight`` x L1 to the HR crop itself (off by default; the targets need no HR data beyond the
  photos the frozen autoencoder encodes).

The targets are computed once into a pool of random aligned crops of the ``train`` split (never ``val``); the
codebook is copied from the frozen autoencoder and stays frozen. Optimiser AdamW, warm-up + cosine, EMA.
Randomness is derived from (seed, rank, step), so a resumed run draws the same batches as a straight one.

Writes ``OUT/final.safetensors`` (EMA weights of :class:`~tadsr.models.light_ae.LightAutoencoder`; metadata:
the light config, the preset and the frozen autoencoder's sha256) and resumable checkpoints in ``OUT``.

Usage::

    tadsr distill-ae --autoencoder AE.safetensors --photos data/photos --out runs/light [--minutes 60]
    python -m tadsr.train.distill_ae --autoencoder AE.safetensors --photos data/photos --out runs/light
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tadsr.checkpoint import load_state_dict, save_safetensors, sha256_file
from tadsr.config import get_preset
from tadsr.errors import ConfigError
from tadsr.models.light_ae import META_CONFIG, LightAEConfig, LightAutoencoder, light_config, load_light_autoencoder
from tadsr.models.ops import bicubic_x4_reference
from tadsr.models.vqgan import VQModelTorch
from tadsr.train.common import (
    DistEnv,
    Ema,
    RunningMean,
    StageCheckpoint,
    StepPlanner,
    autocast,
    resolve_cpu_amp,
    init_distributed,
    setup_logging,
    step_seed,
    to_memory_format,
    warmup_cosine,
)
from tadsr.train.data import PhotoPairs, grid_crops, load_pairs, sample_crops, to_unit

__all__ = ["DistillAEConfig", "DistillAEResult", "TargetPool", "build_target_pool", "distill_light_ae",
           "load_light_autoencoder", "evaluate", "main"]  # fmt: skip

log = logging.getLogger(__name__)

CODEBOOK = "quantize.embedding.weight"


@dataclass(frozen=True, kw_only=True)
class DistillAEConfig:
    """Recipe of the light-autoencoder distillation."""

    preset: str = "bundled"
    steps: int = 20000
    batch: int = 4
    crop: int = 256  # HR side of the target crops (the frozen autoencoder sees this context: one 64-px LR tile)
    train_crop: int = 256  # HR side of the windows of the target crops trained on (< crop: only for local nets)
    pool_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_rate: float = 0.999
    latent_weight: float = 1.0
    image_weight: float = 1.0
    hr_weight: float = 0.0
    zy_frac: float = 0.0  # fraction of decoder samples on the codes of z_y instead of E(HR) (0: not computed)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 500
    val_crops: int = 8
    time_limit_s: float | None = None
    pause_after_s: float | None = None  # end this run after so many seconds (checkpoint; resume continues)
    amp: bool = True  # bf16 autocast on CUDA
    cpu_amp: bool = False  # bf16 autocast on the CPU as well (AVX-512 BF16 / AMX CPUs)
    channels_last: bool = False  # channels-last memory layout for the light networks and their inputs
    light: dict[str, Any] = dataclasses.field(default_factory=dict)  # LightAEConfig overrides


@dataclass(frozen=True)
class DistillAEResult:
    """Outcome: final weights, steps done, last logged metrics, last validation, seconds."""

    weights: Path
    steps: int
    metrics: dict[str, float]
    val: dict[str, float]
    seconds: float


@dataclass
class TargetPool:
    """Crops with the frozen autoencoder's targets.

    Attributes:
        lr: (N, 3, s, s) LR crops in [-1, 1].
        hr: (N, 3, 4s, 4s) HR crops in [-1, 1].
        zy: (N, C, s, s) frozen ``encode(bicubic_x4(LR))``.
        idx_hr: (N, s, s) codes of ``encode(HR)``; img_hr: (N, 3, 4s, 4s) frozen decode of those codes.
        idx_zy: (N, s, s) codes of ``zy``; img_zy: frozen decode of those codes.
    """

    lr: torch.Tensor
    hr: torch.Tensor
    zy: torch.Tensor
    idx_hr: torch.Tensor
    img_hr: torch.Tensor
    idx_zy: torch.Tensor
    img_zy: torch.Tensor

    def __len__(self) -> int:
        return int(self.lr.shape[0])


@torch.no_grad()
def _targets(
    ae: VQModelTorch, hr_u8: np.ndarray, lr_u8: np.ndarray, device: torch.device, batch: int, with_zy: bool = True
) -> TargetPool:
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("lr", "hr", "zy", "idx_hr", "img_hr", "idx_zy", "img_zy")}
    for i in range(0, len(hr_u8), batch):
        hr = to_unit(hr_u8[i : i + batch], device)
        lr = to_unit(lr_u8[i : i + batch], device)
        zy = ae.encode(bicubic_x4_reference(lr))
        idx_hr = ae.quantize.indices(ae.encode(hr))
        idx_zy = ae.quantize.indices(zy)
        for k, v in (("lr", lr), ("hr", hr), ("zy", zy), ("idx_hr", idx_hr), ("idx_zy", idx_zy)):
            parts[k].append(v)
        for k, idx in (("img_hr", idx_hr), ("img_zy", idx_zy)) if with_zy else (("img_hr", idx_hr),):
            zq = ae.quantize.embedding(idx).permute(0, 3, 1, 2)
            parts[k].append(ae.decoder(ae.post_quant_conv(zq)))
    out = {k: torch.cat(v) for k, v in parts.items() if v}
    if not with_zy:  # not trained on: an empty placeholder instead of a decode per crop
        out["img_zy"] = out["img_hr"][:0]
    return TargetPool(**out)


def build_target_pool(
    ae: VQModelTorch, pairs: PhotoPairs, n: int, *, seed: int, hr_size: int, device: torch.device,
    rank: int = 0, world: int = 1, batch: int = 4, with_zy: bool = True,
) -> TargetPool:  # fmt: skip
    """``n`` random aligned crops (the same for any world size; this rank keeps ``rank::world``) and their targets."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 7927])
    hr, lr = sample_crops(pairs, rng, n, hr_size)
    pool = _targets(ae, hr[rank::world], lr[rank::world], device, batch, with_zy)
    log.info("distill-ae: target pool of %d crops (%d px HR) computed in %.1f s", len(pool), hr_size,
             time.perf_counter() - t0)  # fmt: skip
    return pool


def load_frozen_autoencoder(ckpt: Path | str, preset: str, device: torch.device) -> VQModelTorch:
    """The frozen VQ-f4 (eval, no grad) from a .pth / .safetensors checkpoint (upstream keys, strict)."""
    from tadsr.checkpoint import load_into

    ae = VQModelTorch(get_preset(preset).vq)
    load_into(ae, load_state_dict(ckpt), kind="autoencoder", source=str(ckpt))
    return ae.to(device).eval().requires_grad_(False)


class _Step(nn.Module):
    """Both light networks in one module (one DDP wrapper): (lr, zq) -> (z_y, image)."""

    def __init__(self, net: LightAutoencoder) -> None:
        super().__init__()
        self.net = net

    def forward(self, lr: torch.Tensor, zq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encoder(lr), self.net.decoder(zq)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)))
    return 10 * float(np.log10(4.0 / max(mse, 1e-12)))


@torch.no_grad()
def evaluate(net: LightAutoencoder, pool: TargetPool, batch: int = 8) -> dict[str, float]:
    """Latent MSE to the frozen z_y, code agreement, and decode PSNR (RGB, [-1, 1]) vs the frozen decode and HR."""
    net.eval()
    zs, imgs = [], []
    for i in range(0, len(pool), batch):
        zs.append(net.encode(pool.lr[i : i + batch]))
        zq = net.quantize.embedding(pool.idx_hr[i : i + batch]).permute(0, 3, 1, 2)
        imgs.append(net.decoder(zq))
    z, img = torch.cat(zs), torch.cat(imgs)
    codes = net.quantize.indices(z)
    return {
        "latent_mse": float(F.mse_loss(z, pool.zy)),
        "code_match": float((codes == pool.idx_zy).float().mean()),
        "psnr_vs_frozen": _psnr(img, pool.img_hr),
        "psnr_frozen_vs_hr": _psnr(pool.img_hr, pool.hr),
        "psnr_vs_hr": _psnr(img, pool.hr),
    }


def _val_pool(ae: VQModelTorch, photos: Path, cfg: DistillAEConfig, device: torch.device) -> TargetPool | None:
    try:
        pairs = load_pairs(photos, "val", min_side=cfg.crop)
    except Exception as e:  # noqa: BLE001 - validation is optional: no val split means no val metrics
        log.warning("distill-ae: no validation crops (%s)", e)
        return None
    hr, lr, _ = grid_crops(pairs, cfg.crop, max_per_image=max(1, cfg.val_crops // max(1, len(pairs))))
    return _targets(ae, hr[: cfg.val_crops], lr[: cfg.val_crops], device, 4, with_zy=False)


def _window_batch(pool: TargetPool, cfg: DistillAEConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of random aligned windows (``train_crop`` HR px) of random pool crops, from generator ``g``."""
    s = pool.lr.shape[-1]
    w = cfg.train_crop // 4
    if cfg.train_crop % 4 or not 0 < w <= s:
        raise ConfigError(f"train_crop {cfg.train_crop} must be a multiple of 4 in [4, crop {4 * s}]")
    pick = torch.randint(0, len(pool), (cfg.batch,), generator=g).tolist()
    ys = torch.randint(0, s - w + 1, (cfg.batch,), generator=g).tolist()
    xs = torch.randint(0, s - w + 1, (cfg.batch,), generator=g).tolist()
    use_zy = torch.rand(cfg.batch, generator=g) < cfg.zy_frac
    if use_zy.any() and len(pool.img_zy) == 0:
        raise ConfigError("zy_frac > 0 needs a pool built with with_zy=True")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("lr", "zy", "idx", "target", "hr")}
    for i, y, x, z in zip(pick, ys, xs, use_zy.tolist()):
        lat = (slice(y, y + w), slice(x, x + w))
        img = (slice(4 * y, 4 * (y + w)), slice(4 * x, 4 * (x + w)))
        out["lr"].append(pool.lr[i, :, lat[0], lat[1]])
        out["zy"].append(pool.zy[i, :, lat[0], lat[1]])
        out["idx"].append((pool.idx_zy if z else pool.idx_hr)[i, lat[0], lat[1]])
        out["target"].append((pool.img_zy if z else pool.img_hr)[i, :, img[0], img[1]])
        out["hr"].append(pool.hr[i, :, img[0], img[1]])
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["use_zy"] = use_zy.to(pool.lr.device)
    return batch


def distill_light_ae(
    cfg: DistillAEConfig, ae: VQModelTorch, pool: TargetPool, out_dir: Path, device: torch.device,
    dist: DistEnv = DistEnv(), *, val_pool: TargetPool | None = None, resume: bool = True,
    ae_source: dict[str, str] | None = None, init: Path | None = None,
) -> DistillAEResult:  # fmt: skip
    """Train (or resume) a light autoencoder against the frozen ``ae``; write ``out_dir/final.safetensors``.

    ``init``: start a fresh run from these light-autoencoder weights (e.g. the shipped one, to distil it further or
    from a refit decoder) instead of random ones; its light config must be this run's. A checkpoint in ``out_dir``
    takes precedence (resume).
    """
    out_dir = Path(out_dir)
    cfg = resolve_cpu_amp(cfg, device, "distill-ae")
    lcfg = light_config(cfg.preset, **cfg.light)
    if lcfg.n_embed != ae.cfg.n_embed or lcfg.embed_dim != ae.cfg.embed_dim:
        raise ConfigError(f"light config {lcfg} does not match the autoencoder (n_embed {ae.cfg.n_embed}, "
                          f"embed_dim {ae.cfg.embed_dim})")  # fmt: skip
    torch.manual_seed(cfg.seed)
    net = LightAutoencoder(lcfg)
    ckpt = StageCheckpoint(out_dir)
    if init is not None and not (resume and ckpt.exists()):
        start = load_light_autoencoder(init)
        if start.cfg != lcfg:
            raise ConfigError(f"--init {init} is a light autoencoder of another config ({start.cfg}; this run: "
                              f"{lcfg}); pass the matching --light overrides")  # fmt: skip
        net.load_state_dict(start.state_dict())
        log.info("distill-ae: initialised from %s", init)
    net.quantize.embedding.weight.data.copy_(ae.quantize.embedding.weight.detach().cpu())
    net.quantize.requires_grad_(False)
    net = net.to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    step_mod: nn.Module = _Step(net)
    if dist.enabled:
        step_mod = nn.parallel.DistributedDataParallel(step_mod, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = Ema(net, cfg.ema_rate)
    step, elapsed = 0, 0.0
    metrics: dict[str, float] = {}
    val: dict[str, float] = {}
    if resume and ckpt.exists():
        held = json.loads(ckpt.state_path.read_text()).get("light_config")
        if held != json.loads(lcfg.to_json()):
            raise ConfigError(f"{out_dir} holds a run of another light config ({held}, this run: {lcfg}); "
                              "pass --fresh or another --out")  # fmt: skip
        st = ckpt.load(model=net, ema=ema, optimizers={"light": opt})
        step, elapsed = int(st["step"]), float(st["elapsed_s"])
        metrics, val = dict(st.get("metrics", {})), dict(st.get("val", {}))
        log.info("distill-ae: resumed %s at step %d", out_dir, step)
    planner = StepPlanner(cfg.steps, cfg.time_limit_s, elapsed_s=elapsed, device=device,
                          pause_after_s=cfg.pause_after_s)
    meter = RunningMean()
    t_run = time.perf_counter()
    emb = net.quantize.embedding
    meta = {META_CONFIG: lcfg.to_json(), "preset": cfg.preset, "stage": "distill-ae",
            "autoencoder": json.dumps(ae_source or {})}  # fmt: skip
    prog = planner.progress(step)
    stop = planner.should_stop(step, prog)
    while not stop:
        net.train()
        for gr in opt.param_groups:
            gr["lr"] = cfg.lr * warmup_cosine(step, prog, cfg.warmup)
        g = torch.Generator().manual_seed(step_seed(cfg.seed, dist.rank, step, stream=5))
        b = _window_batch(pool, cfg, g)
        zq = to_memory_format(emb(b["idx"]).permute(0, 3, 1, 2), cfg.channels_last)
        with autocast(device, cfg.amp, cfg.cpu_amp):
            z_pred, img = step_mod(to_memory_format(b["lr"], cfg.channels_last), zq)
        z_pred, img = z_pred.float(), img.float()
        l_lat = F.mse_loss(z_pred, b["zy"])
        l_img = (img - b["target"]).abs().mean()
        loss = cfg.latent_weight * l_lat + cfg.image_weight * l_img
        if cfg.hr_weight:
            keep = ~b["use_zy"]
            l_hr = (img[keep] - b["hr"][keep]).abs().mean() if bool(keep.any()) else img.sum() * 0
            loss = loss + cfg.hr_weight * l_hr
        target = b["target"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(net)
        ema.state[CODEBOOK].copy_(emb.weight)  # frozen: kept exact (an EMA of a constant drifts by rounding)
        step += 1
        meter.add({"loss": loss, "latent_mse": l_lat, "image_l1": l_img,
                   "psnr_vs_frozen": -10 * torch.log10(F.mse_loss(img.detach().clamp(-1, 1), target) / 4)})  # fmt: skip
        prog = planner.progress(step)
        stop = planner.should_stop(step, prog)
        if step % cfg.log_every == 0 or stop:
            metrics = meter.pop()
            if dist.is_main:
                log.info("distill-ae step %d (%.0f%%) lr %.2e %s", step, 100 * prog, opt.param_groups[0]["lr"],
                         " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        if dist.is_main and (step % cfg.save_every == 0 or stop):
            if val_pool is not None:
                ema_net = LightAutoencoder(lcfg).to(device)
                ema_net.load_state_dict(ema.state)
                val = evaluate(ema_net, val_pool)
                log.info("distill-ae val (EMA) step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in val.items()))
            spent = elapsed + time.perf_counter() - t_run
            ckpt.save(model=net, ema=ema, optimizers={"light": opt}, metadata=meta, state={
                "stage": "distill-ae", "step": step, "elapsed_s": spent, "config": dataclasses.asdict(cfg),
                "light_config": json.loads(lcfg.to_json()), "metrics": metrics, "val": val})  # fmt: skip
    seconds = elapsed + time.perf_counter() - t_run
    final = out_dir / "final.safetensors"
    if dist.is_main:
        save_safetensors(ema.state, final, {**meta, "steps": str(step)})
        log.info("distill-ae: %d steps in %.0f s -> %s (%.2f MB)", step, seconds, final, final.stat().st_size / 1e6)
    if dist.enabled:
        torch.distributed.barrier()
    return DistillAEResult(final, step, metrics, val, seconds)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``distill-ae`` arguments (shared by ``tadsr distill-ae`` and ``python -m tadsr.train.distill_ae``)."""
    from tadsr.train.autoencoder import add_common_args

    p = p or argparse.ArgumentParser(prog="python -m tadsr.train.distill_ae", description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--autoencoder", type=Path, required=True, help="frozen VQ-f4 checkpoint (.pth or .safetensors)")
    p.add_argument("--pool-size", type=int, help="number of cached target crops")
    p.add_argument("--crop", type=int, help="HR side of the target crops (multiple of 4; default 256: one tile)")
    p.add_argument("--train-crop", type=int, help="HR side of the windows trained on (multiple of 4; default: --crop)")
    p.add_argument("--hr-weight", type=float, help="weight of the optional L1-to-HR term (default 0)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, help="log every N steps")
    p.add_argument("--light", nargs="*", default=[], metavar="KEY=VALUE",
                   help="light config overrides, e.g. dec_ch=48 dec_blocks=3")  # fmt: skip
    p.add_argument("--log-file", type=Path, help="also log to this file")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in --out and continue it (without it: resumed when present)")  # fmt: skip
    return p


def _light_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(LightAEConfig)} - {"embed_dim", "n_embed"}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or k not in fields:
            raise ConfigError(f"--light expects KEY=VALUE with KEY in {sorted(fields)}, got {it!r}")
        if k == "up_ch":
            out[k] = tuple(int(x) for x in v.split(","))
        elif k == "global_context":
            out[k] = v.lower() in ("1", "true", "yes", "on")
        else:
            out[k] = int(v)
    return out


def run(args: argparse.Namespace) -> int:
    """Run the distillation from parsed arguments (``tadsr distill-ae`` and ``python -m``)."""
    from tadsr.train.autoencoder import overrides

    setup_logging(args.verbose, args.log_file)
    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh exclude each other")
    if args.resume and not StageCheckpoint(args.out).exists():
        raise ConfigError(f"--resume: no distill-ae checkpoint in {args.out} (state.json + model.safetensors)")
    torch.set_num_threads(args.threads)
    dist, device = init_distributed(args.device)
    extra: dict[str, Any] = {"light": _light_overrides(args.light)}
    for k in ("pool_size", "crop", "train_crop", "hr_weight", "save_every", "log_every"):
        if getattr(args, k) is not None:
            extra[k] = getattr(args, k)
    if "crop" in extra and "train_crop" not in extra:
        extra["train_crop"] = min(extra["crop"], DistillAEConfig.train_crop)
    cfg = DistillAEConfig(**overrides(args), **extra)  # type: ignore[arg-type]
    ae = load_frozen_autoencoder(args.autoencoder, cfg.preset, device)
    src = {"path": str(args.autoencoder), "sha256": sha256_file(args.autoencoder)}
    pairs = load_pairs(args.photos, "train", min_side=cfg.crop)
    pool = build_target_pool(ae, pairs, cfg.pool_size, seed=cfg.seed, hr_size=cfg.crop, device=device,
                             rank=dist.rank, world=dist.world, with_zy=cfg.zy_frac > 0)  # fmt: skip
    val_pool = _val_pool(ae, args.photos, cfg, device) if dist.is_main else None
    res = distill_light_ae(cfg, ae, pool, args.out, device, dist, val_pool=val_pool, resume=not args.fresh,
                           ae_source=src, init=args.init)  # fmt: skip
    if dist.is_main:
        log.info("done: %s", res)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tadsr.train.distill_ae --autoencoder CKPT --photos DIR --out DIR [--device cuda]``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput (samples/s) of each stage of the bundled recipe: precision, memory layout, compile, shapes.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py > benchmarks/results/train_throughput_cpu.txt
    python benchmarks/train_throughput.py --device cuda > train_throughput_h200.txt     # on a GPU machine

Each setting runs the real stage code (``train_autoencoder`` / ``train_teacher`` / ``train_distill`` with the
stage config's ``amp``, ``cpu_amp`` and ``channels_last`` options): one warm-up step in a fresh folder, then
``--steps`` timed steps resumed from it in the same process (the timed part includes one checkpoint write, a
few ms). ``torch.compile`` is not a stage option: it is measured on the teacher's forward + backward + AdamW step
in a loop of this script, eager and compiled side by side. Data are random tensors resident on the device
(latent pools of one batch; random uint8 photos for the autoencoder): throughput does not depend on content.

FLOPs are counted once per stage with ``torch.utils.flop_counter.FlopCounterMode`` on one training step at
batch 1 (forward + backward of every network the step runs, including the distillation's no-grad teacher
sampling); achieved GFLOP/s = FLOP/sample x samples/s. On a shared machine compare settings only within one
run: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import tadsr.train.common as common
from tadsr.config import get_preset
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.schedule import make_schedule
from tadsr.train.autoencoder import AEConfig, _AEStep, train_autoencoder
from tadsr.train.common import autocast, to_memory_format
from tadsr.train.data import LatentPool, PhotoPairs, degrade_x4
from tadsr.train.distill import DistillConfig, Distiller, train_distill
from tadsr.train.teacher import TeacherConfig, train_teacher

QUIET = {"log_every": 10**9, "save_every": 10**9}


@dataclass
class Row:
    stage: str
    setting: str
    threads: int
    batch: int
    crop: int
    s_per_step: float
    note: str = ""

    @property
    def samples_s(self) -> float:
        return self.batch / self.s_per_step


def _pairs(n: int, side: int, seed: int = 0) -> PhotoPairs:
    rng = np.random.default_rng(seed)
    hrs = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]
    return PhotoPairs(tuple(f"rand{i}" for i in range(n)), tuple(hrs), tuple(degrade_x4(h) for h in hrs))


def _pool(n: int, crop: int, preset: str, device: torch.device) -> LatentPool:
    c, lat = get_preset(preset).vq.embed_dim, crop // 4
    g = torch.Generator().manual_seed(0)
    z = [torch.randn((n, c, lat, lat), generator=g) for _ in range(2)]
    lq = torch.rand((n, 3, lat, lat), generator=g) * 2 - 1
    return LatentPool(z[0].to(device), z[1].to(device), lq.to(device))


@contextlib.contextmanager
def _tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tadsr_tput_"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ae(cfg: AEConfig, device: torch.device, steps: int) -> float:
    pairs = _pairs(2, max(cfg.crop, 256))
    cfg = replace(cfg, final_frac=0.0, restart_every=10**9, **QUIET)
    with _tmp() as d:
        train_autoencoder(replace(cfg, steps=1), pairs, d, device, resume=False)
        return train_autoencoder(replace(cfg, steps=1 + steps), pairs, d, device).seconds_per_step


def time_teacher(cfg: TeacherConfig, device: torch.device, steps: int) -> float:
    pool = _pool(cfg.batch, cfg.crop, cfg.preset, device)
    cfg = replace(cfg, **QUIET)
    with _tmp() as d:
        train_teacher(replace(cfg, steps=1), pool, d, device, resume=False)
        return train_teacher(replace(cfg, steps=1 + steps), pool, d, device).seconds_per_step


def time_distill(cfg: DistillConfig, device: torch.device, steps: int) -> float:
    pool = _pool(cfg.batch, cfg.crop, cfg.preset, device)
    teacher = UNetModelSwin(get_preset(cfg.preset).unet)
    cfg = replace(cfg, **QUIET)
    with _tmp() as d:
        train_distill(replace(cfg, steps=1), pool, teacher, d, device, resume=False)
        return train_distill(replace(cfg, steps=1 + steps), pool, teacher, d, device).seconds_per_step


def teacher_loop(cfg: TeacherConfig, device: torch.device, compiled: bool) -> Callable[[], None]:
    """One teacher training step (forward, MSE, backward, AdamW) as a closure, optionally ``torch.compile``d."""
    p = get_preset(cfg.preset)
    sched = make_schedule(p.schedule)
    torch.manual_seed(0)
    net = UNetModelSwin(p.unet).to(device).train()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    pool = _pool(cfg.batch, cfg.crop, cfg.preset, device)
    t = torch.randint(0, sched.num_steps, (cfg.batch,), device=device)

    def step() -> None:
        x_t = sched.q_sample(pool.z0, pool.zy, t, torch.randn_like(pool.z0))
        with autocast(device, cfg.amp, cfg.cpu_amp):
            pred = model(to_memory_format(sched.scale_input_batch(x_t, t), cfg.channels_last), t,
                         to_memory_format(pool.lq, cfg.channels_last))  # fmt: skip
        loss = (pred.float() - pool.z0).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_loop(step: Callable[[], None], device: torch.device, steps: int) -> tuple[float, float]:
    """(seconds of the first call, i.e. compilation + one step; seconds per step after it)."""
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return first, (time.perf_counter() - t0) / steps


def flops_per_sample(stage: str, preset: str, crop: int, device: torch.device) -> float:
    """FLOPs of one training step at batch 1 (forward + backward of every network the step runs)."""
    fc = FlopCounterMode(display=False)
    if stage == "autoencoder":
        from tadsr.models.vqgan import VQModelTorch

        mod = _AEStep(VQModelTorch(get_preset(preset).vq).to(device), amp=False)
        x = torch.rand((1, 3, crop, crop), device=device) * 2 - 1
        with fc:
            x_rec, z, e, _ = mod(x)
            ((x_rec - x).abs().mean() + (z - e.detach()).square().mean()).backward()
    elif stage == "teacher":
        step = teacher_loop(TeacherConfig(preset=preset, batch=1, crop=crop, amp=False), device, compiled=False)
        with fc:
            step()
    else:
        cfg = DistillConfig(preset=preset, batch=1, crop=crop, amp=False)
        d = Distiller(cfg, UNetModelSwin(get_preset(preset).unet), device)
        pool = _pool(1, crop, preset, device)
        with fc:
            d.step(pool.z0, pool.zy, pool.lq, torch.Generator(device=device).manual_seed(0))
    return float(fc.get_total_flops())


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--steps", type=int, help="timed steps per setting (default 2 on CPU, 20 on CUDA)")
    ap.add_argument("--stages", nargs="+", default=["autoencoder", "teacher", "distill"],
                    choices=["autoencoder", "teacher", "distill", "compile"],
                    help="'compile': the teacher eager vs torch.compile (its own run: compilation takes minutes)")
    args = ap.parse_args(argv)
    native = common.cpu_has_native_bf16()
    # the bf16 rows measure bf16 whatever the CPU: that is how a CPU without native bf16 shows what it would cost
    with mock.patch.object(common, "cpu_has_native_bf16", lambda: True):
        return _run(args, native)


def _run(args: argparse.Namespace, native_bf16: bool) -> int:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (20 if cuda else 2)
    t_start = time.perf_counter()
    cpu_flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        cpu_flags = " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    print(f"# train_throughput: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} logical CPUs, flags: {cpu_flags or 'n/a'}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if cuda:
        print(f"# device {torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda}")
    refused = "no: the CPU bf16 rows run emulated bf16, which the training stages refuse here (they warn, train fp32)"
    print(f"# native bf16 on this CPU (torch): {'yes' if native_bf16 else refused}")
    print(f"# load average at start (1/5/15 min): {_load()}; preset {args.preset}; {steps} timed steps per setting "
          "after 1 warm-up step")  # fmt: skip
    rows: list[Row] = []
    flops: dict[tuple[str, int], float] = {}

    def add(stage: str, setting: str, threads: int, batch: int, crop: int, fn: Callable[[], float],
            note: str = "") -> Row | None:  # fmt: skip
        torch.set_num_threads(threads)
        try:
            r = Row(stage, setting, threads, batch, crop, fn(), note)
        except Exception as e:  # a setting that does not run here is reported, not fatal
            print(f"# {stage} {setting} b{batch} c{crop}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        rows.append(r)
        print(f"# done {stage:<11} {setting:<14} t{threads} b{batch:<3} c{crop:<3} {r.s_per_step:7.3f} s/step "
              f"{r.samples_s:8.2f} samples/s  (load {_load()})", flush=True)  # fmt: skip
        return r

    def flop(stage: str, crop: int) -> None:
        if (stage, crop) not in flops:
            torch.set_num_threads(1 if not cuda else torch.get_num_threads())
            try:
                flops[(stage, crop)] = flops_per_sample(stage, args.preset, crop, dev)
            except Exception as e:
                print(f"# FLOP count {stage} c{crop}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    # precision x layout: (amp, cpu_amp, channels_last)
    if cuda:
        modes = {"fp32": (False, False, False), "bf16": (True, False, False), "bf16+CL": (True, False, True)}
    else:
        modes = {"fp32": (False, False, False), "bf16": (True, True, False), "fp32+CL": (False, False, True),
                 "bf16+CL": (True, True, True)}  # fmt: skip

    def kw(mode: str) -> dict[str, bool]:
        a, c, cl = modes[mode]
        return {"amp": a, "cpu_amp": c, "channels_last": cl}

    def best(stage: str, threads: int = 1) -> str:
        cand = [r for r in rows if r.stage == stage and r.threads == threads and r.setting in modes]
        return max(cand, key=lambda r: r.samples_s).setting if cand else "fp32"

    p = args.preset
    th = [torch.get_num_threads()] if cuda else [1]
    if "autoencoder" in args.stages:
        b, c = (32, 128) if cuda else (2, 96)
        flop("autoencoder", c)
        for m in modes:
            add("autoencoder", m, th[0], b, c,
                lambda m=m: time_ae(AEConfig(preset=p, batch=b, crop=c, **kw(m)), dev, steps))
        m = best("autoencoder", th[0])
        for bb, cc in ((((64, 128), (16, 256)) if cuda else ((4, 96), (1, 256)))):
            flop("autoencoder", cc)
            add("autoencoder", m, th[0], bb, cc,
                lambda bb=bb, cc=cc: time_ae(AEConfig(preset=p, batch=bb, crop=cc, **kw(m)), dev, steps))
        if not cuda:
            add("autoencoder", m, 2, b, c, lambda: time_ae(AEConfig(preset=p, batch=b, crop=c, **kw(m)), dev, steps))
    if "teacher" in args.stages:
        b, c = (64, 256) if cuda else (4, 256)
        flop("teacher", c)
        for m in modes:
            add("teacher", m, th[0], b, c,
                lambda m=m: time_teacher(TeacherConfig(preset=p, batch=b, crop=c, **kw(m)), dev, steps))
        m = best("teacher", th[0])
        # the bundled UNet takes LR tiles in multiples of 64 px: HR crops of 256 or 512
        sweep = ((128, 256), (256, 256), (512, 256), (32, 512)) if cuda else ((8, 256), (1, 512))
        for bb, cc in sweep:
            flop("teacher", cc)
            add("teacher", m, th[0], bb, cc,
                lambda bb=bb, cc=cc: time_teacher(TeacherConfig(preset=p, batch=bb, crop=cc, **kw(m)), dev, steps))
        if not cuda:
            add("teacher", m, 2, b, c,
                lambda: time_teacher(TeacherConfig(preset=p, batch=b, crop=c, **kw(m)), dev, steps))
    if "distill" in args.stages:
        b, c = (32, 256) if cuda else (1, 256)
        flop("distill", c)
        for m in (x for x in modes if not modes[x][2]):  # channels-last crashes distillation's backward (CPU)
            add("distill", m, th[0], b, c,
                lambda m=m: time_distill(DistillConfig(preset=p, batch=b, crop=c, c_dim=64, **kw(m)), dev, steps))
        m = best("distill", th[0])
        for bb in ((64, 128) if cuda else (2,)):
            add("distill", m, th[0], bb, c,
                lambda bb=bb: time_distill(DistillConfig(preset=p, batch=bb, crop=c, **kw(m)), dev, steps))
        if not cuda:
            add("distill", m, 2, b, c,
                lambda: time_distill(DistillConfig(preset=p, batch=b, crop=c, **kw(m)), dev, steps))

    if "compile" in args.stages:
        b, c = (64, 256) if cuda else (4, 256)
        m = "bf16"
        cb = 256 if cuda else b
        flop("teacher", c)
        for compiled in (False, True):
            name = f"{m}{' compile' if compiled else ' eager'}"
            info: dict[str, float] = {}

            def run(compiled: bool = compiled, info: dict[str, float] = info) -> float:
                cfg = TeacherConfig(preset=p, batch=cb, crop=c, **kw(m))
                first, per = time_loop(teacher_loop(cfg, dev, compiled), dev, steps)
                info["first"] = first
                return per

            r = add("teacher", name, th[0], cb, c, run)
            if r is not None:
                r.note = (f"first step {info['first']:.1f} s (incl. compilation)" if compiled
                          else "loop of this script")  # fmt: skip
    print()
    print(f"| stage | setting | threads | batch | crop (HR px) | s/step | samples/s | x vs fp32 same stage/shape | "
          f"GFLOP/sample | achieved {'TFLOP/s' if cuda else 'GFLOP/s'} | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = [q for q in rows if q.stage == r.stage and q.setting == "fp32" and q.batch == r.batch
                and q.crop == r.crop and q.threads == r.threads]  # fmt: skip
        ratio = f"{r.samples_s / base[0].samples_s:.2f}" if base else ""
        f = flops.get((r.stage, r.crop))
        g = f"{f / 1e9:.1f}" if f else ""
        ach = f"{f * r.samples_s / (1e12 if cuda else 1e9):.2f}" if f else ""
        print(f"| {r.stage} | {r.setting} | {r.threads} | {r.batch} | {r.crop} | {r.s_per_step:.3f} | "
              f"{r.samples_s:.2f} | {ratio} | {g} | {ach} | {r.note} |")  # fmt: skip
    print()
    print(f"# load average at end (1/5/15 min): {_load()}; wall {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

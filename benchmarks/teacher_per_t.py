"""Where a teacher's error lies: its x0-prediction error at every timestep, per photo set, for several teachers.

For each set, the same random aligned 256² crops (HR and MATLAB-bicubic LR) are encoded once through the
autoencoder (``z0 = E(HR)``, ``z_y = E(bicubic x4(LR))``), noised to ``x_t`` with one fixed noise per crop, and each
teacher predicts ``z0`` at every t = 0..T-1 (the training objective, without sampling). Printed: the latent MSE per t
and set, one column per teacher, as Markdown. A set is a photo set (its ``val`` split) or a plain folder of images
(``tadsr/data/bench``).

``--decode`` adds, for the predictions at t = T-1 (one step) and t = 0, what happens after the latent: the share of
latent positions whose nearest codebook entry differs from that of ``z0`` (code flips), and the PSNR-Y of the decoded
prediction, with and without the VQ lookup, against the decoded ``z0`` (the autoencoder's own reconstruction, so only
the teacher's error is scored).

``--chain N`` also runs each teacher's own T-step sampler on the same crops ``N`` times (noise seeds) and prints,
beside the ``q_sample`` column, the x0-prediction MSE at every t along those chains (mean over seeds): where the
sampler's own ``x_t`` leaves the distribution the teacher was trained on, the chain column grows above the
``q_sample`` column. A second table splits the chains' final latent error into the error of their mean over seeds
and their spread (MSE of one chain = MSE of the mean + variance across seeds, up to the N/(N-1) correction): a
sampler that draws from a posterior lands about twice the posterior-mean error from z0, so a chain that loses to the
one-step x0 only by its spread is sampling, not drifting. With ``--decode``, the first chain and the mean over seeds
are scored after the latent as well (rows "chain" and "chain mean").

    python benchmarks/teacher_per_t.py --set val=data/photos --set bench=tadsr/data/bench \\
        --teacher shipped=tadsr/weights/bundled_teacher.safetensors \\
        --teacher s36=train/candidates/bundled_teacher_s36.safetensors --crops 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tadsr.cli.common import named_path
from tadsr.config import get_preset
from tadsr.metrics import psnr_y_8bit
from tadsr.models.unet_swin import UNetModelSwin
from tadsr.models.vqgan import VQModelTorch
from tadsr.pipeline import Models, TeacherPipeline, load_autoencoder, load_denoiser
from tadsr.schedule import Schedule, make_schedule
from tadsr.train.common import chunks
from tadsr.train.data import LatentPool, build_latent_pool, load_pairs

WEIGHTS = Path(__file__).resolve().parents[1] / "tadsr" / "weights"


def _x0_pred(net: UNetModelSwin, sched: Schedule, pool: LatentPool, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """``net``'s x0 prediction from ``x_t`` at timestep ``t`` for the whole pool (batches of 8)."""
    tt = torch.full((len(pool),), t, dtype=torch.long)
    return torch.cat([net(sched.scale_input_batch(x_t[s], tt[s]), tt[s], pool.lq[s]) for s in chunks(len(pool), 8)])


def _chain(models: Models, steps: int, pool: LatentPool, g_seed: int) -> tuple[torch.Tensor, list[float]]:
    """The teacher's own T-step sampler (:meth:`TeacherPipeline.sample`) on the pool, batches of 8:
    (final latent, [x0 MSE against z0 at t = 0..T-1]); one noise draw per step from ``g_seed``."""
    pipe = TeacherPipeline(models, steps)
    T = pipe.schedule.num_steps
    noises = torch.randn((T, *pool.z0.shape), generator=torch.Generator().manual_seed(g_seed))
    sq = [0.0] * T
    finals = []
    for s in chunks(len(pool), 8):
        def on_x0(t: int, x0: torch.Tensor, s: slice = s) -> None:
            sq[t] += float((x0 - pool.z0[s]).square().sum())
        finals.append(pipe.sample(pool.zy[s], noises[:, s], pool.lq[s], on_x0))
    return torch.cat(finals), [v / pool.z0.numel() for v in sq]


def _after_latent(ae: VQModelTorch, pred: torch.Tensor, z0: torch.Tensor) -> tuple[float, float, float]:
    """(code-flip share, PSNR-Y quantised, PSNR-Y unquantised) of predictions against ``z0``, per-crop means."""
    flips, pq, pu = [], [], []
    for s in chunks(len(z0), 8):
        flips.append((ae.quantize.indices(pred[s]) != ae.quantize.indices(z0[s])).float().flatten(1).mean(1))
        ref = ae.decode(z0[s]).clamp(-1, 1).numpy()
        for out, acc in ((ae.decode(pred[s]), pq), (ae.decode(pred[s], force_not_quantize=True), pu)):
            acc += [psnr_y_8bit(o, r) for o, r in zip(out.clamp(-1, 1).numpy(), ref)]
    return float(torch.cat(flips).mean()), float(np.mean(pq)), float(np.mean(pu))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", required=True, type=named_path,
                    help="NAME=DIR (photo set or image folder)")
    ap.add_argument("--teacher", action="append", required=True, type=named_path,
                    help="NAME=teacher checkpoint (bundled or official format)")
    ap.add_argument("--autoencoder", type=Path, default=WEIGHTS / "bundled_autoencoder.safetensors")
    ap.add_argument("--preset", default="bundled")
    ap.add_argument("--crops", type=int, default=32, help="random 256² crops per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", action="store_true", help="also code flips and decoded PSNR-Y at t = T-1 and 0")
    ap.add_argument("--chain", type=int, default=0, metavar="N",
                    help="also the x0 error along each teacher's own T-step chain, N noise seeds (>= 2 for the split)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dev = torch.device("cpu")
    p = get_preset(args.preset)
    sched = make_schedule(p.schedule)
    T = sched.num_steps
    ae = load_autoencoder(args.autoencoder, p)
    teachers: dict[str, UNetModelSwin] = {name: load_denoiser(path, p) for name, path in args.teacher}
    sets = dict(args.set)
    mse: dict[tuple[str, str], list[float]] = {}
    after: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    chain: dict[tuple[str, str], list[float]] = {}
    split: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    with torch.inference_mode():
        for sname, src in sets.items():
            pairs = load_pairs(src, "val", min_side=256)
            pool = build_latent_pool(ae, pairs, args.crops, seed=args.seed, hr_size=256, device=dev)
            g = torch.Generator().manual_seed(args.seed)
            eps = torch.randn(pool.z0.shape, generator=g)
            xs = [sched.q_sample(pool.z0, pool.zy, torch.full((len(pool),), t), eps) for t in range(T)]
            for tname, net in teachers.items():
                mse[(sname, tname)] = []
                for t, x_t in enumerate(xs):
                    pred = _x0_pred(net, sched, pool, x_t, t)
                    mse[(sname, tname)].append(float((pred - pool.z0).square().mean()))
                    if args.decode and t in (0, T - 1):
                        after[(sname, tname, t)] = _after_latent(ae, pred, pool.z0)
                if args.chain:
                    models = Models(preset=p, student=net, autoencoder=ae, teacher=net)
                    runs = [_chain(models, T, pool, g_seed=args.seed + 1 + k) for k in range(args.chain)]
                    zs = torch.stack([z for z, _ in runs])
                    chain[(sname, tname)] = np.mean([e for _, e in runs], axis=0).tolist()
                    var = float(zs.var(dim=0).mean()) if args.chain > 1 else float("nan")
                    split[(sname, tname)] = (float((zs - pool.z0).square().mean()),
                                             float((zs.mean(0) - pool.z0).square().mean()), var,
                                             mse[(sname, tname)][T - 1])  # fmt: skip
                    if args.decode:
                        after[(sname, tname, -1)] = _after_latent(ae, zs[0], pool.z0)
                        after[(sname, tname, -2)] = _after_latent(ae, zs.mean(0), pool.z0)
    cols = [(s, t) for s in sets for t in teachers]
    title = f"Teacher x0-prediction latent MSE per timestep ({args.crops} random 256² crops per set, seed {args.seed})"
    print(f"# {title}\n")
    heads = [f"{s}: {t}" for s, t in cols] + [f"{s}: {t}, own chain" for s, t in cols if (s, t) in chain]
    rows = [mse[c] for c in cols] + [chain[c] for c in cols if c in chain]
    print("| t | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for t in range(T):
        print(f"| {t} | " + " | ".join(f"{r[t]:.4f}" for r in rows) + " |")
    print("| mean | " + " | ".join(f"{np.mean(r):.4f}" for r in rows) + " |")
    if split:
        print(f"\n## The chains' final latent ({args.chain} noise seeds) against z0\n")
        print("| set | teacher | MSE, one chain | MSE, mean over seeds | variance across seeds | one-step x0 MSE |")
        print("|---|---|---|---|---|---|")
        for (s, tn), (one, mean, var, x0) in split.items():
            print(f"| {s} | {tn} | {one:.4f} | {mean:.4f} | {var:.4f} | {x0:.4f} |")
    if after:
        print("\n## After the latent (against the decoded z0)\n")
        print("| set | teacher | t | code flips | PSNR-Y, VQ lookup | PSNR-Y, no lookup |")
        print("|---|---|---|---|---|---|")
        for (s, tn, t), (fl, pq, pu) in sorted(after.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
            label = {-1: "chain", -2: "chain mean"}.get(t, str(t))
            print(f"| {s} | {tn} | {label} | {fl:.1%} | {pq:.2f} | {pu:.2f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s, torch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

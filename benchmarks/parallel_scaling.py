"""How much two processes side by side gain on this machine: the case for (or against) ``tadsr all``'s parallel
format lanes (``--jobs``).

Runs each workload for a fixed number of repetitions in one process, then in N processes at once (spawned, one
thread each), and prints the throughput ratio ``N processes / 1 process`` (ideal: N). The workloads are the kinds of
work a lane does: ``torch`` (the bundled student's forward pass on a 64-px tile, 1 thread: dense kernels),
``python`` (a pure-Python loop: the interpreter-bound part of ``torch.export``, ExecuTorch lowering and coremltools'
MIL passes) and ``numpy`` (a matmul-heavy loop: the Core ML simulator).

    python benchmarks/parallel_scaling.py [--procs 2] [--reps 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def _torch(reps: int) -> float:
    import torch

    from tadsr.pipeline import load_models

    torch.set_num_threads(1)
    m = load_models(preset="bundled")
    x = torch.randn(1, 3, 64, 64)
    lr = torch.randn(1, 3, 64, 64)
    t = torch.full((1,), 14, dtype=torch.long)
    with torch.no_grad():
        m.student(x, t, lq=lr)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            m.student(x, t, lq=lr)
    return time.perf_counter() - t0


def _python(reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        d: dict[int, int] = {}
        for i in range(300_000):
            d[i % 1000] = d.get(i % 1000, 0) + i
    return time.perf_counter() - t0


def _numpy(reps: int) -> float:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy as np

    a = np.random.default_rng(0).standard_normal((256, 576)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((576, 4096)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(reps * 20):
        a @ b
    return time.perf_counter() - t0


WORKLOADS = {"torch": _torch, "python": _python, "numpy": _numpy}


def _run(name: str, reps: int) -> float:
    os.environ["OMP_NUM_THREADS"] = "1"
    return WORKLOADS[name](reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    print(f"# parallel_scaling: {os.cpu_count()} logical CPUs, affinity {len(os.sched_getaffinity(0))}, "
          f"load average at start {os.getloadavg()}")  # fmt: skip
    print("| workload | 1 process s | {n} processes s (each) | throughput ratio | ideal |".format(n=args.procs))
    print("|---|---|---|---|---|")
    for name in WORKLOADS:
        with ctx.Pool(1) as pool:
            alone = pool.apply(_run, (name, args.reps))
        with ctx.Pool(args.procs) as pool:
            each = pool.starmap(_run, [(name, args.reps)] * args.procs)
        ratio = args.procs * alone / max(each)
        print(f"| {name} | {alone:.2f} | {', '.join(f'{t:.2f}' for t in each)} | {ratio:.2f} | {args.procs} |")
    print(f"# load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()

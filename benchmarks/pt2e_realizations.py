"""How much of a PT2E INT8 recipe's HR loss is the draw of its rounding (issue 18).

The fused pipeline's recipe search judges float-block sets on a fake-quantized graph (``FakeQuantSim``); the
chosen set is then converted (``convert_pt2e``) and judged again, and in the main jobs the two disagree (session
16: the search met the 0.30 dB HR budget on the simulator, the converted graph missed it, repair rounds
followed). Session 17 compared the two graphs node by node: with the same INT8 ``add`` constants they are
bit-identical until a convolution whose float arithmetic differs in the last bit (weights dequantized from INT8
vs fake-quantized) moves one activation across a rounding boundary; from there the difference grows through every
later quantizer. So the simulator and the converted graph are two draws of the same rounding process, and so is
the ``.pte`` XNNPACK runs. This script measures how far such draws scatter: for each float-block set
(``--floats REGEX``, any number), it jitters the LR input of the held-out patches (``--sigma``, far below one
8-bit step) in ``--draws`` realizations and reports, per graph, the HR loss (PSNR-Y lost against the fp32
graph on the same jittered input, gains as 0; mean and the search's 95 % upper bound over the 16 default
held-out patches) per draw, and the mean and spread over draws.

Usage::

    python benchmarks/pt2e_realizations.py --floats '' '^encoder|^decoder' > benchmarks/results/pt2e_realizations_s17.md
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch


def main() -> None:
    from tadsr.formats.executorch.ptq import FakeQuantSim, PT2EQuant, _eager, int8_add_constants
    from tadsr.formats.graphs import make_graph
    from tadsr.formats.sensitivity import HRBudget
    from tadsr.pipeline import load_models
    from tadsr.quantize.api import _psnr_y
    from tadsr.quantize.calibration import load_calibration, load_holdout, sample_calibration

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--floats", nargs="+", default=[""], help="regex of the blocks kept float per configuration "
                    "('' keeps only the pinned ones)")  # fmt: skip
    ap.add_argument("--draws", type=int, default=3, help="realizations per configuration (the first: no jitter)")
    ap.add_argument("--sigma", type=float, default=1e-4, help="std of the LR jitter (LR in [-1, 1])")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = load_models(preset="bundled")
    graph, spec = make_graph(models, "pipeline", 64)
    cs = load_calibration(models, patches=sample_calibration(None, tile=64, scale=4, seed=0))
    hs = load_holdout(models, calibration=cs)
    feeds = cs.feeds("pipeline")
    held = [c.inputs for c in hs.cases("pipeline")]
    pq = PT2EQuant(graph, spec.example_inputs(), output_names=["sr"], rewrites="xnnpack")
    fp32 = _eager(pq.exported, ["sr"])
    sim = FakeQuantSim(pq.calibrated([], feeds)[0], pq.targets, ["sr"])
    with_constants = pq.calibrated([], feeds)[0]
    int8_add_constants(with_constants)
    sim_c = FakeQuantSim(with_constants, pq.targets, ["sr"])

    def draw(k: int) -> list[dict[str, np.ndarray]]:
        if k == 0:
            return held
        rng = np.random.default_rng(k)
        return [{n: v + rng.normal(0.0, args.sigma, v.shape).astype(v.dtype) if n == "lr" else v
                 for n, v in f.items()} for f in held]  # fmt: skip

    print("# PT2E INT8 fused pipeline: HR loss per rounding draw (bundled model, ExecuTorch rewrites)\n")
    print(f"{len(feeds)} calibration patches, {len(held)} held-out patches; draw 0 is the held-out input itself, "
          f"draws 1.. add N(0, {args.sigma:g}) to the LR (in [-1, 1]; one 8-bit step is {2 / 255:.4f}). HR loss = "
          "PSNR-Y lost against the fp32 graph on the same input, gains as 0: mean / 95 % upper bound (the search's "
          "budget is 0.30 dB on the bound).\n")  # fmt: skip
    print("| float blocks | graph | " + " | ".join(f"draw {k}" for k in range(args.draws))
          + " | mean of means | spread of means (max - min) |")  # fmt: skip
    print("|---|---|" + "---|" * args.draws + "---|---|")
    for pattern in args.floats:
        extra = sorted(u for u in pq.units() if pattern and re.search(pattern, u))
        floats = frozenset(extra) | frozenset(pq.pinned)
        converted = _eager(pq.convert(sorted(floats), feeds), ["sr"])
        graphs = {"simulator (the search's)": lambda h: sim.run(floats, h),
                  "simulator, add constants INT8": lambda h: sim_c.run(floats, h), "converted (ships)": converted}  # fmt: skip
        cells: dict[str, list[tuple[float, float]]] = {g: [] for g in graphs}
        for k in range(args.draws):
            h = draw(k)
            base = _psnr_y(fp32(h), hs.patches.hr)
            budget = HRBudget(0.3, lambda outs, base=base: base - _psnr_y(outs, hs.patches.hr))
            for g, run in graphs.items():
                loss = budget.measure(run(h))
                cells[g].append((loss.mean, loss.bound))
        label = f"`{pattern}`: {len(extra)} + {len(pq.pinned)} pinned" if pattern else f"{len(pq.pinned)} pinned"
        for g, vals in cells.items():
            means = [m for m, _ in vals]
            print(f"| {label} | {g} | " + " | ".join(f"{m:.3f} / {b:.3f}" for m, b in vals)
                  + f" | {np.mean(means):.3f} | {max(means) - min(means):.3f} |", flush=True)  # fmt: skip
    print(f"\n{time.perf_counter() - t0:.0f} s, {args.threads} threads")


if __name__ == "__main__":
    main()

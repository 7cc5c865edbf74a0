r"""Why a better student leaves the decoder's INT8 less room under the HR budget (issue #17, session 35).

The INT8 recipe search keeps a block float when INT8 there costs more PSNR-Y against HR (mean over the held-out
patches, its 95 % upper bound) than the budget allows. The same INT8 noise costs more dB on a patch the fp32
model already reconstructs well than on one it reconstructs badly. This script measures that directly: for one
or more students (the same autoencoder), on the held-out patches ``tadsr quantize`` judges recipes on, it prints
per patch

- the fp32 reference's PSNR-Y against HR;
- for each INT8 noise source, its PSNR against the fp32 output and the PSNR-Y it loses against HR.

The noise sources are simulated in PyTorch on the decoder graph (codebook search, ``post_quant_conv``, VQ
decoder), with activation ranges taken by min/max on the shipped calibration patches (each student's own
captures): ``conv_out`` (only the input of the last convolution fake-quantized, UINT8 asymmetric per tensor:
the block the searches add first), ``all`` (every convolution's input so, and every convolution's weight INT8
symmetric per output channel: close to the all-INT8 decoder). They are a fixed yardstick, not the exported
files' exact noise::

    python benchmarks/int8_headroom.py --student old_student.safetensors --student tadsr/weights/bundled_student.safetensors \
        --holdout DIR --threads 2 > benchmarks/results/int8_headroom_s35.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch


def _fake_quant_act(lo: float, hi: float):  # noqa: ANN202 - a forward pre-hook
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zero = round(-lo / scale)

    def hook(_mod: torch.nn.Module, inputs: tuple) -> tuple:
        q = torch.clamp(torch.round(inputs[0] / scale) + zero, 0, 255)
        return ((q - zero) * scale, *inputs[1:])

    return hook


def _int8_weight(w: torch.Tensor) -> torch.Tensor:
    amax = w.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (w.dim() - 1)))
    scale = amax / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def main(argv: list[str] | None = None) -> int:
    from tadsr.formats.graphs import DecoderGraph
    from tadsr.metrics import psnr, psnr_y_8bit
    from tadsr.pipeline import load_models
    from tadsr.quantize.calibration import capture, sample_calibration, sample_holdout

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, action="append", required=True, help="student checkpoint (repeat)")
    p.add_argument("--autoencoder", type=Path, help="autoencoder checkpoint (default: the shipped one)")
    p.add_argument("--holdout", type=Path, help="held-out image folder (default: tadsr quantize's)")
    p.add_argument("--patches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    calib, cinfo = sample_calibration()
    hold, hinfo = sample_holdout(args.holdout, num_patches=args.patches, calibration=calib)
    names = [Path(o.path).stem[:10] for o in hold.origins]
    print("# INT8 headroom of the decoder per held-out patch")
    print()
    print(f"{len(names)} held-out patches of {hold.lr.shape[-1]} px from {hinfo['source']} (tadsr quantize's, seed "
          f"{hinfo['seed']}); activation ranges from the {len(calib.lr)} shipped calibration patches. PSNR-Y 8-bit vs "
          "HR, 4 px border; 'vs fp32': PSNR of the simulated INT8 output against the fp32 one (range 2); 'loss': "
          "PSNR-Y lost against HR, per patch, negative = INT8 happened to help")
    print()
    labels = [f"{i} {n}" for i, n in enumerate(names)]
    rows: dict[str, list[str]] = {n: [] for n in (*labels, "mean", "sd")}
    header = ["patch"]
    for path in args.student:
        models = load_models(student=path, autoencoder=args.autoencoder, preset="bundled")
        graph = DecoderGraph(models.autoencoder).eval()
        convs = {n: m for n, m in graph.named_modules() if isinstance(m, torch.nn.Conv2d)}
        c_runs = capture(models, calib.lr, seed=cinfo["seed"], decode=False)
        h_runs = capture(models, hold.lr, seed=hinfo["seed"], decode=False)
        ranges: dict[str, list[float]] = {}

        def observe(mod: torch.nn.Module, inputs: tuple, name: str) -> None:
            r = ranges.setdefault(name, [float("inf"), float("-inf")])
            r[0], r[1] = min(r[0], inputs[0].min().item()), max(r[1], inputs[0].max().item())

        hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: observe(mod, i, n)) for n, m in convs.items()]
        with torch.no_grad():
            graph(torch.from_numpy(c_runs.x0))
        for h in hooks:
            h.remove()
        x0 = torch.from_numpy(h_runs.x0)
        with torch.no_grad():
            ref = graph(x0).numpy()
        ref_y = [psnr_y_8bit(ref[i : i + 1], hold.hr[i : i + 1]) for i in range(len(ref))]
        label = path.stem[:24]
        header.append(f"{label}: fp32 vs HR")
        for i, n in enumerate(labels):
            rows[n].append(f"{ref_y[i]:.2f}")
        rows["mean"].append(f"{statistics.mean(ref_y):.2f}")
        rows["sd"].append(f"{statistics.stdev(ref_y):.2f}")
        for source in ("conv_out", "all"):
            chosen = {"decoder.conv_out"} if source == "conv_out" else set(convs)
            saved = {n: convs[n].weight.detach().clone() for n in chosen} if source == "all" else {}
            hooks = [convs[n].register_forward_pre_hook(_fake_quant_act(*ranges[n])) for n in chosen]
            with torch.no_grad():
                for n in saved:
                    convs[n].weight.copy_(_int8_weight(saved[n]))
                out = graph(x0).numpy()
                for n, w in saved.items():
                    convs[n].weight.copy_(w)
            for h in hooks:
                h.remove()
            ys = [psnr_y_8bit(out[i : i + 1], hold.hr[i : i + 1]) for i in range(len(out))]
            vs = [psnr(out[i], ref[i], 2.0) for i in range(len(out))]
            loss = [a - b for a, b in zip(ref_y, ys, strict=True)]
            header += [f"{label}: {source} vs fp32", f"{label}: {source} loss dB"]
            for i, n in enumerate(labels):
                rows[n] += [f"{vs[i]:.2f}", f"{loss[i]:+.3f}"]
            rows["mean"] += [f"{statistics.mean(vs):.2f}", f"{statistics.mean(loss):+.3f}"]
            rows["sd"] += [f"{statistics.stdev(vs):.2f}", f"{statistics.stdev(loss):.3f}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in (*labels, "mean", "sd"):
        print(f"| {n} | " + " | ".join(rows[n]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

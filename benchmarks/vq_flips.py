"""VQ code flips at official size: `tadsr export` with upstream-format random checkpoints, flip-aware parity.

For every weight seed W, writes upstream-format checkpoints of the official networks with PyTorch's default
init (codebook N(0, 1)): a flat autoencoder file and the student wrapped in ``state_dict`` with ``module.``
prefixes, as released checkpoints are. Then, for every calibration seed C, runs::

    tadsr export --student W/TAD-SR.pth --autoencoder W/autoencoder_vq_f4.pth --format FMT --graphs pipeline \
        --tile 64 --parity-seed C --out WORK/FMT-fp32-wW-cC

and reads the artifact's manifest: per parity hop and per case (one 64 px tile each), the VQ code flips
(near-tie or not, positions, gaps), the plain PSNR against the reference (what the verdict was before the
flip analysis: < 80 dB fails) and the PSNR against the reference decoded with the artifact's codes.
Optionally the same at fp16 (``--fp16``, ONNX, calibration seed 0) and INT8 (``--int8``: ``tadsr quantize`` of
the first fp32 ONNX artifact of each weight seed, gate off so that a below-floor INT8 artifact still records its
flips). Ends with flip counts per tile and the gap distribution per precision.

Usage::

    python benchmarks/vq_flips.py --work /tmp/vqflips --weight-seeds 0 1 2 --calib-seeds 0 1 2 \
        --fp16 --int8 > benchmarks/results/vq_flips_official.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_checkpoints(seed: int, folder: Path, preset: str) -> tuple[Path, Path]:
    """Upstream-format checkpoints with PyTorch's default init (seeded): (student, autoencoder)."""
    import torch

    import tadsr
    from tadsr.models.unet_swin import UNetModelSwin
    from tadsr.models.vqgan import VQModelTorch

    folder.mkdir(parents=True, exist_ok=True)
    s_path, a_path = folder / "TAD-SR.pth", folder / "autoencoder_vq_f4.pth"
    if not (s_path.is_file() and a_path.is_file()):
        p = tadsr.get_preset(preset)
        torch.manual_seed(seed)
        student, ae = UNetModelSwin(p.unet), VQModelTorch(p.vq)  # nn.Embedding default init: N(0, 1)
        torch.save({"state_dict": {f"module.{k}": v for k, v in student.state_dict().items()}}, s_path)
        torch.save(ae.state_dict(), a_path)
    return s_path, a_path


def run(cmd: list[str], log: Path) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    tail = [ln for ln in log.read_text().splitlines() if "ERROR" in ln or "Error" in ln]
    return rc, time.perf_counter() - t0, (tail[-1] if tail else "")


def flip_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for h in manifest.get("parity", []):
        fl = h.get("flips")
        if not fl:
            continue
        for c in fl["cases"]:
            rows.append({"hop": h["hop"], "codes_from": fl["codes_from"], "floor": h["floor"]["psnr"], **c})
    return rows


def describe(tag: str, rc: int, secs: float, err: str, rows: list[dict[str, Any]]) -> list[str]:
    out = [f"## {tag}: exit {rc} ({secs:.0f} s)" + (f"  {err}" if err else "")]
    hops = dict.fromkeys(r["hop"] for r in rows)
    for hop in hops:
        rs = [r for r in rows if r["hop"] == hop]
        out.append(f"  {hop}  [codes: {rs[0]['codes_from']}]")
        for r in rs:
            old = f"old verdict {'FAIL' if (r['psnr'] or 999) < (r['floor'] or 0) else 'pass'} at {r['floor']} dB"
            out.append(f"    {r['case']:<10} {r['near_tie']:>3} near-tie / {r['not_near_tie']} other flips of "
                       f"{r['positions']} positions, max gap {r['max_gap']:.3g}; plain PSNR {r['psnr']} dB ({old}); "
                       f"same codes {r['same_codes_psnr']} dB; latent {r['latent_psnr']} dB; "
                       f"{'pass' if r['passed'] else 'FAIL'}")  # fmt: skip
    return out


def stats(label: str, rows: list[dict[str, Any]]) -> list[str]:
    """Flips per tile and the gap distribution of the end-to-end hop (reference torch -> runtime)."""
    rows = [r for r in rows if r["hop"].startswith("reference torch -> ") and "export-ready" not in r["hop"]]
    if not rows:
        return [f"{label}: no data"]
    per_tile = np.array([r["flipped"] for r in rows])
    gaps = np.array([g for r in rows for g in r["gaps"]])
    out = [f"{label}: {len(rows)} tiles of {rows[0]['positions']} positions; flips per tile: mean "
           f"{per_tile.mean():.2f}, median {np.median(per_tile):.0f}, max {per_tile.max()}, tiles with a flip "
           f"{int((per_tile > 0).sum())}/{len(rows)}; near-tie {sum(r['near_tie'] for r in rows)} of "
           f"{int(per_tile.sum())} flips; passed {sum(r['passed'] for r in rows)}/{len(rows)} tiles"]  # fmt: skip
    if gaps.size:
        edges = [0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, np.inf]
        hist, _ = np.histogram(np.abs(gaps), bins=edges)
        out.append("  |gap| of flipped positions: " + ", ".join(
            f"[{lo:g}, {hi:g}): {n}" for lo, hi, n in zip(edges[:-1], edges[1:], hist, strict=True)))  # fmt: skip
        q = np.quantile(np.abs(gaps), [0.5, 0.9, 1.0])
        out.append(f"  |gap| median {q[0]:.3g}, p90 {q[1]:.3g}, max {q[2]:.3g} (n = {gaps.size})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--preset", default="official-x4")
    ap.add_argument("--weight-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--formats", nargs="+", default=["onnx"])
    ap.add_argument("--fp16", action="store_true", help="also ONNX fp16, calibration seed of the first run")
    ap.add_argument("--int8", action="store_true", help="also tadsr quantize of the first fp32 ONNX artifact")
    ap.add_argument("--fp16-only", action="store_true", help="only the fp16 exports (every weight seed)")
    ap.add_argument("--int8-patches", type=int, default=8)
    ap.add_argument("--start-before", default=None, metavar="HH:MM",
                    help="UTC time after which no new job starts (the jobs not run are listed)")  # fmt: skip
    ap.add_argument("--keep-files", action="store_true", help="keep the model files of every artifact")
    args = ap.parse_args(argv)
    exe = [sys.executable, "-m", "tadsr.cli"]
    print(f"# python benchmarks/vq_flips.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# preset {args.preset}, tile 64, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, "
          "upstream-format checkpoints, PyTorch default init, codebook N(0, 1)")  # fmt: skip
    by_prec: dict[str, list[dict[str, Any]]] = {"fp32": [], "fp16": [], "int8": []}
    summary: list[tuple[str, int]] = []
    c0 = args.calib_seeds[0]
    # breadth first: a Latin square (every weight seed and every calibration seed once), then fp16, then the
    # rest of the weight x calibration matrix, then INT8
    ws, cs = args.weight_seeds, args.calib_seeds
    square = [(ws[i], cs[i % len(cs)]) for i in range(len(ws))]
    jobs = [("export", fmt, "fp32", w, c) for w, c in square for fmt in args.formats]
    jobs += [("export", "onnx", "fp16", w, c0) for w in args.weight_seeds[:1] if args.fp16]
    jobs += [("export", fmt, "fp32", w, c) for c in cs for fmt in args.formats for w in ws if (w, c) not in square]
    jobs += [("quantize", "onnx", "int8", w, c0) for w in args.weight_seeds[:1] if args.int8]
    jobs += [("export", "onnx", "fp16", w, c0) for w in args.weight_seeds[1:] if args.fp16]
    jobs += [("quantize", "onnx", "int8", w, c0) for w in args.weight_seeds[1:] if args.int8]
    if args.fp16_only:
        jobs = [("export", "onnx", "fp16", w, c0) for w in ws]
    skipped = []
    for verb, fmt, prec, w, c in jobs:
        tag = f"{fmt}-{prec}-w{w}-c{c}" if verb == "export" else f"onnx-int8-w{w}"
        done = sorted((args.work / tag).glob("*/manifest.json")) and (args.work / f"{tag}.log").is_file()
        if not done and args.start_before and time.strftime("%H:%M", time.gmtime()) >= args.start_before:
            skipped.append(f"{verb} {fmt}-{prec}-w{w}-c{c}")
            continue
        s_path, a_path = make_checkpoints(w, args.work / f"ckpt-w{w}", args.preset)
        if verb == "export":
            out = args.work / tag
            cmd = [*exe, "export", "--student", str(s_path), "--autoencoder", str(a_path), "--graphs", "pipeline",
                   "--tile", "64", "--no-progress", "--format", fmt, "--precision", prec, "--parity-seed", str(c),
                   "--out", str(out)]  # fmt: skip
            title = f"tadsr export --format {fmt} --precision {prec} --parity-seed {c} (weights {w})"
        else:
            parent = args.work / f"onnx-fp32-w{w}-c{c0}" / "pipeline-onnx-fp32-t64"
            out = args.work / tag
            cmd = [*exe, "quantize", str(parent), "--out", str(out), "--num-patches", str(args.int8_patches),
                   "--holdout-patches", "4", "--sensitivity-budget", "1", "--sensitivity-patches", "1",
                   "--no-parity-gate"]  # fmt: skip
            title = f"tadsr quantize (INT8, {args.int8_patches} calibration patches, gate off) of onnx-fp32-w{w}-c{c0}"
        mfs = sorted(out.glob("*/manifest.json"))
        if mfs and (args.work / f"{tag}.log").is_file():  # done by an earlier invocation with the same --work
            log = (args.work / f"{tag}.log").read_text()
            rc, secs, err = (0 if "parity" in log and " pass" in log.splitlines()[-5:][-1] else 1), math.nan, ""
            title += f" [reused: artifact and log of an earlier invocation in {out}]"
        else:
            rc, secs, err = run(cmd, args.work / f"{tag}.log")
            mfs = sorted(out.glob("*/manifest.json"))
        rows = flip_rows(json.loads(mfs[0].read_text())) if mfs else []
        by_prec[prec] += rows
        summary.append((tag, rc))
        print("\n".join(describe(title, rc, secs, err, rows)), flush=True)
        if not args.keep_files and not (verb == "export" and prec == "fp32" and c == c0 and args.int8):
            for f in out.glob("*/*.onnx*"):
                f.unlink()
    print("\n# flips per 64 px tile and gap distribution (end-to-end hop, reference torch -> runtime)")
    for prec, rows in by_prec.items():
        print("\n".join(stats(prec, rows)))
    print("\n# exit codes: " + ", ".join(f"{t} {rc}" for t, rc in summary))
    if skipped:
        print(f"# not run (--start-before {args.start_before} UTC reached): {', '.join(skipped)}")
    return 0 if all(rc == 0 for t, rc in summary if "int8" not in t) else 1


if __name__ == "__main__":
    raise SystemExit(main())

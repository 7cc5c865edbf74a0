"""Light autoencoder vs the VQ-f4 one: FLOPs per stage, ONNX Runtime latency, fidelity on held-out photos.

Prints one markdown report (redirect it into ``benchmarks/results/``):

1. FLOPs per 64-px LR tile (``torch.utils.flop_counter``; a multiply-add counts 2) of encoder / denoiser / decoder,
   full vs light, for the bundled and the official-x4 sizes (random weights for official).
2. Bundled, ONNX Runtime fp32, ``--threads`` intra-op threads: median latency per 64-px tile of the fused pipeline
   and of the encoder / decoder components, full vs light (every artifact exported by ``export_model`` and passing
   its parity hops against its own torch reference); one 256x256 LR image through the tiler (overlap 16).
3. Bundled, PyTorch reference: PSNR-Y / SSIM-Y vs HR (4-px border, 8-bit outputs), and LR consistency (PSNR-RGB of
   MATLAB-bicubic /4 of the output vs the LR input) on 64-px LR crops of the photo set's ``val`` split (never used
   to train the bundled model nor the light autoencoder), for bicubic, the full and the light pipelines (same noise).
   Writes a comparison grid (HR | bicubic | full | light) to ``--grid``.
4. Official size (random weights): PyTorch eager latency of the encoder / decoder, full vs light; ONNX Runtime
   latency of the light encoder / decoder; ONNX Runtime latency of the fused pipeline, full vs light (the full one's
   export takes minutes and ~8 GB; exported artifacts in ``--work`` are reused when their weights match).

    python benchmarks/light_ae.py --photos data/photos --work /tmp/light_bench > benchmarks/results/light_ae_bundled.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger("tadsr.benchmarks.light_ae")


def _flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def stage_flops(models: Any, tile: int = 64) -> dict[str, dict[str, float]]:
    """GFLOPs of encoder / denoiser / decoder for one tile, full and light."""
    from tadsr.models.ops import bicubic_x4_reference
    from tadsr.pipeline import OneStepPipeline

    lr = torch.zeros(1, 3, tile, tile)
    z = torch.zeros(1, models.preset.vq.embed_dim, tile, tile)
    pipe = OneStepPipeline(models)
    ae, light = models.autoencoder, models.light_autoencoder
    full = {
        "encoder": _flops(lambda: ae.encode(bicubic_x4_reference(lr))),
        "denoiser": _flops(lambda: pipe.denoise(z, z, lr)),
        "decoder": _flops(lambda: ae.decoder(ae.post_quant_conv(z))),
    }
    lite = {"encoder": _flops(lambda: light.encode(lr)), "denoiser": full["denoiser"],
            "decoder": _flops(lambda: light.decoder(z))}  # fmt: skip
    return {"full": {k: v / 1e9 for k, v in full.items()}, "light": {k: v / 1e9 for k, v in lite.items()}}


def _median_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    from tadsr.bench.systems import time_calls

    return float(time_calls(fn, warmup=warmup, runs=reps)["median_ms"])


def _ort(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        shape = [int(d) for d in i.shape]
        out[i.name] = (g.uniform(-1, 1, shape) if i.name == "lr" else g.standard_normal(shape)).astype(np.float32)
    return out


def onnx_latency(models_full: Any, models_light: Any, work: Path, threads: int, reps: int) -> tuple[str, dict]:
    """Export (with parity) and time the fused pipeline and encoder/decoder components, full vs light."""
    from tadsr.export.api import export_model
    from tadsr.runtime.tiling import upscale_tiled

    rows: dict[str, dict[str, Any]] = {}
    for tag, m in (("full", models_full), ("light", models_light)):
        arts = _reusable(work / tag, m.sources)
        todo = [g for g in ("pipeline", "encoder", "decoder") if g not in arts]
        if todo:
            export_model(m, formats=("onnx",), graphs=todo, tile=64, out_dir=work / tag, n_real=1)
            arts = _reusable(work / tag, m.sources)
        for g, (path, man) in arts.items():
            worst = min(man["parity"], key=lambda h: h["psnr"])
            sess = _ort(path, threads)
            feeds = _feeds(sess)
            ms = _median_ms(lambda s=sess, f=feeds: s.run(None, f), reps)
            rows[f"{tag}-{g}"] = {"ms": ms, "mb": sum(f["bytes"] for f in man["files"]) / 1e6, "path": path,
                                  "parity": f"{worst['hop']}: {worst['psnr']:.1f} dB", "passed": man["parity_passed"]}
    img = {}
    lr = np.random.default_rng(1).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    for tag in ("full", "light"):
        sess = _ort(rows[f"{tag}-pipeline"]["path"], threads)

        def run(x: np.ndarray, n: np.ndarray, s: Any = sess) -> np.ndarray:
            return s.run(None, {"lr": x, "noise": n})[0]

        t0 = time.perf_counter()
        upscale_tiled(lr, run, tile=64, scale=4, overlap=16, seed=0)
        img[tag] = 1e3 * (time.perf_counter() - t0)
    lines = ["| graph | full ms | light ms | full / light | full MB | light MB | worst parity hop (full; light) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for g in ("pipeline", "encoder", "decoder"):
        f, li = rows[f"full-{g}"], rows[f"light-{g}"]
        lines.append(f"| {g} | {f['ms']:.1f} | {li['ms']:.1f} | {f['ms'] / li['ms']:.2f}x | {f['mb']:.2f} | "
                     f"{li['mb']:.2f} | {f['parity']}; {li['parity']} |")  # fmt: skip
    lines.append(f"| 256x256 LR image (tiled, 25 tiles) | {img['full']:.0f} | {img['light']:.0f} | "
                 f"{img['full'] / img['light']:.2f}x | | | |")  # fmt: skip
    return "\n".join(lines), {"rows": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in rows.items()},
                              "image_ms": img}  # fmt: skip


def _reusable(folder: Path, sources: dict[str, Any], passed: bool = True) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Artifacts in ``folder`` exported from exactly these weights (and, with ``passed``, passing their parity hops):
    graph -> (model file, manifest)."""
    import json

    out = {}
    for g in ("pipeline", "encoder", "decoder"):
        d = folder / f"{g}-onnx-fp32-t64"
        if (d / "manifest.json").is_file():
            man = json.loads((d / "manifest.json").read_text())
            if man.get("sources") == sources and (man.get("parity_passed") or not passed):
                out[g] = (d / man["files"][0]["name"], man)
    return out


def _lr_consistency(sr_u8: np.ndarray, lr_u8: np.ndarray) -> float:
    from tadsr.imresize import imresize
    from tadsr.metrics import psnr

    down = imresize(sr_u8.astype(np.float64) / 255.0, 0.25)
    return psnr(np.clip(down, 0, 1), lr_u8.astype(np.float64) / 255.0, 1.0)


@torch.no_grad()
def fidelity(models_full: Any, models_light: Any, photos: Path, max_per_image: int, grid: Path | None) -> str:
    """PSNR-Y / SSIM-Y vs HR and LR consistency on val crops: bicubic, full, light."""
    from PIL import Image

    from tadsr.imresize import imresize
    from tadsr.metrics import crop_border, psnr, rgb_to_y, ssim
    from tadsr.pipeline import OneStepPipeline, make_noise
    from tadsr.train.data import grid_crops, load_pairs, to_unit

    pairs = load_pairs(photos, "val", min_side=256)
    hr, lr, labels = grid_crops(pairs, 256, max_per_image=max_per_image)
    pipes = {"full": OneStepPipeline(models_full), "light": OneStepPipeline(models_light)}
    scores: dict[str, dict[str, list[float]]] = {k: {"psnr": [], "ssim": [], "lrc": []} for k in
                                                 ("bicubic", "full", "light")}  # fmt: skip
    shown: list[np.ndarray] = []
    for i in range(len(hr)):
        hr_img = hr[i].transpose(1, 2, 0)
        lr_img = lr[i].transpose(1, 2, 0)
        outs = {"bicubic": np.clip(np.round(imresize(lr_img.astype(np.float64), 4.0)), 0, 255).astype(np.uint8)}
        x = to_unit(lr[i : i + 1])
        noise = make_noise((1, 3, 64, 64), 1000 + i)
        for k, p in pipes.items():
            sr = p(x, noise=noise)[0].numpy().transpose(1, 2, 0)
            outs[k] = np.clip(np.round((sr + 1) * 127.5), 0, 255).astype(np.uint8)
        ref_y = crop_border(rgb_to_y(hr_img / 255.0), 4)
        for k, o in outs.items():
            y = crop_border(rgb_to_y(o / 255.0), 4)
            scores[k]["psnr"].append(psnr(y, ref_y, 1.0))
            scores[k]["ssim"].append(ssim(y * 255.0, ref_y * 255.0, 255.0))
            scores[k]["lrc"].append(_lr_consistency(o, lr_img))
        if len(shown) < 4 and i % max(1, len(hr) // 4) == 0:
            shown.append(np.concatenate([hr_img, outs["bicubic"], outs["full"], outs["light"]], axis=1))
    if grid is not None and shown:
        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(shown, axis=0)).save(grid)
    lines = [f"{len(hr)} crops (256 px HR / 64 px LR) of {len(pairs)} val photos: {', '.join(pairs.names)}", "",
             "| system | PSNR-Y dB | SSIM-Y | LR consistency dB | PSNR-Y vs full dB |", "|---|---|---|---|---|"]
    full_p = np.array(scores["full"]["psnr"])
    for k, s in scores.items():
        d = np.array(s["psnr"]) - full_p
        lines.append(f"| {k} | {np.mean(s['psnr']):.2f} | {np.mean(s['ssim']):.4f} | {np.mean(s['lrc']):.2f} | "
                     f"{d.mean():+.2f} (min {d.min():+.2f}, max {d.max():+.2f}) |")  # fmt: skip
    return "\n".join(lines)


def official(threads: int, reps: int, work: Path) -> str:
    """Official size, random weights: eager latency per stage full vs light; ONNX latency of the light components and
    of the fused pipelines, full vs light (each exported by ``export_model`` with its parity hops)."""
    from tadsr.export.api import export_model
    from tadsr.models.ops import bicubic_x4_reference
    from tadsr.pipeline import load_models

    m = load_models(preset="official-x4", init="random", light_autoencoder=True)
    fl = stage_flops(m)
    lr = torch.rand(1, 3, 64, 64) * 2 - 1
    z = torch.randn(1, 3, 64, 64)
    ae, light = m.autoencoder, m.light_autoencoder
    with torch.no_grad():
        eager = {
            "full encoder": _median_ms(lambda: ae.encode(bicubic_x4_reference(lr)), reps),
            "full decoder": _median_ms(lambda: ae.decode(z, chunk=4096), reps),
            "light encoder": _median_ms(lambda: light.encode(lr), reps),
            "light decoder": _median_ms(lambda: light.decode(z, chunk=4096), reps),
        }
    onnx_ms: dict[str, tuple[float, float, bool]] = {}
    full = load_models(preset="official-x4", init="random")
    for tag, models, graphs in (("light", m, ("encoder", "decoder", "pipeline")), ("full", full, ("pipeline",))):
        folder = work / f"official-{tag}"
        arts = _reusable(folder, models.sources, passed=False)
        todo = [g for g in graphs if g not in arts]
        if todo:  # random weights: timed whatever the parity verdict, which the table reports
            logger.warning("exporting official-size %s %s (minutes)", tag, todo)
            export_model(models, formats=("onnx",), graphs=todo, tile=64, out_dir=folder, n_real=1, parity_gate=False)
            arts = _reusable(folder, models.sources, passed=False)
        for g in graphs:
            path, man = arts[g]
            sess = _ort(path, threads)
            feeds = _feeds(sess)
            ms = _median_ms(lambda s=sess, f=feeds: s.run(None, f), reps)
            onnx_ms[f"{tag} {g}"] = (ms, sum(f["bytes"] for f in man["files"]) / 1e6, bool(man["parity_passed"]))
            del sess
    lines = [_flops_table("official-x4", fl), "",
             "| stage | full eager ms | light eager ms | full / light | light ONNX ms | light ONNX MB | parity |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in ("encoder", "decoder"):
        f, li = eager[f"full {s}"], eager[f"light {s}"]
        o = onnx_ms[f"light {s}"]
        lines.append(f"| {s} | {f:.0f} | {li:.1f} | {f / li:.1f}x | {o[0]:.1f} | {o[1]:.2f} | "
                     f"{'pass' if o[2] else 'FAIL'} |")  # fmt: skip
    f, li = onnx_ms["full pipeline"], onnx_ms["light pipeline"]
    lines += ["", "| fused pipeline, ONNX Runtime fp32 | full ms | light ms | full / light | full MB | light MB | parity |",
              "|---|---|---|---|---|---|---|",
              f"| 64-px LR tile | {f[0]:.0f} | {li[0]:.0f} | {f[0] / li[0]:.2f}x | {f[1]:.1f} | {li[1]:.1f} | "
              f"{'pass' if f[2] and li[2] else 'FAIL'} |"]  # fmt: skip
    return "\n".join(lines)


def _flops_table(name: str, fl: dict[str, dict[str, float]]) -> str:
    f, li = fl["full"], fl["light"]
    ae_f, ae_l = f["encoder"] + f["decoder"], li["encoder"] + li["decoder"]
    rows = [f"FLOPs per 64-px LR tile, preset {name} (GFLOPs; multiply-add = 2):", "",
            "| | encoder | denoiser | decoder | total | encoder + decoder |", "|---|---|---|---|---|---|",
            f"| full | {f['encoder']:.2f} | {f['denoiser']:.2f} | {f['decoder']:.2f} | {sum(f.values()):.2f} | {ae_f:.2f} |",
            f"| light | {li['encoder']:.2f} | {li['denoiser']:.2f} | {li['decoder']:.2f} | {sum(li.values()):.2f} | "
            f"{ae_l:.2f} |",
            f"| light / full | {li['encoder'] / f['encoder']:.3f} | 1 | {li['decoder'] / f['decoder']:.3f} | "
            f"{sum(li.values()) / sum(f.values()):.3f} | {ae_l / ae_f:.3f} |"]  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="photo set (python -m tadsr.train.photos DIR); val split")
    ap.add_argument("--light-autoencoder", type=Path, help="light weights (default: the shipped bundled ones)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the exported artifacts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-per-image", type=int, default=8)
    ap.add_argument("--grid", type=Path, help="write the comparison grid PNG here")
    ap.add_argument("--skip", nargs="*", default=[], choices=["onnx", "fidelity", "official"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from tadsr.pipeline import load_models

    full = load_models(preset="bundled")
    light = load_models(preset="bundled", light_autoencoder=args.light_autoencoder or True)
    print("# Light autoencoder vs VQ-f4 (benchmarks/light_ae.py)\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{[round(x, 2) for x in os.getloadavg()]} at start; torch {torch.__version__}; threads {args.threads}")
    print(f"- light autoencoder: {light.sources['light_autoencoder']}")
    print(f"- autoencoder: {full.sources['autoencoder']}; student: {full.sources['student']}\n")
    print("## FLOPs\n")
    print(_flops_table("bundled", stage_flops(light)) + "\n")
    if "onnx" not in args.skip:
        print(f"## Bundled, ONNX Runtime fp32, {args.threads} thread(s), median of {args.reps} per 64-px tile\n")
        table, _ = onnx_latency(full, light, args.work, args.threads, args.reps)
        print(table + "\n", flush=True)
    if "fidelity" not in args.skip:
        print("## Bundled, fidelity on held-out photos (PyTorch reference, fp32)\n")
        print(fidelity(full, light, args.photos, args.max_per_image, args.grid) + "\n", flush=True)
    if "official" not in args.skip:
        print(f"## Official size (random weights), {args.threads} thread(s), median of {args.reps}\n")
        print(official(args.threads, args.reps, args.work) + "\n")
    print(f"load average at end {[round(x, 2) for x in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

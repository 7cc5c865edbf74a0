"""Autoencoder reconstruction ceiling of the bundled VQ-f4 against bicubic x4, per architecture variant.

Every latent SR method (teacher, student, any INT8 file) is capped by ``decode(encode(HR))``: on the held-out
crops the shipped bundled autoencoder reaches 33.45 dB Y-PSNR where bicubic x4 reaches 35.50 dB, so no student
decoded by it can beat bicubic (issue #8's target). This script trains autoencoder variants with one recipe
(the ``gpu`` recipe's stage 1, same steps / time limit for every variant) and scores, on the same held-out crops
as ``tadsr.train.validate``:

* ``quantised``: the pipeline's decode (nearest codebook entry, as upstream ResShift decodes);
* ``unquantised``: the decoder on the continuous latent (what the architecture could reach without the
  codebook; an upper bound, not something the pipeline runs);
* codebook usage on the crops, parameters and fp32 weight size (issue #8 caps a weight file at 15 MB).

Variants are ``key=value[,key=value]`` overrides of the preset's ``VQConfig`` (``n_embed``, ``ch``,
``num_res_blocks``, ``ch_mult``). Prints a table and writes ``--out/ae_ceiling.json``.

Usage (a GPU machine; CPU works but takes hours)::

    python benchmarks/ae_ceiling.py --photos data/photos --device cuda --minutes 2.5 \\
        --variants n_embed=4096 n_embed=65536 n_embed=65536,num_res_blocks=2 --out runs/ae_ceiling
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tadsr.train.autoencoder import train_autoencoder
from tadsr.train.build_bundled import RECIPES
from tadsr.train.common import chunks, init_distributed, setup_logging
from tadsr.train.data import grid_crops, load_pairs, to_unit
from tadsr.train.validate import _bicubic, _score, _to_uint8

from tadsr.config import get_preset
from tadsr.models.vqgan import VQModelTorch

log = logging.getLogger("ae_ceiling")


def parse_variant(text: str) -> dict[str, object]:
    """``n_embed=65536,num_res_blocks=2`` -> dict (values parsed as Python literals; ch_mult as a tuple)."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = ast.literal_eval(value.replace(":", ","))  # ch_mult=(1:2:4)
    return out


@torch.no_grad()
def score(model: VQModelTorch, hr: np.ndarray, device: torch.device, batch: int = 8) -> dict[str, float]:
    """Mean PSNR / SSIM on Y of the quantised and unquantised reconstructions; codebook usage on the crops."""
    model.eval()
    quant, cont, used = [], [], set()
    for sl in chunks(len(hr), batch):
        x = to_unit(hr[sl], device)
        z = model.encode(x)
        idx = model.quantize.indices(z.float())
        used.update(idx.flatten().tolist())
        quant.append(_to_uint8(model.decode(z, chunk=4096).clamp(-1, 1)))
        cont.append(_to_uint8(model.decode(z, force_not_quantize=True).clamp(-1, 1)))
    hr_nhwc = hr.transpose(0, 2, 3, 1)
    res: dict[str, float] = {}
    for name, outs in (("quantised", np.concatenate(quant)), ("unquantised", np.concatenate(cont))):
        s = np.array([_score(a, b) for a, b in zip(outs, hr_nhwc, strict=True)])
        res[f"{name}_psnr_y"] = round(float(s[:, 0].mean()), 3)
        res[f"{name}_ssim_y"] = round(float(s[:, 1].mean()), 4)
    res["codes_used_on_val"] = len(used)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/ae_ceiling"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=2.5, help="training wall-clock limit per variant")
    ap.add_argument("--steps", type=int, help="step limit per variant (default: the gpu recipe's)")
    ap.add_argument("--variants", nargs="+", default=["n_embed=4096", "n_embed=65536"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    setup_logging(False)
    torch.set_num_threads(args.threads)
    _, device = init_distributed(args.device)
    preset = get_preset("bundled")
    train = load_pairs(args.photos, "train", min_side=256)
    val = load_pairs(args.photos, "val", min_side=256)
    hr, lr, _ = grid_crops(val, 256, 8)
    bicubic = np.array([_score(a, b) for a, b in zip(_bicubic(lr), hr.transpose(0, 2, 3, 1), strict=True)])
    rows = [{"variant": "bicubic x4", "quantised_psnr_y": round(float(bicubic[:, 0].mean()), 3),
             "quantised_ssim_y": round(float(bicubic[:, 1].mean()), 4)}]  # fmt: skip
    log.info("%d val crops; bicubic %.2f dB", len(hr), rows[0]["quantised_psnr_y"])
    base = RECIPES["gpu"].ae
    for text in args.variants:
        over = parse_variant(text)
        vq = dataclasses.replace(preset.vq, **over)
        cfg = dataclasses.replace(
            base, time_limit_s=60.0 * args.minutes, **({"steps": args.steps} if args.steps else {})
        )
        t0 = time.perf_counter()
        res = train_autoencoder(cfg, train, args.out / text.replace(",", "_"), device, vq_cfg=vq, resume=False)
        model = VQModelTorch(vq).to(device)
        model.load_state_dict(load_file(str(res.weights)))
        params = sum(p.numel() for p in model.parameters())
        row = {"variant": text, "params": params, "fp32_mb": round(4 * params / 1e6, 2), "steps": res.steps,
               "train_s": round(res.seconds, 1), **score(model, hr, device),
               "train_psnr_rgb_last": round(float(res.metrics.get("psnr_rgb", float("nan"))), 3)}  # fmt: skip
        rows.append(row)
        log.info("%s: %s (%.0f s)", text, row, time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ae_ceiling.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=2) + "\n")
    print(f"{'variant':34s} {'params':>9s} {'MB':>6s} {'steps':>6s} {'quant Y':>8s} {'cont Y':>8s} {'codes':>6s}")
    for r in rows:
        print(
            f"{r['variant']:34s} {r.get('params', ''):>9} {r.get('fp32_mb', ''):>6} {r.get('steps', ''):>6} "
            f"{r['quantised_psnr_y']:>8} {r.get('unquantised_psnr_y', ''):>8} {r.get('codes_used_on_val', ''):>6}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

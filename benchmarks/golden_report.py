"""Print the max abs error of every golden case (shared/golden) for the tiny and full configurations.

Usage: python benchmarks/golden_report.py [--golden ../shared/golden] [--tags tiny full]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import tadsr
from tadsr.config import SCHEDULES
from tadsr.schedule import make_schedule
from tadsr.models.ops import BicubicUpsample, bicubic_x4_reference

PRESET = {"tiny": "tiny", "full": "official-x4"}


def report(golden: Path, tag: str) -> dict[str, float]:
    g = np.load(golden / f"resshift_{tag}.npz")
    t = lambda k: torch.from_numpy(g[k])  # noqa: E731
    err = lambda a, k: float((a.double() - t(k).double()).abs().max())  # noqa: E731
    m = tadsr.load_models(preset=PRESET[tag], init="random")
    m.teacher = m.student
    out: dict[str, float] = {}
    for v in ("v1", "v3"):
        s = make_schedule(SCHEDULES[v])
        out[f"schedule_{v}"] = max(float(np.abs(getattr(s, k) - g[f"schedule_{v}/{k}"]).max())
                                  for k in ("sqrt_etas", "etas", "posterior_variance", "posterior_mean_coef1",
                                            "posterior_mean_coef2", "posterior_log_variance_clipped"))
    with torch.no_grad():
        for c in ("unet_64x64_t14", "unet_64x128_t3"):
            out[c] = err(m.student(t(f"{c}/x"), t(f"{c}/t"), t(f"{c}/lq")), f"{c}/out")
        out["vq_encode_256"] = err(m.autoencoder.encode(t("vq_encode_256/image")), "vq_encode_256/latent")
        z = t("vq_decode_64/latent")
        out["vq_decode_64_codes_differing"] = float((m.autoencoder.quantize.indices(z) != t("vq_decode_64/codes")).sum())
        out["vq_decode_64"] = err(m.autoencoder.decode(z), "vq_decode_64/image")
        out["bicubic_x4"] = err(bicubic_x4_reference(t("bicubic_x4/lr")), "bicubic_x4/up")
        out["bicubic_x4_polyphase"] = err(BicubicUpsample(4)(t("bicubic_x4/lr")), "bicubic_x4/up")
    out["one_step_v1"] = err(tadsr.OneStepPipeline(m)(t("one_step_v1/lr"), t("one_step_v1/noise")), "one_step_v1/sr")
    for v, steps in (("v1", 15), ("v3", 4)):
        sr = tadsr.TeacherPipeline(m, steps=steps)(t(f"teacher_{v}/lr"), t(f"teacher_{v}/noises"))
        out[f"teacher_{v}"] = err(sr, f"teacher_{v}/sr")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden")
    ap.add_argument("--tags", nargs="+", default=["tiny", "full"])
    args = ap.parse_args()
    for tag in args.tags:
        t0 = time.perf_counter()
        res = report(args.golden, tag)
        print(json.dumps({"tag": tag, "seconds": round(time.perf_counter() - t0, 1), "max_abs": res}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark verdicts: the do-nothing baseline and the sanity judgement of each system, and the ratios between
systems (:func:`compute_ratios`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tadsr.bench.config import BenchConfig, BenchImage, SystemResult
from tadsr.bench.data import output_fidelity
from tadsr.bench.systems import DoNothingSystem, fixed_name
from tadsr.metrics import sanity_failures

logger = logging.getLogger(__name__)


def do_nothing_baseline(
    models: Any, images: Sequence[BenchImage], tile: int, cfg: BenchConfig, color_fix: str = "none"
) -> dict[str, Any]:
    """Fidelity of ``decode(encode(bicubic(LR)))`` through the reference autoencoder, same tiler and tiles, with
    ``color_fix`` on its output (the floor of the systems with that fix)."""
    system = DoNothingSystem(models, color_fix)
    system.load()
    per_image = []
    for im in images:
        sr = system.upscale(im.lr, tile=tile, overlap=cfg.overlap, seed=cfg.seed)
        per_image.append({"image": im.name, **output_fidelity(sr, im.hr, None, system.scale, im.lr)})
    system.close()
    keys = [k for k in per_image[0] if k != "image"]
    mean = {k: round(float(np.mean([p[k] for p in per_image])), 4) for k in keys}
    mean["lr_cons_worst"] = round(float(min(p["lr_cons"] for p in per_image)), 4)
    name = fixed_name("do-nothing baseline", color_fix)
    logger.info("%s: PSNR-Y %.2f dB, LR consistency %.2f dB", name, mean["psnr_y"], mean["lr_cons"])
    fix = "" if color_fix == "none" else f", colour fix {color_fix}"
    return {"note": f"decode(encode(bicubic x4(LR))) through the reference autoencoder, no denoiser{fix}",
            "color_fix": color_fix, "mean": mean, "images": per_image}  # fmt: skip


def baseline_key(color_fix: str) -> str:
    """Where ``report["baselines"]`` keeps the do-nothing floor of systems with ``color_fix``."""
    return fixed_name("do_nothing", color_fix)


def judge_sanity(results: Sequence[SystemResult], baselines: Mapping[str, Mapping[str, Any]]) -> None:
    """``fidelity["sanity"] = {"fail": bool, "reasons": [...]}`` for every system with fidelity numbers; a model
    must beat the do-nothing baseline with its own colour fix (``baselines[baseline_key(fix)]``)."""
    for r in results:
        if not r.fidelity or "images" not in r.fidelity:
            continue
        do_nothing = baselines.get(baseline_key(r.color_fix))
        dn = do_nothing["mean"]["psnr_y"] if do_nothing else None
        lr_cons = [p["lr_cons"] for p in r.fidelity["images"] if "lr_cons" in p]
        is_model = r.kind != "bicubic"
        reasons = sanity_failures(lr_cons, r.fidelity["mean"]["psnr_y"] if is_model else None, dn if is_model else None)
        r.fidelity["sanity"] = {"fail": bool(reasons), "reasons": reasons}
        if reasons:
            logger.warning("%s FAILS the sanity checks: %s", r.name, "; ".join(reasons))


# ------------------------------------------------------------------------------------------------------ ratios


def _lat_ratio(num: SystemResult, den: SystemResult) -> dict[str, float]:
    return {
        k: round(num.latency[k]["median_ms"] / den.latency[k]["median_ms"], 4)
        for k in num.latency
        if k in den.latency and den.latency[k]["median_ms"] > 0
    }


def _delta(num: SystemResult, den: SystemResult, key: str) -> float | None:
    a, b = num.fidelity.get("mean", {}).get(key), den.fidelity.get("mean", {}).get(key)
    return None if a is None or b is None else round(a - b, 4)


def compute_ratios(results: Sequence[SystemResult]) -> dict[str, Any]:
    """Latency ratios of medians (numerator / denominator, per stage and ``e2e``) and fidelity deltas.

    ``student_vs_teacher``: torch-student / teacher (< 1: the student is faster); ``export_vs_eager``: each float
    artifact / torch-student; ``int8_vs_fp32``: each INT8 artifact / the fp32 artifact of the same format and layout.
    """
    ok = [r for r in results if r.status == "ok" and r.latency]
    student = next((r for r in ok if r.name == "torch-student"), None)
    teacher = next((r for r in ok if r.name.startswith("torch-teacher")), None)
    out: dict[str, Any] = {"student_vs_teacher": None, "export_vs_eager": [], "int8_vs_fp32": []}
    if student and teacher:
        lat = _lat_ratio(student, teacher)
        out["student_vs_teacher"] = {
            "numerator": student.name,
            "denominator": teacher.name,
            "latency": lat,
            "speedup_e2e": round(1.0 / lat["e2e"], 3) if lat.get("e2e") else None,
            "psnr_y_delta_db": _delta(student, teacher, "psnr_y"),
            "ssim_y_delta": _delta(student, teacher, "ssim_y"),
        }
    artifacts = [r for r in ok if r.kind == "artifact"]
    for r in artifacts:
        if r.precision != "int8" and student:
            out["export_vs_eager"].append(
                {
                    "numerator": r.name,
                    "denominator": student.name,
                    "simulator": r.simulator,
                    "latency": _lat_ratio(r, student),
                    "psnr_y_delta_db": _delta(r, student, "psnr_y"),
                }
            )
        if r.precision == "int8":
            fp = next(
                (
                    f
                    for f in artifacts
                    if f.precision == "fp32"
                    and f.format == r.format
                    and f.layout == r.layout
                    and f.simulator == r.simulator
                ),
                None,
            )
            if fp is not None:
                out["int8_vs_fp32"].append(
                    {
                        "numerator": r.name,
                        "denominator": fp.name,
                        "simulator": r.simulator,
                        "latency": _lat_ratio(r, fp),
                        "size": round(r.size_bytes / fp.size_bytes, 4) if r.size_bytes and fp.size_bytes else None,
                        "psnr_y_delta_db": _delta(r, fp, "psnr_y"),
                        "parity_psnr_delta_db": _delta(r, fp, "parity_psnr"),
                    }
                )
    return out

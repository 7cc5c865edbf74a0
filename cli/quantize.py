"""``tadsr quantize``: the thin CLI layer over :func:`tadsr.quantize.api.quantize_artifact`.

The main CLI (:mod:`tadsr.cli`) registers the subcommand with :func:`add_quantize_parser` and dispatches to
:func:`run_quantize`; it configures logging and turns :class:`~tadsr.errors.TadsrError` (bad folders, empty or
unreadable calibration images, too few images, images smaller than a patch, bad recipes) into exit status 2, and a
parity failure (:class:`~tadsr.errors.ParityError`) into 1. ARTIFACT_DIR may also be the folder ``tadsr export``
wrote when it holds exactly one fp32 artifact.
This module prints only the final summary table (to stdout).

Examples::

    tadsr quantize out/pipeline-onnx-fp32-t64 --out out/
    tadsr quantize out/encoder-executorch-fp32-t64 --calib DIV2K/ --num-patches 64 --seed 0 --out out/
    tadsr quantize out/decoder-onnx-fp32-t64 --recipe out/decoder-onnx-int8-t64/recipe.json --out out/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_quantize_parser", "run_quantize", "format_summary"]

logger = logging.getLogger(__name__)


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``quantize`` subcommand to ``subparsers``; sets ``func=run_quantize``."""
    from tadsr.quantize.api import DEFAULT_HR_BUDGET_DB, HR_CONFIDENCE, METHODS

    p = subparsers.add_parser(
        "quantize",
        help="INT8 post-training quantization of an fp32 artifact, calibrated on real image patches",
        description="Make <out>/<graph>-<format>-int8-t<tile>/ (and <graph>-coreml-w8-t<tile>/ for Core ML) from "
        "an fp32 artifact folder: calibration on real LR patches pushed through the reference pipeline, an "
        "automatic float/INT8 recipe (recipe.json) meeting a PSNR floor on held-out patches, parity vs the fp32 "
        "artifact. Exit status 2 on bad input (folders, images, recipe), 1 when parity fails (nothing written, or "
        "written and marked with --no-parity-gate).",
    )
    p.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="fp32 artifact folder from tadsr export")
    p.add_argument("--calib", type=Path, help="calibration image folder (DIV2K layout detected; default: the "
                   "shipped 48-patch set)")  # fmt: skip
    p.add_argument("--num-patches", type=int, help="calibration patches (default: 64, or all 48 of the shipped set)")
    p.add_argument("--seed", type=int, default=0, help="patch and noise seed (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default="minmax", help="calibration method (default: %(default)s)")
    p.add_argument(
        "--target-psnr",
        type=float,
        metavar="DB",
        help="recipe floor: PSNR vs fp32 on the worst held-out patch (default: 30, 25 for the fused pipeline)",
    )
    p.add_argument("--hr-budget", type=_budget, default=DEFAULT_HR_BUDGET_DB, metavar="DB|none",
                   help="also a budget for the recipe search: PSNR-Y vs HR lost against fp32, mean over the held-out "
                   "patches, a patch that INT8 improves counting as 0 (default: %(default)s dB; none: the PSNR floor alone); a component (encoder, denoiser, "
                   "decoder) is judged through the rest of the fp32 chain and holds a third of it, so that the "
                   "three INT8 components chained stay within the budget")  # fmt: skip
    p.add_argument("--hr-confidence", type=float, default=HR_CONFIDENCE, metavar="P",
                   help="the budget holds the mean loss's one-sided upper confidence bound at this confidence, so "
                   "that it also holds on other noise (default: %(default)s; 0.5: the mean itself)")  # fmt: skip
    p.add_argument("--recipe", type=Path, metavar="FILE", help="reuse a recipe.json instead of searching")
    p.add_argument("--no-shipped-recipes", dest="shipped_recipes", action="store_false",
                   help="search even when a recipe shipped with the model was searched under the same conditions, "
                   "and calibrate even when ONNX Runtime's ranges ship for the same model and feeds (default: start "
                   "from the recipe, measure it, search only when it misses the criteria; read the ranges)")  # fmt: skip
    p.add_argument("--holdout", type=Path, metavar="DIR", help="held-out image folder (default: the photo set's "
                   "validation images, else scikit-image's sample photos and the shipped dusk sky)")  # fmt: skip
    p.add_argument("--holdout-patches", type=int, default=16, help="held-out patches (default: %(default)s)")
    p.add_argument("--sensitivity-patches", type=int, default=4,
                   help="calibration patches per block in the sensitivity sweep (default: %(default)s)")  # fmt: skip
    p.add_argument("--sensitivity-budget", type=int, default=48,
                   help="most graph evaluations of the sensitivity sweep (default: %(default)s)")  # fmt: skip
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's choice)")
    p.add_argument("--no-parity-gate", dest="parity_gate", action="store_false",
                   help="write the artifact even when parity fails (recorded in the manifest)")  # fmt: skip
    p.add_argument("--no-weight-only", dest="weight_only", action="store_false",
                   help="skip the weight-only variant (Core ML w8), write only the INT8 (W8A8) artifact")  # fmt: skip
    p.add_argument("--light-autoencoder", type=Path, metavar="CKPT",
                   help="the light autoencoder of an artifact exported with --light, when the file recorded in its "
                   "manifest moved (default: the recorded one)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for the INT8 artifact folders")
    p.set_defaults(func=run_quantize)
    return p


def run_quantize(args: argparse.Namespace) -> int:
    """Run ``tadsr quantize``; returns 0, or 1 when an artifact was written with failing parity."""
    from tadsr.quantize.api import quantize_artifact

    paths = quantize_artifact(
        args.artifact,
        calib=args.calib,
        num_patches=args.num_patches,
        seed=args.seed,
        method=args.method,
        target_psnr=args.target_psnr,
        hr_budget_db=args.hr_budget,
        hr_confidence=args.hr_confidence,
        recipe=args.recipe,
        shipped_recipes=args.shipped_recipes,
        out_dir=args.out,
        holdout=args.holdout,
        holdout_patches=args.holdout_patches,
        sensitivity_patches=args.sensitivity_patches,
        sensitivity_budget=args.sensitivity_budget,
        parity_gate=args.parity_gate,
        threads=args.threads,
        progress=sys.stderr.isatty(),
        light_autoencoder=args.light_autoencoder,
        weight_only=args.weight_only,
    )
    manifests = [json.loads((p / "manifest.json").read_text()) for p in paths]
    print(format_summary(paths, manifests))
    return 0 if all(m.get("parity_passed") for m in manifests) else 1


def _budget(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of dB or 'none', got {text!r}") from None


def _hr(q: dict[str, Any]) -> str:
    loss, bound, budget = q.get("hr_loss_db"), q.get("hr_bound_db"), q.get("hr_budget_db")
    if loss is None:
        return "-"
    return f"{loss:.2f}" + ("" if budget is None or bound is None else f" (bound {bound:.2f}, budget {budget:g})")


def _db(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.1f}"


def _float_blocks(q: Mapping[str, Any]) -> str:
    """``"18"``, or ``"18 (16 dynamic)"`` when some float blocks run dynamic INT8."""
    n, dyn = len(q.get("float_units") or []), len(q.get("dynamic_units") or [])
    return f"{n} ({dyn} dynamic)" if dyn else str(n)


def format_summary(paths: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> str:
    """One line per artifact: size vs fp32, INT8 share of weights, PSNR vs fp32, PSNR-Y lost vs HR (with its
    budget), float blocks (and how many of them run dynamic INT8), parity."""
    rows = [("artifact", "MB", "x fp32", "int8 w", "PSNR dB", "HR loss dB", "float blocks", "parity")]
    for p, m in zip(paths, manifests, strict=True):
        q = m.get("quantization", {})
        size = sum(f["bytes"] for f in m["files"])
        fid = next(iter(q.get("fidelity", {}).values()), {})
        frac = q.get("int8_fraction")
        rows.append((p.name, f"{size / 1e6:.2f}", f"{size / max(q.get('parent_bytes', 0), 1):.2f}",
                     "-" if frac is None else f"{100 * frac:.0f}%", _db(fid.get("psnr")), _hr(q),
                     _float_blocks(q), "ok" if m.get("parity_passed") else "FAIL"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

"""The recorded full run: latency at the official size, fidelity with the bundled model, ratios per stage.

Part 1, latency (``<out>/latency``): the official-size architecture (``official-x4``) with deterministic random
weights, exported to ONNX (fused pipeline + components, tile 64; ``--formats`` adds ExecuTorch), plus any ready
artifact folders given with ``--latency-artifacts``; ``--int8`` quantizes the exported ones with ``tadsr quantize``'s
library (shipped calibration set); no images (a seeded tile).
Random weights are right for latency and meaningless for fidelity.

Part 2, fidelity (``<out>/fidelity``): the ``bundled`` preset with its shipped weights
(``tadsr/weights/bundled_*.safetensors``; skipped with a message while they do not exist), exported the same
way, plus ``--fidelity-artifacts``, on the shipped held-out HR crops (``tadsr/data/bench``; ``--data`` for
others): PSNR / SSIM, parity, image grid, and latency again at that size.

Both parts write report.json first, then report.md, plots (and the grid). At the end the ratios are printed:
student / teacher, export / eager and INT8 / fp32, per stage, and ``<out>/full_run.json`` collects them.

    python benchmarks/full_run.py --out out/full_run --threads 2 --int8
    python benchmarks/full_run.py --out out/full_run --skip-latency --fidelity-artifacts out/bundled-int8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import ensure_exported, ensure_quantized  # noqa: E402  (sibling script)

logger = logging.getLogger("tadsr.benchmarks.full_run")


def _part(name: str, args: argparse.Namespace, preset: str, init: str | None, data: Path | None,
          extra: list[Path]) -> dict[str, Any]:  # fmt: skip
    from tadsr.bench.bench import BenchConfig, run_bench
    from tadsr.bench.report import render_ratios
    from tadsr.pipeline import load_models

    models = load_models(preset=preset, init=init)
    out = args.out / name
    fp32 = ensure_exported(models, args.formats, ["pipeline", "components"], 64, out / "artifacts" / f"{preset}-t64")
    int8 = ensure_quantized(fp32, args.formats, args.threads, gate=init is None) if args.int8 else []
    artifacts = [fp32, *int8, *extra]
    cfg = BenchConfig(out_dir=out / "report", data=data, artifacts=tuple(artifacts), preset=preset, init=init,
                      teacher_steps=15, threads=args.threads, repeats=args.repeats, warmup=1, memory=args.memory,
                      max_images=args.max_images)  # fmt: skip
    logger.info("%s run: preset %s (%s weights), data %s", name, preset, init or "shipped", data or "none")
    result = run_bench(cfg, models=models, progress=sys.stderr.isatty())
    print(f"\n## {name}: preset {preset}, {'random' if init else 'bundled'} weights\n")
    print(render_ratios(result.report), end="")
    for w in result.report["warnings"]:
        print(f"warning: {w}")
    return {"report": str(result.files["json"]), "ok": result.ok, "ratios": result.report["ratios"],
            "warnings": result.report["warnings"]}  # fmt: skip


def _bundled_available(preset: str) -> bool:
    from tadsr.config import get_preset
    from tadsr.errors import ConfigError
    from tadsr.pipeline import bundled_weight_path

    try:
        p = get_preset(preset)
    except ConfigError:  # the preset is not in this version
        return False
    return all(bundled_weight_path(p, part) is not None for part in ("student", "autoencoder"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None, help="torch / ORT / ExecuTorch threads (default: defaults)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--formats", nargs="+", default=["onnx"])
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"])
    p.add_argument("--latency-artifacts", type=Path, nargs="*", default=[])
    p.add_argument("--fidelity-artifacts", type=Path, nargs="*", default=[])
    p.add_argument("--data", type=Path, default=None, help="HR images for part 2 (default: tadsr/data/bench)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--latency-preset", default="official-x4", help="preset of part 1 (tiny: a quick dry run)")
    p.add_argument("--fidelity-preset", default="bundled", help="preset of part 2 (needs shipped weights)")
    p.add_argument("--int8", action="store_true", help="quantize the exported artifacts too (tadsr quantize; slow)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.repeats < 5:
        raise SystemExit("--repeats must be >= 5 (median and p90 of at least 5 runs)")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    if not args.skip_latency:
        summary["latency"] = _part("latency", args, args.latency_preset, "random", None, args.latency_artifacts)
    if not args.skip_fidelity:
        if _bundled_available(args.fidelity_preset):
            data = args.data or Path(str(resources.files("tadsr") / "data" / "bench"))
            summary["fidelity"] = _part("fidelity", args, args.fidelity_preset, None, data, args.fidelity_artifacts)
        else:
            msg = f"no shipped weights for preset {args.fidelity_preset!r} (tadsr/weights/): fidelity part skipped"
            print(f"\n{msg}")
            summary["fidelity"] = {"skipped": msg}
    from tadsr.bench.report import atomic_write

    atomic_write(args.out / "full_run.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"\nsummary: {args.out / 'full_run.json'}")
    return 0 if all(v.get("ok", True) for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``tadsr export``: the thin CLI layer over :func:`tadsr.export.api.export_model`.

The main CLI (:mod:`tadsr.cli`) registers the subcommand with :func:`add_export_parser` and dispatches to
:func:`run_export`; it also configures logging (-v / -q) and turns :class:`~tadsr.errors.TadsrError` into an
exit status. This module prints only the final summary table (to stdout).

Examples::

    tadsr export --preset tiny --init random --format onnx --graphs pipeline components --out out/
    tadsr export --student tadsr.pth --autoencoder autoencoder_vq_f4.pth --format onnx coreml --tile 128 --out out/
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tadsr.errors import ConfigError

__all__ = ["add_export_parser", "run_export", "format_summary"]

logger = logging.getLogger(__name__)


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers()``).

    Sets ``func=run_export`` as the parser default, so the main CLI can call ``args.func(args)``.
    """
    p = subparsers.add_parser(
        "export",
        help="export graphs to ONNX / Core ML / ExecuTorch artifacts, each checked by parity",
        description="Export the one-step model's graphs to self-describing artifact folders "
        "(<out>/<graph>-<format>-<precision>-t<tile>/ with manifest.json). Every artifact passes named parity "
        "hops against the PyTorch reference before it is written; exit status 1 when parity fails (nothing is "
        "written for that artifact, or it is written and marked with --no-parity-gate), 2 on bad input.",
    )
    from tadsr.cli.common import add_light_args, add_model_args

    add_light_args(add_model_args(p, teacher=False))
    out = p.add_argument_group("export")
    out.add_argument("--format", dest="formats", nargs="+", default=["onnx"], metavar="FMT",
                     help="onnx, coreml and/or executorch (default: onnx)")  # fmt: skip
    out.add_argument("--graphs", nargs="+", default=["pipeline"], metavar="GRAPH",
                     help="pipeline and/or components (= encoder denoiser decoder), or single graph names "
                     "(default: pipeline)")  # fmt: skip
    out.add_argument("--tile", type=int, default=64, help="LR tile side, a multiple of 64 (default: 64)")
    out.add_argument("--precision", dest="precisions", nargs="+", default=["fp32"], metavar="PREC",
                     help="fp32 and/or fp16 (default: fp32)")  # fmt: skip
    out.add_argument("--out", type=Path, required=True, help="folder for the artifact folders (created if needed)")
    out.add_argument("--no-parity-gate", dest="parity_gate", action="store_false",
                     help="write artifacts even when parity fails (recorded in the manifest)")  # fmt: skip
    out.add_argument("--parity-patches", type=int, default=3, metavar="N",
                     help="real LR patches used by parity, besides one seeded case (default: 3)")  # fmt: skip
    out.add_argument("--parity-seed", type=int, default=0, metavar="S",
                     help="seed of parity's seeded case and of the real patches it draws (default: 0)")  # fmt: skip
    out.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    out.add_argument("--color-fix", choices=["none", "wavelet", "adain", "luma"], default="none",
                     help="colour fix at the end of the fused pipeline graph, recorded in the manifest "
                          "(default: none = upstream parity)")  # fmt: skip
    out.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="no progress bars (default: bars when stderr is a terminal)")  # fmt: skip
    p.set_defaults(func=run_export)
    return p


def _load(args: argparse.Namespace) -> Any:
    from tadsr.pipeline import load_models

    if args.init is None and args.student is None and args.autoencoder is None:
        logger.info("no checkpoints given: using the weights bundled with preset %r, if any", args.preset)
    from tadsr.cli.common import light_choice

    return load_models(student=args.student, autoencoder=args.autoencoder, preset=args.preset, init=args.init,
                       light_autoencoder=light_choice(args))  # fmt: skip


def run_export(args: argparse.Namespace) -> int:
    """Run ``tadsr export`` from parsed arguments; prints the summary table.

    Returns:
        0 when every artifact passed parity, 1 when some were written with failing parity (gate off).

    Raises:
        TadsrError: bad arguments, checkpoints, output folder, missing backend, or a parity failure (gate on).
    """
    from tadsr.export.api import check_request, export_model

    from tadsr.config import get_preset

    if args.parity_patches < 0:
        raise ConfigError(f"--parity-patches must be >= 0, got {args.parity_patches}")
    if args.parity_seed < 0:
        raise ConfigError(f"--parity-seed must be >= 0, got {args.parity_seed}")
    # fail on bad arguments before loading models (minutes at official size)
    from tadsr.cli.common import resolve_preset

    resolve_preset(args)
    check_request(get_preset(args.preset), formats=args.formats, graphs=args.graphs, tile=args.tile,
                  precisions=args.precisions, out_dir=args.out)  # fmt: skip
    progress = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    backend_options: dict[str, dict[str, Any]] = {}
    if args.opset is not None:
        backend_options["onnx"] = {"opset": args.opset}
    models = _load(args)
    results = export_model(
        models,
        formats=args.formats,
        graphs=args.graphs,
        tile=args.tile,
        precisions=args.precisions,
        out_dir=args.out,
        parity_gate=args.parity_gate,
        progress=progress,
        n_real=args.parity_patches,
        backend_options=backend_options,
        color_fix=args.color_fix,
        parity_seed=args.parity_seed,
    )
    print(format_summary(results))
    return 0 if all(r.passed for r in results) else 1


def _flips(r: Any) -> str:
    """Near-tie code flips of the end-to-end hop (reference torch -> runtime), e.g. ``"2/16384"``, or ``"-"``."""
    hops = [h for h in r.parity.hops if getattr(h, "flips", None) and h.hop.startswith("reference torch -> ")
            and h.hop != "reference torch -> export-ready torch"]  # fmt: skip
    if not hops:
        return "-"
    flips = [f for h in hops for f in h.flips]
    return f"{sum(f.near_tie for f in flips)}/{sum(f.positions for f in flips)}" + (
        f" ({sum(f.not_near_tie for f in flips)} not near-tie)" if any(f.not_near_tie for f in flips) else "")


def format_summary(results: Sequence[Any]) -> str:
    """A plain-text table: artifact, main file, size (MB), worst parity hop and its numbers, pass/fail."""
    header = ("artifact", "file", "MB", "worst hop", "max abs", "PSNR dB", "VQ flips", "parity")
    rows = [header]
    for r in results:
        w = r.parity.worst()
        psnr = "-" if w is None else ("inf" if math.isinf(w.psnr) else f"{w.psnr:.1f}")
        rows.append((
            r.path.name,
            r.files[0].name if r.files else "-",
            f"{r.bytes / 1e6:.1f}",
            "-" if w is None else f"{w.hop} [{w.inputs} {w.output}]",
            "-" if w is None else f"{w.max_abs:.2g}",
            psnr,
            _flips(r),
            "pass" if r.passed else "FAIL",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

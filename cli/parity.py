"""``tadsr parity``: the thin CLI layer over :func:`tadsr.parity.check.check_parity`.

Registered by :mod:`tadsr.cli` with :func:`add_parity_parser`; runs standalone as ``python -m tadsr.cli.parity``.
Prints the Markdown report to stdout and, with ``--report DIR``, writes ``DIR/parity.json`` and ``DIR/parity.md``.

Exit status (the main CLI's policy): 0 every artifact and whole-image set passed; 1 a parity failure; 2 usage or
input errors (argparse errors, :class:`~tadsr.errors.TadsrError`, or an artifact that could not be checked at all);
3 an internal error (traceback in a log file).

Examples::

    tadsr parity out/pipeline-onnx-fp32-t64                      # reference rebuilt from the manifest
    tadsr parity out/ --diagnose --report reports/                # every artifact in out/, always localised
    tadsr parity out/ --student tadsr.pth --autoencoder autoencoder_vq_f4.pth --images photos/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from tadsr.errors import ConfigError

__all__ = ["add_parity_parser", "main", "run_parity"]

logger = logging.getLogger(__name__)


def add_parity_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``parity`` subcommand to ``subparsers``; sets ``func=run_parity``."""
    p = subparsers.add_parser(
        "parity",
        help="check exported artifacts against the PyTorch reference; localise the first diverging block",
        description="Run an artifact (or every artifact in a folder) and the PyTorch reference on a seeded case, "
        "real LR patches and whole images (through the same tiler and noise), judge each output against the "
        "floors of tadsr/numerics.json for its precision, and localise failures (first diverging block or "
        "schedule step). Without model arguments the reference is rebuilt from each artifact's manifest.",
    )
    p.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="artifact folder, or a folder of artifacts")
    from tadsr.cli.common import add_model_args

    add_model_args(p, teacher=False, default_preset=None,
                   title="reference (default: rebuilt from each manifest's preset and sources)",
                   preset_help="model preset (default: the manifest's)")
    p.add_argument("--light-autoencoder", type=Path, metavar="CKPT",
                   help="light autoencoder for artifacts exported with --light (default: the manifest's)")  # fmt: skip
    c = p.add_argument_group("inputs")
    c.add_argument("--images", type=Path, metavar="DIR",
                   help="image folder: real patches are cut from it and its images are the whole-image inputs "
                   "(default: the shipped calibration set)")  # fmt: skip
    c.add_argument("--seed", type=int, default=0, help="seed of the seeded case and the tile noise (default: 0)")
    c.add_argument("--patches", type=int, default=3, metavar="N", help="real LR patches per artifact (default: 3)")
    c.add_argument("--whole-images", type=int, default=2, metavar="N",
                   help="whole images per pipeline artifact / component set (default: 2; 0: none)")  # fmt: skip
    c.add_argument("--max-side", type=int, default=160, metavar="PX",
                   help="centre-crop whole images to about this many LR pixels per side (default: 160)")  # fmt: skip
    c.add_argument("--overlap", type=int, default=16, metavar="PX", help="LR overlap between tiles (default: 16)")
    o = p.add_argument_group("output")
    o.add_argument("--diagnose", action="store_true", help="localise every artifact, not only failing ones")
    o.add_argument("--report", type=Path, metavar="DIR", help="write parity.json and parity.md into DIR")
    o.add_argument("--backend", help="runner backend override (e.g. coreml-sim)")
    o.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime and torch")
    p.set_defaults(func=run_parity)
    return p


def run_parity(args: argparse.Namespace) -> int:
    """Run ``tadsr parity`` from parsed arguments; prints the Markdown report.

    Returns:
        0 pass, 1 parity failure, 2 an artifact could not be checked.

    Raises:
        TadsrError: bad arguments or inputs (the main CLI turns it into exit status 2).
    """
    from tadsr.parity.check import ParityOptions, ReferenceSpec, check_parity, render_markdown, write_report

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    ref = ReferenceSpec(student=args.student, autoencoder=args.autoencoder, preset=args.preset, init=args.init,
                        light_autoencoder=args.light_autoencoder)  # fmt: skip
    opts = ParityOptions(seed=args.seed, patches=args.patches, images=args.images, whole_images=args.whole_images,
                         max_side=args.max_side, overlap=args.overlap, diagnose=args.diagnose, backend=args.backend,
                         threads=args.threads)  # fmt: skip
    result = check_parity(args.artifact, ref, opts)
    if args.report is not None:
        js, md = write_report(result, args.report)
        logger.info("wrote %s and %s", js, md)
    sys.stdout.write(render_markdown(result))
    sys.stdout.flush()
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m tadsr.cli.parity ...``), with the main CLI's logging and exit codes."""
    parser = argparse.ArgumentParser(prog="tadsr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parity_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv if a in ("-q", "--quiet", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"})]
    args = parser.parse_args([*flags, "parity", *(a for a in argv if a not in flags)])
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    from tadsr.cli import configure_logging, run_verb

    configure_logging(level)

    return run_verb(args, argv)


if __name__ == "__main__":
    sys.exit(main())

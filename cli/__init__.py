"""``tadsr`` command line: a thin layer that parses arguments and calls one library function per verb.

Exit codes (README "Errors and exit codes"): 0 success; 1 a verdict failed (parity below its floor, some images
of a folder failed); 2 bad input or environment (a :class:`~tadsr.errors.TadsrError`, or argparse usage); 3 an
internal error (traceback in a log file, see :func:`crash_log_dir`); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tadsr.errors import TadsrError

log = logging.getLogger("tadsr")

def add_model_args(
    p: argparse.ArgumentParser,
    *,
    teacher: bool = True,
    default_preset: str | None = None,
    title: str = "model",
    preset_help: str | None = None,
) -> argparse._ArgumentGroup:
    """The model arguments every verb shares: --student/[--teacher]/--autoencoder checkpoints or --preset [--init].

    ``--preset`` stays None unless given: :func:`resolve_preset` then infers it from the checkpoints' keys and
    shapes (official files need no ``--preset official-x4``), or takes ``bundled`` (the shipped weights) without
    checkpoints. Verbs that read the preset from an artifact's manifest pass their own ``preset_help``.
    """
    g = p.add_argument_group(title)
    g.add_argument("--student", type=Path, metavar="CKPT",
                   help="one-step student checkpoint (.pth / .safetensors; TAD-SR, SinSR)")  # fmt: skip
    if teacher:
        g.add_argument("--teacher", type=Path, metavar="CKPT", help="multi-step teacher checkpoint (ResShift v1/v3)")
    g.add_argument("--autoencoder", type=Path, metavar="CKPT", help="VQ-f4 autoencoder checkpoint (autoencoder_vq_f4.pth)")
    if preset_help is None:
        preset_help = ("model preset: bundled (the shipped trained model), official-x4, tiny (default: inferred "
                       "from the checkpoints' shapes; bundled without checkpoints)")
    g.add_argument("--preset", default=default_preset, help=preset_help)
    g.add_argument("--init", choices=["random"],
                   help="deterministic random weights for networks without a checkpoint (latency work and tests)")  # fmt: skip
    return g


def add_light_args(g: argparse._ArgumentGroup) -> None:
    """``--light`` / ``--light-autoencoder CKPT``: run the light autoencoder (``tadsr distill-ae``) instead of VQ-f4."""
    g.add_argument("--light", action="store_true",
                   help="use the light conv-only encoder/decoder distilled from the autoencoder (shipped for bundled; "
                   "else give --light-autoencoder)")  # fmt: skip
    g.add_argument("--light-autoencoder", type=Path, metavar="CKPT",
                   help="light autoencoder weights from tadsr distill-ae (implies --light)")  # fmt: skip


def light_choice(args: argparse.Namespace) -> Path | bool | None:
    """The ``light_autoencoder`` argument of :func:`tadsr.pipeline.load_models` from ``--light[-autoencoder]``."""
    ckpt = getattr(args, "light_autoencoder", None)
    if ckpt is not None:
        return ckpt
    return True if getattr(args, "light", False) else None


def resolve_preset(args: argparse.Namespace) -> str:
    """Fill ``args.preset`` when not given: :func:`tadsr.pipeline.infer_preset` (from the checkpoints, else bundled)."""
    if getattr(args, "preset", None) is None:
        from tadsr.pipeline import infer_preset

        ckpts = {k: getattr(args, k, None) for k in ("student", "teacher", "autoencoder")}
        args.preset = infer_preset(**ckpts)
        if any(ckpts.values()):
            log.info("preset %r (inferred from the checkpoints)", args.preset)
    return args.preset


def load_models_from_args(args: argparse.Namespace):  # noqa: ANN201 - returns tadsr.Models
    from tadsr.pipeline import load_models

    resolve_preset(args)
    return load_models(
        student=args.student,
        teacher=getattr(args, "teacher", None),
        autoencoder=args.autoencoder,
        preset=args.preset,
        init=args.init,
        light_autoencoder=light_choice(args),
    )


# -- upscale --------------------------------------------------------------------------------------------------
def _add_upscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale",
        help="super-resolve images x4 (PyTorch reference, or an exported artifact with --artifact)",
        description="Upscale a file or every image of a folder; writes 8-bit PNG files.",
    )
    p.add_argument("input", type=Path, help="image file or folder (jpg, png, webp, bmp, tif)")
    p.add_argument("output", type=Path, help="output PNG file, or folder (for a folder input)")
    add_light_args(add_model_args(p))
    g = p.add_argument_group("exported artifact (instead of the PyTorch reference)")
    g.add_argument("--artifact", type=Path, help="artifact folder (fused pipeline) or a folder of artifacts")
    g.add_argument("--format", dest="fmt", choices=["onnx", "executorch", "coreml"], help="pick artifacts by format")
    g.add_argument("--precision", help="pick artifacts by precision (fp32, fp16, int8)")
    g.add_argument("--backend", help="runner backend override, e.g. coreml-sim")
    g.add_argument("--low-memory", action="store_true",
                   help="ONNX Runtime without its memory arena and weight pre-packing: lower peak RSS, slower")  # fmt: skip
    p.add_argument("--steps", type=int, help="run the multi-step teacher with this many steps (15: v1, 4: v3)")
    p.add_argument("--color-fix", choices=["none", "wavelet", "adain"],
                   help="colour correction towards the bicubic LR (default: none; an --artifact carries its own, "
                        "set by tadsr export --color-fix)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--tile", type=int, default=128, help="LR tile side, a multiple of 64 (default: %(default)s)")
    p.add_argument("--overlap", type=int, default=16, help="LR overlap between tiles in pixels (default: %(default)s)")
    p.set_defaults(func=_run_upscale)


def _reference_runner(args: argparse.Namespace) -> tuple[Callable, Callable[[int], tuple[int, ...]], int]:
    import numpy as np
    import torch

    from tadsr.pipeline import OneStepPipeline, TeacherPipeline

    models = load_models_from_args(args)
    c = models.preset.vq.embed_dim
    fix = args.color_fix or "none"
    if args.steps is not None:
        pipe_t = TeacherPipeline(models, steps=args.steps, color_fix=fix)
        steps = pipe_t.schedule.num_steps

        def run(lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
            b, _, t, _ = lr.shape
            noises = torch.from_numpy(noise).reshape(b, steps, c, t, t).transpose(0, 1)
            return pipe_t(torch.from_numpy(lr), noises=noises.contiguous()).numpy()

        return run, lambda t: (steps * c, t, t), models.preset.scale

    pipe = OneStepPipeline(models, color_fix=fix)

    def run1(lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return pipe(torch.from_numpy(lr), noise=torch.from_numpy(noise)).numpy()

    return run1, lambda t: (c, t, t), models.preset.scale


def _run_upscale(args: argparse.Namespace) -> int:
    from tadsr.errors import InputError

    if args.tile <= 0 or args.tile % 64:
        raise InputError(f"--tile must be a positive multiple of 64, got {args.tile}")
    if not 0 <= args.overlap < args.tile:
        raise InputError(f"--overlap must be in [0, tile), got {args.overlap}")
    from tadsr.runtime.imageio import list_images

    files = list_images(args.input)
    folder_mode = args.input.is_dir()
    created: list[Path] = []
    if folder_mode:
        if args.output.exists() and not args.output.is_dir():
            raise InputError(f"input is a folder, so the output must be a folder; {args.output} is a file")
        created = [p for p in (args.output, *args.output.parents) if not p.exists()][::-1]
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the output folder {args.output}: {e.strerror or e}; "
                             "choose a writable folder") from e  # fmt: skip
    written = 0
    try:
        written, failures = _upscale_files(args, files, folder_mode)
    finally:
        if not written:  # nothing written (an error, Ctrl-C, or every image failed): leave no empty folder
            for p in reversed(created):
                try:
                    p.rmdir()
                except OSError:
                    break
    if failures:
        log.error("%d of %d images failed (listed above); the others were written", failures, len(files))
        return 1
    return 0


def _upscale_files(args: argparse.Namespace, files: list[Path], folder_mode: bool) -> tuple[int, int]:
    """Upscale ``files``; returns (written, failed). In a folder run a bad image is logged and skipped."""
    from tqdm import tqdm

    from tadsr.errors import InputError
    from tadsr.runtime.imageio import from_model, read_image, to_model, upscale_alpha, write_png
    from tadsr.runtime.tiling import upscale_tiled

    fixed_tile = None
    if args.artifact is not None:
        from tadsr.runtime.pipeline import MobileSRPipeline

        if args.steps is not None or args.student or args.autoencoder or args.init or light_choice(args):
            raise InputError("--artifact runs an exported file: drop --steps/--student/--autoencoder/--init/--light")
        if args.color_fix is not None:
            raise InputError("--artifact runs an exported file with its own colour fix (tadsr export --color-fix; "
                             "see graph.constants.color_fix in its manifest): drop --color-fix")
        mobile = MobileSRPipeline.from_path(args.artifact, fmt=args.fmt, precision=args.precision, backend=args.backend,
                                            low_memory=args.low_memory)  # fmt: skip
        log.info("running %s", mobile.description)
        run, scale, fixed_tile = mobile.run_tiles, mobile.scale, mobile.tile
        noise_shape = lambda t: tuple(mobile.noise_shape)  # noqa: E731
    else:
        run, noise_shape, scale = _reference_runner(args)
    written = failures = 0
    progress = sys.stderr.isatty()
    for path in tqdm(files, desc="images", disable=not progress or len(files) < 2):
        out = args.output / f"{path.stem}.png" if folder_mode or args.output.is_dir() else args.output
        t0 = time.perf_counter()
        try:
            img = read_image(path)
            # the reference takes any multiple of 64: never pad a small image up to a larger tile
            tile = fixed_tile or min(args.tile, -(-max(img.rgb.shape[:2]) // 64) * 64)
            sr = upscale_tiled(
                to_model(img.rgb), run, tile=tile, scale=scale, overlap=min(args.overlap, tile - 1), seed=args.seed,
                noise_shape_fn=noise_shape, progress=progress,
            )
            alpha = upscale_alpha(img.alpha, scale) if img.alpha is not None else None
            write_png(out, from_model(sr), alpha=alpha)
        except TadsrError as e:
            if not folder_mode:
                raise
            failures += 1
            log.error("skipped %s: %s", path, e)
            continue
        written += 1
        h, w = img.rgb.shape[:2]
        log.info("%s (%dx%d) -> %s (%dx%d) in %.1f s", path.name, w, h, out, scale * w, scale * h,
                 time.perf_counter() - t0)
    return written, failures


# -- main -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tadsr", description="One-step diffusion SR (TAD-SR) for phones.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_upscale(sub)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Verbs implemented in the subpackages (export, quantize, parity, bench)."""
    from tadsr.cli.bench import add_bench_parser
    from tadsr.cli.main_job import add_all_parser
    from tadsr.cli.export import add_export_parser
    from tadsr.cli.parity import add_parity_parser
    from tadsr.cli.quantize import add_quantize_parser
    from tadsr.train.distill_ae import add_distill_ae_parser

    return [add_export_parser, add_quantize_parser, add_parity_parser, add_bench_parser, add_all_parser,
            add_distill_ae_parser]  # fmt: skip


def crash_log_dir() -> Path:
    """Where internal-error tracebacks go: ``$TADSR_LOG_DIR``, else the system temp folder."""
    import os
    import tempfile

    return Path(os.environ.get("TADSR_LOG_DIR") or tempfile.gettempdir())


def _write_crash_log(exc: BaseException, argv: list[str] | None) -> Path | None:
    import datetime as dt
    import os
    import platform
    import traceback

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = crash_log_dir() / f"tadsr-crash-{stamp}-{os.getpid()}.log"
    text = (f"tadsr {' '.join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))}\n"
            f"python {platform.python_version()} on {platform.platform()}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def run_verb(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Call ``args.func(args)`` under the error policy (README "Errors and exit codes").

    Returns the verb's own status (0, or 1 when a verdict failed); a :class:`TadsrError` -> its one-line message
    and its ``exit_code`` (2 bad input or environment, 1 a failed verdict); Ctrl-C -> 130; an out-of-memory or a
    full / read-only disk -> 2 with what to do; any other exception is a bug -> 3, with the traceback in a log
    file (on the console only with -v).
    """
    import errno

    from tadsr.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED

    try:
        return int(args.func(args) or 0)
    except TadsrError as e:
        log.error("%s", e)
        log.debug("details", exc_info=True)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; no partial output was left behind")
        return EXIT_INTERRUPTED
    except MemoryError:
        log.error("out of memory; use a smaller --tile, --low-memory (ONNX Runtime) or free memory, then retry")
        return EXIT_BAD_INPUT
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            where = f" ({e.filename})" if e.filename else ""
            log.error("cannot write%s: %s; free some space or choose a writable output, then retry", where,
                      e.strerror or e)  # fmt: skip
            return EXIT_BAD_INPUT
        return _internal(e, args, argv)
    except Exception as e:  # noqa: BLE001 - the policy: every other exception is an internal error
        return _internal(e, args, argv)


def _internal(e: BaseException, args: argparse.Namespace, argv: list[str] | None) -> int:
    from tadsr.errors import EXIT_INTERNAL

    path = _write_crash_log(e, argv)
    first = (str(e).splitlines() or [""])[0][:200]
    where = f"the traceback is in {path}" if path else "the traceback could not be saved; rerun with -v to see it"
    log.error("internal error (%s: %s); this is a bug, please report it: %s", type(e).__name__, first, where)
    if getattr(args, "verbose", 0):
        log.error("traceback:", exc_info=e)
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_verb(args, argv)


if __name__ == "__main__":
    sys.exit(main())

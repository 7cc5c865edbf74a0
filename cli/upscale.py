"""``tadsr upscale``: super-resolve a file or a folder with the PyTorch reference or an exported artifact."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tadsr.cli.common import add_light_args, add_model_args, light_choice, load_models_from_args

from tadsr.errors import TadsrError
from tadsr.formats.registry import FORMAT_NAMES

log = logging.getLogger("tadsr")


def add_upscale_parser(sub: argparse._SubParsersAction) -> None:
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
    g.add_argument("--format", dest="fmt", choices=FORMAT_NAMES, help="pick artifacts by format")
    g.add_argument("--precision", help="pick artifacts by precision (fp32, fp16, int8)")
    g.add_argument("--backend", help="runner backend override, e.g. coreml-sim")
    g.add_argument("--low-memory", action="store_true",
                   help="ONNX Runtime without its memory arena and weight pre-packing: lower peak RSS, slower")  # fmt: skip
    p.add_argument("--steps", type=int, help="run the multi-step teacher with this many steps (15: v1, 4: v3)")
    p.add_argument("--color-fix", choices=["none", "wavelet", "adain", "luma"],
                   help="colour correction towards the bicubic LR (default: none; an --artifact carries its own, "
                        "set by tadsr export --color-fix)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--tile", type=int,
                   help="LR tile side, a multiple of 64 (default: the preset's, 64 for bundled, the tile its "
                        "networks were trained on; 128 otherwise, upstream's 512-px chop; an --artifact runs its own "
                        "tile)")  # fmt: skip
    p.add_argument("--overlap", type=int, default=16, help="LR overlap between tiles in pixels (default: %(default)s)")
    p.set_defaults(func=_run_upscale)


def _reference_runner(args: argparse.Namespace) -> tuple[Callable, Callable[[int], tuple[int, ...]], int, int]:
    """``(run_tiles, noise_shape, scale, tile)`` of the PyTorch reference; ``tile`` is ``--tile`` or the preset's."""
    import numpy as np
    import torch

    from tadsr.config import upscale_tile
    from tadsr.errors import InputError
    from tadsr.pipeline import OneStepPipeline, TeacherPipeline

    models = load_models_from_args(args)
    tile = args.tile or upscale_tile(models.preset.name)
    if args.overlap >= tile:
        raise InputError(f"--overlap must be in [0, tile), got {args.overlap} with tile {tile}")
    log.info("reference pipeline, preset %s, LR tile %d", models.preset.name, tile)
    c = models.preset.vq.embed_dim
    fix = args.color_fix or "none"
    if args.steps is not None:
        pipe_t = TeacherPipeline(models, steps=args.steps, color_fix=fix)
        steps = pipe_t.schedule.num_steps

        def run(lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
            b, _, t, _ = lr.shape
            noises = torch.from_numpy(noise).reshape(b, steps, c, t, t).transpose(0, 1)
            return pipe_t(torch.from_numpy(lr), noises=noises.contiguous()).numpy()

        return run, lambda t: (steps * c, t, t), models.preset.scale, tile

    pipe = OneStepPipeline(models, color_fix=fix)

    def run1(lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return pipe(torch.from_numpy(lr), noise=torch.from_numpy(noise)).numpy()

    return run1, lambda t: (c, t, t), models.preset.scale, tile


def _run_upscale(args: argparse.Namespace) -> int:
    from tadsr.errors import InputError

    if args.tile is not None and (args.tile <= 0 or args.tile % 64):
        raise InputError(f"--tile must be a positive multiple of 64, got {args.tile}")
    if args.overlap < 0 or (args.tile is not None and args.overlap >= args.tile):
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
    from tadsr.runtime.imageio import from_model, read_image, to_model, upscale_alpha, write_png
    from tadsr.runtime.tiling import upscale_tiled
    from tqdm import tqdm

    from tadsr.errors import InputError

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
        max_tile = fixed_tile
    else:
        run, noise_shape, scale, max_tile = _reference_runner(args)
    written = failures = 0
    progress = sys.stderr.isatty()
    for path in tqdm(files, desc="images", disable=not progress or len(files) < 2):
        out = args.output / f"{path.stem}.png" if folder_mode or args.output.is_dir() else args.output
        t0 = time.perf_counter()
        try:
            img = read_image(path)
            # the reference takes any multiple of 64: never pad a small image up to a larger tile
            tile = fixed_tile or min(max_tile, -(-max(img.rgb.shape[:2]) // 64) * 64)
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

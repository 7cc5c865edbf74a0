"""Regenerate the shipped calibration set (``tadsr/data/calib``) from the train split of a photo set.

A maintainer tool: ``python -m tadsr.train.calibration_set PHOTOS_DIR [OUT_DIR]``. It lives beside the photo
collector (:mod:`tadsr.train.photos`), whose records give each patch its source and licence.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tadsr.errors import InputError
from tadsr.patches import ImageFolder, ImagePair, PatchSet, _rel, default_calibration_dir, sample_patches
from tadsr.train.photos import load_photo_set

logger = logging.getLogger(__name__)


def _photo_records(photos_dir: Path) -> dict[str, dict[str, object]]:
    photo_set = load_photo_set(photos_dir)
    return {r.file: dataclasses.asdict(r) for r in photo_set.records}


def _iter_rows(patches: PatchSet, photos_dir: Path, records: dict[str, dict[str, object]]) -> Iterator[str]:
    side = patches.hr.shape[-1]
    for n, o in enumerate(patches.origins):
        r = records[_rel(o.path, photos_dir)]
        box = f"({o.x}, {o.y}, {o.x + side}, {o.y + side})"
        lic = str(r["license"]) + (f" (upstream: {r['upstream_license']})" if r["upstream_license"] else "")
        yield (
            f"| calib_{n:03d}.png | {r['file']} ({r['size'][0]}x{r['size'][1]}) | `{r['origin']}` "  # type: ignore[index]
            f"| {r['package']} | {lic} | {str(r['copyright']).replace('|', '/')} | {box} |"
        )


def build_shipped_calibration(
    photos_dir: Path, out_dir: Path, *, num_patches: int = 48, patch_size: int = 256, seed: int = 0,
    min_std: float = 0.04,
) -> list[Path]:  # fmt: skip
    """Regenerate the shipped calibration set from the *train* split of a photo set, deterministically.

    Writes ``out_dir/calib_NNN.png`` (RGB, ``patch_size`` square, aligned to multiples of 4) and
    ``out_dir/SOURCES.md`` (source photo, package, licence and crop box of every patch). Previous
    ``calib_*.png`` files in ``out_dir`` are removed. Validation photos are never read.

    Args:
        photos_dir: a photo set written by :func:`tadsr.train.photos.collect_photos`.
        out_dir: destination, normally ``tadsr/data/calib`` in the source tree.
        num_patches: number of patches.
        patch_size: HR patch side, a multiple of 4.
        seed: sampling seed.
        min_std: flat-patch rejection threshold, see :func:`sample_patches`.

    Returns:
        The written PNG paths.

    Raises:
        InputError: ``photos_dir`` is not a valid photo set, or ``patch_size`` is not a multiple of 4.
    """
    if patch_size % 4:
        raise InputError(f"patch_size must be a multiple of 4, got {patch_size}")
    photos_dir, out_dir = Path(photos_dir), Path(out_dir)
    records = _photo_records(photos_dir)
    train = sorted(photos_dir / f for f, r in records.items() if r["split"] == "train")
    folder = ImageFolder(root=photos_dir, layout="folder", images=tuple(ImagePair(p) for p in train))
    patches = sample_patches(folder, num_patches=num_patches, tile=patch_size // 4, scale=4, seed=seed,
                             min_std=min_std)  # fmt: skip
    if any(records[_rel(o.path, photos_dir)]["split"] != "train" for o in patches.origins):
        raise AssertionError("a validation photo reached the calibration set")  # internal invariant
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("calib_*.png"):
        old.unlink()
    written = []
    for n, hr in enumerate(patches.hr):
        u8 = np.round((hr.transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        path = out_dir / f"calib_{n:03d}.png"
        Image.fromarray(u8).save(path, format="PNG", optimize=True)
        written.append(path)
    header = [
        "# Shipped calibration set",
        "",
        (
            f"{num_patches} RGB HR patches of {patch_size}x{patch_size} px, cut deterministically (seed {seed}, "
            f"min_std {min_std}) from the **train** split of the photo set made by `python -m tadsr.train.photos` "
            "(validation photos are never used). Regenerate with "
            "`python -m tadsr.train.calibration_set PHOTOS_DIR tadsr/data/calib`."
        ),
        "",
        (
            "Crop boxes are `(x0, y0, x1, y1)` in the photo-set image, which is the original file converted to "
            "RGB and downscaled with PIL LANCZOS to a long side of at most 1024 px (size given in the photo column)."
        ),
        "",
        (
            "Each patch is a derived work of its source photo and stays under that photo's licence (GPL-2+ for "
            "the Debian wallpaper packages, see /usr/share/doc/<package>/copyright; CC0 or public domain for the "
            "scikit-image samples). They are data shipped alongside the code, not covered by its Apache-2.0 "
            "licence."
        ),
        "",
        "| file | photo (photo-set size) | origin | package | license | copyright | crop box |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = list(_iter_rows(patches, photos_dir, records))
    (out_dir / "SOURCES.md").write_text("\n".join(header + rows) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in written) / 1e6
    logger.info("wrote %d calibration patches (%.2f MB) to %s", len(written), total, out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python -m tadsr.train.calibration_set PHOTOS_DIR [OUT_DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m tadsr.train.calibration_set",
                                     description="Regenerate the shipped calibration set.")  # fmt: skip
    parser.add_argument("photos_dir", type=Path)
    parser.add_argument("out_dir", type=Path, nargs="?", default=default_calibration_dir())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build_shipped_calibration(args.photos_dir, args.out_dir)
    except InputError as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

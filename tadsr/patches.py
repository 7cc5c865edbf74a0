"""Real image patches for INT8 calibration (and training): DIV2K or any image folder, deterministic.

:func:`sample_patches` cuts ``tile*scale`` HR squares from a folder of images and pairs each with its ``tile``
LR square: either the aligned crop of a given LR image (DIV2K's ``*_LR_bicubic/X4``), or MATLAB-bicubic
``imresize(HR, 1/scale)`` (:mod:`tadsr.imresize`, DIV2K's convention). The same folder, parameters and seed
always give the same patches and the same :attr:`PatchSet.content_hash`.

The repository ships a small calibration set (:func:`default_calibration_dir`): 48 HR patches of 256x256
cut from the *train* split of the photo set of :mod:`tadsr.train.photos`; :func:`tadsr.train.calibration_set.build_shipped_calibration`
regenerates it (``python -m tadsr.train.calibration_set PHOTOS_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tadsr.errors import InputError
from tadsr.imresize import imresize

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "ImagePair",
    "PatchOrigin",
    "PatchSet",
    "default_calibration_dir",
    "shipped_holdout_dir",
    "find_images",
    "sample_patches",
]  # fmt: skip

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
_DIV2K_HR = re.compile(r"^DIV2K_(train|valid)_HR$")
_HASH_VERSION = 1
_MAX_TRIES = 10  # candidate positions per patch when rejecting flat patches (min_std > 0)


class PatchOrigin(NamedTuple):
    """Where a patch was cut: HR image path and the top-left corner of the HR crop (pixels)."""

    path: Path
    y: int
    x: int


@dataclass(frozen=True)
class ImagePair:
    """An HR image and, when one exists, its aligned LR image (``hr`` downscaled by the scale factor)."""

    hr: Path
    lr: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ImageFolder:
    """Images found under a folder, sorted by relative path.

    Attributes:
        root: the folder that was searched; hashes use paths relative to it.
        layout: ``"div2k"`` (``DIV2K_{train,valid}_HR`` found) or ``"folder"`` (any images, recursively).
        images: the images; either all have an LR partner or none has.
    """

    root: Path
    layout: Literal["div2k", "folder"]
    images: tuple[ImagePair, ...]


@dataclass(frozen=True, kw_only=True, eq=False)
class PatchSet:
    """Paired LR/HR patches.

    Attributes:
        lr: ``(N, 3, tile, tile)`` float32 RGB in ``[-1, 1]``.
        hr: ``(N, 3, tile*scale, tile*scale)`` float32 RGB in ``[-1, 1]``.
        origins: per patch, the HR image and the top-left ``(y, x)`` of its HR crop (multiples of ``scale``).
        content_hash: sha256 hex over the parameters, the used files' relative paths and bytes, and the
            origins; equal hashes mean equal patches.
        scale: HR/LR size ratio.
        lr_source: ``"files"`` (aligned crops of given LR images) or ``"bicubic"`` (computed).
        params: the sampling parameters that entered the hash.
    """

    lr: np.ndarray
    hr: np.ndarray
    origins: tuple[PatchOrigin, ...]
    content_hash: str
    scale: int
    lr_source: Literal["files", "bicubic"]
    params: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of patches N."""
        return len(self.origins)


# ----------------------------------------------------------------------------------------------- finding images


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _rel(p: Path, root: Path) -> str:
    """``p`` relative to ``root``; its name when it lies elsewhere (a prepared :class:`ImageFolder` may list images of
    several folders, e.g. the default held-out set)."""
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name


def _find_lr(hr: Path, hr_root: Path, lr_root: Path, scale: int) -> Path | None:
    """LR partner of ``hr`` at the same relative place under ``lr_root``: ``{stem}x{scale}.*`` or ``{stem}.*``."""
    folder = lr_root / hr.relative_to(hr_root).parent
    for stem in (f"{hr.stem}x{scale}", hr.stem):
        for suffix in (hr.suffix, *sorted(IMAGE_SUFFIXES)):
            cand = folder / f"{stem}{suffix}"
            if cand.is_file():
                return cand
    return None


def _pair_all(hrs: list[Path], hr_root: Path, lr_root: Path | None, scale: int) -> list[ImagePair]:
    if lr_root is None:
        return [ImagePair(p) for p in hrs]
    pairs = [ImagePair(p, _find_lr(p, hr_root, lr_root, scale)) for p in hrs]
    missing = [_rel(p.hr, hr_root) for p in pairs if p.lr is None]
    if missing:
        raise InputError(
            f"{len(missing)} HR images have no LR partner in {lr_root} (expected e.g. "
            f"{Path(missing[0]).stem}x{scale}.png): {missing[:5]}. Restore them, or leave the LR folder out to "
            "compute LR by MATLAB bicubic."
        )
    return pairs


def _div2k_split_dirs(source: Path) -> list[Path]:
    if _DIV2K_HR.match(source.name):
        return [source]
    return [source / f"DIV2K_{s}_HR" for s in ("train", "valid") if (source / f"DIV2K_{s}_HR").is_dir()]


def find_images(source: Path, *, scale: int = 4, lr_dir: Path | None = None) -> ImageFolder:
    """List the images under ``source``, detecting the DIV2K layout.

    DIV2K: ``source`` holds ``DIV2K_train_HR`` and/or ``DIV2K_valid_HR`` (or is one of them); when
    ``DIV2K_{split}_LR_bicubic/X{scale}`` sits beside an HR folder, ``0001.png`` is paired with ``0001x4.png``.
    Otherwise every file with an image suffix (jpg, png, webp, bmp, tif) under ``source`` is taken,
    recursively; ``lr_dir`` then optionally gives LR partners at the same relative paths.

    Args:
        source: folder to search.
        scale: HR/LR size ratio, used to find LR partners.
        lr_dir: LR folder for a non-DIV2K ``source`` (files named ``{stem}x{scale}.*`` or ``{stem}.*``).

    Returns:
        The :class:`ImageFolder`, images sorted by path relative to ``source``.

    Raises:
        InputError: ``source`` is not a folder, holds no image files, or an LR partner is missing.
    """
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"image folder {source} does not exist or is not a folder")
    split_dirs = _div2k_split_dirs(source)
    if split_dirs:
        pairs: list[ImagePair] = []
        for hr_dir in split_dirs:
            split = _DIV2K_HR.match(hr_dir.name).group(1)  # type: ignore[union-attr]
            lr_root = hr_dir.parent / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
            hrs = sorted((p for p in hr_dir.iterdir() if _is_image(p)), key=lambda p: p.name)
            pairs += _pair_all(hrs, hr_dir, lr_root if lr_root.is_dir() else None, scale)
        layout: Literal["div2k", "folder"] = "div2k"
    else:
        files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: _rel(p, source))
        if lr_dir is not None and Path(lr_dir).resolve().is_relative_to(source.resolve()):
            files = [p for p in files if not p.resolve().is_relative_to(Path(lr_dir).resolve())]
        hrs = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not hrs:
            others = [_rel(p, source) for p in files[:5]]
            what = f"only {len(files)} non-image files, e.g. {others}" if files else "nothing: it is empty"
            raise InputError(f"no images (jpg/png/webp/bmp/tif) in {source}; it holds {what}")
        pairs = _pair_all(hrs, source, Path(lr_dir) if lr_dir is not None else None, scale)
        layout = "folder"
    if not pairs:
        raise InputError(f"no images in the DIV2K folders {[str(d) for d in split_dirs]}")
    logger.debug("found %d images (%s layout) in %s", len(pairs), layout, source)
    return ImageFolder(root=source, layout=layout, images=tuple(pairs))


# ----------------------------------------------------------------------------------------------- reading images


def _probe(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the header; InputError if the file is not a readable image."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{path} is not a readable image ({e})") from e
    return h, w


def _read_rgb(path: Path) -> np.ndarray:
    """Decode to an ``(H, W, 3)`` float64 array in ``[0, 1]`` (16-bit grey kept at full precision)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = np.asarray(im, dtype=np.float64) / 65535.0
                return np.repeat(grey[:, :, None], 3, axis=2)
            if im.mode == "F":
                raise InputError(f"{path} is a floating-point image (mode F); save it as 8- or 16-bit")
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{path} could not be decoded ({e}); remove or replace it") from e


def _usable_images(folder: ImageFolder, hr_size: int, scale: int) -> list[tuple[ImagePair, int, int]]:
    """Images with room for an HR patch, as ``(pair, crop_h, crop_w)``.

    The crop area is the part of the HR image covered by its LR partner, if any. Unreadable files raise;
    too-small ones are skipped with a warning.
    """
    unreadable: list[str] = []
    small: list[tuple[ImagePair, int, int]] = []
    usable: list[tuple[ImagePair, int, int]] = []
    for pair in folder.images:
        try:
            h, w = _probe(pair.hr)
            if pair.lr is not None:
                lh, lw = _probe(pair.lr)
                if lh not in (h // scale, -(-h // scale)) or lw not in (w // scale, -(-w // scale)):
                    raise InputError(f"LR {pair.lr} is {lw}x{lh}, expected about {w / scale:g}x{h / scale:g}")
                h, w = min(h, lh * scale), min(w, lw * scale)
        except InputError as e:
            unreadable.append(str(e))
            continue
        (usable if min(h, w) >= hr_size else small).append((pair, h, w))
    if unreadable:
        raise InputError(f"{len(unreadable)} bad image files in {folder.root}: " + "; ".join(unreadable[:10]))
    names = [f"{_rel(p.hr, folder.root)} ({w}x{h})" for p, h, w in small]
    if not usable:
        raise InputError(
            f"all {len(small)} images in {folder.root} are smaller than the {hr_size}x{hr_size} HR patch: "
            f"{names[:10]}. Use a smaller tile or larger images."
        )
    if small:
        logger.warning("skipping %d images smaller than %dx%d: %s", len(small), hr_size, hr_size, names[:10])
    return usable


# ----------------------------------------------------------------------------------------------- sampling


def _lr_bicubic(img: np.ndarray, y: int, x: int, hr_size: int, scale: int) -> np.ndarray:
    """LR of the HR crop at (y, x) as it appears in ``imresize(img, 1/scale)``.

    The crop is resized with ``4*scale`` pixels of context (more than the antialias kernel's reach), so the
    result equals cropping the bicubic LR of the whole image; at the image border MATLAB's mirroring applies.
    """
    margin = 4 * scale
    y0, x0 = max(0, y - margin), max(0, x - margin)
    y1, x1 = min(img.shape[0], y + hr_size + margin), min(img.shape[1], x + hr_size + margin)
    lr = imresize(img[y0:y1, x0:x1], 1.0 / scale)
    ty, tx, t = (y - y0) // scale, (x - x0) // scale, hr_size // scale
    return lr[ty : ty + t, tx : tx + t]


def _pick_positions(
    img: np.ndarray, crop_h: int, crop_w: int, hr_size: int, scale: int, count: int, gen: np.random.Generator,
    min_std: float,
) -> list[tuple[int, int]]:  # fmt: skip
    """``count`` top-left corners on the ``scale`` grid; with ``min_std > 0`` prefer non-flat patches."""
    ny, nx = (crop_h - hr_size) // scale + 1, (crop_w - hr_size) // scale + 1
    out = []
    for _ in range(count):
        best, best_std = (0, 0), -1.0
        for _try in range(_MAX_TRIES if min_std > 0 else 1):
            y, x = int(gen.integers(ny)) * scale, int(gen.integers(nx)) * scale
            std = float(img[y : y + hr_size, x : x + hr_size].mean(axis=2).std()) if min_std > 0 else 0.0
            if std > best_std:
                best, best_std = (y, x), std
            if std >= min_std:
                break
        out.append(best)
    return out


def _file_digest(h: hashlib._Hash, path: Path, root: Path) -> None:
    """Add a file's place (relative to ``root``, else its name: an LR folder elsewhere) and bytes to ``h``."""
    name = _rel(path, root) if path.is_relative_to(root) else path.name
    h.update(name.encode() + b"\0")
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _check_args(num_patches: int, tile: int, scale: int, min_std: float) -> None:
    for name, v in (("num_patches", num_patches), ("tile", tile), ("scale", scale)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 <= min_std < 1.0:
        raise InputError(f"min_std must be in [0, 1), got {min_std}")


def sample_patches(
    source: Path | ImageFolder,
    *,
    num_patches: int,
    tile: int = 64,
    scale: int = 4,
    seed: int = 0,
    lr_dir: Path | None = None,
    min_std: float = 0.0,
    lr_uint8: bool = True,
    progress: bool = False,
) -> PatchSet:
    """Cut ``num_patches`` paired LR/HR patches from a folder of images, deterministically.

    Images are sorted by relative path; a ``numpy`` Generator seeded with ``seed`` permutes them and patches
    are dealt round-robin over that order, so every image gives at most ``ceil(num_patches / n_images)``
    patches and fewer patches than images use a random subset. Positions within image ``i`` come from
    ``default_rng([seed, i])`` on the ``scale``-aligned grid.

    Args:
        source: an image folder (see :func:`find_images`, DIV2K detected) or a prepared :class:`ImageFolder`.
        num_patches: number of patches N.
        tile: LR patch side; the HR patch side is ``tile * scale``.
        scale: super-resolution factor.
        seed: random seed; same folder + arguments + seed give identical patches and hash.
        lr_dir: LR folder paired by name (non-DIV2K folders only); when absent and not DIV2K with LR, LR is
            MATLAB-bicubic ``imresize(HR, 1/scale)`` of the image around the crop.
        min_std: if > 0, draw up to 10 positions per patch and take the first whose grey standard deviation
            (``[0, 1]`` units) reaches it, else the busiest one: avoids flat sky/wall patches.
        lr_uint8: round computed LR to 8 bits, as a saved LR image would be (DIV2K's LR files are 8-bit).
        progress: show a tqdm bar over images.

    Returns:
        The :class:`PatchSet` (float32 NCHW in ``[-1, 1]``).

    Raises:
        InputError: the folder is missing or has no images, a file is unreadable (named), an LR partner is
            missing or mis-sized, or every image is smaller than the HR patch (named; smaller images are
            skipped with a warning when others are usable).
    """
    _check_args(num_patches, tile, scale, min_std)
    t0 = time.perf_counter()
    folder = source if isinstance(source, ImageFolder) else find_images(Path(source), scale=scale, lr_dir=lr_dir)
    hr_size = tile * scale
    usable = _usable_images(folder, hr_size, scale)
    order = np.random.default_rng(seed).permutation(len(usable))
    assigned: dict[int, list[int]] = {}
    for k in range(num_patches):
        assigned.setdefault(int(order[k % len(usable)]), []).append(k)

    lr_out = np.empty((num_patches, 3, tile, tile), np.float32)
    hr_out = np.empty((num_patches, 3, hr_size, hr_size), np.float32)
    origins: list[PatchOrigin | None] = [None] * num_patches
    with_lr = folder.images[0].lr is not None
    for i in tqdm(sorted(assigned), desc="patches", unit="img", disable=not progress):
        pair, crop_h, crop_w = usable[i]
        img = _read_rgb(pair.hr)
        lr_img = _read_rgb(pair.lr) if pair.lr is not None else None
        gen = np.random.default_rng([seed, i])
        positions = _pick_positions(img, crop_h, crop_w, hr_size, scale, len(assigned[i]), gen, min_std)
        for k, (y, x) in zip(assigned[i], positions, strict=True):
            hr = img[y : y + hr_size, x : x + hr_size]
            if lr_img is not None:
                lr = lr_img[y // scale : y // scale + tile, x // scale : x // scale + tile]
            else:
                lr = np.clip(_lr_bicubic(img, y, x, hr_size, scale), 0.0, 1.0)
                lr = np.round(lr * 255.0) / 255.0 if lr_uint8 else lr
            hr_out[k] = hr.transpose(2, 0, 1) * 2.0 - 1.0
            lr_out[k] = lr.transpose(2, 0, 1) * 2.0 - 1.0
            origins[k] = PatchOrigin(pair.hr, y, x)

    params: dict[str, object] = {
        "version": _HASH_VERSION, "num_patches": num_patches, "tile": tile, "scale": scale, "seed": seed,
        "min_std": min_std, "lr_uint8": lr_uint8, "lr_source": "files" if with_lr else "bicubic",
    }  # fmt: skip
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for i in sorted(assigned):
        for p in (usable[i][0].hr, usable[i][0].lr):
            if p is not None:
                _file_digest(h, p, folder.root)
    final = tuple(o for o in origins if o is not None)
    h.update(json.dumps([(_rel(o.path, folder.root), o.y, o.x) for o in final]).encode())
    logger.info(
        "sampled %d patches (%dx%d HR, LR %s) from %d of %d images in %s in %.1f s",
        num_patches, hr_size, hr_size, params["lr_source"], len(assigned), len(folder.images), folder.root,
        time.perf_counter() - t0,
    )  # fmt: skip
    return PatchSet(
        lr=lr_out, hr=hr_out, origins=final, content_hash=h.hexdigest(), scale=scale,
        lr_source="files" if with_lr else "bicubic", params=params,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- shipped set


def default_calibration_dir() -> Path:
    """The calibration set shipped with the package: ``tadsr/data/calib`` (48 HR PNGs of 256x256).

    Use it as ``sample_patches(default_calibration_dir(), num_patches=48, tile=64)``: each file is exactly
    one x4 HR patch, so LR is the bicubic of the whole file.

    Raises:
        InputError: the folder is missing from this installation.
    """
    path = Path(__file__).resolve().parent / "data" / "calib"
    if not path.is_dir():
        raise InputError(f"shipped calibration set {path} is missing; reinstall tadsr-mobile")
    return path


def shipped_holdout_dir() -> Path:
    """The held-out supplement shipped with the package: ``tadsr/data/holdout`` (a smooth dusk sky, outside the
    calibration crops of its photo), which the default held-out set adds to scikit-image's sample photos."""
    return Path(__file__).resolve().parent / "data" / "holdout"

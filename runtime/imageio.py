"""Host-side image I/O for the runtime: list, read and write images, convert to and from model tensors.

numpy and Pillow only (an app that runs an exported model has no torch).

Reading follows the upstream pipeline (ResShift/SinSR/TAD-SR, spec §4.2: grey replicated to 3 channels,
``float32 / 255``, ``(x - 0.5) / 0.5``) and fixes its edge cases:

* 16-bit PNG/TIFF samples are divided by 65535 (upstream divides by 255 and goes out of range). Pillow
  reads 16-bit grey at full precision but truncates 16-bit RGB(A) to 8 bits; for those files the image is
  decoded twice, once for the high and once for the low byte of every sample (same decoder, same
  bits per pixel, only the unpacker differs), which recovers the exact 16-bit values without a new dependency.
* Alpha is kept apart (the model only sees RGB) and upscaled with :func:`upscale_alpha`.
* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as a photo viewer would show the image.
* Embedded ICC profiles are ignored (as upstream's OpenCV reader does); CMYK and other colour spaces are
  converted with Pillow's formulas and a warning.

Writing rounds half to even (``np.round``) after clamping to [0, 1], as upstream does, and replaces the
target atomically.
"""

from __future__ import annotations

import logging
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from tadsr.errors import InputError, NonFiniteOutputError
from tadsr.fileio import write_with

__all__ = [
    "write_atomically",
    "IMAGE_SUFFIXES",
    "LoadedImage",
    "list_images",
    "read_image",
    "write_png",
    "to_model",
    "from_model",
    "upscale_alpha",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
"""Suffixes (lower case) that :func:`list_images` picks up in a folder; matched case-insensitively."""

# What Pillow raises on files it cannot open or decode (truncated data, bad chunks, broken headers...);
# UnidentifiedImageError is an OSError.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error, Image.DecompressionBombError)

_NATIVE = "L" if sys.byteorder == "little" else "B"
# 16-bit multi-channel raw modes that Pillow truncates to 8 bits -> raw mode that yields the low bytes instead.
_LOW_BYTE_RAWMODE = {
    "RGB;16B": "RGB;16L",
    "RGB;16L": "RGB;16B",
    "RGB;16N": "RGB;16B" if _NATIVE == "L" else "RGB;16L",
    "RGBA;16B": "RGBA;16L",
    "RGBA;16L": "RGBA;16B",
    "RGBA;16N": "RGBA;16B" if _NATIVE == "L" else "RGBA;16L",
}
_GREY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class LoadedImage:
    """An image read from disk, ready for :func:`to_model`.

    Attributes:
        path: the file it was read from.
        rgb: HxWx3 float32 in [0, 1], EXIF orientation applied; grey images are replicated to 3 channels.
        alpha: HxW float32 in [0, 1], or None when the file has no transparency.
        bit_depth: 8 or 16, the precision of the stored samples; write the output with it to keep it.
        source_mode: the Pillow mode of the file (e.g. ``"RGB"``, ``"I;16"``, ``"P"``, ``"CMYK"``).
        size: ``(width, height)`` after EXIF orientation (Pillow's order; ``rgb.shape[:2]`` is (height, width)).
    """

    path: Path
    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    source_mode: str
    size: tuple[int, int]


def list_images(path: Path) -> list[Path]:
    """The images to process: ``path`` itself if it is a file, else the images in the folder.

    A folder is not searched recursively; files whose suffix is in :data:`IMAGE_SUFFIXES` (any case) are
    returned sorted by name, hidden files (name starting with ``.``, e.g. macOS ``._x.jpg``) are skipped.
    A file given explicitly is returned whatever its suffix; :func:`read_image` checks its content.

    Args:
        path: an image file or a folder.

    Returns:
        The image paths, at least one.

    Raises:
        InputError: ``path`` does not exist, or the folder holds no image.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise InputError(f"input {path} does not exist; give an image file or a folder of images")
    if not path.is_dir():
        raise InputError(f"input {path} is neither a file nor a folder")
    images = sorted(
        p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not images:
        suffixes = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise InputError(f"folder {path} holds no image ({suffixes}, any case)")
    logger.debug("found %d images in %s", len(images), path)
    return images


def read_image(path: Path) -> LoadedImage:
    """Read an image as float RGB in [0, 1] (plus alpha), at the file's full precision.

    Modes: ``1``, ``L``, ``I;16*`` and ``I`` (taken as 16-bit, values must lie in 0..65535) become grey
    replicated to RGB; ``LA``/``RGBA``/``P`` with transparency keep their alpha; 16-bit RGB(A) and grey+alpha
    PNG/TIFF are read at 16 bits (see the module docstring); ``CMYK``, ``YCbCr``, ... are converted with
    Pillow's formulas (a warning says so; no ICC colour management). Float images (mode ``F``) are refused.
    Multi-frame files (animated WebP, multi-page TIFF) give their first frame.

    Args:
        path: the image file.

    Returns:
        The decoded image.

    Raises:
        InputError: the file is missing, not an image, truncated, empty, or in an unsupported mode;
            the message names the file and the reason.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            source_mode = img.mode
            if getattr(img, "n_frames", 1) > 1:
                logger.warning("%s has %d frames; using the first", path, img.n_frames)
            width, height = img.size
            if width == 0 or height == 0:
                raise InputError(f"cannot read image {path}: it has zero size ({width}x{height})")
            low_rawmode = _low_byte_rawmode(img)
            if low_rawmode is not None or _tile_rawmode(img) == "LA;16B":
                pixels, bit_depth = _read_wide(path, img, low_rawmode)
            else:
                img.load()
                pixels, bit_depth = _pixels(ImageOps.exif_transpose(img), path)
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"cannot read image {path}: the file does not exist") from e
    except (IsADirectoryError, PermissionError) as e:
        raise InputError(f"cannot read image {path}: {e.strerror}") from e
    except _DECODE_ERRORS as e:
        raise InputError(f"cannot read image {path}: not a readable image or truncated ({e})") from e
    rgb, alpha = _split_channels(pixels)
    logger.debug("read %s: mode %s, %d-bit, %dx%d", path, source_mode, bit_depth, rgb.shape[1], rgb.shape[0])
    return LoadedImage(
        path=path,
        rgb=rgb,
        alpha=alpha,
        bit_depth=bit_depth,
        source_mode=source_mode,
        size=(rgb.shape[1], rgb.shape[0]),
    )


def _tile_rawmode(img: Image.Image) -> str | None:
    """The raw mode of the first decoder tile (before ``load``), or None when there is none."""
    tiles = getattr(img, "tile", None)
    if not tiles:
        return None
    args = tiles[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return rawmode if isinstance(rawmode, str) else None


def _low_byte_rawmode(img: Image.Image) -> str | None:
    """For a 16-bit RGB(A) file that Pillow would truncate to 8 bits, the raw mode giving the low bytes."""
    rawmode = _tile_rawmode(img)
    return _LOW_BYTE_RAWMODE.get(rawmode) if rawmode is not None else None


def _decode_as(path: Path, rawmode: str | None) -> np.ndarray:
    """Decode ``path`` again with every tile's raw mode replaced (same bits per pixel); EXIF orientation applied."""
    with Image.open(path) as img:
        if rawmode is not None:
            img.tile = [
                t._replace(args=(rawmode, *t.args[1:]) if isinstance(t.args, tuple) else rawmode) for t in img.tile
            ]
        img.load()
        return np.asarray(ImageOps.exif_transpose(img))


def _read_wide(path: Path, img: Image.Image, low_rawmode: str | None) -> tuple[np.ndarray, int]:
    """Full-precision pixels of a 16-bit RGB(A) or grey+alpha file Pillow would truncate; HxWxC float32."""
    if low_rawmode is not None:  # RGB(A) 16: high bytes with the usual raw mode, low bytes with the swapped one
        high = _decode_as(path, None).astype(np.uint16)
        low = _decode_as(path, low_rawmode).astype(np.uint16)
        wide = (high << 8) | low
    else:  # PNG grey+alpha 16 (mode RGBA, raw "LA;16B", 32 bits/pixel): take the bytes as (L hi, L lo, A hi, A lo)
        raw = _decode_as(path, "RGBA").astype(np.uint16)
        wide = np.stack([(raw[..., 0] << 8) | raw[..., 1], (raw[..., 2] << 8) | raw[..., 3]], axis=-1)
    if "transparency" in img.info:
        logger.warning("%s: the 16-bit transparency key is ignored", path)
    logger.debug("%s: 16-bit %s read at full precision", path, img.mode)
    return wide.astype(np.float32) / np.float32(65535.0), 16


def _pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, int]:
    """Pixels of a loaded image as HxWxC float32 in [0, 1], C in {1, 2, 3, 4}, and the bit depth."""
    mode = img.mode
    if mode in _GREY16_MODES or mode == "I":
        arr = np.asarray(img)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(
                f"cannot read image {path}: 32-bit integer samples outside 0..65535 "
                f"(range {arr.min()}..{arr.max()}); save it as 8- or 16-bit"
            )
        return (arr.astype(np.float32) / np.float32(65535.0))[..., None], 16
    if mode == "F":
        raise InputError(
            f"cannot read image {path}: floating-point images (mode F) are not supported; save it as 8- or 16-bit"
        )
    img = _to_8bit_mode(img, path)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr.astype(np.float32) / np.float32(255.0), 8


def _to_8bit_mode(img: Image.Image, path: Path) -> Image.Image:
    """Convert an 8-bit image to one of L, LA, RGB, RGBA (keeping transparency)."""
    mode, has_key = img.mode, "transparency" in img.info
    if mode in ("LA", "RGBA"):
        return img
    if mode in ("L", "RGB"):  # a transparency key (tRNS colour) becomes an alpha channel
        return img.convert("RGBA") if has_key else img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        palette_alpha = img.palette is not None and img.palette.mode == "RGBA"
        return img.convert("RGBA" if has_key or palette_alpha or mode == "PA" else "RGB")
    if mode in ("La", "RGBa"):
        return img.convert("RGBA")
    if mode == "RGBX":
        return img.convert("RGB")
    try:
        converted = img.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot read image {path}: unsupported mode {mode}; save it as RGB") from e
    logger.warning("%s: mode %s converted to RGB with Pillow's formula (no ICC colour management)", path, mode)
    return converted


def _split_channels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """HxWxC (C in 1..4) -> contiguous HxWx3 RGB and HxW alpha (or None)."""
    channels = pixels.shape[-1]
    colour = pixels[..., : 3 if channels >= 3 else 1]
    alpha = pixels[..., -1] if channels in (2, 4) else None
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    rgb = np.ascontiguousarray(colour, dtype=np.float32)
    return rgb, None if alpha is None else np.ascontiguousarray(alpha, dtype=np.float32)


def write_png(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None, bit_depth: int = 8) -> None:
    """Write an RGB(A) PNG atomically.

    Samples are clamped to [0, 1], scaled to 255 (or 65535), rounded half to even (``np.round``, as upstream)
    and stored as 8- (or 16-) bit. The file is written next to ``path`` under a hidden temporary name and
    moved over ``path`` with ``os.replace``, so a reader never sees a partial file. The folder must exist.

    Args:
        path: the output file (``.png``).
        rgb: HxWx3 float in [0, 1].
        alpha: HxW float in [0, 1], stored as a 4th channel; None for an RGB PNG.
        bit_depth: 8 or 16.

    Raises:
        InputError: the folder does not exist or cannot be written (full, read-only), wrong shapes or an
            unsupported bit depth (nothing is written).
        NonFiniteOutputError: the image holds NaN or infinite values (nothing is written).
    """
    path = Path(path)
    if bit_depth not in (8, 16):
        raise InputError(f"bit_depth must be 8 or 16, got {bit_depth}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputError(f"rgb must be HxWx3 with H, W >= 1, got shape {rgb.shape}")
    planes = [rgb]
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != rgb.shape[:2]:
            raise InputError(f"alpha must be HxW = {rgb.shape[:2]}, got shape {alpha.shape}")
        planes.append(alpha[..., None])
    samples = np.concatenate(planes, axis=-1).astype(np.float32)
    if not np.isfinite(samples).all():
        raise NonFiniteOutputError(
            f"refusing to write {path}: the image holds NaN or infinite values (the model's weights are probably "
            "broken or overflow; check the checkpoint or artifact)"
        )
    peak = 255.0 if bit_depth == 8 else 65535.0
    quantised = np.round(np.clip(samples, 0.0, 1.0) * np.float32(peak))
    if bit_depth == 8:
        image = Image.fromarray(quantised.astype(np.uint8))  # HxWx3 -> RGB, HxWx4 -> RGBA
        write_atomically(path, lambda f: image.save(f, format="PNG"))
    else:
        data = _encode_png16(quantised.astype(np.uint16))
        write_atomically(path, lambda f: f.write(data))
    logger.debug(
        "wrote %s (%dx%d, %d-bit%s)", path, rgb.shape[1], rgb.shape[0], bit_depth, ", alpha" * (alpha is not None)
    )


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write`` into a temporary file in ``path``'s folder, then ``os.replace`` it onto ``path``
    (:func:`tadsr.fileio.write_with`)."""
    write_with(Path(path), write)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png16(samples: np.ndarray) -> bytes:
    """Encode HxWxC uint16 (C 3 or 4) as a 16-bit RGB(A) PNG; Pillow cannot write those.

    Every row uses PNG filter 1 ("Sub": byte minus the same byte one pixel to the left, modulo 256),
    which is vectorised and compresses photographs well.
    """
    height, width, channels = samples.shape
    raw = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(height, width * channels * 2)
    bpp = channels * 2
    filtered = raw.copy()
    filtered[:, bpp:] -= raw[:, :-bpp]  # uint8 arithmetic wraps modulo 256, as the filter requires
    rows = np.concatenate([np.ones((height, 1), np.uint8), filtered], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 16, 6 if channels == 4 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def to_model(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 RGB in [0, 1] -> (1, 3, H, W) float32 in [-1, 1], computed as upstream: ``(x - 0.5) / 0.5``."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"rgb must be HxWx3, got shape {rgb.shape}")
    x = (rgb - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def from_model(x: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) model output -> HxWx3 float32 RGB in [0, 1].

    Clamps to [-1, 1] first, then ``x * 0.5 + 0.5`` (clamped to [0, 1] again against rounding), as upstream.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise InputError(f"model output must be (1, 3, H, W) or (3, H, W), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise NonFiniteOutputError(
            "the model output holds NaN or infinite values (its weights are probably broken or overflow; check "
            "the checkpoint or artifact); nothing was written"
        )
    rgb = np.clip(np.clip(x, -1.0, 1.0) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def upscale_alpha(alpha: np.ndarray, scale: int = 4) -> np.ndarray:
    """Upscale an alpha channel to go with the super-resolved RGB.

    The SR model only sees RGB, so alpha is resized on the host: Pillow's bicubic filter on the float
    channel (mode ``F``, no 8-bit rounding), clamped to [0, 1] because the cubic kernel overshoots at hard
    edges. Bicubic keeps mask edges smooth at the new resolution (nearest would give 4x4 staircases, bilinear
    visibly blurs) and costs nothing next to the model.

    Args:
        alpha: HxW float in [0, 1].
        scale: integer upscaling factor.

    Returns:
        (scale*H)x(scale*W) float32 in [0, 1].
    """
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim != 2:
        raise InputError(f"alpha must be HxW, got shape {alpha.shape}")
    if scale < 1:
        raise InputError(f"scale must be >= 1, got {scale}")
    height, width = alpha.shape
    resized = Image.fromarray(alpha).resize((width * scale, height * scale), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)

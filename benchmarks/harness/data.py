"""Benchmark data and fidelity: the evaluation images (:func:`load_images`) and the metrics of one output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.bench.config import BenchImage
from tadsr.errors import InputError
from tadsr.imresize import imresize
from tadsr.metrics import color_error, crop_border, error_stats, lr_consistency, psnr, rgb_to_y, ssim
from tadsr.runtime.imageio import from_model, read_image, to_model


def round8(rgb: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(rgb, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _center_crop(img: np.ndarray, side: int, multiple: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = min(h, side) // multiple * multiple, min(w, side) // multiple * multiple
    y, x = (h - ch) // 2 // multiple * multiple, (w - cw) // 2 // multiple * multiple
    return img[y : y + ch, x : x + cw]


def load_images(
    data: Path, *, lr_dir: Path | None = None, scale: int = 4, max_images: int | None = None, hr_crop: int | None = None
) -> tuple[list[BenchImage], dict[str, Any]]:
    """Read HR images (and LR partners, or make LR with MATLAB bicubic) for the benchmark.

    HR images are cropped to multiples of ``scale`` (top-left kept, as BasicSR's ``mod_crop``), optionally centre-
    cropped to ``hr_crop``. Without ``lr_dir``, LR = ``imresize(HR, 1/scale)`` rounded to 8 bits (as MATLAB does
    on uint8 images and as DIV2K's LR files are). A DIV2K layout (``DIV2K_valid_HR`` + ``..._LR_bicubic/X4``)
    is paired automatically.

    Returns:
        The images and a JSON-ready description (source, LR source, names and sizes).

    Raises:
        InputError: no images, unreadable files, or an LR partner whose size is not HR / scale.
    """
    from tadsr.patches import find_images

    data = Path(data)
    if data.is_file():
        pairs = [(data, None)]
    else:
        folder = find_images(data, scale=scale, lr_dir=lr_dir)
        pairs = [(p.hr, p.lr) for p in folder.images]
    pairs = pairs[:max_images] if max_images else pairs
    images: list[BenchImage] = []
    for hr_path, lr_path in pairs:
        hr = read_image(hr_path).rgb
        h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
        if lr_path is not None:
            lr = read_image(lr_path).rgb
            if lr.shape[:2] != (hr.shape[0] // scale, hr.shape[1] // scale):
                raise InputError(
                    f"LR {lr_path} is {lr.shape[1]}x{lr.shape[0]}, HR {hr_path} is {hr.shape[1]}x"
                    f"{hr.shape[0]}: the LR must be the HR / {scale} (rounded down)"
                )
            if hr_crop:
                lh, lw = min(lr.shape[0], hr_crop // scale), min(lr.shape[1], hr_crop // scale)
                y, x = (lr.shape[0] - lh) // 2, (lr.shape[1] - lw) // 2
                lr = lr[y : y + lh, x : x + lw]
                hr = hr[y * scale : (y + lh) * scale, x * scale : (x + lw) * scale]
            hr = hr[: lr.shape[0] * scale, : lr.shape[1] * scale]
        else:
            hr = hr[:h, :w]
            hr = _center_crop(hr, hr_crop, scale) if hr_crop else hr
            lr = round8(imresize(hr.astype(np.float64), 1.0 / scale))
        if min(hr.shape[:2]) < 2 * scale + 11:
            raise InputError(
                f"{hr_path} is {hr.shape[1]}x{hr.shape[0]} HR px after cropping: too small for SSIM "
                f"(11x11 window) after the {scale}px border crop; use images of at least {2 * scale + 11} px"
            )
        images.append(BenchImage(hr_path.stem, to_model(lr), np.ascontiguousarray(hr, dtype=np.float32)))
    if not images:
        raise InputError(f"no images in {data}")
    info = {
        "source": str(data),
        "lr_source": "files" if lr_dir or any(lr for _, lr in pairs) else "matlab-bicubic",
        "hr_crop": hr_crop,
        "images": [{"name": im.name, "hr_size": [im.hr.shape[1], im.hr.shape[0]]} for im in images],
    }
    return images, info


def _finite(x: float) -> float:
    return 999.0 if math.isinf(x) else round(float(x), 4)


def output_fidelity(
    sr: np.ndarray, hr: np.ndarray, ref: np.ndarray | None, border: int, lr: np.ndarray | None = None
) -> dict[str, float]:
    """Metrics of one SR output (1,3,H,W) in [-1,1] against the HR (H,W,3) in [0,1], the reference output and
    the LR input (1,3,h,w) in [-1,1] (LR consistency)."""
    out = round8(from_model(sr))
    a, b = crop_border(out, border), crop_border(hr, border)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    m = {"psnr_y": psnr(ya, yb, 1.0), "ssim_y": ssim(ya, yb, 1.0), "psnr_rgb": psnr(a, b, 1.0), "ssim_rgb": ssim(a, b)}
    if lr is not None:
        m.update(lr_cons=min(lr_consistency(out, from_model(lr), border), 100.0), de00=color_error(out, hr, border))
    if ref is not None:
        st = error_stats(sr, ref, data_range=2.0)
        m.update(parity_psnr=st.psnr, parity_max_abs=st.max_abs)
    return {k: _finite(v) for k, v in m.items()}

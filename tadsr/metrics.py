"""Fidelity metrics in numpy: error statistics, PSNR, SSIM, Y channel (BasicSR conventions).

Everything here is numpy-only so that ``tadsr.runtime`` and benchmark code can use it without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ErrorStats", "error_stats", "psnr", "ssim", "rgb_to_y", "crop_border"]


@dataclass(frozen=True)
class ErrorStats:
    """Agreement of an output with its reference.

    Attributes:
        max_abs: largest absolute difference.
        mean_abs: mean absolute difference.
        psnr: PSNR in dB over ``data_range`` (``inf`` for identical arrays).
        data_range: peak-to-peak range used for the PSNR.
    """

    max_abs: float
    mean_abs: float
    psnr: float
    data_range: float

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        if math.isinf(d["psnr"]):
            d["psnr"] = 999.0  # JSON has no inf; 999 dB stands for "identical"
        return d


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    """PSNR in dB between two arrays of the same shape (``inf`` when identical)."""
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def error_stats(out: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> ErrorStats:
    """Max / mean absolute error and PSNR of ``out`` against ``ref``.

    Args:
        out: tested array.
        ref: reference array, same shape.
        data_range: PSNR peak; defaults to the reference's peak-to-peak range (at least 1e-12).
    """
    out, ref = _f64(out), _f64(ref)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch {out.shape} vs {ref.shape}")
    if data_range is None:
        data_range = max(float(ref.max() - ref.min()), 1e-12) if ref.size else 1.0
    diff = np.abs(out - ref)
    return ErrorStats(
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        psnr=psnr(out, ref, data_range),
        data_range=float(data_range),
    )


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB image in [0, 1], HWC or CHW (3 first), as in BasicSR / MATLAB ``rgb2ycbcr``.

    Returns Y in [16/255, 235/255].
    """
    img = _f64(img)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = np.moveaxis(img, 0, -1)
    return (img @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    """Crop ``border`` pixels from each side of the last two (CHW) or first two (HW / HWC) spatial axes."""
    if border <= 0:
        return img
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        return img[:, border:-border, border:-border]
    return img[border:-border, border:-border, ...]


def _gauss_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # 'valid' separable 11x11 Gaussian filter, as BasicSR's cv2.filter2D(...)[5:-5, 5:-5].
    k = kernel.shape[0]
    h, w = img.shape
    tmp = np.zeros((h, w - k + 1))
    for i in range(k):
        tmp += kernel[i] * img[:, i : i + w - k + 1]
    out = np.zeros((h - k + 1, w - k + 1))
    for i in range(k):
        out += kernel[i] * tmp[i : i + h - k + 1, :]
    return out


def _ssim_2d(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()
    mu_a, mu_b = _gauss_filter(a, g), _gauss_filter(b, g)
    s_aa = _gauss_filter(a * a, g) - mu_a**2
    s_bb = _gauss_filter(b * b, g) - mu_b**2
    s_ab = _gauss_filter(a * b, g) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return float(m.mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM (Wang et al. 2004; 11x11 Gaussian, sigma 1.5, valid region) of 2-D or 3-channel images.

    For 3-channel input (HWC or CHW) the mean over channels is returned.
    """
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.ndim == 2:
        return _ssim_2d(a, b, data_range)
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a, b = np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)
    return float(np.mean([_ssim_2d(a[..., c], b[..., c], data_range) for c in range(a.shape[-1])]))

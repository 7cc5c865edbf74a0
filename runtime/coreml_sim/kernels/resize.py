"""Image resizing kernels: nearest-neighbour and bilinear upsample / resize (MIL sampling modes), crop."""

from __future__ import annotations

import math

import numpy as np

from tadsr.runtime.coreml_sim.kernels.base import Args, kernel


def _nearest_index(n_in: int, n_out: int, scale: float) -> np.ndarray:
    return np.minimum(np.floor(np.arange(n_out) / scale).astype(np.int64), n_in - 1)


@kernel("upsample_nearest_neighbor", "resize_nearest_neighbor")
def _k_nearest(a: Args) -> np.ndarray:
    x = a["x"]
    h, w = x.shape[-2:]
    if a.op.type == "upsample_nearest_neighbor":
        sh, sw = float(a.py("scale_factor_height", 1)), float(a.py("scale_factor_width", 1))
        oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    else:
        oh, ow = int(a.py("target_size_height", 1)), int(a.py("target_size_width", 1))
        sh, sw = oh / h, ow / w
    return x[..., _nearest_index(h, oh, sh)[:, None], _nearest_index(w, ow, sw)[None, :]]


def _grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Source coordinates of the ``n_out`` samples (MIL resize_bilinear sampling modes)."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS"):
        if n_out == 1:
            g = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            g = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        g = i * ((n_in - n_in / n_out) / (n_out - 1) if n_out > 1 else 0.0)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        g = (i + 0.5) * (n_in / n_out) - 0.5
    elif mode == "ASYMMETRIC":  # upsample_bilinear with align_corners=False, half_pixel_centers=False
        g = i * (n_in / n_out)
    else:
        raise ValueError(mode)
    return np.clip(g, 0, n_in - 1)


def _bilinear(x: np.ndarray, oh: int, ow: int, mode: str) -> np.ndarray:
    out = x
    for axis, n_out in ((-2, oh), (-1, ow)):
        n_in = out.shape[axis]
        g = _grid(n_in, n_out, mode)
        lo = np.floor(g).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (g - lo).astype(np.float32)
        shape = [n_out, 1] if axis == -2 else [n_out]
        out = np.take(out, lo, axis=axis) * (1 - frac.reshape(shape)) + np.take(out, hi, axis=axis) * frac.reshape(
            shape
        )
    return out


@kernel("upsample_bilinear")
def _k_upsample_bilinear(a: Args) -> np.ndarray:
    x = a["x"]
    h, w = x.shape[-2:]
    oh = int(math.floor(h * float(a.py("scale_factor_height", 1))))
    ow = int(math.floor(w * float(a.py("scale_factor_width", 1))))
    align = bool(a.py("align_corners", True))
    half = bool(a.py("half_pixel_centers", not align))
    mode = "STRICT_ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half else "ASYMMETRIC")
    return _bilinear(x, oh, ow, mode)


@kernel("resize_bilinear")
def _k_resize_bilinear(a: Args) -> np.ndarray:
    mode = a.py("sampling_mode", "DEFAULT")
    if mode not in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"):
        raise a.unsupported(f"sampling_mode '{mode}'")
    return _bilinear(a["x"], int(a.py("target_size_height", 1)), int(a.py("target_size_width", 1)), mode)


@kernel("crop")
def _k_crop(a: Args) -> np.ndarray:
    x = a["x"]
    ch, cw = a.py("crop_height", [0, 0]), a.py("crop_width", [0, 0])
    return x[..., ch[0] : x.shape[-2] - ch[1], cw[0] : x.shape[-1] - cw[1]]


"""MATLAB-compatible bicubic ``imresize`` in numpy.

DIV2K's ``*_LR_bicubic`` images, and the LR inputs SR papers train and test on, are made with MATLAB's
``imresize(hr, 1/4, 'bicubic')``. PIL's and torch's bicubic differ from it (no antialiasing when
downscaling, other border handling), so this module re-implements MATLAB's definition:

* Keys' cubic kernel with ``a = -0.5``::

      k(x) = 1.5|x|^3 - 2.5|x|^2 + 1             for |x| <= 1
      k(x) = -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2     for 1 < |x| <= 2
      k(x) = 0                                   otherwise

* Output pixel ``i`` (0-based) samples the input at ``u = (i + 0.5) / scale - 0.5``: pixel centres line up.
* When downscaling with antialiasing, the kernel is stretched: ``h(x) = scale * k(scale * x)``, support
  ``4 / scale`` input pixels.
* The taps of each output pixel are normalised to sum to one.
* Taps outside the image are mirrored with the edge pixel repeated (``[... 1 0 | 0 1 ... n-1 | n-1 n-2 ...]``),
  as MATLAB's ``imresize`` does.
* The output size is ``ceil(scale * size)``; both axes use the same scale, so they are resized in MATLAB's
  order (rows first when the scales are equal).

The image is resized separably: one ``(out, in)`` weight matrix per axis.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from tadsr.errors import InputError

__all__ = ["cubic", "imresize", "resize_weights"]

logger = logging.getLogger(__name__)

_KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels, before antialias stretching


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``).

    Args:
        x: distances, any shape.

    Returns:
        Kernel values, same shape as ``x``, float64.
    """
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = 1.5 * ax3 - 2.5 * ax2 + 1.0
    outer = -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    return np.where(ax <= 1.0, inner, np.where(ax <= 2.0, outer, 0.0))


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Map any integer indices into ``[0, n)`` by symmetric reflection with the edge repeated."""
    period = 2 * n
    m = np.mod(idx, period)
    return np.where(m < n, m, period - 1 - m)


def resize_weights(in_size: int, out_size: int, scale: float, *, antialiasing: bool = True) -> np.ndarray:
    """Dense MATLAB bicubic resampling matrix for one axis.

    Args:
        in_size: input length (pixels), ``>= 1``.
        out_size: output length (pixels), ``>= 1``.
        scale: output/input scale factor (``0.25`` for a x4 downscale).
        antialiasing: stretch the kernel by ``1 / scale`` when ``scale < 1`` (MATLAB's default).

    Returns:
        ``(out_size, in_size)`` float64 matrix whose rows sum to one; ``out = W @ in``.
    """
    stretch = scale < 1.0 and antialiasing
    width = _KERNEL_WIDTH / scale if stretch else _KERNEL_WIDTH
    u = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5  # 0-based input coordinate of each output
    left = np.floor(u - width / 2.0).astype(np.int64)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.int64)[None, :]  # (out, taps) input indices, maybe outside
    dist = u[:, None] - idx
    w = scale * cubic(scale * dist) if stretch else cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], idx.shape)
    np.add.at(mat, (rows, _mirror(idx, in_size)), w)
    return mat


def imresize(img: np.ndarray, scale: float, *, antialiasing: bool = True) -> np.ndarray:
    """Resize an image like MATLAB's ``imresize(img, scale, 'bicubic')``.

    Args:
        img: ``(H, W)`` or ``(H, W, C)`` array. Float dtypes are kept (float32 in, float32 out); integer
            inputs are converted to float64 and, unlike MATLAB, not rounded back.
        scale: positive scale factor; ``1/4`` makes DIV2K-style x4 LR images.
        antialiasing: MATLAB's ``'Antialiasing'`` option (default on; only affects downscaling).

    Returns:
        ``(ceil(H*scale), ceil(W*scale)[, C])`` array. Values are not clipped: bicubic overshoots the input
        range slightly at edges.

    Raises:
        InputError: ``img`` is not 2-D/3-D, is empty, or ``scale`` is not a positive finite number.
    """
    arr = np.asarray(img)
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"imresize expects a non-empty (H, W) or (H, W, C) array, got shape {arr.shape}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"imresize scale must be a positive finite number, got {scale!r}")
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    h, w = arr.shape[:2]
    out_h, out_w = math.ceil(scale * h), math.ceil(scale * w)
    x = arr.astype(np.float64, copy=False)
    wh = resize_weights(h, out_h, scale, antialiasing=antialiasing)
    ww = resize_weights(w, out_w, scale, antialiasing=antialiasing)
    x = np.tensordot(wh, x, axes=(1, 0))  # rows first, as MATLAB does for equal scales
    x = np.moveaxis(np.tensordot(ww, x, axes=(1, 1)), 0, 1)
    logger.debug("imresize %s -> %s (scale %g)", arr.shape, x.shape, scale)
    return x.astype(out_dtype, copy=False)

"""Symmetric INT8 of constant tensors, shared by the ONNX and PT2E passes that store float constants as INT8."""

from __future__ import annotations

import numpy as np

__all__ = ["ADD_CONSTANT_MIN_ELEMENTS", "symmetric_int8"]

# float constants of at least this many elements read only by add nodes are stored INT8
# (onnx_ptq.compress_add_constants, executorch_ptq.int8_add_constants)
ADD_CONSTANT_MIN_ELEMENTS = 4096


def symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, float]:
    """INT8 in [-127, 127] with one float32 scale per index of ``axis`` (zero point 0; an all-zero slice gets 1).

    Returns ``(q, scale, max_abs_error)``: ``q`` int8 of ``w``'s shape, ``scale`` of length ``w.shape[axis]``.
    """
    w = np.asarray(w, dtype=np.float32)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(rows).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(rows / scale[:, None]), -127, 127).astype(np.int8)
    err = float(np.abs(q.astype(np.float32) * scale[:, None] - rows).max()) if rows.size else 0.0
    q = np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis)
    return np.ascontiguousarray(q), scale, err

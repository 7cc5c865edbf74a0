"""Shape kernels: reshape, transpose, split / concat / stack, slicing, pad, tile, space-depth, gather, fill."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tadsr.runtime.coreml_sim.kernels.base import Args, axes_param, kernel


@kernel("reshape")
def _k_reshape(a: Args) -> np.ndarray:
    x, shape = a["x"], [int(s) for s in a.py("shape")]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def _k_transpose(a: Args) -> np.ndarray:
    return np.transpose(a["x"], a.py("perm"))


@kernel("expand_dims")
def _k_expand_dims(a: Args) -> np.ndarray:
    x = a["x"]
    return np.expand_dims(x, tuple(int(i) for i in a.py("axes")))


@kernel("squeeze")
def _k_squeeze(a: Args) -> np.ndarray:
    x = a["x"]
    axes = axes_param(a, x.ndim)
    return np.squeeze(x, axis=axes)


@kernel("flatten2d")
def _k_flatten2d(a: Args) -> np.ndarray:
    x = a["x"]  # d_prior = prod(shape[:axis]) as a python slice: axis may equal rank ((3,), axis=1 -> (3, 1))
    return x.reshape(math.prod(x.shape[: int(a.py("axis", 1))]), -1)


@kernel("split")
def _k_split(a: Args) -> tuple[np.ndarray, ...]:
    x, axis = a["x"], int(a.py("axis"))
    sizes = a.py("split_sizes")
    if sizes is None:
        return tuple(np.split(x, int(a.py("num_splits")), axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@kernel("concat")
def _k_concat(a: Args) -> np.ndarray:
    vals, axis = a.many("values"), int(a.py("axis"))
    if not a.py("interleave", False):
        return np.concatenate(vals, axis=axis)
    axis %= vals[0].ndim
    stacked = np.stack(vals, axis=axis + 1)
    return stacked.reshape(*vals[0].shape[:axis], -1, *vals[0].shape[axis + 1 :])


@kernel("stack")
def _k_stack(a: Args) -> np.ndarray:
    return np.stack(a.many("values"), axis=int(a.py("axis")))


@kernel("slice_by_index")
def _k_slice_by_index(a: Args) -> np.ndarray:
    x = a["x"]
    r = x.ndim
    begin, end = a.py("begin"), a.py("end")
    stride = a.py("stride", [1] * r)
    bmask, emask = a.py("begin_mask", [False] * r), a.py("end_mask", [False] * r)
    smask = a.py("squeeze_mask", [False] * r)
    index: list[Any] = []
    for i in range(r):
        if smask[i]:
            index.append(int(begin[i]) % x.shape[i])
        else:
            index.append(slice(None if bmask[i] else int(begin[i]), None if emask[i] else int(end[i]), int(stride[i])))
    return x[tuple(index)]


@kernel("slice_by_size")
def _k_slice_by_size(a: Args) -> np.ndarray:
    x, begin, size = a["x"], a.py("begin"), a.py("size")
    index = []
    for dim, b, s in zip(x.shape, begin, size, strict=True):
        b = int(b) % dim if dim else 0
        index.append(slice(b, dim if int(s) == -1 else b + int(s)))
    return x[tuple(index)]


@kernel("tile")
def _k_tile(a: Args) -> np.ndarray:
    return np.tile(a["x"], a.py("reps"))


@kernel("pad")
def _k_pad(a: Args) -> np.ndarray:
    x, pad, mode = a["x"], [int(p) for p in a.py("pad")], a.py("mode", "constant")
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if mode == "constant":
        return np.pad(x, widths, constant_values=a.py("constant_val", 0.0))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise a.unsupported(f"pad mode '{mode}'")


@kernel("reverse")
def _k_reverse(a: Args) -> np.ndarray:
    x = a["x"]
    axes = axes_param(a, x.ndim)
    return np.flip(x, axis=axes)


@kernel("pixel_shuffle", "pixel_unshuffle", "depth_to_space", "space_to_depth")
def _k_space_depth(a: Args) -> np.ndarray:
    x, t = a["x"], a.op.type
    b = int(a.py({"pixel_shuffle": "upscale_factor", "pixel_unshuffle": "downscale_factor"}.get(t, "block_size")))
    n, c, h, w = x.shape
    if t == "pixel_shuffle":  # CRD order
        return x.reshape(n, c // b**2, b, b, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // b**2, h * b, w * b)
    if t == "depth_to_space":  # DCR order
        return x.reshape(n, b, b, c // b**2, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // b**2, h * b, w * b)
    y = x.reshape(n, c, h // b, b, w // b, b)
    perm = (0, 1, 3, 5, 2, 4) if t == "pixel_unshuffle" else (0, 3, 5, 1, 2, 4)
    return y.transpose(perm).reshape(n, c * b * b, h // b, w // b)


@kernel("band_part")
def _k_band_part(a: Args) -> np.ndarray:
    x = a["x"]
    lower, upper = int(a.py("lower", -1)), int(a.py("upper", -1))
    m, n = x.shape[-2:]
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, 0)


@kernel("shape")
def _k_shape(a: Args) -> np.ndarray:
    return np.array(a["x"].shape, dtype=np.int32)


@kernel("fill")
def _k_fill(a: Args) -> np.ndarray:
    return np.full([int(s) for s in a.py("shape")], a.get("value", np.float32(0.0)))


@kernel("range_1d")
def _k_range_1d(a: Args) -> np.ndarray:
    return np.arange(a["start"], a["end"], a["step"])


@kernel("gather")
def _k_gather(a: Args) -> np.ndarray:
    x, idx = a["x"], np.asarray(a["indices"]).astype(np.int64)
    axis, bd = int(a.py("axis", 0)), int(a.py("batch_dims", 0))
    axis %= x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if bd == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:bd]
    xb, ib = x.reshape(-1, *x.shape[bd:]), idx.reshape(-1, *idx.shape[bd:])
    out = np.stack([np.take(xb[k], ib[k], axis=axis - bd) for k in range(xb.shape[0])])
    return out.reshape(*lead, *out.shape[1:])


@kernel("gather_along_axis")
def _k_gather_along_axis(a: Args) -> np.ndarray:
    x, idx, axis = a["x"], np.asarray(a["indices"]).astype(np.int64), int(a.py("axis", 0))
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take_along_axis(x, idx, axis=axis)


@kernel("gather_nd")
def _k_gather_nd(a: Args) -> np.ndarray:
    x, idx, bd = a["x"], np.asarray(a["indices"]).astype(np.int64), int(a.py("batch_dims", 0))
    xb, ib = x.reshape(-1, *x.shape[bd:]), idx.reshape(-1, *idx.shape[bd:])  # tf.gather_nd with batch_dims
    out = np.stack([xb[k][tuple(np.moveaxis(ib[k], -1, 0))] for k in range(xb.shape[0])])
    return out.reshape(*x.shape[:bd], *out.shape[1:])


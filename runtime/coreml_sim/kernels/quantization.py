"""Quantization kernels: quantize / dequantize and the constexpr (compressed weight) ops."""

from __future__ import annotations

import math

import numpy as np

from tadsr.runtime.coreml_sim.errors import CoreMLSimError
from tadsr.runtime.coreml_sim.kernels.base import Args, kernel, per_axis
from tadsr.runtime.coreml_sim.reader import unpack_bits


@kernel("quantize")
def _k_quantize(a: Args) -> np.ndarray:
    x = a["input"]
    axis = a.py("axis")
    zp = per_axis(a.get("zero_point", np.int32(0)), x.ndim, axis).astype(np.float32)
    q = np.round(x / per_axis(a["scale"], x.ndim, axis)) + zp
    info = np.iinfo(np.int8 if a.py("output_dtype") == "int8" else np.uint8)
    return np.clip(q, info.min, info.max)


@kernel("dequantize", "constexpr_affine_dequantize")
def _k_dequantize(a: Args) -> np.ndarray:
    q = np.asarray(a["input" if a.op.type == "dequantize" else "quantized_data"]).astype(np.float32)
    axis = a.py("axis")
    zp = per_axis(np.asarray(a.get("zero_point", np.int32(0))), q.ndim, axis).astype(np.float32)
    return (q - zp) * per_axis(a["scale"], q.ndim, axis)


def _repeat_blocks(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, v.shape, strict=True)):
        if n % m:
            raise CoreMLSimError(f"block size does not divide: data dim {n} vs {m} blocks")
        v = np.repeat(v, n // m, axis=axis)
    return v


@kernel("constexpr_blockwise_shift_scale")
def _k_blockwise_shift_scale(a: Args) -> np.ndarray:
    data = np.asarray(a["data"]).astype(np.float32)
    off = _repeat_blocks(np.asarray(a["offset"]).astype(np.float32), data.shape) if a.has("offset") else 0.0
    return (data - off) * _repeat_blocks(a["scale"], data.shape)


@kernel("constexpr_lut_to_dense")
def _k_lut_to_dense(a: Args) -> np.ndarray:
    lut, idx = a["lut"], np.asarray(a["indices"])
    if a.has("shape"):  # iOS16: one LUT, indices packed into uint8 bytes
        shape = [int(s) for s in a.py("shape")]
        nbits = int(round(math.log2(lut.size)))
        return lut[unpack_bits(idx, nbits, math.prod(shape), False).astype(np.int64)].reshape(shape)
    k = idx.ndim  # iOS18: lut [*blocks, palettes, vector_size]
    vsize = lut.shape[-1]
    axis = int(a.py("vector_axis", 0)) % k if vsize > 1 else k - 1
    idx_t, lut_t = np.swapaxes(idx, -1, axis), np.swapaxes(lut, k - 1, axis)
    blocks = lut_t.shape[:k]
    rep = [n // m for n, m in zip(idx_t.shape, blocks, strict=True)]
    block_idx = np.ix_(*[np.arange(n) // r for n, r in zip(idx_t.shape, rep, strict=True)])
    vals = lut_t[block_idx + (idx_t.astype(np.int64),)]  # [*idx_t.shape, vector_size]
    out = vals.reshape(*idx_t.shape[:-1], idx_t.shape[-1] * vsize)
    return np.swapaxes(out, -1, axis)


@kernel("constexpr_cast")
def _k_constexpr_cast(a: Args) -> np.ndarray:
    return a["source_val"]


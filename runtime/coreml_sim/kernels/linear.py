"""Linear algebra, convolution and pooling kernels: linear, matmul, einsum, conv, conv_transpose, pools."""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from typing import Any

import numpy as np

from tadsr.runtime.coreml_sim.kernels.base import Args, kernel


@kernel("linear")
def _k_linear(a: Args) -> np.ndarray:
    y = np.matmul(a["x"], a["weight"].T)
    return y + a["bias"] if a.has("bias") else y


@kernel("matmul")
def _k_matmul(a: Args) -> np.ndarray:
    x, y = a["x"], a["y"]
    if a.py("transpose_x", False):
        x = np.swapaxes(x, -1, -2) if x.ndim > 1 else x
    if a.py("transpose_y", False):
        y = np.swapaxes(y, -1, -2) if y.ndim > 1 else y
    return np.matmul(x, y)


@kernel("einsum")
def _k_einsum(a: Args) -> np.ndarray:
    return np.einsum(a.py("equation"), *a.many("values"))


def _spatial_pads(a: Args, in_sizes: list[int], eff_kernel: list[int], strides: list[int]) -> list[tuple[int, int]]:
    pad_type = a.py("pad_type", "valid")
    if pad_type == "valid":
        return [(0, 0)] * len(in_sizes)
    if pad_type == "custom":
        p = a.py("pad", [0] * (2 * len(in_sizes)))
        return [(int(p[2 * i]), int(p[2 * i + 1])) for i in range(len(in_sizes))]
    if pad_type in ("same", "same_lower"):
        pads = []
        for i, k, s in zip(in_sizes, eff_kernel, strides, strict=True):
            total = max(0, (math.ceil(i / s) - 1) * s + k - i)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise a.unsupported(f"pad_type '{pad_type}'")


@kernel("conv")
def _k_conv(a: Args) -> np.ndarray:
    x, w = a["x"], a["weight"]
    nsp = x.ndim - 2
    strides = a.py("strides", [1] * nsp)
    dil = a.py("dilations", [1] * nsp)
    groups = int(a.py("groups", 1))
    ksz = list(w.shape[2:])
    eff = [(k - 1) * d + 1 for k, d in zip(ksz, dil, strict=True)]
    pads = _spatial_pads(a, list(x.shape[2:]), eff, strides)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    out_sz = [(p - e) // s + 1 for p, e, s in zip(xp.shape[2:], eff, strides, strict=True)]
    cig = w.shape[1]
    if nsp in (1, 2) and "torch" in sys.modules:  # torch's convolution, when the process has torch: 1-4x faster
        out = _conv_torch(xp, w, groups, strides, dil)
    elif nsp == 2 and cig * math.prod(ksz) >= 64:  # one GEMM over the unfolded windows (im2col): 1.3-2.4x faster
        out = _conv2d_im2col(xp, w, groups, strides, dil, out_sz)
    else:
        out = _conv_per_tap(xp, w, groups, strides, dil, out_sz)
    if a.has("bias"):
        out += a["bias"].reshape([1, -1] + [1] * nsp)
    return out


def _conv_torch(xp: np.ndarray, w: np.ndarray, groups: int, strides: list[int], dil: list[int]) -> np.ndarray:
    """1-D / 2-D float32 convolution of the padded ``xp`` by torch, with the process's torch threads. Used only
    when torch is already imported: the simulator itself never imports it (a torch-free process gets numpy)."""
    import torch
    import torch.nn.functional as F

    conv = F.conv2d if xp.ndim == 4 else F.conv1d
    x_t, w_t = (_tensor(v) for v in (xp, w))
    with torch.no_grad():
        return conv(x_t, w_t, stride=strides, dilation=dil, groups=groups).numpy()


def _tensor(v: np.ndarray) -> Any:
    """A torch view of a float32 array. Read-only arrays (the program's constants) are viewed too: torch only
    reads them here."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(v, np.float32))


def _conv2d_im2col(xp: np.ndarray, w: np.ndarray, groups: int, strides: list[int], dil: list[int],
                   out_sz: list[int]) -> np.ndarray:  # fmt: skip
    """2-D convolution of the padded ``xp`` as one matmul of the weights with the unfolded input windows."""
    from numpy.lib.stride_tricks import sliding_window_view

    n, cout, cig = xp.shape[0], w.shape[0], w.shape[1]
    kh, kw = w.shape[2:]
    eff = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
    win = sliding_window_view(xp, eff, axis=(2, 3))[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]
    win = win[:, :, : out_sz[0], : out_sz[1]]  # n, c, oh, ow, kh, kw
    cols = win.reshape(n, groups, cig, *out_sz, kh, kw).transpose(0, 1, 2, 5, 6, 3, 4)
    cols = cols.reshape(n, groups, cig * kh * kw, out_sz[0] * out_sz[1])
    return np.matmul(w.reshape(groups, cout // groups, cig * kh * kw), cols).reshape(n, cout, *out_sz)


def _conv_per_tap(xp: np.ndarray, w: np.ndarray, groups: int, strides: list[int], dil: list[int],
                  out_sz: list[int]) -> np.ndarray:  # fmt: skip
    """Convolution of the padded ``xp`` as one matmul per kernel tap, accumulated (any number of dimensions)."""
    n, cout, cig = xp.shape[0], w.shape[0], w.shape[1]
    ksz = list(w.shape[2:])
    xg = xp.reshape(n, groups, cig, *xp.shape[2:])
    wg = w.reshape(groups, cout // groups, cig, *ksz)
    out = np.zeros((n, groups, cout // groups, math.prod(out_sz)), dtype=np.float32)
    for pos in itertools.product(*[range(k) for k in ksz]):
        sl = tuple(
            slice(p * d, p * d + s * (o - 1) + 1, s) for p, d, s, o in zip(pos, dil, strides, out_sz, strict=True)
        )
        xs = xg[(slice(None),) * 3 + sl].reshape(n, groups, cig, -1)
        wk = wg[(slice(None),) * 3 + pos]
        out += wk[None] * xs if cig == 1 else np.matmul(wk, xs)
    return out.reshape(n, cout, *out_sz)


@kernel("conv_transpose")
def _k_conv_transpose(a: Args) -> np.ndarray:
    x, w = a["x"], a["weight"]  # weight: [C_in, C_out / groups, *K]
    nsp = x.ndim - 2
    strides, dil = a.py("strides", [1] * nsp), a.py("dilations", [1] * nsp)
    groups, ksz = int(a.py("groups", 1)), list(w.shape[2:])
    if a.py("pad_type", "valid") not in ("valid", "custom"):
        raise a.unsupported("conv_transpose with pad_type 'same' / 'same_lower'")
    pads = _spatial_pads(a, list(x.shape[2:]), ksz, strides)
    n, cin, cog = x.shape[0], x.shape[1], w.shape[1]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, ksz, dil, strict=True)]
    out = np.zeros((n, groups, cog, *full), dtype=np.float32)
    xg = x.reshape(n, groups, cin // groups, -1)
    wg = w.reshape(groups, cin // groups, cog, *ksz)
    for pos in itertools.product(*[range(k) for k in ksz]):
        contrib = np.matmul(np.swapaxes(wg[(slice(None),) * 3 + pos], 1, 2), xg).reshape(n, groups, cog, *x.shape[2:])
        sl = tuple(
            slice(p * d, p * d + s * (i - 1) + 1, s) for p, d, s, i in zip(pos, dil, strides, x.shape[2:], strict=True)
        )
        out[(slice(None),) * 3 + sl] += contrib
    out = out.reshape(n, groups * cog, *full)
    out = out[(slice(None),) * 2 + tuple(slice(b, f - e) for (b, e), f in zip(pads, full, strict=True))]
    target = a.op.outputs[0].shape
    if target is not None and tuple(out.shape) != target:  # output_shape asks for extra rows at the end
        grow = [(0, t - o) for o, t in zip(out.shape, target, strict=True)]
        out = np.pad(out, grow)
    if a.has("bias"):
        out = out + a["bias"].reshape([1, -1] + [1] * nsp)
    return out


@kernel("avg_pool", "max_pool", "l2_pool")
def _k_pool(a: Args) -> np.ndarray:
    x, ksz = a["x"], a.py("kernel_sizes")
    nsp = len(ksz)
    strides = a.py("strides", [1] * nsp)
    pads = _spatial_pads(a, list(x.shape[-nsp:]), ksz, strides)
    if a.py("ceil_mode", False):
        raise a.unsupported("ceil_mode=True")
    kind = a.op.type
    fill = -np.inf if kind == "max_pool" else 0.0
    lead = [(0, 0)] * (x.ndim - nsp)
    xp = np.pad(x if kind != "l2_pool" else x * x, lead + pads, constant_values=fill)
    ones = np.pad(np.ones(x.shape[-nsp:], np.float32), pads)
    out_sz = [(p - k) // s + 1 for p, k, s in zip(xp.shape[-nsp:], ksz, strides, strict=True)]
    acc = np.full(x.shape[:-nsp] + tuple(out_sz), fill, dtype=np.float32)
    count = np.zeros(out_sz, dtype=np.float32)
    for pos in itertools.product(*[range(k) for k in ksz]):
        sl = tuple(slice(p, p + s * (o - 1) + 1, s) for p, s, o in zip(pos, strides, out_sz, strict=True))
        win = xp[(Ellipsis,) + sl]
        acc = np.maximum(acc, win) if kind == "max_pool" else acc + win
        count += ones[sl]
    if kind == "max_pool":
        return acc
    if kind == "l2_pool":
        return np.sqrt(acc)
    return acc / (count if a.py("exclude_padding_from_average", False) else float(math.prod(ksz)))

"""Normalization and reduction kernels: layer / instance / batch / l2 norm, softmax, reduce_*, cumsum, sorting."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tadsr.runtime.coreml_sim.kernels.base import Args, axes_param, kernel


def _normalize(a: Args, x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    sq_sum = np.square(centered).sum(axis=axes, keepdims=True)
    a.note(x.sum(axis=axes))
    a.note(sq_sum)
    n = math.prod(x.shape[i] for i in axes)
    return centered / np.sqrt(sq_sum / n + np.float32(eps))


@kernel("layer_norm")
def _k_layer_norm(a: Args) -> np.ndarray:
    x = a["x"]
    axes = axes_param(a, x.ndim) or tuple(range(x.ndim))
    y = _normalize(a, x, axes, a.py("epsilon", 1e-5))
    pshape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if a.has("gamma"):
        y = y * a["gamma"].reshape(pshape)
    return y + a["beta"].reshape(pshape) if a.has("beta") else y


@kernel("instance_norm")
def _k_instance_norm(a: Args) -> np.ndarray:
    x = a["x"]
    y = _normalize(a, x, tuple(range(2, x.ndim)), a.py("epsilon", 1e-5))
    cshape = [1, -1] + [1] * (x.ndim - 2)
    y = y * a["gamma"].reshape(cshape) if a.has("gamma") else y
    return y + a["beta"].reshape(cshape) if a.has("beta") else y


@kernel("batch_norm")
def _k_batch_norm(a: Args) -> np.ndarray:
    x = a["x"]
    cshape = [1, -1] + [1] * (x.ndim - 2)
    y = (x - a["mean"].reshape(cshape)) / np.sqrt(a["variance"].reshape(cshape) + np.float32(a.py("epsilon", 1e-5)))
    y = y * a["gamma"].reshape(cshape) if a.has("gamma") else y
    return y + a["beta"].reshape(cshape) if a.has("beta") else y


@kernel("l2_norm")
def _k_l2_norm(a: Args) -> np.ndarray:
    x = a["x"]
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))
    sq = np.square(x).sum(axis=axes, keepdims=True)
    a.note(sq)
    return x / np.sqrt(sq + np.float32(a.py("epsilon", 1e-6)))


@kernel("softmax")
def _k_softmax(a: Args) -> np.ndarray:
    x, axis = a["x"], int(a.py("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


_REDUCE: dict[str, Callable[..., np.ndarray]] = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, **k: np.sum(np.abs(x), **k),
    "reduce_l2_norm": lambda x, **k: np.sqrt(np.sum(np.square(x), **k)),
    "reduce_sum_square": lambda x, **k: np.sum(np.square(x), **k),
    "reduce_log_sum": lambda x, **k: np.log(np.sum(x, **k)),
    "reduce_log_sum_exp": lambda x, **k: _log_sum_exp(x, **k),
}  # fmt: skip


def _log_sum_exp(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


@kernel(*_REDUCE)
def _k_reduce(a: Args) -> np.ndarray:
    x = a["x"]
    axes = axes_param(a, x.ndim)
    keep = bool(a.py("keep_dims", False))
    if a.op.type in ("reduce_sum", "reduce_mean", "reduce_l2_norm", "reduce_sum_square", "reduce_l1_norm"):
        a.note(np.sum(x if a.op.type in ("reduce_sum", "reduce_mean") else np.abs(x) ** 2, axis=axes))
    return np.asarray(_REDUCE[a.op.type](x, axis=axes, keepdims=keep))


@kernel("reduce_argmax", "reduce_argmin")
def _k_arg(a: Args) -> np.ndarray:
    x, axis = a["x"], int(a.py("axis", -1))
    idx = (np.argmax if a.op.type == "reduce_argmax" else np.argmin)(x, axis=axis)
    return np.expand_dims(idx, axis) if a.py("keep_dims", False) else idx


@kernel("cumsum")
def _k_cumsum(a: Args) -> np.ndarray:
    x, axis = a["x"], int(a.py("axis", 0))
    rev = bool(a.py("reverse", False))
    y = np.flip(x, axis) if rev else x
    c = np.cumsum(y, axis=axis)
    if a.py("exclusive", False):
        c = c - y
    return np.flip(c, axis) if rev else c


@kernel("topk")
def _k_topk(a: Args) -> tuple[np.ndarray, np.ndarray]:
    x, k, axis = a["x"], int(a.py("k", 1)), int(a.py("axis", -1))
    asc = bool(a.py("ascending", False))
    idx = np.argsort(x if asc else -x.astype(np.float64), axis=axis, kind="stable")  # -uint would wrap
    idx = np.take(idx, np.arange(x.shape[axis] if k == -1 else k), axis=axis)  # iOS17: k = -1 selects all
    values = np.take_along_axis(x, idx, axis=axis)
    return (values, idx) if a.py("return_indices", True) else values


@kernel("argsort")
def _k_argsort(a: Args) -> np.ndarray:
    x = a["x"]
    return np.argsort(x if a.py("ascending", False) else -x, axis=int(a.py("axis", -1)), kind="stable")


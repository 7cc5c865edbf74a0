"""Elementwise kernels: unary math and activations, binary arithmetic / comparisons / logic, clip, select, cast."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tadsr.runtime.coreml_sim.kernels.base import Args, kernel


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh, "ceil": np.ceil,
    "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor, "round": np.round,
    "sign": np.sign, "sin": np.sin, "sinh": np.sinh, "sqrt": np.sqrt, "square": np.square, "tan": np.tan,
    "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0, x), "softsign": lambda x: x / (1 + np.abs(x)),
    "logical_not": np.logical_not, "identity": lambda x: x, "erf": lambda x: _erf(x),
}  # fmt: skip
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod, "equal": np.equal,
    "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
    "greater_equal": np.greater_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}  # fmt: skip

_erf_f64 = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function in float64 (numpy has none): SciPy's vectorised ``special.erf`` (double precision) where
    SciPy is installed (scikit-image, a dependency, needs it), else ``math.erf`` per element (exact to double
    precision, ~20x slower: GELU was a fifth of the simulator's time)."""
    x = np.asarray(x)
    try:
        from scipy.special import erf
    except ImportError:
        return np.asarray(_erf_f64(x.astype(np.float64)), dtype=np.float64).astype(x.dtype)
    return erf(x.astype(np.float64)).astype(x.dtype)


@kernel(*_UNARY)
def _k_unary(a: Args) -> np.ndarray:
    return _UNARY[a.op.type](a["x"])


@kernel(*_BINARY)
def _k_binary(a: Args) -> np.ndarray:
    return _BINARY[a.op.type](a["x"], a["y"])


@kernel("rsqrt", "inverse", "log")
def _k_with_eps(a: Args) -> np.ndarray:
    default = {"rsqrt": 1e-12, "inverse": 1e-4, "log": 1e-45}[a.op.type]
    x = a["x"] + np.float32(a.py("epsilon", default))
    return {"rsqrt": lambda: 1 / np.sqrt(x), "inverse": lambda: 1 / x, "log": lambda: np.log(x)}[a.op.type]()


@kernel("gelu")
def _k_gelu(a: Args) -> np.ndarray:
    x, mode = a["x"], a.py("mode", "EXACT")
    if mode == "EXACT":
        return (0.5 * x * (1 + _erf(x.astype(np.float64) / math.sqrt(2)))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(np.float32(-1.702) * x))
    raise a.unsupported(f"gelu mode '{mode}'")


@kernel("leaky_relu", "elu", "thresholded_relu", "prelu")
def _k_alpha(a: Args) -> np.ndarray:
    x, alpha, t = a["x"], a["alpha"], a.op.type
    if t == "prelu":
        alpha = alpha.reshape([1, -1] + [1] * (x.ndim - 2))
    if t in ("leaky_relu", "prelu"):
        return np.where(x >= 0, x, alpha * x)
    if t == "elu":
        return np.where(x > 0, x, alpha * np.expm1(x))
    return np.where(x >= alpha, x, 0)  # thresholded_relu: x if x >= alpha (MIL docs)


@kernel("clamped_relu", "scaled_tanh", "sigmoid_hard", "linear_activation", "softplus_parametric")
def _k_alpha_beta(a: Args) -> np.ndarray:
    x, al, be, t = a["x"], a["alpha"], a["beta"], a.op.type
    if t == "clamped_relu":
        return np.minimum(np.where(x >= 0, x, al * x), be)
    if t == "scaled_tanh":
        return al * np.tanh(be * x)
    if t == "sigmoid_hard":
        return np.clip(al * x + be, 0, 1)
    if t == "linear_activation":
        return al * x + be
    shape = [1, -1] + [1] * (x.ndim - 2)
    return al.reshape(shape) * np.logaddexp(0, be.reshape(shape) * x)


@kernel("clip")
def _k_clip(a: Args) -> np.ndarray:
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])


@kernel("threshold")
def _k_threshold(a: Args) -> np.ndarray:
    return np.maximum(a["x"], a["alpha"])


@kernel("select")
def _k_select(a: Args) -> np.ndarray:
    return np.where(a["cond"], a["a"], a["b"])


@kernel("cast")
def _k_cast(a: Args) -> np.ndarray:
    return a["x"]  # the executor converts to the declared output dtype (float -> int truncates, as numpy)


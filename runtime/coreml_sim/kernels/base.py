"""What every kernel uses: the op's arguments (:class:`Args`), the :func:`kernel` marker and axis helpers.

A kernel takes an :class:`Args` and returns the op's result(s) as numpy arrays (float32 for float ops; the
executor rounds them to the declared output type). Each op family lives in its own module of this package.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from tadsr.runtime.coreml_sim.errors import CoreMLSimError, UnsupportedOpError
from tadsr.runtime.coreml_sim.reader import Op

__all__ = ["Args", "Kernel", "as_dtype", "axes_param", "collect_kernels", "kernel", "per_axis"]

_HALF = (np.dtype(np.float16), np.dtype(np.float32))
_TORCH_CAST_MIN = 4096  # elements: below it numpy's conversion is as fast as the round trip through torch


def as_dtype(v: np.ndarray, dtype: Any) -> np.ndarray:
    """``v.astype(dtype, copy=False)``; float16 <-> float32 through torch when the process already has it.

    numpy converts half precision 6-8x slower than torch (F16C); in ``"as_written"`` mode every op's inputs and
    results cross that boundary, so numpy's conversion was two thirds of an fp16 program's time. Both round to
    nearest even, keep NaN / inf and handle subnormals the same way: the results are bit-identical (a NaN's
    payload bits aside).
    """
    dtype = np.dtype(dtype)
    if v.dtype == dtype:
        return v
    if v.size >= _TORCH_CAST_MIN and "torch" in sys.modules and v.dtype in _HALF and dtype in _HALF:
        import torch

        with warnings.catch_warnings():  # read-only constants are viewed: torch only reads them here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(v))
        return t.to(torch.float16 if dtype == np.float16 else torch.float32).numpy()
    return v.astype(dtype)


class Args:
    """Inputs of one op as the kernels see them: float tensors as float32 (rounded to fp16 first if asked)."""

    def __init__(self, op: Op, lookup: Callable[[Any], Any], round_fp16: bool) -> None:
        self.op = op
        self._lookup = lookup
        self._round = round_fp16
        self.intermediate: float | None = None  # largest |partial sum| a naive fp16 kernel would hold

    def _prep(self, v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            if self._round and v.dtype != np.float16:
                v = as_dtype(v, np.float16)
            return as_dtype(v, np.float32)  # no copy of a float32 value: kernels never write their inputs
        return v

    def has(self, key: str) -> bool:
        return key in self.op.inputs

    def __getitem__(self, key: str) -> Any:
        if key not in self.op.inputs:
            raise CoreMLSimError(f"{self.op.type} '{self.op.outputs[0].name}': required input '{key}' missing")
        return self._prep(self._lookup(self.op.inputs[key][0]))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.op.inputs else default

    def many(self, key: str) -> list[Any]:
        return [self._prep(self._lookup(b)) for b in self.op.inputs[key]]

    def py(self, key: str, default: Any = None) -> Any:
        """A (const) parameter as a python scalar, list or string, with its declared precision (never rounded)."""
        v = self._lookup(self.op.inputs[key][0]) if key in self.op.inputs else default
        return v.tolist() if isinstance(v, np.ndarray | np.generic) else v

    def note(self, magnitude: Any) -> None:
        m = float(np.max(np.abs(magnitude), initial=0.0))
        self.intermediate = m if self.intermediate is None else max(self.intermediate, m)

    def unsupported(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.op.type, self.op.outputs[0].name, detail)


Kernel = Callable[[Args], Any]
_MIL_OPS_ATTR = "__mil_ops__"


def kernel(*names: str) -> Callable[[Kernel], Kernel]:
    """Mark a function as the kernel of the MIL op types ``names`` (collected by :func:`collect_kernels`)."""

    def mark(fn: Kernel) -> Kernel:
        setattr(fn, _MIL_OPS_ATTR, names)
        return fn

    return mark


def collect_kernels(*modules: ModuleType) -> dict[str, Kernel]:
    """Op type -> kernel for the functions marked with :func:`kernel` in ``modules``; each op type once."""
    table: dict[str, Kernel] = {}
    for module in modules:
        for fn in vars(module).values():
            for name in getattr(fn, _MIL_OPS_ATTR, ()) if callable(fn) else ():
                if name in table:
                    raise CoreMLSimError(f"op '{name}' has two kernels ({table[name].__name__}, {fn.__name__})")
                table[name] = fn
    return table


def axes_param(a: Args, rank: int, key: str = "axes") -> tuple[int, ...] | None:
    ax = a.py(key)
    if ax is None:
        return None
    ax = [ax] if isinstance(ax, int) else ax
    return tuple(sorted(int(i) % rank for i in ax))


def per_axis(v: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """Broadcast a scalar / per-axis vector (quantization scale, zero point) against a rank-``rank`` tensor."""
    v = np.asarray(v)
    if v.ndim == 0 or v.ndim == rank:
        return v
    shape = [1] * rank
    shape[(axis if axis is not None else 0) % rank] = v.size
    return v.reshape(shape)


"""The simulator's kernels, one module per op family; :data:`KERNELS` maps each MIL op type to its kernel.

To support a new op, add a function marked ``@kernel("op_type")`` to the module of its family (or a new module
listed below) and a test in tests/test_coreml_sim.py that runs it against torch or coremltools.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tadsr.runtime.coreml_sim.kernels import elementwise, linear, quantization, reduction, resize, shape
from tadsr.runtime.coreml_sim.kernels.base import Args, Kernel, collect_kernels

__all__ = ["KERNELS", "SUPPORTED_OPS", "Args", "Kernel"]

KERNELS: Mapping[str, Kernel] = MappingProxyType(
    collect_kernels(elementwise, linear, reduction, shape, resize, quantization)
)
"""MIL op type -> kernel (read-only)."""

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted({*KERNELS, "const"}))
"""Every op type the simulator runs (``const`` is decoded when the program is read)."""

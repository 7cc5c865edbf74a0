"""Errors of the Core ML simulator and the fp16 range it models."""

from __future__ import annotations

from typing import Literal

from tadsr.errors import TadsrError

__all__ = ["FP16_MAX", "PRECISIONS", "CoreMLSimError", "Precision", "UnsupportedOpError"]

FP16_MAX = 65504.0
Precision = Literal["as_written", "fp32"]
PRECISIONS = ("as_written", "fp32")


class CoreMLSimError(TadsrError):
    """A .mlpackage the simulator cannot read or run."""


class UnsupportedOpError(CoreMLSimError, NotImplementedError):
    """An operation (or an op feature) the simulator does not implement."""

    def __init__(self, op_type: str, output: str, detail: str = "") -> None:
        """Name the op type and its (first) output variable, plus what exactly is missing."""
        msg = f"coreml_sim does not implement op '{op_type}' (output '{output}')"
        msg += f": {detail}" if detail else "; add a kernel under runtime/coreml_sim/kernels/ (see SUPPORTED_OPS)"
        super().__init__(msg)
        self.op_type = op_type
        self.output = output


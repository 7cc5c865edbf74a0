"""Reference executor for Core ML ML programs (.mlpackage), in numpy, so Core ML files can be checked on Linux.

Core ML itself only runs on Apple platforms. This module reads the program that ``coremltools`` wrote (the
``Model`` protobuf plus the MIL blob file ``weights/weight.bin``) and runs its operations in order with numpy.

Numerics model (``precision``):

* ``"as_written"``: an op whose declared output type is fp16 reads its float inputs rounded to fp16, computes in
  float32 and rounds its result to fp16 (values above 65504 become inf). So matmul / conv / reductions /
  normalizations accumulate in float32, the accumulation Apple describes for fp16 on the GPU and Neural Engine.
  fp32 ops compute in float32.
* ``"fp32"``: every op computes and stores float32. Weights keep the values stored in the file, so the difference
  between the two modes is the cost of fp16 *activations*, and the difference between ``"fp32"`` and the torch
  reference is the cost of the conversion itself.

This is a model, not the device: Core ML may fuse ops, keep fp16 intermediates inside an op or pick other
summation orders. Compound ops here never overflow inside (see ``OpReport.max_intermediate`` for the risk).

Layout: :mod:`.reader` (the .mlpackage / MIL program), :mod:`.kernels` (one module per op family),
:mod:`.executor` (:class:`SimProgram`, :func:`load_mlpackage`), :mod:`.report` (fp16 report), :mod:`.trace`
(:class:`OpTrace`, the caller-owned record of executed ops; the simulator keeps no module-level state).

Only numpy and coremltools' generated protobuf modules are used (coremltools' package ``__init__`` is not run, so
neither torch nor the converters are imported).
"""

from __future__ import annotations

from tadsr.runtime.coreml_sim.errors import FP16_MAX, CoreMLSimError, Precision, UnsupportedOpError
from tadsr.runtime.coreml_sim.executor import SimProgram, load_mlpackage
from tadsr.runtime.coreml_sim.kernels import SUPPORTED_OPS
from tadsr.runtime.coreml_sim.reader import parse_program as _parse_program  # noqa: F401  (tests read programs)
from tadsr.runtime.coreml_sim.report import OpReport, fp16_report
from tadsr.runtime.coreml_sim.trace import OpTrace

__all__ = [
    "FP16_MAX",
    "SUPPORTED_OPS",
    "CoreMLSimError",
    "UnsupportedOpError",
    "OpReport",
    "OpTrace",
    "Precision",
    "SimProgram",
    "load_mlpackage",
    "fp16_report",
]

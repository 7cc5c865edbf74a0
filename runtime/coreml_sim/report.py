"""fp16 health report of a simulated program: per op output, overflow, NaN/inf origin and precision lost."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tadsr.runtime.coreml_sim.errors import FP16_MAX
from tadsr.runtime.coreml_sim.kernels import Args
from tadsr.runtime.coreml_sim.reader import Op

if TYPE_CHECKING:
    from tadsr.runtime.coreml_sim.executor import SimProgram

__all__ = ["OpReport", "fp16_report"]

_DTYPE_NAMES = {np.float16: "fp16", np.float32: "fp32", np.float64: "fp64"}


@dataclass(frozen=True)
class OpReport:
    """fp16 health of one op output, from :func:`fp16_report`.

    Attributes:
        index: position of the op in execution order.
        name: output variable name.
        op_type: MIL op type.
        dtype: declared output type ("fp16" / "fp32").
        max_abs: largest finite magnitude of the fp32 shadow (the op computed in float32 on the same inputs).
        n_above_fp16_max: finite shadow values with magnitude > 65504 (they become inf when stored as fp16).
        n_nan: NaNs in the as-written (fp16) result.
        n_inf: infs in the as-written result.
        inputs_finite: whether all float inputs of the op were finite (False: NaN/inf came from upstream).
        local_rel_err: ``||fp16 result - shadow|| / ||shadow||`` over finite values: precision lost by this op.
        drift_rel_err: ``||fp16 result - fp32 program|| / ||fp32 program||`` over finite values: error
            accumulated from the inputs up to this op.
        max_intermediate: for sums, means and normalizations, the largest partial sum a naive fp16 kernel would
            hold (``None`` for other ops); above 65504 such a kernel would overflow although the output fits.
    """

    index: int
    name: str
    op_type: str
    dtype: str
    max_abs: float
    n_above_fp16_max: int
    n_nan: int
    n_inf: int
    inputs_finite: bool
    local_rel_err: float
    drift_rel_err: float
    max_intermediate: float | None

    @property
    def overflow(self) -> bool:
        """True when this op produced values above the fp16 range in an fp16 output."""
        return self.dtype == "fp16" and self.n_above_fp16_max > 0

    @property
    def severity(self) -> int:
        """4 overflow here, 3 NaN/inf created here, 2 NaN/inf from upstream, 1 fp16-range risk, 0 fine."""
        if self.overflow:
            return 4
        if self.n_nan + self.n_inf:
            return 3 if self.inputs_finite else 2
        risk = self.n_above_fp16_max > 0 or (self.max_intermediate or 0.0) > FP16_MAX
        return 1 if risk else 0


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    ok = np.isfinite(x64) & np.isfinite(r64)
    if not ok.any():
        return math.nan
    num = float(np.linalg.norm(x64[ok] - r64[ok]))
    den = float(np.linalg.norm(r64[ok]))
    return num / den if den > 0 else num


def fp16_report(program: SimProgram, inputs: Mapping[str, np.ndarray]) -> list[OpReport]:
    """Run ``program`` as written and in fp32 and report each float op output, most severe first.

    Severity order: ops whose fp16 output overflowed (their float32 shadow exceeds 65504), ops that created
    NaN/inf from finite inputs, ops that only propagated NaN/inf (these three by execution order, so the origin
    comes first), ops at risk (fp32 values above the fp16 range, or a partial sum above it), then the rest by
    drift from the fp32 program (largest first).
    """
    ref = program.execute(inputs, "fp32")
    reports: list[OpReport] = []

    def observe(op: Op, args: Args, raws: tuple, stored: list, lookup: Callable[[Any], Any]) -> None:
        in_finite = True
        for bs in op.inputs.values():
            for b in bs:
                v = lookup(b)
                if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
                    in_finite = False
        for var, raw, out in zip(op.outputs, raws, stored, strict=True):
            if var.dtype not in _DTYPE_NAMES:
                continue
            shadow = np.asarray(raw, dtype=np.float32)
            finite = np.abs(shadow[np.isfinite(shadow)])
            reports.append(
                OpReport(
                    index=op.index,
                    name=var.name,
                    op_type=op.type,
                    dtype=_DTYPE_NAMES[var.dtype],
                    max_abs=float(finite.max(initial=0.0)),
                    n_above_fp16_max=int((finite > FP16_MAX).sum()),
                    n_nan=int(np.isnan(out).sum()),
                    n_inf=int(np.isinf(out).sum()),
                    inputs_finite=in_finite,
                    local_rel_err=_rel_err(out, shadow),
                    drift_rel_err=_rel_err(out, ref[var.name]),
                    max_intermediate=args.intermediate,
                )
            )

    program.execute(inputs, "as_written", observe)

    def order(r: OpReport) -> tuple[int, float]:
        drift = r.drift_rel_err if math.isfinite(r.drift_rel_err) else math.inf
        return -r.severity, float(r.index) if r.severity >= 2 else -drift

    return sorted(reports, key=order)

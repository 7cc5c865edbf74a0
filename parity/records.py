"""What :func:`tadsr.parity.check.check_parity` records: checks, per-output comparisons (:class:`OutputCheck`,
the :class:`tadsr.parity.hops.HopResult` of export time), whole-image checks, diagnoses, the result; JSON through
``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tadsr.formats.localize import CodeFlips, Localization, WeightCheck
from tadsr.metrics import db_json
from tadsr.parity.hops import Floor, HopResult


@dataclass
class Check:
    """A yes/no check with its explanation (integrity, interface, constants, weights)."""

    name: str
    passed: bool
    detail: str
    stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "stage": self.stage}


OutputCheck = HopResult
"""One output on the cases of one kind, for one hop: the comparison record shared with export and quantize time
(:class:`tadsr.parity.hops.HopResult`, with SSIM and, for INT8 runtime hops, quantization steps)."""


@dataclass
class Diagnosis:
    """Why a file (or set) fails: the failing checks and the localisation(s)."""

    summary: str
    localizations: list[Localization] = field(default_factory=list)
    weights: WeightCheck | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "localizations": [x.to_dict() for x in self.localizations],
                "weights": None if self.weights is None else self.weights.to_dict(), "notes": self.notes}  # fmt: skip


@dataclass
class ArtifactCheck:
    """Everything checked for one artifact folder."""

    path: Path
    graph: str
    format: str
    precision: str
    tile: int
    checks: list[Check] = field(default_factory=list)
    outputs: list[HopResult] = field(default_factory=list)
    quant_scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    real_source: str = ""
    reference_warnings: list[str] = field(default_factory=list)
    diagnosis: Diagnosis | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks) and all(o.passed for o in self.outputs)

    def failures(self) -> list[str]:
        out = [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]
        out += [o.describe() for o in self.outputs if not o.passed]
        if self.error:
            out.insert(0, f"error: {self.error}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "graph": self.graph, "format": self.format, "precision": self.precision,
                "tile": self.tile, "passed": self.passed, "error": self.error,
                "checks": [c.to_dict() for c in self.checks], "outputs": [o.to_dict() for o in self.outputs],
                "quant_scales": self.quant_scales, "real_inputs": self.real_source,
                "reference_warnings": self.reference_warnings,
                "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
                "seconds": round(self.seconds, 2)}  # fmt: skip


@dataclass
class ImageCheck:
    """One whole image through the tiler: artifact vs reference (and, below the floor, the code-flip analysis)."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    psnr: float
    ssim: float
    passed: bool
    code_flips: CodeFlips | None = None
    latent_psnr: float | None = None
    same_codes_psnr: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr_shape": list(self.shape), "max_abs": db_json(self.max_abs),
                "mean_abs": db_json(self.mean_abs), "psnr": db_json(self.psnr, 5), "ssim": db_json(self.ssim, 6),
                "passed": self.passed, "code_flips": None if self.code_flips is None else self.code_flips.to_dict(),
                "latent_psnr": db_json(self.latent_psnr, 5), "same_codes_psnr": db_json(self.same_codes_psnr, 5),
                "note": self.note}  # fmt: skip


@dataclass
class SetCheck:
    """Whole images through a fused pipeline artifact or a component set."""

    kind: str
    members: dict[str, Path]
    format: str
    precision: str
    tile: int
    floor: Floor | None = None
    images: list[ImageCheck] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    diagnosis: Diagnosis | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind} {self.format}/{self.precision}/t{self.tile}"

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks) and all(i.passed for i in self.images)

    def to_dict(self) -> dict[str, Any]:
        fl = None if self.floor is None else {"max_abs": self.floor.max_abs, "psnr": self.floor.psnr,
                                              "source": self.floor.source}  # fmt: skip
        return {"kind": self.kind, "members": {k: str(v) for k, v in self.members.items()}, "format": self.format,
                "precision": self.precision, "tile": self.tile, "passed": self.passed, "error": self.error,
                "floor": fl, "images": [i.to_dict() for i in self.images],
                "checks": [c.to_dict() for c in self.checks],
                "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
                "seconds": round(self.seconds, 2)}  # fmt: skip


@dataclass
class ParityResult:
    """All artifacts and sets checked by one :func:`check_parity` call."""

    root: Path
    artifacts: list[ArtifactCheck] = field(default_factory=list)
    sets: list[SetCheck] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(a.passed for a in self.artifacts) and all(s.passed for s in self.sets)

    @property
    def errors(self) -> bool:
        return any(a.error for a in self.artifacts) or any(s.error for s in self.sets)

    @property
    def exit_code(self) -> int:
        """0 all passed; 1 a parity failure; 2 nothing failed but something could not be checked."""
        if self.passed:
            return 0
        failed = any(not a.passed and a.error is None for a in self.artifacts) or any(
            not s.passed and s.error is None for s in self.sets
        )
        return 1 if failed else 2

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "tadsr parity", "root": str(self.root), "passed": self.passed, "exit_code": self.exit_code,
                "options": self.options, "artifacts": [a.to_dict() for a in self.artifacts],
                "sets": [s.to_dict() for s in self.sets]}  # fmt: skip


def db_str(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"

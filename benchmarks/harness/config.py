"""The benchmark's configuration and results: :class:`BenchConfig`, :class:`BenchImage`, :class:`SystemResult`,
:class:`BenchResult` (used by :mod:`tadsr.bench.bench`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tadsr.errors import ConfigError


MEMORY_MODES = ("subprocess", "inprocess", "off")
REPORT_SCHEMA = "tadsr-bench/1"


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to benchmark and under which conditions.

    Attributes:
        out_dir: report folder (created; files replaced atomically).
        data: folder (or file) of HR images; None for latency only (a seeded random LR tile).
        lr_dir: LR partners of the HR images (``{stem}x{scale}.*`` or ``{stem}.*``); default: MATLAB bicubic.
        artifacts: artifact folders, or folders of artifacts (every runnable set inside is benchmarked).
        preset, student, teacher, autoencoder, init: the PyTorch reference (as :func:`tadsr.pipeline.load_models`);
            ``preset=None`` takes the artifacts' preset.
        light_autoencoder: also the student with the light autoencoder (``torch-student-light``, the reference of
            light artifacts): a checkpoint, or True for the preset's shipped one.
        teacher_steps: teacher sampling steps (0: no teacher).
        threads: torch threads, ONNX Runtime intra-op threads and the ExecuTorch thread pool (None: defaults).
        repeats: timed passes per system (>= 5 for numbers worth reporting); warmup: untimed passes before them.
        seed: noise seed of the tiler (every system gets the same noise per tile).
        tile: LR tile side (None: the artifacts' tile, else 64); overlap: LR overlap between tiles.
        memory: ``"subprocess"``, ``"inprocess"`` or ``"off"`` (see the module docstring).
        coreml_sim: also run Core ML artifacts through the numpy simulator (labelled; not a latency).
        max_images: use at most this many images; hr_crop: centre-crop HR images to at most this side.
        grid_crop: side (HR pixels) of the crops in the image grid.
        color_fix: also the student and the do-nothing baseline with this colour fix (:mod:`tadsr.color_fix`),
            as ``torch-student [FIX]`` and ``do_nothing [FIX]``; artifacts exported with a fix get these rows too, as
            their reference and their floor, whatever this says.
    """

    out_dir: Path
    data: Path | None = None
    lr_dir: Path | None = None
    artifacts: tuple[Path, ...] = ()
    preset: str | None = None
    student: Path | None = None
    teacher: Path | None = None
    autoencoder: Path | None = None
    init: str | None = None
    light_autoencoder: Path | bool | None = None
    teacher_steps: int = 15
    threads: int | None = None
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    tile: int | None = None
    overlap: int = 16
    memory: str = "subprocess"
    coreml_sim: bool = False
    max_images: int | None = None
    hr_crop: int | None = None
    grid_crop: int = 128
    color_fix: str = "none"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if self.teacher_steps < 0 or self.seed < 0 or self.overlap < 0:
            raise ConfigError("teacher steps, seed and overlap must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.memory not in MEMORY_MODES:
            raise ConfigError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError("max_images must be >= 1")
        if self.hr_crop is not None and self.hr_crop < 16:
            raise ConfigError("hr_crop must be >= 16 HR pixels")
        from tadsr.color_fix import check_color_fix

        check_color_fix(self.color_fix)

    def model_source(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "student": path_str(self.student),
            "teacher": path_str(self.teacher),
            "autoencoder": path_str(self.autoencoder),
            "init": self.init,
        }


@dataclass(frozen=True)
class BenchImage:
    """One evaluation image: ``lr`` (1, 3, h, w) float32 in [-1, 1]; ``hr`` (s*h, s*w, 3) float32 in [0, 1]."""

    name: str
    lr: np.ndarray
    hr: np.ndarray


@dataclass
class SystemResult:
    """Everything measured for one system (JSON-ready through :meth:`to_dict`)."""

    name: str
    kind: str  # bicubic | torch | artifact
    format: str
    precision: str
    layout: str  # floor | reference | fused | components
    color_fix: str = "none"  # the colour fix of its output (tadsr.color_fix): torch rows and fused artifacts
    status: str = "ok"  # ok | needs macOS | unavailable | skipped
    note: str = ""
    simulator: bool = False
    paths: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    size_kind: str = ""
    threads: dict[str, Any] = field(default_factory=dict)
    load_s: float | None = None
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    artifact: dict[str, Any] = field(default_factory=dict)  # from the manifests: parity at export, INT8 share

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    """The benchmark: ``report`` (the JSON document), the per-system results and the files written."""

    report: dict[str, Any]
    systems: list[SystemResult]
    files: dict[str, Path]

    @property
    def ok(self) -> bool:
        """No requested system failed (``needs macOS`` is not a failure)."""
        return not any(s.status == "unavailable" for s in self.systems)


def path_str(p: Path | None) -> str | None:
    return None if p is None else str(p)

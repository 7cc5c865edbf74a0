"""Parity of exported files: a verdict against the floors of ``tadsr/numerics.json`` and, on failure, a diagnosis.

:func:`check_parity` takes an artifact folder (or a folder of artifacts) and, for each artifact:

1. **integrity**: the files match the sha256 in the manifest (a modified file fails here, and is still run
   and diagnosed);
2. **interface and constants**: the manifest's graph spec and schedule constants (``prior_noise_scale``,
   ``input_scale``, ...) equal those of the reference rebuilt for it; a wrong ``prior_noise_scale`` makes
   every component set built from the denoiser wrong, so it fails here, naming the *prior sample* step;
3. **tiles**: one seeded case (``GraphSpec.example_inputs(seed)``) and real LR patches (the shipped
   calibration set, or ``images``), with reference outputs from the PyTorch reference pipeline
   (:func:`tadsr.parity.hops.make_cases`); three hops as at export time (reference torch -> export-ready
   torch -> runtime, and reference -> runtime), each output with max abs, mean abs, PSNR and SSIM, and for
   INT8 files the error in quantization steps of the output's scale; judged by
   :func:`tadsr.parity.hops.load_floors` for the artifact's precision.

Then, for the fused ``pipeline`` artifact and for every complete encoder/denoiser/decoder set, **whole
images**: each image goes through :class:`tadsr.runtime.pipeline.MobileSRPipeline` (tiled, host noise) and
the reference goes through the *same* tiler with the same noise, so only the artifacts differ; judged by the
``pipeline`` floors. The VQ codebook search is a discrete choice: a latent within rounding of a tie between
two codes may pick the other one, which moves a patch of pixels although nothing is wrong (the floors table
names this risk for fp32). An image below its floor is therefore analysed: it still passes if the
artifact's latents agree with the reference's within the denoiser floor, *every* differing code is a
near-tie that the latent difference can reorder (a Cauchy-Schwarz bound, :func:`tadsr.formats.localize.code_flips`),
their number is within the floor's flip budget (``flips`` in ``numerics.json``), and the image equals, within
the floor, the reference decoder run on the artifact's own latents.

The per-tile hops (step 3) of decoder and pipeline artifacts are judged flip-aware in the same way by the
shared comparison (:mod:`tadsr.parity.vq` through :func:`tadsr.parity.hops.case_groups`), as at export and
quantize time: each case reports "N near-tie flips of M positions, max gap g" and is judged against the
reference decoded with the artifact's codes (ONNX: latent and codes tapped from the file; ExecuTorch and
Core ML programs: codes recovered from the image among near-tie candidates).

The reference is rebuilt from the manifest (preset and sources: ``random-fill`` -> the fill rule,
``bundled:<file>`` -> the preset's shipped weights, paths -> those checkpoints, sha256 verified), or from
explicit model arguments (:class:`ReferenceSpec`).

A failing artifact (or every artifact with ``diagnose=True``) is localised with :mod:`tadsr.formats.localize`: the
first block or schedule step whose output diverges, per backend; a failing component set is localised stage
by stage (encoder, prior sample, denoiser, decoder) on one tile.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr.checkpoint import sha256_file
from tadsr.config import Preset, get_preset
from tadsr.errors import CheckpointError, ConfigError, InputError, TadsrError
from tadsr.parity.hops import (
    HOP_REFERENCE,
    Floor,
    ParityCase,
    ReferenceRuns,
    VQCompare,
    artifact_view,
    case_groups,
    end_to_end_hop,
    load_floors,
    make_cases,
    flip_summary,
    flips_record,
    real_lr_patches,
    reference_runs_on,
    reference_view,
    run_cases_vq,
    runtime_hop,
    vq_judge,
)
from tadsr.formats.localize import (
    CodeFlips,
    GraphTrace,
    Localization,
    OnnxTap,
    WeightCheck,
    check_onnx_weights,
    code_flips,
    localize_chain,
    localize_coreml,
    localize_executorch,
    localize_onnx,
    onnx_codebook_input,
    onnx_output_scale,
    trace_graph,
    trace_program,
    unit_of_tensor,
)
from tadsr.metrics import error_stats, ssim
from tadsr.pipeline import Models, OneStepPipeline, bundled_weight_path, load_models
from tadsr.runtime.runner import (
    BACKENDS,
    MANIFEST_NAME,
    CheckedRunner,
    RunnerSpec,
    load_runner,
    read_manifest,
    verify_files,
)

__all__ = [
    "ArtifactCheck",
    "Check",
    "ImageCheck",
    "OutputCheck",
    "ParityOptions",
    "ParityResult",
    "ReferenceSpec",
    "SetCheck",
    "check_parity",
    "find_artifact_dirs",
    "render_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

_PSNR_JSON_INF = 999.0
_CONSTANT_STAGE = {"prior_noise_scale": "prior sample", "input_scale": "input scaling"}
_MAIN_OUTPUT = {"encoder": "z_y", "denoiser": "x0", "decoder": "sr", "pipeline": "sr"}


def _num(x: float | None, digits: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if math.isinf(x):
        return _PSNR_JSON_INF if x > 0 else -_PSNR_JSON_INF
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class ReferenceSpec:
    """Where the PyTorch reference comes from: the manifest (all None) or explicit model arguments.

    Attributes:
        student, autoencoder: checkpoint paths.
        preset: preset name (default: the artifact manifest's preset).
        init: ``"random"`` for the deterministic fill rule on networks without a checkpoint.
    """

    student: Path | None = None
    autoencoder: Path | None = None
    preset: str | None = None
    init: str | None = None

    @property
    def from_manifest(self) -> bool:
        return self.student is None and self.autoencoder is None and self.preset is None and self.init is None


def _manifest_preset(manifest: Mapping[str, Any]) -> Preset:
    d = manifest.get("preset")
    if not isinstance(d, dict) or "name" not in d:
        raise InputError("the manifest records no preset; pass --preset NAME (and --student/--autoencoder)")
    try:
        return Preset.from_dict(d)
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(f"the manifest's preset cannot be read ({e}); pass --preset NAME") from e


def _weights_from_source(part: str, src: Any, preset: Preset) -> tuple[Path | None, bool]:
    """(checkpoint path or None, needs the random fill) for one network, sha256 checked.

    Raises:
        InputError: the source is missing or not reproducible (in-memory state dict, missing file).
        CheckpointError: the checkpoint's sha256 differs from the manifest's.
    """
    if not isinstance(src, Mapping) or "path" not in src:
        raise InputError(f"the manifest records no source for the {part}; pass --{part} CKPT")
    path, want = str(src["path"]), str(src.get("sha256") or "")
    if path == "random-fill":
        return None, True
    if path.startswith("bundled:"):
        p = bundled_weight_path(preset, part)
        if p is None or p.name != path.removeprefix("bundled:"):
            raise InputError(f"the {part} was exported from bundled weights {path!r}, which this installation of "
                             f"preset {preset.name!r} does not ship; pass --{part} CKPT")  # fmt: skip
    elif path.startswith("<"):
        raise InputError(f"the {part} was exported from {path}; pass its checkpoint with --{part} CKPT")
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"the {part} checkpoint recorded in the manifest, {p}, does not exist here; "
                             f"pass it with --{part} CKPT")  # fmt: skip
    if want:
        got = sha256_file(p)
        if got != want:
            raise CheckpointError(f"{p} has sha256 {got[:16]}..., the artifact was exported from "
                                  f"{want[:16]}...: not the same weights; pass the right --{part}")  # fmt: skip
    return p, False


def _load_reference(manifest: Mapping[str, Any], ref: ReferenceSpec) -> tuple[Models, list[str]]:
    """The reference networks for an artifact, and warnings about how they relate to its manifest."""
    warnings: list[str] = []
    if ref.from_manifest:
        preset = _manifest_preset(manifest)
        sources = manifest.get("sources") or {}
        parts = {part: _weights_from_source(part, sources.get(part), preset) for part in ("student", "autoencoder")}
        init = "random" if any(r for _, r in parts.values()) else None
        models = load_models(student=parts["student"][0], autoencoder=parts["autoencoder"][0], preset=preset,
                             init=init)  # fmt: skip
        return models, warnings
    preset = get_preset(ref.preset) if ref.preset else _manifest_preset(manifest)
    mp = (manifest.get("preset") or {}).get("name")
    if mp and mp != preset.name:
        warnings.append(f"reference preset {preset.name!r} differs from the artifact's preset {mp!r}")
    models = load_models(student=ref.student, autoencoder=ref.autoencoder, preset=preset, init=ref.init)
    for part in ("student", "autoencoder"):
        want = ((manifest.get("sources") or {}).get(part) or {}).get("sha256")
        got = models.sources.get(part, {}).get("sha256")
        if want and got and want != got:
            warnings.append(f"the reference {part} ({models.sources[part]['path']}) is not the checkpoint the "
                            "artifact was exported from (sha256 differs)")  # fmt: skip
    return models, warnings


# ------------------------------------------------------------------------------------------------- results


@dataclass
class Check:
    """A yes/no check with its explanation (integrity, interface, constants, weights)."""

    name: str
    passed: bool
    detail: str
    stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "stage": self.stage}


@dataclass
class OutputCheck:
    """One output on the cases of one kind, for one hop: worst case over the cases.

    Attributes:
        hop, inputs, output, n: hop name, ``"seeded"`` / ``"real"``, output name, number of cases.
        max_abs, mean_abs, psnr, ssim: worst over the cases (SSIM over the same peak as PSNR).
        data_range: PSNR peak (2 for images, the reference's peak-to-peak for latents).
        floor: the floor applied; passed: whether it holds.
        worst_case: case with the lowest PSNR.
        qsteps: max abs error in quantization steps of the output's scale (INT8 runtime hops), else None.
        flips: VQ images: the code-flip analysis per case (:mod:`tadsr.parity.vq`), which decides ``passed``.
        flips_source: how the tested and reference codes were obtained.
    """

    hop: str
    inputs: str
    output: str
    n: int
    max_abs: float
    mean_abs: float
    psnr: float
    ssim: float
    data_range: float
    floor: Floor
    passed: bool
    worst_case: str
    qsteps: float | None = None
    flips: list[Any] | None = None
    flips_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"hop": self.hop, "inputs": self.inputs, "output": self.output, "n": self.n,
                "max_abs": _num(self.max_abs), "mean_abs": _num(self.mean_abs), "psnr": _num(self.psnr, 5),
                "ssim": _num(self.ssim, 6), "data_range": _num(self.data_range), "qsteps": _num(self.qsteps, 4),
                "floor": {"max_abs": self.floor.max_abs, "psnr": self.floor.psnr, "source": self.floor.source,
                          "why": self.floor.why},
                "passed": self.passed, "worst_case": self.worst_case,
                "flips": flips_record(self.flips, self.flips_source)}  # fmt: skip


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
    outputs: list[OutputCheck] = field(default_factory=list)
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
        out += [_describe(o) for o in self.outputs if not o.passed]
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
        return {"name": self.name, "lr_shape": list(self.shape), "max_abs": _num(self.max_abs),
                "mean_abs": _num(self.mean_abs), "psnr": _num(self.psnr, 5), "ssim": _num(self.ssim, 6),
                "passed": self.passed, "code_flips": None if self.code_flips is None else self.code_flips.to_dict(),
                "latent_psnr": _num(self.latent_psnr, 5), "same_codes_psnr": _num(self.same_codes_psnr, 5),
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


def _describe(o: OutputCheck) -> str:
    fl = []
    if o.floor.max_abs is not None:
        fl.append(f"max abs <= {o.floor.max_abs:g}")
    if o.floor.psnr is not None:
        fl.append(f"PSNR >= {o.floor.psnr:g} dB")
    q = f", {o.qsteps:.2f} quant steps" if o.qsteps is not None else ""
    vq = ""
    if o.flips:
        bad = [f.line() for f in o.flips if not f.passed]
        vq = f"; VQ: {flip_summary(o.flips)}" + (f"; {'; '.join(bad)}" if bad else "")
    return (f"'{o.hop}' on {o.inputs} inputs, output '{o.output}': max abs {o.max_abs:.3g}, PSNR {_db(o.psnr)} dB"
            f"{q} (floor: {', '.join(fl) or 'none'}; worst case {o.worst_case}){vq}")  # fmt: skip


def _db(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


# ------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ParityOptions:
    """What :func:`check_parity` runs.

    Attributes:
        seed: seed of the seeded case and of the whole-image noise.
        patches: real LR patches per artifact (besides the seeded case).
        images: folder of images: real patches are cut from it (MATLAB bicubic /scale), and its images are the
            whole-image inputs; None: the shipped calibration set for both.
        whole_images: number of whole images per pipeline artifact / component set (0: none).
        max_side: whole images are centre-cropped to at most this many LR pixels per side (runtime bound).
        overlap: LR overlap between tiles.
        diagnose: localise every artifact, not only failing ones.
        backend: runner backend override (e.g. ``"coreml-sim"``).
        threads: intra-op threads for ONNX Runtime and torch (None: library defaults).
    """

    seed: int = 0
    patches: int = 3
    images: Path | None = None
    whole_images: int = 2
    max_side: int = 160
    overlap: int = 16
    diagnose: bool = False
    backend: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.seed < 0 or self.patches < 0 or self.whole_images < 0 or self.max_side < 1 or self.overlap < 0:
            raise ConfigError("seed, --patches, --whole-images and --overlap must be >= 0, --max-side >= 1")
        if self.images is not None and not Path(self.images).is_dir():
            raise InputError(f"--images {self.images} is not a folder of images")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# ----------------------------------------------------------------------------------------------- discovery


def find_artifact_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is an artifact folder, else its artifact subfolders (sorted, hidden ones skipped).

    Raises:
        InputError: ``path`` is not a folder, or holds no artifact.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a folder; pass an artifact folder (with {MANIFEST_NAME}) or their parent")
    if (path / MANIFEST_NAME).is_file():
        return [path]
    found = sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
    )
    if not found:
        raise InputError(f"{path} holds no artifact folder (none has a {MANIFEST_NAME}); pass the folder written "
                         "by tadsr export / tadsr quantize")  # fmt: skip
    return found


# ------------------------------------------------------------------------------------------------- session


_TRACES: OrderedDict[tuple, GraphTrace] = OrderedDict()
_TRACES_KEPT = 4


class _Session:
    """Caches shared by the artifacts of one call: reference networks, graphs, reference runs, traces."""

    def __init__(self, ref: ReferenceSpec, opts: ParityOptions) -> None:
        self.ref = ref
        self.opts = opts
        self._models: dict[str, tuple[Models, list[str]]] = {}
        self._graphs: dict[tuple[str, int], dict[str, Any]] = {}
        self._runs: dict[tuple[str, int], ReferenceRuns] = {}
        self._traces: dict[tuple[str, int, str, str], GraphTrace] = {}

    def key(self, manifest: Mapping[str, Any]) -> str:
        if not self.ref.from_manifest:
            return "args"
        return json.dumps([manifest.get("preset"), manifest.get("sources")], sort_keys=True, default=str)

    def models(self, manifest: Mapping[str, Any]) -> tuple[Models, list[str]]:
        k = self.key(manifest)
        if k not in self._models:
            t0 = time.perf_counter()
            self._models[k] = _load_reference(manifest, self.ref)
            logger.info("reference networks (%s): %.1fs", self._models[k][0].preset.name, time.perf_counter() - t0)
        return self._models[k]

    def graph(self, manifest: Mapping[str, Any], name: str, tile: int) -> tuple[Any, Any]:
        from tadsr.formats.graphs import make_graphs

        k = (self.key(manifest), tile)
        if k not in self._graphs:
            self._graphs[k] = make_graphs(self.models(manifest)[0], tile)
        return self._graphs[k][name]

    def runs(self, manifest: Mapping[str, Any], tile: int) -> ReferenceRuns:
        k = (self.key(manifest), tile)
        if k not in self._runs:
            models = self.models(manifest)[0]
            lrs, source = _real_patches(tile, models.preset.scale, self.opts)
            self._runs[k] = reference_runs_on(models, lrs, source)
        return self._runs[k]

    def trace(self, manifest: Mapping[str, Any], name: str, tile: int, variant: str) -> GraphTrace:
        k = (repr(self.ref), self.key(manifest), tile, name, variant)
        if k in _TRACES:  # traces outlive a call (a few seconds to a minute each): the last few are kept
            _TRACES.move_to_end(k)
            return _TRACES[k]
        if k not in self._traces:
            t0 = time.perf_counter()
            module, spec = self.graph(manifest, name, tile)
            if variant == "coreml":  # the program the Core ML exporter converts (rewrites + decompositions)
                from tadsr.formats.coreml.export import exported_program

                self._traces[k] = trace_program(exported_program(module, spec)[0], spec, "coreml export")
            else:
                self._traces[k] = trace_graph(module, spec, variant=variant)
            logger.info("torch.export of %s (%s naming) for localisation: %.1fs", name, variant,
                        time.perf_counter() - t0)  # fmt: skip
        _TRACES[k] = self._traces[k]
        while len(_TRACES) > _TRACES_KEPT:
            _TRACES.popitem(last=False)
        return self._traces[k]


def _real_patches(tile: int, scale: int, opts: ParityOptions) -> tuple[np.ndarray, str]:
    if opts.images is None:
        return real_lr_patches(tile, scale, opts.patches)
    from tadsr.patches import sample_patches

    if opts.patches == 0:
        return np.zeros((0, 3, tile, tile), np.float32), "none"
    ps = sample_patches(Path(opts.images), num_patches=opts.patches, tile=tile, scale=scale, seed=opts.seed)
    return ps.lr.astype(
        np.float32
    ), f"{opts.images}: {opts.patches} patches (MATLAB bicubic /{scale}), seed {opts.seed}"


# ---------------------------------------------------------------------------------------------- one artifact


def _open_runner(path: Path, manifest: dict[str, Any], verified: bool, opts: ParityOptions) -> CheckedRunner:
    """``load_runner``, or (for a file that failed its sha256 check) the same backend without the check."""
    runner_opts: dict[str, Any] = {}
    if opts.threads is not None and manifest.get("format") == "onnx":
        runner_opts["threads"] = opts.threads
    if verified:
        return load_runner(path, backend=opts.backend, **runner_opts)
    spec = RunnerSpec.from_manifest(manifest)
    if spec.format not in BACKENDS:
        raise InputError(f"manifest format {spec.format!r} is unknown; known formats: {', '.join(BACKENDS)}")
    module_name, cls_name, _ = BACKENDS[spec.format]
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"the {spec.format} runner ({module_name}) is not part of this installation") from e
    if opts.backend is not None:
        runner_opts["backend"] = opts.backend
    inner = cls(path, manifest, **runner_opts)
    return CheckedRunner(inner, spec, manifest, path, str(getattr(inner, "backend", None) or spec.format))


def _interface_check(manifest: Mapping[str, Any], spec: Any) -> list[Check]:
    g = manifest["graph"]
    want_io = [(s.name, list(s.shape)) for s in (*spec.inputs, *spec.outputs)]
    got_io = [(d["name"], list(d["shape"])) for d in (*g["inputs"], *g["outputs"])]
    checks = [Check("interface", got_io == want_io, "inputs/outputs match the reference graph" if got_io == want_io
                    else f"manifest I/O {got_io} differs from the reference graph's {want_io}")]  # fmt: skip
    bad = []
    got_c = g.get("constants") or {}
    for k, v in spec.constants.items():
        if k not in got_c:
            bad.append((k, None, v))
        elif not math.isclose(float(got_c[k]), float(v), rel_tol=1e-6, abs_tol=1e-9):
            bad.append((k, got_c[k], v))
    if not bad:
        checks.append(
            Check("constants", True, f"schedule constants equal the reference's ({', '.join(spec.constants)})")
        )
        return checks
    for k, got, want in bad:
        stage = _CONSTANT_STAGE.get(k, "schedule")
        use = (" (the host's prior sample x_t = z_y + prior_noise_scale * noise of a component set uses this value)"
               if k == "prior_noise_scale" else "")  # fmt: skip
        checks.append(Check(f"constant {k}", False, f"manifest says {got!r}, the reference schedule gives {want!r}"
                            f"{use}", stage))  # fmt: skip
    return checks


def _output_scales(path: Path, manifest: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Quantization scale of each output of an INT8 artifact (or why it is unavailable)."""
    recorded = dict((manifest.get("quantization") or {}).get("output_scales") or {})
    recorded.update((manifest.get("backend_info") or {}).get("output_scales") or {})
    out: dict[str, dict[str, Any]] = {}
    for name in outputs:
        if name in recorded:
            out[name] = {"scale": float(recorded[name]), "source": "manifest (quantizer's output_scales)"}
        elif manifest.get("format") == "onnx":
            scale, where = onnx_output_scale(path / manifest["files"][0]["name"], name)
            out[name] = {"scale": scale, "source": where}
        else:
            out[name] = {"scale": None, "source": f"unavailable: {manifest.get('format')} files do not expose the "
                         "output's quantization scale and the manifest records none (quantization.output_scales)"}  # fmt: skip
    return out


def _stats(
    hop: str, outs: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
    cases: Sequence[ParityCase], floors: Mapping[str, Floor], ranges: Mapping[str, Any],
    scales: Mapping[str, float | None] | None = None, vq: VQCompare | None = None,
) -> list[OutputCheck]:  # fmt: skip
    """:func:`~tadsr.parity.hops.case_groups` plus SSIM and, where the output's INT8 scale is known, steps."""
    results = []
    for g in case_groups(outs, refs, cases, floors, ranges, vq):
        ss = min(ssim(o[0], r[0], data_range=st.data_range) if np.isfinite(o).all() else -1.0
                 for o, r, st in zip(g.outputs, g.references, g.stats, strict=True))  # fmt: skip
        scale = (scales or {}).get(g.output)
        results.append(OutputCheck(hop, g.kind, g.output, len(g.stats), g.max_abs, g.mean_abs, g.psnr, ss,
                                   g.data_range, g.floor, g.passed, g.worst_case,
                                   None if not scale else g.max_abs / scale, g.flips, g.flips_source))  # fmt: skip
    return results


def check_artifact(path: Path, session: _Session) -> ArtifactCheck:
    """Verdict (and, if failing or asked, diagnosis) for one artifact folder; see the module docstring."""
    t0 = time.perf_counter()
    manifest = read_manifest(path)
    spec_m = RunnerSpec.from_manifest(manifest)
    res = ArtifactCheck(Path(path), spec_m.graph, spec_m.format, spec_m.precision, spec_m.tile)
    try:
        verify_files(path, manifest)
        res.checks.append(Check("integrity", True, "every file matches its sha256 in the manifest"))
        verified = True
    except InputError as e:
        res.checks.append(Check("integrity", False, str(e)))
        verified = False
    try:
        _check_numerics(res, manifest, verified, session)
    except TadsrError as e:
        res.error = str(e)
        logger.error("%s: %s", path.name, e)
    res.seconds = time.perf_counter() - t0
    logger.info("%s: %s (%.1fs)", path.name, "pass" if res.passed else "FAIL", res.seconds)
    return res


def _check_numerics(res: ArtifactCheck, manifest: dict[str, Any], verified: bool, session: _Session) -> None:
    opts = session.opts
    models, warnings = session.models(manifest)
    res.reference_warnings = warnings
    module, gspec = session.graph(manifest, res.graph, res.tile)
    res.checks += _interface_check(manifest, gspec)
    runner = _open_runner(res.path, manifest, verified, opts)
    runs = session.runs(manifest, res.tile)
    with torch.no_grad():
        cases, res.real_source = make_cases(models, gspec, runs=runs, seed=opts.seed)
    from tadsr.formats.torch_ref import TorchRunner

    eager, eager_view = run_cases_vq(TorchRunner.from_graph(module, gspec, threads=opts.threads).run, cases, module,
                                     models)  # fmt: skip
    outs = [runner.run({k: v.copy() for k, v in c.inputs.items()}) for c in cases]
    refs = [c.reference for c in cases]
    ranges = {s.name: s.value_range for s in gspec.outputs}
    preset = models.preset.name
    scales: dict[str, float | None] = {}
    if res.precision == "int8":
        res.quant_scales = _output_scales(res.path, manifest, [s.name for s in gspec.outputs])
        scales = {k: v["scale"] for k, v in res.quant_scales.items()}
    floors = load_floors(res.precision, res.graph, preset)
    vq1 = vq2 = vq3 = None
    fix = gspec.constants.get("color_fix", "none")
    judge32, judge = vq_judge(models, res.graph, "fp32", fix), vq_judge(models, res.graph, res.precision, fix)
    if judge is not None and judge32 is not None and eager_view is not None:
        ref_view = reference_view(models, cases)
        mine = artifact_view(res.path, manifest, cases, outs, threads=opts.threads or 1)
        vq1 = VQCompare(judge32, eager_view, ref_view)
        if mine is not None:
            vq2, vq3 = VQCompare(judge, mine, eager_view), VQCompare(judge, mine, ref_view)
    res.outputs += _stats(HOP_REFERENCE, eager, refs, cases, load_floors("fp32", res.graph, preset), ranges, None, vq1)
    res.outputs += _stats(runtime_hop(res.format), outs, eager, cases, floors, ranges, scales, vq2)
    res.outputs += _stats(end_to_end_hop(res.format), outs, refs, cases, floors, ranges, scales, vq3)
    if not res.passed or opts.diagnose:
        res.diagnosis = _diagnose(res, manifest, module, gspec, cases, outs, eager, session)


# ---------------------------------------------------------------------------------------------- diagnosis


def _threshold(precision: str, graph: str, preset: str) -> float:
    fl = load_floors(precision, graph, preset).get(_MAIN_OUTPUT[graph])
    return float(fl.psnr) if fl is not None and fl.psnr is not None else 80.0


def _diagnose(
    res: ArtifactCheck, manifest: dict[str, Any], module: Any, gspec: Any, cases: Sequence[ParityCase],
    outs: Sequence[Mapping[str, np.ndarray]], eager: Sequence[Mapping[str, np.ndarray]], session: _Session,
) -> Diagnosis:  # fmt: skip
    notes: list[str] = []
    failing = [c for c in res.checks if not c.passed]
    hop1 = [o for o in res.outputs if o.hop == HOP_REFERENCE and not o.passed]
    if hop1:
        notes.append("the export-ready torch graph already differs from the reference pipeline: a graph rewrite "
                     "(tadsr.formats.graphs / rewrites) is wrong, not the file")  # fmt: skip
    # the case to localise: the worst one of the runtime hop (export-ready torch -> runtime)
    rt = [o for o in res.outputs if o.hop == runtime_hop(res.format)]
    worst = min(rt, key=lambda o: o.psnr) if rt else None
    idx = next((i for i, c in enumerate(cases) if worst and c.name == worst.worst_case), 0)
    case = cases[idx]
    preset = session.models(manifest)[0].preset.name
    thr = _threshold(res.precision, res.graph, preset)
    locs: list[Localization] = []
    weights = None
    file = res.path / manifest["files"][0]["name"]
    numeric_fail = any(not o.passed for o in res.outputs if o.hop != HOP_REFERENCE)
    if not numeric_fail and not session.opts.diagnose:
        notes.append("every output is within its floor: no block localisation needed (use --diagnose to see it)")
        return Diagnosis(_diagnosis_summary(res, failing, locs, weights), locs, weights, notes)
    try:
        if res.format == "onnx":
            trace = session.trace(manifest, res.graph, res.tile, "onnx")
            locs.append(localize_onnx(file, trace, case.inputs, case=case.name, threshold_psnr=thr))
            tensors = dict(module.named_parameters()) | dict(module.named_buffers())
            weights = check_onnx_weights(file, tensors, precision=res.precision)
            for m in weights.mismatches:
                m["unit"], m["stage"] = unit_of_tensor(m["tensor"], res.graph)
        elif res.format == "coreml":
            trace = session.trace(manifest, res.graph, res.tile, "coreml")
            ref_trace = session.trace(manifest, res.graph, res.tile, "none")
            locs.append(localize_coreml(file, trace, ref_trace, case.inputs, case=case.name, threshold_psnr=thr))
        elif res.format == "executorch" and res.precision == "int8":
            notes.append("no block localisation for INT8 ExecuTorch programs: a re-lowering would rebuild the float "
                         "program, and the PT2E program's intermediates are inside the delegate; the quantize "
                         "stage's per-block sensitivity (recipe.json in the artifact) says which blocks lose most")  # fmt: skip
        elif res.format == "executorch":
            info = manifest.get("backend_info") or {}
            rewrites = list(info["rewrites"]) if isinstance(info.get("rewrites"), dict) else None
            ref_trace = session.trace(manifest, res.graph, res.tile, "none")
            locs.append(localize_executorch(module, gspec, ref_trace, case.inputs, case=case.name, threshold_psnr=thr,
                                            backend=str(info.get("backend") or "xnnpack"), rewrites=rewrites,
                                            artifact_output=outs[idx]))  # fmt: skip
    except (TadsrError, ImportError, RuntimeError, NotImplementedError) as e:
        notes.append(f"localisation not possible for this {res.format} file: {e}")
    return Diagnosis(_diagnosis_summary(res, failing, locs, weights), locs, weights, notes)


def _diagnosis_summary(res: ArtifactCheck, failing: Sequence[Check], locs: Sequence[Localization],
                       weights: WeightCheck | None) -> str:  # fmt: skip
    parts = []
    if not res.passed:
        fails = res.failures()
        parts.append(f"FAIL: {fails[0]}" + (f" (+{len(fails) - 1} more)" if len(fails) > 1 else ""))
    else:
        parts.append("pass")
    stages = sorted({c.stage for c in failing if c.stage})
    if stages:
        parts.append(f"stage(s) affected: {', '.join(stages)}")
    for loc in locs:
        parts.append(loc.summary())
    if weights is not None and not weights.passed:
        m = max(weights.mismatches, key=lambda d: d["max_abs"])
        parts.append(f"weights: {weights.summary()} (unit {m.get('unit')}, stage {m.get('stage')})")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ image sets


def _whole_images(opts: ParityOptions, n: int) -> list[tuple[str, np.ndarray]]:
    """``n`` whole LR images (1, 3, H, W) in [-1, 1], centre-cropped to ``max_side``."""
    from tadsr.runtime.imageio import list_images, read_image, to_model

    if n == 0:
        return []
    if opts.images is not None:
        folder = Path(opts.images)
    else:
        from tadsr.patches import default_calibration_dir

        folder = default_calibration_dir()
    files = list_images(folder)[:n]
    out = []
    for f in files:
        rgb = read_image(f).rgb
        h, w = rgb.shape[:2]
        # odd-ish sizes on purpose: several tiles, partial last tiles, padding
        ch, cw = min(h, opts.max_side - 7), min(w, opts.max_side)
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append((f.name, to_model(rgb[y : y + ch, x : x + cw])))
    return out


def find_sets(checks: Sequence[ArtifactCheck]) -> list[SetCheck]:
    """Fused pipeline artifacts and complete encoder/denoiser/decoder sets among the checked artifacts."""
    sets: list[SetCheck] = []
    groups: dict[tuple[str, str, int], dict[str, Path]] = {}
    for a in checks:
        if a.graph == "pipeline":
            sets.append(SetCheck("pipeline", {"pipeline": a.path}, a.format, a.precision, a.tile))
        else:
            groups.setdefault((a.format, a.precision, a.tile), {})[a.graph] = a.path
    for (fmt, prec, tile), members in groups.items():
        if all(g in members for g in ("encoder", "denoiser", "decoder")):
            sets.append(SetCheck("components", {g: members[g] for g in ("encoder", "denoiser", "decoder")}, fmt,
                                 prec, tile))  # fmt: skip
    return sets


class _Recorder:
    """A runner proxy that keeps every call's inputs and outputs (the tiler runs tiles one by one, in order)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.calls: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(inputs)
        self.calls.append((inputs, out))
        return out


def check_set(s: SetCheck, images: Sequence[tuple[str, np.ndarray]], session: _Session,
              by_path: Mapping[Path, ArtifactCheck]) -> SetCheck:  # fmt: skip
    """Whole images through the set vs the reference through the same tiler and noise.

    An image below the floor is checked for VQ code flips (:func:`tadsr.formats.localize.code_flips`): it passes
    when the artifact's latents ``x0`` agree with the reference's within the denoiser floor, every flipped
    code is a near-tie explained by that latent difference, and the image equals, within the floor, the
    reference decoder run on the artifact's own latents (same codes). Otherwise it fails.
    """
    from tadsr.runtime.pipeline import MobileSRPipeline

    t0 = time.perf_counter()
    opts = session.opts
    manifests = {g: read_manifest(p) for g, p in s.members.items()}
    first = next(iter(manifests.values()))
    try:
        models, _ = session.models(first)
        s.floor = load_floors(s.precision, "pipeline", models.preset.name).get("sr")
        bad = [g for g, p in s.members.items() if by_path.get(p) and not by_path[p].checks[0].passed]
        if bad:
            s.checks.append(Check("integrity", False, f"not run: {', '.join(bad)} failed the sha256 check"))
            return s
        kw = {"threads": opts.threads} if opts.threads is not None and s.format == "onnx" else {}
        mobile = MobileSRPipeline(dict(s.members), backend=opts.backend, **kw)
        worst: tuple[float, np.ndarray] | None = None
        for name, lr in images:
            img = _check_image(s, name, lr, mobile, models, manifests, session)
            s.images.append(img)
            if worst is None or img.psnr < worst[0]:
                worst = (img.psnr, lr)
        if (not s.passed or opts.diagnose) and worst is not None:
            s.diagnosis = _diagnose_set(s, mobile, OneStepPipeline(models), worst[1], models, session, by_path)
    except TadsrError as e:
        s.error = str(e)
    finally:
        s.seconds = time.perf_counter() - t0
    return s


def _check_image(s: SetCheck, name: str, lr: np.ndarray, mobile: Any, models: Models,
                 manifests: Mapping[str, Mapping[str, Any]], session: _Session) -> ImageCheck:  # fmt: skip
    from tadsr.runtime.tiling import upscale_tiled

    pipe = OneStepPipeline(models)
    rec = {g: _Recorder(r) for g, r in mobile.runners.items()}
    inner = dict(mobile.runners)
    mobile.runners.update(rec)
    ref_x0: list[np.ndarray] = []

    def ref_tiles(lr_t: np.ndarray, noise: np.ndarray) -> np.ndarray:  # OneStepPipeline.__call__, x0 kept
        with torch.no_grad():
            lr_p, hw = pipe.prepare(torch.from_numpy(lr_t))
            x0 = pipe.denoise(pipe.encode(lr_p), torch.from_numpy(noise), lr_p)
            ref_x0.append(x0.numpy())
            return pipe.decode(x0, hw).numpy()

    c = models.preset.vq.embed_dim
    overlap = min(session.opts.overlap, s.tile - 1)
    kw = {"tile": s.tile, "scale": models.preset.scale, "seed": session.opts.seed, "overlap": overlap,
          "noise_shape_fn": lambda t: (c, t, t)}  # fmt: skip
    try:
        got = mobile.upscale(lr, seed=kw["seed"], overlap=kw["overlap"])
    finally:
        mobile.runners.update(inner)
    want = upscale_tiled(lr, ref_tiles, **kw)
    st = error_stats(got, want, 2.0)
    ss = ssim(got[0], want[0], data_range=2.0) if np.isfinite(got).all() else -1.0
    img = ImageCheck(name, tuple(lr.shape), st.max_abs, st.mean_abs, st.psnr, ss,
                     s.floor is None or s.floor.accepts(st.max_abs, st.psnr))  # fmt: skip
    if img.passed or not np.isfinite(got).all():
        return img
    x0s, why = _artifact_x0(s, rec, manifests, session)
    if x0s is None or len(x0s) != len(ref_x0):
        img.note = f"below the floor; code flips not checked: {why or 'tile count mismatch'}"
        return img
    book = models.autoencoder.quantize.embedding.weight.detach().float().numpy()
    flips = sum((code_flips(book, r, a) for r, a in zip(ref_x0, x0s, strict=True)), CodeFlips())
    lat = min(error_stats(a, r).psnr for r, a in zip(ref_x0, x0s, strict=True))
    it = iter(x0s)

    def same_codes(lr_t: np.ndarray, noise: np.ndarray) -> np.ndarray:  # reference decoder on the artifact's x0
        with torch.no_grad():
            return pipe.decode(torch.from_numpy(next(it)), (lr_t.shape[-2], lr_t.shape[-1])).numpy()

    alt = error_stats(got, upscale_tiled(lr, same_codes, **kw), 2.0)
    den_floor = _threshold(s.precision, "denoiser", models.preset.name)
    img.code_flips, img.same_codes_psnr, img.latent_psnr = flips, alt.psnr, lat
    same = s.floor is None or s.floor.accepts(alt.max_abs, alt.psnr)
    explained = flips.flipped > 0 and flips.all_explained and lat >= den_floor and same
    # a rounding-decided tie is not an error: judged like with like (same codes), the flips themselves by the
    # floor's explicit flip budget (numerics.json "flips": a fraction of the latent positions)
    budget = s.floor.flips if s.floor is not None else None
    within = budget is not None and flips.flipped <= budget.max_fraction * flips.codes
    img.passed = bool(explained and within)
    verdict = (
        "near-tie code flips, not an export error"
        if img.passed
        else (
            f"near-tie code flips beyond the {s.precision} flip budget ({budget.max_fraction if budget else 0:g} of "
            "the positions)"
            if explained
            else "not explained by near-tie code flips"
        )
    )
    img.note = (
        f"{flips.flipped} of {flips.codes} VQ codes flipped ({flips.explained} explained as near-ties by the "
        f"latent difference); latents x0 agree to {_db(lat)} dB (floor {den_floor:g}); against the reference "
        f"decoder on the artifact's own latents (same codes) the image is at {_db(alt.psnr)} dB: {verdict}"
    )
    return img


def _artifact_x0(s: SetCheck, rec: Mapping[str, _Recorder], manifests: Mapping[str, Mapping[str, Any]],
                 session: _Session) -> tuple[list[np.ndarray] | None, str]:  # fmt: skip
    """The artifact's denoised latent of every tile: recorded (component set) or exposed (fused ONNX graph: the
    tensor the codebook search reads, found in the graph, so no torch.export is needed)."""
    if s.kind == "components":
        return [out["x0"] for _, out in rec["denoiser"].calls], ""
    if s.format != "onnx":
        return None, f"the fused {s.format} graph does not expose its latent x0"
    m = manifests["pipeline"]
    path = s.members["pipeline"] / m["files"][0]["name"]
    latent = next(t for t in RunnerSpec.from_manifest(m).inputs if t.name == "noise").shape
    name = onnx_codebook_input(path, latent)
    if name is None:
        return None, "no latent of the noise's shape feeds the codebook search (ArgMin) in the ONNX graph"
    tap = OnnxTap(path, [name], threads=session.opts.threads)
    vals = [tap.run(inputs).get(name) for inputs, _ in rec["pipeline"].calls]
    if any(v is None for v in vals):
        return None, f"tensor {name!r} (the codebook search's input) cannot be exposed"
    return [np.asarray(v, np.float32) for v in vals], ""


def _diagnose_set(s: SetCheck, mobile: Any, pipe: OneStepPipeline, lr: np.ndarray, models: Models,
                  session: _Session, by_path: Mapping[Path, ArtifactCheck]) -> Diagnosis:  # fmt: skip
    """Stage by stage on the first tile of the worst image (components), or the fused graph's localisation."""
    from tadsr.runtime.tiling import pad_for_tiles, tile_noise

    t, c = s.tile, models.preset.vq.embed_dim
    lr_t = np.ascontiguousarray(pad_for_tiles(lr, t)[:, :, :t, :t], dtype=np.float32)
    noise = tile_noise(session.opts.seed, 0, 0, (c, t, t))[None].astype(np.float32)
    notes = []
    member_fail = [by_path[p] for p in s.members.values() if p in by_path and not by_path[p].passed]
    if member_fail:
        notes.append("failing member artifact(s): " + "; ".join(
            f"{a.name}: {a.diagnosis.summary if a.diagnosis else a.failures()[0]}" for a in member_fail))  # fmt: skip
    if s.kind == "pipeline":
        if not member_fail:
            notes.append("the artifact passes on single tiles but not on whole images: look at the tiler and the "
                         "host side (tadsr.runtime.tiling, MobileSRPipeline)")  # fmt: skip
            return Diagnosis(notes[-1], [], None, notes)
        a = member_fail[0]
        return Diagnosis(f"see {a.name}: " + (a.diagnosis.summary if a.diagnosis else a.failures()[0]), [], None, [])
    with torch.no_grad():
        lr_pt = torch.from_numpy(lr_t)
        z_y = pipe.encode(lr_pt)
        x_t = pipe.schedule.prior_sample(z_y, torch.from_numpy(noise))
        x0 = pipe.denoise(z_y, torch.from_numpy(noise), lr_pt)
        sr = pipe.decode(x0, (t, t))
    preset = models.preset.name
    fl = {g: _threshold(s.precision, g, preset) for g in ("encoder", "denoiser", "decoder")}
    r = mobile.runners
    got: dict[str, np.ndarray] = {}

    def enc() -> np.ndarray:
        got["z_y"] = r["encoder"].run({"lr": lr_t})["z_y"]
        return got["z_y"]

    def prior() -> np.ndarray:  # exactly the host step of MobileSRPipeline.run_tiles
        got["x_t"] = (got["z_y"] + mobile.noise_scale * noise).astype(np.float32)
        return got["x_t"]

    def den() -> np.ndarray:
        got["x0"] = r["denoiser"].run({"x_t": got["x_t"], "lr": lr_t})["x0"]
        return got["x0"]

    def dec() -> np.ndarray:
        return r["decoder"].run({"x0": got["x0"]})["sr"]

    stages: list[tuple[str, str, Callable[[], np.ndarray], np.ndarray, float]] = [
        ("encoder", "z_y", enc, z_y.numpy(), fl["encoder"]),
        ("prior sample", "x_t", prior, x_t.numpy(), fl["encoder"]),
        ("denoiser", "x0", den, x0.numpy(), fl["denoiser"]),
        ("decoder", "sr", dec, sr.numpy(), fl["decoder"]),
    ]
    loc = localize_chain(stages, case=f"tile (0, 0) of the worst image, seed {session.opts.seed}",
                         backend=f"{s.format} component chain",
                         method="the component artifacts run one after another on one tile, with the host's prior "
                         "sample x_t = z_y + prior_noise_scale (from the denoiser manifest) * noise in between, as "
                         "MobileSRPipeline does; each stage's output compared with the reference pipeline's")  # fmt: skip
    if "x0" in got:
        book = models.autoencoder.quantize.embedding.weight.detach().float().numpy()
        f = code_flips(book, x0.numpy(), got["x0"])
        if f.flipped:
            notes.append(f"on this tile {f.flipped} of {f.codes} VQ codes differ from the reference's ({f.explained} "
                         "explained as near-ties by the latent difference)")  # fmt: skip
    want = float(np.float32(pipe.schedule.prior_noise_scale()))
    if not math.isclose(float(mobile.noise_scale), want, rel_tol=1e-6):
        notes.append(f"the denoiser manifest's prior_noise_scale is {float(mobile.noise_scale)!r}, the reference "
                     f"schedule's is {want!r}")  # fmt: skip
    return Diagnosis(loc.summary(), [loc], None, notes)


# ------------------------------------------------------------------------------------------------- entry


def check_parity(
    path: Path, reference: ReferenceSpec | None = None, options: ParityOptions | None = None
) -> ParityResult:
    """Check an artifact folder, or every artifact in a folder of artifacts, and the sets they form.

    Args:
        path: artifact folder or parent folder.
        reference: where the PyTorch reference comes from (default: each artifact's manifest).
        options: cases, images, diagnosis (see :class:`ParityOptions`).

    Returns:
        The :class:`ParityResult` (``exit_code`` 0 pass / 1 fail / 2 could not check).

    Raises:
        InputError: no artifact at ``path``.
        ConfigError: bad options.
    """
    reference = reference or ReferenceSpec()
    options = options or ParityOptions()
    dirs = find_artifact_dirs(Path(path))
    session = _Session(reference, options)
    n_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        result = ParityResult(Path(path), options=options.to_dict() | {"reference": _ref_dict(reference)})
        for d in dirs:
            result.artifacts.append(check_artifact(d, session))
        by_path = {a.path: a for a in result.artifacts}
        sets = [s for s in find_sets([a for a in result.artifacts if a.error is None])]
        images = _whole_images(options, options.whole_images) if sets else []
        for s in sets:
            if images:
                result.sets.append(check_set(s, images, session, by_path))
    finally:
        torch.set_num_threads(n_threads)
    return result


def _ref_dict(ref: ReferenceSpec) -> dict[str, Any]:
    if ref.from_manifest:
        return {"from": "manifest (preset + sources)"}
    return {"from": "arguments", "student": str(ref.student) if ref.student else None,
            "autoencoder": str(ref.autoencoder) if ref.autoencoder else None, "preset": ref.preset,
            "init": ref.init}  # fmt: skip


# ------------------------------------------------------------------------------------------------- report


def _fmt(x: float | None, kind: str = "g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "db":
        return _db(x)
    if kind == "ssim":
        return f"{x:.5f}"
    return f"{x:.2g}"


def _floor_str(f: Floor | None) -> str:
    if f is None:
        return "-"
    parts = []
    if f.max_abs is not None:
        parts.append(f"≤{f.max_abs:g}")
    if f.psnr is not None:
        parts.append(f"≥{f.psnr:g} dB")
    return ", ".join(parts) or "-"


def render_markdown(result: ParityResult) -> str:
    """The report as Markdown (what the CLI prints)."""
    verdict = "PASS" if result.passed else ("FAIL" if result.exit_code == 1 else "ERROR")
    ref = result.options.get("reference", {})
    lines = [f"# tadsr parity: {verdict}", "",
             (f"`{result.root}`: {len(result.artifacts)} artifact(s), {len(result.sets)} whole-image set(s); "
             f"reference from {ref.get('from')}; seed {result.options.get('seed')}"), ""]  # fmt: skip
    for a in result.artifacts:
        lines += _md_artifact(a)
    for s in result.sets:
        lines += _md_set(s)
    return "\n".join(lines).rstrip() + "\n"


def _md_artifact(a: ArtifactCheck) -> list[str]:
    lines = [f"## {a.name}: {'PASS' if a.passed else 'FAIL'}", ""]
    if a.error:
        lines += [f"**Could not check**: {a.error}", ""]
    for c in a.checks:
        lines.append(f"- {c.name}: {'ok' if c.passed else '**FAIL**'} ({c.detail})")
    for w in a.reference_warnings:
        lines.append(f"- warning: {w}")
    if a.real_source:
        lines.append(f"- real inputs: {a.real_source}")
    for name, q in a.quant_scales.items():
        lines.append(f"- output '{name}' quantization scale: {q['scale'] if q['scale'] is not None else 'unavailable'}"
                     f" ({q['source']})")  # fmt: skip
    lines.append("")
    if a.outputs:
        q = any(o.qsteps is not None for o in a.outputs) or a.precision == "int8"
        head = ["hop", "inputs", "output", "max abs", "mean abs", "PSNR dB", "SSIM"] + (["q-steps"] if q else [])
        lines += ["| " + " | ".join(head + ["floor", "result"]) + " |", "|" + "---|" * (len(head) + 2)]
        for o in a.outputs:
            row = [o.hop, f"{o.inputs} ({o.n})", o.output, _fmt(o.max_abs), _fmt(o.mean_abs), _fmt(o.psnr, "db"),
                   _fmt(o.ssim, "ssim")] + ([_fmt(o.qsteps) if o.qsteps is not None else "n/a"] if q else [])  # fmt: skip
            lines.append("| " + " | ".join(row + [_floor_str(o.floor), "ok" if o.passed else "**FAIL**"]) + " |")
        lines.append("")
        for o in a.outputs:
            if o.flips:
                lines.append(f"- VQ code flips, {o.hop} ({o.inputs}, '{o.output}'): {flip_summary(o.flips)}; "
                             f"{o.flips_source}; the image is judged against the reference decoded with the tested "
                             "side's codes")  # fmt: skip
                lines += [f"  - {'ok' if f.passed else '**FAIL**'} {f.line()}" for f in o.flips]
        if any(o.flips for o in a.outputs):
            lines.append("")
    if a.diagnosis is not None:
        lines += _md_diagnosis(a.diagnosis)
    return lines


def _md_diagnosis(d: Diagnosis) -> list[str]:
    lines = [f"**Diagnosis**: {d.summary}", ""]
    for n in d.notes:
        lines.append(f"- {n}")
    if d.weights is not None:
        lines.append(f"- weights: {d.weights.summary()}")
        for m in d.weights.mismatches[:5]:
            lines.append(f"  - `{m['tensor']}` ({m.get('unit')}, stage {m.get('stage')}): max abs {m['max_abs']:.3g}")
    for loc in d.localizations:
        lines += ["", (f"Localisation ({loc.backend}): {loc.method}. Case {loc.case}, a unit diverges below "
                  f"{loc.threshold_psnr:g} dB."), ""]  # fmt: skip
        lines += [f"- {n}" for n in loc.notes] + ([""] if loc.notes else [])
        lines += ["| unit | stage | tensor | max abs | mean abs | PSNR dB | |", "|---|---|---|---|---|---|---|"]
        for u in loc.units:
            mark = "**DIVERGED**" if u.status == "DIVERGED" else u.status
            if loc.first is u:
                mark = "**first divergence**"
            t = "-" if u.tensor is None else (u.tensor if u.is_output else f"{u.tensor} (inside)")
            lines.append(f"| {u.unit} | {u.stage} | {t} | {_fmt(u.max_abs)} | {_fmt(u.mean_abs)} | "
                         f"{_fmt(u.psnr, 'db')} | {mark} |")  # fmt: skip
    lines.append("")
    return lines


def _md_set(s: SetCheck) -> list[str]:
    members = ", ".join(p.name for p in s.members.values())
    lines = [f"## whole images, {s.name}: {'PASS' if s.passed else 'FAIL'}", "",
             (f"{members}; tiled (overlap, host noise) against the reference through the same tiler and noise; "
             f"floor {_floor_str(s.floor)} ({s.floor.source if s.floor else '-'})"), ""]  # fmt: skip
    if s.error:
        lines += [f"**Could not check**: {s.error}", ""]
    for c in s.checks:
        lines.append(f"- {c.name}: {'ok' if c.passed else '**FAIL**'} ({c.detail})")
    if s.images:
        lines += ["| image | LR size | max abs | mean abs | PSNR dB | SSIM | result |", "|---|---|---|---|---|---|---|"]
        for i in s.images:
            lines.append(f"| {i.name} | {i.shape[-1]}x{i.shape[-2]} | {_fmt(i.max_abs)} | {_fmt(i.mean_abs)} | "
                         f"{_fmt(i.psnr, 'db')} | {_fmt(i.ssim, 'ssim')} | {'ok' if i.passed else '**FAIL**'} |")  # fmt: skip
        lines.append("")
        lines += [f"- {i.name}: {i.note}" for i in s.images if i.note]
    if s.diagnosis is not None:
        lines += _md_diagnosis(s.diagnosis)
    return lines


def write_report(result: ParityResult, folder: Path) -> tuple[Path, Path]:
    """Write ``parity.json`` and ``parity.md`` into ``folder`` (created). Returns both paths."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        js = folder / "parity.json"
        md = folder / "parity.md"
        js.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
        md.write_text(render_markdown(result), encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write the report to {folder}: {e.strerror or e}; choose another --report") from e
    return js, md

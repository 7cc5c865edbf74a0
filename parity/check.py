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

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from tadsr.errors import InputError
from tadsr.parity.artifact import check_artifact
from tadsr.parity.records import ArtifactCheck, Check, ImageCheck, OutputCheck, ParityResult, SetCheck
from tadsr.parity.report import render_markdown, write_report
from tadsr.parity.session import ParityOptions, ReferenceSpec, Session, TraceCache
from tadsr.parity.sets import whole_images, check_set, find_sets
from tadsr.runtime.artifacts import artifact_dirs

__all__ = [
    "ArtifactCheck",
    "Check",
    "ImageCheck",
    "OutputCheck",
    "ParityOptions",
    "ParityResult",
    "ReferenceSpec",
    "SetCheck",
    "TraceCache",
    "check_parity",
    "find_artifact_dirs",
    "render_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)


def find_artifact_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is an artifact folder, else its artifact subfolders
    (:func:`tadsr.runtime.artifacts.artifact_dirs`).

    Raises:
        InputError: ``path`` is not a folder, or holds no artifact.
    """
    return artifact_dirs(Path(path))


def check_parity(
    path: Path, reference: ReferenceSpec | None = None, options: ParityOptions | None = None, *,
    traces: TraceCache | None = None, select: Collection[str] | None = None,
) -> ParityResult:  # fmt: skip
    """Check an artifact folder, or every artifact in a folder of artifacts, and the sets they form.

    Args:
        path: artifact folder or parent folder.
        reference: where the PyTorch reference comes from (default: each artifact's manifest).
        options: cases, images, diagnosis (see :class:`ParityOptions`).
        traces: localisation traces kept across calls (a caller checking several folders creates one
            :class:`TraceCache` and passes it to each call); None: traces live for this call only.
        select: names of the artifact folders under ``path`` to check (the others are left out); None: all.

    Returns:
        The :class:`ParityResult` (``exit_code`` 0 pass / 1 fail / 2 could not check).

    Raises:
        InputError: no artifact at ``path``, or a selected name is not one of them.
        ConfigError: bad options.
    """
    reference = reference or ReferenceSpec()
    options = options or ParityOptions()
    dirs = find_artifact_dirs(Path(path))
    if select is not None:
        wanted = set(select)
        missing = sorted(wanted - {d.name for d in dirs})
        if missing:
            raise InputError(f"no artifact folder {', '.join(missing)} in {path}")
        dirs = [d for d in dirs if d.name in wanted]
    session = Session(reference, options, traces)
    n_threads = torch.get_num_threads()
    try:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        result = ParityResult(Path(path), options=options.to_dict() | {"reference": _ref_dict(reference)})
        for d in dirs:
            result.artifacts.append(check_artifact(d, session))
        by_path = {a.path: a for a in result.artifacts}
        sets = [s for s in find_sets([a for a in result.artifacts if a.error is None])]
        images = whole_images(options, options.whole_images) if sets else []
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

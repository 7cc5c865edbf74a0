"""Parity as a chain of named hops, each with its metric and floor (``tadsr/numerics.json``).

Hops, for one graph on the same cases:

1. ``"reference torch -> export-ready torch"``: the reference :class:`~tadsr.pipeline.OneStepPipeline`
   stage(s) the graph replaces, vs the export-ready graph module (polyphase bicubic, folded timestep, baked
   masks...). Always judged by the fp32 floors.
2. ``"export-ready torch -> <format> runtime"``: the graph module vs the artifact run through
   :func:`tadsr.runtime.runner.load_runner`. Judged by the artifact's precision floors.
3. ``"reference torch -> <format> runtime"``: end to end, what a user gets vs the reference. Same floors.

Cases: one seeded case (``spec.example_inputs(seed)``, uniform in each input's range, else N(0, 1)) and
``n_real`` real LR patches: the shipped calibration set (:mod:`tadsr.patches`) when it has
patches of the tile size, else built-in photos from ``skimage.data`` (downscaled by MATLAB bicubic, centre
crop). Component graphs get the inputs the reference pipeline produces on those patches: the encoder the
LR, the denoiser ``x_t = z_y + kappa sqrt(eta_T) noise`` and the LR, the decoder the reference ``x0``.

Metrics per output: max abs, mean abs and PSNR (images over their [-1, 1] range, i.e. 2; latents over the
reference's peak-to-peak range), worst case over the cases of one kind (largest max abs, largest mean abs,
smallest PSNR).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr.errors import ConfigError, InputError, ParityError
from tadsr.parity.vq import CaseFlips, FlipBudget, VQCompare, VQJudge, VQView, torch_decoder
from tadsr.metrics import db_from_json, db_json, error_stats
from tadsr.pipeline import DEFAULT_SEED, Models, OneStepPipeline, make_noise

__all__ = [
    "HOP_REFERENCE",
    "HOP_LIGHT",
    "light_hop",
    "RUN_ARRAYS",
    "runtime_hop",
    "end_to_end_hop",
    "Floor",
    "ParityCase",
    "HopResult",
    "ParityReport",
    "load_floors",
    "make_cases",
    "CaseGroup",
    "case_groups",
    "compare",
    "real_lr_patches",
    "ReferenceRuns",
    "reference_runs",
    "reference_runs_on",
    "run_cases",
    "run_cases_vq",
    "flip_summary",
    "flips_record",
    "vq_judge",
    "reference_view",
    "VQCompare",
    "VQView",
]

logger = logging.getLogger(__name__)

HOP_REFERENCE = "reference torch -> export-ready torch"
HOP_LIGHT = "full-autoencoder reference -> light reference"
LIGHT_GRAPHS = ("encoder", "decoder", "pipeline")


def runtime_hop(fmt: str) -> str:
    """Name of the hop export-ready torch -> ``fmt`` runtime."""
    return f"export-ready torch -> {fmt} runtime"


def end_to_end_hop(fmt: str) -> str:
    """Name of the hop reference torch -> ``fmt`` runtime."""
    return f"reference torch -> {fmt} runtime"


# ------------------------------------------------------------------------------------------------- floors


@dataclass(frozen=True)
class Floor:
    """Acceptance bounds of one output: ``max_abs <= max_abs`` and ``psnr >= psnr`` (None: not gated).

    ``flips``: for images decoded through the VQ lookup, the code flips allowed (:class:`FlipBudget`); the
    image is then judged against the reference decoded with the tested side's codes (:mod:`tadsr.parity.vq`).
    """

    max_abs: float | None
    psnr: float | None
    why: str
    source: str = ""
    flips: FlipBudget | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Floor:
        """A floor as :meth:`HopResult.to_dict` records it."""
        fb = d.get("flips")
        return cls(d.get("max_abs"), d.get("psnr"), str(d.get("why", "")), str(d.get("source", "")),
                   FlipBudget.from_dict(fb) if isinstance(fb, dict) else None)  # fmt: skip

    def accepts(self, max_abs: float, psnr: float) -> bool:
        ok_abs = self.max_abs is None or max_abs <= self.max_abs
        ok_psnr = self.psnr is None or psnr >= self.psnr
        return bool(ok_abs and ok_psnr)


def _numerics_path() -> Path:
    # wheel: .../tadsr/export/parity.py -> .../tadsr/numerics.json; editable: <repo>/export -> <repo>/tadsr
    here = Path(__file__).resolve().parents[1]
    for cand in (here / "numerics.json", here / "tadsr" / "numerics.json"):
        if cand.is_file():
            return cand
    return here / "tadsr" / "numerics.json"


@cache
def _numerics() -> dict[str, Any]:
    path = _numerics_path()
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"parity floors table {path} is missing or unreadable ({e}); reinstall tadsr-mobile") from e


def load_floors(precision: str, graph: str, preset: str | None = None) -> dict[str, Floor]:
    """Floors per output name of ``graph`` at ``precision`` (preset-specific entries override the defaults).

    Raises:
        ConfigError: no floors for this precision or graph in ``tadsr/numerics.json``.
    """
    table = _numerics()
    floors = table["floors"]
    alias = table.get("precision_aliases", {}).get(precision)
    if alias is not None and precision not in floors:
        precision = str(alias["floors"])
    if precision not in floors:
        raise ConfigError(f"no parity floors for precision {precision!r} in numerics.json (have {sorted(floors)})")
    if graph not in floors[precision]:
        raise ConfigError(f"no parity floors for graph {graph!r} at {precision} in numerics.json")
    entry = dict(floors[precision][graph])
    source = f"floors.{precision}.{graph}"
    override = table.get("preset_overrides", {}).get(preset or "", {}).get(precision, {}).get(graph)
    if override:
        entry.update(override)
        source = f"preset_overrides.{preset}.{precision}.{graph}"
    out: dict[str, Floor] = {}
    for name, f in entry.items():
        if isinstance(f, dict):
            out[name] = Floor.from_dict({**f, "source": source})
    return out


# -------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class ParityCase:
    """One set of graph inputs with the reference pipeline's outputs for them.

    Attributes:
        name: ``"seeded-<seed>"`` or ``"real-<i>"``.
        kind: ``"seeded"`` or ``"real"``.
        inputs: graph input name -> float32 array of the spec's shape.
        reference: graph output name -> float32 array computed by the reference pipeline.
        latent: graphs ending in the VQ lookup (decoder, pipeline): the reference's pre-quantisation latent
            ``(1, C, h, w)`` (None for the other graphs).
    """

    name: str
    kind: str
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    latent: np.ndarray | None = None


def _builtin_lr(tile: int, scale: int, n: int) -> tuple[np.ndarray, str]:
    import skimage.data

    from tadsr.imresize import imresize

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    out = []
    for name in (names * (n // len(names) + 1))[:n]:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)[..., :3] / 255.0
        if min(img.shape[:2]) >= tile * scale:
            img = imresize(img, 1.0 / scale)
        h, w = img.shape[:2]
        if min(h, w) < tile:
            img = np.pad(img, ((0, max(0, tile - h)), (0, max(0, tile - w)), (0, 0)), mode="reflect")
            h, w = img.shape[:2]
        y, x = (h - tile) // 2, (w - tile) // 2
        crop = np.round(np.clip(img[y : y + tile, x : x + tile], 0, 1) * 255) / 255
        out.append(np.moveaxis(crop, -1, 0).astype(np.float32) * 2 - 1)
    return np.stack(out), f"skimage.data photos {list((names * n)[:n])}, MATLAB bicubic /{scale}, centre {tile} crop"


def real_lr_patches(tile: int, scale: int, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` real LR patches ``(n, 3, tile, tile)`` float32 in [-1, 1] and a description of where they came from.

    ``seed`` picks the patches drawn from the shipped calibration set (the built-in photos ignore it).
    """
    if n <= 0:
        return np.zeros((0, 3, tile, tile), np.float32), "none"
    try:
        from tadsr.patches import default_calibration_dir, sample_patches
    except ImportError:
        return _builtin_lr(tile, scale, n)
    try:
        ps = sample_patches(default_calibration_dir(), num_patches=n, tile=tile, scale=scale, seed=seed)
    except InputError as e:
        logger.debug("calibration set unusable for tile %d (%s); using built-in photos", tile, e)
        return _builtin_lr(tile, scale, n)
    seeded = f", seed {seed}" if seed else ""
    desc = f"shipped calibration set, {n} patches{seeded}, content hash {ps.content_hash[:16]}"
    return ps.lr.astype(np.float32), desc


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


RUN_ARRAYS = ("lr", "noise", "z_y", "x_t", "x0", "sr")
"""The arrays of :class:`ReferenceRuns`, in pipeline order."""


@dataclass(frozen=True)
class ReferenceRuns:
    """The reference pipeline's stages on real LR patches, batch-first float32 arrays (index = patch).

    Attributes:
        lr: ``(n, 3, t, t)`` in [-1, 1].
        noise: ``(n, C, t, t)`` prior noise (``make_noise(.., DEFAULT_SEED + i)``).
        z_y, x_t, x0: ``(n, C, t, t)`` encoder latent, noisy latent, denoised latent.
        sr: ``(n, 3, s t, s t)`` in [-1, 1].
        source: where the patches came from.
    """

    lr: np.ndarray
    noise: np.ndarray
    z_y: np.ndarray
    x_t: np.ndarray
    x0: np.ndarray
    sr: np.ndarray
    source: str

    def case(self, graph: str, i: int) -> ParityCase:
        """Inputs and reference outputs of ``graph`` for patch ``i``."""
        one = {k: getattr(self, k)[i : i + 1] for k in RUN_ARRAYS}
        ins, outs = {
            "encoder": (("lr",), {"z_y": "z_y"}),
            "denoiser": (("x_t", "lr"), {"x0": "x0"}),
            "decoder": (("x0",), {"sr": "sr"}),
            "pipeline": (("lr", "noise"), {"sr": "sr"}),
        }[graph]
        latent = one["x0"] if graph in ("decoder", "pipeline") else None
        if any(one[v].size == 0 for v in outs.values()):
            raise ValueError(f"these runs ({self.source}) were captured without the decoder: no {graph} reference")
        return ParityCase(f"real-{i}", "real", {k: one[k] for k in ins}, {k: one[v] for k, v in outs.items()},
                          latent)  # fmt: skip


def reference_runs(models: Models, tile: int, n_real: int = 3, seed: int = 0) -> ReferenceRuns:
    """Run the reference :class:`OneStepPipeline` stage by stage on ``n_real`` real LR patches of ``tile``."""
    lrs, source = real_lr_patches(tile, models.preset.scale, n_real, seed)
    return reference_runs_on(models, lrs, source)


@torch.no_grad()
def reference_runs_on(models: Models, lrs: np.ndarray, source: str) -> ReferenceRuns:
    """The reference pipeline stage by stage on given LR patches ``(N, 3, tile, tile)`` in [-1, 1]."""
    pipe = OneStepPipeline(models)
    tile = int(lrs.shape[-1])
    latent = (1, models.preset.vq.embed_dim, tile, tile)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in RUN_ARRAYS}
    for i, lr_np in enumerate(lrs):
        lr, hw = pipe.prepare(torch.from_numpy(np.ascontiguousarray(lr_np))[None])
        noise = make_noise(latent, DEFAULT_SEED + i)
        z_y = pipe.encode(lr)
        x0 = pipe.denoise(z_y, noise, lr)
        vals = {"lr": lr, "noise": noise, "z_y": z_y, "x_t": pipe.schedule.prior_sample(z_y, noise), "x0": x0,
                "sr": pipe.decode(x0, hw)}  # fmt: skip
        for k, v in vals.items():
            rows[k].append(_np(v)[0])
    s = models.preset.scale
    shapes = {"lr": (3, tile, tile), "sr": (3, s * tile, s * tile)}
    arrays = {k: np.stack(v) if v else np.zeros((0, *shapes.get(k, latent[1:])), np.float32) for k, v in rows.items()}
    return ReferenceRuns(**arrays, source=source)


def _seeded_reference(pipe: OneStepPipeline, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference stage(s) on arbitrary graph inputs."""
    if graph == "encoder":
        return {"z_y": pipe.encode(pipe.prepare(inputs["lr"])[0])}
    if graph == "denoiser":  # prior_sample(x_t, 0) == x_t exactly, so this is student(x_t / s, T-1, lr)
        x_t = inputs["x_t"]
        return {"x0": pipe.denoise(x_t, torch.zeros_like(x_t), pipe.prepare(inputs["lr"])[0])}
    if graph == "decoder":
        x0 = inputs["x0"]
        return {"sr": pipe.decode(x0, (int(x0.shape[-2]), int(x0.shape[-1])))}
    lr, hw = pipe.prepare(inputs["lr"])
    x0 = pipe.denoise(pipe.encode(lr), inputs["noise"], lr)
    return {"sr": pipe.decode(x0, hw, lr), "_latent": x0}


@torch.no_grad()
def make_cases(
    models: Models, spec: Any, *, runs: ReferenceRuns | None = None, n_real: int = 3, seed: int = 0
) -> tuple[list[ParityCase], str]:
    """Parity cases for graph ``spec.name``: one seeded case and one case per real patch.

    Args:
        models: the loaded networks (the reference pipeline is built from them).
        spec: the graph's ``GraphSpec``.
        runs: reference runs on real patches to reuse (from :func:`reference_runs`, same tile); computed
            with ``n_real`` patches when None.
        n_real: number of real LR patches when ``runs`` is None.
        seed: seed of the example inputs.

    Returns:
        The cases and a description of the real patches' source.
    """
    fix = spec.constants.get("color_fix", "none") if spec.name == "pipeline" else "none"
    pipe = OneStepPipeline(models, color_fix=fix)  # a fused graph with a colour fix: checked against the fixed reference
    ex = dict(zip((s.name for s in spec.inputs), spec.example_inputs(seed), strict=True))
    ref = _seeded_reference(pipe, spec.name, ex)
    lat = ref.pop("_latent", None)
    if spec.name == "decoder":
        lat = ex["x0"]
    cases = [ParityCase(f"seeded-{seed}", "seeded", {k: _np(v) for k, v in ex.items()},
                        {k: _np(v) for k, v in ref.items()}, None if lat is None else _np(lat))]  # fmt: skip
    if runs is None:
        runs = reference_runs(models, spec.tile, n_real)
    if runs.lr.shape[-1] != spec.tile:
        raise ConfigError(f"reference runs are for tile {runs.lr.shape[-1]}, the graph has tile {spec.tile}")
    real = [runs.case(spec.name, i) for i in range(len(runs.lr))]
    if fix != "none":
        fixed = [_seeded_reference(pipe, spec.name, {n: torch.from_numpy(a) for n, a in c.inputs.items()}) for c in real]
        real = [ParityCase(c.name, c.kind, c.inputs, {k: _np(v) for k, v in f.items() if k != "_latent"}, c.latent)
                for c, f in zip(real, fixed, strict=True)]  # fmt: skip
    return cases + real, runs.source


@torch.no_grad()
def light_hop(models: Models, spec: Any, cases: Sequence[ParityCase]) -> list[HopResult]:
    """The hop from the full VQ-f4 autoencoder's reference to the light autoencoder's, on the same inputs.

    For graphs that use the light autoencoder (encoder, decoder, pipeline of ``models`` with
    ``light_autoencoder``): the cases' references (computed with the light networks) against the full
    autoencoder's reference pipeline on the same inputs, held to the ``light`` floors of numerics.json: a gate
    that the light networks approximate this autoencoder. Random-weight light networks (``random-fill``) are
    recorded with ungated floors. Empty for other graphs or without a light autoencoder.
    """
    if models.light_autoencoder is None or spec.name not in LIGHT_GRAPHS:
        return []
    from dataclasses import replace

    fix = spec.constants.get("color_fix", "none") if spec.name == "pipeline" else "none"
    full = OneStepPipeline(replace(models, light_autoencoder=None), color_fix=fix)
    refs = []
    for c in cases:
        out = _seeded_reference(full, spec.name, {k: torch.from_numpy(v) for k, v in c.inputs.items()})
        refs.append({k: _np(v) for k, v in out.items() if k != "_latent"})
    floors = load_floors("light", spec.name, models.preset.name)
    if models.sources.get("light_autoencoder", {}).get("path") == "random-fill":
        floors = {k: Floor(None, None, "random-weight light autoencoder: recorded, not gated", f.source)
                  for k, f in floors.items()}  # fmt: skip
    ranges = {s.name: s.value_range for s in spec.outputs}
    return compare(HOP_LIGHT, [c.reference for c in cases], refs, cases, floors, ranges)


# ------------------------------------------------------------------------------------------------ results


@dataclass
class HopResult:
    """Worst-case agreement of one output over the cases of one kind, for one hop.

    Attributes:
        hop: hop name.
        inputs: ``"seeded"`` or ``"real"``.
        output: output name.
        n: number of cases.
        max_abs, mean_abs, psnr: worst case over the cases (PSNR in dB; inf when identical).
        data_range: PSNR peak used (2 for images; latents: the reference's peak-to-peak, smallest over cases).
        floor: the bounds applied.
        passed: whether the bounds hold (flip-aware for VQ images: see :mod:`tadsr.parity.vq`).
        worst_case: name of the case with the lowest PSNR.
        flips: VQ images: the flip analysis per case (None for other outputs).
        flips_source: how the tested and reference codes were obtained.
        ssim: worst SSIM over the cases, over the same peak as PSNR (parity checks; None at export time).
        qsteps: max abs error in quantization steps of the output's scale (INT8 runtime hops), else None.

    One record for every comparison: export and quantize time (manifest ``parity``) and ``tadsr parity``
    (``parity.json``, where it is also called ``OutputCheck``).
    """

    hop: str
    inputs: str
    output: str
    n: int
    max_abs: float
    mean_abs: float
    psnr: float
    data_range: float
    floor: Floor
    passed: bool
    worst_case: str = ""
    flips: list[CaseFlips] | None = None
    flips_source: str = ""
    ssim: float | None = None
    qsteps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        floor: dict[str, Any] = {"max_abs": self.floor.max_abs, "psnr": self.floor.psnr, "source": self.floor.source,
                                 "why": self.floor.why}  # fmt: skip
        if self.floor.flips is not None:
            floor["flips"] = asdict(self.floor.flips)
        return {"hop": self.hop, "inputs": self.inputs, "output": self.output, "n": self.n,
                "max_abs": db_json(self.max_abs), "mean_abs": db_json(self.mean_abs), "psnr": db_json(self.psnr, 5),
                "ssim": db_json(self.ssim, 6), "data_range": db_json(self.data_range),
                "qsteps": db_json(self.qsteps, 4), "floor": floor, "passed": self.passed,
                "worst_case": self.worst_case, "flips": flips_record(self.flips, self.flips_source)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HopResult:
        """A hop read back from a manifest's ``parity`` or a ``parity.json`` (:meth:`to_dict`)."""
        fl = d.get("flips")
        return cls(str(d["hop"]), str(d["inputs"]), str(d["output"]), int(d["n"]), db_from_json(d.get("max_abs")),
                   db_from_json(d.get("mean_abs")), db_from_json(d.get("psnr")), db_from_json(d.get("data_range")),
                   Floor.from_dict(d.get("floor") or {}), bool(d["passed"]), str(d.get("worst_case", "")),
                   None if fl is None else [CaseFlips.from_dict(c) for c in fl.get("cases") or []],
                   "" if fl is None else str(fl.get("codes_from", "")),
                   None if d.get("ssim") is None else db_from_json(d["ssim"]),
                   None if d.get("qsteps") is None else float(d["qsteps"]))  # fmt: skip

    def flip_summary(self) -> str:
        """``"N near-tie flips of M positions, max gap g"`` over the cases, or ``""``."""
        return flip_summary(self.flips)

    def describe(self) -> str:
        fl = []
        if self.floor.max_abs is not None:
            fl.append(f"max abs <= {self.floor.max_abs:g}")
        if self.floor.psnr is not None:
            fl.append(f"PSNR >= {self.floor.psnr:g} dB")
        psnr = "inf" if math.isinf(self.psnr) and self.psnr > 0 else f"{self.psnr:.1f}"
        q = f", {self.qsteps:.2f} quant steps" if self.qsteps is not None else ""
        vq = ""
        if self.flips:
            bad = [f for f in self.flips if not f.passed]
            vq = f"; VQ: {self.flip_summary()}; " + ("; ".join(f.line() for f in bad) if bad else
                                                     "every flip a near-tie, judged like with like")  # fmt: skip
        return (f"'{self.hop}' on {self.inputs} inputs, output '{self.output}': max abs {self.max_abs:.3g}, "
                f"mean abs {self.mean_abs:.3g}, PSNR {psnr} dB{q} (floor: {', '.join(fl) or 'none'}; "
                f"worst case {self.worst_case}){vq}")  # fmt: skip


def flip_summary(flips: Sequence[CaseFlips] | None) -> str:
    """``"N near-tie flips of M positions, max gap g"`` over the cases (plus non-near-ties), or ``""``."""
    if not flips:
        return ""
    near = sum(f.near_tie for f in flips)
    pos = sum(f.positions for f in flips)
    g = max(f.max_gap for f in flips)
    bad = sum(f.not_near_tie for f in flips)
    return f"{near} near-tie flips of {pos} positions, max gap {g:.3g}" + (f", {bad} NOT near-ties" if bad else "")


def flips_record(flips: Sequence[CaseFlips] | None, source: str) -> dict[str, Any] | None:
    """The flip analysis as recorded in manifests and reports."""
    if flips is None:
        return None
    return {"summary": flip_summary(flips), "codes_from": source, "cases": [f.to_dict() for f in flips]}


@dataclass
class CaseGroup:
    """The per-case error statistics of one (input kind, output) pair of a hop, and their aggregate."""

    kind: str
    output: str
    floor: Floor
    stats: list[Any]  # tadsr.metrics.ErrorStats per case
    names: list[str]
    outputs: list[np.ndarray]
    references: list[np.ndarray]
    flips: list[CaseFlips] | None = None
    flips_source: str = ""

    @property
    def max_abs(self) -> float:
        return max(s.max_abs for s in self.stats)

    @property
    def mean_abs(self) -> float:
        return max(s.mean_abs for s in self.stats)

    @property
    def psnr(self) -> float:
        return min(s.psnr for s in self.stats)

    @property
    def data_range(self) -> float:
        return min(s.data_range for s in self.stats)

    @property
    def worst_case(self) -> str:
        return self.names[min(range(len(self.stats)), key=lambda i: self.stats[i].psnr)]

    @property
    def passed(self) -> bool:
        if self.flips is not None:
            return all(f.passed for f in self.flips)
        return self.floor.accepts(self.max_abs, self.psnr)


def case_groups(
    outputs: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
    cases: Sequence[ParityCase],
    floors: Mapping[str, Floor],
    value_ranges: Mapping[str, tuple[float, float] | None],
    vq: VQCompare | None = None,
) -> list[CaseGroup]:
    """Error statistics of every case, grouped per (input kind, output); latents use their value range for PSNR.

    With ``vq`` (graphs ending in the VQ lookup), its image outputs get the flip analysis of
    :meth:`tadsr.parity.vq.VQJudge.analyse` per case, which then decides their verdict.
    """
    groups = []
    for kind in dict.fromkeys(c.kind for c in cases):
        idx = [i for i, c in enumerate(cases) if c.kind == kind]
        for name, floor in floors.items():
            vr = value_ranges.get(name)
            dr = (vr[1] - vr[0]) if vr is not None else None
            outs = [np.asarray(outputs[i][name], np.float32) for i in idx]
            refs = [np.asarray(references[i][name], np.float32) for i in idx]
            g = CaseGroup(kind, name, floor, [error_stats(o, r, dr) for o, r in zip(outs, refs, strict=True)],
                          [cases[i].name for i in idx], outs, refs)  # fmt: skip
            if vq is not None and name in vq.judge.outputs:
                g.flips = [_case_flips(vq, cases[i], i, o, r, floor) for i, o, r in zip(idx, outs, refs, strict=True)]
                g.flips_source = f"tested: {vq.outputs.source}; reference: {vq.references.source}"
            groups.append(g)
    return groups


def _case_flips(vq: VQCompare, case: ParityCase, i: int, out: np.ndarray, ref: np.ndarray, floor: Floor) -> CaseFlips:
    z_r = vq.references.latents[i]
    if z_r is None:
        z_r = case.latent
    if z_r is None:
        raise ConfigError(f"case {case.name} has no reference latent for the VQ flip analysis")
    budget = floor.flips or FlipBudget(0.0, 1e-6, "no flip budget in numerics.json: any flip fails")
    return vq.judge.analyse(case.name, out, ref, vq.outputs.latents[i], vq.outputs.codes[i], z_r,
                            vq.references.codes[i], floor, budget, vq.outputs.source)  # fmt: skip


def compare(
    hop: str,
    outputs: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
    cases: Sequence[ParityCase],
    floors: Mapping[str, Floor],
    value_ranges: Mapping[str, tuple[float, float] | None],
    vq: VQCompare | None = None,
) -> list[HopResult]:
    """Aggregate per-case error statistics into one :class:`HopResult` per (input kind, output).

    ``vq``: for graphs ending in the VQ lookup, the judge and both sides' latents / codes; image outputs are
    then judged flip-aware (:mod:`tadsr.parity.vq`) and carry the per-case flip analysis.
    """
    return [HopResult(hop, g.kind, g.output, len(g.stats), g.max_abs, g.mean_abs, g.psnr, g.data_range, g.floor,
                      g.passed, g.worst_case, g.flips, g.flips_source)
            for g in case_groups(outputs, references, cases, floors, value_ranges, vq)]  # fmt: skip


@dataclass
class ParityReport:
    """All hop results of one artifact (or of the torch-only hop), plus where the real inputs came from."""

    graph: str
    hops: list[HopResult] = field(default_factory=list)
    real_source: str = ""

    @property
    def passed(self) -> bool:
        return all(h.passed for h in self.hops)

    def failures(self) -> list[HopResult]:
        return [h for h in self.hops if not h.passed]

    def worst(self) -> HopResult | None:
        """The first failing hop result, else the one with the lowest PSNR."""
        if not self.hops:
            return None
        fails = self.failures()
        return fails[0] if fails else min(self.hops, key=lambda h: h.psnr)

    def to_list(self) -> list[dict[str, Any]]:
        return [h.to_dict() for h in self.hops]

    def raise_if_failed(self, where: str = "") -> None:
        """Raise :class:`ParityError` naming the first failing hop and its numbers."""
        fails = self.failures()
        if not fails:
            return
        f = fails[0]
        more = f" (and {len(fails) - 1} more failing hop results)" if len(fails) > 1 else ""
        raise ParityError(
            f"parity failed for {where or self.graph}: {f.describe()}{more}. Nothing was written; rerun with "
            "--no-parity-gate (parity_gate=False) to keep the artifact with the failure recorded in its manifest",
            hop=f.hop,
            stats={**f.to_dict(), "graph": self.graph},
        )


def run_cases(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], cases: Sequence[ParityCase]) -> list:
    """``run(case.inputs)`` for every case (copies of the inputs, so a runner cannot alter them)."""
    return [run({k: v.copy() for k, v in c.inputs.items()}) for c in cases]


# ------------------------------------------------------------------------------------------- VQ code flips

VQ_GRAPHS = ("decoder", "pipeline")
_VQ_CHUNK = 4096  # the reference pipeline's and the export graphs' chunk (same codes either way)


def vq_judge(models: Models, graph: str, precision: str, color_fix: str = "none") -> VQJudge | None:
    """The flip-aware judge for ``graph`` at ``precision`` (None for graphs without the VQ lookup).

    The judge decodes codes with the decoder the graph uses (the light one when loaded). A fused graph with a
    colour fix gets no judge (its image also depends on the LR, which the code decoder does not see): it is held
    to the plain image floor, as before the flip-aware verdict.
    """
    if graph not in VQ_GRAPHS or color_fix != "none":
        return None
    ae = models.light_autoencoder if models.light_autoencoder is not None else models.autoencoder
    lat_floor = load_floors(precision, "denoiser", models.preset.name).get("x0")
    book = ae.quantize.embedding.weight.detach().float().cpu().numpy()
    return VQJudge(book, torch_decoder(ae), ("sr",), lat_floor, None, graph == "decoder", precision != "fp32")


def reference_codes(models: Models, z: np.ndarray) -> np.ndarray:
    """The codes the reference pipeline picks for the latent ``z (1, C, h, w)``: its decoder's quantiser (the light
    one when loaded, as :func:`vq_judge` decodes with), ``(1, h, w)`` int64."""
    ae = models.light_autoencoder if models.light_autoencoder is not None else models.autoencoder
    with torch.no_grad():
        q = ae.quantize
        return q.indices(torch.from_numpy(np.asarray(z, np.float32)), q.search_rows(_VQ_CHUNK)).numpy()


def reference_view(models: Models, cases: Sequence[ParityCase]) -> VQView:
    """The reference pipeline's latents (from the cases) and codes (its own quantiser on them)."""
    lats = [c.latent for c in cases]
    return VQView(lats, [None if z is None else reference_codes(models, z) for z in lats],
                  "reference pipeline (latent and codes in torch)")  # fmt: skip


def run_cases_vq(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], cases: Sequence[ParityCase], module: torch.nn.Module,
    models: Models,
) -> tuple[list, VQView | None]:  # fmt: skip
    """:func:`run_cases` on an export-ready torch graph, keeping the latent its VQ lookup reads (None: no lookup)."""
    from tadsr.formats.graphs import DecoderGraph, LightDecoderGraph

    dec = next((m for m in module.modules() if isinstance(m, (DecoderGraph, LightDecoderGraph))), None)
    if dec is None:
        return run_cases(run, cases), None
    seen: list[np.ndarray] = []
    handle = dec.register_forward_pre_hook(lambda _m, args: seen.append(_np(args[0])))
    try:
        outs = run_cases(run, cases)
    finally:
        handle.remove()
    if len(seen) != len(cases):
        return outs, VQView.unexposed(len(cases), "export-ready torch (latent not captured)")
    codes = []
    with torch.no_grad():
        for z in seen:
            codes.append(dec.quantize.indices(torch.from_numpy(z), dec.chunk).numpy())
    return outs, VQView(list(seen), codes, "export-ready torch (latent and codes of its own lookup)")

"""Why an artifact or a set fails: the failing checks, the first diverging block or schedule step per backend
(:mod:`tadsr.formats.localize`), and, for a component set, stage by stage on one tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr.errors import TadsrError
from tadsr.formats.localize import (
    Localization,
    LocalizeRequest,
    WeightCheck,
    code_flips,
    localize_chain,
)
from tadsr.formats.registry import get_format
from tadsr.parity.hops import HOP_REFERENCE, ParityCase, load_floors, runtime_hop
from tadsr.parity.records import ArtifactCheck, Check, Diagnosis, SetCheck
from tadsr.parity.session import Session
from tadsr.pipeline import Models, OneStepPipeline
from tadsr.runtime.artifacts import COMPONENTS


_MAIN_OUTPUT = {"encoder": "z_y", "denoiser": "x0", "decoder": "sr", "pipeline": "sr"}


def floor_psnr(precision: str, graph: str, preset: str) -> float:
    fl = load_floors(precision, graph, preset).get(_MAIN_OUTPUT[graph])
    return float(fl.psnr) if fl is not None and fl.psnr is not None else 80.0


def diagnose_artifact(
    res: ArtifactCheck, manifest: dict[str, Any], module: Any, gspec: Any, cases: Sequence[ParityCase],
    outs: Sequence[Mapping[str, np.ndarray]], eager: Sequence[Mapping[str, np.ndarray]], session: Session,
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
    thr = floor_psnr(res.precision, res.graph, preset)
    locs: list[Localization] = []
    weights = None
    file = res.path / manifest["files"][0]["name"]
    numeric_fail = any(not o.passed for o in res.outputs if o.hop != HOP_REFERENCE)
    if not numeric_fail and not session.opts.diagnose:
        notes.append("every output is within its floor: no block localisation needed (use --diagnose to see it)")
        return Diagnosis(_diagnosis_summary(res, failing, locs, weights), locs, weights, notes)
    try:
        diagnose = get_format(res.format).hook("localize")
        out = diagnose(LocalizeRequest(
            file, manifest, module, gspec, res.precision, case.inputs, case.name, thr,
            lambda variant: session.trace(manifest, res.graph, res.tile, variant), outs[idx]))  # fmt: skip
        locs += out.localizations
        weights = out.weights
        notes += out.notes
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


def diagnose_set(s: SetCheck, mobile: Any, pipe: OneStepPipeline, lr: np.ndarray, models: Models,
                  session: Session, by_path: Mapping[Path, ArtifactCheck]) -> Diagnosis:  # fmt: skip
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
    fl = {g: floor_psnr(s.precision, g, preset) for g in COMPONENTS}
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

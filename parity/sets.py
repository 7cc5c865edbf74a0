"""Whole images through a fused pipeline artifact or a component set, against the reference through the same
tiler and noise; an image below its floor is analysed for near-tie VQ code flips (see :mod:`tadsr.parity.check`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr.errors import TadsrError
from tadsr.formats.localize import CodeFlips, OnnxTap, code_flips, onnx_codebook_input
from tadsr.metrics import error_stats, ssim
from tadsr.parity.diagnosis import diagnose_set, floor_psnr
from tadsr.parity.hops import load_floors
from tadsr.parity.records import ArtifactCheck, Check, ImageCheck, SetCheck, db_str
from tadsr.parity.session import ParityOptions, Session, runner_kwargs
from tadsr.pipeline import Models, OneStepPipeline
from tadsr.runtime.artifacts import group_sets
from tadsr.runtime.runner import RunnerSpec, read_manifest


def whole_images(opts: ParityOptions, n: int) -> list[tuple[str, np.ndarray]]:
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
        rows = opts.max_side - 7 if opts.max_rows is None else min(opts.max_rows, opts.max_side - 7)
        ch, cw = min(h, rows), min(w, opts.max_side)
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append((f.name, to_model(rgb[y : y + ch, x : x + cw])))
    return out


def find_sets(checks: Sequence[ArtifactCheck]) -> list[SetCheck]:
    """Fused pipeline artifacts (in the order checked), then complete encoder/denoiser/decoder sets, among the
    checked artifacts (:func:`tadsr.runtime.artifacts.group_sets`)."""
    order = {a.path: i for i, a in enumerate(checks)}
    found = group_sets((a.path, read_manifest(a.path)) for a in checks)
    fused = sorted((s for s in found if s.layout == "fused"), key=lambda s: order[s.dirs["pipeline"]])
    return [SetCheck("pipeline" if s.layout == "fused" else "components", dict(s.dirs), s.format, s.precision, s.tile)
            for s in fused + [s for s in found if s.layout != "fused"]]  # fmt: skip


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


def check_set(s: SetCheck, images: Sequence[tuple[str, np.ndarray]], session: Session,
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
        kw = runner_kwargs(s.format, opts.threads)
        mobile = MobileSRPipeline(dict(s.members), backend=opts.backend, **kw)
        worst: tuple[float, np.ndarray] | None = None
        for name, lr in images:
            img = _check_image(s, name, lr, mobile, models, manifests, session)
            s.images.append(img)
            if worst is None or img.psnr < worst[0]:
                worst = (img.psnr, lr)
        if (not s.passed or opts.diagnose) and worst is not None:
            s.diagnosis = diagnose_set(s, mobile, OneStepPipeline(models), worst[1], models, session, by_path)
    except TadsrError as e:
        s.error = str(e)
    finally:
        s.seconds = time.perf_counter() - t0
    return s


def _check_image(s: SetCheck, name: str, lr: np.ndarray, mobile: Any, models: Models,
                 manifests: Mapping[str, Mapping[str, Any]], session: Session) -> ImageCheck:  # fmt: skip
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
    rkey = (session.key(next(iter(manifests.values()))), name, hashlib.sha256(lr.tobytes()).hexdigest(), s.tile,
            overlap, session.opts.seed)  # fmt: skip
    if rkey in session.whole_refs:
        want, kept = session.whole_refs[rkey]
        ref_x0.extend(kept)
    else:
        want = upscale_tiled(lr, ref_tiles, **kw)
        session.whole_refs[rkey] = (want, list(ref_x0))
    st = error_stats(got, want, 2.0)
    ss = ssim(got[0], want[0], data_range=2.0) if np.isfinite(got).all() else -1.0
    img = ImageCheck(name, tuple(lr.shape), st.max_abs, st.mean_abs, st.psnr, ss,
                     s.floor is None or s.floor.accepts(st.max_abs, st.psnr))  # fmt: skip
    if img.passed or not np.isfinite(got).all():
        return img
    x0s, why = _artifact_x0(s, rec, manifests, session)
    if x0s is None and s.kind == "pipeline":  # a fused program without its latent: codes from its tile images
        return _recovered_flips(img, s, rec, ref_x0, models, manifests, got, lr, kw, why)
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
    den_floor = floor_psnr(s.precision, "denoiser", models.preset.name)
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
        f"latent difference); latents x0 agree to {db_str(lat)} dB (floor {den_floor:g}); against the reference "
        f"decoder on the artifact's own latents (same codes) the image is at {db_str(alt.psnr)} dB: {verdict}"
    )
    return img


def _recovered_flips(img: ImageCheck, s: SetCheck, rec: Mapping[str, _Recorder], ref_x0: Sequence[np.ndarray],
                     models: Models, manifests: Mapping[str, Mapping[str, Any]], got: np.ndarray, lr: np.ndarray,
                     kw: Mapping[str, Any], why: str) -> ImageCheck:  # fmt: skip
    """Flip analysis of a whole image through a fused program that exposes no latent (ExecuTorch, Core ML).

    Each tile's codes are recovered from the program's own tile image (:meth:`tadsr.parity.vq.VQJudge.analyse`:
    only near-tie alternatives of the reference codes within the latent floor's reach are candidates, verified by
    decoding). The image then passes when every tile's flips are near-ties within the flip budget and the whole
    image equals, within the floor, the reference decoder run on the recovered codes through the same tiler. A
    perturbed weight or a wrong constant cannot be reproduced by near-tie codes and still fails.
    """
    from tadsr.parity.hops import reference_codes, vq_judge
    from tadsr.parity.vq import FlipBudget
    from tadsr.runtime.tiling import upscale_tiled

    calls = rec["pipeline"].calls
    fix = str(manifests["pipeline"].get("graph", {}).get("constants", {}).get("color_fix", "none"))
    judge = vq_judge(models, "pipeline", s.precision, fix)
    reason = ("a colour-fixed image is not a function of the codes alone" if judge is None
              else "no image floor" if s.floor is None
              else "tile count mismatch" if len(calls) != len(ref_x0) else "")  # fmt: skip
    if reason:
        img.note = f"below the floor; code flips not checked: {why}; {reason}"
        return img
    budget = s.floor.flips or FlipBudget(0.0, 1e-6, "no flip budget in numerics.json: any flip fails")
    codes, flips, notes = [], CodeFlips(), []
    for i, ((_, out), z) in enumerate(zip(calls, ref_x0, strict=True)):
        c_r = reference_codes(models, z)
        cf = judge.analyse(f"tile {i}", out["sr"], judge.decode(c_r), None, None, z, c_r, s.floor, budget,
                           f"fused {s.format} program")  # fmt: skip
        codes.append(cf.codes)  # the tested side's codes (analyse always sets them)
        flips += CodeFlips(cf.positions, cf.flipped, cf.near_tie, cf.max_gap)
        if cf.flipped > budget.max_fraction * cf.positions:
            notes.append(f"tile {i}: {cf.flipped} flips exceed the budget of {budget.max_fraction:g} of the positions")
    it = iter(codes)

    def same_codes(lr_t: np.ndarray, noise: np.ndarray) -> np.ndarray:  # reference decoder on the recovered codes
        return judge.decode(next(it))

    alt = error_stats(got, upscale_tiled(lr, same_codes, **kw), 2.0)
    img.code_flips, img.same_codes_psnr = flips, alt.psnr
    same = s.floor.accepts(alt.max_abs, alt.psnr)
    img.passed = bool(flips.flipped > 0 and flips.all_explained and same and not notes)
    verdict = ("near-tie code flips, not an export error" if img.passed
               else "; ".join(notes) or "not explained by near-tie code flips")  # fmt: skip
    img.note = (
        f"{flips.flipped} of {flips.codes} VQ codes flipped, recovered from the program's tile images among near-tie "
        f"alternatives of the reference codes ({why}); against the reference decoder on those codes the image is at "
        f"{db_str(alt.psnr)} dB: {verdict}"
    )
    return img


def _artifact_x0(s: SetCheck, rec: Mapping[str, _Recorder], manifests: Mapping[str, Mapping[str, Any]],
                 session: Session) -> tuple[list[np.ndarray] | None, str]:  # fmt: skip
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

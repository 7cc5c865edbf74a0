"""Per-artifact checks: integrity, interface and schedule constants, and the three hops on seeded and real tiles
(see :mod:`tadsr.parity.check`).
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadsr.errors import ConfigError, InputError, TadsrError
from tadsr.formats.registry import FORMAT_NAMES, get_format
from tadsr.formats.spec import FormatSpec
from tadsr.metrics import ssim
from tadsr.parity.diagnosis import diagnose_artifact
from tadsr.parity.hops import (
    HOP_REFERENCE,
    Floor,
    HopResult,
    ParityCase,
    VQCompare,
    case_groups,
    end_to_end_hop,
    load_floors,
    make_cases,
    reference_view,
    run_cases,
    run_cases_vq,
    runtime_hop,
    vq_judge,
)
from tadsr.parity.taps import run_cases_viewed
from tadsr.parity.records import ArtifactCheck, Check
from tadsr.parity.session import ParityOptions, Session, real_patches, runner_kwargs
from tadsr.runtime.runner import BACKENDS, CheckedRunner, RunnerSpec, load_runner, read_manifest, verify_files

logger = logging.getLogger(__name__)


_CONSTANT_STAGE = {"prior_noise_scale": "prior sample", "input_scale": "input scaling"}


def _open_runner(path: Path, manifest: dict[str, Any], verified: bool, opts: ParityOptions) -> CheckedRunner:
    """``load_runner``, or (for a file that failed its sha256 check) the same backend without the check."""
    runner_opts = runner_kwargs(str(manifest.get("format")), opts.threads)
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


def _known_format(manifest: Mapping[str, Any]) -> FormatSpec | None:
    fmt = str(manifest.get("format"))
    return get_format(fmt) if fmt in FORMAT_NAMES else None


def _output_scales(path: Path, manifest: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Quantization scale of each output of an INT8 artifact (or why it is unavailable)."""
    recorded = dict((manifest.get("quantization") or {}).get("output_scales") or {})
    recorded.update((manifest.get("backend_info") or {}).get("output_scales") or {})
    out: dict[str, dict[str, Any]] = {}
    for name in outputs:
        if name in recorded:
            out[name] = {"scale": float(recorded[name]), "source": "manifest (quantizer's output_scales)"}
        elif (fmt := _known_format(manifest)) is not None and fmt.output_scale:
            scale, where = fmt.hook("output_scale")(path / manifest["files"][0]["name"], name)
            out[name] = {"scale": scale, "source": where}
        else:
            out[name] = {"scale": None, "source": f"unavailable: {manifest.get('format')} files do not expose the "
                         "output's quantization scale and the manifest records none (quantization.output_scales)"}  # fmt: skip
    return out


def _stats(
    hop: str, outs: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
    cases: Sequence[ParityCase], floors: Mapping[str, Floor], ranges: Mapping[str, Any],
    scales: Mapping[str, float | None] | None = None, vq: VQCompare | None = None,
) -> list[HopResult]:  # fmt: skip
    """:func:`~tadsr.parity.hops.case_groups` plus SSIM and, where the output's INT8 scale is known, steps."""
    results = []
    for g in case_groups(outs, refs, cases, floors, ranges, vq):
        ss = min(ssim(o[0], r[0], data_range=st.data_range) if np.isfinite(o).all() else -1.0
                 for o, r, st in zip(g.outputs, g.references, g.stats, strict=True))  # fmt: skip
        scale = (scales or {}).get(g.output)
        results.append(HopResult(hop, g.kind, g.output, len(g.stats), g.max_abs, g.mean_abs, g.psnr, g.data_range,
                                 g.floor, g.passed, g.worst_case, g.flips, g.flips_source, ssim=ss,
                                 qsteps=None if not scale else g.max_abs / scale))  # fmt: skip
    return results


def check_artifact(path: Path, session: Session) -> ArtifactCheck:
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


def _gate_hops(res: ArtifactCheck, manifest: Mapping[str, Any], verified: bool, session: Session,
               outputs: Sequence[str]) -> tuple[list[HopResult], str, str] | None:  # fmt: skip
    """The tile hops the artifact's write-time parity gate recorded, with what they are and where their real inputs
    came from, when that gate gave this check's verdict (:attr:`ParityOptions.gate_tiles`); None: run them.

    An fp32 / fp16 export's gate ran exactly this check's cases, reference and floors. An INT8 write's gate
    (:mod:`tadsr.quantize`) judged every held-out tile against the fp32 artifact it was quantized from and against
    the reference, at the INT8 floors and flip-aware, on more tiles (16) than the check's seeded and real ones:
    its hops are taken where every output has both under today's floors.
    """
    opts = session.opts
    if not (opts.gate_tiles and verified and session.ref.from_manifest and opts.backend is None) or opts.diagnose:
        return None
    inputs = manifest.get("parity_inputs") or {}
    # an INT8 write records its held-out hops whether or not its gate may refuse the file (the smoke run's may not)
    if not (manifest.get("parity_passed") and (manifest.get("parity_gate") or res.precision == "int8")):
        return None
    models = session.models(manifest)[0]
    preset = models.preset.name
    recorded_list = list(manifest.get("parity") or [])
    if res.precision == "int8":
        return _int8_gate_hops(recorded_list, inputs, load_floors("int8", res.graph, preset), outputs)
    cases = [f"seeded-{opts.seed}"] + [f"real-{i}" for i in range(opts.patches)]
    if inputs.get("cases") != cases or inputs.get("real") != real_patches(res.tile, models.preset.scale, opts)[1]:
        return None
    floors = {HOP_REFERENCE: load_floors("fp32", res.graph, preset)}
    floors[runtime_hop(res.format)] = floors[end_to_end_hop(res.format)] = load_floors(res.precision, res.graph, preset)
    recorded = {(h["hop"], h["inputs"], h["output"]): h for h in recorded_list if h["hop"] in floors}
    hops = []
    for hop, fl in floors.items():  # the check's hops in its order; each recorded under today's floors
        for kind in ("seeded", "real") if opts.patches else ("seeded",):
            for name in outputs:
                rec = recorded.get((hop, kind, name))
                if rec is None or Floor.from_dict(rec.get("floor") or {}) != fl.get(name):
                    return None
                hops.append(HopResult.from_dict(rec))
    return (hops, "the seeded and real tiles' hops are those the write's parity gate recorded in the manifest: the "
            "same cases, reference and floors, on these files", str(inputs["real"]))  # fmt: skip


def _int8_gate_hops(recorded: Sequence[Mapping[str, Any]], inputs: Mapping[str, Any], floors: Mapping[str, Floor],
                    outputs: Sequence[str]) -> tuple[list[HopResult], str, str] | None:  # fmt: skip
    """The INT8 write gate's held-out hops (fp32 artifact -> INT8, reference -> INT8) of every output, each passed
    under today's INT8 floor; None where one is missing, failed or judged by another floor."""
    held, cases = inputs.get("heldout"), inputs.get("cases") or []
    if not held or not cases:
        return None
    hops = []
    for first in ("fp32 ", "reference torch -> "):  # against the fp32 artifact, then end to end
        for name in outputs:
            rec = next((h for h in recorded if h["hop"].startswith(first) and h["hop"] != HOP_REFERENCE
                        and h["output"] == name), None)  # fmt: skip
            if rec is None or not rec.get("passed") or Floor.from_dict(rec.get("floor") or {}) != floors.get(name):
                return None
            hops.append(HopResult.from_dict(rec))
    return (hops, f"the INT8 write's parity gate judged {len(cases)} held-out tiles against the fp32 artifact and the "
            "reference at today's int8 floors (recorded in the manifest, on these files); the seeded and real tiles "
            "are not run again", str(held))  # fmt: skip


def _check_numerics(res: ArtifactCheck, manifest: dict[str, Any], verified: bool, session: Session) -> None:
    opts = session.opts
    models, warnings = session.models(manifest)
    res.reference_warnings = warnings
    module, gspec = session.graph(manifest, res.graph, res.tile)
    res.checks += _interface_check(manifest, gspec)
    gated = _gate_hops(res, manifest, verified, session, [s.name for s in gspec.outputs])
    if gated is not None:
        hops, note, res.real_source = gated
        res.outputs += hops
        res.checks.append(Check("tiles", True, note))
        if res.precision == "int8":
            res.quant_scales = _output_scales(res.path, manifest, [s.name for s in gspec.outputs])
        return
    runner = _open_runner(res.path, manifest, verified, opts)
    runs = session.runs(manifest, res.tile)
    with torch.no_grad():
        cases, res.real_source = make_cases(models, gspec, runs=runs, seed=opts.seed)
    from tadsr.formats.torch_ref import TorchRunner

    eager, eager_view = run_cases_vq(TorchRunner.from_graph(module, gspec, threads=opts.threads).run, cases, module,
                                     models)  # fmt: skip
    fix = gspec.constants.get("color_fix", "none")
    judge32, judge = vq_judge(models, res.graph, "fp32", fix), vq_judge(models, res.graph, res.precision, fix)
    mine = None
    flip_aware = judge is not None and judge32 is not None and eager_view is not None
    if flip_aware:  # outputs and the artifact's VQ view in one run per case
        outs, mine = run_cases_viewed(runner.run, res.path, manifest, cases, threads=opts.threads or 1)
    else:
        outs = run_cases(runner.run, cases)
    refs = [c.reference for c in cases]
    ranges = {s.name: s.value_range for s in gspec.outputs}
    preset = models.preset.name
    scales: dict[str, float | None] = {}
    if res.precision == "int8":
        res.quant_scales = _output_scales(res.path, manifest, [s.name for s in gspec.outputs])
        scales = {k: v["scale"] for k, v in res.quant_scales.items()}
    floors = load_floors(res.precision, res.graph, preset)
    vq1 = vq2 = vq3 = None
    if flip_aware:
        ref_view = reference_view(models, cases)
        vq1 = VQCompare(judge32, eager_view, ref_view)
        if mine is not None:
            vq2, vq3 = VQCompare(judge, mine, eager_view), VQCompare(judge, mine, ref_view)
    res.outputs += _stats(HOP_REFERENCE, eager, refs, cases, load_floors("fp32", res.graph, preset), ranges, None, vq1)
    res.outputs += _stats(runtime_hop(res.format), outs, eager, cases, floors, ranges, scales, vq2)
    res.outputs += _stats(end_to_end_hop(res.format), outs, refs, cases, floors, ranges, scales, vq3)
    if not res.passed or opts.diagnose:
        res.diagnosis = diagnose_artifact(res, manifest, module, gspec, cases, outs, eager, session)

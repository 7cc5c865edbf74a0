"""The parity report: ``parity.json`` and the Markdown ``parity.md`` (what ``tadsr parity`` prints).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tadsr.errors import InputError
from tadsr.parity.hops import Floor, flip_summary
from tadsr.parity.records import ArtifactCheck, Diagnosis, ParityResult, SetCheck, db_str


def _fmt(x: float | None, kind: str = "g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "db":
        return db_str(x)
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

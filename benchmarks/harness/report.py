"""Render a benchmark report: JSON first, then a Markdown table, two plots and an image grid, each written atomically.

Files written into the report folder (each through a temporary file and ``os.replace``, so a reader never sees a
half-written file; ``report.json`` is written before anything is rendered from it):

=====================  ==========================================================================================
``report.json``        every number with its conditions (:func:`tadsr.bench.bench.run_bench`'s document)
``report.md``          details list, main table, per-stage table, ratios, warnings
``latency_psnr.png``   end-to-end latency per tile (log) vs PSNR-Y, one point per system (needs images)
``stage_latency.png``  per-stage median latency bars (fused artifacts and bicubic: end to end only)
``grid.png``           centre crops: bicubic / teacher / student / INT8 (or the first artifact) / HR (needs images)
=====================  ==========================================================================================
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tadsr import fileio
from tadsr.runtime.artifacts import COMPONENTS

__all__ = ["write_report", "render_markdown", "render_ratios", "atomic_write"]

STAGES = COMPONENTS  # the per-stage latency columns
_MB = 1e6


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`tadsr.fileio.write_bytes`: temp file + ``os.replace``)."""
    return fileio.write_bytes(Path(path), data)


def write_report(
    report: Mapping[str, Any], crops: Mapping[str, Sequence[np.ndarray]], out_dir: Path
) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (JSON first); returns ``{kind: path}``."""
    out_dir = Path(out_dir)
    files = {
        "json": atomic_write(out_dir / "report.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    }
    files["markdown"] = atomic_write(out_dir / "report.md", render_markdown(report).encode())
    systems = [s for s in report["systems"] if s["status"] == "ok" and s["latency"]]
    if any(s["fidelity"] for s in systems):
        files["latency_psnr"] = atomic_write(out_dir / "latency_psnr.png", _plot_latency_psnr(report, systems))
    if systems:
        files["stage_latency"] = atomic_write(out_dir / "stage_latency.png", _plot_stages(report, systems))
    grid = _grid(report, crops)
    if grid is not None:
        files["grid"] = atomic_write(out_dir / "grid.png", grid)
    return files


# ---------------------------------------------------------------------------------------------------- markdown


def _ms(stat: Mapping[str, Any] | None) -> str:
    return "-" if not stat else f"{stat['median_ms']:.1f}"


def _num(x: Any, fmt: str = ".2f") -> str:
    if x is None:
        return "-"
    return "identical" if x >= 999 else format(x, fmt)


def _size(s: Mapping[str, Any]) -> str:
    return "-" if not s["size_bytes"] else f"{s['size_bytes'] / _MB:.2f}"


def _rss(s: Mapping[str, Any]) -> str:
    m = s.get("memory") or {}
    return "-" if not m.get("peak_rss_bytes") else f"{m['peak_rss_bytes'] / _MB:.0f}"


# the thread records of the runtimes benchmarked (bench records those of the formats it ran)
_RUNTIME_THREADS = (("onnxruntime_intra_op", "ONNX Runtime intra-op"), ("executorch_threadpool", "ExecuTorch pool"))


def _details(report: Mapping[str, Any]) -> list[str]:
    m, c, v = report["machine"], report["conditions"], report["versions"]
    th = c["threads"]
    data = c.get("data") or {}
    imgs = ", ".join(f"{i['name']} {i['hr_size'][0]}x{i['hr_size'][1]}" for i in data.get("images", []))
    return [
        f"- **Machine**: {m['cpu']} ({m['arch']}), {m['cores_logical']} logical cores ({m['cores_usable']} usable), "
        f"{m['os']}, Python {m['python']}; load average {m['load_avg_start']} at start, {m['load_avg_end']} at end",
        "- **Libraries**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "- **Threads**: " + ", ".join([f"torch {th['torch']}", *(f"{label} {th[k]}" for k, label in _RUNTIME_THREADS
                                                                 if k in th)])
        + f" (requested: {th['requested'] or 'defaults'})",
        f"- **Model**: preset `{c['preset']}`; "
        + "; ".join(f"{k}: {s.get('path')}" for k, s in c["model_sources"].items()),
        f"- **Tiles**: {c['tile']}x{c['tile']} LR (x{c['scale']}), overlap {c['overlap']}, {c['blend']} blend, noise "
        f"seed {c['seed']} (same tiles and noise for every system; teacher T={c['teacher_steps']})",
        f"- **Latency**: {c['latency_input']}; {c['warmup']} warm-up (the fidelity passes count) + median / p90 of "
        f"{c['repeats']} timed runs",
        f"- **Memory**: {c['memory']} (see report.json for the method per system)",
        f"- **Fidelity**: {c['metrics']}; data: {data.get('source', 'none')} ({data.get('lr_source', '-')} LR): "
        f"{imgs or '-'}",
    ]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: details, main table, per-stage table, ratios and warnings."""
    lines = ["# tadsr bench", "", *_details(report), ""]
    head = (
        "system",
        "layout",
        "prec",
        "size MB",
        "e2e ms",
        "p90 ms",
        "peak RSS MB",
        "PSNR-Y",
        "SSIM-Y",
        "PSNR-RGB",
        "SSIM-RGB",
        "parity dB",
        "LR-cons dB (worst)",
        "ΔE00",
        "sanity",
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["systems"]:
        f = (s["fidelity"] or {}).get("mean", {})
        name = s["name"] + (" (simulator)" if s["simulator"] else "")
        if s["status"] != "ok":
            lines.append(f"| {name} | {s['layout']} | {s['precision']} | {_size(s)} | {s['status']} |" + " - |" * 10)
            continue
        e2e = s["latency"].get("e2e")
        lines.append(
            f"| {name} | {s['layout']} | {s['precision']} | {_size(s)} | {_ms(e2e)} | "
            f"{'-' if not e2e else format(e2e['p90_ms'], '.1f')} | {_rss(s)} | {_num(f.get('psnr_y'))} | "
            f"{_num(f.get('ssim_y'), '.4f')} | {_num(f.get('psnr_rgb'))} | {_num(f.get('ssim_rgb'), '.4f')} | "
            f"{_num(f.get('parity_psnr'), '.1f')} | {_lr_cons(f)} | {_num(f.get('de00'))} | {_verdict(s)} |"
        )
    for dn in (report.get("baselines") or {}).values():
        f, fix = dn["mean"], dn.get("color_fix", "none")
        label = "*do-nothing baseline*" if fix == "none" else f"*do-nothing baseline [{fix}]*"
        lines.append(
            f"| {label} | decode(encode(bicubic)) | fp32 | - | - | - | - | {_num(f.get('psnr_y'))} | "
            f"{_num(f.get('ssim_y'), '.4f')} | {_num(f.get('psnr_rgb'))} | {_num(f.get('ssim_rgb'), '.4f')} | - | "
            f"{_lr_cons(f)} | {_num(f.get('de00'))} | floor |"
        )
    fails = [s for s in report["systems"] if ((s["fidelity"] or {}).get("sanity") or {}).get("fail")]
    if fails:
        lines += ["", "**Sanity failures** (LR consistency mean >= 35 dB and worst >= 30 dB; models must beat the "
                  "do-nothing path with the same colour fix):", ""]  # fmt: skip
        lines += [f"- ❌ FAIL {s['name']}: " + "; ".join(s["fidelity"]["sanity"]["reasons"]) for s in fails]
    lines += [
        "",
        "Per stage (median ms per tile; fused artifacts run end to end only):",
        "",
        "| system | encoder | denoiser | decoder | e2e |",
        "|---|---|---|---|---|",
    ]
    for s in report["systems"]:
        if s["status"] == "ok" and s["latency"]:
            lat = s["latency"]
            lines.append(f"| {s['name']} | " + " | ".join(_ms(lat.get(k)) for k in (*STAGES, "e2e")) + " |")
    lines += ["", *_ratio_lines(report["ratios"])]
    notes = [f"- {s['name']}: {s['note']}" for s in report["systems"] if s["note"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    if report["warnings"]:
        lines += ["", "Warnings:", "", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"


def _lr_cons(f: Mapping[str, Any]) -> str:
    if f.get("lr_cons") is None:
        return "-"
    return f"{_num(f.get('lr_cons'))} ({_num(f.get('lr_cons_worst'))})"


def _verdict(s: Mapping[str, Any]) -> str:
    sanity = (s.get("fidelity") or {}).get("sanity")
    if not sanity:
        return "-"
    return "❌ FAIL" if sanity["fail"] else "✅ pass"


def render_ratios(report: Mapping[str, Any]) -> str:
    """The ratio table (student / teacher, export / eager, INT8 / fp32 per stage) and the per-stage table."""
    lines = ["| system | encoder | denoiser | decoder | e2e |", "|---|---|---|---|---|"]
    for s in report["systems"]:
        if s["status"] == "ok" and s["latency"]:
            lines.append(f"| {s['name']} | " + " | ".join(_ms(s["latency"].get(k)) for k in (*STAGES, "e2e")) + " |")
    return "\n".join(["Median ms per tile:", "", *lines, "", *_ratio_lines(report["ratios"])]) + "\n"


def _ratio_row(r: Mapping[str, Any]) -> str:
    lat = r["latency"]
    cells = " | ".join(_num(lat.get(k), ".3f") for k in (*STAGES, "e2e"))
    return f"| {r['numerator']} / {r['denominator']} | {cells} | {_num(r.get('psnr_y_delta_db'), '+.2f')} |"


def _ratio_lines(ratios: Mapping[str, Any]) -> list[str]:
    rows = []
    if ratios.get("student_vs_teacher"):
        rows.append(_ratio_row(ratios["student_vs_teacher"]))
    rows += [_ratio_row(r) for r in ratios.get("export_vs_eager", [])]
    rows += [_ratio_row(r) for r in ratios.get("int8_vs_fp32", [])]
    if not rows:
        return []
    return [
        "Ratios of median latencies (< 1: the numerator is faster) and PSNR-Y differences:",
        "",
        "| ratio | encoder | denoiser | decoder | e2e | PSNR-Y delta dB |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


# ------------------------------------------------------------------------------------------------------- plots


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(report: Mapping[str, Any]) -> str:
    c, m = report["conditions"], report["machine"]
    return f"{c['preset']}, tile {c['tile']}, threads {c['threads']['torch']}, {m['cpu']}"


def _plot_latency_psnr(report: Mapping[str, Any], systems: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"bicubic": "tab:gray", "torch": "tab:blue", "artifact": "tab:orange"}
    for i, s in enumerate(systems):
        f = (s["fidelity"] or {}).get("mean")
        if not f:
            continue
        x = max(s["latency"]["e2e"]["median_ms"], 1e-3)
        face = "none" if s["simulator"] else colors[s["kind"]]
        marker = "D" if s.get("precision") == "int8" else "o"
        ax.scatter([x], [f["psnr_y"]], s=50, marker=marker, facecolors=face, edgecolors=colors[s["kind"]])
        ax.annotate(
            s["name"] + (" (sim)" if s["simulator"] else ""),
            (x, f["psnr_y"]),
            fontsize=7,
            xytext=(4, 4 + 9 * (i % 3)),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency per tile, median (ms, log)")
    ax.set_ylabel("PSNR-Y vs HR (dB)")
    ax.set_title("latency vs fidelity\n" + _subtitle(report), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return _figure_png(fig)


def _plot_stages(report: Mapping[str, Any], systems: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(systems) + 1.5))
    colors = {"encoder": "tab:blue", "denoiser": "tab:red", "decoder": "tab:green", "e2e": "tab:gray"}
    labels = []
    for i, s in enumerate(systems):
        lat = s["latency"]
        labels.append(s["name"] + (" (sim)" if s["simulator"] else ""))
        left = 0.0
        if all(k in lat for k in STAGES):
            for k in STAGES:
                ax.barh(
                    i,
                    lat[k]["median_ms"],
                    left=left,
                    color=colors[k],
                    label=k if i == 0 or k not in ax.get_legend_handles_labels()[1] else None,
                )
                left += lat[k]["median_ms"]
        else:
            ax.barh(
                i,
                lat["e2e"]["median_ms"],
                color=colors["e2e"],
                hatch="//" if s["layout"] == "fused" else None,
                label="end to end" if "end to end" not in ax.get_legend_handles_labels()[1] else None,
            )
        ax.text(max(left, lat["e2e"]["median_ms"]), i, f" {lat['e2e']['median_ms']:.0f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(systems)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median latency per tile (ms)")
    ax.set_title("per-stage latency\n" + _subtitle(report), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _figure_png(fig)


# -------------------------------------------------------------------------------------------------------- grid


def _grid_columns(report: Mapping[str, Any], crops: Mapping[str, Sequence[np.ndarray]]) -> list[tuple[str, str]]:
    """(label, crops key) per column: bicubic, teacher, student, INT8 (else the first artifact), HR."""
    names = [s["name"] for s in report["systems"] if s["name"] in crops]
    cols = [("bicubic", "bicubic")]
    cols += [(n.replace("torch-", ""), n) for n in names if n.startswith("torch-teacher")][:1]
    cols += [("student (torch)", "torch-student")] if "torch-student" in crops else []
    arts = [s for s in report["systems"] if s["kind"] == "artifact" and s["name"] in crops]
    pick = next((s for s in arts if s["precision"] == "int8"), arts[0] if arts else None)
    if pick is not None:
        extra = (" (sim)" if pick["simulator"] else "") + ("" if pick["precision"] == "int8" else " (no INT8 given)")
        cols.append((pick["name"] + extra, pick["name"]))
    return [c for c in cols if c[1] in crops] + [("HR", "HR")]


def _grid(report: Mapping[str, Any], crops: Mapping[str, Sequence[np.ndarray]]) -> bytes | None:
    from PIL import Image, ImageDraw

    if not crops.get("HR"):
        return None
    cols = _grid_columns(report, crops)
    rows = min(len(crops["HR"]), 4)
    hs = [c.shape[0] for c in crops["HR"][:rows]]
    cw = max(c.shape[1] for c in crops["HR"][:rows])
    zoom = max(1, math.ceil(128 / max(max(hs), cw)))
    cw, head, pad = cw * zoom, 16, 4
    tops = np.cumsum([head + pad] + [h * zoom + pad for h in hs]).tolist()
    canvas = Image.new("RGB", (len(cols) * (cw + pad) + pad, tops[-1]), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (label, key) in enumerate(cols):
        x0 = pad + j * (cw + pad)
        draw.text((x0, 2), label[: max(8, cw // 6)], fill="black")
        for i in range(rows):
            arr = (np.clip(crops[key][i], 0, 1) * 255 + 0.5).astype(np.uint8)
            img = Image.fromarray(arr).resize((arr.shape[1] * zoom, arr.shape[0] * zoom), Image.Resampling.NEAREST)
            canvas.paste(img, (x0, tops[i]))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()

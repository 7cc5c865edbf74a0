"""Where the main job spends its time: every stage of ``tadsr all`` under cProfile (issue #20).

Runs the main job in this process with each stage (load, export per format, quantize per artifact, parity, bench)
wrapped in its own :class:`cProfile.Profile`, then prints per stage its wall time, its CPU share by *area* (which
library or which part of tadsr the time is spent in: torch.export tracing, XNNPACK lowering, coremltools
conversion, the Core ML simulator, ONNX Runtime, the reference pipeline in torch, ...) and its most expensive
functions by own time. The areas are attributed by own (``tottime``) time, so each second counts once.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/profile_stages.py --smoke --out /tmp/prof --threads 1 \
        > benchmarks/results/profile_stages_smoke.txt
    python benchmarks/profile_stages.py --out /tmp/prof_full --threads 1      # the full main job (~45 min)

``--pstats DIR`` also keeps each stage's raw profile (``snakeviz`` / ``pstats`` readable).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

# this checkout: the toolkit's packages live at its top level (tadsr.parity = parity/, ...), its libraries in a
# site-packages folder that may sit inside it (.venv)
_REPO = Path(__file__).resolve().parents[1].as_posix()
# (area, path fragments of the function's file): the first match wins, so specific before general
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("coreml-sim (numpy Core ML executor)", ("tadsr/runtime/coreml_sim", "runtime/coreml_sim")),
    ("ExecuTorch XNNPACK lowering / serialisation", ("executorch/backends", "executorch/exir")),
    ("ExecuTorch runtime", ("executorch/extension", "executorch/runtime", "_portable_lib", "method executorch.")),
    ("coremltools conversion", ("coremltools/",)),
    ("ONNX Runtime (sessions, quantize_static)", ("onnxruntime/", "method onnxruntime.")),
    ("onnx / onnxsim (graph build, checks, simplify)", ("/onnx/", "onnxsim/", "onnxscript/")),
    ("torch.export / dynamo / fx tracing", ("torch/export", "torch/_dynamo", "torch/fx", "torch/_export",
                                            "torch/_subclasses", "torch/_higher_order_ops", "torch/_guards")),
    ("torch.ao PT2E quantization", ("torch/ao/", "torchao/")),
    ("torch.onnx exporter", ("torch/onnx",)),
    ("torch eager compute (reference pipeline, captures)", ("torch/nn", "torch/_tensor", "torch/functional",
                                                            "built-in method conv", "built-in method matmul",
                                                            "built-in method torch.", "torch/_ops")),
    ("tadsr parity (flip analysis, comparison)", ("tadsr/parity", f"{_REPO}/parity/")),
    ("tadsr formats / quantize / export (own code)", ("tadsr/formats", "tadsr/quantize", "tadsr/export",
                                                      f"{_REPO}/formats/", f"{_REPO}/quantize/",
                                                      f"{_REPO}/export/")),  # fmt: skip
    ("tadsr other", ("tadsr/", f"{_REPO}/")),
    ("numpy", ("numpy/",)),
    ("file and process I/O", ("built-in method io.", "method 'write'", "method 'read'", "posix.", "zipfile",
                              "shutil", "hashlib", "subprocess", "selectors")),
]


def area_of(file: str, func: str) -> str:
    key = f"{file}:{func}"
    library = "site-packages/" in file
    for name, parts in AREAS:
        if any(p in key for p in parts if not (library and p.startswith(_REPO))):
            return name
    return "other (python, libraries)"


def summarize(name: str, wall: float, prof: cProfile.Profile | str, top: int) -> list[str]:
    """Own time by area and the top functions of one stage's profile (a profiler, or a saved pstats file)."""
    st = pstats.Stats(prof)
    rows = st.stats  # type: ignore[attr-defined]
    by_area: dict[str, float] = {}
    funcs: list[tuple[float, float, str]] = []
    total = 0.0
    for (file, line, func), (_cc, _nc, tt, ct, _callers) in rows.items():
        total += tt
        by_area[area_of(file, func)] = by_area.get(area_of(file, func), 0.0) + tt
        funcs.append((tt, ct, f"{Path(file).name}:{line}({func})" if file != "~" else func))
    walls = "wall not recorded" if wall != wall else f"{wall:.1f} s wall"  # NaN: a saved profile alone
    out = [f"## {name}: {walls}, {total:.1f} s profiled (own time summed over functions)"]
    for a, t in sorted(by_area.items(), key=lambda kv: -kv[1]):
        if t >= 0.005 * max(total, 1e-9):
            out.append(f"  {100 * t / max(total, 1e-9):5.1f} %  {t:8.1f} s  {a}")
    out.append(f"  top {top} functions by own time (own s / cumulative s):")
    for tt, ct, f in sorted(funcs, reverse=True)[:top]:
        out.append(f"    {tt:8.1f} {ct:8.1f}  {f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="the main job's output folder")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None,
                    help="only print the areas and top functions of saved stage profiles (.pstats files)")
    ap.add_argument("--smoke", action="store_true", help="the reduced main job (tadsr all --smoke)")
    ap.add_argument("--format", dest="formats", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=8, help="functions listed per stage")
    ap.add_argument("--pstats", type=Path, default=None, help="also write each stage's raw profile here")
    args = ap.parse_args(argv)
    if args.summarize:
        for f in args.summarize:
            print("\n".join(summarize(f.stem, float("nan"), str(f), args.top)) + "\n")
        return 0
    if args.out is None:
        ap.error("--out is required (or --summarize)")

    import tadsr.cli.main_job as mj
    from tadsr.cli import main as tadsr_main

    stages: list[tuple[str, float, cProfile.Profile]] = []

    real_stage = mj._stage

    def profiled_stage(cfg: Any, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """The main job's own ``_stage`` (timing, peak RSS), with ``fn`` run under a fresh profiler."""
        prof = cProfile.Profile()
        t0 = time.perf_counter()

        def profiled() -> Any:
            prof.enable()
            try:
                return fn()
            finally:
                prof.disable()

        out = real_stage(cfg, name, profiled, *args, **kwargs)
        wall = time.perf_counter() - t0
        stages.append((name, wall, prof))
        print(f"# stage {name}: {wall:.1f} s", file=sys.stderr, flush=True)
        return out

    mj._stage = profiled_stage  # every stage of run_main_job goes through _stage
    # one lane at a time, in this process: stages of lane processes would escape the profiler
    cmd = ["-q", "all", "--out", str(args.out), "--jobs", "1"]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--format", *args.formats] if args.formats else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    print(f"# python benchmarks/profile_stages.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# tadsr {' '.join(cmd)}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"load average at start {[round(x, 2) for x in os.getloadavg()]}")  # fmt: skip
    t0 = time.perf_counter()
    rc = tadsr_main(cmd)
    total = time.perf_counter() - t0
    print(f"# exit {rc}, {total:.1f} s wall in all; load average at end {[round(x, 2) for x in os.getloadavg()]}")
    print("\n| stage | wall s | share |\n|---|---|---|")
    for name, wall, _ in stages:
        print(f"| {name} | {wall:.1f} | {100 * wall / total:.1f} % |")
    for name, wall, prof in stages:
        print()
        print("\n".join(summarize(name, wall, prof, args.top)))
        if args.pstats is not None:
            args.pstats.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(str(args.pstats / f"{name.replace(' ', '_')}.pstats"))
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())

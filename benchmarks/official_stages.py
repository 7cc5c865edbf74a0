"""Wall time and peak RSS of every stage of the main job at official size, each in its own process (issue #20:
every stage within 12 GB).

For each format, the stages ``tadsr all`` runs for it, as the CLI verbs that call the same library functions, on
the official-size architecture with deterministic random weights (``--preset official-x4 --init random``):

1. ``export``: the graphs and precisions the main job exports for the format (ONNX and ExecuTorch: fused pipeline
   and components, fp32; Core ML: fused pipeline, fp32 and fp16), with parity as in the main job but not gating
   (random weights can put a case on VQ near-ties; the stages after it are measured anyway).
2. ``quantize <graph>``: INT8 of each fp32 artifact (Core ML: W8A8 and its W8 twin). Random weights make the
   recipe search meaningless (a fidelity budget on noise), so the recipe is "every block INT8 but the pinned
   ones" (``--target-psnr 1 --hr-budget none``: the search's first candidate meets it); calibration, conversion
   or lowering and the held-out parity run as in the main job, on fewer patches (``--num-patches``,
   ``--holdout-patches``).
3. ``parity artifacts`` / ``parity int8``: ``tadsr parity`` of the format's folders (the main job's whole-image
   size, ``--max-side 128``).
4. ``bench``: ``tadsr bench`` over every artifact of every format measured, one image, one timed pass.

Peak RSS: the largest resident size of the stage's process tree, sampled every 0.1 s from ``/proc`` (a spike
shorter than that can be missed), and the largest single process's own peak from ``wait4`` (``ru_maxrss``;
``tadsr bench`` restarts its kernel mark per system, so its figure there is the last system's). Linux only.

    python benchmarks/official_stages.py --work /tmp/official --formats coreml onnx executorch \\
        > benchmarks/results/official_stages.md

An export stage is skipped with ``--stages quantize ...`` and the artifacts of an earlier run in ``--work`` are
quantized.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.startswith(("INFO", "WARN"))]
        return lines[-1][:160] if lines else ""
    except OSError:
        return ""


def run_stage(cmd: list[str], log: Path) -> dict[str, float | int]:
    """Run ``cmd`` (its output into ``log``); its wall time, exit code and peak RSS (sampled tree, wait4). The
    RSS trace (``<log>.rss.tsv``: seconds, GB, the stage's last log line) records every 0.25 GB move and the peak."""
    peak = [0]
    t0 = time.perf_counter()
    trace = open(Path(f"{log}.rss.tsv"), "w")  # noqa: SIM115 (closed below, after the sampler)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            last = 0
            while not done.wait(0.1):
                now = sum(_rss(p) for p in _tree(proc.pid))
                if now > peak[0] + 0.05 * GB or abs(now - last) > 0.25 * GB:
                    trace.write(f"{time.perf_counter() - t0:.1f}\t{now / GB:.2f}\t{_last_line(log)}\n")
                    last = now
                peak[0] = max(peak[0], now)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        trace.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode, "tree_gb": peak[0] / GB,
            "process_gb": usage.ru_maxrss * 1024 / GB}  # fmt: skip


def _plan(fmt: str) -> tuple[list[str], list[str]]:
    """(graphs, precisions) the main job exports for ``fmt`` (tadsr.cli.main_job._export_plan, full job)."""
    from tadsr.cli.main_job import MainJobConfig, _export_plan

    graphs, precisions = _export_plan(MainJobConfig(out=Path(".")), fmt)
    return list(graphs), list(precisions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="work folder (artifacts, logs)")
    ap.add_argument("--formats", nargs="+", default=["coreml", "onnx", "executorch"])
    ap.add_argument("--stages", nargs="+", default=["export", "quantize", "parity", "bench"],
                    choices=["export", "quantize", "parity", "bench"])  # fmt: skip
    ap.add_argument("--int8-graphs", nargs="+", default=None, choices=["pipeline", "encoder", "denoiser", "decoder"],
                    help="the fp32 graphs to quantize (default: every one exported; the fused pipeline is the largest)")
    ap.add_argument("--num-patches", type=int, default=8, help="calibration patches (main job: all 48 shipped)")
    ap.add_argument("--holdout-patches", type=int, default=4, help="held-out patches (main job: 16)")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: the libraries')")
    ap.add_argument("--limit-gb", type=float, default=12.0)
    ap.add_argument("--preset", default="official-x4", help="model preset, random weights (tiny: a quick check)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also run each stage under cProfile, its raw profile in this folder, and print where each "
                    "stage's time goes (profile_stages.py's areas; cProfile slows the stage, its RSS is close)")
    ap.add_argument("--top", type=int, default=10, help="functions listed per profiled stage")
    args = ap.parse_args(argv)
    model = ["--preset", args.preset, "--init", "random"]
    if not Path("/proc/self/status").exists():
        sys.exit("official_stages.py reads /proc (Linux)")
    tadsr = [sys.executable, "-m", "tadsr.cli"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    rows: list[tuple[str, dict[str, float | int]]] = []
    print(f"# python benchmarks/official_stages.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; stages one at a time, each in "
          f"its own process; limit {args.limit_gb:g} GB", flush=True)  # fmt: skip

    profiles: list[tuple[str, float, Path]] = []

    def stage(name: str, cmd: list[str]) -> None:
        logs = args.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stem = name.replace(" ", "_").replace(":", "_")
        run = cmd
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            run = [cmd[0], "-m", "cProfile", "-o", str(args.profile / f"{stem}.pstats"), *cmd[1:]]
        r = run_stage(run, logs / f"{stem}.log")
        rows.append((name, r))
        if args.profile is not None and r["rc"] == 0:
            profiles.append((name, float(r["wall_s"]), args.profile / f"{stem}.pstats"))
        print(f"# {name}: {r['wall_s']} s, rc {r['rc']}, tree {r['tree_gb']:.2f} GB, process {r['process_gb']:.2f} GB"
              f" ({shlex.join(cmd[2:])})", flush=True)  # fmt: skip

    for fmt in args.formats:
        graphs, precisions = _plan(fmt)
        art, int8 = args.work / fmt / "artifacts", args.work / fmt / "int8"
        if "export" in args.stages:
            stage(f"export {fmt}", [*tadsr, "export", *model, "--format", fmt, "--graphs", *graphs, "--precision",
                                    *precisions, "--tile", "64", "--out", str(art), "--no-progress",
                                    "--no-parity-gate"])  # fmt: skip
        fp32 = sorted(p for p in art.glob(f"*-{fmt}-fp32-t64") if (p / "manifest.json").is_file()
                      and (args.int8_graphs is None or p.name.split("-")[0] in args.int8_graphs))  # fmt: skip
        if "quantize" in args.stages:
            for folder in sorted(fp32, key=lambda p: p.name.startswith("pipeline-")):  # the main job's order
                stage(f"quantize {folder.name}", [
                    *tadsr, "quantize", str(folder), "--num-patches", str(args.num_patches), "--holdout-patches",
                    str(args.holdout_patches), "--target-psnr", "1", "--hr-budget", "none", "--no-parity-gate",
                    *threads, "--out", str(int8)])  # fmt: skip
        if "parity" in args.stages:
            for sub, folder in (("artifacts", art), ("int8", int8)):
                if folder.is_dir() and any(folder.iterdir()):
                    stage(f"parity {fmt} {sub}", [*tadsr, "parity", *model, "--max-side", "128", *threads, "--report",
                                                  str(args.work / fmt / f"parity_{sub}"), str(folder)])  # fmt: skip
    if "bench" in args.stages:
        folders = [str(p) for f in args.formats for p in (args.work / f / "artifacts", args.work / f / "int8")
                   if p.is_dir() and any(p.iterdir())]  # fmt: skip
        stage("bench", [*tadsr, "bench", *model, "--artifacts", *folders, "--max-images", "1", "--hr-crop", "256",
                        "--repeats", "1", "--warmup", "0", "--smoke", "--memory", "inprocess", *threads,
                        "--out", str(args.work / "bench")])  # fmt: skip

    print()
    print(f"| stage | wall s | exit | peak RSS GB (process tree, sampled) | peak RSS GB (largest process) | "
          f"<= {args.limit_gb:g} GB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        peak = max(r["tree_gb"], r["process_gb"])
        ok = "yes" if peak <= args.limit_gb else "**no**"
        print(f"| {name} | {r['wall_s']} | {r['rc']} | {r['tree_gb']:.2f} | {r['process_gb']:.2f} | {ok} |")
    worst = max((max(r["tree_gb"], r["process_gb"]) for _, r in rows), default=0.0)
    print(f"\nlargest stage peak: {worst:.2f} GB; stages over {args.limit_gb:g} GB: "
          f"{sum(max(r['tree_gb'], r['process_gb']) > args.limit_gb for _, r in rows)} of {len(rows)}")  # fmt: skip
    if profiles:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from profile_stages import summarize

        print("\nWhere each stage's time goes (cProfile of the stage's process; wall times above are under it)")
        for name, wall, file in profiles:
            print()
            print("\n".join(summarize(name, wall, str(file), args.top)))
    return 0 if all(r["rc"] == 0 for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
